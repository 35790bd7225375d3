//! One model description for the `gemma3`, `qwen2` and `llama` families, and
//! the forward pass over it.
//!
//! The differences between the families are data in [`ModelConfig`]: norms
//! after attention and MLP, QK-norm, embedding scaling, RoPE style and base
//! per layer, sliding-window layers, activation, attention biases, tied or
//! separate output head. Weights stay quantised in the memory map; only the
//! small f32 vectors (norms, biases) are copied.

use std::path::Path;
use std::sync::Arc;

use rayon::prelude::*;

use crate::attention::{HeadSpan, SharedHeads, MAX_SHARED_HEADS};
use crate::error::EngineError;
use crate::gguf::{GgufBytes, GgufFile, MetaValue, TensorInfo};
use crate::kernels::{gelu_tanh_gated, matmul, silu_gated, QMatrix};
use crate::kv_cache::{KvCache, KvPool};
use crate::panel::{ActivationBits, ActivationPrecision, PanelMatrix};
use crate::quant::{dequantize_row_unchecked, TensorType};

/// Most positions a model may declare (2^24, beyond any released model's
/// context): buffers sized by the context stay bounded whatever a file says.
pub const MAX_CONTEXT_LENGTH: usize = 1 << 24;

/// Model family, from `general.architecture`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Google Gemma 3.
    Gemma3,
    /// Alibaba Qwen 2 / 2.5.
    Qwen2,
    /// Meta Llama and compatible models.
    Llama,
}

/// Gated MLP activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// GELU, tanh approximation (Gemma).
    GeluTanh,
    /// SiLU / swish (Qwen, Llama).
    Silu,
}

/// How RoPE pairs the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Dimension `i` pairs with `i + rot/2` (GPT-NeoX; Gemma, Qwen).
    Neox,
    /// Dimension `2i` pairs with `2i + 1` (original Llama layout in GGUF).
    Interleaved,
}

/// Hyper-parameters and layout of a model, read from GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Model family.
    pub architecture: Architecture,
    /// Number of transformer blocks.
    pub n_layers: usize,
    /// Width of the residual stream.
    pub d_model: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `n_heads`).
    pub n_kv_heads: usize,
    /// Dimension of each query/key head.
    pub head_dim: usize,
    /// Dimension of each value head.
    pub value_dim: usize,
    /// Hidden width of the MLP.
    pub ffn_dim: usize,
    /// Vocabulary size (rows of the output head).
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// RoPE base of global-attention layers.
    pub rope_base: f32,
    /// RoPE base of sliding-window layers.
    pub rope_base_sliding: f32,
    /// Dimensions of each head that RoPE rotates.
    pub rope_dims: usize,
    /// RoPE pairing.
    pub rope_style: RopeStyle,
    /// Window of sliding-window layers, in tokens (a query sees this many keys, itself included).
    pub sliding_window: Option<usize>,
    /// Per layer: whether it uses the sliding window.
    pub layer_sliding: Vec<bool>,
    /// Multiplier applied to token embeddings (Gemma: sqrt(d_model)).
    pub embedding_scale: Option<f32>,
    /// Multiplier applied to attention scores.
    pub attention_scale: f32,
    /// MLP activation.
    pub activation: Activation,
    /// Maximum context the model was trained for.
    pub context_length: usize,
}

/// A weight matrix that lives in the memory map, with its panels when the
/// CPU's product uses them.
#[derive(Debug, Clone)]
struct WeightRef {
    ty: TensorType,
    rows: usize,
    cols: usize,
    offset: usize,
    len: usize,
    panels: Option<PanelMatrix>,
}

#[derive(Debug)]
struct LayerWeights {
    attn_norm: Vec<f32>,
    wq: WeightRef,
    wk: WeightRef,
    wv: WeightRef,
    wo: WeightRef,
    bq: Option<Vec<f32>>,
    bk: Option<Vec<f32>>,
    bv: Option<Vec<f32>>,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    post_attn_norm: Option<Vec<f32>>,
    ffn_norm: Vec<f32>,
    w_gate: WeightRef,
    w_up: WeightRef,
    w_down: WeightRef,
    post_ffn_norm: Option<Vec<f32>>,
    /// Query, key and value projections stacked, when in panels.
    qkv: Option<PanelMatrix>,
    /// Gate and up projections stacked, when in panels.
    gate_up: Option<PanelMatrix>,
}

impl LayerWeights {
    /// The layer's seven weight matrices.
    fn matrices_mut(&mut self) -> [&mut WeightRef; 7] {
        [
            &mut self.wq,
            &mut self.wk,
            &mut self.wv,
            &mut self.wo,
            &mut self.w_gate,
            &mut self.w_up,
            &mut self.w_down,
        ]
    }
}

/// A loaded model: configuration plus weights referenced in the memory map.
#[derive(Debug)]
pub struct Model {
    /// Hyper-parameters.
    pub config: ModelConfig,
    bytes: Arc<GgufBytes>,
    token_embedding: WeightRef,
    output_norm: Vec<f32>,
    output: WeightRef,
    layers: Vec<LayerWeights>,
}

