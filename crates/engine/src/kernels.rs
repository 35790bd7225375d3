//! CPU compute kernels: f32 dot products and quantised matrix products.
//!
//! The instruction set is chosen once at run time (AVX2+FMA where the CPU has
//! it, a portable path everywhere); both paths are tested against each other.
//! Matrix products dequantise a small tile of weight rows into a per-thread
//! scratch buffer and reuse it for every activation row, so each weight block
//! is read once per product; weights are never expanded in full.

use std::cell::RefCell;
use std::sync::OnceLock;

use rayon::prelude::*;

use crate::integer_dot::{self, QuantizedRow};
use crate::panel::{
    ActivationBits, ByteActivations, PanelActivations, PanelMatrix, SpanTerms, PANEL_ROWS,
    ROW_BLOCK,
};
use crate::quant::{dequantize_row_unchecked, TensorType};

/// The instruction set the kernels use on this CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimdLevel {
    /// Plain Rust, any CPU.
    Portable,
    /// x86-64 AVX2 with FMA and F16C.
    Avx2,
}

/// The best instruction set available, detected once.
pub fn simd_level() -> SimdLevel {
    static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        if std::env::var_os("NEOCLOUD_PORTABLE_KERNELS").is_some() {
            return SimdLevel::Portable;
        }
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
                return SimdLevel::Avx2;
            }
        }
        SimdLevel::Portable
    })
}

/// Whether the models' matrices are repacked in panels for this CPU's
/// product (AVX-512 VNNI).
pub fn panels_in_use() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::panel_avx512::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Dot product of two equally long f32 slices.
#[inline]
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    match simd_level() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: simd_level() returned Avx2 only after detecting AVX2, FMA and F16C.
        SimdLevel::Avx2 => unsafe { avx2::dot(a, b) },
        _ => dot_portable(a, b),
    }
}

/// Portable dot product with eight independent accumulators.
pub fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for l in 0..8 {
            acc[l] += a[c * 8 + l] * b[c * 8 + l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks * 8..a.len() {
        s += a[i] * b[i];
    }
    s
}

/// The largest value (NEG_INFINITY for an empty slice; NaN is ignored).
pub fn max_f32(x: &[f32]) -> f32 {
    match simd_level() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2 and FMA were detected.
        SimdLevel::Avx2 => unsafe { avx2::max_f32(x) },
        _ => max_f32_portable(x),
    }
}

/// Index of the first largest value (0 for an empty slice).
pub fn argmax(x: &[f32]) -> usize {
    let max = max_f32(x);
    x.iter().position(|&v| v == max).unwrap_or(0)
}

/// `sum(e^(x - max))` over `x`, every `x <= max`: f32 terms within about
/// 2 ulp, lanes summed in f32 per chunk of 256 and chunks in f64.
pub fn sum_exp_below(x: &[f32], max: f32) -> f64 {
    match simd_level() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2 and FMA were detected.
        SimdLevel::Avx2 => unsafe { avx2::sum_exp_below(x, max) },
        _ => sum_exp_below_portable(x, max),
    }
}

#[inline(always)]
fn max_f32_portable(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut groups = x.chunks_exact(16);
    for g in &mut groups {
        for (m, &v) in lanes.iter_mut().zip(g) {
            *m = if v > *m { v } else { *m };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &v in lanes.iter().chain(groups.remainder()) {
        m = if v > m { v } else { m };
    }
    m
}

#[inline(always)]
fn sum_exp_below_portable(x: &[f32], max: f32) -> f64 {
    let mut sum = 0f64;
    for chunk in x.chunks(256) {
        let mut lanes = [0f32; 16];
        let mut groups = chunk.chunks_exact(16);
        for g in &mut groups {
            for (acc, &v) in lanes.iter_mut().zip(g) {
                *acc += exp_non_positive(v - max);
            }
        }
        let rest: f32 = groups
            .remainder()
            .iter()
            .map(|&v| exp_non_positive(v - max))
            .sum();
        sum += lanes.iter().map(|&v| v as f64).sum::<f64>() + rest as f64;
    }
    sum
}

/// `e^x` for `x <= 0`, to about 2 ulp, in plain arithmetic that
/// vectorises: `x = n ln 2 + r` (n rounded with the 1.5 * 2^23 trick, no
/// float-to-int conversion), a degree-6 polynomial for `e^r`, and `2^n`
/// built from its bits. Below -87 it is `e^-87`.
#[inline(always)]
fn exp_non_positive(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0;
    let x = if x < -87.0 { -87.0 } else { x };
    let k = x * std::f32::consts::LOG2_E + ROUND;
    let n = k - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let n_int = k.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    p * f32::from_bits((n_int.wrapping_add(127) as u32) << 23)
}

/// `gate[i] = gelu(gate[i]) * up[i]`, GELU in its tanh form (Gemma).
pub fn gelu_tanh_gated(gate: &mut [f32], up: &[f32]) {
    match simd_level() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2 and FMA were detected.
        SimdLevel::Avx2 => unsafe { avx2::gelu_tanh_gated(gate, up) },
        _ => gelu_tanh_gated_portable(gate, up),
    }
}

/// `gate[i] = silu(gate[i]) * up[i]` (Qwen, Llama).
pub fn silu_gated(gate: &mut [f32], up: &[f32]) {
    match simd_level() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2 and FMA were detected.
        SimdLevel::Avx2 => unsafe { avx2::silu_gated(gate, up) },
        _ => silu_gated_portable(gate, up),
    }
}

