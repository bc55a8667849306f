//! The device, its compute pipelines, error capture, and the buffer-map future.

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use specrej_core::BackendError;
use wgpu::util::DeviceExt;

use crate::shaders::{self, Variant};

/// Every compute pipeline, built once per device.
#[derive(Debug)]
pub(crate) struct Pipelines {
    pub(crate) matmul: wgpu::ComputePipeline,
    pub(crate) matmul_thread: wgpu::ComputePipeline,
    pub(crate) embed: wgpu::ComputePipeline,
    pub(crate) rmsnorm: wgpu::ComputePipeline,
    pub(crate) rope: wgpu::ComputePipeline,
    pub(crate) kv_append: wgpu::ComputePipeline,
    pub(crate) attention: wgpu::ComputePipeline,
    pub(crate) silu_mul: wgpu::ComputePipeline,
    pub(crate) gather: wgpu::ComputePipeline,
    pub(crate) sample: wgpu::ComputePipeline,
    pub(crate) nll: wgpu::ComputePipeline,
    pub(crate) margin: wgpu::ComputePipeline,
}

/// A device with its queue, pipelines and limits.
#[derive(Debug)]
pub(crate) struct Gpu {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    pub(crate) pipelines: Pipelines,
    pub(crate) limits: wgpu::Limits,
    pub(crate) info: wgpu::AdapterInfo,
    /// The features the adapter offers (a subset of them is enabled on `device`).
    pub(crate) offered: wgpu::Features,
    pub(crate) variant: Variant,
    /// Run matmuls with one invocation per output (`matmul_thread`): CPU adapters, where
    /// workgroup barriers are expensive. GPUs use the workgroup-reduction `matmul`.
    pub(crate) thread_matmul: bool,
    /// The first error wgpu reported outside an error scope since the last check.
    errors: Arc<Mutex<Option<BackendError>>>,
}

