//! Reaching a destination: the proxy's own listeners in every spelling (a dual-stack admin listener
//! included), and Happy Eyeballs across a name's addresses. Loopback only.

mod support;

use std::net::{Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

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
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(recorder.connections(), 1);
}

/// A listener that greets every connection with the address it was reached at, and counts them.
struct Greeter {
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Greeter {
    fn start(listener: TcpListener) -> Greeter {
        let accepted = Arc::new(AtomicUsize::new(0));
        let a = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let me = stream.local_addr().map(|a| a.ip().to_string()).unwrap_or_default();
                    let _ = stream.write_all(format!("hello from {me}\n").as_bytes()).await;
                    let mut rest = Vec::new();
                    let _ = tokio::time::timeout(STEP, stream.read_to_end(&mut rest)).await;
                });
            }
        });
        Greeter { accepted, task }
    }

    fn connections(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Greeter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A listener whose accept queue is full and never drained: a connect to it hangs (the kernel drops
/// the SYN). Loopback only. Holds the listener and the connections that fill it.
struct Hanging {
    _listener: TcpListener,
    _fillers: Vec<TcpStream>,
}

impl Hanging {
    async fn bind(addr: SocketAddr) -> Option<Hanging> {
        let socket = if addr.is_ipv4() { TcpSocket::new_v4().ok()? } else { TcpSocket::new_v6().ok()? };
        socket.bind(addr).ok()?;
        let listener = socket.listen(1).ok()?;
        let mut fillers = Vec::new();
        for _ in 0..16 {
            match tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await {
                Ok(Ok(s)) => fillers.push(s),
                Ok(Err(_)) => return None,
                Err(_) => return Some(Hanging { _listener: listener, _fillers: fillers }),
            }
        }
        None
    }
}

/// One port on several loopback addresses: a greeter on 127.0.0.4 and ::1, a hanging listener on
/// 127.0.0.3, nothing on 127.0.0.5 (refused). Retries (bounded) if another test holds the port.
struct Lineup {
    port: u16,
    v4: Greeter,
    v6: Greeter,
    _hanging: Hanging,
}

async fn lineup() -> Lineup {
    for _ in 0..20 {
        let Ok(first) = TcpListener::bind("127.0.0.4:0").await else { continue };
        let Ok(port) = first.local_addr().map(|a| a.port()) else { continue };
        let Ok(v6) = TcpListener::bind(SocketAddr::from((Ipv6Addr::LOCALHOST, port))).await else { continue };
        let Some(hanging) = Hanging::bind(SocketAddr::from(([127, 0, 0, 3], port))).await else { continue };
        if TcpListener::bind(SocketAddr::from(([127, 0, 0, 5], port))).await.is_err() {
            continue; // something listens there: it would not refuse
        }
        return Lineup { port, v4: Greeter::start(first), v6: Greeter::start(v6), _hanging: hanging };
    }
    panic!("no port free on 127.0.0.3, 127.0.0.4, 127.0.0.5 and ::1 after 20 tries");
}

/// The proxy, with names that map to the lineup's addresses in the given orders.
async fn eyeballs_proxy(hosts: &[(&str, &[&str])]) -> Proxy {
    let hosts: Vec<String> = hosts.iter().map(|(h, a)| format!("{h:?} = {a:?}")).collect();
    let config = format!(
        "[egress]\npolicy = \"open\"\nconnect_timeout = \"10s\"\n[resolver]\nhosts = {{ {} }}\n",
        hosts.join(", ")
    );
    Proxy::start(&config, &[("open.toml", OPEN)]).await
}

/// CONNECTs to `authority` and returns the status line, the greeting and how long the answer took.
async fn tunnel_greeting(proxy: &Proxy, authority: &str) -> (String, String, Duration) {
    let started = Instant::now();
    let mut c = RawClient::connect(proxy.addr).await;
    c.send(format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes()).await;
    let r = c.response().await.expect("a response");
    let took = started.elapsed();
    if r.status_line != "HTTP/1.1 200 OK" {
        return (r.status_line, r.body, took);
    }
    let mut greeting = Vec::new();
    while !greeting.ends_with(b"\n") && greeting.len() < 100 {
        greeting.extend(c.read_exact(1).await);
    }
    (r.status_line, String::from_utf8_lossy(&greeting).into_owned(), took)
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The first address hangs: the second is dialled one attempt delay (250 ms) later and wins, well
/// within the connect timeout; nothing waits for the hanging one to time out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_first_address_is_overtaken_by_the_next() {
    let l = lineup().await;
    let proxy = eyeballs_proxy(&[("slow.test", &["127.0.0.3", "127.0.0.4"])]).await;
    let (status, greeting, took) = tunnel_greeting(&proxy, &format!("slow.test:{}", l.port)).await;
    assert_eq!((status.as_str(), greeting.as_str()), ("HTTP/1.1 200 OK", "hello from 127.0.0.4\n"));
    assert!(took >= Duration::from_millis(250) && took < CONNECT_TIMEOUT, "{took:?}");
    assert_eq!((l.v4.connections(), l.v6.connections()), (1, 0));
}

/// The first address refuses: the second is dialled at once and wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_first_address_falls_through_to_the_next() {
    let l = lineup().await;
    let proxy = eyeballs_proxy(&[("gone.test", &["127.0.0.5", "127.0.0.4"])]).await;
    let (status, greeting, took) = tunnel_greeting(&proxy, &format!("gone.test:{}", l.port)).await;
    assert_eq!((status.as_str(), greeting.as_str()), ("HTTP/1.1 200 OK", "hello from 127.0.0.4\n"));
    assert!(took < CONNECT_TIMEOUT, "{took:?}");
}

/// IPv6 is dialled first whatever the answer's order; it connects at once, so IPv4 is never tried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_is_dialled_first() {
    let l = lineup().await;
    let proxy = eyeballs_proxy(&[("both.test", &["127.0.0.4", "::1"])]).await;
    let (status, greeting, _) = tunnel_greeting(&proxy, &format!("both.test:{}", l.port)).await;
    assert_eq!((status.as_str(), greeting.as_str()), ("HTTP/1.1 200 OK", "hello from ::1\n"));
    assert_eq!((l.v4.connections(), l.v6.connections()), (0, 1));
}

/// Every address is classified before the first dial: a refused one anywhere in the answer refuses
/// the name, and the live address before it is never dialled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_attempt_starts_before_every_address_is_checked() {
    let l = lineup().await;
    let proxy = eyeballs_proxy(&[("mixed.test", &["::1", "127.0.0.4", "10.0.0.1"])]).await;
    let (status, body, _) = tunnel_greeting(&proxy, &format!("mixed.test:{}", l.port)).await;
    assert_eq!(status, "HTTP/1.1 403 Forbidden", "{body}");
    assert!(body.contains("10.0.0.1"), "{body}");
    assert_eq!(upstream_dials(&proxy).await, 0);
    assert_eq!((l.v4.connections(), l.v6.connections()), (0, 0));
}
