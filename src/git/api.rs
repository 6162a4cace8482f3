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

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Incoming};
use serde_json::Value;

use super::scrub::{ScrubbedBody, Scrubber};
use super::upstream::{self, Upstream, bearer_auth, scrub};
use super::{BoxError, GitBody, GitError, GitProxy, Record, full};
use crate::credential::{Secret, valid_session_id};

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

const ALLOWED: &str = "allowed: GET /api/repos/OWNER/REPO, GET …/pulls, GET …/pulls/N, GET …/pulls/N/files, \
     GET …/pulls/N/comments, GET …/issues/N/comments, POST …/pulls, PATCH …/pulls/N, POST …/pulls/N/comments, \
     POST …/issues/N/comments";

/// What a request does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    GetRepo,
    ListPulls,
    GetPull,
    ListPullFiles,
    ListPullComments,
    ListIssueComments,
    CreatePull,
    EditPull,
    CommentPull,
    CommentIssue,
}

/// Which check a request passes before it is forwarded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Reads of the bound repository.
    Read,
    /// Opening a pull request: its `head` must be the working branch.
    Create,
    /// Writes to one pull request: it must be one whose head is the working branch.
    OwnPull,
}

impl Op {
    pub fn access(self) -> Access {
        match self {
            Op::GetRepo
            | Op::ListPulls
            | Op::GetPull
            | Op::ListPullFiles
            | Op::ListPullComments
            | Op::ListIssueComments => Access::Read,
            Op::CreatePull => Access::Create,
            Op::EditPull | Op::CommentPull | Op::CommentIssue => Access::OwnPull,
        }
    }

    /// For the log line.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::GetRepo => "api-get-repo",
            Op::ListPulls => "api-list-pulls",
            Op::GetPull => "api-get-pull",
            Op::ListPullFiles => "api-list-pull-files",
            Op::ListPullComments => "api-list-pull-comments",
            Op::ListIssueComments => "api-list-issue-comments",
            Op::CreatePull => "api-create-pull",
            Op::EditPull => "api-edit-pull",
            Op::CommentPull => "api-comment-pull",
            Op::CommentIssue => "api-comment-issue",
        }
    }
}

/// One path segment of a route below `repos/OWNER/REPO`.
#[derive(Clone, Copy, Debug)]
enum Seg {
    Lit(&'static str),
    /// A pull request or issue number.
    Number,
}

use Seg::{Lit, Number};

/// The whole slice sluice forwards; everything else is refused.
static ROUTES: [(Method, &[Seg], Op); 10] = [
    (Method::GET, &[], Op::GetRepo),
    (Method::GET, &[Lit("pulls")], Op::ListPulls),
    (Method::GET, &[Lit("pulls"), Number], Op::GetPull),
    (Method::GET, &[Lit("pulls"), Number, Lit("files")], Op::ListPullFiles),
    (Method::GET, &[Lit("pulls"), Number, Lit("comments")], Op::ListPullComments),
    (Method::GET, &[Lit("issues"), Number, Lit("comments")], Op::ListIssueComments),
    (Method::POST, &[Lit("pulls")], Op::CreatePull),
    (Method::PATCH, &[Lit("pulls"), Number], Op::EditPull),
    (Method::POST, &[Lit("pulls"), Number, Lit("comments")], Op::CommentPull),
    (Method::POST, &[Lit("issues"), Number, Lit("comments")], Op::CommentIssue),
];

/// A request in the slice: which repository (as the client spelled it), what, on which number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiRoute {
    pub owner: String,
    pub repo: String,
    pub op: Op,
    pub number: Option<u64>,
    /// The client's query, forwarded on reads only.
    pub query: Option<String>,
}

impl ApiRoute {
    pub fn full_name(&self) -> String {
        format!("{}/{}", self.owner, self.repo)
    }

