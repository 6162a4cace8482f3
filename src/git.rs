//! The git proxy: smart-HTTP routes, scoped credentials swapped for the real token, one-branch pushes.
//!
//! ```text
//! request ─▶ route::parse (normalised OWNER/REPO + service) ─▶ Basic SESSION:CREDENTIAL ─▶ Keyring::verify_for
//!    ─▶ claims.repo == OWNER/REPO ─▶ upload-pack: stream through
//!                                   receive-pack: push::parse the command list ─▶ push::review
//!                                        allow ─▶ stream the original bytes through, real token attached
//!                                        refuse ─▶ sluice answers itself (report-status `ng` per ref)
//! ```
//! `/api/…` is a repository-scoped slice of the GitHub REST API for pull requests, see [`api`].
//! Every refusal becomes an HTTP answer in one place, [`respond`]; every request logs one line.

pub mod api;
pub mod command_list;
pub mod pktline;
pub mod push;
pub mod route;
pub mod scrub;
pub mod upstream;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Deserialize;
use tokio::net::TcpListener;

use crate::audit::{AuditLog, Event, EventKind};
use crate::credential::{Claims, Keyring, Kind, Secret, now_unix, valid_session_id};
use command_list::ListError;
use push::Verdict;
use route::{Action, Service};
use upstream::{FORWARDED_REQUEST_HEADERS, FORWARDED_RESPONSE_HEADERS, GIT_PROTOCOL, Upstream};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body of every answer the git proxy gives.
pub type GitBody = BoxBody<Bytes, BoxError>;

/// How long a client may take to send its request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long discovery may wait for the upstream's response head.
const ADVERTISE_TIMEOUT: Duration = Duration::from_secs(60);
/// A refused push's pack is read and dropped (so the client sees the answer, not a broken pipe) up to this much.
const DRAIN_LIMIT: u64 = 256 << 20;
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// Upstream error bodies are shown to the client, scrubbed, up to this much.
const UPSTREAM_ERROR_LIMIT: usize = 16 << 10;

/// The `[git]` table of `sluice.toml`.
///
/// ```toml
/// [git]
/// listen = "127.0.0.1:3129"
/// upstream = "https://github.com"
/// api_upstream = "https://api.github.com"
/// token_env = "SLUICE_GITHUB_TOKEN"      # the default token; token_file wins when both are set
/// # token_file = "/etc/sluice/github-token"
/// [git.tokens]                            # per owner or repository; OWNER/REPO wins over OWNER
/// "acme" = { file = "/etc/sluice/acme-token" }
/// "acme/widgets" = { env = "WIDGETS_TOKEN" }
/// ```
/// Token values never appear in the config itself, only where to read them from.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GitSettings {
    pub listen: SocketAddr,
    pub upstream: String,
    /// The GitHub REST API the `/api/` routes forward to.
    pub api_upstream: String,
    pub token_env: Option<String>,
    pub token_file: Option<PathBuf>,
    pub tokens: BTreeMap<String, TokenSource>,
    /// Client connections served at once; more are answered `503` and closed.
    pub max_connections: usize,
    /// How long a client may pause while sending a request body (a push's command list, or any upload
    /// streaming upstream) before the request fails.
    pub body_timeout: crate::config::Seconds,
}

impl Default for GitSettings {
    fn default() -> Self {
        GitSettings {
            listen: SocketAddr::from(([127, 0, 0, 1], 3129)),
            upstream: "https://github.com".into(),
            api_upstream: "https://api.github.com".into(),
            token_env: Some("SLUICE_GITHUB_TOKEN".into()),
            token_file: None,
            tokens: BTreeMap::new(),
            max_connections: 1024,
            body_timeout: crate::config::Seconds(Duration::from_secs(30)),
        }
    }
}

/// Where one real token is read from: `{ file = "/path" }` or `{ env = "VAR" }`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum TokenSource {
    File(PathBuf),
    Env(String),
}

/// The real upstream tokens: per `owner/repo`, per `owner`, and a default (keys lowercased).
#[derive(Debug, Default)]
pub struct TokenStore {
    default: Option<Secret<String>>,
    by_name: HashMap<String, Secret<String>>,
}

