//! One usage record per finished request. The front opens a [`UsageMeter`]
//! for every completion request it routes; whoever answers (the in-process
//! engine, the relay of an upstream's stream, the reader of a whole answer)
//! fills it in through clones of it. The record goes to the [`UsageSink`]
//! exactly once, when the last clone is dropped: after the answer ended,
//! failed, or its client went away. No path can forget it, and none can
//! send it twice.

use std::io::Write;
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::gateway::Attempt;

/// What one finished request used.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct UsageRecord {
    /// The id the front gave the request.
    pub request_id: String,
    /// The model the client asked for.
    pub model: String,
    /// The tenant whose key the request carried (none when keys are off).
    pub tenant: Option<String>,
    /// That key's public id.
    pub key_id: Option<String>,
    /// The pool that answered, if one was chosen.
    pub pool: Option<String>,
    /// The upstream that answered (`POOL/INDEX`), if one was chosen.
    pub upstream: Option<String>,
    /// The accelerator of that pool.
    pub accelerator: Option<String>,
    /// Prompt tokens, as the answer reported them.
    pub prompt_tokens: u64,
    /// Prompt tokens served from a prefix cache.
    pub cached_tokens: u64,
    /// Generated tokens.
    pub completion_tokens: u64,
    /// Seconds from arrival to the first token, when one came.
    pub ttft_s: Option<f64>,
    /// Seconds from arrival to the end.
    pub duration_s: f64,
    /// Joules the request is charged.
    pub energy_joules: f64,
    /// `estimated` or `measured`.
    pub energy_source: String,
    /// The HTTP status of the answer.
    pub status: u16,
    /// Why generation ended (`stop`, `length`, `tool_calls`, `abort` when
    /// the client left, `error`), when it began.
    pub finish_reason: Option<String>,
    /// Unix seconds when the request arrived.
    pub started_at: u64,
}

/// Where usage records go: a file, a database, a test's list.
pub trait UsageSink: Send + Sync {
    /// Takes one record; must not block the request path for long.
    fn record(&self, record: UsageRecord);
}

/// Sends each record to the tenancy database's usage ledger (batched off
/// the request path by its writer).
pub struct LedgerUsage(pub neocloud_tenancy::ledger::LedgerWriter);

impl UsageSink for LedgerUsage {
    fn record(&self, r: UsageRecord) {
        let micros = |s: f64| (s.max(0.0) * 1e6).round() as u64;
        self.0.record(neocloud_tenancy::ledger::LedgerRow {
            request_id: r.request_id,
            tenant: r.tenant,
            key_id: r.key_id,
            model: r.model,
            pool: r.pool,
            upstream: r.upstream,
            accelerator: r.accelerator,
            prompt_tokens: r.prompt_tokens,
            cached_tokens: r.cached_tokens,
            completion_tokens: r.completion_tokens,
            ttft_us: r.ttft_s.map(micros),
            duration_us: micros(r.duration_s),
            energy_millijoules: (r.energy_joules.max(0.0) * 1e3).round() as u64,
            energy_source: r.energy_source,
            // Prices come with the tenancy limits.
            cost_micros: 0,
            status: r.status,
            finish_reason: r.finish_reason,
            started_at: r.started_at,
        });
    }
}

/// Every record to each of several sinks (the ledger and a JSON-lines
/// log, say).
pub struct FanOutUsage(pub Vec<Arc<dyn UsageSink>>);

impl UsageSink for FanOutUsage {
    fn record(&self, record: UsageRecord) {
        if let Some((last, rest)) = self.0.split_last() {
            for sink in rest {
                sink.record(record.clone());
            }
            last.record(record);
        }
    }
}

/// Drops every record (usage is still in every answer's `usage`).
#[derive(Debug, Default)]
pub struct DiscardUsage;

impl UsageSink for DiscardUsage {
    fn record(&self, _: UsageRecord) {}
}

/// Appends each record as one JSON line to a file, from a thread of its
/// own so that the request path never waits on the disk.
pub struct JsonLinesUsage {
    tx: mpsc::Sender<UsageRecord>,
}

impl JsonLinesUsage {
    /// Opens (appending to) `path` and starts the writer thread.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        let (tx, rx) = mpsc::channel::<UsageRecord>();
        std::thread::Builder::new()
            .name("neocloud-usage".into())
            .spawn(move || {
                let mut out = std::io::LineWriter::new(file);
                for record in rx {
                    if let Ok(line) = serde_json::to_string(&record) {
                        if writeln!(out, "{line}").is_err() {
                            tracing::error!("cannot write the usage log");
                        }
                    }
                }
            })?;
        Ok(JsonLinesUsage { tx })
    }
}

impl UsageSink for JsonLinesUsage {
    fn record(&self, record: UsageRecord) {
        if self.tx.send(record).is_err() {
            tracing::error!("the usage log writer has stopped");
        }
    }
}

struct MeterState {
    record: UsageRecord,
    started: Instant,
    first_token: Option<Instant>,
    attempt: Option<Attempt>,
    sink: Arc<dyn UsageSink>,
}

impl MeterState {
    /// Ends the attached attempt, if any: its joules are the request's.
    fn settle_energy(&mut self) -> f64 {
        if let Some(mut attempt) = self.attempt.take() {
            self.record.energy_joules = attempt.finish();
            self.record.energy_source = "estimated".into();
            let ttft = self.record.ttft_s;
            let tokens = self.record.completion_tokens;
            let tpot = match (self.first_token, tokens > 1) {
                (Some(first), true) => Some(first.elapsed().as_secs_f64() / (tokens - 1) as f64),
                _ => None,
            };
            attempt.observe(ttft, tpot);
        }
        self.record.energy_joules
    }
}