fn meta<'a>(gguf: &'a GgufFile, key: &str) -> Result<&'a MetaValue, EngineError> {
    gguf.meta(key)
        .ok_or_else(|| EngineError::Model(format!("missing metadata key {key}")))
}

fn meta_usize(gguf: &GgufFile, key: &str) -> Result<usize, EngineError> {
    meta(gguf, key)?
        .as_u64()
        .map(|v| v as usize)
        .ok_or_else(|| EngineError::Model(format!("{key} is not an integer")))
}

fn meta_f32_or(gguf: &GgufFile, key: &str, default: f32) -> Result<f32, EngineError> {
    match gguf.meta(key) {
        None => Ok(default),
        Some(v) => v
            .as_f64()
            .map(|v| v as f32)
            .ok_or_else(|| EngineError::Model(format!("{key} is not a number"))),
    }
}

/// Limits that keep a hostile file from asking for absurd buffers.
const MAX_DIM: usize = 1 << 20;

impl ModelConfig {
    /// Reads the configuration from GGUF metadata.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self, EngineError> {
        let arch_name = meta(gguf, "general.architecture")?
            .as_str()
            .ok_or_else(|| EngineError::Model("general.architecture is not a string".into()))?
            .to_string();
        let architecture = match arch_name.as_str() {
            "gemma3" => Architecture::Gemma3,
            "qwen2" => Architecture::Qwen2,
            "llama" => Architecture::Llama,
            other => {
                return Err(EngineError::Model(format!(
                    "architecture {other:?} is not supported (gemma3, qwen2, llama are)"
                )))
            }
        };
        let a = arch_name.as_str();
        let key = |k: &str| format!("{a}.{k}");
        let n_layers = meta_usize(gguf, &key("block_count"))?;
        let d_model = meta_usize(gguf, &key("embedding_length"))?;
        let n_heads = meta_usize(gguf, &key("attention.head_count"))?;
        let n_kv_heads = match gguf.meta(&key("attention.head_count_kv")) {
            Some(_) => meta_usize(gguf, &key("attention.head_count_kv"))?,
            None => n_heads,
        };
        if n_heads == 0 || n_kv_heads == 0 || n_heads % n_kv_heads != 0 || d_model == 0 {
            return Err(EngineError::Model(format!(
                "bad head counts: {n_heads} query heads, {n_kv_heads} key/value heads"
            )));
        }
        let head_dim = match gguf.meta(&key("attention.key_length")) {
            Some(_) => meta_usize(gguf, &key("attention.key_length"))?,
            None => d_model / n_heads,
        };
        let value_dim = match gguf.meta(&key("attention.value_length")) {
            Some(_) => meta_usize(gguf, &key("attention.value_length"))?,
            None => head_dim,
        };
        let ffn_dim = meta_usize(gguf, &key("feed_forward_length"))?;
        let rope_dims = match gguf.meta(&key("rope.dimension_count")) {
            Some(_) => meta_usize(gguf, &key("rope.dimension_count"))?,
            None => head_dim,
        };
        for (what, v) in [
            ("block_count", n_layers),
            ("embedding_length", d_model),
            ("head_count", n_heads),
            ("key_length", head_dim),
            ("value_length", value_dim),
            ("feed_forward_length", ffn_dim),
        ] {
            if v == 0 || v > MAX_DIM {
                return Err(EngineError::Model(format!("{what} = {v} is out of range")));
            }
        }
        if rope_dims > head_dim || rope_dims % 2 != 0 || rope_dims / 2 > MAX_ROPE_PAIRS {
            return Err(EngineError::Model(format!(
                "rope.dimension_count {rope_dims} does not fit head size {head_dim}"
            )));
        }
        let rms_eps = meta_f32_or(gguf, &key("attention.layer_norm_rms_epsilon"), 1e-6)?;
        let rope_base = meta_f32_or(gguf, &key("rope.freq_base"), 10_000.0)?;
        let context_length = match gguf.meta(&key("context_length")) {
            Some(_) => meta_usize(gguf, &key("context_length"))?,
            None => 4096,
        };
        // Buffers are sized by the context (attention scores, per thread):
        // a file cannot ask for more than any model has.
        if !(1..=MAX_CONTEXT_LENGTH).contains(&context_length) {
            return Err(EngineError::Model(format!(
                "context_length {context_length} is outside 1..={MAX_CONTEXT_LENGTH}, the positions this engine supports"
            )));
        }
        let token_embd = gguf
            .tensor("token_embd.weight")
            .ok_or_else(|| EngineError::Model("missing tensor token_embd.weight".into()))?;
        let vocab_size = token_embd.rows();

