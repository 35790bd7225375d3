//! Writes small GGUF v3 files: the loader's tests build valid files with it
//! and then corrupt them in controlled ways.

/// A metadata value to write.
#[derive(Debug, Clone)]
pub enum Value {
    /// uint32 (type 4).
    U32(u32),
    /// float32 (type 6).
    F32(f32),
    /// bool (type 7).
    Bool(bool),
    /// string (type 8).
    Str(String),
    /// array of strings.
    StrArray(Vec<String>),
    /// array of float32.
    F32Array(Vec<f32>),
    /// array of int32.
    I32Array(Vec<i32>),
    /// array of uint8.
    U8Array(Vec<u8>),
}

/// A tensor to write: name, dimensions (innermost first), GGML type id, raw bytes.
#[derive(Debug, Clone)]
pub struct Tensor {
    /// Tensor name.
    pub name: String,
    /// Dimensions, innermost first.
    pub dims: Vec<u64>,
    /// GGML type id.
    pub type_id: u32,
    /// Raw data.
    pub data: Vec<u8>,
}

impl Tensor {
    /// An F32 tensor from values.
    pub fn f32(name: &str, dims: &[u64], values: &[f32]) -> Self {
        Tensor {
            name: name.into(),
            dims: dims.to_vec(),
            type_id: 0,
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }
}

/// Builder of a GGUF image.
#[derive(Debug, Default, Clone)]
pub struct GgufBuilder {
    /// Key/value pairs in order.
    pub metadata: Vec<(String, Value)>,
    /// Tensors in order.
    pub tensors: Vec<Tensor>,
    /// Data alignment (32 unless set).
    pub alignment: Option<u64>,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

impl GgufBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a metadata pair.
    pub fn meta(mut self, key: &str, v: Value) -> Self {
        self.metadata.push((key.into(), v));
        self
    }

    /// Adds a tensor.
    pub fn tensor(mut self, t: Tensor) -> Self {
        self.tensors.push(t);
        self
    }

    /// Serialises the file.
    pub fn build(&self) -> Vec<u8> {
        let align = self.alignment.unwrap_or(32);
        let mut out = Vec::new();
        out.extend(b"GGUF");
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_str(&mut out, k);
            match v {
                Value::U32(x) => {
                    out.extend(4u32.to_le_bytes());
                    out.extend(x.to_le_bytes());
                }
                Value::F32(x) => {
                    out.extend(6u32.to_le_bytes());
                    out.extend(x.to_le_bytes());
                }
                Value::Bool(x) => {
                    out.extend(7u32.to_le_bytes());
                    out.push(*x as u8);
                }
                Value::Str(s) => {
                    out.extend(8u32.to_le_bytes());
                    put_str(&mut out, s);
                }
                Value::StrArray(a) => {
                    out.extend(9u32.to_le_bytes());
                    out.extend(8u32.to_le_bytes());
                    out.extend((a.len() as u64).to_le_bytes());
                    for s in a {
                        put_str(&mut out, s);
                    }
                }
                Value::F32Array(a) => {
                    out.extend(9u32.to_le_bytes());
                    out.extend(6u32.to_le_bytes());
                    out.extend((a.len() as u64).to_le_bytes());
                    for x in a {
                        out.extend(x.to_le_bytes());
                    }
                }
                Value::I32Array(a) => {
                    out.extend(9u32.to_le_bytes());
                    out.extend(5u32.to_le_bytes());
                    out.extend((a.len() as u64).to_le_bytes());
                    for x in a {
                        out.extend(x.to_le_bytes());
                    }
                }
                Value::U8Array(a) => {
                    out.extend(9u32.to_le_bytes());
                    out.extend(0u32.to_le_bytes());
                    out.extend((a.len() as u64).to_le_bytes());
                    out.extend(a);
                }
            }
        }
        let mut offset = 0u64;
        let mut offsets = Vec::new();
        for t in &self.tensors {
            put_str(&mut out, &t.name);
            out.extend((t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(t.type_id.to_le_bytes());
            out.extend(offset.to_le_bytes());
            offsets.push(offset);
            offset = (offset + t.data.len() as u64).div_ceil(align) * align;
        }
        let data_start = (out.len() as u64).div_ceil(align) * align;
        out.resize(data_start as usize, 0);
        for (t, off) in self.tensors.iter().zip(offsets) {
            out.resize((data_start + off) as usize, 0);
            out.extend(&t.data);
        }
        out
    }
}
