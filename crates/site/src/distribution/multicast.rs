//! Multicast-enabled DPs: the settings `ferry dp multicast NAME --enable`
//! keeps in the DP's record, their checks, and what travels to the DP with
//! its assignments ([`policy_for`]): the settings and the assigned packages
//! that allow multicast.
//!
//! The DP runs the sessions (`ferry_dp::multicast`); the site only says
//! whether and how.

use std::net::Ipv4Addr;

use crate::distribution::records::Registry;
pub use crate::distribution::records::{
    DpMulticast, DEFAULT_GROUP, DEFAULT_MAX_CLIENTS, DEFAULT_PORTS, DEFAULT_RATE,
};
use crate::distribution::registry::{Hub, HubError};

pub use ferry_api::requests::{parse_ports, MulticastChange};

impl DpMulticast {
    /// These settings with `c` applied, checked.
    pub fn apply(&self, c: &MulticastChange) -> Result<DpMulticast, String> {
        let mut m = self.clone();
        m.enabled = c.enable;
        if let Some(g) = &c.group {
            ferry_mcast::group::parse_group(g).map_err(|e| format!("--group {e}"))?;
            m.group = g.trim().to_string();
        }
        if let Some(p) = &c.ports {
            (m.port_first, m.port_last) = parse_ports(p).map_err(|e| format!("--ports {e}"))?;
        }
        if let Some(n) = c.max_clients {
            m.max_clients = n;
        }
        if let Some(r) = c.rate {
            m.rate = r;
        }
        if let Some(d) = c.start_delay_secs {
            m.start_delay_secs = d;
        }
        if let Some(n) = c.min_clients {
            m.min_clients = n;
        }
        if let Some(t) = c.ttl {
            m.ttl = t;
        }
        if let Some(i) = &c.interface {
            m.interface = if i.trim().is_empty() {
                None
            } else {
                let a: Ipv4Addr = i.trim().parse().map_err(|_| {
                    format!("--interface {i:?}: give the IPv4 address of the interface to send on")
                })?;
                Some(a.to_string())
            };
        }
        if m.max_clients == 0 {
            return Err("--max-clients must be at least 1".into());
        }
        if m.min_clients == 0 || m.min_clients > m.max_clients {
            return Err(format!(
                "--min-clients {} must be 1 to --max-clients ({})",
                m.min_clients, m.max_clients
            ));
        }
        if m.rate < 64 * 1024 {
            return Err(format!(
                "--rate {} bytes/s is too low for a session (at least 64K)",
                m.rate
            ));
        }
        if !(1..=255).contains(&m.ttl) {
            return Err(format!("--ttl {} must be 1 to 255", m.ttl));
        }
        if m.start_delay_secs > 24 * 3600 {
            return Err("--start-delay is at most a day".into());
        }
        Ok(m)
    }

    /// One line for `dp list`.
    pub fn describe(&self) -> String {
        if !self.enabled {
            return "off".into();
        }
        let bits = self.rate.saturating_mul(8);
        let rate = if bits >= 10_000_000 {
            format!("{}Mbit/s", bits / 1_000_000)
        } else {
            format!("{}kbit/s", bits / 1_000)
        };
        format!(
            "{}:{}-{} {rate} ttl {}{}, ≤{} clients, starts at {} joined or {}s",
            self.group,
            self.port_first,
            self.port_last,
            self.ttl,
            self.interface
                .as_ref()
                .map(|i| format!(" via {i}"))
                .unwrap_or_default(),
            self.max_clients,
            self.min_clients,
            self.start_delay_secs,
        )
    }
}

/// The multicast part of DP `dp`'s client policy: its settings and the
/// assigned packages that allow multicast (`allowed` answers per package:
/// `Some((encrypt, only))` when it does). `None` when the DP does not run
/// sessions.
pub fn policy_for(
    reg: &Registry,
    dp: &str,
    allowed: impl Fn(&str) -> Option<(bool, bool)>,
) -> Option<ferry_wire::pb::MulticastPolicy> {
    let m = reg.dps.get(dp)?.multicast.as_ref().filter(|m| m.enabled)?;
    Some(ferry_wire::pb::MulticastPolicy {
        group: m.group.clone(),
        port_first: m.port_first.into(),
        port_last: m.port_last.into(),
        max_clients: m.max_clients,
        rate: m.rate,
        start_delay_ms: m.start_delay_secs.saturating_mul(1000),
        min_clients: m.min_clients,
        ttl: m.ttl,
        interface: m.interface.clone().unwrap_or_default(),
        packages: reg
            .assigned(dp)
            .into_iter()
            .filter_map(|p| {
                let (encrypt, only) = allowed(&p)?;
                Some(ferry_wire::pb::MulticastPackage {
                    package: p,
                    encrypt,
                    only,
                })
            })
            .collect(),
    })
}

/// Sessions a DP's report may carry at most (it sends the running ones
/// and its 16 most recent).
const MAX_REPORTED_SESSIONS: usize = 64;

