//! The audit records (JSON, one line each) both listeners write: for every request exactly the lines
//! it writes today, with every field's value. Times and durations are checked for their shape; every
//! other field, addresses included, is compared exactly.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Value, json};
use support::lab::{self, Lab, custom};
use support::*;
use tokio::io::AsyncWriteExt;

const KEY: &[u8] = b"records-test-signing-key-0123456789abcdef";
/// Stands in for a well-shaped `time` in an expected record.
const TIME: &str = "<time>";
/// Stands in for a `duration_ms` that is a whole number of milliseconds.
const MS: &str = "<ms>";

fn auth(sid: &str, policy: &str) -> String {
    lab::auth(KEY, sid, policy)
}

/// `2026-11-25T12:00:00.123Z`.
fn is_rfc3339_millis(v: &str) -> bool {
    let b = v.as_bytes();
    let digits = |r: std::ops::Range<usize>| r.into_iter().all(|i| b[i].is_ascii_digit());
    b.len() == 24
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && b[19] == b'.'
        && digits(20..23)
        && b[23] == b'Z'
}

/// A record as compared: `null` fields dropped (the line format is pinned once, in
/// `record_lines_keep_their_fields_and_order`), `time` and `duration_ms` replaced by their markers once
/// their shape is checked.
fn normalise(line: &str) -> Value {
    let mut v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    let map = v.as_object_mut().unwrap_or_else(|| panic!("not an object: {line}"));
    map.retain(|_, v| !v.is_null());
    let time = map.get("time").and_then(Value::as_str).unwrap_or_default();
    assert!(is_rfc3339_millis(time), "bad time in {line}");
    map.insert("time".into(), json!(TIME));
    if let Some(ms) = map.get("duration_ms") {
        assert!(ms.as_u64().is_some_and(|ms| ms < 60_000), "bad duration_ms in {line}");
        map.insert("duration_ms".into(), json!(MS));
    }
    v
}

/// Waits (bounded) until the proxy has written `want.len()` records, then compares them all, in order.
async fn expect_records(proxy: &Proxy, want: &[Value]) {
    let mut lines = proxy.records();
    for _ in 0..100 {
        if lines.len() >= want.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        lines = proxy.records();
    }
    let got: Vec<Value> = lines.iter().map(|l| normalise(l)).collect();
    assert_eq!(got.len(), want.len(), "records:\n{}", lines.join("\n"));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g, w, "record {i} of:\n{}", lines.join("\n"));
    }
}

/// No record beyond those already compared arrives late.
async fn no_more_records(proxy: &Proxy, count: usize) {
    tokio::time::sleep(Duration::from_millis(200)).await;
    let lines = proxy.records();
    assert_eq!(lines.len(), count, "records:\n{}", lines.join("\n"));
}

impl Lab {
    fn e(&self) -> u16 {
        self.echo.port()
    }

    fn p(&self) -> u16 {
        self.plain.port()
    }

    /// The rule that allows `host:port` in policy file `name`.
    fn rule(&self, host: &str, port: u16, name: &str) -> String {
        format!("{host}:{port} ({}:4)", self.proxy.dir.path().join("policies").join(format!("{name}.toml")).display())
    }

    fn connect_echo(&self, authorization: &str) -> String {
        let e = self.e();
        format!("CONNECT echo.test:{e} HTTP/1.1\r\nHost: echo.test:{e}\r\nProxy-Authorization: {authorization}\r\n\r\n")
    }

    async fn connect(&self) -> (RawClient, String) {
        let c = RawClient::connect(self.proxy.addr).await;
        let client = local(&c);
        (c, client)
    }

    /// The decision record of an allowed request.
    fn allowed(&self, session: &str, kind: &str, host: &str, port: u16, policy: &str, client: &str) -> Value {
        json!({
            "time": TIME, "event": "decision", "session": session, "kind": kind,
            "method": if kind == "connect" { "CONNECT" } else { "GET" },
            "host": host, "port": port, "verdict": "allow", "reason": "allowlisted",
            "rule": self.rule(host, port, policy), "policy": policy, "level": "custom",
            "client": client, "upstream": format!("127.0.0.1:{port}"),
        })
    }

