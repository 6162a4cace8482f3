//! The git proxy: smart-HTTP routes, scoped credentials swapped for the real token, one-branch pushes.
//!
//! ```text
//! request ─▶ route::parse (normalised OWNER/REPO + service) ─▶ Basic SESSION:CREDENTIAL ─▶ Keyring::verify_for
//!    ─▶ claims.repo == OWNER/REPO ─▶ upload-pack: forward (stream through)
//!                                   receive-pack: command_list::read ─▶ push::review          (receive)
//!                                        allow ─▶ forward the original bytes, real token attached
//!                                        refuse ─▶ sluice answers itself (report-status `ng` per ref)
//! ```
//! `/api/…` is a repository-scoped slice of the GitHub REST API for pull requests, see [`api`].
//! Every failing step returns a [`Refusal`] with a stable code; `respond` renders it in the shape the
//! client reads (text, a receive-pack result, GitHub JSON) and adds `sluice: `; every request logs one
//! line whose `reason` is the code and `detail` the sentence.
//!
//! Pieces: [`token`] (the real tokens), `body` (request and answer bodies, bounded readers),
//! [`command_list`] (a push's command list, read incrementally within caps), `receive` (the push flow),
//! `forward` (the upstream exchange and its errors), [`scrub`] (the token out of upstream text),
//! [`upstream`] (dialling), and the pure [`pktline`], [`push`] and [`route`].

pub mod api;
mod body;
pub mod command_list;
mod forward;
pub mod pktline;
pub mod push;
mod receive;
mod respond;
pub mod route;
pub mod scrub;
pub mod token;
pub mod upstream;

pub use crate::config::{GitLimits, GitSettings, TokenSource};
pub use token::TokenStore;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::audit::{AuditLog, Event, EventKind};
use crate::credential::{Basic, Claims, Keyring, Kind, Secret, now_unix, valid_session_id};
use crate::limit::{Lease, LimitKey, Limiter, MemoryLimiter};
use crate::listen::{self, Accepted, Listener, Shutdown};
use crate::metrics::{Denial, Denials, Metrics};
use crate::policy::Limits;
use crate::refusal::{Refusal, credential_code};
use body::{ForwardBody, LoggedBody};
use receive::no_token;
pub use respond::{GitError, PushAnswer};
use respond::{overload_answer, respond};
use route::{Action, Service};
use upstream::Upstream;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body of every answer the git proxy gives.
pub type GitBody = BoxBody<Bytes, BoxError>;

/// How long a client may take to send its request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything a git-proxy request needs, shared by all connections.
#[derive(Debug)]
pub struct GitProxy {
    /// `None` when the server has no signing key: every credential is then refused, saying why.
    keyring: Option<Keyring>,
    upstream: Upstream,
    api: api::Api,
    tokens: TokenStore,
    audit: AuditLog,
    /// Per-session limits, counted under [`LimitKey::git`] in the limiter egress shares.
    limiter: Arc<dyn Limiter>,
    limits: Limits,
    metrics: Arc<Metrics>,
    denials: Arc<Denials>,
    max_connections: usize,
    body_timeout: Duration,
    /// The whole command list of a push must arrive within this: twice `body_timeout`.
    list_deadline: Duration,
}

impl GitProxy {
    /// Validates the settings and reads the real tokens; upstream dials use the system resolver.
    pub fn new(settings: &GitSettings, keyring: Option<Keyring>) -> Result<GitProxy, String> {
        GitProxy::with_dialer(settings, keyring, upstream::Dialer::system()?)
    }

    /// As [`GitProxy::new`], with upstream dials through `dialer` (the server's resolver, own
    /// addresses, metrics and connect timeout).
    pub fn with_dialer(
        settings: &GitSettings,
        keyring: Option<Keyring>,
        dialer: upstream::Dialer,
    ) -> Result<GitProxy, String> {
        let upstream = Upstream::parse("git.upstream", &settings.upstream, &dialer)?;
        let api = api::Api::new(settings, &dialer)?;
        let tokens = TokenStore::load(settings)?;
        let GitLimits { requests_per_second, burst, max_connections: per_session, .. } = settings.limits;
        let limits = Limits {
            requests_per_second: Some(requests_per_second),
            burst: Some(burst),
            max_tunnels: Some(per_session),
        };
        let max_connections = settings.max_connections.max(1);
        let body_timeout = settings.body_timeout.0.max(Duration::from_secs(1));
        let list_deadline = 2 * body_timeout;
        Ok(GitProxy {
            keyring,
            upstream,
            api,
            tokens,
            audit: AuditLog::disabled(),
            limiter: Arc::new(MemoryLimiter::new(Default::default())),
            limits,
            metrics: Arc::default(),
            denials: Arc::default(),
            max_connections,
            body_timeout,
            list_deadline,
        })
    }

