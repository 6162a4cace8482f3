//! The per-request limiter check, across many live sessions.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use sluice::limit::{LimitDefaults, SessionLimiter};
use sluice::policy::Limits;

const SESSIONS: usize = 100_000;

fn check_request(c: &mut Criterion) {
    let limiter = SessionLimiter::new(LimitDefaults::default());
    // Generous enough that every check passes: this times the common path, not the refusal's message.
    let limits = Limits { requests_per_second: Some(1_000_000.0), burst: Some(1000), max_tunnels: None };
    let ids: Vec<String> =
        (0..SESSIONS).map(|i| format!("sess-{i:08x}-{:016x}", i.wrapping_mul(0x9e37_79b9))).collect();
    // Every session already tracked, as on a busy server; creation is a one-off per session.
    for id in &ids {
        assert!(limiter.check_request(id, &limits).is_ok());
    }

    let mut i = 0;
    c.bench_function("check_request, 100k sessions", |b| {
        b.iter(|| {
            let id = &ids[i];
            i += 1;
            if i == SESSIONS {
                i = 0;
            }
            black_box(limiter.check_request(black_box(id), &limits))
        })
    });

    let mut i = 0;
    c.bench_function("open_tunnel + drop, 100k sessions", |b| {
        b.iter(|| {
            let id = &ids[i];
            i += 1;
            if i == SESSIONS {
                i = 0;
            }
            black_box(limiter.open_tunnel(black_box(id), &limits).is_ok())
        })
    });
}

criterion_group!(benches, check_request);
criterion_main!(benches);
