//! `Target::parse` and `Host::parse` never panic, and a parsed target's text parses back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::policy::{Host, Target};

fuzz_target!(|input: &str| {
    if let Ok(target) = Target::parse(input) {
        let text = target.to_string();
        assert_eq!(Target::parse(&text).as_ref(), Ok(&target), "{input:?} became {text:?}");
    }
    if let Ok(host) = Host::parse(input) {
        let text = host.to_string();
        assert_eq!(Host::parse(&text).as_ref(), Ok(&host), "{input:?} became {text:?}");
        // Canonical means stable: the text is already lowercase, dotless at the end, ASCII.
        assert_eq!(text, text.to_ascii_lowercase());
        assert!(text.is_ascii() && !text.ends_with('.'), "{input:?} became {text:?}");
    }
});
