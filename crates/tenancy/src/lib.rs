//! Tenants and their API keys, in SQLite (the embedded default, under
//! `$NEOCLOUD_HOME`) or PostgreSQL, through one schema migrated at open.
//!
//! A key is `nc-<public id>-<secret>`: the public id finds it, only a
//! SHA-256 of the secret is stored, and a presented secret is compared in
//! constant time ([`keys`]). [`store::Store::authenticate`] says who a
//! bearer token speaks for, or why it is refused. [`ledger`] keeps one row
//! per answered request, written in batches off the request path. This
//! crate never depends
//! on the engine, and no secret ever reaches a log, a metric or an error.

pub mod error;
pub mod keys;
pub mod ledger;
pub mod store;

pub use error::TenancyError;
pub use store::{KeyGrant, KeyRecord, Limits, Principal, Refusal, Store, Tenant};

/// Seconds in a duration written as a number and a unit (`30d`, `12h`,
/// `90m`, `45s`).
pub fn parse_duration_secs(text: &str) -> Result<u64, TenancyError> {
    let bad = || {
        TenancyError::Invalid(format!(
            "duration {text:?}: write a number and a unit, as 30d, 12h, 90m or 45s"
        ))
    };
    let split = text.len().checked_sub(1).ok_or_else(bad)?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().map_err(|_| bad())?;
    let scale = match unit {
        "d" => 86_400,
        "h" => 3_600,
        "m" => 60,
        "s" => 1,
        _ => return Err(bad()),
    };
    n.checked_mul(scale).filter(|&s| s > 0).ok_or_else(bad)
}
