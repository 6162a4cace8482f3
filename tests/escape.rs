//! A sandboxed program that wants out: every trick in this file must be refused with its exact status
//! and reason, and the recording upstream must see no connection at all.

mod support;

use support::*;

/// `strict` allows `allowed.test`, `*.wild.test` and `api-*.glob.test` on the recorder's port, and only
/// 127.0.0.1 among addresses: every other loopback address, and every private or metadata one, is
/// refused. All names resolve to loopback, so even a broken guard could only reach this machine.
async fn start(recorder_port: u16) -> Proxy {
    let hosts = [
        ("allowed.test", "[\"127.0.0.2\"]"),
        ("a.wild.test", "[\"127.0.0.2\"]"),
        ("api-x.glob.test", "[\"127.0.0.2\"]"),
        ("bad-first.wild.test", "[\"127.0.0.2\", \"127.0.0.1\"]"),
        ("bad-last.wild.test", "[\"127.0.0.1\", \"127.0.0.2\"]"),
        ("mapped.wild.test", "[\"::ffff:127.0.0.2\"]"),
        ("good.wild.test", "[\"127.0.0.1\"]"),
    ];
    let hosts: Vec<String> = hosts.iter().map(|(h, a)| format!("{h:?} = {a}")).collect();
    let config = format!("[egress]\npolicy = \"strict\"\n[resolver]\nhosts = {{ {} }}\n", hosts.join(", "));
    let p = recorder_port;
    let policy = format!(
        "version = 1\nname = \"strict\"\nlevel = \"custom\"\nallow = [\"allowed.test:{p}\", \"*.wild.test:{p}\", \"api-*.glob.test:{p}\"]\nallow_ips = [\"127.0.0.1/32\"]\n"
    );
    Proxy::start(&config, &[("strict.toml", &policy)]).await
}

fn connect(authority: &str) -> String {
    format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n")
}

/// Sends each request on its own connection and checks the status line and `X-Sluice-Decision` reason.
async fn refused(proxy: &Proxy, cases: &[(String, &str, &str)]) {
    for (request, status, reason) in cases {
        let r = raw_exchange(proxy.addr, request.as_bytes()).await;
        assert_eq!(&r.status_line, status, "{request:?}\n{r:#?}");
        let decision = r.header("x-sluice-decision").unwrap_or_default();
        assert!(decision.starts_with(&format!("deny; reason={reason}")), "{request:?}: {decision:?}\n{}", r.body);
    }
}

