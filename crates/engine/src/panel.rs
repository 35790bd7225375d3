//! Weights repacked at load time into panels of 16 rows, for the product
//! on CPUs with AVX-512 VNNI.
//!
//! Every weight type is first unpacked to the common form of
//! [`crate::unpacked`] (unsigned bytes `u` with a multiplier `a` and an
//! offset `b`, the value being `a * u - b`), then laid out so that one
//! 512-bit register holds four consecutive values of each of 16 rows: the
//! 16 lanes of a `vpdpwssd` are 16 output features, and the activation
//! operand is one broadcast pair. A group of 16 values is four such
//! registers of bytes, stored as narrow as the type allows
//! ([`PanelBits`]: nibbles for 4-bit types, nibbles and one or two bit
//! planes for 5- and 6-bit ones), since one sequence's decode step is bound by the bytes it
//! reads. `a` and `b` for the 16 rows follow per span of 16 or 32 values
//! (the type's own scale blocks) as f16; for types whose offset is a fixed
//! multiple of the multiplier (`b = zero * a`: Q8_0, Q4_0, Q5_0, Q6_K) only
//! `a`. The float work (scales, offsets) is then done once per 16 products
//! instead of once per product, and a group of activation rows shares
//! every weight load. Each activation row's arithmetic is the same in any
//! batch.

use rayon::prelude::*;

use crate::integer_dot::ACT_BLOCK;
use crate::kernels::QMatrix;
use crate::quant::{f16_to_f32, f32_to_f16, TensorType};
use crate::unpacked::{UnpackedRow, LANE};

/// Weight rows per panel (one output feature per 32-bit lane).
pub const PANEL_ROWS: usize = 16;
/// Values per group: the unit of the product's loop.
pub const GROUP: usize = 16;
/// Bytes of a group in its widest form: 16 rows x 16 values.
const WIDE_GROUP_BYTES: usize = PANEL_ROWS * GROUP;

/// How a panel stores the bytes of a group. The product widens them to
/// four registers of one byte per value (the wide form, [`PanelBits::Eight`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PanelBits {
    /// One byte per value: the four registers as they are (256 bytes).
    Eight,
    /// Values below 16, two per byte: registers 0 and 1 in the low and high
    /// nibbles of the first 64 bytes, registers 2 and 3 in the next 64.
    Four,
    /// Values below 32: the low four bits as [`PanelBits::Four`], then the
    /// fifth bit of each register's 64 values as a little-endian 64-bit
    /// mask (160 bytes).
    Five,
    /// Values below 64: the low four bits as [`PanelBits::Four`], then 64
    /// bytes whose byte `i` holds bits 4 and 5 of value `i` of register `q`
    /// at bits `2q` and `2q + 1` (192 bytes).
    Six,
}

impl PanelBits {
    /// The narrowest form that holds every unpacked value of `ty`.
    fn of(ty: TensorType) -> Self {
        match ty {
            TensorType::Q4_0 | TensorType::Q4K => PanelBits::Four,
            TensorType::Q5_0 | TensorType::Q5K => PanelBits::Five,
            TensorType::Q6K => PanelBits::Six,
            _ => PanelBits::Eight,
        }
    }

    /// Bytes per group.
    pub fn group_bytes(self) -> usize {
        match self {
            PanelBits::Eight => WIDE_GROUP_BYTES,
            PanelBits::Four => WIDE_GROUP_BYTES / 2,
            PanelBits::Five => WIDE_GROUP_BYTES / 2 + WIDE_GROUP_BYTES / 8,
            PanelBits::Six => WIDE_GROUP_BYTES / 2 + WIDE_GROUP_BYTES / 4,
        }
    }

    /// A group in this form, from its wide form.
    fn narrow(self, wide: &[u8], out: &mut [u8]) {
        match self {
            PanelBits::Eight => out.copy_from_slice(wide),
            _ => {
                for i in 0..64 {
                    out[i] = (wide[i] & 0x0f) | (wide[64 + i] << 4);
                    out[64 + i] = (wide[128 + i] & 0x0f) | (wide[192 + i] << 4);
                }
                if self == PanelBits::Five {
                    for q in 0..4 {
                        let mask = (0..64).fold(0u64, |m, i| {
                            m | (u64::from((wide[q * 64 + i] >> 4) & 1) << i)
                        });
                        out[128 + q * 8..136 + q * 8].copy_from_slice(&mask.to_le_bytes());
                    }
                }
                if self == PanelBits::Six {
                    for i in 0..64 {
                        out[128 + i] =
                            (0..4).fold(0u8, |b, q| b | ((wide[q * 64 + i] >> 4) & 3) << (2 * q));
                    }
                }
            }
        }
    }

