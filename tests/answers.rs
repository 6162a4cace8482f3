//! Golden answers: every refusal either listener gives, as the exact bytes on the wire (status line,
//! every header in order, the body), read off raw sockets.
//!
//! The egress proxy answers a CONNECT on two paths: a connection's first CONNECT is answered by
//! `proxy::connect::serve_first` without hyper, a CONNECT after a plain-HTTP request on the same
//! keep-alive connection is answered through hyper. Both are pinned, and so are plain-HTTP requests and
//! what the head guard refuses before either path sees a request. Only `date` is compared by shape.

mod support;

use std::time::Duration;

use support::lab::{self, Lab};
use support::*;

const KEY: &[u8] = b"answers-test-signing-key-0123456789abcdef";

fn auth(sid: &str, policy: &str) -> String {
    lab::auth(KEY, sid, policy)
}

/// One answer, taken apart: the `date` header is checked for its shape and set aside.
#[derive(Debug, PartialEq, Eq)]
struct Answer {
    status: String,
    /// Every header line but `date`, exactly as sent, in order.
    headers: Vec<String>,
    /// Whether a well-formed `date` header was there.
    date: bool,
    body: String,
}

impl Answer {
    /// A CONNECT's `200` has no `content-length`.
    fn without_length(mut self) -> Answer {
        self.headers.retain(|h| !h.starts_with("content-length: "));
        self
    }
}

/// `Tue, 01 Dec 2026 19:50:09 GMT` (RFC 9110 IMF-fixdate).
fn is_http_date(v: &str) -> bool {
    let b = v.as_bytes();
    let digits = |r: std::ops::Range<usize>| r.into_iter().all(|i| b[i].is_ascii_digit());
    b.len() == 29
        && ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"].contains(&&v[..3])
        && &v[3..5] == ", "
        && digits(5..7)
        && b[7] == b' '
        && ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"].contains(&&v[8..11])
        && b[11] == b' '
        && digits(12..16)
        && b[16] == b' '
        && digits(17..19)
        && b[19] == b':'
        && digits(20..22)
        && b[22] == b':'
        && digits(23..25)
        && &v[25..] == " GMT"
}

fn answer(bytes: &[u8]) -> Answer {
    let text = String::from_utf8(bytes.to_vec()).expect("a UTF-8 answer");
    let (head, body) = text.split_once("\r\n\r\n").expect("a response head");
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default().to_string();
    let mut headers = Vec::new();
    let mut date = false;
    for line in lines {
        match line.strip_prefix("date: ") {
            Some(v) => {
                assert!(is_http_date(v), "bad date header {line:?}");
                assert!(!date, "two date headers");
                date = true;
            }
            None => headers.push(line.to_string()),
        }
    }
    Answer { status, headers, date, body: body.to_string() }
}

/// The expected answer: `headers` without `content-length` (it is checked against the body and comes
/// last), `date` as given.
fn golden(status: &str, headers: &[&str], date: bool, body: &str) -> Answer {
    let mut headers: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    headers.push(format!("content-length: {}", body.len()));
    Answer { status: status.into(), headers, date, body: body.into() }
}

const TEXT: &str = "content-type: text/plain; charset=utf-8";
const JSON: &str = "content-type: application/json";
const CHALLENGE: &str = "proxy-authenticate: Basic realm=\"sluice\"";
const CLOSE: &str = "connection: close";
const AUTH_HINT: &str =
    "set HTTPS_PROXY=http://SESSION:TOKEN@HOST:PORT with a credential from `sluice token mint --kind egress`";

impl Lab {
    fn echo_target(&self) -> String {
        format!("echo.test:{}", self.echo.port())
    }

    /// A connection whose next request is its first: a CONNECT on it is answered without hyper.
    async fn fresh(&self) -> RawClient {
        RawClient::connect(self.proxy.addr).await
    }

    /// A connection that has had one plain-HTTP request served (under `authorization`): a CONNECT on it
    /// is answered through hyper.
    async fn after_plain(&self, authorization: &str) -> RawClient {
        let mut c = RawClient::connect(self.proxy.addr).await;
        c.send(self.get(authorization).as_bytes()).await;
        let served = answer(&c.response_bytes().await.expect("a forwarded answer"));
        assert_eq!(
            (served.status.as_str(), served.body.as_str()),
            ("HTTP/1.1 200 OK", "hello from plain /x\n"),
            "{served:#?}"
        );
        c
    }

