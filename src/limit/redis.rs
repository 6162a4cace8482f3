//! The shared-store limiter: every instance counts a session's requests and open tunnels in one Redis
//! server, so that limits hold however a balancer spreads the session's connections.
//!
//! - **Request rates** are GCRA in one server-side script per check: one round trip, the session's
//!   theoretical arrival time kept under `sluice:{KEY}:rate` with a TTL that ends when the burst has fully
//!   replenished, so an idle session costs nothing.
//! - **Open tunnels** are leases: a sorted set `sluice:{KEY}:tunnels` whose members (`INSTANCE:N`) are scored
//!   by their expiry. Opening drops expired members, counts the rest, and adds one below `max_tunnels`.
//!   Each instance refreshes the leases it holds every third of `lease_ttl`, so the tunnels of an instance
//!   that died stop counting within one `lease_ttl`; a closed tunnel's member is removed at once.
//! - **Byte quotas** are counters per session, direction and window that expire with their window,
//!   incremented in batches as bytes move; [`quota`] states the staleness bound.
//! - **Scripts** are sent by hash (`EVALSHA`); a server that does not know one (`NOSCRIPT`, e.g. after a
//!   restart) gets it loaded once and the call retried.
//! - **Deadline**: every call the egress path waits on is cut at `[limits.store] timeout`. A failed or late
//!   call marks the store down: meanwhile, `on_error = "local"` answers from the in-memory limiter (limits
//!   per instance) and `"refuse"` answers [`Limited::StoreUnavailable`]; the store is probed in the
//!   background and used again as soon as it answers. Each transition is logged once.
//!
//! Keys carry the session in a hash tag (`{KEY}`) so that one session's keys would share a slot, but the
//! refresh script touches many sessions at once: the store is one Redis server (or a primary), not a Cluster.

mod quota;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, RedisError, Script};
use tokio::sync::mpsc;

use self::quota::{FLUSH_EVERY, MeterCounter, Quotas, SessionQuota, SharedBudget};
use super::budget::{ByteLimits, TimeSource, WallClock};
use super::memory::describe;
use super::{
    Answer, ByteBudget, ByteCounter, ByteMeter, Lease, LimitKey, Limited, Limiter, MemoryLimiter, QuotaExceeded,
    RateLimited, SessionStats, TooManyTunnels, TunnelRefused, TunnelSlot,
};
use crate::config::{LimitDefaults, OnStoreError, redact_url};
use crate::metrics::Metrics;
use crate::policy::Limits;

// The scripts share their pieces as Lua source, joined at compile time: one copy of each rule.

/// `now_us`: the server's clock in µs, the one clock every instance's scripts agree on.
macro_rules! lua_now {
    () => {
        r"
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
"
    };
}

/// `gcra(key, now_us, interval, burst)`: one request against the arrival time (µs) stored at `key`;
/// returns 0 when it passes (and stores the new time, expiring once the burst has refilled), else the µs
/// until it would.
macro_rules! lua_gcra {
    () => {
        r"
local function gcra(key, now, interval, burst)
  local tat = tonumber(redis.call('GET', key) or now)
  if tat < now then tat = now end
  local new_tat = tat + interval
  local allow_at = new_tat - burst * interval
  if allow_at > now then
    return math.max(1, math.ceil(allow_at - now))
  end
  redis.call('SET', key, string.format('%.0f', new_tat), 'PX', math.max(1, math.ceil((new_tat - now) / 1000)))
  return 0
end
"
    };
}

/// `lease(key, now_ms, member, ttl_ms, max)`: a place in the sorted set of leases at `key`, scored by expiry
/// (expired ones dropped first); returns the live leases counting this one, or 0 and the count when `max`
/// are already held.
macro_rules! lua_lease {
    () => {
        r"
local function lease(key, now, member, ttl, max)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  local open = redis.call('ZCARD', key)
  if open >= max then return 0, open end
  redis.call('ZADD', key, now + ttl, member)
  redis.call('PEXPIRE', key, ttl)
  return open + 1, open
end
"
    };
}

/// One request. KEYS[1]: the session's arrival time; ARGV[1]: the emission interval in µs; ARGV[2]: the
/// burst. Returns 0 when the request passes, else the µs until it would.
const CHECK: &str =
    concat!(lua_now!(), lua_gcra!(), "return gcra(KEYS[1], now_us, tonumber(ARGV[1]), tonumber(ARGV[2]))\n");

