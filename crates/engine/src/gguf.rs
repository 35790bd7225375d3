//! Reader for GGUF v2/v3 model files.
//!
//! The file is memory-mapped; metadata is parsed into owned values and tensor
//! data stays in the map. Every length, count and offset read from the file is
//! checked against the bytes that remain before anything is allocated, so a
//! corrupt or hostile file yields an [`EngineError::Gguf`] and never a panic or a
//! huge allocation.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use memmap2::Mmap;

use crate::error::EngineError;
use crate::quant::TensorType;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
const MAX_DIMS: usize = 4;
const MAX_ARRAY_DEPTH: usize = 4;
/// Items of all metadata arrays together (2^23): several times what the
/// largest vocabularies need (tokens, scores and types of 256k tokens, and
/// their merges). Each item takes 32 bytes in memory whatever it took in
/// the file (one, for a u8), so this bounds the metadata to 256 MiB.
pub const MAX_METADATA_ARRAY_ITEMS: u64 = 1 << 23;
/// Largest element count accepted for one tensor (2^40): far beyond any real model.
const MAX_TENSOR_ELEMENTS: u64 = 1 << 40;

/// A metadata value of a GGUF key/value pair.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    /// Unsigned 8-bit integer.
    U8(u8),
    /// Signed 8-bit integer.
    I8(i8),
    /// Unsigned 16-bit integer.
    U16(u16),
    /// Signed 16-bit integer.
    I16(i16),
    /// Unsigned 32-bit integer.
    U32(u32),
    /// Signed 32-bit integer.
    I32(i32),
    /// 32-bit float.
    F32(f32),
    /// Boolean.
    Bool(bool),
    /// UTF-8 string (invalid sequences replaced).
    String(String),
    /// Homogeneous array.
    Array(Vec<MetaValue>),
    /// Unsigned 64-bit integer.
    U64(u64),
    /// Signed 64-bit integer.
    I64(i64),
    /// 64-bit float.
    F64(f64),
}

impl MetaValue {
    /// The value as an unsigned integer, when it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, when it is numeric.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v.into()),
            MetaValue::F64(v) => Some(v),
            MetaValue::I8(v) => Some(v.into()),
            MetaValue::I16(v) => Some(v.into()),
            MetaValue::I32(v) => Some(v.into()),
            MetaValue::I64(v) => Some(v as f64),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    /// The value as a string slice.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as a boolean.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The value as an array.
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where one tensor lives in the file and how it is laid out.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// Tensor name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions, innermost first (`dims[0]` is the row length).
    pub dims: Vec<u64>,
    /// Storage type.
    pub ty: TensorType,
    /// Byte offset from the start of the file.
    pub file_offset: usize,
    /// Size in bytes.
    pub byte_len: usize,
}

impl TensorInfo {
    /// Number of elements in one row (`dims[0]`).
    pub fn row_len(&self) -> usize {
        self.dims.first().copied().unwrap_or(1) as usize
    }

    /// Number of rows (product of all dimensions but the first).
    pub fn rows(&self) -> usize {
        self.dims.iter().skip(1).product::<u64>() as usize
    }
}

/// A parsed, memory-mapped GGUF file.
#[derive(Debug)]
pub struct GgufFile {
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata key/value pairs.
    pub metadata: HashMap<String, MetaValue>,
    /// Tensors in file order.
    pub tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    bytes: Arc<GgufBytes>,
}

/// The bytes of a GGUF file: a memory map, or an owned buffer (tests, fuzzing).
#[derive(Debug)]
pub enum GgufBytes {
    /// A read-only memory map of the file.
    Mapped(Mmap),
    /// Bytes held in memory.
    Owned(Vec<u8>),
}

impl GgufBytes {
    /// Lets the kernel drop the resident pages of `len` bytes from `offset`
    /// (bytes copied elsewhere, such as weights repacked into panels). They
    /// stay readable: a later read brings them back from the file.
    pub fn release(&self, offset: usize, len: usize) {
        #[cfg(unix)]
        if let GgufBytes::Mapped(m) = self {
            if offset.checked_add(len).is_some_and(|end| end <= m.len()) {
                // SAFETY: the map is read-only and never written, so dropping
                // its pages changes nothing a reader can see: the next access
                // reads the same bytes from the file again.
                let _ = unsafe {
                    m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, len)
                };
            }
        }
    }

    fn as_slice(&self) -> &[u8] {
        match self {
            GgufBytes::Mapped(m) => m,
            GgufBytes::Owned(v) => v,
        }
    }
}