    /// Sends `request` and reads one answer.
    async fn ask(c: &mut RawClient, request: &str) -> Answer {
        c.send(request.as_bytes()).await;
        answer(&c.response_bytes().await.expect("an answer"))
    }

    /// The connection is still served: a plain-HTTP request on it is forwarded.
    async fn still_served(&self, c: &mut RawClient) {
        let served = Lab::ask(c, &self.get(&auth("s-follow-up", "lab"))).await;
        assert_eq!((served.status.as_str(), served.body.as_str()), ("HTTP/1.1 200 OK", "hello from plain /x\n"));
    }
}

fn connect(target: &str, extra: &str) -> String {
    format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{extra}\r\n")
}

fn authorization(value: &str) -> String {
    format!("Proxy-Authorization: {value}\r\n")
}

/// A well-formed credential whose signature does not verify.
fn forged(sid: &str) -> String {
    basic(sid, "v1.eyJzaWQiOiJ4In0.AAAA")
}

fn denied_text(destination: &str, host: &str) -> String {
    format!(
        "sluice: {destination} is not allowed: not in the allowlist\n  destination: {destination}\n  policy:      lab (level custom)\n  reason:      not in the allowlist\n  hint:        to allow it, add \"{host}\" (or \"{destination}\") to `allow` in a policy with level = \"custom\" (include_defaults = true keeps the default list)\n"
    )
}

fn denied_json(destination: &str, host: &str) -> String {
    format!(
        "{{\"error\":\"not_allowlisted\",\"status\":403,\"message\":\"{destination} is not allowed: not in the allowlist\",\"policy\":\"lab\",\"level\":\"custom\",\"hint\":\"to allow it, add \\\"{host}\\\" (or \\\"{destination}\\\") to `allow` in a policy with level = \\\"custom\\\" (include_defaults = true keeps the default list)\",\"destination\":\"{destination}\",\"reason\":\"not in the allowlist\",\"rule\":null}}\n"
    )
}

fn missing_text() -> String {
    format!("sluice: proxy authentication failed: this proxy requires credentials\n  hint:        {AUTH_HINT}\n")
}

fn forged_text() -> String {
    format!(
        "sluice: proxy authentication failed: credential signature does not verify (forged, altered, or signed with another key)\n  hint:        {AUTH_HINT}\n"
    )
}

fn missing_json() -> String {
    format!(
        "{{\"error\":\"auth_missing\",\"status\":407,\"message\":\"proxy authentication failed: this proxy requires credentials\",\"policy\":null,\"level\":null,\"hint\":\"{AUTH_HINT}\"}}\n"
    )
}

const RATE_TEXT: &str = "sluice: session over its rate limit (0.5 requests per second, burst 1); retry in 2s\n  policy:      slow (level custom)\n  hint:        a policy author raises it with requests_per_second and burst in the policy's [limits]\n";
const TUNNELS_TEXT: &str = "sluice: session already has 1 open tunnel, the most it may have at once\n  policy:      one (level custom)\n  hint:        close idle connections, or raise max_tunnels in the policy's [limits]\n";
const DNS_TEXT: &str = "sluice: DNS has no address for nowhere.test\n  policy:      lab (level custom)\n";
const NO_PORT_TEXT: &str =
    "sluice: bad CONNECT target \"echo.test\": missing port: expected host:port\n  policy:      lab (level custom)\n";

