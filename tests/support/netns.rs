//! Test hosts in network namespaces: a namespace joined to the host by a
//! veth pair, so what crosses between them is counted by the kernel.
//!
//! Needs root (`ip netns add`). Everything is removed when the value is
//! dropped.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context};

fn run(tool: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(tool)
        .args(args)
        .output()
        .with_context(|| format!("cannot run `{tool}` (Debian's iproute2)"))?;
    if !out.status.success() {
        bail!(
            "{tool} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    run("ip", args)
}

/// A network namespace `name` with a veth to the host: the host side has
/// `host_ip`, the namespace side `ns_ip` (a /30 between them).
pub struct Netns {
    /// The namespace's name.
    pub name: String,
    /// The host side's interface.
    pub host_if: String,
    /// The namespace side's interface.
    pub ns_if: String,
    /// The host side's address.
    pub host_ip: String,
    /// The namespace side's address.
    pub ns_ip: String,
}

impl Netns {
    /// Creates namespace `ferry-<tag>` and its veth, addresses `10.77.N.1`
    /// (host) and `10.77.N.2` (namespace). `n` must be unique among the
    /// namespaces alive at once. An old namespace of the same name (a
    /// killed test) is removed first.
    pub fn create(tag: &str, n: u8) -> anyhow::Result<Self> {
        let name = format!("ferry-{tag}");
        let host_if = format!("fh{n}-{}", &tag[..tag.len().min(8)]);
        let ns_if = format!("fn{n}");
        let _ = ip(&["netns", "del", &name]);
        let _ = ip(&["link", "del", &host_if]);
        let me = Self {
            name: name.clone(),
            host_if: host_if.clone(),
            ns_if: ns_if.clone(),
            host_ip: format!("10.77.{n}.1"),
            ns_ip: format!("10.77.{n}.2"),
        };
        ip(&["netns", "add", &name])?;
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ])?;
        ip(&["link", "set", &ns_if, "netns", &name])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/30", me.host_ip),
            "dev",
            &host_if,
        ])?;
        ip(&["link", "set", &host_if, "up"])?;
        let exec = |args: &[&str]| {
            let mut v = vec!["netns", "exec", name.as_str(), "ip"];
            v.extend_from_slice(args);
            ip(&v)
        };
        exec(&["addr", "add", &format!("{}/30", me.ns_ip), "dev", &ns_if])?;
        exec(&["link", "set", &ns_if, "up"])?;
        exec(&["link", "set", "lo", "up"])?;
        Ok(me)
    }

    /// The command prefix that runs a program inside the namespace.
    pub fn exec_prefix(&self) -> Vec<String> {
        vec![
            "ip".into(),
            "netns".into(),
            "exec".into(),
            self.name.clone(),
        ]
    }

    /// Sets the MTU of both ends of the veth.
    pub fn mtu(&self, mtu: u32) -> anyhow::Result<()> {
        let mtu = mtu.to_string();
        ip(&["link", "set", &self.host_if, "mtu", &mtu])?;
        ip(&[
            "netns",
            "exec",
            &self.name,
            "ip",
            "link",
            "set",
            &self.ns_if,
            "mtu",
            &mtu,
        ])
    }

    /// Makes the host side cut GSO batches into their datagrams before the
    /// veth (`gso_max_segs 1`): a veth carries a batch of UDP datagrams as
    /// one packet otherwise, so its counters and nftables in the namespace
    /// would see batches of up to 64 KiB, not the datagrams a real link
    /// carries.
    pub fn datagrams_as_packets(&self) -> anyhow::Result<()> {
        ip(&["link", "set", "dev", &self.host_if, "gso_max_segs", "1"])
    }

    /// Drops every UDP packet longer than `bytes` (IP length) that arrives
    /// in the namespace: a path that loses what it cannot carry, without a
    /// word (nftables in the namespace).
    pub fn drop_udp_longer_than(&self, bytes: u32) -> anyhow::Result<()> {
        let nft = |args: &[&str]| {
            let mut v = vec!["netns", "exec", self.name.as_str(), "nft"];
            v.extend_from_slice(args);
            ip(&v)
        };
        nft(&["add", "table", "inet", "ferrymtu"])?;
        nft(&[
            "add",
            "chain",
            "inet",
            "ferrymtu",
            "in",
            "{ type filter hook input priority 0 ; }",
        ])?;
        let limit = bytes.to_string();
        nft(&[
            "add", "rule", "inet", "ferrymtu", "in", "meta", "l4proto", "udp", "meta", "length",
            ">", &limit, "counter", "drop",
        ])
    }

    /// Packets the kernel counted on the host side of the veth: (received
    /// from the namespace, sent into it).
    pub fn host_packets(&self) -> anyhow::Result<(u64, u64)> {
        Ok((self.stat("rx_packets")?, self.stat("tx_packets")?))
    }

    fn stat(&self, what: &str) -> anyhow::Result<u64> {
        let p = Path::new("/sys/class/net")
            .join(&self.host_if)
            .join("statistics")
            .join(what);
        Ok(std::fs::read_to_string(&p)
            .with_context(|| format!("cannot read {}", p.display()))?
            .trim()
            .parse()?)
    }

    /// Bytes the kernel counted on the host side of the veth:
    /// (received from the namespace, sent into it).
    pub fn host_bytes(&self) -> anyhow::Result<(u64, u64)> {
        Ok((self.stat("rx_bytes")?, self.stat("tx_bytes")?))
    }

    /// Limits what the host sends into the namespace with a token bucket
    /// (`tc … tbf`), `rate` like "1gbit".
    pub fn limit(&self, rate: &str) -> anyhow::Result<()> {
        run(
            "tc",
            &[
                "qdisc",
                "replace",
                "dev",
                &self.host_if,
                "root",
                "tbf",
                "rate",
                rate,
                "burst",
                "1mbit",
                "latency",
                "50ms",
            ],
        )
    }

    /// Limits what the namespace sends to the host (`tc … tbf` on its
    /// side of the veth), `rate` like "40mbit"; `None` lifts the limit.
    pub fn limit_out(&self, rate: Option<&str>) -> anyhow::Result<()> {
        let ns_if = format!("fn{}", self.ns_ip.split('.').nth(2).unwrap_or("0"));
        let mut args = vec!["netns", "exec", self.name.as_str(), "tc", "qdisc"];
        match rate {
            Some(r) => args.extend([
                "replace", "dev", &ns_if, "root", "tbf", "rate", r, "burst", "1mbit", "latency",
                "50ms",
            ]),
            None => args.extend(["del", "dev", &ns_if, "root"]),
        }
        ip(&args)
    }

    /// Routes IPv4 multicast (224.0.0.0/4) out of the namespace's veth, so
    /// a sender inside reaches receivers on the host side.
    pub fn multicast_route(&self) -> anyhow::Result<()> {
        let ns_if = format!("fn{}", self.ns_ip.split('.').nth(2).unwrap_or("0"));
        ip(&[
            "netns",
            "exec",
            &self.name,
            "ip",
            "route",
            "add",
            "224.0.0.0/4",
            "dev",
            &ns_if,
        ])
    }

    /// Packets the host side's root qdisc (the [`limit`](Self::limit)) has
    /// dropped so far, from `tc -s qdisc show`.
    pub fn qdisc_drops(&self) -> anyhow::Result<u64> {
        let out = Command::new("tc")
            .args(["-s", "qdisc", "show", "dev", &self.host_if])
            .output()
            .context("cannot run `tc` (Debian's iproute2)")?;
        let text = String::from_utf8_lossy(&out.stdout);
        // "… Sent 123 bytes 4 pkt (dropped 5, overlimits 6 requeues 0)"
        text.split("(dropped ")
            .nth(1)
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.trim().parse().ok())
            .with_context(|| format!("no drop count in `tc -s qdisc show`: {text}"))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
        let _ = ip(&["link", "del", &self.host_if]);
    }
}

