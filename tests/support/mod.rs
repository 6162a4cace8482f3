//! A hermetic harness for integration tests: sluice in-process on 127.0.0.1:0 with a temp policies
//! directory, upstream servers (plain and TLS) on port 0, a recording TCP listener, and bounded clients.
//!
//! Everything here listens on and dials 127.0.0.1 only; the proxy never uses real DNS (`[resolver]
//! system = false`). Every wait is bounded so a hang fails the test instead of stalling CI.
#![allow(dead_code)]

pub mod capture;
pub mod lab;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use sluice::config::Config;
use sluice::server::Server;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The longest any single wait in a test may take before the test fails.
pub const STEP: Duration = Duration::from_secs(20);

/// Runs `fut`, failing the test with `what` if it takes longer than `limit`.
pub async fn within<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?}: {what}"),
    }
}

/// Logs to the test's captured output when `SLUICE_LOG` is set (e.g. `SLUICE_LOG=debug`).
pub fn init_logging() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        if let Ok(filter) = std::env::var("SLUICE_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_test_writer()
                .try_init();
        }
    });
}

/// A directory under the system temp dir, removed on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("sluice-test-{}-{label}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `text` to `name` inside the directory and returns its path.
    pub fn write(&self, name: &str, text: impl AsRef<[u8]>) -> PathBuf {
        let path = self.path.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("create parent dir");
        }
        std::fs::write(&path, text).expect("write temp file");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A running sluice egress proxy; shut down (and its temp dir removed) on drop.
pub struct Proxy {
    pub addr: SocketAddr,
    /// `/metrics`, `/healthz`, `/v1/denials`.
    pub admin: SocketAddr,
    /// The git listener.
    pub git: SocketAddr,
    pub dir: TempDir,
    /// This proxy's audit stream, when it was started with [`Proxy::start_recorded`].
    records: Option<capture::Records>,
    shutdown: CancellationToken,
    task: Option<JoinHandle<Result<(), String>>>,
}

impl Proxy {
    /// Starts sluice with `config_toml` (any `sluice.toml` text) and the given policy files, written to
    /// a temp `policies/` directory. The harness forces what keeps a test hermetic: listening on
    /// 127.0.0.1:0 (every listener), no system DNS, and the temp policies directory.
    pub async fn start(config_toml: &str, policies: &[(&str, &str)]) -> Proxy {
        Proxy::start_in(TempDir::new("proxy"), config_toml, policies).await
    }

