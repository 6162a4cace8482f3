//! Policy files: TOML as policy authors write it, validated while parsing into compiled policies, with
//! every mistake reported at `file:line:col` and every doubtful entry as a warning.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

use super::host::Host;
use super::matcher::{Lookup, Matcher};
use super::pattern::{HostPattern, PatternKind};
use super::{DEFAULT_PORTS, Level, Limits, Policy, Rule, RuleList, builtin_policies};
use crate::diagnostic::{Diagnostic, Diagnostics, Source, closest, from_toml_error};

/// The default list as shipped in the repository; compiled in so `sluice serve` needs no files.
pub const BUILTIN_DEFAULTS: &str = include_str!("../../policies/defaults.toml");
/// The name rules from the built-in default list point at.
pub const BUILTIN_DEFAULTS_FILE: &str = "policies/defaults.toml";
/// The file in a policies directory that replaces the built-in default list.
pub const DEFAULTS_FILE_NAME: &str = "defaults.toml";

/// The Trusted level's list, grouped as published.
#[derive(Debug)]
pub struct DefaultList {
    pub(crate) matcher: Matcher<Arc<Rule>>,
    pub groups: Vec<(Arc<str>, Vec<HostPattern>)>,
    pub source: Arc<str>,
}

impl DefaultList {
    /// The compiled-in list. Its validity is pinned by tests, so a failure here is a build defect.
    pub fn builtin() -> Arc<DefaultList> {
        static BUILTIN: OnceLock<Arc<DefaultList>> = OnceLock::new();
        BUILTIN
            .get_or_init(|| {
                let (list, _) = DefaultList::parse(BUILTIN_DEFAULTS_FILE, BUILTIN_DEFAULTS)
                    .unwrap_or_else(|e| panic!("the built-in default list is invalid:\n{e}"));
                Arc::new(list)
            })
            .clone()
    }

    /// Parses a default-list file: `version = 1` and `[[group]]` tables of `name` and `hosts`.
    pub fn parse(file: &str, text: &str) -> Result<(DefaultList, Vec<Diagnostic>), Diagnostics> {
        let src = Source::new(file, text);
        let raw: RawDefaults = toml::from_str(text).map_err(|e| Diagnostics(vec![from_toml_error(&src, &e)]))?;
        let mut diags = Vec::new();
        check_version(&src, raw.version.as_ref(), &mut diags);
        let source: Arc<str> = file.into();
        let mut groups = Vec::new();
        let mut entries = Vec::new();
        for group in &raw.group {
            let name: Arc<str> = group.name.get_ref().as_str().into();
            let mut patterns = Vec::new();
            for written in &group.hosts {
                if let Some(p) = parse_pattern(&src, written, &mut diags) {
                    let rule = rule_at(&src, &source, &p, written.span(), RuleList::Defaults, Some(name.clone()));
                    entries.push((p.clone(), rule, written.span()));
                    patterns.push(p);
                }
            }
            groups.push((name, patterns));
        }
        // The published list names some hosts its own wildcards cover; that is not a mistake to warn of.
        lint_list(&src, "the default list", &entries, false, &mut diags);
        finish(diags).map(|warnings| {
            let matcher = Matcher::new(entries.into_iter().map(|(p, r, _)| (p, r)));
            (DefaultList { matcher, groups, source }, warnings)
        })
    }

    pub fn len(&self) -> usize {
        self.matcher.len()
    }

    pub fn is_empty(&self) -> bool {
        self.matcher.is_empty()
    }
}

/// Every policy a server knows by name: the built-in `none`, `trusted` and `full`, then those of a
/// policies directory (which may replace the built-ins and the default list).
#[derive(Debug)]
pub struct PolicySet {
    policies: BTreeMap<Arc<str>, Arc<Policy>>,
    defaults: Arc<DefaultList>,
    /// Warnings found while loading (the set is usable).
    pub warnings: Vec<Diagnostic>,
}

impl PolicySet {
    pub fn builtin() -> PolicySet {
        let defaults = DefaultList::builtin();
        PolicySet { policies: builtin_policies(&defaults), defaults, warnings: Vec::new() }
    }

