//! The engine's own thread: it loads the served models, then runs the
//! generation jobs with continuous batching. Each step is one forward pass
//! over the sequences of one model: every decoding sequence gives its last
//! token, and prompts waiting to start give chunks, up to a token budget.
//! New jobs join between steps (up to the batch limit) and finished ones
//! leave, so a long generation never holds the others up. A job whose
//! receiver is gone (the client left) is dropped before the next step, and
//! never starts if it was still queued. The queue of jobs waiting for a
//! batch slot is bounded: when it is full, new requests are refused at
//! once. A panic while running fails the jobs of that step alone.
//!
//! Each model's keys and values live in a [`KvPool`] of a fixed budget. A
//! job joins the batch only when its model's pool has the blocks for its
//! prompt; when the running jobs outgrow the pool, the most recently
//! admitted one gives its blocks back and waits, first in line, to compute
//! its positions again (preemption by recompute). Jobs leave the pool the
//! step they end or their client leaves.

use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use neocloud_engine::generation::{
    score, FinishReason, GenerateRequest, Generation, LoadedModel, Progress, ScoredToken,
    SequenceRun, PREFILL_CHUNK,
};
use neocloud_engine::kv_cache::KvPool;
use neocloud_engine::model::ForwardScratch;
use neocloud_engine::panel::ActivationPrecision;
use neocloud_engine::sampler::Sampled;
use neocloud_engine::EngineError;
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
    /// How its matrix products quantise activations.
    pub activation_precision: ActivationPrecision,
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
    priority: Priority,
    events: mpsc::UnboundedSender<WorkerEvent>,
    arrived: Instant,
}

/// A job's place in the scheduling order: lower values are admitted,
/// planned and kept before higher ones, as in vLLM's priority scheduling;
/// requests that give none have 0.
pub type Priority = i32;

/// The events of one job, as the HTTP side receives them. Unbounded, so
/// that a slow reader never holds up the batch; a job's events are bounded
/// by its token limit.
pub type JobEvents = mpsc::UnboundedReceiver<WorkerEvent>;

/// How much the engine runs at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Sequences in one batch at most.
    pub max_batch: usize,
    /// Bytes of keys and values each model's pool holds.
    pub kv_budget_bytes: usize,
}

/// Shared view of the engine thread: its models once loaded, and its queue.
#[derive(Clone)]
pub struct EngineHandle {
    jobs: SyncSender<Job>,
    /// Jobs that may wait to start at once.
    queue_capacity: usize,
    models: Arc<OnceLock<Vec<Arc<LoadedModel>>>>,
    load_error: Arc<OnceLock<String>>,
    names: Arc<Vec<String>>,
    metrics: Arc<Metrics>,
}

