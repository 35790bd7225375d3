//! Causal attention over paged keys and values.
//!
//! The query heads of one row that read the same KV head (grouped-query
//! attention) go together, up to [`MAX_SHARED_HEADS`] at a time: every key
//! and value they read is loaded once for all of them. Keys are stored
//! transposed within their block ([`KvPool::key_block`]: 16 positions per
//! dimension), so one vector holds a dimension of 16 positions and the
//! scores of a block take one fused multiply-add per head and dimension,
//! with no horizontal sums. Two consecutive rows of one sequence (a prompt
//! being prefilled) may go together too: their ranges differ by one
//! position at either end, and each head's probabilities are zero outside
//! its own range. Each head's arithmetic is the same whichever heads go
//! with it and whatever the batch (a zero weight adds nothing to a sum),
//! so results stay batch-invariant. Keys and values are read as the pool
//! stores them (f16) and widened to f32 as they are loaded.

use crate::kernels::{exp_below_in_place, max_f32};
use crate::kv_cache::{KvPool, KV_BLOCK_POSITIONS};
use crate::quant::f16_row_to_f32;

/// Query heads that share one pass over a KV head's keys and values.
pub const MAX_SHARED_HEADS: usize = 8;

/// Values per chunk of the weighted sum of values (two 16-float vectors).
const VALUE_CHUNK: usize = 32;

/// Keys or values the portable loops widen from f16 in one call (16
/// dimensions of a key block).
const WIDEN_AT_ONCE: usize = 16 * KV_BLOCK_POSITIONS;

/// Query heads that see the same positions.
#[derive(Debug, Clone, Copy)]
pub struct HeadSpan {
    /// How many heads (consecutive in the call's queries).
    pub heads: usize,
    /// First position seen (after a sliding window).
    pub start: usize,
    /// Last position seen (the row's own).
    pub end: usize,
}

/// One attention call: query heads of one sequence that read KV head
/// `kv_head`.
#[derive(Debug, Clone, Copy)]
pub struct SharedHeads<'a> {
    /// The pool holding the sequence's keys and values.
    pub pool: &'a KvPool,
    /// The sequence's block table for this layer.
    pub table: &'a [u32],
    /// The KV head the query heads read.
    pub kv_head: usize,
    /// Width of a key head.
    pub head_dim: usize,
    /// Width of a value head.
    pub value_dim: usize,
    /// Factor applied to every score.
    pub scale: f32,
}