/// A CONNECT refusal that does not depend on the session's history: (what, request, expected answer on
/// the direct path). Through hyper the same answer comes with `connection: close` (a refused CONNECT
/// there always closes) and a `date`.
fn connect_refusals(lab: &Lab) -> Vec<(&'static str, String, Answer)> {
    let echo = lab.echo_target();
    let good = authorization(&auth("s-lab", "lab"));
    let s407 = "HTTP/1.1 407 Proxy Authentication Required";
    vec![
        (
            "407 without credentials",
            connect(&echo, ""),
            golden(s407, &[TEXT, "x-sluice-decision: deny; reason=auth_missing", CHALLENGE], false, &missing_text()),
        ),
        (
            "407 without credentials, JSON",
            connect(&echo, "Accept: application/json\r\n"),
            golden(s407, &[JSON, "x-sluice-decision: deny; reason=auth_missing", CHALLENGE], false, &missing_json()),
        ),
        (
            "407 with a forged credential",
            connect(&echo, &authorization(&forged("s-lab"))),
            golden(
                s407,
                &[TEXT, "x-sluice-decision: deny; reason=auth_bad_signature", CHALLENGE],
                false,
                &forged_text(),
            ),
        ),
        (
            "403 policy deny",
            connect("example.org:443", &good),
            golden(
                "HTTP/1.1 403 Forbidden",
                &[TEXT, "x-sluice-decision: deny; reason=not_allowlisted; policy=lab", CLOSE],
                false,
                &denied_text("example.org:443", "example.org"),
            ),
        ),
        (
            "403 policy deny, JSON",
            connect("example.org:443", &format!("{good}Accept: application/json\r\n")),
            golden(
                "HTTP/1.1 403 Forbidden",
                &[JSON, "x-sluice-decision: deny; reason=not_allowlisted; policy=lab", CLOSE],
                false,
                &denied_json("example.org:443", "example.org"),
            ),
        ),
        (
            "502 DNS failure",
            connect("nowhere.test:443", &good),
            golden(
                "HTTP/1.1 502 Bad Gateway",
                &[TEXT, "x-sluice-decision: deny; reason=dns_no_such_host; policy=lab", CLOSE],
                false,
                DNS_TEXT,
            ),
        ),
        (
            "400 target without a port",
            connect("echo.test", &good),
            golden(
                "HTTP/1.1 400 Bad Request",
                &[TEXT, "x-sluice-decision: deny; reason=bad_request; policy=lab", CLOSE],
                false,
                NO_PORT_TEXT,
            ),
        ),
    ]
}

/// The hyper path's version of a direct-path answer.
fn through_hyper(direct: &Answer) -> Answer {
    let mut headers = direct.headers.clone();
    if !headers.iter().any(|h| h == CLOSE) {
        headers.insert(headers.len() - 1, CLOSE.into());
    }
    Answer { status: direct.status.clone(), headers, date: true, body: direct.body.clone() }
}

/// A connection's first CONNECT, refused without hyper: exact bytes; a 407 keeps the connection (the
/// client may answer the challenge), every other refusal closes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_refusals_on_a_connection_s_first_request() {
    let lab = Lab::start("answers", KEY, "", false).await;
    for (what, request, want) in connect_refusals(&lab) {
        let mut c = lab.fresh().await;
        let got = Lab::ask(&mut c, &request).await;
        // The date is issue 14's (see `direct_connect_refusals_carry_a_date`): compared there only.
        assert_eq!(Answer { date: false, ..got }, want, "{what}");
        if want.status.starts_with("HTTP/1.1 407") {
            lab.still_served(&mut c).await;
        } else {
            assert!(c.expect_eof().await, "{what}: the connection closes cleanly");
        }
    }
    assert_eq!(lab.echo.connections(), 0, "a refused CONNECT reached the upstream");
}

/// A CONNECT after a plain-HTTP request on the same connection, refused through hyper: the same status
/// and body as the direct path, plus `date`, and the connection always closes (even after a 407).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_refusals_after_a_plain_request_on_the_connection() {
    let lab = Lab::start("answers", KEY, "", false).await;
    for (what, request, direct) in connect_refusals(&lab) {
        let mut c = lab.after_plain(&auth("s-prefix", "lab")).await;
        let got = Lab::ask(&mut c, &request).await;
        assert_eq!(got, through_hyper(&direct), "{what}");
        assert!(c.expect_eof().await, "{what}: the connection closes cleanly");
    }
    assert_eq!(lab.echo.connections(), 0, "a refused CONNECT reached the upstream");
}

/// An allowed CONNECT's `200`: bare on the direct path; through hyper, with hyper's `date`. The tunnel
/// starts right after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_connect_answers() {
    let lab = Lab::start("answers", KEY, "", false).await;
    let a = auth("s-lab", "lab");
    let request = connect(&lab.echo_target(), &authorization(&a));
    let mut c = lab.fresh().await;
    c.send(request.as_bytes()).await;
    assert_eq!(c.response_bytes().await.expect("a 200"), b"HTTP/1.1 200 OK\r\n\r\n");
    c.send(b"ping").await;
    assert_eq!(c.read_exact(4).await, b"ping");
    let mut c = lab.after_plain(&a).await;
    let got = Lab::ask(&mut c, &request).await;
    assert_eq!(got, golden("HTTP/1.1 200 OK", &[], true, "").without_length());
    c.send(b"pong").await;
    assert_eq!(c.read_exact(4).await, b"pong");
}

