//! A push (`POST …/git-receive-pack`): its command list read and judged before a byte goes upstream, then
//! the original bytes forwarded with the real token, or sluice's own report-status answer.

use http::{HeaderMap, Response, StatusCode, header};
use hyper::body::Incoming;

use super::body::{ForwardBody, drain};
use super::command_list::{self, ListError};
use super::push::{self, Verdict};
use super::route::{Action, Service};
use super::{GitBody, GitError, GitProxy, PushAnswer, Record};
use crate::credential::Secret;
use crate::refusal::{Fault, Refusal};

impl GitProxy {
    /// A push whose credential failed: every ref gets `ng` with the reason, nothing goes upstream. A
    /// command list that cannot be read (malformed, or past the raw cap or the deadline) gets the same
    /// reason as one fatal error.
    pub(super) async fn refuse_whole_push(
        &self,
        headers: &HeaderMap,
        mut body: Incoming,
        refusal: Refusal,
        record: &mut Record,
    ) -> GitError {
        let gzip = match content_encoding(headers) {
            Ok(gzip) => gzip,
            Err(refused) => return GitError::push_fatal(refused, None),
        };
        let list = match command_list::read(&mut body, gzip, self.body_timeout, self.list_deadline).await {
            Ok(list) => list,
            Err(unread) => {
                linger(body, &unread.error);
                return GitError::push_fatal(refusal, unread.side_band);
            }
        };
        drain(&mut body).await;
        match list.parsed {
            Ok(req) if req.updates.is_empty() => GitError::Push { refusal, answer: PushAnswer::Empty },
            Ok(req) => {
                record.refs = req.updates.len();
                let reasons = vec![refusal.message.clone(); req.updates.len()];
                let answer = PushAnswer::Report { req: Box::new(req), reasons, detail: None };
                GitError::Push { refusal, answer }
            }
            Err(_) => GitError::push_fatal(refusal, list.side_band),
        }
    }

    pub(super) async fn push(
        &self,
        parts: &http::request::Parts,
        mut body: Incoming,
        repo: &str,
        branch: &str,
        token: Option<&Secret<String>>,
        record: &mut Record,
    ) -> Result<Response<GitBody>, GitError> {
        let gzip = content_encoding(&parts.headers).map_err(|refused| GitError::push_fatal(refused, None))?;
        let list = match command_list::read(&mut body, gzip, self.body_timeout, self.list_deadline).await {
            Ok(list) => list,
            Err(unread) => {
                linger(body, &unread.error);
                let (code, message) = (unread.error.code(), unread.error.message());
                return Err(match unread.error {
                    ListError::Stalled { .. } | ListError::Body(_) => {
                        Refusal::new(StatusCode::BAD_REQUEST, code, Fault::Client, message).into()
                    }
                    _ => GitError::push_fatal(push_refusal(code, message), unread.side_band),
                });
            }
        };
        let req = match list.parsed {
            Ok(req) => req,
            Err(e) => {
                drain(&mut body).await;
                return Err(GitError::push_fatal(push_refusal("bad_push", e.to_string()), list.side_band));
            }
        };
        record.refs = req.updates.len();
        if token.is_none() && !req.updates.is_empty() {
            drain(&mut body).await;
            let refusal = no_token(repo);
            let reasons = vec![refusal.message.clone(); req.updates.len()];
            let detail = Some(format!("{}: {}", req.updates[0].name, refusal.message));
            let answer = PushAnswer::Report { req: Box::new(req), reasons, detail };
            return Err(GitError::Push { refusal, answer });
        }
        match push::review(&req, branch) {
            Verdict::Allow => {
                let body = ForwardBody::new(list.raw.into(), body, record.bytes_up.clone(), self.body_timeout);
                self.forward(&parts.headers, repo, Action::Rpc(Service::ReceivePack), token, body).await
            }
            Verdict::Refuse(reasons) => {
                drain(&mut body).await;
                let refusal = push_refusal(
                    "branch_not_allowed",
                    format!("this session may push only to refs/heads/{branch}; nothing was sent upstream"),
                );
                let detail = req
                    .updates
                    .iter()
                    .zip(&reasons)
                    .find(|(u, _)| push::judge(u, branch).is_err())
                    .map(|(u, r)| format!("{}: {r}", u.name));
                let answer = PushAnswer::Report { req: Box::new(req), reasons, detail };
                Err(GitError::Push { refusal, answer })
            }
        }
    }
}

/// A push refused for what the client sent (the status is not sent: a refused push is answered `200`).
fn push_refusal(code: &'static str, message: String) -> Refusal {
    Refusal::new(StatusCode::FORBIDDEN, code, Fault::Client, message)
}

/// After a push refused before its command list was complete, what the client still sends is read and
/// dropped in the background, within the drain limits, so the answer goes out at once and the client reads
/// it instead of a reset connection. A stalled or broken body is not waited for.
fn linger(mut body: Incoming, why: &ListError) {
    if !matches!(why, ListError::Stalled { .. } | ListError::Body(_)) {
        tokio::spawn(async move { drain(&mut body).await });
    }
}

/// `Ok(true)` for a gzip body, `Ok(false)` for identity; other encodings cannot be inspected.
fn content_encoding(headers: &HeaderMap) -> Result<bool, Refusal> {
    let Some(value) = headers.get(header::CONTENT_ENCODING) else { return Ok(false) };
    match value.to_str().map(|v| v.trim().to_ascii_lowercase()) {
        Ok(v) if v == "gzip" || v == "x-gzip" => Ok(true),
        Ok(v) if v.is_empty() || v == "identity" => Ok(false),
        _ => {
            let message =
                format!("cannot inspect a push body with Content-Encoding {value:?}; send it plain or gzip-encoded");
            Err(push_refusal("unsupported_encoding", message))
        }
    }
}

/// Pushes need the real token: without one for the repository they are refused (reads of public
/// repositories still work).
pub(super) fn no_token(repo: &str) -> Refusal {
    Refusal::new(
        StatusCode::FORBIDDEN,
        "no_upstream_token",
        Fault::Policy,
        format!(
            "no upstream credential is configured for {repo}, so pushes are refused (clone and fetch of public \
             repositories still work); the operator sets token_env, token_file or [git.tokens]"
        ),
    )
}
