//! A forwarded request's or response's body under its session's byte budget: each data frame waits for a
//! grant and goes on in pieces of at most what was granted, so plain-HTTP exchanges share the session's
//! rate with its tunnels, and a spent quota ends the body (`quota_exceeded`). Without a budget the body
//! passes through untouched.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::Sleep;

use super::respond::BoxError;
use crate::limit::{ByteBudget, Direction, Grant, QuotaExceeded};

/// The error a body ends with when its session's quota is spent.
#[derive(Debug)]
pub struct QuotaSpent(pub QuotaExceeded);

impl fmt::Display for QuotaSpent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "session's {}", self.0)
    }
}

impl std::error::Error for QuotaSpent {}

pub struct Shaped<B> {
    inner: B,
    budget: Option<Arc<dyn ByteBudget>>,
    dir: Direction,
    /// Data taken from `inner` and not yet passed on.
    pending: Option<Bytes>,
    /// Bytes already granted for `pending`, usable once `sleep` is over.
    granted: Option<usize>,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl<B> Shaped<B> {
    pub fn new(inner: B, budget: Option<Arc<dyn ByteBudget>>, dir: Direction) -> Shaped<B> {
        Shaped { inner, budget, dir, pending: None, granted: None, sleep: None }
    }
}

impl<B> Body for Shaped<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let Some(budget) = &this.budget else {
            return Pin::new(&mut this.inner).poll_frame(cx).map(|f| f.map(|r| r.map_err(Into::into)));
        };
        loop {
            if let Some(sleep) = &mut this.sleep {
                ready!(sleep.as_mut().poll(cx));
                this.sleep = None;
            }
            if let Some(mut data) = this.pending.take() {
                let n = match this.granted.take() {
                    Some(n) => n,
                    None => match budget.grant(this.dir, data.len() as u64).now() {
                        Ok(Grant::Bytes { bytes, wait }) => {
                            let n = usize::try_from(bytes).unwrap_or(data.len()).min(data.len());
                            if !wait.is_zero() {
                                this.sleep = Some(Box::pin(tokio::time::sleep(wait)));
                                this.granted = Some(n);
                                this.pending = Some(data);
                                continue;
                            }
                            n
                        }
                        Ok(Grant::Spent(spent)) => return Poll::Ready(Some(Err(Box::new(QuotaSpent(spent))))),
                        // A store that cannot answer at once: pass the frame on and count it after the fact,
                        // rather than hold the body on a round trip per frame.
                        Err(_) => {
                            budget.charge(this.dir, data.len() as u64);
                            data.len()
                        }
                    },
                };
                // A grant of nothing (never asked for nothing) would spin: move at least a byte.
                let piece = data.split_to(n.max(1).min(data.len()));
                if !data.is_empty() {
                    this.pending = Some(data);
                }
                return Poll::Ready(Some(Ok(Frame::data(piece))));
            }
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if data.is_empty() => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(data) => this.pending = Some(data),
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
                Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
                None => return Poll::Ready(None),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.pending.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
