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
/// Longest time a full burst may take to replenish (burst × period), so that a rate state is never more than a
/// year ahead of now: [`Hot`] stores it in 56 bits.
const MAX_WINDOW_NANOS: u64 = MAX_PERIOD_NANOS;
/// How far below the time of housekeeping's last pass [`Sessions::floor`] is set: far more than a check can
/// take between reading the clock and writing the `tat` it computed from that reading.
const FLOOR_SLACK_NANOS: u64 = 3600 * 1_000_000_000;
/// How long housekeeping may go without a pass before stored `tat`s could be read back wrong: the server runs
/// it every 30 seconds.
const MAX_HOUSEKEEPING_GAP_NANOS: u64 = MAX_PERIOD_NANOS;

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

/// A session's entry in its shard's hot map: all that an allowed request check reads and writes, in one word, so
/// that with its key the bucket is 16 bytes. The hot map of 100k sessions is then 2.1 MB, which stays in a small
/// VM's share of the last-level cache; at 32 bytes a bucket (4.2 MB for 100k) cost most checks a miss to memory.
/// The word is plain, not atomic: it changes only under the shard's lock, which a check takes anyway.
///
/// - Low [`TAT_BITS`] bits: the request rate's GCRA state, its theoretical arrival time in nanoseconds on the
///   limiter's timeline, modulo 2⁵⁶ (0: none yet, or replenished and cleared by housekeeping); [`Hot::tat`]
///   reads it back whole against the table's [`Sessions::floor`]. Kept here rather than in a keyed store of
///   governor's own so that a check finds the session once. Any quota reads a `tat` at or before now as no state
///   at all, so housekeeping clears it then without knowing which quota wrote it.
/// - High 8 bits: requests allowed, modulo 256. The check that wraps them carries 256 into
///   [`Shared::requests`], so the count stays exact at the cost of one more lookup per 256 requests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Hot(u64);

/// The bits of [`Hot`] that hold the `tat`: 2⁵⁶ ns is 2.28 years, more than any rate state can reach ahead of
/// the floor: [`MAX_WINDOW_NANOS`] plus [`MAX_HOUSEKEEPING_GAP_NANOS`] plus [`FLOOR_SLACK_NANOS`].
const TAT_BITS: u32 = 56;
const TAT_MASK: u64 = (1 << TAT_BITS) - 1;

// The bucket (key and entry) is what a check misses the cache for: keep it at a quarter of a cache line.
const _: () = assert!(std::mem::size_of::<(SessionKey, Hot)>() == 16);
// A window (its `tat` ahead of now), plus housekeeping's period and the floor's slack, fits the stored bits.
const _: () = assert!(MAX_WINDOW_NANOS + MAX_HOUSEKEEPING_GAP_NANOS + FLOOR_SLACK_NANOS < 1 << TAT_BITS);

impl Hot {
    /// The `tat`, if the session has one: the first time at or after `floor` with the stored low bits. Every
    /// stored `tat` lies within 2⁵⁶ ns after the floor, so this is the one that was stored.
    #[inline]
    fn tat(self, floor: u64) -> Option<u64> {
        let low = self.0 & TAT_MASK;
        (low != 0).then(|| floor + (low.wrapping_sub(floor) & TAT_MASK))
    }

    /// Stores `tat` (one nanosecond later in the one case in 2⁵⁶ where its low bits would read as none).
    #[inline]
    fn set_tat(&mut self, tat: u64) {
        self.0 = (self.0 & !TAT_MASK) | (tat & TAT_MASK).max(1);
    }

    fn clear_tat(&mut self) {
        self.0 &= !TAT_MASK;
    }

    fn has_tat(self) -> bool {
        self.0 & TAT_MASK != 0
    }

    /// Counts one allowed request; true when the count wrapped, so 256 requests must be carried.
    #[inline]
    fn count_request(&mut self) -> bool {
        self.0 = self.0.wrapping_add(1 << TAT_BITS);
        self.requests() == 0
    }

