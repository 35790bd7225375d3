//! Load generation: a closed loop (a fixed number of requests in flight) or
//! an open loop (arrivals at a rate, constant, Poisson or gamma-distributed,
//! whatever the responses do). Arrival times come from the seed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

use crate::client::{Client, Outcome};
use crate::target::Target;

/// How load is applied at one level.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[serde(tag = "mode", content = "value", rename_all = "lowercase")]
pub enum Load {
    /// This many requests in flight at all times.
    Concurrency(usize),
    /// Requests arriving at this many per second.
    Rate(f64),
}

impl Load {
    /// The level's number (concurrency or rate).
    pub fn value(&self) -> f64 {
        match *self {
            Load::Concurrency(c) => c as f64,
            Load::Rate(r) => r,
        }
    }
}

/// Distribution of the gaps between open-loop arrivals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Arrival {
    /// Evenly spaced.
    Constant,
    /// Exponential gaps (burstiness 1).
    Poisson,
    /// Gamma gaps with shape `burstiness` (below 1: burstier than Poisson).
    Gamma,
}

/// When each request of an open-loop level is sent, in seconds.
pub fn arrival_times(
    rate: f64,
    arrival: Arrival,
    burstiness: f64,
    count: usize,
    seed: u64,
) -> Vec<f64> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut t = 0.0;
    (0..count)
        .map(|i| {
            if i > 0 {
                t += match arrival {
                    Arrival::Constant => 1.0 / rate,
                    Arrival::Poisson => -(1.0 - rng.random::<f64>()).ln() / rate,
                    Arrival::Gamma => gamma(&mut rng, burstiness) / (rate * burstiness),
                };
            }
            t
        })
        .collect()
}

/// A draw from Gamma(shape, 1) (Marsaglia and Tsang).
fn gamma(rng: &mut StdRng, shape: f64) -> f64 {
    if shape < 1.0 {
        let u: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        return gamma(rng, shape + 1.0) * u.powf(1.0 / shape);
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        let u2: f64 = rng.random();
        let x = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
        let v = (1.0 + c * x).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
            return d * v;
        }
    }
}

/// What one level needs to run.
pub struct LevelPlan<'a> {
    /// The load.
    pub load: Load,
    /// Requests to send (an upper bound when `duration` is set).
    pub requests: usize,
    /// Stop sending after this long.
    pub duration: Option<Duration>,
    /// Open-loop gaps.
    pub arrival: Arrival,
    /// Gamma shape.
    pub burstiness: f64,
    /// Seed of the arrival times.
    pub seed: u64,
    /// `/chat/completions` or `/completions`.
    pub path: &'a str,
    /// Request bodies, used in turn from `first` on.
    pub bodies: Arc<Vec<Value>>,
    /// Index of the level's first body: each level gets fresh prompts, so
    /// a prefix cache cannot serve one level from another's prompts.
    pub first: usize,
    /// Called after each request.
    pub on_done: &'a (dyn Fn() + Sync),
}

