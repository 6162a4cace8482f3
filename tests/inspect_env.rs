//! `sluice env`: the lines a sandbox sources, checked as a shell reads them, and used by real clients
//! (curl, Python urllib) with nothing but those variables to reach an upstream through sluice.

mod support;

use std::collections::BTreeMap;
use std::process::Command;

use support::*;

const KEY: &[u8] = b"0123456789abcdef0123456789abcdef-env-test";

fn sluice_env(dir: &TempDir, args: &[&str]) -> (i32, String, String) {
    let key = dir.path().join("key");
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("env")
        .args(args)
        .args(["--key-file", key.to_str().unwrap()])
        .current_dir(dir.path())
        .output()
        .expect("run sluice env");
    (out.status.code().unwrap_or(-1), String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
}

/// The environment a POSIX shell has after sourcing `script` (starting from an empty one).
fn sourced(dir: &TempDir, script: &str) -> BTreeMap<String, String> {
    let path = dir.write("env.sh", script);
    let out = Command::new("sh")
        .args(["-c", &format!(". {} && env -0", path.display())])
        .env_clear()
        .output()
        .expect("run sh");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout)
        .unwrap()
        .split('\0')
        .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect()
}

#[test]
fn env_prints_the_proxy_with_a_credential_and_every_ca_variable() {
    let dir = TempDir::new("env-lines");
    dir.write("key", KEY);
    let (code, out, err) = sluice_env(&dir, &["--session", "s-1", "--policy", "lab", "--proxy", "10.0.0.5:3128"]);
    assert_eq!(code, 0, "{err}");
    let vars = sourced(&dir, &out);
    let proxy = &vars["HTTPS_PROXY"];
    let token = proxy.strip_prefix("http://s-1:").and_then(|r| r.strip_suffix("@10.0.0.5:3128")).expect(proxy);
    for name in ["https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "npm_config_proxy", "npm_config_https_proxy"] {
        assert_eq!(&vars[name], proxy, "{name}");
    }
    assert_eq!(vars["NO_PROXY"], "");
    assert_eq!(vars["no_proxy"], "");
    let bundle = "/etc/ssl/certs/ca-certificates.crt";
    for name in [
        "SSL_CERT_FILE",
        "CURL_CA_BUNDLE",
        "REQUESTS_CA_BUNDLE",
        "PIP_CERT",
        "GIT_SSL_CAINFO",
        "CARGO_HTTP_CAINFO",
        "NPM_CONFIG_CAFILE",
    ] {
        assert_eq!(vars[name], bundle, "{name}");
    }
    assert_eq!(vars["NODE_EXTRA_CA_CERTS"], "/usr/local/share/ca-certificates/sluice.crt");
    assert_eq!(vars["NODE_USE_ENV_PROXY"], "1");
    let java = &vars["JAVA_TOOL_OPTIONS"];
    assert!(java.contains("-Dhttps.proxyHost=10.0.0.5 -Dhttps.proxyPort=3128"), "{java}");
    assert!(java.contains("-Djdk.http.auth.tunneling.disabledSchemes= "), "{java}");
    assert!(out.contains("update-ca-certificates"), "{out}");

    // The credential is a real one, for this session and policy.
    let key = dir.path().join("key");
    let inspect = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["token", "inspect", token, "--key-file", key.to_str().unwrap()])
        .output()
        .expect("token inspect");
    let text = String::from_utf8(inspect.stdout).unwrap();
    assert!(text.contains("verifies: yes"), "{text}");
    assert!(text.contains("\"sid\":\"s-1\"") && text.contains("\"policy\":\"lab\""), "{text}");

    let (code, _, err) = sluice_env(&dir, &["--session", "bad session"]);
    assert_eq!(code, 2);
    assert!(err.starts_with("sluice env: invalid session id \"bad session\""), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_and_python_reach_an_upstream_with_only_the_printed_variables() {
    let dir = TempDir::new("env-clients");
    let key = dir.write("key", KEY);
    let upstream = Upstream::plain("api").await;
    let port = upstream.port();
    let config = format!(
        "[egress]\npolicy = \"none\"\n[auth]\nanonymous = false\nkey_file = {key:?}\n[resolver]\nhosts = {{ \"api.test\" = [\"127.0.0.1\"] }}\n"
    );
    let lab = format!(
        "version = 1\nname = \"lab\"\nlevel = \"custom\"\nallow = [\"api.test:{port}\"]\nallow_ips = [\"127.0.0.0/8\"]\ninspect = \"off\"\n\
         [[requests]]\nhosts = [\"api.test\"]\nmethods = [\"GET\"]\npaths = [\"/ok/**\"]\naction = \"allow\"\n"
    );
    let proxy = Proxy::start_recorded(dir, &config, &[("lab.toml", &lab)]).await;
    let work = TempDir::new("env-clients-work");
    work.write("key", KEY);
    let addr = proxy.addr.to_string();
    let (code, script, err) = sluice_env(&work, &["--session", "py-1", "--policy", "lab", "--proxy", &addr]);
    assert_eq!(code, 0, "{err}");
    let script = work.write("env.sh", &script);
    let url = format!("http://api.test:{port}/ok/curl");
    let (code, out, err) = run_sourced(&script, &format!("curl -sS {url}")).await;
    assert_eq!((code, out.as_str()), (Some(0), "hello from api /ok/curl\n"), "{err}");
    let py = format!(
        "python3 -c 'import urllib.request; print(urllib.request.urlopen(\"http://api.test:{port}/ok/python\").read().decode(), end=\"\")'"
    );
    let (code, out, err) = run_sourced(&script, &py).await;
    assert_eq!((code, out.as_str()), (Some(0), "hello from api /ok/python\n"), "{err}");
    // The policy's request rules apply to them too.
    let (code, out, _) =
        run_sourced(&script, &format!("curl -sS -o /dev/null -w '%{{http_code}}' http://api.test:{port}/other")).await;
    assert_eq!((code, out.as_str()), (Some(0), "403"));
    let records: Vec<serde_json::Value> = proxy
        .records()
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|v: &serde_json::Value| v["event"] == "decision")
        .collect();
    let sessions: Vec<(&str, &str)> =
        records.iter().map(|r| (r["session"].as_str().unwrap_or(""), r["reason"].as_str().unwrap_or(""))).collect();
    assert_eq!(sessions, [("py-1", "request_allowed"), ("py-1", "request_allowed"), ("py-1", "no_request_rule")]);
}