impl TokenStore {
    pub fn load(settings: &GitSettings) -> Result<TokenStore, String> {
        let default = match (&settings.token_file, &settings.token_env) {
            (Some(path), _) => Some(read_token_file(path, "git.token_file")?),
            (None, Some(var)) => read_token_env(var, "git.token_env")?,
            (None, None) => None,
        };
        let mut by_name = HashMap::new();
        for (name, source) in &settings.tokens {
            let key = format!("git.tokens.{name:?}");
            let parts: Vec<&str> = name.split('/').collect();
            if parts.is_empty() || parts.len() > 2 || parts.iter().any(|p| !route_name(p)) {
                return Err(format!("invalid {key}: expected \"OWNER\" or \"OWNER/REPO\""));
            }
            let token = match source {
                TokenSource::File(path) => read_token_file(path, &key)?,
                TokenSource::Env(var) => {
                    read_token_env(var, &key)?.ok_or_else(|| format!("{key}: environment variable {var} is not set"))?
                }
            };
            by_name.insert(name.to_ascii_lowercase(), token);
        }
        Ok(TokenStore { default, by_name })
    }

    /// The token for `OWNER/REPO`: the repository's, else the owner's, else the default.
    pub fn for_repo(&self, full_name: &str) -> Option<&Secret<String>> {
        let full = full_name.to_ascii_lowercase();
        let owner = full.split('/').next().unwrap_or_default();
        self.by_name.get(&full).or_else(|| self.by_name.get(owner)).or(self.default.as_ref())
    }
}

fn route_name(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn check_token(value: &str, origin: &str) -> Result<Secret<String>, String> {
    let value = value.trim();
    if value.is_empty() {
        return Err(format!("{origin}: the token is empty"));
    }
    // Never quote the value: say only what is wrong with it.
    if !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!("{origin}: the token contains spaces, control or non-ASCII characters"));
    }
    Ok(Secret::new(value.to_owned()))
}

fn read_token_file(path: &Path, key: &str) -> Result<Secret<String>, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("{key}: cannot read token file {}: {e}", path.display()))?;
    check_token(&text, &format!("{key}: token file {}", path.display()))
}

