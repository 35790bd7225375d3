//! The panel product with int8 activations on AMX tiles (Intel's matrix
//! extension). A panel's bytes are already laid out as AMX wants its
//! second operand: each 64-byte register of a group holds four consecutive
//! values of 16 weight rows, which is one row of a tile in the "VNNI" form.
//! So one `tdpbsud` multiplies 16 activation rows (signed bytes) by a
//! panel's 16 weight rows (unsigned bytes) over a whole scale span, exactly
//! in 32-bit integers, and the span's scales then apply with the same
//! operations, in the same order, as in [`crate::panel_avx512`]: the numbers
//! are the same, bit for bit.

use std::arch::asm;
use std::arch::x86_64::*;
use std::sync::OnceLock;

use crate::panel::{
    scales_per_group, PanelBits, PanelMatrix, SpanTerms, GROUP, PANEL_ROWS, ROW_BLOCK,
};
use crate::panel_avx512::{group_registers, Prefetch};

/// Activation rows one tile holds (and one call of [`panel_rows`] takes).
pub const TILE_ROWS: usize = 16;

/// Whether this CPU has AMX with int8 products, the operating system let
/// this process use its tiles, and the AVX-512 product (whose epilogue this
/// shares) is in use; asked once. `NEOCLOUD_NO_AMX` turns it off.
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        std::env::var_os("NEOCLOUD_NO_AMX").is_none()
            && crate::panel_avx512::available()
            && cpu_has_amx_int8()
            && tiles_permitted()
    })
}

/// CPUID leaf 7: AMX-TILE (EDX bit 24) and AMX-INT8 (bit 25); and the
/// operating system has the tile state on in XCR0 (bits 17 and 18): a
/// hypervisor may list the instructions without enabling them.
fn cpu_has_amx_int8() -> bool {
    const TILE_STATE: u64 = 0b11 << 17;
    // Leaf 7 reads as zeros where it is not implemented.
    let leaf = __cpuid_count(7, 0);
    let listed = __cpuid(0).eax >= 7 && leaf.edx & (1 << 24) != 0 && leaf.edx & (1 << 25) != 0;
    // XGETBV needs OSXSAVE (CPUID leaf 1, ECX bit 27).
    let os_saves = __cpuid(1).ecx & (1 << 27) != 0;
    listed && os_saves && {
        let (low, high): (u32, u32);
        // SAFETY: XGETBV with ECX = 0 reads XCR0, present when OSXSAVE is.
        unsafe {
            asm!("xgetbv", in("ecx") 0u32, out("eax") low, out("edx") high,
                options(nomem, nostack, preserves_flags));
        }
        (u64::from(high) << 32 | u64::from(low)) & TILE_STATE == TILE_STATE
    }
}

/// Linux hands out the tiles' state only to processes that ask for it.
#[cfg(target_os = "linux")]
fn tiles_permitted() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with these arguments only changes what this
    // process may use; it reads and writes no memory of ours.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(not(target_os = "linux"))]
fn tiles_permitted() -> bool {
    false
}

/// The tiles' shapes for a span of `span` values (palette 1): tiles 0 to 3
/// the 16 x 16 integer sums of four spans, tiles 4 and 5 16 activation
/// rows of one span, tiles 6 and 7 a span's weights (four values per row of
/// 64 bytes). Tiles are not renamed: four sums and two of each operand let
/// four spans' products overlap instead of each waiting on the last.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    bytes_per_row: [u16; 16],
    rows: [u8; 16],
}

/// The tiles configured on this thread for one product; released when
/// dropped (a thread with tiles in use saves 8 KB more on each switch).
pub struct Tiles {
    span: usize,
}

impl Tiles {
    /// Configures the tiles for `w`'s spans.
    ///
    /// # Safety
    /// [`available`] must be true.
    pub unsafe fn configure(w: &PanelMatrix) -> Tiles {
        let span = w.span;
        let mut config = TileConfig {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            bytes_per_row: [0; 16],
            rows: [0; 16],
        };
        for t in 0..4 {
            config.bytes_per_row[t] = 64;
            config.rows[t] = TILE_ROWS as u8;
        }
        for t in 4..6 {
            config.bytes_per_row[t] = span as u16;
            config.rows[t] = TILE_ROWS as u8;
        }
        for t in 6..8 {
            config.bytes_per_row[t] = 64;
            config.rows[t] = (span / 4) as u8;
        }
        // SAFETY: the caller's contract: the CPU has AMX and the process
        // may use it; the configuration is valid for palette 1.
        unsafe {
            asm!("ldtilecfg [{}]", in(reg) &config, options(nostack, readonly));
        }
        Tiles { span }
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: tiles were configured (see `configure`).
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }
}

