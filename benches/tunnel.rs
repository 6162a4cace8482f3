//! End-to-end tunnel bench: the same loopback load direct and through a proxy, reported as ratios.
//!
//! `cargo bench --bench tunnel` builds the release `sluice` binary (cargo builds a package's binaries
//! for its benches), starts it as a child process with a generated config (decision log on, to a
//! file), starts echo and source sinks on 127.0.0.1, and measures each figure without a proxy, through
//! it, and through a bare relay in the same run, round after round (the median is reported). The bare
//! relay is the least a CONNECT proxy can do (read the head, dial, answer `200`, copy), run as a process
//! of its own like the proxies it is the floor for: this bench binary re-executed with
//! `SLUICE_BENCH_ROLE=relay`, one current-thread tokio runtime, its RSS and CPU read like theirs.
//! When `haproxy` is installed it is started too, as a plain TCP relay (`mode tcp`, forced splice, two
//! threads) with one port per sink, and the load speaks straight to it (no CONNECT): every round prints
//! sluice ÷ HAProxy for each figure, the goal for a proxy that also parses, decides and logs, and beside
//! it bare relay ÷ HAProxy: what CONNECT's extra round trip (the `200` before the first byte) costs
//! even a proxy that does nothing else. A last table splits the TLS row's exchange into its parts (open,
//! handshake, echo), so a gap to HAProxy shows whether it is the CONNECT round trip or the relaying.
//!
//! Environment:
//! - `SLUICE_BENCH_SECS` (default 2): seconds per measurement; `SLUICE_BENCH_ROUNDS` (default 3).
//! - `SLUICE_BENCH_IDLE` (default 2000): idle tunnels held open for the RSS figure.
//! - `SLUICE_BENCH_BIN`: another sluice binary to start (e.g. a copy built from an older commit).
//! - `SLUICE_BENCH_THREADS` (default 0, one per CPU): sluice's `[server] threads`.
//! - `SLUICE_BENCH_LIMIT` (e.g. `1GiB`): the bench policy's `upload_bytes_per_second` and
//!   `download_bytes_per_second` (all the bench's tunnels are one anonymous session, so they share it).
//! - `SLUICE_BENCH_HAPROXY` (default `haproxy`): the HAProxy binary; `none` leaves it out.
//! - `SLUICE_BENCH_PROXY=host:port`: measure another proxy instead of starting sluice (CONNECT must
//!   reach 127.0.0.1 on any port); `SLUICE_BENCH_PID` gives its PID for the RSS and CPU figures, and
//!   `SLUICE_BENCH_TARGET` the host name it is asked for (default `127.0.0.1`).
//! - `SLUICE_BENCH_INSPECT=1`: also the inspected rows (TLS termination): the bench policy then has a
//!   `[[requests]]` rule for `inspect.test` and `plain.test` (so only those are terminated; the tunnel
//!   rows above stay on the spliced path) and sluice an `[inspect]` CA. Rows: keep-alive requests/s at
//!   64 concurrent through an inspected tunnel, against plain-HTTP forwarded requests through sluice and
//!   direct TLS; new inspected tunnels/s (handshake, one request, close); one inspected tunnel's
//!   throughput; RSS per open inspected tunnel. With `SLUICE_BENCH_SQUID=1` as well, the same rows run
//!   through Debian's `squid-openssl` (`ssl_bump bump all`, the same CA, the same upstream trust), started
//!   by the bench as a child (`/usr/sbin/squid`; its cert helper processes are not in its RSS). With
//!   `SLUICE_BENCH_MITMDUMP=/path/to/mitmdump`, through mitmproxy too (same CA, `ssl_verify_upstream_trusted_ca`,
//!   an addon that sends every upstream connection to 127.0.0.1).

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const ECHO_MESSAGE: &[u8] = b"sluice bench echo: 32 bytes.....";
const CHUNK: usize = 128 * 1024;
/// The name the TLS sink's certificate is for, and the one the bench asks sluice for.
const TLS_NAME: &str = "bench.test";

struct Settings {
    secs: Duration,
    rounds: usize,
    idle: usize,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v.parse().unwrap_or_else(|_| panic!("{name}={v:?} is not a valid value")),
        Err(_) => default,
    }
}

/// Where load goes: straight to the sink, through a proxy with CONNECT, or to a TCP relay's port for
/// that sink (HAProxy: one frontend per sink, no CONNECT).
#[derive(Clone)]
enum Route {
    Direct,
    Proxy { addr: SocketAddr, target: Arc<str> },
    Ports(Arc<[(SocketAddr, SocketAddr)]>),
}

impl Route {
    async fn open(&self, sink: SocketAddr) -> std::io::Result<TcpStream> {
        match self {
            Route::Direct => {
                let s = TcpStream::connect(sink).await?;
                s.set_nodelay(true)?;
                Ok(s)
            }
            Route::Proxy { addr, target } => {
                let mut s = TcpStream::connect(addr).await?;
                s.set_nodelay(true)?;
                let port = sink.port();
                let head = format!("CONNECT {target}:{port} HTTP/1.1\r\nHost: {target}:{port}\r\n\r\n");
                s.write_all(head.as_bytes()).await?;
                read_connect_answer(&mut s).await?;
                Ok(s)
            }
            Route::Ports(ports) => {
                let Some(&(_, port)) = ports.iter().find(|(s, _)| *s == sink) else {
                    return Err(std::io::Error::other(format!("the relay has no port for {sink}")));
                };
                let s = TcpStream::connect(port).await?;
                s.set_nodelay(true)?;
                Ok(s)
            }
        }
    }
}

/// Reads the proxy's answer head byte by byte (so no tunnelled byte is consumed) and checks for `200`.
async fn read_connect_answer(s: &mut TcpStream) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(128);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).await? == 0 || head.len() > 8192 {
            return Err(std::io::Error::other(format!("proxy answer cut short: {:?}", String::from_utf8_lossy(&head))));
        }
        head.push(byte[0]);
    }
    if head.starts_with(b"HTTP/1.1 200") || head.starts_with(b"HTTP/1.0 200") {
        Ok(())
    } else {
        Err(std::io::Error::other(format!("proxy refused: {:?}", String::from_utf8_lossy(&head))))
    }
}

/// Echoes every byte back until EOF.
async fn echo<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) {
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Echoes every byte back until EOF.
async fn echo_sink() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo sink");
    let addr = listener.local_addr().expect("echo sink address");
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(echo(s));
        }
    });
    addr
}

/// A TLS server (a fresh certificate for [`TLS_NAME`]) that echoes after each handshake; returns its
/// address and a client that trusts it (full handshakes: no resumption, as a new client would).
async fn tls_echo_sink() -> (SocketAddr, tokio_rustls::TlsConnector) {
    let ck = rcgen::generate_simple_self_signed(vec![TLS_NAME.to_string()]).expect("rcgen certificate");
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(vec![ck.cert.der().clone()], key)
        .expect("server certificate");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ck.cert.der().clone()).expect("trust the sink's certificate");
    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.resumption = rustls::client::Resumption::disabled();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the TLS echo sink");
    let addr = listener.local_addr().expect("TLS echo sink address");
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let _ = s.set_nodelay(true);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(s).await {
                    echo(tls).await;
                }
            });
        }
    });
    (addr, tokio_rustls::TlsConnector::from(Arc::new(client)))
}

