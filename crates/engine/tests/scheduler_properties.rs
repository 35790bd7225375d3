//! The scheduler's invariants over a fake executor (no model file): any
//! interleaving of submit, cancel, step, priorities, preemption and failed
//! passes leaves no block leaked, no slot lost, the gauges back at 0, every
//! sequence ended exactly once, admission in scheduling order, and each
//! sequence's tokens those it would have produced alone.

// Test code: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::ops::ControlFlow;
use std::sync::Arc;

use neocloud_engine::generation::{FinishReason, Generation, Progress};
use neocloud_engine::sampler::{Sampled, TokenLogprob};
use neocloud_engine::scheduler::{
    Executor, Priority, Scheduler, SchedulerEvent, SequenceId, SlotGauges,
};
use neocloud_engine::EngineError;
use proptest::prelude::*;

/// Positions per block.
const BLOCK: usize = 4;
/// Most prompt tokens a pass takes from one sequence.
const CHUNK: usize = 16;

/// What a fake sequence asks for.
#[derive(Debug, Clone)]
struct FakeRequest {
    prompt: Vec<u32>,
    max_tokens: usize,
    /// Its passes fail (a fault of the executor).
    poison: bool,
    /// Names it to the harness.
    tag: u64,
}

#[derive(Debug)]
struct FakeSequence {
    context: Vec<u32>,
    prompt_len: usize,
    computed: usize,
    blocks: usize,
    max_tokens: usize,
    generated: Vec<u32>,
    done: Option<FinishReason>,
    poison: bool,
    tag: u64,
}

/// The next token after `context`: a function of the whole context, so a
/// sequence recomputed after a preemption must give the same tokens.
fn next_token(context: &[u32]) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &t in context {
        h = (h ^ t as u64).wrapping_mul(0x100_0000_01b3);
    }
    (h % 1000) as u32
}

/// The tokens `request` gives when it runs alone to its limit.
fn alone(request: &FakeRequest) -> Vec<u32> {
    let mut context = request.prompt.clone();
    let mut out = Vec::new();
    while out.len() < request.max_tokens {
        let t = next_token(&context);
        out.push(t);
        context.push(t);
    }
    out
}

/// Blocks, per model, and the sequences' state: keys and values are only
/// counted.
struct FakeExecutor {
    total: Vec<usize>,
    free: Vec<usize>,
    /// Tags of the sequences of every failed pass.
    failed: BTreeSet<u64>,
}

fn blocks_for(positions: usize) -> usize {
    positions.div_ceil(BLOCK)
}

impl Executor for FakeExecutor {
    type Request = FakeRequest;
    type Sequence = FakeSequence;

    fn models(&self) -> usize {
        self.total.len()
    }

    fn start(&mut self, _model: usize, r: FakeRequest) -> Result<FakeSequence, EngineError> {
        if r.prompt.is_empty() {
            return Err(EngineError::InvalidRequest("the prompt is empty".into()));
        }
        Ok(FakeSequence {
            prompt_len: r.prompt.len(),
            context: r.prompt,
            computed: 0,
            blocks: 0,
            max_tokens: r.max_tokens,
            generated: Vec::new(),
            done: None,
            poison: r.poison,
            tag: r.tag,
        })
    }

    fn total_blocks(&self, model: usize) -> usize {
        self.total[model]
    }

    fn available_blocks(&self, model: usize) -> usize {
        self.free[model]
    }

    fn blocks_in_use(&self) -> usize {
        self.total.iter().sum::<usize>() - self.free.iter().sum::<usize>()
    }

    fn blocks_to_resume(&self, _model: usize, s: &FakeSequence) -> usize {
        blocks_for(s.context.len() + 1).saturating_sub(s.blocks)
    }

    fn blocks_for_next(&self, _model: usize, s: &FakeSequence, len: usize) -> usize {
        blocks_for(s.computed + len).saturating_sub(s.blocks)
    }

    fn attach(&mut self, _model: usize, _s: &mut FakeSequence) {}

    fn preempt(&mut self, model: usize, s: &mut FakeSequence) {
        self.free[model] += s.blocks;
        s.blocks = 0;
        s.computed = 0;
    }

    fn prompt_left(&self, s: &FakeSequence) -> usize {
        let left = s.context.len() - s.computed;
        if s.done.is_some() || left <= 1 && s.computed >= s.prompt_len {
            0
        } else {
            left
        }
    }

