//! The engine's own thread: it loads the served models, then runs queued
//! generation jobs one at a time, sending text to each job's channel. A job
//! whose receiver is gone (the client left) is cancelled before the next
//! forward pass, and never starts if it was still queued. The queue is
//! bounded: when it is full, new requests are refused at once. A panic
//! while running a job fails that job alone.

use std::ops::ControlFlow;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use neocloud_engine::generation::{
    generate_cached, score, FinishReason, GenerateRequest, Generation, LoadedModel, PrefixCache,
    Progress, ScoredToken,
};
use neocloud_engine::sampler::Sampled;
use tokio::sync::mpsc;

use crate::error::ServerError;
use crate::metrics::{FinishedReason, Metrics};

/// A model to serve: the name clients use and the file to load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedModel {
    /// Name in `/v1/models` and in requests.
    pub name: String,
    /// GGUF file.
    pub path: PathBuf,
}

/// What the engine thread reports about a job.
#[derive(Debug)]
pub enum WorkerEvent {
    /// Text that became final (UTF-8 complete, clear of stop strings), with
    /// the tokens generated since the previous event.
    Text {
        /// The new text.
        text: String,
        /// The new tokens, with their log-probabilities.
        steps: Vec<Sampled>,
    },
    /// The job ended.
    Done(Box<Generation>),
    /// A scoring job ended.
    Scored(Vec<ScoredToken>),
    /// The job failed.
    Failed(ServerError),
}

/// What a job asks of the engine.
#[derive(Debug)]
pub enum JobKind {
    /// Generate a continuation.
    Generate(GenerateRequest),
    /// Score a token sequence (teacher-forced log-probabilities).
    Score {
        /// The sequence.
        tokens: Vec<u32>,
        /// Alternatives per position.
        top: usize,
    },
    /// Panics inside the engine thread (tests of panic isolation).
    #[cfg(test)]
    Panic,
}

struct Job {
    model: usize,
    kind: JobKind,
    events: mpsc::Sender<WorkerEvent>,
    arrived: Instant,
}

/// Shared view of the engine thread: its models once loaded, and its queue.
#[derive(Clone)]
pub struct EngineHandle {
    jobs: SyncSender<Job>,
    models: Arc<OnceLock<Vec<Arc<LoadedModel>>>>,
    load_error: Arc<OnceLock<String>>,
    names: Arc<Vec<String>>,
    metrics: Arc<Metrics>,
}

/// Events buffered per job between the engine thread and the HTTP side.
const EVENTS_PER_JOB: usize = 64;