/// Writes bytes as fast as the reader takes them until the connection closes.
async fn source_sink() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind source sink");
    let addr = listener.local_addr().expect("source sink address");
    let chunk: Arc<[u8]> = vec![0x5au8; CHUNK].into();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let chunk = chunk.clone();
            tokio::spawn(async move { while s.write_all(&chunk).await.is_ok() {} });
        }
    });
    addr
}

/// The least a CONNECT proxy can do: read the head, dial 127.0.0.1 at the port it names, answer `200`,
/// copy both ways (64 KiB buffers). No policy, no log, no limits: what it reaches is the machine's
/// ceiling for a user-space CONNECT relay, so a proxy's ratio can be read against it. A floor for
/// latency only: it copies through user space (no splice) and each tunnel keeps its two buffers,
/// allocated zeroed when the copy starts, so its CPU per GiB and idle RSS are a naive relay's.
async fn bare_relay(listener: TcpListener) {
    while let Ok((mut client, _)) = listener.accept().await {
        let _ = client.set_nodelay(true);
        tokio::spawn(async move {
            let mut head = Vec::with_capacity(256);
            let mut buf = [0u8; 1024];
            let end = loop {
                match client.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
                if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
            };
            let text = String::from_utf8_lossy(&head[..end]);
            let Some(port) = text.split_whitespace().nth(1).and_then(|a| a.rsplit_once(':')?.1.parse::<u16>().ok())
            else {
                return;
            };
            let Ok(mut upstream) = TcpStream::connect(("127.0.0.1", port)).await else { return };
            let _ = upstream.set_nodelay(true);
            if upstream.write_all(&head[end..]).await.is_err()
                || client.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.is_err()
            {
                return;
            }
            let _ = tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, 65536, 65536).await;
        });
    }
}

/// Set (to `relay`) in the environment of this bench binary re-run as the bare relay's process.
const ROLE: &str = "SLUICE_BENCH_ROLE";

/// The bare relay's process: prints its `127.0.0.1:port` on stdout (one line) and serves until stdin
/// closes (the bench holds the other end, so the relay goes with it however the bench ends) or it is
/// killed.
fn serve_relay() {
    // One current-thread runtime: every tunnel's accept, dial and both copy directions run on the one
    // thread that epoll woke, so no tunnel pays a cross-thread wake-up (a multi-thread runtime's I/O
    // driver, shared by its workers, hands woken tasks between them). That is the least a tunnel one at
    // a time can cost, which is what the relay is there to show; it is also how each of HAProxy's two
    // threads runs its connections. Counted over 1,000 tunnels one at a time (strace -c -f; ctxt_switches):
    // 28.7 syscalls and 4.4 context switches per tunnel here, 35.1 (4.0 of them futex) and 9.6 with two
    // workers; HAProxy 34.4 and 4.9. At 64 concurrent it has one core where HAProxy and sluice have
    // two, but on this 2-core machine the load generator and sinks hold the other.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("relay runtime");
    runtime.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the bare relay");
        let addr = listener.local_addr().expect("bare relay address");
        std::thread::spawn(|| {
            let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
            std::process::exit(0);
        });
        println!("{addr}");
        let _ = std::io::Write::flush(&mut std::io::stdout());
        bare_relay(listener).await;
    });
}

/// Starts the bare relay as a child (this binary again, with [`ROLE`] set) and reads its address.
fn start_relay() -> (Process, SocketAddr) {
    let exe = std::env::current_exe().expect("the bench binary's path");
    let mut child = Command::new(exe)
        .env(ROLE, "relay")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the bare relay");
    let stdout = child.stdout.take().expect("the relay's stdout is piped");
    let process = Process { child, dir: None };
    let mut line = String::new();
    std::io::BufReader::new(stdout).read_line(&mut line).expect("read the bare relay's address");
    let addr = line.trim().parse().unwrap_or_else(|_| panic!("the bare relay printed {line:?}, not its address"));
    eprintln!("bare relay: pid {}, {addr}", process.child.id());
    (process, addr)
}

/// What one load run gives: tunnels per second, the p50 and p99 of one whole exchange (open, echo,
/// close), the p50 of each of its [`PHASES`], and the tunnels done.
struct Rate {
    per_sec: f64,
    p50: Duration,
    p99: Duration,
    phases_p50: [Duration; 3],
    done: u64,
}

/// The parts of one exchange as the client sees them, in the order of [`Rate::phases_p50`]. Without TLS
/// the handshake takes no time.
const PHASES: [&str; 3] =
    ["open (TCP connect; CONNECT and its `200`)", "TLS handshake through the tunnel", "echo and close"];

/// One exchange's whole time, and its [`PHASES`]' times.
type Exchange = (Duration, [Duration; 3]);

