//! Dials for the proxy's own upstreams (the git host, the API, the log storage a redirect names): the
//! same resolver, guard, Happy Eyeballs race and metrics as a sandbox's destinations, without a policy.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use tokio::net::TcpStream;

use super::{ATTEMPT_DELAY, NetError, Resolver, is_own, order, race};
use crate::metrics::Metrics;
use crate::policy::{BlockedRange, Target, canonical_ip, guard};

/// Which addresses an upstream dial may reach.
#[derive(Clone, Copy, Debug)]
pub struct UpstreamGuard<'a> {
    /// `None`: any address, for an upstream the operator configured (`[git] upstream`, which may well
    /// be a private mirror). `Some(allow_ips)`: the address guard, lifted only for these ranges, for
    /// a host the proxy was sent to (a redirect to `[git] log_hosts`, lifted by `[git] log_allow_ips`).
    pub guard: Option<&'a [IpNet]>,
    /// The proxy's own listeners, refused whatever `guard` says: an upstream that points back at the
    /// proxy would loop.
    pub own: &'a [SocketAddr],
}

/// Why an upstream could not be dialled. Messages name the host and address, never a credential.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum UpstreamDialError {
    InvalidHost { host: String, detail: String },
    BlockedAddress { host: String, ip: IpAddr, range: BlockedRange },
    OwnAddress { host: String, addr: SocketAddr },
    Net(NetError),
}

impl UpstreamDialError {
    /// Whether the failure was a timeout (answered `504`) rather than an error (`502`).
    pub fn is_timeout(&self) -> bool {
        matches!(self, UpstreamDialError::Net(e) if e.is_timeout())
    }

    pub fn code(&self) -> &'static str {
        match self {
            UpstreamDialError::InvalidHost { .. } => "upstream_invalid_host",
            UpstreamDialError::BlockedAddress { .. } => "upstream_blocked_address",
            UpstreamDialError::OwnAddress { .. } => "upstream_own_address",
            UpstreamDialError::Net(e) => e.code(),
        }
    }
}

