//! The prefix index of the key/value pool on a real model: a prompt that
//! starts like earlier sequences takes their blocks, and the answer is the
//! one a fresh prefill gives, log-probabilities included, bit for bit.
//! Entries live until memory runs short, and then go least recently used
//! first; sliding-window layers hold only their window.

// Test code: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::ops::ControlFlow;

use neocloud_engine::generation::{
    generate, generate_cached, GenerateRequest, Generation, LoadedModel, Progress,
};
use neocloud_engine::kv_cache::{KvCache, KvPool, KV_BLOCK_POSITIONS};
use neocloud_engine::sampler::SamplingParams;

fn sampled(prompt: Vec<u32>) -> GenerateRequest {
    GenerateRequest {
        sampling: SamplingParams {
            seed: Some(11),
            temperature: 1.0,
            ..SamplingParams::default()
        },
        ..GenerateRequest::greedy(prompt, 16)
    }
}

fn same(a: &Generation, b: &Generation) {
    assert_eq!(a.tokens, b.tokens);
    for (x, y) in a.steps.iter().zip(&b.steps) {
        assert_eq!(
            x.token.logprob.to_bits(),
            y.token.logprob.to_bits(),
            "{x:?} {y:?}"
        );
    }
}

/// Whole blocks within `n` positions.
fn blocks(n: usize) -> usize {
    n - n % KV_BLOCK_POSITIONS
}

#[test]
fn prompts_sharing_a_prefix_reuse_its_blocks_and_answer_as_without_them() {
    let lm = LoadedModel::open(&common::model_path("gemma-3-270m")).unwrap();
    let system = "You are a careful assistant who answers in one short sentence. ".repeat(60);
    let encode = |text: &str| lm.tokenizer.encode(text, true, false);
    let first = encode(&format!("{system}Question: what colour is the sky?"));
    let second = encode(&format!("{system}Question: what is two plus two?"));
    let shared = first
        .iter()
        .zip(&second)
        .take_while(|(a, b)| a == b)
        .count();
    assert!(shared > 600, "{shared}");
    // Prefixes are indexed only where every row is computed on its own
    // (AVX-512 VNNI panels): elsewhere reused keys would differ in their
    // last bits from fresh ones.
    let indexing = lm.model.batch_invariant();
    let reused = |n: usize| if indexing { blocks(n) } else { 0 };

    let mut pool = lm.model.kv_pool(256 << 20);
    let mut ignore = |_: Progress<'_>| ControlFlow::Continue(());
    let a = generate_cached(&lm, &sampled(first.clone()), &mut pool, &mut ignore).unwrap();
    assert_eq!(a.cached_prompt_tokens, 0);
    // Nothing runs: every block is free or only indexed.
    assert_eq!(pool.available_blocks(), pool.total_blocks());

    let b = generate_cached(&lm, &sampled(second.clone()), &mut pool, &mut ignore).unwrap();
    assert_eq!(b.cached_prompt_tokens, reused(shared));
    let fresh = generate(&lm, &sampled(second.clone()), &mut ignore).unwrap();
    assert_eq!(fresh.cached_prompt_tokens, 0);
    same(&b, &fresh);

    // The same prompt again: all of it but the last token, in whole blocks.
    let c = generate_cached(&lm, &sampled(second.clone()), &mut pool, &mut ignore).unwrap();
    assert_eq!(c.cached_prompt_tokens, reused(second.len() - 1));
    same(&c, &fresh);

    // A short prompt in between takes nothing and evicts nothing: both
    // long prompts keep their blocks.
    let d = generate_cached(&lm, &sampled(encode("Hello")), &mut pool, &mut ignore).unwrap();
    assert_eq!(d.cached_prompt_tokens, 0);
    let e = generate_cached(&lm, &sampled(second.clone()), &mut pool, &mut ignore).unwrap();
    assert_eq!(e.cached_prompt_tokens, reused(second.len() - 1));
    same(&e, &fresh);
    let f = generate_cached(&lm, &sampled(first.clone()), &mut pool, &mut ignore).unwrap();
    assert_eq!(f.cached_prompt_tokens, reused(first.len() - 1));
    same(&f, &a);
}

#[test]
fn a_full_pool_evicts_the_least_recently_used_prefixes() {
    let lm = LoadedModel::open(&common::model_path("gemma-3-270m")).unwrap();
    if !lm.model.batch_invariant() {
        eprintln!("prefixes are not indexed with these kernels");
        return;
    }
    let encode = |text: &str| lm.tokenizer.encode(text, true, false);
    let prompts: Vec<Vec<u32>> = ["sky", "sea", "forest", "desert"]
        .iter()
        .map(|topic| encode(&format!("Tell me about the {topic}. ").repeat(12)))
        .collect();
    // Room for about two of the four prompts' blocks.
    let config = &lm.model.config;
    let per_prompt = KvPool::for_positions(config, prompts[0].len() + 16, 1).total_blocks();
    let probe = lm.model.kv_pool(0);
    let mut pool = lm.model.kv_pool(per_prompt * 5 / 2 * probe.block_bytes());
    let mut ignore = |_: Progress<'_>| ControlFlow::Continue(());
    let mut run = |pool: &mut KvPool, p: &[u32]| {
        generate_cached(&lm, &sampled(p.to_vec()), pool, &mut ignore)
            .unwrap()
            .cached_prompt_tokens
    };
    for p in &prompts {
        assert_eq!(run(&mut pool, p), 0);
    }
    // The last two are still there; the first two were evicted.
    assert_eq!(run(&mut pool, &prompts[3]), blocks(prompts[3].len() - 1));
    assert_eq!(run(&mut pool, &prompts[2]), blocks(prompts[2].len() - 1));
    assert_eq!(run(&mut pool, &prompts[0]), 0);
    assert_eq!(pool.available_blocks(), pool.total_blocks());
}

#[test]
fn sliding_window_layers_hold_only_their_window() {
    let lm = LoadedModel::open(&common::model_path("gemma-3-270m")).unwrap();
    let model = &lm.model;
    let config = &model.config;
    let window = config.sliding_window.unwrap();
    let mut pool = KvPool::new(config, 256 << 20, false);
    let mut cache = KvCache::new();
    let text = "The history of the lighthouse keepers of the northern coast. ".repeat(80);
    let tokens = lm.tokenizer.encode(&text, true, false);
    let prompt = &tokens[..window + 100];
    for chunk in prompt.chunks(300) {
        model.forward(&mut pool, chunk, &mut cache, 0).unwrap();
    }
    for &t in &tokens[prompt.len()..prompt.len() + 40] {
        model.forward(&mut pool, &[t], &mut cache, 0).unwrap();
    }
    let len = cache.len();
    let mut held = 0;
    for (l, &sliding) in config.layer_sliding.iter().enumerate() {
        let blocks = cache.blocks_held(l);
        held += blocks;
        if sliding {
            // The window, plus the block the oldest visible position is in.
            assert!(
                blocks <= window / KV_BLOCK_POSITIONS + 1,
                "layer {l}: {blocks}"
            );
        } else {
            assert_eq!(blocks, len.div_ceil(KV_BLOCK_POSITIONS), "layer {l}");
        }
    }
    assert_eq!(pool.blocks_in_use(), held);
    pool.release(&mut cache);
    assert_eq!(pool.available_blocks(), pool.total_blocks());
}
