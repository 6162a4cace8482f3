//! The address guard: which addresses no sandbox may reach unless a policy's `allow_ips` names them.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A range the guard refuses, named so a refusal can say which and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BlockedRange {
    Unspecified,
    Loopback,
    Private,
    LinkLocal,
    SharedAddressSpace,
    Broadcast,
    Multicast,
    Documentation,
    Benchmarking,
    Reserved,
    ProtocolAssignments,
    UniqueLocal,
    SiteLocal,
    Discard,
}

impl BlockedRange {
    pub fn as_str(self) -> &'static str {
        match self {
            BlockedRange::Unspecified => "unspecified address",
            BlockedRange::Loopback => "loopback address",
            BlockedRange::Private => "private address (RFC 1918)",
            BlockedRange::LinkLocal => "link-local address (cloud metadata lives here)",
            BlockedRange::SharedAddressSpace => "carrier-grade NAT address (100.64.0.0/10)",
            BlockedRange::Broadcast => "broadcast address",
            BlockedRange::Multicast => "multicast address",
            BlockedRange::Documentation => "documentation address",
            BlockedRange::Benchmarking => "benchmarking address (198.18.0.0/15)",
            BlockedRange::Reserved => "reserved address",
            BlockedRange::ProtocolAssignments => "IETF protocol assignment address (192.0.0.0/24)",
            BlockedRange::UniqueLocal => "unique local address (fc00::/7)",
            BlockedRange::SiteLocal => "site-local address (fec0::/10)",
            BlockedRange::Discard => "discard-only address (100::/64)",
        }
    }
}

impl fmt::Display for BlockedRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Classifies an address: `Some(range)` when the guard refuses it. IPv6 forms that embed an IPv4
/// address (mapped, compatible, NAT64, 6to4, Teredo) are judged by the address they carry, and refused
/// outright where the embedded address cannot be trusted to be what the packet reaches.
pub fn classify(ip: IpAddr) -> Option<BlockedRange> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> Option<BlockedRange> {
    let o = ip.octets();
    let range = match o {
        [0, 0, 0, 0] => BlockedRange::Unspecified,
        [0, ..] => BlockedRange::Reserved, // "this network"
        [127, ..] => BlockedRange::Loopback,
        [10, ..] | [172, 16..=31, ..] | [192, 168, ..] => BlockedRange::Private,
        [169, 254, ..] => BlockedRange::LinkLocal,
        [100, 64..=127, ..] => BlockedRange::SharedAddressSpace,
        [192, 0, 0, _] => BlockedRange::ProtocolAssignments,
        [192, 0, 2, _] | [198, 51, 100, _] | [203, 0, 113, _] => BlockedRange::Documentation,
        [198, 18..=19, ..] => BlockedRange::Benchmarking,
        [255, 255, 255, 255] => BlockedRange::Broadcast,
        [224..=239, ..] => BlockedRange::Multicast,
        [240..=255, ..] => BlockedRange::Reserved,
        // 6to4 relay anycast: traffic to it leaves for an unknown host.
        [192, 88, 99, _] => BlockedRange::Reserved,
        _ => return None,
    };
    Some(range)
}

fn classify_v6(ip: Ipv6Addr) -> Option<BlockedRange> {
    let s = ip.segments();
    if ip.is_unspecified() {
        return Some(BlockedRange::Unspecified);
    }
    if ip.is_loopback() {
        return Some(BlockedRange::Loopback);
    }
    // ::ffff:a.b.c.d (mapped) and ::a.b.c.d (deprecated compatible): the embedded IPv4 address decides,
    // and a compatible address is refused whatever it carries (no sane destination uses the form).
    if let Some(v4) = ip.to_ipv4_mapped() {
        return classify_v4(v4);
    }
    if s[..6] == [0, 0, 0, 0, 0, 0] {
        return Some(BlockedRange::Reserved);
    }
    // ::ffff:0:a.b.c.d (SIIT translated).
    if s[..6] == [0, 0, 0, 0, 0xffff, 0] {
        return Some(BlockedRange::Reserved);
    }
    // NAT64 64:ff9b::/96 and the local-use 64:ff9b:1::/48: the gateway dials the embedded address.
    if s[0] == 0x64 && s[1] == 0xff9b {
        if s[2..6] == [0, 0, 0, 0] {
            let v4 = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
            return classify_v4(v4);
        }
        return Some(BlockedRange::Reserved);
    }
    // 6to4 (2002::/16) and Teredo (2001::/32) tunnel to addresses that are not what they seem.
    if s[0] == 0x2002 || (s[0] == 0x2001 && s[1] == 0) {
        return Some(BlockedRange::Reserved);
    }
    let range = match s[0] {
        0x0100 if s[1..4] == [0, 0, 0] => BlockedRange::Discard,
        0x2001 if s[1] == 0xdb8 => BlockedRange::Documentation,
        0x3fff if s[1] <= 0x0fff => BlockedRange::Documentation,
        0x2001 if s[1] == 0x0002 && s[2] == 0 => BlockedRange::Benchmarking,
        0x2001 if s[1] < 0x0200 => BlockedRange::ProtocolAssignments,
        x if x & 0xfe00 == 0xfc00 => BlockedRange::UniqueLocal,
        x if x & 0xffc0 == 0xfe80 => BlockedRange::LinkLocal,
        x if x & 0xffc0 == 0xfec0 => BlockedRange::SiteLocal,
        x if x & 0xff00 == 0xff00 => BlockedRange::Multicast,
        _ => return None,
    };
    Some(range)
}

