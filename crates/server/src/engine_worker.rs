//! The engine's own thread: it loads the served models, then runs queued
//! generation jobs one at a time, sending text to each job's channel. A job
//! whose receiver is gone (the client left) is cancelled at its next token.
//! The queue is bounded: when it is full, new requests are refused at once.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, OnceLock};

use neocloud_engine::generation::{
    generate, score, FinishReason, GenerateRequest, Generation, LoadedModel, ScoredToken,
};
use neocloud_engine::EngineError;
use tokio::sync::mpsc;

use crate::error::ServerError;

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
    /// Text that is final (UTF-8 complete, clear of stop strings).
    Text(String),
    /// The job ended.
    Done(Box<Generation>),
    /// A scoring job ended.
    Scored(Vec<ScoredToken>),
    /// The job failed.
    Failed(EngineError),
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
}

struct Job {
    model: usize,
    kind: JobKind,
    events: mpsc::Sender<WorkerEvent>,
}

/// Counters and gauges of the engine thread, read by `/metrics`.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Jobs queued and not started.
    pub waiting: AtomicUsize,
    /// Jobs generating now.
    pub running: AtomicUsize,
    /// Prompt tokens processed.
    pub prompt_tokens: AtomicU64,
    /// Tokens generated (cancelled jobs included).
    pub generation_tokens: AtomicU64,
    /// Jobs ended because their client went away.
    pub cancelled: AtomicU64,
}

/// Shared view of the engine thread: its models once loaded, and its queue.
#[derive(Clone)]
pub struct EngineHandle {
    jobs: SyncSender<Job>,
    models: Arc<OnceLock<Vec<Arc<LoadedModel>>>>,
    load_error: Arc<OnceLock<String>>,
    names: Arc<Vec<String>>,
    stats: Arc<EngineStats>,
}

/// Events buffered per job between the engine thread and the HTTP side.
const EVENTS_PER_JOB: usize = 64;

impl EngineHandle {
    /// Starts the engine thread; it loads `models` in the background.
    /// At most `queue_capacity` jobs wait while one runs.
    pub fn start(models: Vec<ServedModel>, queue_capacity: usize) -> Result<Self, ServerError> {
        let (tx, rx) = sync_channel(queue_capacity);
        let handle = EngineHandle {
            jobs: tx,
            models: Arc::new(OnceLock::new()),
            load_error: Arc::new(OnceLock::new()),
            names: Arc::new(models.iter().map(|m| m.name.clone()).collect()),
            stats: Arc::new(EngineStats::default()),
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
        let stats = Arc::clone(&self.stats);
        // Our own sender must go, or the loop below would never end.
        drop(self);
        for job in jobs {
            stats.waiting.fetch_sub(1, Ordering::Relaxed);
            let Some(lm) = models.get(job.model) else {
                continue;
            };
            stats.running.fetch_add(1, Ordering::Relaxed);
            let events = &job.events;
            let request = match job.kind {
                JobKind::Generate(r) => r,
                JobKind::Score { tokens, top } => {
                    let result = score(lm, &tokens, top);
                    if result.is_ok() {
                        stats
                            .prompt_tokens
                            .fetch_add(tokens.len() as u64, Ordering::Relaxed);
                    }
                    stats.running.fetch_sub(1, Ordering::Relaxed);
                    let _ = events.blocking_send(match result {
                        Ok(s) => WorkerEvent::Scored(s),
                        Err(e) => WorkerEvent::Failed(e),
                    });
                    continue;
                }
            };
            let result = generate(lm, &request, &mut |text: &str| match events
                .blocking_send(WorkerEvent::Text(text.to_owned()))
            {
                Ok(()) => ControlFlow::Continue(()),
                Err(_) => ControlFlow::Break(()),
            });
            if let Ok(g) = &result {
                let prompt = request.prompt.len() as u64;
                stats.prompt_tokens.fetch_add(prompt, Ordering::Relaxed);
                let generated = g.tokens.len() as u64;
                stats
                    .generation_tokens
                    .fetch_add(generated, Ordering::Relaxed);
                if g.finish_reason == FinishReason::Cancelled {
                    stats.cancelled.fetch_add(1, Ordering::Relaxed);
                }
            }
            stats.running.fetch_sub(1, Ordering::Relaxed);
            let _ = events.blocking_send(match result {
                Ok(g) => WorkerEvent::Done(Box::new(g)),
                Err(e) => WorkerEvent::Failed(e),
            });
        }
    }

    /// The engine's counters and gauges.
    pub fn stats(&self) -> &EngineStats {
        &self.stats
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
        };
        // Counted before the send: the engine may pick the job up at once.
        self.stats.waiting.fetch_add(1, Ordering::Relaxed);
        let sent = self.jobs.try_send(job);
        if sent.is_err() {
            self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
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
