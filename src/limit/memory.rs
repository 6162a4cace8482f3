//! The in-memory limiter: one process's sessions, their request rates (governor's GCRA, its state kept in the
//! session's own entry), their open tunnels, their byte counters and (for sessions that have byte limits) their
//! byte budgets, sharded so that sessions rarely share a lock.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock, Reference};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::StateStore;
use governor::{Quota, RateLimiter};
use serde::Serialize;

use super::budget::{Budget, ByteLimits, TimeSource};
use super::{
    Answer, ByteBudget, ByteCounter, ByteCounts, ByteMeter, Lease, LimitKey, Limited, Limiter, QuotaExceeded,
    RateLimited, SessionStats, TooManyTunnels, TunnelSlot,
};
use crate::config::LimitDefaults;
use crate::policy::Limits;

/// How long a session with no open tunnel and no request is remembered, with its counters, before housekeeping
/// forgets it.
pub const SESSION_IDLE: Duration = Duration::from_secs(10 * 60);

/// Distinct quotas (one keyed limiter each) over the server's life. Quotas come from policies, so this is far above
/// any real deployment; past it a new quota is replaced by the server's default rather than growing memory.
pub const MAX_QUOTAS: usize = 256;

/// Longest interval between two requests a quota can express. Governor counts in u64 nanoseconds, and a slower
/// quota would only ever matter to a session that lives for a year.
const MAX_PERIOD_NANOS: u64 = 365 * 24 * 3600 * 1_000_000_000;
/// Longest time a full burst may take to replenish, again to keep governor's u64 nanosecond arithmetic in range.
const MAX_WINDOW_NANOS: u64 = 100 * MAX_PERIOD_NANOS;

/// Session maps are sharded so concurrent connections of different sessions rarely touch the same lock.
const SHARDS: usize = 64;

/// How many entries the limiter holds: what housekeeping keeps bounded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Tracked {
    pub sessions: usize,
    /// Per-session rate states, summed over every quota.
    pub rate_states: usize,
    pub quotas: usize,
}

/// A session's [`LimitKey`] hashed with the limiter's secret seed: the key of its entry.
/// Two live sessions share limits only if their 64-bit hashes collide, about n²/2⁶⁵ for n sessions (1 in 10⁸ at
/// a million); in exchange a check hashes the name once, never allocates and never compares strings.
type SessionKey = u64;

/// Hands a [`SessionKey`] to the maps unchanged: it already is a well-mixed hash.
#[derive(Clone, Copy, Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys are hashed here; fold anything else rather than ignore it.
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type KeyState = BuildHasherDefault<KeyHasher>;

/// One session's entry, inline in its shard's map: only what every request touches. With its key the bucket is
/// 32 bytes, so it never straddles two cache lines (at 48 bytes half the buckets did): a check over many
/// sessions misses the cache once for the bucket, not one and a half times. Its fields are plain: they change
/// only under the shard's lock, which a check takes anyway, so an allowed check costs the lock and nothing more
/// (no atomic read-modify-write of its own).
#[derive(Debug)]
struct Session {
    /// The request rate's GCRA state: its theoretical arrival time, in nanoseconds on the limiter's timeline
    /// (0: none yet, or replenished and cleared by housekeeping). Kept here rather than in a keyed store of
    /// governor's own so that a check finds the session once. Any quota reads a `tat` at or before now as no
    /// state at all, so housekeeping clears it then without knowing which quota wrote it.
    tat: u64,
    /// Requests allowed, modulo 2³²: housekeeping folds them into [`Shared::requests`] on every pass (no session
    /// makes 2³² requests between two passes), so the hot count stays 4 bytes.
    requests: u32,
    /// The rarely touched part, shared with the session's leases and meters.
    shared: Arc<Shared>,
}

// The bucket (key and entry) is what a check misses the cache for: keep it at half a cache line.
const _: () = assert!(std::mem::size_of::<(SessionKey, Session)>() == 32);

/// A session's counters that its leases and meters update after the check, wherever they are.
#[derive(Debug, Default)]
struct Shared {
    /// Nanoseconds since the limiter started at which housekeeping last saw the session active (a request
    /// or refusal since its previous pass, or a tunnel open), or at which it was created. Kept by housekeeping
    /// rather than by every check, which would read the clock once more.
    last_seen: AtomicU64,
    /// Requests allowed up to the entry's count [`Shared::requests_mark`], as of housekeeping's last pass.
    requests: AtomicU64,
    /// The entry's (wrapping) request count at housekeeping's last pass.
    requests_mark: AtomicU32,
    /// `rate_limited` at housekeeping's last pass: a change is activity.
    refused_mark: AtomicU64,
    tunnels: AtomicU32,
    rate_limited: AtomicU64,
    /// What the session's tunnels and requests report to through their meters, so its counts are live.
    bytes: ByteCounts,
    /// The session's shaping and quotas, made when it first moves bytes under byte limits; replaced (keeping
    /// what its quotas counted) when its policy's limits change. Sessions without byte limits never lock it.
    budget: Mutex<Option<Arc<Budget>>>,
}

impl Shared {
    /// A meter on this session's counters, in its entry, with `budget` when it has one.
    fn meter(self: &Arc<Self>, budget: Option<Arc<Budget>>) -> ByteMeter {
        let counter: Arc<dyn ByteCounter> = self.clone();
        ByteMeter::with_budget(counter, budget.map(|b| b as Arc<dyn ByteBudget>))
    }

