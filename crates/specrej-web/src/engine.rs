//! `WebEngine`: the decoder component's `engine` import, in the browser (wasm32 only).

// wasm-bindgen's generated glue (exports, closures, ABI conversions) is `unsafe` by nature.
#![allow(unsafe_code)]

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use js_sys::{Float32Array, Object, Reflect, Uint32Array};
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::future_to_promise;

use specrej_core::{BackendError, Decoder, Response, Sampling, Scorer};
use specrej_text::{ChatTemplate, GgufMetadata, Message, Tokenizer, judge_segments};
use specrej_wgpu::{WgpuBatch, WgpuDecoder, WgpuJudgeScorer, WgpuModel};

/// Everything one loaded model needs; shared by the promises `step` and `score` return.
struct State {
    tokenizer: Tokenizer,
    template: ChatTemplate,
    model: Arc<WgpuModel>,
    decoder: WgpuDecoder,
    /// The judge for the current question (`chatPrompt` builds it).
    judge: Option<WgpuJudgeScorer>,
    batches: HashMap<u32, WgpuBatch>,
    next_batch: u32,
    eos: Vec<u32>,
}

/// The model on WebGPU plus its text layer. See `web/src/bridge.js` for the JS interface.
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

#[wasm_bindgen]
impl WebEngine {
    /// Loads a GGUF model from `bytes`. `backend`: "webgpu" or "auto" (WebGPU); "cpu" is
    /// refused with a message until a CPU engine exists for wasm32. `subgroups`: use the
    /// subgroup variants of the shaders when the adapter offers them.
    pub async fn load(
        bytes: Vec<u8>,
        backend: String,
        subgroups: bool,
    ) -> Result<WebEngine, JsValue> {
        std::panic::set_hook(Box::new(|info| {
            // A panic aborts the module: say why on the console first.
            web_log(&format!("specrej-web panicked: {info}"));
        }));
        match backend.as_str() {
            "webgpu" | "auto" => {}
            "cpu" => {
                return Err(js_error(
                    "the CPU engine is not available in this build: specrej-candle cannot load a GGUF from \
                     bytes on wasm32 yet. Use a browser with WebGPU (Chromium 113+), or the test double.",
                ));
            }
            other => {
                return Err(js_error(format!(
                    "unknown backend {other:?} (webgpu, cpu, auto)"
                )));
            }
        }
        let meta = GgufMetadata::from_bytes(&bytes)
            .map_err(|e| js_error(format!("reading the GGUF header: {e}")))?;
        let tokenizer = Tokenizer::from_gguf(&meta)
            .map_err(|e| js_error(format!("building the tokenizer: {e}")))?;
        let template = ChatTemplate::from_gguf(&meta)
            .map_err(|e| js_error(format!("reading the chat template: {e}")))?;
        let name = meta.get_str("general.name").unwrap_or("model").to_string();
        let options = specrej_wgpu::Options {
            subgroups,
            ..specrej_wgpu::Options::default()
        };
        let model = WgpuModel::load(&bytes, &options)
            .await
            .map_err(|e| js_error(format!("loading the model on WebGPU: {e}")))?;
        drop(bytes);
        let adapter = model.adapter();
        let mut eos: Vec<u32> = tokenizer.eos_ids().to_vec();
        let decoder = WgpuDecoder::new(Arc::clone(&model), specrej_wgpu::DEFAULT_KV_BUDGET_BYTES);
        for &id in decoder.eos_token_ids() {
            if !eos.contains(&id) {
                eos.push(id);
            }
        }
        let config = model.config();
        let info = vec![
            ("backend", JsValue::from_str("webgpu")),
            (
                "adapter",
                JsValue::from_str(&format!("{} ({})", adapter.name, adapter.device_type)),
            ),
            ("model", JsValue::from_str(&name)),
            ("layers", JsValue::from_f64(config.layers as f64)),
            ("vocab", JsValue::from_f64(config.vocab_size as f64)),
            ("subgroups", JsValue::from_bool(model.uses_subgroups())),
            (
                "weightBytes",
                JsValue::from_f64(model.weight_bytes() as f64),
            ),
            ("sync", JsValue::FALSE),
        ];
        let state = State {
            tokenizer,
            template,
            model,
            decoder,
            judge: None,
            batches: HashMap::new(),
            next_batch: 1,
            eos,
        };
        Ok(WebEngine {
            state: Rc::new(RefCell::new(state)),
            info,
        })
    }

    /// `{ backend, adapter, model, layers, vocab, subgroups, weightBytes, sync }`.
    pub fn info(&self) -> JsValue {
        object(&self.info)
    }

    /// Sets the K/V budget, in cached tokens, for the next request (drops live batches).
    #[wasm_bindgen(js_name = setTokenCapacity)]
    pub fn set_token_capacity(&self, tokens: f64) {
        let mut s = self.state.borrow_mut();
        let bytes = (tokens.max(1.0) as usize).saturating_mul(s.decoder.kv_bytes_per_token());
        s.batches.clear();
        s.decoder = WgpuDecoder::new(Arc::clone(&s.model), bytes);
    }

    #[wasm_bindgen(js_name = tokenCapacity)]
    pub fn token_capacity(&self) -> f64 {
        self.state.borrow().decoder.token_capacity() as f64
    }

