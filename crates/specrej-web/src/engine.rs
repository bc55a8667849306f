//! `WebEngine`: the decoder component's `engine` import, in the browser (wasm32 only).

#![allow(
    unsafe_code,
    reason = "wasm-bindgen's generated glue (exports, closures, ABI conversions) is `unsafe` by nature"
)]

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use js_sys::{Float32Array, Object, Reflect, Uint32Array};
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::future_to_promise;

use specrej_candle::{CandleBatch, CandleDecoder, JudgeScorer, Model as CandleModel};
use specrej_core::{BackendError, Decoder, Response, Sampling, Scored, Scorer, block_on_ready};
use specrej_text::{ChatTemplate, GgufMetadata, Message, Tokenizer, judge_segments};
use specrej_wgpu::{WgpuBatch, WgpuDecoder, WgpuJudgeScorer, WgpuModel};

/// The model on one backend, with its live batches and the judge of the current question.
#[allow(
    clippy::large_enum_variant,
    reason = "one value per loaded engine: the size difference does not matter"
)]
enum Backend {
    /// specrej-wgpu on the browser's WebGPU adapter: `step` and `score` await a buffer map.
    Gpu {
        model: Arc<WgpuModel>,
        decoder: WgpuDecoder,
        judge: Option<WgpuJudgeScorer>,
        batches: HashMap<u32, WgpuBatch>,
    },
    /// specrej-candle on the CPU (wasm32, one thread): everything completes synchronously,
    /// so it also serves the non-JSPI component (`stepNow`, `scoreNow`).
    Cpu {
        model: Arc<CandleModel>,
        decoder: CandleDecoder,
        judge: Option<JudgeScorer>,
        batches: HashMap<u32, CandleBatch>,
    },
}

/// Everything one loaded model needs; shared by the promises `step` and `score` return.
struct State {
    tokenizer: Tokenizer,
    template: ChatTemplate,
    backend: Backend,
    next_batch: u32,
    eos: Vec<u32>,
}

/// The model on WebGPU or the CPU plus its text layer. See `web/src/bridge.js` for the JS
/// interface.
#[wasm_bindgen]
pub struct WebEngine {
    state: Rc<RefCell<State>>,
    info: Vec<(&'static str, JsValue)>,
}

impl std::fmt::Debug for WebEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebEngine").finish_non_exhaustive()
    }
}

/// A JS error with `message`.
fn js_error(message: impl std::fmt::Display) -> JsValue {
    JsError::new(&message.to_string()).into()
}

/// What the bridge maps to the WIT `engine-error`: `{ outOfMemory: true }` or an Error.
fn backend_error(error: BackendError) -> JsValue {
    match error {
        BackendError::OutOfMemory => {
            let object = Object::new();
            let _ = Reflect::set(&object, &"outOfMemory".into(), &JsValue::TRUE);
            object.into()
        }
        BackendError::Device(message) => js_error(message),
    }
}

fn object(fields: &[(&str, JsValue)]) -> JsValue {
    let object = Object::new();
    for (key, value) in fields {
        let _ = Reflect::set(&object, &JsValue::from_str(key), value);
    }
    object.into()
}

/// `(row, tokens)` slices of the flattened responses the bridge passes to `score`.
fn split_responses<'a>(
    rows: &[u32],
    lengths: &[u32],
    tokens: &'a [u32],
) -> Result<Vec<Response<'a>>, JsValue> {
    if rows.len() != lengths.len() {
        return Err(js_error("score: rows and lengths differ in length"));
    }
    let mut at = 0usize;
    let mut out = Vec::with_capacity(rows.len());
    for (&row, &len) in rows.iter().zip(lengths) {
        let end = at + len as usize;
        let slice = tokens.get(at..end).ok_or_else(|| js_error("score: lengths exceed tokens"))?;
        out.push(Response { row, tokens: slice });
        at = end;
    }
    Ok(out)
}