    /// The session's budget under `limits`: the one it has if the limits are the same, else a new one that
    /// keeps what the old one counted.
    fn budget(&self, limits: &ByteLimits, time: &Arc<dyn TimeSource>) -> Arc<Budget> {
        let mut slot = self.budget.lock().unwrap_or_else(PoisonError::into_inner);
        match &*slot {
            Some(b) if b.limits() == limits => b.clone(),
            old => {
                let new = Arc::new(match old {
                    Some(old) => Budget::replacing(*limits, old),
                    None => Budget::new(*limits, time.clone()),
                });
                *slot = Some(new.clone());
                new
            }
        }
    }

    fn current_budget(&self) -> Option<Arc<Budget>> {
        self.budget.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

impl ByteCounter for Shared {
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

/// A session's lease is a place in its tunnel count.
impl TunnelSlot for Shared {
    fn release(&self) {
        self.tunnels.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Session {
    fn new(now: u64) -> Self {
        let shared = Shared { last_seen: AtomicU64::new(now), ..Shared::default() };
        Session { tat: 0, requests: 0, shared: Arc::new(shared) }
    }

    /// Every request the session was allowed: what housekeeping folded, plus what the entry counted since.
    fn requests(&self) -> u64 {
        let since = self.requests.wrapping_sub(self.shared.requests_mark.load(Ordering::Relaxed));
        self.shared.requests.load(Ordering::Relaxed) + u64::from(since)
    }

    /// Housekeeping's pass over the entry (under its shard's lock): folds the request count and says whether the
    /// session was active since the last pass.
    fn fold(&self) -> bool {
        let shared = &self.shared;
        let count = self.requests;
        let since = count.wrapping_sub(shared.requests_mark.swap(count, Ordering::Relaxed));
        shared.requests.fetch_add(u64::from(since), Ordering::Relaxed);
        let refused = shared.rate_limited.load(Ordering::Relaxed);
        let refused_before = shared.refused_mark.swap(refused, Ordering::Relaxed);
        since != 0 || refused != refused_before
    }

    fn stats(&self) -> SessionStats {
        let (bytes_up, bytes_down) = self.shared.bytes.totals();
        let budget = self.shared.current_budget();
        SessionStats {
            requests: self.requests(),
            rate_limited: self.shared.rate_limited.load(Ordering::Relaxed),
            bytes_up,
            bytes_down,
            open_tunnels: self.shared.tunnels.load(Ordering::Relaxed),
            shaping_wait_ms: budget.as_ref().map_or(0, |b| b.waited().as_millis() as u64),
            upload_quota_used: budget.as_ref().and_then(|b| b.used(super::Direction::Up)),
            download_quota_used: budget.as_ref().and_then(|b| b.used(super::Direction::Down)),
        }
    }

    /// Whether forgetting the session would hand it a fresh quota: it has counted bytes in a window that
    /// has not ended.
    fn holds_quota(&self) -> bool {
        self.shared.current_budget().is_some_and(|b| {
            [super::Direction::Up, super::Direction::Down].into_iter().any(|d| b.used(d).is_some_and(|u| u > 0))
        })
    }
}

type Keyed<C> = RateLimiter<SessionKey, EntryStore<C>, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// One keyed limiter per distinct quota: sessions of different policies have different quotas.
struct QuotaLimiter<C: Clock> {
    key: QuotaKey,
    limiter: Keyed<C>,
    /// The quota in words, for [`RateLimited::limit`].
    describe: Box<str>,
}

/// Identifies a quota as configured; the bits of the rate so that it can be hashed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct QuotaKey {
    rps_bits: u64,
    burst: u32,
}

/// The server's default quota always sits in the first slot, so there is always a quota to fall back to.
const DEFAULT_SLOT: u32 = 0;

type SessionMap = HashMap<SessionKey, Session, KeyState>;

/// Cache-line aligned so that two shards' locks never share a line. A mutex, not a read-write lock: a check
/// changes its entry anyway, and a mutex costs it one atomic read-modify-write to lock and one to unlock, where
/// a read lock plus atomic fields cost four.
#[repr(align(64))]
#[derive(Default)]
struct Shard(Mutex<SessionMap>);

impl Shard {
    fn lock(&self) -> MutexGuard<'_, SessionMap> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn shard(shards: &[Shard], key: SessionKey) -> &Shard {
    // Middle bits: hashbrown indexes buckets by the low bits and tags them with the top seven.
    &shards[(key >> 32) as usize % SHARDS]
}

/// Runs `f` on the session's entry, created (at `now`) on first sight, under its shard's lock.
fn with_session<R>(
    shards: &[Shard],
    key: SessionKey,
    now: impl FnOnce() -> u64,
    f: impl FnOnce(&mut Session) -> R,
) -> R {
    f(shard(shards, key).lock().entry(key).or_insert_with(|| Session::new(now())))
}

/// Where one quota's governor limiter keeps its states: in the sessions' entries, so that a request check is one
/// lookup under one lock. Every quota's store writes the same `tat`, on the limiter's timeline, so a session whose
/// policy changes carries its debt to the new quota.
struct EntryStore<C: Clock> {
    shards: Arc<[Shard]>,
    clock: C,
    /// The limiter's start: `last_seen` and `tat` count from it (the clock is read here only for a new entry).
    start: C::Instant,
    /// Nanoseconds from the limiter's start to this quota limiter's (governor's states count from its own).
    offset: u64,
}

impl<C: Clock> StateStore for EntryStore<C> {
    type Key = SessionKey;

    fn measure_and_replace<T, F, E>(&self, key: &SessionKey, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let now = || self.clock.now().duration_since(self.start).as_u64();
        with_session(&self.shards, *key, now, |s| {
            // A state from before this quota limiter started is in its past: the same as none.
            let prior = (s.tat > self.offset).then(|| Nanos::from(s.tat - self.offset));
            match f(prior) {
                Ok((allowed, next)) => {
                    s.tat = self.offset.saturating_add(next.as_u64()).max(1);
                    s.requests = s.requests.wrapping_add(1);
                    Ok(allowed)
                }
                Err(refused) => {
                    s.shared.rate_limited.fetch_add(1, Ordering::Relaxed);
                    Err(refused)
                }
            }
        })
    }
}

/// The limits of every session, shared by all connections.
///
/// Generic over governor's clock so that tests drive time with [`governor::clock::FakeRelativeClock`].
pub struct MemoryLimiter<C: Clock = DefaultClock> {
    defaults: LimitDefaults,
    clock: C,
    start: C::Instant,
    /// Seeded per limiter, so no one can aim session names at a collision.
    key_hasher: foldhash::quality::RandomState,
    shards: Arc<[Shard]>,
    /// Quota limiters live in fixed slots that are filled once, in order, and never emptied, so a check finds its
    /// limiter without a lock; [`MAX_QUOTAS`] bounds them.
    quotas: Box<[OnceLock<QuotaLimiter<C>>]>,
    /// Which slot holds which quota; locked only when a quota is first met.
    quota_index: Mutex<HashMap<QuotaKey, u32, foldhash::fast::RandomState>>,
    /// The clock byte budgets shape and count windows by: the same clock as the rates.
    time: Arc<dyn TimeSource>,
}

/// Governor's clock as a budget's [`TimeSource`]: Unix seconds are the wall clock at start plus the clock's
/// elapsed time, so a fake clock moves windows too.
struct GovernorTime<C: Clock> {
    clock: C,
    start: C::Instant,
    start_unix_nanos: u64,
}

impl<C: Clock> fmt::Debug for GovernorTime<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GovernorTime").field("start_unix_nanos", &self.start_unix_nanos).finish_non_exhaustive()
    }
}

impl<C> TimeSource for GovernorTime<C>
where
    C: Clock + Send + Sync,
    C::Instant: Send + Sync,
{
    fn nanos(&self) -> u64 {
        self.clock.now().duration_since(self.start).as_u64()
    }

    fn unix_at(&self, nanos: u64) -> u64 {
        self.start_unix_nanos.saturating_add(nanos) / 1_000_000_000
    }
}

impl MemoryLimiter<DefaultClock> {
    pub fn new(defaults: LimitDefaults) -> Self {
        MemoryLimiter::with_clock(defaults, DefaultClock::default())
    }
}

impl<C> MemoryLimiter<C>
where
    C: Clock + Clone + Send + Sync + 'static,
    C::Instant: Send + Sync,
{
    pub fn with_clock(defaults: LimitDefaults, clock: C) -> Self {
        let unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        MemoryLimiter::with_clock_at(defaults, clock, u64::try_from(unix.as_nanos()).unwrap_or(u64::MAX))
    }

    /// A limiter whose `clock` reads as Unix time `start_unix_nanos` now: tests put quota windows where
    /// they want them.
    pub fn with_clock_at(defaults: LimitDefaults, clock: C, start_unix_nanos: u64) -> Self {
        let start = clock.now();
        let time: Arc<dyn TimeSource> = Arc::new(GovernorTime { clock: clock.clone(), start, start_unix_nanos });
        let limiter = MemoryLimiter {
            time,
            defaults,
            clock,
            start,
            key_hasher: foldhash::quality::RandomState::default(),
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            quotas: (0..MAX_QUOTAS).map(|_| OnceLock::new()).collect(),
            quota_index: Mutex::new(HashMap::default()),
        };
        let (rps, burst) = (limiter.defaults.requests_per_second, limiter.defaults.burst);
        let default = limiter.quota_slot(QuotaKey { rps_bits: rps.to_bits(), burst }, rps, burst);
        debug_assert_eq!(default, DEFAULT_SLOT);
        limiter
    }

    pub fn defaults(&self) -> &LimitDefaults {
        &self.defaults
    }

    /// [`Limiter::check_request`], answered at once: counts one new CONNECT tunnel or plain-HTTP request of
    /// `session` against its quota, the policy's `requests_per_second` and `burst`, else the server's.
    pub fn check_now(&self, session: &LimitKey, policy_limits: &Limits) -> Result<(), RateLimited> {
        let rps = policy_limits.requests_per_second.unwrap_or(self.defaults.requests_per_second);
        let burst = policy_limits.burst.unwrap_or(self.defaults.burst);
        let quota_key = QuotaKey { rps_bits: rps.to_bits(), burst };
        // The filled slots are a prefix, nearly always a handful long: scanned without a lock.
        let q = match self.quotas.iter().map_while(OnceLock::get).find(|q| q.key == quota_key) {
            Some(q) => q,
            None => match self.quota(self.quota_slot(quota_key, rps, burst)) {
                Some(q) => q,
                // quota_slot only returns filled slots; allow rather than fail a request on a slip.
                None => return Ok(()),
            },
        };
        // The store counts the request, or the refusal, in the session's entry.
        q.limiter.check_key(&self.key(session)).map_err(|not_until| RateLimited {
            retry_after: not_until.wait_time_from(self.clock.now()),
            limit: q.describe.to_string(),
        })
    }

    /// [`Limiter::open_tunnel`], answered at once: a lease on one of `session`'s `max_tunnels` places, if it
    /// has fewer open; the lease gives the place back on drop.
    pub fn open_tunnel_now(&self, session: &LimitKey, policy_limits: &Limits) -> Result<Lease, TooManyTunnels> {
        let max = policy_limits.max_tunnels.unwrap_or(self.defaults.max_tunnels);
        let bytes = ByteLimits::resolve(policy_limits, &self.defaults);
        self.with_session(self.key(session), |s| {
            // Increment only below the cap, so concurrent opens can never overshoot it.
            let opened =
                s.shared.tunnels.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1));
            match opened {
                Ok(_) => {
                    let slot: Arc<dyn TunnelSlot> = s.shared.clone();
                    let budget =
                        (!bytes.is_unlimited()).then(|| s.shared.budget(&bytes, &self.time) as Arc<dyn ByteBudget>);
                    Ok(Lease::with_budget(slot, budget))
                }
                Err(_) => Err(TooManyTunnels { max }),
            }
        })
    }

