//! A session's byte budget in this process: a token bucket per direction for shaping and a fixed-window
//! counter per direction for quotas, behind [`ByteBudget`]. The buckets are plain values any store can
//! shape with; the windows are what the in-memory limiter counts quotas in.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::{Answer, ByteBudget, Direction, Grant, QuotaExceeded};
use crate::config::LimitDefaults;
use crate::policy::Limits;
use crate::policy::quota::{ByteQuota, ByteSize};

/// One direction's byte limits: a rate (shaping) and a quota, each optional.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Flow {
    pub rate: Option<ByteSize>,
    pub quota: Option<ByteQuota>,
}

impl Flow {
    pub fn is_unlimited(&self) -> bool {
        self.rate.is_none() && self.quota.is_none()
    }
}

/// A session's byte limits in force: its policy's, else the server's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ByteLimits {
    pub up: Flow,
    pub down: Flow,
}

impl ByteLimits {
    /// The policy's byte limits, each unset one taken from the server's `[limits]`.
    pub fn resolve(policy: &Limits, defaults: &LimitDefaults) -> ByteLimits {
        ByteLimits {
            up: Flow {
                rate: policy.upload_bytes_per_second.or(defaults.upload_bytes_per_second),
                quota: policy.upload_quota.or(defaults.upload_quota),
            },
            down: Flow {
                rate: policy.download_bytes_per_second.or(defaults.download_bytes_per_second),
                quota: policy.download_quota.or(defaults.download_quota),
            },
        }
    }

    /// Neither shaping nor quotas: transfers need no budget at all.
    pub fn is_unlimited(&self) -> bool {
        self.up.is_unlimited() && self.down.is_unlimited()
    }

    pub fn has_quota(&self) -> bool {
        self.up.quota.is_some() || self.down.quota.is_some()
    }

    pub fn flow(&self, dir: Direction) -> &Flow {
        match dir {
            Direction::Up => &self.up,
            Direction::Down => &self.down,
        }
    }
}

/// Where a budget reads the time: monotonic nanoseconds for shaping, Unix seconds for quota windows. Tests
/// drive both with one fake clock.
pub trait TimeSource: Send + Sync + fmt::Debug {
    /// Nanoseconds since some fixed start; never goes back.
    fn nanos(&self) -> u64;
    /// Seconds since the Unix epoch at `nanos` (a reading of [`TimeSource::nanos`]), so that one grant
    /// reads the clock once.
    fn unix_at(&self, nanos: u64) -> u64;

    /// Seconds since the Unix epoch now.
    fn unix(&self) -> u64 {
        self.unix_at(self.nanos())
    }
}

/// The real clocks: `Instant` for shaping, the wall clock read once at start for windows (so a wall-clock
/// step does not move shaping, and windows follow real time from there).
#[derive(Debug)]
pub struct WallClock {
    start: Instant,
    start_unix_nanos: u64,
}

impl Default for WallClock {
    fn default() -> Self {
        let unix = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        WallClock { start: Instant::now(), start_unix_nanos: u64::try_from(unix.as_nanos()).unwrap_or(u64::MAX) }
    }
}

impl TimeSource for WallClock {
    fn nanos(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn unix_at(&self, nanos: u64) -> u64 {
        self.start_unix_nanos.saturating_add(nanos) / 1_000_000_000
    }
}

/// Bytes one grant may carry at most: small enough that a session's tunnels take turns several times a
/// second, large enough that a fast limit does not cost a grant per packet (one splice pipe's worth).
const MIN_CHUNK: u64 = 16 * 1024;
const MAX_CHUNK: u64 = 1024 * 1024;
/// Grants per second a session's bulk transfer takes, so a share is rate / this.
const SHARES_PER_SECOND: u64 = 50;
/// Bandwidth a quiet session may spend at once before the rate applies, as a time at the rate.
const TOLERANCE: Duration = Duration::from_millis(100);

/// A token bucket as virtual scheduling (GCRA) over bytes: `tat` is when the session's next byte is due. A
/// grant reserves its bytes from `tat` on and waits until its turn, so grants are served in the order asked
/// (fair between a session's transfers) and one compare-and-swap is the whole cost.
#[derive(Debug)]
pub struct Bucket {
    rate: u64,
    ns_per_byte: f64,
    /// Credit a quiet session may spend at once, in nanoseconds.
    tolerance: u64,
    chunk: u64,
    tat: AtomicU64,
}

impl Bucket {
    /// A bucket of `rate` bytes per second (at least 1).
    pub fn new(rate: ByteSize) -> Bucket {
        let rate = rate.as_u64().max(1);
        let ns_per_byte = 1e9 / rate as f64;
        let chunk = (rate / SHARES_PER_SECOND).clamp(MIN_CHUNK, MAX_CHUNK);
        let chunk_ns = (chunk as f64 * ns_per_byte) as u64;
        let tolerance = (TOLERANCE.as_nanos() as u64).max(chunk_ns);
        Bucket { rate, ns_per_byte, tolerance, chunk, tat: AtomicU64::new(0) }
    }

    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// The most one grant carries.
    pub fn chunk(&self) -> u64 {
        self.chunk
    }

