//! Operating sluice as a process: hot reload by file change and SIGHUP, graceful SIGTERM drain,
//! `/metrics` after a known sequence, and a decision log with one line per request and no secrets.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

#[path = "support/child.rs"]
mod child;
use child::{Sluice, wait_for};

/// A loopback HTTP server answering every request `200 ok`, one connection at a time.
fn http_upstream() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().map_while(Result::ok) {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let mut buf = [0u8; 4096];
            let mut head = Vec::new();
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
        }
    });
    port
}

/// A loopback echo server: each connection echoes until EOF, then closes.
fn echo_upstream() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                let mut s = stream;
                let mut buf = [0u8; 4096];
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
            });
        }
    });
    port
}

/// `curl -x` through the proxy; returns the HTTP status curl saw.
fn curl_status(proxy: SocketAddr, url: &str, creds: Option<&str>) -> String {
    let proxy_url = match creds {
        Some(c) => format!("http://{c}@{proxy}"),
        None => format!("http://{proxy}"),
    };
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10", "-x", &proxy_url, url])
        .env_remove("http_proxy")
        .env_remove("HTTPS_PROXY")
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap()
}

fn config(extra: &str) -> String {
    format!(
        r#"
[egress]
listen = "127.0.0.1:0"
policy = "app"
[admin]
listen = "127.0.0.1:0"
[git]
listen = "127.0.0.1:0"
[resolver]
system = false
hosts = {{ "a.test" = ["127.0.0.1"], "b.test" = ["127.0.0.1"], "c.test" = ["127.0.0.1"] }}
[server]
shutdown_grace = "5s"
{extra}
"#
    )
}

fn policy(allow: &[&str], port: u16) -> String {
    let allow: Vec<String> = allow.iter().map(|h| format!("\"{h}\"")).collect();
    format!(
        "version = 1\nname = \"app\"\nlevel = \"custom\"\nallow = [{}]\nports = [{port}]\nallow_ips = [\"127.0.0.0/8\"]\n",
        allow.join(", ")
    )
}

/// A temp directory with `policies/app.toml` allowing `a.test` on `port`; returns it and the policies dir.
fn workspace(port: u16) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    std::fs::write(policies.join("app.toml"), policy(&["a.test"], port)).unwrap();
    (dir, policies)
}

/// Polls (bounded) until curl sees `want`; returns how long it took.
fn until_status(proxy: SocketAddr, url: &str, want: &str, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let got = curl_status(proxy, url, None);
        if got == want {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "{url}: still {got} after {limit:?}, wanted {want}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn edited_policy_file_takes_effect_and_a_broken_one_is_refused() {
    let up = http_upstream();
    let (dir, policies) = workspace(up);
    let sluice = Sluice::start(dir.path(), &config(""));
    let b = format!("http://b.test:{up}/");
    assert_eq!(curl_status(sluice.egress, &format!("http://a.test:{up}/"), None), "200");
    assert_eq!(curl_status(sluice.egress, &b, None), "403");

    std::fs::write(policies.join("app.toml"), policy(&["a.test", "b.test"], up)).unwrap();
    // The bound is until_status's own: 2 s after the write.
    until_status(sluice.egress, &b, "200", Duration::from_secs(2));
    let reloaded: serde_json::Value =
        serde_json::from_str(&wait_for(&sluice.log, "policies reloaded", Duration::from_secs(5))).unwrap();
    assert_eq!(
        (reloaded["generation"].as_u64(), reloaded["policies"].as_str()),
        (Some(2), Some("app,full,none,trusted")),
        "{reloaded}"
    );
    assert_eq!(curl_status(sluice.egress, &format!("http://a.test:{up}/"), None), "200", "a.test is still allowed");

    std::fs::write(policies.join("broken.toml"), "version = 1\nlevel = \"cusstom\"\n").unwrap();
    let line = wait_for(&sluice.log, "policy reload refused", Duration::from_secs(5));
    assert!(line.contains("broken.toml:2:9: error: unknown level \\\"cusstom\\\""), "{line}");
    assert_eq!(curl_status(sluice.egress, &b, None), "200", "the last good policy still decides");
}

#[test]
fn sighup_reloads_when_watching_is_off() {
    let up = http_upstream();
    let (dir, policies) = workspace(up);
    let sluice = Sluice::start(dir.path(), &config("[policies]\nwatch = false\n"));
    let b = format!("http://b.test:{up}/");
    std::fs::write(policies.join("app.toml"), policy(&["a.test", "b.test"], up)).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(curl_status(sluice.egress, &b, None), "403", "no reload without a signal");
    sluice.signal("HUP");
    until_status(sluice.egress, &b, "200", Duration::from_secs(2));
    assert!(sluice.log_text().contains("\"generation\":2"));
}

/// A CONNECT tunnel to `a.test:{echo}` through `egress`, its `200` read; reads time out after `timeout`.
fn open_tunnel(egress: SocketAddr, echo: u16, timeout: Duration) -> TcpStream {
    let mut tunnel = TcpStream::connect(egress).unwrap();
    tunnel.set_read_timeout(Some(timeout)).unwrap();
    write!(tunnel, "CONNECT a.test:{echo} HTTP/1.1\r\nHost: a.test:{echo}\r\n\r\n").unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tunnel.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
        assert!(head.len() < 4096, "unterminated response head");
    }
    assert!(head.starts_with(b"HTTP/1.1 200 OK\r\n"), "{}", String::from_utf8_lossy(&head));
    tunnel
}

