//! The upstream side: pooled HTTP/1.1 clients for the configured git host, the API and the log storage
//! a redirect names. Every dial goes through `net` (the resolver's `[resolver] hosts`, the connect
//! timeout, DNS and connect metrics, the address guard); requests carry the real token instead of the
//! sandbox's credential, and no redirect is ever followed here.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, Uri, header};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::{Body, Incoming};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use ipnet::IpNet;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::config::ResolverConfig;
use crate::credential::Secret;
use crate::metrics::Metrics;
use crate::net::{Resolver, UpstreamDialError, UpstreamGuard, connect_upstream};

/// How long dialling an upstream may take when the server configures nothing else.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a pooled connection may sit idle before it is closed.
const POOL_IDLE: Duration = Duration::from_secs(60);
/// Idle connections kept per upstream host.
const POOL_MAX_IDLE_PER_HOST: usize = 8;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body of every upstream request, whatever the caller streams.
type UpBody = UnsyncBoxBody<Bytes, BoxError>;

/// Request headers git needs upstream; everything else (the sandbox's `Authorization` first of all)
/// stays behind.
pub const FORWARDED_REQUEST_HEADERS: [header::HeaderName; 5] =
    [header::ACCEPT, header::ACCEPT_ENCODING, header::CONTENT_TYPE, header::CONTENT_ENCODING, header::USER_AGENT];

/// The `Git-Protocol` header (protocol v2 negotiation).
pub const GIT_PROTOCOL: &str = "git-protocol";

/// Response headers passed back to the client.
pub const FORWARDED_RESPONSE_HEADERS: [header::HeaderName; 5] =
    [header::CONTENT_TYPE, header::CONTENT_ENCODING, header::CACHE_CONTROL, header::EXPIRES, header::PRAGMA];

/// Why the upstream exchange failed. Messages name the upstream host, never a credential.
#[derive(Debug)]
pub enum UpstreamError {
    /// The upstream could not be reached: DNS, the address guard, the dial or the TLS handshake.
    Connect {
        code: &'static str,
        message: String,
    },
    Timeout(String),
    Exchange(String),
}

impl UpstreamError {
    /// A stable code for logs and refusals.
    pub fn code(&self) -> &'static str {
        match self {
            UpstreamError::Connect { code, .. } => code,
            UpstreamError::Timeout(_) => "upstream_timeout",
            UpstreamError::Exchange(_) => "upstream_exchange_failed",
        }
    }
}

impl fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpstreamError::Connect { message, .. }
            | UpstreamError::Timeout(message)
            | UpstreamError::Exchange(message) => f.write_str(message),
        }
    }
}

/// What every upstream dial goes through: the server's resolver, its own listening addresses (never
/// dialled), the metrics DNS and connect latency go to, and the connect timeout.
#[derive(Clone)]
pub struct Dialer {
    pub resolver: Arc<Resolver>,
    pub own: Arc<[SocketAddr]>,
    pub metrics: Arc<Metrics>,
    pub connect_timeout: Duration,
}

impl fmt::Debug for Dialer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dialer").field("own", &self.own).field("connect_timeout", &self.connect_timeout).finish()
    }
}

impl Dialer {
    /// The system resolver, no own addresses, metrics of its own: for a git proxy built outside `serve`.
    pub fn system() -> Result<Dialer, String> {
        Ok(Dialer {
            resolver: Arc::new(Resolver::new(&ResolverConfig::default())?),
            own: Arc::from(Vec::new()),
            metrics: Arc::new(Metrics::default()),
            connect_timeout: CONNECT_TIMEOUT,
        })
    }
}

/// Why a pooled client could not connect; [`Pool::send`] finds it under hyper's error.
#[derive(Debug)]
enum ConnectError {
    Dial(UpstreamDialError),
    Tls { host: String, detail: String },
    TlsTimeout { host: String },
    NoHost,
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectError::Dial(e) => e.fmt(f),
            ConnectError::Tls { host, detail } => write!(f, "TLS handshake with {host} failed: {detail}"),
            ConnectError::TlsTimeout { host } => write!(f, "TLS handshake with {host} timed out"),
            ConnectError::NoHost => f.write_str("the upstream URL has no host"),
        }
    }
}

impl std::error::Error for ConnectError {}

