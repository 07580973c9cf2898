//! `ferry`: the site server and every operator command.
//!
//! `Cli` → [`Command`] → one module per subcommand. Operator commands talk to
//! a running site through its operator API ([`client`]); they never open the
//! site's library themselves.

mod client;
mod clients;
mod content;
mod distribute;
mod dp;
mod fetch;
mod group;
mod image;
mod multicast;
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
    /// Operator API URL (https://HOST:PORT, or http:// on loopback), instead
    /// of reading it from --data.
    /// For `dp init`: the site's DP endpoint HOST:PORT.
    #[arg(long, global = true, env = "FERRY_SITE")]
    site: Option<String>,
    /// Operator token, instead of reading it from --data. For `dp init`: the
    /// enrollment token; for `client fetch`: the client token
    /// (FERRY_CLIENT_TOKEN too).
    #[arg(long, global = true, env = "FERRY_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The site CA certificate (ca.pem of the site's or a DP's data folder).
    /// Pins the operator API's HTTPS certificate (default: ca.pem in
    /// --data); for `client fetch` and `client multicast`, the DP's.
    #[arg(long, global = true, env = "FERRY_CA", value_name = "FILE")]
    ca: Option<PathBuf>,
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
    /// Rebuild DPs' copies of a package from scratch: each deletes its copy
    /// and fetches every chunk from the site again (for a copy you distrust).
    Redistribute(distribute::Targets),
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
    /// The computers being deployed: client tokens (on the site) and
    /// downloads from DPs over HTTPS.
    #[command(subcommand)]
    Client(clients::ClientCmd),
}

/// Options every operator command shares.
pub(crate) struct Global {
    pub(crate) data: Option<PathBuf>,
    pub(crate) site: Option<String>,
    pub(crate) token: Option<String>,
    pub(crate) ca: Option<PathBuf>,
    pub(crate) json: bool,
}

fn main() -> ExitCode {
    ferry_net::tls::install_default_provider();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            sigpipe::reset();
            return usage_error(e);
        }
    };
    // `ferry … | head` ends quietly, as other command-line tools do, instead
    // of panicking on the closed pipe. Not the servers: a client that hangs
    // up mid-response must cost that connection an EPIPE, not kill the
    // process with SIGPIPE (TLS writes go out with writev, which cannot ask
    // for MSG_NOSIGNAL).
    let server = matches!(
        cli.command,
        Command::Site(site::SiteCmd::Serve) | Command::Dp(dp::DpCmd::Serve { .. })
    );
    if !server {
        sigpipe::reset();
    }
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
    let json = cli.json;
    let global = Global {
        data: cli.data,
        site: cli.site,
        token: cli.token,
        ca: cli.ca,
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
            Command::Redistribute(t) => distribute::redistribute(t, &global).await,
            Command::Status(cmd) => distribute::status(cmd, &global).await,
            Command::Update(cmd) => update::run(cmd, &global).await,
            Command::Upgrade(cmd) => upgrade::run(cmd, &global).await,
            Command::Jobs(cmd) => service::jobs(cmd, &global).await,
            Command::Client(cmd) => clients::run(cmd, &global).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.chain().any(|c| c.is::<output::Reported>()) => ExitCode::FAILURE,
        Err(e) => {
            let message = message(&e);
            if json {
                let v = serde_json::json!({ "error": message, "code": code(&e) });
                println!("{v}");
            } else {
                eprintln!("error: {message}");
            }
            ExitCode::FAILURE
        }
    }
}

/// Whether the command line asks for JSON (when clap could not parse it).
fn wants_json() -> bool {
    std::env::args_os().skip(1).any(|a| a == "--json")
}

/// A command line clap refused: its message, as JSON under `--json`
/// (code `usage`), exit code 2. Help and version print as usual.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    let shown = matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    );
    if shown || !wants_json() {
        e.exit();
    }
    let text = e.render().to_string();
    let first = text
        .lines()
        .next()
        .unwrap_or_default()
        .trim_start_matches("error: ");
    println!(
        "{}",
        serde_json::json!({ "error": first, "code": "usage", "usage": text })
    );
    ExitCode::from(2)
}

/// The error and its causes, each once: a cause whose text the message
/// already holds (a context that quoted it) is not repeated.
pub(crate) fn message(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if text.is_empty() || out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// The stable word for an error, for scripts: the site's code when the site
/// refused, `unreachable` when it could not be reached, else `failed`.
fn code(e: &anyhow::Error) -> String {
    for cause in e.chain() {
        if let Some(r) = cause.downcast_ref::<client::Refusal>() {
            return r.code.clone();
        }
        if cause
            .downcast_ref::<reqwest::Error>()
            .is_some_and(|r| r.is_connect() || r.is_timeout())
        {
            return "unreachable".into();
        }
    }
    "failed".into()
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }

    #[test]
    fn a_cause_the_message_already_quotes_is_not_repeated() {
        let io = std::io::Error::from(std::io::ErrorKind::NotFound);
        let e = anyhow::Error::new(io)
            .context(format!(
                "/x/site.toml: {}",
                std::io::Error::from(std::io::ErrorKind::NotFound)
            ))
            .context("cannot open the site");
        let m = super::message(&e);
        assert_eq!(m.matches("not found").count(), 1, "{m}");
        assert!(m.starts_with("cannot open the site: /x/site.toml"), "{m}");
        let plain = anyhow::anyhow!("inner").context("outer");
        assert_eq!(super::message(&plain), "outer: inner");
    }
}
