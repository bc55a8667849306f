//! The tensor table after the metadata: each tensor's name, shape, ggml type and where its
//! bytes are, with every rule a reader relies on checked once, here.

use std::collections::HashMap;
use std::io::{self, Read};
use std::ops::Range;
use std::path::Path;

use crate::{GgufError, GgufMetadata, ModelConfig, Src};

/// The most dimensions a tensor may have (`GGML_MAX_DIMS`).
pub const MAX_TENSOR_DIMS: u32 = 4;

/// The most elements a tensor (and any one of its dimensions) may have: 2^48, far beyond any
/// real tensor (a 405B-parameter model's largest holds about 2^31), small enough that sizes
/// in bytes never overflow a `u64`.
pub const MAX_TENSOR_ELEMENTS: u64 = 1 << 48;

/// The byte offset of the tensor count in the header (after the magic and the version).
const TENSOR_COUNT_OFFSET: u64 = 8;

/// The fewest bytes one tensor info takes: name length (8), dimension count (4), one
/// dimension (8), type (4), offset (8).
const MIN_TENSOR_INFO_BYTES: u64 = 32;

/// A ggml tensor type, as GGUF stores it (ids from ggml's `enum ggml_type`; the ids ggml
/// removed are unknown here).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum GgmlType {
    /// `F32`
    F32,
    /// `F16`
    F16,
    /// `Q4_0`
    Q4_0,
    /// `Q4_1`
    Q4_1,
    /// `Q5_0`
    Q5_0,
    /// `Q5_1`
    Q5_1,
    /// `Q8_0`
    Q8_0,
    /// `Q8_1`
    Q8_1,
    /// `Q2_K`
    Q2K,
    /// `Q3_K`
    Q3K,
    /// `Q4_K`
    Q4K,
    /// `Q5_K`
    Q5K,
    /// `Q6_K`
    Q6K,
    /// `Q8_K`
    Q8K,
    /// `IQ2_XXS`
    Iq2Xxs,
    /// `IQ2_XS`
    Iq2Xs,
    /// `IQ3_XXS`
    Iq3Xxs,
    /// `IQ1_S`
    Iq1S,
    /// `IQ4_NL`
    Iq4Nl,
    /// `IQ3_S`
    Iq3S,
    /// `IQ2_S`
    Iq2S,
    /// `IQ4_XS`
    Iq4Xs,
    /// `I8`
    I8,
    /// `I16`
    I16,
    /// `I32`
    I32,
    /// `I64`
    I64,
    /// `F64`
    F64,
    /// `IQ1_M`
    Iq1M,
    /// `BF16`
    Bf16,
    /// `TQ1_0`
    Tq1_0,
    /// `TQ2_0`
    Tq2_0,
    /// `MXFP4`
    Mxfp4,
}

/// (type, id, GGML's name, elements per block, bytes per block), from ggml's type traits.
const TYPES: [(GgmlType, u32, &str, u64, u64); 32] = {
    use GgmlType::*;
    [
        (F32, 0, "F32", 1, 4),
        (F16, 1, "F16", 1, 2),
        (Q4_0, 2, "Q4_0", 32, 18),
        (Q4_1, 3, "Q4_1", 32, 20),
        (Q5_0, 6, "Q5_0", 32, 22),
        (Q5_1, 7, "Q5_1", 32, 24),
        (Q8_0, 8, "Q8_0", 32, 34),
        (Q8_1, 9, "Q8_1", 32, 36),
        (Q2K, 10, "Q2_K", 256, 84),
        (Q3K, 11, "Q3_K", 256, 110),
        (Q4K, 12, "Q4_K", 256, 144),
        (Q5K, 13, "Q5_K", 256, 176),
        (Q6K, 14, "Q6_K", 256, 210),
        (Q8K, 15, "Q8_K", 256, 292),
        (Iq2Xxs, 16, "IQ2_XXS", 256, 66),
        (Iq2Xs, 17, "IQ2_XS", 256, 74),
        (Iq3Xxs, 18, "IQ3_XXS", 256, 98),
        (Iq1S, 19, "IQ1_S", 256, 50),
        (Iq4Nl, 20, "IQ4_NL", 32, 18),
        (Iq3S, 21, "IQ3_S", 256, 110),
        (Iq2S, 22, "IQ2_S", 256, 82),
        (Iq4Xs, 23, "IQ4_XS", 256, 136),
        (I8, 24, "I8", 1, 1),
        (I16, 25, "I16", 1, 2),
        (I32, 26, "I32", 1, 4),
        (I64, 27, "I64", 1, 8),
        (F64, 28, "F64", 1, 8),
        (Iq1M, 29, "IQ1_M", 256, 56),
        (Bf16, 30, "BF16", 1, 2),
        (Tq1_0, 34, "TQ1_0", 256, 54),
        (Tq2_0, 35, "TQ2_0", 256, 66),
        (Mxfp4, 39, "MXFP4", 32, 17),
    ]
};