    fn finished(&self, session: &str, bytes_up: u64, bytes_down: u64) -> Value {
        json!({
            "time": TIME, "event": "request_finished", "session": session, "kind": "http",
            "host": "plain.test", "port": self.p(), "upstream": format!("127.0.0.1:{}", self.p()),
            "status": 200, "bytes_up": bytes_up, "bytes_down": bytes_down, "duration_ms": MS, "end": "complete",
        })
    }

    fn tunnel_closed(&self, session: &str, bytes_up: u64, bytes_down: u64, end: &str) -> Value {
        json!({
            "time": TIME, "event": "tunnel_closed", "session": session, "kind": "connect",
            "host": "echo.test", "port": self.e(), "upstream": format!("127.0.0.1:{}", self.e()),
            "bytes_up": bytes_up, "bytes_down": bytes_down, "duration_ms": MS, "end": end,
        })
    }
}

fn local(c: &RawClient) -> String {
    c.stream.local_addr().expect("local address").to_string()
}

async fn status(c: &mut RawClient, request: &str) -> String {
    c.send(request.as_bytes()).await;
    let bytes = c.response_bytes().await.expect("an answer");
    let head = String::from_utf8_lossy(&bytes);
    head.split("\r\n").next().unwrap_or_default().to_string()
}

/// A tunnel that carries `hello` both ways and is closed by the client: its echo, half-close, EOF.
async fn hello_through(c: &mut RawClient) {
    c.send(b"hello").await;
    assert_eq!(c.read_exact(5).await, b"hello");
    c.stream.shutdown().await.expect("shutdown write");
    assert!(c.expect_eof().await);
}

/// An allowed CONNECT writes its decision when the upstream is connected, and a `tunnel_closed` line
/// with the bytes each way when it ends; on both CONNECT paths.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_allow_and_tunnel_closed() {
    let lab = Lab::start("records", KEY, "", true).await;
    let a = auth("s-tunnel", "lab");

    // A connection's first request: the direct path.
    let (mut c, client) = lab.connect().await;
    assert_eq!(status(&mut c, &lab.connect_echo(&a)).await, "HTTP/1.1 200 OK");
    hello_through(&mut c).await;
    let mut want = vec![
        lab.allowed("s-tunnel", "connect", "echo.test", lab.e(), "lab", &client),
        lab.tunnel_closed("s-tunnel", 5, 5, "closed"),
    ];
    expect_records(&lab.proxy, &want).await;

    // After a plain-HTTP request on the same connection: through hyper.
    let (mut c, client) = lab.connect().await;
    assert_eq!(status(&mut c, &lab.get(&a)).await, "HTTP/1.1 200 OK");
    assert_eq!(status(&mut c, &lab.connect_echo(&a)).await, "HTTP/1.1 200 OK");
    hello_through(&mut c).await;
    want.extend([
        lab.allowed("s-tunnel", "http", "plain.test", lab.p(), "lab", &client),
        lab.finished("s-tunnel", 0, "hello from plain /x\n".len() as u64),
        lab.allowed("s-tunnel", "connect", "echo.test", lab.e(), "lab", &client),
        lab.tunnel_closed("s-tunnel", 5, 5, "closed"),
    ]);
    expect_records(&lab.proxy, &want).await;
    no_more_records(&lab.proxy, want.len()).await;
}

/// An allowed plain-HTTP request writes its decision, then a `request_finished` line with the status
/// and the body bytes each way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_allow_and_request_finished() {
    let lab = Lab::start("records", KEY, "", true).await;
    let a = auth("s-plain", "lab");
    let p = lab.p();
    let (mut c, client) = lab.connect().await;
    assert_eq!(status(&mut c, &lab.get(&a)).await, "HTTP/1.1 200 OK");
    let post = format!(
        "POST http://plain.test:{p}/sha256 HTTP/1.1\r\nHost: plain.test:{p}\r\nProxy-Authorization: {a}\r\nContent-Length: 5\r\n\r\nhello"
    );
    assert_eq!(status(&mut c, &post).await, "HTTP/1.1 200 OK");
    let digest = format!("sha256={} bytes=5\n", hex(&sha256(b"hello")));
    let mut post_decision = lab.allowed("s-plain", "http", "plain.test", p, "lab", &client);
    post_decision["method"] = json!("POST");
    let want = [
        lab.allowed("s-plain", "http", "plain.test", p, "lab", &client),
        lab.finished("s-plain", 0, "hello from plain /x\n".len() as u64),
        post_decision,
        lab.finished("s-plain", 5, digest.len() as u64),
    ];
    expect_records(&lab.proxy, &want).await;
    no_more_records(&lab.proxy, want.len()).await;
}