    /// Loads `dir/defaults.toml` (if present) and every other `*.toml` in `dir`. All files are checked
    /// and every error is returned, not just the first.
    pub fn load_dir(dir: &Path) -> Result<PolicySet, Diagnostics> {
        let (set, diags) = PolicySet::check_dir(dir);
        match set {
            Some(mut set) => {
                set.warnings = diags;
                Ok(set)
            }
            None => Err(Diagnostics(diags)),
        }
    }

    /// Checks every file of a policy directory; the set is `None` when any file has an error. The
    /// diagnostics are all of them, errors and warnings, file by file.
    pub fn check_dir(dir: &Path) -> (Option<PolicySet>, Vec<Diagnostic>) {
        let files = match toml_files(dir) {
            Ok(f) => f,
            Err(e) => return (None, vec![Diagnostic::file_error(&dir.display().to_string(), e)]),
        };
        let mut diags = Vec::new();
        let defaults_path = dir.join(DEFAULTS_FILE_NAME);
        let defaults = if files.contains(&defaults_path) {
            let parsed = read(&defaults_path)
                .and_then(|text| DefaultList::parse(&defaults_path.display().to_string(), &text).map_err(|d| d.0));
            match parsed {
                Ok((list, w)) => {
                    diags.extend(w);
                    Arc::new(list)
                }
                Err(d) => {
                    diags.extend(d);
                    DefaultList::builtin()
                }
            }
        } else {
            DefaultList::builtin()
        };
        let mut policies = builtin_policies(&defaults);
        let mut defined_at: HashMap<Arc<str>, String> = HashMap::new();
        for path in files.iter().filter(|p| **p != defaults_path) {
            let display = path.display().to_string();
            let text = match read(path) {
                Ok(t) => t,
                Err(d) => {
                    diags.extend(d);
                    continue;
                }
            };
            match parse_policy(&display, &text, &defaults) {
                Ok((policy, w)) => {
                    diags.extend(w);
                    if let Some(first) = defined_at.get(&policy.name) {
                        let src = Source::new(&display, &text);
                        diags.push(src.error(
                            0..0,
                            format!("policy {:?} is already defined in {first}", &*policy.name),
                            Some("policy names must be unique across the directory".into()),
                        ));
                        continue;
                    }
                    defined_at.insert(policy.name.clone(), display.clone());
                    policies.insert(policy.name.clone(), Arc::new(policy));
                }
                Err(d) => diags.extend(d.0),
            }
        }
        let set =
            (!diags.iter().any(Diagnostic::is_error)).then(|| PolicySet { policies, defaults, warnings: Vec::new() });
        (set, diags)
    }

