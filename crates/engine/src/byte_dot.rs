//! Matrix products of byte-unpacked weights, for CPUs with AVX-512 VNNI.
//!
//! An activation row is quantised once per product to int16 in blocks of
//! 32 with an f32 scale. Each weight row is
//! unpacked once into a common form, unsigned bytes `u` with an f32 pair
//! `(a, b)` per lane of four values, the value being `a * u - b`; every
//! weight type maps onto it. The inner loop is then the same for all types:
//! two `vpdpwssd` sum the four products of each lane, and per 64 values a
//! row costs six vector instructions. Weight rows are unpacked once for every
//! activation row of the product, so batched rows share the weight reads
//! and the unpacking, while each row's arithmetic stays its own: a row's
//! result does not depend on the batch it is in.

use crate::integer_dot::ACT_BLOCK;
use crate::quant::{f16_at, scale_min_k4, TensorType, QK_K};

/// Values per lane of the unpacked form (one `vpdpbusd` lane).
pub const LANE: usize = 4;
/// Values per step of the inner loop (one 512-bit register of bytes).
pub const STEP: usize = 64;

/// Largest quantised activation magnitude (16 bits keep the activations'
/// rounding far below the weights' own).
const ACT_MAX: f32 = 32767.0;

/// An activation row quantised to int16 in blocks of 32, stored in the
/// order `vpdpwssd` pairs it with the weight bytes: in each step of 64
/// values, first values `4j, 4j + 1` for each lane `j`, then values
/// `4j + 2, 4j + 3`.
#[derive(Debug, Default, Clone)]
pub struct ActivationRow {
    /// Quantised values, in pairing order.
    pub q: Vec<i16>,
    /// Per lane of four values: the scale of its block of 32.
    pub scale: Vec<f32>,
    /// Per lane: the scale times the sum of its four quantised values.
    pub scaled_sum: Vec<f32>,
}

/// Where value `e` of a row sits in [`ActivationRow::q`].
#[inline]
pub fn paired_index(e: usize) -> usize {
    let (step, within) = (e / STEP, e % STEP);
    let (lane, t) = (within / LANE, within % LANE);
    step * STEP + (t / 2) * (STEP / 2) + lane * 2 + t % 2
}

impl ActivationRow {
    /// Quantises `x` (length a multiple of 64) into `self`, reusing its buffers.
    pub fn quantize(&mut self, x: &[f32]) {
        let lanes = x.len() / LANE;
        self.q.resize(x.len(), 0);
        self.scale.resize(lanes, 0.0);
        self.scaled_sum.resize(lanes, 0.0);
        for (b, xs) in x.chunks_exact(ACT_BLOCK).enumerate() {
            let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / ACT_MAX;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            for l in 0..ACT_BLOCK / LANE {
                let lane = b * ACT_BLOCK / LANE + l;
                let mut sum = 0i32;
                for t in 0..LANE {
                    let e = lane * LANE + t;
                    let q = (xs[l * LANE + t] * inv).round() as i16;
                    self.q[paired_index(e)] = q;
                    sum += q as i32;
                }
                self.scale[lane] = d;
                self.scaled_sum[lane] = d * sum as f32;
            }
        }
    }

    /// Quantised value `e` of the row.
    pub fn value(&self, e: usize) -> i16 {
        self.q[paired_index(e)]
    }
}

/// A weight row in the common unpacked form.
#[derive(Debug, Default, Clone)]
pub struct UnpackedRow {
    /// Unsigned bytes.
    pub u: Vec<u8>,
    /// Per lane: the multiplier `a`.
    pub a: Vec<f32>,
    /// Per lane: the offset `b` subtracted from each value.
    pub b: Vec<f32>,
}

/// Whether a row of `cols` values stored as `ty` has a byte product here.
pub fn supports(ty: TensorType, cols: usize) -> bool {
    crate::integer_dot::supports(ty) && cols.is_multiple_of(STEP)
}

