//! The common unpacked form of every quantised weight type: unsigned bytes
//! `u` with a multiplier `a` and an offset `b` per lane of four values, the
//! value being `a * u - b`. Panels ([`crate::panel`]) are built from it.

use crate::quant::{f16_at, scale_min_k4, TensorType, QK_K};

/// Values per lane of the unpacked form (one 32-bit lane of bytes).
pub const LANE: usize = 4;
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

impl UnpackedRow {
    /// Unpacks one weight row of `ty` (a quantised type) holding `cols`
    /// values (a multiple of its block length).
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::dequantize_row;
    use crate::quant::test_blocks::{blocks, INTEGER_TYPES as TYPES};
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn unpacked_rows_hold_the_dequantised_values(
            ty_index in 0usize..TYPES.len(),
            raw in proptest::collection::vec(any::<u8>(), 2 * 210),
            s in 0.01f32..1.0,
        ) {
            let ty = TYPES[ty_index];
            let n = 2 * QK_K;
            let bytes = blocks(ty, &raw, n / ty.block_len(), s);
            let mut w = vec![0f32; n];
            dequantize_row(ty, &bytes, &mut w).unwrap();
            let mut unpacked = UnpackedRow::default();
            unpacked.unpack(ty, &bytes, n);
            for (e, want) in w.iter().enumerate() {
                let got = unpacked.a[e / LANE] * unpacked.u[e] as f32 - unpacked.b[e / LANE];
                prop_assert!((got - want).abs() <= 1e-3 * (1.0 + want.abs()), "{ty:?} value {e}: {got} vs {want}");
            }
        }
    }
}