/// Names refused before DNS: they resolve to the machine itself or to a cloud metadata service
/// whatever the resolver says.
pub fn blocked_name(name: &str) -> Option<BlockedRange> {
    const METADATA: [&str; 3] = ["metadata.google.internal", "metadata.goog", "instance-data.ec2.internal"];
    if name == "localhost" || name.ends_with(".localhost") {
        return Some(BlockedRange::Loopback);
    }
    if METADATA.contains(&name) {
        return Some(BlockedRange::LinkLocal);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Option<BlockedRange> {
        classify(s.parse().unwrap())
    }

    #[test]
    fn ipv4_ranges() {
        assert_eq!(c("127.0.0.1"), Some(BlockedRange::Loopback));
        assert_eq!(c("10.0.0.5"), Some(BlockedRange::Private));
        assert_eq!(c("172.16.0.1"), Some(BlockedRange::Private));
        assert_eq!(c("172.31.255.255"), Some(BlockedRange::Private));
        assert_eq!(c("172.32.0.1"), None);
        assert_eq!(c("192.168.1.1"), Some(BlockedRange::Private));
        assert_eq!(c("169.254.169.254"), Some(BlockedRange::LinkLocal));
        assert_eq!(c("100.64.0.1"), Some(BlockedRange::SharedAddressSpace));
        assert_eq!(c("100.128.0.1"), None);
        assert_eq!(c("0.0.0.0"), Some(BlockedRange::Unspecified));
        assert_eq!(c("255.255.255.255"), Some(BlockedRange::Broadcast));
        assert_eq!(c("224.0.0.1"), Some(BlockedRange::Multicast));
        assert_eq!(c("192.0.2.1"), Some(BlockedRange::Documentation));
        assert_eq!(c("198.18.0.1"), Some(BlockedRange::Benchmarking));
        assert_eq!(c("140.82.112.3"), None);
        assert_eq!(c("8.8.8.8"), None);
    }

    #[test]
    fn ipv6_ranges_and_embedded_ipv4() {
        assert_eq!(c("::1"), Some(BlockedRange::Loopback));
        assert_eq!(c("::"), Some(BlockedRange::Unspecified));
        assert_eq!(c("::ffff:127.0.0.1"), Some(BlockedRange::Loopback));
        assert_eq!(c("::ffff:169.254.169.254"), Some(BlockedRange::LinkLocal));
        assert_eq!(c("::ffff:8.8.8.8"), None);
        assert_eq!(c("::127.0.0.1"), Some(BlockedRange::Reserved));
        assert_eq!(c("64:ff9b::10.0.0.1"), Some(BlockedRange::Private));
        assert_eq!(c("64:ff9b::a9fe:a9fe"), Some(BlockedRange::LinkLocal));
        assert_eq!(c("2002:7f00:1::"), Some(BlockedRange::Reserved));
        assert_eq!(c("2001:0:4136:e378::"), Some(BlockedRange::Reserved));
        assert_eq!(c("fe80::1"), Some(BlockedRange::LinkLocal));
        assert_eq!(c("fd00::1"), Some(BlockedRange::UniqueLocal));
        assert_eq!(c("fc00::1"), Some(BlockedRange::UniqueLocal));
        assert_eq!(c("ff02::1"), Some(BlockedRange::Multicast));
        assert_eq!(c("2001:db8::1"), Some(BlockedRange::Documentation));
        assert_eq!(c("2606:4700::1111"), None);
    }

    #[test]
    fn names_refused_before_dns() {
        assert_eq!(blocked_name("localhost"), Some(BlockedRange::Loopback));
        assert_eq!(blocked_name("a.localhost"), Some(BlockedRange::Loopback));
        assert_eq!(blocked_name("metadata.google.internal"), Some(BlockedRange::LinkLocal));
        assert_eq!(blocked_name("notlocalhost"), None);
    }
}
