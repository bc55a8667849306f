//! A small GGUF writer (version 3), for tests and tools that need a file in memory.

use crate::{DEFAULT_ALIGNMENT, GgmlType, GgufValue};

/// One tensor for [`write_gguf`]: name, shape (outer dimension first), type, and its bytes as
/// stored (the writer does not check their length against the type).
pub type TensorData<'a> = (&'a str, &'a [usize], GgmlType, &'a [u8]);

/// A GGUF file: the metadata in order, then the tensor infos, then each tensor's data at the
/// alignment `general.alignment` gives (a `U32`; 32 otherwise).
pub fn write_gguf(metadata: &[(&str, GgufValue)], tensors: &[TensorData<'_>]) -> Vec<u8> {
    let alignment = metadata
        .iter()
        .find_map(|(k, v)| match v {
            GgufValue::U32(a) if *k == "general.alignment" && a.is_power_of_two() => {
                Some(u64::from(*a))
            }
            _ => None,
        })
        .unwrap_or(DEFAULT_ALIGNMENT);
    let pad = |out: &mut Vec<u8>, to: u64| {
        out.resize((out.len() as u64).next_multiple_of(to) as usize, 0)
    };
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        string(&mut out, key);
        out.extend((value.ty() as u32).to_le_bytes());
        payload(&mut out, value);
    }
    let mut offset = 0u64;
    let mut offsets = Vec::with_capacity(tensors.len());
    for (name, shape, ty, data) in tensors {
        string(&mut out, name);
        out.extend((shape.len() as u32).to_le_bytes());
        for &d in shape.iter().rev() {
            out.extend((d as u64).to_le_bytes()); // innermost first
        }
        out.extend(ty.id().to_le_bytes());
        out.extend(offset.to_le_bytes());
        offsets.push(offset);
        offset = (offset + data.len() as u64).next_multiple_of(alignment);
    }
    pad(&mut out, alignment);
    let data_start = out.len() as u64;
    for ((_, _, _, data), offset) in tensors.iter().zip(offsets) {
        out.resize((data_start + offset) as usize, 0);
        out.extend_from_slice(data);
    }
    out
}

pub(crate) fn string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// A value's bytes after its type id (arrays: element type, length, elements).
pub(crate) fn payload(out: &mut Vec<u8>, value: &GgufValue) {
    match value {
        GgufValue::U8(v) => out.extend(v.to_le_bytes()),
        GgufValue::I8(v) => out.extend(v.to_le_bytes()),
        GgufValue::U16(v) => out.extend(v.to_le_bytes()),
        GgufValue::I16(v) => out.extend(v.to_le_bytes()),
        GgufValue::U32(v) => out.extend(v.to_le_bytes()),
        GgufValue::I32(v) => out.extend(v.to_le_bytes()),
        GgufValue::F32(v) => out.extend(v.to_le_bytes()),
        GgufValue::Bool(v) => out.push(u8::from(*v)),
        GgufValue::String(s) => string(out, s),
        GgufValue::Array(ty, items) => {
            out.extend((*ty as u32).to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            for item in items {
                payload(out, item);
            }
        }
        GgufValue::U64(v) => out.extend(v.to_le_bytes()),
        GgufValue::I64(v) => out.extend(v.to_le_bytes()),
        GgufValue::F64(v) => out.extend(v.to_le_bytes()),
    }
}
