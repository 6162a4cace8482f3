//! HTTP/1 framing rules for request heads, pure: where a head ends, whether it can be read only one
//! way, and how its body is delimited. The head guard applies them; the fuzz targets check them.

use crate::refusal::Refusal;

/// Most header lines a request may have.
pub(crate) const MAX_HEADERS: usize = 100;
/// Longest trailer section of a chunked body.
const MAX_TRAILERS: usize = 8 * 1024;

/// What follows a head.
#[derive(Debug, PartialEq, Eq)]
pub enum Framing {
    /// No body: the next bytes are the next head.
    NoBody,
    /// A `Content-Length` body of this many bytes.
    Length(u64),
    /// A chunked body.
    Chunked,
    /// A CONNECT: everything after the head belongs to the tunnel.
    Tunnel,
}

/// Where a head ends, searched incrementally: `scanned` is how much of `buf` earlier calls looked at
/// without finding the end (the caller keeps it), so a head sent in small pieces costs linear time.
///
/// A head ends at its first empty line, whether lines end in CRLF or in a bare LF: exactly where
/// httparse ends it. (Heads with bare LF are then refused by [`check_line_endings`]; the guard and
/// the parser must never disagree on where a head ends, or a second request could hide in the first.)
pub fn find_head_end(buf: &[u8], scanned: &mut usize) -> Option<usize> {
    // A match may straddle the old boundary by up to two bytes ("\n\r" then "\n").
    let from = scanned.saturating_sub(2);
    let mut i = from;
    while let Some(at) = memchr_lf(&buf[i..]) {
        let lf = i + at;
        match buf.get(lf + 1) {
            Some(b'\n') => return Some(lf + 2),
            Some(b'\r') => match buf.get(lf + 2) {
                Some(b'\n') => return Some(lf + 3),
                Some(_) => {}
                None => break,
            },
            Some(_) => {}
            None => break,
        }
        i = lf + 1;
    }
    *scanned = buf.len();
    None
}

fn memchr_lf(bytes: &[u8]) -> Option<usize> {
    bytes.iter().position(|&b| b == b'\n')
}

/// HTTP/1.1 lines end in CRLF. A bare LF is refused: servers differ on whether it ends a line, and
/// that difference is how requests are smuggled.
pub fn check_line_endings(head: &[u8]) -> Result<(), Refusal> {
    let bare = head.iter().enumerate().any(|(i, &b)| b == b'\n' && (i == 0 || head[i - 1] != b'\r'));
    if bare {
        return Err(Refusal::bad_request("request head has a line ending in a bare LF; lines must end with CRLF"));
    }
    Ok(())
}

/// Header names that, with `_` read as `-`, name a header that frames the request or identifies the
/// client: a back end that folds `_` into `-` would see a second one.
const FOLDED: [&str; 8] = [
    "content-length",
    "transfer-encoding",
    "host",
    "connection",
    "proxy-authorization",
    "authorization",
    "upgrade",
    "te",
];

