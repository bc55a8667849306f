//! The GGUF metadata reader on hand-written files, and on corrupt and truncated ones.

mod common;

use common::{W, gguf};
use specrej_text::{GgufError, GgufMetadata, GgufType, GgufValue};

fn sample() -> Vec<u8> {
    gguf(
        3,
        7,
        &[
            ("u8", W::U8(200)),
            ("i8", W::I8(-5)),
            ("u16", W::U16(65000)),
            ("i16", W::I16(-300)),
            ("u32", W::U32(4_000_000_000)),
            ("i32", W::I32(-70000)),
            ("f32", W::F32(1.5)),
            ("bool.t", W::Bool(true)),
            ("bool.f", W::Bool(false)),
            ("str", W::str("héllo 世界 🎉")),
            ("empty", W::str("")),
            ("u64", W::U64(u64::MAX)),
            ("i64", W::I64(i64::MIN)),
            ("f64", W::F64(-2.25)),
            ("arr.str", W::strs(["a", "", "ü"])),
            ("arr.i32", W::i32s([1, -2, 3])),
            ("arr.empty", W::Arr(4, vec![])),
            ("arr.nested", W::Arr(9, vec![W::i32s([1]), W::Arr(8, vec![W::str("x")])])),
        ],
    )
}

#[test]
fn reads_every_value_type() {
    let bytes = sample();
    let m = GgufMetadata::from_bytes(&bytes).expect("parses");
    assert_eq!(m.version, 3);
    assert_eq!(m.tensor_count, 7);
    assert_eq!(m.kv.len(), 18);
    assert_eq!(m.metadata_end, bytes.len() as u64);
    assert_eq!(m.get("u8"), Some(&GgufValue::U8(200)));
    assert_eq!(m.get("i8"), Some(&GgufValue::I8(-5)));
    assert_eq!(m.get("u16"), Some(&GgufValue::U16(65000)));
    assert_eq!(m.get("i16"), Some(&GgufValue::I16(-300)));
    assert_eq!(m.get_u32("u32"), Some(4_000_000_000));
    assert_eq!(m.get("i32").and_then(GgufValue::as_int), Some(-70000));
    assert_eq!(m.get_u32("i32"), None);
    assert_eq!(m.get("f32").and_then(GgufValue::as_f64), Some(1.5));
    assert_eq!(m.get_bool("bool.t"), Some(true));
    assert_eq!(m.get_bool("bool.f"), Some(false));
    assert_eq!(m.get_str("str"), Some("héllo 世界 🎉"));
    assert_eq!(m.get_str("empty"), Some(""));
    assert_eq!(m.get("u64"), Some(&GgufValue::U64(u64::MAX)));
    assert_eq!(m.get("i64"), Some(&GgufValue::I64(i64::MIN)));
    assert_eq!(m.get("f64"), Some(&GgufValue::F64(-2.25)));
    let strs: Vec<_> =
        m.get_array("arr.str").expect("array").iter().map(|v| v.as_str().expect("str")).collect();
    assert_eq!(strs, ["a", "", "ü"]);
    assert_eq!(
        m.get("arr.i32"),
        Some(&GgufValue::Array(
            GgufType::I32,
            vec![GgufValue::I32(1), GgufValue::I32(-2), GgufValue::I32(3)]
        ))
    );
    assert_eq!(m.get("arr.empty"), Some(&GgufValue::Array(GgufType::U32, vec![])));
    let nested = m.get_array("arr.nested").expect("array");
    assert_eq!(nested.len(), 2);
    assert_eq!(nested[1].as_array().expect("inner")[0].as_str(), Some("x"));
    assert_eq!(m.get("missing"), None);
}

#[test]
fn reader_and_slice_agree_and_stop_before_tensor_infos() {
    let mut bytes = sample();
    let end = bytes.len();
    bytes.extend([0xAB; 100]); // stands in for tensor infos
    let from_slice = GgufMetadata::from_bytes(&bytes).expect("parses");
    let mut cursor = std::io::Cursor::new(&bytes);
    let from_reader = GgufMetadata::read(&mut cursor).expect("parses");
    assert_eq!(from_slice, from_reader);
    assert_eq!(from_slice.metadata_end, end as u64);
    assert_eq!(cursor.position(), end as u64);
}

#[test]
fn version_2_is_read() {
    let m = GgufMetadata::from_bytes(&gguf(2, 0, &[("k", W::U32(1))])).expect("parses");
    assert_eq!(m.version, 2);
}

