//! The OpenAI-compatible request and response documents, and the `specrej` extension.
//!
//! Requests are read field by field from a `serde_json::Value` so that every error names
//! its field (`param`). Fields the server does not know are ignored (OpenAI clients send
//! many); fields it knows must have the right type and range; the `specrej` object is
//! ours, so an unknown key there is an error.

use serde_json::{Map, Value, json};
use specrej_core::{Finish, Method, Outcome, Rules};
use specrej_text::Message;

use crate::model::RewardKind;

/// An error answer: `{"error": {"message", "type", "param", "code"}}` with an HTTP status.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// What is wrong, for people.
    pub message: String,
    /// `invalid_request_error`, `not_found_error`, `server_error`, ...
    pub kind: &'static str,
    /// The request field at fault, if one is.
    pub param: Option<String>,
    /// A machine-readable code, if any.
    pub code: Option<&'static str>,
}

impl ApiError {
    /// A 400 about `param`.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.into()),
            code: None,
        }
    }

    /// A 400 about the request as a whole.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: None,
        }
    }

    /// Any status, no field.
    pub fn status(status: u16, kind: &'static str, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), kind, param: None, code: None }
    }

    /// With a machine-readable code.
    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        json!({ "error": { "message": self.message, "type": self.kind, "param": self.param, "code": self.code } })
    }
}

/// Which endpoint a request came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`.
    Chat,
    /// `POST /v1/completions`.
    Completions,
}

/// The prompt as the client gave it.
#[derive(Clone, Debug, PartialEq)]
pub enum Prompt {
    /// Chat messages (the chat template applies).
    Chat(Vec<Message>),
    /// Raw text (`/v1/completions`).
    Text(String),
}

impl Prompt {
    /// The user's question, for the judge: the last user message, or the raw text.
    pub fn question(&self) -> &str {
        match self {
            Prompt::Chat(messages) => messages
                .iter()
                .rev()
                .find(|m| m.role == "user")
                .or(messages.last())
                .map_or("", |m| m.content.as_str()),
            Prompt::Text(text) => text,
        }
    }
}

/// A validated generation request.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateRequest {
    /// The endpoint.
    pub endpoint: Endpoint,
    /// The prompt.
    pub prompt: Prompt,
    /// Best-of-N: the answers. Speculative Rejection: the most rows to start with.
    pub n: usize,
    /// The algorithm.
    pub method: Method,
    /// The reward model.
    pub reward: RewardKind,
    /// New tokens per answer at most.
    pub max_tokens: usize,
    /// Speculative Rejection: tokens every row generates before the first decision.
    pub min_new_tokens: usize,
    /// Sampling temperature (0 = greedy).
    pub temperature: f32,
    /// Nucleus mass.
    pub top_p: f32,
    /// Top-k cut (0 = none).
    pub top_k: usize,
    /// Seed of the sampling noise.
    pub seed: u64,
    /// Server-sent events.
    pub stream: bool,
    /// Every candidate as a choice (default), or only the winner.
    pub return_candidates: bool,
    /// Speculative Rejection's decision rules (`specrej.rules`).
    pub rules: Rules,
}

/// Server-side limits a request is checked against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestLimits {
    /// Largest `n`.
    pub max_n: usize,
    /// Largest `max_tokens`.
    pub max_tokens: usize,
    /// `max_tokens` when the request gives none.
    pub default_max_tokens: usize,
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self { max_n: 64, max_tokens: 2048, default_max_tokens: 256 }
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Field readers over one JSON object, with the prefix for `param` names.
struct Fields<'a> {
    object: &'a Map<String, Value>,
    prefix: &'static str,
}