impl ConnectError {
    /// The stable code of a connect failure; `None` for a timeout.
    fn code(&self) -> Option<&'static str> {
        match self {
            ConnectError::Dial(e) if e.is_timeout() => None,
            ConnectError::TlsTimeout { .. } => None,
            ConnectError::Dial(e) => Some(e.code()),
            ConnectError::Tls { .. } => Some("upstream_tls_failed"),
            ConnectError::NoHost => Some("upstream_invalid_host"),
        }
    }
}

/// A plain or TLS connection to an upstream.
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Connection for Conn {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Dials the request URI's host through `net` (with the address guard when `guard` is set) and adds
/// TLS for `https`.
#[derive(Clone)]
struct Connector {
    dialer: Dialer,
    guard: Option<Arc<[IpNet]>>,
    tls: TlsConnector,
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<Conn>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<TokioIo<Conn>, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let host = uri.host().ok_or(ConnectError::NoHost)?;
            let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
            let https = uri.scheme_str() == Some("https");
            let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
            let d = &this.dialer;
            let guard = UpstreamGuard { guard: this.guard.as_deref(), own: &d.own };
            let (tcp, _) = connect_upstream(&host, port, &d.resolver, guard, d.connect_timeout, &d.metrics)
                .await
                .map_err(ConnectError::Dial)?;
            let _ = tcp.set_nodelay(true);
            if !https {
                return Ok(TokioIo::new(Conn::Plain(tcp)));
            }
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|e| ConnectError::Tls { host: host.clone(), detail: e.to_string() })?;
            let tls = tokio::time::timeout(d.connect_timeout, this.tls.connect(name, tcp))
                .await
                .map_err(|_| ConnectError::TlsTimeout { host: host.clone() })?
                .map_err(|e| ConnectError::Tls { host: host.clone(), detail: e.to_string() })?;
            Ok(TokioIo::new(Conn::Tls(Box::new(tls))))
        })
    }
}

/// A pooled HTTP/1.1 client: connections are kept per scheme and host and reused, so the lookups a
/// write makes before it is forwarded ride the connection the write then uses.
#[derive(Clone)]
pub struct Pool {
    client: Client<Connector, UpBody>,
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pool")
    }
}

impl Pool {
    /// `guard`: `None` for an upstream the operator configured (any address but the proxy's own);
    /// `Some(allow_ips)` for hosts the proxy is sent to (the address guard, lifted for those ranges).
    pub fn new(dialer: &Dialer, guard: Option<Vec<IpNet>>) -> Pool {
        let connector = Connector { dialer: dialer.clone(), guard: guard.map(Arc::from), tls: tls_connector() };
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE)
            .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
            .build(connector);
        Pool { client }
    }

    /// Sends `req` (an absolute URI) and returns the response head; `authority` names the host in errors.
    pub async fn send<B>(&self, req: Request<B>, authority: &str) -> Result<Response<Incoming>, UpstreamError>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let req = req.map(|b| b.map_err(Into::into).boxed_unsync());
        self.client.request(req).await.map_err(|e| {
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                if let Some(c) = s.downcast_ref::<ConnectError>() {
                    let message = format!("cannot reach {authority}: {c}");
                    return match c.code() {
                        Some(code) => UpstreamError::Connect { code, message },
                        None => UpstreamError::Timeout(message),
                    };
                }
                source = s.source();
            }
            UpstreamError::Exchange(format!("exchange with {authority} failed: {}", describe(&e)))
        })
    }
}

/// hyper's error with its causes, which say what actually went wrong.
fn describe(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// A parsed `upstream` URL (`http://` or `https://`, a host, an optional port and path prefix) and the
/// pooled client that reaches it.
pub struct Upstream {
    pool: Pool,
    https: bool,
    /// `host[:port]`, for the `Host` header and messages.
    authority: String,
    /// Without a trailing `/`; empty for `https://github.com`.
    base_path: String,
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Upstream({})", self.base_url())
    }
}

