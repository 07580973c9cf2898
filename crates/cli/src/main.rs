//! `ferry`: the site server and every operator command.
//!
//! `Cli` → [`Command`] → one module per subcommand. Operator commands talk to
//! a running site through its operator API ([`client`]); they never open the
//! site's library themselves.

mod client;
mod content;
mod distribute;
mod dp;
mod group;
mod image;
mod output;
mod service;
mod site;
mod update;
mod upgrade;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Ferry: content-addressed distribution of Windows OS images.
#[derive(Parser, Debug)]
#[command(name = "ferry", version, about)]
struct Cli {
    /// The site's data folder (from `ferry site init`); operator commands
    /// read the API address and token from it.
    #[arg(long, global = true, env = "FERRY_DATA")]
    data: Option<PathBuf>,
    /// Operator API URL (http://HOST:PORT), instead of reading it from --data.
    /// For `dp init`: the site's DP endpoint HOST:PORT.
    #[arg(long, global = true, env = "FERRY_SITE")]
    site: Option<String>,
    /// Operator token, instead of reading it from --data. For `dp init`: the
    /// enrollment token.
    #[arg(long, global = true, env = "FERRY_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create or run a site server.
    #[command(subcommand)]
    Site(site::SiteCmd),
    /// Import, list, show and remove OS images.
    #[command(subcommand)]
    Image(image::ImageCmd),
    /// Export, verify or refresh stored content.
    #[command(subcommand)]
    Content(content::ContentCmd),
    /// Add, enroll, run, revoke and list distribution points.
    #[command(subcommand)]
    Dp(dp::DpCmd),
    /// Groups of DPs that receive the same packages.
    #[command(subcommand)]
    Group(group::GroupCmd),
    /// Assign a package to DPs or groups (they fetch what they lack).
    Distribute(distribute::DistributeCmd),
    /// Take a package away from DPs or groups.
    Undistribute(distribute::Targets),
    /// Where every package stands on every DP.
    Status(distribute::StatusCmd),
    /// The catalog of software updates for offline servicing.
    #[command(subcommand)]
    Update(update::UpdateCmd),
    /// OS upgrade packages: Windows setup folders.
    #[command(subcommand)]
    Upgrade(upgrade::UpgradeCmd),
    /// Servicing jobs: list them, show, wait for or cancel one.
    Jobs(service::JobsCmd),
}

/// Options every operator command shares.
pub(crate) struct Global {
    pub(crate) data: Option<PathBuf>,
    pub(crate) site: Option<String>,
    pub(crate) token: Option<String>,
    pub(crate) json: bool,
}

fn main() -> ExitCode {
    // `ferry … | head` ends quietly, as other command-line tools do, instead
    // of panicking on the closed pipe.
    sigpipe::reset();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal, not in log files.
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none(),
        )
        .init();
    let global = Global {
        data: cli.data,
        site: cli.site,
        token: cli.token,
        json: cli.json,
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match cli.command {
            Command::Site(cmd) => site::run(cmd, &global).await,
            Command::Image(cmd) => image::run(cmd, &global).await,
            Command::Content(cmd) => content::run(cmd, &global).await,
            Command::Dp(cmd) => dp::run(cmd, &global).await,
            Command::Group(cmd) => group::run(cmd, &global).await,
            Command::Distribute(cmd) => distribute::distribute(cmd, &global).await,
            Command::Undistribute(t) => distribute::undistribute(t, &global).await,
            Command::Status(cmd) => distribute::status(cmd, &global).await,
            Command::Update(cmd) => update::run(cmd, &global).await,
            Command::Upgrade(cmd) => upgrade::run(cmd, &global).await,
            Command::Jobs(cmd) => service::jobs(cmd, &global).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