impl Fields<'_> {
    fn param(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// The value of `key`, `None` if absent or null.
    fn get(&self, key: &str) -> Option<&Value> {
        self.object.get(key).filter(|v| !v.is_null())
    }

    fn integer(&self, key: &str, min: u64, max: u64) -> Result<Option<u64>, ApiError> {
        let Some(value) = self.get(key) else { return Ok(None) };
        let param = self.param(key);
        let number = match value {
            Value::Number(n) => n,
            other => {
                return Err(ApiError::invalid(
                    &param,
                    format!("{param} must be an integer, got {}", type_name(other)),
                ));
            }
        };
        let Some(v) = number.as_u64() else {
            return Err(ApiError::invalid(
                &param,
                format!("{param} must be a non-negative integer, got {number}"),
            ));
        };
        if v < min || v > max {
            return Err(ApiError::invalid(
                &param,
                format!("{param} must be between {min} and {max}, got {v}"),
            ));
        }
        Ok(Some(v))
    }

    fn number(&self, key: &str) -> Result<Option<f64>, ApiError> {
        let Some(value) = self.get(key) else { return Ok(None) };
        let param = self.param(key);
        match value.as_f64() {
            Some(v) if v.is_finite() => Ok(Some(v)),
            _ => Err(ApiError::invalid(
                &param,
                format!("{param} must be a number, got {}", type_name(value)),
            )),
        }
    }

    fn boolean(&self, key: &str) -> Result<Option<bool>, ApiError> {
        let Some(value) = self.get(key) else { return Ok(None) };
        let param = self.param(key);
        value.as_bool().map(Some).ok_or_else(|| {
            ApiError::invalid(
                &param,
                format!("{param} must be a boolean, got {}", type_name(value)),
            )
        })
    }

    fn string(&self, key: &str) -> Result<Option<&str>, ApiError> {
        let Some(value) = self.get(key) else { return Ok(None) };
        let param = self.param(key);
        value.as_str().map(Some).ok_or_else(|| {
            ApiError::invalid(&param, format!("{param} must be a string, got {}", type_name(value)))
        })
    }
}