    /// [`Limiter::check_quota`], answered at once: refused while a quota of `session` is spent.
    pub fn check_quota_now(&self, session: &LimitKey, policy_limits: &Limits) -> Result<(), QuotaExceeded> {
        let bytes = ByteLimits::resolve(policy_limits, &self.defaults);
        if !bytes.has_quota() {
            return Ok(());
        }
        match self.with_session(self.key(session), |s| s.shared.budget(&bytes, &self.time).spent()) {
            Some(spent) => Err(spent),
            None => Ok(()),
        }
    }

    /// The Unix time (seconds) on this limiter's clock: what quota windows are counted in.
    pub fn unix_now(&self) -> u64 {
        self.time.unix()
    }

    /// How many entries are held.
    pub fn tracked(&self) -> Tracked {
        let (mut sessions, mut rate_states) = (0, 0);
        for shard in self.shards.iter() {
            let map = shard.lock();
            sessions += map.len();
            rate_states += map.values().filter(|s| s.tat != 0).count();
        }
        Tracked { sessions, rate_states, quotas: self.quotas.iter().filter_map(OnceLock::get).count() }
    }

    fn now_nanos(&self) -> u64 {
        self.clock.now().duration_since(self.start).as_u64()
    }

    fn key(&self, session: &LimitKey) -> SessionKey {
        self.key_hasher.hash_one(session.as_str())
    }

