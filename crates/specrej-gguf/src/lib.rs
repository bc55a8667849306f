//! specrej's one GGUF reader (pure Rust): specrej-text, specrej-wgpu and specrej-candle read
//! every GGUF file through it, so one set of rules decides what a corrupt file is and what a
//! usable Llama-family model is, on every target (wasm32 included).
//!
//! * [`GgufMetadata`]: the header (magic `GGUF`, version 2 or 3, tensor count, key/value
//!   count) and the key/value metadata, stopping before the tensor infos.
//! * [`GgufFile`]: the metadata and the [`TensorTable`] after it (each tensor's name, shape,
//!   [`GgmlType`], offset and size; the alignment and the data section's start), every tensor
//!   checked to lie inside the file.
//! * [`ModelConfig`]: a Llama-family model's hyper-parameters from the metadata and the tensor
//!   table, under one set of validation rules ([`ModelConfig::validate`]) that every backend
//!   uses; a backend's own limits (e.g. the WebGPU kernels' head width) are its own checks.
//! * [`write_gguf`]: a small writer, for tests and tools.
//!
//! Corrupt input gives a [`GgufError`] naming what is wrong (the key, or the tensor), never a
//! panic: lengths are checked against the bytes that remain (when known), arithmetic on sizes
//! and offsets is checked, and allocations never exceed what the input actually holds.

mod config;
mod tensors;
mod write;

#[cfg(test)]
mod tests;

pub use config::{
    Architecture, ConfigError, DEFAULT_CONTEXT_LENGTH, MAX_CONTEXT_LENGTH, ModelConfig,
};
pub use tensors::{
    GgmlType, GgufFile, MAX_TENSOR_DIMS, MAX_TENSOR_ELEMENTS, TensorInfo, TensorProblem,
    TensorTable,
};
pub use write::{TensorData, write_gguf};

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Read};
use std::path::Path;

/// Errors from [`GgufMetadata::read`] and friends.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The input does not start with the `GGUF` magic.
    #[error("not a GGUF file: magic is {found:02x?}, expected \"GGUF\" (47 47 55 46)")]
    NotGguf {
        /// The first four bytes found.
        found: [u8; 4],
    },
    /// The GGUF version is not 2 or 3.
    #[error("unsupported GGUF version {version}{hint} (supported: 2, 3)")]
    UnsupportedVersion {
        /// The version read.
        version: u32,
        /// Extra hint (e.g. big-endian file), may be empty.
        hint: &'static str,
    },
    /// The input ended while reading `what`.
    #[error("truncated GGUF: input ended at byte {offset} while reading {what}")]
    Truncated {
        /// What was being read.
        what: String,
        /// Byte offset where the read started.
        offset: u64,
    },
    /// A length field claims more bytes than remain in the input.
    #[error(
        "corrupt GGUF: {what} at byte {offset} claims {len} {unit}, but only {remaining} bytes remain"
    )]
    TooLong {
        /// What was being read.
        what: String,
        /// Byte offset of the length field.
        offset: u64,
        /// The claimed length.
        len: u64,
        /// "bytes" or "elements".
        unit: &'static str,
        /// Bytes left in the input.
        remaining: u64,
    },
    /// A string is not valid UTF-8.
    #[error("corrupt GGUF: {what} at byte {offset} is not valid UTF-8")]
    BadUtf8 {
        /// What was being read.
        what: String,
        /// Byte offset of the string's bytes.
        offset: u64,
    },
    /// An unknown value type id.
    #[error("corrupt GGUF: unknown value type {type_id} for {what} at byte {offset}")]
    BadValueType {
        /// The type id read.
        type_id: u32,
        /// What was being read.
        what: String,
        /// Byte offset of the type field.
        offset: u64,
    },
    /// Arrays nested deeper than [`MAX_ARRAY_DEPTH`].
    #[error("corrupt GGUF: arrays nested deeper than {MAX_ARRAY_DEPTH} in {what}")]
    TooDeep {
        /// What was being read.
        what: String,
    },
    /// The same key appears twice.
    #[error("corrupt GGUF: duplicate metadata key {0:?}")]
    DuplicateKey(String),
    /// `general.alignment` is not a `uint32` power of two of at least 8 (the GGUF spec asks
    /// for a multiple of 8, ggml's padding arithmetic for a power of two).
    #[error("corrupt GGUF: general.alignment is {0}, not a uint32 power of two of at least 8")]
    BadAlignment(String),
    /// A tensor's info is inconsistent (names the tensor).
    #[error("corrupt GGUF: tensor {name:?}: {problem}")]
    Tensor {
        /// The tensor.
        name: String,
        /// What is wrong with it.
        problem: TensorProblem,
    },
    /// Two tensor infos carry the same name.
    #[error("corrupt GGUF: tensor {0:?} appears twice")]
    DuplicateTensor(String),
    /// `general.architecture` names a model family specrej does not implement.
    #[error("unsupported architecture {0:?} (supported: llama, mistral, qwen2)")]
    UnsupportedArchitecture(String),
    /// A hyper-parameter is missing, has the wrong type, or fails [`ModelConfig::validate`].
    #[error("bad or missing config entry {key:?}: {reason}")]
    Config {
        /// The metadata key (e.g. `llama.attention.head_count_kv`).
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A tensor the model needs is absent.
    #[error("missing tensor {0:?}")]
    MissingTensor(String),
    /// A tensor has another shape than the metadata implies.
    #[error("tensor {name:?} has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        /// The tensor.
        name: String,
        /// The shape the metadata implies (outer dimension first).
        expected: Vec<usize>,
        /// The shape in the file (outer dimension first).
        found: Vec<usize>,
    },
    /// Any other I/O error.
    #[error("I/O error reading GGUF: {0}")]
    Io(#[from] io::Error),
}

