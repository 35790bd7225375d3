//! Dot products of quantised weight rows with integer-quantised activations.
//!
//! Decode multiplies every weight once per token, so expanding weights to
//! f32 costs more than the arithmetic. Here an activation row is quantised
//! once, in blocks of 32 int16 values with an f32 scale (16 bits keep the
//! activation error far below the weights' own, unlike ggml's 8-bit Q8_0),
//! and each weight block is unpacked to small integers and multiplied in
//! integer arithmetic; scales apply once per 16 values. Every weight type maps onto
//! one form, `w = a * q + b` per group of 16 values with integer `q`, so a
//! single integer loop serves them all.

use crate::quant::{f16_at, scale_min_k4, TensorType, QK, QK_K};

/// Values per activation block.
pub const ACT_BLOCK: usize = 32;
/// Largest quantised activation magnitude.
const ACT_MAX: f32 = 32767.0;

/// An activation row quantised to int16 blocks of 32.
#[derive(Debug, Default, Clone)]
pub struct QuantizedRow {
    /// Quantised values.
    pub q: Vec<i16>,
    /// Scale of each block of 32.
    pub d: Vec<f32>,
    /// Sum of the quantised values of each group of 16.
    pub sum16: Vec<i32>,
}

impl QuantizedRow {
    /// Quantises `x` (length a multiple of 32) into `self`, reusing its buffers.
    pub fn quantize(&mut self, x: &[f32]) {
        let blocks = x.len() / ACT_BLOCK;
        self.q.resize(blocks * ACT_BLOCK, 0);
        self.d.resize(blocks, 0.0);
        self.sum16.resize(blocks * 2, 0);
        for b in 0..blocks {
            let xs = &x[b * ACT_BLOCK..(b + 1) * ACT_BLOCK];
            let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / ACT_MAX;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            self.d[b] = d;
            let qs = &mut self.q[b * ACT_BLOCK..(b + 1) * ACT_BLOCK];
            for (q, v) in qs.iter_mut().zip(xs) {
                *q = (v * inv).round() as i16;
            }
            for h in 0..2 {
                self.sum16[b * 2 + h] = qs[h * 16..h * 16 + 16].iter().map(|&v| v as i32).sum();
            }
        }
    }
}

/// A weight block unpacked to integers: value `e` is `a[e/16] * q[e] + b[e/16]`.
struct Unpacked {
    q: [i8; QK_K],
    a: [f32; QK_K / 16],
    b: [f32; QK_K / 16],
}

/// Unpacks one block of `ty` (a quantised type). Returns the values it holds.
#[inline(always)]
fn unpack(ty: TensorType, blk: &[u8], u: &mut Unpacked) -> usize {
    match ty {
        TensorType::Q8_0 => {
            let d = f16_at(blk, 0);
            for j in 0..QK {
                u.q[j] = blk[2 + j] as i8;
            }
            u.a[..2].fill(d);
            u.b[..2].fill(0.0);
            QK
        }
        TensorType::Q4_0 => {
            let d = f16_at(blk, 0);
            let qs = &blk[2..18];
            for (j, &b) in qs.iter().enumerate() {
                u.q[j] = (b & 0x0f) as i8 - 8;
                u.q[j + 16] = (b >> 4) as i8 - 8;
            }
            u.a[..2].fill(d);
            u.b[..2].fill(0.0);
            QK
        }
        TensorType::Q5_0 => {
            let d = f16_at(blk, 0);
            let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
            let qs = &blk[6..22];
            for (j, &b) in qs.iter().enumerate() {
                let h0 = (((qh >> j) & 1) << 4) as u8;
                let h1 = (((qh >> (j + 16)) & 1) << 4) as u8;
                u.q[j] = ((b & 0x0f) | h0) as i8 - 16;
                u.q[j + 16] = ((b >> 4) | h1) as i8 - 16;
            }
            u.a[..2].fill(d);
            u.b[..2].fill(0.0);
            QK
        }
        TensorType::Q4K | TensorType::Q5K => {
            let d = f16_at(blk, 0);
            let dmin = f16_at(blk, 2);
            let scales = &blk[4..16];
            let (qh, qs) = if ty == TensorType::Q5K {
                (Some(&blk[16..48]), &blk[48..176])
            } else {
                (None, &blk[16..144])
            };
            for c in 0..4 {
                let ql = &qs[c * 32..c * 32 + 32];
                for l in 0..32 {
                    let (mut lo, mut hi) = (ql[l] & 0x0f, ql[l] >> 4);
                    if let Some(qh) = qh {
                        lo |= ((qh[l] >> (2 * c)) & 1) << 4;
                        hi |= ((qh[l] >> (2 * c + 1)) & 1) << 4;
                    }
                    u.q[c * 64 + l] = lo as i8;
                    u.q[c * 64 + 32 + l] = hi as i8;
                }
                for s in 0..2 {
                    let (sc, m) = scale_min_k4(2 * c + s, scales);
                    let (a, b) = (d * sc as f32, -dmin * m as f32);
                    let g = (2 * c + s) * 2;
                    u.a[g] = a;
                    u.a[g + 1] = a;
                    u.b[g] = b;
                    u.b[g + 1] = b;
                }
            }
            QK_K
        }
        TensorType::Q6K => {
            let d = f16_at(blk, 208);
            for h in 0..2 {
                let ql = &blk[h * 64..h * 64 + 64];
                let qh = &blk[128 + h * 32..128 + h * 32 + 32];
                let base = h * 128;
                for l in 0..32 {
                    u.q[base + l] = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i8 - 32;
                    u.q[base + 32 + l] =
                        ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
                    u.q[base + 64 + l] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
                    u.q[base + 96 + l] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
                }
            }
            for (i, a) in u.a.iter_mut().enumerate() {
                *a = d * (blk[192 + i] as i8) as f32;
            }
            u.b.fill(0.0);
            QK_K
        }
        // Float types never take this path (see `supports`).
        TensorType::F32 | TensorType::F16 | TensorType::BF16 => 0,
    }
}

