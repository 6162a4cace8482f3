//! pkt-line decoding: the reader's offset only grows and never passes the input, errors name the offset of the
//! packet they are about, every decoded packet re-encodes to the bytes it came from, and side-band output
//! decodes back to its payload in packets no longer than asked.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::git::pktline::{
    self, DELIM, FLUSH, MAX_PKT_LEN, Packet, PktError, RESPONSE_END, Reader, decode, put_band, put_data,
};

fn encode(packet: Packet<'_>) -> Vec<u8> {
    match packet {
        Packet::Data(d) => {
            let mut out = Vec::new();
            put_data(&mut out, d);
            out
        }
        Packet::Flush => FLUSH.to_vec(),
        Packet::Delim => DELIM.to_vec(),
        Packet::ResponseEnd => RESPONSE_END.to_vec(),
    }
}

fn error_offset(e: &PktError) -> usize {
    match e {
        PktError::BadHex { offset, .. } | PktError::BadLength { offset, .. } | PktError::TooLong { offset, .. } => {
            *offset
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut reader = Reader::new(data);
    let mut last = 0;
    loop {
        match reader.next_packet() {
            Ok(Some(packet)) => {
                let offset = reader.offset();
                assert!(offset >= last + 4 && offset <= data.len(), "offset {last} → {offset} of {}", data.len());
                let raw = &data[last..offset];
                let encoded = encode(packet);
                // The length may be written in either case; git writes lowercase.
                assert!(encoded[..4].eq_ignore_ascii_case(&raw[..4]), "{raw:?} re-encodes as {encoded:?}");
                assert_eq!(encoded[4..], raw[4..]);
                // One byte less is not a packet yet.
                assert_eq!(decode(&raw[..raw.len() - 1], last), Ok(None));
                last = offset;
            }
            Ok(None) => {
                assert_eq!(reader.offset(), last);
                break;
            }
            Err(e) => {
                assert_eq!(reader.offset(), last);
                assert_eq!(error_offset(&e), last);
                break;
            }
        }
    }

    let [band, size, ..] = data else { return };
    for max in [usize::from(*size) * 8, 1000, MAX_PKT_LEN] {
        let mut out = Vec::new();
        put_band(&mut out, *band, data, max);
        let mut reader = Reader::new(&out);
        let mut payload = Vec::new();
        while let Some(packet) = reader.next_packet().expect("put_band writes valid pkt-lines") {
            let Packet::Data(d) = packet else { panic!("put_band wrote {packet:?}") };
            assert_eq!(d.first(), Some(band));
            assert!(d.len() + 4 <= max.clamp(6, pktline::MAX_PKT_LEN), "packet of {} for max {max}", d.len() + 4);
            payload.extend_from_slice(&d[1..]);
        }
        assert_eq!(reader.offset(), out.len());
        assert_eq!(payload, data);
    }
});
