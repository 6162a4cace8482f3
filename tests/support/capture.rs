//! Captures the audit stream and `tracing` diagnostics of an in-process proxy, for tests that search
//! them (for a log line, or for a secret that must not be there).
#![allow(dead_code)]

use std::io::Write;
use std::sync::{Mutex, OnceLock};

use sluice::audit::AuditLog;
use sluice::config::LogFormat;

/// The audit log (text format) to hand to the proxy under test.
pub fn audit() -> &'static AuditLog {
    static AUDIT: OnceLock<AuditLog> = OnceLock::new();
    AUDIT.get_or_init(|| {
        logs();
        AuditLog::start(LogFormat::Text, Box::new(LogWriter))
    })
}

fn logs() -> &'static Mutex<Vec<u8>> {
    static LOGS: OnceLock<Mutex<Vec<u8>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(|| LogWriter)
            .finish();
        let _ = tracing::subscriber::set_global_default(subscriber);
        Mutex::new(Vec::new())
    })
}

struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        logs().lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Everything captured so far, once the audit writer has caught up.
pub fn text() -> String {
    audit().flush();
    String::from_utf8_lossy(&logs().lock().unwrap_or_else(|e| e.into_inner())).into_owned()
}

/// The captured lines about one repository.
pub fn lines_for_repo(text: &str, repo: &str) -> Vec<String> {
    text.lines().filter(|l| l.contains(&format!("repo={repo} "))).map(str::to_owned).collect()
}
