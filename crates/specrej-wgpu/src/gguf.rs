//! GGUF tensor infos (the metadata comes from [`specrej_gguf::GgufMetadata`]) and the model's
//! hyper-parameters. Every length is checked against the bytes present; nothing panics.

use std::collections::HashMap;

use specrej_gguf::{GgufMetadata, GgufValue};

use crate::error::Error;

/// GGML tensor types this backend knows by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q8_0,
    Bf16,
    Other(u32),
}

impl GgmlType {
    fn from_id(id: u32) -> Self {
        match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            8 => Self::Q8_0,
            30 => Self::Bf16,
            other => Self::Other(other),
        }
    }

    /// GGML's name for the type.
    pub(crate) fn name(self) -> String {
        let known = [
            (6, "Q5_0"), (7, "Q5_1"), (9, "Q8_1"), (10, "Q2_K"), (11, "Q3_K"), (12, "Q4_K"), (13, "Q5_K"),
            (14, "Q6_K"), (15, "Q8_K"), (16, "IQ2_XXS"), (17, "IQ2_XS"), (18, "IQ3_XXS"), (19, "IQ1_S"),
            (20, "IQ4_NL"), (21, "IQ3_S"), (22, "IQ2_S"), (23, "IQ4_XS"), (24, "I8"), (25, "I16"),
            (26, "I32"), (27, "I64"), (28, "F64"), (29, "IQ1_M"),
        ];
        match self {
            Self::F32 => "F32".into(),
            Self::F16 => "F16".into(),
            Self::Q4_0 => "Q4_0".into(),
            Self::Q4_1 => "Q4_1".into(),
            Self::Q8_0 => "Q8_0".into(),
            Self::Bf16 => "BF16".into(),
            Self::Other(id) => known
                .iter()
                .find(|(k, _)| *k == id)
                .map_or_else(|| format!("type id {id}"), |(_, n)| (*n).to_string()),
        }
    }

    /// (elements per block, bytes per block) for the types whose data we can size.
    fn block(self) -> Option<(u64, u64)> {
        match self {
            Self::F32 => Some((1, 4)),
            Self::F16 | Self::Bf16 => Some((1, 2)),
            Self::Q4_0 => Some((32, 18)),
            Self::Q4_1 => Some((32, 20)),
            Self::Q8_0 => Some((32, 34)),
            Self::Other(_) => None,
        }
    }

    /// The id the matmul shader dispatches on (`Weight.wtype`).
    pub(crate) fn shader_id(self) -> Option<u32> {
        match self {
            Self::F32 => Some(0),
            Self::F16 => Some(1),
            Self::Q4_0 => Some(2),
            Self::Q4_1 => Some(3),
            Self::Q8_0 => Some(8),
            Self::Bf16 | Self::Other(_) => None,
        }
    }
}

/// One tensor's header: name, shape (outer dimension first), type, byte range.
#[derive(Clone, Debug)]
pub(crate) struct TensorInfo {
    pub(crate) shape: Vec<usize>,
    pub(crate) ty: GgmlType,
    pub(crate) start: usize,
    pub(crate) len: usize,
}

/// A parsed GGUF file held in memory.
pub(crate) struct Gguf<'a> {
    pub(crate) meta: GgufMetadata,
    pub(crate) tensors: HashMap<String, TensorInfo>,
    bytes: &'a [u8],
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize, what: &str) -> Result<&[u8], Error> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len()).ok_or_else(|| {
            Error::Corrupt(format!("truncated while reading {what} at byte {}", self.pos))
        })?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self, what: &str) -> Result<u32, Error> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self, what: &str) -> Result<u64, Error> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
}