/// An HTTP/1.0 CONNECT is answered in HTTP/1.0 and closed, on the direct path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_1_0_connect_refusal() {
    let lab = Lab::start("answers", KEY, "", false).await;
    let mut c = lab.fresh().await;
    let got = Lab::ask(&mut c, &format!("CONNECT {} HTTP/1.0\r\n\r\n", lab.echo_target())).await;
    let want = golden(
        "HTTP/1.0 407 Proxy Authentication Required",
        &[TEXT, "x-sluice-decision: deny; reason=auth_missing", CHALLENGE, CLOSE],
        false,
        &missing_text(),
    );
    assert_eq!(Answer { date: false, ..got }, want);
    assert!(c.expect_eof().await);
}

/// Rate limits: a session past its burst gets 429 + Retry-After on a CONNECT (both paths) and on a plain
/// request (which keeps the connection); past max_tunnels, 429 + Retry-After: 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_answers() {
    let lab = Lab::start("answers", KEY, "", false).await;
    let rate = |date: bool, close: bool| {
        let mut headers = vec![TEXT, "x-sluice-decision: deny; reason=rate_limited; policy=slow", "retry-after: 2"];
        if close {
            headers.push(CLOSE);
        }
        golden("HTTP/1.1 429 Too Many Requests", &headers, date, RATE_TEXT)
    };
    let connect_echo = |a: &str| connect(&lab.echo_target(), &authorization(a));

    // Direct path: the burst was spent on another connection.
    let a = auth("s-rate-direct", "slow");
    let mut spend = lab.fresh().await;
    assert_eq!(Lab::ask(&mut spend, &lab.get(&a)).await.status, "HTTP/1.1 200 OK");
    let mut c = lab.fresh().await;
    let got = Lab::ask(&mut c, &connect_echo(&a)).await;
    assert_eq!(Answer { date: false, ..got }, rate(false, true), "direct CONNECT");
    assert!(c.expect_eof().await);

    // Through hyper: the burst was spent on this connection's plain request.
    let a = auth("s-rate-hyper", "slow");
    let mut c = lab.after_plain(&a).await;
    assert_eq!(Lab::ask(&mut c, &connect_echo(&a)).await, rate(true, true), "CONNECT through hyper");
    assert!(c.expect_eof().await);

    // Plain HTTP: refused, and the connection stays.
    let a = auth("s-rate-plain", "slow");
    let mut c = lab.after_plain(&a).await;
    assert_eq!(Lab::ask(&mut c, &lab.get(&a)).await, rate(true, false), "plain request");
    lab.still_served(&mut c).await;

    // max_tunnels = 1 with one tunnel open.
    let tunnels = |date: bool| {
        golden(
            "HTTP/1.1 429 Too Many Requests",
            &[TEXT, "x-sluice-decision: deny; reason=too_many_tunnels; policy=one", "retry-after: 1", CLOSE],
            date,
            TUNNELS_TEXT,
        )
    };
    let a = auth("s-tunnels", "one");
    let mut open = lab.fresh().await;
    assert_eq!(
        Lab::ask(&mut open, &connect_echo(&a)).await,
        golden("HTTP/1.1 200 OK", &[], false, "").without_length()
    );
    let mut c = lab.fresh().await;
    let got = Lab::ask(&mut c, &connect_echo(&a)).await;
    assert_eq!(Answer { date: false, ..got }, tunnels(false), "direct CONNECT over max_tunnels");
    assert!(c.expect_eof().await);
    let mut c = lab.after_plain(&a).await;
    assert_eq!(Lab::ask(&mut c, &connect_echo(&a)).await, tunnels(true), "CONNECT through hyper over max_tunnels");
    assert!(c.expect_eof().await);
    assert_eq!(lab.echo.connections(), 1, "only the one allowed tunnel reached the upstream");
}