    /// Like [`PolicySet::load_dir`], but a directory that does not exist means the built-ins alone.
    pub fn load_dir_or_builtin(dir: &Path) -> Result<PolicySet, Diagnostics> {
        if dir.is_dir() { PolicySet::load_dir(dir) } else { Ok(PolicySet::builtin()) }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Policy>> {
        self.policies.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.policies.keys().map(|k| &**k)
    }

    pub fn defaults(&self) -> &Arc<DefaultList> {
        &self.defaults
    }

    /// Adds (or replaces) one policy, e.g. one loaded from a file named on the command line.
    pub fn insert(&mut self, policy: Policy) {
        self.policies.insert(policy.name.clone(), Arc::new(policy));
    }
}

fn read(path: &Path) -> Result<String, Vec<Diagnostic>> {
    std::fs::read_to_string(path)
        .map_err(|e| vec![Diagnostic::file_error(&path.display().to_string(), format!("cannot read file: {e}"))])
}

/// The `*.toml` files directly in `dir`, sorted so that loading (and its messages) are deterministic.
pub fn toml_files(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("cannot read policy directory: {e}"))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
        .collect();
    files.sort();
    Ok(files)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    version: Option<Spanned<i64>>,
    #[serde(default)]
    group: Vec<RawGroup>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGroup {
    name: Spanned<String>,
    #[serde(default)]
    hosts: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    version: Option<Spanned<i64>>,
    name: Option<Spanned<String>>,
    #[allow(dead_code)]
    description: Option<String>,
    level: Option<Spanned<String>>,
    include_defaults: Option<Spanned<bool>>,
    #[serde(default)]
    allow: Vec<Spanned<String>>,
    #[serde(default)]
    deny: Vec<Spanned<String>>,
    ports: Option<Spanned<Vec<Spanned<i64>>>>,
    #[serde(default)]
    allow_ips: Vec<Spanned<String>>,
    limits: Option<RawLimits>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    requests_per_second: Option<Spanned<f64>>,
    burst: Option<Spanned<i64>>,
    max_tunnels: Option<Spanned<i64>>,
}

/// Parses and validates one policy file. `file` is the name used in messages and rules.
pub fn parse_policy(
    file: &str,
    text: &str,
    defaults: &Arc<DefaultList>,
) -> Result<(Policy, Vec<Diagnostic>), Diagnostics> {
    let src = Source::new(file, text);
    let raw: RawPolicy = toml::from_str(text).map_err(|e| Diagnostics(vec![from_toml_error(&src, &e)]))?;
    let mut diags = Vec::new();
    check_version(&src, raw.version.as_ref(), &mut diags);
    let source: Arc<str> = file.into();

    let name: Arc<str> = match &raw.name {
        Some(n) if valid_policy_name(n.get_ref()) => n.get_ref().as_str().into(),
        Some(n) => {
            diags.push(src.error(
                n.span(),
                format!("invalid policy name {:?}", n.get_ref()),
                Some("use 1 to 64 letters, digits, '.', '-' or '_'".into()),
            ));
            "invalid".into()
        }
        None => match Path::new(file).file_stem().and_then(|s| s.to_str()).filter(|s| valid_policy_name(s)) {
            Some(stem) => stem.into(),
            None => {
                diags.push(src.error(
                    0..0,
                    "missing `name`",
                    Some("add `name = \"my-policy\"`: sessions refer to a policy by its name".into()),
                ));
                "invalid".into()
            }
        },
    };

    let level = match &raw.level {
        Some(l) => match Level::parse(l.get_ref()) {
            Some(level) => level,
            None => {
                let suggestion = closest(l.get_ref(), Level::ALL.iter().map(|l| l.as_str()));
                let hint = match suggestion {
                    Some(s) => {
                        format!("did you mean \"{s}\"? levels are \"none\", \"trusted\", \"full\" and \"custom\"")
                    }
                    None => "levels are \"none\", \"trusted\", \"full\" and \"custom\"".to_string(),
                };
                diags.push(src.error(l.span(), format!("unknown level {:?}", l.get_ref()), Some(hint)));
                Level::None
            }
        },
        None => {
            diags.push(src.error(
                0..0,
                "missing `level`",
                Some("add `level = \"custom\"` (or \"none\", \"trusted\", \"full\")".into()),
            ));
            Level::None
        }
    };

    let include_defaults = raw.include_defaults.as_ref().is_some_and(|b| *b.get_ref());
    if level != Level::Custom {
        if let Some(b) = &raw.include_defaults {
            diags.push(src.warning(
                b.span(),
                format!("include_defaults is ignored on level {level}"),
                Some("it only applies to level = \"custom\"; level trusted always uses the default list".into()),
            ));
        }
        if let Some(first) = raw.allow.first() {
            diags.push(src.warning(
                first.span(),
                format!("allow entries are ignored on level {level}"),
                Some("set level = \"custom\" to use this allow list".into()),
            ));
        }
    }
    if level == Level::None
        && let Some(first) = raw.deny.first()
    {
        diags.push(src.warning(first.span(), "deny entries are ignored on level none (it refuses everything)", None));
    }

    let (ports, ports_explicit) = match &raw.ports {
        Some(list) => {
            let mut ports = Vec::new();
            for p in list.get_ref() {
                match u16::try_from(*p.get_ref()) {
                    Ok(n) if n > 0 => {
                        if ports.contains(&n) {
                            diags.push(src.warning(p.span(), format!("port {n} is listed twice"), None));
                        }
                        ports.push(n);
                    }
                    _ => diags.push(src.error(
                        p.span(),
                        format!("port {} is out of range", p.get_ref()),
                        Some("ports are 1 to 65535".into()),
                    )),
                }
            }
            if list.get_ref().is_empty() {
                diags.push(src.warning(
                    list.span(),
                    "`ports` is empty: entries without \":PORT\" can never match",
                    Some("remove `ports` to get the default [80, 443]".into()),
                ));
            }
            ports.sort_unstable();
            ports.dedup();
            (ports, true)
        }
        None => (DEFAULT_PORTS.to_vec(), false),
    };

    let mut allow = Vec::new();
    for written in &raw.allow {
        if let Some(p) = parse_pattern(&src, written, &mut diags) {
            let rule = rule_at(&src, &source, &p, written.span(), RuleList::Allow, None);
            allow.push((p, rule, written.span()));
        }
    }
    let mut deny = Vec::new();
    for written in &raw.deny {
        if let Some(p) = parse_pattern(&src, written, &mut diags) {
            let rule = rule_at(&src, &source, &p, written.span(), RuleList::Deny, None);
            deny.push((p, rule, written.span()));
        }
    }
    lint_list(&src, "allow", &allow, true, &mut diags);
    lint_list(&src, "deny", &deny, true, &mut diags);

    let mut allow_ips = Vec::new();
    for written in &raw.allow_ips {
        if let Some(net) = parse_ip_entry(&src, written, &mut diags) {
            let (line, _) = src.location(written.span().start);
            let rule = Arc::new(Rule {
                pattern: net.to_string().into(),
                list: RuleList::AllowIps,
                file: source.clone(),
                line,
                group: None,
            });
            allow_ips.push((net, rule));
        }
    }

    let limits = parse_limits(&src, raw.limits.as_ref(), &mut diags);
    let deny_matcher = Matcher::new(deny.iter().map(|(p, r, _)| (p.clone(), r.clone())));
    let defaults = (level == Level::Trusted || (level == Level::Custom && include_defaults)).then(|| defaults.clone());
    if level == Level::Custom {
        lint_allow_against(&src, &allow, &deny_matcher, defaults.as_deref(), &mut diags);
    }

    let level_line = raw.level.as_ref().map_or(0, |l| src.location(l.span().start).0);
    let level_rule = Policy::level_rule(level, source.clone(), level_line);
    let warnings = finish(diags)?;
    let policy = Policy {
        name,
        level,
        source,
        level_rule,
        include_defaults,
        allow: Matcher::new(allow.into_iter().map(|(p, r, _)| (p, r))),
        deny: deny_matcher,
        defaults,
        ports,
        ports_explicit,
        allow_ips,
        limits,
    };
    Ok((policy, warnings))
}

fn finish(mut diags: Vec<Diagnostic>) -> Result<Vec<Diagnostic>, Diagnostics> {
    diags.sort_by_key(|d| (d.line, d.col));
    if diags.iter().any(Diagnostic::is_error) { Err(Diagnostics(diags)) } else { Ok(diags) }
}

fn check_version(src: &Source<'_>, version: Option<&Spanned<i64>>, diags: &mut Vec<Diagnostic>) {
    match version {
        None => diags.push(src.error(0..0, "missing `version`", Some("add `version = 1` as the first line".into()))),
        Some(v) if *v.get_ref() != 1 => diags.push(src.error(
            v.span(),
            format!("unsupported version {}", v.get_ref()),
            Some("this sluice reads `version = 1`".into()),
        )),
        Some(_) => {}
    }
}

fn valid_policy_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

fn parse_pattern(src: &Source<'_>, written: &Spanned<String>, diags: &mut Vec<Diagnostic>) -> Option<HostPattern> {
    match HostPattern::parse(written.get_ref()) {
        Ok(p) => Some(p),
        Err(e) => {
            diags.push(src.error(written.span(), e.to_string(), e.hint()));
            None
        }
    }
}

fn rule_at(
    src: &Source<'_>,
    file: &Arc<str>,
    p: &HostPattern,
    span: Range<usize>,
    list: RuleList,
    group: Option<Arc<str>>,
) -> Arc<Rule> {
    let (line, _) = src.location(span.start);
    Arc::new(Rule { pattern: p.to_string().into(), list, file: file.clone(), line, group })
}

fn parse_ip_entry(src: &Source<'_>, written: &Spanned<String>, diags: &mut Vec<Diagnostic>) -> Option<IpNet> {
    let text = written.get_ref().trim();
    let net = if text.contains('/') {
        match text.parse::<IpNet>() {
            Ok(net) if net != net.trunc() => {
                diags.push(src.error(
                    written.span(),
                    format!("{text:?} has host bits set"),
                    Some(format!("write the network address: \"{}\"", net.trunc())),
                ));
                return None;
            }
            Ok(net) => net,
            Err(_) => {
                diags.push(src.error(
                    written.span(),
                    format!("invalid network {text:?}"),
                    Some("write an address or a CIDR block, e.g. \"10.1.2.3\" or \"10.0.0.0/8\"".into()),
                ));
                return None;
            }
        }
    } else {
        match text.parse::<IpAddr>() {
            Ok(ip) => IpNet::from(ip),
            Err(_) => {
                diags.push(src.error(written.span(), format!("invalid address {text:?}"), Some("write an address or a CIDR block, e.g. \"10.1.2.3\" or \"10.0.0.0/8\"; host names belong in `allow`".into())));
                return None;
            }
        }
    };
    // Addresses are compared in IPv4 form when they are IPv4-mapped, so a mapped range is stored as the
    // IPv4 range it stands for (else it could never match).
    let net = match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.network().to_ipv4_mapped() {
            Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96).map(IpNet::V4).unwrap_or(net),
            None => net,
        },
        other => other,
    };
    if net.prefix_len() == 0 {
        diags.push(src.warning(
            written.span(),
            format!("{net} covers every address: the address guard is off for this policy"),
            Some("name the networks this policy needs".into()),
        ));
    }
    Some(net)
}

