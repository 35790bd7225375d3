//! Tenants and keys in SQLite or PostgreSQL, through one pool (sqlx's
//! `Any` driver) and one schema, migrated at open.

use std::time::{SystemTime, UNIX_EPOCH};

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

use crate::error::TenancyError;
use crate::keys::{IssuedKey, PresentedKey};

/// Limits of a tenant or a key; `None` is no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Requests per minute.
    pub rpm: Option<u64>,
    /// Tokens per minute.
    pub tpm: Option<u64>,
    /// Requests at once (tenants only).
    pub max_concurrent: Option<u64>,
    /// Money per calendar month, in micro-units (tenants only).
    pub monthly_budget_micros: Option<u64>,
}

/// A tenant as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    /// Its unique name.
    pub name: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Disabled tenants' keys are refused.
    pub disabled: bool,
    /// Its limits.
    pub limits: Limits,
}

/// A key as stored (its secret's hash never leaves the store).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    /// Finds the key; the `<public id>` of `nc-<public id>-<secret>`.
    pub public_id: String,
    /// The tenant it belongs to.
    pub tenant: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds after which it is refused.
    pub expires_at: Option<i64>,
    /// Unix seconds when it was revoked.
    pub revoked_at: Option<i64>,
    /// The models it may use; `None` is every model.
    pub models: Option<Vec<String>>,
    /// Its own limits (requests and tokens per minute).
    pub limits: Limits,
}

/// What a new key may do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyGrant {
    /// Seconds it stays valid; `None` is forever.
    pub expires_in_secs: Option<u64>,
    /// The models it may use; `None` is every model.
    pub models: Option<Vec<String>>,
    /// Requests per minute.
    pub rpm: Option<u64>,
    /// Tokens per minute.
    pub tpm: Option<u64>,
}

/// Who a valid key speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The tenant.
    pub tenant: String,
    /// The key's public id.
    pub key_id: String,
    /// The models the key may use; `None` is every model.
    pub models: Option<Vec<String>>,
    /// The tenant's limits.
    pub tenant_limits: Limits,
    /// The key's limits.
    pub key_limits: Limits,
}

impl Principal {
    /// Whether the key may use `model`.
    pub fn may_use(&self, model: &str) -> bool {
        self.models
            .as_ref()
            .is_none_or(|m| m.iter().any(|allowed| allowed == model))
    }
}

/// Why a presented key is refused (for logs: clients get one message).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not of the key's shape.
    Malformed,
    /// No key of that id, or the secret does not match.
    Unknown,
    /// Revoked.
    Revoked,
    /// Past its expiry.
    Expired,
    /// Its tenant is disabled.
    TenantDisabled,
}

/// The tenants and keys of one database.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
}

/// Unix seconds now.
pub fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn limit(v: Option<i64>) -> Option<u64> {
    v.and_then(|v| u64::try_from(v).ok())
}

fn column(v: Option<u64>) -> Option<i64> {
    v.map(|v| i64::try_from(v).unwrap_or(i64::MAX))
}

/// Checks a tenant name: 1 to 64 of lower-case letters, digits, `.`, `_`
/// and `-`, starting with a letter or digit.
pub fn check_tenant_name(name: &str) -> Result<(), TenancyError> {
    let ok = (1..=64).contains(&name.len())
        && name.bytes().enumerate().all(|(i, b)| {
            b.is_ascii_lowercase()
                || b.is_ascii_digit()
                || (i > 0 && matches!(b, b'.' | b'_' | b'-'))
        });
    if ok {
        Ok(())
    } else {
        Err(TenancyError::Invalid(format!(
            "tenant name {name:?}: use 1 to 64 lower-case letters, digits, '.', '_' or '-', starting with a letter or digit"
        )))
    }
}

impl Store {
    /// Opens (creating a SQLite file if needed) and migrates the database
    /// at `url`: `sqlite:PATH` or `postgres://...`.
    pub async fn open(url: &str) -> Result<Self, TenancyError> {
        sqlx::any::install_default_drivers();
        let url = if url.starts_with("sqlite:") && !url.contains("mode=") {
            let sep = if url.contains('?') { '&' } else { '?' };
            format!("{url}{sep}mode=rwc")
        } else {
            url.to_owned()
        };
        let pool = AnyPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(std::time::Duration::from_secs(5))
            .connect(&url)
            .await?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        Ok(Store { pool })
    }

