//! Relaying an upstream's stream to the client. The response starts when
//! an upstream accepts the request; until its first event reaches the
//! client, a failure (a stall, garbage, an error event, an early close)
//! moves the request to the next upstream, as the route allows. After the
//! first event the stream is the client's: the same failures end it with
//! one OpenAI-style SSE error event, and nothing is retried. The usage
//! chunk gets the request's energy; a client that did not ask for usage
//! does not see it. Frames are pulled as the client reads them: a slow
//! reader buffers nothing beyond the sockets, and a client that leaves
//! cancels the upstream request at once.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::{Duration, Instant};

use super::upstream::BodyStream;
use axum::body::Body;
use bytes::Bytes;
use neocloud_fleet::metrics::UpstreamErrorKind;
use neocloud_openai::sse::{frame, SseDecoder, SseEvent, DONE};
use neocloud_openai::{ApiError, ErrorKind};
use serde_json::{Map, Value};
use tokio_stream::StreamExt;

use super::dispatch::{add_energy, failed, meter_answer, succeeded, Opened, Route};
use super::Attempt;
use crate::usage::UsageMeter;

/// The largest event an upstream may send: far above any chunk of an
/// OpenAI-compatible stream; past it the upstream has failed, and the
/// gateway has held no more than this.
const MAX_EVENT_BYTES: usize = 1 << 20;

/// A stream an upstream has accepted; [`Relay::into_body`] sends it on.
pub struct Relay {
    route: Route,
    current: Current,
    /// Whether a frame has reached the client (after which nothing is retried).
    sent_any: bool,
    /// When the first frame went out.
    first_at: Instant,
    /// When the last frame went out.
    last: Instant,
    /// The last frame (`[DONE]` or an error) has gone out.
    ended: bool,
}

/// The upstream now streaming.
struct Current {
    attempt: Attempt,
    reader: EventReader,
    rewrite_model: Option<String>,
    completion_tokens: u64,
}

/// What an upstream event means.
enum Event {
    /// A frame for the client (none for a usage chunk it did not ask for).
    Chunk(Option<Bytes>),
    /// The end.
    Done,
}

/// Splits a body into SSE event data, with a stall timeout on every read.
struct EventReader {
    body: BodyStream,
    decoder: SseDecoder,
    queued: VecDeque<SseEvent>,
    stall: Duration,
}

impl EventReader {
    fn new(body: BodyStream, stall: Duration) -> Self {
        EventReader {
            body,
            decoder: SseDecoder::with_max_event_bytes(MAX_EVENT_BYTES),
            queued: VecDeque::new(),
            stall,
        }
    }

    /// The next event's data, or why there is none. An error event
    /// (`event: error`, or llama.cpp's `error:` field) is the upstream's
    /// failure.
    async fn next(&mut self) -> Result<String, UpstreamErrorKind> {
        loop {
            if let Some(event) = self.queued.pop_front() {
                if event.is_error() {
                    return Err(UpstreamErrorKind::ServerError);
                }
                return Ok(event.data);
            }
            let chunk = match tokio::time::timeout(self.stall, self.body.next()).await {
                Err(_) => return Err(UpstreamErrorKind::Timeout),
                Ok(None) | Ok(Some(Err(_))) => return Err(UpstreamErrorKind::Broken),
                Ok(Some(Ok(chunk))) => chunk,
            };
            let events = self
                .decoder
                .feed(&chunk)
                .map_err(|_| UpstreamErrorKind::BadReply)?;
            self.queued.extend(events);
        }
    }
}

impl Current {
    fn new(opened: Opened, stall: Duration) -> Self {
        Current {
            attempt: opened.attempt,
            reader: EventReader::new(opened.body, stall),
            rewrite_model: opened.rewrite_model,
            completion_tokens: 0,
        }
    }

    /// Makes sense of one event's data.
    fn interpret(
        &mut self,
        data: &str,
        wants_usage: bool,
        meter: &UsageMeter,
    ) -> Result<Event, UpstreamErrorKind> {
        if data.trim() == DONE {
            return Ok(Event::Done);
        }
        // Most events are passed on as they came: checked, not rebuilt.
        if self.rewrite_model.is_none()
            && !data.contains("\"usage\"")
            && !data.contains("\"error\"")
            && !data.contains("\"finish_reason\":\"")
        {
            return match serde_json::from_str::<serde::de::IgnoredAny>(data) {
                Ok(_) if data.trim_start().starts_with('{') => {
                    Ok(Event::Chunk(Some(Bytes::from(frame(data)))))
                }
                _ => Err(UpstreamErrorKind::BadReply),
            };
        }
        let Ok(Value::Object(mut chunk)) = serde_json::from_str::<Value>(data) else {
            return Err(UpstreamErrorKind::BadReply);
        };
        if chunk.contains_key("error") {
            return Err(UpstreamErrorKind::ServerError);
        }
        meter_answer(meter, &chunk);
        let has_usage = chunk.get("usage").is_some_and(Value::is_object);
        if !has_usage && self.rewrite_model.is_none() {
            return Ok(Event::Chunk(Some(Bytes::from(frame(data)))));
        }
        if has_usage {
            self.completion_tokens = chunk
                .get("usage")
                .and_then(|u| u.get("completion_tokens"))
                .and_then(Value::as_u64)
                .unwrap_or(0);
            let joules = self.attempt.finish();
            add_energy(&mut chunk, joules);
            meter_answer(meter, &chunk);
            if !wants_usage {
                let no_choices = chunk
                    .get("choices")
                    .and_then(Value::as_array)
                    .is_none_or(|c| c.is_empty());
                if no_choices {
                    return Ok(Event::Chunk(None));
                }
                chunk.insert("usage".into(), Value::Null);
            }
        }
        if let Some(model) = &self.rewrite_model {
            chunk.insert("model".into(), Value::String(model.clone()));
        }
        Ok(Event::Chunk(Some(encode(&chunk))))
    }
}

