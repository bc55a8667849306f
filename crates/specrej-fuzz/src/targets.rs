//! The fuzz targets: each takes bytes from outside and must answer with `Ok` or a clear
//! error, never a panic, a hang or a giant allocation.

use std::io::{Cursor, Read, Write};
use std::path::Path;

use specrej_host::api::{Endpoint, RequestLimits, parse_request};
use specrej_text::gguf::GgufFile;
use specrej_text::{ChatTemplate, GgufMetadata, Message, Tokenizer};

/// A target: its name, the tokens its mutations insert, and the function under test, which
/// returns a short description of the outcome (an error's first words), so inputs that reach
/// a new outcome join the corpus.
#[derive(Clone, Copy, Debug)]
pub struct Target {
    pub name: &'static str,
    pub dictionary: &'static [&'static [u8]],
    pub run: fn(&[u8], &Path) -> String,
}

pub const TARGETS: [Target; 5] = [
    Target { name: "gguf", dictionary: GGUF_WORDS, run: gguf },
    Target { name: "safetensors", dictionary: SAFETENSORS_WORDS, run: safetensors },
    Target { name: "template", dictionary: TEMPLATE_WORDS, run: template },
    Target { name: "http", dictionary: HTTP_WORDS, run: http },
    Target { name: "openai", dictionary: OPENAI_WORDS, run: openai },
];

pub fn target(name: &str) -> Option<Target> {
    TARGETS.iter().copied().find(|t| t.name == name)
}

/// An outcome's class: the error's first few words, digits dropped (so sizes do not count
/// as new behaviour).
fn class<E: std::fmt::Display>(result: Result<(), E>) -> String {
    match result {
        Ok(()) => "ok".into(),
        Err(e) => {
            let text = e.to_string();
            let words: Vec<&str> = text
                .split_whitespace()
                .filter(|w| !w.contains("/tmp") && !w.contains("target/"))
                .take(6)
                .collect();
            words.join(" ").chars().filter(|c| !c.is_ascii_digit()).collect()
        }
    }
}

const GGUF_WORDS: &[&[u8]] = &[
    b"GGUF",
    b"general.architecture",
    b"llama",
    b"qwen2",
    b"general.alignment",
    b"tokenizer.ggml.tokens",
    b"tokenizer.ggml.merges",
    b"tokenizer.chat_template",
    b"{% for m in messages %}",
    b"llama.context_length",
    b"llama.attention.head_count",
    b"llama.attention.head_count_kv",
    b"llama.attention.key_length",
    b"llama.embedding_length",
    b"token_embd.weight",
    b"output.weight",
    b"\x00\x00\x00\x00\x00\x00\x00\x00",
    b"\xff\xff\xff\xff\xff\xff\xff\xff",
];

/// GGUF bytes: specrej-gguf's whole-file check (metadata, tensor table, `ModelConfig`), the
/// tokenizer and chat template built from the metadata (with a render), the WebGPU backend's
/// check (specrej-gguf's, then its kernels' limits), and candle's load of the whole model.
fn gguf(bytes: &[u8], _work: &Path) -> String {
    let file = GgufFile::from_bytes(bytes).and_then(|f| f.model_config()).map(|_| ());
    let text = GgufMetadata::from_bytes(bytes).map_err(|e| e.to_string()).and_then(|meta| {
        let tokenizer = Tokenizer::from_gguf(&meta).map_err(|e| e.to_string())?;
        let ids = tokenizer.encode("Hello, world", false).map_err(|e| e.to_string())?;
        let _ = tokenizer.decode(&ids, true);
        let template = ChatTemplate::from_gguf(&meta).map_err(|e| e.to_string())?;
        template.render(&[Message::user("hi")], true).map_err(|e| e.to_string())?;
        Ok(())
    });
    let wgpu = specrej_wgpu::check_gguf(bytes).map(|_| ());
    let candle =
        specrej_candle::load_gguf_bytes(bytes, &specrej_candle::LoadOptions::default()).map(|_| ());
    format!("{} | {} | {} | {}", class(file), class(text), class(wgpu), class(candle))
}

const SAFETENSORS_WORDS: &[&[u8]] = &[
    b"\"architectures\"",
    b"LlamaForCausalLM",
    b"Qwen2ForCausalLM",
    b"\"hidden_size\"",
    b"\"num_attention_heads\"",
    b"\"rope_scaling\"",
    b"\"dtype\":\"F16\"",
    b"\"dtype\":\"BF16\"",
    b"\"shape\":[",
    b"\"data_offsets\":[",
    b"\"__metadata__\"",
    b"18446744073709551615",
    b"-1",
    b"1e309",
];

