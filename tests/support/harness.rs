//! Real `ferry` processes: a site server and the CLI against it.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// How long a site gets to start answering.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The `ferry` binary: `$FERRY_BIN`, or the one cargo built beside the
/// running test (`target/<profile>/ferry`).
pub fn ferry_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("FERRY_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join("ferry")
}

/// A free TCP port on loopback (bound and released).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A free UDP port on loopback (bound and released).
pub fn free_udp_port() -> anyhow::Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Polls `f` every 100 ms until it returns `Some`, or fails after `limit`
/// naming `what`.
pub fn wait_for<T>(
    what: &str,
    limit: Duration,
    mut f: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if start.elapsed() > limit {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Kills a child at once (SIGKILL), as a crash would, and reaps it.
fn kill(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Stops a child gracefully (SIGTERM) and waits for it.
fn stop(child: &mut Option<Child>) -> anyhow::Result<()> {
    if let Some(mut c) = child.take() {
        Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status()?;
        c.wait()?;
    }
    Ok(())
}

/// A site server process with its own data folder.
pub struct SiteProc {
    /// The data folder.
    pub data: PathBuf,
    /// The operator API port.
    pub port: u16,
    /// The UDP port DPs dial.
    pub dp_port: u16,
    /// Where the server's log goes.
    pub log: PathBuf,
    /// Extra environment of `ferry site serve` (fault injection).
    pub env: Vec<(String, String)>,
    /// The address the DP endpoint listens on.
    pub dp_ip: String,
    child: Option<Child>,
}

impl SiteProc {
    /// `ferry site init` in `dir/site`, then `ferry site serve`.
    pub fn start(dir: &Path) -> anyhow::Result<Self> {
        Self::start_with(dir, "site", &[])
    }

    /// `ferry site init` in `dir/NAME`, then `ferry site serve` with extra
    /// environment variables.
    pub fn start_with(dir: &Path, name: &str, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        Self::start_at(dir, name, "127.0.0.1", env)
    }

    /// [`SiteProc::start_with`] with the DP endpoint on `dp_ip` (`0.0.0.0`
    /// for DPs in network namespaces).
    pub fn start_at(
        dir: &Path,
        name: &str,
        dp_ip: &str,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let bin = ferry_bin();
        if !bin.exists() {
            bail!(
                "{} is not built: run `cargo build -p ferry-cli` first (scripts/test.sh does)",
                bin.display()
            );
        }
        let data = dir.join(name);
        let port = free_port()?;
        let dp_port = free_udp_port()?;
        let dp_ip_s = dp_ip.to_string();
        let out = Command::new(&bin)
            .args([
                "site",
                "init",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--dp-listen",
                &format!("{dp_ip}:{dp_port}"),
                "--data",
            ])
            .arg(&data)
            .output()?;
        if !out.status.success() {
            bail!(
                "ferry site init failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let mut site = Self {
            log: dir.join(format!("{name}.log")),
            data,
            port,
            dp_port,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            dp_ip: dp_ip_s,
            child: None,
        };
        site.serve()?;
        Ok(site)
    }

    /// Stops the server, rewrites `site.toml` with `edit`, and starts it
    /// again.
    pub fn edit_config(&mut self, edit: impl FnOnce(String) -> String) -> anyhow::Result<()> {
        self.stop()?;
        let path = self.data.join("site.toml");
        let text = std::fs::read_to_string(&path)?;
        std::fs::write(&path, edit(text))?;
        self.serve()
    }

    /// Starts (or restarts) `ferry site serve` and waits until it answers.
    pub fn serve(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(ferry_bin())
            .args(["site", "serve", "--data"])
            .arg(&self.data)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        let start = Instant::now();
        while start.elapsed() < START_TIMEOUT {
            if self.healthy() {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut() {
                if let Some(status) = c.try_wait()? {
                    bail!(
                        "site exited with {status}: {}",
                        std::fs::read_to_string(&self.log).unwrap_or_default()
                    );
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("site did not answer within {START_TIMEOUT:?}")
    }

    fn healthy(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        if s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .is_err()
        {
            return false;
        }
        let mut resp = String::new();
        let _ = s.read_to_string(&mut resp);
        resp.starts_with("HTTP/1.1 200")
    }

    /// Kills the server at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        kill(&mut self.child);
    }

    /// Stops the server gracefully (SIGTERM) and waits for it.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        stop(&mut self.child)
    }

    /// The server's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Runs `ferry --data DIR ARGS…`.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(ferry_bin())
            .arg("--data")
            .arg(&self.data)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run ferry: {e}"))
    }

    /// Runs the CLI and returns stdout; fails with its stderr if it fails.
    pub fn cli_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.cli(args);
        if !out.status.success() {
            bail!(
                "ferry {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs the CLI with `--json` and parses its output.
    pub fn cli_json(&self, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let mut a = args.to_vec();
        a.push("--json");
        let text = self.cli_ok(&a)?;
        serde_json::from_str(&text)
            .with_context(|| format!("ferry {args:?} printed no JSON: {text}"))
    }

    /// How many packages the site lists.
    pub fn package_count(&self) -> anyhow::Result<usize> {
        Ok(self
            .cli_json(&["image", "list"])?
            .as_array()
            .map_or(0, Vec::len))
    }

    /// How many chunks the whole library holds (from a full verify).
    pub fn stored_chunks(&self) -> anyhow::Result<u64> {
        self.cli_json(&["content", "verify"])?["chunks"]
            .as_u64()
            .context("verify printed no chunk count")
    }

    /// `ferry content export ID --out OUT` (latest revision).
    pub fn export(&self, id: &str, out: &Path) -> anyhow::Result<()> {
        self.cli_ok(&["content", "export", id, "--out", &out.to_string_lossy()])
            .map(drop)
    }

    /// `ferry content refresh ID --source SOURCE`: the next revision.
    pub fn refresh(&self, id: &str, source: &Path) -> anyhow::Result<()> {
        self.cli_ok(&[
            "content",
            "refresh",
            id,
            "--source",
            &source.to_string_lossy(),
        ])
        .map(drop)
    }

    /// Imports a WIM and returns the package JSON.
    pub fn add_image(&self, path: &Path, extra: &[&str]) -> anyhow::Result<serde_json::Value> {
        let p = path.to_string_lossy();
        let mut args = vec!["image", "add", &p];
        args.extend_from_slice(extra);
        self.cli_json(&args)
    }
}

impl Drop for SiteProc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            print_tail(&self.log);
        }
    }
}

/// Prints the end of a log, for a failing test's output.
fn print_tail(log: &Path) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(40);
    eprintln!("--- last lines of {} ---", log.display());
    for l in &lines[from..] {
        eprintln!("{l}");
    }
}

impl SiteProc {
    /// The site's address for DPs on this host.
    pub fn dp_addr(&self) -> String {
        let ip = if self.dp_ip == "0.0.0.0" {
            "127.0.0.1"
        } else {
            &self.dp_ip
        };
        format!("{ip}:{}", self.dp_port)
    }

    /// `ferry status --json` rows, optionally for one package.
    pub fn status(&self, package: Option<&str>) -> anyhow::Result<Vec<serde_json::Value>> {
        let mut args = vec!["status"];
        args.extend(package);
        Ok(self
            .cli_json(&args)?
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// The status row of `package` on `dp`.
    pub fn row(&self, package: &str, dp: &str) -> anyhow::Result<Option<serde_json::Value>> {
        Ok(self
            .status(Some(package))?
            .into_iter()
            .find(|r| r["dp"] == dp))
    }

    /// Imports the WIM `wim` and waits until DP `dp` holds it: where a
    /// redistribution test starts. Returns the package id.
    pub fn install(&self, wim: &Path, dp: &str, limit: Duration) -> anyhow::Result<String> {
        let pkg = self.add_image(wim, &[])?;
        let id = pkg["id"]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("image add answered without an id: {pkg}"))?
            .to_string();
        self.cli_ok(&["distribute", &id, "--dp", dp])?;
        self.wait_installed(&id, dp, 1, limit)?;
        Ok(id)
    }

    /// Waits until `dp` reports `package` installed at `revision`; fails at
    /// once if the DP reports a failure. Returns the row.
    pub fn wait_installed(
        &self,
        package: &str,
        dp: &str,
        revision: u64,
        limit: Duration,
    ) -> anyhow::Result<serde_json::Value> {
        wait_for(
            &format!("{dp} to install {package} r{revision}"),
            limit,
            || {
                let Some(row) = self.row(package, dp)? else {
                    return Ok(None);
                };
                if row["state"] == "installed" && row["revision"] == revision {
                    return Ok(Some(row));
                }
                Ok(None)
            },
        )
    }

    /// The JSON row of `ferry dp list` for `dp`.
    pub fn dp_row(&self, dp: &str) -> anyhow::Result<serde_json::Value> {
        self.cli_json(&["dp", "list"])?
            .as_array()
            .and_then(|a| a.iter().find(|r| r["name"] == dp).cloned())
            .with_context(|| format!("dp list has no {dp}"))
    }
}

/// A DP agent process with its own data folder.
pub struct DpProc {
    /// The DP's name.
    pub name: String,
    /// The data folder.
    pub data: PathBuf,
    /// Where the agent's log goes.
    pub log: PathBuf,
    /// Extra arguments of `ferry dp serve`.
    pub serve_args: Vec<String>,
    /// A command the agent runs under (`ip netns exec NAME`).
    pub exec_prefix: Vec<String>,
    child: Option<Child>,
}

impl DpProc {
    /// `ferry dp add NAME` on the site, `ferry dp init` in `dir/NAME`; not
    /// started yet.
    pub fn enroll(dir: &Path, name: &str, site: &SiteProc) -> anyhow::Result<Self> {
        Self::enroll_via(dir, name, site, &site.dp_addr(), &[])
    }

    /// Enrolls a DP that reaches the site at `site_addr`, running under
    /// `prefix` (`ip netns exec NAME` for a DP in a namespace).
    pub fn enroll_via(
        dir: &Path,
        name: &str,
        site: &SiteProc,
        site_addr: &str,
        prefix: &[String],
    ) -> anyhow::Result<Self> {
        Self::enroll_with(dir, name, site, site_addr, prefix, &[])
    }

    /// [`DpProc::enroll_via`] with more arguments for `ferry dp init`.
    pub fn enroll_with(
        dir: &Path,
        name: &str,
        site: &SiteProc,
        site_addr: &str,
        prefix: &[String],
        init_args: &[&str],
    ) -> anyhow::Result<Self> {
        let token = site.cli_json(&["dp", "add", name])?["token"]
            .as_str()
            .context("dp add printed no token")?
            .to_string();
        let data = dir.join(name);
        let mut cmd = match prefix.split_first() {
            Some((p, rest)) => {
                let mut c = Command::new(p);
                c.args(rest).arg(ferry_bin());
                c
            }
            None => Command::new(ferry_bin()),
        };
        let out = cmd
            .args([
                "dp", "init", "--site", site_addr, "--token", &token, "--data",
            ])
            .arg(&data)
            .args(init_args)
            .output()?;
        if !out.status.success() {
            bail!(
                "ferry dp init failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(Self {
            name: name.to_string(),
            log: dir.join(format!("{name}.log")),
            data,
            serve_args: Vec::new(),
            exec_prefix: prefix.to_vec(),
            child: None,
        })
    }

    /// Enrolls and starts.
    pub fn start(dir: &Path, name: &str, site: &SiteProc) -> anyhow::Result<Self> {
        let mut dp = Self::enroll(dir, name, site)?;
        dp.serve()?;
        Ok(dp)
    }

    /// Starts (or restarts) `ferry dp serve`.
    pub fn serve(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = match self.exec_prefix.split_first() {
            Some((p, rest)) => {
                let mut c = Command::new(p);
                c.args(rest).arg(ferry_bin());
                c
            }
            None => Command::new(ferry_bin()),
        };
        let child = cmd
            .args(["dp", "serve"])
            .args(&self.serve_args)
            .arg("--data")
            .arg(&self.data)
            .env("FERRY_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        Ok(())
    }

    /// Kills the agent at once (SIGKILL).
    pub fn kill(&mut self) {
        kill(&mut self.child);
    }

    /// Stops the agent gracefully (SIGTERM) and waits for it.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        stop(&mut self.child)
    }

    /// The agent's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// How the agent ended, if it has.
    pub fn exited(&mut self) -> anyhow::Result<Option<std::process::ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => Ok(c.try_wait()?),
            None => Ok(None),
        }
    }

    /// The DP's content folder.
    pub fn content(&self) -> PathBuf {
        self.data.join("content")
    }

    /// The agent's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for DpProc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            print_tail(&self.log);
        }
    }
}

/// The latest revision's stats of a package JSON, as `(logical, new)` bytes.
pub fn stats_of(pkg: &serde_json::Value) -> (u64, u64) {
    let st = &pkg["revisions"][pkg["revisions"]
        .as_array()
        .map_or(0, |r| r.len().saturating_sub(1))]["stats"];
    (
        st["logical_bytes"].as_u64().unwrap_or(0),
        st["new_bytes"].as_u64().unwrap_or(0),
    )
}
