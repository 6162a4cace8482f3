//! Per-session limits: a request rate over governor's keyed limiters, a cap on open tunnels, and traffic counters.

use std::collections::HashMap;
use std::fmt;
use std::hash::BuildHasher;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock, Reference};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};
use serde::{Deserialize, Serialize};

use crate::policy::Limits;

/// Session ids and quota keys come from credentials and policies we verified or loaded, and governor's keys are
/// ids we hand out, so a fast seeded hash is enough.
type FastState = foldhash::fast::RandomState;

/// How long a session with no open tunnel and no request is remembered (with its counters) before housekeeping
/// forgets it. Its rate state is kept at least until it has fully replenished, so forgetting never resets a limit.
pub const SESSION_IDLE: Duration = Duration::from_secs(10 * 60);

/// Distinct quotas (one keyed limiter each) kept at once. Quotas come from policies, so this is far above any real
/// deployment; past it a session is limited by the server's default quota rather than growing memory.
pub const MAX_QUOTAS: usize = 1024;

/// Longest interval between two requests a quota can express. Governor counts in u64 nanoseconds, and a slower
/// quota would only ever matter to a session that lives for a year.
const MAX_PERIOD_NANOS: u64 = 365 * 24 * 3600 * 1_000_000_000;
/// Longest time a full burst may take to replenish, again to keep governor's u64 nanosecond arithmetic in range.
const MAX_WINDOW_NANOS: u64 = 100 * MAX_PERIOD_NANOS;

/// Session maps are sharded so concurrent connections of different sessions rarely touch the same lock.
const SHARDS: usize = 64;

/// The server's limits for sessions whose policy sets none: the `[limits]` table of the server configuration.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(try_from = "RawLimitDefaults")]
pub struct LimitDefaults {
    /// New CONNECT tunnels plus plain-HTTP requests per second, per session.
    pub requests_per_second: f64,
    /// Requests a session may make at once before the rate applies.
    pub burst: u32,
    /// Concurrent open tunnels per session.
    pub max_tunnels: u32,
}

impl Default for LimitDefaults {
    fn default() -> Self {
        LimitDefaults { requests_per_second: 20.0, burst: 40, max_tunnels: 128 }
    }
}

/// The table as written; [`LimitDefaults`] is built from it only when every value is usable.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLimitDefaults {
    requests_per_second: f64,
    burst: u32,
    max_tunnels: u32,
}

impl Default for RawLimitDefaults {
    fn default() -> Self {
        let d = LimitDefaults::default();
        RawLimitDefaults { requests_per_second: d.requests_per_second, burst: d.burst, max_tunnels: d.max_tunnels }
    }
}

impl TryFrom<RawLimitDefaults> for LimitDefaults {
    type Error = String;

    fn try_from(raw: RawLimitDefaults) -> Result<Self, String> {
        let rps = raw.requests_per_second;
        if !(rps.is_finite() && rps > 0.0) {
            return Err(format!("requests_per_second must be a positive number, not {rps} (e.g. 20)"));
        }
        if raw.burst == 0 {
            return Err("burst must be at least 1, not 0 (e.g. 40)".into());
        }
        if raw.max_tunnels == 0 {
            return Err("max_tunnels must be at least 1, not 0 (e.g. 128)".into());
        }
        Ok(LimitDefaults { requests_per_second: rps, burst: raw.burst, max_tunnels: raw.max_tunnels })
    }
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
}

/// How many entries the limiter holds: what housekeeping keeps bounded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Tracked {
    pub sessions: usize,
    /// Per-session rate states, summed over every quota.
    pub rate_states: usize,
    pub quotas: usize,
}

/// One session's state. Governor's limiters key it by `id`, a number, so a check hashes the session name once
/// and never allocates.
#[derive(Debug)]
struct Session {
    id: u64,
    requests: AtomicU64,
    rate_limited: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    tunnels: AtomicU32,
    /// Nanoseconds since the limiter started, at the last request or tunnel.
    last_seen: AtomicU64,
    /// How long after `last_seen` the session may be forgotten.
    keep_nanos: AtomicU64,
}

