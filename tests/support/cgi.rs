//! An upstream git server for tests and benches: `git http-backend` run as CGI behind hyper on
//! 127.0.0.1 port 0, accepting only `Basic x-access-token:TOKEN` when it has a token.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::{Body, Frame, Incoming};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

type TestBody = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

#[derive(Default)]
pub struct UpstreamState {
    pub root: PathBuf,
    pub home: PathBuf,
    /// `None`: a public upstream that needs no credential.
    pub token: Option<String>,
    pub requests: AtomicUsize,
    pub unauthorized: AtomicUsize,
    pub by_path: Mutex<HashMap<String, usize>>,
    pub authorization_seen: AtomicUsize,
    /// When set, every authorized request is answered `500` with this body instead of by http-backend.
    pub error_body: Mutex<Option<Vec<u8>>>,
}

struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.0.poll_recv(cx).map(|c| c.map(|b| Ok(Frame::data(b))))
    }
}

fn text_response(status: StatusCode, text: &str) -> Response<TestBody> {
    let mut r = Response::new(http_body_util::Full::new(Bytes::from(text.to_owned())).map_err(|n| match n {}).boxed());
    *r.status_mut() = status;
    r
}

async fn cgi(
    state: Arc<UpstreamState>,
    req: Request<Incoming>,
) -> Result<Response<TestBody>, std::convert::Infallible> {
    state.requests.fetch_add(1, Ordering::SeqCst);
    *state.by_path.lock().unwrap().entry(format!("{} {}", req.method(), req.uri().path())).or_default() += 1;
    let auth = req.headers().get("authorization").and_then(|v| v.to_str().ok()).map(str::to_owned);
    if auth.is_some() {
        state.authorization_seen.fetch_add(1, Ordering::SeqCst);
    }
    if let Some(token) = &state.token {
        let want = format!("Basic {}", STANDARD.encode(format!("x-access-token:{token}")));
        if auth.as_deref() != Some(want.as_str()) {
            state.unauthorized.fetch_add(1, Ordering::SeqCst);
            let mut r = text_response(StatusCode::UNAUTHORIZED, "upstream: bad credentials\n");
            r.headers_mut().insert("www-authenticate", "Basic realm=\"upstream\"".parse().unwrap());
            return Ok(r);
        }
    }
    if let Some(body) = state.error_body.lock().unwrap().clone() {
        let mut r = Response::new(http_body_util::Full::new(Bytes::from(body)).map_err(|n| match n {}).boxed());
        *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        return Ok(r);
    }
    let h = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let mut cmd = tokio::process::Command::new(http_backend());
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", &state.home)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_PROJECT_ROOT", &state.root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("REQUEST_METHOD", req.method().as_str())
        .env("PATH_INFO", req.uri().path())
        .env("QUERY_STRING", req.uri().query().unwrap_or(""))
        .env("CONTENT_TYPE", h("content-type"))
        .env("HTTP_CONTENT_ENCODING", h("content-encoding"))
        .env("GIT_PROTOCOL", h("git-protocol"))
        .env("REMOTE_USER", "x-access-token")
        .env("REMOTE_ADDR", "127.0.0.1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    if let Some(len) = req.headers().get("content-length").and_then(|v| v.to_str().ok()) {
        cmd.env("CONTENT_LENGTH", len);
    }
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut body = req.into_body();
    // When the client abandons its request (the body fails before its end), http-backend is killed:
    // waiting for the bytes it was promised, it would otherwise never exit (and can spin at EOF).
    let abandoned = tokio_util::sync::CancellationToken::new();
    let abandoned_rx = abandoned.clone();
    tokio::spawn(async move {
        loop {
            match body.frame().await {
                None => break,
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data()
                        && stdin.write_all(&data).await.is_err()
                    {
                        break;
                    }
                }
                Some(Err(_)) => {
                    abandoned.cancel();
                    break;
                }
            }
        }
        drop(stdin);
    });
    // CGI headers, then the body.
    let mut head = Vec::new();
    let mut buf = [0u8; 65536];
    let split = loop {
        let n = tokio::select! {
            n = stdout.read(&mut buf) => n.unwrap(),
            () = abandoned_rx.cancelled() => {
                let _ = child.kill().await;
                return Ok(text_response(StatusCode::BAD_REQUEST, "upstream: request abandoned\n"));
            }
        };
        assert!(n > 0, "http-backend wrote no headers");
        head.extend_from_slice(&buf[..n]);
        if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break (i, 4);
        }
        if let Some(i) = head.windows(2).position(|w| w == b"\n\n") {
            break (i, 2);
        }
    };
    let rest = head.split_off(split.0 + split.1);
    let mut resp = Response::builder().status(200);
    for line in String::from_utf8_lossy(&head[..split.0]).lines() {
        let Some((k, v)) = line.split_once(':') else { continue };
        if k.eq_ignore_ascii_case("status") {
            resp = resp.status(v.trim()[..3].parse::<u16>().unwrap());
        } else {
            resp = resp.header(k.trim(), v.trim());
        }
    }
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tokio::spawn(async move {
        if !rest.is_empty() && tx.send(Bytes::from(rest)).await.is_err() {
            return;
        }
        loop {
            let mut chunk = vec![0u8; 65536];
            let read = tokio::select! {
                read = stdout.read(&mut chunk) => read,
                () = abandoned_rx.cancelled() => break,
            };
            match read {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    chunk.truncate(n);
                    if tx.send(Bytes::from(chunk)).await.is_err() {
                        break;
                    }
                }
            }
        }
        // Bounded: a backend that has not exited within a minute of its output ending is killed.
        if tokio::time::timeout(Duration::from_secs(60), child.wait()).await.is_err() {
            let _ = child.kill().await;
        }
    });
    Ok(resp.body(ChannelBody(rx).boxed()).unwrap())
}

/// The `git-http-backend` program itself: run through `git http-backend`, it is a grandchild that
/// killing the child leaves behind.
fn http_backend() -> &'static std::path::Path {
    static PATH: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let out = std::process::Command::new("git").arg("--exec-path").output().expect("git --exec-path");
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("git-http-backend")
    })
}

pub async fn spawn_upstream(state: Arc<UpstreamState>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { break };
            let state = state.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| cgi(state.clone(), req));
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    addr
}

/// Deterministic incompressible bytes (xorshift), for repositories that do not compress away.
pub fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        out.extend_from_slice(&seed.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The same upstream behind TLS (`acceptor`'s certificate), for clients that clone over https.
#[allow(dead_code)]
pub async fn spawn_tls_upstream(state: Arc<UpstreamState>, acceptor: tokio_rustls::TlsAcceptor) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { break };
            let (state, acceptor) = (state.clone(), acceptor.clone());
            tokio::spawn(async move {
                let Ok(Ok(tls)) = tokio::time::timeout(Duration::from_secs(20), acceptor.accept(stream)).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |req| cgi(state.clone(), req));
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), svc).await;
            });
        }
    });
    addr
}
