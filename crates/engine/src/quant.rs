//! Tensor storage types and their block layouts (the GGML formats).
//!
//! Weights stay quantised in memory. [`dequantize_row`] expands one row into
//! f32 and [`dot_row`] takes the dot product of a quantised row with an f32
//! vector block by block, without expanding the row. The layouts follow
//! ggml's `block_q*` structs, little-endian.

use crate::error::EngineError;

/// Storage type of a tensor, with its GGML type id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TensorType {
    /// 32-bit float.
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
    /// 32 values: f16 scale, 32 x 4-bit, offset 8.
    Q4_0,
    /// 32 values: f16 scale, 32 x 5-bit, offset 16.
    Q5_0,
    /// 32 values: f16 scale, 32 x i8.
    Q8_0,
    /// 256 values: f16 scale and min, 8 sub-blocks with 6-bit scales/mins, 4-bit values.
    Q4K,
    /// 256 values: as Q4_K with a fifth bit per value.
    Q5K,
    /// 256 values: f16 scale, 16 sub-blocks with i8 scales, 6-bit values.
    Q6K,
}

/// Values per super-block of the K-quant types.
pub const QK_K: usize = 256;
/// Values per block of the legacy quant types.
pub const QK: usize = 32;

impl TensorType {
    /// Maps a GGML type id to a supported type.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => TensorType::F32,
            1 => TensorType::F16,
            2 => TensorType::Q4_0,
            6 => TensorType::Q5_0,
            8 => TensorType::Q8_0,
            12 => TensorType::Q4K,
            13 => TensorType::Q5K,
            14 => TensorType::Q6K,
            30 => TensorType::BF16,
            _ => return None,
        })
    }

    /// The GGML type id.
    pub fn id(self) -> u32 {
        match self {
            TensorType::F32 => 0,
            TensorType::F16 => 1,
            TensorType::Q4_0 => 2,
            TensorType::Q5_0 => 6,
            TensorType::Q8_0 => 8,
            TensorType::Q4K => 12,
            TensorType::Q5K => 13,
            TensorType::Q6K => 14,
            TensorType::BF16 => 30,
        }
    }

    /// Values per block.
    pub fn block_len(self) -> usize {
        match self {
            TensorType::F32 | TensorType::F16 | TensorType::BF16 => 1,
            TensorType::Q4_0 | TensorType::Q5_0 | TensorType::Q8_0 => QK,
            TensorType::Q4K | TensorType::Q5K | TensorType::Q6K => QK_K,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            TensorType::F32 => 4,
            TensorType::F16 | TensorType::BF16 => 2,
            TensorType::Q4_0 => 18,
            TensorType::Q5_0 => 22,
            TensorType::Q8_0 => 34,
            TensorType::Q4K => 144,
            TensorType::Q5K => 176,
            TensorType::Q6K => 210,
        }
    }

    /// Bytes taken by a row of `n` values (`n` a multiple of the block length).
    pub fn row_bytes(self, n: usize) -> usize {
        n / self.block_len() * self.block_bytes()
    }
}

/// Converts IEEE half-precision bits to f32.
#[inline]
pub fn f16_to_f32(bits: u16) -> f32 {
    let sign = ((bits >> 15) as u32) << 31;
    let exp = ((bits >> 10) & 0x1f) as u32;
    let mant = (bits & 0x3ff) as u32;
    let out = if exp == 0 {
        if mant == 0 {
            sign
        } else {
            // Subnormal: value = mant * 2^-24.
            let v = mant as f32 * (1.0 / 16_777_216.0);
            return if sign != 0 { -v } else { v };
        }
    } else if exp == 0x1f {
        sign | 0x7f80_0000 | (mant << 13)
    } else {
        sign | ((exp + 112) << 23) | (mant << 13)
    };
    f32::from_bits(out)
}

