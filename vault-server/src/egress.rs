//! The egress policy for *derived* URLs: those the vault learned from a response (a discovery
//! document's endpoints) rather than from its operator. Whoever controls such a response chooses
//! where the vault connects next, from inside the perimeter; this module decides whether an
//! address is one the vault may be sent to. It is pure: [`crate::http`] applies it in its DNS
//! resolver (every resolved address) and to IP-literal hosts (which never reach a resolver).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;

/// Why an address is not a public destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// 127.0.0.0/8, ::1.
    Loopback,
    /// RFC 1918: 10/8, 172.16/12, 192.168/16.
    Private,
    /// 169.254.0.0/16 (cloud metadata lives here), fe80::/10.
    LinkLocal,
    /// RFC 6598 carrier-grade NAT, 100.64.0.0/10.
    SharedAddressSpace,
    /// fc00::/7.
    UniqueLocal,
    /// fec0::/10, deprecated but still routed inside some networks.
    SiteLocal,
    /// 224.0.0.0/4, ff00::/8.
    Multicast,
    /// 0.0.0.0, ::.
    Unspecified,
    /// 255.255.255.255.
    Broadcast,
    /// 0.0.0.0/8: "this network"; connecting to it reaches the local host on some systems.
    ThisNetwork,
    /// 192.0.2/24, 198.51.100/24, 203.0.113/24, 2001:db8::/32.
    Documentation,
    /// 198.18.0.0/15, 2001:2::/48.
    Benchmarking,
    /// 240.0.0.0/4, 192.0.0.0/24, 100::/64 and other special-purpose blocks.
    Reserved,
    /// 64:ff9b:1::/48 (RFC 8215): translated by a local NAT64 to anywhere inside.
    LocalNat64,
    /// ::/96 other than :: and ::1 (RFC 4291 §2.5.5.1, deprecated).
    Ipv4Compatible,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Loopback => "is loopback",
            Self::Private => "is private (RFC 1918)",
            Self::LinkLocal => "is link-local",
            Self::SharedAddressSpace => "is carrier-grade NAT (RFC 6598)",
            Self::UniqueLocal => "is unique-local",
            Self::SiteLocal => "is site-local",
            Self::Multicast => "is multicast",
            Self::Unspecified => "is unspecified",
            Self::Broadcast => "is broadcast",
            Self::ThisNetwork => "is in 0.0.0.0/8",
            Self::Documentation => "is a documentation address",
            Self::Benchmarking => "is a benchmarking address",
            Self::Reserved => "is reserved",
            Self::LocalNat64 => "is local-use NAT64",
            Self::Ipv4Compatible => "is IPv4-compatible (deprecated)",
        })
    }
}

/// Why an IPv4 address may not be a derived destination, or `None` when it is public.
fn classify_v4(ip: Ipv4Addr) -> Option<Rule> {
    let [a, b, c, _] = ip.octets();
    Some(match (a, b, c) {
        _ if ip.is_unspecified() => Rule::Unspecified,
        _ if ip.is_broadcast() => Rule::Broadcast,
        (0, _, _) => Rule::ThisNetwork,
        (127, _, _) => Rule::Loopback,
        (10, _, _) | (192, 168, _) => Rule::Private,
        (172, 16..=31, _) => Rule::Private,
        (169, 254, _) => Rule::LinkLocal,
        (100, 64..=127, _) => Rule::SharedAddressSpace,
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => Rule::Documentation,
        (198, 18..=19, _) => Rule::Benchmarking,
        (224..=239, _, _) => Rule::Multicast,
        (240..=255, _, _) => Rule::Reserved,
        // IETF protocol assignments (RFC 6890) and the deprecated 6to4 relay anycast.
        (192, 0, 0) | (192, 88, 99) => Rule::Reserved,
        _ => return None,
    })
}

