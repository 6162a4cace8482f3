//! Table tests: destinations decided against the policy files in `tests/fixtures/policies/`.

use std::fmt::Write;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use sluice::policy::{Authority, Decision, Level, PolicySet, Reason, Rule, RuleList, Target, Verdict};

const DIR: &str = "tests/fixtures/policies";

fn set() -> &'static PolicySet {
    static SET: OnceLock<PolicySet> = OnceLock::new();
    SET.get_or_init(|| PolicySet::load_dir(Path::new(DIR)).unwrap_or_else(|e| panic!("{e}")))
}

fn decide(policy: &str, destination: &str) -> Decision {
    let policy = set().get(policy).unwrap_or_else(|| panic!("no policy {policy:?}"));
    let a = Authority::parse(destination, Some(443)).unwrap_or_else(|e| panic!("{destination}: {e}"));
    policy.decide(&a.target, a.port)
}

/// A decision on one line: `verdict reason_code [list "pattern" file:line "group"]`, with files in the
/// fixture directory named relative to it.
fn outcome(d: &Decision) -> String {
    let mut s = format!("{} {}", d.verdict.as_str(), d.reason.code());
    if let Some(r) = &d.rule {
        let file = r.file.strip_prefix(DIR).and_then(|f| f.strip_prefix('/')).unwrap_or(&r.file);
        let _ = write!(s, " [{:?} {:?} {file}:{}", r.list, &*r.pattern, r.line);
        if let Some(g) = &r.group {
            let _ = write!(s, " {:?}", &**g);
        }
        s.push(']');
    }
    s
}

fn check_table(policy: &str, table: &[(&str, &str)]) {
    let mut failures = Vec::new();
    for (destination, expected) in table {
        let got = outcome(&decide(policy, destination));
        if got != *expected {
            failures.push(format!("{policy} {destination}\n  expected: {expected}\n       got: {got}"));
        }
    }
    assert!(failures.is_empty(), "{} of {} rows differ:\n{}", failures.len(), table.len(), failures.join("\n"));
}

/// `acme-dev`: custom with the default list, exact and wildcard entries, an entry with its own port,
/// label-internal wildcards, a punycode entry, deny entries (one with a port) and allow_ips.
#[test]
fn custom_policy_with_defaults_deny_and_allow_ips() {
    check_table(
        "acme-dev",
        &[
            ("api.example.com", "allow allowlisted [Allow \"api.example.com\" acme.toml:7]"),
            ("API.Example.COM", "allow allowlisted [Allow \"api.example.com\" acme.toml:7]"),
            ("api.example.com.", "allow allowlisted [Allow \"api.example.com\" acme.toml:7]"),
            ("api.example.com:80", "allow allowlisted [Allow \"api.example.com\" acme.toml:7]"),
            ("api.example.com:22", "deny port_not_allowed [Allow \"api.example.com\" acme.toml:7]"),
            ("www.example.com", "deny not_allowlisted"),
            ("example.com", "deny not_allowlisted"),
            ("a.internal.example.com", "allow allowlisted [Allow \"*.internal.example.com\" acme.toml:8]"),
            ("a.b.internal.example.com", "allow allowlisted [Allow \"*.internal.example.com\" acme.toml:8]"),
            ("internal.example.com", "deny not_allowlisted"),
            ("badinternal.example.com", "deny not_allowlisted"),
            ("x.secret.internal.example.com", "deny denylisted [Deny \"*.secret.internal.example.com\" acme.toml:16]"),
            ("secret.internal.example.com", "allow allowlisted [Allow \"*.internal.example.com\" acme.toml:8]"),
            ("registry.example.com:8443", "allow allowlisted [Allow \"registry.example.com:8443\" acme.toml:9]"),
            ("registry.example.com", "deny port_not_allowed [Allow \"registry.example.com:8443\" acme.toml:9]"),
            ("api-eu.example.net", "allow allowlisted [Allow \"api-*.example.net\" acme.toml:10]"),
            ("api-.example.net", "allow allowlisted [Allow \"api-*.example.net\" acme.toml:10]"),
            ("x.api-eu.example.net", "deny not_allowlisted"),
            ("api-eu.x.example.net", "deny not_allowlisted"),
            ("api.example.net", "deny not_allowlisted"),
            ("a.cdn-1.example.org", "allow allowlisted [Allow \"*.cdn-*.example.org\" acme.toml:11]"),
            ("a.b.cdn-eu.example.org", "allow allowlisted [Allow \"*.cdn-*.example.org\" acme.toml:11]"),
            ("cdn-1.example.org", "deny not_allowlisted"),
            ("bücher.example", "allow allowlisted [Allow \"xn--bcher-kva.example\" acme.toml:12]"),
            ("BÜCHER.example", "allow allowlisted [Allow \"xn--bcher-kva.example\" acme.toml:12]"),
            ("xn--bcher-kva.example", "allow allowlisted [Allow \"xn--bcher-kva.example\" acme.toml:12]"),
            ("bucher.example", "deny not_allowlisted"),
            ("uploads.example.com", "deny denylisted [Deny \"uploads.example.com\" acme.toml:15]"),
            ("uploads.example.com:8443", "deny denylisted [Deny \"uploads.example.com\" acme.toml:15]"),
            (
                "github.com",
                "allow default_allowlisted [Defaults \"github.com\" policies/defaults.toml:20 \"Version control\"]",
            ),
            ("gist.github.com", "deny denylisted [Deny \"gist.github.com\" acme.toml:17]"),
            (
                "a.gcr.io:443",
                "allow default_allowlisted [Defaults \"*.gcr.io\" policies/defaults.toml:51 \"Container registries\"]",
            ),
            ("a.gcr.io:80", "deny denylisted [Deny \"*.gcr.io:80\" acme.toml:18]"),
            (
                "gcr.io:80",
                "allow default_allowlisted [Defaults \"gcr.io\" policies/defaults.toml:50 \"Container registries\"]",
            ),
            ("10.1.2.3", "allow allowed_ip [AllowIps \"10.1.2.3/32\" acme.toml:20]"),
            ("10.1.2.3:22", "deny port_not_allowed [AllowIps \"10.1.2.3/32\" acme.toml:20]"),
            ("10.1.2.4", "deny blocked_address"),
            ("192.168.7.7:80", "allow allowed_ip [AllowIps \"192.168.0.0/16\" acme.toml:20]"),
            ("8.8.8.8", "deny ip_not_allowed"),
            ("localhost", "deny blocked_name"),
        ],
    );
}

