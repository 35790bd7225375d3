//! AVX-512 VNNI versions of [`crate::byte_dot`]: weight rows are unpacked with
//! 256-bit shuffles, and the inner loop sums int16 products with `vpdpwssd`.

use std::arch::x86_64::*;
use std::sync::OnceLock;

use crate::byte_dot::{ActivationRow, UnpackedRow, LANE, STEP};
use crate::integer_dot_avx2::{bits_to_bytes, f16_fast, load32, nibbles_16, q45k_pair, q6k_groups};
use crate::quant::{scale_min_k4, TensorType, QK_K};

/// Whether this CPU has the instructions (and the portable kernels were not
/// asked for), detected once.
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        std::env::var_os("NEOCLOUD_PORTABLE_KERNELS").is_none()
            && std::env::var_os("NEOCLOUD_NO_AVX512").is_none()
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512dq")
            && is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    })
}

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
                prefetch_ahead(blk);
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

/// Products of one unpacked weight row with each of `xs`, into `out`: the
/// reference arrangement of [`dot_rows_direct`], used by tests.
///
/// # Safety
/// The CPU must support AVX-512 F, BW and VNNI.
#[cfg(test)]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub unsafe fn dot_rows(w: &UnpackedRow, xs: &[&ActivationRow], out: &mut [f32]) {
    let k = w.u.len();
    assert!(k.is_multiple_of(STEP) && w.a.len() * LANE == k && w.b.len() * LANE == k);
    for (o, x) in out.iter_mut().zip(xs) {
        let mut acc = [Accumulators::new()];
        for s in 0..k / STEP {
            // SAFETY: s * STEP + STEP <= k bounds the loads.
            let (u, a, b) = unsafe {
                (
                    _mm512_loadu_si512(w.u.as_ptr().add(s * STEP).cast()),
                    _mm512_loadu_ps(w.a.as_ptr().add(s * 16)),
                    _mm512_loadu_ps(w.b.as_ptr().add(s * 16)),
                )
            };
            accumulate(&mut acc, [x], s, u, a, b);
        }
        *o = acc[0].total();
    }
}

/// Per activation row: the scaled products and the offsets' correction.
#[derive(Clone, Copy)]
struct Accumulators {
    products: __m512,
    correction: __m512,
}

