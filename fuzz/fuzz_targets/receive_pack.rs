//! The receive-pack command list: parsing never panics, completes the same way with or without EOF, and a
//! list it accepts, written back as pkt-lines, parses to the same request.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::git::pktline::{FLUSH, MAX_PKT_DATA, put_data};
use sluice::git::push::{self, PushError, PushRequest};

/// One command-list line: git's optional LF when it fits.
fn put_line(out: &mut Vec<u8>, mut line: Vec<u8>) {
    if line.len() < MAX_PKT_DATA {
        line.push(b'\n');
    }
    put_data(out, &line);
}

fn encode(req: &PushRequest) -> Vec<u8> {
    let mut out = Vec::new();
    for oid in &req.shallow {
        put_line(&mut out, format!("shallow {oid}").into_bytes());
    }
    for (i, u) in req.updates.iter().enumerate() {
        let mut line = format!("{} {} {}", u.old, u.new, u.name).into_bytes();
        if i == 0 && !req.capabilities.is_empty() {
            line.push(0);
            line.extend_from_slice(req.capabilities.join(" ").as_bytes());
        }
        put_line(&mut out, line);
    }
    out.extend_from_slice(FLUSH);
    if req.has_capability("push-options") && !req.updates.is_empty() {
        for option in &req.options {
            put_line(&mut out, option.clone().into_bytes());
        }
        out.extend_from_slice(FLUSH);
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let _ = push::sniff_side_band(data);
    let open = push::parse(data, false);
    let closed = push::parse(data, true);
    match (&open, &closed) {
        (Ok(None), Err(PushError::Truncated { len })) => assert_eq!(*len, data.len()),
        (Ok(None), Err(PushError::TooLarge)) => {}
        (Ok(None), other) => panic!("incomplete without EOF, {other:?} with it"),
        (open, closed) => assert_eq!(open, closed, "EOF changed a complete answer"),
    }
    let Ok(Some(req)) = closed else { return };
    let encoded = encode(&req);
    assert_eq!(push::parse(&encoded, true), Ok(Some(req.clone())), "re-encoded as {encoded:?}");
    // Anything after the command list (the pack) does not change it.
    let mut with_pack = encoded.clone();
    with_pack.extend_from_slice(b"PACK\0\0\0\x02");
    assert_eq!(push::parse(&with_pack, false), Ok(Some(req)));
    // A strict prefix is never complete.
    assert_eq!(push::parse(&encoded[..encoded.len() - 1], false), Ok(None));
});