impl Session {
    fn new(id: u64, now: u64) -> Self {
        Session {
            id,
            requests: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
            bytes_up: AtomicU64::new(0),
            bytes_down: AtomicU64::new(0),
            tunnels: AtomicU32::new(0),
            last_seen: AtomicU64::new(now),
            keep_nanos: AtomicU64::new(duration_nanos(SESSION_IDLE)),
        }
    }

    fn touch(&self, now: u64) {
        // Concurrent requests race here; any of their times is recent enough for an idle check.
        self.last_seen.store(now, Ordering::Relaxed);
    }

    fn is_idle(&self, now: u64) -> bool {
        let since = now.saturating_sub(self.last_seen.load(Ordering::Relaxed));
        self.tunnels.load(Ordering::Acquire) == 0 && since >= self.keep_nanos.load(Ordering::Relaxed)
    }

    fn stats(&self) -> SessionStats {
        SessionStats {
            requests: self.requests.load(Ordering::Relaxed),
            rate_limited: self.rate_limited.load(Ordering::Relaxed),
            bytes_up: self.bytes_up.load(Ordering::Relaxed),
            bytes_down: self.bytes_down.load(Ordering::Relaxed),
            open_tunnels: self.tunnels.load(Ordering::Relaxed),
        }
    }

    fn record_bytes(&self, up: u64, down: u64) {
        self.bytes_up.fetch_add(up, Ordering::Relaxed);
        self.bytes_down.fetch_add(down, Ordering::Relaxed);
    }
}

type Keyed<C> = RateLimiter<u64, DashMapStateStore<u64, FastState>, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// One keyed limiter per distinct quota: sessions of different policies have different quotas.
struct QuotaLimiter<C: Clock> {
    limiter: Keyed<C>,
    /// The quota in words, for [`RateLimited::limit`].
    describe: Box<str>,
    /// A full burst's replenish time, at least [`SESSION_IDLE`]: how long a session using this quota is kept.
    keep_nanos: u64,
}

/// Identifies a quota as configured; the bits of the rate so that it can be hashed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct QuotaKey {
    rps_bits: u64,
    burst: u32,
}

/// Cache-line aligned so that two shards' locks never share a line.
#[repr(align(64))]
#[derive(Default)]
struct Shard(RwLock<HashMap<Arc<str>, Arc<Session>, FastState>>);

/// The limits of every session, shared by all connections.
///
/// Generic over governor's clock so that tests drive time with [`governor::clock::FakeRelativeClock`].
pub struct SessionLimiter<C: Clock = DefaultClock> {
    defaults: LimitDefaults,
    clock: C,
    start: C::Instant,
    shard_hasher: FastState,
    shards: Box<[Shard]>,
    next_id: AtomicU64,
    quotas: RwLock<HashMap<QuotaKey, QuotaLimiter<C>, FastState>>,
}

impl SessionLimiter<DefaultClock> {
    pub fn new(defaults: LimitDefaults) -> Self {
        SessionLimiter::with_clock(defaults, DefaultClock::default())
    }
}

impl<C: Clock + Clone> SessionLimiter<C> {
    pub fn with_clock(defaults: LimitDefaults, clock: C) -> Self {
        let start = clock.now();
        SessionLimiter {
            defaults,
            clock,
            start,
            shard_hasher: FastState::default(),
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            next_id: AtomicU64::new(0),
            quotas: RwLock::new(HashMap::default()),
        }
    }

    pub fn defaults(&self) -> &LimitDefaults {
        &self.defaults
    }

