//! The policy set: every policy a server knows by name, loaded from a policies directory over the
//! built-in levels, with every file's errors and warnings collected.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::defaults::{DEFAULTS_FILE_NAME, DefaultList};
use super::file::parse_policy;
use super::{Policy, builtin_policies};
use crate::diagnostic::{Diagnostic, Diagnostics, Source};

/// Every policy a server knows by name: the built-in `none`, `trusted` and `full`, then those of a
/// policies directory (which may replace the built-ins and the default list).
#[derive(Debug)]
pub struct PolicySet {
    policies: BTreeMap<Arc<str>, Arc<Policy>>,
    defaults: Arc<DefaultList>,
    /// Warnings found while loading (the set is usable).
    pub warnings: Vec<Diagnostic>,
}

impl PolicySet {
    pub fn builtin() -> PolicySet {
        let defaults = DefaultList::builtin();
        PolicySet { policies: builtin_policies(&defaults), defaults, warnings: Vec::new() }
    }

    /// Loads `dir/defaults.toml` (if present) and every other `*.toml` in `dir`. All files are checked
    /// and every error is returned, not just the first.
    pub fn load_dir(dir: &Path) -> Result<PolicySet, Diagnostics> {
        let (set, diags) = PolicySet::check_dir(dir);
        match set {
            Some(mut set) => {
                set.warnings = diags;
                Ok(set)
            }
            None => Err(Diagnostics(diags)),
        }
    }

    /// Checks every file of a policy directory; the set is `None` when any file has an error. The
    /// diagnostics are all of them, errors and warnings, file by file.
    pub fn check_dir(dir: &Path) -> (Option<PolicySet>, Vec<Diagnostic>) {
        let files = match toml_files(dir) {
            Ok(f) => f,
            Err(e) => return (None, vec![Diagnostic::file_error(&dir.display().to_string(), e)]),
        };
        let mut diags = Vec::new();
        let defaults_path = dir.join(DEFAULTS_FILE_NAME);
        let defaults = if files.contains(&defaults_path) {
            let parsed = read(&defaults_path)
                .and_then(|text| DefaultList::parse(&defaults_path.display().to_string(), &text).map_err(|d| d.0));
            match parsed {
                Ok((list, w)) => {
                    diags.extend(w);
                    Arc::new(list)
                }
                Err(d) => {
                    diags.extend(d);
                    DefaultList::builtin()
                }
            }
        } else {
            DefaultList::builtin()
        };
        let mut policies = builtin_policies(&defaults);
        let mut defined_at: HashMap<Arc<str>, String> = HashMap::new();
        for path in files.iter().filter(|p| **p != defaults_path) {
            let display = path.display().to_string();
            let text = match read(path) {
                Ok(t) => t,
                Err(d) => {
                    diags.extend(d);
                    continue;
                }
            };
            match parse_policy(&display, &text, &defaults) {
                Ok((policy, w)) => {
                    diags.extend(w);
                    if let Some(first) = defined_at.get(&policy.name) {
                        let src = Source::new(&display, &text);
                        diags.push(src.error(
                            0..0,
                            format!("policy {:?} is already defined in {first}", &*policy.name),
                            Some("policy names must be unique across the directory".into()),
                        ));
                        continue;
                    }
                    defined_at.insert(policy.name.clone(), display.clone());
                    policies.insert(policy.name.clone(), Arc::new(policy));
                }
                Err(d) => diags.extend(d.0),
            }
        }
        let set =
            (!diags.iter().any(Diagnostic::is_error)).then(|| PolicySet { policies, defaults, warnings: Vec::new() });
        (set, diags)
    }

    /// Like [`PolicySet::load_dir`], but a directory that does not exist means the built-ins alone.
    pub fn load_dir_or_builtin(dir: &Path) -> Result<PolicySet, Diagnostics> {
        if dir.is_dir() { PolicySet::load_dir(dir) } else { Ok(PolicySet::builtin()) }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Policy>> {
        self.policies.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.policies.keys().map(|k| &**k)
    }

    pub fn defaults(&self) -> &Arc<DefaultList> {
        &self.defaults
    }

    /// Adds (or replaces) one policy, e.g. one loaded from a file named on the command line.
    pub fn insert(&mut self, policy: Policy) {
        self.policies.insert(policy.name.clone(), Arc::new(policy));
    }
}

fn read(path: &Path) -> Result<String, Vec<Diagnostic>> {
    std::fs::read_to_string(path)
        .map_err(|e| vec![Diagnostic::file_error(&path.display().to_string(), format!("cannot read file: {e}"))])
}

/// The `*.toml` files directly in `dir`, sorted so that loading (and its messages) are deterministic.
pub fn toml_files(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("cannot read policy directory: {e}"))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
        .collect();
    files.sort();
    Ok(files)
}
