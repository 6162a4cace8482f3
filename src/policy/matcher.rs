//! The compiled form of a list of host patterns: hashed lookups over a host's label suffixes, and
//! globset only for label-internal wildcards, so a decision costs the same for 10 entries or 10,000.

use std::collections::HashMap;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

use super::host::Host;
use super::pattern::{HostPattern, PatternKind};

type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// A pattern list compiled for lookups; `T` is what each entry carries (its rule, for a decision).
#[derive(Debug)]
pub struct Matcher<T> {
    exact: FastMap<Box<str>, Vec<(HostPattern, T)>>,
    subdomains: FastMap<Box<str>, Vec<(HostPattern, T)>>,
    globs: GlobSet,
    glob_entries: Vec<(HostPattern, T)>,
}

/// The first entry whose host matched and whose port was accepted; failing that, the first entry whose
/// host matched at all (so a refusal can say "port 22 is not allowed" rather than "not listed").
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup<'a, T> {
    Hit(&'a HostPattern, &'a T),
    PortMismatch(&'a HostPattern, &'a T),
    Miss,
}

impl<T> Default for Matcher<T> {
    fn default() -> Self {
        Matcher {
            exact: FastMap::default(),
            subdomains: FastMap::default(),
            globs: GlobSet::empty(),
            glob_entries: Vec::new(),
        }
    }
}

impl<T> Matcher<T> {
    pub fn new(entries: impl IntoIterator<Item = (HostPattern, T)>) -> Self {
        let mut m = Matcher::default();
        let mut globs = GlobSetBuilder::new();
        for (pattern, value) in entries {
            match pattern.kind() {
                PatternKind::Exact(h) => m.exact.entry(h.as_str().into()).or_default().push((pattern, value)),
                PatternKind::Subdomains(h) => m.subdomains.entry(h.as_str().into()).or_default().push((pattern, value)),
                PatternKind::Glob { .. } => {
                    let text = pattern.to_component_glob().unwrap_or_default();
                    // Patterns were validated to letters, digits, '-', '_' and '*', so this glob cannot
                    // fail to build; a failure would drop only this entry, which errs towards refusing.
                    if let Ok(glob) = GlobBuilder::new(&text).literal_separator(true).build() {
                        globs.add(glob);
                        m.glob_entries.push((pattern, value));
                    }
                }
            }
        }
        m.globs = globs.build().unwrap_or_else(|_| GlobSet::empty());
        m
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.subdomains.is_empty() && self.glob_entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.exact.values().map(Vec::len).sum::<usize>()
            + self.subdomains.values().map(Vec::len).sum::<usize>()
            + self.glob_entries.len()
    }

