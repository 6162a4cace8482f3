//! The real upstream tokens: read once at start from files or environment variables named in `[git]`,
//! chosen per `OWNER/REPO`, then `OWNER`, then the default. Errors say where a token came from, never
//! what it is.

use std::collections::HashMap;
use std::path::Path;

use crate::config::{GitSettings, TokenSource};
use crate::credential::Secret;

/// The real upstream tokens: per `owner/repo`, per `owner`, and a default (keys lowercased).
#[derive(Debug, Default)]
pub struct TokenStore {
    default: Option<Secret<String>>,
    by_name: HashMap<String, Secret<String>>,
}

impl TokenStore {
    pub fn load(settings: &GitSettings) -> Result<TokenStore, String> {
        let default = match (&settings.token_file, &settings.token_env) {
            (Some(path), _) => Some(read_token_file(path, "git.token_file")?),
            (None, Some(var)) => read_token_env(var, "git.token_env")?,
            (None, None) => None,
        };
        let mut by_name = HashMap::new();
        for (name, source) in &settings.tokens {
            let key = format!("git.tokens.{name:?}");
            let parts: Vec<&str> = name.split('/').collect();
            if parts.is_empty() || parts.len() > 2 || parts.iter().any(|p| !route_name(p)) {
                return Err(format!("invalid {key}: expected \"OWNER\" or \"OWNER/REPO\""));
            }
            let token = match source {
                TokenSource::File(path) => read_token_file(path, &key)?,
                TokenSource::Env(var) => {
                    read_token_env(var, &key)?.ok_or_else(|| format!("{key}: environment variable {var} is not set"))?
                }
            };
            by_name.insert(name.to_ascii_lowercase(), token);
        }
        Ok(TokenStore { default, by_name })
    }

    /// The token for `OWNER/REPO`: the repository's, else the owner's, else the default.
    pub fn for_repo(&self, full_name: &str) -> Option<&Secret<String>> {
        let full = full_name.to_ascii_lowercase();
        let owner = full.split('/').next().unwrap_or_default();
        self.by_name.get(&full).or_else(|| self.by_name.get(owner)).or(self.default.as_ref())
    }
}

fn route_name(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn check_token(value: &str, origin: &str) -> Result<Secret<String>, String> {
    let value = value.trim();
    if value.is_empty() {
        return Err(format!("{origin}: the token is empty"));
    }
    // Never quote the value: say only what is wrong with it.
    if !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!("{origin}: the token contains spaces, control or non-ASCII characters"));
    }
    Ok(Secret::new(value.to_owned()))
}

fn read_token_file(path: &Path, key: &str) -> Result<Secret<String>, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("{key}: cannot read token file {}: {e}", path.display()))?;
    check_token(&text, &format!("{key}: token file {}", path.display()))
}

fn read_token_env(var: &str, key: &str) -> Result<Option<Secret<String>>, String> {
    match std::env::var(var) {
        Ok(v) => check_token(&v, &format!("{key}: environment variable {var}")).map(Some),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(format!("{key}: environment variable {var} is not UTF-8")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_resolve_repo_then_owner_then_default() {
        let store = TokenStore {
            default: Some(Secret::new("d".into())),
            by_name: HashMap::from([
                ("acme".to_owned(), Secret::new("o".into())),
                ("acme/widgets".to_owned(), Secret::new("r".into())),
            ]),
        };
        assert_eq!(store.for_repo("ACME/Widgets").map(|s| s.expose().as_str()), Some("r"));
        assert_eq!(store.for_repo("acme/gears").map(|s| s.expose().as_str()), Some("o"));
        assert_eq!(store.for_repo("other/x").map(|s| s.expose().as_str()), Some("d"));
        assert_eq!(TokenStore::default().for_repo("a/b"), None);
    }

    #[test]
    fn token_errors_never_quote_the_token() {
        assert_eq!(check_token(" ", "x").unwrap_err(), "x: the token is empty");
        assert_eq!(
            check_token("ab cd", "x").unwrap_err(),
            "x: the token contains spaces, control or non-ASCII characters"
        );
        assert_eq!(check_token(" abc\n", "x").unwrap().expose(), "abc");
    }
}
