//! The CPU engine as an [`Executor`]: the loaded models, each with its
//! key/value pool and forward-pass buffers, running [`SequenceRun`]s. A
//! panic inside a pass is caught here and fails that pass alone.

use std::ops::ControlFlow;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use crate::error::EngineError;
use crate::generation::{GenerateRequest, Generation, LoadedModel, Progress, SequenceRun};
use crate::kv_cache::KvPool;
use crate::model::ForwardScratch;
use crate::scheduler::Executor;

/// The models on the CPU, with their key/value pools.
pub struct CpuExecutor<'m> {
    models: &'m [Arc<LoadedModel>],
    pools: Vec<KvPool>,
    scratch: Vec<ForwardScratch>,
}

impl<'m> CpuExecutor<'m> {
    /// An executor over `models`, each with a pool of `kv_budget_bytes`.
    pub fn new(models: &'m [Arc<LoadedModel>], kv_budget_bytes: usize) -> Self {
        CpuExecutor {
            models,
            pools: models
                .iter()
                .map(|lm| lm.model.kv_pool(kv_budget_bytes))
                .collect(),
            scratch: models.iter().map(|_| ForwardScratch::default()).collect(),
        }
    }

    /// Blocks of every pool together.
    pub fn total_blocks_all(&self) -> usize {
        self.pools.iter().map(KvPool::total_blocks).sum()
    }
}

impl<'m> Executor for CpuExecutor<'m> {
    type Request = GenerateRequest;
    type Sequence = SequenceRun<'m>;

    fn models(&self) -> usize {
        self.models.len()
    }

    fn start(
        &mut self,
        model: usize,
        request: GenerateRequest,
    ) -> Result<SequenceRun<'m>, EngineError> {
        let lm: &'m LoadedModel = self
            .models
            .get(model)
            .ok_or_else(|| EngineError::InvalidRequest(format!("no model {model}")))?;
        SequenceRun::start(lm, request)
    }

    fn total_blocks(&self, model: usize) -> usize {
        self.pools[model].total_blocks()
    }

    fn available_blocks(&self, model: usize) -> usize {
        self.pools[model].available_blocks()
    }

    fn blocks_in_use(&self) -> usize {
        self.pools.iter().map(KvPool::blocks_in_use).sum()
    }

    fn blocks_to_resume(&self, model: usize, sequence: &SequenceRun<'m>) -> usize {
        sequence.blocks_to_resume(&self.pools[model])
    }

    fn blocks_for_next(&self, model: usize, sequence: &SequenceRun<'m>, len: usize) -> usize {
        sequence.blocks_for_next(&self.pools[model], len)
    }

    fn attach(&mut self, model: usize, sequence: &mut SequenceRun<'m>) {
        sequence.attach(&mut self.pools[model]);
    }

    fn preempt(&mut self, model: usize, sequence: &mut SequenceRun<'m>) {
        sequence.preempt(&mut self.pools[model]);
    }

    fn prompt_left(&self, sequence: &SequenceRun<'m>) -> usize {
        sequence.prompt_left()
    }

    fn next_pass_len(&self, sequence: &SequenceRun<'m>, budget: usize) -> usize {
        sequence.next_pass_len(budget)
    }

    fn has_output(&self, sequence: &SequenceRun<'m>) -> bool {
        sequence.has_output()
    }

    fn is_done(&self, sequence: &SequenceRun<'m>) -> bool {
        sequence.is_done()
    }

    fn cancel(&mut self, sequence: &mut SequenceRun<'m>) {
        sequence.cancel();
    }

    fn end_for_length(
        &mut self,
        sequence: &mut SequenceRun<'m>,
        report: &mut dyn FnMut(Progress<'_>) -> ControlFlow<()>,
    ) {
        sequence.end_for_length(report);
    }

    fn run_pass(
        &mut self,
        model: usize,
        batch: &mut [(&mut SequenceRun<'m>, usize)],
        report: &mut dyn FnMut(usize, Progress<'_>) -> ControlFlow<()>,
    ) -> Result<(), EngineError> {
        let lm = &self.models[model];
        let pool = &mut self.pools[model];
        let scratch = &mut self.scratch[model];
        let mut passes = Vec::with_capacity(batch.len());
        // Each member's place in `batch`, and the rows of logits it gets
        // (one, or one per position when it scores its prompt).
        let mut members = Vec::with_capacity(batch.len());
        for (k, (run, len)) in batch.iter_mut().enumerate() {
            if let Some(pass) = run.next_pass(*len) {
                members.push((k, pass.tokens.len() - pass.logits_from));
                passes.push(pass);
            }
        }
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(move || {
            // Taking the passes makes this closure run once, so that the
            // logits may borrow the scratch buffers.
            let mut passes = passes;
            lm.model.forward_batch_with(pool, &mut passes, scratch)
        }));
        let vocab = lm.model.config.vocab_size;
        let logits = match outcome {
            Ok(Ok(logits)) => logits,
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(EngineError::Failed("a panic in a forward pass".into())),
        };
        let mut rest = logits;
        for &(k, rows) in &members {
            let Some((own, after)) = rest.split_at_mut_checked(rows * vocab) else {
                return Err(EngineError::Failed("a pass returned too few logits".into()));
            };
            rest = after;
            let (run, _) = &mut batch[k];
            let sampled = std::panic::catch_unwind(AssertUnwindSafe(|| {
                run.advance(own, &mut |p| report(k, p));
            }));
            if sampled.is_err() {
                return Err(EngineError::Failed("a panic while sampling".into()));
            }
        }
        Ok(())
    }

    fn finish(&mut self, model: usize, sequence: SequenceRun<'m>) -> Generation {
        sequence.finish(&mut self.pools[model])
    }
}
