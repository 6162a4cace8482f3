//! When a policy's tunnels are terminated so that sluice sees the HTTP requests inside them (SPEC §8):
//! the `inspect` key.

use std::fmt;

use toml::Spanned;

use crate::diagnostic::{Diagnostic, Source, closest};

/// A policy's `inspect`: which allowed HTTPS tunnels are terminated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum InspectMode {
    /// Only tunnels to hosts that have request rules.
    #[default]
    Auto,
    /// Every allowed HTTPS tunnel (except `tls_passthrough` hosts).
    All,
    /// None: every tunnel is relayed as bytes.
    Off,
}

impl InspectMode {
    pub const ALL: [InspectMode; 3] = [InspectMode::Auto, InspectMode::All, InspectMode::Off];

    pub fn as_str(self) -> &'static str {
        match self {
            InspectMode::Auto => "auto",
            InspectMode::All => "all",
            InspectMode::Off => "off",
        }
    }

    pub fn parse(s: &str) -> Option<InspectMode> {
        InspectMode::ALL.into_iter().find(|m| m.as_str() == s)
    }
}

impl fmt::Display for InspectMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A policy's inspection settings as compiled, with where `inspect` was written (line 0: not written).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Inspection {
    pub mode: InspectMode,
    pub line: usize,
}

pub(super) fn parse_inspection(
    src: &Source<'_>,
    written: Option<&Spanned<String>>,
    diags: &mut Vec<Diagnostic>,
) -> Inspection {
    let Some(written) = written else { return Inspection::default() };
    let (line, _) = src.location(written.span().start);
    match InspectMode::parse(written.get_ref()) {
        Some(mode) => Inspection { mode, line },
        None => {
            let names = "\"auto\" (hosts with request rules), \"all\" or \"off\"";
            let hint = match closest(written.get_ref(), InspectMode::ALL.iter().map(|m| m.as_str())) {
                Some(s) => format!("did you mean \"{s}\"? inspect is {names}"),
                None => format!("inspect is {names}"),
            };
            diags.push(src.error(written.span(), format!("unknown inspect mode {:?}", written.get_ref()), Some(hint)));
            Inspection { mode: InspectMode::Off, line }
        }
    }
}
