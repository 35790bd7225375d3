//! Vector versions of [`crate::unpacked`] (256-bit shuffles), and the
//! detection of the AVX-512 VNNI instructions the panel product needs.

use std::arch::x86_64::*;

use crate::integer_dot_avx2::{bits_to_bytes, f16_fast, load32, nibbles_16, q45k_pair, q6k_groups};
use crate::quant::{scale_min_k4, TensorType, QK_K};
use crate::unpacked::{UnpackedRow, LANE};

#[inline]
#[target_feature(enable = "avx2")]
fn store32(out: &mut [u8], v: __m256i) {
    assert!(out.len() >= 32);
    // SAFETY: the assertion guarantees 32 writable bytes.
    unsafe { _mm256_storeu_si256(out.as_mut_ptr().cast(), v) }
}

/// Writes `a` and `b` into the eight lanes of one block of 32 values.
#[inline]
#[target_feature(enable = "avx2")]
fn fill8(out_a: &mut [f32], out_b: &mut [f32], a: f32, b: f32) {
    assert!(out_a.len() >= 8 && out_b.len() >= 8);
    // SAFETY: the assertion guarantees eight writable floats in each.
    unsafe {
        _mm256_storeu_ps(out_a.as_mut_ptr(), _mm256_set1_ps(a));
        _mm256_storeu_ps(out_b.as_mut_ptr(), _mm256_set1_ps(b));
    }
}

/// [`UnpackedRow::unpack`] with vector instructions; the same result.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn unpack(w: &mut UnpackedRow, ty: TensorType, row: &[u8], cols: usize) {
    w.u.resize(cols, 0);
    w.a.resize(cols / LANE, 0.0);
    w.b.resize(cols / LANE, 0.0);
    let bb = ty.block_bytes();
    match ty {
        TensorType::Q8_0 | TensorType::Q4_0 | TensorType::Q5_0 => {
            for (i, blk) in row.chunks_exact(bb).enumerate() {
                let (u, zero) = match ty {
                    TensorType::Q8_0 => (
                        _mm256_xor_si256(load32(&blk[2..]), _mm256_set1_epi8(0x80u8 as i8)),
                        128.0,
                    ),
                    TensorType::Q4_0 => (nibbles_16(&blk[2..]), 8.0),
                    _ => {
                        let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
                        let high = _mm256_and_si256(bits_to_bytes(qh), _mm256_set1_epi8(0x10));
                        (_mm256_or_si256(nibbles_16(&blk[6..]), high), 16.0)
                    }
                };
                store32(&mut w.u[i * 32..], u);
                let d = f16_fast(blk, 0);
                fill8(&mut w.a[i * 8..], &mut w.b[i * 8..], d, d * zero);
            }
        }
        TensorType::Q4K | TensorType::Q5K => {
            let five = ty == TensorType::Q5K;
            for (i, blk) in row.chunks_exact(bb).enumerate() {
                let d = f16_fast(blk, 0);
                let dmin = f16_fast(blk, 2);
                let scales = &blk[4..16];
                let (qs, qh) = if five {
                    (&blk[48..176], Some(load32(&blk[16..48])))
                } else {
                    (&blk[16..144], None)
                };
                for c in 0..4 {
                    let (lo, hi) = q45k_pair(qs, qh, c);
                    let base = i * QK_K + c * 64;
                    store32(&mut w.u[base..], lo);
                    store32(&mut w.u[base + 32..], hi);
                    for s in 0..2 {
                        let (sc, m) = scale_min_k4(2 * c + s, scales);
                        let lane = (base + s * 32) / LANE;
                        fill8(
                            &mut w.a[lane..],
                            &mut w.b[lane..],
                            d * sc as f32,
                            dmin * m as f32,
                        );
                    }
                }
            }
        }
        TensorType::Q6K => {
            for (i, blk) in row.chunks_exact(bb).enumerate() {
                let d = f16_fast(blk, 208);
                for h in 0..2 {
                    let groups = q6k_groups(blk, h);
                    for (g, v) in groups.into_iter().enumerate() {
                        store32(&mut w.u[i * QK_K + h * 128 + g * 32..], v);
                    }
                }
                for g in 0..16 {
                    let a = d * (blk[192 + g] as i8) as f32;
                    let lane = i * QK_K / LANE + g * 4;
                    w.a[lane..lane + 4].fill(a);
                    w.b[lane..lane + 4].fill(32.0 * a);
                }
            }
        }
        TensorType::F32 | TensorType::F16 | TensorType::BF16 => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn vector_unpacking_matches_portable(
            ty_index in 0usize..6,
            raw in proptest::collection::vec(any::<u8>(), 4 * 210),
        ) {
            let types = [TensorType::Q4_0, TensorType::Q5_0, TensorType::Q8_0,
                         TensorType::Q4K, TensorType::Q5K, TensorType::Q6K];
            let ty = types[ty_index];
            if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")) {
                return Ok(());
            }
            let cols = 2 * QK_K;
            let bytes = &raw[..cols / ty.block_len() * ty.block_bytes()];
            let mut want = UnpackedRow::default();
            want.unpack(ty, bytes, cols);
            let mut got = UnpackedRow::default();
            // SAFETY: the features were just detected.
            unsafe { unpack(&mut got, ty, bytes, cols) };
            prop_assert_eq!(&got.u, &want.u);
            for (g, w) in got.a.iter().zip(&want.a).chain(got.b.iter().zip(&want.b)) {
                prop_assert!(g == w || (g.is_nan() && w.is_nan()));
            }
        }
    }
}