        let (sliding_window, layer_sliding, rope_base_sliding, embedding_scale, activation) =
            match architecture {
                Architecture::Gemma3 => {
                    let window = meta_usize(gguf, &key("attention.sliding_window"))?;
                    let pattern = match gguf.meta(&key("attention.sliding_window_pattern")) {
                        Some(v) => v.as_u64().unwrap_or(6) as usize,
                        None => 6,
                    }
                    .max(1);
                    // Every `pattern`-th layer attends globally; the others slide.
                    let sliding = (0..n_layers).map(|l| l % pattern < pattern - 1).collect();
                    (
                        Some(window),
                        sliding,
                        10_000.0,
                        Some((d_model as f32).sqrt()),
                        Activation::GeluTanh,
                    )
                }
                Architecture::Qwen2 | Architecture::Llama => (
                    None,
                    vec![false; n_layers],
                    rope_base,
                    None,
                    Activation::Silu,
                ),
            };
        let rope_style = match architecture {
            Architecture::Llama => RopeStyle::Interleaved,
            _ => RopeStyle::Neox,
        };
        Ok(ModelConfig {
            architecture,
            n_layers,
            d_model,
            n_heads,
            n_kv_heads,
            head_dim,
            value_dim,
            ffn_dim,
            vocab_size,
            rms_eps,
            rope_base,
            rope_base_sliding,
            rope_dims,
            rope_style,
            sliding_window,
            layer_sliding,
            embedding_scale,
            attention_scale: 1.0 / (head_dim as f32).sqrt(),
            activation,
            context_length,
        })
    }
}

impl Model {
    /// Opens and loads the GGUF model at `path`.
    pub fn open(path: &Path) -> Result<(Self, GgufFile), EngineError> {
        let gguf = GgufFile::open(path)?;
        let model = Self::load(&gguf)?;
        Ok((model, gguf))
    }

    /// Builds the model from a parsed GGUF file, checking every tensor's shape.
    pub fn load(gguf: &GgufFile) -> Result<Self, EngineError> {
        let config = ModelConfig::from_gguf(gguf)?;
        let c = &config;
        let weight = |name: &str, cols: usize, rows: usize| -> Result<WeightRef, EngineError> {
            let t = gguf
                .tensor(name)
                .ok_or_else(|| EngineError::Model(format!("missing tensor {name}")))?;
            check_dims(t, cols, rows)?;
            Ok(WeightRef {
                ty: t.ty,
                rows,
                cols,
                offset: t.file_offset,
                len: t.byte_len,
                panels: None,
            })
        };
        let vector = |name: &str, len: usize| -> Result<Vec<f32>, EngineError> {
            let t = gguf
                .tensor(name)
                .ok_or_else(|| EngineError::Model(format!("missing tensor {name}")))?;
            check_dims(t, len, 1)?;
            let mut out = vec![0f32; len];
            dequantize_row_unchecked(t.ty, gguf.tensor_bytes(t), &mut out);
            Ok(out)
        };
        let optional_vector = |name: &str, len: usize| -> Result<Option<Vec<f32>>, EngineError> {
            match gguf.tensor(name) {
                None => Ok(None),
                Some(_) => vector(name, len).map(Some),
            }
        };
        let q_dim = c.n_heads * c.head_dim;
        let k_dim = c.n_kv_heads * c.head_dim;
        let v_dim = c.n_kv_heads * c.value_dim;
        let o_in = c.n_heads * c.value_dim;
        let mut layers = Vec::with_capacity(c.n_layers);
        for l in 0..c.n_layers {
            let p = |s: &str| format!("blk.{l}.{s}");
            layers.push(LayerWeights {
                attn_norm: vector(&p("attn_norm.weight"), c.d_model)?,
                wq: weight(&p("attn_q.weight"), c.d_model, q_dim)?,
                wk: weight(&p("attn_k.weight"), c.d_model, k_dim)?,
                wv: weight(&p("attn_v.weight"), c.d_model, v_dim)?,
                wo: weight(&p("attn_output.weight"), o_in, c.d_model)?,
                bq: optional_vector(&p("attn_q.bias"), q_dim)?,
                bk: optional_vector(&p("attn_k.bias"), k_dim)?,
                bv: optional_vector(&p("attn_v.bias"), v_dim)?,
                q_norm: optional_vector(&p("attn_q_norm.weight"), c.head_dim)?,
                k_norm: optional_vector(&p("attn_k_norm.weight"), c.head_dim)?,
                post_attn_norm: optional_vector(&p("post_attention_norm.weight"), c.d_model)?,
                ffn_norm: vector(&p("ffn_norm.weight"), c.d_model)?,
                w_gate: weight(&p("ffn_gate.weight"), c.d_model, c.ffn_dim)?,
                w_up: weight(&p("ffn_up.weight"), c.d_model, c.ffn_dim)?,
                w_down: weight(&p("ffn_down.weight"), c.ffn_dim, c.d_model)?,
                post_ffn_norm: optional_vector(&p("post_ffw_norm.weight"), c.d_model)?,
                qkv: None,
                gate_up: None,
            });
        }
        let token_embedding = weight("token_embd.weight", c.d_model, c.vocab_size)?;
        let output = match gguf.tensor("output.weight") {
            Some(_) => weight("output.weight", c.d_model, c.vocab_size)?,
            None => token_embedding.clone(),
        };
        let mut model = Model {
            output_norm: vector("output_norm.weight", c.d_model)?,
            config,
            bytes: gguf.shared_bytes(),
            token_embedding,
            output,
            layers,
        };
        model.pack_panels();
        Ok(model)
    }

