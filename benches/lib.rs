//! Ferry's benchmarks. `chunking` is criterion (chunkers and hashing);
//! `compare` runs real `ferry` processes beside b3sum, casync and rsync on
//! the same files; `distribution` measures site → DP transfers beside an
//! rsync daemon, casync and zsync. This file holds what they share. Results and the commands that reproduce them are in
//! BENCHMARKS.md.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ferry_tests::harness::{free_port, wait_for};
use ferry_tests::tree::{make_tree, TreeSpec};
use ferry_tests::wimtools::{self, ServiceSpec, ServicedPair};

/// Where fixtures and results go: `$CARGO_TARGET_DIR/ferry-bench`.
pub fn root() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target"));
    target.join("ferry-bench")
}

/// A WIM captured from a generated tree, made once and cached.
pub fn cached_wim(name: &str, spec: &TreeSpec, min_bytes: u64) -> anyhow::Result<PathBuf> {
    let dir = root().join(name);
    let wim = dir.join(format!("{name}.wim"));
    if wim.exists() && fs::metadata(&wim)?.len() >= min_bytes {
        return Ok(wim);
    }
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    eprintln!("making {} ({} files)…", wim.display(), spec.files);
    make_tree(&dir.join("tree"), spec)?;
    wimtools::capture(
        &dir.join("tree"),
        &wim,
        "Windows 11 Enterprise",
        "LZX",
        wimtools::WINDOWS_PROPS,
    )?;
    fs::remove_dir_all(dir.join("tree"))?;
    let len = fs::metadata(&wim)?.len();
    if len < min_bytes {
        bail!(
            "{} is {len} bytes, less than {min_bytes}: raise the file count",
            wim.display()
        );
    }
    Ok(wim)
}

/// Whether cargo only asks for the list of benches (`--list`): the
/// end-to-end benches then run nothing.
pub fn listing() -> bool {
    std::env::args().any(|a| a == "--list")
}

/// Whether section `name` runs: all do unless `FERRY_BENCH_ONLY` lists
/// some (comma-separated).
pub fn section(name: &str) -> bool {
    std::env::var("FERRY_BENCH_ONLY").map_or(true, |o| o.split(',').any(|x| x == name))
}

/// Prints `report` and writes it and `results` to `NAME.md` and
/// `NAME.json` under [`root`].
pub fn save(name: &str, report: &str, results: &serde_json::Value) -> anyhow::Result<()> {
    println!("{report}");
    fs::create_dir_all(root())?;
    fs::write(root().join(format!("{name}.md")), report)?;
    fs::write(
        root().join(format!("{name}.json")),
        serde_json::to_string_pretty(results)?,
    )?;
    Ok(())
}

/// Runs a command and returns its wall time and output; fails if it fails.
pub fn timed(cmd: &mut Command) -> anyhow::Result<(Duration, String)> {
    let t = Instant::now();
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    let d = t.elapsed();
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok((
        d,
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    ))
}

/// A process's CPU time so far (user + system), from `/proc/PID/stat`.
pub fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses.
    let rest = &stat[stat.rfind(')').context("stat format")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    Ok(Duration::from_secs_f64(ticks as f64 / USER_HZ))
}

/// Clock ticks per second in `/proc` (the kernel's USER_HZ, 100 on Linux
/// whatever its internal tick).
const USER_HZ: f64 = 100.0;

/// Peak resident memory of a process (VmHWM), in bytes.
pub fn peak_rss(pid: u32) -> anyhow::Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .context("no VmHWM")?;
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .context("VmHWM value")?
        .parse()?;
    Ok(kb * 1024)
}

/// Total size of the files under `dir`.
pub fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            total += if p.is_dir() {
                dir_bytes(&p)
            } else {
                fs::metadata(&p).map(|m| m.len()).unwrap_or(0)
            };
        }
    }
    total
}

/// Megabytes (10^6) per second.
pub fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64()
}

