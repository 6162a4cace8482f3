//! Request rules (`[[requests]]`): which methods and paths a host's HTTP requests may use, and how
//! large their bodies may be. Compiled like host patterns: a request's host is looked up once in a
//! hashed matcher, and only the rules naming that host are tried, so rules for other hosts cost nothing.

use std::fmt;
use std::sync::Arc;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

use super::Rule;
use super::host::{Host, Target};
use super::matcher::Matcher;
use super::pattern::HostPattern;

/// What a matching rule does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One `[[requests]]` table, compiled.
#[derive(Debug)]
pub struct RequestRule {
    pub action: Action,
    pub hosts: Vec<HostPattern>,
    /// `None`: any method. Compared without ASCII case: RFC 9110 §9.1 makes methods case-sensitive,
    /// and yet servers that fold case would take `post` for `POST`, which a deny must not miss.
    pub methods: Option<Vec<Box<str>>>,
    /// `None`: any path. The globs as written, and compiled.
    pub paths: Option<(Vec<Box<str>>, GlobSet)>,
    /// A larger request body is refused with `413`.
    pub max_body: Option<u64>,
    /// Where it is written, with a one-line summary as its pattern.
    pub rule: Arc<Rule>,
}

impl RequestRule {
    /// Whether `method` and `path` (one of [`path_spellings`]) are what this rule is about.
    pub fn matches(&self, method: &str, path: &str) -> bool {
        self.methods.as_ref().is_none_or(|m| m.iter().any(|m| m.eq_ignore_ascii_case(method)))
            && self.paths.as_ref().is_none_or(|(_, set)| set.is_match(path))
    }

    /// `allow GET,HEAD api.example.com /v1/public/**`: what the rule says, on one line.
    pub fn summary(
        action: Action,
        hosts: &[HostPattern],
        methods: Option<&[Box<str>]>,
        paths: Option<&[Box<str>]>,
    ) -> String {
        let join = |items: &[Box<str>]| items.iter().map(|s| &**s).collect::<Vec<_>>().join(",");
        let hosts: Vec<String> = hosts.iter().map(ToString::to_string).collect();
        format!(
            "{action} {} {} {}",
            methods.map_or_else(|| "*".to_string(), join),
            hosts.join(","),
            paths.map_or_else(|| "/**".to_string(), join)
        )
    }
}

/// A path glob as an author writes it: `*` within one segment, `**` across segments.
pub fn compile_path_glob(written: &str) -> Result<globset::Glob, String> {
    if !written.starts_with('/') {
        return Err(format!("path glob {written:?} does not start with \"/\""));
    }
    if written.contains('?') || written.contains('#') {
        return Err(format!("path glob {written:?} has a query or fragment: rules match the path alone"));
    }
    if written.contains(['[', ']', '{', '}']) {
        return Err(format!("path glob {written:?} uses [ ] or {{ }}: only * and ** are wildcards here"));
    }
    if written.split('/').any(|seg| seg.contains("**") && seg != "**") {
        return Err(format!(
            "path glob {written:?} has ** inside a segment: ** must be a whole segment, e.g. \"/v1/**\""
        ));
    }
    GlobBuilder::new(written)
        .literal_separator(true)
        .backslash_escape(false)
        .build()
        .map_err(|e| format!("bad path glob {written:?}: {}", e.kind()))
}

pub fn compile_path_globs(written: &[Box<str>]) -> Result<GlobSet, String> {
    let mut set = GlobSetBuilder::new();
    for w in written {
        set.add(compile_path_glob(w)?);
    }
    set.build().map_err(|e| e.to_string())
}

/// What the rules say about one request.
#[derive(Debug, PartialEq, Eq)]
pub enum RequestOutcome<'a> {
    /// No rule names this host: the request passes on the host's decision alone.
    Unruled,
    Allowed(&'a RequestRule),
    Denied(&'a RequestRule),
    /// The host has allow rules and none matched.
    NoRule,
}

impl PartialEq for RequestRule {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.rule, &other.rule)
    }
}

impl Eq for RequestRule {}

/// Every `[[requests]]` table of a policy, indexed by host.
#[derive(Debug, Default)]
pub struct RequestRules {
    rules: Vec<RequestRule>,
    /// Each host pattern of each rule, carrying the rule's index (its order in the file).
    hosts: Matcher<usize>,
}

