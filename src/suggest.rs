//! `sluice suggest`: reads decision records and prints the policy entries that would admit what was
//! refused (or, in report mode, would have been), as TOML a person can paste, or as JSON for a UI.
//!
//! The log is read one line at a time; memory grows with the number of distinct destinations only.
//! What no policy can lift (the address guard, the proxy's own addresses) is never suggested.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;

use crate::audit::reader::{DecisionRecord, Item, RecordReader};
use crate::command::{EXIT_OK, load_set, print_report, resolve_policy, usage_exit};
use crate::policy::{DEFAULT_PORTS, HostPattern, Level, Policy, Reason, Target};

/// Sessions named per entry; beyond them, a count.
const SESSIONS_SHOWN: usize = 8;
/// Names below one registrable domain from which they are collapsed into `*.domain`.
pub const COLLAPSE_AT: usize = 3;
/// Malformed lines printed (all are counted).
pub(crate) const MALFORMED_SHOWN: u64 = 20;

pub struct SuggestArgs {
    pub log: PathBuf,
    pub session: Option<String>,
    /// The policy the suggestion is for (name or file): only its records are read, and its `ports`
    /// decide which entries need `:PORT`.
    pub policy: Option<String>,
    pub policies: Option<PathBuf>,
    pub json: bool,
}

/// How often, when and by whom a destination was refused.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Seen {
    pub count: u64,
    pub first: String,
    pub last: String,
    /// Up to [`SESSIONS_SHOWN`] session ids, sorted.
    pub sessions: BTreeSet<String>,
    /// Sessions beyond those listed.
    pub more_sessions: u64,
}

impl Seen {
    pub(crate) fn add(&mut self, time: &str, session: &str) {
        self.count += 1;
        if self.first.is_empty() || time < self.first.as_str() {
            self.first = time.to_string();
        }
        if time > self.last.as_str() {
            self.last = time.to_string();
        }
        self.add_session(session);
    }

    fn add_session(&mut self, session: &str) {
        if self.sessions.contains(session) {
            return;
        }
        if self.sessions.len() < SESSIONS_SHOWN {
            self.sessions.insert(session.to_string());
        } else {
            self.more_sessions += 1;
        }
    }

    fn merge(&mut self, other: &Seen) {
        self.count += other.count;
        if self.first.is_empty() || (!other.first.is_empty() && other.first < self.first) {
            self.first.clone_from(&other.first);
        }
        if other.last > self.last {
            self.last.clone_from(&other.last);
        }
        for s in &other.sessions {
            self.add_session(s);
        }
        self.more_sessions += other.more_sessions;
    }

    /// `N requests, FIRST to LAST, sessions a, b (+N more)`.
    pub(crate) fn comment(&self) -> String {
        let requests = if self.count == 1 { "1 request".to_string() } else { format!("{} requests", self.count) };
        let when =
            if self.first == self.last { self.first.clone() } else { format!("{} to {}", self.first, self.last) };
        let mut sessions = self.sessions.iter().cloned().collect::<Vec<_>>().join(", ");
        if self.more_sessions > 0 {
            sessions.push_str(&format!(" (+{} more)", self.more_sessions));
        }
        let noun = if self.sessions.len() as u64 + self.more_sessions == 1 { "session" } else { "sessions" };
        format!("{requests}, {when}, {noun} {sessions}")
    }
}

/// One entry to add to `allow`: its text, the destinations it stands for, and when they were seen.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Entry {
    pub entry: String,
    pub destinations: Vec<String>,
    #[serde(flatten)]
    pub seen: Seen,
}

/// A destination and why it is listed rather than suggested.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Listed {
    pub destination: String,
    /// The reason code, or for the default list the group that has it.
    pub why: String,
    #[serde(flatten)]
    pub seen: Seen,
}