fn scored_object(scored: &Scored) -> JsValue {
    object(&[
        ("rewards", Float32Array::from(&scored.rewards[..]).into()),
        ("tokensProcessed", JsValue::from_f64(scored.tokens_processed as f64)),
    ])
}

#[wasm_bindgen]
impl WebEngine {
    /// Loads a GGUF model from `bytes`. `backend`: "webgpu", "cpu" (specrej-candle compiled
    /// to wasm32), or "auto" (WebGPU when the browser has an adapter, else the CPU).
    /// `subgroups`: use the subgroup variants of the shaders when the adapter offers them.
    pub async fn load(
        bytes: Vec<u8>,
        backend: String,
        subgroups: bool,
    ) -> Result<WebEngine, JsValue> {
        std::panic::set_hook(Box::new(|info| {
            // A panic aborts the module: say why on the console first.
            web_log(&format!("specrej-web panicked: {info}"));
        }));
        if !matches!(backend.as_str(), "webgpu" | "auto" | "cpu") {
            return Err(js_error(format!("unknown backend {backend:?} (webgpu, cpu, auto)")));
        }
        let meta = GgufMetadata::from_bytes(&bytes)
            .map_err(|e| js_error(format!("reading the GGUF header: {e}")))?;
        let tokenizer = Tokenizer::from_gguf(&meta)
            .map_err(|e| js_error(format!("building the tokenizer: {e}")))?;
        let template = ChatTemplate::from_gguf(&meta)
            .map_err(|e| js_error(format!("reading the chat template: {e}")))?;
        let name = meta.get_str("general.name").unwrap_or("model").to_string();
        let mut eos: Vec<u32> = tokenizer.eos_ids().to_vec();
        let mut info = vec![("model", JsValue::from_str(&name))];
        let gpu = if backend == "cpu" {
            None
        } else {
            let options = specrej_wgpu::Options { subgroups, ..specrej_wgpu::Options::default() };
            match WgpuModel::load(&bytes, &options).await {
                Ok(model) => Some(model),
                // "auto": no adapter (or the device failed) → the CPU.
                Err(e) if backend == "auto" => {
                    web_log(&format!(
                        "specrej-web: WebGPU unavailable ({e}); using the CPU engine"
                    ));
                    info.push(("fallbackReason", JsValue::from_str(&e.to_string())));
                    None
                }
                Err(e) => return Err(js_error(format!("loading the model on WebGPU: {e}"))),
            }
        };
        let backend = match gpu {
            Some(model) => {
                let adapter = model.adapter();
                let decoder =
                    WgpuDecoder::new(Arc::clone(&model), specrej_wgpu::DEFAULT_KV_BUDGET_BYTES);
                eos.extend(decoder.eos_token_ids());
                let config = model.config();
                // Browsers hide the name (specrej-wgpu says so): the page adds the browser's
                // vendor/architecture.
                let adapter_name = format!("{} ({})", adapter.name, adapter.device_type);
                info.extend([
                    ("backend", JsValue::from_str("webgpu")),
                    ("adapter", JsValue::from_str(&adapter_name)),
                    ("layers", JsValue::from_f64(config.layers as f64)),
                    ("vocab", JsValue::from_f64(config.vocab_size as f64)),
                    ("subgroups", JsValue::from_bool(model.uses_subgroups())),
                    ("weightBytes", JsValue::from_f64(model.weight_bytes() as f64)),
                    ("sync", JsValue::FALSE),
                ]);
                Backend::Gpu { model, decoder, judge: None, batches: HashMap::new() }
            }
            None => {
                let model = specrej_candle::load_gguf_bytes(
                    &bytes,
                    &specrej_candle::LoadOptions::default(),
                )
                .map_err(|e| js_error(format!("loading the model on the CPU: {e}")))?;
                let decoder =
                    CandleDecoder::new(Arc::clone(&model), specrej_candle::DEFAULT_KV_BUDGET_BYTES);
                eos.extend(decoder.eos_token_ids());
                let config = model.config();
                info.extend([
                    ("backend", JsValue::from_str("cpu")),
                    ("adapter", JsValue::from_str("CPU (wasm32, one thread)")),
                    ("layers", JsValue::from_f64(config.layers as f64)),
                    ("vocab", JsValue::from_f64(config.vocab_size as f64)),
                    ("subgroups", JsValue::FALSE),
                    ("sync", JsValue::TRUE),
                ]);
                Backend::Cpu { model, decoder, judge: None, batches: HashMap::new() }
            }
        };
        drop(bytes);
        eos.sort_unstable();
        eos.dedup();
        let state = State { tokenizer, template, backend, next_batch: 1, eos };
        Ok(WebEngine { state: Rc::new(RefCell::new(state)), info })
    }

