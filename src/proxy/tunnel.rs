//! Copies bytes both ways until both sides are done (half-close respected) or the tunnel idles out.
//!
//! Two engines share the same ending rules: [`run_tcp`] for the usual socket-to-socket tunnel (no
//! buffer while idle, `splice(2)` once a direction carries bulk data), and [`run`] for any stream.
//!
//! A session with byte limits (shaping, quotas) hands its tunnels a [`ByteBudget`]: each read or splice
//! first asks it for a grant and moves at most that much, after the wait it names; a spent quota ends the
//! tunnel (`quota_exceeded`). Tunnels without a budget run exactly the unlimited path.

use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};

use crate::limit::{ByteBudget, ByteMeter, Direction, Grant};

/// How a tunnel ended, for the closing log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TunnelEnd {
    /// Both sides closed their write halves.
    Closed,
    Idle,
    ClientError,
    UpstreamError,
    Shutdown,
    /// A byte quota of the session was spent (by this tunnel or another of its).
    QuotaExceeded,
}

impl TunnelEnd {
    pub fn as_str(self) -> &'static str {
        match self {
            TunnelEnd::Closed => "closed",
            TunnelEnd::Idle => "idle_timeout",
            TunnelEnd::ClientError => "client_error",
            TunnelEnd::UpstreamError => "upstream_error",
            TunnelEnd::Shutdown => "shutdown",
            TunnelEnd::QuotaExceeded => "quota_exceeded",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TunnelStats {
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub end: TunnelEnd,
}

/// Live byte counters, readable while the tunnel runs.
#[derive(Debug, Default)]
pub struct Counters {
    pub up: AtomicU64,
    pub down: AtomicU64,
    /// Milliseconds since the tunnel started at the last byte either way.
    last_activity_ms: AtomicU64,
    /// The session's byte meter (its limiter lease's), told of bytes as they move, not at the end.
    meter: Option<ByteMeter>,
    /// The meter's budget, when the session's bytes are shaped or quota'd.
    budget: Option<Arc<dyn ByteBudget>>,
    /// Nanoseconds this tunnel's transfers waited for shaping grants.
    waited_ns: AtomicU64,
}

impl Counters {
    /// Counters that also report every byte to `meter`, and ask its budget before moving bytes.
    pub fn metered(meter: Option<ByteMeter>) -> Counters {
        let budget = meter.as_ref().and_then(|m| m.budget().cloned());
        Counters { meter, budget, ..Counters::default() }
    }

    /// How long this tunnel waited for its session's bandwidth.
    pub fn shaping_wait(&self) -> Duration {
        Duration::from_nanos(self.waited_ns.load(Ordering::Relaxed))
    }
}

/// How often an open tunnel of a session with quotas looks whether another of its tunnels spent them.
const QUOTA_POLL: Duration = Duration::from_millis(500);

/// The buffer of [`run`], and of a [`run_tcp`] direction while bytes are waiting (an idle tunnel holds
/// none). 64 KiB rather than 16 moves a bulk transfer in a quarter of the syscalls.
const BUF_SIZE: usize = 64 * 1024;

/// One direction's view of the counters.
pub(super) struct Meter<'a> {
    up: bool,
    counters: &'a Counters,
    start: Instant,
}

impl<'a> Meter<'a> {
    fn new(up: bool, counters: &'a Counters, start: Instant) -> Meter<'a> {
        Meter { up, counters, start }
    }

    fn direction(&self) -> Direction {
        if self.up { Direction::Up } else { Direction::Down }
    }

    /// The session's budget, if its bytes are limited.
    pub(super) fn budget(&self) -> Option<&dyn ByteBudget> {
        self.counters.budget.as_deref()
    }

    /// Asks the budget for up to `want` bytes and waits out the shaping: the bytes to move now, or the
    /// quota's end of the tunnel.
    pub(super) async fn grant(&self, budget: &dyn ByteBudget, want: usize) -> Result<usize, Side> {
        match budget.grant(self.direction(), want as u64).await {
            Grant::Bytes { bytes, wait } => {
                if !wait.is_zero() {
                    let ns = u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX);
                    self.counters.waited_ns.fetch_add(ns, Ordering::Relaxed);
                    tokio::time::sleep(wait).await;
                }
                // Never more than asked, whatever the budget says.
                Ok(usize::try_from(bytes).unwrap_or(want).min(want))
            }
            Grant::Spent(_) => Err(Side::Quota),
        }
    }

