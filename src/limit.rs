//! Per-session limits behind one trait: a request rate, a cap on open tunnels held as leases, and byte
//! meters that tunnels and requests report to while they move bytes. A session with a bandwidth limit or a
//! byte quota also gets a [`ByteBudget`] on its meters: transfers ask it for a [`Grant`] before they move.
//! [`memory`] keeps them in this process; [`redis`] keeps them in a Redis server shared by every instance, so
//! that limits hold across instances.

pub mod budget;
pub mod memory;
pub mod redis;
/// Byte sizes and quotas are pure values that policies parse; they live with the policy.
pub use crate::policy::quota;

use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use serde::Serialize;

pub use budget::{Budget, ByteLimits, Flow};
pub use memory::MemoryLimiter;

use crate::policy::Limits;
use crate::policy::quota::ByteQuota;

/// The limits of every session, shared by all connections: the proxies hold an `Arc<dyn Limiter>`.
///
/// `limits` are the session's policy's; what a policy leaves unset, the implementation takes from the
/// server's `[limits]`. Answers are [`Answer`]s so that a store across the network can take a round trip,
/// while the in-memory store answers at once without allocating.
pub trait Limiter: Send + Sync + fmt::Debug {
    /// Counts one new CONNECT tunnel or plain-HTTP request of `key` against its rate: `requests_per_second`
    /// and `burst`.
    fn check_request(&self, key: &LimitKey, limits: &Limits) -> Answer<'_, Result<(), Limited<RateLimited>>>;

    /// Takes one of `key`'s `max_tunnels` places for a tunnel, held until the [`Lease`] is dropped. The
    /// lease's [`ByteMeter`] is where the tunnel reports its bytes as they move.
    fn open_tunnel(&self, key: &LimitKey, limits: &Limits) -> Answer<'_, Result<Lease, Limited<TooManyTunnels>>>;

    /// [`check_request`](Limiter::check_request), then [`open_tunnel`](Limiter::open_tunnel), as one answer:
    /// what a new CONNECT tunnel asks. A shared store overrides it to do both in one round trip.
    fn admit_tunnel(&self, key: &LimitKey, limits: &Limits) -> Answer<'_, Result<Lease, Limited<TunnelRefused>>> {
        let rate = |e: Limited<RateLimited>| e.map(TunnelRefused::Rate);
        let cap = |e: Limited<TooManyTunnels>| e.map(TunnelRefused::Tunnels);
        match self.check_request(key, limits).now() {
            Ok(Err(e)) => Answer::ready(Err(rate(e))),
            Ok(Ok(())) => match self.open_tunnel(key, limits).now() {
                Ok(opened) => Answer::ready(opened.map_err(cap)),
                Err(later) => Answer::later(async move { later.await.map_err(cap) }),
            },
            Err(later) => {
                let (key, limits) = (key.clone(), *limits);
                Answer::later(async move {
                    later.await.map_err(rate)?;
                    self.open_tunnel(&key, &limits).await.map_err(cap)
                })
            }
        }
    }

    /// Whether `key` may start a new tunnel or request under its byte quotas (`upload_quota`,
    /// `download_quota`): refused while either is spent in its current window. Sessions without a quota
    /// are answered at once, without touching the store.
    fn check_quota(&self, key: &LimitKey, limits: &Limits) -> Answer<'_, Result<(), QuotaExceeded>>;

    /// Where a plain-HTTP request of `key` reports its bytes as they move; with the session's
    /// [`ByteBudget`] when its `limits` shape or quota bytes.
    fn meter(&self, key: &LimitKey, limits: &Limits) -> ByteMeter;

    /// What this instance counts for `key`, if it tracks it.
    fn session_stats(&self, key: &LimitKey) -> Option<SessionStats>;

    /// Forgets what no longer matters (idle sessions, replenished rates); the server calls it periodically.
    fn housekeeping(&self);

    /// Adds a finished exchange's bytes to `key`'s counters, and charges them to its quotas.
    fn record_bytes(&self, key: &LimitKey, limits: &Limits, up: u64, down: u64) {
        self.meter(key, limits).settle(up, down);
    }
}

/// Whose limits a request counts against. Derived from what the client presents, the same way on every
/// instance, so that a shared store sees one key per session however traffic is spread: `s:<session-id>`
/// for a credentialed session, `anon:<address>` for an anonymous client (so that one local client's flood
/// does not starve another).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct LimitKey(Arc<str>);

