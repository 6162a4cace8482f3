//! `Authority::parse` never panics, and an accepted authority's text parses back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::policy::Authority;

fuzz_target!(|input: &str| {
    for default_port in [None, Some(443)] {
        if let Ok(authority) = Authority::parse(input, default_port) {
            let text = authority.to_string();
            // The text always names its port, so it parses the same with or without a default.
            assert_eq!(Authority::parse(&text, None).as_ref(), Ok(&authority), "{input:?} became {text:?}");
            assert_ne!(authority.port, 0, "{input:?}");
        }
    }
});
