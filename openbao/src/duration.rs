//! Durations as KubeBao reads them from flags, files and specs, with one grammar, one set of
//! bounds per setting and one error message.
//!
//! Grammar: one or more `<number><unit>` segments (`1h30m`, `500ms`, `1.5h`), units `ms`, `s`,
//! `m`, `h` and `d` (24h, as OpenBao's TTLs accept); or a bare number, read as seconds (`3` = 3 s,
//! as the KMS plugin has always accepted). No sign, no spaces inside.
//!
//! Arithmetic is on integer nanoseconds (u128, checked): no float rounding, and no input, however
//! long or large, can overflow or panic; anything outside the bounds is an error.

use std::time::Duration;

/// The range a setting accepts (both ends included).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounds {
    /// Shortest accepted duration.
    pub min: Duration,
    /// Longest accepted duration.
    pub max: Duration,
}

impl Bounds {
    /// `min..=max`.
    pub const fn new(min: Duration, max: Duration) -> Self {
        Self { min, max }
    }
}

/// A text that is not a duration within its bounds. The message says what to write instead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DurationError {
    /// The text as given.
    pub text: String,
    /// The bounds it had to meet.
    pub bounds: Bounds,
}

impl std::fmt::Display for DurationError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:?} is not a duration between {} and {}: use a number with a unit, e.g. 500ms, 30s, 5m, 1h30m",
            self.text,
            format(self.bounds.min),
            format(self.bounds.max)
        )
    }
}

impl std::error::Error for DurationError {}

const NANOS_PER_SECOND: u128 = 1_000_000_000;
/// Fraction digits kept: 18 digits times the largest unit (a day in ns) still fits in u128,
/// and digits past them are below a nanosecond.
const MAX_FRACTION_DIGITS: u32 = 18;

/// Parses `text` (see the module doc) and checks it against `bounds`.
pub fn parse(text: &str, bounds: Bounds) -> Result<Duration, DurationError> {
    let error = || DurationError {
        text: text.to_string(),
        bounds,
    };
    let nanos = nanoseconds(text.trim()).ok_or_else(error)?;
    if nanos < bounds.min.as_nanos() || nanos > bounds.max.as_nanos() {
        return Err(error());
    }
    // Within `max`, so the seconds fit in u64.
    let secs = u64::try_from(nanos / NANOS_PER_SECOND).map_err(|_| error())?;
    Ok(Duration::new(secs, (nanos % NANOS_PER_SECOND) as u32))
}

/// The whole text in nanoseconds; None when it does not follow the grammar or overflows.
fn nanoseconds(text: &str) -> Option<u128> {
    if text.is_empty() {
        return None;
    }
    if let Some(seconds) = number(text, NANOS_PER_SECOND) {
        return Some(seconds);
    }
    let mut total: u128 = 0;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (num, after) = rest.split_at(digits);
        let (unit, len) = unit(after)?;
        total = total.checked_add(number(num, unit)?)?;
        rest = &after[len..];
    }
    Some(total)
}

/// Nanoseconds per unit, and the unit's length, for the unit `text` starts with.
fn unit(text: &str) -> Option<(u128, usize)> {
    const UNITS: [(&str, u128); 5] = [
        ("ms", 1_000_000),
        ("s", NANOS_PER_SECOND),
        ("m", 60 * NANOS_PER_SECOND),
        ("h", 3600 * NANOS_PER_SECOND),
        ("d", 86_400 * NANOS_PER_SECOND),
    ];
    UNITS
        .iter()
        .find(|(name, _)| text.starts_with(name))
        .map(|(name, nanos)| (*nanos, name.len()))
}

/// `digits[.digits]` times `unit` nanoseconds; None when not such a number or on overflow.
fn number(text: &str, unit: u128) -> Option<u128> {
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() && fraction.is_empty() || !all_digits(whole) || !all_digits(fraction) {
        return None;
    }
    let mut value: u128 = 0;
    for b in whole.bytes() {
        value = value.checked_mul(10)?.checked_add(u128::from(b - b'0'))?;
    }
    let mut nanos = value.checked_mul(unit)?;
    let kept = &fraction[..fraction.len().min(MAX_FRACTION_DIGITS as usize)];
    if !kept.is_empty() {
        let digits: u128 = kept.parse().ok()?;
        let scale = 10u128.pow(kept.len() as u32);
        nanos = nanos.checked_add(digits * unit / scale)?;
    }
    Some(nanos)
}

/// Go style: `1h30m`, `45s`, `1m30.5s`, `500ms`, `0s` (hours are the largest unit).
pub fn format(d: Duration) -> String {
    if d.is_zero() {
        return "0s".into();
    }
    if d < Duration::from_secs(1) {
        return with_fraction(
            u64::from(d.subsec_nanos()) / 1_000_000,
            d.subsec_nanos() % 1_000_000,
            6,
            "ms",
        );
    }
    let secs = d.as_secs();
    let mut out = String::new();
    let (hours, minutes, seconds) = (secs / 3600, secs % 3600 / 60, secs % 60);
    if hours > 0 {
        out.push_str(&format!("{hours}h"));
    }
    if minutes > 0 {
        out.push_str(&format!("{minutes}m"));
    }
    if seconds > 0 || d.subsec_nanos() > 0 {
        out.push_str(&with_fraction(seconds, d.subsec_nanos(), 9, "s"));
    }
    out
}