/// Takes a lease. KEYS[1]: the session's leases; ARGV[1]: the member; ARGV[2]: the TTL in ms; ARGV[3]:
/// `max_tunnels`. Returns the live leases counting this one, or 0 when the session already has `max`.
const OPEN: &str = concat!(
    lua_now!(),
    lua_lease!(),
    "return (lease(KEYS[1], math.floor(now_us / 1000), ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])))\n"
);

/// A new tunnel: [`CHECK`] on KEYS[1], then [`OPEN`] on KEYS[2], in one call. ARGV: interval (µs), burst,
/// member, TTL (ms), max. Returns `{0, open}` when admitted, `{1, µs to wait}` over the rate, `{2, open}` at
/// `max_tunnels` (the rate's cell is spent then, as with two calls).
const ADMIT: &str = concat!(
    lua_now!(),
    lua_gcra!(),
    lua_lease!(),
    r"
local wait = gcra(KEYS[1], now_us, tonumber(ARGV[1]), tonumber(ARGV[2]))
if wait > 0 then return {1, wait} end
local n, open = lease(KEYS[2], math.floor(now_us / 1000), ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]))
if n == 0 then return {2, open} end
return {0, n}
"
);

/// Extends this instance's live leases. KEYS: lease sets; ARGV[1]: the TTL in ms; ARGV[i + 1]: the member
/// in KEYS[i]. A member the store lost (a restart) is added back: the tunnel is still open.
const REFRESH: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, now + ttl, ARGV[i + 1])
  if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
end
return #KEYS
";

/// Leases refreshed per script call, so one call never holds the server for long.
const REFRESH_BATCH: usize = 512;

/// Deadline of the calls no request waits on (refreshes, releases, probes).
const BACKGROUND_TIMEOUT: Duration = Duration::from_secs(1);

/// How often a store that is down is probed.
const PROBE_EVERY: Duration = Duration::from_millis(250);

/// The store's state, for `/healthz` and the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreHealth {
    Up,
    /// Unreachable; counting per instance meanwhile (`on_error = "local"`).
    Degraded {
        reason: String,
    },
    /// Unreachable; refusing what needs it (`on_error = "refuse"`).
    Down {
        reason: String,
    },
}

/// Per-session limits in a Redis server shared by every instance; see the module documentation.
pub struct RedisLimiter {
    store: Arc<Store>,
}

struct Store {
    conn: ConnectionManager,
    /// The runtime the store's calls run in (see [`crate::listen::inside`]): the one that started it.
    runtime: tokio::runtime::Handle,
    /// The url without its password, for the log and `/healthz`.
    url: String,
    /// Answers while the store is down (`on_error = "local"`), and keeps this instance's own counts: its
    /// byte counters, and a place per open tunnel, so that a session this instance alone has at
    /// `max_tunnels` is refused without a round trip.
    local: MemoryLimiter,
    on_error: OnStoreError,
    timeout: Duration,
    lease_ttl: Duration,
    up: AtomicBool,
    /// Why the store was last marked down.
    last_error: Mutex<String>,
    metrics: Arc<Metrics>,
    /// Names this process's leases: random, so a restarted instance never refreshes its predecessor's.
    instance: String,
    next_lease: AtomicU64,
    /// This instance's leases in the store, by number: what the refresher extends.
    leases: Mutex<HashMap<u64, LimitKey>>,
    /// Closed leases whose members the background task removes.
    released: mpsc::UnboundedSender<(LimitKey, u64)>,
    check: Script,
    open: Script,
    admit: Script,
    refresh: Script,
    /// This instance's sessions with byte quotas, flushed to the store every [`FLUSH_EVERY`].
    quotas: Quotas,
    time: Arc<dyn TimeSource>,
}