impl EngineHandle {
    /// Starts the engine thread; it loads `models` in the background. At
    /// most `max_batch` sequences run together, within `kv_budget_bytes`
    /// of keys and values per model, and at most `queue_capacity` jobs
    /// wait for a place among them.
    pub fn start(
        models: Vec<ServedModel>,
        queue_capacity: usize,
        limits: BatchLimits,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ServerError> {
        let (tx, rx) = sync_channel(queue_capacity);
        let handle = EngineHandle {
            jobs: tx,
            queue_capacity: queue_capacity.max(1),
            models: Arc::new(OnceLock::new()),
            load_error: Arc::new(OnceLock::new()),
            names: Arc::new(models.iter().map(|m| m.name.clone()).collect()),
            metrics,
        };
        let shared = handle.clone();
        std::thread::Builder::new()
            .name("neocloud-engine".into())
            .spawn(move || shared.run(models, limits, rx))
            .map_err(|e| ServerError::Unavailable(format!("cannot start the engine: {e}")))?;
        Ok(handle)
    }

    fn run(self, served: Vec<ServedModel>, limits: BatchLimits, jobs: Receiver<Job>) {
        let mut loaded = Vec::with_capacity(served.len());
        for m in &served {
            match LoadedModel::open(&m.path) {
                Ok(mut lm) => {
                    lm.model.set_activation_precision(m.activation_precision);
                    loaded.push(Arc::new(lm))
                }
                Err(e) => {
                    let _ = self.load_error.set(format!("loading {}: {e}", m.name));
                    return;
                }
            }
        }
        let models = self.models.get_or_init(|| loaded).clone();
        let metrics = Arc::clone(&self.metrics);
        // Our own sender must go, or the loop below would never end.
        drop(self);
        let pools: Vec<KvPool> = models
            .iter()
            .map(|lm| lm.model.kv_pool(limits.kv_budget_bytes))
            .collect();
        metrics.kv_blocks_total.store(
            pools.iter().map(KvPool::total_blocks).sum(),
            Ordering::Relaxed,
        );
        let scheduler = Scheduler {
            models: &models,
            scratch: models.iter().map(|_| ForwardScratch::default()).collect(),
            pools,
            active: Vec::new(),
            waiting: VecDeque::new(),
            max_batch: limits.max_batch.max(1),
            metrics,
            last_model: None,
            arrivals: 0,
        };
        scheduler.run(jobs);
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

    /// Queues a generation of the default priority; refuses at once when
    /// the queue is full.
    pub fn submit(&self, model: usize, request: GenerateRequest) -> Result<JobEvents, ServerError> {
        self.submit_with_priority(model, request, 0)
    }

    /// Queues a generation of `priority`; refuses at once when the queue is
    /// full.
    pub fn submit_with_priority(
        &self,
        model: usize,
        request: GenerateRequest,
        priority: Priority,
    ) -> Result<JobEvents, ServerError> {
        self.queue(model, JobKind::Generate(request), priority)
    }

    /// Queues a job of any kind; refuses at once when the queue is full.
    pub fn submit_job(&self, model: usize, kind: JobKind) -> Result<JobEvents, ServerError> {
        self.queue(model, kind, 0)
    }

    fn queue(
        &self,
        model: usize,
        kind: JobKind,
        priority: Priority,
    ) -> Result<JobEvents, ServerError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let job = Job {
            model,
            kind,
            priority,
            events: tx,
            arrived: Instant::now(),
        };
        let full = || ServerError::Unavailable("the server is at capacity; retry shortly".into());
        // Counted before the send: the engine may pick the job up at once.
        // The engine takes jobs from the channel as they come, to order
        // them itself, so the count of jobs not started yet is the bound.
        if self.metrics.waiting.fetch_add(1, Ordering::Relaxed) >= self.queue_capacity {
            self.metrics.waiting.fetch_sub(1, Ordering::Relaxed);
            return Err(full());
        }
        let sent = self.jobs.try_send(job);
        if sent.is_err() {
            self.metrics.waiting.fetch_sub(1, Ordering::Relaxed);
        }
        match sent {
            Ok(()) => Ok(rx),
            Err(TrySendError::Full(_)) => Err(full()),
            Err(TrySendError::Disconnected(_)) => {
                Err(ServerError::Unavailable("the engine has stopped".into()))
            }
        }
    }
}

/// Prompt tokens one step takes from sequences still prefilling, beyond
/// the one token of each decoding sequence: bounds how long a step holds up
/// the sequences that are decoding.
const PREFILL_TOKENS_PER_STEP: usize = PREFILL_CHUNK;

/// The engine thread's state between steps.
struct Scheduler<'m> {
    models: &'m [Arc<LoadedModel>],
    /// Each model's forward-pass buffers, kept between steps.
    scratch: Vec<ForwardScratch>,
    /// Each model's keys and values.
    pools: Vec<KvPool>,
    /// The batch, in scheduling order (see [`ActiveJob::order`]).
    active: Vec<ActiveJob<'m>>,
    /// Jobs taken from the queue that wait for blocks or a place in the
    /// batch, in scheduling order: a preempted job goes back before those
    /// of its priority that arrived after it.
    waiting: VecDeque<ActiveJob<'m>>,
    /// Jobs taken from the queue so far: each job's arrival number.
    arrivals: u64,
    max_batch: usize,
    metrics: Arc<Metrics>,
    /// The model of the last step: the next step goes to the next model
    /// with work, so that no model waits for another's jobs to end.
    last_model: Option<usize>,
}

/// A generation, in the batch or waiting for blocks.
struct ActiveJob<'m> {
    model: usize,
    priority: Priority,
    /// When the engine took the job, counted in jobs.
    arrival: u64,
    run: SequenceRun<'m>,
    report: JobReport,
}

impl ActiveJob<'_> {
    /// The scheduling order: by priority, then by arrival.
    fn order(&self) -> (Priority, u64) {
        (self.priority, self.arrival)
    }
}

