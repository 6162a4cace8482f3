//! Byte quotas in the shared store: one counter per session, direction and window
//! (`sluice:{KEY}:quota:upload:PERIOD:START`) that expires with its window, incremented in batches.
//!
//! Bytes are counted here first — each grant and charge adds to the lane's `pending`, at memory speed — and
//! moved into the store by one pipelined `INCRBY` per lane every [`FLUSH_EVERY`], which also reads back
//! what every instance has counted. A grant is refused once the store's count plus this instance's pending
//! bytes reach the quota. Staleness, stated: the store lags each instance by at most one flush interval of
//! that instance's traffic for the session, so together the instances may overshoot a quota by at most
//! [`FLUSH_EVERY`] × the session's aggregate throughput (plus the grants in flight); an instance that has
//! not yet seen a session reads the store before admitting it. Shaping stays per instance.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use super::super::budget::{ByteLimits, TimeSource};
use super::super::{Answer, ByteBudget, ByteCounter, ByteMeter, Direction, Grant, LimitKey, QuotaExceeded};
use crate::policy::quota::ByteQuota;

/// How often pending bytes move into the store (and the other instances' counts come back).
pub const FLUSH_EVERY: Duration = Duration::from_millis(200);

/// Seconds a window's counter outlives the window, so a late flush still lands in it.
const WINDOW_GRACE: u64 = 60;

/// One direction of one session's quota on this instance.
#[derive(Debug)]
pub(super) struct Lane {
    pub(super) quota: ByteQuota,
    /// Bytes counted here and not yet in the store (negative: grants given back after their flush).
    pending: AtomicI64,
    /// The store's count for the window starting at `.0`, as of the last flush.
    stored: Mutex<(u64, u64)>,
}

impl Lane {
    fn new(quota: ByteQuota) -> Lane {
        Lane { quota, pending: AtomicI64::new(0), stored: Mutex::new((0, 0)) }
    }

    /// Bytes counted in the window holding `now`, everywhere as far as this instance knows.
    fn used(&self, now: u64) -> u64 {
        let start = self.quota.window(now).start;
        let (at, stored) = *self.stored.lock().unwrap_or_else(PoisonError::into_inner);
        let stored = if at == start { stored } else { 0 };
        stored.saturating_add(u64::try_from(self.pending.load(Ordering::Acquire)).unwrap_or(0))
    }

    fn spent(&self, dir: Direction, now: u64) -> Option<QuotaExceeded> {
        let used = self.used(now);
        (used >= self.quota.size.as_u64()).then(|| QuotaExceeded {
            direction: dir,
            quota: self.quota,
            used,
            resets_at: self.quota.window(now).end,
        })
    }

    fn add(&self, n: u64) {
        self.pending.fetch_add(i64::try_from(n).unwrap_or(i64::MAX), Ordering::AcqRel);
    }

    fn take_back(&self, n: u64) {
        self.pending.fetch_sub(i64::try_from(n).unwrap_or(i64::MAX), Ordering::AcqRel);
    }
}

/// A session's quota lanes on this instance, shared by its tunnels' and requests' budgets.
#[derive(Debug)]
pub(super) struct SessionQuota {
    pub(super) key: LimitKey,
    pub(super) up: Option<Lane>,
    pub(super) down: Option<Lane>,
}

impl SessionQuota {
    fn new(key: LimitKey, limits: &ByteLimits) -> SessionQuota {
        SessionQuota { key, up: limits.up.quota.map(Lane::new), down: limits.down.quota.map(Lane::new) }
    }

    fn lane(&self, dir: Direction) -> Option<&Lane> {
        match dir {
            Direction::Up => self.up.as_ref(),
            Direction::Down => self.down.as_ref(),
        }
    }

    fn quotas(&self) -> (Option<ByteQuota>, Option<ByteQuota>) {
        (self.up.as_ref().map(|l| l.quota), self.down.as_ref().map(|l| l.quota))
    }

    /// The first spent quota (upload, then download) as far as this instance knows.
    pub(super) fn spent(&self, now: u64) -> Option<QuotaExceeded> {
        [Direction::Up, Direction::Down].into_iter().find_map(|d| self.lane(d).and_then(|l| l.spent(d, now)))
    }

    /// What to send the store: per lane, its counter key, the bytes to add (taken from `pending`), the
    /// counter's TTL and the window it belongs to.
    pub(super) fn take_pending(&self, now: u64) -> Vec<Flush> {
        [Direction::Up, Direction::Down]
            .into_iter()
            .filter_map(|dir| {
                let lane = self.lane(dir)?;
                let window = lane.quota.window(now);
                Some(Flush {
                    dir,
                    key: format!(
                        "sluice:{{{}}}:quota:{}:{}:{}",
                        self.key,
                        dir.as_str(),
                        lane.quota.period.seconds(),
                        window.start
                    ),
                    add: lane.pending.swap(0, Ordering::AcqRel),
                    ttl: window.end.saturating_sub(now) + WINDOW_GRACE,
                    start: window.start,
                })
            })
            .collect()
    }

