//! Host patterns as policy authors write them: `example.com`, `*.example.com`, `api-*.example.com`,
//! each optionally with `:port`.

use std::fmt;

use super::host::{Host, HostError, Target, ends_in_number};

/// One allow or deny entry, validated and in canonical form.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HostPattern {
    kind: PatternKind,
    port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PatternKind {
    /// `example.com`: that name only.
    Exact(Host),
    /// `*.example.com`: one or more labels before the fixed part, never the fixed part itself.
    Subdomains(Host),
    /// A `*` inside a label (`api-*.example.com`) or standing for one label (`a.*.example.com`); each
    /// `*` stays within its label. `any_prefix` is set for a leading `*.`.
    Glob { labels: Vec<String>, any_prefix: bool },
}

/// Why a pattern was refused; [`PatternError::hint`] says what to write instead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PatternError {
    Empty,
    Scheme {
        written: String,
        host: String,
    },
    Path {
        written: String,
        host: String,
    },
    LoneStar,
    BareWildcardPrefix,
    /// A label of two or more stars (`**.example.com`, `a.**.example.com`): sluice has no `**`, and what
    /// the author meant (any depth? the name itself too?) cannot be guessed. `leading` is set when it
    /// stands where `*.` would.
    StarStarLabel {
        written: String,
        suggestion: String,
        leading: bool,
    },
    PublicSuffix {
        fixed: String,
    },
    NotCanonical {
        written: String,
        canonical: String,
    },
    Host(HostError),
    IpLiteral {
        written: String,
    },
    NumericName {
        written: String,
    },
    Port {
        written: String,
    },
}

impl fmt::Display for PatternError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PatternError::Empty => f.write_str("empty pattern"),
            PatternError::Scheme { written, .. } => {
                write!(f, "pattern {written:?} has a scheme; patterns name hosts, not URLs")
            }
            PatternError::Path { written, .. } => {
                write!(f, "pattern {written:?} has a path; patterns name hosts, not URLs")
            }
            PatternError::LoneStar => f.write_str("pattern \"*\" would allow every host"),
            PatternError::BareWildcardPrefix => f.write_str("pattern \"*.\" has nothing after the wildcard"),
            PatternError::StarStarLabel { written, .. } => write!(
                f,
                "pattern {written:?} has a \"**\" label, which sluice does not have: \"*.\" at the front matches \
                 one or more labels, and \"*\" anywhere else exactly one"
            ),
            PatternError::PublicSuffix { fixed } => {
                write!(f, "pattern is too broad: its fixed part {fixed:?} is a public suffix")
            }
            PatternError::NotCanonical { written, canonical } => write!(
                f,
                "pattern {written:?} is not in canonical form (lowercase ASCII, punycode); write {canonical:?}"
            ),
            PatternError::Host(e) => write!(f, "invalid host in pattern: {e}"),
            PatternError::IpLiteral { written } => {
                write!(f, "pattern {written:?} is an IP address; host patterns never match addresses")
            }
            PatternError::NumericName { written } => write!(
                f,
                "pattern {written:?} ends in a numeric label, so it could only match an IP address, which host patterns never do"
            ),
            PatternError::Port { written } => {
                write!(f, "invalid port {written:?}: expected a number from 1 to 65535")
            }
        }
    }
}

impl std::error::Error for PatternError {}