fn sha256(bytes: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).to_vec()
}

/// A refusal's decision record: `deny`, the code, the message as `detail`, the status.
#[allow(clippy::too_many_arguments)]
fn refused(
    session: &str,
    method: &str,
    target: &str,
    reason: &str,
    detail: &str,
    policy: Option<&str>,
    client: &str,
    status: u16,
) -> Value {
    let mut v = json!({
        "time": TIME, "event": "decision", "session": session,
        "kind": if method == "CONNECT" { "connect" } else { "http" },
        "method": method, "target": target, "verdict": "deny", "reason": reason, "detail": detail,
        "client": client, "status": status,
    });
    if let Some(p) = policy {
        v["policy"] = json!(p);
        v["level"] = json!("custom");
    }
    v
}

/// A policy deny names the destination (host, port), the policy and level, on a direct CONNECT, a
/// CONNECT through hyper and a plain request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_deny_records() {
    let lab = Lab::start("records", KEY, "", true).await;
    let a = auth("s-deny", "lab");
    let connect =
        format!("CONNECT example.org:443 HTTP/1.1\r\nHost: example.org:443\r\nProxy-Authorization: {a}\r\n\r\n");
    let get = format!("GET http://example.org/ HTTP/1.1\r\nHost: example.org\r\nProxy-Authorization: {a}\r\n\r\n");
    let deny = |method: &str, target: &str, port: u16, client: &str| {
        let mut v = refused(
            "s-deny",
            method,
            target,
            "not_allowlisted",
            &format!("example.org:{port} is not allowed: not in the allowlist"),
            Some("lab"),
            client,
            403,
        );
        v["host"] = json!("example.org");
        v["port"] = json!(port);
        v
    };

    let (mut direct, direct_client) = lab.connect().await;
    assert_eq!(status(&mut direct, &connect).await, "HTTP/1.1 403 Forbidden");
    let (mut hyper, hyper_client) = lab.connect().await;
    assert_eq!(status(&mut hyper, &get).await, "HTTP/1.1 403 Forbidden");
    assert_eq!(status(&mut hyper, &connect).await, "HTTP/1.1 403 Forbidden");
    let want = [
        deny("CONNECT", "example.org:443", 443, &direct_client),
        deny("GET", "http://example.org/", 80, &hyper_client),
        deny("CONNECT", "example.org:443", 443, &hyper_client),
    ];
    expect_records(&lab.proxy, &want).await;
    no_more_records(&lab.proxy, want.len()).await;
}

/// A missing or forged credential: `anonymous`, no policy, no host or port (only the target), 407.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credential_refusal_records() {
    let lab = Lab::start("records", KEY, "", true).await;
    let e = lab.e();
    let p = lab.p();
    let forged = basic("s-forged", "v1.eyJzaWQiOiJ4In0.AAAA");
    let missing = "proxy authentication failed: this proxy requires credentials";
    let bad = "proxy authentication failed: credential signature does not verify (forged, altered, or signed with another key)";
    let echo = format!("echo.test:{e}");
    let plain = format!("http://plain.test:{p}/x");

    let (mut c, client) = lab.connect().await;
    let s407 = "HTTP/1.1 407 Proxy Authentication Required";
    // The direct path keeps the connection after a 407.
    assert_eq!(status(&mut c, &format!("CONNECT {echo} HTTP/1.1\r\n\r\n")).await, s407);
    assert_eq!(status(&mut c, &lab.connect_echo(&forged)).await, s407);
    assert_eq!(status(&mut c, &format!("GET {plain} HTTP/1.1\r\nHost: plain.test:{p}\r\n\r\n")).await, s407);
    assert_eq!(status(&mut c, &lab.get(&forged)).await, s407);
    let want = [
        refused("anonymous", "CONNECT", &echo, "auth_missing", missing, None, &client, 407),
        refused("anonymous", "CONNECT", &echo, "auth_bad_signature", bad, None, &client, 407),
        refused("anonymous", "GET", &plain, "auth_missing", missing, None, &client, 407),
        refused("anonymous", "GET", &plain, "auth_bad_signature", bad, None, &client, 407),
    ];
    expect_records(&lab.proxy, &want).await;
    no_more_records(&lab.proxy, want.len()).await;
    assert_eq!((lab.echo.connections(), lab.plain.connections()), (0, 0));
}

