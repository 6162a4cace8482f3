//! `CONNECT host:port`: authority → policy → resolve → guard → dial → `200` → tunnel.
//!
//! A connection whose first request is a CONNECT (nearly all of them: it is what `HTTPS_PROXY` sends)
//! is answered by [`serve_first`] without hyper, and its tunnel runs in the connection's own task. A
//! CONNECT later on a keep-alive connection comes through hyper to [`handle`]. Both share the checks,
//! the answers and the tunnel's ending.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::BytesMut;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::head::HeadGuard;
use super::respond::{self, ProxyBody, ProxyError};
use super::tunnel::{self, Counters};
use super::{EgressProxy, Session};
use crate::audit::{Event, EventKind};
use crate::limit::Lease;
use crate::policy::Authority;

/// The answer to a CONNECT that opens its tunnel, in the request's HTTP version.
fn established(version: http::Version) -> &'static [u8] {
    if version == http::Version::HTTP_10 { b"HTTP/1.0 200 OK\r\n\r\n" } else { b"HTTP/1.1 200 OK\r\n\r\n" }
}

/// A CONNECT whose upstream is connected, waiting for the client's side of the tunnel.
pub(crate) struct Opened {
    session_id: Arc<str>,
    authority: Authority,
    upstream: TcpStream,
    addr: SocketAddr,
    /// The session's slot under `max_tunnels`, held for the tunnel's life.
    permit: Option<Lease>,
}

/// Checks a CONNECT target and opens its upstream; the allow decision is logged here.
async fn open(proxy: &EgressProxy, session: &Session, target: &str, peer: SocketAddr) -> Result<Opened, ProxyError> {
    let authority = Authority::parse(target, None)
        .map_err(|e| ProxyError::BadRequest(format!("bad CONNECT target {target:?}: {e}")))?;
    let super::Upstream { decision, stream: upstream, addr, permit } =
        proxy.open_upstream(session, &authority, true).await?;
    super::log_allow(proxy, session, &Method::CONNECT, &authority, &decision, peer, addr);
    Ok(Opened { session_id: session.id.clone(), authority, upstream, addr, permit })
}

/// The client's side of a tunnel: its own socket (with bytes it sent early, already read), or
/// whatever hyper hands back.
enum ClientSide {
    Tcp(TcpStream, Vec<u8>),
    Upgraded(Upgraded),
}

/// Runs an opened tunnel to its end, then counts and logs it.
async fn run(proxy: &EgressProxy, opened: Opened, client: ClientSide) {
    let Opened { session_id, authority, upstream, addr, permit } = opened;
    let started = Instant::now();
    let metrics = &proxy.metrics;
    let idle = proxy.config.idle_timeout.0;
    let counters = Arc::new(Counters::default());
    metrics.open_tunnels.fetch_add(1, Ordering::Relaxed);
    metrics.tunnels_total.fetch_add(1, Ordering::Relaxed);
    let stop = proxy.hard_stop.cancelled();
    let stats = match client {
        ClientSide::Tcp(client, early) => tunnel::run_tcp(client, upstream, &early, idle, counters, stop).await,
        ClientSide::Upgraded(upgraded) => tunnel::run(TokioIo::new(upgraded), upstream, idle, counters, stop).await,
    };
    metrics.open_tunnels.fetch_sub(1, Ordering::Relaxed);
    if let Some(permit) = permit {
        permit.record_bytes(stats.bytes_up, stats.bytes_down);
    }
    metrics.bytes_up.fetch_add(stats.bytes_up, Ordering::Relaxed);
    metrics.bytes_down.fetch_add(stats.bytes_down, Ordering::Relaxed);
    if stats.end == tunnel::TunnelEnd::UpstreamError {
        metrics.upstream_resets.fetch_add(1, Ordering::Relaxed);
    }
    let mut event = Event::new(EventKind::TunnelClosed);
    event.session = Some(session_id.to_string());
    event.kind = Some("connect");
    event.host = Some(authority.target.to_string());
    event.port = Some(authority.port);
    event.upstream = Some(addr.to_string());
    event.bytes_up = Some(stats.bytes_up);
    event.bytes_down = Some(stats.bytes_down);
    event.duration_ms = Some(started.elapsed().as_millis() as u64);
    event.end = Some(stats.end.as_str());
    proxy.audit.write(&event);
}

/// What [`serve_first`] did with a connection.
pub(crate) enum First {
    /// The connection is done with: its tunnel ran, or it was refused and closed, or it ended.
    Done,
    /// Its next request is not a CONNECT: the guard holds it, for hyper.
    Http(HeadGuard<TcpStream>),
}