impl fmt::Display for UpstreamDialError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpstreamDialError::InvalidHost { host, detail } => {
                write!(f, "upstream host {host:?} is not a valid host: {detail}")
            }
            UpstreamDialError::BlockedAddress { host, ip, range } => write!(
                f,
                "upstream {host:?} resolves to {ip}, a {range}; \
                 hint: list the range in the allow_ips that governs this upstream"
            ),
            UpstreamDialError::OwnAddress { host, addr } => write!(
                f,
                "upstream {host:?} resolves to {addr}, this proxy's own listening address; \
                 hint: point the upstream elsewhere"
            ),
            UpstreamDialError::Net(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for UpstreamDialError {}

/// Resolves `host` (a name, an IPv4 literal, or a bracketed or bare IPv6 address) through `resolver`
/// (`[resolver] hosts` first), checks every address against `guard` before any dial, and races the
/// checked addresses within `timeout`. DNS and connect latency go to `metrics`, as for the egress
/// proxy's dials.
pub async fn connect_upstream(
    host: &str,
    port: u16,
    resolver: &Resolver,
    guard: UpstreamGuard<'_>,
    timeout: Duration,
    metrics: &Metrics,
) -> Result<(TcpStream, SocketAddr), UpstreamDialError> {
    let target = Target::parse(host)
        .map_err(|e| UpstreamDialError::InvalidHost { host: host.to_string(), detail: e.to_string() })?;
    let addrs = match &target {
        Target::Ip(ip) => vec![*ip],
        Target::Name(name) => {
            let started = Instant::now();
            let answer = resolver.resolve(name).await;
            metrics.dns_latency.observe(started.elapsed());
            match answer {
                Ok(a) if a.is_empty() => {
                    return Err(UpstreamDialError::Net(NetError::NoSuchHost { host: name.to_string() }));
                }
                Ok(a) => a,
                Err(e) => return Err(UpstreamDialError::Net(e)),
            }
        }
    };
    for &ip in &addrs {
        if let Some(allow_ips) = guard.guard
            && !allow_ips.iter().any(|net| net.contains(&canonical_ip(ip)))
            && let Some(range) = guard::classify(ip)
        {
            return Err(UpstreamDialError::BlockedAddress { host: host.to_string(), ip, range });
        }
        if is_own(guard.own, ip, port) {
            return Err(UpstreamDialError::OwnAddress { host: host.to_string(), addr: SocketAddr::new(ip, port) });
        }
    }
    let candidates: Vec<SocketAddr> = order(&addrs).into_iter().map(|ip| SocketAddr::new(ip, port)).collect();
    race(&candidates, ATTEMPT_DELAY, timeout, metrics).await.map_err(UpstreamDialError::Net)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::tests::resolver;
    use tokio::net::TcpListener;

    const T: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn an_operator_upstream_may_be_private_and_is_counted() {
        let live = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = live.local_addr().unwrap().port();
        let r = resolver(&[("git.internal", "127.0.0.1")]);
        let metrics = Metrics::default();
        let any = UpstreamGuard { guard: None, own: &[] };
        let (_, addr) = connect_upstream("git.internal", port, &r, any, T, &metrics).await.unwrap();
        assert_eq!(addr, live.local_addr().unwrap());
        let (_, addr) = connect_upstream("127.0.0.1", port, &r, any, T, &metrics).await.unwrap();
        assert_eq!(addr, live.local_addr().unwrap());
        let text = metrics.render();
        assert!(text.contains("sluice_upstream_connect_seconds_count 2"), "{text}");
        assert!(text.contains("sluice_dns_seconds_count 1"), "one lookup, for the name: {text}");
    }

    #[tokio::test]
    async fn a_guarded_upstream_is_refused_before_any_dial_unless_allow_ips_lifts_it() {
        let live = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = live.local_addr().unwrap().port();
        let r = resolver(&[("logs.test", "127.0.0.1")]);
        let metrics = Metrics::default();
        let guarded = UpstreamGuard { guard: Some(&[]), own: &[] };
        assert_eq!(
            connect_upstream("logs.test", port, &r, guarded, T, &metrics).await.map(|(_, a)| a),
            Err(UpstreamDialError::BlockedAddress {
                host: "logs.test".into(),
                ip: "127.0.0.1".parse().unwrap(),
                range: BlockedRange::Loopback
            })
        );
        assert!(metrics.render().contains("sluice_upstream_connect_seconds_count 0"));
        let lifted: [IpNet; 1] = ["127.0.0.0/8".parse().unwrap()];
        let guarded = UpstreamGuard { guard: Some(&lifted), own: &[] };
        let (_, addr) = connect_upstream("logs.test", port, &r, guarded, T, &metrics).await.unwrap();
        assert_eq!(addr, live.local_addr().unwrap());
    }

    #[tokio::test]
    async fn an_upstream_that_is_the_proxy_itself_is_refused() {
        let r = resolver(&[("loop.test", "::ffff:127.0.0.1")]);
        let own: [SocketAddr; 1] = ["[::]:3129".parse().unwrap()];
        let any = UpstreamGuard { guard: None, own: &own };
        let refused = connect_upstream("loop.test", 3129, &r, any, T, &Metrics::default()).await.map(|(_, a)| a);
        let expected = UpstreamDialError::OwnAddress {
            host: "loop.test".into(),
            addr: "[::ffff:127.0.0.1]:3129".parse().unwrap(),
        };
        assert_eq!(refused, Err(expected.clone()));
        assert_eq!(
            expected.to_string(),
            "upstream \"loop.test\" resolves to [::ffff:127.0.0.1]:3129, this proxy's own listening address; \
             hint: point the upstream elsewhere"
        );
        assert_eq!(expected.code(), "upstream_own_address");
    }

    #[tokio::test]
    async fn bad_and_unknown_hosts() {
        let r = resolver(&[]);
        let any = UpstreamGuard { guard: None, own: &[] };
        match connect_upstream("bad host", 443, &r, any, T, &Metrics::default()).await {
            Err(UpstreamDialError::InvalidHost { host, .. }) => assert_eq!(host, "bad host"),
            other => panic!("expected an invalid host, got {other:?}"),
        }
        assert_eq!(
            connect_upstream("github.test", 443, &r, any, T, &Metrics::default()).await.map(|(_, a)| a),
            Err(UpstreamDialError::Net(NetError::NoSuchHost { host: "github.test".into() }))
        );
    }
}