/// Parses and validates a request body for `endpoint`; `rewards` are the names
/// `specrej.reward` may take ([`crate::Served::reward_names`]: `judge`, `likelihood` and the
/// server's own reward models).
pub fn parse_request(
    endpoint: Endpoint,
    body: &[u8],
    limits: &RequestLimits,
    rewards: &[&str],
) -> Result<GenerateRequest, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))?;
    let Value::Object(object) = &value else {
        return Err(ApiError::bad_request(format!(
            "the body must be a JSON object, got {}",
            type_name(&value)
        )));
    };
    let top = Fields { object, prefix: "" };
    top.string("model")?;

    let prompt = match endpoint {
        Endpoint::Chat => Prompt::Chat(parse_messages(top.get("messages"))?),
        Endpoint::Completions => Prompt::Text(parse_prompt(top.get("prompt"))?),
    };

    let max_n = limits.max_n as u64;
    let n_top = top.integer("n", 1, max_n).map_err(|e| zero_hint(e, top.get("n")))?;
    let max_tokens_limit = limits.max_tokens as u64;
    let max_tokens = match top.integer("max_completion_tokens", 1, max_tokens_limit)? {
        Some(v) => Some(v),
        None => top.integer("max_tokens", 1, max_tokens_limit)?,
    };
    let temperature = top.number("temperature")?;
    if let Some(t) = temperature
        && !(0.0..=2.0).contains(&t)
    {
        return Err(ApiError::invalid(
            "temperature",
            format!("temperature must be between 0 and 2, got {t}"),
        ));
    }
    let top_p = top.number("top_p")?;
    if let Some(p) = top_p
        && !(p > 0.0 && p <= 1.0)
    {
        return Err(ApiError::invalid("top_p", format!("top_p must be in (0, 1], got {p}")));
    }
    let seed = top.integer("seed", 0, u64::MAX)?;
    let stream = top.boolean("stream")?.unwrap_or(false);
    let mut top_k = top.integer("top_k", 0, 1 << 20)?;

    // The extension object.
    let mut method_name = None;
    let mut alpha = None;
    let mut n_ext = None;
    let mut reward = RewardKind::Judge;
    let mut return_candidates = true;
    let mut min_new_tokens = None;
    let mut rules = Rules::default();
    if let Some(ext) = top.get("specrej") {
        let Value::Object(ext_object) = ext else {
            return Err(ApiError::invalid(
                "specrej",
                format!("specrej must be an object, got {}", type_name(ext)),
            ));
        };
        const KNOWN: &[&str] = &[
            "method",
            "n",
            "alpha",
            "reward",
            "return_candidates",
            "min_new_tokens",
            "top_k",
            "rules",
        ];
        if let Some(key) = ext_object.keys().find(|k| !KNOWN.contains(&k.as_str())) {
            return Err(ApiError::invalid(
                format!("specrej.{key}"),
                format!("unknown field specrej.{key}; known: {}", KNOWN.join(", ")),
            ));
        }
        let ext = Fields { object: ext_object, prefix: "specrej." };
        method_name = match ext.string("method")? {
            None => None,
            Some("best_of_n" | "bon") => Some("best_of_n"),
            Some("speculative_rejection" | "sr") => Some("speculative_rejection"),
            Some(other) => {
                return Err(ApiError::invalid(
                    "specrej.method",
                    format!(
                        "specrej.method must be \"best_of_n\" or \"speculative_rejection\", got {other:?}"
                    ),
                ));
            }
        };
        n_ext = ext.integer("n", 1, max_n).map_err(|e| zero_hint(e, ext.get("n")))?;
        alpha = ext.number("alpha")?;
        // As an f32 too: 0.99999999 is 1.0 there.
        if let Some(a) = alpha
            && !((0.0..1.0).contains(&a) && (a as f32) < 1.0)
        {
            return Err(ApiError::invalid(
                "specrej.alpha",
                format!("specrej.alpha must be in [0, 1), got {a}"),
            ));
        }
        reward = match ext.string("reward")? {
            None | Some("judge") => RewardKind::Judge,
            Some("partial_judge") => RewardKind::PartialJudge,
            Some("likelihood") => RewardKind::Likelihood,
            Some(name) if rewards.contains(&name) => RewardKind::Named(name.to_owned()),
            Some(other) => {
                let known: Vec<String> = rewards.iter().map(|n| format!("{n:?}")).collect();
                return Err(ApiError::invalid(
                    "specrej.reward",
                    format!(
                        "specrej.reward must be one of this server's reward models ({}), got {other:?}",
                        known.join(", ")
                    ),
                ));
            }
        };
        return_candidates = ext.boolean("return_candidates")?.unwrap_or(true);
        min_new_tokens = ext.integer("min_new_tokens", 1, max_tokens_limit)?;
        if let Some(r) = ext.get("rules") {
            rules = parse_rules(r)?;
        }
        if let Some(k) = ext.integer("top_k", 0, 1 << 20)? {
            top_k = Some(k);
        }
    }
    if let (Some(a), Some(b)) = (n_top, n_ext)
        && a != b
    {
        return Err(ApiError::invalid(
            "specrej.n",
            format!("n ({a}) and specrej.n ({b}) disagree: give one"),
        ));
    }
    let n = n_ext.or(n_top).unwrap_or(1) as usize;
    let method = match (method_name, alpha) {
        (Some("best_of_n"), Some(_)) => {
            return Err(ApiError::invalid(
                "specrej.alpha",
                "specrej.alpha applies to speculative_rejection only",
            ));
        }
        (Some("best_of_n"), None) | (None, None) => Method::BestOfN,
        _ => Method::SpeculativeRejection { alpha: alpha.unwrap_or(0.5) as f32 },
    };
    let max_tokens = max_tokens.map_or(limits.default_max_tokens, |v| v as usize);
    Ok(GenerateRequest {
        endpoint,
        prompt,
        n,
        method,
        reward,
        max_tokens,
        min_new_tokens: min_new_tokens.map_or(32, |v| v as usize).min(max_tokens),
        temperature: temperature.unwrap_or(1.0) as f32,
        top_p: top_p.unwrap_or(1.0) as f32,
        top_k: top_k.map_or(50, |v| v as usize),
        seed: seed.unwrap_or(0),
        stream,
        return_candidates,
        rules,
    })
}