/// Over the request rate (CONNECT and plain) and over max_tunnels: the session, its policy, 429, and —
/// unlike a policy deny — no host or port, only the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_records() {
    let lab = Lab::start("records", KEY, "", true).await;
    let e = lab.e();
    let echo = format!("echo.test:{e}");
    let plain = format!("http://plain.test:{}/x", lab.p());
    let rate = "session over its rate limit (0.5 requests per second, burst 1); retry in 2s";

    let a = auth("s-rate", "slow");
    let (mut c, client) = lab.connect().await;
    assert_eq!(status(&mut c, &lab.get(&a)).await, "HTTP/1.1 200 OK");
    assert_eq!(status(&mut c, &lab.get(&a)).await, "HTTP/1.1 429 Too Many Requests");
    let (mut d, direct_client) = lab.connect().await;
    assert_eq!(status(&mut d, &lab.connect_echo(&a)).await, "HTTP/1.1 429 Too Many Requests");
    let mut want = vec![
        lab.allowed("s-rate", "http", "plain.test", lab.p(), "slow", &client),
        lab.finished("s-rate", 0, "hello from plain /x\n".len() as u64),
        refused("s-rate", "GET", &plain, "rate_limited", rate, Some("slow"), &client, 429),
        refused("s-rate", "CONNECT", &echo, "rate_limited", rate, Some("slow"), &direct_client, 429),
    ];
    expect_records(&lab.proxy, &want).await;

    let a = auth("s-tunnels", "one");
    let (mut open, open_client) = lab.connect().await;
    assert_eq!(status(&mut open, &lab.connect_echo(&a)).await, "HTTP/1.1 200 OK");
    let (mut c, client) = lab.connect().await;
    assert_eq!(status(&mut c, &lab.connect_echo(&a)).await, "HTTP/1.1 429 Too Many Requests");
    hello_through(&mut open).await;
    want.extend([
        lab.allowed("s-tunnels", "connect", "echo.test", e, "one", &open_client),
        refused(
            "s-tunnels",
            "CONNECT",
            &echo,
            "too_many_tunnels",
            "session already has 1 open tunnel, the most it may have at once",
            Some("one"),
            &client,
            429,
        ),
        lab.tunnel_closed("s-tunnels", 5, 5, "closed"),
    ]);
    expect_records(&lab.proxy, &want).await;
    no_more_records(&lab.proxy, want.len()).await;
    assert_eq!(lab.echo.connections(), 1, "only the allowed tunnel reached the upstream");
}

/// An upstream that resets mid-tunnel: the tunnel_closed line says `upstream_error`, with the bytes that
/// made it each way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_reset_tunnel_record() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let Ok((mut s, _)) = listener.accept().await else { return };
        let mut buf = [0u8; 5];
        let _ = s.read_exact(&mut buf).await;
        let _ = s.write_all(b"bye").await;
        // SO_LINGER 0 turns the close into a reset.
        let _ = s.set_zero_linger();
    });
    let dir = TempDir::new("records-reset");
    let config = "[egress]\npolicy = \"lab\"\n[resolver]\nhosts = { \"reset.test\" = [\"127.0.0.1\"] }\n";
    let lab = custom("lab", &[format!("reset.test:{port}")], "");
    let proxy = Proxy::start_recorded(dir, config, &[("lab.toml", &lab)]).await;
    let mut c = RawClient::connect(proxy.addr).await;
    let client = local(&c);
    let connect = format!("CONNECT reset.test:{port} HTTP/1.1\r\nHost: reset.test:{port}\r\n\r\n");
    assert_eq!(status(&mut c, &connect).await, "HTTP/1.1 200 OK");
    c.send(b"hello").await;
    assert_eq!(c.read_exact(3).await, b"bye");
    assert!(c.expect_eof().await);
    let rule = format!("reset.test:{port} ({}:4)", proxy.dir.path().join("policies/lab.toml").display());
    let upstream = format!("127.0.0.1:{port}");
    let want = [
        json!({
            "time": TIME, "event": "decision", "session": "anonymous", "kind": "connect", "method": "CONNECT",
            "host": "reset.test", "port": port, "verdict": "allow", "reason": "allowlisted", "rule": rule,
            "policy": "lab", "level": "custom", "client": client, "upstream": upstream,
        }),
        json!({
            "time": TIME, "event": "tunnel_closed", "session": "anonymous", "kind": "connect",
            "host": "reset.test", "port": port, "upstream": upstream,
            "bytes_up": 5, "bytes_down": 3, "duration_ms": MS, "end": "upstream_error",
        }),
    ];
    expect_records(&proxy, &want).await;
    no_more_records(&proxy, want.len()).await;
}

