//! Teacher-forced log-probabilities of both reference models agree with
//! llama.cpp's (`crates/testkit/reference/*/greedy.jsonl`), under the rule of that
//! folder's README.

// Test code: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use neocloud_engine::kv_cache::KvCache;
use neocloud_engine::model::Model;
use neocloud_engine::panel::ActivationPrecision;
use neocloud_engine::sampler::log_softmax;

/// How the teacher-forced tokens go through the model.
#[derive(Debug, Clone, Copy)]
enum Mode {
    /// Prompt and reference tokens in one batched forward pass (prefill path).
    Batched,
    /// The prompt first, then the reference tokens one at a time (decode path).
    Incremental,
}

/// At the default activation precision.
fn check_model(name: &str, mode: Mode) {
    check_model_with(name, mode, ActivationPrecision::default());
}

fn check_model_with(name: &str, mode: Mode, precision: ActivationPrecision) {
    let (mut model, _tok) = common::load(name);
    model.set_activation_precision(precision);
    let lines = neocloud_testkit::reference_lines(name, "greedy.jsonl");
    let failures = disagreements(
        &model,
        &lines,
        mode,
        &format!("{name} {mode:?} {precision:?}"),
    );
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Where `model`, fed each line's prompt and tokens, breaks the rule of the
/// reference folder's README against the line's steps: one message per
/// top-1 change at a margin of 0.25 nats or more, and per prompt whose mean
/// difference exceeds 0.25.
fn disagreements(
    model: &Model,
    lines: &[serde_json::Value],
    mode: Mode,
    label: &str,
) -> Vec<String> {
    let mut failures = Vec::new();
    for (li, line) in lines.iter().enumerate() {
        let ids = |v: &serde_json::Value| -> Vec<u32> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_u64().unwrap() as u32)
                .collect()
        };
        let prompt = ids(&line["prompt_tokens"]);
        let completion = ids(&line["tokens"]);
        let steps = line["steps"].as_array().unwrap();
        let mut input = prompt.clone();
        input.extend(&completion[..completion.len() - 1]);
        let mut pool = model.kv_pool(64 << 20);
        let mut cache = KvCache::new();
        let vocab = model.config.vocab_size;
        let logits = match mode {
            Mode::Batched => model
                .forward(&mut pool, &input, &mut cache, prompt.len() - 1)
                .unwrap(),
            Mode::Incremental => {
                let mut all = model
                    .forward(&mut pool, &prompt, &mut cache, prompt.len() - 1)
                    .unwrap();
                for &t in &completion[..completion.len() - 1] {
                    all.extend(model.forward(&mut pool, &[t], &mut cache, 0).unwrap());
                }
                all
            }
        };
        assert_eq!(logits.len(), completion.len() * vocab);
        let mut total_diff = 0f64;
        let mut count = 0usize;
        let mut max_diff = 0f64;
        // llama.cpp leaves out the steps of tokens that end inside a UTF-8
        // character, so `steps` is a subsequence of `tokens`: align them.
        let mut position = 0usize;
        for step in steps {
            let id = step["id"].as_u64().unwrap() as u32;
            while completion[position] != id {
                position += 1;
            }
            let i = position;
            position += 1;
            let lp = log_softmax(&logits[i * vocab..(i + 1) * vocab]);
            let top = step["top"].as_array().unwrap();
            let ref_lp: Vec<(u32, f64)> = top
                .iter()
                .map(|t| {
                    (
                        t["id"].as_u64().unwrap() as u32,
                        t["logprob"].as_f64().unwrap(),
                    )
                })
                .collect();
            for &(id, want) in &ref_lp {
                let d = (lp[id as usize] as f64 - want).abs();
                total_diff += d;
                max_diff = max_diff.max(d);
                count += 1;
            }
            let margin = ref_lp[0].1 - ref_lp[1].1;
            let ours = lp
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, _)| i as u32)
                .unwrap();
            if margin >= 0.25 && ours != ref_lp[0].0 {
                failures.push(format!(
                    "{label} prompt {li} step {i}: top-1 {ours} != {} (margin {margin:.3})",
                    ref_lp[0].0
                ));
            }
        }
        let mean = total_diff / count as f64;
        eprintln!(
            "{label} prompt {li} ({} prompt tokens): mean |dlogprob| {mean:.4}, max {max_diff:.4}",
            prompt.len()
        );
        if mean > 0.25 {
            failures.push(format!(
                "{label} prompt {li}: mean difference {mean:.4} > 0.25"
            ));
        }
    }
    failures
}

