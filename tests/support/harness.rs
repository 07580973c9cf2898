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

/// A site server process with its own data folder.
pub struct SiteProc {
    /// The data folder.
    pub data: PathBuf,
    /// The operator API port.
    pub port: u16,
    /// Where the server's log goes.
    pub log: PathBuf,
    child: Option<Child>,
}

impl SiteProc {
    /// `ferry site init` in `dir/site`, then `ferry site serve`.
    pub fn start(dir: &Path) -> anyhow::Result<Self> {
        let bin = ferry_bin();
        if !bin.exists() {
            bail!(
                "{} is not built: run `cargo build -p ferry-cli` first (scripts/test.sh does)",
                bin.display()
            );
        }
        let data = dir.join("site");
        let port = free_port()?;
        let out = Command::new(&bin)
            .args([
                "site",
                "init",
                "--listen",
                &format!("127.0.0.1:{port}"),
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
            log: dir.join("site.log"),
            data,
            port,
            child: None,
        };
        site.serve()?;
        Ok(site)
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
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the server gracefully (SIGTERM) and waits for it.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status()?;
            c.wait()?;
        }
        Ok(())
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
