//! `CONNECT host:port`: authority → policy → resolve → guard → dial → `200` → tunnel.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::respond::{self, ProxyBody, ProxyError};
use super::tunnel::{self, Counters};
use super::{EgressProxy, Session};
use crate::policy::Authority;

pub async fn handle(
    mut req: Request<Incoming>,
    proxy: &Arc<EgressProxy>,
    session: &Session,
    peer: SocketAddr,
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
    let (decision, upstream, addr) = proxy.open_upstream(session, &authority).await?;
    super::log_allow(proxy, session, req.method(), &authority, &decision, peer, addr);

    // The upgrade completes after the 200 below is written; bytes the client pipelined after its
    // CONNECT head come out of the upgraded stream first.
    let on_upgrade = hyper::upgrade::on(&mut req);
    let idle = proxy.config.idle_timeout.0;
    let hard_stop = proxy.hard_stop.clone();
    let session_id = session.id.clone();
    let metrics = proxy.metrics.clone();
    proxy.tasks.spawn(async move {
        let started = Instant::now();
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::info!(target: "sluice::decision", session = &*session_id, destination = %authority, error = %e, "tunnel never opened");
                return;
            }
        };
        let counters = Arc::new(Counters::default());
        metrics.open_tunnels.fetch_add(1, Ordering::Relaxed);
        metrics.tunnels_total.fetch_add(1, Ordering::Relaxed);
        let stop = hard_stop.cancelled_owned();
        // The client's own socket, when hyper gives it back: the tunnel then runs socket to socket.
        let stats = match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => tunnel::run_tcp(parts.io.into_inner(), upstream, &parts.read_buf, idle, counters, stop).await,
            Err(upgraded) => tunnel::run(TokioIo::new(upgraded), upstream, idle, counters, stop).await,
        };
        metrics.open_tunnels.fetch_sub(1, Ordering::Relaxed);
        metrics.bytes_up.fetch_add(stats.bytes_up, Ordering::Relaxed);
        metrics.bytes_down.fetch_add(stats.bytes_down, Ordering::Relaxed);
        if stats.end == tunnel::TunnelEnd::UpstreamError {
            metrics.upstream_resets.fetch_add(1, Ordering::Relaxed);
        }
        tracing::info!(
            target: "sluice::decision",
            event = "tunnel_closed", session = &*session_id, kind = "connect", destination = %authority,
            upstream = %addr, bytes_up = stats.bytes_up, bytes_down = stats.bytes_down,
            duration_ms = started.elapsed().as_millis() as u64, end = stats.end.as_str(),
        );
    });
    let mut response = Response::new(respond::empty());
    *response.status_mut() = StatusCode::OK;
    Ok(response)
}