    /// The wide form of a group stored in this form.
    pub fn widen(self, group: &[u8]) -> [u8; WIDE_GROUP_BYTES] {
        let mut wide = [0u8; WIDE_GROUP_BYTES];
        match self {
            PanelBits::Eight => wide.copy_from_slice(group),
            _ => {
                for i in 0..64 {
                    wide[i] = group[i] & 0x0f;
                    wide[64 + i] = group[i] >> 4;
                    wide[128 + i] = group[64 + i] & 0x0f;
                    wide[192 + i] = group[64 + i] >> 4;
                }
                if self == PanelBits::Five {
                    for q in 0..4 {
                        let at = 128 + q * 8;
                        let mut mask = [0u8; 8];
                        mask.copy_from_slice(&group[at..at + 8]);
                        let mask = u64::from_le_bytes(mask);
                        for i in 0..64 {
                            wide[q * 64 + i] |= (((mask >> i) & 1) as u8) << 4;
                        }
                    }
                }
                if self == PanelBits::Six {
                    for i in 0..64 {
                        for q in 0..4 {
                            wide[q * 64 + i] |= ((group[128 + i] >> (2 * q)) & 3) << 4;
                        }
                    }
                }
            }
        }
        wide
    }
}

/// How finely a panel product quantises its activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ActivationBits {
    /// int16 per block of 32 values ([`PanelActivations`]): what a panel
    /// takes until a model sets otherwise.
    #[default]
    Sixteen,
    /// int8 per block of 32 values ([`ByteActivations`]), as llama.cpp
    /// does: twice the products per instruction, 256 times the rounding.
    Eight,
}

/// Which [`ActivationBits`] each product of a model takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ActivationPrecision {
    /// int16 in every product: the closest to exact arithmetic.
    Sixteen,
    /// int8 in every product, as llama.cpp.
    Eight,
    /// int8, except the feed-forward down projection in int16: the
    /// default. Its input (the gated product of two projections) rounds
    /// worst in int8, and it is a tenth to a fifth of the work; this mix
    /// agrees with llama.cpp as closely as 16 bits everywhere (see
    /// `docs/performance.md`).
    #[default]
    Mixed,
}

impl ActivationPrecision {
    /// The bits of the feed-forward down projection.
    pub fn feed_forward_down(self) -> ActivationBits {
        match self {
            ActivationPrecision::Eight => ActivationBits::Eight,
            ActivationPrecision::Sixteen | ActivationPrecision::Mixed => ActivationBits::Sixteen,
        }
    }

    /// The bits of every other product (attention, gate and up, the head).
    pub fn elsewhere(self) -> ActivationBits {
        match self {
            ActivationPrecision::Sixteen => ActivationBits::Sixteen,
            ActivationPrecision::Eight | ActivationPrecision::Mixed => ActivationBits::Eight,
        }
    }
}

/// A weight matrix in panels (see the module documentation).
#[derive(Debug, Clone)]
pub struct PanelMatrix {
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// How each group's bytes are stored.
    pub bits: PanelBits,
    /// Values that share one multiplier (and offset): 16 or 32.
    pub span: usize,
    /// Per panel, per group, in the form `bits`: four 64-byte registers;
    /// lane `r` of register `q` holds values `4q..4q + 4` of row `r` of the
    /// group.
    pub bytes: Vec<u8>,
    /// Per panel, per `span` values: `a` of its 16 rows, then `b` (unless
    /// `zero` gives it), as f16 bits.
    pub scales: Vec<u16>,
    /// When every offset is this multiple of its multiplier, the offsets
    /// are not stored.
    pub zero: Option<f32>,
    /// How the product quantises activations.
    pub activations: ActivationBits,
}

/// The zero that stacked byte panels of types with different zeros share.
const COMMON_ZERO: f32 = 128.0;

/// The fixed ratio of offset to multiplier of a weight type's unpacked form,
/// when it has one.
fn zero_of(ty: TensorType) -> Option<f32> {
    match ty {
        TensorType::Q8_0 => Some(128.0),
        TensorType::Q4_0 => Some(8.0),
        TensorType::Q5_0 => Some(16.0),
        TensorType::Q6K => Some(32.0),
        _ => None,
    }
}

/// Values sharing one multiplier and offset in a type's unpacked form.
fn span_of(ty: TensorType) -> usize {
    match ty {
        TensorType::Q8_0
        | TensorType::Q4_0
        | TensorType::Q5_0
        | TensorType::Q4K
        | TensorType::Q5K => 32,
        _ => GROUP,
    }
}

impl PanelMatrix {
    /// Whether a matrix can be packed.
    pub fn supports(w: &QMatrix<'_>) -> bool {
        crate::integer_dot::supports(w.ty)
            && w.rows.is_multiple_of(PANEL_ROWS)
            && w.cols.is_multiple_of(ACT_BLOCK)
            && w.cols > 0
    }

