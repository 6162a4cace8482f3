//! Absolute-form `http://` requests: decided like a tunnel, then forwarded with hop-by-hop and
//! `Proxy-*` headers stripped and the target and `Host` rebuilt from the parsed URI.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, Version};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;

use super::admit::Admission;
use super::record::Record;
use super::respond::{BoxError, ProxyBody};
use super::shaped::{QuotaSpent, Shaped};
use super::{EgressProxy, Session};
use crate::limit::{ByteBudget, ByteMeter, Direction};
use crate::policy::{Authority, Decision, Policy, Reason, Verdict};
use crate::refusal::Refusal;

pub(crate) async fn handle(
    req: Request<Incoming>,
    proxy: &Arc<EgressProxy>,
    session: &Session,
    mut record: Record,
) -> Result<Response<ProxyBody>, (Refusal, Record)> {
    let uri = req.uri().clone();
    // Framing (Content-Length, Transfer-Encoding) was checked by the head guard before hyper parsed it.
    let admitted = async {
        let authority = absolute_target(&uri)?;
        check_host_header(req.headers(), &authority)?;
        // Request rules are decided before anything is dialled.
        let request = request_verdict(&session.policy, &authority, &req)?;
        let admission = proxy.admit(session, &authority, false).await?;
        Ok::<_, Refusal>((authority, admission, request))
    };
    let (authority, admission, request) = match admitted.await {
        Ok(a) => a,
        Err(refusal) => return Err((refusal, record)),
    };
    // The record names the request rule when one decided, else the host's rule.
    let (decision, max_body, would_deny) = match request {
        Some(RequestVerdict { decision, max_body, would_deny }) => (decision, max_body, would_deny),
        None => (admission.decision.clone(), None, admission.would_deny.clone()),
    };
    let (method, addr) = (req.method().clone(), admission.addr);
    record.aimed(&authority, addr);
    let cap = max_body.map(|max| BodyCap { max, rule: decision.clone() });
    // The session's meter; with its budget when its bytes are shaped or quota'd, which both bodies then ask.
    let meter = proxy.limiter.meter(&session.limit_key, &session.policy.limits);
    let budget = meter.budget().cloned();
    match exchange(req, &authority, admission, cap, proxy, budget.clone()).await {
        Ok((response, sent)) => {
            // Written once the upstream answered: a body cut at max_body writes its refusal alone.
            record.admitted(proxy, &method, &authority, &decision, would_deny.as_ref(), addr);
            record.restart();
            let (mut parts, body) = response.into_parts();
            if let Some(w) = &would_deny {
                // The upstream's own header of that name is replaced: the client reads sluice's.
                parts.headers.insert("x-sluice-decision", w.header());
            }
            let finish =
                Finish { proxy: proxy.clone(), meter, sent, status: parts.status.as_u16(), record: Some(record) };
            let body = Finished { inner: Shaped::new(body, budget, Direction::Down), received: 0, finish };
            Ok(Response::from_parts(parts, body.boxed()))
        }
        Err(refusal) => Err((refusal, record)),
    }
}

/// Sends an admitted request upstream over its checked connection: hop-by-hop and `Proxy-*` headers
/// stripped, the target and `Host` rebuilt from the parsed URI. Returns the response (hop-by-hop
/// headers stripped) and the counter of request-body bytes sent.
async fn exchange(
    req: Request<Incoming>,
    authority: &Authority,
    admission: Admission,
    cap: Option<BodyCap>,
    proxy: &EgressProxy,
    budget: Option<Arc<dyn ByteBudget>>,
) -> Result<(Response<Incoming>, Arc<AtomicU64>), Refusal> {
    let Admission { stream, addr, .. } = admission;
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let host = match authority.port {
        80 => authority.target.to_authority_host(),
        p => format!("{}:{p}", authority.target.to_authority_host()),
    };
    let host = HeaderValue::from_str(&host).map_err(|_| Refusal::bad_request("bad host"))?;
    parts.headers.insert(header::HOST, host);
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    // Named by its path alone: a query string may carry secrets, and refusals are logged.
    let shown = parts.uri.path();
    parts.uri = path.parse().map_err(|_| Refusal::bad_request(format!("bad request target {shown:?}")))?;
    parts.version = Version::HTTP_11;
    let sent = Arc::new(AtomicU64::new(0));
    let body = Shaped::new(body, budget, Direction::Up);
    let over = Arc::new(AtomicU64::new(0));
    let counted = Counted { inner: body, count: sent.clone(), max: cap.as_ref().map(|c| c.max), over: over.clone() };
    let upstream_req = Request::from_parts(parts, counted);

    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| Refusal::bad_upstream(format!("upstream {addr} failed the HTTP handshake: {e}")))?;
    proxy.shutdown.spawn(async move {
        let _ = conn.await;
    });
    let response = sender
        .send_request(upstream_req)
        .await
        .map_err(|e| exchange_failed(&e, &over, cap.as_ref(), authority, addr))?;
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Ok((Response::from_parts(parts, body), sent))
}

