//! The `llama` architecture through the shared model description, on a small
//! synthetic model: it loads with Llama's layout (interleaved RoPE, SiLU, no
//! post-norms), and incremental decoding reproduces the batched forward pass.

// Test code: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use neocloud_engine::gguf::GgufFile;
use neocloud_engine::kv_cache::KvCache;
use neocloud_engine::model::{Activation, Architecture, Model, RopeStyle};
use neocloud_testkit::gguf_writer::{GgufBuilder, Tensor, Value};

const D: u64 = 64;
const FF: u64 = 96;
const VOCAB: u64 = 40;
const HEADS: u32 = 4;
const KV_HEADS: u32 = 2;

/// Deterministic pseudo-random weights in [-0.5, 0.5).
fn weights(seed: u64, n: usize) -> Vec<f32> {
    neocloud_testkit::pseudo_random(seed, n, -0.5, 0.5)
}

fn tiny_llama() -> Vec<u8> {
    let hd = D / HEADS as u64;
    let kv = hd * KV_HEADS as u64;
    let mut b = GgufBuilder::new()
        .meta("general.architecture", Value::Str("llama".into()))
        .meta("llama.block_count", Value::U32(2))
        .meta("llama.embedding_length", Value::U32(D as u32))
        .meta("llama.feed_forward_length", Value::U32(FF as u32))
        .meta("llama.attention.head_count", Value::U32(HEADS))
        .meta("llama.attention.head_count_kv", Value::U32(KV_HEADS))
        .meta("llama.context_length", Value::U32(128))
        .meta("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5));
    let mut seed = 1;
    let mut t = |name: &str, dims: &[u64]| {
        seed += 1;
        let n = dims.iter().product::<u64>() as usize;
        Tensor::f32(name, dims, &weights(seed, n))
    };
    let mut tensors = vec![
        t("token_embd.weight", &[D, VOCAB]),
        t("output_norm.weight", &[D]),
    ];
    for l in 0..2 {
        let p = |s: &str| format!("blk.{l}.{s}");
        tensors.extend([
            t(&p("attn_norm.weight"), &[D]),
            t(&p("attn_q.weight"), &[D, D]),
            t(&p("attn_k.weight"), &[D, kv]),
            t(&p("attn_v.weight"), &[D, kv]),
            t(&p("attn_output.weight"), &[D, D]),
            t(&p("ffn_norm.weight"), &[D]),
            t(&p("ffn_gate.weight"), &[D, FF]),
            t(&p("ffn_up.weight"), &[D, FF]),
            t(&p("ffn_down.weight"), &[FF, D]),
        ]);
    }
    for tensor in tensors {
        b = b.tensor(tensor);
    }
    b.build()
}

#[test]
fn llama_layout_is_recognised() {
    let gguf = GgufFile::from_bytes(tiny_llama()).unwrap();
    let model = Model::load(&gguf).unwrap();
    let c = &model.config;
    assert_eq!(c.architecture, Architecture::Llama);
    assert_eq!(c.rope_style, RopeStyle::Interleaved);
    assert_eq!(c.activation, Activation::Silu);
    assert_eq!((c.n_heads, c.n_kv_heads, c.head_dim), (4, 2, 16));
    assert_eq!(c.vocab_size, VOCAB as usize);
    assert!(c.sliding_window.is_none() && c.embedding_scale.is_none());
}

#[test]
fn incremental_decoding_matches_the_batched_pass() {
    let gguf = GgufFile::from_bytes(tiny_llama()).unwrap();
    let model = Model::load(&gguf).unwrap();
    let mut pool = model.kv_pool(1 << 20);
    let tokens = [3u32, 17, 5, 39, 0, 22, 8, 8, 13];
    let mut cache = KvCache::new();
    let batched = model.forward(&mut pool, &tokens, &mut cache, 0).unwrap();
    assert!(batched.iter().all(|v| v.is_finite()));
    let mut cache = KvCache::new();
    let mut incremental = model
        .forward(&mut pool, &tokens[..2], &mut cache, 0)
        .unwrap();
    for &t in &tokens[2..] {
        incremental.extend(model.forward(&mut pool, &[t], &mut cache, 0).unwrap());
    }
    assert_eq!(cache.len(), tokens.len());
    assert_eq!(batched.len(), incremental.len());
    let max_diff = batched
        .iter()
        .zip(&incremental)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        max_diff < 1e-3,
        "batched and incremental logits differ by {max_diff}"
    );
    // Position matters: the same token at two positions gives different logits.
    let v = VOCAB as usize;
    assert_ne!(&batched[6 * v..7 * v], &batched[7 * v..8 * v]);
}

#[test]
fn out_of_vocabulary_tokens_are_rejected() {
    let gguf = GgufFile::from_bytes(tiny_llama()).unwrap();
    let model = Model::load(&gguf).unwrap();
    let mut pool = model.kv_pool(1 << 20);
    let err = model
        .forward(&mut pool, &[VOCAB as u32], &mut KvCache::new(), 0)
        .unwrap_err();
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
}

