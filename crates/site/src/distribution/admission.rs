//! Caps on the QUIC connections that carry no DP certificate (enrollment):
//! per source address and in total, and a deadline on each, so hosts that
//! open connections and never enroll cannot hold the site's endpoint.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a connection without a DP certificate may stay open: an
/// enrollment is one request and one signature.
pub const ENROLL_DEADLINE: Duration = Duration::from_secs(60);
/// Default of `[dp] max_enrolling`.
pub const DEFAULT_TOTAL: usize = 64;
/// Default of `[dp] max_enrolling_per_address`.
pub const DEFAULT_PER_ADDRESS: usize = 4;

/// Counts the open connections without a DP certificate.
#[derive(Debug)]
pub struct Admission {
    per_address: usize,
    total: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// Its address holds as many as it may.
    #[error("{ip} has {max} enrollment connections open already ([dp] max_enrolling_per_address)")]
    PerAddress {
        /// The address.
        ip: IpAddr,
        /// The cap.
        max: usize,
    },
    /// The site holds as many as it may.
    #[error("the site has {max} enrollment connections open already ([dp] max_enrolling)")]
    Total {
        /// The cap.
        max: usize,
    },
}

/// An admitted connection's place; given back when dropped.
#[derive(Debug)]
pub struct Slot {
    admission: Arc<Admission>,
    ip: IpAddr,
}

impl Admission {
    /// Caps of `per_address` per source address and `total` in all.
    pub fn new(per_address: usize, total: usize) -> Arc<Self> {
        Arc::new(Self {
            per_address,
            total,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A place for one more connection from `ip`, or why not.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, Refused> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if open.values().sum::<usize>() >= self.total {
            return Err(Refused::Total { max: self.total });
        }
        let n = open.entry(ip).or_default();
        if *n >= self.per_address {
            return Err(Refused::PerAddress {
                ip,
                max: self.per_address,
            });
        }
        *n += 1;
        Ok(Slot {
            admission: self.clone(),
            ip,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .sum()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self
            .admission
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_hold_per_address_and_in_total_and_places_come_back() {
        let a = Admission::new(2, 3);
        let (x, y): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let x1 = a.admit(x).unwrap();
        let _x2 = a.admit(x).unwrap();
        assert_eq!(
            a.admit(x).unwrap_err(),
            Refused::PerAddress { ip: x, max: 2 }
        );
        let _y1 = a.admit(y).unwrap();
        assert_eq!(a.admit(y).unwrap_err(), Refused::Total { max: 3 });
        assert_eq!(a.open(), 3);
        drop(x1);
        assert_eq!(a.open(), 2);
        let _y2 = a.admit(y).unwrap();
        assert!(a
            .admit(y)
            .unwrap_err()
            .to_string()
            .contains("max_enrolling"));
    }
}
