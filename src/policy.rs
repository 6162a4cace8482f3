//! Network policy: the four levels, a session's allow and deny lists, and `decide`, which turns a
//! destination into a [`Decision`] value (never an error).

pub mod defaults;
pub mod file;
pub mod guard;
pub mod host;
pub mod inspection;
mod lint;
pub mod matcher;
pub mod pattern;
pub mod quota;
pub mod request;
pub mod set;

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use serde::Serialize;

pub use defaults::{BUILTIN_DEFAULTS, BUILTIN_DEFAULTS_FILE, DEFAULTS_FILE_NAME, DefaultList};
pub use file::parse_policy;
pub use guard::BlockedRange;
pub use host::{Authority, AuthorityError, Host, HostError, Target};
pub use inspection::{InspectMode, Inspection};
pub use pattern::{HostPattern, PatternError};
pub use request::{Action, RequestOutcome, RequestRule, RequestRules, normalize_path, path_spellings};
pub use set::{PolicySet, toml_files};

use matcher::{Lookup, Matcher};

/// How much of the network a session may reach.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    None,
    Trusted,
    Full,
    Custom,
}

impl Level {
    pub const ALL: [Level; 4] = [Level::None, Level::Trusted, Level::Full, Level::Custom];

    pub fn as_str(self) -> &'static str {
        match self {
            Level::None => "none",
            Level::Trusted => "trusted",
            Level::Full => "full",
            Level::Custom => "custom",
        }
    }

    pub fn parse(s: &str) -> Option<Level> {
        Level::ALL.into_iter().find(|l| l.as_str() == s)
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether a policy's own denies are enforced, or served and reported (`mode = "report"`), to learn
/// what a policy would break before it is enforced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Enforce,
    Report,
}

impl Mode {
    pub const ALL: [Mode; 2] = [Mode::Enforce, Mode::Report];

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Report => "report",
        }
    }

    pub fn parse(s: &str) -> Option<Mode> {
        Mode::ALL.into_iter().find(|m| m.as_str() == s)
    }

    /// Whether a request refused for `reason` is served in this mode (and recorded as `would_deny`):
    /// only in report mode, and only when the policy's own rules refused it.
    pub fn serves(self, reason: &Reason) -> bool {
        self == Mode::Report && reason.policy_can_lift()
    }
}

/// Per-session limits a policy may set; unset ones fall back to the server's defaults.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Limits {
    pub requests_per_second: Option<f64>,
    pub burst: Option<u32>,
    pub max_tunnels: Option<u32>,
    /// Shaping: bytes per second towards destinations, shared by all the session's tunnels and requests.
    pub upload_bytes_per_second: Option<quota::ByteSize>,
    /// Shaping: bytes per second from destinations.
    pub download_bytes_per_second: Option<quota::ByteSize>,
    /// Bytes towards destinations per fixed window (`2GiB/hour`).
    pub upload_quota: Option<quota::ByteQuota>,
    pub download_quota: Option<quota::ByteQuota>,
}

/// Which list a rule came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleList {
    Allow,
    Deny,
    Defaults,
    AllowIps,
    Level,
    Guard,
    /// A `[[requests]]` table.
    Requests,
    /// `tls_passthrough`.
    TlsPassthrough,
}

/// The entry that decided: its text as the author wrote it (canonical), and where it stands.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Rule {
    pub pattern: Arc<str>,
    pub list: RuleList,
    pub file: Arc<str>,
    pub line: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<Arc<str>>,
}

impl Rule {
    /// `FILE:LINE`, or `FILE` for a rule without a line (a built-in level).
    pub fn location(&self) -> String {
        let mut out = String::with_capacity(self.file.len() + 8);
        self.push_location(&mut out);
        out
    }

    /// `FILE:LINE` (or `FILE`) at the end of `out`.
    fn push_location(&self, out: &mut String) {
        use std::fmt::Write;
        out.push_str(&self.file);
        if self.line > 0 {
            // Writing to a String cannot fail.
            let _ = write!(out, ":{}", self.line);
        }
    }

