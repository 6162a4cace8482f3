//! Policy files: TOML as policy authors write it, validated while parsing into compiled policies, with
//! every mistake reported at `file:line:col` and every doubtful entry as a warning.

use std::net::IpAddr;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

use super::defaults::DefaultList;
use super::inspection::{RawRequestRule, lint_reachability, parse_inspection, parse_passthrough, parse_requests};
use super::lint::{lint_allow_against, lint_list};
use super::matcher::Matcher;
use super::pattern::HostPattern;
use super::quota::{ByteQuota, ByteSize, MIN_BYTES_PER_SECOND};
use super::request::RequestRules;
use super::{DEFAULT_PORTS, Level, Limits, Mode, Policy, Rule, RuleList};
use crate::diagnostic::{Diagnostic, Diagnostics, Source, closest, from_toml_error};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    version: Option<Spanned<i64>>,
    name: Option<Spanned<String>>,
    #[allow(dead_code)]
    description: Option<String>,
    level: Option<Spanned<String>>,
    mode: Option<Spanned<String>>,
    include_defaults: Option<Spanned<bool>>,
    #[serde(default)]
    allow: Vec<Spanned<String>>,
    #[serde(default)]
    deny: Vec<Spanned<String>>,
    ports: Option<Spanned<Vec<Spanned<i64>>>>,
    #[serde(default)]
    allow_ips: Vec<Spanned<String>>,
    limits: Option<RawLimits>,
    inspect: Option<Spanned<String>>,
    #[serde(default)]
    tls_passthrough: Vec<Spanned<String>>,
    #[serde(default)]
    requests: Vec<Spanned<RawRequestRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    requests_per_second: Option<Spanned<f64>>,
    burst: Option<Spanned<i64>>,
    max_tunnels: Option<Spanned<i64>>,
    upload_bytes_per_second: Option<Spanned<String>>,
    download_bytes_per_second: Option<Spanned<String>>,
    upload_quota: Option<Spanned<String>>,
    download_quota: Option<Spanned<String>>,
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

    let mode = match &raw.mode {
        None => Mode::Enforce,
        Some(m) => Mode::parse(m.get_ref()).unwrap_or_else(|| {
            let hint = match closest(m.get_ref(), Mode::ALL.iter().map(|m| m.as_str())) {
                Some(s) => format!("did you mean \"{s}\"? modes are \"enforce\" (the default) and \"report\""),
                None => "modes are \"enforce\" (the default) and \"report\" (serve what the policy would deny, and record it)".to_string(),
            };
            diags.push(src.error(m.span(), format!("unknown mode {:?}", m.get_ref()), Some(hint)));
            Mode::Enforce
        }),
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
    let inspection = parse_inspection(&src, raw.inspect.as_ref(), &mut diags);
    let tls_passthrough = parse_passthrough(&src, &source, &raw.tls_passthrough, &mut diags);
    let requests = RequestRules::new(parse_requests(&src, &source, &raw.requests, &mut diags));
    let deny_matcher = Matcher::new(deny.iter().map(|(p, r, _)| (p.clone(), r.clone())));
    let defaults = (level == Level::Trusted || (level == Level::Custom && include_defaults)).then(|| defaults.clone());
    if level == Level::Custom {
        lint_allow_against(&src, &allow, &deny_matcher, defaults.as_deref(), &mut diags);
    }

    let level_line = raw.level.as_ref().map_or(0, |l| src.location(l.span().start).0);
    let level_rule = Policy::level_rule(level, source.clone(), level_line);
    let mut warnings = finish(diags)?;
    let policy = Policy {
        name,
        level,
        mode,
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
        inspection,
        tls_passthrough: Matcher::new(tls_passthrough),
        requests,
    };
    lint_reachability(&src, text, &policy, &mut warnings);
    warnings.sort_by_key(|d| (d.line, d.col));
    Ok((policy, warnings))
}

pub(super) fn finish(mut diags: Vec<Diagnostic>) -> Result<Vec<Diagnostic>, Diagnostics> {
    diags.sort_by_key(|d| (d.line, d.col));
    if diags.iter().any(Diagnostic::is_error) { Err(Diagnostics(diags)) } else { Ok(diags) }
}

pub(super) fn check_version(src: &Source<'_>, version: Option<&Spanned<i64>>, diags: &mut Vec<Diagnostic>) {
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

pub(super) fn parse_pattern(
    src: &Source<'_>,
    written: &Spanned<String>,
    diags: &mut Vec<Diagnostic>,
) -> Option<HostPattern> {
    match HostPattern::parse(written.get_ref()) {
        Ok(p) => Some(p),
        Err(e) => {
            diags.push(src.error(written.span(), e.to_string(), e.hint()));
            None
        }
    }
}

pub(super) fn rule_at(
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
    let mut rate = |field: &Option<Spanned<String>>, key: &str| -> Option<ByteSize> {
        let f = field.as_ref()?;
        match ByteSize::parse(f.get_ref()) {
            Ok(rate) if rate >= MIN_BYTES_PER_SECOND => Some(rate),
            Ok(rate) => {
                diags.push(src.error(
                    f.span(),
                    format!("{key} must be at least {MIN_BYTES_PER_SECOND} per second, not {rate}"),
                    Some(format!("a slower rate stalls every tunnel; e.g. {key} = \"10MiB\"")),
                ));
                None
            }
            Err(e) => {
                diags.push(src.error(f.span(), format!("{key}: {e}"), Some(e.hint())));
                None
            }
        }
    };
    limits.upload_bytes_per_second = rate(&raw.upload_bytes_per_second, "upload_bytes_per_second");
    limits.download_bytes_per_second = rate(&raw.download_bytes_per_second, "download_bytes_per_second");
    let mut quota = |field: &Option<Spanned<String>>, key: &str| -> Option<ByteQuota> {
        let f = field.as_ref()?;
        ByteQuota::parse(f.get_ref())
            .map_err(|e| diags.push(src.error(f.span(), format!("{key}: {e}"), Some(e.hint()))))
            .ok()
    };
    limits.upload_quota = quota(&raw.upload_quota, "upload_quota");
    limits.download_quota = quota(&raw.download_quota, "download_quota");
    limits
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Target, Verdict};

    #[test]
    fn mode_is_enforce_unless_report_and_nothing_else() {
        let text = |mode: &str| format!("version = 1\nname = \"p\"\nlevel = \"custom\"\n{mode}");
        let mode = |t: &str| parse_policy("p.toml", &text(t), &DefaultList::builtin()).map(|(p, _)| p.mode);
        assert_eq!(mode("").ok(), Some(Mode::Enforce));
        assert_eq!(mode("mode = \"enforce\"\n").ok(), Some(Mode::Enforce));
        assert_eq!(mode("mode = \"report\"\n").ok(), Some(Mode::Report));
        let err = mode("mode = \"Report\"\n").expect_err("an unknown mode");
        let d = &err.0[0];
        assert_eq!((d.line, d.col, d.message.as_str()), (4, 8, "unknown mode \"Report\""));
        assert_eq!(
            d.hint.as_deref(),
            Some("did you mean \"report\"? modes are \"enforce\" (the default) and \"report\"")
        );
        let err = mode("mode = \"audit\"\n").expect_err("an unknown mode");
        assert_eq!(
            err.0[0].hint.as_deref(),
            Some(
                "modes are \"enforce\" (the default) and \"report\" (serve what the policy would deny, and record it)"
            )
        );
    }

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
