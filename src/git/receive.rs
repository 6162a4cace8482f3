//! A push (`POST …/git-receive-pack`): its command list read and judged before a byte goes upstream, then
//! the original bytes forwarded with the real token, or sluice's own report-status answer.

use http::{HeaderMap, Response, header};
use hyper::body::Incoming;

use super::body::{ForwardBody, drain};
use super::command_list::{self, ListError};
use super::push::{self, Verdict};
use super::route::{Action, Service};
use super::{GitBody, GitError, GitProxy, Record};
use crate::credential::Secret;

impl GitProxy {
    /// A push whose credential failed: every ref gets `ng` with the reason, nothing goes upstream. A
    /// command list that cannot be read (malformed, or past the raw cap or the deadline) gets the same
    /// reason as one fatal error.
    pub(super) async fn refuse_whole_push(
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

    pub(super) async fn push(
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

pub(super) fn no_token_message(repo: &str) -> String {
    format!(
        "sluice: no upstream credential is configured for {repo}, so pushes are refused \
         (clone and fetch of public repositories still work); the operator sets token_env, token_file or [git.tokens]"
    )
}