/// What `suggest` found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Suggestion {
    pub allow: Vec<Entry>,
    pub allow_ips: Vec<Entry>,
    /// `include_defaults = true` admits these.
    pub defaults: Vec<Listed>,
    /// The policy's deny list refused these: only removing the entry lifts it.
    pub denylisted: Vec<Listed>,
    /// No policy can lift these: the address guard, the proxy's own addresses, port 0.
    pub not_liftable: Vec<Listed>,
    /// The policy's explicit `ports`, repeated so that entries without `:PORT` mean the same.
    pub ports: Option<Vec<u16>>,
    /// The records' policy already used the default list (level trusted, or include_defaults): the
    /// snippet keeps it, so that pasting `level = "custom"` does not drop it.
    pub keeps_defaults: bool,
    pub records: u64,
    pub refused: u64,
    pub malformed: u64,
}

/// Collects refused destinations from decision records, one at a time.
pub struct Suggester {
    session: Option<String>,
    policy: Option<Arc<Policy>>,
    /// The Trusted level over the same default list: what `include_defaults` would admit.
    trusted: Policy,
    names: HashMap<(String, u16), Seen>,
    ips: HashMap<(IpAddr, u16), Seen>,
    denylisted: HashMap<(String, u16), (Seen, String)>,
    guarded: HashMap<(String, u16), (Seen, String)>,
    records: u64,
    refused: u64,
    /// Some record was decided at level trusted, which uses the default list.
    trusted_records: bool,
}

impl Suggester {
    pub fn new(
        policy: Option<Arc<Policy>>,
        session: Option<String>,
        defaults: Arc<crate::policy::DefaultList>,
    ) -> Suggester {
        Suggester {
            session,
            policy,
            trusted: Policy::builtin(Level::Trusted, defaults),
            names: HashMap::new(),
            ips: HashMap::new(),
            denylisted: HashMap::new(),
            guarded: HashMap::new(),
            records: 0,
            refused: 0,
            trusted_records: false,
        }
    }

    pub fn add(&mut self, r: &DecisionRecord) {
        let session = r.session.as_deref().unwrap_or("-");
        if self.session.as_deref().is_some_and(|s| s != session) {
            return;
        }
        if let Some(p) = &self.policy
            && r.policy.as_deref() != Some(&*p.name)
        {
            return;
        }
        self.records += 1;
        self.trusted_records |= r.level.as_deref() == Some("trusted");
        let (Some(code), Some(host), Some(port)) = (r.refusal_code(), r.host.as_deref(), r.port) else { return };
        let Ok(target) = Target::parse(host) else { return };
        let time = r.time.as_deref().unwrap_or("");
        let name = target.to_string();
        let seen = |map: &mut HashMap<(String, u16), (Seen, String)>, why: &str| {
            let (seen, w) = map.entry((name.clone(), port)).or_insert_with(|| (Seen::default(), why.to_string()));
            seen.add(time, session);
            if w.is_empty() {
                *w = why.to_string();
            }
        };
        match code {
            "not_allowlisted" | "port_not_allowed" | "level_none" | "ip_not_allowed" => match target {
                Target::Name(_) => self.names.entry((name, port)).or_default().add(time, session),
                Target::Ip(ip) => self.ips.entry((ip, port)).or_default().add(time, session),
            },
            "denylisted" => seen(&mut self.denylisted, r.rule.as_deref().unwrap_or("")),
            "blocked_address" | "blocked_name" | "own_address" | "invalid_port" => seen(&mut self.guarded, code),
            // Limits, credentials, DNS and malformed requests are not the policy's to lift.
            _ => return,
        }
        self.refused += 1;
    }

    fn ports(&self) -> &[u16] {
        self.policy.as_ref().map_or(&DEFAULT_PORTS[..], |p| &p.ports)
    }

