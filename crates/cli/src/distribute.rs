//! `ferry distribute`, `ferry undistribute` and `ferry status`.

use clap::Args;
use ferry_site::api::{DistributeReply, DistributeRequest};
use ferry_site::distribution::status::StatusRow;
use reqwest::Method;

use crate::client::Client;
use crate::output::{bytes, emit, percent, print_json, table};
use crate::Global;

/// Which DPs a package goes to or leaves.
#[derive(Args, Debug)]
pub(crate) struct Targets {
    /// Package id.
    pub(crate) id: String,
    /// DPs by name.
    #[arg(long = "dp", value_name = "NAME", num_args = 1.., required_unless_present = "groups")]
    pub(crate) dps: Vec<String>,
    /// Groups by name.
    #[arg(long = "group", value_name = "GROUP", num_args = 1..)]
    pub(crate) groups: Vec<String>,
}

/// `ferry distribute`.
#[derive(Args, Debug)]
pub(crate) struct DistributeCmd {
    #[command(flatten)]
    pub(crate) targets: Targets,
    /// Only print the bytes each DP still needs; assign nothing.
    #[arg(long)]
    pub(crate) dry_run: bool,
}

/// `ferry status`.
#[derive(Args, Debug)]
pub(crate) struct StatusCmd {
    /// Only this package.
    pub(crate) id: Option<String>,
    /// Only this DP.
    #[arg(long = "dp", value_name = "NAME")]
    pub(crate) dp: Option<String>,
    /// Counts per package instead of rows: how many DPs have it installed,
    /// in progress, pending, failed, …
    #[arg(long)]
    pub(crate) summary: bool,
    /// Show it again every EVERY (2s when not given: 500ms, 10s, 1m)
    /// until interrupted: redrawn in place on a terminal, one frame after
    /// another elsewhere (with `--json`, one JSON line per frame).
    #[arg(
        long,
        value_name = "EVERY",
        num_args = 0..=1,
        default_missing_value = "2s",
        value_parser = crate::dp::parse_duration
    )]
    pub(crate) watch: Option<std::time::Duration>,
}

/// One package's line of `ferry status --summary`.
#[derive(serde::Serialize, Debug, Default)]
struct Summary {
    package: String,
    name: String,
    dps: usize,
    installed: usize,
    in_progress: usize,
    pending: usize,
    failed: usize,
    removing: usize,
    revoked: usize,
}

fn summarize(rows: &[StatusRow]) -> Vec<Summary> {
    let mut out: Vec<Summary> = Vec::new();
    for r in rows {
        let i = match out.iter().position(|s| s.package == r.package) {
            Some(i) => i,
            None => {
                out.push(Summary {
                    package: r.package.clone(),
                    name: r.name.clone(),
                    ..Summary::default()
                });
                out.len() - 1
            }
        };
        let s = &mut out[i];
        s.dps += 1;
        match r.state.as_str() {
            "installed" | "validating" => s.installed += 1,
            "in-progress" => s.in_progress += 1,
            "failed" => s.failed += 1,
            "removing" => s.removing += 1,
            "revoked" => s.revoked += 1,
            _ => s.pending += 1,
        }
    }
    out.sort_by(|a, b| a.package.cmp(&b.package));
    out
}

pub(crate) async fn distribute(cmd: DistributeCmd, g: &Global) -> anyhow::Result<()> {
    let client = Client::new(g)?;
    let req = DistributeRequest {
        package: cmd.targets.id,
        dps: cmd.targets.dps,
        groups: cmd.targets.groups,
        dry_run: cmd.dry_run,
    };
    let r: DistributeReply = client
        .json(client.request(Method::POST, "/distribute").json(&req))
        .await?;
    if g.json {
        return print_json(&r);
    }
    let mut t = table(&["DP", "NEEDS", "FULL COPY", "SHARE"]);
    for n in &r.needs {
        t.add_row(vec![
            n.dp.clone(),
            bytes(n.needed_bytes),
            bytes(n.full_bytes),
            percent(n.needed_bytes, n.full_bytes),
        ]);
    }
    if r.assigned {
        println!("{} revision {} assigned", r.package, r.revision);
    } else {
        println!(
            "dry run: {} revision {} would cost (nothing assigned)",
            r.package, r.revision
        );
    }
    println!("{t}");
    Ok(())
}

pub(crate) async fn undistribute(t: Targets, g: &Global) -> anyhow::Result<()> {
    let client = Client::new(g)?;
    let req = DistributeRequest {
        package: t.id.clone(),
        dps: t.dps,
        groups: t.groups,
        dry_run: false,
    };
    client
        .send(client.request(Method::POST, "/undistribute").json(&req))
        .await?;
    emit(
        g,
        &serde_json::json!({ "package": t.id, "dps": req.dps, "groups": req.groups, "unassigned": true }),
        || {
            println!(
                "{} unassigned; the DPs remove it and free chunks nothing else uses",
                t.id
            )
        },
    )
}