fn parse_limits(src: &Source<'_>, raw: Option<&RawLimits>, diags: &mut Vec<Diagnostic>) -> Limits {
    let Some(raw) = raw else { return Limits::default() };
    let mut limits = Limits::default();
    if let Some(r) = &raw.requests_per_second {
        let v = *r.get_ref();
        if v.is_finite() && v > 0.0 {
            limits.requests_per_second = Some(v);
        } else {
            diags.push(src.error(
                r.span(),
                format!("requests_per_second must be a positive number, not {v}"),
                Some("e.g. requests_per_second = 20".into()),
            ));
        }
    }
    let mut count = |field: &Option<Spanned<i64>>, what: &str| -> Option<u32> {
        let f = field.as_ref()?;
        match u32::try_from(*f.get_ref()) {
            Ok(n) if n > 0 => Some(n),
            _ => {
                diags.push(src.error(
                    f.span(),
                    format!("{what} must be from 1 to {}, not {}", u32::MAX, f.get_ref()),
                    None,
                ));
                None
            }
        }
    };
    limits.burst = count(&raw.burst, "burst");
    limits.max_tunnels = count(&raw.max_tunnels, "max_tunnels");
    limits
}

/// Warnings within one list: duplicates, and entries another entry of the list already covers.
fn lint_list(
    src: &Source<'_>,
    list: &str,
    entries: &[(HostPattern, Arc<Rule>, Range<usize>)],
    shadows: bool,
    diags: &mut Vec<Diagnostic>,
) {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut subdomains: HashMap<&str, Vec<(&HostPattern, usize)>> = HashMap::new();
    for (p, r, _) in entries {
        if let PatternKind::Subdomains(h) = p.kind() {
            subdomains.entry(h.as_str()).or_default().push((p, r.line));
        }
    }
    let globs: Vec<&(HostPattern, Arc<Rule>, Range<usize>)> =
        entries.iter().filter(|(p, _, _)| matches!(p.kind(), PatternKind::Glob { .. })).collect();
    for (p, r, span) in entries {
        let text = p.to_string();
        if let Some(first) = seen.get(&text) {
            diags.push(src.warning(
                span.clone(),
                format!("duplicate entry {text:?} in {list} (first on line {first})"),
                Some("remove one of them".into()),
            ));
            continue;
        }
        seen.insert(text, r.line);
        if !shadows {
            continue;
        }
        let covers = |other: &HostPattern| other.port().is_none() || other.port() == p.port();
        let (host, skip) = match p.kind() {
            PatternKind::Exact(h) => (h, 1),
            // `*.a.b.com` is covered by `*.b.com`: look from the fixed part's parent up.
            PatternKind::Subdomains(h) => (h, 1),
            PatternKind::Glob { .. } => continue,
        };
        let shadow =
            host.suffixes().skip(skip).find_map(|s| subdomains.get(s).and_then(|v| v.iter().find(|(o, _)| covers(o))));
        let shadow = shadow.map(|(o, line)| (o.to_string(), *line)).or_else(|| {
            matches!(p.kind(), PatternKind::Exact(_))
                .then(|| {
                    globs
                        .iter()
                        .find(|(g, _, _)| covers(g) && g.matches_host(host))
                        .map(|(g, gr, _)| (g.to_string(), gr.line))
                })
                .flatten()
        });
        if let Some((by, line)) = shadow {
            diags.push(src.warning(
                span.clone(),
                format!("{:?} is already covered by {by:?} (line {line}) in {list}", p.to_string()),
                Some("remove the narrower entry, or keep it as documentation".into()),
            ));
        }
    }
}