/// Plain-HTTP refusals come through hyper (with `date`) and, except for a malformed request, keep the
/// connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_refusals() {
    let lab = Lab::start("answers", KEY, "", false).await;
    let good = authorization(&auth("s-lab", "lab"));
    let get = |url: &str, host: &str, extra: &str| format!("GET {url} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n");
    let s407 = "HTTP/1.1 407 Proxy Authentication Required";
    let p = lab.plain.port();
    let plain = format!("http://plain.test:{p}/x");
    let plain_host = format!("plain.test:{p}");
    let cases = [
        (
            "407 without credentials",
            get(&plain, &plain_host, ""),
            golden(s407, &[TEXT, "x-sluice-decision: deny; reason=auth_missing", CHALLENGE], true, &missing_text()),
        ),
        (
            "407 with a forged credential",
            get(&plain, &plain_host, &authorization(&forged("s-lab"))),
            golden(
                s407,
                &[TEXT, "x-sluice-decision: deny; reason=auth_bad_signature", CHALLENGE],
                true,
                &forged_text(),
            ),
        ),
        (
            "403 policy deny",
            get("http://example.org/", "example.org", &good),
            golden(
                "HTTP/1.1 403 Forbidden",
                &[TEXT, "x-sluice-decision: deny; reason=not_allowlisted; policy=lab"],
                true,
                &denied_text("example.org:80", "example.org"),
            ),
        ),
        (
            "403 policy deny, JSON",
            get("http://example.org/", "example.org", &format!("{good}Accept: application/json\r\n")),
            golden(
                "HTTP/1.1 403 Forbidden",
                &[JSON, "x-sluice-decision: deny; reason=not_allowlisted; policy=lab"],
                true,
                &denied_json("example.org:80", "example.org"),
            ),
        ),
        (
            "502 DNS failure",
            get("http://nowhere.test/", "nowhere.test", &good),
            golden(
                "HTTP/1.1 502 Bad Gateway",
                &[TEXT, "x-sluice-decision: deny; reason=dns_no_such_host; policy=lab"],
                true,
                DNS_TEXT,
            ),
        ),
    ];
    for first in [true, false] {
        for (what, request, want) in &cases {
            let mut c = if first { lab.fresh().await } else { lab.after_plain(&auth("s-prefix", "lab")).await };
            assert_eq!(&Lab::ask(&mut c, request).await, want, "{what} (first request: {first})");
            lab.still_served(&mut c).await;
        }
        // An origin-form request is malformed for a proxy: 400, and the connection closes.
        let mut c = if first { lab.fresh().await } else { lab.after_plain(&auth("s-prefix", "lab")).await };
        let got = Lab::ask(&mut c, &format!("GET /x HTTP/1.1\r\nHost: {plain_host}\r\n{good}\r\n")).await;
        let want = golden(
            "HTTP/1.1 400 Bad Request",
            &[TEXT, "x-sluice-decision: deny; reason=bad_request; policy=lab", CLOSE],
            true,
            "sluice: this is a proxy: send absolute-form requests (GET http://host/path) or CONNECT host:port\n  policy:      lab (level custom)\n",
        );
        assert_eq!(got, want, "origin-form (first request: {first})");
        assert!(c.expect_eof().await);
    }
    // Only what was served reached the upstream: 5 follow-ups in the first round; 5 prefixes, 5
    // follow-ups and the origin-form case's prefix in the second.
    assert_eq!(lab.plain.connections(), 16, "a refused request reached the upstream");
}