fn read_token_env(var: &str, key: &str) -> Result<Option<Secret<String>>, String> {
    match std::env::var(var) {
        Ok(v) => check_token(&v, &format!("{key}: environment variable {var}")).map(Some),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(format!("{key}: environment variable {var} is not UTF-8")),
    }
}

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
    /// Validates the settings and reads the real tokens.
    pub fn new(settings: &GitSettings, keyring: Option<Keyring>) -> Result<GitProxy, String> {
        let upstream = Upstream::parse("git.upstream", &settings.upstream)?;
        let api = api::Api::new(Upstream::parse("git.api_upstream", &settings.api_upstream)?);
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

/// Serves git-proxy connections until `shutdown` completes, then waits for the requests in flight.
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<GitProxy>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(proxy.max_connections));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        let refusal = crate::proxy::respond::refuse_overloaded(stream, "git proxy", proxy.max_connections, peer);
                        tokio::spawn(refusal);
                        continue;
                    };
                    let proxy = proxy.clone();
                    let service = service_fn(move |req| handle(proxy.clone(), peer, req));
                    let conn = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(HEADER_READ_TIMEOUT)
                        .serve_connection(TokioIo::new(stream), service);
                    let conn = graceful.watch(conn);
                    tokio::spawn(async move {
                        let _slot = slot;
                        if let Err(e) = conn.await {
                            tracing::debug!(target: "sluice::git", %peer, error = %e, "git connection ended with an error");
                        }
                    });
                }
                Err(e) => {
                    // Out of file descriptors or similar: back off instead of spinning.
                    tracing::warn!(target: "sluice::git", error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    graceful.shutdown().await;
    Ok(())
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

/// The answer's body, counted; the request's log line is written when it ends.
struct LoggedBody {
    inner: GitBody,
    bytes: u64,
    record: Record,
    audit: AuditLog,
}

impl Body for LoggedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.bytes += data.len() as u64;
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

impl Drop for LoggedBody {
    fn drop(&mut self) {
        self.record.emit(&self.audit, self.bytes);
    }
}

/// The request body sent upstream: the bytes sluice already read (the command list), then the rest,
/// exactly as the client sent them. A client that stops sending for `[git] body_timeout` fails the
/// request, so a stalled upload cannot hold an upstream connection open for ever.
struct ForwardBody {
    prefix: VecDeque<Bytes>,
    rest: Incoming,
    sent: Arc<AtomicU64>,
    timeout: Duration,
    idle: Pin<Box<tokio::time::Sleep>>,
}

impl ForwardBody {
    fn new(prefix: VecDeque<Bytes>, rest: Incoming, sent: Arc<AtomicU64>, timeout: Duration) -> ForwardBody {
        ForwardBody { prefix, rest, sent, timeout, idle: Box::pin(tokio::time::sleep(timeout)) }
    }
}

impl Body for ForwardBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(chunk) = self.prefix.pop_front() {
            self.sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        match Pin::new(&mut self.rest).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.sent.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                let next = tokio::time::Instant::now() + self.timeout;
                self.idle.as_mut().reset(next);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(other) => Poll::Ready(other.map(|r| r.map_err(BoxError::from))),
            Poll::Pending => {
                if self.idle.as_mut().poll(cx).is_ready() {
                    let secs = self.timeout.as_secs();
                    tracing::debug!(target: "sluice::git", "request body stalled for {secs}s; upload abandoned");
                    return Poll::Ready(Some(Err(format!("the client sent nothing for {secs}s").into())));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_empty() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let buffered: u64 = self.prefix.iter().map(|b| b.len() as u64).sum();
        let rest = self.rest.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + buffered);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + buffered);
        }
        hint
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
    let value = value.to_str().map_err(|_| malformed())?;
    let (scheme, encoded) = value.split_once(' ').ok_or_else(malformed)?;
    if !scheme.eq_ignore_ascii_case("basic") || encoded.len() > 4 * crate::credential::MAX_TOKEN_LEN {
        return Err(malformed());
    }
    let decoded = STANDARD.decode(encoded.trim()).map_err(|_| malformed())?;
    let decoded = String::from_utf8(decoded).map_err(|_| malformed())?;
    let (user, password) = decoded.split_once(':').ok_or_else(malformed)?;
    if password.is_empty() {
        return Err(missing());
    }
    Ok((user.to_owned(), Secret::new(password.to_owned())))
}

fn no_token_message(repo: &str) -> String {
    format!(
        "sluice: no upstream credential is configured for {repo}, so pushes are refused \
         (clone and fetch of public repositories still work); the operator sets token_env, token_file or [git.tokens]"
    )
}

/// Reads and drops what is left of a refused push, within limits, so the client reads the answer.
async fn drain(body: &mut Incoming) {
    let mut total = 0u64;
    let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
    while total < DRAIN_LIMIT {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(Ok(frame))) => total += frame.data_ref().map_or(0, |d| d.len() as u64),
            _ => break,
        }
    }
}