/// Bytes of one panel in the one-byte-per-value form, as [`panel_rows`]
/// takes them: `w`'s own bytes when they are stored that way, otherwise
/// widened into `scratch`.
///
/// # Safety
/// The CPU must support AVX-512 F and BW.
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn wide_panel<'a>(w: &'a PanelMatrix, p: usize, scratch: &'a mut Vec<u8>) -> &'a [u8] {
    let bytes = w.panel_bytes(p);
    if w.bits == PanelBits::Eight {
        return bytes;
    }
    let groups = w.cols / GROUP;
    scratch.resize(groups * PANEL_ROWS * GROUP, 0);
    let group_bytes = w.bits.group_bytes();
    assert!(bytes.len() == groups * group_bytes);
    for g in 0..groups {
        // SAFETY: `bytes` holds every group (asserted) and `scratch` 256
        // bytes per group; the caller's contract covers the features.
        unsafe {
            let group = bytes.as_ptr().add(g * group_bytes);
            let registers = match w.bits {
                PanelBits::Four => group_registers::<4>(group),
                PanelBits::Five => group_registers::<5>(group),
                PanelBits::Six => group_registers::<6>(group),
                PanelBits::Eight => group_registers::<8>(group),
            };
            for (q, r) in registers.into_iter().enumerate() {
                _mm512_storeu_si512(scratch.as_mut_ptr().add(g * 256 + q * 64).cast(), r);
            }
        }
    }
    scratch
}

/// Lays out the activation rows `rows` (up to 16) as [`panel_rows`] takes
/// them, into `out` (16 times the row length): per span, its values of 16
/// rows one after another, so that one tile's are 512 bytes in a row. Rows
/// past the given ones are zero.
pub fn tile_order(rows: &[&[i8]], span: usize, out: &mut [i8]) {
    let cols = out.len() / TILE_ROWS;
    assert!(rows.len() <= TILE_ROWS && cols.is_multiple_of(span));
    for s in 0..cols / span {
        let tile = &mut out[s * TILE_ROWS * span..(s + 1) * TILE_ROWS * span];
        for (i, part) in tile.chunks_exact_mut(span).enumerate() {
            match rows.get(i) {
                Some(row) => part.copy_from_slice(&row[s * span..(s + 1) * span]),
                None => part.fill(0),
            }
        }
    }
}