/// Names that look like an allowed one but are not: `*.x` never covers `x`, an exact entry never
/// covers a subdomain, and a suffix match is on whole labels. Case and one trailing dot do not matter.
#[test]
fn near_misses_are_refused() {
    check_table(
        "exact",
        &[
            ("github.com", "allow allowlisted [Allow \"github.com\" exact.toml:5]"),
            ("GitHub.com.", "allow allowlisted [Allow \"github.com\" exact.toml:5]"),
            ("api.github.com", "deny not_allowlisted"),
            ("github.com.evil.com", "deny not_allowlisted"),
            ("evilgithub.com", "deny not_allowlisted"),
            ("gcr.io", "allow allowlisted [Allow \"gcr.io\" exact.toml:5]"),
            ("a.gcr.io", "deny not_allowlisted"),
            ("evilgcr.io", "deny not_allowlisted"),
            ("gcr.io.evil.com", "deny not_allowlisted"),
            ("github.com:22", "deny port_not_allowed [Allow \"github.com\" exact.toml:5]"),
        ],
    );
    check_table(
        "trusted",
        &[
            (
                "gcr.io",
                "allow default_allowlisted [Defaults \"gcr.io\" policies/defaults.toml:50 \"Container registries\"]",
            ),
            (
                "a.gcr.io",
                "allow default_allowlisted [Defaults \"*.gcr.io\" policies/defaults.toml:51 \"Container registries\"]",
            ),
            (
                "a.b.c.d.gcr.io",
                "allow default_allowlisted [Defaults \"*.gcr.io\" policies/defaults.toml:51 \"Container registries\"]",
            ),
            ("evilgcr.io", "deny not_allowlisted"),
            ("gcr.io.evil.com", "deny not_allowlisted"),
            ("github.com.evil.com", "deny not_allowlisted"),
            // A Cyrillic `і` makes another name; fullwidth letters are mapped onto ASCII (UTS 46).
            ("gіthub.com", "deny not_allowlisted"),
            (
                "ｇｉｔｈｕｂ.com",
                "allow default_allowlisted [Defaults \"github.com\" policies/defaults.toml:20 \"Version control\"]",
            ),
            (
                "GITHUB.COM.",
                "allow default_allowlisted [Defaults \"github.com\" policies/defaults.toml:20 \"Version control\"]",
            ),
            ("example.org", "deny not_allowlisted"),
        ],
    );
}

