//! The write rules of the `/api/` slice: a pull request is opened only from the working branch, edited
//! only in its title, body and state, reviewed only with comments, and commented on only when its head
//! is the working branch (a reply, only to a review comment of that pull request).

use http::StatusCode;
use serde_json::Value;

use crate::refusal::{Fault, Refusal};

fn forbidden(code: &'static str, message: String) -> Refusal {
    Refusal::new(StatusCode::FORBIDDEN, code, Fault::Client, message)
}

fn bad_request(code: &'static str, message: String) -> Refusal {
    Refusal::new(StatusCode::BAD_REQUEST, code, Fault::Client, message)
}

fn json_object(body: &[u8], example: &str) -> Result<serde_json::Map<String, Value>, Refusal> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => {
            Err(bad_request("api_body_not_json", format!("the request body must be a JSON object such as {example}")))
        }
        Err(e) => Err(bad_request(
            "api_body_not_json",
            format!("the request body is not valid JSON ({e}); send a JSON object such as {example}"),
        )),
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
            Err(bad_request("api_body_field_type", format!("{key:?} must be a string such as {example}, not {other}")))
        }
    }
}

fn valid_branch(name: &str) -> bool {
    crate::git::push::check_ref_name(&format!("refs/heads/{name}")).is_ok()
}

/// Not `issue`: it turns an existing issue, which may be anyone's, into this pull request.
const CREATE_FIELDS: [&str; 7] = ["title", "body", "head", "head_repo", "base", "draft", "maintainer_can_modify"];