/// `specrej.rules`: `paper_exact`, `probe_lag`, `gate_tau`, `adaptive_snr`, `refill`
/// (`specrej_core::Rules`).
fn parse_rules(value: &Value) -> Result<Rules, ApiError> {
    let Value::Object(object) = value else {
        return Err(ApiError::invalid(
            "specrej.rules",
            format!("specrej.rules must be an object, got {}", type_name(value)),
        ));
    };
    const KNOWN: &[&str] = &["paper_exact", "probe_lag", "gate_tau", "adaptive_snr", "refill"];
    if let Some(key) = object.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(ApiError::invalid(
            format!("specrej.rules.{key}"),
            format!("unknown field specrej.rules.{key}; known: {}", KNOWN.join(", ")),
        ));
    }
    let f = Fields { object, prefix: "specrej.rules." };
    let paper_exact = f.boolean("paper_exact")?.unwrap_or(false);
    let gate_tau = f.number("gate_tau")?;
    if let Some(t) = gate_tau
        && !(-1.0..=1.0).contains(&t)
    {
        return Err(ApiError::invalid(
            "specrej.rules.gate_tau",
            format!("specrej.rules.gate_tau must be in [-1, 1], got {t}"),
        ));
    }
    let adaptive_snr = f.number("adaptive_snr")?;
    if let Some(x) = adaptive_snr
        && !(x > 0.0 && (x as f32).is_finite())
    {
        return Err(ApiError::invalid(
            "specrej.rules.adaptive_snr",
            format!("specrej.rules.adaptive_snr must be positive, got {x}"),
        ));
    }
    let refill = f.number("refill")?;
    if let Some(x) = refill
        && !(x >= 0.0 && (x as f32).is_finite())
    {
        return Err(ApiError::invalid(
            "specrej.rules.refill",
            format!("specrej.rules.refill must be 0 or positive, got {x}"),
        ));
    }
    let probing = gate_tau.is_some() || adaptive_snr.is_some();
    let probe_lag =
        f.integer("probe_lag", 1, 1 << 20)?.map_or(if probing { 16 } else { 0 }, |v| v as usize);
    if paper_exact && (probing || refill.is_some()) {
        return Err(ApiError::invalid(
            "specrej.rules.paper_exact",
            "specrej.rules.paper_exact is the reference code's rules: it does not combine with gate_tau, adaptive_snr or refill",
        ));
    }
    Ok(Rules {
        paper_exact,
        probe_lag: if probing { probe_lag } else { 0 },
        gate_tau: gate_tau.map(|t| t as f32),
        adaptive_snr: adaptive_snr.map(|x| x as f32),
        refill: refill.map(|x| x as f32),
    })
}

/// `n: 0` gets its own message.
fn zero_hint(error: ApiError, value: Option<&Value>) -> ApiError {
    if value.and_then(Value::as_u64) == Some(0) {
        let param = error.param.clone().unwrap_or_default();
        return ApiError::invalid(&param, format!("{param} must be at least 1"));
    }
    error
}

fn parse_messages(value: Option<&Value>) -> Result<Vec<Message>, ApiError> {
    let Some(value) = value else {
        return Err(ApiError::invalid("messages", "messages is required"));
    };
    let Value::Array(items) = value else {
        return Err(ApiError::invalid(
            "messages",
            format!("messages must be an array, got {}", type_name(value)),
        ));
    };
    if items.is_empty() {
        return Err(ApiError::invalid("messages", "messages must not be empty"));
    }
    let mut messages = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let param = format!("messages[{i}]");
        let Value::Object(object) = item else {
            return Err(ApiError::invalid(
                &param,
                format!("{param} must be an object, got {}", type_name(item)),
            ));
        };
        let role = match object.get("role") {
            Some(Value::String(role))
                if ["system", "developer", "user", "assistant"].contains(&role.as_str()) =>
            {
                if role == "developer" { "system".to_string() } else { role.clone() }
            }
            Some(other) => {
                return Err(ApiError::invalid(
                    format!("{param}.role"),
                    format!(
                        "{param}.role must be \"system\", \"user\" or \"assistant\", got {other}"
                    ),
                ));
            }
            None => {
                return Err(ApiError::invalid(
                    format!("{param}.role"),
                    format!("{param}.role is required"),
                ));
            }
        };
        let content = match object.get("content") {
            Some(Value::String(text)) => text.clone(),
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for (j, part) in parts.iter().enumerate() {
                    match (
                        part.get("type").and_then(Value::as_str),
                        part.get("text").and_then(Value::as_str),
                    ) {
                        (Some("text"), Some(t)) => text.push_str(t),
                        _ => {
                            return Err(ApiError::invalid(
                                format!("{param}.content[{j}]"),
                                "only {\"type\": \"text\", \"text\": ...} content parts are supported",
                            ));
                        }
                    }
                }
                text
            }
            Some(Value::Null) | None => String::new(),
            Some(other) => {
                return Err(ApiError::invalid(
                    format!("{param}.content"),
                    format!(
                        "{param}.content must be a string or an array of text parts, got {}",
                        type_name(other)
                    ),
                ));
            }
        };
        messages.push(Message::new(role, content));
    }
    if messages.iter().all(|m| m.content.trim().is_empty()) {
        return Err(ApiError::invalid(
            "messages",
            "the prompt is empty: every message's content is blank",
        ));
    }
    Ok(messages)
}