    pub fn finish(self) -> Suggestion {
        let mut out = Suggestion { records: self.records, refused: self.refused, ..Suggestion::default() };
        out.ports = self.policy.as_ref().filter(|p| p.ports_explicit).map(|p| p.ports.clone());
        out.keeps_defaults = self.trusted_records
            || self.policy.as_ref().is_some_and(|p| p.level == Level::Trusted || p.include_defaults);
        // A name the guard refused (its answer held a blocked address) stays refused whatever the
        // policy says: it is never suggested, on any port.
        let guarded_names: BTreeSet<&str> = self.guarded.keys().map(|(h, _)| h.as_str()).collect();
        // (registrable domain, port suffix) → names below it; names that are their own registrable
        // domain (or have none) stay exact.
        let mut groups: BTreeMap<(String, Option<u16>), Vec<Refused>> = BTreeMap::new();
        let mut exact: Vec<(String, Option<u16>, u16, Seen)> = Vec::new();
        for ((host, port), seen) in &self.names {
            if guarded_names.contains(host.as_str()) {
                continue;
            }
            let target = match Target::parse(host) {
                Ok(t) => t,
                Err(_) => continue,
            };
            let d = self.trusted.decide(&target, *port);
            if d.is_allowed() && d.reason == Reason::DefaultAllowlisted {
                let group = d.rule.as_ref().and_then(|r| r.group.as_deref()).unwrap_or("default list").to_string();
                out.defaults.push(Listed { destination: format!("{host}:{port}"), why: group, seen: seen.clone() });
                continue;
            }
            let suffix = (!self.ports().contains(port)).then_some(*port);
            match psl::domain_str(host).filter(|reg| *reg != host) {
                Some(reg) => {
                    groups.entry((reg.to_string(), suffix)).or_default().push((host.clone(), *port, seen.clone()))
                }
                None => exact.push((host.clone(), suffix, *port, seen.clone())),
            }
        }
        for ((reg, suffix), members) in groups {
            let distinct: BTreeSet<&str> = members.iter().map(|(h, _, _)| h.as_str()).collect();
            let pattern = with_port(&format!("*.{reg}"), suffix);
            if distinct.len() >= COLLAPSE_AT && HostPattern::parse(&pattern).is_ok() {
                let mut seen = Seen::default();
                let mut destinations: Vec<String> = members.iter().map(|(h, p, _)| format!("{h}:{p}")).collect();
                destinations.sort();
                for (_, _, s) in &members {
                    seen.merge(s);
                }
                out.allow.push(Entry { entry: pattern, destinations, seen });
            } else {
                exact.extend(members.into_iter().map(|(h, p, s)| (h, suffix, p, s)));
            }
        }
        // One entry per name and port suffix: `a.test` seen on 80 and 443 is one entry.
        let mut merged: BTreeMap<String, Entry> = BTreeMap::new();
        for (host, suffix, port, seen) in exact {
            let entry = with_port(&host, suffix);
            let e = merged.entry(entry.clone()).or_insert_with(|| Entry {
                entry,
                destinations: Vec::new(),
                seen: Seen::default(),
            });
            e.destinations.push(format!("{host}:{port}"));
            e.destinations.sort();
            e.seen.merge(&seen);
        }
        out.allow.extend(merged.into_values());
        for ((ip, port), seen) in self.ips {
            let net = match ip {
                IpAddr::V4(_) => format!("{ip}/32"),
                IpAddr::V6(_) => format!("{ip}/128"),
            };
            let destination = Target::Ip(ip).to_string();
            match out.allow_ips.iter_mut().find(|e| e.entry == net) {
                Some(e) => {
                    e.destinations.push(format!("{destination}:{port}"));
                    e.seen.merge(&seen);
                }
                None => {
                    out.allow_ips.push(Entry { entry: net, destinations: vec![format!("{destination}:{port}")], seen })
                }
            }
        }
        let listed = |map: HashMap<(String, u16), (Seen, String)>| -> Vec<Listed> {
            map.into_iter().map(|((h, p), (seen, why))| Listed { destination: format!("{h}:{p}"), why, seen }).collect()
        };
        out.denylisted = listed(self.denylisted);
        out.not_liftable = listed(self.guarded);
        let by_count = |a: &Seen, b: &Seen| b.count.cmp(&a.count);
        out.allow.sort_by(|a, b| by_count(&a.seen, &b.seen).then_with(|| a.entry.cmp(&b.entry)));
        out.allow_ips.sort_by(|a, b| by_count(&a.seen, &b.seen).then_with(|| a.entry.cmp(&b.entry)));
        for list in [&mut out.defaults, &mut out.denylisted, &mut out.not_liftable] {
            list.sort_by(|a, b| by_count(&a.seen, &b.seen).then_with(|| a.destination.cmp(&b.destination)));
        }
        out
    }
}

