//! [`Tokenizer`]: text to token ids and back, built from GGUF metadata or a HF `tokenizer.json`.

use std::collections::HashSet;
use std::path::Path;

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip as StripDecoder;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::{Prepend, Replace};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior,
};

use crate::gguf::GgufMetadata;
use crate::{Error, Result};

/// GGUF `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
mod token_type {
    pub const UNKNOWN: i128 = 2;
    pub const CONTROL: i128 = 3;
    pub const USER_DEFINED: i128 = 4;
    pub const BYTE: i128 = 6;
}

/// Names of end-of-turn tokens treated as end-of-sequence when present in the vocabulary.
pub const END_OF_TURN_TOKENS: &[&str] =
    &["<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end|>", "<end_of_turn>"];

// GPT-2's split regex, as llama.cpp writes it.
const GPT2_RE: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3_RE: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_RE: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN35_RE: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const GPT4O_RE: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const TEKKEN_RE: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// How llama.cpp pre-tokenizes one `tokenizer.ggml.pre` family (see its `llama-vocab.cpp`).
struct PreSpec {
    /// Regexes applied in turn; each splits every piece into matches and the gaps between.
    regexes: &'static [&'static str],
    /// Whole pre-tokenized words found in the vocabulary skip the merges (llama3 and kin).
    ignore_merges: bool,
    /// Default for `tokenizer.ggml.add_bos_token` when the key is absent.
    add_bos: bool,
}

/// `tokenizer.ggml.pre` values this crate supports for `tokenizer.ggml.model = "gpt2"`.
pub const SUPPORTED_PRE: &[&str] = &[
    "default",
    "gpt-2",
    "gpt2",
    "phi-2",
    "mpt",
    "olmo",
    "jais",
    "exaone4",
    "roberta-bpe",
    "smollm",
    "starcoder",
    "refact",
    "command-r",
    "codeshell",
    "exaone",
    "minerva-7b",
    "llama3",
    "llama-v3",
    "llama-bpe",
    "falcon3",
    "falcon-h1",
    "pixtral",
    "dbrx",
    "smaug-bpe",
    "qwen2",
    "deepseek-r1-qwen",
    "stablelm2",
    "megrez",
    "qwen35",
    "gpt-4o",
    "llama4",
    "tekken",
    "falcon",
    "deepseek-llm",
    "deepseek-coder",
    "deepseek-v3",
];

