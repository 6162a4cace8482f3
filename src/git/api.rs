//! The pull-request slice of the GitHub REST API under `/api/`: a route table as data, the checks that keep
//! writes on the session's working branch, and the `Link` rewrite that points pagination back at sluice.
//!
//! ```text
//! /api/… ─▶ parse (route table) ─▶ credential (Bearer | token | Basic) ─▶ authorize (same as git)
//!    Read     ─▶ forward
//!    Create   ─▶ check_create (head = working branch, base = a plain branch) ─▶ forward the same bytes
//!    OwnPull  ─▶ check the body ─▶ GET …/pulls/N upstream ─▶ check_pull_head ─▶ forward the same bytes
//! answer ─▶ allowed headers only, Link/Location rewritten to sluice, bodies scrubbed of the token
//! ```

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use serde_json::Value;

use super::body::read_limited;
use super::scrub::{ScrubbedBody, Scrubber};
use super::upstream::{self, Upstream, bearer_auth, scrub};
use super::{BoxError, GitBody, GitError, GitProxy, Record, full};
use crate::credential::{Basic, Secret, valid_session_id};

mod link;
mod route;
mod rules;

pub use link::{LinkMap, needs_repo_id};
pub use route::{Access, ApiRoute, Op, parse};
pub use rules::{check_comment, check_create, check_edit, check_pull_head};

/// Longest request body accepted for a write (pull requests and comments are small JSON documents).
pub const MAX_BODY: usize = 1 << 20;
/// Longest pull-request document read when checking whose head a pull request has.
const MAX_LOOKUP: usize = 8 << 20;
/// Upstream error bodies are passed back, scrubbed, up to this much.
const MAX_ERROR_BODY: usize = 64 << 10;
/// How long the upstream may take to answer with its response head.
const API_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a client may take to send a write's body.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Where sluice's refusals point, like GitHub's own errors do.
pub const DOCUMENTATION_URL: &str = "https://docs.github.com/rest/pulls/pulls";

/// A refusal of an API request: its status and the message the JSON answer carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub message: String,
}

impl Refusal {
    fn forbidden(message: String) -> Refusal {
        Refusal { status: StatusCode::FORBIDDEN, message }
    }

    fn bad_request(message: String) -> Refusal {
        Refusal { status: StatusCode::BAD_REQUEST, message }
    }
}

impl From<Refusal> for GitError {
    fn from(r: Refusal) -> GitError {
        GitError::Api { status: r.status, message: r.message }
    }
}

/// The JSON body of a refusal, shaped like GitHub's own errors so `gh` and scripts print the message.
pub fn error_body(message: &str) -> String {
    serde_json::json!({ "message": message, "documentation_url": DOCUMENTATION_URL }).to_string()
}

/// A `Host` header fit to build a URL from.
fn client_authority(headers: &HeaderMap) -> Option<&str> {
    let host = headers.get(header::HOST)?.to_str().ok()?;
    let ok = !host.is_empty()
        && host.len() <= 255
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'));
    ok.then_some(host)
}

/// Response headers passed back: the content description, caching, rate limits and GitHub's request id.
/// `Link` and `Location` are rewritten; anything else (cookies, auth challenges, token scopes) stays behind.
fn pass_header(name: &str) -> bool {
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

/// Request headers forwarded upstream besides the real token.
const FORWARDED_REQUEST_HEADERS: [&str; 6] =
    ["accept", "content-type", "user-agent", "x-github-api-version", "if-none-match", "if-modified-since"];

/// The state the API routes keep: the upstream and the repository ids learned for `Link` rewriting.
#[derive(Debug)]
pub struct Api {
    upstream: Upstream,
    repo_ids: Mutex<HashMap<String, u64>>,
}

impl Api {
    pub fn new(settings: &crate::config::GitSettings, dialer: &upstream::Dialer) -> Result<Api, String> {
        let upstream = Upstream::parse("git.api_upstream", &settings.api_upstream, dialer)?;
        Ok(Api { upstream, repo_ids: Mutex::new(HashMap::new()) })
    }
}

/// `Bearer CREDENTIAL`, `token CREDENTIAL` (session id from the credential's claims) or Basic SESSION:CREDENTIAL.
fn api_credentials(headers: &HeaderMap) -> Result<(Option<String>, Secret<String>), Refusal> {
    let unauthenticated = |m: &str| Refusal { status: StatusCode::UNAUTHORIZED, message: m.to_owned() };
    let missing = || {
        unauthenticated(
            "Requires authentication: send the session's git credential as \"Authorization: Bearer CREDENTIAL\"",
        )
    };
    let malformed = || {
        unauthenticated(
            "sluice: the Authorization header must be \"Bearer CREDENTIAL\", \"token CREDENTIAL\" or HTTP Basic \
             with user = session id, password = git credential",
        )
    };
    let value = headers.get(header::AUTHORIZATION).ok_or_else(missing)?;
    let value = value.to_str().map_err(|_| malformed())?.trim();
    let (scheme, rest) = value.split_once(' ').ok_or_else(malformed)?;
    let rest = rest.trim();
    if rest.is_empty() || rest.len() > 4 * crate::credential::MAX_TOKEN_LEN {
        return Err(malformed());
    }
    if scheme.eq_ignore_ascii_case("bearer") || scheme.eq_ignore_ascii_case("token") {
        return Ok((None, Secret::new(rest.to_owned())));
    }
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(malformed());
    }
    let basic = Basic::parse(value.as_bytes()).map_err(|_| malformed())?;
    if basic.password.expose().is_empty() {
        return Err(missing());
    }
    Ok((Some(basic.user), basic.password))
}

