//! Terminated tunnels (SPEC §8): a CONNECT the policy inspects is answered `200` only once its
//! upstream is reachable and has presented a certificate that verifies; the client's TLS is then
//! served with a leaf from the CA, hyper reads each request inside (HTTP/1.1 or HTTP/2), and every
//! request passes the fronting guard and the request rules before it goes upstream over the tunnel's
//! own pooled TLS connection(s). Each inner request gets its own decision record.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, ServerConfig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::client::TlsStream;

use super::admit::{Admission, WouldDeny};
use super::forward::{self, BodyCap, Counted, Finish, Finished, strip_hop_by_hop};
use super::record::Record;
use super::respond::{self, ProxyBody};
use super::shaped::Shaped;
use super::tunnel::{self, Counters, TunnelEnd};
use super::{EgressProxy, Session};
use crate::inspect::{LeafCache, TargetCert};
use crate::limit::{Direction, Lease};
use crate::policy::{Authority, Decision, Target};
use crate::refusal::Refusal;
use crate::tls;

/// Concurrent HTTP/2 streams a client may open in one terminated tunnel.
const MAX_STREAMS: u32 = 100;

/// Upstream connections one terminated tunnel may hold at once; a request that finds them all busy
/// waits (up to `connect_timeout`) for one to come back.
pub(crate) const MAX_UPSTREAM: usize = 8;

/// What an HTTP/2 upstream connection buffers per stream for sending (hyper's default is 1 MiB).
const H2_SEND_BUF: usize = 64 * 1024;

/// What the server holds to terminate tunnels: the leaves, the client-facing config, and the
/// upstream leg's configs (web PKI plus `extra_roots`).
pub struct Terminator {
    leaves: Arc<LeafCache>,
    /// Serves the leaf for the SNI (which the fronting guard has checked is the CONNECT host).
    server: Arc<ServerConfig>,
    /// ALPN `h2`, `http/1.1`.
    client: Arc<ClientConfig>,
    /// ALPN `http/1.1` alone: a connection that is to carry an upgrade.
    client_h1: Arc<ClientConfig>,
}

impl std::fmt::Debug for Terminator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Terminator").field("leaves", &self.leaves).finish_non_exhaustive()
    }
}

