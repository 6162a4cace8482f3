//! Happy Eyeballs (RFC 8305): the order to dial a name's checked addresses in, and the race between
//! the attempts.
//!
//! Every address is classified before this runs; the race only dials what it is given. A name's
//! answers are all in hand when it starts (both families are resolved together), so there is no
//! Resolution Delay (§3); attempts start one Connection Attempt Delay apart, or at once when the one
//! before failed; the first to connect wins and the others are dropped, which closes their sockets;
//! the whole race is bounded by the connect timeout.

use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::{Instant, sleep_until};

use super::NetError;
use crate::metrics::Metrics;

/// RFC 8305 §5's recommended Connection Attempt Delay.
pub const ATTEMPT_DELAY: Duration = Duration::from_millis(250);

/// RFC 8305 §4: IPv6 first, then alternating families, each family in the resolver's order, every
/// address once. An IPv4-mapped address dials IPv4 and counts as IPv4.
pub fn order(addrs: &[IpAddr]) -> Vec<IpAddr> {
    let mut v6 = VecDeque::new();
    let mut v4 = VecDeque::new();
    for (i, ip) in addrs.iter().enumerate() {
        if addrs[..i].contains(ip) {
            continue;
        }
        if ip.to_canonical().is_ipv4() { v4.push_back(*ip) } else { v6.push_back(*ip) }
    }
    let mut ordered = Vec::with_capacity(v6.len() + v4.len());
    while !v6.is_empty() || !v4.is_empty() {
        ordered.extend(v6.pop_front());
        ordered.extend(v4.pop_front());
    }
    ordered
}

/// One connection attempt in flight.
struct Attempt<F> {
    addr: SocketAddr,
    started: Instant,
    connecting: Pin<Box<F>>,
}

/// Dials `candidates` in order, starting the next one `delay` after the last (or as soon as every
/// attempt in flight has failed), until one connects or `timeout` has passed since the first. Every
/// attempt that ends (connected, failed or timed out) is observed in `connect_latency`; the losers
/// are dropped unobserved. A failure names the last address that failed; a timeout names the oldest
/// attempt still in flight.
pub async fn race(
    candidates: &[SocketAddr],
    delay: Duration,
    timeout: Duration,
    metrics: &Metrics,
) -> Result<(TcpStream, SocketAddr), NetError> {
    let deadline = Instant::now() + timeout;
    let mut waiting = candidates.iter().copied();
    let mut attempts = Vec::new();
    let mut last_error = None;
    let mut next_start = Instant::now();
    loop {
        let now = Instant::now();
        if (attempts.is_empty() || now >= next_start)
            && let Some(addr) = waiting.next()
        {
            attempts.push(Attempt { addr, started: now, connecting: Box::pin(TcpStream::connect(addr)) });
            next_start = now + delay;
        }
        if attempts.is_empty() {
            return Err(last_error.unwrap_or_else(|| NetError::ConnectFailed {
                addr: SocketAddr::from(([0, 0, 0, 0], 0)),
                detail: "no address to dial".into(),
            }));
        }
        let more = waiting.len() > 0;
        tokio::select! {
            biased;
            (i, connected) = first_to_finish(&mut attempts) => {
                let attempt = attempts.remove(i);
                metrics.connect_latency.observe(attempt.started.elapsed());
                match connected {
                    Ok(stream) => {
                        // Small TLS handshake records must not wait for Nagle.
                        let _ = stream.set_nodelay(true);
                        return Ok((stream, attempt.addr));
                    }
                    Err(e) => {
                        last_error = Some(NetError::ConnectFailed { addr: attempt.addr, detail: e.to_string() });
                        next_start = Instant::now();
                    }
                }
            }
            () = sleep_until(deadline) => {
                for attempt in &attempts {
                    metrics.connect_latency.observe(attempt.started.elapsed());
                }
                return Err(NetError::ConnectTimeout { addr: attempts[0].addr });
            }
            () = sleep_until(next_start), if more => {}
        }
    }
}

