//! Byte quotas end to end (SPEC §10): a session that spends its `upload_quota` has its open tunnels
//! closed (`end = quota_exceeded`, bytes counted as they move, so the destination gets exactly the quota),
//! its next CONNECT and plain-HTTP request answered `429 quota_exceeded` with `Retry-After` = the window's
//! end and a body naming the quota, and `/v1/denials` lists it; another session is unaffected.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::Value;
use sluice::credential::now_unix;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const KEY: &[u8] = b"quota-test-signing-key-0123456789abcdefgh";
const MIB: usize = 1 << 20;

fn auth_for(sid: &str, policy: &str) -> String {
    let now = now_unix();
    basic(sid, &egress_token(KEY, sid, policy, now, now + 600))
}

/// An upstream that reads and counts every byte of every connection, answering nothing.
async fn sink() -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind sink");
    let port = listener.local_addr().expect("sink address").port();
    let total = Arc::new(AtomicUsize::new(0));
    let counted = total.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(Ok(n)) = tokio::time::timeout(STEP, s.read(&mut buf)).await {
                    if n == 0 {
                        break;
                    }
                    counted.fetch_add(n, Ordering::SeqCst);
                }
            });
        }
    });
    (port, total)
}

fn connect(host: &str, port: u16, auth: &str) -> Vec<u8> {
    format!("CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\nProxy-Authorization: {auth}\r\n\r\n").into_bytes()
}

async fn admin_get(proxy: &Proxy, path: &str) -> String {
    let request = format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
    raw_exchange(proxy.admin, request.as_bytes()).await.body
}

