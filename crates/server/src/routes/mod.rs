//! HTTP routes, one module per endpoint.

pub mod chat_completions;
mod choices;
pub mod completions;
mod event_stream;
pub mod health;
pub mod metrics;
pub mod models;
mod sampling;
pub mod tokenize;
