//! Admission, the same for CONNECT and plain HTTP: identify → decide → report → limit → reach. Each
//! step returns a value; the first that cannot go on returns the [`Refusal`] the front end renders.

use std::net::SocketAddr;
use std::sync::Arc;

use http::HeaderValue;
use tokio::net::TcpStream;

use super::{ANONYMOUS, EgressProxy, Session};
use crate::credential::{self, AuthError, Kind, now_unix};
use crate::limit::{Lease, LimitKey, Limited, TunnelRefused};
use crate::net::{self, NetError, Reach};
use crate::policy::{Authority, Decision, Mode};
use crate::refusal::Refusal;

/// What a served request needs once every step has passed.
pub(crate) struct Admission {
    /// The policy's decision: an allow, or in report mode the deny that `would_deny` reports.
    pub decision: Decision,
    /// Set when the policy is in report mode and its own rules would have refused the request.
    pub would_deny: Option<WouldDeny>,
    pub stream: TcpStream,
    /// The checked address that was dialled.
    pub addr: SocketAddr,
    /// Held for a tunnel's life: the session's slot under `max_tunnels`.
    pub permit: Option<Lease>,
}

impl EgressProxy {
    /// Identity from `Proxy-Authorization: Basic base64(session:token)`, else the anonymous policy when
    /// the server allows it. Credentials that are present are always verified, never ignored.
    pub fn identify(&self, authorization: Option<&HeaderValue>, peer: SocketAddr) -> Result<Session, Refusal> {
        let policies = self.policies.load();
        let Some(value) = authorization else {
            if !self.anonymous {
                return Err(Refusal::proxy_auth(&AuthError::Missing));
            }
            let name = &self.config.policy;
            let policy = policies.get(name).cloned().ok_or_else(|| Refusal::unknown_policy(name))?;
            return Ok(Session { id: ANONYMOUS.into(), policy, limit_key: LimitKey::anonymous(peer.ip()) });
        };
        let basic = credential::Basic::parse(value.as_bytes()).map_err(|e| Refusal::proxy_auth(&e))?;
        if !credential::valid_session_id(&basic.user) {
            return Err(Refusal::proxy_auth(&AuthError::InvalidSessionId));
        }
        let keys = self.keys.as_ref().ok_or_else(|| Refusal::proxy_auth(&AuthError::NoKey))?;
        let claims = keys
            .verify_for(basic.password.expose(), Kind::Egress, &basic.user, now_unix())
            .map_err(|e| Refusal::proxy_auth(&AuthError::Credential(e)))?;
        let name = claims.policy.unwrap_or_else(|| "trusted".into());
        let policy = policies.get(&name).cloned().ok_or_else(|| Refusal::unknown_policy(&name))?;
        let limit_key = LimitKey::session(&basic.user);
        Ok(Session { id: basic.user.into(), policy, limit_key })
    }

    /// decide → limit → reach for an identified session. `tunnel` also takes a slot under the
    /// session's `max_tunnels`.
    pub(crate) async fn admit(
        &self,
        session: &Session,
        authority: &Authority,
        tunnel: bool,
    ) -> Result<Admission, Refusal> {
        let policy = &session.policy;
        let decision = policy.decide(&authority.target, authority.port);
        let would_deny = if decision.is_allowed() {
            None
        } else {
            Some(report(policy.mode, Refusal::denied(decision.clone(), authority.clone()))?)
        };
        let in_policy = |r: Refusal| r.in_policy(&policy.name, policy.level.as_str());
        // A tunnel's rate check and its place under max_tunnels are one answer (one round trip to a shared
        // store); a plain-HTTP request only counts against the rate.
        let permit = if tunnel {
            let permit = self.limiter.admit_tunnel(&session.limit_key, &policy.limits).await;
            Some(permit.map_err(|e| match e {
                Limited::Over(TunnelRefused::Rate(e)) => in_policy(Refusal::rate_limited(e.retry_after, &e.limit)),
                Limited::Over(TunnelRefused::Tunnels(e)) => in_policy(Refusal::too_many_tunnels(e.max)),
                Limited::StoreUnavailable => in_policy(Refusal::limit_store_unavailable()),
            })?)
        } else {
            self.limiter.check_request(&session.limit_key, &policy.limits).await.map_err(|e| match e {
                Limited::Over(e) => in_policy(Refusal::rate_limited(e.retry_after, &e.limit)),
                Limited::StoreUnavailable => in_policy(Refusal::limit_store_unavailable()),
            })?;
            None
        };
        // A refusal here drops the permit, which gives the tunnel's place back.
        self.limiter
            .check_quota(&session.limit_key, &policy.limits)
            .await
            .map_err(|e| in_policy(e.refusal(now_unix())))?;
        let timeout = self.config.connect_timeout.0;
        let reached =
            net::reach(&authority.target, authority.port, policy, &self.resolver, &self.own, timeout, &self.metrics)
                .await;
        match reached {
            Reach::Connected { stream, addr } => Ok(Admission { decision, would_deny, stream, addr, permit }),
            Reach::Refused(decision) => Err(Refusal::denied(*decision, authority.clone())),
            Reach::Failed(e) => Err(in_policy(unreachable(&e))),
        }
    }
}

