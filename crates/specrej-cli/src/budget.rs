//! `--kv-budget`: bytes (`2GiB`, `512MB`, `1000000`) or tokens (`20000tok`).

use std::fmt;
use std::str::FromStr;

/// A KV-cache budget as the user wrote it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvBudget {
    /// Size the budget from the request (see `generate --help`).
    Auto,
    /// Bytes of K/V cache.
    Bytes(u64),
    /// Cached tokens (rows × positions).
    Tokens(u64),
}

impl fmt::Display for KvBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KvBudget::Auto => f.write_str("auto"),
            KvBudget::Bytes(b) => write!(f, "{b} bytes"),
            KvBudget::Tokens(t) => write!(f, "{t} tokens"),
        }
    }
}

impl FromStr for KvBudget {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("auto") {
            return Ok(KvBudget::Auto);
        }
        let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let value: f64 = number.parse().map_err(|_| {
            format!("{text:?} is not a KV budget: expected e.g. 2GiB, 512MB, 20000tok or auto")
        })?;
        let unit = unit.trim().to_ascii_lowercase();
        let scale: f64 = match unit.as_str() {
            "tok" | "tokens" | "t" => {
                return whole(value, text).map(KvBudget::Tokens);
            }
            "" | "b" => 1.0,
            "k" | "kb" => 1e3,
            "kib" => 1024.0,
            "m" | "mb" => 1e6,
            "mib" => 1024.0 * 1024.0,
            "g" | "gb" => 1e9,
            "gib" => 1024.0 * 1024.0 * 1024.0,
            other => {
                return Err(format!(
                    "unknown unit {other:?} in KV budget {text:?} (use B, KB, KiB, MB, MiB, GB, GiB or tok)"
                ));
            }
        };
        whole(value * scale, text).map(KvBudget::Bytes)
    }
}

fn whole(value: f64, text: &str) -> Result<u64, String> {
    if value.is_finite() && value >= 1.0 {
        Ok(value as u64)
    } else {
        Err(format!("KV budget {text:?} must be at least 1"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bytes_tokens_and_auto() {
        assert_eq!("2GiB".parse(), Ok(KvBudget::Bytes(2 << 30)));
        assert_eq!("512 MB".parse(), Ok(KvBudget::Bytes(512_000_000)));
        assert_eq!("1000".parse(), Ok(KvBudget::Bytes(1000)));
        assert_eq!("1.5kib".parse(), Ok(KvBudget::Bytes(1536)));
        assert_eq!("20000tok".parse(), Ok(KvBudget::Tokens(20_000)));
        assert_eq!("auto".parse(), Ok(KvBudget::Auto));
        assert!("".parse::<KvBudget>().is_err());
        assert!("12 parsecs".parse::<KvBudget>().is_err());
        assert!("0tok".parse::<KvBudget>().is_err());
    }
}
