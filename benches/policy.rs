//! Per-request cost of a policy decision: `Target::parse` + `Policy::decide`, and `decide` alone.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use sluice::policy::{DefaultList, Policy, PolicySet, Target, parse_policy};

/// A generated custom policy of `n` entries: a quarter `*.` wildcards, the rest exact names, some with
/// their own port. Returns the policy and its entries as written.
fn generated_policy(n: usize) -> (Policy, Vec<String>) {
    let entries: Vec<String> = (0..n)
        .map(|i| match i % 4 {
            0 => format!("*.svc{i}.example-{}.com", i % 97),
            1 => format!("api{i}.example-{}.com", i % 97),
            2 => format!("build{i}.ci.example-{}.org:8443", i % 89),
            _ => format!("mirror{i}.example-{}.net", i % 83),
        })
        .collect();
    let list: Vec<String> = entries.iter().map(|e| format!("  \"{e}\",")).collect();
    let toml = format!(
        "version = 1\nname = \"generated\"\nlevel = \"custom\"\ninclude_defaults = true\nallow = [\n{}\n]\n",
        list.join("\n")
    );
    let (policy, warnings) =
        parse_policy("generated.toml", &toml, &DefaultList::builtin()).unwrap_or_else(|e| panic!("{e}"));
    assert!(warnings.is_empty(), "generated policy has warnings: {warnings:?}");
    assert_eq!(policy.allow_len(), n);
    (policy, entries)
}

/// Times the two things the proxy does per request, for each `(label, host, port, allowed)`.
fn bench_policy(c: &mut Criterion, group: &str, policy: &Policy, cases: &[(&str, &str, u16, bool)]) {
    for (_, host, port, allowed) in cases {
        let target = Target::parse(host).unwrap_or_else(|e| panic!("{host}: {e}"));
        // The inputs must decide as labelled, or the numbers measure the wrong path.
        assert_eq!(policy.decide(&target, *port).is_allowed(), *allowed, "{group} {host}:{port}");
    }
    let mut g = c.benchmark_group(format!("{group}/parse+decide"));
    for &(label, host, port, _) in cases {
        g.bench_function(label, |b| {
            b.iter(|| Target::parse(black_box(host)).map(|t| policy.decide(&t, black_box(port))));
        });
    }
    g.finish();
    let mut g = c.benchmark_group(format!("{group}/decide"));
    for &(label, host, port, _) in cases {
        let target = Target::parse(host).unwrap_or_else(|e| panic!("{host}: {e}"));
        g.bench_function(label, |b| b.iter(|| policy.decide(black_box(&target), black_box(port))));
    }
    g.finish();
}

fn trusted(c: &mut Criterion) {
    let set = PolicySet::builtin();
    let policy: Arc<Policy> = set.get("trusted").cloned().unwrap_or_else(|| panic!("no built-in trusted policy"));
    bench_policy(
        c,
        "trusted",
        &policy,
        &[
            ("exact", "api.github.com", 443, true),
            ("deep-wildcard", "a.b.c.d.gcr.io", 443, true),
            ("miss", "example.org", 443, false),
        ],
    );
}

fn custom_10k(c: &mut Criterion) {
    let (policy, entries) = generated_policy(10_000);
    let exact = entries[5001].clone();
    let deep = entries[5000].replace('*', "a.b.c.d");
    let with_port = entries[5002].split_once(':').map_or(entries[5002].as_str(), |(h, _)| h).to_string();
    bench_policy(
        c,
        "custom-10k",
        &policy,
        &[
            ("exact", &exact, 443, true),
            ("deep-wildcard", &deep, 443, true),
            ("entry-port", &with_port, 8443, true),
            ("default-list", "api.github.com", 443, true),
            ("miss", "example.org", 443, false),
        ],
    );
}

/// A policy with request rules for `api.test` and `unrelated` rules for other hosts.
fn request_policy(unrelated: usize) -> Policy {
    let mut toml = String::from("version = 1\nname = \"rules\"\nlevel = \"full\"\n");
    for i in 0..unrelated {
        let host = if i % 4 == 0 { format!("*.svc{i}.example.com") } else { format!("api{i}.example.com") };
        toml.push_str(&format!(
            "[[requests]]\nhosts = [\"{host}\"]\nmethods = [\"GET\"]\npaths = [\"/v{i}/**\"]\naction = \"allow\"\n"
        ));
    }
    toml.push_str(
        "[[requests]]\nhosts = [\"api.test\"]\nmethods = [\"GET\", \"HEAD\"]\npaths = [\"/v1/public/**\"]\naction = \"allow\"\n\
         [[requests]]\nhosts = [\"api.test\"]\nmethods = [\"DELETE\"]\naction = \"deny\"\n\
         [[requests]]\nhosts = [\"api.test\"]\npaths = [\"/v1/public/secret/**\"]\naction = \"deny\"\n",
    );
    parse_policy("rules.toml", &toml, &DefaultList::builtin()).unwrap_or_else(|e| panic!("{e}")).0
}

/// `Policy::decide_request` for one host's request, beside 0 and 10,000 rules for other hosts: the
/// figures should match (rules are indexed by host).
fn request_rules(c: &mut Criterion) {
    let target = Target::parse("api.test").unwrap_or_else(|e| panic!("{e}"));
    let unruled = Target::parse("other.test").unwrap_or_else(|e| panic!("{e}"));
    let mut g = c.benchmark_group("requests/decide_request");
    for unrelated in [0usize, 10_000] {
        let policy = request_policy(unrelated);
        let allowed = policy.decide_request(&target, 443, "GET", "/v1/public/a/b", None);
        assert!(allowed.is_some_and(|(d, _)| d.is_allowed()), "the allowed case must be allowed");
        assert!(policy.decide_request(&unruled, 443, "GET", "/", None).is_none());
        g.bench_function(format!("allowed/{unrelated}-other-rules"), |b| {
            b.iter(|| {
                policy.decide_request(black_box(&target), 443, black_box("GET"), black_box("/v1/public/a/b"), None)
            })
        });
        g.bench_function(format!("unruled-host/{unrelated}-other-rules"), |b| {
            b.iter(|| policy.decide_request(black_box(&unruled), 443, black_box("GET"), black_box("/x"), None))
        });
    }
    g.finish();
}

criterion_group!(benches, trusted, custom_10k, request_rules);
criterion_main!(benches);