/// After a push refused before its command list was complete, what the client still sends is read and
/// dropped in the background, within the drain limits, so the answer goes out at once and the client reads
/// it instead of a reset connection. A stalled or broken body is not waited for.
fn linger(mut body: Incoming, why: &ListError) {
    if !matches!(why, ListError::Stalled { .. } | ListError::Body(_)) {
        tokio::spawn(async move { drain(&mut body).await });
    }
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

    /// A push whose credential failed: every ref gets `ng` with the reason, nothing goes upstream. A
    /// command list that cannot be read (malformed, or past the raw cap or the deadline) gets the same
    /// reason as one fatal error.
    async fn refuse_whole_push(
        &self,
        headers: &HeaderMap,
        mut body: Incoming,
        message: &str,
        record: &mut Record,
    ) -> GitError {
        let gzip = match content_encoding(headers) {
            Ok(gzip) => gzip,
            Err(e) => return e,
        };
        let fatal =
            |side_band| GitError::PushRefused { body: push::fatal(message, side_band), reason: message.to_owned() };
        let list = match command_list::read(&mut body, gzip, self.body_timeout, self.list_deadline).await {
            Ok(list) => list,
            Err(unread) => {
                linger(body, &unread.error);
                return fatal(unread.side_band);
            }
        };
        drain(&mut body).await;
        match list.parsed {
            Ok(req) => {
                record.refs = req.updates.len();
                let reason = message.strip_prefix("sluice: ").unwrap_or(message).to_owned();
                let reasons = vec![reason; req.updates.len()];
                let body = if req.updates.is_empty() { Vec::new() } else { push::refusal(&req, message, &reasons) };
                GitError::PushRefused { body, reason: message.to_owned() }
            }
            Err(_) => fatal(list.side_band),
        }
    }

    async fn push(
        &self,
        parts: &http::request::Parts,
        mut body: Incoming,
        repo: &str,
        branch: &str,
        token: Option<&Secret<String>>,
        record: &mut Record,
    ) -> Result<Response<GitBody>, GitError> {
        let gzip = content_encoding(&parts.headers)?;
        let list = match command_list::read(&mut body, gzip, self.body_timeout, self.list_deadline).await {
            Ok(list) => list,
            Err(unread) => {
                let message = unread.error.message();
                linger(body, &unread.error);
                return Err(match unread.error {
                    ListError::Stalled { .. } | ListError::Body(_) => GitError::BadRequest(message),
                    _ => GitError::PushRefused { body: push::fatal(&message, unread.side_band), reason: message },
                });
            }
        };
        let req = match list.parsed {
            Ok(req) => req,
            Err(e) => {
                drain(&mut body).await;
                let message = format!("sluice: {e}");
                return Err(GitError::PushRefused { body: push::fatal(&message, list.side_band), reason: message });
            }
        };
        record.refs = req.updates.len();
        let verdict = if token.is_none() && !req.updates.is_empty() {
            let reason = no_token_message(repo);
            Verdict::Refuse(vec![reason.strip_prefix("sluice: ").unwrap_or(&reason).to_owned(); req.updates.len()])
        } else {
            push::review(&req, branch)
        };
        match verdict {
            Verdict::Allow => {
                let body = ForwardBody::new(list.raw.into(), body, record.bytes_up.clone(), self.body_timeout);
                self.forward(&parts.headers, repo, Action::Rpc(Service::ReceivePack), token, body).await
            }
            Verdict::Refuse(reasons) => {
                drain(&mut body).await;
                let notice =
                    format!("sluice: this session may push only to refs/heads/{branch}; nothing was sent upstream");
                let reason = req
                    .updates
                    .iter()
                    .zip(&reasons)
                    .find(|(u, _)| push::judge(u, branch).is_err() || token.is_none())
                    .map_or_else(String::new, |(u, r)| format!("{}: {r}", u.name));
                Err(GitError::PushRefused { body: push::refusal(&req, &notice, &reasons), reason })
            }
        }
    }

    /// Sends the request upstream with the real token and streams the answer back.
    async fn forward(
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
            Action::Advertise(_) => {
                tokio::time::timeout(ADVERTISE_TIMEOUT, sent).await.map_err(|_| GitError::Upstream {
                    status: StatusCode::GATEWAY_TIMEOUT,
                    message: format!(
                        "sluice: {} did not answer within {}s",
                        self.upstream.authority(),
                        ADVERTISE_TIMEOUT.as_secs()
                    ),
                })?
            }
            Action::Rpc(_) => sent.await,
        };
        let resp = result.map_err(|e| {
            let status = match e {
                upstream::UpstreamError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
                _ => StatusCode::BAD_GATEWAY,
            };
            GitError::Upstream { status, message: format!("sluice: {}", upstream::scrub(&e.to_string(), token)) }
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
        let message = match status.as_u16() {
            300..=399 => {
                format!("sluice: {host} answered {status} (a redirect) for {repo}; sluice does not follow redirects")
            }
            401 | 403 if token.is_none() => format!(
                "sluice: {host} answered {status} for {repo} and no upstream credential is configured for it; \
                 only public repositories can be read"
            ),
            401 | 403 => format!(
                "sluice: {host} refused sluice's upstream credential for {repo} ({status}); the operator should check \
                 the token configured for it"
            ),
            _ => {
                let text = upstream_error_text(resp, token).await;
                format!("sluice: {host} answered {status} for {repo}: {text}")
            }
        };
        let status = match status.as_u16() {
            404 => StatusCode::NOT_FOUND,
            _ => StatusCode::BAD_GATEWAY,
        };
        Err(GitError::Upstream { status, message })
    }
}

/// Up to [`UPSTREAM_ERROR_LIMIT`] bytes of an upstream error body, as one line of text with the token
/// scrubbed. The token is removed before the text is cut, from a read that goes one longest token form
/// past the limit, so a token straddling the cut is whole when it is replaced; a fragment the cut leaves
/// is redacted too. An encoded body is withheld: it cannot be searched.
async fn upstream_error_text(resp: Response<Incoming>, token: Option<&Secret<String>>) -> String {
    if resp.headers().get(header::CONTENT_ENCODING).is_some_and(|v| v.as_bytes() != b"identity") {
        return "(an encoded body, which sluice withholds)".to_owned();
    }
    let scrubber = scrub::Scrubber::new(token);
    let want = UPSTREAM_ERROR_LIMIT + scrubber.longest();
    let mut body = resp.into_body();
    let mut buf = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while buf.len() < want {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    buf.extend_from_slice(&d[..d.len().min(want - buf.len())]);
                }
            }
            _ => break,
        }
    }
    let text = scrubber.cut(&buf, UPSTREAM_ERROR_LIMIT);
    String::from_utf8_lossy(&text).split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `Ok(true)` for a gzip body, `Ok(false)` for identity; other encodings cannot be inspected.