    /// The path upstream, below the API base and without the leading `/`, rebuilt from the parsed parts.
    pub fn upstream_path(&self) -> String {
        let base = format!("repos/{}/{}", self.owner, self.repo);
        let n = self.number.unwrap_or_default();
        let path = match self.op {
            Op::GetRepo => base,
            Op::ListPulls | Op::CreatePull => format!("{base}/pulls"),
            Op::GetPull | Op::EditPull => format!("{base}/pulls/{n}"),
            Op::ListPullFiles => format!("{base}/pulls/{n}/files"),
            Op::ListPullComments | Op::CommentPull => format!("{base}/pulls/{n}/comments"),
            Op::ListIssueComments | Op::CommentIssue => format!("{base}/issues/{n}/comments"),
        };
        match (&self.query, self.op.access()) {
            (Some(q), Access::Read) if !q.is_empty() => format!("{path}?{q}"),
            _ => path,
        }
    }

    /// `GET …/pulls/N` for the pull request a write is about.
    fn lookup_path(&self) -> String {
        format!("repos/{}/{}/pulls/{}", self.owner, self.repo, self.number.unwrap_or_default())
    }
}

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

/// GitHub owner and repository names: letters, digits, `-`, `_`, `.` (but not `.` or `..` alone).
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 100
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn number(seg: &str) -> Option<u64> {
    if seg.is_empty() || seg.len() > 12 || !seg.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    seg.parse().ok().filter(|n| *n > 0)
}

/// Matches `METHOD /api/…` against the route table. The path must be canonical (no `%` escapes, no empty,
/// `.` or `..` segments): the upstream path is rebuilt from the parsed parts, never copied.
pub fn parse(method: &Method, path: &str, query: Option<&str>) -> Result<ApiRoute, Refusal> {
    // `/api/v3/` is where GitHub Enterprise serves REST, and where `gh` looks when GH_HOST is not github.com.
    let rest = path.strip_prefix("/api/v3/").or_else(|| path.strip_prefix("/api/")).unwrap_or_default();
    let segs: Vec<&str> = rest.strip_suffix('/').unwrap_or(rest).split('/').collect();
    if path.contains('%') || segs.iter().any(|s| s.is_empty() || *s == "." || *s == "..") {
        return Err(Refusal::forbidden(format!(
            "sluice: {path:?} is not a canonical API path; spell it /api/repos/OWNER/REPO/… without %-escapes, \
             empty, \".\" or \"..\" segments"
        )));
    }
    let not_in_slice = |what: String| Refusal::forbidden(format!("sluice: {what}; {ALLOWED}"));
    let (owner, repo, rest) = match segs.as_slice() {
        ["graphql", ..] => {
            return Err(not_in_slice(format!(
                "{method} {path:?}: GraphQL is not forwarded (one query can reach any repository); \
                 use the REST routes"
            )));
        }
        ["repos", owner, repo, rest @ ..] if valid_name(owner) && valid_name(repo) => (*owner, *repo, rest),
        _ => {
            return Err(not_in_slice(format!(
                "{method} {path:?} is outside the repository-scoped API slice sluice forwards"
            )));
        }
    };
    if matches!(rest, ["pulls", _, "merge"]) {
        return Err(not_in_slice(format!(
            "{method} {path:?}: merging pull requests is not allowed through sluice; a person merges"
        )));
    }
    for (m, pattern, op) in &ROUTES {
        if m != method || pattern.len() != rest.len() {
            continue;
        }
        let mut n = None;
        let matched = pattern.iter().zip(rest).all(|(p, s)| match p {
            Lit(lit) => lit == s,
            Number => {
                n = number(s);
                n.is_some()
            }
        });
        if matched {
            return Ok(ApiRoute {
                owner: owner.to_owned(),
                repo: repo.to_owned(),
                op: *op,
                number: n,
                query: query.map(str::to_owned),
            });
        }
    }
    Err(not_in_slice(format!("{method} {path:?} is not in the pull-request slice sluice forwards")))
}