/// What the head guard refuses before a request is read, as a connection's first request and after a
/// served one: exact answers (through hyper, no session named), then the close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_guard_refusals() {
    let lab = Lab::start("answers", KEY, "", false).await;
    let p = lab.plain.port();
    let echo = lab.echo_target();
    let refusal = |status: &str, code: &str, message: &str| {
        golden(
            status,
            &[TEXT, &format!("x-sluice-decision: deny; reason={code}"), CLOSE],
            true,
            &format!("sluice: {message}\n"),
        )
    };
    let bad = "HTTP/1.1 400 Bad Request";
    let cases = [
        (
            "malformed head",
            format!("CONNECT {echo} HTTP/1.1\r\nBad Header\r\n\r\n"),
            refusal(bad, "bad_request", "malformed request head: invalid header name"),
        ),
        (
            "CONNECT with a body",
            format!("CONNECT {echo} HTTP/1.1\r\nHost: {echo}\r\nContent-Length: 5\r\n\r\nhello"),
            refusal(bad, "bad_request", "CONNECT takes no body: send no Content-Length or Transfer-Encoding"),
        ),
        (
            "Content-Length with Transfer-Encoding",
            format!(
                "POST http://plain.test:{p}/sha256 HTTP/1.1\r\nHost: plain.test:{p}\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            ),
            refusal(bad, "bad_request", "request has both Content-Length and Transfer-Encoding; send one"),
        ),
        (
            // Issue 14, hole 5: a bare-LF head ends where httparse ends it, and is refused, so the
            // CL+TE request behind it is never read as a head of its own.
            "bare LF, then a CL+TE request",
            format!(
                "GET http://plain.test:{p}/ HTTP/1.1\nHost: plain.test:{p}\n\nPOST http://plain.test:{p}/sha256 HTTP/1.1\r\nHost: plain.test:{p}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            ),
            refusal(bad, "bad_request", "request head has a line ending in a bare LF; lines must end with CRLF"),
        ),
        (
            "bare LF, then a second Proxy-Authorization",
            format!(
                "CONNECT {echo} HTTP/1.1\nHost: {echo}\n\nCONNECT {echo} HTTP/1.1\r\nProxy-Authorization: Basic a\r\nProxy-Authorization: Basic b\r\n\r\n"
            ),
            refusal(bad, "bad_request", "request head has a line ending in a bare LF; lines must end with CRLF"),
        ),
        (
            "an underscore framing header",
            format!(
                "GET http://plain.test:{p}/ HTTP/1.1\r\nHost: plain.test:{p}\r\nTransfer_Encoding: chunked\r\n\r\n"
            ),
            refusal(
                bad,
                "bad_request",
                "header name \"Transfer_Encoding\" has an underscore where \"transfer-encoding\" has a hyphen; servers may read it as \"transfer-encoding\", so it is refused",
            ),
        ),
        (
            "head too large",
            format!("GET http://plain.test:{p}/ HTTP/1.1\r\nX-Big: {}\r\n\r\n", "a".repeat(40_000)),
            refusal(
                "HTTP/1.1 431 Request Header Fields Too Large",
                "head_too_large",
                "request head is over 32768 bytes",
            ),
        ),
    ];
    for first in [true, false] {
        for (what, request, want) in &cases {
            let mut c = if first { lab.fresh().await } else { lab.after_plain(&auth("s-prefix", "lab")).await };
            assert_eq!(&Lab::ask(&mut c, request).await, want, "{what} (first request: {first})");
            assert!(c.expect_eof().await, "{what} (first request: {first}): the connection closes cleanly");
        }
    }
    assert_eq!(lab.echo.connections(), 0);
    // Only the served requests that set up the "after a served one" cases reached the plain upstream.
    assert_eq!(lab.plain.connections(), cases.len());
}

/// A head not complete within `[egress] header_timeout`: 408, as a first request and after a served one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_timeout_answer() {
    let lab = Lab::start("answers", KEY, "header_timeout = \"1s\"", false).await;
    let partial = format!("GET http://plain.test:{}/ HTTP/1.1\r\nHost: pl", lab.plain.port());
    let want = golden(
        "HTTP/1.1 408 Request Timeout",
        &[TEXT, "x-sluice-decision: deny; reason=head_timeout", CLOSE],
        true,
        "sluice: request head not complete within 1s\n",
    );
    let run = |first: bool| {
        let (lab, partial) = (&lab, &partial);
        async move {
            let mut c = if first { lab.fresh().await } else { lab.after_plain(&auth("s-prefix", "lab")).await };
            let got = Lab::ask(&mut c, partial).await;
            assert!(c.expect_eof().await, "first request: {first}");
            got
        }
    };
    let (first, later) =
        within(Duration::from_secs(10), "two 408s", async { tokio::join!(run(true), run(false)) }).await;
    assert_eq!(first, want, "as the first request");
    assert_eq!(later, want, "after a served request");
}

/// Issue 14: the direct path's refusals carry no `date`, unlike every answer that comes through hyper.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_connect_refusals_carry_a_date() {
    let lab = Lab::start("answers", KEY, "", false).await;
    for (what, request, _) in connect_refusals(&lab) {
        let mut c = lab.fresh().await;
        assert!(Lab::ask(&mut c, &request).await.date, "{what}: no date header on the direct path");
    }
}

