//! [`ChatTemplate`]: renders a model's Jinja chat template the way HF `transformers` does.

use std::fmt;

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::Result;
use crate::gguf::GgufMetadata;

/// The ChatML template, used when a model ships none.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `"system"`, `"user"`, `"assistant"`, ...
    pub role: String,
    /// The text.
    pub content: String,
}

impl Message {
    /// A message with any role.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message { role: role.into(), content: content.into() }
    }

    /// A system message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }

    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    /// An assistant message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// A compiled chat template.
///
/// Rendering follows HF `transformers`: `trim_blocks` and `lstrip_blocks` on, variables
/// `messages`, `add_generation_prompt`, `bos_token`, `eos_token` (and `tools`, `documents` as
/// none), the functions `raise_exception(msg)` and `strftime_now(format)` (UTC; a fixed date on
/// wasm32), a Python-compatible `tojson` filter, `length` of undefined/none = 0, `none is iterable` false as in Jinja2, the
/// `{% generation %}` tag of HF's assistant-mask extension (rendered as its content), and Python
/// string/dict methods (`.strip()`, `.startswith()`, `.items()`, ...) via
/// `minijinja_contrib::pycompat`.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

impl Clone for ChatTemplate {
    fn clone(&self) -> Self {
        // The source compiled once already, so it compiles again.
        Self::new(self.source.clone(), self.bos_token.clone(), self.eos_token.clone())
            .unwrap_or_else(|_| unreachable!("template compiled before"))
    }
}

/// Template instructions one render may run: real chat templates take a few thousand over a
/// long conversation; ~0.1 s of work at most.
pub const TEMPLATE_FUEL: u64 = 5_000_000;

impl ChatTemplate {
    /// Compiles `source` with the given `bos_token` / `eos_token` strings.
    pub fn new(
        source: impl Into<String>,
        bos_token: impl Into<String>,
        eos_token: impl Into<String>,
    ) -> Result<Self> {
        let source = source.into();
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        // A template comes from a model file: a loop that never ends is an error, not a hang.
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_filter("length", length);
        env.add_filter("count", length);
        env.add_test("iterable", is_iterable);
        env.add_template_owned("chat", rewrite_generation_tags(&source))?;
        Ok(ChatTemplate { env, source, bos_token: bos_token.into(), eos_token: eos_token.into() })
    }

    /// The ChatML template (the fallback when a model has none).
    pub fn chatml() -> Self {
        Self::new(CHATML_TEMPLATE, "", "<|im_end|>")
            .unwrap_or_else(|_| unreachable!("the ChatML template compiles"))
    }

    /// The template in GGUF metadata (`tokenizer.chat_template`), or ChatML when absent.
    ///
    /// `bos_token`/`eos_token` are the strings of `tokenizer.ggml.bos_token_id`/`eos_token_id`.
    pub fn from_gguf(meta: &GgufMetadata) -> Result<Self> {
        let token = |key: &str| -> String {
            let id = meta.get_u32(key);
            let tokens = meta.get_array("tokenizer.ggml.tokens");
            match (id, tokens) {
                (Some(id), Some(t)) => {
                    t.get(id as usize).and_then(|v| v.as_str()).unwrap_or_default().to_owned()
                }
                _ => String::new(),
            }
        };
        let bos = token("tokenizer.ggml.bos_token_id");
        let eos = token("tokenizer.ggml.eos_token_id");
        match meta.get_str("tokenizer.chat_template") {
            Some(src) => Self::new(src, bos, eos),
            None => Self::new(CHATML_TEMPLATE, bos, eos),
        }
    }

    /// The template in a HF `tokenizer_config.json` (`chat_template`: a string, or a list of
    /// `{name, template}` where `"default"` is taken), or ChatML when absent.
    pub fn from_tokenizer_config(config_json: &[u8]) -> Result<Self> {
        let cfg: serde_json::Value = serde_json::from_slice(config_json)?;
        let token = |key: &str| -> String {
            match cfg.get(key) {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(serde_json::Value::Object(o)) => {
                    o.get("content").and_then(|v| v.as_str()).unwrap_or_default().to_owned()
                }
                _ => String::new(),
            }
        };
        let source = match cfg.get("chat_template") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .or_else(|| list.first())
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .unwrap_or(CHATML_TEMPLATE)
                .to_owned(),
            _ => CHATML_TEMPLATE.to_owned(),
        };
        Self::new(source, token("bos_token"), token("eos_token"))
    }

    /// Renders `messages`; with `add_generation_prompt`, ends with the assistant turn's start.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self.env.get_template("chat")?;
        Ok(tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
            // HF passes these as None when there are none.
            tools => Value::from(()),
            documents => Value::from(()),
        })?)
    }

    /// The template's Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The `bos_token` string the template sees.
    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    /// The `eos_token` string the template sees.
    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }
}

