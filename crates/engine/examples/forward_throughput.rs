//! Forward-pass throughput of one model on this machine: prompt processing
//! in one chunk, and decode steps with 1, 8 and 32 sequences batched.
//!
//! `cargo run --release -p neocloud-engine --example forward_throughput -- MODEL.gguf`

use std::time::Instant;

use neocloud_engine::kernels::{matmul, QMatrix};
use neocloud_engine::kv_cache::KvCache;
use neocloud_engine::model::{BatchSequence, Model};
use neocloud_engine::panel::{ActivationPrecision, PanelMatrix};
use neocloud_engine::sampler::{Sampler, SamplingParams};

fn main() -> Result<(), String> {
    // As in the server, passes run on a worker of the kernels' pool.
    neocloud_engine::kernels::on_kernel_pool(|| measure().map_err(|e| e.to_string()))
}

/// The number an environment variable holds, if it holds one.
fn setting<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok()?.parse().ok()
}

fn measure() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .ok_or("usage: forward_throughput MODEL.gguf")?;
    let (mut model, gguf) = Model::open(std::path::Path::new(&path))?;
    // `NEOCLOUD_ACTIVATION_BITS=8` or `16` times the products with 8- or
    // 16-bit activations everywhere instead of the default mix.
    let precision = match std::env::var("NEOCLOUD_ACTIVATION_BITS").as_deref() {
        Ok("8") => ActivationPrecision::Eight,
        Ok("16") => ActivationPrecision::Sixteen,
        _ => ActivationPrecision::Mixed,
    };
    model.set_activation_precision(precision);
    // `NEOCLOUD_MATRICES` (comma-separated tensor names) picks the matrices
    // measured alone.
    let matrices = std::env::var("NEOCLOUD_MATRICES")
        .unwrap_or_else(|_| "token_embd.weight,blk.0.ffn_up.weight,blk.0.ffn_down.weight".into());
    // `NEOCLOUD_PRODUCT_ROWS` (comma-separated) picks the batch heights
    // those products are timed at, and `NEOCLOUD_PRODUCT_REPS` how often.
    let heights: Vec<usize> = std::env::var("NEOCLOUD_PRODUCT_ROWS")
        .unwrap_or_else(|_| "1,4,8,32,512".into())
        .split(',')
        .filter_map(|m| m.parse().ok())
        .collect();
    let product_reps: Option<usize> = setting("NEOCLOUD_PRODUCT_REPS");
    for name in matrices.split(',').filter(|n| !n.is_empty()) {
        let Some(t) = gguf.tensor(name) else { continue };
        let w = QMatrix {
            ty: t.ty,
            rows: t.rows(),
            cols: t.row_len(),
            bytes: gguf.tensor_bytes(t),
            panels: None,
        };
        let bits = if name.contains("ffn_down") {
            precision.feed_forward_down()
        } else {
            precision.elsewhere()
        };
        let packed = PanelMatrix::pack(&w).map(|p| PanelMatrix {
            activations: bits,
            ..p
        });
        let w = QMatrix {
            panels: packed.as_ref(),
            ..w
        };
        for &m in &heights {
            let x: Vec<f32> = (0..m * w.cols)
                .map(|i| ((i % 97) as f32 - 48.0) / 50.0)
                .collect();
            let mut out = vec![0f32; m * w.rows];
            matmul(&w, &x, m, &mut out);
            let reps = product_reps.unwrap_or(if m >= 32 { 3 } else { 10 });
            let start = Instant::now();
            for _ in 0..reps {
                matmul(&w, &x, m, &mut out);
            }
            let secs = start.elapsed().as_secs_f64() / reps as f64;
            println!(
                "{name} {:?} {}x{} m={m}: {:.2} ms, {:.1} GB/s of weights, {:.1} GMAC/s",
                w.ty,
                w.rows,
                w.cols,
                secs * 1e3,
                w.bytes.len() as f64 / secs / 1e9,
                (m * w.rows * w.cols) as f64 / secs / 1e9
            );
        }
    }
    // `NEOCLOUD_PRODUCTS_ONLY` stops after the products (for profiling them).
    if std::env::var_os("NEOCLOUD_PRODUCTS_ONLY").is_some() {
        return Ok(());
    }
    let vocab = model.config.vocab_size as u32;
    // `NEOCLOUD_PREFILL_TOKENS` sets the prompt length of the prefill line.
    let prefill: u32 = setting("NEOCLOUD_PREFILL_TOKENS").unwrap_or(512).max(64);
    let prompt: Vec<u32> = (0..prefill).map(|i| (i * 7919 + 13) % vocab).collect();

    // Greedy sampling of one token over the whole vocabulary, as each
    // decoding sequence does every step.
    let logits: Vec<f32> = (0..vocab)
        .map(|i| ((i * 7919) % 1000) as f32 / 100.0)
        .collect();
    let mut sampler = Sampler::new(SamplingParams::greedy(), &[]);
    let mut l = logits.clone();
    let start = Instant::now();
    for _ in 0..100 {
        l.copy_from_slice(&logits);
        std::hint::black_box(sampler.sample(&mut l));
    }
    println!(
        "greedy sampling: {:.2} ms per token",
        start.elapsed().as_secs_f64() * 10.0
    );

    let mut pool = model.kv_pool(1 << 30);
    let mut cache = KvCache::new();
    model.forward(&mut pool, &prompt[..64], &mut cache, 63)?;
    // `NEOCLOUD_PREFILL_REPS` repeats the prefill (for profiling it).
    let prefill_reps: u32 = setting("NEOCLOUD_PREFILL_REPS").unwrap_or(1).max(1);
    let start = Instant::now();
    for _ in 0..prefill_reps {
        pool.release(&mut cache);
        cache = KvCache::new();
        model.forward(&mut pool, &prompt, &mut cache, prompt.len() - 1)?;
    }
    let secs = start.elapsed().as_secs_f64() / f64::from(prefill_reps);
    println!(
        "prefill {prefill} tokens: {:.3} s, {:.0} tokens/s",
        secs,
        f64::from(prefill) / secs
    );

    // `forward_throughput MODEL STREAMS...` measures only those decode widths.
    let widths: Vec<usize> = std::env::args()
        .skip(2)
        .filter_map(|a| a.parse().ok())
        .collect();
    let widths = if widths.is_empty() {
        vec![1, 8, 32]
    } else {
        widths
    };
    // `NEOCLOUD_DECODE_CONTEXT` sets the positions each decoding sequence
    // already holds (32 unless set).
    let context: usize = setting("NEOCLOUD_DECODE_CONTEXT")
        .unwrap_or(32)
        .clamp(1, prompt.len() - 32);
    for streams in widths {
        let mut pool = model.kv_pool(1 << 30);
        let mut caches: Vec<KvCache> = (0..streams)
            .map(|s| {
                let mut c = KvCache::new();
                let p: Vec<u32> = prompt[s..s + context].to_vec();
                model.forward(&mut pool, &p, &mut c, context - 1).map(|_| c)
            })
            .collect::<Result<_, _>>()?;
        // `NEOCLOUD_DECODE_STEPS` sets how many steps are timed.
        let steps = setting("NEOCLOUD_DECODE_STEPS").unwrap_or(if streams == 1 { 64 } else { 16 });
        let mut tokens: Vec<u32> = (0..streams as u32).collect();
        let start = Instant::now();
        for _ in 0..steps {
            let singles: Vec<[u32; 1]> = tokens.iter().map(|&t| [t]).collect();
            let mut batch: Vec<BatchSequence<'_>> = singles
                .iter()
                .zip(caches.iter_mut())
                .map(|(t, cache)| BatchSequence {
                    tokens: t,
                    cache,
                    logits_from: 0,
                })
                .collect();
            let logits = model.forward_batch(&mut pool, &mut batch)?;
            for (t, row) in tokens.iter_mut().zip(logits.chunks_exact(vocab as usize)) {
                *t = row
                    .iter()
                    .enumerate()
                    .fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b })
                    .0 as u32;
            }
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "decode {streams:>2} streams: {:.1} ms/step, {:.0} tokens/s",
            secs * 1000.0 / steps as f64,
            (steps * streams) as f64 / secs
        );
    }
    Ok(())
}
