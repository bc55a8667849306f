//! Loading GGUF files and Hugging Face safetensors checkpoints into a [`Model`].

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device as CDevice, Tensor};

use specrej_gguf::{GgufError, GgufFile};

use crate::config::{Architecture, ModelConfig, hf_key};
use crate::error::LoadError;
use crate::model::{Embedding, Layer, Linear, Model};
use crate::options::{LoadOptions, WeightFormat};

/// Loads a GGUF file (`path`) or a safetensors checkpoint directory (`path` is a
/// directory holding `config.json`).
pub fn load(path: impl AsRef<Path>, options: &LoadOptions) -> Result<Arc<Model>, LoadError> {
    let path = path.as_ref();
    if path.is_dir() { load_safetensors(path, options) } else { load_gguf(path, options) }
}

/// A weight as read from the file, before [`WeightFormat`] conversion.
enum Raw {
    /// GGUF tensor in its stored type (may itself be F32/F16).
    Quantized(QTensor),
    /// Safetensors tensor, already f32, on the CPU.
    Dense(Tensor),
}

impl Raw {
    fn dims(&self) -> Vec<usize> {
        match self {
            Raw::Quantized(q) => q.shape().dims().to_vec(),
            Raw::Dense(t) => t.dims().to_vec(),
        }
    }

    fn to_f32(&self) -> candle_core::Result<Tensor> {
        match self {
            Raw::Quantized(q) => q.dequantize(&CDevice::Cpu),
            Raw::Dense(t) => Ok(t.clone()),
        }
    }
}

/// Where tensors come from: a GGUF file or safetensors maps.
trait TensorSource {
    fn path(&self) -> &Path;
    fn has(&self, name: &str) -> bool;
    /// The tensor's shape, without reading its data.
    fn shape(&self, name: &str) -> Option<Vec<usize>>;
    fn read(&mut self, name: &str) -> Result<Raw, LoadError>;
}

struct Builder<'a, S: TensorSource> {
    source: S,
    format: WeightFormat,
    device: &'a CDevice,
}