fn content_encoding(headers: &HeaderMap) -> Result<bool, GitError> {
    let Some(value) = headers.get(header::CONTENT_ENCODING) else { return Ok(false) };
    match value.to_str().map(|v| v.trim().to_ascii_lowercase()) {
        Ok(v) if v == "gzip" || v == "x-gzip" => Ok(true),
        Ok(v) if v.is_empty() || v == "identity" => Ok(false),
        _ => {
            let message = format!(
                "sluice: cannot inspect a push body with Content-Encoding {value:?}; send it plain or gzip-encoded"
            );
            Err(GitError::PushRefused { body: push::fatal(&message, None), reason: message })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_with_defaults_and_refuse_unknown_keys() {
        let s: GitSettings = toml::from_str("").unwrap();
        assert_eq!(s, GitSettings::default());
        let s: GitSettings = toml::from_str(
            "upstream = \"http://127.0.0.1:9\"\n[tokens]\n\"acme\" = { file = \"/t\" }\n\"acme/w\" = { env = \"W\" }\n",
        )
        .unwrap();
        assert_eq!(s.tokens["acme"], TokenSource::File("/t".into()));
        assert_eq!(s.tokens["acme/w"], TokenSource::Env("W".into()));
        let err = toml::from_str::<GitSettings>("listn = \"x\"").unwrap_err().to_string();
        assert!(err.contains("unknown field `listn`"), "{err}");
        let err = toml::from_str::<GitSettings>("[tokens]\nacme = \"ghp_x\"").unwrap_err().to_string();
        assert!(err.contains("acme"), "{err}");
    }

    #[test]
    fn tokens_resolve_repo_then_owner_then_default() {
        let store = TokenStore {
            default: Some(Secret::new("d".into())),
            by_name: HashMap::from([
                ("acme".to_owned(), Secret::new("o".into())),
                ("acme/widgets".to_owned(), Secret::new("r".into())),
            ]),
        };
        assert_eq!(store.for_repo("ACME/Widgets").map(|s| s.expose().as_str()), Some("r"));
        assert_eq!(store.for_repo("acme/gears").map(|s| s.expose().as_str()), Some("o"));
        assert_eq!(store.for_repo("other/x").map(|s| s.expose().as_str()), Some("d"));
        assert_eq!(TokenStore::default().for_repo("a/b"), None);
    }

    #[test]
    fn token_errors_never_quote_the_token() {
        assert_eq!(check_token(" ", "x").unwrap_err(), "x: the token is empty");
        assert_eq!(
            check_token("ab cd", "x").unwrap_err(),
            "x: the token contains spaces, control or non-ASCII characters"
        );
        assert_eq!(check_token(" abc\n", "x").unwrap().expose(), "abc");
    }

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