fn json_object(body: &[u8], example: &str) -> Result<serde_json::Map<String, Value>, Refusal> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(Refusal::bad_request(format!("sluice: the request body must be a JSON object such as {example}"))),
        Err(e) => Err(Refusal::bad_request(format!(
            "sluice: the request body is not valid JSON ({e}); send a JSON object such as {example}"
        ))),
    }
}

fn string_field<'a>(
    map: &'a serde_json::Map<String, Value>,
    key: &str,
    example: &str,
) -> Result<Option<&'a str>, Refusal> {
    match map.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => {
            Err(Refusal::bad_request(format!("sluice: {key:?} must be a string such as {example}, not {other}")))
        }
    }
}

fn valid_branch(name: &str) -> bool {
    super::push::check_ref_name(&format!("refs/heads/{name}")).is_ok()
}

/// Not `issue`: it turns an existing issue, which may be anyone's, into this pull request.
const CREATE_FIELDS: [&str; 7] = ["title", "body", "head", "head_repo", "base", "draft", "maintainer_can_modify"];

/// `POST …/pulls`: `head` must be the working branch (`BRANCH` or `OWNER:BRANCH` with the repository's
/// owner), `head_repo` (when given) this repository, and `base` a plain branch name of this repository.
pub fn check_create(body: &[u8], owner: &str, repo: &str, branch: &str) -> Result<(), Refusal> {
    let example = format!(r#"{{"title":"…","head":"{branch}","base":"main"}}"#);
    let map = json_object(body, &example)?;
    if let Some(key) = map.keys().find(|k| !CREATE_FIELDS.contains(&k.as_str())) {
        return Err(Refusal::forbidden(format!(
            "sluice: field {key:?} is not allowed when opening a pull request; allowed: {}",
            CREATE_FIELDS.join(", ")
        )));
    }
    let head = string_field(&map, "head", &format!("{branch:?}"))?
        .ok_or_else(|| Refusal::bad_request(format!("sluice: \"head\" is missing; send {example}")))?;
    let head_branch = match head.split_once(':') {
        Some((o, b)) if o.eq_ignore_ascii_case(owner) => b,
        Some(_) => head,
        None => head,
    };
    if head_branch != branch {
        return Err(Refusal::forbidden(format!(
            "sluice: head {head:?} is not this session's working branch; open pull requests from {branch:?} \
             (or \"{owner}:{branch}\")"
        )));
    }
    if let Some(head_repo) = string_field(&map, "head_repo", &format!("\"{owner}/{repo}\""))?
        && !head_repo.eq_ignore_ascii_case(&format!("{owner}/{repo}"))
    {
        return Err(Refusal::forbidden(format!(
            "sluice: head_repo {head_repo:?} is not {owner}/{repo}; pull requests come from the working branch \
             of this repository"
        )));
    }
    let base = string_field(&map, "base", "\"main\"")?
        .ok_or_else(|| Refusal::bad_request(format!("sluice: \"base\" is missing; send {example}")))?;
    if base.contains(':') || !valid_branch(base) {
        return Err(Refusal::forbidden(format!(
            "sluice: base {base:?} must be a branch of {owner}/{repo} given as a plain branch name, such as \"main\""
        )));
    }
    Ok(())
}

const EDIT_FIELDS: [&str; 3] = ["title", "body", "state"];

/// `PATCH …/pulls/N`: only the title, the body and the state (`open` or `closed`) may change.
pub fn check_edit(body: &[u8]) -> Result<(), Refusal> {
    let example = r#"{"title":"…","body":"…","state":"closed"}"#;
    let map = json_object(body, example)?;
    if let Some(key) = map.keys().find(|k| !EDIT_FIELDS.contains(&k.as_str())) {
        let hint = if key == "base" { " (changing the base branch is not allowed through sluice)" } else { "" };
        return Err(Refusal::forbidden(format!(
            "sluice: field {key:?} may not be changed{hint}; allowed: title, body, state"
        )));
    }
    if let Some(state) = string_field(&map, "state", "\"open\"")?
        && state != "open"
        && state != "closed"
    {
        return Err(Refusal::bad_request(format!("sluice: state {state:?} is not \"open\" or \"closed\"")));
    }
    Ok(())
}

/// A comment: any JSON object (GitHub checks its fields).
pub fn check_comment(body: &[u8]) -> Result<(), Refusal> {
    json_object(body, r#"{"body":"…"}"#).map(drop)
}

/// Whether the pull request document (GitHub's `GET …/pulls/N`) has the working branch of this
/// repository as its head.
pub fn check_pull_head(pull: &[u8], full_name: &str, number: u64, branch: &str) -> Result<(), Refusal> {
    let doc: Value = serde_json::from_slice(pull).map_err(|e| Refusal {
        status: StatusCode::BAD_GATEWAY,
        message: format!("sluice: the upstream's pull request #{number} is not valid JSON ({e})"),
    })?;
    let head_ref = doc.pointer("/head/ref").and_then(Value::as_str);
    let head_repo = doc.pointer("/head/repo/full_name").and_then(Value::as_str);
    match (head_ref, head_repo) {
        (Some(r), Some(repo)) if r == branch && repo.eq_ignore_ascii_case(full_name) => Ok(()),
        _ => Err(Refusal::forbidden(format!(
            "sluice: pull request #{number} has head {}; this session may edit and comment only on pull \
             requests from {full_name}:{branch}",
            match (head_repo, head_ref) {
                (Some(repo), Some(r)) => format!("\"{repo}:{r}\""),
                (None, Some(r)) => format!("{r:?} of a deleted repository"),
                _ => "(unknown)".to_owned(),
            }
        ))),
    }
}

/// Where upstream URLs point and where the rewritten ones go.
#[derive(Clone, Debug)]
pub struct LinkMap<'a> {
    /// The configured API base, e.g. `https://api.github.com`.
    pub upstream: &'a str,
    /// Sluice's API base as the client reached it, e.g. `http://127.0.0.1:3129/api`.
    pub client: &'a str,
    /// The credential's repository, `OWNER/REPO`.
    pub repo: &'a str,
    /// Its numeric id upstream, when known: `/repositories/ID/…` URLs map only when it matches.
    pub repo_id: Option<u64>,
}

impl LinkMap<'_> {
    /// An upstream URL of the credential's repository, rewritten to sluice; `None` for anything else.
    /// `…/repos/OWNER/REPO/rest` keeps its form; `…/repositories/ID/rest` becomes `…/repos/OWNER/REPO/rest`.
    pub fn url(&self, url: &str) -> Option<String> {
        let rest = url.strip_prefix(self.upstream)?;
        let (path, query) = match rest.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (rest, None),
        };
        let tail = if let Some(after) = path.strip_prefix("/repos/") {
            let mut parts = after.splitn(3, '/');
            let (owner, repo) = (parts.next()?, parts.next()?);
            if !format!("{owner}/{repo}").eq_ignore_ascii_case(self.repo) {
                return None;
            }
            parts.next().map(|t| format!("/{t}")).unwrap_or_default()
        } else if let Some(after) = path.strip_prefix("/repositories/") {
            let (id, tail) = after.split_once('/').map_or((after, String::new()), |(i, t)| (i, format!("/{t}")));
            if self.repo_id.is_none() || id.parse::<u64>().ok() != self.repo_id {
                return None;
            }
            tail
        } else {
            return None;
        };
        if tail.contains("..") || tail.contains('%') || tail.contains("//") {
            return None;
        }
        let query = query.map(|q| format!("?{q}")).unwrap_or_default();
        Some(format!("{}/repos/{}{tail}{query}", self.client, self.repo))
    }

    /// A `Link` header with every URL rewritten; links that do not map are dropped, and `None` means
    /// none is left.
    pub fn link(&self, value: &str) -> Option<String> {
        let kept: Vec<String> = link_entries(value)
            .into_iter()
            .filter_map(|(url, params)| self.url(url).map(|u| format!("<{u}>{params}")))
            .collect();
        (!kept.is_empty()).then(|| kept.join(", "))
    }
}