impl<S: TensorSource> Builder<'_, S> {
    fn candle_err(&self, source: candle_core::Error) -> LoadError {
        LoadError::candle(self.source.path(), &source)
    }

    /// Reads `name`, checking it is present and has shape `expected`.
    fn read(&mut self, name: &str, expected: &[usize]) -> Result<Raw, LoadError> {
        let path = self.source.path().to_path_buf();
        let found = self
            .source
            .shape(name)
            .ok_or_else(|| LoadError::MissingTensor { path: path.clone(), name: name.into() })?;
        // A 1-d tensor may be stored as [n] or [1, n]; require an exact match otherwise.
        let squeeze = |d: &[usize]| d.iter().copied().filter(|&x| x != 1).collect::<Vec<_>>();
        if found != expected && !(expected.len() == 1 && squeeze(&found) == squeeze(expected)) {
            return Err(LoadError::ShapeMismatch {
                path,
                name: name.into(),
                expected: expected.to_vec(),
                found,
            });
        }
        let raw = self.source.read(name)?;
        // Defence in depth: the data must agree with the header.
        let dims = raw.dims();
        if dims.iter().product::<usize>() != expected.iter().product::<usize>() {
            return Err(LoadError::ShapeMismatch {
                path,
                name: name.into(),
                expected: expected.to_vec(),
                found: dims,
            });
        }
        Ok(raw)
    }

    /// A vector (norm weight, bias) as f32 `[n]` on the device.
    fn vector(&mut self, name: &str, n: usize) -> Result<Tensor, LoadError> {
        let raw = self.read(name, &[n])?;
        let t = raw
            .to_f32()
            .and_then(|t| t.reshape(n))
            .and_then(|t| t.to_device(self.device))
            .map_err(|e| self.candle_err(e))?;
        Ok(t)
    }

    fn optional_vector(&mut self, name: &str, n: usize) -> Result<Option<Tensor>, LoadError> {
        if self.source.has(name) { self.vector(name, n).map(Some) } else { Ok(None) }
    }

    /// A projection weight `[out, in]` in the requested format.
    fn matrix(&mut self, name: &str, out: usize, inp: usize) -> Result<Linear, LoadError> {
        let raw = self.read(name, &[out, inp])?;
        self.to_linear(raw, inp).map_err(|e| self.candle_err(e))
    }

    /// Input width of a Q8_0 weight: padded to a multiple of 256 where that enables
    /// candle's tiled VNNI kernel.
    fn q8_0_width(&self, inp: usize) -> usize {
        if self.device.is_cpu() && cpu_has_vnni() { inp.next_multiple_of(256) } else { inp }
    }

    /// Converts a weight to the requested format. Q8_0 weights on CPUs with VNNI get zero
    /// columns up to a multiple of 256 when needed: candle's tiled VNNI kernel is 3-6x
    /// faster than its generic Q8_0 kernel, far more than the padding costs.
    fn to_linear(&self, raw: Raw, inp: usize) -> candle_core::Result<Linear> {
        let q8_ok = inp.is_multiple_of(GgmlDType::Q8_0.block_size());
        let dense = |weight: QMatMul| Linear { weight, bias: None, padded_in: inp };
        match (self.format, raw) {
            (WeightFormat::Native, Raw::Quantized(q)) => {
                Ok(dense(QMatMul::from_qtensor(q_to_device(q, self.device)?)?))
            }
            (WeightFormat::Q8_0, raw) if q8_ok => {
                let padded_in = self.q8_0_width(inp);
                match raw {
                    Raw::Quantized(q) if q.dtype() == GgmlDType::Q8_0 && padded_in == inp => {
                        Ok(dense(QMatMul::from_qtensor(q_to_device(q, self.device)?)?))
                    }
                    raw => {
                        let w = raw.to_f32()?.pad_with_zeros(1, 0, padded_in - inp)?; // [out, padded_in]
                        let q = QTensor::quantize_onto(&w, GgmlDType::Q8_0, self.device)?;
                        Ok(Linear { weight: QMatMul::from_qtensor(q)?, bias: None, padded_in })
                    }
                }
            }
            (_, raw) => Ok(dense(QMatMul::Tensor(raw.to_f32()?.to_device(self.device)?))),
        }
    }

    fn linear(
        &mut self,
        prefix: &str,
        weight: &str,
        bias: Option<&str>,
        out: usize,
        inp: usize,
    ) -> Result<Linear, LoadError> {
        let mut linear = self.matrix(&format!("{prefix}{weight}"), out, inp)?;
        linear.bias = match bias {
            Some(b) => self.optional_vector(&format!("{prefix}{b}"), out)?,
            None => None,
        };
        Ok(linear)
    }
}

/// Tensor names of one checkpoint layout.
struct Names {
    embedding: &'static str,
    output: &'static str,
    norm: &'static str,
    layer_prefix: fn(usize) -> String,
    attn_norm: &'static str,
    q: &'static str,
    k: &'static str,
    v: &'static str,
    o: &'static str,
    q_bias: &'static str,
    k_bias: &'static str,
    v_bias: &'static str,
    o_bias: &'static str,
    ffn_norm: &'static str,
    gate: &'static str,
    up: &'static str,
    down: &'static str,
}

const GGUF_NAMES: Names = Names {
    embedding: "token_embd.weight",
    output: "output.weight",
    norm: "output_norm.weight",
    layer_prefix: |i| format!("blk.{i}."),
    attn_norm: "attn_norm.weight",
    q: "attn_q.weight",
    k: "attn_k.weight",
    v: "attn_v.weight",
    o: "attn_output.weight",
    q_bias: "attn_q.bias",
    k_bias: "attn_k.bias",
    v_bias: "attn_v.bias",
    o_bias: "attn_output.bias",
    ffn_norm: "ffn_norm.weight",
    gate: "ffn_gate.weight",
    up: "ffn_up.weight",
    down: "ffn_down.weight",
};

const HF_NAMES: Names = Names {
    embedding: "model.embed_tokens.weight",
    output: "lm_head.weight",
    norm: "model.norm.weight",
    layer_prefix: |i| format!("model.layers.{i}."),
    attn_norm: "input_layernorm.weight",
    q: "self_attn.q_proj.weight",
    k: "self_attn.k_proj.weight",
    v: "self_attn.v_proj.weight",
    o: "self_attn.o_proj.weight",
    q_bias: "self_attn.q_proj.bias",
    k_bias: "self_attn.k_proj.bias",
    v_bias: "self_attn.v_proj.bias",
    o_bias: "self_attn.o_proj.bias",
    ffn_norm: "post_attention_layernorm.weight",
    gate: "mlp.gate_proj.weight",
    up: "mlp.up_proj.weight",
    down: "mlp.down_proj.weight",
};

