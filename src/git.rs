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
//! Every refusal becomes an HTTP answer in one place, [`respond`]; every request logs one line.
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
pub mod route;
pub mod scrub;
pub mod token;
pub mod upstream;

pub use crate::config::{GitSettings, TokenSource};
pub use token::TokenStore;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::audit::{AuditLog, Event, EventKind};
use crate::credential::{Basic, Claims, Keyring, Kind, Secret, now_unix, valid_session_id};
use crate::listen::{self, Accepted, Listener, Shutdown};
use crate::refusal::Refusal;
use body::{ForwardBody, LoggedBody};
use receive::no_token_message;
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
        let max_connections = settings.max_connections.max(1);
        let body_timeout = settings.body_timeout.0.max(Duration::from_secs(1));
        let list_deadline = 2 * body_timeout;
        Ok(GitProxy {
            keyring,
            upstream,
            api,
            tokens,
            audit: AuditLog::disabled(),
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
}

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
            let service = service_fn(move |req| handle(proxy.clone(), peer, req));
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                () = draining.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(target: "sluice::git", %peer, error = %e, "git connection ended with an error");
            }
        }
    })
    .await;
}

/// The `503` a connection over `[git] max_connections` gets before it is closed.
fn overload_answer(max: usize) -> Vec<u8> {
    let refusal = Refusal::overloaded("git proxy", max);
    let body = format!("sluice: {}\n", refusal.message);
    let date = httpdate::fmt_http_date(std::time::SystemTime::now());
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\nx-sluice-decision: deny; reason={}\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\ndate: {date}\r\n\r\n{body}",
        refusal.code,
        body.len()
    )
    .into_bytes()
}

/// Why a request is not forwarded; [`respond`] turns each into its answer.
#[derive(Debug)]
pub enum GitError {
    /// No such route: 404.
    NotFound(String),
    /// No usable credentials: 401 with a Basic challenge, so git asks for them.
    Unauthenticated(String),
    /// A credential that does not verify or is for another repository, at discovery or fetch: 403 text.
    Forbidden(String),
    /// A push sluice answers itself: 200 with a receive-pack result (never a bare 403: git hides its body).
    PushRefused { body: Vec<u8>, reason: String },
    /// The client's request is unreadable: 400.
    BadRequest(String),
    /// The upstream failed or refused: its status where it is meaningful to the client, else 502/504.
    Upstream { status: StatusCode, message: String },
    /// An `/api/` request refused or failed: a JSON body shaped like GitHub's errors, so `gh` prints it.
    Api { status: StatusCode, message: String },
}

/// The one mapping from a refusal or failure to an HTTP answer. Returns the verdict for the log line.
pub fn respond(err: GitError) -> (Response<GitBody>, &'static str, String) {
    let text = |status: StatusCode, message: &str| {
        let mut resp = Response::new(full(format!("{message}\n")));
        *resp.status_mut() = status;
        resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
        resp
    };
    match err {
        GitError::NotFound(m) => (text(StatusCode::NOT_FOUND, &m), "deny", m),
        GitError::Unauthenticated(m) => {
            let mut resp = text(StatusCode::UNAUTHORIZED, &m);
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"sluice-git\""));
            (resp, "deny", m)
        }
        GitError::Forbidden(m) => (text(StatusCode::FORBIDDEN, &m), "deny", m),
        GitError::BadRequest(m) => (text(StatusCode::BAD_REQUEST, &m), "deny", m),
        GitError::PushRefused { body, reason } => {
            let mut resp = Response::new(full(body));
            let headers = resp.headers_mut();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-git-receive-pack-result"));
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            (resp, "deny", reason)
        }
        GitError::Upstream { status, message } => (text(status, &message), "error", message),
        GitError::Api { status, message } => {
            let mut resp = Response::new(full(api::error_body(&message)));
            *resp.status_mut() = status;
            resp.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json; charset=utf-8"));
            let verdict = if status.is_server_error() { "error" } else { "deny" };
            (resp, verdict, message)
        }
    }
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
    reason: String,
    status: u16,
    refs: usize,
    bytes_up: Arc<AtomicU64>,
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
        event.reason = Some(self.reason.clone());
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
    req: Request<Incoming>,
) -> Result<Response<GitBody>, Infallible> {
    let mut record = Record {
        start: Instant::now(),
        peer,
        method: req.method().clone(),
        session: "-".into(),
        repo: "-".into(),
        service: "-",
        verdict: "allow",
        reason: "forwarded".into(),
        status: 0,
        refs: 0,
        bytes_up: Arc::new(AtomicU64::new(0)),
    };
    let resp = match proxy.serve_request(req, &mut record).await {
        Ok(resp) => resp,
        Err(err) => {
            let (resp, verdict, reason) = respond(err);
            record.verdict = verdict;
            record.reason = reason;
            resp
        }
    };
    record.status = resp.status().as_u16();
    let audit = proxy.audit.clone();
    Ok(resp.map(|inner| LoggedBody { inner, bytes: 0, record, audit }.boxed()))
}

