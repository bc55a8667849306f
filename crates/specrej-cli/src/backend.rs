//! `--backend cpu|cuda|wgpu`: the policy model on one backend, and driving the scheduler over it.

use crate::generate::WeightsArg;
use crate::reward::Reward;
use anyhow::{Context, Result};
use specrej_candle::{CandleDecoder, LoadOptions, Model};
use specrej_core::{Decoder, Event, Options, Outcome, Scorer};
use specrej_wgpu::{AdapterChoice, WgpuDecoder, WgpuModel};
use std::path::Path;
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendArg {
    /// candle on the CPU.
    Cpu,
    /// candle on an NVIDIA GPU (needs a build with `--features cuda`).
    Cuda,
    /// WebGPU through wgpu (Vulkan, Metal, DX12); GGUF models; `specrej adapters` lists them.
    Wgpu,
}

impl BackendArg {
    /// The candle device holding reward models: the policy's, or the CPU next to wgpu.
    pub fn candle_device(self) -> specrej_candle::Device {
        match self {
            BackendArg::Cuda => specrej_candle::Device::Cuda(0),
            BackendArg::Cpu | BackendArg::Wgpu => specrej_candle::Device::Cpu,
        }
    }
}

/// The policy model, loaded on its backend.
#[derive(Debug, Clone)]
pub enum Policy {
    Candle(Arc<Model>),
    Wgpu(Arc<WgpuModel>),
}

impl Policy {
    /// Loads `path` for `backend`. `weights` applies to candle; `adapter` to wgpu.
    pub fn load(
        path: &Path,
        backend: BackendArg,
        weights: WeightsArg,
        adapter: Option<&str>,
    ) -> Result<Self> {
        Self::load_with_kv(path, backend, weights, specrej_candle::KvFormat::default(), adapter)
    }

    /// [`Policy::load`] with candle's CPU K/V stored as `kv`.
    pub fn load_with_kv(
        path: &Path,
        backend: BackendArg,
        weights: WeightsArg,
        kv: specrej_candle::KvFormat,
        adapter: Option<&str>,
    ) -> Result<Self> {
        match backend {
            BackendArg::Cpu | BackendArg::Cuda => {
                let options =
                    LoadOptions { device: backend.candle_device(), weights: weights.into(), kv };
                let model = specrej_candle::load(path, &options).context("loading the model")?;
                Ok(Policy::Candle(model))
            }
            BackendArg::Wgpu => {
                if path.is_dir() {
                    anyhow::bail!(
                        "{}: --backend wgpu runs GGUF files, not safetensors directories",
                        path.display()
                    );
                }
                let options = specrej_wgpu::Options {
                    adapter: adapter
                        .map(|a| a.parse::<AdapterChoice>().unwrap_or_else(|e| match e {})),
                    ..specrej_wgpu::Options::default()
                };
                let model = WgpuModel::load_path_blocking(path, &options)
                    .with_context(|| format!("loading {} on wgpu", path.display()))?;
                Ok(Policy::Wgpu(model))
            }
        }
    }

    /// The model's context length in tokens.
    pub fn context_length(&self) -> usize {
        match self {
            Policy::Candle(model) => model.config().context_length,
            Policy::Wgpu(model) => model.config().context_length,
        }
    }

    /// Bytes of K/V cache one cached token takes (as the backend really stores it).
    pub fn kv_bytes_per_token(&self) -> usize {
        match self {
            Policy::Candle(model) => model.kv_bytes_per_token(),
            Policy::Wgpu(model) => model.kv_bytes_per_token(),
        }
    }

    /// How a decoder of this policy holds a batch's K/V (what a budget must hold for it).
    pub fn kv_layout(&self) -> specrej_core::KvLayout {
        match self {
            Policy::Candle(model) => CandleDecoder::layout_for(model),
            Policy::Wgpu(_) => specrej_core::KvLayout::DENSE,
        }
    }

    /// `--kv-budget auto`: the bytes, and the rule that gave them (printed in reports).
    /// A share of what the device has free (call it after the reward model loaded): the
    /// host's available memory on the CPU, the card's free memory on CUDA; WebGPU reports no
    /// free memory, so wgpu gets its default budget.
    pub fn auto_budget(&self) -> Result<(usize, String)> {
        let gb = |b: usize| b as f64 / 1e9;
        match self {
            Policy::Candle(model) => {
                let bytes =
                    CandleDecoder::auto_budget_bytes(model).map_err(|e| anyhow::anyhow!("{e}"))?;
                let rule = if model.device().is_cuda() {
                    format!(
                        "{:.0}% of the GPU's free memory",
                        specrej_candle::AUTO_BUDGET_FREE_FRACTION * 100.0
                    )
                } else {
                    match specrej_candle::host_available_memory() {
                        Some(available) => format!(
                            "{:.0}% of {:.1} GB available RAM",
                            specrej_candle::AUTO_BUDGET_RAM_FRACTION * 100.0,
                            gb(available)
                        ),
                        None => "the default (the host reports no available memory)".to_string(),
                    }
                };
                Ok((bytes, rule))
            }
            Policy::Wgpu(_) => Ok((
                specrej_wgpu::DEFAULT_KV_BUDGET_BYTES,
                "wgpu's default (WebGPU reports no free memory)".to_string(),
            )),
        }
    }

    /// Runs one request with a fresh decoder holding `kv_bytes` of cache (lending its K/V to
    /// `reward` where the reward reads it: the self-judge).
    pub fn generate(
        &self,
        kv_bytes: usize,
        reward: &mut Reward,
        prompt: &[u32],
        options: &Options,
        on_event: &mut dyn FnMut(&Event),
    ) -> Result<Outcome> {
        match self {
            Policy::Candle(model) => {
                let mut decoder = CandleDecoder::new(model.clone(), kv_bytes);
                if let Some(share) = reward.kv_share() {
                    decoder.lend_kv(share)?;
                }
                drive(&mut decoder, reward, prompt, options, on_event)
            }
            Policy::Wgpu(model) => drive(
                &mut WgpuDecoder::new(model.clone(), kv_bytes),
                reward,
                prompt,
                options,
                on_event,
            ),
        }
    }
}

/// Drives the scheduler to the end. `pollster` rather than `block_on_ready`: wgpu futures may
/// wait for the device.
fn drive<D: Decoder>(
    decoder: &mut D,
    reward: &mut impl Scorer,
    prompt: &[u32],
    options: &Options,
    on_event: &mut dyn FnMut(&Event),
) -> Result<Outcome> {
    Ok(pollster::block_on(specrej_core::generate(decoder, reward, prompt, options, on_event))?)
}

/// `specrej adapters`: the WebGPU adapters wgpu finds.
pub fn list_adapters() -> Result<()> {
    let adapters = specrej_wgpu::adapters_blocking();
    if adapters.is_empty() {
        anyhow::bail!(
            "wgpu found no adapter (no Vulkan, Metal or DX12 driver; on Linux try mesa-vulkan-drivers)"
        );
    }
    for adapter in adapters {
        println!("{adapter}");
    }
    Ok(())
}
