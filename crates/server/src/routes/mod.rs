//! HTTP routes, one module per endpoint.

pub mod chat_completions;
pub(crate) mod choices;
pub mod completions;
mod event_stream;
mod sampling;
pub mod tokenize;