impl Terminator {
    pub fn new(leaves: Arc<LeafCache>, extra_roots: &[CertificateDer<'static>]) -> Result<Terminator, String> {
        Ok(Terminator {
            server: tls::server_config(leaves.clone())?,
            client: tls::client_config(extra_roots, &tls::ALPN)?,
            client_h1: tls::client_config(extra_roots, &[b"http/1.1"])?,
            leaves,
        })
    }

    /// A client that sent no SNI (an IP destination) gets the CONNECT target's leaf.
    fn server_for(&self, target: &Target) -> Result<Arc<ServerConfig>, String> {
        tls::server_config(Arc::new(TargetCert { cache: self.leaves.clone(), target: target.clone() }))
    }
}

/// An admitted CONNECT whose upstream has verified: what the tunnel needs once the `200` is sent.
pub(crate) struct Opened {
    pub decision: Decision,
    pub would_deny: Option<WouldDeny>,
    pub addr: SocketAddr,
    pub permit: Option<Lease>,
    upstream: TlsStream<TcpStream>,
}

/// The upstream leg's TLS handshake on an admitted CONNECT, before its `200`: a certificate that does
/// not verify is `502 upstream_cert_invalid` saying why.
pub(crate) async fn open(
    proxy: &EgressProxy,
    terminator: &Terminator,
    authority: &Authority,
    admission: Admission,
) -> Result<Opened, Refusal> {
    let Admission { decision, would_deny, stream, addr, permit } = admission;
    let upstream = handshake(terminator.client.clone(), authority, stream, proxy.config.connect_timeout.0).await?;
    Ok(Opened { decision, would_deny, addr, permit, upstream })
}

async fn handshake(
    config: Arc<ClientConfig>,
    authority: &Authority,
    stream: TcpStream,
    wait: Duration,
) -> Result<TlsStream<TcpStream>, Refusal> {
    let name = tls::server_name(&authority.target)
        .map_err(|e| Refusal::bad_request(format!("{authority} cannot be a TLS server name: {e}")))?;
    let connector = tokio_rustls::TlsConnector::from(config);
    match tokio::time::timeout(wait, connector.connect(name, stream)).await {
        Ok(Ok(tls)) => Ok(tls),
        Ok(Err(e)) => Err(match tls::rustls_error(&e).and_then(tls::certificate_problem) {
            Some(why) => Refusal::upstream_cert_invalid(authority, why),
            None => Refusal::bad_upstream(format!("the TLS handshake with {authority} failed: {e}")),
        }),
        Err(_) => Err(Refusal::unreachable(
            "upstream_timeout",
            true,
            format!("the TLS handshake with {authority} did not finish within {}s", wait.as_secs()),
        )),
    }
}

/// Runs a terminated tunnel to its end (its client's bytes `early` first), then counts it and writes
/// its closing line. Its requests' lines are written as they are decided and finish.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run<S>(
    proxy: Arc<EgressProxy>,
    terminator: Arc<Terminator>,
    session: Session,
    authority: Authority,
    opened: Opened,
    mut record: Record,
    client: S,
    early: Vec<u8>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Opened { decision, would_deny, addr, permit, upstream } = opened;
    record.restart();
    record.terminated();
    let metrics = &proxy.metrics;
    metrics.open_tunnels.inc();
    metrics.tunnels_total.inc();
    let read = Arc::new(AtomicU64::new(0));
    let written = Arc::new(AtomicU64::new(0));
    let io = ClientIo { early, pos: 0, inner: client, read: read.clone(), written: written.clone() };
    let peer = record.client();
    // An upgraded connection (WebSocket) is relayed like a tunnel, against the lease's meter: its
    // bytes are counted, shaped and charged to the session's quota as they move.
    let meter = permit.as_ref().map(|lease| lease.meter());
    let budget = meter.as_ref().and_then(|m| m.budget().cloned());
    let counters = Arc::new(Counters::metered(meter));
    let tunnel = Arc::new(Tunnel {
        proxy: proxy.clone(),
        terminator,
        session,
        authority,
        decision,
        would_deny,
        addr,
        peer,
        pool: Pool::new(upstream),
        relay: Mutex::new(None),
        counters: counters.clone(),
        quota_refused: AtomicBool::new(false),
    });
    let this = tunnel.clone();
    let idle = proxy.config.idle_timeout.0;
    // The tunnel (and its place under max_tunnels) lasts until its upgraded relay, if any, ends too.
    let end = tokio::select! {
        end = serve(tunnel, io) => end,
        () = proxy.shutdown.hard_stop.cancelled() => "shutdown",
        () = quiet(&read, &written, idle) => "idle_timeout",
    };
    // A request refused for the spent quota closed the client's connection after its 429.
    let end = if this.quota_refused.load(Ordering::Relaxed) { TunnelEnd::QuotaExceeded.as_str() } else { end };
    drop(this);
    metrics.shaped(counters.shaping_wait());
    // The relay's bytes are in no request's record: the tunnel's metrics count them.
    metrics.bytes_up.inc_by(counters.up.load(Ordering::Relaxed));
    metrics.bytes_down.inc_by(counters.down.load(Ordering::Relaxed));
    if end == TunnelEnd::QuotaExceeded.as_str() {
        metrics.quota_closed_tunnels.inc();
        if let Some(spent) = budget.as_ref().and_then(|b| b.spent()) {
            record.quota_closed(&proxy, &spent.refusal(crate::credential::now_unix()));
        }
    }
    metrics.open_tunnels.dec();
    drop(permit);
    record.closed(&proxy, read.load(Ordering::Relaxed), written.load(Ordering::Relaxed), end, None);
}

/// An upgraded connection's relay, run by the tunnel once hyper has handed the connection over.
type Relay = Pin<Box<dyn Future<Output = Option<tunnel::TunnelStats>> + Send>>;

