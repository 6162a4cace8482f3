//! Many instances, one set of limits: `sluice serve` processes sharing a real `redis-server`, directly and
//! behind a real HAProxy running `deploy/haproxy.cfg`, on loopback. Rates and tunnel caps hold across
//! instances, a killed instance's tunnels stop counting within one lease TTL, and a store that goes away
//! degrades (`on_error = "local"`) or refuses (`"refuse"`) as configured and comes back by itself.
//!
//! `redis-server` and `haproxy` come from Debian (`.ci/run` installs them); a test that cannot find them
//! says so and skips.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[path = "support/child.rs"]
mod child;
use child::Sluice;

const KEY: &[u8] = b"scale-test-signing-key-0123456789abcdef!";

/// Whether `tool` runs here; else the test prints why it skips.
fn have(tool: &str, version_flag: &str) -> bool {
    let ok = Command::new(tool).arg(version_flag).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok();
    if !ok {
        eprintln!("skipping: {tool} is not installed (.ci/run installs it: apt-get install -y redis-server haproxy)");
    }
    ok
}

/// A port that was free a moment ago, for servers that cannot bind port 0 and report it.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A `redis-server` child on loopback, with no persistence: a restart starts empty.
struct Redis {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Redis {
    fn start() -> Redis {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let child = Redis::spawn(port, dir.path());
        let redis = Redis { child, port, dir };
        redis.until_ready();
        redis
    }

    fn spawn(port: u16, dir: &Path) -> Child {
        Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }

    fn until_ready(&self) {
        let start = Instant::now();
        while !self.pings() {
            assert!(start.elapsed() < Duration::from_secs(10), "redis-server did not answer PING on {}", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn pings(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else { return false };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let mut buf = [0u8; 7];
        s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts again on the same port, empty.
    fn restart(&mut self) {
        self.kill();
        self.child = Redis::spawn(self.port, self.dir.path());
        self.until_ready();
    }

    fn signal(&self, sig: &str) {
        let status = Command::new("kill").arg(format!("-{sig}")).arg(self.child.id().to_string()).status().unwrap();
        assert!(status.success());
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        // A server left stopped by a failed test must still go.
        let _ = Command::new("kill").arg("-CONT").arg(self.child.id().to_string()).stderr(Stdio::null()).status();
        self.kill();
    }
}

/// A loopback echo server: each connection echoes until EOF.
fn echo_upstream() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                let mut s = stream;
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    port
}

/// A loopback HTTP server: reads each request's head and `Content-Length` body, answers `200 ok`, closes.
fn sink_upstream() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                let mut s = stream;
                let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
                    if s.read_exact(&mut byte).is_err() {
                        return;
                    }
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                let len: u64 = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                let _ = std::io::copy(&mut (&mut s).take(len), &mut std::io::sink());
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
            });
        }
    });
    port
}

/// A plain-HTTP `POST` of `len` bytes through `proxy`: the response's status and head.
fn upload(proxy: SocketAddr, auth: &str, port: u16, len: usize) -> (u16, String) {
    let mut s = TcpStream::connect(proxy).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "POST http://echo.test:{port}/up HTTP/1.1\r\nHost: echo.test:{port}\r\nProxy-Authorization: {auth}\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    // A refused request may be answered before its body is read; the answer is what counts.
    let _ = s.write_all(&vec![b'u'; len]);
    let mut text = Vec::new();
    let _ = s.read_to_end(&mut text);
    let text = String::from_utf8_lossy(&text).to_string();
    let head = text.split("\r\n\r\n").next().unwrap_or_default().to_string();
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, head)
}

fn auth(sid: &str, policy: &str) -> String {
    use base64::Engine;
    use sluice::credential::{Claims, Keyring, Kind, SigningKey, now_unix};
    let now = now_unix();
    let claims = Claims {
        sid: sid.into(),
        kind: Kind::Egress,
        policy: Some(policy.into()),
        repo: None,
        branch: None,
        iat: now,
        exp: now + 3600,
    };
    let token = Keyring::new(SigningKey::from_bytes(KEY).unwrap(), None).mint(&claims);
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{sid}:{token}")))
}