/// What a loader knows besides the tensors.
struct Header {
    /// Validated, with the vocabulary size and tied embeddings known.
    config: ModelConfig,
    inv_freq: Vec<f32>,
    vocab: Option<Vec<String>>,
    /// Build the language-model head (false: a trunk, e.g. of a reward model).
    with_head: bool,
}

/// Builds the model from a source once the header is known.
fn build<S: TensorSource>(
    source: S,
    names: &Names,
    header: Header,
    options: &LoadOptions,
    device: CDevice,
) -> Result<Arc<Model>, LoadError> {
    let Header { config, inv_freq, vocab, with_head } = header;
    let rope_interleaved = config.rope_interleaved;
    let mut b = Builder { source, format: options.weights, device: &device };
    let c = config.clone();
    let (h, hd) = (c.hidden_size, c.head_dim);
    let qkv_bias_required = c.architecture == Architecture::Qwen2;

    let embedding_raw = b.read(names.embedding, &[c.vocab_size, h])?;
    // Lookup table `[vocab, hidden]`: quantized when the file's is (Native) or Q8_0 is
    // requested; rows are dequantized on lookup.
    let table_dtype = match (&embedding_raw, options.weights) {
        (Raw::Quantized(q), WeightFormat::Native) if !is_float(q.dtype()) => Some(q.dtype()),
        (_, WeightFormat::Q8_0) if h.is_multiple_of(GgmlDType::Q8_0.block_size()) => {
            Some(GgmlDType::Q8_0)
        }
        _ => None,
    }
    .filter(|&dtype| has_quantized_lookup(dtype, &device));
    let cerr = |b: &Builder<'_, S>, e| b.candle_err(e);
    let embedding = match table_dtype {
        Some(dtype) => {
            let q = match embedding_raw {
                Raw::Quantized(q) if q.dtype() == dtype => {
                    q_to_device(q, &device).map_err(|e| cerr(&b, e))?
                }
                raw => raw
                    .to_f32()
                    .and_then(|t| QTensor::quantize_onto(&t, dtype, &device))
                    .map_err(|e| cerr(&b, e))?,
            };
            Embedding::Quantized(Arc::new(q))
        }
        None => Embedding::F32(
            embedding_raw.to_f32().and_then(|t| t.to_device(&device)).map_err(|e| cerr(&b, e))?,
        ),
    };
    let head = if !with_head {
        None
    } else if !config.tied_embeddings {
        Some(b.matrix(names.output, c.vocab_size, h)?)
    } else {
        // Tied: share the lookup table when the head would hold the very same weights.
        let shared = match &embedding {
            Embedding::Quantized(q) => {
                let padded = options.weights == WeightFormat::Q8_0 && b.q8_0_width(h) != h;
                (!padded).then(|| q.clone())
            }
            Embedding::F32(_) => None,
        };
        Some(match shared {
            Some(q) => Linear {
                weight: QMatMul::from_arc(q).map_err(|e| cerr(&b, e))?,
                bias: None,
                padded_in: h,
            },
            None => {
                let dense = match &embedding {
                    Embedding::Quantized(q) => q.dequantize(&CDevice::Cpu),
                    Embedding::F32(t) => t.to_device(&CDevice::Cpu),
                }
                .map_err(|e| cerr(&b, e))?;
                b.to_linear(Raw::Dense(dense), h).map_err(|e| cerr(&b, e))?
            }
        })
    };

    let norm = b.vector(names.norm, h)?;
    let mut layers = Vec::with_capacity(c.layers);
    for i in 0..c.layers {
        let p = (names.layer_prefix)(i);
        let require_bias = |b: &Builder<'_, S>, name: &str| -> Result<(), LoadError> {
            let full = format!("{p}{name}");
            if qkv_bias_required && !b.source.has(&full) {
                return Err(LoadError::MissingTensor {
                    path: b.source.path().to_path_buf(),
                    name: full,
                });
            }
            Ok(())
        };
        require_bias(&b, names.q_bias)?;
        require_bias(&b, names.k_bias)?;
        require_bias(&b, names.v_bias)?;
        layers.push(Layer {
            attn_norm: b.vector(&format!("{p}{}", names.attn_norm), h)?,
            q: b.linear(&p, names.q, Some(names.q_bias), c.heads * hd, h)?,
            k: b.linear(&p, names.k, Some(names.k_bias), c.kv_heads * hd, h)?,
            v: b.linear(&p, names.v, Some(names.v_bias), c.kv_heads * hd, h)?,
            o: b.linear(&p, names.o, Some(names.o_bias), h, c.heads * hd)?,
            ffn_norm: b.vector(&format!("{p}{}", names.ffn_norm), h)?,
            gate: b.linear(&p, names.gate, None, c.ffn_size, h)?,
            up: b.linear(&p, names.up, None, c.ffn_size, h)?,
            down: b.linear(&p, names.down, None, h, c.ffn_size)?,
        });
    }
    Ok(Arc::new(Model {
        config,
        format: options.weights,
        kv_format: options.kv,
        device,
        embedding,
        layers,
        norm,
        head,
        rope_interleaved,
        inv_freq,
        vocab,
    }))
}