#[inline(always)]
fn gelu_tanh_gated_portable(gate: &mut [f32], up: &[f32]) {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    for (g, &u) in gate.iter_mut().zip(up) {
        let x = *g;
        let y = SQRT_2_OVER_PI * x * (1.0 + 0.044_715 * x * x);
        // tanh |y| = (1 - e^-2|y|) / (1 + e^-2|y|), sign restored.
        let e = exp_non_positive(-2.0 * y.abs());
        let t = ((1.0 - e) / (1.0 + e)).copysign(y);
        *g = 0.5 * x * (1.0 + t) * u;
    }
}

#[inline(always)]
fn silu_gated_portable(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        let x = *g;
        // e^-|x| keeps the exponential in range on either side of zero.
        let e = exp_non_positive(-x.abs());
        let s = if x >= 0.0 {
            1.0 / (1.0 + e)
        } else {
            e / (1.0 + e)
        };
        *g = x * s * u;
    }
}

/// `x[i] = e^(x[i] - max)` for every `x[i] <= max`; returns their sum
/// (attention's softmax numerators).
pub fn exp_below_in_place(x: &mut [f32], max: f32) -> f32 {
    match simd_level() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2 and FMA were detected.
        SimdLevel::Avx2 => unsafe { avx2::exp_below_in_place(x, max) },
        _ => exp_below_in_place_portable(x, max),
    }
}

#[inline(always)]
fn exp_below_in_place_portable(x: &mut [f32], max: f32) -> f32 {
    let mut lanes = [0f32; 8];
    let mut groups = x.chunks_exact_mut(8);
    for g in &mut groups {
        for (acc, v) in lanes.iter_mut().zip(g.iter_mut()) {
            *v = exp_non_positive(*v - max);
            *acc += *v;
        }
    }
    let mut sum: f32 = lanes.iter().sum();
    for v in groups.into_remainder() {
        *v = exp_non_positive(*v - max);
        sum += *v;
    }
    sum
}

/// `y += a * x` over equally long slices.
#[inline]
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    match simd_level() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2 and FMA were detected.
        SimdLevel::Avx2 => unsafe { avx2::axpy(a, x, y) },
        _ => axpy_portable(a, x, y),
    }
}

#[inline(always)]
fn axpy_portable(a: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

/// A row-major matrix of `rows` x `cols` values stored as `ty` (a weight tensor).
#[derive(Debug, Clone, Copy)]
pub struct QMatrix<'a> {
    /// Storage type.
    pub ty: TensorType,
    /// Number of rows (output features).
    pub rows: usize,
    /// Values per row (input features).
    pub cols: usize,
    /// The packed rows, `rows * ty.row_bytes(cols)` bytes.
    pub bytes: &'a [u8],
    /// The same weights repacked in panels, when the CPU's product uses them.
    pub panels: Option<&'a PanelMatrix>,
}

impl QMatrix<'_> {
    /// Bytes of row `r`.
    #[inline]
    pub fn row(&self, r: usize) -> &[u8] {
        let rb = self.ty.row_bytes(self.cols);
        &self.bytes[r * rb..(r + 1) * rb]
    }

    /// Expands row `r` into `out` (`out.len() == cols`).
    pub fn dequantize_row_into(&self, r: usize, out: &mut [f32]) {
        match simd_level() {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX2 and FMA were detected.
            SimdLevel::Avx2 => unsafe { avx2::dequantize_row(self.ty, self.row(r), out) },
            _ => dequantize_row_unchecked(self.ty, self.row(r), out),
        }
    }
}

/// Weight rows dequantised together and reused across all activation rows.
const TILE_ROWS: usize = 4;
/// Most activation rows handled per task when a product is split by rows:
/// each task dequantises every weight tile once for all its rows, so larger
/// blocks amortise dequantisation, while the block of activations stays in
/// the core's L2 cache.
const MAX_ROWS_PER_TASK: usize = 64;

thread_local! {
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Threads of the kernels' pool (the cores the engine computes on).
pub fn threads() -> usize {
    rayon::current_num_threads()
}

/// Runs `work` on a worker thread of the kernels' pool, and waits for it.
/// A loop of forward passes run this way forks the passes' parallel
/// regions from inside the pool, taking its share of them, instead of
/// sending each to the pool from outside (which allocates and wakes the
/// caller once per region).
pub fn on_kernel_pool<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| work())
}

