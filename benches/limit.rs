//! The per-request limiter check, across many live sessions, through the `dyn Limiter` the proxies hold.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use sluice::config::LimitDefaults;
use sluice::limit::{LimitKey, Limiter, MemoryLimiter};
use sluice::policy::Limits;

const SESSIONS: usize = 100_000;

fn check_request(c: &mut Criterion) {
    let limiter: Arc<dyn Limiter> = Arc::new(MemoryLimiter::new(LimitDefaults::default()));
    // Generous enough that every check passes: this times the common path, not the refusal's message.
    let limits =
        Limits { requests_per_second: Some(1_000_000.0), burst: Some(1000), max_tunnels: None, ..Limits::default() };
    let keys: Vec<LimitKey> = (0..SESSIONS)
        .map(|i| LimitKey::session(&format!("sess-{i:08x}-{:016x}", i.wrapping_mul(0x9e37_79b9))))
        .collect();
    // Every session already tracked, as on a busy server; creation is a one-off per session.
    for key in &keys {
        assert!(matches!(limiter.check_request(key, &limits).now(), Ok(Ok(()))));
    }

    let mut i = 0;
    c.bench_function("check_request, 100k sessions", |b| {
        b.iter(|| {
            let key = &keys[i];
            i += 1;
            if i == SESSIONS {
                i = 0;
            }
            black_box(limiter.check_request(black_box(key), &limits).now())
        })
    });

    let mut i = 0;
    c.bench_function("open_tunnel + drop, 100k sessions", |b| {
        b.iter(|| {
            let key = &keys[i];
            i += 1;
            if i == SESSIONS {
                i = 0;
            }
            black_box(matches!(limiter.open_tunnel(black_box(key), &limits).now(), Ok(Ok(_))))
        })
    });
}

criterion_group!(benches, check_request);
criterion_main!(benches);
