//! The usage ledger: one row per answered request, written off the request
//! path. Rows go through a channel to one writer task that commits them in
//! batches (up to [`BATCH_ROWS`], or what arrived within [`BATCH_WAIT`]),
//! each row an upsert keyed by its request id, so that writing a row twice
//! leaves one. [`LedgerWriter::flush`] returns once everything sent before
//! it is committed (the server calls it on shutdown).

use std::time::Duration;

use sqlx::Row;
use tokio::sync::{mpsc, oneshot};

use crate::error::TenancyError;
use crate::store::Store;

/// Rows committed in one transaction at most.
pub const BATCH_ROWS: usize = 512;
/// How long the writer gathers rows after the first of a batch.
pub const BATCH_WAIT: Duration = Duration::from_millis(20);
/// How long a failed batch waits before it is tried again.
const RETRY_WAIT: Duration = Duration::from_millis(500);

/// One answered request, as the ledger keeps it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LedgerRow {
    /// The request's id (a UUIDv7).
    pub request_id: String,
    /// The tenant whose key it carried.
    pub tenant: Option<String>,
    /// That key's public id.
    pub key_id: Option<String>,
    /// The model asked for.
    pub model: String,
    /// The pool that answered.
    pub pool: Option<String>,
    /// The upstream that answered.
    pub upstream: Option<String>,
    /// Its accelerator.
    pub accelerator: Option<String>,
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Prompt tokens served from a prefix cache.
    pub cached_tokens: u64,
    /// Generated tokens.
    pub completion_tokens: u64,
    /// Microseconds to the first token.
    pub ttft_us: Option<u64>,
    /// Microseconds from arrival to the end.
    pub duration_us: u64,
    /// Energy charged, in millijoules.
    pub energy_millijoules: u64,
    /// `estimated` or `measured`.
    pub energy_source: String,
    /// Price charged, in micro-units of money.
    pub cost_micros: u64,
    /// HTTP status of the answer.
    pub status: u16,
    /// Why generation ended.
    pub finish_reason: Option<String>,
    /// Unix seconds at arrival.
    pub started_at: u64,
}

enum Message {
    Row(Box<LedgerRow>),
    Flush(oneshot::Sender<()>),
}

/// The sending side of the ledger: cheap to clone, never blocks.
#[derive(Clone)]
pub struct LedgerWriter {
    tx: mpsc::UnboundedSender<Message>,
}

fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl LedgerWriter {
    /// Starts the writer task on the current tokio runtime.
    pub fn start(store: Store) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(write_batches(store, rx));
        LedgerWriter { tx }
    }

    /// Queues a row (off the request path: returns at once).
    pub fn record(&self, row: LedgerRow) {
        if self.tx.send(Message::Row(Box::new(row))).is_err() {
            tracing::error!("the ledger writer has stopped; a usage row is lost");
        }
    }

    /// Waits until every row queued before this call is committed.
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Message::Flush(done)).is_ok() {
            let _ = wait.await;
        }
    }
}

async fn write_batches(store: Store, mut rx: mpsc::UnboundedReceiver<Message>) {
    while let Some(first) = rx.recv().await {
        let mut rows = Vec::new();
        let mut flushes = Vec::new();
        let take = |m: Message, rows: &mut Vec<LedgerRow>, flushes: &mut Vec<_>| match m {
            Message::Row(row) => rows.push(*row),
            Message::Flush(done) => flushes.push(done),
        };
        take(first, &mut rows, &mut flushes);
        let deadline = tokio::time::Instant::now() + BATCH_WAIT;
        while rows.len() < BATCH_ROWS && flushes.is_empty() {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(m)) => take(m, &mut rows, &mut flushes),
                _ => break,
            }
        }
        // A batch is retried until it is committed: rows are never dropped
        // while the database is away (it is the caller's to refuse new
        // work then).
        while !rows.is_empty() {
            match store.write_ledger(&rows).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::error!(error = %e, rows = rows.len(), "writing usage rows failed; retrying");
                    tokio::time::sleep(RETRY_WAIT).await;
                }
            }
        }
        for done in flushes {
            let _ = done.send(());
        }
    }
}

