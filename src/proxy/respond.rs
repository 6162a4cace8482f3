//! The one place every refusal and failure becomes an HTTP answer a person and an agent can act on.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::credential::CredentialError;
use crate::net::NetError;
use crate::policy::{Authority, Decision};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// Who is at fault, to pick the log level: clients err all the time, the proxy should not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    Client,
    Policy,
    Upstream,
    Internal,
}

/// Why the proxy did not serve a request as asked.
#[derive(Debug)]
pub enum ProxyError {
    /// Malformed or unsupported request: `400`.
    BadRequest(String),
    /// The request head is over `[egress] max_header_bytes`: `431`.
    HeadTooLarge(String),
    /// The request head did not arrive within `[egress] header_timeout`: `408`.
    HeadTimeout(String),
    /// Identity missing or unverifiable: `407`.
    Auth(AuthError),
    /// The policy refused the destination: `403`.
    Denied { decision: Box<Decision>, authority: Authority },
    /// The credential names a policy this server does not have: `403`.
    UnknownPolicy { name: String },
    /// Over the per-session request rate: `429`.
    RateLimited { retry_after: Duration, limit: String },
    /// Over the per-session cap on open tunnels: `429`.
    TooManyTunnels { max: u32 },
    /// DNS or upstream failure: `502`, or `504` for a timeout.
    Upstream(NetError),
    /// The upstream answered with something that is not HTTP: `502`.
    BadUpstream(String),
}

#[derive(Debug)]
pub enum AuthError {
    Missing,
    NotBasic,
    BadEncoding,
    InvalidSessionId,
    NoKey,
    Credential(CredentialError),
}