/// An IP literal in any legacy form is an address: host patterns never match it, only allow_ips
/// does, and the address guard refuses loopback, private and metadata addresses otherwise.
#[test]
fn addresses_match_only_allow_ips() {
    check_table(
        "trusted",
        &[
            ("2130706433", "deny blocked_address"),
            ("127.1", "deny blocked_address"),
            ("0x7f.1", "deny blocked_address"),
            ("0177.0.0.1", "deny blocked_address"),
            ("[::ffff:127.0.0.1]", "deny blocked_address"),
            ("[::1]", "deny blocked_address"),
            ("１２７.０.０.１", "deny blocked_address"),
            ("169.254.169.254:80", "deny blocked_address"),
            ("140.82.112.3", "deny ip_not_allowed"),
            ("metadata.google.internal:80", "deny blocked_name"),
            ("localhost", "deny blocked_name"),
        ],
    );
    check_table(
        "addresses",
        &[
            ("2130706433", "allow allowed_ip [AllowIps \"127.0.0.1/32\" addresses.toml:6]"),
            ("127.1", "allow allowed_ip [AllowIps \"127.0.0.1/32\" addresses.toml:6]"),
            ("0x7f.1", "allow allowed_ip [AllowIps \"127.0.0.1/32\" addresses.toml:6]"),
            ("0177.0.0.1", "allow allowed_ip [AllowIps \"127.0.0.1/32\" addresses.toml:6]"),
            ("[::ffff:127.0.0.1]", "allow allowed_ip [AllowIps \"127.0.0.1/32\" addresses.toml:6]"),
            ("[::1]", "allow allowed_ip [AllowIps \"::1/128\" addresses.toml:6]"),
            ("127.0.0.2", "deny blocked_address"),
            ("10.200.0.1:80", "allow allowed_ip [AllowIps \"10.0.0.0/8\" addresses.toml:6]"),
            ("10.200.0.1:22", "deny port_not_allowed [AllowIps \"10.0.0.0/8\" addresses.toml:6]"),
            ("8.8.4.4", "allow allowed_ip [AllowIps \"8.8.4.4/32\" addresses.toml:6]"),
            ("0x8.0x8.0x4.0x4", "allow allowed_ip [AllowIps \"8.8.4.4/32\" addresses.toml:6]"),
            ("8.8.8.8", "deny ip_not_allowed"),
            ("a.example.com", "allow allowlisted [Allow \"*.example.com\" addresses.toml:5]"),
            ("1.0.0.127.example.com", "allow allowlisted [Allow \"*.example.com\" addresses.toml:5]"),
        ],
    );
}

/// An entry without a port allows the policy's `ports`; an entry with `:port` exactly that port.
#[test]
fn ports_and_per_entry_ports() {
    check_table(
        "ports",
        &[
            ("api.example.com", "allow allowlisted [Allow \"api.example.com\" ports.toml:7]"),
            ("api.example.com:8080", "allow allowlisted [Allow \"api.example.com\" ports.toml:7]"),
            ("api.example.com:80", "deny port_not_allowed [Allow \"api.example.com\" ports.toml:7]"),
            ("ssh.example.com:22", "allow allowlisted [Allow \"ssh.example.com:22\" ports.toml:8]"),
            ("ssh.example.com", "deny port_not_allowed [Allow \"ssh.example.com:22\" ports.toml:8]"),
            ("a.example.net:8443", "allow allowlisted [Allow \"*.example.net:8443\" ports.toml:9]"),
            ("a.example.net", "deny port_not_allowed [Allow \"*.example.net:8443\" ports.toml:9]"),
            ("example.net:8443", "deny not_allowlisted"),
            ("github.com", "deny not_allowlisted"),
        ],
    );
    check_table(
        "open-web",
        &[
            ("example.org", "allow full_level [Level \"level = \\\"full\\\"\" open-web.toml:4]"),
            ("example.org:22", "deny port_not_allowed [Level \"level = \\\"full\\\"\" open-web.toml:4]"),
            ("8.8.8.8:22", "deny port_not_allowed [Level \"level = \\\"full\\\"\" open-web.toml:4]"),
        ],
    );
}