    /// `PATTERN (FILE:LINE)`, for log lines: every admitted request's decision line has one, so it is
    /// put together in one buffer rather than formatted twice over.
    pub fn summary(&self) -> String {
        let mut out = String::with_capacity(self.pattern.len() + self.file.len() + 24);
        out.push_str(&self.pattern);
        out.push_str(" (");
        self.push_location(&mut out);
        out.push(')');
        out
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rule={:?} ({}", &*self.pattern, self.location())?;
        if let Some(g) = &self.group {
            write!(f, ", group {:?}", &**g)?;
        }
        f.write_str(")")
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allow,
    Deny,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
        }
    }
}

/// Why a destination was allowed or refused. `code()` is stable (logs, metrics, headers); `Display` is
/// the sentence a person reads.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "code", rename_all = "snake_case")]
pub enum Reason {
    Allowlisted,
    DefaultAllowlisted,
    FullLevel,
    AllowedIp,
    LevelNone,
    Denylisted,
    NotAllowlisted,
    PortNotAllowed {
        port: u16,
        allowed: Vec<u16>,
    },
    IpNotAllowed {
        ip: IpAddr,
    },
    BlockedAddress {
        ip: IpAddr,
        range: String,
    },
    BlockedName {
        name: String,
        range: String,
    },
    OwnAddress {
        ip: IpAddr,
        port: u16,
    },
    InvalidPort,
    /// A `[[requests]]` allow rule matched the request.
    RequestAllowed,
    /// A `[[requests]]` deny rule matched the request.
    RequestDenied {
        method: String,
        path: String,
    },
    /// The host has request allow rules and none matched.
    NoRequestRule {
        method: String,
        path: String,
    },
    /// The request body is larger than the allowing rule's `max_body`.
    BodyTooLarge {
        max: u64,
        length: u64,
    },
}

impl Reason {
    pub fn code(&self) -> &'static str {
        match self {
            Reason::Allowlisted => "allowlisted",
            Reason::DefaultAllowlisted => "default_allowlisted",
            Reason::FullLevel => "full_level",
            Reason::AllowedIp => "allowed_ip",
            Reason::LevelNone => "level_none",
            Reason::Denylisted => "denylisted",
            Reason::NotAllowlisted => "not_allowlisted",
            Reason::PortNotAllowed { .. } => "port_not_allowed",
            Reason::IpNotAllowed { .. } => "ip_not_allowed",
            Reason::BlockedAddress { .. } => "blocked_address",
            Reason::BlockedName { .. } => "blocked_name",
            Reason::OwnAddress { .. } => "own_address",
            Reason::InvalidPort => "invalid_port",
            Reason::RequestAllowed => "request_allowed",
            Reason::RequestDenied { .. } => "request_denied",
            Reason::NoRequestRule { .. } => "no_request_rule",
            Reason::BodyTooLarge { .. } => "body_too_large",
        }
    }

    /// Whether a policy's own entries made this deny, so that a policy could lift it (and report mode
    /// serves it). The address guard's refusals (blocked addresses and names, the proxy's own
    /// addresses) and port 0 are never lifted by any policy.
    pub fn policy_can_lift(&self) -> bool {
        matches!(
            self,
            Reason::LevelNone
                | Reason::Denylisted
                | Reason::NotAllowlisted
                | Reason::PortNotAllowed { .. }
                | Reason::IpNotAllowed { .. }
                | Reason::RequestDenied { .. }
                | Reason::NoRequestRule { .. }
                | Reason::BodyTooLarge { .. }
        )
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Allowlisted => f.write_str("in the policy's allow list"),
            Reason::DefaultAllowlisted => f.write_str("in the default allowlist"),
            Reason::FullLevel => f.write_str("level full allows any public destination"),
            Reason::AllowedIp => f.write_str("address covered by allow_ips"),
            Reason::LevelNone => f.write_str("level none allows no outbound connections"),
            Reason::Denylisted => f.write_str("in the policy's deny list"),
            Reason::NotAllowlisted => f.write_str("not in the allowlist"),
            Reason::PortNotAllowed { port, allowed } => {
                let list: Vec<String> = allowed.iter().map(u16::to_string).collect();
                write!(f, "port {port} not allowed (allowed ports: {})", list.join(", "))
            }
            Reason::IpNotAllowed { ip } => {
                write!(f, "IP address {ip} is not covered by allow_ips (addresses never match host patterns)")
            }
            Reason::BlockedAddress { ip, range } => write!(f, "{range} {ip}"),
            Reason::BlockedName { name, range } => write!(f, "{name} always means a {range}"),
            Reason::OwnAddress { ip, port } => write!(f, "{ip}:{port} is this proxy's own listening address"),
            Reason::InvalidPort => f.write_str("port 0 is not a destination"),
            Reason::RequestAllowed => f.write_str("allowed by a request rule"),
            Reason::RequestDenied { method, path } => write!(f, "{method} {path} is refused by a request rule"),
            Reason::NoRequestRule { method, path } => {
                write!(f, "no request rule allows {method} {path} (this host's requests need one)")
            }
            Reason::BodyTooLarge { max, length } => {
                write!(f, "the request body ({length} bytes) is larger than the rule's max_body ({max} bytes)")
            }
        }
    }
}

