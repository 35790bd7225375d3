//! The engine's own thread: it loads the served models, then feeds the
//! engine's continuous-batching [`Scheduler`] over the CPU executor. It
//! takes every queued job as it arrives, cancels the sequences whose client
//! went away (a job abandoned while queued never starts), runs a step on a
//! worker of the kernels' thread pool, and turns the step's events into
//! each job's events and the server's metrics. Scoring runs alone between
//! steps. The queue of jobs waiting to start is bounded by slot claims
//! ([`neocloud_engine::scheduler::SlotGauges`]): when it is full, new requests are refused at once.
//! A panic while running fails the jobs of that step alone.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use neocloud_engine::cpu_executor::CpuExecutor;
use neocloud_engine::generation::{FinishReason, GenerateRequest, Generation, LoadedModel};
use neocloud_engine::panel::ActivationPrecision;
use neocloud_engine::sampler::Sampled;
use neocloud_engine::scheduler::{Executor, QueueClaim, Scheduler, SchedulerEvent, SequenceId};
use tokio::sync::mpsc;

use crate::error::ServerError;
use crate::metrics::{FinishedReason, Metrics};

pub use neocloud_engine::scheduler::Priority;

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
    /// The job failed.
    Failed(ServerError),
}

/// What a job asks of the engine.
#[derive(Debug)]
pub enum JobKind {
    /// Generate a continuation.
    Generate(GenerateRequest),
    /// Makes the engine panic at `FaultPoint` while serving the next
    /// generation (tests of panic isolation).
    #[cfg(test)]
    InjectFault(FaultPoint),
}

/// Where a test makes the engine thread panic, outside any pass's own
/// guard.
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultPoint {
    /// While taking the next generation from the queue.
    Take,
    /// Right before admitting waiting generations.
    Admit,
    /// On the kernel pool, before a step's pass.
    Step,
    /// While passing a generated token on to its client.
    Report,
}

struct Job {
    model: usize,
    kind: JobKind,
    priority: Priority,
    events: mpsc::Sender<WorkerEvent>,
    arrived: Instant,
    /// Its place among the waiting; given back when the job is dropped.
    claim: QueueClaim,
}

/// The events of one job, as the HTTP side receives them. The engine never
/// waits on a reader: a job whose reader falls [`JOB_EVENTS_BUFFERED`]
/// events behind (a client that stopped reading its stream) is cancelled,
/// and its memory freed, rather than have its events pile up.
pub type JobEvents = mpsc::Receiver<WorkerEvent>;

/// Events of one job the engine keeps for a reader that is behind.
pub const JOB_EVENTS_BUFFERED: usize = 1024;

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
        let executor = CpuExecutor::new(&models, limits.kv_budget_bytes);
        metrics
            .kv_blocks_total
            .store(executor.total_blocks_all(), Ordering::Relaxed);
        let mut worker = Worker {
            models: &models,
            scheduler: Scheduler::new(executor, limits.max_batch),
            limits,
            reports: HashMap::new(),
            next_id: 0,
            metrics,
            #[cfg(test)]
            fault: None,
        };
        worker.run(jobs);
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
        let full = || ServerError::Unavailable("the server is at capacity; retry shortly".into());
        // The engine takes jobs from the channel as they come, to order
        // them itself, so the count of jobs not started yet is the bound.
        // The claim travels with the job and is given back when it drops.
        let Some(claim) = self.metrics.slots.try_queue(self.queue_capacity) else {
            return Err(full());
        };
        let (tx, rx) = mpsc::channel(JOB_EVENTS_BUFFERED);
        let job = Job {
            model,
            kind,
            priority,
            events: tx,
            arrived: Instant::now(),
            claim,
        };
        match self.jobs.try_send(job) {
            Ok(()) => Ok(rx),
            Err(TrySendError::Full(_)) => Err(full()),
            Err(TrySendError::Disconnected(_)) => {
                Err(ServerError::Unavailable("the engine has stopped".into()))
            }
        }
    }
}

/// The engine thread between steps: the scheduler, and what each of its
/// sequences reports to.
struct Worker<'m> {
    models: &'m [Arc<LoadedModel>],
    scheduler: Scheduler<CpuExecutor<'m>>,
    limits: BatchLimits,
    reports: HashMap<SequenceId, JobReport>,
    next_id: u64,
    metrics: Arc<Metrics>,
    /// Where the engine is to panic next (tests only).
    #[cfg(test)]
    fault: Option<FaultPoint>,
}

