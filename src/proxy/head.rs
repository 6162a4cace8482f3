//! A guard in front of hyper that reads each request head first: ambiguous framing, malformed heads,
//! oversized heads and slow heads are refused in sluice's own words instead of reaching hyper, whose
//! answers to them are bare (or, for `Content-Length` + `Transfer-Encoding`, a silent normalisation).
//!
//! The guard follows the connection's framing ([`framing`](super::framing): heads, `Content-Length`
//! bodies, chunked bodies) so it finds every head on a keep-alive connection; after a `CONNECT` head
//! it passes bytes through. It is read two ways: [`HeadGuard::next_head`] hands a caller whole heads or
//! the [`Refusal`] that stopped them; as an `AsyncRead` (for hyper) a refusal reads as the end of the
//! stream, and the guard writes the refusal's answer itself when hyper, having answered every earlier
//! request, shuts the connection down. No bad head ever reaches hyper.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::framing::{self, Chunked, Framing, MAX_HEADERS};
use crate::refusal::Refusal;

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
    /// A head was refused: reads end here.
    Refused,
    Closed,
}

/// Where a refusal the guard answered on hyper's behalf is reported, so the front end records it.
pub type RefusalSlot = Arc<Mutex<Option<Refusal>>>;

/// What [`HeadGuard::next_head`] found.
#[derive(Debug)]
pub enum NextHead {
    /// A whole head that passed every framing rule, and nothing after it.
    Head(BytesMut),
    /// The connection ended (or failed) before a head began.
    End,
    /// The head was refused; the caller answers it.
    Refused(Refusal),
}

pub struct HeadGuard<S> {
    inner: S,
    buf: BytesMut,
    phase: Phase,
    limits: HeadLimits,
    /// When the wait for the current head (or for a next one to begin) ends.
    due: Instant,
    /// The timer for `due`, made and set only when a read has to wait: a head that arrives whole (nearly
    /// every CONNECT's) arms no timer, and a deadline moved earlier does not wake the runtime's timer
    /// driver (a syscall, and a turn of its loop) for a timer that is dropped unpolled a moment later.
    deadline: Option<Pin<Box<Sleep>>>,
    /// Whether the current head has started (its first byte arrived): the deadline is then the head's.
    head_started: bool,
    /// How much of the buffered head the end-of-head search has looked at already.
    scanned: usize,
    /// Buffered bytes already inspected (a head) and not yet handed on.
    approved: usize,
    /// The refusal that ended reading, until it is answered.
    refusal: Option<Refusal>,
    /// The answer being written at shutdown, and how much of it is written.
    answer: Option<(Vec<u8>, usize)>,
    report: Option<RefusalSlot>,
}

