//! A guard in front of hyper that reads each request head first: ambiguous framing, malformed heads,
//! oversized heads and slow heads are answered in sluice's own words instead of reaching hyper, whose
//! answers to them are bare (or, for `Content-Length` + `Transfer-Encoding`, a silent normalisation).
//!
//! The guard follows the connection's framing (heads, `Content-Length` bodies, chunked bodies) so it
//! finds every head on a keep-alive connection; after a `CONNECT` head it passes bytes through. When it
//! refuses, it hands hyper a synthetic request to an unguessable path instead of the bad head, so the
//! refusal is answered by the one error mapping, in order after any earlier response.

use std::io;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Most header lines a request may have.
pub(crate) const MAX_HEADERS: usize = 100;
/// Longest trailer section of a chunked body.
const MAX_TRAILERS: usize = 8 * 1024;

/// Why the guard refused a head; the proxy turns it into the answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadRefusal {
    Malformed = 1,
    Framing = 2,
    TooLarge = 3,
    Timeout = 4,
}

impl HeadRefusal {
    fn from_code(code: u8) -> Option<HeadRefusal> {
        Some(match code {
            1 => HeadRefusal::Malformed,
            2 => HeadRefusal::Framing,
            3 => HeadRefusal::TooLarge,
            4 => HeadRefusal::Timeout,
            _ => return None,
        })
    }
}

/// The secret path prefix of synthetic refusal requests: random per process, so no client can forge one.
fn refusal_prefix() -> &'static str {
    static PREFIX: OnceLock<String> = OnceLock::new();
    PREFIX.get_or_init(|| {
        let mut bytes = [0u8; 16];
        // Without randomness the prefix would be guessable; a fixed fallback keeps the proxy up and the
        // worst case is a client forging its own refusal.
        let _ = getrandom::fill(&mut bytes);
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        format!("/.sluice-refusal-{hex}/")
    })
}

/// Reads a synthetic refusal request back: `(kind, detail)` when `path` is one.
pub fn parse_refusal(path: &str, detail: Option<&str>) -> Option<(HeadRefusal, String)> {
    let code = path.strip_prefix(refusal_prefix())?.parse::<u8>().ok()?;
    Some((HeadRefusal::from_code(code)?, detail.unwrap_or("").to_string()))
}

fn synthetic_request(kind: HeadRefusal, detail: &str) -> Vec<u8> {
    // The detail travels in a header: keep it to printable ASCII.
    let detail: String =
        detail.chars().map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { '?' }).take(300).collect();
    format!(
        "GET {}{} HTTP/1.1\r\nHost: sluice\r\nX-Sluice-Detail: {detail}\r\nConnection: close\r\n\r\n",
        refusal_prefix(),
        kind as u8
    )
    .into_bytes()
}

#[derive(Clone, Copy, Debug)]
pub struct HeadLimits {
    pub max_head: usize,
    /// From the first byte of a head to its end.
    pub head_timeout: Duration,
    /// How long a keep-alive connection may sit idle between requests.
    pub idle_timeout: Duration,
}

#[derive(Debug)]
enum Phase {
    Head,
    Body(u64),
    Chunked(Chunked),
    /// After a CONNECT head: everything passes through.
    Tunnel,
    /// A synthetic refusal is being handed to hyper; then EOF.
    Refusing(Vec<u8>, usize),
    Closed,
}

pub struct HeadGuard<S> {
    inner: S,
    buf: BytesMut,
    phase: Phase,
    limits: HeadLimits,
    deadline: Pin<Box<Sleep>>,
    /// Whether the current head has started (its first byte arrived): the deadline is then the head's.
    head_started: bool,
    /// Buffered bytes already inspected (a head) and not yet handed on.
    approved: usize,
}

impl<S> HeadGuard<S> {
    pub fn new(inner: S, limits: HeadLimits) -> HeadGuard<S> {
        let deadline = Box::pin(tokio::time::sleep(limits.idle_timeout));
        HeadGuard {
            inner,
            buf: BytesMut::new(),
            phase: Phase::Head,
            limits,
            deadline,
            head_started: false,
            approved: 0,
        }
    }