/// Over `max_connections`, both listeners answer 503 before reading anything, and close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overloaded_answers_on_both_listeners() {
    // One accept thread: with several, each has an accept queue of its own, and the second connection
    // can be accepted before the first takes the slot.
    let proxy =
        Proxy::start("[egress]\nmax_connections = 1\n[git]\nmax_connections = 1\n[server]\nthreads = 1\n", &[]).await;
    for (addr, listener) in [(proxy.addr, "proxy"), (proxy.git, "git proxy")] {
        // Accepted first, so it holds the one slot; the next connection is refused before it sends a byte.
        let _held = RawClient::connect(addr).await;
        let mut c = RawClient::connect(addr).await;
        let bytes = c.response_bytes().await.expect("a 503");
        let body = format!("sluice: the {listener} is at its connection limit (1 connection); retry shortly\n");
        // Rendered like every other refusal, `date` (of this answer) last.
        let want = format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\nx-sluice-decision: deny; reason=overloaded\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\ndate: ",
            body.len()
        );
        let text = String::from_utf8_lossy(&bytes);
        let (head, rest) = text.split_at(want.len().min(text.len()));
        assert_eq!(head, want, "{listener}");
        let (date, got_body) = rest.split_once("\r\n\r\n").expect("a head");
        assert!(date.ends_with(" GMT") && date.len() == 29, "{listener}: {date:?}");
        assert_eq!(got_body, body, "{listener}");
        assert!(c.expect_eof().await, "{listener}");
    }
}

// ---------------------------------------------------------------------------------------------
// The git listener.

const GIT_KEY: &[u8] = KEY;
const REPO: &str = "acme/widgets";
const BRANCH: &str = "feature";
const Z40: &str = "0000000000000000000000000000000000000000";
const A40: &str = "1111111111111111111111111111111111111111";

fn git_auth(sid: &str, repo: &str) -> String {
    lab::git_auth(GIT_KEY, sid, repo, BRANCH)
}

/// sluice whose git upstream is a recording listener: nothing a refusal answers may reach it.
async fn git_lab(upstream: &Recorder) -> Proxy {
    let dir = TempDir::new("answers-git");
    let key = dir.write("key", GIT_KEY);
    let token = dir.write("gh-token", "ghs_answers_real_token");
    let config = format!(
        "[auth]\nkey_file = {:?}\n[git]\nupstream = \"http://{}\"\napi_upstream = \"http://{}\"\ntoken_file = {:?}\n",
        key.display(),
        upstream.addr,
        upstream.addr,
        token.display()
    );
    Proxy::start_in(dir, &config, &[]).await
}

async fn git_ask(proxy: &Proxy, request: &[u8]) -> Answer {
    let mut c = RawClient::connect(proxy.git).await;
    c.send(request).await;
    answer(&c.response_bytes().await.expect("an answer"))
}

fn discovery(repo: &str, extra: &str) -> String {
    format!("GET /{repo}.git/info/refs?service=git-upload-pack HTTP/1.1\r\nHost: git\r\n{extra}\r\n")
}