impl PatternError {
    /// One line telling the author what to write instead.
    pub fn hint(&self) -> Option<String> {
        Some(match self {
            PatternError::Empty => "remove the empty string".to_string(),
            PatternError::Scheme { host, .. } | PatternError::Path { host, .. } => {
                format!("write the host alone: {host:?} (add \":PORT\" for a port other than the policy's ports)")
            }
            PatternError::LoneStar | PatternError::BareWildcardPrefix | PatternError::PublicSuffix { .. } => {
                "name the domains you need (e.g. \"*.example.com\"), or use level = \"full\" to allow every public host"
                    .to_string()
            }
            PatternError::NotCanonical { canonical, .. } => format!("write {canonical:?}"),
            PatternError::StarStarLabel { suggestion, leading: true, .. } => {
                let bare = suggestion.strip_prefix("*.").unwrap_or(suggestion);
                format!("write {suggestion:?}, which never matches {bare:?} itself: list that too if it should")
            }
            PatternError::StarStarLabel { suggestion, leading: false, .. } => {
                format!("write {suggestion:?} for exactly one label there, or list each depth you need")
            }
            PatternError::Host(_) => {
                "a pattern is a host name, optionally starting with \"*.\" and ending with \":PORT\"".to_string()
            }
            PatternError::IpLiteral { written } => {
                // allow_ips takes addresses and networks, not ports: the example must load as written.
                let ip = match written.strip_prefix('[') {
                    Some(rest) => rest.split(']').next().unwrap_or(rest),
                    None => match written.rsplit_once(':') {
                        Some((ip, port)) if ip.parse::<std::net::Ipv4Addr>().is_ok() && port.parse::<u16>().is_ok() => {
                            ip
                        }
                        _ => written,
                    },
                };
                format!("put addresses in allow_ips, e.g. allow_ips = [\"{ip}\"]")
            }
            PatternError::NumericName { .. } => {
                "put addresses in allow_ips, e.g. allow_ips = [\"192.0.2.0/24\"]".to_string()
            }
            PatternError::Port { .. } => "ports are 1 to 65535, e.g. \"registry.example.com:8443\"".to_string(),
        })
    }
}

/// Whether `name` is a public suffix (an ICANN suffix, or a TLD the list does not know): a pattern
/// fixed on one would reach every registrant under it.
pub fn is_public_suffix(name: &str) -> bool {
    match psl::suffix(name.as_bytes()) {
        Some(suffix) => suffix.as_bytes() == name.as_bytes() && suffix.typ() != Some(psl::Type::Private),
        None => false,
    }
}

impl HostPattern {
    /// Parses a pattern as written in a policy file. Authors must write the canonical form, so that the
    /// file says exactly what is matched.
    pub fn parse(written: &str) -> Result<HostPattern, PatternError> {
        if written.is_empty() {
            return Err(PatternError::Empty);
        }
        if let Some((_, rest)) = written.split_once("://") {
            let host = rest.split(['/', '?', '#']).next().unwrap_or(rest).to_string();
            return Err(PatternError::Scheme { written: written.to_string(), host });
        }
        if let Some((host, _)) = written.split_once('/') {
            return Err(PatternError::Path { written: written.to_string(), host: host.to_string() });
        }
        if written.starts_with('[') || written.matches(':').count() > 1 {
            let bare = written.strip_prefix('[').and_then(|r| r.split(']').next()).unwrap_or(written);
            if written.starts_with('[') || bare.parse::<std::net::Ipv6Addr>().is_ok() {
                return Err(PatternError::IpLiteral { written: written.to_string() });
            }
            // Two colons and no address: the port is what is wrong (`a.b:443:`).
            let port = written.split_once(':').map_or("", |(_, p)| p);
            return Err(PatternError::Port { written: port.to_string() });
        }
        let (host_part, port) = match written.rsplit_once(':') {
            Some((h, p)) => (h, Some(parse_port(p)?)),
            None => (written, None),
        };
        match host_part {
            "" => return Err(PatternError::Empty),
            "*" => return Err(PatternError::LoneStar),
            "*." => return Err(PatternError::BareWildcardPrefix),
            _ => {}
        }
        if !host_part.contains('*')
            && let Ok(Target::Ip(_)) = Target::parse(host_part)
        {
            return Err(PatternError::IpLiteral { written: written.to_string() });
        }
        // A destination whose last label is a number is an address or an error, never a name, so such
        // a pattern would load and then silently never match.
        if ends_in_number(host_part) {
            return Err(PatternError::NumericName { written: written.to_string() });
        }
        check_canonical(written, host_part, port)?;

        let (any_prefix, fixed_part) = match host_part.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, host_part),
        };
        let kind = if !fixed_part.contains('*') {
            let host = Host::parse(fixed_part).map_err(PatternError::Host)?;
            if is_public_suffix(host.as_str()) {
                return Err(PatternError::PublicSuffix { fixed: host.to_string() });
            }
            if any_prefix { PatternKind::Subdomains(host) } else { PatternKind::Exact(host) }
        } else {
            let labels: Vec<String> = fixed_part.split('.').map(str::to_string).collect();
            if labels.iter().any(|l| is_star_star(l)) {
                return Err(star_star_label(written, host_part, port));
            }
            // Every label must be a valid label once its stars are taken out (a star may stand for the
            // whole label).
            let probe: Vec<String> =
                labels.iter().map(|l| if l == "*" { "x".into() } else { l.replace('*', "") }).collect();
            Host::parse(&probe.join(".")).map_err(PatternError::Host)?;
            let last_wild = labels.iter().rposition(|l| l.contains('*')).unwrap_or(0);
            let fixed = labels[last_wild + 1..].join(".");
            if fixed.is_empty() || is_public_suffix(&fixed) {
                return Err(PatternError::PublicSuffix {
                    fixed: if fixed.is_empty() { host_part.to_string() } else { fixed },
                });
            }
            PatternKind::Glob { labels, any_prefix }
        };
        Ok(HostPattern { kind, port })
    }

    pub fn kind(&self) -> &PatternKind {
        &self.kind
    }

    pub fn port(&self) -> Option<u16> {
        self.port
    }

    /// Whether the host part matches `host` (ports are the caller's business). The compiled matcher
    /// answers the same question by hashed lookups; this is the reference it is tested against.
    pub fn matches_host(&self, host: &Host) -> bool {
        let name = host.as_str();
        match &self.kind {
            PatternKind::Exact(h) => h == host,
            PatternKind::Subdomains(fixed) => {
                name.strip_suffix(fixed.as_str()).is_some_and(|prefix| prefix.len() > 1 && prefix.ends_with('.'))
            }
            PatternKind::Glob { labels, any_prefix } => {
                let host_labels: Vec<&str> = name.split('.').collect();
                if host_labels.len() < labels.len() || (!any_prefix && host_labels.len() != labels.len()) {
                    return false;
                }
                if *any_prefix && host_labels.len() == labels.len() {
                    return false;
                }
                let tail = &host_labels[host_labels.len() - labels.len()..];
                labels.iter().zip(tail).all(|(p, l)| label_glob_matches(p, l))
            }
        }
    }

    /// The glob in "labels as path components" form, so that globset's `*` cannot cross a `.`.
    pub(crate) fn to_component_glob(&self) -> Option<String> {
        match &self.kind {
            PatternKind::Glob { labels, any_prefix } => {
                let body = labels.join("/");
                Some(if *any_prefix { format!("*/**/{body}") } else { body })
            }
            _ => None,
        }
    }
}

