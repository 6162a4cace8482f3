//! The git proxy driven by a real `git` client against a real upstream (`git http-backend` as CGI),
//! everything on 127.0.0.1 port 0. The upstream accepts only the real (canary) token; every byte the
//! tests see, and every log line, is searched for that token.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use sluice::credential::{Claims, Keyring, Kind, SigningKey, now_unix};
use sluice::git::{GitProxy, GitSettings, TokenSource};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const CANARY: &str = "ghs_CanaryRealToken0123456789abcdefXYZ";
const SID: &str = "sess-1";
const BRANCH: &str = "feature";
const Z40: &str = "0000000000000000000000000000000000000000";

// ---------- log capture ----------

#[path = "support/capture.rs"]
mod capture;
use capture::audit;

fn log_lines_for(repo: &str) -> Vec<String> {
    let text = capture::text();
    assert_no_canary("log output", text.as_bytes());
    capture::lines_for_repo(&text, repo)
}

fn canary_forms() -> Vec<String> {
    vec![
        CANARY.to_owned(),
        STANDARD.encode(format!("x-access-token:{CANARY}")),
        STANDARD.encode(CANARY),
        URL_SAFE_NO_PAD.encode(CANARY),
        STANDARD.encode(format!("x-access-token:{CANARY}")).trim_end_matches('=').to_owned(),
    ]
}

fn assert_no_canary(what: &str, bytes: &[u8]) {
    for form in canary_forms() {
        assert!(!bytes.windows(form.len()).any(|w| w == form.as_bytes()), "the real token leaked into {what}");
    }
}

// ---------- temp dirs ----------

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "sluice-git-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[path = "support/cgi.rs"]
mod cgi;
use cgi::{UpstreamState, spawn_upstream};

// ---------- the world: upstream repo, sluice, a git client ----------

struct World {
    _dir: TempDir,
    base: PathBuf,
    upstream: Arc<UpstreamState>,
    /// The upstream's address, as sluice names it in messages.
    up: SocketAddr,
    sluice: SocketAddr,
    keyring: Keyring,
    owner: String,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

struct GitOut {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl World {
    async fn new(name: &str) -> World {
        World::with_token(name, true).await
    }

    async fn with_token(name: &str, token: bool) -> World {
        World::with_settings(name, token, |_| {}).await
    }

    async fn with_settings(name: &str, token: bool, tweak: impl FnOnce(&mut GitSettings)) -> World {
        audit();
        let dir = TempDir::new(name);
        let base = dir.0.clone();
        let owner = format!("t-{name}");
        for d in ["root", "home", "seed"] {
            std::fs::create_dir_all(base.join(d)).unwrap();
        }
        let upstream = Arc::new(UpstreamState {
            root: base.join("root"),
            home: base.join("home"),
            token: token.then(|| CANARY.to_owned()),
            ..UpstreamState::default()
        });
        let mut world = World {
            _dir: dir,
            base: base.clone(),
            upstream: upstream.clone(),
            up: "127.0.0.1:0".parse().unwrap(),
            sluice: "127.0.0.1:0".parse().unwrap(),
            keyring: Keyring::new(SigningKey::from_bytes(&[42u8; 32]).unwrap(), None),
            owner,
            shutdown: None,
        };
        // The upstream repository: main with two commits, hooks recording push options.
        let bare = world.bare();
        world.git_ok(&base, &["init", "-q", "--bare", "-b", "main", bare.to_str().unwrap()]).await;
        for (k, v) in
            [("http.receivepack", "true"), ("uploadpack.allowFilter", "true"), ("receive.advertisePushOptions", "true")]
        {
            world.git_ok(&bare, &["config", k, v]).await;
        }
        let hook = bare.join("hooks/pre-receive");
        std::fs::write(
            &hook,
            format!(
                "#!/bin/sh\ncat >/dev/null\necho \"${{GIT_PUSH_OPTION_COUNT:-0}} ${{GIT_PUSH_OPTION_0:-}}\" > {}\n",
                bare.join("push-options.txt").display()
            ),
        )
        .unwrap();
        std::process::Command::new("chmod").arg("+x").arg(&hook).status().unwrap();
        let seed = base.join("seed");
        world.git_ok(&seed, &["init", "-q", "-b", "main"]).await;
        for i in 1..=2 {
            std::fs::write(seed.join("README"), format!("version {i}\n")).unwrap();
            world.git_ok(&seed, &["add", "README"]).await;
            world.git_ok(&seed, &["commit", "-q", "-m", &format!("commit {i}")]).await;
        }
        world.git_ok(&seed, &["push", "-q", bare.to_str().unwrap(), "main", "main:other"]).await;

        let up_addr = spawn_upstream(upstream).await;
        world.up = up_addr;
        let mut settings =
            GitSettings { upstream: format!("http://{up_addr}"), token_env: None, ..GitSettings::default() };
        tweak(&mut settings);
        if token {
            let token_file = base.join("real-token");
            std::fs::write(&token_file, format!("{CANARY}\n")).unwrap();
            settings.tokens.insert(world.owner.clone(), TokenSource::File(token_file));
        }
        let proxy =
            Arc::new(GitProxy::new(&settings, Some(world.keyring.clone())).unwrap().with_audit(audit().clone()));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        world.sluice = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let shutdown = sluice::listen::Shutdown::default();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let _ = rx.await;
            stop.drain(Duration::from_secs(5)).await;
        });
        tokio::spawn(sluice::git::serve(listener, proxy, shutdown));
        world.shutdown = Some(tx);
        world
    }