impl Accumulators {
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn new() -> Self {
        Accumulators {
            products: _mm512_setzero_ps(),
            correction: _mm512_setzero_ps(),
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    fn total(self) -> f32 {
        _mm512_reduce_add_ps(self.products) - _mm512_reduce_add_ps(self.correction)
    }
}

/// Adds step `s` (values `64 s..64 s + 64`) of each row of `xs`, against the
/// weight bytes `u` and the `a`, `b` of that step. The one place where
/// products are summed, so every arrangement gives the same bits.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
fn accumulate<const R: usize>(
    acc: &mut [Accumulators; R],
    xs: [&ActivationRow; R],
    s: usize,
    u: __m512i,
    a: __m512,
    b: __m512,
) {
    // Per lane j (bytes 4j..4j+4 of `u`): bytes 0 and 1 widened to two
    // int16, then bytes 2 and 3; the activations are stored to match.
    let first = _mm512_shuffle_epi8(u, pair_pattern(0));
    let second = _mm512_shuffle_epi8(u, pair_pattern(2));
    for r in 0..R {
        let x = xs[r];
        assert!(x.q.len() >= (s + 1) * STEP && x.scale.len() >= (s + 1) * 16);
        assert!(x.scaled_sum.len() >= (s + 1) * 16);
        // SAFETY: the assertions bound the 2 x 32-value and 16-float loads.
        let (q0, q1, scale, scaled_sum) = unsafe {
            (
                _mm512_loadu_si512(x.q.as_ptr().add(s * STEP).cast()),
                _mm512_loadu_si512(x.q.as_ptr().add(s * STEP + STEP / 2).cast()),
                _mm512_loadu_ps(x.scale.as_ptr().add(s * 16)),
                _mm512_loadu_ps(x.scaled_sum.as_ptr().add(s * 16)),
            )
        };
        let sums = _mm512_dpwssd_epi32(_mm512_setzero_si512(), first, q0);
        let p = _mm512_cvtepi32_ps(_mm512_dpwssd_epi32(sums, second, q1));
        acc[r].products = _mm512_fmadd_ps(_mm512_mul_ps(a, scale), p, acc[r].products);
        acc[r].correction = _mm512_fmadd_ps(b, scaled_sum, acc[r].correction);
    }
}

/// Bytes ahead of the current block that are asked for early: the
/// hardware prefetchers alone leave decode waiting on memory.
const PREFETCH_DISTANCE: usize = 1024;

/// Asks for the cache lines `PREFETCH_DISTANCE` bytes past `at`.
#[inline]
#[target_feature(enable = "avx2")]
fn prefetch_ahead(at: &[u8]) {
    let p = at.as_ptr().wrapping_add(PREFETCH_DISTANCE);
    // A prefetch is a hint and never faults, whatever the address.
    _mm_prefetch::<_MM_HINT_T0>(p.cast());
    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(64).cast());
}

/// The f16 values at bytes `i` and `j` of `b`, in lanes 0 and 1 (lanes 2
/// and 3 are zero). Read as one integer and converted in a vector register:
/// scalar inserts would wait on whatever last wrote the register.
#[inline]
#[target_feature(enable = "avx2,f16c")]
fn f16_pair(b: &[u8], i: usize, j: usize) -> __m128 {
    let lo = u16::from_le_bytes([b[i], b[i + 1]]) as u32;
    let hi = u16::from_le_bytes([b[j], b[j + 1]]) as u32;
    _mm_cvtph_ps(_mm_cvtsi32_si128((lo | (hi << 16)) as i32))
}

/// The byte shuffle that widens bytes `first` and `first + 1` of each
/// 32-bit lane to two zero-extended int16.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) fn pair_pattern(first: i8) -> __m512i {
    let z = -1i8; // a set top bit writes zero
    let f = first;
    let lane = _mm_setr_epi8(
        f,
        z,
        f + 1,
        z,
        f + 4,
        z,
        f + 5,
        z,
        f + 8,
        z,
        f + 9,
        z,
        f + 12,
        z,
        f + 13,
        z,
    );
    _mm512_broadcast_i32x4(lane)
}

/// Two 256-bit halves as one 512-bit register.
#[inline]
#[target_feature(enable = "avx512f")]
fn join(lo: __m256i, hi: __m256i) -> __m512i {
    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
}

