//! The server name a TLS ClientHello asks for, read from the first bytes of a tunnel that is not
//! terminated (`[egress] check_sni`): pure, bounded, and tolerant of a hello split across records.

/// A ClientHello larger than this (every record header included) is refused rather than buffered.
pub const MAX_HELLO: usize = 16 * 1024 + 5 * 4;

const CONTENT_HANDSHAKE: u8 = 22;
/// The TLS record content types (RFC 8446 §5.1, RFC 6520): 20 change_cipher_spec to 24 heartbeat.
const CONTENT_FIRST: u8 = 20;
const CONTENT_LAST: u8 = 24;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const NAME_TYPE_HOST: u8 = 0;

/// What the bytes so far say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hello {
    /// The first bytes are not a TLS handshake record: the tunnel carries something else.
    NotTls,
    /// A TLS handshake has begun and more bytes are needed to see the whole ClientHello.
    Partial,
    /// The whole ClientHello, with the host name of its `server_name` extension when it has one.
    Complete { sni: Option<String> },
    /// TLS records that do not hold a well-formed ClientHello, or one over [`MAX_HELLO`].
    Malformed,
}

/// Reads the ClientHello at the start of `buf`, reassembling its handshake message from as many
/// handshake records as it spans.
pub fn parse(buf: &[u8]) -> Hello {
    match buf {
        [] => return Hello::Partial,
        // Not a TLS record type (change_cipher_spec 20 … heartbeat 24): something else.
        [first, ..] if !(CONTENT_FIRST..=CONTENT_LAST).contains(first) => return Hello::NotTls,
        [_] => return Hello::Partial,
        [_, major, ..] if *major != 3 => return Hello::NotTls,
        // A TLS record, and not a handshake: TLS must begin with a ClientHello (an alert or a
        // change_cipher_spec first would otherwise pass unchecked).
        [first, ..] if *first != CONTENT_HANDSHAKE => return Hello::Malformed,
        _ => {}
    }
    let mut message = Vec::new();
    let mut at = 0;
    loop {
        if at + 5 > buf.len() {
            return if buf.len() >= MAX_HELLO { Hello::Malformed } else { Hello::Partial };
        }
        let header = &buf[at..at + 5];
        if header[0] != CONTENT_HANDSHAKE || header[1] != 3 {
            return Hello::Malformed;
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len == 0 || len > 16 * 1024 {
            return Hello::Malformed;
        }
        let end = at + 5 + len;
        if end > buf.len() {
            return if end > MAX_HELLO { Hello::Malformed } else { Hello::Partial };
        }
        message.extend_from_slice(&buf[at + 5..end]);
        at = end;
        if message.len() >= 4 {
            if message[0] != HANDSHAKE_CLIENT_HELLO {
                return Hello::Malformed;
            }
            let body_len = (usize::from(message[1]) << 16) | (usize::from(message[2]) << 8) | usize::from(message[3]);
            if body_len + 4 > MAX_HELLO {
                return Hello::Malformed;
            }
            if message.len() >= body_len + 4 {
                return match server_name(&message[4..4 + body_len]) {
                    Some(sni) => Hello::Complete { sni },
                    None => Hello::Malformed,
                };
            }
        }
    }
}

/// A cursor over a ClientHello body; every read is bounds-checked.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    /// A vector with a `width`-byte length prefix.
    fn vec(&mut self, width: usize) -> Option<&'a [u8]> {
        let len = match width {
            1 => usize::from(self.u8()?),
            _ => usize::from(self.u16()?),
        };
        self.take(len)
    }
}

