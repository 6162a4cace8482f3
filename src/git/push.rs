//! The receive-pack command list, the one-branch rule, and the answer sluice gives a refused push.
//!
//! A push request body is `*shallow command-list [push-options] pack`; everything before the pack is
//! read and judged before a byte goes upstream. Parsing follows git's receive-pack: one optional LF
//! chomped per line, capabilities after a NUL on the first command only (a NUL elsewhere fails closed,
//! because receive-pack would cut the ref name there).

use std::fmt;

use super::pktline::{self, MAX_PKT_LEN, Packet, PktError, Reader};

/// The most command-list bytes (decoded) sluice reads before the pack: about 10 000 ref updates.
pub const MAX_COMMAND_BYTES: usize = 1 << 20;

/// One `old new ref` command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefUpdate {
    pub old: String,
    pub new: String,
    pub name: String,
}

impl RefUpdate {
    /// An all-zero new id deletes the ref.
    pub fn is_delete(&self) -> bool {
        self.new.bytes().all(|b| b == b'0')
    }
}

/// What a push asks for, up to the pack.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PushRequest {
    pub shallow: Vec<String>,
    pub updates: Vec<RefUpdate>,
    pub capabilities: Vec<String>,
    pub options: Vec<String>,
}

impl PushRequest {
    /// Whether the client asked for a capability (`name` or `name=value`).
    pub fn has_capability(&self, name: &str) -> bool {
        self.capabilities.iter().any(|c| c == name || c.strip_prefix(name).is_some_and(|rest| rest.starts_with('=')))
    }

    /// The largest side-band packet the client accepts, when it asked for side-band at all.
    pub fn side_band(&self) -> Option<usize> {
        if self.has_capability("side-band-64k") {
            Some(MAX_PKT_LEN)
        } else if self.has_capability("side-band") {
            Some(1000)
        } else {
            None
        }
    }
}

/// Why a command list cannot be read. Every one fails the push closed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PushError {
    Pkt(PktError),
    /// The body ended before the command list's flush.
    Truncated {
        len: usize,
    },
    TooLarge,
    UnexpectedPacket {
        offset: usize,
        what: &'static str,
    },
    BadCommand {
        offset: usize,
        line: String,
        why: &'static str,
    },
    SignedPush,
}

impl From<PktError> for PushError {
    fn from(e: PktError) -> Self {
        PushError::Pkt(e)
    }
}

impl fmt::Display for PushError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PushError::Pkt(e) => write!(f, "push request: {e}"),
            PushError::Truncated { len } => {
                write!(f, "push request ended after {len} bytes, inside the command list (expected a flush-pkt)")
            }
            PushError::TooLarge => {
                write!(f, "push command list exceeds {} KiB; push fewer refs at a time", MAX_COMMAND_BYTES / 1024)
            }
            PushError::UnexpectedPacket { offset, what } => {
                write!(f, "push request: unexpected {what} at byte {offset} in the command list")
            }
            PushError::BadCommand { offset, line, why } => {
                write!(f, "push request: command {line:?} at byte {offset}: {why}")
            }
            PushError::SignedPush => {
                f.write_str("signed pushes (push-cert) are not supported through sluice; push without --signed")
            }
        }
    }
}

impl std::error::Error for PushError {}

/// A line for an error message: lossy UTF-8, at most 160 characters.
fn quote_line(line: &[u8]) -> String {
    String::from_utf8_lossy(line).chars().take(160).collect()
}

