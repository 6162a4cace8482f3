//! The egress proxy end to end, hermetic: sluice in-process on 127.0.0.1:0, upstreams on port 0,
//! names mapped to 127.0.0.1 by `[resolver] hosts` (system DNS off), real clients: curl, hyper, raw
//! sockets. Refusal tests point at a recording listener and assert it saw no connection.

mod support;

use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// 100 MiB, for the transfers that must arrive intact both ways.
const BIG: u64 = 100 * 1024 * 1024;
const CURL_LIMIT: Duration = Duration::from_secs(30);
const CURL_BIG_LIMIT: Duration = Duration::from_secs(240);

/// `[egress] policy = "lab"` plus `[resolver] hosts` mapping each name to 127.0.0.1.
fn config(extra_egress: &str, names: &[&str]) -> String {
    let hosts: Vec<String> = names.iter().map(|n| format!("{n:?} = [\"127.0.0.1\"]")).collect();
    format!("[egress]\npolicy = \"lab\"\n{extra_egress}\n[resolver]\nhosts = {{ {} }}\n", hosts.join(", "))
}

/// A custom policy `name` that allows `allow` and reaches loopback only through its own `allow_ips`.
fn custom(name: &str, allow: &[String]) -> String {
    let list: Vec<String> = allow.iter().map(|a| format!("{a:?}")).collect();
    format!(
        "version = 1\nname = \"{name}\"\nlevel = \"custom\"\nallow = [{}]\nallow_ips = [\"127.0.0.0/8\"]\n",
        list.join(", ")
    )
}

fn lab(allow: &[String]) -> String {
    custom("lab", allow)
}

/// The plain-text body of a policy refusal.
fn denied_body(destination: &str, policy: &str, level: &str, reason: &str, rule: Option<&str>, hint: &str) -> String {
    let rule = rule.map(|r| format!("  rule:        {r}\n")).unwrap_or_default();
    format!(
        "sluice: {destination} is not allowed: {reason}\n  destination: {destination}\n  policy:      {policy} (level {level})\n  reason:      {reason}\n{rule}  hint:        {hint}\n"
    )
}

fn connect_head(authority: &str) -> String {
    format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n")
}

