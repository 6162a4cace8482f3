//! Reaching a destination: the proxy's own listeners in every spelling (a dual-stack admin listener
//! included), and Happy Eyeballs across a name's addresses. Loopback only.

mod support;

use std::net::SocketAddr;

use support::*;

/// `open` is level full and lets every loopback address through the guard, so only the own-address
/// check stands between a sandbox and the proxy's listeners.
const OPEN: &str = "version = 1\nname = \"open\"\nlevel = \"full\"\nallow_ips = [\"127.0.0.0/8\", \"::1/128\"]\n";

/// Dials the proxy has made so far, from its own `/metrics` (fetched directly, not through it).
async fn upstream_dials(proxy: &Proxy) -> u64 {
    let admin = SocketAddr::from(([127, 0, 0, 1], proxy.admin.port()));
    let r = raw_exchange(admin, b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").await;
    assert_eq!(r.status_line, "HTTP/1.1 200 OK");
    let line = r.body.lines().find_map(|l| l.strip_prefix("sluice_upstream_connect_seconds_count "));
    match line.map(str::parse) {
        Some(Ok(n)) => n,
        _ => panic!("no connect count in /metrics:\n{}", r.body),
    }
}

/// Hole 4: an admin listener on `[::]` (dual-stack) is reached by 127.0.0.1 and every other local
/// IPv4 address in every spelling. Each is refused as the proxy's own address, before any dial.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dual_stack_admin_listener_is_the_proxys_own_address_in_every_spelling() {
    let proxy = Proxy::start_with_admin_on(
        "[::]:0".parse().expect("address"),
        "[egress]\npolicy = \"open\"\n",
        &[("open.toml", OPEN)],
    )
    .await;
    assert!(proxy.admin.ip().is_unspecified() && proxy.admin.is_ipv6(), "{}", proxy.admin);
    let a = proxy.admin.port();
    let e = proxy.addr.port();
    let get =
        |authority: String, path: &str| format!("GET http://{authority}{path} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
    let connect = |authority: String| format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
    let cases = [
        (get(format!("127.0.0.1:{a}"), "/metrics"), format!("127.0.0.1:{a}")),
        (get(format!("[::ffff:127.0.0.1]:{a}"), "/metrics"), format!("::ffff:127.0.0.1:{a}")),
        (get(format!("[::ffff:7f00:1]:{a}"), "/v1/denials?session=victim"), format!("::ffff:127.0.0.1:{a}")),
        (get(format!("127.0.0.2:{a}"), "/v1/denials?session=victim"), format!("127.0.0.2:{a}")),
        (get(format!("[::1]:{a}"), "/metrics"), format!("::1:{a}")),
        (get(format!("2130706433:{a}"), "/metrics"), format!("127.0.0.1:{a}")),
        (connect(format!("127.0.0.1:{a}")), format!("127.0.0.1:{a}")),
        (connect(format!("[::ffff:127.0.0.1]:{a}")), format!("::ffff:127.0.0.1:{a}")),
        (connect(format!("[::1]:{a}")), format!("::1:{a}")),
        // The egress listener itself (127.0.0.1), spelled as IPv6.
        (connect(format!("[::ffff:127.0.0.1]:{e}")), format!("::ffff:127.0.0.1:{e}")),
    ];
    for (request, named) in &cases {
        let r = raw_exchange(proxy.addr, request.as_bytes()).await;
        assert_eq!(r.status_line, "HTTP/1.1 403 Forbidden", "{request:?}\n{r:#?}");
        let decision = r.header("x-sluice-decision").unwrap_or_default();
        assert!(decision.starts_with("deny; reason=own_address"), "{request:?}: {decision:?}");
        assert!(r.body.contains(&format!("{named} is this proxy's own listening address")), "{request:?}\n{}", r.body);
        assert!(!r.body.contains("sluice_"), "{request:?}: the admin answer leaked\n{}", r.body);
    }
    // curl, as a sandbox would use it: plain HTTP and a tunnel (-p).
    let out = curl(&["-x", &proxy.url(), &format!("http://127.0.0.1:{a}/metrics")], STEP).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains(&format!("127.0.0.1:{a} is this proxy's own listening address")), "{out:?}");
    let out = curl(&["-x", &proxy.url(), "-p", &format!("http://[::ffff:127.0.0.1]:{a}/metrics")], STEP).await;
    assert_eq!(out.code, Some(56), "curl reports the refused CONNECT: {out:?}");
    assert!(out.stderr.contains("403"), "{out:?}");
    assert!(!out.stdout.contains("sluice_"), "{out:?}");

    assert_eq!(upstream_dials(&proxy).await, 0, "the proxy dialled nothing: its own listeners saw no connection");
    // The control case: the same policy reaches a loopback listener that is not the proxy's, and the
    // count above counts such dials.
    let recorder = Recorder::start().await;
    let r = raw_exchange(proxy.addr, connect(format!("127.0.0.1:{}", recorder.port())).as_bytes()).await;
    assert_eq!(r.status_line, "HTTP/1.1 200 OK");
    assert_eq!(upstream_dials(&proxy).await, 1);
    for _ in 0..200 {
        if recorder.connections() > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(recorder.connections(), 1);
}