impl Store {
    /// Writes `rows` in one transaction, each an upsert by request id.
    pub async fn write_ledger(&self, rows: &[LedgerRow]) -> Result<(), TenancyError> {
        let mut tx = self.pool().begin().await?;
        for r in rows {
            sqlx::query(
                "INSERT INTO usage_ledger (request_id, tenant, key_id, model, pool, upstream, accelerator, prompt_tokens, cached_tokens, completion_tokens, ttft_us, duration_us, energy_millijoules, energy_source, cost_micros, status, finish_reason, started_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18) \
                 ON CONFLICT (request_id) DO UPDATE SET tenant = excluded.tenant, key_id = excluded.key_id, model = excluded.model, pool = excluded.pool, upstream = excluded.upstream, accelerator = excluded.accelerator, prompt_tokens = excluded.prompt_tokens, cached_tokens = excluded.cached_tokens, completion_tokens = excluded.completion_tokens, ttft_us = excluded.ttft_us, duration_us = excluded.duration_us, energy_millijoules = excluded.energy_millijoules, energy_source = excluded.energy_source, cost_micros = excluded.cost_micros, status = excluded.status, finish_reason = excluded.finish_reason, started_at = excluded.started_at",
            )
            .bind(r.request_id.as_str())
            .bind(r.tenant.as_deref())
            .bind(r.key_id.as_deref())
            .bind(r.model.as_str())
            .bind(r.pool.as_deref())
            .bind(r.upstream.as_deref())
            .bind(r.accelerator.as_deref())
            .bind(int(r.prompt_tokens))
            .bind(int(r.cached_tokens))
            .bind(int(r.completion_tokens))
            .bind(r.ttft_us.map(int))
            .bind(int(r.duration_us))
            .bind(int(r.energy_millijoules))
            .bind(r.energy_source.as_str())
            .bind(int(r.cost_micros))
            .bind(i64::from(r.status))
            .bind(r.finish_reason.as_deref())
            .bind(int(r.started_at))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The ledger's rows of `tenant` (all tenants when `None`), oldest
    /// first.
    pub async fn ledger_rows(&self, tenant: Option<&str>) -> Result<Vec<LedgerRow>, TenancyError> {
        let rows =
            match tenant {
                Some(t) => sqlx::query(
                    "SELECT * FROM usage_ledger WHERE tenant = $1 ORDER BY started_at, request_id",
                )
                .bind(t)
                .fetch_all(self.pool())
                .await?,
                None => {
                    sqlx::query("SELECT * FROM usage_ledger ORDER BY started_at, request_id")
                        .fetch_all(self.pool())
                        .await?
                }
            };
        let count = |v: i64| u64::try_from(v).unwrap_or(0);
        rows.iter()
            .map(|r| {
                Ok(LedgerRow {
                    request_id: r.try_get("request_id")?,
                    tenant: r.try_get("tenant")?,
                    key_id: r.try_get("key_id")?,
                    model: r.try_get("model")?,
                    pool: r.try_get("pool")?,
                    upstream: r.try_get("upstream")?,
                    accelerator: r.try_get("accelerator")?,
                    prompt_tokens: count(r.try_get("prompt_tokens")?),
                    cached_tokens: count(r.try_get("cached_tokens")?),
                    completion_tokens: count(r.try_get("completion_tokens")?),
                    ttft_us: r.try_get::<Option<i64>, _>("ttft_us")?.map(count),
                    duration_us: count(r.try_get("duration_us")?),
                    energy_millijoules: count(r.try_get("energy_millijoules")?),
                    energy_source: r.try_get("energy_source")?,
                    cost_micros: count(r.try_get("cost_micros")?),
                    status: u16::try_from(r.try_get::<i64, _>("status")?).unwrap_or(0),
                    finish_reason: r.try_get("finish_reason")?,
                    started_at: count(r.try_get("started_at")?),
                })
            })
            .collect()
    }
}