impl<'a> Gguf<'a> {
    /// Parses the header, metadata and tensor infos of a whole file in memory.
    pub(crate) fn parse(bytes: &'a [u8]) -> Result<Self, Error> {
        let meta = GgufMetadata::from_bytes(bytes)?;
        let mut c = Cursor { bytes, pos: usize::try_from(meta.metadata_end).map_err(|_| Error::Corrupt("header too large".into()))? };
        let count = usize::try_from(meta.tensor_count).map_err(|_| Error::Corrupt("tensor count too large".into()))?;
        // Each info takes at least 8 + 4 + 4 + 8 bytes.
        if count > bytes.len() / 24 {
            return Err(Error::Corrupt(format!("{count} tensors cannot fit in {} bytes", bytes.len())));
        }
        let mut raw = Vec::with_capacity(count);
        for i in 0..count {
            let what = format!("tensor info #{i}");
            let len = usize::try_from(c.u64(&what)?).map_err(|_| Error::Corrupt(format!("{what}: name too long")))?;
            let name = std::str::from_utf8(c.take(len, &what)?)
                .map_err(|_| Error::Corrupt(format!("{what}: name is not UTF-8")))?
                .to_string();
            let dims = c.u32(&what)?;
            if dims == 0 || dims > 4 {
                return Err(Error::Corrupt(format!("tensor {name:?}: {dims} dimensions")));
            }
            let mut shape = Vec::with_capacity(dims as usize);
            for _ in 0..dims {
                let d = usize::try_from(c.u64(&what)?).map_err(|_| Error::Corrupt(format!("tensor {name:?}: dimension too large")))?;
                shape.push(d);
            }
            shape.reverse(); // GGUF lists the innermost dimension first
            let ty = GgmlType::from_id(c.u32(&what)?);
            let offset = c.u64(&what)?;
            raw.push((name, shape, ty, offset));
        }
        let alignment = meta.get("general.alignment").and_then(GgufValue::as_u32).unwrap_or(32).max(1) as usize;
        let data_start = c.pos.div_ceil(alignment) * alignment;
        let mut tensors = HashMap::with_capacity(count);
        for (name, shape, ty, offset) in raw {
            let elements = shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d as u64));
            let len = match (ty.block(), elements) {
                (Some((per, size)), Some(n)) if n % per == 0 => (n / per).checked_mul(size),
                (Some(_), Some(n)) => {
                    return Err(Error::Corrupt(format!("tensor {name:?}: {n} elements are not whole blocks of {}", ty.name())));
                }
                _ => Some(0), // unknown type: sized (and rejected) only if a tensor we need has it
            };
            let start = usize::try_from(offset).ok().and_then(|o| o.checked_add(data_start));
            let (Some(len), Some(start)) = (len.and_then(|l| usize::try_from(l).ok()), start) else {
                return Err(Error::Corrupt(format!("tensor {name:?}: size or offset overflows")));
            };
            if start.checked_add(len).is_none_or(|end| end > bytes.len()) {
                return Err(Error::Corrupt(format!(
                    "tensor {name:?}: data at {start}..{} lies past the end of the file ({} bytes)",
                    start.saturating_add(len),
                    bytes.len()
                )));
            }
            if tensors.insert(name.clone(), TensorInfo { shape, ty, start, len }).is_some() {
                return Err(Error::Corrupt(format!("tensor {name:?} appears twice")));
            }
        }
        Ok(Self { meta, tensors, bytes })
    }

    /// The tensor's info, checked against the expected shape (outer dimension first).
    pub(crate) fn info(&self, name: &str, expected: &[usize]) -> Result<&TensorInfo, Error> {
        let info = self.tensors.get(name).ok_or_else(|| Error::MissingTensor(name.into()))?;
        let squeeze = |d: &[usize]| d.iter().copied().filter(|&x| x != 1).collect::<Vec<_>>();
        if info.shape != expected && !(expected.len() == 1 && squeeze(&info.shape) == squeeze(expected)) {
            return Err(Error::ShapeMismatch { name: name.into(), expected: expected.to_vec(), found: info.shape.clone() });
        }
        if let GgmlType::Other(_) = info.ty {
            return Err(Error::UnsupportedTensorType { name: name.into(), ty: info.ty.name() });
        }
        Ok(info)
    }

    /// The raw bytes of a tensor.
    pub(crate) fn data(&self, info: &TensorInfo) -> &'a [u8] {
        &self.bytes[info.start..info.start + info.len]
    }

    /// A tensor converted to f32 on the host (norm weights, biases, BF16 matrices).
    pub(crate) fn to_f32(&self, name: &str, info: &TensorInfo) -> Result<Vec<f32>, Error> {
        dequantize(info.ty, self.data(info)).ok_or_else(|| Error::UnsupportedTensorType { name: name.into(), ty: info.ty.name() })
    }
}