/// How deeply arrays may nest before the reader gives up (real files use depth 1).
pub const MAX_ARRAY_DEPTH: usize = 8;

/// The data section's alignment when `general.alignment` is absent (the GGUF spec's default).
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// GGUF value type ids, as stored in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum GgufType {
    /// `uint8`
    U8 = 0,
    /// `int8`
    I8 = 1,
    /// `uint16`
    U16 = 2,
    /// `int16`
    I16 = 3,
    /// `uint32`
    U32 = 4,
    /// `int32`
    I32 = 5,
    /// `float32`
    F32 = 6,
    /// `bool` (one byte, 0 or 1)
    Bool = 7,
    /// length-prefixed UTF-8 string
    String = 8,
    /// typed array
    Array = 9,
    /// `uint64`
    U64 = 10,
    /// `int64`
    I64 = 11,
    /// `float64`
    F64 = 12,
}

impl GgufType {
    /// The type for a type id, if known.
    pub fn from_id(id: u32) -> Option<Self> {
        use GgufType::*;
        Some(match id {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// The smallest number of bytes one value of this type occupies in the file.
    fn min_size(self) -> u64 {
        use GgufType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 | String => 8,
            Array => 12,
        }
    }
}

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    /// `uint8`
    U8(u8),
    /// `int8`
    I8(i8),
    /// `uint16`
    U16(u16),
    /// `int16`
    I16(i16),
    /// `uint32`
    U32(u32),
    /// `int32`
    I32(i32),
    /// `float32`
    F32(f32),
    /// `bool`
    Bool(bool),
    /// string
    String(String),
    /// array: element type and elements (all of that type)
    Array(GgufType, Vec<GgufValue>),
    /// `uint64`
    U64(u64),
    /// `int64`
    I64(i64),
    /// `float64`
    F64(f64),
}

impl GgufValue {
    /// The value's type.
    pub fn ty(&self) -> GgufType {
        match self {
            GgufValue::U8(_) => GgufType::U8,
            GgufValue::I8(_) => GgufType::I8,
            GgufValue::U16(_) => GgufType::U16,
            GgufValue::I16(_) => GgufType::I16,
            GgufValue::U32(_) => GgufType::U32,
            GgufValue::I32(_) => GgufType::I32,
            GgufValue::F32(_) => GgufType::F32,
            GgufValue::Bool(_) => GgufType::Bool,
            GgufValue::String(_) => GgufType::String,
            GgufValue::Array(..) => GgufType::Array,
            GgufValue::U64(_) => GgufType::U64,
            GgufValue::I64(_) => GgufType::I64,
            GgufValue::F64(_) => GgufType::F64,
        }
    }

