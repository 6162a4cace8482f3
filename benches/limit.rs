//! The per-request limiter check, across many live sessions, through the `dyn Limiter` the proxies hold; and
//! one byte-budget grant, what a shaped tunnel asks before every read or splice.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use sluice::config::LimitDefaults;
use sluice::limit::quota::{ByteQuota, ByteSize};
use sluice::limit::{Direction, Grant, LimitKey, Limiter, MemoryLimiter};
use sluice::policy::Limits;

fn check_request(c: &mut Criterion) {
    // 100k sessions is the target's figure: their hot map (2.1 MB) is about a small VM's share of the last-level
    // cache, so whether a check misses to memory depends on the host. 1k sessions stay in cache: the check's own
    // cost.
    for (sessions, name) in [(100_000, "100k"), (1_000, "1k")] {
        check_sessions(c, sessions, name);
    }
}

fn check_sessions(c: &mut Criterion, sessions: usize, name: &str) {
    let limiter: Arc<dyn Limiter> = Arc::new(MemoryLimiter::new(LimitDefaults::default()));
    // Generous enough that every check passes: this times the common path, not the refusal's message.
    let limits =
        Limits { requests_per_second: Some(1_000_000.0), burst: Some(1000), max_tunnels: None, ..Limits::default() };
    let keys: Vec<LimitKey> = (0..sessions)
        .map(|i| LimitKey::session(&format!("sess-{i:08x}-{:016x}", i.wrapping_mul(0x9e37_79b9))))
        .collect();
    // Every session already tracked, as on a busy server; creation is a one-off per session.
    for key in &keys {
        assert!(matches!(limiter.check_request(key, &limits).now(), Ok(Ok(()))));
    }

    let mut i = 0;
    c.bench_function(&format!("check_request, {name} sessions"), |b| {
        b.iter(|| {
            let key = &keys[i];
            i += 1;
            if i == sessions {
                i = 0;
            }
            black_box(limiter.check_request(black_box(key), &limits).now())
        })
    });

    let mut i = 0;
    c.bench_function(&format!("open_tunnel + drop, {name} sessions"), |b| {
        b.iter(|| {
            let key = &keys[i];
            i += 1;
            if i == sessions {
                i = 0;
            }
            black_box(matches!(limiter.open_tunnel(black_box(key), &limits).now(), Ok(Ok(_))))
        })
    });
}

/// One grant from a session's budget, uncontended: a rate high enough that every grant is due at once
/// (the cost of asking, not of waiting), with and without a quota counted alongside.
fn byte_grant(c: &mut Criterion) {
    let limiter: Arc<dyn Limiter> = Arc::new(MemoryLimiter::new(LimitDefaults::default()));
    let rate = ByteSize::parse("1TiB").ok();
    let key = LimitKey::session("bench-grant");
    for (name, limits) in [
        ("byte grant, shaping", Limits { download_bytes_per_second: rate, ..Limits::default() }),
        (
            "byte grant, shaping + quota",
            Limits {
                download_bytes_per_second: rate,
                download_quota: ByteQuota::parse("16777215TiB/day").ok(),
                ..Limits::default()
            },
        ),
    ] {
        let meter = limiter.meter(&key, &limits);
        let budget = meter.budget().expect("a shaped session has a budget").clone();
        c.bench_function(name, |b| {
            b.iter(|| match budget.grant(Direction::Down, black_box(64 * 1024)).now() {
                Ok(Grant::Bytes { bytes, .. }) => black_box(bytes),
                _ => 0,
            })
        });
    }
}

criterion_group!(benches, check_request, byte_grant);
criterion_main!(benches);
