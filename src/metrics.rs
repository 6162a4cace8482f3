//! Counters and histograms for `/metrics` (Prometheus text), and the recent refusals of each session.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Pipes that bulk tunnel directions have spliced through (Linux): process-wide, like the pipes
/// themselves, so every listener's `/metrics` shows the same count. Stays 0 where splice never runs.
pub static SPLICE_PIPES: AtomicU64 = AtomicU64::new(0);

/// Latency buckets, in seconds, for DNS and upstream connects.
const BUCKETS: [f64; 12] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

#[derive(Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (i, bound) in BUCKETS.iter().enumerate() {
            if secs <= *bound {
                self.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, bound) in BUCKETS.iter().enumerate() {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {}", self.buckets[i].load(Ordering::Relaxed));
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

/// Every number the admin listener exposes.
#[derive(Default)]
pub struct Metrics {
    /// (verdict, reason, level) → count.
    decisions: Mutex<BTreeMap<(&'static str, &'static str, &'static str), u64>>,
    pub open_tunnels: AtomicU64,
    pub tunnels_total: AtomicU64,
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
    pub rate_limited: AtomicU64,
    pub upstream_resets: AtomicU64,
    pub dns_latency: Histogram,
    pub connect_latency: Histogram,
    pub policy_generation: AtomicU64,
    pub policy_reload_errors: AtomicU64,
    /// Calls to the limit store that failed or missed their deadline (probes of a store already down excluded).
    pub limit_store_errors: AtomicU64,
    /// 1 while the limit store answers (always, for the in-memory store), 0 while limits are per instance
    /// or refused.
    pub limit_store_up: AtomicU64,
    /// Filled in from the log writer's own counter when rendering.
    pub dropped_log_lines: AtomicU64,
    /// Refusals by the per-session limit that made them, in [`LIMITS`] order.
    limit_refusals: [AtomicU64; LIMITS.len()],
    /// Microseconds tunnels waited for their session's bandwidth (shaping), summed.
    pub shaping_wait_micros: AtomicU64,
    /// Open tunnels ended because their session's quota was spent.
    pub quota_closed_tunnels: AtomicU64,
}

/// The per-session limits a refusal can name, as their refusal codes.
const LIMITS: [&str; 3] = ["rate_limited", "too_many_tunnels", "quota_exceeded"];

impl Metrics {
    pub fn decision(&self, verdict: &'static str, reason: &'static str, level: &'static str) {
        if let Ok(mut map) = self.decisions.lock() {
            *map.entry((verdict, reason, level)).or_insert(0) += 1;
        }
    }

    /// Counts a refusal by a per-session limit, by its code (one of [`LIMITS`]; others are not limits).
    pub fn limit_refused(&self, code: &str) {
        if let Some(i) = LIMITS.iter().position(|l| *l == code) {
            self.limit_refusals[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Adds a tunnel's time spent waiting for shaping grants.
    pub fn shaped(&self, waited: Duration) {
        if !waited.is_zero() {
            self.shaping_wait_micros
                .fetch_add(u64::try_from(waited.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let _ = writeln!(out, "# HELP sluice_decisions_total Requests decided, by verdict, reason and level.");
        let _ = writeln!(out, "# TYPE sluice_decisions_total counter");
        if let Ok(map) = self.decisions.lock() {
            for ((verdict, reason, level), n) in map.iter() {
                let _ = writeln!(
                    out,
                    "sluice_decisions_total{{verdict=\"{verdict}\",reason=\"{reason}\",level=\"{}\"}} {n}",
                    escape(level)
                );
            }
        }
        let gauges: [(&str, &str, &str, &AtomicU64); 12] = [
            ("sluice_open_tunnels", "gauge", "Tunnels open now.", &self.open_tunnels),
            ("sluice_tunnels_total", "counter", "Tunnels opened.", &self.tunnels_total),
            ("sluice_bytes_up_total", "counter", "Bytes from clients to upstreams.", &self.bytes_up),
            ("sluice_bytes_down_total", "counter", "Bytes from upstreams to clients.", &self.bytes_down),
            ("sluice_rate_limited_total", "counter", "Requests refused by a per-session limit.", &self.rate_limited),
            ("sluice_upstream_resets_total", "counter", "Tunnels ended by an upstream error.", &self.upstream_resets),
            (
                "sluice_policy_generation",
                "gauge",
                "Policy sets loaded (1 at start, +1 per reload).",
                &self.policy_generation,
            ),
            (
                "sluice_policy_reload_errors_total",
                "counter",
                "Policy reloads refused as invalid.",
                &self.policy_reload_errors,
            ),
            (
                "sluice_limit_store_errors_total",
                "counter",
                "Calls to the limit store that failed or missed their deadline.",
                &self.limit_store_errors,
            ),
            (
                "sluice_limit_store_up",
                "gauge",
                "1 while the limit store answers, 0 while limits are per instance or refused.",
                &self.limit_store_up,
            ),
            (
                "sluice_log_dropped_lines_total",
                "counter",
                "Log lines dropped because the writer fell behind.",
                &self.dropped_log_lines,
            ),
            (
                "sluice_splice_pipes_total",
                "counter",
                "Pipes opened to splice(2) bulk tunnel traffic (Linux; 0: every byte was copied).",
                &SPLICE_PIPES,
            ),
        ];
        for (name, kind, help, value) in gauges {
            let _ =
                writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}", value.load(Ordering::Relaxed));
        }
        let name = "sluice_limit_refusals_total";
        let _ =
            writeln!(out, "# HELP {name} Requests refused by a per-session limit, by limit.\n# TYPE {name} counter");
        for (limit, n) in LIMITS.iter().zip(&self.limit_refusals) {
            let _ = writeln!(out, "{name}{{limit=\"{limit}\"}} {}", n.load(Ordering::Relaxed));
        }
        let name = "sluice_shaping_wait_seconds_total";
        let waited = self.shaping_wait_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(
            out,
            "# HELP {name} Time tunnels waited for their session's bandwidth limit.\n# TYPE {name} counter\n{name} {waited}"
        );
        let name = "sluice_quota_closed_tunnels_total";
        let _ = writeln!(
            out,
            "# HELP {name} Open tunnels closed because their session's byte quota was spent.\n# TYPE {name} counter\n{name} {}",
            self.quota_closed_tunnels.load(Ordering::Relaxed)
        );
        self.dns_latency.render(&mut out, "sluice_dns_seconds", "DNS lookup latency.");
        self.connect_latency.render(&mut out, "sluice_upstream_connect_seconds", "Upstream TCP connect latency.");
        out
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
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
        m.limit_refused("quota_exceeded");
        m.limit_refused("quota_exceeded");
        m.limit_refused("rate_limited");
        m.limit_refused("not_allowlisted");
        m.shaped(Duration::from_millis(1500));
        m.quota_closed_tunnels.fetch_add(1, Ordering::Relaxed);
        let text = m.render();
        assert!(text.contains("sluice_limit_refusals_total{limit=\"quota_exceeded\"} 2\n"), "{text}");
        assert!(text.contains("sluice_limit_refusals_total{limit=\"rate_limited\"} 1\n"), "{text}");
        assert!(text.contains("sluice_limit_refusals_total{limit=\"too_many_tunnels\"} 0\n"), "{text}");
        assert!(text.contains("sluice_shaping_wait_seconds_total 1.5\n"), "{text}");
        assert!(text.contains("sluice_quota_closed_tunnels_total 1\n"), "{text}");
    }
}