fn assert_refusal(r: &RawResponse, status_line: &str, decision: &str, body: &str) {
    assert_eq!(r.status_line, status_line, "{r:#?}");
    assert_eq!(r.header("x-sluice-decision"), Some(decision), "{r:#?}");
    assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"), "{r:#?}");
    assert_eq!(r.header("content-length"), Some(body.len().to_string().as_str()), "{r:#?}");
    assert_eq!(r.body, body);
}

// ---------------------------------------------------------------------------------------------
// Allowed traffic: curl through CONNECT to HTTPS, and plain HTTP via -x; 100 MiB both ways.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_https_through_connect_and_100_mib_both_ways() {
    let cert = TestCert::new(&["secure.test"]);
    let upstream = Upstream::tls("secure", &cert).await;
    let port = upstream.port();
    let proxy =
        Proxy::start(&config("", &["secure.test"]), &[("lab.toml", &lab(&[format!("secure.test:{port}")]))]).await;
    let ca = proxy.dir.write("ca.pem", &cert.pem);
    let ca = ca.to_str().expect("utf-8 path");
    let proxy_url = proxy.url();
    let base = format!("https://secure.test:{port}");

    let out = curl(&["--proxy", &proxy_url, "--cacert", ca, &format!("{base}/")], CURL_LIMIT).await;
    assert_eq!((out.code, out.stdout.as_str(), out.stderr.as_str()), (Some(0), "hello from secure /\n", ""));

    // Download: a generated body, hashed as curl prints it.
    let url = format!("{base}/bytes/{BIG}");
    let (code, digest, len, stderr) = curl_sha256(&["--proxy", &proxy_url, "--cacert", ca, &url], CURL_BIG_LIMIT).await;
    assert_eq!((code, len, stderr.as_str()), (Some(0), BIG, ""));
    assert_eq!(digest, generated_sha256(BIG));

    // Upload: the upstream hashes what it receives.
    let file = proxy.dir.path().join("upload.bin");
    let sent = write_generated(&file, BIG);
    let data = format!("@{}", file.display());
    let url = format!("{base}/sha256");
    let out = curl(&["--proxy", &proxy_url, "--cacert", ca, "--data-binary", &data, &url], CURL_BIG_LIMIT).await;
    assert_eq!((out.code, out.stderr.as_str()), (Some(0), ""));
    assert_eq!(out.stdout, format!("sha256={sent} bytes={BIG}\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_plain_http_and_100_mib_both_ways() {
    let upstream = Upstream::plain("plain").await;
    let port = upstream.port();
    let proxy =
        Proxy::start(&config("", &["plain.test"]), &[("lab.toml", &lab(&[format!("plain.test:{port}")]))]).await;
    let proxy_url = proxy.url();
    let base = format!("http://plain.test:{port}");

    let out = curl(&["-x", &proxy_url, &format!("{base}/hi")], CURL_LIMIT).await;
    assert_eq!((out.code, out.stdout.as_str(), out.stderr.as_str()), (Some(0), "hello from plain /hi\n", ""));

    let url = format!("{base}/bytes/{BIG}");
    let (code, digest, len, stderr) = curl_sha256(&["-x", &proxy_url, &url], CURL_BIG_LIMIT).await;
    assert_eq!((code, len, stderr.as_str()), (Some(0), BIG, ""));
    assert_eq!(digest, generated_sha256(BIG));

    let file = proxy.dir.path().join("upload.bin");
    let sent = write_generated(&file, BIG);
    let data = format!("@{}", file.display());
    let out = curl(&["-x", &proxy_url, "--data-binary", &data, &format!("{base}/sha256")], CURL_BIG_LIMIT).await;
    assert_eq!((out.code, out.stderr.as_str()), (Some(0), ""));
    assert_eq!(out.stdout, format!("sha256={sent} bytes={BIG}\n"));
}

/// The upstream sees a request rebuilt from the URI: origin-form target, `Host` from the URI, no
/// `Proxy-*` or hop-by-hop headers (the credential-bearing `Proxy-Authorization` never leaves).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_request_is_rebuilt_and_stripped() {
    let upstream = Upstream::plain("plain").await;
    let port = upstream.port();
    let proxy =
        Proxy::start(&config("", &["plain.test"]), &[("lab.toml", &lab(&[format!("plain.test:{port}")]))]).await;
    let request = format!(
        "GET http://plain.test:{port}/headers?q=1 HTTP/1.1\r\nHost: plain.test:{port}\r\nProxy-Connection: keep-alive\r\nProxy-Foo: canary-proxy-header\r\nConnection: close, X-Hop\r\nX-Hop: canary-hop\r\nKeep-Alive: timeout=5\r\nX-Kept: yes\r\n\r\n"
    );
    let r = raw_exchange(proxy.addr, request.as_bytes()).await;
    assert_eq!(r.status_line, "HTTP/1.1 200 OK");
    assert_eq!(r.body, format!("GET /headers?q=1 HTTP/1.1\nhost: plain.test:{port}\nx-kept: yes\n"));
}

// ---------------------------------------------------------------------------------------------
// Policy refusals: 403 in plain words, before anything is dialled.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_name_on_trusted_level() {
    // No policy files and no `[egress] policy`: the built-in trusted level, as out of the box.
    let proxy = Proxy::start("", &[]).await;
    let hint443 = "to allow it, add \"example.org\" (or \"example.org:443\") to `allow` in a policy with level = \"custom\" (include_defaults = true keeps the default list)";
    let body443 = denied_body("example.org:443", "trusted", "trusted", "not in the allowlist", None, hint443);
    let decision = "deny; reason=not_allowlisted; policy=trusted";

    let r = raw_exchange(proxy.addr, connect_head("example.org:443").as_bytes()).await;
    assert_refusal(&r, "HTTP/1.1 403 Forbidden", decision, &body443);

    // curl reports a refused CONNECT as exit 56 (CURLE_RECV_ERROR), with -p or for https:// alike.
    let proxy_url = proxy.url();
    for args in [vec!["-x", &proxy_url, "https://example.org/"], vec!["-p", "-x", &proxy_url, "http://example.org/"]] {
        let out = curl(&args, CURL_LIMIT).await;
        assert_eq!(out.code, Some(56), "{args:?}: {out:?}");
        assert_eq!(out.stderr, "curl: (56) CONNECT tunnel failed, response 403\n", "{args:?}");
        assert_eq!(out.stdout, "");
    }

    // Plain HTTP: curl prints the refusal (exit 0), or fails with 22 under -f.
    let hint80 = "to allow it, add \"example.org\" (or \"example.org:80\") to `allow` in a policy with level = \"custom\" (include_defaults = true keeps the default list)";
    let body80 = denied_body("example.org:80", "trusted", "trusted", "not in the allowlist", None, hint80);
    let out = curl(&["-x", &proxy_url, "-D", "-", "http://example.org/"], CURL_LIMIT).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{}", out.stdout);
    assert!(out.stdout.contains(&format!("\r\nx-sluice-decision: {decision}\r\n")), "{}", out.stdout);
    assert!(out.stdout.ends_with(&format!("\r\n\r\n{body80}")), "{}", out.stdout);
    let out = curl(&["-f", "-x", &proxy_url, "http://example.org/"], CURL_LIMIT).await;
    assert_eq!(out.code, Some(22), "{out:?}");
    assert_eq!(out.stderr, "curl: (22) The requested URL returned error: 403\n");

    // JSON for agents that ask for it.
    let request = "GET http://example.org/ HTTP/1.1\r\nHost: example.org\r\nAccept: application/json\r\n\r\n";
    let r = raw_exchange(proxy.addr, request.as_bytes()).await;
    assert_eq!(r.status_line, "HTTP/1.1 403 Forbidden");
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("x-sluice-decision"), Some(decision));
    let json: serde_json::Value = serde_json::from_str(&r.body).expect("JSON body");
    assert_eq!(
        json,
        serde_json::json!({
            "error": "not_allowlisted",
            "status": 403,
            "message": "example.org:80 is not allowed: not in the allowlist",
            "policy": "trusted",
            "level": "trusted",
            "hint": hint80,
            "destination": "example.org:80",
            "reason": "not in the allowlist",
            "rule": null,
        })
    );
}

