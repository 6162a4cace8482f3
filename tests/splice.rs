//! Bulk tunnels really splice (Linux): `sluice_splice_pipes_total` on `/metrics` counts the pipes that
//! carried bytes, so a tunnel that silently fell back to copying fails here. The counter is process-wide,
//! which is why this file holds one test: nothing else in this binary opens tunnels meanwhile.

mod support;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Well past the 256 KiB after which a direction switches to splice.
const BULK: usize = 4 << 20;

async fn pipes(proxy: &Proxy) -> u64 {
    let r = raw_exchange(proxy.admin, b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").await;
    let line = r.body.lines().find(|l| l.starts_with("sluice_splice_pipes_total ")).expect("the pipe counter");
    line["sluice_splice_pipes_total ".len()..].parse().expect("a count")
}

/// Sends `data` through an open tunnel to the echo upstream while reading the echo; then half-closes
/// and waits for the tunnel's EOF.
async fn echo_through(c: &mut RawClient, data: &[u8]) {
    let (mut r, mut w) = c.stream.split();
    let writer = async {
        w.write_all(data).await.expect("write");
        w.shutdown().await.expect("shutdown write");
    };
    let reader = async {
        let mut got = Vec::with_capacity(data.len());
        r.read_to_end(&mut got).await.expect("read");
        got
    };
    let ((), got) = within(STEP, "echo through the tunnel", async { tokio::join!(writer, reader) }).await;
    assert!(got == data, "the echo came back with {} bytes, not the {} sent", got.len(), data.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_tunnels_splice_and_small_ones_do_not() {
    let echo = Recorder::start().await;
    let plain = Upstream::plain("plain").await;
    let policy = format!(
        "version = 1\nname = \"lab\"\nlevel = \"custom\"\nallow = [\"echo.test:{}\", \"plain.test:{}\"]\nallow_ips = [\"127.0.0.0/8\"]\n",
        echo.port(),
        plain.port()
    );
    let config = "[egress]\npolicy = \"lab\"\n[resolver]\nhosts = { \"echo.test\" = [\"127.0.0.1\"], \"plain.test\" = [\"127.0.0.1\"] }\n";
    let proxy = Proxy::start(config, &[("lab.toml", &policy)]).await;
    let connect = format!("CONNECT echo.test:{0} HTTP/1.1\r\nHost: echo.test:{0}\r\n\r\n", echo.port());
    let bulk: Vec<u8> = (0..BULK).map(|i| (i % 251) as u8).collect();
    let start = pipes(&proxy).await;

    // A small exchange never takes a pipe.
    let mut c = RawClient::connect(proxy.addr).await;
    c.send(connect.as_bytes()).await;
    assert_eq!(c.response().await.expect("a 200").status_line, "HTTP/1.1 200 OK");
    echo_through(&mut c, b"a small request").await;
    assert_eq!(pipes(&proxy).await, start, "a 15-byte tunnel used a pipe");

    // A bulk exchange on a connection's first CONNECT: each direction splices.
    let mut c = RawClient::connect(proxy.addr).await;
    c.send(connect.as_bytes()).await;
    assert_eq!(c.response().await.expect("a 200").status_line, "HTTP/1.1 200 OK");
    echo_through(&mut c, &bulk).await;
    let after_direct = pipes(&proxy).await;
    if cfg!(target_os = "linux") {
        assert!(after_direct >= start + 2, "a 4 MiB echo used {} pipes, not one per direction", after_direct - start);
    } else {
        assert_eq!(after_direct, start, "no splice off Linux");
    }

    // And on a CONNECT through hyper (after a plain request): hyper hands the socket back, so it splices too.
    let mut c = RawClient::connect(proxy.addr).await;
    let p = plain.port();
    c.send(format!("GET http://plain.test:{p}/x HTTP/1.1\r\nHost: plain.test:{p}\r\n\r\n").as_bytes()).await;
    assert_eq!(c.response().await.expect("a forwarded answer").body, "hello from plain /x\n");
    c.send(connect.as_bytes()).await;
    assert_eq!(c.response().await.expect("a 200").status_line, "HTTP/1.1 200 OK");
    echo_through(&mut c, &bulk).await;
    let after_hyper = pipes(&proxy).await;
    if cfg!(target_os = "linux") {
        assert!(
            after_hyper >= after_direct + 2,
            "a 4 MiB echo through hyper used {} pipes",
            after_hyper - after_direct
        );
    } else {
        assert_eq!(after_hyper, start, "no splice off Linux");
    }
    assert_eq!(echo.connections(), 3);
}
