//! Absolute-form URI → destination: an accepted target is `http://`, has no userinfo and a port from 1 to 65535,
//! and its `host:port` form parses back to the same `Authority`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::policy::Authority;
use sluice::proxy::forward::absolute_target;

fuzz_target!(|data: &[u8]| {
    let Ok(uri) = http::Uri::try_from(data) else { return };
    let Ok(authority) = absolute_target(&uri) else { return };
    assert_eq!(uri.scheme_str(), Some("http"));
    assert!(!uri.authority().map_or("", |a| a.as_str()).contains('@'), "userinfo accepted in {uri}");
    assert_ne!(authority.port, 0, "port 0 accepted from {uri}");
    let text = authority.to_string();
    let again =
        Authority::parse(&text, Some(80)).unwrap_or_else(|e| panic!("{text:?} (from {uri}) does not parse: {e}"));
    assert_eq!(again, authority, "{text:?} (from {uri}) parses to another destination");
    assert_eq!(again.to_string(), text);
});