impl GgmlType {
    /// The type for a GGUF type id, if ggml defines it.
    pub fn from_id(id: u32) -> Option<Self> {
        TYPES.iter().find(|t| t.1 == id).map(|t| t.0)
    }

    fn traits(self) -> &'static (GgmlType, u32, &'static str, u64, u64) {
        // TYPES lists the variants in declaration order (the unit test `types_table_is_in_order`
        // checks), so the discriminant is the row.
        &TYPES[self as usize]
    }

    /// The id GGUF stores.
    pub fn id(self) -> u32 {
        self.traits().1
    }

    /// GGML's name for the type (`Q4_K`, `BF16`, …).
    pub fn name(self) -> &'static str {
        self.traits().2
    }

    /// Elements per block (a row's length is a whole number of blocks).
    pub fn block_elements(self) -> u64 {
        self.traits().3
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> u64 {
        self.traits().4
    }

    /// All the types, in id order.
    pub fn all() -> impl Iterator<Item = GgmlType> {
        TYPES.iter().map(|t| t.0)
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What is wrong with one tensor's info ([`GgufError::Tensor`] names the tensor).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TensorProblem {
    /// The dimension count is 0 or above [`MAX_TENSOR_DIMS`].
    #[error("{0} dimensions (a tensor has 1 to {MAX_TENSOR_DIMS})")]
    DimCount(u32),
    /// A dimension, or the element count, exceeds [`MAX_TENSOR_ELEMENTS`] (or this
    /// platform's address space).
    #[error("dimensions {0:?} (innermost first) are implausibly large")]
    TooLarge(Vec<u64>),
    /// The type id is not one ggml defines.
    #[error("unknown ggml type id {0}")]
    UnknownType(u32),
    /// A row is not a whole number of the type's blocks.
    #[error("rows of {row} elements are not whole blocks of {block} ({ty})")]
    PartialBlock {
        /// The innermost dimension.
        row: u64,
        /// Elements per block.
        block: u64,
        /// The type.
        ty: GgmlType,
    },
    /// The offset is not a multiple of the alignment.
    #[error("offset {offset} is not a multiple of the alignment {alignment}")]
    Misaligned {
        /// The offset from the data section's start.
        offset: u64,
        /// `general.alignment`.
        alignment: u64,
    },
    /// The data does not lie inside the file.
    #[error("data at bytes {start}..{end} lies past the end of the file ({len} bytes)")]
    PastEnd {
        /// The data's first byte.
        start: u64,
        /// One past its last byte.
        end: u64,
        /// The file's length.
        len: u64,
    },
    /// The offset plus the data section's start or the size overflows.
    #[error("offset {0} overflows")]
    Overflow(u64),
}

/// One tensor's info, checked against the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// The tensor's name.
    pub name: String,
    /// The shape, outer dimension first (GGUF stores the innermost first): `token_embd.weight`
    /// is `[vocab, hidden]`.
    pub shape: Vec<usize>,
    /// The stored type.
    pub ggml_type: GgmlType,
    /// The data's offset from the data section's start (a multiple of the alignment).
    pub offset: u64,
    /// The data's offset from the start of the file.
    pub start: u64,
    /// The data's size in bytes (from the type's block size).
    pub size: u64,
}

impl TensorInfo {
    /// The number of elements.
    pub fn elements(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }

    /// The data's byte range in the file, as indices (checked to fit a `usize` when read).
    pub fn byte_range(&self) -> Range<usize> {
        // Both ends were checked to fit in a usize by the reader.
        let start = usize::try_from(self.start).unwrap_or(usize::MAX);
        let end = usize::try_from(self.start + self.size).unwrap_or(usize::MAX);
        start..end
    }
}

/// The tensor table of a GGUF file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorTable {
    alignment: u64,
    data_start: u64,
    tensors: Vec<TensorInfo>,
    index: HashMap<String, usize>,
}