    /// The stream and the bytes read from it that were not yet handed on.
    pub fn into_parts(self) -> (S, BytesMut) {
        (self.inner, self.buf)
    }

    /// Gives back a head read with [`HeadGuard::next_head`]: it is handed on again, before anything else.
    pub fn unread(&mut self, head: BytesMut) {
        let mut buf = head;
        self.approved = buf.len();
        buf.unsplit(std::mem::take(&mut self.buf));
        self.buf = buf;
    }

    /// The stream the guard reads from, for writing an answer.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }
}

impl<S: AsyncRead + Unpin> HeadGuard<S> {
    /// After a head that was answered without being passed on (a refused CONNECT on a connection that
    /// stays open): the next bytes are a head again, not a tunnel.
    pub fn expect_head(&mut self) {
        self.start_head(!self.buf.is_empty());
    }

    /// Reads the next head the guard hands on (or the synthetic request standing for its refusal) and
    /// nothing after it. `None` when the connection ends first.
    pub async fn next_head(&mut self) -> io::Result<Option<BytesMut>> {
        use tokio::io::AsyncReadExt;
        let mut head = BytesMut::with_capacity(1024);
        loop {
            if self.read_buf(&mut head).await? == 0 {
                return Ok(None);
            }
            // The guard hands on a whole head and stops there; anything after it is handed back.
            if let Some(end) = find_head_end(&head) {
                if end < head.len() {
                    let rest = head.split_off(end);
                    self.unread(rest);
                }
                return Ok(Some(head));
            }
        }
    }

    fn refuse(&mut self, kind: HeadRefusal, detail: &str) {
        tracing::debug!(?kind, detail, "request head refused");
        self.buf.clear();
        self.phase = Phase::Refusing(synthetic_request(kind, detail), 0);
    }

    /// A new head is expected; `has_bytes` says whether some of it is already buffered (the idle
    /// deadline applies until its first byte arrives, the head deadline after).
    fn start_head(&mut self, has_bytes: bool) {
        self.phase = Phase::Head;
        self.head_started = has_bytes;
        let wait = if self.head_started { self.limits.head_timeout } else { self.limits.idle_timeout };
        self.deadline.as_mut().reset(Instant::now() + wait);
    }

