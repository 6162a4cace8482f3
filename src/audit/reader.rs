//! Decision records read back from a log, streaming: one line at a time (each capped), gzip'd files
//! recognised by their magic bytes, malformed lines located and counted rather than fatal.

use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;

use serde::Deserialize;

/// The longest line read as a record; a longer one is skipped as malformed (sluice's own lines are
/// a few hundred bytes), so one bad line cannot make the reader hold a whole file.
pub const MAX_LINE: usize = 64 * 1024;

/// A decision line's fields that the authoring tools read (the names are [`super::Event`]'s).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct DecisionRecord {
    pub time: Option<String>,
    pub event: Option<String>,
    pub session: Option<String>,
    pub kind: Option<String>,
    pub method: Option<String>,
    pub target: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub verdict: Option<String>,
    pub would_deny: Option<String>,
    pub reason: Option<String>,
    pub rule: Option<String>,
    pub policy: Option<String>,
    pub level: Option<String>,
    pub upstream: Option<String>,
}

impl DecisionRecord {
    /// Whether the request was served (allowed, or in report mode would-denied).
    pub fn served(&self) -> bool {
        self.verdict.as_deref() == Some("allow")
    }

    /// The reason it was refused, or would have been in enforce mode.
    pub fn refusal_code(&self) -> Option<&str> {
        match &self.would_deny {
            Some(code) => Some(code),
            None if self.verdict.as_deref() == Some("deny") => self.reason.as_deref(),
            None => None,
        }
    }

    /// The path of a plain-HTTP request, from its recorded target (`http://host/path?q`).
    pub fn path(&self) -> Option<&str> {
        let rest = self.target.as_deref()?.split_once("://")?.1;
        Some(rest.find('/').map_or("/", |i| &rest[i..]))
    }
}

/// A line that is not a record: where it is and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Malformed {
    pub file: String,
    pub line: u64,
    pub error: String,
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: malformed record: {}", self.file, self.line, self.error)
    }
}

/// One item of a log.
#[derive(Debug)]
pub enum Item {
    /// A decision line.
    Decision(Box<DecisionRecord>),
    /// A line that is not a record.
    Malformed(Malformed),
}

/// Reads a log line by line: decision records and malformed lines; other lines (closing lines, git
/// lines, diagnostics) are passed over. An I/O error (a truncated gzip stream, say) ends it.
pub struct RecordReader {
    name: String,
    inner: Box<dyn BufRead>,
    line: u64,
    buf: Vec<u8>,
    /// Lines that were neither decisions nor malformed.
    pub other: u64,
    pub malformed: u64,
    pub decisions: u64,
}

impl RecordReader {
    /// A log file, or standard input for `-`; gzip'd input is decompressed as it is read.
    pub fn open(path: &Path) -> Result<RecordReader, String> {
        let name = path.display().to_string();
        let raw: Box<dyn Read> = if name == "-" {
            Box::new(io::stdin())
        } else {
            Box::new(File::open(path).map_err(|e| format!("cannot read {name}: {e}"))?)
        };
        RecordReader::from_reader(&name, raw).map_err(|e| format!("cannot read {name}: {e}"))
    }

    /// Any byte stream (a file, stdin, memory), gzip'd or not.
    pub fn from_reader(name: &str, raw: impl Read + 'static) -> io::Result<RecordReader> {
        let mut buffered = BufReader::with_capacity(64 * 1024, raw);
        let gzip = buffered.fill_buf()?.starts_with(&[0x1f, 0x8b]);
        let inner: Box<dyn BufRead> = if gzip {
            Box::new(BufReader::with_capacity(64 * 1024, flate2::bufread::MultiGzDecoder::new(buffered)))
        } else {
            Box::new(buffered)
        };
        Ok(RecordReader {
            name: name.to_string(),
            inner,
            line: 0,
            buf: Vec::new(),
            other: 0,
            malformed: 0,
            decisions: 0,
        })
    }

    /// The next decision or malformed line; `Ok(None)` at the end.
    pub fn next_item(&mut self) -> io::Result<Option<Item>> {
        loop {
            let Some(whole) = self.read_line()? else { return Ok(None) };
            let line = self.line;
            let text = trim(&self.buf);
            if text.is_empty() {
                continue;
            }
            let bad = |error: String| Malformed { file: self.name.clone(), line, error };
            let item = if !whole {
                Item::Malformed(bad(format!("line longer than {MAX_LINE} bytes")))
            } else {
                match serde_json::from_slice::<DecisionRecord>(text) {
                    Ok(r) if r.event.as_deref() == Some("decision") => Item::Decision(Box::new(r)),
                    Ok(_) => {
                        self.other += 1;
                        continue;
                    }
                    Err(e) => Item::Malformed(bad(e.to_string())),
                }
            };
            match &item {
                Item::Decision(_) => self.decisions += 1,
                Item::Malformed(_) => self.malformed += 1,
            }
            return Ok(Some(item));
        }
    }

