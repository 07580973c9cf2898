//! `ferry client …`: client tokens (on the site) and downloads from DPs
//! (on the computer being deployed).

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Subcommand;
use ferry_site::distribution::clients::{ClientTokenView, IssuedToken};
use reqwest::Method;

use crate::client::Client;
use crate::output::{bytes, emit, print_json, table};
use crate::Global;

#[derive(Subcommand, Debug)]
pub(crate) enum ClientCmd {
    /// On the site: bearer tokens for the computers that download from DPs.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Download a package from a DP over HTTPS: parallel range requests,
    /// every chunk checked against the site-signed manifest; run it again
    /// to resume. --token is the client token.
    Fetch {
        #[command(flatten)]
        from: FromDp,
        /// Range requests in flight at once (more pay across a WAN; on a LAN
        /// two keep a link full: BENCHMARKS.md).
        #[arg(long, default_value_t = 2)]
        parallel: usize,
    },
    /// Receive a package from a DP's multicast session with many other
    /// computers at once: every block checked against the site-signed
    /// manifest, lost packets made up by repair packets. When the session
    /// stalls or ends short, the rest comes over HTTPS (unless the package
    /// is multicast-only). Run it again to keep what arrived.
    Multicast {
        #[command(flatten)]
        from: FromDp,
        /// Give up on the session after this long in all (e.g. 30m).
        #[arg(long, value_name = "DURATION", default_value = "30m", value_parser = crate::dp::parse_duration)]
        timeout: std::time::Duration,
        /// Leave the session when nothing new arrived for this long.
        #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = crate::dp::parse_duration)]
        stall: std::time::Duration,
        /// IPv4 address of the interface to join the group on (default: the
        /// routing table's choice).
        #[arg(long, value_name = "ADDR")]
        interface: Option<std::net::Ipv4Addr>,
    },
}

/// Which package from which DP, where it goes, and what proves it: what
/// `client fetch` and `client multicast` share.
#[derive(clap::Args, Debug)]
pub(crate) struct FromDp {
    /// The DP's HTTPS address, https://HOST:PORT.
    #[arg(long, value_name = "URL")]
    dp: String,
    /// The package id.
    id: String,
    /// Folder to write the package's files into.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// The site's manifest key (hex, manifest.pub of a DP) to prove the
    /// manifest with, instead of the one the DP presents.
    #[arg(long, value_name = "HEX")]
    manifest_key: Option<String>,
}

impl FromDp {
    /// The download it describes, with the client token of `g` (or
    /// FERRY_CLIENT_TOKEN).
    fn fetch(self, g: &Global, parallel: usize) -> anyhow::Result<crate::fetch::Fetch> {
        if !self.dp.starts_with("https://") {
            anyhow::bail!(
                "--dp {:?}: use the DP's HTTPS address, https://HOST:PORT",
                self.dp
            );
        }
        Ok(crate::fetch::Fetch {
            dp: self.dp,
            package: self.id,
            out: self.out,
            token: g
                .token
                .clone()
                .or_else(|| std::env::var("FERRY_CLIENT_TOKEN").ok()),
            ca: g.ca.clone().context(
                "--ca FILE is needed: the site CA certificate (ca.pem of the site's or a DP's data folder) that issued the DP's certificate",
            )?,
            parallel,
            manifest_key: self.manifest_key,
        })
    }
}

#[derive(Subcommand, Debug)]
pub(crate) enum TokenCmd {
    /// Sign a new token and print it (shown once; the site keeps only its id).
    Create {
        /// The token's name (what `revoke` takes and DPs log).
        #[arg(long)]
        name: String,
        /// How long it is valid (e.g. 30d, 12h); forever when not given.
        #[arg(long, value_name = "DURATION", value_parser = crate::dp::parse_duration)]
        expires: Option<std::time::Duration>,
    },
    /// Every token the site issued, with its state.
    List,
    /// Refuse a token from now on, on every DP.
    Revoke {
        /// The token's name.
        name: String,
    },
}

