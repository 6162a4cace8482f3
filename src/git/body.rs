//! The bodies around a request: what goes upstream ([`ForwardBody`]), what comes back to the client
//! ([`LoggedBody`], which writes the request's log line), and the bounded readers for what sluice reads
//! itself or throws away.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::{BoxError, GitBody, Record};
use crate::audit::AuditLog;

/// A refused push's pack is read and dropped (so the client sees the answer, not a broken pipe) up to this much.
const DRAIN_LIMIT: u64 = 256 << 20;
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

/// The answer's body, counted; the request's log line is written when it ends.
pub(super) struct LoggedBody {
    pub(super) inner: GitBody,
    pub(super) bytes: u64,
    pub(super) record: Record,
    pub(super) audit: AuditLog,
}

impl Body for LoggedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.bytes += data.len() as u64;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        self.record.emit(&self.audit, self.bytes);
    }
}

/// The request body sent upstream: the bytes sluice already read (the command list), then the rest,
/// exactly as the client sent them. A client that stops sending for `[git] body_timeout` fails the
/// request, so a stalled upload cannot hold an upstream connection open for ever.
pub(super) struct ForwardBody {
    prefix: VecDeque<Bytes>,
    rest: Incoming,
    sent: Arc<AtomicU64>,
    timeout: Duration,
    idle: Pin<Box<tokio::time::Sleep>>,
}

impl ForwardBody {
    pub(super) fn new(prefix: VecDeque<Bytes>, rest: Incoming, sent: Arc<AtomicU64>, timeout: Duration) -> ForwardBody {
        ForwardBody { prefix, rest, sent, timeout, idle: Box::pin(tokio::time::sleep(timeout)) }
    }
}

impl Body for ForwardBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(chunk) = self.prefix.pop_front() {
            self.sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        match Pin::new(&mut self.rest).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.sent.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                let next = tokio::time::Instant::now() + self.timeout;
                self.idle.as_mut().reset(next);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(other) => Poll::Ready(other.map(|r| r.map_err(BoxError::from))),
            Poll::Pending => {
                if self.idle.as_mut().poll(cx).is_ready() {
                    let secs = self.timeout.as_secs();
                    tracing::debug!(target: "sluice::git", "request body stalled for {secs}s; upload abandoned");
                    return Poll::Ready(Some(Err(format!("the client sent nothing for {secs}s").into())));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_empty() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let buffered: u64 = self.prefix.iter().map(|b| b.len() as u64).sum();
        let rest = self.rest.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + buffered);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + buffered);
        }
        hint
    }
}

/// Reads and drops what is left of a refused push, within limits, so the client reads the answer.
pub(super) async fn drain(body: &mut Incoming) {
    let mut total = 0u64;
    let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
    while total < DRAIN_LIMIT {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(Ok(frame))) => total += frame.data_ref().map_or(0, |d| d.len() as u64),
            _ => break,
        }
    }
}

/// Reads a body up to `limit` bytes; `Err(true)` when it is longer, `Err(false)` when it fails or stalls.
pub(super) async fn read_limited<B>(mut body: B, limit: usize, idle: Duration) -> Result<Bytes, bool>
where
    B: Body<Data = Bytes> + Unpin,
{
    let mut buf = Vec::new();
    loop {
        match tokio::time::timeout(idle, body.frame()).await {
            Err(_) | Ok(Some(Err(_))) => return Err(false),
            Ok(None) => return Ok(buf.into()),
            Ok(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    if buf.len() + d.len() > limit {
                        return Err(true);
                    }
                    buf.extend_from_slice(d);
                }
            }
        }
    }
}

/// The first `want` bytes of a body (fewer when it ends, fails or takes longer than `within`).
pub(super) async fn read_prefix(mut body: Incoming, want: usize, within: Duration) -> Vec<u8> {
    let mut buf = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    while buf.len() < want {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    buf.extend_from_slice(&d[..d.len().min(want - buf.len())]);
                }
            }
            _ => break,
        }
    }
    buf
}