thread_local! {
    /// Scores of the heads being computed, reused across calls on each thread.
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Floats of score buffer that any call over a context of `context`
/// positions needs.
fn score_room(context: usize) -> usize {
    MAX_SHARED_HEADS * (context + 2 * KV_BLOCK_POSITIONS)
}

/// Sizes the score buffer of every thread of the current pool for
/// sequences of up to `context` positions, so that no later pass
/// allocates one, whichever thread its attention lands on.
pub fn reserve_thread_buffers(context: usize) {
    rayon::broadcast(|_| {
        SCORES.with(|cell| {
            let mut scores = cell.take();
            scores.reserve(score_room(context));
            cell.replace(scores);
        })
    });
}

impl SharedHeads<'_> {
    /// The attention output of `queries` (heads of `head_dim`, one after
    /// another, at most [`MAX_SHARED_HEADS`], seeing the positions `spans`
    /// give them in order) into `out` (heads of `value_dim`). The score
    /// buffer is this thread's, sized by [`reserve_thread_buffers`].
    pub fn attend(&self, queries: &[f32], spans: &[HeadSpan], out: &mut [f32]) {
        let heads = queries.len() / self.head_dim;
        assert!(heads <= MAX_SHARED_HEADS && out.len() == heads * self.value_dim);
        assert!(spans.iter().map(|s| s.heads).sum::<usize>() == heads);
        assert!(spans.iter().all(|s| s.start <= s.end));
        let (Some(start), Some(end)) = (
            spans.iter().map(|s| s.start).min(),
            spans.iter().map(|s| s.end).max(),
        ) else {
            return;
        };
        let first_block = start / KV_BLOCK_POSITIONS;
        let blocks = end / KV_BLOCK_POSITIONS + 1 - first_block;
        let stride = blocks * KV_BLOCK_POSITIONS;
        let first = first_block * KV_BLOCK_POSITIONS;
        // Taken out of its cell, as the kernels' buffers are: nothing here
        // nests another call on this thread, but a steal could.
        let mut scores = SCORES.with(|cell| cell.take());
        scores.clear();
        scores.resize(heads * stride, 0.0);
        for b in 0..blocks {
            // The next block, asked for while this one's scores are summed:
            // its keys for the next pass, its values for the weighted sum.
            let next = match b + 1 < blocks {
                true => self.pool.block(self.table, first_block + b + 1),
                false => &[],
            };
            let keys = self.pool.key_block(self.table, first_block + b);
            let keys = &keys[self.kv_head * self.head_dim * KV_BLOCK_POSITIONS..]
                [..self.head_dim * KV_BLOCK_POSITIONS];
            let block = ScoreBlock {
                keys,
                queries,
                head_dim: self.head_dim,
                heads,
                stride,
                b,
                next,
            };
            block_scores(&block, &mut scores);
        }
        // Softmax of each head over its own positions, as probabilities;
        // zero at the positions only other heads see.
        let mut h = 0;
        for span in spans {
            for _ in 0..span.heads {
                let row = &mut scores[h * stride..][start - first..=end - first];
                let (own, after) = row.split_at_mut(span.end - start + 1);
                after.fill(0.0);
                let (before, own) = own.split_at_mut(span.start - start);
                before.fill(0.0);
                own.iter_mut().for_each(|s| *s *= self.scale);
                let max = max_f32(own);
                let sum = exp_below_in_place(own, max);
                own.iter_mut().for_each(|s| *s /= sum);
                h += 1;
            }
        }
        let probabilities = Probabilities {
            scores: &scores,
            stride,
            first,
            start,
            end,
        };
        weighted_values(self, &probabilities, heads, out);
        SCORES.with(|cell| cell.replace(scores));
    }
}

/// Each head's probabilities: row `h` of `scores` (rows of `stride`) holds
/// positions from `first`; those from `start` to `end` are summed.
struct Probabilities<'a> {
    scores: &'a [f32],
    stride: usize,
    first: usize,
    start: usize,
    end: usize,
}

impl Probabilities<'_> {
    #[inline(always)]
    fn of(&self, head: usize, position: usize) -> f32 {
        self.scores[head * self.stride + position - self.first]
    }
}

/// `heads` queries (heads of `head_dim`, one after another) against the
/// 16 positions of one block of transposed keys, whose scores go to column
/// block `b` of rows of `stride`.
struct ScoreBlock<'a> {
    keys: &'a [u16],
    queries: &'a [f32],
    head_dim: usize,
    heads: usize,
    stride: usize,
    b: usize,
    /// Memory to ask the caches for meanwhile (no more than the block).
    next: &'a [u16],
}

/// The scores of `block` into `scores`.
fn block_scores(block: &ScoreBlock<'_>, scores: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::panel_avx512::available() {
            // SAFETY: AVX-512 F was detected (with the panel product's features).
            unsafe { block_scores_avx512(block, scores) };
            return;
        }
        if crate::kernels::simd_level() == crate::kernels::SimdLevel::Avx2 {
            // SAFETY: AVX2 and FMA were detected.
            unsafe { block_scores_avx2(block, scores) };
            return;
        }
    }
    block_scores_portable(block, scores);
}

/// The portable scores, compiled with AVX2 and FMA.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_scores_avx2(block: &ScoreBlock<'_>, scores: &mut [f32]) {
    block_scores_portable(block, scores)
}

#[inline(always)]
fn block_scores_portable(block: &ScoreBlock<'_>, scores: &mut [f32]) {
    let (hd, heads, stride, b) = (block.head_dim, block.heads, block.stride, block.b);
    let mut acc = [[0f32; KV_BLOCK_POSITIONS]; MAX_SHARED_HEADS];
    let mut widened = [0f32; WIDEN_AT_ONCE];
    let keys = &block.keys[..hd * KV_BLOCK_POSITIONS];
    for (c, chunk) in keys.chunks(WIDEN_AT_ONCE).enumerate() {
        let widened = &mut widened[..chunk.len()];
        f16_row_to_f32(chunk, widened);
        for (i, k) in widened.chunks_exact(KV_BLOCK_POSITIONS).enumerate() {
            let d = c * (WIDEN_AT_ONCE / KV_BLOCK_POSITIONS) + i;
            for (h, acc) in acc.iter_mut().enumerate().take(heads) {
                let qd = block.queries[h * hd + d];
                for (a, &kd) in acc.iter_mut().zip(k) {
                    *a += qd * kd;
                }
            }
        }
    }
    for (h, acc) in acc.iter().enumerate().take(heads) {
        scores[h * stride + b * KV_BLOCK_POSITIONS..][..KV_BLOCK_POSITIONS].copy_from_slice(acc);
    }
}

