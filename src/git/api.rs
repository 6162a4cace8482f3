//! The repository-scoped slice of the GitHub REST API under `/api/` (SPEC §3.1): a route table as data,
//! the checks that keep writes on the session's own pull request, the job logs sluice fetches itself,
//! and the `Link` rewrite that points pagination back at sluice.
//!
//! ```text
//! /api/… ─▶ route::parse (the table) ─▶ credential (Bearer | token | Basic) ─▶ authorize (same as git)
//!    Read    ─▶ forward (Accept, If-None-Match, If-Modified-Since) ─▶ answer
//!    Log     ─▶ forward ─▶ 302 to log storage ─▶ log::follow (log_hosts, guard, no credential) ─▶ stream
//!    writes  ─▶ write rate ─▶ rules (the body) ─▶ target (GET the pull request / review comment) ─▶ forward
//! answer ─▶ allowed headers only, Link/Location rewritten to sluice, bodies scrubbed of the token
//! every refusal ─▶ respond::render (GitHub-shaped JSON)
//! ```

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;

use super::body::read_limited;
use super::upstream::{self, Dialer, Pool, Upstream, bearer_auth, scrub};
use super::{GitBody, GitError, GitProxy, Record};
use crate::config::{CommentScope, GitSettings, LogHost};
use crate::credential::{Basic, Secret, valid_session_id};
use crate::limit::{LimitKey, Limiter};
use crate::policy::Limits;
use crate::refusal::{Fault, Refusal};

mod answer;
mod link;
mod log;
pub mod respond;
mod route;
mod rules;
mod target;

pub use link::{LinkMap, needs_repo_id};
pub use respond::{DOCUMENTATION_URL, error_body};
pub use route::{ALLOWED, Access, ApiRoute, parse};
pub use rules::{check_comment, check_comment_of_pull, check_create, check_edit, check_pull_head, check_review};

/// Longest request body accepted for a write (pull requests and comments are small JSON documents).
pub const MAX_BODY: usize = 1 << 20;
/// How long the upstream may take to answer with its response head.
const API_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a client may take to send a write's body.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// Request headers forwarded upstream besides the real token: media types, conditional requests.
const FORWARDED_REQUEST_HEADERS: [&str; 6] =
    ["accept", "content-type", "user-agent", "x-github-api-version", "if-none-match", "if-modified-since"];

/// The state the API routes keep: the upstream, the log storage client, the write rate and the
/// repository ids learned for `Link` rewriting.
#[derive(Debug)]
pub struct Api {
    upstream: Upstream,
    /// Pooled, guarded client for the log storage hosts (`log_allow_ips` lifts the guard).
    storage: Pool,
    log_hosts: Vec<LogHost>,
    comment_scope: CommentScope,
    /// The write rate (`[git.limits] api_writes_per_minute`) as limiter limits, and the figure; `None` when
    /// it is 0. Counted in the server's shared limiter under [`LimitKey::api_writes`].
    writes: Option<(Limits, u32)>,
    repo_ids: Mutex<HashMap<String, u64>>,
}

impl Api {
    pub fn new(settings: &GitSettings, dialer: &Dialer) -> Result<Api, String> {
        let upstream = Upstream::parse("git.api_upstream", &settings.api_upstream, dialer)?;
        let storage = Pool::new(dialer, Some(settings.log_allow_ips.iter().map(|r| r.0).collect()));
        let per_minute = settings.limits.api_writes_per_minute;
        // A rate of N a minute with a burst of N: a session may write N times at once, then one more
        // every 60/N seconds. Its own key, so writes and other requests do not share a budget.
        let writes = (per_minute > 0).then(|| {
            let rate = Limits {
                requests_per_second: Some(f64::from(per_minute) / 60.0),
                burst: Some(per_minute),
                ..Limits::default()
            };
            (rate, per_minute)
        });
        Ok(Api {
            upstream,
            storage,
            log_hosts: settings.log_hosts.clone(),
            comment_scope: settings.comment_scope,
            writes,
            repo_ids: Mutex::new(HashMap::new()),
        })
    }