/// Returns once neither side of the client's connection moved a byte for `idle`.
async fn quiet(read: &AtomicU64, written: &AtomicU64, idle: Duration) {
    let mut last = (u64::MAX, u64::MAX);
    loop {
        tokio::time::sleep(idle).await;
        let now = (read.load(Ordering::Relaxed), written.load(Ordering::Relaxed));
        if now == last {
            return;
        }
        last = now;
    }
}

/// The client's TLS: refused when it is not TLS or names another host; then hyper serves it.
async fn serve<S>(tunnel: Arc<Tunnel>, mut io: ClientIo<S>) -> &'static str
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let proxy = &tunnel.proxy;
    let wait = proxy.config.header_timeout.0;
    match tokio::time::timeout(wait, io.first_byte()).await {
        Ok(Some(0x16)) => {}
        Ok(Some(_)) => {
            let refusal = tunnel.session.names(Refusal::not_tls(&tunnel.authority));
            tunnel.refused(&Method::GET, "-", &refusal);
            let _ = io.write_all(&respond::bytes(&refusal, false, Version::HTTP_11)).await;
            let _ = io.shutdown().await;
            return "not_tls";
        }
        Ok(None) => return "client_closed",
        Err(_) => return "client_hello_timeout",
    }
    let acceptor = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io);
    let start = match tokio::time::timeout(wait, acceptor).await {
        Ok(Ok(start)) => start,
        _ => return "bad_client_hello",
    };
    let sni = start.client_hello().server_name().map(str::to_string);
    let config = match &sni {
        Some(sni) if !super::sni::names_target(sni, &tunnel.authority.target) => {
            let refusal = tunnel.session.names(Refusal::host_mismatch(&tunnel.authority, sni, "ClientHello's SNI"));
            tracing::warn!(destination = %tunnel.authority, sni = %sni, "terminated tunnel refused: the SNI names another host");
            tunnel.refused(&Method::GET, "-", &refusal);
            return "sni_mismatch";
        }
        Some(_) => tunnel.terminator.server.clone(),
        None => match tunnel.terminator.server_for(&tunnel.authority.target) {
            Ok(config) => config,
            Err(e) => {
                tracing::error!(destination = %tunnel.authority, error = %e, "no server config for a terminated tunnel");
                return "internal_error";
            }
        },
    };
    let tls = match tokio::time::timeout(wait, start.into_stream(config)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!(destination = %tunnel.authority, error = %e, "client TLS handshake failed in a terminated tunnel");
            return "client_tls_failed";
        }
        Err(_) => return "client_tls_timeout",
    };
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(proxy.config.header_timeout.0 * 2)
        .max_buf_size(proxy.config.max_header_bytes.max(8192) * 2)
        .keep_alive(true);
    // Each concurrent h2 stream may take an upstream HTTP/1.1 connection of its own: bounded here.
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS)
        .max_header_list_size((proxy.config.max_header_bytes * 2) as u32);
    let t = tunnel.clone();
    let service = service_fn(move |req| {
        let t = t.clone();
        async move { Ok::<_, Infallible>(t.handle(req).await) }
    });
    match builder.serve_connection_with_upgrades(TokioIo::new(tls), service).await {
        Ok(()) => {
            // A 101 ended hyper's connection: the tunnel goes on as the relay, and ends with it.
            let relay = tunnel.relay.lock().unwrap_or_else(|p| p.into_inner()).take();
            match relay {
                Some(relay) => relay.await.map_or("upgrade_failed", |stats| stats.end.as_str()),
                None => "complete",
            }
        }
        Err(e) => {
            tracing::debug!(destination = %tunnel.authority, error = %e, "terminated tunnel ended with an error");
            "client_error"
        }
    }
}

