//! The `/api/` pull-request slice, driven with `curl` against a stand-in for the GitHub REST API (GitHub
//! itself cannot run here): a small hyper server on 127.0.0.1:0 that accepts only the real (canary) token,
//! records every call, and plays api.github.com with its own base URL. Every byte and header the client
//! sees, and every log line, is searched for the real token.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use sluice::config::{CommentScope, IpRange, LogHost, ResolverConfig};
use sluice::credential::{Claims, Keyring, Kind, SigningKey, now_unix};
use sluice::git::upstream::Dialer;
use sluice::git::{GitProxy, GitSettings, TokenSource};
use sluice::metrics::Metrics;
use sluice::net::Resolver;
use sluice::policy::HostPattern;
use tokio::net::TcpListener;

const CANARY: &str = "ghs_CanaryApiToken0123456789abcdefXYZ";
const SID: &str = "sess-api";
const BRANCH: &str = "feature";
const REPO_ID: u64 = 4242;
const DOCS: &str = "https://docs.github.com/rest/pulls/pulls";

// ---------- log capture ----------

#[path = "support/capture.rs"]
mod capture;
use capture::audit;

fn log_lines_for(repo: &str) -> Vec<String> {
    let text = capture::text();
    assert_no_canary("log output", &text);
    capture::lines_for_repo(&text, repo)
}

fn assert_no_canary(what: &str, text: &str) {
    for form in [CANARY.to_owned(), STANDARD.encode(CANARY), STANDARD.encode(format!("x-access-token:{CANARY}"))] {
        assert!(!text.contains(&form), "the real token leaked into {what}:\n{text}");
    }
}

// ---------- the stand-in for api.github.com ----------

#[derive(Clone, Debug, PartialEq, Eq)]
struct Call {
    method: String,
    path: String,
    query: Option<String>,
    body: String,
    auth: Option<String>,
}

/// `Accept`, `If-None-Match` and `If-Modified-Since` of one call.
type Seen = (Option<String>, Option<String>, Option<String>);
/// A storage request: path, query, `Authorization`.
type Stored = (String, Option<String>, Option<String>);