/// `<url>; rel="next", <url>; rel="last"` → `[(url, "; rel=\"next\""), …]`. URLs are whatever lies between
/// `<` and `>`; an entry without them is skipped.
fn link_entries(value: &str) -> Vec<(&str, &str)> {
    let mut out = Vec::new();
    let mut rest = value;
    while let Some(start) = rest.find('<') {
        let Some(len) = rest[start + 1..].find('>') else { break };
        let url = &rest[start + 1..start + 1 + len];
        let after = &rest[start + 2 + len..];
        let end = after.find('<').unwrap_or(after.len());
        let params = after[..end].trim_end().trim_end_matches(',').trim_end();
        out.push((url, params));
        rest = &after[end..];
    }
    out
}

/// Whether any link uses the `/repositories/ID/…` form (then the repository's id is needed to map it).
pub fn needs_repo_id(value: &str, upstream: &str) -> bool {
    link_entries(value).iter().any(|(url, _)| url.starts_with(&format!("{upstream}/repositories/")))
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
    pub fn new(upstream: Upstream) -> Api {
        Api { upstream, repo_ids: Mutex::new(HashMap::new()) }
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
    let decoded = STANDARD.decode(rest).map_err(|_| malformed())?;
    let decoded = String::from_utf8(decoded).map_err(|_| malformed())?;
    let (user, password) = decoded.split_once(':').ok_or_else(malformed)?;
    if password.is_empty() {
        return Err(missing());
    }
    Ok((Some(user.to_owned()), Secret::new(password.to_owned())))
}

fn upstream_failure(e: upstream::UpstreamError, token: &Secret<String>) -> GitError {
    let status = match e {
        upstream::UpstreamError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::BAD_GATEWAY,
    };
    GitError::Api { status, message: format!("sluice: {}", scrub(&e.to_string(), Some(token))) }
}

/// Reads a body up to `limit` bytes; `Err(true)` when it is longer, `Err(false)` when it fails or stalls.
async fn read_limited<B>(mut body: B, limit: usize, idle: Duration) -> Result<Bytes, bool>
where
    B: Body<Data = Bytes> + Unpin,
{
    let mut buf = Vec::new();
    loop {
        match tokio::time::timeout(idle, body.frame()).await {
            Err(_) | Ok(Some(Err(_))) => return Err(false),
            Ok(None) => return Ok(buf.into()),
            Ok(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    if buf.len() + d.len() > limit {
                        return Err(true);
                    }
                    buf.extend_from_slice(d);
                }
            }
        }
    }
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

    fn route(op: Op, number: Option<u64>, query: Option<&str>) -> ApiRoute {
        ApiRoute { owner: "acme".into(), repo: "widgets".into(), op, number, query: query.map(Into::into) }
    }

    #[test]
    fn the_route_table_matches_the_slice() {
        let cases: &[(Method, &str, Option<&str>, ApiRoute, &str)] = &[
            (Method::GET, "/api/repos/acme/widgets", None, route(Op::GetRepo, None, None), "repos/acme/widgets"),
            (
                Method::GET,
                "/api/repos/acme/widgets/pulls",
                Some("state=all&page=2"),
                route(Op::ListPulls, None, Some("state=all&page=2")),
                "repos/acme/widgets/pulls?state=all&page=2",
            ),
            (
                Method::GET,
                "/api/repos/acme/widgets/pulls/7/",
                None,
                route(Op::GetPull, Some(7), None),
                "repos/acme/widgets/pulls/7",
            ),
            (
                Method::GET,
                "/api/repos/acme/widgets/pulls/7/files",
                None,
                route(Op::ListPullFiles, Some(7), None),
                "repos/acme/widgets/pulls/7/files",
            ),
            (
                Method::GET,
                "/api/repos/acme/widgets/pulls/7/comments",
                None,
                route(Op::ListPullComments, Some(7), None),
                "repos/acme/widgets/pulls/7/comments",
            ),
            (
                Method::GET,
                "/api/repos/acme/widgets/issues/7/comments",
                None,
                route(Op::ListIssueComments, Some(7), None),
                "repos/acme/widgets/issues/7/comments",
            ),
            (
                Method::POST,
                "/api/repos/acme/widgets/pulls",
                Some("x=1"),
                route(Op::CreatePull, None, Some("x=1")),
                "repos/acme/widgets/pulls",
            ),
            (
                Method::PATCH,
                "/api/repos/acme/widgets/pulls/7",
                None,
                route(Op::EditPull, Some(7), None),
                "repos/acme/widgets/pulls/7",
            ),
            (
                Method::POST,
                "/api/repos/acme/widgets/pulls/7/comments",
                None,
                route(Op::CommentPull, Some(7), None),
                "repos/acme/widgets/pulls/7/comments",
            ),
            (
                Method::POST,
                "/api/repos/acme/widgets/issues/7/comments",
                None,
                route(Op::CommentIssue, Some(7), None),
                "repos/acme/widgets/issues/7/comments",
            ),
        ];
        for (m, p, q, want, upstream) in cases {
            let got = parse(m, p, *q).unwrap_or_else(|e| panic!("{m} {p}: {}", e.message));
            assert_eq!(&got, want, "{m} {p}");
            assert_eq!(got.upstream_path(), *upstream, "{m} {p}");
            let v3 = p.replacen("/api/", "/api/v3/", 1);
            assert_eq!(parse(m, &v3, *q).as_ref(), Ok(want), "{m} {v3}");
        }
    }

    #[test]
    fn everything_else_is_refused_with_a_reason() {
        let refused = |m: Method, p: &str| {
            let r = parse(&m, p, None).unwrap_err();
            assert_eq!(r.status, StatusCode::FORBIDDEN, "{m} {p}");
            r.message
        };
        assert_eq!(
            refused(Method::PUT, "/api/repos/acme/widgets/pulls/7/merge"),
            format!(
                "sluice: PUT \"/api/repos/acme/widgets/pulls/7/merge\": merging pull requests is not allowed \
                 through sluice; a person merges; {ALLOWED}"
            )
        );
        assert_eq!(
            refused(Method::POST, "/api/graphql"),
            format!(
                "sluice: POST \"/api/graphql\": GraphQL is not forwarded (one query can reach any repository); \
                 use the REST routes; {ALLOWED}"
            )
        );
        assert_eq!(
            refused(Method::DELETE, "/api/repos/acme/widgets/git/refs/heads/main"),
            format!(
                "sluice: DELETE \"/api/repos/acme/widgets/git/refs/heads/main\" is not in the pull-request slice \
                 sluice forwards; {ALLOWED}"
            )
        );
        assert_eq!(
            refused(Method::GET, "/api/user"),
            format!("sluice: GET \"/api/user\" is outside the repository-scoped API slice sluice forwards; {ALLOWED}")
        );
        assert!(refused(Method::GET, "/api/repos/acme/widgets/%70ulls").contains("is not a canonical API path"));
        assert!(refused(Method::GET, "/api/repos/acme/other/../widgets/pulls").contains("is not a canonical"));
        assert!(refused(Method::GET, "/api/repos//acme/widgets").contains("is not a canonical"));
        for (m, p) in [
            (Method::DELETE, "/api/repos/acme/widgets"),
            (Method::PATCH, "/api/repos/acme/widgets"),
            (Method::POST, "/api/repos/acme/widgets/actions/workflows/ci.yml/dispatches"),
            (Method::GET, "/api/repos/acme/widgets/pulls/0"),
            (Method::GET, "/api/repos/acme/widgets/pulls/x"),
            (Method::GET, "/api/repos/acme/widgets/pulls/-1"),
            (Method::PUT, "/api/repos/acme/widgets/pulls/7"),
            (Method::GET, "/api/repos/acme/widgets/contents/README"),
            (Method::DELETE, "/api/repos/acme/widgets/issues/comments/5"),
        ] {
            assert!(refused(m.clone(), p).contains("is not in the pull-request slice"), "{m} {p}");
        }
    }

    #[test]
    fn create_needs_the_working_branch_and_a_plain_base() {
        let ok = |b: &str| check_create(b.as_bytes(), "acme", "widgets", "feature");
        assert_eq!(ok(r#"{"title":"t","head":"feature","base":"main"}"#), Ok(()));
        assert_eq!(ok(r#"{"title":"t","head":"ACME:feature","base":"release/1.0","draft":true}"#), Ok(()));
        assert_eq!(ok(r#"{"head":"feature","base":"main","head_repo":"acme/widgets"}"#), Ok(()));
        let refused = |b: &str| ok(b).unwrap_err();
        assert_eq!(
            refused(r#"{"head":"main","base":"feature"}"#),
            Refusal::forbidden(
                "sluice: head \"main\" is not this session's working branch; open pull requests from \"feature\" \
                 (or \"acme:feature\")"
                    .into()
            )
        );
        assert_eq!(
            refused(r#"{"head":"evil:feature","base":"main"}"#).message,
            "sluice: head \"evil:feature\" is not this session's working branch; open pull requests from \
             \"feature\" (or \"acme:feature\")"
        );
        assert_eq!(
            refused(r#"{"head":"feature","base":"other:main"}"#),
            Refusal::forbidden(
                "sluice: base \"other:main\" must be a branch of acme/widgets given as a plain branch name, such as \
                 \"main\""
                    .into()
            )
        );
        assert_eq!(refused(r#"{"head":"feature","base":"a..b"}"#).status, StatusCode::FORBIDDEN);
        assert_eq!(
            refused(r#"{"head":"feature","base":"main","head_repo":"evil/widgets"}"#).message,
            "sluice: head_repo \"evil/widgets\" is not acme/widgets; pull requests come from the working branch of \
             this repository"
        );
        assert_eq!(
            refused(r#"{"head":"feature","base":"main","issue":12}"#).message,
            "sluice: field \"issue\" is not allowed when opening a pull request; allowed: title, body, head, \
             head_repo, base, draft, maintainer_can_modify"
        );
        assert_eq!(
            refused(r#"{"base":"main"}"#),
            Refusal::bad_request(
                "sluice: \"head\" is missing; send {\"title\":\"…\",\"head\":\"feature\",\"base\":\"main\"}".into()
            )
        );
        assert_eq!(
            refused(r#"{"head":7,"base":"main"}"#).message,
            "sluice: \"head\" must be a string such as \"feature\", not 7"
        );
        assert_eq!(refused("[1]").status, StatusCode::BAD_REQUEST);
        assert!(refused("{").message.starts_with("sluice: the request body is not valid JSON ("));
    }

    #[test]
    fn edits_touch_title_body_and_state_only() {
        assert_eq!(check_edit(br#"{"title":"t","body":"b","state":"closed"}"#), Ok(()));
        assert_eq!(
            check_edit(br#"{"base":"main"}"#).unwrap_err(),
            Refusal::forbidden(
                "sluice: field \"base\" may not be changed (changing the base branch is not allowed through \
                 sluice); allowed: title, body, state"
                    .into()
            )
        );
        assert_eq!(
            check_edit(br#"{"maintainer_can_modify":false}"#).unwrap_err().message,
            "sluice: field \"maintainer_can_modify\" may not be changed; allowed: title, body, state"
        );
        assert_eq!(
            check_edit(br#"{"state":"merged"}"#).unwrap_err(),
            Refusal::bad_request("sluice: state \"merged\" is not \"open\" or \"closed\"".into())
        );
        assert_eq!(check_comment(br#"{"body":"hi"}"#), Ok(()));
        assert_eq!(check_comment(b"\"hi\"").unwrap_err().status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn own_pull_means_head_ref_and_head_repo() {
        let pr =
            |r: &str, repo: &str| format!(r#"{{"number":3,"head":{{"ref":"{r}","repo":{{"full_name":"{repo}"}}}}}}"#);
        assert_eq!(check_pull_head(pr("feature", "Acme/Widgets").as_bytes(), "acme/widgets", 3, "feature"), Ok(()));
        assert_eq!(
            check_pull_head(pr("other", "acme/widgets").as_bytes(), "acme/widgets", 3, "feature").unwrap_err(),
            Refusal::forbidden(
                "sluice: pull request #3 has head \"acme/widgets:other\"; this session may edit and comment only on \
                 pull requests from acme/widgets:feature"
                    .into()
            )
        );
        assert_eq!(
            check_pull_head(pr("feature", "evil/widgets").as_bytes(), "acme/widgets", 3, "feature")
                .unwrap_err()
                .message,
            "sluice: pull request #3 has head \"evil/widgets:feature\"; this session may edit and comment only on \
             pull requests from acme/widgets:feature"
        );
        let deleted = br#"{"head":{"ref":"feature","repo":null}}"#;
        assert_eq!(
            check_pull_head(deleted, "acme/widgets", 3, "feature").unwrap_err().message,
            "sluice: pull request #3 has head \"feature\" of a deleted repository; this session may edit and \
             comment only on pull requests from acme/widgets:feature"
        );
        assert_eq!(
            check_pull_head(b"<html>", "acme/widgets", 3, "feature").unwrap_err().status,
            StatusCode::BAD_GATEWAY
        );
    }

    #[test]
    fn links_point_back_at_sluice() {
        let map = LinkMap {
            upstream: "https://api.github.com",
            client: "http://127.0.0.1:3129/api",
            repo: "acme/widgets",
            repo_id: Some(123),
        };
        assert_eq!(
            map.link(
                "<https://api.github.com/repositories/123/pulls?page=2>; rel=\"next\", \
                 <https://api.github.com/repos/Acme/Widgets/pulls?page=5>; rel=\"last\""
            )
            .as_deref(),
            Some(
                "<http://127.0.0.1:3129/api/repos/acme/widgets/pulls?page=2>; rel=\"next\", \
                 <http://127.0.0.1:3129/api/repos/acme/widgets/pulls?page=5>; rel=\"last\""
            )
        );
        // Another repository, another id, another host, a climbing path: dropped, the rest kept.
        assert_eq!(
            map.link(
                "<https://api.github.com/repositories/999/pulls?page=2>; rel=\"next\", \
                 <https://api.github.com/repos/acme/gears/pulls?page=2>; rel=\"next\", \
                 <https://evil.example/repos/acme/widgets/pulls?page=2>; rel=\"next\", \
                 <https://api.github.com/repos/acme/widgets/../../user>; rel=\"x\", \
                 <https://api.github.com/repos/acme/widgets/pulls?page=1>; rel=\"first\""
            )
            .as_deref(),
            Some("<http://127.0.0.1:3129/api/repos/acme/widgets/pulls?page=1>; rel=\"first\"")
        );
        assert_eq!(map.link("<https://api.github.com/user/repos?page=2>; rel=\"next\""), None);
        assert_eq!(map.link("garbage"), None);
        let unknown_id = LinkMap { repo_id: None, ..map.clone() };
        assert_eq!(unknown_id.link("<https://api.github.com/repositories/123/pulls?page=2>; rel=\"next\""), None);
        assert_eq!(
            map.url("https://api.github.com/repos/acme/widgets/pulls/5").as_deref(),
            Some("http://127.0.0.1:3129/api/repos/acme/widgets/pulls/5")
        );
        assert_eq!(
            map.url("https://api.github.com/repos/acme/widgets").as_deref(),
            Some("http://127.0.0.1:3129/api/repos/acme/widgets")
        );
        assert_eq!(map.url("https://api.github.com.evil/repos/acme/widgets"), None);
        assert!(needs_repo_id("<https://api.github.com/repositories/1/pulls>; rel=\"next\"", "https://api.github.com"));
        assert!(!needs_repo_id("<https://api.github.com/repos/a/b/pulls>; rel=\"next\"", "https://api.github.com"));
    }

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
