//! WebGPU backend for specrej: a Llama-family forward written in WGSL (top-level `shaders/`),
//! running on wgpu natively (Vulkan, Metal, DX12) and in the browser (WebGPU).
//!
//! * [`WgpuModel::load`] reads a GGUF file from bytes and uploads its weights as stored:
//!   Q4_0, Q4_1, Q8_0, F16 and F32 matrices are dequantized inside the matmul shader, never
//!   copied to f32. BF16 matrices are converted to F32 at load; other types (K-quants,
//!   Q5_x, IQ*) are refused with [`Error::UnsupportedTensorType`] naming the tensor.
//! * [`WgpuDecoder`] implements [`specrej_core::Decoder`]: prefill, batched decode steps with
//!   on-device sampling (only `rows × u32` come back per step), `retain` as a row gather.
//! * [`WgpuJudgeScorer`] and [`WgpuLikelihoodScorer`] implement [`specrej_core::Scorer`] with
//!   the same forward, so a whole Speculative Rejection run stays on the device.
//!
//! Subgroup operations are used for the matmul and RMSNorm reductions when the adapter offers
//! them; the shaders on disk are the portable variant (see [`shaders`]).
//!
//! `shader-f16` is used for one thing, the K/V cache: when the adapter offers it (and
//! [`Options::f16_kv`] allows it, the default), `kv_append` rounds keys and values to f16,
//! `attention` reads them back into f32, and `gather_rows` copies them as they are. That halves
//! [`WgpuModel::kv_bytes_per_token`], so the same K/V budget (and the same adapter buffer
//! limits) hold twice the tokens: Speculative Rejection starts more rows and decides later.
//! Everything else (weights' f16 block scales read with `unpack2x16float`, activations,
//! logits, every sum) is f32 on every adapter. Without the feature (SwiftShader) or with
//! `f16_kv: false` the cache is f32 and the kernels are exactly the portable files on disk.
//!
//! On native targets the `*_blocking` helpers drive the futures with `pollster`; on wasm32
//! nothing blocks: `step` and `score` await the buffer map.

mod decoder;
#[doc(hidden)]
pub mod diag;
mod error;
mod gguf;
mod gpu;
mod model;
mod scorer;
#[doc(hidden)]
pub mod shaders;
#[cfg(test)]
mod tests;

use std::fmt;

pub use decoder::{DEFAULT_KV_BUDGET_BYTES, WgpuBatch, WgpuDecoder};
pub use error::Error;
pub use gguf::{Architecture, Config};
pub use model::WgpuModel;
pub use scorer::{WgpuJudgeScorer, WgpuLikelihoodScorer};
pub use specrej_core::likelihood::EMPTY_RESPONSE_REWARD;

/// Which adapter to use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdapterChoice {
    /// The adapter at this index of [`adapters`].
    Index(usize),
    /// The first adapter whose name contains this text (case-insensitive).
    Name(String),
}

impl fmt::Display for AdapterChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdapterChoice::Index(i) => write!(f, "#{i}"),
            AdapterChoice::Name(n) => write!(f, "{n:?}"),
        }
    }
}

impl std::str::FromStr for AdapterChoice {
    type Err = std::convert::Infallible;
    /// A number is an index, anything else a name.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.parse::<usize>() {
            Ok(i) => AdapterChoice::Index(i),
            Err(_) => AdapterChoice::Name(s.to_string()),
        })
    }
}

/// Load-time choices.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// The adapter; `None` picks the high-performance default.
    pub adapter: Option<AdapterChoice>,
    /// Use the subgroup variants of the shaders when the adapter offers subgroups.
    pub subgroups: bool,
    /// Store the K/V cache as f16 when the adapter offers `shader-f16` (half the bytes per
    /// cached token; logits move by rounding, about 1e-2). `false` keeps the f32 cache.
    pub f16_kv: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self { adapter: None, subgroups: true, f16_kv: true }
    }
}

