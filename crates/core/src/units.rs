//! Byte counts and rates for people, by the `bytesize` crate: shown in
//! binary units, read in whatever unit an operator types.

use bytesize::ByteSize;

/// Formats a byte count with binary units: `0 B`, `1.5 KiB`, `3.2 GiB`.
pub fn bytes(n: u64) -> String {
    ByteSize::b(n).display().iec().to_string()
}

/// Reads a rate: bytes per second as `bytesize` reads sizes (`500K`,
/// `20M` and `1.5G` are powers of 1000, `20MiB` of 1024, a bare number is
/// bytes), or bits per second as links are sold (`100Mbit`, `1Gbps`:
/// powers of 1000; `bytesize` reads no bits, so the suffix is ours). Zero
/// is refused: no rate is written by leaving the setting out.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let bits = lower
        .strip_suffix("bit")
        .or_else(|| lower.strip_suffix("bps"));
    let n = match bits {
        // Decimal as links are sold, whatever bytesize makes of "ki".
        Some(num) => num
            .trim()
            .parse::<ByteSize>()
            .ok()
            .filter(|_| !num.contains('i'))
            .map(|b| b.as_u64() / 8),
        None => t.parse::<ByteSize>().ok().map(|b| b.as_u64()),
    };
    n.filter(|&n| n > 0).ok_or_else(|| {
        format!(
            "{s:?} is not a rate: use bytes per second, e.g. 500K or 20M, or bits, e.g. 100Mbit"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_each_unit() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(50 * 1024 * 1024), "50.0 MiB");
        assert_eq!(bytes(3 << 30), "3.0 GiB");
    }

    #[test]
    fn reads_rates_in_bytes_or_bits() {
        assert_eq!(parse_rate("12M"), Ok(12_000_000));
        assert_eq!(parse_rate("12MiB"), Ok(12 << 20));
        assert_eq!(parse_rate("500K"), Ok(500_000));
        assert_eq!(parse_rate(" 1.5G "), Ok(1_500_000_000));
        assert_eq!(parse_rate("4096"), Ok(4096));
        assert_eq!(parse_rate("200Mbit"), Ok(25_000_000));
        assert_eq!(parse_rate("1Gbps"), Ok(125_000_000));
        assert_eq!(parse_rate("8kbit"), Ok(1000));
        for bad in ["", "fast", "0", "0M", "-5M", "12Q", "1Kibit", "Mbit"] {
            let e = parse_rate(bad).unwrap_err();
            assert!(e.contains("is not a rate"), "{bad:?}: {e}");
        }
    }
}
