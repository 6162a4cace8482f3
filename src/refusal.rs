//! The one value a refused or failed request becomes, whatever the listener: each protocol renders it.
//!
//! Every step of admission (identify, decide, limit, reach) and every guard (head framing, body caps)
//! returns a [`Refusal`] when it cannot go on. The value says what happened in protocol-neutral terms
//! — status, a stable code, who is at fault, whether the connection ends, the sentence and the hint —
//! and each front end has one renderer that turns it into bytes (egress text or JSON, git text or
//! pkt-line, GitHub JSON). Messages carry no `sluice: ` prefix: the renderer adds it.

use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;

use crate::credential::{AuthError, CredentialError};
use crate::policy::quota::{ByteQuota, ByteSize};
use crate::policy::{Authority, Decision, Reason};

/// Who is at fault: picks the log level (clients err all the time; sluice and upstreams should not).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The client sent something wrong or asked for too much.
    Client,
    /// The policy refused what the client asked for.
    Policy,
    /// An upstream (DNS, a server) failed.
    Upstream,
    /// sluice itself could not serve the request.
    Internal,
}

impl Fault {
    pub fn as_str(self) -> &'static str {
        match self {
            Fault::Client => "client",
            Fault::Policy => "policy",
            Fault::Upstream => "upstream",
            Fault::Internal => "internal",
        }
    }
}

/// Which authentication challenge goes with a refusal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Challenge {
    /// `Proxy-Authenticate: Basic realm="sluice"` (the egress proxy's `407`).
    Proxy,
    /// `WWW-Authenticate: Basic realm="sluice-git"` (the git proxy's `401`).
    Origin,
}

/// The session a refusal names, once identity is known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyContext {
    pub name: Arc<str>,
    pub level: &'static str,
}

/// A policy refusal's particulars: the decision and the destination it was about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denied {
    pub decision: Decision,
    pub authority: Authority,
}

/// Why a request was not served as asked. Built by the constructors below; front ends may set
/// `close` and the policy context, and only renderers turn it into bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Refusal {
    pub status: StatusCode,
    /// Stable short code for logs, metrics and `X-Sluice-Decision`.
    pub code: &'static str,
    pub fault: Fault,
    /// Whether the connection ends with this answer.
    pub close: bool,
    /// The sentence that says what happened (no `sluice: ` prefix).
    pub message: String,
    /// What the reader can do about it.
    pub hint: Option<String>,
    /// Seconds a client should wait before asking again (`Retry-After`).
    pub retry_after: Option<u32>,
    pub challenge: Option<Challenge>,
    /// The session's policy and level, when identity is known.
    pub policy: Option<PolicyContext>,
    /// Present on policy refusals.
    pub denied: Option<Box<Denied>>,
}

impl Refusal {
    /// The general constructor; the named ones below fix status, code and fault together.
    pub fn new(status: StatusCode, code: &'static str, fault: Fault, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            code,
            fault,
            close: false,
            message: message.into(),
            hint: None,
            retry_after: None,
            challenge: None,
            policy: None,
            denied: None,
        }
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Refusal {
        self.hint = Some(hint.into());
        self
    }

    /// Ends the connection with this answer when `close` (a refusal that closes keeps closing).
    pub fn closing(mut self, close: bool) -> Refusal {
        self.close |= close;
        self
    }

    /// Names the session's policy and level (a policy refusal names its decision's instead).
    pub fn in_policy(mut self, name: &Arc<str>, level: &'static str) -> Refusal {
        if self.policy.is_none() {
            self.policy = Some(PolicyContext { name: name.clone(), level });
        }
        self
    }

    /// Malformed or unsupported request: `400`; the connection's state can no longer be trusted.
    pub fn bad_request(message: impl Into<String>) -> Refusal {
        Refusal::new(StatusCode::BAD_REQUEST, "bad_request", Fault::Client, message).closing(true)
    }

    /// The request head is over the configured maximum: `431`.
    pub fn head_too_large(message: impl Into<String>) -> Refusal {
        Refusal::new(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "head_too_large", Fault::Client, message)
            .closing(true)
    }

    /// The request head did not arrive in time: `408`.
    pub fn head_timeout(message: impl Into<String>) -> Refusal {
        Refusal::new(StatusCode::REQUEST_TIMEOUT, "head_timeout", Fault::Client, message).closing(true)
    }