#[test]
fn sigterm_lets_an_open_tunnel_finish_and_exits_zero() {
    let echo = echo_upstream();
    let (dir, _) = workspace(echo);
    let mut sluice = Sluice::start(dir.path(), &config(""));

    let mut tunnel = open_tunnel(sluice.egress, echo, Duration::from_secs(5));
    tunnel.write_all(b"before").unwrap();
    let mut buf = [0u8; 6];
    tunnel.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"before");

    sluice.signal("TERM");
    wait_for(&sluice.log, "shutting down", Duration::from_secs(5));
    // New connections are refused once draining starts.
    let start = Instant::now();
    while TcpStream::connect(sluice.egress).is_ok() {
        assert!(start.elapsed() < Duration::from_secs(3), "still accepting after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The open tunnel still carries data, then ends by itself.
    tunnel.write_all(b"after!").unwrap();
    tunnel.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"after!");
    tunnel.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(tunnel.read(&mut buf).unwrap(), 0);

    let start = Instant::now();
    let status = loop {
        if let Some(s) = sluice.child.try_wait().unwrap() {
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "did not exit within the grace period");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
    let log = sluice.log_text();
    assert!(log.contains("\"event\":\"tunnel_closed\""), "{log}");
    assert!(log.contains("\"end\":\"closed\""), "{log}");
}

/// Every non-comment line of Prometheus text: `name{labels} value`.
fn parse_metrics(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (key, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("bad metrics line {l:?}"));
            let name_end = key.find('{').unwrap_or(key.len());
            assert!(key[..name_end].bytes().all(|b| b.is_ascii_lowercase() || b == b'_'), "bad name in {l:?}");
            if name_end < key.len() {
                assert!(key.ends_with('}'), "bad labels in {l:?}");
            }
            (key.to_string(), value.parse::<f64>().unwrap_or_else(|_| panic!("bad value in {l:?}")))
        })
        .collect()
}

fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()
}

#[test]
fn metrics_count_what_was_sent_and_denials_are_listed() {
    let up = http_upstream();
    let (dir, _) = workspace(up);
    let sluice = Sluice::start(dir.path(), &config(""));
    for _ in 0..3 {
        assert_eq!(curl_status(sluice.egress, &format!("http://a.test:{up}/"), None), "200");
    }
    for _ in 0..2 {
        assert_eq!(curl_status(sluice.egress, &format!("http://c.test:{up}/"), None), "403");
    }
    assert_eq!(curl_status(sluice.egress, &format!("http://a.test:{}/", up.wrapping_add(1).max(1)), None), "403");

    let metrics = parse_metrics(&http_get(sluice.admin, "/metrics"));
    let get = |k: &str| metrics.iter().find(|(key, _)| key == k).map(|(_, v)| *v);
    assert_eq!(get("sluice_decisions_total{verdict=\"allow\",reason=\"allowlisted\",level=\"custom\"}"), Some(3.0));
    assert_eq!(get("sluice_decisions_total{verdict=\"deny\",reason=\"not_allowlisted\",level=\"custom\"}"), Some(2.0));
    assert_eq!(get("sluice_decisions_total{verdict=\"deny\",reason=\"port_not_allowed\",level=\"custom\"}"), Some(1.0));
    assert_eq!(get("sluice_policy_generation"), Some(1.0));
    assert_eq!(get("sluice_upstream_connect_seconds_count"), Some(3.0));

    let denials: serde_json::Value =
        serde_json::from_str(&http_get(sluice.admin, "/v1/denials?session=anonymous")).unwrap();
    let reasons: Vec<&str> =
        denials["denials"].as_array().unwrap().iter().map(|d| d["reason"].as_str().unwrap()).collect();
    assert_eq!(reasons, ["port_not_allowed", "not_allowlisted", "not_allowlisted"]);
    assert_eq!(http_get(sluice.admin, "/healthz"), "ok\n");
}