    fn cost(&self, n: u64) -> u64 {
        (n as f64 * self.ns_per_byte).ceil() as u64
    }

    /// Reserves up to `want` bytes (at most one chunk) at `now` (nanoseconds on the budget's clock): the
    /// bytes, and how long to wait before moving them.
    pub fn reserve(&self, want: u64, now: u64) -> (u64, Duration) {
        let n = want.min(self.chunk);
        let cost = self.cost(n);
        let floor = now.saturating_sub(self.tolerance);
        let mut start = floor;
        // The closure returns Some, so the update always happens; `start` is the last attempt's.
        let _ = self.tat.fetch_update(Ordering::AcqRel, Ordering::Acquire, |tat| {
            start = tat.max(floor);
            Some(start.saturating_add(cost))
        });
        (n, Duration::from_nanos(start.saturating_sub(now)))
    }

    /// Gives back `n` reserved bytes that were not moved.
    pub fn give_back(&self, n: u64) {
        let cost = self.cost(n);
        let _ = self.tat.fetch_update(Ordering::AcqRel, Ordering::Acquire, |tat| Some(tat.saturating_sub(cost)));
    }
}

/// A quota counted in its fixed windows: the bytes of the current window, reset when a new one starts.
#[derive(Debug)]
pub struct Window {
    quota: ByteQuota,
    state: Mutex<Counted>,
}

/// The current window, in Unix seconds, and the bytes counted in it.
#[derive(Clone, Copy, Debug)]
struct Counted {
    start: u64,
    end: u64,
    used: u64,
}

impl Window {
    pub fn new(quota: ByteQuota) -> Window {
        Window { quota, state: Mutex::new(Counted { start: 0, end: 0, used: 0 }) }
    }

    pub fn quota(&self) -> ByteQuota {
        self.quota
    }

    /// Runs `f` on the bytes counted in the window holding `now`; returns `f`'s result and the window's end.
    fn with_current<R>(&self, now: u64, f: impl FnOnce(&mut u64) -> R) -> (R, u64) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        // Within the window counted so far there is nothing to compute (clocks here never go back).
        if !(state.start..state.end).contains(&now) {
            let window = self.quota.window(now);
            let used = if window.start == state.start { state.used } else { 0 };
            *state = Counted { start: window.start, end: window.end, used };
        }
        let end = state.end;
        (f(&mut state.used), end)
    }

    /// Takes up to `want` bytes from what is left in the current window, or says it is spent.
    pub fn take(&self, dir: Direction, want: u64, now: u64) -> Result<u64, QuotaExceeded> {
        let size = self.quota.size.as_u64();
        let (taken, end) = self.with_current(now, |used| {
            let left = size.saturating_sub(*used);
            if left == 0 {
                return Err(*used);
            }
            let n = want.min(left);
            *used += n;
            Ok(n)
        });
        taken.map_err(|used| QuotaExceeded { direction: dir, quota: self.quota, used, resets_at: end })
    }

    /// Gives back bytes taken and not moved.
    pub fn give_back(&self, n: u64, now: u64) {
        self.with_current(now, |used| *used = used.saturating_sub(n));
    }

    /// Counts bytes that moved without being taken first.
    pub fn charge(&self, n: u64, now: u64) {
        self.with_current(now, |used| *used = used.saturating_add(n));
    }

    /// Bytes counted in the current window.
    pub fn used(&self, now: u64) -> u64 {
        self.with_current(now, |used| *used).0
    }

    pub fn spent(&self, dir: Direction, now: u64) -> Option<QuotaExceeded> {
        let size = self.quota.size.as_u64();
        let (used, end) = self.with_current(now, |used| *used);
        (used >= size).then_some(QuotaExceeded { direction: dir, quota: self.quota, used, resets_at: end })
    }