/// [`block_scores`] with AVX-512: up to eight heads' 16 scores stay in
/// registers while each key dimension is loaded once.
///
/// # Safety
/// The CPU must support AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn block_scores_avx512(block: &ScoreBlock<'_>, scores: &mut [f32]) {
    use std::arch::x86_64::*;
    let (keys, queries) = (block.keys, block.queries);
    let (head_dim, heads, stride, b) = (block.head_dim, block.heads, block.stride, block.b);
    assert!(heads <= MAX_SHARED_HEADS);
    assert!(keys.len() >= head_dim * KV_BLOCK_POSITIONS && queries.len() >= heads * head_dim);
    assert!(scores.len() >= (heads.max(1) - 1) * stride + (b + 1) * KV_BLOCK_POSITIONS);
    let mut acc = [_mm512_setzero_ps(); MAX_SHARED_HEADS];
    // Cache lines (32 halves) of the next block asked for per dimension.
    const LINE: usize = 32;
    let lines = block.next.len().div_ceil(LINE);
    let lines_per_dim = lines.div_ceil(head_dim);
    for d in 0..head_dim {
        for line in d * lines_per_dim..lines.min((d + 1) * lines_per_dim) {
            // Never faults, wherever it points.
            _mm_prefetch::<_MM_HINT_T1>(block.next.as_ptr().wrapping_add(line * LINE).cast());
        }
        // SAFETY: the assertions bound both loads.
        unsafe {
            let k = _mm512_cvtph_ps(_mm256_loadu_si256(
                keys.as_ptr().add(d * KV_BLOCK_POSITIONS).cast(),
            ));
            for (h, a) in acc.iter_mut().enumerate().take(heads) {
                let q = _mm512_set1_ps(*queries.get_unchecked(h * head_dim + d));
                *a = _mm512_fmadd_ps(q, k, *a);
            }
        }
    }
    for (h, a) in acc.iter().enumerate().take(heads) {
        // SAFETY: in bounds by the assertion on `scores`.
        unsafe {
            _mm512_storeu_ps(
                scores.as_mut_ptr().add(h * stride + b * KV_BLOCK_POSITIONS),
                *a,
            )
        };
    }
}

/// `out[h] = sum over the call's positions p of probability(h, p) *
/// value(p)`, positions in order.
fn weighted_values(call: &SharedHeads<'_>, p: &Probabilities<'_>, heads: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::panel_avx512::available() && call.value_dim.is_multiple_of(VALUE_CHUNK) {
            // SAFETY: AVX-512 F was detected (with the panel product's features).
            unsafe { weighted_values_avx512(call, p, heads, out) };
            return;
        }
        if crate::kernels::simd_level() == crate::kernels::SimdLevel::Avx2 {
            // SAFETY: AVX2 and FMA were detected.
            unsafe { weighted_values_avx2(call, p, heads, out) };
            return;
        }
    }
    weighted_values_portable(call, p, heads, out);
}

/// The value rows of one call's KV head.
#[inline(always)]
fn value_row<'a>(call: &SharedHeads<'a>, position: usize) -> &'a [u16] {
    &call.pool.values(call.table, position)[call.kv_head * call.value_dim..][..call.value_dim]
}

/// The portable weighted sum, compiled with AVX2 and FMA.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn weighted_values_avx2(
    call: &SharedHeads<'_>,
    p: &Probabilities<'_>,
    heads: usize,
    out: &mut [f32],
) {
    weighted_values_portable(call, p, heads, out)
}