/// The outcome of `decide`: a value with its reason and the rule behind it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub verdict: Verdict,
    pub reason: Reason,
    /// Shared with the policy: cloning a decision's rule is one reference count, not one per field.
    pub rule: Option<Arc<Rule>>,
    pub policy: Arc<str>,
    pub level: Level,
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        self.verdict == Verdict::Allow
    }

    /// What a policy author would change to allow this destination, when anything would.
    pub fn hint(&self, target: &Target, port: u16) -> Option<String> {
        let host = target.to_authority_host();
        Some(match &self.reason {
            Reason::NotAllowlisted => format!(
                "to allow it, add \"{host}\" (or \"{host}:{port}\") to `allow` in a policy with level = \"custom\" (include_defaults = true keeps the default list)"
            ),
            Reason::PortNotAllowed { .. } => {
                format!("to allow it, add \"{host}:{port}\" to `allow`, or {port} to `ports`")
            }
            Reason::Denylisted => match &self.rule {
                Some(r) => format!("remove \"{}\" from `deny` ({})", r.pattern, r.location()),
                None => "remove the entry from `deny`".to_string(),
            },
            Reason::LevelNone => "use a policy with level \"trusted\", \"custom\" or \"full\"".to_string(),
            Reason::RequestDenied { .. } => match &self.rule {
                Some(r) => {
                    format!("the [[requests]] deny rule at {} refuses it; narrow or remove that rule", r.location())
                }
                None => "remove the [[requests]] deny rule".to_string(),
            },
            Reason::NoRequestRule { method, path } => format!(
                "to allow it, add a [[requests]] rule with hosts = [\"{host}\"], methods = [\"{method}\"], paths = [\"{path}\"] and action = \"allow\""
            ),
            Reason::BodyTooLarge { .. } => match &self.rule {
                Some(r) => format!("raise max_body in the [[requests]] rule at {}", r.location()),
                None => "raise max_body in the [[requests]] rule".to_string(),
            },
            Reason::IpNotAllowed { ip } | Reason::BlockedAddress { ip, .. } => {
                let net = match ip {
                    IpAddr::V4(_) => format!("{ip}/32"),
                    IpAddr::V6(_) => format!("{ip}/128"),
                };
                format!(
                    "connect by host name, or add \"{net}\" to `allow_ips` if this address is meant to be reachable"
                )
            }
            _ => return None,
        })
    }
}

/// Allow-list entries carry their rule; deny entries too.
pub(crate) type RuleMatcher = Matcher<Arc<Rule>>;