impl RequestRules {
    pub fn new(rules: Vec<RequestRule>) -> RequestRules {
        let hosts =
            Matcher::new(rules.iter().enumerate().flat_map(|(i, r)| r.hosts.iter().map(move |h| (h.clone(), i))));
        RequestRules { rules, hosts }
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    pub fn rules(&self) -> &[RequestRule] {
        &self.rules
    }

    /// The rules naming `host` on `port`, in file order.
    fn for_host(&self, host: &Host, port: u16) -> Vec<usize> {
        let mut found = Vec::new();
        self.hosts.for_each_match(host, |pattern, i| {
            if pattern.port().is_none_or(|p| p == port) {
                found.push(*i);
            }
        });
        found.sort_unstable();
        found.dedup();
        found
    }

    /// Whether any rule names this destination (what `inspect = "auto"` terminates).
    pub fn names(&self, target: &Target, port: u16) -> bool {
        match target {
            Target::Name(host) => !self.rules.is_empty() && !self.for_host(host, port).is_empty(),
            Target::Ip(_) => false,
        }
    }

    /// Deny wins; then the first allow rule that matches; a host with allow rules refuses the rest.
    /// `paths` are the request path's [`path_spellings`], the canonical one first: a deny applies when
    /// any spelling matches it; an allow only when the canonical spelling matches it and every other
    /// spelling matches some allow rule too (a path that servers could read two ways is allowed only
    /// if both readings are).
    pub fn decide(&self, target: &Target, port: u16, method: &str, paths: &[String]) -> RequestOutcome<'_> {
        let Target::Name(host) = target else { return RequestOutcome::Unruled };
        if self.rules.is_empty() {
            return RequestOutcome::Unruled;
        }
        let found = self.for_host(host, port);
        if found.is_empty() {
            return RequestOutcome::Unruled;
        }
        let rules = found.iter().map(|&i| &self.rules[i]);
        let deny = |path: &String| rules.clone().find(|r| r.action == Action::Deny && r.matches(method, path));
        if let Some(deny) = paths.iter().find_map(deny) {
            return RequestOutcome::Denied(deny);
        }
        let allowing = |path: &String| rules.clone().find(|r| r.action == Action::Allow && r.matches(method, path));
        if let Some((canonical, others)) = paths.split_first()
            && let Some(allow) = allowing(canonical)
            && others.iter().all(|p| allowing(p).is_some())
        {
            return RequestOutcome::Allowed(allow);
        }
        if rules.clone().any(|r| r.action == Action::Allow) { RequestOutcome::NoRule } else { RequestOutcome::Unruled }
    }
}

/// The readings of a request path that rules are matched against, the canonical one first (its
/// query dropped in each):
/// - canonical: `\` read as `/`; `%XX` of unreserved characters, `/`, `\` and `;` decoded; then
///   `;params` stripped from each segment and dot segments resolved — what servers that decode
///   first (or take `..;` for `..`, as Tomcat does) see;
/// - the same with `;params` stripped before `%2F` / `%5C` / `%3B` are decoded;
/// - [`normalize_path`]: only unreserved `%XX` decoded, `%2F` kept, `;` kept.
///
/// Duplicates are dropped: nearly every path has one spelling.
pub fn path_spellings(target: &str) -> Vec<String> {
    let path = target.split(['?', '#']).next().unwrap_or("");
    let canonical = resolve(&strip_params(&decode(&path.replace('\\', "/"), true)));
    let mut spellings = vec![canonical];
    for other in [resolve(&decode(&strip_params(&path.replace('\\', "/")), true)), normalize_path(path)] {
        if !spellings.contains(&other) {
            spellings.push(other);
        }
    }
    spellings
}

/// `%XX` of unreserved characters decoded (and, when `separators`, of `/`, `\` and `;`, with `\`
/// read as `/`); other escapes upper-cased; a `/` in front.
fn decode(path: &str, separators: bool) -> String {
    let bytes = path.as_bytes();
    let mut decoded = String::with_capacity(path.len() + 1);
    if !path.starts_with('/') {
        decoded.push('/');
    }
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' && i + 2 < bytes.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                let c = (h * 16 + l) as u8;
                if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                    decoded.push(c as char);
                } else if separators && matches!(c, b'/' | b'\\') {
                    decoded.push('/');
                } else if separators && c == b';' {
                    decoded.push(';');
                } else {
                    decoded.push('%');
                    decoded.push((bytes[i + 1] as char).to_ascii_uppercase());
                    decoded.push((bytes[i + 2] as char).to_ascii_uppercase());
                }
                i += 3;
                continue;
            }
        }
        // Non-ASCII bytes cannot appear in a parsed request target; keep whatever is there.
        decoded.push(b as char);
        i += 1;
    }
    decoded
}

/// Each segment's `;params` removed (`/a;x/b;y=1` is `/a/b`, `/..;/` is `/../`).
fn strip_params(path: &str) -> String {
    if !path.contains(';') {
        return path.to_string();
    }
    path.split('/').map(|seg| seg.split(';').next().unwrap_or("")).collect::<Vec<_>>().join("/")
}

