//! The model on the device: weights as stored in the GGUF file, and the forward pass as a
//! chain of compute dispatches.

use std::sync::Arc;

use specrej_core::BackendError;

use crate::error::Error;
use crate::gguf::{Config, Gguf, shader_id};
use crate::gpu::Gpu;
use crate::{AdapterChoice, Options};

/// A projection `y = x Wᵀ (+ b)` whose weight stays in its file type on the device.
#[derive(Debug)]
pub(crate) struct Matrix {
    /// `[out, in]` GGML blocks of `ty`, 4-byte padded.
    buf: wgpu::Buffer,
    /// `Weight` uniform: out, in, shader type id, flags.
    dims: wgpu::Buffer,
    out: usize,
    /// `[out]` f32, or the model's dummy buffer.
    bias: Option<wgpu::Buffer>,
}

#[derive(Debug)]
struct Layer {
    attn_norm: wgpu::Buffer, // [hidden] f32
    q: Matrix,               // [heads*head_dim, hidden]
    k: Matrix,               // [kv_heads*head_dim, hidden]
    v: Matrix,               // [kv_heads*head_dim, hidden]
    o: Matrix,               // [hidden, heads*head_dim], accumulates into x
    ffn_norm: wgpu::Buffer,  // [hidden] f32
    gate: Matrix,            // [ffn, hidden]
    up: Matrix,              // [ffn, hidden]
    down: Matrix,            // [hidden, ffn], accumulates into x
}

/// A Llama-family model loaded onto a WebGPU device. Immutable; share it with [`Arc`]
/// between a decoder and scorers.
#[derive(Debug)]
pub struct WgpuModel {
    pub(crate) gpu: Gpu,
    pub(crate) config: Config,
    embed: Matrix, // [vocab, hidden] lookup table
    head: Matrix,  // [vocab, hidden], reads step.m rows
    layers: Vec<Layer>,
    norm: wgpu::Buffer,       // [hidden] f32
    rope_table: wgpu::Buffer, // [context, head_dim/2] (cos, sin) f32
    layer_norm_u: wgpu::Buffer,
    final_norm_u: wgpu::Buffer,
    rope_u: wgpu::Buffer,
    attn_u: wgpu::Buffer,
    kv_width_u: wgpu::Buffer,
    ffn_width_u: wgpu::Buffer,
    /// 16 bytes bound where a shader's optional input is unused.
    dummy: wgpu::Buffer,
    /// `tokenizer.ggml.tokens` when the file has it.
    vocab: Option<Vec<String>>,
    weight_bytes: u64,
}

/// One dispatch chain's shape, written to the `Step` uniform every shader reads.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct StepParams {
    pub(crate) n: u32,
    pub(crate) rows: u32,
    pub(crate) t: u32,
    pub(crate) pos: u32,
    pub(crate) cap: u32,
    pub(crate) m: u32,
    pub(crate) logit_stride: u32,
    pub(crate) generation: u32,
}

impl StepParams {
    fn words(&self) -> [u32; 8] {
        [self.n, self.rows, self.t, self.pos, self.cap, self.m, self.logit_stride, self.generation]
    }
}

/// Scratch activations of one user (decoder or scorer), grown on demand.
#[derive(Debug)]
pub(crate) struct Work {
    n_cap: usize,
    m_cap: usize,
    x: wgpu::Buffer,   // [n, hidden] f32 residual stream
    h: wgpu::Buffer,   // [n, hidden] f32 normed (the head's [m, hidden] too)
    q: wgpu::Buffer,   // [n, heads, head_dim] f32
    k: wgpu::Buffer,   // [n, kv_heads, head_dim] f32
    v: wgpu::Buffer,   // [n, kv_heads, head_dim] f32
    att: wgpu::Buffer, // [n, heads, head_dim] f32
    g: wgpu::Buffer,   // [n, ffn] f32
    u: wgpu::Buffer,   // [n, ffn] f32
    /// `[n]` u32 token ids of a pass fed from the host.
    pub(crate) tokens: wgpu::Buffer,
    /// `[m]` u32: the activation row each head row reads.
    pub(crate) head_rows: wgpu::Buffer,
    /// `Step` uniform.
    pub(crate) step: wgpu::Buffer,
}