    /// Repacks `w` (see [`PanelMatrix::supports`]), spread over the rayon pool.
    pub fn pack(w: &QMatrix<'_>) -> Option<Self> {
        if !Self::supports(w) {
            return None;
        }
        let (rows, cols) = (w.rows, w.cols);
        let groups = cols / GROUP;
        let (bits, span, zero) = (PanelBits::of(w.ty), span_of(w.ty), zero_of(w.ty));
        let per_span = scales_per_group(zero);
        let group_bytes = bits.group_bytes();
        let mut bytes = vec![0u8; rows / PANEL_ROWS * groups * group_bytes];
        let mut scales = vec![0u16; rows / PANEL_ROWS * cols / span * per_span];
        bytes
            .par_chunks_mut(groups * group_bytes)
            .zip(scales.par_chunks_mut(cols / span * per_span))
            .enumerate()
            .for_each_init(
                || (UnpackedRow::default(), vec![0u8; PANEL_ROWS * cols]),
                |(unpacked, wide), (p, (bytes, scales))| {
                    for r in 0..PANEL_ROWS {
                        unpack_row(unpacked, w, p * PANEL_ROWS + r);
                        for g in 0..groups {
                            let group = &mut wide[g * WIDE_GROUP_BYTES..][..WIDE_GROUP_BYTES];
                            for q in 0..GROUP / LANE {
                                let from = g * GROUP + q * LANE;
                                let to = q * 64 + r * LANE;
                                group[to..to + LANE]
                                    .copy_from_slice(&unpacked.u[from..from + LANE]);
                            }
                        }
                        for (i, s) in scales.chunks_exact_mut(per_span).enumerate() {
                            let lane = i * span / LANE;
                            s[r] = f32_to_f16(unpacked.a[lane]);
                            if zero.is_none() {
                                s[PANEL_ROWS + r] = f32_to_f16(unpacked.b[lane]);
                            }
                        }
                    }
                    for (wide, out) in wide
                        .chunks_exact(WIDE_GROUP_BYTES)
                        .zip(bytes.chunks_exact_mut(group_bytes))
                    {
                        bits.narrow(wide, out);
                    }
                },
            );
        Some(PanelMatrix {
            rows,
            cols,
            bits,
            span,
            bytes,
            scales,
            zero,
            activations: ActivationBits::default(),
        })
    }

    /// The same matrix with one byte per value and scales per `span`
    /// values (its own or 16), the form that any other panels can stack
    /// with. With `recenter`, a matrix with a zero moves its bytes so that
    /// the zero is [`COMMON_ZERO`]: `u - z = (u + 128 - z) - 128` exactly,
    /// and every type's bytes stay below 256 (at most 63 + 96).
    fn widened(&self, span: usize, recenter: bool) -> PanelMatrix {
        let per_span = scales_per_group(self.zero);
        let spans = self.cols / span;
        let shift = match (recenter, self.zero) {
            (true, Some(z)) => (COMMON_ZERO - z) as u8,
            _ => 0,
        };
        let mut bytes = Vec::with_capacity(self.rows * self.cols);
        let mut scales = Vec::with_capacity(self.rows / PANEL_ROWS * spans * per_span);
        for p in 0..self.rows / PANEL_ROWS {
            for group in self.panel_bytes(p).chunks_exact(self.bits.group_bytes()) {
                bytes.extend(self.bits.widen(group).iter().map(|&u| u + shift));
            }
            let panel_scales = self.panel_scales(p);
            for i in 0..spans {
                let at = i * span / self.span * per_span;
                scales.extend_from_slice(&panel_scales[at..at + per_span]);
            }
        }
        PanelMatrix {
            rows: self.rows,
            cols: self.cols,
            bits: PanelBits::Eight,
            span,
            bytes,
            scales,
            zero: match (recenter, self.zero) {
                (true, Some(_)) => Some(COMMON_ZERO),
                (_, zero) => zero,
            },
            activations: self.activations,
        }
    }

    /// The matrices stacked: the rows of `parts` one after another (their
    /// columns must agree). Panels do not depend on the weight type, so
    /// matrices of different types stack, and one product computes them all;
    /// parts stored in different forms are widened first.
    pub fn stack(parts: &[&PanelMatrix]) -> Option<Self> {
        let first = parts.first()?;
        let cols = first.cols;
        if parts.iter().any(|p| p.cols != cols) {
            return None;
        }
        let widened: Vec<PanelMatrix>;
        let parts: Vec<&PanelMatrix> = if parts
            .iter()
            .all(|p| p.bits == first.bits && p.span == first.span)
        {
            parts.to_vec()
        } else {
            // The finest span of the parts; parts that all have zeros keep
            // one (moved to a common one), so the product folds it.
            let span = parts.iter().map(|p| p.span).min().unwrap_or(GROUP);
            let recenter = parts.iter().all(|p| p.zero.is_some());
            widened = parts.iter().map(|p| p.widened(span, recenter)).collect();
            widened.iter().collect()
        };
        let first = parts.first()?;
        // Parts with different zeros store their offsets.
        let zero = first
            .zero
            .filter(|_| parts.iter().all(|p| p.zero == first.zero));
        let scales = parts
            .iter()
            .flat_map(|p| match (zero, p.zero) {
                (None, Some(z)) => p.scales_with_offsets(z),
                _ => p.scales.clone(),
            })
            .collect();
        Some(PanelMatrix {
            rows: parts.iter().map(|p| p.rows).sum(),
            cols,
            bits: first.bits,
            span: first.span,
            bytes: parts.iter().flat_map(|p| p.bytes.iter().copied()).collect(),
            scales,
            zero,
            activations: first.activations,
        })
    }