/// Level none refuses everything, level full allows any public destination, deny wins on every level.
#[test]
fn levels_and_deny_over_allow() {
    check_table(
        "lockdown",
        &[
            ("github.com", "deny level_none [Level \"level = \\\"none\\\"\" lockdown.toml:3]"),
            ("8.8.8.8", "deny level_none [Level \"level = \\\"none\\\"\" lockdown.toml:3]"),
        ],
    );
    check_table(
        "none",
        &[
            ("github.com", "deny level_none [Level \"level = \\\"none\\\"\" built-in:0]"),
            ("127.0.0.1", "deny level_none [Level \"level = \\\"none\\\"\" built-in:0]"),
        ],
    );
    check_table(
        "open",
        &[
            ("example.org", "allow full_level [Level \"level = \\\"full\\\"\" open.toml:4]"),
            ("example.org:22", "allow full_level [Level \"level = \\\"full\\\"\" open.toml:4]"),
            ("a.pastebin.com", "deny denylisted [Deny \"*.pastebin.com\" open.toml:5]"),
            ("pastebin.com", "allow full_level [Level \"level = \\\"full\\\"\" open.toml:4]"),
            ("evil.example:8080", "deny denylisted [Deny \"evil.example\" open.toml:5]"),
            ("smtp.example.com:25", "deny denylisted [Deny \"smtp.example.com:25\" open.toml:5]"),
            ("smtp.example.com:587", "allow full_level [Level \"level = \\\"full\\\"\" open.toml:4]"),
            ("8.8.8.8:53", "allow full_level [Level \"level = \\\"full\\\"\" open.toml:4]"),
            ("127.1", "deny blocked_address"),
            ("１２７.０.０.１", "deny blocked_address"),
            ("10.0.0.1", "deny blocked_address"),
            ("localhost", "deny blocked_name"),
        ],
    );
    check_table(
        "full",
        &[
            ("example.org:22", "allow full_level [Level \"level = \\\"full\\\"\" built-in:0]"),
            ("2130706433", "deny blocked_address"),
        ],
    );
    check_table(
        "trusted-no-gist",
        &[
            ("gist.github.com", "deny denylisted [Deny \"gist.github.com\" trusted-no-gist.toml:5]"),
            ("gist.github.com:80", "deny denylisted [Deny \"gist.github.com\" trusted-no-gist.toml:5]"),
            (
                "github.com",
                "allow default_allowlisted [Defaults \"github.com\" policies/defaults.toml:20 \"Version control\"]",
            ),
        ],
    );
}

#[test]
fn the_fixture_directory_loads_cleanly_next_to_the_built_ins() {
    assert_eq!(set().warnings, []);
    let names: Vec<&str> = set().names().collect();
    assert_eq!(
        names,
        [
            "acme-dev",
            "addresses",
            "exact",
            "full",
            "lockdown",
            "none",
            "open",
            "open-web",
            "ports",
            "trusted",
            "trusted-no-gist"
        ]
    );
    for (name, level) in [
        ("acme-dev", Level::Custom),
        ("addresses", Level::Custom),
        ("exact", Level::Custom),
        ("full", Level::Full),
        ("lockdown", Level::None),
        ("none", Level::None),
        ("open", Level::Full),
        ("open-web", Level::Full),
        ("ports", Level::Custom),
        ("trusted", Level::Trusted),
        ("trusted-no-gist", Level::Trusted),
    ] {
        let d = decide(name, "example.org");
        assert_eq!((&*d.policy, d.level), (name, level));
    }
}

fn rule(list: RuleList, pattern: &str, file: &str, line: usize) -> Option<Arc<Rule>> {
    Some(Arc::new(Rule { pattern: pattern.into(), list, file: file.into(), line, group: None }))
}

fn decision(policy: &str, level: Level, verdict: Verdict, reason: Reason, rule: Option<Arc<Rule>>) -> Decision {
    Decision { verdict, reason, rule, policy: policy.into(), level }
}