impl RedisLimiter {
    /// Starts the limiter on `defaults.store`'s url, with its background task (lease refresh, releases,
    /// probes). Must run inside a Tokio runtime. A store that cannot be reached yet is not an error: it is
    /// marked down, logged, and probed until it answers.
    pub async fn start(defaults: LimitDefaults, metrics: Arc<Metrics>) -> Result<RedisLimiter, String> {
        let settings = defaults.store.clone();
        let url = settings.url.clone().ok_or("[limits.store] kind = \"redis\" needs a url")?;
        let shown = redact_url(&url);
        let client = Client::open(url.as_str()).map_err(|e| format!("[limits.store] url {shown:?}: {e}"))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(BACKGROUND_TIMEOUT))
            .set_response_timeout(Some(BACKGROUND_TIMEOUT))
            .set_number_of_retries(2)
            .set_max_delay(PROBE_EVERY);
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| format!("[limits.store] url {shown:?}: {e}"))?;
        let mut instance = [0u8; 8];
        getrandom::fill(&mut instance).map_err(|e| format!("cannot draw an instance id: {e}"))?;
        let (released, releases) = mpsc::unbounded_channel();
        let store = Arc::new(Store {
            conn,
            runtime: tokio::runtime::Handle::current(),
            url: shown,
            local: MemoryLimiter::new(defaults),
            on_error: settings.on_error,
            timeout: settings.timeout,
            lease_ttl: settings.lease_ttl,
            // Up until a call says otherwise, so that the first failure is logged as the transition it is.
            up: AtomicBool::new(true),
            last_error: Mutex::new("not yet reached".into()),
            metrics,
            instance: instance.iter().map(|b| format!("{b:02x}")).collect(),
            next_lease: AtomicU64::new(0),
            leases: Mutex::new(HashMap::new()),
            released,
            check: Script::new(CHECK),
            open: Script::new(OPEN),
            admit: Script::new(ADMIT),
            refresh: Script::new(REFRESH),
            quotas: Quotas::default(),
            time: Arc::new(WallClock::default()),
        });
        store.metrics.limit_store_up.set(1);
        match store.probe().await {
            Ok(()) => {
                tracing::info!(target: "sluice::limit", store = %store.url, "limit store reachable; limits are shared")
            }
            Err(e) => store.mark_down(&e),
        }
        tokio::spawn(background(Arc::downgrade(&store), releases));
        Ok(RedisLimiter { store })
    }

    pub fn health(&self) -> StoreHealth {
        let s = &self.store;
        if s.up.load(Ordering::Acquire) {
            return StoreHealth::Up;
        }
        let reason = format!("limit store {} unreachable: {}", s.url, s.last_error());
        match s.on_error {
            OnStoreError::Local => StoreHealth::Degraded { reason },
            OnStoreError::Refuse => StoreHealth::Down { reason },
        }
    }

    /// Whether the last call to the store succeeded.
    pub fn is_up(&self) -> bool {
        self.store.up.load(Ordering::Acquire)
    }
}

impl fmt::Debug for RedisLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLimiter")
            .field("url", &self.store.url)
            .field("up", &self.store.up.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// A failed or late call to the store.
#[derive(Debug)]
enum StoreError {
    Redis(RedisError),
    Late(Duration),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Redis(e) => write!(f, "{e}"),
            StoreError::Late(d) => write!(f, "no answer within {d:?}"),
        }
    }
}

fn rate_key(key: &LimitKey) -> String {
    format!("sluice:{{{key}}}:rate")
}

fn tunnels_key(key: &LimitKey) -> String {
    format!("sluice:{{{key}}}:tunnels")
}