    fn next_pass_len(&self, s: &FakeSequence, budget: usize) -> usize {
        if s.done.is_some() {
            return 0;
        }
        let left = s.context.len() - s.computed;
        left.min(budget.clamp(1, CHUNK))
    }

    fn has_output(&self, s: &FakeSequence) -> bool {
        !s.generated.is_empty()
    }

    fn is_done(&self, s: &FakeSequence) -> bool {
        s.done.is_some()
    }

    fn cancel(&mut self, s: &mut FakeSequence) {
        s.done.get_or_insert(FinishReason::Cancelled);
    }

    fn end_for_length(
        &mut self,
        s: &mut FakeSequence,
        _report: &mut dyn FnMut(Progress<'_>) -> ControlFlow<()>,
    ) {
        s.done.get_or_insert(FinishReason::Length);
    }

    fn run_pass(
        &mut self,
        model: usize,
        batch: &mut [(&mut FakeSequence, usize)],
        report: &mut dyn FnMut(usize, Progress<'_>) -> ControlFlow<()>,
    ) -> Result<(), EngineError> {
        if batch.iter().any(|(s, _)| s.poison) {
            self.failed.extend(batch.iter().map(|(s, _)| s.tag));
            return Err(EngineError::Failed("a poisoned pass".into()));
        }
        let need: usize = batch
            .iter()
            .map(|(s, len)| blocks_for(s.computed + len).saturating_sub(s.blocks))
            .sum();
        assert!(
            need <= self.free[model],
            "the scheduler planned {need} blocks with {} free",
            self.free[model]
        );
        for (k, (s, len)) in batch.iter_mut().enumerate() {
            assert!(*len > 0 && s.computed + *len <= s.context.len());
            let grow = blocks_for(s.computed + *len).saturating_sub(s.blocks);
            self.free[model] -= grow;
            s.blocks += grow;
            s.computed += *len;
            if s.computed < s.context.len() {
                continue;
            }
            let t = next_token(&s.context);
            s.generated.push(t);
            let sampled = Sampled {
                token: TokenLogprob {
                    id: t,
                    logprob: 0.0,
                },
                top: Vec::new(),
            };
            let _ = report(
                k,
                Progress::Token {
                    sampled: &sampled,
                    text: "",
                },
            );
            if s.generated.len() == s.max_tokens {
                s.done = Some(FinishReason::Length);
            } else {
                s.context.push(t);
            }
        }
        Ok(())
    }

    fn finish(&mut self, model: usize, s: FakeSequence) -> Generation {
        self.free[model] += s.blocks;
        Generation {
            tokens: s.generated,
            text: String::new(),
            steps: Vec::new(),
            finish_reason: s.done.unwrap_or(FinishReason::Cancelled),
            prefill_time: Default::default(),
            decode_time: Default::default(),
            cached_prompt_tokens: 0,
            prompt_scores: Vec::new(),
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    Submit {
        model: usize,
        priority: Priority,
        prompt_len: usize,
        max_tokens: usize,
        poison: bool,
    },
    /// Cancels the `k`-th submitted sequence (modulo their number).
    Cancel(usize),
    Step,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..2usize, -2..3i32, 1..40usize, 1..24usize, prop::bool::weighted(0.05)).prop_map(
            |(model, priority, prompt_len, max_tokens, poison)| Op::Submit {
                model,
                priority,
                prompt_len,
                max_tokens,
                poison,
            }
        ),
        1 => (0..64usize).prop_map(Op::Cancel),
        6 => Just(Op::Step),
    ]
}

/// What the harness knows of one submitted sequence.
struct Known {
    model: usize,
    order: (Priority, u64),
    request: FakeRequest,
    started: bool,
    ended: Option<Result<Generation, EngineError>>,
    cancelled: bool,
}

/// Runs `ops`, then steps until nothing is left; checks every invariant.
/// Returns the number of preemptions.
fn check(ops: &[Op], blocks: [usize; 2], max_batch: usize, capacity: usize) -> u64 {
    let gauges = SlotGauges::new();
    let executor = FakeExecutor {
        total: blocks.to_vec(),
        free: blocks.to_vec(),
        failed: BTreeSet::new(),
    };
    let mut scheduler = Scheduler::new(executor, max_batch);
    let mut known: BTreeMap<SequenceId, Known> = BTreeMap::new();
    let mut ids = Vec::new();
    let mut arrivals = 0;
    let step = |scheduler: &mut Scheduler<FakeExecutor>,
                known: &mut BTreeMap<SequenceId, Known>| {
        // Per model, the best order among those waiting to start before.
        let waiting_before: BTreeSet<SequenceId> = known
            .iter()
            .filter(|(_, k)| !k.started && k.ended.is_none())
            .map(|(id, _)| *id)
            .collect();
        let events = scheduler.step();
        let mut started_now = Vec::new();
        for event in events {
            match event {
                SchedulerEvent::Started { id } => {
                    let k = known.get_mut(&id).unwrap();
                    assert!(!k.started, "{id:?} started twice");
                    k.started = true;
                    started_now.push(id);
                }
                SchedulerEvent::Finished {
                    id,
                    started,
                    generation,
                } => {
                    let k = known.get_mut(&id).unwrap();
                    assert!(k.ended.is_none(), "{id:?} ended twice");
                    assert_eq!(started, k.started);
                    k.ended = Some(Ok(*generation));
                }
                SchedulerEvent::Failed { id, error } => {
                    let k = known.get_mut(&id).unwrap();
                    assert!(k.ended.is_none(), "{id:?} ended twice");
                    k.ended = Some(Err(error));
                }
                SchedulerEvent::Token { .. } | SchedulerEvent::Preempted { .. } => {}
            }
        }
        // Admission by priority, then arrival, within a model: no sequence
        // started ahead of one of its model that waited with a better
        // order and still waits.
        for id in &started_now {
            let (model, order) = (known[id].model, known[id].order);
            for other in &waiting_before {
                let o = &known[other];
                if o.model == model && !o.started && o.ended.is_none() {
                    assert!(
                        o.order > order,
                        "{id:?} {order:?} started ahead of {other:?} {:?}",
                        o.order
                    );
                }
            }
        }
        // The gauges count exactly the live sequences.
        let live = known.values().filter(|k| k.ended.is_none());
        let (running, waiting) = live.fold(
            (0, 0),
            |(r, w), k| {
                if k.started {
                    (r + 1, w)
                } else {
                    (r, w + 1)
                }
            },
        );
        assert_eq!(gauges.running(), running);
        assert_eq!(gauges.waiting(), waiting);
    };
    for op in ops {
        match op {
            Op::Submit {
                model,
                priority,
                prompt_len,
                max_tokens,
                poison,
            } => {
                let Some(claim) = gauges.try_queue(capacity) else {
                    assert_eq!(
                        known
                            .values()
                            .filter(|k| !k.started && k.ended.is_none())
                            .count(),
                        capacity,
                        "a claim is refused only when the queue is full"
                    );
                    continue;
                };
                arrivals += 1;
                let id = SequenceId(arrivals);
                let request = FakeRequest {
                    prompt: (0..*prompt_len as u32)
                        .map(|t| t * 7 + arrivals as u32)
                        .collect(),
                    max_tokens: *max_tokens,
                    poison: *poison,
                    tag: arrivals,
                };
                scheduler
                    .submit(id, *model, *priority, request.clone(), claim)
                    .unwrap();
                ids.push(id);
                known.insert(
                    id,
                    Known {
                        model: *model,
                        order: (*priority, arrivals),
                        request,
                        started: false,
                        ended: None,
                        cancelled: false,
                    },
                );
            }
            Op::Cancel(k) if !ids.is_empty() => {
                let id = ids[k % ids.len()];
                scheduler.cancel(id);
                known.get_mut(&id).unwrap().cancelled = true;
            }
            Op::Cancel(_) => {}
            Op::Step => step(&mut scheduler, &mut known),
        }
    }
    let mut steps = 0;
    while scheduler.has_work() {
        step(&mut scheduler, &mut known);
        steps += 1;
        assert!(steps < 10_000, "the scheduler makes no progress");
    }
    // Nothing leaked, nothing lost.
    assert_eq!(scheduler.executor().free, blocks.to_vec(), "blocks leaked");
    assert_eq!((gauges.waiting(), gauges.running()), (0, 0));
    for (id, k) in &known {
        let ended = k
            .ended
            .as_ref()
            .unwrap_or_else(|| panic!("{id:?} never ended"));
        match ended {
            Ok(g) => {
                let reference = alone(&k.request);
                assert!(
                    reference.starts_with(&g.tokens),
                    "{id:?}: {:?} is not a prefix of {reference:?}",
                    g.tokens
                );
                if g.finish_reason == FinishReason::Cancelled {
                    assert!(k.cancelled, "{id:?} cancelled unasked");
                } else if !k.cancelled && g.tokens.len() < k.request.max_tokens {
                    // Cut short only when its model's blocks cannot hold it.
                    assert_eq!(g.finish_reason, FinishReason::Length);
                    assert!(
                        blocks_for(k.request.prompt.len() + g.tokens.len() + 1) >= blocks[k.model],
                        "{id:?} cut short at {} tokens with room",
                        g.tokens.len()
                    );
                }
            }
            Err(EngineError::Failed(_)) => assert!(
                scheduler.executor().failed.contains(&k.request.tag),
                "{id:?} failed outside a failed pass"
            ),
            Err(EngineError::InvalidRequest(m)) => {
                assert!(
                    blocks_for(k.request.prompt.len() + 1) > blocks[k.model] || k.request.poison,
                    "{id:?} refused: {m}"
                );
            }
            Err(other) => panic!("{id:?}: {other}"),
        }
    }
    scheduler.preemptions()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn any_interleaving_keeps_every_invariant(
        ops in prop::collection::vec(op(), 1..120),
        blocks_a in 3..40usize,
        blocks_b in 3..40usize,
        max_batch in 1..6usize,
        capacity in 1..24usize,
    ) {
        check(&ops, [blocks_a, blocks_b], max_batch, capacity);
    }
}

#[test]
fn priorities_order_admission_and_a_preempted_sequence_answers_as_alone() {
    // One place in the batch; the lower-priority sequence runs first, is
    // preempted by a higher-priority arrival, and resumes.
    let ops = [
        Op::Submit {
            model: 0,
            priority: 2,
            prompt_len: 10,
            max_tokens: 20,
            poison: false,
        },
        Op::Step,
        Op::Step,
        Op::Submit {
            model: 0,
            priority: 0,
            prompt_len: 5,
            max_tokens: 5,
            poison: false,
        },
        Op::Submit {
            model: 0,
            priority: 1,
            prompt_len: 5,
            max_tokens: 5,
            poison: false,
        },
    ];
    assert_eq!(check(&ops, [64, 64], 1, 8), 1);
    // Blocks short: the running sequences outgrow 12 blocks and the last
    // in scheduling order gives its blocks back, then recomputes.
    let crowd: Vec<Op> = (0..4)
        .map(|i| Op::Submit {
            model: 1,
            priority: 0,
            prompt_len: 6 + i,
            max_tokens: 12,
            poison: false,
        })
        .collect();
    assert!(check(&crowd, [12, 12], 4, 8) > 0);
    let gauges: Arc<SlotGauges> = SlotGauges::new();
    assert!(gauges.try_queue(0).is_none());
}

/// Steps a scheduler with one place in the batch, where a sequence of
/// priority 5 meets a stream of priority-0 arrivals (a new one each step),
/// until the first ends; the step it ended at, if it did within `steps`.
fn steps_until_the_low_one_ends(aging: u64, steps: usize) -> Option<usize> {
    let executor = FakeExecutor {
        total: vec![1024],
        free: vec![1024],
        failed: BTreeSet::new(),
    };
    let mut scheduler = Scheduler::new(executor, 1).with_aging(aging);
    let gauges = SlotGauges::new();
    let request = |tag: u64, max_tokens: usize| FakeRequest {
        prompt: vec![1, 2, 3],
        max_tokens,
        poison: false,
        tag,
    };
    let low = SequenceId(0);
    scheduler
        .submit(
            low,
            0,
            5,
            request(0, 4),
            gauges.try_queue(usize::MAX).unwrap(),
        )
        .unwrap();
    for step in 0..steps {
        let id = SequenceId(step as u64 + 1);
        let claim = gauges.try_queue(usize::MAX).unwrap();
        scheduler.submit(id, 0, 0, request(id.0, 2), claim).unwrap();
        for event in scheduler.step() {
            if matches!(event, SchedulerEvent::Finished { id, .. } if id == low) {
                return Some(step);
            }
        }
    }
    None
}

/// Any client could once keep a sequence waiting forever by sending better
/// ones. Waiting ages it: after enough steps it ranks with the best, and
/// runs to its end.
#[test]
fn a_stream_of_better_requests_delays_a_sequence_but_never_starves_it() {
    assert_eq!(
        steps_until_the_low_one_ends(u64::MAX, 400),
        None,
        "without aging the stream starves it"
    );
    let ended = steps_until_the_low_one_ends(8, 400).expect("starved despite aging");
    // Five levels of eight steps, then its own few steps.
    assert!(ended >= 5 * 8, "{ended}");
}