fn parse_prompt(value: Option<&Value>) -> Result<String, ApiError> {
    let text = match value {
        None => return Err(ApiError::invalid("prompt", "prompt is required")),
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(items)) if items.len() == 1 && items[0].is_string() => {
            items[0].as_str().unwrap_or_default().to_string()
        }
        Some(Value::Array(_)) => {
            return Err(ApiError::invalid(
                "prompt",
                "prompt must be a string (or an array of exactly one string)",
            ));
        }
        Some(other) => {
            return Err(ApiError::invalid(
                "prompt",
                format!("prompt must be a string, got {}", type_name(other)),
            ));
        }
    };
    if text.trim().is_empty() {
        return Err(ApiError::invalid("prompt", "the prompt is empty"));
    }
    Ok(text)
}

/// OpenAI's `finish_reason` for a row.
pub fn finish_reason(finish: Finish) -> &'static str {
    match finish {
        Finish::Eos => "stop",
        Finish::Length | Finish::Capacity => "length",
    }
}

fn finish_name(finish: Finish) -> &'static str {
    match finish {
        Finish::Eos => "eos",
        Finish::Length => "length",
        Finish::Capacity => "kv_budget",
    }
}

/// The method's name in the API.
pub fn method_name(method: Method) -> &'static str {
    match method {
        Method::BestOfN => "best_of_n",
        Method::SpeculativeRejection { .. } => "speculative_rejection",
    }
}

/// Everything a response document needs besides the outcome.
#[derive(Clone, Copy, Debug)]
pub struct ResponseContext<'a> {
    /// `chatcmpl-…` / `cmpl-…`.
    pub id: &'a str,
    /// Unix seconds.
    pub created: u64,
    /// The model's id.
    pub model: &'a str,
    /// The request.
    pub request: &'a GenerateRequest,
    /// The KV budget the request ran with, in tokens.
    pub kv_budget_tokens: usize,
}