    /// Records the store's answer to a flush.
    pub(super) fn stored(&self, flush: &Flush, total: i64) {
        if let Some(lane) = self.lane(flush.dir) {
            *lane.stored.lock().unwrap_or_else(PoisonError::into_inner) =
                (flush.start, u64::try_from(total).unwrap_or(0));
        }
    }

    /// Puts back bytes whose flush failed, to go with the next one.
    pub(super) fn unflushed(&self, flush: &Flush) {
        if let Some(lane) = self.lane(flush.dir) {
            lane.pending.fetch_add(flush.add, Ordering::AcqRel);
        }
    }

    fn idle(&self) -> bool {
        [&self.up, &self.down].into_iter().flatten().all(|l| l.pending.load(Ordering::Acquire) == 0)
    }
}

/// One lane's share of a flush.
#[derive(Debug)]
pub(super) struct Flush {
    dir: Direction,
    pub(super) key: String,
    pub(super) add: i64,
    pub(super) ttl: u64,
    start: u64,
}

/// This instance's sessions with quotas.
#[derive(Debug, Default)]
pub(super) struct Quotas {
    sessions: Mutex<HashMap<LimitKey, Arc<SessionQuota>>>,
}

impl Quotas {
    /// `key`'s lanes under `limits`, created on first sight; new quotas (a reloaded policy) get new lanes
    /// that keep the pending bytes.
    pub(super) fn session(&self, key: &LimitKey, limits: &ByteLimits) -> Arc<SessionQuota> {
        let mut map = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(s) = map.get(key)
            && s.quotas() == (limits.up.quota, limits.down.quota)
        {
            return s.clone();
        }
        let new = Arc::new(SessionQuota::new(key.clone(), limits));
        if let Some(old) = map.get(key) {
            for dir in [Direction::Up, Direction::Down] {
                if let (Some(from), Some(to)) = (old.lane(dir), new.lane(dir)) {
                    to.pending.fetch_add(from.pending.swap(0, Ordering::AcqRel), Ordering::AcqRel);
                }
            }
        }
        map.insert(key.clone(), new.clone());
        new
    }

    pub(super) fn all(&self) -> Vec<Arc<SessionQuota>> {
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner).values().cloned().collect()
    }

    /// Forgets sessions no budget holds any more and whose bytes are all in the store.
    pub(super) fn forget_idle(&self) {
        self.sessions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|_, s| Arc::strong_count(s) > 1 || !s.idle());
    }
}

/// A session's budget with quotas in the store: this instance's budget (shaping, and its own share of the
/// quota) with the session's shared count in front.
pub(super) struct SharedBudget {
    pub(super) local: Option<Arc<dyn ByteBudget>>,
    pub(super) quota: Arc<SessionQuota>,
    pub(super) time: Arc<dyn TimeSource>,
}

impl fmt::Debug for SharedBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedBudget").field("quota", &self.quota).finish_non_exhaustive()
    }
}

impl ByteBudget for SharedBudget {
    fn grant(&self, dir: Direction, want: u64) -> Answer<'_, Grant> {
        let lane = self.quota.lane(dir);
        let mut want = want;
        if let Some(lane) = lane {
            let now = self.time.unix();
            if let Some(spent) = lane.spent(dir, now) {
                return Answer::ready(Grant::Spent(spent));
            }
            want = want.min(lane.quota.size.as_u64().saturating_sub(lane.used(now)));
        }
        let grant = match &self.local {
            Some(local) => match local.grant(dir, want).now() {
                Ok(grant) => grant,
                // The in-memory budget always answers at once; a later one would need awaiting here.
                Err(_) => Grant::Bytes { bytes: 0, wait: FLUSH_EVERY },
            },
            None => Grant::Bytes { bytes: want, wait: Duration::ZERO },
        };
        if let (Grant::Bytes { bytes, .. }, Some(lane)) = (&grant, lane) {
            lane.add(*bytes);
        }
        Answer::ready(grant)
    }

    fn unused(&self, dir: Direction, n: u64) {
        if let Some(local) = &self.local {
            local.unused(dir, n);
        }
        if let Some(lane) = self.quota.lane(dir) {
            lane.take_back(n);
        }
    }

    fn charge(&self, dir: Direction, n: u64) {
        if let Some(local) = &self.local {
            local.charge(dir, n);
        }
        if let Some(lane) = self.quota.lane(dir) {
            lane.add(n);
        }
    }

    fn spent(&self) -> Option<QuotaExceeded> {
        self.quota.spent(self.time.unix()).or_else(|| self.local.as_ref().and_then(|l| l.spent()))
    }
}

/// Counts into a session's meter on this instance: what a meter with a shared budget counts with.
#[derive(Debug)]
pub(super) struct MeterCounter(pub(super) ByteMeter);

impl ByteCounter for MeterCounter {
    fn add_up(&self, n: u64) {
        self.0.add_up(n);
    }

    fn add_down(&self, n: u64) {
        self.0.add_down(n);
    }

    fn totals(&self) -> (u64, u64) {
        self.0.totals()
    }
}