    /// Writes one audit line per request to `audit`.
    pub fn with_audit(mut self, audit: AuditLog) -> GitProxy {
        self.audit = audit;
        self
    }

    /// Counts requests in the server's limiter, and decisions in its `/metrics` and `/v1/denials`.
    pub fn sharing(mut self, limiter: Arc<dyn Limiter>, metrics: Arc<Metrics>, denials: Arc<Denials>) -> GitProxy {
        self.limiter = limiter;
        self.metrics = metrics;
        self.denials = denials;
        self
    }

    /// Counts a request against its verified session: the request rate, and the connection (bound to the
    /// session by its first request, and counted until it closes) against the connection cap.
    async fn admit(&self, session: &str, record: &Record) -> Result<(), Refusal> {
        let key = LimitKey::git(session);
        self.limiter.check_request(&key, &self.limits).await.map_err(|e| {
            Refusal::rate_limited(e.retry_after, &e.limit)
                .with_hint("the operator raises it with requests_per_second and burst in [git.limits]")
        })?;
        let bound = record.conn.lock().is_ok_and(|b| b.as_ref().is_some_and(|(s, _)| s == session));
        if !bound {
            let lease = self.limiter.open_tunnel(&key, &self.limits).await;
            let lease = lease.map_err(|e| Refusal::too_many_connections(e.max))?;
            if let Ok(mut b) = record.conn.lock() {
                *b = Some((session.to_owned(), lease));
            }
        }
        Ok(())
    }
}

/// The session a client connection counts for, and its lease on the session's connection cap.
type Bound = Arc<Mutex<Option<(String, Lease)>>>;

/// Serves git-proxy connections until `shutdown` drains them; open requests finish within the grace.
pub async fn serve(socket: TcpListener, proxy: Arc<GitProxy>, shutdown: Shutdown) {
    let max_connections = proxy.max_connections;
    let listener = Listener { name: "git", socket, max_connections, overload: overload_answer };
    let draining = shutdown.draining.clone();
    listen::serve(listener, shutdown, move |accepted: Accepted| {
        let proxy = proxy.clone();
        let draining = draining.clone();
        async move {
            let Accepted { stream, peer, slot: _slot } = accepted;
            let conn = Bound::default();
            let service = service_fn(move |req| handle(proxy.clone(), peer, conn.clone(), req));
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            let result = listen::until_drained(conn, &draining, |c| c.graceful_shutdown()).await;
            if let Err(e) = result {
                tracing::debug!(target: "sluice::git", %peer, error = %e, "git connection ended with an error");
            }
        }
    })
    .await;
}

fn full(body: impl Into<Bytes>) -> GitBody {
    Full::new(body.into()).map_err(|never| match never {}).boxed()
}

/// One log line per request, written when the answer's body is finished (or dropped).
struct Record {
    start: Instant,
    peer: SocketAddr,
    method: Method,
    session: String,
    repo: String,
    service: &'static str,
    verdict: &'static str,
    reason: &'static str,
    detail: Option<String>,
    status: u16,
    refs: usize,
    bytes_up: Arc<AtomicU64>,
    conn: Bound,
}

impl Record {
    fn emit(&self, audit: &AuditLog, bytes_down: u64) {
        let mut event = Event::new(EventKind::Git);
        event.session = Some(self.session.clone());
        event.kind = Some("git");
        event.method = Some(self.method.to_string());
        event.repo = Some(self.repo.clone());
        event.service = Some(self.service);
        event.verdict = Some(self.verdict);
        event.reason = Some(self.reason.to_owned());
        event.detail = self.detail.clone();
        event.status = Some(self.status);
        event.client = Some(self.peer.to_string());
        event.bytes_up = Some(self.bytes_up.load(Ordering::Relaxed));
        event.bytes_down = Some(bytes_down);
        event.duration_ms = Some(self.start.elapsed().as_millis() as u64);
        event.refs = Some(self.refs);
        audit.write(&event);
    }
}

