//! Where the service may send requests. What is refused everywhere, whatever the operator
//! says, is the link-local range, where cloud metadata services answer (169.254.169.254 hands
//! out the machine's credentials; Alibaba Cloud's 100.100.100.200, Azure's WireServer
//! 168.63.129.16 and AWS's fd00:ec2::254 as well): no connector, base URL or webhook may point
//! there, whether by an IP literal, an IPv6 form carrying such an IPv4 address, or a name that
//! resolves to it.
//!
//! Beyond that, an operator may refuse ranges ([`Policy`], `serve --egress-deny`): in a
//! service shared by organizations that do not trust each other, `private` keeps a tenant's
//! connector, `base.url` or webhook from reaching the service's own loopback and the private
//! network (the proxy hands the answer back). By default loopback and private networks stay
//! reachable: organizations' own OAuth servers, and the sandbox, often live there;
//! `--egress-allow` takes ranges back out of the refused ones (an in-house server's subnet).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// The ranges an operator refuses (`--egress-deny`) and takes back (`--egress-allow`), on top
/// of the addresses refused always ([`forbidden`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    deny: Vec<Range>,
    allow: Vec<Range>,
}

/// One CIDR range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Range {
    network: IpAddr,
    prefix: u8,
}

/// What `private` stands for: loopback, RFC 1918, shared address space (RFC 6598), the
/// benchmarking range, IPv6 loopback and unique local addresses.
const PRIVATE: &[&str] = &[
    "127.0.0.0/8",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "198.18.0.0/15",
    "::1/128",
    "fc00::/7",
];

impl Range {
    fn parse(text: &str) -> Result<Range, String> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let network: IpAddr = address
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .map_err(|_| format!("`{text}` is not an IP address or a CIDR range"))?;
        let width = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(prefix) => prefix
                .parse::<u8>()
                .ok()
                .filter(|prefix| *prefix <= width)
                .ok_or_else(|| format!("`{text}`: the prefix length must be 0 to {width}"))?,
            None => width,
        };
        // An IPv4-mapped network (`::ffff:10.0.0.0/104`) is that IPv4 network (`10.0.0.0/8`).
        let canonical_network = canonical(network);
        let prefix = if canonical_network.is_ipv4() && network.is_ipv6() {
            prefix.checked_sub(96).ok_or_else(|| {
                format!("`{text}`: an IPv4-mapped range takes a prefix of 96 to 128")
            })?
        } else {
            prefix
        };
        Ok(Range {
            network: canonical_network,
            prefix,
        })
    }

    fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, canonical(ip)) {
            (IpAddr::V4(network), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                network.to_bits() & mask == ip.to_bits() & mask
            }
            (IpAddr::V6(network), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                network.to_bits() & mask == ip.to_bits() & mask
            }
            _ => false,
        }
    }
}

/// An IPv4-mapped IPv6 address (`::ffff:127.0.0.1`) reaches its IPv4 address: one range
/// speaks for both forms.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

impl Policy {
    /// Parses `--egress-deny` and `--egress-allow`: comma-separated IP addresses, CIDR ranges
    /// and the word `private`; empty means none.
    pub fn parse(deny: &str, allow: &str) -> Result<Policy, String> {
        let ranges = |list: &str| -> Result<Vec<Range>, String> {
            let mut ranges = Vec::new();
            for item in list
                .split(',')
                .map(str::trim)
                .filter(|item| !item.is_empty())
            {
                if item.eq_ignore_ascii_case("private") {
                    ranges.extend(
                        PRIVATE
                            .iter()
                            .map(|range| Range::parse(range).expect("a range")),
                    );
                } else {
                    ranges.push(Range::parse(item)?);
                }
            }
            Ok(ranges)
        };
        Ok(Policy {
            deny: ranges(deny).map_err(|why| format!("--egress-deny: {why}"))?,
            allow: ranges(allow).map_err(|why| format!("--egress-allow: {why}"))?,
        })
    }

    /// Whether the operator refuses `ip` (the addresses refused always aside).
    fn denies(&self, ip: IpAddr) -> bool {
        // An IPv4 address inside an IPv6 one (NAT64, 6to4, IPv4-compatible or -translated)
        // reaches that IPv4 address, where a translator runs: judged as it too.
        let reached = |ip: IpAddr| {
            self.deny.iter().any(|range| range.contains(ip))
                && !self.allow.iter().any(|range| range.contains(ip))
        };
        reached(ip)
            || matches!(ip, IpAddr::V6(v6) if embedded_v4(v6).is_some_and(|v4| reached(IpAddr::V4(v4))))
    }

    /// Whether `ip` may not be reached.
    pub fn refuses(&self, ip: IpAddr) -> bool {
        forbidden(ip) || self.denies(ip)
    }