/// A header name such as `Content_Length`, which some back ends read as `Content-Length`.
pub fn check_header_names(headers: &[httparse::Header<'_>]) -> Result<(), Refusal> {
    for h in headers {
        if !h.name.contains('_') {
            continue;
        }
        let folded = h.name.replace('_', "-");
        if FOLDED.iter().any(|n| folded.eq_ignore_ascii_case(n)) {
            return Err(Refusal::bad_request(format!(
                "header name {:?} has an underscore where {:?} has a hyphen; servers may read it as {:?}, so it is refused",
                h.name,
                folded.to_ascii_lowercase(),
                folded.to_ascii_lowercase()
            )));
        }
    }
    Ok(())
}

/// The framing after a parsed head. Refuses every head whose body length could be read two ways.
pub fn framing(req: &httparse::Request<'_, '_>) -> Result<Framing, Refusal> {
    let target = req.path.unwrap_or("");
    let headers: &[httparse::Header<'_>] = req.headers;
    check_header_names(headers)?;
    let named = |name: &'static str| headers.iter().filter(move |h| h.name.eq_ignore_ascii_case(name));
    // Identity is read from this header: two of them could be read two ways along the path.
    if named("proxy-authorization").nth(1).is_some() {
        return Err(Refusal::bad_request("request has more than one Proxy-Authorization header"));
    }
    if req.method == Some("CONNECT") {
        // A body would leave where the request ends (and the tunnel starts) open to two readings.
        let has_body = named("transfer-encoding").next().is_some()
            || named("content-length").any(|h| h.value.iter().any(|&b| b != b'0'));
        if has_body {
            return Err(Refusal::bad_request("CONNECT takes no body: send no Content-Length or Transfer-Encoding"));
        }
        // hyper would refuse a target that is not an authority with a bare 400; say what is wrong.
        // What hyper accepts, the CONNECT handler checks and words itself.
        if target.parse::<http::uri::Authority>().is_ok() {
            return Ok(Framing::Tunnel);
        }
        if target.contains("://") || target.starts_with('/') {
            let hint = "e.g. CONNECT example.com:443";
            return Err(Refusal::bad_request(format!("CONNECT takes host:port, not a URL ({target}); {hint}")));
        }
        let why = crate::policy::Authority::parse(target, None)
            .err()
            .map_or("expected host:port".to_string(), |e| e.to_string());
        return Err(Refusal::bad_request(format!("bad CONNECT target {target:?}: {why}")));
    }
    if target.parse::<http::Uri>().is_err() {
        return Err(Refusal::bad_request(format!("request target {target:?} is not a valid URI")));
    }
    let mut lengths = named("content-length");
    let mut codings = named("transfer-encoding");
    let (length, coding) = (lengths.next(), codings.next());
    if lengths.next().is_some() {
        return Err(Refusal::bad_request("request has more than one Content-Length"));
    }
    if codings.next().is_some() {
        return Err(Refusal::bad_request("request has more than one Transfer-Encoding header"));
    }
    match (length, coding) {
        (Some(_), Some(_)) => {
            Err(Refusal::bad_request("request has both Content-Length and Transfer-Encoding; send one"))
        }
        (Some(l), None) => {
            let ok = !l.value.is_empty() && l.value.len() <= 19 && l.value.iter().all(u8::is_ascii_digit);
            match std::str::from_utf8(l.value).ok().and_then(|v| v.parse::<u64>().ok()).filter(|_| ok) {
                Some(0) => Ok(Framing::NoBody),
                Some(n) => Ok(Framing::Length(n)),
                None => Err(Refusal::bad_request("Content-Length must be a single decimal number")),
            }
        }
        (None, Some(t)) if t.value.eq_ignore_ascii_case(b"chunked") => Ok(Framing::Chunked),
        (None, Some(_)) => Err(Refusal::bad_request("unsupported Transfer-Encoding: only \"chunked\" is accepted")),
        (None, None) => Ok(Framing::NoBody),
    }
}

/// A chunked-body walker: it only finds where the body ends (the bytes pass on unchanged) and refuses
/// sizes and delimiters that do not parse.
#[derive(Debug, Default)]
pub(crate) struct Chunked {
    state: ChunkState,
    size_digits: u8,
    size: u64,
    trailer_bytes: usize,
}

#[derive(Debug, Default, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// After the last chunk: trailer lines until an empty one. `line_len` counts the current line.
    Trailer {
        line_len: usize,
    },
    TrailerLf {
        line_len: usize,
    },
}

impl Chunked {
    /// Walks `bytes`; returns how many belong to the body and whether the body ended there.
    pub(crate) fn feed(&mut self, bytes: &[u8]) -> Result<(usize, bool), &'static str> {
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            match self.state {
                ChunkState::Size => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        self.size_digits += 1;
                        if self.size_digits > 15 {
                            return Err("chunk size too large");
                        }
                        self.size = self.size * 16 + u64::from((b as char).to_digit(16).unwrap_or(0));
                    }
                    b';' if self.size_digits > 0 => self.state = ChunkState::Extension,
                    b'\r' if self.size_digits > 0 => self.state = ChunkState::SizeLf,
                    _ => return Err("invalid chunk size"),
                },
                ChunkState::Extension => match b {
                    b'\r' => self.state = ChunkState::SizeLf,
                    b'\n' => return Err("bare LF in a chunk extension"),
                    _ => {}
                },
                ChunkState::SizeLf => {
                    if b != b'\n' {
                        return Err("chunk size line must end with CRLF");
                    }
                    self.state = if self.size == 0 { ChunkState::Trailer { line_len: 0 } } else { ChunkState::Data };
                }
                ChunkState::Data => {
                    let take = (bytes.len() - i).min(usize::try_from(self.size).unwrap_or(usize::MAX));
                    self.size -= take as u64;
                    i += take;
                    if self.size == 0 {
                        self.state = ChunkState::DataCr;
                    }
                    continue;
                }
                ChunkState::DataCr => {
                    if b != b'\r' {
                        return Err("chunk data longer than its size");
                    }
                    self.state = ChunkState::DataLf;
                }
                ChunkState::DataLf => {
                    if b != b'\n' {
                        return Err("chunk data must end with CRLF");
                    }
                    self.state = ChunkState::Size;
                    self.size_digits = 0;
                }
                ChunkState::Trailer { line_len } => {
                    self.trailer_bytes += 1;
                    if self.trailer_bytes > MAX_TRAILERS {
                        return Err("chunked trailers too large");
                    }
                    self.state = match b {
                        b'\r' => ChunkState::TrailerLf { line_len },
                        b'\n' => return Err("bare LF in chunked trailers"),
                        _ => ChunkState::Trailer { line_len: line_len + 1 },
                    };
                }
                ChunkState::TrailerLf { line_len } => {
                    if b != b'\n' {
                        return Err("chunked trailer line must end with CRLF");
                    }
                    if line_len == 0 {
                        return Ok((i + 1, true));
                    }
                    self.state = ChunkState::Trailer { line_len: 0 };
                }
            }
            i += 1;
        }
        Ok((bytes.len(), false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn end(input: &[u8]) -> Option<usize> {
        find_head_end(input, &mut 0)
    }

    #[test]
    fn a_head_ends_where_httparse_ends_it() {
        for input in [
            &b"GET / HTTP/1.1\r\nHost: a\r\n\r\nrest"[..],
            b"GET / HTTP/1.1\nHost: a\n\nrest",
            b"GET / HTTP/1.1\r\nHost: a\n\r\nrest",
            b"GET / HTTP/1.1\nHost: a\r\n\nrest",
            b"GET / HTTP/1.1\r\n\r\n",
        ] {
            let mut headers = [httparse::EMPTY_HEADER; 8];
            let parsed = match httparse::Request::new(&mut headers).parse(input) {
                Ok(httparse::Status::Complete(n)) => Some(n),
                _ => None,
            };
            assert_eq!(end(input), parsed, "{:?}", String::from_utf8_lossy(input));
        }
        assert_eq!(end(b"GET / HTTP/1.1\r\nHost: a\r\n"), None);
    }

    #[test]
    fn the_search_resumes_where_it_stopped() {
        let head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        for split in 0..head.len() {
            let mut scanned = 0;
            assert_eq!(find_head_end(&head[..split], &mut scanned), None, "split {split}");
            assert_eq!(scanned, split);
            assert_eq!(find_head_end(head, &mut scanned), Some(head.len()), "split {split}");
        }
    }

    #[test]
    fn bare_lf_and_folded_names_are_refused() {
        let r = check_line_endings(b"GET / HTTP/1.1\nHost: a\n\n").unwrap_err();
        assert_eq!(r.message, "request head has a line ending in a bare LF; lines must end with CRLF");
        assert_eq!(check_line_endings(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"), Ok(()));
        let headers = [httparse::Header { name: "Transfer_Encoding", value: b"chunked" }];
        let r = check_header_names(&headers).unwrap_err();
        assert_eq!(
            r.message,
            "header name \"Transfer_Encoding\" has an underscore where \"transfer-encoding\" has a hyphen; servers may read it as \"transfer-encoding\", so it is refused"
        );
        let fine = [httparse::Header { name: "X_Custom_Thing", value: b"1" }];
        assert_eq!(check_header_names(&fine), Ok(()));
    }

    #[test]
    fn chunk_walker_refuses_bad_sizes() {
        let feed = |s: &str| Chunked::default().feed(s.as_bytes());
        assert_eq!(feed("5\r\nhello\r\n0\r\n\r\n"), Ok((15, true)));
        assert_eq!(feed("5\r\nhello\r\n0\r\n\r\nGET"), Ok((15, true)));
        assert_eq!(feed("zz\r\n"), Err("invalid chunk size"));
        assert_eq!(feed("-1\r\n"), Err("invalid chunk size"));
        assert_eq!(feed("\r\n"), Err("invalid chunk size"));
        assert_eq!(feed("5\nhello"), Err("invalid chunk size"));
        assert_eq!(feed("1000000000000000\r\n"), Err("chunk size too large"));
        assert_eq!(feed("3\r\nhello\r\n"), Err("chunk data longer than its size"));
        assert_eq!(feed("3\r\nabc"), Ok((6, false)));
    }
}