/// One terminated tunnel: what its requests are decided against and where they go.
struct Tunnel {
    proxy: Arc<EgressProxy>,
    terminator: Arc<Terminator>,
    session: Session,
    /// The CONNECT host: the SNI, every `Host` and `:authority` must name it.
    authority: Authority,
    /// The CONNECT's host decision (an allow, or in report mode the deny it reports).
    decision: Decision,
    would_deny: Option<WouldDeny>,
    /// The checked address the CONNECT dialled: every upstream connection of the tunnel goes there.
    addr: SocketAddr,
    peer: SocketAddr,
    pool: Pool,
    /// Set by a request whose upgrade was answered `101`; [`serve`] runs it once hyper lets go.
    relay: Mutex<Option<Relay>>,
    /// The tunnel's lease meter, for the relay.
    counters: Arc<Counters>,
    /// A request was refused `429 quota_exceeded`: the tunnel ends with it.
    quota_refused: AtomicBool,
}

impl Tunnel {
    fn refused(&self, method: &Method, path: &str, refusal: &Refusal) {
        let record = Record::inspected(method, self.peer, &self.session, &self.authority, path);
        record.refused(&self.proxy, refusal, method.as_str(), &self.authority.to_string());
    }

    /// One request inside the tunnel: its answer, or the refusal rendered like every other.
    async fn handle(self: &Arc<Self>, req: Request<Incoming>) -> Response<ProxyBody> {
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let wants_json = super::wants_json(req.headers().get(header::ACCEPT));
        let record = Record::inspected(&method, self.peer, &self.session, &self.authority, &path);
        match self.exchange(req, record).await {
            Ok(response) => response,
            Err((refusal, record)) => {
                let refusal = self.session.names(refusal);
                if refusal.code == "quota_exceeded" {
                    self.quota_refused.store(true, Ordering::Relaxed);
                }
                record.refused(&self.proxy, &refusal, method.as_str(), &self.authority.to_string());
                respond::response(&refusal, wants_json)
            }
        }
    }

    /// An HTTP/1.1 connection goes back to the pool once its exchange is over (its response body
    /// read); an HTTP/2 one never left it.
    fn give_back(self: &Arc<Self>, sender: Sender) {
        let Sender::H1(mut s) = sender else { return };
        let tunnel = self.clone();
        self.proxy.shutdown.spawn(async move {
            if s.ready().await.is_ok() {
                tunnel.pool.idle.lock().unwrap_or_else(|p| p.into_inner()).push(Sender::H1(s));
                tunnel.pool.freed.notify_one();
            }
        });
    }

    /// The fronting guard: the request's `:authority` and `Host` name the CONNECT host.
    fn fronting(&self, req: &Request<Incoming>) -> Result<(), Refusal> {
        let check = |text: &str, what: &str| match Authority::parse(text, Some(443)) {
            Ok(a) if a == self.authority => Ok(()),
            _ => Err(Refusal::host_mismatch(&self.authority, text, what)),
        };
        let named = req.uri().authority().map(|a| a.as_str());
        if let Some(a) = named {
            check(a, if req.version() == Version::HTTP_2 { ":authority" } else { "request target" })?;
        }
        let hosts: Vec<&HeaderValue> = req.headers().get_all(header::HOST).iter().collect();
        if hosts.len() > 1 {
            return Err(Refusal::bad_request("request has more than one Host header"));
        }
        if let Some(host) = hosts.first() {
            check(host.to_str().unwrap_or("?"), "Host header")?;
        } else if named.is_none() {
            return Err(Refusal::bad_request("the request names no host (no Host header, no :authority)"));
        }
        Ok(())
    }

