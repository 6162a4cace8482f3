//! `CONNECT host:port`: authority → policy → resolve → guard → dial → `200` → tunnel.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::head::HeadGuard;
use super::respond::{self, ProxyBody, ProxyError};
use super::tunnel::{self, Counters};
use super::{EgressProxy, Session};
use crate::audit::{Event, EventKind};
use crate::policy::Authority;

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
    let text = uri.authority().map(|a| a.as_str()).unwrap_or("");
    let authority = Authority::parse(text, None)
        .map_err(|e| ProxyError::BadRequest(format!("bad CONNECT target {text:?}: {e}")))?;
    let super::Upstream { decision, stream: upstream, addr, permit } =
        proxy.open_upstream(session, &authority, true).await?;
    super::log_allow(proxy, session, req.method(), &authority, &decision, peer, addr);

    // The upgrade completes after the 200 below is written; bytes the client pipelined after its
    // CONNECT head come out of the upgraded stream first.
    let on_upgrade = hyper::upgrade::on(&mut req);
    let idle = proxy.config.idle_timeout.0;
    let hard_stop = proxy.hard_stop.clone();
    let session_id = session.id.clone();
    let metrics = proxy.metrics.clone();
    let audit = proxy.audit.clone();
    proxy.tasks.spawn(async move {
        let _slot = slot;
        let started = Instant::now();
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(session = &*session_id, destination = %authority, error = %e, "tunnel never opened");
                return;
            }
        };
        let counters = Arc::new(Counters::default());
        metrics.open_tunnels.fetch_add(1, Ordering::Relaxed);
        metrics.tunnels_total.fetch_add(1, Ordering::Relaxed);
        let stop = hard_stop.cancelled_owned();
        // The client's own socket, when hyper gives it back: the tunnel then runs socket to socket.
        // Bytes the client sent after its CONNECT head and that were already read go upstream first:
        // hyper's buffer holds the earlier ones, the head guard's the later ones.
        let stats = match upgraded.downcast::<TokioIo<HeadGuard<TcpStream>>>() {
            Ok(parts) => {
                let (client, guarded) = parts.io.into_inner().into_parts();
                let mut pending = parts.read_buf.to_vec();
                pending.extend_from_slice(&guarded);
                tunnel::run_tcp(client, upstream, &pending, idle, counters, stop).await
            }
            Err(upgraded) => tunnel::run(TokioIo::new(upgraded), upstream, idle, counters, stop).await,
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
        audit.write(&event);
    });
    let mut response = Response::new(respond::empty());
    *response.status_mut() = StatusCode::OK;
    Ok(response)
}