/// Warnings for allow entries that a deny entry cancels, or that the default list already allows.
fn lint_allow_against(
    src: &Source<'_>,
    allow: &[(HostPattern, Arc<Rule>, Range<usize>)],
    deny: &Matcher<Arc<Rule>>,
    defaults: Option<&DefaultList>,
    diags: &mut Vec<Diagnostic>,
) {
    for (p, _, span) in allow {
        let host: Option<Host> = match p.kind() {
            PatternKind::Exact(h) => Some(h.clone()),
            // A representative subdomain: if `x.<fixed>` is denied on every port, so is the whole entry.
            PatternKind::Subdomains(h) => Host::parse(&format!("sluice-probe.{h}")).ok(),
            PatternKind::Glob { .. } => None,
        };
        let Some(host) = host else { continue };
        let denied = match p.kind() {
            PatternKind::Exact(_) => {
                matches!(deny.lookup(&host, |d| d.port().is_none() || d.port() == p.port()), Lookup::Hit(..))
            }
            _ => deny.entries().any(|(d, _)| {
                matches!(d.kind(), PatternKind::Subdomains(_))
                    && d.port().is_none()
                    && d.matches_host(&host)
                    && p.to_string().ends_with(&d.to_string()[1..])
            }),
        };
        if denied {
            if let Lookup::Hit(d, r) = deny.lookup(&host, |_| true) {
                diags.push(src.warning(
                    span.clone(),
                    format!(
                        "{:?} can never match: the deny entry {:?} (line {}) wins",
                        p.to_string(),
                        d.to_string(),
                        r.line
                    ),
                    Some("deny wins over every allow; remove one of the two".into()),
                ));
            }
            continue;
        }
        if let (Some(defaults), PatternKind::Exact(_), None) = (defaults, p.kind(), p.port())
            && let Lookup::Hit(d, r) = defaults.matcher.lookup(&host, |d| d.port().is_none())
        {
            let group = r.group.as_deref().unwrap_or("");
            diags.push(src.warning(
                span.clone(),
                format!(
                    "{:?} is already allowed by the default list ({:?}, group {group:?})",
                    p.to_string(),
                    d.to_string()
                ),
                Some("include_defaults = true already allows it; remove the entry".into()),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Target, Verdict};

    #[test]
    fn an_ipv4_mapped_allow_ips_range_covers_the_ipv4_addresses() {
        let text = "version = 1\nname = \"p\"\nlevel = \"custom\"\nallow_ips = [\"::ffff:10.0.0.0/104\"]\n";
        let (policy, _) = parse_policy("p.toml", text, &DefaultList::builtin()).unwrap();
        assert_eq!(policy.allow_ips[0].0.to_string(), "10.0.0.0/8");
        for ip in ["10.1.2.3", "::ffff:10.1.2.3"] {
            let d = policy.decide(&Target::Ip(ip.parse().unwrap()), 443);
            assert_eq!(d.verdict, Verdict::Allow, "{ip}");
        }
        assert_eq!(policy.decide(&Target::Ip("11.0.0.1".parse().unwrap()), 443).verdict, Verdict::Deny);
    }
}