    /// Identity missing or unverifiable at the egress proxy: `407` with a Basic challenge.
    pub fn proxy_auth(why: &AuthError) -> Refusal {
        let code = match why {
            AuthError::Missing => "auth_missing",
            AuthError::Credential(e) => credential_code(e),
            _ => "auth_invalid",
        };
        let hint = match why {
            AuthError::Credential(CredentialError::Expired { .. }) => {
                "ask the orchestrator for a fresh session credential"
            }
            _ => {
                "set HTTPS_PROXY=http://SESSION:TOKEN@HOST:PORT with a credential from `sluice token mint --kind egress`"
            }
        };
        let mut r = Refusal::new(
            StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            code,
            Fault::Client,
            format!("proxy authentication failed: {why}"),
        )
        .with_hint(hint);
        r.challenge = Some(Challenge::Proxy);
        r
    }

    /// The policy refused the destination: `403`, naming the decision.
    pub fn denied(decision: Decision, authority: Authority) -> Refusal {
        let message = format!("{authority} is not allowed: {}", decision.reason);
        let mut r = Refusal::new(StatusCode::FORBIDDEN, decision.reason.code(), Fault::Policy, message);
        r.hint = decision.hint(&authority.target, authority.port);
        r.policy = Some(PolicyContext { name: decision.policy.clone(), level: decision.level.as_str() });
        r.denied = Some(Box::new(Denied { decision, authority }));
        r
    }

    /// A request rule refused the request: `403`, or `413` when its body is over the rule's `max_body`
    /// (known from `Content-Length`, or counted while it streamed). Named like a policy refusal, with
    /// the request rule as its rule.
    pub fn request_refused(decision: Decision, authority: Authority) -> Refusal {
        let too_large = matches!(decision.reason, Reason::BodyTooLarge { .. });
        let mut r = Refusal::denied(decision, authority);
        if let Some(d) = &r.denied {
            r.message = format!("request to {} refused: {}", d.authority, d.decision.reason);
        }
        if too_large {
            r.status = StatusCode::PAYLOAD_TOO_LARGE;
            // The rest of the body is never read: the connection cannot carry another request.
            r.close = true;
        }
        r
    }

    /// A tunnel this policy terminates, on a server without a CA (a policy reloaded to inspect):
    /// `403`, before any tunnel opens, so no request the policy's rules would refuse passes uninspected.
    pub fn inspection_unavailable(authority: &Authority) -> Refusal {
        Refusal::new(
            StatusCode::FORBIDDEN,
            "inspection_unavailable",
            Fault::Policy,
            format!("{authority} is inspected by this policy (inspect or [[requests]]), and this sluice has no CA to terminate TLS with"),
        )
        .with_hint("configure [inspect] ca_cert and ca_key, list the host in tls_passthrough, or set inspect = \"off\"")
    }

    /// The upstream of a terminated tunnel presented a certificate that does not verify (unknown
    /// issuer, expired, another name): `502`, before the tunnel opens. Never relayed unverified.
    pub fn upstream_cert_invalid(authority: &Authority, why: impl Into<String>) -> Refusal {
        Refusal::new(
            StatusCode::BAD_GATEWAY,
            "upstream_cert_invalid",
            Fault::Upstream,
            format!("the certificate {authority} presented does not verify: {}", why.into()),
        )
        .with_hint(
            "if the upstream uses a private CA, an operator adds its certificate to [inspect] extra_roots; \
             otherwise the upstream's certificate is wrong",
        )
    }

