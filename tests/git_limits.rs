//! The git listener's per-session limits (`[git.limits]`), and its decisions in `/metrics` and
//! `/v1/denials`: requests are counted against the verified session of their git credential, in the
//! limiter egress shares, so one sandbox cannot hold every git connection or spend the shared token's
//! rate for the others.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use sluice::credential::{Claims, Keyring, SigningKey, now_unix};
use support::*;

const KEY: &[u8] = b"git-limits-test-signing-key-0123456789ab";
const REPO: &str = "acme/widgets";

fn git_auth(sid: &str) -> String {
    let now = now_unix();
    let keyring = Keyring::new(SigningKey::from_bytes(KEY).expect("a test key"), None);
    basic(sid, &keyring.mint(&Claims::git(sid, REPO, "feature", now, now + 600)))
}

fn discovery(sid: &str) -> Vec<u8> {
    format!(
        "GET /{REPO}.git/info/refs?service=git-upload-pack HTTP/1.1\r\nHost: git\r\nAuthorization: {}\r\n\r\n",
        git_auth(sid)
    )
    .into_bytes()
}

async fn start(limits: &str) -> (Proxy, Upstream) {
    let upstream = Upstream::plain("github").await;
    let dir = TempDir::new("git-limits");
    let key = dir.write("key", KEY);
    let token = dir.write("gh-token", "ghs_limits_real_token");
    let config = format!(
        "[auth]\nkey_file = {:?}\n[git]\nupstream = \"http://{}\"\napi_upstream = \"http://{}\"\ntoken_file = {:?}\n\
         [git.limits]\n{limits}\n",
        key.display(),
        upstream.addr,
        upstream.addr,
        token.display()
    );
    (Proxy::start_in(dir, &config, &[]).await, upstream)
}

async fn admin_get(admin: SocketAddr, path: &str) -> String {
    let request = format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
    let resp = raw_exchange(admin, request.as_bytes()).await;
    assert_eq!(resp.status(), 200, "{path}");
    resp.body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sessions_request_rate_is_limited_and_another_session_is_not() {
    let (proxy, upstream) = start("requests_per_second = 0.01\nburst = 3").await;
    for i in 0..3 {
        let resp = raw_exchange(proxy.git, &discovery("s-busy")).await;
        assert_eq!(resp.status(), 200, "request {i} is within the burst");
    }
    let refused = raw_exchange(proxy.git, &discovery("s-busy")).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.header("retry-after"), Some("100"));
    assert_eq!(refused.header("content-type"), Some("text/plain; charset=utf-8"));
    let body = refused.body.clone();
    assert!(body.starts_with("sluice: session over its rate limit (0.01 requests per second, burst 3)"), "{body}");
    assert!(body.contains("hint: the operator raises it with requests_per_second and burst in [git.limits]"), "{body}");
    assert_eq!(upstream.requests(), 3, "the refused request never reached the upstream");

    // Another session has a budget of its own.
    assert_eq!(raw_exchange(proxy.git, &discovery("s-calm")).await.status(), 200);

    // The same limit applies to `/api`, answered in GitHub's JSON shape with Retry-After.
    let api = format!("GET /api/repos/{REPO} HTTP/1.1\r\nHost: git\r\nAuthorization: {}\r\n\r\n", git_auth("s-busy"));
    let refused = raw_exchange(proxy.git, api.as_bytes()).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.header("retry-after"), Some("100"));
    let json: serde_json::Value = serde_json::from_str(&refused.body).expect("GitHub-shaped JSON");
    let message = json["message"].as_str().unwrap_or_default();
    assert!(message.starts_with("sluice: session over its rate limit"), "{json}");
    assert!(json["documentation_url"].is_string(), "{json}");

    // Both listeners' decisions are in one /metrics, the git ones under level="git".
    let metrics = admin_get(proxy.admin, "/metrics").await;
    assert!(
        metrics.contains("sluice_decisions_total{verdict=\"allow\",reason=\"forwarded\",level=\"git\"} 4\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("sluice_decisions_total{verdict=\"deny\",reason=\"rate_limited\",level=\"git\"} 2\n"),
        "{metrics}"
    );
    assert!(metrics.contains("\nsluice_rate_limited_total 2\n"), "{metrics}");

    // And the session's refusals are in /v1/denials, newest first.
    let denials: serde_json::Value =
        serde_json::from_str(&admin_get(proxy.admin, "/v1/denials?session=s-busy").await).expect("JSON");
    let list = denials["denials"].as_array().expect("a list");
    assert_eq!(list.len(), 2, "{denials}");
    assert_eq!(list[0]["destination"], format!("GET /api/repos/{REPO}"));
    assert_eq!(list[1]["destination"], format!("GET /{REPO}.git/info/refs"));
    assert!(list.iter().all(|d| d["reason"] == "rate_limited"), "{denials}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_may_hold_only_so_many_git_connections() {
    let (proxy, upstream) = start("max_connections = 2").await;
    let mut held = Vec::new();
    for i in 0..2 {
        let mut c = RawClient::connect(proxy.git).await;
        c.send(&discovery("s-hog")).await;
        let resp = c.response().await.expect("an answer");
        assert_eq!(resp.status(), 200, "connection {i} is within the cap");
        held.push(c);
    }
    // A third connection of the same session is refused, and says why.
    let refused = raw_exchange(proxy.git, &discovery("s-hog")).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.header("retry-after"), Some("1"));
    let body = refused.body.clone();
    assert!(body.starts_with("sluice: session already has 2 open git-proxy connections"), "{body}");

    // A held connection serves its session's next request: it is already counted.
    held[0].send(&discovery("s-hog")).await;
    assert_eq!(held[0].response().await.expect("an answer").status(), 200);

    // Another session is unaffected.
    assert_eq!(raw_exchange(proxy.git, &discovery("s-other")).await.status(), 200);

    // Closing a connection frees its place (the server notices the close promptly; bounded wait).
    drop(held.pop());
    let mut freed = false;
    for _ in 0..50 {
        if raw_exchange(proxy.git, &discovery("s-hog")).await.status() == 200 {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(freed, "a closed connection stops counting");
    assert_eq!(upstream.requests(), 5, "refused requests never reached the upstream");
    proxy.stop().await;
}

#[test]
fn unusable_git_limits_are_refused_where_they_are_written() {
    for (limits, want) in [
        ("requests_per_second = 0.0", "sluice.toml:1:1: error: requests_per_second must be a positive number, not 0"),
        ("burst = 0", "sluice.toml:1:1: error: burst must be at least 1, not 0 (e.g. 60)"),
        ("max_connections = 0", "sluice.toml:1:1: error: max_connections must be at least 1, not 0 (e.g. 16)"),
    ] {
        let text = format!("[git.limits]\n{limits}\n");
        let err = sluice::config::Config::parse("sluice.toml", &text).unwrap_err().to_string();
        assert!(err.contains(want), "{limits}: {err}");
    }
}