fn is_object_id(s: &[u8]) -> bool {
    matches!(s.len(), 40 | 64) && s.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Reads the command list (and push options) from the start of a decoded request body.
/// `Ok(None)`: not complete yet and `eof` is false.
pub fn parse(buf: &[u8], eof: bool) -> Result<Option<PushRequest>, PushError> {
    let incomplete = || {
        if buf.len() >= MAX_COMMAND_BYTES {
            Err(PushError::TooLarge)
        } else if eof {
            Err(PushError::Truncated { len: buf.len() })
        } else {
            Ok(None)
        }
    };
    let mut reader = Reader::new(buf);
    let mut req = PushRequest::default();
    loop {
        let offset = reader.offset();
        let line = match reader.next_packet()? {
            None => return incomplete(),
            Some(Packet::Flush) => break,
            Some(Packet::Delim) => return Err(PushError::UnexpectedPacket { offset, what: "delim-pkt (0001)" }),
            Some(Packet::ResponseEnd) => {
                return Err(PushError::UnexpectedPacket { offset, what: "response-end-pkt (0002)" });
            }
            Some(Packet::Data(line)) => line.strip_suffix(b"\n").unwrap_or(line),
        };
        let bad = |why| PushError::BadCommand { offset, line: quote_line(line), why };
        if let Some(oid) = line.strip_prefix(b"shallow ") {
            if !req.updates.is_empty() {
                return Err(bad("shallow lines must come before the commands"));
            }
            if !is_object_id(oid) {
                return Err(bad("expected `shallow <object id>`"));
            }
            req.shallow.push(String::from_utf8_lossy(oid).into_owned());
            continue;
        }
        if line.starts_with(b"push-cert") {
            return Err(PushError::SignedPush);
        }
        let (command, caps) = match line.iter().position(|&b| b == 0) {
            Some(i) => (&line[..i], Some(&line[i + 1..])),
            None => (line, None),
        };
        if let Some(caps) = caps {
            if !req.updates.is_empty() {
                return Err(bad("a NUL is allowed only on the first command, before its capabilities"));
            }
            let caps = std::str::from_utf8(caps).map_err(|_| bad("capabilities are not UTF-8"))?;
            req.capabilities = caps.split(' ').filter(|c| !c.is_empty()).map(str::to_owned).collect();
        }
        let mut parts = command.splitn(3, |&b| b == b' ');
        let (Some(old), Some(new), Some(name)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad("expected `<old id> <new id> <ref>`"));
        };
        if !is_object_id(old) || !is_object_id(new) || old.len() != new.len() {
            return Err(bad("expected two lowercase hex object ids of the same length"));
        }
        let name = std::str::from_utf8(name).map_err(|_| bad("ref name is not UTF-8"))?;
        req.updates.push(RefUpdate {
            old: String::from_utf8_lossy(old).into_owned(),
            new: String::from_utf8_lossy(new).into_owned(),
            name: name.to_owned(),
        });
    }
    if req.has_capability("push-options") && !req.updates.is_empty() {
        loop {
            let offset = reader.offset();
            match reader.next_packet()? {
                None => return incomplete(),
                Some(Packet::Flush) => break,
                Some(Packet::Data(line)) => {
                    let line = line.strip_suffix(b"\n").unwrap_or(line);
                    req.options.push(String::from_utf8_lossy(line).into_owned());
                }
                Some(_) => return Err(PushError::UnexpectedPacket { offset, what: "special packet in push options" }),
            }
        }
    }
    if reader.offset() > MAX_COMMAND_BYTES {
        return Err(PushError::TooLarge);
    }
    Ok(Some(req))
}

/// The side-band size a (possibly unparseable) request asked for, so even a malformed push gets an
/// error the client can demultiplex.
pub fn sniff_side_band(buf: &[u8]) -> Option<usize> {
    let mut reader = Reader::new(buf);
    while let Ok(Some(Packet::Data(line))) = reader.next_packet() {
        if line.starts_with(b"shallow ") {
            continue;
        }
        let caps = &line[line.iter().position(|&b| b == 0)? + 1..];
        let req = PushRequest {
            capabilities: String::from_utf8_lossy(caps).split([' ', '\n']).map(str::to_owned).collect(),
            ..PushRequest::default()
        };
        return req.side_band();
    }
    None
}