/// Products of one packed weight row of `ty` (see
/// [`crate::byte_dot::supports`]) with each of `xs`, into `out`, unpacking
/// in registers; bit for bit what [`dot_rows`] gives after [`unpack`].
///
/// # Safety
/// The CPU must support AVX-512 F, BW, DQ and VNNI, AVX2, FMA and F16C.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vnni,avx2,fma,f16c")]
pub unsafe fn dot_rows_direct(ty: TensorType, row: &[u8], xs: &[&ActivationRow], out: &mut [f32]) {
    assert!(out.len() >= xs.len());
    let mut i = 0;
    while i + 4 <= xs.len() {
        let r = direct::<4>(ty, row, [xs[i], xs[i + 1], xs[i + 2], xs[i + 3]]);
        out[i..i + 4].copy_from_slice(&r);
        i += 4;
    }
    while i < xs.len() {
        out[i] = direct::<1>(ty, row, [xs[i]])[0];
        i += 1;
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vnni,avx2,fma,f16c")]
fn direct<const R: usize>(ty: TensorType, row: &[u8], xs: [&ActivationRow; R]) -> [f32; R] {
    let mut acc = [Accumulators::new(); R];
    let bb = ty.block_bytes();
    // Lane patterns: eight of value 0 then eight of value 1; the same for
    // values 0 and 2, and 1 and 3.
    let first_two = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    let even_two = _mm512_set_epi32(2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0);
    let odd_two = _mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1);
    match ty {
        TensorType::Q8_0 | TensorType::Q4_0 | TensorType::Q5_0 => {
            let zero_point = _mm512_set1_ps(match ty {
                TensorType::Q8_0 => 128.0,
                TensorType::Q4_0 => 8.0,
                _ => 16.0,
            });
            let legacy = |blk: &[u8]| -> __m256i {
                match ty {
                    TensorType::Q8_0 => {
                        _mm256_xor_si256(load32(&blk[2..]), _mm256_set1_epi8(0x80u8 as i8))
                    }
                    TensorType::Q4_0 => nibbles_16(&blk[2..]),
                    _ => {
                        let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
                        let high = _mm256_and_si256(bits_to_bytes(qh), _mm256_set1_epi8(0x10));
                        _mm256_or_si256(nibbles_16(&blk[6..]), high)
                    }
                }
            };
            for (s, pair) in row.chunks_exact(2 * bb).enumerate() {
                prefetch_ahead(pair);
                let u = join(legacy(&pair[..bb]), legacy(&pair[bb..]));
                let scales = f16_pair(pair, 0, bb);
                let a = _mm512_permutexvar_ps(first_two, _mm512_castps128_ps512(scales));
                accumulate(&mut acc, xs, s, u, a, _mm512_mul_ps(a, zero_point));
            }
        }
        TensorType::Q4K | TensorType::Q5K => {
            let five = ty == TensorType::Q5K;
            for (i, blk) in row.chunks_exact(bb).enumerate() {
                prefetch_ahead(blk);
                // (d, dmin, d, dmin)
                let d_dmin = _mm_movelh_ps(f16_pair(blk, 0, 2), f16_pair(blk, 0, 2));
                let scales = &blk[4..16];
                let (qs, qh) = if five {
                    (&blk[48..176], Some(load32(&blk[16..48])))
                } else {
                    (&blk[16..144], None)
                };
                for c in 0..4 {
                    let (lo, hi) = q45k_pair(qs, qh, c);
                    let (sc0, m0) = scale_min_k4(2 * c, scales);
                    let (sc1, m1) = scale_min_k4(2 * c + 1, scales);
                    // (d sc0, dmin m0, d sc1, dmin m1)
                    let ab = _mm_mul_ps(
                        d_dmin,
                        _mm_cvtepi32_ps(_mm_set_epi32(
                            m1 as i32, sc1 as i32, m0 as i32, sc0 as i32,
                        )),
                    );
                    let ab = _mm512_castps128_ps512(ab);
                    accumulate(
                        &mut acc,
                        xs,
                        i * 4 + c,
                        join(lo, hi),
                        _mm512_permutexvar_ps(even_two, ab),
                        _mm512_permutexvar_ps(odd_two, ab),
                    );
                }
            }
        }
        TensorType::Q6K => {
            // Lane l of a step takes the scale of its group of 16 values.
            let spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
            for (i, blk) in row.chunks_exact(bb).enumerate() {
                let d = _mm_broadcastss_ps(f16_pair(blk, 208, 208));
                for h in 0..2 {
                    let groups = q6k_groups(blk, h);
                    for j in 0..2 {
                        let first = h * 8 + j * 4;
                        let sc = &blk[192 + first..192 + first + 4];
                        let bytes = i32::from_le_bytes([sc[0], sc[1], sc[2], sc[3]]);
                        let four = _mm_mul_ps(
                            d,
                            _mm_cvtepi32_ps(_mm_cvtepi8_epi32(_mm_cvtsi32_si128(bytes))),
                        );
                        let a = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(four));
                        let b = _mm512_mul_ps(a, _mm512_set1_ps(32.0));
                        accumulate(
                            &mut acc,
                            xs,
                            i * 4 + h * 2 + j,
                            join(groups[2 * j], groups[2 * j + 1]),
                            a,
                            b,
                        );
                    }
                }
            }
        }
        TensorType::F32 | TensorType::F16 | TensorType::BF16 => {}
    }
    let mut out = [0f32; R];
    for r in 0..R {
        out[r] = acc[r].total();
    }
    out
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
