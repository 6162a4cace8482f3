//! `parse_policy` never panics on any text, and every pattern it accepts prints as text that parses
//! back to an equal `HostPattern`. The text is also tried as a single pattern, which reaches the
//! pattern parser far more often than a whole policy file does.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::policy::file::parse_policy;
use sluice::policy::{DefaultList, HostPattern};

fn assert_round_trip(pattern: &HostPattern) {
    let printed = pattern.to_string();
    assert_eq!(HostPattern::parse(&printed).as_ref(), Ok(pattern), "{pattern:?} printed as {printed:?}");
}

fuzz_target!(|text: &str| {
    if let Ok(pattern) = HostPattern::parse(text) {
        assert_round_trip(&pattern);
    }
    if let Ok((policy, _warnings)) = parse_policy("fuzz.toml", text, &DefaultList::builtin()) {
        policy.patterns().for_each(assert_round_trip);
    }
});
