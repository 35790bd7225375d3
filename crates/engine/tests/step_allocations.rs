//! The engine's step loop allocates nothing per token in steady state: a
//! batched decode pass over four sequences of Gemma, in the pool with its
//! prefix index on, followed by sampling every row (greedy and with a
//! temperature), counted by a global allocator that counts every
//! allocation on every thread, the kernels' worker threads included.
//! Blocks are completed, and entered in the index, on the way.

// Test code: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use neocloud_engine::kv_cache::KvCache;
use neocloud_engine::model::{BatchSequence, ForwardScratch};
use neocloud_engine::sampler::{Sampler, SamplingParams};

/// Counts allocations while `COUNTING` is set.
struct CountingAllocator;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

fn count() {
    if COUNTING.load(Ordering::Relaxed) {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: every call goes straight to the system allocator.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller's contract is passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

#[test]
fn decode_steps_allocate_nothing_once_warm() {
    // The loop runs on a worker of the kernels' thread pool, as the
    // engine's scheduler does, so that its parallel regions are forked
    // there rather than sent to the pool from outside.
    neocloud_engine::kernels::on_kernel_pool(decode_steps);
}

fn decode_steps() {
    let (model, tok) = common::load("gemma-3-270m");
    let vocab = model.config.vocab_size;
    let mut pool = model.kv_pool(64 << 20);
    let prompts: Vec<Vec<u32>> = [
        "The capital of France is",
        "Once upon a time",
        "def fibonacci(n):",
        "The best way to learn a language is",
    ]
    .iter()
    .map(|p| tok.encode(p, true, false))
    .collect();
    const STEPS: usize = 48;
    let mut caches: [KvCache; 4] = Default::default();
    for (cache, p) in caches.iter_mut().zip(&prompts) {
        pool.reserve(cache, p.len() + STEPS + 8);
    }
    let mut samplers: Vec<Sampler> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let params = if i % 2 == 0 {
                SamplingParams::greedy()
            } else {
                SamplingParams {
                    temperature: 0.8,
                    top_p: 0.9,
                    seed: Some(i as u64),
                    ..SamplingParams::default()
                }
            };
            Sampler::new(params, p)
        })
        .collect();
    let mut scratch = ForwardScratch::default();
    let mut next = [[0u32; 1]; 4];
    {
        let [c0, c1, c2, c3] = &mut caches;
        let mut batch = [c0, c1, c2, c3].map(|cache| BatchSequence {
            tokens: &[],
            cache,
            logits_from: 0,
        });
        for (s, p) in batch.iter_mut().zip(&prompts) {
            s.tokens = p;
            s.logits_from = p.len() - 1;
        }
        let logits = model
            .forward_batch_with(&mut pool, &mut batch, &mut scratch)
            .unwrap();
        for ((row, sampler), n) in logits
            .chunks_exact_mut(vocab)
            .zip(&mut samplers)
            .zip(&mut next)
        {
            n[0] = sampler.sample(row).token.id;
        }
    }
    let mut allocations_per_step = Vec::with_capacity(STEPS);
    for step in 0..STEPS {
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        // The first steps grow the buffers to the batch's size.
        COUNTING.store(step >= 4, Ordering::Relaxed);
        let [c0, c1, c2, c3] = &mut caches;
        let [t0, t1, t2, t3] = &next;
        let mut batch = [(t0, c0), (t1, c1), (t2, c2), (t3, c3)].map(|(t, cache)| BatchSequence {
            tokens: t,
            cache,
            logits_from: 0,
        });
        let logits = model
            .forward_batch_with(&mut pool, &mut batch, &mut scratch)
            .unwrap();
        let mut sampled = [0u32; 4];
        for ((row, sampler), n) in logits
            .chunks_exact_mut(vocab)
            .zip(&mut samplers)
            .zip(&mut sampled)
        {
            *n = sampler.sample(row).token.id;
        }
        COUNTING.store(false, Ordering::Relaxed);
        next = sampled.map(|t| [t]);
        allocations_per_step.push(ALLOCATIONS.load(Ordering::Relaxed) - before);
    }
    // Blocks were completed (and entered in the prefix index) on the way.
    assert!(caches.iter().all(|c| c.len() > 2 * 16));
    assert!(
        allocations_per_step.iter().all(|&n| n == 0),
        "allocations per step: {allocations_per_step:?}"
    );
}