/// `is iterable` as in Jinja2: false for none (minijinja iterates none as empty).
fn is_iterable(v: &Value) -> bool {
    !v.is_none() && v.try_iter().is_ok()
}

/// `length` that gives 0 for undefined (as Jinja2 does) and for none (where Jinja2 fails).
fn length(v: &Value) -> Result<usize, minijinja::Error> {
    if v.is_undefined() || v.is_none() { Ok(0) } else { minijinja::filters::length(v) }
}

/// Rewrites HF's `{% generation %}`/`{% endgeneration %}` (assistant-mask markers, no output of
/// their own) to `{% if true %}`/`{% endif %}`, keeping whitespace control.
fn rewrite_generation_tags(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        // The closing `%}` after the opening `{%` (in `{%}` they overlap: that is no tag).
        let Some(end) = tag[2..].find("%}").map(|e| e + 2) else {
            break;
        };
        let inner = &tag[2..end];
        let body = inner.trim_start_matches(['-', '+']).trim_end_matches(['-', '+']);
        let replacement = match body.trim() {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        match replacement {
            Some(r) => {
                let lead = &inner[..inner.len() - inner.trim_start_matches(['-', '+']).len()];
                let trail = &inner[inner.trim_end_matches(['-', '+']).len()..];
                out.push_str("{%");
                out.push_str(lead);
                out.push(' ');
                out.push_str(r);
                out.push(' ');
                out.push_str(trail);
                out.push_str("%}");
            }
            None => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

/// HF's `strftime_now(format)`: the current UTC time (a fixed date on wasm32, which has no
/// clock), formatted with the common `strftime` directives.
fn strftime_now(format: &str) -> Result<String, minijinja::Error> {
    #[cfg(not(target_arch = "wasm32"))]
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    // 26 Jul 2024, the default date of Llama 3.x templates.
    #[cfg(target_arch = "wasm32")]
    let secs = 1_721_952_000i64;
    strftime(format, secs)
}

/// Formats a Unix time (UTC) with the `strftime` directives templates use.
fn strftime(format: &str, secs: i64) -> Result<String, minijinja::Error> {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] =
        ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    let (h, mi, se) = (tod / 3600, tod % 3600 / 60, tod % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy_mar = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy_mar + 2) / 153;
    let d = doy_mar - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let cum = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cum[(m - 1) as usize] + d + i64::from(leap && m > 2);
    let month = MONTHS[(m - 1) as usize];
    let day = DAYS[weekday];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let piece = match chars.next() {
            Some('Y') => y.to_string(),
            Some('y') => format!("{:02}", y.rem_euclid(100)),
            Some('m') => format!("{m:02}"),
            Some('d') => format!("{d:02}"),
            Some('e') => format!("{d:2}"),
            Some('B') => month.to_owned(),
            Some('b') | Some('h') => month[..3].to_owned(),
            Some('A') => day.to_owned(),
            Some('a') => day[..3].to_owned(),
            Some('H') => format!("{h:02}"),
            Some('I') => format!("{:02}", if h % 12 == 0 { 12 } else { h % 12 }),
            Some('p') => (if h < 12 { "AM" } else { "PM" }).to_owned(),
            Some('M') => format!("{mi:02}"),
            Some('S') => format!("{se:02}"),
            Some('j') => format!("{yday:03}"),
            Some('F') => format!("{y}-{m:02}-{d:02}"),
            Some('%') => "%".to_owned(),
            other => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!(
                        "strftime_now: unsupported directive %{}",
                        other.map(String::from).unwrap_or_default()
                    ),
                ));
            }
        };
        out.push_str(&piece);
    }
    Ok(out)
}

fn raise_exception(msg: String) -> Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