/// Seconds from now to the end of the current hour: an hourly quota's `Retry-After`.
fn to_next_hour() -> u64 {
    let now = now_unix();
    3600 - now % 3600
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spending_the_upload_quota_closes_the_sessions_tunnels_and_refuses_its_next_requests() {
    let (sink_port, received) = sink().await;
    let echo = Recorder::start().await;
    let plain = Upstream::plain("plain").await;
    let ports = [sink_port, echo.port(), plain.port()];
    let policy = format!(
        "version = 1\nname = \"metered\"\nlevel = \"custom\"\nallow = [\"sink.test\", \"echo.test\", \"plain.test\"]\nports = {ports:?}\nallow_ips = [\"127.0.0.0/8\"]\n[limits]\nupload_quota = \"1MiB/hour\"\n"
    );
    let dir = TempDir::new("quota");
    let key = dir.write("key", KEY);
    let config = format!(
        "[egress]\npolicy = \"none\"\n[auth]\nanonymous = false\nkey_file = {:?}\n[resolver]\nhosts = {{ \"sink.test\" = [\"127.0.0.1\"], \"echo.test\" = [\"127.0.0.1\"], \"plain.test\" = [\"127.0.0.1\"] }}\n",
        key.display()
    );
    let proxy = Proxy::start_recorded(dir, &config, &[("metered.toml", &policy)]).await;
    let (spender, bystander) = (auth_for("spender", "metered"), auth_for("bystander", "metered"));

    // A quiet tunnel of the spending session, open before the quota goes.
    let mut quiet = RawClient::connect(proxy.addr).await;
    quiet.send(&connect("echo.test", echo.port(), &spender)).await;
    assert_eq!(quiet.response().await.expect("a response").status_line, "HTTP/1.1 200 OK");
    quiet.send(b"ping").await;
    assert_eq!(quiet.read_exact(4).await, b"ping");

    // Two MiB up through another tunnel: the quota ends it after exactly one.
    let mut bulk = RawClient::connect(proxy.addr).await;
    bulk.send(&connect("sink.test", sink_port, &spender)).await;
    assert_eq!(bulk.response().await.expect("a response").status_line, "HTTP/1.1 200 OK");
    let data = vec![0x42_u8; 2 * MIB];
    // The write may fail once the proxy closes; what matters is what reached the destination.
    let _ = within(STEP, "upload", bulk.stream.write_all(&data)).await;
    let mut rest = Vec::new();
    let _ = within(STEP, "the tunnel closing", bulk.stream.read_to_end(&mut rest)).await;
    assert!(rest.is_empty(), "the sink answers nothing");
    // The quiet tunnel is closed too (within the half-second poll).
    within(Duration::from_secs(5), "the quiet tunnel closing", quiet.expect_eof()).await;
    // The echo got 4 bytes of the quota; the sink the rest of the MiB, and not a byte more.
    let sunk = within(STEP, "the sink counting", async {
        loop {
            let n = received.load(Ordering::SeqCst);
            if n >= MIB - 4 {
                tokio::time::sleep(Duration::from_millis(200)).await;
                return received.load(Ordering::SeqCst);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(sunk, MIB - 4, "bytes past the quota reached the destination");

    // The next CONNECT: 429 quota_exceeded, retry at the hour, a body naming the quota; no dial.
    let before = echo.connections();
    let expected_retry = to_next_hour();
    let r = raw_exchange(proxy.addr, &connect("echo.test", echo.port(), &spender)).await;
    assert_eq!(r.status_line, "HTTP/1.1 429 Too Many Requests");
    assert_eq!(r.header("x-sluice-decision"), Some("deny; reason=quota_exceeded; policy=metered"));
    let retry: u64 = r.header("retry-after").and_then(|v| v.parse().ok()).expect("a Retry-After");
    assert!(retry.abs_diff(expected_retry) <= 2, "Retry-After {retry}, the hour ends in {expected_retry}s");
    assert!(
        r.body.contains("session's upload quota of 1MiB/hour is spent: 1MiB used in this window; it resets at "),
        "{}",
        r.body
    );
    assert!(r.body.contains(" GMT (in "), "{}", r.body);
    assert!(r.body.contains("raise upload_quota in the policy's [limits]"), "{}", r.body);
    assert_eq!(echo.connections(), before, "a refused CONNECT dialled its destination");

    // A plain-HTTP request of the session is refused the same way, before it reaches the upstream.
    let p = plain.port();
    let get = format!(
        "GET http://plain.test:{p}/x HTTP/1.1\r\nHost: plain.test:{p}\r\nProxy-Authorization: {spender}\r\n\r\n"
    );
    let r = raw_exchange(proxy.addr, get.as_bytes()).await;
    assert_eq!(r.status_line, "HTTP/1.1 429 Too Many Requests");
    assert_eq!(r.header("x-sluice-decision"), Some("deny; reason=quota_exceeded; policy=metered"));
    assert_eq!(plain.connections(), 0);

    // Another session of the same policy has its own quota.
    let mut other = RawClient::connect(proxy.addr).await;
    other.send(&connect("echo.test", echo.port(), &bystander)).await;
    assert_eq!(other.response().await.expect("a response").status_line, "HTTP/1.1 200 OK");
    other.send(b"still here").await;
    assert_eq!(other.read_exact(10).await, b"still here");
    drop(other);

    // `/v1/denials` lists the closed tunnels and the refusals; `/metrics` counts them.
    let denials: Value = serde_json::from_str(&admin_get(&proxy, "/v1/denials?session=spender").await).expect("json");
    let reasons: Vec<&str> =
        denials["denials"].as_array().expect("a list").iter().filter_map(|d| d["reason"].as_str()).collect();
    assert_eq!(reasons, ["quota_exceeded"; 4], "{denials}");
    let metrics = admin_get(&proxy, "/metrics").await;
    assert!(metrics.contains("sluice_limit_refusals_total{limit=\"quota_exceeded\"} 2\n"), "{metrics}");
    assert!(metrics.contains("sluice_quota_closed_tunnels_total 2\n"), "{metrics}");

    // Both tunnels' closing records say why they ended.
    let closed: Vec<Value> = proxy
        .records()
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["event"] == "tunnel_closed" && v["session"] == "spender")
        .collect();
    let ends: Vec<&str> = closed.iter().filter_map(|v| v["end"].as_str()).collect();
    assert_eq!(ends, ["quota_exceeded", "quota_exceeded"], "{closed:?}");
    let up: u64 = closed.iter().filter_map(|v| v["bytes_up"].as_u64()).sum();
    assert_eq!(up, MIB as u64, "the session's tunnels moved exactly its quota up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_upload_that_spends_the_quota_is_refused_and_so_is_the_next_request() {
    let plain = Upstream::plain("plain").await;
    let p = plain.port();
    let policy = format!(
        "version = 1\nname = \"metered\"\nlevel = \"custom\"\nallow = [\"plain.test:{p}\"]\nallow_ips = [\"127.0.0.0/8\"]\n[limits]\nupload_quota = \"1MiB/hour\"\n"
    );
    let dir = TempDir::new("quota-http");
    let key = dir.write("key", KEY);
    let config = format!(
        "[egress]\npolicy = \"none\"\n[auth]\nanonymous = false\nkey_file = {:?}\n[resolver]\nhosts = {{ \"plain.test\" = [\"127.0.0.1\"] }}\n",
        key.display()
    );
    let proxy = Proxy::start_in(dir, &config, &[("metered.toml", &policy)]).await;
    let auth = auth_for("poster", "metered");
    let post = |len: usize| {
        format!(
            "POST http://plain.test:{p}/sha256 HTTP/1.1\r\nHost: plain.test:{p}\r\nProxy-Authorization: {auth}\r\nContent-Length: {len}\r\n\r\n"
        )
    };

    // Half the quota goes through whole.
    let mut c = RawClient::connect(proxy.addr).await;
    c.send(post(MIB / 2).as_bytes()).await;
    c.send(&vec![7u8; MIB / 2]).await;
    let r = c.response().await.expect("a response");
    assert_eq!(r.status_line, "HTTP/1.1 200 OK");
    assert!(r.body.ends_with(&format!(" bytes={}\n", MIB / 2)), "{}", r.body);

    // A MiB more runs out half-way: the exchange is answered 429 quota_exceeded.
    let mut c = RawClient::connect(proxy.addr).await;
    c.send(post(MIB).as_bytes()).await;
    let _ = within(STEP, "the upload", c.stream.write_all(&vec![7u8; MIB])).await;
    let r = c.response().await.expect("a response");
    assert_eq!(r.status_line, "HTTP/1.1 429 Too Many Requests", "{}", r.body);
    assert!(r.body.contains("upload quota of 1MiB/hour is spent"), "{}", r.body);

    // And the next request is refused before it is forwarded.
    let connections = plain.connections();
    let r = raw_exchange(proxy.addr, post(0).as_bytes()).await;
    assert_eq!(r.status_line, "HTTP/1.1 429 Too Many Requests");
    assert_eq!(r.header("x-sluice-decision"), Some("deny; reason=quota_exceeded; policy=metered"));
    assert_eq!(plain.connections(), connections);
}