/// A destination the policy allows but DNS does not know (system DNS is off): 502, recorded as a deny
/// with the DNS code, no host or port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_failure_record() {
    let lab = Lab::start("records", KEY, "", true).await;
    let a = auth("s-dns", "lab");
    let (mut c, client) = lab.connect().await;
    let connect =
        format!("CONNECT nowhere.test:443 HTTP/1.1\r\nHost: nowhere.test:443\r\nProxy-Authorization: {a}\r\n\r\n");
    assert_eq!(status(&mut c, &connect).await, "HTTP/1.1 502 Bad Gateway");
    let detail = "DNS has no address for nowhere.test";
    let want = [refused("s-dns", "CONNECT", "nowhere.test:443", "dns_no_such_host", detail, Some("lab"), &client, 502)];
    expect_records(&lab.proxy, &want).await;
    no_more_records(&lab.proxy, want.len()).await;
}

/// A connection over `max_connections` is answered 503 and writes no record, on either listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_writes_no_record() {
    let proxy = Proxy::start_recorded(
        TempDir::new("records-overload"),
        // One accept thread: with several, each has an accept queue of its own, and the second connection
        // can be accepted before the first takes the slot.
        "[egress]\nmax_connections = 1\n[git]\nmax_connections = 1\n[server]\nthreads = 1\n",
        &[],
    )
    .await;
    for addr in [proxy.addr, proxy.git] {
        let _held = RawClient::connect(addr).await;
        let mut c = RawClient::connect(addr).await;
        let bytes = c.response_bytes().await.expect("a 503");
        assert!(bytes.starts_with(b"HTTP/1.1 503 Service Unavailable\r\n"), "{}", String::from_utf8_lossy(&bytes));
    }
    no_more_records(&proxy, 0).await;
}

/// What the head guard refuses is recorded before any session is known: today as `GET` of target `-`,
/// whatever the request was (here a CONNECT).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_guard_refusal_record() {
    let lab = Lab::start("records", KEY, "", true).await;
    let (mut c, client) = lab.connect().await;
    let head = format!("CONNECT echo.test:{} HTTP/1.1\r\nBad Header\r\n\r\n", lab.e());
    assert_eq!(status(&mut c, &head).await, "HTTP/1.1 400 Bad Request");
    // A refused head's method cannot be trusted: the record says "-".
    let want = [refused(
        "anonymous",
        "-",
        "-",
        "bad_request",
        "malformed request head: invalid header name",
        None,
        &client,
        400,
    )];
    expect_records(&lab.proxy, &want).await;
    no_more_records(&lab.proxy, want.len()).await;
}

/// The line itself: every field of `audit::Event` in its order, `null` where a record has no value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_lines_keep_their_fields_and_order() {
    let lab = Lab::start("records", KEY, "", true).await;
    let (mut c, client) = lab.connect().await;
    assert_eq!(status(&mut c, &lab.connect_echo(&auth("s-line", "lab"))).await, "HTTP/1.1 200 OK");
    expect_records(&lab.proxy, &[lab.allowed("s-line", "connect", "echo.test", lab.e(), "lab", &client)]).await;
    let line = lab.proxy.records().remove(0);
    let time = &line[9..33];
    assert!(line.starts_with("{\"time\":\"") && is_rfc3339_millis(time), "{line}");
    let rule = serde_json::to_string(&lab.rule("echo.test", lab.e(), "lab")).expect("a JSON string");
    let e = lab.e();
    let want = format!(
        "{{\"time\":\"{time}\",\"event\":\"decision\",\"session\":\"s-line\",\"kind\":\"connect\",\"method\":\"CONNECT\",\"target\":null,\"host\":\"echo.test\",\"port\":{e},\"verdict\":\"allow\",\"reason\":\"allowlisted\",\"detail\":null,\"rule\":{rule},\"policy\":\"lab\",\"level\":\"custom\",\"client\":\"{client}\",\"upstream\":\"127.0.0.1:{e}\",\"status\":null,\"repo\":null,\"service\":null,\"refs\":null,\"bytes_up\":null,\"bytes_down\":null,\"duration_ms\":null,\"end\":null}}"
    );
    assert_eq!(line, want);
}