    /// The scales of a matrix with `zero`, with the offsets written out
    /// (exactly: `zero` is a power of two).
    fn scales_with_offsets(&self, zero: f32) -> Vec<u16> {
        let mut out = Vec::with_capacity(2 * self.scales.len());
        for a in self.scales.chunks_exact(PANEL_ROWS) {
            out.extend_from_slice(a);
            out.extend(a.iter().map(|&h| f32_to_f16(zero * f16_to_f32(h))));
        }
        out
    }

    /// Bytes held.
    pub fn size_bytes(&self) -> usize {
        self.bytes.len() + 2 * self.scales.len()
    }

    /// The bytes of panel `p`.
    pub fn panel_bytes(&self, p: usize) -> &[u8] {
        let len = self.cols / GROUP * self.bits.group_bytes();
        &self.bytes[p * len..(p + 1) * len]
    }

    /// The scales of panel `p`.
    pub fn panel_scales(&self, p: usize) -> &[u16] {
        let len = self.cols / self.span * scales_per_group(self.zero);
        &self.scales[p * len..(p + 1) * len]
    }
}

/// Scales stored per group of a panel: `a` of 16 rows, and `b` unless a
/// zero gives it.
pub fn scales_per_group(zero: Option<f32>) -> usize {
    match zero {
        Some(_) => PANEL_ROWS,
        None => 2 * PANEL_ROWS,
    }
}

fn unpack_row(unpacked: &mut UnpackedRow, w: &QMatrix<'_>, r: usize) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
    {
        // SAFETY: AVX2, FMA and F16C were just detected.
        unsafe { crate::unpacked_avx512::unpack(unpacked, w.ty, w.row(r), w.cols) };
        return;
    }
    unpacked.unpack(w.ty, w.row(r), w.cols);
}

/// An activation row for the panel product: integers `T` in blocks of 32
/// with an f32 scale, and per group of 16 the scale, the scale times the
/// group's sum (for the weights' offsets) and the sum. `T` is `i16` (the
/// default) or `i8` ([`ByteActivations`]).
#[derive(Debug, Default, Clone)]
pub struct PanelActivations<T = i16> {
    /// Quantised values, in order.
    pub q: Vec<T>,
    /// Per group of 16: the scale of its block.
    pub scale: Vec<f32>,
    /// Per group of 16: the scale times the sum of its values.
    pub scaled_sum: Vec<f32>,
    /// Per group of 16: the sum of its values.
    pub sum: Vec<i32>,
}

/// An activation row with int8 values: half the width of the int16 one, so
/// each instruction multiplies twice as many values, with 256 times the
/// rounding (the precision llama.cpp uses).
pub type ByteActivations = PanelActivations<i8>;

/// The integer type of quantised activations.
pub trait QuantizedValue: Copy + Default + Into<i32> {
    /// Largest magnitude: a block's scale is its largest `|x|` over this.
    const MAX: f32;
    /// `t` rounded half away from zero (saturating; NaN gives 0).
    fn round_from(t: f32) -> Self;
    /// Quantises whole blocks with the CPU's vector instructions when there
    /// are any for this type (the same numbers as the portable loop); false
    /// when not.
    fn quantize_vector(_x: &[f32], _row: &mut PanelActivations<Self>) -> bool {
        false
    }
}

impl QuantizedValue for i16 {
    const MAX: f32 = 32767.0;

    fn round_from(t: f32) -> Self {
        // Half away from zero, as `round`, without a libm call.
        (t + 0.5f32.copysign(t)) as i16
    }

    #[cfg(target_arch = "x86_64")]
    fn quantize_vector(x: &[f32], row: &mut PanelActivations<i16>) -> bool {
        quantize_with_avx512(x, row)
    }
}

impl QuantizedValue for i8 {
    const MAX: f32 = 127.0;

    fn round_from(t: f32) -> Self {
        (t + 0.5f32.copysign(t)) as i8
    }

    #[cfg(target_arch = "x86_64")]
    fn quantize_vector(x: &[f32], row: &mut PanelActivations<i8>) -> bool {
        quantize_with_avx512(x, row)
    }
}

/// [`QuantizedValue::quantize_vector`] with AVX-512, when the CPU has it.
#[cfg(target_arch = "x86_64")]
fn quantize_with_avx512<T: crate::panel_avx512::PanelValue>(
    x: &[f32],
    row: &mut PanelActivations<T>,
) -> bool {
    if crate::panel_avx512::available() {
        // SAFETY: AVX-512 F was detected (with the product's features).
        unsafe {
            crate::panel_avx512::quantize_blocks(
                x,
                &mut row.q,
                &mut row.scale,
                &mut row.scaled_sum,
                &mut row.sum,
            )
        };
        return true;
    }
    false
}