fn upstream_failure(e: upstream::UpstreamError, token: &Secret<String>) -> GitError {
    let status = match e {
        upstream::UpstreamError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::BAD_GATEWAY,
    };
    GitError::Api { status, message: format!("sluice: {}", scrub(&e.to_string(), Some(token))) }
}

impl GitProxy {
    /// Serves one `/api/…` request; the caller logs it and turns an `Err` into its answer.
    pub(super) async fn serve_api(
        &self,
        req: Request<Incoming>,
        record: &mut Record,
    ) -> Result<Response<GitBody>, GitError> {
        record.service = "api";
        let parsed = parse(req.method(), req.uri().path(), req.uri().query());
        if let Ok(route) = &parsed {
            record.service = route.op.as_str();
            record.repo = route.full_name();
        }
        let (parts, body) = req.into_parts();
        let (session, credential) = api_credentials(&parts.headers)?;
        let route = parsed?;
        // Bearer and token forms carry no session id beside the credential: it comes from the claims,
        // which are only read once the signature verifies.
        let session = match session {
            Some(s) => s,
            None => match &self.keyring {
                Some(k) => {
                    k.verify(credential.expose(), crate::credential::now_unix()).map(|c| c.sid).unwrap_or_default()
                }
                None => String::new(),
            },
        };
        record.session = if valid_session_id(&session) { session.clone() } else { "(invalid)".into() };
        let claims = self.authorize(&route.full_name(), &session, &credential).map_err(Refusal::forbidden)?;
        let repo = claims.repo.unwrap_or_default();
        let branch = claims.branch.unwrap_or_default();
        let token = self.tokens.for_repo(&repo).ok_or_else(|| {
            Refusal::forbidden(format!(
                "sluice: no upstream credential is configured for {repo}, so API requests are refused; \
                 the operator sets token_env, token_file or [git.tokens]"
            ))
        })?;
        let body = match route.op.access() {
            Access::Read => Bytes::new(),
            access => {
                let too_long = || Refusal {
                    status: StatusCode::PAYLOAD_TOO_LARGE,
                    message: format!("sluice: the request body is longer than {MAX_BODY} bytes"),
                };
                let declared = parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok());
                if declared.and_then(|v| v.parse::<u64>().ok()).is_some_and(|n| n > MAX_BODY as u64) {
                    return Err(too_long().into());
                }
                let bytes = read_limited(body, MAX_BODY, BODY_TIMEOUT).await.map_err(|long| {
                    if long { too_long() } else { Refusal::bad_request("sluice: cannot read the request body".into()) }
                })?;
                match (access, route.op) {
                    (Access::Create, _) => check_create(&bytes, &route.owner, &route.repo, &branch)?,
                    (_, Op::EditPull) => check_edit(&bytes)?,
                    _ => check_comment(&bytes)?,
                }
                record.bytes_up.fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
                bytes
            }
        };
        if route.op.access() == Access::OwnPull {
            self.check_own_pull(&parts.headers, &route, &repo, &branch, token).await?;
        }
        let mut headers = HeaderMap::new();
        for name in FORWARDED_REQUEST_HEADERS {
            for value in parts.headers.get_all(name) {
                headers.append(name, value.clone());
            }
        }
        headers.entry(header::USER_AGENT).or_insert(HeaderValue::from_static("sluice"));
        headers.entry(header::ACCEPT).or_insert(HeaderValue::from_static("application/vnd.github+json"));
        if route.op.access() != Access::Read {
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
        let path = route.upstream_path();
        let sent =
            self.api.upstream.send(parts.method.clone(), &path, headers, Some(bearer_auth(token)), Full::new(body));
        let resp = tokio::time::timeout(API_TIMEOUT, sent)
            .await
            .map_err(|_| GitError::Api {
                status: StatusCode::GATEWAY_TIMEOUT,
                message: format!(
                    "sluice: {} did not answer within {}s",
                    self.api.upstream.authority(),
                    API_TIMEOUT.as_secs()
                ),
            })?
            .map_err(|e| upstream_failure(e, token))?;
        self.answer(resp, &parts.headers, &repo, token).await
    }

