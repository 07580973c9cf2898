//! `ferry dp …`: add, enroll, run, revoke and list distribution points.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use ferry_dp::DpAgent;
use ferry_site::api::{AddDpReply, AddDpRequest};
use ferry_site::status::DpView;
use reqwest::Method;

use crate::client::Client;
use crate::output::{bytes, print_json, table};
use crate::Global;

#[derive(Subcommand, Debug)]
pub(crate) enum DpCmd {
    /// On the site: create a DP record and print its one-time enrollment token.
    Add {
        /// The DP's name (letters, digits, '.', '-', '_').
        name: String,
    },
    /// On the DP: enroll the folder --data with the site (key, certificate,
    /// pinned site CA). Here --site is the site's DP endpoint HOST:PORT (its
    /// [dp] listen address) and --token the token `ferry dp add` printed.
    Init,
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

fn data_dir(g: &Global) -> anyhow::Result<PathBuf> {
    g.data
        .clone()
        .context("pass --data DIR (or set FERRY_DATA): the DP's data folder")
}

pub(crate) async fn run(cmd: DpCmd, g: &Global) -> anyhow::Result<()> {
    match cmd {
        DpCmd::Init => {
            let data = data_dir(g)?;
            let (Some(site), Some(token)) = (&g.site, &g.token) else {
                anyhow::bail!(
                    "enrolling needs --site HOST:PORT (the site's DP endpoint) and --token TOKEN (from `ferry dp add`)"
                );
            };
            let cfg = ferry_dp::enroll(&data, site, token).await?;
            println!(
                "enrolled {} with site {} at {}; content folder {}",
                cfg.name,
                cfg.site_code,
                cfg.site,
                cfg.content_dir(&data).display()
            );
            println!("start it with: ferry dp serve --data {}", data.display());
            Ok(())
        }
        DpCmd::Serve { max_rate } => {
            let data = data_dir(g)?;
            let agent = tokio::task::spawn_blocking(move || DpAgent::open(&data))
                .await??
                .with_max_rate(max_rate);
            agent.run(crate::site::shutdown_signal()).await
        }
        DpCmd::Add { name } => {
            let client = Client::new(g)?;
            let r: AddDpReply = client
                .json(
                    client
                        .request(Method::POST, "/dps")
                        .json(&AddDpRequest { name }),
                )
                .await?;
            if g.json {
                return print_json(&r);
            }
            println!("{}", r.token);
            eprintln!(
                "DP {} added. On the DP, within reach of the site's [dp] listen address, run once:\n  \
                 ferry dp init --data DIR --site SITE_HOST:PORT --token {}\n\
                 The token works once.",
                r.name, r.token
            );
            Ok(())
        }
        DpCmd::Revoke { name } => {
            let client = Client::new(g)?;
            client
                .send(client.request(Method::POST, &format!("/dps/{name}/revoke")))
                .await?;
            println!("revoked {name}: its certificate is refused from now on");
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
                "ONLINE",
                "ADDRESS",
                "LAST CONTACT",
                "GROUPS",
                "ASSIGNED",
                "HOLDS",
                "SENT",
            ]);
            for d in &dps {
                t.add_row(vec![
                    d.name.clone(),
                    d.enrollment.clone(),
                    if d.online { "yes" } else { "no" }.into(),
                    d.address.clone().unwrap_or_else(|| "-".into()),
                    d.last_contact.clone().unwrap_or_else(|| "never".into()),
                    d.groups.join(","),
                    d.assigned.join(","),
                    d.installed.join(","),
                    bytes(d.served_bytes),
                ]);
            }
            println!("{t}");
            Ok(())
        }
    }
}