/// `q` on `device` with its bytes unchanged. Quantized data must not take a round trip
/// through f32: re-quantizing dequantized Q4_1 (say) can pick other block scales.
fn q_to_device(q: QTensor, device: &CDevice) -> candle_core::Result<QTensor> {
    if device.is_cpu() {
        return Ok(q);
    }
    let data = q.data()?; // the blocks as stored, on the host
    candle_core::quantized::ggml_file::qtensor_from_ggml(
        q.dtype(),
        &data,
        q.shape().dims().to_vec(),
        device,
    )
}

/// Whether candle can look rows of a `dtype` table up on `device` (its CUDA row gather
/// knows the 4/5/8-bit and K-quant block types only); otherwise the table is held as f32.
fn has_quantized_lookup(dtype: GgmlDType, device: &CDevice) -> bool {
    device.is_cpu()
        || matches!(
            dtype,
            GgmlDType::Q4_0
                | GgmlDType::Q4_1
                | GgmlDType::Q5_0
                | GgmlDType::Q5_1
                | GgmlDType::Q8_0
                | GgmlDType::Q2K
                | GgmlDType::Q3K
                | GgmlDType::Q4K
                | GgmlDType::Q5K
                | GgmlDType::Q6K
        )
}

fn is_float(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
}

/// Whether candle's tiled Q8_0 kernels (AVX-VNNI / AVX512-VNNI) will run on this CPU.
fn cpu_has_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        (std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vnni"))
            || (std::arch::is_x86_feature_detected!("avxvnni")
                && std::arch::is_x86_feature_detected!("avx2"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `[head_dim/2]` RoPE inverse frequencies `θ^(-2i/d)`.
fn inv_freq(head_dim: usize, theta: f32) -> Vec<f32> {
    (0..head_dim / 2).map(|i| 1.0 / theta.powf(2.0 * i as f32 / head_dim as f32)).collect()
}

// ---------------------------------------------------------------------------------------
// GGUF

struct GgufSource<R> {
    path: PathBuf,
    content: gguf_file::Content,
    reader: R,
}

impl<R: Read + Seek> TensorSource for GgufSource<R> {
    fn path(&self) -> &Path {
        &self.path
    }
    fn has(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.content.tensor_infos.get(name).map(|i| i.shape.dims().to_vec())
    }
    fn read(&mut self, name: &str) -> Result<Raw, LoadError> {
        let path = &self.path;
        let content = &self.content;
        let reader = &mut self.reader;
        // candle checks sizes against the file length; catch_unwind is a last line of
        // defence so a crafted header can never take the process down.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            content.tensor(reader, name, &CDevice::Cpu)
        }));
        match result {
            Ok(Ok(q)) => Ok(Raw::Quantized(q)),
            Ok(Err(e)) => Err(LoadError::Corrupt {
                path: path.clone(),
                reason: format!("tensor {name:?}: {}", crate::error::message(&e)),
            }),
            Err(_) => Err(LoadError::Corrupt {
                path: path.clone(),
                reason: format!("tensor {name:?} could not be decoded"),
            }),
        }
    }
}