    /// The string, if this is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// Any integer value as `i128` (lossless for every GGUF integer type).
    pub fn as_int(&self) -> Option<i128> {
        Some(match *self {
            GgufValue::U8(v) => v.into(),
            GgufValue::I8(v) => v.into(),
            GgufValue::U16(v) => v.into(),
            GgufValue::I16(v) => v.into(),
            GgufValue::U32(v) => v.into(),
            GgufValue::I32(v) => v.into(),
            GgufValue::U64(v) => v.into(),
            GgufValue::I64(v) => v.into(),
            _ => return None,
        })
    }

    /// Any integer value that fits in a `u32` (token ids are stored as u32 or sometimes i32).
    pub fn as_u32(&self) -> Option<u32> {
        self.as_int().and_then(|v| u32::try_from(v).ok())
    }

    /// Any float value as `f64`.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v.into()),
            GgufValue::F64(v) => Some(v),
            _ => None,
        }
    }

    /// The bool, if this is a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The elements, if this is an array.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(_, v) => Some(v),
            _ => None,
        }
    }
}

impl fmt::Display for GgufValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GgufValue::U8(v) => write!(f, "{v}"),
            GgufValue::I8(v) => write!(f, "{v}"),
            GgufValue::U16(v) => write!(f, "{v}"),
            GgufValue::I16(v) => write!(f, "{v}"),
            GgufValue::U32(v) => write!(f, "{v}"),
            GgufValue::I32(v) => write!(f, "{v}"),
            GgufValue::F32(v) => write!(f, "{v}"),
            GgufValue::Bool(v) => write!(f, "{v}"),
            GgufValue::String(v) => write!(f, "{v:?}"),
            GgufValue::Array(t, v) => write!(f, "[{t:?}; {}]", v.len()),
            GgufValue::U64(v) => write!(f, "{v}"),
            GgufValue::I64(v) => write!(f, "{v}"),
            GgufValue::F64(v) => write!(f, "{v}"),
        }
    }
}

/// The header and key/value metadata of a GGUF file.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufMetadata {
    /// GGUF version (2 or 3).
    pub version: u32,
    /// Number of tensors (their infos follow the metadata: [`GgufFile`] reads them).
    pub tensor_count: u64,
    /// Metadata key/value pairs.
    pub kv: BTreeMap<String, GgufValue>,
    /// Byte offset just past the metadata, where the tensor infos start.
    pub metadata_end: u64,
}