const FORBIDDEN: &str = "HTTP/1.1 403 Forbidden";
const BAD: &str = "HTTP/1.1 400 Bad Request";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_case_reaches_the_recorder() {
    let recorder = Recorder::start().await;
    let proxy = start(recorder.port()).await;
    let r = raw_exchange(proxy.addr, connect(&format!("good.wild.test:{}", recorder.port())).as_bytes()).await;
    assert_eq!(r.status_line, "HTTP/1.1 200 OK");
    assert_eq!(recorder.connections(), 1, "the suite's recorder is reachable, so the refusals below mean something");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_matching_tricks() {
    let recorder = Recorder::start().await;
    let p = recorder.port();
    let proxy = start(p).await;
    let c = |h: &str| connect(&format!("{h}:{p}"));
    let cases = vec![
        // Suffix without a dot boundary, apex against a wildcard, allowed name as a prefix.
        (c("evilwild.test"), FORBIDDEN, "not_allowlisted"),
        (c("wild.test"), FORBIDDEN, "not_allowlisted"),
        (c("allowed.test.evil.example"), FORBIDDEN, "not_allowlisted"),
        (c("xallowed.test"), FORBIDDEN, "not_allowlisted"),
        (c("sub.allowed.test"), FORBIDDEN, "not_allowlisted"),
        // A label glob stays in its label.
        (c("api-x.y.glob.test"), FORBIDDEN, "not_allowlisted"),
        (c("x.api-x.glob.test"), FORBIDDEN, "not_allowlisted"),
        // Case, one trailing dot: the same name, so matched — then refused by the guard (127.0.0.2).
        (c("ALLOWED.test"), FORBIDDEN, "blocked_address"),
        (c("allowed.test."), FORBIDDEN, "blocked_address"),
        (c("A.WILD.TEST."), FORBIDDEN, "blocked_address"),
        // A Cyrillic look-alike: raw UTF-8 is not valid in a request line; its punycode form is another
        // name, never the allowed one.
        (c("\u{0430}llowed.test"), BAD, "bad_request"),
        (c("xn--llowed-2nf.test"), FORBIDDEN, "not_allowlisted"),
        // Malformed names.
        (c("allowed.test.."), BAD, "bad_request"),
        (c(".allowed.test"), BAD, "bad_request"),
        (c("allowed..test"), BAD, "bad_request"),
        (c(&format!("{}.wild.test", "a".repeat(64))), BAD, "bad_request"),
        (
            c(&format!("{}.wild.test", ["a".repeat(61), "b".repeat(61), "c".repeat(61), "d".repeat(61)].join("."))),
            BAD,
            "bad_request",
        ),
        (c("allowed%2etest"), BAD, "bad_request"),
        (c("allowed.test%00"), BAD, "bad_request"),
        (c("allowed\\.test"), BAD, "bad_request"),
        (c("evil.example@allowed.test"), BAD, "bad_request"),
        (c("allowed.test@evil.example"), BAD, "bad_request"),
    ];
    refused(&proxy, &cases).await;
    assert_eq!(recorder.connections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn address_literals_in_every_form() {
    let recorder = Recorder::start().await;
    let p = recorder.port();
    let proxy = start(p).await;
    let blocked = [
        "127.0.0.2",
        "127.2",
        "2130706434",
        "0x7f.0.0.2",
        "0177.0.0.2",
        "0x7f000002",
        "017700000002",
        "127.0.0.2.",
        "[::1]",
        "[::ffff:127.0.0.2]",
        "[::ffff:7f00:2]",
        "[::127.0.0.2]",
        "[64:ff9b::7f00:2]",
        "[2002:7f00:2::]",
        "169.254.169.254",
        "0xa9fea9fe",
        "2852039166",
        "[::ffff:169.254.169.254]",
        "[64:ff9b::a9fe:a9fe]",
        "[fe80::1]",
        "10.0.0.1",
        "172.16.0.1",
        "192.168.0.1",
        "100.64.0.1",
        "0.0.0.0",
        "0",
        "[::]",
        "[fd00::1]",
        "[fc00::1]",
        "255.255.255.255",
        "224.0.0.1",
        "[ff02::1]",
        "192.0.2.1",
        "[2001:db8::1]",
        "198.18.0.1",
    ];
    let mut cases: Vec<(String, &str, &str)> =
        blocked.iter().map(|ip| (connect(&format!("{ip}:{p}")), FORBIDDEN, "blocked_address")).collect();
    // Not addresses at all: refused as malformed, never looked up as names.
    for bad in ["127.0.0.256", "0x7g.1", "1.2.3.4.5", "[::1", "[fe80::1%25lo]", "::1"] {
        cases.push((connect(&format!("{bad}:{p}")), BAD, "bad_request"));
    }
    refused(&proxy, &cases).await;
    assert_eq!(recorder.connections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_address_anywhere_in_a_dns_answer_refuses_the_name() {
    let recorder = Recorder::start().await;
    let p = recorder.port();
    let proxy = start(p).await;
    let cases = vec![
        (connect(&format!("bad-first.wild.test:{p}")), FORBIDDEN, "blocked_address"),
        (connect(&format!("bad-last.wild.test:{p}")), FORBIDDEN, "blocked_address"),
        (connect(&format!("mapped.wild.test:{p}")), FORBIDDEN, "blocked_address"),
        (
            format!("GET http://bad-last.wild.test:{p}/ HTTP/1.1\r\nHost: bad-last.wild.test:{p}\r\n\r\n"),
            FORBIDDEN,
            "blocked_address",
        ),
    ];
    refused(&proxy, &cases).await;
    assert_eq!(recorder.connections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_port_tricks() {
    let recorder = Recorder::start().await;
    let p = recorder.port();
    let proxy = start(p).await;
    // 65536 + the allowed port wraps to it in 16 bits; none of these may reach it.
    let wrapped = u32::from(p) + 65536;
    let cases = vec![
        (connect("good.wild.test:0"), BAD, "bad_request"),
        (connect("good.wild.test:65536"), BAD, "bad_request"),
        (connect(&format!("good.wild.test:{wrapped}")), BAD, "bad_request"),
        (connect(&format!("good.wild.test:+{p}")), BAD, "bad_request"),
        (connect(&format!("good.wild.test:-{p}")), BAD, "bad_request"),
        (connect(&format!("good.wild.test:{p}:{p}")), BAD, "bad_request"),
        (connect(&format!("good.wild.test:{p} ")), BAD, "bad_request"),
        (connect("good.wild.test:"), BAD, "bad_request"),
        (connect("good.wild.test"), BAD, "bad_request"),
        (connect(&format!("good.wild.test:0x{p:x}")), BAD, "bad_request"),
        // Allowed host, another port.
        (connect(&format!("good.wild.test:{}", if p == 443 { 444 } else { 443 })), FORBIDDEN, "port_not_allowed"),
    ];
    refused(&proxy, &cases).await;
    assert_eq!(recorder.connections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_header_games_and_smuggling_on_plain_http() {
    let recorder = Recorder::start().await;
    let p = recorder.port();
    let proxy = start(p).await;
    let get = |host_line: &str| format!("GET http://good.wild.test:{p}/ HTTP/1.1\r\n{host_line}\r\n\r\n");
    let post = |headers: &str| {
        format!("POST http://good.wild.test:{p}/ HTTP/1.1\r\nHost: good.wild.test:{p}\r\n{headers}\r\n\r\n0\r\n\r\n")
    };
    let cases = vec![
        (get("Host: 127.0.0.2"), BAD, "bad_request"),
        (get("Host: evil.example"), BAD, "bad_request"),
        (get(&format!("Host: good.wild.test:{p}\r\nHost: evil.example")), BAD, "bad_request"),
        (format!("GET http://169.254.169.254/ HTTP/1.1\r\nHost: good.wild.test:{p}\r\n\r\n"), BAD, "bad_request"),
        (
            "GET http://169.254.169.254/latest/meta-data/ HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n".to_string(),
            FORBIDDEN,
            "blocked_address",
        ),
        (post("Content-Length: 5\r\nTransfer-Encoding: chunked"), BAD, "bad_request"),
        (post("Transfer-Encoding: chunked\r\nContent-Length: 5"), BAD, "bad_request"),
        (post("Transfer-Encoding: chunked\r\nTransfer-Encoding: identity"), BAD, "bad_request"),
        (post("Transfer-Encoding: chunked, identity"), BAD, "bad_request"),
        (post("Transfer-Encoding: xchunked"), BAD, "bad_request"),
        (post("Transfer-Encoding: chunked\r\n foo"), BAD, "bad_request"),
        (post("Content-Length: 1\r\nContent-Length: 1"), BAD, "bad_request"),
        (post("Content-Length: 1, 1"), BAD, "bad_request"),
        (post("Content-Length: -1"), BAD, "bad_request"),
        (post("Content-Length: 0x10"), BAD, "bad_request"),
    ];
    refused(&proxy, &cases).await;
    assert_eq!(recorder.connections(), 0);
}