/// Test hosts on one Ethernet segment: a Linux bridge in the root
/// namespace (address `10.78.N.1/24`, where the site listens) and a
/// namespace per host joined to it by a veth (`10.78.N.(10+i)`), each with
/// a route for IPv4 multicast out of its veth. The bridge floods multicast
/// (snooping off), as an unmanaged switch does.
pub struct Bridge {
    /// The bridge's interface.
    pub name: String,
    /// The bridge's address (the root namespace's on the segment).
    pub ip: String,
    /// The hosts.
    pub hosts: Vec<BridgeHost>,
}

/// One host of a [`Bridge`].
pub struct BridgeHost {
    /// Its namespace.
    pub ns: String,
    /// Its address.
    pub ip: String,
    /// The root side of its veth (what it sends is that side's rx).
    pub root_if: String,
}

impl BridgeHost {
    /// The command prefix that runs a program on this host.
    pub fn exec_prefix(&self) -> Vec<String> {
        vec!["ip".into(), "netns".into(), "exec".into(), self.ns.clone()]
    }

    /// Bytes this host sent onto the segment, as the kernel counted them
    /// on the root side of its veth.
    pub fn sent_bytes(&self) -> anyhow::Result<u64> {
        let p = Path::new("/sys/class/net")
            .join(&self.root_if)
            .join("statistics/rx_bytes");
        Ok(std::fs::read_to_string(&p)
            .with_context(|| format!("cannot read {}", p.display()))?
            .trim()
            .parse()?)
    }