impl<S> HeadGuard<S> {
    pub fn new(inner: S, limits: HeadLimits) -> HeadGuard<S> {
        HeadGuard {
            inner,
            buf: BytesMut::new(),
            phase: Phase::Head,
            limits,
            due: Instant::now() + limits.idle_timeout,
            deadline: None,
            head_started: false,
            scanned: 0,
            approved: 0,
            refusal: None,
            answer: None,
            report: None,
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

    /// Refusals answered on hyper's behalf are also put here.
    pub fn report_to(&mut self, slot: RefusalSlot) {
        self.report = Some(slot);
    }

    fn refuse(&mut self, refusal: Refusal) {
        tracing::debug!(code = refusal.code, message = %refusal.message, "request head refused");
        self.buf.clear();
        if let Some(slot) = &self.report
            && let Ok(mut slot) = slot.lock()
        {
            *slot = Some(refusal.clone());
        }
        self.refusal = Some(refusal);
        self.phase = Phase::Refused;
    }

    /// A new head is expected; `has_bytes` says whether some of it is already buffered (the idle
    /// deadline applies until its first byte arrives, the head deadline after).
    fn start_head(&mut self, has_bytes: bool) {
        self.phase = Phase::Head;
        self.head_started = has_bytes;
        self.scanned = 0;
        let wait = if self.head_started { self.limits.head_timeout } else { self.limits.idle_timeout };
        self.due = Instant::now() + wait;
    }

    /// Looks at the buffered head: refuses it, or releases it and moves to its body's phase. Returns
    /// the number of head bytes to release, or `None` when more bytes are needed.
    fn inspect_head(&mut self) -> Option<usize> {
        let max = self.limits.max_head;
        let too_large = || Refusal::head_too_large(format!("request head is over {max} bytes"));
        let Some(end) = framing::find_head_end(&self.buf, &mut self.scanned) else {
            if self.buf.len() > max {
                self.refuse(too_large());
            }
            return None;
        };
        if end > max {
            self.refuse(too_large());
            return None;
        }
        match inspect(&self.buf[..end]) {
            Err(refusal) => {
                self.refuse(refusal);
                None
            }
            Ok(Framing::NoBody) => {
                self.start_head(self.buf.len() > end);
                Some(end)
            }
            Ok(Framing::Length(n)) => {
                self.phase = Phase::Body(n);
                Some(end)
            }
            Ok(Framing::Chunked) => {
                self.phase = Phase::Chunked(Chunked::default());
                Some(end)
            }
            Ok(Framing::Tunnel) => {
                self.phase = Phase::Tunnel;
                Some(end)
            }
        }
    }
}

/// Every rule a whole head must pass before anything reads it.
fn inspect(head: &[u8]) -> Result<Framing, Refusal> {
    framing::check_line_endings(head)?;
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(n)) if n == head.len() => framing::framing(&req),
        Ok(_) => Err(Refusal::bad_request("incomplete request head")),
        Err(e) => Err(Refusal::bad_request(format!("malformed request head: {e}"))),
    }
}

impl<S: AsyncRead + Unpin> HeadGuard<S> {
    /// After a head that was answered without being passed on (a refused CONNECT on a connection that
    /// stays open): the next bytes are a head again, not a tunnel.
    pub fn expect_head(&mut self) {
        self.start_head(!self.buf.is_empty());
    }

    /// Reads the next head and nothing after it, or the refusal that stopped it (which the caller
    /// answers: the guard will not).
    pub async fn next_head(&mut self) -> NextHead {
        use tokio::io::AsyncReadExt;
        let mut head = BytesMut::with_capacity(1024);
        let mut scanned = 0;
        loop {
            match self.read_buf(&mut head).await {
                Ok(0) => {
                    self.phase = Phase::Closed;
                    return self.refusal.take().map_or(NextHead::End, NextHead::Refused);
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "connection failed while reading a request head");
                    return NextHead::End;
                }
            }
            // The guard hands on a whole head and stops there; anything after it is handed back.
            if let Some(end) = framing::find_head_end(&head, &mut scanned) {
                if end < head.len() {
                    let rest = head.split_off(end);
                    self.unread(rest);
                }
                return NextHead::Head(head);
            }
        }
    }
}