/// Repeated slashes merged and `.` / `..` segments resolved (RFC 3986 §5.2.4) on a path that starts
/// with `/`.
fn resolve(decoded: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = decoded.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    let mut trailing = false;
    for (n, seg) in segments.iter().enumerate() {
        match *seg {
            "" if n != last => {}
            "" => trailing = true,
            "." => trailing = n == last,
            ".." => {
                out.pop();
                trailing = n == last;
            }
            s => {
                out.push(s);
                trailing = false;
            }
        }
    }
    let mut result = String::with_capacity(decoded.len());
    for seg in &out {
        result.push('/');
        result.push_str(seg);
    }
    if trailing || out.is_empty() {
        result.push('/');
    }
    result
}

/// The literal reading of a path (the last of [`path_spellings`]): the query dropped, `%XX` of
/// unreserved characters decoded (`%75pload` is `upload` to every server), other escapes upper-cased,
/// repeated slashes merged, and `.` / `..` segments resolved (RFC 3986 §5.2.4); `%2F` and `;params`
/// kept as they are. The request itself is forwarded as written.
pub fn normalize_path(target: &str) -> String {
    let path = target.split(['?', '#']).next().unwrap_or("");
    resolve(&decode(path, false))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::RuleList;

    fn rule(
        action: Action,
        hosts: &[&str],
        methods: Option<&[&str]>,
        paths: Option<&[&str]>,
        line: usize,
    ) -> RequestRule {
        let hosts: Vec<HostPattern> = hosts.iter().map(|h| HostPattern::parse(h).unwrap()).collect();
        let methods: Option<Vec<Box<str>>> = methods.map(|m| m.iter().map(|s| (*s).into()).collect());
        let paths: Option<Vec<Box<str>>> = paths.map(|p| p.iter().map(|s| (*s).into()).collect());
        let summary = RequestRule::summary(action, &hosts, methods.as_deref(), paths.as_deref());
        let paths = paths.map(|p| {
            let set = compile_path_globs(&p).unwrap();
            (p, set)
        });
        RequestRule {
            action,
            hosts,
            methods,
            paths,
            max_body: None,
            rule: Arc::new(Rule {
                pattern: summary.into(),
                list: RuleList::Requests,
                file: "p.toml".into(),
                line,
                group: None,
            }),
        }
    }

    fn outcome(rules: &RequestRules, host: &str, method: &str, path: &str) -> (&'static str, usize) {
        match rules.decide(&Target::parse(host).unwrap(), 443, method, &path_spellings(path)) {
            RequestOutcome::Unruled => ("unruled", 0),
            RequestOutcome::Allowed(r) => ("allow", r.rule.line),
            RequestOutcome::Denied(r) => ("deny", r.rule.line),
            RequestOutcome::NoRule => ("no_rule", 0),
        }
    }

    #[test]
    fn deny_wins_then_the_first_allow_then_no_rule() {
        let rules = RequestRules::new(vec![
            rule(Action::Allow, &["api.example.com"], Some(&["GET", "HEAD"]), Some(&["/v1/public/**"]), 1),
            rule(Action::Allow, &["api.example.com"], None, Some(&["/v1/*/status"]), 2),
            rule(Action::Deny, &["*.example.com"], Some(&["POST"]), None, 3),
            rule(Action::Deny, &["paste.test"], Some(&["PUT", "POST"]), Some(&["/upload/**"]), 4),
        ]);
        assert_eq!(outcome(&rules, "api.example.com", "GET", "/v1/public/a/b?q=1"), ("allow", 1));
        assert_eq!(outcome(&rules, "api.example.com", "GET", "/v1/x/status"), ("allow", 2));
        // `*` stays within one segment; `**` crosses them.
        assert_eq!(outcome(&rules, "api.example.com", "GET", "/v1/x/y/status"), ("no_rule", 0));
        assert_eq!(outcome(&rules, "api.example.com", "POST", "/v1/x/status"), ("deny", 3), "deny wins over allow");
        assert_eq!(outcome(&rules, "api.example.com", "DELETE", "/v1/public/a"), ("no_rule", 0));
        // A server that folds case takes `post` for `POST`: so do the rules.
        assert_eq!(outcome(&rules, "api.example.com", "get", "/v1/public/a"), ("allow", 1));
        assert_eq!(outcome(&rules, "api.example.com", "post", "/v1/x/status"), ("deny", 3));
        // Only deny rules name the host: what they do not refuse passes.
        assert_eq!(outcome(&rules, "paste.test", "POST", "/upload/x"), ("deny", 4));
        assert_eq!(outcome(&rules, "paste.test", "GET", "/upload/x"), ("unruled", 0));
        assert_eq!(outcome(&rules, "other.test", "POST", "/"), ("unruled", 0));
        assert_eq!(outcome(&rules, "192.0.2.1", "POST", "/"), ("unruled", 0));
        assert!(rules.names(&Target::parse("x.example.com").unwrap(), 443));
        assert!(!rules.names(&Target::parse("example.com").unwrap(), 443));
    }

    #[test]
    fn spellings_of_a_denied_path_are_the_denied_path() {
        let rules = RequestRules::new(vec![rule(Action::Deny, &["paste.test"], None, Some(&["/upload/**"]), 1)]);
        for path in [
            "/upload/a",
            "/%75pload/a",
            "/%75pl%6Fad/a",
            "//upload/a",
            "/x/../upload/a",
            "/./upload/a",
            "/%2e%2e/upload/a",
            "/upload/a?x=/no",
            // Encoded separators, backslashes and path parameters, as servers decode them.
            "/upload%2Fa",
            "/upload%2fa",
            "/upload%5Ca",
            "\\upload\\a",
            "/upload;x/a",
            "/upload;x=1;y/a",
            "/x/..;/upload/a",
            "/x%2F..%2Fupload/a",
            "/upload%3Bx/a",
            "/x/%2E%2E;/upload/a",
        ] {
            assert_eq!(outcome(&rules, "paste.test", "POST", path), ("deny", 1), "{path}");
        }
        assert_eq!(outcome(&rules, "paste.test", "POST", "/uploads/a"), ("unruled", 0));
    }

    /// An allow rule passes a path only when every reading of it is allowed: `..;` and encoded
    /// separators cannot climb out of the allowed tree.
    #[test]
    fn allows_hold_under_every_reading_of_the_path() {
        let rules = RequestRules::new(vec![
            rule(Action::Allow, &["github.test"], None, Some(&["/org/**"]), 1),
            rule(Action::Allow, &["files.test"], None, Some(&["/files/*"]), 2),
        ]);
        for (path, want) in [
            ("/org/repo", ("allow", 1)),
            ("/org/repo;jsessionid=1/info", ("allow", 1)),
            ("/org/..;/other/repo", ("no_rule", 0)),
            ("/org/%2E%2E;/other/repo", ("no_rule", 0)),
            ("/org/..%2Fother/repo", ("no_rule", 0)),
            ("/org%2F..%2Fother/repo", ("no_rule", 0)),
            ("/org\\..\\other/repo", ("no_rule", 0)),
            ("/org/x%5C..%5C..%5Cother", ("no_rule", 0)),
            ("/other/repo", ("no_rule", 0)),
        ] {
            assert_eq!(outcome(&rules, "github.test", "GET", path), want, "{path}");
        }
        // `/files/a%2Fb` is one segment to some servers and two to others: not allowed by `*`.
        assert_eq!(outcome(&rules, "files.test", "GET", "/files/a"), ("allow", 2));
        assert_eq!(outcome(&rules, "files.test", "GET", "/files/a%2Fb"), ("no_rule", 0));
        assert_eq!(outcome(&rules, "files.test", "GET", "/files/a;b"), ("allow", 2));
    }

    #[test]
    fn path_spellings_put_the_canonical_reading_first() {
        for (raw, want) in [
            ("/a/b", vec!["/a/b"]),
            ("/a%2Fb", vec!["/a/b", "/a%2Fb"]),
            ("/a;x/b", vec!["/a/b", "/a;x/b"]),
            ("/a;x%2Fy/b", vec!["/a/y/b", "/a/b", "/a;x%2Fy/b"]),
            ("/a\\b?q=\\", vec!["/a/b", "/a\\b"]),
            ("/o/..;/p", vec!["/p", "/o/..;/p"]),
        ] {
            assert_eq!(path_spellings(raw), want, "{raw:?}");
        }
    }

    #[test]
    fn paths_normalise() {
        for (raw, want) in [
            ("/", "/"),
            ("", "/"),
            ("/a/b/", "/a/b/"),
            ("/a//b", "/a/b"),
            ("/a/./b/../c", "/a/c"),
            ("/../../a", "/a"),
            ("/a/..", "/"),
            ("/a/b/..", "/a/"),
            ("/%7euser/%2f%41", "/~user/%2FA"),
            ("/a%", "/a%"),
            ("/a%4", "/a%4"),
            ("/a?b=c", "/a"),
        ] {
            assert_eq!(normalize_path(raw), want, "{raw:?}");
        }
    }

    #[test]
    fn path_globs_are_checked() {
        assert!(compile_path_glob("/v1/**").is_ok());
        assert_eq!(compile_path_glob("v1/**").unwrap_err(), "path glob \"v1/**\" does not start with \"/\"");
        assert!(compile_path_glob("/a?b").unwrap_err().contains("query"));
        assert!(compile_path_glob("/a/[ab]").unwrap_err().contains("only * and ** are wildcards"));
        assert!(compile_path_glob("/a/***").unwrap_err().contains("** must be a whole segment"));
        assert!(compile_path_glob("/a/x**").unwrap_err().contains("** must be a whole segment"));
    }
}