    fn with_session<R>(&self, key: SessionKey, f: impl FnOnce(&mut Session) -> R) -> R {
        with_session(&self.shards, key, || self.now_nanos(), f)
    }

    fn quota(&self, slot: u32) -> Option<&QuotaLimiter<C>> {
        self.quotas.get(slot as usize).and_then(OnceLock::get)
    }

    /// The slot holding the limiter for `key`, filled on first use; past [`MAX_QUOTAS`], the default quota's.
    fn quota_slot(&self, key: QuotaKey, rps: f64, burst: u32) -> u32 {
        let mut index = self.quota_index.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(&slot) = index.get(&key) {
            return slot;
        }
        let slot = index.len();
        let Some(cell) = self.quotas.get(slot) else {
            tracing::warn!(
                max = MAX_QUOTAS,
                requests_per_second = rps,
                burst,
                "too many distinct rate quotas; applying the server's default quota"
            );
            return DEFAULT_SLOT;
        };
        let slot = u32::try_from(slot).unwrap_or(DEFAULT_SLOT);
        let quota = effective_quota(rps, burst);
        let store = EntryStore {
            shards: self.shards.clone(),
            clock: self.clock.clone(),
            start: self.start,
            offset: self.now_nanos(),
        };
        // The index lock is held, so no one else fills this slot; governor's limiter starts now, at `offset`.
        let _ = cell.set(QuotaLimiter {
            key,
            limiter: RateLimiter::new(quota, store, self.clock.clone()),
            describe: describe(rps, burst).into(),
        });
        index.insert(key, slot);
        slot
    }
}

impl<C: Clock> fmt::Debug for MemoryLimiter<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryLimiter").field("defaults", &self.defaults).finish_non_exhaustive()
    }
}

