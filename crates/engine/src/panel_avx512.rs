//! The panel product of [`crate::panel`] with AVX-512 VNNI: per group of 16
//! values, eight `vpdpwssd` sum the products of 16 weight rows with one
//! broadcast activation pair each, and the scales apply once per group.
//!
//! - The 16 lanes of `vpdpwssd` are output features; the activation operand
//!   is one int16 pair broadcast from memory. The instruction is written out
//!   in inline assembly: the compiler's generic tuning would split it into
//!   three.
//! - Integer sums run over a whole span (16 or 32 values), so the float
//!   work happens once per span; eight activation rows (four for panels
//!   whose offsets need a correction sum) share every weight load.
//! - Narrow groups (nibbles, bit planes: [`crate::panel::PanelBits`]) are
//!   widened in registers.
//! - With int8 activations (`ByteActivations`, llama.cpp's precision) the
//!   product multiplies the stored bytes as they are with `vpdpbusd`: four
//!   products per lane, no widening shuffles.
//! - What a span's epilogue needs of each activation row (its block scale,
//!   the integer start that folds a zero offset in, the sum its stored
//!   offsets multiply) is worked out once per product as
//!   [`crate::panel::SpanTerms`], laid out per block of eight rows so that
//!   one address register reaches them all.
//! - Each block of rows asks for its share of the panel 32 KiB ahead (into
//!   L2), spread over its groups, whatever the number of rows: the stream
//!   from memory then runs while every block goes past a panel, not only
//!   the first.

use std::arch::x86_64::*;
use std::sync::OnceLock;

use crate::panel::{
    scales_per_group, PanelActivations, PanelBits, PanelMatrix, QuantizedValue, SpanTerms, GROUP,
    PANEL_ROWS, ROW_BLOCK,
};

/// Whether this CPU has the instructions (and the portable kernels were not
/// asked for), detected once.
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        std::env::var_os("NEOCLOUD_PORTABLE_KERNELS").is_none()
            && std::env::var_os("NEOCLOUD_NO_AVX512").is_none()
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    })
}

/// The byte shuffle that widens bytes `first` and `first + 1` of each
/// 32-bit lane to two zero-extended int16.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn pair_pattern(first: i8) -> __m512i {
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

/// The integers of an activation row as the panel product takes them:
/// int16, two per `vpdpwssd` lane, or int8, four per `vpdpbusd` lane.
pub trait PanelValue: QuantizedValue {
    /// Adds the products of group `g` to each row's integer sums:
    /// `registers` hold the group's weight bytes (lane `r` of register `q`
    /// has values `4q..4q + 4` of weight row `r`), `rows` point at each
    /// activation row's values.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F, BW and VNNI, and each of `rows`
    /// must hold group `g`'s 16 values.
    unsafe fn add_group<const R: usize>(
        sums: &mut [__m512i; R],
        registers: [__m512i; 4],
        rows: &[*const Self; R],
        g: usize,
    );

    /// Stores the 16 lanes of `values` at `out`, each truncated to this
    /// width, and returns what was stored widened back to 32 bits.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F; `out` must have room for 16 values.
    unsafe fn store_narrowed(values: __m512i, out: *mut Self) -> __m512i;
}

