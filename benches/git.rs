//! Clone and push a large repository directly and through sluice's git proxy, and print the times,
//! the ratio and sluice's RSS growth. Size: SLUICE_BENCH_GIT_MB (default 50). Not a test: a number
//! for a person; the target is "through sluice within 1.2x of direct".

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice::credential::{Claims, Keyring, SigningKey, now_unix};
use sluice::git::{GitProxy, GitSettings, TokenSource};
use tokio::net::TcpListener;

#[path = "../tests/support/cgi.rs"]
#[allow(dead_code)]
mod cgi;

const TOKEN: &str = "ghs_BenchRealToken";
const RUNS: usize = 3;

fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

async fn git(home: &Path, dir: &Path, args: &[&str]) -> Duration {
    let start = Instant::now();
    let out = tokio::process::Command::new("git")
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", home)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_TERMINAL_PROMPT", "0")
        .args(["-c", "user.name=Bench", "-c", "user.email=bench@example.com", "-c", "init.defaultBranch=main"])
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run git: {e}"));
    assert!(out.status.success(), "git {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    start.elapsed()
}

/// A commit of `mb` MiB of incompressible files on top of the current HEAD.
async fn add_data(home: &Path, dir: &Path, mb: usize, seed: u64) {
    let files = mb.div_ceil(5).max(1);
    for i in 0..files {
        std::fs::write(dir.join(format!("data-{seed}-{i}.bin")), cgi::noise((mb << 20) / files, seed + i as u64))
            .unwrap();
    }
    git(home, dir, &["add", "-A"]).await;
    git(home, dir, &["commit", "-q", "-m", "data"]).await;
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mb: usize = std::env::var("SLUICE_BENCH_GIT_MB").ok().and_then(|v| v.parse().ok()).unwrap_or(50);
    let base: PathBuf = std::env::temp_dir().join(format!("sluice-bench-git-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let (root, home, seed) = (base.join("root"), base.join("home"), base.join("seed"));
    for d in [&root, &home, &seed] {
        std::fs::create_dir_all(d).unwrap();
    }
    let bare = root.join("acme/big.git");
    git(&home, &base, &["init", "-q", "--bare", "-b", "main", bare.to_str().unwrap()]).await;
    git(&home, &bare, &["config", "http.receivepack", "true"]).await;
    git(&home, &seed, &["init", "-q", "-b", "main"]).await;
    add_data(&home, &seed, mb, 1).await;
    git(&home, &seed, &["push", "-q", bare.to_str().unwrap(), "main"]).await;

    let state = Arc::new(cgi::UpstreamState {
        root: root.clone(),
        home: home.clone(),
        token: Some(TOKEN.into()),
        ..cgi::UpstreamState::default()
    });
    let upstream = cgi::spawn_upstream(state).await;
    let token_file = base.join("token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let mut settings =
        GitSettings { upstream: format!("http://{upstream}"), token_env: None, ..GitSettings::default() };
    settings.tokens.insert("acme".into(), TokenSource::File(token_file));
    let keyring = Keyring::new(SigningKey::from_bytes(&[b'b'; 32]).unwrap(), None);
    let now = now_unix();
    let credential = keyring.mint(&Claims::git("bench", "acme/big", "feature", now, now + 3600));
    let proxy = Arc::new(GitProxy::new(&settings, Some(keyring)).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sluice = listener.local_addr().unwrap();
    tokio::spawn(sluice::git::serve(listener, proxy, sluice::listen::Shutdown::default()));

    let direct_url = format!("http://x-access-token:{TOKEN}@{upstream}/acme/big.git");
    let sluice_url = format!("http://bench:{credential}@{sluice}/acme/big.git");
    let rss_before = rss_kib();

    let (mut direct, mut through) = (Vec::new(), Vec::new());
    for run in 0..RUNS {
        for (url, times, name) in [(&direct_url, &mut direct, "d"), (&sluice_url, &mut through, "s")] {
            let dest = base.join(format!("clone-{name}-{run}"));
            times.push(git(&home, &base, &["clone", "-q", url, dest.to_str().unwrap()]).await);
            let _ = std::fs::remove_dir_all(&dest);
        }
    }
    let (clone_direct, clone_sluice) = (median(direct), median(through));

    // Pushes: a fresh commit of the same size each time, so every push carries the whole pack.
    let (mut direct, mut through) = (Vec::new(), Vec::new());
    for run in 0..RUNS {
        for (url, times, branch, seed_no) in [
            (&direct_url, &mut direct, format!("direct-{run}"), 100 + run),
            (&sluice_url, &mut through, "feature".to_owned(), 200 + run),
        ] {
            git(&home, &seed, &["checkout", "-q", "-B", &format!("work-{seed_no}"), "main"]).await;
            add_data(&home, &seed, mb, seed_no as u64 * 1000).await;
            let refspec = format!("HEAD:refs/heads/{branch}");
            times.push(git(&home, &seed, &["push", "-q", "-f", url, &refspec]).await);
        }
    }
    let (push_direct, push_sluice) = (median(direct), median(through));
    let rss_after = rss_kib();

    println!("git bench: {mb} MiB repository, median of {RUNS} runs");
    for (what, d, s) in [("clone", clone_direct, clone_sluice), ("push", push_direct, push_sluice)] {
        println!(
            "{what:>5}: direct {:>8.3}s  through sluice {:>8.3}s  ratio {:.2}x",
            d.as_secs_f64(),
            s.as_secs_f64(),
            s.as_secs_f64() / d.as_secs_f64()
        );
    }
    match (rss_before, rss_after) {
        (Some(b), Some(a)) => println!("process RSS: {b} KiB before, {a} KiB after ({:+} KiB)", a as i64 - b as i64),
        _ => println!("process RSS: not measurable on this platform"),
    }
    let _ = std::fs::remove_dir_all(&base);
}