impl EngineHandle {
    /// Starts the engine thread; it loads `models` in the background.
    /// At most `queue_capacity` jobs wait while one runs.
    pub fn start(
        models: Vec<ServedModel>,
        queue_capacity: usize,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ServerError> {
        let (tx, rx) = sync_channel(queue_capacity);
        let handle = EngineHandle {
            jobs: tx,
            models: Arc::new(OnceLock::new()),
            load_error: Arc::new(OnceLock::new()),
            names: Arc::new(models.iter().map(|m| m.name.clone()).collect()),
            metrics,
        };
        let shared = handle.clone();
        std::thread::Builder::new()
            .name("neocloud-engine".into())
            .spawn(move || shared.run(models, rx))
            .map_err(|e| ServerError::Unavailable(format!("cannot start the engine: {e}")))?;
        Ok(handle)
    }

    fn run(self, served: Vec<ServedModel>, jobs: Receiver<Job>) {
        let mut loaded = Vec::with_capacity(served.len());
        for m in &served {
            match LoadedModel::open(&m.path) {
                Ok(lm) => loaded.push(Arc::new(lm)),
                Err(e) => {
                    let _ = self.load_error.set(format!("loading {}: {e}", m.name));
                    return;
                }
            }
        }
        let models = self.models.get_or_init(|| loaded).clone();
        // One sequence's keys and values per model, for the next prompt
        // that starts the same way.
        let mut prefix_caches: Vec<PrefixCache> =
            models.iter().map(|_| PrefixCache::new()).collect();
        let metrics = Arc::clone(&self.metrics);
        // Our own sender must go, or the loop below would never end.
        drop(self);
        for job in jobs {
            metrics.waiting.fetch_sub(1, Ordering::Relaxed);
            if job.events.is_closed() {
                // The client left while the job waited: it never starts.
                metrics.finished(FinishedReason::Abort);
                continue;
            }
            let (Some(lm), Some(prefix_cache)) =
                (models.get(job.model), prefix_caches.get_mut(job.model))
            else {
                continue;
            };
            metrics.queue_time.observe_duration(job.arrived.elapsed());
            metrics.running.fetch_add(1, Ordering::Relaxed);
            let events = job.events.clone();
            // A panic fails this job only; the thread goes on with the next.
            let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
                run_job(lm, prefix_cache, job, &metrics)
            }));
            // The gauges are settled before the client hears the end.
            metrics.kv_positions_used.store(0, Ordering::Relaxed);
            metrics.kv_positions_capacity.store(0, Ordering::Relaxed);
            metrics.running.fetch_sub(1, Ordering::Release);
            let last = outcome.unwrap_or_else(|_| {
                metrics.finished(FinishedReason::Error);
                WorkerEvent::Failed(ServerError::Internal(
                    "the engine failed on this request".into(),
                ))
            });
            let _ = events.blocking_send(last);
        }
    }

    /// The server's measurements.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Index of the served model called `name`; 404 when none is.
    pub fn model_index(&self, name: &str) -> Result<usize, ServerError> {
        self.names
            .iter()
            .position(|n| n == name)
            .ok_or_else(|| ServerError::ModelNotFound(name.to_owned()))
    }

    /// Names of the served models, in order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The loaded models, or why they are not available yet.
    pub fn models(&self) -> Result<&[Arc<LoadedModel>], ServerError> {
        if let Some(m) = self.models.get() {
            return Ok(m);
        }
        Err(ServerError::Unavailable(match self.load_error.get() {
            Some(e) => format!("the model failed to load: {e}"),
            None => "the model is still loading".into(),
        }))
    }

    /// Queues a generation; refuses at once when the queue is full.
    pub fn submit(
        &self,
        model: usize,
        request: GenerateRequest,
    ) -> Result<mpsc::Receiver<WorkerEvent>, ServerError> {
        self.submit_job(model, JobKind::Generate(request))
    }

    /// Queues a job of any kind; refuses at once when the queue is full.
    pub fn submit_job(
        &self,
        model: usize,
        kind: JobKind,
    ) -> Result<mpsc::Receiver<WorkerEvent>, ServerError> {
        let (tx, rx) = mpsc::channel(EVENTS_PER_JOB);
        let job = Job {
            model,
            kind,
            events: tx,
            arrived: Instant::now(),
        };
        // Counted before the send: the engine may pick the job up at once.
        self.metrics.waiting.fetch_add(1, Ordering::Relaxed);
        let sent = self.jobs.try_send(job);
        if sent.is_err() {
            self.metrics.waiting.fetch_sub(1, Ordering::Relaxed);
        }
        match sent {
            Ok(()) => Ok(rx),
            Err(TrySendError::Full(_)) => Err(ServerError::Unavailable(
                "the server is at capacity; retry shortly".into(),
            )),
            Err(TrySendError::Disconnected(_)) => {
                Err(ServerError::Unavailable("the engine has stopped".into()))
            }
        }
    }
}