    /// Starts from what `other` has counted when it is the same window length (a reloaded policy that
    /// changed only the size keeps what the session already spent).
    fn carry(&self, other: &Window) {
        if other.quota.period == self.quota.period {
            let from = *other.state.lock().unwrap_or_else(PoisonError::into_inner);
            *self.state.lock().unwrap_or_else(PoisonError::into_inner) = from;
        }
    }
}

#[derive(Debug, Default)]
struct Lane {
    bucket: Option<Bucket>,
    window: Option<Window>,
}

impl Lane {
    fn new(flow: &Flow) -> Lane {
        Lane { bucket: flow.rate.map(Bucket::new), window: flow.quota.map(Window::new) }
    }
}

/// The in-memory [`ByteBudget`] of one session: shared by all its tunnels and requests in this process.
#[derive(Debug)]
pub struct Budget {
    limits: ByteLimits,
    time: Arc<dyn TimeSource>,
    up: Lane,
    down: Lane,
    /// Nanoseconds grants have asked transfers to wait, for the session's stats.
    waited: AtomicU64,
}

impl Budget {
    pub fn new(limits: ByteLimits, time: Arc<dyn TimeSource>) -> Budget {
        Budget { up: Lane::new(&limits.up), down: Lane::new(&limits.down), limits, time, waited: AtomicU64::new(0) }
    }

    /// A budget for new `limits` that keeps what `old` has counted against its quotas.
    pub fn replacing(limits: ByteLimits, old: &Budget) -> Budget {
        let budget = Budget::new(limits, old.time.clone());
        for dir in [Direction::Up, Direction::Down] {
            if let (Some(new), Some(old)) = (&budget.lane(dir).window, &old.lane(dir).window) {
                new.carry(old);
            }
        }
        budget
    }

    pub fn limits(&self) -> &ByteLimits {
        &self.limits
    }

    /// How long the session's transfers have been told to wait, in total.
    pub fn waited(&self) -> Duration {
        Duration::from_nanos(self.waited.load(Ordering::Relaxed))
    }

    /// Bytes counted against `dir`'s quota in its current window.
    pub fn used(&self, dir: Direction) -> Option<u64> {
        self.lane(dir).window.as_ref().map(|w| w.used(self.time.unix()))
    }

    fn lane(&self, dir: Direction) -> &Lane {
        match dir {
            Direction::Up => &self.up,
            Direction::Down => &self.down,
        }
    }

    /// [`ByteBudget::grant`], answered at once.
    pub fn grant_now(&self, dir: Direction, want: u64) -> Grant {
        let lane = self.lane(dir);
        let nanos = self.time.nanos();
        let mut want = want;
        if let Some(bucket) = &lane.bucket {
            want = want.min(bucket.chunk());
        }
        if want == 0 {
            return Grant::Bytes { bytes: 0, wait: Duration::ZERO };
        }
        if let Some(window) = &lane.window {
            match window.take(dir, want, self.time.unix_at(nanos)) {
                Ok(n) => want = n,
                Err(spent) => return Grant::Spent(spent),
            }
        }
        let Some(bucket) = &lane.bucket else {
            return Grant::Bytes { bytes: want, wait: Duration::ZERO };
        };
        let (bytes, wait) = bucket.reserve(want, nanos);
        if !wait.is_zero() {
            self.waited.fetch_add(u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
        }
        Grant::Bytes { bytes, wait }
    }
}

impl ByteBudget for Budget {
    fn grant(&self, dir: Direction, want: u64) -> Answer<'_, Grant> {
        Answer::ready(self.grant_now(dir, want))
    }

    fn unused(&self, dir: Direction, n: u64) {
        if n == 0 {
            return;
        }
        let lane = self.lane(dir);
        if let Some(bucket) = &lane.bucket {
            bucket.give_back(n);
        }
        if let Some(window) = &lane.window {
            window.give_back(n, self.time.unix());
        }
    }

    fn charge(&self, dir: Direction, n: u64) {
        if let Some(window) = &self.lane(dir).window
            && n > 0
        {
            window.charge(n, self.time.unix());
        }
    }

    fn has_quota(&self) -> bool {
        self.limits.has_quota()
    }