impl Store {
    fn last_error(&self) -> String {
        self.last_error.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn mark_down(&self, e: &StoreError) {
        self.metrics.limit_store_errors.inc();
        *self.last_error.lock().unwrap_or_else(PoisonError::into_inner) = e.to_string();
        if self.up.swap(false, Ordering::AcqRel) {
            self.metrics.limit_store_up.set(0);
            let meanwhile = match self.on_error {
                OnStoreError::Local => "counting limits per instance meanwhile",
                OnStoreError::Refuse => "refusing requests that need it meanwhile",
            };
            tracing::warn!(target: "sluice::limit", store = %self.url, error = %e, "limit store unreachable; {meanwhile}");
        }
    }

    fn mark_up(&self) {
        // A load first: on the hot path the store is up, and a swap would contend on the line.
        if !self.up.load(Ordering::Acquire) && !self.up.swap(true, Ordering::AcqRel) {
            self.metrics.limit_store_up.set(1);
            tracing::info!(target: "sluice::limit", store = %self.url, "limit store reachable; limits are shared");
        }
    }

    async fn within<T>(
        &self,
        deadline: Duration,
        call: impl Future<Output = Result<T, RedisError>>,
    ) -> Result<T, StoreError> {
        // Inside the store's runtime: the connection manager connects lazily and reconnects from whichever
        // call finds it down, and would otherwise leave its driver task on an accept thread.
        match crate::listen::inside(Some(&self.runtime), tokio::time::timeout(deadline, call)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(StoreError::Redis(e)),
            Err(_) => Err(StoreError::Late(deadline)),
        }
    }

    async fn probe(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let pong: String = self.within(BACKGROUND_TIMEOUT, redis::cmd("PING").query_async(&mut conn)).await?;
        if pong == "PONG" {
            Ok(())
        } else {
            Err(StoreError::Redis(RedisError::from((redis::ErrorKind::Parse, "PING answered", pong))))
        }
    }

    /// The rate check in the store; `Err` when the store did not answer in time.
    async fn check_shared(&self, key: &LimitKey, rps: f64, burst: u32) -> Result<Result<(), RateLimited>, StoreError> {
        let interval = 1e6 / rps;
        let mut conn = self.conn.clone();
        let mut call = self.check.key(rate_key(key));
        call.arg(interval).arg(burst);
        let wait: i64 = self.within(self.timeout, call.invoke_async(&mut conn)).await?;
        self.mark_up();
        Ok(match u64::try_from(wait) {
            Ok(0) | Err(_) => Ok(()),
            Ok(us) => Err(RateLimited { retry_after: Duration::from_micros(us), limit: describe(rps, burst) }),
        })
    }

    async fn open_shared(&self, key: &LimitKey, id: u64, max: u32) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        let mut call = self.open.key(tunnels_key(key));
        call.arg(self.member(id)).arg(millis(self.lease_ttl)).arg(max);
        let open: i64 = self.within(self.timeout, call.invoke_async(&mut conn)).await?;
        self.mark_up();
        Ok(open > 0)
    }

    /// The rate check and the lease of a new tunnel in one round trip.
    async fn admit_shared(
        &self,
        key: &LimitKey,
        id: u64,
        (rps, burst, max): (f64, u32, u32),
    ) -> Result<Result<(), TunnelRefused>, StoreError> {
        let mut conn = self.conn.clone();
        let mut call = self.admit.key(rate_key(key));
        call.key(tunnels_key(key)).arg(1e6 / rps).arg(burst).arg(self.member(id)).arg(millis(self.lease_ttl)).arg(max);
        let answer: Vec<i64> = self.within(self.timeout, call.invoke_async(&mut conn)).await?;
        self.mark_up();
        Ok(match answer.as_slice() {
            [0, ..] => Ok(()),
            [1, wait, ..] => Err(TunnelRefused::Rate(RateLimited {
                retry_after: Duration::from_micros(u64::try_from(*wait).unwrap_or(1)),
                limit: describe(rps, burst),
            })),
            _ => Err(TunnelRefused::Tunnels(TooManyTunnels { max })),
        })
    }

    fn member(&self, id: u64) -> String {
        format!("{}:{id}", self.instance)
    }

    /// Extends every live lease of this instance.
    async fn refresh_leases(&self) -> Result<(), StoreError> {
        let leases: Vec<(String, String)> = {
            let map = self.leases.lock().unwrap_or_else(PoisonError::into_inner);
            map.iter().map(|(id, key)| (tunnels_key(key), self.member(*id))).collect()
        };
        for batch in leases.chunks(REFRESH_BATCH) {
            let mut call = self.refresh.prepare_invoke();
            call.arg(millis(self.lease_ttl));
            for (key, member) in batch {
                call.key(key).arg(member);
            }
            let mut conn = self.conn.clone();
            let _: i64 = self.within(BACKGROUND_TIMEOUT, call.invoke_async(&mut conn)).await?;
        }
        Ok(())
    }

    /// Removes closed leases' members, in one pipeline.
    async fn remove_leases(&self, closed: &[(LimitKey, u64)]) -> Result<(), StoreError> {
        let mut pipe = redis::pipe();
        for (key, id) in closed {
            pipe.cmd("ZREM").arg(tunnels_key(key)).arg(self.member(*id)).ignore();
        }
        let mut conn = self.conn.clone();
        self.within(BACKGROUND_TIMEOUT, pipe.query_async::<()>(&mut conn)).await
    }

