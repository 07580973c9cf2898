//! `ferry dp …`: add, enroll, run, revoke and list distribution points.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use ferry_dp::DpAgent;
use ferry_site::api::{AddDpReply, AddDpRequest};
use ferry_site::distribution::records::PullFrom;
use ferry_site::distribution::settings::DpSettings;
use ferry_site::distribution::status::DpView;
use ferry_site::distribution::validation::{ValidateReply, ValidateRequest, ValidationView};
use reqwest::Method;

use crate::client::Client;
use crate::output::{bytes, emit, print_json, table};
use crate::Global;

#[derive(Subcommand, Debug)]
pub(crate) enum DpCmd {
    /// On the site: create a DP record and print its one-time enrollment token.
    Add {
        /// The DP's name (letters, digits, '.', '-', '_').
        name: String,
        /// A new token for a DP that never finished enrolling (the old
        /// token stops working).
        #[arg(long)]
        reissue: bool,
    },
    /// On the site: delete a DP's record (assignments, status rows, group
    /// membership); its certificate is refused and the name is free again.
    Remove {
        /// The DP's name.
        name: String,
        /// Even while it is connected (its connection is closed).
        #[arg(long)]
        force: bool,
    },
    /// On the DP: enroll the folder --data with the site (key, certificate,
    /// pinned site CA). Here --site is the site's DP endpoint HOST:PORT (its
    /// [dp] listen address) and --token the token `ferry dp add` printed.
    Init {
        /// Also serve the computers being deployed over HTTPS on this
        /// address (IP:PORT, e.g. 0.0.0.0:8443).
        #[arg(long, value_name = "ADDR")]
        client_listen: Option<std::net::SocketAddr>,
        /// A host name or address clients use to reach this DP (repeat for
        /// several): the names of its HTTPS certificate. Default: this
        /// host's name, and the --client-listen address unless it is
        /// 0.0.0.0.
        #[arg(long, value_name = "NAME", requires = "client_listen")]
        client_name: Vec<String>,
        /// Serve chunks to pull DPs (`ferry dp set OTHER --pull-from
        /// THIS`) over QUIC on this UDP address (IP:PORT, e.g.
        /// 0.0.0.0:7444; with 0.0.0.0 they dial the address this DP
        /// reaches the site from). Written to [peers] of dp.toml.
        #[arg(long, value_name = "ADDR")]
        peer_listen: Option<std::net::SocketAddr>,
    },
    /// On the DP: run the agent in the foreground (Ctrl-C stops it).
    Serve {
        /// Limit chunk downloads to this many bytes per second (K, M, G:
        /// powers of 1000; KiB, MiB, GiB: of 1024) or bits (100Mbit).
        #[arg(long, value_name = "RATE", value_parser = ferry_core::units::parse_rate)]
        max_rate: Option<u64>,
    },
    /// On the site: refuse a DP from now on (its connection is closed).
    Revoke {
        /// The DP's name.
        name: String,
    },
    /// On the DP, with its agent stopped: import a prestage bundle
    /// (`ferry content prestage` on the site). The whole file is checked —
    /// every chunk, its end, the site's signature — before anything is
    /// written; the revision is then staged, and the agent finishes it
    /// from its own files when the site assigns it.
    Prestage {
        /// The bundle.
        bundle: PathBuf,
    },
    /// On the site: every DP, online or not, and what it holds.
    List,
    /// On the site: one DP in full: state, addresses, groups, what it holds
    /// and is assigned, disk, multicast settings and sessions.
    Show {
        /// The DP's name.
        name: String,
    },
    /// On the site: have a DP re-hash what it holds (or the packages named)
    /// against the signed manifests; damaged chunks are refetched alone and
    /// written in place. Waits for the result unless --no-wait.
    Validate {
        /// The DP's name.
        name: String,
        /// Only these packages.
        packages: Vec<String>,
        /// Return once the request is made.
        #[arg(long)]
        no_wait: bool,
        /// Give up waiting after this long (e.g. 30m, 2h).
        #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_duration)]
        timeout: std::time::Duration,
    },
    /// On the site: a DP's last validation result per package, its schedule
    /// and next run.
    Validation {
        /// The DP's name.
        name: String,
    },
    /// On the site: change a DP's settings.
    Set {
        /// The DP's name.
        name: String,
        /// Validate the DP's content on this schedule: a five-field cron
        /// expression in UTC ("0 3 * * 0": Sundays at 03:00), or in a zone
        /// ("CRON_TZ=Europe/Berlin 0 3 * * 0"), or "off".
        #[arg(long, value_name = "CRON")]
        validate_schedule: Option<String>,
        /// Let computers without a client token download from the DP's
        /// HTTPS listener (off by default).
        #[arg(long, value_name = "on|off", value_parser = parse_on_off)]
        anonymous_clients: Option<bool>,
        /// Maintenance: while on, no transfer to or from the DP starts (one
        /// under way goes on), nothing is removed from it; validation still
        /// runs. Off again, it catches up with its assignments.
        #[arg(long, value_name = "on|off", value_parser = parse_on_off)]
        maintenance: Option<bool>,
        /// Send the DP at most this many chunk bytes per second (K, M, G:
        /// powers of 1000; KiB, MiB, GiB: of 1024; or bits: 100Mbit), paced
        /// by the sender byte by byte; "off" takes the limit away.
        #[arg(long, value_name = "RATE|off", value_parser = parse_rate_or_off)]
        rate: Option<u64>,
        /// When the site sends the DP chunks, in the site's local time:
        /// rules separated by ";", each "[DAYS] HH:MM-HH:MM rate RATE" or
        /// "[DAYS] HH:MM-HH:MM closed" ("Mon-Fri 08:00-18:00 rate 5M; daily
        /// 12:00-13:00 closed"); DAYS is daily (the default), Mon, Sat,Sun
        /// or Mon-Fri. A window that closes mid-transfer pauses it; "off"
        /// takes the windows away.
        #[arg(long, value_name = "RULES|off")]
        window: Option<String>,
        /// The DP takes its content from prestage bundles only (`ferry
        /// content prestage`, then `ferry dp prestage` on the DP): the site
        /// sends it no chunk, and what it lacks waits for a bundle.
        #[arg(long, value_name = "on|off", value_parser = parse_on_off)]
        prestaged: Option<bool>,
        /// Make it a pull DP: it takes its chunks from these DPs (each
        /// with a [peers] listener), "SRC[:RANK],…": lowest rank first
        /// (default 1), a random one among equals, the next when one
        /// fails; from the site when none holds or is getting a revision.
        /// Loops are refused.
        #[arg(long, value_name = "SRC[:RANK],…", value_parser = parse_sources, conflicts_with = "push")]
        pull_from: Option<Sources>,
        /// Make it a push DP again: the site sends it its chunks.
        #[arg(long)]
        push: bool,
    },
    /// On the site: let a DP send packages that allow multicast to many
    /// computers at once (--enable), or stop it (--disable). Settings not
    /// given stay as they were; the DP gets them with its assignments.
    Multicast(MulticastArgs),
}