    fn spent(&self) -> Option<QuotaExceeded> {
        let now = self.time.unix();
        [Direction::Up, Direction::Down]
            .into_iter()
            .find_map(|dir| self.lane(dir).window.as_ref().and_then(|w| w.spent(dir, now)))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;

    use super::*;

    /// A clock the test moves: nanoseconds from a Unix start.
    #[derive(Debug)]
    struct Fake {
        start_unix: u64,
        nanos: AtomicU64,
    }

    impl Fake {
        fn at(start_unix: u64) -> Arc<Fake> {
            Arc::new(Fake { start_unix, nanos: AtomicU64::new(0) })
        }

        fn advance(&self, d: Duration) {
            self.nanos.fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
        }
    }

    impl TimeSource for Fake {
        fn nanos(&self) -> u64 {
            self.nanos.load(Ordering::Relaxed)
        }

        fn unix_at(&self, nanos: u64) -> u64 {
            self.start_unix + nanos / 1_000_000_000
        }
    }

    const MIB: u64 = 1 << 20;

    fn size(s: &str) -> ByteSize {
        ByteSize::parse(s).unwrap()
    }

    fn quota(s: &str) -> ByteQuota {
        ByteQuota::parse(s).unwrap()
    }

    fn bytes(bytes: u64, wait_ms: u64) -> Grant {
        Grant::Bytes { bytes, wait: Duration::from_millis(wait_ms) }
    }

    #[test]
    fn a_bucket_grants_a_chunk_at_a_time_at_its_rate() {
        // 5MiB/s: a share is 5MiB / 50 = 104857 bytes, 20ms at the rate; a quiet session has 100ms of credit.
        let b = Bucket::new(size("5MiB"));
        assert_eq!(b.chunk(), 5 * MIB / 50);
        let chunk = b.chunk();
        let start = 10_000_000_000; // 10s in: the credit is full.
        let grants: Vec<_> = (0..8).map(|_| b.reserve(10 * MIB, start)).collect();
        let waits: Vec<u64> = grants.iter().map(|(_, w)| w.as_millis() as u64).collect();
        assert!(grants.iter().all(|&(n, _)| n == chunk));
        // Five shares spend the 100ms of credit and a sixth is due now; each next one waits one more share.
        assert_eq!(waits, [0, 0, 0, 0, 0, 0, 19, 39]);
        // Over a second, the rate is what passes.
        let b = Bucket::new(size("5MiB"));
        let mut now = start;
        let mut moved = 0;
        while now < start + 1_000_000_000 {
            let (n, wait) = b.reserve(64 * 1024, now);
            now += wait.as_nanos() as u64;
            if now < start + 1_000_000_000 {
                moved += n;
            }
        }
        // 1s at 5MiB/s, plus the 100ms of credit, within one chunk.
        let expected = 5 * MIB + MIB / 2;
        assert!(moved.abs_diff(expected) <= 64 * 1024, "moved {moved}, expected about {expected}");
    }

    #[test]
    fn a_bucket_takes_back_what_was_not_moved() {
        // 1MiB/s: a share is 20971 bytes (20ms); 100ms of credit is five shares.
        let b = Bucket::new(size("1MiB"));
        let now = 1_000_000_000;
        let waits: Vec<u128> = (0..7).map(|_| b.reserve(MIB, now).1.as_millis()).collect();
        assert_eq!(waits, [0, 0, 0, 0, 0, 0, 19]);
        // Two shares given back: the next grant is due at once instead of in 39ms.
        b.give_back(b.chunk());
        b.give_back(b.chunk());
        assert_eq!(b.reserve(MIB, now), (b.chunk(), Duration::ZERO));
        assert_eq!(b.reserve(MIB, now).1.as_millis(), 19);
    }

    #[test]
    fn a_quota_counts_in_fixed_windows_and_rolls_over() {
        // 10:30 UTC into some day; the hour's window ends at 11:00.
        let day = 1_700_006_400;
        let clock = Fake::at(day + 10 * 3600 + 1800);
        let limits = ByteLimits { up: Flow { rate: None, quota: Some(quota("1MiB/hour")) }, down: Flow::default() };
        let budget = Budget::new(limits, clock.clone());
        assert_eq!(budget.grant_now(Direction::Up, 600 * 1024), bytes(600 * 1024, 0));
        // Only what is left is granted, so concurrent transfers never overshoot.
        assert_eq!(budget.grant_now(Direction::Up, 600 * 1024), bytes(424 * 1024, 0));
        let spent = QuotaExceeded {
            direction: Direction::Up,
            quota: quota("1MiB/hour"),
            used: MIB,
            resets_at: day + 11 * 3600,
        };
        assert_eq!(budget.grant_now(Direction::Up, 1), Grant::Spent(spent.clone()));
        assert_eq!(budget.spent(), Some(spent.clone()));
        assert_eq!(spent.retry_after_secs(day + 10 * 3600 + 1800), 1800);
        // Downloads have no quota here.
        assert_eq!(budget.grant_now(Direction::Down, 5 * MIB), bytes(5 * MIB, 0));
        // What a grant did not move comes back.
        budget.unused(Direction::Up, 1024);
        assert_eq!(budget.spent(), None);
        assert_eq!(budget.grant_now(Direction::Up, 4096), bytes(1024, 0));
        // The next window starts whole, exactly at the hour.
        clock.advance(Duration::from_secs(1799));
        assert_eq!(budget.grant_now(Direction::Up, 1), Grant::Spent(QuotaExceeded { ..spent.clone() }));
        clock.advance(Duration::from_secs(1));
        assert_eq!(budget.spent(), None);
        assert_eq!(budget.used(Direction::Up), Some(0));
        assert_eq!(budget.grant_now(Direction::Up, 2 * MIB), bytes(MIB, 0));
        // Bytes settled after the fact count too, and may go past the size.
        budget.charge(Direction::Up, 10);
        assert_eq!(budget.used(Direction::Up), Some(MIB + 10));
        assert_eq!(budget.spent().map(|s| (s.used, s.resets_at)), Some((MIB + 10, day + 12 * 3600)));
    }

    #[test]
    fn a_reloaded_quota_keeps_what_was_spent() {
        let clock = Fake::at(3600 * 1000);
        let hourly = |q: &str| ByteLimits { down: Flow { rate: None, quota: Some(quota(q)) }, up: Flow::default() };
        let old = Budget::new(hourly("1MiB/hour"), clock.clone());
        assert_eq!(old.grant_now(Direction::Down, MIB), bytes(MIB, 0));
        let bigger = Budget::replacing(hourly("2MiB/hour"), &old);
        assert_eq!(bigger.used(Direction::Down), Some(MIB));
        assert_eq!(bigger.grant_now(Direction::Down, 5 * MIB), bytes(MIB, 0));
        // Another period counts afresh.
        let daily = Budget::replacing(hourly("1MiB/day"), &old);
        assert_eq!(daily.used(Direction::Down), Some(0));
    }

    #[test]
    fn shaping_and_quota_together_take_the_smaller() {
        let clock = Fake::at(0);
        clock.advance(Duration::from_secs(1));
        let limits = ByteLimits {
            up: Flow { rate: Some(size("1MiB")), quota: Some(quota("20000B/minute")) },
            down: Flow::default(),
        };
        let budget = Budget::new(limits, clock.clone());
        // One chunk of the rate is 20971 bytes, more than the quota has left after the first grant.
        assert_eq!(budget.grant_now(Direction::Up, MIB), bytes(20_000, 0));
        assert!(matches!(budget.grant_now(Direction::Up, 1), Grant::Spent(_)));
        assert!(budget.has_quota());
        let shaping_only = ByteLimits { up: Flow { rate: Some(size("1MiB")), quota: None }, down: Flow::default() };
        assert!(!Budget::new(shaping_only, clock.clone()).has_quota());
        assert_eq!(budget.grant_now(Direction::Down, 7), bytes(7, 0));
        assert_eq!(budget.grant_now(Direction::Up, 0), bytes(0, 0));
    }

    #[test]
    fn limits_fall_back_to_the_servers() {
        let defaults = LimitDefaults { download_quota: Some(quota("50GiB/day")), ..LimitDefaults::default() };
        let policy = Limits { upload_bytes_per_second: Some(size("10MiB")), ..Limits::default() };
        let resolved = ByteLimits::resolve(&policy, &defaults);
        assert_eq!(resolved.up, Flow { rate: Some(size("10MiB")), quota: None });
        assert_eq!(resolved.down, Flow { rate: None, quota: Some(quota("50GiB/day")) });
        assert!(resolved.has_quota() && !resolved.is_unlimited());
        assert!(ByteLimits::resolve(&Limits::default(), &LimitDefaults::default()).is_unlimited());
    }
}