/// A directory with the signing key and the policies every instance reads: `burst5` (five requests, then
/// one per 100 s) and `two` (two open tunnels).
struct Workspace {
    dir: tempfile::TempDir,
    echo: u16,
    /// A plain-HTTP server that reads each request's body and answers `200`.
    sink: u16,
}

impl Workspace {
    fn new() -> Workspace {
        let echo = echo_upstream();
        let sink = sink_upstream();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("key"), KEY).unwrap();
        let policies = dir.path().join("policies");
        std::fs::create_dir(&policies).unwrap();
        let policy = |name: &str, limits: &str| {
            format!(
                "version = 1\nname = \"{name}\"\nlevel = \"custom\"\nallow = [\"echo.test\"]\nports = [{echo}, {sink}]\nallow_ips = [\"127.0.0.0/8\"]\n[limits]\n{limits}\n"
            )
        };
        std::fs::write(
            policies.join("burst5.toml"),
            policy("burst5", "requests_per_second = 0.01\nburst = 5\nmax_tunnels = 100"),
        )
        .unwrap();
        std::fs::write(
            policies.join("two.toml"),
            policy("two", "requests_per_second = 1000\nburst = 1000\nmax_tunnels = 2"),
        )
        .unwrap();
        std::fs::write(
            policies.join("quota.toml"),
            policy("quota", "requests_per_second = 1000\nburst = 1000\nupload_quota = \"100KiB/hour\""),
        )
        .unwrap();
        Workspace { dir, echo, sink }
    }

    /// A `sluice serve` process in its own directory, with `store` as its `[limits.store]` table.
    fn instance(&self, name: &str, store: &str) -> Sluice {
        let dir = self.dir.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let config = format!(
            r#"
[egress]
listen = "127.0.0.1:0"
policy = "none"
[auth]
anonymous = false
key_file = {key:?}
[policies]
dir = {policies:?}
watch = false
[admin]
listen = "127.0.0.1:0"
[git]
listen = "127.0.0.1:0"
[resolver]
system = false
hosts = {{ "echo.test" = ["127.0.0.1"] }}
[server]
shutdown_grace = "1s"
[limits.store]
{store}
"#,
            key = self.dir.path().join("key"),
            policies = self.dir.path().join("policies"),
        );
        Sluice::start(&dir, &config)
    }
}

/// The store table of every test instance: a one-second lease TTL, and a deadline well above the default 20 ms
/// because these tests share two loaded cores with everything else; a missed deadline would (rightly) fall
/// back to per-instance limits and turn an exact count into a per-instance one.
fn redis_store(redis: &Redis, on_error: &str) -> String {
    format!(
        "kind = \"redis\"\nurl = {:?}\non_error = \"{on_error}\"\nlease_ttl = \"1s\"\ntimeout = \"500ms\"\n",
        redis.url()
    )
}

/// An answer to a CONNECT: its status, its head, and the connection (a tunnel when the status is 200).
struct Reply {
    status: u16,
    head: String,
    stream: TcpStream,
}

impl Reply {
    fn decision(&self) -> Option<&str> {
        self.head.lines().find_map(|l| l.strip_prefix("x-sluice-decision: "))
    }

    /// Bytes go through the tunnel and come back from the echo server.
    fn echoes(&mut self) -> bool {
        let mut buf = [0u8; 4];
        self.stream.write_all(b"ping").is_ok() && self.stream.read_exact(&mut buf).is_ok() && &buf == b"ping"
    }
}

