//! `ferry upgrade …`: OS upgrade packages (Windows setup folders).

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use ferry_site::library::catalog::PackageKind;
use ferry_site::library::upgrade::UpgradeRequest;
use reqwest::Method;

use crate::client::Client;
use crate::Global;

#[derive(Subcommand, Debug)]
pub(crate) enum UpgradeCmd {
    /// Import a Windows setup folder (setup.exe, sources/install.wim, …) as
    /// an upgrade package; prints its id.
    Add {
        /// The folder (on the site server's file system); only read.
        dir: PathBuf,
        /// Unique name.
        #[arg(long)]
        name: String,
        /// Your organisation's version string.
        #[arg(long)]
        version: Option<String>,
        /// Free-text comment.
        #[arg(long)]
        comment: Option<String>,
        /// Architecture for clients that pre-cache (default: install.wim's).
        #[arg(long)]
        arch: Option<String>,
        /// Language for clients that pre-cache (default: install.wim's).
        #[arg(long)]
        lang: Option<String>,
        /// Keep only this image of sources/install.wim (in Ferry's copy; the
        /// folder is not modified).
        #[arg(long)]
        extract_index: Option<u32>,
        /// Do not check every WIM resource against its SHA-1 while
        /// importing (faster; the record says it was not checked).
        #[arg(long)]
        no_verify: bool,
    },
    /// Change an upgrade package's name, version, comment, architecture or
    /// language.
    Set {
        #[command(flatten)]
        props: crate::image::SetArgs,
        /// New architecture.
        #[arg(long)]
        arch: Option<String>,
        /// New language.
        #[arg(long)]
        lang: Option<String>,
    },
    /// Whether DPs may send the package to clients by multicast: --allow
    /// [--encrypt] [--only], or --off.
    Multicast(crate::image::MulticastArgs),
    /// The kept revisions of an upgrade package.
    Revisions {
        /// Package id.
        id: String,
    },
    /// Release an older kept revision to every DP holding the package.
    Rollback {
        /// Package id.
        id: String,
        /// The revision.
        #[arg(long, value_name = "N")]
        to: u32,
    },
    /// List the upgrade packages.
    List,
    /// Show one upgrade package.
    Show {
        /// Package id.
        id: String,
    },
    /// Updates from the catalog for its install.wim.
    Updates {
        /// Package id.
        id: String,
    },
    /// Apply updates to its install.wim, as a new revision.
    Service(crate::service::ServiceArgs),
    /// Which updates were applied, when, by which job, and how.
    History {
        /// Package id.
        id: String,
    },
    /// Remove an upgrade package; chunks nothing else uses are freed.
    Remove {
        /// Package id.
        id: String,
    },
}

pub(crate) async fn run(cmd: UpgradeCmd, g: &Global) -> anyhow::Result<()> {
    let client = Client::new(g)?;
    match cmd {
        UpgradeCmd::Set { props, arch, lang } => {
            let p = ferry_site::library::packages::Properties {
                name: props.name,
                version: props.version,
                comment: props.comment,
                architecture: arch,
                language: lang,
                keep: props.keep,
            };
            crate::image::set(&client, g, &props.id, p).await
        }
        UpgradeCmd::Multicast(a) => crate::image::multicast(&client, g, a).await,
        UpgradeCmd::Revisions { id } => crate::image::revisions(&client, g, &id).await,
        UpgradeCmd::Rollback { id, to } => crate::image::rollback(&client, g, &id, to).await,
        UpgradeCmd::Add {
            dir,
            name,
            version,
            comment,
            arch,
            lang,
            extract_index,
            no_verify,
        } => {
            let path = std::path::absolute(&dir)
                .with_context(|| format!("{}: cannot make the path absolute", dir.display()))?;
            let req = UpgradeRequest {
                path,
                name: Some(name),
                version,
                comment,
                arch,
                lang,
                extract_index,
                package: None,
                no_verify,
            };
            let resp = client
                .send(client.request(Method::POST, "/upgrades").json(&req))
                .await?;
            crate::image::follow_import(resp, g, "importing").await
        }
        UpgradeCmd::List => crate::image::list(&client, g, PackageKind::Upgrade).await,
        UpgradeCmd::Show { id } => crate::image::show(&client, g, &id).await,
        UpgradeCmd::Updates { id } => crate::service::updates(&client, g, &id).await,
        UpgradeCmd::Service(a) => crate::service::service(&client, g, a).await,
        UpgradeCmd::History { id } => crate::service::history(&client, g, &id).await,
        UpgradeCmd::Remove { id } => crate::image::remove(&client, g, &id).await,
    }
}