/// Serves a connection's CONNECT requests until one opens its tunnel (which then runs here) or a
/// request is something else. A refused CONNECT keeps the connection only when its credentials were
/// the problem, as hyper would, so a client can answer the `407`.
pub(crate) async fn serve_first(
    mut guard: HeadGuard<TcpStream>,
    proxy: &Arc<EgressProxy>,
    peer: SocketAddr,
    stop: &CancellationToken,
) -> First {
    loop {
        let head = tokio::select! {
            head = guard.next_head() => head,
            () = stop.cancelled() => return First::Done,
        };
        let head = match head {
            Ok(Some(head)) => head,
            Ok(None) => return First::Done,
            Err(e) => {
                tracing::debug!(client = %peer, error = %e, "egress connection ended");
                return First::Done;
            }
        };
        let Some(request) = ConnectHead::parse(&head) else {
            guard.unread(head);
            return First::Http(guard);
        };
        let answer = async {
            let session = proxy.identify(&request.headers, peer).map_err(|e| (e, None))?;
            open(proxy, &session, &request.target, peer).await.map_err(|e| (e, Some(session)))
        };
        let (err, session) = match answer.await {
            Ok(opened) => {
                if let Err(e) = guard.get_mut().write_all(established(request.version)).await {
                    tracing::debug!(client = %peer, error = %e, "client left before its tunnel opened");
                    return First::Done;
                }
                let (client, early) = guard.into_parts();
                run(proxy, opened, ClientSide::Tcp(client, early.to_vec())).await;
                return First::Done;
            }
            Err(refused) => refused,
        };
        super::log_refusal(proxy, &err, session.as_ref(), &Method::CONNECT, &request.target, peer);
        // As hyper would: a 407 keeps the connection (unless the client asked to close it), so the
        // client can answer the challenge; every other refusal ends it.
        let close = session.is_some() || request.close;
        let ctx = super::context(session.as_ref(), request.wants_json, close);
        let answer = respond::refusal_bytes(&err, &ctx, request.version);
        let stream = guard.get_mut();
        if stream.write_all(&answer).await.is_err() || close {
            let _ = stream.shutdown().await;
            return First::Done;
        }
        guard.expect_head();
    }
}

/// What a CONNECT head says that its answer depends on.
struct ConnectHead {
    target: String,
    /// Only the headers identity reads.
    headers: HeaderMap,
    wants_json: bool,
    version: http::Version,
    /// The client does not keep the connection after this request (HTTP/1.0, or `Connection: close`).
    close: bool,
}

impl ConnectHead {
    /// A head the guard handed on, when it is a CONNECT (the guard has checked it parses and that its
    /// target is an authority).
    fn parse(head: &BytesMut) -> Option<ConnectHead> {
        let mut headers = [httparse::EMPTY_HEADER; super::head::MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        if !matches!(req.parse(head), Ok(httparse::Status::Complete(_))) || req.method != Some("CONNECT") {
            return None;
        }
        let version = if req.version == Some(0) { http::Version::HTTP_10 } else { http::Version::HTTP_11 };
        let mut out = ConnectHead {
            target: req.path?.to_string(),
            headers: HeaderMap::new(),
            wants_json: false,
            version,
            close: version == http::Version::HTTP_10,
        };
        let mut accept_seen = false;
        for h in req.headers.iter() {
            let value = HeaderValue::from_bytes(h.value).ok();
            if h.name.eq_ignore_ascii_case("proxy-authorization") {
                // The head guard refuses a second one.
                out.headers.insert(header::PROXY_AUTHORIZATION, value?);
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

/// A CONNECT that came through hyper: the checks, the `200`, and the tunnel in a task of its own once
/// hyper hands the connection over.
pub async fn handle(
    mut req: Request<Incoming>,
    proxy: &Arc<EgressProxy>,
    session: &Session,
    peer: SocketAddr,
    slot: super::ConnectionSlot,
) -> Result<Response<ProxyBody>, ProxyError> {
    let uri = req.uri();
    if uri.scheme().is_some() || uri.path_and_query().is_some() {
        return Err(ProxyError::BadRequest(format!(
            "CONNECT takes host:port, not a URL ({uri:?}); e.g. CONNECT example.com:443"
        )));
    }
    let text = uri.authority().map(|a| a.as_str()).unwrap_or("").to_string();
    let opened = open(proxy, session, &text, peer).await?;

    // The upgrade completes after the 200 below is written; bytes the client pipelined after its
    // CONNECT head come out of the upgraded stream first.
    let on_upgrade = hyper::upgrade::on(&mut req);
    let proxy = proxy.clone();
    proxy.tasks.clone().spawn(async move {
        let _slot = slot;
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                let destination = &opened.authority;
                tracing::debug!(session = &*opened.session_id, %destination, error = %e, "tunnel never opened");
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
        run(&proxy, opened, client).await;
    });
    let mut response = Response::new(respond::empty());
    *response.status_mut() = StatusCode::OK;
    Ok(response)
}