/// `out[m][n] = sum_k x[m][k] * w[n][k]` for `m` activation rows.
///
/// `x` is `m x w.cols`, `out` is `m x w.rows`, both row-major. Work is spread
/// over the current rayon pool: by output column for a single row, by row
/// blocks otherwise.
pub fn matmul(w: &QMatrix<'_>, x: &[f32], m: usize, out: &mut [f32]) {
    let (k, n) = (w.cols, w.rows);
    debug_assert_eq!(x.len(), m * k);
    debug_assert_eq!(out.len(), m * n);
    if m == 0 || n == 0 || k == 0 {
        out.iter_mut().for_each(|o| *o = 0.0);
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(panels) = w.panels {
        if crate::panel_avx512::available() {
            panel_product(panels, x, m, out);
            return;
        }
    }
    if m <= MAX_INT8_ROWS && integer_dot::supports(w.ty) && k % integer_dot::ACT_BLOCK == 0 {
        integer_product(w, x, m, out);
        return;
    }
    if m == 1 {
        let cols_per_task = (n / (rayon::current_num_threads() * 4)).max(16);
        out.par_chunks_mut(cols_per_task)
            .enumerate()
            .for_each(|(t, chunk)| {
                let n0 = t * cols_per_task;
                with_scratch(TILE_ROWS * k, |tile| {
                    tile_product(w, n0, chunk.len(), x, 1, chunk, chunk.len(), tile);
                });
            });
        return;
    }
    let rows_per_task = m
        .div_ceil(rayon::current_num_threads())
        .clamp(1, MAX_ROWS_PER_TASK);
    out.par_chunks_mut(rows_per_task * n)
        .zip(x.par_chunks(rows_per_task * k))
        .for_each(|(out_rows, x_rows)| {
            let rows = x_rows.len() / k;
            with_scratch(TILE_ROWS * k, |tile| {
                tile_product(w, 0, n, x_rows, rows, out_rows, n, tile);
            });
        });
}

/// An activation row quantised for one of the integer products.
trait QuantizedActivations: Default + Send + Sync {
    /// Quantises `x` into `self`, reusing its buffers.
    fn quantize_from(&mut self, x: &[f32]);
}

impl<T: crate::panel::QuantizedValue + Send + Sync> QuantizedActivations for PanelActivations<T> {
    fn quantize_from(&mut self, x: &[f32]) {
        self.quantize(x)
    }
}

impl QuantizedActivations for QuantizedRow {
    fn quantize_from(&mut self, x: &[f32]) {
        self.quantize(x)
    }
}

/// Quantises the `m` rows of `x` (each `k` long) into the first `m` of
/// `rows`, grown as needed; in parallel from four rows on.
fn quantize_rows<'r, T: QuantizedActivations>(
    rows: &'r mut Vec<T>,
    x: &[f32],
    k: usize,
    m: usize,
) -> &'r mut [T] {
    if rows.len() < m {
        rows.resize_with(m, T::default);
    }
    let rows = &mut rows[..m];
    if m >= 4 {
        rows.par_iter_mut()
            .zip(x.par_chunks_exact(k))
            .for_each(|(q, r)| q.quantize_from(r));
    } else {
        rows.iter_mut()
            .zip(x.chunks_exact(k))
            .for_each(|(q, r)| q.quantize_from(r));
    }
    rows
}

/// Output rows (`m` rows of `n` columns, row-major) that parallel tasks
/// fill, each task its own run of columns in every row. The runs are cut
/// without allocating, which the step loop needs.
struct ColumnSplit<'a> {
    ptr: *mut f32,
    m: usize,
    n: usize,
    cols_per_task: usize,
    _out: std::marker::PhantomData<&'a mut [f32]>,
}

// SAFETY: tasks only reach the memory through `ColumnSplit::part`, whose
// contract keeps their columns apart.
unsafe impl Send for ColumnSplit<'_> {}
// SAFETY: as above.
unsafe impl Sync for ColumnSplit<'_> {}

impl<'a> ColumnSplit<'a> {
    fn new(out: &'a mut [f32], n: usize, cols_per_task: usize) -> Self {
        ColumnSplit {
            ptr: out.as_mut_ptr(),
            m: out.len() / n.max(1),
            n,
            cols_per_task: cols_per_task.max(1),
            _out: std::marker::PhantomData,
        }
    }

    /// Number of tasks.
    fn tasks(&self) -> usize {
        self.n.div_ceil(self.cols_per_task)
    }

    /// The first column of `task` and its number of columns.
    fn columns(&self, task: usize) -> (usize, usize) {
        let first = task * self.cols_per_task;
        (first, self.cols_per_task.min(self.n.saturating_sub(first)))
    }

    /// Row `row`'s columns of `task`.
    ///
    /// # Safety
    /// Only `task`'s own caller may use its columns, and not through two
    /// live slices at once.
    #[allow(clippy::mut_from_ref)]
    unsafe fn part(&self, task: usize, row: usize) -> &mut [f32] {
        let (first, cols) = self.columns(task);
        assert!(row < self.m && first + cols <= self.n);
        // SAFETY: in bounds (asserted); the caller keeps tasks apart.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(row * self.n + first), cols) }
    }
}

/// How far ahead of the panel in use a product asks for weight bytes (in
/// whole panels). Even one row gains: one core's own stream from memory
/// is bound by the requests it has in flight, and these add to them.
const PREFETCH_AHEAD: usize = 32 << 10;

