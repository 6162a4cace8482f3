//! The policy keys of content filtering (SPEC §8) as written and checked: `inspect` (when tunnels are
//! terminated), `tls_passthrough` (hosts never terminated) and `[[requests]]` (request rules), with
//! their lints (bad globs, rules that can never match, rules shadowed by others).

use std::fmt;
use std::sync::Arc;

use serde::Deserialize;
use toml::Spanned;

use super::file::{parse_pattern, rule_at};
use super::pattern::{HostPattern, PatternKind};
use super::request::{Action, RequestRule, compile_path_glob, compile_path_globs};
use super::{Policy, Rule, RuleList, Target};
use crate::diagnostic::{Diagnostic, Source, closest};
use crate::limit::quota::ByteSize;

/// A policy's `inspect`: which allowed HTTPS tunnels are terminated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum InspectMode {
    /// Only tunnels to hosts that have request rules.
    #[default]
    Auto,
    /// Every allowed HTTPS tunnel (except `tls_passthrough` hosts).
    All,
    /// None: every tunnel is relayed as bytes.
    Off,
}

impl InspectMode {
    pub const ALL: [InspectMode; 3] = [InspectMode::Auto, InspectMode::All, InspectMode::Off];

    pub fn as_str(self) -> &'static str {
        match self {
            InspectMode::Auto => "auto",
            InspectMode::All => "all",
            InspectMode::Off => "off",
        }
    }

    pub fn parse(s: &str) -> Option<InspectMode> {
        InspectMode::ALL.into_iter().find(|m| m.as_str() == s)
    }
}

impl fmt::Display for InspectMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A policy's inspection settings as compiled, with where `inspect` was written (line 0: not written).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Inspection {
    pub mode: InspectMode,
    pub line: usize,
}

pub(super) fn parse_inspection(
    src: &Source<'_>,
    written: Option<&Spanned<String>>,
    diags: &mut Vec<Diagnostic>,
) -> Inspection {
    let Some(written) = written else { return Inspection::default() };
    let (line, _) = src.location(written.span().start);
    match InspectMode::parse(written.get_ref()) {
        Some(mode) => Inspection { mode, line },
        None => {
            let names = "\"auto\" (hosts with request rules), \"all\" or \"off\"";
            let hint = match closest(written.get_ref(), InspectMode::ALL.iter().map(|m| m.as_str())) {
                Some(s) => format!("did you mean \"{s}\"? inspect is {names}"),
                None => format!("inspect is {names}"),
            };
            diags.push(src.error(written.span(), format!("unknown inspect mode {:?}", written.get_ref()), Some(hint)));
            Inspection { mode: InspectMode::Off, line }
        }
    }
}

/// One `[[requests]]` table as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRequestRule {
    hosts: Option<Spanned<Vec<Spanned<String>>>>,
    methods: Option<Spanned<Vec<Spanned<String>>>>,
    paths: Option<Spanned<Vec<Spanned<String>>>>,
    action: Option<Spanned<String>>,
    max_body: Option<Spanned<String>>,
}

/// The methods RFC 9110 and RFC 5789 define, for the case-sensitivity hint.
const KNOWN_METHODS: [&str; 9] = ["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"];

fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// `[[requests]]` tables, compiled in file order; every mistake is reported where it is written.
pub(super) fn parse_requests(
    src: &Source<'_>,
    file: &Arc<str>,
    raw: &[Spanned<RawRequestRule>],
    diags: &mut Vec<Diagnostic>,
) -> Vec<RequestRule> {
    let mut rules = Vec::new();
    for table in raw {
        let span = table.span();
        let t = table.get_ref();
        let before = diags.iter().filter(|d| d.is_error()).count();
        let action = match &t.action {
            Some(a) => match a.get_ref().as_str() {
                "allow" => Action::Allow,
                "deny" => Action::Deny,
                other => {
                    let hint = match closest(other, ["allow", "deny"].into_iter()) {
                        Some(s) => format!("did you mean \"{s}\"? action is \"allow\" or \"deny\""),
                        None => "action is \"allow\" or \"deny\"".to_string(),
                    };
                    diags.push(src.error(a.span(), format!("unknown action {other:?}"), Some(hint)));
                    Action::Deny
                }
            },
            None => {
                diags.push(src.error(
                    span.clone(),
                    "a [[requests]] rule needs `action`",
                    Some("add action = \"allow\" or action = \"deny\"".into()),
                ));
                Action::Deny
            }
        };
        let mut hosts: Vec<HostPattern> = Vec::new();
        match &t.hosts {
            Some(list) if !list.get_ref().is_empty() => {
                for written in list.get_ref() {
                    if let Some(p) = parse_pattern(src, written, diags) {
                        if hosts.contains(&p) {
                            diags.push(src.warning(
                                written.span(),
                                format!("host \"{p}\" is listed twice in this rule"),
                                None,
                            ));
                            continue;
                        }
                        hosts.push(p);
                    }
                }
            }
            Some(list) => diags.push(src.error(list.span(), "`hosts` is empty: this rule can never match", None)),
            None => diags.push(src.error(
                span.clone(),
                "a [[requests]] rule needs `hosts`",
                Some("add hosts = [\"api.example.com\"] (the same patterns as `allow`)".into()),
            )),
        }
        let methods = t.methods.as_ref().map(|list| {
            if list.get_ref().is_empty() {
                diags.push(src.error(
                    list.span(),
                    "`methods` is empty: this rule can never match",
                    Some("remove `methods` to match any method".into()),
                ));
            }
            let mut out: Vec<Box<str>> = Vec::new();
            for m in list.get_ref() {
                let text = m.get_ref().as_str();
                if let Some(known) = KNOWN_METHODS.iter().find(|k| k.eq_ignore_ascii_case(text) && **k != text) {
                    diags.push(src.error(
                        m.span(),
                        format!("method {text:?} never matches: methods are case-sensitive"),
                        Some(format!("write \"{known}\"")),
                    ));
                } else if !is_token(text) {
                    diags.push(src.error(
                        m.span(),
                        format!("invalid method {text:?}"),
                        Some("a method is a token such as \"GET\"".into()),
                    ));
                } else if out.iter().any(|o| &**o == text) {
                    diags.push(src.warning(m.span(), format!("method {text:?} is listed twice"), None));
                } else {
                    out.push(text.into());
                }
            }
            out
        });
        let paths = t.paths.as_ref().map(|list| {
            if list.get_ref().is_empty() {
                diags.push(src.error(
                    list.span(),
                    "`paths` is empty: this rule can never match",
                    Some("remove `paths` to match any path".into()),
                ));
            }
            let mut out: Vec<Box<str>> = Vec::new();
            for p in list.get_ref() {
                match compile_path_glob(p.get_ref()) {
                    Ok(_) => out.push(p.get_ref().as_str().into()),
                    Err(e) => diags.push(src.error(
                        p.span(),
                        e,
                        Some("paths are globs on the path without query: * within a segment, ** across segments, e.g. \"/v1/public/**\"".into()),
                    )),
                }
            }
            out
        });
        let max_body = t.max_body.as_ref().and_then(|m| match ByteSize::parse(m.get_ref()) {
            Ok(size) => {
                if action == Action::Deny {
                    diags.push(src.warning(
                        m.span(),
                        "max_body on a deny rule does nothing",
                        Some("put max_body on the allow rule whose requests it limits".into()),
                    ));
                }
                Some(size.as_u64())
            }
            Err(e) => {
                diags.push(src.error(m.span(), e.to_string(), Some(e.hint())));
                None
            }
        });
        if diags.iter().filter(|d| d.is_error()).count() > before {
            continue;
        }
        let set = match &paths {
            Some(p) => match compile_path_globs(p) {
                Ok(set) => Some((p.clone(), set)),
                Err(e) => {
                    diags.push(src.error(span.clone(), e, None));
                    continue;
                }
            },
            None => None,
        };
        let summary = RequestRule::summary(action, &hosts, methods.as_deref(), paths.as_deref());
        let (line, _) = src.location(span.start);
        let rule =
            Arc::new(Rule { pattern: summary.into(), list: RuleList::Requests, file: file.clone(), line, group: None });
        rules.push((RequestRule { action, hosts, methods, paths: set, max_body, rule }, span));
    }
    lint_shadowed(src, &rules, diags);
    rules.into_iter().map(|(r, _)| r).collect()
}

/// `tls_passthrough` patterns, with their rules.
pub(super) fn parse_passthrough(
    src: &Source<'_>,
    file: &Arc<str>,
    raw: &[Spanned<String>],
    diags: &mut Vec<Diagnostic>,
) -> Vec<(HostPattern, Arc<Rule>)> {
    raw.iter()
        .filter_map(|w| {
            parse_pattern(src, w, diags).map(|p| {
                let rule = rule_at(src, file, &p, w.span(), RuleList::TlsPassthrough, None);
                (p, rule)
            })
        })
        .collect()
}

