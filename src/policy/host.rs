//! Destination hosts in their one canonical form, and IP literals in every form a client may write them.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Longest DNS name, in bytes, without the trailing dot.
pub const MAX_NAME_LEN: usize = 253;
/// Longest DNS label, in bytes.
pub const MAX_LABEL_LEN: usize = 63;

/// A normalised DNS name: ASCII lowercase, no trailing dot, punycode for non-ASCII labels, every label
/// non-empty and made of letters, digits, `-` and `_`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Host(Box<str>);

/// What a client asked to reach: a name (decided against host patterns) or an address (decided against
/// `allow_ips` and the address guard only).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    Name(Host),
    Ip(IpAddr),
}

/// Why a host string was refused. Each variant quotes what was wrong, so the message can stand alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostError {
    Empty,
    ForbiddenChar { ch: char },
    EmptyLabel,
    LabelTooLong { len: usize },
    NameTooLong { len: usize },
    InvalidChar { ch: char },
    Idna,
    InvalidIpv4,
    InvalidIpv6,
}

impl fmt::Display for HostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostError::Empty => f.write_str("empty host name"),
            HostError::ForbiddenChar { ch } => {
                write!(f, "host names may not contain {}", describe_char(*ch))
            }
            HostError::EmptyLabel => f.write_str("empty label (two dots in a row, or a leading dot)"),
            HostError::LabelTooLong { len } => {
                write!(f, "a label is {len} bytes long; the limit is {MAX_LABEL_LEN}")
            }
            HostError::NameTooLong { len } => {
                write!(f, "the name is {len} bytes long; the limit is {MAX_NAME_LEN}")
            }
            HostError::InvalidChar { ch } => {
                write!(f, "{} is not allowed in a host name (letters, digits, '-' and '_' only)", describe_char(*ch))
            }
            HostError::Idna => f.write_str("not a valid internationalised domain name (UTS 46)"),
            HostError::InvalidIpv4 => f.write_str("looks like an IPv4 address but is not a valid one"),
            HostError::InvalidIpv6 => f.write_str("not a valid bracketed IPv6 address"),
        }
    }
}

impl std::error::Error for HostError {}

fn describe_char(ch: char) -> String {
    match ch {
        '\0' => "NUL".to_string(),
        '\r' => "CR".to_string(),
        '\n' => "LF".to_string(),
        '\t' => "a tab".to_string(),
        ' ' => "a space".to_string(),
        c if c.is_whitespace() || c.is_control() => format!("U+{:04X}", c as u32),
        c => format!("'{c}'"),
    }
}

/// Characters refused before any other processing: they are how URL and header tricks smuggle a second
/// host or an escape past a naive comparison.
fn forbidden(ch: char) -> bool {
    matches!(ch, '%' | '\\' | '@' | '\0' | '\r' | '\n') || ch.is_whitespace() || ch.is_control()
}

fn valid_label_byte(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_'
}

