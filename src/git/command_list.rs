//! Reading a push's command list off the request body before anything goes upstream: decoded (identity or
//! gzip) into a capped buffer and parsed, within a cap on the raw bytes read and a deadline for the whole
//! list.
//!
//! ```text
//! frame ─▶ raw (kept, to forward unchanged) ─▶ Decoded (≤ MAX_COMMAND_BYTES) ─▶ push::parse
//!            │ > MAX_RAW_BYTES and not complete: refused
//!            └ past the deadline: refused
//! ```
//! Both limits hold before authentication too: a push with a refused credential is read the same way, to
//! answer `ng` for each of its refs.

use std::io::Write;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::push::{self, MAX_COMMAND_BYTES, PushError, PushRequest};

/// The most raw body bytes read before the command list must be complete. Twice the decoded cap: deflate's
/// worst case (stored blocks) adds 5 bytes per 64 KiB and a gzip header a few bytes more, so a real command
/// list never comes near it, while a body that decodes to little or nothing (empty stored blocks, a huge
/// gzip file name) is stopped after 2 MiB instead of being buffered for ever.
pub const MAX_RAW_BYTES: usize = 2 * MAX_COMMAND_BYTES;

/// What sluice read of a push before deciding.
pub struct CommandList {
    /// The body as it came, up to the end of the frame that completed the list.
    pub raw: Vec<Bytes>,
    pub parsed: Result<PushRequest, PushError>,
    pub side_band: Option<usize>,
}

/// Why the command list could not be read. Each says so in words, for the client and the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListError {
    /// Nothing arrived for `[git] body_timeout`.
    Stalled { secs: u64 },
    /// The whole list did not arrive within its deadline.
    Deadline { secs: u64 },
    /// [`MAX_RAW_BYTES`] were read and the list is still not complete.
    RawCap { decoded: usize },
    /// The gzip stream is corrupt.
    Gzip(String),
    /// The body failed (the client went away, or sent bad chunked framing).
    Body(String),
}

impl ListError {
    pub fn message(&self) -> String {
        match self {
            ListError::Stalled { secs } => {
                format!("sluice: the push sent no data for {secs}s while sluice read its command list")
            }
            ListError::Deadline { secs } => format!(
                "sluice: the push's command list did not arrive within {secs}s (twice [git] body_timeout); \
                 send it without pauses"
            ),
            ListError::RawCap { decoded } => format!(
                "sluice: the push body's first {} KiB did not complete its command list ({decoded} bytes \
                 decoded); a command list is at most {} KiB, gzip-encoded or not",
                MAX_RAW_BYTES / 1024,
                MAX_COMMAND_BYTES / 1024
            ),
            ListError::Gzip(e) => format!("sluice: the push body is not valid gzip: {e}"),
            ListError::Body(e) => format!("sluice: cannot read the push body: {e}"),
        }
    }
}

/// A refused read: why, and the side-band the client asked for (when its first command got through).
#[derive(Debug)]
pub struct Unread {
    pub error: ListError,
    pub side_band: Option<usize>,
}

/// A `Write` that takes at most `cap` bytes, so a gzip bomb cannot grow it.
#[doc(hidden)]
pub struct Capped {
    buf: Vec<u8>,
    cap: usize,
}

impl Write for Capped {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let room = self.cap.saturating_sub(self.buf.len());
        if room == 0 && !data.is_empty() {
            return Err(std::io::Error::other("decoded command list is over the limit"));
        }
        let n = room.min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A push body as it is decoded: identity or gzip, never more than [`MAX_COMMAND_BYTES`] + 1 bytes
/// (identity) or [`MAX_COMMAND_BYTES`] (gzip). Public for the fuzz targets.
#[doc(hidden)]
pub enum Decoded {
    Identity(Vec<u8>),
    Gzip(Box<flate2::write::GzDecoder<Capped>>),
}

impl Decoded {
    pub fn new(gzip: bool) -> Decoded {
        if gzip {
            let capped = Capped { buf: Vec::new(), cap: MAX_COMMAND_BYTES };
            Decoded::Gzip(Box::new(flate2::write::GzDecoder::new(capped)))
        } else {
            Decoded::Identity(Vec::new())
        }
    }