    /// Like [`Proxy::start`], in a directory the test already wrote files to (e.g. a key file).
    pub async fn start_in(dir: TempDir, config_toml: &str, policies: &[(&str, &str)]) -> Proxy {
        Proxy::launch(dir, config_toml, policies, None, SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Like [`Proxy::start_in`], with the audit stream (JSON) captured for [`Proxy::records`].
    pub async fn start_recorded(dir: TempDir, config_toml: &str, policies: &[(&str, &str)]) -> Proxy {
        let records = Some(capture::Records::json());
        Proxy::launch(dir, config_toml, policies, records, SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Like [`Proxy::start`], with the admin listener on `admin` (e.g. `[::]:0`, to test a dual-stack
    /// listener) instead of 127.0.0.1:0. Still port 0: nothing else on the machine is disturbed.
    pub async fn start_with_admin_on(admin: SocketAddr, config_toml: &str, policies: &[(&str, &str)]) -> Proxy {
        assert_eq!(admin.port(), 0, "tests listen on port 0 only");
        Proxy::launch(TempDir::new("proxy"), config_toml, policies, None, admin).await
    }

    async fn launch(
        dir: TempDir,
        config_toml: &str,
        policies: &[(&str, &str)],
        records: Option<capture::Records>,
        admin: SocketAddr,
    ) -> Proxy {
        init_logging();
        let mut config = match Config::parse("test.toml", config_toml) {
            Ok(c) => c,
            Err(e) => panic!("test config does not parse:\n{e}"),
        };
        config.egress.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        config.admin.listen = admin;
        config.git.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        config.resolver.system = false;
        let policy_dir = dir.path().join("policies");
        std::fs::create_dir_all(&policy_dir).expect("create policies dir");
        for (name, text) in policies {
            std::fs::write(policy_dir.join(name), text).expect("write policy");
        }
        config.policies.dir = policy_dir;
        let audit = records.as_ref().map_or_else(sluice::audit::AuditLog::disabled, capture::Records::log);
        let server = match Server::bind(config, audit).await {
            Ok(s) => s,
            Err(e) => panic!("sluice did not start: {e}"),
        };
        let addr = server.egress_addr().expect("egress address");
        let admin = server.admin_addr().expect("admin address");
        let git = server.git_addr().expect("git address");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server.run(shutdown.clone()));
        Proxy { addr, admin, git, dir, records, shutdown, task: Some(task) }
    }

    /// Every audit record written so far, one JSON line each (the writer has caught up).
    pub fn records(&self) -> Vec<String> {
        self.records.as_ref().expect("a proxy started with Proxy::start_recorded").lines()
    }

    /// `http://127.0.0.1:PORT`, for curl's `-x`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting and waits (bounded) for the server task.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take()
            && let Ok(Ok(Err(e))) = tokio::time::timeout(Duration::from_secs(5), task).await
        {
            panic!("sluice stopped on its own: {e}");
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A TCP listener that records every connection it accepts and echoes what it reads, so a test can
/// assert that a refused request never reached it (`connections() == 0`).
pub struct Recorder {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    received: Arc<Mutex<Vec<u8>>>,
    task: JoinHandle<()>,
}

impl Recorder {
    pub async fn start() -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind recorder");
        let addr = listener.local_addr().expect("recorder address");
        let accepted = Arc::new(AtomicUsize::new(0));
        let received = Arc::new(Mutex::new(Vec::new()));
        let (a, r) = (accepted.clone(), received.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                let r = r.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let n = match tokio::time::timeout(STEP, stream.read(&mut buf)).await {
                            Ok(Ok(n)) if n > 0 => n,
                            _ => break,
                        };
                        r.lock().expect("recorder lock").extend_from_slice(&buf[..n]);
                        if stream.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                    // The client half-closed: close ours after the echo.
                    let _ = stream.shutdown().await;
                });
            }
        });
        Recorder { addr, accepted, received, task }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// How many connections were accepted so far.
    pub fn connections(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Every byte received so far, across connections.
    pub fn received(&self) -> Vec<u8> {
        self.received.lock().expect("recorder lock").clone()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A port that was bound and then closed: dialling it is refused.
pub async fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    drop(listener);
    port
}

/// A certificate for test names, and the server config that presents it.
pub struct TestCert {
    pub pem: String,
    pub server_config: Arc<rustls::ServerConfig>,
}

impl TestCert {
    pub fn new(names: &[&str]) -> TestCert {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let ck = rcgen::generate_simple_self_signed(names).expect("rcgen certificate");
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server_config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(vec![ck.cert.der().clone()], key)
            .expect("server certificate");
        TestCert { pem: ck.cert.pem(), server_config: Arc::new(server_config) }
    }
}

/// An HTTP/1.1 upstream on 127.0.0.1:0 (plain, or TLS with a [`TestCert`]) answering the routes of
/// [`route`]. Counts the connections it accepted and the requests it answered.
pub struct Upstream {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Upstream {
    pub async fn plain(name: &str) -> Upstream {
        Upstream::start(name, None).await
    }

    pub async fn tls(name: &str, cert: &TestCert) -> Upstream {
        Upstream::start(name, Some(tokio_rustls::TlsAcceptor::from(cert.server_config.clone()))).await
    }

    async fn start(name: &str, tls: Option<tokio_rustls::TlsAcceptor>) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind upstream");
        let addr = listener.local_addr().expect("upstream address");
        let accepted = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let (a, r) = (accepted.clone(), requests.clone());
        let name: Arc<str> = name.into();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                let (name, r) = (name.clone(), r.clone());
                let tls = tls.clone();
                tokio::spawn(async move {
                    match tls {
                        Some(acceptor) => {
                            if let Ok(Ok(s)) = tokio::time::timeout(STEP, acceptor.accept(stream)).await {
                                serve_http(s, name, r).await;
                            }
                        }
                        None => serve_http(stream, name, r).await,
                    }
                });
            }
        });
        Upstream { addr, accepted, requests, task }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn connections(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_http<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(io: S, name: Arc<str>, n: Arc<AtomicUsize>) {
    let service = service_fn(move |req| {
        n.fetch_add(1, Ordering::SeqCst);
        route(req, name.clone())
    });
    let _ = http1::Builder::new().serve_connection(TokioIo::new(io), service).await;
}

pub type TestBody = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

fn text(status: StatusCode, body: String) -> Response<TestBody> {
    let mut r = Response::new(Full::new(Bytes::from(body)).map_err(|never| match never {}).boxed());
    *r.status_mut() = status;
    r
}

/// The upstream's routes:
/// - `GET /bytes/N`: N generated bytes ([`generated_chunk`]), streamed, with a Content-Length;
/// - `POST /sha256`: hashes the request body as it streams in, answers `sha256=HEX bytes=N`;
/// - `GET /headers`: the request line and headers as received, one per line;
/// - anything else: `hello from NAME PATH`.
async fn route(req: Request<Incoming>, name: Arc<str>) -> Result<Response<TestBody>, Infallible> {
    let path = req.uri().path().to_string();
    if let Some(n) = path.strip_prefix("/bytes/").and_then(|n| n.parse::<u64>().ok()) {
        return Ok(Response::new(Generated { sent: 0, len: n }.map_err(|never| match never {}).boxed()));
    }
    if path == "/sha256" {
        let mut body = req.into_body();
        let mut hasher = Sha256::new();
        let mut total = 0u64;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => {
                    if let Some(data) = f.data_ref() {
                        hasher.update(data);
                        total += data.len() as u64;
                    }
                }
                Err(e) => return Ok(text(StatusCode::BAD_REQUEST, format!("body error: {e}\n"))),
            }
        }
        return Ok(text(StatusCode::OK, format!("sha256={} bytes={total}\n", hex(&hasher.finalize()))));
    }
    if path == "/headers" {
        let mut out = format!("{} {} {:?}\n", req.method(), req.uri(), req.version());
        for (k, v) in req.headers() {
            out.push_str(&format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())));
        }
        return Ok(text(StatusCode::OK, out));
    }
    Ok(text(StatusCode::OK, format!("hello from {name} {path}\n")))
}