impl Host {
    /// Normalises a host name. IP literals are not names: use [`Target::parse`] where either may come.
    pub fn parse(input: &str) -> Result<Host, HostError> {
        // The hot path: a name already in canonical form is checked in one pass and copied as is.
        let trimmed = input.strip_suffix('.').unwrap_or(input);
        if is_canonical(trimmed) {
            return Ok(Host(trimmed.into()));
        }
        if let Some(ch) = input.chars().find(|&c| forbidden(c)) {
            return Err(HostError::ForbiddenChar { ch });
        }
        if trimmed.is_empty() {
            return Err(HostError::Empty);
        }
        // ASCII needs no UTS 46 processing unless it carries punycode, which must be checked (a bogus
        // `xn--` label is not a name). The prefix is matched in any case: `XN--` lowercases to `xn--`
        // and must not skip the check.
        let punycode =
            trimmed.split('.').any(|l| l.as_bytes().get(..4).is_some_and(|p| p.eq_ignore_ascii_case(b"xn--")));
        let name = if trimmed.is_ascii() && !punycode {
            trimmed.to_ascii_lowercase()
        } else {
            let ascii = idna::uts46::Uts46::new()
                .to_ascii(
                    trimmed.as_bytes(),
                    idna::uts46::AsciiDenyList::EMPTY,
                    idna::uts46::Hyphens::Allow,
                    idna::uts46::DnsLength::Ignore,
                )
                .map_err(|_| HostError::Idna)?;
            // UTS 46 maps some characters (fullwidth dots, for one) onto '.', so a trailing dot may
            // appear only now.
            let ascii = ascii.strip_suffix('.').unwrap_or(&ascii);
            ascii.to_string()
        };
        check_labels(&name)?;
        Ok(Host(name.into_boxed_str()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name and every parent of it, longest first: `a.b.c`, `b.c`, `c`.
    pub fn suffixes(&self) -> impl Iterator<Item = &str> {
        let s = self.as_str();
        // A plain byte scan: labels are short, so a `memchr` call per dot costs more than it saves.
        std::iter::once(s).chain(s.bytes().enumerate().filter(|&(_, b)| b == b'.').map(move |(i, _)| &s[i + 1..]))
    }
}

/// The hot path of every request: whether `name` is already a canonical host (what `check_labels`
/// accepts, with no `xn--` label to validate), decided in one pass so it can be copied as is.
fn is_canonical(name: &str) -> bool {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() > MAX_NAME_LEN {
        return false;
    }
    bytes.split(|&b| b == b'.').all(|label| {
        !label.is_empty()
            && label.len() <= MAX_LABEL_LEN
            // A slice pattern, not `starts_with`: that is a `memcmp` call per label.
            && !matches!(label, [b'x', b'n', b'-', b'-', ..])
            && label.iter().all(|&b| valid_label_byte(b))
    })
}

fn check_labels(name: &str) -> Result<(), HostError> {
    if name.is_empty() {
        return Err(HostError::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(HostError::NameTooLong { len: name.len() });
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(HostError::EmptyLabel);
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(HostError::LabelTooLong { len: label.len() });
        }
        if let Some(b) = label.bytes().find(|&b| !valid_label_byte(b)) {
            return Err(HostError::InvalidChar { ch: b as char });
        }
    }
    Ok(())
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Host({:?})", &*self.0)
    }
}

impl Target {
    /// Parses what stands before the port in an authority: `[v6]`, an IPv4 literal in any legacy form
    /// (`127.1`, `2130706433`, `0x7f.1`, `0177.0.0.1`), a bare IPv6 address, or a name.
    pub fn parse(input: &str) -> Result<Target, HostError> {
        if let Some(rest) = input.strip_prefix('[') {
            let inner = rest.strip_suffix(']').ok_or(HostError::InvalidIpv6)?;
            // A zone id (`%eth0`) names a local interface: never a destination for a sandbox.
            return inner.parse::<Ipv6Addr>().map(|ip| Target::Ip(IpAddr::V6(ip))).map_err(|_| HostError::InvalidIpv6);
        }
        // The hot path: a name in canonical form that is not an IPv4 literal needs no other check.
        let trimmed = input.strip_suffix('.').unwrap_or(input);
        if is_canonical(trimmed) && !ends_in_number(trimmed) {
            return Ok(Target::Name(Host(trimmed.into())));
        }
        if input.contains(':') {
            return input.parse::<Ipv6Addr>().map(|ip| Target::Ip(IpAddr::V6(ip))).map_err(|_| HostError::InvalidIpv6);
        }
        if let Some(ch) = input.chars().find(|&c| forbidden(c)) {
            return Err(HostError::ForbiddenChar { ch });
        }
        // ASCII needs no normalising to show whether it is an address; this keeps IPv4 literals off
        // the allocation in `Host::parse`.
        if input.is_ascii() && ends_in_number(input) {
            return parse_ipv4_legacy(input).map(|ip| Target::Ip(IpAddr::V4(ip))).ok_or(HostError::InvalidIpv4);
        }
        let host = Host::parse(input)?;
        // UTS 46 maps fullwidth digits and ideographic dots to ASCII, so `１２７。０。０。１` only shows
        // itself as an address once normalised; the WHATWG order is the same (domain to ASCII first).
        if ends_in_number(host.as_str()) {
            return parse_ipv4_legacy(host.as_str()).map(|ip| Target::Ip(IpAddr::V4(ip))).ok_or(HostError::InvalidIpv4);
        }
        Ok(Target::Name(host))
    }

    /// The form to show in a message and to send upstream: a name, a dotted IPv4, or a bracketed IPv6.
    pub fn to_authority_host(&self) -> String {
        match self {
            Target::Name(h) => h.to_string(),
            Target::Ip(IpAddr::V4(ip)) => ip.to_string(),
            Target::Ip(IpAddr::V6(ip)) => format!("[{ip}]"),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_authority_host())
    }
}

/// The WHATWG URL rule: a host whose last label is a number is an IPv4 address or an error, never a
/// name. This is what keeps `1.2.3.999` and `0x7f.1` from being looked up in DNS.
pub(crate) fn ends_in_number(input: &str) -> bool {
    let trimmed = input.strip_suffix('.').unwrap_or(input);
    let last = trimmed.rsplit('.').next().unwrap_or("");
    if last.is_empty() {
        return false;
    }
    if last.bytes().all(|b| b.is_ascii_digit()) {
        return true;
    }
    match last.as_bytes() {
        [b'0', b'x' | b'X', hex @ ..] => hex.iter().all(u8::is_ascii_hexdigit),
        _ => false,
    }
}

/// `inet_aton` semantics: one to four parts, each decimal, `0x` hex or `0` octal; the last part fills
/// the remaining bytes.
pub fn parse_ipv4_legacy(input: &str) -> Option<Ipv4Addr> {
    let trimmed = input.strip_suffix('.').unwrap_or(input);
    let parts: Vec<&str> = trimmed.split('.').collect();
    if parts.is_empty() || parts.len() > 4 {
        return None;
    }
    let mut values = Vec::with_capacity(4);
    for part in &parts {
        values.push(parse_ipv4_part(part)?);
    }
    let (last, init) = values.split_last()?;
    if init.iter().any(|&v| v > 255) {
        return None;
    }
    let last_bits = 8 * (5 - values.len()) as u32;
    if last_bits < 64 && *last >= (1u64 << last_bits) {
        return None;
    }
    let mut addr: u64 = 0;
    for (i, v) in init.iter().enumerate() {
        addr |= v << (24 - 8 * i);
    }
    addr |= last;
    u32::try_from(addr).ok().map(Ipv4Addr::from)
}

fn parse_ipv4_part(part: &str) -> Option<u64> {
    if part.is_empty() || part.len() > 32 {
        return None;
    }
    let (digits, radix) = if let Some(hex) = part.strip_prefix("0x").or_else(|| part.strip_prefix("0X")) {
        (hex, 16)
    } else if part.len() > 1 && part.starts_with('0') {
        (&part[1..], 8)
    } else {
        (part, 10)
    };
    if digits.is_empty() {
        // `0x` alone is zero, as in inet_aton.
        return (radix == 16).then_some(0);
    }
    u64::from_str_radix(digits, radix).ok()
}

/// A destination as `host:port`, from a CONNECT line, an absolute URI or the command line.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Authority {
    pub target: Target,
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthorityError {
    Empty,
    Userinfo,
    MissingPort,
    InvalidPort { written: String },
    UnbracketedIpv6,
    Host(HostError),
}

impl fmt::Display for AuthorityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuthorityError::Empty => f.write_str("empty host"),
            AuthorityError::Userinfo => f.write_str("user information ('user@') is not allowed before the host"),
            AuthorityError::MissingPort => f.write_str("missing port: expected host:port"),
            AuthorityError::InvalidPort { written } => {
                write!(f, "invalid port {written:?}: expected a number from 1 to 65535")
            }
            AuthorityError::UnbracketedIpv6 => {
                f.write_str("IPv6 addresses must be written in brackets, e.g. [2001:db8::1]:443")
            }
            AuthorityError::Host(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for AuthorityError {}

impl Authority {
    /// Parses `host:port`, `[v6]:port`, or (with a default port) a bare host. Ports are plain decimal
    /// digits from 1 to 65535: no sign, no leading `+`, nothing that wraps in 16 bits.
    pub fn parse(input: &str, default_port: Option<u16>) -> Result<Authority, AuthorityError> {
        if input.is_empty() {
            return Err(AuthorityError::Empty);
        }
        if input.contains('@') {
            return Err(AuthorityError::Userinfo);
        }
        let (host, port) = if input.starts_with('[') {
            match input.find(']') {
                Some(end) => {
                    let rest = &input[end + 1..];
                    let port = match rest.strip_prefix(':') {
                        Some(p) => Some(p),
                        None if rest.is_empty() => None,
                        None => return Err(AuthorityError::Host(HostError::InvalidIpv6)),
                    };
                    (&input[..=end], port)
                }
                None => return Err(AuthorityError::Host(HostError::InvalidIpv6)),
            }
        } else if input.matches(':').count() > 1 {
            return Err(AuthorityError::UnbracketedIpv6);
        } else {
            match input.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (input, None),
            }
        };
        if host.is_empty() {
            return Err(AuthorityError::Empty);
        }
        let port = match port {
            Some(p) => parse_port(p)?,
            None => default_port.ok_or(AuthorityError::MissingPort)?,
        };
        let target = Target::parse(host).map_err(AuthorityError::Host)?;
        Ok(Authority { target, port })
    }
}

fn parse_port(p: &str) -> Result<u16, AuthorityError> {
    let invalid = || AuthorityError::InvalidPort { written: p.to_string() };
    if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid());
    }
    match p.parse::<u32>() {
        Ok(n) if (1..=65535).contains(&n) => Ok(n as u16),
        _ => Err(invalid()),
    }
}

