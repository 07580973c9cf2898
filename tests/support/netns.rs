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

    /// Bytes the kernel counted on the host side of the veth:
    /// (received from the namespace, sent into it).
    pub fn host_bytes(&self) -> anyhow::Result<(u64, u64)> {
        let read = |what: &str| -> anyhow::Result<u64> {
            let p = Path::new("/sys/class/net")
                .join(&self.host_if)
                .join("statistics")
                .join(what);
            Ok(std::fs::read_to_string(&p)
                .with_context(|| format!("cannot read {}", p.display()))?
                .trim()
                .parse()?)
        };
        Ok((read("rx_bytes")?, read("tx_bytes")?))
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