fn pre_spec(pre: &str) -> Option<PreSpec> {
    let spec = |regexes, ignore_merges, add_bos| PreSpec { regexes, ignore_merges, add_bos };
    Some(match pre {
        "default" => {
            spec(&[r"[\p{P}\$\+<=>\^~\|]+", GPT2_RE, r"\p{N}+", "[0-9][0-9][0-9]"], false, false)
        }
        "gpt-2" | "gpt2" | "phi-2" | "mpt" | "olmo" | "jais" | "exaone4" | "roberta-bpe" => {
            spec(&[GPT2_RE], false, false)
        }
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            spec(&[r"\p{N}", GPT2_RE], false, false)
        }
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" => {
            spec(&[LLAMA3_RE], true, true)
        }
        "dbrx" | "smaug-bpe" => spec(&[LLAMA3_RE], false, false),
        "qwen2" | "deepseek-r1-qwen" | "stablelm2" | "megrez" => spec(&[QWEN2_RE], false, false),
        "qwen35" => spec(&[QWEN35_RE], false, false),
        "gpt-4o" | "llama4" => spec(&[GPT4O_RE], false, false),
        "tekken" => spec(&[TEKKEN_RE], true, true),
        "falcon" => spec(&[r"[\p{P}\$\+<=>\^~\|`]+", GPT2_RE, "[0-9][0-9][0-9]"], false, false),
        // Character classes written with escapes: their literal forms are not NFC-stable.
        "deepseek-llm" => spec(
            &[
                "[\r\n]",
                "\\s?[A-Za-z\u{b5}\u{c0}-\u{d6}\u{d8}-\u{f6}\u{f8}-\u{1ba}\u{1bc}-\u{1bf}\u{1c4}-\u{293}\u{295}-\u{2af}\u{370}-\u{373}\u{376}\u{377}\u{37b}-\u{37d}\u{37f}\u{386}\u{388}-\u{38a}\u{38c}\u{38e}-\u{3a1}\u{3a3}-\u{3f5}\u{3f7}-\u{481}\u{48a}-\u{52f}\u{531}-\u{556}\u{10a0}-\u{10c5}\u{13a0}-\u{13f5}\u{13f8}-\u{13fd}\u{1c90}-\u{1cba}\u{1cbd}-\u{1cbf}\u{1d00}-\u{1d2b}\u{1d6b}-\u{1d77}\u{1d79}-\u{1d9a}\u{1e00}-\u{1f15}\u{1f18}-\u{1f1d}\u{1f20}-\u{1f45}\u{1f48}-\u{1f4d}\u{1f50}-\u{1f57}\u{1f59}\u{1f5b}\u{1f5d}\u{1f5f}-\u{1f7d}\u{1f80}-\u{1fb4}\u{1fb6}-\u{1fbc}\u{1fbe}\u{1fc2}-\u{1fc4}\u{1fc6}-\u{1fcc}\u{1fd0}-\u{1fd3}\u{1fd6}-\u{1fdb}\u{1fe0}-\u{1fec}\u{1ff2}-\u{1ff4}\u{1ff6}-\u{1ffc}\u{2102}\u{2107}\u{210a}-\u{2113}\u{2115}\u{2119}-\u{211d}\u{2124}\u{2126}\u{2128}\u{212a}-\u{212d}\u{212f}-\u{2134}\u{2139}\u{213c}-\u{213f}\u{2145}-\u{2149}\u{214e}\u{2183}\u{2184}\u{2c00}-\u{2c7b}\u{2c7e}-\u{2ce4}\u{2ceb}-\u{2cee}\u{2cf2}\u{2cf3}\u{a640}-\u{a66d}\u{a680}-\u{a69b}\u{a722}-\u{a76f}\u{a771}-\u{a787}\u{a78b}-\u{a78e}\u{ab70}-\u{abbf}\u{fb00}-\u{fb06}\u{fb13}-\u{fb17}\u{ff21}-\u{ff3a}\u{ff41}-\u{ff5a}\u{10400}-\u{1044f}\u{104b0}-\u{104d3}\u{104d8}-\u{104fb}\u{10c80}-\u{10cb2}\u{10cc0}-\u{10cf2}\u{118a0}-\u{118df}\u{1e900}-\u{1e943}]+",
                "\\s?[!-/:-~\u{ff01}-\u{ff0f}\u{ff1a}-\u{ff5e}\u{2018}-\u{201f}\u{3000}-\u{3002}]+",
                "\\s+$",
                "[\u{4e00}-\u{9fa5}\u{800}-\u{4e00}\u{ac00}-\u{d7ff}]+",
                "\\p{N}+",
            ],
            false,
            false,
        ),
        "deepseek-coder" => spec(
            &[
                "[\r\n]",
                "\\s?\\p{L}+",
                "\\s?\\p{P}+",
                "[\u{4e00}-\u{9fa5}\u{800}-\u{4e00}\u{ac00}-\u{d7ff}]+",
                "\\p{N}",
            ],
            false,
            false,
        ),
        "deepseek-v3" => spec(
            &[
                "\\p{N}{1,3}",
                "[\u{4e00}-\u{9fa5}\u{3040}-\u{309f}\u{30a0}-\u{30ff}]+",
                "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
            ],
            false,
            false,
        ),
        _ => return None,
    })
}

/// A tokenizer: text to token ids and back.
///
/// Special tokens written in the text (e.g. `<|im_start|>`) always encode to their single id,
/// like llama.cpp's `tokenize(..., special=true)`.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    eos: Option<u32>,
    eos_ids: Vec<u32>,
    pad: Option<u32>,
    add_bos: bool,
    add_eos: bool,
}

