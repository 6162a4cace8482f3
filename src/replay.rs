//! `sluice replay`: re-decides every recorded request against a candidate policy and reports what
//! would change — destinations newly denied and newly allowed, with counts and sessions — so that a
//! policy repository's CI can gate a change on real traffic (exit 1 when anything becomes denied).
//!
//! The log is read one line at a time; memory grows with the number of distinct destinations (each
//! is decided once and cached), never with the number of records.

use std::collections::HashMap;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;

use crate::audit::reader::{DecisionRecord, Item, RecordReader};
use crate::command::{EXIT_DENY, EXIT_OK, load_set, print_report, resolve_policy, usage_exit};
use crate::policy::{Policy, Target};
use crate::suggest::{Seen, report_malformed};

pub struct ReplayArgs {
    pub log: PathBuf,
    /// The candidate: a policy file (or a name in the policies directory).
    pub policy: String,
    /// The policies directory whose default list the candidate is read against.
    pub policies: Option<PathBuf>,
    pub json: bool,
}

/// A recorded request as replay re-decides it: the destination, and the method and path where the
/// record has them (plain HTTP). Host decisions read the destination; request rules, once policies
/// have them, read the method and path too.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request<'a> {
    pub target: Target,
    pub port: u16,
    /// The address that was dialled, which the guard checks again under the candidate.
    pub upstream: Option<IpAddr>,
    pub method: Option<&'a str>,
    pub path: Option<&'a str>,
}

/// What the candidate does with a request.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Outcome {
    served: bool,
    /// The reason code of the candidate's decision.
    code: &'static str,
    rule: Option<String>,
}

/// Whether the candidate serves `request`: its decision, report mode, then the guard on the address
/// that was dialled (a candidate without the `allow_ips` the old policy had refuses it).
fn decide(candidate: &Policy, request: &Request<'_>) -> Outcome {
    let d = candidate.decide(&request.target, request.port);
    let rule = d.rule.as_ref().map(|r| r.summary());
    let served = d.is_allowed() || candidate.mode.serves(&d.reason);
    if served
        && let Some(ip) = request.upstream
        && let Some(refused) = candidate.check_address(ip)
    {
        return Outcome { served: false, code: refused.reason.code(), rule: None };
    }
    Outcome { served, code: d.reason.code(), rule }
}

/// A destination whose outcome changes, with the candidate's reason and rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Change {
    pub destination: String,
    pub reason: &'static str,
    pub rule: Option<String>,
    #[serde(flatten)]
    pub seen: Seen,
}

/// What would change.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Replay {
    pub policy: String,
    pub newly_denied: Vec<Change>,
    pub newly_allowed: Vec<Change>,
    /// Records of this policy that were re-decided.
    pub replayed: u64,
    pub unchanged: u64,
    /// Records of other policies.
    pub other_policies: u64,
    /// Refusals no policy decided (the guard, limits, credentials, DNS, malformed requests) and
    /// records without a destination: re-deciding them says nothing about the candidate.
    pub not_policy: u64,
    pub malformed: u64,
}

/// Re-decides records one at a time.
pub struct Replayer {
    candidate: Arc<Policy>,
    cache: HashMap<(Box<str>, u16, Option<IpAddr>), Outcome>,
    denied: HashMap<(Box<str>, u16), Change>,
    allowed: HashMap<(Box<str>, u16), Change>,
    out: Replay,
}

/// Reasons a policy's own rules give; a record refused for any other was not the policy's doing.
fn policy_refusal(code: &str) -> bool {
    matches!(code, "not_allowlisted" | "port_not_allowed" | "level_none" | "ip_not_allowed" | "denylisted")
}

impl Replayer {
    pub fn new(candidate: Arc<Policy>) -> Replayer {
        let out = Replay { policy: candidate.name.to_string(), ..Replay::default() };
        Replayer { candidate, cache: HashMap::new(), denied: HashMap::new(), allowed: HashMap::new(), out }
    }