pub(crate) async fn redistribute(t: Targets, g: &Global) -> anyhow::Result<()> {
    let client = Client::new(g)?;
    let req = DistributeRequest {
        package: t.id.clone(),
        dps: t.dps,
        groups: t.groups,
        dry_run: false,
    };
    let r: serde_json::Value = client
        .json(client.request(Method::POST, "/redistribute").json(&req))
        .await?;
    emit(g, &r, || {
        let dps: Vec<&str> = r["dps"]
            .as_array()
            .map(|a| a.iter().filter_map(|d| d.as_str()).collect())
            .unwrap_or_default();
        println!(
            "{} will be rebuilt from scratch on {}: each deletes its copy and fetches every chunk again (`ferry status {}` follows it)",
            t.id,
            dps.join(", "),
            t.id
        )
    })
}

pub(crate) async fn status(cmd: StatusCmd, g: &Global) -> anyhow::Result<()> {
    let client = Client::new(g)?;
    let Some(every) = cmd.watch else {
        let rows = status_rows(&client, &cmd).await?;
        return show(&rows, &cmd, g);
    };
    let every = every.max(std::time::Duration::from_millis(100));
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // Read first, then draw: the screen is never blank while waiting.
        let rows = status_rows(&client, &cmd).await;
        if g.json {
            // One frame per line, for a script reading them as they come.
            match rows {
                Ok(rows) => println!("{}", serde_json::to_string(&rows)?),
                Err(e) => eprintln!("error: {e:#}"),
            }
            continue;
        }
        if terminal {
            // Home and clear, as watch(1) does.
            print!("\x1b[H\x1b[2J");
        }
        let now = time::OffsetDateTime::now_utc();
        println!(
            "every {}: ferry status, {} UTC (Ctrl-C stops)",
            humantime::format_duration(every),
            now.format(&time::macros::format_description!(
                "[year]-[month]-[day] [hour]:[minute]:[second]"
            ))?
        );
        match rows {
            Ok(rows) => show(&rows, &cmd, g)?,
            // The site restarting is no reason to stop watching it.
            Err(e) => println!("cannot read the status: {e:#}"),
        }
        if !terminal {
            println!();
        }
        use std::io::Write;
        std::io::stdout().flush()?;
    }
}

/// The rows `cmd` asks the site for.
async fn status_rows(client: &Client, cmd: &StatusCmd) -> anyhow::Result<Vec<StatusRow>> {
    let mut req = client.request(Method::GET, "/status");
    if let Some(id) = &cmd.id {
        req = req.query(&[("package", id)]);
    }
    if let Some(dp) = &cmd.dp {
        req = req.query(&[("dp", dp)]);
    }
    client.json(req).await
}

/// Prints `rows` as `cmd` and `g` ask: a table, a summary, or JSON.
fn show(rows: &[StatusRow], cmd: &StatusCmd, g: &Global) -> anyhow::Result<()> {
    if cmd.summary {
        let sums = summarize(rows);
        return emit(g, &sums, || {
            let mut t = table(&[
                "PACKAGE",
                "DPS",
                "INSTALLED",
                "IN PROGRESS",
                "PENDING",
                "FAILED",
                "REMOVING",
                "REVOKED",
            ]);
            for s in &sums {
                t.add_row(vec![
                    format!("{} {}", s.package, s.name),
                    s.dps.to_string(),
                    format!(
                        "{} ({})",
                        s.installed,
                        percent(s.installed as u64, s.dps as u64)
                    ),
                    s.in_progress.to_string(),
                    s.pending.to_string(),
                    s.failed.to_string(),
                    s.removing.to_string(),
                    s.revoked.to_string(),
                ]);
            }
            println!("{t}");
        });
    }
    if g.json {
        return print_json(&rows);
    }
    let mut t = table(&[
        "PACKAGE",
        "DP",
        "REV",
        "STATE",
        "PROGRESS",
        "RECEIVED",
        "FULL COPY",
        "WIRE",
        "LAST CONTACT",
    ]);
    for r in rows {
        t.add_row(vec![
            format!("{} {}", r.package, r.name),
            format!("{}{}", r.dp, if r.online { "" } else { " (offline)" }),
            r.revision.map_or("-".into(), |v| v.to_string()),
            r.describe(),
            r.progress(),
            r.received(),
            bytes(r.full_bytes),
            bytes(r.wire_bytes),
            if r.online {
                "now".into()
            } else {
                r.last_contact.map_or("never".into(), crate::output::ago)
            },
        ]);
    }
    println!("{t}");
    for r in rows {
        for v in &r.multicast {
            println!("{}", crate::output::session_line(&r.dp, v));
        }
        if let Some(w) = &r.multicast_warning {
            println!("warning: {w}");
        }
    }
    Ok(())
}