thread_local! {
    static PANEL_ROWS_IN: RefCell<Vec<PanelActivations>> = const { RefCell::new(Vec::new()) };
    static BYTE_ROWS_IN: RefCell<Vec<ByteActivations>> = const { RefCell::new(Vec::new()) };
    static SPAN_TERMS: RefCell<Vec<SpanTerms>> = const { RefCell::new(Vec::new()) };
    static TILE_ROWS_IN: RefCell<Vec<i8>> = const { RefCell::new(Vec::new()) };
    static WIDE_PANEL: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Products with at least this many rows and int8 activations go on AMX
/// tiles where the CPU has them.
const MIN_TILE_ROWS: usize = 32;

/// The product with weights in panels (AVX-512 VNNI), for any number of
/// rows, with activations quantised as the matrix says.
#[cfg(target_arch = "x86_64")]
fn panel_product(w: &PanelMatrix, x: &[f32], m: usize, out: &mut [f32]) {
    match w.activations {
        ActivationBits::Sixteen => PANEL_ROWS_IN.with(|cell| panel_product_in(cell, w, x, m, out)),
        ActivationBits::Eight
            if m >= MIN_TILE_ROWS
                && (w.cols / w.span).is_multiple_of(crate::panel_amx::SPANS_AT_ONCE)
                && crate::panel_amx::available() =>
        {
            BYTE_ROWS_IN.with(|cell| amx_panel_product(cell, w, x, m, out))
        }
        ActivationBits::Eight => BYTE_ROWS_IN.with(|cell| panel_product_in(cell, w, x, m, out)),
    }
}

/// How a panel product's tasks share out the panels (each task a run of
/// them, writing its own columns of every row) and what each block of
/// rows asks for ahead while it goes past one.
#[cfg(target_arch = "x86_64")]
struct PanelPlan<'a> {
    split: ColumnSplit<'a>,
    w: &'a PanelMatrix,
    panel_bytes: usize,
    /// Panels between the one in use and the one asked for.
    ahead: usize,
    /// Cache lines of that panel each block of rows asks for.
    share: usize,
}

#[cfg(target_arch = "x86_64")]
impl<'a> PanelPlan<'a> {
    /// The plan for `w`'s product into `out`, its rows going past each
    /// panel in `blocks` blocks.
    fn new(w: &'a PanelMatrix, out: &'a mut [f32], blocks: usize) -> Self {
        let panels = w.rows / PANEL_ROWS;
        let panels_per_task = (panels / (rayon::current_num_threads() * 4)).max(1);
        let panel_bytes = w.panel_bytes(0).len();
        PanelPlan {
            split: ColumnSplit::new(out, w.rows, panels_per_task * PANEL_ROWS),
            w,
            panel_bytes,
            ahead: PREFETCH_AHEAD.div_ceil(panel_bytes),
            share: panel_bytes.div_ceil(64).div_ceil(blocks.max(1)),
        }
    }

    /// Task `t`'s panels.
    fn panels(&self, t: usize) -> std::ops::Range<usize> {
        let (first, cols) = self.split.columns(t);
        first / PANEL_ROWS..(first + cols) / PANEL_ROWS
    }

    /// What block `b` of rows asks for while it goes past panel `p`.
    fn prefetch(&self, p: usize, b: usize) -> crate::panel_avx512::Prefetch {
        let next = self
            .w
            .bytes
            .as_ptr()
            .wrapping_add((p + self.ahead) * self.panel_bytes);
        crate::panel_avx512::Prefetch {
            from: next.wrapping_add(b * self.share * 64),
            lines: self.share,
        }
    }

    /// Writes `results` (16 outputs per row) as panel `p`'s outputs of
    /// rows `first_row..`.
    ///
    /// # Safety
    /// Only task `t`, the owner of `p`, may call this, one call at a time.
    unsafe fn store(&self, t: usize, p: usize, first_row: usize, results: &[f32]) {
        let at = p * PANEL_ROWS - self.split.columns(t).0;
        for (i, r) in results.chunks_exact(PANEL_ROWS).enumerate() {
            // SAFETY: the caller's contract: task `t` alone writes its
            // columns, one row at a time.
            let part = unsafe { self.split.part(t, first_row + i) };
            part[at..at + PANEL_ROWS].copy_from_slice(r);
        }
    }
}