    /// Moves the sessions' pending quota bytes into the store in one pipeline, and reads back what every
    /// instance has counted. Bytes whose flush failed go with the next one.
    async fn flush_quotas(&self, sessions: &[Arc<SessionQuota>], deadline: Duration) -> Result<(), StoreError> {
        let now = self.time.unix();
        let flushes: Vec<(&Arc<SessionQuota>, quota::Flush)> =
            sessions.iter().flat_map(|s| s.take_pending(now).into_iter().map(move |f| (s, f))).collect();
        if flushes.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (_, f) in &flushes {
            pipe.cmd("INCRBY").arg(&f.key).arg(f.add).cmd("EXPIRE").arg(&f.key).arg(f.ttl).ignore();
        }
        let mut conn = self.conn.clone();
        match self.within(deadline, pipe.query_async::<Vec<i64>>(&mut conn)).await {
            Ok(totals) => {
                for ((session, f), total) in flushes.iter().zip(totals) {
                    session.stored(f, total);
                }
                Ok(())
            }
            Err(e) => {
                for (session, f) in &flushes {
                    session.unflushed(f);
                }
                Err(e)
            }
        }
    }

    /// `key`'s meter under `limits`: this instance's counters, and a budget whose quotas are counted in the
    /// store when the session has quotas.
    fn meter_for(&self, key: &LimitKey, limits: &Limits) -> ByteMeter {
        let local = self.local.meter(key, limits);
        let bytes = ByteLimits::resolve(limits, self.local.defaults());
        if !bytes.has_quota() {
            return local;
        }
        let budget: Arc<dyn ByteBudget> = Arc::new(SharedBudget {
            local: local.budget().cloned(),
            quota: self.quotas.session(key, &bytes),
            time: self.time.clone(),
        });
        ByteMeter::with_budget(Arc::new(MeterCounter(local)), Some(budget))
    }

    /// What a check gets while the store is down.
    fn check_fallback(&self, key: &LimitKey, limits: &Limits) -> Result<(), Limited<RateLimited>> {
        match self.on_error {
            OnStoreError::Local => self.local.check_now(key, limits).map_err(Limited::Over),
            OnStoreError::Refuse => Err(Limited::StoreUnavailable),
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A tunnel's lease in the store, with its place in this instance's own count.
struct SharedSlot {
    store: Weak<Store>,
    key: LimitKey,
    id: u64,
    /// The place in the local count, given back on release (a meter may outlive the lease).
    local: Mutex<Option<Lease>>,
    /// The session's byte counters on this instance.
    meter: ByteMeter,
}

impl fmt::Debug for SharedSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedSlot").field("key", &self.key).field("id", &self.id).finish_non_exhaustive()
    }
}

impl SharedSlot {
    /// The lease on this slot, with the session's byte budget when its limits shape or quota bytes.
    fn lease(self) -> Lease {
        let budget = self.meter.budget().cloned();
        Lease::with_budget(Arc::new(self), budget)
    }
}

impl ByteCounter for SharedSlot {
    fn add_up(&self, n: u64) {
        self.meter.add_up(n);
    }

    fn add_down(&self, n: u64) {
        self.meter.add_down(n);
    }

