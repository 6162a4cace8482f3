//! `sluice suggest` on logs a real proxy recorded: exact entries, the `*.domain` collapse below a
//! registrable domain only (never `*.co.uk` or `*.github.io`), `:PORT` outside the policy's ports,
//! guard refusals never suggested, the default list recognised, and the round trip: the snippet,
//! pasted into a policy, makes `sluice check` allow every destination it was suggested for.

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;
use sluice::credential::now_unix;
use support::*;

const KEY: &[u8] = b"suggest-test-signing-key-0123456789abcdef";

fn auth(sid: &str, policy: &str) -> String {
    let now = now_unix();
    basic(sid, &egress_token(KEY, sid, policy, now, now + 600))
}

/// A CONNECT through the proxy; returns the status line.
async fn connect(proxy: &Proxy, dest: &str, sid: &str, policy: &str) -> String {
    let request =
        format!("CONNECT {dest} HTTP/1.1\r\nHost: {dest}\r\nProxy-Authorization: {}\r\n\r\n", auth(sid, policy));
    raw_exchange(proxy.addr, request.as_bytes()).await.status_line
}

/// The destinations each session asked for, and what the proxy answered.
const ENFORCED: [(&str, &str); 17] = [
    ("api.example.com:443", "s-a"),
    ("api.example.com:443", "s-b"),
    ("api.example.com:80", "s-a"),
    ("a.svc.example.org:443", "s-a"),
    ("b.svc.example.org:443", "s-a"),
    ("c.example.org:443", "s-b"),
    ("a.co.uk:443", "s-a"),
    ("b.co.uk:443", "s-a"),
    ("c.co.uk:443", "s-a"),
    ("a.github.io:443", "s-a"),
    ("b.github.io:443", "s-a"),
    ("c.github.io:443", "s-a"),
    ("registry.example.net:8443", "s-a"),
    ("pypi.org:443", "s-a"),
    ("169.254.169.254:80", "s-a"),
    ("metadata.google.internal:80", "s-a"),
    ("blocked.example.com:443", "s-a"),
];