impl Tokenizer {
    /// Builds the tokenizer described by GGUF metadata (`tokenizer.ggml.*`).
    ///
    /// Supports `tokenizer.ggml.model = "gpt2"` (byte-level BPE, with the pre-tokenizer chosen by
    /// `tokenizer.ggml.pre`, see [`SUPPORTED_PRE`]) and, best effort, `"llama"` (SentencePiece
    /// BPE with byte fallback; merges derived from the token scores as HF does).
    pub fn from_gguf(meta: &GgufMetadata) -> Result<Self> {
        let model = meta
            .get_str("tokenizer.ggml.model")
            .ok_or_else(|| Error::MissingKey("tokenizer.ggml.model".into()))?;
        let tokens = string_array(meta, "tokenizer.ggml.tokens")?;
        let types: Vec<i128> = match meta.get("tokenizer.ggml.token_type") {
            None => vec![1; tokens.len()],
            Some(v) => {
                let arr =
                    v.as_array().ok_or_else(|| bad("tokenizer.ggml.token_type", "not an array"))?;
                let types = arr
                    .iter()
                    .map(|t| t.as_int())
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| bad("tokenizer.ggml.token_type", "not an integer array"))?;
                if types.len() != tokens.len() {
                    return Err(bad(
                        "tokenizer.ggml.token_type",
                        format!("has {} entries for {} tokens", types.len(), tokens.len()),
                    ));
                }
                types
            }
        };
        let n = tokens.len();
        let id_key = |key: &str| -> Result<Option<u32>> {
            match meta.get(key) {
                None => Ok(None),
                Some(v) => match v.as_u32() {
                    Some(id) if (id as usize) < n => Ok(Some(id)),
                    // Some converters write -1 / u32::MAX for "none".
                    _ if v.as_int().is_some_and(|i| i < 0 || i == i128::from(u32::MAX)) => Ok(None),
                    _ => Err(bad(key, format!("{v} is not a token id (vocabulary has {n})"))),
                },
            }
        };
        let bos = id_key("tokenizer.ggml.bos_token_id")?;
        let eos = id_key("tokenizer.ggml.eos_token_id")?;
        let eot = id_key("tokenizer.ggml.eot_token_id")?;
        let eom = id_key("tokenizer.ggml.eom_token_id")?;
        let pad = id_key("tokenizer.ggml.padding_token_id")?;
        let unk = id_key("tokenizer.ggml.unknown_token_id")?;

        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .rev() // on duplicate strings the first id wins, as in llama.cpp
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();

        let (mut inner, add_bos_default) = match model {
            "gpt2" => {
                let pre = meta.get_str("tokenizer.ggml.pre").unwrap_or("default");
                let spec = pre_spec(pre).ok_or_else(|| Error::UnsupportedPre(pre.to_owned()))?;
                let merges = string_array(meta, "tokenizer.ggml.merges")?
                    .iter()
                    .map(|m| {
                        // llama.cpp splits at the first space after the first byte.
                        let first = m.chars().next().map_or(0, char::len_utf8);
                        let pos = m[first..].find(' ').map(|p| p + first);
                        match pos {
                            Some(p) => Ok((m[..p].to_owned(), m[p + 1..].to_owned())),
                            None => Err(bad(
                                "tokenizer.ggml.merges",
                                format!("merge {m:?} has no space"),
                            )),
                        }
                    })
                    .collect::<Result<Vec<_>>>()?;
                let bpe = BPE::builder()
                    .vocab_and_merges(vocab, merges)
                    .ignore_merges(spec.ignore_merges)
                    .build()?;
                let mut tk = tokenizers::Tokenizer::new(bpe);
                let mut pres: Vec<PreTokenizerWrapper> = Vec::new();
                for re in spec.regexes {
                    let split = Split::new(
                        SplitPattern::Regex((*re).to_owned()),
                        SplitDelimiterBehavior::Isolated,
                        false,
                    )?;
                    pres.push(split.into());
                }
                pres.push(ByteLevel::new(false, false, false).into());
                tk.with_pre_tokenizer(Some(PreSequence::new(pres)));
                tk.with_decoder(Some(ByteLevelDecoder::new(false, false, false)));
                (tk, spec.add_bos)
            }
            "llama" => (spm_bpe(meta, &tokens, &types, vocab, unk)?, true),
            other => return Err(Error::UnsupportedModel(other.to_owned())),
        };