/// `Some(None)`: a well-formed hello without SNI; `None`: malformed.
fn server_name(body: &[u8]) -> Option<Option<String>> {
    let mut r = Reader(body);
    r.take(2 + 32)?; // legacy_version, random
    r.vec(1)?; // legacy_session_id
    r.vec(2)?; // cipher_suites
    r.vec(1)?; // legacy_compression_methods
    if r.0.is_empty() {
        return Some(None); // no extensions at all
    }
    let mut exts = Reader(r.vec(2)?);
    let mut found = None;
    while !exts.0.is_empty() {
        let kind = exts.u16()?;
        let data = exts.vec(2)?;
        if kind != EXT_SERVER_NAME {
            continue;
        }
        if found.is_some() {
            return None; // the same extension twice is a protocol error (RFC 8446 §4.2)
        }
        let mut list = Reader(Reader(data).vec(2)?);
        let mut name = None;
        while !list.0.is_empty() {
            let kind = list.u8()?;
            let value = list.vec(2)?;
            if kind == NAME_TYPE_HOST {
                if name.is_some() {
                    return None; // RFC 6066 §3: at most one host_name
                }
                name = Some(std::str::from_utf8(value).ok()?.to_string());
            }
        }
        found = Some(name);
    }
    Some(found.flatten())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello with `extensions` (each `(type, data)`), in one record.
    fn hello(extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one suite
        body.extend_from_slice(&[1, 0]); // null compression
        let mut exts = Vec::new();
        for (kind, data) in extensions {
            exts.extend_from_slice(&kind.to_be_bytes());
            exts.extend_from_slice(&(data.len() as u16).to_be_bytes());
            exts.extend_from_slice(data);
        }
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(&exts);
        let mut msg = vec![1];
        msg.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        msg.extend_from_slice(&body);
        record(&msg)
    }

    fn record(payload: &[u8]) -> Vec<u8> {
        let mut out = vec![22, 3, 1];
        out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    fn sni(name: &str) -> (u16, Vec<u8>) {
        let mut entry = vec![0];
        entry.extend_from_slice(&(name.len() as u16).to_be_bytes());
        entry.extend_from_slice(name.as_bytes());
        let mut data = (entry.len() as u16).to_be_bytes().to_vec();
        data.extend_from_slice(&entry);
        (0, data)
    }

    #[test]
    fn the_server_name_is_read_whatever_the_extension_order() {
        let h = hello(&[(10, vec![0, 2, 0, 29]), sni("api.example.com"), (16, vec![0, 3, 2, b'h', b'2'])]);
        assert_eq!(parse(&h), Hello::Complete { sni: Some("api.example.com".into()) });
        assert_eq!(parse(&hello(&[(10, vec![0, 2, 0, 29])])), Hello::Complete { sni: None });
        // Every proper prefix is partial, never a guess.
        for n in 0..h.len() {
            assert_eq!(parse(&h[..n]), Hello::Partial, "prefix {n}");
        }
        // Bytes after the hello (a pipelined record) do not matter.
        let mut more = h.clone();
        more.extend_from_slice(&[23, 3, 3, 0, 1, 0]);
        assert_eq!(parse(&more), Hello::Complete { sni: Some("api.example.com".into()) });
    }

    #[test]
    fn a_hello_split_across_records_is_reassembled() {
        let h = hello(&[(21, vec![0; 300]), sni("split.test")]);
        let msg = &h[5..];
        let mut split = record(&msg[..100]);
        split.extend_from_slice(&record(&msg[100..]));
        assert_eq!(parse(&split), Hello::Complete { sni: Some("split.test".into()) });
        assert_eq!(parse(&split[..split.len() - 1]), Hello::Partial);
    }

    #[test]
    fn other_bytes_are_not_tls_and_broken_hellos_are_malformed() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Hello::NotTls);
        assert_eq!(parse(b"SSH-2.0-OpenSSH_9.6\r\n"), Hello::NotTls);
        assert_eq!(parse(&[22, 2, 0]), Hello::NotTls);
        // Other TLS record types first: TLS without its ClientHello, refused.
        assert_eq!(parse(&[21, 3, 3, 0, 2, 2, 40]), Hello::Malformed, "an alert");
        assert_eq!(parse(&[20, 3, 3, 0, 1, 1]), Hello::Malformed, "a change_cipher_spec");
        assert_eq!(parse(&[23, 3, 3, 0, 1, 0]), Hello::Malformed, "application data");
        assert_eq!(parse(&[24, 3, 1]), Hello::Malformed, "a heartbeat");
        assert_eq!(parse(&[21]), Hello::Partial);
        assert_eq!(parse(&[21, 1, 0]), Hello::NotTls);
        assert_eq!(parse(&[25, 3, 3]), Hello::NotTls);
        // A handshake record that is not a ClientHello.
        assert_eq!(parse(&record(&[2, 0, 0, 1, 0])), Hello::Malformed);
        // Two server_name extensions, or two host names in one.
        assert_eq!(parse(&hello(&[sni("a.test"), sni("b.test")])), Hello::Malformed);
        let (_, one) = sni("a.test");
        let mut two = one[2..].to_vec();
        two.extend_from_slice(&one[2..]);
        let mut data = (two.len() as u16).to_be_bytes().to_vec();
        data.extend_from_slice(&two);
        assert_eq!(parse(&hello(&[(0, data)])), Hello::Malformed);
        // A length that runs past its vector.
        let mut bad = hello(&[sni("a.test")]);
        let last = bad.len() - 1;
        bad.truncate(last);
        let len = bad.len() - 5;
        bad[3..5].copy_from_slice(&(len as u16).to_be_bytes());
        let body_len = len - 4;
        bad[6..9].copy_from_slice(&(body_len as u32).to_be_bytes()[1..]);
        assert_eq!(parse(&bad), Hello::Malformed);
        // A declared hello larger than the cap.
        assert_eq!(parse(&record(&[1, 0, 0x50, 0])), Hello::Malformed);
    }
}