    /// Looks at the buffered head: refuses it, or releases it and moves to its body's phase. Returns
    /// the number of head bytes to release, or `None` when more bytes are needed.
    fn inspect_head(&mut self) -> Option<usize> {
        let Some(end) = find_head_end(&self.buf) else {
            if self.buf.len() > self.limits.max_head {
                let max = self.limits.max_head;
                self.refuse(HeadRefusal::TooLarge, &format!("request head is over {max} bytes"));
            }
            return None;
        };
        if end > self.limits.max_head {
            let max = self.limits.max_head;
            self.refuse(HeadRefusal::TooLarge, &format!("request head is over {max} bytes"));
            return None;
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        let framing = match req.parse(&self.buf[..end]) {
            Ok(httparse::Status::Complete(_)) => framing(&req),
            Ok(httparse::Status::Partial) => Err((HeadRefusal::Malformed, "incomplete request head".to_string())),
            Err(e) => Err((HeadRefusal::Malformed, format!("malformed request head: {e}"))),
        };
        match framing {
            Err((kind, detail)) => {
                self.refuse(kind, &detail);
                None
            }
            Ok(Phase::Head) => {
                self.start_head(self.buf.len() > end);
                Some(end)
            }
            Ok(next) => {
                self.phase = next;
                Some(end)
            }
        }
    }
}

/// The phase after a head: its body's framing. Refuses every head whose body length could be read two
/// ways.
fn framing(req: &httparse::Request<'_, '_>) -> Result<Phase, (HeadRefusal, String)> {
    let bad = |m: &str| Err((HeadRefusal::Framing, m.to_string()));
    let target = req.path.unwrap_or("");
    let headers: &[httparse::Header<'_>] = req.headers;
    let named = |name: &'static str| headers.iter().filter(move |h| h.name.eq_ignore_ascii_case(name));
    // Identity is read from this header: two of them could be read two ways along the path.
    if named("proxy-authorization").nth(1).is_some() {
        return Err((HeadRefusal::Malformed, "request has more than one Proxy-Authorization header".to_string()));
    }
    if req.method == Some("CONNECT") {
        // A body would leave where the request ends (and the tunnel starts) open to two readings.
        let has_body = named("transfer-encoding").next().is_some()
            || named("content-length").any(|h| h.value.iter().any(|&b| b != b'0'));
        if has_body {
            return bad("CONNECT takes no body: send no Content-Length or Transfer-Encoding");
        }
        // hyper would refuse a target that is not an authority with a bare 400; say what is wrong.
        // What hyper accepts, the CONNECT handler checks and words itself.
        if target.parse::<http::uri::Authority>().is_ok() {
            return Ok(Phase::Tunnel);
        }
        if target.contains("://") || target.starts_with('/') {
            let hint = "e.g. CONNECT example.com:443";
            return Err((HeadRefusal::Malformed, format!("CONNECT takes host:port, not a URL ({target}); {hint}")));
        }
        let why = crate::policy::Authority::parse(target, None)
            .err()
            .map_or("expected host:port".to_string(), |e| e.to_string());
        return Err((HeadRefusal::Malformed, format!("bad CONNECT target {target:?}: {why}")));
    }
    if target.parse::<http::Uri>().is_err() {
        return Err((HeadRefusal::Malformed, format!("request target {target:?} is not a valid URI")));
    }
    let mut lengths = req.headers.iter().filter(|h| h.name.eq_ignore_ascii_case("content-length"));
    let mut codings = req.headers.iter().filter(|h| h.name.eq_ignore_ascii_case("transfer-encoding"));
    let (length, coding) = (lengths.next(), codings.next());
    if lengths.next().is_some() {
        return bad("request has more than one Content-Length");
    }
    if codings.next().is_some() {
        return bad("request has more than one Transfer-Encoding header");
    }
    match (length, coding) {
        (Some(_), Some(_)) => bad("request has both Content-Length and Transfer-Encoding; send one"),
        (Some(l), None) => {
            let ok = !l.value.is_empty() && l.value.len() <= 19 && l.value.iter().all(u8::is_ascii_digit);
            match std::str::from_utf8(l.value).ok().and_then(|v| v.parse::<u64>().ok()).filter(|_| ok) {
                Some(0) => Ok(Phase::Head),
                Some(n) => Ok(Phase::Body(n)),
                None => bad("Content-Length must be a single decimal number"),
            }
        }
        (None, Some(t)) if t.value.eq_ignore_ascii_case(b"chunked") => Ok(Phase::Chunked(Chunked::default())),
        (None, Some(_)) => bad("unsupported Transfer-Encoding: only \"chunked\" is accepted"),
        (None, None) => Ok(Phase::Head),
    }
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// A chunked-body walker: it only finds where the body ends (the bytes pass on unchanged) and refuses
/// sizes and delimiters that do not parse.
#[derive(Debug, Default)]
struct Chunked {
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
    fn feed(&mut self, bytes: &[u8]) -> Result<(usize, bool), &'static str> {
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

/// Reads more bytes from the stream into the buffer. `Ok(false)` at EOF.
fn poll_fill<S: AsyncRead + Unpin>(inner: &mut S, buf: &mut BytesMut, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
    let mut chunk = [0u8; 8192];
    let mut rb = ReadBuf::new(&mut chunk);
    ready!(Pin::new(inner).poll_read(cx, &mut rb))?;
    let n = rb.filled().len();
    buf.extend_from_slice(rb.filled());
    Poll::Ready(Ok(n > 0))
}

/// Hands up to `n` buffered bytes on.
fn release(buf: &mut BytesMut, n: usize, out: &mut ReadBuf<'_>) {
    let n = n.min(out.remaining()).min(buf.len());
    out.put_slice(&buf[..n]);
    buf.advance(n);
}

impl<S: AsyncRead + Unpin> AsyncRead for HeadGuard<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.approved > 0 {
                let n = this.approved.min(out.remaining());
                release(&mut this.buf, n, out);
                this.approved -= n;
                return Poll::Ready(Ok(()));
            }
            match &mut this.phase {
                Phase::Closed => return Poll::Ready(Ok(())),
                Phase::Refusing(bytes, at) => {
                    let n = (bytes.len() - *at).min(out.remaining());
                    out.put_slice(&bytes[*at..*at + n]);
                    *at += n;
                    if *at == bytes.len() {
                        this.phase = Phase::Closed;
                    }
                    return Poll::Ready(Ok(()));
                }
                Phase::Tunnel => {
                    if !this.buf.is_empty() {
                        let n = this.buf.len();
                        release(&mut this.buf, n, out);
                        return Poll::Ready(Ok(()));
                    }
                    return Pin::new(&mut this.inner).poll_read(cx, out);
                }
                Phase::Body(remaining) => {
                    if *remaining == 0 {
                        let has_bytes = !this.buf.is_empty();
                        this.start_head(has_bytes);
                        continue;
                    }
                    if this.buf.is_empty() && !ready!(poll_fill(&mut this.inner, &mut this.buf, cx))? {
                        // EOF mid-body: hyper sees the short body and fails the request.
                        return Poll::Ready(Ok(()));
                    }
                    let n = usize::try_from(*remaining).unwrap_or(usize::MAX).min(this.buf.len()).min(out.remaining());
                    *remaining -= n as u64;
                    release(&mut this.buf, n, out);
                    return Poll::Ready(Ok(()));
                }
                Phase::Chunked(chunked) => {
                    if this.buf.is_empty() && !ready!(poll_fill(&mut this.inner, &mut this.buf, cx))? {
                        return Poll::Ready(Ok(()));
                    }
                    let window = this.buf.len().min(out.remaining());
                    match chunked.feed(&this.buf[..window]) {
                        Ok((n, done)) => {
                            release(&mut this.buf, n, out);
                            if done {
                                let has_bytes = !this.buf.is_empty();
                                this.start_head(has_bytes);
                            }
                            return Poll::Ready(Ok(()));
                        }
                        Err(e) => {
                            // Part of the body may already be upstream; nothing after the bad chunk is.
                            // hyper sees the body end early, the request fails with a 400, and the
                            // connection closes.
                            tracing::debug!(error = e, "chunked request body refused");
                            this.buf.clear();
                            this.phase = Phase::Closed;
                            return Poll::Ready(Ok(()));
                        }
                    }
                }
                Phase::Head => {
                    if !this.buf.is_empty() {
                        if !this.head_started {
                            this.head_started = true;
                            this.deadline.as_mut().reset(Instant::now() + this.limits.head_timeout);
                        }
                        if let Some(n) = this.inspect_head() {
                            this.approved = n;
                            continue;
                        }
                        if !matches!(this.phase, Phase::Head) {
                            continue;
                        }
                    }
                    match poll_fill(&mut this.inner, &mut this.buf, cx) {
                        Poll::Ready(Ok(true)) => continue,
                        Poll::Ready(Ok(false)) => {
                            this.phase = Phase::Closed;
                            if !this.buf.is_empty() {
                                let detail = "the connection closed in the middle of a request head";
                                this.refuse(HeadRefusal::Malformed, detail);
                            }
                            continue;
                        }
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => {
                            if this.deadline.as_mut().poll(cx).is_ready() {
                                if this.head_started {
                                    let secs = this.limits.head_timeout.as_secs_f64();
                                    this.refuse(
                                        HeadRefusal::Timeout,
                                        &format!("request head not complete within {secs}s"),
                                    );
                                } else {
                                    this.phase = Phase::Closed;
                                }
                                continue;
                            }
                            return Poll::Pending;
                        }
                    }
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for HeadGuard<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const LIMITS: HeadLimits =
        HeadLimits { max_head: 1024, head_timeout: Duration::from_secs(5), idle_timeout: Duration::from_secs(5) };

    /// What hyper would read through the guard when a client sends `input` and closes.
    async fn through(input: &[u8]) -> String {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        client.write_all(input).await.unwrap();
        client.shutdown().await.unwrap();
        let mut guard = HeadGuard::new(server, LIMITS);
        let mut out = Vec::new();
        let _ = guard.read_to_end(&mut out).await;
        let text = String::from_utf8_lossy(&out).into_owned();
        text.replace(refusal_prefix(), "/REFUSAL/")
    }

    fn refusal(code: u8, detail: &str) -> String {
        format!(
            "GET /REFUSAL/{code} HTTP/1.1\r\nHost: sluice\r\nX-Sluice-Detail: {detail}\r\nConnection: close\r\n\r\n"
        )
    }

    #[tokio::test]
    async fn well_framed_requests_pass_unchanged() {
        let two = "GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\nPOST http://a/ HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET http://b/ HTTP/1.1\r\n\r\n";
        assert_eq!(through(two.as_bytes()).await, two);
        let chunked = "POST http://a/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n0\r\nT: v\r\n\r\nGET http://b/ HTTP/1.1\r\n\r\n";
        assert_eq!(through(chunked.as_bytes()).await, chunked);
        let tunnel = "CONNECT a:443 HTTP/1.1\r\n\r\n\x16\x03\x01 binary \r\n\r\n bytes";
        assert_eq!(through(tunnel.as_bytes()).await, tunnel);
    }

    #[tokio::test]
    async fn ambiguous_framing_becomes_a_refusal() {
        let cl_te = "POST http://a/ HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        assert_eq!(
            through(cl_te.as_bytes()).await,
            refusal(2, "request has both Content-Length and Transfer-Encoding; send one")
        );
        let dup = "POST http://a/ HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello";
        assert_eq!(through(dup.as_bytes()).await, refusal(2, "request has more than one Content-Length"));
        let te = "POST http://a/ HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n";
        assert_eq!(
            through(te.as_bytes()).await,
            refusal(2, "unsupported Transfer-Encoding: only \"chunked\" is accepted")
        );
        let port = "CONNECT a:443:443 HTTP/1.1\r\n\r\n";
        assert_eq!(
            through(port.as_bytes()).await,
            refusal(
                1,
                "bad CONNECT target \"a:443:443\": IPv6 addresses must be written in brackets, e.g. [2001:db8::1]:443"
            )
        );
        let body = "CONNECT a:443 HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello";
        let no_body = refusal(2, "CONNECT takes no body: send no Content-Length or Transfer-Encoding");
        assert_eq!(through(body.as_bytes()).await, no_body);
        let chunked = "CONNECT a:443 HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        assert_eq!(through(chunked.as_bytes()).await, no_body);
        let zero = "CONNECT a:443 HTTP/1.1\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(through(zero.as_bytes()).await, zero);
        let two_ids = "CONNECT a:443 HTTP/1.1\r\nProxy-Authorization: Basic a\r\nproxy-authorization: Basic b\r\n\r\n";
        let two = refusal(1, "request has more than one Proxy-Authorization header");
        assert_eq!(through(two_ids.as_bytes()).await, two);
        let obs_fold = "GET http://a/ HTTP/1.1\r\nX: a\r\n b\r\n\r\n";
        assert_eq!(through(obs_fold.as_bytes()).await, refusal(1, "malformed request head: invalid header name"));
    }

    #[tokio::test]
    async fn a_second_request_is_inspected_too() {
        let smuggle = "POST http://a/ HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcPOST http://a/ HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxy";
        let first = "POST http://a/ HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc";
        assert_eq!(
            through(smuggle.as_bytes()).await,
            format!("{first}{}", refusal(2, "request has more than one Content-Length"))
        );
    }

    #[tokio::test]
    async fn oversized_and_truncated_heads() {
        let big = format!("GET http://a/ HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(2000));
        assert_eq!(through(big.as_bytes()).await, refusal(3, "request head is over 1024 bytes"));
        assert_eq!(
            through(b"GET http://a/ HTTP/1.1\r\nHost: a").await,
            refusal(1, "the connection closed in the middle of a request head")
        );
        assert_eq!(through(b"").await, "");
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

    #[test]
    fn refusal_paths_cannot_be_guessed_or_forged() {
        assert_eq!(parse_refusal("/.sluice-refusal-00/1", None), None);
        let path = format!("{}2", refusal_prefix());
        assert_eq!(parse_refusal(&path, Some("x")), Some((HeadRefusal::Framing, "x".to_string())));
        assert_eq!(refusal_prefix().len(), "/.sluice-refusal-/".len() + 32);
    }
}