/// Bytes of casync chunk files a client that has `base` must fetch for `new`.
pub fn casync_new_chunks(base: &Path, new: &Path) -> anyhow::Result<u64> {
    let dir = tempfile::tempdir_in(root())?;
    let store = dir.path().join("store.castr");
    timed(
        Command::new("casync")
            .arg("make")
            .arg(format!("--store={}", store.display()))
            .arg(dir.path().join("a.caibx"))
            .arg(base),
    )?;
    let before = dir_bytes(&store);
    timed(
        Command::new("casync")
            .arg("make")
            .arg(format!("--store={}", store.display()))
            .arg(dir.path().join("b.caibx"))
            .arg(new),
    )?;
    Ok(dir_bytes(&store) - before)
}

/// The benches' serviced pair (3,000 files, LZX, default servicing), made
/// afresh in `dir`.
pub fn serviced_pair(dir: &Path) -> anyhow::Result<ServicedPair> {
    let _ = fs::remove_dir_all(dir);
    wimtools::serviced_pair(
        dir,
        &TreeSpec {
            files: 3000,
            seed: 21,
            ..TreeSpec::default()
        },
        "LZX",
        &ServiceSpec::default(),
    )
}

/// The ≥ 1 GiB WIM (16,000 files, LZX), made once and cached.
pub fn big_wim() -> anyhow::Result<PathBuf> {
    cached_wim(
        "big",
        &TreeSpec {
            files: 16_000,
            seed: 11,
            size_scale: 2.5,
            duplicates: 0.03,
        },
        1 << 30,
    )
}

/// The ≥ 200 MiB WIM (4,000 files, LZX), made once and cached.
pub fn small_wim() -> anyhow::Result<PathBuf> {
    cached_wim(
        "small",
        &TreeSpec {
            files: 4_000,
            seed: 12,
            size_scale: 2.5,
            duplicates: 0.03,
        },
        200 << 20,
    )
}

/// A child process killed when dropped.
pub struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An rsync daemon on 127.0.0.1 serving `dir` as module `m`.
pub fn rsync_daemon(dir: &Path, work: &Path) -> anyhow::Result<(Daemon, u16)> {
    rsync_daemon_at(dir, work, "127.0.0.1")
}

/// An rsync daemon on `address` serving `dir` as module `m`.
pub fn rsync_daemon_at(dir: &Path, work: &Path, address: &str) -> anyhow::Result<(Daemon, u16)> {
    let port = free_port()?;
    let conf = work.join("rsyncd.conf");
    fs::write(
        &conf,
        format!(
            "use chroot = no\nport = {port}\naddress = {address}\npid file = {}\n[m]\npath = {}\nread only = yes\n",
            work.join("rsyncd.pid").display(),
            dir.display()
        ),
    )?;
    let child = Command::new("rsync")
        .args(["--daemon", "--no-detach", "--config"])
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let d = Daemon(child);
    wait_for("rsync daemon", Duration::from_secs(10), || {
        Ok(std::net::TcpStream::connect((address, port)).ok().map(drop))
    })?;
    Ok((d, port))
}

/// `rsync --stats` through the daemon; returns (time, bytes received).
pub fn rsync_get(
    port: u16,
    file: &str,
    dest: &Path,
    whole: bool,
) -> anyhow::Result<(Duration, u64)> {
    rsync_get_via(&[], "127.0.0.1", port, file, dest, whole)
}

/// [`rsync_get`] from a daemon at `host`, run under `prefix` (`ip netns
/// exec NAME` for a client in a namespace).
pub fn rsync_get_via(
    prefix: &[String],
    host: &str,
    port: u16,
    file: &str,
    dest: &Path,
    whole: bool,
) -> anyhow::Result<(Duration, u64)> {
    let mut cmd = match prefix.split_first() {
        Some((p, rest)) => {
            let mut c = Command::new(p);
            c.args(rest).arg("rsync");
            c
        }
        None => Command::new("rsync"),
    };
    let (d, out) = timed(
        cmd.args(["--stats", "--inplace"])
            .arg(if whole {
                "--whole-file"
            } else {
                "--no-whole-file"
            })
            .arg(format!("rsync://{host}:{port}/m/{file}"))
            .arg(dest),
    )?;
    let line = out
        .lines()
        .find(|l| l.starts_with("Total bytes received:"))
        .context("rsync printed no byte count")?;
    let n: String = line.chars().filter(char::is_ascii_digit).collect();
    Ok((d, n.parse()?))
}