/// One named policy, compiled.
#[derive(Debug)]
pub struct Policy {
    pub name: Arc<str>,
    pub level: Level,
    /// `report`: the policy's own denies are served and recorded as `would_deny`.
    pub mode: Mode,
    /// Where it was defined: a file path, or `built-in`.
    pub source: Arc<str>,
    /// The rule decisions made by the level itself point at: `level = …` in `source`.
    pub(crate) level_rule: Arc<Rule>,
    pub include_defaults: bool,
    pub(crate) allow: RuleMatcher,
    pub(crate) deny: RuleMatcher,
    pub(crate) defaults: Option<Arc<DefaultList>>,
    /// Ports for entries that name none, sorted.
    pub ports: Vec<u16>,
    /// Whether `ports` was written in the file; level full allows every port unless it was.
    pub ports_explicit: bool,
    pub allow_ips: Vec<(IpNet, Arc<Rule>)>,
    pub limits: Limits,
    /// Which tunnels are terminated to see the requests inside (`inspect`).
    pub inspection: Inspection,
    /// `tls_passthrough`: hosts never terminated.
    pub(crate) tls_passthrough: RuleMatcher,
    /// `[[requests]]`.
    pub requests: RequestRules,
}

/// The ports an entry without `:port` allows when a policy names none.
pub const DEFAULT_PORTS: [u16; 2] = [80, 443];

impl Policy {
    /// A built-in policy at `level` over the given default list.
    pub fn builtin(level: Level, defaults: Arc<DefaultList>) -> Policy {
        let source: Arc<str> = "built-in".into();
        Policy {
            name: level.as_str().into(),
            level,
            mode: Mode::Enforce,
            level_rule: Policy::level_rule(level, source.clone(), 0),
            source,
            include_defaults: level == Level::Trusted,
            allow: Matcher::default(),
            deny: Matcher::default(),
            defaults: (level == Level::Trusted).then_some(defaults),
            ports: DEFAULT_PORTS.to_vec(),
            ports_explicit: false,
            allow_ips: Vec::new(),
            limits: Limits::default(),
            // The built-in levels have no request rules, so `auto` terminates nothing.
            inspection: Inspection::default(),
            tls_passthrough: Matcher::default(),
            requests: RequestRules::default(),
        }
    }

    fn decision(&self, verdict: Verdict, reason: Reason, rule: Option<Arc<Rule>>) -> Decision {
        Decision { verdict, reason, rule, policy: self.name.clone(), level: self.level }
    }

    /// The rule for decisions the level makes by itself; `line` is where `level = …` was written (0 for
    /// a built-in policy).
    pub(crate) fn level_rule(level: Level, source: Arc<str>, line: usize) -> Arc<Rule> {
        Arc::new(Rule {
            pattern: format!("level = \"{level}\"").into(),
            list: RuleList::Level,
            file: source,
            line,
            group: None,
        })
    }

    fn port_allowed(&self, pattern: &HostPattern, port: u16) -> bool {
        match pattern.port() {
            Some(p) => p == port,
            None => self.ports.binary_search(&port).is_ok(),
        }
    }

    fn any_port(&self) -> bool {
        self.level == Level::Full && !self.ports_explicit
    }

    /// Decides a destination before DNS. Names are matched against the deny list, then the level's
    /// allow lists; addresses only against `allow_ips` and the guard. A name that is allowed here still
    /// has its resolved addresses checked by [`Policy::check_address`].
    pub fn decide(&self, target: &Target, port: u16) -> Decision {
        if port == 0 {
            return self.decision(Verdict::Deny, Reason::InvalidPort, None);
        }
        if self.level == Level::None {
            return self.decision(Verdict::Deny, Reason::LevelNone, Some(self.level_rule.clone()));
        }
        match target {
            Target::Ip(ip) => self.decide_ip(*ip, port),
            Target::Name(host) => self.decide_name(host, port),
        }
    }