impl GgufMetadata {
    /// Parses the header and metadata from the start of a byte slice.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, GgufError> {
        Self::read_limited(bytes, Some(bytes.len() as u64))
    }

    /// Parses the header and metadata from a reader (which is left just past the metadata).
    ///
    /// With no known length, lengths are bounded by what the reader actually delivers.
    pub fn read<R: Read>(reader: R) -> Result<Self, GgufError> {
        Self::read_limited(reader, None)
    }

    /// Parses the header and metadata from a file; reads only the metadata, not the tensors.
    pub fn from_path(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        let file = std::fs::File::open(path.as_ref())?;
        let len = file.metadata().ok().map(|m| m.len());
        Self::read_limited(io::BufReader::new(file), len)
    }

    /// Parses from a reader whose total length (from the current position) is `len`, if known.
    pub fn read_limited<R: Read>(reader: R, len: Option<u64>) -> Result<Self, GgufError> {
        Self::read_from(&mut Src::new(reader, len))
    }

    /// Parses the header and metadata from `r`, leaving it just past the metadata.
    pub(crate) fn read_from<R: Read>(r: &mut Src<R>) -> Result<Self, GgufError> {
        let mut magic = [0u8; 4];
        r.fill(&mut magic, "magic")?;
        if &magic != b"GGUF" {
            return Err(GgufError::NotGguf { found: magic });
        }
        let version = r.u32("version")?;
        if version != 2 && version != 3 {
            let hint = if version.swap_bytes() == 2 || version.swap_bytes() == 3 {
                " (a big-endian GGUF?)"
            } else if version == 1 {
                " (GGUF v1 is obsolete)"
            } else {
                ""
            };
            return Err(GgufError::UnsupportedVersion { version, hint });
        }
        let tensor_count = r.u64("tensor count")?;
        let kv_offset = r.pos;
        let kv_count = r.u64("metadata key/value count")?;
        // Each pair takes at least 8 (key length) + 4 (type) + 1 bytes.
        r.check_len(kv_count, 13, "metadata key/value count", kv_offset, "elements")?;
        let mut kv = BTreeMap::new();
        for i in 0..kv_count {
            let key = r.string(&format!("key #{i}"))?;
            let what = format!("value of key {key:?}");
            let type_offset = r.pos;
            let type_id = r.u32(&what)?;
            let ty = GgufType::from_id(type_id).ok_or_else(|| GgufError::BadValueType {
                type_id,
                what: what.clone(),
                offset: type_offset,
            })?;
            let value = r.value(ty, &what, 0)?;
            if kv.contains_key(&key) {
                return Err(GgufError::DuplicateKey(key));
            }
            kv.insert(key, value);
        }
        // Readers divide by it to find the tensor data (candle once panicked on 0), and ggml
        // rounds up with a mask, which only a power of two makes right.
        if let Some(v) = kv.get("general.alignment") {
            match v {
                GgufValue::U32(a) if a.is_power_of_two() && *a >= 8 => {}
                GgufValue::U32(_) => return Err(GgufError::BadAlignment(v.to_string())),
                other => {
                    return Err(GgufError::BadAlignment(format!(
                        "{other} (a {:?}, not a U32)",
                        other.ty()
                    )));
                }
            }
        }
        Ok(GgufMetadata { version, tensor_count, kv, metadata_end: r.pos })
    }

    /// The data section's alignment: `general.alignment` (checked when read), else 32.
    pub fn alignment(&self) -> u64 {
        match self.get("general.alignment") {
            Some(GgufValue::U32(a)) => u64::from(*a),
            _ => DEFAULT_ALIGNMENT,
        }
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.kv.get(key)
    }

    /// The string value of `key`, if present and a string.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(GgufValue::as_str)
    }

    /// The integer value of `key` as a `u32`, if present, an integer, and in range.
    pub fn get_u32(&self, key: &str) -> Option<u32> {
        self.get(key).and_then(GgufValue::as_u32)
    }

    /// The bool value of `key`, if present and a bool.
    pub fn get_bool(&self, key: &str) -> Option<bool> {
        self.get(key).and_then(GgufValue::as_bool)
    }

    /// The array value of `key`, if present and an array.
    pub fn get_array(&self, key: &str) -> Option<&[GgufValue]> {
        self.get(key).and_then(GgufValue::as_array)
    }
}

/// A reader that tracks its position and (optionally) how many bytes remain.
pub(crate) struct Src<R> {
    r: R,
    pub(crate) pos: u64,
    pub(crate) len: Option<u64>,
}

impl<R: Read> Src<R> {
    pub(crate) fn new(r: R, len: Option<u64>) -> Self {
        Src { r, pos: 0, len }
    }

    fn remaining(&self) -> Option<u64> {
        self.len.map(|l| l.saturating_sub(self.pos))
    }