/// Converts f32 to IEEE half-precision bits, rounding to nearest even.
pub fn f32_to_f16(v: f32) -> u16 {
    let x = v.to_bits();
    let sign = ((x >> 16) & 0x8000) as u16;
    let exp = ((x >> 23) & 0xff) as i32;
    let mant = x & 0x7f_ffff;
    if exp == 0xff {
        return sign | 0x7c00 | if mant != 0 { 0x200 } else { 0 };
    }
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    if e <= 0 {
        if e < -10 {
            return sign;
        }
        let m = mant | 0x80_0000;
        let shift = (14 - e) as u32;
        let half = 1u32 << (shift - 1);
        let rounded = m + half - 1 + ((m >> shift) & 1);
        return sign | (rounded >> shift) as u16;
    }
    let rounded = mant + 0xfff + ((mant >> 13) & 1);
    if rounded & 0x80_0000 != 0 {
        let e2 = e + 1;
        if e2 >= 0x1f {
            return sign | 0x7c00;
        }
        return sign | ((e2 as u16) << 10);
    }
    sign | ((e as u16) << 10) | (rounded >> 13) as u16
}

/// Converts `src` to half-precision bits in `dst` (as many as both hold),
/// rounding to nearest even as [`f32_to_f16`] does: eight at a time with
/// F16C when the CPU has it.
pub fn f32_row_to_f16(src: &[f32], dst: &mut [u16]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("f16c") {
        // SAFETY: F16C (which implies AVX) was just detected.
        unsafe { f32_row_to_f16_f16c(src, dst) };
        return;
    }
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = f32_to_f16(s);
    }
}

/// [`f32_row_to_f16`] with F16C.
///
/// # Safety
/// The CPU must support F16C and AVX.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
unsafe fn f32_row_to_f16_f16c(src: &[f32], dst: &mut [u16]) {
    use std::arch::x86_64::*;
    let n = src.len().min(dst.len());
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: `i + 8 <= n` bounds the load and the store.
        unsafe {
            let v = _mm256_loadu_ps(src.as_ptr().add(i));
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
            _mm_storeu_si128(dst.as_mut_ptr().add(i).cast(), h);
        }
        i += 8;
    }
    for (d, &s) in dst[i..n].iter_mut().zip(&src[i..n]) {
        *d = f32_to_f16(s);
    }
}

/// Widens the half-precision bits of `src` to f32 in `dst` (as many as
/// both hold), exactly as [`f16_to_f32`]: eight at a time with F16C when
/// the CPU has it.
pub fn f16_row_to_f32(src: &[u16], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("f16c") {
        // SAFETY: F16C (which implies AVX) was just detected.
        unsafe { f16_row_to_f32_f16c(src, dst) };
        return;
    }
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = f16_to_f32(s);
    }
}

/// [`f16_row_to_f32`] with F16C.
///
/// # Safety
/// The CPU must support F16C and AVX.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
unsafe fn f16_row_to_f32_f16c(src: &[u16], dst: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = src.len().min(dst.len());
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: `i + 8 <= n` bounds the load and the store.
        unsafe {
            let h = _mm_loadu_si128(src.as_ptr().add(i).cast());
            _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
        }
        i += 8;
    }
    for (d, &s) in dst[i..n].iter_mut().zip(&src[i..n]) {
        *d = f16_to_f32(s);
    }
}

/// Converts bfloat16 bits to f32.
#[inline]
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// The little-endian f16 at byte `i` of `b`, as f32.
#[inline(always)]
pub(crate) fn f16_at(b: &[u8], i: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[i], b[i + 1]]))
}