    /// Requests allowed since the last carry.
    #[inline]
    fn requests(self) -> u64 {
        self.0 >> TAT_BITS
    }
}

/// What one wrap of [`Hot`]'s request count stands for.
const REQUESTS_PER_CARRY: u64 = 1 << (64 - TAT_BITS);

/// A session's counters that its leases and meters update after the check, wherever they are.
#[derive(Debug, Default)]
struct Shared {
    /// Nanoseconds since the limiter started at which housekeeping last saw the session active (a request
    /// or refusal since its previous pass, or a tunnel open), or at which it was created. Kept by housekeeping
    /// rather than by every check, which would read the clock once more.
    last_seen: AtomicU64,
    /// Requests allowed, in whole wraps of the hot count: the session's count is this plus [`Hot::requests`].
    requests: AtomicU64,
    /// The session's request count at housekeeping's last pass: a change is activity.
    requests_mark: AtomicU64,
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

impl Shared {
    fn new(now: u64) -> Self {
        Shared { last_seen: AtomicU64::new(now), ..Shared::default() }
    }

    /// Every request the session was allowed: the carried wraps plus what its hot entry counts since.
    fn requests(&self, hot: Hot) -> u64 {
        self.requests.load(Ordering::Relaxed) + hot.requests()
    }

    /// Housekeeping's pass over the session (under its shard's lock): whether it was allowed or refused a
    /// request since the last pass.
    fn active_since_last_pass(&self, hot: Hot) -> bool {
        let requests = self.requests(hot);
        let refused = self.rate_limited.load(Ordering::Relaxed);
        let requests_before = self.requests_mark.swap(requests, Ordering::Relaxed);
        let refused_before = self.refused_mark.swap(refused, Ordering::Relaxed);
        requests != requests_before || refused != refused_before
    }

    fn stats(&self, hot: Hot) -> SessionStats {
        let (bytes_up, bytes_down) = self.bytes.totals();
        let budget = self.current_budget();
        SessionStats {
            requests: self.requests(hot),
            rate_limited: self.rate_limited.load(Ordering::Relaxed),
            bytes_up,
            bytes_down,
            open_tunnels: self.tunnels.load(Ordering::Relaxed),
            shaping_wait_ms: budget.as_ref().map_or(0, |b| b.waited().as_millis() as u64),
            upload_quota_used: budget.as_ref().and_then(|b| b.used(super::Direction::Up)),
            download_quota_used: budget.as_ref().and_then(|b| b.used(super::Direction::Down)),
        }
    }

