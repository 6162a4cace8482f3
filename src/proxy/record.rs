//! One egress request's record: built along the pipeline, it writes the request's decision line
//! (and counts it) once, and its closing line when a tunnel or a forwarded response ends.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::Method;

use super::admit::WouldDeny;
use super::{ANONYMOUS, EgressProxy, Session};
use crate::audit::{Event, EventKind};
use crate::credential::now_unix;
use crate::metrics::Denial;
use crate::policy::{Authority, Decision};
use crate::refusal::Refusal;

/// What is known of a request from its head on.
pub(crate) struct Record {
    started: Instant,
    client: SocketAddr,
    connect: bool,
    /// `None` until identity is known: the record then names the anonymous session.
    session: Option<Arc<str>>,
    host: Option<Authority>,
    upstream: Option<SocketAddr>,
    /// A request read inside a terminated tunnel: its path without the query.
    inspected: Option<Arc<str>>,
    /// A terminated tunnel: its requests' lines count the bytes, so its closing line does not.
    terminated: bool,
}

impl Record {
    pub fn new(method: &Method, client: SocketAddr) -> Record {
        Record {
            started: Instant::now(),
            client,
            connect: method == Method::CONNECT,
            session: None,
            host: None,
            upstream: None,
            inspected: None,
            terminated: false,
        }
    }

    /// The client's address.
    pub fn client(&self) -> SocketAddr {
        self.client
    }

    /// Marks a tunnel as terminated (see `terminated`).
    pub fn terminated(&mut self) {
        self.terminated = true;
    }

    /// The record of one request read inside a terminated tunnel to `authority`: its lines say
    /// `inspected = true`, the host and the path (`path` without its query).
    pub fn inspected(
        method: &Method,
        client: SocketAddr,
        session: &Session,
        authority: &Authority,
        path: &str,
    ) -> Record {
        let mut record = Record::new(method, client);
        record.session = Some(session.id.clone());
        record.host = Some(authority.clone());
        record.inspected = Some(path.into());
        record
    }

    fn session_id(&self) -> &str {
        self.session.as_deref().unwrap_or(ANONYMOUS)
    }