/// `concurrency` clients open a tunnel, echo one message and close, until the deadline. With `tls`
/// each tunnel first runs a full TLS handshake with the sink (`sink` is then the TLS echo sink).
async fn tunnel_rate(
    route: &Route,
    sink: SocketAddr,
    tls: Option<&tokio_rustls::TlsConnector>,
    concurrency: usize,
    secs: Duration,
) -> Rate {
    let start = Instant::now();
    let deadline = start + secs;
    let mut tasks = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let route = route.clone();
        let tls = tls.cloned();
        tasks.push(tokio::spawn(async move {
            let mut latencies: Vec<Exchange> = Vec::with_capacity(4096);
            let mut buf = [0u8; ECHO_MESSAGE.len()];
            while Instant::now() < deadline {
                let t = Instant::now();
                let mut s = route.open(sink).await.expect("open a tunnel to the echo sink");
                let opened = t.elapsed();
                let handshake = match &tls {
                    None => {
                        s.write_all(ECHO_MESSAGE).await.expect("write the echo message");
                        s.read_exact(&mut buf).await.expect("read the echo back");
                        Duration::ZERO
                    }
                    Some(tls) => {
                        let name = rustls::pki_types::ServerName::try_from(TLS_NAME).expect("a server name");
                        let mut s = tls.connect(name, s).await.expect("TLS handshake through the tunnel");
                        let handshake = t.elapsed() - opened;
                        s.write_all(ECHO_MESSAGE).await.expect("write the echo message");
                        s.read_exact(&mut buf).await.expect("read the echo back");
                        handshake
                    }
                };
                let whole = t.elapsed();
                latencies.push((whole, [opened, handshake, whole - opened - handshake]));
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("tunnel task"));
    }
    let elapsed = start.elapsed().as_secs_f64();
    let sorted = |pick: &dyn Fn(&Exchange) -> Duration| {
        let mut v: Vec<Duration> = all.iter().map(pick).collect();
        v.sort_unstable();
        v
    };
    let at = |v: &[Duration], q: usize| {
        v.get((v.len() * q / 100).min(v.len().saturating_sub(1))).copied().unwrap_or_default()
    };
    let whole = sorted(&|e| e.0);
    let phases_p50 = std::array::from_fn(|i| at(&sorted(&|e| e.1[i]), 50));
    Rate {
        per_sec: all.len() as f64 / elapsed,
        p50: at(&whole, 50),
        p99: at(&whole, 99),
        phases_p50,
        done: all.len() as u64,
    }
}

/// `streams` tunnels read from the source sink until the deadline; returns Gbit/s in total and the
/// bytes moved.
async fn throughput(route: &Route, source: SocketAddr, streams: usize, secs: Duration) -> (f64, u64) {
    let mut opened = Vec::with_capacity(streams);
    for _ in 0..streams {
        opened.push(route.open(source).await.expect("open a tunnel to the source sink"));
    }
    let start = Instant::now();
    let deadline = start + secs;
    let mut tasks = Vec::with_capacity(streams);
    for mut s in opened {
        tasks.push(tokio::spawn(async move {
            let mut buf = vec![0u8; CHUNK];
            let mut total = 0u64;
            loop {
                match tokio::time::timeout_at(deadline.into(), s.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return total,
                    Ok(Ok(n)) => total += n as u64,
                }
            }
        }));
    }
    let mut bytes = 0u64;
    for t in tasks {
        bytes += t.await.expect("throughput task");
    }
    (bytes as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e9, bytes)
}

/// The proxy process's resident set (VmRSS) in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The proxy process's CPU time so far (utime + stime).
fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at the state, field 3.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(Duration::from_micros(ticks * 1_000_000 / hz))
}

/// Idle tunnels need two descriptors each here and two in the proxy (which inherits this limit).
fn raise_nofile_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the rlimit we own; setrlimit reads it.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max.min(1 << 20);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// A child process (sluice, HAProxy or the bare relay) with its generated files, if any; killed on drop.
struct Process {
    child: Child,
    dir: Option<PathBuf>,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The sluice child, the address it listens on and its decision log.
struct Sluice {
    process: Process,
    addr: SocketAddr,
    log: PathBuf,
}

fn start_sluice(inspect: Option<&InspectSetup>) -> Sluice {
    let dir = std::env::temp_dir().join(format!("sluice-bench-{}", std::process::id()));
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies).expect("create the bench directory");
    // One anonymous client opens thousands of tunnels a second: lift the per-session limits, which
    // are not what this bench measures. The burst is a second's worth: with a 1 ms one, a worker
    // thread descheduled between reading the clock and taking its cell was refused now and then.
    let mut policy = "version = 1\nname = \"bench\"\nlevel = \"full\"\nallow_ips = [\"127.0.0.0/8\"]\n[limits]\nrequests_per_second = 1000000\nburst = 1000000\nmax_tunnels = 1000000\n".to_string();
    // A bandwidth limit in both directions (e.g. "1GiB"): the shaped path's cost against the unlimited one.
    if let Ok(rate) = std::env::var("SLUICE_BENCH_LIMIT") {
        policy.push_str(&format!("upload_bytes_per_second = {rate:?}\ndownload_bytes_per_second = {rate:?}\n"));
    }
    if inspect.is_some() {
        policy.push_str("[[requests]]\nhosts = [\"inspect.test\", \"plain.test\"]\naction = \"allow\"\n");
    }
    std::fs::write(policies.join("bench.toml"), policy).expect("write the bench policy");
    let config = format!(
        "[egress]\nlisten = \"127.0.0.1:0\"\npolicy = \"bench\"\nidle_timeout = \"10m\"\nmax_connections = 100000\n\
         [policies]\ndir = {policies:?}\n\
         [resolver]\nhosts = {{ \"{TLS_NAME}\" = [\"127.0.0.1\"] }}\nsystem = false\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\
         [git]\nlisten = \"127.0.0.1:0\"\n\
         [log]\nfile = {log:?}\n\
         [server]\nthreads = {threads}\n",
        threads = env_or("SLUICE_BENCH_THREADS", 0usize),
        policies = policies.display().to_string(),
        log = dir.join("decisions.log").display().to_string(),
    );
    let config = match inspect {
        None => config,
        Some(i) => format!(
            "{}[inspect]\nca_cert = {:?}\nca_key = {:?}\nextra_roots = [{:?}]\n",
            config.replace(
                "\"bench.test\" = [\"127.0.0.1\"]",
                "\"bench.test\" = [\"127.0.0.1\"], \"inspect.test\" = [\"127.0.0.1\"], \"plain.test\" = [\"127.0.0.1\"]"
            ),
            i.ca_cert.display().to_string(),
            i.ca_key.display().to_string(),
            i.public_pem.display().to_string(),
        ),
    };
    let config_path = dir.join("sluice.toml");
    std::fs::write(&config_path, config).expect("write the bench config");
    let log = dir.join("decisions.log");
    let bin = std::env::var_os("SLUICE_BENCH_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_sluice").into());
    let child = Command::new(bin)
        .arg("serve")
        .arg("--config")
        .arg(&config_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start target/release/sluice");
    let mut process = Process { child, dir: Some(dir) };
    // With `[log] file` set, the "sluice listening" line goes to that file.
    let started = Instant::now();
    let addr = loop {
        if let Ok(Some(status)) = process.child.try_wait() {
            panic!("sluice exited before listening: {status}");
        }
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains("sluice listening")) {
            let at = line.find("\"egress\":\"").expect("egress address in the listening line") + 10;
            let end = line[at..].find('"').expect("end of the egress address") + at;
            break line[at..end].parse().expect("egress address");
        }
        assert!(started.elapsed() < Duration::from_secs(10), "sluice did not log \"sluice listening\" in 10s");
        std::thread::sleep(Duration::from_millis(20));
    };
    Sluice { process, addr, log }
}

