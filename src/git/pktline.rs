//! A pure pkt-line decoder and encoder (git's framing: four hex digits of length, then the payload).
//!
//! The decoder never allocates and never reads past the buffer it is given: it says how many bytes a
//! packet took, or that it needs more, so callers can feed it a growing prefix of a request body.

use std::fmt;

/// The longest pkt-line git writes or accepts, length prefix included (`LARGE_PACKET_MAX`).
pub const MAX_PKT_LEN: usize = 65520;
/// The longest payload of one pkt-line.
pub const MAX_PKT_DATA: usize = MAX_PKT_LEN - 4;

/// `0000`: ends a list.
pub const FLUSH: &[u8] = b"0000";
/// `0001`: separates sections in protocol v2.
pub const DELIM: &[u8] = b"0001";
/// `0002`: ends a response in protocol v2 stateless connections.
pub const RESPONSE_END: &[u8] = b"0002";

/// One decoded packet; `Data` borrows from the buffer it was read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Packet<'a> {
    Data(&'a [u8]),
    Flush,
    Delim,
    ResponseEnd,
}

/// Why bytes are not a pkt-line. Offsets count from the start of the stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PktError {
    /// The four length bytes are not lowercase or uppercase hex digits.
    BadHex { offset: usize, prefix: [u8; 4] },
    /// `0003` is the only length below four that has no meaning.
    BadLength { offset: usize, len: usize },
    /// Longer than [`MAX_PKT_LEN`].
    TooLong { offset: usize, len: usize },
}

impl fmt::Display for PktError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PktError::BadHex { offset, prefix } => write!(
                f,
                "malformed pkt-line at byte {offset}: length {:?} is not four hex digits",
                String::from_utf8_lossy(prefix)
            ),
            PktError::BadLength { offset, len } => {
                write!(f, "malformed pkt-line at byte {offset}: length {len:04x} is below the minimum 0004")
            }
            PktError::TooLong { offset, len } => {
                write!(f, "malformed pkt-line at byte {offset}: length {len} exceeds the maximum {MAX_PKT_LEN}")
            }
        }
    }
}

impl std::error::Error for PktError {}

fn hex_value(b: u8) -> Option<usize> {
    match b {
        b'0'..=b'9' => Some(usize::from(b - b'0')),
        b'a'..=b'f' => Some(usize::from(b - b'a' + 10)),
        b'A'..=b'F' => Some(usize::from(b - b'A' + 10)),
        _ => None,
    }
}

/// Decodes the packet at the start of `buf`. `Ok(None)`: more bytes are needed.
/// `Ok(Some((packet, n)))`: the packet took `n` bytes (always at least 4). `base` is the offset of
/// `buf` in the stream, used only in errors.
pub fn decode(buf: &[u8], base: usize) -> Result<Option<(Packet<'_>, usize)>, PktError> {
    let Some(head) = buf.get(..4) else { return Ok(None) };
    let mut len = 0usize;
    for &b in head {
        let Some(v) = hex_value(b) else {
            return Err(PktError::BadHex { offset: base, prefix: [head[0], head[1], head[2], head[3]] });
        };
        len = len * 16 + v;
    }
    let packet = match len {
        0 => Packet::Flush,
        1 => Packet::Delim,
        2 => Packet::ResponseEnd,
        3 => return Err(PktError::BadLength { offset: base, len }),
        n if n > MAX_PKT_LEN => return Err(PktError::TooLong { offset: base, len: n }),
        n => match buf.get(4..n) {
            Some(data) => return Ok(Some((Packet::Data(data), n))),
            None => return Ok(None),
        },
    };
    Ok(Some((packet, 4)))
}

/// Walks the packets of a buffer in order; `offset` only grows.
#[derive(Clone, Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    offset: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf, offset: 0 }
    }

    /// Bytes consumed so far.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// The next packet, `Ok(None)` when the buffer ends before a whole packet.
    pub fn next_packet(&mut self) -> Result<Option<Packet<'a>>, PktError> {
        let rest = &self.buf[self.offset..];
        match decode(rest, self.offset)? {
            Some((packet, n)) => {
                self.offset += n;
                Ok(Some(packet))
            }
            None => Ok(None),
        }
    }
}

/// Appends one data pkt-line. Payloads longer than [`MAX_PKT_DATA`] are the caller's bug; they are
/// split so the output stays valid.
pub fn put_data(out: &mut Vec<u8>, data: &[u8]) {
    if data.is_empty() {
        out.extend_from_slice(b"0004");
        return;
    }
    for chunk in data.chunks(MAX_PKT_DATA) {
        out.extend_from_slice(format!("{:04x}", chunk.len() + 4).as_bytes());
        out.extend_from_slice(chunk);
    }
}