fn open(path: &Path) -> Result<File, LoadError> {
    File::open(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => LoadError::Missing { path: path.to_path_buf() },
        _ => LoadError::Io { path: path.to_path_buf(), source },
    })
}

/// specrej-gguf's verdict on a GGUF file as a [`LoadError`] naming it (the message after the
/// path is specrej-gguf's, as every backend reports it).
fn gguf_error(path: &Path, e: GgufError) -> LoadError {
    let path = path.to_path_buf();
    match e {
        GgufError::NotGguf { found } => LoadError::NotGguf { path, found: found.to_vec() },
        GgufError::Io(source) => LoadError::Io { path, source },
        GgufError::UnsupportedArchitecture(architecture) => {
            LoadError::UnsupportedArchitecture { path, architecture }
        }
        GgufError::Config { key, reason } => LoadError::Config { path, key, reason },
        GgufError::MissingTensor(name) => LoadError::MissingTensor { path, name },
        GgufError::ShapeMismatch { name, expected, found } => {
            LoadError::ShapeMismatch { path, name, expected, found }
        }
        other => LoadError::Corrupt { path, reason: other.to_string() },
    }
}

/// Loads a GGUF file (llama.cpp's format): architectures `llama`, `mistral`, `qwen2`;
/// tensor types F32/F16/BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the K-quants.
pub fn load_gguf(path: impl AsRef<Path>, options: &LoadOptions) -> Result<Arc<Model>, LoadError> {
    let path = path.as_ref().to_path_buf();
    let file = open(&path)?;
    load_gguf_reader(path, BufReader::new(file), options)
}

/// [`load_gguf`] from a whole GGUF file held in memory (the browser, where there is no file
/// system: `wasm32-unknown-unknown`). Errors name the file `<memory>`.
pub fn load_gguf_bytes(bytes: &[u8], options: &LoadOptions) -> Result<Arc<Model>, LoadError> {
    load_gguf_reader(PathBuf::from("<memory>"), std::io::Cursor::new(bytes), options)
}

/// [`load_gguf`] from any reader of a GGUF file; `path` only names it in errors.
fn load_gguf_reader<R: Read + Seek>(
    path: PathBuf,
    mut reader: R,
    options: &LoadOptions,
) -> Result<Arc<Model>, LoadError> {
    let device = options.device.to_candle()?;
    let mut magic = Vec::with_capacity(4);
    (&mut reader)
        .take(4)
        .read_to_end(&mut magic)
        .map_err(|source| LoadError::Io { path: path.clone(), source })?;
    if magic != b"GGUF" {
        return Err(LoadError::NotGguf { path, found: magic });
    }
    // The whole file through specrej-gguf first (header, tensor table, hyper-parameters):
    // its rules decide what is corrupt or unusable on every target, and with them nothing
    // candle's reader could panic on or over-allocate for gets past (a panic on wasm32 is an
    // abort). candle's reader then only loads tensors specrej-gguf has checked.
    let io = |source| LoadError::Io { path: path.clone(), source };
    let len = reader.seek(SeekFrom::End(0)).map_err(io)?;
    reader.seek(SeekFrom::Start(0)).map_err(io)?;
    let file = GgufFile::read_limited(&mut reader, Some(len)).map_err(|e| gguf_error(&path, e))?;
    let config = file.model_config().map_err(|e| gguf_error(&path, e))?;
    reader.seek(SeekFrom::Start(0)).map_err(io)?;
    let content = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        gguf_file::Content::read(&mut reader)
    }));
    let content = match content {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(LoadError::Corrupt { path, reason: crate::error::message(&e) }),
        Err(_) => {
            return Err(LoadError::Corrupt {
                path,
                reason: "the header could not be decoded".into(),
            });
        }
    };
    // Defence in depth: candle must find the tensors where specrej-gguf did.
    let agrees = content.tensor_data_offset == file.tensors.data_start()
        && content.tensor_infos.len() == file.tensors.len()
        && file.tensors.iter().all(|t| {
            content
                .tensor_infos
                .get(&t.name)
                .is_some_and(|c| c.offset == t.offset && c.shape.dims() == t.shape)
        });
    if !agrees {
        return Err(LoadError::Corrupt {
            path,
            reason: "candle's GGUF reader and specrej-gguf disagree about the tensor table".into(),
        });
    }
    let vocab = file.metadata.get_array("tokenizer.ggml.tokens").and_then(|items| {
        items.iter().map(|v| v.as_str().map(str::to_string)).collect::<Option<Vec<_>>>()
    });
    let mut source = GgufSource { path: path.clone(), content, reader };
    let mut freqs = inv_freq(config.head_dim, config.rope_theta);
    // Llama 3.1+ long-context scaling: llama.cpp stores the per-frequency divisors.
    if source.has("rope_freqs.weight") {
        let factors = match source.read("rope_freqs.weight")? {
            Raw::Quantized(q) => {
                q.dequantize(&CDevice::Cpu).and_then(|t| t.flatten_all()?.to_vec1::<f32>())
            }
            Raw::Dense(t) => t.flatten_all().and_then(|t| t.to_vec1::<f32>()),
        }
        .map_err(|e| LoadError::candle(&path, &e))?;
        if factors.len() != freqs.len() {
            return Err(LoadError::ShapeMismatch {
                path,
                name: "rope_freqs.weight".into(),
                expected: vec![freqs.len()],
                found: vec![factors.len()],
            });
        }
        for (f, d) in freqs.iter_mut().zip(factors) {
            *f /= d;
        }
    }
    build(
        source,
        &GGUF_NAMES,
        Header { config, inv_freq: freqs, vocab, with_head: true },
        options,
        device,
    )
}

