//! Report mode end to end: a policy with `mode = "report"` serves what its own rules would refuse and
//! says so (record, `X-Sluice-Decision`, metric, `/v1/denials`), while the address guard and the
//! limits are enforced exactly as in enforce mode. Driven with curl through the real listener.

mod support;

use std::time::Duration;

use serde_json::Value;
use sluice::credential::now_unix;
use support::*;

const KEY: &[u8] = b"report-test-signing-key-0123456789abcdef";

fn proxy_url(proxy: &Proxy, sid: &str, policy: &str) -> String {
    let now = now_unix();
    let token = egress_token(KEY, sid, policy, now, now + 600);
    format!("http://{sid}:{token}@{}", proxy.addr)
}

/// `rep` (report) and `enf` (enforce) are the same policy but for their mode; `bare` is in report
/// mode without `allow_ips`, so loopback stays behind the guard; `slow` is `rep` with burst 1.
fn policy(name: &str, mode: &str, allow_ips: &str, limits: &str) -> String {
    format!(
        "version = 1\nname = \"{name}\"\nlevel = \"custom\"\nmode = \"{mode}\"\nallow = [\"listed.test\"]\ndeny = [\"blocked.test\"]\n{allow_ips}{limits}"
    )
}

struct Lab {
    proxy: Proxy,
    up: Upstream,
    /// Stands for the loopback and metadata destinations: it must never be dialled.
    trap: Recorder,
}

async fn lab() -> Lab {
    let up = Upstream::plain("up").await;
    let trap = Recorder::start().await;
    let dir = TempDir::new("report");
    let key = dir.write("key", KEY);
    let config = format!(
        "[auth]\nanonymous = false\nkey_file = {:?}\n[resolver]\nhosts = {{ \"denied.test\" = [\"127.0.0.1\"], \"blocked.test\" = [\"127.0.0.1\"], \"loop.test\" = [\"127.0.0.1\"], \"meta.test\" = [\"169.254.169.254\"] }}\n",
        key.display()
    );
    let ips = "allow_ips = [\"127.0.0.0/8\"]\n";
    let policies = [
        ("rep.toml", policy("rep", "report", ips, "")),
        ("enf.toml", policy("enf", "enforce", ips, "")),
        ("bare.toml", policy("bare", "report", "", "")),
        ("slow.toml", policy("slow", "report", ips, "[limits]\nrequests_per_second = 0.01\nburst = 1\n")),
    ];
    let policies: Vec<(&str, &str)> = policies.iter().map(|(n, t)| (*n, t.as_str())).collect();
    let proxy = Proxy::start_recorded(dir, &config, &policies).await;
    Lab { proxy, up, trap }
}

async fn admin_get(lab: &Lab, path: &str) -> String {
    let out = curl(&[&format!("http://{}{path}", lab.proxy.admin)], STEP).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    out.stdout
}

/// The value of one sample in the Prometheus text, when present.
fn sample(metrics: &str, key: &str) -> Option<f64> {
    metrics.lines().find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix(' ')).and_then(|v| v.parse().ok()))
}

