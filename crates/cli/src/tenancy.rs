//! `neocloud tenants ...` and `neocloud keys ...`: tenants and their API
//! keys in the tenancy database. A key is printed once, when it is made;
//! only its hash is stored.

use anyhow::Context;
use clap::{Args, Subcommand};
use neocloud_models::ModelStore;
use neocloud_tenancy::{parse_duration_secs, KeyGrant, Limits, Store};

/// `neocloud tenants ...`.
#[derive(Debug, Subcommand)]
pub enum TenantsCommand {
    /// Create a tenant.
    Create {
        /// Its name (lower-case letters, digits, `.`, `_`, `-`).
        name: String,
        /// Its limits.
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// List the tenants.
    List,
    /// Replace a tenant's limits (those not given become unlimited).
    Update {
        /// The tenant.
        name: String,
        /// Its new limits.
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Disable a tenant: its keys are refused until it is enabled again.
    Disable {
        /// The tenant.
        name: String,
    },
    /// Enable a disabled tenant.
    Enable {
        /// The tenant.
        name: String,
    },
}

/// A tenant's limits on the command line.
#[derive(Debug, Args)]
pub struct LimitArgs {
    /// Requests per minute.
    #[arg(long)]
    pub rpm: Option<u64>,
    /// Tokens per minute.
    #[arg(long)]
    pub tpm: Option<u64>,
    /// Requests at once.
    #[arg(long)]
    pub max_concurrent: Option<u64>,
    /// Money per calendar month (e.g. 25 or 25.50; kept in micro-units).
    #[arg(long)]
    pub monthly_budget: Option<String>,
}

/// `neocloud keys ...`.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Make a key for a tenant and print it (the only time it is shown).
    Create {
        /// The tenant.
        #[arg(long)]
        tenant: String,
        /// How long it is valid (30d, 12h, 90m); default forever.
        #[arg(long)]
        expires: Option<String>,
        /// The models it may use, separated by commas; default all.
        #[arg(long, value_delimiter = ',')]
        models: Vec<String>,
        /// Requests per minute.
        #[arg(long)]
        rpm: Option<u64>,
        /// Tokens per minute.
        #[arg(long)]
        tpm: Option<u64>,
    },
    /// List keys (public ids, never secrets).
    List {
        /// Only this tenant's.
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Revoke a key by its public id (the part after `nc-`).
    Revoke {
        /// The key's public id.
        public_id: String,
    },
}

/// The database to use: the one given, else `sqlite:$NEOCLOUD_HOME/neocloud.db`.
pub fn database_url(given: Option<&str>, store: &ModelStore) -> String {
    match given {
        Some(url) => url.to_owned(),
        None => format!("sqlite:{}", store.home().join("neocloud.db").display()),
    }
}

/// A database URL with its password hidden, for messages.
pub fn shown(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// Money as micro-units, read without floating point: `25`, `25.5`,
/// `0.000001`.
pub fn parse_money_micros(text: &str) -> anyhow::Result<u64> {
    let bad = || anyhow::anyhow!("amount {text:?}: write it as 25 or 25.50 (at most 6 decimals)");
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    if whole.is_empty() || fraction.len() > 6 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let whole: u64 = whole.parse().map_err(|_| bad())?;
    let fraction: u64 = format!("{fraction:0<6}").parse().map_err(|_| bad())?;
    whole
        .checked_mul(1_000_000)
        .and_then(|w| w.checked_add(fraction))
        .ok_or_else(bad)
}

fn limits_of(args: &LimitArgs) -> anyhow::Result<Limits> {
    Ok(Limits {
        rpm: args.rpm,
        tpm: args.tpm,
        max_concurrent: args.max_concurrent,
        monthly_budget_micros: args
            .monthly_budget
            .as_deref()
            .map(parse_money_micros)
            .transpose()?,
    })
}

fn shown_limit(v: Option<u64>) -> String {
    v.map_or("-".into(), |v| v.to_string())
}

fn shown_money(v: Option<u64>) -> String {
    v.map_or("-".into(), |m| {
        format!("{}.{:06}", m / 1_000_000, m % 1_000_000)
    })
}

fn shown_time(secs: Option<i64>) -> String {
    secs.map_or("-".into(), |s| s.to_string())
}

/// Runs the command on the database, on a runtime of its own.
fn with_store<T>(
    url: &str,
    work: impl AsyncFnOnce(&Store) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let store = Store::open(url)
            .await
            .with_context(|| format!("opening the tenancy database {}", shown(url)))?;
        let out = work(&store).await;
        store.close().await;
        out
    })
}

/// `neocloud tenants ...`.
pub fn run_tenants(url: &str, command: TenantsCommand) -> anyhow::Result<()> {
    with_store(url, async |store| {
        match command {
            TenantsCommand::Create { name, limits } => {
                let tenant = store.create_tenant(&name, limits_of(&limits)?).await?;
                println!("created tenant {}", tenant.name);
            }
            TenantsCommand::List => {
                println!("name\tdisabled\trpm\ttpm\tmax_concurrent\tmonthly_budget\tcreated_at");
                for t in store.tenants().await? {
                    println!(
                        "{}\t{}\t{}\t{}\t{}\t{}\t{}",
                        t.name,
                        t.disabled,
                        shown_limit(t.limits.rpm),
                        shown_limit(t.limits.tpm),
                        shown_limit(t.limits.max_concurrent),
                        shown_money(t.limits.monthly_budget_micros),
                        t.created_at
                    );
                }
            }
            TenantsCommand::Update { name, limits } => {
                store.update_tenant(&name, limits_of(&limits)?).await?;
                println!("updated tenant {name}");
            }
            TenantsCommand::Disable { name } => {
                store.set_tenant_disabled(&name, true).await?;
                println!("disabled tenant {name}: its keys are refused");
            }
            TenantsCommand::Enable { name } => {
                store.set_tenant_disabled(&name, false).await?;
                println!("enabled tenant {name}");
            }
        }
        Ok(())
    })
}

/// `neocloud keys ...`.
pub fn run_keys(url: &str, command: KeysCommand) -> anyhow::Result<()> {
    with_store(url, async |store| {
        match command {
            KeysCommand::Create {
                tenant,
                expires,
                models,
                rpm,
                tpm,
            } => {
                let grant = KeyGrant {
                    expires_in_secs: expires.as_deref().map(parse_duration_secs).transpose()?,
                    models: (!models.is_empty()).then_some(models),
                    rpm,
                    tpm,
                };
                let (issued, record) = store.create_key(&tenant, &grant).await?;
                eprintln!(
                    "key {} for tenant {}: shown this once, store it now",
                    record.public_id, record.tenant
                );
                println!("{}", issued.reveal());
            }
            KeysCommand::List { tenant } => {
                println!("public_id\ttenant\tmodels\trpm\ttpm\tcreated_at\texpires_at\trevoked_at");
                for k in store.keys(tenant.as_deref()).await? {
                    println!(
                        "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
                        k.public_id,
                        k.tenant,
                        k.models.map_or("*".into(), |m| m.join(",")),
                        shown_limit(k.limits.rpm),
                        shown_limit(k.limits.tpm),
                        k.created_at,
                        shown_time(k.expires_at),
                        shown_time(k.revoked_at)
                    );
                }
            }
            KeysCommand::Revoke { public_id } => {
                store.revoke_key(&public_id).await?;
                println!("revoked key {public_id}");
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn money_is_read_into_micro_units_without_floats() {
        assert_eq!(parse_money_micros("25").unwrap(), 25_000_000);
        assert_eq!(parse_money_micros("25.5").unwrap(), 25_500_000);
        assert_eq!(parse_money_micros("0.000001").unwrap(), 1);
        for bad in [
            "",
            ".5",
            "1.0000001",
            "-1",
            "1e3",
            "abc",
            "99999999999999999999",
        ] {
            assert!(parse_money_micros(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn passwords_are_hidden_in_database_urls() {
        assert_eq!(
            shown("postgres://app:s3cret@db:5432/neocloud"),
            "postgres://app:***@db:5432/neocloud"
        );
        assert_eq!(shown("sqlite:/x/neocloud.db"), "sqlite:/x/neocloud.db");
    }
}