/// HAProxy as the bench's reference relay: one `mode tcp` frontend per sink, forced splice both ways,
/// 1 MiB pipes, two threads, no log. Its ports are picked free on 127.0.0.1 just before it starts.
fn start_haproxy(sinks: &[SocketAddr]) -> Result<(Process, Route), String> {
    let bin = std::env::var("SLUICE_BENCH_HAPROXY").unwrap_or_else(|_| "haproxy".into());
    if bin == "none" {
        return Err("SLUICE_BENCH_HAPROXY=none".into());
    }
    let version = Command::new(&bin).arg("-v").output().map_err(|e| format!("{bin:?} not runnable ({e})"))?;
    let version = String::from_utf8_lossy(&version.stdout).lines().next().unwrap_or("").to_string();
    // No `maxconn`: HAProxy sizes it to the open-file limit it inherits (raised by the bench).
    let mut config = "global\n  nbthread 2\n  tune.pipesize 1048576\n\
        defaults\n  mode tcp\n  option splice-request\n  option splice-response\n  timeout connect 5s\n  \
        timeout client 10m\n  timeout server 10m\n"
        .to_string();
    let mut ports = Vec::new();
    for (i, sink) in sinks.iter().enumerate() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("no free port for HAProxy: {e}"))?;
        config.push_str(&format!("listen sink{i}\n  bind {port}\n  server sink{i} {sink}\n"));
        ports.push((*sink, port));
    }
    let dir = std::env::temp_dir().join(format!("sluice-bench-haproxy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("create {dir:?}: {e}"))?;
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, config).map_err(|e| format!("write {path:?}: {e}"))?;
    let child = Command::new(&bin)
        .arg("-db")
        .arg("-f")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("start {bin:?}: {e}"))?;
    let mut process = Process { child, dir: Some(dir) };
    let started = Instant::now();
    for &(_, port) in &ports {
        while std::net::TcpStream::connect(port).is_err() {
            if let Ok(Some(status)) = process.child.try_wait() {
                return Err(format!("haproxy exited before listening: {status}"));
            }
            if started.elapsed() > Duration::from_secs(10) {
                return Err(format!("haproxy did not listen on {port} in 10s"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    eprintln!("{version}: pid {}", process.child.id());
    Ok((process, Route::Ports(ports.into())))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() { f64::NAN } else { v[v.len() / 2] }
}

/// The routes every figure is measured on, in this order.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Which {
    Direct,
    Proxy,
    Relay,
    HaProxy,
}

/// One figure's values, round by round, per route.
#[derive(Default)]
struct Figure([Vec<f64>; 4]);

impl Figure {
    fn push(&mut self, which: Which, v: f64) {
        self.0[which as usize].push(v);
    }

    fn median(&self, which: Which) -> f64 {
        median(self.0[which as usize].clone())
    }

    /// This round's (the last pushed) figure on `which` ÷ HAProxy's.
    fn last_ratio(&self, which: Which) -> f64 {
        let last = |w: Which| self.0[w as usize].last().copied().unwrap_or(f64::NAN);
        last(which) / last(Which::HaProxy)
    }
}

#[derive(Default)]
struct Samples {
    rate64: Figure,
    p99: Figure,
    rate1: Figure,
    p50_1: Figure,
    thr1: Figure,
    thr8: Figure,
    tls1: Figure,
    /// The p50 of each of the [`PHASES`] of the TLS exchanges one at a time (µs).
    tls1_phases: [Figure; 3],
    /// Only the proxy, the bare relay and HAProxy have a process of their own to read.
    cpu_per_1000_ms: Figure,
    cpu_per_gib_ms: Figure,
    idle_kib: Figure,
}

fn main() {
    if std::env::var_os(ROLE).is_some_and(|r| r == "relay") {
        return serve_relay();
    }
    // `cargo bench` passes `--bench`; a filter argument is accepted and ignored.
    raise_nofile_limit();
    let settings = Settings {
        secs: Duration::from_secs_f64(env_or("SLUICE_BENCH_SECS", 2.0)),
        rounds: env_or("SLUICE_BENCH_ROUNDS", 3usize).max(1),
        idle: env_or("SLUICE_BENCH_IDLE", 2000usize),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    // The sinks get a runtime (and thread) of their own, as a server in another process would: in the
    // clients' runtime their accept loops queue behind 64 busy clients, which inflates direct latency.
    let sinks = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("sink")
        .enable_all()
        .build()
        .expect("sink runtime");
    let echo = sinks.block_on(echo_sink());
    let inspect_setup = (env_or("SLUICE_BENCH_INSPECT", 0u8) == 1 && std::env::var_os("SLUICE_BENCH_PROXY").is_none())
        .then(|| Arc::new(sinks.block_on(InspectSetup::new())));
    let source = sinks.block_on(source_sink());
    let (tls_echo, tls) = sinks.block_on(tls_echo_sink());
    let (sluice, proxy_addr, pid, target) = match std::env::var("SLUICE_BENCH_PROXY") {
        Ok(addr) => {
            let addr: SocketAddr = addr.parse().expect("SLUICE_BENCH_PROXY is host:port");
            let pid = std::env::var("SLUICE_BENCH_PID").ok().map(|p| p.parse().expect("SLUICE_BENCH_PID is a PID"));
            let target = std::env::var("SLUICE_BENCH_TARGET").unwrap_or_else(|_| "127.0.0.1".into());
            (None, addr, pid, target)
        }
        Err(_) => {
            let s = start_sluice(inspect_setup.as_deref());
            let (addr, pid) = (s.addr, s.process.child.id());
            (Some(s), addr, Some(pid), TLS_NAME.into())
        }
    };
    let proxy = Route::Proxy { addr: proxy_addr, target: target.into() };
    let (haproxy, haproxy_pid, haproxy_route) = match start_haproxy(&[echo, source, tls_echo]) {
        Ok((process, route)) => {
            let pid = process.child.id();
            (Some(process), Some(pid), Some(route))
        }
        Err(why) => {
            eprintln!("HAProxy left out: {why} (apt-get install haproxy)");
            (None, None, None)
        }
    };
    // The floor for any CONNECT proxy on this machine: a relay that does nothing but relay, in a process
    // of its own (started after the nofile limit is raised, so it inherits it).
    let (relay_process, relay_addr) = start_relay();
    let relay_pid = relay_process.child.id();
    let relay = Route::Proxy { addr: relay_addr, target: "127.0.0.1".into() };
    let mut routes = vec![(Route::Direct, Which::Direct), (proxy.clone(), Which::Proxy), (relay, Which::Relay)];
    if let Some(route) = &haproxy_route {
        routes.push((route.clone(), Which::HaProxy));
    }
    let pid_of = |which: Which| match which {
        Which::Proxy => pid,
        Which::Relay => Some(relay_pid),
        Which::HaProxy => haproxy_pid,
        Which::Direct => None,
    };
    let s = &settings;
    let samples = runtime.block_on(async {
        // Warm up every path (and the proxies' allocators and threads) before anything is measured.
        for (route, _) in &routes {
            tunnel_rate(route, echo, None, 16, Duration::from_millis(300)).await;
        }
        let mut m = Samples::default();
        for &(ref route, which) in &routes {
            if let Some(pid) = pid_of(which)
                && let Some(kib) = idle_rss(route, echo, pid, s.idle).await
            {
                m.idle_kib.push(which, kib);
            }
        }
        for round in 0..s.rounds {
            eprintln!("round {}/{}", round + 1, s.rounds);
            for &(ref route, which) in &routes {
                let cpu0 = pid_of(which).and_then(cpu_time);
                let r = tunnel_rate(route, echo, None, 64, s.secs).await;
                if let (Some(c0), Some(c1)) = (cpu0, pid_of(which).and_then(cpu_time)) {
                    m.cpu_per_1000_ms.push(which, (c1 - c0).as_secs_f64() * 1e3 * 1000.0 / r.done.max(1) as f64);
                }
                m.rate64.push(which, r.per_sec);
                m.p99.push(which, r.p99.as_secs_f64() * 1e3);
            }
            for &(ref route, which) in &routes {
                let r = tunnel_rate(route, echo, None, 1, s.secs).await;
                m.rate1.push(which, r.per_sec);
                m.p50_1.push(which, r.p50.as_secs_f64() * 1e6);
            }
            for &(ref route, which) in &routes {
                let r = tunnel_rate(route, tls_echo, Some(&tls), 1, s.secs).await;
                m.tls1.push(which, r.per_sec);
                for (f, p50) in m.tls1_phases.iter_mut().zip(r.phases_p50) {
                    f.push(which, p50.as_secs_f64() * 1e6);
                }
            }
            for &(ref route, which) in &routes {
                m.thr1.push(which, throughput(route, source, 1, s.secs).await.0);
            }
            for &(ref route, which) in &routes {
                let cpu0 = pid_of(which).and_then(cpu_time);
                let (gbit, bytes) = throughput(route, source, 8, s.secs).await;
                if let (Some(c0), Some(c1)) = (cpu0, pid_of(which).and_then(cpu_time)) {
                    let gib = bytes as f64 / f64::from(1u32 << 30);
                    m.cpu_per_gib_ms.push(which, (c1 - c0).as_secs_f64() * 1e3 / gib.max(1e-9));
                }
                m.thr8.push(which, gbit);
            }
            if haproxy.is_some() {
                let figures: [(&Figure, &str); 8] = [
                    (&m.rate64, "tunnels/s c=64"),
                    (&m.rate1, "tunnels/s c=1"),
                    (&m.p50_1, "p50 c=1"),
                    (&m.thr1, "1-tunnel throughput"),
                    (&m.thr8, "8-tunnel throughput"),
                    (&m.cpu_per_1000_ms, "CPU/1000 tunnels"),
                    (&m.cpu_per_gib_ms, "CPU/GiB"),
                    (&m.tls1, "TLS tunnels/s c=1"),
                ];
                let ratios: Vec<String> = figures
                    .iter()
                    .map(|(f, name)| {
                        format!("{:.2} ({:.2}) {name}", f.last_ratio(Which::Proxy), f.last_ratio(Which::Relay))
                    })
                    .collect();
                eprintln!("round {}: sluice ÷ HAProxy (bare relay ÷ HAProxy): {}", round + 1, ratios.join(", "));
            }
        }
        m
    });
    report(&settings, &samples, sluice.as_ref(), haproxy.is_some());
    drop(relay_process);
    if let Some(setup) = &inspect_setup {
        let rows = runtime.block_on(inspected_rows(setup, proxy_addr, pid, &settings));
        rows.report(&settings, "sluice");
        if env_or("SLUICE_BENCH_SQUID", 0u8) == 1 {
            match start_squid(setup) {
                Ok(squid) => {
                    let peer = runtime.block_on(inspected_rows(setup, squid.addr, Some(squid.child.id()), &settings));
                    peer.report(&settings, "squid ssl_bump");
                    rows.against(&peer, "squid");
                }
                Err(e) => eprintln!("squid: not measured: {e}"),
            }
        }
        if let Ok(bin) = std::env::var("SLUICE_BENCH_MITMDUMP") {
            match start_mitmdump(setup, &bin) {
                Ok(peer) => {
                    let m = runtime.block_on(inspected_rows(setup, peer.addr, Some(peer.child.id()), &settings));
                    m.report(&settings, "mitmproxy");
                    rows.against(&m, "mitmproxy");
                }
                Err(e) => eprintln!("mitmproxy: not measured: {e}"),
            }
        }
    }
}

/// Opens `n` tunnels (each echoes once, as a TLS handshake would), holds them idle and returns the
/// proxy's RSS growth per tunnel in KiB.
async fn idle_rss(proxy: &Route, echo: SocketAddr, pid: u32, n: usize) -> Option<f64> {
    if n == 0 {
        return None;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_kib(pid)?;
    let failed = Arc::new(AtomicBool::new(false));
    let per_task = n.div_ceil(32);
    let mut tasks = Vec::new();
    for i in 0..32 {
        let (proxy, failed) = (proxy.clone(), failed.clone());
        let count = per_task.min(n.saturating_sub(i * per_task));
        tasks.push(tokio::spawn(async move {
            let mut held = Vec::with_capacity(count);
            let mut buf = [0u8; ECHO_MESSAGE.len()];
            for _ in 0..count {
                let opened = async {
                    let mut s = proxy.open(echo).await?;
                    s.write_all(ECHO_MESSAGE).await?;
                    s.read_exact(&mut buf).await?;
                    std::io::Result::Ok(s)
                };
                match opened.await {
                    Ok(s) => held.push(s),
                    Err(e) => {
                        eprintln!("idle tunnel failed: {e}");
                        failed.store(true, Ordering::Relaxed);
                        break;
                    }
                }
            }
            held
        }));
    }
    let mut held = Vec::with_capacity(n);
    for t in tasks {
        held.extend(t.await.ok()?);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib(pid)?;
    let per = after.saturating_sub(before) as f64 / held.len().max(1) as f64;
    eprintln!("idle: {} tunnels, pid {pid} RSS {before} KiB → {after} KiB", held.len());
    drop(held);
    tokio::time::sleep(Duration::from_millis(300)).await;
    (!failed.load(Ordering::Relaxed)).then_some(per)
}

fn report(s: &Settings, m: &Samples, sluice: Option<&Sluice>, haproxy: bool) {
    let met = |ok: bool| if ok { "yes" } else { "NO" };
    let num = |v: f64, prec: usize| if v.is_nan() { "n/a".to_string() } else { format!("{v:.prec$}") };
    println!();
    println!(
        "tunnel bench: {} round(s) of {:.1}s, median; {} idle tunnels; decision log {}",
        s.rounds,
        s.secs.as_secs_f64(),
        s.idle,
        if sluice.is_some() { "on (file)" } else { "as the proxy is configured" }
    );
    println!();
    println!("| figure | direct | via proxy | bare relay | HAProxy | proxy / direct | relay / direct | target | met |");
    println!("|---|---:|---:|---:|---:|---:|---:|---|---|");
    let rows: [(&str, &Figure, usize, f64); 5] = [
        ("CONNECT tunnels/s, 64 concurrent (open, 1 echo, close)", &m.rate64, 0, 0.70),
        ("CONNECT tunnels/s, 1 at a time", &m.rate1, 0, 0.60),
        ("TLS tunnels/s, 1 at a time (open, handshake, 1 echo, close)", &m.tls1, 0, 0.60),
        ("one tunnel's throughput (Gbit/s)", &m.thr1, 2, 0.80),
        ("8 tunnels' throughput (Gbit/s)", &m.thr8, 2, 0.75),
    ];
    for (name, f, prec, target) in rows {
        let (d, p, b, h) =
            (f.median(Which::Direct), f.median(Which::Proxy), f.median(Which::Relay), f.median(Which::HaProxy));
        let (r, rb) = (p / d, b / d);
        println!(
            "| {name} | {d:.prec$} | {p:.prec$} | {b:.prec$} | {} | {r:.2}× | {rb:.2}× | ≥ {target:.2}× | {} |",
            num(h, prec),
            met(r >= target)
        );
    }
    let idle = m.idle_kib.median(Which::Proxy);
    let cpu = m.cpu_per_1000_ms.median(Which::Proxy);
    println!(
        "| proxy RSS per idle open tunnel (KiB) | — | {} | {} | {} | — | — | ≤ 12 KiB | {} |",
        num(idle, 1),
        num(m.idle_kib.median(Which::Relay), 1),
        num(m.idle_kib.median(Which::HaProxy), 1),
        if idle.is_nan() { "n/a" } else { met(idle <= 12.0) }
    );
    println!(
        "| proxy CPU per 1,000 tunnels (ms) | — | {} | {} | {} | — | — | ≤ 100 ms | {} |",
        num(cpu, 0),
        num(m.cpu_per_1000_ms.median(Which::Relay), 0),
        num(m.cpu_per_1000_ms.median(Which::HaProxy), 0),
        if cpu.is_nan() { "n/a" } else { met(cpu <= 100.0) }
    );
    let f = &m.p99;
    let (d, p, b, h) =
        (f.median(Which::Direct), f.median(Which::Proxy), f.median(Which::Relay), f.median(Which::HaProxy));
    let (r, rb) = (p / d, b / d);
    println!(
        "| CONNECT latency p99 at 64 concurrent (ms) | {d:.2} | {p:.2} | {b:.2} | {} | {r:.2}× | {rb:.2}× | ≤ 3× | {} |",
        num(h, 2),
        met(r <= 3.0)
    );
    if haproxy {
        println!();
        println!(
            "| figure, sluice ÷ HAProxy tcp relay | sluice | HAProxy | ratio | bare relay | bare relay ÷ HAProxy | target | met |"
        );
        println!("|---|---:|---:|---:|---:|---:|---|---|");
        // (name, figure, precision, target, whether a higher ratio is better)
        let rows: [(&str, &Figure, usize, f64, bool); 9] = [
            ("tunnels/s, 64 concurrent (open, 1 echo, close)", &m.rate64, 0, 0.95, true),
            ("tunnels/s, 1 at a time", &m.rate1, 0, 0.80, true),
            ("open + first echo p50, 1 at a time (µs)", &m.p50_1, 0, 1.25, false),
            ("one tunnel's throughput (Gbit/s)", &m.thr1, 2, 0.95, true),
            ("8 tunnels' throughput (Gbit/s)", &m.thr8, 2, 0.95, true),
            ("RSS per idle open tunnel (KiB)", &m.idle_kib, 1, 1.0, false),
            ("CPU per 1,000 tunnels at 64 concurrent (ms)", &m.cpu_per_1000_ms, 0, 1.0, false),
            ("CPU per GiB, 8 tunnels (ms)", &m.cpu_per_gib_ms, 0, 1.05, false),
            ("TLS tunnels/s, 1 at a time (CONNECT + handshake + echo)", &m.tls1, 0, 0.95, true),
        ];
        for (name, f, prec, target, higher) in rows {
            let (p, b, h) = (f.median(Which::Proxy), f.median(Which::Relay), f.median(Which::HaProxy));
            let r = p / h;
            let (sign, ok) = if higher { ("≥", r >= target) } else { ("≤", r <= target) };
            println!(
                "| {name} | {} | {} | {} | {} | {} | {sign} {target:.2} | {} |",
                num(p, prec),
                num(h, prec),
                num(r, 2),
                num(b, prec),
                num(b / h, 2),
                if r.is_nan() { "n/a" } else { met(ok) }
            );
        }
        // Where a TLS exchange's time goes: what a CONNECT proxy's `200` costs before the handshake can
        // start, against what relaying the handshake and the echo costs.
        println!();
        println!(
            "| TLS exchange one at a time, p50 of each part (µs) | sluice | bare relay | HAProxy | sluice − relay |"
        );
        println!("|---|---:|---:|---:|---:|");
        for (name, f) in PHASES.iter().zip(&m.tls1_phases) {
            let (p, b, h) = (f.median(Which::Proxy), f.median(Which::Relay), f.median(Which::HaProxy));
            println!("| {name} | {} | {} | {} | {} |", num(p, 0), num(b, 0), num(h, 0), num(p - b, 0));
        }
    }
    if let Some(sluice) = sluice {
        let lines = std::fs::read_to_string(&sluice.log).map(|t| t.lines().count()).unwrap_or(0);
        println!();
        println!("decision log: {lines} lines written");
    }
}

// ---------------------------------------------------------------------------------------------------
// Inspected rows (`SLUICE_BENCH_INSPECT=1`): TLS termination's cost.

/// Anything a hyper client connection can run over.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Io for T {}

/// The inspected rows' world: sluice's CA (the client trusts it), a "public" CA for the TLS upstream
/// (sluice trusts it through `extra_roots`), the TLS upstream and a plain-HTTP one (same handler).
struct InspectSetup {
    dir: PathBuf,
    ca_cert: PathBuf,
    ca_key: PathBuf,
    public_pem: PathBuf,
    tls_upstream: SocketAddr,
    plain_upstream: SocketAddr,
    /// Trusts sluice's CA: what a sandbox's client does.
    via_sluice: Arc<rustls::ClientConfig>,
    /// Trusts the public CA: a client talking to the upstream directly.
    direct: Arc<rustls::ClientConfig>,
}

impl Drop for InspectSetup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn client_config(roots_pem: &str) -> Arc<rustls::ClientConfig> {
    let mut store = rustls::RootCertStore::empty();
    for block in pem::parse_many(roots_pem).expect("roots are PEM") {
        store.add(rustls::pki_types::CertificateDer::from(block.into_contents())).expect("a usable root");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(store)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

impl InspectSetup {
    /// Runs in the sinks' runtime: the upstreams' accept loops live there.
    async fn new() -> InspectSetup {
        let dir = std::env::temp_dir().join(format!("sluice-bench-inspect-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the inspect bench directory");
        let files = sluice::inspect::ca::init(&dir.join("ca")).expect("sluice ca init");
        // The public CA and the upstream's certificate for inspect.test.
        let ca_key = rcgen::KeyPair::generate().expect("ca key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca_params.distinguished_name.push(rcgen::DnType::CommonName, "bench public root");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).expect("ca cert");
        let public_pem = dir.join("public.pem");
        std::fs::write(&public_pem, ca.pem()).expect("write public.pem");
        let issuer = rcgen::Issuer::from_ca_cert_der(ca.der(), ca_key).expect("issuer");
        let key = rcgen::KeyPair::generate().expect("leaf key");
        let mut params = rcgen::CertificateParams::new(vec!["inspect.test".to_string()]).expect("leaf params");
        params.distinguished_name.push(rcgen::DnType::CommonName, "inspect.test");
        let cert = params.signed_by(&key, &issuer).expect("leaf");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .expect("server cert");
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        let tls_upstream = http_upstream(Some(tokio_rustls::TlsAcceptor::from(Arc::new(server)))).await;
        let plain_upstream = http_upstream(None).await;
        let sluice_ca = std::fs::read_to_string(&files.cert).expect("read ca.pem");
        InspectSetup {
            via_sluice: client_config(&sluice_ca),
            direct: client_config(&ca.pem()),
            ca_cert: files.cert,
            ca_key: files.key,
            public_pem,
            tls_upstream,
            plain_upstream,
            dir,
        }
    }
}

/// A body of `left` bytes in `CHUNK`-sized frames of one shared buffer.
struct Repeat {
    left: u64,
    chunk: bytes::Bytes,
}

impl hyper::body::Body for Repeat {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        let n = self.left.min(self.chunk.len() as u64) as usize;
        self.left -= n as u64;
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(self.chunk.slice(..n)))))
    }
    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.left)
    }
}

/// HTTP/1.1 upstream (TLS when given an acceptor): `/bytes/N` streams N bytes, anything else is `ok`.
async fn http_upstream(tls: Option<tokio_rustls::TlsAcceptor>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the http upstream");
    let addr = listener.local_addr().expect("http upstream address");
    let chunk = bytes::Bytes::from(vec![0x5au8; CHUNK]);
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let _ = s.set_nodelay(true);
            let (tls, chunk) = (tls.clone(), chunk.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let chunk = chunk.clone();
                    async move {
                        let left = req.uri().path().strip_prefix("/bytes/").and_then(|n| n.parse().ok());
                        let body = match left {
                            Some(left) => Repeat { left, chunk },
                            None => Repeat { left: 2, chunk: bytes::Bytes::from_static(b"ok") },
                        };
                        Ok::<_, std::convert::Infallible>(http::Response::new(body))
                    }
                });
                let builder = hyper::server::conn::http1::Builder::new();
                match tls {
                    Some(acceptor) => {
                        if let Ok(t) = acceptor.accept(s).await {
                            let _ = builder.serve_connection(hyper_util::rt::TokioIo::new(t), service).await;
                        }
                    }
                    None => {
                        let _ = builder.serve_connection(hyper_util::rt::TokioIo::new(s), service).await;
                    }
                }
            });
        }
    });
    addr
}

