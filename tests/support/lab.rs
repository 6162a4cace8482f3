//! The refusal lab the answer and record suites share: sluice with anonymous use off and three custom
//! policies over an echo listener and a plain upstream, plus the credentials they are asked with.
//!
//! `lab` allows `echo.test`, `plain.test` and `nowhere.test` (a name the resolver does not know), `slow`
//! the same at burst 1 and 0.5 requests a second, `one` the same with one tunnel at a time.

use sluice::credential::{Claims, Keyring, SigningKey, now_unix};

use super::{Proxy, Recorder, TempDir, Upstream, basic, egress_token};

/// An egress credential for session `sid` under `policy`, signed with `key`, valid for ten minutes.
pub fn auth(key: &[u8], sid: &str, policy: &str) -> String {
    let now = now_unix();
    basic(sid, &egress_token(key, sid, policy, now, now + 600))
}

/// A git credential for session `sid` on `repo`, pushing to `branch`, signed with `key`.
pub fn git_auth(key: &[u8], sid: &str, repo: &str, branch: &str) -> String {
    let now = now_unix();
    let keyring = Keyring::new(SigningKey::from_bytes(key).expect("a test key"), None);
    basic(sid, &keyring.mint(&Claims::git(sid, repo, branch, now, now + 600)))
}

/// A custom policy allowing `allow` (and loopback addresses), with `limits` appended as they are.
pub fn custom(name: &str, allow: &[String], limits: &str) -> String {
    let list: Vec<String> = allow.iter().map(|a| format!("{a:?}")).collect();
    format!(
        "version = 1\nname = \"{name}\"\nlevel = \"custom\"\nallow = [{}]\nallow_ips = [\"127.0.0.0/8\"]\n{limits}",
        list.join(", ")
    )
}

pub struct Lab {
    pub proxy: Proxy,
    pub echo: Recorder,
    pub plain: Upstream,
}

impl Lab {
    /// The lab in a temp dir named after `suite`, signing with `key`, with `extra_egress` lines in its
    /// `[egress]` table; `recorded` captures its audit stream.
    pub async fn start(suite: &str, key: &[u8], extra_egress: &str, recorded: bool) -> Lab {
        let echo = Recorder::start().await;
        let plain = Upstream::plain("plain").await;
        let allow =
            vec![format!("echo.test:{}", echo.port()), format!("plain.test:{}", plain.port()), "nowhere.test".into()];
        let dir = TempDir::new(suite);
        let key = dir.write("key", key);
        let config = format!(
            "[egress]\npolicy = \"lab\"\n{extra_egress}\n[auth]\nanonymous = false\nkey_file = {:?}\n[resolver]\nhosts = {{ \"echo.test\" = [\"127.0.0.1\"], \"plain.test\" = [\"127.0.0.1\"] }}\n",
            key.display()
        );
        let policies = [
            ("lab.toml", custom("lab", &allow, "")),
            ("slow.toml", custom("slow", &allow, "[limits]\nrequests_per_second = 0.5\nburst = 1\n")),
            ("one.toml", custom("one", &allow, "[limits]\nmax_tunnels = 1\n")),
        ];
        let policies: Vec<(&str, &str)> = policies.iter().map(|(n, t)| (*n, t.as_str())).collect();
        let proxy = if recorded {
            Proxy::start_recorded(dir, &config, &policies).await
        } else {
            Proxy::start_in(dir, &config, &policies).await
        };
        Lab { proxy, echo, plain }
    }

    /// A plain-HTTP GET of `/x` on the plain upstream, under `authorization`.
    pub fn get(&self, authorization: &str) -> String {
        let p = self.plain.port();
        format!(
            "GET http://plain.test:{p}/x HTTP/1.1\r\nHost: plain.test:{p}\r\nProxy-Authorization: {authorization}\r\n\r\n"
        )
    }
}