/// IP literals in every legacy form are parsed to an address and refused by the guard on a policy
/// without `allow_ips`, before any dial.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_literals_in_every_form_are_refused_before_dialling() {
    let recorder = Recorder::start().await;
    let p = recorder.port();
    let bare = format!("version = 1\nname = \"lab\"\nlevel = \"custom\"\nallow = [\"echo.test\"]\nports = [{p}]\n");
    let proxy = Proxy::start(&config("", &["echo.test"]), &[("lab.toml", &bare)]).await;
    let loopback = "loopback address 127.0.0.1";
    let hint = "connect by host name, or add \"127.0.0.1/32\" to `allow_ips` if this address is meant to be reachable";
    let cases = [
        ("127.1", "127.0.0.1", loopback, hint),
        ("2130706433", "127.0.0.1", loopback, hint),
        ("0x7f.0.0.1", "127.0.0.1", loopback, hint),
        ("0177.0.0.1", "127.0.0.1", loopback, hint),
        (
            "[::ffff:127.0.0.1]",
            "[::ffff:127.0.0.1]",
            "loopback address ::ffff:127.0.0.1",
            "connect by host name, or add \"::ffff:127.0.0.1/128\" to `allow_ips` if this address is meant to be reachable",
        ),
        (
            "169.254.169.254",
            "169.254.169.254",
            "link-local address (cloud metadata lives here) 169.254.169.254",
            "connect by host name, or add \"169.254.169.254/32\" to `allow_ips` if this address is meant to be reachable",
        ),
    ];
    for (written, shown, reason, hint) in cases {
        let destination = format!("{shown}:{p}");
        let body = denied_body(&destination, "lab", "custom", reason, None, hint);
        let r = raw_exchange(proxy.addr, connect_head(&format!("{written}:{p}")).as_bytes()).await;
        assert_refusal(&r, "HTTP/1.1 403 Forbidden", "deny; reason=blocked_address; policy=lab", &body);
        // The same address as a plain-HTTP URL.
        let request = format!("GET http://{written}:{p}/ HTTP/1.1\r\nHost: {written}:{p}\r\n\r\n");
        let r = raw_exchange(proxy.addr, request.as_bytes()).await;
        assert_refusal(&r, "HTTP/1.1 403 Forbidden", "deny; reason=blocked_address; policy=lab", &body);
    }
    assert_eq!(recorder.connections(), 0, "a refused address was dialled");
}

/// A name the policy allows, whose answer holds a private or metadata address anywhere in the list,
/// is refused as a whole: the loopback address next to it (the recorder) is never dialled either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn name_resolving_to_a_blocked_address_is_refused() {
    let recorder = Recorder::start().await;
    let p = recorder.port();
    let config = "[egress]\npolicy = \"lab\"\n[resolver]\nhosts = { \"first.test\" = [\"169.254.169.254\", \"127.0.0.1\"], \"last.test\" = [\"127.0.0.1\", \"10.0.0.5\"] }\n";
    let proxy =
        Proxy::start(config, &[("lab.toml", &lab(&[format!("first.test:{p}"), format!("last.test:{p}")]))]).await;
    let cases = [
        ("first.test", "link-local address (cloud metadata lives here) 169.254.169.254", "169.254.169.254/32"),
        ("last.test", "private address (RFC 1918) 10.0.0.5", "10.0.0.5/32"),
    ];
    for (name, reason, net) in cases {
        let hint =
            format!("connect by host name, or add \"{net}\" to `allow_ips` if this address is meant to be reachable");
        let body = denied_body(&format!("{name}:{p}"), "lab", "custom", reason, None, &hint);
        let r = raw_exchange(proxy.addr, connect_head(&format!("{name}:{p}")).as_bytes()).await;
        assert_refusal(&r, "HTTP/1.1 403 Forbidden", "deny; reason=blocked_address; policy=lab", &body);
        let request = format!("GET http://{name}:{p}/ HTTP/1.1\r\nHost: {name}:{p}\r\n\r\n");
        let r = raw_exchange(proxy.addr, request.as_bytes()).await;
        assert_refusal(&r, "HTTP/1.1 403 Forbidden", "deny; reason=blocked_address; policy=lab", &body);
    }
    assert_eq!(recorder.connections(), 0, "an address from a refused answer was dialled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disallowed_port_is_refused() {
    let recorder = Recorder::start().await;
    let p = recorder.port();
    // `echo.test` without a port: the policy's default ports, 80 and 443.
    let proxy = Proxy::start(&config("", &["echo.test"]), &[("lab.toml", &lab(&["echo.test".into()]))]).await;
    let reason = format!("port {p} not allowed (allowed ports: 80, 443)");
    let rule = format!("\"echo.test\" ({}:4)", proxy.dir.path().join("policies/lab.toml").display());
    let hint = format!("to allow it, add \"echo.test:{p}\" to `allow`, or {p} to `ports`");
    let body = denied_body(&format!("echo.test:{p}"), "lab", "custom", &reason, Some(&rule), &hint);
    let r = raw_exchange(proxy.addr, connect_head(&format!("echo.test:{p}")).as_bytes()).await;
    assert_refusal(&r, "HTTP/1.1 403 Forbidden", "deny; reason=port_not_allowed; policy=lab", &body);
    let out = curl(&["-p", "-x", &proxy.url(), &format!("http://echo.test:{p}/")], CURL_LIMIT).await;
    assert_eq!((out.code, out.stderr.as_str()), (Some(56), "curl: (56) CONNECT tunnel failed, response 403\n"));
    assert_eq!(recorder.connections(), 0);
}

