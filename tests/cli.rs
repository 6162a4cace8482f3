//! The `sluice` binary as a user runs it: `check` and `validate`, their output and exit codes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::json;

const ALLOW: i32 = 0;
const DENY: i32 = 1;
const USAGE: i32 = 2;

/// A fresh directory under the system temp dir, removed on drop, so `check` finds no `./policies`
/// unless a test puts one there.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("sluice-cli-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    fn write(&self, relative: &str, text: &str) -> PathBuf {
        let path = self.0.join(relative);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("create dirs");
        std::fs::write(&path, text).expect("write file");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn sluice(dir: &Path, args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice")).args(args).current_dir(dir).output().expect("run sluice");
    Run {
        code: out.status.code().expect("exit code"),
        stdout: String::from_utf8(out.stdout).expect("utf-8 stdout"),
        stderr: String::from_utf8(out.stderr).expect("utf-8 stderr"),
    }
}

/// `check` in an empty directory: the built-in policies and default list.
fn check(args: &[&str]) -> Run {
    sluice(&TempDir::new().0, &[&["check"], args].concat())
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn check_prints_one_line_and_exits_0_on_allow() {
    let run = check(&["api.github.com"]);
    assert_eq!(
        run.stdout,
        "allow api.github.com:443 policy=trusted level=trusted rule=\"api.github.com\" (policies/defaults.toml:22, group \"Version control\") reason=\"in the default allowlist\"\n"
    );
    assert_eq!((run.code, run.stderr.as_str()), (ALLOW, ""));

    let run = check(&["A.B.C.D.GCR.IO.:80"]);
    assert_eq!(
        run.stdout,
        "allow a.b.c.d.gcr.io:80 policy=trusted level=trusted rule=\"*.gcr.io\" (policies/defaults.toml:51, group \"Container registries\") reason=\"in the default allowlist\"\n"
    );
    assert_eq!((run.code, run.stderr.as_str()), (ALLOW, ""));
}

#[test]
fn check_exits_1_on_deny() {
    let cases = [
        (
            "github.com:22",
            "deny github.com:22 policy=trusted level=trusted rule=\"github.com\" (policies/defaults.toml:20, group \"Version control\") reason=\"port 22 not allowed (allowed ports: 80, 443)\"\n",
        ),
        ("evilgcr.io", "deny evilgcr.io:443 policy=trusted level=trusted rule=none reason=\"not in the allowlist\"\n"),
        (
            "2130706433:80",
            "deny 127.0.0.1:80 policy=trusted level=trusted rule=none reason=\"loopback address 127.0.0.1\"\n",
        ),
        (
            "[::ffff:169.254.169.254]",
            "deny [::ffff:169.254.169.254]:443 policy=trusted level=trusted rule=none reason=\"link-local address (cloud metadata lives here) ::ffff:169.254.169.254\"\n",
        ),
    ];
    for (destination, line) in cases {
        let run = check(&[destination]);
        assert_eq!(run.stdout, line, "{destination}");
        assert_eq!((run.code, run.stderr.as_str()), (DENY, ""), "{destination}");
    }
    let run = check(&["--policy", "none", "github.com"]);
    assert_eq!(
        run.stdout,
        "deny github.com:443 policy=none level=none rule=\"level = \\\"none\\\"\" (built-in) reason=\"level none allows no outbound connections\"\n"
    );
    assert_eq!(run.code, DENY);
}

#[test]
fn check_exits_2_on_usage_errors() {
    let run = check(&["--policy", "trustd", "github.com"]);
    assert_eq!(run.stderr, "sluice check: unknown policy \"trustd\"; known policies: full, none, trusted\n");
    assert_eq!((run.code, run.stdout.as_str()), (USAGE, ""));

    for (destination, message) in [
        ("github.com:0", "sluice check: \"github.com:0\": invalid port \"0\": expected a number from 1 to 65535\n"),
        (
            "user@github.com",
            "sluice check: \"user@github.com\": user information ('user@') is not allowed before the host\n",
        ),
        ("github..com", "sluice check: \"github..com\": empty label (two dots in a row, or a leading dot)\n"),
        ("1.2.3.256", "sluice check: \"1.2.3.256\": looks like an IPv4 address but is not a valid one\n"),
        ("::1", "sluice check: \"::1\": IPv6 addresses must be written in brackets, e.g. [2001:db8::1]:443\n"),
    ] {
        let run = check(&[destination]);
        assert_eq!(run.stderr, message, "{destination}");
        assert_eq!((run.code, run.stdout.as_str()), (USAGE, ""), "{destination}");
    }

    let run = check(&[]);
    assert_eq!(
        run.stderr,
        "error: the following required arguments were not provided:\n  <DESTINATION>\n\nUsage: sluice check <DESTINATION>\n\nFor more information, try '--help'.\n"
    );
    assert_eq!((run.code, run.stdout.as_str()), (USAGE, ""));
}

#[test]
fn check_exits_2_on_a_broken_policy_directory() {
    let dir = TempDir::new();
    dir.write("policies/team.toml", "version = 1\nlevel = \"custom\"\nallow = [\"*\"]\n");
    let expected = "policies/team.toml:3:10: error: pattern \"*\" would allow every host\n  |\n3 | allow = [\"*\"]\n  |          ^^^\n  = hint: name the domains you need (e.g. \"*.example.com\"), or use level = \"full\" to allow every public host\nsluice: the policy directory has errors; fix them or run `sluice validate`\n";
    // Found as ./policies by default, or named with --policies.
    for args in [&["check", "github.com"][..], &["check", "--policies", "policies", "github.com"]] {
        let run = sluice(&dir.0, args);
        assert_eq!(run.stderr, expected, "{args:?}");
        assert_eq!((run.code, run.stdout.as_str()), (USAGE, ""), "{args:?}");
    }

    let run = sluice(&dir.0, &["check", "--policies", "missing", "github.com"]);
    assert_eq!(
        run.stderr,
        "missing:1:1: error: cannot read policy directory: No such file or directory (os error 2)\nsluice: the policy directory has errors; fix them or run `sluice validate`\n"
    );
    assert_eq!((run.code, run.stdout.as_str()), (USAGE, ""));
}

#[test]
fn check_json_has_every_field() {
    let run = check(&["--json", "github.com:22"]);
    assert_eq!((run.code, run.stderr.as_str()), (DENY, ""));
    let value: serde_json::Value = serde_json::from_str(&run.stdout).expect("check --json prints JSON");
    assert_eq!(
        value,
        json!({
            "destination": "github.com:22",
            "verdict": "deny",
            "reason": "port 22 not allowed (allowed ports: 80, 443)",
            "reason_code": "port_not_allowed",
            "rule": {
                "pattern": "github.com",
                "list": "defaults",
                "file": "policies/defaults.toml",
                "line": 20,
                "group": "Version control",
            },
            "policy": "trusted",
            "level": "trusted",
            "hint": "to allow it, add \"github.com:22\" to `allow`, or 22 to `ports`",
        })
    );
    assert_eq!(run.stdout.lines().count(), 1);

    let run = check(&["--json", "example.org"]);
    assert_eq!(run.code, DENY);
    let value: serde_json::Value = serde_json::from_str(&run.stdout).expect("check --json prints JSON");
    assert_eq!(
        value,
        json!({
            "destination": "example.org:443",
            "verdict": "deny",
            "reason": "not in the allowlist",
            "reason_code": "not_allowlisted",
            "rule": null,
            "policy": "trusted",
            "level": "trusted",
            "hint": "to allow it, add \"example.org\" (or \"example.org:443\") to `allow` in a policy with level = \"custom\" (include_defaults = true keeps the default list)",
        })
    );
}

#[test]
fn check_with_a_policy_directory_and_a_policy_file() {
    let run = sluice(
        repo(),
        &["check", "--policies", "tests/fixtures/policies", "--policy", "acme-dev", "uploads.example.com"],
    );
    assert_eq!(
        run.stdout,
        "deny uploads.example.com:443 policy=acme-dev level=custom rule=\"uploads.example.com\" (tests/fixtures/policies/acme.toml:15) reason=\"in the policy's deny list\"\n"
    );
    assert_eq!((run.code, run.stderr.as_str()), (DENY, ""));

    let run = sluice(repo(), &["check", "--policy", "tests/fixtures/policies/acme.toml", "registry.example.com:8443"]);
    assert_eq!(
        run.stdout,
        "allow registry.example.com:8443 policy=acme-dev level=custom rule=\"registry.example.com:8443\" (tests/fixtures/policies/acme.toml:9) reason=\"in the policy's allow list\"\n"
    );
    assert_eq!((run.code, run.stderr.as_str()), (ALLOW, ""));

    // include_defaults in a policy file means the default list of the policy directory in use (./policies).
    let run = sluice(repo(), &["check", "--policy", "tests/fixtures/policies/acme.toml", "a.gcr.io"]);
    assert_eq!(
        run.stdout,
        "allow a.gcr.io:443 policy=acme-dev level=custom rule=\"*.gcr.io\" (policies/defaults.toml:51, group \"Container registries\") reason=\"in the default allowlist\"\n"
    );
    assert_eq!(run.code, ALLOW);

    let run = sluice(repo(), &["check", "--policy", "tests/fixtures/invalid/lone-star.toml", "github.com"]);
    assert_eq!(
        run.stderr,
        "tests/fixtures/invalid/lone-star.toml:3:10: error: pattern \"*\" would allow every host\n  |\n3 | allow = [\"*\"]\n  |          ^^^\n  = hint: name the domains you need (e.g. \"*.example.com\"), or use level = \"full\" to allow every public host\n"
    );
    assert_eq!((run.code, run.stdout.as_str()), (USAGE, ""));
}

#[test]
fn check_uses_the_policies_directory_it_runs_in() {
    let dir = TempDir::new();
    dir.write("policies/team.toml", "version = 1\nlevel = \"custom\"\nallow = [\"api.example.com\"]\n");
    dir.write("policies/defaults.toml", "version = 1\n\n[[group]]\nname = \"Tiny\"\nhosts = [\"example.org\"]\n");
    let run = sluice(&dir.0, &["check", "--policy", "team", "api.example.com"]);
    assert_eq!(
        run.stdout,
        "allow api.example.com:443 policy=team level=custom rule=\"api.example.com\" (policies/team.toml:3) reason=\"in the policy's allow list\"\n"
    );
    assert_eq!(run.code, ALLOW);
    // policies/defaults.toml replaces the built-in default list for level trusted.
    let run = sluice(&dir.0, &["check", "example.org"]);
    assert_eq!(
        run.stdout,
        "allow example.org:443 policy=trusted level=trusted rule=\"example.org\" (policies/defaults.toml:5, group \"Tiny\") reason=\"in the default allowlist\"\n"
    );
    assert_eq!(run.code, ALLOW);
    let run = sluice(&dir.0, &["check", "github.com"]);
    assert_eq!(
        run.stdout,
        "deny github.com:443 policy=trusted level=trusted rule=none reason=\"not in the allowlist\"\n"
    );
    assert_eq!(run.code, DENY);
}

/// What `validate tests/fixtures/warnings` prints: every warning with its hint, then the summary.
const WARNINGS: &str = r#"tests/fixtures/warnings/doubtful.toml:8:3: warning: duplicate entry "api.example.com" in allow (first on line 7)
  |
8 |   "api.example.com",
  |   ^^^^^^^^^^^^^^^^^
  = hint: remove one of them

tests/fixtures/warnings/doubtful.toml:9:3: warning: "a.cdn.example.com" is already covered by "*.cdn.example.com" (line 10) in allow
  |
9 |   "a.cdn.example.com",
  |   ^^^^^^^^^^^^^^^^^^^
  = hint: remove the narrower entry, or keep it as documentation

tests/fixtures/warnings/doubtful.toml:11:3: warning: "uploads.example.com" can never match: the deny entry "uploads.example.com" (line 14) wins
   |
11 |   "uploads.example.com",
   |   ^^^^^^^^^^^^^^^^^^^^^
   = hint: deny wins over every allow; remove one of the two

tests/fixtures/warnings/doubtful.toml:12:3: warning: "github.com" is already allowed by the default list ("github.com", group "Version control")
   |
12 |   "github.com",
   |   ^^^^^^^^^^^^
   = hint: include_defaults = true already allows it; remove the entry

tests/fixtures/warnings/ignored.toml:4:20: warning: include_defaults is ignored on level trusted
  |
4 | include_defaults = false
  |                    ^^^^^
  = hint: it only applies to level = "custom"; level trusted always uses the default list

tests/fixtures/warnings/ignored.toml:5:10: warning: allow entries are ignored on level trusted
  |
5 | allow = ["api.example.com"]
  |          ^^^^^^^^^^^^^^^^^
  = hint: set level = "custom" to use this allow list

tests/fixtures/warnings/ignored.toml:6:15: warning: port 443 is listed twice
  |
6 | ports = [443, 443]
  |               ^^^

tests/fixtures/warnings/ignored.toml:7:14: warning: 0.0.0.0/0 covers every address: the address guard is off for this policy
  |
7 | allow_ips = ["0.0.0.0/0"]
  |              ^^^^^^^^^^^
  = hint: name the networks this policy needs

checked 2 files: 0 errors, 8 warnings
"#;

#[test]
fn validate_exits_0_with_warnings() {
    let run = sluice(repo(), &["validate", "tests/fixtures/warnings"]);
    assert_eq!((run.code, run.stderr.as_str()), (ALLOW, ""));
    assert_eq!(run.stdout, WARNINGS);

    let run = sluice(repo(), &["validate", "tests/fixtures/policies", "policies/defaults.toml"]);
    assert_eq!(run.stdout, "checked 9 files: 0 errors, 0 warnings\n");
    assert_eq!((run.code, run.stderr.as_str()), (ALLOW, ""));
}

#[test]
fn validate_exits_1_on_errors() {
    let run =
        sluice(repo(), &["validate", "tests/fixtures/invalid/unknown-level.toml", "tests/fixtures/policies/open.toml"]);
    assert_eq!(
        run.stdout,
        "tests/fixtures/invalid/unknown-level.toml:2:9: error: unknown level \"custon\"\n  |\n2 | level = \"custon\"\n  |         ^^^^^^^^\n  = hint: did you mean \"custom\"? levels are \"none\", \"trusted\", \"full\" and \"custom\"\n\nchecked 2 files: 1 error, 0 warnings\n"
    );
    assert_eq!((run.code, run.stderr.as_str()), (DENY, ""));

    let run = sluice(repo(), &["validate", "tests/fixtures/invalid"]);
    assert!(run.stdout.ends_with("\n\nchecked 18 files: 28 errors, 0 warnings\n"), "{}", run.stdout);
    assert_eq!(run.code, DENY);
}

#[test]
fn validate_defaults_to_the_policies_directory() {
    let dir = TempDir::new();
    dir.write("policies/team.toml", "version = 1\nlevel = \"custom\"\nallow = [\"*.com\"]\n");
    let run = sluice(&dir.0, &["validate"]);
    assert_eq!(
        run.stdout,
        "policies/team.toml:3:10: error: pattern is too broad: its fixed part \"com\" is a public suffix\n  |\n3 | allow = [\"*.com\"]\n  |          ^^^^^^^\n  = hint: name the domains you need (e.g. \"*.example.com\"), or use level = \"full\" to allow every public host\n\nchecked 1 file: 1 error, 0 warnings\n"
    );
    assert_eq!(run.code, DENY);
}

#[test]
fn validate_checks_a_server_configuration_as_one() {
    let dir = TempDir::new();
    dir.write("sluice.toml", "[egress]\nlisten = \"127.0.0.1:3128\"\nlistn = 1\n");
    dir.write("ops.toml", "[server]\nshutdown_grace = \"5s\"\n");
    let run = sluice(&dir.0, &["validate", "sluice.toml", "ops.toml"]);
    assert_eq!(
        run.stdout,
        "sluice.toml:3:1: error: unknown field `listn`, expected one of `listen`, `policy`, `connect_timeout`, `idle_timeout`, `header_timeout`, `max_header_bytes`, `max_connections`, `check_sni`\n  |\n3 | listn = 1\n  | ^^^^^\n  = hint: did you mean `listen`?\n\nchecked 2 files: 1 error, 0 warnings\n"
    );
    assert_eq!(run.code, DENY);
}