impl UnpackedRow {
    /// Unpacks one weight row of `ty` (see [`supports`]) holding `cols` values.
    pub fn unpack(&mut self, ty: TensorType, row: &[u8], cols: usize) {
        self.u.resize(cols, 0);
        self.a.resize(cols / LANE, 0.0);
        self.b.resize(cols / LANE, 0.0);
        let bb = ty.block_bytes();
        match ty {
            TensorType::Q8_0 | TensorType::Q4_0 | TensorType::Q5_0 => {
                for (i, blk) in row.chunks_exact(bb).enumerate() {
                    let u = &mut self.u[i * 32..(i + 1) * 32];
                    let d = f16_at(blk, 0);
                    let zero = match ty {
                        TensorType::Q8_0 => {
                            for (o, &q) in u.iter_mut().zip(&blk[2..34]) {
                                *o = q ^ 0x80;
                            }
                            128.0
                        }
                        TensorType::Q4_0 => {
                            for (j, &q) in blk[2..18].iter().enumerate() {
                                u[j] = q & 0x0f;
                                u[j + 16] = q >> 4;
                            }
                            8.0
                        }
                        _ => {
                            let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
                            for (j, &q) in blk[6..22].iter().enumerate() {
                                u[j] = (q & 0x0f) | ((((qh >> j) & 1) << 4) as u8);
                                u[j + 16] = (q >> 4) | ((((qh >> (j + 16)) & 1) << 4) as u8);
                            }
                            16.0
                        }
                    };
                    self.a[i * 8..(i + 1) * 8].fill(d);
                    self.b[i * 8..(i + 1) * 8].fill(d * zero);
                }
            }
            TensorType::Q4K | TensorType::Q5K => {
                for (i, blk) in row.chunks_exact(bb).enumerate() {
                    let d = f16_at(blk, 0);
                    let dmin = f16_at(blk, 2);
                    let scales = &blk[4..16];
                    let (qh, qs) = if ty == TensorType::Q5K {
                        (Some(&blk[16..48]), &blk[48..176])
                    } else {
                        (None, &blk[16..144])
                    };
                    let u = &mut self.u[i * QK_K..(i + 1) * QK_K];
                    for c in 0..4 {
                        for l in 0..32 {
                            let (mut lo, mut hi) = (qs[c * 32 + l] & 0x0f, qs[c * 32 + l] >> 4);
                            if let Some(qh) = qh {
                                lo |= ((qh[l] >> (2 * c)) & 1) << 4;
                                hi |= ((qh[l] >> (2 * c + 1)) & 1) << 4;
                            }
                            u[c * 64 + l] = lo;
                            u[c * 64 + 32 + l] = hi;
                        }
                    }
                    for s in 0..8 {
                        let (sc, m) = scale_min_k4(s, scales);
                        let lanes = i * QK_K / LANE + s * 8..i * QK_K / LANE + (s + 1) * 8;
                        self.a[lanes.clone()].fill(d * sc as f32);
                        self.b[lanes].fill(dmin * m as f32);
                    }
                }
            }
            TensorType::Q6K => {
                for (i, blk) in row.chunks_exact(bb).enumerate() {
                    let d = f16_at(blk, 208);
                    let u = &mut self.u[i * QK_K..(i + 1) * QK_K];
                    for h in 0..2 {
                        let ql = &blk[h * 64..h * 64 + 64];
                        let qh = &blk[128 + h * 32..128 + h * 32 + 32];
                        let base = h * 128;
                        for l in 0..32 {
                            u[base + l] = (ql[l] & 0x0f) | ((qh[l] & 3) << 4);
                            u[base + 32 + l] = (ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4);
                            u[base + 64 + l] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
                            u[base + 96 + l] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
                        }
                    }
                    for g in 0..16 {
                        let a = d * (blk[192 + g] as i8) as f32;
                        let lanes = i * QK_K / LANE + g * 4..i * QK_K / LANE + (g + 1) * 4;
                        self.a[lanes.clone()].fill(a);
                        self.b[lanes].fill(32.0 * a);
                    }
                }
            }
            TensorType::F32 | TensorType::F16 | TensorType::BF16 => {}
        }
    }
}

/// The portable form of the product of an unpacked weight row with an
/// activation row: the reference for the vector code.
pub fn dot_portable(w: &UnpackedRow, x: &ActivationRow) -> f32 {
    let mut acc = 0f32;
    for (l, u) in w.u.chunks_exact(LANE).enumerate() {
        let s: i32 = (0..LANE)
            .map(|t| u[t] as i32 * x.value(l * LANE + t) as i32)
            .sum();
        acc += w.a[l] * x.scale[l] * s as f32 - w.b[l] * x.scaled_sum[l];
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
        fn byte_products_match_float_products(
            ty_index in 0usize..TYPES.len(),
            raw in proptest::collection::vec(any::<u8>(), 2 * 210),
            s in 0.01f32..1.0,
            xs in proptest::collection::vec(-3.0f32..3.0, 2 * QK_K),
        ) {
            let ty = TYPES[ty_index];
            let n = 2 * QK_K;
            let nblocks = n / ty.block_len();
            let bytes = blocks(ty, &raw, nblocks, s);
            let x = &xs[..n];
            let mut w = vec![0f32; n];
            dequantize_row(ty, &bytes, &mut w).unwrap();
            let mut unpacked = UnpackedRow::default();
            unpacked.unpack(ty, &bytes, n);
            // The unpacked form holds the same values.
            for (e, want) in w.iter().enumerate() {
                let got = unpacked.a[e / LANE] * unpacked.u[e] as f32 - unpacked.b[e / LANE];
                prop_assert!((got - want).abs() <= 1e-3 * (1.0 + want.abs()), "{ty:?} value {e}: {got} vs {want}");
            }
            let mut qx = ActivationRow::default();
            qx.quantize(x);
            let xq: Vec<f32> = (0..n).map(|i| qx.value(i) as f32 * qx.scale[i / LANE]).collect();
            let want: f64 = w.iter().zip(&xq).map(|(a, b)| *a as f64 * *b as f64).sum();
            let scale: f64 = w.iter().zip(&xq).map(|(a, b)| (*a as f64 * *b as f64).abs()).sum::<f64>() + 1e-3;
            let got = dot_portable(&unpacked, &qx) as f64;
            prop_assert!((got - want).abs() <= 1e-4 * scale, "{ty:?}: {got} vs {want}");
            #[cfg(target_arch = "x86_64")]
            if crate::byte_dot_avx512::available() {
                let mut out = [0f32; 5];
                let rows = [&qx, &qx, &qx, &qx, &qx];
                // SAFETY: the features were just detected.
                unsafe { crate::byte_dot_avx512::dot_rows(&unpacked, &rows, &mut out) };
                for o in out {
                    prop_assert!((o as f64 - got).abs() <= 1e-4 * scale, "{ty:?}: AVX-512 {o} vs portable {got}");
                }
            }
        }
    }
}