    /// Runs every WGSL kernel on this browser's adapter against a host reference
    /// (`specrej_wgpu::diag`): a Promise of the report, one line per check. For diagnosing
    /// differences between the browser's WGSL compiler and naga; needs no model.
    #[wasm_bindgen(js_name = selfTest)]
    pub async fn self_test(subgroups: bool) -> Result<JsValue, JsValue> {
        let options = specrej_wgpu::Options { subgroups, ..specrej_wgpu::Options::default() };
        let report = specrej_wgpu::diag::run(&options).await.map_err(js_error)?;
        Ok(object(&[
            ("ok", JsValue::from_bool(report.ok())),
            ("report", JsValue::from_str(&report.to_string())),
        ]))
    }

    /// `{ backend, adapter, model, layers, vocab, subgroups, weightBytes?, sync, fallbackReason? }`.
    pub fn info(&self) -> JsValue {
        object(&self.info)
    }

    /// Sets the K/V budget, in cached tokens, for the next request (drops live batches).
    #[wasm_bindgen(js_name = setTokenCapacity)]
    pub fn set_token_capacity(&self, tokens: f64) {
        let mut s = self.state.borrow_mut();
        let tokens = tokens.max(1.0) as usize;
        match &mut s.backend {
            Backend::Gpu { model, decoder, batches, .. } => {
                batches.clear();
                let bytes = tokens.saturating_mul(decoder.kv_bytes_per_token());
                *decoder = WgpuDecoder::new(Arc::clone(model), bytes);
            }
            Backend::Cpu { model, decoder, batches, .. } => {
                batches.clear();
                let bytes = tokens.saturating_mul(decoder.kv_bytes_per_token());
                *decoder = CandleDecoder::new(Arc::clone(model), bytes);
            }
        }
    }

    #[wasm_bindgen(js_name = tokenCapacity)]
    pub fn token_capacity(&self) -> f64 {
        match &self.state.borrow().backend {
            Backend::Gpu { decoder, .. } => decoder.token_capacity() as f64,
            Backend::Cpu { decoder, .. } => decoder.token_capacity() as f64,
        }
    }

    #[wasm_bindgen(js_name = kvBytesPerToken)]
    pub fn kv_bytes_per_token(&self) -> f64 {
        match &self.state.borrow().backend {
            Backend::Gpu { decoder, .. } => decoder.kv_bytes_per_token() as f64,
            Backend::Cpu { decoder, .. } => decoder.kv_bytes_per_token() as f64,
        }
    }

    /// `{ sharedPrompt, block }`: how the engine holds a batch's K/V.
    #[wasm_bindgen(js_name = kvLayout)]
    pub fn kv_layout(&self) -> JsValue {
        let layout = match &self.state.borrow().backend {
            Backend::Gpu { decoder, .. } => decoder.kv_layout(),
            Backend::Cpu { decoder, .. } => decoder.kv_layout(),
        };
        let out = Object::new();
        let _ = Reflect::set(&out, &"sharedPrompt".into(), &layout.shared_prompt.into());
        let _ = Reflect::set(&out, &"block".into(), &(layout.block as f64).into());
        out.into()
    }