    /// Gives back what a grant allowed and the transfer did not move.
    pub(super) fn unused(&self, budget: &dyn ByteBudget, granted: usize, moved: usize) {
        if granted > moved {
            budget.unused(self.direction(), (granted - moved) as u64);
        }
    }

    pub(super) fn record(&self, n: usize) {
        let c = self.counters;
        let n = n as u64;
        if self.up {
            c.up.fetch_add(n, Ordering::Relaxed)
        } else {
            c.down.fetch_add(n, Ordering::Relaxed)
        };
        if let Some(meter) = &c.meter {
            if self.up { meter.add_up(n) } else { meter.add_down(n) }
        }
        c.last_activity_ms.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

/// Runs the tunnel over any pair of streams. `stop` ends it early (shutdown grace over).
pub async fn run<C, U>(
    client: C,
    upstream: U,
    idle_timeout: Duration,
    counters: Arc<Counters>,
    stop: impl Future<Output = ()>,
) -> TunnelStats
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let start = Instant::now();
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut ur, mut uw) = tokio::io::split(upstream);
    let up = Meter::new(true, &counters, start);
    let down = Meter::new(false, &counters, start);
    // Pinned where they are made and handed on by reference: a future moved into another one is
    // held twice (an idle tunnel's task is as large as its largest state).
    let up = pin!(async { pump(&mut cr, &mut uw, &up).await.map_err(|side| side.end(true)) });
    let down = pin!(async { pump(&mut ur, &mut cw, &down).await.map_err(|side| side.end(false)) });
    supervise(up, down, idle_timeout, &counters, start, pin!(stop)).await
}

/// Runs a socket-to-socket tunnel. `early` are bytes the client sent before the tunnel opened (read
/// along with its CONNECT head); they go upstream first, and are let go once written.
///
/// A block rather than an `async fn`, which would keep its arguments twice in every open tunnel.
#[allow(clippy::manual_async_fn)] // on purpose: see above
pub fn run_tcp(
    mut client: TcpStream,
    mut upstream: TcpStream,
    early: Vec<u8>,
    idle_timeout: Duration,
    counters: Arc<Counters>,
    stop: impl Future<Output = ()>,
) -> impl Future<Output = TunnelStats> {
    async move {
        let start = Instant::now();
        let (cr, mut cw) = client.split();
        let (ur, mut uw) = upstream.split();
        let up = Meter::new(true, &counters, start);
        let down = Meter::new(false, &counters, start);
        // Only shaped sessions wait for grants: their engine is boxed, so no other tunnel's state makes room
        // for it.
        let up = pin!(async {
            if !early.is_empty() {
                // Early bytes were read with the CONNECT head; they still count against the session's budget.
                if let Some(budget) = up.budget() {
                    Box::pin(write_granted(&early, &mut uw, &up, budget)).await.map_err(|side| side.end(true))?;
                } else {
                    uw.write_all(&early).await.map_err(|_| Side::Write.end(true))?;
                    up.record(early.len());
                }
            }
            // An open tunnel holds no buffer: not even the bytes it started with.
            drop(early);
            match up.budget() {
                None => pump_tcp(&cr, &mut uw, &up).await,
                Some(budget) => Box::pin(pump_tcp_budgeted(&cr, &mut uw, &up, budget)).await,
            }
            .map_err(|side| side.end(true))
        });
        let down = pin!(async {
            match down.budget() {
                None => pump_tcp(&ur, &mut cw, &down).await,
                Some(budget) => Box::pin(pump_tcp_budgeted(&ur, &mut cw, &down, budget)).await,
            }
            .map_err(|side| side.end(false))
        });
        supervise(up, down, idle_timeout, &counters, start, pin!(stop)).await
    }
}

/// Writes `bytes` as `budget` grants them.
async fn write_granted(
    bytes: &[u8],
    w: &mut WriteHalf<'_>,
    meter: &Meter<'_>,
    budget: &dyn ByteBudget,
) -> Result<(), Side> {
    let mut left = bytes;
    while !left.is_empty() {
        let n = meter.grant(budget, left.len()).await?;
        w.write_all(&left[..n]).await.map_err(|_| Side::Write)?;
        meter.record(n);
        left = &left[n..];
    }
    Ok(())
}

/// Runs both directions to their end, unless the tunnel idles out, its session's quota is spent by
/// another of its tunnels, or `stop` comes first. One timer serves both checks.
fn supervise<'a, U, D, S>(
    up: Pin<&'a mut U>,
    down: Pin<&'a mut D>,
    idle_timeout: Duration,
    counters: &'a Counters,
    start: Instant,
    stop: Pin<&'a mut S>,
) -> Supervise<'a, U, D, S>
where
    U: Future<Output = Result<(), TunnelEnd>>,
    D: Future<Output = Result<(), TunnelEnd>>,
    S: Future<Output = ()>,
{
    let quota = counters.budget.as_deref().filter(|b| b.has_quota());
    let mut tick = (idle_timeout / 4).max(Duration::from_millis(100));
    if quota.is_some() {
        tick = tick.min(QUOTA_POLL);
    }
    Supervise {
        up: Some(up),
        down: Some(down),
        stop,
        timer: tokio::time::sleep(tick),
        tick,
        idle_timeout,
        counters,
        quota,
        start,
    }
}