// ---------------------------------------------------------------------------------------------
// Network failures: 502 with the cause.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_failure_is_502() {
    let recorder = Recorder::start().await;
    let p = recorder.port();
    // `nowhere.test` is allowed but in no `[resolver] hosts`, and system DNS is off.
    let proxy = Proxy::start(&config("", &["echo.test"]), &[("lab.toml", &lab(&[format!("nowhere.test:{p}")]))]).await;
    let body = "sluice: DNS has no address for nowhere.test\n  policy:      lab (level custom)\n";
    let r = raw_exchange(proxy.addr, connect_head(&format!("nowhere.test:{p}")).as_bytes()).await;
    assert_refusal(&r, "HTTP/1.1 502 Bad Gateway", "deny; reason=dns_no_such_host; policy=lab", body);
    let request = format!("GET http://nowhere.test:{p}/ HTTP/1.1\r\nHost: nowhere.test:{p}\r\n\r\n");
    let r = raw_exchange(proxy.addr, request.as_bytes()).await;
    assert_refusal(&r, "HTTP/1.1 502 Bad Gateway", "deny; reason=dns_no_such_host; policy=lab", body);
    let out = curl(&["-x", &proxy.url(), &format!("https://nowhere.test:{p}/")], CURL_LIMIT).await;
    assert_eq!((out.code, out.stderr.as_str()), (Some(56), "curl: (56) CONNECT tunnel failed, response 502\n"));
    assert_eq!(recorder.connections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_upstream_connection_is_502() {
    let closed = closed_port().await;
    let proxy =
        Proxy::start(&config("", &["closed.test"]), &[("lab.toml", &lab(&[format!("closed.test:{closed}")]))]).await;
    let body = format!(
        "sluice: connecting to 127.0.0.1:{closed} failed: Connection refused (os error 111)\n  policy:      lab (level custom)\n"
    );
    let r = raw_exchange(proxy.addr, connect_head(&format!("closed.test:{closed}")).as_bytes()).await;
    assert_refusal(&r, "HTTP/1.1 502 Bad Gateway", "deny; reason=connect_failed; policy=lab", &body);
    let out = curl(&["-x", &proxy.url(), &format!("http://closed.test:{closed}/")], CURL_LIMIT).await;
    assert_eq!((out.code, out.stdout.as_str()), (Some(0), body.as_str()));
}

// ---------------------------------------------------------------------------------------------
// Malformed and hostile input over raw sockets: exact status lines, nothing dialled.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_specific_answers() {
    let recorder = Recorder::start().await;
    let p = recorder.port();
    let proxy = Proxy::start(&config("", &["echo.test"]), &[("lab.toml", &lab(&[format!("echo.test:{p}")]))]).await;
    let bad = "HTTP/1.1 400 Bad Request";
    let ours = |m: &str| format!("sluice: {m}\n  policy:      lab (level custom)\n");
    let port_error = |w: &str| {
        ours(&format!("bad CONNECT target \"echo.test:{w}\": invalid port \"{w}\": expected a number from 1 to 65535"))
    };
    let cases: Vec<(String, String)> = vec![
        (connect_head("echo.test"), ours("bad CONNECT target \"echo.test\": missing port: expected host:port")),
        (connect_head("echo.test:0"), port_error("0")),
        (connect_head("echo.test:65536"), port_error("65536")),
        (connect_head("echo.test:+443"), port_error("+443")),
        (
            format!("GET / HTTP/1.1\r\nHost: echo.test:{p}\r\n\r\n"),
            ours("this is a proxy: send absolute-form requests (GET http://host/path) or CONNECT host:port"),
        ),
        (
            format!("GET https://echo.test:{p}/ HTTP/1.1\r\nHost: echo.test:{p}\r\n\r\n"),
            ours("https:// URLs are tunnelled, not forwarded: the client should use CONNECT (set HTTPS_PROXY)"),
        ),
        (
            format!("GET http://echo.test:{p}/ HTTP/1.1\r\nHost: other.test\r\n\r\n"),
            ours(&format!("Host header \"other.test\" does not match the URL's host echo.test:{p}; they must agree")),
        ),
        (
            format!("GET http://echo.test:{p}/ HTTP/1.1\r\nHost: echo.test:{p}\r\nHost: echo.test:{p}\r\n\r\n"),
            ours("request has more than one Host header"),
        ),
        (
            format!("GET http://user:pw@echo.test:{p}/ HTTP/1.1\r\nHost: echo.test:{p}\r\n\r\n"),
            ours("credentials in the URL (user@host) are not forwarded; send them in an Authorization header"),
        ),
    ];
    for (request, body) in cases {
        let r = raw_exchange(proxy.addr, request.as_bytes()).await;
        assert_refusal(&r, bad, "deny; reason=bad_request; policy=lab", &body);
    }

    // What the head guard refuses before hyper or a handler sees the request: worded answers that
    // close the connection (no session is known yet, so no policy is named).
    let guard = |m: &str| format!("sluice: {m}\n");
    let head_refusals = [
        (
            format!(
                "POST http://echo.test:{p}/ HTTP/1.1\r\nHost: echo.test:{p}\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            ),
            bad,
            "bad_request",
            guard("request has more than one Transfer-Encoding header"),
        ),
        (
            format!("CONNECT http://echo.test:{p}/ HTTP/1.1\r\nHost: echo.test:{p}\r\n\r\n"),
            bad,
            "bad_request",
            guard(&format!("CONNECT takes host:port, not a URL (http://echo.test:{p}/); e.g. CONNECT example.com:443")),
        ),
        (
            connect_head("echo.test:443:443"),
            bad,
            "bad_request",
            guard(
                "bad CONNECT target \"echo.test:443:443\": IPv6 addresses must be written in brackets, e.g. [2001:db8::1]:443",
            ),
        ),
        (
            format!("POST http://echo.test:{p}/ HTTP/1.1\r\nHost: echo.test:{p}\r\nContent-Length: 5, 5\r\n\r\nhello"),
            bad,
            "bad_request",
            guard("Content-Length must be a single decimal number"),
        ),
        (
            format!(
                "POST http://echo.test:{p}/ HTTP/1.1\r\nHost: echo.test:{p}\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"
            ),
            bad,
            "bad_request",
            guard("request has more than one Content-Length"),
        ),
        (
            format!("POST http://echo.test:{p}/ HTTP/1.1\r\nHost: echo.test:{p}\r\nTransfer-Encoding: gzip\r\n\r\n"),
            bad,
            "bad_request",
            guard("unsupported Transfer-Encoding: only \"chunked\" is accepted"),
        ),
        (
            format!(
                "GET http://echo.test:{p}/ HTTP/1.1\r\nHost: echo.test:{p}\r\nX-Big: {}\r\n\r\n",
                "a".repeat(40_000)
            ),
            "HTTP/1.1 431 Request Header Fields Too Large",
            "head_too_large",
            guard("request head is over 32768 bytes"),
        ),
        (
            "GET http://echo.test/ HTTP/1.1\r\nBad Header\r\n\r\n".to_string(),
            bad,
            "bad_request",
            guard("malformed request head: invalid header name"),
        ),
        (
            format!("GET http://echo.test:{p}/ HTTP/1.1\r\nHost: echo.test:{p}\r\nX-Folded: a\r\n b\r\n\r\n"),
            bad,
            "bad_request",
            guard("malformed request head: invalid header name"),
        ),
    ];
    for (request, status_line, code, body) in head_refusals {
        let mut c = RawClient::connect(proxy.addr).await;
        c.send(request.as_bytes()).await;
        let r = c.response().await.expect("a response");
        assert_refusal(&r, status_line, &format!("deny; reason={code}"), &body);
        assert_eq!(r.header("connection"), Some("close"), "{request:.80}");
        assert!(c.expect_eof().await, "{request:.80}");
    }
    assert_eq!(recorder.connections(), 0, "malformed input reached the upstream");
}

/// Ambiguous framing never reaches the upstream: `Content-Length` with `Transfer-Encoding` (CL.TE and
/// TE.CL alike) and duplicate lengths, even identical ones, are refused with a 400 before anything is
/// dialled, and a request smuggled behind them is never read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_framing_is_refused() {
    let upstream = Upstream::plain("plain").await;
    let port = upstream.port();
    let proxy =
        Proxy::start(&config("", &["plain.test"]), &[("lab.toml", &lab(&[format!("plain.test:{port}")]))]).await;
    let smuggled = format!("GET http://plain.test:{port}/smuggled HTTP/1.1\r\nHost: plain.test:{port}\r\n\r\n");
    let cases = [
        (
            format!(
                "POST http://plain.test:{port}/headers HTTP/1.1\r\nHost: plain.test:{port}\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n{smuggled}"
            ),
            "sluice: request has both Content-Length and Transfer-Encoding; send one\n",
        ),
        (
            format!(
                "POST http://plain.test:{port}/headers HTTP/1.1\r\nHost: plain.test:{port}\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n3\r\nabc\r\n0\r\n\r\n{smuggled}"
            ),
            "sluice: request has both Content-Length and Transfer-Encoding; send one\n",
        ),
        (
            format!(
                "POST http://plain.test:{port}/sha256 HTTP/1.1\r\nHost: plain.test:{port}\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello{smuggled}"
            ),
            "sluice: request has more than one Content-Length\n",
        ),
        (
            format!(
                "POST http://plain.test:{port}/sha256 HTTP/1.1\r\nHost: plain.test:{port}\r\nTransfer-Encoding:  chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n{smuggled}"
            ),
            "sluice: request has more than one Transfer-Encoding header\n",
        ),
        (
            format!(
                "POST http://plain.test:{port}/sha256 HTTP/1.1\r\nHost: plain.test:{port}\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n{smuggled}"
            ),
            "sluice: unsupported Transfer-Encoding: only \"chunked\" is accepted\n",
        ),
    ];
    for (request, body) in cases {
        let mut c = RawClient::connect(proxy.addr).await;
        c.send(request.as_bytes()).await;
        let r = c.response().await.expect("a response");
        assert_refusal(&r, "HTTP/1.1 400 Bad Request", "deny; reason=bad_request", body);
        assert_eq!(r.header("connection"), Some("close"));
        assert!(c.expect_eof().await, "the connection must close after a refused head");
    }
    assert_eq!(upstream.connections(), 0, "ambiguous framing reached the upstream");

    // A bad chunk size after a good chunk: the request fails with a 400 and the connection closes.
    let mut c = RawClient::connect(proxy.addr).await;
    c.send(format!("POST http://plain.test:{port}/sha256 HTTP/1.1\r\nHost: plain.test:{port}\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n{smuggled}").as_bytes()).await;
    let r = c.response().await.expect("a response");
    assert_eq!(r.status_line, "HTTP/1.1 400 Bad Request", "{r:#?}");
    assert!(c.expect_eof().await);
}

