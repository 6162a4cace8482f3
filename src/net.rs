//! Resolve → classify every address → dial exactly an address that was classified.

mod own;
mod race;
mod upstream;

pub use own::is_own;
pub use race::{ATTEMPT_DELAY, order, race};
pub use upstream::{UpstreamDialError, UpstreamGuard, connect_upstream};

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use hickory_resolver::TokioResolver;
use tokio::net::TcpStream;

use crate::config::ResolverConfig;
use crate::metrics::Metrics;
use crate::policy::{Decision, Host, Policy, Target};

/// Why a destination could not be reached (as opposed to refused by policy).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetError {
    NoSuchHost { host: String },
    DnsFailed { host: String, detail: String },
    DnsTimeout { host: String },
    ConnectFailed { addr: SocketAddr, detail: String },
    ConnectTimeout { addr: SocketAddr },
}

impl NetError {
    /// Whether the failure was a timeout (answered `504`) rather than an error (`502`).
    pub fn is_timeout(&self) -> bool {
        matches!(self, NetError::DnsTimeout { .. } | NetError::ConnectTimeout { .. })
    }

    pub fn code(&self) -> &'static str {
        match self {
            NetError::NoSuchHost { .. } => "dns_no_such_host",
            NetError::DnsFailed { .. } => "dns_failed",
            NetError::DnsTimeout { .. } => "dns_timeout",
            NetError::ConnectFailed { .. } => "connect_failed",
            NetError::ConnectTimeout { .. } => "connect_timeout",
        }
    }
}

impl fmt::Display for NetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetError::NoSuchHost { host } => write!(f, "DNS has no address for {host}"),
            NetError::DnsFailed { host, detail } => write!(f, "DNS lookup for {host} failed: {detail}"),
            NetError::DnsTimeout { host } => write!(f, "DNS lookup for {host} timed out"),
            NetError::ConnectFailed { addr, detail } => write!(f, "connecting to {addr} failed: {detail}"),
            NetError::ConnectTimeout { addr } => write!(f, "connecting to {addr} timed out"),
        }
    }
}

impl std::error::Error for NetError {}

/// Static answers first, then (unless disabled) the system's DNS through an async, caching resolver.
pub struct Resolver {
    hosts: HashMap<Host, Vec<IpAddr>>,
    system: Option<TokioResolver>,
    timeout: Duration,
    /// The runtime lookups run in (see [`crate::listen::inside`]): the one that built the resolver.
    runtime: Option<tokio::runtime::Handle>,
}

impl Resolver {
    pub fn new(config: &ResolverConfig) -> Result<Resolver, String> {
        let mut hosts = HashMap::new();
        for (name, addrs) in &config.hosts {
            let host = Host::parse(name).map_err(|e| format!("[resolver] hosts: {name:?}: {e}"))?;
            hosts.insert(host, addrs.clone());
        }
        let system = if config.system {
            let builder = TokioResolver::builder_tokio()
                .map_err(|e| format!("cannot read the system DNS configuration: {e} (set [resolver] system = false to use only [resolver] hosts)"))?;
            Some(builder.build().map_err(|e| format!("cannot build the DNS resolver: {e}"))?)
        } else {
            None
        };
        Ok(Resolver { hosts, system, timeout: config.timeout.0, runtime: tokio::runtime::Handle::try_current().ok() })
    }

    /// Every address for `host`, in the order to try them.
    pub async fn resolve(&self, host: &Host) -> Result<Vec<IpAddr>, NetError> {
        if let Some(addrs) = self.hosts.get(host) {
            return Ok(addrs.clone());
        }
        let Some(system) = &self.system else {
            return Err(NetError::NoSuchHost { host: host.to_string() });
        };
        // A fully qualified name: the search list must not turn `example.com` into `example.com.corp`.
        let fqdn = format!("{host}.");
        // Inside the resolver's runtime: its name-server connections and their tasks start on first use.
        let lookup = crate::listen::inside(self.runtime.as_ref(), system.lookup_ip(fqdn.as_str()));
        match tokio::time::timeout(self.timeout, lookup).await {
            Err(_) => Err(NetError::DnsTimeout { host: host.to_string() }),
            Ok(Err(e)) if e.is_no_records_found() || e.is_nx_domain() => {
                Err(NetError::NoSuchHost { host: host.to_string() })
            }
            Ok(Err(e)) => Err(NetError::DnsFailed { host: host.to_string(), detail: e.to_string() }),
            Ok(Ok(lookup)) => {
                let addrs: Vec<IpAddr> = lookup.iter().collect();
                if addrs.is_empty() { Err(NetError::NoSuchHost { host: host.to_string() }) } else { Ok(addrs) }
            }
        }
    }
}

