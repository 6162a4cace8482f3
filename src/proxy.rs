//! The egress proxy: accepts connections, identifies the session, and hands each request to
//! [`connect`] (tunnels) or [`forward`] (plain HTTP); [`respond`] turns every refusal into its answer.

pub mod connect;
pub mod forward;
pub mod head;
pub mod respond;
#[cfg(target_os = "linux")]
mod splice;
pub mod tunnel;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use http::{HeaderMap, Method, Request, Response, header};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::audit::{AuditLog, Event, EventKind};
use crate::config::EgressConfig;
use crate::credential::{Keyring, Kind, now_unix, valid_session_id};
use crate::limit::{Lease, LimitKey, Limiter};
use crate::metrics::{Denial, Denials, Metrics};
use crate::net::{self, Reach, Resolver};
use crate::policy::{Authority, Decision, Policy, PolicySet};
use respond::{AuthError, Context, ProxyBody, ProxyError};

/// Everything the egress proxy shares across connections.
pub struct EgressProxy {
    pub config: EgressConfig,
    pub policies: Arc<ArcSwap<PolicySet>>,
    pub resolver: Resolver,
    pub keys: Option<Keyring>,
    pub anonymous: bool,
    /// The proxy's own listening addresses: never a destination.
    pub own: Vec<SocketAddr>,
    /// Cancelled when open tunnels must close (the shutdown grace is over).
    pub hard_stop: CancellationToken,
    /// Tracks connections and tunnels, so shutdown can wait for them.
    pub tasks: TaskTracker,
    pub metrics: Arc<Metrics>,
    pub denials: Arc<Denials>,
    pub limiter: Arc<dyn Limiter>,
    pub audit: AuditLog,
}

/// A client connection's place under `[egress] max_connections`.
pub(crate) type ConnectionSlot = Arc<OwnedSemaphorePermit>;

/// Who is asking, and under which policy.
#[derive(Clone, Debug)]
pub struct Session {
    pub id: Arc<str>,
    pub policy: Arc<Policy>,
    /// What limits are counted against: the session id, or for anonymous clients their address (so
    /// one local client's flood does not starve another).
    pub limit_key: LimitKey,
}

/// An upstream connection that passed every check, ready to tunnel or forward over.
pub(crate) struct Upstream {
    pub decision: Decision,
    pub stream: TcpStream,
    pub addr: SocketAddr,
    /// Held for the tunnel's life: the session's slot under `max_tunnels`.
    pub permit: Option<Lease>,
}

/// The session id logged for clients without credentials.
pub const ANONYMOUS: &str = "anonymous";

impl EgressProxy {
    /// Identity from `Proxy-Authorization: Basic base64(session:token)`, else the anonymous policy when
    /// the server allows it. Credentials that are present are always verified, never ignored.
    pub fn identify(&self, headers: &HeaderMap, peer: SocketAddr) -> Result<Session, ProxyError> {
        let policies = self.policies.load();
        let Some(value) = headers.get(header::PROXY_AUTHORIZATION) else {
            if !self.anonymous {
                return Err(ProxyError::Auth(AuthError::Missing));
            }
            let name = &self.config.policy;
            let policy = policies.get(name).cloned().ok_or_else(|| ProxyError::UnknownPolicy { name: name.clone() })?;
            return Ok(Session { id: ANONYMOUS.into(), policy, limit_key: LimitKey::anonymous(peer.ip()) });
        };
        let (session, token) = parse_basic(value.as_bytes()).map_err(ProxyError::Auth)?;
        let keys = self.keys.as_ref().ok_or(ProxyError::Auth(AuthError::NoKey))?;
        let claims = keys
            .verify_for(&token, Kind::Egress, &session, now_unix())
            .map_err(|e| ProxyError::Auth(AuthError::Credential(e)))?;
        let name = claims.policy.unwrap_or_else(|| "trusted".into());
        let policy = policies.get(&name).cloned().ok_or(ProxyError::UnknownPolicy { name })?;
        let limit_key = LimitKey::session(&session);
        Ok(Session { id: session.into(), policy, limit_key })
    }
}

