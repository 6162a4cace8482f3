//! sluice: a forward egress proxy and network-policy engine for sandboxed coding sessions.
//!
//! Every destination a session asks for goes through one flow:
//!
//! ```text
//! Proxy-Authorization ─▶ credential::Keyring::verify_for ─▶ Session { id, policy }
//! CONNECT host:port / GET http://… ─▶ Authority ─▶ Policy::decide ─▶ Decision { verdict, reason, rule }
//!                                                        │ allow
//!                                                        ▼
//!   limit::Limiter ─▶ net::Resolver ─▶ Policy::check_address (every answer) ─▶ dial that address
//!                                                        │
//!                                                        ▼
//!                                     proxy::tunnel (CONNECT) or proxy::forward (plain HTTP)
//! ```
//!
//! Refusals at any step are values (`Decision`) or errors (`proxy::respond::ProxyError`) that
//! `proxy::respond::refusal` alone turns into HTTP answers.
//!
//! Modules:
//! - [`policy`]: levels, host patterns, the compiled matcher, policy files and `decide`.
//! - [`net`]: resolution with static overrides, the guard after DNS, dialling the checked address.
//! - [`credential`]: signed scoped tokens shared by both proxies; [`limit`]: per-session limits.
//! - [`proxy`]: the egress proxy; [`git`]: the git proxy (scoped credential → real token, one branch).
//! - [`admin`], [`metrics`], [`reload`]: operating it.
//! - [`config`], [`server`]: `sluice.toml` and `sluice serve`; [`command`]: the other subcommands.
//! - [`diagnostic`]: `file:line:col` errors and warnings for files people write.

pub mod admin;
pub mod audit;
pub mod command;
pub mod config;
pub mod credential;
pub mod diagnostic;
pub mod git;
pub mod limit;
pub mod metrics;
pub mod net;
pub mod policy;
pub mod proxy;
pub mod reload;
pub mod server;