/// The refusal for an exchange that failed: the session's quota ran out, the body went over the
/// rule's `max_body` (`over` holds the length it would have reached), the client's body broke, or the
/// upstream did not answer with HTTP.
pub(crate) fn exchange_failed(
    e: &hyper::Error,
    over: &AtomicU64,
    cap: Option<&BodyCap>,
    authority: &Authority,
    addr: std::net::SocketAddr,
) -> Refusal {
    let over_at = over.load(Ordering::Relaxed);
    if let Some(spent) = quota_spent(e) {
        spent.0.refusal(crate::credential::now_unix())
    } else if let Some(cap) = cap.filter(|_| over_at > 0) {
        // The upstream has at most `max` bytes of a body that never ended; the connection is gone.
        Refusal::request_refused(cap.exceeded(over_at), authority.clone())
    } else if e.is_user() || e.is_body_write_aborted() {
        Refusal::bad_request(format!("the request body could not be forwarded: {e}"))
    } else {
        Refusal::bad_upstream(format!("upstream {addr} did not answer with valid HTTP: {e}"))
    }
}

/// The host and port an absolute-form `http://` request names: other schemes and userinfo are refused,
/// a missing port is 80. Pure, so it is fuzzed on its own.
pub fn absolute_target(uri: &http::Uri) -> Result<Authority, Refusal> {
    // Schemes are case-insensitive (RFC 3986 §3.1): `HTTP://` is `http://`.
    let scheme = uri.scheme_str().map(str::to_ascii_lowercase);
    match scheme.as_deref() {
        Some("http") => {}
        None => {
            return Err(Refusal::bad_request(
                "this is a proxy: send absolute-form requests (GET http://host/path) or CONNECT host:port",
            ));
        }
        Some("https") => {
            return Err(Refusal::bad_request(
                "https:// URLs are tunnelled, not forwarded: the client should use CONNECT (set HTTPS_PROXY)",
            ));
        }
        Some(other) => {
            return Err(Refusal::bad_request(format!(
                "unsupported scheme {other:?}: only http:// is forwarded; use CONNECT for anything else"
            )));
        }
    }
    let text = uri.authority().map(|a| a.as_str()).unwrap_or("");
    if text.contains('@') {
        return Err(Refusal::bad_request(
            "credentials in the URL (user@host) are not forwarded; send them in an Authorization header",
        ));
    }
    Authority::parse(text, Some(80)).map_err(|e| Refusal::bad_request(format!("bad host in URL {text:?}: {e}")))
}

/// The quota a request body ran out of, if that is why the exchange failed.
pub(crate) fn quota_spent<'e>(e: &'e (dyn std::error::Error + 'static)) -> Option<&'e QuotaSpent> {
    let mut cause = Some(e);
    while let Some(e) = cause {
        if let Some(spent) = e.downcast_ref::<QuotaSpent>() {
            return Some(spent);
        }
        cause = e.source();
    }
    None
}

/// What the request rules made of a request that goes on: the deciding rule's decision, its
/// `max_body`, and in report mode what an enforcing policy would have refused it with.
pub(crate) struct RequestVerdict {
    pub decision: Decision,
    pub max_body: Option<u64>,
    pub would_deny: Option<super::admit::WouldDeny>,
}

/// [`decide_request`] through the report step: in report mode a request rule's refusal is served and
/// reported as `would_deny` (the streamed body cap is then not applied either); in enforce mode it
/// stands. The same for plain HTTP and for requests inside terminated tunnels.
pub(crate) fn request_verdict(
    policy: &Policy,
    authority: &Authority,
    req: &Request<Incoming>,
) -> Result<Option<RequestVerdict>, Refusal> {
    match decide_request(policy, authority, req) {
        Ok(v) => Ok(v.map(|(decision, max_body)| RequestVerdict { decision, max_body, would_deny: None })),
        Err(refusal) => {
            let Some(decision) = refusal.denied.as_ref().map(|d| d.decision.clone()) else { return Err(refusal) };
            let would_deny = super::admit::report(policy.mode, refusal)?;
            Ok(Some(RequestVerdict { decision, max_body: None, would_deny: Some(would_deny) }))
        }
    }
}

/// The request rules' verdict on a plain-HTTP request, before it is dialled: `None` when no rule
/// names the host (or the host itself is refused, which admission then says), the allowing decision
/// and its `max_body` otherwise, or the refusal. A policy without request rules pays one branch.
fn decide_request(
    policy: &Policy,
    authority: &Authority,
    req: &Request<Incoming>,
) -> Result<Option<(Decision, Option<u64>)>, Refusal> {
    if policy.requests.is_empty() || !policy.decide(&authority.target, authority.port).is_allowed() {
        return Ok(None);
    }
    // Framing was checked by the head guard: at most one Content-Length, and it is a number.
    let length = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let path = req.uri().path();
    match policy.decide_request(&authority.target, authority.port, req.method().as_str(), path, length) {
        Some((decision, _)) if !decision.is_allowed() => Err(Refusal::request_refused(decision, authority.clone())),
        other => Ok(other),
    }
}

/// The allowing rule's `max_body`, for a body whose length was not declared (chunked) or is counted
/// as it streams.
pub(crate) struct BodyCap {
    pub max: u64,
    pub rule: Decision,
}

impl BodyCap {
    /// The decision that refuses a body found to be over the cap at `length` bytes.
    pub fn exceeded(&self, length: u64) -> Decision {
        Decision {
            verdict: Verdict::Deny,
            reason: Reason::BodyTooLarge { max: self.max, length },
            rule: self.rule.rule.clone(),
            policy: self.rule.policy.clone(),
            level: self.rule.level,
        }
    }
}

/// The request body was over the rule's `max_body`: what the body yields instead of its next frame.
#[derive(Debug)]
struct BodyOverCap;

impl std::fmt::Display for BodyOverCap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the request body is over the rule's max_body")
    }
}