/// A Unix time as a time: the token records keep seconds.
fn unix_time(secs: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(secs).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

pub(crate) async fn run(cmd: ClientCmd, g: &Global) -> anyhow::Result<()> {
    match cmd {
        ClientCmd::Token(TokenCmd::Create { name, expires }) => {
            let client = Client::new(g)?;
            let t: IssuedToken = client
                .json(client.request(Method::POST, "/client-tokens").json(
                    &ferry_site::api::ClientTokenRequest {
                        name,
                        valid_secs: expires.map(|d| d.as_secs().max(1)),
                    },
                ))
                .await?;
            emit(g, &t, || {
                println!("{}", t.token);
                eprintln!(
                    "client token {:?} {}; give it to clients as --token (or Authorization: Bearer); it is not shown again",
                    t.name,
                    t.expires
                        .map(|e| format!("expires {}", unix_time(e)))
                        .unwrap_or_else(|| "never expires".into())
                );
            })
        }
        ClientCmd::Token(TokenCmd::List) => {
            let client = Client::new(g)?;
            let list: Vec<ClientTokenView> = client
                .json(client.request(Method::GET, "/client-tokens"))
                .await?;
            if g.json {
                return print_json(&list);
            }
            let mut t = table(&["NAME", "STATE", "ISSUED", "EXPIRES"]);
            for v in &list {
                t.add_row(vec![
                    v.name.clone(),
                    v.state.clone(),
                    crate::output::ago(unix_time(v.record.issued)),
                    v.record
                        .expires
                        .map(|e| crate::output::when(unix_time(e)))
                        .unwrap_or_else(|| "never".into()),
                ]);
            }
            println!("{t}");
            Ok(())
        }
        ClientCmd::Token(TokenCmd::Revoke { name }) => {
            let client = Client::new(g)?;
            client
                .send(client.request(Method::POST, &format!("/client-tokens/{name}/revoke")))
                .await?;
            emit(g, &serde_json::json!({ "revoked": name }), || {
                println!("client token {name:?} revoked; connected DPs refuse it now, the others when they next connect");
            })
        }
        ClientCmd::Multicast {
            from,
            timeout,
            stall,
            interface,
        } => {
            let j = crate::multicast::Join {
                from: from.fetch(g, 2)?,
                stall,
                timeout,
                interface,
            };
            let r = j.run(!g.json).await?;
            emit(g, &r, || {
                let c = &r.datagrams;
                println!(
                    "{} r{} ({}): {} files, {} in {}; {} by multicast (session {}{}, {} pass{}), {} already here{}; every chunk matches the signed manifest",
                    r.package,
                    r.revision,
                    r.name,
                    r.files,
                    bytes(r.bytes_total),
                    r.out.display(),
                    bytes(r.bytes_multicast),
                    r.session,
                    if r.encrypted { ", encrypted" } else { "" },
                    r.passes,
                    if r.passes == 1 { "" } else { "es" },
                    bytes(r.bytes_reused),
                    r.fallback
                        .as_ref()
                        .map(|why| format!("; {} over HTTPS ({why})", bytes(r.bytes_https)))
                        .unwrap_or_default(),
                );
                println!(
                    "datagrams: {} taken, {} duplicate, {} dropped (garbage {}, other session {}, forged {}, replayed {}, out of range {}); {} blocks rebuilt from repair symbols, {} refused",
                    c.accepted,
                    c.duplicate,
                    c.dropped(),
                    c.garbage,
                    c.other_session,
                    c.forged,
                    c.replayed,
                    c.out_of_range,
                    c.blocks_repaired,
                    c.blocks_refused
                );
            })
        }
        ClientCmd::Fetch { from, parallel } => {
            let f = from.fetch(g, parallel)?;
            let r = f.run(!g.json).await?;
            emit(g, &r, || {
                println!(
                    "{} r{} ({}): {} files, {} in {}; downloaded {} in {} requests, {} already here; every chunk matches the signed manifest",
                    r.package,
                    r.revision,
                    r.name,
                    r.files,
                    bytes(r.bytes_total),
                    r.out.display(),
                    bytes(r.bytes_downloaded),
                    r.requests,
                    bytes(r.bytes_reused),
                );
            })
        }
    }
}
