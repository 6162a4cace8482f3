//! One accept loop for every listener (egress, git, admin): the connection cap and its overload
//! answer, backoff when accepting fails, graceful drain, and the hard stop after the grace; the
//! egress listener's loops each on an accept thread of their own ([`serve_threads`]).

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

/// One listening socket, a descriptor of it for each accept thread: bound (and listening) in the
/// caller's runtime, registered with none until [`serve_threads`] hands each to its thread.
pub struct Spread {
    pub addr: SocketAddr,
    sockets: Vec<std::net::TcpListener>,
}

/// Binds `addr` for `threads` accept loops: one socket, bound as any listener is (a port in use is
/// refused), and a duplicate of its descriptor per further thread, each thread's epoll watching its
/// own. A new connection wakes every idle thread and the first `accept` takes it; the others find
/// nothing and wait again. `SO_REUSEPORT` sockets (one accept queue per thread, no wasted wake-up)
/// were measured too, and are not used: any later process of the same user could join their group, or
/// bind the port's more specific address, and take a share of the sessions' connections.
pub async fn bind_spread(addr: SocketAddr, threads: usize) -> std::io::Result<Spread> {
    let socket = TcpListener::bind(addr).await?.into_std()?;
    let addr = socket.local_addr()?;
    let mut sockets = Vec::with_capacity(threads.max(1));
    for _ in 1..threads.max(1) {
        sockets.push(socket.try_clone()?);
    }
    sockets.push(socket);
    Ok(Spread { addr, sockets })
}

/// Serves `spread` like [`serve`], each descriptor's accept loop on a thread of its own with a
/// current-thread runtime: a connection's task, its tunnel's both directions and their timers stay on
/// the thread that accepted it, so no connection pays a cross-thread wake-up (a multi-thread
/// runtime's workers share one I/O driver and hand woken tasks between them, a futex wake and a context
/// switch each). The cap is shared: `max_connections` counts every thread's connections. Each thread
/// stays up after its loop drains until every task `shutdown` tracks has ended (finished, or dropped at
/// the hard stop; the git listener's tasks share the tracker), since the connections it accepted run on
/// its runtime. Resolves when every thread is done. Dropped instead, it stops the threads soon after,
/// their runtimes dropping the connections they ran.
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
        let not_started = move |e: std::io::Error| {
            tracing::error!(listener = name, thread = i, error = %e, hint = START_HINT, "an accept thread could not start");
        };
        // A descriptor whose thread did not start is closed with it; the other threads take its share.
        let thread = std::thread::Builder::new().name(format!("sluice-{name}-{i}"));
        if let Err(e) = thread.spawn(move || run().unwrap_or_else(not_started)) {
            not_started(e);
        }
        done.push(rx);
    }
    for rx in done {
        let _ = rx.await;
    }
}

pin_project_lite::pin_project! {
    /// See [`inside`].
    pub struct Inside<'a, F> {
        runtime: Option<&'a tokio::runtime::Handle>,
        #[pin]
        call: F,
    }
}

/// Polls `call` inside `runtime`'s context (`None`: where it is polled). For calls into a client shared
/// by every accept thread that starts tasks, sockets or timers of its own on first use or on a
/// reconnect (the limit store's connection manager, the DNS resolver): polled on an accept thread,
/// they would land in its runtime, every other thread's calls would then wait on its event loop, and
/// they would stop with it at shutdown. In the runtime that started the server they live as long as
/// the process.
pub fn inside<F: Future>(runtime: Option<&tokio::runtime::Handle>, call: F) -> Inside<'_, F> {
    Inside { runtime, call }
}

impl<F: Future> Future for Inside<'_, F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let _inside = this.runtime.map(tokio::runtime::Handle::enter);
        this.call.poll(cx)
    }
}

/// What to do about an accept thread that did not start (its share of connections goes to the others).
const START_HINT: &str = "raise the process's thread and open-file limits, or lower [server] threads";

/// Keeps a timer due within [`TIMER_HORIZON`] on the calling thread's runtime, for as long as it runs.
/// Tokio's timer wakes its own thread's event loop (an eventfd write, and a turn of `epoll_wait`)
/// whenever a timer is set to fire before every timer it already holds, and with none pending, that is
/// any timer: one tunnel at a time, its connect and idle timeouts each did. With this one pending, only
/// a timer due sooner does (a Happy Eyeballs delay, a shaped direction's pause, a limit store's timeout).
async fn keep_a_timer_due() {
    let mut tick = tokio::time::interval(TIMER_HORIZON);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
    }
}

