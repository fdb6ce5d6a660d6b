//! IP addresses on the wire: 4 bytes for IPv4, 16 for IPv6, network byte order (the config
//! contract's `bytes` address fields). Parsed once, where the update arrives.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// An address field that is neither 4 nor 16 bytes long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadAddress(pub usize);

impl std::fmt::Display for BadAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "an address of {} bytes (want 4 or 16)", self.0)
    }
}

impl std::error::Error for BadAddress {}

/// The wire form of `ip`.
pub fn to_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// Reads a required address.
pub fn from_bytes(bytes: &[u8]) -> Result<IpAddr, BadAddress> {
    if let Ok(v4) = <[u8; 4]>::try_from(bytes) {
        return Ok(IpAddr::V4(Ipv4Addr::from(v4)));
    }
    if let Ok(v6) = <[u8; 16]>::try_from(bytes) {
        return Ok(IpAddr::V6(Ipv6Addr::from(v6)));
    }
    Err(BadAddress(bytes.len()))
}

/// Reads an optional address: empty is unset.
pub fn optional(bytes: &[u8]) -> Result<Option<IpAddr>, BadAddress> {
    if bytes.is_empty() {
        return Ok(None);
    }
    from_bytes(bytes).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_families_round_trip_and_other_lengths_are_refused() {
        for ip in ["10.1.2.3", "fd00::1", "::ffff:10.0.0.1"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(from_bytes(&to_bytes(ip)), Ok(ip));
        }
        assert_eq!(from_bytes(&[1, 2, 3]), Err(BadAddress(3)));
        assert_eq!(from_bytes(&[]), Err(BadAddress(0)));
        assert_eq!(optional(&[]), Ok(None));
        assert_eq!(optional(&[0; 5]), Err(BadAddress(5)));
    }
}