impl<'m> Scheduler<'m> {
    fn run(mut self, jobs: Receiver<Job>) {
        loop {
            // Wait for work when there is none; otherwise take all that
            // has arrived, to put it in scheduling order (the handle bounds
            // how many jobs wait).
            if self.active.is_empty() && self.waiting.is_empty() {
                match jobs.recv() {
                    Ok(job) => self.take(job),
                    Err(_) => return,
                }
            }
            while let Ok(job) = jobs.try_recv() {
                self.take(job);
            }
            self.admit_waiting();
            // Each step runs on a worker of the kernels' pool: the parallel
            // regions of its pass are then forked there, with that worker
            // taking its share, instead of each being sent to the pool from
            // outside and waited for. Waiting for jobs stays on this thread,
            // so no worker is ever held idle.
            neocloud_engine::kernels::on_kernel_pool(|| self.step());
        }
    }

    /// Takes `job` from the queue: a generation waits for its blocks;
    /// other kinds run at once.
    fn take(&mut self, job: Job) {
        let metrics = &self.metrics;
        if job.events.is_closed() {
            // The client left while the job waited: it never starts.
            metrics.waiting.fetch_sub(1, Ordering::Relaxed);
            metrics.finished(FinishedReason::Abort);
            return;
        }
        let Some(lm) = self.models.get(job.model) else {
            metrics.waiting.fetch_sub(1, Ordering::Relaxed);
            return;
        };
        let request = match job.kind {
            JobKind::Generate(request) => request,
            other => {
                // Scoring (and injected faults) run alone, between steps.
                metrics.waiting.fetch_sub(1, Ordering::Relaxed);
                metrics.queue_time.observe_duration(job.arrived.elapsed());
                metrics.running.fetch_add(1, Ordering::Relaxed);
                let events = job.events.clone();
                let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    run_other(lm, other, job.arrived, metrics)
                }));
                metrics.running.fetch_sub(1, Ordering::Release);
                let _ = events.send(outcome.unwrap_or_else(|_| failed_in_engine(metrics)));
                return;
            }
        };
        let prompt_tokens = request.prompt.len();
        match SequenceRun::start(lm, request) {
            Ok(run) => {
                self.arrivals += 1;
                self.wait(ActiveJob {
                    model: job.model,
                    priority: job.priority,
                    arrival: self.arrivals,
                    run,
                    report: JobReport {
                        events: job.events,
                        arrived: job.arrived,
                        pending: Vec::new(),
                        last_token: None,
                        prompt_tokens,
                        started: false,
                    },
                })
            }
            Err(e) => {
                metrics.waiting.fetch_sub(1, Ordering::Relaxed);
                metrics.finished(FinishedReason::Error);
                let _ = job.events.send(WorkerEvent::Failed(e.into()));
            }
        }
    }

    /// Puts `job` among the waiting ones, in scheduling order.
    fn wait(&mut self, job: ActiveJob<'m>) {
        let at = self.waiting.partition_point(|j| j.order() < job.order());
        self.waiting.insert(at, job);
    }

    /// Moves waiting jobs into the batch, in scheduling order, while it has
    /// room and their models' pools have the blocks for them. A job is
    /// never admitted ahead of one of the same model before it in that
    /// order. A job that finds no room preempts the batch's last job when
    /// that one's priority is lower (see [`Scheduler::preempt_for`]).
    fn admit_waiting(&mut self) {
        let mut blocked = vec![false; self.models.len()];
        let mut i = 0;
        while i < self.waiting.len() {
            let job = &self.waiting[i];
            let model = job.model;
            if job.report.events.is_closed() {
                if let Some(mut job) = self.waiting.remove(i) {
                    job.run.cancel();
                    self.retire(job);
                }
                continue;
            }
            if blocked[model] {
                i += 1;
                continue;
            }
            if self.active.len() >= self.max_batch {
                if self.preempt_for(i, None) {
                    continue;
                }
                break;
            }
            let job = &self.waiting[i];
            let others_running = self.has_active(model);
            let pool = &mut self.pools[model];
            let need = job.run.blocks_to_resume(pool);
            // A little room is kept for the running sequences to grow.
            let reserve = pool.total_blocks() / 100;
            if need > pool.total_blocks() {
                if let Some(job) = self.waiting.remove(i) {
                    self.refuse(job, need);
                }
                continue;
            }
            if need + reserve > pool.available_blocks() && others_running {
                if self.preempt_for(i, Some(model)) {
                    continue;
                }
                blocked[model] = true;
                i += 1;
                continue;
            }
            let Some(mut job) = self.waiting.remove(i) else {
                break;
            };
            let pool = &mut self.pools[model];
            job.run.attach(pool);
            if !job.report.started {
                job.report.started = true;
                self.metrics.waiting.fetch_sub(1, Ordering::Relaxed);
                self.metrics.running.fetch_add(1, Ordering::Relaxed);
                self.metrics
                    .queue_time
                    .observe_duration(job.report.arrived.elapsed());
            }
            let at = self.active.partition_point(|j| j.order() < job.order());
            self.active.insert(at, job);
        }
    }

    /// Makes room for waiting job `i` by preempting the batch's last job
    /// (of `model`, where given: the one whose blocks are short) when its
    /// priority is lower than job `i`'s; the preempted job waits to run
    /// its positions again. Whether it did.
    fn preempt_for(&mut self, i: usize, model: Option<usize>) -> bool {
        let Some(priority) = self.waiting.get(i).map(|j| j.priority) else {
            return false;
        };
        let Some(victim) = self
            .active
            .iter()
            .rposition(|j| model.is_none_or(|m| j.model == m))
        else {
            return false;
        };
        if self.active[victim].priority <= priority {
            return false;
        }
        // It waits behind job `i`, whose priority is higher.
        let job = self.active.remove(victim);
        self.requeue(job);
        true
    }

    /// Gives a job taken out of the batch its blocks back; it waits, in
    /// scheduling order, to run its positions again.
    fn requeue(&mut self, mut job: ActiveJob<'m>) {
        job.run.preempt(&mut self.pools[job.model]);
        self.metrics.preemptions.fetch_add(1, Ordering::Relaxed);
        self.wait(job);
    }

    fn has_active(&self, model: usize) -> bool {
        self.active.iter().any(|j| j.model == model)
    }

    /// Fails a job whose prompt needs more blocks than its model's pool has.
    fn refuse(&self, job: ActiveJob<'m>, need: usize) {
        let total = self.pools[job.model].total_blocks();
        let metrics = &self.metrics;
        if job.report.started {
            metrics.running.fetch_sub(1, Ordering::Release);
        } else {
            metrics.waiting.fetch_sub(1, Ordering::Relaxed);
        }
        metrics.finished(FinishedReason::Error);
        let _ = job
            .report
            .events
            .send(WorkerEvent::Failed(ServerError::Engine(
                EngineError::InvalidRequest(format!(
                    "the prompt needs {need} key/value blocks but the model's pool has {total}; \
                     shorten it or raise the server's KV budget"
                )),
            )));
    }

    /// The jobs of `model` in the batch, in scheduling order, each with the
    /// tokens of its next pass (within the prefill budget, which goes to
    /// the first jobs first).
    fn plan(&self, model: usize) -> Vec<(usize, usize)> {
        let mut budget = PREFILL_TOKENS_PER_STEP;
        let mut plan = Vec::new();
        for (i, job) in self.active.iter().enumerate() {
            if job.model != model {
                continue;
            }
            let prefilling = job.run.prompt_left() > 0;
            if prefilling && budget == 0 {
                continue;
            }
            let len = job.run.next_pass_len(budget);
            if len == 0 {
                continue;
            }
            if prefilling {
                budget -= len;
            }
            plan.push((i, len));
        }
        plan
    }

    /// A plan for the next pass of `model` whose blocks its pool can give:
    /// while they are short, the model's last job in scheduling order (the
    /// lowest priority, the latest to arrive) gives its blocks back and
    /// waits to run its positions again; the last one left ends for length.
    fn fit_plan(&mut self, model: usize) -> Vec<(usize, usize)> {
        loop {
            let plan = self.plan(model);
            let pool = &self.pools[model];
            let need: usize = plan
                .iter()
                .map(|&(i, len)| self.active[i].run.blocks_for_next(pool, len))
                .sum();
            if need <= pool.available_blocks() {
                return plan;
            }
            let Some(victim) = self.active.iter().rposition(|j| j.model == model) else {
                return Vec::new();
            };
            let mut job = self.active.remove(victim);
            if self.has_active(model) {
                self.requeue(job);
            } else if job.run.has_output() {
                let report = &mut job.report;
                let metrics = &self.metrics;
                job.run
                    .end_for_length(&mut |p: Progress<'_>| report.progress(p, metrics));
                self.retire(job);
            } else {
                let need = job.run.blocks_to_resume(&self.pools[model]);
                job.run.preempt(&mut self.pools[model]);
                self.refuse(job, need);
            }
        }
    }

    /// One forward pass over the sequences of one model (the models with
    /// work take turns), then each sequence's sampling and reports.
    fn step(&mut self) {
        for job in &mut self.active {
            if job.report.events.is_closed() {
                job.run.cancel();
            }
        }
        self.retire_finished();
        // The first model after the last one served that has work, wrapping.
        let after = self.last_model.map_or(0, |m| m + 1);
        let Some(model) = self
            .active
            .iter()
            .map(|j| j.model)
            .min_by_key(|&m| (m < after, m))
        else {
            return;
        };
        self.last_model = Some(model);
        let plan = self.fit_plan(model);
        if plan.is_empty() {
            self.retire_finished();
            return;
        }
        let lm = &self.models[model];
        let pool = &mut self.pools[model];
        let scratch = &mut self.scratch[model];
        let mut passes = Vec::with_capacity(plan.len());
        let mut members = Vec::with_capacity(plan.len());
        let mut want = plan.iter().peekable();
        for (i, job) in self.active.iter_mut().enumerate() {
            let Some(&&(j, len)) = want.peek() else {
                break;
            };
            if i != j {
                continue;
            }
            want.next();
            if let Some(pass) = job.run.next_pass(len) {
                members.push(i);
                passes.push(pass);
            }
        }
        let metrics = Arc::clone(&self.metrics);
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(move || {
            // Taking the passes makes this closure run once, so that the
            // logits may borrow the scratch buffers.
            let mut passes = passes;
            lm.model.forward_batch_with(pool, &mut passes, scratch)
        }));
        let vocab = lm.model.config.vocab_size;
        match outcome {
            Ok(Ok(logits)) => {
                for (&i, row) in members.iter().zip(logits.chunks_exact_mut(vocab)) {
                    let job = &mut self.active[i];
                    let report = &mut job.report;
                    job.run
                        .advance(row, &mut |p: Progress<'_>| report.progress(p, &metrics));
                }
            }
            failed => {
                // Runs are checked when they start and blocks before the
                // pass, so a failed pass is a fault of ours: the step's
                // sequences fail; the others go on.
                if let Ok(Err(e)) = failed {
                    tracing::error!("a batched forward pass failed: {e}");
                }
                for &i in members.iter().rev() {
                    let job = self.active.remove(i);
                    self.settle();
                    let _ = job.run.finish(&mut self.pools[job.model]);
                    let _ = job.report.events.send(failed_in_engine(&metrics));
                }
            }
        }
        self.retire_finished();
    }

    /// Ends the jobs whose runs are over and sends their results.
    fn retire_finished(&mut self) {
        let mut i = 0;
        while i < self.active.len() {
            if !self.active[i].run.is_done() {
                i += 1;
                continue;
            }
            let job = self.active.remove(i);
            self.retire(job);
        }
        self.count_blocks();
    }

    /// Updates the gauge of blocks in use.
    fn count_blocks(&self) {
        let used: usize = self.pools.iter().map(KvPool::blocks_in_use).sum();
        self.metrics.kv_blocks_used.store(used, Ordering::Relaxed);
    }

    /// Ends a job whose run is over: its blocks go back and its result out.
    fn retire(&mut self, job: ActiveJob<'m>) {
        let metrics = &self.metrics;
        if job.report.started {
            self.settle();
        } else {
            metrics.waiting.fetch_sub(1, Ordering::Relaxed);
        }
        let generation = job.run.finish(&mut self.pools[job.model]);
        self.count_blocks();
        let report = job.report;
        metrics
            .e2e_request_latency
            .observe_duration(report.arrived.elapsed());
        // A job that never started read none of its prompt.
        if report.started {
            let prompt = report.prompt_tokens as u64;
            metrics.prompt_tokens.fetch_add(prompt, Ordering::Relaxed);
            metrics.request_prompt_tokens.observe(prompt as f64);
        }
        metrics
            .prefix_cache_hit_tokens
            .fetch_add(generation.cached_prompt_tokens as u64, Ordering::Relaxed);
        let generated = generation.tokens.len() as u64;
        metrics
            .generation_tokens
            .fetch_add(generated, Ordering::Relaxed);
        metrics.request_generation_tokens.observe(generated as f64);
        metrics.finished(match generation.finish_reason {
            FinishReason::Stop => FinishedReason::Stop,
            FinishReason::Length => FinishedReason::Length,
            FinishReason::Cancelled => FinishedReason::Abort,
        });
        let _ = report.events.send(WorkerEvent::Done(Box::new(generation)));
    }

    /// Gives back the gauge a running job held; before the client hears
    /// the end.
    fn settle(&self) {
        self.metrics.running.fetch_sub(1, Ordering::Release);
    }
}