impl Upstream {
    /// Parses `https://github.com`, `http://127.0.0.1:8080/git`, …; dials go through `dialer`, to any
    /// address but the proxy's own (the operator chose this host; it may well be a private mirror).
    pub fn parse(key: &str, url: &str, dialer: &Dialer) -> Result<Upstream, String> {
        let bad = |why: &str| format!("invalid {key} {url:?}: {why}");
        let uri: http::Uri = url.parse().map_err(|_| bad("expected a URL such as \"https://github.com\""))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(bad("expected an http:// or https:// URL")),
        };
        let authority = uri.authority().ok_or_else(|| bad("the URL has no host"))?;
        if authority.as_str().contains('@') {
            return Err(bad("credentials do not belong in the URL; use token_env, token_file or [git.tokens]"));
        }
        if uri.query().is_some() {
            return Err(bad("the URL must not have a query"));
        }
        Ok(Upstream {
            pool: Pool::new(dialer, None),
            https,
            authority: authority.as_str().to_owned(),
            base_path: uri.path().trim_end_matches('/').to_owned(),
        })
    }

    /// `host[:port]`, for messages.
    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// `http[s]://host[:port]/base`, as configured, without a trailing `/`.
    pub fn base_url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}{}", self.authority, self.base_path)
    }

    /// Sends one request to `{base}/{path_and_query}` with the given headers (already filtered) and the
    /// real token's `Authorization` value ([`basic_auth`] or [`bearer_auth`]), when there is one, over
    /// a pooled connection.
    pub async fn send<B>(
        &self,
        method: Method,
        path_and_query: &str,
        mut headers: HeaderMap,
        authorization: Option<HeaderValue>,
        body: B,
    ) -> Result<Response<Incoming>, UpstreamError>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        headers.remove(header::AUTHORIZATION);
        if let Some(value) = authorization {
            headers.insert(header::AUTHORIZATION, value);
        }
        let host = HeaderValue::from_str(&self.authority)
            .map_err(|_| UpstreamError::Exchange(format!("invalid upstream host {:?}", self.authority)))?;
        headers.insert(header::HOST, host);
        let target = format!("{}/{}", self.base_url(), path_and_query);
        let mut req =
            Request::builder().method(method).uri(&target).body(body).map_err(|e| {
                UpstreamError::Exchange(format!("cannot build the upstream request for {target:?}: {e}"))
            })?;
        *req.headers_mut() = headers;
        self.pool.send(req, &self.authority).await
    }
}