/// `whole[.fraction]unit`, the fraction written with `width` digits, trailing zeros dropped.
fn with_fraction(whole: u64, fraction: u32, width: usize, unit: &str) -> String {
    if fraction == 0 {
        return format!("{whole}{unit}");
    }
    let digits = format!("{fraction:0width$}");
    format!("{whole}.{}{unit}", digits.trim_end_matches('0'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const YEAR: Bounds = Bounds::new(Duration::from_secs(1), Duration::from_secs(8760 * 3600));
    const ANY: Bounds = Bounds::new(Duration::ZERO, Duration::MAX);

    fn ok(text: &str) -> Duration {
        parse(text, ANY).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn units_segments_fractions_and_bare_seconds() {
        assert_eq!(ok("500ms"), Duration::from_millis(500));
        assert_eq!(ok("30s"), Duration::from_secs(30));
        assert_eq!(ok("5m"), Duration::from_secs(300));
        assert_eq!(ok("1h30m"), Duration::from_secs(5400));
        assert_eq!(ok("1.5h"), Duration::from_secs(5400));
        assert_eq!(ok("7d"), Duration::from_secs(7 * 86_400));
        assert_eq!(ok("3"), Duration::from_secs(3), "a bare number is seconds");
        assert_eq!(ok("0.25"), Duration::from_millis(250));
        assert_eq!(
            ok(" 2m "),
            Duration::from_secs(120),
            "surrounding spaces are ignored"
        );
        assert_eq!(ok("0"), Duration::ZERO);
        assert_eq!(ok("1h1m1s1ms"), Duration::from_millis(3_661_001));
        assert_eq!(ok(".5s"), Duration::from_millis(500));
        assert_eq!(ok("1.000000001s"), Duration::new(1, 1));
        assert_eq!(
            ok("0.1234567891234567891234s"),
            Duration::new(0, 123_456_789)
        );
    }

    #[test]
    fn malformed_text_is_refused() {
        for bad in [
            "",
            " ",
            "-1s",
            "+1s",
            "s",
            "1x",
            "5 parsecs",
            "1 s",
            "1h30",
            "1.2.3s",
            ".s",
            "1..5s",
            "ms",
            "1hh",
            "1µs",
            "1ns",
            "1H",
            "1e3s",
            "0x10s",
            "NaN",
            "inf",
        ] {
            assert!(parse(bad, ANY).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn huge_values_and_many_segments_are_errors_not_panics() {
        for huge in [
            "99999999999999999999h".to_string(),
            "9".repeat(100) + "d",
            "9".repeat(100),
            format!("0.{}s", "9".repeat(1000)),
            "1h".repeat(100_000),
            "18446744073709551616s".into(),
        ] {
            let result = parse(&huge, YEAR);
            assert!(result.is_err(), "{} chars accepted", huge.len());
        }
        // Many segments within bounds still add up exactly.
        assert_eq!(ok(&"1s".repeat(10_000)), Duration::from_secs(10_000));
        // The largest representable u128 input is an error, not a wrap.
        assert!(parse(&u128::MAX.to_string(), ANY).is_err());
    }

    #[test]
    fn bounds_are_inclusive_and_the_message_names_them() {
        assert_eq!(parse("1s", YEAR), Ok(Duration::from_secs(1)));
        assert_eq!(parse("8760h", YEAR), Ok(Duration::from_secs(8760 * 3600)));
        let err = parse("8760h1s", YEAR).unwrap_err();
        assert_eq!(
            err.to_string(),
            "\"8760h1s\" is not a duration between 1s and 8760h: use a number with a unit, e.g. 500ms, 30s, 5m, 1h30m"
        );
        let err = parse("999ms", YEAR).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("\"999ms\" is not a duration between 1s and 8760h")
        );
        assert_eq!(parse("ten", YEAR).unwrap_err().text, "ten");
        assert!(parse("0s", YEAR).is_err());
    }

    #[test]
    fn format_is_go_style_and_parses_back() {
        for (d, text) in [
            (Duration::ZERO, "0s"),
            (Duration::from_millis(500), "500ms"),
            (Duration::from_micros(1500), "1.5ms"),
            (Duration::from_secs(1), "1s"),
            (Duration::from_secs(45), "45s"),
            (Duration::from_millis(90_500), "1m30.5s"),
            (Duration::from_secs(5400), "1h30m"),
            (Duration::from_secs(8760 * 3600), "8760h"),
            (Duration::from_secs(3601), "1h1s"),
            (Duration::new(1, 1), "1.000000001s"),
        ] {
            assert_eq!(format(d), text);
            assert_eq!(ok(text), d, "{text} does not parse back");
        }
    }
}
