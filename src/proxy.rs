//! The egress proxy: accepts connections, identifies the session, and hands each request to
//! [`connect`] (tunnels) or [`forward`] (plain HTTP); [`respond`] turns every refusal into its answer.

mod admit;
pub mod connect;
pub mod forward;
pub mod framing;
pub mod head;
pub mod inspected;
mod record;
pub mod respond;
mod shaped;
mod sni;
// The crate's one use of `unsafe`: the pipe and splice(2) calls, each block with its SAFETY note.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
mod splice;
pub mod tunnel;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::{Method, Request, Response, header};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::OwnedSemaphorePermit;

use crate::audit::AuditLog;
use crate::config::EgressConfig;
use crate::credential::Keyring;
use crate::limit::{LimitKey, Limiter};
use crate::listen::{self, Accepted, Shutdown};
use crate::metrics::{Denials, Metrics};
use crate::net::Resolver;
use crate::policy::{Policy, PolicySet};
use crate::refusal::Refusal;
use record::Record;
use respond::ProxyBody;

/// Everything the egress proxy shares across connections.
pub struct EgressProxy {
    pub config: EgressConfig,
    pub policies: Arc<ArcSwap<PolicySet>>,
    pub resolver: Resolver,
    pub keys: Option<Keyring>,
    pub anonymous: bool,
    /// The proxy's own listening addresses: never a destination.
    pub own: Vec<SocketAddr>,
    /// Drain and hard stop; tracks connections and the tunnels they start.
    pub shutdown: Shutdown,
    pub metrics: Arc<Metrics>,
    pub denials: Arc<Denials>,
    pub limiter: Arc<dyn Limiter>,
    pub audit: AuditLog,
    /// Terminates the tunnels policies inspect; `None` when no CA is configured.
    pub terminator: Option<Arc<inspected::Terminator>>,
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

impl Session {
    /// Names the session's policy and level on a refusal that does not name a decision's.
    pub(crate) fn names(&self, refusal: Refusal) -> Refusal {
        refusal.in_policy(&self.policy.name, self.policy.level.as_str())
    }
}

/// The session id logged for clients without credentials.
pub const ANONYMOUS: &str = "anonymous";

/// Accepts connections until the proxy's shutdown drains them, on an accept thread per descriptor of
/// `sockets` (see [`listen::serve_threads`]). Connections beyond `max_connections` get a `503` and are
/// closed, never queued.
pub async fn serve(sockets: listen::Spread, proxy: Arc<EgressProxy>) {
    let max_connections = proxy.config.max_connections;
    let overload = |max| respond::bytes(&Refusal::overloaded("proxy", max), false, http::Version::HTTP_11);
    let shutdown = proxy.shutdown.clone();
    let serve = move |accepted| serve_connection(accepted, proxy.clone());
    listen::serve_threads(sockets, "egress", max_connections, overload, shutdown, serve).await;
}

/// A block rather than an `async fn`, which would keep its arguments twice for the connection's life.
fn serve_connection(accepted: Accepted, proxy: Arc<EgressProxy>) -> impl Future<Output = ()> + Send {
    let Accepted { stream, peer, slot } = accepted;
    async move {
        // The head guard enforces the head limits with worded answers; hyper's own are a backstop.
        let limits = head::HeadLimits {
            max_head: proxy.config.max_header_bytes,
            head_timeout: proxy.config.header_timeout.0,
            idle_timeout: proxy.config.idle_timeout.0,
        };
        let guard = head::HeadGuard::new(stream, limits);
        let draining = proxy.shutdown.draining.clone();
        // The opening (head, identity, admission, dial) and hyper's connection are boxed, each only while
        // it runs: this task is as large as its largest state for as long as it lives, and an open tunnel
        // needs only its own (`connect::Tunnel`), a fraction of theirs.
        // (Bound first: a temporary in a `match` scrutinee would live, boxed state and all, to its end.)
        let first = Box::pin(connect::serve_first(guard, &proxy, peer, &draining)).await;
        let guard = match first {
            connect::First::Done => return,
            // The connection's slot is held by its tunnel too: the cap counts both.
            connect::First::Tunnel(tunnel) => return connect::run(&proxy, tunnel).await,
            connect::First::Http(guard) => guard,
        };
        Box::pin(serve_http(guard, proxy, peer, slot, draining)).await;
    }
}

/// A connection whose next request is not a CONNECT: hyper serves it (and any CONNECT after it).
async fn serve_http(
    mut guard: Box<head::HeadGuard<tokio::net::TcpStream>>,
    proxy: Arc<EgressProxy>,
    peer: SocketAddr,
    slot: OwnedSemaphorePermit,
    draining: tokio_util::sync::CancellationToken,
) {
    // The slot is held by the connection and, after a CONNECT, by its tunnel: the cap counts both.
    let slot = Arc::new(slot);
    let refused = head::RefusalSlot::default();
    guard.report_to(refused.clone());
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(proxy.config.header_timeout.0 * 2)
        .max_header_size(proxy.config.max_header_bytes * 2)
        .half_close(true)
        .keep_alive(true);
    let p = proxy.clone();
    let service = service_fn(move |req| handle(req, p.clone(), peer, slot.clone()));
    let conn = builder.serve_connection(TokioIo::new(*guard), service).with_upgrades();
    let result = listen::until_drained(conn, &draining, |c| c.graceful_shutdown()).await;
    // A head the guard refused was answered by the guard, after hyper's answers: record it here.
    let refusal = refused.lock().ok().and_then(|mut r| r.take());
    if let Some(refusal) = refusal {
        Record::new(&Method::GET, peer).refused(&proxy, &refusal, "-", "-");
    }
    if let Err(e) = result {
        // Oversized headers, slow clients past hyper's backstops, resets: hyper has answered or closed.
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

/// Handles one request that hyper read; every refusal becomes its answer here, and is recorded once.
async fn handle(
    req: Request<Incoming>,
    proxy: Arc<EgressProxy>,
    peer: SocketAddr,
    slot: ConnectionSlot,
) -> Result<Response<ProxyBody>, Infallible> {
    let wants_json = wants_json(req.headers().get(header::ACCEPT));
    let method = req.method().clone();
    let target = req.uri().to_string();
    let mut record = Record::new(&method, peer);
    let result = match proxy.identify(req.headers().get(header::PROXY_AUTHORIZATION), peer) {
        Err(refusal) => Err((refusal, record)),
        Ok(session) => {
            record.identified(&session);
            let served = if method == Method::CONNECT {
                connect::handle(req, &proxy, &session, record, slot).await
            } else {
                forward::handle(req, &proxy, &session, record).await
            };
            served.map_err(|(refusal, record)| (session.names(refusal), record))
        }
    };
    Ok(match result {
        Ok(response) => response,
        Err((refusal, record)) => {
            // A refused CONNECT through hyper closes: the head guard has moved on to passing a tunnel's
            // bytes, so it would not inspect another request on this connection. (A connection's first
            // CONNECT is answered in `connect::serve_first`, which keeps it open after a 407.)
            let refusal = refusal.closing(method == Method::CONNECT);
            record.refused(&proxy, &refusal, method.as_str(), &target);
            respond::response(&refusal, wants_json)
        }
    })
}

/// Whether a refusal is answered in JSON: the (first) `Accept` header asks for it.
pub(crate) fn wants_json(accept: Option<&http::HeaderValue>) -> bool {
    accept.and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains("application/json"))
}