/// The non-streaming response document (also the streamed `winner` event's data).
pub fn response_document(
    ctx: &ResponseContext<'_>,
    outcome: &Outcome,
    decode: &dyn Fn(&[u32]) -> String,
) -> Value {
    let request = ctx.request;
    let shown = if request.return_candidates { outcome.candidates.len() } else { 1 };
    let choices: Vec<Value> = outcome
        .candidates
        .iter()
        .take(shown)
        .enumerate()
        .map(|(index, c)| {
            let text = decode(&c.tokens);
            let ext = json!({ "row": c.row, "score": finite(c.score), "tokens": c.tokens.len(), "finish": finish_name(c.finish) });
            match request.endpoint {
                Endpoint::Chat => json!({
                    "index": index,
                    "message": { "role": "assistant", "content": text },
                    "finish_reason": finish_reason(c.finish),
                    "logprobs": null,
                    "specrej": ext,
                }),
                Endpoint::Completions => json!({
                    "index": index,
                    "text": text,
                    "finish_reason": finish_reason(c.finish),
                    "logprobs": null,
                    "specrej": ext,
                }),
            }
        })
        .collect();
    let s = &outcome.stats;
    let trace: Vec<Value> = outcome
        .trace
        .iter()
        .map(|d| {
            json!({
                "position": d.position, "live_rows": d.live_rows, "kept_rows": d.kept_rows,
                "min": finite(d.min), "median": finite(d.median), "max": finite(d.max),
                "threshold": finite(d.threshold), "early": d.early,
            })
        })
        .collect();
    let rejected: Vec<Value> = outcome
        .rejected
        .iter()
        .map(|r| {
            let mut v = json!({ "row": r.row, "score": finite(r.score), "tokens": r.tokens.len() });
            if request.return_candidates {
                v["text"] = Value::String(decode(&r.tokens));
            }
            v
        })
        .collect();
    let mut ext = json!({
        "method": method_name(request.method),
        "n": request.n,
        "reward": request.reward.name(),
        "winner_row": outcome.winner().row,
        "kv_budget_tokens": ctx.kv_budget_tokens,
    });
    if let Method::SpeculativeRejection { alpha } = request.method {
        ext["alpha"] = json!(alpha);
    }
    json!({
        "id": ctx.id,
        "object": match request.endpoint { Endpoint::Chat => "chat.completion", Endpoint::Completions => "text_completion" },
        "created": ctx.created,
        "model": ctx.model,
        "choices": choices,
        "usage": {
            "prompt_tokens": s.prompt_tokens,
            "completion_tokens": s.tokens_generated,
            "total_tokens": s.prompt_tokens + s.tokens_generated,
            "tokens_generated": s.tokens_generated,
            "prefill_tokens": s.prefill_tokens,
            "reward_tokens": s.reward_tokens,
            "reward_calls": s.reward_calls,
            "steps": s.steps,
            "initial_rows": s.initial_rows,
            "batches": s.batches,
            "peak_kv_bytes": s.peak_kv_bytes,
            "wall_seconds": s.wall_seconds,
            "prefill_seconds": s.prefill_seconds,
            "step_seconds": s.step_seconds,
            "reward_seconds": s.reward_seconds,
            "retain_seconds": s.retain_seconds,
            "rejected": rejected,
            "rejection_trace": trace,
        },
        "specrej": ext,
    })
}