    /// Counts one write of `session` against `[git.limits] api_writes_per_minute`, in `limiter` (the one
    /// the server shares, so the count holds across instances with a shared store).
    async fn check_write_rate(&self, limiter: &dyn Limiter, session: &str) -> Result<(), Refusal> {
        let Some((rate, per_minute)) = &self.writes else {
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                "api_writes_disabled",
                Fault::Policy,
                "API writes are disabled on this proxy ([git.limits] api_writes_per_minute = 0)",
            ));
        };
        limiter.check_request(&LimitKey::api_writes(session), rate).await.map_err(|limited| {
            let limited = match limited {
                crate::limit::Limited::Over(limited) => limited,
                crate::limit::Limited::StoreUnavailable => return Refusal::limit_store_unavailable(),
            };
            let secs = limited.retry_after_secs();
            let mut r = Refusal::new(
                StatusCode::TOO_MANY_REQUESTS,
                "api_write_rate",
                Fault::Client,
                format!(
                    "session over its API write rate ({per_minute} writes per minute, [git.limits] \
                     api_writes_per_minute); retry in {secs}s"
                ),
            );
            r.retry_after = Some(u32::try_from(secs).unwrap_or(u32::MAX));
            r
        })
    }
}

fn unauthenticated(code: &'static str, message: &str) -> Refusal {
    Refusal::new(StatusCode::UNAUTHORIZED, code, Fault::Client, message)
}

/// `Bearer CREDENTIAL`, `token CREDENTIAL` (session id from the credential's claims) or Basic SESSION:CREDENTIAL.
fn api_credentials(headers: &HeaderMap) -> Result<(Option<String>, Secret<String>), Refusal> {
    let missing = || {
        unauthenticated(
            "api_auth_missing",
            "Requires authentication: send the session's git credential as \"Authorization: Bearer CREDENTIAL\"",
        )
    };
    let malformed = || {
        unauthenticated(
            "api_auth_malformed",
            "the Authorization header must be \"Bearer CREDENTIAL\", \"token CREDENTIAL\" or HTTP Basic with \
             user = session id, password = git credential",
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

/// An upstream exchange that failed: `504` for a timeout, else `502`, the token scrubbed from the words.
fn upstream_failure(e: upstream::UpstreamError, token: &Secret<String>) -> Refusal {
    let timeout = matches!(e, upstream::UpstreamError::Timeout(_));
    Refusal::unreachable(e.code(), timeout, scrub(&e.to_string(), Some(token)))
}

fn api_timeout(what: String) -> Refusal {
    Refusal::unreachable("upstream_timeout", true, format!("{what} took longer than {}s", API_TIMEOUT.as_secs()))
}

/// The request headers forwarded upstream: media types and conditional requests, a default
/// `User-Agent` and `Accept`.
fn forwarded_headers(client: &HeaderMap, write: bool) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for name in FORWARDED_REQUEST_HEADERS {
        for value in client.get_all(name) {
            headers.append(name, value.clone());
        }
    }
    headers.entry(header::USER_AGENT).or_insert(HeaderValue::from_static("sluice"));
    headers.entry(header::ACCEPT).or_insert(HeaderValue::from_static("application/vnd.github+json"));
    if write {
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    } else {
        headers.remove(header::CONTENT_TYPE);
    }
    headers
}

/// Who the request is from and what it may do, once the credential verified.
struct Caller<'a> {
    session: String,
    repo: String,
    branch: String,
    token: &'a Secret<String>,
}

impl GitProxy {
    /// Serves one `/api/…` request; a refusal goes back to the caller, which logs it and renders it as
    /// GitHub JSON through [`respond::render`].
    pub(super) async fn serve_api(
        &self,
        req: Request<Incoming>,
        record: &mut Record,
    ) -> Result<Response<GitBody>, GitError> {
        self.api_request(req, record).await.map_err(GitError::GitHub)
    }

    async fn api_request(&self, req: Request<Incoming>, record: &mut Record) -> Result<Response<GitBody>, Refusal> {
        record.service = "api";
        let parsed = parse(req.method(), req.uri().path(), req.uri().query());
        if let Ok(route) = &parsed {
            record.service = route.op;
            record.repo = route.full_name();
        }
        let (parts, body) = req.into_parts();
        let (session, credential) = api_credentials(&parts.headers)?;
        let route = parsed?;
        let caller = self.api_caller(&route, session, &credential, record)?;
        self.admit(&caller.session, record).await?;
        let write = route.access.is_write();
        let body = if write {
            self.api.check_write_rate(&*self.limiter, &caller.session).await?;
            let bytes = read_write_body(&parts.headers, body).await?;
            self.check_write(&route, &bytes, &parts.headers, &caller).await?;
            record.bytes_up.fetch_add(bytes.len() as u64, Ordering::Relaxed);
            bytes
        } else {
            Bytes::new()
        };
        let headers = forwarded_headers(&parts.headers, write);
        let path = route.upstream_path();
        let sent = self.api.upstream.send(
            parts.method.clone(),
            &path,
            headers,
            Some(bearer_auth(caller.token)),
            Full::new(body),
        );
        let resp = tokio::time::timeout(API_TIMEOUT, sent)
            .await
            .map_err(|_| api_timeout(format!("{} answering {}", self.api.upstream.authority(), route.op)))?
            .map_err(|e| upstream_failure(e, caller.token))?;
        let redirect = matches!(
            resp.status(),
            StatusCode::MOVED_PERMANENTLY
                | StatusCode::FOUND
                | StatusCode::SEE_OTHER
                | StatusCode::TEMPORARY_REDIRECT
                | StatusCode::PERMANENT_REDIRECT
        );
        if route.access == Access::Log && redirect {
            return self.follow_log(resp, &parts.method, &parts.headers).await;
        }
        self.answer(resp, &parts.headers, &caller.repo, caller.token).await
    }

    /// Verifies the credential for the route's repository and finds the real token.
    fn api_caller<'a>(
        &'a self,
        route: &ApiRoute,
        session: Option<String>,
        credential: &Secret<String>,
        record: &mut Record,
    ) -> Result<Caller<'a>, Refusal> {
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
        let claims = self.authorize(&route.full_name(), &session, credential)?;
        let repo = claims.repo.unwrap_or_default();
        let branch = claims.branch.unwrap_or_default();
        let token = self.tokens.for_repo(&repo).ok_or_else(|| {
            Refusal::new(
                StatusCode::FORBIDDEN,
                "api_no_upstream_token",
                Fault::Internal,
                format!(
                    "no upstream credential is configured for {repo}, so API requests are refused; the operator \
                     sets token_env, token_file or [git.tokens]"
                ),
            )
        })?;
        Ok(Caller { session, repo, branch, token })
    }
}

