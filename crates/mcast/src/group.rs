//! The IPv4 multicast group ranges a DP's sessions may use.

use std::net::Ipv4Addr;

/// The IPv4 multicast addresses of `cidr` (`239.255.0.0/24`): the first
/// and how many, or why it cannot be used.
pub fn parse_group(cidr: &str) -> Result<(Ipv4Addr, u32), String> {
    let (addr, bits) = cidr.split_once('/').ok_or_else(|| {
        format!("{cidr:?}: give a group range as ADDRESS/BITS, e.g. 239.255.0.0/24")
    })?;
    let addr: Ipv4Addr = addr
        .parse()
        .map_err(|_| format!("{cidr:?}: {addr:?} is not an IPv4 address"))?;
    let bits: u32 = bits
        .parse()
        .ok()
        .filter(|b| (4..=32).contains(b))
        .ok_or_else(|| format!("{cidr:?}: the prefix length must be 4 to 32"))?;
    let mask = if bits == 32 {
        u32::MAX
    } else {
        !(u32::MAX >> bits)
    };
    let base = u32::from(addr) & mask;
    let first = Ipv4Addr::from(base);
    if !first.is_multicast() || !Ipv4Addr::from(base | !mask).is_multicast() {
        return Err(format!(
            "{cidr:?} is not inside the IPv4 multicast range 224.0.0.0/4 (use 239.0.0.0/8, the organisation-local scope)"
        ));
    }
    if first.octets()[..3] == [224, 0, 0] {
        return Err(format!(
            "{cidr:?}: 224.0.0.0/24 is reserved for link-local protocols"
        ));
    }
    Ok((first, if bits == 32 { 1 } else { 1u32 << (32 - bits) }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_ranges_must_be_multicast() {
        assert_eq!(
            parse_group("239.255.0.0/24"),
            Ok(("239.255.0.0".parse().unwrap(), 256))
        );
        assert_eq!(
            parse_group("239.255.7.9/32"),
            Ok(("239.255.7.9".parse().unwrap(), 1))
        );
        assert_eq!(
            parse_group("239.255.7.9/24"),
            Ok(("239.255.7.0".parse().unwrap(), 256)),
            "host bits are cleared"
        );
        assert!(parse_group("10.0.0.0/8")
            .unwrap_err()
            .contains("multicast range"));
        assert!(parse_group("224.0.0.0/24")
            .unwrap_err()
            .contains("reserved"));
        assert!(parse_group("224.0.0.0/3").is_err());
        assert!(parse_group("239.0.0.0/33").unwrap_err().contains("4 to 32"));
        assert!(parse_group("239.1.1.1")
            .unwrap_err()
            .contains("ADDRESS/BITS"));
        assert!(parse_group("239.1.1.x/24").is_err());
    }
}