/// Appends side-band packets no longer than `max_pkt_len` (1000 for `side-band`, [`MAX_PKT_LEN`]
/// for `side-band-64k`): the band byte, then the payload, split to fit.
pub fn put_band(out: &mut Vec<u8>, band: u8, data: &[u8], max_pkt_len: usize) {
    for chunk in data.chunks(max_pkt_len.clamp(6, MAX_PKT_LEN) - 5) {
        out.extend_from_slice(format!("{:04x}", chunk.len() + 5).as_bytes());
        out.push(band);
        out.extend_from_slice(chunk);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_each_kind() {
        assert_eq!(decode(b"0000rest", 0), Ok(Some((Packet::Flush, 4))));
        assert_eq!(decode(b"0001", 0), Ok(Some((Packet::Delim, 4))));
        assert_eq!(decode(b"0002", 0), Ok(Some((Packet::ResponseEnd, 4))));
        assert_eq!(decode(b"0004", 0), Ok(Some((Packet::Data(b""), 4))));
        assert_eq!(decode(b"0009hello0000", 0), Ok(Some((Packet::Data(b"hello"), 9))));
        assert_eq!(decode(b"000AhelloX", 0), Ok(Some((Packet::Data(b"helloX"), 10))), "uppercase hex");
    }

    #[test]
    fn asks_for_more_when_short() {
        assert_eq!(decode(b"", 0), Ok(None));
        assert_eq!(decode(b"00", 0), Ok(None));
        assert_eq!(decode(b"0009hell", 0), Ok(None));
    }

    #[test]
    fn refuses_bad_lengths() {
        assert_eq!(decode(b"00x9hello", 7), Err(PktError::BadHex { offset: 7, prefix: *b"00x9" }));
        assert_eq!(decode(b"0003", 0), Err(PktError::BadLength { offset: 0, len: 3 }));
        assert_eq!(decode(b"fff1", 0), Err(PktError::TooLong { offset: 0, len: 0xfff1 }));
        assert_eq!(decode(b"fff0", 0), Ok(None), "the maximum itself is fine");
        assert_eq!(
            decode(b" 009", 0).unwrap_err().to_string(),
            "malformed pkt-line at byte 0: length \" 009\" is not four hex digits"
        );
        assert_eq!(
            decode(b"+009", 0).unwrap_err(),
            PktError::BadHex { offset: 0, prefix: *b"+009" },
            "no sign accepted, unlike strtol"
        );
    }

    #[test]
    fn reader_offsets_only_grow() {
        let mut buf = Vec::new();
        put_data(&mut buf, b"one\n");
        put_data(&mut buf, b"two");
        buf.extend_from_slice(FLUSH);
        buf.extend_from_slice(DELIM);
        buf.extend_from_slice(b"00");
        let mut r = Reader::new(&buf);
        let mut seen = Vec::new();
        let mut last = 0;
        while let Some(p) = r.next_packet().unwrap() {
            assert!(r.offset() > last);
            last = r.offset();
            seen.push(p);
        }
        assert_eq!(seen, [Packet::Data(b"one\n"), Packet::Data(b"two"), Packet::Flush, Packet::Delim]);
        assert_eq!(r.offset(), buf.len() - 2);
        assert_eq!(r.next_packet(), Ok(None), "a partial packet stays unread");
    }

    #[test]
    fn errors_carry_stream_offsets() {
        let mut r = Reader::new(b"0008abcdzzzz");
        assert_eq!(r.next_packet(), Ok(Some(Packet::Data(b"abcd"))));
        assert_eq!(r.next_packet(), Err(PktError::BadHex { offset: 8, prefix: *b"zzzz" }));
        assert_eq!(r.offset(), 8);
    }

    #[test]
    fn encode_then_decode_is_identity() {
        for len in [0usize, 1, 100, MAX_PKT_DATA, MAX_PKT_DATA + 1, 3 * MAX_PKT_DATA + 7] {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut buf = Vec::new();
            put_data(&mut buf, &data);
            let mut r = Reader::new(&buf);
            let mut joined = Vec::new();
            while let Some(Packet::Data(d)) = r.next_packet().unwrap() {
                assert!(d.len() <= MAX_PKT_DATA);
                joined.extend_from_slice(d);
            }
            assert_eq!(joined, data);
            assert_eq!(r.offset(), buf.len());
        }
        let mut buf = Vec::new();
        put_band(&mut buf, 2, b"hi\n", MAX_PKT_LEN);
        assert_eq!(buf, b"0008\x02hi\n");
        let mut small = Vec::new();
        put_band(&mut small, 1, &[b'x'; 1000], 1000);
        assert_eq!(&small[..5], b"03e8\x01");
        assert_eq!(&small[1000..1005], b"000a\x01", "the rest, 5 bytes, in a second packet");
    }
}