/// A refused name, its port, and when it was seen.
type Refused = (String, u16, Seen);

fn with_port(host: &str, port: Option<u16>) -> String {
    match port {
        Some(p) => format!("{host}:{p}"),
        None => host.to_string(),
    }
}

impl Suggestion {
    /// The TOML snippet, every entry commented with what it admits.
    pub fn toml(&self, log: &str) -> String {
        let mut out = String::new();
        out.push_str(&format!(
            "# sluice suggest: {} refused request{} in {log} ({} record{} read)\n",
            self.refused,
            if self.refused == 1 { "" } else { "s" },
            self.records,
            if self.records == 1 { "" } else { "s" }
        ));
        if self.allow.is_empty() && self.allow_ips.is_empty() && self.defaults.is_empty() {
            out.push_str("# nothing to suggest: no refusal in the log is one a policy entry would lift\n");
        } else {
            out.push_str("# merge into the policy (its own allow entries stay); `sluice check` shows each decision\n");
            out.push_str("level = \"custom\"\n");
            if !self.defaults.is_empty() {
                out.push_str(&format!(
                    "include_defaults = true # the default list has {}\n",
                    count(self.defaults.len(), "destination")
                ));
            } else if self.keeps_defaults {
                out.push_str("include_defaults = true # the policy already uses the default list\n");
            }
            if let Some(ports) = &self.ports {
                let list: Vec<String> = ports.iter().map(u16::to_string).collect();
                out.push_str(&format!("ports = [{}] # the policy's own\n", list.join(", ")));
            }
            for (key, entries) in [("allow", &self.allow), ("allow_ips", &self.allow_ips)] {
                if entries.is_empty() {
                    continue;
                }
                out.push_str(&format!("{key} = [\n"));
                for e in entries {
                    let names = if e.destinations.len() > 1 || e.entry.starts_with("*.") {
                        format!("{}: {}; ", count(e.destinations.len(), "destination"), e.destinations.join(", "))
                    } else {
                        String::new()
                    };
                    out.push_str(&format!("    {:?}, # {names}{}\n", e.entry, e.seen.comment()));
                }
                out.push_str("]\n");
            }
        }
        if !self.defaults.is_empty() {
            out.push_str("# in the default list (include_defaults = true admits them):\n");
            for l in &self.defaults {
                out.push_str(&format!("#   {} (group {:?}): {}\n", l.destination, l.why, l.seen.comment()));
            }
        }
        if !self.denylisted.is_empty() {
            out.push_str(
                "# refused by the policy's deny list, which wins over every allow; remove the entry to admit them:\n",
            );
            for l in &self.denylisted {
                let rule = if l.why.is_empty() { String::new() } else { format!(" by {}", l.why) };
                out.push_str(&format!("#   {}{rule}: {}\n", l.destination, l.seen.comment()));
            }
        }
        if !self.not_liftable.is_empty() {
            out.push_str("# not suggested: no policy can lift these (the address guard: loopback, private and metadata addresses and names; the proxy's own addresses):\n");
            for l in &self.not_liftable {
                out.push_str(&format!("#   {} {}: {}\n", l.destination, l.why, l.seen.comment()));
            }
        }
        if self.malformed > 0 {
            out.push_str(&format!("# {} skipped as malformed\n", count(self.malformed as usize, "line")));
        }
        out
    }
}