    #[wasm_bindgen(js_name = maxSequenceLen)]
    pub fn max_sequence_len(&self) -> f64 {
        match &self.state.borrow().backend {
            Backend::Gpu { decoder, .. } => decoder.max_sequence_len() as f64,
            Backend::Cpu { decoder, .. } => decoder.max_sequence_len() as f64,
        }
    }

    /// The chat prompt for `user` as token ids (template rendered, BOS added if the model
    /// wants one); also prepares the judge (the reward) for this question.
    #[wasm_bindgen(js_name = chatPrompt)]
    pub fn chat_prompt(&self, user: &str) -> Result<Uint32Array, JsValue> {
        if user.trim().is_empty() {
            return Err(js_error("the prompt is empty"));
        }
        let mut s = self.state.borrow_mut();
        let text = s
            .template
            .render(&[Message::user(user)], true)
            .map_err(|e| js_error(format!("rendering the chat template: {e}")))?;
        let mut ids =
            s.tokenizer.encode(&text, false).map_err(|e| js_error(format!("tokenizing: {e}")))?;
        if let Some(bos) = s.tokenizer.bos().filter(|_| s.tokenizer.adds_bos())
            && ids.first() != Some(&bos)
        {
            ids.insert(0, bos);
        }
        let segments = judge_segments(&s.tokenizer, &s.template, user)
            .map_err(|e| js_error(format!("judge prompt: {e}")))?;
        let (before, after, yes, no) = (segments.before, segments.after, segments.yes, segments.no);
        match &mut s.backend {
            Backend::Gpu { model, judge, .. } => {
                *judge = Some(WgpuJudgeScorer::new(Arc::clone(model), before, after, yes, no));
            }
            Backend::Cpu { model, judge, .. } => {
                // Incremental, as the CLI's default `--rescore incremental`.
                *judge =
                    Some(JudgeScorer::new(Arc::clone(model), before, after, yes, no).incremental());
            }
        }
        Ok(Uint32Array::from(&ids[..]))
    }

    /// End-of-sequence ids (tokenizer's and model file's).
    #[wasm_bindgen(js_name = eosTokens)]
    pub fn eos_tokens(&self) -> Uint32Array {
        Uint32Array::from(&self.state.borrow().eos[..])
    }

    /// Text of `tokens` (special tokens skipped).
    pub fn decode(&self, tokens: &[u32]) -> String {
        let s = self.state.borrow();
        s.tokenizer.decode(tokens, true).unwrap_or_else(|e| format!("<undecodable: {e}>"))
    }

