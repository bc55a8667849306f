//! Shared by the host's tests: the component file, the model, a tiny HTTP client.

#![allow(dead_code, reason = "each test binary uses a different part of this module")]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

// The same recipe `cargo xtask component` runs.
#[path = "../../../../xtask/src/component.rs"]
mod component;

/// The component's bytes: `$SPECREJ_COMPONENT` if set (CI builds it once with
/// `cargo xtask component`), else built here with xtask's `build_component` (cargo
/// no-ops when it is up to date; needs `rustup target add wasm32-unknown-unknown`).
pub fn component_bytes() -> Vec<u8> {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    let path = PATH.get_or_init(|| {
        if let Some(path) = std::env::var_os("SPECREJ_COMPONENT") {
            return PathBuf::from(path);
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        component::build_component(&root)
            .unwrap_or_else(|e| panic!("building the component: {e:#}"))
    });
    std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The `decoder-with-reward` component's bytes: `$SPECREJ_COMPONENT_WITH_REWARD` if set, else
/// built here with xtask's `build_component_with_reward`.
pub fn component_with_reward_bytes() -> Vec<u8> {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    let path = PATH.get_or_init(|| {
        if let Some(path) = std::env::var_os("SPECREJ_COMPONENT_WITH_REWARD") {
            return PathBuf::from(path);
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        component::build_component_with_reward(&root)
            .unwrap_or_else(|e| panic!("building the component: {e:#}"))
    });
    std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The default model (`SPECREJ_MODEL`); the real-model tests are ignored without it.
pub fn default_model() -> PathBuf {
    let path =
        std::env::var_os("SPECREJ_MODEL").expect("SPECREJ_MODEL must point to the default model");
    PathBuf::from(path)
}

/// An HTTP answer: status, headers (lower-cased names), body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: String,
    pub body: String,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// Sends one raw request and reads the whole answer (the server closes the connection).
pub fn raw(addr: SocketAddr, request: &[u8]) -> Answer {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(600))).expect("timeout");
    stream.write_all(request).expect("write");
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes).expect("read");
    let text = String::from_utf8(bytes).expect("utf-8 answer");
    let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("a status");
    let headers = head.to_ascii_lowercase();
    let body = if headers.contains("transfer-encoding: chunked") {
        dechunk(body)
    } else {
        body.to_string()
    };
    Answer { status, headers, body }
}

/// The payload of a chunked body (streamed answers have no length).
pub fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .expect("a chunk size");
        if size == 0 {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].strip_prefix("\r\n").expect("CRLF after a chunk");
    }
    out
}

pub fn head(addr: SocketAddr, path: &str) -> Answer {
    raw(addr, format!("HEAD {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes())
}

pub fn get(addr: SocketAddr, path: &str) -> Answer {
    raw(addr, format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes())
}

pub fn post(addr: SocketAddr, path: &str, body: &str) -> Answer {
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    raw(addr, [head.as_bytes(), body.as_bytes()].concat().as_slice())
}

/// Server-sent events of a body: (event name, data) pairs.
pub fn events(body: &str) -> Vec<(String, String)> {
    body.split("\n\n")
        .filter(|block| !block.trim().is_empty())
        .map(|block| {
            let mut name = String::from("message");
            let mut data = String::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event: ") {
                    name = v.to_string();
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data.push_str(v);
                }
            }
            (name, data)
        })
        .collect()
}