    /// Whether forgetting the session would hand it a fresh quota: it has counted bytes in a window that
    /// has not ended.
    fn holds_quota(&self) -> bool {
        self.current_budget().is_some_and(|b| {
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

/// One shard's sessions, in two maps with the same keys: a check reads and writes only the hot one, whose buckets
/// are small enough to stay in cache; leases, meters, refusals and stats find the rest in the cold one.
#[derive(Default)]
struct Table {
    hot: HashMap<SessionKey, Hot, KeyState>,
    cold: HashMap<SessionKey, Arc<Shared>, KeyState>,
}

impl Table {
    /// The session's hot entry, created with its shared part (at `now`) on first sight, and the cold map: one
    /// lookup for a session already known.
    #[inline]
    fn hot(
        &mut self,
        key: SessionKey,
        now: impl FnOnce() -> u64,
    ) -> (&mut Hot, &HashMap<SessionKey, Arc<Shared>, KeyState>) {
        let Table { hot, cold } = self;
        let entry = hot.entry(key).or_insert_with(|| {
            cold.entry(key).or_insert_with(|| Arc::new(Shared::new(now())));
            Hot::default()
        });
        (entry, cold)
    }

    /// The session's shared part, created with its hot entry (at `now`) on first sight: one lookup for a
    /// session already known.
    fn shared(&mut self, key: SessionKey, now: impl FnOnce() -> u64) -> &Arc<Shared> {
        let Table { hot, cold } = self;
        cold.entry(key).or_insert_with(|| {
            hot.entry(key).or_default();
            Arc::new(Shared::new(now()))
        })
    }
}

/// Cache-line aligned so that two shards' locks never share a line. A mutex, not a read-write lock: a check
/// changes its entry anyway, and a mutex costs it one atomic read-modify-write to lock and one to unlock, where
/// a read lock plus atomic fields cost four.
#[repr(align(64))]
#[derive(Default)]
struct Shard(Mutex<Table>);

impl Shard {
    #[inline]
    fn lock(&self) -> MutexGuard<'_, Table> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Every session the limiter tracks, shared by the limiter and its quotas' stores.
struct Sessions {
    /// Inline, so that a check reaches its shard with no pointer to follow but the limiter's.
    shards: [Shard; SHARDS],
    /// A time on the limiter's timeline at or before every stored `tat`, and less than 2⁵⁶ ns before any: the
    /// base [`Hot::tat`] reads a stored one back against. Housekeeping raises it after each pass, to
    /// [`FLOOR_SLACK_NANOS`] before that pass's time (the pass has cleared every `tat` at or before it).
    floor: AtomicU64,
}

impl Sessions {
    fn new() -> Self {
        Sessions { shards: std::array::from_fn(|_| Shard::default()), floor: AtomicU64::new(0) }
    }

    #[inline]
    fn shard(&self, key: SessionKey) -> &Shard {
        // Middle bits: hashbrown indexes buckets by the low bits and tags them with the top seven.
        &self.shards[(key >> 32) as usize % SHARDS]
    }

    #[inline]
    fn floor(&self) -> u64 {
        self.floor.load(Ordering::Relaxed)
    }

    /// Runs `f` on the session's shared part, created (at `now`) on first sight, under its shard's lock.
    fn with_shared<R>(&self, key: SessionKey, now: impl FnOnce() -> u64, f: impl FnOnce(&Arc<Shared>) -> R) -> R {
        f(self.shard(key).lock().shared(key, now))
    }
}

/// Where one quota's governor limiter keeps its states: in the sessions' hot entries, so that a request check is
/// one lookup under one lock. Every quota's store writes the same `tat`, on the limiter's timeline, so a session
/// whose policy changes carries its debt to the new quota.
struct EntryStore<C: Clock> {
    sessions: Arc<Sessions>,
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
        let floor = self.sessions.floor();
        let mut table = self.sessions.shard(*key).lock();
        let (hot, cold) = table.hot(*key, || self.clock.now().duration_since(self.start).as_u64());
        // A state from before this quota limiter started is in its past: the same as none.
        let prior = hot.tat(floor).filter(|&tat| tat > self.offset).map(|tat| Nanos::from(tat - self.offset));
        match f(prior) {
            Ok((allowed, next)) => {
                hot.set_tat(self.offset.saturating_add(next.as_u64()));
                if hot.count_request()
                    && let Some(shared) = cold.get(key)
                {
                    shared.requests.fetch_add(REQUESTS_PER_CARRY, Ordering::Relaxed);
                }
                Ok(allowed)
            }
            Err(refused) => {
                if let Some(shared) = cold.get(key) {
                    shared.rate_limited.fetch_add(1, Ordering::Relaxed);
                }
                Err(refused)
            }
        }
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
    sessions: Arc<Sessions>,
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
            sessions: Arc::new(Sessions::new()),
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
        self.with_shared(self.key(session), |s| {
            // Increment only below the cap, so concurrent opens can never overshoot it.
            let opened = s.tunnels.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1));
            match opened {
                Ok(_) => {
                    let slot: Arc<dyn TunnelSlot> = s.clone();
                    let budget = (!bytes.is_unlimited()).then(|| s.budget(&bytes, &self.time) as Arc<dyn ByteBudget>);
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
        match self.with_shared(self.key(session), |s| s.budget(&bytes, &self.time).spent()) {
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
        for shard in self.sessions.shards.iter() {
            let table = shard.lock();
            sessions += table.cold.len();
            rate_states += table.hot.values().filter(|h| h.has_tat()).count();
        }
        Tracked { sessions, rate_states, quotas: self.quotas.iter().filter_map(OnceLock::get).count() }
    }

    fn now_nanos(&self) -> u64 {
        self.clock.now().duration_since(self.start).as_u64()
    }

    fn key(&self, session: &LimitKey) -> SessionKey {
        self.key_hasher.hash_one(session.as_str())
    }

    fn with_shared<R>(&self, key: SessionKey, f: impl FnOnce(&Arc<Shared>) -> R) -> R {
        self.sessions.with_shared(key, || self.now_nanos(), f)
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
            sessions: self.sessions.clone(),
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
        self.with_shared(self.key(session), |s| {
            let budget = (!bytes.is_unlimited()).then(|| s.budget(&bytes, &self.time));
            s.meter(budget)
        })
    }

    fn session_stats(&self, session: &LimitKey) -> Option<SessionStats> {
        let key = self.key(session);
        let table = self.sessions.shard(key).lock();
        table.cold.get(&key).map(|shared| shared.stats(table.hot.get(&key).copied().unwrap_or_default()))
    }

    /// Forgets what no longer matters: rate states that have fully replenished, and sessions idle for
    /// [`SESSION_IDLE`] with no tunnel open and no rate state, so forgetting a session never hands it a fresh
    /// burst. The server calls this periodically; between calls memory grows only with new sessions.
    fn housekeeping(&self) {
        let now = self.now_nanos();
        let floor = self.sessions.floor();
        let idle = u64::try_from(SESSION_IDLE.as_nanos()).unwrap_or(u64::MAX);
        for shard in self.sessions.shards.iter() {
            // Under the shard's lock no one can open a tunnel on these sessions, so `tunnels == 0` stays true
            // until they are removed; an open lease holds its own counters and may still drop afterwards.
            // Checks take the same lock, so no state changes under this one.
            let mut guard = shard.lock();
            let Table { hot, cold } = &mut *guard;
            cold.retain(|key, shared| {
                let entry = hot.entry(*key).or_default();
                let active = shared.active_since_last_pass(*entry);
                let open = shared.tunnels.load(Ordering::Acquire) > 0;
                if active || open {
                    shared.last_seen.store(now, Ordering::Relaxed);
                }
                // Governor reads a missing state as one whose `tat` is now, and a `tat` at or before now the same
                // way (the request is allowed and the next `tat` is now plus one interval): under every quota,
                // such a state is indistinguishable from none, and checks later than this pass see a later now.
                if entry.tat(floor).is_some_and(|tat| tat <= now) {
                    entry.clear_tat();
                }
                let since = now.saturating_sub(shared.last_seen.load(Ordering::Relaxed));
                let keep = open || since < idle || entry.has_tat() || shared.holds_quota();
                if !keep {
                    hot.remove(key);
                }
                keep
            });
            // Give memory back once a map is mostly empty, not on every pass: shrinking reallocates.
            // The two maps hold the same keys.
            if cold.capacity() > 64 && cold.len() < cold.capacity() / 4 {
                hot.shrink_to_fit();
                cold.shrink_to_fit();
            }
        }
        // Every `tat` left is after `now`, and every one written from here on is after the time its check read
        // the clock; so the floor may rise to just before now.
        self.sessions.floor.fetch_max(now.saturating_sub(FLOOR_SLACK_NANOS), Ordering::Relaxed);
    }
}

pub(super) fn describe(rps: f64, burst: u32) -> String {
    let unit = if rps == 1.0 { "request" } else { "requests" };
    format!("{rps} {unit} per second, burst {burst}")
}

/// The governor quota for `rps` and `burst`, kept within what governor's u64 nanoseconds can count and what
/// [`Hot`]'s 56 bits can hold ahead of now. Policies and
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

    /// A stored `tat` reads back whole anywhere within 2⁵⁶ ns after the floor, across the wrap of its bits too.
    #[test]
    fn a_stored_tat_reads_back_whole_after_its_floor() {
        for floor in [0, 1, 12_345, TAT_MASK - 10, TAT_MASK, TAT_MASK + 1, 3 * TAT_MASK + 7] {
            for ahead in [0, 1, 2, 1_000_000_007, MAX_WINDOW_NANOS, TAT_MASK - 1] {
                let mut hot = Hot::default();
                hot.set_tat(floor + ahead);
                // The one `tat` whose low bits are 0 is stored a nanosecond later.
                let stored = if (floor + ahead) & TAT_MASK == 0 { floor + ahead + 1 } else { floor + ahead };
                assert_eq!(hot.tat(floor), Some(stored), "floor {floor}, ahead {ahead}");
                // The count shares the word and leaves the `tat` alone.
                assert!(!hot.count_request());
                assert_eq!((hot.tat(floor), hot.requests()), (Some(stored), 1));
            }
        }
        assert_eq!(Hot::default().tat(42), None);
    }

    /// A limiter 2⁵⁶ ns (2.28 years) into its life, whose stored `tat`s wrap around their bits, answers exactly
    /// as a young one does: for a quick quota and a slow one whose states straddle the wrap.
    #[test]
    fn an_old_limiter_answers_as_a_young_one_across_the_wrap() {
        let (young, young_clock) = limiter();
        let (old, old_clock) = limiter();
        // Housekeeping runs (and raises the floor) every 30 s in a server; here every 100 days will do.
        let wrap = Duration::from_nanos(1 << TAT_BITS);
        let mut aged = Duration::ZERO;
        let step = Duration::from_secs(100 * 24 * 3600);
        let before_wrap = wrap - Duration::from_secs(3000);
        while aged + step < before_wrap {
            old_clock.advance(step);
            aged += step;
            old.housekeeping();
        }
        old_clock.advance(before_wrap - aged);
        old.housekeeping();
        let two = Limits { requests_per_second: Some(2.0), burst: Some(3), max_tunnels: None, ..Limits::default() };
        let slow = Limits { requests_per_second: Some(0.001), burst: Some(5), max_tunnels: None, ..Limits::default() };
        // 3000 s before the wrap, then steps through it: the slow quota's `tat`s lie 1000-5000 s ahead.
        for step_s in [0, 1, 500, 999, 1000, 1, 2000, 0, 3000, 7000] {
            for clock in [&young_clock, &old_clock] {
                clock.advance(Duration::from_secs(step_s));
            }
            for limits in [&two, &slow, &none()] {
                assert_eq!(burst(&old, "s1", limits, 6), burst(&young, "s1", limits, 6), "after {step_s} s");
            }
            old.housekeeping();
            young.housekeeping();
            assert_eq!(old.tracked(), young.tracked(), "after {step_s} s");
        }
        assert_eq!(old.session_stats(&key("s1")), young.session_stats(&key("s1")));
    }

    /// The request count is exact past the 256 its hot bits hold, with housekeeping between checks or not.
    #[test]
    fn the_request_count_is_exact_past_its_hot_bits() {
        let (l, _) = limiter();
        let many =
            Limits { requests_per_second: Some(1e6), burst: Some(100_000), max_tunnels: None, ..Limits::default() };
        for n in 1..=1000u64 {
            assert_eq!(l.check_now(&key("s1"), &many), Ok(()));
            if n % 300 == 0 {
                l.housekeeping();
            }
            if [255, 256, 257, 511, 512, 1000].contains(&n) {
                assert_eq!(l.session_stats(&key("s1")).map(|s| s.requests), Some(n));
            }
        }
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
