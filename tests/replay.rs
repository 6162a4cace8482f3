//! `sluice replay` on a log a real proxy recorded: a candidate that drops an entry names what breaks
//! and exits 1, an identical one exits 0, one that adds an entry lists what it newly allows; the
//! guard is re-checked on the address that was dialled; bad input exits 2; malformed lines are
//! located and counted.

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};
use sluice::credential::now_unix;
use support::*;

const KEY: &[u8] = b"replay-test-signing-key-0123456789abcdef";

fn app(allow: &[String], extra: &str) -> String {
    let list: Vec<String> = allow.iter().map(|a| format!("{a:?}")).collect();
    format!("version = 1\nname = \"app\"\nlevel = \"custom\"\nallow = [{}]\n{extra}", list.join(", "))
}

const IPS: &str = "allow_ips = [\"127.0.0.0/8\"]\n";

struct Recorded {
    dir: TempDir,
    log: PathBuf,
    port: u16,
    _up: Upstream,
}

/// `app` allows one.test and two.test; sessions s1 and s2 fetch one.test three times, two.test once,
/// and are refused three.test twice; a session under `other` is refused once.
async fn recorded() -> Recorded {
    let up = Upstream::plain("up").await;
    let p = up.port();
    let pdir = TempDir::new("replay-proxy");
    let key = pdir.write("key", KEY);
    let config = format!(
        "[auth]\nanonymous = false\nkey_file = {:?}\n[resolver]\nhosts = {{ \"one.test\" = [\"127.0.0.1\"], \"two.test\" = [\"127.0.0.1\"], \"three.test\" = [\"127.0.0.1\"] }}\n",
        key.display()
    );
    let policy = app(&[format!("one.test:{p}"), format!("two.test:{p}")], IPS);
    let other = "version = 1\nname = \"other\"\nlevel = \"custom\"\n";
    let proxy = Proxy::start_recorded(pdir, &config, &[("app.toml", &policy), ("other.toml", other)]).await;
    let now = now_unix();
    let get = |sid: &str, policy: &str, host: &str| {
        let token = egress_token(KEY, sid, policy, now, now + 600);
        format!(
            "GET http://{host}:{p}/x HTTP/1.1\r\nHost: {host}:{p}\r\nProxy-Authorization: {}\r\nConnection: close\r\n\r\n",
            basic(sid, &token)
        )
    };
    let asked = [
        ("s1", "app", "one.test", "200"),
        ("s2", "app", "one.test", "200"),
        ("s1", "app", "one.test", "200"),
        ("s2", "app", "two.test", "200"),
        ("s1", "app", "three.test", "403"),
        ("s2", "app", "three.test", "403"),
        ("s3", "other", "one.test", "403"),
    ];
    for (sid, policy, host, status) in asked {
        let r = raw_exchange(proxy.addr, get(sid, policy, host).as_bytes()).await;
        assert!(r.status_line.starts_with(&format!("HTTP/1.1 {status}")), "{host}: {r:?}");
    }
    // 4 served requests write two lines each; 3 refusals one.
    let want = 4 * 2 + 3;
    let mut lines = proxy.records();
    for _ in 0..100 {
        if lines.len() >= want {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        lines = proxy.records();
    }
    assert_eq!(lines.len(), want, "{}", lines.join("\n"));
    let dir = TempDir::new("replay");
    let log = dir.write("decisions.jsonl", lines.join("\n") + "\n");
    Recorded { dir, log, port: p, _up: up }
}

fn replay(log: &Path, candidate: &Path, extra: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["replay", "--log"])
        .arg(log)
        .arg("--policy")
        .arg(candidate)
        .args(extra)
        .output()
        .expect("run sluice");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json_replay(log: &Path, candidate: &Path) -> (Option<i32>, Value) {
    let (code, out, err) = replay(log, candidate, &["--json"]);
    (code, serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}\n{err}")))
}

/// (destination, reason, count, sessions) of each change.
fn changes(v: &Value, key: &str) -> Vec<(String, String, u64, Value)> {
    v[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["destination"].as_str().unwrap().into(),
                c["reason"].as_str().unwrap().into(),
                c["count"].as_u64().unwrap(),
                c["sessions"].clone(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_reports_what_a_candidate_changes() {
    let r = recorded().await;
    let p = r.port;
    let (one, two, three) = (format!("one.test:{p}"), format!("two.test:{p}"), format!("three.test:{p}"));

    // The policy as recorded: nothing changes, exit 0.
    let same = r.dir.write("same/app.toml", app(&[one.clone(), two.clone()], IPS));
    let (code, v) = json_replay(&r.log, &same);
    assert_eq!(code, Some(0), "{v}");
    assert_eq!((v["replayed"].as_u64(), v["unchanged"].as_u64()), (Some(6), Some(6)), "{v}");
    assert_eq!((v["other_policies"].as_u64(), v["malformed"].as_u64()), (Some(1), Some(0)));
    assert!(changes(&v, "newly_denied").is_empty() && changes(&v, "newly_allowed").is_empty(), "{v}");
    let (code, text, _) = replay(&r.log, &same, &[]);
    assert_eq!(code, Some(0));
    assert!(text.contains("\nnewly denied: none\nnewly allowed: none\n"), "{text}");

    // Dropping two.test breaks it: exit 1, named with its count and session.
    let dropped = r.dir.write("dropped/app.toml", app(std::slice::from_ref(&one), IPS));
    let (code, v) = json_replay(&r.log, &dropped);
    assert_eq!(code, Some(1), "{v}");
    assert_eq!(changes(&v, "newly_denied"), [(two.clone(), "not_allowlisted".into(), 1, json!(["s2"]))]);
    let (code, text, _) = replay(&r.log, &dropped, &[]);
    assert_eq!(code, Some(1));
    assert!(
        text.contains(&format!("newly denied: 1 destination, 1 request\n  {two} reason=not_allowlisted: 1 request, ")),
        "{text}"
    );

    // Adding three.test: newly allowed, nothing denied, exit 0.
    let added = r.dir.write("added/app.toml", app(&[one.clone(), two.clone(), three.clone()], IPS));
    let (code, v) = json_replay(&r.log, &added);
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(changes(&v, "newly_allowed"), [(three.clone(), "allowlisted".into(), 2, json!(["s1", "s2"]))]);

    // Without allow_ips the dialled address (loopback) is behind the guard again: sorted by count.
    let guarded = r.dir.write("guarded/app.toml", app(&[one.clone(), two.clone()], ""));
    let (code, v) = json_replay(&r.log, &guarded);
    assert_eq!(code, Some(1), "{v}");
    assert_eq!(
        changes(&v, "newly_denied"),
        [
            (one, "blocked_address".into(), 3, json!(["s1", "s2"])),
            (two.clone(), "blocked_address".into(), 1, json!(["s2"]))
        ]
    );

    // The same drop in report mode breaks nothing: report mode serves it.
    let reported =
        r.dir.write("reported/app.toml", app(&[format!("one.test:{p}")], &format!("{IPS}mode = \"report\"\n")));
    let (code, v) = json_replay(&r.log, &reported);
    assert_eq!(code, Some(0), "{v}");
    assert!(changes(&v, "newly_denied").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_locates_malformed_lines_and_refuses_bad_input() {
    let r = recorded().await;
    let p = r.port;
    let candidate = r.dir.write("c/app.toml", app(&[format!("one.test:{p}")], IPS));
    let text = std::fs::read_to_string(&r.log).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    lines.insert(2, "{\"event\":\"decision\",\"host\":\"one.test\",\"port\":99999}");
    lines.insert(5, "\u{1}\u{2} binary junk");
    lines.push("{\"event\":\"decision\",\"host\":");
    let bad = r.dir.write("bad.jsonl", lines.join("\n") + "\n");
    let (code, out, err) = replay(&bad, &candidate, &["--json"]);
    assert_eq!(code, Some(1), "the rest is still replayed: {out}{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["malformed"], 3);
    assert_eq!(v["replayed"], 6);
    let located: Vec<String> =
        err.lines().map(|l| l.split(": malformed record").next().unwrap_or("").to_string()).collect();
    let at = |n: usize| format!("{}:{n}", bad.display());
    assert_eq!(located, [at(3), at(6), at(lines.len())], "{err}");

    // Gzip'd logs read the same.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(text.as_bytes()).unwrap();
    let gz = r.dir.write("decisions.jsonl.gz", gz.finish().unwrap());
    assert_eq!(json_replay(&gz, &candidate), json_replay(&r.log, &candidate));
    // A truncated gzip stream is bad input, named.
    let bytes = std::fs::read(&gz).unwrap();
    let cut = r.dir.write("cut.jsonl.gz", &bytes[..bytes.len() / 2]);
    let (code, _, err) = replay(&cut, &candidate, &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains(&format!("sluice replay: {}: read error after line", cut.display())), "{err}");

    // Bad input: exit 2 with the reason.
    let (code, _, err) = replay(Path::new("/nonexistent/log"), &candidate, &[]);
    assert_eq!(code, Some(2));
    assert!(err.starts_with("sluice replay: cannot read /nonexistent/log:"), "{err}");
    let invalid = r.dir.write("invalid/app.toml", "version = 1\nname = \"app\"\nlevel = \"custum\"\n");
    let (code, _, err) = replay(&r.log, &invalid, &[]);
    assert_eq!(code, Some(2));
    assert!(err.contains("app.toml:3:9: error: unknown level \"custum\""), "{err}");
    let (code, _, err) = replay(&r.log, Path::new("no-such-policy"), &[]);
    assert_eq!(code, Some(2));
    assert!(err.starts_with("sluice replay: unknown policy \"no-such-policy\""), "{err}");
}