/// The headers of a call the tests look at besides the token.
fn call_header(parts: &http::request::Parts, name: &str) -> Option<String> {
    parts.headers.get(name).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

struct StandIn {
    /// `http://127.0.0.1:PORT`: plays `https://api.github.com` in the URLs it writes.
    base: String,
    owner: String,
    calls: Mutex<Vec<Call>>,
    next_number: AtomicUsize,
    /// TCP connections accepted: sluice's pooled client reuses one for a lookup and the write after it.
    conns: AtomicUsize,
    /// `Accept`, `If-None-Match`, `If-Modified-Since` of every call, in order.
    seen: Mutex<Vec<Seen>>,
    /// Where log redirects point: `http://logs.storage.test:PORT` (the storage stand-in).
    storage: Mutex<String>,
}

fn json_response(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert("content-type", "application/json; charset=utf-8".parse().unwrap());
    r
}

fn pull(s: &StandIn, number: u64, head: &str) -> Value {
    let repo = format!("{}/widgets", s.owner);
    json!({
        "number": number,
        "url": format!("{}/repos/{repo}/pulls/{number}", s.base),
        "head": { "ref": head, "repo": { "full_name": repo, "id": REPO_ID } },
        "base": { "ref": "main", "repo": { "full_name": repo, "id": REPO_ID } },
    })
}

async fn stand_in(req: Request<Incoming>, s: Arc<StandIn>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let auth = parts.headers.get("authorization").map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let call = Call {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        body: String::from_utf8_lossy(&body).into_owned(),
        auth: auth.clone(),
    };
    s.calls.lock().unwrap().push(call);
    s.seen.lock().unwrap().push((
        call_header(&parts, "accept"),
        call_header(&parts, "if-none-match"),
        call_header(&parts, "if-modified-since"),
    ));
    if auth.as_deref() != Some(&format!("Bearer {CANARY}")) {
        return Ok(json_response(StatusCode::UNAUTHORIZED, json!({"message": "Bad credentials"})));
    }
    let prefix = format!("/repos/{}/widgets", s.owner);
    let Some(rest) = parts.uri.path().strip_prefix(&prefix) else {
        return Ok(json_response(StatusCode::NOT_FOUND, json!({"message": "Not Found"})));
    };
    let method = parts.method.as_str();
    let resp = match (method, rest) {
        ("GET", "") => {
            json_response(StatusCode::OK, json!({"id": REPO_ID, "full_name": format!("{}/widgets", s.owner)}))
        }
        ("GET", "/pulls") => {
            let mut r = json_response(StatusCode::OK, json!([pull(&s, 1, BRANCH), pull(&s, 2, "other")]));
            let link = format!(
                "<{base}/repositories/{REPO_ID}/pulls?state=all&page=2>; rel=\"next\", \
                 <{base}/repos/{owner}/widgets/pulls?state=all&page=3>; rel=\"last\", \
                 <{base}/repos/{owner}/gears/pulls?page=1>; rel=\"other\"",
                base = s.base,
                owner = s.owner
            );
            let h = r.headers_mut();
            h.insert("link", link.parse().unwrap());
            h.insert("x-ratelimit-remaining", "4999".parse().unwrap());
            h.insert("x-github-request-id", "ABCD:1234".parse().unwrap());
            h.insert("set-cookie", "logged_in=yes".parse().unwrap());
            h.insert("x-oauth-scopes", "repo, workflow".parse().unwrap());
            // A hostile or buggy upstream reflecting the credential: it must not reach the client.
            h.insert("x-echo-authorization", auth.clone().unwrap_or_default().parse().unwrap());
            h.insert("www-authenticate", "Bearer realm=x".parse().unwrap());
            r
        }
        ("GET", "/pulls/1") => {
            let accept = call_header(&parts, "accept").unwrap_or_default();
            let etag = "\"pull-1-v1\"";
            let mut r = if call_header(&parts, "if-none-match").as_deref() == Some(etag)
                || call_header(&parts, "if-modified-since").as_deref() == Some(LAST_MODIFIED)
            {
                // A conditional hit: GitHub answers 304 with no body and does not count it.
                let mut r = Response::new(Full::new(Bytes::new()));
                *r.status_mut() = StatusCode::NOT_MODIFIED;
                r
            } else if accept == "application/vnd.github.diff" {
                let mut r = Response::new(Full::new(Bytes::from_static(DIFF.as_bytes())));
                r.headers_mut().insert("content-type", "application/vnd.github.diff; charset=utf-8".parse().unwrap());
                r
            } else {
                json_response(StatusCode::OK, pull(&s, 1, BRANCH))
            };
            let h = r.headers_mut();
            h.insert("etag", etag.parse().unwrap());
            h.insert("last-modified", LAST_MODIFIED.parse().unwrap());
            h.insert("x-ratelimit-limit", "5000".parse().unwrap());
            h.insert("x-ratelimit-remaining", "4321".parse().unwrap());
            h.insert("x-ratelimit-reset", "1764633600".parse().unwrap());
            r
        }
        ("GET", "/pulls/2") => json_response(StatusCode::OK, pull(&s, 2, "other")),
        // A pull request from a fork whose branch has the working branch's name.
        ("GET", "/pulls/3") => {
            let mut doc = pull(&s, 3, BRANCH);
            doc["head"]["repo"]["full_name"] = json!("evil/widgets");
            json_response(StatusCode::OK, doc)
        }
        ("GET", "/pulls/comments/55") => json_response(
            StatusCode::OK,
            json!({"id": 55, "pull_request_url": format!("{}{prefix}/pulls/1", s.base), "body": "nit"}),
        ),
        ("GET", "/pulls/comments/66") => json_response(
            StatusCode::OK,
            json!({"id": 66, "pull_request_url": format!("{}{prefix}/pulls/2", s.base), "body": "other"}),
        ),
        ("GET", "/issues") => json_response(
            StatusCode::OK,
            json!([{"number": 9, "title": "Crash on start", "state": "open"}, {"number": 1, "title": "Add widgets", "pull_request": {"url": format!("{}{prefix}/pulls/1", s.base)}}]),
        ),
        ("GET", "/actions/jobs/10/logs") if call_header(&parts, "if-none-match").is_some() => {
            let mut r = Response::new(Full::new(Bytes::new()));
            *r.status_mut() = StatusCode::NOT_MODIFIED;
            r
        }
        ("GET" | "HEAD", "/actions/jobs/10/logs" | "/actions/runs/12/logs") => {
            let name = if rest.contains("jobs") { "job-10.txt" } else { "run-12-big.txt" };
            let url = format!("{}/{name}?sv=2024&sig={SIGNATURE}&se=2026-12-01", s.storage.lock().unwrap());
            redirect(&url)
        }
        ("GET", "/actions/jobs/11/logs") => {
            let port = s.storage.lock().unwrap().rsplit(':').next().unwrap_or_default().to_owned();
            redirect(&format!("http://elsewhere.test:{port}/job-11.txt?sig={SIGNATURE}"))
        }
        ("GET" | "HEAD", r) if READ_FAMILIES.iter().any(|(path, _)| *path == r) => {
            json_response(StatusCode::OK, json!({"read": r}))
        }
        ("GET", "/pulls/1/files") => json_response(StatusCode::OK, json!([{"filename": "README"}])),
        ("GET", "/pulls/2/files") => {
            // An error body that echoes the request's credential: sluice scrubs it.
            json_response(
                StatusCode::UNPROCESSABLE_ENTITY,
                json!({"message": format!("cannot list files, you sent {}", auth.clone().unwrap_or_default())}),
            )
        }
        ("GET", "/pulls/1/comments" | "/issues/1/comments") => json_response(StatusCode::OK, json!([])),
        ("GET", "/issues/2/comments") => {
            // A success that reflects the credential in its JSON (raw and as base64): sluice scrubs it.
            let auth = auth.clone().unwrap_or_default();
            let b64 = STANDARD.encode(format!("x-access-token:{CANARY}"));
            json_response(StatusCode::OK, json!([{"id": 5, "body": format!("you sent {auth}, or {b64}")}]))
        }
        ("POST", "/pulls") => {
            let n = s.next_number.fetch_add(1, Ordering::SeqCst) as u64;
            let mut r = json_response(StatusCode::CREATED, pull(&s, n, BRANCH));
            r.headers_mut().insert("location", format!("{}{prefix}/pulls/{n}", s.base).parse().unwrap());
            r
        }
        ("PATCH", "/pulls/1") => json_response(StatusCode::OK, pull(&s, 1, BRANCH)),
        (
            "POST",
            "/pulls/1/comments"
            | "/issues/1/comments"
            | "/pulls/2/comments"
            | "/issues/2/comments"
            | "/issues/9/comments"
            | "/pulls/1/comments/55/replies"
            | "/pulls/1/reviews",
        ) => json_response(StatusCode::CREATED, json!({"id": 77, "body": "ok"})),
        _ => json_response(StatusCode::NOT_FOUND, json!({"message": "Not Found"})),
    };
    Ok(resp)
}

fn redirect(url: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::FOUND;
    r.headers_mut().insert("location", url.parse().unwrap());
    r.headers_mut().insert("x-ratelimit-remaining", "4998".parse().unwrap());
    r
}

const DIFF: &str = "diff --git a/README b/README\n--- a/README\n+++ b/README\n@@ -1 +1 @@\n-old\n+new\n";
const LAST_MODIFIED: &str = "Tue, 01 Dec 2026 10:00:00 GMT";
/// The signature in the storage URLs: it must never reach the sandbox.
const SIGNATURE: &str = "SignedStorageSig0123456789";
/// Bytes in the big log: over 64 MiB.
const BIG_LOG: u64 = 72 << 20;

/// One allowed read per family of SPEC §3.1 (path below `/repos/OWNER/widgets`) and its operation.
const READ_FAMILIES: [(&str, &str); 24] = [
    ("/issues/9", "api-get-issue"),
    ("/issues/9/events", "api-list-issue-events"),
    ("/issues/9/labels", "api-list-issue-labels"),
    ("/issues/9/timeline", "api-list-issue-timeline"),
    ("/pulls/1/commits", "api-list-pull-commits"),
    ("/pulls/1/reviews", "api-list-pull-reviews"),
    ("/pulls/1/requested_reviewers", "api-list-requested-reviewers"),
    ("/commits/abc123", "api-get-commit"),
    ("/commits/abc123/statuses", "api-list-commit-statuses"),
    ("/commits/abc123/status", "api-get-combined-status"),
    ("/commits/abc123/check-runs", "api-list-check-runs"),
    ("/commits/abc123/check-suites", "api-list-check-suites"),
    ("/compare/main...feature", "api-compare"),
    ("/contents/src/lib.rs", "api-get-contents"),
    ("/readme", "api-get-readme"),
    ("/git/trees/abc123", "api-get-tree"),
    ("/git/ref/heads/feature", "api-get-ref"),
    ("/branches/feature", "api-get-branch"),
    ("/releases/latest", "api-get-latest-release"),
    ("/tags", "api-list-tags"),
    ("/labels", "api-list-labels"),
    ("/milestones/2", "api-get-milestone"),
    ("/actions/runs/12/jobs", "api-list-run-jobs"),
    ("/actions/jobs/10", "api-get-job"),
];

/// A stand-in for the signed log storage: records every request (path, query, `Authorization`),
/// serves `job-10.txt` and a `run-12-big.txt` of [`BIG_LOG`] bytes generated as it streams.
struct Storage {
    addr: SocketAddr,
    calls: Mutex<Vec<Stored>>,
}

const JOB_LOG: &str = "2026-12-01T10:00:00Z ##[group]Run cargo test\n2026-12-01T10:00:09Z test result: FAILED\n";

async fn spawn_storage() -> Arc<Storage> {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let storage = Arc::new(Storage { addr: listener.local_addr().unwrap(), calls: Mutex::new(Vec::new()) });
    let st = storage.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let st = st.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let st = st.clone();
                    async move {
                        let auth = req.headers().get("authorization").map(|v| format!("{v:?}"));
                        let path = req.uri().path().to_owned();
                        st.calls.lock().unwrap().push((path.clone(), req.uri().query().map(str::to_owned), auth));
                        let body: http_body_util::combinators::BoxBody<Bytes, Infallible> = match path.as_str() {
                            "/job-10.txt" => Full::new(Bytes::from_static(JOB_LOG.as_bytes())).boxed(),
                            "/run-12-big.txt" => big_log().boxed(),
                            _ => Full::new(Bytes::from_static(b"no such blob")).boxed(),
                        };
                        let mut r = Response::new(body);
                        r.headers_mut().insert("content-type", "text/plain".parse().unwrap());
                        r.headers_mut().insert("x-ms-request-id", "storage-1".parse().unwrap());
                        if path == "/run-12-big.txt" {
                            r.headers_mut().insert("content-length", BIG_LOG.to_string().parse().unwrap());
                        }
                        Ok::<_, Infallible>(r)
                    }
                });
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    storage
}