    /// Counts one new CONNECT tunnel or plain-HTTP request of `session` against its quota: the policy's
    /// `requests_per_second` and `burst`, else the server's.
    pub fn check_request(&self, session: &str, policy_limits: &Limits) -> Result<(), RateLimited> {
        let rps = policy_limits.requests_per_second.unwrap_or(self.defaults.requests_per_second);
        let burst = policy_limits.burst.unwrap_or(self.defaults.burst);
        let key = QuotaKey { rps_bits: rps.to_bits(), burst };
        let session = self.session(session, self.now_nanos());
        let quotas = self.quota_map(key, rps, burst);
        let Some(q) = quotas.get(&key).or_else(|| quotas.get(&self.default_key())) else {
            // quota_map leaves the requested or the default quota in the map; allow rather than fail a request
            // on a bookkeeping slip.
            return Ok(());
        };
        session.keep_nanos.store(q.keep_nanos, Ordering::Relaxed);
        match q.limiter.check_key(&session.id) {
            Ok(()) => {
                session.requests.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(not_until) => {
                session.rate_limited.fetch_add(1, Ordering::Relaxed);
                let retry_after = not_until.wait_time_from(self.clock.now());
                Err(RateLimited { retry_after, limit: q.describe.to_string() })
            }
        }
    }

    /// Opens one tunnel for `session` if it has fewer than its `max_tunnels` open; the permit closes it on drop.
    pub fn open_tunnel(&self, session: &str, policy_limits: &Limits) -> Result<TunnelPermit, TooManyTunnels> {
        let max = policy_limits.max_tunnels.unwrap_or(self.defaults.max_tunnels);
        let session = self.session(session, self.now_nanos());
        // Increment only below the cap, so concurrent opens can never overshoot it.
        let opened = session.tunnels.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1));
        match opened {
            Ok(_) => Ok(TunnelPermit { session }),
            Err(_) => Err(TooManyTunnels { max }),
        }
    }

    /// Adds traffic to a session's counters.
    pub fn record_bytes(&self, session: &str, up: u64, down: u64) {
        self.session(session, self.now_nanos()).record_bytes(up, down);
    }

    /// A session's counters, if it is tracked.
    pub fn session_stats(&self, session: &str) -> Option<SessionStats> {
        let shard = self.shard(session).read().unwrap_or_else(PoisonError::into_inner);
        shard.get(session).map(|s| s.stats())
    }

    /// Forgets what no longer matters: rate states that have fully replenished, quotas no session uses, and
    /// sessions idle for [`SESSION_IDLE`] (or their quota's replenish time, if longer) with no tunnel open.
    /// The server calls this periodically; between calls memory grows only with new sessions.
    pub fn housekeeping(&self) {
        {
            let quotas = self.quotas.read().unwrap_or_else(PoisonError::into_inner);
            for q in quotas.values() {
                q.limiter.retain_recent();
                q.limiter.shrink_to_fit();
            }
        }
        {
            // Checks hold the read lock while they use a limiter, so under the write lock an empty limiter
            // stays empty until it is gone: no session's state is dropped mid-use.
            let mut quotas = self.quotas.write().unwrap_or_else(PoisonError::into_inner);
            quotas.retain(|_, q| !q.limiter.is_empty());
            shrink(&mut quotas);
        }
        let now = self.now_nanos();
        for shard in self.shards.iter() {
            // Under the write lock no one can open a tunnel on these sessions, so `tunnels == 0` stays true
            // until they are removed; an open permit holds its own reference and may still drop afterwards.
            let mut map = shard.0.write().unwrap_or_else(PoisonError::into_inner);
            map.retain(|_, s| !s.is_idle(now));
            shrink(&mut map);
        }
    }

    /// How many entries are held.
    pub fn tracked(&self) -> Tracked {
        let quotas = self.quotas.read().unwrap_or_else(PoisonError::into_inner);
        Tracked {
            sessions: self.shards.iter().map(|s| s.0.read().unwrap_or_else(PoisonError::into_inner).len()).sum(),
            rate_states: quotas.values().map(|q| q.limiter.len()).sum(),
            quotas: quotas.len(),
        }
    }

    fn now_nanos(&self) -> u64 {
        self.clock.now().duration_since(self.start).as_u64()
    }

    fn shard(&self, session: &str) -> &RwLock<HashMap<Arc<str>, Arc<Session>, FastState>> {
        // The high bits: the shard maps have their own seeds, but keeping the choice independent of the bucket
        // index costs nothing.
        let h = self.shard_hasher.hash_one(session);
        &self.shards[(h >> 58) as usize % SHARDS].0
    }

    /// The session's entry, created on first sight.
    fn session(&self, name: &str, now: u64) -> Arc<Session> {
        let shard = self.shard(name);
        if let Some(s) = shard.read().unwrap_or_else(PoisonError::into_inner).get(name) {
            s.touch(now);
            return Arc::clone(s);
        }
        let mut map = shard.write().unwrap_or_else(PoisonError::into_inner);
        let s = map
            .entry(Arc::from(name))
            .or_insert_with(|| Arc::new(Session::new(self.next_id.fetch_add(1, Ordering::Relaxed), now)));
        s.touch(now);
        Arc::clone(s)
    }

    fn default_key(&self) -> QuotaKey {
        QuotaKey { rps_bits: self.defaults.requests_per_second.to_bits(), burst: self.defaults.burst }
    }

    /// The quota map, read-locked, holding the limiter for `key` (or, past [`MAX_QUOTAS`], the default quota's).
    fn quota_map(
        &self,
        key: QuotaKey,
        rps: f64,
        burst: u32,
    ) -> std::sync::RwLockReadGuard<'_, HashMap<QuotaKey, QuotaLimiter<C>, FastState>> {
        let quotas = self.quotas.read().unwrap_or_else(PoisonError::into_inner);
        if quotas.contains_key(&key) {
            return quotas;
        }
        drop(quotas);
        {
            let mut quotas = self.quotas.write().unwrap_or_else(PoisonError::into_inner);
            if !quotas.contains_key(&key) {
                if quotas.len() >= MAX_QUOTAS {
                    quotas.retain(|_, q| !q.limiter.is_empty());
                }
                let (key, rps, burst) = if quotas.len() < MAX_QUOTAS {
                    (key, rps, burst)
                } else {
                    tracing::warn!(
                        max = MAX_QUOTAS,
                        requests_per_second = rps,
                        burst,
                        "too many distinct rate quotas in use; applying the server's default quota"
                    );
                    (self.default_key(), self.defaults.requests_per_second, self.defaults.burst)
                };
                quotas.entry(key).or_insert_with(|| self.quota_limiter(rps, burst));
            }
        }
        self.quotas.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn quota_limiter(&self, rps: f64, burst: u32) -> QuotaLimiter<C> {
        let quota = effective_quota(rps, burst);
        QuotaLimiter {
            limiter: RateLimiter::dashmap_with_clock_and_hasher(quota, self.clock.clone(), FastState::default()),
            describe: describe(rps, burst).into(),
            keep_nanos: duration_nanos(quota.burst_size_replenished_in()).max(duration_nanos(SESSION_IDLE)),
        }
    }
}

