//! The server-sent event stream of a streamed answer: JSON chunks, an error
//! event when the engine fails, and `[DONE]` at the end.

use std::convert::Infallible;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::error::ServerError;

/// Events buffered between the task that builds chunks and the client.
const BUFFERED_EVENTS: usize = 16;

/// The writing end of a stream.
#[derive(Clone)]
pub(crate) struct EventSender {
    events: mpsc::Sender<Result<Event, Infallible>>,
    /// How long a chunk may wait for a client that reads nothing: past it
    /// the client counts as gone, and its request is cancelled.
    write_stall: Duration,
}

impl EventSender {
    /// Sends one chunk as JSON; `false` once the client has gone, or has
    /// read nothing for the write stall allowed.
    pub(crate) async fn send<T: Serialize>(&self, chunk: T) -> bool {
        let data = serde_json::to_string(&chunk).unwrap_or_default();
        match self
            .events
            .send_timeout(Ok(Event::default().data(data)), self.write_stall)
            .await
        {
            Ok(()) => true,
            Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
                tracing::warn!(
                    stalled_secs = self.write_stall.as_secs(),
                    "a client stopped reading its stream; its request is cancelled"
                );
                false
            }
            Err(mpsc::error::SendTimeoutError::Closed(_)) => false,
        }
    }

    /// Sends an error event in OpenAI's shape.
    pub(crate) async fn error(&self, error: ServerError) {
        let body = error.to_api_error().to_json();
        let _ = self.events.send(Ok(Event::default().data(body))).await;
    }

    /// Ends the stream with `[DONE]`.
    pub(crate) async fn done(&self) {
        let _ = self
            .events
            .send(Ok(Event::default().data(neocloud_openai::sse::DONE)))
            .await;
    }
}

/// A stream and the response that carries it to the client, which may
/// stall its reading for `write_stall` at most.
pub(crate) fn event_stream(write_stall: Duration) -> (EventSender, Response) {
    let (tx, rx) = mpsc::channel(BUFFERED_EVENTS);
    let response = Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::default())
        .into_response();
    (
        EventSender {
            events: tx,
            write_stall,
        },
        response,
    )
}