impl LimitKey {
    /// The key of a session with credentials; `id` is the verified session id.
    pub fn session(id: &str) -> LimitKey {
        LimitKey(format!("s:{id}").into())
    }

    /// A session's use of the git listener and `/api` (`id` verified), limited apart from its egress.
    pub fn git(id: &str) -> LimitKey {
        LimitKey(format!("g:{id}").into())
    }

    /// A session's `/api` writes, limited apart from its other requests (`id` verified).
    pub fn api_writes(id: &str) -> LimitKey {
        LimitKey(format!("w:{id}").into())
    }

    /// The key of a client without credentials, by its address. An IPv4 client is the same key whether a
    /// listener sees it as `192.0.2.7` or, dual-stack, as `::ffff:192.0.2.7`.
    pub fn anonymous(client: IpAddr) -> LimitKey {
        LimitKey(format!("anon:{}", client.to_canonical()).into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for LimitKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for LimitKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LimitKey({:?})", &*self.0)
    }
}

/// A limiter's answer: ready at once, or after a round trip to a shared store. Awaiting a ready answer
/// neither allocates nor yields, so the in-memory limiter costs what a plain function call does.
#[must_use = "an answer does nothing unless awaited"]
pub struct Answer<'a, T>(Inner<'a, T>);

enum Inner<'a, T> {
    Ready(Option<T>),
    Later(Pin<Box<dyn Future<Output = T> + Send + 'a>>),
}

impl<'a, T> Answer<'a, T> {
    pub fn ready(value: T) -> Self {
        Answer(Inner::Ready(Some(value)))
    }

    pub fn later(answer: impl Future<Output = T> + Send + 'a) -> Self {
        Answer(Inner::Later(Box::pin(answer)))
    }

    /// The answer if it is known without waiting, else the answer itself back (to await).
    pub fn now(self) -> Result<T, Self> {
        match self.0 {
            Inner::Ready(Some(value)) => Ok(value),
            other => Err(Answer(other)),
        }
    }
}

impl<T: Unpin> Future for Answer<'_, T> {
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        match &mut self.get_mut().0 {
            Inner::Ready(value) => match value.take() {
                Some(value) => Poll::Ready(value),
                // As `std::future::Ready` does: waiting forever instead would hide the bug.
                None => panic!("a limiter's answer was polled after it was given"),
            },
            Inner::Later(answer) => answer.as_mut().poll(cx),
        }
    }
}

impl<T> fmt::Debug for Answer<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.0 {
            Inner::Ready(_) => "Answer::Ready",
            Inner::Later(_) => "Answer::Later",
        })
    }
}

/// A tunnel's place under its session's `max_tunnels`, and where it reports its bytes. Dropping it gives
/// the place back.
#[derive(Debug)]
pub struct Lease {
    slot: Arc<dyn TunnelSlot>,
    budget: Option<Arc<dyn ByteBudget>>,
}

/// What a [`Lease`] holds: a place that it gives back when it ends, and the counters its bytes go to. Each
/// store implements it for its own kind of place (a count in the session's entry here, a lease with a TTL
/// in a shared store), so opening a tunnel costs one reference, not one per role.
pub trait TunnelSlot: ByteCounter {
    fn release(&self);
}

impl Lease {
    /// A lease on `slot`, released when the lease is dropped.
    pub fn new(slot: Arc<dyn TunnelSlot>) -> Lease {
        Lease { slot, budget: None }
    }

    /// A lease whose tunnel asks `budget` before it moves bytes (its session shapes or quotas them).
    pub fn with_budget(slot: Arc<dyn TunnelSlot>, budget: Option<Arc<dyn ByteBudget>>) -> Lease {
        Lease { slot, budget }
    }

    /// Where the tunnel reports its bytes while it runs; take it once, when the tunnel starts.
    pub fn meter(&self) -> ByteMeter {
        let counter: Arc<dyn ByteCounter> = self.slot.clone();
        ByteMeter { counter, budget: self.budget.clone() }
    }

    /// Adds traffic to the lease's counters, e.g. a tunnel's totals when it did not report as it went.
    pub fn record_bytes(&self, up: u64, down: u64) {
        self.slot.add_up(up);
        self.slot.add_down(down);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.slot.release();
    }
}