pin_project_lite::pin_project! {
    /// [`supervise`]'s future, written out: an `async fn` around a `poll_fn` held every one of these twice (its
    /// own locals and the closure's references to them), in every open tunnel.
    struct Supervise<'a, U, D, S> {
        // `None` once the direction ended cleanly (EOF passed on); the other one may still run.
        up: Option<Pin<&'a mut U>>,
        down: Option<Pin<&'a mut D>>,
        stop: Pin<&'a mut S>,
        #[pin]
        timer: tokio::time::Sleep,
        tick: Duration,
        idle_timeout: Duration,
        counters: &'a Counters,
        quota: Option<&'a dyn ByteBudget>,
        start: Instant,
    }
}

impl<U, D, S> Future for Supervise<'_, U, D, S>
where
    U: Future<Output = Result<(), TunnelEnd>>,
    D: Future<Output = Result<(), TunnelEnd>>,
    S: Future<Output = ()>,
{
    type Output = TunnelStats;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<TunnelStats> {
        let mut this = self.project();
        let counters = *this.counters;
        let end = |end| {
            Poll::Ready(TunnelStats {
                bytes_up: counters.up.load(Ordering::Relaxed),
                bytes_down: counters.down.load(Ordering::Relaxed),
                end,
            })
        };
        // Either direction failing ends the tunnel; a clean EOF only ends its own direction.
        if let Err(e) = poll_direction(this.up, cx).and_then(|()| poll_direction(this.down, cx)) {
            return end(e);
        }
        if this.up.is_none() && this.down.is_none() {
            return end(TunnelEnd::Closed);
        }
        if this.stop.as_mut().poll(cx).is_ready() {
            return end(TunnelEnd::Shutdown);
        }
        while this.timer.as_mut().poll(cx).is_ready() {
            let last = Duration::from_millis(counters.last_activity_ms.load(Ordering::Relaxed));
            if this.start.elapsed().saturating_sub(last) >= *this.idle_timeout {
                return end(TunnelEnd::Idle);
            }
            // Another tunnel of the session may spend its quota while this one is quiet: it ends too.
            if this.quota.is_some_and(|b| b.spent().is_some()) {
                return end(TunnelEnd::QuotaExceeded);
            }
            let next = tokio::time::Instant::now() + *this.tick;
            this.timer.as_mut().reset(next);
        }
        Poll::Pending
    }
}