impl<C> Limiter for MemoryLimiter<C>
where
    C: Clock + Clone + Send + Sync + 'static,
    C::Instant: Send + Sync,
{
    fn check_request(&self, session: &LimitKey, limits: &Limits) -> Answer<'_, Result<(), Limited<RateLimited>>> {
        Answer::ready(self.check_now(session, limits).map_err(Limited::Over))
    }

    fn open_tunnel(&self, session: &LimitKey, limits: &Limits) -> Answer<'_, Result<Lease, Limited<TooManyTunnels>>> {
        Answer::ready(self.open_tunnel_now(session, limits).map_err(Limited::Over))
    }

    fn check_quota(&self, session: &LimitKey, limits: &Limits) -> Answer<'_, Result<(), QuotaExceeded>> {
        Answer::ready(self.check_quota_now(session, limits))
    }

    fn meter(&self, session: &LimitKey, limits: &Limits) -> ByteMeter {
        let bytes = ByteLimits::resolve(limits, &self.defaults);
        self.with_session(self.key(session), |s| {
            let budget = (!bytes.is_unlimited()).then(|| s.shared.budget(&bytes, &self.time));
            s.shared.meter(budget)
        })
    }

    fn session_stats(&self, session: &LimitKey) -> Option<SessionStats> {
        let key = self.key(session);
        shard(&self.shards, key).lock().get(&key).map(Session::stats)
    }

    /// Forgets what no longer matters: rate states that have fully replenished, and sessions idle for
    /// [`SESSION_IDLE`] with no tunnel open and no rate state, so forgetting a session never hands it a fresh
    /// burst. The server calls this periodically; between calls memory grows only with new sessions.
    fn housekeeping(&self) {
        let now = self.now_nanos();
        let idle = u64::try_from(SESSION_IDLE.as_nanos()).unwrap_or(u64::MAX);
        for shard in self.shards.iter() {
            // Under the shard's lock no one can open a tunnel on these sessions, so `tunnels == 0` stays true
            // until they are removed; an open lease holds its own counters and may still drop afterwards.
            // Checks take the same lock, so no state changes under this one.
            let mut map = shard.lock();
            map.retain(|_, s| {
                let active = s.fold();
                let open = s.shared.tunnels.load(Ordering::Acquire) > 0;
                if active || open {
                    s.shared.last_seen.store(now, Ordering::Relaxed);
                }
                // Governor reads a missing state as one whose `tat` is now, and a `tat` at or before now the same
                // way (the request is allowed and the next `tat` is now plus one interval): under every quota,
                // such a state is indistinguishable from none, and checks later than this pass see a later now.
                if s.tat <= now {
                    s.tat = 0;
                }
                let since = now.saturating_sub(s.shared.last_seen.load(Ordering::Relaxed));
                open || since < idle || s.tat != 0 || s.holds_quota()
            });
            // Give memory back once a map is mostly empty, not on every pass: shrinking reallocates.
            if map.capacity() > 64 && map.len() < map.capacity() / 4 {
                map.shrink_to_fit();
            }
        }
    }
}

