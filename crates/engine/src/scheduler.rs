//! Continuous batching over any [`Executor`]: which sequences wait, which
//! run, which give their blocks back, and what each step computes. The
//! scheduler is synchronous and knows nothing of threads, channels or
//! HTTP: its owner submits sequences, cancels those whose client left, and
//! calls [`Scheduler::step`], which returns what happened as
//! [`SchedulerEvent`]s.
//!
//! Each step is one forward pass over the sequences of one model (the
//! models with work take turns): every decoding sequence gives its last
//! token, and sequences still reading their prompt give chunks, up to a
//! token budget that goes to the first sequences in scheduling order
//! first. The scheduling order is by priority (lower first, as vLLM), then
//! by arrival. A waiting sequence joins the batch (up to `max_batch`) only
//! once its model's executor has the blocks for it; one that finds no room
//! preempts the batch's last sequence when that one's priority is lower.
//! When the running sequences outgrow the blocks, the model's last sequence
//! in that order gives its blocks back and waits, ahead of later arrivals
//! of its priority, to compute its positions again (preemption by
//! recompute); a lone sequence that outgrows the blocks ends for length,
//! and one whose prompt needs more blocks than there are is refused.
//!
//! Waiting ages a sequence: every [`AGING_STEPS`] steps it has waited in
//! all (before its start, and after each preemption) count as one level of
//! priority better, so that a stream of better requests can delay a
//! sequence but never starve it.
//!
//! Every sequence holds a slot claim ([`QueueClaim`], then
//! [`RunningClaim`]) that counts it in the [`SlotGauges`] until it is
//! dropped, so no path can forget to give a slot back.

use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::error::EngineError;
use crate::generation::{Generation, Progress, PREFILL_CHUNK};
use crate::sampler::Sampled;

/// A sequence's place in the scheduling order: lower values are admitted,
/// planned and kept before higher ones; requests that give none have 0.
pub type Priority = i32;

/// Names a sequence for its owner; the owner chooses the ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SequenceId(pub u64);

/// Prompt tokens one step takes from sequences still prefilling, beyond
/// the one token of each decoding sequence: bounds how long a step holds
/// up the sequences that are decoding.
pub const PREFILL_TOKENS_PER_STEP: usize = PREFILL_CHUNK;

/// How many sequences wait and how many run, for metrics and for the
/// queue's bound. Only claims change them.
#[derive(Debug, Default)]
pub struct SlotGauges {
    waiting: AtomicUsize,
    running: AtomicUsize,
}

impl SlotGauges {
    /// Gauges at zero.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Sequences waiting to start (queued, or taken but not yet admitted).
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    /// Sequences running (admitted at least once and not yet ended).
    pub fn running(&self) -> usize {
        self.running.load(Ordering::Acquire)
    }

    /// A place among the waiting, unless `capacity` are waiting already.
    pub fn try_queue(self: &Arc<Self>, capacity: usize) -> Option<QueueClaim> {
        let mut now = self.waiting.load(Ordering::Acquire);
        loop {
            if now >= capacity {
                return None;
            }
            match self.waiting.compare_exchange_weak(
                now,
                now + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    return Some(QueueClaim {
                        gauges: Arc::clone(self),
                    })
                }
                Err(seen) => now = seen,
            }
        }
    }
}

/// A waiting sequence's slot; given back when dropped.
#[derive(Debug)]
pub struct QueueClaim {
    gauges: Arc<SlotGauges>,
}

impl QueueClaim {
    /// The sequence starts running: its waiting slot becomes a running one.
    pub fn start(self) -> RunningClaim {
        let gauges = Arc::clone(&self.gauges);
        gauges.running.fetch_add(1, Ordering::AcqRel);
        drop(self);
        RunningClaim { gauges }
    }
}

