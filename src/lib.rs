//! sluice: a forward egress proxy and network-policy engine for sandboxed coding sessions.
//!
//! Every request, on either listener, goes through one pipeline; each step returns a value, and the
//! first that cannot go on returns a [`refusal::Refusal`]:
//!
//! ```text
//! listen (cap, drain) ─▶ head guard (framing) ─▶ identify ─▶ decide ─▶ limit ─▶ reach ─▶ serve
//!                              │                   │            │          │        │
//!                        proxy::framing   credential::Basic  Policy   limit::    net: resolve →
//!                                         + Keyring::verify  ::decide SessionLim. classify every
//!                                                                               address → dial it
//!                                                   any step ─▶ Refusal ─▶ the front end's renderer
//! ```
//! Egress serves CONNECT tunnels ([`proxy::connect`]) and plain HTTP ([`proxy::forward`]); its
//! renderer is [`proxy::respond`] (text or JSON). The git proxy ([`git`]) swaps scoped credentials for
//! the real token and restricts pushes to one branch. Every request writes one decision record
//! ([`audit`]), and its closing line when a tunnel or response ends. A policy in report mode turns its
//! own deny into a would-deny at the decide step and the request goes on (never a guard refusal).
//!
//! Layers (a module uses only those below it):
//! - L0, pure: [`policy`], [`credential`], [`refusal`], [`diagnostic`], `git::{pktline, push, route}`.
//! - L1, I/O: [`listen`], [`net`], [`limit`], [`audit`], [`metrics`], [`reload`], [`inspect`] (the CA and
//!   its leaf certificates).
//! - L2, front ends: [`proxy`], [`git`], [`admin`] (proxy and git never use each other).
//! - L3, wiring: [`config`], [`server`], [`command`], the policy-authoring tools [`suggest`] and
//!   [`replay`] (they read decision logs back through `audit::reader`), and the binary.

#![deny(unsafe_code)]

pub mod admin;
pub mod audit;
pub mod command;
pub mod config;
pub mod credential;
pub mod diagnostic;
pub mod git;
pub mod inspect;
pub mod limit;
pub mod listen;
pub mod metrics;
pub mod net;
pub mod policy;
pub mod proxy;
pub mod refusal;
pub mod reload;
pub mod replay;
pub mod server;
pub mod suggest;
pub mod tls;
