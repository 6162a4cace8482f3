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

/// One proxy's own audit stream in JSON, one record per line, kept apart from every other proxy's so
/// tests running in parallel can assert exact records.
#[derive(Clone)]
pub struct Records {
    log: AuditLog,
    buf: std::sync::Arc<Mutex<Vec<u8>>>,
}

struct SharedWriter(std::sync::Arc<Mutex<Vec<u8>>>);

impl Write for SharedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Records {
    pub fn json() -> Records {
        let buf = std::sync::Arc::new(Mutex::new(Vec::new()));
        let log = AuditLog::start(LogFormat::Json, Box::new(SharedWriter(buf.clone())));
        Records { log, buf }
    }

    /// The audit log to hand to `Server::bind`.
    pub fn log(&self) -> AuditLog {
        self.log.clone()
    }

    /// Every line written so far, once the writer has caught up.
    pub fn lines(&self) -> Vec<String> {
        self.log.flush();
        let text = String::from_utf8_lossy(&self.buf.lock().unwrap_or_else(|e| e.into_inner())).into_owned();
        text.lines().map(str::to_owned).collect()
    }
}