    /// The body ended: a gzip stream flushes what it still holds.
    pub fn finish(&mut self) {
        if let Decoded::Gzip(d) = self {
            let _ = d.try_finish();
        }
    }

    pub fn bytes(&self) -> &[u8] {
        match self {
            Decoded::Identity(b) => b,
            Decoded::Gzip(d) => &d.get_ref().buf,
        }
    }

    /// Adds raw bytes; a gzip error is reported, a full buffer is not (the parser says "too large").
    pub fn push(&mut self, raw: &[u8]) -> Result<(), String> {
        match self {
            Decoded::Identity(b) => {
                let room = (MAX_COMMAND_BYTES + 1).saturating_sub(b.len());
                b.extend_from_slice(&raw[..room.min(raw.len())]);
                Ok(())
            }
            Decoded::Gzip(d) => {
                let result = d.write_all(raw).and_then(|()| d.flush());
                match result {
                    Err(_) if d.get_ref().buf.len() >= d.get_ref().cap => Ok(()),
                    Err(e) => Err(e.to_string()),
                    Ok(()) => Ok(()),
                }
            }
        }
    }
}

fn unread(error: ListError, decoded: &Decoded) -> Result<CommandList, Unread> {
    Err(Unread { error, side_band: push::sniff_side_band(decoded.bytes()) })
}

/// Reads the request body until the command list (and push options) are complete, within
/// [`MAX_COMMAND_BYTES`] decoded, [`MAX_RAW_BYTES`] raw, `gap` between frames and `deadline` in all.
/// The raw bytes are kept to be forwarded unchanged.
pub async fn read(body: &mut Incoming, gzip: bool, gap: Duration, deadline: Duration) -> Result<CommandList, Unread> {
    let mut raw = Vec::new();
    let mut raw_len = 0usize;
    let mut decoded = Decoded::new(gzip);
    let mut eof = false;
    let end = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(parsed) = push::parse(decoded.bytes(), eof).transpose() {
            let side_band = match &parsed {
                Ok(_) => None,
                Err(_) => push::sniff_side_band(decoded.bytes()),
            };
            return Ok(CommandList { raw, parsed, side_band });
        }
        if raw_len > MAX_RAW_BYTES {
            return unread(ListError::RawCap { decoded: decoded.bytes().len() }, &decoded);
        }
        let next_gap = tokio::time::Instant::now() + gap;
        let frame = match tokio::time::timeout_at(next_gap.min(end), body.frame()).await {
            Ok(frame) => frame,
            Err(_) if next_gap < end => return unread(ListError::Stalled { secs: gap.as_secs() }, &decoded),
            Err(_) => return unread(ListError::Deadline { secs: deadline.as_secs() }, &decoded),
        };
        match frame {
            None => {
                eof = true;
                decoded.finish();
            }
            Some(Err(e)) => return unread(ListError::Body(e.to_string()), &decoded),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    raw_len += data.len();
                    if let Err(e) = decoded.push(&data) {
                        return unread(ListError::Gzip(e), &decoded);
                    }
                    raw.push(data);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_say_what_was_expected() {
        assert_eq!(
            ListError::RawCap { decoded: 0 }.message(),
            "sluice: the push body's first 2048 KiB did not complete its command list (0 bytes decoded); a \
             command list is at most 1024 KiB, gzip-encoded or not"
        );
        assert_eq!(
            ListError::Deadline { secs: 60 }.message(),
            "sluice: the push's command list did not arrive within 60s (twice [git] body_timeout); send it \
             without pauses"
        );
    }
}