async fn handle(
    proxy: Arc<GitProxy>,
    peer: SocketAddr,
    conn: Bound,
    req: Request<Incoming>,
) -> Result<Response<GitBody>, Infallible> {
    let target = format!("{} {}", req.method(), req.uri().path());
    let mut record = Record {
        start: Instant::now(),
        peer,
        method: req.method().clone(),
        session: "-".into(),
        repo: "-".into(),
        service: "-",
        verdict: "allow",
        reason: "forwarded",
        detail: None,
        status: 0,
        refs: 0,
        bytes_up: Arc::new(AtomicU64::new(0)),
        conn,
    };
    let resp = match proxy.serve_request(req, &mut record).await {
        Ok(resp) => resp,
        Err(err) => {
            let (resp, outcome) = respond(err);
            proxy.refused(&record, &outcome, target);
            record.verdict = outcome.verdict;
            record.reason = outcome.code;
            record.detail = outcome.detail;
            resp
        }
    };
    if record.verdict == "allow" {
        proxy.metrics.decision("allow", record.reason, "git");
    }
    record.status = resp.status().as_u16();
    let audit = proxy.audit.clone();
    Ok(resp.map(|inner| LoggedBody { inner, bytes: 0, record, audit }.boxed()))
}

impl GitProxy {
    /// A refusal in `/metrics`, and in `/v1/denials` when it names a session.
    fn refused(&self, record: &Record, outcome: &respond::Outcome, target: String) {
        self.metrics.decision(outcome.verdict, outcome.code, "git");
        if outcome.limit {
            self.metrics.rate_limited.inc();
        }
        if valid_session_id(&record.session) {
            let denial = Denial {
                time: now_unix(),
                destination: target,
                reason: outcome.code,
                message: outcome.detail.clone().unwrap_or_default(),
                hint: outcome.hint.clone(),
            };
            self.denials.record(&record.session, denial);
        }
    }
}

/// `Authorization: Basic base64(SESSION:CREDENTIAL)`.
fn basic_credentials(headers: &HeaderMap) -> Result<(String, Secret<String>), Refusal> {
    let missing = || {
        Refusal::git_auth(
            "auth_missing",
            "credentials required: use http://SESSION:CREDENTIAL@HOST/OWNER/REPO.git as the remote URL or a \
             credential helper",
        )
    };
    let malformed = || {
        Refusal::git_auth(
            "auth_invalid",
            "the Authorization header must be HTTP Basic with user = session id, password = git credential",
        )
    };
    let value = headers.get(header::AUTHORIZATION).ok_or_else(missing)?;
    let basic = Basic::parse(value.as_bytes()).map_err(|_| malformed())?;
    if basic.password.expose().is_empty() {
        return Err(missing());
    }
    Ok((basic.user, basic.password))
}

/// The headers that frame or encode a request body. Spelled with `_`, a back end that folds `_` into `-`
/// (CGI does, and so do some proxies) would see a second one that sluice never judged.
const FRAMING_HEADERS: [&str; 3] = ["Transfer-Encoding", "Content-Length", "Content-Encoding"];

/// Refuses a request carrying a framing header spelled with `_` (sluice forwards neither spelling
/// anyway: this says so instead of leaving it to the back end).
fn check_header_names(headers: &HeaderMap) -> Result<(), String> {
    for name in headers.keys().map(|n| n.as_str()).filter(|n| n.contains('_')) {
        let folded = name.replace('_', "-");
        if let Some(canonical) = FRAMING_HEADERS.iter().find(|c| c.eq_ignore_ascii_case(&folded)) {
            return Err(format!(
                "request header {name:?} is {canonical} spelled with '_', which some servers read as a second \
                 {canonical}; send {canonical} only"
            ));
        }
    }
    Ok(())
}