    pub fn add(&mut self, r: &DecisionRecord) {
        if r.policy.as_deref() != Some(&*self.candidate.name) {
            self.out.other_policies += 1;
            return;
        }
        let served = r.served();
        let (Some(host), Some(port)) = (r.host.as_deref(), r.port) else {
            self.out.not_policy += 1;
            return;
        };
        if !served && !r.refusal_code().is_some_and(policy_refusal) {
            self.out.not_policy += 1;
            return;
        }
        let upstream = r.upstream.as_deref().and_then(|u| u.parse::<SocketAddr>().ok()).map(|a| a.ip());
        let key = (Box::<str>::from(host), port, upstream);
        let outcome = match self.cache.get(&key) {
            Some(o) => o.clone(),
            None => {
                let Ok(target) = Target::parse(host) else {
                    self.out.not_policy += 1;
                    return;
                };
                let request = Request { target, port, upstream, method: r.method.as_deref(), path: r.path() };
                let o = decide(&self.candidate, &request);
                self.cache.insert(key, o.clone());
                o
            }
        };
        self.out.replayed += 1;
        let changes = match (served, outcome.served) {
            (true, false) => &mut self.denied,
            (false, true) => &mut self.allowed,
            _ => {
                self.out.unchanged += 1;
                return;
            }
        };
        let change = changes.entry((host.into(), port)).or_insert_with(|| Change {
            destination: format!("{host}:{port}"),
            reason: outcome.code,
            rule: outcome.rule.clone(),
            seen: Seen::default(),
        });
        change.seen.add(r.time.as_deref().unwrap_or(""), r.session.as_deref().unwrap_or("-"));
    }

    pub fn finish(mut self) -> Replay {
        let sorted = |m: HashMap<(Box<str>, u16), Change>| {
            let mut v: Vec<Change> = m.into_values().collect();
            v.sort_by(|a, b| b.seen.count.cmp(&a.seen.count).then_with(|| a.destination.cmp(&b.destination)));
            v
        };
        self.out.newly_denied = sorted(self.denied);
        self.out.newly_allowed = sorted(self.allowed);
        self.out
    }
}

/// Replays a whole log (any reader) against `candidate`; malformed lines go to `err`. For the
/// command and the bench.
pub fn replay_reader(
    reader: &mut RecordReader,
    candidate: Arc<Policy>,
    err: &mut impl Write,
) -> std::io::Result<Replay> {
    let mut replayer = Replayer::new(candidate);
    while let Some(item) = reader.next_item()? {
        match item {
            Item::Decision(r) => replayer.add(&r),
            Item::Malformed(m) => report_malformed(err, &m, reader.malformed),
        }
    }
    let mut out = replayer.finish();
    out.malformed = reader.malformed;
    Ok(out)
}

/// Replays records from any byte stream (gzip'd or not), for the bench and tests.
pub fn replay_bytes(name: &str, log: impl std::io::Read + 'static, candidate: Arc<Policy>) -> std::io::Result<Replay> {
    let mut reader = RecordReader::from_reader(name, log)?;
    replay_reader(&mut reader, candidate, &mut std::io::sink())
}

impl Replay {
    pub fn text(&self, log: &str, candidate: &str) -> String {
        let mut out = format!(
            "sluice replay: {log} against {candidate} (policy {}): {} replayed, {} unchanged, {} of other policies, {} not decided by policy, {} malformed\n",
            self.policy, self.replayed, self.unchanged, self.other_policies, self.not_policy, self.malformed
        );
        for (title, list) in [("newly denied", &self.newly_denied), ("newly allowed", &self.newly_allowed)] {
            let requests: u64 = list.iter().map(|c| c.seen.count).sum();
            if list.is_empty() {
                out.push_str(&format!("{title}: none\n"));
                continue;
            }
            out.push_str(&format!(
                "{title}: {} destination{}, {requests} request{}\n",
                list.len(),
                s(list.len() as u64),
                s(requests)
            ));
            for c in list {
                let rule = c.rule.as_ref().map(|r| format!(" rule={r:?}")).unwrap_or_default();
                out.push_str(&format!("  {} reason={}{rule}: {}\n", c.destination, c.reason, c.seen.comment()));
            }
        }
        out
    }
}

fn s(n: u64) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// `sluice replay`: exit 0 when nothing becomes denied, 1 when something does, 2 when the log or the
/// candidate cannot be read.
pub fn run(args: &ReplayArgs, out: &mut impl Write, err: &mut impl Write) -> u8 {
    let result = replay(args, out, err);
    usage_exit(err, result)
}

fn replay(args: &ReplayArgs, out: &mut impl Write, err: &mut impl Write) -> Result<u8, String> {
    let set = load_set(args.policies.as_deref())?;
    let candidate = resolve_policy(&set, &args.policy, "replay")?;
    let mut reader = RecordReader::open(&args.log).map_err(|msg| format!("sluice replay: {msg}"))?;
    let replay = replay_reader(&mut reader, candidate, err).map_err(|e| reader.read_error("replay", &e))?;
    print_report(out, args.json, &replay, || replay.text(reader.name(), &args.policy))?;
    Ok(if replay.newly_denied.is_empty() { EXIT_OK } else { EXIT_DENY })
}