pub(super) fn describe(rps: f64, burst: u32) -> String {
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

#[cfg(test)]
mod tests {
    use std::sync::Barrier;

    use governor::clock::FakeRelativeClock;

    use super::*;

    fn limiter() -> (MemoryLimiter<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        (MemoryLimiter::with_clock(LimitDefaults::default(), clock.clone()), clock)
    }

    fn key(session: &str) -> LimitKey {
        LimitKey::session(session)
    }

    fn none() -> Limits {
        Limits::default()
    }

    fn refused(retry_ms: u64, limit: &str) -> Result<(), RateLimited> {
        Err(RateLimited { retry_after: Duration::from_millis(retry_ms), limit: limit.into() })
    }

    /// Sends `n` requests at the current instant and returns the refusals.
    fn burst(l: &MemoryLimiter<FakeRelativeClock>, session: &str, limits: &Limits, n: usize) -> Vec<RateLimited> {
        (0..n).filter_map(|_| l.check_now(&key(session), limits).err()).collect()
    }

    const DEFAULT: &str = "20 requests per second, burst 40";

    #[test]
    fn a_burst_beyond_the_quota_is_refused_exactly() {
        let (l, _) = limiter();
        let refusals = burst(&l, "s1", &none(), 50);
        // 40 pass; 20 rps means the 41st waits one 50ms slot, and the bucket stays empty however often it is asked.
        let expected = RateLimited { retry_after: Duration::from_millis(50), limit: DEFAULT.into() };
        assert_eq!(refusals, vec![expected; 10]);
        let stats = l.session_stats(&key("s1"));
        assert_eq!(stats, Some(SessionStats { requests: 40, rate_limited: 10, ..SessionStats::default() }));
    }

    #[test]
    fn retry_after_counts_down_and_the_session_recovers() {
        let (l, clock) = limiter();
        assert!(burst(&l, "s1", &none(), 40).is_empty());
        assert_eq!(l.check_now(&key("s1"), &none()), refused(50, DEFAULT));
        clock.advance(Duration::from_millis(20));
        assert_eq!(l.check_now(&key("s1"), &none()), refused(30, DEFAULT));
        clock.advance(Duration::from_millis(30));
        // Exactly one slot has replenished.
        assert_eq!(l.check_now(&key("s1"), &none()), Ok(()));
        assert_eq!(l.check_now(&key("s1"), &none()), refused(50, DEFAULT));
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
        let slow = Limits { requests_per_second: Some(1.0), burst: Some(2), max_tunnels: None, ..Limits::default() };
        let fast =
            Limits { requests_per_second: Some(1000.0), burst: Some(500), max_tunnels: None, ..Limits::default() };
        assert_eq!(l.check_now(&key("a"), &slow), Ok(()));
        assert_eq!(l.check_now(&key("a"), &slow), Ok(()));
        assert_eq!(l.check_now(&key("a"), &slow), refused(1000, "1 request per second, burst 2"));
        assert_eq!(burst(&l, "b", &fast, 500), vec![]);
        assert_eq!(l.check_now(&key("b"), &fast), refused(1, "1000 requests per second, burst 500"));
        assert_eq!(burst(&l, "c", &none(), 40), vec![]);
        assert_eq!(burst(&l, "d", &slow, 2), vec![]);
        assert_eq!(l.tracked(), Tracked { sessions: 4, rate_states: 4, quotas: 3 });
        clock.advance(Duration::from_secs(1));
        assert_eq!(l.check_now(&key("a"), &slow), Ok(()));
        assert_eq!(l.check_now(&key("a"), &slow), refused(1000, "1 request per second, burst 2"));
    }

    #[test]
    fn a_session_whose_quota_changes_carries_its_debt() {
        let (l, clock) = limiter();
        let slow = Limits { requests_per_second: Some(1.0), burst: Some(2), max_tunnels: None, ..Limits::default() };
        assert_eq!(burst(&l, "a", &slow, 2), vec![]);
        // Its arrival time is 2 s out; under 2 requests per second (burst 2) the next may come at 1.5 s.
        let faster = Limits { requests_per_second: Some(2.0), ..slow };
        assert_eq!(l.check_now(&key("a"), &faster), refused(1500, "2 requests per second, burst 2"));
        // A quota met later starts its own timeline, and reads the same debt: at 4 per second (burst 2),
        // the next may come 250 ms before the arrival time.
        clock.advance(Duration::from_millis(1500));
        let later = Limits { requests_per_second: Some(4.0), ..slow };
        assert_eq!(l.check_now(&key("a"), &later), refused(250, "4 requests per second, burst 2"));
        clock.advance(Duration::from_millis(250));
        assert_eq!(l.check_now(&key("a"), &later), Ok(()));
        assert_eq!(l.check_now(&key("a"), &later), refused(250, "4 requests per second, burst 2"));
        assert_eq!(l.tracked(), Tracked { sessions: 1, rate_states: 1, quotas: 4 });
    }

    #[test]
    fn a_policy_may_set_only_some_limits() {
        let (l, _) = limiter();
        let burst_only = Limits { requests_per_second: None, burst: Some(3), max_tunnels: None, ..Limits::default() };
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
    fn max_tunnels_holds_and_leases_release_on_drop() {
        let (l, _) = limiter();
        let three = Limits { max_tunnels: Some(3), ..Limits::default() };
        let mut leases: Vec<Lease> = (0..3).filter_map(|_| l.open_tunnel_now(&key("s1"), &three).ok()).collect();
        assert_eq!(leases.len(), 3);
        assert_eq!(l.open_tunnel_now(&key("s1"), &three).err(), Some(TooManyTunnels { max: 3 }));
        assert_eq!(l.open_tunnel_now(&key("s2"), &three).map(|_| ()).err(), None);
        assert_eq!(l.session_stats(&key("s1")).map(|s| s.open_tunnels), Some(3));
        leases.pop();
        assert_eq!(l.session_stats(&key("s1")).map(|s| s.open_tunnels), Some(2));
        assert!(l.open_tunnel_now(&key("s1"), &three).is_ok());
        drop(leases);
        assert_eq!(l.session_stats(&key("s1")).map(|s| s.open_tunnels), Some(0));
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
                        let results: Vec<_> = (0..10).map(|_| l.open_tunnel_now(&key("s1"), &ten)).collect();
                        // Hold every lease until all threads have tried, so the cap is what stops them.
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
        assert_eq!(l.session_stats(&key("s1")).map(|s| s.open_tunnels), Some(0));
        assert_eq!(l.open_tunnel_now(&key("s1"), &ten).map(|_| ()).err(), None);
    }

    #[test]
    fn housekeeping_forgets_idle_sessions() {
        let (l, clock) = limiter();
        for i in 0..1000 {
            assert_eq!(l.check_now(&key(&format!("s{i}")), &none()), Ok(()));
        }
        let permit = l.open_tunnel_now(&key("busy"), &none());
        assert!(permit.is_ok());
        assert_eq!(l.tracked(), Tracked { sessions: 1001, rate_states: 1000, quotas: 1 });
        l.housekeeping();
        assert_eq!(l.tracked(), Tracked { sessions: 1001, rate_states: 1000, quotas: 1 });

        // Replenished rate states go first; the counters stay for SESSION_IDLE.
        clock.advance(Duration::from_secs(3));
        l.housekeeping();
        assert_eq!(l.tracked(), Tracked { sessions: 1001, rate_states: 0, quotas: 1 });
        assert_eq!(l.session_stats(&key("s7")).map(|s| s.requests), Some(1));

        clock.advance(SESSION_IDLE);
        l.housekeeping();
        assert_eq!(l.tracked(), Tracked { sessions: 1, rate_states: 0, quotas: 1 });
        assert_eq!(l.session_stats(&key("s7")), None);

        // An open tunnel keeps its session; once closed, the session goes like any other.
        drop(permit);
        clock.advance(SESSION_IDLE);
        l.housekeeping();
        assert_eq!(l.tracked(), Tracked { sessions: 0, rate_states: 0, quotas: 1 });

        // A forgotten session starts afresh.
        assert_eq!(burst(&l, "s7", &none(), 40), vec![]);
    }

    /// Clearing a state the moment its `tat` is reached changes no answer: a limiter whose housekeeping runs at
    /// every step answers a sequence of bursts exactly as one whose housekeeping never runs.
    #[test]
    fn a_state_cleared_at_its_tat_answers_as_if_kept() {
        let (kept, kept_clock) = limiter();
        let (cleared, cleared_clock) = limiter();
        let two = Limits { requests_per_second: Some(2.0), burst: Some(3), max_tunnels: None, ..Limits::default() };
        // It is cleared exactly then: one request puts `tat` 500 ms ahead; 1 ms short of it the state stays.
        assert_eq!(cleared.check_now(&key("s0"), &two), Ok(()));
        cleared_clock.advance(Duration::from_millis(499));
        cleared.housekeeping();
        assert_eq!(cleared.tracked().rate_states, 1);
        cleared_clock.advance(Duration::from_millis(1));
        cleared.housekeeping();
        assert_eq!(cleared.tracked().rate_states, 0);
        kept_clock.advance(Duration::from_millis(500));

        // Steps around the 500 ms interval and the 1.5 s burst window, landing on and beside each `tat`.
        for step_ms in [0, 500, 499, 1, 1500, 250, 1000, 1, 2000, 0, 750] {
            for clock in [&kept_clock, &cleared_clock] {
                clock.advance(Duration::from_millis(step_ms));
            }
            cleared.housekeeping();
            for limits in [&two, &none()] {
                assert_eq!(burst(&cleared, "s1", limits, 4), burst(&kept, "s1", limits, 4), "after {step_ms} ms");
            }
        }
        assert_eq!(cleared.session_stats(&key("s1")), kept.session_stats(&key("s1")));
    }

    #[test]
    fn housekeeping_never_resets_a_slow_quota() {
        let (l, clock) = limiter();
        // One request per 1000s: a full burst of 5 takes longer than SESSION_IDLE to come back.
        let slow = Limits { requests_per_second: Some(0.001), burst: Some(5), max_tunnels: None, ..Limits::default() };
        assert_eq!(burst(&l, "s1", &slow, 6).len(), 1);
        clock.advance(SESSION_IDLE + Duration::from_secs(1));
        l.housekeeping();
        // The session is idle, but its rate state has not replenished: it is kept, state and all.
        assert_eq!(l.tracked(), Tracked { sessions: 1, rate_states: 1, quotas: 2 });
        // The sixth slot opens at 1000s: a forgotten state would have let this through.
        assert_eq!(l.check_now(&key("s1"), &slow), refused(399_000, "0.001 requests per second, burst 5"));
        clock.advance(Duration::from_secs(399));
        assert_eq!(l.check_now(&key("s1"), &slow), Ok(()));
        assert_eq!(l.check_now(&key("s1"), &slow), refused(1_000_000, "0.001 requests per second, burst 5"));
        // The state goes once it has fully replenished; the session goes SESSION_IDLE after the pass that saw
        // its last request.
        clock.advance(Duration::from_secs(6000));
        l.housekeeping();
        assert_eq!(l.tracked(), Tracked { sessions: 1, rate_states: 0, quotas: 2 });
        clock.advance(SESSION_IDLE);
        l.housekeeping();
        assert_eq!(l.tracked(), Tracked { sessions: 0, rate_states: 0, quotas: 2 });
    }

    #[test]
    fn quotas_are_bounded() {
        let (l, _) = limiter();
        // The default quota holds the first slot.
        for burst in 1..MAX_QUOTAS as u32 {
            let limits =
                Limits { requests_per_second: Some(1.0), burst: Some(burst), max_tunnels: None, ..Limits::default() };
            assert_eq!(l.check_now(&key("s1"), &limits), Ok(()));
        }
        assert_eq!(l.tracked().quotas, MAX_QUOTAS);
        let one_more =
            Limits { requests_per_second: Some(2.0), burst: Some(1), max_tunnels: None, ..Limits::default() };
        assert_eq!(
            burst(&l, "s2", &one_more, 41),
            vec![RateLimited { retry_after: Duration::from_millis(50), limit: DEFAULT.into() }]
        );
        assert_eq!(l.tracked().quotas, MAX_QUOTAS);
    }

    #[test]
    fn counts_requests_and_bytes() {
        let (l, _) = limiter();
        assert_eq!(l.session_stats(&key("s1")), None);
        assert_eq!(l.check_now(&key("s1"), &none()), Ok(()));
        l.record_bytes(&key("s1"), &none(), 10, 200);
        let permit = l.open_tunnel_now(&key("s1"), &none());
        if let Ok(p) = &permit {
            p.record_bytes(5, 7);
        }
        assert_eq!(
            l.session_stats(&key("s1")),
            Some(SessionStats {
                requests: 1,
                bytes_up: 15,
                bytes_down: 207,
                open_tunnels: 1,
                ..SessionStats::default()
            })
        );
    }

    #[test]
    fn extreme_quotas_neither_panic_nor_overflow() {
        let (l, clock) = limiter();
        for (i, rps) in [1e-300, f64::MIN_POSITIVE, 1e300, f64::INFINITY, f64::NAN, 0.0, -1.0].into_iter().enumerate() {
            for b in [0, 1, u32::MAX] {
                let limits = Limits {
                    requests_per_second: Some(rps),
                    burst: Some(b),
                    max_tunnels: Some(0),
                    ..Limits::default()
                };
                let session = format!("s{i}-{b}");
                let first = l.check_now(&key(&session), &limits);
                assert_eq!(first, Ok(()), "rps {rps}, burst {b}");
                assert_eq!(l.open_tunnel_now(&key(&session), &limits).err(), Some(TooManyTunnels { max: 0 }));
            }
        }
        clock.advance(Duration::from_secs(1));
        l.housekeeping();
    }

    #[test]
    fn the_limiter_is_shared_between_tasks() {
        fn shared<T: Send + Sync>() {}
        shared::<MemoryLimiter>();
        shared::<MemoryLimiter<FakeRelativeClock>>();
        shared::<Lease>();
    }

    #[test]
    fn a_tunnels_bytes_count_while_it_runs() {
        let (l, _) = limiter();
        let lease = l.open_tunnel_now(&key("s1"), &none()).map_err(|e| e.to_string());
        let meter = lease.as_ref().map(Lease::meter).map_err(Clone::clone);
        if let Ok(meter) = &meter {
            meter.add_up(100);
            meter.add_down(5000);
        }
        let live = SessionStats { bytes_up: 100, bytes_down: 5000, open_tunnels: 1, ..SessionStats::default() };
        assert_eq!(l.session_stats(&key("s1")), Some(live));
        // A plain-HTTP request of the same session reports to the same counters.
        l.meter(&key("s1"), &none()).add(1, 2);
        drop(lease);
        let done = SessionStats { bytes_up: 101, bytes_down: 5002, open_tunnels: 0, ..SessionStats::default() };
        assert_eq!(l.session_stats(&key("s1")), Some(done));
        assert_eq!(l.session_stats(&key("s2")), None);
        // A meter outliving its lease still counts, without opening a place.
        if let Ok(meter) = &meter {
            meter.add_up(9);
        }
        assert_eq!(l.session_stats(&key("s1")).map(|s| (s.bytes_up, s.open_tunnels)), Some((110, 0)));
    }

    #[test]
    fn a_spent_quota_refuses_until_its_window_ends_and_outlives_idleness() {
        let clock = FakeRelativeClock::default();
        // 10:00:00 UTC on 2023-11-15; the hourly window ends at 11:00:00.
        let ten = 1_700_006_400 + 10 * 3600;
        let l = MemoryLimiter::with_clock_at(LimitDefaults::default(), clock.clone(), ten * 1_000_000_000);
        let quota = crate::policy::quota::ByteQuota::parse("1MiB/hour").unwrap();
        let limits = Limits { upload_quota: Some(quota), ..Limits::default() };
        assert_eq!(l.check_quota_now(&key("s1"), &limits), Ok(()));
        let lease = l.open_tunnel_now(&key("s1"), &limits).map_err(|e| e.to_string());
        let budget = lease.as_ref().ok().and_then(|l| l.meter().budget().cloned());
        let Some(budget) = budget else { panic!("a session with a quota has a budget: {lease:?}") };
        assert_eq!(
            budget.grant(super::super::Direction::Up, 2 << 20).now().ok(),
            Some(super::super::Grant::Bytes { bytes: 1 << 20, wait: Duration::ZERO })
        );
        let spent =
            QuotaExceeded { direction: super::super::Direction::Up, quota, used: 1 << 20, resets_at: ten + 3600 };
        assert_eq!(l.check_quota_now(&key("s1"), &limits), Err(spent.clone()));
        // Another session, and the same session's downloads, are untouched.
        assert_eq!(l.check_quota_now(&key("s2"), &limits), Ok(()));
        assert_eq!(l.session_stats(&key("s1")).and_then(|s| s.upload_quota_used), Some(1 << 20));
        drop(lease);
        // Idle past SESSION_IDLE: forgetting the session would hand it a fresh quota, so it stays.
        clock.advance(SESSION_IDLE + Duration::from_secs(1));
        l.housekeeping();
        assert_eq!(l.check_quota_now(&key("s1"), &limits), Err(spent));
        // The next window starts whole.
        clock.advance(Duration::from_secs(3600) - SESSION_IDLE - Duration::from_secs(1));
        assert_eq!(l.check_quota_now(&key("s1"), &limits), Ok(()));
        // Sessions without byte limits get no budget: their tunnels keep the plain path.
        let plain = l.open_tunnel_now(&key("s3"), &none()).map(|lease| lease.meter().budget().is_none());
        assert_eq!(plain.ok(), Some(true));
    }

    #[tokio::test]
    async fn through_the_trait_answers_are_ready_at_once() {
        let (l, _) = limiter();
        let limiter: Arc<dyn Limiter> = Arc::new(l);
        let one = Limits { requests_per_second: Some(1.0), burst: Some(1), max_tunnels: Some(1), ..Limits::default() };
        let client = LimitKey::anonymous([127, 0, 0, 1].into());
        assert_eq!(limiter.check_request(&client, &one).now().ok(), Some(Ok(())));
        assert_eq!(
            limiter.check_request(&client, &one).await,
            refused(1000, "1 request per second, burst 1").map_err(Limited::Over)
        );
        // Another anonymous client has limits of its own.
        let other = LimitKey::anonymous([127, 0, 0, 2].into());
        assert_eq!(limiter.check_request(&other, &one).await, Ok(()));

        let lease = limiter.open_tunnel(&client, &one).await;
        assert_eq!(lease.as_ref().map(|_| ()), Ok(()));
        assert_eq!(limiter.open_tunnel(&client, &one).await.err(), Some(Limited::Over(TooManyTunnels { max: 1 })));
        drop(lease);
        assert_eq!(limiter.open_tunnel(&client, &one).await.map(|_| ()), Ok(()));
        let stats = limiter.session_stats(&client);
        assert_eq!(stats, Some(SessionStats { requests: 1, rate_limited: 1, ..SessionStats::default() }));
    }
}