/// Runs one level against one target; returns the outcomes and the wall
/// time from the first send to the last answer.
pub async fn run_level(
    client: Arc<Client>,
    target: Arc<Target>,
    plan: LevelPlan<'_>,
) -> (Vec<Outcome>, f64) {
    let start = Instant::now();
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let deadline = plan.duration.map(|d| start + d);
    let path = plan.path.to_owned();
    match plan.load {
        Load::Concurrency(c) => {
            let next = Arc::new(AtomicUsize::new(0));
            let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
            let mut workers = Vec::new();
            for _ in 0..c.max(1) {
                let (client, target, next) = (client.clone(), target.clone(), next.clone());
                let (bodies, outcomes, path) =
                    (plan.bodies.clone(), outcomes.clone(), path.clone());
                let done_tx = done_tx.clone();
                let (limit, first) = (plan.requests, plan.first);
                workers.push(tokio::spawn(async move {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= limit || deadline.is_some_and(|d| Instant::now() >= d) {
                            return;
                        }
                        let body = &bodies[(first + i) % bodies.len()];
                        send_one(&client, &target, &path, body, start, &outcomes).await;
                        let _ = done_tx.send(());
                    }
                }));
            }
            drop(done_tx);
            while done_rx.recv().await.is_some() {
                (plan.on_done)();
            }
            for w in workers {
                let _ = w.await;
            }
        }
        Load::Rate(rate) => {
            let times = arrival_times(
                rate,
                plan.arrival,
                plan.burstiness,
                plan.requests,
                plan.seed,
            );
            let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
            for (i, t) in times.into_iter().enumerate() {
                let at = start + Duration::from_secs_f64(t);
                if deadline.is_some_and(|d| at >= d) {
                    break;
                }
                tokio::time::sleep_until(at.into()).await;
                while done_rx.try_recv().is_ok() {
                    (plan.on_done)();
                }
                let (client, target) = (client.clone(), target.clone());
                let (bodies, outcomes, path) =
                    (plan.bodies.clone(), outcomes.clone(), path.clone());
                let done_tx = done_tx.clone();
                let index = (plan.first + i) % bodies.len();
                tokio::spawn(async move {
                    send_one(&client, &target, &path, &bodies[index], start, &outcomes).await;
                    let _ = done_tx.send(());
                });
            }
            drop(done_tx);
            while done_rx.recv().await.is_some() {
                (plan.on_done)();
            }
        }
    }
    let outcomes = outcomes.lock().map(|o| o.clone()).unwrap_or_default();
    let wall = outcomes
        .iter()
        .map(|o| o.sent_at + o.e2e)
        .fold(0.0, f64::max)
        - outcomes
            .iter()
            .map(|o| o.sent_at)
            .fold(f64::INFINITY, f64::min);
    (outcomes, if wall.is_finite() { wall.max(0.0) } else { 0.0 })
}

/// Sends one request and records its outcome, stamped with when it left
/// relative to the level's `start`.
async fn send_one(
    client: &Client,
    target: &Target,
    path: &str,
    body: &Value,
    start: Instant,
    outcomes: &Mutex<Vec<Outcome>>,
) {
    let sent_at = start.elapsed().as_secs_f64();
    let mut o = client.run(target, path, body).await;
    o.sent_at = sent_at;
    if let Ok(mut all) = outcomes.lock() {
        all.push(o);
    }
}

/// Seconds during which at least one request was in flight.
pub fn busy_seconds(outcomes: &[Outcome]) -> f64 {
    let mut spans: Vec<(f64, f64)> = outcomes
        .iter()
        .map(|o| (o.sent_at, o.sent_at + o.e2e))
        .collect();
    spans.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut busy = 0.0;
    let mut current: Option<(f64, f64)> = None;
    for (s, e) in spans {
        current = match current {
            Some((cs, ce)) if s <= ce => Some((cs, ce.max(e))),
            Some((cs, ce)) => {
                busy += ce - cs;
                Some((s, e))
            }
            None => Some((s, e)),
        };
    }
    if let Some((cs, ce)) = current {
        busy += ce - cs;
    }
    busy
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrivals_have_the_asked_rate_and_are_reproducible() {
        for arrival in [Arrival::Constant, Arrival::Poisson, Arrival::Gamma] {
            let t = arrival_times(10.0, arrival, 0.5, 4001, 7);
            let rate = 4000.0 / t[4000];
            assert!((rate - 10.0).abs() < 0.6, "{arrival:?}: {rate}");
            assert_eq!(t, arrival_times(10.0, arrival, 0.5, 4001, 7));
        }
        let a = arrival_times(10.0, Arrival::Poisson, 1.0, 50, 1);
        let b = arrival_times(10.0, Arrival::Poisson, 1.0, 50, 2);
        assert_ne!(a, b);
    }

    #[test]
    fn busy_time_merges_overlaps() {
        let o = |sent_at, e2e| Outcome {
            sent_at,
            e2e,
            ..Outcome::default()
        };
        let busy = busy_seconds(&[o(0.0, 1.0), o(0.5, 1.0), o(3.0, 0.5)]);
        assert!((busy - 2.0).abs() < 1e-12);
    }
}