/// How a bench client reaches the upstream.
#[derive(Clone, Copy, PartialEq)]
enum Reach {
    /// CONNECT inspect.test through sluice, TLS with sluice's leaf: terminated.
    Inspected,
    /// TLS straight to the upstream.
    DirectTls,
    /// Plain HTTP forwarded by sluice (absolute-form requests).
    Forwarded,
}

type Sender = hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>;

async fn open_http(setup: &InspectSetup, proxy: SocketAddr, reach: Reach) -> std::io::Result<Sender> {
    let io: Box<dyn Io> = match reach {
        Reach::Forwarded => {
            let s = TcpStream::connect(proxy).await?;
            s.set_nodelay(true)?;
            Box::new(s)
        }
        Reach::DirectTls | Reach::Inspected => {
            let (s, config) = if reach == Reach::Inspected {
                let mut s = TcpStream::connect(proxy).await?;
                s.set_nodelay(true)?;
                let port = setup.tls_upstream.port();
                let head = format!("CONNECT inspect.test:{port} HTTP/1.1\r\nHost: inspect.test:{port}\r\n\r\n");
                s.write_all(head.as_bytes()).await?;
                read_connect_answer(&mut s).await?;
                (s, setup.via_sluice.clone())
            } else {
                let s = TcpStream::connect(setup.tls_upstream).await?;
                s.set_nodelay(true)?;
                (s, setup.direct.clone())
            };
            let name = rustls::pki_types::ServerName::try_from("inspect.test").map_err(std::io::Error::other)?;
            let tls = tokio_rustls::TlsConnector::from(config).connect(name, s).await?;
            Box::new(tls)
        }
    };
    let (sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io)).await.map_err(std::io::Error::other)?;
    tokio::spawn(conn);
    Ok(sender)
}

