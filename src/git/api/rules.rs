//! The write rules of the `/api/` slice: a pull request is opened only from the working branch, edited
//! only in its title, body and state, and commented on only when its head is the working branch.

use http::StatusCode;
use serde_json::Value;

use super::Refusal;

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
}