/// Whether every request `later` matches, `earlier` matches too (a conservative, textual check).
fn covers(earlier: &RequestRule, later: &RequestRule) -> bool {
    let hosts = later.hosts.iter().all(|h| {
        earlier.hosts.iter().any(|e| {
            e == h
                || match h.kind() {
                    PatternKind::Exact(host) => e.port().is_none_or(|p| Some(p) == h.port()) && e.matches_host(host),
                    _ => false,
                }
        })
    });
    let methods = match (&earlier.methods, &later.methods) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(e), Some(l)) => l.iter().all(|m| e.contains(m)),
    };
    let paths = match (&earlier.paths, &later.paths) {
        (None, _) => true,
        (Some((e, _)), _) if e.iter().any(|p| &**p == "/**") => true,
        (Some(_), None) => false,
        (Some((e, set)), Some((l, _))) => l.iter().all(|p| e.contains(p) || (!p.contains('*') && set.is_match(&**p))),
    };
    hosts && methods && paths
}

/// An allow rule covered by a deny rule never allows anything (deny wins wherever it is written); an
/// allow rule covered by an earlier allow rule never decides (the first allow that matches does).
fn lint_shadowed(src: &Source<'_>, rules: &[(RequestRule, std::ops::Range<usize>)], diags: &mut Vec<Diagnostic>) {
    for (i, (later, span)) in rules.iter().enumerate() {
        let shadow = rules.iter().enumerate().find(|(j, (earlier, _))| {
            *j != i
                && match (earlier.action, later.action) {
                    (Action::Deny, Action::Allow) => covers(earlier, later),
                    (a, b) if a == b => *j < i && covers(earlier, later),
                    _ => false,
                }
        });
        if let Some((_, (by, _))) = shadow {
            let what = if by.action == Action::Deny && later.action == Action::Allow {
                "deny wins, so this allow rule never allows anything"
            } else {
                "an earlier rule matches every request this one does, so this one never decides"
            };
            diags.push(src.warning(
                span.clone(),
                format!("this [[requests]] rule is shadowed by the one at line {}: {what}", by.rule.line),
                Some("remove it, or narrow the rule that shadows it".into()),
            ));
        }
    }
}