fn connect(proxy: SocketAddr, auth: &str, port: u16) -> Reply {
    let mut stream = TcpStream::connect(proxy).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        stream,
        "CONNECT echo.test:{port} HTTP/1.1\r\nHost: echo.test:{port}\r\nProxy-Authorization: {auth}\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read_exact(&mut byte).is_err() {
            break;
        }
        head.push(byte[0]);
        assert!(head.len() < 8192, "unterminated response head");
    }
    let head = String::from_utf8_lossy(&head).to_string();
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    Reply { status, head, stream }
}

/// `GET path` on an admin listener: the status and the body.
fn admin_get(admin: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(admin).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// One sample's value from `/metrics`.
fn metric(admin: SocketAddr, name: &str) -> Option<u64> {
    let (_, body) = admin_get(admin, "/metrics");
    body.lines().find_map(|l| l.strip_prefix(&format!("{name} "))).and_then(|v| v.trim().parse().ok())
}

/// Polls (bounded) until `/healthz` answers `want`; returns the body.
fn until_health(admin: SocketAddr, want: (u16, &str), limit: Duration) -> String {
    let start = Instant::now();
    loop {
        let (status, body) = admin_get(admin, "/healthz");
        if status == want.0 && body.starts_with(want.1) {
            return body;
        }
        assert!(start.elapsed() < limit, "/healthz still {status} {body:?} after {limit:?}, wanted {want:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// CONNECTs of `auth` alternating over `proxies`, each closed at once: their statuses.
fn alternate(proxies: &[SocketAddr], auth: &str, port: u16, n: usize) -> Vec<u16> {
    (0..n)
        .map(|i| {
            let mut r = connect(proxies[i % proxies.len()], auth, port);
            if r.status == 200 {
                assert!(r.echoes(), "an admitted tunnel carries bytes");
            }
            r.status
        })
        .collect()
}

fn count(statuses: &[u16], status: u16) -> usize {
    statuses.iter().filter(|&&s| s == status).count()
}

#[test]
fn two_instances_share_one_rate_and_one_tunnel_cap() {
    if !have("redis-server", "--version") {
        return;
    }
    let redis = Redis::start();
    let ws = Workspace::new();
    let a = ws.instance("a", &redis_store(&redis, "local"));
    let b = ws.instance("b", &redis_store(&redis, "local"));
    let both = [a.egress, b.egress];

    // Burst 5 across both instances: five passes in all, whichever instance each connection reaches.
    let flood = auth("flood", "burst5");
    let statuses = alternate(&both, &flood, ws.echo, 10);
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429, 429, 429, 429, 429], "{statuses:?}");
    let refused = connect(b.egress, &flood, ws.echo);
    assert_eq!(refused.decision(), Some("deny; reason=rate_limited; policy=burst5"), "{}", refused.head);
    // Another session has its own burst.
    assert_eq!(alternate(&both, &auth("quiet", "burst5"), ws.echo, 4), [200; 4]);

    // max_tunnels = 2 across both: one open on each instance, a third refused on either.
    let two = auth("tunnels", "two");
    let mut first = connect(a.egress, &two, ws.echo);
    let mut second = connect(b.egress, &two, ws.echo);
    assert_eq!((first.status, second.status), (200, 200));
    assert!(first.echoes() && second.echoes());
    for proxy in both {
        let third = connect(proxy, &two, ws.echo);
        assert_eq!(third.status, 429, "{}", third.head);
        assert_eq!(third.decision(), Some("deny; reason=too_many_tunnels; policy=two"));
    }
    // Closing one gives its place back to the session everywhere.
    drop(first);
    let start = Instant::now();
    let mut again = loop {
        let r = connect(b.egress, &two, ws.echo);
        if r.status == 200 {
            break r;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "the closed tunnel's place never came back");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(again.echoes() && second.echoes());
    for admin in [a.admin, b.admin] {
        assert_eq!(metric(admin, "sluice_limit_store_up"), Some(1));
        assert_eq!(metric(admin, "sluice_limit_store_errors_total"), Some(0));
        assert_eq!(admin_get(admin, "/healthz"), (200, "ok\n".into()));
    }
}

/// HAProxy running `deploy/haproxy.cfg`, pointed at `instances` (egress listener, admin listener).
struct Haproxy {
    child: Child,
    egress: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Haproxy {
    fn start(instances: &[(SocketAddr, SocketAddr)], balance: Option<&str>) -> Haproxy {
        let shipped =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/haproxy.cfg")).unwrap();
        let (egress_port, git_port) = (free_port(), free_port());
        let mut cfg = String::new();
        for line in shipped.lines() {
            let trimmed = line.trim_start();
            let line = if trimmed == "bind :3128" {
                format!("    bind 127.0.0.1:{egress_port}")
            } else if trimmed == "bind :3129" {
                format!("    bind 127.0.0.1:{git_port}")
            } else if trimmed.starts_with("log stdout") {
                // The test reads no HAProxy log.
                continue;
            } else if let Some(rest) = trimmed.strip_prefix("server sluice") {
                let n: usize = rest[..1].parse().unwrap();
                let (egress, admin) = instances[n - 1];
                let port = if rest.contains(":3128") { egress.port() } else { free_port() };
                format!("    server sluice{n} 127.0.0.1:{port} port {}", admin.port())
            } else if let (Some(b), true) = (balance, trimmed == "balance hdr(Proxy-Authorization)") {
                format!("    balance {b}")
            } else {
                line.to_string()
            };
            cfg.push_str(&line);
            cfg.push('\n');
        }
        let dir = tempfile::tempdir().unwrap();
        let path: PathBuf = dir.path().join("haproxy.cfg");
        std::fs::write(&path, &cfg).unwrap();
        let check = Command::new("haproxy").arg("-c").arg("-f").arg(&path).output().unwrap();
        assert!(check.status.success(), "{}\n{cfg}", String::from_utf8_lossy(&check.stderr));
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let egress = SocketAddr::from(([127, 0, 0, 1], egress_port));
        let start = Instant::now();
        while TcpStream::connect(egress).is_err() {
            assert!(start.elapsed() < Duration::from_secs(10), "haproxy did not listen on {egress}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Haproxy { child, egress, _dir: dir }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn through_haproxy_limits_hold_whether_sessions_stick_or_spread() {
    if !have("redis-server", "--version") || !have("haproxy", "-v") {
        return;
    }
    let redis = Redis::start();
    let ws = Workspace::new();
    let a = ws.instance("a", &redis_store(&redis, "local"));
    let b = ws.instance("b", &redis_store(&redis, "local"));
    let tunnels = |s: &Sluice| metric(s.admin, "sluice_tunnels_total").unwrap_or(0);

    // The shipped configuration: a session's connections all reach one instance.
    let sticky = Haproxy::start(&[(a.egress, a.admin), (b.egress, b.admin)], None);
    let statuses = alternate(&[sticky.egress], &auth("sticky", "burst5"), ws.echo, 8);
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429, 429, 429], "{statuses:?}");
    let (on_a, on_b) = (tunnels(&a), tunnels(&b));
    assert!((on_a, on_b) == (5, 0) || (on_a, on_b) == (0, 5), "one instance serves the session: {on_a} {on_b}");
    drop(sticky);

    // Spread round-robin, the shared store still holds the session to its burst and its tunnel cap.
    let spread = Haproxy::start(&[(a.egress, a.admin), (b.egress, b.admin)], Some("roundrobin"));
    let statuses = alternate(&[spread.egress], &auth("spread", "burst5"), ws.echo, 8);
    assert_eq!(count(&statuses, 200), 5, "{statuses:?}");
    assert_eq!(count(&statuses, 429), 3, "{statuses:?}");
    assert!(tunnels(&a) > on_a && tunnels(&b) > on_b, "both instances served the spread session");
    for instance in [&a, &b] {
        assert_eq!(metric(instance.admin, "sluice_limit_store_errors_total"), Some(0), "the store answered every call");
    }
    let two = auth("spread-tunnels", "two");
    let mut open: Vec<Reply> = (0..2).map(|_| connect(spread.egress, &two, ws.echo)).collect();
    assert_eq!(open.iter().map(|r| r.status).collect::<Vec<_>>(), [200, 200]);
    assert!(open.iter_mut().all(Reply::echoes), "tunnels through HAProxy carry bytes");
    for _ in 0..2 {
        let third = connect(spread.egress, &two, ws.echo);
        assert_eq!(third.decision(), Some("deny; reason=too_many_tunnels; policy=two"), "{}", third.head);
    }
}

#[test]
fn a_killed_instances_tunnels_stop_counting_after_one_lease_ttl() {
    if !have("redis-server", "--version") {
        return;
    }
    let redis = Redis::start();
    let ws = Workspace::new();
    let mut a = ws.instance("a", &redis_store(&redis, "local"));
    let b = ws.instance("b", &redis_store(&redis, "local"));
    let two = auth("crash", "two");
    let mut held: Vec<Reply> = (0..2).map(|_| connect(a.egress, &two, ws.echo)).collect();
    assert_eq!(held.iter().map(|r| r.status).collect::<Vec<_>>(), [200, 200]);
    assert!(held.iter_mut().all(Reply::echoes));
    // Held past a refresh, so the leases outlive their first TTL only because A refreshes them.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(connect(b.egress, &two, ws.echo).status, 429, "A's two tunnels count on B");

    a.child.kill().unwrap();
    let killed = Instant::now();
    a.child.wait().unwrap();
    assert_eq!(connect(b.egress, &two, ws.echo).status, 429, "the leases live until their TTL");
    let (mut first, mut second) = loop {
        let first = connect(b.egress, &two, ws.echo);
        if first.status == 200 {
            let second = connect(b.egress, &two, ws.echo);
            assert_eq!(second.status, 200, "{}", second.head);
            break (first, second);
        }
        assert!(
            killed.elapsed() < Duration::from_secs(5),
            "A's leases still count {:?} after the kill",
            killed.elapsed()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let took = killed.elapsed();
    assert!(took >= Duration::from_millis(300) && took < Duration::from_millis(2500), "freed after {took:?}, TTL 1s");
    assert!(first.echoes() && second.echoes());
    drop(held);
}

/// How many of the instance's log lines contain `needle`, once there are `want` of them or 5 s have passed: a
/// transition's line is written after its metric changes and reaches the test through the child's pipe.
fn lines_at_least(instance: &Sluice, needle: &str, want: usize) -> usize {
    let count = || instance.log.lock().unwrap().iter().filter(|l| l.contains(needle)).count();
    let until = Instant::now() + Duration::from_secs(5);
    while count() < want && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    count()
}

#[test]
fn redis_going_away_degrades_to_local_limits_and_shared_limits_resume() {
    if !have("redis-server", "--version") {
        return;
    }
    let mut redis = Redis::start();
    let ws = Workspace::new();
    let a = ws.instance("a", &redis_store(&redis, "local"));
    let b = ws.instance("b", &redis_store(&redis, "local"));
    let both = [a.egress, b.egress];
    let s = auth("through", "burst5");
    assert_eq!(count(&alternate(&both, &s, ws.echo, 7), 200), 5);

    redis.kill();
    // Per-instance limits meanwhile: each instance gives the session a burst of its own.
    assert_eq!(alternate(&[a.egress], &s, ws.echo, 7), [200, 200, 200, 200, 200, 429, 429]);
    assert_eq!(alternate(&[b.egress], &s, ws.echo, 1), [200]);
    for instance in [&a, &b] {
        assert_eq!(metric(instance.admin, "sluice_limit_store_up"), Some(0));
        assert!(metric(instance.admin, "sluice_limit_store_errors_total").unwrap_or(0) >= 1);
        let body = until_health(instance.admin, (200, "degraded: "), Duration::from_secs(1));
        assert!(
            body.contains(&format!("limit store redis://127.0.0.1:{}/0 unreachable: ", redis.port))
                && body.ends_with("; limits are per instance meanwhile\n"),
            "{body}"
        );
        let logged = lines_at_least(instance, "limit store unreachable", 1);
        assert_eq!(logged, 1, "one line per transition:\n{}", instance.log_text());
    }

    redis.restart();
    for instance in [&a, &b] {
        until_health(instance.admin, (200, "ok\n"), Duration::from_secs(5));
        assert_eq!(metric(instance.admin, "sluice_limit_store_up"), Some(1));
        // At start, and once more on the way back.
        assert_eq!(lines_at_least(instance, "limits are shared", 2), 2, "{}", instance.log_text());
    }
    // The restarted store is empty: the session starts a fresh burst, shared again.
    let statuses = alternate(&both, &s, ws.echo, 8);
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429, 429, 429], "{statuses:?}");

    // A store that hangs rather than refuses: requests still get answers within the deadline (500 ms here),
    // not when the store comes back.
    redis.signal("STOP");
    let started = Instant::now();
    let r = connect(a.egress, &auth("patient", "burst5"), ws.echo);
    let took = started.elapsed();
    assert_eq!(r.status, 200, "{}", r.head);
    assert!(took < Duration::from_secs(3), "a request waited {took:?} on a stopped store");
    until_health(a.admin, (200, "degraded: "), Duration::from_secs(1));
    redis.signal("CONT");
    until_health(a.admin, (200, "ok\n"), Duration::from_secs(5));
}

#[test]
fn with_refuse_a_missing_store_is_a_503_and_a_failed_health_check() {
    if !have("redis-server", "--version") {
        return;
    }
    let mut redis = Redis::start();
    let ws = Workspace::new();
    let a = ws.instance("a", &redis_store(&redis, "refuse"));
    let s = auth("strict", "burst5");
    assert_eq!(connect(a.egress, &s, ws.echo).status, 200);

    redis.kill();
    let mut r = connect(a.egress, &s, ws.echo);
    assert_eq!(r.status, 503, "{}", r.head);
    assert_eq!(r.decision(), Some("deny; reason=limit_store_unavailable; policy=burst5"), "{}", r.head);
    assert!(r.head.contains("retry-after: 1\r\n"), "{}", r.head);
    let len: usize =
        r.head.lines().find_map(|l| l.strip_prefix("content-length: ")).and_then(|v| v.parse().ok()).unwrap();
    let mut body = vec![0; len];
    r.stream.read_exact(&mut body).unwrap();
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains("sluice: the store that keeps this session's limits is unreachable"), "{body}");
    let tunnel = connect(a.egress, &auth("strict-tunnel", "two"), ws.echo);
    assert_eq!(tunnel.status, 503, "{}", tunnel.head);
    let health = until_health(a.admin, (503, "unavailable: "), Duration::from_secs(1));
    assert!(health.ends_with("; requests that need it are refused\n"), "{health}");
    assert_eq!(metric(a.admin, "sluice_limit_store_up"), Some(0));

    redis.restart();
    until_health(a.admin, (200, "ok\n"), Duration::from_secs(5));
    assert_eq!(connect(a.egress, &s, ws.echo).status, 200);
}

#[test]
fn an_upload_quota_spent_through_one_instance_is_refused_on_the_other() {
    if !have("redis-server", "--version") {
        return;
    }
    let redis = Redis::start();
    let ws = Workspace::new();
    let a = ws.instance("a", &redis_store(&redis, "local"));
    let b = ws.instance("b", &redis_store(&redis, "local"));
    let s = auth("uploader", "quota");
    // 60 KiB through A, then 60 KiB through B once A's bytes are in the store (one flush, 200 ms): B alone has
    // seen 60 KiB, so only the shared count stops the second upload at the 100 KiB quota.
    assert_eq!(upload(a.egress, &s, ws.sink, 60 * 1024).0, 200);
    wait_stored_upload(&redis, "uploader", 60 * 1024);
    let (status, head) = upload(b.egress, &s, ws.sink, 60 * 1024);
    assert_ne!(status, 200, "B let through 120 KiB of a 100 KiB quota: {head}");
    // Spent now on both, whichever instance is asked.
    let start = Instant::now();
    let head = loop {
        let (status, head) = upload(a.egress, &s, ws.sink, 1);
        if status == 429 {
            break head;
        }
        assert_eq!(status, 200, "{head}");
        assert!(start.elapsed() < Duration::from_secs(3), "A never saw the quota spent through B");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(head.contains("x-sluice-decision: deny; reason=quota_exceeded; policy=quota"), "{head}");
    let (status, head) = upload(b.egress, &s, ws.sink, 1);
    assert_eq!(status, 429, "{head}");
    assert!(head.contains("reason=quota_exceeded"), "{head}");
    // Another session's quota is untouched.
    assert_eq!(upload(b.egress, &auth("other-uploader", "quota"), ws.sink, 1024).0, 200);
    // And the other way round, for a session A has never seen: its first request on A reads the store.
    let fresh = auth("fresh-uploader", "quota");
    assert_eq!(upload(b.egress, &fresh, ws.sink, 60 * 1024).0, 200);
    wait_stored_upload(&redis, "fresh-uploader", 60 * 1024);
    let (status, head) = upload(a.egress, &fresh, ws.sink, 60 * 1024);
    assert_ne!(status, 200, "A let through 120 KiB of a 100 KiB quota: {head}");
}

/// Waits (bounded) until the store's upload counter of session `sid` holds at least `bytes`: the
/// instance that moved them flushes every 200 ms, later on a loaded machine.
fn wait_stored_upload(redis: &Redis, sid: &str, bytes: u64) {
    let pattern = format!("sluice:{{s:{sid}}}:quota:upload:*");
    let start = Instant::now();
    loop {
        let stored: u64 = redis_cli(redis, &["--scan", "--pattern", &pattern])
            .lines()
            .filter(|k| !k.is_empty())
            .map(|k| redis_cli(redis, &["GET", k]).trim().parse::<u64>().unwrap_or(0))
            .sum();
        if stored >= bytes {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "the store never held {bytes} bytes of {sid} ({stored})");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `redis-cli` against the test server: its reply as text.
fn redis_cli(redis: &Redis, args: &[&str]) -> String {
    let out = Command::new("redis-cli").args(["-p", &redis.port.to_string()]).args(args).output().unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// One `cmdstat_NAME:calls=N,...` count from `INFO commandstats`.
fn calls(redis: &Redis, command: &str) -> u64 {
    redis_cli(redis, &["INFO", "commandstats"])
        .lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_run_the_loaded_script_by_hash_and_reload_it_after_a_flush() {
    use sluice::config::{LimitDefaults, OnStoreError, StoreConfig, StoreKind};
    use sluice::limit::redis::RedisLimiter;
    use sluice::limit::{LimitKey, Limited, Limiter, RateLimited};
    use sluice::policy::Limits;
    if !have("redis-server", "--version") || !have("redis-cli", "--version") {
        return;
    }
    let redis = Redis::start();
    let store = StoreConfig {
        kind: StoreKind::Redis,
        url: Some(redis.url()),
        on_error: OnStoreError::Local,
        timeout: Duration::from_millis(500),
        lease_ttl: Duration::from_secs(1),
    };
    let metrics = std::sync::Arc::new(sluice::metrics::Metrics::default());
    let limiter =
        RedisLimiter::start(LimitDefaults { store, ..LimitDefaults::default() }, metrics.clone()).await.unwrap();
    let limits = Limits { requests_per_second: Some(1.0), burst: Some(2), ..Limits::default() };
    let key = LimitKey::session("by-hash");
    assert_eq!(limiter.check_request(&key, &limits).await, Ok(()));
    assert_eq!(limiter.check_request(&key, &limits).await, Ok(()));
    // GCRA in the store: the third of a burst of two waits one emission interval, less the time since.
    match limiter.check_request(&key, &limits).await {
        Err(Limited::Over(RateLimited { retry_after, limit })) => {
            assert_eq!(limit, "1 request per second, burst 2");
            assert!(
                retry_after > Duration::from_millis(500) && retry_after <= Duration::from_secs(1),
                "{retry_after:?}"
            );
        }
        other => panic!("expected a rate refusal, got {other:?}"),
    }
    // The key expires once the burst has replenished: an idle session costs the store nothing.
    let ttl: i64 = redis_cli(&redis, &["PTTL", "sluice:{s:by-hash}:rate"]).trim().parse().unwrap();
    assert!(ttl > 0 && ttl <= 2000, "PTTL {ttl}");
    // Every call so far was an EVALSHA; the script text went over once, when the server first lacked it.
    assert_eq!(calls(&redis, "eval"), 0);
    assert_eq!(calls(&redis, "evalsha"), 4, "{}", redis_cli(&redis, &["INFO", "commandstats"]));
    assert_eq!(calls(&redis, "script|load"), 1);

    // A server that forgot its scripts (a restart, SCRIPT FLUSH) answers NOSCRIPT once, then knows it again.
    assert_eq!(redis_cli(&redis, &["SCRIPT", "FLUSH"]).trim(), "OK");
    assert_eq!(limiter.check_request(&LimitKey::session("after-flush"), &limits).await, Ok(()));
    assert_eq!(calls(&redis, "script|load"), 2);
    assert_eq!(calls(&redis, "eval"), 0);
    assert!(limiter.is_up());
    assert_eq!(metrics.limit_store_errors.get(), 0);
}

/// The `sluice.toml` embedded in `deploy/kubernetes.yaml` (a `|` block indented four spaces).
fn embedded(manifest: &str, name: &str) -> String {
    let start = manifest.find(&format!("  {name}: |\n")).unwrap_or_else(|| panic!("{name} is in the manifest"));
    let rest = &manifest[start..];
    rest.lines()
        .skip(1)
        .take_while(|l| l.starts_with("    ") || l.is_empty())
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_shipped_manifest_carries_a_valid_configuration_and_policy() {
    use sluice::config::{Config, OnStoreError, StoreKind};
    let manifest =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes.yaml")).unwrap();
    let config = Config::parse("kubernetes.yaml sluice.toml", &embedded(&manifest, "sluice.toml")).unwrap();
    assert_eq!(config.limits.store.kind, StoreKind::Redis);
    assert_eq!(config.limits.store.on_error, OnStoreError::Local);
    assert_eq!(config.limits.store.timeout, Duration::from_millis(20));
    assert_eq!(config.admin.listen.port(), 3130);
    assert!(manifest.contains("httpGet: { path: /healthz, port: admin }"));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("acme-dev.toml"), embedded(&manifest, "acme-dev.toml")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sluice")).arg("validate").arg(dir.path()).output().unwrap();
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

#[test]
fn a_draining_instance_fails_its_health_check_while_its_tunnels_finish() {
    let ws = Workspace::new();
    let a = ws.instance("a", "kind = \"memory\"");
    assert_eq!(admin_get(a.admin, "/healthz"), (200, "ok\n".into()));
    let mut open = connect(a.egress, &auth("draining", "two"), ws.echo);
    assert_eq!(open.status, 200);
    a.signal("TERM");
    until_health(a.admin, (503, "draining: shutting down"), Duration::from_secs(1));
    assert!(open.echoes(), "the open tunnel still carries bytes while the instance drains");
}