impl EgressProxy {
    /// Decide, rate-limit, then resolve, guard every address and dial a checked one: the steps CONNECT
    /// and plain HTTP share. `tunnel` also takes a slot under the session's `max_tunnels`. A refusal at
    /// any step is an error carrying its decision.
    pub(crate) async fn open_upstream(
        &self,
        session: &Session,
        authority: &Authority,
        tunnel: bool,
    ) -> Result<Upstream, ProxyError> {
        let policy = &session.policy;
        let decision = policy.decide(&authority.target, authority.port);
        if !decision.is_allowed() {
            return Err(ProxyError::Denied { decision: Box::new(decision), authority: authority.clone() });
        }
        self.limiter
            .check_request(&session.limit_key, &policy.limits)
            .await
            .map_err(|e| ProxyError::RateLimited { retry_after: e.retry_after, limit: e.limit })?;
        let permit = if tunnel {
            let permit = self.limiter.open_tunnel(&session.limit_key, &policy.limits).await;
            Some(permit.map_err(|e| ProxyError::TooManyTunnels { max: e.max })?)
        } else {
            None
        };
        let timeout = self.config.connect_timeout.0;
        match net::reach(&authority.target, authority.port, policy, &self.resolver, &self.own, timeout, &self.metrics)
            .await
        {
            Reach::Connected { stream, addr } => Ok(Upstream { decision, stream, addr, permit }),
            Reach::Refused(decision) => Err(ProxyError::Denied { decision, authority: authority.clone() }),
            Reach::Failed(e) => Err(ProxyError::Upstream(e)),
        }
    }
}

/// `Basic base64(session:token)` → (session, token).
pub fn parse_basic(value: &[u8]) -> Result<(String, String), AuthError> {
    let text = std::str::from_utf8(value).map_err(|_| AuthError::BadEncoding)?.trim();
    let (scheme, rest) = text.split_once(' ').ok_or(AuthError::NotBasic)?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(AuthError::NotBasic);
    }
    let decoded = STANDARD.decode(rest.trim()).map_err(|_| AuthError::BadEncoding)?;
    let decoded = String::from_utf8(decoded).map_err(|_| AuthError::BadEncoding)?;
    let (session, token) = decoded.split_once(':').ok_or(AuthError::BadEncoding)?;
    if !valid_session_id(session) {
        return Err(AuthError::InvalidSessionId);
    }
    Ok((session.to_string(), token.to_string()))
}

/// Accepts connections until `stop_accepting` is cancelled. Connections beyond `max_connections` get
/// a `503` and are closed, never queued.
pub async fn serve(listener: TcpListener, proxy: Arc<EgressProxy>, stop_accepting: CancellationToken) {
    let limit = Arc::new(Semaphore::new(proxy.config.max_connections));
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = stop_accepting.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "egress accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            let max = proxy.config.max_connections;
            proxy.tasks.spawn(respond::refuse_overloaded(stream, "proxy", max, peer));
            continue;
        };
        let proxy2 = proxy.clone();
        let stop = stop_accepting.clone();
        // The slot is held by the connection and, after a CONNECT, by its tunnel: the cap counts both.
        proxy.tasks.spawn(serve_connection(stream, peer, proxy2, stop, Arc::new(permit)));
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    proxy: Arc<EgressProxy>,
    stop: CancellationToken,
    slot: ConnectionSlot,
) {
    // The head guard enforces the head limits with worded answers; hyper's own are a backstop.
    let limits = head::HeadLimits {
        max_head: proxy.config.max_header_bytes,
        head_timeout: proxy.config.header_timeout.0,
        idle_timeout: proxy.config.idle_timeout.0,
    };
    let guard = head::HeadGuard::new(stream, limits);
    let stream = match connect::serve_first(guard, &proxy, peer, &stop).await {
        connect::First::Done => return,
        connect::First::Http(guard) => guard,
    };
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(proxy.config.header_timeout.0 * 2)
        .max_header_size(proxy.config.max_header_bytes * 2)
        .half_close(true)
        .keep_alive(true);
    let p = proxy.clone();
    let service = service_fn(move |req| handle(req, p.clone(), peer, slot.clone()));
    let conn = builder.serve_connection(TokioIo::new(stream), service).with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        // Malformed heads, oversized headers, slow clients: hyper has answered (400/431) or closed.
        let what = if e.is_timeout() {
            "header read timeout"
        } else if e.is_parse() {
            "malformed request"
        } else {
            "connection error"
        };
        tracing::debug!(client = %peer, reason = what, error = %e, "egress connection ended");
    }
}