/// The outcome of trying to reach a destination that policy allowed by name.
#[derive(Debug)]
pub enum Reach {
    Connected {
        stream: TcpStream,
        addr: SocketAddr,
    },
    /// An address in the answer may not be dialled: the whole name is refused.
    Refused(Box<Decision>),
    Failed(NetError),
}

/// Resolves `target`, checks every address with the guard (a name whose answer holds any refused
/// address is refused) and refuses the proxy's own listeners, all before any dial; then races the
/// checked addresses, IPv6 first (Happy Eyeballs, [`race`]), within `connect_timeout`.
pub async fn reach(
    target: &Target,
    port: u16,
    policy: &Policy,
    resolver: &Resolver,
    own: &[SocketAddr],
    connect_timeout: Duration,
    metrics: &Metrics,
) -> Reach {
    let addrs = match target {
        Target::Ip(ip) => vec![*ip],
        Target::Name(host) => {
            let started = Instant::now();
            let answer = resolver.resolve(host).await;
            metrics.dns_latency.observe(started.elapsed());
            match answer {
                Ok(a) if a.is_empty() => return Reach::Failed(NetError::NoSuchHost { host: host.to_string() }),
                Ok(a) => a,
                Err(e) => return Reach::Failed(e),
            }
        }
    };
    for ip in &addrs {
        if let Some(deny) = policy.check_address(*ip) {
            return Reach::Refused(Box::new(deny));
        }
        if is_own(own, *ip, port) {
            return Reach::Refused(Box::new(policy.own_address(*ip, port)));
        }
    }
    let candidates: Vec<SocketAddr> = order(&addrs).into_iter().map(|ip| SocketAddr::new(ip, port)).collect();
    match race(&candidates, ATTEMPT_DELAY, connect_timeout, metrics).await {
        Ok((stream, addr)) => Reach::Connected { stream, addr },
        Err(e) => Reach::Failed(e),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::policy::{Level, Policy, PolicySet};

    /// A resolver with only static answers (no system DNS), for tests here and in `net`'s modules.
    pub(crate) fn resolver(hosts: &[(&str, &str)]) -> Resolver {
        let mut config = ResolverConfig { system: false, ..ResolverConfig::default() };
        for (h, ip) in hosts {
            config.hosts.entry(h.to_string()).or_default().push(ip.parse().unwrap());
        }
        Resolver::new(&config).unwrap()
    }

    fn full() -> std::sync::Arc<Policy> {
        PolicySet::builtin().get("full").unwrap().clone()
    }

    #[tokio::test]
    async fn static_answers_and_no_system_dns() {
        let r = resolver(&[("bench.test", "127.0.0.1")]);
        assert_eq!(r.resolve(&Host::parse("BENCH.test.").unwrap()).await, Ok(vec!["127.0.0.1".parse().unwrap()]));
        assert_eq!(
            r.resolve(&Host::parse("other.test").unwrap()).await,
            Err(NetError::NoSuchHost { host: "other.test".into() })
        );
    }

    /// A name whose answer holds one private address is refused whatever else it holds, before any dial.
    #[tokio::test]
    async fn any_refused_address_refuses_the_name() {
        let r = resolver(&[("mixed.test", "93.184.216.34"), ("mixed.test", "169.254.169.254")]);
        let target = Target::Name(Host::parse("mixed.test").unwrap());
        let policy = full();
        assert_eq!(policy.level, Level::Full);
        match reach(&target, 443, &policy, &r, &[], Duration::from_millis(50), &Metrics::default()).await {
            Reach::Refused(d) => assert_eq!(d.reason.code(), "blocked_address"),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
}
