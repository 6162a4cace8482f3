//! Errors and warnings about a file a person wrote, pointing at `file:line:col` with a snippet and a hint.

use std::fmt;
use std::ops::Range;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

/// One finding in one file. `Display` renders it the way compilers do:
///
/// ```text
/// policies/acme.toml:4:10: error: pattern is too broad: its fixed part "com" is a public suffix
///   |
/// 4 | allow = ["*.com"]
///   |          ^^^^^^^
///   = hint: name the domains you need (e.g. "*.example.com"), or use level = "full" …
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub severity: Severity,
    pub file: String,
    pub line: usize,
    pub col: usize,
    pub message: String,
    pub snippet: Option<Snippet>,
    pub hint: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snippet {
    pub text: String,
    /// Character column (0-based) and width of the caret run.
    pub start: usize,
    pub width: usize,
}

/// A file's name and text, to turn byte spans into locations.
pub struct Source<'a> {
    pub name: &'a str,
    pub text: &'a str,
}

impl<'a> Source<'a> {
    pub fn new(name: &'a str, text: &'a str) -> Self {
        Source { name, text }
    }

    /// 1-based line and character column of a byte offset.
    pub fn location(&self, offset: usize) -> (usize, usize) {
        let offset = floor_char_boundary(self.text, offset.min(self.text.len()));
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let col = self.text[line_start..offset].chars().count() + 1;
        (line, col)
    }

    pub fn diagnostic(
        &self,
        severity: Severity,
        span: Range<usize>,
        message: impl Into<String>,
        hint: Option<String>,
    ) -> Diagnostic {
        let start = floor_char_boundary(self.text, span.start.min(self.text.len()));
        let (line, col) = self.location(start);
        let line_start = self.text[..start].rfind('\n').map_or(0, |i| i + 1);
        let line_end = self.text[line_start..].find('\n').map_or(self.text.len(), |i| line_start + i);
        let line_text = self.text[line_start..line_end].trim_end_matches('\r');
        let end = floor_char_boundary(self.text, span.end.clamp(start, line_end));
        let width = self.text[start..end].chars().count().max(1);
        let snippet = (!self.text.is_empty()).then(|| Snippet { text: line_text.to_string(), start: col - 1, width });
        Diagnostic { severity, file: self.name.to_string(), line, col, message: message.into(), snippet, hint }
    }

    pub fn error(&self, span: Range<usize>, message: impl Into<String>, hint: Option<String>) -> Diagnostic {
        self.diagnostic(Severity::Error, span, message, hint)
    }

    pub fn warning(&self, span: Range<usize>, message: impl Into<String>, hint: Option<String>) -> Diagnostic {
        self.diagnostic(Severity::Warning, span, message, hint)
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

impl Diagnostic {
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }

    /// A diagnostic about a whole file (it could not be read, say).
    pub fn file_error(file: &str, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            severity: Severity::Error,
            file: file.to_string(),
            line: 1,
            col: 1,
            message: message.into(),
            snippet: None,
            hint: None,
        }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{}:{}:{}: {sev}: {}", self.file, self.line, self.col, self.message)?;
        if let Some(s) = &self.snippet {
            let gutter = " ".repeat(self.line.to_string().len());
            write!(
                f,
                "\n{gutter} |\n{} | {}\n{gutter} | {}{}",
                self.line,
                s.text,
                " ".repeat(s.start),
                "^".repeat(s.width)
            )?;
        }
        if let Some(h) = &self.hint {
            let gutter = " ".repeat(self.line.to_string().len());
            write!(f, "\n{gutter} = hint: {h}")?;
        }
        Ok(())
    }
}

/// Several diagnostics, for an `Err` that carries every problem found rather than the first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}

/// Turns a TOML or serde error into a diagnostic at the place it names.
pub fn from_toml_error(source: &Source<'_>, err: &toml::de::Error) -> Diagnostic {
    let span = err.span().unwrap_or(0..0);
    let message = err.message().trim_end_matches('\n').replace('\n', "; ");
    let hint = unknown_field_hint(&message);
    source.error(span, message, hint)
}

/// For serde's "unknown field `alow`, expected one of `version`, `allow`, …": the nearest key.
fn unknown_field_hint(message: &str) -> Option<String> {
    let (field, rest) = message.strip_prefix("unknown field `")?.split_once('`')?;
    // The expected keys are every other backtick-delimited piece of the rest.
    let expected = rest.split('`').skip(1).step_by(2);
    Some(match closest(field, expected) {
        Some(key) => format!("did you mean `{key}`?"),
        None => "check the spelling against the keys the message lists".to_string(),
    })
}

/// The candidate within edit distance 2 of `word`, for "did you mean" hints.
pub(crate) fn closest<'a>(word: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    candidates.map(|c| (edit_distance(word, c), c)).filter(|(d, _)| *d <= 2).min_by_key(|(d, _)| *d).map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur.push((prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_location_snippet_and_hint() {
        let text = "version = 1\nallow = [\"*.com\"]\n";
        let src = Source::new("p.toml", text);
        let start = text.find("\"*.com\"").unwrap();
        let d = src.error(start..start + 7, "too broad", Some("name the domains".into()));
        assert_eq!(
            d.to_string(),
            "p.toml:2:10: error: too broad\n  |\n2 | allow = [\"*.com\"]\n  |          ^^^^^^^\n  = hint: name the domains"
        );
    }

    #[test]
    fn unknown_keys_get_the_nearest_known_one() {
        let hint = |m: &str| unknown_field_hint(m);
        assert_eq!(
            hint("unknown field `alow`, expected one of `version`, `allow`, `allow_ips`").as_deref(),
            Some("did you mean `allow`?")
        );
        assert_eq!(
            hint("unknown field `colour`, expected one of `version`, `allow`").as_deref(),
            Some("check the spelling against the keys the message lists")
        );
        assert_eq!(hint("invalid type: string \"x\", expected i64"), None);
    }

    #[test]
    fn columns_count_characters_not_bytes() {
        let text = "allow = [\"bücher\", \"x\"]";
        let src = Source::new("p.toml", text);
        assert_eq!(src.location(text.find("\"x\"").unwrap()), (1, 20));
    }
}