    /// Reads one line into `buf` (at most [`MAX_LINE`] bytes of it); `Some(false)` when the line was
    /// longer and its rest was skipped.
    fn read_line(&mut self) -> io::Result<Option<bool>> {
        self.buf.clear();
        let mut whole = true;
        let mut any = false;
        loop {
            let chunk = match self.inner.fill_buf() {
                Ok(c) => c,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if chunk.is_empty() {
                break;
            }
            any = true;
            let (take, done) = match chunk.iter().position(|b| *b == b'\n') {
                Some(i) => (i + 1, true),
                None => (chunk.len(), false),
            };
            let room = MAX_LINE.saturating_sub(self.buf.len());
            if take > room {
                whole = false;
            }
            self.buf.extend_from_slice(&chunk[..take.min(room)]);
            self.inner.consume(take);
            if done {
                break;
            }
        }
        if !any {
            return Ok(None);
        }
        self.line += 1;
        Ok(Some(whole))
    }

    /// The name messages use for this log.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The number of the line last read.
    pub fn line(&self) -> u64 {
        self.line
    }

    /// What `sluice COMMAND` says when reading the log fails part way.
    pub fn read_error(&self, command: &str, e: &dyn std::fmt::Display) -> String {
        format!("sluice {command}: {}: read error after line {}: {e}", self.name, self.line)
    }
}

fn trim(bytes: &[u8]) -> &[u8] {
    let end = bytes.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(0, |i| i + 1);
    let start = bytes[..end].iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(end);
    &bytes[start..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn items(bytes: Vec<u8>) -> (Vec<String>, RecordReader) {
        let mut r = RecordReader::from_reader("log", io::Cursor::new(bytes)).expect("a reader");
        let mut out = Vec::new();
        while let Some(item) = r.next_item().expect("no I/O error") {
            out.push(match item {
                Item::Decision(d) => format!("{}:{}", d.host.unwrap_or_default(), d.port.unwrap_or(0)),
                Item::Malformed(m) => m.to_string(),
            });
        }
        (out, r)
    }

    const LOG: &str = concat!(
        "{\"time\":\"t\",\"event\":\"decision\",\"host\":\"a.test\",\"port\":443,\"verdict\":\"allow\"}\n",
        "not json\n",
        "\n",
        "{\"time\":\"t\",\"event\":\"tunnel_closed\",\"host\":\"a.test\",\"port\":443}\n",
        "{\"event\":\"decision\",\"port\":\"x\"}\n",
        "{\"event\":\"decision\",\"host\":\"b.test\",\"port\":80}",
    );

    #[test]
    fn decisions_malformed_lines_located_and_the_rest_passed_over() {
        let (got, r) = items(LOG.as_bytes().to_vec());
        assert_eq!(got[0], "a.test:443");
        assert_eq!(got[1], "log:2: malformed record: expected ident at line 1 column 2");
        assert!(got[2].starts_with("log:5: malformed record: invalid type: string \"x\""), "{}", got[2]);
        assert_eq!(got[3], "b.test:80");
        assert_eq!((r.decisions, r.malformed, r.other, r.line()), (2, 2, 1, 6));
    }

    #[test]
    fn gzip_is_recognised_by_its_magic() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(LOG.as_bytes()).unwrap();
        let (got, _) = items(gz.finish().unwrap());
        assert_eq!(got.len(), 4);
        assert_eq!(got[3], "b.test:80");
    }

    #[test]
    fn an_overlong_line_is_skipped_not_held() {
        let mut bytes = vec![b'x'; MAX_LINE * 3];
        bytes.push(b'\n');
        bytes.extend_from_slice(b"{\"event\":\"decision\",\"host\":\"c.test\",\"port\":443}\n");
        let (got, r) = items(bytes);
        assert_eq!(got, [format!("log:1: malformed record: line longer than {MAX_LINE} bytes"), "c.test:443".into()]);
        assert!(r.buf.capacity() <= MAX_LINE * 2, "the line buffer stays bounded");
    }
}