impl Worker<'_> {
    /// Runs turns until the job channel closes. A panic that escapes a
    /// turn (passes and sampling have their own guard; this is anything
    /// else: taking a job, admission, reporting) fails the requests the
    /// engine holds and starts the scheduler afresh, so that the engine
    /// never dies while `/health` says it lives.
    fn run(&mut self, jobs: Receiver<Job>) {
        loop {
            let turn = std::panic::catch_unwind(AssertUnwindSafe(|| self.turn(&jobs)));
            match turn {
                Ok(true) => {}
                Ok(false) => return,
                Err(_) => self.restart(),
            }
        }
    }

    /// Fails every request the engine holds and starts with an empty
    /// scheduler and fresh key/value pools.
    fn restart(&mut self) {
        tracing::error!(
            requests = self.reports.len(),
            "the engine failed outside a request's pass; its requests failed and it starts afresh"
        );
        self.metrics.engine_restarts.fetch_add(1, Ordering::Relaxed);
        for (_, report) in self.reports.drain() {
            self.metrics.finished(FinishedReason::Error);
            let _ = report
                .events
                .try_send(WorkerEvent::Failed(ServerError::Internal(
                    "the engine failed while serving this request, and has restarted".into(),
                )));
        }
        // Dropping the old scheduler gives back every claim it held.
        let executor = CpuExecutor::new(self.models, self.limits.kv_budget_bytes);
        self.scheduler = Scheduler::new(executor, self.limits.max_batch);
        self.metrics.kv_blocks_used.store(0, Ordering::Relaxed);
    }

    /// Panics when a test asked for a fault at `point`.
    #[cfg(test)]
    fn fault_at(&mut self, point: FaultPoint) {
        if self.fault == Some(point) {
            self.fault = None;
            #[allow(clippy::panic)]
            {
                panic!("a fault injected by a test at {point:?}");
            }
        }
    }

    /// One turn: take what has arrived, admit, run one step. `false` once
    /// the job channel has closed.
    fn turn(&mut self, jobs: &Receiver<Job>) -> bool {
        {
            // Wait for work when there is none; otherwise take all that
            // has arrived, to put it in scheduling order (the handle bounds
            // how many jobs wait).
            if !self.scheduler.has_work() {
                match jobs.recv() {
                    Ok(job) => self.take(job),
                    Err(_) => return false,
                }
            }
            while let Ok(job) = jobs.try_recv() {
                self.take(job);
            }
            for (&id, report) in &self.reports {
                if report.events.is_closed() {
                    self.scheduler.cancel(id);
                }
            }
            // Admission happens here at once; the pass waits for its hop.
            #[cfg(test)]
            if self.scheduler.has_work() {
                self.fault_at(FaultPoint::Admit);
            }
            self.scheduler.admit();
            // Each step runs on a worker of the kernels' pool: the parallel
            // regions of its pass are then forked there, with that worker
            // taking its share, instead of each being sent to the pool from
            // outside and waited for. Its events go out from there too, as
            // soon as the pass ends. Waiting for jobs stays on this thread,
            // so no worker is ever held idle.
            let worker = &mut *self;
            neocloud_engine::kernels::on_kernel_pool(|| worker.step());
        }
        true
    }

    /// One step of the scheduler, and its events passed on.
    fn step(&mut self) {
        #[cfg(test)]
        if self.scheduler.has_work() {
            self.fault_at(FaultPoint::Step);
        }
        let events = self.scheduler.step();
        // Blocks are counted before any client hears that its job ended.
        self.metrics
            .kv_blocks_used
            .store(self.scheduler.executor().blocks_in_use(), Ordering::Relaxed);
        for event in events {
            self.handle(event);
        }
    }

    /// Takes `job` from the queue: a generation goes to the scheduler.
    fn take(&mut self, job: Job) {
        if job.events.is_closed() {
            // The client left while the job waited: it never starts.
            self.metrics.finished(FinishedReason::Abort);
            return;
        }
        if job.model >= self.models.len() {
            return;
        }
        // Outside tests a job is always a generation.
        #[allow(clippy::infallible_destructuring_match)]
        let request = match job.kind {
            JobKind::Generate(request) => request,
            #[cfg(test)]
            JobKind::InjectFault(point) => {
                self.fault = Some(point);
                return;
            }
        };
        #[cfg(test)]
        self.fault_at(FaultPoint::Take);
        let metrics = &self.metrics;
        let prompt_tokens = request.prompt.len();
        self.next_id += 1;
        let id = SequenceId(self.next_id);
        match self
            .scheduler
            .submit(id, job.model, job.priority, request, job.claim)
        {
            Ok(()) => {
                self.reports.insert(
                    id,
                    JobReport {
                        events: job.events,
                        arrived: job.arrived,
                        pending: Vec::new(),
                        last_token: None,
                        prompt_tokens,
                    },
                );
            }
            Err(e) => {
                metrics.finished(FinishedReason::Error);
                let _ = job.events.try_send(WorkerEvent::Failed(e.into()));
            }
        }
    }

    /// Passes one scheduler event on to its job and the metrics.
    fn handle(&mut self, event: SchedulerEvent) {
        let metrics = &self.metrics;
        match event {
            SchedulerEvent::Started { id } => {
                if let Some(report) = self.reports.get(&id) {
                    metrics
                        .queue_time
                        .observe_duration(report.arrived.elapsed());
                }
            }
            SchedulerEvent::Token { id, sampled, text } => {
                #[cfg(test)]
                self.fault_at(FaultPoint::Report);
                let metrics = &self.metrics;
                let gone = self
                    .reports
                    .get_mut(&id)
                    .is_some_and(|report| report.token(sampled, text, metrics).is_err());
                if gone {
                    self.scheduler.cancel(id);
                }
            }
            SchedulerEvent::Preempted { .. } => {
                metrics.preemptions.fetch_add(1, Ordering::Relaxed);
            }
            SchedulerEvent::Finished {
                id,
                started,
                generation,
            } => {
                if let Some(report) = self.reports.remove(&id) {
                    report.finished(started, generation, metrics);
                }
            }
            SchedulerEvent::Failed { id, error } => {
                metrics.finished(FinishedReason::Error);
                if let Some(report) = self.reports.remove(&id) {
                    let _ = report.events.try_send(WorkerEvent::Failed(error.into()));
                }
            }
        }
    }
}