/// Polls one direction of a tunnel that has not ended: `None` once it ends cleanly, its end if it fails.
fn poll_direction<F>(direction: &mut Option<Pin<&mut F>>, cx: &mut std::task::Context<'_>) -> Result<(), TunnelEnd>
where
    F: Future<Output = Result<(), TunnelEnd>>,
{
    if let Some(f) = direction
        && let Poll::Ready(r) = f.as_mut().poll(cx)
    {
        r?;
        *direction = None;
    }
    Ok(())
}

/// Waits until `src` has bytes (or an error or EOF) to read, holding no more than a reference: the
/// socket keeps the waker (tokio's `readable()` future would hold its own list entry, 150 bytes per
/// direction of every idle tunnel).
pub(super) fn read_ready(src: &TcpStream) -> impl Future<Output = std::io::Result<()>> + '_ {
    poll_fn(move |cx| src.poll_read_ready(cx))
}

/// Which side of a pump failed: reading its source, or writing its sink. (For the upstream→client
/// pump the source is upstream, so a read failure there is upstream's.)
#[derive(Debug)]
pub(super) enum Side {
    Read,
    Write,
    /// The session's quota is spent: neither side's fault.
    Quota,
}

impl Side {
    fn end(self, client_to_upstream: bool) -> TunnelEnd {
        match (self, client_to_upstream) {
            (Side::Quota, _) => TunnelEnd::QuotaExceeded,
            (Side::Read, true) | (Side::Write, false) => TunnelEnd::ClientError,
            (Side::Write, true) | (Side::Read, false) => TunnelEnd::UpstreamError,
        }
    }
}

async fn pump<R, W>(r: &mut R, w: &mut W, meter: &Meter<'_>) -> Result<(), Side>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUF_SIZE];
    let budget = meter.budget();
    loop {
        let granted = match budget {
            None => BUF_SIZE,
            Some(budget) => meter.grant(budget, BUF_SIZE).await?,
        };
        let n = r.read(&mut buf[..granted]).await.map_err(|_| Side::Read)?;
        if let Some(budget) = budget {
            meter.unused(budget, granted, n);
        }
        if n == 0 {
            // Half-close: pass the EOF on and keep the other direction running.
            let _ = w.shutdown().await;
            return Ok(());
        }
        w.write_all(&buf[..n]).await.map_err(|_| Side::Write)?;
        meter.record(n);
    }
}

/// Bytes a direction moves through its buffer before it switches to `splice(2)` (Linux): short
/// exchanges (a TLS handshake, an API call) never pay for a pipe; bulk transfers stop copying every
/// byte into sluice and out again.
const SPLICE_AFTER: u64 = 256 * 1024;

