//! `Proxy-Authorization` → session and token → `Keyring::verify_for`: arbitrary headers never panic, tokens
//! nobody minted never verify, and a minted credential with one byte changed verifies only if the byte is the same.
#![no_main]

use std::sync::OnceLock;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use libfuzzer_sys::fuzz_target;
use sluice::credential::{Claims, Keyring, Kind, SigningKey};
use sluice::credential::Basic;

const NOW: u64 = 1_500;

fn keyring() -> &'static Keyring {
    static KEYRING: OnceLock<Keyring> = OnceLock::new();
    KEYRING.get_or_init(|| {
        // Printable keys: from_bytes trims surrounding whitespace.
        let current = SigningKey::from_bytes(&[b'k'; 32]).expect("a 32-byte key");
        let previous = SigningKey::from_bytes(&[b'p'; 32]).expect("a 32-byte key");
        Keyring::new(current, Some(previous))
    })
}

fn claims() -> Claims {
    Claims {
        sid: "s1".into(),
        kind: Kind::Egress,
        policy: Some("trusted".into()),
        repo: None,
        branch: None,
        iat: 1_000,
        exp: 2_000,
    }
}

/// The header a client sends for `credential` (`session:token`).
fn header(credential: &[u8]) -> Vec<u8> {
    format!("Basic {}", STANDARD.encode(credential)).into_bytes()
}

fn check(header: &[u8]) -> Option<Claims> {
    let basic = Basic::parse(header).ok()?;
    keyring().verify_for(basic.password.expose(), Kind::Egress, &basic.user, NOW).ok()
}

fuzz_target!(|data: &[u8]| {
    // Arbitrary header bytes, and arbitrary tokens for a valid session: nothing verifies.
    assert_eq!(check(data), None, "an arbitrary header verified: {data:?}");
    let mut forged = b"s1:".to_vec();
    forged.extend_from_slice(data);
    assert_eq!(check(&header(&forged)), None, "a forged token verified: {data:?}");

    // A minted credential with one byte replaced.
    let [hi, lo, value, ..] = data else { return };
    let minted = format!("s1:{}", keyring().mint(&claims())).into_bytes();
    let at = usize::from(u16::from_be_bytes([*hi, *lo])) % minted.len();
    let mut mutated = minted.clone();
    mutated[at] = *value;
    let verified = check(&header(&mutated));
    if mutated == minted {
        assert_eq!(verified, Some(claims()));
    } else {
        assert_eq!(verified, None, "byte {at} changed to {value:#04x} and the credential still verifies");
    }
});