        // Control and user-defined tokens are matched as whole tokens in the input text.
        let added: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|&(_, &t)| t == token_type::CONTROL || t == token_type::USER_DEFINED)
            .filter(|(s, _)| !s.is_empty())
            .map(|(s, &t)| {
                AddedToken::from(s.to_string(), t == token_type::CONTROL).normalized(false)
            })
            .collect();
        let (special, normal): (Vec<_>, Vec<_>) = added.into_iter().partition(|t| t.special);
        inner.add_special_tokens(special)?;
        inner.add_tokens(normal)?;

        let mut eos_ids: Vec<u32> = [eos, eot, eom].into_iter().flatten().collect();
        for (i, (s, &t)) in tokens.iter().zip(&types).enumerate() {
            if t == token_type::CONTROL && END_OF_TURN_TOKENS.contains(s) {
                eos_ids.push(i as u32);
            }
        }
        dedup_keep_order(&mut eos_ids);

        Ok(Tokenizer {
            inner,
            bos,
            eos,
            eos_ids,
            pad,
            add_bos: meta.get_bool("tokenizer.ggml.add_bos_token").unwrap_or(add_bos_default)
                && bos.is_some(),
            add_eos: meta.get_bool("tokenizer.ggml.add_eos_token").unwrap_or(false)
                && eos.is_some(),
        })
    }

    /// Loads a HF `tokenizer.json` from bytes.
    ///
    /// BOS/EOS are guessed from the added tokens (`<s>`/`<|begin_of_text|>`/`<bos>`, and
    /// `</s>`/`<eos>` plus [`END_OF_TURN_TOKENS`]); refine them with
    /// [`Tokenizer::with_tokenizer_config`].
    pub fn from_tokenizer_json(json: &[u8]) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_bytes(json)?;
        let find = |names: &[&str]| names.iter().find_map(|n| inner.token_to_id(n));
        let bos = find(&["<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>"]);
        let eos = find(&["</s>", "<eos>", "<|end_of_text|>"]);
        let mut eos_ids: Vec<u32> = eos.into_iter().collect();
        eos_ids.extend(END_OF_TURN_TOKENS.iter().filter_map(|n| inner.token_to_id(n)));
        dedup_keep_order(&mut eos_ids);
        Ok(Tokenizer {
            inner,
            bos,
            eos: eos.or(eos_ids.first().copied()),
            eos_ids,
            pad: None,
            add_bos: false,
            add_eos: false,
        })
    }

    /// Loads a HF `tokenizer.json` file.
    pub fn from_tokenizer_json_file(path: impl AsRef<Path>) -> Result<Self> {
        Self::from_tokenizer_json(&std::fs::read(path)?)
    }

    /// Takes `bos_token`, `eos_token`, `pad_token` and `add_bos_token`/`add_eos_token` from a HF
    /// `tokenizer_config.json` (token entries may be strings or `{"content": ...}` objects).
    pub fn with_tokenizer_config(mut self, config_json: &[u8]) -> Result<Self> {
        let cfg: serde_json::Value = serde_json::from_slice(config_json)?;
        let id_of = |key: &str| token_field(&cfg, key).and_then(|s| self.inner.token_to_id(&s));
        if let Some(id) = id_of("bos_token") {
            self.bos = Some(id);
        }
        if let Some(id) = id_of("eos_token") {
            self.eos = Some(id);
            self.eos_ids.insert(0, id);
            dedup_keep_order(&mut self.eos_ids);
        }
        if let Some(id) = id_of("pad_token") {
            self.pad = Some(id);
        }
        if let Some(b) = cfg.get("add_bos_token").and_then(|v| v.as_bool()) {
            self.add_bos = b && self.bos.is_some();
        }
        if let Some(b) = cfg.get("add_eos_token").and_then(|v| v.as_bool()) {
            self.add_eos = b && self.eos.is_some();
        }
        Ok(self)
    }

    /// Encodes text to token ids. With `add_special`, adds what the model expects around a
    /// sequence (e.g. BOS when `tokenizer.ggml.add_bos_token` is true; nothing for SmolLM2).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode_fast(text, add_special)?;
        let mut ids = enc.get_ids().to_vec();
        if add_special {
            if let Some(bos) = self.bos.filter(|_| self.add_bos)
                && ids.first() != Some(&bos)
            {
                ids.insert(0, bos);
            }
            if let Some(eos) = self.eos.filter(|_| self.add_eos)
                && ids.last() != Some(&eos)
            {
                ids.push(eos);
            }
        }
        Ok(ids)
    }

    /// Decodes token ids to text; with `skip_special`, control tokens are left out.
    ///
    /// Invalid UTF-8 (e.g. a cut multi-byte character) becomes U+FFFD.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        Ok(self.inner.decode(ids, skip_special)?)
    }

    /// A new streaming decoder (see [`StreamDecoder`]).
    pub fn stream_decoder(&self, skip_special: bool) -> StreamDecoder {
        StreamDecoder::new(skip_special)
    }

    /// The beginning-of-sequence token, if any.
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    /// Whether [`Tokenizer::encode`] with `add_special` puts the BOS first.
    pub fn adds_bos(&self) -> bool {
        self.add_bos
    }

    /// The end-of-sequence token (`tokenizer.ggml.eos_token_id`), if any.
    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// Every token that ends generation: the EOS, `tokenizer.ggml.eot_token_id` /
    /// `eom_token_id`, and control tokens named in [`END_OF_TURN_TOKENS`]. EOS first, no repeats.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// Whether `id` ends generation (is in [`Tokenizer::eos_ids`]).
    pub fn is_eos(&self, id: u32) -> bool {
        self.eos_ids.contains(&id)
    }

    /// The padding token, if any.
    pub fn pad(&self) -> Option<u32> {
        self.pad
    }

    /// The id of a token given its vocabulary string (e.g. `"<|im_end|>"`, or `"Ġyes"` in
    /// byte-level vocabularies), if present.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The vocabulary string of a token id, if in range.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of `text` if it encodes to exactly one token.
    pub fn single_token(&self, text: &str) -> Option<u32> {
        match self.encode(text, false).ok()?.as_slice() {
            [id] => Some(*id),
            _ => None,
        }
    }

    /// Number of token ids (including added tokens).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The wrapped `tokenizers::Tokenizer`.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// Incremental detokenizer: feed token ids one at a time and get the text they add, never