    /// Whether a row's results are the same in any batch: every matrix is in
    /// panels, whose product computes each row on its own. Then keys and
    /// values computed in one pass can be reused by any other, position by
    /// position.
    pub fn batch_invariant(&self) -> bool {
        self.output.panels.is_some()
            && self.layers.iter().all(|l| {
                (l.qkv.is_some() || [&l.wq, &l.wk, &l.wv].iter().all(|w| w.panels.is_some()))
                    && (l.gate_up.is_some()
                        || [&l.w_gate, &l.w_up].iter().all(|w| w.panels.is_some()))
                    && l.wo.panels.is_some()
                    && l.w_down.panels.is_some()
            })
    }

    /// Repacks every matrix the forward pass multiplies by into panels, when
    /// this CPU's product uses them (the embedding table stays as it is:
    /// only single rows are read from it), at the default
    /// [`ActivationPrecision`].
    fn pack_panels(&mut self) {
        if !crate::kernels::panels_in_use() {
            return;
        }
        let bytes = Arc::clone(&self.bytes);
        let pack = |w: &mut WeightRef| {
            let m = QMatrix {
                ty: w.ty,
                rows: w.rows,
                cols: w.cols,
                bytes: bytes.slice(w.offset, w.len),
                panels: None,
            };
            w.panels = PanelMatrix::pack(&m);
            if w.panels.is_some() {
                // The panels replace these bytes in every product.
                bytes.release(w.offset, w.len);
            }
        };
        pack(&mut self.output);
        for l in &mut self.layers {
            for w in l.matrices_mut() {
                pack(w);
            }
            // Projections of the same input are stacked: one product each.
            l.qkv = stack_panels(&mut [&mut l.wq, &mut l.wk, &mut l.wv]);
            l.gate_up = stack_panels(&mut [&mut l.w_gate, &mut l.w_up]);
        }
        self.set_activation_precision(ActivationPrecision::default());
    }

    /// Sets how each product in panels quantises its activations (see
    /// [`ActivationPrecision`]); without AVX-512 VNNI nothing is in panels
    /// and nothing changes.
    pub fn set_activation_precision(&mut self, precision: ActivationPrecision) {
        let set = |p: &mut Option<PanelMatrix>, bits: ActivationBits| {
            if let Some(p) = p {
                p.activations = bits;
            }
        };
        let elsewhere = precision.elsewhere();
        set(&mut self.output.panels, elsewhere);
        for l in &mut self.layers {
            for w in l.matrices_mut() {
                set(&mut w.panels, elsewhere);
            }
            set(&mut l.w_down.panels, precision.feed_forward_down());
            set(&mut l.qkv, elsewhere);
            set(&mut l.gate_up, elsewhere);
        }
    }

    fn matrix<'a>(&'a self, w: &'a WeightRef) -> QMatrix<'a> {
        QMatrix {
            ty: w.ty,
            rows: w.rows,
            cols: w.cols,
            bytes: self.bytes.slice(w.offset, w.len),
            panels: w.panels.as_ref(),
        }
    }

    /// Runs `tokens` through the model after the positions already in `cache`,
    /// appends their keys and values to it (in blocks of `pool`), and returns the logits of the rows
    /// `logits_from..tokens.len()` (`vocab_size` values each).
    pub fn forward(
        &self,
        pool: &mut KvPool,
        tokens: &[u32],
        cache: &mut KvCache,
        logits_from: usize,
    ) -> Result<Vec<f32>, EngineError> {
        self.forward_batch(
            pool,
            &mut [BatchSequence {
                tokens,
                cache,
                logits_from,
            }],
        )
    }