/// `ferry dp multicast NAME`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("switch").required(true).args(["enable", "disable"])))]
pub(crate) struct MulticastArgs {
    /// The DP's name.
    name: String,
    /// Run multicast sessions.
    #[arg(long)]
    enable: bool,
    /// Run none (the settings are kept for the next --enable).
    #[arg(long)]
    disable: bool,
    /// IPv4 multicast group range of the sessions (default 239.255.0.0/24).
    #[arg(long, value_name = "CIDR", conflicts_with = "disable")]
    group: Option<String>,
    /// UDP ports of the sessions, one per session (default 63000-64000).
    #[arg(long, value_name = "FIRST-LAST", conflicts_with = "disable")]
    ports: Option<String>,
    /// Clients one session takes at most (default 50).
    #[arg(long, value_name = "N", conflicts_with = "disable")]
    max_clients: Option<u32>,
    /// Rate of a session: bytes per second (K, M, G: powers of 1000; KiB,
    /// MiB, GiB: of 1024) or bits (100Mbit, 1Gbit). Default 100Mbit.
    #[arg(long, value_name = "RATE", value_parser = ferry_core::units::parse_rate, conflicts_with = "disable")]
    rate: Option<u64>,
    /// A session starts this long after its first client asked (default 0s) ...
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, conflicts_with = "disable")]
    start_delay: Option<std::time::Duration>,
    /// ... or as soon as this many clients joined (default 1).
    #[arg(long, value_name = "N", conflicts_with = "disable")]
    min_clients: Option<u32>,
    /// IP time to live of the datagrams: 1 keeps them on the DP's segment
    /// (default 1).
    #[arg(long, value_name = "HOPS", conflicts_with = "disable")]
    ttl: Option<u32>,
    /// IPv4 address of the DP's interface to send on (default: the routing
    /// table's choice; "" goes back to it).
    #[arg(long, value_name = "ADDR", conflicts_with = "disable")]
    interface: Option<String>,
}