    /// Drops `percent` % of the UDP datagrams arriving for `ports`
    /// ("63000-63010") at random, in the kernel (nftables in the host's
    /// namespace).
    pub fn drop_udp(&self, ports: &str, percent: u32) -> anyhow::Result<()> {
        self.drop_matching(&format!("udp dport {ports}"), percent)
    }

    /// Drops `percent` % of the TCP segments arriving from port `port` (a
    /// server's answers) at random, in the kernel.
    pub fn drop_tcp_from(&self, port: u16, percent: u32) -> anyhow::Result<()> {
        self.drop_matching(&format!("tcp sport {port}"), percent)
    }

    /// Removes the drops [`Self::drop_udp`] and [`Self::drop_tcp_from`] set.
    pub fn clear_drops(&self) {
        let _ = ip(&[
            "netns",
            "exec",
            &self.ns,
            "nft",
            "delete",
            "table",
            "inet",
            "ferrytest",
        ]);
    }

    /// Drops `percent` % of what arrives matching nftables expression
    /// `matcher`: one rule in a table of its own (replacing the last).
    fn drop_matching(&self, matcher: &str, percent: u32) -> anyhow::Result<()> {
        let nft = |args: &str| -> anyhow::Result<()> {
            let mut v: Vec<&str> = vec!["netns", "exec", &self.ns, "nft"];
            v.extend(args.split(' '));
            ip(&v)
        };
        self.clear_drops();
        nft("add table inet ferrytest")?;
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns,
                "nft",
                "add",
                "chain",
                "inet",
                "ferrytest",
                "in",
            ])
            .arg("{ type filter hook input priority 0 ; }")
            .output()
            .context("cannot run nft (Debian's nftables)")?;
        if !out.status.success() {
            bail!(
                "nft add chain failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        if percent >= 100 {
            nft(&format!("add rule inet ferrytest in {matcher} drop"))
        } else {
            nft(&format!(
                "add rule inet ferrytest in {matcher} numgen random mod 100 < {percent} drop"
            ))
        }
    }
}

impl Bridge {
    /// Bytes the root namespace (the site) sent onto the segment, as the
    /// kernel counted them on the bridge itself: what hosts send each
    /// other is forwarded between their ports and not counted here.
    pub fn local_sent_bytes(&self) -> anyhow::Result<u64> {
        let p = Path::new("/sys/class/net")
            .join(&self.name)
            .join("statistics/tx_bytes");
        Ok(std::fs::read_to_string(&p)
            .with_context(|| format!("cannot read {}", p.display()))?
            .trim()
            .parse()?)
    }

    /// Creates bridge `fb-<tag>` and hosts `ferry-<tag>-<host>` for each
    /// name in `hosts`. `n` must be unique among the segments alive at
    /// once; leftovers of a killed test of the same names are removed
    /// first.
    pub fn create(tag: &str, n: u8, hosts: &[&str]) -> anyhow::Result<Self> {
        let name = format!("fb{n}-{}", &tag[..tag.len().min(8)]);
        let _ = ip(&["link", "del", &name]);
        let mut me = Bridge {
            name: name.clone(),
            ip: format!("10.78.{n}.1"),
            hosts: Vec::new(),
        };
        ip(&[
            "link",
            "add",
            &name,
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ])?;
        ip(&["addr", "add", &format!("{}/24", me.ip), "dev", &name])?;
        ip(&["link", "set", &name, "up"])?;
        for (i, h) in hosts.iter().enumerate() {
            let ns = format!("ferry-{tag}-{h}");
            let root_if = format!("fb{n}h{i}");
            let _ = ip(&["netns", "del", &ns]);
            let _ = ip(&["link", "del", &root_if]);
            ip(&["netns", "add", &ns])?;
            let host = BridgeHost {
                ns: ns.clone(),
                ip: format!("10.78.{n}.{}", 10 + i),
                root_if: root_if.clone(),
            };
            me.hosts.push(host);
            ip(&[
                "link", "add", &root_if, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ])?;
            ip(&["link", "set", &root_if, "master", &name])?;
            ip(&["link", "set", &root_if, "up"])?;
            let exec = |args: &[&str]| {
                let mut v = vec!["netns", "exec", ns.as_str(), "ip"];
                v.extend_from_slice(args);
                ip(&v)
            };
            exec(&[
                "addr",
                "add",
                &format!("10.78.{n}.{}/24", 10 + i),
                "dev",
                "eth0",
            ])?;
            exec(&["link", "set", "eth0", "up"])?;
            exec(&["link", "set", "lo", "up"])?;
            exec(&["route", "add", "224.0.0.0/4", "dev", "eth0"])?;
        }
        Ok(me)
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        for h in &self.hosts {
            let _ = ip(&["netns", "del", &h.ns]);
            let _ = ip(&["link", "del", &h.root_if]);
        }
        let _ = ip(&["link", "del", &self.name]);
    }
}