impl<T: QuantizedValue> PanelActivations<T> {
    /// Quantises `x` (length a multiple of 32) into `self`, reusing its
    /// buffers: per block the scale `max |x| / T::MAX`, each value rounded
    /// half away from zero (NaNs become 0).
    pub fn quantize(&mut self, x: &[f32]) {
        let groups = x.len() / GROUP;
        self.q.resize(x.len(), T::default());
        self.scale.resize(groups, 0.0);
        self.scaled_sum.resize(groups, 0.0);
        self.sum.resize(groups, 0);
        if !T::quantize_vector(x, self) {
            self.quantize_blocks_portable(x);
        }
    }

    /// The blocks of [`PanelActivations::quantize`] in plain Rust (buffers
    /// already sized).
    fn quantize_blocks_portable(&mut self, x: &[f32]) {
        for (b, xs) in x.chunks_exact(ACT_BLOCK).enumerate() {
            let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / T::MAX;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            let qs = &mut self.q[b * ACT_BLOCK..(b + 1) * ACT_BLOCK];
            for (q, v) in qs.iter_mut().zip(xs) {
                *q = T::round_from(v * inv);
            }
            for h in 0..ACT_BLOCK / GROUP {
                let sum: i32 = qs[h * GROUP..(h + 1) * GROUP]
                    .iter()
                    .map(|&v| v.into())
                    .sum();
                let g = b * ACT_BLOCK / GROUP + h;
                self.scale[g] = d;
                self.scaled_sum[g] = d * sum as f32;
                self.sum[g] = sum;
            }
        }
    }
}

/// The portable product of panel `p` with one activation row: the
/// reference for the vector code. Returns the panel's 16 outputs.
pub fn panel_dot_portable(w: &PanelMatrix, p: usize, x: &PanelActivations) -> [f32; PANEL_ROWS] {
    let bytes = w.panel_bytes(p);
    let scales = w.panel_scales(p);
    let per_span = scales_per_group(w.zero);
    let mut out = [0f32; PANEL_ROWS];
    for (g, group) in bytes.chunks_exact(w.bits.group_bytes()).enumerate() {
        let group = w.bits.widen(group);
        let s = &scales[g * GROUP / w.span * per_span..][..per_span];
        for (r, o) in out.iter_mut().enumerate() {
            let mut sum = 0i32;
            for q in 0..GROUP / LANE {
                for t in 0..LANE {
                    let u = group[q * 64 + r * LANE + t] as i32;
                    sum += u * x.q[g * GROUP + q * LANE + t] as i32;
                }
            }
            let a = f16_to_f32(s[r]);
            let b = match w.zero {
                Some(z) => z * a,
                None => f16_to_f32(s[PANEL_ROWS + r]),
            };
            *o += a * x.scale[g] * sum as f32 - b * x.scaled_sum[g];
        }
    }
    out
}

/// Activation rows that go past a panel together (the most the AVX-512
/// kernel keeps in registers), and whose [`SpanTerms`] lie together.
pub const ROW_BLOCK: usize = 8;

/// What a product needs of one activation row per scale span of its
/// matrix besides the integers: worked out once per product, not once per
/// panel, and laid out (see [`SpanTerms::fill`]) so that one address
/// register reaches every row of a block.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct SpanTerms {
    /// The scale of the activation block the span lies in.
    pub scale: f32,
    /// What the span's integer sum starts from: minus the matrix's zero
    /// times the sum of the span's values, so that the sum comes out as
    /// `sum (u - zero) x` (0 when the matrix has no zero).
    pub start: i32,
    /// The sum of the span's scaled group sums, which the stored offsets
    /// multiply (0 when the matrix has a zero).
    pub offset: f32,
}

impl SpanTerms {
    /// Span `span`'s terms of row `x` for `w`.
    pub fn of<T: QuantizedValue>(w: &PanelMatrix, x: &PanelActivations<T>, span: usize) -> Self {
        let span_groups = w.span / GROUP;
        let g0 = span * span_groups;
        let groups = g0..g0 + span_groups;
        match w.zero {
            Some(zero) => {
                let total: i32 = x.sum[groups].iter().sum();
                SpanTerms {
                    scale: x.scale[g0],
                    start: -(zero as i32 * total),
                    offset: 0.0,
                }
            }
            None => SpanTerms {
                scale: x.scale[g0],
                start: 0,
                offset: x.scaled_sum[g0 + 1..g0 + span_groups]
                    .iter()
                    .fold(x.scaled_sum[g0], |o, s| o + s),
            },
        }
    }

