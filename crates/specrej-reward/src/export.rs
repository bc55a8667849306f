//! Building a reward model directory from a policy GGUF: the LLM judge as a
//! `*ForSequenceClassification` checkpoint.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use specrej_candle::{Architecture, LoadOptions, WeightFormat, load_gguf};
use specrej_text::{ChatTemplate, GgufMetadata, Tokenizer};

use crate::error::RewardError;

/// The dtype of the exported weights.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ExportDtype {
    /// 4 bytes per weight; the reward equals the GGUF judge's margin up to the GGUF's own
    /// quantization (it is dequantized exactly).
    #[default]
    F32,
    /// Half the size; rounding of the dequantized weights.
    F16,
}

/// What [`export_judge_rm`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportReport {
    /// The directory.
    pub dir: PathBuf,
    /// The architecture name written to `config.json`.
    pub architecture: String,
    /// Token ids (in the shared vocabulary) whose head rows were subtracted.
    pub yes: u32,
    /// See `yes`.
    pub no: u32,
    /// Tensors written (score head included).
    pub tensors: usize,
}

fn other(path: &Path, what: impl std::fmt::Display) -> RewardError {
    RewardError::Other(format!("{}: {what}", path.display()))
}

/// GGUF tensor name → Hugging Face name (`None`: not part of the trunk).
fn hf_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, tail) = rest.split_once('.')?;
    let tail = match tail {
        "attn_norm.weight" => "input_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "attn_q.bias" => "self_attn.q_proj.bias",
        "attn_k.bias" => "self_attn.k_proj.bias",
        "attn_v.bias" => "self_attn.v_proj.bias",
        "attn_output.bias" => "self_attn.o_proj.bias",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{tail}"))
}

/// Inverts llama.cpp's Q/K row permutation (its converter maps HF's rotate-half layout to
/// the interleaved one: per head, rows `[2, hd/2]` become `[hd/2, 2]`).
fn unpermute(t: &Tensor, head_dim: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = t.dims2()?;
    let heads = rows / head_dim;
    t.reshape((heads, head_dim / 2, 2, cols))?.transpose(1, 2)?.contiguous()?.reshape((rows, cols))
}