/// Why an IPv6 address may not be a derived destination, or `None` when it is public. Forms
/// that carry an IPv4 address (mapped, NAT64, 6to4, Teredo) are judged by that address: the
/// packet ends up there.
fn classify_v6(ip: Ipv6Addr) -> Option<Rule> {
    let s = ip.segments();
    let low32 = Ipv4Addr::from(u128::from(ip) as u32);
    if ip.is_unspecified() {
        return Some(Rule::Unspecified);
    }
    if ip.is_loopback() {
        return Some(Rule::Loopback);
    }
    // ::ffff:0:0/96, IPv4-mapped.
    if let Some(v4) = ip.to_ipv4_mapped() {
        return classify_v4(v4);
    }
    match s {
        // ::/96, IPv4-compatible: deprecated, and some stacks still translate it.
        [0, 0, 0, 0, 0, 0, _, _] => Some(Rule::Ipv4Compatible),
        // 64:ff9b::/96, the well-known NAT64 prefix (RFC 6052).
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => classify_v4(low32),
        [0x64, 0xff9b, 1, ..] => Some(Rule::LocalNat64),
        // 100::/64, discard-only (RFC 6666).
        [0x100, 0, 0, 0, ..] => Some(Rule::Reserved),
        // 2001::/32, Teredo: the client's IPv4 address, inverted, in the last 32 bits.
        [0x2001, 0, ..] => classify_v4(Ipv4Addr::from(!(u128::from(ip) as u32))),
        [0x2001, 2, 0, ..] => Some(Rule::Benchmarking),
        [0x2001, 0xdb8, ..] => Some(Rule::Documentation),
        // 2002::/16, 6to4: the IPv4 address in bits 16..48.
        [0x2002, hi, lo, ..] => classify_v4(Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo))),
        [first, ..] if first & 0xfe00 == 0xfc00 => Some(Rule::UniqueLocal),
        [first, ..] if first & 0xffc0 == 0xfe80 => Some(Rule::LinkLocal),
        [first, ..] if first & 0xffc0 == 0xfec0 => Some(Rule::SiteLocal),
        [first, ..] if first & 0xff00 == 0xff00 => Some(Rule::Multicast),
        _ => None,
    }
}

/// Why `ip` is not a public address, or `None` when it is.
pub fn classify(ip: IpAddr) -> Option<Rule> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

/// `VAULT_EGRESS_ALLOW_CIDRS`: the non-public ranges a derived URL may still reach; and
/// `VAULT_EGRESS_HOSTS`: fixed answers for names in derived URLs, screened like DNS answers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EgressPolicy {
    allow: Vec<IpNet>,
    hosts: std::collections::BTreeMap<String, Vec<IpAddr>>,
}

impl EgressPolicy {
    /// Parses comma-separated CIDRs; blank is no exception. A bare address is not accepted:
    /// the prefix length says how much the operator meant to open.
    pub fn parse(text: &str) -> Result<Self, String> {
        let allow = text
            .split(',')
            .map(str::trim)
            .filter(|part| !part.is_empty())
            .map(|part| {
                part.parse::<IpNet>()
                    .map_err(|_| format!("{part:?} is not a CIDR such as 10.0.0.0/8 or ::1/128"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            allow,
            hosts: Default::default(),
        })
    }

    /// Adds fixed answers, `name=address` comma-separated (a name may repeat for several
    /// addresses): a derived URL naming the host connects to those, after screening, without a
    /// DNS query. For pinned names and for tests.
    pub fn with_hosts(mut self, text: &str) -> Result<Self, String> {
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, address) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?} is not name=address"))?;
            let name = name.trim().trim_end_matches('.').to_ascii_lowercase();
            if name.is_empty() || name.parse::<IpAddr>().is_ok() {
                return Err(format!("{part:?}: the name must be a host name"));
            }
            let address: IpAddr = address
                .trim()
                .parse()
                .map_err(|_| format!("{part:?}: {address:?} is not an IP address"))?;
            self.hosts.entry(name).or_default().push(address);
        }
        Ok(self)
    }

    /// The fixed answer for `name`, if one is configured.
    pub fn pinned(&self, name: &str) -> Option<Vec<SocketAddr>> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        self.hosts
            .get(&name)
            .map(|addrs| addrs.iter().map(|ip| SocketAddr::new(*ip, 0)).collect())
    }

    /// Whether `ip` may be connected to for a derived URL: public, or inside an allowed CIDR.
    /// An IPv4-mapped address is also matched by its IPv4 form, which is where it connects.
    pub fn refusal(&self, ip: IpAddr) -> Option<Rule> {
        let rule = classify(ip)?;
        let mapped = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4),
            IpAddr::V4(_) => None,
        };
        let allowed = self
            .allow
            .iter()
            .any(|net| net.contains(&ip) || mapped.is_some_and(|m| net.contains(&m)));
        (!allowed).then_some(rule)
    }

    /// The addresses a host resolved to, when each may be connected to; otherwise the first
    /// refused.
    /// One refused address refuses the host: a name that answers both a public and a private
    /// address is how DNS rebinding is staged.
    pub fn screen(&self, addrs: Vec<SocketAddr>) -> Result<Vec<SocketAddr>, Refused> {
        if let Some((addr, rule)) = addrs
            .iter()
            .find_map(|a| self.refusal(a.ip()).map(|rule| (a.ip(), rule)))
        {
            return Err(Refused::Address { addr, rule });
        }
        if addrs.is_empty() {
            return Err(Refused::NoAddress);
        }
        Ok(addrs)
    }

    /// The checks a derived URL passes before any connection: `https`, no user info, a host,
    /// and an IP-literal host allowed (a name is checked when it is resolved).
    pub fn check_url(&self, url: &url::Url) -> Result<(), Refused> {
        if url.scheme() != "https" {
            return Err(Refused::NotHttps);
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(Refused::UserInfo);
        }
        let ip = match url.host() {
            None => return Err(Refused::NoAddress),
            Some(url::Host::Domain(_)) => return Ok(()),
            Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip),
            Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip),
        };
        match self.refusal(ip) {
            Some(rule) => Err(Refused::Address { addr: ip, rule }),
            None => Ok(()),
        }
    }
}