/// A label of stars only, more than one of them.
fn is_star_star(label: &str) -> bool {
    label.len() > 1 && label.bytes().all(|b| b == b'*')
}

/// The refusal of a pattern with a `**` label, suggesting the pattern with each such label written `*`
/// (and a leading run of them as one `*.`). When that suggestion is itself refused (`**.com`), its own
/// refusal is the answer, so the author is never told to write something that does not load either.
fn star_star_label(written: &str, host_part: &str, port: Option<u16>) -> PatternError {
    let mut labels: Vec<&str> = host_part.split('.').map(|l| if is_star_star(l) { "*" } else { l }).collect();
    let leading = host_part.split('.').take_while(|l| l.bytes().all(|b| b == b'*')).any(is_star_star);
    while labels.len() > 1 && labels[0] == "*" && labels[1] == "*" {
        labels.remove(0);
    }
    let port = port.map(|p| format!(":{p}")).unwrap_or_default();
    let suggestion = format!("{}{port}", labels.join("."));
    match HostPattern::parse(&suggestion) {
        Ok(_) => PatternError::StarStarLabel { written: written.to_string(), suggestion, leading },
        Err(e) => e,
    }
}

fn parse_port(p: &str) -> Result<u16, PatternError> {
    let err = || PatternError::Port { written: p.to_string() };
    if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) || p.len() > 5 {
        return Err(err());
    }
    match p.parse::<u16>() {
        Ok(0) | Err(_) => Err(err()),
        Ok(n) => Ok(n),
    }
}