    /// The first bytes inside a tunnel this policy terminates are not a TLS handshake: `400`, and the
    /// tunnel ends.
    pub fn not_tls(authority: &Authority) -> Refusal {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            "not_tls",
            Fault::Client,
            format!("the tunnel to {authority} is inspected, and what the client sent in it is not TLS"),
        )
        .with_hint("speak TLS inside the tunnel (https://), or list the host in tls_passthrough")
        .closing(true)
    }

    /// `CONNECT` (or `PRI`) inside a tunnel sluice terminates: `405`. A tunnel in a tunnel would carry
    /// its bytes past the request rules; a client opens each tunnel with the proxy itself.
    pub fn method_not_allowed(authority: &Authority, method: &str) -> Refusal {
        Refusal::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            Fault::Client,
            format!("{method} is not forwarded inside the inspected tunnel to {authority}"),
        )
        .with_hint("send CONNECT to the proxy itself, on a connection of its own")
        .closing(true)
    }

    /// Inside a terminated tunnel, an upgrade to anything but WebSocket (`h2c` would carry later
    /// requests past the fronting guard and the rules), or a WebSocket upgrade without its handshake
    /// headers: `403`, and nothing goes upstream.
    pub fn upgrade_refused(authority: &Authority, why: impl Into<String>) -> Refusal {
        Refusal::new(
            StatusCode::FORBIDDEN,
            "upgrade_refused",
            Fault::Policy,
            format!("the upgrade inside the inspected tunnel to {authority} is refused: {}", why.into()),
        )
        .with_hint("only WebSocket upgrades pass an inspected tunnel; HTTP/2 is negotiated with ALPN instead of h2c")
    }

    /// Inside a terminated tunnel, a request (its `Host` / `:authority`) or the ClientHello's SNI names
    /// another host than the CONNECT did: `421`, so the client can open a tunnel to the host it means.
    pub fn host_mismatch(authority: &Authority, named: &str, what: &str) -> Refusal {
        Refusal::new(
            StatusCode::MISDIRECTED_REQUEST,
            "host_mismatch",
            Fault::Policy,
            format!("the {what} names {named:?}, and this tunnel was opened to {authority}: they must agree"),
        )
        .with_hint("open a tunnel (CONNECT) to each host the client talks to")
        .closing(true)
    }

    /// The credential names a policy this server does not have: `403`.
    pub fn unknown_policy(name: &str) -> Refusal {
        Refusal::new(
            StatusCode::FORBIDDEN,
            "unknown_policy",
            Fault::Policy,
            format!("the session's credential names policy {name:?}, which this proxy does not have"),
        )
        .with_hint("add the policy to the proxy's policies directory, or mint the credential for an existing policy")
    }

    /// Over the per-session request rate: `429` with `Retry-After`.
    pub fn rate_limited(retry_after: Duration, limit: &str) -> Refusal {
        let secs = u32::try_from(retry_secs(retry_after)).unwrap_or(u32::MAX);
        let mut r = Refusal::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            Fault::Client,
            format!("session over its rate limit ({limit}); retry in {secs}s"),
        )
        .with_hint("a policy author raises it with requests_per_second and burst in the policy's [limits]");
        r.retry_after = Some(secs);
        r
    }

    /// Over the per-session cap on open tunnels: `429`.
    pub fn too_many_tunnels(max: u32) -> Refusal {
        let mut r = Refusal::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_tunnels",
            Fault::Client,
            format!("session already has {max} open {}, the most it may have at once", plural(max, "tunnel")),
        )
        .with_hint("close idle connections, or raise max_tunnels in the policy's [limits]");
        r.retry_after = Some(1);
        r
    }

    /// The shared store that keeps the session's limits cannot be asked, and the server is configured to
    /// refuse rather than count locally meanwhile (`[limits.store] on_error = "refuse"`): `503`.
    pub fn limit_store_unavailable() -> Refusal {
        let mut r = Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "limit_store_unavailable",
            Fault::Internal,
            "the store that keeps this session's limits is unreachable, so the request cannot be counted",
        )
        .with_hint("retry shortly; an operator sees the store's state on /healthz and sluice_limit_store_up");
        r.retry_after = Some(1);
        r
    }

    /// A byte quota of the session is spent for its window: `429` with `Retry-After` = the window's end
    /// (`now` is Unix seconds). The body names the quota, what was used and when it resets.
    pub fn quota_exceeded(direction: &'static str, quota: ByteQuota, used: u64, resets_at: u64, now: u64) -> Refusal {
        let secs = resets_at.saturating_sub(now).max(1);
        let resets = httpdate::fmt_http_date(std::time::UNIX_EPOCH + Duration::from_secs(resets_at));
        let mut r = Refusal::new(
            StatusCode::TOO_MANY_REQUESTS,
            "quota_exceeded",
            Fault::Client,
            format!(
                "session's {direction} quota of {quota} is spent: {} used in this window; it resets at {resets} \
                 (in {secs}s)",
                ByteSize::bytes(used),
            ),
        )
        .with_hint(format!("wait for the window to end, or raise {direction}_quota in the policy's [limits]"));
        r.retry_after = Some(u32::try_from(secs).unwrap_or(u32::MAX));
        r
    }

    /// DNS or the upstream failed: `504` for a timeout, else `502`.
    pub fn unreachable(code: &'static str, timeout: bool, message: impl Into<String>) -> Refusal {
        let status = if timeout { StatusCode::GATEWAY_TIMEOUT } else { StatusCode::BAD_GATEWAY };
        Refusal::new(status, code, Fault::Upstream, message)
    }

    /// The upstream answered with something that is not HTTP: `502`.
    pub fn bad_upstream(message: impl Into<String>) -> Refusal {
        Refusal::new(StatusCode::BAD_GATEWAY, "bad_upstream", Fault::Upstream, message)
    }

    /// A listener at its connection cap: `503`, before any HTTP is read.
    pub fn overloaded(listener: &str, max: usize) -> Refusal {
        let mut r = Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            Fault::Internal,
            format!(
                "the {listener} is at its connection limit ({max} {}); retry shortly",
                plural(max as u64, "connection")
            ),
        )
        .closing(true);
        r.retry_after = Some(1);
        r
    }

    /// The git listener has no route for the request: `404`.
    pub fn no_route(message: impl Into<String>) -> Refusal {
        Refusal::new(StatusCode::NOT_FOUND, "no_route", Fault::Client, message)
    }

    /// Credentials missing or unreadable at the git listener: `401` with the `sluice-git` challenge, so
    /// git asks its credential helper.
    pub fn git_auth(code: &'static str, message: impl Into<String>) -> Refusal {
        let mut r = Refusal::new(StatusCode::UNAUTHORIZED, code, Fault::Client, message);
        r.challenge = Some(Challenge::Origin);
        r
    }

    /// A git credential that does not verify, or is for another repository or no branch: `403`.
    pub fn git_credential(code: &'static str, message: impl Into<String>) -> Refusal {
        Refusal::new(StatusCode::FORBIDDEN, code, Fault::Client, message)
    }

    /// Over the per-session cap on git-listener connections: `429`.
    pub fn too_many_connections(max: u32) -> Refusal {
        let mut r = Refusal::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_connections",
            Fault::Client,
            format!(
                "session already has {max} open git-proxy {}, the most it may have at once",
                plural(max, "connection")
            ),
        )
        .with_hint("close idle connections, or the operator raises [git.limits] max_connections");
        r.retry_after = Some(1);
        r
    }

    /// The upstream failed or refused: `status` as the client should see it.
    pub fn upstream(status: StatusCode, code: &'static str, message: impl Into<String>) -> Refusal {
        Refusal::new(status, code, Fault::Upstream, message)
    }

    /// The rule behind a policy refusal, as `PATTERN (FILE:LINE)` for log lines.
    pub fn rule_summary(&self) -> Option<String> {
        self.denied.as_ref().and_then(|d| d.decision.rule.as_ref().map(|r| r.summary()))
    }

    /// The destination a policy refusal was about.
    pub fn authority(&self) -> Option<&Authority> {
        self.denied.as_ref().map(|d| &d.authority)
    }

    /// Whether a limit (rather than the policy or the request) refused it.
    pub fn is_limit(&self) -> bool {
        matches!(self.code, "rate_limited" | "too_many_tunnels" | "too_many_connections" | "quota_exceeded")
    }
}

