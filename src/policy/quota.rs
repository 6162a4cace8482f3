//! Byte sizes and byte quotas as policy authors write them (`10MiB`, `2GiB/hour`), and the fixed windows a
//! quota is counted in. Pure values (policies and the server config parse them; [`crate::limit`] counts in
//! them), so they sit with the policy, below the limiter.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

/// The units a size may be written in, largest first within each family: powers of 1024 (`KiB`) and of
/// 1000 (`KB`). Bytes are counted, never bits, so unit names are case-sensitive (`Mb` is not `MB`).
const UNITS: [(&str, u64); 9] = [
    ("TiB", 1 << 40),
    ("GiB", 1 << 30),
    ("MiB", 1 << 20),
    ("KiB", 1 << 10),
    ("TB", 1_000_000_000_000),
    ("GB", 1_000_000_000),
    ("MB", 1_000_000),
    ("KB", 1_000),
    ("B", 1),
];

const UNITS_HINT: &str =
    "units are B, KiB, MiB, GiB, TiB (powers of 1024) and KB, MB, GB, TB (powers of 1000), e.g. \"10MiB\"";

/// The slowest shaping rate a policy or the server may set: below it a tunnel's grants would be smaller than
/// a TLS record and every exchange would stall.
pub const MIN_BYTES_PER_SECOND: ByteSize = ByteSize::bytes(1024);

/// A number of bytes, written with its unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(u64);

/// How long a quota's window lasts. Windows are fixed and aligned to the Unix epoch, so a `day` runs from
/// midnight UTC to midnight UTC, and every instance agrees on where a window starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Period {
    Second,
    Minute,
    Hour,
    Day,
}

/// At most `size` bytes per `period`, e.g. `2GiB/hour`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ByteQuota {
    pub size: ByteSize,
    pub period: Period,
}

/// Why a size or quota was refused; [`QuotaError::hint`] says what to write instead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QuotaError {
    /// No digits before the unit (`"MiB"`, `""`, `"-1MiB"`).
    NoNumber {
        written: String,
    },
    /// A fraction (`"1.5GiB"`): sizes are whole numbers of their unit.
    Fraction {
        written: String,
    },
    /// A number with no unit (`"1048576"`).
    NoUnit {
        written: String,
        number: String,
    },
    UnknownUnit {
        written: String,
        unit: String,
    },
    /// More bytes than can be counted (over 16 EiB).
    TooLarge {
        written: String,
    },
    /// A zero size, which would refuse every byte.
    Zero {
        written: String,
    },
    /// A quota without `/PERIOD`.
    NoPeriod {
        written: String,
    },
    UnknownPeriod {
        written: String,
        period: String,
    },
}

impl fmt::Display for QuotaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QuotaError::NoNumber { written } => {
                write!(f, "invalid size {written:?}: expected a number of bytes and a unit")
            }
            QuotaError::Fraction { written } => {
                write!(f, "invalid size {written:?}: expected a whole number before the unit")
            }
            QuotaError::NoUnit { written, .. } => {
                write!(f, "invalid size {written:?}: expected a unit after the number")
            }
            QuotaError::UnknownUnit { written, unit } => write!(f, "invalid size {written:?}: unknown unit {unit:?}"),
            QuotaError::TooLarge { written } => write!(f, "invalid size {written:?}: more than 16EiB"),
            QuotaError::Zero { written } => write!(f, "invalid size {written:?}: must be at least 1 byte"),
            QuotaError::NoPeriod { written } => write!(f, "invalid quota {written:?}: expected SIZE/PERIOD"),
            QuotaError::UnknownPeriod { written, period } => {
                write!(f, "invalid quota {written:?}: unknown period {period:?}")
            }
        }
    }
}

impl std::error::Error for QuotaError {}