/// git's `check-ref-format` rules, for a full ref name. The reason says which rule failed.
pub fn check_ref_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("it is empty");
    }
    if name == "@" {
        return Err("it is \"@\"");
    }
    if name.starts_with('/') || name.ends_with('/') {
        return Err("it begins or ends with '/'");
    }
    if name.ends_with('.') {
        return Err("it ends with '.'");
    }
    if name.contains("..") {
        return Err("it contains \"..\"");
    }
    if name.contains("@{") {
        return Err("it contains \"@{\"");
    }
    if name.bytes().any(|b| b < 0x20 || b == 0x7f) {
        return Err("it contains a control character");
    }
    if name.bytes().any(|b| matches!(b, b' ' | b'~' | b'^' | b':' | b'?' | b'*' | b'[' | b'\\')) {
        return Err("it contains one of ' ', '~', '^', ':', '?', '*', '[', '\\'");
    }
    for component in name.split('/') {
        if component.is_empty() {
            return Err("it contains \"//\"");
        }
        if component.starts_with('.') {
            return Err("a component begins with '.'");
        }
        if component.ends_with(".lock") {
            return Err("a component ends with \".lock\"");
        }
    }
    if !name.contains('/') {
        return Err("it has only one component");
    }
    Ok(())
}

/// The one-branch rule for one command: `Err(reason)` when it is refused.
pub fn judge(update: &RefUpdate, branch: &str) -> Result<(), String> {
    let allowed = format!("refs/heads/{branch}");
    if let Err(why) = check_ref_name(&update.name) {
        return Err(format!("invalid ref name: {why}; push restricted to {allowed}"));
    }
    if update.name != allowed {
        return Err(format!("push restricted to {allowed}"));
    }
    if update.is_delete() {
        return Err(format!("deleting {allowed} is not allowed"));
    }
    Ok(())
}

/// What sluice does with a push.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Every command updates or creates the working branch (or there are none: git's `0000` probe).
    Allow,
    /// One reason per command, in order; a command that was fine on its own is refused with the push.
    Refuse(Vec<String>),
}

/// Judges every command; a push is allowed whole or refused whole.
pub fn review(req: &PushRequest, branch: &str) -> Verdict {
    let judged: Vec<Result<(), String>> = req.updates.iter().map(|u| judge(u, branch)).collect();
    if judged.iter().all(Result::is_ok) {
        return Verdict::Allow;
    }
    let reasons = judged
        .into_iter()
        .map(|r| {
            r.err().unwrap_or_else(|| {
                "refused with the rest of the push; only refs/heads/".to_owned() + branch + " may be pushed"
            })
        })
        .collect();
    Verdict::Refuse(reasons)
}

/// Report-status text must stay on one line.
fn one_line(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { '?' } else { c }).collect()
}

/// The receive-pack result sluice sends instead of forwarding: a progress `notice`, `unpack ok`, and
/// `ng REF REASON` for every command, side-band wrapped when the client asked for it.
pub fn refusal(req: &PushRequest, notice: &str, reasons: &[String]) -> Vec<u8> {
    let mut report = Vec::new();
    pktline::put_data(&mut report, b"unpack ok\n");
    for (update, reason) in req.updates.iter().zip(reasons) {
        let line = format!("ng {} {}\n", one_line(&update.name), one_line(reason));
        pktline::put_data(&mut report, line.as_bytes());
    }
    report.extend_from_slice(pktline::FLUSH);
    match req.side_band() {
        None => report,
        Some(max) => {
            let mut out = Vec::new();
            let notice = format!("{}\n", one_line(notice));
            pktline::put_band(&mut out, 2, notice.as_bytes(), max);
            pktline::put_band(&mut out, 1, &report, max);
            out.extend_from_slice(pktline::FLUSH);
            out
        }
    }
}