/// What a running generation reports to its client and to the metrics.
struct JobReport {
    events: mpsc::UnboundedSender<WorkerEvent>,
    arrived: Instant,
    /// Tokens generated since the last text event.
    pending: Vec<Sampled>,
    last_token: Option<Instant>,
    prompt_tokens: usize,
    /// Whether the job joined the batch yet (it counts as running, not
    /// waiting).
    started: bool,
}

impl JobReport {
    /// Handles one progress report of the run; `Break` cancels it.
    fn progress(&mut self, p: Progress<'_>, metrics: &Metrics) -> ControlFlow<()> {
        let text = match p {
            Progress::Prefilled { .. } => "",
            Progress::Token { sampled, text } => {
                let now = Instant::now();
                match self.last_token {
                    None => metrics
                        .time_to_first_token
                        .observe_duration(now - self.arrived),
                    Some(t) => metrics.inter_token_latency.observe_duration(now - t),
                }
                self.last_token = Some(now);
                self.pending.push(sampled.clone());
                text
            }
            // The rest of the text and steps go out with `Done`.
            Progress::Finished { .. } => return ControlFlow::Continue(()),
        };
        if text.is_empty() {
            return if self.events.is_closed() {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            };
        }
        let event = WorkerEvent::Text {
            text: text.to_owned(),
            steps: std::mem::take(&mut self.pending),
        };
        match self.events.send(event) {
            Ok(()) => ControlFlow::Continue(()),
            Err(_) => ControlFlow::Break(()),
        }
    }
}

