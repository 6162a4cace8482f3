//! Absolute-form `http://` requests: decided like a tunnel, then forwarded with hop-by-hop and
//! `Proxy-*` headers stripped and the target and `Host` rebuilt from the parsed URI.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, Version};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;

use super::respond::{BoxError, ProxyBody, ProxyError};
use super::{EgressProxy, Session};
use crate::audit::{Event, EventKind};
use crate::policy::Authority;

pub async fn handle(
    req: Request<Incoming>,
    proxy: &Arc<EgressProxy>,
    session: &Session,
    peer: SocketAddr,
) -> Result<Response<ProxyBody>, ProxyError> {
    let uri = req.uri().clone();
    let authority = absolute_target(&uri)?;
    // Framing (Content-Length, Transfer-Encoding) was checked by the head guard before hyper parsed it.
    check_host_header(req.headers(), &authority)?;

    let super::Upstream { decision, stream, addr, .. } = proxy.open_upstream(session, &authority, false).await?;
    super::log_allow(proxy, session, req.method(), &authority, &decision, peer, addr);

    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let host = match authority.port {
        80 => authority.target.to_authority_host(),
        p => format!("{}:{p}", authority.target.to_authority_host()),
    };
    let host = HeaderValue::from_str(&host).map_err(|_| ProxyError::BadRequest("bad host".into()))?;
    parts.headers.insert(header::HOST, host);
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    parts.uri = path.parse().map_err(|_| ProxyError::BadRequest(format!("bad request target {path:?}")))?;
    parts.version = Version::HTTP_11;
    let sent = Arc::new(AtomicU64::new(0));
    let upstream_req = Request::from_parts(parts, Counted { inner: body, count: sent.clone() });

    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| ProxyError::BadUpstream(format!("upstream {addr} failed the HTTP handshake: {e}")))?;
    proxy.tasks.spawn(async move {
        let _ = conn.await;
    });
    let response = sender.send_request(upstream_req).await.map_err(|e| {
        if e.is_user() || e.is_body_write_aborted() {
            ProxyError::BadRequest(format!("the request body could not be forwarded: {e}"))
        } else {
            ProxyError::BadUpstream(format!("upstream {addr} did not answer with valid HTTP: {e}"))
        }
    })?;
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let mut event = Event::new(EventKind::RequestFinished);
    event.session = Some(session.id.to_string());
    event.kind = Some("http");
    event.host = Some(authority.target.to_string());
    event.port = Some(authority.port);
    event.upstream = Some(addr.to_string());
    event.status = Some(parts.status.as_u16());
    let finish = Finish {
        proxy: proxy.clone(),
        limit_key: session.limit_key.clone(),
        sent,
        started: Instant::now(),
        event: Some(event),
    };
    let body = Finished { inner: body, received: 0, finish };
    Ok(Response::from_parts(parts, body.boxed()))
}

/// The host and port an absolute-form `http://` request names: other schemes and userinfo are refused,
/// a missing port is 80. Pure, so it is fuzzed on its own.
pub fn absolute_target(uri: &http::Uri) -> Result<Authority, ProxyError> {
    match uri.scheme_str() {
        Some("http") => {}
        None => {
            return Err(ProxyError::BadRequest(
                "this is a proxy: send absolute-form requests (GET http://host/path) or CONNECT host:port".into(),
            ));
        }
        Some("https") => {
            return Err(ProxyError::BadRequest(
                "https:// URLs are tunnelled, not forwarded: the client should use CONNECT (set HTTPS_PROXY)".into(),
            ));
        }
        Some(other) => {
            return Err(ProxyError::BadRequest(format!(
                "unsupported scheme {other:?}: only http:// is forwarded; use CONNECT for anything else"
            )));
        }
    }
    let text = uri.authority().map(|a| a.as_str()).unwrap_or("");
    if text.contains('@') {
        return Err(ProxyError::BadRequest(
            "credentials in the URL (user@host) are not forwarded; send them in an Authorization header".into(),
        ));
    }
    Authority::parse(text, Some(80)).map_err(|e| ProxyError::BadRequest(format!("bad host in URL {text:?}: {e}")))
}

/// A request body that counts the bytes sent upstream.
struct Counted {
    inner: Incoming,
    count: Arc<AtomicU64>,
}

impl Body for Counted {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.count.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The response body on its way to the client; when it ends (or the client goes away) the request's
/// closing audit line is written and its bytes counted.
struct Finished {
    inner: Incoming,
    received: u64,
    finish: Finish,
}

struct Finish {
    proxy: Arc<EgressProxy>,
    limit_key: crate::limit::LimitKey,
    sent: Arc<AtomicU64>,
    started: Instant,
    event: Option<Event>,
}

impl Finish {
    fn done(&mut self, received: u64, end: &'static str) {
        let Some(mut event) = self.event.take() else { return };
        let sent = self.sent.load(Ordering::Relaxed);
        let metrics = &self.proxy.metrics;
        metrics.bytes_up.fetch_add(sent, Ordering::Relaxed);
        metrics.bytes_down.fetch_add(received, Ordering::Relaxed);
        self.proxy.limiter.record_bytes(&self.limit_key, sent, received);
        event.bytes_up = Some(sent);
        event.bytes_down = Some(received);
        event.duration_ms = Some(self.started.elapsed().as_millis() as u64);
        event.end = Some(end);
        self.proxy.audit.write(&event);
    }
}

impl Body for Finished {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.received += data.len() as u64;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.finish.done(this.received, "upstream_error");
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                this.finish.done(this.received, "complete");
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Finished {
    fn drop(&mut self) {
        // An empty body may never be polled to its end; any other ends early when the client leaves.
        let end = if self.inner.is_end_stream() { "complete" } else { "client_closed" };
        self.finish.done(self.received, end);
    }
}

/// A `Host` header must name the same authority as the URI (default port 80).
fn check_host_header(headers: &HeaderMap, authority: &Authority) -> Result<(), ProxyError> {
    let hosts: Vec<&HeaderValue> = headers.get_all(header::HOST).iter().collect();
    if hosts.len() > 1 {
        return Err(ProxyError::BadRequest("request has more than one Host header".into()));
    }
    let Some(value) = hosts.first() else { return Ok(()) };
    let text = value.to_str().unwrap_or("");
    match Authority::parse(text, Some(80)) {
        Ok(h) if h == *authority => Ok(()),
        _ => Err(ProxyError::BadRequest(format!(
            "Host header {text:?} does not match the URL's host {authority}; they must agree"
        ))),
    }
}

const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
];

/// Removes hop-by-hop headers, those the `Connection` header names, and every `Proxy-*` header.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    let proxy_headers: Vec<HeaderName> = headers.keys().filter(|k| k.as_str().starts_with("proxy-")).cloned().collect();
    for name in proxy_headers {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn hop_by_hop_and_proxy_headers_are_stripped() {
        let mut h = headers(&[
            ("connection", "keep-alive, x-secret-hop"),
            ("x-secret-hop", "1"),
            ("proxy-authorization", "Basic abc"),
            ("proxy-foo", "bar"),
            ("keep-alive", "timeout=5"),
            ("accept", "*/*"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["accept"]);
    }
}