/// Per-layer K/V of rows that all sit at the same position. Elements are f16 in the f16kv
/// variant (adapters with `shader-f16`, [`crate::Options::f16_kv`]), f32 otherwise.
#[derive(Debug)]
pub(crate) struct Cache {
    k: Vec<wgpu::Buffer>, // per layer: [rows, cap, kv_heads, head_dim] f32|f16
    v: Vec<wgpu::Buffer>, // per layer: [rows, cap, kv_heads, head_dim] f32|f16
    pub(crate) cap: usize,
    /// Cached positions (the same for every row).
    pub(crate) len: usize,
}

/// Chooses the adapter `choice` names (or the best one).
async fn pick_adapter(
    instance: &wgpu::Instance,
    choice: Option<&AdapterChoice>,
) -> Result<wgpu::Adapter, Error> {
    let best = || async {
        instance
            .request_adapter(&wgpu::RequestAdapterOptions {
                power_preference: wgpu::PowerPreference::HighPerformance,
                ..Default::default()
            })
            .await
            .map_err(|e| Error::NoAdapter { hint: format!(": {e}") })
    };
    let Some(choice) = choice else { return best().await };
    let list = instance.enumerate_adapters(crate::backends()).await;
    let names: Vec<String> = list.iter().map(|a| a.get_info().name).collect();
    let found = match choice {
        AdapterChoice::Index(i) => list.into_iter().nth(*i),
        AdapterChoice::Name(name) => {
            let want = name.to_lowercase();
            list.into_iter().find(|a| a.get_info().name.to_lowercase().contains(&want))
        }
    };
    found.ok_or_else(|| Error::AdapterNotFound { wanted: choice.to_string(), available: names })
}

fn f32_bytes(v: &[f32]) -> &[u8] {
    bytemuck::cast_slice(v)
}

impl WgpuModel {
    /// Loads a GGUF file held in memory onto the adapter `options` selects.
    pub async fn load(gguf: &[u8], options: &Options) -> Result<Arc<Self>, Error> {
        let parsed = Gguf::parse(gguf)?;
        let config = parsed.config()?;
        let instance = crate::instance();
        let adapter = pick_adapter(&instance, options.adapter.as_ref()).await?;
        let allow =
            crate::shaders::Variant { subgroups: options.subgroups, f16_kv: options.f16_kv };
        let gpu = Gpu::open(adapter, allow).await?;
        let model = Self::upload(gpu, config, &parsed)?;
        Ok(Arc::new(model))
    }

