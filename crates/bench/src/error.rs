//! The bench's error type.

/// Everything a bench run can fail with (request failures are measured,
/// not errors: they are counted by kind in the report).
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// An argument is malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// A target could not be reached or answered nonsense while preparing.
    #[error("target {target}: {message}")]
    Target {
        /// The target's name.
        target: String,
        /// What went wrong.
        message: String,
    },
    /// A dataset or data file could not be read.
    #[error("{path}: {message}")]
    Data {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// A power source failed.
    #[error("power: {0}")]
    Power(String),
    /// Writing a report failed.
    #[error("writing {path}: {source}")]
    Write {
        /// The file.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}
