//! gzip push bodies: decoding never passes the cap, a gzip body decodes to its plain form and parses to the
//! same command list, and a body that inflates past the cap stops at exactly the cap.
#![no_main]

use std::io::Write;

use flate2::Compression;
use flate2::write::GzEncoder;
use libfuzzer_sys::fuzz_target;
use sluice::git::command_list::Decoded;
use sluice::git::push::{self, MAX_COMMAND_BYTES};

/// Feeds `body` to a decoder `chunk` bytes at a time, as frames arrive; checks the cap after each.
fn decode(gzip: bool, body: &[u8], chunk: usize) -> (Decoded, Result<(), String>) {
    let cap = if gzip { MAX_COMMAND_BYTES } else { MAX_COMMAND_BYTES + 1 };
    let mut decoded = Decoded::new(gzip);
    for frame in body.chunks(chunk) {
        let pushed = decoded.push(frame);
        assert!(decoded.bytes().len() <= cap, "decoded {} bytes, cap {cap}", decoded.bytes().len());
        if pushed.is_err() {
            return (decoded, pushed);
        }
    }
    decoded.finish();
    assert!(decoded.bytes().len() <= cap, "decoded {} bytes, cap {cap}", decoded.bytes().len());
    (decoded, Ok(()))
}

fn gzip(plain: &[u8], level: u32) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::new(level));
    encoder.write_all(plain).expect("writing to a Vec");
    encoder.finish().expect("writing to a Vec")
}

fuzz_target!(|data: &[u8]| {
    let [mode, chunk, body @ ..] = data else { return };
    let chunk = usize::from(*chunk) + 1;
    // Arbitrary bytes as a gzip body.
    let (decoded, _) = decode(true, body, chunk);
    let _ = push::parse(decoded.bytes(), true);

    let level = u32::from(mode % 10);
    if mode % 32 == 31 {
        // A body that inflates past the cap: decoding stops at exactly the cap, without an error.
        let mut plain = Vec::with_capacity(MAX_COMMAND_BYTES + 8192);
        while plain.len() <= MAX_COMMAND_BYTES {
            plain.extend_from_slice(if body.is_empty() { b"0000" } else { body });
        }
        let (decoded, pushed) = decode(true, &gzip(&plain, 1), 64 << 10);
        assert_eq!(pushed, Ok(()));
        assert_eq!(decoded.bytes().len(), MAX_COMMAND_BYTES);
        assert!(decoded.bytes() == &plain[..MAX_COMMAND_BYTES], "decoded bytes differ from the plain body");
        assert_eq!(push::parse(decoded.bytes(), true), push::parse(&plain[..MAX_COMMAND_BYTES], true));
        return;
    }
    // The same body plain and gzipped: same bytes, same command list.
    let (gz, pushed) = decode(true, &gzip(body, level), chunk);
    assert_eq!(pushed, Ok(()), "valid gzip refused");
    let (plain, pushed) = decode(false, body, chunk);
    assert_eq!(pushed, Ok(()));
    assert_eq!(gz.bytes(), plain.bytes());
    assert_eq!(gz.bytes(), body);
    assert_eq!(push::parse(gz.bytes(), true), push::parse(plain.bytes(), true));
});
