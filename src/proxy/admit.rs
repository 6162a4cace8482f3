//! Admission, the same for CONNECT and plain HTTP: identify → decide → limit → reach. Each step
//! returns a value; the first that cannot go on returns the [`Refusal`] the front end renders.

use std::net::SocketAddr;

use http::HeaderValue;
use tokio::net::TcpStream;

use super::{ANONYMOUS, EgressProxy, Session};
use crate::credential::{self, AuthError, Kind, now_unix};
use crate::limit::{Lease, LimitKey, Limited, TunnelRefused};
use crate::net::{self, NetError, Reach};
use crate::policy::{Authority, Decision};
use crate::refusal::Refusal;

/// What a served request needs once every step has passed.
pub(crate) struct Admission {
    pub decision: Decision,
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
        if !decision.is_allowed() {
            return Err(Refusal::denied(decision, authority.clone()));
        }
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
            Reach::Connected { stream, addr } => Ok(Admission { decision, stream, addr, permit }),
            Reach::Refused(decision) => Err(Refusal::denied(*decision, authority.clone())),
            Reach::Failed(e) => Err(in_policy(unreachable(&e))),
        }
    }
}

/// DNS or dial failure: `504` for a timeout, else `502`.
pub(crate) fn unreachable(e: &NetError) -> Refusal {
    Refusal::unreachable(e.code(), e.is_timeout(), e.to_string())
}