    fn totals(&self) -> (u64, u64) {
        self.meter.totals()
    }
}

impl TunnelSlot for SharedSlot {
    fn release(&self) {
        drop(self.local.lock().unwrap_or_else(PoisonError::into_inner).take());
        if let Some(store) = self.store.upgrade() {
            let live = store.leases.lock().unwrap_or_else(PoisonError::into_inner).remove(&self.id);
            if live.is_some() {
                // The background task removes the member; if it cannot, the lease expires on its own.
                let _ = store.released.send((self.key.clone(), self.id));
            }
        }
    }
}

impl RedisLimiter {
    /// A tunnel's lease on the shared count, holding its place in `local`. Registered with this instance
    /// before the store sees it, so a refresh racing the open cannot miss it; and it exists before the
    /// round trip, so if the store refuses, or the admission is abandoned mid-call, dropping it gives
    /// both places back (removing a member never added is harmless).
    fn shared_lease(&self, key: &LimitKey, limits: &Limits, local: Lease) -> (u64, Lease) {
        let store = &*self.store;
        let id = store.next_lease.fetch_add(1, Ordering::Relaxed);
        store.leases.lock().unwrap_or_else(PoisonError::into_inner).insert(id, key.clone());
        let slot = SharedSlot {
            store: Arc::downgrade(&self.store),
            meter: store.meter_for(key, limits),
            key: key.clone(),
            id,
            local: Mutex::new(Some(local)),
        };
        (id, slot.lease())
    }
}

impl Limiter for RedisLimiter {
    fn check_request(&self, key: &LimitKey, limits: &Limits) -> Answer<'_, Result<(), Limited<RateLimited>>> {
        let store = &*self.store;
        if !store.up.load(Ordering::Acquire) {
            return Answer::ready(store.check_fallback(key, limits));
        }
        let defaults = store.local.defaults();
        let rps = limits.requests_per_second.unwrap_or(defaults.requests_per_second);
        let burst = limits.burst.unwrap_or(defaults.burst);
        let (key, limits) = (key.clone(), *limits);
        Answer::later(async move {
            match store.check_shared(&key, rps, burst).await {
                Ok(answer) => answer.map_err(Limited::Over),
                Err(e) => {
                    store.mark_down(&e);
                    store.check_fallback(&key, &limits)
                }
            }
        })
    }

    fn open_tunnel(&self, key: &LimitKey, limits: &Limits) -> Answer<'_, Result<Lease, Limited<TooManyTunnels>>> {
        let store = &*self.store;
        let max = limits.max_tunnels.unwrap_or(store.local.defaults().max_tunnels);
        // This instance's own tunnels are all live: at max here, the session is at max everywhere.
        let local = match store.local.open_tunnel_now(key, limits) {
            Ok(lease) => lease,
            Err(over) => return Answer::ready(Err(Limited::Over(over))),
        };
        if !store.up.load(Ordering::Acquire) {
            return Answer::ready(match store.on_error {
                OnStoreError::Local => Ok(local),
                OnStoreError::Refuse => Err(Limited::StoreUnavailable),
            });
        }
        let (key, limits) = (key.clone(), *limits);
        Answer::later(async move {
            let (id, lease) = self.shared_lease(&key, &limits, local);
            match store.open_shared(&key, id, max).await {
                Ok(true) => Ok(lease),
                Ok(false) => Err(Limited::Over(TooManyTunnels { max })),
                Err(e) => {
                    store.mark_down(&e);
                    // The store may have added the member before the deadline: the refresher keeps it while
                    // the tunnel lives, and the lease's release removes it.
                    match store.on_error {
                        OnStoreError::Local => Ok(lease),
                        OnStoreError::Refuse => Err(Limited::StoreUnavailable),
                    }
                }
            }
        })
    }

    /// One round trip instead of two: the rate check and the lease in one script.
    fn admit_tunnel(&self, key: &LimitKey, limits: &Limits) -> Answer<'_, Result<Lease, Limited<TunnelRefused>>> {
        let store = &*self.store;
        if !store.up.load(Ordering::Acquire) {
            if let Err(e) = store.check_fallback(key, limits) {
                return Answer::ready(Err(e.map(TunnelRefused::Rate)));
            }
            // Down: answered at once, from this instance.
            return match self.open_tunnel(key, limits).now() {
                Ok(opened) => Answer::ready(opened.map_err(|e| e.map(TunnelRefused::Tunnels))),
                Err(later) => Answer::later(async move { later.await.map_err(|e| e.map(TunnelRefused::Tunnels)) }),
            };
        }
        let defaults = store.local.defaults();
        let rps = limits.requests_per_second.unwrap_or(defaults.requests_per_second);
        let burst = limits.burst.unwrap_or(defaults.burst);
        let max = limits.max_tunnels.unwrap_or(defaults.max_tunnels);
        let local = match store.local.open_tunnel_now(key, limits) {
            Ok(lease) => lease,
            Err(over) => return Answer::ready(Err(Limited::Over(TunnelRefused::Tunnels(over)))),
        };
        let (key, limits) = (key.clone(), *limits);
        Answer::later(async move {
            let (id, lease) = self.shared_lease(&key, &limits, local);
            match store.admit_shared(&key, id, (rps, burst, max)).await {
                Ok(Ok(())) => Ok(lease),
                Ok(Err(refused)) => Err(Limited::Over(refused)),
                Err(e) => {
                    store.mark_down(&e);
                    store.check_fallback(&key, &limits).map_err(|e| e.map(TunnelRefused::Rate))?;
                    Ok(lease)
                }
            }
        })
    }

    /// Reads the store (and hands it this instance's pending bytes) before admitting a session with
    /// quotas, so that a quota spent through another instance is refused here too.
    fn check_quota(&self, key: &LimitKey, limits: &Limits) -> Answer<'_, Result<(), QuotaExceeded>> {
        let store = &*self.store;
        let bytes = ByteLimits::resolve(limits, store.local.defaults());
        if !bytes.has_quota() {
            return Answer::ready(Ok(()));
        }
        let session = store.quotas.session(key, &bytes);
        let decide =
            move |session: &SessionQuota, key: &LimitKey, limits: &Limits| match session.spent(store.time.unix()) {
                Some(spent) => Err(spent),
                None => store.local.check_quota_now(key, limits),
            };
        if !store.up.load(Ordering::Acquire) {
            return Answer::ready(decide(&session, key, limits));
        }
        let (key, limits) = (key.clone(), *limits);
        Answer::later(async move {
            if let Err(e) = store.flush_quotas(std::slice::from_ref(&session), store.timeout).await {
                store.mark_down(&e);
            }
            decide(&session, &key, &limits)
        })
    }

    fn meter(&self, key: &LimitKey, limits: &Limits) -> ByteMeter {
        self.store.meter_for(key, limits)
    }

    /// This instance's counts: its bytes and its open tunnels (the store holds the shared ones).
    fn session_stats(&self, key: &LimitKey) -> Option<SessionStats> {
        self.store.local.session_stats(key)
    }

    fn housekeeping(&self) {
        self.store.local.housekeeping();
        self.store.quotas.forget_idle();
    }
}

