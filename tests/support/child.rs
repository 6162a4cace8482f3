//! `sluice serve` as a child process, for tests that need the real binary: signals, exit status, its
//! own RSS, its log on stderr.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A `sluice serve` child process whose stderr (the JSON log) is collected line by line.
pub struct Sluice {
    pub child: Child,
    pub log: Arc<Mutex<Vec<String>>>,
    pub egress: SocketAddr,
    pub admin: SocketAddr,
}

impl Sluice {
    pub fn start(dir: &Path, config: &str) -> Sluice {
        let config_path = dir.join("sluice.toml");
        std::fs::write(&config_path, config).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["serve", "--config"])
            .arg(&config_path)
            .current_dir(dir)
            .env_remove("SLUICE_SIGNING_KEY")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let line = wait_for(&log, "sluice listening", Duration::from_secs(20));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        let egress = v["egress"].as_str().unwrap().parse().unwrap();
        let admin = v["admin"].as_str().unwrap().parse().unwrap();
        Sluice { child, log, egress, admin }
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill").arg(format!("-{sig}")).arg(self.child.id().to_string()).status().unwrap();
        assert!(status.success());
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// The process's resident set, from `/proc`.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Sluice {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits (bounded) for a log line containing `needle`.
pub fn wait_for(log: &Arc<Mutex<Vec<String>>>, needle: &str, limit: Duration) -> String {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some(l) = log.lock().unwrap().iter().find(|l| l.contains(needle)) {
            return l.clone();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("no log line containing {needle:?} within {limit:?}; log:\n{}", log.lock().unwrap().join("\n"));
}
