//! Request rules (`[[requests]]`) end to end: plain-HTTP requests through sluice decided per method,
//! path and body size, with curl and raw sockets; refusals answered before anything is dialled; the
//! decision record naming the rule; CONNECTs the policy terminates never relayed uninspected; and
//! `sluice check --method` naming the rule.

mod support;

use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use support::*;

const LIMIT: Duration = Duration::from_secs(30);

fn config(names: &[&str], extra: &str) -> String {
    let hosts: Vec<String> = names.iter().map(|n| format!("{n:?} = [\"127.0.0.1\"]")).collect();
    format!("[egress]\npolicy = \"lab\"\n[resolver]\nhosts = {{ {} }}\n{extra}", hosts.join(", "))
}

/// The policy under test; the line numbers of its rules are asserted below (8, 14, 21, 27).
fn lab(port: u16, inspect: &str) -> String {
    format!(
        r#"version = 1
name = "lab"
level = "custom"
allow = ["api.test:{port}", "paste.test:{port}", "free.test:{port}"]
allow_ips = ["127.0.0.0/8"]
inspect = "{inspect}"

[[requests]]
hosts = ["api.test"]
methods = ["GET", "HEAD"]
paths = ["/v1/public/**", "/v1/items/*"]
action = "allow"

[[requests]]
hosts = ["api.test"]
methods = ["POST"]
paths = ["/sha256"]
action = "allow"
max_body = "1KiB"

[[requests]]
hosts = ["api.test"]
methods = ["GET", "DELETE"]
paths = ["/v1/public/secret/**"]
action = "deny"

[[requests]]
hosts = ["paste.test"]
methods = ["POST", "PUT"]
action = "deny"
"#
    )
}

struct Lab {
    proxy: Proxy,
    upstream: Upstream,
    port: u16,
}

async fn start(inspect: &str, extra: &str, dir: TempDir) -> Lab {
    let upstream = Upstream::plain("api").await;
    let port = upstream.port();
    let config = config(&["api.test", "paste.test", "free.test"], extra);
    let proxy = Proxy::start_recorded(dir, &config, &[("lab.toml", &lab(port, inspect))]).await;
    Lab { proxy, upstream, port }
}

impl Lab {
    fn rule(&self, line: usize, summary: &str) -> String {
        format!("{summary} ({}:{line})", self.proxy.dir.path().join("policies/lab.toml").display())
    }

    async fn curl(&self, args: &[&str]) -> Outcome {
        let proxy = self.proxy.url();
        let mut all = vec!["-x", &proxy, "-i"];
        all.extend_from_slice(args);
        curl(&all, LIMIT).await
    }

    fn url(&self, host: &str, path: &str) -> String {
        format!("http://{host}:{}{path}", self.port)
    }

    /// The decision records written so far, parsed.
    async fn decisions(&self, want: usize) -> Vec<Value> {
        for _ in 0..100 {
            let found: Vec<Value> = self
                .proxy
                .records()
                .iter()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .filter(|v| v["event"] == "decision")
                .collect();
            if found.len() >= want {
                return found;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("fewer than {want} decision records: {:?}", self.proxy.records());
    }
}

fn status_line(out: &Outcome) -> &str {
    out.stdout.lines().next().unwrap_or_default().trim_end()
}

fn header<'a>(out: &'a Outcome, name: &str) -> Option<&'a str> {
    out.stdout
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.trim()))
}

