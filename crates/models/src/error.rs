//! The models crate's error type.

/// Why a model could not be named, fetched or verified.
#[derive(Debug, thiserror::Error)]
pub enum ModelsError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file concerned.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A model could not be named, fetched or verified.
    #[error("model source: {0}")]
    Source(String),
}