/// Refreshes leases, removes closed ones, and probes a store that is down, until the limiter is dropped.
async fn background(store: Weak<Store>, mut releases: mpsc::UnboundedReceiver<(LimitKey, u64)>) {
    let Some(ttl) = store.upgrade().map(|s| s.lease_ttl) else { return };
    let mut refresh = tokio::time::interval(ttl / 3);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut flush = tokio::time::interval(FLUSH_EVERY);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut probe = tokio::time::interval(PROBE_EVERY);
    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            first = releases.recv() => {
                let Some(first) = first else { return };
                let mut closed = vec![first];
                while closed.len() < REFRESH_BATCH {
                    match releases.try_recv() {
                        Ok(next) => closed.push(next),
                        Err(_) => break,
                    }
                }
                let Some(store) = store.upgrade() else { return };
                if store.up.load(Ordering::Acquire)
                    && let Err(e) = store.remove_leases(&closed).await
                {
                    store.mark_down(&e);
                }
            }
            _ = refresh.tick() => {
                let Some(store) = store.upgrade() else { return };
                if store.up.load(Ordering::Acquire)
                    && let Err(e) = store.refresh_leases().await
                {
                    store.mark_down(&e);
                }
            }
            _ = flush.tick() => {
                let Some(store) = store.upgrade() else { return };
                if store.up.load(Ordering::Acquire)
                    && let Err(e) = store.flush_quotas(&store.quotas.all(), BACKGROUND_TIMEOUT).await
                {
                    store.mark_down(&e);
                }
            }
            _ = probe.tick() => {
                let Some(store) = store.upgrade() else { return };
                if !store.up.load(Ordering::Acquire) {
                    match store.probe().await {
                        Ok(()) => {
                            // Leases this instance holds go back into the store before it counts again.
                            match store.refresh_leases().await {
                                Ok(()) => store.mark_up(),
                                Err(e) => store.mark_down(&e),
                            }
                        }
                        Err(e) => {
                            *store.last_error.lock().unwrap_or_else(PoisonError::into_inner) = e.to_string();
                        }
                    }
                }
            }
        }
    }
}