    /// Runs several sequences through the model in one pass: their rows
    /// share every weight read, while each attends only to its own cache.
    /// Returns the logits of each sequence's rows from its `logits_from`,
    /// sequence after sequence. Rows are computed independently of each
    /// other, so a sequence gets the same logits in any batch.
    ///
    /// Every sequence's blocks for the new positions are taken from `pool`
    /// before anything runs; when the pool cannot give them all, the pass
    /// fails with [`EngineError::OutOfKvMemory`] (blocks already taken stay
    /// with their sequences, which may use them in a later pass).
    pub fn forward_batch(
        &self,
        pool: &mut KvPool,
        batch: &mut [BatchSequence<'_>],
    ) -> Result<Vec<f32>, EngineError> {
        let mut scratch = ForwardScratch::default();
        self.forward_batch_with(pool, batch, &mut scratch)?;
        Ok(std::mem::take(&mut scratch.logits))
    }

    /// [`Model::forward_batch`] in the buffers of `scratch`, which holds
    /// the logits it returns: once the buffers have grown to the batch's
    /// size, a pass allocates nothing.
    pub fn forward_batch_with<'s>(
        &self,
        pool: &mut KvPool,
        batch: &mut [BatchSequence<'_>],
        scratch: &'s mut ForwardScratch,
    ) -> Result<&'s mut [f32], EngineError> {
        let c = &self.config;
        for s in batch.iter_mut() {
            self.check_sequence(s)?;
        }
        for s in batch.iter_mut() {
            pool.grow(s.cache, s.tokens.len())?;
        }
        if !scratch.threads_ready {
            crate::attention::reserve_thread_buffers(c.context_length);
            scratch.threads_ready = true;
        }
        let ForwardScratch {
            row_seq,
            row_pos,
            x,
            xn,
            q,
            k,
            v,
            attn,
            proj,
            gate,
            up,
            stacked,
            rope_global,
            rope_sliding,
            picked,
            last,
            logits,
            threads_ready: _,
        } = scratch;
        let t_len: usize = batch.iter().map(|s| s.tokens.len()).sum();
        // Row r belongs to sequence `row_seq[r]` and sits at `row_pos[r]`.
        row_seq.clear();
        row_pos.clear();
        for (i, s) in batch.iter().enumerate() {
            let p0 = s.cache.len();
            row_seq.extend(std::iter::repeat_n(i, s.tokens.len()));
            row_pos.extend(p0..p0 + s.tokens.len());
        }
        let d = c.d_model;
        zeroed(x, t_len * d);
        let emb = self.matrix(&self.token_embedding);
        let row_bytes = emb.ty.row_bytes(emb.cols);
        let all_tokens = batch.iter().flat_map(|s| s.tokens.iter());
        for (row, &tok) in x.chunks_exact_mut(d).zip(all_tokens) {
            emb.dequantize_row_into(tok as usize, row);
            // Rows are read one at a time and rarely again soon: their
            // pages leave this process's resident memory at once instead
            // of piling up over the whole vocabulary.
            let offset = self.token_embedding.offset + tok as usize * row_bytes;
            self.bytes.release(offset, row_bytes);
            if let Some(s) = c.embedding_scale {
                row.iter_mut().for_each(|v| *v *= s);
            }
        }
        let q_dim = c.n_heads * c.head_dim;
        let k_dim = c.n_kv_heads * c.head_dim;
        let v_dim = c.n_kv_heads * c.value_dim;
        let o_in = c.n_heads * c.value_dim;
        zeroed(xn, t_len * d);
        zeroed(q, t_len * q_dim);
        zeroed(k, t_len * k_dim);
        zeroed(v, t_len * v_dim);
        zeroed(attn, t_len * o_in);
        zeroed(proj, t_len * d);
        rope_table(c.rope_base, c.rope_dims, row_pos, rope_global);
        let separate_sliding = c.rope_base_sliding != c.rope_base;
        if separate_sliding {
            rope_table(c.rope_base_sliding, c.rope_dims, row_pos, rope_sliding);
        }
        for (l, w) in self.layers.iter().enumerate() {
            rms_norm_rows(x, xn, &w.attn_norm, c.rms_eps);
            if let Some(qkv) = &w.qkv {
                let width = q_dim + k_dim + v_dim;
                zeroed(stacked, t_len * width);
                matmul(&stacked_matrix(qkv), xn, t_len, stacked);
                unstack(stacked, t_len, &mut [&mut *q, &mut *k, &mut *v]);
            } else {
                matmul(&self.matrix(&w.wq), xn, t_len, q);
                matmul(&self.matrix(&w.wk), xn, t_len, k);
                matmul(&self.matrix(&w.wv), xn, t_len, v);
            }
            add_bias(q, w.bq.as_deref());
            add_bias(k, w.bk.as_deref());
            add_bias(v, w.bv.as_deref());
            if let Some(n) = &w.q_norm {
                rms_norm_in_place(q, n, c.rms_eps);
            }
            if let Some(n) = &w.k_norm {
                rms_norm_in_place(k, n, c.rms_eps);
            }
            let angles = if c.layer_sliding[l] && separate_sliding {
                &*rope_sliding
            } else {
                &*rope_global
            };
            rope(q, q_dim, c.head_dim, angles, c.rope_style);
            rope(k, k_dim, c.head_dim, angles, c.rope_style);
            let mut r0 = 0;
            for s in batch.iter() {
                let r1 = r0 + s.tokens.len();
                pool.write(
                    s.cache.table(l),
                    s.cache.len(),
                    &k[r0 * k_dim..r1 * k_dim],
                    &v[r0 * v_dim..r1 * v_dim],
                );
                r0 = r1;
            }
            let window = if c.layer_sliding[l] {
                c.sliding_window
            } else {
                None
            };
            self.attention(pool, q, batch, l, row_seq, row_pos, window, attn);
            matmul(&self.matrix(&w.wo), attn, t_len, proj);
            if let Some(n) = &w.post_attn_norm {
                rms_norm_in_place(proj, n, c.rms_eps);
            }
            x.iter_mut().zip(proj.iter()).for_each(|(a, b)| *a += b);

            rms_norm_rows(x, xn, &w.ffn_norm, c.rms_eps);
            let activate = match c.activation {
                Activation::GeluTanh => gelu_tanh_gated,
                Activation::Silu => silu_gated,
            };
            let f = c.ffn_dim;
            if let Some(gate_up) = &w.gate_up {
                // Each row is gate then up: the activation goes in place
                // into the gate half, and the halves are then packed into
                // the first `t_len * f` values.
                zeroed(stacked, t_len * 2 * f);
                matmul(&stacked_matrix(gate_up), xn, t_len, stacked);
                let gate_and_up = |row: &mut [f32]| {
                    let (g, u) = row.split_at_mut(f);
                    activate(g, u);
                };
                if t_len * f <= 4096 {
                    stacked.chunks_exact_mut(2 * f).for_each(gate_and_up);
                } else {
                    stacked.par_chunks_exact_mut(2 * f).for_each(gate_and_up);
                }
                for r in 1..t_len {
                    stacked.copy_within(2 * r * f..2 * r * f + f, r * f);
                }
                matmul(&self.matrix(&w.w_down), &stacked[..t_len * f], t_len, proj);
            } else {
                zeroed(gate, t_len * f);
                zeroed(up, t_len * f);
                matmul(&self.matrix(&w.w_gate), xn, t_len, gate);
                matmul(&self.matrix(&w.w_up), xn, t_len, up);
                if gate.len() <= 4096 {
                    activate(gate, up);
                } else {
                    gate.par_chunks_mut(4096)
                        .zip(up.par_chunks(4096))
                        .for_each(|(g, u)| activate(g, u));
                }
                matmul(&self.matrix(&w.w_down), gate, t_len, proj);
            }
            if let Some(n) = &w.post_ffn_norm {
                rms_norm_in_place(proj, n, c.rms_eps);
            }
            x.iter_mut().zip(proj.iter()).for_each(|(a, b)| *a += b);
        }
        for s in batch.iter_mut() {
            pool.commit(s.cache, s.tokens);
        }
        // The rows whose logits were asked for.
        picked.clear();
        let mut r0 = 0;
        for s in batch.iter() {
            picked.extend(r0 + s.logits_from..r0 + s.tokens.len());
            r0 += s.tokens.len();
        }
        let rows = picked.len();
        zeroed(last, rows * d);
        for (out, &r) in last.chunks_exact_mut(d).zip(picked.iter()) {
            rms_norm_rows(&x[r * d..(r + 1) * d], out, &self.output_norm, c.rms_eps);
        }
        // Every product writes all of its output: the vocabulary-wide
        // buffer is not cleared first.
        sized(logits, rows * c.vocab_size);
        matmul(&self.matrix(&self.output), last, rows, logits);
        Ok(logits.as_mut_slice())
    }

