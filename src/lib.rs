//! sluice: a forward egress proxy and network-policy engine for sandboxed coding sessions.
//!
//! Every destination a session asks for goes through one flow:
//!
//! ```text
//! authority ─▶ Target (name | address) ─▶ Policy::decide ─▶ Decision { verdict, reason, rule }
//!                                              │ allow
//!                                              ▼
//!                        resolve ─▶ Policy::check_address (every answer) ─▶ dial that address
//! ```
//!
//! Modules:
//! - [`policy`]: levels, host patterns, the compiled matcher, policy files and `decide`.
//! - [`diagnostic`]: `file:line:col` errors and warnings for files people write.
//! - [`command`]: the `check` and `validate` subcommands, as library functions the binary calls.

pub mod command;
pub mod credential;
pub mod diagnostic;
pub mod git;
pub mod policy;