impl std::error::Error for BodyOverCap {}

/// A request body that counts the bytes sent upstream, and stops before the frame that would take it
/// over `max`: the upstream never sees more than the rule allows, nor the end of a body that was cut.
pub(crate) struct Counted {
    pub inner: Shaped<Incoming>,
    pub count: Arc<AtomicU64>,
    pub max: Option<u64>,
    /// Set to the length the body would have reached when it went over `max` (0: it did not).
    pub over: Arc<AtomicU64>,
}

impl Body for Counted {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            let reached = self.count.load(Ordering::Relaxed) + data.len() as u64;
            if self.max.is_some_and(|max| reached > max) {
                self.over.store(reached, Ordering::Relaxed);
                return Poll::Ready(Some(Err(Box::new(BodyOverCap))));
            }
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
pub(crate) struct Finished {
    pub inner: Shaped<Incoming>,
    pub received: u64,
    pub finish: Finish,
}

pub(crate) struct Finish {
    pub proxy: Arc<EgressProxy>,
    /// The session's counters; its quotas were charged as the bodies moved (each piece's grant).
    pub meter: ByteMeter,
    pub sent: Arc<AtomicU64>,
    pub status: u16,
    pub record: Option<Record>,
}

impl Finish {
    fn done(&mut self, received: u64, end: &'static str) {
        let Some(record) = self.record.take() else { return };
        let sent = self.sent.load(Ordering::Relaxed);
        self.meter.add(sent, received);
        record.closed(&self.proxy, sent, received, end, Some(self.status));
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
                let end = if quota_spent(&*e).is_some() { "quota_exceeded" } else { "upstream_error" };
                this.finish.done(this.received, end);
                Poll::Ready(Some(Err(e)))
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
fn check_host_header(headers: &HeaderMap, authority: &Authority) -> Result<(), Refusal> {
    let hosts: Vec<&HeaderValue> = headers.get_all(header::HOST).iter().collect();
    if hosts.len() > 1 {
        return Err(Refusal::bad_request("request has more than one Host header"));
    }
    let Some(value) = hosts.first() else { return Ok(()) };
    let text = value.to_str().unwrap_or("");
    match Authority::parse(text, Some(80)) {
        Ok(h) if h == *authority => Ok(()),
        _ => Err(Refusal::bad_request(format!(
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
    fn absolute_targets_read_their_scheme_without_case() {
        let uri: http::Uri = "HTTP://GITHUB.COM/a".parse().unwrap();
        assert_eq!(absolute_target(&uri).unwrap().to_string(), "github.com:80");
        let uri: http::Uri = "hTTp://example.org:8080/".parse().unwrap();
        assert_eq!(absolute_target(&uri).unwrap().to_string(), "example.org:8080");
        let uri: http::Uri = "HTTPS://example.org/".parse().unwrap();
        let refusal = absolute_target(&uri).unwrap_err();
        assert_eq!(
            refusal.message,
            "https:// URLs are tunnelled, not forwarded: the client should use CONNECT (set HTTPS_PROXY)"
        );
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