impl Drop for MeterState {
    fn drop(&mut self) {
        self.settle_energy();
        self.record.duration_s = self.started.elapsed().as_secs_f64();
        let record = std::mem::take(&mut self.record);
        self.sink.record(record);
    }
}

/// One request's usage, shared by whoever works on it; the record is sent
/// when the last clone is dropped.
#[derive(Clone)]
pub struct UsageMeter(Arc<Mutex<MeterState>>);

impl UsageMeter {
    /// A meter for a request for `model`, sending to `sink`.
    pub fn new(sink: Arc<dyn UsageSink>, request_id: String, model: String) -> Self {
        let started_at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        UsageMeter(Arc::new(Mutex::new(MeterState {
            record: UsageRecord {
                request_id,
                model,
                energy_source: "estimated".into(),
                status: 200,
                started_at,
                ..UsageRecord::default()
            },
            started: Instant::now(),
            first_token: None,
            attempt: None,
            sink,
        })))
    }

    fn with<T>(&self, f: impl FnOnce(&mut MeterState) -> T) -> T {
        let mut state = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut state)
    }

    /// Who answers: the pool, its upstream and its accelerator. A retry on
    /// another upstream replaces the earlier one.
    pub fn served_by(&self, pool: &str, upstream: &str, accelerator: &str) {
        self.with(|s| {
            s.record.pool = Some(pool.to_owned());
            s.record.upstream = Some(upstream.to_owned());
            s.record.accelerator = Some(accelerator.to_owned());
        });
    }

    /// The attempt whose energy the request is charged, when the meter
    /// ends it (the in-process engine's answers).
    pub(crate) fn attach_attempt(&self, attempt: Attempt) {
        self.with(|s| s.attempt = Some(attempt));
    }

    /// Ends the attached attempt now and gives the joules it is charged
    /// (for the answer's `usage`); later calls give the same figure.
    pub fn energy_now(&self) -> f64 {
        self.with(MeterState::settle_energy)
    }

    /// Energy measured or estimated elsewhere (an upstream's answer).
    pub fn set_energy(&self, joules: f64, source: &str) {
        self.with(|s| {
            s.record.energy_joules = joules;
            s.record.energy_source = source.to_owned();
        });
    }

    /// A token reached the client (only the first one counts).
    pub fn first_token(&self) {
        self.with(|s| {
            if s.first_token.is_none() {
                let now = Instant::now();
                s.first_token = Some(now);
                s.record.ttft_s = Some((now - s.started).as_secs_f64());
            }
        });
    }

    /// The answer's token counts.
    pub fn tokens(&self, prompt: u64, completion: u64, cached: u64) {
        self.with(|s| {
            s.record.prompt_tokens = prompt;
            s.record.completion_tokens = completion;
            s.record.cached_tokens = cached;
        });
    }

    /// Why generation ended.
    pub fn finish_reason(&self, reason: &str) {
        self.with(|s| s.record.finish_reason = Some(reason.to_owned()));
    }

    /// Marks the end as the client's leaving, unless it ended before.
    pub fn abandoned(&self) {
        self.with(|s| {
            s.record.finish_reason.get_or_insert_with(|| "abort".into());
        });
    }

    /// The answer's HTTP status.
    pub fn status(&self, status: u16) {
        self.with(|s| s.record.status = status);
    }

    /// The tenant and key the request speaks for.
    pub fn principal(&self, tenant: &str, key_id: &str) {
        self.with(|s| {
            s.record.tenant = Some(tenant.to_owned());
            s.record.key_id = Some(key_id.to_owned());
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[derive(Default)]
    struct Collect(Mutex<Vec<UsageRecord>>);

    impl UsageSink for Collect {
        fn record(&self, record: UsageRecord) {
            self.0.lock().unwrap().push(record);
        }
    }

    #[test]
    fn the_record_goes_out_once_when_the_last_clone_drops() {
        let sink = Arc::new(Collect::default());
        let meter = UsageMeter::new(sink.clone(), "req-1".into(), "m".into());
        let relay = meter.clone();
        meter.status(200);
        drop(meter);
        assert!(sink.0.lock().unwrap().is_empty());
        relay.first_token();
        relay.tokens(10, 5, 2);
        relay.finish_reason("stop");
        relay.served_by("p", "p/0", "cpu");
        drop(relay);
        let records = sink.0.lock().unwrap();
        assert_eq!(records.len(), 1);
        let r = &records[0];
        assert_eq!(
            (r.prompt_tokens, r.completion_tokens, r.cached_tokens),
            (10, 5, 2)
        );
        assert_eq!(r.finish_reason.as_deref(), Some("stop"));
        assert_eq!(r.upstream.as_deref(), Some("p/0"));
        assert!(r.ttft_s.is_some() && r.duration_s >= r.ttft_s.unwrap());
    }

    #[test]
    fn a_client_that_left_is_an_abort_unless_it_ended_before() {
        let sink = Arc::new(Collect::default());
        let meter = UsageMeter::new(sink.clone(), "a".into(), "m".into());
        meter.abandoned();
        drop(meter);
        let meter = UsageMeter::new(sink.clone(), "b".into(), "m".into());
        meter.finish_reason("length");
        meter.abandoned();
        drop(meter);
        let records = sink.0.lock().unwrap();
        assert_eq!(records[0].finish_reason.as_deref(), Some("abort"));
        assert_eq!(records[1].finish_reason.as_deref(), Some("length"));
    }
}