impl std::fmt::Display for AuthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuthError::Missing => f.write_str("this proxy requires credentials"),
            AuthError::NotBasic => f.write_str("Proxy-Authorization must use the Basic scheme"),
            AuthError::BadEncoding => f.write_str("Proxy-Authorization is not base64 of \"SESSION:TOKEN\""),
            AuthError::InvalidSessionId => {
                f.write_str("the session id must be 1 to 128 letters, digits, '.', '-' or '_'")
            }
            AuthError::NoKey => f.write_str("this proxy has no signing key, so it cannot verify credentials"),
            AuthError::Credential(e) => e.fmt(f),
        }
    }
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::HeadTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::HeadTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ProxyError::Auth(_) => StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            ProxyError::Denied { .. } | ProxyError::UnknownPolicy { .. } => StatusCode::FORBIDDEN,
            ProxyError::RateLimited { .. } | ProxyError::TooManyTunnels { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::Upstream(e) if e.is_timeout() => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Upstream(_) | ProxyError::BadUpstream(_) => StatusCode::BAD_GATEWAY,
        }
    }

    pub fn fault(&self) -> Fault {
        match self {
            ProxyError::BadRequest(_)
            | ProxyError::HeadTooLarge(_)
            | ProxyError::HeadTimeout(_)
            | ProxyError::Auth(_)
            | ProxyError::RateLimited { .. }
            | ProxyError::TooManyTunnels { .. } => Fault::Client,
            ProxyError::Denied { .. } | ProxyError::UnknownPolicy { .. } => Fault::Policy,
            ProxyError::Upstream(_) | ProxyError::BadUpstream(_) => Fault::Upstream,
        }
    }

    /// A stable short code for logs, metrics and the `X-Sluice-Decision` header.
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::BadRequest(_) => "bad_request",
            ProxyError::HeadTooLarge(_) => "head_too_large",
            ProxyError::HeadTimeout(_) => "head_timeout",
            ProxyError::Auth(AuthError::Missing) => "auth_missing",
            ProxyError::Auth(AuthError::Credential(CredentialError::Expired { .. })) => "auth_expired",
            ProxyError::Auth(AuthError::Credential(CredentialError::BadSignature)) => "auth_bad_signature",
            ProxyError::Auth(AuthError::Credential(CredentialError::SessionMismatch)) => "auth_session_mismatch",
            ProxyError::Auth(_) => "auth_invalid",
            ProxyError::Denied { decision, .. } => decision.reason.code(),
            ProxyError::UnknownPolicy { .. } => "unknown_policy",
            ProxyError::RateLimited { .. } => "rate_limited",
            ProxyError::TooManyTunnels { .. } => "too_many_tunnels",
            ProxyError::Upstream(e) => e.code(),
            ProxyError::BadUpstream(_) => "bad_upstream",
        }
    }

    /// The sentence that says what happened.
    pub fn message(&self) -> String {
        match self {
            ProxyError::BadRequest(m) | ProxyError::HeadTooLarge(m) | ProxyError::HeadTimeout(m) => m.clone(),
            ProxyError::Auth(e) => format!("proxy authentication failed: {e}"),
            ProxyError::Denied { decision, authority } => {
                format!("{authority} is not allowed: {}", decision.reason)
            }
            ProxyError::UnknownPolicy { name } => {
                format!("the session's credential names policy {name:?}, which this proxy does not have")
            }
            ProxyError::RateLimited { retry_after, limit } => {
                format!("session over its rate limit ({limit}); retry in {}s", retry_secs(*retry_after))
            }
            ProxyError::TooManyTunnels { max } => {
                format!("session already has {max} open tunnels, the most it may have at once")
            }
            ProxyError::Upstream(e) => e.to_string(),
            ProxyError::BadUpstream(m) => m.clone(),
        }
    }

    /// What the reader can do about it.
    pub fn hint(&self) -> Option<String> {
        match self {
            ProxyError::Denied { decision, authority } => decision.hint(&authority.target, authority.port),
            ProxyError::Auth(AuthError::Credential(CredentialError::Expired { .. })) => {
                Some("ask the orchestrator for a fresh session credential".into())
            }
            ProxyError::Auth(_) => Some("set HTTPS_PROXY=http://SESSION:TOKEN@HOST:PORT with a credential from `sluice token mint --kind egress`".into()),
            ProxyError::UnknownPolicy { .. } => Some("add the policy to the proxy's policies directory, or mint the credential for an existing policy".into()),
            ProxyError::RateLimited { .. } => Some("a policy author raises it with requests_per_second and burst in the policy's [limits]".into()),
            ProxyError::TooManyTunnels { .. } => Some("close idle connections, or raise max_tunnels in the policy's [limits]".into()),
            ProxyError::BadRequest(_)
            | ProxyError::HeadTooLarge(_)
            | ProxyError::HeadTimeout(_)
            | ProxyError::Upstream(_)
            | ProxyError::BadUpstream(_) => None,
        }
    }
}

fn retry_secs(d: Duration) -> u64 {
    // Retry-After has whole seconds; round up so a client that obeys it is not refused again.
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// Context a refusal names: the session's policy and level, when known.
#[derive(Default)]
pub struct Context<'a> {
    pub policy: Option<&'a str>,
    pub level: Option<&'a str>,
    pub wants_json: bool,
    /// Whether the connection ends with this answer.
    pub close: bool,
}

/// Builds the answer for an error: status, `X-Sluice-Decision`, a plain-text (or JSON) body with a
/// `Content-Length`, and `Connection: close` when the exchange ends here.
pub fn refusal(err: &ProxyError, ctx: &Context<'_>) -> Response<ProxyBody> {
    let (head, body) = refusal_parts(err, ctx);
    Response::from_parts(head, full(body))
}

/// The same answer as [`refusal`], as the bytes to write on a connection hyper does not serve.
pub fn refusal_bytes(err: &ProxyError, ctx: &Context<'_>, version: http::Version) -> Vec<u8> {
    let (head, body) = refusal_parts(err, ctx);
    let status = head.status;
    let mut out = Vec::with_capacity(256 + body.len());
    out.extend_from_slice(if version == http::Version::HTTP_10 { b"HTTP/1.0 " } else { b"HTTP/1.1 " });
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in &head.headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("content-length: {}\r\n\r\n", body.len()).as_bytes());
    out.extend_from_slice(body.as_bytes());
    out
}