    async fn exchange(
        self: &Arc<Self>,
        mut req: Request<Incoming>,
        mut record: Record,
    ) -> Result<Response<ProxyBody>, (Refusal, Record)> {
        if req.method() == Method::CONNECT || req.method().as_str() == "PRI" {
            return Err((Refusal::method_not_allowed(&self.authority, req.method().as_str()), record));
        }
        if let Err(refusal) = self.fronting(&req) {
            return Err((refusal, record));
        }
        let upgrade = is_upgrade(&req);
        if upgrade && let Err(why) = websocket_only(&req) {
            return Err((Refusal::upgrade_refused(&self.authority, why), record));
        }
        let proxy = &self.proxy;
        let policy = &self.session.policy;
        let verdict = match forward::request_verdict(policy, &self.authority, &req) {
            Ok(v) => v,
            Err(refusal) => return Err((refusal, record)),
        };
        let (decision, max_body, would_deny) = match verdict {
            Some(v) => (v.decision, v.max_body, v.would_deny),
            None => (self.decision.clone(), None, self.would_deny.clone()),
        };
        // Each inner request passes the session's request rate and byte quotas, as a plain-HTTP
        // request does. A spent quota also ends the tunnel (the refusal closes the connection).
        if let Err(refusal) = proxy.limit_request(&self.session).await {
            let closing = refusal.code == "quota_exceeded";
            return Err((refusal.closing(closing), record));
        }
        let method = req.method().clone();
        let cap = max_body.map(|max| BodyCap { max, rule: decision.clone() });
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let meter = proxy.limiter.meter(&self.session.limit_key, &policy.limits);
        let budget = meter.budget().cloned();
        let (mut parts, body) = req.into_parts();
        let protocol = parts.headers.get(header::UPGRADE).cloned();
        // gRPC's `te: trailers` is the one TE an HTTP/2 request may carry (RFC 9113 §8.2.2): kept when
        // the upstream leg is HTTP/2 too.
        let te_trailers = parts.version == Version::HTTP_2
            && parts.headers.get_all(header::TE).iter().any(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
        strip_hop_by_hop(&mut parts.headers);
        // Only meaningful with an h2c upgrade, which never passes.
        parts.headers.remove("http2-settings");
        let sent = Arc::new(AtomicU64::new(0));
        let over = Arc::new(AtomicU64::new(0));
        let counted = Counted {
            inner: Shaped::new(body, budget.clone(), Direction::Up),
            count: sent.clone(),
            max: cap.as_ref().map(|c| c.max),
            over: over.clone(),
        };
        let sender = if upgrade { self.pool.dial(self, true).await } else { self.pool.take(self).await };
        let mut sender = match sender {
            Ok(s) => s,
            Err(refusal) => return Err((refusal, record)),
        };
        let host = match self.authority.port {
            443 => self.authority.target.to_authority_host(),
            p => format!("{}:{p}", self.authority.target.to_authority_host()),
        };
        let h2 = match &sender {
            Sender::H1(_) => {
                parts.version = Version::HTTP_11;
                match HeaderValue::from_str(&host) {
                    Ok(v) => parts.headers.insert(header::HOST, v),
                    Err(_) => return Err((Refusal::bad_request("bad host"), record)),
                };
                if let (true, Some(p)) = (upgrade, &protocol) {
                    parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                    parts.headers.insert(header::UPGRADE, p.clone());
                }
                false
            }
            Sender::H2(_) => {
                parts.version = Version::HTTP_2;
                parts.headers.remove(header::HOST);
                if te_trailers {
                    parts.headers.insert(header::TE, HeaderValue::from_static("trailers"));
                }
                true
            }
        };
        parts.uri = match upstream_uri(h2, &host, &parts.uri) {
            Ok(uri) => uri,
            Err(refusal) => return Err((refusal, record)),
        };
        // A response head that never comes is bounded like a silent tunnel: by the idle timeout.
        let wait = proxy.config.idle_timeout.0;
        let result = match tokio::time::timeout(wait, sender.send(Request::from_parts(parts, counted))).await {
            Ok(result) => result,
            Err(_) => {
                let message =
                    format!("{} sent no response head within {}s (idle_timeout)", self.authority, wait.as_secs());
                return Err((Refusal::unreachable("upstream_timeout", true, message), record));
            }
        };
        if !upgrade {
            self.give_back(sender);
        }
        let mut response = match result {
            Ok(r) => r,
            Err(e) => {
                let refusal = forward::exchange_failed(&e, &over, cap.as_ref(), &self.authority, self.addr);
                return Err((refusal, record));
            }
        };
        // Only now is the request allowed for good: a failed dial or a body cut at max_body writes
        // its refusal line alone.
        record.admitted(proxy, &method, &self.authority, &decision, would_deny.as_ref(), self.addr);
        let switched = upgrade && response.status() == StatusCode::SWITCHING_PROTOCOLS;
        if switched && let Some(client_upgrade) = client_upgrade {
            let upstream_upgrade = hyper::upgrade::on(&mut response);
            let authority = self.authority.clone();
            let counters = self.counters.clone();
            let idle = proxy.config.idle_timeout.0;
            let relay: Relay = Box::pin(async move {
                match tokio::join!(client_upgrade, upstream_upgrade) {
                    (Ok(client), Ok(upstream)) => {
                        let (c, u) = (TokioIo::new(client), TokioIo::new(upstream));
                        // The tunnel's own select holds the hard stop.
                        Some(tunnel::run(c, u, idle, counters, std::future::pending()).await)
                    }
                    (c, u) => {
                        tracing::debug!(destination = %authority, client = ?c.err(), upstream = ?u.err(), "upgrade did not complete");
                        None
                    }
                }
            });
            *self.relay.lock().unwrap_or_else(|p| p.into_inner()) = Some(relay);
        }
        record.restart();
        let (mut parts, body) = response.into_parts();
        let answered = parts.headers.get(header::UPGRADE).cloned();
        strip_hop_by_hop(&mut parts.headers);
        if let (true, Some(p)) = (switched, answered) {
            parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            parts.headers.insert(header::UPGRADE, p);
        }
        if let Some(w) = &would_deny {
            parts.headers.insert("x-sluice-decision", w.header());
        }
        let finish = Finish { proxy: proxy.clone(), meter, sent, status: parts.status.as_u16(), record: Some(record) };
        let body = Finished { inner: Shaped::new(body, budget, Direction::Down), received: 0, finish };
        Ok(Response::from_parts(parts, body.boxed()))
    }
}

/// The target an inner request is sent upstream with: origin-form for HTTP/1.1, absolute for HTTP/2.
/// A refusal names the path alone: a query string may carry secrets, and refusals are logged.
fn upstream_uri(h2: bool, host: &str, uri: &Uri) -> Result<Uri, Refusal> {
    let path_and_query = uri.path_and_query().map_or("/", |p| p.as_str());
    let parsed = if h2 { format!("https://{host}{path_and_query}").parse() } else { path_and_query.parse() };
    parsed.map_err(|_| Refusal::bad_request(format!("bad request target {:?}", uri.path())))
}

/// An HTTP/1.1 request asking to switch protocols (WebSocket and the like).
fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// An upgrade passes only as WebSocket (RFC 6455 §4.1: `Upgrade: websocket` alone, with
/// `Sec-WebSocket-Key` and `Sec-WebSocket-Version`); why not, otherwise.
fn websocket_only(req: &Request<Incoming>) -> Result<(), String> {
    let headers = req.headers();
    let protocols: Vec<&str> = headers
        .get_all(header::UPGRADE)
        .iter()
        .map(|v| v.to_str().unwrap_or("?"))
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    match protocols.as_slice() {
        [p] if p.eq_ignore_ascii_case("websocket") => {}
        _ => return Err(format!("Upgrade asks for {:?}; only \"websocket\" passes", protocols.join(", "))),
    }
    for name in [header::SEC_WEBSOCKET_KEY, header::SEC_WEBSOCKET_VERSION] {
        if headers.get_all(&name).iter().count() != 1 {
            return Err(format!("a WebSocket upgrade needs exactly one {name} header"));
        }
    }
    Ok(())
}

/// One upstream HTTP connection of a tunnel, in the protocol its ALPN chose.
enum Sender {
    H1(http1::SendRequest<Counted>),
    H2(http2::SendRequest<Counted>),
}

impl Sender {
    async fn send(&mut self, req: Request<Counted>) -> Result<Response<Incoming>, hyper::Error> {
        match self {
            Sender::H1(s) => {
                s.ready().await?;
                s.send_request(req).await
            }
            Sender::H2(s) => {
                s.ready().await?;
                s.send_request(req).await
            }
        }
    }

