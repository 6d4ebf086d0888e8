//! Where the service may send requests. Providers, organizations' own OAuth servers and the
//! sandbox may live on loopback or private networks, so those stay reachable; what is refused
//! everywhere is the link-local range, where cloud metadata services answer (169.254.169.254
//! hands out the machine's credentials; Alibaba Cloud's 100.100.100.200 and AWS's
//! fd00:ec2::254 as well): no connector, base URL or webhook may point there,
//! whether by an IP literal or by a name that resolves to it.

use std::net::{IpAddr, SocketAddr};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// Whether an address is refused as a destination.
pub fn forbidden(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            // Alibaba Cloud's metadata service answers on 100.100.100.200, outside the
            // link-local range.
            v4.is_link_local() || o[0] == 0 || v4.is_broadcast() || o == [100, 100, 100, 200]
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return forbidden(IpAddr::V4(v4));
            }
            let segments = v6.segments();
            // An IPv4 address inside an IPv6 one reaches that IPv4 address: IPv4-compatible
            // (`::a9fe:a9fe`, not `::1` or `::`) and NAT64's well-known prefix 64:ff9b::/96.
            let embedded = std::net::Ipv4Addr::from_bits(v6.to_bits() as u32);
            let compatible = segments[..6] == [0; 6] && segments[6] != 0;
            let nat64 = segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0];
            if (compatible || nat64) && forbidden(IpAddr::V4(embedded)) {
                return true;
            }
            // fe80::/10 link-local, and AWS's IPv6 metadata address fd00:ec2::254.
            (segments[0] & 0xffc0) == 0xfe80
                || v6
                    == "fd00:ec2::254"
                        .parse::<std::net::Ipv6Addr>()
                        .expect("a literal")
                || v6.is_unspecified()
        }
    }
}

/// Refuses a URL whose host is a forbidden IP literal or a metadata host name.
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

/// A resolver that leaves out forbidden addresses, so a name pointing at the metadata
/// service resolves to nothing usable.
pub struct GuardedResolver;

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move { Ok(Box::new(resolve(&host).await?.into_iter()) as Addrs) })
    }
}

/// The addresses of `host` the service may reach; an error when none is left.
pub async fn resolve(
    host: &str,
) -> Result<Vec<SocketAddr>, Box<dyn std::error::Error + Send + Sync>> {
    let found: Vec<SocketAddr> = tokio::net::lookup_host((host, 0))
        .await?
        .filter(|address| !forbidden(address.ip()))
        .collect();
    if found.is_empty() {
        return Err(format!(
            "{host} resolves to no address the service may reach (link-local addresses are refused)"
        )
        .into());
    }
    Ok(found)
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
        }
    }
}