/// Slowloris: a head that is not complete within `[egress] header_timeout` of its first byte gets a
/// `408` and the connection closes, whether the client goes quiet or keeps trickling bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_are_cut_off() {
    let recorder = Recorder::start().await;
    let p = recorder.port();
    let proxy = Proxy::start(
        &config("header_timeout = \"1s\"", &["echo.test"]),
        &[("lab.toml", &lab(&[format!("echo.test:{p}")]))],
    )
    .await;

    let timeout_body = "sluice: request head not complete within 1s\n";
    let started = Instant::now();
    let mut c = RawClient::connect(proxy.addr).await;
    c.send(format!("GET http://echo.test:{p}/ HTTP/1.1\r\nHost: ec").as_bytes()).await;
    let r = c.response().await.expect("a 408");
    assert_refusal(&r, "HTTP/1.1 408 Request Timeout", "deny; reason=head_timeout", timeout_body);
    assert!(c.expect_eof().await, "expected a clean close after the 408");
    assert_cut_off_in_time(started.elapsed());

    // Trickling one byte every 200 ms does not reset the clock.
    let started = Instant::now();
    let mut c = RawClient::connect(proxy.addr).await;
    c.send(format!("GET http://echo.test:{p}/ HTTP/1.1\r\nX-Slow: ").as_bytes()).await;
    let mut buf = [0u8; 1024];
    let mut answer = Vec::new();
    for _ in 0..30 {
        tokio::select! {
            read = c.stream.read(&mut buf) => {
                match read {
                    Ok(n) if n > 0 => answer.extend_from_slice(&buf[..n]),
                    _ => break,
                }
            }
            () = tokio::time::sleep(Duration::from_millis(200)) => {
                if c.stream.write_all(b"a").await.is_err() {
                    break;
                }
            }
        }
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408 Request Timeout\r\n"), "a trickling client was not cut off: {answer:?}");
    assert!(answer.ends_with(timeout_body), "{answer:?}");
    assert_cut_off_in_time(started.elapsed());
    assert_eq!(recorder.connections(), 0);
}