/// JSON has no NaN or infinity: those become null.
fn finite(x: f32) -> Value {
    if x.is_finite() { json!(x) } else { Value::Null }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: &str) -> Result<GenerateRequest, ApiError> {
        parse_request(
            Endpoint::Chat,
            body.as_bytes(),
            &RequestLimits::default(),
            &["judge", "likelihood", "rm"],
        )
    }

    #[test]
    fn defaults_and_extension() {
        let r = chat(r#"{"messages":[{"role":"user","content":"hi"}]}"#).expect("valid");
        assert_eq!((r.n, r.method, r.max_tokens, r.stream), (1, Method::BestOfN, 256, false));
        let r = chat(r#"{"messages":[{"role":"user","content":"hi"}],"n":4,"max_tokens":8,
            "specrej":{"method":"speculative_rejection","alpha":0.25,"reward":"likelihood","return_candidates":false}}"#)
        .expect("valid");
        assert_eq!(r.n, 4);
        assert_eq!(r.method, Method::SpeculativeRejection { alpha: 0.25 });
        assert_eq!(
            (r.reward, r.return_candidates, r.max_tokens, r.min_new_tokens),
            (RewardKind::Likelihood, false, 8, 8)
        );
        let r = chat(r#"{"messages":[{"role":"user","content":"hi"}],"specrej":{"reward":"rm"}}"#)
            .expect("valid");
        assert_eq!(r.reward, RewardKind::Named("rm".into()));
    }

    #[test]
    fn an_unknown_reward_lists_the_known_ones() {
        let e = chat(
            r#"{"messages":[{"role":"user","content":"hi"}],"specrej":{"reward":"gpt-judge"}}"#,
        )
        .expect_err("unknown");
        assert_eq!((e.status, e.param.as_deref()), (400, Some("specrej.reward")));
        assert!(
            e.message.contains(r#"("judge", "likelihood", "rm"), got "gpt-judge""#),
            "{}",
            e.message
        );
    }

    #[test]
    fn errors_name_the_field() {
        let param = |body: &str| chat(body).expect_err("invalid").param;
        let m = r#""messages":[{"role":"user","content":"hi"}]"#;
        assert_eq!(chat("{not json").expect_err("invalid").status, 400);
        assert_eq!(param(&format!("{{{m},\"n\":0}}")).as_deref(), Some("n"));
        assert_eq!(param(&format!("{{{m},\"n\":-2}}")).as_deref(), Some("n"));
        assert_eq!(param(&format!("{{{m},\"n\":\"3\"}}")).as_deref(), Some("n"));
        assert_eq!(param(&format!("{{{m},\"max_tokens\":-1}}")).as_deref(), Some("max_tokens"));
        assert_eq!(
            param(&format!("{{{m},\"temperature\":\"hot\"}}")).as_deref(),
            Some("temperature")
        );
        assert_eq!(
            param(&format!("{{{m},\"specrej\":{{\"alpha\":1.0}}}}")).as_deref(),
            Some("specrej.alpha")
        );
        assert_eq!(
            param(&format!("{{{m},\"specrej\":{{\"alpha\":-0.1}}}}")).as_deref(),
            Some("specrej.alpha")
        );
        assert_eq!(
            param(&format!("{{{m},\"specrej\":{{\"bogus\":1}}}}")).as_deref(),
            Some("specrej.bogus")
        );
        assert_eq!(
            param(&format!("{{{m},\"specrej\":{{\"method\":\"beam\"}}}}")).as_deref(),
            Some("specrej.method")
        );
        assert_eq!(param(r#"{"messages":[]}"#).as_deref(), Some("messages"));
        assert_eq!(
            param(r#"{"messages":[{"role":"user","content":"  "}]}"#).as_deref(),
            Some("messages")
        );
        assert_eq!(
            param(r#"{"messages":[{"role":"robot","content":"x"}]}"#).as_deref(),
            Some("messages[0].role")
        );
        let completion = parse_request(
            Endpoint::Completions,
            br#"{"prompt":""}"#,
            &RequestLimits::default(),
            &["judge", "likelihood"],
        );
        assert_eq!(completion.expect_err("empty").param.as_deref(), Some("prompt"));
        // 0.99999999 is below 1 as a number, but 1.0 as the f32 the scheduler takes.
        assert_eq!(
            param(&format!("{{{m},\"specrej\":{{\"alpha\":0.99999999}}}}")).as_deref(),
            Some("specrej.alpha")
        );
        for (rules, field) in [
            (r#"{"gate_tau":2}"#, "specrej.rules.gate_tau"),
            (r#"{"adaptive_snr":0}"#, "specrej.rules.adaptive_snr"),
            (r#"{"refill":-1}"#, "specrej.rules.refill"),
            (r#"{"probe_lag":0,"gate_tau":0.5}"#, "specrej.rules.probe_lag"),
            (r#"{"paper_exact":true,"refill":0}"#, "specrej.rules.paper_exact"),
            (r#"{"patience":3}"#, "specrej.rules.patience"),
            (r#"[1]"#, "specrej.rules"),
        ] {
            assert_eq!(
                param(&format!("{{{m},\"specrej\":{{\"rules\":{rules}}}}}")).as_deref(),
                Some(field),
                "{rules}"
            );
        }
    }

    #[test]
    fn rules_and_the_partial_judge() {
        let r = chat(
            r#"{"messages":[{"role":"user","content":"hi"}],"specrej":{"method":"sr","reward":"partial_judge",
                "rules":{"gate_tau":0.4,"adaptive_snr":1.5,"refill":0.5}}}"#,
        )
        .expect("valid");
        assert_eq!(r.reward, RewardKind::PartialJudge);
        assert_eq!(
            r.rules,
            Rules {
                paper_exact: false,
                probe_lag: 16,
                gate_tau: Some(0.4),
                adaptive_snr: Some(1.5),
                refill: Some(0.5)
            }
        );
        let r = chat(r#"{"messages":[{"role":"user","content":"hi"}],"specrej":{"rules":{"paper_exact":true}}}"#).expect("valid");
        assert_eq!(r.rules, Rules { paper_exact: true, ..Rules::default() });
    }
}