    /// The connection pool.
    pub(crate) fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Closes the pool.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Number of tenants.
    pub async fn tenant_count(&self) -> Result<u64, TenancyError> {
        let n: i64 = sqlx::query("SELECT COUNT(*) AS n FROM tenants")
            .fetch_one(&self.pool)
            .await?
            .try_get("n")?;
        Ok(n.max(0) as u64)
    }

    /// Creates a tenant.
    pub async fn create_tenant(&self, name: &str, limits: Limits) -> Result<Tenant, TenancyError> {
        check_tenant_name(name)?;
        if self.tenant(name).await?.is_some() {
            return Err(TenancyError::Exists(format!("tenant {name:?}")));
        }
        let created_at = now_secs();
        sqlx::query(
            "INSERT INTO tenants (name, created_at, disabled, rpm, tpm, max_concurrent, monthly_budget_micros) VALUES ($1, $2, 0, $3, $4, $5, $6)",
        )
        .bind(name)
        .bind(created_at)
        .bind(column(limits.rpm))
        .bind(column(limits.tpm))
        .bind(column(limits.max_concurrent))
        .bind(column(limits.monthly_budget_micros))
        .execute(&self.pool)
        .await?;
        Ok(Tenant {
            name: name.to_owned(),
            created_at,
            disabled: false,
            limits,
        })
    }

