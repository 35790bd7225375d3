//! Several choices for one request (`n`, or several prompts): one engine job
//! each, submitted all or none, and their events merged into one channel.
//! Dropping the merged receiver cancels every job still running.

use std::time::{SystemTime, UNIX_EPOCH};

use neocloud_engine::generation::{GenerateRequest, Generation};
use tokio::sync::mpsc;

use crate::engine_worker::{JobEvents, Priority, WorkerEvent};
use crate::error::ServerError;
use crate::usage::UsageMeter;
use crate::AppState;

/// Most choices one request may ask for.
pub(crate) const MAX_CHOICES: usize = 16;

/// Submits one job per request, all of `priority`; when one cannot be
/// queued, the jobs queued before it are dropped (they never start) and the
/// error is returned.
pub(crate) fn submit_all(
    state: &AppState,
    model: usize,
    requests: Vec<GenerateRequest>,
    priority: Priority,
) -> Result<Vec<JobEvents>, ServerError> {
    requests
        .into_iter()
        .map(|r| state.engine.submit_with_priority(model, r, priority))
        .collect()
}

/// The request's `priority` (0 when absent), which must fit the engine's.
pub(crate) fn priority_of(priority: Option<i64>) -> Result<Priority, ServerError> {
    let priority = priority.unwrap_or(0);
    Priority::try_from(priority).map_err(|_| {
        ServerError::param(
            "priority",
            format!(
                "priority must be an integer from {} to {}; got {priority}",
                Priority::MIN,
                Priority::MAX
            ),
        )
    })
}

/// The same request `n` times; with a seed, choice `i` samples with `seed + i`
/// so the choices differ yet stay reproducible.
pub(crate) fn choices_of(request: &GenerateRequest, n: usize) -> Vec<GenerateRequest> {
    (0..n)
        .map(|i| {
            let mut r = request.clone();
            r.sampling.seed = r.sampling.seed.map(|s| s.wrapping_add(i as u64));
            r
        })
        .collect()
}

/// Events of every job, tagged with the job's position.
pub(crate) fn merge(receivers: Vec<JobEvents>) -> mpsc::Receiver<(usize, WorkerEvent)> {
    let (tx, rx) = mpsc::channel(16 * receivers.len().max(1));
    for (index, mut events) in receivers.into_iter().enumerate() {
        let tx = tx.clone();
        tokio::spawn(async move {
            // When nobody listens any more, returning drops `events`, which
            // cancels the job (or keeps it from starting, if it waits).
            loop {
                tokio::select! {
                    ev = events.recv() => match ev {
                        Some(ev) => {
                            if tx.send((index, ev)).await.is_err() {
                                return;
                            }
                        }
                        None => return,
                    },
                    () = tx.closed() => return,
                }
            }
        });
    }
    rx
}

/// Waits for every job to finish; the first failure fails the whole. The
/// first text of any job marks the meter's first token.
pub(crate) async fn collect_all(
    receivers: Vec<JobEvents>,
    meter: &UsageMeter,
) -> Result<Vec<Generation>, ServerError> {
    let n = receivers.len();
    let mut done: Vec<Option<Generation>> = (0..n).map(|_| None).collect();
    let mut merged = merge(receivers);
    let mut first = true;
    while let Some((i, ev)) = merged.recv().await {
        match ev {
            WorkerEvent::Done(g) => {
                if first && !g.tokens.is_empty() {
                    meter.first_token();
                    first = false;
                }
                done[i] = Some(*g)
            }
            WorkerEvent::Failed(e) => return Err(e),
            WorkerEvent::Text { .. } => {
                if first {
                    meter.first_token();
                    first = false;
                }
            }
        }
    }
    done.into_iter()
        .map(|g| g.ok_or_else(|| ServerError::Unavailable("the engine stopped mid-request".into())))
        .collect()
}

/// Unix seconds now.
pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A unique response id: `prefix-` and hex.
pub(crate) fn response_id(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{prefix}-{t:x}{n:04x}")
}