/// Builds a reward model directory at `out` from the policy GGUF `gguf`:
/// `model.safetensors` (the dequantized trunk under Hugging Face names, Q/K rows un-permuted
/// for llama/mistral), `score.weight = head[Yes] − head[No]` (`[1, hidden]`, the output
/// matrix or the tied embedding), `config.json` (`LlamaForSequenceClassification` /
/// `MistralForSequenceClassification` / `Qwen2ForSequenceClassification`, `num_labels` 1, no
/// `pad_token_id`: the reward is read at the very last token), `tokenizer.json` (the GGUF
/// tokenizer serialized by the `tokenizers` crate) and `tokenizer_config.json` (the GGUF's
/// chat template, BOS/EOS strings).
///
/// The yes/no pair is the judge's ([`specrej_text::judge::ANSWER_PAIRS`]). Rope scaling
/// tables (`rope_freqs.weight`, Llama 3.1) are not exported: such files are rejected.
pub fn export_judge_rm(
    gguf: &Path,
    out: &Path,
    dtype: ExportDtype,
) -> Result<ExportReport, RewardError> {
    let meta = GgufMetadata::from_path(gguf).map_err(|e| other(gguf, e))?;
    let tokenizer = Tokenizer::from_gguf(&meta)
        .map_err(|source| RewardError::Text { path: gguf.to_path_buf(), source })?;
    let template = ChatTemplate::from_gguf(&meta)
        .map_err(|source| RewardError::Text { path: gguf.to_path_buf(), source })?;
    let (yes, no) = specrej_text::judge::ANSWER_PAIRS
        .iter()
        .find_map(|(y, n)| Some((tokenizer.single_token(y)?, tokenizer.single_token(n)?)))
        .ok_or_else(|| other(gguf, "no yes/no answer pair of single tokens in this vocabulary"))?;
    // The hyper-parameters, parsed and validated by specrej-candle's loader.
    let model =
        load_gguf(gguf, &LoadOptions { weights: WeightFormat::Native, ..Default::default() })?;
    let c = model.config().clone();
    drop(model);

    let mut file =
        File::open(gguf).map_err(|source| RewardError::Io { path: gguf.to_path_buf(), source })?;
    let content = gguf_file::Content::read(&mut file).map_err(|e| other(gguf, e))?;
    if content.tensor_infos.contains_key("rope_freqs.weight") {
        return Err(other(
            gguf,
            "rope_freqs.weight (llama3 rope scaling) is not supported by the exporter",
        ));
    }
    let mut reader = BufReader::new(file);
    let mut read = |name: &str| -> Result<Tensor, RewardError> {
        content
            .tensor(&mut reader, name, &Device::Cpu)
            .and_then(|q| q.dequantize(&Device::Cpu))
            .map_err(|e| other(gguf, format!("tensor {name:?}: {e}")))
    };
    let permuted = c.architecture != Architecture::Qwen2;
    let out_dtype = match dtype {
        ExportDtype::F32 => DType::F32,
        ExportDtype::F16 => DType::F16,
    };
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut names: Vec<String> = content.tensor_infos.keys().cloned().collect();
    names.sort();
    for name in &names {
        let Some(hf) = hf_name(name) else { continue };
        let mut t = read(name)?;
        if permuted && (name.ends_with("attn_q.weight") || name.ends_with("attn_k.weight")) {
            t = unpermute(&t, c.head_dim).map_err(|e| other(gguf, format!("{name}: {e}")))?;
        }
        let t = t.to_dtype(out_dtype).map_err(|e| other(gguf, e))?;
        tensors.insert(hf, t);
    }
    let head_name = if content.tensor_infos.contains_key("output.weight") {
        "output.weight"
    } else {
        "token_embd.weight"
    };
    let head = read(head_name)?; // [vocab, hidden]
    let score = head
        .get(yes as usize)
        .and_then(|y| y.sub(&head.get(no as usize)?))
        .and_then(|d| d.reshape((1, c.hidden_size)))
        .and_then(|d| d.to_dtype(out_dtype))
        .map_err(|e| other(gguf, e))?;
    tensors.insert("score.weight".into(), score);

    std::fs::create_dir_all(out)
        .map_err(|source| RewardError::Io { path: out.to_path_buf(), source })?;
    let write = |name: &str, bytes: &[u8]| -> Result<(), RewardError> {
        let path = out.join(name);
        std::fs::write(&path, bytes).map_err(|source| RewardError::Io { path, source })
    };
    let st_path = out.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &st_path).map_err(|e| other(&st_path, e))?;

    let (architecture, model_type) = match c.architecture {
        Architecture::Llama => ("LlamaForSequenceClassification", "llama"),
        Architecture::Mistral => ("MistralForSequenceClassification", "mistral"),
        Architecture::Qwen2 => ("Qwen2ForSequenceClassification", "qwen2"),
    };
    let eos: serde_json::Value = match c.eos_token_ids.as_slice() {
        [] => serde_json::Value::Null,
        [one] => (*one).into(),
        many => many.to_vec().into(),
    };
    let config = serde_json::json!({
        "architectures": [architecture],
        "model_type": model_type,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.ffn_size,
        "num_hidden_layers": c.layers,
        "num_attention_heads": c.heads,
        "num_key_value_heads": c.kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "max_position_embeddings": c.context_length,
        "vocab_size": c.vocab_size,
        "tie_word_embeddings": false,
        "attention_bias": c.architecture == Architecture::Qwen2,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": eos,
        "pad_token_id": null,
        "num_labels": 1,
        "id2label": {"0": "LABEL_0"},
        "label2id": {"LABEL_0": 0},
        "torch_dtype": if out_dtype == DType::F16 { "float16" } else { "float32" },
        "specrej_export": {
            "source": gguf.file_name().map(|f| f.to_string_lossy().into_owned()),
            "score": "lm_head[yes] - lm_head[no]",
            "yes_token_id": yes,
            "no_token_id": no,
        },
    });
    write(
        "config.json",
        serde_json::to_string_pretty(&config).map_err(|e| other(out, e))?.as_bytes(),
    )?;
    let tok_json = tokenizer
        .inner()
        .to_string(false)
        .map_err(|e| other(out, format!("serializing the tokenizer: {e}")))?;
    write("tokenizer.json", tok_json.as_bytes())?;
    let token_str = |id: Option<u32>| id.and_then(|i| tokenizer.id_to_token(i));
    let tok_config = serde_json::json!({
        "chat_template": template.source(),
        "bos_token": token_str(tokenizer.bos()),
        "eos_token": token_str(tokenizer.eos()),
        "add_bos_token": tokenizer.adds_bos(),
        "add_eos_token": false,
        "tokenizer_class": "PreTrainedTokenizerFast",
    });
    write(
        "tokenizer_config.json",
        serde_json::to_string_pretty(&tok_config).map_err(|e| other(out, e))?.as_bytes(),
    )?;
    Ok(ExportReport {
        dir: out.to_path_buf(),
        architecture: architecture.into(),
        yes,
        no,
        tensors: tensors.len(),
    })
}