/// splitting a multi-byte UTF-8 character (its bytes are held back until it completes).
///
/// Keeps only a short window of ids and holds no borrow of the [`Tokenizer`]. Decoding a window
/// that starts one token back keeps SentencePiece's leading spaces right.
#[derive(Debug, Clone, Default)]
pub struct StreamDecoder {
    skip_special: bool,
    /// The window of ids not yet dropped.
    ids: Vec<u32>,
    /// `ids[..prefix]` is context only; `ids[prefix..read]` was emitted last.
    prefix: usize,
    /// `ids[..read]` has been emitted.
    read: usize,
}

impl StreamDecoder {
    /// A new decoder; `skip_special` leaves control tokens out of the text.
    pub fn new(skip_special: bool) -> Self {
        StreamDecoder { skip_special, ..Default::default() }
    }

    /// Appends `id` and returns the text it completes ("" while a character is incomplete).
    pub fn step(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let prefix_text = tokenizer.decode(&self.ids[self.prefix..self.read], self.skip_special)?;
        let new_text = tokenizer.decode(&self.ids[self.prefix..], self.skip_special)?;
        if new_text.len() <= prefix_text.len() || new_text.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let out = new_text[common_prefix_len(&new_text, &prefix_text)..].to_owned();
        // Slide the window: the last emitted span becomes the context.
        let keep = self.read;
        self.ids.drain(..self.prefix);
        self.prefix = keep - self.prefix;
        self.read = self.ids.len();
        Ok(out)
    }

    /// Returns any text still held back (an incomplete character decodes as U+FFFD) and resets.
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> Result<String> {
        let prefix_text = tokenizer.decode(&self.ids[self.prefix..self.read], self.skip_special)?;
        let new_text = tokenizer.decode(&self.ids[self.prefix..], self.skip_special)?;
        let out = new_text[common_prefix_len(&new_text, &prefix_text)..].to_owned();
        self.ids.clear();
        self.prefix = 0;
        self.read = 0;
        Ok(out)
    }
}