/// Why a derived URL was not fetched. Its text follows "authorization server ".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// Derived URLs must be `https`.
    #[error("URL is not https")]
    NotHttps,
    /// `user@host` hides the real host from readers of the URL.
    #[error("URL carries user info")]
    UserInfo,
    /// The host has no address (or no host at all).
    #[error("host has no address")]
    NoAddress,
    /// An address of the host is not public and not allowed.
    #[error("address {addr} {rule}")]
    Address {
        /// The refused address.
        addr: IpAddr,
        /// Which rule refused it.
        rule: Rule,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(text: &str) -> Option<Rule> {
        classify(text.parse().expect("the table holds addresses"))
    }

    #[test]
    fn every_refused_range_and_its_edges_are_classified() {
        use Rule::*;
        let table: &[(&str, Option<Rule>)] = &[
            ("0.0.0.0", Some(Unspecified)),
            ("0.0.0.1", Some(ThisNetwork)),
            ("0.255.255.255", Some(ThisNetwork)),
            ("1.0.0.0", None),
            ("9.255.255.255", None),
            ("10.0.0.0", Some(Private)),
            ("10.255.255.255", Some(Private)),
            ("11.0.0.0", None),
            ("100.63.255.255", None),
            ("100.64.0.0", Some(SharedAddressSpace)),
            ("100.127.255.255", Some(SharedAddressSpace)),
            ("100.128.0.0", None),
            ("126.255.255.255", None),
            ("127.0.0.0", Some(Loopback)),
            ("127.0.0.2", Some(Loopback)),
            ("127.255.255.255", Some(Loopback)),
            ("128.0.0.0", None),
            ("169.253.255.255", None),
            ("169.254.0.0", Some(LinkLocal)),
            ("169.254.169.254", Some(LinkLocal)),
            ("169.254.255.255", Some(LinkLocal)),
            ("169.255.0.0", None),
            ("172.15.255.255", None),
            ("172.16.0.0", Some(Private)),
            ("172.31.255.255", Some(Private)),
            ("172.32.0.0", None),
            ("192.0.0.0", Some(Reserved)),
            ("192.0.0.255", Some(Reserved)),
            ("192.0.1.255", None),
            ("192.0.2.0", Some(Documentation)),
            ("192.0.2.255", Some(Documentation)),
            ("192.0.3.0", None),
            ("192.88.99.1", Some(Reserved)),
            ("192.167.255.255", None),
            ("192.168.0.0", Some(Private)),
            ("192.168.255.255", Some(Private)),
            ("192.169.0.0", None),
            ("198.17.255.255", None),
            ("198.18.0.0", Some(Benchmarking)),
            ("198.19.255.255", Some(Benchmarking)),
            ("198.20.0.0", None),
            ("198.51.99.255", None),
            ("198.51.100.0", Some(Documentation)),
            ("198.51.100.255", Some(Documentation)),
            ("198.51.101.0", None),
            ("203.0.112.255", None),
            ("203.0.113.0", Some(Documentation)),
            ("203.0.113.255", Some(Documentation)),
            ("203.0.114.0", None),
            ("223.255.255.255", None),
            ("224.0.0.0", Some(Multicast)),
            ("239.255.255.255", Some(Multicast)),
            ("240.0.0.0", Some(Reserved)),
            ("255.255.255.254", Some(Reserved)),
            ("255.255.255.255", Some(Broadcast)),
            ("8.8.8.8", None),
            // IPv6.
            ("::", Some(Unspecified)),
            ("::1", Some(Loopback)),
            ("::2", Some(Ipv4Compatible)),
            ("::7f00:1", Some(Ipv4Compatible)),
            ("::1:0:0:0", None),
            ("fbff:ffff::", None),
            ("fc00::", Some(UniqueLocal)),
            ("fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", Some(UniqueLocal)),
            ("fe00::", None),
            ("fe7f:ffff::", None),
            ("fe80::", Some(LinkLocal)),
            ("febf:ffff::1", Some(LinkLocal)),
            ("fec0::", Some(SiteLocal)),
            ("feff:ffff::1", Some(SiteLocal)),
            ("ff00::", Some(Multicast)),
            ("ff02::1", Some(Multicast)),
            ("2001:db7:ffff::", None),
            ("2001:db8::", Some(Documentation)),
            ("2001:db8:ffff:ffff::1", Some(Documentation)),
            ("2001:db9::", None),
            ("2001:2::", Some(Benchmarking)),
            ("2001:2:0:ffff::1", Some(Benchmarking)),
            ("2001:2:1::", None),
            ("100::", Some(Reserved)),
            ("100::ffff:ffff:ffff:ffff", Some(Reserved)),
            ("100:0:0:1::", None),
            ("2606:4700:4700::1111", None),
            // IPv4-mapped: judged by the IPv4 address.
            ("::ffff:127.0.0.1", Some(Loopback)),
            ("::ffff:169.254.169.254", Some(LinkLocal)),
            ("::ffff:10.1.2.3", Some(Private)),
            ("::ffff:100.64.0.1", Some(SharedAddressSpace)),
            ("::ffff:0.0.0.0", Some(Unspecified)),
            ("::ffff:198.18.0.1", Some(Benchmarking)),
            ("::ffff:8.8.8.8", None),
            // NAT64, well-known prefix: judged by the IPv4 address.
            ("64:ff9b::127.0.0.1", Some(Loopback)),
            ("64:ff9b::a9fe:a9fe", Some(LinkLocal)),
            ("64:ff9b::192.168.0.1", Some(Private)),
            ("64:ff9b::203.0.113.7", Some(Documentation)),
            ("64:ff9b::8.8.8.8", None),
            ("64:ff9b:1::", Some(LocalNat64)),
            ("64:ff9b:1:ffff::8.8.8.8", Some(LocalNat64)),
            // 6to4 and Teredo embedding a private address.
            ("2002:a00:1::", Some(Private)),
            ("2002:7f00:1::", Some(Loopback)),
            ("2002:808:808::", None),
            // Teredo client 127.0.0.1, inverted: 80ff:fffe.
            ("2001:0:4136:e378:8000:63bf:80ff:fffe", Some(Loopback)),
            ("2001:0:4136:e378:8000:63bf:f7f7:f7f7", None),
        ];
        for (address, expected) in table {
            assert_eq!(rule(address), *expected, "{address}");
        }
    }

    #[test]
    fn an_allowed_cidr_lets_its_addresses_through_and_nothing_else() {
        let policy = EgressPolicy::parse("127.0.0.0/8, ::1/128").unwrap();
        let refused = |ip: &str| policy.refusal(ip.parse().unwrap());
        assert_eq!(refused("127.0.0.2"), None);
        assert_eq!(refused("::1"), None);
        assert_eq!(refused("::ffff:127.0.0.1"), None);
        assert_eq!(refused("10.0.0.1"), Some(Rule::Private));
        assert_eq!(refused("169.254.169.254"), Some(Rule::LinkLocal));
        assert_eq!(refused("::2"), Some(Rule::Ipv4Compatible));
        let none = EgressPolicy::parse("").unwrap();
        assert_eq!(none, EgressPolicy::default());
        assert_eq!(
            none.refusal("127.0.0.1".parse().unwrap()),
            Some(Rule::Loopback)
        );
    }

    #[test]
    fn a_malformed_cidr_is_refused_naming_it() {
        for bad in [
            "127.0.0.1",
            "10.0.0.0/33",
            "::1/129",
            "localhost/8",
            "10.0.0.0/8,x",
        ] {
            let err = EgressPolicy::parse(bad).expect_err(bad);
            assert!(err.contains("is not a CIDR"), "{bad}: {err}");
        }
    }

    #[test]
    fn one_refused_address_refuses_the_whole_host() {
        let policy = EgressPolicy::default();
        let addr = |s: &str| -> SocketAddr { s.parse().unwrap() };
        let public = vec![addr("93.184.215.14:443"), addr("[2606:2800:21f::1]:443")];
        assert_eq!(policy.screen(public.clone()), Ok(public.clone()));
        let mixed = vec![public[0], addr("127.0.0.1:443")];
        assert_eq!(
            policy.screen(mixed).unwrap_err().to_string(),
            "address 127.0.0.1 is loopback"
        );
        assert_eq!(policy.screen(vec![]), Err(Refused::NoAddress));
    }

    /// What the URL parser makes of spellings that hide an address, and what the check then says.
    #[test]
    fn urls_are_judged_on_the_host_the_parser_finds() {
        let policy = EgressPolicy::default();
        type Row<'a> = (&'a str, Option<url::Host<&'a str>>, Result<(), &'a str>);
        let table: &[Row] = &[
            (
                "https://2130706433/",
                Some(url::Host::Ipv4(Ipv4Addr::LOCALHOST)),
                Err("address 127.0.0.1 is loopback"),
            ),
            (
                "https://0177.0.0.1/",
                Some(url::Host::Ipv4(Ipv4Addr::LOCALHOST)),
                Err("address 127.0.0.1 is loopback"),
            ),
            (
                "https://0x7f.1/",
                Some(url::Host::Ipv4(Ipv4Addr::LOCALHOST)),
                Err("address 127.0.0.1 is loopback"),
            ),
            (
                "https://169.254.169.254./latest",
                Some(url::Host::Ipv4(Ipv4Addr::new(169, 254, 169, 254))),
                Err("address 169.254.169.254 is link-local"),
            ),
            (
                "https://[::1]:8443/",
                Some(url::Host::Ipv6(Ipv6Addr::LOCALHOST)),
                Err("address ::1 is loopback"),
            ),
            (
                "https://[::ffff:a9fe:a9fe]/",
                Some(url::Host::Ipv6("::ffff:169.254.169.254".parse().unwrap())),
                Err("address ::ffff:169.254.169.254 is link-local"),
            ),
            (
                "https://[64:ff9b::a00:1]/",
                Some(url::Host::Ipv6("64:ff9b::10.0.0.1".parse().unwrap())),
                Err("address 64:ff9b::a00:1 is private (RFC 1918)"),
            ),
            // A name goes to the resolver, which screens every address it finds.
            (
                "https://localhost./",
                Some(url::Host::Domain("localhost.")),
                Ok(()),
            ),
            (
                "https://issuer.example./token",
                Some(url::Host::Domain("issuer.example.")),
                Ok(()),
            ),
            (
                "https://localhost@evil.example/",
                Some(url::Host::Domain("evil.example")),
                Err("URL carries user info"),
            ),
            (
                "http://2130706433/",
                Some(url::Host::Ipv4(Ipv4Addr::LOCALHOST)),
                Err("URL is not https"),
            ),
            (
                "http://localhost@evil.example/",
                Some(url::Host::Domain("evil.example")),
                Err("URL is not https"),
            ),
            (
                "https://8.8.8.8/",
                Some(url::Host::Ipv4(Ipv4Addr::new(8, 8, 8, 8))),
                Ok(()),
            ),
        ];
        for (text, host, expected) in table {
            let url = url::Url::parse(text).expect(text);
            assert_eq!(url.host(), *host, "{text}");
            let got = policy.check_url(&url).map_err(|e| e.to_string());
            assert_eq!(got, expected.map_err(str::to_string), "{text}");
        }
    }

    #[test]
    fn pinned_hosts_answer_without_dns_and_are_screened_like_dns() {
        let policy = EgressPolicy::parse("")
            .unwrap()
            .with_hosts("as.test.invalid=127.0.0.1, AS.test.invalid=::1,public.example.=8.8.8.8")
            .unwrap();
        let pinned = policy.pinned("as.test.invalid.").unwrap();
        assert_eq!(pinned.len(), 2);
        assert!(matches!(
            policy.screen(pinned),
            Err(Refused::Address { .. })
        ));
        assert!(
            policy
                .screen(policy.pinned("public.example").unwrap())
                .is_ok()
        );
        assert_eq!(policy.pinned("other.example"), None);
        for bad in [
            "as.test",
            "=127.0.0.1",
            "x=localhost",
            "127.0.0.1=127.0.0.1",
        ] {
            assert!(
                EgressPolicy::parse("").unwrap().with_hosts(bad).is_err(),
                "{bad}"
            );
        }
    }
}