impl GgufFile {
    /// Memory-maps and parses the file at `path`.
    pub fn open(path: &Path) -> Result<Self, EngineError> {
        let file = File::open(path).map_err(|source| EngineError::Io {
            path: path.display().to_string(),
            source,
        })?;
        // SAFETY: the map is read-only and private to this process; the model
        // cache is written once by rename and never modified in place, so the
        // bytes do not change underneath us. Reads past the end are prevented by
        // the bounds checks of the parser.
        let map = unsafe { Mmap::map(&file) }.map_err(|source| EngineError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(GgufBytes::Mapped(map))
    }

    /// Parses a GGUF image held in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, EngineError> {
        Self::parse(GgufBytes::Owned(bytes))
    }

    fn parse(bytes: GgufBytes) -> Result<Self, EngineError> {
        let data = bytes.as_slice();
        let mut cur = Cursor {
            data,
            pos: 0,
            array_items_left: MAX_METADATA_ARRAY_ITEMS,
        };
        let magic = cur.take(4)?;
        if magic != MAGIC {
            return Err(gguf_err("not a GGUF file (bad magic)"));
        }
        let version = cur.u32()?;
        if !(2..=3).contains(&version) {
            return Err(gguf_err(format!("unsupported GGUF version {version}")));
        }
        let tensor_count = cur.u64()?;
        let kv_count = cur.u64()?;
        // Each key/value pair needs at least 12 bytes and each tensor info 24.
        if kv_count > (cur.remaining() / 12) as u64 {
            return Err(gguf_err(format!(
                "metadata count {kv_count} exceeds the file"
            )));
        }
        if tensor_count > (cur.remaining() / 24) as u64 {
            return Err(gguf_err(format!(
                "tensor count {tensor_count} exceeds the file"
            )));
        }
        let mut metadata = HashMap::with_capacity(kv_count as usize);
        for _ in 0..kv_count {
            let key = cur.string()?;
            let ty = cur.u32()?;
            let value = cur.value(ty, 0)?;
            metadata.insert(key, value);
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a,
                _ => return Err(gguf_err("general.alignment must be a power of two")),
            },
        };
        let mut raw = Vec::with_capacity(tensor_count as usize);
        for _ in 0..tensor_count {
            let name = cur.string()?;
            let n_dims = cur.u32()? as usize;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(gguf_err(format!("tensor {name}: {n_dims} dimensions")));
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                dims.push(cur.u64()?);
            }
            let type_id = cur.u32()?;
            let offset = cur.u64()?;
            raw.push((name, dims, type_id, offset));
        }
        let data_start = align_up(cur.pos as u64, alignment)
            .ok_or_else(|| gguf_err("tensor data offset overflows"))?;
        let file_len = data.len() as u64;
        let mut tensors = Vec::with_capacity(raw.len());
        let mut tensor_index = HashMap::with_capacity(raw.len());
        for (name, dims, type_id, offset) in raw {
            let ty = TensorType::from_id(type_id)
                .ok_or_else(|| gguf_err(format!("tensor {name}: unknown type {type_id}")))?;
            let mut elements: u64 = 1;
            for &d in &dims {
                if d == 0 {
                    return Err(gguf_err(format!("tensor {name}: zero dimension")));
                }
                elements = elements
                    .checked_mul(d)
                    .filter(|&e| e <= MAX_TENSOR_ELEMENTS)
                    .ok_or_else(|| {
                        gguf_err(format!("tensor {name}: absurd dimensions {dims:?}"))
                    })?;
            }
            let block = ty.block_len() as u64;
            if dims[0] % block != 0 {
                return Err(gguf_err(format!(
                    "tensor {name}: row length {} is not a multiple of the {:?} block ({block})",
                    dims[0], ty
                )));
            }
            let byte_len = elements / block * ty.block_bytes() as u64;
            if offset % alignment != 0 {
                return Err(gguf_err(format!(
                    "tensor {name}: offset {offset} is not aligned"
                )));
            }
            let start = data_start
                .checked_add(offset)
                .ok_or_else(|| gguf_err(format!("tensor {name}: offset overflows")))?;
            let end = start
                .checked_add(byte_len)
                .filter(|&e| e <= file_len)
                .ok_or_else(|| {
                    gguf_err(format!(
                        "tensor {name}: data [{start}, +{byte_len}) lies past the end of the file ({file_len} bytes)"
                    ))
                })?;
            debug_assert!(end <= file_len);
            if tensor_index.insert(name.clone(), tensors.len()).is_some() {
                return Err(gguf_err(format!("tensor {name} appears twice")));
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                file_offset: start as usize,
                byte_len: byte_len as usize,
            });
        }
        Ok(GgufFile {
            version,
            metadata,
            tensors,
            tensor_index,
            bytes: Arc::new(bytes),
        })
    }

    /// The metadata value for `key`.
    pub fn meta(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    /// The tensor named `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The raw bytes of a tensor (bounds were checked at parse time).
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        let all = self.bytes.as_slice();
        all.get(info.file_offset..info.file_offset + info.byte_len)
            .unwrap_or(&[])
    }

    /// Shared handle to the underlying bytes, for views that outlive borrows.
    pub fn shared_bytes(&self) -> Arc<GgufBytes> {
        Arc::clone(&self.bytes)
    }
}

