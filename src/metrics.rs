//! Counters and histograms for `/metrics`, through the Prometheus project's own client
//! (`prometheus-client`: typed families with label sets, OpenMetrics text), and the recent refusals of
//! each session.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Pipes that bulk tunnel directions have spliced through (Linux): process-wide, like the pipes
/// themselves, so every listener's `/metrics` shows the same count. Stays 0 where splice never runs.
pub static SPLICE_PIPES: LazyLock<Counter> = LazyLock::new(Counter::default);

/// Latency buckets, in seconds, for DNS and upstream connects.
const BUCKETS: [f64; 12] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

/// A latency histogram in seconds, observed as a [`Duration`].
#[derive(Clone)]
pub struct Histogram(prometheus_client::metrics::histogram::Histogram);

impl Default for Histogram {
    fn default() -> Self {
        Histogram(prometheus_client::metrics::histogram::Histogram::new(BUCKETS))
    }
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        self.0.observe(d.as_secs_f64());
    }
}

/// The labels of `sluice_decisions_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    verdict: &'static str,
    reason: &'static str,
    level: &'static str,
}

/// Every number the admin listener exposes. Cloned handles share their values (each metric is an
/// `Arc` inside), so the fields are registered once and updated in place.
pub struct Metrics {
    registry: Registry,
    decisions: Family<DecisionLabels, Counter>,
    pub open_tunnels: Gauge<u64, AtomicU64>,
    pub tunnels_total: Counter,
    pub bytes_up: Counter,
    pub bytes_down: Counter,
    pub rate_limited: Counter,
    pub upstream_resets: Counter,
    pub dns_latency: Histogram,
    pub connect_latency: Histogram,
    pub policy_generation: Gauge<u64, AtomicU64>,
    pub policy_reload_errors: Counter,
    /// Filled in from the log writer's own counter when rendering.
    pub dropped_log_lines: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut m = Metrics {
            registry: Registry::default(),
            decisions: Family::default(),
            open_tunnels: Gauge::default(),
            tunnels_total: Counter::default(),
            bytes_up: Counter::default(),
            bytes_down: Counter::default(),
            rate_limited: Counter::default(),
            upstream_resets: Counter::default(),
            dns_latency: Histogram::default(),
            connect_latency: Histogram::default(),
            policy_generation: Gauge::default(),
            policy_reload_errors: Counter::default(),
            dropped_log_lines: Counter::default(),
        };
        let r = &mut m.registry;
        // Counter names are registered without `_total`: the encoder adds it.
        r.register("sluice_decisions", "Requests decided, by verdict, reason and level.", m.decisions.clone());
        r.register("sluice_open_tunnels", "Tunnels open now.", m.open_tunnels.clone());
        r.register("sluice_tunnels", "Tunnels opened.", m.tunnels_total.clone());
        r.register("sluice_bytes_up", "Bytes from clients to upstreams.", m.bytes_up.clone());
        r.register("sluice_bytes_down", "Bytes from upstreams to clients.", m.bytes_down.clone());
        r.register("sluice_rate_limited", "Requests refused by a per-session limit.", m.rate_limited.clone());
        r.register("sluice_upstream_resets", "Tunnels ended by an upstream error.", m.upstream_resets.clone());
        r.register(
            "sluice_policy_generation",
            "Policy sets loaded (1 at start, +1 per reload).",
            m.policy_generation.clone(),
        );
        r.register("sluice_policy_reload_errors", "Policy reloads refused as invalid.", m.policy_reload_errors.clone());
        r.register(
            "sluice_log_dropped_lines",
            "Log lines dropped because the writer fell behind.",
            m.dropped_log_lines.clone(),
        );
        r.register(
            "sluice_splice_pipes",
            "Pipes opened to splice(2) bulk tunnel traffic (Linux; 0: every byte was copied).",
            SPLICE_PIPES.clone(),
        );
        r.register("sluice_dns_seconds", "DNS lookup latency.", m.dns_latency.0.clone());
        r.register("sluice_upstream_connect_seconds", "Upstream TCP connect latency.", m.connect_latency.0.clone());
        m
    }
}

