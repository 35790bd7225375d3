//! The one error type of the tenancy crate.

/// What can go wrong with tenants, keys and their store.
#[derive(Debug, thiserror::Error)]
pub enum TenancyError {
    /// The database could not be reached or refused a statement.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// The schema could not be brought up to date.
    #[error("database migration: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    /// A name, a limit or a duration is not acceptable.
    #[error("{0}")]
    Invalid(String),
    /// No tenant or key of that name.
    #[error("{0} does not exist")]
    NotFound(String),
    /// A tenant of that name exists already.
    #[error("{0} exists already")]
    Exists(String),
}