/// Where a tunnel or request reports its bytes as they move: a handle on its store's counters, one
/// relaxed atomic add per report. The in-memory limiter hands out its session's own counters, so its stats
/// are live. A session whose bytes are shaped or quota'd also has a [`ByteBudget`]; without one a transfer
/// never asks for grants, so unlimited sessions keep the plain (and zero-copy) path.
#[derive(Clone, Debug)]
pub struct ByteMeter {
    counter: Arc<dyn ByteCounter>,
    budget: Option<Arc<dyn ByteBudget>>,
}

/// Which way bytes move: `Up` towards the destination (uploads), `Down` back to the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Up,
    Down,
}

impl Direction {
    /// The word policy keys and messages use: `upload`, `download`.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Up => "upload",
            Direction::Down => "download",
        }
    }
}

/// What a [`ByteBudget`] lets one transfer move next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Grant {
    /// Move at most `bytes`, once `wait` has passed (the session's shaping: zero while it has bandwidth to
    /// spare). Bytes granted and then not moved go back with [`ByteBudget::unused`].
    Bytes { bytes: u64, wait: Duration },
    /// A quota of the session is spent for its window: the transfer ends (`end = quota_exceeded`).
    Spent(QuotaExceeded),
}

/// A session's byte limits in force: shaping per direction (a token bucket shared by all its tunnels and
/// requests) and quotas per direction (fixed windows). Each store keeps quota counters its own way (in this
/// process; in a shared store with the window's TTL); [`Budget`] is the in-memory one and its buckets are
/// what any store may shape with.
///
/// The contract, for every implementation:
/// - [`grant`](ByteBudget::grant) is asked before every transfer (each read, each splice) with what the
///   transfer would move; the transfer moves at most the granted bytes, after the wait. A grant takes its
///   bytes from the direction's quota at once, so concurrent transfers never overshoot it together; grants
///   are at most one fair share (a chunk of the rate), so one bulk transfer cannot starve the session's
///   others, and they are served in the order asked.
/// - [`unused`](ByteBudget::unused) gives back what a grant allowed and the transfer did not move.
/// - [`charge`](ByteBudget::charge) counts bytes that moved without a grant (a plain-HTTP exchange, settled
///   when it ends) against the quota; it never waits and may take the quota past its size.
/// - [`spent`](ByteBudget::spent) names a quota spent in its current window; open tunnels poll it so that
///   one tunnel spending the quota closes the session's others too.
pub trait ByteBudget: Send + Sync + fmt::Debug {
    fn grant(&self, dir: Direction, want: u64) -> Answer<'_, Grant>;
    fn unused(&self, dir: Direction, n: u64);
    fn charge(&self, dir: Direction, n: u64);
    fn spent(&self) -> Option<QuotaExceeded>;
    /// Whether the budget counts a quota at all: when not, open tunnels need not poll [`ByteBudget::spent`].
    fn has_quota(&self) -> bool {
        true
    }
}

/// The counters behind a [`ByteMeter`]; each store keeps them its own way (the in-memory limiter inside the
/// session's entry, so a lease and its meter share one allocation).
pub trait ByteCounter: Send + Sync + fmt::Debug {
    fn add_up(&self, n: u64);
    fn add_down(&self, n: u64);
    /// Everything added so far, up and down.
    fn totals(&self) -> (u64, u64);
}

/// Plain counters: what a meter of its own counts into.
#[derive(Debug, Default)]
pub struct ByteCounts {
    up: AtomicU64,
    down: AtomicU64,
}

impl ByteCounter for ByteCounts {
    fn add_up(&self, n: u64) {
        self.up.fetch_add(n, Ordering::Relaxed);
    }

    fn add_down(&self, n: u64) {
        self.down.fetch_add(n, Ordering::Relaxed);
    }

    fn totals(&self) -> (u64, u64) {
        (self.up.load(Ordering::Relaxed), self.down.load(Ordering::Relaxed))
    }
}

/// A meter of its own, counting from zero.
impl Default for ByteMeter {
    fn default() -> Self {
        ByteMeter::new(Arc::new(ByteCounts::default()))
    }
}

impl ByteMeter {
    /// A meter that only counts.
    pub fn new(counter: Arc<dyn ByteCounter>) -> ByteMeter {
        ByteMeter { counter, budget: None }
    }