// ---------------------------------------------------------------------------------------
// Safetensors

struct SafetensorsSource {
    dir: PathBuf,
    tensors: HashMap<String, Tensor>,
}

impl TensorSource for SafetensorsSource {
    fn path(&self) -> &Path {
        &self.dir
    }
    fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.tensors.get(name).map(|t| t.dims().to_vec())
    }
    fn read(&mut self, name: &str) -> Result<Raw, LoadError> {
        let t = self.tensors.remove(name).ok_or_else(|| LoadError::MissingTensor {
            path: self.dir.clone(),
            name: name.into(),
        })?;
        match t.dtype() {
            DType::F32 | DType::F16 | DType::BF16 | DType::F64 => t
                .to_dtype(DType::F32)
                .map(Raw::Dense)
                .map_err(|source| LoadError::candle(&self.dir, &source)),
            other => Err(LoadError::UnsupportedDtype {
                path: self.dir.clone(),
                name: name.into(),
                dtype: format!("{other:?}"),
            }),
        }
    }
}

#[derive(serde::Deserialize)]
struct HfConfig {
    architectures: Option<Vec<String>>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    max_position_embeddings: Option<usize>,
    bos_token_id: Option<serde_json::Value>,
    eos_token_id: Option<serde_json::Value>,
    rope_scaling: Option<serde_json::Value>,
}

fn token_ids(v: &Option<serde_json::Value>) -> Vec<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => {
            n.as_u64().and_then(|x| u32::try_from(x).ok()).into_iter().collect()
        }
        Some(serde_json::Value::Array(items)) => {
            items.iter().filter_map(|x| x.as_u64().and_then(|x| u32::try_from(x).ok())).collect()
        }
        _ => Vec::new(),
    }
}

/// Loads a Hugging Face checkpoint directory: `config.json` plus `model.safetensors` or
/// shards listed in `model.safetensors.index.json`. Architectures `LlamaForCausalLM`,
/// `MistralForCausalLM`, `Qwen2ForCausalLM`; tensors f32/f16/bf16.
pub fn load_safetensors(
    dir: impl AsRef<Path>,
    options: &LoadOptions,
) -> Result<Arc<Model>, LoadError> {
    load_hf(dir.as_ref(), options, false, &[]).map(|(model, _)| model)
}

/// Loads the trunk of a Hugging Face checkpoint directory, without its language-model head:
/// embedding, blocks and final norm (what a `*ForSequenceClassification` reward model
/// shares with the causal LM). Accepts `LlamaForSequenceClassification`,
/// `MistralForSequenceClassification`, `Qwen2ForSequenceClassification` and the
/// `*ForCausalLM` architectures (whose `lm_head` is then ignored).
///
/// Also returns, as f32 CPU tensors, those of the `extra` tensors (e.g. `"score.weight"`)
/// that the checkpoint holds; missing ones are simply absent from the map.
/// Use [`Model::hidden_states`] or [`crate::IncrementalRows`] to run it.
pub fn load_safetensors_trunk(
    dir: impl AsRef<Path>,
    options: &LoadOptions,
    extra: &[&str],
) -> Result<(Arc<Model>, HashMap<String, Tensor>), LoadError> {
    load_hf(dir.as_ref(), options, true, extra)
}

