//! The default list: the Trusted level's host patterns in their published groups, compiled in and
//! replaceable by a policies directory's `defaults.toml`.

use std::sync::{Arc, OnceLock};

use serde::Deserialize;
use toml::Spanned;

use super::file::{check_version, finish, parse_pattern, rule_at};
use super::lint::lint_list;
use super::matcher::Matcher;
use super::pattern::HostPattern;
use super::{Rule, RuleList};
use crate::diagnostic::{Diagnostic, Diagnostics, Source, from_toml_error};

/// The default list as shipped in the repository; compiled in so `sluice serve` needs no files.
pub const BUILTIN_DEFAULTS: &str = include_str!("../../policies/defaults.toml");
/// The name rules from the built-in default list point at.
pub const BUILTIN_DEFAULTS_FILE: &str = "policies/defaults.toml";
/// The file in a policies directory that replaces the built-in default list.
pub const DEFAULTS_FILE_NAME: &str = "defaults.toml";

/// The Trusted level's list, grouped as published.
#[derive(Debug)]
pub struct DefaultList {
    pub(crate) matcher: Matcher<Arc<Rule>>,
    pub groups: Vec<(Arc<str>, Vec<HostPattern>)>,
    pub source: Arc<str>,
}

impl DefaultList {
    /// The compiled-in list. Its validity is pinned by tests, so a failure here is a build defect.
    pub fn builtin() -> Arc<DefaultList> {
        static BUILTIN: OnceLock<Arc<DefaultList>> = OnceLock::new();
        BUILTIN
            .get_or_init(|| {
                let (list, _) = DefaultList::parse(BUILTIN_DEFAULTS_FILE, BUILTIN_DEFAULTS)
                    .unwrap_or_else(|e| panic!("the built-in default list is invalid:\n{e}"));
                Arc::new(list)
            })
            .clone()
    }

    /// Parses a default-list file: `version = 1` and `[[group]]` tables of `name` and `hosts`.
    pub fn parse(file: &str, text: &str) -> Result<(DefaultList, Vec<Diagnostic>), Diagnostics> {
        let src = Source::new(file, text);
        let raw: RawDefaults = toml::from_str(text).map_err(|e| Diagnostics(vec![from_toml_error(&src, &e)]))?;
        let mut diags = Vec::new();
        check_version(&src, raw.version.as_ref(), &mut diags);
        let source: Arc<str> = file.into();
        let mut groups = Vec::new();
        let mut entries = Vec::new();
        for group in &raw.group {
            let name: Arc<str> = group.name.get_ref().as_str().into();
            let mut patterns = Vec::new();
            for written in &group.hosts {
                if let Some(p) = parse_pattern(&src, written, &mut diags) {
                    let rule = rule_at(&src, &source, &p, written.span(), RuleList::Defaults, Some(name.clone()));
                    entries.push((p.clone(), rule, written.span()));
                    patterns.push(p);
                }
            }
            groups.push((name, patterns));
        }
        // The published list names some hosts its own wildcards cover; that is not a mistake to warn of.
        lint_list(&src, "the default list", &entries, false, &mut diags);
        finish(diags).map(|warnings| {
            let matcher = Matcher::new(entries.into_iter().map(|(p, r, _)| (p, r)));
            (DefaultList { matcher, groups, source }, warnings)
        })
    }

    pub fn len(&self) -> usize {
        self.matcher.len()
    }

    pub fn is_empty(&self) -> bool {
        self.matcher.is_empty()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    version: Option<Spanned<i64>>,
    #[serde(default)]
    group: Vec<RawGroup>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGroup {
    name: Spanned<String>,
    #[serde(default)]
    hosts: Vec<Spanned<String>>,
}
