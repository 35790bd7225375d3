//! The engine's error type.

/// Everything that can go wrong inside the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file concerned.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A GGUF file is malformed or unsupported.
    #[error("invalid GGUF file: {0}")]
    Gguf(String),
    /// The model's metadata or tensors do not describe a supported model.
    #[error("unsupported model: {0}")]
    Model(String),
    /// A buffer or tensor has the wrong shape.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// The tokenizer metadata is missing or inconsistent.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A chat template failed to parse or render.
    #[error("chat template: {0}")]
    Template(String),
    /// A request is invalid as a whole (an empty prompt, a prompt too long
    /// for the context...).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// One parameter of a request is out of range or malformed.
    #[error("invalid {param}: {message}")]
    InvalidParameter {
        /// The parameter, as the OpenAI API names it (`temperature`,
        /// `logit_bias`, `stop`...).
        param: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// A forward pass failed (a fault of the engine, not of the request).
    #[error("the engine failed: {0}")]
    Failed(String),
    /// The key/value pool has no block left for a sequence.
    #[error("key/value memory exhausted: {0}")]
    OutOfKvMemory(String),
}
