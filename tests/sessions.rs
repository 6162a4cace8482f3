//! Per-session limits end to end: a burst beyond the quota gets exactly its 429s and recovers, another
//! session at the same time gets none, and `max_tunnels` holds with tunnels open concurrently.

mod support;

use std::time::Duration;

use sluice::credential::now_unix;
use support::*;

const KEY: &[u8] = b"sessions-test-signing-key-0123456789abcdef";

/// A fresh credential for `sid` under `policy`, as a `Proxy-Authorization` value.
fn auth_for(sid: &str, policy: &str) -> String {
    let now = now_unix();
    basic(sid, &egress_token(KEY, sid, policy, now, now + 600))
}

/// A policy allowing `host` with the given `[limits]`, reaching loopback through its own allow_ips.
fn limited(name: &str, host: &str, limits: &str) -> String {
    format!(
        "version = 1\nname = \"{name}\"\nlevel = \"custom\"\nallow = [{host:?}]\nallow_ips = [\"127.0.0.0/8\"]\n[limits]\n{limits}\n"
    )
}

async fn start(policies: &[(&str, &str)]) -> Proxy {
    let dir = TempDir::new("sessions");
    let key = dir.write("key", KEY);
    let config = format!(
        "[egress]\npolicy = \"none\"\n[auth]\nanonymous = false\nkey_file = {:?}\n[resolver]\nhosts = {{ \"plain.test\" = [\"127.0.0.1\"] }}\n",
        key.display()
    );
    Proxy::start_in(dir, &config, policies).await
}

fn get(port: u16, auth: &str) -> Vec<u8> {
    format!("GET http://plain.test:{port}/bytes/2 HTTP/1.1\r\nHost: plain.test:{port}\r\nProxy-Authorization: {auth}\r\n\r\n")
        .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_gets_exactly_its_429s_recovers_and_spares_other_sessions() {
    let upstream = Upstream::plain("plain").await;
    let port = upstream.port();
    // One request per two seconds, burst 5: eight quick requests are five passes and three refusals.
    let policy = limited("slow", &format!("plain.test:{port}"), "requests_per_second = 0.5\nburst = 5");
    let proxy = start(&[("slow.toml", &policy)]).await;
    let (a, b) = (auth_for("flood", "slow"), auth_for("quiet", "slow"));

    let mut flood = RawClient::connect(proxy.addr).await;
    let mut quiet = RawClient::connect(proxy.addr).await;
    let mut statuses = Vec::new();
    let mut quiet_statuses = Vec::new();
    let mut retry_after = None;
    for i in 0..8 {
        flood.send(&get(port, &a)).await;
        let r = flood.response().await.expect("a response");
        if r.status_line.contains("429") {
            retry_after = r.header("retry-after").map(str::to_string);
            assert_eq!(r.header("x-sluice-decision"), Some("deny; reason=rate_limited; policy=slow"));
            assert!(
                r.body.starts_with("sluice: session over its rate limit (0.5 requests per second, burst 5); retry in "),
                "{}",
                r.body
            );
        }
        statuses.push(r.status_line);
        if i % 2 == 0 {
            quiet.send(&get(port, &b)).await;
            quiet_statuses.push(quiet.response().await.expect("a response").status_line);
        }
    }
    let refused = statuses.iter().filter(|s| s.as_str() == "HTTP/1.1 429 Too Many Requests").count();
    let served = statuses.iter().filter(|s| s.as_str() == "HTTP/1.1 200 OK").count();
    assert_eq!((served, refused), (5, 3), "{statuses:?}");
    assert_eq!(quiet_statuses, vec!["HTTP/1.1 200 OK"; 4], "the other session must not be limited");
    let wait: u64 = retry_after.expect("Retry-After on a 429").parse().expect("whole seconds");
    assert!((1..=2).contains(&wait), "Retry-After {wait}");

    tokio::time::sleep(Duration::from_secs(wait)).await;
    flood.send(&get(port, &a)).await;
    assert_eq!(
        flood.response().await.expect("a response").status_line,
        "HTTP/1.1 200 OK",
        "recovers after Retry-After"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_tunnels_holds_with_tunnels_open() {
    let echo = Recorder::start().await;
    let port = echo.port();
    let policy = limited("two", &format!("plain.test:{port}"), "max_tunnels = 2");
    let proxy = start(&[("two.toml", &policy)]).await;
    let auth = auth_for("tunnels", "two");
    let connect =
        format!("CONNECT plain.test:{port} HTTP/1.1\r\nHost: plain.test:{port}\r\nProxy-Authorization: {auth}\r\n\r\n");

    let mut open = Vec::new();
    for _ in 0..2 {
        let mut c = RawClient::connect(proxy.addr).await;
        c.send(connect.as_bytes()).await;
        assert_eq!(c.response().await.expect("a response").status_line, "HTTP/1.1 200 OK");
        c.send(b"ping").await;
        assert_eq!(c.read_exact(4).await, b"ping");
        open.push(c);
    }
    let r = raw_exchange(proxy.addr, connect.as_bytes()).await;
    assert_eq!(r.status_line, "HTTP/1.1 429 Too Many Requests");
    assert_eq!(r.header("x-sluice-decision"), Some("deny; reason=too_many_tunnels; policy=two"));
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(
        r.body,
        "sluice: session already has 2 open tunnels, the most it may have at once\n  policy:      two (level custom)\n  hint:        close idle connections, or raise max_tunnels in the policy's [limits]\n"
    );
    assert_eq!(echo.connections(), 2, "the refused tunnel never reached upstream");

    // Closing one frees its slot.
    let closed = open.pop().expect("a tunnel");
    drop(closed);
    let mut freed = false;
    for _ in 0..50 {
        let mut c = RawClient::connect(proxy.addr).await;
        c.send(connect.as_bytes()).await;
        if c.response().await.expect("a response").status_line == "HTTP/1.1 200 OK" {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(freed, "the slot of a closed tunnel was never freed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_minted_under_the_previous_key_works_during_rotation() {
    let upstream = Upstream::plain("plain").await;
    let port = upstream.port();
    const OLD: &[u8] = b"the-previous-signing-key-0123456789abcdef";
    const NEW: &[u8] = b"the-current-signing-key-0123456789abcdef!";
    const OTHER: &[u8] = b"somebody-elses-signing-key-0123456789abcd";
    let dir = TempDir::new("rotation");
    let (new, old) = (dir.write("key", NEW), dir.write("key.old", OLD));
    let config = format!(
        "[egress]\npolicy = \"none\"\n[auth]\nanonymous = false\nkey_file = {:?}\nprevious_key_file = {:?}\n[resolver]\nhosts = {{ \"plain.test\" = [\"127.0.0.1\"] }}\n",
        new.display(),
        old.display()
    );
    let policy = limited("app", &format!("plain.test:{port}"), "");
    let proxy = Proxy::start_in(dir, &config, &[("app.toml", &policy)]).await;
    let auth = |key: &[u8]| {
        let now = now_unix();
        basic("rot", &egress_token(key, "rot", "app", now, now + 600))
    };
    for (key, status) in
        [(NEW, "HTTP/1.1 200 OK"), (OLD, "HTTP/1.1 200 OK"), (OTHER, "HTTP/1.1 407 Proxy Authentication Required")]
    {
        let r = raw_exchange(proxy.addr, &get(port, &auth(key))).await;
        assert_eq!(r.status_line, status);
    }
    assert_eq!(upstream.connections(), 2);
}
