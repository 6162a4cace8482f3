//! Policy lints: the warnings `sluice validate` gives for entries that load but deserve a second look
//! (duplicates, entries another entry already covers, entries that can never match).

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use super::Rule;
use super::defaults::DefaultList;
use super::host::Host;
use super::matcher::{Lookup, Matcher};
use super::pattern::{HostPattern, PatternKind};
use crate::diagnostic::{Diagnostic, Source};

/// Warnings within one list: duplicates, `**` inside a label, and entries another entry of the list
/// already covers.
pub(super) fn lint_list(
    src: &Source<'_>,
    list: &str,
    entries: &[(HostPattern, Arc<Rule>, Range<usize>)],
    shadows: bool,
    diags: &mut Vec<Diagnostic>,
) {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut subdomains: HashMap<&str, Vec<(&HostPattern, usize)>> = HashMap::new();
    for (p, r, _) in entries {
        if let PatternKind::Subdomains(h) = p.kind() {
            subdomains.entry(h.as_str()).or_default().push((p, r.line));
        }
    }
    let globs: Vec<&(HostPattern, Arc<Rule>, Range<usize>)> =
        entries.iter().filter(|(p, _, _)| matches!(p.kind(), PatternKind::Glob { .. })).collect();
    for (p, r, span) in entries {
        let text = p.to_string();
        if let Some(first) = seen.get(&text) {
            diags.push(src.warning(
                span.clone(),
                format!("duplicate entry {text:?} in {list} (first on line {first})"),
                Some("remove one of them".into()),
            ));
            continue;
        }
        lint_star_star(src, list, &text, span, diags);
        seen.insert(text, r.line);
        if !shadows {
            continue;
        }
        let covers = |other: &HostPattern| other.port().is_none() || other.port() == p.port();
        let (host, skip) = match p.kind() {
            PatternKind::Exact(h) => (h, 1),
            // `*.a.b.com` is covered by `*.b.com`: look from the fixed part's parent up.
            PatternKind::Subdomains(h) => (h, 1),
            PatternKind::Glob { .. } => continue,
        };
        let shadow =
            host.suffixes().skip(skip).find_map(|s| subdomains.get(s).and_then(|v| v.iter().find(|(o, _)| covers(o))));
        let shadow = shadow.map(|(o, line)| (o.to_string(), *line)).or_else(|| {
            matches!(p.kind(), PatternKind::Exact(_))
                .then(|| {
                    globs
                        .iter()
                        .find(|(g, _, _)| covers(g) && g.matches_host(host))
                        .map(|(g, gr, _)| (g.to_string(), gr.line))
                })
                .flatten()
        });
        if let Some((by, line)) = shadow {
            diags.push(src.warning(
                span.clone(),
                format!("{:?} is already covered by {by:?} (line {line}) in {list}", p.to_string()),
                Some("remove the narrower entry, or keep it as documentation".into()),
            ));
        }
    }
}

/// A warning for `**` inside a label (`api-**.example.com`): it loads and matches exactly like `*`, one
/// label's characters, but an author who wrote it likely expected more. (A label that is only stars is
/// refused when the pattern is parsed.)
fn lint_star_star(src: &Source<'_>, list: &str, text: &str, span: &Range<usize>, diags: &mut Vec<Diagnostic>) {
    if !text.contains("**") {
        return;
    }
    let mut single = String::with_capacity(text.len());
    for c in text.chars() {
        if !(c == '*' && single.ends_with('*')) {
            single.push(c);
        }
    }
    diags.push(src.warning(
        span.clone(),
        format!("{text:?} in {list}: \"**\" inside a label matches exactly like \"*\", within that one label"),
        Some(format!("write {single:?}; sluice has no \"**\" (a leading \"*.\" matches one or more labels)")),
    ));
}

/// Warnings for allow entries that a deny entry cancels, or that the default list already allows.
pub(super) fn lint_allow_against(
    src: &Source<'_>,
    allow: &[(HostPattern, Arc<Rule>, Range<usize>)],
    deny: &Matcher<Arc<Rule>>,
    defaults: Option<&DefaultList>,
    diags: &mut Vec<Diagnostic>,
) {
    for (p, _, span) in allow {
        let host: Option<Host> = match p.kind() {
            PatternKind::Exact(h) => Some(h.clone()),
            // A representative subdomain: if `x.<fixed>` is denied on every port, so is the whole entry.
            PatternKind::Subdomains(h) => Host::parse(&format!("sluice-probe.{h}")).ok(),
            PatternKind::Glob { .. } => None,
        };
        let Some(host) = host else { continue };
        let denied = match p.kind() {
            PatternKind::Exact(_) => {
                matches!(deny.lookup(&host, |d| d.port().is_none() || d.port() == p.port()), Lookup::Hit(..))
            }
            _ => deny.entries().any(|(d, _)| {
                matches!(d.kind(), PatternKind::Subdomains(_))
                    && d.port().is_none()
                    && d.matches_host(&host)
                    && p.to_string().ends_with(&d.to_string()[1..])
            }),
        };
        if denied {
            if let Lookup::Hit(d, r) = deny.lookup(&host, |_| true) {
                diags.push(src.warning(
                    span.clone(),
                    format!(
                        "{:?} can never match: the deny entry {:?} (line {}) wins",
                        p.to_string(),
                        d.to_string(),
                        r.line
                    ),
                    Some("deny wins over every allow; remove one of the two".into()),
                ));
            }
            continue;
        }
        if let (Some(defaults), PatternKind::Exact(_), None) = (defaults, p.kind(), p.port())
            && let Lookup::Hit(d, r) = defaults.matcher.lookup(&host, |d| d.port().is_none())
        {
            let group = r.group.as_deref().unwrap_or("");
            diags.push(src.warning(
                span.clone(),
                format!(
                    "{:?} is already allowed by the default list ({:?}, group {group:?})",
                    p.to_string(),
                    d.to_string()
                ),
                Some("include_defaults = true already allows it; remove the entry".into()),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::policy::{DefaultList, parse_policy};

    /// The warnings of a custom policy whose only list is `allow`, as `validate` prints them.
    fn warnings(allow: &str) -> Vec<String> {
        let text = format!("version = 1\nname = \"p\"\nlevel = \"custom\"\nallow = [{allow}]\n");
        match parse_policy("p.toml", &text, &DefaultList::builtin()) {
            Ok((_, w)) => w.iter().map(ToString::to_string).collect(),
            Err(e) => vec![format!("refused: {e}")],
        }
    }

    #[test]
    fn a_star_star_inside_a_label_is_a_warning_with_the_single_star_form() {
        assert_eq!(
            warnings(r#""api-**.example.com", "*.s3-***-x**.example.com:8443""#),
            [
                r#"p.toml:4:10: warning: "api-**.example.com" in allow: "**" inside a label matches exactly like "*", within that one label
  |
4 | allow = ["api-**.example.com", "*.s3-***-x**.example.com:8443"]
  |          ^^^^^^^^^^^^^^^^^^^^
  = hint: write "api-*.example.com"; sluice has no "**" (a leading "*." matches one or more labels)"#,
                r#"p.toml:4:32: warning: "*.s3-***-x**.example.com:8443" in allow: "**" inside a label matches exactly like "*", within that one label
  |
4 | allow = ["api-**.example.com", "*.s3-***-x**.example.com:8443"]
  |                                ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
  = hint: write "*.s3-*-x*.example.com:8443"; sluice has no "**" (a leading "*." matches one or more labels)"#,
            ]
        );
        assert_eq!(warnings(r#""api-*.example.com", "*.example.org""#), Vec::<String>::new());
    }
}