/// [`panel_product`] on AMX tiles, with int8 activation rows in the
/// buffers of `cell`: each task owns a run of panels, widens each panel's
/// bytes once, and takes the rows 16 at a time. The same numbers as the
/// AVX-512 product, bit for bit.
#[cfg(target_arch = "x86_64")]
fn amx_panel_product(
    cell: &RefCell<Vec<ByteActivations>>,
    w: &PanelMatrix,
    x: &[f32],
    m: usize,
    out: &mut [f32],
) {
    use crate::panel_amx::TILE_ROWS;
    let k = w.cols;
    // Taken out of its cell, as the rows' buffers are.
    let mut tile_rows = TILE_ROWS_IN.with(|cell| cell.take());
    with_quantized_rows(cell, w, x, m, |rows, terms| {
        // Each block of 16 rows in the tiles' order, zero rows making up
        // the last.
        let padded = m.next_multiple_of(TILE_ROWS);
        tile_rows.resize(padded * k, 0);
        for (block, rows) in tile_rows
            .chunks_exact_mut(TILE_ROWS * k)
            .zip(rows.chunks(TILE_ROWS))
        {
            let mut values = [&[][..]; TILE_ROWS];
            for (v, x) in values.iter_mut().zip(rows) {
                *v = &x.q[..k];
            }
            crate::panel_amx::tile_order(&values[..rows.len()], w.span, block);
        }
        let tile_rows = &tile_rows;
        let blocks = padded / TILE_ROWS;
        let plan = PanelPlan::new(w, out, blocks);
        (0..plan.split.tasks()).into_par_iter().for_each(|t| {
            let mut results = [0f32; TILE_ROWS * PANEL_ROWS];
            let mut sums = crate::panel_amx::SpanSums::default();
            let mut scratch = WIDE_PANEL.with(|cell| cell.take());
            // SAFETY: `available()` checked every feature both need.
            let tiles = unsafe { crate::panel_amx::Tiles::configure(w) };
            for p in plan.panels(t) {
                // SAFETY: as above.
                let wide = unsafe { crate::panel_amx::wide_panel(w, p, &mut scratch) };
                for b in 0..blocks {
                    let first_row = b * TILE_ROWS;
                    let count = TILE_ROWS.min(m - first_row);
                    let prefetch = plan.prefetch(p, b);
                    let activations = &tile_rows[first_row * k..(first_row + TILE_ROWS) * k];
                    // A part tile of up to eight rows takes the half epilogue.
                    let rows_of = match count > ROW_BLOCK {
                        true => crate::panel_amx::panel_rows::<TILE_ROWS>,
                        false => crate::panel_amx::panel_rows::<ROW_BLOCK>,
                    };
                    // SAFETY: as above; the tiles are this thread's.
                    unsafe {
                        rows_of(
                            &tiles,
                            w,
                            p,
                            wide,
                            activations,
                            terms,
                            first_row,
                            prefetch,
                            &mut sums,
                            &mut results,
                        )
                    };
                    // SAFETY: this is task `t`, which owns panel `p`.
                    unsafe { plan.store(t, p, first_row, &results[..count * PANEL_ROWS]) };
                }
            }
            drop(tiles);
            WIDE_PANEL.with(|cell| cell.replace(scratch));
        });
    });
    TILE_ROWS_IN.with(|cell| cell.replace(tile_rows));
}

/// [`panel_product`] with activation rows of form `T`, in the buffers of
/// `cell`: each task owns a run of panels, and every group of up to eight
/// activation rows goes past a panel while its bytes are in the L1 cache.
#[cfg(target_arch = "x86_64")]
fn panel_product_in<T: crate::panel_avx512::PanelValue + Send + Sync>(
    cell: &RefCell<Vec<PanelActivations<T>>>,
    w: &PanelMatrix,
    x: &[f32],
    m: usize,
    out: &mut [f32],
) {
    with_quantized_rows(cell, w, x, m, |rows, terms| {
        let plan = PanelPlan::new(w, out, rows.len().div_ceil(ROW_BLOCK));
        (0..plan.split.tasks()).into_par_iter().for_each(|t| {
            let mut results = [0f32; ROW_BLOCK * PANEL_ROWS];
            for p in plan.panels(t) {
                for (b, block) in rows.chunks(ROW_BLOCK).enumerate() {
                    let results = &mut results[..block.len() * PANEL_ROWS];
                    let block_terms = SpanTerms::block(terms, w, b);
                    let prefetch = plan.prefetch(p, b);
                    // SAFETY: `available()` checked every feature it needs.
                    unsafe {
                        crate::panel_avx512::panel_product(
                            w,
                            p,
                            block,
                            block_terms,
                            prefetch,
                            results,
                        )
                    };
                    // SAFETY: this is task `t`, which owns panel `p`.
                    unsafe { plan.store(t, p, b * ROW_BLOCK, results) };
                }
            }
        });
    });
}

/// Runs `product` on the `m` rows of `x` (each `w.cols` long) quantised
/// into `cell`'s buffers, with their [`SpanTerms`] for `w`. The buffers
/// are taken out of their cells meanwhile: a worker that steals other
/// work while waiting in the product's parallel regions may run another
/// product on this thread, which then gets fresh ones.
#[cfg(target_arch = "x86_64")]
fn with_quantized_rows<T: crate::panel::QuantizedValue + Send + Sync>(
    cell: &RefCell<Vec<PanelActivations<T>>>,
    w: &PanelMatrix,
    x: &[f32],
    m: usize,
    product: impl FnOnce(&[PanelActivations<T>], &[SpanTerms]),
) {
    let mut buffer = cell.take();
    let mut terms = SPAN_TERMS.with(|cell| cell.take());
    let rows = &*quantize_rows(&mut buffer, x, w.cols, m);
    SpanTerms::fill(&mut terms, w, rows);
    product(rows, &terms);
    cell.replace(buffer);
    SPAN_TERMS.with(|cell| cell.replace(terms));
}

