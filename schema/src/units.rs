//! Sizes and durations as people write them in job files.
//!
//! A size is a whole number of bytes, or a string with a unit: decimal units
//! (`KB`, `MB`, `GB`, `TB`, `PB`: powers of 1000) and binary ones (`KiB`,
//! `MiB`, `GiB`, `TiB`, `PiB`, also Kubernetes' `Ki`/`Mi`/`Gi`/`Ti`: powers
//! of 1024). A duration is a number of seconds, or a string such as `"90s"`,
//! `"1h30m"` or `"500ms"`. On the wire both are sent back as plain numbers
//! (bytes, seconds) so that every client can read them without our parser.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a size or duration string was refused; the message quotes the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    #[error("invalid size {0:?}: expected bytes as an integer or a number with a unit such as \"512MiB\", \"20 GB\" or \"123KB\"")]
    Size(String),
    #[error("invalid size {0:?}: unknown unit {1:?} (use B, KB, MB, GB, TB, PB, KiB, MiB, GiB, TiB or PiB)")]
    SizeUnit(String, String),
    #[error("invalid size {0:?}: too large")]
    SizeOverflow(String),
    #[error("invalid duration {0:?}: expected seconds as a number or a string such as \"90s\", \"1h30m\" or \"500ms\"")]
    Duration(String),
    #[error("invalid duration {0:?}: unknown unit {1:?} (use ms, s, m, h or d)")]
    DurationUnit(String, String),
}

/// A number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub const fn bytes(self) -> u64 {
        self.0
    }
    pub const fn gib(n: u64) -> Self {
        ByteSize(n << 30)
    }
    pub const fn mib(n: u64) -> Self {
        ByteSize(n << 20)
    }
}

fn size_multiplier(unit: &str) -> Option<u64> {
    let m = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1000,
        "mb" => 1000u64.pow(2),
        "gb" => 1000u64.pow(3),
        "tb" => 1000u64.pow(4),
        "pb" => 1000u64.pow(5),
        "kib" | "ki" => 1 << 10,
        "mib" | "mi" => 1 << 20,
        "gib" | "gi" => 1 << 30,
        "tib" | "ti" => 1 << 40,
        "pib" | "pi" => 1 << 50,
        _ => return None,
    };
    Some(m)
}

/// Splits "1.5 GiB" into ("1.5", "GiB"), trimming the space between.
fn split_number(s: &str) -> (&str, &str) {
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    (&s[..end], s[end..].trim())
}

/// Multiplies a decimal string by a unit without going through floating
/// point for whole numbers, so that "18446744073709551615" stays exact.
fn scale(number: &str, mult: u64) -> Option<u64> {
    if number.is_empty() || number.matches('.').count() > 1 || number == "." {
        return None;
    }
    match number.split_once('.') {
        None => number.parse::<u64>().ok()?.checked_mul(mult),
        Some((int, frac)) => {
            let int: u64 = if int.is_empty() { 0 } else { int.parse().ok()? };
            let whole = int.checked_mul(mult)?;
            let frac_value: f64 = format!("0.{frac}").parse().ok()?;
            let part = (frac_value * mult as f64).round();
            whole.checked_add(part as u64)
        }
    }
}

impl FromStr for ByteSize {
    type Err = UnitError;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        let s = raw.trim();
        let (number, unit) = split_number(s);
        if number.is_empty() {
            return Err(UnitError::Size(raw.to_string()));
        }
        let mult =
            size_multiplier(unit).ok_or_else(|| UnitError::SizeUnit(raw.into(), unit.into()))?;
        if number.parse::<f64>().is_err() {
            return Err(UnitError::Size(raw.to_string()));
        }
        scale(number, mult)
            .map(ByteSize)
            .ok_or_else(|| UnitError::SizeOverflow(raw.to_string()))
    }
}

