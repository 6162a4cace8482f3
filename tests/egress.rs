//! The egress proxy end to end, hermetic: sluice in-process on 127.0.0.1:0, upstreams on port 0,
//! names mapped to 127.0.0.1 by `[resolver] hosts` (system DNS off), real clients: curl, hyper, raw
//! sockets. Refusal tests point at a recording listener and assert it saw no connection.

mod support;

use std::time::Duration;

use support::*;

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