    /// Prefills `prompt` once for rows `start..end`; returns a batch id.
    #[allow(
        clippy::too_many_arguments,
        reason = "a wasm-bindgen export: JS passes plain numbers, not a struct"
    )]
    pub fn prefill(
        &self,
        prompt: &[u32],
        start: u32,
        end: u32,
        seed: u64,
        temperature: f32,
        top_k: u32,
        top_p: f32,
    ) -> Result<u32, JsValue> {
        if prompt.is_empty() || end <= start {
            return Err(js_error(format!("prefill: empty prompt or row range {start}..{end}")));
        }
        let mut s = self.state.borrow_mut();
        let sampling = Sampling { seed, temperature, top_k: top_k as usize, top_p };
        let id = s.next_batch;
        match &mut s.backend {
            Backend::Gpu { decoder, batches, .. } => {
                let batch =
                    decoder.prefill(prompt, start..end, &sampling).map_err(backend_error)?;
                batches.insert(id, batch);
            }
            Backend::Cpu { decoder, batches, .. } => {
                let batch =
                    decoder.prefill(prompt, start..end, &sampling).map_err(backend_error)?;
                batches.insert(id, batch);
            }
        }
        s.next_batch += 1;
        Ok(id)
    }

    /// One decode step of batch `id`: a Promise of the sampled tokens (Uint32Array).
    pub fn step(&self, id: u32) -> js_sys::Promise {
        if matches!(self.state.borrow().backend, Backend::Cpu { .. }) {
            return match self.step_now(id) {
                Ok(tokens) => js_sys::Promise::resolve(&JsValue::from(tokens)),
                Err(e) => js_sys::Promise::reject(&e),
            };
        }
        let state = Rc::clone(&self.state);
        future_to_promise(async move {
            // Take the batch and the decoder out while the step is pending, so no borrow
            // spans the await.
            let (mut batch, mut decoder) = {
                let mut s = state.borrow_mut();
                let Backend::Gpu { model, decoder, batches, .. } = &mut s.backend else {
                    return Err(js_error("step: the backend changed"));
                };
                let batch =
                    batches.remove(&id).ok_or_else(|| js_error(format!("no batch {id}")))?;
                // A stand-in while the real decoder is lent to the pending step (never used).
                let placeholder = WgpuDecoder::new(Arc::clone(model), 0);
                (batch, std::mem::replace(decoder, placeholder))
            };
            let result = decoder.step(&mut batch).await;
            {
                let mut s = state.borrow_mut();
                if let Backend::Gpu { decoder: slot, batches, .. } = &mut s.backend {
                    *slot = decoder;
                    batches.insert(id, batch);
                }
            }
            let tokens = result.map_err(backend_error)?;
            Ok(Uint32Array::from(&tokens[..]).into())
        })
    }

    /// One decode step of batch `id`, synchronously (the CPU backend only; WebGPU reads back
    /// asynchronously and must use `step`).
    #[wasm_bindgen(js_name = stepNow)]
    pub fn step_now(&self, id: u32) -> Result<Uint32Array, JsValue> {
        let mut s = self.state.borrow_mut();
        let Backend::Cpu { decoder, batches, .. } = &mut s.backend else {
            return Err(js_error("stepNow: only the CPU engine steps synchronously (use step)"));
        };
        let batch = batches.get_mut(&id).ok_or_else(|| js_error(format!("no batch {id}")))?;
        let tokens = block_on_ready(decoder.step(batch)).map_err(backend_error)?;
        Ok(Uint32Array::from(&tokens[..]))
    }

    /// Keeps the rows at positions `keep` of batch `id`.
    pub fn retain(&self, id: u32, keep: &[u32]) -> Result<(), JsValue> {
        let mut s = self.state.borrow_mut();
        let keep: Vec<usize> = keep.iter().map(|&k| k as usize).collect();
        let no_batch = || js_error(format!("no batch {id}"));
        match &mut s.backend {
            Backend::Gpu { decoder, batches, .. } => {
                let batch = batches.get_mut(&id).ok_or_else(no_batch)?;
                decoder.retain(batch, &keep).map_err(backend_error)
            }
            Backend::Cpu { decoder, batches, .. } => {
                let batch = batches.get_mut(&id).ok_or_else(no_batch)?;
                decoder.retain(batch, &keep).map_err(backend_error)
            }
        }
    }

    /// Appends rows to batch `id`: row `ids[i]` continues from the row at `parents[i]`.
    pub fn fork(&self, id: u32, parents: &[u32], ids: &[u32]) -> Result<(), JsValue> {
        if parents.len() != ids.len() {
            return Err(js_error(format!("fork: {} parents for {} ids", parents.len(), ids.len())));
        }
        let children: Vec<(usize, u32)> =
            parents.iter().zip(ids).map(|(&p, &i)| (p as usize, i)).collect();
        let mut s = self.state.borrow_mut();
        let no_batch = || js_error(format!("no batch {id}"));
        match &mut s.backend {
            Backend::Gpu { decoder, batches, .. } => decoder
                .fork(batches.get_mut(&id).ok_or_else(no_batch)?, &children)
                .map_err(backend_error),
            Backend::Cpu { decoder, batches, .. } => decoder
                .fork(batches.get_mut(&id).ok_or_else(no_batch)?, &children)
                .map_err(backend_error),
        }
    }

    /// Frees batch `id`.
    #[wasm_bindgen(js_name = dropBatch)]
    pub fn drop_batch(&self, id: u32) {
        match &mut self.state.borrow_mut().backend {
            Backend::Gpu { batches, .. } => {
                batches.remove(&id);
            }
            Backend::Cpu { batches, .. } => {
                batches.remove(&id);
            }
        }
    }

    /// Judge rewards for the responses `tokens` (concatenated; `lengths[i]` tokens for
    /// `rows[i]`): a Promise of `{ rewards: Float32Array, tokensProcessed: number }`.
    pub fn score(
        &self,
        prompt: Vec<u32>,
        rows: Vec<u32>,
        lengths: Vec<u32>,
        tokens: Vec<u32>,
    ) -> js_sys::Promise {
        if matches!(self.state.borrow().backend, Backend::Cpu { .. }) {
            return match self.score_now(prompt, rows, lengths, tokens) {
                Ok(scored) => js_sys::Promise::resolve(&scored),
                Err(e) => js_sys::Promise::reject(&e),
            };
        }
        let state = Rc::clone(&self.state);
        future_to_promise(async move {
            let responses = split_responses(&rows, &lengths, &tokens)?;
            let mut judge = {
                let mut s = state.borrow_mut();
                let Backend::Gpu { judge, .. } = &mut s.backend else {
                    return Err(js_error("score: the backend changed"));
                };
                judge.take().ok_or_else(|| js_error("score: no judge (call chatPrompt first)"))?
            };
            let result = judge.score(&prompt, &responses).await;
            if let Backend::Gpu { judge: slot, .. } = &mut state.borrow_mut().backend {
                *slot = Some(judge);
            }
            Ok(scored_object(&result.map_err(backend_error)?))
        })
    }

    /// `score`, synchronously (the CPU backend only).
    #[wasm_bindgen(js_name = scoreNow)]
    pub fn score_now(
        &self,
        prompt: Vec<u32>,
        rows: Vec<u32>,
        lengths: Vec<u32>,
        tokens: Vec<u32>,
    ) -> Result<JsValue, JsValue> {
        let responses = split_responses(&rows, &lengths, &tokens)?;
        let mut s = self.state.borrow_mut();
        let Backend::Cpu { judge, .. } = &mut s.backend else {
            return Err(js_error("scoreNow: only the CPU engine scores synchronously (use score)"));
        };
        let judge =
            judge.as_mut().ok_or_else(|| js_error("score: no judge (call chatPrompt first)"))?;
        let scored = block_on_ready(judge.score(&prompt, &responses)).map_err(backend_error)?;
        Ok(scored_object(&scored))
    }

    /// Rows `children[i]` were forked from `parents[i]` (row ids).
    pub fn forked(&self, parents: &[u32], children: &[u32]) {
        let pairs: Vec<(u32, u32)> =
            parents.iter().copied().zip(children.iter().copied()).collect();
        match &mut self.state.borrow_mut().backend {
            Backend::Gpu { judge: Some(judge), .. } => judge.fork(&pairs),
            Backend::Cpu { judge: Some(judge), .. } => judge.fork(&pairs),
            _ => {}
        }
    }

    /// The scheduler will not ask about these rows again.
    pub fn release(&self, rows: &[u32]) {
        match &mut self.state.borrow_mut().backend {
            Backend::Gpu { judge: Some(judge), .. } => judge.release(rows),
            Backend::Cpu { judge: Some(judge), .. } => judge.release(rows),
            _ => {}
        }
    }
}

#[wasm_bindgen]
extern "C" {
    #[wasm_bindgen(js_namespace = console, js_name = error)]
    fn web_log(message: &str);
}