impl<C: Clock> fmt::Debug for SessionLimiter<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionLimiter").field("defaults", &self.defaults).finish_non_exhaustive()
    }
}

/// One open tunnel of a session; dropping it closes the tunnel's slot.
#[derive(Debug)]
pub struct TunnelPermit {
    session: Arc<Session>,
}

impl TunnelPermit {
    /// Adds the tunnel's traffic to its session's counters, even if housekeeping has since forgotten the session.
    pub fn record_bytes(&self, up: u64, down: u64) {
        self.session.record_bytes(up, down);
    }
}

impl Drop for TunnelPermit {
    fn drop(&mut self) {
        self.session.tunnels.fetch_sub(1, Ordering::AcqRel);
    }
}

fn describe(rps: f64, burst: u32) -> String {
    let unit = if rps == 1.0 { "request" } else { "requests" };
    format!("{rps} {unit} per second, burst {burst}")
}

/// The governor quota for `rps` and `burst`, kept within what governor's u64 nanoseconds can count. Policies and
/// the server config only admit positive rates and bursts; anything else gets the slowest quota (fail closed).
fn effective_quota(rps: f64, burst: u32) -> Quota {
    let period = if rps > 0.0 { (1e9 / rps).clamp(1.0, MAX_PERIOD_NANOS as f64) as u64 } else { MAX_PERIOD_NANOS };
    let burst = burst.clamp(1, u32::try_from(MAX_WINDOW_NANOS / period).unwrap_or(u32::MAX).max(1));
    let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
    // `period` is at least 1ns, so governor accepts it; the fallback only satisfies the type.
    Quota::with_period(Duration::from_nanos(period)).unwrap_or(Quota::per_second(NonZeroU32::MIN)).allow_burst(burst)
}

