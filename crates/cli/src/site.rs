//! `ferry site …`: create and run a site server.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use ferry_site::{InitOptions, Site};

use crate::Global;

#[derive(Subcommand, Debug)]
pub(crate) enum SiteCmd {
    /// Create a site: configuration, operator token, CA and content library.
    Init {
        /// Site code: three letters or digits starting every package id.
        #[arg(long, default_value = "FRY", value_parser = parse_site_code)]
        site_code: String,
        /// Operator API address.
        #[arg(long, default_value = ferry_site::config::DEFAULT_OPERATOR_LISTEN)]
        listen: SocketAddr,
        /// UDP address of the QUIC endpoint distribution points dial.
        #[arg(long, default_value = ferry_site::config::DEFAULT_DP_LISTEN)]
        dp_listen: SocketAddr,
    },
    /// Run the site server in the foreground (Ctrl-C stops it).
    Serve,
}

/// A site code: three ASCII letters or digits, kept in capitals.
fn parse_site_code(s: &str) -> Result<String, String> {
    if s.len() == 3 && s.chars().all(|c| c.is_ascii_alphanumeric()) {
        Ok(s.to_ascii_uppercase())
    } else {
        Err(format!(
            "{s:?} is not a site code: give three letters or digits (e.g. --site-code P01); \
             it starts every package id of the site"
        ))
    }
}

fn data_dir(g: &Global) -> anyhow::Result<PathBuf> {
    g.data.clone().context(
        "pass --data DIR (or set FERRY_DATA): the folder that holds, or will hold, the site",
    )
}

pub(crate) async fn run(cmd: SiteCmd, g: &Global) -> anyhow::Result<()> {
    let data = data_dir(g)?;
    match cmd {
        SiteCmd::Init {
            site_code,
            listen,
            dp_listen,
        } => {
            let code = site_code.clone();
            ferry_site::init(
                &data,
                &InitOptions {
                    site_code,
                    listen,
                    dp_listen,
                },
            )?;
            let (config, token) = (
                data.join(ferry_site::CONFIG_FILE),
                data.join(ferry_site::TOKEN_FILE),
            );
            crate::output::emit(
                g,
                &serde_json::json!({ "data": data, "config": config, "token_file": token, "site_code": code }),
                || {
                    println!("site created in {}", data.display());
                    println!("  configuration  {}", config.display());
                    println!("  operator token {}", token.display());
                    println!("start it with: ferry site serve --data {}", data.display());
                },
            )
        }
        SiteCmd::Serve => {
            let site = tokio::task::spawn_blocking(move || Site::open(&data)).await??;
            Ok(site.run(shutdown_signal()).await?)
        }
    }
}

/// Completes on Ctrl-C or SIGTERM.
pub(crate) async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async {
            match term.as_mut() {
                Some(t) => { t.recv().await; }
                None => std::future::pending().await,
            }
        } => {}
    }
    tracing::info!("stopping");
}
