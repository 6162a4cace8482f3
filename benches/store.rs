//! The shared limit store's cost, on loopback against a real `redis-server`:
//! - one limiter check through Redis (`check_request`, one EVALSHA round trip): p50 and p99, sequential and
//!   with 64 checks in flight;
//! - tunnels per second at 64 concurrent clients through a `sluice serve` child with `[limits.store] kind =
//!   "redis"` against the same child with the in-memory store (open a tunnel, echo one message, close).
//!
//! Knobs: `SLUICE_BENCH_SECS` (default 3) per measurement, `SLUICE_BENCH_ROUNDS` (default 3; the rounds
//! alternate the stores and the medians are printed). Skips, saying so, without `redis-server`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice::config::{LimitDefaults, OnStoreError, StoreConfig, StoreKind};
use sluice::limit::redis::RedisLimiter;
use sluice::limit::{LimitKey, Limiter};
use sluice::metrics::Metrics;
use sluice::policy::Limits;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MESSAGE: &[u8] = b"ping through the tunnel";

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v.parse().unwrap_or_else(|_| panic!("{name}={v:?} is not a valid value")),
        Err(_) => default,
    }
}

/// A child process killed on drop.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn start_redis(dir: &Path) -> Option<(Reaped, u16)> {
    let port = free_port();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let child = Reaped(child);
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(start.elapsed() < Duration::from_secs(10), "redis-server did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    Some((child, port))
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted.get((sorted.len() * p / 100).min(sorted.len().saturating_sub(1))).copied().unwrap_or_default()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn generous() -> Limits {
    Limits {
        requests_per_second: Some(1_000_000.0),
        burst: Some(1_000_000),
        max_tunnels: Some(1_000_000),
        ..Limits::default()
    }
}

/// Sequential and 64-in-flight checks through the store, over 1000 sessions. The deadline is 1 s here, not
/// the default 20 ms, so that every check timed is a round trip (a missed deadline would be answered by the
/// in-memory limiter in 0.1 µs and flatter the figures); how many took longer than 20 ms is printed.
async fn check_latency(url: &str, secs: Duration) {
    let store = StoreConfig {
        kind: StoreKind::Redis,
        url: Some(url.into()),
        on_error: OnStoreError::Local,
        timeout: Duration::from_secs(1),
        lease_ttl: Duration::from_secs(30),
    };
    let metrics = Arc::new(Metrics::default());
    let limiter = Arc::new(
        RedisLimiter::start(LimitDefaults { store, ..LimitDefaults::default() }, metrics.clone())
            .await
            .expect("start the Redis limiter"),
    );
    let keys: Arc<Vec<LimitKey>> = Arc::new((0..1000).map(|i| LimitKey::session(&format!("bench-{i}"))).collect());
    let limits = generous();
    // Warm: the script is loaded, the connection is up.
    for key in keys.iter().take(10) {
        assert_eq!(limiter.check_request(key, &limits).await, Ok(()));
    }
    let mut sequential = Vec::new();
    let deadline = Instant::now() + secs;
    let mut i = 0;
    while Instant::now() < deadline {
        let t = Instant::now();
        let answer = limiter.check_request(&keys[i % keys.len()], &limits).await;
        sequential.push(t.elapsed());
        assert_eq!(answer, Ok(()));
        i += 1;
    }
    sequential.sort_unstable();
    let late = |v: &[Duration]| v.iter().filter(|d| **d > Duration::from_millis(20)).count();
    println!(
        "check_request through Redis, sequential:    p50 {:>7.1} µs   p99 {:>7.1} µs   ({} checks, {:.0}/s, {} over 20 ms)",
        percentile(&sequential, 50).as_secs_f64() * 1e6,
        percentile(&sequential, 99).as_secs_f64() * 1e6,
        sequential.len(),
        sequential.len() as f64 / secs.as_secs_f64(),
        late(&sequential)
    );
    let start = Instant::now();
    let deadline = start + secs;
    let tasks: Vec<_> = (0..64)
        .map(|t| {
            let (limiter, keys) = (limiter.clone(), keys.clone());
            tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut i = t;
                while Instant::now() < deadline {
                    let s = Instant::now();
                    let answer = limiter.check_request(&keys[i % keys.len()], &limits).await;
                    lat.push(s.elapsed());
                    assert_eq!(answer, Ok(()));
                    i += 64;
                }
                lat
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("check task"));
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.sort_unstable();
    println!(
        "check_request through Redis, 64 in flight:  p50 {:>7.1} µs   p99 {:>7.1} µs   ({} checks, {:.0}/s, {} over 20 ms)",
        percentile(&all, 50).as_secs_f64() * 1e6,
        percentile(&all, 99).as_secs_f64() * 1e6,
        all.len(),
        all.len() as f64 / elapsed,
        late(&all)
    );
    let errors = metrics.limit_store_errors.get();
    println!("  store errors (each answered locally, so not a round trip): {errors}");
}

async fn echo_sink() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// A `sluice serve` child with `store` as its `[limits.store]` table; its egress and admin addresses.
fn start_sluice(dir: &Path, name: &str, store: &str) -> (Reaped, SocketAddr, SocketAddr) {
    let dir: PathBuf = dir.join(name);
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(
        policies.join("bench.toml"),
        "version = 1\nname = \"bench\"\nlevel = \"full\"\nallow_ips = [\"127.0.0.0/8\"]\n[limits]\nrequests_per_second = 1000000\nburst = 1000000\nmax_tunnels = 1000000\n",
    )
    .unwrap();
    let log = dir.join("decisions.log");
    let config = format!(
        "[egress]\nlisten = \"127.0.0.1:0\"\npolicy = \"bench\"\nmax_connections = 100000\n[policies]\ndir = {:?}\n\
         [resolver]\nsystem = false\n[admin]\nlisten = \"127.0.0.1:0\"\n[git]\nlisten = \"127.0.0.1:0\"\n\
         [log]\nfile = {:?}\n[limits.store]\n{store}\n",
        policies.display().to_string(),
        log.display().to_string()
    );
    let path = dir.join("sluice.toml");
    std::fs::write(&path, config).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("serve")
        .arg("--config")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start sluice");
    let child = Reaped(child);
    let start = Instant::now();
    let field = |line: &str, name: &str| -> SocketAddr {
        let key = format!("\"{name}\":\"");
        let at = line.find(&key).expect("address in the listening line") + key.len();
        let end = line[at..].find('"').expect("end of the address") + at;
        line[at..end].parse().expect("an address")
    };
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains("sluice listening")) {
            return (child, field(line, "egress"), field(line, "admin"));
        }
        assert!(start.elapsed() < Duration::from_secs(10), "sluice did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One sample from a child's `/metrics`.
fn metric(admin: SocketAddr, name: &str) -> Option<u64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(admin).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.lines().find_map(|l| l.strip_prefix(&format!("{name} "))).and_then(|v| v.trim().parse().ok())
}

async fn open(proxy: SocketAddr, echo: SocketAddr) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect(proxy).await?;
    s.set_nodelay(true)?;
    let head = format!("CONNECT 127.0.0.1:{0} HTTP/1.1\r\nHost: 127.0.0.1:{0}\r\n\r\n", echo.port());
    s.write_all(head.as_bytes()).await?;
    let mut answer = Vec::with_capacity(128);
    let mut byte = [0u8; 1];
    while !answer.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).await? == 0 || answer.len() > 8192 {
            return Err(std::io::Error::other("answer cut short"));
        }
        answer.push(byte[0]);
    }
    if !answer.starts_with(b"HTTP/1.1 200") {
        return Err(std::io::Error::other(String::from_utf8_lossy(&answer).to_string()));
    }
    Ok(s)
}