/// The stable code of a credential that does not verify, the same at every listener.
pub fn credential_code(e: &CredentialError) -> &'static str {
    match e {
        CredentialError::Expired { .. } => "auth_expired",
        CredentialError::BadSignature => "auth_bad_signature",
        CredentialError::SessionMismatch => "auth_session_mismatch",
        _ => "auth_invalid",
    }
}

fn plural(n: impl Into<u64>, noun: &str) -> String {
    if n.into() == 1 { noun.to_string() } else { format!("{noun}s") }
}

/// `Retry-After` has whole seconds: round up, so a client that obeys it is not refused again.
pub fn retry_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constructors_fix_status_code_and_fault_together() {
        let r = Refusal::bad_request("x");
        assert_eq!((r.status, r.code, r.fault, r.close), (StatusCode::BAD_REQUEST, "bad_request", Fault::Client, true));
        let r = Refusal::rate_limited(Duration::from_millis(1500), "2/s, burst 2");
        assert_eq!(r.retry_after, Some(2));
        assert_eq!(r.message, "session over its rate limit (2/s, burst 2); retry in 2s");
        let r = Refusal::proxy_auth(&AuthError::Missing);
        assert_eq!((r.code, r.challenge), ("auth_missing", Some(Challenge::Proxy)));
        assert_eq!(r.message, "proxy authentication failed: this proxy requires credentials");
        let r = Refusal::unreachable("connect_timeout", true, "connecting to 127.0.0.1:9 timed out");
        assert_eq!((r.status, r.fault), (StatusCode::GATEWAY_TIMEOUT, Fault::Upstream));
        assert_eq!(
            Refusal::too_many_tunnels(1).message,
            "session already has 1 open tunnel, the most it may have at once"
        );
        let r = Refusal::overloaded("proxy", 3);
        assert_eq!(r.message, "the proxy is at its connection limit (3 connections); retry shortly");
        assert_eq!((r.retry_after, r.close), (Some(1), true));
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_secs(Duration::from_secs(2)), 2);
        assert_eq!(retry_secs(Duration::from_millis(2001)), 3);
        assert_eq!(retry_secs(Duration::ZERO), 0);
    }

    #[test]
    fn the_session_context_does_not_replace_a_decisions() {
        let r = Refusal::bad_request("x").in_policy(&"p".into(), "custom").in_policy(&"q".into(), "full");
        assert_eq!(r.policy, Some(PolicyContext { name: "p".into(), level: "custom" }));
    }
}