fn request(setup: &InspectSetup, reach: Reach, path: &str) -> http::Request<http_body_util::Empty<bytes::Bytes>> {
    let (uri, host) = match reach {
        Reach::Forwarded => {
            let host = format!("plain.test:{}", setup.plain_upstream.port());
            (format!("http://{host}{path}"), host)
        }
        _ => (path.to_string(), format!("inspect.test:{}", setup.tls_upstream.port())),
    };
    http::Request::get(uri).header("host", host).body(http_body_util::Empty::new()).expect("request")
}

/// Sends one request and reads its body; the body's length.
async fn exchange(
    sender: &mut Sender,
    req: http::Request<http_body_util::Empty<bytes::Bytes>>,
) -> std::io::Result<u64> {
    use http_body_util::BodyExt;
    sender.ready().await.map_err(std::io::Error::other)?;
    let resp = sender.send_request(req).await.map_err(std::io::Error::other)?;
    if resp.status() != http::StatusCode::OK {
        return Err(std::io::Error::other(format!("status {}", resp.status())));
    }
    let mut body = resp.into_body();
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        if let Some(d) = frame.map_err(std::io::Error::other)?.data_ref() {
            n += d.len() as u64;
        }
    }
    Ok(n)
}

/// `concurrency` keep-alive connections send requests back to back until the deadline: requests/s.
/// With `fresh`, every request opens (and closes) its own connection instead: connections/s.
async fn request_rate(setup: &Arc<InspectSetup>, proxy: SocketAddr, reach: Reach, fresh: bool, secs: Duration) -> f64 {
    let start = Instant::now();
    let deadline = start + secs;
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let setup = setup.clone();
        tasks.push(tokio::spawn(async move {
            let (mut done, mut failed) = (0u64, 0u64);
            let mut sender = None;
            while Instant::now() < deadline {
                // Bounded: a request that does not finish within 10 s past the deadline counts as failed.
                let one = tokio::time::timeout_at((deadline + Duration::from_secs(10)).into(), async {
                    if sender.is_none() || fresh {
                        sender = Some(open_http(&setup, proxy, reach).await?);
                    }
                    let Some(s) = sender.as_mut() else { return Err(std::io::Error::other("no connection")) };
                    exchange(s, request(&setup, reach, "/x")).await
                });
                match one.await {
                    Ok(Ok(_)) => done += 1,
                    _ => {
                        failed += 1;
                        sender = None;
                    }
                }
            }
            (done, failed)
        }));
    }
    let (mut total, mut failed) = (0u64, 0u64);
    for t in tasks {
        let (d, f) = t.await.expect("rate task");
        total += d;
        failed += f;
    }
    if failed > 0 {
        eprintln!("request_rate: {failed} request(s) failed or timed out (not counted)");
    }
    total as f64 / start.elapsed().as_secs_f64()
}