    /// Refuses a URL whose host is a refused IP literal or a metadata host name. A host name
    /// is judged by what it resolves to, when a request goes out ([`Policy::resolve`]).
    pub fn check_url(&self, url: &url::Url) -> Result<(), String> {
        check_url(url)?;
        let ip = match url.host() {
            Some(url::Host::Ipv4(v4)) => IpAddr::V4(v4),
            Some(url::Host::Ipv6(v6)) => IpAddr::V6(v6),
            _ => return Ok(()),
        };
        if self.denies(ip) {
            return Err(format!(
                "requests to {} are refused by this service's egress policy (its operator refuses that range)",
                url.host_str().unwrap_or("")
            ));
        }
        Ok(())
    }

    /// [`Policy::check_url`] of a URL given as text; one that does not parse (a template
    /// still to be filled) passes, to be judged once filled.
    pub fn check_text(&self, url: &str) -> Result<(), String> {
        match url::Url::parse(url) {
            Ok(parsed) => self.check_url(&parsed),
            Err(_) => Ok(()),
        }
    }

    /// The addresses of `host` the service may reach; an error when none is left.
    pub async fn resolve(
        &self,
        host: &str,
    ) -> Result<Vec<SocketAddr>, Box<dyn std::error::Error + Send + Sync>> {
        let all: Vec<SocketAddr> = tokio::net::lookup_host((host, 0)).await?.collect();
        let found: Vec<SocketAddr> = all
            .iter()
            .copied()
            .filter(|address| !self.refuses(address.ip()))
            .collect();
        if found.is_empty() {
            let why = if all.iter().any(|address| !forbidden(address.ip())) {
                "this service's egress policy refuses its addresses"
            } else {
                "link-local and metadata addresses are refused"
            };
            return Err(
                format!("{host} resolves to no address the service may reach ({why})").into(),
            );
        }
        Ok(found)
    }
}

/// Whether an address is refused as a destination.
pub fn forbidden(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            // Alibaba Cloud's metadata service answers on 100.100.100.200, outside the
            // link-local range.
            // Azure's WireServer answers on 168.63.129.16.
            v4.is_link_local()
                || o[0] == 0
                || v4.is_broadcast()
                || o == [100, 100, 100, 200]
                || o == [168, 63, 129, 16]
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return forbidden(IpAddr::V4(v4));
            }
            let segments = v6.segments();
            // An IPv4 address inside an IPv6 one reaches that IPv4 address.
            if embedded_v4(v6).is_some_and(|v4| forbidden(IpAddr::V4(v4))) {
                return true;
            }
            // fe80::/10 link-local, and AWS's IPv6 metadata address fd00:ec2::254.
            (segments[0] & 0xffc0) == 0xfe80
                || v6 == "fd00:ec2::254".parse::<Ipv6Addr>().expect("a literal")
                || v6.is_unspecified()
        }
    }
}

/// The IPv4 address an IPv6 one carries, where it reaches it: IPv4-compatible (`::a9fe:a9fe`,
/// not `::1` or `::`), IPv4-translated (`::ffff:0:a9fe:a9fe`), NAT64's well-known prefix
/// 64:ff9b::/96 and its local-use 64:ff9b:1::/48 (the address in the last 32 bits, as
/// translators are set up with /96 prefixes), and 6to4's 2002::/16 (in bits 16 to 48).
/// IPv4-mapped ones are handled as IPv4 addresses by the callers.
fn embedded_v4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let segments = v6.segments();
    let last = Ipv4Addr::from_bits(v6.to_bits() as u32);
    let compatible = segments[..6] == [0; 6] && segments[6] != 0;
    let translated = segments[..6] == [0, 0, 0, 0, 0xffff, 0];
    let nat64 = segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] || segments[..3] == [0x64, 0xff9b, 1];
    if compatible || translated || nat64 {
        return Some(last);
    }
    (segments[0] == 0x2002).then(|| Ipv4Addr::from_bits((v6.to_bits() >> 80) as u32))
}

/// Refuses a URL whose host is a forbidden IP literal or a metadata host name (the addresses
/// refused whatever the policy; [`Policy::check_url`] adds the operator's ranges).
pub fn check_url(url: &url::Url) -> Result<(), String> {
    let refused = || {
        format!(
            "requests to {} are refused: link-local and metadata addresses are never a provider",
            url.host_str().unwrap_or("")
        )
    };
    match url.host() {
        Some(url::Host::Ipv4(v4)) if forbidden(IpAddr::V4(v4)) => Err(refused()),
        Some(url::Host::Ipv6(v6)) if forbidden(IpAddr::V6(v6)) => Err(refused()),
        Some(url::Host::Domain(name))
            if matches!(
                name.trim_end_matches('.').to_ascii_lowercase().as_str(),
                "metadata.google.internal" | "metadata" | "instance-data"
            ) =>
        {
            Err(refused())
        }
        _ => Ok(()),
    }
}