fn assert_cut_off_in_time(elapsed: Duration) {
    assert!(elapsed >= Duration::from_millis(900), "closed before header_timeout: {elapsed:?}");
    assert!(elapsed < Duration::from_secs(3), "not cut off in bounded time: {elapsed:?}");
}

// ---------------------------------------------------------------------------------------------
// Tunnels: bytes pipelined after the CONNECT head, half-close.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_carries_pipelined_bytes_and_respects_half_close() {
    let recorder = Recorder::start().await;
    let p = recorder.port();
    let proxy = Proxy::start(&config("", &["echo.test"]), &[("lab.toml", &lab(&[format!("echo.test:{p}")]))]).await;

    // Bytes sent in the same write as the CONNECT head go upstream first, unchanged.
    let mut c = RawClient::connect(proxy.addr).await;
    c.send(format!("{}EARLY BYTES", connect_head(&format!("echo.test:{p}"))).as_bytes()).await;
    let r = c.response().await.expect("a response");
    assert_eq!((r.status_line.as_str(), r.headers.len(), r.body.as_str()), ("HTTP/1.1 200 OK", 0, ""), "{r:#?}");
    assert_eq!(c.read_exact(11).await, b"EARLY BYTES");

    // Half-close: the client shuts its write side; the echo still comes back, then EOF.
    c.send(b"ping after").await;
    c.stream.shutdown().await.expect("shutdown write");
    assert_eq!(c.read_exact(10).await, b"ping after");
    assert!(c.expect_eof().await, "the tunnel must pass the upstream's close on");
    assert_eq!(recorder.connections(), 1);
    assert_eq!(recorder.received(), b"EARLY BYTESping after");
}