/// Batches up to this many rows multiply with integer activations: reading
/// and unpacking the weights dominates, and the integer path never expands
/// them to f32. Its rows are computed independently of each other, so a
/// row's result is the same whatever batch it is in.
const MAX_INT8_ROWS: usize = 8;

/// Activation rows that share each unpacked weight row before the next
/// weight row is taken (their int16 values stay in the L1 cache).
const INT8_ROW_BLOCK: usize = 16;

thread_local! {
    static QUANTIZED: RefCell<Vec<QuantizedRow>> = const { RefCell::new(Vec::new()) };
}

fn integer_product(w: &QMatrix<'_>, x: &[f32], m: usize, out: &mut [f32]) {
    let (k, n) = (w.cols, w.rows);
    // Taken out of its cell for the product, as in `panel_product`.
    let mut buffer = QUANTIZED.with(|cell| cell.take());
    {
        let rows = &*quantize_rows(&mut buffer, x, k, m);
        let cols_per_task = (n / (rayon::current_num_threads() * 4)).max(16);
        let split = ColumnSplit::new(out, n, cols_per_task);
        (0..split.tasks()).into_par_iter().for_each(|t| {
            let (n0, cols) = split.columns(t);
            let mut results = [0f32; INT8_ROW_BLOCK];
            for (b, block) in rows.chunks(INT8_ROW_BLOCK).enumerate() {
                for j in 0..cols {
                    dot_rows_q8(w.ty, w.row(n0 + j), block, &mut results[..block.len()]);
                    for (i, r) in results[..block.len()].iter().enumerate() {
                        // SAFETY: task `t` alone writes its columns, one
                        // row at a time.
                        let part = unsafe { split.part(t, b * INT8_ROW_BLOCK + i) };
                        part[j] = *r;
                    }
                }
            }
        });
    }
    QUANTIZED.with(|cell| cell.replace(buffer));
}

fn with_scratch(len: usize, f: impl FnOnce(&mut [f32])) {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < len {
            s.resize(len, 0.0);
        }
        f(&mut s[..len]);
    });
}

/// Computes columns `n0..n0+cols` of `m` output rows (row stride `out_stride`,
/// column `n0` stored at index 0 of each output row).
#[allow(clippy::too_many_arguments)]
fn tile_product(
    w: &QMatrix<'_>,
    n0: usize,
    cols: usize,
    x: &[f32],
    m: usize,
    out: &mut [f32],
    out_stride: usize,
    tile: &mut [f32],
) {
    let k = w.cols;
    let mut c = 0;
    while c < cols {
        let nr = TILE_ROWS.min(cols - c);
        for r in 0..nr {
            w.dequantize_row_into(n0 + c + r, &mut tile[r * k..(r + 1) * k]);
        }
        let mut i = 0;
        while i < m {
            let x0 = &x[i * k..(i + 1) * k];
            if nr == TILE_ROWS && i + 1 < m {
                let x1 = &x[(i + 1) * k..(i + 2) * k];
                let r = dot_2x4(x0, x1, tile, k);
                for j in 0..4 {
                    out[i * out_stride + c + j] = r[0][j];
                    out[(i + 1) * out_stride + c + j] = r[1][j];
                }
                i += 2;
            } else {
                for r in 0..nr {
                    out[i * out_stride + c + r] = dot_f32(x0, &tile[r * k..(r + 1) * k]);
                }
                i += 1;
            }
        }
        c += nr;
    }
}

/// Dots of one weight row with each of `xs`, into `out`; each result is
/// exactly what the one-row product gives for that row alone.
#[inline]
fn dot_rows_q8(ty: TensorType, row: &[u8], xs: &[QuantizedRow], out: &mut [f32]) {
    match simd_level() {
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 => {
            let mut i = 0;
            while i + 4 <= xs.len() {
                // SAFETY: AVX2, FMA and F16C were detected.
                let r = unsafe {
                    crate::integer_dot_avx2::dot_rows::<4>(
                        ty,
                        row,
                        [&xs[i], &xs[i + 1], &xs[i + 2], &xs[i + 3]],
                    )
                };
                out[i..i + 4].copy_from_slice(&r);
                i += 4;
            }
            while i < xs.len() {
                // SAFETY: as above.
                out[i] = unsafe { crate::integer_dot_avx2::dot_row_q8(ty, row, &xs[i]) };
                i += 1;
            }
        }
        _ => {
            for (o, x) in out.iter_mut().zip(xs) {
                *o = integer_dot::dot_row_q8(ty, row, x);
            }
        }
    }
}

/// Dots of two activation rows with four weight rows (`tile` holds 4 x `k`).
#[inline]
fn dot_2x4(x0: &[f32], x1: &[f32], tile: &[f32], k: usize) -> [[f32; 4]; 2] {
    match simd_level() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2 and FMA were detected; slices are checked inside.
        SimdLevel::Avx2 => unsafe { avx2::dot_2x4(x0, x1, tile, k) },
        _ => dot_2x4_portable(x0, x1, tile, k),
    }
}