/// [`BIG_LOG`] bytes in 64 KiB frames, each the same shared buffer (so the storage holds one frame).
struct BigLog {
    left: usize,
    frame: Bytes,
}

impl hyper::body::Body for BigLog {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        self.left -= 1;
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(self.frame.clone()))))
    }
}

fn big_log() -> BigLog {
    const FRAME: usize = 64 << 10;
    let mut line = vec![b'x'; FRAME - 1];
    line.push(b'\n');
    BigLog { left: BIG_LOG as usize / FRAME, frame: Bytes::from(line) }
}

async fn spawn_stand_in(owner: &str) -> Arc<StandIn> {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = Arc::new(StandIn {
        base: format!("http://{addr}"),
        owner: owner.to_owned(),
        calls: Mutex::new(Vec::new()),
        next_number: AtomicUsize::new(3),
        conns: AtomicUsize::new(0),
        seen: Mutex::new(Vec::new()),
        storage: Mutex::new(String::new()),
    });
    let s = state.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            s.conns.fetch_add(1, Ordering::SeqCst);
            let s = s.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| stand_in(req, s.clone()));
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    state
}

// ---------- the world: stand-in, sluice, curl ----------

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct World {
    _dir: TempDir,
    api: Arc<StandIn>,
    storage: Arc<Storage>,
    sluice: SocketAddr,
    keyring: Keyring,
    owner: String,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

/// What curl printed: the status, the headers (names lowercased) and the body.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// Asserts a sluice refusal: the status and the exact GitHub-shaped JSON body.
    fn refused(&self, status: u16, message: &str) {
        assert_eq!((self.status, self.json()), (status, json!({"message": message, "documentation_url": DOCS})));
        assert_eq!(self.header("content-type"), Some("application/json; charset=utf-8"));
    }
}

impl World {
    async fn new(name: &str) -> World {
        World::with_token(name, Some(CANARY)).await
    }

    /// A world whose sluice holds `token` as the real token for the owner (none: no token configured).
    async fn with_token(name: &str, token: Option<&str>) -> World {
        World::build(name, token, |_| {}).await
    }

    /// A world with the real token and `tweak` applied to the git settings.
    async fn with(name: &str, tweak: impl FnOnce(&mut GitSettings)) -> World {
        World::build(name, Some(CANARY), tweak).await
    }

    async fn build(name: &str, token: Option<&str>, tweak: impl FnOnce(&mut GitSettings)) -> World {
        audit();
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "sluice-api-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let owner = format!("a-{name}");
        let api = spawn_stand_in(&owner).await;
        let mut settings = GitSettings {
            upstream: "http://127.0.0.1:9".into(),
            api_upstream: api.base.clone(),
            token_env: None,
            ..GitSettings::default()
        };
        if let Some(token) = token {
            let token_file = dir.join("real-token");
            std::fs::write(&token_file, format!("{token}\n")).unwrap();
            settings.tokens.insert(owner.clone(), TokenSource::File(token_file));
        }
        // The log storage: a second loopback server, named as GitHub's storage would be, reachable only
        // because `log_allow_ips` lifts the address guard for loopback.
        let storage = spawn_storage().await;
        let port = storage.addr.port();
        *api.storage.lock().unwrap() = format!("http://logs.storage.test:{port}");
        settings.log_hosts = vec![LogHost(HostPattern::parse(&format!("logs.storage.test:{port}")).unwrap())];
        settings.log_allow_ips = vec![IpRange("127.0.0.1/32".parse().unwrap())];
        tweak(&mut settings);
        let mut resolver = ResolverConfig { system: false, ..ResolverConfig::default() };
        for host in ["logs.storage.test", "elsewhere.test"] {
            resolver.hosts.insert(host.into(), vec!["127.0.0.1".parse().unwrap()]);
        }
        let dialer = Dialer {
            resolver: Arc::new(Resolver::new(&resolver).unwrap()),
            own: Arc::from(Vec::new()),
            metrics: Arc::new(Metrics::default()),
            connect_timeout: Duration::from_secs(5),
        };
        let keyring = Keyring::new(SigningKey::from_bytes(&[43u8; 32]).unwrap(), None);
        let proxy = Arc::new(
            GitProxy::with_dialer(&settings, Some(keyring.clone()), dialer).unwrap().with_audit(audit().clone()),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let sluice = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let shutdown = sluice::listen::Shutdown::default();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let _ = rx.await;
            stop.drain(std::time::Duration::from_secs(5)).await;
        });
        tokio::spawn(sluice::git::serve(listener, proxy, shutdown));
        World { _dir: TempDir(dir), api, storage, sluice, keyring, owner, shutdown: Some(tx) }
    }

    fn repo(&self) -> String {
        format!("{}/widgets", self.owner)
    }

    fn claims(&self) -> Claims {
        let now = now_unix();
        Claims::git(SID, &self.repo(), BRANCH, now, now + 3600)
    }

    fn token(&self) -> String {
        self.keyring.mint(&self.claims())
    }

    fn bearer(&self) -> String {
        format!("Authorization: Bearer {}", self.token())
    }

    /// `http://SLUICE/api/repos/OWNER/widgets{rest}`.
    fn url(&self, rest: &str) -> String {
        format!("http://{}/api/repos/{}{rest}", self.sluice, self.repo())
    }

    fn calls(&self) -> Vec<Call> {
        self.api.calls.lock().unwrap().clone()
    }

    fn writes(&self) -> Vec<Call> {
        self.calls().into_iter().filter(|c| c.method != "GET").collect()
    }

    fn clear_calls(&self) {
        self.api.calls.lock().unwrap().clear();
    }

    /// `curl -sS -i -X METHOD [-H auth] [--data body] URL extra…`, with no proxy from the environment.
    async fn curl(&self, method: &str, url: &str, auth: Option<&str>, body: Option<&str>, extra: &[&str]) -> Answer {
        let mut cmd = tokio::process::Command::new("curl");
        cmd.args(["-sS", "-i", "--max-time", "20", "-X", method]).kill_on_drop(true);
        for var in ["http_proxy", "https_proxy", "HTTPS_PROXY", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"] {
            cmd.env_remove(var);
        }
        if let Some(auth) = auth {
            cmd.args(["-H", auth]);
        }
        if let Some(body) = body {
            cmd.args(["-H", "Content-Type: application/json", "--data-binary", body]);
        }
        cmd.args(extra).arg(url);
        let out = tokio::time::timeout(Duration::from_secs(30), cmd.output()).await.expect("curl timed out").unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_no_canary("curl output", &text);
        assert_no_canary("curl stderr", &String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "curl failed: {}", String::from_utf8_lossy(&out.stderr));
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let mut lines = head.lines();
        let status = lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|s| s.parse().ok()).unwrap();
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        Answer { status, headers, body: body.to_owned() }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