// ---------------------------------------------------------------------------------------------
// Keep-alive and the global connection cap.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_requests_are_each_decided() {
    let upstream = Upstream::plain("plain").await;
    let port = upstream.port();
    let proxy =
        Proxy::start(&config("", &["plain.test"]), &[("lab.toml", &lab(&[format!("plain.test:{port}")]))]).await;
    let hint = "to allow it, add \"example.org\" (or \"example.org:80\") to `allow` in a policy with level = \"custom\" (include_defaults = true keeps the default list)";
    let denied = denied_body("example.org:80", "lab", "custom", "not in the allowlist", None, hint);

    let mut c = RawClient::connect(proxy.addr).await;
    for round in 0..2 {
        c.send(format!("GET http://plain.test:{port}/r{round} HTTP/1.1\r\nHost: plain.test:{port}\r\n\r\n").as_bytes())
            .await;
        let r = c.response().await.expect("first response");
        assert_eq!(
            (r.status_line.as_str(), r.body.as_str()),
            ("HTTP/1.1 200 OK", format!("hello from plain /r{round}\n").as_str())
        );
        c.send(b"GET http://example.org/ HTTP/1.1\r\nHost: example.org\r\n\r\n").await;
        let r = c.response().await.expect("second response");
        assert_refusal(&r, "HTTP/1.1 403 Forbidden", "deny; reason=not_allowlisted; policy=lab", &denied);
        assert_eq!(r.header("connection"), None, "a refusal keeps the connection open");
    }
    assert_eq!(upstream.connections(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cap_answers_503_and_closes() {
    // One accept thread: with several, each has an accept queue of its own, and the second connection
    // can be accepted before the first takes the slot.
    let proxy = Proxy::start("[egress]\nmax_connections = 2\n[server]\nthreads = 1\n", &[]).await;
    let first = RawClient::connect(proxy.addr).await;
    let _second = RawClient::connect(proxy.addr).await;

    let mut third = RawClient::connect(proxy.addr).await;
    let r = third.response().await.expect("a 503");
    let body = "sluice: the proxy is at its connection limit (2 connections); retry shortly\n";
    assert_eq!(r.status_line, "HTTP/1.1 503 Service Unavailable");
    // Rendered like every other refusal: the same header order, `date` last.
    let (date, headers) = r.headers.split_last().expect("headers");
    assert_eq!(
        headers,
        [
            ("content-type", "text/plain; charset=utf-8"),
            ("x-sluice-decision", "deny; reason=overloaded"),
            ("retry-after", "1"),
            ("connection", "close"),
            ("content-length", body.len().to_string().as_str()),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()))
    );
    assert!(date.0 == "date" && date.1.ends_with(" GMT"), "{date:?}");
    assert_eq!(r.body, body);
    assert!(third.expect_eof().await);

    // Closing one connection frees its slot (bounded wait for the proxy to notice).
    drop(first);
    let mut served = None;
    for _ in 0..50 {
        let r = raw_exchange(proxy.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        if r.status_line != "HTTP/1.1 503 Service Unavailable" {
            served = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = served.expect("a slot frees up after a close");
    assert_eq!(r.status_line, "HTTP/1.1 400 Bad Request");
}

// ---------------------------------------------------------------------------------------------
// Identity: signed session credentials in Proxy-Authorization.

mod identity {
    use super::*;
    use sluice::credential::now_unix;

    const KEY: &[u8] = b"test-signing-key-0123456789abcdef-0123456789";
    const SID: &str = "sess-canary-1";

    fn token(key: &[u8], sid: &str, policy: &str, iat: u64, exp: u64) -> String {
        egress_token(key, sid, policy, iat, exp)
    }

    fn fresh(policy: &str) -> String {
        let now = now_unix();
        token(KEY, SID, policy, now, now + 3600)
    }

    /// Anonymous use off; the anonymous policy `closed` (level none) would refuse everything, `team`
    /// allows the upstream.
    async fn start(upstream_port: u16) -> Proxy {
        let dir = TempDir::new("identity");
        let key = dir.write("key", KEY);
        let config = format!(
            "[egress]\npolicy = \"closed\"\n[auth]\nanonymous = false\nkey_file = {:?}\n[resolver]\nhosts = {{ \"plain.test\" = [\"127.0.0.1\"] }}\n",
            key.display()
        );
        let closed = "version = 1\nname = \"closed\"\nlevel = \"none\"\n";
        let team = custom("team", &[format!("plain.test:{upstream_port}")]);
        Proxy::start_in(dir, &config, &[("closed.toml", closed), ("team.toml", &team)]).await
    }

    fn get(port: u16, auth: Option<&str>) -> String {
        let auth = auth.map(|a| format!("Proxy-Authorization: {a}\r\n")).unwrap_or_default();
        format!("GET http://plain.test:{port}/headers HTTP/1.1\r\nHost: plain.test:{port}\r\n{auth}\r\n")
    }

    const AUTH_HINT: &str = "  hint:        set HTTPS_PROXY=http://SESSION:TOKEN@HOST:PORT with a credential from `sluice token mint --kind egress`\n";

    fn assert_407(r: &RawResponse, code: &str, body: &str) {
        assert_refusal(r, "HTTP/1.1 407 Proxy Authentication Required", &format!("deny; reason={code}"), body);
        assert_eq!(r.header("proxy-authenticate"), Some("Basic realm=\"sluice\""));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn credentials_are_required_verified_and_decide_the_policy() {
        let upstream = Upstream::plain("plain").await;
        let port = upstream.port();
        let proxy = start(port).await;
        let mut canaries = Vec::new();

        // No credentials.
        let r = raw_exchange(proxy.addr, get(port, None).as_bytes()).await;
        let body = format!("sluice: proxy authentication failed: this proxy requires credentials\n{AUTH_HINT}");
        assert_407(&r, "auth_missing", &body);
        let out = curl(&["-x", &proxy.url(), &format!("https://plain.test:{port}/")], CURL_LIMIT).await;
        assert_eq!((out.code, out.stderr.as_str()), (Some(56), "curl: (56) CONNECT tunnel failed, response 407\n"));

        // A valid credential for `team`, the way clients send it: in the proxy URL.
        let good = fresh("team");
        canaries.push(good.clone());
        let proxy_url = format!("http://{SID}:{good}@{}", proxy.addr);
        let out = curl(&["-x", &proxy_url, &format!("http://plain.test:{port}/headers")], CURL_LIMIT).await;
        assert_eq!(out.code, Some(0), "{out:?}");
        // The upstream never sees the credential.
        let mut lines: Vec<&str> = out.stdout.lines().collect();
        lines[1..].sort_unstable();
        let user_agent = format!("user-agent: curl/{}", curl_version());
        let host = format!("host: plain.test:{port}");
        assert_eq!(lines, ["GET /headers HTTP/1.1", "accept: */*", &host, &user_agent]);
        // And a CONNECT tunnel with it.
        let out = curl(&["-p", "-x", &proxy_url, &format!("http://plain.test:{port}/t")], CURL_LIMIT).await;
        assert_eq!((out.code, out.stdout.as_str()), (Some(0), "hello from plain /t\n"), "{out:?}");

        // The token's policy decides, not the anonymous one: the same destination under `closed`.
        let closed = fresh("closed");
        canaries.push(closed.clone());
        let r = raw_exchange(proxy.addr, get(port, Some(&basic(SID, &closed))).as_bytes()).await;
        let body = denied_body(
            &format!("plain.test:{port}"),
            "closed",
            "none",
            "level none allows no outbound connections",
            Some(&format!("\"level = \\\"none\\\"\" ({}:3)", proxy.dir.path().join("policies/closed.toml").display())),
            "use a policy with level \"trusted\", \"custom\" or \"full\"",
        );
        assert_refusal(&r, "HTTP/1.1 403 Forbidden", "deny; reason=level_none; policy=closed", &body);

        // Expired.
        let now = now_unix();
        let expired = token(KEY, SID, "team", now - 7200, now - 3600);
        canaries.push(expired.clone());
        let r = raw_exchange(proxy.addr, get(port, Some(&basic(SID, &expired))).as_bytes()).await;
        let body = "sluice: proxy authentication failed: credential expired 60m ago\n  hint:        ask the orchestrator for a fresh session credential\n";
        assert_407(&r, "auth_expired", body);

        // Signed with another key.
        let forged = token(b"another-key-0123456789abcdef-0123456789", SID, "team", now, now + 3600);
        canaries.push(forged.clone());
        let r = raw_exchange(proxy.addr, get(port, Some(&basic(SID, &forged))).as_bytes()).await;
        let body = format!(
            "sluice: proxy authentication failed: credential signature does not verify (forged, altered, or signed with another key)\n{AUTH_HINT}"
        );
        assert_407(&r, "auth_bad_signature", &body);

        // Presented with another session id.
        let r = raw_exchange(proxy.addr, get(port, Some(&basic("someone-else", &good))).as_bytes()).await;
        let body = format!(
            "sluice: proxy authentication failed: the session id given with the credential is not the one it was issued to\n{AUTH_HINT}"
        );
        assert_407(&r, "auth_session_mismatch", &body);

        // A valid credential naming a policy this proxy does not have.
        let ghost = fresh("ghost");
        canaries.push(ghost.clone());
        let r = raw_exchange(proxy.addr, get(port, Some(&basic(SID, &ghost))).as_bytes()).await;
        let body = "sluice: the session's credential names policy \"ghost\", which this proxy does not have\n  hint:        add the policy to the proxy's policies directory, or mint the credential for an existing policy\n";
        assert_refusal(&r, "HTTP/1.1 403 Forbidden", "deny; reason=unknown_policy", body);

        // No response body or header ever carries a token back (JSON included).
        for t in &canaries {
            for (sid, accept) in [(SID, "text/plain"), ("someone-else", "application/json")] {
                let request =
                    get(port, Some(&basic(sid, t))).replace("\r\n\r\n", &format!("\r\nAccept: {accept}\r\n\r\n"));
                let mut c = RawClient::connect(proxy.addr).await;
                c.send(request.as_bytes()).await;
                let r = c.response().await.expect("a response");
                assert!(!r.body.contains(t.as_str()), "token echoed in {r:#?}");
                assert!(r.headers.iter().all(|(_, v)| !v.contains(t.as_str())), "token echoed in {r:#?}");
            }
        }
    }

    /// A client that answers a `407` on the same connection gets its tunnel there; a connection whose
    /// first request is plain HTTP can still open a tunnel after it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_stay_usable_after_a_407_and_after_plain_http() {
        let upstream = Upstream::plain("plain").await;
        let port = upstream.port();
        let proxy = start(port).await;
        let token = fresh("team");
        let target = format!("plain.test:{port}");
        let with_auth = |head: String| {
            head.replace("\r\n\r\n", &format!("\r\nProxy-Authorization: {}\r\n\r\n", basic(SID, &token)))
        };
        let through_tunnel = format!("GET /t HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n");

        let mut c = RawClient::connect(proxy.addr).await;
        c.send(connect_head(&target).as_bytes()).await;
        let r = c.response().await.expect("a 407");
        let body = format!("sluice: proxy authentication failed: this proxy requires credentials\n{AUTH_HINT}");
        assert_407(&r, "auth_missing", &body);
        assert_eq!(r.header("connection"), None, "a 407 keeps the connection: {r:#?}");
        c.send(with_auth(connect_head(&target)).as_bytes()).await;
        assert_eq!(c.response().await.expect("a 200").status_line, "HTTP/1.1 200 OK");
        c.send(through_tunnel.as_bytes()).await;
        let r = c.response().await.expect("the upstream's answer");
        assert_eq!((r.status_line.as_str(), r.body.as_str()), ("HTTP/1.1 200 OK", "hello from plain /t\n"));

        let mut c = RawClient::connect(proxy.addr).await;
        c.send(with_auth(get(port, None)).as_bytes()).await;
        assert_eq!(c.response().await.expect("a forwarded answer").status_line, "HTTP/1.1 200 OK");
        c.send(with_auth(connect_head(&target)).as_bytes()).await;
        assert_eq!(c.response().await.expect("a 200").status_line, "HTTP/1.1 200 OK");
        c.send(through_tunnel.as_bytes()).await;
        let r = c.response().await.expect("the upstream's answer");
        assert_eq!((r.status_line.as_str(), r.body.as_str()), ("HTTP/1.1 200 OK", "hello from plain /t\n"));
        // Two tunnels and one forwarded request.
        assert_eq!(upstream.connections(), 3);

        // A client that says it will not keep the connection gets its 407 and the close.
        for (head, status_line) in [
            (
                format!("CONNECT {target} HTTP/1.1\r\nConnection: close\r\n\r\n"),
                "HTTP/1.1 407 Proxy Authentication Required",
            ),
            (format!("CONNECT {target} HTTP/1.0\r\n\r\n"), "HTTP/1.0 407 Proxy Authentication Required"),
        ] {
            let mut c = RawClient::connect(proxy.addr).await;
            c.send(head.as_bytes()).await;
            let r = c.response().await.expect("a 407");
            assert_eq!((r.status_line.as_str(), r.header("connection")), (status_line, Some("close")), "{r:#?}");
            assert!(c.expect_eof().await, "the connection stays open after {head:?}");
        }
    }

    fn curl_version() -> String {
        let out = std::process::Command::new("curl").arg("--version").output().expect("curl --version");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.split_whitespace().nth(1).unwrap_or_default().to_string()
    }
}

/// An open tunnel keeps its connection's slot: the cap counts tunnels, not just request heads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cap_counts_open_tunnels() {
    let recorder = Recorder::start().await;
    let p = recorder.port();
    let proxy = Proxy::start(
        &config("max_connections = 1", &["echo.test"]),
        &[("lab.toml", &lab(&[format!("echo.test:{p}")]))],
    )
    .await;
    let mut tunnel = RawClient::connect(proxy.addr).await;
    tunnel.send(connect_head(&format!("echo.test:{p}")).as_bytes()).await;
    assert_eq!(tunnel.response().await.expect("a response").status_line, "HTTP/1.1 200 OK");
    tunnel.send(b"ping").await;
    assert_eq!(tunnel.read_exact(4).await, b"ping");

    let r = raw_exchange(proxy.addr, connect_head(&format!("echo.test:{p}")).as_bytes()).await;
    assert_eq!(r.status_line, "HTTP/1.1 503 Service Unavailable");
    assert_eq!(recorder.connections(), 1);
}
