//! Prompt sets: a JSON array of strings or of objects with "prompt" or "instruction" (plus
//! an optional "input", appended after a blank line), or JSON Lines of either.

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// The default set: the 100 AlpacaFarm prompts of the paper (see `data/README.md`).
pub const ALPACA_FARM_100: &str = include_str!("../../data/alpaca_farm_100.json");

/// Parses a prompt file's text; `source` names it in errors.
pub fn parse(text: &str, source: &str) -> Result<Vec<String>> {
    let trimmed = text.trim_start();
    let values: Vec<Value> = if trimmed.starts_with('[') {
        match serde_json::from_str::<Value>(text) {
            Ok(Value::Array(items)) => items,
            Ok(_) => bail!("{source}: expected a JSON array"),
            Err(error) => bail!("{source}: not valid JSON: {error}"),
        }
    } else {
        text.lines()
            .enumerate()
            .filter(|(_, line)| !line.trim().is_empty())
            .map(|(i, line)| {
                serde_json::from_str(line)
                    .with_context(|| format!("{source}: line {} is not JSON", i + 1))
            })
            .collect::<Result<_>>()?
    };
    let mut prompts = Vec::with_capacity(values.len());
    for (i, value) in values.iter().enumerate() {
        let prompt = match value {
            Value::String(s) => s.clone(),
            Value::Object(map) => {
                let main =
                    map.get("prompt").or_else(|| map.get("instruction")).and_then(Value::as_str);
                let Some(main) = main else {
                    bail!("{source}: item {} has no string \"prompt\" or \"instruction\"", i + 1);
                };
                match map.get("input").and_then(Value::as_str).filter(|s| !s.trim().is_empty()) {
                    Some(input) => format!("{main}\n\n{input}"),
                    None => main.to_string(),
                }
            }
            _ => bail!("{source}: item {} is neither a string nor an object", i + 1),
        };
        if prompt.trim().is_empty() {
            bail!("{source}: item {} is an empty prompt", i + 1);
        }
        prompts.push(prompt);
    }
    if prompts.is_empty() {
        bail!("{source}: no prompts");
    }
    Ok(prompts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_set_has_100_prompts() {
        let prompts = parse(ALPACA_FARM_100, "default").expect("parses");
        assert_eq!(prompts.len(), 100);
        assert!(prompts.iter().all(|p| !p.trim().is_empty()));
    }

    #[test]
    fn parses_arrays_objects_and_jsonl() {
        assert_eq!(parse(r#"["a", "b"]"#, "t").expect("ok"), ["a", "b"]);
        assert_eq!(
            parse(r#"[{"prompt": "a"}, {"instruction": "b", "input": "c"}, {"instruction": "d", "input": ""}]"#, "t")
                .expect("ok"),
            ["a", "b\n\nc", "d"]
        );
        assert_eq!(parse("{\"prompt\": \"a\"}\n\n\"b\"\n", "t").expect("ok"), ["a", "b"]);
    }

    #[test]
    fn rejects_bad_files() {
        assert!(parse("[]", "t").is_err());
        assert!(parse("[1]", "t").is_err());
        assert!(parse(r#"[{"text": "a"}]"#, "t").is_err());
        assert!(parse(r#"[" "]"#, "t").is_err());
        assert!(parse("{\"prompt\": \"a\"}\nnot json", "t").is_err());
        assert!(parse("[\"a\"", "t").is_err());
    }
}