fn real_auth() -> Option<String> {
    Some(format!("Bearer {CANARY}"))
}

// ---------- creating pull requests ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_a_pull_request_from_the_working_branch_in_both_head_forms() {
    let w = World::new("create").await;
    let bodies = [
        r#"{"title":"Add widgets","head":"feature","base":"main","body":"please"}"#.to_owned(),
        format!(r#"{{"title":"Again","head":"{}:feature","base":"main"}}"#, w.owner.to_uppercase()),
    ];
    // Bearer, token and Basic SESSION:CREDENTIAL all carry the same credential.
    let auths = [w.bearer(), format!("Authorization: token {}", w.token())];
    for (i, (body, auth)) in bodies.iter().zip(&auths).enumerate() {
        let a = w.curl("POST", &w.url("/pulls"), Some(auth), Some(body), &[]).await;
        let number = 3 + i as u64;
        assert_eq!(a.status, 201, "{}", a.body);
        assert_eq!(a.json()["number"], json!(number));
        assert_eq!(
            a.header("location").map(str::to_owned),
            Some(format!("http://{}/api/repos/{}/pulls/{number}", w.sluice, w.repo()))
        );
        assert_eq!(a.header("content-type"), Some("application/json; charset=utf-8"));
    }
    let basic = format!("Basic {}", STANDARD.encode(format!("{SID}:{}", w.token())));
    let a = w.curl("POST", &w.url("/pulls"), Some(&format!("Authorization: {basic}")), Some(&bodies[0]), &[]).await;
    assert_eq!(a.status, 201, "{}", a.body);
    // The stand-in received exactly the client's bytes, with the real token and nothing else.
    let want: Vec<Call> = [&bodies[0], &bodies[1], &bodies[0]]
        .iter()
        .map(|b| Call {
            method: "POST".into(),
            path: format!("/repos/{}/pulls", w.repo()),
            query: None,
            body: (*b).clone(),
            auth: real_auth(),
        })
        .collect();
    assert_eq!(w.calls(), want);
    let lines = log_lines_for(&w.repo());
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.contains(&format!("session={SID} "))
                && l.contains("service=api-create-pull")
                && l.contains("verdict=allow")
                && l.contains("status=201"))
            .count(),
        3,
        "{lines:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_is_refused_for_another_head_a_cross_repo_base_or_another_repository() {
    let w = World::new("refuse-create").await;
    let owner = &w.owner;
    let cases = [
        (
            r#"{"title":"t","head":"main","base":"feature"}"#.to_owned(),
            "sluice: head \"main\" is not this session's working branch; open pull requests from \"feature\" \
             (or \"OWNER:feature\")"
                .replace("OWNER", owner),
        ),
        (
            r#"{"title":"t","head":"evil:feature","base":"main"}"#.to_owned(),
            "sluice: head \"evil:feature\" is not this session's working branch; open pull requests from \
             \"feature\" (or \"OWNER:feature\")"
                .replace("OWNER", owner),
        ),
        (
            r#"{"title":"t","head":"feature","base":"evil:main"}"#.to_owned(),
            format!(
                "sluice: base \"evil:main\" must be a branch of {owner}/widgets given as a plain branch name, such \
                 as \"main\""
            ),
        ),
    ];
    for (body, message) in &cases {
        let a = w.curl("POST", &w.url("/pulls"), Some(&w.bearer()), Some(body), &[]).await;
        a.refused(403, message);
    }
    let a = w.curl("POST", &w.url("/pulls"), Some(&w.bearer()), Some("{not json"), &[]).await;
    assert_eq!(a.status, 400);
    assert!(a.json()["message"].as_str().unwrap().starts_with("sluice: the request body is not valid JSON ("));
    // Another repository in the path: the credential binds one.
    let other = format!("http://{}/api/repos/{owner}/gears/pulls", w.sluice);
    let a = w.curl("POST", &other, Some(&w.bearer()), Some(&cases[0].0), &[]).await;
    a.refused(
        403,
        &format!(
            "sluice: git credential refused: it is for {owner}/widgets, not {owner}/gears; ask for a credential for \
             {owner}/gears"
        ),
    );
    let a = w.curl("GET", &other, Some(&w.bearer()), None, &[]).await;
    assert_eq!(a.status, 403);
    // A body over the limit is refused before it is read in full.
    let big = format!(r#"{{"title":"{}","head":"feature","base":"main"}}"#, "x".repeat(2 << 20));
    let path = std::env::temp_dir().join(format!("sluice-api-big-{}", std::process::id()));
    std::fs::write(&path, big).unwrap();
    let a = w.curl("POST", &w.url("/pulls"), Some(&w.bearer()), Some(&format!("@{}", path.display())), &[]).await;
    let _ = std::fs::remove_file(&path);
    a.refused(413, "sluice: the request body is longer than 1048576 bytes");
    assert_eq!(w.calls(), vec![], "nothing reached the stand-in");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merges_ref_deletion_graphql_workflows_and_settings_are_refused() {
    let w = World::new("refuse-other").await;
    let repo = w.repo();
    let allowed = sluice::git::api::ALLOWED.as_str();
    assert!(allowed.starts_with("allowed: reads (GET, HEAD) under /api/repos/OWNER/REPO of the repository; issues"));
    let a = w.curl("PUT", &w.url("/pulls/1/merge"), Some(&w.bearer()), Some("{}"), &[]).await;
    a.refused(
        403,
        &format!(
            "sluice: PUT \"/api/repos/{repo}/pulls/1/merge\": merging pull requests is not allowed through sluice; \
             a person merges; {allowed}"
        ),
    );
    let graphql = format!("http://{}/api/graphql", w.sluice);
    let a = w.curl("POST", &graphql, Some(&w.bearer()), Some(r#"{"query":"{viewer{login}}"}"#), &[]).await;
    a.refused(
        403,
        &format!(
            "sluice: POST \"/api/graphql\": GraphQL is not forwarded (one query can reach any repository); use \
             the REST routes; {allowed}"
        ),
    );
    for (method, rest, body, why) in [
        ("DELETE", "/git/refs/heads/feature", None, ": deleting is not allowed through sluice;"),
        (
            "POST",
            "/actions/workflows/ci.yml/dispatches",
            Some(r#"{"ref":"main"}"#),
            ": dispatching workflows is not allowed through sluice;",
        ),
        ("POST", "/actions/runs/5/rerun", None, ": re-running workflows is not allowed through sluice;"),
        (
            "POST",
            "/issues/1/labels",
            Some(r#"{"labels":["x"]}"#),
            ": labels, assignees and milestones are not changed through sluice;",
        ),
        (
            "POST",
            "/issues/1/assignees",
            Some(r#"{"assignees":["x"]}"#),
            ": labels, assignees and milestones are not changed through sluice;",
        ),
        ("DELETE", "", None, ": deleting is not allowed through sluice;"),
        ("PATCH", "", Some(r#"{"default_branch":"feature"}"#), " is not in the API slice sluice forwards;"),
    ] {
        let a = w.curl(method, &w.url(rest), Some(&w.bearer()), body, &[]).await;
        a.refused(403, &format!("sluice: {method} \"/api/repos/{repo}{rest}\"{why} {allowed}"));
        let code = if method == "PATCH" { "api_route_not_allowed" } else { "api_write_not_allowed" };
        assert_eq!(a.header("x-sluice-decision"), Some(format!("deny; reason={code}").as_str()), "{method} {rest}");
    }
    // Secrets, keys, hooks and the like are never forwarded, not even for reading.
    for rest in [
        "/actions/secrets",
        "/actions/variables",
        "/keys",
        "/hooks",
        "/invitations",
        "/environments",
        "/collaborators/evil",
    ] {
        let a = w.curl("GET", &w.url(rest), Some(&w.bearer()), None, &[]).await;
        assert_eq!(a.status, 403, "{rest}");
        assert_eq!(a.header("x-sluice-decision"), Some("deny; reason=api_never_forwarded"), "{rest}");
    }
    // User, organisation and search routes and other repositories are outside the slice.
    for path in ["/api/user", "/api/orgs/acme/repos", "/api/search/code?q=x"] {
        let a = w.curl("GET", &format!("http://{}{path}", w.sluice), Some(&w.bearer()), None, &[]).await;
        assert_eq!(a.header("x-sluice-decision"), Some("deny; reason=api_outside_repository"), "{path}");
    }
    assert_eq!(w.calls(), vec![], "nothing reached the stand-in");
}

// ---------- editing and commenting ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn comment_and_edit_on_the_own_pull_request_only() {
    let w = World::new("comment").await;
    let repo = w.repo();
    let comment = r#"{"body":"looks good"}"#;
    let edit = r#"{"title":"Better title","state":"closed"}"#;
    let a = w.curl("PATCH", &w.url("/pulls/1"), Some(&w.bearer()), Some(edit), &[]).await;
    assert_eq!((a.status, a.json()["number"].clone()), (200, json!(1)));
    for rest in ["/issues/1/comments", "/pulls/1/comments"] {
        let a = w.curl("POST", &w.url(rest), Some(&w.bearer()), Some(comment), &[]).await;
        assert_eq!((a.status, a.json()), (201, json!({"id": 77, "body": "ok"})));
    }
    let lookup = |n: u64| Call {
        method: "GET".into(),
        path: format!("/repos/{repo}/pulls/{n}"),
        query: None,
        body: String::new(),
        auth: real_auth(),
    };
    let write = |method: &str, rest: &str, body: &str| Call {
        method: method.into(),
        path: format!("/repos/{repo}{rest}"),
        query: None,
        body: body.into(),
        auth: real_auth(),
    };
    assert_eq!(
        w.calls(),
        vec![
            lookup(1),
            write("PATCH", "/pulls/1", edit),
            lookup(1),
            write("POST", "/issues/1/comments", comment),
            lookup(1),
            write("POST", "/pulls/1/comments", comment),
        ]
    );
    // Six upstream requests, one after another: one pooled connection.
    assert_eq!(w.api.conns.load(Ordering::SeqCst), 1);
    w.clear_calls();

    // Pull request #2 comes from another branch: looked up, never written.
    let other = format!(
        "sluice: pull request #2 has head \"{repo}:other\"; this session may edit and comment only on pull \
         requests from {repo}:feature"
    );
    for (method, rest, body) in
        [("PATCH", "/pulls/2", edit), ("POST", "/issues/2/comments", comment), ("POST", "/pulls/2/comments", comment)]
    {
        let a = w.curl(method, &w.url(rest), Some(&w.bearer()), Some(body), &[]).await;
        a.refused(403, &other);
    }
    let a = w.curl("POST", &w.url("/issues/99/comments"), Some(&w.bearer()), Some(comment), &[]).await;
    a.refused(
        404,
        &format!(
            "sluice: {repo} has no pull request #99 (an issue number is not enough: comments go only to pull \
             requests from \"feature\")"
        ),
    );
    assert_eq!(w.calls(), vec![lookup(2), lookup(2), lookup(2), lookup(99)]);
    w.clear_calls();

    // Fields other than title, body and state are refused before anything goes upstream.
    let a = w.curl("PATCH", &w.url("/pulls/1"), Some(&w.bearer()), Some(r#"{"base":"release"}"#), &[]).await;
    a.refused(
        403,
        "sluice: field \"base\" may not be changed (changing the base branch is not allowed through sluice); \
         allowed: title, body, state",
    );
    assert_eq!(w.calls(), vec![]);
    assert_eq!(w.writes(), vec![]);
}

// ---------- reading ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_pass_through_and_link_points_back_at_sluice() {
    let w = World::new("list").await;
    let repo = w.repo();
    let a = w.curl("GET", &w.url("/pulls?state=all"), Some(&w.bearer()), None, &[]).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.json().as_array().map(Vec::len), Some(2));
    let base = format!("http://{}/api/repos/{repo}", w.sluice);
    assert_eq!(
        a.header("link").map(str::to_owned),
        Some(format!("<{base}/pulls?state=all&page=2>; rel=\"next\", <{base}/pulls?state=all&page=3>; rel=\"last\""))
    );
    assert_eq!(a.header("x-ratelimit-remaining"), Some("4999"));
    assert_eq!(a.header("x-github-request-id"), Some("ABCD:1234"));
    for stripped in ["set-cookie", "x-oauth-scopes", "x-echo-authorization", "www-authenticate", "authorization"] {
        assert_eq!(a.header(stripped), None, "{stripped}");
    }
    // The repository id behind `/repositories/ID/` was looked up once, then cached.
    let a = w.curl("GET", &w.url("/pulls"), Some(&w.bearer()), None, &["-H", "Host: sluice.internal:3129"]).await;
    assert!(
        a.header("link").is_some_and(|l| l.starts_with(&format!(
            "<http://sluice.internal:3129/api/repos/{repo}/pulls?state=all&page=2>; rel=\"next\""
        ))),
        "{:?}",
        a.header("link")
    );
    let paths: Vec<(String, Option<String>)> = w.calls().into_iter().map(|c| (c.path, c.query)).collect();
    assert_eq!(
        paths,
        vec![
            (format!("/repos/{repo}/pulls"), Some("state=all".into())),
            (format!("/repos/{repo}"), None),
            (format!("/repos/{repo}/pulls"), None),
        ]
    );
    w.clear_calls();

    // Following the rewritten `next` link goes through sluice to the next page.
    let next = format!("{base}/pulls?state=all&page=2");
    let a = w.curl("GET", &next, Some(&w.bearer()), None, &[]).await;
    assert_eq!(a.status, 200);
    for rest in ["", "/pulls/1", "/pulls/1/files", "/pulls/1/comments", "/issues/1/comments"] {
        let a = w.curl("GET", &w.url(rest), Some(&w.bearer()), None, &[]).await;
        assert_eq!(a.status, 200, "{rest}: {}", a.body);
    }
    // GitHub Enterprise's `/api/v3/` prefix (what `gh` uses for a non-github.com host) is the same slice.
    let v3 = format!("http://{}/api/v3/repos/{repo}/pulls/1", w.sluice);
    let a = w.curl("GET", &v3, Some(&format!("Authorization: token {}", w.token())), None, &[]).await;
    assert_eq!((a.status, a.json()["head"]["ref"].clone()), (200, json!(BRANCH)));
    let paths: Vec<(String, Option<String>)> = w.calls().into_iter().map(|c| (c.path, c.query)).collect();
    let p = |rest: &str| (format!("/repos/{repo}{rest}"), None);
    assert_eq!(
        paths,
        vec![
            (format!("/repos/{repo}/pulls"), Some("state=all&page=2".into())),
            p(""),
            p("/pulls/1"),
            p("/pulls/1/files"),
            p("/pulls/1/comments"),
            p("/issues/1/comments"),
            p("/pulls/1"),
        ]
    );
    assert!(w.calls().iter().all(|c| c.auth == real_auth()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_error_bodies_are_passed_back_scrubbed() {
    let w = World::new("scrub").await;
    let a = w.curl("GET", &w.url("/pulls/2/files"), Some(&w.bearer()), None, &[]).await;
    assert_eq!((a.status, a.json()), (422, json!({"message": "cannot list files, you sent Bearer [redacted]"})));
    // Successes are streamed with the token scrubbed too.
    let a = w.curl("GET", &w.url("/issues/2/comments"), Some(&w.bearer()), None, &[]).await;
    assert_eq!((a.status, a.json()), (200, json!([{"id": 5, "body": "you sent Bearer [redacted], or [redacted]"}])));
}

// ---------- credentials ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_expired_forged_and_misbound_credentials_are_refused() {
    let w = World::new("creds").await;
    let repo = w.repo();
    let a = w.curl("GET", &w.url("/pulls"), None, None, &[]).await;
    a.refused(
        401,
        "sluice: Requires authentication: send the session's git credential as \"Authorization: Bearer CREDENTIAL\"",
    );
    let now = now_unix();
    let other_key = Keyring::new(SigningKey::from_bytes(&[44u8; 32]).unwrap(), None);
    let cases = [
        (w.keyring.mint(&Claims { iat: now - 7200, exp: now - 600, ..w.claims() }), "credential expired 10m ago"),
        (
            other_key.mint(&w.claims()),
            "credential signature does not verify (forged, altered, or signed with another key)",
        ),
        (
            w.keyring.mint(&Claims { kind: Kind::Egress, policy: Some("trusted".into()), ..w.claims() }),
            "this is an egress credential; a git credential is needed here",
        ),
        ("v1.garbage".to_owned(), "malformed credential: expected three dot-separated parts"),
    ];
    for (token, why) in &cases {
        let a = w.curl("GET", &w.url("/pulls"), Some(&format!("Authorization: Bearer {token}")), None, &[]).await;
        a.refused(403, &format!("sluice: git credential refused: {why}"));
    }
    let elsewhere = w.keyring.mint(&Claims { repo: Some(format!("{}/gears", w.owner)), ..w.claims() });
    let a = w.curl("POST", &w.url("/pulls"), Some(&format!("Authorization: token {elsewhere}")), Some("{}"), &[]).await;
    a.refused(
        403,
        &format!(
            "sluice: git credential refused: it is for {}/gears, not {repo}; ask for a credential for {repo}",
            w.owner
        ),
    );
    let wrong_session = format!("Authorization: Basic {}", STANDARD.encode(format!("other:{}", w.token())));
    let a = w.curl("GET", &w.url("/pulls"), Some(&wrong_session), None, &[]).await;
    a.refused(
        403,
        "sluice: git credential refused: the session id given with the credential is not the one it was issued to",
    );
    let a = w.curl("GET", &w.url("/pulls"), Some("Authorization: Digest x"), None, &[]).await;
    a.refused(
        401,
        "sluice: the Authorization header must be \"Bearer CREDENTIAL\", \"token CREDENTIAL\" or HTTP Basic with \
         user = session id, password = git credential",
    );
    assert_eq!(w.calls(), vec![], "nothing reached the stand-in");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_real_token_the_api_is_refused() {
    let w = World::with_token("no-token", None).await;
    let a = w.curl("GET", &w.url("/pulls"), Some(&w.bearer()), None, &[]).await;
    a.refused(
        403,
        &format!(
            "sluice: no upstream credential is configured for {}, so API requests are refused; the operator sets \
             token_env, token_file or [git.tokens]",
            w.repo()
        ),
    );
    assert_eq!(w.calls(), vec![]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_refusing_the_real_token_is_the_operators_problem_not_the_sandboxs() {
    let w = World::with_token("stale", Some("ghs_StaleToken")).await;
    let a = w.curl("GET", &w.url("/pulls"), Some(&w.bearer()), None, &[]).await;
    a.refused(
        502,
        &format!(
            "sluice: {} refused sluice's upstream credential for {} (401 Unauthorized); the operator should check \
             the token configured for it",
            w.api.base.trim_start_matches("http://"),
            w.repo()
        ),
    );
    assert_eq!(w.calls().len(), 1);
    assert_eq!(w.calls()[0].auth.as_deref(), Some("Bearer ghs_StaleToken"));
}

// ---------- the read families, media types, conditional requests ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_read_family_reaches_the_stand_in_at_its_exact_path_with_the_real_token() {
    let w = World::new("families").await;
    let repo = w.repo();
    for (rest, _) in READ_FAMILIES {
        let a = w.curl("GET", &w.url(rest), Some(&w.bearer()), None, &[]).await;
        assert_eq!((a.status, a.json()), (200, json!({"read": rest})), "{rest}");
    }
    let want: Vec<Call> = READ_FAMILIES
        .iter()
        .map(|(rest, _)| Call {
            method: "GET".into(),
            path: format!("/repos/{repo}{rest}"),
            query: None,
            body: String::new(),
            auth: real_auth(),
        })
        .collect();
    assert_eq!(w.calls(), want);
    w.clear_calls();
    // HEAD is a read too.
    let a = w.curl("HEAD", &w.url("/issues/9"), Some(&w.bearer()), None, &["-I"]).await;
    assert_eq!((a.status, a.header("content-type")), (200, Some("application/json; charset=utf-8")));
    let heads: Vec<(String, String)> = w.calls().into_iter().map(|c| (c.method, c.path)).collect();
    assert_eq!(heads, vec![("HEAD".to_owned(), format!("/repos/{repo}/issues/9"))]);
    let lines = log_lines_for(&repo);
    for (rest, op) in READ_FAMILIES {
        assert!(
            lines.iter().any(|l| l.contains(&format!("service={op}")) && l.contains("status=200")),
            "{rest}: {lines:#?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diffs_conditional_requests_and_rate_limit_headers_pass_both_ways() {
    let w = World::new("media").await;
    let diff = ["-H", "Accept: application/vnd.github.diff"];
    let a = w.curl("GET", &w.url("/pulls/1"), Some(&w.bearer()), None, &diff).await;
    assert_eq!((a.status, a.body.as_str()), (200, DIFF));
    assert_eq!(a.header("content-type"), Some("application/vnd.github.diff; charset=utf-8"));
    assert_eq!(a.header("etag"), Some("\"pull-1-v1\""));
    assert_eq!(a.header("last-modified"), Some(LAST_MODIFIED));
    for (name, value) in
        [("x-ratelimit-limit", "5000"), ("x-ratelimit-remaining", "4321"), ("x-ratelimit-reset", "1764633600")]
    {
        assert_eq!(a.header(name), Some(value), "{name}");
    }
    // The ETag and Last-Modified come back as conditions, and the 304 goes back to the client whole.
    let since = format!("If-Modified-Since: {LAST_MODIFIED}");
    for condition in ["If-None-Match: \"pull-1-v1\"", since.as_str()] {
        let a = w.curl("GET", &w.url("/pulls/1"), Some(&w.bearer()), None, &["-H", condition]).await;
        assert_eq!((a.status, a.body.as_str()), (304, ""), "{condition}");
        assert_eq!(a.header("etag"), Some("\"pull-1-v1\""));
        assert_eq!(a.header("x-ratelimit-remaining"), Some("4321"));
    }
    let seen = w.api.seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![
            (Some("application/vnd.github.diff".into()), None, None),
            (Some("*/*".into()), Some("\"pull-1-v1\"".into()), None),
            (Some("*/*".into()), None, Some(LAST_MODIFIED.into())),
        ]
    );
    assert!(w.calls().iter().all(|c| c.auth == real_auth() && c.path == format!("/repos/{}/pulls/1", w.repo())));
}

// ---------- job logs ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_log_is_fetched_from_storage_without_a_credential_and_without_showing_the_signed_url() {
    let w = World::new("logs").await;
    let repo = w.repo();
    let a = w.curl("GET", &w.url("/actions/jobs/10/logs"), Some(&w.bearer()), None, &[]).await;
    assert_eq!((a.status, a.body.as_str()), (200, JOB_LOG));
    assert_eq!(a.header("content-type"), Some("text/plain"));
    for (name, value) in &a.headers {
        assert!(!value.contains(SIGNATURE) && !value.contains("storage.test"), "{name}: {value}");
    }
    assert_eq!((a.header("location"), a.header("x-ms-request-id")), (None, None));
    assert_eq!(a.header("x-ratelimit-remaining"), Some("4998"), "GitHub's rate limit comes back with the log");
    let stored = w.storage.calls.lock().unwrap().clone();
    assert_eq!(
        stored,
        vec![("/job-10.txt".to_owned(), Some(format!("sv=2024&sig={SIGNATURE}&se=2026-12-01")), None)],
        "the storage got the signed URL and no Authorization"
    );
    assert_eq!(w.calls()[0].path, format!("/repos/{repo}/actions/jobs/10/logs"));
    assert_eq!(w.calls()[0].auth, real_auth());

    // A 304 for a log is an answer, not a redirect: it goes back as is and the storage is not asked.
    let a =
        w.curl("GET", &w.url("/actions/jobs/10/logs"), Some(&w.bearer()), None, &["-H", "If-None-Match: \"l\""]).await;
    assert_eq!((a.status, a.body.as_str()), (304, ""));
    assert_eq!(w.storage.calls.lock().unwrap().len(), 1);

    // A redirect to a host outside `log_hosts` is refused, before any dial, naming the host only.
    let a = w.curl("GET", &w.url("/actions/jobs/11/logs"), Some(&w.bearer()), None, &[]).await;
    let port = w.storage.addr.port();
    a.refused(
        502,
        &format!(
            "sluice: {} redirected the log to elsewhere.test:{port}, which is not in [git] log_hosts; the operator \
             adds the storage host there",
            w.api.base.trim_start_matches("http://")
        ),
    );
    assert_eq!(w.storage.calls.lock().unwrap().len(), 1, "the storage saw nothing more");
    assert!(!capture::text().contains(SIGNATURE), "the signed URL reached the log");
}

/// The process's resident set, from `/proc/self/status`.
fn vm_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_over_64_mib_streams_with_bounded_memory() {
    let w = World::new("biglog").await;
    let before = vm_rss();
    let mut cmd = tokio::process::Command::new("curl");
    cmd.args(["-sS", "--max-time", "120", "-o", "/dev/null", "-w", "%{http_code} %{size_download}"])
        .args(["-H", &w.bearer()])
        .arg(w.url("/actions/runs/12/logs"))
        .kill_on_drop(true);
    for var in ["http_proxy", "https_proxy", "HTTPS_PROXY", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"] {
        cmd.env_remove(var);
    }
    let run = tokio::spawn(async move { cmd.output().await });
    let mut peak = before;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(150);
    while !run.is_finished() {
        assert!(tokio::time::Instant::now() < deadline, "the log did not finish streaming");
        peak = peak.max(vm_rss());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let out = run.await.unwrap().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("200 {BIG_LOG}"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The log is 72 MiB; sluice holds a few frames of it at a time.
    let grown = peak.saturating_sub(before);
    assert!(
        grown < 32 << 20,
        "resident memory grew by {} MiB while streaming a {} MiB log",
        grown >> 20,
        BIG_LOG >> 20
    );
}

// ---------- writes: replies, reviews, scope, rate ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_reviews_and_their_refused_variants() {
    let w = World::new("replies").await;
    let repo = w.repo();
    let post = |rest: &'static str, body: &'static str| {
        let w = &w;
        async move { w.curl("POST", &w.url(rest), Some(&w.bearer()), Some(body), &[]).await }
    };
    assert_eq!(post("/pulls/1/comments/55/replies", r#"{"body":"fixed"}"#).await.status, 201);
    assert_eq!(post("/pulls/1/comments", r#"{"body":"fixed","in_reply_to":55}"#).await.status, 201);
    assert_eq!(post("/pulls/1/reviews", r#"{"event":"COMMENT","body":"see inline"}"#).await.status, 201);
    let other_pull = "sluice: review comment 66 belongs to pull request #2, not to #1; replies go only to review \
                      comments of the session's own pull request";
    post("/pulls/1/comments/66/replies", r#"{"body":"x"}"#).await.refused(403, other_pull);
    post("/pulls/1/comments", r#"{"body":"x","in_reply_to":66}"#).await.refused(403, other_pull);
    post("/pulls/3/comments", r#"{"body":"x"}"#).await.refused(
        403,
        &format!(
            "sluice: pull request #3 has head \"evil/widgets:feature\"; this session may edit and comment only on \
             pull requests from {repo}:feature"
        ),
    );
    post("/pulls/1/reviews", r#"{"event":"APPROVE"}"#)
        .await
        .refused(403, "sluice: approving pull requests is not allowed through sluice; a person approves");
    let a = w.curl("PATCH", &w.url("/pulls/1"), Some(&w.bearer()), Some(r#"{"head":"other"}"#), &[]).await;
    a.refused(
        403,
        "sluice: field \"head\" may not be changed (a pull request's head stays the working branch); allowed: \
         title, body, state",
    );
    let write = |rest: &str, body: &str| Call {
        method: "POST".into(),
        path: format!("/repos/{repo}{rest}"),
        query: None,
        body: body.into(),
        auth: real_auth(),
    };
    assert_eq!(
        w.writes(),
        vec![
            write("/pulls/1/comments/55/replies", r#"{"body":"fixed"}"#),
            write("/pulls/1/comments", r#"{"body":"fixed","in_reply_to":55}"#),
            write("/pulls/1/reviews", r#"{"event":"COMMENT","body":"see inline"}"#),
        ],
        "only the allowed writes went upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_comments_follow_comment_scope() {
    let own = World::new("scope-own").await;
    let a = own.curl("POST", &own.url("/issues/9/comments"), Some(&own.bearer()), Some(r#"{"body":"hi"}"#), &[]).await;
    a.refused(
        404,
        &format!(
            "sluice: {} has no pull request #9 (an issue number is not enough: comments go only to pull requests \
             from \"feature\")",
            own.repo()
        ),
    );
    assert_eq!(own.writes(), vec![]);
    let repo_scope = World::with("scope-repo", |s| s.comment_scope = CommentScope::Repository).await;
    let w = &repo_scope;
    let a = w.curl("POST", &w.url("/issues/9/comments"), Some(&w.bearer()), Some(r#"{"body":"hi"}"#), &[]).await;
    assert_eq!(a.status, 201, "{}", a.body);
    let paths: Vec<(String, String)> = w.calls().into_iter().map(|c| (c.method, c.path)).collect();
    assert_eq!(paths, vec![("POST".to_owned(), format!("/repos/{}/issues/9/comments", w.repo()))]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_over_the_per_minute_rate_get_429_with_retry_after() {
    let w = World::with("rate", |s| s.limits.api_writes_per_minute = 2).await;
    for _ in 0..2 {
        let a = w.curl("POST", &w.url("/pulls/1/comments"), Some(&w.bearer()), Some(r#"{"body":"a"}"#), &[]).await;
        assert_eq!(a.status, 201);
    }
    let a = w.curl("POST", &w.url("/pulls/1/comments"), Some(&w.bearer()), Some(r#"{"body":"a"}"#), &[]).await;
    let secs: u64 = a.header("retry-after").and_then(|v| v.parse().ok()).expect("Retry-After");
    assert!((1..=30).contains(&secs), "one write every 30s: {secs}");
    a.refused(
        429,
        &format!(
            "sluice: session over its API write rate (2 writes per minute, [git.limits] api_writes_per_minute); \
             retry in {secs}s"
        ),
    );
    assert_eq!(w.writes().len(), 2, "the third write never went upstream");
    // Reads are not writes.
    assert_eq!(w.curl("GET", &w.url("/pulls/1"), Some(&w.bearer()), None, &[]).await.status, 200);
}

// ---------- a real client ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_urllib_lists_issues_reads_a_diff_and_posts_a_comment() {
    let w = World::new("python").await;
    let script = r#"
import json, os, urllib.request
base, repo, token = os.environ["SLUICE"], os.environ["REPO"], os.environ["TOKEN"]
def call(method, path, body=None, accept="application/vnd.github+json"):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"{base}/repos/{repo}{path}", data=data, method=method,
        headers={"Authorization": f"Bearer {token}", "Accept": accept, "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=20) as resp:
        return resp.status, resp.read().decode()
status, issues = call("GET", "/issues?state=open")
print(status, [i["number"] for i in json.loads(issues)])
status, diff = call("GET", "/pulls/1", accept="application/vnd.github.diff")
print(status, diff.splitlines()[0])
status, comment = call("POST", "/issues/1/comments", {"body": "from python"})
print(status, json.loads(comment)["id"])
"#;
    let mut cmd = tokio::process::Command::new("python3");
    cmd.args(["-c", script])
        .env("SLUICE", format!("http://{}/api", w.sluice))
        .env("REPO", w.repo())
        .env("TOKEN", w.token())
        .kill_on_drop(true);
    for var in ["http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy"] {
        cmd.env_remove(var);
    }
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output()).await.expect("python timed out").unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_no_canary("python output", &stdout);
    assert_eq!(
        (out.status.success(), stdout.as_ref()),
        (true, "200 [9, 1]\n200 diff --git a/README b/README\n201 77\n"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let repo = w.repo();
    let paths: Vec<(String, String, Option<String>)> =
        w.calls().into_iter().map(|c| (c.method, c.path, c.query)).collect();
    assert_eq!(
        paths,
        vec![
            ("GET".into(), format!("/repos/{repo}/issues"), Some("state=open".into())),
            ("GET".into(), format!("/repos/{repo}/pulls/1"), None),
            ("GET".into(), format!("/repos/{repo}/pulls/1"), None),
            ("POST".into(), format!("/repos/{repo}/issues/1/comments"), None),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_log_allow_ips_the_address_guard_keeps_log_dials_off_loopback() {
    let w = World::with("log-guard", |s| s.log_allow_ips.clear()).await;
    let a = w.curl("GET", &w.url("/actions/jobs/10/logs"), Some(&w.bearer()), None, &[]).await;
    assert_eq!(a.status, 502, "{}", a.body);
    assert_eq!(a.header("x-sluice-decision"), Some("deny; reason=upstream_blocked_address"));
    let port = w.storage.addr.port();
    let message = a.json()["message"].as_str().unwrap_or_default().to_owned();
    assert!(
        message.starts_with(&format!(
            "sluice: cannot reach logs.storage.test:{port}: upstream \"logs.storage.test\" resolves to 127.0.0.1"
        )),
        "{message}"
    );
    assert!(!message.contains(SIGNATURE), "{message}");
    assert_eq!(w.storage.calls.lock().unwrap().len(), 0, "refused before any dial");
}