/// Shorter than the head, connect and idle timeouts; an idle accept thread wakes once a second for it.
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
    /// the thread that runs it and then held until the client closes; the cap is `max`. The first
    /// connection's thread is blocked for a while after its answer, so the next connection is taken by
    /// another thread or waits. Counts the connections served to their end; every connection's task
    /// holds a clone of the returned `Arc<()>` while it lives.
    async fn named_threads(
        threads: usize,
        max: usize,
    ) -> (SocketAddr, Shutdown, tokio::task::JoinHandle<()>, Arc<std::sync::atomic::AtomicUsize>, Arc<()>) {
        let spread = bind_spread("127.0.0.1:0".parse().unwrap(), threads).await.unwrap();
        let addr = spread.addr;
        let shutdown = Shutdown::default();
        let first = Arc::new(AtomicBool::new(true));
        let finished = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let done = finished.clone();
        let alive = Arc::new(());
        let marker = alive.clone();
        let serve = move |a: Accepted| {
            let (first, done, alive) = (first.clone(), done.clone(), marker.clone());
            async move {
                let _alive = alive;
                let Accepted { mut stream, slot, .. } = a;
                let name = std::thread::current().name().unwrap_or("").to_owned();
                let _ = stream.write_all(name.as_bytes()).await;
                let _ = stream.shutdown().await;
                if first.swap(false, Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(300));
                }
                // Held until the client closes, so the cap counts this connection meanwhile.
                let _ = stream.read(&mut [0u8; 1]).await;
                drop(slot);
                done.fetch_add(1, Ordering::Relaxed);
            }
        };
        let overload = |max| format!("full at {max}").into();
        let task = tokio::spawn(serve_threads(spread, "test", max, overload, shutdown.clone(), serve));
        (addr, shutdown, task, finished, alive)
    }

    async fn answer(addr: SocketAddr) -> (TcpStream, String) {
        let mut client = TcpStream::connect(addr).await.unwrap();
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.unwrap();
        (client, answer)
    }

    #[tokio::test]
    async fn spread_threads_share_the_port_and_the_cap() {
        let (addr, shutdown, task, finished, _) = named_threads(2, 64).await;
        let (one, first) = answer(addr).await;
        // The first connection's thread is blocked now: another thread answers the second.
        let (two, second) = answer(addr).await;
        assert!(first.starts_with("sluice-test-") && second.starts_with("sluice-test-"), "{first:?}, {second:?}");
        assert_ne!(first, second, "a second thread took the connection the first could not");
        let mut open = vec![one, two];
        for _ in 2..64 {
            let (client, name) = answer(addr).await;
            assert!(name.starts_with("sluice-test-"), "served on {name:?}");
            open.push(client);
        }
        // 64 are open: the next one is over the cap whichever thread takes it.
        for _ in 0..8 {
            assert_eq!(answer(addr).await.1, "full at 64");
        }
        // The drain waits for what the threads run: one connection still open when it starts ends after.
        let last = open.pop();
        drop(open);
        let drained = tokio::spawn({
            let shutdown = shutdown.clone();
            async move { shutdown.drain(Duration::from_secs(5)).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(last);
        assert!(drained.await.unwrap(), "drained within the grace");
        task.await.unwrap();
        assert_eq!(finished.load(Ordering::Relaxed), 64, "every connection ran to its end");
        assert!(TcpStream::connect(addr).await.is_err(), "the socket is closed after the drain");
    }

    #[tokio::test]
    async fn a_spread_port_is_not_shared() {
        for threads in [1, 2] {
            let (addr, _shutdown, task, _, _) = named_threads(threads, 4).await;
            for again in [1, 2] {
                let err = bind_spread(addr, again).await.err().expect("a second listener on a port in use");
                assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse, "{threads} then {again}: {err}");
            }
            // Nor can a socket that asks to share it join.
            let sharer = tokio::net::TcpSocket::new_v4().unwrap();
            sharer.set_reuseaddr(true).unwrap();
            sharer.set_reuseport(true).unwrap();
            assert!(sharer.bind(addr).is_err(), "{threads}: an SO_REUSEPORT socket joined the port");
            task.abort();
        }
    }

    #[tokio::test]
    async fn aborting_the_server_stops_its_threads() {
        let (addr, _shutdown, task, _, alive) = named_threads(2, 4).await;
        // Held open: its task waits for the client to close.
        let (_held, name) = answer(addr).await;
        assert!(name.starts_with("sluice-test-"));
        task.abort();
        let _ = task.await;
        // The threads end soon after, their runtimes dropping what they ran (the held connection's task,
        // each thread's copy of the serve closure), and the socket closes.
        for _ in 0..500 {
            if Arc::strong_count(&alive) == 1 && TcpStream::connect(addr).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the accept threads or their connections were still up 5 s after the server was aborted");
    }

    /// What a call spawns runs in the runtime it is polled inside, not in the one of the thread polling it.
    #[test]
    fn a_call_inside_a_runtime_spawns_there() {
        let main =
            tokio::runtime::Builder::new_multi_thread().worker_threads(1).thread_name("main-rt").build().unwrap();
        let caller = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let spawned_on = |runtime: Option<&tokio::runtime::Handle>| {
            let call = async { tokio::spawn(async { std::thread::current().name().map(str::to_owned) }).await };
            caller.block_on(inside(runtime, call)).unwrap()
        };
        assert_eq!(spawned_on(Some(main.handle())).as_deref(), Some("main-rt"));
        assert_ne!(spawned_on(None).as_deref(), Some("main-rt"), "without one, the caller's runtime runs it");
    }
}