    /// The terms of block `b` of rows (rows `8 b..8 b + 8`) in a table that
    /// [`SpanTerms::fill`] wrote for `w`: row `8 b + j`'s terms of span `s`
    /// at `s * ROW_BLOCK + j`.
    pub fn block<'t>(table: &'t [SpanTerms], w: &PanelMatrix, b: usize) -> &'t [SpanTerms] {
        let len = w.cols / w.span * ROW_BLOCK;
        &table[b * len..(b + 1) * len]
    }

    /// Writes the terms of `rows` for `w` into `table`, per block of
    /// [`ROW_BLOCK`] rows, per span, per row of the block: row `i`'s terms
    /// of span `s` at `(i / ROW_BLOCK * spans + s) * ROW_BLOCK + i % ROW_BLOCK`.
    pub fn fill<T: QuantizedValue>(
        table: &mut Vec<SpanTerms>,
        w: &PanelMatrix,
        rows: &[PanelActivations<T>],
    ) {
        let spans = w.cols / w.span;
        table.clear();
        table.resize(
            rows.len().div_ceil(ROW_BLOCK) * spans * ROW_BLOCK,
            SpanTerms::default(),
        );
        for (b, block) in rows.chunks(ROW_BLOCK).enumerate() {
            let terms = &mut table[b * spans * ROW_BLOCK..(b + 1) * spans * ROW_BLOCK];
            for (slot, x) in block.iter().enumerate() {
                for span in 0..spans {
                    terms[span * ROW_BLOCK + slot] = SpanTerms::of(w, x, span);
                }
            }
        }
    }
}