impl QuotaError {
    /// One line telling the author what to write instead.
    pub fn hint(&self) -> String {
        match self {
            QuotaError::NoNumber { .. } | QuotaError::TooLarge { .. } => UNITS_HINT.to_string(),
            QuotaError::Fraction { .. } => "write it in a smaller unit, e.g. \"1536MiB\" for 1.5GiB".to_string(),
            QuotaError::NoUnit { number, .. } => {
                format!("write {:?} for bytes, or use a larger unit", format!("{number}B"))
            }
            QuotaError::UnknownUnit { unit, .. } => {
                match UNITS
                    .iter()
                    .find(|(u, _)| u.eq_ignore_ascii_case(unit) || u.eq_ignore_ascii_case(&format!("{unit}B")))
                {
                    Some((u, _)) => format!("did you mean {u:?}? sluice counts bytes; {UNITS_HINT}"),
                    None => UNITS_HINT.to_string(),
                }
            }
            QuotaError::Zero { .. } => "a quota of 0 refuses everything; give a size, or leave the key out".to_string(),
            QuotaError::NoPeriod { .. } => "e.g. \"2GiB/hour\"; periods are second, minute, hour and day".to_string(),
            QuotaError::UnknownPeriod { period, .. } => {
                let known = Period::ALL.map(Period::as_str);
                match known
                    .iter()
                    .find(|p| period.eq_ignore_ascii_case(p) || period.eq_ignore_ascii_case(&format!("{p}s")))
                {
                    Some(p) => format!("did you mean {p:?}? periods are second, minute, hour and day"),
                    None => "periods are second, minute, hour and day, e.g. \"2GiB/hour\"".to_string(),
                }
            }
        }
    }
}

impl ByteSize {
    pub const fn bytes(n: u64) -> ByteSize {
        ByteSize(n)
    }

    pub const fn as_u64(self) -> u64 {
        self.0
    }

    /// Parses `10MiB`, `500KB`, `1B`: a whole number, then a unit (spaces between them are allowed).
    pub fn parse(written: &str) -> Result<ByteSize, QuotaError> {
        let text = written.trim();
        let digits_end = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
        let (digits, rest) = text.split_at(digits_end);
        let unit = rest.trim_start();
        let owned = || written.to_string();
        if digits.is_empty() {
            return Err(QuotaError::NoNumber { written: owned() });
        }
        if unit.starts_with(['.', ',']) {
            return Err(QuotaError::Fraction { written: owned() });
        }
        if unit.is_empty() {
            return Err(QuotaError::NoUnit { written: owned(), number: digits.to_string() });
        }
        let Some(&(_, multiplier)) = UNITS.iter().find(|(u, _)| *u == unit) else {
            return Err(QuotaError::UnknownUnit { written: owned(), unit: unit.to_string() });
        };
        let n: u64 = digits.parse().map_err(|_| QuotaError::TooLarge { written: owned() })?;
        let bytes = n.checked_mul(multiplier).ok_or_else(|| QuotaError::TooLarge { written: owned() })?;
        if bytes == 0 {
            return Err(QuotaError::Zero { written: owned() });
        }
        Ok(ByteSize(bytes))
    }
}

/// The shortest exact form: the unit that divides the size with the smallest quotient (`1KiB`, `1000KiB`,
/// `1500KB`, `7B`), so parsing the text gives the same size back.
impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (unit, multiplier) = UNITS
            .iter()
            .filter(|(_, m)| self.0.is_multiple_of(*m))
            .min_by_key(|(_, m)| self.0 / m)
            .copied()
            .unwrap_or(("B", 1));
        write!(f, "{}{unit}", self.0 / multiplier)
    }
}

/// Written as authors write it, so a policy's limits serialise to what parses back.
impl serde::Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        ByteSize::parse(&text).map_err(|e| serde::de::Error::custom(format!("{e} ({})", e.hint())))
    }
}

impl serde::Serialize for ByteQuota {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for ByteQuota {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        ByteQuota::parse(&text).map_err(|e| serde::de::Error::custom(format!("{e} ({})", e.hint())))
    }
}

impl FromStr for ByteSize {
    type Err = QuotaError;

    fn from_str(s: &str) -> Result<Self, QuotaError> {
        ByteSize::parse(s)
    }
}

impl Period {
    pub const ALL: [Period; 4] = [Period::Second, Period::Minute, Period::Hour, Period::Day];

