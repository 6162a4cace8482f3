//! The proxy's own listening addresses: which destinations a dial would deliver back into them.
//!
//! A listener bound to a specific address is reached by that address in any spelling: IPv4, or an IPv6
//! form carrying it (mapped `::ffff:a.b.c.d`, compatible `::a.b.c.d`, SIIT `::ffff:0:a.b.c.d`, NAT64
//! `64:ff9b::a.b.c.d`); a loopback listener also by the unspecified address, which Linux delivers to
//! loopback (`0.0.0.0` → `127.0.0.1`, `::` → `::1`). A listener bound to an unspecified address is
//! reached by *every* address local to this machine on its port: `0.0.0.0` by every local IPv4
//! address, `[::]` by every local IPv6 address and, because Linux makes such a socket dual-stack unless
//! `IPV6_V6ONLY` is set (sysctl `net.ipv6.bindv6only = 0`, the default), by every local IPv4 address
//! too. The listener's `IPV6_V6ONLY` cannot be read from its address, so `[::]` is always treated as
//! dual-stack: failing closed costs at most a refused IPv4 destination on the proxy's own port.
//!
//! "Local" is asked of the kernel, not of a list taken at start-up: an address is local when a UDP
//! socket can be bound to it (`EADDRNOTAVAIL` otherwise), which is exactly the local routing table a
//! connect would be delivered through, and follows addresses that come and go (DHCP, hot-plugged
//! interfaces). Nothing is sent. Loopback (`127.0.0.0/8`, `::1`) counts without asking, and so does
//! IPv6 link-local `fe80::/10`, whose bind needs a scope the destination does not carry. With
//! `net.ipv4.ip_nonlocal_bind = 1` every bind succeeds, so every address on an unspecified listener's
//! port is refused: failing closed again. The kernel is asked only when a destination's port is the
//! port of an unspecified listener, so ordinary requests cost nothing.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};

/// Whether dialling `ip:port` would reach one of the listeners bound at `own`.
pub fn is_own(own: &[SocketAddr], ip: IpAddr, port: u16) -> bool {
    is_own_where(own, ip, port, is_local)
}

/// [`is_own`] with the question "is this address local to this machine" answered by `local`.
fn is_own_where(own: &[SocketAddr], ip: IpAddr, port: u16, local: impl Fn(IpAddr) -> bool) -> bool {
    let dest = delivered(ip);
    own.iter().filter(|bound| bound.port() == port).any(|bound| match spelled(bound.ip()) {
        IpAddr::V4(any) if any.is_unspecified() => dest.is_ipv4() && local(dest),
        // Dual-stack: every local IPv6 address, and every local IPv4 address in any spelling.
        IpAddr::V6(any) if any.is_unspecified() => local(dest),
        specific => specific == dest,
    })
}

/// The address a dial to `ip` is delivered to: its one spelling, with the unspecified address
/// delivered to loopback as Linux does.
fn delivered(ip: IpAddr) -> IpAddr {
    match spelled(ip) {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        other => other,
    }
}

/// One spelling for an address: the IPv4 address an IPv6 form carries, else `ip` itself.
fn spelled(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => carried_v4(v6).map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The IPv4 address inside an IPv6 form that stands for it: mapped `::ffff:a.b.c.d`, compatible
/// `::a.b.c.d` (but not `::` or `::1`, which are IPv6's own), SIIT `::ffff:0:a.b.c.d` and NAT64
/// `64:ff9b::a.b.c.d` (a NAT64 gateway on this machine delivers it here).
fn carried_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let tail = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    let carries = match s[..6] {
        [0, 0, 0, 0, 0, 0xffff] | [0, 0, 0, 0, 0xffff, 0] | [0x64, 0xff9b, 0, 0, 0, 0] => true,
        [0, 0, 0, 0, 0, 0] => !ip.is_unspecified() && !ip.is_loopback(),
        _ => false,
    };
    carries.then_some(tail)
}

