//! One accept loop for every listener (egress, git, admin): the connection cap and its overload
//! answer, backoff when accepting fails, graceful drain, and the hard stop after the grace.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
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
    pub hard_stop: HardStop,
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
        let HardStop { token, stopped } = self.hard_stop.clone();
        self.tasks.spawn(UntilStopped { task, stop: token.cancelled_owned(), stopped, waiting: false });
    }
}

/// The hard stop: a token to wait on, and a flag any task reads without a lock. Every connection's task
/// looks at the stop each time it is polled, on every accept thread: the token's own `is_cancelled` takes
/// its mutex, one cache line that each poll of each tunnel would pull from core to core.
#[derive(Clone, Debug, Default)]
pub struct HardStop {
    token: CancellationToken,
    stopped: Arc<AtomicBool>,
}

impl HardStop {
    pub fn cancel(&self) {
        // The flag first: a task the token wakes reads it set.
        self.stopped.store(true, Ordering::Release);
        self.token.cancel();
    }

    pub fn is_cancelled(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    /// Waits for the stop (a waiter of its own: for code not run by [`Shutdown::spawn`]).
    pub fn cancelled(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.token.cancelled()
    }
}

/// Ready once `stop` has come, holding no waiter of its own: the hard stop as seen from inside a task
/// [`Shutdown::spawn`] runs, whose wrapper already waits for it and polls the task first when it comes, so the
/// task ends in its own words (a tunnel writes its closing line, `end = shutdown`) before it is dropped. Eight
/// bytes where a waiter of its own took 72 in every open tunnel, and no lock taken to register or check it.
pub fn stopping(stop: &HardStop) -> impl Future<Output = ()> + '_ {
    std::future::poll_fn(move |_| if stop.is_cancelled() { Poll::Ready(()) } else { Poll::Pending })
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
        stopped: Arc<AtomicBool>,
        waiting: bool,
    }
}

impl<F: Future<Output = ()>> Future for UntilStopped<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        // The task first: woken by the stop, it sees it (see [`stopping`]) and finishes before it is dropped.
        if this.task.poll(cx).is_ready() {
            return Poll::Ready(());
        }
        // The wait registers this task's waker at its first poll and keeps it; polling it again (two locks on
        // the token every task shares) is needed only once the stop has come. This is a spawned task's whole
        // future ([`Shutdown::spawn`]), so its waker is the same at every poll.
        if !*this.waiting || this.stopped.load(Ordering::Acquire) {
            if this.stop.poll(cx).is_ready() {
                return Poll::Ready(());
            }
            *this.waiting = true;
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

/// Accepts until `shutdown` drains, handing each connection under the cap to `serve` in a task of its
/// own (tracked, and dropped at the hard stop).
pub async fn serve<F, Fut>(listener: Listener, shutdown: Shutdown, serve: F)
where
    F: Fn(Accepted) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(listener.max_connections.max(1)));
    accept(listener, slots, &shutdown, &serve).await;
}

/// One address's listening sockets, one for each accept thread: bound (and listening) in the caller's
/// runtime, registered with none until [`serve_threads`] hands each to its thread.
pub struct Spread {
    pub addr: SocketAddr,
    sockets: Vec<std::net::TcpListener>,
}

/// Binds `addr` for `threads` accept loops. More than one share the port with `SO_REUSEPORT`, so the
/// kernel spreads new connections over their queues (by a hash of the peer's address and port) and no
/// thread wakes for another's connection. `SO_REUSEPORT` would also let a second process of this user
/// join the group unnoticed (two instances started on one port would split its traffic), so the port
/// is first claimed alone, without it: that bind fails while anything listens there, this group
/// included, and a port the configuration left to the kernel (`:0`) is learned from it. (Such a port
/// can be taken by another socket between the claim and the group's bind: then a new one is claimed.)
pub async fn bind_spread(addr: SocketAddr, threads: usize) -> std::io::Result<Spread> {
    if threads <= 1 {
        let socket = TcpListener::bind(addr).await?.into_std()?;
        return Ok(Spread { addr: socket.local_addr()?, sockets: vec![socket] });
    }
    let mut attempt = 0;
    loop {
        let claimed = std::net::TcpListener::bind(addr)?.local_addr()?;
        match bind_group(claimed, threads) {
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && addr.port() == 0 && attempt < 3 => attempt += 1,
            group => return group,
        }
    }
}

