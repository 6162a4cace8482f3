//! The egress renderer: a [`Refusal`] becomes the HTTP answer a person and an agent can act on, as a
//! hyper response or as the bytes written on a connection hyper does not serve. Both carry the same
//! status, headers (`date` included) and body.

use std::time::SystemTime;

use bytes::Bytes;
use http::{HeaderValue, Response, header};
use http_body_util::{BodyExt, Full, combinators::BoxBody};

use crate::refusal::{Challenge, Refusal};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// The answer for a refusal: status, `X-Sluice-Decision`, a plain-text (or JSON) body with a
/// `Content-Length`, and `Connection: close` when the exchange ends here.
pub fn response(refusal: &Refusal, wants_json: bool) -> Response<ProxyBody> {
    let (head, body) = parts(refusal, wants_json);
    Response::from_parts(head, full(body))
}

/// The same answer as [`response`], as the bytes to write on a connection hyper does not serve; hyper
/// would add `content-length` and `date` last, and so does this.
pub fn bytes(refusal: &Refusal, wants_json: bool, version: http::Version) -> Vec<u8> {
    let (head, body) = parts(refusal, wants_json);
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
    out.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
    out.extend_from_slice(format!("date: {}\r\n\r\n", httpdate::fmt_http_date(SystemTime::now())).as_bytes());
    out.extend_from_slice(body.as_bytes());
    out
}

fn parts(refusal: &Refusal, wants_json: bool) -> (http::response::Parts, String) {
    let status = refusal.status;
    let policy = refusal.policy.as_ref();
    let body = if wants_json {
        let mut v = serde_json::json!({
            "error": refusal.code,
            "status": status.as_u16(),
            "message": refusal.message,
            "policy": policy.map(|p| &p.name),
            "level": policy.map(|p| p.level),
            "hint": refusal.hint,
        });
        if let Some(denied) = &refusal.denied {
            v["destination"] = serde_json::json!(denied.authority.to_string());
            v["reason"] = serde_json::json!(denied.decision.reason.to_string());
            v["rule"] = serde_json::json!(denied.decision.rule);
        }
        format!("{v}\n")
    } else {
        let mut text = format!("sluice: {}\n", refusal.message);
        if let Some(denied) = &refusal.denied {
            let d = &denied.decision;
            text.push_str(&format!(
                "  destination: {}\n  policy:      {} (level {})\n  reason:      {}\n",
                denied.authority, d.policy, d.level, d.reason
            ));
            if let Some(rule) = &d.rule {
                text.push_str(&format!("  rule:        {:?} ({})\n", &*rule.pattern, rule.location()));
            }
        } else if let Some(p) = policy {
            text.push_str(&format!("  policy:      {} (level {})\n", p.name, p.level));
        }
        if let Some(h) = &refusal.hint {
            text.push_str(&format!("  hint:        {h}\n"));
        }
        text
    };
    let mut decision_header = format!("deny; reason={}", refusal.code);
    if let Some(p) = policy {
        decision_header.push_str(&format!("; policy={}", p.name));
    }
    let (mut head, ()) = Response::new(()).into_parts();
    head.status = status;
    let headers = &mut head.headers;
    let content_type = if wants_json { "application/json" } else { "text/plain; charset=utf-8" };
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Ok(v) = HeaderValue::from_str(&decision_header) {
        headers.insert("x-sluice-decision", v);
    }
    match refusal.challenge {
        Some(Challenge::Proxy) => {
            headers.insert(header::PROXY_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"sluice\""));
        }
        Some(Challenge::Origin) => {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"sluice-git\""));
        }
        None => {}
    }
    if let Some(secs) = refusal.retry_after {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    if refusal.close {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_renderings_carry_the_same_head_and_body() {
        let refusal = Refusal::rate_limited(std::time::Duration::from_millis(300), "1/s, burst 1")
            .in_policy(&"p".into(), "custom")
            .closing(true);
        let wire = String::from_utf8(bytes(&refusal, false, http::Version::HTTP_11)).unwrap();
        let (head, body) = wire.split_once("\r\n\r\n").unwrap();
        let mut lines = head.lines();
        assert_eq!(lines.next(), Some("HTTP/1.1 429 Too Many Requests"));
        let headers: Vec<&str> = lines.collect();
        assert_eq!(
            headers[..6],
            [
                "content-type: text/plain; charset=utf-8",
                "x-sluice-decision: deny; reason=rate_limited; policy=p",
                "retry-after: 1",
                "connection: close",
                &format!("content-length: {}", body.len()),
                headers[5],
            ]
        );
        assert!(headers[5].starts_with("date: ") && headers[5].ends_with(" GMT"), "{}", headers[5]);
        assert_eq!(
            body,
            "sluice: session over its rate limit (1/s, burst 1); retry in 1s\n  policy:      p (level custom)\n  \
             hint:        a policy author raises it with requests_per_second and burst in the policy's [limits]\n"
        );
        let response = response(&refusal, false);
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers().len(), 4);
    }
}
