//! Byte sizes as people write them (`64MiB`, `1 GiB`, `512KB`), parsed the same way by the
//! broker's settings (flags, `SYNCLINE_*` variables, TOML) and by the `syncline` CLI. No wire
//! meaning: it lives here because both binaries depend on this crate.
//!
//! A size is a number and an optional unit, with optional space between them:
//! - no unit or `B`: bytes (a plain integer still means bytes);
//! - `KiB`, `MiB`, `GiB`, `TiB`: powers of 1024 (what the broker's `--help` prints);
//! - `KB`, `MB`, `GB`, `TB`: powers of 1000 (SI, as `syncline bench` reports MB/s).
//!
//! Units are case-insensitive (`64mib`); a bare `K`, `M`, `G` or `T` is refused as ambiguous
//! (1000 or 1024?), naming both spellings. The number may have a fraction (`1.5GiB`) when the
//! result is a whole number of bytes.

/// Why a size could not be parsed. The message quotes the input and says what is accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid size `{input}`: {reason}")]
pub struct SizeError {
    /// The text given.
    pub input: String,
    /// What is wrong with it.
    pub reason: String,
}

/// What is accepted, for error messages and help texts.
pub const SIZE_SYNTAX: &str = "a number of bytes, optionally with a unit: B, KiB, MiB, GiB, TiB \
(powers of 1024) or KB, MB, GB, TB (powers of 1000), e.g. 64MiB";

fn error(input: &str, reason: impl Into<String>) -> SizeError {
    SizeError {
        input: input.to_string(),
        reason: reason.into(),
    }
}

/// Parses a size in bytes, e.g. `1048576`, `64MiB`, `1 GiB`, `500MB`, `1.5KiB`.
pub fn parse_size(input: &str) -> Result<u64, SizeError> {
    let text = input.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = (&text[..split], text[split..].trim());
    let multiplier: u128 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "k" | "m" | "g" | "t" => {
            let upper = unit.to_ascii_uppercase();
            return Err(error(
                input,
                format!(
                    "`{unit}` is ambiguous: write {upper}iB (1024-based) or {upper}B (1000-based)"
                ),
            ));
        }
        _ => {
            return Err(error(
                input,
                format!("unknown unit `{unit}`; use {SIZE_SYNTAX}"),
            ))
        }
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    // At most 12 fraction digits: 10^12 * TiB still fits a u128 with room to spare.
    if whole.is_empty() && fraction.is_empty()
        || fraction.contains('.')
        || fraction.len() > 12
        || !whole
            .bytes()
            .chain(fraction.bytes())
            .all(|b| b.is_ascii_digit())
    {
        return Err(error(input, format!("expected {SIZE_SYNTAX}")));
    }
    let too_large = || error(input, format!("larger than {} bytes", u64::MAX));
    let whole: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| too_large())?
    };
    let scale = 10u128.pow(fraction.len() as u32);
    let fraction: u128 = if fraction.is_empty() {
        0
    } else {
        fraction.parse().map_err(|_| too_large())?
    };
    let scaled = whole
        .checked_mul(scale)
        .and_then(|w| w.checked_add(fraction))
        .and_then(|n| n.checked_mul(multiplier))
        .ok_or_else(too_large)?;
    if scaled % scale != 0 {
        return Err(error(input, "not a whole number of bytes"));
    }
    u64::try_from(scaled / scale).map_err(|_| too_large())
}

/// [`parse_size`] for settings where a negative number means "no limit" (`-1`): a leading `-`
/// negates the size.
pub fn parse_signed_size(input: &str) -> Result<i64, SizeError> {
    let text = input.trim();
    let (negative, magnitude) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let bytes = parse_size(magnitude).map_err(|e| error(input, e.reason))?;
    let bytes =
        i64::try_from(bytes).map_err(|_| error(input, format!("larger than {}", i64::MAX)))?;
    Ok(if negative { -bytes } else { bytes })
}

/// [`parse_size`] into a `u32` (settings and fields limited to 4 GiB - 1).
pub fn parse_size_u32(input: &str) -> Result<u32, SizeError> {
    let bytes = parse_size(input)?;
    u32::try_from(bytes).map_err(|_| error(input, format!("larger than {} bytes", u32::MAX)))
}

/// [`parse_size`] into a `usize`.
pub fn parse_size_usize(input: &str) -> Result<usize, SizeError> {
    let bytes = parse_size(input)?;
    usize::try_from(bytes).map_err(|_| error(input, format!("larger than {} bytes", usize::MAX)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_units_should_scale_by_1024_or_1000() {
        assert_eq!(parse_size("1048576"), Ok(1_048_576));
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("512B"), Ok(512));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("1 GiB"), Ok(1 << 30));
        assert_eq!(parse_size("64mib"), Ok(64 << 20));
        assert_eq!(parse_size("2TiB"), Ok(2 << 40));
        assert_eq!(parse_size("8KiB"), Ok(8192));
        assert_eq!(parse_size("500MB"), Ok(500_000_000));
        assert_eq!(parse_size("1kb"), Ok(1000));
        assert_eq!(parse_size("1.5KiB"), Ok(1536));
        assert_eq!(parse_size(" 3 GB "), Ok(3_000_000_000));
    }

    #[test]
    fn given_ambiguous_or_malformed_sizes_should_refuse_and_say_why() {
        let ambiguous = parse_size("64M").unwrap_err();
        assert!(
            ambiguous.to_string().contains("MiB") && ambiguous.to_string().contains("MB"),
            "{ambiguous}"
        );
        for bad in [
            "",
            "MiB",
            "64 furlongs",
            "1.2.3MiB",
            "-5",
            "0.3B",
            "1e6",
            "18446744073709551616",
        ] {
            let error = parse_size(bad).unwrap_err();
            assert!(error.to_string().contains(&format!("`{bad}`")), "{error}");
        }
        assert!(parse_size("20000000TiB").is_err(), "overflow is refused");
        assert!(parse_size_u32("4GiB").is_err());
        assert_eq!(parse_size_u32("8MiB"), Ok(8 << 20));
    }

    #[test]
    fn given_signed_sizes_should_keep_the_no_limit_sentinel() {
        assert_eq!(parse_signed_size("-1"), Ok(-1));
        assert_eq!(parse_signed_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_signed_size("-1KiB"), Ok(-1024));
        assert!(parse_signed_size("-").is_err());
    }
}