fn dot_2x4_portable(x0: &[f32], x1: &[f32], tile: &[f32], k: usize) -> [[f32; 4]; 2] {
    let mut r = [[0f32; 4]; 2];
    for j in 0..4 {
        let w = &tile[j * k..(j + 1) * k];
        r[0][j] = dot_portable(x0, w);
        r[1][j] = dot_portable(x1, w);
    }
    r
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use crate::quant::{dequantize_row_unchecked, TensorType};

    /// The portable softmax numerators, compiled with AVX2 and FMA.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_below_in_place(x: &mut [f32], max: f32) -> f32 {
        super::exp_below_in_place_portable(x, max)
    }

    /// The portable `y += a x`, compiled with AVX2 and FMA.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
        super::axpy_portable(a, x, y)
    }

    /// The portable gated GELU, compiled with AVX2 and FMA.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn gelu_tanh_gated(gate: &mut [f32], up: &[f32]) {
        super::gelu_tanh_gated_portable(gate, up)
    }

    /// The portable gated SiLU, compiled with AVX2 and FMA.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn silu_gated(gate: &mut [f32], up: &[f32]) {
        super::silu_gated_portable(gate, up)
    }

    /// The portable maximum, compiled with AVX2 so its loop vectorises.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn max_f32(x: &[f32]) -> f32 {
        super::max_f32_portable(x)
    }

    /// The portable sum of exponentials, compiled with AVX2 and FMA.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn sum_exp_below(x: &[f32], max: f32) -> f64 {
        super::sum_exp_below_portable(x, max)
    }

    /// The portable dequantisation, compiled with AVX2 so its loops vectorise.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dequantize_row(ty: TensorType, bytes: &[u8], out: &mut [f32]) {
        dequantize_row_unchecked(ty, bytes, out)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps::<1>(v);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
        _mm_cvtss_f32(s)
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let chunks = n / 32;
        let pa = a.as_ptr();
        let pb = b.as_ptr();
        // SAFETY: every load reads 8 floats at an index below chunks*32 <= n.
        unsafe {
            let mut acc = [_mm256_setzero_ps(); 4];
            for c in 0..chunks {
                let o = c * 32;
                for (l, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(
                        _mm256_loadu_ps(pa.add(o + l * 8)),
                        _mm256_loadu_ps(pb.add(o + l * 8)),
                        *a,
                    );
                }
            }
            let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
            let mut total = hsum(s);
            for i in chunks * 32..n {
                total += a[i] * b[i];
            }
            total
        }
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_2x4(x0: &[f32], x1: &[f32], tile: &[f32], k: usize) -> [[f32; 4]; 2] {
        assert!(x0.len() >= k && x1.len() >= k && tile.len() >= 4 * k);
        let chunks = k / 8;
        let mut r = [[0f32; 4]; 2];
        // SAFETY: the assertion above bounds every 8-float load below chunks*8 <= k.
        unsafe {
            let (p0, p1, pw) = (x0.as_ptr(), x1.as_ptr(), tile.as_ptr());
            let mut a0 = [_mm256_setzero_ps(); 4];
            let mut a1 = [_mm256_setzero_ps(); 4];
            for c in 0..chunks {
                let o = c * 8;
                let v0 = _mm256_loadu_ps(p0.add(o));
                let v1 = _mm256_loadu_ps(p1.add(o));
                for j in 0..4 {
                    let wv = _mm256_loadu_ps(pw.add(j * k + o));
                    a0[j] = _mm256_fmadd_ps(v0, wv, a0[j]);
                    a1[j] = _mm256_fmadd_ps(v1, wv, a1[j]);
                }
            }
            for j in 0..4 {
                r[0][j] = hsum(a0[j]);
                r[1][j] = hsum(a1[j]);
            }
        }
        for i in chunks * 8..k {
            for j in 0..4 {
                r[0][j] += x0[i] * tile[j * k + i];
                r[1][j] += x1[i] * tile[j * k + i];
            }
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// On CPUs with AMX, the tile product gives the AVX-512 product's
    /// numbers bit for bit, for every weight type, for stacks of types, and
    /// for row counts that leave a part tile.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn tile_products_give_the_vector_products_numbers() {
        use crate::quant::test_blocks::{blocks, INTEGER_TYPES};
        if !crate::panel_amx::available() {
            eprintln!("no AMX here: the tile product is not checked");
            return;
        }
        let (rows, cols) = (32, 512);
        let mut packed = Vec::new();
        for (i, ty) in INTEGER_TYPES.into_iter().enumerate() {
            let count = rows * cols / ty.block_len();
            let raw: Vec<u8> = (0..count * ty.block_bytes())
                .map(|b| (b * 131 + i * 17 + b / 7) as u8)
                .collect();
            let bytes = blocks(ty, &raw, count, 0.03);
            let w = QMatrix {
                ty,
                rows,
                cols,
                bytes: &bytes,
                panels: None,
            };
            packed.push(PanelMatrix::pack(&w).unwrap());
        }
        // Q5_0 with Q8_0 (one zero), and Q8_0 with Q4_K (no zero).
        let stacks = [
            PanelMatrix::stack(&[&packed[1], &packed[2]]).unwrap(),
            PanelMatrix::stack(&[&packed[2], &packed[3]]).unwrap(),
        ];
        for w in packed.iter().chain(&stacks) {
            let w = PanelMatrix {
                activations: ActivationBits::Eight,
                ..w.clone()
            };
            for m in [32, 45, 64] {
                let x: Vec<f32> = (0..m * cols)
                    .map(|i| ((i * 37 % 101) as f32 - 50.0) / 13.0)
                    .collect();
                let mut vector = vec![0f32; m * w.rows];
                let mut tiles = vec![0f32; m * w.rows];
                BYTE_ROWS_IN.with(|cell| panel_product_in(cell, &w, &x, m, &mut vector));
                BYTE_ROWS_IN.with(|cell| amx_panel_product(cell, &w, &x, m, &mut tiles));
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&vector), bits(&tiles), "{:?} m={m}", w.bits);
            }
        }
    }

    #[test]
    fn fast_exp_is_close_to_exp() {
        let mut worst = 0f64;
        for i in 0..=87_000 {
            let x = -(i as f32) / 1000.0;
            let want = (x as f64).exp();
            let got = exp_non_positive(x) as f64;
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 1e-6, "{worst}");
        assert_eq!(exp_non_positive(-200.0), exp_non_positive(-87.0));
        let x = [-1.0f32, -2.0, 0.0];
        let want: f64 = x.iter().map(|&v| (v as f64).exp()).sum();
        assert!((sum_exp_below(&x, 0.0) - want).abs() < 1e-6);
        assert!((sum_exp_below_portable(&x, 0.0) - want).abs() < 1e-6);
        assert_eq!(max_f32(&[1.0, 5.0, -3.0]), 5.0);
        let xs: Vec<f32> = (-800..800).map(|i| i as f32 / 50.0).collect();
        let (mut g, mut s) = (xs.clone(), xs.clone());
        gelu_tanh_gated(&mut g, &vec![1.0; xs.len()]);
        silu_gated(&mut s, &vec![1.0; xs.len()]);
        for ((&x, g), s) in xs.iter().zip(g).zip(s) {
            let x64 = x as f64;
            let gelu =
                0.5 * x64 * (1.0 + (0.797_884_6 * x64 * (1.0 + 0.044_715 * x64 * x64)).tanh());
            let silu = x64 / (1.0 + (-x64).exp());
            assert!(
                (g as f64 - gelu).abs() < 1e-5 * (1.0 + gelu.abs()),
                "gelu {x}: {g} vs {gelu}"
            );
            assert!(
                (s as f64 - silu).abs() < 1e-5 * (1.0 + silu.abs()),
                "silu {x}: {s} vs {silu}"
            );
        }
        assert_eq!(argmax(&[1.0, 5.0, 5.0, -3.0]), 1);
    }

    proptest! {
        #[test]
        fn simd_dot_matches_portable(v in proptest::collection::vec(-3.0f32..3.0, 0..300)) {
            let (a, b) = v.split_at(v.len() / 2);
            let n = a.len().min(b.len());
            let want = dot_portable(&a[..n], &b[..n]);
            let got = dot_f32(&a[..n], &b[..n]);
            prop_assert!((want - got).abs() <= 1e-3 * (1.0 + want.abs()));
        }

        #[test]
        fn matmul_matches_naive(m in 1usize..7, n in 1usize..11, kb in 1usize..4,
                                seed in proptest::collection::vec(-1.0f32..1.0, 7 * 96 + 11 * 96)) {
            let k = kb * 32;
            let x = &seed[..m * k];
            let wf = &seed[7 * 96..7 * 96 + n * k];
            let bytes: Vec<u8> = wf.iter().flat_map(|v| v.to_le_bytes()).collect();
            let w = QMatrix { ty: TensorType::F32, rows: n, cols: k, bytes: &bytes, panels: None };
            // Whatever the buffer held is overwritten.
            let mut out = vec![f32::NAN; m * n];
            matmul(&w, x, m, &mut out);
            for i in 0..m {
                for j in 0..n {
                    let want: f32 = (0..k).map(|t| x[i * k + t] * wf[j * k + t]).sum();
                    prop_assert!((out[i * n + j] - want).abs() < 1e-3, "{i},{j}");
                }
            }
            let tile: Vec<f32> = wf.iter().copied().chain(std::iter::repeat(0.0)).take(4 * k).collect();
            if m >= 2 {
                let got = dot_2x4(&x[..k], &x[k..2 * k], &tile, k);
                let want = dot_2x4_portable(&x[..k], &x[k..2 * k], &tile, k);
                for r in 0..2 { for j in 0..4 { prop_assert!((got[r][j] - want[r][j]).abs() < 1e-3); } }
            }
        }
    }
}
