//! The audit stream: one line per decision and one per closed tunnel or finished request, written by a
//! background thread so that a slow disk never slows traffic (lines are dropped and counted instead).
//!
//! [`Event`]'s fields are the log's field names, in this one place. Nothing secret is ever put in an
//! event: sessions are ids, destinations are host:port, and URLs have their credentials removed.

pub mod reader;

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::config::LogFormat;

/// Lines that may wait for the writer before new ones are dropped.
const QUEUE: usize = 64 * 1024;

enum Message {
    Line(Vec<u8>),
    /// Answered once every line queued before it is written.
    Flush(std::sync::mpsc::Sender<()>),
}

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A request was decided (allowed or refused).
    Decision,
    /// An allowed tunnel ended.
    TunnelClosed,
    /// An allowed plain-HTTP request's response finished.
    RequestFinished,
    /// A git proxy request finished.
    Git,
}

/// One audit line. `None` fields are left out.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Event {
    pub time: String,
    pub event: Option<EventKind>,
    pub session: Option<String>,
    /// `connect`, `http` or `git`.
    pub kind: Option<&'static str>,
    pub method: Option<String>,
    /// The request target as sent, credentials removed, when no host:port could be read from it.
    pub target: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub verdict: Option<&'static str>,
    /// In report mode, the code an enforcing policy would have refused an allowed request with. Left
    /// out of every other line, so enforce-mode lines are unchanged.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub would_deny: Option<&'static str>,
    pub reason: Option<String>,
    pub detail: Option<String>,
    pub rule: Option<String>,
    pub policy: Option<String>,
    pub level: Option<&'static str>,
    pub client: Option<String>,
    pub upstream: Option<String>,
    pub status: Option<u16>,
    pub repo: Option<String>,
    /// The git proxy's service: `upload-pack`, `receive-pack`, or an API operation.
    pub service: Option<&'static str>,
    /// Refs in a git push's command list.
    pub refs: Option<usize>,
    pub bytes_up: Option<u64>,
    pub bytes_down: Option<u64>,
    pub duration_ms: Option<u64>,
    /// How a tunnel or request ended.
    pub end: Option<&'static str>,
    /// A request inside a terminated tunnel: its path (without the query). Left out of other lines.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// `true` on the lines of requests read inside a terminated tunnel; left out of every other line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inspected: Option<bool>,
}

impl Event {
    pub fn new(event: EventKind) -> Event {
        Event { time: rfc3339(SystemTime::now()), event: Some(event), ..Event::default() }
    }

    /// The event's JSON line, byte for byte what `serde_json` makes of it (every field in order, `null`
    /// for a `None` one, the `skip_serializing_if` ones left out), written field by field: serde's
    /// struct path escaped every key as a string too, which was most of a tunnel's two lines' cost.
    /// Values go through `serde_json` still, so strings are escaped as they always were.
    fn write_json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"time\":");
        self.time.put(out);
        field(out, b",\"event\":", &self.event);
        field(out, b",\"session\":", &self.session);
        field(out, b",\"kind\":", &self.kind);
        field(out, b",\"method\":", &self.method);
        field(out, b",\"target\":", &self.target);
        field(out, b",\"host\":", &self.host);
        field(out, b",\"port\":", &self.port);
        field(out, b",\"verdict\":", &self.verdict);
        if self.would_deny.is_some() {
            field(out, b",\"would_deny\":", &self.would_deny);
        }
        field(out, b",\"reason\":", &self.reason);
        field(out, b",\"detail\":", &self.detail);
        field(out, b",\"rule\":", &self.rule);
        field(out, b",\"policy\":", &self.policy);
        field(out, b",\"level\":", &self.level);
        field(out, b",\"client\":", &self.client);
        field(out, b",\"upstream\":", &self.upstream);
        field(out, b",\"status\":", &self.status);
        field(out, b",\"repo\":", &self.repo);
        field(out, b",\"service\":", &self.service);
        field(out, b",\"refs\":", &self.refs);
        field(out, b",\"bytes_up\":", &self.bytes_up);
        field(out, b",\"bytes_down\":", &self.bytes_down);
        field(out, b",\"duration_ms\":", &self.duration_ms);
        field(out, b",\"end\":", &self.end);
        if self.path.is_some() {
            field(out, b",\"path\":", &self.path);
        }
        if self.inspected.is_some() {
            field(out, b",\"inspected\":", &self.inspected);
        }
        out.push(b'}');
    }
}

