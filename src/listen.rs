//! One accept loop for every listener (egress, git, admin): the connection cap and its overload
//! answer, backoff when accepting fails, graceful drain, and the hard stop after the grace.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tokio_util::task::TaskTracker;

/// How a group of listeners stops: first `draining` (no new connections; open ones finish what they
/// are doing), then, after the grace, `hard_stop` (what is still open is closed). Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Shutdown {
    pub draining: CancellationToken,
    pub hard_stop: CancellationToken,
    /// Every connection, and every task a connection starts that outlives it (a tunnel).
    pub tasks: TaskTracker,
}

impl Shutdown {
    /// Drains: stops accepting, waits up to `grace` for open connections, then closes the rest.
    /// Returns whether everything finished within the grace.
    pub async fn drain(&self, grace: Duration) -> bool {
        self.draining.cancel();
        self.tasks.close();
        if tokio::time::timeout(grace, self.tasks.wait()).await.is_ok() {
            return true;
        }
        self.hard_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.tasks.wait()).await;
        false
    }

    /// Runs `task` tracked, and drops it at the hard stop.
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(UntilStopped { task, stop: self.hard_stop.clone().cancelled_owned() });
    }
}

/// Ready once `token` is cancelled, holding no waiter of its own: the hard stop as seen from inside a task
/// [`Shutdown::spawn`] runs, whose wrapper already waits for it and polls the task first when it comes, so the
/// task ends in its own words (a tunnel writes its closing line, `end = shutdown`) before it is dropped. Eight
/// bytes where a waiter of its own took 72 in every open tunnel, and no lock taken per tunnel to register it.
pub fn stopping(token: &CancellationToken) -> impl Future<Output = ()> + '_ {
    std::future::poll_fn(move |_| if token.is_cancelled() { Poll::Ready(()) } else { Poll::Pending })
}

pin_project_lite::pin_project! {
    /// A task that ends at the hard stop: the task and the wait side by side in one value (an async block
    /// that captured the task and then selected on it would hold it twice; boxing it cost an allocation
    /// per connection).
    struct UntilStopped<F> {
        #[pin]
        task: F,
        #[pin]
        stop: WaitForCancellationFutureOwned,
    }
}

impl<F: Future<Output = ()>> Future for UntilStopped<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        // The task first: woken by the stop, it sees it (see [`stopping`]) and finishes before it is dropped.
        if this.task.poll(cx).is_ready() || this.stop.poll(cx).is_ready() {
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

/// A bound listener and what it does at its cap.
pub struct Listener {
    /// Names the listener in log lines: `egress`, `git`, `admin`.
    pub name: &'static str,
    pub socket: TcpListener,
    pub max_connections: usize,
    /// Renders the answer a connection over the cap gets before it is closed (it is never queued):
    /// each front end renders it in its own words, when it happens (its `date` is now).
    pub overload: fn(usize) -> Vec<u8>,
}

/// An accepted connection and its place under the cap, released when dropped.
pub struct Accepted {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    pub slot: OwnedSemaphorePermit,
}

/// Shortest and longest pause after a failed accept (out of file descriptors and the like).
const BACKOFF: (Duration, Duration) = (Duration::from_millis(5), Duration::from_secs(1));

/// Accepts until `shutdown` drains, handing each connection under the cap to `serve` in a task of its
/// own (tracked, and dropped at the hard stop).
/// Runs a connection to its end; when `draining` fires first, asks it to finish gracefully (`graceful`:
/// hyper's `graceful_shutdown`, which its connection types each have but share no trait for) and waits
/// for that. The hard stop after the grace is [`Shutdown::spawn`]'s.
pub async fn until_drained<C: Future>(
    conn: C,
    draining: &CancellationToken,
    graceful: impl FnOnce(Pin<&mut C>),
) -> C::Output {
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => r,
        () = draining.cancelled() => {
            graceful(conn.as_mut());
            conn.await
        }
    }
}

pub async fn serve<F, Fut>(listener: Listener, shutdown: Shutdown, serve: F)
where
    F: Fn(Accepted) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Listener { name, socket, max_connections, overload } = listener;
    let slots = Arc::new(Semaphore::new(max_connections.max(1)));
    let mut backoff = BACKOFF.0;
    loop {
        let accepted = tokio::select! {
            a = socket.accept() => a,
            () = shutdown.draining.cancelled() => return,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(listener = name, error = %e, pause_ms = backoff.as_millis() as u64, "accept failed");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = shutdown.draining.cancelled() => return,
                }
                backoff = (backoff * 2).min(BACKOFF.1);
                continue;
            }
        };
        backoff = BACKOFF.0;
        let _ = stream.set_nodelay(true);
        match slots.clone().try_acquire_owned() {
            Ok(slot) => shutdown.spawn(serve(Accepted { stream, peer, slot })),
            Err(_) => {
                tracing::warn!(listener = name, max_connections, client = %peer, "connection refused: at the connection limit");
                shutdown.spawn(refuse(stream, overload(max_connections)));
            }
        }
    }
}

async fn refuse(mut stream: TcpStream, answer: Vec<u8>) {
    let written = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = stream.write_all(&answer).await;
        let _ = stream.shutdown().await;
    });
    let _ = written.await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn the_cap_answers_and_drain_stops_accepting() {
        let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let shutdown = Shutdown::default();
        let listener =
            Listener { name: "test", socket, max_connections: 1, overload: |max| format!("full at {max}\n").into() };
        let release = CancellationToken::new();
        let held = release.clone();
        let loop_ = tokio::spawn(serve(listener, shutdown.clone(), move |a: Accepted| {
            let held = held.clone();
            async move {
                // The slot is held as long as the connection is served.
                let Accepted { mut stream, slot, .. } = a;
                let _ = stream.write_all(b"hello\n").await;
                held.cancelled().await;
                drop(slot);
            }
        }));
        let mut first = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 6];
        first.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello\n");
        let mut second = TcpStream::connect(addr).await.unwrap();
        let mut answer = Vec::new();
        second.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"full at 1\n");
        release.cancel();
        assert!(shutdown.drain(Duration::from_secs(5)).await);
        loop_.await.unwrap();
        assert!(TcpStream::connect(addr).await.is_err(), "the listener is closed after the drain");
    }

    #[tokio::test]
    async fn the_hard_stop_closes_what_outlives_the_grace() {
        let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let shutdown = Shutdown::default();
        let listener = Listener { name: "test", socket, max_connections: 4, overload: |_| Vec::new() };
        tokio::spawn(serve(listener, shutdown.clone(), |a: Accepted| async move {
            let _keep = a;
            std::future::pending::<()>().await;
        }));
        let mut client = TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!shutdown.drain(Duration::from_millis(100)).await);
        let mut rest = Vec::new();
        assert_eq!(client.read_to_end(&mut rest).await.unwrap(), 0, "the connection was closed");
    }
}
