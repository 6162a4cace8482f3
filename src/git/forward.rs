//! Sending a smart-HTTP request upstream with the real token, and turning the upstream's answer into the
//! client's: successes streamed back unchanged, failures explained in words with the token scrubbed.

use std::time::Duration;

use http::{HeaderMap, Method, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::body::{ForwardBody, read_prefix};
use super::route::Action;
use super::upstream::{self, FORWARDED_REQUEST_HEADERS, FORWARDED_RESPONSE_HEADERS, GIT_PROTOCOL};
use super::{BoxError, GitBody, GitError, GitProxy, scrub};
use crate::credential::Secret;
use crate::refusal::Refusal;

/// How long discovery may wait for the upstream's response head.
const ADVERTISE_TIMEOUT: Duration = Duration::from_secs(60);
/// Upstream error bodies are shown to the client, scrubbed, up to this much.
const UPSTREAM_ERROR_LIMIT: usize = 16 << 10;

impl GitProxy {
    /// Sends the request upstream with the real token and streams the answer back.
    pub(super) async fn forward(
        &self,
        client_headers: &HeaderMap,
        repo: &str,
        action: Action,
        token: Option<&Secret<String>>,
        body: ForwardBody,
    ) -> Result<Response<GitBody>, GitError> {
        let mut headers = HeaderMap::new();
        for name in
            FORWARDED_REQUEST_HEADERS.iter().chain(std::iter::once(&header::HeaderName::from_static(GIT_PROTOCOL)))
        {
            for value in client_headers.get_all(name) {
                headers.append(name.clone(), value.clone());
            }
        }
        let method = match action {
            Action::Advertise(_) => Method::GET,
            Action::Rpc(_) => Method::POST,
        };
        let path = format!("{repo}.git/{}", action.upstream_suffix());
        let sent = self.upstream.send(method, &path, headers, token.map(upstream::basic_auth), body);
        let result = match action {
            Action::Advertise(_) => tokio::time::timeout(ADVERTISE_TIMEOUT, sent).await.map_err(|_| {
                Refusal::upstream(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream_timeout",
                    format!("{} did not answer within {}s", self.upstream.authority(), ADVERTISE_TIMEOUT.as_secs()),
                )
            })?,
            Action::Rpc(_) => sent.await,
        };
        let resp = result.map_err(|e| {
            let (status, code) = match e {
                upstream::UpstreamError::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout"),
                _ => (StatusCode::BAD_GATEWAY, "upstream_unreachable"),
            };
            Refusal::upstream(status, code, upstream::scrub(&e.to_string(), token))
        })?;
        let status = resp.status();
        if status.is_success() {
            let (up, up_body) = resp.into_parts();
            let mut out = Response::new(up_body.map_err(BoxError::from).boxed());
            *out.status_mut() = status;
            for name in FORWARDED_RESPONSE_HEADERS {
                for value in up.headers.get_all(&name) {
                    out.headers_mut().append(name.clone(), value.clone());
                }
            }
            return Ok(out);
        }
        let host = self.upstream.authority();
        let (code, message) = match status.as_u16() {
            300..=399 => (
                "upstream_redirect",
                format!("{host} answered {status} (a redirect) for {repo}; sluice does not follow redirects"),
            ),
            401 | 403 if token.is_none() => (
                "upstream_needs_token",
                format!(
                    "{host} answered {status} for {repo} and no upstream credential is configured for it; only \
                     public repositories can be read"
                ),
            ),
            401 | 403 => (
                "upstream_refused_token",
                format!(
                    "{host} refused sluice's upstream credential for {repo} ({status}); the operator should check \
                     the token configured for it"
                ),
            ),
            404 => (
                "upstream_not_found",
                format!("{host} answered {status} for {repo}: {}", error_text(resp, token).await),
            ),
            _ => ("upstream_error", format!("{host} answered {status} for {repo}: {}", error_text(resp, token).await)),
        };
        let status = if status == StatusCode::NOT_FOUND { StatusCode::NOT_FOUND } else { StatusCode::BAD_GATEWAY };
        Err(Refusal::upstream(status, code, message).into())
    }
}

/// Up to [`UPSTREAM_ERROR_LIMIT`] bytes of an upstream error body, as one line of text with the token
/// scrubbed. The token is removed before the text is cut, from a read that goes one longest token form
/// past the limit, so a token straddling the cut is whole when it is replaced; a fragment the cut leaves
/// is redacted too. An encoded body is withheld: it cannot be searched.
async fn error_text(resp: Response<Incoming>, token: Option<&Secret<String>>) -> String {
    if resp.headers().get(header::CONTENT_ENCODING).is_some_and(|v| v.as_bytes() != b"identity") {
        return "(an encoded body, which sluice withholds)".to_owned();
    }
    let scrubber = scrub::Scrubber::new(token);
    let want = UPSTREAM_ERROR_LIMIT + scrubber.longest();
    let buf = read_prefix(resp.into_body(), want, Duration::from_secs(5)).await;
    let text = scrubber.cut(&buf, UPSTREAM_ERROR_LIMIT);
    String::from_utf8_lossy(&text).split_whitespace().collect::<Vec<_>>().join(" ")
}
