//! Batched execution against single-sequence execution on a real model:
//! three sequences prefilled in one pass and decoded together give the
//! tokens and log-probabilities that each gives alone, with each activation
//! precision.

// Test code: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use neocloud_engine::kv_cache::{KvCache, KvPool};
use neocloud_engine::model::{BatchSequence, Model};
use neocloud_engine::panel::ActivationPrecision;

const STEPS: usize = 8;

fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let lse = max
        + row
            .iter()
            .map(|&v| (v as f64 - max).exp())
            .sum::<f64>()
            .ln();
    row.iter().map(|&v| v as f64 - lse).collect()
}

fn argmax(row: &[f32]) -> u32 {
    row.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i as u32)
        .unwrap()
}

/// Greedy decoding of one prompt alone: per step, the log-probabilities.
fn alone(model: &Model, prompt: &[u32]) -> (Vec<u32>, Vec<Vec<f64>>) {
    let mut pool = KvPool::for_positions(&model.config, prompt.len() + STEPS, 1);
    let mut cache = KvCache::new();
    let mut logits = model
        .forward(&mut pool, prompt, &mut cache, prompt.len() - 1)
        .unwrap();
    let (mut tokens, mut lps) = (Vec::new(), Vec::new());
    for _ in 0..STEPS {
        let next = argmax(&logits);
        lps.push(log_softmax(&logits));
        tokens.push(next);
        logits = model.forward(&mut pool, &[next], &mut cache, 0).unwrap();
    }
    (tokens, lps)
}

#[test]
fn batched_sequences_get_the_log_probabilities_they_get_alone() {
    let exact = batched_against_alone(ActivationPrecision::default());
    if neocloud_engine::kernels::panels_in_use() {
        // Every row is quantised on its own, so batching changes no bit.
        assert!(exact, "products in panels depend on the batch");
    }
}

#[test]
fn batched_sequences_with_16_bit_activations_get_the_log_probabilities_they_get_alone() {
    batched_against_alone(ActivationPrecision::Sixteen);
}

#[test]
fn batched_sequences_with_8_bit_activations_get_the_log_probabilities_they_get_alone() {
    let exact = batched_against_alone(ActivationPrecision::Eight);
    if neocloud_engine::kernels::panels_in_use() {
        assert!(exact, "8-bit products in panels depend on the batch");
    }
}

#[test]
fn narrower_activations_change_the_numbers_only_slightly() {
    let (mut model, tok) = common::load("gemma-3-270m");
    let prompt = tok.encode("The capital of France is", true, false);
    let mut runs = Vec::new();
    for precision in [
        ActivationPrecision::Sixteen,
        ActivationPrecision::Mixed,
        ActivationPrecision::Eight,
    ] {
        model.set_activation_precision(precision);
        runs.push(alone(&model, &prompt));
    }
    if !neocloud_engine::kernels::panels_in_use() {
        // Without AVX-512 VNNI nothing is in panels: the setting changes nothing.
        assert!(runs.iter().all(|r| *r == runs[0]));
        return;
    }
    let top = |lp: &[f64]| lp.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    for (name, (_, lps)) in ["mixed", "8-bit"].iter().zip(&runs[1..]) {
        let (_, lps16) = &runs[0];
        let mut moved = 0f64;
        for (a, b) in lps16.iter().zip(lps) {
            moved = moved.max((top(a) - top(b)).abs());
        }
        eprintln!("{name}: top log-probability moved by up to {moved:.3} nats");
        assert!(
            lps16 != lps,
            "the {name} setting did not reach the products"
        );
        assert!(moved < 0.5, "{name}: {moved}");
    }
    assert!(
        runs[1].1 != runs[2].1,
        "mixed and 8-bit products are the same"
    );
}

/// Whether batched and single execution agree at `precision` (asserted
/// within 1e-2); returns whether they agree to the bit.
fn batched_against_alone(precision: ActivationPrecision) -> bool {
    let (mut model, tok) = common::load("gemma-3-270m");
    model.set_activation_precision(precision);
    let vocab = model.config.vocab_size;
    let prompts: Vec<Vec<u32>> = [
        "The capital of France is",
        "Once upon a time, in a small village by the sea, there lived",
        "def fibonacci(n):",
    ]
    .iter()
    .map(|p| tok.encode(p, true, false))
    .collect();
    let singles: Vec<_> = prompts.iter().map(|p| alone(&model, p)).collect();

    let mut pool = model.kv_pool(64 << 20);
    let mut caches: Vec<KvCache> = prompts.iter().map(|_| KvCache::new()).collect();
    // All three prompts in one pass, then every decode step in one pass.
    let mut batch: Vec<BatchSequence<'_>> = prompts
        .iter()
        .zip(caches.iter_mut())
        .map(|(p, cache)| BatchSequence {
            tokens: p,
            cache,
            logits_from: p.len() - 1,
        })
        .collect();
    let mut logits = model.forward_batch(&mut pool, &mut batch).unwrap();
    drop(batch);
    let mut worst = 0f64;
    let mut exact = true;
    for step in 0..STEPS {
        let mut next = Vec::new();
        for (s, row) in logits.chunks_exact(vocab).enumerate() {
            let (want_tokens, want_lps) = &singles[s];
            let lp = log_softmax(row);
            for (a, b) in lp.iter().zip(&want_lps[step]) {
                worst = worst.max((a - b).abs());
                exact &= a.to_bits() == b.to_bits();
            }
            let token = argmax(row);
            assert_eq!(token, want_tokens[step], "sequence {s} step {step}");
            next.push([token]);
        }
        let mut batch: Vec<BatchSequence<'_>> = next
            .iter()
            .zip(caches.iter_mut())
            .map(|(t, cache)| BatchSequence {
                tokens: t,
                cache,
                logits_from: 0,
            })
            .collect();
        logits = model.forward_batch(&mut pool, &mut batch).unwrap();
    }
    eprintln!("largest log-probability difference {worst:.2e} (bit-identical: {exact})");
    // The reference tests allow a mean difference of 0.25 against llama.cpp;
    // batching must stay far inside that.
    assert!(worst < 1e-2, "{worst}");
    for (c, p) in caches.iter().zip(&prompts) {
        assert_eq!(c.len(), p.len() + STEPS);
    }
    exact
}