    /// A meter that counts, and whose transfers ask `budget` first when there is one.
    pub fn with_budget(counter: Arc<dyn ByteCounter>, budget: Option<Arc<dyn ByteBudget>>) -> ByteMeter {
        ByteMeter { counter, budget }
    }

    /// Bytes sent towards the destination.
    pub fn add_up(&self, n: u64) {
        self.counter.add_up(n);
    }

    /// Bytes received from the destination.
    pub fn add_down(&self, n: u64) {
        self.counter.add_down(n);
    }

    pub fn add(&self, up: u64, down: u64) {
        self.add_up(up);
        self.add_down(down);
    }

    /// Adds an exchange's bytes that moved without grants, and charges them to the session's quotas.
    pub fn settle(&self, up: u64, down: u64) {
        self.add(up, down);
        if let Some(budget) = &self.budget {
            budget.charge(Direction::Up, up);
            budget.charge(Direction::Down, down);
        }
    }

    /// Everything added so far, up and down.
    pub fn totals(&self) -> (u64, u64) {
        self.counter.totals()
    }

    /// The session's budget, when its bytes are shaped or quota'd: then transfers ask it before moving.
    pub fn budget(&self) -> Option<&Arc<dyn ByteBudget>> {
        self.budget.as_ref()
    }
}

/// Why a limiter said no: the session is over the limit `E`, or the shared store that keeps its count
/// cannot be asked and the server is configured to refuse meanwhile (`[limits.store] on_error = "refuse"`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Limited<E> {
    Over(E),
    StoreUnavailable,
}

impl<E> Limited<E> {
    pub fn map<F>(self, f: impl FnOnce(E) -> F) -> Limited<F> {
        match self {
            Limited::Over(e) => Limited::Over(f(e)),
            Limited::StoreUnavailable => Limited::StoreUnavailable,
        }
    }
}

/// Why a new tunnel was not admitted: its session's request rate, or its cap on open tunnels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TunnelRefused {
    Rate(RateLimited),
    Tunnels(TooManyTunnels),
}

/// A request refused because its session is over its rate: answer `429` with `Retry-After`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateLimited {
    /// Until the session's next request would pass.
    pub retry_after: Duration,
    /// The quota in words, e.g. `20 requests per second, burst 40`.
    pub limit: String,
}

impl RateLimited {
    /// `retry_after` in whole seconds, rounded up, for the `Retry-After` header: rounding down would invite a retry
    /// that is refused again.
    pub fn retry_after_secs(&self) -> u64 {
        let secs = self.retry_after.as_secs();
        if self.retry_after.subsec_nanos() > 0 { secs + 1 } else { secs }
    }
}

impl fmt::Display for RateLimited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rate limit of {} reached; retry in {:?} (a policy raises it with requests_per_second and burst in \
             [limits])",
            self.limit, self.retry_after
        )
    }
}

impl std::error::Error for RateLimited {}

/// A tunnel refused because its session already has as many open as it may.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TooManyTunnels {
    pub max: u32,
}

impl fmt::Display for TooManyTunnels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "session already has {} open tunnels, the most it may have at once; close some, or raise max_tunnels \
             in the policy's [limits]",
            self.max
        )
    }
}

impl std::error::Error for TooManyTunnels {}

/// A request or transfer refused because a byte quota of its session is spent for the current window:
/// answer `429 quota_exceeded` with `Retry-After` = the window's end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuotaExceeded {
    pub direction: Direction,
    pub quota: ByteQuota,
    /// Bytes counted in the window (at least the quota's size).
    pub used: u64,
    /// Unix time (seconds) at which the window ends and the quota is whole again.
    pub resets_at: u64,
}

impl QuotaExceeded {
    /// Whole seconds from `now` (Unix seconds) until the quota resets; at least 1.
    pub fn retry_after_secs(&self, now: u64) -> u64 {
        self.resets_at.saturating_sub(now).max(1)
    }
}

impl QuotaExceeded {
    /// The `429 quota_exceeded` answer, at Unix time `now`.
    pub fn refusal(&self, now: u64) -> crate::refusal::Refusal {
        crate::refusal::Refusal::quota_exceeded(self.direction.as_str(), self.quota, self.used, self.resets_at, now)
    }
}