/// A Hugging Face checkpoint directory: the input is `u32 LE n | config.json (n bytes) |
/// model.safetensors`, written to `work` and loaded by specrej-candle.
fn safetensors(bytes: &[u8], work: &Path) -> String {
    let (config, tensors) = split(bytes);
    let write = |name: &str, data: &[u8]| std::fs::write(work.join(name), data);
    if let Err(e) = write("config.json", config).and_then(|()| write("model.safetensors", tensors))
    {
        return format!("io {e}");
    }
    class(
        specrej_candle::load_safetensors(work, &specrej_candle::LoadOptions::default()).map(|_| ()),
    )
}

/// `u32 LE n | n bytes | rest` (n clamped to what is there).
pub fn split(bytes: &[u8]) -> (&[u8], &[u8]) {
    let n = bytes.get(..4).map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize);
    let rest = bytes.get(4..).unwrap_or_default();
    rest.split_at(n.min(rest.len()))
}

pub fn join(first: &[u8], second: &[u8]) -> Vec<u8> {
    let mut out = (first.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(first);
    out.extend_from_slice(second);
    out
}

const TEMPLATE_WORDS: &[&[u8]] = &[
    b"{%",
    b"%}",
    b"{{",
    b"}}",
    b"{#",
    b"#}",
    b" for ",
    b" in ",
    b" endfor ",
    b" if ",
    b" endif ",
    b" set ",
    b"range(100000)",
    b"messages",
    b"message['content']",
    b"|tojson",
    b"|length",
    b"raise_exception('x')",
    b"loop.index",
    b"macro",
    b"endmacro",
    b"call",
    b"recursive",
    b"loop(",
    b"~",
    b" * 100000",
    b"[",
    b"]",
    b"(",
    b")",
    b"'",
    b"\"",
    b".split(",
    b".strip()",
    b"namespace(",
    b"strftime_now('%Y')",
    b"{% extends 'x' %}",
    b"{% include 'x' %}",
];

/// A chat template from a model file: compiled, then rendered over a short conversation.
fn template(bytes: &[u8], _work: &Path) -> String {
    let source = String::from_utf8_lossy(bytes);
    let result = ChatTemplate::new(source, "<s>", "</s>").and_then(|t| {
        // Alternating roles, as strict templates (Mistral's) demand.
        let messages = [Message::user("Hello?"), Message::assistant("Hi."), Message::user("Bye.")];
        t.render(&messages, true).map(|_| ())
    });
    class(result)
}

const HTTP_WORDS: &[&[u8]] = &[
    b"\r\n",
    b"\r\n\r\n",
    b"POST ",
    b"GET ",
    b" HTTP/1.1",
    b"Content-Length: ",
    b"Transfer-Encoding: chunked",
    b"Expect: 100-continue",
    b"Host: x",
    b"18446744073709551616",
    b"-1",
    b"0x10",
    b": ",
    b"\n",
    b"\x00",
];

/// A stream that yields the input, then end of file; writes (`100 Continue`) are dropped.
struct Stream(Cursor<Vec<u8>>);

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Bytes from a client, read by the HTTP request reader under the server's limits.
fn http(bytes: &[u8], _work: &Path) -> String {
    let limits = specrej_http::Limits {
        max_header_bytes: 8 << 10,
        max_body_bytes: 1 << 20,
        require_length: true,
    };
    let result =
        specrej_http::read_request(Stream(Cursor::new(bytes.to_vec())), &limits, |m| m == "POST");
    class(result.map(|_| ()).map_err(|e| e.message))
}

const OPENAI_WORDS: &[&[u8]] = &[
    b"\"messages\"",
    b"\"role\"",
    b"\"content\"",
    b"\"user\"",
    b"\"system\"",
    b"\"assistant\"",
    b"\"n\"",
    b"\"max_tokens\"",
    b"\"stream\"",
    b"\"seed\"",
    b"\"temperature\"",
    b"\"top_p\"",
    b"\"specrej\"",
    b"\"method\"",
    b"\"alpha\"",
    b"\"rules\"",
    b"\"gate_tau\"",
    b"\"refill\"",
    b"\"reward\"",
    b"\"prompt\"",
    b"0.99999999",
    b"1e309",
    b"-0",
    b"null",
    b"true",
    b"[]",
    b"{}",
    b"18446744073709551616",
    b"\"\\u0000\"",
    b"\"\\ud800\"",
];

/// An OpenAI request body, parsed as the endpoint its shape implies (`messages`: chat, else
/// completions) under the default limits.
fn openai(bytes: &[u8], _work: &Path) -> String {
    let endpoint = if bytes.windows(10).any(|w| w == b"\"messages\"") {
        Endpoint::Chat
    } else {
        Endpoint::Completions
    };
    let result =
        parse_request(endpoint, bytes, &RequestLimits::default(), &["judge", "likelihood"]);
    class(result.map(|_| ()).map_err(|e| e.message))
}
