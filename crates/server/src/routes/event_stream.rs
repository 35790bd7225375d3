//! The server-sent event stream of a streamed answer: JSON chunks, an error
//! event when the engine fails, and `[DONE]` at the end.

use std::convert::Infallible;

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
pub(crate) struct EventSender(mpsc::Sender<Result<Event, Infallible>>);

impl EventSender {
    /// Sends one chunk as JSON; `false` once the client has gone.
    pub(crate) async fn send<T: Serialize>(&self, chunk: T) -> bool {
        let data = serde_json::to_string(&chunk).unwrap_or_default();
        self.0.send(Ok(Event::default().data(data))).await.is_ok()
    }

    /// Sends an error event in OpenAI's shape.
    pub(crate) async fn error(&self, error: ServerError) {
        let body = error.to_api_error().to_json();
        let _ = self.0.send(Ok(Event::default().data(body))).await;
    }

    /// Ends the stream with `[DONE]`.
    pub(crate) async fn done(&self) {
        let _ = self
            .0
            .send(Ok(Event::default().data(neocloud_openai::sse::DONE)))
            .await;
    }
}

/// A stream and the response that carries it to the client.
pub(crate) fn event_stream() -> (EventSender, Response) {
    let (tx, rx) = mpsc::channel(BUFFERED_EVENTS);
    let response = Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::default())
        .into_response();
    (EventSender(tx), response)
}