/// `,"name":value`, its `,"name":` written whole (names are plain words: nothing to escape).
#[inline(always)]
fn field<T: JsonValue + ?Sized>(out: &mut Vec<u8>, key: &'static [u8], value: &T) {
    out.extend_from_slice(key);
    value.put(out);
}

/// A value of an [`Event`] field, written as `serde_json` writes it.
trait JsonValue {
    fn put(&self, out: &mut Vec<u8>);
}

impl JsonValue for str {
    fn put(&self, out: &mut Vec<u8>) {
        // Nearly every value has nothing to escape (serde_json escapes `"`, `\\` and control bytes, and
        // nothing else): it is copied whole; any other goes through serde_json's escaping.
        if !self.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\') {
            out.reserve(self.len() + 2);
            out.push(b'"');
            out.extend_from_slice(self.as_bytes());
            out.push(b'"');
            return;
        }
        // Writing to a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, self);
    }
}

impl JsonValue for String {
    fn put(&self, out: &mut Vec<u8>) {
        self.as_str().put(out);
    }
}

impl JsonValue for &'static str {
    fn put(&self, out: &mut Vec<u8>) {
        (**self).put(out);
    }
}

impl JsonValue for EventKind {
    fn put(&self, out: &mut Vec<u8>) {
        let _ = serde_json::to_writer(&mut *out, self);
    }
}

impl JsonValue for bool {
    fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(if *self { b"true" } else { b"false" });
    }
}

macro_rules! json_integer {
    ($($t:ty),*) => {$(
        impl JsonValue for $t {
            fn put(&self, out: &mut Vec<u8>) {
                let _ = serde_json::to_writer(&mut *out, self);
            }
        }
    )*};
}
json_integer!(u16, u64, usize);

impl<T: JsonValue> JsonValue for Option<T> {
    fn put(&self, out: &mut Vec<u8>) {
        match self {
            Some(v) => v.put(out),
            None => out.extend_from_slice(b"null"),
        }
    }
}

/// The audit log's handle; cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    tx: Option<SyncSender<Message>>,
    format: LogFormat,
    dropped: Arc<AtomicU64>,
}

impl AuditLog {
    /// Starts the writer thread over `out`.
    pub fn start(format: LogFormat, out: Box<dyn Write + Send>) -> AuditLog {
        let (tx, rx) = sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("sluice-audit".into())
            .spawn(move || write_lines(rx, out))
            .map(|_| AuditLog { tx: Some(tx), format, dropped: Arc::new(AtomicU64::new(0)) })
            .unwrap_or_else(|e| {
                tracing::error!(error = %e, "cannot start the audit writer; audit lines are dropped");
                AuditLog::disabled()
            })
    }

    /// A log that writes nothing (tests that do not read it, tools).
    pub fn disabled() -> AuditLog {
        AuditLog { tx: None, format: LogFormat::Json, dropped: Arc::new(AtomicU64::new(0)) }
    }

    /// Queues one line; never blocks.
    pub fn write(&self, event: &Event) {
        if self.tx.is_none() {
            return;
        }
        let line = match self.format {
            LogFormat::Json => {
                // A tunnel's lines are 400-500 bytes: room for them at once, not four growths.
                let mut line = Vec::with_capacity(640);
                event.write_json(&mut line);
                line.push(b'\n');
                line
            }
            LogFormat::Text => text_line(event).into_bytes(),
        };
        self.send(line);
    }