fn tls_connector() -> TlsConnector {
    let roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // The ring provider supports the default protocol versions, so this builder step cannot fail;
    // fall back to an explicit TLS 1.3 list all the same rather than panic.
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .or_else(|_| {
            rustls::ClientConfig::builder_with_provider(provider).with_protocol_versions(&[&rustls::version::TLS13])
        });
    let mut config = match builder {
        Ok(b) => b.with_root_certificates(roots).with_no_client_auth(),
        Err(_) => unreachable!("ring supports TLS 1.3"),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    TlsConnector::from(Arc::new(config))
}

/// `Basic base64("x-access-token:" + token)`, marked sensitive so hyper never logs it.
pub fn basic_auth(token: &Secret<String>) -> HeaderValue {
    let encoded = STANDARD.encode(format!("x-access-token:{}", token.expose()));
    match HeaderValue::from_str(&format!("Basic {encoded}")) {
        Ok(mut v) => {
            v.set_sensitive(true);
            v
        }
        // Base64 output is always a valid header value.
        Err(_) => HeaderValue::from_static(""),
    }
}

/// `Bearer TOKEN`, the form the GitHub REST API documents, marked sensitive so hyper never logs it.
pub fn bearer_auth(token: &Secret<String>) -> HeaderValue {
    match HeaderValue::from_str(&format!("Bearer {}", token.expose())) {
        Ok(mut v) => {
            v.set_sensitive(true);
            v
        }
        // `check_token` admits printable ASCII only, which is always a valid header value.
        Err(_) => HeaderValue::from_static(""),
    }
}

/// Removes the token from text that came from upstream: the raw value and its base64 forms (alone
/// and as `x-access-token:TOKEN`, standard and URL-safe, padded or not), see [`super::scrub`].
pub fn scrub(text: &str, token: Option<&Secret<String>>) -> String {
    super::scrub::Scrubber::new(token).text(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use http_body_util::Empty;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    fn dialer(hosts: &[(&str, &str)]) -> Dialer {
        let mut config = ResolverConfig { system: false, ..ResolverConfig::default() };
        for (name, ip) in hosts {
            config.hosts.insert((*name).into(), vec![ip.parse().unwrap()]);
        }
        Dialer {
            resolver: Arc::new(Resolver::new(&config).unwrap()),
            own: Arc::from(Vec::new()),
            metrics: Arc::new(Metrics::default()),
            connect_timeout: Duration::from_secs(5),
        }
    }

    #[test]
    fn parses_upstream_urls() {
        let d = dialer(&[]);
        let u = Upstream::parse("git.upstream", "https://github.com", &d).unwrap();
        assert_eq!((u.authority(), u.base_path.as_str(), u.https), ("github.com", "", true));
        let u = Upstream::parse("git.upstream", "http://127.0.0.1:8080/git/", &d).unwrap();
        assert_eq!((u.base_path.as_str(), u.authority()), ("/git", "127.0.0.1:8080"));
        assert_eq!(u.base_url(), "http://127.0.0.1:8080/git");
        assert_eq!(
            Upstream::parse("git.upstream", "ftp://x", &d).unwrap_err(),
            "invalid git.upstream \"ftp://x\": expected an http:// or https:// URL"
        );
        assert_eq!(
            Upstream::parse("git.upstream", "https://u:p@github.com", &d).unwrap_err(),
            "invalid git.upstream \"https://u:p@github.com\": credentials do not belong in the URL; use token_env, token_file or [git.tokens]"
        );
    }

    /// A keep-alive HTTP/1.1 server answering every request `200 ok`, counting connections and requests.
    async fn counting_server() -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (conns, reqs) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (c, r) = (conns.clone(), reqs.clone());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                let r = r.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    while let Ok(n) = s.read(&mut chunk).await {
                        if n == 0 {
                            break;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            r.fetch_add(1, Ordering::SeqCst);
                            let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
                        }
                    }
                });
            }
        });
        (addr, conns, reqs)
    }

    #[tokio::test]
    async fn requests_to_one_host_share_a_pooled_connection_dialled_through_net() {
        let (addr, conns, reqs) = counting_server().await;
        let d = dialer(&[("api.test", "127.0.0.1")]);
        let u = Upstream::parse("git.api_upstream", &format!("http://api.test:{}", addr.port()), &d).unwrap();
        for _ in 0..3 {
            let resp = u.send(Method::GET, "repos/a/b", HeaderMap::new(), None, Empty::<Bytes>::new()).await.unwrap();
            assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "ok");
        }
        assert_eq!((conns.load(Ordering::SeqCst), reqs.load(Ordering::SeqCst)), (1, 3));
        let text = d.metrics.render();
        assert!(text.contains("sluice_upstream_connect_seconds_count 1"), "{text}");
        assert!(text.contains("sluice_dns_seconds_count 1"), "{text}");
    }

    #[tokio::test]
    async fn a_guarded_pool_refuses_loopback_before_any_dial_and_the_own_address_always() {
        let (addr, conns, _) = counting_server().await;
        let d = dialer(&[("logs.test", "127.0.0.1")]);
        let guarded = Pool::new(&d, Some(Vec::new()));
        let req = |host: &str| {
            Request::get(format!("http://{host}:{}/log", addr.port())).body(Empty::<Bytes>::new()).unwrap()
        };
        match guarded.send(req("logs.test"), "logs.test").await {
            Err(UpstreamError::Connect { code, message }) => {
                assert_eq!(code, "upstream_blocked_address");
                assert!(message.starts_with("cannot reach logs.test: upstream \"logs.test\" resolves to 127.0.0.1"));
            }
            other => panic!("expected a guard refusal, got {other:?}"),
        }
        assert_eq!(conns.load(Ordering::SeqCst), 0, "refused before any dial");
        let lifted = Pool::new(&d, Some(vec!["127.0.0.0/8".parse().unwrap()]));
        assert_eq!(lifted.send(req("logs.test"), "logs.test").await.unwrap().status(), 200);
        let own = Dialer { own: Arc::from(vec![addr]), ..d.clone() };
        match Pool::new(&own, None).send(req("127.0.0.1"), "127.0.0.1").await {
            Err(e) => assert_eq!(e.code(), "upstream_own_address"),
            Ok(r) => panic!("the proxy's own address was dialled: {}", r.status()),
        }
    }

    #[test]
    fn scrub_removes_every_form_of_the_token() {
        let token = Secret::new("ghp_S3cr3t/+=".to_owned());
        let b64 = STANDARD.encode("x-access-token:ghp_S3cr3t/+=");
        let text = format!("a ghp_S3cr3t/+= b {b64} c {} d", URL_SAFE_NO_PAD.encode("ghp_S3cr3t/+="));
        let clean = scrub(&text, Some(&token));
        assert_eq!(clean, "a [redacted] b [redacted] c [redacted] d");
        assert_eq!(scrub("plain", None), "plain");
        let v = basic_auth(&token);
        assert!(v.is_sensitive());
        assert_eq!(v.to_str().unwrap(), format!("Basic {b64}"));
    }
}
