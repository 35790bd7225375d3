//! AVX2 versions of the integer dot products in [`crate::integer_dot`]: weight
//! blocks are unpacked to bytes in registers, widened to 16 bits and
//! multiplied with `madd`; scales apply once per group of 32 (or 16) values.

use std::arch::x86_64::*;

use crate::integer_dot::{QuantizedRow, ACT_BLOCK};
use crate::quant::{scale_min_k4, TensorType, QK_K};

/// The little-endian f16 at byte `i` of `b`, converted by the F16C unit.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn f16_fast(b: &[u8], i: usize) -> f32 {
    let bits = u16::from_le_bytes([b[i], b[i + 1]]);
    // A broadcast, not an insert: an insert would wait on the register it merges into.
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_set1_epi16(bits as i16)))
}

/// The four groups of 32 six-bit values (0..64) of half `h` of a Q6_K
/// block, as bytes: values `128 h + 32 g..` in group `g`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn q6k_groups(blk: &[u8], h: usize) -> [__m256i; 4] {
    let m4 = _mm256_set1_epi8(0x0f);
    let m3 = _mm256_set1_epi8(0x03);
    let ql0 = load32(&blk[h * 64..]);
    let ql1 = load32(&blk[h * 64 + 32..]);
    let qh = load32(&blk[128 + h * 32..]);
    let high = |v: __m256i| _mm256_slli_epi16::<4>(_mm256_and_si256(v, m3));
    [
        _mm256_or_si256(_mm256_and_si256(ql0, m4), high(qh)),
        _mm256_or_si256(_mm256_and_si256(ql1, m4), high(_mm256_srli_epi16::<2>(qh))),
        _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16::<4>(ql0), m4),
            high(_mm256_srli_epi16::<4>(qh)),
        ),
        _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), m4),
            high(_mm256_srli_epi16::<6>(qh)),
        ),
    ]
}

/// Sub-blocks `2c` and `2c + 1` of a Q4_K (or, with its high bits `qh`,
/// Q5_K) block as bytes: `qs` holds the packed nibbles.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn q45k_pair(qs: &[u8], qh: Option<__m256i>, c: usize) -> (__m256i, __m256i) {
    let m4 = _mm256_set1_epi8(0x0f);
    let q = load32(&qs[c * 32..]);
    let mut lo = _mm256_and_si256(q, m4);
    let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4);
    if let Some(qh) = qh {
        let bit = |k: usize| {
            let mask = _mm256_set1_epi8((1u8 << k) as i8);
            let set = _mm256_cmpeq_epi8(_mm256_and_si256(qh, mask), mask);
            _mm256_and_si256(set, _mm256_set1_epi8(0x10))
        };
        lo = _mm256_or_si256(lo, bit(2 * c));
        hi = _mm256_or_si256(hi, bit(2 * c + 1));
    }
    (lo, hi)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
    _mm_cvtss_f32(s)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn load32(b: &[u8]) -> __m256i {
    assert!(b.len() >= 32);
    // SAFETY: the assertion guarantees 32 readable bytes; loadu has no alignment needs.
    unsafe { _mm256_loadu_si256(b.as_ptr().cast()) }
}

/// 16 packed nibble bytes -> 32 bytes: low nibbles first, then high nibbles.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn nibbles_16(b: &[u8]) -> __m256i {
    assert!(b.len() >= 16);
    // SAFETY: the assertion guarantees 16 readable bytes.
    let v = unsafe { _mm_loadu_si128(b.as_ptr().cast()) };
    let m = _mm_set1_epi8(0x0f);
    let lo = _mm_and_si128(v, m);
    let hi = _mm_and_si128(_mm_srli_epi16::<4>(v), m);
    _mm256_set_m128i(hi, lo)
}

/// Byte `e` is 0xFF when bit `e` of `bits` is set.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn bits_to_bytes(bits: u32) -> __m256i {
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(bits as i32),
        _mm256_set_epi64x(
            0x0303_0303_0303_0303,
            0x0202_0202_0202_0202,
            0x0101_0101_0101_0101,
            0x0000_0000_0000_0000,
        ),
    );
    let select = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    _mm256_cmpeq_epi8(_mm256_and_si256(spread, select), select)
}

/// Dot product of a weight row with a quantised activation row (AVX2).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_row_q8(ty: TensorType, row: &[u8], x: &QuantizedRow) -> f32 {
    // SAFETY: the caller guarantees the same features.
    unsafe { dot_rows::<1>(ty, row, [x])[0] }
}

/// Dots of one weight row with `R` activation rows. Each weight block is
/// unpacked once for all of them, and each row's arithmetic is exactly that
/// of [`dot_row_q8`], so a row's result does not depend on its neighbours.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_rows<const R: usize>(
    ty: TensorType,
    row: &[u8],
    xs: [&QuantizedRow; R],
) -> [f32; R] {
    match ty {
        TensorType::Q8_0 | TensorType::Q4_0 | TensorType::Q5_0 => dot_legacy(ty, row, xs),
        TensorType::Q4K | TensorType::Q5K => dot_q45k(ty, row, xs),
        TensorType::Q6K => dot_q6k(row, xs),
        TensorType::F32 | TensorType::F16 | TensorType::BF16 => [0.0; R],
    }
}

/// 32 weight bytes widened to two vectors of 16 int16 values.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn widen(w: __m256i) -> (__m256i, __m256i) {
    (
        _mm256_cvtepi8_epi16(_mm256_castsi256_si128(w)),
        _mm256_cvtepi8_epi16(_mm256_extracti128_si256::<1>(w)),
    )
}