/// Lints that need the compiled policy: rules for hosts the policy never lets through, and rules
/// that only plain HTTP can reach because their host's tunnels are not terminated.
pub(super) fn lint_reachability(src: &Source<'_>, text: &str, policy: &Policy, diags: &mut Vec<Diagnostic>) {
    let at_line = |line: usize| -> std::ops::Range<usize> {
        let start: usize = text.split_inclusive('\n').take(line.saturating_sub(1)).map(str::len).sum();
        start..start
    };
    for rule in policy.requests.rules() {
        for host in &rule.hosts {
            let PatternKind::Exact(name) = host.kind() else { continue };
            let target = Target::Name(name.clone());
            let ports: Vec<u16> = host.port().map_or_else(|| policy.ports.clone(), |p| vec![p]);
            if !ports.iter().any(|&p| policy.decide(&target, p).is_allowed()) {
                diags.push(src.warning(
                    at_line(rule.rule.line),
                    format!("this [[requests]] rule can never match {name}: the policy does not allow {name}"),
                    Some(format!("add \"{name}\" to `allow`, or remove the rule")),
                ));
            } else if !ports.iter().any(|&p| policy.terminates(&target, p)) && ports.contains(&443) {
                diags.push(src.warning(
                    at_line(rule.rule.line),
                    format!("{name} is not inspected (inspect = \"off\" or tls_passthrough): this rule applies to plain-HTTP requests only"),
                    Some("set inspect = \"auto\" (the default) and keep the host out of tls_passthrough".into()),
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::policy::{DefaultList, Reason, Verdict, parse_policy};

    const POLICY: &str = r#"version = 1
name = "p"
level = "custom"
allow = ["api.example.com", "paste.test", "cdn.test"]
tls_passthrough = ["cdn.test"]

[[requests]]
hosts = ["api.example.com"]
methods = ["GET", "HEAD"]
paths = ["/v1/public/**"]
action = "allow"

[[requests]]
hosts = ["api.example.com"]
methods = ["POST"]
paths = ["/v1/uploads/*"]
action = "allow"
max_body = "1KiB"

[[requests]]
hosts = ["paste.test"]
methods = ["POST", "PUT"]
action = "deny"
"#;

    fn decide(
        p: &crate::policy::Policy,
        host: &str,
        method: &str,
        path: &str,
        body: Option<u64>,
    ) -> (String, usize, Option<u64>) {
        let target = crate::policy::Target::parse(host).unwrap();
        match p.decide_request(&target, 443, method, path, body) {
            None => ("unruled".into(), 0, None),
            Some((d, max)) => {
                let verdict = if d.verdict == Verdict::Allow { "allow" } else { "deny" };
                (format!("{verdict} {}", d.reason.code()), d.rule.map_or(0, |r| r.line), max)
            }
        }
    }

    #[test]
    fn request_rules_decide_with_their_line() {
        let (p, warnings) = parse_policy("p.toml", POLICY, &DefaultList::builtin()).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(
            decide(&p, "api.example.com", "GET", "/v1/public/x?y", None),
            ("allow request_allowed".into(), 7, None)
        );
        assert_eq!(
            decide(&p, "api.example.com", "POST", "/v1/uploads/a", Some(10)),
            ("allow request_allowed".into(), 13, Some(1024))
        );
        assert_eq!(
            decide(&p, "api.example.com", "POST", "/v1/uploads/a", Some(1025)),
            ("deny body_too_large".into(), 13, None)
        );
        assert_eq!(
            decide(&p, "api.example.com", "POST", "/v1/public/x", None),
            ("deny no_request_rule".into(), 0, None)
        );
        assert_eq!(decide(&p, "paste.test", "PUT", "/x", None), ("deny request_denied".into(), 20, None));
        assert_eq!(decide(&p, "paste.test", "GET", "/x", None), ("unruled".into(), 0, None));
        let target = |h: &str| crate::policy::Target::parse(h).unwrap();
        assert!(p.terminates(&target("api.example.com"), 443));
        assert!(!p.terminates(&target("cdn.test"), 443), "passthrough");
        assert!(!p.terminates(&target("other.test"), 443), "auto: only hosts with rules");
        assert!(p.asks_for_inspection());
        let (d, _) = p.decide_request(&target("api.example.com"), 443, "DELETE", "/v1/x", None).unwrap();
        assert_eq!(d.reason, Reason::NoRequestRule { method: "DELETE".into(), path: "/v1/x".into() });
        assert!(
            d.hint(&target("api.example.com"), 443).unwrap().contains("methods = [\"DELETE\"], paths = [\"/v1/x\"]")
        );
    }

    fn errors(text: &str) -> String {
        match parse_policy("p.toml", text, &DefaultList::builtin()) {
            Ok((_, w)) => w.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("\n"),
            Err(d) => d.to_string(),
        }
    }

    #[test]
    fn mistakes_in_request_rules_point_at_themselves() {
        let head =
            "version = 1\nname = \"p\"\nlevel = \"custom\"\nallow = [\"a.test\"]\n[[requests]]\nhosts = [\"a.test\"]\n";
        let e = errors(&format!("{head}paths = [\"v1/**\"]\naction = \"allow\"\n"));
        assert!(e.starts_with("p.toml:7:10: error: path glob \"v1/**\" does not start with \"/\""), "{e}");
        let e = errors(&format!("{head}methods = [\"get\"]\naction = \"allow\"\n"));
        assert!(e.starts_with("p.toml:7:12: error: method \"get\" never matches: methods are case-sensitive"), "{e}");
        assert!(e.contains("write \"GET\""), "{e}");
        let e = errors(&format!("{head}action = \"alow\"\n"));
        assert!(e.starts_with("p.toml:7:10: error: unknown action \"alow\""), "{e}");
        assert!(e.contains("did you mean \"allow\"?"), "{e}");
        let e = errors(&format!("{head}action = \"allow\"\nmax_body = \"10 parsecs\"\n"));
        assert!(e.starts_with("p.toml:8:12: error:"), "{e}");
        let e = errors(&format!("{head}action = \"allow\"\nmethod = [\"GET\"]\n"));
        assert!(e.contains("unknown field `method`"), "{e}");
        let e = errors("version = 1\nname = \"p\"\nlevel = \"custom\"\n[[requests]]\nhosts = [\"a.test\"]\n");
        assert!(e.contains("error: a [[requests]] rule needs `action`"), "{e}");
    }

    #[test]
    fn unreachable_shadowed_and_uninspected_rules_are_warned() {
        let w = errors(
            "version = 1\nname = \"p\"\nlevel = \"custom\"\nallow = [\"a.test\"]\n\
             [[requests]]\nhosts = [\"b.test\"]\naction = \"deny\"\n\
             [[requests]]\nhosts = [\"a.test\"]\nmethods = [\"POST\"]\naction = \"deny\"\n\
             [[requests]]\nhosts = [\"a.test\"]\nmethods = [\"POST\"]\npaths = [\"/x/**\"]\naction = \"allow\"\n",
        );
        assert!(
            w.contains(
                "p.toml:5:1: warning: this [[requests]] rule can never match b.test: the policy does not allow b.test"
            ),
            "{w}"
        );
        assert!(
            w.contains("p.toml:12:1: warning: this [[requests]] rule is shadowed by the one at line 8: deny wins"),
            "{w}"
        );
        let w = errors(
            "version = 1\nname = \"p\"\nlevel = \"custom\"\nallow = [\"a.test\"]\ninspect = \"off\"\n\
             [[requests]]\nhosts = [\"a.test\"]\naction = \"deny\"\n",
        );
        assert!(w.contains("p.toml:6:1: warning: a.test is not inspected"), "{w}");
    }
}