/// `Authorization: Basic base64(SESSION:CREDENTIAL)`.
fn basic_credentials(headers: &HeaderMap) -> Result<(String, Secret<String>), GitError> {
    let missing = || {
        GitError::Unauthenticated(
            "sluice: credentials required: use http://SESSION:CREDENTIAL@HOST/OWNER/REPO.git as the remote URL \
             or a credential helper"
                .into(),
        )
    };
    let malformed = || {
        GitError::Unauthenticated(
            "sluice: the Authorization header must be HTTP Basic with user = session id, password = git credential"
                .into(),
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
                "sluice: request header {name:?} is {canonical} spelled with '_', which some servers read as a \
                 second {canonical}; send {canonical} only"
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
            true => GitError::Api { status: StatusCode::BAD_REQUEST, message },
            false => GitError::BadRequest(message),
        })?;
        if api {
            return self.serve_api(req, record).await;
        }
        let route =
            route::parse(req.method(), req.uri().path(), req.uri().query()).map_err(|e| GitError::NotFound(e.0))?;
        record.repo = route.full_name();
        record.service = route.action.service().as_str();
        let (parts, body) = req.into_parts();
        let (session, credential) = basic_credentials(&parts.headers)?;
        record.session = if valid_session_id(&session) { session.clone() } else { "(invalid)".into() };
        let claims = match self.authorize(&route.full_name(), &session, &credential) {
            Ok(claims) => claims,
            Err(message) if route.action == Action::Rpc(Service::ReceivePack) => {
                return Err(self.refuse_whole_push(&parts.headers, body, &message, record).await);
            }
            Err(message) => return Err(GitError::Forbidden(message)),
        };
        // `authorize` checked both claims are present.
        let repo = claims.repo.unwrap_or_default();
        let branch = claims.branch.unwrap_or_default();
        let token = self.tokens.for_repo(&repo);
        match route.action {
            Action::Advertise(Service::ReceivePack) if token.is_none() => {
                Err(GitError::Forbidden(no_token_message(&repo)))
            }
            Action::Rpc(Service::ReceivePack) => self.push(&parts, body, &repo, &branch, token, record).await,
            action => {
                let body = ForwardBody::new(VecDeque::new(), body, record.bytes_up.clone(), self.body_timeout);
                self.forward(&parts.headers, &repo, action, token, body).await
            }
        }
    }

    /// Verifies the credential and that it is for `target` (`OWNER/REPO` as the client spelled it; GitHub
    /// compares names without case); `Err` is the message for the client.
    fn authorize(&self, target: &str, session: &str, credential: &Secret<String>) -> Result<Claims, String> {
        let keyring = self.keyring.as_ref().ok_or(
            "sluice: git credential refused: this proxy has no signing key configured ([auth] key_file or SLUICE_SIGNING_KEY)",
        )?;
        let claims = keyring
            .verify_for(credential.expose(), Kind::Git, session, now_unix())
            .map_err(|e| format!("sluice: git credential refused: {e}"))?;
        let repo = claims.repo.as_deref().ok_or("sluice: git credential refused: it names no repository")?;
        if !target.eq_ignore_ascii_case(repo) {
            return Err(format!(
                "sluice: git credential refused: it is for {repo}, not {target}; ask for a credential for {target}"
            ));
        }
        let branch = claims.branch.as_deref().ok_or("sluice: git credential refused: it names no working branch")?;
        if push::check_ref_name(&format!("refs/heads/{branch}")).is_err() {
            return Err(format!(
                "sluice: git credential refused: its working branch {branch:?} is not a valid branch name"
            ));
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;

    #[test]
    fn basic_credentials_are_read_or_challenged() {
        let mut h = HeaderMap::new();
        assert!(
            matches!(basic_credentials(&h), Err(GitError::Unauthenticated(m)) if m.starts_with("sluice: credentials required"))
        );
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer x"));
        assert!(
            matches!(basic_credentials(&h), Err(GitError::Unauthenticated(m)) if m.starts_with("sluice: the Authorization header must be HTTP Basic"))
        );
        let v = format!("Basic {}", STANDARD.encode("s1:v1.a.b"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(&v).unwrap());
        let (user, pass) = basic_credentials(&h).unwrap();
        assert_eq!((user.as_str(), pass.expose().as_str()), ("s1", "v1.a.b"));
    }
}