#[test]
fn from_path_reads_a_file() {
    let dir = std::env::temp_dir().join(format!("specrej-text-gguf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let path = dir.join("x.gguf");
    std::fs::write(&path, sample()).expect("write");
    let m = GgufMetadata::from_path(&path).expect("parses");
    assert_eq!(m.get_str("str"), Some("héllo 世界 🎉"));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn not_gguf() {
    let err = GgufMetadata::from_bytes(b"GGML\x03\0\0\0").expect_err("bad magic");
    assert!(matches!(err, GgufError::NotGguf { found } if &found == b"GGML"), "{err}");
    assert!(err.to_string().contains("not a GGUF file"), "{err}");
    let err = GgufMetadata::from_bytes(b"").expect_err("empty");
    assert!(matches!(err, GgufError::Truncated { .. }), "{err}");
    assert!(err.to_string().contains("magic"), "{err}");
}

#[test]
fn unsupported_versions() {
    for (v, hint) in [(1u32, "obsolete"), (4, ""), (3u32.swap_bytes(), "big-endian")] {
        let err = GgufMetadata::from_bytes(&gguf(v, 0, &[])).expect_err("bad version");
        assert!(
            matches!(err, GgufError::UnsupportedVersion { version, .. } if version == v),
            "{err}"
        );
        let msg = err.to_string();
        assert!(msg.contains("unsupported GGUF version") && msg.contains(hint), "{msg}");
    }
}

#[test]
fn every_truncation_is_an_error_naming_what() {
    let bytes = sample();
    for len in 0..bytes.len() {
        let cut = &bytes[..len];
        let err = GgufMetadata::from_bytes(cut).expect_err("truncated");
        assert!(
            matches!(err, GgufError::Truncated { .. } | GgufError::TooLong { .. }),
            "at {len}: {err}"
        );
        // The reader path (no known length) must fail the same way, without the length hint.
        let err = GgufMetadata::read(cut).expect_err("truncated");
        assert!(matches!(err, GgufError::Truncated { .. }), "reader at {len}: {err}");
    }
    let err = GgufMetadata::from_bytes(&bytes[..bytes.len() - 1]).expect_err("truncated");
    let msg = err.to_string();
    assert!(msg.contains("arr.nested"), "{msg}");
}

#[test]
fn huge_lengths_are_rejected_without_allocating() {
    // A string claiming 2^62 bytes.
    let mut bytes = gguf(3, 0, &[]);
    bytes[16..24].copy_from_slice(&1u64.to_le_bytes());
    bytes.extend((1u64 << 62).to_le_bytes());
    bytes.extend(b"key");
    bytes.extend([0u8; 20]);
    let err = GgufMetadata::from_bytes(&bytes).expect_err("too long");
    assert!(matches!(err, GgufError::TooLong { len, .. } if len == 1 << 62), "{err}");
    assert!(GgufMetadata::read(bytes.as_slice()).is_err());

    // An array claiming u64::MAX elements.
    let mut bytes = gguf(3, 0, &[("a", W::Arr(4, vec![]))]);
    let n = bytes.len();
    bytes[n - 8..].copy_from_slice(&u64::MAX.to_le_bytes());
    let err = GgufMetadata::from_bytes(&bytes).expect_err("too long");
    assert!(matches!(err, GgufError::TooLong { unit: "elements", .. }), "{err}");
    assert!(err.to_string().contains("\"a\""), "{err}");
    let err = GgufMetadata::read(bytes.as_slice()).expect_err("truncated");
    assert!(matches!(err, GgufError::Truncated { .. }), "{err}");

    // A key/value count far beyond the input.
    let mut bytes = gguf(3, 0, &[]);
    bytes[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    let err = GgufMetadata::from_bytes(&bytes).expect_err("too long");
    assert!(matches!(err, GgufError::TooLong { .. }), "{err}");
}

#[test]
fn bad_utf8_value_type_duplicate_and_depth() {
    let mut bytes = gguf(3, 0, &[("k", W::str("ab"))]);
    let n = bytes.len();
    bytes[n - 1] = 0xFF;
    let err = GgufMetadata::from_bytes(&bytes).expect_err("bad utf-8");
    assert!(matches!(err, GgufError::BadUtf8 { .. }), "{err}");
    assert!(err.to_string().contains("\"k\"") && err.to_string().contains("UTF-8"), "{err}");

    let mut bytes = gguf(3, 0, &[("k", W::U8(1))]);
    let n = bytes.len();
    bytes[n - 5..n - 1].copy_from_slice(&13u32.to_le_bytes());
    let err = GgufMetadata::from_bytes(&bytes).expect_err("bad type");
    assert!(matches!(err, GgufError::BadValueType { type_id: 13, .. }), "{err}");

    let err = GgufMetadata::from_bytes(&gguf(3, 0, &[("k", W::U8(1)), ("k", W::U8(2))]))
        .expect_err("duplicate");
    assert!(matches!(err, GgufError::DuplicateKey(ref k) if k == "k"), "{err}");

    let mut deep = W::Arr(4, vec![]);
    for _ in 0..20 {
        deep = W::Arr(9, vec![deep]);
    }
    let err = GgufMetadata::from_bytes(&gguf(3, 0, &[("deep", deep)])).expect_err("too deep");
    assert!(matches!(err, GgufError::TooDeep { .. }), "{err}");
}

#[test]
fn corrupted_bytes_never_panic() {
    let bytes = sample();
    for i in 0..bytes.len() {
        for v in [0x00, 0x01, 0x7F, 0x80, 0xFF, bytes[i] ^ 0x01, bytes[i] ^ 0x40] {
            let mut b = bytes.clone();
            b[i] = v;
            let _ = GgufMetadata::from_bytes(&b);
            let _ = GgufMetadata::read(b.as_slice());
        }
    }
}