#[test]
fn gemma_3_270m_batched_agrees_with_llama_cpp() {
    check_model("gemma-3-270m", Mode::Batched);
}

#[test]
fn gemma_3_270m_incremental_agrees_with_llama_cpp() {
    check_model("gemma-3-270m", Mode::Incremental);
}

#[test]
fn qwen2_5_coder_0_5b_batched_agrees_with_llama_cpp() {
    check_model("qwen2.5-coder-0.5b-instruct", Mode::Batched);
}

#[test]
fn qwen2_5_coder_0_5b_incremental_agrees_with_llama_cpp() {
    check_model("qwen2.5-coder-0.5b-instruct", Mode::Incremental);
}

#[test]
fn both_models_with_16_bit_activations_agree_with_llama_cpp() {
    for name in ["gemma-3-270m", "qwen2.5-coder-0.5b-instruct"] {
        for mode in [Mode::Batched, Mode::Incremental] {
            check_model_with(name, mode, ActivationPrecision::Sixteen);
        }
    }
}

// With 8-bit activations everywhere (llama.cpp's own precision) Qwen still
// agrees. Gemma does not: its top-1 token changes at three steps whose
// reference margins are 0.27 to 0.47 nats (see docs/performance.md).

#[test]
fn qwen2_5_coder_0_5b_with_8_bit_activations_agrees_with_llama_cpp() {
    check_model_with(
        "qwen2.5-coder-0.5b-instruct",
        Mode::Batched,
        ActivationPrecision::Eight,
    );
    check_model_with(
        "qwen2.5-coder-0.5b-instruct",
        Mode::Incremental,
        ActivationPrecision::Eight,
    );
}

/// Agreement beyond the reference folder's prompts: a file in its format
/// that `bench/held-out-reference.sh` writes with the llama-server of this
/// machine, for the model it names. The default precision must break the
/// rule at no more steps and prompts than 16 bits everywhere does (llama.cpp
/// builds differ among themselves, so neither is expected to agree
/// everywhere); 8 bits everywhere is reported alongside.
#[test]
#[ignore = "needs NEOCLOUD_HELD_OUT_REFERENCE and NEOCLOUD_HELD_OUT_MODEL (bench/held-out-reference.sh)"]
fn on_held_out_prompts_the_default_precision_agrees_as_well_as_16_bits() {
    let path = std::env::var("NEOCLOUD_HELD_OUT_REFERENCE").unwrap();
    let name = std::env::var("NEOCLOUD_HELD_OUT_MODEL").unwrap();
    let lines = neocloud_testkit::json_lines(std::path::Path::new(&path));
    let (mut model, _tok) = common::load(&name);
    let mut counts = Vec::new();
    for precision in [
        ActivationPrecision::Sixteen,
        ActivationPrecision::default(),
        ActivationPrecision::Eight,
    ] {
        model.set_activation_precision(precision);
        let failures = disagreements(
            &model,
            &lines,
            Mode::Batched,
            &format!("{name} {precision:?}"),
        );
        for f in &failures {
            eprintln!("{f}");
        }
        counts.push((precision, failures.len()));
    }
    eprintln!(
        "{name}, {} held-out prompts: rule broken {counts:?}",
        lines.len()
    );
    assert!(counts[1].1 <= counts[0].1, "{counts:?}");
}
