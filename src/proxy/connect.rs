//! `CONNECT host:port`: authority → identify → admit (decide, limit, reach) → `200` → tunnel.
//!
//! A connection whose first request is a CONNECT (nearly all of them: it is what `HTTPS_PROXY` sends)
//! is answered by [`serve_first`] without hyper, and its tunnel runs in the connection's own task. A
//! CONNECT later on a keep-alive connection comes through hyper to [`handle`]. Both share the
//! pipeline, the renderer and the tunnel's ending.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::admit::{Admission, WouldDeny};
use super::head::{HeadGuard, NextHead};
use super::inspected;
use super::record::Record;
use super::respond::{self, ProxyBody};
use super::tunnel::{self, Counters};
use super::{ConnectionSlot, EgressProxy, Session};
use crate::limit::Lease;
use crate::policy::Authority;
use crate::refusal::Refusal;

/// The answer to a CONNECT that opens its tunnel, in the request's HTTP version; in report mode it
/// says what an enforcing policy would have done.
fn established(version: http::Version, would_deny: Option<&WouldDeny>) -> Vec<u8> {
    let mut out = Vec::with_capacity(96);
    out.extend_from_slice(if version == http::Version::HTTP_10 {
        b"HTTP/1.0 200 OK\r\n"
    } else {
        b"HTTP/1.1 200 OK\r\n"
    });
    if let Some(w) = would_deny {
        out.extend_from_slice(b"x-sluice-decision: ");
        out.extend_from_slice(w.header().as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// The authority a CONNECT names.
fn authority(target: &str) -> Result<Authority, Refusal> {
    Authority::parse(target, None).map_err(|e| Refusal::bad_request(format!("bad CONNECT target {target:?}: {e}")))
}

/// What an admitted CONNECT opens: a tunnel relayed as it is, or one sluice terminates. The spliced
/// admission stays unboxed (its path allocates nothing more than before); the TLS state is boxed.
#[allow(clippy::large_enum_variant)]
enum Opened {
    Spliced(Admission),
    Inspected(Box<inspected::Opened>, Arc<inspected::Terminator>),
}

impl Opened {
    fn would_deny(&self) -> Option<&WouldDeny> {
        match self {
            Opened::Spliced(a) => a.would_deny.as_ref(),
            Opened::Inspected(o, _) => o.would_deny.as_ref(),
        }
    }
}

/// A CONNECT through the pipeline: its upstream connected (and, when the policy terminates it,
/// verified over TLS) and its decision recorded, or the refusal.
async fn open(
    proxy: &EgressProxy,
    session: &Session,
    target: &str,
    record: &mut Record,
) -> Result<(Authority, Opened), Refusal> {
    let authority = authority(target)?;
    // The termination hook: policies that inspect nothing pay one comparison here. A server without a
    // CA (a policy reloaded to inspect) refuses what it cannot terminate rather than relay it unseen.
    let policy = &session.policy;
    let terminates = policy.terminates(&authority.target, authority.port);
    if terminates && proxy.terminator.is_none() && policy.decide(&authority.target, authority.port).is_allowed() {
        return Err(Refusal::inspection_unavailable(&authority).in_policy(&policy.name, policy.level.as_str()));
    }
    let admission = proxy.admit(session, &authority, true).await?;
    let opened = match proxy.terminator.as_ref().filter(|_| terminates) {
        None => Opened::Spliced(admission),
        Some(t) => {
            let opened = inspected::open(proxy, t, &authority, admission).await.map_err(|r| session.names(r))?;
            Opened::Inspected(Box::new(opened), t.clone())
        }
    };
    let (decision, addr) = match &opened {
        Opened::Spliced(a) => (&a.decision, a.addr),
        Opened::Inspected(o, _) => (&o.decision, o.addr),
    };
    record.admitted(proxy, &Method::CONNECT, &authority, decision, opened.would_deny(), addr);
    Ok((authority, opened))
}

/// The client's side of a tunnel: its own socket (with bytes it sent early, already read), or
/// whatever hyper hands back.
enum ClientSide {
    Tcp(TcpStream, Vec<u8>),
    Upgraded(Upgraded),
}

/// An admitted tunnel, its `200` written: what it runs with and what its end records, and nothing that
/// only its opening needed (the head and its buffers, the decision), so an idle tunnel holds little.
pub(crate) struct Tunnel {
    upstream: TcpStream,
    /// The session's place under `max_tunnels`, given back before the closing line is written.
    permit: Option<Lease>,
    record: Record,
    client: ClientSide,
}

impl Tunnel {
    /// The tunnel's clock starts here, at its `200`.
    fn new(admission: Admission, mut record: Record, client: ClientSide) -> Tunnel {
        let Admission { stream: upstream, permit, .. } = admission;
        record.restart();
        Tunnel { upstream, permit, record, client }
    }
}

/// Counts a tunnel open and, for one that is not terminated, runs the fronting guard: the hello's name
/// is the CONNECT name. Called before [`run`], in the opening's (boxed) state, so the open tunnel does
/// not make room for the check. A refused tunnel is ended and recorded here: whether it goes on.
async fn start(proxy: &EgressProxy, tunnel: &mut Tunnel) -> bool {
    let metrics = &proxy.metrics;
    metrics.open_tunnels.inc();
    metrics.tunnels_total.inc();
    let ClientSide::Tcp(client, early) = &mut tunnel.client else { return true };
    let Some(authority) = tunnel.record.host().filter(|_| proxy.config.check_sni) else { return true };
    let (wait, idle) = (proxy.config.header_timeout.0, proxy.config.idle_timeout.0);
    let checked = tokio::select! {
        r = super::sni::check(client, &tunnel.upstream, early, &authority.target, wait, idle) => r,
        () = crate::listen::stopping(&proxy.shutdown.hard_stop) => Err(super::sni::SniRefusal::Shutdown),
    };
    let Err(refused) = checked else { return true };
    refuse_tunnel(authority, client, &refused).await;
    metrics.open_tunnels.dec();
    drop(tunnel.permit.take());
    tunnel.record.closed(proxy, 0, 0, refused.end(), None);
    false
}

/// Runs a [`start`]ed tunnel to its end, then counts it and writes its closing line.
///
/// A block rather than an `async fn`: an `async fn` keeps its arguments twice in its future (as captured and as
/// bound), and this one lives as long as the tunnel.
#[allow(clippy::manual_async_fn)] // on purpose: see above
pub(crate) fn run(proxy: &EgressProxy, tunnel: Tunnel) -> impl Future<Output = ()> + Send + '_ {
    async move {
        // The tunnel's parts are used where they are, not moved out: a moved-out copy would take room of its
        // own in this future, for the tunnel's whole life.
        let record = &tunnel.record;
        let metrics = &proxy.metrics;
        let idle = proxy.config.idle_timeout.0;
        // The session's limiter sees the tunnel's bytes as they move.
        let meter = tunnel.permit.as_ref().map(|lease| lease.meter());
        let budget = meter.as_ref().and_then(|m| m.budget().cloned());
        let counters = Arc::new(Counters::metered(meter));
        // The task's wrapper waits for the hard stop; the tunnel only looks (see `listen::stopping`).
        let stop = crate::listen::stopping(&proxy.shutdown.hard_stop);
        let upstream = tunnel.upstream;
        let stats = match tunnel.client {
            ClientSide::Tcp(client, early) => {
                tunnel::run_tcp(client, upstream, early, idle, counters.clone(), stop).await
            }
            // Boxed: hyper hands back something other than its socket only in theory, and this engine's
            // state would otherwise be every tunnel's.
            ClientSide::Upgraded(upgraded) => {
                Box::pin(tunnel::run(TokioIo::new(upgraded), upstream, idle, counters.clone(), stop)).await
            }
        };
        metrics.shaped(counters.shaping_wait());
        if stats.end == tunnel::TunnelEnd::QuotaExceeded {
            metrics.quota_closed_tunnels.inc();
            // Listed in `/v1/denials` like a refused request: the session sees why its tunnel ended.
            if let Some(spent) = budget.as_ref().and_then(|b| b.spent()) {
                record.quota_closed(proxy, &spent.refusal(crate::credential::now_unix()));
            }
        }
        metrics.open_tunnels.dec();
        drop(tunnel.permit);
        if stats.end == tunnel::TunnelEnd::UpstreamError {
            metrics.upstream_resets.inc();
        }
        record.closed(proxy, stats.bytes_up, stats.bytes_down, stats.end.as_str(), None);
    }
}

/// Ends a tunnel the SNI check refused: an `access_denied` alert to the client (it is speaking TLS)
/// and nothing upstream.
async fn refuse_tunnel(authority: &Authority, client: &mut TcpStream, refused: &super::sni::SniRefusal) {
    if let super::sni::SniRefusal::Mismatch { sni } = refused {
        tracing::warn!(destination = %authority, sni = %sni, "tunnel refused: the ClientHello names another host (sni_mismatch)");
    }
    if matches!(
        refused,
        super::sni::SniRefusal::Mismatch { .. } | super::sni::SniRefusal::NoSni | super::sni::SniRefusal::BadHello
    ) {
        let _ = client.write_all(&super::sni::ACCESS_DENIED).await;
    }
    let _ = client.shutdown().await;
}

/// What [`serve_first`] did with a connection.
// The tunnel is handed on by value, not boxed: boxing would cost an allocation per tunnel.
#[allow(clippy::large_enum_variant)]
pub(crate) enum First {
    /// The connection is done with: it was refused and closed, or it ended.
    Done,
    /// Its CONNECT opened a tunnel (`200` written, [`start`]ed), for the caller to [`run`] once this
    /// state is gone.
    Tunnel(Tunnel),
    /// Its next request is not a CONNECT: the guard holds it, for hyper.
    Http(Box<HeadGuard<TcpStream>>),
}

/// Serves a connection's CONNECT requests until one opens its tunnel (handed back, to run) or a
/// request is something else. A refused CONNECT keeps the connection only when its credentials were
/// the problem, as hyper would, so a client can answer the `407`.
pub(crate) async fn serve_first(
    mut guard: HeadGuard<TcpStream>,
    proxy: &Arc<EgressProxy>,
    peer: SocketAddr,
    draining: &CancellationToken,
) -> First {
    loop {
        let head = tokio::select! {
            head = guard.next_head() => head,
            () = draining.cancelled() => return First::Done,
        };
        let head = match head {
            NextHead::Head(head) => head,
            NextHead::End => return First::Done,
            NextHead::Refused(refusal) => {
                Record::new(&Method::GET, peer).refused(proxy, &refusal, "-", "-");
                answer(&mut guard, &refusal, false, http::Version::HTTP_11).await;
                return First::Done;
            }
        };
        let Some(request) = ConnectHead::parse(&head) else {
            guard.unread(head);
            return First::Http(Box::new(guard));
        };
        let mut record = Record::new(&Method::CONNECT, peer);
        let opened = match proxy.identify(request.authorization.as_ref(), peer) {
            // As hyper would: a 407 keeps the connection (unless the client asked to close it), so the
            // client can answer the challenge; every later refusal ends it.
            Err(refusal) => Err(refusal.closing(request.close)),
            Ok(session) => {
                record.identified(&session);
                let opened = open(proxy, &session, &request.target, &mut record).await;
                // The session moves on with the tunnel (an inspected one needs it), not cloned per CONNECT.
                match opened {
                    Ok(o) => Ok((o, session)),
                    Err(refusal) => Err(session.names(refusal).closing(true)),
                }
            }
        };
        match opened {
            Ok(((authority, opened), session)) => {
                if let Err(e) = guard.get_mut().write_all(&established(request.version, opened.would_deny())).await {
                    tracing::debug!(client = %peer, error = %e, "client left before its tunnel opened");
                    return First::Done;
                }
                let (client, early) = guard.into_parts();
                match opened {
                    Opened::Spliced(admission) => {
                        let client = ClientSide::Tcp(client, early.to_vec());
                        let mut tunnel = Tunnel::new(admission, record, client);
                        if !start(proxy, &mut tunnel).await {
                            return First::Done;
                        }
                        return First::Tunnel(tunnel);
                    }
                    // An inspected tunnel runs here, in the opening's (boxed) state: it holds TLS state of
                    // its own either way, and a spliced one need not make room for it.
                    Opened::Inspected(o, t) => {
                        let early = early.to_vec();
                        // Boxed: every connection's opening would otherwise make room for its state.
                        Box::pin(inspected::run(proxy.clone(), t, session, authority, *o, record, client, early)).await;
                    }
                }
                return First::Done;
            }
            Err(refusal) => {
                record.refused(proxy, &refusal, "CONNECT", &request.target);
                if !answer(&mut guard, &refusal, request.wants_json, request.version).await {
                    return First::Done;
                }
                guard.expect_head();
            }
        }
    }
}

/// Writes a refusal on a connection hyper does not serve; closes it when the refusal says so. Whether
/// the connection is still open.
async fn answer(guard: &mut HeadGuard<TcpStream>, refusal: &Refusal, wants_json: bool, version: http::Version) -> bool {
    let bytes = respond::bytes(refusal, wants_json, version);
    let stream = guard.get_mut();
    if stream.write_all(&bytes).await.is_err() || refusal.close {
        let _ = stream.shutdown().await;
        return false;
    }
    true
}

/// What a CONNECT head says that its answer depends on.
struct ConnectHead {
    target: String,
    /// The only header identity reads.
    authorization: Option<HeaderValue>,
    wants_json: bool,
    version: http::Version,
    /// The client does not keep the connection after this request (HTTP/1.0, or `Connection: close`).
    close: bool,
}

impl ConnectHead {
    /// A head the guard handed on, when it is a CONNECT (the guard has checked it parses and that its
    /// target is an authority).
    fn parse(head: &BytesMut) -> Option<ConnectHead> {
        let mut headers = [httparse::EMPTY_HEADER; super::framing::MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        if !matches!(req.parse(head), Ok(httparse::Status::Complete(_))) || req.method != Some("CONNECT") {
            return None;
        }
        let version = if req.version == Some(0) { http::Version::HTTP_10 } else { http::Version::HTTP_11 };
        let mut out = ConnectHead {
            target: req.path?.to_string(),
            authorization: None,
            wants_json: false,
            version,
            close: version == http::Version::HTTP_10,
        };
        let mut accept_seen = false;
        for h in req.headers.iter() {
            let value = HeaderValue::from_bytes(h.value).ok();
            if h.name.eq_ignore_ascii_case("proxy-authorization") {
                // The head guard refuses a second one.
                out.authorization = Some(value?);
            } else if h.name.eq_ignore_ascii_case("accept") && !accept_seen {
                // The first Accept decides, as `HeaderMap::get` does on hyper's path.
                accept_seen = true;
                out.wants_json = super::wants_json(value.as_ref());
            } else if h.name.eq_ignore_ascii_case("connection") {
                let tokens = value.as_ref().and_then(|v| v.to_str().ok()).unwrap_or("");
                for token in tokens.split(',').map(str::trim) {
                    if token.eq_ignore_ascii_case("close") {
                        out.close = true;
                    } else if token.eq_ignore_ascii_case("keep-alive") && version == http::Version::HTTP_10 {
                        out.close = false;
                    }
                }
            }
        }
        Some(out)
    }
}

/// A CONNECT that came through hyper: the pipeline, the `200`, and the tunnel in a task of its own
/// once hyper hands the connection over.
pub(crate) async fn handle(
    mut req: Request<Incoming>,
    proxy: &Arc<EgressProxy>,
    session: &Session,
    mut record: Record,
    slot: ConnectionSlot,
) -> Result<Response<ProxyBody>, (Refusal, Record)> {
    let uri = req.uri();
    if uri.scheme().is_some() || uri.path_and_query().is_some() {
        let refusal =
            Refusal::bad_request(format!("CONNECT takes host:port, not a URL ({uri:?}); e.g. CONNECT example.com:443"));
        return Err((refusal, record));
    }
    let text = uri.authority().map(|a| a.as_str()).unwrap_or("").to_string();
    let (authority, opened) = match open(proxy, session, &text, &mut record).await {
        Ok(opened) => opened,
        Err(refusal) => return Err((refusal, record)),
    };

    // The upgrade completes after the 200 below is written; bytes the client pipelined after its
    // CONNECT head come out of the upgraded stream first.
    let on_upgrade = hyper::upgrade::on(&mut req);
    let decision_header = opened.would_deny().map(WouldDeny::header);
    let proxy = proxy.clone();
    let session = session.clone();
    let session_id = session.id.clone();
    proxy.shutdown.clone().spawn(async move {
        let _slot = slot;
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(session = &*session_id, destination = %authority, error = %e, "tunnel never opened");
                return;
            }
        };
        // The client's own socket, when hyper gives it back: the tunnel then runs socket to socket.
        // Bytes the client sent after its CONNECT head and that were already read go upstream first:
        // hyper's buffer holds the earlier ones, the head guard's the later ones.
        let client = match upgraded.downcast::<TokioIo<HeadGuard<TcpStream>>>() {
            Ok(parts) => {
                let (client, guarded) = parts.io.into_inner().into_parts();
                let mut early = parts.read_buf.to_vec();
                early.extend_from_slice(&guarded);
                ClientSide::Tcp(client, early)
            }
            Err(upgraded) => ClientSide::Upgraded(upgraded),
        };
        match (opened, client) {
            (Opened::Spliced(admission), client) => {
                let mut tunnel = Tunnel::new(admission, record, client);
                if start(&proxy, &mut tunnel).await {
                    run(&proxy, tunnel).await;
                }
            }
            (Opened::Inspected(o, t), ClientSide::Tcp(client, early)) => {
                inspected::run(proxy.clone(), t, session, authority, *o, record, client, early).await;
            }
            (Opened::Inspected(o, t), ClientSide::Upgraded(upgraded)) => {
                let client = TokioIo::new(upgraded);
                inspected::run(proxy.clone(), t, session, authority, *o, record, client, Vec::new()).await;
            }
        }
    });
    let mut response = Response::new(respond::empty());
    *response.status_mut() = StatusCode::OK;
    if let Some(v) = decision_header {
        response.headers_mut().insert("x-sluice-decision", v);
    }
    Ok(response)
}