impl Metrics {
    pub fn decision(&self, verdict: &'static str, reason: &'static str, level: &'static str) {
        self.decisions.get_or_create(&DecisionLabels { verdict, reason, level }).inc();
    }

    /// Sets the dropped-lines counter to the log writer's own count.
    pub fn set_dropped_log_lines(&self, n: u64) {
        self.dropped_log_lines.inner().store(n, Ordering::Relaxed);
    }

    /// The OpenMetrics text exposition (`application/openmetrics-text`, which Prometheus reads).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Denials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Denials").field("per_session", &self.per_session).field("sessions", &self.sessions).finish()
    }
}

/// One refusal, as `/v1/denials` reports it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Denial {
    pub time: u64,
    pub destination: String,
    pub reason: &'static str,
    pub message: String,
    pub hint: Option<String>,
}

/// The most recent refusals of each session, bounded in both sessions and entries.
pub struct Denials {
    inner: Mutex<DenialsInner>,
    per_session: usize,
    sessions: usize,
}

#[derive(Default)]
struct DenialsInner {
    by_session: HashMap<String, VecDeque<Denial>>,
    /// Sessions in first-seen order, to evict the oldest when full.
    order: VecDeque<String>,
}

impl Denials {
    pub fn new(per_session: usize, sessions: usize) -> Denials {
        Denials { inner: Mutex::new(DenialsInner::default()), per_session, sessions }
    }

    pub fn record(&self, session: &str, denial: Denial) {
        let Ok(mut inner) = self.inner.lock() else { return };
        if !inner.by_session.contains_key(session) {
            if inner.order.len() >= self.sessions
                && let Some(oldest) = inner.order.pop_front()
            {
                inner.by_session.remove(&oldest);
            }
            inner.order.push_back(session.to_string());
        }
        let ring = inner.by_session.entry(session.to_string()).or_default();
        if ring.len() >= self.per_session {
            ring.pop_front();
        }
        ring.push_back(denial);
    }

    /// Newest first.
    pub fn recent(&self, session: &str) -> Vec<Denial> {
        let Ok(inner) = self.inner.lock() else { return Vec::new() };
        inner.by_session.get(session).map(|r| r.iter().rev().cloned().collect()).unwrap_or_default()
    }
}

impl Default for Denials {
    fn default() -> Self {
        Denials::new(50, 10_000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn denial(dest: &str) -> Denial {
        Denial { time: 0, destination: dest.into(), reason: "not_allowlisted", message: String::new(), hint: None }
    }

    #[test]
    fn denials_are_bounded_newest_first() {
        let d = Denials::new(2, 2);
        d.record("a", denial("1"));
        d.record("a", denial("2"));
        d.record("a", denial("3"));
        assert_eq!(d.recent("a").iter().map(|x| x.destination.as_str()).collect::<Vec<_>>(), ["3", "2"]);
        d.record("b", denial("x"));
        d.record("c", denial("y"));
        assert!(d.recent("a").is_empty(), "the oldest session is evicted");
        assert_eq!(d.recent("c").len(), 1);
    }

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.decision("allow", "default_allowlisted", "trusted");
        m.decision("deny", "not_allowlisted", "trusted");
        m.decision("deny", "not_allowlisted", "trusted");
        m.connect_latency.observe(Duration::from_millis(3));
        let text = m.render();
        assert!(
            text.contains("sluice_decisions_total{verdict=\"deny\",reason=\"not_allowlisted\",level=\"trusted\"} 2\n")
        );
        assert!(text.contains("sluice_upstream_connect_seconds_bucket{le=\"0.005\"} 1\n"));
        assert!(text.contains("sluice_upstream_connect_seconds_bucket{le=\"0.0025\"} 0\n"));
        assert!(text.contains("sluice_upstream_connect_seconds_count 1\n"));
    }
}