/// Generated bytes are produced in chunks of this size.
pub const CHUNK: usize = 64 * 1024;

/// The chunk at `index` of the generated stream: a fixed pseudo-random block with the index stamped
/// in its first 8 bytes, so a lost, repeated or reordered chunk changes the digest.
pub fn generated_chunk(index: u64, len: usize) -> Bytes {
    static BLOCK: OnceLock<Vec<u8>> = OnceLock::new();
    let block = BLOCK.get_or_init(|| {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        (0..CHUNK)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    });
    let mut chunk = BytesMut::from(&block[..len]);
    let stamp = index.to_le_bytes();
    let n = len.min(8);
    chunk[..n].copy_from_slice(&stamp[..n]);
    chunk.freeze()
}

/// Calls `each` with every chunk of the first `len` generated bytes.
pub fn for_each_generated(len: u64, mut each: impl FnMut(&[u8])) {
    let mut offset = 0u64;
    let mut index = 0u64;
    while offset < len {
        let n = (len - offset).min(CHUNK as u64) as usize;
        each(&generated_chunk(index, n));
        offset += n as u64;
        index += 1;
    }
}

/// The SHA-256 (hex) of the first `len` generated bytes.
pub fn generated_sha256(len: u64) -> String {
    let mut hasher = Sha256::new();
    for_each_generated(len, |c| hasher.update(c));
    hex(&hasher.finalize())
}