/// `threads` listening sockets on `addr` (a port just claimed), all with `SO_REUSEPORT`.
fn bind_group(addr: SocketAddr, threads: usize) -> std::io::Result<Spread> {
    let mut sockets = Vec::with_capacity(threads);
    for _ in 0..threads {
        let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        socket.set_reuseaddr(true)?;
        socket.set_reuseport(true)?;
        socket.bind(addr)?;
        sockets.push(socket.listen(1024)?.into_std()?);
    }
    Ok(Spread { addr, sockets })
}

/// Serves `spread` like [`serve`], each socket's accept loop on a thread of its own with a
/// current-thread runtime: a connection's task, its tunnel's both directions and their timers stay on
/// the thread whose epoll saw it, so no connection pays a cross-thread wake-up (a multi-thread
/// runtime's workers share one I/O driver and hand woken tasks between them, a futex wake and a context
/// switch each). The cap is shared: `max_connections` counts every thread's connections. Each thread
/// stays up after its loop drains until every tracked task has ended (finished, or dropped at the
/// hard stop), since the connections it accepted run on its runtime. Resolves when every thread is done.
pub async fn serve_threads<F, Fut>(
    spread: Spread,
    name: &'static str,
    max_connections: usize,
    overload: fn(usize) -> Vec<u8>,
    shutdown: Shutdown,
    serve: F,
) where
    F: Fn(Accepted) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(max_connections.max(1)));
    // The threads end with this future too: dropped (its task aborted) rather than drained, it takes
    // their runtimes and the connections on them along.
    let gone = CancellationToken::new();
    let _gone_when_dropped = gone.clone().drop_guard();
    let mut done = Vec::with_capacity(spread.sockets.len());
    for (i, socket) in spread.sockets.into_iter().enumerate() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (slots, shutdown, serve, gone) = (slots.clone(), shutdown.clone(), serve.clone(), gone.clone());
        let run = move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let served = runtime.block_on(async {
                let socket = TcpListener::from_std(socket)?;
                tokio::spawn(keep_a_timer_due());
                let serving = async {
                    accept(Listener { name, socket, max_connections, overload }, slots, &shutdown, &serve).await;
                    shutdown.tasks.wait().await;
                };
                tokio::select! {
                    () = serving => {}
                    () = gone.cancelled() => {}
                }
                Ok::<(), std::io::Error>(())
            });
            // What the runtime still holds (untracked tasks, the connections of an aborted server) goes
            // with it before the thread says it is done.
            drop(runtime);
            drop(tx);
            served
        };
        let thread = std::thread::Builder::new().name(format!("sluice-{name}-{i}")).spawn(move || {
            if let Err(e) = run() {
                tracing::error!(listener = name, thread = i, error = %e, "an accept thread could not start");
            }
        });
        // A socket whose thread did not start is closed with it, and the kernel leaves it out of the
        // group: its share of new connections goes to the other threads.
        if let Err(e) = thread {
            tracing::error!(listener = name, thread = i, error = %e, "cannot start an accept thread");
        }
        done.push(rx);
    }
    for rx in done {
        let _ = rx.await;
    }
}

/// Keeps a timer due within [`TIMER_HORIZON`] on the calling thread's runtime, for as long as it runs.
/// Tokio's timer wakes its own thread's event loop (an eventfd write, and a turn of `epoll_wait`)
/// whenever a timer is set to fire before every timer it already holds, and with none pending, that is
/// any timer: one tunnel at a time, its connect timeout and its idle timer did so each, two writes per
/// tunnel of the 34 syscalls it makes. With this one pending, only a timer due sooner than it does.
async fn keep_a_timer_due() {
    let mut tick = tokio::time::interval(TIMER_HORIZON);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
    }
}