/// A resolver that leaves out refused addresses, so a name pointing at the metadata service
/// (or at a range the operator refuses) resolves to nothing usable.
pub struct GuardedResolver(pub Arc<Policy>);

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_string();
        let policy = Arc::clone(&self.0);
        Box::pin(async move { Ok(Box::new(policy.resolve(&host).await?.into_iter()) as Addrs) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_and_link_local_are_refused_private_and_loopback_are_not() {
        for bad in [
            "http://169.254.169.254/latest/meta-data/",
            "http://[fe80::1]/",
            "http://[::ffff:169.254.169.254]/",
            "http://[::a9fe:a9fe]/",
            "http://[64:ff9b::a9fe:a9fe]/",
            "http://[fd00:ec2::254]/",
            "http://100.100.100.200/latest/meta-data/",
            "http://metadata.google.internal/computeMetadata/v1/",
            "http://0.0.0.0/",
            "http://168.63.129.16/machine/",
            "http://[2002:a9fe:a9fe::]/",
            "http://[64:ff9b:1::a9fe:a9fe]/",
            "http://[::ffff:0:a9fe:a9fe]/",
        ] {
            assert!(check_url(&url::Url::parse(bad).unwrap()).is_err(), "{bad}");
        }
        for good in [
            "http://127.0.0.1:4000/generic/",
            "http://10.1.2.3/oauth/token",
            "https://login.salesforce.com/services/oauth2/token",
            "http://[::1]:8080/",
        ] {
            assert!(check_url(&url::Url::parse(good).unwrap()).is_ok(), "{good}");
            // The default policy refuses nothing more.
            let policy = Policy::default();
            assert!(policy.check_text(good).is_ok(), "{good}");
        }
    }

    #[test]
    fn an_operator_refuses_private_ranges_and_takes_some_back() {
        let policy = Policy::parse("private, 203.0.113.0/24", "10.20.0.0/16,[::1]").unwrap();
        for refused in [
            "http://127.0.0.1:8080/",
            "http://127.1:8080/",
            "http://[::ffff:127.0.0.1]/",
            "http://10.1.2.3/",
            "http://172.31.255.255/",
            "http://192.168.0.1/",
            "http://100.64.0.1/",
            "http://[fd12::1]/",
            "http://203.0.113.9/",
            "http://169.254.169.254/",
            "http://[64:ff9b::a00:5]/",
            "http://[2002:a00:5::]/",
            "http://[::ffff:0:a00:5]/",
        ] {
            assert!(policy.check_text(refused).is_err(), "{refused}");
        }
        for reached in [
            "http://10.20.3.4/oauth/token",
            "http://[::1]:4000/",
            "https://login.salesforce.com/",
            "http://172.32.0.1/",
            "http://203.0.114.1/",
        ] {
            assert!(policy.check_text(reached).is_ok(), "{reached}");
        }
        // The addresses refused always are not taken back.
        let lenient = Policy::parse("", "169.254.0.0/16").unwrap();
        assert!(lenient.check_text("http://169.254.169.254/").is_err());
        assert!(lenient.refuses("169.254.169.254".parse().unwrap()));
        assert!(!lenient.refuses("127.0.0.1".parse().unwrap()));
        for bad in ["10.0.0.0/33", "::/129", "nonsense", "10.0.0/8", "private/8"] {
            let error = Policy::parse(bad, "").unwrap_err();
            assert!(error.starts_with("--egress-deny: "), "{bad}: {error}");
        }
        assert!(
            Policy::parse("", "x")
                .unwrap_err()
                .starts_with("--egress-allow: ")
        );
        assert_eq!(Policy::parse(" , ", "").unwrap(), Policy::default());
        // An IPv4-mapped range is the IPv4 range it maps: it takes back 10.20/16, not all.
        let mapped = Policy::parse("private", "::ffff:10.20.0.0/112").unwrap();
        assert!(mapped.check_text("http://10.20.1.1/").is_ok());
        assert!(mapped.check_text("http://10.21.1.1/").is_err());
        assert!(mapped.check_text("http://127.0.0.1/").is_err());
        assert!(Policy::parse("::ffff:0:0/95", "").is_err());
    }

    #[tokio::test]
    async fn names_resolve_to_what_the_policy_leaves() {
        let policy = Policy::parse("private", "").unwrap();
        let error = policy.resolve("localhost").await.unwrap_err().to_string();
        assert!(error.contains("egress policy"), "{error}");
        assert!(
            !Policy::default()
                .resolve("localhost")
                .await
                .unwrap()
                .is_empty()
        );
    }
}
