//! The fleet's error type.

/// Everything the fleet can fail with.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// The configuration is malformed or inconsistent.
    #[error("fleet configuration: {0}")]
    Config(String),
}