/// A duration as people write them: 90s, 30m, 2h, 1h30m.
pub(crate) fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?} is not a duration: use e.g. 90s, 30m, 2h or 1h30m ({e})"))
}

/// The sources `--pull-from` names.
#[derive(Clone, Debug)]
pub(crate) struct Sources(Vec<PullFrom>);

/// "SRC[:RANK],…" of `--pull-from`.
fn parse_sources(s: &str) -> Result<Sources, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (dp, rank) = match part.split_once(':') {
            Some((dp, rank)) => (
                dp.trim(),
                rank.trim().parse::<u32>().map_err(|_| {
                    format!("{part:?}: the rank after ':' is a whole number (1 first)")
                })?,
            ),
            None => (part, 1),
        };
        if dp.is_empty() {
            return Err(format!("{part:?}: a DP name comes before ':'"));
        }
        out.push(PullFrom {
            dp: dp.to_string(),
            rank,
        });
    }
    if out.is_empty() {
        return Err("name at least one source DP (--push makes it a push DP)".into());
    }
    Ok(Sources(out))
}

/// "dp1 (rank 1), dp2 (rank 2)".
pub(crate) fn describe_sources(sources: &[PullFrom]) -> String {
    sources
        .iter()
        .map(|s| format!("{} (rank {})", s.dp, s.rank))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A rate, or "off" (0: no limit).
fn parse_rate_or_off(s: &str) -> Result<u64, String> {
    if s.trim().eq_ignore_ascii_case("off") {
        return Ok(0);
    }
    ferry_core::units::parse_rate(s)
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "on" | "yes" | "true" => Ok(true),
        "off" | "no" | "false" => Ok(false),
        _ => Err(format!("{s:?}: use on or off")),
    }
}

/// This host's name, and `listen`'s address unless it is unspecified.
fn default_client_names(listen: std::net::SocketAddr) -> Vec<String> {
    let mut names: Vec<String> = ferry_site::host_name().into_iter().collect();
    if !listen.ip().is_unspecified() {
        names.push(listen.ip().to_string());
    }
    names
}

fn data_dir(g: &Global) -> anyhow::Result<PathBuf> {
    g.data
        .clone()
        .context("pass --data DIR (or set FERRY_DATA): the DP's data folder")
}