/// `tojson` as HF defines it: Python's `json.dumps(x, ensure_ascii=False, indent=indent,
/// separators=separators, sort_keys=sort_keys)` (so `", "`/`": "` separators by default, no HTML
/// escaping, insertion order kept).
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, minijinja::Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match v.kind() {
            ValueKind::String => Some(v.as_str().unwrap_or_default().to_owned()),
            _ => Some(" ".repeat(usize::try_from(v)?)),
        },
    };
    let (item_sep, key_sep) = match separators {
        Some(v) if !v.is_none() && !v.is_undefined() => {
            let parts: Vec<String> = v
                .try_iter()?
                .map(|p| p.as_str().map(str::to_owned))
                .collect::<Option<_>>()
                .ok_or_else(|| {
                    minijinja::Error::new(ErrorKind::InvalidOperation, "separators must be strings")
                })?;
            match <[String; 2]>::try_from(parts) {
                Ok([a, b]) => (a, b),
                Err(_) => {
                    return Err(minijinja::Error::new(
                        ErrorKind::InvalidOperation,
                        "separators must be a pair",
                    ));
                }
            }
        }
        _ if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        _ => (", ".to_owned(), ": ".to_owned()),
    };
    let mut out = String::new();
    let fmt = PyJson {
        indent: indent.as_deref(),
        item_sep: &item_sep,
        key_sep: &key_sep,
        sort_keys: sort_keys.unwrap_or(false),
    };
    fmt.write(value, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

/// Writes JSON the way Python's `json.dumps` does.
struct PyJson<'a> {
    indent: Option<&'a str>,
    item_sep: &'a str,
    key_sep: &'a str,
    sort_keys: bool,
}

impl PyJson<'_> {
    fn newline(&self, level: usize, out: &mut String) {
        if let Some(ind) = self.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(ind);
            }
        }
    }

    fn write(&self, v: &Value, level: usize, out: &mut String) -> Result<(), minijinja::Error> {
        match v.kind() {
            ValueKind::Undefined | ValueKind::None => out.push_str("null"),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter()?.collect();
                if items.is_empty() {
                    out.push_str("[]");
                    return Ok(());
                }
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(self.item_sep);
                    }
                    self.newline(level + 1, out);
                    self.write(item, level + 1, out)?;
                }
                self.newline(level, out);
                out.push(']');
            }
            ValueKind::Map => {
                let mut entries: Vec<(String, Value)> = Vec::new();
                for key in v.try_iter()? {
                    let item = v.get_item(&key)?;
                    // Python's json.dumps turns non-string keys into strings.
                    let key = key.as_str().map_or_else(|| key.to_string(), str::to_owned);
                    entries.push((key, item));
                }
                if entries.is_empty() {
                    out.push_str("{}");
                    return Ok(());
                }
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(&b.0));
                }
                out.push('{');
                for (i, (k, item)) in entries.iter().enumerate() {
                    if i > 0 {
                        out.push_str(self.item_sep);
                    }
                    self.newline(level + 1, out);
                    out.push_str(&json_scalar(&k.as_str())?);
                    out.push_str(self.key_sep);
                    self.write(item, level + 1, out)?;
                }
                self.newline(level, out);
                out.push('}');
            }
            // Strings (no ASCII escaping, like ensure_ascii=False), numbers, bools.
            _ => out.push_str(&json_scalar(v)?),
        }
        Ok(())
    }
}