impl fmt::Display for QuotaExceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} quota of {} spent ({} used); it resets at unix time {}",
            self.direction.as_str(),
            self.quota,
            quota::ByteSize::bytes(self.used),
            self.resets_at
        )
    }
}

impl std::error::Error for QuotaExceeded {}

/// A session's counters, for the decision log and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SessionStats {
    /// Requests (tunnels and plain-HTTP requests) let through.
    pub requests: u64,
    /// Requests refused for the rate limit.
    pub rate_limited: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub open_tunnels: u32,
    /// How long shaping has made the session's transfers wait, in total.
    pub shaping_wait_ms: u64,
    /// Bytes counted against each quota in its current window, when the session has one.
    pub upload_quota_used: Option<u64>,
    pub download_quota_used: Option<u64>,
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;

    use super::*;

    #[test]
    fn keys_are_the_same_on_every_instance() {
        assert_eq!(LimitKey::session("sess-42").as_str(), "s:sess-42");
        assert_eq!(LimitKey::git("sess-42").as_str(), "g:sess-42");
        assert_eq!(LimitKey::api_writes("sess-42").as_str(), "w:sess-42");
        assert_eq!(LimitKey::anonymous("192.0.2.7".parse().unwrap()).as_str(), "anon:192.0.2.7");
        assert_eq!(
            LimitKey::anonymous("::ffff:192.0.2.7".parse().unwrap()),
            LimitKey::anonymous([192, 0, 2, 7].into())
        );
        assert_eq!(LimitKey::anonymous("2001:db8::1".parse().unwrap()).to_string(), "anon:2001:db8::1");
        // A session id can never be read as an address, nor the reverse.
        assert_ne!(LimitKey::session("192.0.2.7"), LimitKey::anonymous([192, 0, 2, 7].into()));
    }

    /// A slot that counts its releases.
    #[derive(Debug, Default)]
    struct Counted {
        released: AtomicU32,
        bytes: ByteCounts,
    }

    impl ByteCounter for Counted {
        fn add_up(&self, n: u64) {
            self.bytes.add_up(n);
        }

        fn add_down(&self, n: u64) {
            self.bytes.add_down(n);
        }

        fn totals(&self) -> (u64, u64) {
            self.bytes.totals()
        }
    }

    impl TunnelSlot for Counted {
        fn release(&self) {
            self.released.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn a_lease_releases_once_on_drop_and_meters_as_it_goes() {
        let slot = Arc::new(Counted::default());
        let lease = Lease::new(slot.clone());
        let meter = lease.meter();
        meter.add_up(3);
        meter.add_down(40);
        lease.record_bytes(1, 2);
        // The store's view is live: no need to wait for the lease to end.
        assert_eq!(slot.totals(), (4, 42));
        assert_eq!(meter.totals(), (4, 42));
        assert_eq!(slot.released.load(Ordering::Relaxed), 0);
        drop(lease);
        assert_eq!(slot.released.load(Ordering::Relaxed), 1);
        // A meter taken from the lease may outlive it; it never releases the place again.
        meter.add_up(1);
        assert_eq!(slot.totals(), (5, 42));
        drop(meter);
        assert_eq!(slot.released.load(Ordering::Relaxed), 1);
        assert_eq!(ByteMeter::default().totals(), (0, 0));
    }

    #[tokio::test]
    async fn answers_now_or_later() {
        assert_eq!(Answer::ready(7).now().ok(), Some(7));
        assert_eq!(Answer::ready(7).await, 7);
        let later = Answer::later(async {
            tokio::task::yield_now().await;
            8
        });
        let later = later.now().err();
        assert_eq!(later.map(|a| format!("{a:?}")).as_deref(), Some("Answer::Later"));
        assert_eq!(Answer::later(async { 9 }).await, 9);
    }

    #[test]
    fn a_limiter_can_be_shared_as_a_trait_object() {
        fn shared<T: Send + Sync + ?Sized>() {}
        shared::<dyn Limiter>();
        shared::<Lease>();
        shared::<ByteMeter>();
        fn send<T: Send>(_: &T) {}
        let limiter: Arc<dyn Limiter> = Arc::new(MemoryLimiter::new(crate::config::LimitDefaults::default()));
        let key = LimitKey::session("s1");
        let limits = Limits::default();
        send(&limiter.check_request(&key, &limits));
        send(&limiter.open_tunnel(&key, &limits));
    }
}