    /// The tenant called `name`.
    pub async fn tenant(&self, name: &str) -> Result<Option<Tenant>, TenancyError> {
        let row = sqlx::query("SELECT * FROM tenants WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| tenant_of(&r)).transpose()
    }

    /// Every tenant, by name.
    pub async fn tenants(&self) -> Result<Vec<Tenant>, TenancyError> {
        let rows = sqlx::query("SELECT * FROM tenants ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(tenant_of).collect()
    }

    /// Replaces a tenant's limits.
    pub async fn update_tenant(&self, name: &str, limits: Limits) -> Result<(), TenancyError> {
        let done = sqlx::query(
            "UPDATE tenants SET rpm = $1, tpm = $2, max_concurrent = $3, monthly_budget_micros = $4 WHERE name = $5",
        )
        .bind(column(limits.rpm))
        .bind(column(limits.tpm))
        .bind(column(limits.max_concurrent))
        .bind(column(limits.monthly_budget_micros))
        .bind(name)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 0 {
            return Err(TenancyError::NotFound(format!("tenant {name:?}")));
        }
        Ok(())
    }

    /// Disables (or enables again) a tenant: its keys are refused.
    pub async fn set_tenant_disabled(
        &self,
        name: &str,
        disabled: bool,
    ) -> Result<(), TenancyError> {
        let done = sqlx::query("UPDATE tenants SET disabled = $1 WHERE name = $2")
            .bind(i64::from(disabled))
            .bind(name)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(TenancyError::NotFound(format!("tenant {name:?}")));
        }
        Ok(())
    }

    /// Makes a key for `tenant`; the returned [`IssuedKey`] is the only
    /// place its secret is ever seen.
    pub async fn create_key(
        &self,
        tenant: &str,
        grant: &KeyGrant,
    ) -> Result<(IssuedKey, KeyRecord), TenancyError> {
        let Some(owner) = self.tenant(tenant).await? else {
            return Err(TenancyError::NotFound(format!("tenant {tenant:?}")));
        };
        if owner.disabled {
            return Err(TenancyError::Invalid(format!(
                "tenant {tenant:?} is disabled"
            )));
        }
        if let Some(models) = &grant.models {
            if models.is_empty() || models.iter().any(|m| m.is_empty() || m.contains(',')) {
                return Err(TenancyError::Invalid(
                    "--models takes model names separated by commas".into(),
                ));
            }
        }
        let issued = IssuedKey::generate();
        let created_at = now_secs();
        let expires_at = grant
            .expires_in_secs
            .map(|s| created_at.saturating_add(i64::try_from(s).unwrap_or(i64::MAX)));
        sqlx::query(
            "INSERT INTO api_keys (public_id, tenant, secret_sha256, created_at, expires_at, revoked_at, models, rpm, tpm) VALUES ($1, $2, $3, $4, $5, NULL, $6, $7, $8)",
        )
        .bind(issued.public_id.as_str())
        .bind(tenant)
        .bind(issued.secret_hash())
        .bind(created_at)
        .bind(expires_at)
        .bind(grant.models.as_ref().map(|m| m.join(",")))
        .bind(column(grant.rpm))
        .bind(column(grant.tpm))
        .execute(&self.pool)
        .await?;
        let record = KeyRecord {
            public_id: issued.public_id.clone(),
            tenant: tenant.to_owned(),
            created_at,
            expires_at,
            revoked_at: None,
            models: grant.models.clone(),
            limits: Limits {
                rpm: grant.rpm,
                tpm: grant.tpm,
                ..Limits::default()
            },
        };
        Ok((issued, record))
    }

    /// Keys, of one tenant or all, by tenant then age.
    pub async fn keys(&self, tenant: Option<&str>) -> Result<Vec<KeyRecord>, TenancyError> {
        let rows = match tenant {
            Some(t) => {
                sqlx::query(
                    "SELECT * FROM api_keys WHERE tenant = $1 ORDER BY created_at, public_id",
                )
                .bind(t)
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query("SELECT * FROM api_keys ORDER BY tenant, created_at, public_id")
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        rows.iter().map(key_of).collect()
    }

    /// Revokes a key: it is refused from now on.
    pub async fn revoke_key(&self, public_id: &str) -> Result<(), TenancyError> {
        let done = sqlx::query(
            "UPDATE api_keys SET revoked_at = $1 WHERE public_id = $2 AND revoked_at IS NULL",
        )
        .bind(now_secs())
        .bind(public_id)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 0 {
            return Err(TenancyError::NotFound(format!(
                "an unrevoked key {public_id:?}"
            )));
        }
        Ok(())
    }

    /// Who the bearer `token` speaks for at `now`, or why it is refused.
    pub async fn authenticate(
        &self,
        token: &str,
        now: i64,
    ) -> Result<Result<Principal, Refusal>, TenancyError> {
        let Some(presented) = PresentedKey::parse(token) else {
            return Ok(Err(Refusal::Malformed));
        };
        let row = sqlx::query(
            "SELECT k.*, t.disabled AS tenant_disabled, t.rpm AS tenant_rpm, t.tpm AS tenant_tpm, t.max_concurrent AS tenant_max_concurrent, t.monthly_budget_micros AS tenant_budget FROM api_keys k JOIN tenants t ON t.name = k.tenant WHERE k.public_id = $1",
        )
        .bind(presented.public_id.as_str())
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            return Ok(Err(Refusal::Unknown));
        };
        let stored: String = row.try_get("secret_sha256")?;
        if !presented.matches(&stored) {
            return Ok(Err(Refusal::Unknown));
        }
        let key = key_of(&row)?;
        if key.revoked_at.is_some() {
            return Ok(Err(Refusal::Revoked));
        }
        if key.expires_at.is_some_and(|t| now >= t) {
            return Ok(Err(Refusal::Expired));
        }
        if row.try_get::<i64, _>("tenant_disabled")? != 0 {
            return Ok(Err(Refusal::TenantDisabled));
        }
        Ok(Ok(Principal {
            tenant: key.tenant,
            key_id: key.public_id,
            models: key.models,
            tenant_limits: Limits {
                rpm: limit(row.try_get("tenant_rpm")?),
                tpm: limit(row.try_get("tenant_tpm")?),
                max_concurrent: limit(row.try_get("tenant_max_concurrent")?),
                monthly_budget_micros: limit(row.try_get("tenant_budget")?),
            },
            key_limits: key.limits,
        }))
    }
}

fn tenant_of(row: &AnyRow) -> Result<Tenant, TenancyError> {
    Ok(Tenant {
        name: row.try_get("name")?,
        created_at: row.try_get("created_at")?,
        disabled: row.try_get::<i64, _>("disabled")? != 0,
        limits: Limits {
            rpm: limit(row.try_get("rpm")?),
            tpm: limit(row.try_get("tpm")?),
            max_concurrent: limit(row.try_get("max_concurrent")?),
            monthly_budget_micros: limit(row.try_get("monthly_budget_micros")?),
        },
    })
}

fn key_of(row: &AnyRow) -> Result<KeyRecord, TenancyError> {
    let models: Option<String> = row.try_get("models")?;
    Ok(KeyRecord {
        public_id: row.try_get("public_id")?,
        tenant: row.try_get("tenant")?,
        created_at: row.try_get("created_at")?,
        expires_at: row.try_get("expires_at")?,
        revoked_at: row.try_get("revoked_at")?,
        models: models.map(|m| m.split(',').map(str::to_owned).collect()),
        limits: Limits {
            rpm: limit(row.try_get("rpm")?),
            tpm: limit(row.try_get("tpm")?),
            ..Limits::default()
        },
    })
}