impl Drop for QueueClaim {
    fn drop(&mut self) {
        self.gauges.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A running sequence's slot; given back when dropped.
#[derive(Debug)]
pub struct RunningClaim {
    gauges: Arc<SlotGauges>,
}

impl Drop for RunningClaim {
    fn drop(&mut self) {
        self.gauges.running.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A compute backend the scheduler drives: it holds the models, their
/// key/value blocks and their sequences' state, and runs forward passes.
/// The CPU engine is one ([`crate::cpu_executor::CpuExecutor`]); a GPU or
/// NPU runtime would be another.
pub trait Executor {
    /// What a sequence asks for (prompt, sampling, limits).
    type Request;
    /// One sequence's state as this executor keeps it.
    type Sequence;

    /// Number of models served.
    fn models(&self) -> usize;
    /// Checks `request` for `model` and prepares its sequence, holding no
    /// blocks yet.
    fn start(
        &mut self,
        model: usize,
        request: Self::Request,
    ) -> Result<Self::Sequence, EngineError>;
    /// Blocks of `model` in all.
    fn total_blocks(&self, model: usize) -> usize;
    /// Blocks of `model` free now.
    fn available_blocks(&self, model: usize) -> usize;
    /// Blocks in use, all models together.
    fn blocks_in_use(&self) -> usize;
    /// Blocks `sequence` needs to (re)start, beyond what caches give.
    fn blocks_to_resume(&self, model: usize, sequence: &Self::Sequence) -> usize;
    /// Blocks `sequence`'s next pass of `len` tokens needs.
    fn blocks_for_next(&self, model: usize, sequence: &Self::Sequence, len: usize) -> usize;
    /// Gives `sequence` its blocks (and any cached prefix) before it runs.
    fn attach(&mut self, model: usize, sequence: &mut Self::Sequence);
    /// Takes `sequence`'s blocks back; it recomputes its positions later.
    fn preempt(&mut self, model: usize, sequence: &mut Self::Sequence);
    /// Tokens still to go through the model before the next sample.
    fn prompt_left(&self, sequence: &Self::Sequence) -> usize;
    /// Tokens the next pass of `sequence` takes within `budget` prompt
    /// tokens (0 when it is over).
    fn next_pass_len(&self, sequence: &Self::Sequence, budget: usize) -> usize;
    /// Whether `sequence` has generated a token.
    fn has_output(&self, sequence: &Self::Sequence) -> bool;
    /// Whether `sequence` is over.
    fn is_done(&self, sequence: &Self::Sequence) -> bool;
    /// Ends `sequence` because its client left.
    fn cancel(&mut self, sequence: &mut Self::Sequence);
    /// Ends `sequence` for length (the blocks cannot hold it any longer).
    fn end_for_length(
        &mut self,
        sequence: &mut Self::Sequence,
        report: &mut dyn FnMut(Progress<'_>) -> ControlFlow<()>,
    );
    /// One forward pass of `model` over `batch` (each sequence with the
    /// tokens it takes), then each sequence's sampling, reported with the
    /// sequence's index in `batch`. An error fails every sequence of the
    /// pass (and no other).
    fn run_pass(
        &mut self,
        model: usize,
        batch: &mut [(&mut Self::Sequence, usize)],
        report: &mut dyn FnMut(usize, Progress<'_>) -> ControlFlow<()>,
    ) -> Result<(), EngineError>;
    /// Ends `sequence`: its blocks go back; its result.
    fn finish(&mut self, model: usize, sequence: Self::Sequence) -> Generation;
}

/// What a step did to one sequence.
#[derive(Debug)]
pub enum SchedulerEvent {
    /// The sequence joined the batch for the first time.
    Started {
        /// The sequence.
        id: SequenceId,
    },
    /// A token was generated; `text` is what became final with it.
    Token {
        /// The sequence.
        id: SequenceId,
        /// The token and its log-probabilities.
        sampled: Sampled,
        /// Text that became final (often empty).
        text: String,
    },
    /// The sequence gave its blocks back and waits to recompute them.
    Preempted {
        /// The sequence.
        id: SequenceId,
    },
    /// The sequence ended; its slot is already given back.
    Finished {
        /// The sequence.
        id: SequenceId,
        /// Whether it ever ran (a sequence cancelled while waiting did not).
        started: bool,
        /// Its result.
        generation: Box<Generation>,
    },
    /// The sequence failed: refused (a prompt larger than the blocks) or
    /// caught in a failed pass. Its slot is already given back.
    Failed {
        /// The sequence.
        id: SequenceId,
        /// Why.
        error: EngineError,
    },
}

/// Where a sequence's slot stands; the claims are held for their `Drop`.
#[derive(Debug)]
enum Slot {
    Waiting(QueueClaim),
    Running(#[expect(dead_code, reason = "held for its Drop")] RunningClaim),
}

/// Steps of waiting that make a sequence's priority one level better.
pub const AGING_STEPS: u64 = 512;

/// A sequence, in the batch or waiting for blocks.
struct Entry<S> {
    id: SequenceId,
    model: usize,
    priority: Priority,
    /// When the scheduler took it, counted in sequences.
    arrival: u64,
    /// Steps it waited before it last joined the batch.
    waited: u64,
    /// The step it started waiting at, while it waits.
    waiting_since: Option<u64>,
    sequence: S,
    slot: Slot,
    /// The owner asked for it to end.
    cancelled: bool,
}

impl<S> Entry<S> {
    /// Its priority at step `now`: one level better for every `aging`
    /// steps it has waited in all.
    fn priority_at(&self, now: u64, aging: u64) -> Priority {
        let waited = self.waited + self.waiting_since.map_or(0, |s| now.saturating_sub(s));
        let boost = (waited / aging.max(1)).min(Priority::MAX as u64) as Priority;
        self.priority.saturating_sub(boost)
    }

    /// The scheduling order at step `now`: by aged priority, then by
    /// arrival.
    fn order(&self, now: u64, aging: u64) -> (Priority, u64) {
        (self.priority_at(now, aging), self.arrival)
    }

    fn started(&self) -> bool {
        matches!(self.slot, Slot::Running(_))
    }
}

/// Continuous batching over one executor.
pub struct Scheduler<E: Executor> {
    executor: E,
    /// The batch, in scheduling order.
    active: Vec<Entry<E::Sequence>>,
    /// Sequences that wait for blocks or a place in the batch, in
    /// scheduling order: a preempted one goes back before those of its
    /// priority that arrived after it.
    waiting: VecDeque<Entry<E::Sequence>>,
    arrivals: u64,
    max_batch: usize,
    /// The model of the last step: the next step goes to the next model
    /// with work, so that no model waits for another's sequences to end.
    last_model: Option<usize>,
    preemptions: u64,
    events: Vec<SchedulerEvent>,
    /// Steps run so far: the clock of aging.
    steps: u64,
    /// Steps of waiting per level of priority gained.
    aging_steps: u64,
}

impl<E: Executor> Scheduler<E> {
    /// A scheduler running at most `max_batch` sequences together.
    pub fn new(executor: E, max_batch: usize) -> Self {
        Scheduler {
            executor,
            active: Vec::new(),
            waiting: VecDeque::new(),
            arrivals: 0,
            max_batch: max_batch.max(1),
            last_model: None,
            preemptions: 0,
            events: Vec::new(),
            steps: 0,
            aging_steps: AGING_STEPS,
        }
    }

    /// The same scheduler with waiting sequences gaining one level of
    /// priority every `steps` steps (default [`AGING_STEPS`]).
    pub fn with_aging(mut self, steps: u64) -> Self {
        self.aging_steps = steps.max(1);
        self
    }

    /// The executor.
    pub fn executor(&self) -> &E {
        &self.executor
    }

    /// Preemptions so far.
    pub fn preemptions(&self) -> u64 {
        self.preemptions
    }

    /// Whether any sequence waits or runs.
    pub fn has_work(&self) -> bool {
        !(self.active.is_empty() && self.waiting.is_empty())
    }

    /// Takes a sequence: it waits, in scheduling order, for its blocks.
    /// A request the executor refuses is given back as the error, and its
    /// claim with it.
    pub fn submit(
        &mut self,
        id: SequenceId,
        model: usize,
        priority: Priority,
        request: E::Request,
        claim: QueueClaim,
    ) -> Result<(), EngineError> {
        if model >= self.executor.models() {
            return Err(EngineError::InvalidRequest(format!("no model {model}")));
        }
        let sequence = self.executor.start(model, request)?;
        self.arrivals += 1;
        let entry = Entry {
            id,
            model,
            priority,
            arrival: self.arrivals,
            waited: 0,
            waiting_since: None,
            sequence,
            slot: Slot::Waiting(claim),
            cancelled: false,
        };
        self.wait(entry);
        Ok(())
    }

    /// Ends sequence `id` before the next pass (its client left). Unknown
    /// or finished ids are ignored.
    pub fn cancel(&mut self, id: SequenceId) {
        for entry in self.active.iter_mut().chain(self.waiting.iter_mut()) {
            if entry.id == id {
                entry.cancelled = true;
            }
        }
    }

    /// Moves waiting sequences into the batch where they fit (the next
    /// [`Scheduler::step`] reports what it did). `step` admits too; an
    /// owner that runs steps elsewhere can admit at once on its own thread.
    pub fn admit(&mut self) {
        self.admit_waiting();
    }

    /// Admits what fits, runs one pass, and says what happened.
    pub fn step(&mut self) -> Vec<SchedulerEvent> {
        self.admit_waiting();
        self.run_step();
        self.steps += 1;
        std::mem::take(&mut self.events)
    }

    /// Puts `entry` among the waiting ones, in scheduling order.
    fn wait(&mut self, mut entry: Entry<E::Sequence>) {
        let (now, aging) = (self.steps, self.aging_steps);
        entry.waiting_since = Some(now);
        let at = self
            .waiting
            .partition_point(|j| j.order(now, aging) < entry.order(now, aging));
        self.waiting.insert(at, entry);
    }

    /// Moves waiting sequences into the batch, in scheduling order, while
    /// it has room and their models have the blocks for them. A sequence is
    /// never admitted ahead of one of the same model before it in that
    /// order.
    fn admit_waiting(&mut self) {
        let (now, aging) = (self.steps, self.aging_steps);
        // Aging may have moved sequences ahead of later, better ones.
        self.waiting
            .make_contiguous()
            .sort_by_key(|j| j.order(now, aging));
        let mut blocked = vec![false; self.executor.models()];
        let mut i = 0;
        while i < self.waiting.len() {
            let entry = &self.waiting[i];
            let model = entry.model;
            if entry.cancelled {
                if let Some(mut entry) = self.waiting.remove(i) {
                    self.executor.cancel(&mut entry.sequence);
                    self.retire(entry);
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
            let entry = &self.waiting[i];
            let others_running = self.has_active(model);
            let need = self.executor.blocks_to_resume(model, &entry.sequence);
            let total = self.executor.total_blocks(model);
            // A little room is kept for the running sequences to grow.
            let reserve = total / 100;
            if need > total {
                // A preempted sequence whose context outgrew every block
                // ends for length, as it would have running.
                if let Some(entry) = self.waiting.remove(i) {
                    self.end_unfit(entry);
                }
                continue;
            }
            if need + reserve > self.executor.available_blocks(model) && others_running {
                if self.preempt_for(i, Some(model)) {
                    continue;
                }
                blocked[model] = true;
                i += 1;
                continue;
            }
            let Some(mut entry) = self.waiting.remove(i) else {
                break;
            };
            self.executor.attach(model, &mut entry.sequence);
            entry.slot = match entry.slot {
                Slot::Waiting(claim) => {
                    self.events.push(SchedulerEvent::Started { id: entry.id });
                    Slot::Running(claim.start())
                }
                running => running,
            };
            if let Some(since) = entry.waiting_since.take() {
                entry.waited += now.saturating_sub(since);
            }
            let at = self
                .active
                .partition_point(|j| j.order(now, aging) < entry.order(now, aging));
            self.active.insert(at, entry);
        }
    }

    /// Makes room for waiting sequence `i` by preempting the batch's last
    /// one (of `model`, where given: the one whose blocks are short) when
    /// its priority is lower than sequence `i`'s. Whether it did.
    fn preempt_for(&mut self, i: usize, model: Option<usize>) -> bool {
        let (now, aging) = (self.steps, self.aging_steps);
        let Some(priority) = self.waiting.get(i).map(|j| j.priority_at(now, aging)) else {
            return false;
        };
        let Some(victim) = self
            .active
            .iter()
            .rposition(|j| model.is_none_or(|m| j.model == m))
        else {
            return false;
        };
        if self.active[victim].priority_at(now, aging) <= priority {
            return false;
        }
        let entry = self.active.remove(victim);
        self.requeue(entry);
        true
    }

    /// Gives a sequence taken out of the batch its blocks back; it waits,
    /// in scheduling order, to run its positions again.
    fn requeue(&mut self, mut entry: Entry<E::Sequence>) {
        self.executor.preempt(entry.model, &mut entry.sequence);
        self.preemptions += 1;
        self.events.push(SchedulerEvent::Preempted { id: entry.id });
        self.wait(entry);
    }

    fn has_active(&self, model: usize) -> bool {
        self.active.iter().any(|j| j.model == model)
    }

    /// Fails a sequence whose prompt needs more blocks than its model has.
    fn refuse(&mut self, entry: Entry<E::Sequence>, need: usize) {
        let total = self.executor.total_blocks(entry.model);
        let id = entry.id;
        let model = entry.model;
        let _ = self.executor.finish(model, entry.sequence);
        // The slot goes back (with `entry.slot`) before the owner hears.
        drop(entry.slot);
        self.events.push(SchedulerEvent::Failed {
            id,
            error: EngineError::InvalidRequest(format!(
                "the prompt needs {need} key/value blocks but the model's pool has {total}; \
                 shorten it or raise the server's KV budget"
            )),
        });
    }

    /// The sequences of `model` in the batch, in scheduling order, each
    /// with the tokens of its next pass (within the prefill budget, which
    /// goes to the first sequences first).
    fn plan(&self, model: usize) -> Vec<(usize, usize)> {
        let mut budget = PREFILL_TOKENS_PER_STEP;
        let mut plan = Vec::new();
        for (i, entry) in self.active.iter().enumerate() {
            if entry.model != model {
                continue;
            }
            let prefilling = self.executor.prompt_left(&entry.sequence) > 0;
            if prefilling && budget == 0 {
                continue;
            }
            let len = self.executor.next_pass_len(&entry.sequence, budget);
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

    /// A plan for the next pass of `model` whose blocks the executor can
    /// give: while they are short, the model's last sequence in scheduling
    /// order gives its blocks back and waits to run its positions again;
    /// the last one left ends for length (or is refused if it has not
    /// generated anything).
    fn fit_plan(&mut self, model: usize) -> Vec<(usize, usize)> {
        loop {
            let plan = self.plan(model);
            let need: usize = plan
                .iter()
                .map(|&(i, len)| {
                    self.executor
                        .blocks_for_next(model, &self.active[i].sequence, len)
                })
                .sum();
            if need <= self.executor.available_blocks(model) {
                return plan;
            }
            let Some(victim) = self.active.iter().rposition(|j| j.model == model) else {
                return Vec::new();
            };
            let entry = self.active.remove(victim);
            if self.has_active(model) {
                self.requeue(entry);
            } else {
                self.end_unfit(entry);
            }
        }
    }

    /// Ends a sequence its model's blocks cannot hold even alone: for
    /// length when it has generated something, else refused.
    fn end_unfit(&mut self, mut entry: Entry<E::Sequence>) {
        let model = entry.model;
        if self.executor.has_output(&entry.sequence) {
            let id = entry.id;
            let events = &mut self.events;
            self.executor
                .end_for_length(&mut entry.sequence, &mut |p| report(events, id, p));
            self.retire(entry);
        } else {
            let need = self.executor.blocks_to_resume(model, &entry.sequence);
            self.executor.preempt(model, &mut entry.sequence);
            self.refuse(entry, need);
        }
    }

    /// One forward pass over the sequences of one model (the models with
    /// work take turns), then each sequence's sampling and reports.
    fn run_step(&mut self) {
        for entry in &mut self.active {
            if entry.cancelled {
                self.executor.cancel(&mut entry.sequence);
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
        let mut members = Vec::with_capacity(plan.len());
        let mut batch = Vec::with_capacity(plan.len());
        let mut want = plan.iter().peekable();
        for (i, entry) in self.active.iter_mut().enumerate() {
            let Some(&&(j, len)) = want.peek() else {
                break;
            };
            if i != j {
                continue;
            }
            want.next();
            members.push((i, entry.id));
            batch.push((&mut entry.sequence, len));
        }
        let events = &mut self.events;
        let outcome = self
            .executor
            .run_pass(model, &mut batch, &mut |k, p| match members.get(k) {
                Some(&(_, id)) => report(events, id, p),
                None => ControlFlow::Continue(()),
            });
        drop(batch);
        if let Err(error) = outcome {
            // Runs are checked when they start and blocks before the pass,
            // so a failed pass is a fault of the executor: the step's
            // sequences fail; the others go on.
            for &(i, _) in members.iter().rev() {
                let entry = self.active.remove(i);
                let id = entry.id;
                let _ = self.executor.finish(entry.model, entry.sequence);
                drop(entry.slot);
                self.events.push(SchedulerEvent::Failed {
                    id,
                    error: EngineError::Failed(error.to_string()),
                });
            }
        }
        self.retire_finished();
    }

    /// Ends the sequences that are over.
    fn retire_finished(&mut self) {
        let mut i = 0;
        while i < self.active.len() {
            if self.executor.is_done(&self.active[i].sequence) {
                let entry = self.active.remove(i);
                self.retire(entry);
            } else {
                i += 1;
            }
        }
    }

    /// Ends a sequence that is over: its blocks and slot go back, then its
    /// result goes out.
    fn retire(&mut self, entry: Entry<E::Sequence>) {
        let started = entry.started();
        let id = entry.id;
        let generation = self.executor.finish(entry.model, entry.sequence);
        drop(entry.slot);
        self.events.push(SchedulerEvent::Finished {
            id,
            started,
            generation: Box::new(generation),
        });
    }
}

/// Turns one progress report into an event. Reports never cancel: the
/// owner cancels between steps.
fn report(events: &mut Vec<SchedulerEvent>, id: SequenceId, p: Progress<'_>) -> ControlFlow<()> {
    if let Progress::Token { sampled, text } = p {
        events.push(SchedulerEvent::Token {
            id,
            sampled: sampled.clone(),
            text: text.to_owned(),
        });
    }
    ControlFlow::Continue(())
}