/// Expands one block of `ty` into `out` (`out.len() == ty.block_len()`).
#[inline(always)]
fn dequantize_block(ty: TensorType, b: &[u8], out: &mut [f32]) {
    match ty {
        TensorType::F32 => out[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        TensorType::F16 => out[0] = f16_at(b, 0),
        TensorType::BF16 => out[0] = bf16_to_f32(u16::from_le_bytes([b[0], b[1]])),
        TensorType::Q4_0 => {
            let d = f16_at(b, 0);
            let qs = &b[2..18];
            for j in 0..16 {
                out[j] = ((qs[j] & 0x0f) as i32 - 8) as f32 * d;
                out[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
            }
        }
        TensorType::Q5_0 => {
            let d = f16_at(b, 0);
            let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
            let qs = &b[6..22];
            for j in 0..16 {
                let h0 = ((qh >> j) << 4) & 0x10;
                let h1 = (qh >> (j + 12)) & 0x10;
                out[j] = (((qs[j] & 0x0f) as u32 | h0) as i32 - 16) as f32 * d;
                out[j + 16] = (((qs[j] >> 4) as u32 | h1) as i32 - 16) as f32 * d;
            }
        }
        TensorType::Q8_0 => {
            let d = f16_at(b, 0);
            for j in 0..32 {
                out[j] = (b[2 + j] as i8) as f32 * d;
            }
        }
        TensorType::Q4K => {
            let d = f16_at(b, 0);
            let dmin = f16_at(b, 2);
            let scales = &b[4..16];
            let qs = &b[16..144];
            for (chunk, j) in (0..QK_K).step_by(64).enumerate() {
                let q = &qs[chunk * 32..chunk * 32 + 32];
                let (sc1, m1) = scale_min_k4(2 * chunk, scales);
                let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
                let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
                let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
                for l in 0..32 {
                    out[j + l] = d1 * (q[l] & 0x0f) as f32 - m1;
                    out[j + 32 + l] = d2 * (q[l] >> 4) as f32 - m2;
                }
            }
        }
        TensorType::Q5K => {
            let d = f16_at(b, 0);
            let dmin = f16_at(b, 2);
            let scales = &b[4..16];
            let qh = &b[16..48];
            let qs = &b[48..176];
            for (chunk, j) in (0..QK_K).step_by(64).enumerate() {
                let ql = &qs[chunk * 32..chunk * 32 + 32];
                let u1 = 1u8 << (2 * chunk);
                let u2 = 2u8 << (2 * chunk);
                let (sc1, m1) = scale_min_k4(2 * chunk, scales);
                let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
                let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
                let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
                for l in 0..32 {
                    let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
                    let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
                    out[j + l] = d1 * ((ql[l] & 0x0f) + h1) as f32 - m1;
                    out[j + 32 + l] = d2 * ((ql[l] >> 4) + h2) as f32 - m2;
                }
            }
        }
        TensorType::Q6K => {
            let ql_all = &b[0..128];
            let qh_all = &b[128..192];
            let sc_all = &b[192..208];
            let d = f16_at(b, 208);
            for half in 0..2 {
                let ql = &ql_all[half * 64..half * 64 + 64];
                let qh = &qh_all[half * 32..half * 32 + 32];
                let sc = &sc_all[half * 8..half * 8 + 8];
                let y = &mut out[half * 128..half * 128 + 128];
                for l in 0..32 {
                    let is = l / 16;
                    let q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i32 - 32;
                    let q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                    let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                    let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                    y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                    y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                    y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                    y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
                }
            }
        }
    }
}

/// The 6-bit scale and min of sub-block `j` of a Q4_K/Q5_K super-block.
#[inline(always)]
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

fn check_row(ty: TensorType, bytes: &[u8], n: usize) -> Result<(), EngineError> {
    if !n.is_multiple_of(ty.block_len()) || bytes.len() != ty.row_bytes(n) {
        return Err(EngineError::Shape(format!(
            "{ty:?} row of {n} values needs {} bytes, got {}",
            if n.is_multiple_of(ty.block_len()) {
                ty.row_bytes(n)
            } else {
                0
            },
            bytes.len()
        )));
    }
    Ok(())
}

/// Expands a row of `out.len()` values stored as `ty` into f32.
pub fn dequantize_row(ty: TensorType, bytes: &[u8], out: &mut [f32]) -> Result<(), EngineError> {
    check_row(ty, bytes, out.len())?;
    dequantize_row_unchecked(ty, bytes, out);
    Ok(())
}

/// As [`dequantize_row`], for callers that validated the shapes already.
#[inline(always)]
pub(crate) fn dequantize_row_unchecked(ty: TensorType, bytes: &[u8], out: &mut [f32]) {
    if ty == TensorType::F32 {
        for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
            *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
        return;
    }
    let bl = ty.block_len();
    let bb = ty.block_bytes();
    for (o, b) in out.chunks_exact_mut(bl).zip(bytes.chunks_exact(bb)) {
        dequantize_block(ty, b, o);
    }
}

/// Dot product of a row stored as `ty` with the f32 vector `x`, block by block.
pub fn dot_row(ty: TensorType, bytes: &[u8], x: &[f32]) -> Result<f32, EngineError> {
    check_row(ty, bytes, x.len())?;
    let bl = ty.block_len();
    if bl == 1 {
        let mut tmp = [0f32; 64];
        let mut acc = 0f32;
        for (xs, b) in x.chunks(64).zip(bytes.chunks(64 * ty.block_bytes())) {
            let t = &mut tmp[..xs.len()];
            dequantize_row_unchecked(ty, b, t);
            acc += crate::kernels::dot_f32(t, xs);
        }
        return Ok(acc);
    }
    let mut tmp = [0f32; QK_K];
    let mut acc = 0f32;
    for (xs, b) in x.chunks_exact(bl).zip(bytes.chunks_exact(ty.block_bytes())) {
        let t = &mut tmp[..bl];
        dequantize_block(ty, b, t);
        acc += crate::kernels::dot_f32(t, xs);
    }
    Ok(acc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Straightforward reference: value `i` of a block, decoded on its own.
    fn reference_value(ty: TensorType, b: &[u8], i: usize) -> f32 {
        let f16 = |o: usize| f16_to_f32(u16::from_le_bytes([b[o], b[o + 1]]));
        match ty {
            TensorType::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            TensorType::F16 => f16(0),
            TensorType::BF16 => bf16_to_f32(u16::from_le_bytes([b[0], b[1]])),
            TensorType::Q4_0 => {
                let byte = b[2 + i % 16];
                let q = if i < 16 { byte & 15 } else { byte >> 4 };
                f16(0) * (q as f32 - 8.0)
            }
            TensorType::Q5_0 => {
                let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                let byte = b[6 + i % 16];
                let lo = if i < 16 { byte & 15 } else { byte >> 4 };
                let hi = (qh >> i) & 1;
                f16(0) * ((lo as u32 | hi << 4) as f32 - 16.0)
            }
            TensorType::Q8_0 => f16(0) * (b[2 + i] as i8) as f32,
            TensorType::Q4K | TensorType::Q5K => {
                let sub = i / 32;
                let (sc, m) = scale_min_k4(sub, &b[4..16]);
                let qs_off = if ty == TensorType::Q4K { 16 } else { 48 };
                let byte = b[qs_off + (sub / 2) * 32 + i % 32];
                let mut q = if sub.is_multiple_of(2) {
                    byte & 15
                } else {
                    byte >> 4
                } as u32;
                if ty == TensorType::Q5K {
                    q |= (((b[16 + i % 32] >> sub) & 1) as u32) << 4;
                }
                f16(0) * sc as f32 * q as f32 - f16(2) * m as f32
            }
            TensorType::Q6K => {
                let half = i / 128;
                let r = i % 128;
                let quarter = r / 32;
                let l = r % 32;
                let ql = b[half * 64 + l + if quarter % 2 == 1 { 32 } else { 0 }];
                let low = if quarter < 2 { ql & 15 } else { ql >> 4 };
                let high = (b[128 + half * 32 + l] >> (2 * quarter)) & 3;
                let q = (low | high << 4) as i32 - 32;
                let sc = b[192 + half * 8 + l / 16 + 2 * quarter] as i8;
                f16(208) * sc as f32 * q as f32
            }
        }
    }

    const ALL: [TensorType; 9] = [
        TensorType::F32,
        TensorType::F16,
        TensorType::BF16,
        TensorType::Q4_0,
        TensorType::Q5_0,
        TensorType::Q8_0,
        TensorType::Q4K,
        TensorType::Q5K,
        TensorType::Q6K,
    ];

    fn check_type(ty: TensorType, blocks: Vec<Vec<u8>>, xs: Vec<f32>) -> Result<(), TestCaseError> {
        let bytes: Vec<u8> = blocks.concat();
        let n = blocks.len() * ty.block_len();
        let x = &xs[..n];
        let mut out = vec![0f32; n];
        dequantize_row(ty, &bytes, &mut out).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let mut want_dot = 0f64;
        for (bi, b) in blocks.iter().enumerate() {
            for i in 0..ty.block_len() {
                let want = reference_value(ty, b, i);
                let got = out[bi * ty.block_len() + i];
                prop_assert!(
                    want == got || (want - got).abs() <= 1e-6 * want.abs().max(1.0),
                    "{ty:?} block {bi} value {i}: {got} != {want}"
                );
                want_dot += want as f64 * x[bi * ty.block_len() + i] as f64;
            }
        }
        let got_dot = dot_row(ty, &bytes, x).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let scale: f64 = out
            .iter()
            .zip(x)
            .map(|(a, b)| (a * b).abs() as f64)
            .sum::<f64>()
            + 1.0;
        prop_assert!(
            ((got_dot as f64) - want_dot).abs() <= 1e-5 * scale,
            "{ty:?} dot {got_dot} != {want_dot}"
        );
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn random_blocks_match_reference(
            ty_index in 0usize..ALL.len(),
            blocks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 210), 1..4),
            s in -2.0f32..2.0,
            xs in proptest::collection::vec(-4.0f32..4.0, 4 * QK_K),
        ) {
            let ty = ALL[ty_index];
            let blocks: Vec<Vec<u8>> = blocks.into_iter().map(|mut b| {
                b.truncate(ty.block_bytes());
                let h = f32_to_f16(s).to_le_bytes();
                match ty {
                    TensorType::F32 => b.copy_from_slice(&s.to_le_bytes()),
                    TensorType::BF16 => b.copy_from_slice(&((s.to_bits() >> 16) as u16).to_le_bytes()),
                    TensorType::Q6K => b[208..210].copy_from_slice(&h),
                    TensorType::Q4K | TensorType::Q5K => { b[0..2].copy_from_slice(&h); b[2..4].copy_from_slice(&h); }
                    _ => b[0..2].copy_from_slice(&h),
                }
                b
            }).collect();
            check_type(ty, blocks, xs)?;
        }
    }

    #[test]
    fn f16_round_trip() {
        for v in [0.0f32, 1.0, -2.5, 65504.0, 6.1e-5, 1e-7, 0.333] {
            let back = f16_to_f32(f32_to_f16(v));
            assert!((back - v).abs() <= v.abs() * 1e-3 + 6e-8, "{v} -> {back}");
        }
    }

    #[test]
    fn wrong_row_length_is_an_error() {
        let err = dequantize_row(TensorType::Q8_0, &[0u8; 33], &mut [0f32; 32]);
        assert!(err.is_err());
        let err = dot_row(TensorType::Q4K, &[0u8; 144], &[0f32; 128]);
        assert!(err.is_err());
    }
}

/// Quantised blocks for the kernels' property tests.
#[cfg(test)]
pub(crate) mod test_blocks {
    use super::{f32_to_f16, TensorType};

    /// The quantised types with integer products.
    pub const INTEGER_TYPES: [TensorType; 6] = [
        TensorType::Q4_0,
        TensorType::Q5_0,
        TensorType::Q8_0,
        TensorType::Q4K,
        TensorType::Q5K,
        TensorType::Q6K,
    ];

    /// `count` blocks of `ty` cut from `raw` (wrapping around it), with
    /// their f16 scale set to `scale` (and a K-quant's minimum scale to half
    /// of it), so that every value is finite.
    pub fn blocks(ty: TensorType, raw: &[u8], count: usize, scale: f32) -> Vec<u8> {
        let bb = ty.block_bytes();
        let mut out = Vec::with_capacity(count * bb);
        for b in 0..count {
            let off = (b * bb) % (raw.len() - bb + 1);
            let mut blk = raw[off..off + bb].to_vec();
            let h = f32_to_f16(scale).to_le_bytes();
            match ty {
                TensorType::Q6K => blk[208..210].copy_from_slice(&h),
                TensorType::Q4K | TensorType::Q5K => {
                    blk[0..2].copy_from_slice(&h);
                    blk[2..4].copy_from_slice(&f32_to_f16(scale * 0.5).to_le_bytes());
                }
                _ => blk[0..2].copy_from_slice(&h),
            }
            out.extend(blk);
        }
        out
    }
}