/// One connection downloads for `secs`: Gbit/s.
async fn request_throughput(setup: &InspectSetup, proxy: SocketAddr, reach: Reach, secs: Duration) -> f64 {
    let mut sender = open_http(setup, proxy, reach).await.expect("open a throughput connection");
    let start = Instant::now();
    let mut bytes = 0u64;
    let limit = start + secs + Duration::from_secs(30);
    while start.elapsed() < secs {
        let download = exchange(&mut sender, request(setup, reach, "/bytes/268435456"));
        match tokio::time::timeout_at(limit.into(), download).await {
            Ok(Ok(n)) => bytes += n,
            _ => {
                eprintln!("request_throughput: a download failed or timed out");
                return f64::NAN;
            }
        }
    }
    bytes as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e9
}

/// Opens `n` inspected tunnels, one request each, holds them: sluice's RSS growth per tunnel (KiB).
async fn inspected_rss(setup: &Arc<InspectSetup>, proxy: SocketAddr, pid: u32, n: usize) -> Option<f64> {
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_kib(pid)?;
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        let one = async {
            let mut s = open_http(setup, proxy, Reach::Inspected).await?;
            exchange(&mut s, request(setup, Reach::Inspected, "/x")).await?;
            std::io::Result::Ok(s)
        };
        held.push(tokio::time::timeout(Duration::from_secs(10), one).await.ok()?.ok()?);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib(pid)?;
    eprintln!("inspected: {n} open tunnels, proxy RSS {before} KiB → {after} KiB");
    drop(held);
    Some(after.saturating_sub(before) as f64 / n.max(1) as f64)
}

#[derive(Default)]
struct InspectedRows {
    keepalive: Vec<f64>,
    forwarded: Vec<f64>,
    direct: Vec<f64>,
    fresh: Vec<f64>,
    fresh_direct: Vec<f64>,
    thr: Vec<f64>,
    thr_direct: Vec<f64>,
    rss_kib: Option<f64>,
}

/// The inspected rows, round after round (the upstreams keep running in the sinks' runtime).
async fn inspected_rows(setup: &Arc<InspectSetup>, proxy: SocketAddr, pid: Option<u32>, s: &Settings) -> InspectedRows {
    let setup = setup.clone();
    let mut rows = InspectedRows::default();
    request_rate(&setup, proxy, Reach::Inspected, false, Duration::from_millis(300)).await;
    rows.rss_kib = match pid {
        Some(pid) => inspected_rss(&setup, proxy, pid, s.idle.min(500)).await,
        None => None,
    };
    for round in 0..s.rounds {
        eprintln!("inspected round {}/{}", round + 1, s.rounds);
        rows.keepalive.push(request_rate(&setup, proxy, Reach::Inspected, false, s.secs).await);
        rows.forwarded.push(request_rate(&setup, proxy, Reach::Forwarded, false, s.secs).await);
        rows.direct.push(request_rate(&setup, proxy, Reach::DirectTls, false, s.secs).await);
        rows.fresh.push(request_rate(&setup, proxy, Reach::Inspected, true, s.secs).await);
        rows.fresh_direct.push(request_rate(&setup, proxy, Reach::DirectTls, true, s.secs).await);
        rows.thr.push(request_throughput(&setup, proxy, Reach::Inspected, s.secs).await);
        rows.thr_direct.push(request_throughput(&setup, proxy, Reach::DirectTls, s.secs).await);
    }
    rows
}

