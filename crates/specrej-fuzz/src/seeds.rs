//! The seed corpora (`fuzz/corpus/<target>/`), made by `specrej-fuzz seeds`: small valid
//! inputs of every format, so mutations start from files that get deep into each parser.

use std::collections::HashMap;

use anyhow::Result;
use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{Device, Tensor};

use crate::targets::join;

const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

const LLAMA3: &str = "{{ bos_token }}{% for message in messages %}{% if loop.index0 == 0 and message['role'] == 'system' %}{% set content = message['content'] %}{% endif %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

const MISTRAL: &str = "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}";

/// Deterministic weights in [-0.5, 0.5).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = crate::mutate::Rng::new(seed);
    (0..n).map(|_| (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5).collect()
}

/// GPT-2's byte-to-character map, so a 256-token byte-level vocabulary covers every input.
fn byte_chars() -> Vec<char> {
    let mut bytes: Vec<u32> =
        (b'!'..=b'~').chain(0xa1..=0xac).chain(0xae..=0xff).map(u32::from).collect();
    let mut chars = bytes.clone();
    let mut extra = 0;
    for b in 0..256u32 {
        if !bytes.contains(&b) {
            bytes.push(b);
            chars.push(256 + extra);
            extra += 1;
        }
    }
    let mut table = vec!['\0'; 256];
    for (b, c) in bytes.iter().zip(chars) {
        table[*b as usize] = char::from_u32(c).unwrap_or('?');
    }
    table
}

/// A 1-layer llama-architecture GGUF: hidden `hidden`, 2 heads / 1 KV head, byte-level BPE
/// with two specials, the ChatML template; matrices as `dtype`.
fn tiny_gguf(hidden: usize, dtype: GgmlDType) -> Result<Vec<u8>> {
    let chars = byte_chars();
    let mut tokens: Vec<String> = vec!["<|im_start|>".into(), "<|im_end|>".into()];
    tokens.extend(chars.iter().map(|c| c.to_string()));
    tokens.push("He".into());
    let merges = ["H e".to_string()];
    let vocab = tokens.len();
    let (heads, kv_heads, ffn) = (2usize, 1usize, 2 * hidden);
    let head_dim = hidden / heads;
    use gguf_file::Value;
    let md: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.block_count", Value::U32(1)),
        ("llama.embedding_length", Value::U32(hidden as u32)),
        ("llama.attention.head_count", Value::U32(heads as u32)),
        ("llama.attention.head_count_kv", Value::U32(kv_heads as u32)),
        ("llama.rope.freq_base", Value::F32(10000.0)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("llama.context_length", Value::U32(128)),
        ("llama.feed_forward_length", Value::U32(ffn as u32)),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String("gpt2".into())),
        (
            "tokenizer.ggml.tokens",
            Value::Array(tokens.iter().map(|t| Value::String(t.clone())).collect()),
        ),
        (
            "tokenizer.ggml.token_type",
            Value::Array((0..vocab).map(|i| Value::I32(if i < 2 { 3 } else { 1 })).collect()),
        ),
        (
            "tokenizer.ggml.merges",
            Value::Array(merges.iter().map(|m| Value::String(m.clone())).collect()),
        ),
        ("tokenizer.ggml.bos_token_id", Value::U32(0)),
        ("tokenizer.ggml.eos_token_id", Value::U32(1)),
        ("tokenizer.chat_template", Value::String(CHATML.into())),
    ];
    let shapes: Vec<(&str, Vec<usize>)> = vec![
        ("token_embd.weight", vec![vocab, hidden]),
        ("output_norm.weight", vec![hidden]),
        ("output.weight", vec![vocab, hidden]),
        ("blk.0.attn_norm.weight", vec![hidden]),
        ("blk.0.attn_q.weight", vec![heads * head_dim, hidden]),
        ("blk.0.attn_k.weight", vec![kv_heads * head_dim, hidden]),
        ("blk.0.attn_v.weight", vec![kv_heads * head_dim, hidden]),
        ("blk.0.attn_output.weight", vec![hidden, heads * head_dim]),
        ("blk.0.ffn_norm.weight", vec![hidden]),
        ("blk.0.ffn_gate.weight", vec![ffn, hidden]),
        ("blk.0.ffn_up.weight", vec![ffn, hidden]),
        ("blk.0.ffn_down.weight", vec![hidden, ffn]),
    ];
    let mut tensors = Vec::new();
    for (i, (name, shape)) in shapes.iter().enumerate() {
        let n = shape.iter().product();
        let t = Tensor::from_vec(values(n, i as u64), shape.as_slice(), &Device::Cpu)?;
        let ty = if shape.len() == 2 && shape[1] % dtype.block_size() == 0 {
            dtype
        } else {
            GgmlDType::F32
        };
        tensors.push((*name, QTensor::quantize(&t, ty)?));
    }
    let md: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (*k, v)).collect();
    let mut out = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut out, &md, &ts)?;
    Ok(out.into_inner())
}