fn count(n: usize, noun: &str) -> String {
    if n == 1 { format!("1 {noun}") } else { format!("{n} {noun}s") }
}

/// Reports a malformed line on `err` (the first few), for both authoring commands.
pub(crate) fn report_malformed(err: &mut impl Write, m: &crate::audit::reader::Malformed, seen: u64) {
    if seen <= MALFORMED_SHOWN {
        let _ = writeln!(err, "{m}");
    } else if seen == MALFORMED_SHOWN + 1 {
        let _ = writeln!(err, "{}: more malformed lines follow; they are counted, not shown", m.file);
    }
}

/// `sluice suggest`: exit 0 with a suggestion (even an empty one), 2 when the log or the policy
/// cannot be read.
pub fn run(args: &SuggestArgs, out: &mut impl Write, err: &mut impl Write) -> u8 {
    let result = suggest(args, out, err);
    usage_exit(err, result)
}

fn suggest(args: &SuggestArgs, out: &mut impl Write, err: &mut impl Write) -> Result<u8, String> {
    let set = load_set(args.policies.as_deref())?;
    let policy = args.policy.as_deref().map(|p| resolve_policy(&set, p, "suggest")).transpose()?;
    let mut reader = RecordReader::open(&args.log).map_err(|msg| format!("sluice suggest: {msg}"))?;
    let mut suggester = Suggester::new(policy, args.session.clone(), set.defaults().clone());
    loop {
        match reader.next_item() {
            Ok(None) => break,
            Ok(Some(Item::Decision(r))) => suggester.add(&r),
            Ok(Some(Item::Malformed(m))) => report_malformed(err, &m, reader.malformed),
            Err(e) => return Err(reader.read_error("suggest", &e)),
        }
    }
    let mut suggestion = suggester.finish();
    suggestion.malformed = reader.malformed;
    print_report(out, args.json, &suggestion, || suggestion.toml(reader.name()))?;
    Ok(EXIT_OK)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::DefaultList;

    fn refused(host: &str, port: u16, level: &str) -> DecisionRecord {
        DecisionRecord {
            time: Some("2026-12-01T10:00:00.000Z".into()),
            event: Some("decision".into()),
            session: Some("s".into()),
            host: Some(host.into()),
            port: Some(port),
            verdict: Some("deny".into()),
            reason: Some("not_allowlisted".into()),
            policy: Some("p".into()),
            level: Some(level.into()),
            ..DecisionRecord::default()
        }
    }

    fn suggest(records: &[DecisionRecord]) -> Suggestion {
        let mut s = Suggester::new(None, None, DefaultList::builtin());
        records.iter().for_each(|r| s.add(r));
        s.finish()
    }

    fn entries(s: &Suggestion) -> Vec<&str> {
        s.allow.iter().map(|e| e.entry.as_str()).collect()
    }

    #[test]
    fn three_names_below_a_registrable_domain_collapse_two_do_not_and_the_apex_stays() {
        let two = suggest(&[refused("a.example.com", 443, "custom"), refused("b.example.com", 443, "custom")]);
        assert_eq!(entries(&two), ["a.example.com", "b.example.com"]);
        let three = suggest(&[
            refused("example.com", 443, "custom"),
            refused("a.example.com", 443, "custom"),
            refused("b.x.example.com", 443, "custom"),
            refused("c.example.com", 443, "custom"),
            refused("c.example.com", 8080, "custom"),
        ]);
        assert_eq!(entries(&three), ["*.example.com", "c.example.com:8080", "example.com"]);
        assert!(!three.keeps_defaults);
    }

    #[test]
    fn a_trusted_policys_records_keep_the_default_list() {
        let s = suggest(&[refused("a.example.com", 443, "trusted")]);
        assert!(s.keeps_defaults);
        assert!(s.toml("log").contains("\ninclude_defaults = true # the policy already uses the default list\n"));
    }
}
