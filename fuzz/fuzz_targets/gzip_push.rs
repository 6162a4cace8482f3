//! gzip push bodies and the command-list reader: decoding never passes the cap, a gzip body decodes to its
//! plain form and parses to the same command list, a body that inflates past the cap stops at exactly the
//! cap; the reader never holds more than the raw cap (plus the frame that crossed it) without an answer,
//! refuses at the cap only a list that is not complete, does bounded work per frame and per packet, and
//! gives the whole-buffer answer however the body is split into frames.
#![no_main]

use std::io::Write;

use bytes::Bytes;
use flate2::Compression;
use flate2::write::GzEncoder;
use libfuzzer_sys::fuzz_target;
use sluice::git::command_list::{CommandList, Decoded, ListError, ListReader, MAX_RAW_BYTES, Unread};
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

/// Frame sizes taken in turn from `sizes` (each 1..=256 × `scale`).
fn frames<'a>(body: &'a [u8], sizes: &'a [u8], scale: usize) -> impl Iterator<Item = &'a [u8]> {
    let mut rest = body;
    let mut i = 0;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let size = sizes.get(i % sizes.len().max(1)).map_or(1, |s| usize::from(*s) + 1) * scale;
        i += 1;
        let (frame, tail) = rest.split_at(size.min(rest.len()));
        rest = tail;
        Some(frame)
    })
}

/// Runs the reader over `body` in frames, checking after each frame: no answer means at most the raw cap
/// taken, and the work so far is one scanner step per frame plus one per packet, with at most four parses.
fn read(gzip: bool, body: &[u8], sizes: &[u8], scale: usize) -> (ListReader, Result<CommandList, Unread>) {
    let mut reader = ListReader::new(gzip);
    let mut count = 0u64;
    let check_work = |reader: &ListReader, count: u64| {
        let (steps, parses) = reader.work();
        let packets = reader.decoded().len() as u64 / 4 + 1;
        assert!(steps <= count + packets, "{steps} scanner steps for {count} frames and {packets} packets");
        assert!(parses <= 4, "{parses} parses");
    };
    for frame in frames(body, sizes, scale) {
        count += 1;
        let before = reader.raw_len();
        let answer = reader.frame(Bytes::copy_from_slice(frame));
        check_work(&reader, count);
        match answer {
            None => assert!(reader.raw_len() <= MAX_RAW_BYTES, "{} raw bytes held", reader.raw_len()),
            Some(answer) => {
                if let Err(Unread { error: ListError::RawCap { decoded }, .. }) = &answer {
                    assert!(before <= MAX_RAW_BYTES && reader.raw_len() > MAX_RAW_BYTES, "refused early");
                    assert_eq!(*decoded, reader.decoded().len());
                    // Refused only while the list can still grow: never a complete or failed list.
                    assert_eq!(push::parse(reader.decoded(), false), Ok(None), "a final list refused at the cap");
                }
                return (reader, answer);
            }
        }
    }
    count += 1;
    let answer = reader.end();
    check_work(&reader, count);
    (reader, Ok(answer))
}

fuzz_target!(|data: &[u8]| {
    let [mode, chunk, n_sizes, rest @ ..] = data else { return };
    let (sizes, body) = rest.split_at(usize::from(*n_sizes % 16).min(rest.len()));
    let chunk = usize::from(*chunk) + 1;
    // Arbitrary bytes as a gzip body.
    let (decoded, _) = decode(true, body, chunk);
    let _ = push::parse(decoded.bytes(), true);
    // …and through the reader: bounded, and when it answers with a list, the whole-buffer answer for the
    // bytes it decoded.
    let (reader, answer) = read(true, body, sizes, 1);
    if let Ok(list) = &answer {
        let whole = push::parse(reader.decoded(), true).transpose();
        assert_eq!(Some(list.parsed.clone()), whole, "the reader's gzip answer differs from its decoded bytes'");
    }
    // Plain: the reader's answer, at whatever frame it came, is the whole body's answer.
    let (_, answer) = read(false, body, sizes, 1);
    let whole = push::parse(&body[..body.len().min(MAX_COMMAND_BYTES + 1)], true);
    match answer {
        Ok(list) => assert_eq!(Some(list.parsed), whole.clone().transpose(), "split reading differs from the whole body"),
        Err(unread) => panic!("a plain body was refused: {:?}", unread.error),
    }

    let level = u32::from(mode % 10);
    if mode % 32 == 30 {
        // A body that decodes to little or nothing: a gzip header, then stored deflate blocks of 0–2 bytes
        // of the input each. The reader answers within the raw cap plus one frame.
        let mut bomb = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
        let mut i = 0usize;
        while bomb.len() <= MAX_RAW_BYTES + 4096 {
            let len = body.get(i % body.len().max(1)).map_or(0, |b| usize::from(*b % 3));
            bomb.push(0);
            bomb.extend_from_slice(&(len as u16).to_le_bytes());
            bomb.extend_from_slice(&(!(len as u16)).to_le_bytes());
            for k in 0..len {
                bomb.push(body.get((i + k) % body.len().max(1)).copied().unwrap_or(b'0'));
            }
            i += 1;
        }
        let (reader, answer) = read(true, &bomb, sizes, 512);
        assert!(answer.is_ok() || reader.raw_len() <= MAX_RAW_BYTES + 256 * 512, "{} raw bytes", reader.raw_len());
        return;
    }
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
    // …and through the reader, split into frames: the same answer as the plain body.
    let (_, answer) = read(true, &gzip(body, level), sizes, 1);
    match answer {
        Ok(list) => assert_eq!(Some(list.parsed), whole.transpose(), "gzip reading differs from the plain body"),
        Err(unread) => panic!("valid gzip refused by the reader: {:?}", unread.error),
    }
});