fn body(out: &Outcome) -> &str {
    out.stdout.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_get_and_a_refused_post_on_one_host() {
    let lab = start("off", "", TempDir::new("rules-get-post")).await;
    let out = lab.curl(&[&lab.url("api.test", "/v1/public/a/b?q=1")]).await;
    assert_eq!(status_line(&out), "HTTP/1.1 200 OK", "{out:?}");
    assert_eq!(body(&out), "hello from api /v1/public/a/b\n");
    assert_eq!(lab.upstream.connections(), 1);

    let out = lab.curl(&["-X", "POST", "-d", "x=1", &lab.url("api.test", "/v1/public/a")]).await;
    assert_eq!(status_line(&out), "HTTP/1.1 403 Forbidden", "{out:?}");
    assert_eq!(header(&out, "x-sluice-decision"), Some("deny; reason=no_request_rule; policy=lab"));
    let destination = format!("api.test:{}", lab.port);
    assert!(
        body(&out).starts_with(&format!(
            "sluice: request to {destination} refused: no request rule allows POST /v1/public/a (this host's requests need one)\n"
        )),
        "{}",
        body(&out)
    );
    assert!(
        body(&out).contains(
            "hint:        to allow it, add a [[requests]] rule with hosts = [\"api.test\"], methods = [\"POST\"], paths = [\"/v1/public/a\"] and action = \"allow\""
        ),
        "{}",
        body(&out)
    );
    assert_eq!(lab.upstream.connections(), 1, "the refused request was never dialled");

    let records = lab.decisions(2).await;
    assert_eq!(records[0]["verdict"], "allow");
    assert_eq!(records[0]["method"], "GET");
    assert_eq!(records[0]["reason"], "request_allowed");
    assert_eq!(records[0]["rule"], lab.rule(8, "allow GET,HEAD api.test /v1/public/**,/v1/items/*"));
    assert_eq!(records[1]["verdict"], "deny");
    assert_eq!(records[1]["method"], "POST");
    assert_eq!(records[1]["reason"], "no_request_rule");
    assert_eq!(records[1]["status"], 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_star_stays_in_a_segment_two_cross_them_and_deny_beats_allow() {
    let lab = start("off", "", TempDir::new("rules-globs")).await;
    let out = lab.curl(&[&lab.url("api.test", "/v1/items/42")]).await;
    assert_eq!(status_line(&out), "HTTP/1.1 200 OK", "{out:?}");
    let out = lab.curl(&[&lab.url("api.test", "/v1/items/42/parts")]).await;
    assert_eq!(status_line(&out), "HTTP/1.1 403 Forbidden", "{out:?}");
    assert_eq!(header(&out, "x-sluice-decision"), Some("deny; reason=no_request_rule; policy=lab"));
    let out = lab.curl(&[&lab.url("api.test", "/v1/public/deep/er/still")]).await;
    assert_eq!(status_line(&out), "HTTP/1.1 200 OK", "{out:?}");
    // Matched by the allow rule at line 8 and the deny rule at line 21: deny wins, in any spelling.
    for path in ["/v1/public/secret/x", "/v1/public/%73ecret/x", "/v1/public/a/../secret/x"] {
        let out = lab.curl(&["--path-as-is", &lab.url("api.test", path)]).await;
        assert_eq!(status_line(&out), "HTTP/1.1 403 Forbidden", "{path}: {out:?}");
        assert_eq!(header(&out, "x-sluice-decision"), Some("deny; reason=request_denied; policy=lab"), "{path}");
        let file = lab.proxy.dir.path().join("policies/lab.toml");
        let rule = format!("rule:        \"deny GET,DELETE api.test /v1/public/secret/**\" ({}:21)\n", file.display());
        assert!(body(&out).contains(&rule), "{path}: {}", body(&out));
    }
    assert_eq!(lab.upstream.connections(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_body_refuses_a_declared_length_before_dialling_and_a_chunked_body_as_it_streams() {
    let lab = start("off", "", TempDir::new("rules-body")).await;
    let small = lab.proxy.dir.write("small.bin", vec![b'a'; 1024]);
    let big = lab.proxy.dir.write("big.bin", vec![b'b'; 1025]);
    let huge = lab.proxy.dir.write("huge.bin", vec![b'c'; 256 * 1024]);
    let at = |p: &std::path::Path| format!("@{}", p.display());
    let url = lab.url("api.test", "/sha256");

    let out = lab.curl(&["--data-binary", &at(&small), &url]).await;
    assert_eq!(status_line(&out), "HTTP/1.1 200 OK", "{out:?}");
    assert!(body(&out).ends_with(" bytes=1024\n"), "{}", body(&out));
    assert_eq!(lab.upstream.connections(), 1);

    let out = lab.curl(&["--data-binary", &at(&big), &url]).await;
    assert_eq!(status_line(&out), "HTTP/1.1 413 Payload Too Large", "{out:?}");
    assert_eq!(header(&out, "x-sluice-decision"), Some("deny; reason=body_too_large; policy=lab"));
    assert!(
        body(&out).starts_with(&format!(
            "sluice: request to api.test:{} refused: the request body (1025 bytes) is larger than the rule's max_body (1024 bytes)\n",
            lab.port
        )),
        "{}",
        body(&out)
    );
    assert_eq!(lab.upstream.connections(), 1, "a declared length over max_body is never dialled");

    // Chunked: no length to read up front; the body is cut where it goes over, and the upstream never
    // sees it end.
    let out = lab.curl(&["-H", "Transfer-Encoding: chunked", "--data-binary", &at(&huge), &url]).await;
    assert_eq!(status_line(&out), "HTTP/1.1 413 Payload Too Large", "{out:?}");
    assert_eq!(header(&out, "x-sluice-decision"), Some("deny; reason=body_too_large; policy=lab"));
    assert!(body(&out).contains("is larger than the rule's max_body (1024 bytes)"), "{}", body(&out));
    let out = lab.curl(&["-H", "Transfer-Encoding: chunked", "--data-binary", &at(&small), &url]).await;
    assert_eq!(status_line(&out), "HTTP/1.1 200 OK", "{out:?}");
    assert!(body(&out).ends_with(" bytes=1024\n"), "{}", body(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_with_only_deny_rules_passes_the_rest_and_a_host_without_rules_passes_everything() {
    let lab = start("off", "", TempDir::new("rules-deny-only")).await;
    let out = lab.curl(&["-X", "PUT", "-d", "secret", &lab.url("paste.test", "/p")]).await;
    assert_eq!(status_line(&out), "HTTP/1.1 403 Forbidden", "{out:?}");
    assert_eq!(header(&out, "x-sluice-decision"), Some("deny; reason=request_denied; policy=lab"));
    let out = lab.curl(&[&lab.url("paste.test", "/p")]).await;
    assert_eq!((status_line(&out), body(&out)), ("HTTP/1.1 200 OK", "hello from api /p\n"), "{out:?}");
    let out = lab.curl(&["-X", "DELETE", &lab.url("free.test", "/anything")]).await;
    assert_eq!(status_line(&out), "HTTP/1.1 200 OK", "{out:?}");
    let records = lab.decisions(3).await;
    assert_eq!(records[1]["reason"], "allowlisted");
    assert_eq!(records[1]["rule"], lab.rule(4, &format!("paste.test:{}", lab.port)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_the_policy_terminates_is_never_relayed_uninspected() {
    let dir = TempDir::new("rules-connect");
    let files = sluice::inspect::ca::init(&dir.path().join("ca")).expect("ca init");
    let extra = format!("[inspect]\nca_cert = {:?}\nca_key = {:?}\n", files.cert, files.key);
    let lab = start("auto", &extra, dir).await;
    let connect = |host: &str| format!("CONNECT {host}:{0} HTTP/1.1\r\nHost: {host}:{0}\r\n\r\n", lab.port);
    // The upstream here speaks plain HTTP: the upstream leg's TLS handshake fails, and the CONNECT is
    // refused before its 200 rather than relayed (termination itself: tests/inspect_terminate.rs).
    let r = raw_exchange(lab.proxy.addr, connect("api.test").as_bytes()).await;
    assert_eq!(r.status_line, "HTTP/1.1 502 Bad Gateway", "{r:#?}");
    assert_eq!(r.header("x-sluice-decision"), Some("deny; reason=bad_upstream; policy=lab"));
    assert!(r.body.contains("the TLS handshake with api.test:"), "{}", r.body);
    // A host without request rules is tunnelled as before.
    let mut c = RawClient::connect(lab.proxy.addr).await;
    c.send(connect("free.test").as_bytes()).await;
    let r = c.response().await.expect("CONNECT answer");
    assert_eq!(r.status_line, "HTTP/1.1 200 OK");
    c.send(b"GET /t HTTP/1.1\r\nHost: free.test\r\nConnection: close\r\n\r\n").await;
    let r = c.response().await.expect("tunnelled answer");
    assert_eq!(r.body, "hello from api /t\n");
}

fn sluice_check(dir: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice")).arg("check").args(args).current_dir(dir).output().unwrap();
    (out.status.code().unwrap(), String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
}

#[test]
fn check_with_a_method_names_the_request_rule() {
    let dir = TempDir::new("rules-check");
    let policy = dir.write("lab.toml", lab(443, "auto").replace(":443", ""));
    let policy = policy.to_str().unwrap();
    let (code, out, err) =
        sluice_check(dir.path(), &["--policy", policy, "--method", "GET", "https://api.test/v1/public/x?y=1"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        format!(
            "allow api.test:443 policy=lab level=custom rule=\"api.test\" ({policy}:4) reason=\"in the policy's allow list\"\n\
             allow GET api.test:443/v1/public/x rule=\"allow GET,HEAD api.test /v1/public/**,/v1/items/*\" ({policy}:8) reason=\"allowed by a request rule\"\n"
        )
    );
    let (code, out, _) = sluice_check(dir.path(), &["--policy", policy, "--method", "POST", "https://api.test/sha256"]);
    assert_eq!(code, 0);
    assert!(out.ends_with(&format!("({policy}:14) reason=\"allowed by a request rule\" max_body=1024\n")), "{out}");
    let (code, out, _) =
        sluice_check(dir.path(), &["--policy", policy, "--method", "DELETE", "https://api.test/v1/public/secret/k"]);
    assert_eq!(code, 1);
    assert!(
        out.ends_with(&format!(
            "deny DELETE api.test:443/v1/public/secret/k rule=\"deny GET,DELETE api.test /v1/public/secret/**\" ({policy}:21) reason=\"DELETE /v1/public/secret/k is refused by a request rule\"\n"
        )),
        "{out}"
    );
    let (code, out, _) = sluice_check(dir.path(), &["--policy", policy, "--method", "GET", "http://free.test/x"]);
    assert_eq!(code, 0);
    assert!(out.ends_with("request: no [[requests]] rule names free.test: every request passes\n"), "{out}");
    let (code, _, err) = sluice_check(dir.path(), &["--policy", policy, "--method", "GET", "api.test"]);
    assert_eq!(code, 2);
    assert!(err.contains("with --method, give a URL"), "{err}");
    // A refused host is refused for its host, whatever the method.
    let (code, out, _) = sluice_check(dir.path(), &["--policy", policy, "--method", "GET", "https://other.test/"]);
    assert_eq!(code, 1);
    assert!(out.starts_with("deny other.test:443 policy=lab"), "{out}");
}

#[test]
fn validate_lints_request_rules_with_their_location_and_a_hint() {
    let dir = TempDir::new("rules-validate");
    dir.write(
        "p.toml",
        "version = 1\nname = \"p\"\nlevel = \"custom\"\nallow = [\"a.test\"]\n\
         [[requests]]\nhosts = [\"a.test\"]\npaths = [\"/v1/x**\"]\naction = \"allow\"\n\
         [[requests]]\nhosts = [\"b.test\"]\naction = \"deny\"\n\
         [[requests]]\nhosts = [\"a.test\"]\nmethods = [\"POST\"]\naction = \"deny\"\n\
         [[requests]]\nhosts = [\"a.test\"]\nmethods = [\"POST\"]\npaths = [\"/up/**\"]\naction = \"allow\"\n",
    );
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["validate", "p.toml"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.starts_with(
            "p.toml:7:10: error: path glob \"/v1/x**\" has ** inside a segment: ** must be a whole segment"
        ),
        "{text}"
    );
    assert!(text.contains("= hint: paths are globs on the path without query"), "{text}");
    // Fixed, the rest are warnings: a rule for a host the policy refuses, and an allow rule a deny covers.
    dir.write("p.toml", std::fs::read_to_string(dir.path().join("p.toml")).unwrap().replace("/v1/x**", "/v1/**"));
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["validate", "p.toml"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains(
            "p.toml:9:1: warning: this [[requests]] rule can never match b.test: the policy does not allow b.test"
        ),
        "{text}"
    );
    assert!(
        text.contains("p.toml:16:1: warning: this [[requests]] rule is shadowed by the one at line 12: deny wins"),
        "{text}"
    );
    assert!(text.ends_with("checked 1 file: 0 errors, 2 warnings\n"), "{text}");
}
