//! Durations ("250ms", "1m30s") and sizes (bytes or "64KiB").
//!
//! Both return a complete, user-facing message on error (quoting the bad value),
//! so the config reader can report it as is.

use std::time::Duration;

/// Parses a duration such as `"250ms"`, `"2s"` or `"1m30s"` (humantime syntax).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|err| format!("invalid duration {text:?}: {err}"))
}

/// Size units: decimal (1000-based) and binary (1024-based), matched without
/// regard to case so `"64kib"` and `"64KiB"` agree.
const UNITS: &[(&str, u64)] = &[
    ("B", 1),
    ("KB", 1000),
    ("MB", 1000 * 1000),
    ("GB", 1000 * 1000 * 1000),
    ("KiB", 1024),
    ("MiB", 1024 * 1024),
    ("GiB", 1024 * 1024 * 1024),
];

/// Parses a size in bytes: `"65536"`, `"64KiB"`, `"1 MB"`. Units are B, KB, MB, GB
/// (1000-based) and KiB, MiB, GiB (1024-based).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let digits_end = trimmed
        .find(|c: char| !c.is_ascii_digit() && c != '_')
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(digits_end);
    let number: String = number.chars().filter(|&c| c != '_').collect();
    if number.is_empty() {
        return Err(format!(
            "invalid size {text:?}: expected bytes or a number with a unit like \"64KiB\""
        ));
    }
    let unit = unit.trim();
    let multiplier = if unit.is_empty() {
        1
    } else {
        UNITS
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(unit))
            .map(|&(_, multiplier)| multiplier)
            .ok_or_else(|| {
                format!(
                    "invalid size {text:?}: unknown unit {unit:?} (use B, KB, MB, GB, KiB, MiB or GiB)"
                )
            })?
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(multiplier))
        .ok_or_else(|| format!("invalid size {text:?}: too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(
            parse_duration("2"),
            Err("invalid duration \"2\": time unit needed, for example 2sec or 2ms".to_string())
        );
        assert!(parse_duration("").is_err());
        assert!(parse_duration("fast").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("64KiB"), Ok(64 * 1024));
        assert_eq!(parse_size("64 KiB"), Ok(64 * 1024));
        assert_eq!(parse_size("64kib"), Ok(64 * 1024));
        assert_eq!(parse_size("64KB"), Ok(64_000));
        assert_eq!(parse_size("10B"), Ok(10));
        assert_eq!(parse_size("2MB"), Ok(2_000_000));
        assert_eq!(parse_size("2MiB"), Ok(2 * 1024 * 1024));
        assert_eq!(parse_size("1GB"), Ok(1_000_000_000));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("1_000KB"), Ok(1_000_000));
    }

    #[test]
    fn bad_sizes() {
        assert_eq!(
            parse_size("64KQ"),
            Err(
                "invalid size \"64KQ\": unknown unit \"KQ\" (use B, KB, MB, GB, KiB, MiB or GiB)"
                    .to_string()
            )
        );
        assert_eq!(
            parse_size("KiB"),
            Err(
                "invalid size \"KiB\": expected bytes or a number with a unit like \"64KiB\""
                    .to_string()
            )
        );
        assert!(parse_size("-1").is_err());
        assert!(parse_size("1.5MiB").is_err());
        assert_eq!(
            parse_size("99999999999999GiB"),
            Err("invalid size \"99999999999999GiB\": too large".to_string())
        );
    }
}