pub(crate) async fn run(cmd: DpCmd, g: &Global) -> anyhow::Result<()> {
    match cmd {
        DpCmd::Init {
            client_listen,
            client_name,
            peer_listen,
        } => init(g, client_listen, client_name, peer_listen).await,
        DpCmd::Serve { max_rate } => {
            let data = data_dir(g)?;
            let agent = tokio::task::spawn_blocking(move || DpAgent::open(&data))
                .await??
                .with_max_rate(max_rate);
            Ok(agent.run(crate::site::shutdown_signal()).await?)
        }
        DpCmd::Add { name, reissue } => {
            let client = Client::new(g)?;
            let r: AddDpReply = client
                .json(
                    client
                        .request(Method::POST, "/dps")
                        .json(&AddDpRequest { name, reissue }),
                )
                .await?;
            emit(g, &r, || {
                println!("{}", r.token);
                eprintln!(
                    "DP {} {}. On the DP (it must reach UDP {} of the site), run once:\n  \
                     ferry dp init --data /srv/ferry-dp --site {} --token {}\n\
                     The token works once.",
                    r.name,
                    if reissue { "has a new token" } else { "added" },
                    r.site,
                    r.site,
                    r.token
                );
            })
        }
        DpCmd::Remove { name, force } => {
            let client = Client::new(g)?;
            let r: serde_json::Value = client
                .json(
                    client
                        .request(Method::DELETE, &format!("/dps/{name}"))
                        .query(&[("force", force)]),
                )
                .await?;
            emit(g, &r, || {
                println!("removed {name}: its assignments and status rows are gone, and the name is free")
            })
        }
        DpCmd::Revoke { name } => {
            let client = Client::new(g)?;
            client
                .send(client.request(Method::POST, &format!("/dps/{name}/revoke")))
                .await?;
            emit(g, &serde_json::json!({ "revoked": name }), || {
                println!("revoked {name}: its certificate is refused from now on; `ferry dp remove {name}` deletes its record")
            })
        }
        DpCmd::Validate {
            name,
            packages,
            no_wait,
            timeout,
        } => validate(g, name, packages, no_wait, timeout).await,
        DpCmd::Prestage { bundle } => {
            let data = data_dir(g)?;
            let r = tokio::task::spawn_blocking(move || ferry_dp::prestage::import(&data, &bundle))
                .await??;
            emit(g, &r, || {
                if r.already_installed {
                    println!(
                        "{} r{} is installed already: nothing to import",
                        r.package, r.revision
                    );
                } else {
                    println!(
                        "{} r{}: {} chunks ({}) from {} staged in {} places; {} left for the DP's own files or the site",
                        r.package,
                        r.revision,
                        r.chunks,
                        bytes(r.chunk_bytes),
                        r.bundle.display(),
                        r.slots_written,
                        r.slots_left
                    );
                }
            })
        }
        DpCmd::Validation { name } => {
            let client = Client::new(g)?;
            let v: ValidationView = client
                .json(client.request(Method::GET, &format!("/dps/{name}/validation")))
                .await?;
            if g.json {
                return print_json(&v);
            }
            print_validation(&v, 0);
            Ok(())
        }
        DpCmd::Multicast(a) => multicast(g, a).await,
        DpCmd::Set {
            name,
            validate_schedule,
            anonymous_clients,
            maintenance,
            rate,
            window,
            prestaged,
            pull_from,
            push,
        } => {
            let s = DpSettings {
                validate_schedule,
                anonymous_clients,
                maintenance,
                rate,
                window,
                prestaged,
                pull_from: if push {
                    Some(Vec::new())
                } else {
                    pull_from.map(|s| s.0)
                },
            };
            set(g, &name, s).await
        }
        DpCmd::Show { name } => {
            let client = Client::new(g)?;
            let dps: Vec<DpView> = client.json(client.request(Method::GET, "/dps")).await?;
            let Some(d) = dps.into_iter().find(|d| d.name == name) else {
                return Err(crate::client::Refusal {
                    code: "not-found".into(),
                    message: format!("there is no DP named {name:?} (see `ferry dp list`)"),
                    status: 404,
                }
                .into());
            };
            emit(g, &d, || show(&d))
        }
        DpCmd::List => list(g).await,
    }
}

/// `ferry dp init`: enrolls this folder with the site.
async fn init(
    g: &Global,
    client_listen: Option<std::net::SocketAddr>,
    client_name: Vec<String>,
    peer_listen: Option<std::net::SocketAddr>,
) -> anyhow::Result<()> {
    let data = data_dir(g)?;
    let (Some(site), Some(token)) = (&g.site, &g.token) else {
        anyhow::bail!(
            "enrolling needs --site HOST:PORT (the site's DP endpoint) and --token TOKEN (from `ferry dp add`)"
        );
    };
    let clients = client_listen.map(|listen| ferry_dp::config::ClientsConfig {
        listen,
        names: if client_name.is_empty() {
            default_client_names(listen)
        } else {
            client_name
        },
    });
    let peers = peer_listen.map(|listen| ferry_dp::config::PeersConfig { listen });
    let cfg = ferry_dp::enroll(&data, site, token, clients, peers).await?;
    let content = cfg.content_dir(&data);
    emit(
        g,
        &serde_json::json!({
            "name": cfg.name, "site_code": cfg.site_code, "site": cfg.site,
            "data": data, "content": content, "clients": cfg.clients, "peers": cfg.peers,
        }),
        || {
            println!(
                "enrolled {} with site {} at {}; content folder {}",
                cfg.name,
                cfg.site_code,
                cfg.site,
                content.display()
            );
            if let Some(c) = &cfg.clients {
                println!(
                    "serves clients over HTTPS on {} as {} (its certificate comes from the site when the agent first connects)",
                    c.listen,
                    c.names.join(", ")
                );
            }
            if let Some(p) = &cfg.peers {
                println!("serves chunks to pull DPs over QUIC on {}", p.listen);
            }
            println!("start it with: ferry dp serve --data {}", data.display());
        },
    )
}