/// Handles one request; every error becomes its answer here, and every request is logged once.
async fn handle(
    req: Request<Incoming>,
    proxy: Arc<EgressProxy>,
    peer: SocketAddr,
    slot: ConnectionSlot,
) -> Result<Response<ProxyBody>, Infallible> {
    let wants_json = wants_json(req.headers().get(header::ACCEPT));
    let method = req.method().clone();
    let target = req.uri().to_string();
    let detail = req.headers().get("x-sluice-detail").and_then(|v| v.to_str().ok());
    if let Some((kind, detail)) = head::parse_refusal(req.uri().path(), detail) {
        let err = match kind {
            head::HeadRefusal::TooLarge => ProxyError::HeadTooLarge(detail),
            head::HeadRefusal::Timeout => ProxyError::HeadTimeout(detail),
            head::HeadRefusal::Malformed | head::HeadRefusal::Framing => ProxyError::BadRequest(detail),
        };
        log_refusal(&proxy, &err, None, &Method::GET, "-", peer);
        return Ok(respond::refusal(&err, &Context { wants_json, close: true, ..Context::default() }));
    }
    let session = match proxy.identify(req.headers(), peer) {
        Ok(s) => s,
        Err(err) => {
            log_refusal(&proxy, &err, None, &method, &target, peer);
            // A refused CONNECT through hyper closes: the head guard has moved on to passing a tunnel's
            // bytes, so it would not inspect another request on this connection. (A connection's first
            // CONNECT is answered in `connect::serve_first`, which keeps it open after a 407.)
            let close = method == Method::CONNECT;
            return Ok(respond::refusal(&err, &context(None, wants_json, close)));
        }
    };
    let result = if method == Method::CONNECT {
        connect::handle(req, &proxy, &session, peer, slot).await
    } else {
        forward::handle(req, &proxy, &session, peer).await
    };
    Ok(match result {
        Ok(response) => response,
        Err(err) => {
            log_refusal(&proxy, &err, Some(&session), &method, &target, peer);
            // After a malformed request the client's idea of the connection state cannot be trusted,
            // and after a refused CONNECT the head guard no longer follows the connection's framing.
            let close = matches!(err, ProxyError::BadRequest(_)) || method == Method::CONNECT;
            respond::refusal(&err, &context(Some(&session), wants_json, close))
        }
    })
}

/// What a refusal names about the session (its policy and level, once it is known).
pub(crate) fn context(session: Option<&Session>, wants_json: bool, close: bool) -> Context<'_> {
    Context {
        policy: session.map(|s| &*s.policy.name),
        level: session.map(|s| s.policy.level.as_str()),
        wants_json,
        close,
    }
}

/// Whether a refusal is answered in JSON: the (first) `Accept` header asks for it.
pub(crate) fn wants_json(accept: Option<&http::HeaderValue>) -> bool {
    accept.and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains("application/json"))
}