impl fmt::Display for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.target, self.port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(s: &str) -> String {
        Host::parse(s).map(|h| h.to_string()).unwrap_or_else(|e| format!("error: {e}"))
    }

    #[test]
    fn canonical_form() {
        assert_eq!(host("GitHub.COM"), "github.com");
        assert_eq!(host("github.com."), "github.com");
        assert_eq!(host("github.com.."), "error: empty label (two dots in a row, or a leading dot)");
        assert_eq!(host(".github.com"), "error: empty label (two dots in a row, or a leading dot)");
        assert_eq!(host("bücher.example"), "xn--bcher-kva.example");
        assert_eq!(host("BÜCHER.example"), "xn--bcher-kva.example");
        assert_eq!(host("xn--bcher-kva.example"), "xn--bcher-kva.example");
        assert_eq!(host("under_score.example"), "under_score.example");
        assert_eq!(host("."), "error: empty host name");
        // An upper-case ACE prefix is still punycode and is checked like one.
        assert_eq!(host("XN--bcher-kva.example"), "xn--bcher-kva.example");
        assert_eq!(host("Xn--bcher-kva.example"), "xn--bcher-kva.example");
        assert_eq!(host("xn--zz.example"), "error: not a valid internationalised domain name (UTS 46)");
        assert_eq!(host("XN--zz.example"), "error: not a valid internationalised domain name (UTS 46)");
        // Found again by the absolute_uri fuzz target, through a URL: `xN---635` must be refused too.
        assert_eq!(host("xN---635"), "error: not a valid internationalised domain name (UTS 46)");
        assert_eq!(host(""), "error: empty host name");
    }

    #[test]
    fn refused_characters() {
        assert_eq!(host("a%2e.com"), "error: host names may not contain '%'");
        assert_eq!(host("a\\b.com"), "error: host names may not contain '\\'");
        assert_eq!(host("user@evil.com"), "error: host names may not contain '@'");
        assert_eq!(host("a b.com"), "error: host names may not contain a space");
        assert_eq!(host("a\0.com"), "error: host names may not contain NUL");
        assert_eq!(host("a\r\n.com"), "error: host names may not contain CR");
        assert_eq!(host("a/b.com"), "error: '/' is not allowed in a host name (letters, digits, '-' and '_' only)");
    }

    #[test]
    fn length_limits() {
        let label = "a".repeat(64);
        assert_eq!(host(&format!("{label}.com")), "error: a label is 64 bytes long; the limit is 63");
        let long = ["a".repeat(63), "b".repeat(63), "c".repeat(63), "d".repeat(63)].join(".");
        assert_eq!(host(&long), "error: the name is 255 bytes long; the limit is 253");
        let ok = ["a".repeat(63), "b".repeat(63), "c".repeat(63), "d".repeat(61)].join(".");
        assert_eq!(host(&ok).len(), 253);
    }

    #[test]
    fn suffixes_longest_first() {
        let h = Host::parse("a.b.gcr.io").unwrap();
        assert_eq!(h.suffixes().collect::<Vec<_>>(), ["a.b.gcr.io", "b.gcr.io", "gcr.io", "io"]);
    }

    fn ip(s: &str) -> String {
        match Target::parse(s) {
            Ok(Target::Ip(ip)) => ip.to_string(),
            Ok(Target::Name(h)) => format!("name {h}"),
            Err(e) => format!("error: {e}"),
        }
    }

    #[test]
    fn ipv4_legacy_forms() {
        for form in ["127.0.0.1", "127.1", "127.0.1", "2130706433", "0x7f.1", "0177.0.0.1", "0x7f000001", "127.0.0.1."]
        {
            assert_eq!(ip(form), "127.0.0.1", "{form}");
        }
        assert_eq!(ip("169.254.169.254"), "169.254.169.254");
        assert_eq!(ip("0xa9.0xfe.0xa9.0xfe"), "169.254.169.254");
        assert_eq!(ip("0"), "0.0.0.0");
        assert_eq!(ip("1.2.3.256"), "error: looks like an IPv4 address but is not a valid one");
        assert_eq!(ip("4294967296"), "error: looks like an IPv4 address but is not a valid one");
        assert_eq!(ip("1.2.3.4.5"), "error: looks like an IPv4 address but is not a valid one");
        assert_eq!(ip("08.1.1.1"), "error: looks like an IPv4 address but is not a valid one");
        assert_eq!(ip("1.2.3.a"), "name 1.2.3.a");
    }

    /// Fullwidth digits and ideographic full stops normalise to an IPv4 literal: an address, not a name.
    #[test]
    fn ipv4_hidden_behind_unicode() {
        assert_eq!(ip("１２７.０.０.１"), "127.0.0.1");
        assert_eq!(ip("127。0。0。1"), "127.0.0.1");
        assert_eq!(ip("１２７．１"), "127.0.0.1");
        assert_eq!(ip("０ｘ７ｆ.1"), "127.0.0.1");
        assert_eq!(ip("example.１"), "error: looks like an IPv4 address but is not a valid one");
        assert_eq!(ip("ｅｘａｍｐｌｅ.com"), "name example.com");
    }

    fn authority(s: &str) -> String {
        Authority::parse(s, None).map(|a| a.to_string()).unwrap_or_else(|e| format!("error: {e}"))
    }

    #[test]
    fn authorities() {
        assert_eq!(authority("GitHub.com:443"), "github.com:443");
        assert_eq!(authority("[::1]:8080"), "[::1]:8080");
        assert_eq!(authority("127.1:80"), "127.0.0.1:80");
        assert_eq!(authority("github.com"), "error: missing port: expected host:port");
        assert_eq!(authority("github.com:0"), "error: invalid port \"0\": expected a number from 1 to 65535");
        assert_eq!(authority("github.com:65536"), "error: invalid port \"65536\": expected a number from 1 to 65535");
        assert_eq!(authority("github.com:+443"), "error: invalid port \"+443\": expected a number from 1 to 65535");
        assert_eq!(authority("github.com:66979"), "error: invalid port \"66979\": expected a number from 1 to 65535");
        assert_eq!(
            authority("github.com:443:443"),
            "error: IPv6 addresses must be written in brackets, e.g. [2001:db8::1]:443"
        );
        assert_eq!(
            authority("user@github.com:443"),
            "error: user information ('user@') is not allowed before the host"
        );
        assert_eq!(authority(":443"), "error: empty host");
        assert_eq!(Authority::parse("github.com", Some(443)).unwrap().to_string(), "github.com:443");
    }

    #[test]
    fn ipv6_forms() {
        assert_eq!(ip("[::1]"), "::1");
        assert_eq!(ip("[::ffff:127.0.0.1]"), "::ffff:127.0.0.1");
        assert_eq!(ip("::1"), "::1");
        assert_eq!(ip("[::1"), "error: not a valid bracketed IPv6 address");
        assert_eq!(ip("[fe80::1%25eth0]"), "error: not a valid bracketed IPv6 address");
        assert_eq!(ip("[github.com]"), "error: not a valid bracketed IPv6 address");
    }
}
