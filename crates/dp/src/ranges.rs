//! HTTP byte ranges (RFC 9110 §14): what a `Range` header asks of a file
//! of a known size, and the `multipart/byteranges` framing of several.
//!
//! Written here rather than taken from `http-range-header` (0.4): that
//! crate refuses what RFC 9110 lets a client send and a server honour —
//! overlapping ranges, a suffix longer than the file (`bytes=-5000` of a
//! 1,000-byte file is the whole file, §14.1.2), optional whitespace before
//! a comma — and fails the whole set when one range lies past the end,
//! where §14.1.1 drops that range and serves the rest. The validators
//! (`If-Match`, `If-Range`, `If-None-Match`) come from the `headers` crate.

/// More ranges than this in one request are not honoured: the whole file
/// is sent instead (RFC 9110 lets a server ignore `Range`), so a request
/// cannot make the DP send a file many times over.
pub const MAX_RANGES: usize = 64;

/// What to send for a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// The whole file (no `Range`, one the DP ignores, or `If-Range` that
    /// does not match).
    Whole,
    /// These inclusive `(first, last)` byte positions, in request order.
    Parts(Vec<(u64, u64)>),
    /// Nothing asked for lies in the file: 416 with `bytes */SIZE`.
    Unsatisfiable,
}

/// Plans the answer to `Range: header` for a file of `size` bytes. A
/// header that is not a `bytes=` range set is ignored (the whole file), as
/// RFC 9110 requires of an unreadable one.
pub fn plan(header: &str, size: u64) -> Plan {
    let Some(set) = header.trim().strip_prefix("bytes=") else {
        return Plan::Whole;
    };
    let mut parts = Vec::new();
    let mut count = 0usize;
    for spec in set.split(',') {
        count += 1;
        if count > MAX_RANGES {
            return Plan::Whole;
        }
        let spec = spec.trim();
        let Some((a, b)) = spec.split_once('-') else {
            return Plan::Whole;
        };
        let num = |s: &str| -> Option<u64> {
            (!s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()))
                .then(|| s.parse().ok())
                .flatten()
        };
        let (a, b) = (a.trim(), b.trim());
        let range = if a.is_empty() {
            // Suffix: the last N bytes.
            let Some(n) = num(b) else {
                return Plan::Whole;
            };
            (n > 0 && size > 0).then(|| (size.saturating_sub(n), size - 1))
        } else {
            let Some(first) = num(a) else {
                return Plan::Whole;
            };
            let last = if b.is_empty() {
                u64::MAX
            } else {
                match num(b) {
                    Some(l) if l >= first => l,
                    _ => return Plan::Whole,
                }
            };
            (first < size).then(|| (first, last.min(size - 1)))
        };
        parts.extend(range);
    }
    if parts.is_empty() {
        Plan::Unsatisfiable
    } else {
        Plan::Parts(parts)
    }
}

/// The `Content-Range` value of one part.
pub fn content_range(first: u64, last: u64, size: u64) -> String {
    format!("bytes {first}-{last}/{size}")
}

/// The header of part `(first, last)` of a multipart answer, including the
/// boundary line before it.
pub fn part_head(boundary: &str, first: u64, last: u64, size: u64) -> String {
    format!(
        "\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\nContent-Range: {}\r\n\r\n",
        content_range(first, last, size)
    )
}

/// The closing boundary of a multipart answer.
pub fn closing(boundary: &str) -> String {
    format!("\r\n--{boundary}--\r\n")
}

/// Length of the whole multipart body for `parts`.
pub fn multipart_len(boundary: &str, parts: &[(u64, u64)], size: u64) -> u64 {
    parts
        .iter()
        .map(|&(a, b)| part_head(boundary, a, b, size).len() as u64 + (b - a + 1))
        .sum::<u64>()
        + closing(boundary).len() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_resolve_against_the_size() {
        assert_eq!(plan("bytes=0-99", 1000), Plan::Parts(vec![(0, 99)]));
        assert_eq!(plan("bytes=900-", 1000), Plan::Parts(vec![(900, 999)]));
        assert_eq!(plan("bytes=-100", 1000), Plan::Parts(vec![(900, 999)]));
        assert_eq!(plan("bytes=-5000", 1000), Plan::Parts(vec![(0, 999)]));
        assert_eq!(plan("bytes=990-2000", 1000), Plan::Parts(vec![(990, 999)]));
        assert_eq!(
            plan("bytes=0-0, 10-19 ,-1", 1000),
            Plan::Parts(vec![(0, 0), (10, 19), (999, 999)])
        );
        // Outside the file: dropped; nothing left is 416.
        assert_eq!(plan("bytes=0-9,5000-6000", 1000), Plan::Parts(vec![(0, 9)]));
        assert_eq!(plan("bytes=1000-", 1000), Plan::Unsatisfiable);
        assert_eq!(plan("bytes=-0", 1000), Plan::Unsatisfiable);
        assert_eq!(plan("bytes=0-", 0), Plan::Unsatisfiable);
    }

    #[test]
    fn unreadable_or_abusive_ranges_mean_the_whole_file() {
        for h in [
            "",
            "items=0-1",
            "bytes=",
            "bytes=a-b",
            "bytes=10-5",
            "bytes=1-2-3",
            "bytes=+1-2",
            "bytes=99999999999999999999999-",
        ] {
            assert_eq!(plan(h, 1000), Plan::Whole, "{h:?}");
        }
        let many = format!(
            "bytes={}",
            (0..=MAX_RANGES)
                .map(|i| format!("{i}-{i}"))
                .collect::<Vec<_>>()
                .join(",")
        );
        assert_eq!(plan(&many, 1000), Plan::Whole);
    }

    #[test]
    fn multipart_length_is_what_is_written() {
        let parts = [(0, 9), (100, 149)];
        let mut body = String::new();
        for &(a, b) in &parts {
            body += &part_head("B", a, b, 1000);
            body += &"x".repeat((b - a + 1) as usize);
        }
        body += &closing("B");
        assert_eq!(multipart_len("B", &parts, 1000), body.len() as u64);
        assert!(body.contains("Content-Range: bytes 100-149/1000"));
    }
}
