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
        #[arg(long, default_value = "FRY")]
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
            ferry_site::init(
                &data,
                &InitOptions {
                    site_code,
                    listen,
                    dp_listen,
                },
            )?;
            println!("site created in {}", data.display());
            println!(
                "  configuration  {}",
                data.join(ferry_site::CONFIG_FILE).display()
            );
            println!(
                "  operator token {}",
                data.join(ferry_site::TOKEN_FILE).display()
            );
            println!("start it with: ferry site serve --data {}", data.display());
            Ok(())
        }
        SiteCmd::Serve => {
            let site = tokio::task::spawn_blocking(move || Site::open(&data)).await??;
            site.run(shutdown_signal()).await
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