/// A fatal error in the receive-pack result: side-band 3 when the client multiplexes, else `ERR`.
pub fn fatal(message: &str, side_band: Option<usize>) -> Vec<u8> {
    let message = one_line(message);
    let mut out = Vec::new();
    match side_band {
        Some(max) => {
            pktline::put_band(&mut out, 3, format!("{message}\n").as_bytes(), max);
            out.extend_from_slice(pktline::FLUSH);
        }
        None => pktline::put_data(&mut out, format!("ERR {message}\n").as_bytes()),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "1111111111111111111111111111111111111111";
    const B: &str = "2222222222222222222222222222222222222222";
    const Z: &str = "0000000000000000000000000000000000000000";

    fn body(lines: &[&[u8]], options: Option<&[&str]>) -> Vec<u8> {
        let mut out = Vec::new();
        for l in lines {
            pktline::put_data(&mut out, l);
        }
        out.extend_from_slice(pktline::FLUSH);
        if let Some(opts) = options {
            for o in opts {
                pktline::put_data(&mut out, o.as_bytes());
            }
            out.extend_from_slice(pktline::FLUSH);
        }
        out.extend_from_slice(b"PACK\0\0\0\x02");
        out
    }

    fn cmd(old: &str, new: &str, name: &str) -> Vec<u8> {
        format!("{old} {new} {name}").into_bytes()
    }

    fn first(old: &str, new: &str, name: &str, caps: &str) -> Vec<u8> {
        format!("{old} {new} {name}\0{caps}").into_bytes()
    }

    fn update(old: &str, new: &str, name: &str) -> RefUpdate {
        RefUpdate { old: old.into(), new: new.into(), name: name.into() }
    }

    #[test]
    fn parses_commands_capabilities_shallow_and_options() {
        let l1 = first(A, B, "refs/heads/feature", " report-status side-band-64k push-options agent=git/2.47.3");
        let l2 = cmd(Z, B, "refs/heads/other\n");
        let buf = body(&[b"shallow 3333333333333333333333333333333333333333", &l1, &l2], Some(&["ci.skip", "k=v\n"]));
        let req = parse(&buf, false).unwrap().unwrap();
        assert_eq!(req.shallow, ["3333333333333333333333333333333333333333"]);
        assert_eq!(req.updates, [update(A, B, "refs/heads/feature"), update(Z, B, "refs/heads/other")]);
        assert_eq!(req.capabilities, ["report-status", "side-band-64k", "push-options", "agent=git/2.47.3"]);
        assert_eq!(req.options, ["ci.skip", "k=v"]);
        assert!(req.has_capability("agent") && !req.has_capability("side-band"));
        assert_eq!(req.side_band(), Some(MAX_PKT_LEN));
        assert_eq!(sniff_side_band(&buf), Some(MAX_PKT_LEN));
    }

    #[test]
    fn options_are_read_only_when_announced() {
        let l1 = first(A, B, "refs/heads/feature", "report-status");
        let buf = body(&[&l1], None);
        let req = parse(&buf, false).unwrap().unwrap();
        assert_eq!(req.options, Vec::<String>::new());
        assert_eq!(req.side_band(), None);
    }

    #[test]
    fn waits_for_the_whole_list_and_fails_at_the_end_of_the_body() {
        let l1 = first(A, B, "refs/heads/feature", "report-status push-options");
        let buf = body(&[&l1], Some(&["k=v"]));
        let opts_start = 4 + l1.len() + 4;
        for cut in [0, 3, 10, 4 + l1.len(), opts_start + 2] {
            assert_eq!(parse(&buf[..cut], false), Ok(None), "cut at {cut}");
            assert_eq!(parse(&buf[..cut], true), Err(PushError::Truncated { len: cut }), "cut at {cut}");
        }
        assert!(parse(&buf[..opts_start + 11], true).unwrap().is_some());
    }

    #[test]
    fn probe_is_an_empty_request() {
        assert_eq!(parse(b"0000", true), Ok(Some(PushRequest::default())));
        assert_eq!(review(&PushRequest::default(), "feature"), Verdict::Allow);
    }

    #[test]
    fn malformed_lists_fail_closed() {
        let bad = |lines: &[&[u8]]| parse(&body(lines, None), false).unwrap_err().to_string();
        assert_eq!(bad(&[b"hello"]), "push request: command \"hello\" at byte 0: expected `<old id> <new id> <ref>`");
        assert_eq!(
            bad(&[&cmd("XYZ", B, "refs/heads/f")]),
            format!(
                "push request: command \"XYZ {B} refs/heads/f\" at byte 0: expected two lowercase hex object ids of the same length"
            )
        );
        let l1 = first(A, B, "refs/heads/feature", "report-status");
        assert_eq!(
            bad(&[&l1, b"shallow 3333333333333333333333333333333333333333"]),
            "push request: command \"shallow 3333333333333333333333333333333333333333\" at byte 118: shallow lines must come before the commands"
        );
        assert_eq!(bad(&[b"push-cert\0report-status"]), PushError::SignedPush.to_string());
        assert_eq!(parse(b"0032zz", false), Ok(None), "a packet that is still arriving is not judged yet");
        assert_eq!(
            parse(b"00zz", false).unwrap_err().to_string(),
            "push request: malformed pkt-line at byte 0: length \"00zz\" is not four hex digits"
        );
        assert_eq!(parse(b"0001", false), Err(PushError::UnexpectedPacket { offset: 0, what: "delim-pkt (0001)" }));
    }

    #[test]
    fn nul_cut_names_on_later_lines_fail_closed() {
        let l1 = first(A, B, "refs/heads/feature", "report-status");
        let l2 = format!("{A} {B} refs/heads/feature\0refs/heads/main").into_bytes();
        assert_eq!(
            parse(&body(&[&l1, &l2], None), false).unwrap_err().to_string(),
            format!(
                "push request: command \"{A} {B} refs/heads/feature\\0refs/heads/main\" at byte 118: a NUL is allowed only on the first command, before its capabilities"
            )
        );
        // On the first line, what follows the NUL is capabilities: the ref is what precedes it.
        let l1 = first(A, B, "refs/heads/main", "refs/heads/feature");
        let req = parse(&body(&[&l1], None), false).unwrap().unwrap();
        assert_eq!(req.updates[0].name, "refs/heads/main");
        assert_eq!(review(&req, "feature"), Verdict::Refuse(vec!["push restricted to refs/heads/feature".into()]));
    }

    #[test]
    fn command_list_is_bounded() {
        let mut buf = Vec::new();
        let line = cmd(A, B, "refs/heads/feature");
        while buf.len() < MAX_COMMAND_BYTES {
            pktline::put_data(&mut buf, &line);
        }
        assert_eq!(parse(&buf, false), Err(PushError::TooLarge));
    }

    #[test]
    fn ref_names_follow_check_ref_format() {
        let table: &[(&str, Result<(), &str>)] = &[
            ("refs/heads/feature", Ok(())),
            ("refs/heads/feat/sub-1_x.y", Ok(())),
            ("refs/heads/main/../main", Err("it contains \"..\"")),
            ("refs/heads//main", Err("it contains \"//\"")),
            ("refs/heads/main/", Err("it begins or ends with '/'")),
            ("/refs/heads/main", Err("it begins or ends with '/'")),
            ("refs/heads/main.", Err("it ends with '.'")),
            ("refs/heads/main.lock", Err("a component ends with \".lock\"")),
            ("refs/heads/.main", Err("a component begins with '.'")),
            ("refs/heads/ma@{in", Err("it contains \"@{\"")),
            ("refs/heads/ma\x01in", Err("it contains a control character")),
            ("refs/heads/ma\x7fin", Err("it contains a control character")),
            ("refs/heads/ma in", Err("it contains one of ' ', '~', '^', ':', '?', '*', '[', '\\'")),
            ("refs/heads/ma~1", Err("it contains one of ' ', '~', '^', ':', '?', '*', '[', '\\'")),
            ("refs/heads/ma*", Err("it contains one of ' ', '~', '^', ':', '?', '*', '[', '\\'")),
            ("refs\\heads\\main", Err("it contains one of ' ', '~', '^', ':', '?', '*', '[', '\\'")),
            ("HEAD", Err("it has only one component")),
            ("@", Err("it is \"@\"")),
            ("", Err("it is empty")),
        ];
        for (name, want) in table {
            assert_eq!(check_ref_name(name), *want, "{name:?}");
        }
    }

    #[test]
    fn one_branch_rule() {
        let table: &[(RefUpdate, Result<(), &str>)] = &[
            (update(A, B, "refs/heads/feature"), Ok(())),
            (update(Z, B, "refs/heads/feature"), Ok(())),
            (update(A, Z, "refs/heads/feature"), Err("deleting refs/heads/feature is not allowed")),
            (update(A, Z, "refs/heads/other"), Err("push restricted to refs/heads/feature")),
            (update(A, B, "refs/heads/main"), Err("push restricted to refs/heads/feature")),
            (update(Z, B, "refs/tags/v1"), Err("push restricted to refs/heads/feature")),
            (
                update(A, B, "HEAD"),
                Err("invalid ref name: it has only one component; push restricted to refs/heads/feature"),
            ),
            (update(A, B, "refs/heads/Feature"), Err("push restricted to refs/heads/feature")),
            (update(A, B, "refs/heads/feature/x"), Err("push restricted to refs/heads/feature")),
            (
                update(A, B, "refs/heads/feature.lock"),
                Err("invalid ref name: a component ends with \".lock\"; push restricted to refs/heads/feature"),
            ),
            (
                update(A, B, "refs/heads/x/../feature"),
                Err("invalid ref name: it contains \"..\"; push restricted to refs/heads/feature"),
            ),
            (update(A, B, "refs/remotes/origin/feature"), Err("push restricted to refs/heads/feature")),
        ];
        for (u, want) in table {
            assert_eq!(judge(u, "feature"), want.map_err(str::to_owned), "{u:?}");
        }
    }

    #[test]
    fn one_bad_ref_refuses_the_whole_push_in_either_order() {
        let good = || update(A, B, "refs/heads/feature");
        let mut updates: Vec<RefUpdate> = (0..50).map(|_| good()).collect();
        updates.push(update(A, B, "refs/heads/main"));
        let req = PushRequest { updates, ..PushRequest::default() };
        let Verdict::Refuse(reasons) = review(&req, "feature") else { panic!("allowed a push to main") };
        assert_eq!(reasons.len(), 51);
        assert_eq!(reasons[0], "refused with the rest of the push; only refs/heads/feature may be pushed");
        assert_eq!(reasons[50], "push restricted to refs/heads/feature");
        let req = PushRequest { updates: vec![update(A, B, "refs/tags/v1"), good()], ..PushRequest::default() };
        assert_eq!(
            review(&req, "feature"),
            Verdict::Refuse(vec![
                "push restricted to refs/heads/feature".into(),
                "refused with the rest of the push; only refs/heads/feature may be pushed".into()
            ])
        );
    }

    #[test]
    fn refusal_is_a_report_for_every_ref() {
        let req = PushRequest {
            updates: vec![update(A, B, "refs/heads/main"), update(A, B, "refs/heads/x\ny")],
            capabilities: vec!["report-status".into()],
            ..PushRequest::default()
        };
        let reasons = vec!["push restricted to refs/heads/f".to_owned(), "bad\nreason".to_owned()];
        let plain = refusal(&req, "sluice: no", &reasons);
        assert_eq!(
            String::from_utf8(plain).unwrap(),
            "000eunpack ok\n0037ng refs/heads/main push restricted to refs/heads/f\n0021ng refs/heads/x?y bad?reason\n0000"
        );
        let req = PushRequest { capabilities: vec!["side-band-64k".into()], ..req };
        let banded = refusal(&req, "sluice: only f", &reasons);
        let mut r = Reader::new(&banded);
        assert_eq!(r.next_packet(), Ok(Some(Packet::Data(b"\x02sluice: only f\n"))));
        let Ok(Some(Packet::Data(inner))) = r.next_packet() else { panic!("no band 1") };
        assert_eq!(inner[0], 1);
        assert!(inner[1..].starts_with(b"000eunpack ok\n0037ng refs/heads/main"));
        assert_eq!(r.next_packet(), Ok(Some(Packet::Flush)));
        assert_eq!(r.offset(), banded.len());
    }

    #[test]
    fn fatal_errors_match_the_framing() {
        assert_eq!(fatal("bad thing", None), b"0012ERR bad thing\n");
        assert_eq!(fatal("bad\nthing", Some(1000)), b"000f\x03bad?thing\n0000");
    }
}
