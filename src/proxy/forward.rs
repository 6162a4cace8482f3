//! Absolute-form `http://` requests: decided like a tunnel, then forwarded with hop-by-hop and
//! `Proxy-*` headers stripped and the target and `Host` rebuilt from the parsed URI.

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use super::respond::{ProxyBody, ProxyError};
use super::{EgressProxy, Session};
use crate::policy::Authority;

pub async fn handle(
    req: Request<Incoming>,
    proxy: &Arc<EgressProxy>,
    session: &Session,
    peer: SocketAddr,
) -> Result<Response<ProxyBody>, ProxyError> {
    let uri = req.uri().clone();
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
    let authority = Authority::parse(text, Some(80))
        .map_err(|e| ProxyError::BadRequest(format!("bad host in URL {text:?}: {e}")))?;
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
    let upstream_req = Request::from_parts(parts, body);

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
    Ok(Response::from_parts(parts, body.map_err(Into::into).boxed()))
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