/// The portable byte product of panel `p` with one row: the reference for
/// the vector code, the same operations in the same order (integer sums
/// over a scale span, then the span's scales). Returns the panel's 16
/// outputs.
pub fn byte_panel_dot_portable(
    w: &PanelMatrix,
    p: usize,
    x: &ByteActivations,
) -> [f32; PANEL_ROWS] {
    let bytes = w.panel_bytes(p);
    let scales = w.panel_scales(p);
    let per_span = scales_per_group(w.zero);
    let span_groups = w.span / GROUP;
    let mut acc = [0f32; PANEL_ROWS];
    let mut corr = [0f32; PANEL_ROWS];
    let groups: Vec<[u8; WIDE_GROUP_BYTES]> = bytes
        .chunks_exact(w.bits.group_bytes())
        .map(|g| w.bits.widen(g))
        .collect();
    for (span, groups) in groups.chunks_exact(span_groups).enumerate() {
        let g0 = span * span_groups;
        let s = &scales[span * per_span..][..per_span];
        let terms = SpanTerms::of(w, x, span);
        for r in 0..PANEL_ROWS {
            let mut sum = terms.start;
            for (k, group) in groups.iter().enumerate() {
                for q in 0..GROUP / LANE {
                    for t in 0..LANE {
                        let u = group[q * 64 + r * LANE + t] as i32;
                        sum += u * x.q[(g0 + k) * GROUP + q * LANE + t] as i32;
                    }
                }
            }
            let scale = f16_to_f32(s[r]) * terms.scale;
            acc[r] = scale.mul_add(sum as f32, acc[r]);
            if w.zero.is_none() {
                corr[r] = f16_to_f32(s[PANEL_ROWS + r]).mul_add(terms.offset, corr[r]);
            }
        }
    }
    std::array::from_fn(|r| acc[r] - corr[r])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::dequantize_row;
    use proptest::prelude::*;

    use crate::quant::test_blocks::{blocks, INTEGER_TYPES as TYPES};

    /// Random blocks of `ty` for `values` weights, with sane f16 scales.
    fn random_blocks(ty: TensorType, seed: u64, scale: f32, values: usize) -> Vec<u8> {
        let mut state = seed | 1;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let count = values / ty.block_len();
        let raw: Vec<u8> = (0..count * ty.block_bytes())
            .map(|_| next() as u8)
            .collect();
        blocks(ty, &raw, count, scale)
    }

    /// Rows in the vector product's check: a block of eight, one of four,
    /// and one alone.
    #[cfg(target_arch = "x86_64")]
    const CHECKED_ROWS: usize = 13;

    /// Panel `p`'s outputs from the AVX-512 product for [`CHECKED_ROWS`]
    /// copies of `x` (row `i`'s at `16 i..16 i + 16`), when the CPU has it.
    #[cfg(target_arch = "x86_64")]
    fn avx512_outputs<T: crate::panel_avx512::PanelValue>(
        packed: &PanelMatrix,
        p: usize,
        x: &PanelActivations<T>,
    ) -> Option<[f32; CHECKED_ROWS * PANEL_ROWS]> {
        crate::panel_avx512::available().then(|| {
            let mut out = [0f32; CHECKED_ROWS * PANEL_ROWS];
            let xs: Vec<PanelActivations<T>> = (0..CHECKED_ROWS).map(|_| x.clone()).collect();
            let mut terms = Vec::new();
            SpanTerms::fill(&mut terms, packed, &xs);
            // SAFETY: the features were just detected.
            unsafe {
                crate::panel_avx512::panel_product(
                    packed,
                    p,
                    &xs,
                    &terms,
                    crate::panel_avx512::Prefetch::NONE,
                    &mut out,
                )
            };
            out
        })
    }

    /// Row `r` of `w` times `xq` in f64, and the sum of the products'
    /// magnitudes (plus a little, for a tolerance relative to it).
    fn float_product(w: &QMatrix<'_>, r: usize, xq: &[f32]) -> (f64, f64) {
        let mut row = vec![0f32; w.cols];
        dequantize_row(w.ty, w.row(r), &mut row).unwrap();
        let products = row.iter().zip(xq).map(|(a, b)| *a as f64 * *b as f64);
        let want = products.clone().sum();
        (want, products.map(f64::abs).sum::<f64>() + 1e-3)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(40))]
        #[test]
        fn panel_products_match_float_products(
            ty_index in 0usize..TYPES.len(),
            seed in any::<u64>(),
            scale in 0.01f32..0.1,
            xs in proptest::collection::vec(-3.0f32..3.0, 512),
        ) {
            let ty = TYPES[ty_index];
            let (rows, cols) = (32, 512);
            let bytes = random_blocks(ty, seed, scale, rows * cols);
            let w = QMatrix { ty, rows, cols, bytes: &bytes, panels: None };
            let packed = PanelMatrix::pack(&w).unwrap();
            let mut x = PanelActivations::<i16>::default();
            x.quantize(&xs);
            let xq: Vec<f32> = (0..cols).map(|i| x.q[i] as f32 * x.scale[i / GROUP]).collect();
            for p in 0..rows / PANEL_ROWS {
                let got = panel_dot_portable(&packed, p, &x);
                #[cfg(target_arch = "x86_64")]
                let simd = avx512_outputs(&packed, p, &x);
                for r in 0..PANEL_ROWS {
                    let (want, scale) = float_product(&w, p * PANEL_ROWS + r, &xq);
                    // The f16 scales round a and b by at most 2^-11.
                    prop_assert!((got[r] as f64 - want).abs() <= 2e-3 * scale, "{ty:?} row {r}: {} vs {want}", got[r]);
                    #[cfg(target_arch = "x86_64")]
                    if let Some(simd) = simd {
                        for i in 0..CHECKED_ROWS {
                            let v = simd[i * PANEL_ROWS + r] as f64;
                            prop_assert!((v - got[r] as f64).abs() <= 1e-4 * scale, "{ty:?} row {r}: AVX-512 {v} vs portable {}", got[r]);
                            prop_assert_eq!(simd[i * PANEL_ROWS + r].to_bits(), simd[r].to_bits());
                        }
                    }
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(40))]
        #[test]
        fn byte_panel_products_match_float_products(
            ty_index in 0usize..TYPES.len(),
            seed in any::<u64>(),
            scale in 0.01f32..0.1,
            xs in proptest::collection::vec(-3.0f32..3.0, 512),
        ) {
            let ty = TYPES[ty_index];
            let (rows, cols) = (32, 512);
            let bytes = random_blocks(ty, seed, scale, rows * cols);
            let w = QMatrix { ty, rows, cols, bytes: &bytes, panels: None };
            let packed = PanelMatrix::pack(&w).unwrap();
            let mut x = ByteActivations::default();
            x.quantize(&xs);
            // Each value within half its block's scale.
            let xq: Vec<f32> = (0..cols).map(|i| x.q[i] as f32 * x.scale[i / GROUP]).collect();
            for (i, (a, b)) in xq.iter().zip(&xs).enumerate() {
                prop_assert!((a - b).abs() <= x.scale[i / GROUP] * 0.5001, "value {i}: {a} for {b}");
            }
            for p in 0..rows / PANEL_ROWS {
                let got = byte_panel_dot_portable(&packed, p, &x);
                #[cfg(target_arch = "x86_64")]
                let simd = avx512_outputs(&packed, p, &x);
                for r in 0..PANEL_ROWS {
                    let (want, scale) = float_product(&w, p * PANEL_ROWS + r, &xq);
                    prop_assert!((got[r] as f64 - want).abs() <= 2e-3 * scale, "{ty:?} row {r}: {} vs {want}", got[r]);
                    #[cfg(target_arch = "x86_64")]
                    if let Some(simd) = simd {
                        for i in 0..CHECKED_ROWS {
                            let v = simd[i * PANEL_ROWS + r];
                            prop_assert_eq!(v.to_bits(), got[r].to_bits(), "{:?} row {}: AVX-512 {} vs portable {}", ty, r, v, got[r]);
                        }
                    }
                }
            }
        }
    }

    /// Quantising `xs` to `T` gives the portable loop's numbers, bit for bit.
    fn vector_and_portable_agree<T: QuantizedValue + std::fmt::Debug + PartialEq>(
        xs: &[f32],
    ) -> Result<(), TestCaseError> {
        let mut simd = PanelActivations::<T>::default();
        simd.quantize(xs);
        let mut portable = simd.clone();
        portable.quantize_blocks_portable(xs);
        prop_assert_eq!(&simd.q, &portable.q);
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        prop_assert_eq!(bits(&simd.scale), bits(&portable.scale));
        prop_assert_eq!(bits(&simd.scaled_sum), bits(&portable.scaled_sum));
        prop_assert_eq!(&simd.sum, &portable.sum);
        Ok(())
    }

    proptest! {
        #[test]
        fn vector_quantisation_gives_the_portable_numbers(
            mut xs in proptest::collection::vec(-50.0f32..50.0, 1..8usize).prop_flat_map(|v| {
                proptest::collection::vec(-50.0f32..50.0, v.len() * 32)
            }),
            zero_block in any::<bool>(),
        ) {
            if zero_block {
                xs[..32].fill(0.0);
            }
            let middle = xs.len() / 2;
            xs[middle] = f32::NAN;
            vector_and_portable_agree::<i16>(&xs)?;
            vector_and_portable_agree::<i8>(&xs)?;
        }
    }

    #[test]
    fn stacked_panels_of_mixed_types_give_their_parts_results() {
        // Q8_0 and Q6_K store no offsets, Q4_K does: a stack of them writes
        // the offsets out. Q4_K and Q5_0 store nibbles, the others bytes,
        // and Q6_K has a scale per 16 values: the stack widens them. Every
        // row keeps its bits.
        let cols = 256;
        let x: Vec<f32> = (0..cols)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0)
            .collect();
        let mut act = PanelActivations::<i16>::default();
        act.quantize(&x);
        let mut parts = Vec::new();
        for (k, ty) in [
            TensorType::Q8_0,
            TensorType::Q4K,
            TensorType::Q6K,
            TensorType::Q5_0,
        ]
        .into_iter()
        .enumerate()
        {
            let count = 16 * cols / ty.block_len();
            let raw: Vec<u8> = (0..count * ty.block_bytes())
                .map(|i| (i * 31 + k * 7) as u8)
                .collect();
            let bytes = blocks(ty, &raw, count, 0.05);
            let w = QMatrix {
                ty,
                rows: 16,
                cols,
                bytes: &bytes,
                panels: None,
            };
            parts.push(PanelMatrix::pack(&w).unwrap());
        }
        assert!(parts[0].zero.is_some() && parts[1].zero.is_none());
        assert_eq!(parts[1].bits, PanelBits::Four);
        assert_eq!(parts[2].bits, PanelBits::Six);
        assert_eq!(parts[3].bits, PanelBits::Five);
        let refs: Vec<&PanelMatrix> = parts.iter().collect();
        let stacked = PanelMatrix::stack(&refs).unwrap();
        assert_eq!((stacked.zero, stacked.bits), (None, PanelBits::Eight));
        let same = PanelMatrix::stack(&[&parts[0], &parts[0]]).unwrap();
        assert_eq!(same.zero, parts[0].zero);
        for (p, part) in parts.iter().enumerate() {
            let alone = panel_dot_portable(part, 0, &act);
            let within = panel_dot_portable(&stacked, p, &act);
            assert_eq!(
                alone.map(f32::to_bits),
                within.map(f32::to_bits),
                "part {p}"
            );
        }
        assert_eq!(
            panel_dot_portable(&same, 1, &act).map(f32::to_bits),
            panel_dot_portable(&parts[0], 0, &act).map(f32::to_bits)
        );

        // Q5_0 and Q8_0 (query and value in the models) both have zeros:
        // their stack moves them to one zero, exactly, and keeps folding it
        // into the integer sums, with the same bits as alone.
        let order = [3, 0];
        let centered = PanelMatrix::stack(&order.map(|i| &parts[i])).unwrap();
        assert_eq!(
            (centered.zero, centered.bits, centered.span),
            (Some(COMMON_ZERO), PanelBits::Eight, 2 * GROUP)
        );
        for (p, &i) in order.iter().enumerate() {
            let alone = panel_dot_portable(&parts[i], 0, &act);
            let within = panel_dot_portable(&centered, p, &act);
            for (a, w) in alone.iter().zip(&within) {
                assert!(
                    (a - w).abs() <= 1e-4 * (a.abs() + 1.0),
                    "part {i}: {a} vs {w}"
                );
            }
            #[cfg(target_arch = "x86_64")]
            if crate::panel_avx512::available() {
                let (mut a, mut w) = ([0f32; PANEL_ROWS], [0f32; PANEL_ROWS]);
                let rows = [act.clone()];
                let (mut alone_terms, mut stacked_terms) = (Vec::new(), Vec::new());
                SpanTerms::fill(&mut alone_terms, &parts[i], &rows);
                SpanTerms::fill(&mut stacked_terms, &centered, &rows);
                // SAFETY: the features were just detected.
                unsafe {
                    let none = crate::panel_avx512::Prefetch::NONE;
                    crate::panel_avx512::panel_product(
                        &parts[i],
                        0,
                        &rows,
                        &alone_terms,
                        none,
                        &mut a,
                    );
                    crate::panel_avx512::panel_product(
                        &centered,
                        p,
                        &rows,
                        &stacked_terms,
                        none,
                        &mut w,
                    );
                }
                assert_eq!(a.map(f32::to_bits), w.map(f32::to_bits), "part {i}");
            }
        }
    }
}