/// A write's body, read whole within [`MAX_BODY`] and [`BODY_TIMEOUT`].
async fn read_write_body(headers: &HeaderMap, body: Incoming) -> Result<Bytes, Refusal> {
    let too_long = || {
        Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "api_body_too_large",
            Fault::Client,
            format!("the request body is longer than {MAX_BODY} bytes"),
        )
    };
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok());
    if declared.and_then(|v| v.parse::<u64>().ok()).is_some_and(|n| n > MAX_BODY as u64) {
        return Err(too_long());
    }
    read_limited(body, MAX_BODY, BODY_TIMEOUT).await.map_err(|long| {
        if long {
            too_long()
        } else {
            Refusal::new(StatusCode::BAD_REQUEST, "api_body_unreadable", Fault::Client, "cannot read the request body")
        }
    })
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
        let digest = with("Digest x").unwrap_err();
        assert_eq!((digest.status, digest.code), (StatusCode::UNAUTHORIZED, "api_auth_malformed"));
        assert_eq!(
            api_credentials(&HeaderMap::new()).unwrap_err().message,
            "Requires authentication: send the session's git credential as \"Authorization: Bearer CREDENTIAL\""
        );
    }

    #[test]
    fn media_types_and_conditionals_go_upstream_and_nothing_else() {
        let mut client = HeaderMap::new();
        client.insert(header::ACCEPT, HeaderValue::from_static("application/vnd.github.diff"));
        client.insert(header::IF_NONE_MATCH, HeaderValue::from_static("\"abc\""));
        client.insert(header::IF_MODIFIED_SINCE, HeaderValue::from_static("Tue, 01 Dec 2026 00:00:00 GMT"));
        client.insert(header::COOKIE, HeaderValue::from_static("a=b"));
        client.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer sandbox"));
        client.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        let h = forwarded_headers(&client, false);
        assert_eq!(h[header::ACCEPT], "application/vnd.github.diff");
        assert_eq!(h[header::IF_NONE_MATCH], "\"abc\"");
        assert!(h.contains_key(header::IF_MODIFIED_SINCE));
        assert_eq!(h[header::USER_AGENT], "sluice");
        for gone in [header::COOKIE, header::AUTHORIZATION, header::CONTENT_TYPE] {
            assert!(!h.contains_key(&gone), "{gone}");
        }
        assert_eq!(forwarded_headers(&client, true)[header::CONTENT_TYPE], "application/json");
        assert_eq!(forwarded_headers(&HeaderMap::new(), false)[header::ACCEPT], "application/vnd.github+json");
    }
}