    /// Looks the pull request up upstream and checks its head is the working branch of this repository.
    async fn check_own_pull(
        &self,
        client: &HeaderMap,
        route: &ApiRoute,
        repo: &str,
        branch: &str,
        token: &Secret<String>,
    ) -> Result<(), GitError> {
        let number = route.number.unwrap_or_default();
        let mut headers = HeaderMap::new();
        let agent = client.get(header::USER_AGENT).cloned().unwrap_or(HeaderValue::from_static("sluice"));
        headers.insert(header::USER_AGENT, agent);
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/vnd.github+json"));
        let path = route.lookup_path();
        let sent = self.api.upstream.send(Method::GET, &path, headers, Some(bearer_auth(token)), Empty::<Bytes>::new());
        let resp = tokio::time::timeout(API_TIMEOUT, sent)
            .await
            .map_err(|_| GitError::Api {
                status: StatusCode::GATEWAY_TIMEOUT,
                message: format!(
                    "sluice: looking up pull request #{number} took longer than {}s",
                    API_TIMEOUT.as_secs()
                ),
            })?
            .map_err(|e| upstream_failure(e, token))?;
        match resp.status() {
            s if s.is_success() => {}
            StatusCode::NOT_FOUND => {
                return Err(GitError::Api {
                    status: StatusCode::NOT_FOUND,
                    message: format!(
                        "sluice: {repo} has no pull request #{number} (an issue number is not enough: \
                         comments go only to pull requests from {branch:?})"
                    ),
                });
            }
            s => {
                return Err(GitError::Api {
                    status: StatusCode::BAD_GATEWAY,
                    message: format!(
                        "sluice: {} answered {s} when sluice looked up pull request #{number} of {repo}",
                        self.api.upstream.authority()
                    ),
                });
            }
        }
        let doc = read_limited(resp.into_body(), MAX_LOOKUP, API_TIMEOUT).await.map_err(|_| GitError::Api {
            status: StatusCode::BAD_GATEWAY,
            message: format!("sluice: cannot read pull request #{number} of {repo} from the upstream"),
        })?;
        check_pull_head(&doc, repo, number, branch)?;
        Ok(())
    }

    /// The upstream's answer with only the allowed headers, `Link` and `Location` pointed back at sluice,
    /// and error bodies scrubbed of the real token.
    async fn answer(
        &self,
        resp: Response<Incoming>,
        client: &HeaderMap,
        repo: &str,
        token: &Secret<String>,
    ) -> Result<Response<GitBody>, GitError> {
        let status = resp.status();
        let host = self.api.upstream.authority();
        if status == StatusCode::UNAUTHORIZED {
            return Err(GitError::Api {
                status: StatusCode::BAD_GATEWAY,
                message: format!(
                    "sluice: {host} refused sluice's upstream credential for {repo} ({status}); the operator should \
                     check the token configured for it"
                ),
            });
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
            out_headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json; charset=utf-8"));
            full(error_body(&format!("sluice: {host} answered {status} with an encoded body, which sluice withholds")))
        } else {
            let text = match read_limited(up_body, MAX_ERROR_BODY, Duration::from_secs(5)).await {
                Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
                Err(_) => error_body(&format!("sluice: {host} answered {status} with an unreadable body")),
            };
            full(scrub(&text, Some(token)))
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
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;

    #[test]
    fn credentials_in_three_forms() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
            api_credentials(&h).map(|(s, c)| (s, c.expose().clone()))
        };
        assert_eq!(with("Bearer v1.a.b"), Ok((None, "v1.a.b".to_owned())));
        assert_eq!(with("token v1.a.b"), Ok((None, "v1.a.b".to_owned())));
        assert_eq!(with(&format!("Basic {}", STANDARD.encode("s1:v1.a.b"))), Ok((Some("s1".into()), "v1.a.b".into())));
        assert_eq!(with("Digest x").unwrap_err().status, StatusCode::UNAUTHORIZED);
        assert_eq!(
            api_credentials(&HeaderMap::new()).unwrap_err().message,
            "Requires authentication: send the session's git credential as \"Authorization: Bearer CREDENTIAL\""
        );
    }

    #[test]
    fn only_harmless_headers_pass_back() {
        for name in ["content-type", "etag", "x-ratelimit-remaining", "x-github-request-id"] {
            assert!(pass_header(name), "{name}");
        }
        for name in ["set-cookie", "authorization", "www-authenticate", "x-oauth-scopes", "x-accepted-oauth-scopes"] {
            assert!(!pass_header(name), "{name}");
        }
    }
}
