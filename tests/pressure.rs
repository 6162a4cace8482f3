//! Behaviour under pressure, with bounded counts: thousands of idle connections do not stop normal
//! traffic, a client that stops reading does not grow sluice's memory, and an upstream that resets
//! mid-tunnel is counted without disturbing another tunnel.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn config(names: &[&str]) -> String {
    let hosts: Vec<String> = names.iter().map(|n| format!("{n:?} = [\"127.0.0.1\"]")).collect();
    format!("[egress]\npolicy = \"lab\"\n[resolver]\nhosts = {{ {} }}\n", hosts.join(", "))
}

fn lab() -> String {
    "version = 1\nname = \"lab\"\nlevel = \"full\"\nallow_ips = [\"127.0.0.0/8\"]\n".to_string()
}

/// Lets this process hold `n` more descriptors (client and proxy ends of every connection).
fn raise_fd_limit(n: u64) {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed by pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < n {
            lim.rlim_cur = n.min(lim.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

async fn connect_tunnel(proxy: &Proxy, authority: &str) -> RawClient {
    let mut c = RawClient::connect(proxy.addr).await;
    c.send(format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes()).await;
    let r = c.response().await.expect("a response");
    assert_eq!(r.status_line, "HTTP/1.1 200 OK", "{r:#?}");
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_idle_connections_then_normal_traffic_is_served() {
    const IDLE: usize = 5_000;
    raise_fd_limit(4 * IDLE as u64 + 1024);
    let echo = Recorder::start().await;
    let proxy = Proxy::start(&config(&["echo.test"]), &[("lab.toml", &lab())]).await;
    let started = Instant::now();
    let mut idle = Vec::with_capacity(IDLE);
    for _ in 0..IDLE {
        idle.push(
            within(Duration::from_secs(10), "idle connect", TcpStream::connect(proxy.addr)).await.expect("connect"),
        );
    }
    assert!(started.elapsed() < Duration::from_secs(60), "opening {IDLE} connections took {:?}", started.elapsed());
    // Half of them send a partial head and stall there.
    for s in idle.iter_mut().step_by(2) {
        s.write_all(b"GET http://echo.test/ HTTP/1.1\r\nHo").await.expect("partial head");
    }

    let mut c = connect_tunnel(&proxy, &format!("echo.test:{}", echo.port())).await;
    c.send(b"still served").await;
    assert_eq!(c.read_exact(12).await, b"still served");
    let r = raw_exchange(proxy.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(r.status_line, "HTTP/1.1 400 Bad Request");
    drop(idle);
}

#[path = "support/child.rs"]
mod child;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_does_not_grow_memory() {
    // An upstream that writes as fast as it is allowed to, counting what the proxy accepted.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let accepted = Arc::new(AtomicU64::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        let Ok((mut s, _)) = listener.accept().await else { return };
        let chunk = vec![7u8; 64 * 1024];
        // Bounded: at most 1 GiB, far more than any buffer between here and the client.
        for _ in 0..16 * 1024 {
            if s.write_all(&chunk).await.is_err() {
                return;
            }
            counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
    });
    // sluice as a child process, so the RSS measured is its own (tests here run in parallel).
    let dir = TempDir::new("stalled");
    dir.write("policies/lab.toml", lab());
    let config = config(&["source.test"])
        .replace("[egress]\n", "[egress]\nlisten = \"127.0.0.1:0\"\n")
        .replace("[resolver]\n", "[resolver]\nsystem = false\n")
        + "[git]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n";
    let sluice = child::Sluice::start(dir.path(), &config);
    let before = sluice.rss_kib();
    let mut client = RawClient::connect(sluice.egress).await;
    let authority = format!("source.test:{port}");
    client.send(format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes()).await;
    assert_eq!(client.response().await.expect("a response").status_line, "HTTP/1.1 200 OK");
    // The client reads nothing more. Wait until the upstream is blocked (its count stops moving).
    let mut last = 0;
    let mut stalled = 0;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = accepted.load(Ordering::Relaxed);
        stalled = if now == last { stalled + 1 } else { 0 };
        last = now;
        if stalled >= 6 {
            break;
        }
    }
    assert!(stalled >= 6, "the upstream was never blocked: {last} bytes accepted and counting");
    // What is in flight is what the kernel buffers and the tunnel's buffer hold: a few MiB at most.
    assert!(last < 64 * 1024 * 1024, "the proxy accepted {last} bytes for a client that reads nothing");
    let grown = sluice.rss_kib().saturating_sub(before);
    assert!(grown < 8 * 1024, "sluice's RSS grew by {grown} KiB for one stalled tunnel");
    drop(client);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_reset_mid_tunnel_is_counted_and_disturbs_nothing_else() {
    // One upstream resets its connection after the first bytes; an echo upstream serves the other tunnel.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let reset_port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        let Ok((mut s, _)) = listener.accept().await else { return };
        let mut buf = [0u8; 5];
        let _ = s.read_exact(&mut buf).await;
        let _ = s.write_all(b"bye").await;
        // SO_LINGER 0 turns the close into a reset.
        let _ = s.set_zero_linger();
        drop(s);
    });
    let echo = Recorder::start().await;
    let proxy = Proxy::start(&config(&["reset.test", "echo.test"]), &[("lab.toml", &lab())]).await;
    let mut steady = connect_tunnel(&proxy, &format!("echo.test:{}", echo.port())).await;
    let mut doomed = connect_tunnel(&proxy, &format!("reset.test:{reset_port}")).await;
    doomed.send(b"hello").await;
    assert_eq!(doomed.read_exact(3).await, b"bye");
    // The doomed tunnel ends: sluice closes the client's side cleanly (the reset is upstream's alone).
    assert!(doomed.expect_eof().await, "the client's side of a reset tunnel must end in a clean EOF");

    // The other tunnel is untouched.
    steady.send(b"ping").await;
    assert_eq!(steady.read_exact(4).await, b"ping");

    // The reset is counted (bounded wait for the tunnel task to finish).
    let mut counted = false;
    for _ in 0..50 {
        let text = admin_get(&proxy, "/metrics").await;
        if text.lines().any(|l| l == "sluice_upstream_resets_total 1") {
            counted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(counted, "the upstream reset was not counted:\n{}", admin_get(&proxy, "/metrics").await);
}

async fn admin_get(proxy: &Proxy, path: &str) -> String {
    let r = raw_exchange(
        proxy.admin,
        format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    r.body
}