    #[wasm_bindgen(js_name = kvBytesPerToken)]
    pub fn kv_bytes_per_token(&self) -> f64 {
        self.state.borrow().decoder.kv_bytes_per_token() as f64
    }

    #[wasm_bindgen(js_name = maxSequenceLen)]
    pub fn max_sequence_len(&self) -> f64 {
        self.state.borrow().decoder.max_sequence_len() as f64
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
        let mut ids = s
            .tokenizer
            .encode(&text, false)
            .map_err(|e| js_error(format!("tokenizing: {e}")))?;
        if let Some(bos) = s.tokenizer.bos().filter(|_| s.tokenizer.adds_bos())
            && ids.first() != Some(&bos)
        {
            ids.insert(0, bos);
        }
        let segments = judge_segments(&s.tokenizer, &s.template, user)
            .map_err(|e| js_error(format!("judge prompt: {e}")))?;
        let judge = WgpuJudgeScorer::new(
            Arc::clone(&s.model),
            segments.before,
            segments.after,
            segments.yes,
            segments.no,
        );
        s.judge = Some(judge);
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
        s.tokenizer
            .decode(tokens, true)
            .unwrap_or_else(|e| format!("<undecodable: {e}>"))
    }

    /// Prefills `prompt` once for rows `start..end`; returns a batch id.
    #[allow(clippy::too_many_arguments)]
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
            return Err(js_error(format!(
                "prefill: empty prompt or row range {start}..{end}"
            )));
        }
        let mut s = self.state.borrow_mut();
        let sampling = Sampling {
            seed,
            temperature,
            top_k: top_k as usize,
            top_p,
        };
        let batch = s
            .decoder
            .prefill(prompt, start..end, &sampling)
            .map_err(backend_error)?;
        let id = s.next_batch;
        s.next_batch += 1;
        s.batches.insert(id, batch);
        Ok(id)
    }

    /// One decode step of batch `id`: a Promise of the sampled tokens (Uint32Array).
    pub fn step(&self, id: u32) -> js_sys::Promise {
        let state = Rc::clone(&self.state);
        future_to_promise(async move {
            // Take the batch out while the step is pending, so no borrow spans the await.
            let mut batch = state
                .borrow_mut()
                .batches
                .remove(&id)
                .ok_or_else(|| js_error(format!("no batch {id}")))?;
            let placeholder = placeholder_decoder(&state);
            let mut decoder = std::mem::replace(&mut state.borrow_mut().decoder, placeholder);
            let result = decoder.step(&mut batch).await;
            {
                let mut s = state.borrow_mut();
                s.decoder = decoder;
                s.batches.insert(id, batch);
            }
            let tokens = result.map_err(backend_error)?;
            Ok(Uint32Array::from(&tokens[..]).into())
        })
    }

    /// Keeps the rows at positions `keep` of batch `id`.
    pub fn retain(&self, id: u32, keep: &[u32]) -> Result<(), JsValue> {
        let mut s = self.state.borrow_mut();
        let State {
            decoder, batches, ..
        } = &mut *s;
        let batch = batches
            .get_mut(&id)
            .ok_or_else(|| js_error(format!("no batch {id}")))?;
        let keep: Vec<usize> = keep.iter().map(|&k| k as usize).collect();
        decoder.retain(batch, &keep).map_err(backend_error)
    }

    /// Frees batch `id`.
    #[wasm_bindgen(js_name = dropBatch)]
    pub fn drop_batch(&self, id: u32) {
        self.state.borrow_mut().batches.remove(&id);
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
        let state = Rc::clone(&self.state);
        future_to_promise(async move {
            let mut judge = state
                .borrow_mut()
                .judge
                .take()
                .ok_or_else(|| js_error("score: no judge (call chatPrompt first)"))?;
            let mut at = 0usize;
            let mut slices = Vec::with_capacity(rows.len());
            for &len in &lengths {
                let end = at + len as usize;
                let slice = tokens
                    .get(at..end)
                    .ok_or_else(|| js_error("score: lengths exceed tokens"))?;
                slices.push(slice);
                at = end;
            }
            let responses: Vec<Response<'_>> = rows
                .iter()
                .zip(&slices)
                .map(|(&row, tokens)| Response { row, tokens })
                .collect();
            let result = judge.score(&prompt, &responses).await;
            state.borrow_mut().judge = Some(judge);
            let scored = result.map_err(backend_error)?;
            Ok(object(&[
                ("rewards", Float32Array::from(&scored.rewards[..]).into()),
                (
                    "tokensProcessed",
                    JsValue::from_f64(scored.tokens_processed as f64),
                ),
            ]))
        })
    }

    /// The scheduler will not ask about these rows again.
    pub fn release(&self, rows: &[u32]) {
        if let Some(judge) = self.state.borrow_mut().judge.as_mut() {
            judge.release(rows);
        }
    }
}

/// A stand-in decoder while the real one is lent to a pending step (never used).
fn placeholder_decoder(state: &Rc<RefCell<State>>) -> WgpuDecoder {
    WgpuDecoder::new(Arc::clone(&state.borrow().model), 0)
}

#[wasm_bindgen]
extern "C" {
    #[wasm_bindgen(js_namespace = console, js_name = error)]
    fn web_log(message: &str);
}