/// The decision records (not the closing lines), as JSON.
async fn decisions(proxy: &Proxy, want: usize) -> Vec<Value> {
    for _ in 0..100 {
        let got: Vec<Value> = proxy
            .records()
            .iter()
            .map(|l| serde_json::from_str::<Value>(l).expect("a JSON record"))
            .filter(|v| v["event"] == "decision")
            .collect();
        if got.len() >= want {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("fewer than {want} decision records:\n{}", proxy.records().join("\n"));
}

fn header<'a>(stderr: &'a str, name: &str) -> Option<&'a str> {
    stderr.lines().find_map(|l| {
        let l = l.strip_prefix("< ")?;
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_mode_serves_what_enforce_refuses_and_says_so() {
    let lab = lab().await;
    let p = lab.up.port();
    let rep = proxy_url(&lab.proxy, "s-rep", "rep");
    let enf = proxy_url(&lab.proxy, "s-enf", "enf");

    // Plain HTTP to a name outside the allow list: the upstream answers, the header says why.
    let url = format!("http://denied.test:{p}/x");
    let out = curl(&["-v", "-x", &rep, &url], STEP).await;
    assert_eq!((out.code, out.stdout.as_str()), (Some(0), "hello from up /x\n"), "{out:?}");
    assert_eq!(header(&out.stderr, "x-sluice-decision"), Some("allow; would_deny=not_allowlisted; policy=rep"));

    // A tunnel to a name on the deny list: CONNECT 200 carries the header, the upstream answers.
    let url = format!("http://blocked.test:{p}/t");
    let out = curl(&["-v", "-p", "-x", &rep, &url], STEP).await;
    assert_eq!((out.code, out.stdout.as_str()), (Some(0), "hello from up /t\n"), "{out:?}");
    assert_eq!(header(&out.stderr, "x-sluice-decision"), Some("allow; would_deny=denylisted; policy=rep"));

    // The same policy enforcing refuses both, before any dial.
    let before = lab.up.connections();
    for (args, code) in [(vec![], "not_allowlisted"), (vec!["-p"], "denylisted")] {
        let host = if code == "denylisted" { "blocked.test" } else { "denied.test" };
        let url = format!("http://{host}:{p}/");
        let mut all = args.clone();
        all.extend(["-o", "/dev/null", "-w", "%{http_code} %{http_connect}", "-x", &enf, &url]);
        let out = curl(&all, STEP).await;
        let want = if args.is_empty() { "403 000" } else { "000 403" };
        assert_eq!(out.stdout, want, "{code}: {out:?}");
    }
    assert_eq!(lab.up.connections(), before, "enforce mode never dials a refused destination");

    let records = decisions(&lab.proxy, 4).await;
    let served = &records[0];
    assert_eq!(served["verdict"], "allow");
    assert_eq!(served["would_deny"], "not_allowlisted");
    assert_eq!(served["reason"], "not_allowlisted");
    assert_eq!(served["detail"], format!("denied.test:{p} is not allowed: not in the allowlist"));
    assert_eq!(served["upstream"], format!("127.0.0.1:{p}"));
    assert!(served.get("rule").is_none_or(Value::is_null), "{served}");
    let tunnel = &records[1];
    assert_eq!(
        (&tunnel["verdict"], &tunnel["would_deny"], &tunnel["kind"]),
        (&"allow".into(), &"denylisted".into(), &"connect".into())
    );
    let rule = format!("blocked.test ({}:6)", lab.proxy.dir.path().join("policies/rep.toml").display());
    assert_eq!(tunnel["rule"], rule);
    assert_eq!((&records[2]["verdict"], &records[2]["reason"]), (&"deny".into(), &"not_allowlisted".into()));
    assert!(records[2].get("would_deny").is_none(), "an enforced deny has no would_deny: {}", records[2]);
    assert_eq!((&records[3]["verdict"], &records[3]["reason"]), (&"deny".into(), &"denylisted".into()));

    let metrics = admin_get(&lab, "/metrics").await;
    assert_eq!(sample(&metrics, "sluice_would_deny_total{reason=\"not_allowlisted\",level=\"custom\"}"), Some(1.0));
    assert_eq!(sample(&metrics, "sluice_would_deny_total{reason=\"denylisted\",level=\"custom\"}"), Some(1.0));
    assert_eq!(
        sample(&metrics, "sluice_decisions_total{verdict=\"allow\",reason=\"not_allowlisted\",level=\"custom\"}"),
        Some(1.0)
    );

    let denials: Value = serde_json::from_str(&admin_get(&lab, "/v1/denials?session=s-rep").await).expect("JSON");
    let list = denials["denials"].as_array().expect("a list");
    let marked: Vec<(&str, &str, bool)> = list
        .iter()
        .map(|d| (d["destination"].as_str().unwrap(), d["reason"].as_str().unwrap(), d["would_deny"] == true))
        .collect();
    let (a, b) = (format!("blocked.test:{p}"), format!("denied.test:{p}"));
    assert_eq!(marked, [(a.as_str(), "denylisted", true), (b.as_str(), "not_allowlisted", true)]);
    let denials: Value = serde_json::from_str(&admin_get(&lab, "/v1/denials?session=s-enf").await).expect("JSON");
    assert!(denials["denials"].as_array().unwrap().iter().all(|d| d.get("would_deny").is_none()), "{denials}");
}

/// The guard is the same in both modes: a loopback or metadata address is refused before any dial,
/// by name or by address, and no connection is even attempted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_mode_never_dials_what_the_guard_refuses() {
    let lab = lab().await;
    let bare = proxy_url(&lab.proxy, "s-bare", "bare");
    let t = lab.trap.port();
    let cases = [
        (format!("http://loop.test:{t}/"), "blocked_address"),
        (format!("http://127.0.0.1:{t}/"), "blocked_address"),
        ("http://meta.test/latest/meta-data/".to_string(), "blocked_address"),
        ("http://169.254.169.254/latest/meta-data/".to_string(), "blocked_address"),
        ("http://metadata.google.internal/".to_string(), "blocked_name"),
        (format!("http://localhost:{t}/"), "blocked_name"),
    ];
    for (url, reason) in &cases {
        for tunnel in [false, true] {
            let mut args = vec!["-v", "-o", "/dev/null", "-x", &bare, url.as_str()];
            if tunnel {
                args.insert(0, "-p");
            }
            let out = curl(&args, STEP).await;
            assert!(out.stderr.contains("< HTTP/1.1 403 Forbidden"), "{url} tunnel={tunnel}: {out:?}");
            let decision = header(&out.stderr, "x-sluice-decision").unwrap_or_default();
            assert_eq!(decision, format!("deny; reason={reason}; policy=bare"), "{url}");
        }
    }
    assert_eq!(lab.trap.connections(), 0, "the trap was dialled");
    let metrics = admin_get(&lab, "/metrics").await;
    assert_eq!(sample(&metrics, "sluice_upstream_connect_seconds_count"), Some(0.0), "no connect was attempted");
    assert!(!metrics.contains("sluice_would_deny_total{"), "guard refusals are not would-denies:\n{metrics}");
    let records = decisions(&lab.proxy, cases.len() * 2).await;
    assert!(records.iter().all(|r| r["verdict"] == "deny" && r.get("would_deny").is_none()), "{records:?}");
}

/// Limits bite in report mode: a would-deny counts against the session's rate like any request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_mode_keeps_the_limits() {
    let lab = lab().await;
    let slow = proxy_url(&lab.proxy, "s-slow", "slow");
    let url = format!("http://denied.test:{}/", lab.up.port());
    let first = curl(&["-o", "/dev/null", "-w", "%{http_code}", "-x", &slow, &url], STEP).await;
    assert_eq!(first.stdout, "200", "{first:?}");
    let second = curl(&["-v", "-o", "/dev/null", "-w", "%{http_code}", "-x", &slow, &url], STEP).await;
    assert_eq!(second.stdout, "429", "{second:?}");
    assert_eq!(header(&second.stderr, "x-sluice-decision"), Some("deny; reason=rate_limited; policy=slow"));
    let tunnel = curl(&["-p", "-o", "/dev/null", "-w", "%{http_connect}", "-x", &slow, &url], STEP).await;
    assert_eq!(tunnel.stdout, "429", "{tunnel:?}");
    assert_eq!(lab.up.connections(), 1);
}

/// A CONNECT after a plain request on one connection goes through hyper: its `200` says the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_mode_header_on_the_hyper_connect_path() {
    let lab = lab().await;
    let p = lab.up.port();
    let now = now_unix();
    let a = basic("s-hyper", &egress_token(KEY, "s-hyper", "rep", now, now + 600));
    let mut c = RawClient::connect(lab.proxy.addr).await;
    let get =
        format!("GET http://denied.test:{p}/g HTTP/1.1\r\nHost: denied.test:{p}\r\nProxy-Authorization: {a}\r\n\r\n");
    c.send(get.as_bytes()).await;
    let r = c.response().await.expect("an answer");
    assert_eq!((r.status_line.as_str(), r.body.as_str()), ("HTTP/1.1 200 OK", "hello from up /g\n"));
    assert_eq!(r.header("x-sluice-decision"), Some("allow; would_deny=not_allowlisted; policy=rep"));
    let connect =
        format!("CONNECT blocked.test:{p} HTTP/1.1\r\nHost: blocked.test:{p}\r\nProxy-Authorization: {a}\r\n\r\n");
    c.send(connect.as_bytes()).await;
    let r = c.response().await.expect("an answer");
    assert_eq!(r.status_line, "HTTP/1.1 200 OK");
    assert_eq!(r.header("x-sluice-decision"), Some("allow; would_deny=denylisted; policy=rep"));
    // The tunnel is open: an HTTP exchange through it reaches the upstream.
    c.send(format!("GET /t HTTP/1.1\r\nHost: blocked.test:{p}\r\n\r\n").as_bytes()).await;
    let r = c.response().await.expect("the upstream's answer");
    assert_eq!((r.status_line.as_str(), r.body.as_str()), ("HTTP/1.1 200 OK", "hello from up /t\n"));
    assert_eq!(r.header("x-sluice-decision"), None, "inside the tunnel the upstream answers");
}