/// A receive-pack request updating `refs/heads/main` with `capabilities`, and an empty pack.
fn push_to_main(capabilities: &str, extra: &str) -> Vec<u8> {
    let line = format!("{Z40} {A40} refs/heads/main\0{capabilities}\n");
    let mut body = format!("{:04x}{line}0000", line.len() + 4).into_bytes();
    body.extend_from_slice(b"PACK\0\0\0\x02\0\0\0\0");
    let mut request = format!(
        "POST /{REPO}.git/git-receive-pack HTTP/1.1\r\nHost: git\r\nContent-Type: application/x-git-receive-pack-request\r\nContent-Length: {}\r\n{extra}\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(&body);
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn git_refusals() {
    let upstream = Recorder::start().await;
    let proxy = git_lab(&upstream).await;
    let text = "content-type: text/plain; charset=utf-8";
    let good = format!("Authorization: {}\r\n", git_auth("s-git", REPO));

    let got = git_ask(&proxy, discovery(REPO, "").as_bytes()).await;
    let want = golden(
        "HTTP/1.1 401 Unauthorized",
        &[text, "www-authenticate: Basic realm=\"sluice-git\""],
        true,
        "sluice: credentials required: use http://SESSION:CREDENTIAL@HOST/OWNER/REPO.git as the remote URL or a credential helper\n",
    );
    assert_eq!(got, want, "401 challenge");

    let got = git_ask(&proxy, discovery("acme/other", &good).as_bytes()).await;
    let want = golden(
        "HTTP/1.1 403 Forbidden",
        &[text],
        true,
        "sluice: git credential refused: it is for acme/widgets, not acme/other; ask for a credential for acme/other\n",
    );
    assert_eq!(got, want, "403 wrong repository");

    let got = git_ask(&proxy, discovery(REPO, &format!("Authorization: {}\r\n", forged("s-git"))).as_bytes()).await;
    let want = golden(
        "HTTP/1.1 403 Forbidden",
        &[text],
        true,
        "sluice: git credential refused: credential signature does not verify (forged, altered, or signed with another key)\n",
    );
    assert_eq!(got, want, "403 forged credential");

    let got = git_ask(&proxy, b"GET /nothing HTTP/1.1\r\nHost: git\r\n\r\n").await;
    let want = golden(
        "HTTP/1.1 404 Not Found",
        &[text],
        true,
        "sluice: no git route for GET \"/nothing\"; expected GET /OWNER/REPO.git/info/refs?service=git-upload-pack|git-receive-pack or POST /OWNER/REPO.git/git-upload-pack|git-receive-pack\n",
    );
    assert_eq!(got, want, "404 unknown route");

    // A push to another branch: sluice answers itself, 200 with a report-status `ng` for the ref.
    let result = "content-type: application/x-git-receive-pack-result";
    let got = git_ask(&proxy, &push_to_main("report-status side-band-64k agent=git/2", &good)).await;
    let want = golden(
        "HTTP/1.1 200 OK",
        &[result, "cache-control: no-cache"],
        true,
        "0059\u{2}sluice: this session may push only to refs/heads/feature; nothing was sent upstream\n0054\u{1}000eunpack ok\n003dng refs/heads/main push restricted to refs/heads/feature\n00000000",
    );
    assert_eq!(got, want, "refused push, side-band");
    let got = git_ask(&proxy, &push_to_main("report-status", &good)).await;
    let want = golden(
        "HTTP/1.1 200 OK",
        &[result, "cache-control: no-cache"],
        true,
        "000eunpack ok\n003dng refs/heads/main push restricted to refs/heads/feature\n0000",
    );
    assert_eq!(got, want, "refused push, no side-band");

    // `/api`: GitHub-shaped JSON.
    let json = "content-type: application/json; charset=utf-8";
    let got = git_ask(
        &proxy,
        format!("GET /api/repos/{REPO}/actions/secrets HTTP/1.1\r\nHost: git\r\n{good}\r\n").as_bytes(),
    )
    .await;
    let want = golden(
        "HTTP/1.1 403 Forbidden",
        &[json, "x-sluice-decision: deny; reason=api_never_forwarded"],
        true,
        "{\"message\":\"sluice: GET \\\"/api/repos/acme/widgets/actions/secrets\\\": a repository's secrets are never forwarded, not even for reading (secrets, variables, keys, hooks, invitations, environments, collaborators and deployments stay with the operator); allowed: reads (GET, HEAD) under /api/repos/OWNER/REPO of the repository; issues with their comments, events, labels and timeline; pull requests with their files, commits, reviews, review comments and requested reviewers; commits with their statuses, check runs and check suites; compare; contents and readme; git trees, blobs, refs, commits and tags; branches; releases and tags; labels and milestones; Actions workflows, runs, jobs and logs; writes POST …/pulls, PATCH …/pulls/N, POST …/pulls/N/comments, POST …/pulls/N/comments/ID/replies, POST …/pulls/N/reviews, POST …/issues/N/comments\",\"documentation_url\":\"https://docs.github.com/rest/pulls/pulls\"}",
    );
    assert_eq!(got, want, "/api route refused");
    let got = git_ask(&proxy, format!("GET /api/repos/{REPO}/pulls HTTP/1.1\r\nHost: git\r\n\r\n").as_bytes()).await;
    let want = golden(
        "HTTP/1.1 401 Unauthorized",
        &[json, "x-sluice-decision: deny; reason=api_auth_missing"],
        true,
        "{\"message\":\"sluice: Requires authentication: send the session's git credential as \\\"Authorization: Bearer CREDENTIAL\\\"\",\"documentation_url\":\"https://docs.github.com/rest/pulls/pulls\"}",
    );
    assert_eq!(got, want, "/api without credentials");

    assert_eq!(upstream.connections(), 0, "a refused git request reached the upstream");
}