impl PanelValue for i16 {
    /// Each register widens to two of int16 pairs (a byte shuffle each),
    /// then eight `vpdpwssd` per row, weight-major so that consecutive
    /// instructions feed different sums and none waits on the one before.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn add_group<const R: usize>(
        sums: &mut [__m512i; R],
        registers: [__m512i; 4],
        rows: &[*const i16; R],
        g: usize,
    ) {
        let (low_pair, high_pair) = (pair_pattern(0), pair_pattern(2));
        let mut wv = [_mm512_setzero_si512(); 8];
        for (q, u) in registers.into_iter().enumerate() {
            wv[2 * q] = _mm512_shuffle_epi8(u, low_pair);
            wv[2 * q + 1] = _mm512_shuffle_epi8(u, high_pair);
        }
        for (j, wj) in wv.iter().enumerate() {
            for r in 0..R {
                // SAFETY: the caller's contract: the row holds the group.
                unsafe {
                    let pairs = rows[r].add(g * GROUP).cast::<i32>();
                    sums[r] = dot_pairs(sums[r], *wj, pairs.add(j));
                }
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn store_narrowed(values: __m512i, out: *mut i16) -> __m512i {
        let narrow = _mm512_cvtepi32_epi16(values);
        // SAFETY: the caller's contract: room for 16 values.
        unsafe { _mm256_storeu_si256(out.cast(), narrow) };
        _mm512_cvtepi16_epi32(narrow)
    }
}

impl PanelValue for i8 {
    /// Four `vpdpbusd` per row, on the stored bytes as they are (unsigned
    /// weights times signed activations), register-major.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn add_group<const R: usize>(
        sums: &mut [__m512i; R],
        registers: [__m512i; 4],
        rows: &[*const i8; R],
        g: usize,
    ) {
        for (q, u) in registers.into_iter().enumerate() {
            for r in 0..R {
                // SAFETY: the caller's contract: the row holds the group.
                unsafe {
                    let quad = rows[r].add(g * GROUP + 4 * q).cast::<i32>();
                    sums[r] = dot_quads(sums[r], u, quad);
                }
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn store_narrowed(values: __m512i, out: *mut i8) -> __m512i {
        let narrow = _mm512_cvtepi32_epi8(values);
        // SAFETY: the caller's contract: room for 16 values.
        unsafe { _mm_storeu_si128(out.cast(), narrow) };
        _mm512_cvtepi8_epi32(narrow)
    }
}

/// The 16 outputs of panel `p` for each of `xs`, into `out` (row `i`'s at
/// `16 i..16 i + 16`): the numbers of [`crate::panel::panel_dot_portable`]
/// or [`crate::panel::byte_panel_dot_portable`]. `terms` are the rows'
/// [`SpanTerms`] for `w`, as [`SpanTerms::fill`] lays them out. Rows go
/// eight, four or one at a time, never across a block of the terms; a
/// row's outputs are the same in any group.
///
/// # Safety
/// The CPU must support AVX-512 F, BW and VNNI.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub unsafe fn panel_product<T: PanelValue>(
    w: &PanelMatrix,
    p: usize,
    xs: &[PanelActivations<T>],
    terms: &[SpanTerms],
    prefetch: Prefetch,
    out: &mut [f32],
) {
    assert!(out.len() >= xs.len() * PANEL_ROWS);
    // Rows `i..i + R` with their terms: R divides the block and `i` is a
    // multiple of R, so they lie in one block. The first rows go past
    // with the prefetches.
    let rows = |i: usize, r: usize| {
        let block = SpanTerms::block(terms, w, i / ROW_BLOCK);
        let prefetch = if i == 0 { prefetch } else { Prefetch::NONE };
        (&xs[i..i + r], (block, i % ROW_BLOCK, prefetch))
    };
    let store = |out: &mut [f32], first: usize, sums: &[__m512]| {
        for (j, s) in sums.iter().enumerate() {
            let o = &mut out[(first + j) * PANEL_ROWS..(first + j + 1) * PANEL_ROWS];
            // SAFETY: `o` holds exactly 16 floats.
            unsafe { _mm512_storeu_ps(o.as_mut_ptr(), *s) };
        }
    };
    let mut i = 0;
    // Eight rows at a time for forms whose offsets fold into the integer
    // sums: their unpacking is shared by more rows, and without correction
    // accumulators the registers suffice.
    while w.zero.is_some() && i + 8 <= xs.len() {
        let (x, with) = rows(i, 8);
        let sums = rows_of(w, p, std::array::from_fn::<_, 8, _>(|j| &x[j]), with);
        store(out, i, &sums);
        i += 8;
    }
    while i + 4 <= xs.len() {
        let (x, with) = rows(i, 4);
        let sums = rows_of(w, p, [&x[0], &x[1], &x[2], &x[3]], with);
        store(out, i, &sums);
        i += 4;
    }
    while i < xs.len() {
        let (x, with) = rows(i, 1);
        let sums = rows_of(w, p, [&x[0]], with);
        store(out, i, &sums);
        i += 1;
    }
}

/// [`panel_rows`] for the matrix's form and span.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
fn rows_of<T: PanelValue, const R: usize>(
    w: &PanelMatrix,
    p: usize,
    xs: [&PanelActivations<T>; R],
    (terms, slot, prefetch): (&[SpanTerms], usize, Prefetch),
) -> [__m512; R] {
    let xs = (xs, terms, slot, prefetch);
    match (w.bits, w.span == 2 * GROUP, w.zero.is_some()) {
        (PanelBits::Eight, false, false) => panel_rows::<T, R, 8, 1, false>(w, p, xs),
        (PanelBits::Eight, false, true) => panel_rows::<T, R, 8, 1, true>(w, p, xs),
        (PanelBits::Eight, true, false) => panel_rows::<T, R, 8, 2, false>(w, p, xs),
        (PanelBits::Eight, true, true) => panel_rows::<T, R, 8, 2, true>(w, p, xs),
        (PanelBits::Four, false, false) => panel_rows::<T, R, 4, 1, false>(w, p, xs),
        (PanelBits::Four, false, true) => panel_rows::<T, R, 4, 1, true>(w, p, xs),
        (PanelBits::Four, true, false) => panel_rows::<T, R, 4, 2, false>(w, p, xs),
        (PanelBits::Four, true, true) => panel_rows::<T, R, 4, 2, true>(w, p, xs),
        (PanelBits::Five, false, false) => panel_rows::<T, R, 5, 1, false>(w, p, xs),
        (PanelBits::Five, false, true) => panel_rows::<T, R, 5, 1, true>(w, p, xs),
        (PanelBits::Five, true, false) => panel_rows::<T, R, 5, 2, false>(w, p, xs),
        (PanelBits::Five, true, true) => panel_rows::<T, R, 5, 2, true>(w, p, xs),
        (PanelBits::Six, false, false) => panel_rows::<T, R, 6, 1, false>(w, p, xs),
        (PanelBits::Six, false, true) => panel_rows::<T, R, 6, 1, true>(w, p, xs),
        (PanelBits::Six, true, false) => panel_rows::<T, R, 6, 2, false>(w, p, xs),
        (PanelBits::Six, true, true) => panel_rows::<T, R, 6, 2, true>(w, p, xs),
    }
}

/// The four registers of a group's bytes, one byte per value, from its
/// stored form (`BITS`: see [`PanelBits`]).
///
/// # Safety
/// `group` must point at one whole group stored as `BITS` says.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) unsafe fn group_registers<const BITS: u32>(group: *const u8) -> [__m512i; 4] {
    // SAFETY: the caller's contract bounds every load: 256 bytes for eight
    // bits, 128 for four, 160 for five, 192 for six.
    unsafe {
        if BITS == 8 {
            return std::array::from_fn(|q| _mm512_loadu_si512(group.add(q * 64).cast()));
        }
        let low = _mm512_set1_epi8(0x0f);
        let first = _mm512_loadu_si512(group.cast());
        let second = _mm512_loadu_si512(group.add(64).cast());
        let mut u = [
            _mm512_and_si512(first, low),
            _mm512_and_si512(_mm512_srli_epi16(first, 4), low),
            _mm512_and_si512(second, low),
            _mm512_and_si512(_mm512_srli_epi16(second, 4), low),
        ];
        if BITS == 5 {
            // Each register's fifth bits as a mask.
            let fifth = _mm512_set1_epi8(0x10);
            for (q, v) in u.iter_mut().enumerate() {
                let mask = group.add(128 + q * 8).cast::<u64>().read_unaligned();
                *v = _mm512_mask_add_epi8(*v, mask, *v, fifth);
            }
        }
        if BITS == 6 {
            // Bits 4 and 5 of register q sit at bits 2q and 2q + 1: shift
            // them to 4 and 5, then `v | (high & 0x30)` in one ternary op
            // (0xF8 = A | (B & C)). Bits shifted across a byte are masked.
            let high = _mm512_loadu_si512(group.add(128).cast());
            let bits = _mm512_set1_epi8(0x30);
            let shifted = [
                _mm512_slli_epi16(high, 4),
                _mm512_slli_epi16(high, 2),
                high,
                _mm512_srli_epi16(high, 2),
            ];
            for (v, h) in u.iter_mut().zip(shifted) {
                *v = _mm512_ternarylogic_epi32(*v, h, bits, 0xF8);
            }
        }
        u
    }
}

/// `acc + w · pair`: `_mm512_dpwssd_epi32` with the activation pair at
/// `pair` broadcast from memory. Written as the instruction itself because
/// the compiler's generic tuning splits chains of them into a multiply and
/// an add (plus a broadcast), three instructions for one; on the CPUs that
/// have VNNI the fused one runs at one per cycle.
///
/// # Safety
/// `pair` must be valid for reading four bytes.
#[inline]
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn dot_pairs(acc: __m512i, w: __m512i, pair: *const i32) -> __m512i {
    let mut acc = acc;
    // SAFETY: the caller's contract bounds the one load.
    unsafe {
        std::arch::asm!(
            "vpdpwssd {acc}, {w}, dword ptr [{pair}]{{1to16}}",
            acc = inout(zmm_reg) acc,
            w = in(zmm_reg) w,
            pair = in(reg) pair,
            options(pure, readonly, nostack, preserves_flags),
        );
    }
    acc
}

/// Weight bytes that a product asks the caches for while it works, spread
/// evenly over its groups, so that the stream from memory runs all the
/// time rather than only while the first block of rows goes past a panel.
/// The hardware's own prefetching falls behind the stream from memory: with
/// one row, because one core keeps too few requests in flight; with a few,
/// because each byte takes longer to use.
#[derive(Debug, Clone, Copy)]
pub struct Prefetch {
    /// The first byte asked for; any address (asking never faults).
    pub from: *const u8,
    /// Cache lines of 64 bytes asked for, from `from` on.
    pub lines: usize,
}

impl Prefetch {
    /// Nothing asked for.
    pub const NONE: Prefetch = Prefetch {
        from: std::ptr::null(),
        lines: 0,
    };
}

/// `acc + u · quad`: `_mm512_dpbusd_epi32` (unsigned weight bytes times
/// signed activation bytes, four per lane) with the activation quad at
/// `quad` broadcast from memory, written out for the reason given at
/// [`dot_pairs`].
///
/// # Safety
/// `quad` must be valid for reading four bytes.
#[inline]
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn dot_quads(acc: __m512i, u: __m512i, quad: *const i32) -> __m512i {
    let mut acc = acc;
    // SAFETY: the caller's contract bounds the one load.
    unsafe {
        std::arch::asm!(
            "vpdpbusd {acc}, {u}, dword ptr [{quad}]{{1to16}}",
            acc = inout(zmm_reg) acc,
            u = in(zmm_reg) u,
            quad = in(reg) quad,
            options(pure, readonly, nostack, preserves_flags),
        );
    }
    acc
}

/// The 16 outputs of panel `p` for `R` activation rows, the weights stored
/// as `BITS` with `SPAN_GROUPS` groups per scale span: integer sums run over
/// a whole span, and its scales apply once. With `ZERO` (offsets a fixed
/// integer multiple of the multipliers), the offset is taken off the
/// integer sum, exactly: `sum (u - zero) x = sum u x - zero sum x`, the
/// sums starting from the second term. The rows' [`SpanTerms`] are those of
/// slots `slot..slot + R` of one block of `terms`; `prefetch`'s lines are
/// asked for a few per group.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
fn panel_rows<
    T: PanelValue,
    const R: usize,
    const BITS: u32,
    const SPAN_GROUPS: usize,
    const ZERO: bool,
>(
    w: &PanelMatrix,
    p: usize,
    (xs, terms, slot, prefetch): ([&PanelActivations<T>; R], &[SpanTerms], usize, Prefetch),
) -> [__m512; R] {
    let groups = w.cols / GROUP;
    assert!(ZERO == w.zero.is_some());
    assert!(slot + R <= ROW_BLOCK && terms.len() >= groups / SPAN_GROUPS * ROW_BLOCK);
    let terms = terms[slot..].as_ptr();
    let lines_per_group = prefetch.lines.div_ceil(groups);
    let bytes = w.panel_bytes(p);
    let scales = w.panel_scales(p);
    let per_span = scales_per_group(w.zero);
    let group_bytes = w.bits.group_bytes();
    assert!(w.span == SPAN_GROUPS * GROUP && groups.is_multiple_of(SPAN_GROUPS));
    assert!(bytes.len() == groups * group_bytes && scales.len() == groups / SPAN_GROUPS * per_span);
    for x in xs {
        assert!(x.q.len() >= w.cols);
    }
    let rows: [*const T; R] = std::array::from_fn(|r| xs[r].q.as_ptr());
    let mut acc = [_mm512_setzero_ps(); R];
    let mut corr = [_mm512_setzero_ps(); R];
    for span in 0..groups / SPAN_GROUPS {
        // SAFETY: the assertions above bound every load below: a span's
        // groups of bytes and its 16 or 32 scales, a group's values of each
        // activation row, and each row's terms of the span.
        unsafe {
            let span_terms = terms.add(span * ROW_BLOCK);
            let mut sums: [__m512i; R] = std::array::from_fn(|r| {
                if ZERO {
                    _mm512_set1_epi32((*span_terms.add(r)).start)
                } else {
                    _mm512_setzero_si512()
                }
            });
            for k in 0..SPAN_GROUPS {
                let g = span * SPAN_GROUPS + k;
                let group = bytes.as_ptr().add(g * group_bytes);
                let first_line = g * lines_per_group;
                for line in first_line..prefetch.lines.min(first_line + lines_per_group) {
                    // Never faults, wherever it points.
                    let at = prefetch.from.wrapping_add(line * 64);
                    _mm_prefetch::<_MM_HINT_T1>(at.cast());
                }
                T::add_group(&mut sums, group_registers::<BITS>(group), &rows, g);
            }
            let sp = scales.as_ptr().add(span * per_span);
            let a = _mm512_cvtph_ps(_mm256_loadu_si256(sp.cast()));
            for r in 0..R {
                let t = &*span_terms.add(r);
                let scale = _mm512_mul_ps(a, _mm512_set1_ps(t.scale));
                acc[r] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(sums[r]), acc[r]);
                if !ZERO {
                    let b = _mm512_cvtph_ps(_mm256_loadu_si256(sp.add(PANEL_ROWS).cast()));
                    corr[r] = _mm512_fmadd_ps(b, _mm512_set1_ps(t.offset), corr[r]);
                }
            }
        }
    }
    let mut out = [_mm512_setzero_ps(); R];
    for r in 0..R {
        out[r] = _mm512_sub_ps(acc[r], corr[r]);
    }
    out
}

/// The blocks of [`PanelActivations::quantize`] with AVX-512: the same
/// numbers, bit for bit (the same float operations, lane by lane).
///
/// # Safety
/// The CPU must support AVX-512 F.
#[target_feature(enable = "avx512f")]
pub unsafe fn quantize_blocks<T: PanelValue>(
    x: &[f32],
    q: &mut [T],
    scale: &mut [f32],
    scaled_sum: &mut [f32],
    sums: &mut [i32],
) {
    const BLOCK: usize = 2 * GROUP;
    let groups = x.len() / GROUP;
    assert!(x.len().is_multiple_of(BLOCK) && q.len() >= x.len());
    assert!(scale.len() >= groups && scaled_sum.len() >= groups && sums.len() >= groups);
    let magnitude = _mm512_set1_epi32(0x7fff_ffff);
    let sign = _mm512_set1_epi32(i32::MIN);
    let half = _mm512_castps_si512(_mm512_set1_ps(0.5));
    for b in 0..x.len() / BLOCK {
        // SAFETY: the assertions bound every load and store.
        unsafe {
            let at = x.as_ptr().add(b * BLOCK);
            let v = [_mm512_loadu_ps(at), _mm512_loadu_ps(at.add(GROUP))];
            let abs =
                v.map(|v| _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v), magnitude)));
            // A NaN operand first gives the other: NaNs are skipped, as
            // `f32::max` skips them.
            let amax = _mm512_max_ps(abs[1], _mm512_max_ps(abs[0], _mm512_setzero_ps()));
            let amax = _mm512_reduce_max_ps(amax);
            let d = amax / T::MAX;
            let inv = _mm512_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
            for (h, v) in v.into_iter().enumerate() {
                let t = _mm512_mul_ps(v, inv);
                // Half away from zero: add 0.5 with the sign of `t`, then truncate.
                let signed_half = _mm512_castsi512_ps(_mm512_or_si512(
                    _mm512_and_si512(_mm512_castps_si512(t), sign),
                    half,
                ));
                let values = _mm512_cvttps_epi32(_mm512_add_ps(t, signed_half));
                let out = q.as_mut_ptr().add(b * BLOCK + h * GROUP);
                // Summed as stored: a NaN's lane is 0 there, as in `as i16`
                // or `as i8`.
                let sum = _mm512_reduce_add_epi32(T::store_narrowed(values, out));
                let g = b * 2 + h;
                *scale.get_unchecked_mut(g) = d;
                *scaled_sum.get_unchecked_mut(g) = d * sum as f32;
                *sums.get_unchecked_mut(g) = sum;
            }
        }
    }
}