/// Records a log: the `enf` policy refusing [`ENFORCED`], and the report-mode `rep` policy serving
/// nothing but refusing `loop.test` (a name whose answer is loopback) at the guard.
async fn recorded_log(dir: &TempDir) -> (PathBuf, Proxy) {
    let trap = Recorder::start().await;
    let pdir = TempDir::new("suggest");
    let key = pdir.write("key", KEY);
    let config = format!(
        "[auth]\nanonymous = false\nkey_file = {:?}\n[resolver]\nhosts = {{ \"loop.test\" = [\"127.0.0.1\"] }}\n",
        key.display()
    );
    let enf = "version = 1\nname = \"enf\"\nlevel = \"custom\"\nallow = [\"listed.test\"]\ndeny = [\"blocked.example.com\"]\n";
    let rep = "version = 1\nname = \"rep\"\nlevel = \"custom\"\nmode = \"report\"\n";
    let proxy = Proxy::start_recorded(pdir, &config, &[("enf.toml", enf), ("rep.toml", rep)]).await;
    for (dest, sid) in ENFORCED {
        assert_eq!(connect(&proxy, dest, sid, "enf").await, "HTTP/1.1 403 Forbidden", "{dest}");
    }
    let looped = format!("loop.test:{}", trap.port());
    assert_eq!(connect(&proxy, &looped, "s-r", "rep").await, "HTTP/1.1 403 Forbidden");
    assert_eq!(trap.connections(), 0);
    let want = ENFORCED.len() + 1;
    let mut lines = proxy.records();
    for _ in 0..100 {
        if lines.len() >= want {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        lines = proxy.records();
    }
    assert_eq!(lines.len(), want, "{}", lines.join("\n"));
    let path = dir.write("decisions.jsonl", lines.join("\n") + "\n");
    (path, proxy)
}

fn sluice(args: &[&str], stdin: Option<&[u8]>) -> (Option<i32>, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run sluice");
    let mut input = child.stdin.take().expect("stdin");
    if let Some(bytes) = stdin {
        input.write_all(bytes).expect("write stdin");
    }
    drop(input);
    let out = child.wait_with_output().expect("sluice output");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn suggest_json(log: &Path, extra: &[&str]) -> Value {
    let mut args = vec!["suggest", "--log", log.to_str().unwrap(), "--json"];
    args.extend(extra);
    let (code, out, err) = sluice(&args, None);
    assert_eq!(code, Some(0), "{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

fn entries(v: &Value, key: &str) -> Vec<(String, Vec<String>, u64)> {
    v[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let dests = e["destinations"].as_array().unwrap().iter().map(|d| d.as_str().unwrap().to_string()).collect();
            (e["entry"].as_str().unwrap().to_string(), dests, e["count"].as_u64().unwrap())
        })
        .collect()
}

fn listed(v: &Value, key: &str) -> Vec<(String, String)> {
    v[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| (l["destination"].as_str().unwrap().into(), l["why"].as_str().unwrap().into()))
        .collect()
}

fn owned(items: &[(&str, &[&str], u64)]) -> Vec<(String, Vec<String>, u64)> {
    items.iter().map(|(e, d, n)| (e.to_string(), d.iter().map(|s| s.to_string()).collect(), *n)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suggest_reads_a_recorded_log() {
    let dir = TempDir::new("suggest-log");
    let (log, proxy) = recorded_log(&dir).await;
    let v = suggest_json(&log, &[]);
    // Sorted by count, then by entry text.
    let want = owned(&[
        ("*.example.org", &["a.svc.example.org:443", "b.svc.example.org:443", "c.example.org:443"], 3),
        ("api.example.com", &["api.example.com:443", "api.example.com:80"], 3),
        ("a.co.uk", &["a.co.uk:443"], 1),
        ("a.github.io", &["a.github.io:443"], 1),
        ("b.co.uk", &["b.co.uk:443"], 1),
        ("b.github.io", &["b.github.io:443"], 1),
        ("c.co.uk", &["c.co.uk:443"], 1),
        ("c.github.io", &["c.github.io:443"], 1),
        ("registry.example.net:8443", &["registry.example.net:8443"], 1),
    ]);
    assert_eq!(entries(&v, "allow"), want);
    let api = &v["allow"][1];
    assert_eq!(api["sessions"], serde_json::json!(["s-a", "s-b"]));
    assert!(api["first"].as_str().unwrap() <= api["last"].as_str().unwrap());
    assert_eq!(listed(&v, "defaults"), [("pypi.org:443".to_string(), "Python package managers".to_string())]);
    let deny_rule = format!("blocked.example.com ({}:5)", proxy.dir.path().join("policies/enf.toml").display());
    assert_eq!(listed(&v, "denylisted"), [("blocked.example.com:443".to_string(), deny_rule)]);
    let mut guard = listed(&v, "not_liftable");
    guard.sort();
    let looped = guard.iter().find(|(d, _)| d.starts_with("loop.test:")).cloned().expect("loop.test is listed");
    assert_eq!(looped.1, "blocked_address");
    assert!(guard.contains(&("169.254.169.254:80".into(), "blocked_address".into())), "{guard:?}");
    assert!(guard.contains(&("metadata.google.internal:80".into(), "blocked_name".into())), "{guard:?}");
    assert_eq!(guard.len(), 3);
    assert_eq!((v["records"].as_u64(), v["refused"].as_u64(), v["malformed"].as_u64()), (Some(18), Some(18), Some(0)));

    // The text form, pasted into a policy, lets `sluice check` allow every suggested destination,
    // and still refuses what was never suggested.
    let (code, snippet, err) = sluice(&["suggest", "--log", log.to_str().unwrap()], None);
    assert_eq!(code, Some(0), "{err}");
    assert!(snippet.contains("include_defaults = true"), "{snippet}");
    assert!(snippet.contains("    \"*.example.org\", # 3 destinations: "), "{snippet}");
    assert!(!snippet.contains("*.co.uk") && !snippet.contains("*.github.io"), "{snippet}");
    assert!(snippet.contains("# not suggested: no policy can lift these"), "{snippet}");
    let policy = dir.write("pasted.toml", format!("version = 1\nname = \"pasted\"\n{snippet}"));
    let policy = policy.to_str().unwrap();
    let (code, out, _) = sluice(&["validate", policy], None);
    assert_eq!(code, Some(0), "{out}\n{snippet}");
    let mut suggested: Vec<String> = want.iter().flat_map(|(_, d, _)| d.clone()).collect();
    suggested.push("pypi.org:443".into());
    for dest in &suggested {
        let (code, out, err) = sluice(&["check", "--policy", policy, dest], None);
        assert_eq!(code, Some(0), "{dest}: {out}{err}");
        assert!(out.starts_with(&format!("allow {dest} policy=pasted")), "{out}");
    }
    for dest in ["169.254.169.254:80", "metadata.google.internal:80", "x.co.uk:443", "registry.example.net:443"] {
        let (code, out, _) = sluice(&["check", "--policy", policy, dest], None);
        assert_eq!(code, Some(1), "{dest}: {out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suggest_filters_reads_stdin_and_gzip_and_locates_malformed_lines() {
    let dir = TempDir::new("suggest-filter");
    let (log, _proxy) = recorded_log(&dir).await;
    let v = suggest_json(&log, &["--session", "s-b"]);
    assert_eq!(
        entries(&v, "allow"),
        owned(&[("api.example.com", &["api.example.com:443"], 1), ("c.example.org", &["c.example.org:443"], 1)])
    );
    let v = suggest_json(&log, &["--session", "s-r"]);
    assert!(v["allow"].as_array().unwrap().is_empty(), "{v}");
    assert_eq!(listed(&v, "not_liftable").len(), 1);
    // --policy: only that policy's records, and its `ports` decide `:PORT`.
    let ports = dir.write("enf.toml", "version = 1\nname = \"enf\"\nlevel = \"custom\"\nports = [443, 8443]\n");
    let v = suggest_json(&log, &["--policy", ports.to_str().unwrap()]);
    let allow = entries(&v, "allow");
    assert!(allow.iter().any(|(e, _, _)| e == "registry.example.net"), "{allow:?}");
    assert!(allow.iter().any(|(e, _, _)| e == "api.example.com:80"), "{allow:?}");
    assert_eq!(v["ports"], serde_json::json!([443, 8443]));
    assert_eq!(listed(&v, "not_liftable").len(), 2, "rep's loop.test is not enf's");

    // Malformed lines are located (file:line), counted, and skipped; the rest is read.
    let text = std::fs::read_to_string(&log).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    lines.insert(1, "{\"event\":\"decision\",\"port\":\"x\"}");
    lines.insert(4, "not json at all");
    let bad = dir.write("bad.jsonl", lines.join("\n") + "\n");
    let (code, out, err) = sluice(&["suggest", "--log", bad.to_str().unwrap(), "--json"], None);
    assert_eq!(code, Some(0), "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["malformed"], 2);
    assert_eq!(entries(&v, "allow").len(), 9);
    let located: Vec<&str> = err.lines().collect();
    assert_eq!(located.len(), 2, "{err}");
    assert!(located[0].starts_with(&format!("{}:2: malformed record: invalid type", bad.display())), "{err}");
    assert!(located[1].starts_with(&format!("{}:5: malformed record: expected", bad.display())), "{err}");

    // Standard input and gzip give the same answer as the file.
    let plain = suggest_json(&log, &[]);
    let (code, out, err) = sluice(&["suggest", "--log", "-", "--json"], Some(text.as_bytes()));
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap(), plain);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(text.as_bytes()).unwrap();
    let gz = dir.write("decisions.jsonl.gz", gz.finish().unwrap());
    assert_eq!(suggest_json(&gz, &[]), plain);

    let (code, _, err) = sluice(&["suggest", "--log", "/nonexistent/log"], None);
    assert_eq!(code, Some(2));
    assert!(err.starts_with("sluice suggest: cannot read /nonexistent/log:"), "{err}");
}
