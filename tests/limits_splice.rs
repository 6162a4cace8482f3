//! Shaping keeps the zero-copy path (Linux): a session with a bandwidth limit still splices its bulk
//! directions (each splice capped by its grant), and an unlimited session splices as before. Counted with
//! `sluice_splice_pipes_total`, which is process-wide: this file holds one test so nothing else in this
//! binary opens tunnels meanwhile.

mod support;

use std::time::{Duration, Instant};

use sluice::credential::now_unix;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const KEY: &[u8] = b"limits-splice-test-key-0123456789abcdefgh";
const BULK: usize = 8 << 20;

async fn pipes(proxy: &Proxy) -> u64 {
    let r = raw_exchange(proxy.admin, b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").await;
    let line = r.body.lines().find(|l| l.starts_with("sluice_splice_pipes_total ")).expect("the pipe counter");
    line["sluice_splice_pipes_total ".len()..].parse().expect("a count")
}

/// Echoes `BULK` bytes through a new tunnel of session `sid` under `policy`: how long it took.
async fn echo_through(proxy: &Proxy, port: u16, sid: &str, policy: &str) -> Duration {
    let now = now_unix();
    let auth = basic(sid, &egress_token(KEY, sid, policy, now, now + 600));
    let mut c = RawClient::connect(proxy.addr).await;
    c.send(
        format!("CONNECT echo.test:{port} HTTP/1.1\r\nHost: echo.test:{port}\r\nProxy-Authorization: {auth}\r\n\r\n")
            .as_bytes(),
    )
    .await;
    assert_eq!(c.response().await.expect("a 200").status_line, "HTTP/1.1 200 OK");
    let data: Vec<u8> = (0..BULK).map(|i| (i % 251) as u8).collect();
    let start = Instant::now();
    let (mut r, mut w) = c.stream.split();
    let writer = async {
        w.write_all(&data).await.expect("write");
        w.shutdown().await.expect("shutdown write");
    };
    let reader = async {
        let mut got = Vec::with_capacity(BULK);
        r.read_to_end(&mut got).await.expect("read");
        got
    };
    let ((), got) = within(STEP, "echo through the tunnel", async { tokio::join!(writer, reader) }).await;
    assert!(got == data, "the echo came back with {} bytes, not the {} sent", got.len(), data.len());
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shaped_and_unlimited_sessions_both_splice() {
    let echo = Recorder::start().await;
    let policy = |name: &str, limits: &str| {
        format!(
            "version = 1\nname = \"{name}\"\nlevel = \"custom\"\nallow = [\"echo.test:{}\"]\nallow_ips = [\"127.0.0.0/8\"]\n[limits]\n{limits}\n",
            echo.port()
        )
    };
    let dir = TempDir::new("limits-splice");
    let key = dir.write("key", KEY);
    let config = format!(
        "[egress]\npolicy = \"none\"\n[auth]\nanonymous = false\nkey_file = {:?}\n[resolver]\nhosts = {{ \"echo.test\" = [\"127.0.0.1\"] }}\n",
        key.display()
    );
    let (open, shaped) = (
        policy("open", ""),
        policy("shaped", "upload_bytes_per_second = \"16MiB\"\ndownload_bytes_per_second = \"16MiB\""),
    );
    let proxy = Proxy::start_in(dir, &config, &[("open.toml", &open), ("shaped.toml", &shaped)]).await;

    let start = pipes(&proxy).await;
    echo_through(&proxy, echo.port(), "free", "open").await;
    let after_open = pipes(&proxy).await;
    // 8 MiB each way at 16 MiB/s is half a second at least (less the 100 ms of credit).
    let took = echo_through(&proxy, echo.port(), "metered", "shaped").await;
    let after_shaped = pipes(&proxy).await;
    assert!(took >= Duration::from_millis(350), "8 MiB at 16 MiB/s took {took:?}");
    if cfg!(target_os = "linux") {
        assert!(after_open >= start + 2, "an unlimited 8 MiB echo used {} pipes", after_open - start);
        // Both directions are shaped, so each pipe is a shaped direction's.
        assert!(after_shaped >= after_open + 2, "a shaped 8 MiB echo used {} pipes", after_shaped - after_open);
    } else {
        assert_eq!(after_shaped, start, "no splice off Linux");
    }
}