/// Pair sums of widened weights with 32 int16 activations: values 0..16 in
/// the first vector, 16..32 in the second.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn madd_widened(w: (__m256i, __m256i), x: &[i16]) -> (__m256i, __m256i) {
    assert!(x.len() >= 32);
    // SAFETY: the assertion guarantees 32 readable i16 values.
    let (x0, x1) = unsafe {
        (
            _mm256_loadu_si256(x.as_ptr().cast()),
            _mm256_loadu_si256(x.as_ptr().add(16).cast()),
        )
    };
    (_mm256_madd_epi16(w.0, x0), _mm256_madd_epi16(w.1, x1))
}

#[target_feature(enable = "avx2,fma,f16c")]
fn dot_legacy<const R: usize>(ty: TensorType, row: &[u8], xs: [&QuantizedRow; R]) -> [f32; R] {
    let mut acc = [_mm256_setzero_ps(); R];
    for (i, blk) in row.chunks_exact(ty.block_bytes()).enumerate() {
        let w = widen(match ty {
            TensorType::Q8_0 => load32(&blk[2..]),
            TensorType::Q4_0 => _mm256_sub_epi8(nibbles_16(&blk[2..]), _mm256_set1_epi8(8)),
            _ => {
                let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
                let high = _mm256_and_si256(bits_to_bytes(qh), _mm256_set1_epi8(0x10));
                let q = _mm256_or_si256(nibbles_16(&blk[6..]), high);
                _mm256_sub_epi8(q, _mm256_set1_epi8(16))
            }
        });
        let dw = f16_fast(blk, 0);
        for (a, x) in acc.iter_mut().zip(xs) {
            let (p0, p1) = madd_widened(w, &x.q[i * ACT_BLOCK..]);
            let p = _mm256_cvtepi32_ps(_mm256_add_epi32(p0, p1));
            *a = _mm256_fmadd_ps(_mm256_set1_ps(dw * x.d[i]), p, *a);
        }
    }
    let mut out = [0f32; R];
    for (o, a) in out.iter_mut().zip(acc) {
        *o = hsum(a);
    }
    out
}

#[target_feature(enable = "avx2,fma,f16c")]
fn dot_q45k<const R: usize>(ty: TensorType, row: &[u8], xs: [&QuantizedRow; R]) -> [f32; R] {
    let five = ty == TensorType::Q5K;
    let mut acc = [_mm256_setzero_ps(); R];
    let mut mins = [0f32; R];
    for (sb, blk) in row.chunks_exact(ty.block_bytes()).enumerate() {
        let d = f16_fast(blk, 0);
        let dmin = f16_fast(blk, 2);
        let scales = &blk[4..16];
        let (qs, qh) = if five {
            (&blk[48..176], Some(load32(&blk[16..48])))
        } else {
            (&blk[16..144], None)
        };
        let a0 = sb * (QK_K / ACT_BLOCK);
        for c in 0..4 {
            let (lo, hi) = q45k_pair(qs, qh, c);
            for (s, w) in [(0, lo), (1, hi)] {
                let sub = 2 * c + s;
                let (sc, m) = scale_min_k4(sub, scales);
                let ab = a0 + sub;
                let w = widen(w);
                for r in 0..R {
                    let x = xs[r];
                    let dx = x.d[ab];
                    let (p0, p1) = madd_widened(w, &x.q[ab * ACT_BLOCK..]);
                    let p = _mm256_cvtepi32_ps(_mm256_add_epi32(p0, p1));
                    acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * sc as f32 * dx), p, acc[r]);
                    let xsum = x.sum16[2 * ab] + x.sum16[2 * ab + 1];
                    mins[r] += dmin * m as f32 * dx * xsum as f32;
                }
            }
        }
    }
    let mut out = [0f32; R];
    for ((o, a), m) in out.iter_mut().zip(acc).zip(mins) {
        *o = hsum(a) - m;
    }
    out
}

#[target_feature(enable = "avx2,fma,f16c")]
fn dot_q6k<const R: usize>(row: &[u8], xs: [&QuantizedRow; R]) -> [f32; R] {
    let mut acc = [_mm256_setzero_ps(); R];
    let mut offset = [0f32; R];
    for (sb, blk) in row.chunks_exact(TensorType::Q6K.block_bytes()).enumerate() {
        let d = f16_fast(blk, 208);
        let sc = &blk[192..208];
        for h in 0..2 {
            let groups = q6k_groups(blk, h);
            for (g, w) in groups.into_iter().enumerate() {
                let ab = sb * (QK_K / ACT_BLOCK) + h * 4 + g;
                let (s0, s1) = (
                    sc[h * 8 + 2 * g] as i8 as i32,
                    sc[h * 8 + 2 * g + 1] as i8 as i32,
                );
                let w = widen(w);
                for r in 0..R {
                    let x = xs[r];
                    let dx = x.d[ab];
                    let (p0, p1) = madd_widened(w, &x.q[ab * ACT_BLOCK..]);
                    let dd = d * dx;
                    acc[r] = _mm256_fmadd_ps(
                        _mm256_set1_ps(dd * s0 as f32),
                        _mm256_cvtepi32_ps(p0),
                        acc[r],
                    );
                    acc[r] = _mm256_fmadd_ps(
                        _mm256_set1_ps(dd * s1 as f32),
                        _mm256_cvtepi32_ps(p1),
                        acc[r],
                    );
                    let corr = s0 * x.sum16[2 * ab] + s1 * x.sum16[2 * ab + 1];
                    offset[r] += d * dx * 32.0 * corr as f32;
                }
            }
        }
    }
    let mut out = [0f32; R];
    for ((o, a), m) in out.iter_mut().zip(acc).zip(offset) {
        *o = hsum(a) - m;
    }
    out
}