#[test]
fn bad_batches_are_errors_not_panics() {
    let gguf = GgufFile::from_bytes(tiny_llama()).unwrap();
    let model = Model::load(&gguf).unwrap();
    let mut pool = model.kv_pool(1 << 20);
    let mut cache = KvCache::new();
    assert!(model.forward(&mut pool, &[], &mut cache, 0).is_err());
    assert!(model.forward(&mut pool, &[1, 2], &mut cache, 3).is_err());
    // No logits asked for: the cache still advances.
    assert!(model
        .forward(&mut pool, &[1, 2], &mut cache, 2)
        .unwrap()
        .is_empty());
    assert_eq!(cache.len(), 2);
    let too_long = vec![1u32; 127];
    let err = model
        .forward(&mut pool, &too_long, &mut cache, 126)
        .unwrap_err();
    assert!(err.to_string().contains("context"), "{err}");
}

/// Loads `bytes` as far as it goes: parse, model construction, one forward
/// step. Errors are fine; a panic or an abort fails the test.
fn load_and_step(bytes: Vec<u8>) {
    let Ok(gguf) = GgufFile::from_bytes(bytes) else {
        return;
    };
    let _ = neocloud_engine::tokenizer::Tokenizer::from_gguf(&gguf);
    let Ok(model) = Model::load(&gguf) else {
        return;
    };
    let mut pool = model.kv_pool(1 << 20);
    let _ = model.forward(&mut pool, &[1, 2, 3], &mut KvCache::new(), 0);
}

/// A mutation of a GGUF file: bytes overwritten, a field set to an extreme
/// value, or the file cut short.
#[derive(Debug, Clone)]
enum Mutation {
    Bytes(Vec<(usize, u8)>),
    Extreme { at: usize, value: u64, wide: bool },
    Truncate(usize),
}

fn mutation(len: usize) -> impl proptest::strategy::Strategy<Value = Mutation> {
    use proptest::prelude::*;
    let extreme = prop_oneof![
        Just(0u64),
        Just(1),
        Just(u32::MAX as u64),
        Just(u64::MAX),
        Just(1 << 40),
        Just(1 << 31),
        any::<u64>(),
    ];
    prop_oneof![
        proptest::collection::vec((0..len, any::<u8>()), 1..8).prop_map(Mutation::Bytes),
        (0..len, extreme, any::<bool>()).prop_map(|(at, value, wide)| Mutation::Extreme {
            at,
            value,
            wide
        }),
        (0..len).prop_map(Mutation::Truncate),
    ]
}

fn mutate(mut bytes: Vec<u8>, m: &Mutation) -> Vec<u8> {
    match m {
        Mutation::Bytes(edits) => {
            for &(at, b) in edits {
                bytes[at] = b;
            }
        }
        Mutation::Extreme { at, value, wide } => {
            let raw = if *wide {
                value.to_le_bytes().to_vec()
            } else {
                (*value as u32).to_le_bytes().to_vec()
            };
            let end = (*at + raw.len()).min(bytes.len());
            bytes[*at..end].copy_from_slice(&raw[..end - at]);
        }
        Mutation::Truncate(len) => bytes.truncate(*len),
    }
    bytes
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

    /// Mutated synthetic models go through parsing, model construction and
    /// a forward step with a clear error or an answer, never a panic or a
    /// huge allocation. Most mutations land in the header and metadata,
    /// where the counts and sizes are.
    #[test]
    fn mutated_synthetic_models_never_panic(m in mutation(2048)) {
        load_and_step(mutate(tiny_llama(), &m));
    }
}

/// The same over a real model file (Gemma 3 270M): mutations in its
/// metadata (the tokenizer's arrays, the dimensions) and tensor table.
#[test]
fn mutated_real_models_never_panic() {
    use proptest::strategy::{Strategy, ValueTree};
    let path = common::model_path("gemma-3-270m");
    let original = std::fs::read(&path).unwrap();
    let gguf = GgufFile::from_bytes(original.clone()).unwrap();
    // Mutations stay in the header: everything before the tensor data.
    let header = gguf.tensors.iter().map(|t| t.file_offset).min().unwrap();
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    for _ in 0..24 {
        let m = mutation(header).new_tree(&mut runner).unwrap().current();
        load_and_step(mutate(original.clone(), &m));
    }
}

/// A model that claims 4 billion positions once reached a reservation of
/// that size at the first forward step (an abort). It is refused at load.
#[test]
fn an_absurd_context_length_is_refused_at_load() {
    let mut bytes = tiny_llama();
    let key = b"llama.context_length";
    let at = bytes.windows(key.len()).position(|w| w == key).unwrap() + key.len();
    // The value type (u32), then the value.
    assert_eq!(&bytes[at..at + 4], &4u32.to_le_bytes());
    bytes[at + 4..at + 8].copy_from_slice(&u32::MAX.to_le_bytes());
    let gguf = GgufFile::from_bytes(bytes).unwrap();
    let err = Model::load(&gguf).unwrap_err();
    assert!(err.to_string().contains("context_length"), "{err}");
}