fn failed_in_engine(metrics: &Metrics) -> WorkerEvent {
    metrics.finished(FinishedReason::Error);
    WorkerEvent::Failed(ServerError::Internal(
        "the engine failed on this request".into(),
    ))
}

/// Runs a job that is not a generation, and returns its last event.
fn run_other(lm: &LoadedModel, kind: JobKind, arrived: Instant, metrics: &Metrics) -> WorkerEvent {
    match kind {
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
                    .observe_duration(arrived.elapsed());
            }
            match result {
                Ok(s) => WorkerEvent::Scored(s),
                Err(e) => WorkerEvent::Failed(e.into()),
            }
        }
        // Generations never come here.
        JobKind::Generate(_) => failed_in_engine(metrics),
        #[cfg(test)]
        JobKind::Panic => {
            #[allow(clippy::panic)]
            {
                panic!("a fault injected by a test");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use neocloud_models::ModelStore;

    fn start_gemma(queue: usize) -> (EngineHandle, Arc<Metrics>) {
        start_gemma_batched(queue, 1)
    }

    fn start_gemma_batched(queue: usize, max_batch: usize) -> (EngineHandle, Arc<Metrics>) {
        start_gemma_with(
            queue,
            BatchLimits {
                max_batch,
                kv_budget_bytes: 256 << 20,
            },
        )
    }

    fn gemma_path() -> std::path::PathBuf {
        ModelStore::from_env()
            .pull("gemma-3-270m", &mut |p| eprintln!("{p}"))
            .unwrap()
    }

    fn start_gemma_with(queue: usize, limits: BatchLimits) -> (EngineHandle, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::default());
        let served = vec![ServedModel {
            name: "gemma-3-270m".into(),
            path: gemma_path(),
            activation_precision: ActivationPrecision::default(),
        }];
        let engine = EngineHandle::start(served, queue, limits, Arc::clone(&metrics)).unwrap();
        (engine, metrics)
    }

    async fn loaded(engine: &EngineHandle) -> Arc<LoadedModel> {
        while engine.models().is_err() {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        Arc::clone(&engine.models().unwrap()[0])
    }

    /// Bytes of `blocks` key/value blocks of Gemma.
    fn gemma_blocks(blocks: usize) -> usize {
        let lm = LoadedModel::open(&gemma_path()).unwrap();
        blocks * lm.model.kv_pool(0).block_bytes()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn jobs_beyond_the_kv_budget_wait_or_are_recomputed_and_answer_as_alone() {
        // 300 blocks: four sequences of 100 positions need 4 x 7 x 18.
        let limits = BatchLimits {
            max_batch: 4,
            kv_budget_bytes: gemma_blocks(300),
        };
        let (engine, metrics) = start_gemma_with(8, limits);
        let lm = loaded(&engine).await;
        let requests: Vec<GenerateRequest> = [
            "Write a poem about rain.",
            "Describe a busy harbour.",
            "List some facts about owls.",
            "Tell a story about a clock.",
        ]
        .iter()
        .map(|p| GenerateRequest {
            ignore_eos: true,
            ..GenerateRequest::greedy(lm.tokenizer.encode(p, true, true), 90)
        })
        .collect();
        let mut ignore = |_: Progress<'_>| ControlFlow::Continue(());
        let alone: Vec<Generation> = requests
            .iter()
            .map(|r| neocloud_engine::generation::generate(&lm, r, &mut ignore).unwrap())
            .collect();
        let jobs: Vec<_> = requests
            .iter()
            .map(|r| tokio::spawn(finish(engine.submit(0, r.clone()).unwrap())))
            .collect();
        for (job, want) in jobs.into_iter().zip(&alone) {
            let got = job.await.unwrap().unwrap();
            assert_eq!(got.tokens, want.tokens);
            assert_eq!(got.text, want.text);
        }
        assert!(metrics.preemptions.load(Ordering::Relaxed) > 0);
        assert_eq!(metrics.finished_count(FinishedReason::Length), 4);
        assert_eq!(metrics.running.load(Ordering::Relaxed), 0);
        assert_eq!(metrics.waiting.load(Ordering::Relaxed), 0);
        assert_eq!(metrics.kv_blocks_used.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_prompt_larger_than_the_kv_budget_is_refused_and_the_engine_goes_on() {
        let limits = BatchLimits {
            max_batch: 4,
            kv_budget_bytes: gemma_blocks(18 * 8),
        };
        let (engine, metrics) = start_gemma_with(8, limits);
        let lm = loaded(&engine).await;
        let long = lm
            .tokenizer
            .encode(&"All work and no play. ".repeat(40), true, true);
        assert!(long.len() > 8 * 16);
        let err = finish(engine.submit(0, GenerateRequest::greedy(long, 4)).unwrap())
            .await
            .unwrap_err();
        let api = err.to_api_error();
        assert_eq!(api.status(), 400);
        assert!(api.message.contains("KV budget"), "{}", api.message);
        // A sequence that outgrows the pool alone ends for length.
        let short = lm.tokenizer.encode("Count to a thousand:", true, true);
        let g = finish(
            engine
                .submit(
                    0,
                    GenerateRequest {
                        ignore_eos: true,
                        ..GenerateRequest::greedy(short.clone(), 400)
                    },
                )
                .unwrap(),
        )
        .await
        .unwrap();
        assert_eq!(g.finish_reason, FinishReason::Length);
        assert!(
            g.tokens.len() < 8 * 16 && g.tokens.len() + short.len() >= 6 * 16,
            "{}",
            g.tokens.len()
        );
        assert_eq!(metrics.finished_count(FinishedReason::Error), 1);
        assert_eq!(metrics.running.load(Ordering::Relaxed), 0);
        assert_eq!(metrics.kv_blocks_used.load(Ordering::Relaxed), 0);
    }

    /// Returns once a job has started running (or generated a token).
    async fn until_a_job_runs(metrics: &Metrics) {
        while metrics.generation_tokens.load(Ordering::Relaxed) == 0
            && metrics.running.load(Ordering::Relaxed) == 0
        {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    async fn finish(mut events: JobEvents) -> Result<Generation, ServerError> {
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_short_job_finishes_while_a_long_one_runs_and_both_answer_as_alone() {
        let (engine, metrics) = start_gemma_batched(8, 4);
        while engine.models().is_err() {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let lm = Arc::clone(&engine.models().unwrap()[0]);
        let long_prompt = lm
            .tokenizer
            .encode("Write a long story about the sea.", true, true);
        let short_prompt = lm.tokenizer.encode("The capital of France is", true, true);
        let mut ignore = |_: Progress<'_>| ControlFlow::Continue(());
        let long_alone = neocloud_engine::generation::generate(
            &lm,
            &GenerateRequest {
                ignore_eos: true,
                ..GenerateRequest::greedy(long_prompt.clone(), 96)
            },
            &mut ignore,
        )
        .unwrap();
        let short_alone = neocloud_engine::generation::generate(
            &lm,
            &GenerateRequest::greedy(short_prompt.clone(), 6),
            &mut ignore,
        )
        .unwrap();

        let long = engine
            .submit(
                0,
                GenerateRequest {
                    ignore_eos: true,
                    ..GenerateRequest::greedy(long_prompt, 96)
                },
            )
            .unwrap();
        let long = tokio::spawn(finish(long));
        // Let the long one start before the short one arrives.
        until_a_job_runs(&metrics).await;
        let short = finish(
            engine
                .submit(0, GenerateRequest::greedy(short_prompt, 6))
                .unwrap(),
        )
        .await
        .unwrap();
        assert!(
            !long.is_finished(),
            "the short job waited for the long one instead of joining its batch"
        );
        let long = long.await.unwrap().unwrap();
        assert_eq!(short.tokens, short_alone.tokens);
        assert_eq!(long.tokens, long_alone.tokens);
        assert_eq!(long.tokens.len(), 96);
        for (a, b) in short.steps.iter().zip(&short_alone.steps) {
            assert!(
                (a.token.logprob - b.token.logprob).abs() < 1e-2,
                "{a:?} {b:?}"
            );
        }
        assert_eq!(metrics.running.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn higher_priority_jobs_start_first_preempting_lower_ones_and_all_answer_as_alone() {
        // One place in the batch: the jobs end in the scheduler's order.
        let (engine, metrics) = start_gemma(8);
        let lm = loaded(&engine).await;
        let request = |text: &str, tokens: usize| GenerateRequest {
            ignore_eos: true,
            ..GenerateRequest::greedy(lm.tokenizer.encode(text, true, true), tokens)
        };
        // In the order they are submitted, the first one running before
        // the others arrive.
        let jobs = [
            (
                "running",
                request("Write a long story about the sea.", 96),
                5,
            ),
            (
                "as running, later",
                request("Describe a busy harbour.", 8),
                5,
            ),
            ("lower", request("List some facts about owls.", 8), 9),
            ("urgent", request("The capital of France is", 8), -1),
        ];
        let mut ignore = |_: Progress<'_>| ControlFlow::Continue(());
        let alone: Vec<Generation> = jobs
            .iter()
            .map(|(_, r, _)| neocloud_engine::generation::generate(&lm, r, &mut ignore).unwrap())
            .collect();
        let ended = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut answers = Vec::new();
        for (i, (name, r, priority)) in jobs.iter().enumerate() {
            let events = engine
                .submit_with_priority(0, r.clone(), *priority)
                .unwrap();
            let (ended, name) = (Arc::clone(&ended), *name);
            answers.push(tokio::spawn(async move {
                let g = finish(events).await;
                ended.lock().unwrap().push(name);
                g
            }));
            if i == 0 {
                until_a_job_runs(&metrics).await;
            }
        }
        for (answer, want) in answers.into_iter().zip(&alone) {
            let got = answer.await.unwrap().unwrap();
            assert_eq!(got.tokens, want.tokens);
        }
        assert_eq!(
            *ended.lock().unwrap(),
            ["urgent", "running", "as running, later", "lower"]
        );
        assert_eq!(metrics.preemptions.load(Ordering::Relaxed), 1);
        assert_eq!(metrics.running.load(Ordering::Relaxed), 0);
        assert_eq!(metrics.waiting.load(Ordering::Relaxed), 0);
        assert_eq!(metrics.kv_blocks_used.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_second_model_is_served_while_the_first_one_is_busy() {
        let store = ModelStore::from_env();
        let served: Vec<ServedModel> = ["gemma-3-270m", "qwen2.5-coder-0.5b-instruct"]
            .iter()
            .map(|name| ServedModel {
                name: (*name).into(),
                path: store.pull(name, &mut |p| eprintln!("{p}")).unwrap(),
                activation_precision: ActivationPrecision::default(),
            })
            .collect();
        let metrics = Arc::new(Metrics::default());
        let limits = BatchLimits {
            max_batch: 4,
            kv_budget_bytes: 256 << 20,
        };
        let engine = EngineHandle::start(served, 8, limits, Arc::clone(&metrics)).unwrap();
        while engine.models().is_err() {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let encode = |m: usize, text: &str| {
            engine.models().unwrap()[m]
                .tokenizer
                .encode(text, true, true)
        };
        let long = engine
            .submit(
                0,
                GenerateRequest {
                    ignore_eos: true,
                    ..GenerateRequest::greedy(encode(0, "Write a long story."), 200)
                },
            )
            .unwrap();
        let long = tokio::spawn(finish(long));
        until_a_job_runs(&metrics).await;
        let short = finish(
            engine
                .submit(1, GenerateRequest::greedy(encode(1, "Hello"), 4))
                .unwrap(),
        )
        .await
        .unwrap();
        assert!(!short.tokens.is_empty());
        assert!(
            !long.is_finished(),
            "the second model waited for the first model's job to end"
        );
        assert_eq!(long.await.unwrap().unwrap().tokens.len(), 200);
    }
}