#[inline(always)]
fn weighted_values_portable(
    call: &SharedHeads<'_>,
    p: &Probabilities<'_>,
    heads: usize,
    out: &mut [f32],
) {
    let vd = call.value_dim;
    out.iter_mut().for_each(|o| *o = 0.0);
    let mut widened = [0f32; WIDEN_AT_ONCE];
    for position in p.start..=p.end {
        for (c, chunk) in value_row(call, position).chunks(WIDEN_AT_ONCE).enumerate() {
            let v = &mut widened[..chunk.len()];
            f16_row_to_f32(chunk, v);
            for h in 0..heads {
                let w = p.of(h, position);
                let o = &mut out[h * vd + c * WIDEN_AT_ONCE..][..v.len()];
                for (o, &x) in o.iter_mut().zip(v.iter()) {
                    *o += w * x;
                }
            }
        }
    }
}

/// [`weighted_values`] with AVX-512: per chunk of 32 values, every head's
/// sums stay in registers over all positions.
///
/// # Safety
/// The CPU must support AVX-512 F; the value width must be a multiple of 32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn weighted_values_avx512(
    call: &SharedHeads<'_>,
    p: &Probabilities<'_>,
    heads: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let vd = call.value_dim;
    assert!(heads <= MAX_SHARED_HEADS && out.len() >= heads * vd && vd.is_multiple_of(VALUE_CHUNK));
    assert!(p.start >= p.first && p.start <= p.end);
    assert!(p.scores.len() >= (heads.max(1) - 1) * p.stride + p.end + 1 - p.first);
    let width = call.pool.value_width();
    let (first_block, last_block) = (p.start / KV_BLOCK_POSITIONS, p.end / KV_BLOCK_POSITIONS);
    for chunk in (0..vd).step_by(VALUE_CHUNK) {
        let mut acc = [[_mm512_setzero_ps(); 2]; MAX_SHARED_HEADS];
        for b in first_block..=last_block {
            let block = call.pool.value_block(call.table, b);
            let head = call.kv_head * vd + chunk;
            assert!(head + VALUE_CHUNK <= width && block.len() == KV_BLOCK_POSITIONS * width);
            let from = p.start.max(b * KV_BLOCK_POSITIONS);
            let to = p.end.min(b * KV_BLOCK_POSITIONS + KV_BLOCK_POSITIONS - 1);
            for position in from..=to {
                // SAFETY: the position is in the block and the chunk in
                // the row (asserted); the probability's index is within
                // `scores` by the assertions at the top.
                unsafe {
                    let v = block
                        .as_ptr()
                        .add((position - b * KV_BLOCK_POSITIONS) * width + head);
                    let v0 = _mm512_cvtph_ps(_mm256_loadu_si256(v.cast()));
                    let v1 = _mm512_cvtph_ps(_mm256_loadu_si256(v.add(16).cast()));
                    for (h, a) in acc.iter_mut().enumerate().take(heads) {
                        let w = *p.scores.get_unchecked(h * p.stride + position - p.first);
                        let w = _mm512_set1_ps(w);
                        a[0] = _mm512_fmadd_ps(w, v0, a[0]);
                        a[1] = _mm512_fmadd_ps(w, v1, a[1]);
                    }
                }
            }
        }
        for (h, a) in acc.iter().enumerate().take(heads) {
            let o = &mut out[h * vd + chunk..][..VALUE_CHUNK];
            // SAFETY: `o` holds 32 floats.
            unsafe {
                _mm512_storeu_ps(o.as_mut_ptr(), a[0]);
                _mm512_storeu_ps(o.as_mut_ptr().add(16), a[1]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    // Test code: failing loudly is the point.
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use crate::kv_cache::KvCache;
    use crate::model::{Activation, Architecture, ModelConfig, RopeStyle};
    use crate::quant::{f16_to_f32, f32_to_f16};

    const HEAD_DIM: usize = 64;
    const KV_HEADS: usize = 2;
    const POSITIONS: usize = 45;

    fn config() -> ModelConfig {
        ModelConfig {
            architecture: Architecture::Llama,
            n_layers: 1,
            d_model: 4 * HEAD_DIM,
            n_heads: 4,
            n_kv_heads: KV_HEADS,
            head_dim: HEAD_DIM,
            value_dim: HEAD_DIM,
            ffn_dim: 64,
            vocab_size: 8,
            rms_eps: 1e-6,
            rope_base: 1e4,
            rope_base_sliding: 1e4,
            rope_dims: HEAD_DIM,
            rope_style: RopeStyle::Neox,
            sliding_window: None,
            layer_sliding: vec![false],
            embedding_scale: None,
            attention_scale: 0.125,
            activation: Activation::Silu,
            context_length: 128,
        }
    }

    /// Deterministic values in [-2, 2).
    fn values(seed: u64, n: usize) -> Vec<f32> {
        neocloud_testkit::pseudo_random(seed, n, -2.0, 2.0)
    }

    fn half(x: f32) -> f64 {
        f16_to_f32(f32_to_f16(x)) as f64
    }

    #[test]
    fn attention_over_half_precision_keys_and_values_matches_a_plain_softmax() {
        let c = config();
        let width = KV_HEADS * HEAD_DIM;
        let (keys, vals) = (values(1, POSITIONS * width), values(2, POSITIONS * width));
        let mut pool = KvPool::new(&c, 1 << 20, false);
        let mut cache = KvCache::new();
        pool.grow(&mut cache, POSITIONS).unwrap();
        let table = cache.table(0).to_vec();
        pool.write(&table, 0, &keys, &vals);
        // Two heads on KV head 1, seeing different ranges.
        let spans = [
            HeadSpan {
                heads: 1,
                start: 3,
                end: 37,
            },
            HeadSpan {
                heads: 1,
                start: 0,
                end: POSITIONS - 1,
            },
        ];
        let queries = values(3, 2 * HEAD_DIM);
        let call = SharedHeads {
            pool: &pool,
            table: &table,
            kv_head: 1,
            head_dim: HEAD_DIM,
            value_dim: HEAD_DIM,
            scale: c.attention_scale,
        };
        let mut out = vec![0f32; 2 * HEAD_DIM];
        call.attend(&queries, &spans, &mut out);
        for (h, span) in spans.iter().enumerate() {
            let q = &queries[h * HEAD_DIM..(h + 1) * HEAD_DIM];
            let at = |p: usize, d: usize| p * width + HEAD_DIM + d;
            let scores: Vec<f64> = (span.start..=span.end)
                .map(|p| {
                    (0..HEAD_DIM)
                        .map(|d| q[d] as f64 * half(keys[at(p, d)]))
                        .sum::<f64>()
                        * c.attention_scale as f64
                })
                .collect();
            let max = scores.iter().copied().fold(f64::MIN, f64::max);
            let total: f64 = scores.iter().map(|s| (s - max).exp()).sum();
            for d in 0..HEAD_DIM {
                let want: f64 = (span.start..=span.end)
                    .zip(&scores)
                    .map(|(p, s)| (s - max).exp() / total * half(vals[at(p, d)]))
                    .sum();
                let got = out[h * HEAD_DIM + d] as f64;
                assert!(
                    (got - want).abs() < 1e-4,
                    "head {h} dim {d}: {got} vs {want}"
                );
            }
        }
        // The vector kernels give the portable loops' numbers.
        let stride = 3 * KV_BLOCK_POSITIONS;
        let mut simd = vec![0f32; 2 * stride];
        let mut portable = simd.clone();
        for b in 0..3 {
            let keys = &pool.key_block(&table, b)[HEAD_DIM * KV_BLOCK_POSITIONS..];
            let block = ScoreBlock {
                keys,
                queries: &queries,
                head_dim: HEAD_DIM,
                heads: 2,
                stride,
                b,
                next: pool.block(&table, (b + 1) % 3),
            };
            block_scores(&block, &mut simd);
            block_scores_portable(&block, &mut portable);
        }
        for (a, b) in simd.iter().zip(&portable) {
            assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
        }
        let probabilities = Probabilities {
            scores: &portable,
            stride,
            first: 0,
            start: 0,
            end: POSITIONS - 1,
        };
        let (mut simd, mut portable) = (vec![0f32; 2 * HEAD_DIM], vec![0f32; 2 * HEAD_DIM]);
        weighted_values(&call, &probabilities, 2, &mut simd);
        weighted_values_portable(&call, &probabilities, 2, &mut portable);
        for (a, b) in simd.iter().zip(&portable) {
            assert!((a - b).abs() < 1e-3 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }
}