    pub fn as_str(self) -> &'static str {
        match self {
            Period::Second => "second",
            Period::Minute => "minute",
            Period::Hour => "hour",
            Period::Day => "day",
        }
    }

    pub fn parse(s: &str) -> Option<Period> {
        Period::ALL.into_iter().find(|p| p.as_str() == s)
    }

    pub fn seconds(self) -> u64 {
        match self {
            Period::Second => 1,
            Period::Minute => 60,
            Period::Hour => 3600,
            Period::Day => 86_400,
        }
    }

    /// The window holding the Unix time `now` (in seconds): from its start, inclusive, to its end, exclusive.
    pub fn window(self, now: u64) -> Range<u64> {
        let len = self.seconds();
        let start = now - now % len;
        start..start.saturating_add(len)
    }
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl ByteQuota {
    /// Parses `SIZE/PERIOD`, e.g. `2GiB/hour`, `50GiB/day`.
    pub fn parse(written: &str) -> Result<ByteQuota, QuotaError> {
        let Some((size, period)) = written.split_once('/') else {
            // A size alone is the likelier mistake than a period alone: say what is missing.
            ByteSize::parse(written)?;
            return Err(QuotaError::NoPeriod { written: written.to_string() });
        };
        // Quote the whole value the author wrote, not the half of it.
        let size = ByteSize::parse(size).map_err(|e| e.rewritten(written))?;
        let period_text = period.trim();
        let period = Period::parse(period_text).ok_or_else(|| QuotaError::UnknownPeriod {
            written: written.to_string(),
            period: period_text.to_string(),
        })?;
        Ok(ByteQuota { size, period })
    }

    /// The window holding the Unix time `now`: bytes moved in it count against the quota, and a session
    /// over its quota may try again at the window's end.
    pub fn window(&self, now: u64) -> Range<u64> {
        self.period.window(now)
    }
}

impl QuotaError {
    /// The same mistake, quoting `written` (the whole quota) instead of the part that was parsed.
    fn rewritten(self, written: &str) -> QuotaError {
        let written = written.to_string();
        match self {
            QuotaError::NoNumber { .. } => QuotaError::NoNumber { written },
            QuotaError::Fraction { .. } => QuotaError::Fraction { written },
            QuotaError::NoUnit { number, .. } => QuotaError::NoUnit { written, number },
            QuotaError::UnknownUnit { unit, .. } => QuotaError::UnknownUnit { written, unit },
            QuotaError::TooLarge { .. } => QuotaError::TooLarge { written },
            QuotaError::Zero { .. } => QuotaError::Zero { written },
            QuotaError::NoPeriod { .. } => QuotaError::NoPeriod { written },
            QuotaError::UnknownPeriod { period, .. } => QuotaError::UnknownPeriod { written, period },
        }
    }
}

impl fmt::Display for ByteQuota {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.size, self.period)
    }
}

impl FromStr for ByteQuota {
    type Err = QuotaError;