impl Relay {
    /// A relay of `opened`, which `route` chose.
    pub(crate) fn new(route: Route, opened: Opened) -> Self {
        let stall = route.stall_timeout();
        let now = Instant::now();
        Relay {
            route,
            current: Current::new(opened, stall),
            sent_any: false,
            first_at: now,
            last: now,
            ended: false,
        }
    }

    /// The response body. It is pulled frame by frame as the client takes
    /// them, so a slow reader holds back the upstream instead of filling a
    /// buffer, and a client that leaves drops the upstream request with it.
    pub fn into_body(self) -> Body {
        let frames = futures_util::stream::unfold(self, |mut relay| async move {
            let frame = relay.next_frame().await?;
            Some((Ok::<Bytes, Infallible>(frame), relay))
        });
        Body::from_stream(frames)
    }

    /// The next frame for the client, or `None` at the end.
    async fn next_frame(&mut self) -> Option<Bytes> {
        if self.ended {
            return None;
        }
        let wants_usage = self.route.wants_usage;
        loop {
            let id = self.current.attempt.upstream;
            let next = self.current.reader.next().await;
            let meter = self.route.meter().clone();
            let outcome =
                match next.and_then(|data| self.current.interpret(&data, wants_usage, &meter)) {
                    // An empty stream is a failure like any other.
                    Ok(Event::Done) if !self.sent_any => Err(UpstreamErrorKind::BadReply),
                    outcome => outcome,
                };
            let frame = match outcome {
                Ok(Event::Chunk(None)) => continue,
                Ok(Event::Chunk(Some(frame))) => frame,
                Ok(Event::Done) => {
                    self.ended = true;
                    self.finished_well();
                    return Some(Bytes::from(frame(DONE)));
                }
                Err(kind) if !self.sent_any => match self.fail_before_first(id, kind).await {
                    Ok(()) => continue,
                    Err(error) => {
                        self.ended = true;
                        meter.finish_reason("error");
                        return Some(error_frame(&error));
                    }
                },
                Err(kind) => {
                    let kind = if kind == UpstreamErrorKind::Timeout {
                        kind
                    } else {
                        UpstreamErrorKind::Broken
                    };
                    failed(self.route.gateway(), id, kind);
                    let message = if kind == UpstreamErrorKind::Timeout {
                        format!(
                            "the upstream stalled: nothing for {} s; the answer is incomplete",
                            self.current.reader.stall.as_secs_f64()
                        )
                    } else {
                        "the upstream's stream broke off; the answer is incomplete".to_owned()
                    };
                    let error = ApiError::new(ErrorKind::ServerError, message)
                        .with_code("upstream_stream_error");
                    self.ended = true;
                    meter.finish_reason("error");
                    return Some(error_frame(&error));
                }
            };
            let now = Instant::now();
            let metrics = &self.route.gateway().metrics.upstreams[id];
            if self.sent_any {
                metrics
                    .inter_token_latency
                    .observe_duration(now - self.last);
            } else {
                metrics
                    .time_to_first_token
                    .observe_duration(now - self.current.attempt.started);
                self.first_at = now;
                self.sent_any = true;
                meter.first_token();
            }
            self.last = now;
            return Some(frame);
        }
    }

    /// The upstream failed before its first event reached the client: the
    /// route moves on to the next upstream, or says why it cannot.
    async fn fail_before_first(
        &mut self,
        id: usize,
        kind: UpstreamErrorKind,
    ) -> Result<(), ApiError> {
        self.route.failed(id, kind);
        match self.route.open_next().await {
            Ok(opened) => {
                let stall = self.route.stall_timeout();
                self.current = Current::new(opened, stall);
                Ok(())
            }
            Err(e) => Err(e.to_api_error()),
        }
    }

    /// The stream ended with `[DONE]`: the upstream is healthy, and its
    /// timing goes into the router's estimates.
    fn finished_well(&mut self) {
        let first_at = self.first_at;
        let current = &mut self.current;
        succeeded(self.route.gateway(), current.attempt.upstream);
        let ttft = (first_at - current.attempt.started).as_secs_f64();
        let decode = first_at.elapsed().as_secs_f64();
        let tpot = (current.completion_tokens > 1)
            .then(|| decode / (current.completion_tokens - 1) as f64);
        current.attempt.observe(Some(ttft), tpot);
        current.attempt.finish();
    }
}

impl Drop for Relay {
    /// A stream dropped before its end: the client left.
    fn drop(&mut self) {
        if !self.ended {
            self.route.meter().abandoned();
        }
    }
}

/// One chunk as an SSE frame.
fn encode(chunk: &Map<String, Value>) -> Bytes {
    let text = serde_json::to_string(chunk).unwrap_or_else(|_| "{}".into());
    Bytes::from(frame(&text))
}

/// An error as an SSE event.
fn error_frame(error: &ApiError) -> Bytes {
    Bytes::from(frame(&error.to_json()))
}