    /// Checks that every token id is in the vocabulary.
    pub fn check_tokens(&self, tokens: &[u32]) -> Result<(), EngineError> {
        let vocab = self.config.vocab_size;
        match tokens.iter().find(|&&t| t as usize >= vocab) {
            Some(&bad) => Err(EngineError::InvalidRequest(format!(
                "token id {bad} is outside the vocabulary (size {vocab})"
            ))),
            None => Ok(()),
        }
    }

    /// Checks one sequence of a batch before anything runs.
    fn check_sequence(&self, s: &mut BatchSequence<'_>) -> Result<(), EngineError> {
        let c = &self.config;
        let t_len = s.tokens.len();
        if t_len == 0 {
            return Err(EngineError::InvalidRequest("no tokens to run".into()));
        }
        if s.logits_from > t_len {
            return Err(EngineError::InvalidRequest(format!(
                "logits asked from row {} of a batch of {t_len}",
                s.logits_from
            )));
        }
        if s.cache.len() + t_len > c.context_length {
            return Err(EngineError::InvalidRequest(format!(
                "{} tokens exceed the model's context of {}",
                s.cache.len() + t_len,
                c.context_length
            )));
        }
        self.check_tokens(s.tokens)
    }

    /// A key/value pool of `budget_bytes` for this model, caching prefixes
    /// when reused keys and values are the ones a fresh pass would compute
    /// ([`Model::batch_invariant`]).
    pub fn kv_pool(&self, budget_bytes: usize) -> KvPool {
        KvPool::new(&self.config, budget_bytes, self.batch_invariant())
    }