/// 64 clients open a tunnel, echo one message and close, until the deadline: (tunnels/s, p99).
async fn tunnel_rate(proxy: SocketAddr, echo: SocketAddr, secs: Duration) -> (f64, Duration) {
    let start = Instant::now();
    let deadline = start + secs;
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut buf = [0u8; MESSAGE.len()];
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let mut s = open(proxy, echo).await.expect("open a tunnel");
                    s.write_all(MESSAGE).await.expect("write");
                    s.read_exact(&mut buf).await.expect("read the echo");
                    drop(s);
                    lat.push(t.elapsed());
                }
                lat
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("tunnel task"));
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.sort_unstable();
    (all.len() as f64 / elapsed, percentile(&all, 99))
}

fn main() {
    if Command::new("redis-server").arg("--version").stdout(Stdio::null()).status().is_err() {
        println!("skipping: redis-server is not installed (apt-get install -y redis-server)");
        return;
    }
    let secs = Duration::from_secs_f64(env_or("SLUICE_BENCH_SECS", 3.0));
    let rounds = env_or("SLUICE_BENCH_ROUNDS", 3usize).max(1);
    let dir = tempfile::tempdir().unwrap();
    let Some((_redis, port)) = start_redis(dir.path()) else {
        println!("skipping: redis-server would not start");
        return;
    };
    let url = format!("redis://127.0.0.1:{port}/0");
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        check_latency(&url, secs).await;
        let echo = echo_sink().await;
        let (_memory, memory, _) = start_sluice(dir.path(), "memory", "kind = \"memory\"");
        let store = format!("kind = \"redis\"\nurl = {url:?}\non_error = \"local\"");
        let (_shared, shared, shared_admin) = start_sluice(dir.path(), "redis", &store);
        let (mut mem_rates, mut redis_rates, mut mem_p99, mut redis_p99) = (vec![], vec![], vec![], vec![]);
        for _ in 0..rounds {
            let (r, p) = tunnel_rate(memory, echo, secs).await;
            mem_rates.push(r);
            mem_p99.push(p.as_secs_f64() * 1e3);
            let (r, p) = tunnel_rate(shared, echo, secs).await;
            redis_rates.push(r);
            redis_p99.push(p.as_secs_f64() * 1e3);
        }
        let (m, r) = (median(mem_rates), median(redis_rates));
        println!("tunnels/s at 64 concurrent, memory store:  {m:>8.0}   p99 {:>6.2} ms", median(mem_p99));
        println!(
            "tunnels/s at 64 concurrent, Redis store:   {r:>8.0}   p99 {:>6.2} ms   ({:.2}x of memory; target >= 0.8x)",
            median(redis_p99),
            r / m
        );
        println!(
            "  Redis store: {} calls failed or missed the 20 ms deadline (each answered from the local limiter); \
             store up at the end: {}",
            metric(shared_admin, "sluice_limit_store_errors_total").map_or("?".into(), |n| n.to_string()),
            metric(shared_admin, "sluice_limit_store_up").map_or("?".into(), |n| n.to_string()),
        );
    });
}
