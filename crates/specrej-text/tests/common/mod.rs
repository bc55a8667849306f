//! A tiny GGUF writer for tests.

#![allow(dead_code, reason = "each test binary uses a different subset of these helpers")]

/// A value to write.
#[derive(Debug, Clone)]
pub enum W {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    /// element type id, elements
    Arr(u32, Vec<W>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl W {
    pub fn type_id(&self) -> u32 {
        match self {
            W::U8(_) => 0,
            W::I8(_) => 1,
            W::U16(_) => 2,
            W::I16(_) => 3,
            W::U32(_) => 4,
            W::I32(_) => 5,
            W::F32(_) => 6,
            W::Bool(_) => 7,
            W::Str(_) => 8,
            W::Arr(..) => 9,
            W::U64(_) => 10,
            W::I64(_) => 11,
            W::F64(_) => 12,
        }
    }

    pub fn str(s: &str) -> W {
        W::Str(s.to_owned())
    }

    pub fn strs<S: AsRef<str>>(items: impl IntoIterator<Item = S>) -> W {
        W::Arr(8, items.into_iter().map(|s| W::str(s.as_ref())).collect())
    }

    pub fn i32s(items: impl IntoIterator<Item = i32>) -> W {
        W::Arr(5, items.into_iter().map(W::I32).collect())
    }

    pub fn f32s(items: impl IntoIterator<Item = f32>) -> W {
        W::Arr(6, items.into_iter().map(W::F32).collect())
    }

    pub fn write(&self, out: &mut Vec<u8>) {
        match self {
            W::U8(v) => out.extend(v.to_le_bytes()),
            W::I8(v) => out.extend(v.to_le_bytes()),
            W::U16(v) => out.extend(v.to_le_bytes()),
            W::I16(v) => out.extend(v.to_le_bytes()),
            W::U32(v) => out.extend(v.to_le_bytes()),
            W::I32(v) => out.extend(v.to_le_bytes()),
            W::F32(v) => out.extend(v.to_le_bytes()),
            W::Bool(v) => out.push(u8::from(*v)),
            W::Str(s) => write_str(out, s),
            W::Arr(t, items) => {
                out.extend(t.to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                for i in items {
                    i.write(out);
                }
            }
            W::U64(v) => out.extend(v.to_le_bytes()),
            W::I64(v) => out.extend(v.to_le_bytes()),
            W::F64(v) => out.extend(v.to_le_bytes()),
        }
    }
}

pub fn write_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// A GGUF file (version 3) with these key/values, `tensor_count` and no tensor data.
pub fn gguf(version: u32, tensor_count: u64, kv: &[(&str, W)]) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend(version.to_le_bytes());
    out.extend(tensor_count.to_le_bytes());
    out.extend((kv.len() as u64).to_le_bytes());
    for (k, v) in kv {
        write_str(&mut out, k);
        out.extend(v.type_id().to_le_bytes());
        v.write(&mut out);
    }
    out
}

/// GPT-2's byte-to-unicode table: the vocabulary string of each byte.
pub fn byte_level_char(b: u8) -> char {
    let printable =
        (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
    if printable {
        char::from(b)
    } else {
        let mut n = 0u32;
        for x in 0..b {
            let p = (b'!'..=b'~').contains(&x)
                || (0xA1..=0xAC).contains(&x)
                || (0xAE..=0xFF).contains(&x);
            if !p {
                n += 1;
            }
        }
        char::from_u32(256 + n).expect("valid char")
    }
}