    fn is_closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }
}

/// A tunnel's upstream connections: the one verified before the `200`, then whatever was handed back
/// (an HTTP/2 connection is shared; an HTTP/1.1 one serves one request at a time). When none is free
/// or the upstream closed them, another is dialled to the tunnel's checked address and verified again,
/// up to [`MAX_UPSTREAM`] live connections (each holds a slot until its connection task ends).
struct Pool {
    first: Mutex<Option<TlsStream<TcpStream>>>,
    idle: Mutex<Vec<Sender>>,
    slots: Arc<Semaphore>,
    /// Told when a connection comes back to `idle`.
    freed: Notify,
}

impl Pool {
    fn new(first: TlsStream<TcpStream>) -> Pool {
        Pool {
            first: Mutex::new(Some(first)),
            idle: Mutex::new(Vec::new()),
            slots: Arc::new(Semaphore::new(MAX_UPSTREAM)),
            freed: Notify::new(),
        }
    }

    /// A free connection from the pool (an HTTP/2 one stays there too).
    fn idle_sender(&self) -> Option<Sender> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            match idle.pop() {
                Some(s) if s.is_closed() => continue,
                Some(Sender::H2(s)) => {
                    // Shared: it stays in the pool for the tunnel's other requests.
                    idle.push(Sender::H2(s.clone()));
                    return Some(Sender::H2(s));
                }
                other => return other,
            }
        }
    }

    async fn take(&self, tunnel: &Tunnel) -> Result<Sender, Refusal> {
        let first = self.first.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(stream) = first {
            let slot = self.slot(tunnel).await?;
            return start(&tunnel.proxy, stream, slot).await.map(|s| self.share(s));
        }
        let deadline = tokio::time::Instant::now() + tunnel.proxy.config.connect_timeout.0;
        loop {
            if let Some(s) = self.idle_sender() {
                return Ok(s);
            }
            let freed = self.freed.notified();
            tokio::select! {
                slot = self.slots.clone().acquire_owned() => {
                    let slot = slot.map_err(|_| busy(tunnel))?;
                    return self.dial_in(tunnel, false, slot).await.map(|s| self.share(s));
                }
                () = freed => {}
                () = tokio::time::sleep_until(deadline) => return Err(busy(tunnel)),
            }
        }
    }

    /// An HTTP/2 connection serves the tunnel's other requests too: a clone of it stays in the pool.
    fn share(&self, sender: Sender) -> Sender {
        if let Sender::H2(s) = &sender {
            self.idle.lock().unwrap_or_else(|p| p.into_inner()).push(Sender::H2(s.clone()));
        }
        sender
    }

    /// A slot for a new connection, waiting up to `connect_timeout` for one.
    async fn slot(&self, tunnel: &Tunnel) -> Result<OwnedSemaphorePermit, Refusal> {
        match tokio::time::timeout(tunnel.proxy.config.connect_timeout.0, self.slots.clone().acquire_owned()).await {
            Ok(Ok(slot)) => Ok(slot),
            _ => Err(busy(tunnel)),
        }
    }

    /// A new upstream connection to the tunnel's address, verified like the first.
    async fn dial(&self, tunnel: &Tunnel, upgrade: bool) -> Result<Sender, Refusal> {
        let slot = self.slot(tunnel).await?;
        self.dial_in(tunnel, upgrade, slot).await
    }

    async fn dial_in(&self, tunnel: &Tunnel, upgrade: bool, slot: OwnedSemaphorePermit) -> Result<Sender, Refusal> {
        let wait = tunnel.proxy.config.connect_timeout.0;
        let stream = match tokio::time::timeout(wait, TcpStream::connect(tunnel.addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return Err(Refusal::unreachable(
                    "connect_failed",
                    false,
                    format!("connecting to {} ({}) failed: {e}", tunnel.authority, tunnel.addr),
                ));
            }
            Err(_) => {
                return Err(Refusal::unreachable(
                    "connect_timeout",
                    true,
                    format!("connecting to {} ({}) timed out", tunnel.authority, tunnel.addr),
                ));
            }
        };
        let _ = stream.set_nodelay(true);
        let config = if upgrade { tunnel.terminator.client_h1.clone() } else { tunnel.terminator.client.clone() };
        let tls = handshake(config, &tunnel.authority, stream, wait).await?;
        start(&tunnel.proxy, tls, slot).await
    }
}

