//! What a write is about, checked upstream before the write is forwarded: the pull request must come
//! from the session's working branch of this repository, and a reply's review comment must belong to it.

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use http_body_util::Empty;

use super::rules::{check_comment, check_comment_of_pull, check_create, check_edit, check_pull_head, check_review};
use super::{API_TIMEOUT, Access, ApiRoute, Caller, api_timeout, upstream_failure};
use crate::config::CommentScope;
use crate::git::GitProxy;
use crate::git::body::read_limited;
use crate::git::upstream::bearer_auth;
use crate::refusal::{Fault, Refusal};

/// Longest pull-request or comment document read when checking a write's target.
const MAX_LOOKUP: usize = 8 << 20;

impl GitProxy {
    /// The write's body by its rules, then its target upstream.
    pub(super) async fn check_write(
        &self,
        route: &ApiRoute,
        body: &[u8],
        client: &HeaderMap,
        caller: &Caller<'_>,
    ) -> Result<(), Refusal> {
        match route.access {
            Access::Read | Access::Log => Ok(()),
            Access::CreatePull => check_create(body, &route.owner, &route.repo, &caller.branch),
            Access::EditPull => {
                check_edit(body)?;
                self.check_own_pull(route, client, caller).await
            }
            Access::Review => {
                check_review(body)?;
                self.check_own_pull(route, client, caller).await
            }
            Access::ReviewComment => {
                let reply_to = check_comment(body)?;
                self.check_own_pull(route, client, caller).await?;
                match reply_to {
                    Some(id) => self.check_review_comment(route, id, client, caller).await,
                    None => Ok(()),
                }
            }
            Access::Reply => {
                let id = route.second.unwrap_or_default();
                if let Some(other) = check_comment(body)?.filter(|n| *n != id) {
                    return Err(Refusal::new(
                        StatusCode::BAD_REQUEST,
                        "api_body_field_value",
                        Fault::Client,
                        format!("\"in_reply_to\" {other} disagrees with comment {id} in the path"),
                    ));
                }
                self.check_own_pull(route, client, caller).await?;
                self.check_review_comment(route, id, client, caller).await
            }
            Access::IssueComment => {
                check_comment(body)?;
                match self.api.comment_scope {
                    CommentScope::OwnPull => self.check_own_pull(route, client, caller).await,
                    // The path names this repository; GitHub refuses a number it does not have.
                    CommentScope::Repository => Ok(()),
                }
            }
        }
    }

    /// Looks the pull request up upstream and checks its head is the working branch of this repository.
    async fn check_own_pull(&self, route: &ApiRoute, client: &HeaderMap, caller: &Caller<'_>) -> Result<(), Refusal> {
        let number = route.number.unwrap_or_default();
        let repo = &caller.repo;
        let what = format!("pull request #{number}");
        let doc = self.look_up(&route.pull_path(), &what, client, caller).await?.ok_or_else(|| {
            let mut message = format!("{repo} has no pull request #{number}");
            if route.access == Access::IssueComment {
                message.push_str(&format!(
                    " (an issue number is not enough: comments go only to pull requests from {:?})",
                    caller.branch
                ));
            }
            Refusal::new(StatusCode::NOT_FOUND, "api_no_such_pull", Fault::Client, message)
        })?;
        check_pull_head(&doc, repo, number, &caller.branch)
    }

    /// Looks the review comment up upstream and checks it belongs to the route's pull request.
    async fn check_review_comment(
        &self,
        route: &ApiRoute,
        id: u64,
        client: &HeaderMap,
        caller: &Caller<'_>,
    ) -> Result<(), Refusal> {
        let number = route.number.unwrap_or_default();
        let what = format!("review comment {id}");
        let doc = self.look_up(&route.review_comment_path(id), &what, client, caller).await?.ok_or_else(|| {
            Refusal::new(
                StatusCode::NOT_FOUND,
                "api_no_such_review_comment",
                Fault::Client,
                format!("{} has no review comment {id}", caller.repo),
            )
        })?;
        check_comment_of_pull(&doc, &caller.repo, number, id)
    }

    /// `GET path` upstream with the real token: the document, `None` for a `404`.
    async fn look_up(
        &self,
        path: &str,
        what: &str,
        client: &HeaderMap,
        caller: &Caller<'_>,
    ) -> Result<Option<Bytes>, Refusal> {
        let mut headers = HeaderMap::new();
        let agent = client.get(header::USER_AGENT).cloned().unwrap_or(HeaderValue::from_static("sluice"));
        headers.insert(header::USER_AGENT, agent);
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/vnd.github+json"));
        let upstream = &self.api.upstream;
        let sent = upstream.send(Method::GET, path, headers, Some(bearer_auth(caller.token)), Empty::<Bytes>::new());
        let resp = tokio::time::timeout(API_TIMEOUT, sent)
            .await
            .map_err(|_| api_timeout(format!("looking up {what}")))?
            .map_err(|e| upstream_failure(e, caller.token))?;
        match resp.status() {
            s if s.is_success() => {}
            StatusCode::NOT_FOUND => return Ok(None),
            s => {
                return Err(Refusal::bad_upstream(format!(
                    "{} answered {s} when sluice looked up {what} of {}",
                    upstream.authority(),
                    caller.repo
                )));
            }
        }
        read_limited(resp.into_body(), MAX_LOOKUP, API_TIMEOUT)
            .await
            .map(Some)
            .map_err(|_| Refusal::bad_upstream(format!("cannot read {what} of {} from the upstream", caller.repo)))
    }
}