/// Writes the first `len` generated bytes to `path`; returns their SHA-256 (hex).
pub fn write_generated(path: &Path, len: u64) -> String {
    use std::io::Write;
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).expect("create file"));
    let mut hasher = Sha256::new();
    for_each_generated(len, |c| {
        hasher.update(c);
        file.write_all(c).expect("write file");
    });
    file.flush().expect("flush file");
    hex(&hasher.finalize())
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A streamed response body of generated bytes.
struct Generated {
    sent: u64,
    len: u64,
}

impl Body for Generated {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.sent >= self.len {
            return Poll::Ready(None);
        }
        let n = (self.len - self.sent).min(CHUNK as u64) as usize;
        let chunk = generated_chunk(self.sent / CHUNK as u64, n);
        self.sent += n as u64;
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.sent >= self.len
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.len - self.sent)
    }
}

/// What a client process did.
#[derive(Debug)]
pub struct Outcome {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// `curl -sS --max-time LIMIT ARGS…`, with no proxy settings inherited from the environment.
fn curl_command(args: &[&str], limit: Duration) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new("curl");
    cmd.args(["-sS", "--max-time", &limit.as_secs().max(1).to_string()]).args(args).kill_on_drop(true);
    for var in ["http_proxy", "https_proxy", "HTTPS_PROXY", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"] {
        cmd.env_remove(var);
    }
    cmd
}