    fn send(&self, line: Vec<u8>) {
        let Some(tx) = &self.tx else { return };
        match tx.try_send(Message::Line(line)) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Waits (up to 5 s) until every line queued so far is written: for tests and shutdown.
    pub fn flush(&self) {
        let Some(tx) = &self.tx else { return };
        let (done, wait) = std::sync::mpsc::channel();
        if tx.send(Message::Flush(done)).is_ok() {
            let _ = wait.recv_timeout(std::time::Duration::from_secs(5));
        }
    }

    /// Lines dropped because the writer fell behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog").field("format", &self.format).field("dropped", &self.dropped()).finish()
    }
}

/// Diagnostics (`tracing`) share the writer, so a log file holds whole lines from both.
impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for AuditLog {
    type Writer = LineWriter;

    fn make_writer(&'a self) -> LineWriter {
        LineWriter { log: self.clone(), buf: Vec::with_capacity(256) }
    }
}

/// Collects one formatted `tracing` event and queues it when dropped.
pub struct LineWriter {
    log: AuditLog,
    buf: Vec<u8>,
}

impl Write for LineWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        if !self.buf.is_empty() {
            self.log.send(std::mem::take(&mut self.buf));
        }
    }
}

/// How long the writer lets lines gather after writing a batch. Waking a thread per line cost the
/// proxy a context switch per decision; this bounds the writer's wake-ups to 200 a second, and is how
/// late a line can reach the file. An idle writer wakes for the first line at once.
const BATCH_WINDOW: std::time::Duration = std::time::Duration::from_millis(5);

fn write_lines(rx: Receiver<Message>, out: Box<dyn Write + Send>) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    let mut waiting = Vec::new();
    while let Ok(first) = rx.recv() {
        // Write whatever else is queued, then flush once: lines reach the file promptly without a
        // syscall per line under load.
        for message in std::iter::once(first).chain(std::iter::from_fn(|| rx.try_recv().ok())) {
            match message {
                Message::Line(line) => {
                    let _ = out.write_all(&line);
                }
                Message::Flush(done) => waiting.push(done),
            }
        }
        let _ = out.flush();
        for done in waiting.drain(..) {
            let _ = done.send(());
        }
        std::thread::sleep(BATCH_WINDOW);
    }
}

/// `key=value` pairs, values quoted when they hold spaces or quotes.
fn text_line(event: &Event) -> String {
    let value = serde_json::to_value(event).unwrap_or_default();
    let mut line = String::new();
    if let Some(map) = value.as_object() {
        for (k, v) in map {
            if v.is_null() {
                continue;
            }
            let v = match v {
                serde_json::Value::String(s) if s.contains([' ', '"', '=']) || s.is_empty() => format!("{s:?}"),
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(k);
            line.push('=');
            line.push_str(&v);
        }
    }
    line.push('\n');
    line
}

/// `addr.to_string()`, an IPv4 address written digit by digit: std's `Display` pads every part, which
/// cost some 1,700 instructions an address, and a tunnel's lines name three.
pub fn socket_addr(addr: std::net::SocketAddr) -> String {
    let std::net::SocketAddr::V4(v4) = addr else { return addr.to_string() };
    let mut out = String::with_capacity(21);
    for (i, octet) in v4.ip().octets().into_iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        push_decimal(&mut out, u32::from(octet));
    }
    out.push(':');
    push_decimal(&mut out, u32::from(v4.port()));
    out
}

fn push_decimal(out: &mut String, n: u32) {
    let mut digits = [0u8; 10];
    let (mut n, mut at) = (n, digits.len());
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for &d in &digits[at..] {
        out.push(char::from(d));
    }
}