/// `ferry dp multicast NAME`: changes a DP's multicast settings.
async fn multicast(g: &Global, a: MulticastArgs) -> anyhow::Result<()> {
    let change = ferry_site::distribution::multicast::MulticastChange {
        enable: a.enable,
        group: a.group,
        ports: a.ports,
        max_clients: a.max_clients,
        rate: a.rate,
        start_delay_secs: a.start_delay.map(|d| d.as_secs()),
        min_clients: a.min_clients,
        ttl: a.ttl,
        interface: a.interface,
    };
    let client = Client::new(g)?;
    let m: ferry_site::distribution::multicast::DpMulticast = client
        .json(
            client
                .request(Method::POST, &format!("/dps/{}/multicast", a.name))
                .json(&change),
        )
        .await?;
    emit(g, &m, || {
        println!("{}: multicast {}", a.name, m.describe());
    })
}

/// `ferry dp set NAME`: a DP's validation schedule, client access,
/// maintenance and rate limit; a line for each setting given.
async fn set(g: &Global, name: &str, s: DpSettings) -> anyhow::Result<()> {
    let DpSettings {
        validate_schedule,
        anonymous_clients,
        maintenance,
        rate,
        window,
        prestaged,
        pull_from,
    } = &s;
    if s == DpSettings::default() {
        anyhow::bail!(
            "nothing to set: give --validate-schedule CRON (or off), --anonymous-clients on|off, --maintenance on|off, --rate RATE (or off), --window RULES (or off), --prestaged on|off, --pull-from SRC[:RANK],… or --push"
        );
    }
    let client = Client::new(g)?;
    let v: ValidationView = client
        .json(
            client
                .request(Method::POST, &format!("/dps/{name}/settings"))
                .json(&s),
        )
        .await?;
    if g.json {
        return print_json(&v);
    }
    if let Some(on) = maintenance {
        println!(
            "{name}: {}",
            if *on {
                "in maintenance: no transfer to or from it starts"
            } else {
                "out of maintenance: it catches up with its assignments"
            }
        );
    }
    if let Some(sources) = pull_from {
        if sources.is_empty() {
            println!("{name}: a push DP: the site sends it its chunks");
        } else {
            println!(
                "{name}: pulls its chunks from {} (by rank; the site when none holds or is getting a revision)",
                describe_sources(sources)
            );
        }
    }
    if let Some(r) = rate {
        match r {
            0 => println!("{name}: no rate limit"),
            r => println!("{name}: chunks sent at most {}/s", bytes(*r)),
        }
    }
    if let Some(on) = prestaged {
        println!(
            "{name}: {}",
            if *on {
                "takes its content from prestage bundles only: the site sends it no chunk"
            } else {
                "gets its content from the site"
            }
        );
    }
    if let Some(w) = window {
        if w.trim().eq_ignore_ascii_case("off") {
            println!("{name}: no transfer windows");
        } else {
            println!("{name}: transfer windows (site time) {}", w.trim());
        }
    }
    if let Some(on) = anonymous_clients {
        println!(
            "{name}: {}",
            if *on {
                "serves clients without a token too"
            } else {
                "serves only clients with a token"
            }
        );
    }
    if validate_schedule.is_some() {
        match (&v.schedule, &v.next_run) {
            (Some(s), Some(n)) => println!(
                "{name}: validates on \"{s}\"; next run {} UTC ({})",
                crate::output::when(*n),
                crate::output::rfc3339(*n)
            ),
            (Some(s), None) => println!("{name}: validates on \"{s}\""),
            _ => println!("{name}: no validation schedule"),
        }
    }
    Ok(())
}