impl GitProxy {
    async fn serve_request(&self, req: Request<Incoming>, record: &mut Record) -> Result<Response<GitBody>, GitError> {
        let path = req.uri().path();
        let api = path == "/api" || path.starts_with("/api/");
        check_header_names(req.headers()).map_err(|message| match api {
            true => GitError::GitHub(Refusal::bad_request(message)),
            false => GitError::Text(Refusal::bad_request(message)),
        })?;
        if api {
            return self.serve_api(req, record).await;
        }
        let route =
            route::parse(req.method(), req.uri().path(), req.uri().query()).map_err(|e| Refusal::no_route(e.0))?;
        record.repo = route.full_name();
        record.service = route.action.service().as_str();
        let (parts, body) = req.into_parts();
        let (session, credential) = basic_credentials(&parts.headers)?;
        record.session = if valid_session_id(&session) { session.clone() } else { "(invalid)".into() };
        let claims = match self.authorize(&route.full_name(), &session, &credential) {
            Ok(claims) => claims,
            Err(refusal) if route.action == Action::Rpc(Service::ReceivePack) => {
                return Err(self.refuse_whole_push(&parts.headers, body, refusal, record).await);
            }
            Err(refusal) => return Err(refusal.into()),
        };
        self.admit(&session, record).await?;
        // `authorize` checked both claims are present.
        let repo = claims.repo.unwrap_or_default();
        let branch = claims.branch.unwrap_or_default();
        let token = self.tokens.for_repo(&repo);
        match route.action {
            Action::Advertise(Service::ReceivePack) if token.is_none() => Err(no_token(&repo).into()),
            Action::Rpc(Service::ReceivePack) => self.push(&parts, body, &repo, &branch, token, record).await,
            action => {
                let body = ForwardBody::new(VecDeque::new(), body, record.bytes_up.clone(), self.body_timeout);
                self.forward(&parts.headers, &repo, action, token, body).await
            }
        }
    }

    /// Verifies the credential and that it is for `target` (`OWNER/REPO` as the client spelled it; GitHub
    /// compares names without case).
    fn authorize(&self, target: &str, session: &str, credential: &Secret<String>) -> Result<Claims, Refusal> {
        let refused = |code, why: &str| Refusal::git_credential(code, format!("git credential refused: {why}"));
        let keyring = self.keyring.as_ref().ok_or_else(|| {
            refused(
                "auth_unavailable",
                "this proxy has no signing key configured ([auth] key_file or SLUICE_SIGNING_KEY)",
            )
        })?;
        let claims = keyring
            .verify_for(credential.expose(), Kind::Git, session, now_unix())
            .map_err(|e| refused(credential_code(&e), &e.to_string()))?;
        let repo = claims.repo.as_deref().ok_or_else(|| refused("auth_invalid", "it names no repository"))?;
        if !target.eq_ignore_ascii_case(repo) {
            return Err(refused(
                "wrong_repository",
                &format!("it is for {repo}, not {target}; ask for a credential for {target}"),
            ));
        }
        let branch = claims.branch.as_deref().ok_or_else(|| refused("auth_invalid", "it names no working branch"))?;
        if push::check_ref_name(&format!("refs/heads/{branch}")).is_err() {
            return Err(refused("auth_invalid", &format!("its working branch {branch:?} is not a valid branch name")));
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use http::HeaderValue;

    #[test]
    fn basic_credentials_are_read_or_challenged() {
        let mut h = HeaderMap::new();
        let refused = basic_credentials(&h).unwrap_err();
        assert_eq!((refused.status.as_u16(), refused.code), (401, "auth_missing"));
        assert!(refused.message.starts_with("credentials required"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer x"));
        let refused = basic_credentials(&h).unwrap_err();
        assert_eq!((refused.status.as_u16(), refused.code), (401, "auth_invalid"));
        assert!(refused.message.starts_with("the Authorization header must be HTTP Basic"));
        let v = format!("Basic {}", STANDARD.encode("s1:v1.a.b"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(&v).unwrap());
        let (user, pass) = basic_credentials(&h).unwrap();
        assert_eq!((user.as_str(), pass.expose().as_str()), ("s1", "v1.a.b"));
    }
}