fn check_canonical(written: &str, host_part: &str, port: Option<u16>) -> Result<(), PatternError> {
    let canonical_chars = host_part
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.' | b'*'));
    if canonical_chars && !host_part.ends_with('.') {
        return Ok(());
    }
    // Work out the form to suggest by normalising the pattern with its stars set aside.
    let (prefix, rest) = match host_part.strip_prefix("*.") {
        Some(rest) => ("*.", rest),
        None => ("", host_part),
    };
    let suggestion =
        if rest.contains('*') { Some(rest.to_lowercase()) } else { Host::parse(rest).ok().map(|h| h.to_string()) };
    match suggestion {
        Some(c) => {
            let port = port.map(|p| format!(":{p}")).unwrap_or_default();
            Err(PatternError::NotCanonical { written: written.to_string(), canonical: format!("{prefix}{c}{port}") })
        }
        None => Err(PatternError::Host(Host::parse(rest).err().unwrap_or(HostError::Idna))),
    }
}

/// `*` within one label: matches any run of characters (none included) of that label.
fn label_glob_matches(pattern: &str, label: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == label;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if label.len() < first.len() + last.len() || !label.starts_with(first) || !label.ends_with(last) {
        return false;
    }
    let mut rest = &label[first.len()..label.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            PatternKind::Exact(h) => write!(f, "{h}")?,
            PatternKind::Subdomains(h) => write!(f, "*.{h}")?,
            PatternKind::Glob { labels, any_prefix } => {
                if *any_prefix {
                    f.write_str("*.")?;
                }
                f.write_str(&labels.join("."))?;
            }
        }
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> String {
        match HostPattern::parse(s) {
            Ok(p) => p.to_string(),
            Err(e) => format!("error: {e}"),
        }
    }

    fn matches(p: &str, h: &str) -> bool {
        HostPattern::parse(p).unwrap().matches_host(&Host::parse(h).unwrap())
    }

    #[test]
    fn accepted_forms_round_trip() {
        for p in [
            "example.com",
            "*.example.com",
            "registry.example.com:8443",
            "api-*.example.com",
            "*.api-*.example.com",
            "a.*.example.com",
            "*.gcr.io",
            "xn--bcher-kva.example",
        ] {
            assert_eq!(parse(p), p);
        }
    }

    #[test]
    fn refused_forms() {
        assert_eq!(parse("*"), "error: pattern \"*\" would allow every host");
        assert_eq!(parse("*."), "error: pattern \"*.\" has nothing after the wildcard");
        assert_eq!(parse("*.com"), "error: pattern is too broad: its fixed part \"com\" is a public suffix");
        assert_eq!(parse("*.co.uk"), "error: pattern is too broad: its fixed part \"co.uk\" is a public suffix");
        assert_eq!(parse("api-*.com"), "error: pattern is too broad: its fixed part \"com\" is a public suffix");
        assert_eq!(parse("com"), "error: pattern is too broad: its fixed part \"com\" is a public suffix");
        assert_eq!(
            parse("https://api.example.com/x"),
            "error: pattern \"https://api.example.com/x\" has a scheme; patterns name hosts, not URLs"
        );
        assert_eq!(
            parse("api.example.com/v1"),
            "error: pattern \"api.example.com/v1\" has a path; patterns name hosts, not URLs"
        );
        assert_eq!(
            parse("API.Example.com"),
            "error: pattern \"API.Example.com\" is not in canonical form (lowercase ASCII, punycode); write \"api.example.com\""
        );
        assert_eq!(
            parse("*.bücher.example:8443"),
            "error: pattern \"*.bücher.example:8443\" is not in canonical form (lowercase ASCII, punycode); write \"*.xn--bcher-kva.example:8443\""
        );
        assert_eq!(
            parse("example.com."),
            "error: pattern \"example.com.\" is not in canonical form (lowercase ASCII, punycode); write \"example.com\""
        );
        assert_eq!(parse("example.com:0"), "error: invalid port \"0\": expected a number from 1 to 65535");
        assert_eq!(parse("example.com:65536"), "error: invalid port \"65536\": expected a number from 1 to 65535");
        assert_eq!(parse("example.com:+443"), "error: invalid port \"+443\": expected a number from 1 to 65535");
        assert_eq!(
            parse("10.0.0.1"),
            "error: pattern \"10.0.0.1\" is an IP address; host patterns never match addresses"
        );
        assert_eq!(
            parse("[::1]:443"),
            "error: pattern \"[::1]:443\" is an IP address; host patterns never match addresses"
        );
        assert_eq!(
            parse("a..example.com"),
            "error: invalid host in pattern: empty label (two dots in a row, or a leading dot)"
        );
        assert_eq!(parse(""), "error: empty pattern");
        // The hint's example is what allow_ips accepts: the address without its port.
        let hint = |p: &str| HostPattern::parse(p).err().and_then(|e| e.hint());
        for (p, ip) in
            [("127.0.0.1", "127.0.0.1"), ("127.0.0.1:8080", "127.0.0.1"), ("[::1]:443", "::1"), ("::1", "::1")]
        {
            assert_eq!(hint(p), Some(format!("put addresses in allow_ips, e.g. allow_ips = [\"{ip}\"]")), "{p}");
            let policy = format!("version = 1\nname = \"p\"\nlevel = \"custom\"\nallow_ips = [\"{ip}\"]\n");
            assert!(
                crate::policy::parse_policy("p.toml", &policy, &crate::policy::DefaultList::builtin()).is_ok(),
                "{ip}"
            );
        }
        let star_star = |p: &str| {
            let e = HostPattern::parse(p).err();
            (e.as_ref().map(ToString::to_string), e.and_then(|e| e.hint()))
        };
        let message = |p: &str| {
            Some(format!(
                "pattern {p:?} has a \"**\" label, which sluice does not have: \"*.\" at the front matches one or \
                 more labels, and \"*\" anywhere else exactly one"
            ))
        };
        for p in ["**.example.com", "*.**.example.com", "***.*.example.com"] {
            let hint =
                "write \"*.example.com\", which never matches \"example.com\" itself: list that too if it should";
            assert_eq!(star_star(p), (message(p), Some(hint.into())), "{p}");
        }
        assert_eq!(
            star_star("**.example.com:8443"),
            (
                message("**.example.com:8443"),
                Some(
                    "write \"*.example.com:8443\", which never matches \"example.com:8443\" itself: list that too \
                     if it should"
                        .into()
                )
            )
        );
        assert_eq!(
            star_star("a.**.example.com"),
            (
                message("a.**.example.com"),
                Some("write \"a.*.example.com\" for exactly one label there, or list each depth you need".into())
            )
        );
        // Where the suggestion would be refused too, that refusal is the answer.
        assert_eq!(parse("**.com"), "error: pattern is too broad: its fixed part \"com\" is a public suffix");
        assert_eq!(parse("**"), "error: pattern \"*\" would allow every host");
        assert_eq!(parse("a.example.com:443:"), "error: invalid port \"443:\": expected a number from 1 to 65535");
        assert_eq!(parse("::1"), "error: pattern \"::1\" is an IP address; host patterns never match addresses");
        for p in ["*.0.0.1", "1.2.3.256", "example.0x7f", "api-*.1:443"] {
            assert_eq!(
                parse(p),
                format!(
                    "error: pattern {p:?} ends in a numeric label, so it could only match an IP address, which host patterns never do"
                )
            );
        }
    }

    #[test]
    fn wildcard_semantics() {
        assert!(matches("*.gcr.io", "a.gcr.io"));
        assert!(matches("*.gcr.io", "a.b.gcr.io"));
        assert!(!matches("*.gcr.io", "gcr.io"));
        assert!(!matches("*.gcr.io", "evilgcr.io"));
        assert!(!matches("github.com", "api.github.com"));
        assert!(!matches("github.com", "github.com.evil.com"));
        assert!(matches("api-*.example.com", "api-eu.example.com"));
        assert!(matches("api-*.example.com", "api-.example.com"));
        assert!(!matches("api-*.example.com", "api-eu.x.example.com"));
        assert!(!matches("api-*.example.com", "x.api-eu.example.com"));
        assert!(matches("*.api-*.example.com", "x.api-eu.example.com"));
        assert!(!matches("*.api-*.example.com", "api-eu.example.com"));
        assert!(matches("a.*.example.com", "a.b.example.com"));
        assert!(!matches("a.*.example.com", "a.b.c.example.com"));
        assert!(matches("s3-*-*.example.com", "s3-eu-west.example.com"));
        // Inside a label, `**` is `*` (validate warns about it).
        assert!(matches("api-**.example.com", "api-eu.example.com"));
        assert!(!matches("api-**.example.com", "api-eu.x.example.com"));
        assert_eq!(parse("api-**.example.com"), "api-**.example.com");
    }
}