/// GGML data of type `ty` as f32 (`None` for types this backend does not read).
pub(crate) fn dequantize(ty: GgmlType, data: &[u8]) -> Option<Vec<f32>> {
    Some(match ty {
        GgmlType::F32 => data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        GgmlType::F16 => data.chunks_exact(2).map(|b| f16_to_f32(u16::from_le_bytes([b[0], b[1]]))).collect(),
        GgmlType::Bf16 => data.chunks_exact(2).map(|b| f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16)).collect(),
        GgmlType::Q8_0 => data
            .chunks_exact(34)
            .flat_map(|b| {
                let d = f16_to_f32(u16::from_le_bytes([b[0], b[1]]));
                b[2..34].iter().map(move |&q| f32::from(q as i8) * d)
            })
            .collect(),
        GgmlType::Q4_0 => data
            .chunks_exact(18)
            .flat_map(|b| {
                let d = f16_to_f32(u16::from_le_bytes([b[0], b[1]]));
                let qs = &b[2..18];
                (0..32).map(move |j| {
                    let q = if j < 16 { qs[j] & 0xf } else { qs[j - 16] >> 4 };
                    (f32::from(q) - 8.0) * d
                })
            })
            .collect(),
        GgmlType::Q4_1 => data
            .chunks_exact(20)
            .flat_map(|b| {
                let d = f16_to_f32(u16::from_le_bytes([b[0], b[1]]));
                let m = f16_to_f32(u16::from_le_bytes([b[2], b[3]]));
                let qs = &b[4..20];
                (0..32).map(move |j| {
                    let q = if j < 16 { qs[j] & 0xf } else { qs[j - 16] >> 4 };
                    f32::from(q) * d + m
                })
            })
            .collect(),
        GgmlType::Other(_) => return None,
    })
}

/// IEEE half → single precision.
pub(crate) fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exp = u32::from((h >> 10) & 0x1f);
    let mant = u32::from(h & 0x3ff);
    let bits = match (exp, mant) {
        (0, 0) => sign,
        (0, m) => {
            // Subnormal: normalise.
            let shift = m.leading_zeros() - 21; // bring the top set bit to bit 10
            let m = (m << shift) & 0x3ff;
            sign | ((127 - 15 + 1 - shift) << 23) | (m << 13)
        }
        (31, 0) => sign | 0x7f80_0000,
        (31, m) => sign | 0x7f80_0000 | (m << 13),
        (e, m) => sign | ((e + 127 - 15) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

/// Which member of the Llama family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    /// Llama, SmolLM, TinyLlama, …
    Llama,
    /// Mistral (sliding window ignored).
    Mistral,
    /// Qwen2: biases on q, k, v.
    Qwen2,
}

/// Hyper-parameters of a loaded model.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// The family member.
    pub architecture: Architecture,
    /// Rows of the embedding / output matrix.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Transformer blocks.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Width of the SwiGLU hidden layer.
    pub ffn_size: usize,
    /// RoPE base frequency.
    pub rope_theta: f32,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f32,
    /// Longest sequence the model supports.
    pub context_length: usize,
    /// Beginning-of-sequence token, if the file names one.
    pub bos_token_id: Option<u32>,
    /// Tokens that end a response.
    pub eos_token_ids: Vec<u32>,
    /// GGUF llama/mistral files rotate interleaved pairs; qwen2 rotates halves.
    pub rope_interleaved: bool,
}