fn log_refusal(
    proxy: &EgressProxy,
    err: &ProxyError,
    session: Option<&Session>,
    method: &Method,
    target: &str,
    peer: SocketAddr,
) {
    let (rule, policy, level) = match err {
        ProxyError::Denied { decision, .. } => (
            decision.rule.as_ref().map(|r| r.summary()),
            Some(decision.policy.to_string()),
            Some(decision.level.as_str()),
        ),
        _ => (None, session.map(|s| s.policy.name.to_string()), session.map(|s| s.policy.level.as_str())),
    };
    let message = err.message();
    proxy.metrics.decision("deny", err.code(), level.unwrap_or("none"));
    if matches!(err, ProxyError::RateLimited { .. } | ProxyError::TooManyTunnels { .. }) {
        proxy.metrics.rate_limited.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    // A plain-HTTP target may carry `user:password@`: it is never recorded.
    let target = if method == Method::CONNECT { target.to_string() } else { redact_userinfo(target) };
    let session_id = session.map_or(ANONYMOUS, |s| &s.id);
    let denial = Denial {
        time: now_unix(),
        destination: target.clone(),
        reason: err.code(),
        message: message.clone(),
        hint: err.hint(),
    };
    proxy.denials.record(session_id, denial);
    let mut event = Event::new(EventKind::Decision);
    if let ProxyError::Denied { authority, .. } = err {
        event.host = Some(authority.target.to_string());
        event.port = Some(authority.port);
    }
    event.session = Some(session_id.to_string());
    event.kind = Some(kind_of(method));
    event.method = Some(method.to_string());
    event.target = Some(target);
    event.verdict = Some("deny");
    event.reason = Some(err.code().to_string());
    event.detail = Some(message);
    event.rule = rule;
    event.policy = policy;
    event.level = level;
    event.client = Some(peer.to_string());
    event.status = Some(err.status().as_u16());
    proxy.audit.write(&event);
}

/// The decision line (and metric) for an allowed request, once its upstream is connected.
pub(crate) fn log_allow(
    proxy: &EgressProxy,
    session: &Session,
    method: &Method,
    authority: &Authority,
    decision: &Decision,
    peer: SocketAddr,
    upstream: SocketAddr,
) {
    proxy.metrics.decision("allow", decision.reason.code(), decision.level.as_str());
    let mut event = Event::new(EventKind::Decision);
    event.session = Some(session.id.to_string());
    event.kind = Some(kind_of(method));
    event.method = Some(method.to_string());
    event.host = Some(authority.target.to_string());
    event.port = Some(authority.port);
    event.verdict = Some("allow");
    event.reason = Some(decision.reason.code().to_string());
    event.rule = decision.rule.as_ref().map(|r| r.summary());
    event.policy = Some(decision.policy.to_string());
    event.level = Some(decision.level.as_str());
    event.client = Some(peer.to_string());
    event.upstream = Some(upstream.to_string());
    proxy.audit.write(&event);
}

pub(crate) fn kind_of(method: &Method) -> &'static str {
    if method == Method::CONNECT { "connect" } else { "http" }
}

/// A URL with any `user:password@` removed, for logs.
pub(crate) fn redact_userinfo(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            match rest[..end].rfind('@') {
                Some(at) => format!("{scheme}://[redacted]@{}", &rest[at + 1..]),
                None => url.to_string(),
            }
        }
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials() {
        let v = format!("Basic {}", STANDARD.encode("s-1:v1.abc.def"));
        assert_eq!(parse_basic(v.as_bytes()).unwrap(), ("s-1".to_string(), "v1.abc.def".to_string()));
        assert!(matches!(parse_basic(b"Bearer x"), Err(AuthError::NotBasic)));
        assert!(matches!(parse_basic(b"Basic !!!"), Err(AuthError::BadEncoding)));
        let no_colon = format!("Basic {}", STANDARD.encode("nocolon"));
        assert!(matches!(parse_basic(no_colon.as_bytes()), Err(AuthError::BadEncoding)));
        let bad_sid = format!("Basic {}", STANDARD.encode("a b:t"));
        assert!(matches!(parse_basic(bad_sid.as_bytes()), Err(AuthError::InvalidSessionId)));
    }

    #[test]
    fn userinfo_is_redacted() {
        assert_eq!(redact_userinfo("http://u:secret@example.com/x@y"), "http://[redacted]@example.com/x@y");
        assert_eq!(redact_userinfo("http://example.com/a@b"), "http://example.com/a@b");
    }
}