    /// [`WgpuModel::load`] from a file, blocking (native only).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn load_path_blocking(
        path: impl AsRef<std::path::Path>,
        options: &Options,
    ) -> Result<Arc<Self>, Error> {
        let path = path.as_ref();
        let bytes =
            std::fs::read(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
        pollster::block_on(Self::load(&bytes, options))
    }

    /// [`WgpuModel::load`], blocking (native only).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn load_blocking(gguf: &[u8], options: &Options) -> Result<Arc<Self>, Error> {
        pollster::block_on(Self::load(gguf, options))
    }

    fn upload(gpu: Gpu, config: Config, g: &Gguf<'_>) -> Result<Self, Error> {
        let c = &config;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let limit = gpu.max_binding();
        let mut weight_bytes = 0u64;
        let dummy = gpu.storage("dummy", 16).map_err(|e| Error::Upload(e.to_string()))?;
        let mut matrix = |name: &str,
                          out: usize,
                          inp: usize,
                          flags: u32,
                          bias: Option<&str>|
         -> Result<Matrix, Error> {
            let info = g.info(name, &[out, inp])?;
            let (ty, data): (u32, std::borrow::Cow<'_, [u8]>) = match shader_id(info.ggml_type) {
                Some(id) => (id, g.data(info).into()),
                // BF16: converted to F32 at load (documented in the crate docs).
                None => (0, f32_bytes(&g.to_f32(name, info)?).to_vec().into()),
            };
            let bytes = data.len() as u64 + 4;
            if bytes > limit {
                return Err(Error::TooLarge { name: name.into(), bytes, limit });
            }
            weight_bytes += bytes;
            let mut flags = flags;
            let bias = match bias.filter(|b| g.has(b)) {
                Some(b) => {
                    let info = g.info(b, &[out])?;
                    flags |= 4;
                    Some(gpu.storage_init(b, f32_bytes(&g.to_f32(b, info)?)))
                }
                None => None,
            };
            let mut padded = data.into_owned();
            padded.extend_from_slice(&[0; 4]);
            Ok(Matrix {
                buf: gpu.storage_init(name, &padded),
                dims: gpu.uniform(name, &[out as u32, inp as u32, ty, flags]),
                out,
                bias,
            })
        };
        let embed = matrix("token_embd.weight", c.vocab_size, h, 0, None)?;
        let head = if g.has("output.weight") {
            matrix("output.weight", c.vocab_size, h, 2, None)?
        } else {
            // Tied embeddings: the head reads the lookup table itself.
            let info = g.info("token_embd.weight", &[c.vocab_size, h])?;
            let ty = shader_id(info.ggml_type).unwrap_or(0);
            Matrix {
                buf: embed.buf.clone(),
                dims: gpu.uniform("head", &[c.vocab_size as u32, h as u32, ty, 2]),
                out: c.vocab_size,
                bias: None,
            }
        };
        let qwen = c.architecture == crate::gguf::Architecture::Qwen2;
        let mut layers = Vec::with_capacity(c.layers);
        for i in 0..c.layers {
            let p = |s: &str| format!("blk.{i}.{s}");
            if qwen {
                for b in ["attn_q.bias", "attn_k.bias", "attn_v.bias"] {
                    if !g.has(&p(b)) {
                        return Err(Error::Gguf(specrej_gguf::GgufError::MissingTensor(p(b))));
                    }
                }
            }
            let (pq, pk, pv) = (p("attn_q.bias"), p("attn_k.bias"), p("attn_v.bias"));
            layers.push(Layer {
                attn_norm: vector(&gpu, g, &p("attn_norm.weight"), h)?,
                q: matrix(&p("attn_q.weight"), c.heads * hd, h, 0, Some(&pq))?,
                k: matrix(&p("attn_k.weight"), c.kv_heads * hd, h, 0, Some(&pk))?,
                v: matrix(&p("attn_v.weight"), c.kv_heads * hd, h, 0, Some(&pv))?,
                o: matrix(&p("attn_output.weight"), h, c.heads * hd, 1, None)?,
                ffn_norm: vector(&gpu, g, &p("ffn_norm.weight"), h)?,
                gate: matrix(&p("ffn_gate.weight"), c.ffn_size, h, 0, None)?,
                up: matrix(&p("ffn_up.weight"), c.ffn_size, h, 0, None)?,
                down: matrix(&p("ffn_down.weight"), h, c.ffn_size, 1, None)?,
            });
        }
        let norm = vector(&gpu, g, "output_norm.weight", h)?;

        // RoPE: the same inverse frequencies and f32 arithmetic as specrej-candle.
        let half = hd / 2;
        let mut freqs: Vec<f32> =
            (0..half).map(|i| 1.0 / c.rope_theta.powf(2.0 * i as f32 / hd as f32)).collect();
        if let Some(info) = g.tensor("rope_freqs.weight") {
            let factors = g.to_f32("rope_freqs.weight", info)?;
            if factors.len() != half {
                return Err(Error::Gguf(specrej_gguf::GgufError::ShapeMismatch {
                    name: "rope_freqs.weight".into(),
                    expected: vec![half],
                    found: info.shape.clone(),
                }));
            }
            for (f, d) in freqs.iter_mut().zip(factors) {
                *f /= d;
            }
        }
        // Checked before it is built: a valid context (up to 2^24 positions) can ask for more
        // than the adapter binds, or than the host should allocate for it.
        let table_bytes = (c.context_length as u64).saturating_mul(half as u64 * 2 * 4);
        if table_bytes > limit {
            return Err(Error::TooLarge { name: "RoPE table".into(), bytes: table_bytes, limit });
        }
        let mut table = Vec::with_capacity(c.context_length * half * 2); // [context, head_dim/2] (cos, sin)
        for p in 0..c.context_length {
            for &f in &freqs {
                let angle = p as f32 * f;
                table.push(angle.cos());
                table.push(angle.sin());
            }
        }
        let rope_table = gpu.storage_init("rope table", f32_bytes(&table));
        let eps = c.rms_norm_eps.to_bits();
        let layer_norm_u = gpu.uniform("layer norm", &[h as u32, 0, eps, 0]);
        let final_norm_u = gpu.uniform("final norm", &[h as u32, 1, eps, 0]);
        let rope_u = gpu.uniform(
            "rope",
            &[c.heads as u32, c.kv_heads as u32, hd as u32, u32::from(c.rope_interleaved)],
        );
        let scale = (1.0 / (hd as f64).sqrt()) as f32;
        let attn_u = gpu
            .uniform("attention", &[c.heads as u32, c.kv_heads as u32, hd as u32, scale.to_bits()]);
        let kv_width_u = gpu.uniform("kv width", &[(c.kv_heads * hd) as u32, 0, 0, 0]);
        let ffn_width_u = gpu.uniform("ffn width", &[c.ffn_size as u32, 0, 0, 0]);
        let vocab = g.meta().get_array("tokenizer.ggml.tokens").and_then(|items| {
            items.iter().map(|v| v.as_str().map(str::to_string)).collect::<Option<Vec<_>>>()
        });
        if let Some(e) = gpu.take_error() {
            return Err(match e {
                BackendError::OutOfMemory => Error::Upload("out of device memory".into()),
                other => Error::Upload(other.to_string()),
            });
        }
        Ok(Self {
            gpu,
            config,
            embed,
            head,
            layers,
            norm,
            rope_table,
            layer_norm_u,
            final_norm_u,
            rope_u,
            attn_u,
            kv_width_u,
            ffn_width_u,
            dummy,
            vocab,
            weight_bytes,
        })
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The token strings of the file's `tokenizer.ggml.tokens`, indexed by id.
    pub fn vocab(&self) -> Option<&[String]> {
        self.vocab.as_deref()
    }

    /// The adapter the model lives on.
    pub fn adapter(&self) -> crate::AdapterInfo {
        let mut info = crate::AdapterInfo::from_parts(
            0,
            self.gpu.info.clone(),
            self.gpu.offered,
            &self.gpu.limits,
        );
        info.f16_kv = self.gpu.variant.f16_kv;
        info
    }

    /// Whether the shaders run their subgroup variant.
    pub fn uses_subgroups(&self) -> bool {
        self.gpu.variant.subgroups
    }

    /// Whether the K/V cache is stored as f16 (the adapter offers `shader-f16` and
    /// [`crate::Options::f16_kv`] allowed it).
    pub fn uses_f16_kv(&self) -> bool {
        self.gpu.variant.f16_kv
    }

    /// Bytes of K/V cache one cached token takes over all layers, in the element type this
    /// model's cache uses (half of [`Config::kv_bytes_per_token`] with an f16 cache).
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * self.config.layers * self.kv_width_bytes()
    }

    /// Bytes of one position of one layer's K (or V): `kv_heads × head_dim` elements.
    fn kv_width_bytes(&self) -> usize {
        self.config.kv_heads * self.config.head_dim * self.gpu.variant.kv_elem_bytes()
    }

    /// Bytes of weights on the device.
    pub fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    /// Positions per cache row the adapter can bind in one K or V buffer.
    pub(crate) fn max_cached_tokens_per_buffer(&self) -> usize {
        let per_token = self.kv_width_bytes() as u64;
        usize::try_from(self.gpu.max_binding() / per_token).unwrap_or(usize::MAX)
    }

    /// Checks every id is inside the vocabulary.
    pub(crate) fn check_tokens(&self, tokens: &[u32]) -> Result<(), BackendError> {
        let vocab = self.config.vocab_size;
        match tokens.iter().find(|&&t| t as usize >= vocab) {
            Some(bad) => Err(BackendError::device(format!(
                "token id {bad} is outside the vocabulary (size {vocab})"
            ))),
            None => Ok(()),
        }
    }

    /// Scratch for passes of up to `n` activation rows and `m` head rows.
    pub(crate) fn work(&self, n: usize, m: usize) -> Result<Work, BackendError> {
        let c = &self.config;
        let n = n.max(1);
        let m = m.max(1).min(n).max(1);
        let f = |w: usize| (n * w * 4) as u64;
        let gpu = &self.gpu;
        Ok(Work {
            n_cap: n,
            m_cap: m,
            x: gpu.storage("x", f(c.hidden_size))?,
            h: gpu.storage("h", f(c.hidden_size))?,
            q: gpu.storage("q", f(c.heads * c.head_dim))?,
            k: gpu.storage("k", f(c.kv_heads * c.head_dim))?,
            v: gpu.storage("v", f(c.kv_heads * c.head_dim))?,
            att: gpu.storage("att", f(c.heads * c.head_dim))?,
            g: gpu.storage("g", f(c.ffn_size))?,
            u: gpu.storage("u", f(c.ffn_size))?,
            tokens: gpu.storage("tokens", (n * 4) as u64)?,
            head_rows: gpu.storage("head rows", (m * 4) as u64)?,
            step: gpu.uniform("step", &[0; 8]),
        })
    }

    /// `work` grown to hold `n` activation rows and `m` head rows.
    pub(crate) fn ensure_work(
        &self,
        work: &mut Option<Work>,
        n: usize,
        m: usize,
    ) -> Result<(), BackendError> {
        let fits = work.as_ref().is_some_and(|w| w.n_cap >= n && w.m_cap >= m && m <= w.n_cap);
        if !fits {
            let (n0, m0) = work.as_ref().map_or((0, 0), |w| (w.n_cap, w.m_cap));
            *work = None; // free the old scratch before allocating the new
            *work = Some(self.work(n.max(n0).max(m), m.max(m0))?);
        }
        Ok(())
    }

    /// An empty cache of `rows` rows and `cap` positions.
    pub(crate) fn cache(&self, rows: usize, cap: usize) -> Result<Cache, BackendError> {
        let c = &self.config;
        let bytes = (rows as u64)
            .checked_mul(cap as u64)
            .and_then(|x| x.checked_mul(self.kv_width_bytes() as u64))
            .ok_or(BackendError::OutOfMemory)?;
        let mut k = Vec::with_capacity(c.layers);
        let mut v = Vec::with_capacity(c.layers);
        for _ in 0..c.layers {
            k.push(self.gpu.storage("cache k", bytes)?);
            v.push(self.gpu.storage("cache v", bytes)?);
        }
        Ok(Cache { k, v, cap, len: 0 })
    }

    /// A new cache whose row j copies `src` row `keep[j]` (positions `0..src.len`), with room
    /// for `cap` positions. Encoded into `encoder`.
    pub(crate) fn gather(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        src: &Cache,
        keep: &[u32],
        cap: usize,
    ) -> Result<Cache, BackendError> {
        let cap = cap.max(src.len);
        let mut out = self.cache(keep.len(), cap)?;
        out.len = src.len;
        if src.len == 0 || keep.is_empty() {
            return Ok(out);
        }
        // gather_rows copies 32-bit words: head_dim is a multiple of 4, so a position of f16
        // (or f32) elements is a whole number of words.
        let width = (self.kv_width_bytes() / 4) as u32;
        let gpu = &self.gpu;
        let params = gpu.uniform(
            "gather",
            &[keep.len() as u32, src.len as u32, width, src.cap as u32, cap as u32, 0, 0, 0],
        );
        let keep_buf = gpu.storage_init("keep", bytemuck::cast_slice(keep));
        let count = keep.len() as u64 * src.len as u64 * u64::from(width);
        let groups = u32::try_from(count.div_ceil(64)).map_err(|_| BackendError::OutOfMemory)?;
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor::default());
        for (s, d) in src.k.iter().zip(&out.k).chain(src.v.iter().zip(&out.v)) {
            gpu.dispatch(
                &mut pass,
                &gpu.pipelines.gather,
                &[(0, &params), (1, &keep_buf), (2, s), (3, d)],
                groups,
            );
        }
        drop(pass);
        Ok(out)
    }

    /// Writes the `Step` uniform (before the pass that reads it is submitted).
    pub(crate) fn set_step(&self, work: &Work, p: &StepParams) {
        self.gpu.queue.write_buffer(&work.step, 0, bytemuck::cast_slice(&p.words()));
    }

    fn matmul(
        &self,
        pass: &mut wgpu::ComputePass<'_>,
        step: &wgpu::Buffer,
        w: &Matrix,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
    ) {
        let gpu = &self.gpu;
        let bias = w.bias.as_ref().unwrap_or(&self.dummy);
        let entries = [(0, step), (1, &w.dims), (2, &w.buf), (3, x), (4, y), (7, bias)];
        if gpu.thread_matmul {
            gpu.dispatch(pass, &gpu.pipelines.matmul_thread, &entries, (w.out as u32).div_ceil(64));
        } else {
            gpu.dispatch(pass, &gpu.pipelines.matmul, &entries, w.out as u32);
        }
    }

    /// The trunk over `p.n` activation rows (`p.rows` cache rows × `p.t` new positions at
    /// `p.pos`), token ids from `tokens` `[n]`, appending K/V to `cache`. Leaves the residual
    /// stream in `work.x`. The `Step` uniform must already hold `p`.
    pub(crate) fn encode_trunk(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        work: &Work,
        cache: &Cache,
        tokens: &wgpu::Buffer,
        p: &StepParams,
    ) {
        let c = &self.config;
        let gpu = &self.gpu;
        let pl = &gpu.pipelines;
        let n = p.n;
        let s = &work.step;
        let inv = |count: usize| (count as u32).div_ceil(64);
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor::default());
        gpu.dispatch(
            &mut pass,
            &pl.embed,
            &[(0, s), (1, &self.embed.dims), (2, &self.embed.buf), (5, tokens), (6, &work.x)],
            inv(n as usize * c.hidden_size / 8),
        );
        for (l, layer) in self.layers.iter().enumerate() {
            gpu.dispatch(
                &mut pass,
                &pl.rmsnorm,
                &[
                    (0, s),
                    (1, &self.layer_norm_u),
                    (2, &work.x),
                    (3, &layer.attn_norm),
                    (4, &self.dummy),
                    (5, &work.h),
                ],
                n,
            );
            self.matmul(&mut pass, s, &layer.q, &work.h, &work.q);
            self.matmul(&mut pass, s, &layer.k, &work.h, &work.k);
            self.matmul(&mut pass, s, &layer.v, &work.h, &work.v);
            gpu.dispatch(
                &mut pass,
                &pl.rope,
                &[(0, s), (1, &self.rope_u), (2, &self.rope_table), (3, &work.q), (4, &work.k)],
                inv(n as usize * (c.heads + c.kv_heads) * c.head_dim / 2),
            );
            gpu.dispatch(
                &mut pass,
                &pl.kv_append,
                &[
                    (0, s),
                    (1, &self.kv_width_u),
                    (2, &work.k),
                    (3, &work.v),
                    (4, &cache.k[l]),
                    (5, &cache.v[l]),
                ],
                inv(n as usize * c.kv_heads * c.head_dim),
            );
            gpu.dispatch(
                &mut pass,
                &pl.attention,
                &[
                    (0, s),
                    (1, &self.attn_u),
                    (2, &work.q),
                    (3, &cache.k[l]),
                    (4, &cache.v[l]),
                    (5, &work.att),
                ],
                n * c.heads as u32,
            );
            self.matmul(&mut pass, s, &layer.o, &work.att, &work.x);
            gpu.dispatch(
                &mut pass,
                &pl.rmsnorm,
                &[
                    (0, s),
                    (1, &self.layer_norm_u),
                    (2, &work.x),
                    (3, &layer.ffn_norm),
                    (4, &self.dummy),
                    (5, &work.h),
                ],
                n,
            );
            self.matmul(&mut pass, s, &layer.gate, &work.h, &work.g);
            self.matmul(&mut pass, s, &layer.up, &work.h, &work.u);
            gpu.dispatch(
                &mut pass,
                &pl.silu_mul,
                &[(0, s), (1, &self.ffn_width_u), (2, &work.g), (3, &work.u)],
                inv(n as usize * c.ffn_size),
            );
            self.matmul(&mut pass, s, &layer.down, &work.g, &work.x);
        }
    }

    /// Final norm and output projection of the `p.m` activation rows listed in
    /// `work.head_rows` → `logits` `[m, vocab]` f32.
    pub(crate) fn encode_head(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        work: &Work,
        logits: &wgpu::Buffer,
        p: &StepParams,
    ) {
        let gpu = &self.gpu;
        let s = &work.step;
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor::default());
        gpu.dispatch(
            &mut pass,
            &gpu.pipelines.rmsnorm,
            &[
                (0, s),
                (1, &self.final_norm_u),
                (2, &work.x),
                (3, &self.norm),
                (4, &work.head_rows),
                (5, &work.h),
            ],
            p.m,
        );
        self.matmul(&mut pass, s, &self.head, &work.h, logits);
    }
}

/// A norm weight (or any vector) as f32 on the device.
fn vector(gpu: &Gpu, g: &Gguf<'_>, name: &str, n: usize) -> Result<wgpu::Buffer, Error> {
    let info = g.info(name, &[n])?;
    let v = g.to_f32(name, info)?;
    if v.len() != n {
        return Err(Error::Gguf(specrej_gguf::GgufError::ShapeMismatch {
            name: name.into(),
            expected: vec![n],
            found: info.shape.clone(),
        }));
    }
    Ok(gpu.storage_init(name, f32_bytes(&v)))
}
