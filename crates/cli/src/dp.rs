//! `ferry dp …`: add, enroll, run, revoke and list distribution points.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use ferry_dp::DpAgent;
use ferry_site::api::{AddDpReply, AddDpRequest};
use ferry_site::status::DpView;
use ferry_site::validation::{DpSettings, ValidateReply, ValidateRequest, ValidationView};
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
    },
    /// On the DP: run the agent in the foreground (Ctrl-C stops it).
    Serve {
        /// Limit chunk downloads to this many bytes per second (suffixes
        /// K, M, G: powers of 1024).
        #[arg(long, value_name = "RATE", value_parser = parse_rate)]
        max_rate: Option<u64>,
    },
    /// On the site: refuse a DP from now on (its connection is closed).
    Revoke {
        /// The DP's name.
        name: String,
    },
    /// On the site: every DP, online or not, and what it holds.
    List,
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
    },
}

/// A duration as people write them: 90s, 30m, 2h, 1h30m.
pub(crate) fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?} is not a duration: use e.g. 90s, 30m, 2h or 1h30m ({e})"))
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "on" | "yes" | "true" => Ok(true),
        "off" | "no" | "false" => Ok(false),
        _ => Err(format!("{s:?}: use on or off")),
    }
}

fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, 'K' | 'k')) => (&t[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&t[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&t[..i], 1 << 30),
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("{s:?} is not a rate: use bytes per second, e.g. 500K or 20M"))
}

/// This host's name, and `listen`'s address unless it is unspecified.
fn default_client_names(listen: std::net::SocketAddr) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .into_iter()
        .collect();
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
        } => {
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
            let cfg = ferry_dp::enroll(&data, site, token, clients).await?;
            let content = cfg.content_dir(&data);
            emit(
                g,
                &serde_json::json!({
                    "name": cfg.name, "site_code": cfg.site_code, "site": cfg.site,
                    "data": data, "content": content, "clients": cfg.clients,
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
                    println!("start it with: ferry dp serve --data {}", data.display());
                },
            )
        }
        DpCmd::Serve { max_rate } => {
            let data = data_dir(g)?;
            let agent = tokio::task::spawn_blocking(move || DpAgent::open(&data))
                .await??
                .with_max_rate(max_rate);
            agent.run(crate::site::shutdown_signal()).await
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
        DpCmd::Set {
            name,
            validate_schedule,
            anonymous_clients,
        } => {
            if validate_schedule.is_none() && anonymous_clients.is_none() {
                anyhow::bail!(
                    "nothing to set: give --validate-schedule CRON (or off) or --anonymous-clients on|off"
                );
            }
            let client = Client::new(g)?;
            let v: ValidationView = client
                .json(
                    client
                        .request(Method::POST, &format!("/dps/{name}/settings"))
                        .json(&DpSettings {
                            validate_schedule: validate_schedule.clone(),
                            anonymous_clients,
                        }),
                )
                .await?;
            if g.json {
                return print_json(&v);
            }
            if let Some(on) = anonymous_clients {
                println!(
                    "{name}: {}",
                    if on {
                        "serves clients without a token too"
                    } else {
                        "serves only clients with a token"
                    }
                );
                if validate_schedule.is_none() {
                    return Ok(());
                }
            }
            match (&v.schedule, &v.next_run) {
                (Some(s), Some(n)) => println!(
                    "{name}: validates on \"{s}\"; next run {} UTC ({n})",
                    crate::output::when(n)
                ),
                (Some(s), None) => println!("{name}: validates on \"{s}\""),
                _ => println!("{name}: no validation schedule"),
            }
            Ok(())
        }
        DpCmd::List => {
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
                    format!("{}{}", d.enrollment, if d.online { ", online" } else { "" }),
                    {
                        let mut a = d.address.clone().unwrap_or_else(|| "-".into());
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
                    if d.online {
                        "now".into()
                    } else {
                        d.last_contact
                            .as_deref()
                            .map_or("never".into(), crate::output::ago)
                    },
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
            Ok(())
        }
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
            res.updated.clone(),
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