/// What a generation reports to its client and to the metrics.
struct JobReport {
    events: mpsc::Sender<WorkerEvent>,
    arrived: Instant,
    /// Tokens generated since the last text event.
    pending: Vec<Sampled>,
    last_token: Option<Instant>,
    prompt_tokens: usize,
}

impl JobReport {
    /// Handles one generated token; an error means the client is gone.
    fn token(&mut self, sampled: Sampled, text: String, metrics: &Metrics) -> Result<(), ()> {
        let now = Instant::now();
        match self.last_token {
            None => metrics
                .time_to_first_token
                .observe_duration(now - self.arrived),
            Some(t) => metrics.inter_token_latency.observe_duration(now - t),
        }
        self.last_token = Some(now);
        self.pending.push(sampled);
        if text.is_empty() {
            return if self.events.is_closed() {
                Err(())
            } else {
                Ok(())
            };
        }
        let event = WorkerEvent::Text {
            text,
            steps: std::mem::take(&mut self.pending),
        };
        match self.events.try_send(event) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(
                    behind = JOB_EVENTS_BUFFERED,
                    "a client stopped reading its stream; its request is cancelled"
                );
                Err(())
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(()),
        }
    }

    /// The job ended (its slot is already given back): metrics, then the
    /// result goes out.
    fn finished(self, started: bool, generation: Box<Generation>, metrics: &Metrics) {
        metrics
            .e2e_request_latency
            .observe_duration(self.arrived.elapsed());
        // A job that never started read none of its prompt.
        if started {
            let prompt = self.prompt_tokens as u64;
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
        let _ = self.events.try_send(WorkerEvent::Done(generation));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use neocloud_engine::generation::Progress;
    use neocloud_models::ModelStore;
    use std::ops::ControlFlow;

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
        assert_eq!(metrics.slots.running(), 0);
        assert_eq!(metrics.slots.waiting(), 0);
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
        assert_eq!(metrics.slots.running(), 0);
        assert_eq!(metrics.kv_blocks_used.load(Ordering::Relaxed), 0);
    }

    /// Returns once a job has started running (or generated a token).
    async fn until_a_job_runs(metrics: &Metrics) {
        while metrics.generation_tokens.load(Ordering::Relaxed) == 0 && metrics.slots.running() == 0
        {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    async fn finish(mut events: JobEvents) -> Result<Generation, ServerError> {
        while let Some(ev) = events.recv().await {
            match ev {
                WorkerEvent::Done(g) => return Ok(*g),
                WorkerEvent::Failed(e) => return Err(e),
                WorkerEvent::Text { .. } => {}
            }
        }
        panic!("the job ended without a result");
    }

    /// A panic in the engine thread outside a pass's own guard (taking a
    /// job, admission, a step, reporting a token) once ended the engine
    /// for good while `/health` stayed 200. Now the requests it held fail,
    /// the engine starts afresh with every slot and block given back, and
    /// the next request is served.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panic_at_any_point_fails_the_requests_held_and_the_engine_goes_on() {
        let (engine, metrics) = start_gemma(8);
        while engine.models().is_err() {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let prompt =
            engine.models().unwrap()[0]
                .tokenizer
                .encode("The meaning of life is", true, true);
        let points = [
            FaultPoint::Take,
            FaultPoint::Admit,
            FaultPoint::Step,
            FaultPoint::Report,
        ];
        for (k, point) in points.into_iter().enumerate() {
            let mut injected = engine.submit_job(0, JobKind::InjectFault(point)).unwrap();
            assert!(injected.recv().await.is_none());
            let mut hit = engine
                .submit(0, GenerateRequest::greedy(prompt.clone(), 4))
                .unwrap();
            let mut outcome = None;
            while let Some(ev) = hit.recv().await {
                match ev {
                    WorkerEvent::Done(g) => outcome = Some(Ok(g)),
                    WorkerEvent::Failed(e) => outcome = Some(Err(e)),
                    WorkerEvent::Text { .. } => {}
                }
            }
            // Failed with a 500, or (a job lost while being taken) its
            // channel closed, which the routes answer with a 503.
            if let Some(outcome) = outcome {
                let err = outcome.expect_err("the request hit by the fault succeeded");
                assert_eq!(err.to_api_error().status(), 500, "{point:?}");
            }
            let g = finish(
                engine
                    .submit(0, GenerateRequest::greedy(prompt.clone(), 4))
                    .unwrap(),
            )
            .await
            .unwrap_or_else(|e| panic!("after a fault at {point:?}: {e}"));
            assert_eq!(g.tokens.len(), 4);
            assert_eq!(
                metrics.engine_restarts.load(Ordering::Relaxed),
                k as u64 + 1,
                "{point:?}"
            );
            assert_eq!(metrics.slots.running(), 0, "{point:?}");
            assert_eq!(metrics.slots.waiting(), 0, "{point:?}");
            assert_eq!(metrics.kv_blocks_used.load(Ordering::Relaxed), 0);
        }
    }

    /// Scoring a prompt (`echo` with `logprobs`) once ran whole inside
    /// the engine's intake, with a key/value pool of its own: every running
    /// stream stopped until it was done, and a client that left could not
    /// cancel it. It is now a prefill like any other: in chunks within the
    /// per-step budget, from the model's pool, cancelled when its client
    /// leaves.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn scoring_a_long_prompt_runs_in_steps_beside_running_streams() {
        let (engine, metrics) = start_gemma_batched(8, 4);
        while engine.models().is_err() {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let prompt =
            engine.models().unwrap()[0]
                .tokenizer
                .encode("The meaning of life is", true, true);
        let stream = GenerateRequest {
            ignore_eos: true,
            ..GenerateRequest::greedy(prompt.clone(), 200)
        };
        let mut running = engine.submit(0, stream).unwrap();
        match running.recv().await {
            Some(WorkerEvent::Text { .. }) => {}
            other => panic!("the stream did not start: {other:?}"),
        }
        let long: Vec<u32> = prompt.iter().copied().cycle().take(400).collect();
        let scoring = |tokens: Vec<u32>| GenerateRequest {
            score_prompt: Some(2),
            ..GenerateRequest::greedy(tokens, 0)
        };
        let mut scored = engine.submit(0, scoring(long.clone())).unwrap();
        let mut tokens_meanwhile = 0;
        let generation = loop {
            tokio::select! {
                ev = scored.recv() => match ev {
                    Some(WorkerEvent::Done(g)) => break g,
                    Some(WorkerEvent::Text { .. }) => {}
                    other => panic!("scoring failed: {other:?}"),
                },
                Some(ev) = running.recv() => {
                    if let WorkerEvent::Text { steps, .. } = ev {
                        tokens_meanwhile += steps.len();
                    }
                }
            }
        };
        assert!(generation.tokens.is_empty());
        assert_eq!(generation.prompt_scores.len(), long.len() - 1);
        assert!(generation
            .prompt_scores
            .iter()
            .all(|s| s.logprob <= 0.0 && s.top.len() == 2));
        // 400 positions are 7 passes of 64: the stream went on beside them.
        assert!(
            tokens_meanwhile >= 3,
            "the running stream made {tokens_meanwhile} tokens while the prompt was scored"
        );
        // A scoring request whose client leaves ends; its blocks go back.
        drop(engine.submit(0, scoring(long)).unwrap());
        let rest = finish(running).await.unwrap();
        assert_eq!(rest.tokens.len(), 200);
        while metrics.slots.running() > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(metrics.kv_blocks_used.load(Ordering::Relaxed), 0);
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
        assert_eq!(metrics.slots.running(), 0);
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
        assert_eq!(metrics.slots.running(), 0);
        assert_eq!(metrics.slots.waiting(), 0);
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
