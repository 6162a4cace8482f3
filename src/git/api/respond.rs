//! The one renderer of the `/api/` slice: a [`Refusal`] becomes GitHub-shaped JSON
//! (`{"message": "sluice: …", "documentation_url": …}`) with its status, and `Retry-After` for a `429`,
//! so that `gh`, Octokit and scripts print sluice's sentence as they would GitHub's.

use http::{HeaderValue, Response, header};

use crate::git::{GitBody, full};
use crate::refusal::Refusal;

/// Where sluice's refusals point, like GitHub's own errors do.
pub const DOCUMENTATION_URL: &str = "https://docs.github.com/rest/pulls/pulls";

/// The JSON body of an error, shaped like GitHub's own errors; `message` is printed as given.
pub fn error_body(message: &str) -> String {
    serde_json::json!({ "message": message, "documentation_url": DOCUMENTATION_URL }).to_string()
}

/// The message as the client reads it: `sluice: ` first, the hint after it.
pub fn message(r: &Refusal) -> String {
    match &r.hint {
        Some(hint) => format!("sluice: {}; {hint}", r.message),
        None => format!("sluice: {}", r.message),
    }
}

/// The answer to a refused or failed `/api/` request.
pub fn render(r: &Refusal) -> Response<GitBody> {
    let mut resp = Response::new(full(error_body(&message(r))));
    *resp.status_mut() = r.status;
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json; charset=utf-8"));
    if let Some(secs) = r.retry_after {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    if let Ok(v) = HeaderValue::from_str(&format!("deny; reason={}", r.code)) {
        headers.insert("x-sluice-decision", v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::refusal::Fault;
    use http::StatusCode;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn github_shaped_json_with_the_prefix_and_retry_after() {
        let mut r = Refusal::new(StatusCode::TOO_MANY_REQUESTS, "api_write_rate", Fault::Client, "too many writes");
        r.retry_after = Some(7);
        let resp = render(&r.with_hint("wait"));
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "7");
        assert_eq!(resp.headers()["x-sluice-decision"], "deny; reason=api_write_rate");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"message": "sluice: too many writes; wait", "documentation_url": DOCUMENTATION_URL})
        );
    }
}