impl Gpu {
    /// Opens a device on `adapter` and builds every pipeline.
    /// `allow`: the optional features the caller permits; each is used only if offered.
    pub(crate) async fn open(adapter: wgpu::Adapter, allow: Variant) -> Result<Self, crate::Error> {
        let info = adapter.get_info();
        let offered = adapter.features();
        let subgroups = allow.subgroups && offered.contains(wgpu::Features::SUBGROUP);
        let f16_kv = allow.f16_kv && offered.contains(wgpu::Features::SHADER_F16);
        let mut required_features = wgpu::Features::empty();
        if subgroups {
            required_features |= wgpu::Features::SUBGROUP;
        }
        if f16_kv {
            required_features |= wgpu::Features::SHADER_F16;
        }
        let limits = adapter.limits();
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("specrej"),
                required_features,
                required_limits: limits.clone(),
                ..Default::default()
            })
            .await
            .map_err(|e| crate::Error::Device {
                adapter: info.name.clone(),
                reason: e.to_string(),
            })?;
        let errors: Arc<Mutex<Option<BackendError>>> = Arc::new(Mutex::new(None));
        let slot = errors.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            let mapped = match e {
                wgpu::Error::OutOfMemory { .. } => BackendError::OutOfMemory,
                other => BackendError::device(format!("wgpu: {other}")),
            };
            if let Ok(mut s) = slot.lock()
                && s.is_none()
            {
                *s = Some(mapped);
            }
        }));
        let variant = Variant { subgroups, f16_kv };
        let browser = cfg!(target_arch = "wasm32");
        let module = |name: &str, source: &str| {
            device.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(name),
                source: wgpu::ShaderSource::Wgsl(Cow::Owned(shaders::preprocess(
                    source, variant, browser,
                ))),
            })
        };
        let pipeline = |m: &wgpu::ShaderModule, entry: &str| {
            device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(entry),
                layout: None,
                module: m,
                entry_point: Some(entry),
                compilation_options: Default::default(),
                cache: None,
            })
        };
        let matmul = module("matmul.wgsl", shaders::MATMUL);
        let logprob = module("logprob.wgsl", shaders::LOGPROB);
        let pipelines = Pipelines {
            matmul: pipeline(&matmul, "matmul"),
            matmul_thread: pipeline(&matmul, "matmul_thread"),
            embed: pipeline(&matmul, "embed"),
            rmsnorm: pipeline(&module("rmsnorm.wgsl", shaders::RMSNORM), "rmsnorm"),
            rope: pipeline(&module("rope.wgsl", shaders::ROPE), "rope_main"),
            kv_append: pipeline(&module("kv_append.wgsl", shaders::KV_APPEND), "kv_append"),
            attention: pipeline(&module("attention.wgsl", shaders::ATTENTION), "attention"),
            silu_mul: pipeline(&module("silu_mul.wgsl", shaders::SILU_MUL), "silu_mul"),
            gather: pipeline(&module("gather_rows.wgsl", shaders::GATHER_ROWS), "gather_rows"),
            sample: pipeline(&module("sample.wgsl", shaders::SAMPLE), "sample"),
            nll: pipeline(&logprob, "nll"),
            margin: pipeline(&logprob, "margin"),
        };
        let thread_matmul = info.device_type == wgpu::DeviceType::Cpu;
        let gpu = Self {
            device,
            queue,
            pipelines,
            limits,
            info,
            offered,
            variant,
            thread_matmul,
            errors,
        };
        if let Some(e) = gpu.take_error() {
            return Err(crate::Error::Device {
                adapter: gpu.info.name.clone(),
                reason: e.to_string(),
            });
        }
        Ok(gpu)
    }

    /// The first error reported since the last call, if any.
    pub(crate) fn take_error(&self) -> Option<BackendError> {
        self.errors.lock().ok().and_then(|mut s| s.take())
    }

    /// `Err` with the pending device error, if any.
    pub(crate) fn check(&self) -> Result<(), BackendError> {
        match self.take_error() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The most bytes one storage buffer may hold and be bound whole.
    pub(crate) fn max_binding(&self) -> u64 {
        self.limits.max_storage_buffer_binding_size.min(self.limits.max_buffer_size)
    }

    /// A zeroed storage buffer of `bytes` (rounded up to 4, at least 16), or OutOfMemory when the
    /// adapter cannot bind that much.
    pub(crate) fn storage(&self, label: &str, bytes: u64) -> Result<wgpu::Buffer, BackendError> {
        let size = bytes.max(16).next_multiple_of(4);
        if size > self.max_binding() {
            return Err(BackendError::OutOfMemory);
        }
        Ok(self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        }))
    }

    /// A storage buffer holding `data` (padded with zeros to a multiple of 4, plus 4 bytes so
    /// unaligned word reads at the very end stay in bounds).
    pub(crate) fn storage_init(&self, label: &str, data: &[u8]) -> wgpu::Buffer {
        let padded: Vec<u8>;
        let contents = if data.len().is_multiple_of(4) && data.len() >= 16 {
            data
        } else {
            let mut p = data.to_vec();
            p.resize(data.len().next_multiple_of(4).max(16), 0);
            padded = p;
            &padded
        };
        self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(label),
            contents,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
        })
    }

    /// A uniform buffer holding `words` (u32 / f32 bit patterns).
    pub(crate) fn uniform(&self, label: &str, words: &[u32]) -> wgpu::Buffer {
        self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(label),
            contents: bytemuck::cast_slice(words),
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        })
    }

    /// A bind group for `pipeline`'s group 0 with the given (binding, buffer) pairs.
    pub(crate) fn bind(
        &self,
        pipeline: &wgpu::ComputePipeline,
        entries: &[(u32, &wgpu::Buffer)],
    ) -> wgpu::BindGroup {
        let entries: Vec<wgpu::BindGroupEntry<'_>> = entries
            .iter()
            .map(|&(binding, b)| wgpu::BindGroupEntry { binding, resource: b.as_entire_binding() })
            .collect();
        self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        })
    }

    /// Workgroup counts for `groups` workgroups: 1-D, or 2-D past the per-dimension limit
    /// (shaders rebuild the flat index as `x + y * num_workgroups.x`).
    pub(crate) fn grid(&self, groups: u32) -> (u32, u32) {
        let max = self.limits.max_compute_workgroups_per_dimension.max(1);
        if groups <= max { (groups.max(1), 1) } else { (max, groups.div_ceil(max)) }
    }

    /// Sets the pipeline and bind group and dispatches `groups` workgroups.
    pub(crate) fn dispatch(
        &self,
        pass: &mut wgpu::ComputePass<'_>,
        pipeline: &wgpu::ComputePipeline,
        entries: &[(u32, &wgpu::Buffer)],
        groups: u32,
    ) {
        let bg = self.bind(pipeline, entries);
        pass.set_pipeline(pipeline);
        pass.set_bind_group(0, &bg, &[]);
        let (x, y) = self.grid(groups);
        pass.dispatch_workgroups(x, y, 1);
    }

    /// Copies the first `bytes` of `src` back to the host. Native: waits on the device.
    /// Browser: awaits the map callback (never blocks).
    pub(crate) async fn read_back(
        &self,
        mut encoder: wgpu::CommandEncoder,
        src: &wgpu::Buffer,
        bytes: u64,
    ) -> Result<Vec<u8>, BackendError> {
        let size = bytes.max(4).next_multiple_of(4);
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        encoder.copy_buffer_to_buffer(src, 0, &staging, 0, size);
        self.queue.submit([encoder.finish()]);
        let (tx, rx) = oneshot();
        staging.slice(..).map_async(wgpu::MapMode::Read, move |r| tx.send(r));
        #[cfg(not(target_arch = "wasm32"))]
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| BackendError::device(format!("wgpu: waiting for the device: {e}")))?;
        let mapped = rx.await;
        self.check()?;
        mapped.map_err(|e| BackendError::device(format!("wgpu: reading back: {e}")))?;
        let mut data = staging
            .slice(..)
            .get_mapped_range()
            .map_err(|e| BackendError::device(format!("wgpu: reading back: {e}")))?
            .to_vec();
        staging.unmap();
        data.truncate(bytes as usize);
        Ok(data)
    }

    /// Submits `encoder` and reports any error wgpu raised so far.
    pub(crate) fn submit(&self, encoder: wgpu::CommandEncoder) -> Result<(), BackendError> {
        self.queue.submit([encoder.finish()]);
        self.check()
    }

    /// A fresh command encoder.
    pub(crate) fn encoder(&self) -> wgpu::CommandEncoder {
        self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None })
    }
}

/// The sending half of a one-value channel (the map callback's).
struct Sender<T>(Arc<Mutex<Slot<T>>>);

struct Slot<T> {
    value: Option<T>,
    waker: Option<Waker>,
}

impl<T> Sender<T> {
    fn send(self, value: T) {
        if let Ok(mut s) = self.0.lock() {
            s.value = Some(value);
            if let Some(w) = s.waker.take() {
                w.wake();
            }
        }
    }
}

/// Resolves to the value sent.
struct Receiver<T>(Arc<Mutex<Slot<T>>>);

impl<T> Future for Receiver<T> {
    type Output = T;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        match self.0.lock() {
            Ok(mut s) => match s.value.take() {
                Some(v) => Poll::Ready(v),
                None => {
                    s.waker = Some(cx.waker().clone());
                    Poll::Pending
                }
            },
            // A poisoned lock means the sender panicked: never resolve rather than panic here.
            Err(_) => Poll::Pending,
        }
    }
}

fn oneshot<T>() -> (Sender<T>, Receiver<T>) {
    let slot = Arc::new(Mutex::new(Slot { value: None, waker: None }));
    (Sender(slot.clone()), Receiver(slot))
}