/// Shorter than any per-connection timer (the head, connect and idle timeouts are seconds or more); one
/// wake-up a second is what an idle thread pays for it.
const TIMER_HORIZON: Duration = Duration::from_secs(1);

async fn accept<F, Fut>(listener: Listener, slots: Arc<Semaphore>, shutdown: &Shutdown, serve: &F)
where
    F: Fn(Accepted) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Listener { name, socket, max_connections, overload } = listener;
    let mut backoff = BACKOFF.0;
    // One wait for the drain, registered once, rather than a new one per connection.
    let draining = shutdown.draining.cancelled();
    tokio::pin!(draining);
    loop {
        let accepted = tokio::select! {
            a = socket.accept() => a,
            () = &mut draining => return,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(listener = name, error = %e, pause_ms = backoff.as_millis() as u64, "accept failed");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = &mut draining => return,
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

    /// Serves `threads` accept threads on a fresh loopback port, each connection answered with the name of
    /// the thread that runs it; the cap is `max`.
    async fn named_threads(threads: usize, max: usize) -> (SocketAddr, Shutdown, tokio::task::JoinHandle<()>) {
        let spread = bind_spread("127.0.0.1:0".parse().unwrap(), threads).await.unwrap();
        let addr = spread.addr;
        let shutdown = Shutdown::default();
        let serve = |a: Accepted| async move {
            let Accepted { mut stream, slot, .. } = a;
            let name = std::thread::current().name().unwrap_or("").to_owned();
            let _ = stream.write_all(name.as_bytes()).await;
            let _ = stream.shutdown().await;
            // Held until the client closes, so the cap counts this connection meanwhile.
            let _ = stream.read(&mut [0u8; 1]).await;
            drop(slot);
        };
        let task = tokio::spawn(serve_threads(
            spread,
            "test",
            max,
            |max| format!("full at {max}").into(),
            shutdown.clone(),
            serve,
        ));
        (addr, shutdown, task)
    }

    async fn answer(addr: SocketAddr) -> (TcpStream, String) {
        let mut client = TcpStream::connect(addr).await.unwrap();
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.unwrap();
        (client, answer)
    }

    #[tokio::test]
    async fn spread_threads_share_the_port_and_the_cap() {
        let (addr, shutdown, task) = named_threads(2, 64).await;
        let mut seen = std::collections::BTreeSet::new();
        let mut open = Vec::new();
        for _ in 0..64 {
            let (client, name) = answer(addr).await;
            assert!(name.starts_with("sluice-test-"), "served on {name:?}");
            seen.insert(name);
            open.push(client);
        }
        // The kernel spreads connections by a hash of their ports: 64 on one thread would be a 1 in 2^63 chance.
        assert_eq!(seen.len(), 2, "both threads served: {seen:?}");
        // 64 are open: the next one is over the cap whichever thread takes it.
        for _ in 0..8 {
            assert_eq!(answer(addr).await.1, "full at 64");
        }
        drop(open);
        assert!(shutdown.drain(Duration::from_secs(5)).await);
        task.await.unwrap();
        assert!(TcpStream::connect(addr).await.is_err(), "every thread's socket is closed after the drain");
    }

    #[tokio::test]
    async fn a_spread_port_is_claimed_alone() {
        for threads in [1, 2] {
            let (addr, _shutdown, task) = named_threads(threads, 4).await;
            for again in [1, 2] {
                let err = bind_spread(addr, again).await.err().expect("a second group on a port in use");
                assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse, "{threads} then {again}: {err}");
            }
            task.abort();
        }
    }

    #[tokio::test]
    async fn aborting_the_server_stops_its_threads() {
        let (addr, _shutdown, task) = named_threads(2, 4).await;
        assert!(answer(addr).await.1.starts_with("sluice-test-"));
        task.abort();
        let _ = task.await;
        // The threads end soon after: poll (bounded) until the port refuses.
        for _ in 0..500 {
            if TcpStream::connect(addr).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the accept threads were still up 5 s after the server was aborted");
    }
}