/// Whether `ty` has an integer dot product here.
pub fn supports(ty: TensorType) -> bool {
    !matches!(ty, TensorType::F32 | TensorType::F16 | TensorType::BF16)
}

#[inline(always)]
fn dot16(w: &[i8], x: &[i16]) -> i32 {
    let mut s = 0i32;
    for k in 0..16 {
        s += w[k] as i32 * x[k] as i32;
    }
    s
}

/// Dot product of one weight row stored as `ty` with a quantised activation
/// row of the same length. `ty` must satisfy [`supports`].
#[inline(always)]
pub fn dot_row_q8(ty: TensorType, row: &[u8], x: &QuantizedRow) -> f32 {
    let mut u = Unpacked {
        q: [0; QK_K],
        a: [0.0; QK_K / 16],
        b: [0.0; QK_K / 16],
    };
    let bb = ty.block_bytes();
    let mut acc = 0f32;
    let mut e0 = 0usize;
    for blk in row.chunks_exact(bb) {
        let n = unpack(ty, blk, &mut u);
        if n == 0 {
            return 0.0;
        }
        for g in 0..n / 16 {
            let e = e0 + g * 16;
            let s = dot16(&u.q[g * 16..g * 16 + 16], &x.q[e..e + 16]);
            let dx = x.d[e / ACT_BLOCK];
            acc += dx * (u.a[g] * s as f32 + u.b[g] * x.sum16[e / 16] as f32);
        }
        e0 += n;
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::dequantize_row;
    use proptest::prelude::*;

    use crate::quant::test_blocks::{blocks, INTEGER_TYPES as TYPES};

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn integer_dot_matches_float_dot(
            ty_index in 0usize..TYPES.len(),
            raw in proptest::collection::vec(any::<u8>(), 2 * 210),
            s in 0.01f32..1.0,
            xs in proptest::collection::vec(-3.0f32..3.0, 2 * QK_K),
        ) {
            let ty = TYPES[ty_index];
            let n = 2 * ty.block_len().max(QK);
            let nblocks = n / ty.block_len();
            let bytes = blocks(ty, &raw, nblocks, s);
            let x = &xs[..n];
            let mut w = vec![0f32; n];
            dequantize_row(ty, &bytes, &mut w).unwrap();
            let mut qx = QuantizedRow::default();
            qx.quantize(x);
            // Against the same quantised activations the integer path is exact
            // up to float rounding.
            let xq: Vec<f32> = (0..n).map(|i| qx.q[i] as f32 * qx.d[i / ACT_BLOCK]).collect();
            let want: f64 = w.iter().zip(&xq).map(|(a, b)| *a as f64 * *b as f64).sum();
            let got = dot_row_q8(ty, &bytes, &qx) as f64;
            let scale: f64 = w.iter().zip(&xq).map(|(a, b)| (*a as f64 * *b as f64).abs()).sum::<f64>() + 1e-3;
            prop_assert!((got - want).abs() <= 1e-4 * scale, "{ty:?}: {got} vs {want}");
            // And close to the unquantised product.
            let exact: f64 = w.iter().zip(x).map(|(a, b)| *a as f64 * *b as f64).sum();
            prop_assert!((got - exact).abs() <= 1e-4 * scale + 1e-5, "{ty:?}: {got} vs exact {exact}");
            #[cfg(target_arch = "x86_64")]
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
                // SAFETY: AVX2, FMA and F16C were just detected.
                let simd = unsafe { crate::integer_dot_avx2::dot_row_q8(ty, &bytes, &qx) } as f64;
                prop_assert!((simd - got).abs() <= 1e-4 * scale, "{ty:?}: AVX2 {simd} vs portable {got}");
            }
        }
    }
}
