//! The upstream's answer as the sandbox gets it: only harmless headers (caching, rate limits, media
//! type), `Link` and `Location` pointed back at sluice, bodies scrubbed of the real token.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use serde_json::Value;

use super::link::{LinkMap, needs_repo_id};
use super::respond::render;
use super::{API_TIMEOUT, GitProxy};
use crate::credential::Secret;
use crate::git::body::read_limited;
use crate::git::scrub::{ScrubbedBody, Scrubber};
use crate::git::upstream::{bearer_auth, scrub};
use crate::git::{BoxError, GitBody, full};
use crate::refusal::{Fault, Refusal};

/// Upstream error bodies are passed back, scrubbed, up to this much.
const MAX_ERROR_BODY: usize = 64 << 10;
/// Longest repository document read when learning its id.
const MAX_LOOKUP: usize = 8 << 20;

/// A `Host` header fit to build a URL from.
fn client_authority(headers: &HeaderMap) -> Option<&str> {
    let host = headers.get(header::HOST)?.to_str().ok()?;
    let ok = !host.is_empty()
        && host.len() <= 255
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'));
    ok.then_some(host)
}

/// Response headers passed back: the content description, caching (`ETag`, `Last-Modified`, so that
/// conditional requests work), rate limits (so tools back off) and GitHub's request id. `Link` and
/// `Location` are rewritten; anything else (cookies, auth challenges, token scopes) stays behind.
pub(super) fn pass_header(name: &str) -> bool {
    matches!(
        name,
        "content-type"
            | "etag"
            | "last-modified"
            | "cache-control"
            | "vary"
            | "retry-after"
            | "x-github-request-id"
            | "x-github-media-type"
            | "x-github-api-version-selected"
    ) || name.starts_with("x-ratelimit-")
}

impl GitProxy {
    /// The upstream's answer with only the allowed headers, `Link` and `Location` pointed back at sluice,
    /// and bodies scrubbed of the real token.
    pub(super) async fn answer(
        &self,
        resp: Response<Incoming>,
        client: &HeaderMap,
        repo: &str,
        token: &Secret<String>,
    ) -> Result<Response<GitBody>, Refusal> {
        let status = resp.status();
        let host = self.api.upstream.authority();
        if status == StatusCode::UNAUTHORIZED {
            return Err(Refusal::new(
                StatusCode::BAD_GATEWAY,
                "upstream_token_refused",
                Fault::Internal,
                format!(
                    "{host} refused sluice's upstream credential for {repo} ({status}); the operator should check \
                     the token configured for it"
                ),
            ));
        }
        let upstream_base = self.api.upstream.base_url();
        let client_base = client_authority(client).map(|h| format!("http://{h}/api"));
        let repo_id = match resp.headers().get(header::LINK).and_then(|v| v.to_str().ok()) {
            Some(link) if needs_repo_id(link, &upstream_base) => self.repo_id(repo, token).await,
            _ => None,
        };
        let (up, up_body) = resp.into_parts();
        let mut out_headers = HeaderMap::new();
        for (name, value) in &up.headers {
            if pass_header(name.as_str()) {
                out_headers.append(name.clone(), value.clone());
            }
        }
        if let Some(client_base) = &client_base {
            let map = LinkMap { upstream: &upstream_base, client: client_base, repo, repo_id };
            let link: Vec<String> = up
                .headers
                .get_all(header::LINK)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .filter_map(|v| map.link(v))
                .collect();
            if !link.is_empty()
                && let Ok(v) = HeaderValue::from_str(&link.join(", "))
            {
                out_headers.insert(header::LINK, v);
            }
            if let Some(loc) = up.headers.get(header::LOCATION).and_then(|v| v.to_str().ok()).and_then(|v| map.url(v))
                && let Ok(v) = HeaderValue::from_str(&loc)
            {
                out_headers.insert(header::LOCATION, v);
            }
        }
        // Sluice never asks for an encoded body; one that comes anyway passes only when it is a success,
        // unscrubbed (it cannot be searched). A plain success is streamed with the token scrubbed: GitHub
        // never echoes it, so this costs a lookup per byte and changes nothing, unless something upstream
        // reflects the credential.
        let encoding = up.headers.get(header::CONTENT_ENCODING).filter(|v| v.as_bytes() != b"identity");
        let body = if status.is_success() || status == StatusCode::NOT_MODIFIED {
            match encoding {
                Some(v) => {
                    out_headers.insert(header::CONTENT_ENCODING, v.clone());
                    up_body.map_err(BoxError::from).boxed()
                }
                None => ScrubbedBody::new(up_body, Scrubber::new(Some(token))).map_err(BoxError::from).boxed(),
            }
        } else if encoding.is_some() {
            // An encoded error body cannot be searched for the token: say so instead of passing it.
            let why = format!("{host} answered {status} with an encoded body, which sluice withholds");
            return Ok(render(&Refusal::new(status, "upstream_encoded_error", Fault::Upstream, why)));
        } else {
            match read_limited(up_body, MAX_ERROR_BODY, Duration::from_secs(5)).await {
                Ok(bytes) => full(scrub(&String::from_utf8_lossy(&bytes), Some(token))),
                Err(_) => {
                    let why = format!("{host} answered {status} with an unreadable body");
                    return Ok(render(&Refusal::new(status, "upstream_unreadable_error", Fault::Upstream, why)));
                }
            }
        };
        let mut out = Response::new(body);
        *out.status_mut() = status;
        *out.headers_mut() = out_headers;
        Ok(out)
    }

    /// The repository's numeric id upstream (for `/repositories/ID/…` links), looked up once and cached.
    async fn repo_id(&self, repo: &str, token: &Secret<String>) -> Option<u64> {
        let key = repo.to_ascii_lowercase();
        if let Some(id) = self.api.repo_ids.lock().ok().and_then(|m| m.get(&key).copied()) {
            return Some(id);
        }
        let mut headers = HeaderMap::new();
        headers.insert(header::USER_AGENT, HeaderValue::from_static("sluice"));
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/vnd.github+json"));
        let path = format!("repos/{repo}");
        let sent = self.api.upstream.send(Method::GET, &path, headers, Some(bearer_auth(token)), Empty::<Bytes>::new());
        let resp = tokio::time::timeout(API_TIMEOUT, sent).await.ok()?.ok()?;
        if !resp.status().is_success() {
            return None;
        }
        let doc = read_limited(resp.into_body(), MAX_LOOKUP, API_TIMEOUT).await.ok()?;
        let id = serde_json::from_slice::<Value>(&doc).ok()?.get("id")?.as_u64()?;
        if let Ok(mut m) = self.api.repo_ids.lock() {
            m.insert(key, id);
        }
        Some(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_harmless_headers_pass_back() {
        for name in ["content-type", "etag", "last-modified", "x-ratelimit-remaining", "x-github-request-id"] {
            assert!(pass_header(name), "{name}");
        }
        for name in ["set-cookie", "authorization", "www-authenticate", "x-oauth-scopes", "x-accepted-oauth-scopes"] {
            assert!(!pass_header(name), "{name}");
        }
    }
}