/// Runs one job on the engine thread, streaming text to its channel, and
/// returns the job's last event.
fn run_job(
    lm: &LoadedModel,
    prefix_cache: &mut PrefixCache,
    job: Job,
    metrics: &Metrics,
) -> WorkerEvent {
    let events = &job.events;
    let request = match job.kind {
        JobKind::Generate(r) => r,
        JobKind::Score { tokens, top } => {
            let result = score(lm, &tokens, top);
            metrics.finished(match result {
                Ok(_) => FinishedReason::Length,
                Err(_) => FinishedReason::Error,
            });
            if result.is_ok() {
                let n = tokens.len() as u64;
                metrics.prompt_tokens.fetch_add(n, Ordering::Relaxed);
                metrics.request_prompt_tokens.observe(n as f64);
                metrics
                    .e2e_request_latency
                    .observe_duration(job.arrived.elapsed());
            }
            return match result {
                Ok(s) => WorkerEvent::Scored(s),
                Err(e) => WorkerEvent::Failed(e.into()),
            };
        }
        #[cfg(test)]
        JobKind::Panic => {
            #[allow(clippy::panic)]
            {
                panic!("a fault injected by a test");
            }
        }
    };
    let context = lm.model.config.context_length;
    metrics.kv_positions_capacity.store(
        context.min(request.prompt.len() + request.max_tokens),
        Ordering::Relaxed,
    );
    let mut pending: Vec<Sampled> = Vec::new();
    let mut last_token: Option<Instant> = None;
    let mut positions = 0;
    let result = generate_cached(lm, &request, prefix_cache, &mut |p: Progress<'_>| {
        let text = match p {
            Progress::Prefilled { done, .. } => {
                positions = done;
                metrics
                    .kv_positions_used
                    .store(positions, Ordering::Relaxed);
                return if events.is_closed() {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                };
            }
            Progress::Token { sampled, text } => {
                let now = Instant::now();
                match last_token {
                    None => metrics
                        .time_to_first_token
                        .observe_duration(now - job.arrived),
                    Some(t) => metrics.inter_token_latency.observe_duration(now - t),
                }
                last_token = Some(now);
                positions += 1;
                metrics
                    .kv_positions_used
                    .store(positions, Ordering::Relaxed);
                pending.push(sampled.clone());
                text
            }
            // The rest of the text and steps go out with `Done`.
            Progress::Finished { .. } => return ControlFlow::Continue(()),
        };
        if text.is_empty() {
            return if events.is_closed() {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            };
        }
        let event = WorkerEvent::Text {
            text: text.to_owned(),
            steps: std::mem::take(&mut pending),
        };
        match events.blocking_send(event) {
            Ok(()) => ControlFlow::Continue(()),
            Err(_) => ControlFlow::Break(()),
        }
    });
    metrics
        .e2e_request_latency
        .observe_duration(job.arrived.elapsed());
    match &result {
        Ok(g) => {
            let prompt = request.prompt.len() as u64;
            metrics.prompt_tokens.fetch_add(prompt, Ordering::Relaxed);
            metrics.request_prompt_tokens.observe(prompt as f64);
            metrics
                .prefix_cache_hit_tokens
                .fetch_add(g.cached_prompt_tokens as u64, Ordering::Relaxed);
            let generated = g.tokens.len() as u64;
            metrics
                .generation_tokens
                .fetch_add(generated, Ordering::Relaxed);
            metrics.request_generation_tokens.observe(generated as f64);
            metrics.finished(match g.finish_reason {
                FinishReason::Stop => FinishedReason::Stop,
                FinishReason::Length => FinishedReason::Length,
                FinishReason::Cancelled => FinishedReason::Abort,
            });
        }
        Err(_) => metrics.finished(FinishedReason::Error),
    }
    match result {
        Ok(g) => WorkerEvent::Done(Box::new(g)),
        Err(e) => WorkerEvent::Failed(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use neocloud_engine::model_source::ModelStore;

    fn start_gemma(queue: usize) -> (EngineHandle, Arc<Metrics>) {
        let path = ModelStore::from_env()
            .pull("gemma-3-270m", &mut |p| eprintln!("{p}"))
            .unwrap();
        let metrics = Arc::new(Metrics::default());
        let served = vec![ServedModel {
            name: "gemma-3-270m".into(),
            path,
        }];
        let engine = EngineHandle::start(served, queue, Arc::clone(&metrics)).unwrap();
        (engine, metrics)
    }

    async fn finish(mut events: mpsc::Receiver<WorkerEvent>) -> Result<Generation, ServerError> {
        while let Some(ev) = events.recv().await {
            match ev {
                WorkerEvent::Done(g) => return Ok(*g),
                WorkerEvent::Failed(e) => return Err(e),
                WorkerEvent::Text { .. } | WorkerEvent::Scored(_) => {}
            }
        }
        panic!("the job ended without a result");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panic_fails_its_job_alone_and_the_engine_goes_on() {
        let (engine, metrics) = start_gemma(4);
        let failed = finish(engine.submit_job(0, JobKind::Panic).unwrap()).await;
        let err = failed.unwrap_err();
        assert_eq!(err.to_api_error().status(), 500);
        assert_eq!(err.to_api_error().message, "internal server error");
        let prompt =
            engine.models().unwrap()[0]
                .tokenizer
                .encode("The meaning of life is", true, true);
        let g = finish(
            engine
                .submit(0, GenerateRequest::greedy(prompt, 4))
                .unwrap(),
        )
        .await
        .unwrap();
        assert_eq!(g.tokens.len(), 4);
        assert_eq!(metrics.finished_count(FinishedReason::Error), 1);
        assert_eq!(metrics.finished_count(FinishedReason::Length), 1);
        assert_eq!(metrics.running.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_job_abandoned_in_the_queue_never_starts() {
        let (engine, metrics) = start_gemma(4);
        // Wait for the load, so both jobs are queued behind a running one.
        while engine.models().is_err() {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let prompt =
            engine.models().unwrap()[0]
                .tokenizer
                .encode("The meaning of life is", true, true);
        let first = engine
            .submit(0, GenerateRequest::greedy(prompt.clone(), 24))
            .unwrap();
        let long_prompt: Vec<u32> = prompt.iter().copied().cycle().take(300).collect();
        let abandoned = engine
            .submit(0, GenerateRequest::greedy(long_prompt, 24))
            .unwrap();
        drop(abandoned);
        let g = finish(first).await.unwrap();
        assert_eq!(g.tokens.len(), 24);
        // The abandoned job is skipped once the first is done.
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        while metrics.finished_count(FinishedReason::Abort) == 0 && Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(metrics.finished_count(FinishedReason::Abort), 1);
        assert_eq!(
            metrics.prompt_tokens.load(Ordering::Relaxed),
            prompt.len() as u64,
            "the abandoned prompt was never prefilled"
        );
        assert_eq!(metrics.queue_time.count(), 1);
    }
}