    fn kind(&self) -> &'static str {
        if self.connect { "connect" } else { "http" }
    }

    pub fn identified(&mut self, session: &Session) {
        self.session = Some(session.id.clone());
    }

    /// Where an admitted request goes, before its decision line is written (a refusal after the
    /// dial still names the host and the upstream).
    pub fn aimed(&mut self, authority: &Authority, upstream: SocketAddr) {
        self.host = Some(authority.clone());
        self.upstream = Some(upstream);
    }

    /// The decision line (and metric) for an admitted request, once its upstream is connected. In
    /// report mode a request the policy would refuse is recorded as allowed with `would_deny`, its
    /// reason, sentence and rule, counted, and listed in `/v1/denials` (marked).
    pub fn admitted(
        &mut self,
        proxy: &EgressProxy,
        method: &Method,
        authority: &Authority,
        decision: &Decision,
        would_deny: Option<&WouldDeny>,
        upstream: SocketAddr,
    ) {
        let reason = would_deny.map_or(decision.reason.code(), |w| w.code);
        proxy.metrics.decision("allow", reason, decision.level.as_str());
        self.host = Some(authority.clone());
        self.upstream = Some(upstream);
        let mut event = self.event(EventKind::Decision);
        event.method = Some(method.as_str().to_owned());
        event.verdict = Some("allow");
        event.reason = Some(reason.to_string());
        event.rule = decision.rule.as_ref().map(|r| r.summary());
        if let Some(w) = would_deny {
            proxy.metrics.would_deny(w.code, w.level);
            let denial = Denial {
                time: now_unix(),
                destination: authority.to_string(),
                reason: w.code,
                message: w.message.clone(),
                hint: w.hint.clone(),
                would_deny: true,
            };
            proxy.denials.record(self.session_id(), denial);
            event.would_deny = Some(w.code);
            event.detail = Some(w.message.clone());
            event.rule = w.rule.clone();
        }
        event.policy = Some(decision.policy.to_string());
        event.level = Some(decision.level.as_str());
        event.client = Some(crate::audit::socket_addr(self.client));
        proxy.audit.write(&event);
    }

    /// The decision line, the metric and the `/v1/denials` entry for a refused request. `target` is
    /// the request target as sent.
    pub fn refused(&self, proxy: &EgressProxy, refusal: &Refusal, method: &str, target: &str) {
        let policy = refusal.policy.as_ref();
        let level = policy.map(|p| p.level);
        proxy.metrics.decision("deny", refusal.code, level.unwrap_or("none"));
        if refusal.is_limit() {
            proxy.metrics.rate_limited.inc();
            proxy.metrics.limit_refused(refusal.code);
        }
        // A plain-HTTP target may carry `user:password@`: it is never recorded.
        let target = if self.connect { target.to_string() } else { redact_userinfo(target) };
        let denial = Denial {
            time: now_unix(),
            destination: target.clone(),
            reason: refusal.code,
            message: refusal.message.clone(),
            hint: refusal.hint.clone(),
            would_deny: false,
        };
        proxy.denials.record(self.session_id(), denial);
        let mut event = Event::new(EventKind::Decision);
        self.mark_inspected(&mut event);
        if let Some(authority) = refusal.authority().or(self.host.as_ref()) {
            event.host = Some(authority.target.to_string());
            event.port = Some(authority.port);
        }
        event.session = Some(self.session_id().to_string());
        event.kind = Some(self.kind());
        event.method = Some(method.to_string());
        event.target = Some(target);
        event.verdict = Some("deny");
        event.reason = Some(refusal.code.to_string());
        event.detail = Some(refusal.message.clone());
        event.rule = refusal.rule_summary();
        event.policy = policy.map(|p| p.name.to_string());
        event.level = level;
        event.client = Some(crate::audit::socket_addr(self.client));
        event.status = Some(refusal.status.as_u16());
        proxy.audit.write(&event);
    }

    /// The `/v1/denials` entry of an open tunnel that its session's spent quota closed (its closing line
    /// says `end = quota_exceeded`).
    pub fn quota_closed(&self, proxy: &EgressProxy, refusal: &Refusal) {
        let destination = self.host.as_ref().map_or_else(|| "-".to_string(), |a| a.to_string());
        let denial = Denial {
            time: now_unix(),
            destination,
            reason: refusal.code,
            message: refusal.message.clone(),
            hint: refusal.hint.clone(),
            would_deny: false,
        };
        proxy.denials.record(self.session_id(), denial);
    }

    /// The closing line of an admitted request: a tunnel's (`status` none) or a forwarded response's.
    pub fn closed(&self, proxy: &EgressProxy, bytes_up: u64, bytes_down: u64, end: &'static str, status: Option<u16>) {
        let metrics = &proxy.metrics;
        if !self.terminated {
            metrics.bytes_up.inc_by(bytes_up);
            metrics.bytes_down.inc_by(bytes_down);
        }
        let mut event = self.event(if self.connect { EventKind::TunnelClosed } else { EventKind::RequestFinished });
        event.status = status;
        event.bytes_up = Some(bytes_up);
        event.bytes_down = Some(bytes_down);
        event.duration_ms = Some(self.started.elapsed().as_millis() as u64);
        event.end = Some(end);
        proxy.audit.write(&event);
    }

    fn mark_inspected(&self, event: &mut Event) {
        if let Some(path) = &self.inspected {
            event.path = Some(path.to_string());
            event.inspected = Some(true);
        }
    }

    /// The fields every line of an admitted request carries.
    fn event(&self, kind: EventKind) -> Event {
        let mut event = Event::new(kind);
        self.mark_inspected(&mut event);
        event.session = Some(self.session_id().to_string());
        event.kind = Some(self.kind());
        if let Some(authority) = &self.host {
            event.host = Some(authority.target.to_string());
            event.port = Some(authority.port);
        }
        event.upstream = self.upstream.map(crate::audit::socket_addr);
        event
    }

    /// The destination of an admitted request.
    pub fn host(&self) -> Option<&Authority> {
        self.host.as_ref()
    }

    /// Restarts the clock: a tunnel's duration counts from its `200`, a response's from its head.
    pub fn restart(&mut self) {
        self.started = Instant::now();
    }
}

/// A URL with any `user:password@` removed, for logs.
pub(crate) fn redact_userinfo(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            match rest[..end].rfind('@') {
                Some(at) => format!("{scheme}://[redacted]@{}", &rest[at + 1..]),
                None => url.to_string(),
            }
        }
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn userinfo_is_redacted() {
        assert_eq!(redact_userinfo("http://u:secret@example.com/x@y"), "http://[redacted]@example.com/x@y");
        assert_eq!(redact_userinfo("http://example.com/a@b"), "http://example.com/a@b");
    }
}