fn json_scalar<T: Serialize + ?Sized>(v: &T) -> Result<String, minijinja::Error> {
    serde_json::to_string(v).map_err(|e| {
        minijinja::Error::new(ErrorKind::InvalidOperation, "cannot serialize to JSON")
            .with_source(e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;

    fn render_src(src: &str) -> String {
        let t = ChatTemplate::new(src, "<s>", "</s>").expect("compiles");
        t.render(&[Message::user("hi")], true).expect("renders")
    }

    #[test]
    fn overlapping_tag_delimiters_are_an_error_not_a_panic() {
        // Found by `specrej-fuzz` (fuzz/regressions/template/): `{%}` once panicked here.
        for src in ["{%}", "{%}}{% endif %}", "x{%}%}"] {
            let rendered = ChatTemplate::new(src, "<s>", "</s>")
                .and_then(|t| t.render(&[Message::user("hi")], true));
            let error = rendered.expect_err(src).to_string();
            assert!(!error.is_empty() && !error.contains('\n'), "{src}: one line: {error:?}");
        }
    }

    #[test]
    fn a_template_that_never_ends_runs_out_of_fuel() {
        let src =
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}";
        let t = ChatTemplate::new(src, "<s>", "</s>").expect("compiles");
        // 10^10 iterations: without the fuel this never returns.
        let e = t.render(&[Message::user("hi")], true).expect_err("out of fuel");
        assert!(e.to_string().contains("fuel"), "{e}");
    }

    #[test]
    fn chatml_fallback() {
        let t = ChatTemplate::chatml();
        let s = t.render(&[Message::system("sys"), Message::user("hello")], true).expect("renders");
        assert_eq!(
            s,
            "<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
        );
        let s = t.render(&[Message::user("x")], false).expect("renders");
        assert_eq!(s, "<|im_start|>user\nx<|im_end|>\n");
    }

    #[test]
    fn python_methods_and_filters() {
        assert_eq!(
            render_src(
                "{{ messages[0]['content'].upper() }}|{{ '  a  '.strip() }}|{{ 'abc'.startswith('ab') }}|{{ ' x ' | trim }}"
            ),
            "HI|a|True|x"
        );
        assert_eq!(render_src("{{ bos_token }}{{ eos_token }}"), "<s></s>");
    }

    #[test]
    fn trim_and_lstrip_blocks() {
        let src = "{% for m in messages %}\n  {% if true %}\n[{{ m.content }}]\n  {% endif %}\n{% endfor %}";
        assert_eq!(render_src(src), "[hi]\n");
    }

    #[test]
    fn raise_exception_fails_render() {
        let t = ChatTemplate::new("{{ raise_exception('Roles must alternate') }}", "", "")
            .expect("compiles");
        let err = t.render(&[], false).expect_err("raises");
        assert!(err.to_string().contains("Roles must alternate"), "{err}");
    }

    #[test]
    fn tojson_like_python() {
        assert_eq!(
            render_src(r#"{{ {"b": 1, "a": [1, 2.5, "é<>"], "c": {}} | tojson }}"#),
            r#"{"b": 1, "a": [1, 2.5, "é<>"], "c": {}}"#
        );
        assert_eq!(
            render_src(r#"{{ {"b": 1, "a": [1]} | tojson(indent=2) }}"#),
            "{\n  \"b\": 1,\n  \"a\": [\n    1\n  ]\n}"
        );
        assert_eq!(
            render_src(r#"{{ {"b": 1, "a": null} | tojson(sort_keys=true) }}"#),
            r#"{"a": null, "b": 1}"#
        );
        assert_eq!(
            render_src(r#"{{ messages | tojson }}"#),
            r#"[{"role": "user", "content": "hi"}]"#
        );
    }

    #[test]
    fn from_tokenizer_config_variants() {
        let cfg = br#"{"chat_template": "{{ bos_token }}{{ messages[0].content }}", "bos_token": {"content": "<s>"}, "eos_token": "</s>"}"#;
        let t = ChatTemplate::from_tokenizer_config(cfg).expect("loads");
        assert_eq!(t.render(&[Message::user("q")], false).expect("renders"), "<s>q");
        assert_eq!(t.eos_token(), "</s>");
        let cfg = br#"{"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}"#;
        let t = ChatTemplate::from_tokenizer_config(cfg).expect("loads");
        assert_eq!(t.source(), "D");
        let t = ChatTemplate::from_tokenizer_config(b"{}").expect("loads");
        assert_eq!(t.source(), CHATML_TEMPLATE);
    }

    #[test]
    fn strftime_formats() {
        // 2024-02-29 13:05:09 UTC, a Thursday.
        let t = 1_709_211_909;
        assert_eq!(
            strftime("%Y-%m-%d %H:%M:%S|%d %b %Y|%B %e, %y|%A %a %j %I%p %%", t).expect("fmt"),
            "2024-02-29 13:05:09|29 Feb 2024|February 29, 24|Thursday Thu 060 01PM %"
        );
        assert_eq!(strftime("%F", 0).expect("fmt"), "1970-01-01");
        assert!(strftime("%Q", 0).is_err());
        let today = render_src("{{ strftime_now('%Y') }}");
        assert_eq!(today.len(), 4);
    }

    #[test]
    fn generation_tags_and_lenient_length() {
        assert_eq!(
            render_src(
                "{%- generation -%} A {%- endgeneration %}|{% generation %}B{% endgeneration %}"
            ),
            "A|B"
        );
        assert_eq!(
            render_src("{{ nothing | length }}|{{ messages | length }}|{{ tools is none }}"),
            "0|1|True"
        );
    }

    #[test]
    fn bad_template_is_an_error() {
        let err = ChatTemplate::new("{% for %}", "", "").expect_err("syntax error");
        assert!(matches!(err, Error::Template(_)));
    }
}
