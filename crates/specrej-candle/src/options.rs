//! Load-time choices: where the model runs and how its weights are held.

use crate::error::LoadError;

/// Where the model runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Device {
    /// The host CPU (all cores; set `RAYON_NUM_THREADS` to limit).
    #[default]
    Cpu,
    /// An NVIDIA GPU by ordinal. Needs the crate's `cuda` feature; without it, loading
    /// returns [`LoadError::Device`] ("built without cuda").
    Cuda(usize),
}

impl Device {
    /// The candle device, or why it is unavailable.
    pub(crate) fn to_candle(self) -> Result<candle_core::Device, LoadError> {
        match self {
            Device::Cpu => Ok(candle_core::Device::Cpu),
            Device::Cuda(ordinal) => {
                if !cfg!(feature = "cuda") {
                    return Err(LoadError::Device(
                        "specrej-candle was built without cuda (enable its `cuda` feature)".into(),
                    ));
                }
                candle_core::Device::new_cuda(ordinal)
                    .map_err(|e| LoadError::Device(format!("cuda device {ordinal}: {e}")))
            }
        }
    }
}

/// How the projection weights (attention, MLP, output) are held in memory.
///
/// On the CPU every format keeps a row's logits bit-identical whatever else shares its
/// batch (see the crate docs); they differ in speed, memory and precision.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum WeightFormat {
    /// As stored in the file (GGUF quant types through candle's quantized matmul;
    /// f16/bf16/f32 checkpoints as f32). Batch invariance is bit-exact for Q4_0/Q4_1/
    /// Q5_x/Q8_0 files; for K-quants candle picks kernels by row count (Q6_K, and Q4_K on
    /// AMX CPUs), so rows agree only to rounding there.
    Native,
    /// Re-quantized to Q8_0 at load time (integer dot products on 8-bit activations).
    /// On CPUs with AVX-VNNI / AVX512-VNNI the input dimension is zero-padded to a
    /// multiple of 256 so candle's tiled VNNI kernel applies. The fastest format for the
    /// default model at every batch size measured (see the crate's `decode` bench).
    #[default]
    Q8_0,
    /// Dequantized to f32 (dense gemm, in calls of a fixed row count). The most precise,
    /// 4x the memory of Q8_0.
    F32,
}

/// Everything a loader needs besides the path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// Where the model runs.
    pub device: Device,
    /// How the projection weights are held.
    pub weights: WeightFormat,
    /// How K/V caches on the CPU store K and V (a GPU's are f32).
    pub kv: crate::KvFormat,
}