    fn decide_ip(&self, ip: IpAddr, port: u16) -> Decision {
        if let Some(rule) = self.allowed_ip(ip) {
            if !self.any_port() && self.ports.binary_search(&port).is_err() {
                return self.decision(
                    Verdict::Deny,
                    Reason::PortNotAllowed { port, allowed: self.ports.clone() },
                    Some(rule.clone()),
                );
            }
            return self.decision(Verdict::Allow, Reason::AllowedIp, Some(rule.clone()));
        }
        if let Some(range) = guard::classify(ip) {
            return self.decision(Verdict::Deny, Reason::BlockedAddress { ip, range: range.to_string() }, None);
        }
        if self.level == Level::Full {
            if !self.any_port() && self.ports.binary_search(&port).is_err() {
                return self.decision(
                    Verdict::Deny,
                    Reason::PortNotAllowed { port, allowed: self.ports.clone() },
                    Some(self.level_rule.clone()),
                );
            }
            return self.decision(Verdict::Allow, Reason::FullLevel, Some(self.level_rule.clone()));
        }
        self.decision(Verdict::Deny, Reason::IpNotAllowed { ip }, None)
    }

    fn decide_name(&self, host: &Host, port: u16) -> Decision {
        if let Some(range) = guard::blocked_name(host.as_str()) {
            return self.decision(
                Verdict::Deny,
                Reason::BlockedName { name: host.to_string(), range: range.to_string() },
                None,
            );
        }
        // Deny entries without a port refuse every port.
        if let Lookup::Hit(_, rule) = self.deny.lookup(host, |p| p.port().is_none_or(|q| q == port)) {
            return self.decision(Verdict::Deny, Reason::Denylisted, Some(rule.clone()));
        }
        if self.level == Level::Full {
            if !self.any_port() && self.ports.binary_search(&port).is_err() {
                return self.decision(
                    Verdict::Deny,
                    Reason::PortNotAllowed { port, allowed: self.ports.clone() },
                    Some(self.level_rule.clone()),
                );
            }
            return self.decision(Verdict::Allow, Reason::FullLevel, Some(self.level_rule.clone()));
        }
        let port_ok = |p: &HostPattern| self.port_allowed(p, port);
        let mut mismatch = None;
        if self.level == Level::Custom {
            match self.allow.lookup(host, port_ok) {
                Lookup::Hit(_, rule) => return self.decision(Verdict::Allow, Reason::Allowlisted, Some(rule.clone())),
                Lookup::PortMismatch(_, rule) => mismatch = Some(rule),
                Lookup::Miss => {}
            }
        }
        if let Some(defaults) = &self.defaults {
            match defaults.matcher.lookup(host, port_ok) {
                Lookup::Hit(_, rule) => {
                    return self.decision(Verdict::Allow, Reason::DefaultAllowlisted, Some(rule.clone()));
                }
                Lookup::PortMismatch(_, rule) => mismatch = mismatch.or(Some(rule)),
                Lookup::Miss => {}
            }
        }
        match mismatch {
            Some(rule) => {
                let mut allowed: Vec<u16> = match rule_port(rule) {
                    Some(p) => vec![p],
                    None => self.ports.clone(),
                };
                allowed.dedup();
                self.decision(Verdict::Deny, Reason::PortNotAllowed { port, allowed }, Some(rule.clone()))
            }
            None => self.decision(Verdict::Deny, Reason::NotAllowlisted, None),
        }
    }

    fn allowed_ip(&self, ip: IpAddr) -> Option<&Arc<Rule>> {
        let ip = canonical_ip(ip);
        self.allow_ips.iter().find(|(net, _)| net.contains(&ip)).map(|(_, r)| r)
    }

    /// The guard after DNS: `Some(deny)` when a resolved address may not be dialled under this policy.
    pub fn check_address(&self, ip: IpAddr) -> Option<Decision> {
        if self.allowed_ip(ip).is_some() {
            return None;
        }
        guard::classify(ip)
            .map(|range| self.decision(Verdict::Deny, Reason::BlockedAddress { ip, range: range.to_string() }, None))
    }