/// Every upstream connection of the tunnel is busy, and stayed so for `connect_timeout`: `504`.
fn busy(tunnel: &Tunnel) -> Refusal {
    Refusal::unreachable(
        "upstream_busy",
        true,
        format!(
            "all {MAX_UPSTREAM} upstream connections of the tunnel to {} stayed busy for {}s",
            tunnel.authority,
            tunnel.proxy.config.connect_timeout.0.as_secs()
        ),
    )
}

/// The HTTP handshake on a verified upstream connection, per its ALPN; its connection task holds
/// the pool's `slot` until the connection ends.
async fn start(proxy: &EgressProxy, tls: TlsStream<TcpStream>, slot: OwnedSemaphorePermit) -> Result<Sender, Refusal> {
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let failed = |e: hyper::Error| Refusal::bad_upstream(format!("the upstream failed the HTTP handshake: {e}"));
    if h2 {
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_send_buf_size(H2_SEND_BUF)
            .handshake(TokioIo::new(tls))
            .await
            .map_err(failed)?;
        proxy.shutdown.spawn(async move {
            let _slot = slot;
            let _ = conn.await;
        });
        Ok(Sender::H2(sender))
    } else {
        let (sender, conn) = http1::handshake(TokioIo::new(tls)).await.map_err(failed)?;
        proxy.shutdown.spawn(async move {
            let _slot = slot;
            let _ = conn.with_upgrades().await;
        });
        Ok(Sender::H1(sender))
    }
}