fn load_hf(
    dir: &Path,
    options: &LoadOptions,
    trunk: bool,
    extra: &[&str],
) -> Result<(Arc<Model>, HashMap<String, Tensor>), LoadError> {
    let dir = dir.to_path_buf();
    let device = options.device.to_candle()?;
    if !dir.exists() {
        return Err(LoadError::Missing { path: dir });
    }
    let config_path = dir.join("config.json");
    let mut text = String::new();
    open(&config_path)?
        .read_to_string(&mut text)
        .map_err(|source| LoadError::Io { path: config_path.clone(), source })?;
    let hf: HfConfig = serde_json::from_str(&text).map_err(|e| LoadError::Corrupt {
        path: config_path.clone(),
        reason: format!("invalid config.json: {e}"),
    })?;
    let config_err = |key: &str, reason: &str| LoadError::Config {
        path: config_path.clone(),
        key: key.into(),
        reason: reason.into(),
    };
    let arch_name = hf
        .architectures
        .as_ref()
        .and_then(|a| a.first().cloned())
        .ok_or_else(|| config_err("architectures", "missing"))?;
    let architecture = match arch_name.as_str() {
        "LlamaForCausalLM" => Architecture::Llama,
        "MistralForCausalLM" => Architecture::Mistral,
        "Qwen2ForCausalLM" => Architecture::Qwen2,
        "LlamaForSequenceClassification" if trunk => Architecture::Llama,
        "MistralForSequenceClassification" if trunk => Architecture::Mistral,
        "Qwen2ForSequenceClassification" if trunk => Architecture::Qwen2,
        _ => {
            return Err(LoadError::UnsupportedArchitecture {
                path: config_path,
                architecture: arch_name,
            });
        }
    };
    let need = |v: Option<usize>, key: &str| v.ok_or_else(|| config_err(key, "missing"));
    let hidden_size = need(hf.hidden_size, "hidden_size")?;
    let heads = need(hf.num_attention_heads, "num_attention_heads")?;
    let head_dim = match hf.head_dim {
        Some(d) => d,
        None if heads == 0 => 0, // validate() names the head count
        None => ModelConfig::derived_head_dim(hidden_size, heads).ok_or_else(|| {
            config_err(
                "head_dim",
                &format!("missing, and {heads} heads do not divide hidden_size {hidden_size}"),
            )
        })?,
    };
    let rope_theta = hf.rope_theta.unwrap_or(10_000.0) as f32;
    let config = ModelConfig {
        architecture,
        vocab_size: 1, // placeholder: set from the embedding's shape once the shards are read
        hidden_size,
        layers: need(hf.num_hidden_layers, "num_hidden_layers")?,
        heads,
        kv_heads: hf.num_key_value_heads.unwrap_or(heads),
        head_dim,
        ffn_size: need(hf.intermediate_size, "intermediate_size")?,
        rope_theta,
        rms_norm_eps: hf.rms_norm_eps.unwrap_or(1e-6) as f32,
        context_length: hf.max_position_embeddings.unwrap_or(4096),
        bos_token_id: token_ids(&hf.bos_token_id).first().copied(),
        eos_token_ids: token_ids(&hf.eos_token_id),
        rope_interleaved: false, // Hugging Face checkpoints rotate halves
        tied_embeddings: false,
    };
    // The shared rules now (before reading the shards), and once the vocabulary is known.
    let invalid = |e: specrej_gguf::ConfigError| config_err(hf_key(e.field), &e.reason);
    config.validate().map_err(invalid)?;
    let mut freqs = inv_freq(head_dim, rope_theta);
    if let Some(scaling) = hf.rope_scaling.as_ref().filter(|v| !v.is_null()) {
        apply_rope_scaling(&mut freqs, scaling)
            .map_err(|reason| config_err("rope_scaling", &reason))?;
    }

    // Shards: the index's weight map, or the single file.
    let index_path = dir.join("model.safetensors.index.json");
    let shards: Vec<PathBuf> = if index_path.exists() {
        let mut text = String::new();
        open(&index_path)?
            .read_to_string(&mut text)
            .map_err(|source| LoadError::Io { path: index_path.clone(), source })?;
        let index: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| LoadError::Corrupt { path: index_path.clone(), reason: e.to_string() })?;
        let map = index.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| {
            LoadError::Corrupt {
                path: index_path.clone(),
                reason: "no \"weight_map\" object".into(),
            }
        })?;
        let mut files: Vec<PathBuf> = Vec::new();
        for v in map.values() {
            let name = v.as_str().ok_or_else(|| LoadError::Corrupt {
                path: index_path.clone(),
                reason: "a weight_map entry is not a string".into(),
            })?;
            // Shard names are plain file names inside the checkpoint directory.
            if name.contains('/') || name.contains('\\') || name == ".." {
                return Err(LoadError::Corrupt {
                    path: index_path.clone(),
                    reason: format!("shard name {name:?} is not a plain file name"),
                });
            }
            let p = dir.join(name);
            if !files.contains(&p) {
                files.push(p);
            }
        }
        files.sort();
        files
    } else {
        vec![dir.join("model.safetensors")]
    };
    let mut tensors = HashMap::new();
    for shard in &shards {
        if !shard.exists() {
            return Err(LoadError::Missing { path: shard.clone() });
        }
        let loaded = candle_core::safetensors::load(shard, &CDevice::Cpu)
            .map_err(|e| LoadError::Corrupt { path: shard.clone(), reason: e.to_string() })?;
        tensors.extend(loaded);
    }
    let mut extras = HashMap::new();
    for &name in extra {
        if let Some(t) = tensors.remove(name) {
            let t = t.to_dtype(DType::F32).map_err(|source| LoadError::candle(&dir, &source))?;
            extras.insert(name.to_string(), t);
        }
    }
    let source = SafetensorsSource { dir, tensors };
    // The vocabulary size comes from the embedding matrix itself.
    let embedding = HF_NAMES.embedding;
    let embd_shape = source.shape(embedding).ok_or_else(|| LoadError::MissingTensor {
        path: source.dir.clone(),
        name: embedding.into(),
    })?;
    if embd_shape.len() != 2 || embd_shape[1] != config.hidden_size {
        return Err(LoadError::ShapeMismatch {
            path: source.dir.clone(),
            name: embedding.into(),
            expected: vec![embd_shape.first().copied().unwrap_or(0), config.hidden_size],
            found: embd_shape,
        });
    }
    let config = ModelConfig {
        vocab_size: embd_shape[0],
        tied_embeddings: !source.has(HF_NAMES.output),
        ..config
    };
    config.validate().map_err(invalid)?;
    let header = Header { config, inv_freq: freqs, vocab: None, with_head: !trunk };
    let model = build(source, &HF_NAMES, header, options, device)?;
    Ok((model, extras))
}