#[test]
fn decision_log_has_one_line_per_request_and_no_secret() {
    let up = http_upstream();
    let (dir, _) = workspace(up);
    let key = "canary-signing-key-0123456789abcdef-0123456789";
    std::fs::write(dir.path().join("key"), key).unwrap();
    let sluice = Sluice::start(dir.path(), &config("[auth]\nkey_file = \"key\"\nanonymous = false\n"));
    let mint = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["token", "mint", "--kind", "egress", "--session", "sess-1", "--policy", "app", "--key-file"])
        .arg(dir.path().join("key"))
        .output()
        .unwrap();
    let token = String::from_utf8(mint.stdout).unwrap().trim().to_string();
    assert!(token.starts_with("v1."), "{token}");
    let creds = format!("sess-1:{token}");
    assert_eq!(curl_status(sluice.egress, &format!("http://a.test:{up}/"), Some(&creds)), "200");
    assert_eq!(curl_status(sluice.egress, &format!("http://a.test:{up}/x"), Some(&creds)), "200");
    assert_eq!(curl_status(sluice.egress, &format!("http://c.test:{up}/"), Some(&creds)), "403");
    assert_eq!(curl_status(sluice.egress, &format!("http://a.test:{up}/"), Some(&format!("sess-2:{token}"))), "407");
    assert_eq!(curl_status(sluice.egress, &format!("http://a.test:{up}/"), None), "407");
    sluice.signal("TERM");
    wait_for(&sluice.log, "\"stopped\"", Duration::from_secs(10));

    let log = sluice.log_text();
    let decisions: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == "decision")
        .collect();
    let verdicts: Vec<(&str, &str)> =
        decisions.iter().map(|v| (v["verdict"].as_str().unwrap(), v["reason"].as_str().unwrap())).collect();
    assert_eq!(
        verdicts,
        [
            ("allow", "allowlisted"),
            ("allow", "allowlisted"),
            ("deny", "not_allowlisted"),
            ("deny", "auth_session_mismatch"),
            ("deny", "auth_missing")
        ]
    );
    assert_eq!(decisions[0]["session"], "sess-1");
    let finished: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == "request_finished")
        .collect();
    assert_eq!(finished.len(), 2, "one closing line per allowed request:\n{log}");
    for f in &finished {
        assert_eq!(
            (f["bytes_down"].as_u64(), f["end"].as_str(), f["status"].as_u64()),
            (Some(2), Some("complete"), Some(200))
        );
    }
    assert_eq!(decisions[0]["policy"], "app");
    assert!(!log.contains(&token), "the token leaked into the log");
    assert!(!log.contains(&token[3..40]), "part of the token leaked into the log");
    assert!(!log.contains(key), "the signing key leaked into the log");
}

#[test]
fn a_tunnel_still_open_after_the_grace_is_closed_and_its_line_says_shutdown() {
    let echo = echo_upstream();
    let (dir, _) = workspace(echo);
    let config = config("").replace("shutdown_grace = \"5s\"", "shutdown_grace = \"1s\"");
    let mut sluice = Sluice::start(dir.path(), &config);

    let mut tunnel = open_tunnel(sluice.egress, echo, Duration::from_secs(8));
    tunnel.write_all(b"hello!").unwrap();
    let mut buf = [0u8; 6];
    tunnel.read_exact(&mut buf).unwrap();

    // The client keeps the tunnel open and quiet: the hard stop after the grace closes it.
    sluice.signal("TERM");
    let start = Instant::now();
    let n = tunnel.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "the tunnel carried bytes after the hard stop");
    assert!(start.elapsed() < Duration::from_secs(6), "the tunnel outlived the grace by {:?}", start.elapsed());
    let start = Instant::now();
    while sluice.child.try_wait().unwrap().is_none() {
        assert!(start.elapsed() < Duration::from_secs(5), "did not exit after the hard stop");
        std::thread::sleep(Duration::from_millis(20));
    }
    // It ended in its own words, not dropped: the closing line is written and names the stop.
    let line = wait_for(&sluice.log, "\"end\":\"shutdown\"", Duration::from_secs(2));
    assert!(line.contains("\"event\":\"tunnel_closed\"") && line.contains("\"bytes_up\":6"), "{line}");
}