/// The index and outcome of the first attempt to finish; pending while there is none.
fn first_to_finish<F: Future>(attempts: &mut [Attempt<F>]) -> impl Future<Output = (usize, F::Output)> + '_ {
    poll_fn(move |cx| {
        for (i, attempt) in attempts.iter_mut().enumerate() {
            if let Poll::Ready(outcome) = attempt.connecting.as_mut().poll(cx) {
                return Poll::Ready((i, outcome));
            }
        }
        Poll::Pending
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use tokio::net::{TcpListener, TcpSocket};

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn ipv6_first_then_alternating_families() {
        let answer = ips(&["192.0.2.1", "192.0.2.2", "2001:db8::1", "2001:db8::2", "2001:db8::3"]);
        assert_eq!(order(&answer), ips(&["2001:db8::1", "192.0.2.1", "2001:db8::2", "192.0.2.2", "2001:db8::3"]));
        let answer = ips(&["2001:db8::1", "192.0.2.1", "192.0.2.2", "192.0.2.3"]);
        assert_eq!(order(&answer), ips(&["2001:db8::1", "192.0.2.1", "192.0.2.2", "192.0.2.3"]));
        // One family keeps the resolver's order; a duplicate is dialled once.
        assert_eq!(order(&ips(&["192.0.2.2", "192.0.2.1", "192.0.2.2"])), ips(&["192.0.2.2", "192.0.2.1"]));
        assert_eq!(order(&ips(&["2001:db8::2", "2001:db8::1"])), ips(&["2001:db8::2", "2001:db8::1"]));
        // A mapped address dials IPv4 and keeps its spelling: exactly the address that was checked.
        let answer = ips(&["::ffff:192.0.2.1", "192.0.2.2", "2001:db8::1"]);
        assert_eq!(order(&answer), ips(&["2001:db8::1", "::ffff:192.0.2.1", "192.0.2.2"]));
        assert_eq!(order(&[]), Vec::<IpAddr>::new());
    }

    /// A listener on `ip` whose accept queue is full and never drained: connecting to it hangs (the
    /// kernel drops the SYN), on loopback, with nothing sent anywhere else. Returns it, the
    /// connections that fill it (keep them alive) and its address.
    async fn hanging_listener(addr: SocketAddr) -> Option<(Hold, SocketAddr)> {
        let socket = if addr.is_ipv4() { TcpSocket::new_v4().ok()? } else { TcpSocket::new_v6().ok()? };
        socket.bind(addr).ok()?;
        let listener = socket.listen(1).ok()?;
        let addr = listener.local_addr().ok()?;
        let mut fillers = Vec::new();
        for _ in 0..16 {
            match tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await {
                Ok(Ok(s)) => fillers.push(s),
                Ok(Err(_)) => return None,
                Err(_) => return Some((Hold { _listener: listener, _fillers: fillers }, addr)),
            }
        }
        None
    }

    /// Keeps a hanging listener and its fillers open.
    struct Hold {
        _listener: TcpListener,
        _fillers: Vec<TcpStream>,
    }

    async fn closed_addr() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    }

    /// The first address refuses at once: the second is dialled without waiting out the delay (an
    /// hour here, so "without waiting" is not a timing guess).
    #[tokio::test]
    async fn a_refused_attempt_starts_the_next_at_once() {
        let live = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let refused = closed_addr().await;
        let metrics = Metrics::default();
        let hour = Duration::from_secs(3600);
        let (_, winner) = tokio::time::timeout(
            Duration::from_secs(20),
            race(&[refused, live.local_addr().unwrap()], hour, hour, &metrics),
        )
        .await
        .expect("no wait for the attempt delay")
        .expect("connected");
        assert_eq!(winner, live.local_addr().unwrap());
        assert!(metrics.render().contains("sluice_upstream_connect_seconds_count 2"), "both attempts observed");
    }

    /// The first address hangs: the second starts one attempt delay later and wins well within the
    /// connect timeout.
    #[tokio::test]
    async fn a_hanging_attempt_is_overtaken_after_the_attempt_delay() {
        let Some((_hold, hanging)) = hanging_listener("127.0.0.1:0".parse().unwrap()).await else {
            panic!("could not fill a loopback listener's accept queue");
        };
        let live = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let timeout = Duration::from_secs(10);
        let started = Instant::now();
        let (_, winner) =
            race(&[hanging, live.local_addr().unwrap()], ATTEMPT_DELAY, timeout, &Metrics::default()).await.unwrap();
        let took = started.elapsed();
        assert_eq!(winner, live.local_addr().unwrap());
        assert!(took >= ATTEMPT_DELAY && took < timeout, "{took:?}");
    }

    /// Nothing answers: a timeout naming the first address, once the connect timeout is over, with
    /// every attempt started (one delay apart) and observed.
    #[tokio::test]
    async fn every_attempt_hangs_until_the_connect_timeout() {
        let Some((_hold, hanging)) = hanging_listener("127.0.0.1:0".parse().unwrap()).await else {
            panic!("could not fill a loopback listener's accept queue");
        };
        let Some((_hold2, hanging2)) = hanging_listener("127.0.0.1:0".parse().unwrap()).await else {
            panic!("could not fill a loopback listener's accept queue");
        };
        let metrics = Metrics::default();
        let timeout = Duration::from_millis(600);
        let started = Instant::now();
        let outcome = race(&[hanging, hanging2], Duration::from_millis(100), timeout, &metrics).await;
        assert_eq!(outcome.map(|(_, a)| a), Err(NetError::ConnectTimeout { addr: hanging }));
        assert!(started.elapsed() >= timeout);
        assert!(metrics.render().contains("sluice_upstream_connect_seconds_count 2"));
    }

    /// Every address refuses: the last failure is the answer, at once.
    #[tokio::test]
    async fn every_attempt_refused() {
        let (a, b) = (closed_addr().await, closed_addr().await);
        let hour = Duration::from_secs(3600);
        let outcome = tokio::time::timeout(Duration::from_secs(20), race(&[a, b], hour, hour, &Metrics::default()))
            .await
            .expect("refusals end the race");
        match outcome {
            Err(NetError::ConnectFailed { addr, detail }) => {
                assert_eq!(addr, b);
                assert!(detail.contains("refused"), "{detail}");
            }
            other => panic!("expected a connect failure, got {other:?}"),
        }
        let none = race(&[], hour, hour, &Metrics::default()).await.map(|(_, a)| a);
        assert_eq!(
            none,
            Err(NetError::ConnectFailed { addr: "0.0.0.0:0".parse().unwrap(), detail: "no address to dial".into() })
        );
    }
}