/// A session as a DP reported it.
fn view_of(s: &ferry_wire::pb::MulticastSession) -> ferry_mcast::SessionView {
    ferry_mcast::SessionView {
        session: s.session.clone(),
        package: s.package.clone(),
        revision: s.revision,
        address: s.address.clone(),
        encrypted: s.encrypted,
        state: s.state.clone(),
        clients_joined: s.clients_joined,
        clients_done: s.clients_done,
        clients_left: s.clients_left,
        passes: s.passes,
        rate: s.rate,
        datagrams_sent: s.datagrams_sent,
        bytes_sent: s.bytes_sent,
        package_bytes: s.package_bytes,
        send_errors: s.send_errors,
        dropped: s.dropped.clone().into_iter().collect(),
        opened: s.opened,
        ended: (s.ended != 0).then_some(s.ended),
    }
}

impl Hub {
    /// Keeps the sessions DP `dp` reported (in memory; written with the
    /// DP's record when it is next written).
    pub fn set_multicast_sessions(&self, dp: &str, m: &ferry_wire::pb::MulticastSessions) {
        let views: Vec<_> = m
            .sessions
            .iter()
            .take(MAX_REPORTED_SESSIONS)
            .map(view_of)
            .collect();
        if let Err(e) = self.update_dp(dp, |d| {
            d.multicast_sessions = views;
            (false, ())
        }) {
            tracing::warn!(%dp, error = %e, "cannot keep the DP's multicast sessions");
        }
    }

    /// Changes DP `dp`'s multicast settings; the DP gets them with its
    /// assignments.
    pub fn set_multicast(&self, dp: &str, c: &MulticastChange) -> Result<DpMulticast, HubError> {
        self.update(true, |reg| {
            let d = reg
                .dps
                .get_mut(dp)
                .ok_or_else(|| HubError::NoDp(dp.to_string()))?;
            let m = d
                .multicast
                .clone()
                .unwrap_or_default()
                .apply(c)
                .map_err(HubError::Invalid)?;
            d.multicast = Some(m.clone());
            Ok(m)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distribution::records::DpRecord;

    #[test]
    fn changes_are_checked_and_keep_what_they_do_not_name() {
        let on = MulticastChange {
            enable: true,
            ..Default::default()
        };
        let m = DpMulticast::default().apply(&on).unwrap();
        assert!(m.enabled);
        assert_eq!(m.group, DEFAULT_GROUP);
        let m = m
            .apply(&MulticastChange {
                enable: true,
                ports: Some("6000-6010".into()),
                rate: Some(1 << 20),
                interface: Some("10.9.0.1".into()),
                ..Default::default()
            })
            .unwrap();
        assert_eq!((m.port_first, m.port_last, m.rate), (6000, 6010, 1 << 20));
        let off = m
            .apply(&MulticastChange {
                enable: false,
                ..Default::default()
            })
            .unwrap();
        assert!(!off.enabled);
        assert_eq!(off.port_first, 6000, "settings are kept while off");
        assert_eq!(off.describe(), "off");
        assert_eq!(
            DpMulticast::default().apply(&on).unwrap().describe(),
            "239.255.0.0/24:63000-64000 100Mbit/s ttl 1, ≤50 clients, starts at 1 joined or 0s"
        );
        let bad = |c: MulticastChange| m.apply(&c).unwrap_err();
        let with = |f: fn(&mut MulticastChange)| {
            let mut c = on.clone();
            f(&mut c);
            c
        };
        assert!(bad(with(|c| c.group = Some("10.0.0.0/8".into()))).contains("--group"));
        assert!(bad(with(|c| c.ports = Some("64000-63000".into()))).contains("--ports"));
        assert!(bad(with(|c| c.ports = Some("0-10".into()))).contains("--ports"));
        assert!(bad(with(|c| c.min_clients = Some(99))).contains("--min-clients"));
        assert!(bad(with(|c| c.max_clients = Some(0))).contains("--max-clients"));
        assert!(bad(with(|c| c.ttl = Some(0))).contains("--ttl"));
        assert!(bad(with(|c| c.rate = Some(10))).contains("--rate"));
        assert!(bad(with(|c| c.interface = Some("eth0".into()))).contains("--interface"));
        let cleared = m
            .apply(&with(|c| c.interface = Some(String::new())))
            .unwrap();
        assert_eq!(cleared.interface, None);
        assert_eq!(parse_ports("7000"), Ok((7000, 7000)));
    }

    #[test]
    fn only_enabled_dps_get_a_policy_with_their_allowed_packages() {
        let mut reg = Registry::default();
        let mut d = DpRecord::new("dp1");
        d.packages.insert("FRY00001".into());
        d.packages.insert("FRY00002".into());
        reg.dps.insert("dp1".into(), d.clone());
        let allowed = |p: &str| (p == "FRY00002").then_some((true, false));
        assert_eq!(policy_for(&reg, "dp1", allowed), None, "not enabled");
        reg.dps.get_mut("dp1").unwrap().multicast = Some(DpMulticast {
            enabled: true,
            ttl: 4,
            ..Default::default()
        });
        let p = policy_for(&reg, "dp1", allowed).unwrap();
        assert_eq!(p.ttl, 4);
        assert_eq!(p.rate, DEFAULT_RATE);
        assert_eq!(p.packages.len(), 1);
        assert_eq!(p.packages[0].package, "FRY00002");
        assert!(p.packages[0].encrypt);
        assert_eq!(policy_for(&reg, "nope", allowed), None);
    }
}