/// Reads more bytes from the stream into the buffer. `Ok(false)` at EOF.
fn poll_fill<S: AsyncRead + Unpin>(inner: &mut S, buf: &mut BytesMut, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
    // Uninitialised: zeroing 8 KiB before every read was a third of the instructions a tunnel's head
    // cost (callgrind), for bytes the read overwrites.
    let mut chunk = [std::mem::MaybeUninit::<u8>::uninit(); 8192];
    let mut rb = ReadBuf::uninit(&mut chunk);
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
                Phase::Closed | Phase::Refused => return Poll::Ready(Ok(())),
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
                            this.due = Instant::now() + this.limits.head_timeout;
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
                                this.refuse(Refusal::bad_request(detail));
                            }
                            continue;
                        }
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => {
                            let due = this.due;
                            let timer = this.deadline.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
                            if timer.deadline() != due {
                                timer.as_mut().reset(due);
                            }
                            if timer.as_mut().poll(cx).is_ready() {
                                if this.head_started {
                                    let secs = this.limits.head_timeout.as_secs_f64();
                                    this.refuse(Refusal::head_timeout(format!(
                                        "request head not complete within {secs}s"
                                    )));
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

    /// hyper shuts the connection down once it has answered every request it read: a refused head's
    /// answer goes out then, after theirs.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(refusal) = this.refusal.take() {
            this.answer = Some((super::respond::bytes(&refusal, false, http::Version::HTTP_11), 0));
        }
        if let Some((answer, written)) = &mut this.answer {
            while *written < answer.len() {
                let n = ready!(Pin::new(&mut this.inner).poll_write(cx, &answer[*written..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                *written += n;
            }
            this.answer = None;
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
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

    /// What hyper would read through the guard when a client sends `input` and closes, and the
    /// refusal (code, message) that ended it, if one did.
    async fn through(input: &[u8]) -> (String, Option<(&'static str, String)>) {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        client.write_all(input).await.unwrap();
        client.shutdown().await.unwrap();
        let mut guard = HeadGuard::new(server, LIMITS);
        let mut out = Vec::new();
        let _ = guard.read_to_end(&mut out).await;
        let refusal = guard.refusal.as_ref().map(|r| (r.code, r.message.clone()));
        (String::from_utf8_lossy(&out).into_owned(), refusal)
    }

    fn bad(message: &str) -> Option<(&'static str, String)> {
        Some(("bad_request", message.to_string()))
    }

    #[tokio::test]
    async fn well_framed_requests_pass_unchanged() {
        let two = "GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\nPOST http://a/ HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET http://b/ HTTP/1.1\r\n\r\n";
        assert_eq!(through(two.as_bytes()).await, (two.to_string(), None));
        let chunked = "POST http://a/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n0\r\nT: v\r\n\r\nGET http://b/ HTTP/1.1\r\n\r\n";
        assert_eq!(through(chunked.as_bytes()).await, (chunked.to_string(), None));
        let tunnel = "CONNECT a:443 HTTP/1.1\r\n\r\n\x16\x03\x01 binary \n\n bytes";
        assert_eq!(through(tunnel.as_bytes()).await, (tunnel.to_string(), None));
    }

    #[tokio::test]
    async fn ambiguous_framing_is_refused() {
        let cases = [
            (
                "POST http://a/ HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                "request has both Content-Length and Transfer-Encoding; send one",
            ),
            (
                "POST http://a/ HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
                "request has more than one Content-Length",
            ),
            (
                "POST http://a/ HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                "unsupported Transfer-Encoding: only \"chunked\" is accepted",
            ),
            (
                "CONNECT a:443:443 HTTP/1.1\r\n\r\n",
                "bad CONNECT target \"a:443:443\": IPv6 addresses must be written in brackets, e.g. [2001:db8::1]:443",
            ),
            (
                "CONNECT a:443 HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
                "CONNECT takes no body: send no Content-Length or Transfer-Encoding",
            ),
            (
                "CONNECT a:443 HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                "CONNECT takes no body: send no Content-Length or Transfer-Encoding",
            ),
            (
                "CONNECT a:443 HTTP/1.1\r\nProxy-Authorization: Basic a\r\nproxy-authorization: Basic b\r\n\r\n",
                "request has more than one Proxy-Authorization header",
            ),
            ("GET http://a/ HTTP/1.1\r\nX: a\r\n b\r\n\r\n", "malformed request head: invalid header name"),
            (
                "GET http://a/ HTTP/1.1\r\nContent_Length: 5\r\n\r\n",
                "header name \"Content_Length\" has an underscore where \"content-length\" has a hyphen; servers may read it as \"content-length\", so it is refused",
            ),
        ];
        for (input, message) in cases {
            assert_eq!(through(input.as_bytes()).await, (String::new(), bad(message)), "{input:?}");
        }
        let zero = "CONNECT a:443 HTTP/1.1\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(through(zero.as_bytes()).await, (zero.to_string(), None));
    }

    #[tokio::test]
    async fn a_bare_lf_head_cannot_hide_a_second_request() {
        // The guard ends this head where httparse does (at LF LF) and refuses it, so the CL+TE request
        // behind it is never read as a head of its own.
        let smuggle = "GET http://a/ HTTP/1.1\nHost: a\n\nPOST http://a/ HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        let lf = bad("request head has a line ending in a bare LF; lines must end with CRLF");
        assert_eq!(through(smuggle.as_bytes()).await, (String::new(), lf.clone()));
        let mixed = "GET http://a/ HTTP/1.1\r\nHost: a\n\r\n";
        assert_eq!(through(mixed.as_bytes()).await, (String::new(), lf));
    }

    #[tokio::test]
    async fn a_second_request_is_inspected_too() {
        let smuggle = "POST http://a/ HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcPOST http://a/ HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxy";
        let first = "POST http://a/ HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc";
        assert_eq!(
            through(smuggle.as_bytes()).await,
            (first.to_string(), bad("request has more than one Content-Length"))
        );
    }

    #[tokio::test]
    async fn oversized_and_truncated_heads() {
        let big = format!("GET http://a/ HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(2000));
        let too_large = Some(("head_too_large", "request head is over 1024 bytes".to_string()));
        assert_eq!(through(big.as_bytes()).await, (String::new(), too_large));
        assert_eq!(
            through(b"GET http://a/ HTTP/1.1\r\nHost: a").await,
            (String::new(), bad("the connection closed in the middle of a request head"))
        );
        assert_eq!(through(b"").await, (String::new(), None));
    }

    #[tokio::test]
    async fn a_refusal_is_answered_at_shutdown_after_what_came_before() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        client
            .write_all(
                b"GET http://a/ HTTP/1.1\r\n\r\nGET http://a/ HTTP/1.1\r\nA_: x\r\nTransfer_Encoding: chunked\r\n\r\n",
            )
            .await
            .unwrap();
        let mut guard = HeadGuard::new(server, LIMITS);
        let slot = RefusalSlot::default();
        guard.report_to(slot.clone());
        let mut first = vec![0u8; 26];
        guard.read_exact(&mut first).await.unwrap();
        let mut rest = Vec::new();
        guard.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        // As hyper would: its answer to the first request, then shutdown.
        guard.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await.unwrap();
        guard.shutdown().await.unwrap();
        let mut wire = Vec::new();
        client.read_to_end(&mut wire).await.unwrap();
        let wire = String::from_utf8(wire).unwrap();
        let (ok, refusal) = wire.split_at("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n".len());
        assert_eq!(ok, "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
        assert!(refusal.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{refusal}");
        assert!(refusal.ends_with("\r\n\r\nsluice: header name \"Transfer_Encoding\" has an underscore where \"transfer-encoding\" has a hyphen; servers may read it as \"transfer-encoding\", so it is refused\n"), "{refusal}");
        assert_eq!(slot.lock().unwrap().as_ref().map(|r| r.code), Some("bad_request"));
    }

    #[tokio::test]
    async fn next_head_hands_over_heads_and_refusals() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        client
            .write_all(
                b"CONNECT a:443 HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
            )
            .await
            .unwrap();
        client.shutdown().await.unwrap();
        let mut guard = HeadGuard::new(server, LIMITS);
        match guard.next_head().await {
            NextHead::Head(h) => assert_eq!(&h[..], b"CONNECT a:443 HTTP/1.1\r\n\r\n"),
            other => panic!("{other:?}"),
        }
        guard.expect_head();
        match guard.next_head().await {
            NextHead::Refused(r) => assert_eq!(r.message, "request has more than one Content-Length"),
            other => panic!("{other:?}"),
        }
    }
}
