//! The git renderers: a [`Refusal`] becomes the answer a git client shows its user. Which shape depends on
//! where the request failed, the words and the code on the refusal; the renderer adds `sluice: `.
//!
//! - text with the refusal's status, for discovery and fetch (git prints the body of a 4xx or 5xx);
//! - a receive-pack result with status `200` for a push (git hides the body of a refused push's 4xx, but
//!   prints a fatal pkt-line `ERR` or side-band message, and a report-status `ng` line per ref);
//! - GitHub-shaped JSON for `/api/`, so `gh` and other tools print it.

use http::{HeaderValue, Response, header};

use super::push::{self, PushRequest};
use super::{GitBody, api, full};
use crate::refusal::{Challenge, Fault, Refusal};

/// Why a git-listener request is not forwarded, with the shape its answer takes.
#[derive(Debug)]
pub enum GitError {
    /// Answered as text with the refusal's status.
    Text(Refusal),
    /// Answered as a receive-pack result.
    Push { refusal: Refusal, answer: PushAnswer },
    /// An `/api/` request refused or failed: GitHub-shaped JSON (`api::respond`).
    GitHub(Refusal),
}

/// What a refused push's receive-pack result holds.
#[derive(Debug)]
pub enum PushAnswer {
    /// One fatal error, on the side band the client asked for (or as a pkt-line `ERR`).
    Fatal { side_band: Option<usize> },
    /// The refusal as a notice, and a report-status with one `ng` per ref, each with its reason;
    /// `detail` is what the record says (the first ref refused and why), else the refusal's message.
    Report { req: Box<PushRequest>, reasons: Vec<String>, detail: Option<String> },
    /// A push that updates no ref: an empty result.
    Empty,
}

impl From<Refusal> for GitError {
    fn from(refusal: Refusal) -> GitError {
        GitError::Text(refusal)
    }
}

impl GitError {
    /// A refused push answered with one fatal error.
    pub fn push_fatal(refusal: Refusal, side_band: Option<usize>) -> GitError {
        GitError::Push { refusal, answer: PushAnswer::Fatal { side_band } }
    }

    /// The refusal the answer renders.
    pub fn refusal(&self) -> &Refusal {
        match self {
            GitError::Text(r) | GitError::Push { refusal: r, .. } | GitError::GitHub(r) => r,
        }
    }
}

/// What the request's record says of a refusal: its verdict, stable code, and sentence.
pub struct Outcome {
    pub verdict: &'static str,
    pub code: &'static str,
    pub detail: Option<String>,
    pub hint: Option<String>,
    /// Whether a per-session limit refused it.
    pub limit: bool,
}

/// The one mapping from a refusal or failure to an HTTP answer, and what the record says of it.
pub fn respond(err: GitError) -> (Response<GitBody>, Outcome) {
    match err {
        GitError::Text(refusal) => {
            let mut resp = Response::new(full(text_body(&refusal)));
            *resp.status_mut() = refusal.status;
            let headers = resp.headers_mut();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
            decorate(headers, &refusal);
            (resp, outcome(refusal))
        }
        GitError::Push { refusal, answer } => {
            let notice = format!("sluice: {}", refusal.message);
            let body = match &answer {
                PushAnswer::Fatal { side_band } => push::fatal(&notice, *side_band),
                PushAnswer::Report { req, reasons, .. } => push::refusal(req, &notice, reasons),
                PushAnswer::Empty => Vec::new(),
            };
            let mut resp = Response::new(full(body));
            let headers = resp.headers_mut();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-git-receive-pack-result"));
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            let mut outcome = outcome(refusal);
            if let PushAnswer::Report { detail: Some(detail), .. } = answer {
                outcome.detail = Some(detail);
            }
            (resp, outcome)
        }
        GitError::GitHub(refusal) => (api::respond::render(&refusal), outcome(refusal)),
    }
}

/// `sluice: MESSAGE` and, when there is one, the hint on its own line.
pub fn text_body(refusal: &Refusal) -> String {
    match &refusal.hint {
        Some(hint) => format!("sluice: {}\nhint: {hint}\n", refusal.message),
        None => format!("sluice: {}\n", refusal.message),
    }
}

/// The headers a refusal asks for whatever the shape: a challenge, `Retry-After`, `Connection: close`.
fn decorate(headers: &mut http::HeaderMap, refusal: &Refusal) {
    if refusal.challenge == Some(Challenge::Origin) {
        headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"sluice-git\""));
    }
    if let Some(secs) = refusal.retry_after {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    if refusal.close {
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
}

fn outcome(refusal: Refusal) -> Outcome {
    let verdict = match refusal.fault {
        Fault::Upstream | Fault::Internal => "error",
        Fault::Client | Fault::Policy => "deny",
    };
    let limit = refusal.is_limit();
    Outcome { verdict, code: refusal.code, detail: Some(refusal.message), hint: refusal.hint, limit }
}

/// The `503` a connection over `[git] max_connections` gets before it is closed, as bytes (hyper does not
/// serve it).
pub fn overload_answer(max: usize) -> Vec<u8> {
    let refusal = Refusal::overloaded("git proxy", max);
    let body = text_body(&refusal);
    let date = httpdate::fmt_http_date(std::time::SystemTime::now());
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\nx-sluice-decision: deny; reason={}\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\ndate: {date}\r\n\r\n{body}",
        refusal.code,
        body.len()
    )
    .into_bytes()
}