/// Runs `curl` with `args` (plus `-sS` and a `--max-time`), failing the test if it outlives `limit`.
pub async fn curl(args: &[&str], limit: Duration) -> Outcome {
    let output =
        within(limit + Duration::from_secs(5), "curl", curl_command(args, limit).output()).await.expect("run curl");
    Outcome {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Runs `curl` and hashes its standard output as it streams (nothing held in memory); returns the
/// exit code, the SHA-256 (hex) and the byte count of what it printed.
pub async fn curl_sha256(args: &[&str], limit: Duration) -> (Option<i32>, String, u64, String) {
    let mut child = curl_command(args, limit)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn curl");
    let mut stdout = child.stdout.take().expect("curl stdout");
    let mut stderr = child.stderr.take().expect("curl stderr");
    let work = async {
        let mut hasher = Sha256::new();
        let mut total = 0u64;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = stdout.read(&mut buf).await.expect("read curl stdout");
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            total += n as u64;
        }
        let mut err = String::new();
        let _ = stderr.read_to_string(&mut err).await;
        let status = child.wait().await.expect("wait for curl");
        (status.code(), hex(&hasher.finalize()), total, err)
    };
    within(limit + Duration::from_secs(5), "curl streaming download", work).await
}

/// A raw HTTP/1.1 response as read off the wire.
#[derive(Debug)]
pub struct RawResponse {
    pub status_line: String,
    /// Header names lowercased, in order.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl RawResponse {
    /// The status code from the status line (0 when it has none).
    pub fn status(&self) -> u16 {
        self.status_line.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// A client connection that writes raw bytes and reads responses with bounded waits.
pub struct RawClient {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl RawClient {
    pub async fn connect(addr: SocketAddr) -> RawClient {
        let stream = within(STEP, "connect to proxy", TcpStream::connect(addr)).await.expect("connect");
        RawClient { stream, buf: Vec::new() }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        within(STEP, "write", self.stream.write_all(bytes)).await.expect("write");
    }

    /// Reads more bytes into the buffer; `false` at EOF (or a reset).
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 8192];
        match within(STEP, "read", self.stream.read(&mut chunk)).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// Reads one response: its head, then a `Content-Length` body (or everything up to EOF when it
    /// has none). `None` if the connection closed before a head arrived.
    pub async fn response(&mut self) -> Option<RawResponse> {
        let head_end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            assert!(self.buf.len() < 1 << 20, "response head over 1 MiB");
            if !self.fill().await {
                assert!(self.buf.is_empty(), "connection closed mid-head: {:?}", String::from_utf8_lossy(&self.buf));
                return None;
            }
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default().to_string();
        let headers: Vec<(String, String)> = lines
            .filter(|l| !l.is_empty())
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let length = headers.iter().find(|(k, _)| k == "content-length").and_then(|(_, v)| v.parse::<usize>().ok());
        let body_bytes = match length {
            Some(n) => {
                while self.buf.len() < head_end + n {
                    assert!(self.fill().await, "connection closed mid-body");
                }
                self.buf.drain(..head_end + n).skip(head_end).collect::<Vec<u8>>()
            }
            // A 200 to CONNECT has no body: the tunnel starts right after the head.
            None if status_line.starts_with("HTTP/1.1 200") => {
                self.buf.drain(..head_end);
                Vec::new()
            }
            None => {
                while self.fill().await {}
                self.buf.drain(..).skip(head_end).collect()
            }
        };
        Some(RawResponse { status_line, headers, body: String::from_utf8_lossy(&body_bytes).into_owned() })
    }

    /// Reads one response as the exact bytes on the wire: its head, then a `Content-Length` body (a
    /// `200` without one has none: a tunnel starts after it; anything else without one runs to EOF).
    /// `None` if the connection closed before a byte of it arrived.
    pub async fn response_bytes(&mut self) -> Option<Vec<u8>> {
        let head_end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            assert!(self.buf.len() < 1 << 20, "response head over 1 MiB");
            if !self.fill().await {
                assert!(self.buf.is_empty(), "connection closed mid-head: {:?}", String::from_utf8_lossy(&self.buf));
                return None;
            }
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        let length = head
            .split("\r\n")
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.trim().parse::<usize>().ok());
        let end = match length {
            Some(n) => head_end + n,
            None if head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200") => head_end,
            None => {
                while self.fill().await {}
                self.buf.len()
            }
        };
        while self.buf.len() < end {
            assert!(self.fill().await, "connection closed mid-body");
        }
        Some(self.buf.drain(..end).collect())
    }

    /// Reads exactly `n` bytes (buffered ones first).
    pub async fn read_exact(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            assert!(self.fill().await, "closed after {} of {n} bytes", self.buf.len());
        }
        self.buf.drain(..n).collect()
    }

    /// Waits for EOF (or a reset), failing if more bytes arrive; returns whether it was a clean EOF.
    pub async fn expect_eof(&mut self) -> bool {
        let mut chunk = [0u8; 1024];
        match within(STEP, "wait for close", self.stream.read(&mut chunk)).await {
            Ok(0) => true,
            Ok(n) => panic!("expected EOF, got {:?}", String::from_utf8_lossy(&chunk[..n])),
            Err(_) => false,
        }
    }
}

/// Sends `request` on a fresh connection and reads one response.
pub async fn raw_exchange(proxy: SocketAddr, request: &[u8]) -> RawResponse {
    let mut c = RawClient::connect(proxy).await;
    c.send(request).await;
    c.response().await.expect("a response")
}

/// An egress credential for `sid` naming `policy`, signed with `key`, valid from `iat` to `exp`.
pub fn egress_token(key: &[u8], sid: &str, policy: &str, iat: u64, exp: u64) -> String {
    use sluice::credential::{Claims, Keyring, Kind, SigningKey};
    let claims =
        Claims { sid: sid.into(), kind: Kind::Egress, policy: Some(policy.into()), repo: None, branch: None, iat, exp };
    Keyring::new(SigningKey::from_bytes(key).expect("a test key of 32+ bytes"), None).mint(&claims)
}

/// Runs `cmd` in a shell that sourced `script` and nothing else (PATH aside): a client configured only by
/// what `sluice env` prints. Bounded at 40 s; returns the exit code, stdout and stderr.
pub async fn run_sourced(script: &Path, cmd: &str) -> (Option<i32>, String, String) {
    let out = within(
        Duration::from_secs(40),
        "client",
        tokio::process::Command::new("sh")
            .args(["-c", &format!(". {} && {cmd}", script.display())])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("run client");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The `Proxy-Authorization` value for `sid:token`.
pub fn basic(sid: &str, token: &str) -> String {
    use base64::Engine;
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{sid}:{token}")))
}
