//! Invalid policy files: every mistake is reported at file:line:col with the line, a caret and a hint.

use std::path::{Path, PathBuf};

use sluice::command;
use sluice::policy::{DefaultList, parse_policy};

const DIR: &str = "tests/fixtures/invalid";

/// Every file of the fixture directory and exactly what `validate` prints for it.
const EXPECTED: &[(&str, &str)] = &[
    (
        "address-pattern.toml",
        r#"tests/fixtures/invalid/address-pattern.toml:3:10: error: pattern "127.0.0.1" is an IP address; host patterns never match addresses
  |
3 | allow = ["127.0.0.1", "*.0.0.1"]
  |          ^^^^^^^^^^^
  = hint: put addresses in allow_ips, e.g. allow_ips = ["127.0.0.1"]

tests/fixtures/invalid/address-pattern.toml:3:23: error: pattern "*.0.0.1" ends in a numeric label, so it could only match an IP address, which host patterns never do
  |
3 | allow = ["127.0.0.1", "*.0.0.1"]
  |                       ^^^^^^^^^
  = hint: put addresses in allow_ips, e.g. allow_ips = ["192.0.2.0/24"]"#,
    ),
    (
        "bad-allow-ips.toml",
        r#"tests/fixtures/invalid/bad-allow-ips.toml:3:14: error: invalid network "10.0.0.0/33"
  |
3 | allow_ips = ["10.0.0.0/33", "10.1.2.3/8", "example.com"]
  |              ^^^^^^^^^^^^^
  = hint: write an address or a CIDR block, e.g. "10.1.2.3" or "10.0.0.0/8"

tests/fixtures/invalid/bad-allow-ips.toml:3:29: error: "10.1.2.3/8" has host bits set
  |
3 | allow_ips = ["10.0.0.0/33", "10.1.2.3/8", "example.com"]
  |                             ^^^^^^^^^^^^
  = hint: write the network address: "10.0.0.0/8"

tests/fixtures/invalid/bad-allow-ips.toml:3:43: error: invalid address "example.com"
  |
3 | allow_ips = ["10.0.0.0/33", "10.1.2.3/8", "example.com"]
  |                                           ^^^^^^^^^^^^^
  = hint: write an address or a CIDR block, e.g. "10.1.2.3" or "10.0.0.0/8"; host names belong in `allow`"#,
    ),
    (
        "bare-wildcard.toml",
        r#"tests/fixtures/invalid/bare-wildcard.toml:3:10: error: pattern "*." has nothing after the wildcard
  |
3 | allow = ["*."]
  |          ^^^^
  = hint: name the domains you need (e.g. "*.example.com"), or use level = "full" to allow every public host"#,
    ),
    (
        "lone-star.toml",
        r#"tests/fixtures/invalid/lone-star.toml:3:10: error: pattern "*" would allow every host
  |
3 | allow = ["*"]
  |          ^^^
  = hint: name the domains you need (e.g. "*.example.com"), or use level = "full" to allow every public host"#,
    ),
    (
        "missing-version.toml",
        r#"tests/fixtures/invalid/missing-version.toml:1:1: error: missing `version`
  |
1 | name = "no-version"
  | ^
  = hint: add `version = 1` as the first line"#,
    ),
    (
        "path.toml",
        r#"tests/fixtures/invalid/path.toml:3:10: error: pattern "api.example.com/v1" has a path; patterns name hosts, not URLs
  |
3 | allow = ["api.example.com/v1"]
  |          ^^^^^^^^^^^^^^^^^^^^
  = hint: write the host alone: "api.example.com" (add ":PORT" for a port other than the policy's ports)"#,
    ),
    (
        "port-range.toml",
        r#"tests/fixtures/invalid/port-range.toml:3:15: error: port 0 is out of range
  |
3 | ports = [443, 0, 65536]
  |               ^
  = hint: ports are 1 to 65535

tests/fixtures/invalid/port-range.toml:3:18: error: port 65536 is out of range
  |
3 | ports = [443, 0, 65536]
  |                  ^^^^^
  = hint: ports are 1 to 65535

tests/fixtures/invalid/port-range.toml:4:10: error: invalid port "70000": expected a number from 1 to 65535
  |
4 | allow = ["registry.example.com:70000"]
  |          ^^^^^^^^^^^^^^^^^^^^^^^^^^^^
  = hint: ports are 1 to 65535, e.g. "registry.example.com:8443""#,
    ),
    (
        "scheme.toml",
        r#"tests/fixtures/invalid/scheme.toml:3:10: error: pattern "https://api.example.com/v1" has a scheme; patterns name hosts, not URLs
  |
3 | allow = ["https://api.example.com/v1"]
  |          ^^^^^^^^^^^^^^^^^^^^^^^^^^^^
  = hint: write the host alone: "api.example.com" (add ":PORT" for a port other than the policy's ports)"#,
    ),
    (
        "several.toml",
        r#"tests/fixtures/invalid/several.toml:2:11: error: unsupported version 2
  |
2 | version = 2
  |           ^
  = hint: this sluice reads `version = 1`

tests/fixtures/invalid/several.toml:5:3: error: pattern "*" would allow every host
  |
5 |   "*",
  |   ^^^
  = hint: name the domains you need (e.g. "*.example.com"), or use level = "full" to allow every public host

tests/fixtures/invalid/several.toml:7:3: error: pattern "Bad.example.com" is not in canonical form (lowercase ASCII, punycode); write "bad.example.com"
  |
7 |   "Bad.example.com",
  |   ^^^^^^^^^^^^^^^^^
  = hint: write "bad.example.com"

tests/fixtures/invalid/several.toml:9:9: error: pattern is too broad: its fixed part "co.uk" is a public suffix
  |
9 | deny = ["*.co.uk"]
  |         ^^^^^^^^^
  = hint: name the domains you need (e.g. "*.example.com"), or use level = "full" to allow every public host

tests/fixtures/invalid/several.toml:10:14: error: port 99999 is out of range
   |
10 | ports = [22, 99999]
   |              ^^^^^
   = hint: ports are 1 to 65535"#,
    ),
    (
        "star-co-uk.toml",
        r#"tests/fixtures/invalid/star-co-uk.toml:3:10: error: pattern is too broad: its fixed part "co.uk" is a public suffix
  |
3 | allow = ["*.co.uk"]
  |          ^^^^^^^^^
  = hint: name the domains you need (e.g. "*.example.com"), or use level = "full" to allow every public host"#,
    ),
    (
        "star-com.toml",
        r#"tests/fixtures/invalid/star-com.toml:3:10: error: pattern is too broad: its fixed part "com" is a public suffix
  |
3 | allow = ["*.com"]
  |          ^^^^^^^
  = hint: name the domains you need (e.g. "*.example.com"), or use level = "full" to allow every public host"#,
    ),
    (
        "syntax.toml",
        r#"tests/fixtures/invalid/syntax.toml:4:1: error: missing comma between array elements, expected `,`
  |
4 | deny = []
  | ^"#,
    ),
    (
        "unicode.toml",
        r#"tests/fixtures/invalid/unicode.toml:3:10: error: pattern "bücher.example" is not in canonical form (lowercase ASCII, punycode); write "xn--bcher-kva.example"
  |
3 | allow = ["bücher.example", "*.münchen.example:8443"]
  |          ^^^^^^^^^^^^^^^^
  = hint: write "xn--bcher-kva.example"

tests/fixtures/invalid/unicode.toml:3:28: error: pattern "*.münchen.example:8443" is not in canonical form (lowercase ASCII, punycode); write "*.xn--mnchen-3ya.example:8443"
  |
3 | allow = ["bücher.example", "*.münchen.example:8443"]
  |                            ^^^^^^^^^^^^^^^^^^^^^^^^
  = hint: write "*.xn--mnchen-3ya.example:8443""#,
    ),
    (
        "unknown-key.toml",
        r#"tests/fixtures/invalid/unknown-key.toml:3:1: error: unknown field `alow`, expected one of `version`, `name`, `description`, `level`, `mode`, `include_defaults`, `allow`, `deny`, `ports`, `allow_ips`, `limits`, `inspect`, `tls_passthrough`, `requests`
  |
3 | alow = ["api.example.com"]
  | ^^^^
  = hint: did you mean `allow`?"#,
    ),
    (
        "unknown-level.toml",
        r#"tests/fixtures/invalid/unknown-level.toml:2:9: error: unknown level "custon"
  |
2 | level = "custon"
  |         ^^^^^^^^
  = hint: did you mean "custom"? levels are "none", "trusted", "full" and "custom""#,
    ),
    (
        "unknown-limit.toml",
        r#"tests/fixtures/invalid/unknown-limit.toml:4:1: error: unknown field `burts`, expected one of `requests_per_second`, `burst`, `max_tunnels`, `upload_bytes_per_second`, `download_bytes_per_second`, `upload_quota`, `download_quota`
  |
4 | burts = 40
  | ^^^^^
  = hint: did you mean `burst`?"#,
    ),
    (
        "unknown-mode.toml",
        r#"tests/fixtures/invalid/unknown-mode.toml:3:8: error: unknown mode "reprot"
  |
3 | mode = "reprot"
  |        ^^^^^^^^
  = hint: did you mean "report"? modes are "enforce" (the default) and "report""#,
    ),
    (
        "uppercase.toml",
        r#"tests/fixtures/invalid/uppercase.toml:3:10: error: pattern "API.Example.com" is not in canonical form (lowercase ASCII, punycode); write "api.example.com"
  |
3 | allow = ["API.Example.com"]
  |          ^^^^^^^^^^^^^^^^^
  = hint: write "api.example.com""#,
    ),
];

/// The diagnostics of one file, separated by a blank line as `validate` prints them.
fn errors_of(file: &str) -> String {
    let path = Path::new(DIR).join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    match parse_policy(&path.display().to_string(), &text, &DefaultList::builtin()) {
        Ok(_) => format!("{file} was accepted"),
        Err(d) => d.0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n\n"),
    }
}

#[test]
fn each_file_reports_exactly_its_mistakes() {
    for (file, expected) in EXPECTED {
        assert_eq!(errors_of(file), *expected, "{file}");
    }
}

#[test]
fn the_table_covers_every_fixture() {
    let mut on_disk: Vec<String> = std::fs::read_dir(DIR)
        .expect("fixture directory")
        .map(|e| e.expect("directory entry").file_name().to_string_lossy().into_owned())
        .collect();
    on_disk.sort();
    let listed: Vec<&str> = EXPECTED.iter().map(|(f, _)| *f).collect();
    assert_eq!(on_disk, listed);
}

/// `validate` goes on past the first error of the first file: it prints every error of every file.
#[test]
fn validate_prints_every_error_of_every_file() {
    let mut out = Vec::new();
    let status = command::validate(&[PathBuf::from(DIR)], &mut out);
    let out = String::from_utf8(out).expect("utf-8 output");
    let errors = EXPECTED.iter().map(|(_, e)| e.matches(": error: ").count()).sum::<usize>();
    let mut expected: String = EXPECTED.iter().map(|(_, e)| format!("{e}\n\n")).collect();
    expected.push_str(&format!("checked {} files: {errors} errors, 0 warnings\n", EXPECTED.len()));
    assert_eq!(out, expected);
    assert_eq!(errors, 28);
    assert_eq!(status, command::EXIT_DENY);
}

/// A `**` label is refused at its file:line:col with the pattern to write instead; a `**` inside a label
/// loads (it matches like `*`) and `validate` warns about it.
#[test]
fn star_star_labels_are_refused_and_star_star_inside_a_label_warned() {
    let text = "version = 1\nname = \"p\"\nlevel = \"custom\"\nallow = [\n  \"api-**.example.com\",\n  \"**.example.com\",\n]\n";
    let diagnostics = |text: &str| match parse_policy("p.toml", text, &DefaultList::builtin()) {
        Ok((_, warnings)) => warnings.iter().map(ToString::to_string).collect::<Vec<_>>(),
        Err(d) => d.0.iter().map(ToString::to_string).collect(),
    };
    let warning = r#"p.toml:5:3: warning: "api-**.example.com" in allow: "**" inside a label matches exactly like "*", within that one label
  |
5 |   "api-**.example.com",
  |   ^^^^^^^^^^^^^^^^^^^^
  = hint: write "api-*.example.com"; sluice has no "**" (a leading "*." matches one or more labels)"#;
    let error = r#"p.toml:6:3: error: pattern "**.example.com" has a "**" label, which sluice does not have: "*." at the front matches one or more labels, and "*" anywhere else exactly one
  |
6 |   "**.example.com",
  |   ^^^^^^^^^^^^^^^^
  = hint: write "*.example.com", which never matches "example.com" itself: list that too if it should"#;
    assert_eq!(diagnostics(text), [warning, error]);
    assert!(parse_policy("p.toml", text, &DefaultList::builtin()).is_err_and(|d| d.0[1].is_error()));

    // Without the `**` label the policy loads, with the warning.
    let text = text.replace("  \"**.example.com\",\n", "");
    assert!(parse_policy("p.toml", &text, &DefaultList::builtin()).is_ok());
    assert_eq!(diagnostics(&text), [warning]);
}
