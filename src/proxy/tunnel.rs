//! Copies bytes both ways until both sides are done (half-close respected) or the tunnel idles out.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// How a tunnel ended, for the closing log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TunnelEnd {
    /// Both sides closed their write halves.
    Closed,
    Idle,
    ClientError,
    UpstreamError,
    Shutdown,
}

impl TunnelEnd {
    pub fn as_str(self) -> &'static str {
        match self {
            TunnelEnd::Closed => "closed",
            TunnelEnd::Idle => "idle_timeout",
            TunnelEnd::ClientError => "client_error",
            TunnelEnd::UpstreamError => "upstream_error",
            TunnelEnd::Shutdown => "shutdown",
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
}

const BUF_SIZE: usize = 32 * 1024;

/// Runs the tunnel. `stop` ends it early (shutdown grace over).
pub async fn run<C, U>(
    client: C,
    upstream: U,
    idle_timeout: Duration,
    counters: Arc<Counters>,
    stop: impl std::future::Future<Output = ()>,
) -> TunnelStats
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let start = Instant::now();
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut ur, mut uw) = tokio::io::split(upstream);
    let up = async { pump(&mut cr, &mut uw, &counters.up, &counters, start).await.map_err(|side| side.end(true)) };
    let down = async { pump(&mut ur, &mut cw, &counters.down, &counters, start).await.map_err(|side| side.end(false)) };
    // Either direction failing ends the tunnel; a clean EOF only ends its own direction.
    let both = async {
        match tokio::try_join!(up, down) {
            Ok(_) => TunnelEnd::Closed,
            Err(end) => end,
        }
    };
    let idle = async {
        let tick = (idle_timeout / 4).max(Duration::from_millis(100));
        loop {
            tokio::time::sleep(tick).await;
            let last = Duration::from_millis(counters.last_activity_ms.load(Ordering::Relaxed));
            if start.elapsed().saturating_sub(last) >= idle_timeout {
                return;
            }
        }
    };
    let end = tokio::select! {
        end = both => end,
        () = idle => TunnelEnd::Idle,
        () = stop => TunnelEnd::Shutdown,
    };
    TunnelStats {
        bytes_up: counters.up.load(Ordering::Relaxed),
        bytes_down: counters.down.load(Ordering::Relaxed),
        end,
    }
}

/// Which side of a pump failed: reading its source, or writing its sink. (For the upstream→client
/// pump the source is upstream, so a read failure there is upstream's.)
#[derive(Debug)]
enum Side {
    Read,
    Write,
}

impl Side {
    fn end(self, client_to_upstream: bool) -> TunnelEnd {
        match (self, client_to_upstream) {
            (Side::Read, true) | (Side::Write, false) => TunnelEnd::ClientError,
            (Side::Write, true) | (Side::Read, false) => TunnelEnd::UpstreamError,
        }
    }
}

async fn pump<R, W>(r: &mut R, w: &mut W, count: &AtomicU64, counters: &Counters, start: Instant) -> Result<(), Side>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        let n = r.read(&mut buf).await.map_err(|_| Side::Read)?;
        if n == 0 {
            // Half-close: pass the EOF on and keep the other direction running.
            let _ = w.shutdown().await;
            return Ok(());
        }
        w.write_all(&buf[..n]).await.map_err(|_| Side::Write)?;
        count.fetch_add(n as u64, Ordering::Relaxed);
        counters.last_activity_ms.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}