/// Whether `ip` is an address of this machine (see the module docs for what counts and why).
fn is_local(ip: IpAddr) -> bool {
    let certain = match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback() || (v6.segments()[0] & 0xffc0) == 0xfe80,
    };
    certain || UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PORT: u16 = 3130;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn bind(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// A machine with loopback, one IPv4 and one IPv6 interface address.
    fn local(ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(v4) => v4.is_loopback() || v4 == Ipv4Addr::new(10, 1, 2, 3),
            IpAddr::V6(v6) => v6.is_loopback() || v6 == "fd00::2".parse::<Ipv6Addr>().unwrap(),
        }
    }

    /// Every way to write 127.0.0.1, 127.0.0.2 (other loopback), 10.1.2.3 (an interface address),
    /// ::1, fd00::2 (an interface address) and 203.0.113.9 / 2001:db8::9 (not this machine's), with
    /// the address a dial to each is delivered to.
    const SPELLINGS: [(&str, &str); 20] = [
        ("127.0.0.1", "127.0.0.1"),
        ("::ffff:127.0.0.1", "127.0.0.1"),
        ("::ffff:7f00:1", "127.0.0.1"),
        ("::127.0.0.1", "127.0.0.1"),
        ("::ffff:0:127.0.0.1", "127.0.0.1"),
        ("64:ff9b::127.0.0.1", "127.0.0.1"),
        ("127.0.0.2", "127.0.0.2"),
        ("::ffff:127.0.0.2", "127.0.0.2"),
        ("10.1.2.3", "10.1.2.3"),
        ("::ffff:10.1.2.3", "10.1.2.3"),
        ("::10.1.2.3", "10.1.2.3"),
        ("0.0.0.0", "127.0.0.1"),
        ("::ffff:0.0.0.0", "127.0.0.1"),
        ("::1", "::1"),
        ("0:0:0:0:0:0:0:1", "::1"),
        ("::", "::1"),
        ("fd00::2", "fd00::2"),
        ("203.0.113.9", "203.0.113.9"),
        ("::ffff:203.0.113.9", "203.0.113.9"),
        ("2001:db8::9", "2001:db8::9"),
    ];

    #[test]
    fn every_spelling_is_delivered_to_the_address_it_carries() {
        for (spelling, address) in SPELLINGS {
            assert_eq!(delivered(ip(spelling)), ip(address), "{spelling}");
        }
        // Not IPv4 carriers: 6to4 and local-use NAT64 (the guard judges those; nothing here delivers them).
        assert_eq!(delivered(ip("2002:7f00:1::")), ip("2002:7f00:1::"));
        assert_eq!(delivered(ip("64:ff9b:1::7f00:1")), ip("64:ff9b:1::7f00:1"));
        // A bind is spelled, not delivered: 0.0.0.0 stays the unspecified address.
        assert_eq!(spelled(ip("::ffff:0.0.0.0")), ip("0.0.0.0"));
        assert_eq!(spelled(ip("::")), ip("::"));
    }

    /// Every spelling against every kind of bind: which destinations each listener owns.
    #[test]
    fn every_spelling_against_every_bind() {
        const V4_LOCAL: &[&str] = &["127.0.0.1", "127.0.0.2", "10.1.2.3"];
        const ALL_LOCAL: &[&str] = &["127.0.0.1", "127.0.0.2", "10.1.2.3", "::1", "fd00::2"];
        // Each bind, and the delivered addresses (of SPELLINGS) it owns.
        let binds: [(&str, &[&str]); 8] = [
            ("0.0.0.0", V4_LOCAL),
            ("[::]", ALL_LOCAL),
            ("[::ffff:0.0.0.0]", V4_LOCAL),
            ("127.0.0.1", &["127.0.0.1"]),
            ("[::ffff:127.0.0.1]", &["127.0.0.1"]),
            ("10.1.2.3", &["10.1.2.3"]),
            ("[::1]", &["::1"]),
            ("[fd00::2]", &["fd00::2"]),
        ];
        for (b, owns) in binds {
            let own = [bind(&format!("{b}:{PORT}"))];
            for (spelling, address) in SPELLINGS {
                let expected = owns.contains(&address);
                assert_eq!(is_own_where(&own, ip(spelling), PORT, local), expected, "bind {b}, destination {spelling}");
                // Another port is never the listener's.
                assert!(!is_own_where(&own, ip(spelling), PORT + 1, local), "bind {b}, {spelling}, other port");
            }
        }
    }

    #[test]
    fn any_of_several_listeners() {
        let own = [bind("127.0.0.1:3128"), bind("127.0.0.1:3129"), bind("[::]:3130")];
        assert!(is_own_where(&own, ip("127.0.0.1"), 3128, local));
        assert!(!is_own_where(&own, ip("127.0.0.2"), 3128, local));
        assert!(is_own_where(&own, ip("127.0.0.2"), 3130, local));
        assert!(is_own_where(&own, ip("::ffff:10.1.2.3"), 3130, local));
        assert!(!is_own_where(&own, ip("203.0.113.9"), 3130, local));
        assert!(!is_own_where(&[], ip("127.0.0.1"), 3128, local));
    }

    /// The kernel's answer: loopback is local, an address from a documentation range is not (binding
    /// a socket sends nothing), and so is every address this machine's interfaces list.
    #[test]
    fn the_kernel_knows_which_addresses_are_local() {
        for a in ["127.0.0.1", "127.0.0.53", "::1", "fe80::1"] {
            assert!(is_local(ip(a)), "{a}");
        }
        for a in ["203.0.113.254", "2001:db8::fe"] {
            assert!(!is_local(ip(a)), "{a}");
        }
        // IPv6 interface addresses as /proc lists them (absent off Linux), one a line:
        // "fd000000000000000000000000000002 04 40 00 80 eth0".
        let listed = std::fs::read_to_string("/proc/net/if_inet6").unwrap_or_default();
        for line in listed.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(Ok(bits)), Some(Ok(flags))) =
                (fields.first().map(|h| u128::from_str_radix(h, 16)), fields.get(4).map(|f| u8::from_str_radix(f, 16)))
            else {
                continue;
            };
            // Tentative (0x40) or failed duplicate detection (0x08): not yet, or never, bindable.
            if flags & 0x48 != 0 {
                continue;
            }
            let a = IpAddr::V6(Ipv6Addr::from(bits));
            assert!(is_local(a), "{a} is listed in /proc/net/if_inet6");
        }
        // IPv4 ones: "|-- 192.0.2.2" followed by "/32 host LOCAL" in /proc/net/fib_trie.
        let trie = std::fs::read_to_string("/proc/net/fib_trie").unwrap_or_default();
        let lines: Vec<&str> = trie.lines().map(str::trim).collect();
        for pair in lines.windows(2) {
            let (Some(a), "/32 host LOCAL") = (pair[0].strip_prefix("|-- "), pair[1]) else { continue };
            let Ok(a) = a.parse::<Ipv4Addr>() else { continue };
            assert!(is_local(IpAddr::V4(a)), "{a} is listed as local in /proc/net/fib_trie");
        }
        let own = [bind("[::]:3130")];
        assert!(is_own(&own, ip("::ffff:127.0.0.1"), 3130));
        assert!(is_own(&own, ip("127.0.0.9"), 3130));
        assert!(!is_own(&own, ip("203.0.113.254"), 3130));
    }
}