    fn repo(&self) -> String {
        format!("{}/widgets", self.owner)
    }

    fn bare(&self) -> PathBuf {
        self.base.join("root").join(&self.owner).join("widgets.git")
    }

    fn claims(&self) -> Claims {
        let now = now_unix();
        Claims::git(SID, &self.repo(), BRANCH, now, now + 3600)
    }

    fn token(&self) -> String {
        self.keyring.mint(&self.claims())
    }

    fn url_with(&self, sid: &str, token: &str) -> String {
        format!("http://{sid}:{token}@{}/{}.git", self.sluice, self.repo())
    }

    fn url(&self) -> String {
        self.url_with(SID, &self.token())
    }

    async fn git(&self, dir: &Path, args: &[&str]) -> GitOut {
        let home = self.base.join("home");
        let mut cmd = tokio::process::Command::new("git");
        cmd.current_dir(dir)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", &home)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("LANG", "C")
            .args(["-c", "user.name=Test", "-c", "user.email=test@example.com", "-c", "init.defaultBranch=main"])
            .args(args)
            .kill_on_drop(true);
        let out = tokio::time::timeout(Duration::from_secs(180), cmd.output()).await.expect("git timed out").unwrap();
        assert_no_canary("git stdout", &out.stdout);
        assert_no_canary("git stderr", &out.stderr);
        GitOut {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    async fn git_ok(&self, dir: &Path, args: &[&str]) -> GitOut {
        let out = self.git(dir, args).await;
        assert!(out.ok, "git {args:?} failed:\n{}\n{}", out.stdout, out.stderr);
        out
    }

    /// A ref in the upstream repository, or `None`.
    async fn upstream_ref(&self, name: &str) -> Option<String> {
        let out = self.git(&self.bare(), &["rev-parse", "--verify", "-q", name]).await;
        out.ok.then(|| out.stdout.trim().to_owned())
    }

    async fn clone(&self, name: &str, extra: &[&str]) -> PathBuf {
        let dest = self.base.join(name);
        let mut args = vec!["clone", "-q"];
        args.extend_from_slice(extra);
        let url = self.url();
        args.push(&url);
        args.push(dest.to_str().unwrap());
        self.git_ok(&self.base, &args).await;
        dest
    }

    async fn commit(&self, dir: &Path, file: &str, text: &str) -> String {
        std::fs::write(dir.join(file), text).unwrap();
        self.git_ok(dir, &["add", file]).await;
        self.git_ok(dir, &["commit", "-q", "-m", &format!("edit {file}")]).await;
        self.git_ok(dir, &["rev-parse", "HEAD"]).await.stdout.trim().to_owned()
    }

    fn upstream_count(&self, key: &str) -> usize {
        self.upstream.by_path.lock().unwrap().get(key).copied().unwrap_or(0)
    }

    fn receive_pack_posts(&self) -> usize {
        self.upstream_count(&format!("POST /{}.git/git-receive-pack", self.repo()))
    }

    /// No request reached the upstream without the real token (the sandbox's never goes upstream).
    fn assert_upstream_saw_only_the_real_token(&self) {
        assert_eq!(
            self.upstream.unauthorized.load(Ordering::SeqCst),
            0,
            "a request reached upstream without the real token"
        );
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

fn stderr_has(out: &GitOut, line: &str) {
    assert!(
        out.stderr.lines().any(|l| l.trim_end() == line),
        "expected the line {line:?} in git's stderr:\n{}",
        out.stderr
    );
}

// ---------- clone, fetch, pull ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clone_fetch_pull_over_protocol_v0_and_v2() {
    let w = World::new("clone").await;
    let main = w.upstream_ref("refs/heads/main").await.unwrap();
    for version in ["0", "2"] {
        let dir = w.clone(&format!("c{version}"), &["-c", &format!("protocol.version={version}")]).await;
        assert_eq!(std::fs::read_to_string(dir.join("README")).unwrap(), "version 2\n");
        assert_eq!(w.git_ok(&dir, &["rev-parse", "HEAD"]).await.stdout.trim(), main);
    }
    // A new upstream commit arrives; fetch and pull it through sluice.
    let seed = w.base.join("seed");
    let next = w.commit(&seed, "README", "version 3\n").await;
    w.git_ok(&seed, &["push", "-q", w.bare().to_str().unwrap(), "main"]).await;
    let dir = w.base.join("c2");
    w.git_ok(&dir, &["-c", "protocol.version=2", "fetch", "-q", "origin"]).await;
    assert_eq!(w.git_ok(&dir, &["rev-parse", "origin/main"]).await.stdout.trim(), next);
    let dir = w.base.join("c0");
    w.git_ok(&dir, &["-c", "protocol.version=0", "pull", "-q", "--ff-only"]).await;
    assert_eq!(std::fs::read_to_string(dir.join("README")).unwrap(), "version 3\n");
    w.assert_upstream_saw_only_the_real_token();
    // git sent its first request without credentials: sluice challenged it, then served it.
    let lines = log_lines_for(&w.repo());
    assert!(lines.iter().any(|l| l.contains("status=401")), "no 401 challenge logged:\n{lines:#?}");
    assert!(
        lines.iter().any(|l| l.contains("session=sess-1") && l.contains("verdict=allow") && l.contains("status=200"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shallow_and_partial_clones_pass_through() {
    let w = World::new("shallow").await;
    for version in ["0", "2"] {
        let v = format!("protocol.version={version}");
        let dir = w.clone(&format!("s{version}"), &["-c", &v, "--depth", "1"]).await;
        assert_eq!(w.git_ok(&dir, &["rev-list", "--count", "HEAD"]).await.stdout.trim(), "1");
    }
    // Partial clone over v2 (what git 2.47 and GitHub use; the lazy blob fetch needs v2 here).
    let dir = w.clone("partial", &["-c", "protocol.version=2", "--filter=blob:none"]).await;
    assert_eq!(w.git_ok(&dir, &["config", "remote.origin.partialclonefilter"]).await.stdout.trim(), "blob:none");
    assert_eq!(std::fs::read_to_string(dir.join("README")).unwrap(), "version 2\n");
    w.assert_upstream_saw_only_the_real_token();
}

/// Partial clone over protocol v0. The filter itself works over v0 (`filter blob:none` in the want list,
/// accepted with `uploadpack.allowFilter`), but the lazy fetch of the blobs checkout needs asks for
/// objects the v0 advertisement never listed, which upload-pack refuses unless the upstream sets
/// `uploadpack.allowAnySHA1InWant` (v2 has no such check; GitHub speaks v2). sluice passes both answers
/// through unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_clone_over_protocol_v0() {
    let w = World::new("partial0").await;
    let seed = w.base.join("seed");
    let head_blob = w.git_ok(&seed, &["rev-parse", "HEAD:README"]).await.stdout.trim().to_owned();
    let old_blob = w.git_ok(&seed, &["rev-parse", "HEAD~1:README"]).await.stdout.trim().to_owned();
    let v0 = ["-c", "protocol.version=0"];
    // Without allowAnySHA1InWant: the filtered clone arrives, its checkout cannot fetch README.
    let dest = w.base.join("p0-strict");
    let url = w.url();
    let args = [&["clone", "-q"][..], &v0, &["--filter=blob:none", &url, dest.to_str().unwrap()]].concat();
    let out = w.git(&w.base, &args).await;
    assert!(!out.ok, "{}", out.stderr);
    stderr_has(&out, &format!("error: Server does not allow request for unadvertised object {head_blob}"));
    stderr_has(&out, &format!("fatal: could not fetch {head_blob} from promisor remote"));
    stderr_has(&out, "warning: Clone succeeded, but checkout failed.");
    assert_eq!(w.git_ok(&dest, &["config", "remote.origin.partialclonefilter"]).await.stdout.trim(), "blob:none");
    let listed = w.git_ok(&dest, &["rev-list", "--objects", "--missing=print", "--all"]).await.stdout;
    let mut missing: Vec<&str> = listed.lines().filter_map(|l| l.strip_prefix('?')).collect();
    missing.sort_unstable();
    let mut both = vec![head_blob.as_str(), old_blob.as_str()];
    both.sort_unstable();
    assert_eq!(missing, both, "no blob came: {listed}");

    // With it (as an upstream serving v0 partial clones must have): clone, checkout, lazy fetch all work.
    w.git_ok(&w.bare(), &["config", "uploadpack.allowAnySHA1InWant", "true"]).await;
    let dir = w.clone("p0", &[&v0[..], &["--filter=blob:none"]].concat()).await;
    assert_eq!(w.git_ok(&dir, &["config", "remote.origin.partialclonefilter"]).await.stdout.trim(), "blob:none");
    assert_eq!(std::fs::read_to_string(dir.join("README")).unwrap(), "version 2\n");
    // The first commit's README ("version 1") was never fetched: the clone is partial.
    let listed = w.git_ok(&dir, &["rev-list", "--objects", "--missing=print", "--all"]).await.stdout;
    let missing: Vec<&str> = listed.lines().filter_map(|l| l.strip_prefix('?')).collect();
    assert_eq!(missing, [old_blob.as_str()], "{listed}");
    // Asking for it fetches it lazily, over v0 again.
    let shown = w.git_ok(&dir, &[&v0[..], &["show", "HEAD~1:README"]].concat()).await.stdout;
    assert_eq!(shown, "version 1\n");
    let listed = w.git_ok(&dir, &["rev-list", "--objects", "--missing=print", "--all"]).await.stdout;
    assert!(!listed.lines().any(|l| l.starts_with('?')), "{listed}");
    w.assert_upstream_saw_only_the_real_token();
}

// ---------- pushes that are allowed ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_creates_and_updates_the_working_branch_with_push_options() {
    let w = World::new("push").await;
    let dir = w.clone("work", &[]).await;
    w.git_ok(&dir, &["checkout", "-q", "-b", BRANCH]).await;
    let first = w.commit(&dir, "a.txt", "a\n").await;
    w.git_ok(&dir, &["push", "-q", "origin", BRANCH]).await;
    assert_eq!(w.upstream_ref("refs/heads/feature").await.as_deref(), Some(first.as_str()));
    let second = w.commit(&dir, "a.txt", "b\n").await;
    w.git_ok(&dir, &["push", "-q", "-o", "k=v", "origin", BRANCH]).await;
    assert_eq!(w.upstream_ref("refs/heads/feature").await.as_deref(), Some(second.as_str()));
    assert_eq!(std::fs::read_to_string(w.bare().join("push-options.txt")).unwrap(), "1 k=v\n");
    w.assert_upstream_saw_only_the_real_token();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_push_uses_the_probe_and_chunked_body() {
    let w = World::new("large").await;
    let dir = w.clone("work", &[]).await;
    w.git_ok(&dir, &["checkout", "-q", "-b", BRANCH]).await;
    std::fs::write(dir.join("blob.bin"), cgi::noise(3 << 20, 0x9e37_79b9_7f4a_7c15)).unwrap();
    w.git_ok(&dir, &["add", "blob.bin"]).await;
    w.git_ok(&dir, &["commit", "-q", "-m", "big"]).await;
    let head = w.git_ok(&dir, &["rev-parse", "HEAD"]).await.stdout.trim().to_owned();
    w.git_ok(&dir, &["-c", "http.postBuffer=65536", "push", "-q", "origin", BRANCH]).await;
    assert_eq!(w.upstream_ref("refs/heads/feature").await.as_deref(), Some(head.as_str()));
    // The probe (`0000`) and the pack: two POSTs upstream.
    assert_eq!(w.receive_pack_posts(), 2);
    w.assert_upstream_saw_only_the_real_token();
}

// ---------- pushes that are refused ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_to_main_is_rejected_with_the_reason() {
    let w = World::new("main").await;
    let before = w.upstream_ref("refs/heads/main").await;
    let dir = w.clone("work", &[]).await;
    w.commit(&dir, "a.txt", "a\n").await;
    let out = w.git(&dir, &["push", "origin", "main"]).await;
    assert!(!out.ok);
    stderr_has(&out, " ! [remote rejected] main -> main (push restricted to refs/heads/feature)");
    stderr_has(&out, "remote: sluice: this session may push only to refs/heads/feature; nothing was sent upstream");
    assert_eq!(w.upstream_ref("refs/heads/main").await, before);
    assert_eq!(w.receive_pack_posts(), 0);
    // A big refused push (chunked, after the probe) gets the same answer.
    std::fs::write(dir.join("blob.bin"), cgi::noise(2 << 20, 7)).unwrap();
    w.git_ok(&dir, &["add", "blob.bin"]).await;
    w.git_ok(&dir, &["commit", "-q", "-m", "big"]).await;
    let out = w.git(&dir, &["-c", "http.postBuffer=65536", "push", "origin", "main"]).await;
    assert!(!out.ok);
    stderr_has(&out, " ! [remote rejected] main -> main (push restricted to refs/heads/feature)");
    assert_eq!(w.upstream_ref("refs/heads/main").await, before);
    assert_eq!(w.receive_pack_posts(), 1, "only the empty probe was forwarded");
    let lines = log_lines_for(&w.repo());
    assert!(
        lines.iter().any(|l| l.contains("verdict=deny")
            && l.contains("reason=branch_not_allowed ")
            && l.contains("detail=\"refs/heads/main: push restricted to refs/heads/feature\"")),
        "{lines:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_bad_ref_refuses_the_whole_push_in_either_order() {
    let w = World::new("tworefs").await;
    let before_main = w.upstream_ref("refs/heads/main").await;
    let dir = w.clone("work", &[]).await;
    w.commit(&dir, "a.txt", "a\n").await;
    w.git_ok(&dir, &["branch", BRANCH]).await;
    for order in [["main", BRANCH], [BRANCH, "main"]] {
        let out = w.git(&dir, &["push", "origin", order[0], order[1]]).await;
        assert!(!out.ok);
        stderr_has(&out, " ! [remote rejected] main -> main (push restricted to refs/heads/feature)");
        stderr_has(
            &out,
            " ! [remote rejected] feature -> feature (refused with the rest of the push; only refs/heads/feature may be pushed)",
        );
        assert_eq!(w.upstream_ref("refs/heads/main").await, before_main);
        assert_eq!(w.upstream_ref("refs/heads/feature").await, None);
    }
    assert_eq!(w.receive_pack_posts(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletes_and_tags_are_rejected() {
    let w = World::new("deltags").await;
    let dir = w.clone("work", &[]).await;
    // The working branch exists upstream (pushed through sluice), then deleting it is refused.
    w.git_ok(&dir, &["push", "-q", "origin", "main:refs/heads/feature"]).await;
    let feature = w.upstream_ref("refs/heads/feature").await;
    assert!(feature.is_some());
    let out = w.git(&dir, &["push", "origin", "--delete", BRANCH]).await;
    assert!(!out.ok);
    stderr_has(&out, " ! [remote rejected] feature (deleting refs/heads/feature is not allowed)");
    let out = w.git(&dir, &["push", "origin", "--delete", "other"]).await;
    assert!(!out.ok);
    stderr_has(&out, " ! [remote rejected] other (push restricted to refs/heads/feature)");
    assert_eq!(w.upstream_ref("refs/heads/feature").await, feature);
    assert!(w.upstream_ref("refs/heads/other").await.is_some());

    w.git_ok(&dir, &["tag", "light"]).await;
    w.git_ok(&dir, &["tag", "-a", "-m", "annotated", "annotated"]).await;
    let out = w.git(&dir, &["push", "origin", "light"]).await;
    stderr_has(&out, " ! [remote rejected] light -> light (push restricted to refs/heads/feature)");
    let out = w.git(&dir, &["push", "origin", "annotated"]).await;
    stderr_has(&out, " ! [remote rejected] annotated -> annotated (push restricted to refs/heads/feature)");
    let out = w.git(&dir, &["push", "origin", "--tags"]).await;
    assert!(!out.ok);
    stderr_has(&out, " ! [remote rejected] annotated -> annotated (push restricted to refs/heads/feature)");
    stderr_has(&out, " ! [remote rejected] light -> light (push restricted to refs/heads/feature)");
    assert_eq!(w.upstream_ref("refs/tags/light").await, None);
    assert_eq!(w.upstream_ref("refs/tags/annotated").await, None);
    assert_eq!(w.receive_pack_posts(), 1, "only the allowed creation of feature went upstream");
}

// ---------- credentials ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_are_refused_at_discovery_and_nothing_goes_upstream() {
    let w = World::new("creds").await;
    let good = w.token();
    let (payload, _) = good.strip_prefix("v1.").unwrap().split_once('.').unwrap();
    let other_key = Keyring::new(SigningKey::from_bytes(&[b'k'; 32]).unwrap(), None);
    let tampered = {
        let mut claims = w.claims();
        claims.branch = Some("main".into());
        let sig = good.rsplit_once('.').unwrap().1;
        format!("v1.{}.{sig}", URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap()))
    };
    assert_ne!(payload, tampered.split('.').nth(1).unwrap());
    let expired = w.keyring.mint(&Claims { iat: now_unix() - 7200, exp: now_unix() - 600, ..w.claims() });
    let other_repo = w.keyring.mint(&Claims { repo: Some(format!("{}/gears", w.owner)), ..w.claims() });
    let egress = w.keyring.mint(&Claims {
        kind: Kind::Egress,
        repo: None,
        branch: None,
        policy: Some("trusted".into()),
        ..w.claims()
    });
    let cases = [
        (
            SID,
            other_key.mint(&w.claims()),
            "credential signature does not verify (forged, altered, or signed with another key)".to_owned(),
        ),
        (
            SID,
            tampered,
            "credential signature does not verify (forged, altered, or signed with another key)".to_owned(),
        ),
        (SID, expired, "credential expired 10m ago".to_owned()),
        (
            SID,
            other_repo,
            format!("it is for {0}/gears, not {0}/widgets; ask for a credential for {0}/widgets", w.owner),
        ),
        (SID, egress, "this is an egress credential; a git credential is needed here".to_owned()),
        ("sess-2", good.clone(), "the session id given with the credential is not the one it was issued to".to_owned()),
        (SID, "not-a-token".to_owned(), "malformed credential: expected a v1. token".to_owned()),
    ];
    for (sid, token, message) in cases {
        let url = w.url_with(sid, &token);
        for service in [&["ls-remote", url.as_str()][..], &["push", url.as_str(), "main:feature"][..]] {
            let dir = w.base.join("seed");
            let out = w.git(&dir, service).await;
            assert!(!out.ok, "{service:?} succeeded");
            if std::env::var_os("SHOW_GIT_STDERR").is_some() {
                eprintln!("{service:?}:\n{}", out.stderr);
            }
            stderr_has(&out, &format!("remote: sluice: git credential refused: {message}"));
        }
    }
    assert_eq!(w.upstream.requests.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_real_token_clone_works_and_push_is_refused() {
    let w = World::with_token("notoken", false).await;
    let dir = w.clone("work", &[]).await;
    assert_eq!(std::fs::read_to_string(dir.join("README")).unwrap(), "version 2\n");
    assert_eq!(w.upstream.authorization_seen.load(Ordering::SeqCst), 0, "an Authorization header went upstream");
    w.git_ok(&dir, &["checkout", "-q", "-b", BRANCH]).await;
    let out = w.git(&dir, &["push", "origin", BRANCH]).await;
    assert!(!out.ok);
    stderr_has(
        &out,
        &format!(
            "remote: sluice: no upstream credential is configured for {}, so pushes are refused (clone and fetch of \
             public repositories still work); the operator sets token_env, token_file or [git.tokens]",
            w.repo()
        ),
    );
    assert_eq!(w.upstream_ref("refs/heads/feature").await, None);
}

// ---------- raw requests: routes, challenges, malformed and gzip pushes ----------

async fn raw(addr: SocketAddr, request: Vec<u8>) -> (u16, String, Vec<u8>) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(&request).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out)).await.unwrap().unwrap();
    assert_no_canary("a raw response", &out);
    let end = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&out[..end]).into_owned();
    let status = head[9..12].parse().unwrap();
    let body = out[end + 4..].to_vec();
    (status, head, body)
}

fn post(w: &World, path: &str, auth: Option<&str>, extra: &str, body: &[u8]) -> Vec<u8> {
    let auth = auth.map(|a| format!("Authorization: Basic {}\r\n", STANDARD.encode(a))).unwrap_or_default();
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: {}\r\n{auth}{extra}Content-Type: application/x-git-receive-pack-request\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        w.sluice,
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    req
}

fn pkt(s: &[u8]) -> Vec<u8> {
    let mut v = format!("{:04x}", s.len() + 4).into_bytes();
    v.extend_from_slice(s);
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_requests_get_exact_answers() {
    let w = World::new("raw").await;
    let creds = format!("{SID}:{}", w.token());
    let path = format!("/{}.git/git-receive-pack", w.repo());

    let get = |p: &str, auth: Option<&str>| {
        let auth = auth.map(|a| format!("Authorization: Basic {}\r\n", STANDARD.encode(a))).unwrap_or_default();
        format!("GET {p} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n").into_bytes()
    };
    let (status, head, body) =
        raw(w.sluice, get(&format!("/{}.git/info/refs?service=git-upload-pack", w.repo()), None)).await;
    assert_eq!(status, 401);
    assert!(head.to_ascii_lowercase().contains("www-authenticate: basic realm=\"sluice-git\""), "{head}");
    assert_eq!(
        String::from_utf8_lossy(&body),
        "sluice: credentials required: use http://SESSION:CREDENTIAL@HOST/OWNER/REPO.git as the remote URL or a credential helper\n"
    );
    // `/api/` is the pull-request slice (tests/git_api.rs): this credential is for another repository.
    let (status, _, body) = raw(w.sluice, get("/api/repos/x/y/pulls", Some(&creds))).await;
    let message =
        format!("sluice: git credential refused: it is for {}, not x/y; ask for a credential for x/y", w.repo());
    assert_eq!(
        (status, serde_json::from_slice::<serde_json::Value>(&body).ok()),
        (
            403,
            Some(
                serde_json::json!({"message": message, "documentation_url": "https://docs.github.com/rest/pulls/pulls"})
            )
        )
    );
    let (status, _, body) = raw(w.sluice, get("/%61pi/repos/x/y/pulls", Some(&creds))).await;
    assert_eq!(
        (status, String::from_utf8_lossy(&body).as_ref()),
        (404, "sluice: \"/%61pi/repos/x/y/pulls\": spell API requests /api/repos/OWNER/REPO/… without %-escapes\n")
    );
    let (status, _, _) = raw(w.sluice, get(&format!("/{}.git/HEAD", w.repo()), Some(&creds))).await;
    assert_eq!(status, 404);

    // A malformed command list fails closed with an ERR line.
    let (status, head, body) = raw(w.sluice, post(&w, &path, Some(&creds), "", b"00zzjunk")).await;
    assert_eq!(status, 200);
    assert!(head.contains("application/x-git-receive-pack-result"), "{head}");
    assert_eq!(
        String::from_utf8_lossy(&body),
        "0061ERR sluice: push request: malformed pkt-line at byte 0: length \"00zz\" is not four hex digits\n"
    );

    // A gzip-encoded push to main is decoded, judged and refused, ng for every ref.
    let a = "1".repeat(40);
    let mut list = pkt(format!("{Z40} {a} refs/heads/feature\0report-status").as_bytes());
    list.extend(pkt(format!("{Z40} {a} refs/heads/main").as_bytes()));
    list.extend_from_slice(b"0000PACK");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&list).unwrap();
    let gz = gz.finish().unwrap();
    let (status, _, body) = raw(w.sluice, post(&w, &path, Some(&creds), "Content-Encoding: gzip\r\n", &gz)).await;
    assert_eq!(status, 200);
    assert_eq!(
        String::from_utf8_lossy(&body),
        "000eunpack ok\n\
         0063ng refs/heads/feature refused with the rest of the push; only refs/heads/feature may be pushed\n\
         003dng refs/heads/main push restricted to refs/heads/feature\n0000"
    );
    // The probe is forwarded (and answered by upstream).
    let (status, _, _) = raw(w.sluice, post(&w, &path, Some(&creds), "", b"0000")).await;
    assert_eq!(status, 200);
    assert_eq!(w.receive_pack_posts(), 1);
    // A push with a bad credential is answered with ng lines too (never a bare 403).
    let bad = format!("{SID}:v1.bad.sig");
    let (status, _, body) = raw(w.sluice, post(&w, &path, Some(&bad), "", &list)).await;
    assert_eq!(status, 200);
    assert!(
        String::from_utf8_lossy(&body)
            .contains("ng refs/heads/main git credential refused: credential signature does not verify"),
        "{}",
        String::from_utf8_lossy(&body)
    );
    assert_eq!(w.receive_pack_posts(), 1);
}

// ---------- upstream errors ----------

/// An upstream error body with the real token (in each of its forms) across the 16 KiB the client is
/// shown: neither the token nor any 8-byte piece of it reaches the client or the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_across_the_error_cut_is_redacted_whole() {
    const LIMIT: usize = 16 << 10;
    let w = World::new("errcut").await;
    let creds = format!("{SID}:{}", w.token());
    let get = format!(
        "GET /{}.git/info/refs?service=git-upload-pack HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {}\r\n\
         Connection: close\r\n\r\n",
        w.repo(),
        STANDARD.encode(&creds)
    );
    let mut cases = 0;
    for form in canary_forms() {
        for start in [LIMIT - form.len() - 1, LIMIT - 20, LIMIT - 8, LIMIT - 1, LIMIT, LIMIT + 1] {
            let mut body = vec![b'x'; start];
            body.extend_from_slice(form.as_bytes());
            body.extend_from_slice(b" and the rest of the error");
            *w.upstream.error_body.lock().unwrap() = Some(body);
            let (status, _, answer) = raw(w.sluice, get.clone().into_bytes()).await;
            let text = String::from_utf8_lossy(&answer).into_owned();
            assert_eq!(status, 502, "{text}");
            let prefix = format!("sluice: {} answered 500 Internal Server Error for {}: ", w.up, w.repo());
            assert!(text.starts_with(&prefix), "{text}");
            let shown = &text[prefix.len()..];
            for piece in form.as_bytes().windows(8) {
                assert!(!shown.as_bytes().windows(8).any(|w| w == piece), "start {start}: {shown:?}");
            }
            if start <= LIMIT - 10 {
                assert!(shown.contains("[redacted]"), "start {start}: {}", &shown[shown.len() - 40..]);
            }
            cases += 1;
        }
    }
    assert_eq!(cases, 30);
    // The log lines (the reason carries the same text) hold no token either.
    let lines = log_lines_for(&w.repo());
    for form in canary_forms() {
        for piece in form.as_bytes().windows(8) {
            assert!(!lines.iter().any(|l| l.as_bytes().windows(8).any(|w| w == piece)), "the log has a piece");
        }
    }
    assert_eq!(lines.iter().filter(|l| l.contains("status=502")).count(), 30);
}

// ---------- the listener under pressure ----------

/// At most `[git] max_connections` connections are served at once (the next is answered 503 and
/// closed), and an upload that stalls for `[git] body_timeout` is abandoned, which frees its slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cap_and_stalled_uploads() {
    let w = World::with_settings("cap", true, |s| {
        s.max_connections = 1;
        s.body_timeout = sluice::config::Seconds(Duration::from_secs(1));
    })
    .await;
    let creds = STANDARD.encode(format!("{SID}:{}", w.token()));
    // A push to the working branch whose pack never comes: the command list, then silence, with a
    // Content-Length that promises far more.
    let list =
        [pkt(format!("{Z40} {} refs/heads/{BRANCH}\0report-status", "1".repeat(40)).as_bytes()), b"0000".to_vec()]
            .concat();
    let head = format!(
        "POST /{}.git/git-receive-pack HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {creds}\r\n\
         Content-Type: application/x-git-receive-pack-request\r\nContent-Length: 1000000\r\n\r\n",
        w.repo()
    );
    let mut stalled = tokio::net::TcpStream::connect(w.sluice).await.unwrap();
    stalled.write_all(head.as_bytes()).await.unwrap();
    stalled.write_all(&list).await.unwrap();

    // The stalled upload holds the only slot: the next connection is told so, in words.
    let get = b"GET /x/y.git/info/refs?service=git-upload-pack HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let (status, head, body) = raw(w.sluice, get.to_vec()).await;
    assert_eq!(
        (status, String::from_utf8_lossy(&body).as_ref()),
        (503, "sluice: the git proxy is at its connection limit (1 connection); retry shortly\n"),
        "{head}"
    );

    // After a second of silence the upload is abandoned: the upstream sees its request end and
    // answers, and the client's connection closes (the body it promised never came).
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), stalled.read_to_end(&mut answer))
        .await
        .expect("the stalled upload is abandoned")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 "), "{answer}");

    // Its slot is free again.
    let mut served = None;
    for _ in 0..50 {
        let (status, _, body) = raw(w.sluice, get.to_vec()).await;
        if status != 503 {
            served = Some((status, body));
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(served.expect("a slot frees up").0, 401);
}