/// A Hugging Face `LlamaForCausalLM` directory as the safetensors target's input.
fn tiny_checkpoint(work: &std::path::Path) -> Result<Vec<u8>> {
    let (vocab, hidden, heads, kv_heads, ffn) = (32usize, 8usize, 2usize, 1usize, 16usize);
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden, "intermediate_size": ffn, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "num_hidden_layers": 1, "vocab_size": vocab,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 128,
        "tie_word_embeddings": true,
    });
    let hd = hidden / heads;
    let shapes: Vec<(&str, Vec<usize>)> = vec![
        ("model.embed_tokens.weight", vec![vocab, hidden]),
        ("model.norm.weight", vec![hidden]),
        ("model.layers.0.input_layernorm.weight", vec![hidden]),
        ("model.layers.0.self_attn.q_proj.weight", vec![heads * hd, hidden]),
        ("model.layers.0.self_attn.k_proj.weight", vec![kv_heads * hd, hidden]),
        ("model.layers.0.self_attn.v_proj.weight", vec![kv_heads * hd, hidden]),
        ("model.layers.0.self_attn.o_proj.weight", vec![hidden, heads * hd]),
        ("model.layers.0.post_attention_layernorm.weight", vec![hidden]),
        ("model.layers.0.mlp.gate_proj.weight", vec![ffn, hidden]),
        ("model.layers.0.mlp.up_proj.weight", vec![ffn, hidden]),
        ("model.layers.0.mlp.down_proj.weight", vec![hidden, ffn]),
    ];
    let mut tensors = HashMap::new();
    for (i, (name, shape)) in shapes.iter().enumerate() {
        let n = shape.iter().product();
        tensors.insert(
            name.to_string(),
            Tensor::from_vec(values(n, 100 + i as u64), shape.as_slice(), &Device::Cpu)?,
        );
    }
    let path = work.join("seed.safetensors");
    candle_core::safetensors::save(&tensors, &path)?;
    let bytes = std::fs::read(&path)?;
    std::fs::remove_file(&path)?;
    Ok(join(serde_json::to_string_pretty(&config)?.as_bytes(), &bytes))
}

/// Every target's seeds: (target, file name, bytes).
pub fn seeds(work: &std::path::Path) -> Result<Vec<(&'static str, String, Vec<u8>)>> {
    let mut out = vec![
        ("gguf", "tiny-f32.gguf".to_string(), tiny_gguf(32, GgmlDType::F32)?),
        ("gguf", "tiny-q8_0.gguf".to_string(), tiny_gguf(32, GgmlDType::Q8_0)?),
        ("safetensors", "tiny-llama".to_string(), tiny_checkpoint(work)?),
    ];
    for (name, src) in [("chatml", CHATML), ("llama3", LLAMA3), ("mistral", MISTRAL)] {
        out.push(("template", format!("{name}.jinja"), src.as_bytes().to_vec()));
    }
    let body = br#"{"messages":[{"role":"user","content":"Name a fruit."}],"n":2,"max_tokens":8}"#;
    let requests: [(&str, Vec<u8>); 3] = [
        ("post.http", [format!("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", body.len()).as_bytes(), body].concat()),
        ("get.http", b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        ("expect.http", [format!("POST /v1/completions HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n", body.len()).as_bytes(), body].concat()),
    ];
    for (name, bytes) in requests {
        out.push(("http", name.to_string(), bytes));
    }
    let bodies: [(&str, &str); 4] = [
        (
            "chat.json",
            r#"{"messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Name a fruit."}],"n":3,"max_tokens":12,"seed":1,"temperature":0.7,"top_p":0.9}"#,
        ),
        (
            "sr.json",
            r#"{"messages":[{"role":"user","content":"Give three tips."}],"stream":true,"max_tokens":24,"specrej":{"method":"speculative_rejection","n":4,"alpha":0.5,"min_new_tokens":6,"reward":"likelihood","rules":{"gate_tau":0.4,"probe_lag":8}}}"#,
        ),
        (
            "completion.json",
            r#"{"prompt":"The capital of France is","max_tokens":6,"n":2,"specrej":{"reward":"judge","return_candidates":false}}"#,
        ),
        (
            "paper.json",
            r#"{"messages":[{"role":"user","content":"hi"}],"max_completion_tokens":5,"specrej":{"method":"sr","alpha":0.9,"rules":{"paper_exact":true}}}"#,
        ),
    ];
    for (name, body) in bodies {
        out.push(("openai", name.to_string(), body.as_bytes().to_vec()));
    }
    Ok(out)
}