impl InspectedRows {
    /// sluice's figures over a peer's, row by row.
    fn against(&self, peer: &InspectedRows, name: &str) {
        let med = |v: &Vec<f64>| median(v.clone());
        println!();
        println!("| inspected figure | sluice | {name} | sluice / {name} |");
        println!("|---|---:|---:|---:|");
        let rows = [
            ("keep-alive requests/s", &self.keepalive, &peer.keepalive),
            ("new tunnels/s", &self.fresh, &peer.fresh),
            ("one tunnel's throughput (Gbit/s)", &self.thr, &peer.thr),
            ("plain-HTTP forwarded requests/s", &self.forwarded, &peer.forwarded),
        ];
        for (row, a, b) in rows {
            let (a, b) = (med(a), med(b));
            println!("| {row} | {a:.2} | {b:.2} | {:.2}× |", a / b);
        }
        let rss = |r: Option<f64>| r.map_or_else(|| "n/a".to_string(), |k| format!("{k:.1} KiB"));
        println!("| RSS per open inspected tunnel | {} | {} | — |", rss(self.rss_kib), rss(peer.rss_kib));
    }

    fn report(&self, s: &Settings, name: &str) {
        let med = |v: &Vec<f64>| median(v.clone());
        println!();
        println!(
            "inspected bench (TLS termination) through {name}: {} round(s) of {:.1}s, median, 64 concurrent",
            s.rounds,
            s.secs.as_secs_f64()
        );
        println!();
        println!("| figure | direct TLS | inspected via {name} | inspected / direct |");
        println!("|---|---:|---:|---:|");
        let rows = [
            ("keep-alive requests/s (HTTP/1.1)", &self.direct, &self.keepalive, 0),
            ("new tunnels/s (handshake, 1 request, close)", &self.fresh_direct, &self.fresh, 0),
            ("one connection's throughput (Gbit/s)", &self.thr_direct, &self.thr, 2),
        ];
        for (name, d, p, prec) in rows {
            let (d, p) = (med(d), med(p));
            println!("| {name} | {d:.prec$} | {p:.prec$} | {:.2}× |", p / d);
        }
        let (k, f) = (med(&self.keepalive), med(&self.forwarded));
        println!();
        println!(
            "plain-HTTP forwarded keep-alive requests/s via {name}: {f:.0}; an inspected request costs {:.2}× a forwarded one (target ≤ 1.5×)",
            f / k
        );
        let rss = self.rss_kib.map_or_else(|| "n/a".to_string(), |k| format!("{k:.1} KiB"));
        println!("{name} RSS per open inspected tunnel (after one request): {rss}");
    }
}

/// A squid-openssl child doing `ssl_bump bump all` with the setup's CA and upstream trust.
struct Squid {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Squid {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_squid(setup: &InspectSetup) -> Result<Squid, String> {
    let dir = setup.dir.join("squid");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    for (from, to) in [(&setup.ca_cert, "ca.pem"), (&setup.ca_key, "ca.key"), (&setup.public_pem, "public.pem")] {
        std::fs::copy(from, dir.join(to)).map_err(|e| format!("{}: {e}", from.display()))?;
    }
    std::fs::write(dir.join("hosts"), "127.0.0.1 inspect.test plain.test\n").map_err(|e| e.to_string())?;
    let port =
        std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_err(|e| e.to_string())?.port();
    let certgen = "/usr/lib/squid/security_file_certgen";
    let db = dir.join("ssl_db");
    let made = Command::new(certgen).args(["-c", "-s"]).arg(&db).args(["-M", "64MB"]).output();
    if !made.as_ref().is_ok_and(|o| o.status.success()) {
        return Err(format!("{certgen} -c failed (is squid-openssl installed?): {made:?}"));
    }
    let d = dir.display();
    let conf = format!(
        "http_port 127.0.0.1:{port} ssl-bump tls-cert={d}/ca.pem tls-key={d}/ca.key generate-host-certificates=on dynamic_cert_mem_cache_size=64MB\n\
         sslcrtd_program {certgen} -s {d}/ssl_db -M 64MB\nsslcrtd_children 8 startup=2 idle=1\n\
         acl step1 at_step SslBump1\nssl_bump peek step1\nssl_bump bump all\n\
         tls_outgoing_options cafile={d}/public.pem\nsslproxy_cert_error deny all\n\
         http_access allow all\ncache deny all\nhosts_file {d}/hosts\n\
         pid_filename {d}/squid.pid\ncache_log {d}/cache.log\naccess_log none\ncoredump_dir {d}\n\
         cache_effective_user proxy\nmax_filedescriptors 65536\nshutdown_lifetime 0 seconds\n"
    );
    std::fs::write(dir.join("squid.conf"), conf).map_err(|e| e.to_string())?;
    let _ = Command::new("chown").args(["-R", "proxy:proxy"]).arg(&dir).status();
    let child = Command::new("/usr/sbin/squid")
        .args(["-N", "-f"])
        .arg(dir.join("squid.conf"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("start squid: {e}"))?;
    let mut squid = Squid { child, addr: SocketAddr::from(([127, 0, 0, 1], port)) };
    let started = Instant::now();
    while std::net::TcpStream::connect(squid.addr).is_err() {
        if let Ok(Some(status)) = squid.child.try_wait() {
            let log = std::fs::read_to_string(dir.join("cache.log")).unwrap_or_default();
            return Err(format!("squid exited: {status}\n{log}"));
        }
        if started.elapsed() > Duration::from_secs(15) {
            return Err("squid did not listen within 15s".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Its certificate helpers start with it: a moment before the load.
    std::thread::sleep(Duration::from_millis(500));
    Ok(squid)
}

/// mitmdump (mitmproxy) as a child: sluice's CA as its own, the public CA as its upstream trust, and an
/// addon that dials every upstream at 127.0.0.1 (the bench's names resolve nowhere else).
fn start_mitmdump(setup: &InspectSetup, bin: &str) -> Result<Squid, String> {
    let dir = setup.dir.join("mitmproxy");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let key = std::fs::read_to_string(&setup.ca_key).map_err(|e| e.to_string())?;
    let cert = std::fs::read_to_string(&setup.ca_cert).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("mitmproxy-ca.pem"), format!("{key}{cert}")).map_err(|e| e.to_string())?;
    let addon = dir.join("loopback.py");
    std::fs::write(
        &addon,
        "def server_connect(data):\n    data.server.address = (\"127.0.0.1\", data.server.address[1])\n",
    )
    .map_err(|e| e.to_string())?;
    let port =
        std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_err(|e| e.to_string())?.port();
    let child = Command::new(bin)
        .args(["-q", "--listen-host", "127.0.0.1", "--listen-port", &port.to_string()])
        .arg("--set")
        .arg(format!("confdir={}", dir.display()))
        .arg("--set")
        .arg(format!("ssl_verify_upstream_trusted_ca={}", setup.public_pem.display()))
        .args(["--set", "flow_detail=0", "--set", "termlog_verbosity=error", "-s"])
        .arg(&addon)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("start {bin}: {e}"))?;
    let mut peer = Squid { child, addr: SocketAddr::from(([127, 0, 0, 1], port)) };
    let started = Instant::now();
    while std::net::TcpStream::connect(peer.addr).is_err() {
        if let Ok(Some(status)) = peer.child.try_wait() {
            return Err(format!("mitmdump exited: {status}"));
        }
        if started.elapsed() > Duration::from_secs(30) {
            return Err("mitmdump did not listen within 30s".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(peer)
}