/// The table above compares reason codes; these pin what each reason carries.
#[test]
fn reasons_carry_their_details() {
    let acme = "tests/fixtures/policies/acme.toml";
    assert_eq!(
        decide("acme-dev", "registry.example.com:443"),
        decision(
            "acme-dev",
            Level::Custom,
            Verdict::Deny,
            Reason::PortNotAllowed { port: 443, allowed: vec![8443] },
            rule(RuleList::Allow, "registry.example.com:8443", acme, 9),
        )
    );
    assert_eq!(
        decide("ports", "api.example.com:80"),
        decision(
            "ports",
            Level::Custom,
            Verdict::Deny,
            Reason::PortNotAllowed { port: 80, allowed: vec![443, 8080] },
            rule(RuleList::Allow, "api.example.com", "tests/fixtures/policies/ports.toml", 7),
        )
    );
    assert_eq!(
        decide("acme-dev", "0x8.8.2056"),
        decision(
            "acme-dev",
            Level::Custom,
            Verdict::Deny,
            Reason::IpNotAllowed { ip: "8.8.8.8".parse().unwrap() },
            None
        )
    );
    assert_eq!(
        decide("trusted", "[::ffff:169.254.169.254]:80"),
        decision(
            "trusted",
            Level::Trusted,
            Verdict::Deny,
            Reason::BlockedAddress {
                ip: "::ffff:169.254.169.254".parse().unwrap(),
                range: "link-local address (cloud metadata lives here)".into()
            },
            None
        )
    );
    assert_eq!(
        decide("open", "A.LocalHost."),
        decision(
            "open",
            Level::Full,
            Verdict::Deny,
            Reason::BlockedName { name: "a.localhost".into(), range: "loopback address".into() },
            None
        )
    );
    assert_eq!(
        decide("open-web", "example.org:8080"),
        decision(
            "open-web",
            Level::Full,
            Verdict::Deny,
            Reason::PortNotAllowed { port: 8080, allowed: vec![80, 443] },
            rule(RuleList::Level, "level = \"full\"", "tests/fixtures/policies/open-web.toml", 4),
        )
    );
}

#[test]
fn port_zero_is_never_a_destination() {
    let target = Target::parse("github.com").unwrap();
    for name in ["trusted", "full", "none", "acme-dev"] {
        let d = set().get(name).unwrap().decide(&target, 0);
        assert_eq!((d.verdict, d.reason, d.rule), (Verdict::Deny, Reason::InvalidPort, None), "{name}");
    }
}

/// What a person reads: the reason sentence and the hint for each refusal.
#[test]
fn refusals_explain_themselves() {
    let cases = [
        (
            "exact",
            "api.github.com",
            "not in the allowlist",
            Some(
                "to allow it, add \"api.github.com\" (or \"api.github.com:443\") to `allow` in a policy with level = \"custom\" (include_defaults = true keeps the default list)",
            ),
        ),
        (
            "exact",
            "github.com:22",
            "port 22 not allowed (allowed ports: 80, 443)",
            Some("to allow it, add \"github.com:22\" to `allow`, or 22 to `ports`"),
        ),
        (
            "acme-dev",
            "uploads.example.com",
            "in the policy's deny list",
            Some("remove \"uploads.example.com\" from `deny` (tests/fixtures/policies/acme.toml:15)"),
        ),
        (
            "none",
            "github.com",
            "level none allows no outbound connections",
            Some("use a policy with level \"trusted\", \"custom\" or \"full\""),
        ),
        (
            "trusted",
            "2130706433",
            "loopback address 127.0.0.1",
            Some(
                "connect by host name, or add \"127.0.0.1/32\" to `allow_ips` if this address is meant to be reachable",
            ),
        ),
        (
            "trusted",
            "[2606:4700::1111]",
            "IP address 2606:4700::1111 is not covered by allow_ips (addresses never match host patterns)",
            Some(
                "connect by host name, or add \"2606:4700::1111/128\" to `allow_ips` if this address is meant to be reachable",
            ),
        ),
        ("trusted", "localhost", "localhost always means a loopback address", None),
    ];
    for (policy, destination, reason, hint) in cases {
        let a = Authority::parse(destination, Some(443)).unwrap();
        let d = set().get(policy).unwrap().decide(&a.target, a.port);
        assert_eq!(d.reason.to_string(), reason, "{policy} {destination}");
        assert_eq!(d.hint(&a.target, a.port).as_deref(), hint, "{policy} {destination}");
    }
}

#[test]
fn a_policy_lists_its_own_patterns() {
    let mut patterns: Vec<String> = set().get("acme-dev").unwrap().patterns().map(ToString::to_string).collect();
    patterns.sort();
    assert_eq!(
        patterns,
        [
            "*.cdn-*.example.org",
            "*.gcr.io:80",
            "*.internal.example.com",
            "*.secret.internal.example.com",
            "api-*.example.net",
            "api.example.com",
            "gist.github.com",
            "registry.example.com:8443",
            "uploads.example.com",
            "xn--bcher-kva.example",
        ]
    );
    assert_eq!(set().get("trusted").unwrap().patterns().count(), 0);
}