/// The client's side of a terminated tunnel: the bytes it sent early first, then its stream; counts
/// what moves each way (the tunnel's closing line and its idle timeout read the counts).
struct ClientIo<S> {
    early: Vec<u8>,
    pos: usize,
    inner: S,
    read: Arc<AtomicU64>,
    written: Arc<AtomicU64>,
}

impl<S: AsyncRead + Unpin> ClientIo<S> {
    /// The client's first byte (read now if it sent none early); `None` if it closed first.
    async fn first_byte(&mut self) -> Option<u8> {
        if self.early.is_empty() {
            let mut buf = vec![0u8; 4096];
            let n = self.inner.read(&mut buf).await.ok()?;
            buf.truncate(n);
            self.read.fetch_add(n as u64, Ordering::Relaxed);
            self.early = buf;
        }
        self.early.get(self.pos).copied()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ClientIo<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.pos < this.early.len() {
            let n = (this.early.len() - this.pos).min(buf.remaining());
            buf.put_slice(&this.early[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.early.len() {
                this.early = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        this.read.fetch_add((buf.filled().len() - before) as u64, Ordering::Relaxed);
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ClientIo<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = &polled {
            self.written.fetch_add(*n as u64, Ordering::Relaxed);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_upstream_target_is_named_by_its_path_without_the_query() {
        let uri: Uri = "/v1/x?token=secret".parse().expect("uri");
        assert_eq!(upstream_uri(false, "api.test", &uri).expect("h1").to_string(), "/v1/x?token=secret");
        assert_eq!(
            upstream_uri(true, "api.test:8443", &uri).expect("h2").to_string(),
            "https://api.test:8443/v1/x?token=secret"
        );
        let refusal = upstream_uri(true, "bad host", &uri).expect_err("a host with a space");
        assert_eq!(refusal.message, "bad request target \"/v1/x\"");
        assert!(!refusal.message.contains("secret"));
    }
}