/// `ferry dp list`: every DP, then the multicast settings and sessions.
async fn list(g: &Global) -> anyhow::Result<()> {
    let client = Client::new(g)?;
    let dps: Vec<DpView> = client.json(client.request(Method::GET, "/dps")).await?;
    if g.json {
        return print_json(&dps);
    }
    let mut t = table(&[
        "DP",
        "STATE",
        "ADDRESS",
        "LAST CONTACT",
        "GROUPS",
        "HOLDS / ASSIGNED",
        "DISK USED / FREE",
        "SENT",
    ]);
    for d in &dps {
        let holds: Vec<String> = d
            .installed
            .iter()
            .map(|h| format!("{} r{}", h.package, h.revision))
            .collect();
        t.add_row(vec![
            d.name.clone(),
            state(d),
            {
                let mut a = d.address.clone().unwrap_or_else(|| "-".into());
                if let Some(m) = d.path_mtu {
                    a += &format!("\npath MTU {m} B");
                }
                if let Some(p) = &d.peer_address {
                    a += &format!("\npeers: {p}");
                }
                if !d.client_names.is_empty() {
                    a += &format!(
                        "\nhttps: {}{}",
                        d.client_names.join(" "),
                        if d.anonymous_clients {
                            " (anonymous ok)"
                        } else {
                            ""
                        }
                    );
                }
                a
            },
            last_contact(d),
            d.groups.join(" "),
            format!(
                "{} / {}",
                if holds.is_empty() {
                    "-".into()
                } else {
                    holds.join(" ")
                },
                if d.assigned.is_empty() {
                    "-".into()
                } else {
                    d.assigned.join(" ")
                }
            ),
            d.disk.as_ref().map_or("-".into(), |k| {
                format!("{} / {}", bytes(k.used_bytes), bytes(k.free_bytes))
            }),
            bytes(d.served_bytes),
        ]);
    }
    println!("{t}");
    for d in &dps {
        if let Some(m) = d.multicast.as_ref().filter(|m| m.enabled) {
            println!("multicast {}: {}", d.name, m.describe());
        }
        for v in d.multicast_sessions.iter().filter(|v| v.ended.is_none()) {
            println!("{}", crate::output::session_line(&d.name, v));
        }
    }
    Ok(())
}

/// Enrollment, whether it is online and in maintenance, its rate limit,
/// windows and sources.
fn state(d: &DpView) -> String {
    format!(
        "{}{}{}{}{}{}{}",
        d.enrollment,
        if d.online { ", online" } else { "" },
        if d.maintenance { ", maintenance" } else { "" },
        if d.prestaged { ", prestaged" } else { "" },
        d.rate
            .map(|r| format!(", ≤ {}/s", bytes(r)))
            .unwrap_or_default(),
        d.window
            .as_ref()
            .map(|w| format!(", windows (site time): {w}"))
            .unwrap_or_default(),
        if d.pull_from.is_empty() {
            String::new()
        } else {
            format!(", pulls from {}", describe_sources(&d.pull_from))
        }
    )
}

/// "now" for a DP online, else how long ago it was last (or "never").
fn last_contact(d: &DpView) -> String {
    if d.online {
        "now".into()
    } else {
        d.last_contact.map_or("never".into(), crate::output::ago)
    }
}

/// `ferry dp show`: one DP, a line per fact.
fn show(d: &DpView) {
    let line = |k: &str, v: String| println!("  {k:<12}{v}");
    println!("DP {}", d.name);
    line("state", state(d));
    line("address", d.address.clone().unwrap_or_else(|| "-".into()));
    if let Some(p) = &d.peer_address {
        line("peers", format!("serves pull DPs on {p}"));
    }
    line("last contact", last_contact(d));
    if !d.client_names.is_empty() {
        line(
            "https",
            format!(
                "{}{}",
                d.client_names.join(" "),
                if d.anonymous_clients {
                    " (anonymous clients too)"
                } else {
                    ""
                }
            ),
        );
    }
    line("groups", d.groups.join(" "));
    line("assigned", d.assigned.join(" "));
    line(
        "holds",
        d.installed
            .iter()
            .map(|h| format!("{} r{}", h.package, h.revision))
            .collect::<Vec<_>>()
            .join(" "),
    );
    if let Some(k) = &d.disk {
        line(
            "disk",
            format!("{} used, {} free", bytes(k.used_bytes), bytes(k.free_bytes)),
        );
    }
    line("sent", bytes(d.served_bytes));
    line(
        "multicast",
        d.multicast.as_ref().map_or("off".into(), |m| m.describe()),
    );
    for v in &d.multicast_sessions {
        println!("{}", crate::output::session_line(&d.name, v));
    }
}

