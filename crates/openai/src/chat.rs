//! `POST /v1/chat/completions`: request, response and stream chunk types.

use serde::{Deserialize, Serialize};

/// A chat completion request. Unknown fields are accepted and ignored, as
/// OpenAI's API does; fields we cannot honour are rejected by the server.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct ChatCompletionRequest {
    /// Model name as listed by `/v1/models`.
    pub model: String,
    /// The conversation (system/user/assistant/tool messages as JSON objects).
    pub messages: Vec<serde_json::Value>,
    /// Tool definitions rendered through the chat template.
    #[serde(default)]
    pub tools: Option<Vec<serde_json::Value>>,
    /// `none`, `auto`, `required` or a named function.
    #[serde(default)]
    pub tool_choice: Option<serde_json::Value>,
    /// Stream the answer as server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// Streaming options.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Number of choices.
    #[serde(default)]
    pub n: Option<u32>,
    /// Legacy limit on generated tokens.
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// Limit on generated tokens.
    #[serde(default)]
    pub max_completion_tokens: Option<u32>,
    /// Stop strings.
    #[serde(default)]
    pub stop: Option<StopSequences>,
    /// Sampling parameters shared with the completions API.
    #[serde(flatten)]
    pub sampling: SamplingOptions,
    /// Return log-probabilities of the chosen tokens.
    #[serde(default)]
    pub logprobs: Option<bool>,
    /// Also return this many alternatives per position.
    #[serde(default)]
    pub top_logprobs: Option<u32>,
    /// `{"type": "text" | "json_object" | "json_schema"}`.
    #[serde(default)]
    pub response_format: Option<serde_json::Value>,
    /// Keep generating past end-of-sequence tokens (extension, as vLLM).
    #[serde(default)]
    pub ignore_eos: Option<bool>,
    /// Generate at least this many tokens (extension, as vLLM).
    #[serde(default)]
    pub min_tokens: Option<u32>,
    /// End-user identifier.
    #[serde(default)]
    pub user: Option<String>,
    /// Scheduling priority: lower values run first (extension, as vLLM).
    #[serde(default)]
    pub priority: Option<i64>,
}

/// Sampling parameters common to chat and text completions.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
pub struct SamplingOptions {
    /// Sampling temperature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// Nucleus sampling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    /// Top-k (extension, as vLLM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<i64>,
    /// Min-p (extension, as vLLM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_p: Option<f32>,
    /// Seed for reproducible sampling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    /// Presence penalty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence_penalty: Option<f32>,
    /// Frequency penalty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frequency_penalty: Option<f32>,
    /// Repetition penalty (extension, as vLLM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repetition_penalty: Option<f32>,
    /// Token id (as a string) to bias.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logit_bias: Option<std::collections::BTreeMap<String, f32>>,
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct StreamOptions {
    /// Send a last chunk with the usage.
    #[serde(default)]
    pub include_usage: bool,
}

/// `stop`: one string or several.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum StopSequences {
    /// A single stop string.
    One(String),
    /// Several stop strings.
    Many(Vec<String>),
}

impl StopSequences {
    /// The stop strings as a list.
    pub fn into_vec(self) -> Vec<String> {
        match self {
            StopSequences::One(s) => vec![s],
            StopSequences::Many(v) => v,
        }
    }
}

/// Token counts of a request, and neocloud's extension: the energy the
/// request is charged (`energy_joules`, with `energy_source`).
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq)]
pub struct Usage {
    /// Tokens in the prompt.
    pub prompt_tokens: u32,
    /// Tokens generated.
    pub completion_tokens: u32,
    /// Sum of both.
    pub total_tokens: u32,
    /// Joules the request is charged (neocloud's extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub energy_joules: Option<f64>,
    /// Whether `energy_joules` was measured or estimated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub energy_source: Option<EnergySource>,
}

/// Where a figure of energy comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EnergySource {
    /// Read from the device's power sensors.
    Measured,
    /// Worked out from published power and the request's share of time.
    Estimated,
}

impl Usage {
    /// Usage from the two counts.
    pub fn new(prompt_tokens: u32, completion_tokens: u32) -> Self {
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            energy_joules: None,
            energy_source: None,
        }
    }

    /// The same counts with an estimated energy, rounded to the microjoule.
    pub fn with_estimated_energy(mut self, joules: f64) -> Self {
        self.energy_joules = Some((joules * 1e6).round() / 1e6);
        self.energy_source = Some(EnergySource::Estimated);
        self
    }
}

/// An assistant message in a response.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct AssistantMessage {
    /// Always `assistant`.
    pub role: String,
    /// The text (`null` when the answer is only tool calls).
    pub content: Option<String>,
    /// Functions the model calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
}

/// A call the model makes to one of the request's tools.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct ToolCall {
    /// `call_...`, echoed back in the `tool` message with the result.
    pub id: String,
    /// Always `function`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The function and its arguments.
    pub function: FunctionCall,
}

/// The function of a tool call.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct FunctionCall {
    /// The function's name.
    pub name: String,
    /// Its arguments, as JSON text.
    pub arguments: String,
}

/// A tool call in a stream chunk: the whole call in one delta here.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct ToolCallDelta {
    /// Position of the call among the choice's calls.
    pub index: u32,
    /// The call's id.
    pub id: String,
    /// Always `function`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The function and its arguments.
    pub function: FunctionCall,
}

/// Log-probability of one token, with alternatives.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct TokenLogprob {
    /// The token's text.
    pub token: String,
    /// Its natural-log probability.
    pub logprob: f32,
    /// Its UTF-8 bytes.
    pub bytes: Vec<u8>,
    /// The most likely alternatives (present in `content` entries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_logprobs: Option<Vec<TokenLogprob>>,
}

/// `logprobs` of a chat choice.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct ChoiceLogprobs {
    /// One entry per generated token.
    pub content: Vec<TokenLogprob>,
}

/// One choice of a non-streamed response.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct ChatChoice {
    /// Position among the choices.
    pub index: u32,
    /// The answer.
    pub message: AssistantMessage,
    /// Log-probabilities when asked for.
    pub logprobs: Option<ChoiceLogprobs>,
    /// `stop`, `length` or `tool_calls`.
    pub finish_reason: String,
}

/// A non-streamed chat completion.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct ChatCompletion {
    /// `chatcmpl-...`.
    pub id: String,
    /// `chat.completion`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// The model that answered.
    pub model: String,
    /// The choices.
    pub choices: Vec<ChatChoice>,
    /// Token counts.
    pub usage: Usage,
}

/// The incremental part of a streamed choice.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
pub struct ChatDelta {
    /// `assistant` in the first chunk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// New text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Tool calls, once the model has finished writing them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
}

/// One choice of a stream chunk.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct ChatChunkChoice {
    /// Position among the choices.
    pub index: u32,
    /// What is new.
    pub delta: ChatDelta,
    /// Log-probabilities of the tokens new in this chunk, when asked for.
    #[serde(default)]
    pub logprobs: Option<ChoiceLogprobs>,
    /// Set on the last chunk of the choice.
    pub finish_reason: Option<String>,
}

/// A `chat.completion.chunk` event.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct ChatCompletionChunk {
    /// Same id for every chunk of a response.
    pub id: String,
    /// `chat.completion.chunk`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// The model that answers.
    pub model: String,
    /// Choice deltas (empty in the usage chunk).
    pub choices: Vec<ChatChunkChoice>,
    /// Usage, in the last chunk when `include_usage` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}