impl TensorTable {
    /// The tensor called `name`.
    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// Whether the file holds a tensor called `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The tensors, in file order.
    pub fn iter(&self) -> std::slice::Iter<'_, TensorInfo> {
        self.tensors.iter()
    }

    /// The number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// The data section's alignment (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// The data section's start: just past the tensor infos, rounded up to the alignment.
    pub fn data_start(&self) -> u64 {
        self.data_start
    }

    /// Reads the tensor infos from `r`, which is just past `meta`, and checks them.
    pub(crate) fn read_from<R: Read>(
        r: &mut Src<R>,
        meta: &GgufMetadata,
    ) -> Result<Self, GgufError> {
        let count = meta.tensor_count;
        r.check_len(count, MIN_TENSOR_INFO_BYTES, "tensor count", TENSOR_COUNT_OFFSET, "elements")?;
        let alignment = meta.alignment();
        // Never trust the count for the allocation: grow with what is actually read.
        let cap = count.min(1 << 12) as usize;
        let mut raw: Vec<(String, Vec<u64>, u32, u64)> = Vec::with_capacity(cap);
        let mut index = HashMap::with_capacity(cap);
        for i in 0..count {
            let name = r.string(&format!("name of tensor info #{i}"))?;
            let what = format!("tensor info {name:?}");
            let n_dims = r.u32(&what)?;
            if n_dims == 0 || n_dims > MAX_TENSOR_DIMS {
                return Err(GgufError::Tensor { name, problem: TensorProblem::DimCount(n_dims) });
            }
            let mut dims = Vec::with_capacity(n_dims as usize); // innermost first
            for _ in 0..n_dims {
                dims.push(r.u64(&what)?);
            }
            let type_id = r.u32(&what)?;
            let offset = r.u64(&what)?;
            if index.insert(name.clone(), raw.len()).is_some() {
                return Err(GgufError::DuplicateTensor(name));
            }
            raw.push((name, dims, type_id, offset));
        }
        let data_start = r.pos.checked_next_multiple_of(alignment).ok_or_else(|| {
            GgufError::BadAlignment(format!("{alignment} (the data section's start overflows)"))
        })?;
        let mut tensors = Vec::with_capacity(raw.len());
        for (name, dims, type_id, offset) in raw {
            match check(&dims, type_id, offset, alignment, data_start, r.len) {
                Ok((shape, ggml_type, start, size)) => {
                    tensors.push(TensorInfo { name, shape, ggml_type, offset, start, size });
                }
                Err(problem) => return Err(GgufError::Tensor { name, problem }),
            }
        }
        Ok(TensorTable { alignment, data_start, tensors, index })
    }
}

/// Checks one tensor's info: (shape outer first, type, start, size) or what is wrong.
fn check(
    dims: &[u64],
    type_id: u32,
    offset: u64,
    alignment: u64,
    data_start: u64,
    len: Option<u64>,
) -> Result<(Vec<usize>, GgmlType, u64, u64), TensorProblem> {
    let ty = GgmlType::from_id(type_id).ok_or(TensorProblem::UnknownType(type_id))?;
    let too_large = || TensorProblem::TooLarge(dims.to_vec());
    let elements = dims
        .iter()
        .try_fold(1u64, |n, &d| n.checked_mul(d).filter(|_| d <= MAX_TENSOR_ELEMENTS))
        .filter(|&n| n <= MAX_TENSOR_ELEMENTS)
        .ok_or_else(too_large)?;
    // Callers index with usize (wasm32's is 32 bits): the element count and every dimension
    // must fit one.
    usize::try_from(elements).map_err(|_| too_large())?;
    let shape = dims
        .iter()
        .rev()
        .map(|&d| usize::try_from(d))
        .collect::<Result<Vec<usize>, _>>()
        .map_err(|_| too_large())?;
    let row = dims[0];
    let block = ty.block_elements();
    if !row.is_multiple_of(block) {
        return Err(TensorProblem::PartialBlock { row, block, ty });
    }
    // elements ≤ 2^48 and block_bytes ≤ 292: no overflow.
    let size = elements / block * ty.block_bytes();
    if !offset.is_multiple_of(alignment) {
        return Err(TensorProblem::Misaligned { offset, alignment });
    }
    let start = data_start.checked_add(offset).ok_or(TensorProblem::Overflow(offset))?;
    let end = start.checked_add(size).ok_or(TensorProblem::Overflow(offset))?;
    if let Some(len) = len
        && end > len
    {
        return Err(TensorProblem::PastEnd { start, end, len });
    }
    // Callers slice with usize: the range must fit one (it does when the bytes are in memory).
    usize::try_from(end).map_err(|_| TensorProblem::Overflow(offset))?;
    Ok((shape, ty, start, size))
}

/// A GGUF file's metadata and tensor table (not its tensor data).
#[derive(Debug, Clone, PartialEq)]
pub struct GgufFile {
    /// The header and key/value metadata.
    pub metadata: GgufMetadata,
    /// The tensor infos, checked against the file.
    pub tensors: TensorTable,
}

impl GgufFile {
    /// Parses and checks a whole file held in memory.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, GgufError> {
        Self::read_limited(bytes, Some(bytes.len() as u64))
    }

    /// Parses a file's metadata and tensor table from disk, reading no tensor data.
    pub fn from_path(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        let file = std::fs::File::open(path.as_ref())?;
        let len = file.metadata().ok().map(|m| m.len());
        Self::read_limited(io::BufReader::new(file), len)
    }

    /// Parses from a reader whose total length (from the current position) is `len`, if known
    /// (without it, tensors are not checked against the file's end); the reader is left just
    /// past the tensor infos.
    pub fn read_limited<R: Read>(reader: R, len: Option<u64>) -> Result<Self, GgufError> {
        let mut r = Src::new(reader, len);
        let metadata = GgufMetadata::read_from(&mut r)?;
        let tensors = TensorTable::read_from(&mut r, &metadata)?;
        Ok(GgufFile { metadata, tensors })
    }

    /// The model's hyper-parameters ([`ModelConfig::from_gguf`]).
    pub fn model_config(&self) -> Result<ModelConfig, GgufError> {
        ModelConfig::from_gguf(&self.metadata, &self.tensors)
    }
}