/// The 16 outputs of panel `p` for `ROWS` activation rows (8 or 16) into
/// `out` (row `i`'s at `16 i..16 i + 16`): the numbers of
/// [`crate::panel_avx512::panel_product`]. The rows are 16 rows laid out
/// by [`tile_order`] in `activations` (rows past `ROWS` are ignored), the
/// first being row `first` of the product whose [`SpanTerms`] are `terms`;
/// `wide` is the panel from [`wide_panel`].
/// `prefetch`'s lines are asked for a few per span.
///
/// # Safety
/// The CPU must support AVX-512 F, BW and VNNI and AMX-INT8, with `tiles`
/// configured on this thread.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub unsafe fn panel_rows<const ROWS: usize>(
    tiles: &Tiles,
    w: &PanelMatrix,
    p: usize,
    wide: &[u8],
    activations: &[i8],
    terms: &[SpanTerms],
    first: usize,
    prefetch: Prefetch,
    sums: &mut SpanSums,
    out: &mut [f32],
) {
    const { assert!(ROWS == 8 || ROWS == TILE_ROWS) };
    let span = w.span;
    let spans = w.cols / span;
    assert!(tiles.span == span && span.is_multiple_of(GROUP) && w.cols.is_multiple_of(span));
    assert!(wide.len() >= w.cols * PANEL_ROWS && out.len() >= ROWS * PANEL_ROWS);
    assert!(activations.len() >= TILE_ROWS * w.cols);
    assert!(first.is_multiple_of(ROW_BLOCK));
    let scales = w.panel_scales(p);
    let per_span = scales_per_group(w.zero);
    assert!(scales.len() == spans * per_span);
    // The terms of the rows' one or two blocks, and of span `s` for rows
    // `8 h..8 h + 8`.
    let blocks: [*const SpanTerms; TILE_ROWS / ROW_BLOCK] =
        std::array::from_fn(|h| match h < ROWS / ROW_BLOCK {
            true => SpanTerms::block(terms, w, first / ROW_BLOCK + h).as_ptr(),
            false => std::ptr::null(),
        });
    let span_terms = |h: usize, s: usize| blocks[h].wrapping_add(s * ROW_BLOCK);
    assert!(spans.is_multiple_of(SPANS_AT_ONCE));
    let lines_per_span = prefetch.lines.div_ceil(spans);
    let sums = &mut sums.0;
    let mut acc = [_mm512_setzero_ps(); ROWS];
    for s0 in (0..spans).step_by(SPANS_AT_ONCE) {
        let first_line = s0 * lines_per_span;
        let lines = SPANS_AT_ONCE * lines_per_span;
        for line in first_line..prefetch.lines.min(first_line + lines) {
            _mm_prefetch::<_MM_HINT_T1>(prefetch.from.wrapping_add(line * 64).cast());
        }
        let a = |s: usize| {
            activations
                .as_ptr()
                .wrapping_add((s0 + s) * TILE_ROWS * span)
        };
        let b = |s: usize| wide.as_ptr().wrapping_add((s0 + s) * span * PANEL_ROWS);
        // SAFETY: the assertions bound every tile load (16 rows of `span`
        // bytes in a row; `span / 4` rows of 64 bytes, for spans
        // `s0..s0 + 4`) and store (16 rows of 64 bytes into `sums`).
        unsafe {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                "tileloadd tmm4, [{a0} + {stride}]",
                "tileloadd tmm6, [{b0} + {sixty_four}]",
                "tdpbsud tmm0, tmm4, tmm6",
                "tileloadd tmm5, [{a1} + {stride}]",
                "tileloadd tmm7, [{b1} + {sixty_four}]",
                "tdpbsud tmm1, tmm5, tmm7",
                "tileloadd tmm4, [{a2} + {stride}]",
                "tileloadd tmm6, [{b2} + {sixty_four}]",
                "tdpbsud tmm2, tmm4, tmm6",
                "tileloadd tmm5, [{a3} + {stride}]",
                "tileloadd tmm7, [{b3} + {sixty_four}]",
                "tdpbsud tmm3, tmm5, tmm7",
                "tilestored [{c0} + {sixty_four}], tmm0",
                "tilestored [{c1} + {sixty_four}], tmm1",
                "tilestored [{c2} + {sixty_four}], tmm2",
                "tilestored [{c3} + {sixty_four}], tmm3",
                a0 = in(reg) a(0),
                a1 = in(reg) a(1),
                a2 = in(reg) a(2),
                a3 = in(reg) a(3),
                b0 = in(reg) b(0),
                b1 = in(reg) b(1),
                b2 = in(reg) b(2),
                b3 = in(reg) b(3),
                stride = in(reg) span,
                sixty_four = in(reg) 64usize,
                c0 = in(reg) sums[0].0.as_mut_ptr(),
                c1 = in(reg) sums[1].0.as_mut_ptr(),
                c2 = in(reg) sums[2].0.as_mut_ptr(),
                c3 = in(reg) sums[3].0.as_mut_ptr(),
                options(nostack),
            );
        }
        for (k, sums) in sums.iter().enumerate() {
            let s = s0 + k;
            // SAFETY: `scales` holds every span's (asserted); each of the
            // rows' blocks of terms (`SpanTerms::block`) every span's.
            unsafe {
                let a =
                    _mm512_cvtph_ps(_mm256_loadu_si256(scales.as_ptr().add(s * per_span).cast()));
                for h in 0..ROWS / ROW_BLOCK {
                    let terms = span_terms(h, s);
                    for j in 0..ROW_BLOCK {
                        let r = h * ROW_BLOCK + j;
                        let t = &*terms.add(j);
                        let mut sum = _mm512_load_si512(sums.0[r].as_ptr().cast());
                        if w.zero.is_some() {
                            sum = _mm512_add_epi32(_mm512_set1_epi32(t.start), sum);
                        }
                        let scale = _mm512_mul_ps(a, _mm512_set1_ps(t.scale));
                        acc[r] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(sum), acc[r]);
                    }
                }
            }
        }
    }
    if w.zero.is_none() {
        // The stored offsets, span by span as the AVX-512 kernel takes them.
        let mut corr = [_mm512_setzero_ps(); ROWS];
        for s in 0..spans {
            // SAFETY: as above.
            unsafe {
                let b = _mm512_cvtph_ps(_mm256_loadu_si256(
                    scales.as_ptr().add(s * per_span + PANEL_ROWS).cast(),
                ));
                for h in 0..ROWS / ROW_BLOCK {
                    let terms = span_terms(h, s);
                    for j in 0..ROW_BLOCK {
                        let t = &*terms.add(j);
                        let r = h * ROW_BLOCK + j;
                        corr[r] = _mm512_fmadd_ps(b, _mm512_set1_ps(t.offset), corr[r]);
                    }
                }
            }
        }
        for (acc, corr) in acc.iter_mut().zip(corr) {
            *acc = _mm512_sub_ps(*acc, corr);
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        // SAFETY: `out` holds 16 floats per row (asserted).
        unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(r * PANEL_ROWS), *acc) };
    }
}

/// Spans whose tile products are in flight together.
pub const SPANS_AT_ONCE: usize = 4;

/// One tile of integer sums in memory, aligned for its rows' loads.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct SumsTile([[i32; PANEL_ROWS]; TILE_ROWS]);

/// Where [`panel_rows`] stores the sums of the spans in flight: made once
/// per run of panels (4 KB written on each call would cost more than the
/// products of a few rows).
pub struct SpanSums([SumsTile; SPANS_AT_ONCE]);

impl Default for SpanSums {
    fn default() -> Self {
        SpanSums([SumsTile([[0; PANEL_ROWS]; TILE_ROWS]); SPANS_AT_ONCE])
    }
}