/// One adapter, as `specrej adapters` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdapterInfo {
    /// Index to pass as [`AdapterChoice::Index`].
    pub index: usize,
    /// The adapter's name (e.g. "llvmpipe (LLVM 19.1.7, 256 bits)").
    pub name: String,
    /// The graphics API behind it (Vulkan, Metal, Dx12, BrowserWebGpu).
    pub backend: String,
    /// Discrete, integrated, virtual, CPU or other.
    pub device_type: String,
    /// Driver name and version.
    pub driver: String,
    /// Whether it offers `shader-f16`.
    pub shader_f16: bool,
    /// Whether it offers subgroup operations.
    pub subgroups: bool,
    /// Whether the K/V cache is stored as f16: for [`adapters`], what the default [`Options`]
    /// choose there (it offers `shader-f16`); for [`WgpuModel::adapter`], what the model uses.
    pub f16_kv: bool,
    /// Largest buffer it can create, in bytes.
    pub max_buffer_size: u64,
    /// Largest storage buffer binding, in bytes.
    pub max_storage_buffer_binding_size: u64,
}

impl AdapterInfo {
    fn from_parts(
        index: usize,
        info: wgpu::AdapterInfo,
        features: wgpu::Features,
        limits: &wgpu::Limits,
    ) -> Self {
        Self {
            index,
            // Browsers hide the adapter's name (wgpu reports it empty on the web).
            name: match (info.name.is_empty(), info.backend) {
                (false, _) => info.name,
                (true, wgpu::Backend::BrowserWebGpu) => "(name hidden by the browser)".to_string(),
                (true, _) => "(unnamed)".to_string(),
            },
            backend: format!("{:?}", info.backend),
            device_type: format!("{:?}", info.device_type),
            driver: format!("{} {}", info.driver, info.driver_info).trim().to_string(),
            shader_f16: features.contains(wgpu::Features::SHADER_F16),
            subgroups: features.contains(wgpu::Features::SUBGROUP),
            f16_kv: features.contains(wgpu::Features::SHADER_F16),
            max_buffer_size: limits.max_buffer_size,
            max_storage_buffer_binding_size: limits.max_storage_buffer_binding_size,
        }
    }
}

impl fmt::Display for AdapterInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} ({}, {}; f16: {}, subgroups: {}, K/V cache: {}, max buffer {} MiB)",
            self.index,
            self.name,
            self.backend,
            self.device_type,
            if self.shader_f16 { "yes" } else { "no" },
            if self.subgroups { "yes" } else { "no" },
            if self.f16_kv { "f16" } else { "f32" },
            self.max_buffer_size >> 20
        )
    }
}

/// The backends searched: Vulkan, Metal, DX12 and the browser's WebGPU (`WGPU_BACKEND`
/// overrides).
fn backends() -> wgpu::Backends {
    wgpu::Backends::PRIMARY.with_env()
}

fn instance() -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle().with_env();
    desc.backends = backends();
    wgpu::Instance::new(desc)
}

/// Every adapter wgpu finds (on the web: the browser's one adapter, if any).
pub async fn adapters() -> Vec<AdapterInfo> {
    let instance = instance();
    #[cfg(not(target_arch = "wasm32"))]
    let list = instance.enumerate_adapters(backends()).await;
    #[cfg(target_arch = "wasm32")]
    let list: Vec<wgpu::Adapter> =
        instance.request_adapter(&Default::default()).await.into_iter().collect();
    list.into_iter()
        .enumerate()
        .map(|(i, a)| AdapterInfo::from_parts(i, a.get_info(), a.features(), &a.limits()))
        .collect()
}

/// [`adapters`], blocking (native only).
#[cfg(not(target_arch = "wasm32"))]
pub fn adapters_blocking() -> Vec<AdapterInfo> {
    pollster::block_on(adapters())
}

/// A tensor of a GGUF file dequantized to f32 on the host: (shape, outer dimension first;
/// values, row-major). For tests that build reference outputs (e.g. logits from hidden
/// states); not part of the stable API.
#[doc(hidden)]
pub fn dequantize_tensor(gguf: &[u8], name: &str) -> Result<(Vec<usize>, Vec<f32>), Error> {
    let g = gguf::Gguf::parse(gguf)?;
    let info = g
        .tensor(name)
        .ok_or_else(|| Error::Gguf(specrej_gguf::GgufError::MissingTensor(name.into())))?;
    let values = g.to_f32(name, info)?;
    Ok((info.shape.clone(), values))
}

/// What [`WgpuModel`] checks of a GGUF file before it touches a device: the header, the
/// tensor table against the bytes present and the hyper-parameters (specrej-gguf's rules),
/// then this backend's limits ([`Error::Unsupported`]). (The fuzzer runs it.)
pub fn check_gguf(gguf: &[u8]) -> Result<Config, Error> {
    gguf::Gguf::parse(gguf)?.config()
}