    /// Finds the most specific entry for `host`: exact names first, then `*.suffix` entries from the
    /// longest suffix down, then label globs. `port_ok` says whether an entry accepts the port.
    pub fn lookup(&self, host: &Host, port_ok: impl Fn(&HostPattern) -> bool) -> Lookup<'_, T> {
        let mut mismatch: Option<(&HostPattern, &T)> = None;
        let scan = |entries: &[(HostPattern, T)]| entries.iter().position(|(p, _)| port_ok(p));
        // Exact.
        if let Some(entries) = self.exact.get(host.as_str()) {
            if let Some(i) = scan(entries) {
                return Lookup::Hit(&entries[i].0, &entries[i].1);
            }
            mismatch = mismatch.or(entries.first().map(|(p, t)| (p, t)));
        }
        // `*.suffix`: every proper suffix of the host, longest first.
        if !self.subdomains.is_empty() {
            for suffix in host.suffixes().skip(1) {
                if let Some(entries) = self.subdomains.get(suffix) {
                    if let Some(i) = scan(entries) {
                        return Lookup::Hit(&entries[i].0, &entries[i].1);
                    }
                    mismatch = mismatch.or(entries.first().map(|(p, t)| (p, t)));
                }
            }
        }
        if !self.glob_entries.is_empty() {
            let path = host.as_str().replace('.', "/");
            for i in self.globs.matches(&path) {
                let (p, t) = &self.glob_entries[i];
                if port_ok(p) {
                    return Lookup::Hit(p, t);
                }
                mismatch = mismatch.or(Some((p, t)));
            }
        }
        match mismatch {
            Some((p, t)) => Lookup::PortMismatch(p, t),
            None => Lookup::Miss,
        }
    }

    /// Calls `f` with every entry whose host pattern matches `host` (ports are the caller's to check):
    /// the same hashed lookups as [`Matcher::lookup`], so entries for other hosts are never visited.
    pub fn for_each_match(&self, host: &Host, mut f: impl FnMut(&HostPattern, &T)) {
        if let Some(entries) = self.exact.get(host.as_str()) {
            entries.iter().for_each(|(p, t)| f(p, t));
        }
        if !self.subdomains.is_empty() {
            for suffix in host.suffixes().skip(1) {
                if let Some(entries) = self.subdomains.get(suffix) {
                    entries.iter().for_each(|(p, t)| f(p, t));
                }
            }
        }
        if !self.glob_entries.is_empty() {
            let path = host.as_str().replace('.', "/");
            for i in self.globs.matches(&path) {
                let (p, t) = &self.glob_entries[i];
                f(p, t);
            }
        }
    }

    /// Every entry, in no particular order (for lints).
    pub fn entries(&self) -> impl Iterator<Item = &(HostPattern, T)> {
        self.exact.values().flatten().chain(self.subdomains.values().flatten()).chain(self.glob_entries.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher(patterns: &[&str]) -> Matcher<usize> {
        Matcher::new(patterns.iter().enumerate().map(|(i, p)| (HostPattern::parse(p).unwrap(), i)))
    }

    fn hit(m: &Matcher<usize>, host: &str, port: u16) -> Option<usize> {
        match m.lookup(&Host::parse(host).unwrap(), |p| p.port().is_none_or(|q| q == port)) {
            Lookup::Hit(_, i) => Some(*i),
            _ => None,
        }
    }

    #[test]
    fn most_specific_entry_wins() {
        let m = matcher(&["*.example.com", "a.example.com", "*.b.example.com", "api-*.example.com"]);
        assert_eq!(hit(&m, "a.example.com", 443), Some(1));
        assert_eq!(hit(&m, "x.b.example.com", 443), Some(2));
        assert_eq!(hit(&m, "z.example.com", 443), Some(0));
        assert_eq!(hit(&m, "example.com", 443), None);
        assert_eq!(hit(&m, "badexample.com", 443), None);
    }

    #[test]
    fn globs_stay_within_a_label() {
        let m = matcher(&["api-*.example.com"]);
        assert_eq!(hit(&m, "api-eu.example.com", 443), Some(0));
        assert_eq!(hit(&m, "api-eu.x.example.com", 443), None);
        assert_eq!(hit(&m, "x.api-eu.example.com", 443), None);
        let m = matcher(&["*.api-*.example.com"]);
        assert_eq!(hit(&m, "x.y.api-eu.example.com", 443), Some(0));
        assert_eq!(hit(&m, "api-eu.example.com", 443), None);
    }

    #[test]
    fn port_mismatch_is_reported() {
        let m = matcher(&["registry.example.com:8443"]);
        assert_eq!(hit(&m, "registry.example.com", 8443), Some(0));
        let host = Host::parse("registry.example.com").unwrap();
        assert!(matches!(m.lookup(&host, |p| p.port() == Some(443)), Lookup::PortMismatch(_, 0)));
    }

    /// The compiled matcher agrees with the reference `matches_host` on a grid of patterns and hosts.
    #[test]
    fn agrees_with_reference_semantics() {
        let patterns = [
            "gcr.io",
            "*.gcr.io",
            "api-*.example.com",
            "api-**.example.com",
            "*.api-*.example.com",
            "a.*.example.com",
            "*.b.example.com",
            "x.y.z.example.com",
        ];
        let hosts = [
            "gcr.io",
            "a.gcr.io",
            "a.b.gcr.io",
            "evilgcr.io",
            "gcr.io.evil.com",
            "api-1.example.com",
            "q.api-1.example.com",
            "a.b.example.com",
            "a.b.c.example.com",
            "c.b.example.com",
            "x.y.z.example.com",
            "y.z.example.com",
            "example.com",
        ];
        for p in patterns {
            let m = matcher(&[p]);
            let pattern = HostPattern::parse(p).unwrap();
            for h in hosts {
                let expected = pattern.matches_host(&Host::parse(h).unwrap());
                assert_eq!(hit(&m, h, 443).is_some(), expected, "{p} vs {h}");
            }
        }
    }
}
