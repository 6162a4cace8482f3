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
    /// Report mode: (reason, level) → requests served that the policy would have refused.
    would_deny: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
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
    /// Filled in from the log writer's own counter when rendering.
    pub dropped_log_lines: AtomicU64,
}

impl Metrics {
    pub fn decision(&self, verdict: &'static str, reason: &'static str, level: &'static str) {
        if let Ok(mut map) = self.decisions.lock() {
            *map.entry((verdict, reason, level)).or_insert(0) += 1;
        }
    }

    pub fn would_deny(&self, reason: &'static str, level: &'static str) {
        if let Ok(mut map) = self.would_deny.lock() {
            *map.entry((reason, level)).or_insert(0) += 1;
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
        let _ = writeln!(
            out,
            "# HELP sluice_would_deny_total Requests served in report mode that the policy would refuse, by reason and level."
        );
        let _ = writeln!(out, "# TYPE sluice_would_deny_total counter");
        if let Ok(map) = self.would_deny.lock() {
            for ((reason, level), n) in map.iter() {
                let _ = writeln!(out, "sluice_would_deny_total{{reason=\"{reason}\",level=\"{}\"}} {n}", escape(level));
            }
        }
        let gauges: [(&str, &str, &str, &AtomicU64); 10] = [
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
    /// Served in report mode: the policy would have refused it. Left out when false.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub would_deny: bool,
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
        Denial {
            time: 0,
            destination: dest.into(),
            reason: "not_allowlisted",
            message: String::new(),
            hint: None,
            would_deny: false,
        }
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
        m.would_deny("denylisted", "custom");
        m.connect_latency.observe(Duration::from_millis(3));
        let text = m.render();
        assert!(text.contains("sluice_would_deny_total{reason=\"denylisted\",level=\"custom\"} 1\n"));
        assert!(
            text.contains("sluice_decisions_total{verdict=\"deny\",reason=\"not_allowlisted\",level=\"trusted\"} 2\n")
        );
        assert!(text.contains("sluice_upstream_connect_seconds_bucket{le=\"0.005\"} 1\n"));
        assert!(text.contains("sluice_upstream_connect_seconds_bucket{le=\"0.0025\"} 0\n"));
        assert!(text.contains("sluice_upstream_connect_seconds_count 1\n"));
    }
}
