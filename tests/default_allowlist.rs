//! The built-in Trusted level allows exactly the published default list, group by group.

use std::sync::Arc;

use sluice::policy::{BUILTIN_DEFAULTS, BUILTIN_DEFAULTS_FILE, DefaultList};
use sluice::policy::{Decision, Level, PolicySet, Reason, Rule, RuleList, Target, Verdict};

/// The published list: `## Group` headings, one pattern a line, an optional `(label)` after it.
const PUBLISHED: &str = include_str!("fixtures/default-allowlist.txt");

struct Entry {
    group: String,
    pattern: String,
}

fn published() -> Vec<Entry> {
    let mut group = None;
    let mut entries = Vec::new();
    for line in PUBLISHED.lines().map(str::trim) {
        if let Some(heading) = line.strip_prefix("## ") {
            group = Some(heading.to_string());
        } else if line.is_empty() || line.starts_with('#') {
            continue;
        } else {
            // `packagist.org (PHP Composer)`: the label is the documentation's, not part of the pattern.
            let pattern = line.split_once(" (").map_or(line, |(p, _)| p).to_string();
            let group = group.clone().unwrap_or_else(|| panic!("pattern {pattern:?} before the first heading"));
            entries.push(Entry { group, pattern });
        }
    }
    entries
}

/// The line of `policies/defaults.toml` that holds `"pattern"`, which is where a rule must point.
fn defaults_line(pattern: &str) -> usize {
    let quoted = format!("\"{pattern}\"");
    let lines: Vec<usize> = BUILTIN_DEFAULTS
        .lines()
        .enumerate()
        .filter(|(_, l)| l.trim_start().starts_with(&quoted))
        .map(|(i, _)| i + 1)
        .collect();
    assert_eq!(lines.len(), 1, "{pattern} should be on exactly one line of defaults.toml");
    lines[0]
}

fn trusted_decision(host: &str, port: u16) -> Decision {
    let set = PolicySet::builtin();
    let trusted = set.get("trusted").expect("built-in trusted policy");
    let target = Target::parse(host).unwrap_or_else(|e| panic!("{host}: {e}"));
    trusted.decide(&target, port)
}

fn allowed_by(pattern: &str, group: &str) -> Decision {
    Decision {
        verdict: Verdict::Allow,
        reason: Reason::DefaultAllowlisted,
        rule: Some(Arc::new(Rule {
            pattern: pattern.into(),
            list: RuleList::Defaults,
            file: BUILTIN_DEFAULTS_FILE.into(),
            line: defaults_line(pattern),
            group: Some(group.into()),
        })),
        policy: "trusted".into(),
        level: Level::Trusted,
    }
}

#[test]
fn the_fixture_has_201_patterns_in_17_groups() {
    let entries = published();
    assert_eq!(entries.len(), 201);
    let mut groups: Vec<&str> = entries.iter().map(|e| e.group.as_str()).collect();
    groups.dedup();
    assert_eq!(groups.len(), 17);
}

#[test]
fn defaults_toml_holds_the_published_list_in_its_groups() {
    let list = DefaultList::builtin();
    assert_eq!(list.groups.len(), 17);
    assert_eq!(list.groups.iter().map(|(_, p)| p.len()).sum::<usize>(), 201);
    assert_eq!(list.len(), 201);
    let ours: Vec<(String, String)> =
        list.groups.iter().flat_map(|(g, ps)| ps.iter().map(move |p| (g.to_string(), p.to_string()))).collect();
    let theirs: Vec<(String, String)> = published().into_iter().map(|e| (e.group, e.pattern)).collect();
    assert_eq!(ours, theirs);
}

#[test]
fn the_file_on_disk_is_the_compiled_in_list() {
    let on_disk = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/policies/defaults.toml"))
        .expect("policies/defaults.toml");
    assert_eq!(on_disk, BUILTIN_DEFAULTS);
    let (list, warnings) = DefaultList::parse(BUILTIN_DEFAULTS_FILE, &on_disk).expect("defaults.toml is valid");
    assert_eq!(warnings, []);
    assert_eq!(list.len(), 201);
}

#[test]
fn every_published_pattern_is_allowed_by_trusted_with_its_group() {
    let entries = published();
    for Entry { group, pattern } in &entries {
        match pattern.strip_prefix("*.") {
            None => {
                for port in [80, 443] {
                    assert_eq!(trusted_decision(pattern, port), allowed_by(pattern, group), "{pattern}:{port}");
                }
            }
            Some(apex) => {
                for host in [format!("a.{apex}"), format!("a.b.{apex}"), format!("sluice-test-1.x-y.z.{apex}")] {
                    assert_eq!(trusted_decision(&host, 443), allowed_by(pattern, group), "{host} via {pattern}");
                }
                // The apex is not covered by its own wildcard: only an entry of its own allows it.
                let apex_decision = trusted_decision(apex, 443);
                if let Some(own) = entries.iter().find(|e| e.pattern == apex) {
                    assert_eq!(apex_decision, allowed_by(apex, &own.group), "{apex}");
                } else {
                    assert_eq!(
                        apex_decision,
                        Decision {
                            verdict: Verdict::Deny,
                            reason: Reason::NotAllowlisted,
                            rule: None,
                            policy: "trusted".into(),
                            level: Level::Trusted,
                        },
                        "{apex} (not listed on its own)"
                    );
                }
            }
        }
    }
}

#[test]
fn other_ports_are_refused_naming_the_entry() {
    let d = trusted_decision("github.com", 22);
    assert_eq!(d.verdict, Verdict::Deny);
    assert_eq!(d.reason, Reason::PortNotAllowed { port: 22, allowed: vec![80, 443] });
    assert_eq!(d.rule, allowed_by("github.com", "Version control").rule);
    let d = trusted_decision("a.b.gcr.io", 8443);
    assert_eq!(d.reason, Reason::PortNotAllowed { port: 8443, allowed: vec![80, 443] });
    assert_eq!(d.rule.as_deref().map(|r| &*r.pattern), Some("*.gcr.io"));
}