    /// Causal attention of each row's query over its own sequence's cached
    /// keys and values (the `layer` block table of `batch[row_seq[r]]`, in
    /// `pool`), up to its position.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        pool: &KvPool,
        q: &[f32],
        batch: &[BatchSequence<'_>],
        layer: usize,
        row_seq: &[usize],
        row_pos: &[usize],
        window: Option<usize>,
        out: &mut [f32],
    ) {
        let c = &self.config;
        let (hd, vd) = (c.head_dim, c.value_dim);
        let group = c.n_heads / c.n_kv_heads;
        let (width, out_width) = (c.n_heads * hd, c.n_heads * vd);
        let shared = group.min(MAX_SHARED_HEADS);
        let span = |t: usize| {
            let pos = row_pos[t];
            (window.map_or(0, |w| (pos + 1).saturating_sub(w)), pos)
        };
        // Rows go in pairs: two consecutive rows of one sequence (a prompt)
        // share each KV head's keys and values when their heads fit in one
        // call; otherwise each row's heads that read one KV head go
        // together, `MAX_SHARED_HEADS` at a time.
        out.par_chunks_mut(2 * out_width)
            .enumerate()
            .for_each(|(pair, pair_out)| {
                let t0 = 2 * pair;
                let rows = pair_out.len() / out_width;
                let joint = rows == 2
                    && row_seq[t0] == row_seq[t0 + 1]
                    && row_pos[t0 + 1] == row_pos[t0] + 1
                    && 2 * group <= MAX_SHARED_HEADS;
                if joint {
                    let call = self.attention_call(pool, batch[row_seq[t0]].cache.table(layer));
                    let spans = [t0, t0 + 1].map(|t| {
                        let (start, end) = span(t);
                        HeadSpan {
                            heads: group,
                            start,
                            end,
                        }
                    });
                    self.attend_row_pair(call, spans, &q[t0 * width..(t0 + 2) * width], pair_out);
                    return;
                }
                for (i, row_out) in pair_out.chunks_exact_mut(out_width).enumerate() {
                    let t = t0 + i;
                    let (start, end) = span(t);
                    let call = self.attention_call(pool, batch[row_seq[t]].cache.table(layer));
                    let row_q = &q[t * width..(t + 1) * width];
                    let mut h = 0;
                    while h < c.n_heads {
                        let kv_head = h / group;
                        let heads = shared.min((kv_head + 1) * group - h);
                        SharedHeads { kv_head, ..call }.attend(
                            &row_q[h * hd..(h + heads) * hd],
                            &[HeadSpan { heads, start, end }],
                            &mut row_out[h * vd..(h + heads) * vd],
                        );
                        h += heads;
                    }
                }
            });
    }

    /// An attention call over a sequence's block table `table` (KV head 0;
    /// callers set theirs).
    fn attention_call<'a>(&self, pool: &'a KvPool, table: &'a [u32]) -> SharedHeads<'a> {
        let c = &self.config;
        SharedHeads {
            pool,
            table,
            kv_head: 0,
            head_dim: c.head_dim,
            value_dim: c.value_dim,
            scale: c.attention_scale,
        }
    }

    /// Attention of two consecutive rows of one sequence (`rows_q`, their
    /// queries; `spans`, their positions): per KV head, both rows' heads in
    /// one `call`, their queries gathered and their outputs spread back
    /// into `pair_out`.
    fn attend_row_pair(
        &self,
        call: SharedHeads<'_>,
        spans: [HeadSpan; 2],
        rows_q: &[f32],
        pair_out: &mut [f32],
    ) {
        let c = &self.config;
        let (hd, vd) = (c.head_dim, c.value_dim);
        let group = c.n_heads / c.n_kv_heads;
        let (width, out_width) = (c.n_heads * hd, c.n_heads * vd);
        PAIR_BUFFERS.with(|cell| {
            let (mut queries, mut outputs) = cell.take();
            queries.resize(2 * group * hd, 0.0);
            outputs.resize(2 * group * vd, 0.0);
            for kv_head in 0..c.n_kv_heads {
                let heads = kv_head * group..(kv_head + 1) * group;
                for i in 0..2 {
                    let row = &rows_q[i * width..][..width];
                    queries[i * group * hd..(i + 1) * group * hd]
                        .copy_from_slice(&row[heads.start * hd..heads.end * hd]);
                }
                SharedHeads { kv_head, ..call }.attend(&queries, &spans, &mut outputs);
                for i in 0..2 {
                    let row = &mut pair_out[i * out_width..][..out_width];
                    row[heads.start * vd..heads.end * vd]
                        .copy_from_slice(&outputs[i * group * vd..(i + 1) * group * vd]);
                }
            }
            cell.replace((queries, outputs));
        });
    }
}

thread_local! {
    /// Gathered queries and outputs of a row pair, reused on each thread.
    static PAIR_BUFFERS: std::cell::RefCell<(Vec<f32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// One sequence's part of a batched forward pass ([`Model::forward_batch`]).
#[derive(Debug)]
pub struct BatchSequence<'a> {
    /// The tokens to run, after the positions already in `cache`.
    pub tokens: &'a [u32],
    /// The sequence's keys and values; the tokens' are appended.
    pub cache: &'a mut KvCache,
    /// The first row (of `tokens`) whose logits are wanted.
    pub logits_from: usize,
}

/// A stacked matrix for [`matmul`], which reads only its panels.
fn stacked_matrix(panels: &PanelMatrix) -> QMatrix<'_> {
    QMatrix {
        ty: TensorType::Q8_0,
        rows: panels.rows,
        cols: panels.cols,
        bytes: &[],
        panels: Some(panels),
    }
}

/// Splits the `rows` rows of a stacked product into its parts: each row
/// of `stacked` is the parts' rows side by side (a part's width is its
/// length over `rows`).
fn unstack(stacked: &[f32], rows: usize, parts: &mut [&mut Vec<f32>]) {
    let width = stacked.len() / rows;
    let mut at = 0;
    for part in parts.iter_mut() {
        let w = part.len() / rows;
        for (r, out) in part.chunks_exact_mut(w).enumerate() {
            out.copy_from_slice(&stacked[r * width + at..r * width + at + w]);
        }
        at += w;
    }
}

