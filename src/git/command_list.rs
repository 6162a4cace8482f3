//! Reading a push's command list off the request body before anything goes upstream: decoded (identity or
//! gzip) into a capped buffer, scanned packet by packet as bytes arrive, parsed once it can be complete,
//! within a cap on the raw bytes read and a deadline for the whole list.
//!
//! ```text
//! frame ─▶ raw (kept, to forward unchanged) ─▶ Decoded (≤ MAX_COMMAND_BYTES) ─▶ Scanner (new packets only)
//!            │ > MAX_RAW_BYTES and not complete: refused            flush / bad length / full ─▶ push::parse
//!            └ past the deadline: refused
//! ```
//! Both limits hold before authentication too: a push with a refused credential is read the same way, to
//! answer `ng` for each of its refs.

use std::io::Write;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::pktline::{self, Packet};
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
    /// The stable code for logs and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            ListError::Stalled { .. } => "push_stalled",
            ListError::Deadline { .. } => "push_too_slow",
            ListError::RawCap { .. } => "push_list_too_large",
            ListError::Gzip(_) => "bad_gzip",
            ListError::Body(_) => "bad_body",
        }
    }

    /// The sentence for the client and the log (the renderer adds `sluice: `).
    pub fn message(&self) -> String {
        match self {
            ListError::Stalled { secs } => {
                format!("the push sent no data for {secs}s while sluice read its command list")
            }
            ListError::Deadline { secs } => format!(
                "the push's command list did not arrive within {secs}s (twice [git] body_timeout); \
                 send it without pauses"
            ),
            ListError::RawCap { decoded } => format!(
                "the push body's first {} KiB did not complete its command list ({decoded} bytes \
                 decoded); a command list is at most {} KiB, gzip-encoded or not",
                MAX_RAW_BYTES / 1024,
                MAX_COMMAND_BYTES / 1024
            ),
            ListError::Gzip(e) => format!("the push body is not valid gzip: {e}"),
            ListError::Body(e) => format!("cannot read the push body: {e}"),
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

/// Walks the pkt-lines of a growing buffer, each packet once, and says when [`push::parse`] can give a
/// final answer: at a special packet (a flush ends the commands or the push options; a delim or
/// response-end is an error), at a malformed length, or when the buffer is full. Parsing only then
/// keeps the work per body byte bounded however the body is split into frames; before, every frame
/// re-parsed everything received so far.
#[doc(hidden)]
#[derive(Clone, Debug, Default)]
pub struct Scanner {
    offset: usize,
    /// Packet decodes so far: at most one per call that ends on an incomplete packet, plus one per packet.
    pub steps: u64,
}

impl Scanner {
    /// Looks at the bytes of `buf` after the packets already seen (`buf` only grows between calls).
    pub fn ready(&mut self, buf: &[u8]) -> bool {
        loop {
            self.steps += 1;
            let Some(rest) = buf.get(self.offset..) else { return true };
            match pktline::decode(rest, self.offset) {
                Ok(None) => return buf.len() >= MAX_COMMAND_BYTES,
                Ok(Some((Packet::Data(_), n))) => self.offset += n,
                Ok(Some((_, n))) => {
                    self.offset += n;
                    return true;
                }
                Err(_) => return true,
            }
        }
    }

    /// Bytes of whole packets seen so far.
    pub fn offset(&self) -> usize {
        self.offset
    }
}

/// The command list of a decoded body fed in pieces: scanned as it grows, parsed when it can be final.
/// `Some` is the final answer, as [`push::parse`] gives it for the whole buffer.
#[doc(hidden)]
#[derive(Clone, Debug, Default)]
pub struct Incremental {
    pub scanner: Scanner,
    /// Calls to [`push::parse`]: at most three (a flush before push options, the end, the body's end), and
    /// one more when the reader gives up.
    pub parses: u32,
}

impl Incremental {
    pub fn check(&mut self, buf: &[u8], eof: bool) -> Option<Result<PushRequest, PushError>> {
        if !self.scanner.ready(buf) && !eof {
            return None;
        }
        self.parses += 1;
        push::parse(buf, eof).transpose()
    }
}

/// The reader's state between frames, apart from the waiting: what [`read`] does with each frame, as
/// plain code the fuzz target drives.
#[doc(hidden)]
pub struct ListReader {
    raw: Vec<Bytes>,
    raw_len: usize,
    decoded: Decoded,
    list: Incremental,
}

impl ListReader {
    pub fn new(gzip: bool) -> ListReader {
        ListReader { raw: Vec::new(), raw_len: 0, decoded: Decoded::new(gzip), list: Incremental::default() }
    }

    /// Raw bytes taken so far.
    pub fn raw_len(&self) -> usize {
        self.raw_len
    }

    pub fn decoded(&self) -> &[u8] {
        self.decoded.bytes()
    }

    /// The work done so far: scanner steps and parses.
    pub fn work(&self) -> (u64, u32) {
        (self.list.scanner.steps, self.list.parses)
    }

    /// Takes one frame: `Some` is the answer (the list, or why it cannot be read), `None` asks for more.
    pub fn frame(&mut self, data: Bytes) -> Option<Result<CommandList, Unread>> {
        self.raw_len += data.len();
        if let Err(e) = self.decoded.push(&data) {
            return Some(Err(self.unread(ListError::Gzip(e))));
        }
        self.raw.push(data);
        if let Some(done) = self.check(false) {
            return Some(Ok(done));
        }
        if self.raw_len > MAX_RAW_BYTES {
            return Some(self.give_up(ListError::RawCap { decoded: self.decoded.bytes().len() }));
        }
        None
    }

    /// Stops reading for `error`, unless what was decoded already has its answer: the scanner waits for a
    /// flush to parse, so a bad command in a list that never ends is found here, and answered as itself.
    pub fn give_up(&mut self, error: ListError) -> Result<CommandList, Unread> {
        self.list.parses += 1;
        match push::parse(self.decoded.bytes(), false).transpose() {
            Some(parsed) => Ok(self.list_of(parsed)),
            None => Err(self.unread(error)),
        }
    }

    /// The body ended: the answer is final now.
    pub fn end(&mut self) -> CommandList {
        self.decoded.finish();
        match self.check(true) {
            Some(done) => done,
            // `check` at the end of the body always answers; say "truncated" rather than panic.
            None => self.list_of(Err(PushError::Truncated { len: self.decoded.bytes().len() })),
        }
    }

    pub fn unread(&self, error: ListError) -> Unread {
        Unread { error, side_band: push::sniff_side_band(self.decoded.bytes()) }
    }

    fn check(&mut self, eof: bool) -> Option<CommandList> {
        let parsed = self.list.check(self.decoded.bytes(), eof)?;
        Some(self.list_of(parsed))
    }

    fn list_of(&mut self, parsed: Result<PushRequest, PushError>) -> CommandList {
        let side_band = match &parsed {
            Ok(_) => None,
            Err(_) => push::sniff_side_band(self.decoded.bytes()),
        };
        CommandList { raw: std::mem::take(&mut self.raw), parsed, side_band }
    }
}

/// Reads the request body until the command list (and push options) are complete, within
/// [`MAX_COMMAND_BYTES`] decoded, [`MAX_RAW_BYTES`] raw, `gap` between frames and `deadline` in all.
/// The raw bytes are kept to be forwarded unchanged.
pub async fn read(body: &mut Incoming, gzip: bool, gap: Duration, deadline: Duration) -> Result<CommandList, Unread> {
    let mut reader = ListReader::new(gzip);
    let end = tokio::time::Instant::now() + deadline;
    loop {
        let next_gap = tokio::time::Instant::now() + gap;
        let frame = match tokio::time::timeout_at(next_gap.min(end), body.frame()).await {
            Ok(frame) => frame,
            Err(_) if next_gap < end => return reader.give_up(ListError::Stalled { secs: gap.as_secs() }),
            Err(_) => return reader.give_up(ListError::Deadline { secs: deadline.as_secs() }),
        };
        match frame {
            None => return Ok(reader.end()),
            Some(Err(e)) => return Err(reader.unread(ListError::Body(e.to_string()))),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data()
                    && let Some(answer) = reader.frame(data)
                {
                    return answer;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "1111111111111111111111111111111111111111";
    const Z: &str = "0000000000000000000000000000000000000000";

    fn lines(lines: &[&str]) -> Vec<u8> {
        let mut out = Vec::new();
        for l in lines {
            if l.is_empty() {
                out.extend_from_slice(pktline::FLUSH);
            } else {
                pktline::put_data(&mut out, l.as_bytes());
            }
        }
        out
    }

    /// Feeds `buf` cut at `cuts`, as frames would arrive; the answer and how much work it took.
    fn fed(buf: &[u8], cuts: &[usize]) -> (Result<PushRequest, PushError>, Incremental) {
        let mut list = Incremental::default();
        let mut ends: Vec<usize> = cuts.iter().copied().filter(|&c| c < buf.len()).collect();
        ends.push(buf.len());
        for end in ends {
            if let Some(answer) = list.check(&buf[..end], false) {
                return (answer, list);
            }
        }
        let answer = list.check(buf, true).expect("an answer at the end of the body");
        (answer, list)
    }

    fn whole(buf: &[u8]) -> Result<PushRequest, PushError> {
        push::parse(buf, true).transpose().expect("an answer at eof")
    }

    fn inputs() -> Vec<Vec<u8>> {
        let first = format!("{Z} {A} refs/heads/feature\0report-status side-band-64k push-options");
        let plain = format!("{Z} {A} refs/heads/feature\0report-status");
        let second = format!("{A} {Z} refs/heads/other");
        vec![
            [lines(&[&first, &second, "", "ci.skip", "k=v", ""]), b"PACK\0\0\0\x02".to_vec()].concat(),
            [lines(&[&format!("shallow {A}"), &plain, ""]), b"PACK".to_vec()].concat(),
            lines(&[""]),
            lines(&[&plain]),
            [lines(&[&plain]), b"00zz".to_vec()].concat(),
            [lines(&[&plain]), b"0001".to_vec()].concat(),
            lines(&["junk", ""]),
            lines(&[&first, "", "opt"]),
            [lines(&[&first]), b"0003".to_vec()].concat(),
            b"push-cert".to_vec(),
        ]
    }

    #[test]
    fn every_split_gives_the_whole_buffer_answer() {
        for buf in inputs() {
            let want = whole(&buf);
            for cut in 0..=buf.len() {
                let (got, _) = fed(&buf, &[cut]);
                assert_eq!(got, want, "cut at {cut} of {:?}", String::from_utf8_lossy(&buf));
            }
            for step in [1, 2, 3, 7] {
                let cuts: Vec<usize> = (0..buf.len()).step_by(step).collect();
                let (got, list) = fed(&buf, &cuts);
                assert_eq!(got, want, "{step}-byte frames of {:?}", String::from_utf8_lossy(&buf));
                assert!(list.parses <= 3, "{} parses", list.parses);
            }
        }
    }

    #[test]
    fn work_per_byte_is_bounded() {
        // About 900 KiB of shallow lines, then one byte per frame: every packet is decoded once, and a
        // frame that ends inside a packet costs one look at its length.
        let mut buf = Vec::new();
        let mut i = 0u64;
        while buf.len() < 920 << 10 {
            pktline::put_data(&mut buf, format!("shallow {i:040x}").as_bytes());
            i += 1;
        }
        pktline::put_data(&mut buf, format!("{Z} {A} refs/heads/main\0report-status").as_bytes());
        buf.extend_from_slice(pktline::FLUSH);
        let bulk = 900 << 10;
        let cuts: Vec<usize> = (bulk..buf.len()).collect();
        let (got, list) = fed(&buf, &cuts);
        assert_eq!(got, whole(&buf));
        assert_eq!(got.map(|r| r.shallow.len()), Ok(usize::try_from(i).unwrap()));
        let packets = i + 2;
        let frames = (buf.len() - bulk + 1) as u64;
        assert!(list.scanner.steps <= packets + frames, "{} steps for {packets} packets", list.scanner.steps);
        assert_eq!(list.parses, 1);
    }

    #[test]
    fn a_full_buffer_is_final() {
        let mut buf = Vec::new();
        while buf.len() < MAX_COMMAND_BYTES {
            pktline::put_data(&mut buf, format!("shallow {A}").as_bytes());
        }
        let (got, _) = fed(&buf[..MAX_COMMAND_BYTES], &[]);
        assert_eq!(got, Err(PushError::TooLarge));
        let mut list = Incremental::default();
        assert_eq!(list.check(&buf[..MAX_COMMAND_BYTES], false), Some(Err(PushError::TooLarge)));
    }

    #[test]
    fn a_body_that_decodes_to_nothing_stops_at_the_raw_cap() {
        let mut reader = ListReader::new(true);
        assert!(reader.frame(Bytes::from_static(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff])).is_none());
        let blocks = Bytes::from([0u8, 0, 0, 0xff, 0xff].repeat(13_107));
        let mut frames = 0;
        let refused = loop {
            frames += 1;
            assert!(frames < 100, "never refused");
            if let Some(answer) = reader.frame(blocks.clone()) {
                break answer;
            }
            assert!(reader.raw_len() <= MAX_RAW_BYTES);
        };
        let Err(unread) = refused else { panic!("a bomb was accepted") };
        assert_eq!(unread.error, ListError::RawCap { decoded: 0 });
        assert!(reader.raw_len() > MAX_RAW_BYTES && reader.raw_len() <= MAX_RAW_BYTES + blocks.len());
        assert_eq!(reader.work(), (u64::try_from(frames).unwrap() + 1, 1), "one look per frame, one parse");
    }

    #[test]
    fn a_bad_command_in_a_list_that_never_ends_is_answered_as_itself() {
        // Found by the gzip_push fuzz target: no flush, so the scanner never asked for a parse, and the
        // reader refused at the raw cap what parse would have called a bad command.
        let mut reader = ListReader::new(true);
        let mut head = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
        // One stored block holding `0008junk`, then empty ones that decode to nothing.
        head.extend_from_slice(&[0, 8, 0, !8, 0xff]);
        head.extend_from_slice(b"0008junk");
        assert!(reader.frame(Bytes::from(head)).is_none());
        let blocks = Bytes::from([0u8, 0, 0, 0xff, 0xff].repeat(13_107));
        let answer = loop {
            if let Some(answer) = reader.frame(blocks.clone()) {
                break answer;
            }
        };
        assert!(reader.raw_len() > MAX_RAW_BYTES, "answered at the raw cap, by giving up");
        let list = answer.map_err(|u| u.error).expect("an answer, not a refusal");
        assert_eq!(
            list.parsed,
            Err(PushError::BadCommand { offset: 0, line: "junk".into(), why: "expected `<old id> <new id> <ref>`" })
        );
    }

    #[test]
    fn errors_say_what_was_expected() {
        assert_eq!(
            ListError::RawCap { decoded: 0 }.message(),
            "the push body's first 2048 KiB did not complete its command list (0 bytes decoded); a \
             command list is at most 1024 KiB, gzip-encoded or not"
        );
        assert_eq!(
            ListError::Deadline { secs: 60 }.message(),
            "the push's command list did not arrive within 60s (twice [git] body_timeout); send it \
             without pauses"
        );
    }
}