fn common_prefix_len(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .find(|((_, ca), cb)| ca != cb)
        .map_or_else(|| a.len().min(b.len()), |((i, _), _)| i)
}

/// SentencePiece (`tokenizer.ggml.model = "llama"`) as a byte-fallback BPE, the way HF converts
/// these vocabularies: merges are every split of a normal token into two vocabulary tokens,
/// ranked by the merged token's score.
fn spm_bpe(
    meta: &GgufMetadata,
    tokens: &[&str],
    types: &[i128],
    vocab: Vocab,
    unk: Option<u32>,
) -> Result<tokenizers::Tokenizer> {
    let scores: Vec<f64> = match meta.get_array("tokenizer.ggml.scores") {
        Some(arr) => arr
            .iter()
            .map(|v| v.as_f64())
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad("tokenizer.ggml.scores", "not a float array"))?,
        None => (0..tokens.len()).map(|i| -(i as f64)).collect(),
    };
    if scores.len() != tokens.len() {
        return Err(bad("tokenizer.ggml.scores", "length differs from tokenizer.ggml.tokens"));
    }
    let mut ranked: Vec<(usize, u32, u32)> = Vec::new(); // (merged id, left id, right id)
    for (id, tok) in tokens.iter().enumerate() {
        if types[id] != 1 {
            continue;
        }
        for (k, _) in tok.char_indices().skip(1) {
            if let (Some(&l), Some(&r)) = (vocab.get(&tok[..k]), vocab.get(&tok[k..])) {
                ranked.push((id, l, r));
            }
        }
    }
    ranked.sort_by(|a, b| {
        scores[b.0].total_cmp(&scores[a.0]).then(a.0.cmp(&b.0)).then(a.1.cmp(&b.1))
    });
    let merges = ranked
        .into_iter()
        .map(|(_, l, r)| (tokens[l as usize].to_owned(), tokens[r as usize].to_owned()))
        .collect();
    let has_bytes = types.contains(&token_type::BYTE);
    let unk_tok = unk
        .or_else(|| types.iter().position(|&t| t == token_type::UNKNOWN).map(|i| i as u32))
        .map(|i| tokens[i as usize].to_owned());
    let mut builder =
        BPE::builder().vocab_and_merges(vocab, merges).byte_fallback(has_bytes).fuse_unk(true);
    if let Some(u) = unk_tok {
        builder = builder.unk_token(u);
    }
    let mut tk = tokenizers::Tokenizer::new(builder.build()?);
    let add_space_prefix = meta.get_bool("tokenizer.ggml.add_space_prefix").unwrap_or(true);
    let mut norms: Vec<NormalizerWrapper> = Vec::new();
    if add_space_prefix {
        norms.push(Prepend::new("▁".into()).into());
    }
    norms.push(Replace::new(" ", "▁")?.into());
    tk.with_normalizer(Some(tokenizers::normalizers::Sequence::new(norms)))?;
    let mut decs: Vec<DecoderWrapper> =
        vec![Replace::new("▁", " ")?.into(), ByteFallback::new().into(), Fuse::new().into()];
    if add_space_prefix {
        decs.push(StripDecoder::new(' ', 1, 0).into());
    }
    tk.with_decoder(Some(DecoderSequence::new(decs)));
    Ok(tk)
}

fn string_array<'a>(meta: &'a GgufMetadata, key: &str) -> Result<Vec<&'a str>> {
    meta.get_array(key)
        .ok_or_else(|| match meta.get(key) {
            None => Error::MissingKey(key.to_owned()),
            Some(_) => bad(key, "not an array"),
        })?
        .iter()
        .map(|v| v.as_str().ok_or_else(|| bad(key, "not a string array")))
        .collect()
}

fn bad(key: &str, problem: impl Into<String>) -> Error {
    Error::BadKey { key: key.to_owned(), problem: problem.into() }
}

fn token_field(cfg: &serde_json::Value, key: &str) -> Option<String> {
    match cfg.get(key)? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

fn dedup_keep_order(ids: &mut Vec<u32>) {
    let mut seen = HashSet::new();
    ids.retain(|id| seen.insert(*id));
}