/// The panels of `parts` stacked into one matrix, which then holds them
/// alone (the parts give theirs up); `None`, and the parts untouched, when
/// one of them has no panels.
fn stack_panels(parts: &mut [&mut WeightRef]) -> Option<PanelMatrix> {
    let panels: Option<Vec<&PanelMatrix>> = parts.iter().map(|w| w.panels.as_ref()).collect();
    let stacked = PanelMatrix::stack(&panels?)?;
    for w in parts.iter_mut() {
        w.panels = None;
    }
    Some(stacked)
}

fn check_dims(t: &TensorInfo, cols: usize, rows: usize) -> Result<(), EngineError> {
    if t.row_len() != cols || t.rows() != rows {
        return Err(EngineError::Model(format!(
            "tensor {} has shape {:?}, expected [{cols}, {rows}]",
            t.name, t.dims
        )));
    }
    Ok(())
}

fn add_bias(x: &mut [f32], bias: Option<&[f32]>) {
    if let Some(b) = bias {
        for row in x.chunks_exact_mut(b.len()) {
            row.iter_mut().zip(b).for_each(|(a, b)| *a += b);
        }
    }
}

/// RMSNorm of each row of `x` (row length `w.len()`) into `out`.
fn rms_norm_rows(x: &[f32], out: &mut [f32], w: &[f32], eps: f32) {
    for (xr, or) in x.chunks_exact(w.len()).zip(out.chunks_exact_mut(w.len())) {
        let ss = xr.iter().map(|v| v * v).sum::<f32>() / w.len() as f32;
        let inv = 1.0 / (ss + eps).sqrt();
        for ((o, xv), wv) in or.iter_mut().zip(xr).zip(w) {
            *o = xv * inv * wv;
        }
    }
}

/// RMSNorm of each `w.len()`-wide slice of `x`, in place (per head for QK-norm).
fn rms_norm_in_place(x: &mut [f32], w: &[f32], eps: f32) {
    for r in x.chunks_exact_mut(w.len()) {
        let ss = r.iter().map(|v| v * v).sum::<f32>() / w.len() as f32;
        let inv = 1.0 / (ss + eps).sqrt();
        r.iter_mut().zip(w).for_each(|(v, wv)| *v = *v * inv * wv);
    }
}

/// RoPE angles for each of `positions`: `(cos, sin)` for each of the
/// `rot / 2` dimension pairs, row after row. Computed once per forward pass
/// and base, and shared by every layer's queries and keys.
fn rope_table(base: f32, rot: usize, positions: &[usize], table: &mut Vec<(f32, f32)>) {
    let half = (rot / 2).min(MAX_ROPE_PAIRS);
    let mut inv_freq = [0f64; MAX_ROPE_PAIRS];
    for (i, f) in inv_freq[..half].iter_mut().enumerate() {
        *f = (base as f64).powf(-2.0 * i as f64 / rot as f64);
    }
    table.clear();
    for &p in positions {
        let pos = p as f64;
        table.extend(inv_freq[..half].iter().map(|f| {
            let theta = pos * f;
            (theta.cos() as f32, theta.sin() as f32)
        }));
    }
}

/// Rotary dimension pairs a head may have (checked at load).
const MAX_ROPE_PAIRS: usize = 512;

/// Sets `buf` to `len` zeros, within its capacity once it has grown.
fn zeroed(buf: &mut Vec<f32>, len: usize) {
    buf.clear();
    buf.resize(len, 0.0);
}

/// Sets `buf` to `len` values, keeping what it held: for outputs written
/// whole, where clearing a large buffer would be wasted work.
fn sized(buf: &mut Vec<f32>, len: usize) {
    buf.truncate(len);
    buf.resize(len, 0.0);
}

/// Buffers of a forward pass ([`Model::forward_batch_with`]), kept between
/// passes so that a steady run of steps allocates nothing.
#[derive(Debug, Default)]
pub struct ForwardScratch {
    row_seq: Vec<usize>,
    row_pos: Vec<usize>,
    x: Vec<f32>,
    xn: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    proj: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    /// Outputs of stacked projections, before they are split.
    stacked: Vec<f32>,
    rope_global: Vec<(f32, f32)>,
    rope_sliding: Vec<(f32, f32)>,
    picked: Vec<usize>,
    last: Vec<f32>,
    logits: Vec<f32>,
    /// Whether every kernel thread's attention buffers were sized for
    /// this model's context (see [`crate::attention::reserve_thread_buffers`]).
    threads_ready: bool,
}

/// Rotary position embedding over rows of `row_width` values (whole heads of
/// `head_dim`), row `t` rotated by row `t` of `table` (see [`rope_table`]).
fn rope(x: &mut [f32], row_width: usize, head_dim: usize, table: &[(f32, f32)], style: RopeStyle) {
    let rows = x.len() / row_width;
    let half = table.len() / rows.max(1);
    for (row, angles) in x
        .chunks_exact_mut(row_width)
        .zip(table.chunks_exact(half.max(1)))
    {
        for head in row.chunks_exact_mut(head_dim) {
            for (i, &(cos, sin)) in angles.iter().enumerate() {
                let (a, b) = match style {
                    RopeStyle::Neox => (i, i + half),
                    RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * cos - x1 * sin;
                head[b] = x0 * sin + x1 * cos;
            }
        }
    }
}