    fn from_str(s: &str) -> Result<Self, QuotaError> {
        ByteQuota::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn size(s: &str) -> Result<u64, (String, String)> {
        ByteSize::parse(s).map(ByteSize::as_u64).map_err(|e| (e.to_string(), e.hint()))
    }

    fn quota(s: &str) -> Result<(u64, Period), (String, String)> {
        ByteQuota::parse(s).map(|q| (q.size.as_u64(), q.period)).map_err(|e| (e.to_string(), e.hint()))
    }

    fn err(message: &str, hint: &str) -> Result<u64, (String, String)> {
        Err((message.to_string(), hint.to_string()))
    }

    #[test]
    fn sizes_parse_in_binary_and_decimal_units() {
        assert_eq!(size("10MiB"), Ok(10 << 20));
        assert_eq!(size("100MiB"), Ok(100 << 20));
        assert_eq!(size("500KB"), Ok(500_000));
        assert_eq!(size("1B"), Ok(1));
        assert_eq!(size("3KiB"), Ok(3072));
        assert_eq!(size("2GB"), Ok(2_000_000_000));
        assert_eq!(size("1TiB"), Ok(1 << 40));
        assert_eq!(size("4TB"), Ok(4_000_000_000_000));
        assert_eq!(size(" 2 GiB "), Ok(2 * GIB));
        assert_eq!(size("16777215TiB"), Ok(16_777_215 << 40));
    }

    #[test]
    fn sizes_display_in_their_shortest_exact_form_and_parse_back() {
        for (written, shown) in [
            ("2048MiB", "2GiB"),
            ("1000KiB", "1000KiB"),
            ("1024000B", "1000KiB"),
            ("1500KB", "1500KB"),
            ("1000000B", "1MB"),
            ("1048576B", "1MiB"),
            ("7B", "7B"),
            ("1TiB", "1TiB"),
            ("16777215TiB", "16777215TiB"),
        ] {
            let parsed = ByteSize::parse(written).map(|s| s.to_string());
            assert_eq!(parsed.as_deref(), Ok(shown), "{written}");
            assert_eq!(ByteSize::parse(shown), ByteSize::parse(written), "{shown}");
        }
        for n in [1, 999, 1000, 1023, 1024, 1025, 10 << 20, u64::MAX] {
            let shown = ByteSize::bytes(n).to_string();
            assert_eq!(ByteSize::parse(&shown), Ok(ByteSize::bytes(n)), "{shown}");
        }
    }

    #[test]
    fn size_mistakes_are_refused_with_a_hint() {
        let units =
            "units are B, KiB, MiB, GiB, TiB (powers of 1024) and KB, MB, GB, TB (powers of 1000), e.g. \"10MiB\"";
        let no_number = |w: &str| err(&format!("invalid size {w:?}: expected a number of bytes and a unit"), units);
        assert_eq!(size(""), no_number(""));
        assert_eq!(size("MiB"), no_number("MiB"));
        assert_eq!(size("-1MiB"), no_number("-1MiB"));
        assert_eq!(size(".5GiB"), no_number(".5GiB"));
        assert_eq!(
            size("1.5GiB"),
            err(
                "invalid size \"1.5GiB\": expected a whole number before the unit",
                "write it in a smaller unit, e.g. \"1536MiB\" for 1.5GiB"
            )
        );
        assert_eq!(
            size("1048576"),
            err(
                "invalid size \"1048576\": expected a unit after the number",
                "write \"1048576B\" for bytes, or use a larger unit"
            )
        );
        let did_you_mean = |w: &str, unit: &str, meant: &str| {
            err(
                &format!("invalid size {w:?}: unknown unit {unit:?}"),
                &format!("did you mean {meant:?}? sluice counts bytes; {units}"),
            )
        };
        assert_eq!(size("10mb"), did_you_mean("10mb", "mb", "MB"));
        // Megabits are not megabytes: the case of a unit matters.
        assert_eq!(size("10Mb"), did_you_mean("10Mb", "Mb", "MB"));
        assert_eq!(size("10Mi"), did_you_mean("10Mi", "Mi", "MiB"));
        assert_eq!(size("10kib"), did_you_mean("10kib", "kib", "KiB"));
        assert_eq!(size("10 bytes"), err("invalid size \"10 bytes\": unknown unit \"bytes\"", units));
        assert_eq!(size("10PiB"), err("invalid size \"10PiB\": unknown unit \"PiB\"", units));
        assert_eq!(size("16777216TiB"), err("invalid size \"16777216TiB\": more than 16EiB", units));
        assert_eq!(
            size("99999999999999999999B"),
            err("invalid size \"99999999999999999999B\": more than 16EiB", units)
        );
        assert_eq!(
            size("0GiB"),
            err(
                "invalid size \"0GiB\": must be at least 1 byte",
                "a quota of 0 refuses everything; give a size, or leave the key out"
            )
        );
    }

    #[test]
    fn quotas_parse_display_and_parse_back() {
        assert_eq!(quota("2GiB/hour"), Ok((2 * GIB, Period::Hour)));
        assert_eq!(quota("50GiB/day"), Ok((50 * GIB, Period::Day)));
        assert_eq!(quota("10MB/second"), Ok((10_000_000, Period::Second)));
        assert_eq!(quota("512MiB / minute"), Ok((512 << 20, Period::Minute)));
        for (written, shown) in [
            ("2GiB/hour", "2GiB/hour"),
            ("50GiB/day", "50GiB/day"),
            ("2048MiB/hour", "2GiB/hour"),
            ("512MiB / minute", "512MiB/minute"),
            ("1000B/second", "1KB/second"),
        ] {
            let parsed = ByteQuota::parse(written);
            assert_eq!(parsed.as_ref().map(|q| q.to_string()).as_deref(), Ok(shown), "{written}");
            assert_eq!(ByteQuota::parse(shown), parsed, "{shown}");
        }
    }

    #[test]
    fn quota_mistakes_quote_the_whole_quota() {
        let quota_err = |m: &str, h: &str| Err((m.to_string(), h.to_string()));
        let periods = "periods are second, minute, hour and day, e.g. \"2GiB/hour\"";
        assert_eq!(
            quota("2GiB"),
            quota_err(
                "invalid quota \"2GiB\": expected SIZE/PERIOD",
                "e.g. \"2GiB/hour\"; periods are second, minute, hour and day"
            )
        );
        assert_eq!(quota("2GiB/week"), quota_err("invalid quota \"2GiB/week\": unknown period \"week\"", periods));
        assert_eq!(quota("2GiB/"), quota_err("invalid quota \"2GiB/\": unknown period \"\"", periods));
        assert_eq!(
            quota("2GiB/hours"),
            quota_err(
                "invalid quota \"2GiB/hours\": unknown period \"hours\"",
                "did you mean \"hour\"? periods are second, minute, hour and day"
            )
        );
        assert_eq!(
            quota("2GiB/Day"),
            quota_err(
                "invalid quota \"2GiB/Day\": unknown period \"Day\"",
                "did you mean \"day\"? periods are second, minute, hour and day"
            )
        );
        // The size's own mistakes quote the whole quota, and come before a missing period.
        assert_eq!(
            quota("2gib/hour"),
            quota_err(
                "invalid size \"2gib/hour\": unknown unit \"gib\"",
                "did you mean \"GiB\"? sluice counts bytes; units are B, KiB, MiB, GiB, TiB (powers of 1024) and \
                 KB, MB, GB, TB (powers of 1000), e.g. \"10MiB\""
            )
        );
        assert_eq!(
            quota("0B/day"),
            quota_err(
                "invalid size \"0B/day\": must be at least 1 byte",
                "a quota of 0 refuses everything; give a size, or leave the key out"
            )
        );
        assert_eq!(
            quota("1048576/hour"),
            quota_err(
                "invalid size \"1048576/hour\": expected a unit after the number",
                "write \"1048576B\" for bytes, or use a larger unit"
            )
        );
        assert_eq!(
            quota("1.5GiB"),
            quota_err(
                "invalid size \"1.5GiB\": expected a whole number before the unit",
                "write it in a smaller unit, e.g. \"1536MiB\" for 1.5GiB"
            )
        );
    }

    #[test]
    fn windows_are_fixed_and_aligned_to_the_epoch() {
        assert_eq!(Period::Second.window(1_700_000_000), 1_700_000_000..1_700_000_001);
        assert_eq!(Period::Minute.window(1_700_000_000), 1_699_999_980..1_700_000_040);
        assert_eq!(Period::Hour.window(5 * 3600 + 17), 5 * 3600..6 * 3600);
        // A window's end is the next one's start.
        assert_eq!(Period::Hour.window(6 * 3600), 6 * 3600..7 * 3600);
        assert_eq!(Period::Hour.window(6 * 3600 - 1), 5 * 3600..6 * 3600);
        // Days run midnight to midnight UTC: 2023-11-14T22:13:20Z is in 2023-11-14.
        assert_eq!(Period::Day.window(1_700_000_000), 1_699_920_000..1_700_006_400);
        assert_eq!(Period::Day.window(0), 0..86_400);
        let last = Period::Day.window(u64::MAX);
        assert_eq!((last.start, last.end), (u64::MAX - u64::MAX % 86_400, u64::MAX));
        let q = ByteQuota::parse("2GiB/hour").map(|q| q.window(7200 + 1));
        assert_eq!(q, Ok(7200..10_800));
    }
}
