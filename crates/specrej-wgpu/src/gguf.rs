//! What is WebGPU-specific about reading GGUF: which stored types the shaders read (and
//! their ids), host dequantization, and the kernels' limits on a model's shape. The file
//! itself (metadata, tensor table, hyper-parameters and their rules) is read and checked by
//! [`specrej_gguf`].

pub(crate) use specrej_gguf::GgmlType;
use specrej_gguf::{GgufFile, GgufMetadata, ModelConfig, TensorInfo};

use crate::error::Error;

pub use specrej_gguf::{Architecture, ModelConfig as Config};

/// The id the matmul shader dispatches on (`Weight.wtype`); `None` for types it cannot read
/// (BF16 matrices are converted to F32 at load, the rest refused).
pub(crate) fn shader_id(ty: GgmlType) -> Option<u32> {
    match ty {
        GgmlType::F32 => Some(0),
        GgmlType::F16 => Some(1),
        GgmlType::Q4_0 => Some(2),
        GgmlType::Q4_1 => Some(3),
        GgmlType::Q8_0 => Some(8),
        _ => None,
    }
}

/// A GGUF file held in memory, parsed and checked by specrej-gguf.
pub(crate) struct Gguf<'a> {
    pub(crate) file: GgufFile,
    bytes: &'a [u8],
}

impl<'a> Gguf<'a> {
    /// Parses the header, metadata and tensor table of a whole file in memory.
    pub(crate) fn parse(bytes: &'a [u8]) -> Result<Self, Error> {
        Ok(Self { file: GgufFile::from_bytes(bytes)?, bytes })
    }

    /// The key/value metadata.
    pub(crate) fn meta(&self) -> &GgufMetadata {
        &self.file.metadata
    }

    /// Whether the file holds a tensor called `name`.
    pub(crate) fn has(&self, name: &str) -> bool {
        self.file.tensors.contains(name)
    }

    /// The tensor called `name`, unchecked.
    pub(crate) fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.file.tensors.get(name)
    }

    /// The model's hyper-parameters (specrej-gguf's rules), then this backend's limits.
    pub(crate) fn config(&self) -> Result<Config, Error> {
        let config = self.file.model_config()?;
        check_supported(&config)?;
        Ok(config)
    }

    /// The tensor's info, checked against the expected shape (outer dimension first) and
    /// against the types this backend reads.
    pub(crate) fn info(&self, name: &str, expected: &[usize]) -> Result<&TensorInfo, Error> {
        let info = self
            .tensor(name)
            .ok_or_else(|| Error::Gguf(specrej_gguf::GgufError::MissingTensor(name.into())))?;
        let squeeze = |d: &[usize]| d.iter().copied().filter(|&x| x != 1).collect::<Vec<_>>();
        if info.shape != expected
            && !(expected.len() == 1 && squeeze(&info.shape) == squeeze(expected))
        {
            return Err(Error::Gguf(specrej_gguf::GgufError::ShapeMismatch {
                name: name.into(),
                expected: expected.to_vec(),
                found: info.shape.clone(),
            }));
        }
        if shader_id(info.ggml_type).is_none() && info.ggml_type != GgmlType::Bf16 {
            return Err(Error::UnsupportedTensorType {
                name: name.into(),
                ty: info.ggml_type.name().into(),
            });
        }
        Ok(info)
    }

    /// The raw bytes of a tensor (specrej-gguf checked they lie inside the file).
    pub(crate) fn data(&self, info: &TensorInfo) -> &'a [u8] {
        self.bytes.get(info.byte_range()).unwrap_or_default()
    }

    /// A tensor converted to f32 on the host (norm weights, biases, BF16 matrices).
    pub(crate) fn to_f32(&self, name: &str, info: &TensorInfo) -> Result<Vec<f32>, Error> {
        dequantize(info.ggml_type, self.data(info)).ok_or_else(|| Error::UnsupportedTensorType {
            name: name.into(),
            ty: info.ggml_type.name().into(),
        })
    }
}

/// The largest head the attention kernel handles: each of its 64 threads accumulates 4 of a
/// head's dimensions (`shaders/attention.wgsl`).
pub(crate) const MAX_HEAD_DIM: usize = 256;

/// The kernels' limits on a valid model's shape (specrej-gguf has checked it is valid): a
/// model outside them is a clear "unsupported by the wgpu backend", not a corrupt file.
pub(crate) fn check_supported(c: &Config) -> Result<(), Error> {
    let unsupported = |field: &str, reason: String| {
        Err(Error::Unsupported { key: ModelConfig::gguf_key(c.architecture, field), reason })
    };
    if c.head_dim > MAX_HEAD_DIM {
        return unsupported(
            "head_dim",
            format!(
                "heads of {} dimensions are wider than the attention kernel's {MAX_HEAD_DIM}",
                c.head_dim
            ),
        );
    }
    if !c.head_dim.is_multiple_of(4) {
        return unsupported(
            "head_dim",
            format!(
                "{} is not a multiple of 4 (the kernels move 4 dimensions at once)",
                c.head_dim
            ),
        );
    }
    for (field, v) in [("hidden_size", c.hidden_size), ("ffn_size", c.ffn_size)] {
        if !v.is_multiple_of(32) {
            return unsupported(
                field,
                format!("{v} is not a multiple of 32 (the shaders read 32-element blocks)"),
            );
        }
    }
    if !(c.heads * c.head_dim).is_multiple_of(32) {
        return unsupported(
            "heads",
            format!(
                "{} heads × {} is not a multiple of 32 (the shaders read 32-element blocks)",
                c.heads, c.head_dim
            ),
        );
    }
    Ok(())
}

/// GGML data of type `ty` as f32 (`None` for types this backend does not read).
pub(crate) fn dequantize(ty: GgmlType, data: &[u8]) -> Option<Vec<f32>> {
    Some(match ty {
        GgmlType::F32 => {
            data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
        }
        GgmlType::F16 => {
            data.chunks_exact(2).map(|b| f16_to_f32(u16::from_le_bytes([b[0], b[1]]))).collect()
        }
        GgmlType::Bf16 => data
            .chunks_exact(2)
            .map(|b| f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16))
            .collect(),
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
        _ => return None,
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