/// `POST …/pulls`: `head` must be the working branch (`BRANCH` or `OWNER:BRANCH` with the repository's
/// owner), `head_repo` (when given) this repository, and `base` a plain branch name of this repository.
pub fn check_create(body: &[u8], owner: &str, repo: &str, branch: &str) -> Result<(), Refusal> {
    let example = format!(r#"{{"title":"…","head":"{branch}","base":"main"}}"#);
    let map = json_object(body, &example)?;
    if let Some(key) = map.keys().find(|k| !CREATE_FIELDS.contains(&k.as_str())) {
        return Err(forbidden(
            "api_field_not_allowed",
            format!("field {key:?} is not allowed when opening a pull request; allowed: {}", CREATE_FIELDS.join(", ")),
        ));
    }
    let head = string_field(&map, "head", &format!("{branch:?}"))?
        .ok_or_else(|| bad_request("api_body_field_missing", format!("\"head\" is missing; send {example}")))?;
    let head_branch = match head.split_once(':') {
        Some((o, b)) if o.eq_ignore_ascii_case(owner) => b,
        Some(_) => head,
        None => head,
    };
    if head_branch != branch {
        return Err(forbidden(
            "api_head_not_working_branch",
            format!(
                "head {head:?} is not this session's working branch; open pull requests from {branch:?} \
                 (or \"{owner}:{branch}\")"
            ),
        ));
    }
    if let Some(head_repo) = string_field(&map, "head_repo", &format!("\"{owner}/{repo}\""))?
        && !head_repo.eq_ignore_ascii_case(&format!("{owner}/{repo}"))
    {
        return Err(forbidden(
            "api_head_other_repository",
            format!(
                "head_repo {head_repo:?} is not {owner}/{repo}; pull requests come from the working branch of \
                 this repository"
            ),
        ));
    }
    let base = string_field(&map, "base", "\"main\"")?
        .ok_or_else(|| bad_request("api_body_field_missing", format!("\"base\" is missing; send {example}")))?;
    if base.contains(':') || !valid_branch(base) {
        return Err(forbidden(
            "api_base_not_a_branch",
            format!("base {base:?} must be a branch of {owner}/{repo} given as a plain branch name, such as \"main\""),
        ));
    }
    Ok(())
}

const EDIT_FIELDS: [&str; 3] = ["title", "body", "state"];

/// `PATCH …/pulls/N`: only the title, the body and the state (`open` or `closed`) may change.
pub fn check_edit(body: &[u8]) -> Result<(), Refusal> {
    let example = r#"{"title":"…","body":"…","state":"closed"}"#;
    let map = json_object(body, example)?;
    if let Some(key) = map.keys().find(|k| !EDIT_FIELDS.contains(&k.as_str())) {
        let hint = match key.as_str() {
            "base" => " (changing the base branch is not allowed through sluice)",
            "head" => " (a pull request's head stays the working branch)",
            _ => "",
        };
        return Err(forbidden(
            "api_field_not_allowed",
            format!("field {key:?} may not be changed{hint}; allowed: title, body, state"),
        ));
    }
    if let Some(state) = string_field(&map, "state", "\"open\"")?
        && state != "open"
        && state != "closed"
    {
        return Err(bad_request("api_body_field_value", format!("state {state:?} is not \"open\" or \"closed\"")));
    }
    Ok(())
}

/// A comment: any JSON object (GitHub checks its fields). Returns `in_reply_to` when it is a reply
/// to a review comment, which must then belong to the same pull request.
pub fn check_comment(body: &[u8]) -> Result<Option<u64>, Refusal> {
    let map = json_object(body, r#"{"body":"…"}"#)?;
    match map.get("in_reply_to") {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().filter(|n| *n > 0).map(Some).ok_or_else(|| {
            bad_request("api_body_field_type", format!("\"in_reply_to\" must be a review comment's id, not {v}"))
        }),
    }
}

/// `POST …/pulls/N/reviews`: a review that only comments. Approving (and requesting changes, its
/// counterpart) is a person's decision; a review without `event` stays pending and would need a
/// submit route the slice does not have.
pub fn check_review(body: &[u8]) -> Result<(), Refusal> {
    let map = json_object(body, r#"{"event":"COMMENT","body":"…"}"#)?;
    match string_field(&map, "event", "\"COMMENT\"")? {
        Some("COMMENT") => Ok(()),
        Some("APPROVE") => Err(forbidden(
            "api_approve_not_allowed",
            "approving pull requests is not allowed through sluice; a person approves".into(),
        )),
        Some(other) => Err(forbidden(
            "api_review_event_not_allowed",
            format!("review event {other:?} is not allowed through sluice; only \"COMMENT\" reviews are"),
        )),
        None => Err(forbidden(
            "api_review_event_not_allowed",
            "a review needs \"event\": \"COMMENT\" (pending reviews, approvals and change requests are not \
             allowed through sluice)"
                .into(),
        )),
    }
}

/// Whether the pull request document (GitHub's `GET …/pulls/N`) has the working branch of this
/// repository as its head.
pub fn check_pull_head(pull: &[u8], full_name: &str, number: u64, branch: &str) -> Result<(), Refusal> {
    let doc: Value = serde_json::from_slice(pull)
        .map_err(|e| Refusal::bad_upstream(format!("the upstream's pull request #{number} is not valid JSON ({e})")))?;
    let head_ref = doc.pointer("/head/ref").and_then(Value::as_str);
    let head_repo = doc.pointer("/head/repo/full_name").and_then(Value::as_str);
    match (head_ref, head_repo) {
        (Some(r), Some(repo)) if r == branch && repo.eq_ignore_ascii_case(full_name) => Ok(()),
        _ => Err(forbidden(
            "api_not_own_pull",
            format!(
                "pull request #{number} has head {}; this session may edit and comment only on pull requests \
                 from {full_name}:{branch}",
                match (head_repo, head_ref) {
                    (Some(repo), Some(r)) => format!("\"{repo}:{r}\""),
                    (None, Some(r)) => format!("{r:?} of a deleted repository"),
                    _ => "(unknown)".to_owned(),
                }
            ),
        )),
    }
}

/// Whether the review comment document (GitHub's `GET …/pulls/comments/ID`) belongs to pull request
/// `number` of this repository: its `pull_request_url` ends in `/repos/OWNER/REPO/pulls/N`.
pub fn check_comment_of_pull(comment: &[u8], full_name: &str, number: u64, id: u64) -> Result<(), Refusal> {
    let doc: Value = serde_json::from_slice(comment)
        .map_err(|e| Refusal::bad_upstream(format!("the upstream's review comment {id} is not valid JSON ({e})")))?;
    let url = doc.get("pull_request_url").and_then(Value::as_str).unwrap_or_default();
    let tail = format!("/repos/{full_name}/pulls/{number}").to_ascii_lowercase();
    if url.to_ascii_lowercase().ends_with(&tail) {
        return Ok(());
    }
    let theirs = url.rsplit_once("/pulls/").map(|(_, n)| format!("pull request #{n}"));
    Err(forbidden(
        "api_reply_other_pull",
        format!(
            "review comment {id} belongs to {}, not to #{number}; replies go only to review comments of the \
             session's own pull request",
            theirs.unwrap_or_else(|| "another pull request".into())
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_needs_the_working_branch_and_a_plain_base() {
        let ok = |b: &str| check_create(b.as_bytes(), "acme", "widgets", "feature");
        assert_eq!(ok(r#"{"title":"t","head":"feature","base":"main"}"#), Ok(()));
        assert_eq!(ok(r#"{"title":"t","head":"ACME:feature","base":"release/1.0","draft":true}"#), Ok(()));
        assert_eq!(ok(r#"{"head":"feature","base":"main","head_repo":"acme/widgets"}"#), Ok(()));
        let refused = |b: &str| ok(b).unwrap_err();
        assert_eq!(
            refused(r#"{"head":"main","base":"feature"}"#),
            forbidden(
                "api_head_not_working_branch",
                "head \"main\" is not this session's working branch; open pull requests from \"feature\" \
                 (or \"acme:feature\")"
                    .into()
            )
        );
        assert_eq!(
            refused(r#"{"head":"evil:feature","base":"main"}"#).message,
            "head \"evil:feature\" is not this session's working branch; open pull requests from \
             \"feature\" (or \"acme:feature\")"
        );
        assert_eq!(
            refused(r#"{"head":"feature","base":"other:main"}"#),
            forbidden(
                "api_base_not_a_branch",
                "base \"other:main\" must be a branch of acme/widgets given as a plain branch name, such as \
                 \"main\""
                    .into()
            )
        );
        assert_eq!(refused(r#"{"head":"feature","base":"a..b"}"#).status, StatusCode::FORBIDDEN);
        assert_eq!(
            refused(r#"{"head":"feature","base":"main","head_repo":"evil/widgets"}"#).message,
            "head_repo \"evil/widgets\" is not acme/widgets; pull requests come from the working branch of \
             this repository"
        );
        assert_eq!(
            refused(r#"{"head":"feature","base":"main","issue":12}"#).message,
            "field \"issue\" is not allowed when opening a pull request; allowed: title, body, head, \
             head_repo, base, draft, maintainer_can_modify"
        );
        assert_eq!(
            refused(r#"{"base":"main"}"#),
            bad_request(
                "api_body_field_missing",
                "\"head\" is missing; send {\"title\":\"…\",\"head\":\"feature\",\"base\":\"main\"}".into()
            )
        );
        assert_eq!(
            refused(r#"{"head":7,"base":"main"}"#).message,
            "\"head\" must be a string such as \"feature\", not 7"
        );
        assert_eq!(refused("[1]").status, StatusCode::BAD_REQUEST);
        assert!(refused("{").message.starts_with("the request body is not valid JSON ("));
    }

    #[test]
    fn edits_touch_title_body_and_state_only() {
        assert_eq!(check_edit(br#"{"title":"t","body":"b","state":"closed"}"#), Ok(()));
        assert_eq!(
            check_edit(br#"{"base":"main"}"#).unwrap_err(),
            forbidden(
                "api_field_not_allowed",
                "field \"base\" may not be changed (changing the base branch is not allowed through \
                 sluice); allowed: title, body, state"
                    .into()
            )
        );
        assert_eq!(
            check_edit(br#"{"maintainer_can_modify":false}"#).unwrap_err().message,
            "field \"maintainer_can_modify\" may not be changed; allowed: title, body, state"
        );
        assert_eq!(
            check_edit(br#"{"state":"merged"}"#).unwrap_err(),
            bad_request("api_body_field_value", "state \"merged\" is not \"open\" or \"closed\"".into())
        );
        assert_eq!(check_comment(br#"{"body":"hi"}"#), Ok(None));
        assert_eq!(check_comment(br#"{"body":"hi","in_reply_to":55}"#), Ok(Some(55)));
        assert_eq!(check_comment(br#"{"body":"hi","in_reply_to":"55"}"#).unwrap_err().code, "api_body_field_type");
        assert_eq!(check_review(br#"{"event":"COMMENT","body":"b"}"#), Ok(()));
        assert_eq!(check_review(br#"{"event":"APPROVE"}"#).unwrap_err().code, "api_approve_not_allowed");
        assert_eq!(check_review(br#"{"event":"REQUEST_CHANGES"}"#).unwrap_err().code, "api_review_event_not_allowed");
        assert_eq!(check_review(br#"{"body":"pending"}"#).unwrap_err().code, "api_review_event_not_allowed");
        assert_eq!(check_comment(b"\"hi\"").unwrap_err().status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn own_pull_means_head_ref_and_head_repo() {
        let pr =
            |r: &str, repo: &str| format!(r#"{{"number":3,"head":{{"ref":"{r}","repo":{{"full_name":"{repo}"}}}}}}"#);
        assert_eq!(check_pull_head(pr("feature", "Acme/Widgets").as_bytes(), "acme/widgets", 3, "feature"), Ok(()));
        assert_eq!(
            check_pull_head(pr("other", "acme/widgets").as_bytes(), "acme/widgets", 3, "feature").unwrap_err(),
            forbidden(
                "api_not_own_pull",
                "pull request #3 has head \"acme/widgets:other\"; this session may edit and comment only on \
                 pull requests from acme/widgets:feature"
                    .into()
            )
        );
        assert_eq!(
            check_pull_head(pr("feature", "evil/widgets").as_bytes(), "acme/widgets", 3, "feature")
                .unwrap_err()
                .message,
            "pull request #3 has head \"evil/widgets:feature\"; this session may edit and comment only on \
             pull requests from acme/widgets:feature"
        );
        let deleted = br#"{"head":{"ref":"feature","repo":null}}"#;
        assert_eq!(
            check_pull_head(deleted, "acme/widgets", 3, "feature").unwrap_err().message,
            "pull request #3 has head \"feature\" of a deleted repository; this session may edit and \
             comment only on pull requests from acme/widgets:feature"
        );
        assert_eq!(
            check_pull_head(b"<html>", "acme/widgets", 3, "feature").unwrap_err().status,
            StatusCode::BAD_GATEWAY
        );
        let comment = |url: &str| format!(r#"{{"id":55,"pull_request_url":"{url}"}}"#);
        let ours = comment("https://api.github.com/repos/Acme/Widgets/pulls/3");
        assert_eq!(check_comment_of_pull(ours.as_bytes(), "acme/widgets", 3, 55), Ok(()));
        let theirs = comment("https://api.github.com/repos/acme/widgets/pulls/4");
        assert_eq!(
            check_comment_of_pull(theirs.as_bytes(), "acme/widgets", 3, 55).unwrap_err(),
            forbidden(
                "api_reply_other_pull",
                "review comment 55 belongs to pull request #4, not to #3; replies go only to review comments of \
                 the session's own pull request"
                    .into()
            )
        );
        let elsewhere = comment("https://api.github.com/repos/acme/widgets-fork/pulls/3");
        assert!(check_comment_of_pull(elsewhere.as_bytes(), "acme/widgets", 3, 55).is_err());
        // `…/widgets/pulls/13` does not end in `/widgets/pulls/3`.
        let thirteen = comment("https://api.github.com/repos/acme/widgets/pulls/13");
        assert!(check_comment_of_pull(thirteen.as_bytes(), "acme/widgets", 3, 55).is_err());
    }
}