fn refusal_parts(err: &ProxyError, ctx: &Context<'_>) -> (http::response::Parts, String) {
    let status = err.status();
    let policy = match err {
        ProxyError::Denied { decision, .. } => Some(decision.policy.to_string()),
        _ => ctx.policy.map(str::to_string),
    };
    let level = match err {
        ProxyError::Denied { decision, .. } => Some(decision.level.to_string()),
        _ => ctx.level.map(str::to_string),
    };
    let message = err.message();
    let hint = err.hint();
    let body = if ctx.wants_json {
        let mut v = serde_json::json!({
            "error": err.code(),
            "status": status.as_u16(),
            "message": message,
            "policy": policy,
            "level": level,
            "hint": hint,
        });
        if let ProxyError::Denied { decision, authority } = err {
            v["destination"] = serde_json::json!(authority.to_string());
            v["reason"] = serde_json::json!(decision.reason.to_string());
            v["rule"] = serde_json::json!(decision.rule);
        }
        format!("{v}\n")
    } else {
        let mut text = format!("sluice: {message}\n");
        if let ProxyError::Denied { decision, authority } = err {
            text.push_str(&format!(
                "  destination: {authority}\n  policy:      {} (level {})\n  reason:      {}\n",
                decision.policy, decision.level, decision.reason
            ));
            if let Some(rule) = &decision.rule {
                text.push_str(&format!("  rule:        {:?} ({})\n", &*rule.pattern, rule.location()));
            }
        } else if let (Some(p), Some(l)) = (&policy, &level) {
            text.push_str(&format!("  policy:      {p} (level {l})\n"));
        }
        if let Some(h) = &hint {
            text.push_str(&format!("  hint:        {h}\n"));
        }
        text
    };
    let mut decision_header = format!("deny; reason={}", err.code());
    if let Some(p) = &policy {
        decision_header.push_str(&format!("; policy={p}"));
    }
    let (mut head, ()) = Response::new(()).into_parts();
    head.status = status;
    let headers = &mut head.headers;
    let content_type = if ctx.wants_json { "application/json" } else { "text/plain; charset=utf-8" };
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Ok(v) = HeaderValue::from_str(&decision_header) {
        headers.insert("x-sluice-decision", v);
    }
    match err {
        ProxyError::Auth(_) => {
            headers.insert(header::PROXY_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"sluice\""));
        }
        ProxyError::RateLimited { retry_after, .. } => {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_secs(*retry_after)));
        }
        ProxyError::TooManyTunnels { .. } => {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(1u64));
        }
        _ => {}
    }
    if ctx.close {
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    (head, body)
}

/// A body of known length.
pub fn full(body: impl Into<Bytes>) -> ProxyBody {
    Full::new(body.into()).map_err(|never| match never {}).boxed()
}

/// An empty body.
pub fn empty() -> ProxyBody {
    full(Bytes::new())
}

/// Answers a connection over a listener's cap (`listener` names it: "proxy", "git proxy") with a raw
/// `503`, before any HTTP is parsed, and closes it.
pub async fn refuse_overloaded(mut stream: TcpStream, listener: &'static str, max: usize, peer: SocketAddr) {
    tracing::warn!(listener, max_connections = max, client = %peer, "connection refused: at the connection limit");
    let _ = stream.write_all(&overloaded_bytes(listener, max)).await;
    let _ = stream.shutdown().await;
}

fn overloaded_bytes(listener: &str, max: usize) -> Vec<u8> {
    let body = format!("sluice: the {listener} is at its connection limit ({max} connections); retry shortly\n");
    format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nRetry-After: 1\r\nX-Sluice-Decision: deny; reason=overloaded\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}