/// Hugging Face `rope_scaling`: `llama3` is supported, `default`/`null` are no-ops.
fn apply_rope_scaling(freqs: &mut [f32], scaling: &serde_json::Value) -> Result<(), String> {
    let kind = scaling
        .get("rope_type")
        .or_else(|| scaling.get("type"))
        .and_then(|v| v.as_str())
        .unwrap_or("default");
    match kind {
        "default" => Ok(()),
        "llama3" => {
            let num = |k: &str| {
                scaling
                    .get(k)
                    .and_then(|v| v.as_f64())
                    .ok_or_else(|| format!("llama3 scaling needs {k:?}"))
            };
            let factor = num("factor")?;
            let low = num("low_freq_factor")?;
            let high = num("high_freq_factor")?;
            let original = num("original_max_position_embeddings")?;
            let low_wavelen = original / low;
            let high_wavelen = original / high;
            for f in freqs.iter_mut() {
                let freq = f64::from(*f);
                let wavelen = 2.0 * std::f64::consts::PI / freq;
                let scaled = if wavelen < high_wavelen {
                    freq
                } else if wavelen > low_wavelen {
                    freq / factor
                } else {
                    let smooth = (original / wavelen - low) / (high - low);
                    (1.0 - smooth) * freq / factor + smooth * freq
                };
                *f = scaled as f32;
            }
            Ok(())
        }
        other => Err(format!("rope scaling type {other:?} is not supported")),
    }
}