    pub(crate) fn fill(&mut self, buf: &mut [u8], what: &str) -> Result<(), GgufError> {
        match self.r.read_exact(buf) {
            Ok(()) => {
                self.pos += buf.len() as u64;
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                Err(GgufError::Truncated { what: what.to_owned(), offset: self.pos })
            }
            Err(e) => Err(GgufError::Io(e)),
        }
    }

    /// Fails if `count` items of at least `min_size` bytes each cannot fit in what remains.
    pub(crate) fn check_len(
        &self,
        count: u64,
        min_size: u64,
        what: &str,
        offset: u64,
        unit: &'static str,
    ) -> Result<(), GgufError> {
        if let Some(remaining) = self.remaining()
            && count.saturating_mul(min_size) > remaining
        {
            return Err(GgufError::TooLong {
                what: what.to_owned(),
                offset,
                len: count,
                unit,
                remaining,
            });
        }
        Ok(())
    }

    fn bytes<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        let mut b = [0u8; N];
        self.fill(&mut b, what)?;
        Ok(b)
    }

    pub(crate) fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.bytes(what)?))
    }

    pub(crate) fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.bytes(what)?))
    }

    pub(crate) fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let len_offset = self.pos;
        let len = self.u64(what)?;
        self.check_len(len, 1, what, len_offset, "bytes")?;
        let start = self.pos;
        // Never trust the length for the allocation: read at most what the input holds.
        let mut buf = Vec::with_capacity(len.min(1 << 16) as usize);
        let got = (&mut self.r).take(len).read_to_end(&mut buf)?;
        self.pos += got as u64;
        if (got as u64) < len {
            return Err(GgufError::Truncated { what: what.to_owned(), offset: start });
        }
        String::from_utf8(buf)
            .map_err(|_| GgufError::BadUtf8 { what: what.to_owned(), offset: start })
    }

    fn value(&mut self, ty: GgufType, what: &str, depth: usize) -> Result<GgufValue, GgufError> {
        Ok(match ty {
            GgufType::U8 => GgufValue::U8(u8::from_le_bytes(self.bytes(what)?)),
            GgufType::I8 => GgufValue::I8(i8::from_le_bytes(self.bytes(what)?)),
            GgufType::U16 => GgufValue::U16(u16::from_le_bytes(self.bytes(what)?)),
            GgufType::I16 => GgufValue::I16(i16::from_le_bytes(self.bytes(what)?)),
            GgufType::U32 => GgufValue::U32(u32::from_le_bytes(self.bytes(what)?)),
            GgufType::I32 => GgufValue::I32(i32::from_le_bytes(self.bytes(what)?)),
            GgufType::F32 => GgufValue::F32(f32::from_le_bytes(self.bytes(what)?)),
            GgufType::U64 => GgufValue::U64(u64::from_le_bytes(self.bytes(what)?)),
            GgufType::I64 => GgufValue::I64(i64::from_le_bytes(self.bytes(what)?)),
            GgufType::F64 => GgufValue::F64(f64::from_le_bytes(self.bytes(what)?)),
            GgufType::Bool => {
                let [b] = self.bytes(what)?;
                // llama.cpp treats any non-zero byte as true; so do we.
                GgufValue::Bool(b != 0)
            }
            GgufType::String => GgufValue::String(self.string(what)?),
            GgufType::Array => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(GgufError::TooDeep { what: what.to_owned() });
                }
                let type_offset = self.pos;
                let type_id = self.u32(what)?;
                let elem = GgufType::from_id(type_id).ok_or_else(|| GgufError::BadValueType {
                    type_id,
                    what: format!("array element type of {what}"),
                    offset: type_offset,
                })?;
                let len_offset = self.pos;
                let len = self.u64(what)?;
                self.check_len(len, elem.min_size(), what, len_offset, "elements")?;
                let mut values = Vec::with_capacity(len.min(1 << 12) as usize);
                for _ in 0..len {
                    values.push(self.value(elem, what, depth + 1)?);
                }
                GgufValue::Array(elem, values)
            }
        })
    }
}