    /// A refusal for dialling the proxy's own listener, which no `allow_ips` entry lifts.
    pub fn own_address(&self, ip: IpAddr, port: u16) -> Decision {
        self.decision(Verdict::Deny, Reason::OwnAddress { ip, port }, None)
    }

    /// Whether any tunnel of this policy may be terminated, so that the server needs a CA to serve it:
    /// `all`, or `auto` with request rules.
    pub fn asks_for_inspection(&self) -> bool {
        match self.inspection.mode {
            InspectMode::All => true,
            InspectMode::Auto => !self.requests.is_empty(),
            InspectMode::Off => false,
        }
    }

    /// Whether an allowed tunnel to this destination is terminated (SPEC §8 "When"): never for a
    /// `tls_passthrough` host; for every tunnel on `all`; for hosts with request rules on `auto`.
    pub fn terminates(&self, target: &Target, port: u16) -> bool {
        let mode = self.inspection.mode;
        if mode == InspectMode::Off || (mode == InspectMode::Auto && self.requests.is_empty()) {
            return false;
        }
        if let Target::Name(host) = target
            && !self.tls_passthrough.is_empty()
            && matches!(self.tls_passthrough.lookup(host, |p| p.port().is_none_or(|p| p == port)), Lookup::Hit(..))
        {
            return false;
        }
        mode == InspectMode::All || self.requests.names(target, port)
    }

    /// Decides one HTTP request to an allowed destination against the request rules. `None`: no rule
    /// names the host, and the host's decision stands. `path` is the request target's path (the query
    /// is ignored); `body` is the declared `Content-Length`, when there is one. An allowed decision
    /// carries the allowing rule's `max_body` for the body that is still to come.
    pub fn decide_request(
        &self,
        target: &Target,
        port: u16,
        method: &str,
        path: &str,
        body: Option<u64>,
    ) -> Option<(Decision, Option<u64>)> {
        let mut spellings = request::path_spellings(path);
        let outcome = self.requests.decide(target, port, method, &spellings);
        // Named by its canonical reading.
        let normalized = spellings.swap_remove(0);
        match outcome {
            RequestOutcome::Unruled => None,
            RequestOutcome::Denied(r) => {
                let reason = Reason::RequestDenied { method: method.to_string(), path: normalized };
                Some((self.decision(Verdict::Deny, reason, Some(r.rule.clone())), None))
            }
            RequestOutcome::NoRule => {
                let reason = Reason::NoRequestRule { method: method.to_string(), path: normalized };
                Some((self.decision(Verdict::Deny, reason, None), None))
            }
            RequestOutcome::Allowed(r) => match (r.max_body, body) {
                (Some(max), Some(length)) if length > max => {
                    let reason = Reason::BodyTooLarge { max, length };
                    Some((self.decision(Verdict::Deny, reason, Some(r.rule.clone())), None))
                }
                _ => Some((self.decision(Verdict::Allow, Reason::RequestAllowed, Some(r.rule.clone())), r.max_body)),
            },
        }
    }

    pub fn allow_len(&self) -> usize {
        self.allow.len()
    }

    /// Every entry of the policy's own allow and deny lists, in no particular order.
    pub fn patterns(&self) -> impl Iterator<Item = &HostPattern> {
        self.allow.entries().chain(self.deny.entries()).map(|(p, _)| p)
    }
}

/// An entry's own port, from its canonical text.
fn rule_port(rule: &Rule) -> Option<u16> {
    rule.pattern.rsplit_once(':').and_then(|(_, p)| p.parse().ok())
}

/// IPv4-mapped IPv6 addresses are compared as the IPv4 address they carry, so `allow_ips` written in
/// IPv4 covers both forms.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The built-in policies, keyed by name.
pub(crate) fn builtin_policies(defaults: &Arc<DefaultList>) -> BTreeMap<Arc<str>, Arc<Policy>> {
    [Level::None, Level::Trusted, Level::Full]
        .into_iter()
        .map(|l| {
            let p = Policy::builtin(l, defaults.clone());
            (p.name.clone(), Arc::new(p))
        })
        .collect()
}