// ---------------------------------------------------------------------------------------------
// The git listener: one `git` record per request, written when its answer is finished; `reason` is the
// refusal's code and `detail` its sentence.

const REPO: &str = "acme/widgets";
const Z40: &str = "0000000000000000000000000000000000000000";
const A40: &str = "1111111111111111111111111111111111111111";

fn git_auth(sid: &str, repo: &str) -> String {
    lab::git_auth(KEY, sid, repo, "feature")
}

#[allow(clippy::too_many_arguments)]
fn git_record(
    session: &str,
    method: &str,
    repo: &str,
    service: &str,
    verdict: &str,
    (reason, detail): (&str, Option<&str>),
    status: u16,
    client: &str,
    refs: u64,
    bytes_down: u64,
) -> Value {
    let mut record = json!({
        "time": TIME, "event": "git", "session": session, "kind": "git", "method": method,
        "verdict": verdict, "reason": reason, "client": client, "status": status, "repo": repo,
        "service": service, "refs": refs, "bytes_up": 0, "bytes_down": bytes_down, "duration_ms": MS,
    });
    if let Some(detail) = detail {
        record["detail"] = json!(detail);
    }
    record
}

/// Sends `request` on a fresh git-listener connection; returns the client address and the answer's
/// status line and body length.
async fn git_exchange(git: SocketAddr, request: &[u8]) -> (String, String, u64) {
    let mut c = RawClient::connect(git).await;
    let client = local(&c);
    c.send(request).await;
    let bytes = c.response_bytes().await.expect("an answer");
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("a head");
    (client, head.split("\r\n").next().unwrap_or_default().to_string(), body.len() as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn git_records() {
    let upstream = Upstream::plain("github").await;
    let dir = TempDir::new("records-git");
    let key = dir.write("key", KEY);
    let token = dir.write("gh-token", "ghs_records_real_token");
    let config = format!(
        "[auth]\nkey_file = {:?}\n[git]\nupstream = \"http://{}\"\napi_upstream = \"http://{}\"\ntoken_file = {:?}\n\
         [git.limits]\nrequests_per_second = 0.01\nburst = 2\n",
        key.display(),
        upstream.addr,
        upstream.addr,
        token.display()
    );
    let proxy = Proxy::start_recorded(dir, &config, &[]).await;
    let good = format!("Authorization: {}\r\n", git_auth("s-git", REPO));
    let discovery = |repo: &str, extra: &str| {
        format!("GET /{repo}.git/info/refs?service=git-upload-pack HTTP/1.1\r\nHost: git\r\n{extra}\r\n").into_bytes()
    };
    let mut want = Vec::new();

    // Allowed: forwarded with the real token, the upstream's answer streamed back.
    let (client, status, len) = git_exchange(proxy.git, &discovery(REPO, &good)).await;
    assert_eq!(
        (status.as_str(), len),
        ("HTTP/1.1 200 OK", "hello from github /acme/widgets.git/info/refs\n".len() as u64)
    );
    want.push(git_record("s-git", "GET", REPO, "git-upload-pack", "allow", ("forwarded", None), 200, &client, 0, len));
    expect_records(&proxy, &want).await;

    // No credential: 401, the session unknown.
    let (client, status, len) = git_exchange(proxy.git, &discovery(REPO, "")).await;
    assert_eq!(status, "HTTP/1.1 401 Unauthorized");
    let detail = "credentials required: use http://SESSION:CREDENTIAL@HOST/OWNER/REPO.git as the remote URL or a credential helper";
    let reason = ("auth_missing", Some(detail));
    want.push(git_record("-", "GET", REPO, "git-upload-pack", "deny", reason, 401, &client, 0, len));
    expect_records(&proxy, &want).await;

    // A credential for another repository: 403.
    let (client, status, len) = git_exchange(proxy.git, &discovery("acme/other", &good)).await;
    assert_eq!(status, "HTTP/1.1 403 Forbidden");
    let detail = "git credential refused: it is for acme/widgets, not acme/other; ask for a credential for acme/other";
    let reason = ("wrong_repository", Some(detail));
    want.push(git_record("s-git", "GET", "acme/other", "git-upload-pack", "deny", reason, 403, &client, 0, len));
    expect_records(&proxy, &want).await;

    // A push to another branch: refused by sluice itself (HTTP 200, report-status).
    let line = format!("{Z40} {A40} refs/heads/main\0report-status side-band-64k\n");
    let mut body = format!("{:04x}{line}0000", line.len() + 4).into_bytes();
    body.extend_from_slice(b"PACK\0\0\0\x02\0\0\0\0");
    let mut push = format!(
        "POST /{REPO}.git/git-receive-pack HTTP/1.1\r\nHost: git\r\n{good}Content-Type: application/x-git-receive-pack-request\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    push.extend_from_slice(&body);
    let (client, status, len) = git_exchange(proxy.git, &push).await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    let reason = ("branch_not_allowed", Some("refs/heads/main: push restricted to refs/heads/feature"));
    want.push(git_record("s-git", "POST", REPO, "git-receive-pack", "deny", reason, 200, &client, 1, len));
    expect_records(&proxy, &want).await;

    // An /api route outside the slice: 403 JSON; the route did not parse, so no repository is named.
    let api = format!("GET /api/repos/{REPO}/actions/secrets HTTP/1.1\r\nHost: git\r\n{good}\r\n");
    let (client, status, len) = git_exchange(proxy.git, api.as_bytes()).await;
    assert_eq!(status, "HTTP/1.1 403 Forbidden");
    let detail = "GET \"/api/repos/acme/widgets/actions/secrets\": a repository's secrets are never forwarded, not even for reading (secrets, variables, keys, hooks, invitations, environments, collaborators and deployments stay with the operator); allowed: reads (GET, HEAD) under /api/repos/OWNER/REPO of the repository; issues with their comments, events, labels and timeline; pull requests with their files, commits, reviews, review comments and requested reviewers; commits with their statuses, check runs and check suites; compare; contents and readme; git trees, blobs, refs, commits and tags; branches; releases and tags; labels and milestones; Actions workflows, runs, jobs and logs; writes POST …/pulls, PATCH …/pulls/N, POST …/pulls/N/comments, POST …/pulls/N/comments/ID/replies, POST …/pulls/N/reviews, POST …/issues/N/comments";
    let reason = ("api_never_forwarded", Some(detail));
    want.push(git_record("-", "GET", "-", "api", "deny", reason, 403, &client, 0, len));
    expect_records(&proxy, &want).await;

    // No such route: 404.
    let (client, status, len) = git_exchange(proxy.git, b"GET /nothing HTTP/1.1\r\nHost: git\r\n\r\n").await;
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    let detail = "no git route for GET \"/nothing\"; expected GET /OWNER/REPO.git/info/refs?service=git-upload-pack|git-receive-pack or POST /OWNER/REPO.git/git-upload-pack|git-receive-pack";
    let reason = ("no_route", Some(detail));
    want.push(git_record("-", "GET", "-", "-", "deny", reason, 404, &client, 0, len));
    expect_records(&proxy, &want).await;
    // The session's third verified request is over its burst of 2: 429, counted against it.
    let (client, status, len) = git_exchange(proxy.git, &discovery(REPO, &good)).await;
    assert_eq!(status, "HTTP/1.1 429 Too Many Requests");
    let detail = "session over its rate limit (0.01 requests per second, burst 2); retry in 100s";
    want.push(git_record(
        "s-git",
        "GET",
        REPO,
        "git-upload-pack",
        "deny",
        ("rate_limited", Some(detail)),
        429,
        &client,
        0,
        len,
    ));
    expect_records(&proxy, &want).await;
    no_more_records(&proxy, want.len()).await;
    assert_eq!(upstream.connections(), 1, "only the allowed discovery reached the upstream");
}
