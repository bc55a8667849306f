//! What can go wrong while finding an adapter or loading a model.

/// Loading a model or opening a device failed. Messages name the tensor, key or adapter.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No WebGPU adapter is available (no GPU driver, no software rasterizer, no browser support).
    #[error("no WebGPU adapter found{hint}")]
    NoAdapter {
        /// Extra context (e.g. the request's error), may be empty.
        hint: String,
    },
    /// The adapter asked for by index or name does not exist.
    #[error("no WebGPU adapter matches {wanted:?}; available: {available:?}")]
    AdapterNotFound {
        /// What was asked for.
        wanted: String,
        /// Names of the adapters found, in index order.
        available: Vec<String>,
    },
    /// The adapter refused to open a device.
    #[error("cannot open a device on adapter {adapter:?}: {reason}")]
    Device {
        /// The adapter's name.
        adapter: String,
        /// wgpu's message.
        reason: String,
    },
    /// A file could not be read.
    #[error("{path}: cannot read: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid GGUF model by specrej-gguf's rules (the ones every backend
    /// applies): not GGUF, a corrupt header or tensor table, an unsupported architecture, or
    /// bad hyper-parameters, or a tensor the model needs missing or misshapen. Its message is
    /// specrej-gguf's.
    #[error("{0}")]
    Gguf(#[from] specrej_gguf::GgufError),
    /// A valid model this backend's kernels cannot run (e.g. heads wider than 256).
    #[error("unsupported by the wgpu backend: {key:?}: {reason}")]
    Unsupported {
        /// The metadata key.
        key: String,
        /// Which limit it exceeds.
        reason: String,
    },
    /// A tensor is stored in a type this backend cannot read.
    #[error(
        "tensor {name:?} has unsupported type {ty} (supported: F32, F16, BF16, Q4_0, Q4_1, Q8_0; \
         requantize the file, e.g. with llama.cpp's llama-quantize to Q8_0 or Q4_1)"
    )]
    UnsupportedTensorType {
        /// The tensor.
        name: String,
        /// GGML's name for its type.
        ty: String,
    },
    /// A tensor does not fit in one buffer binding on this adapter.
    #[error("tensor {name:?} takes {bytes} bytes, more than this adapter binds at once ({limit})")]
    TooLarge {
        /// The tensor.
        name: String,
        /// Its size on the device.
        bytes: u64,
        /// The adapter's `max_storage_buffer_binding_size` / `max_buffer_size`.
        limit: u64,
    },
    /// The device ran out of memory or reported an error while loading.
    #[error("the device failed while loading the model: {0}")]
    Upload(String),
}