impl fmt::Display for ByteSize {
    /// Shortest exact binary form ("24GiB"), else bytes, so that output can
    /// be pasted back into a job file unchanged.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u64); 5] = [
            ("PiB", 1 << 50),
            ("TiB", 1 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ];
        for (name, size) in UNITS {
            if self.0 >= size && self.0.is_multiple_of(size) {
                return write!(f, "{}{}", self.0 / size, name);
            }
        }
        if self.0 >= 1 << 30 {
            return write!(f, "{:.1}GiB", self.0 as f64 / (1u64 << 30) as f64);
        }
        if self.0 >= 1 << 20 {
            return write!(f, "{:.1}MiB", self.0 as f64 / (1u64 << 20) as f64);
        }
        write!(f, "{}B", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size: bytes as an integer, or a string such as \"512MiB\"")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("invalid size {v}: must not be negative")))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<ByteSize, E> {
                if v.is_finite() && v >= 0.0 && v.fract() == 0.0 && v < u64::MAX as f64 {
                    Ok(ByteSize(v as u64))
                } else {
                    Err(E::custom(format!(
                        "invalid size {v}: bytes must be a whole number"
                    )))
                }
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// A duration as job files write it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Dur(pub Duration);

impl Dur {
    pub const fn secs(s: u64) -> Self {
        Dur(Duration::from_secs(s))
    }
    pub const fn get(self) -> Duration {
        self.0
    }
}

impl From<Duration> for Dur {
    fn from(d: Duration) -> Self {
        Dur(d)
    }
}

fn duration_unit(unit: &str) -> Option<f64> {
    Some(match unit {
        "ms" => 0.001,
        "" | "s" | "sec" | "secs" => 1.0,
        "m" | "min" | "mins" => 60.0,
        "h" | "hr" | "hrs" => 3600.0,
        "d" => 86400.0,
        _ => return None,
    })
}

impl FromStr for Dur {
    type Err = UnitError;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        let mut rest = raw.trim();
        if rest.is_empty() {
            return Err(UnitError::Duration(raw.to_string()));
        }
        let mut total = 0.0f64;
        // "1h30m": a sequence of number+unit pairs.
        while !rest.is_empty() {
            let (number, after) = split_number(rest);
            if number.is_empty() {
                return Err(UnitError::Duration(raw.to_string()));
            }
            let value: f64 = number
                .parse()
                .map_err(|_| UnitError::Duration(raw.to_string()))?;
            let unit_end = after
                .find(|c: char| c.is_ascii_digit() || c == '.' || c.is_whitespace())
                .unwrap_or(after.len());
            let unit = &after[..unit_end];
            let mult = duration_unit(unit)
                .ok_or_else(|| UnitError::DurationUnit(raw.into(), unit.into()))?;
            total += value * mult;
            rest = after[unit_end..].trim_start();
        }
        if !total.is_finite() || total > 1e12 {
            return Err(UnitError::Duration(raw.to_string()));
        }
        Ok(Dur(Duration::from_secs_f64(total)))
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        if d.subsec_nanos() != 0 {
            return write!(f, "{}ms", d.as_millis());
        }
        let s = d.as_secs();
        if s != 0 && s.is_multiple_of(3600) {
            write!(f, "{}h", s / 3600)
        } else if s != 0 && s.is_multiple_of(60) {
            write!(f, "{}m", s / 60)
        } else {
            write!(f, "{s}s")
        }
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0.subsec_nanos() == 0 {
            s.serialize_u64(self.0.as_secs())
        } else {
            s.serialize_f64(self.0.as_secs_f64())
        }
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration: seconds as a number, or a string such as \"90s\"")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Dur, E> {
                Ok(Dur(Duration::from_secs(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Dur, E> {
                u64::try_from(v)
                    .map(|s| Dur(Duration::from_secs(s)))
                    .map_err(|_| E::custom(format!("invalid duration {v}: must not be negative")))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Dur, E> {
                if v.is_finite() && (0.0..1e12).contains(&v) {
                    Ok(Dur(Duration::from_secs_f64(v)))
                } else {
                    Err(E::custom(format!("invalid duration {v}")))
                }
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Dur, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_decimal_and_binary_units() {
        let cases = [
            ("123KB", 123_000),
            ("456 MB", 456_000_000),
            ("789MiB", 789 << 20),
            ("20 GB", 20_000_000_000),
            ("24GiB", 24 << 30),
            ("8Gi", 8 << 30),
            ("1.5KiB", 1536),
            ("42", 42),
            ("42B", 42),
            ("0", 0),
            ("18446744073709551615", u64::MAX),
        ];
        for (text, bytes) in cases {
            assert_eq!(text.parse::<ByteSize>(), Ok(ByteSize(bytes)), "{text}");
        }
    }

    #[test]
    fn bad_sizes_name_the_value() {
        for text in [
            "",
            "GiB",
            "12 parsecs",
            "1.2.3GB",
            "-5",
            "18446744073709551616",
        ] {
            let err = text.parse::<ByteSize>().unwrap_err().to_string();
            assert!(err.contains(&format!("{text:?}")), "{text}: {err}");
        }
        assert!(matches!(
            "3 bananas".parse::<ByteSize>(),
            Err(UnitError::SizeUnit(_, u)) if u == "bananas"
        ));
    }

    #[test]
    fn durations_parse() {
        let cases = [
            ("90s", 90.0),
            ("1h", 3600.0),
            ("1h30m", 5400.0),
            ("500ms", 0.5),
            ("2m 5s", 125.0),
            ("1.5h", 5400.0),
            ("7", 7.0),
            ("1d", 86400.0),
        ];
        for (text, secs) in cases {
            assert_eq!(
                text.parse::<Dur>().unwrap().0,
                Duration::from_secs_f64(secs),
                "{text}"
            );
        }
        for text in ["", "h", "5 fortnights", "1..2s", "1e400s"] {
            assert!(text.parse::<Dur>().is_err(), "{text} should not parse");
        }
    }

    #[test]
    fn display_round_trips() {
        for b in [0u64, 1, 1024, 24 << 30, 3 << 20, 1_000_000] {
            let shown = ByteSize(b).to_string();
            if !shown.contains('.') {
                assert_eq!(shown.parse::<ByteSize>().unwrap(), ByteSize(b), "{shown}");
            }
        }
        for s in ["90s", "2h", "5m", "250ms"] {
            assert_eq!(s.parse::<Dur>().unwrap().to_string(), s);
        }
    }

    #[test]
    fn serde_accepts_numbers_and_strings() {
        let b: ByteSize = serde_json::from_str("\"512MiB\"").unwrap();
        assert_eq!(b, ByteSize(512 << 20));
        let b: ByteSize = serde_json::from_str("1024").unwrap();
        assert_eq!(b, ByteSize(1024));
        assert!(serde_json::from_str::<ByteSize>("-1").is_err());
        assert!(serde_json::from_str::<ByteSize>("1.5").is_err());
        let d: Dur = serde_json::from_str("\"2h\"").unwrap();
        assert_eq!(d, Dur::secs(7200));
        let d: Dur = serde_json::from_str("0.25").unwrap();
        assert_eq!(d.0, Duration::from_millis(250));
        assert_eq!(serde_json::to_string(&Dur::secs(5)).unwrap(), "5");
        assert_eq!(serde_json::to_string(&ByteSize(7)).unwrap(), "7");
    }
}