impl Config {
    /// Bytes of f32 K/V cache one cached token takes over all layers (a model with an f16
    /// cache takes half: use [`crate::WgpuModel::kv_bytes_per_token`]).
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * self.layers * self.kv_heads * self.head_dim * 4
    }

    /// Reads the hyper-parameters from GGUF metadata (vocabulary size from the embedding).
    pub(crate) fn from_gguf(g: &Gguf<'_>) -> Result<Self, Error> {
        let md = &g.meta;
        let cfg = |key: &str, reason: &str| Error::Config { key: key.into(), reason: reason.into() };
        let arch = md.get_str("general.architecture").ok_or_else(|| cfg("general.architecture", "missing or not a string"))?;
        let architecture = match arch {
            "llama" => Architecture::Llama,
            "mistral" => Architecture::Mistral,
            "qwen2" => Architecture::Qwen2,
            other => return Err(Error::UnsupportedArchitecture(other.into())),
        };
        let int = |k: &str, default: Option<usize>| -> Result<usize, Error> {
            let key = format!("{arch}.{k}");
            match md.get(&key) {
                Some(v) => v
                    .as_int()
                    .and_then(|x| usize::try_from(x).ok())
                    .ok_or_else(|| cfg(&key, "not a non-negative integer")),
                None => default.ok_or_else(|| cfg(&key, "missing")),
            }
        };
        let float = |k: &str, default: f32| -> Result<f32, Error> {
            let key = format!("{arch}.{k}");
            match md.get(&key) {
                Some(v) => v.as_f64().map(|x| x as f32).ok_or_else(|| cfg(&key, "not a number")),
                None => Ok(default),
            }
        };
        let hidden_size = int("embedding_length", None)?;
        let heads = int("attention.head_count", None)?;
        let kv_heads = int("attention.head_count_kv", Some(heads))?;
        let head_dim = int("attention.key_length", (heads > 0).then(|| hidden_size / heads))?;
        if int("attention.value_length", Some(head_dim))? != head_dim {
            return Err(cfg(&format!("{arch}.attention.value_length"), "differs from key_length (unsupported)"));
        }
        if int("rope.dimension_count", Some(head_dim))? != head_dim {
            return Err(cfg(&format!("{arch}.rope.dimension_count"), "partial rotary embeddings are not supported"));
        }
        let token = |k: &str| md.get(k).and_then(GgufValue::as_u32);
        let mut eos_token_ids = Vec::new();
        for k in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
            if let Some(id) = token(k)
                && !eos_token_ids.contains(&id)
            {
                eos_token_ids.push(id);
            }
        }
        let embd = g.tensors.get("token_embd.weight").ok_or_else(|| Error::MissingTensor("token_embd.weight".into()))?;
        if embd.shape.len() != 2 || embd.shape[1] != hidden_size {
            return Err(Error::ShapeMismatch {
                name: "token_embd.weight".into(),
                expected: vec![embd.shape.first().copied().unwrap_or(0), hidden_size],
                found: embd.shape.clone(),
            });
        }
        let config = Config {
            architecture,
            vocab_size: embd.shape[0],
            hidden_size,
            layers: int("block_count", None)?,
            heads,
            kv_heads,
            head_dim,
            ffn_size: int("feed_forward_length", None)?,
            rope_theta: float("rope.freq_base", 10_000.0)?,
            rms_norm_eps: float("attention.layer_norm_rms_epsilon", 1e-5)?,
            context_length: int("context_length", Some(4096))?,
            bos_token_id: token("tokenizer.ggml.bos_token_id"),
            eos_token_ids,
            rope_interleaved: architecture != Architecture::Qwen2,
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), Error> {
        let bad = |key: &str, reason: String| Err(Error::Config { key: key.into(), reason });
        for (key, value, cap) in [
            ("vocab_size", self.vocab_size, 1 << 22),
            ("embedding_length", self.hidden_size, 1 << 16),
            ("block_count", self.layers, 1 << 10),
            ("attention.head_count", self.heads, 1 << 10),
            ("attention.head_count_kv", self.kv_heads, 1 << 10),
            ("attention.key_length", self.head_dim, 256),
            ("feed_forward_length", self.ffn_size, 1 << 18),
            ("context_length", self.context_length, 1 << 24),
        ] {
            if value == 0 || value > cap {
                return bad(key, format!("{value} is outside 1..={cap}"));
            }
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return bad("attention.head_count_kv", format!("{} heads are not a multiple of {} kv heads", self.heads, self.kv_heads));
        }
        if !self.head_dim.is_multiple_of(4) {
            return bad("attention.key_length", format!("{} is not a multiple of 4", self.head_dim));
        }
        for (key, v) in [("embedding_length", self.hidden_size), ("feed_forward_length", self.ffn_size)] {
            if !v.is_multiple_of(32) {
                return bad(key, format!("{v} is not a multiple of 32 (the shaders read 32-element blocks)"));
            }
        }
        if !(self.heads * self.head_dim).is_multiple_of(32) {
            return bad("attention.head_count", "heads × head_dim is not a multiple of 32".into());
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return bad("rope.freq_base", format!("{} is not a positive number", self.rope_theta));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return bad("attention.layer_norm_rms_epsilon", format!("{} is negative or not a number", self.rms_norm_eps));
        }
        Ok(())
    }
}