/// Prints a DP's validation results; with `request` > 0, only those that
/// answer it.
fn print_validation(v: &ValidationView, request: u64) {
    println!(
        "DP {}{}: schedule {}{}",
        v.dp,
        if v.online { "" } else { " (offline)" },
        v.schedule.as_deref().unwrap_or("none"),
        v.next_run
            .as_ref()
            .map(|n| format!(", next run {n}"))
            .unwrap_or_default()
    );
    let mut t = table(&["PACKAGE", "REV", "CHECKED", "DAMAGED", "REPAIRED", "WHEN"]);
    let mut details = Vec::new();
    for r in v.results.iter().filter(|r| r.result.request >= request) {
        let res = &r.result;
        let repaired = res.damaged.iter().filter(|d| d.repaired).count();
        t.add_row(vec![
            r.package.clone(),
            res.revision.to_string(),
            if res.done {
                bytes(res.bytes_checked)
            } else {
                format!(
                    "{} of {} (running)",
                    bytes(res.bytes_checked),
                    bytes(res.bytes_total)
                )
            },
            res.damaged.len().to_string(),
            repaired.to_string(),
            crate::output::rfc3339(res.updated),
        ]);
        for d in &res.damaged {
            details.push(if d.error.is_empty() || d.repaired {
                format!(
                    "  {} {} at offset {} ({} bytes, chunk {}): {}",
                    r.package,
                    d.path,
                    d.offset,
                    d.len,
                    &d.chunk[..d.chunk.len().min(12)],
                    if d.repaired {
                        "repaired"
                    } else {
                        "not repaired"
                    }
                )
            } else {
                format!(
                    "  {} {} at offset {}: not repaired: {}",
                    r.package, d.path, d.offset, d.error
                )
            });
        }
    }
    println!("{t}");
    for d in details {
        println!("{d}");
    }
}

async fn validate(
    g: &Global,
    name: String,
    packages: Vec<String>,
    no_wait: bool,
    timeout: std::time::Duration,
) -> anyhow::Result<()> {
    let client = Client::new(g)?;
    let r: ValidateReply = client
        .json(
            client
                .request(Method::POST, &format!("/dps/{name}/validate"))
                .json(&ValidateRequest { packages }),
        )
        .await?;
    if no_wait || !r.online || r.packages.is_empty() {
        if g.json {
            return print_json(&r);
        }
        if r.packages.is_empty() {
            println!(
                "validation request {} sent to {name}; it holds no package yet",
                r.request
            );
        } else if !r.online {
            println!(
                "validation request {} recorded; {name} is offline and validates when it connects (`ferry dp validation {name}`)",
                r.request
            );
        } else {
            println!(
                "validation request {} sent to {name} for {}; results: `ferry dp validation {name}`",
                r.request,
                r.packages.join(", ")
            );
        }
        return Ok(());
    }
    let start = std::time::Instant::now();
    let bar = (!g.json).then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "validating {msg} {bar:30} {bytes}/{total_bytes} ({eta})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b.set_message(name.clone());
        b
    });
    loop {
        let v: ValidationView = client
            .json(client.request(Method::GET, &format!("/dps/{name}/validation")))
            .await?;
        let mine: Vec<_> = v
            .results
            .iter()
            .filter(|x| r.packages.contains(&x.package) && x.result.request >= r.request)
            .collect();
        if let Some(b) = &bar {
            b.set_length(mine.iter().map(|x| x.result.bytes_total).sum());
            b.set_position(mine.iter().map(|x| x.result.bytes_checked).sum());
        }
        let done = mine.iter().filter(|x| x.result.done).count() == r.packages.len();
        if done {
            if let Some(b) = &bar {
                b.finish_and_clear();
            }
            let unrepaired = mine
                .iter()
                .flat_map(|x| x.result.damaged.iter())
                .filter(|d| !d.repaired)
                .count();
            if unrepaired > 0 {
                return Err(crate::output::failed_with(
                    g,
                    &v,
                    "damaged",
                    format!("{unrepaired} damaged chunk(s) on {name} could not be repaired"),
                    || print_validation(&v, r.request),
                ));
            }
            return emit(g, &v, || print_validation(&v, r.request));
        }
        if !v.online {
            anyhow::bail!("{name} went offline during validation; it answers when it reconnects (`ferry dp validation {name}`)");
        }
        if start.elapsed() > timeout {
            anyhow::bail!(
                "no result from {name} within {timeout:?}; see `ferry dp validation {name}`"
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
}
