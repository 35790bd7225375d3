//! The prefix cache on a real model: a prompt that starts like the last
//! sequence reuses its positions (or whole prefill chunks, where the
//! kernels' rows depend on their batch), and the answer is the one a fresh
//! prefill gives, log-probabilities included, bit for bit.

// Test code: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::ops::ControlFlow;

use neocloud_engine::generation::{
    generate, generate_cached, reuse_unit, GenerateRequest, Generation, LoadedModel, PrefixCache,
    Progress, PREFILL_CHUNK,
};
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

#[test]
fn prompts_sharing_a_prefix_reuse_its_chunks_and_answer_as_without_them() {
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
    assert!(shared > PREFILL_CHUNK, "{shared}");
    // Reuse counts in single positions when the kernels compute each row
    // on its own (AVX-512 VNNI panels), else in whole prefill chunks.
    let unit = reuse_unit(&lm.model);
    let reusable = |n: usize| n - n % unit;

    let mut cache = PrefixCache::new();
    let mut ignore = |_: Progress<'_>| ControlFlow::Continue(());
    let a = generate_cached(&lm, &sampled(first.clone()), &mut cache, &mut ignore).unwrap();
    assert_eq!(a.cached_prompt_tokens, 0);
    // The cache holds the prompt and every generated token but the last.
    assert_eq!(cache.len(), first.len() + a.tokens.len() - 1);

    let b = generate_cached(&lm, &sampled(second.clone()), &mut cache, &mut ignore).unwrap();
    assert_eq!(b.cached_prompt_tokens, reusable(shared));
    let fresh = generate(&lm, &sampled(second.clone()), &mut ignore).unwrap();
    assert_eq!(fresh.cached_prompt_tokens, 0);
    same(&b, &fresh);

    // The same prompt again: all of it but the last token (or the same
    // chunks), the same answer.
    let c = generate_cached(&lm, &sampled(second.clone()), &mut cache, &mut ignore).unwrap();
    let again = if unit == 1 {
        second.len() - 1
    } else {
        reusable(shared)
    };
    assert_eq!(c.cached_prompt_tokens, again);
    same(&c, &fresh);

    // A short prompt shares only the BOS token, and leaves only that.
    let d = generate_cached(&lm, &sampled(encode("Hello")), &mut cache, &mut ignore).unwrap();
    assert_eq!(d.cached_prompt_tokens, reusable(1));
    let e = generate_cached(&lm, &sampled(second.clone()), &mut cache, &mut ignore).unwrap();
    assert_eq!(e.cached_prompt_tokens, reusable(1));
    same(&e, &fresh);
}
