//! Client addresses: CIDR blocks, which proxies' `X-Forwarded-For` is believed, and the key
//! that per-address limits count under. Pure functions, so the rules are tested without
//! sockets.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use ipnet::IpNet;

/// An address block such as `10.0.0.0/8` or `fd00::/8`; a bare address is a block of one.
/// The block arithmetic is `ipnet`'s; what is added here is the bare address and treating a
/// v4-mapped IPv6 peer as the IPv4 address it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr(IpNet);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("not an IP address or CIDR block (e.g. 10.0.0.0/8, fd00::/8, 127.0.0.1)")]
    Address,
    #[error("prefix length must be 0 to {0}")]
    Prefix(u8),
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let Some((addr, _)) = s.split_once('/') else {
            let ip: IpAddr = s.parse().map_err(|_| CidrError::Address)?;
            return Ok(Self(IpNet::from(ip)));
        };
        // ipnet's error does not say which half is wrong; the address alone tells.
        s.parse()
            .map(Self)
            .map_err(|_| match addr.parse::<IpAddr>() {
                Ok(IpAddr::V4(_)) => CidrError::Prefix(32),
                Ok(IpAddr::V6(_)) => CidrError::Prefix(128),
                Err(_) => CidrError::Address,
            })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.contains(&canonical(ip))
    }
}

/// An IPv4 peer on a dual-stack socket shows as `::ffff:a.b.c.d`; it is the IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The client's address: the peer, unless the peer is a trusted proxy, in which case the
/// `X-Forwarded-For` chain is read from the right (the hop nearest to us) and the first
/// address that is not itself a trusted proxy is the client. Entries a client wrote itself sit
/// to the left of that and are never believed. A chain that cannot be read names nobody, so
/// the proxy's own address is used.
pub fn client_addr<'h>(
    peer: IpAddr,
    forwarded_for: impl DoubleEndedIterator<Item = &'h str>,
    trusted: &[Cidr],
) -> IpAddr {
    let peer = canonical(peer);
    if !trusted.iter().any(|c| c.contains(peer)) {
        return peer;
    }
    let mut client = peer;
    for header in forwarded_for.rev() {
        for entry in header.rsplit(',') {
            let Some(ip) = parse_forwarded_entry(entry) else {
                return client;
            };
            client = canonical(ip);
            if !trusted.iter().any(|c| c.contains(client)) {
                return client;
            }
        }
    }
    client
}

/// One `X-Forwarded-For` entry: an address, possibly `[v6]` or with a port.
fn parse_forwarded_entry(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    if let Ok(ip) = entry.parse() {
        return Some(ip);
    }
    if let Some(rest) = entry.strip_prefix('[') {
        return rest.split(']').next()?.parse().ok();
    }
    entry
        .rsplit_once(':')
        .and_then(|(host, _port)| host.parse::<Ipv4Addr>().ok().map(IpAddr::V4))
}

/// What per-address limits count under: an IPv4 address, or an IPv6 /64 (one customer's
/// network: a client on IPv6 usually holds a whole /64 and could otherwise rotate freely).
pub fn limit_key(ip: IpAddr) -> IpAddr {
    match canonical(ip) {
        IpAddr::V6(v6) => {
            let net = u128::from(v6) & (u128::MAX << 64);
            IpAddr::V6(Ipv6Addr::from(net))
        }
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn cidrs(list: &[&str]) -> Vec<Cidr> {
        list.iter().map(|c| c.parse().unwrap()).collect()
    }

    #[test]
    fn blocks_parse_and_contain() {
        let c: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(c.contains(ip("10.1.200.3")));
        assert!(!c.contains(ip("10.2.0.1")));
        assert!(c.contains(ip("::ffff:10.1.0.9")), "v4-mapped peers count");
        let one: Cidr = "127.0.0.2".parse().unwrap();
        assert!(one.contains(ip("127.0.0.2")) && !one.contains(ip("127.0.0.3")));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("8.8.8.8")));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains(ip("fd12::1")) && !v6.contains(ip("fe80::1")));
        assert_eq!("10.0.0.0/33".parse::<Cidr>(), Err(CidrError::Prefix(32)));
        assert_eq!("proxy.local".parse::<Cidr>(), Err(CidrError::Address));
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_forwards() {
        let trusted = cidrs(&["10.0.0.0/8"]);
        let got = client_addr(ip("203.0.113.9"), ["1.2.3.4"].into_iter(), &trusted);
        assert_eq!(got, ip("203.0.113.9"));
        let got = client_addr(ip("203.0.113.9"), ["1.2.3.4"].into_iter(), &[]);
        assert_eq!(got, ip("203.0.113.9"), "no trusted proxies: never believed");
    }

    #[test]
    fn a_trusted_chain_is_read_from_the_right() {
        let trusted = cidrs(&["10.0.0.0/8"]);
        // The client wrote "6.6.6.6" itself; the ingress appended the real address.
        let chain = ["6.6.6.6, 198.51.100.7", "10.0.0.5"];
        let got = client_addr(ip("10.0.0.9"), chain.into_iter(), &trusted);
        assert_eq!(got, ip("198.51.100.7"));
        let got = client_addr(
            ip("10.0.0.9"),
            ["[2001:db8::1]:443", "198.51.100.7:5000"].into_iter(),
            &trusted,
        );
        assert_eq!(got, ip("198.51.100.7"));
    }

    #[test]
    fn a_chain_of_only_proxies_or_garbage_falls_back_to_the_nearest_known_hop() {
        let trusted = cidrs(&["10.0.0.0/8"]);
        assert_eq!(
            client_addr(ip("10.0.0.9"), ["10.0.0.1"].into_iter(), &trusted),
            ip("10.0.0.1")
        );
        assert_eq!(
            client_addr(ip("10.0.0.9"), ["nonsense"].into_iter(), &trusted),
            ip("10.0.0.9")
        );
        assert_eq!(
            client_addr(ip("10.0.0.9"), std::iter::empty(), &trusted),
            ip("10.0.0.9")
        );
    }

    #[test]
    fn ipv6_clients_are_limited_per_64() {
        assert_eq!(
            limit_key(ip("2001:db8:1:2:aaaa::1")),
            limit_key(ip("2001:db8:1:2:bbbb::9"))
        );
        assert_ne!(
            limit_key(ip("2001:db8:1:2::1")),
            limit_key(ip("2001:db8:1:3::1"))
        );
        assert_eq!(limit_key(ip("::ffff:127.0.0.2")), ip("127.0.0.2"));
    }
}
