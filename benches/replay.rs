//! `sluice replay` throughput: decision records re-decided against a candidate, read from an
//! in-memory log exactly as from a file (line reader, JSON, cache, tallies). The issue asks for at
//! least 1,000,000 records a minute (about 16,700 a second).

use std::hint::black_box;
use std::io::Cursor;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sluice::policy::{DefaultList, parse_policy};
use sluice::replay::replay_bytes;

const RECORDS: usize = 100_000;
/// Distinct destinations in the log: the replay's memory (and cache) grows with these.
const DESTINATIONS: usize = 2_000;

/// A log as the proxy writes it: allowed tunnels with their closing lines, refusals, a few lines of
/// another policy; `RECORDS` decision lines in all.
fn log() -> Vec<u8> {
    let mut out = Vec::with_capacity(RECORDS * 400);
    for i in 0..RECORDS {
        let d = i % DESTINATIONS;
        let host = format!("svc{d}.example-{}.com", d % 50);
        let session = format!("sess-{}", i % 300);
        let line = match i % 10 {
            0..=5 => format!(
                "{{\"time\":\"2026-12-01T10:{:02}:{:02}.000Z\",\"event\":\"decision\",\"session\":\"{session}\",\"kind\":\"connect\",\"method\":\"CONNECT\",\"host\":\"{host}\",\"port\":443,\"verdict\":\"allow\",\"reason\":\"allowlisted\",\"rule\":\"*.example-{}.com (policies/app.toml:4)\",\"policy\":\"app\",\"level\":\"custom\",\"client\":\"10.0.0.1:5000\",\"upstream\":\"93.184.216.{}:443\"}}\n{{\"time\":\"2026-12-01T10:00:00.000Z\",\"event\":\"tunnel_closed\",\"session\":\"{session}\",\"kind\":\"connect\",\"host\":\"{host}\",\"port\":443,\"bytes_up\":100,\"bytes_down\":2000,\"duration_ms\":12,\"end\":\"closed\"}}\n",
                i / 60 % 60,
                i % 60,
                d % 50,
                d % 200
            ),
            6..=8 => format!(
                "{{\"time\":\"2026-12-01T10:00:00.000Z\",\"event\":\"decision\",\"session\":\"{session}\",\"kind\":\"http\",\"method\":\"GET\",\"target\":\"http://other{d}.example.org/x\",\"host\":\"other{d}.example.org\",\"port\":80,\"verdict\":\"deny\",\"reason\":\"not_allowlisted\",\"detail\":\"other{d}.example.org:80 is not allowed: not in the allowlist\",\"policy\":\"app\",\"level\":\"custom\",\"client\":\"10.0.0.1:5000\",\"status\":403}}\n"
            ),
            _ => format!(
                "{{\"time\":\"2026-12-01T10:00:00.000Z\",\"event\":\"decision\",\"session\":\"{session}\",\"kind\":\"connect\",\"method\":\"CONNECT\",\"host\":\"{host}\",\"port\":443,\"verdict\":\"allow\",\"reason\":\"full_level\",\"policy\":\"other\",\"level\":\"full\"}}\n"
            ),
        };
        out.extend_from_slice(line.as_bytes());
    }
    out
}

fn bench_replay(c: &mut Criterion) {
    // The candidate drops half the wildcard entries: half the allowed destinations become denied.
    let allow: Vec<String> = (0..50).filter(|i| i % 2 == 0).map(|i| format!("\"*.example-{i}.com\"")).collect();
    let text = format!("version = 1\nname = \"app\"\nlevel = \"custom\"\nallow = [{}]\n", allow.join(", "));
    let (candidate, _) = parse_policy("candidate.toml", &text, &DefaultList::builtin()).expect("a valid candidate");
    let candidate = Arc::new(candidate);
    let log: Arc<[u8]> = log().into();
    // The inputs must replay as described, or the figure measures the wrong path.
    let r = replay_bytes("bench", Cursor::new(log.clone()), candidate.clone()).expect("replays");
    assert_eq!((r.replayed, r.other_policies, r.malformed), (90_000, 10_000, 0));
    // Allowed lines are those with i % 10 <= 5 (so d % 10 <= 5: 6 in 10 destinations); the candidate
    // keeps the even `example-N` domains, i.e. even d: 3 in 10 destinations become denied.
    assert_eq!(r.newly_denied.len(), DESTINATIONS * 3 / 10);
    assert!(r.newly_allowed.is_empty());

    let mut g = c.benchmark_group("replay");
    g.sample_size(10);
    g.throughput(Throughput::Elements(RECORDS as u64));
    g.bench_function("100k_records", |b| {
        b.iter(|| black_box(replay_bytes("bench", Cursor::new(log.clone()), candidate.clone()).expect("replays")))
    });
    g.finish();
}

criterion_group!(benches, bench_replay);
criterion_main!(benches);