/// `2026-11-25T12:00:00.123Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (Howard Hinnant's algorithm), valid for every date after 1970.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    if year > 9999 {
        return format!(
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
            rem / 3600,
            rem % 3600 / 60,
            rem % 60,
            d.subsec_millis()
        );
    }
    // Digit by digit: every line has one, and `format!`'s padding cost more than the rest of the line's fields.
    let mut out = String::with_capacity(24);
    let mut digits = |n: u64, width: u32, then: char| {
        for i in (0..width).rev() {
            out.push(char::from(b'0' + (n / 10u64.pow(i) % 10) as u8));
        }
        out.push(then);
    };
    digits(year as u64, 4, '-');
    digits(month as u64, 2, '-');
    digits(day as u64, 2, 'T');
    digits(rem / 3600, 2, ':');
    digits(rem % 3600 / 60, 2, ':');
    digits(rem % 60, 2, '.');
    digits(u64::from(d.subsec_millis()), 3, 'Z');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_millis(1_795_608_000_123)), "2026-11-25T12:00:00.123Z");
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_millis(4_102_444_799_999)), "2099-12-31T23:59:59.999Z");
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_secs(253_402_300_800)), "10000-01-01T00:00:00.000Z");
    }

    #[test]
    fn socket_addrs_read_as_display_writes_them() {
        for a in [
            "0.0.0.0:0",
            "127.0.0.1:3128",
            "10.20.30.40:8080",
            "255.255.255.255:65535",
            "[::1]:443",
            "[2001:db8::1%3]:1",
        ] {
            let addr: std::net::SocketAddr = a.parse().unwrap();
            assert_eq!(socket_addr(addr), addr.to_string());
        }
    }

    #[test]
    fn text_lines_quote_what_needs_it() {
        let e = Event {
            time: "t".into(),
            event: Some(EventKind::Decision),
            verdict: Some("deny"),
            detail: Some("not in the allowlist".into()),
            port: Some(443),
            ..Event::default()
        };
        assert_eq!(text_line(&e), "time=t event=decision port=443 verdict=deny detail=\"not in the allowlist\"\n");
    }

    /// The hand-written JSON line is serde's, byte for byte: every field's `null`, every field set
    /// (strings that need escaping among them), and the fields left out unless set.
    #[test]
    fn json_lines_are_what_serde_writes() {
        let serde = |e: &Event| serde_json::to_vec(e).unwrap();
        let ours = |e: &Event| {
            let mut out = Vec::new();
            e.write_json(&mut out);
            out
        };
        let empty = Event::default();
        assert_eq!(String::from_utf8(ours(&empty)).unwrap(), String::from_utf8(serde(&empty)).unwrap());
        let odd = "a \"quoted\" \\ back\\slash, tab\t, newline\n, nul\u{0}, bell\u{7}, del\u{7f}, é, 🦀";
        let full = Event {
            time: rfc3339(UNIX_EPOCH + Duration::from_millis(1_795_608_000_123)),
            event: Some(EventKind::TunnelClosed),
            session: Some("s-1".into()),
            kind: Some("connect"),
            method: Some("CONNECT".into()),
            target: Some(odd.into()),
            host: Some("example.com".into()),
            port: Some(65535),
            verdict: Some("allow"),
            would_deny: Some("not_allowlisted"),
            reason: Some("allowlisted".into()),
            detail: Some(odd.into()),
            rule: Some("*.example.com (p.toml:3)".into()),
            policy: Some("p".into()),
            level: Some("custom"),
            client: Some("127.0.0.1:5000".into()),
            upstream: Some("[2001:db8::1]:443".into()),
            status: Some(403),
            repo: Some("acme/widgets".into()),
            service: Some("upload-pack"),
            refs: Some(usize::MAX),
            bytes_up: Some(u64::MAX),
            bytes_down: Some(0),
            duration_ms: Some(12),
            end: Some("closed"),
            path: Some("/x".into()),
            inspected: Some(true),
        };
        assert_eq!(String::from_utf8(ours(&full)).unwrap(), String::from_utf8(serde(&full)).unwrap());
        for kind in [EventKind::Decision, EventKind::TunnelClosed, EventKind::RequestFinished, EventKind::Git] {
            let e = Event { event: Some(kind), inspected: Some(false), ..Event::default() };
            assert_eq!(ours(&e), serde(&e));
        }
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let (tx, _rx) = sync_channel::<Message>(1);
        let log = AuditLog { tx: Some(tx), format: LogFormat::Json, dropped: Arc::new(AtomicU64::new(0)) };
        let e = Event::new(EventKind::Decision);
        log.write(&e);
        log.write(&e);
        log.write(&e);
        assert_eq!(log.dropped(), 2);
    }
}
