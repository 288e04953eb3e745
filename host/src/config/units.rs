//! Durations and sizes as people write them in `router.toml`: `"500ms"`, `"5s"`,
//! `"1m"` (humantime) and `"64MiB"` (bytesize), with errors that show the bad
//! value and an example of a good one. Used through `#[serde(deserialize_with)]`.

use std::fmt;
use std::time::Duration;

use bytesize::ByteSize;
use serde::Deserializer;
use serde::de::{self, Visitor};

/// A duration written as a string: `"500ms"`, `"5s"`, `"1m"`, `"1h 30m"`.
pub(crate) fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    d.deserialize_any(DurationVisitor)
}

/// An optional [`duration`]; pair with `#[serde(default)]`.
pub(crate) fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

/// A size written as a string with a unit (`"64MiB"`, `"512KiB"`) or as a
/// number of bytes.
pub(crate) fn size<'de, D: Deserializer<'de>>(d: D) -> Result<ByteSize, D::Error> {
    d.deserialize_any(SizeVisitor)
}

/// An optional [`size`]; pair with `#[serde(default)]`.
pub(crate) fn opt_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ByteSize>, D::Error> {
    size(d).map(Some)
}

struct DurationVisitor;

impl Visitor<'_> for DurationVisitor {
    type Value = Duration;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(r#"a duration with a unit, such as "500ms", "5s" or "1m""#)
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Duration, E> {
        humantime::parse_duration(s.trim()).map_err(|e| {
            E::custom(format_args!(
                r#"invalid duration {s:?} ({e}); write e.g. "500ms", "5s" or "1m""#
            ))
        })
    }
}

struct SizeVisitor;

impl Visitor<'_> for SizeVisitor {
    type Value = ByteSize;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(r#"a size such as "64MiB" or "512KiB", or a number of bytes"#)
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<ByteSize, E> {
        let s = s.trim();
        // bytesize reads "-1MiB" as a unit error; say what is actually wrong.
        if s.starts_with('-') {
            return Err(E::custom(format_args!(
                "invalid size {s:?}: cannot be negative"
            )));
        }
        s.parse::<ByteSize>().map_err(|e| {
            E::custom(format_args!(
                r#"invalid size {s:?} ({e}); write e.g. "64MiB" or "512KiB""#
            ))
        })
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<ByteSize, E> {
        Ok(ByteSize::b(n))
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<ByteSize, E> {
        u64::try_from(n)
            .map(ByteSize::b)
            .map_err(|_| E::custom(format_args!("invalid size {n}: cannot be negative")))
    }
}

/// A size the way `router.toml` writes it: `64MiB`, `512KiB`, else bytes.
pub fn size_text(size: ByteSize) -> String {
    let n = size.as_u64();
    for (unit, factor) in [
        ("GiB", bytesize::GIB),
        ("MiB", bytesize::MIB),
        ("KiB", bytesize::KIB),
    ] {
        if n >= factor && n.is_multiple_of(factor) {
            return format!("{}{unit}", n / factor);
        }
    }
    format!("{n}B")
}

/// A duration the way `router.toml` writes it: `500ms`, `5s`, `1m 30s`.
pub fn duration_text(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}
