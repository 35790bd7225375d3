//! `POST /v1/completions` (the legacy text completion API).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::chat::{SamplingOptions, StopSequences, StreamOptions, Usage};

/// A text completion request.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct CompletionRequest {
    /// Model name.
    pub model: String,
    /// A string, a list of strings, a list of token ids, or a list of lists of ids.
    pub prompt: serde_json::Value,
    /// Text after the insertion point (not supported).
    #[serde(default)]
    pub suffix: Option<String>,
    /// Limit on generated tokens (default 16).
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// Choices per prompt.
    #[serde(default)]
    pub n: Option<u32>,
    /// Candidates to pick from (only 1 is supported).
    #[serde(default)]
    pub best_of: Option<u32>,
    /// Stream the answer.
    #[serde(default)]
    pub stream: bool,
    /// Streaming options.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Number of top log-probabilities per token (0..=20).
    #[serde(default)]
    pub logprobs: Option<u32>,
    /// Return the prompt before the completion.
    #[serde(default)]
    pub echo: bool,
    /// Stop strings.
    #[serde(default)]
    pub stop: Option<StopSequences>,
    /// Sampling parameters shared with the chat API.
    #[serde(flatten)]
    pub sampling: SamplingOptions,
    /// Keep going past end-of-sequence (extension).
    #[serde(default)]
    pub ignore_eos: Option<bool>,
    /// Generate at least this many tokens (extension, as vLLM).
    #[serde(default)]
    pub min_tokens: Option<u32>,
    /// Name tokens `token_id:N` in log-probabilities (extension, as vLLM).
    #[serde(default)]
    pub return_tokens_as_token_ids: Option<bool>,
    /// End-user identifier.
    #[serde(default)]
    pub user: Option<String>,
    /// Scheduling priority: lower values run first (extension, as vLLM).
    #[serde(default)]
    pub priority: Option<i64>,
}

/// Legacy log-probabilities: parallel lists, one entry per token.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
pub struct CompletionLogprobs {
    /// Token texts.
    pub tokens: Vec<String>,
    /// Log-probability of each token (`null` for the first prompt token).
    pub token_logprobs: Vec<Option<f32>>,
    /// Alternatives at each position (`null` for the first prompt token).
    pub top_logprobs: Vec<Option<BTreeMap<String, f32>>>,
    /// Character offset of each token in the returned text.
    pub text_offset: Vec<usize>,
}

/// One choice.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct CompletionChoice {
    /// The text (with the prompt first when `echo`).
    pub text: String,
    /// Position among the choices.
    pub index: u32,
    /// Log-probabilities when asked for.
    pub logprobs: Option<CompletionLogprobs>,
    /// `stop` or `length`; `null` in stream chunks before the last.
    pub finish_reason: Option<String>,
}

/// A text completion.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct Completion {
    /// `cmpl-...`.
    pub id: String,
    /// `text_completion`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// The model.
    pub model: String,
    /// The choices.
    pub choices: Vec<CompletionChoice>,
    /// Token counts.
    pub usage: Usage,
}

/// A streamed text completion event.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct CompletionChunk {
    /// Same id for every chunk of a response.
    pub id: String,
    /// `text_completion`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// The model.
    pub model: String,
    /// Choice deltas (empty in the usage chunk).
    pub choices: Vec<CompletionChoice>,
    /// Usage, in the last chunk when `include_usage` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}