impl GgufBytes {
    /// The bytes in `range`, or an empty slice when out of bounds.
    pub fn slice(&self, start: usize, len: usize) -> &[u8] {
        self.as_slice()
            .get(start..start.saturating_add(len))
            .unwrap_or(&[])
    }
}

fn align_up(v: u64, a: u64) -> Option<u64> {
    v.checked_add(a - 1).map(|x| x / a * a)
}

fn gguf_err(msg: impl Into<String>) -> EngineError {
    EngineError::Gguf(msg.into())
}

struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
    /// Metadata array items still allowed (see [`MAX_METADATA_ARRAY_ITEMS`]).
    array_items_left: u64,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], EngineError> {
        if n > self.remaining() {
            return Err(gguf_err(format!(
                "truncated file: needed {n} bytes at offset {}, {} remain",
                self.pos,
                self.remaining()
            )));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], EngineError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u32(&mut self) -> Result<u32, EngineError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, EngineError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn string(&mut self) -> Result<String, EngineError> {
        let len = self.u64()?;
        if len > self.remaining() as u64 {
            return Err(gguf_err(format!(
                "string of {len} bytes at offset {} runs past the end",
                self.pos
            )));
        }
        let bytes = self.take(len as usize)?;
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }

    fn value(&mut self, ty: u32, depth: usize) -> Result<MetaValue, EngineError> {
        Ok(match ty {
            0 => MetaValue::U8(self.array::<1>()?[0]),
            1 => MetaValue::I8(i8::from_le_bytes(self.array()?)),
            2 => MetaValue::U16(u16::from_le_bytes(self.array()?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array()?)),
            4 => MetaValue::U32(self.u32()?),
            5 => MetaValue::I32(i32::from_le_bytes(self.array()?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array()?)),
            7 => match self.array::<1>()?[0] {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                b => return Err(gguf_err(format!("invalid boolean byte {b}"))),
            },
            8 => MetaValue::String(self.string()?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(gguf_err("metadata arrays nested too deeply"));
                }
                let item_ty = self.u32()?;
                let count = self.u64()?;
                let min_item = match item_ty {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    other => return Err(gguf_err(format!("unknown metadata type {other}"))),
                };
                if count > (self.remaining() / min_item) as u64 {
                    return Err(gguf_err(format!(
                        "array of {count} items at offset {} runs past the end",
                        self.pos
                    )));
                }
                self.array_items_left =
                    self.array_items_left.checked_sub(count).ok_or_else(|| {
                        gguf_err(format!(
                            "metadata arrays hold more than {MAX_METADATA_ARRAY_ITEMS} items in all"
                        ))
                    })?;
                let mut items = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    items.push(self.value(item_ty, depth + 1)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::U64(self.u64()?),
            11 => MetaValue::I64(i64::from_le_bytes(self.array()?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array()?)),
            other => return Err(gguf_err(format!("unknown metadata type {other}"))),
        })
    }
}