/// One direction of a socket tunnel. It waits for readability holding no buffer, and copies what is
/// waiting through a buffer that lives only until the socket runs dry; past [`SPLICE_AFTER`] bytes it
/// hands over to [`super::splice`] where that is available.
async fn pump_tcp(r: &ReadHalf<'_>, w: &mut WriteHalf<'_>, meter: &Meter<'_>) -> Result<(), Side> {
    let src: &TcpStream = r.as_ref();
    let mut moved = 0u64;
    loop {
        read_ready(src).await.map_err(|_| Side::Read)?;
        let mut buf = Vec::with_capacity(BUF_SIZE);
        loop {
            #[cfg(target_os = "linux")]
            if moved >= SPLICE_AFTER {
                moved = 0;
                // Without a pipe (descriptors or pipe allowance used up) the copy goes on.
                if let Ok(pipe) = super::splice::Pipe::new() {
                    drop(std::mem::take(&mut buf));
                    // Boxed while it runs: an idle direction holds no room for the splice's state.
                    match Box::pin(super::splice::pump(src, w, pipe, meter, None)).await? {
                        super::splice::Spliced::Ended => return Ok(()),
                        // Back to the copy: the direction went quiet (its pipe is released), or an
                        // urgent byte stopped the splice (a read steps over it).
                        super::splice::Spliced::Quiet => break,
                        super::splice::Spliced::UrgentMark => buf = Vec::with_capacity(BUF_SIZE),
                    }
                }
            }
            buf.clear();
            match read_draining(src, &mut buf, BUF_SIZE) {
                Ok(0) => {
                    // Half-close: pass the EOF on and keep the other direction running.
                    let _ = w.shutdown().await;
                    return Ok(());
                }
                Ok(n) => {
                    w.write_all(&buf).await.map_err(|_| Side::Write)?;
                    meter.record(n);
                    moved += n as u64;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => return Err(Side::Read),
            }
        }
    }
}

/// Reads what is waiting into `buf`'s spare room. A read that leaves room over emptied the socket, so its
/// readiness is cleared then (as tokio's own `poll_read` does): the direction's next read waits for the
/// next readiness event instead of asking the kernel once more only to hear `WouldBlock`, a syscall per
/// burst (two per short tunnel). A readiness event newer than the read is kept, and so is a closed read
/// side: an EOF that came with the last bytes is still read at once.
/// At most `max` bytes are read (after `buf`'s end).
pub(super) fn read_draining(src: &TcpStream, buf: &mut Vec<u8>, max: usize) -> std::io::Result<usize> {
    let mut read = None;
    buf.reserve(max);
    let outcome = src.try_io(tokio::io::Interest::READABLE, || {
        let n = src.try_read_buf(&mut bytes::BufMut::limit(&mut *buf, max))?;
        read = Some(n);
        // `WouldBlock` here is what makes `try_io` clear the readiness; the bytes are in `read`.
        if n > 0 && n < max { Err(std::io::ErrorKind::WouldBlock.into()) } else { Ok(n) }
    });
    match read {
        Some(n) => Ok(n),
        None => outcome,
    }
}

/// [`pump_tcp`] for a session with byte limits: every read (and, past [`SPLICE_AFTER`], every splice)
/// moves at most what `budget` granted, after the wait it named. Readability comes first, so a quiet
/// direction holds no grant; the buffer is released whenever the socket runs dry.
async fn pump_tcp_budgeted(
    r: &ReadHalf<'_>,
    w: &mut WriteHalf<'_>,
    meter: &Meter<'_>,
    budget: &dyn ByteBudget,
) -> Result<(), Side> {
    let src: &TcpStream = r.as_ref();
    let mut moved = 0u64;
    let mut buf: Vec<u8> = Vec::new();
    loop {
        read_ready(src).await.map_err(|_| Side::Read)?;
        #[cfg(target_os = "linux")]
        if moved >= SPLICE_AFTER {
            moved = 0;
            if let Ok(pipe) = super::splice::Pipe::new() {
                buf = Vec::new();
                match Box::pin(super::splice::pump(src, w, pipe, meter, Some(budget))).await? {
                    super::splice::Spliced::Ended => return Ok(()),
                    super::splice::Spliced::Quiet => continue,
                    // The copy's read below steps over the urgent byte.
                    super::splice::Spliced::UrgentMark => {}
                }
            }
        }
        let granted = meter.grant(budget, BUF_SIZE).await?;
        buf.clear();
        // Room for the whole grant: a Vec with no spare capacity would take 64 bytes per read.
        buf.reserve(granted);
        match src.try_read_buf(&mut bytes::BufMut::limit(&mut buf, granted)) {
            Ok(0) => {
                meter.unused(budget, granted, 0);
                let _ = w.shutdown().await;
                return Ok(());
            }
            Ok(n) => {
                meter.unused(budget, granted, n);
                w.write_all(&buf).await.map_err(|_| Side::Write)?;
                meter.record(n);
                moved += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                meter.unused(budget, granted, 0);
                // Dry: hold no buffer while the direction waits.
                buf = Vec::new();
            }
            Err(_) => {
                meter.unused(budget, granted, 0);
                return Err(Side::Read);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A connected pair of loopback sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (b, _) = listener.accept().await.unwrap();
        (a, b)
    }

    /// client ↔ (proxy side a | b) … returns (client end, upstream end, tunnel task).
    async fn tunnel(
        early: &'static [u8],
        idle: Duration,
        stop: impl Future<Output = ()> + Send + 'static,
    ) -> (TcpStream, TcpStream, tokio::task::JoinHandle<TunnelStats>) {
        let (client, proxy_client) = pair().await;
        let (proxy_upstream, upstream) = pair().await;
        let task = tokio::spawn(async move {
            run_tcp(proxy_client, proxy_upstream, early.to_vec(), idle, Arc::new(Counters::default()), stop).await
        });
        (client, upstream, task)
    }

    /// The client closes its side first; the upstream still answers, then closes: nothing is lost.
    #[tokio::test]
    async fn half_close_keeps_the_other_direction() {
        let (mut client, mut upstream, task) = tunnel(b"early ", Duration::from_secs(60), std::future::pending()).await;
        client.write_all(b"request").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        upstream.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"early request");
        upstream.write_all(b"answer after the client's EOF").await.unwrap();
        upstream.shutdown().await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"answer after the client's EOF");
        let stats = task.await.unwrap();
        assert_eq!(stats, TunnelStats { bytes_up: 13, bytes_down: 29, end: TunnelEnd::Closed });
    }

    /// Bulk transfers arrive whole and in order, both ways, and are counted.
    #[tokio::test]
    async fn bulk_both_ways_arrives_intact() {
        let (client, upstream, task) = tunnel(b"", Duration::from_secs(60), std::future::pending()).await;
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let send = |mut s: TcpStream, data: Vec<u8>| async move {
            let (mut r, mut w) = s.split();
            let writer = async {
                w.write_all(&data).await.unwrap();
                w.shutdown().await.unwrap();
            };
            let mut got = Vec::new();
            let reader = r.read_to_end(&mut got);
            let ((), read) = tokio::join!(writer, reader);
            read.unwrap();
            got
        };
        let (from_upstream, from_client) =
            tokio::join!(tokio::spawn(send(client, data.clone())), tokio::spawn(send(upstream, data.clone())));
        assert!(from_upstream.unwrap() == data, "client got other bytes than upstream sent");
        assert!(from_client.unwrap() == data, "upstream got other bytes than the client sent");
        let stats = task.await.unwrap();
        assert_eq!(stats, TunnelStats { bytes_up: 3_000_000, bytes_down: 3_000_000, end: TunnelEnd::Closed });
    }

    /// Past the splice threshold each direction still passes its EOF on and keeps the other running.
    #[tokio::test]
    async fn bulk_then_half_close_each_way() {
        let (mut client, mut upstream, task) = tunnel(b"", Duration::from_secs(60), std::future::pending()).await;
        let request: Vec<u8> = (0..(SPLICE_AFTER as u32) * 4 + 7).map(|i| (i % 253) as u8).collect();
        let answer: Vec<u8> = (0..(SPLICE_AFTER as u32) * 3 + 11).map(|i| (i % 241) as u8).collect();
        let sent = request.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            client
        });
        let mut got = Vec::new();
        upstream.read_to_end(&mut got).await.unwrap();
        assert!(got == request, "upstream got {} bytes, not the {} sent", got.len(), request.len());
        upstream.write_all(&answer).await.unwrap();
        upstream.shutdown().await.unwrap();
        let mut client = writer.await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert!(got == answer, "client got {} bytes, not the {} sent", got.len(), answer.len());
        let stats = task.await.unwrap();
        let want =
            TunnelStats { bytes_up: request.len() as u64, bytes_down: answer.len() as u64, end: TunnelEnd::Closed };
        assert_eq!(stats, want);
    }

    /// An urgent (out-of-band) byte after bulk data neither stalls the direction nor loses what
    /// follows it (splice cannot pass the urgent mark; the copy steps over the byte, as it always did),
    /// and a spliced direction that went quiet carries on after the pause.
    #[tokio::test]
    async fn urgent_byte_and_pause_after_bulk() {
        let (mut client, mut upstream, task) = tunnel(b"", Duration::from_secs(60), std::future::pending()).await;
        let bulk: Vec<u8> = (0..(SPLICE_AFTER as u32) * 2).map(|i| (i % 251) as u8).collect();
        client.write_all(&bulk).await.unwrap();
        let mut got = vec![0u8; bulk.len()];
        upstream.read_exact(&mut got).await.unwrap();
        assert!(got == bulk);

        client.write_all(b"BEFORE").await.unwrap();
        let sent = socket2::SockRef::from(&client).send_out_of_band(b"!").unwrap();
        assert_eq!(sent, 1);
        client.write_all(b"AFTER").await.unwrap();
        let mut got = [0u8; 11];
        tokio::time::timeout(Duration::from_secs(10), upstream.read_exact(&mut got))
            .await
            .expect("bytes after an urgent byte arrive")
            .unwrap();
        assert_eq!(&got, b"BEFOREAFTER");

        // Quiet for longer than a spliced direction keeps its pipe, then bulk again.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        client.write_all(&bulk).await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        upstream.read_to_end(&mut got).await.unwrap();
        assert!(got == bulk, "after the pause upstream got {} bytes, not {}", got.len(), bulk.len());
        drop(upstream);
        let stats = task.await.unwrap();
        assert_eq!(stats.bytes_up, 2 * bulk.len() as u64 + 11);
    }

    #[tokio::test]
    async fn stop_ends_an_open_tunnel() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let stop = async move {
            let _ = rx.await;
        };
        let (mut client, mut upstream, task) = tunnel(b"", Duration::from_secs(60), stop).await;
        client.write_all(b"hi").await.unwrap();
        let mut got = [0u8; 2];
        upstream.read_exact(&mut got).await.unwrap();
        tx.send(()).unwrap();
        let stats = task.await.unwrap();
        assert_eq!(stats, TunnelStats { bytes_up: 2, bytes_down: 0, end: TunnelEnd::Shutdown });
        // The proxy's ends are closed: both peers see EOF.
        assert_eq!(client.read(&mut got).await.unwrap(), 0);
        assert_eq!(upstream.read(&mut got).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn idle_tunnel_times_out() {
        let (_client, _upstream, task) = tunnel(b"", Duration::from_millis(200), std::future::pending()).await;
        let stats = task.await.unwrap();
        assert_eq!(stats, TunnelStats { bytes_up: 0, bytes_down: 0, end: TunnelEnd::Idle });
    }

    /// A peer that resets is told apart from the other one.
    #[tokio::test]
    async fn upstream_reset_is_upstream_error() {
        let (mut client, upstream, task) = tunnel(b"", Duration::from_secs(60), std::future::pending()).await;
        upstream.set_zero_linger().unwrap();
        drop(upstream);
        let stats = task.await.unwrap();
        assert_eq!(stats.end, TunnelEnd::UpstreamError);
        let mut got = [0u8; 1];
        assert!(matches!(client.read(&mut got).await, Ok(0) | Err(_)));
    }

    /// The generic engine keeps the same half-close rule.
    #[tokio::test]
    async fn generic_engine_half_close() {
        let (mut client, proxy_client) = tokio::io::duplex(1024);
        let (proxy_upstream, mut upstream) = tokio::io::duplex(1024);
        let meter = ByteMeter::default();
        let seen = meter.clone();
        let task = tokio::spawn(async move {
            let counters = Arc::new(Counters::metered(Some(meter)));
            run(proxy_client, proxy_upstream, Duration::from_secs(60), counters, std::future::pending()).await
        });
        client.write_all(b"up").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        upstream.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"up");
        upstream.write_all(b"down").await.unwrap();
        drop(upstream);
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"down");
        let stats = task.await.unwrap();
        assert_eq!(stats, TunnelStats { bytes_up: 2, bytes_down: 4, end: TunnelEnd::Closed });
        // The session's meter was told of every byte, as it moved.
        assert_eq!(seen.totals(), (2, 4));
    }
}