fn duration_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Gives memory back once a map is mostly empty, not on every pass: shrinking reallocates.
fn shrink<K: std::hash::Hash + Eq, V>(map: &mut HashMap<K, V, FastState>) {
    if map.capacity() > 64 && map.len() < map.capacity() / 4 {
        map.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Barrier;

    use governor::clock::FakeRelativeClock;

    use super::*;

    fn limiter() -> (SessionLimiter<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        (SessionLimiter::with_clock(LimitDefaults::default(), clock.clone()), clock)
    }

    fn none() -> Limits {
        Limits::default()
    }

    fn refused(retry_ms: u64, limit: &str) -> Result<(), RateLimited> {
        Err(RateLimited { retry_after: Duration::from_millis(retry_ms), limit: limit.into() })
    }

    /// Sends `n` requests at the current instant and returns the refusals.
    fn burst(l: &SessionLimiter<FakeRelativeClock>, session: &str, limits: &Limits, n: usize) -> Vec<RateLimited> {
        (0..n).filter_map(|_| l.check_request(session, limits).err()).collect()
    }

    const DEFAULT: &str = "20 requests per second, burst 40";

    #[test]
    fn a_burst_beyond_the_quota_is_refused_exactly() {
        let (l, _) = limiter();
        let refusals = burst(&l, "s1", &none(), 50);
        // 40 pass; 20 rps means the 41st waits one 50ms slot, and the bucket stays empty however often it is asked.
        let expected = RateLimited { retry_after: Duration::from_millis(50), limit: DEFAULT.into() };
        assert_eq!(refusals, vec![expected; 10]);
        let stats = l.session_stats("s1");
        assert_eq!(stats, Some(SessionStats { requests: 40, rate_limited: 10, ..SessionStats::default() }));
    }

    #[test]
    fn retry_after_counts_down_and_the_session_recovers() {
        let (l, clock) = limiter();
        assert!(burst(&l, "s1", &none(), 40).is_empty());
        assert_eq!(l.check_request("s1", &none()), refused(50, DEFAULT));
        clock.advance(Duration::from_millis(20));
        assert_eq!(l.check_request("s1", &none()), refused(30, DEFAULT));
        clock.advance(Duration::from_millis(30));
        // Exactly one slot has replenished.
        assert_eq!(l.check_request("s1", &none()), Ok(()));
        assert_eq!(l.check_request("s1", &none()), refused(50, DEFAULT));
        // A full burst takes 40 × 50ms to come back.
        clock.advance(Duration::from_secs(2));
        assert_eq!(burst(&l, "s1", &none(), 41).len(), 1);
    }

    #[test]
    fn another_session_at_the_same_time_is_not_refused() {
        let (l, _) = limiter();
        assert_eq!(burst(&l, "s1", &none(), 100).len(), 60);
        assert_eq!(burst(&l, "s2", &none(), 40), vec![]);
    }

    #[test]
    fn different_policies_quotas_are_independent() {
        let (l, clock) = limiter();
        let slow = Limits { requests_per_second: Some(1.0), burst: Some(2), max_tunnels: None };
        let fast = Limits { requests_per_second: Some(1000.0), burst: Some(500), max_tunnels: None };
        assert_eq!(l.check_request("a", &slow), Ok(()));
        assert_eq!(l.check_request("a", &slow), Ok(()));
        assert_eq!(l.check_request("a", &slow), refused(1000, "1 request per second, burst 2"));
        assert_eq!(burst(&l, "b", &fast, 500), vec![]);
        assert_eq!(l.check_request("b", &fast), refused(1, "1000 requests per second, burst 500"));
        assert_eq!(burst(&l, "c", &none(), 40), vec![]);
        assert_eq!(burst(&l, "d", &slow, 2), vec![]);
        assert_eq!(l.tracked(), Tracked { sessions: 4, rate_states: 4, quotas: 3 });
        clock.advance(Duration::from_secs(1));
        assert_eq!(l.check_request("a", &slow), Ok(()));
        assert_eq!(l.check_request("a", &slow), refused(1000, "1 request per second, burst 2"));
    }

    #[test]
    fn a_policy_may_set_only_some_limits() {
        let (l, _) = limiter();
        let burst_only = Limits { requests_per_second: None, burst: Some(3), max_tunnels: None };
        assert_eq!(
            burst(&l, "s1", &burst_only, 4),
            vec![RateLimited {
                retry_after: Duration::from_millis(50),
                limit: "20 requests per second, burst 3".into()
            }]
        );
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        let at = |ms| RateLimited { retry_after: Duration::from_millis(ms), limit: DEFAULT.into() };
        assert_eq!(at(50).retry_after_secs(), 1);
        assert_eq!(at(2000).retry_after_secs(), 2);
        assert_eq!(at(2001).retry_after_secs(), 3);
        assert_eq!(
            at(50).to_string(),
            "rate limit of 20 requests per second, burst 40 reached; retry in 50ms (a policy raises it with \
             requests_per_second and burst in [limits])"
        );
    }

    #[test]
    fn max_tunnels_holds_and_permits_release_on_drop() {
        let (l, _) = limiter();
        let three = Limits { max_tunnels: Some(3), ..Limits::default() };
        let mut permits: Vec<TunnelPermit> = (0..3).filter_map(|_| l.open_tunnel("s1", &three).ok()).collect();
        assert_eq!(permits.len(), 3);
        assert_eq!(l.open_tunnel("s1", &three).err(), Some(TooManyTunnels { max: 3 }));
        assert_eq!(l.open_tunnel("s2", &three).map(|_| ()).err(), None);
        assert_eq!(l.session_stats("s1").map(|s| s.open_tunnels), Some(3));
        permits.pop();
        assert_eq!(l.session_stats("s1").map(|s| s.open_tunnels), Some(2));
        assert!(l.open_tunnel("s1", &three).is_ok());
        drop(permits);
        assert_eq!(l.session_stats("s1").map(|s| s.open_tunnels), Some(0));
        assert_eq!(
            TooManyTunnels { max: 3 }.to_string(),
            "session already has 3 open tunnels, the most it may have at once; close some, or raise max_tunnels \
             in the policy's [limits]"
        );
    }

    #[test]
    fn max_tunnels_holds_across_threads() {
        let (l, _) = limiter();
        let ten = Limits { max_tunnels: Some(10), ..Limits::default() };
        let barrier = Barrier::new(4);
        let (opened, refused): (Vec<usize>, Vec<usize>) = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    scope.spawn(|| {
                        barrier.wait();
                        let results: Vec<_> = (0..10).map(|_| l.open_tunnel("s1", &ten)).collect();
                        // Hold every permit until all threads have tried, so the cap is what stops them.
                        barrier.wait();
                        let opened = results.iter().filter(|r| r.is_ok()).count();
                        (opened, results.len() - opened)
                    })
                })
                .collect();
            handles.into_iter().filter_map(|h| h.join().ok()).unzip()
        });
        assert_eq!(opened.iter().sum::<usize>(), 10);
        assert_eq!(refused.iter().sum::<usize>(), 30);
        assert_eq!(l.session_stats("s1").map(|s| s.open_tunnels), Some(0));
        assert_eq!(l.open_tunnel("s1", &ten).map(|_| ()).err(), None);
    }

    #[test]
    fn housekeeping_forgets_idle_sessions() {
        let (l, clock) = limiter();
        for i in 0..1000 {
            assert_eq!(l.check_request(&format!("s{i}"), &none()), Ok(()));
        }
        let permit = l.open_tunnel("busy", &none());
        assert!(permit.is_ok());
        assert_eq!(l.tracked(), Tracked { sessions: 1001, rate_states: 1000, quotas: 1 });
        l.housekeeping();
        assert_eq!(l.tracked(), Tracked { sessions: 1001, rate_states: 1000, quotas: 1 });

        // Replenished rate states go first; the counters stay for SESSION_IDLE.
        clock.advance(Duration::from_secs(3));
        l.housekeeping();
        assert_eq!(l.tracked(), Tracked { sessions: 1001, rate_states: 0, quotas: 0 });
        assert_eq!(l.session_stats("s7").map(|s| s.requests), Some(1));

        clock.advance(SESSION_IDLE);
        l.housekeeping();
        assert_eq!(l.tracked(), Tracked { sessions: 1, rate_states: 0, quotas: 0 });
        assert_eq!(l.session_stats("s7"), None);

        // An open tunnel keeps its session; once closed, the session goes like any other.
        drop(permit);
        clock.advance(SESSION_IDLE);
        l.housekeeping();
        assert_eq!(l.tracked(), Tracked::default());

        // A forgotten session starts afresh.
        assert_eq!(burst(&l, "s7", &none(), 40), vec![]);
    }

    #[test]
    fn housekeeping_never_resets_a_slow_quota() {
        let (l, clock) = limiter();
        // One request per 1000s: a full burst of 5 takes longer than SESSION_IDLE to come back.
        let slow = Limits { requests_per_second: Some(0.001), burst: Some(5), max_tunnels: None };
        assert_eq!(burst(&l, "s1", &slow, 6).len(), 1);
        clock.advance(SESSION_IDLE + Duration::from_secs(1));
        l.housekeeping();
        assert_eq!(l.tracked(), Tracked { sessions: 1, rate_states: 1, quotas: 1 });
        // The sixth slot opens at 1000s: a forgotten state would have let this through.
        assert_eq!(l.check_request("s1", &slow), refused(399_000, "0.001 requests per second, burst 5"));
        clock.advance(Duration::from_secs(399));
        assert_eq!(l.check_request("s1", &slow), Ok(()));
        assert_eq!(l.check_request("s1", &slow), refused(1_000_000, "0.001 requests per second, burst 5"));
        // Governor forgets a state one slot after it has fully replenished.
        clock.advance(Duration::from_secs(6000));
        l.housekeeping();
        assert_eq!(l.tracked(), Tracked::default());
    }

    #[test]
    fn counts_requests_and_bytes() {
        let (l, _) = limiter();
        assert_eq!(l.session_stats("s1"), None);
        assert_eq!(l.check_request("s1", &none()), Ok(()));
        l.record_bytes("s1", 10, 200);
        let permit = l.open_tunnel("s1", &none());
        if let Ok(p) = &permit {
            p.record_bytes(5, 7);
        }
        assert_eq!(
            l.session_stats("s1"),
            Some(SessionStats { requests: 1, rate_limited: 0, bytes_up: 15, bytes_down: 207, open_tunnels: 1 })
        );
    }

    #[test]
    fn extreme_quotas_neither_panic_nor_overflow() {
        let (l, clock) = limiter();
        for (i, rps) in [1e-300, f64::MIN_POSITIVE, 1e300, f64::INFINITY, f64::NAN, 0.0, -1.0].into_iter().enumerate() {
            for b in [0, 1, u32::MAX] {
                let limits = Limits { requests_per_second: Some(rps), burst: Some(b), max_tunnels: Some(0) };
                let session = format!("s{i}-{b}");
                let first = l.check_request(&session, &limits);
                assert_eq!(first, Ok(()), "rps {rps}, burst {b}");
                assert_eq!(l.open_tunnel(&session, &limits).err(), Some(TooManyTunnels { max: 0 }));
            }
        }
        clock.advance(Duration::from_secs(1));
        l.housekeeping();
    }

    #[test]
    fn limit_defaults_parse_with_defaults_and_refuse_mistakes() {
        let parse = |s: &str| toml::from_str::<LimitDefaults>(s).map_err(|e| e.to_string());
        assert_eq!(parse(""), Ok(LimitDefaults::default()));
        assert_eq!(
            parse("requests_per_second = 5.5\nmax_tunnels = 8"),
            Ok(LimitDefaults { requests_per_second: 5.5, burst: 40, max_tunnels: 8 })
        );
        let err = |s: &str| parse(s).err().unwrap_or_default();
        assert!(err("bursts = 3").contains("unknown field `bursts`"), "{}", err("bursts = 3"));
        assert!(err("burst = 0").contains("burst must be at least 1, not 0"), "{}", err("burst = 0"));
        assert!(err("burst = -1").contains("invalid value: integer `-1`"), "{}", err("burst = -1"));
        assert!(
            err("requests_per_second = 0.0").contains("requests_per_second must be a positive number, not 0"),
            "{}",
            err("requests_per_second = 0.0")
        );
        assert!(err("max_tunnels = 0").contains("max_tunnels must be at least 1"), "{}", err("max_tunnels = 0"));
    }

    #[test]
    fn the_limiter_is_shared_between_tasks() {
        fn shared<T: Send + Sync>() {}
        shared::<SessionLimiter>();
        shared::<SessionLimiter<FakeRelativeClock>>();
        shared::<TunnelPermit>();
    }
}