impl EgressProxy {
    /// The limits a request inside a terminated tunnel passes, as a plain-HTTP request does: the
    /// session's request rate and its byte quotas (the tunnel itself was admitted once, at its CONNECT).
    pub(crate) async fn limit_request(&self, session: &Session) -> Result<(), Refusal> {
        let policy = &session.policy;
        let in_policy = |r: Refusal| r.in_policy(&policy.name, policy.level.as_str());
        self.limiter.check_request(&session.limit_key, &policy.limits).await.map_err(|e| match e {
            Limited::Over(e) => in_policy(Refusal::rate_limited(e.retry_after, &e.limit)),
            Limited::StoreUnavailable => in_policy(Refusal::limit_store_unavailable()),
        })?;
        self.limiter.check_quota(&session.limit_key, &policy.limits).await.map_err(|e| in_policy(e.refusal(now_unix())))
    }
}

/// DNS or dial failure: `504` for a timeout, else `502`.
pub(crate) fn unreachable(e: &NetError) -> Refusal {
    Refusal::unreachable(e.code(), e.is_timeout(), e.to_string())
}

/// A refusal of the policy's own rules that report mode served instead: what the decision record,
/// the metric, `/v1/denials` and the answer's `X-Sluice-Decision` name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct WouldDeny {
    /// The refusal's stable code (`not_allowlisted`, `denylisted`, …).
    pub code: &'static str,
    /// The sentence an enforcing policy would have answered with.
    pub message: String,
    pub hint: Option<String>,
    /// The rule behind it, as `PATTERN (FILE:LINE)`, when one decided.
    pub rule: Option<String>,
    pub policy: Arc<str>,
    pub level: &'static str,
}

impl WouldDeny {
    /// `allow; would_deny=CODE; policy=NAME`, the served answer's `X-Sluice-Decision`.
    pub fn header(&self) -> HeaderValue {
        let text = format!("allow; would_deny={}; policy={}", self.code, self.policy);
        // Codes are ASCII words and policy names are letters, digits, `.`, `-`, `_`: always a valid value.
        HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static("allow; would_deny"))
    }
}

/// The report step. A refusal made by the policy's own rules stands in enforce mode; in report mode
/// it becomes a [`WouldDeny`] and the request goes on to the limits and the guard, which are enforced
/// in every mode. Any other refusal (the address guard, the proxy's own addresses, port 0) stands in
/// both modes. Host decisions come through here; request rules are meant to come through here too,
/// as a policy refusal whose decision a policy can lift.
pub(crate) fn report(mode: Mode, refusal: Refusal) -> Result<WouldDeny, Refusal> {
    if !refusal.denied.as_ref().is_some_and(|d| mode.serves(&d.decision.reason)) {
        return Err(refusal);
    }
    let (policy, level) = match &refusal.policy {
        Some(p) => (p.name.clone(), p.level),
        None => ("-".into(), "none"),
    };
    Ok(WouldDeny {
        code: refusal.code,
        rule: refusal.rule_summary(),
        message: refusal.message,
        hint: refusal.hint,
        policy,
        level,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{PolicySet, parse_policy};

    fn policy(extra: &str) -> crate::policy::Policy {
        let text = format!(
            "version = 1\nname = \"r\"\nlevel = \"custom\"\nallow = [\"a.example.com\"]\ndeny = [\"d.example.com\"]\n{extra}"
        );
        parse_policy("r.toml", &text, PolicySet::builtin().defaults()).map(|(p, _)| p).expect("a valid policy")
    }

    fn refusal(p: &crate::policy::Policy, dest: &str) -> Refusal {
        let authority = Authority::parse(dest, Some(443)).expect("an authority");
        Refusal::denied(p.decide(&authority.target, authority.port), authority)
    }

    #[test]
    fn report_mode_turns_the_policys_own_denies_into_would_deny() {
        let p = policy("mode = \"report\"\n");
        assert_eq!(p.mode, Mode::Report);
        let w = report(p.mode, refusal(&p, "other.example.org")).expect("served in report mode");
        assert_eq!((w.code, &*w.policy, w.level), ("not_allowlisted", "r", "custom"));
        assert_eq!(w.message, "other.example.org:443 is not allowed: not in the allowlist");
        assert_eq!(w.header(), "allow; would_deny=not_allowlisted; policy=r");
        let w = report(p.mode, refusal(&p, "d.example.com")).expect("served in report mode");
        assert_eq!((w.code, w.rule.as_deref()), ("denylisted", Some("d.example.com (r.toml:5)")));
        let w = report(p.mode, refusal(&p, "a.example.com:8443")).expect("served in report mode");
        assert_eq!(w.code, "port_not_allowed");
        assert_eq!(report(p.mode, refusal(&p, "8.8.8.8")).map(|w| w.code), Ok("ip_not_allowed"));
    }

    #[test]
    fn the_guard_is_enforced_in_report_mode() {
        let p = policy("mode = \"report\"\n");
        let refused = [
            ("169.254.169.254:80", "blocked_address"),
            ("127.0.0.1", "blocked_address"),
            ("[::1]", "blocked_address"),
            ("metadata.google.internal", "blocked_name"),
            ("localhost", "blocked_name"),
        ];
        for (dest, code) in refused {
            assert_eq!(report(p.mode, refusal(&p, dest)).map_err(|r| r.code), Err(code), "{dest}");
        }
    }

    #[test]
    fn enforce_mode_refuses() {
        let p = policy("");
        assert_eq!(p.mode, Mode::Enforce);
        assert_eq!(report(p.mode, refusal(&p, "other.example.org")).map_err(|r| r.code), Err("not_allowlisted"));
    }
}
