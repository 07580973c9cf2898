//! Ten computers receiving one image from one DP: by multicast (one
//! session, `ferry client multicast`) beside ten HTTPS downloads (`ferry
//! client fetch`) from the same DP, in one run, without loss and with 5 %
//! random loss at every computer (nftables in its namespace: UDP for the
//! session, the DP's TCP segments for HTTPS). The DP and the computers are
//! network namespaces on one Linux bridge; the DP's egress is what the
//! kernel counted on its veth.
//!
//! ```text
//! scripts/bench.sh --bench multicast
//! ```
//! Uses `$FERRY_BIN` (bench.sh: the release build) and the cached ≥ 1 GiB
//! bench WIM. Writes `$CARGO_TARGET_DIR/ferry-bench/multicast.md` and
//! `.json`. `FERRY_BENCH_CLIENTS` changes the number of computers (10).

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ferry_benches::root;
use ferry_tests::harness::{ferry_bin, wait_for, DpProc, SiteProc};
use ferry_tests::netns::Bridge;
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(3600);
const PORTS: &str = "63000-63010";
/// The session's rate: what a branch's switch port takes without trouble.
const RATE: &str = "200Mbit";

struct Row {
    name: String,
    egress: u64,
    seconds: f64,
    dp_cpu: f64,
    detail: String,
}

fn wait_all(children: Vec<Child>) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut out = Vec::new();
    for c in children {
        let o = c.wait_with_output()?;
        if !o.status.success() {
            bail!(
                "a client failed: {}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        out.push(serde_json::from_slice(&o.stdout).context("client JSON")?);
    }
    Ok(out)
}

fn main() -> anyhow::Result<()> {
    if ferry_benches::listing() {
        return Ok(());
    }
    let n: usize = std::env::var("FERRY_BENCH_CLIENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let wim = ferry_benches::big_wim()?;
    let image_bytes = fs::metadata(&wim)?.len();
    fs::create_dir_all(root())?;
    let work = tempfile::tempdir_in(root())?;
    let w = work.path();
    let mut names = vec!["dp".to_string()];
    names.extend((0..n).map(|i| format!("pc{i}")));
    let hosts: Vec<&str> = names.iter().map(String::as_str).collect();
    let seg = Bridge::create("bmcast", 51, &hosts)?;
    let dp_host = &seg.hosts[0];
    let pcs = &seg.hosts[1..];
    let site = SiteProc::start_at(w, "site", &seg.ip, &[])?;
    let listen = format!("{}:8443", dp_host.ip);
    let mut dp = DpProc::enroll_with(
        w,
        "dp1",
        &site,
        &format!("{}:{}", seg.ip, site.dp_port),
        &dp_host.exec_prefix(),
        &["--client-listen", &listen, "--client-name", &dp_host.ip],
    )?;
    dp.serve()?;
    let id = site.add_image(&wim, &["--name", "bench", "--no-verify"])?["id"]
        .as_str()
        .context("id")?
        .to_string();
    site.cli_ok(&["image", "multicast", &id, "--allow"])?;
    site.cli_ok(&[
        "dp",
        "multicast",
        "dp1",
        "--enable",
        "--ports",
        PORTS,
        "--rate",
        RATE,
        "--min-clients",
        &n.to_string(),
        "--start-delay",
        "120s",
    ])?;
    site.cli_ok(&["distribute", &id, "--dp", "dp1"])?;
    site.wait_installed(&id, "dp1", 1, LIMIT)?;
    let token = site.cli_json(&["client", "token", "create", "--name", "bench"])?["token"]
        .as_str()
        .context("token")?
        .to_string();
    let ca = site.data.join("ca.pem");
    let base = format!("https://{listen}");
    wait_for("the DP's multicast settings", LIMIT, || {
        let out = Command::new("curl")
            .args(["-s", "--cacert"])
            .arg(&ca)
            .args(["-H", &format!("Authorization: Bearer {token}")])
            .arg(format!("{base}/multicast/"))
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .contains(&format!("\"{id}\""))
            .then_some(()))
    })?;
    let pid = dp.pid().context("the DP is not running")?;
    let wim_name = wim.file_name().context("name")?.to_owned();
    let want = blake3::hash(&fs::read(&wim)?);

    let client = |i: usize, mode: &str, out: &PathBuf| -> anyhow::Result<Child> {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &pcs[i].ns]).arg(ferry_bin());
        c.args(["client", mode, "--dp", &base, &id, "--out"])
            .arg(out)
            .args(["--token", &token, "--ca"])
            .arg(&ca)
            .arg("--json");
        if mode == "multicast" {
            c.args(["--stall", "120s", "--timeout", "2h"]);
        }
        Ok(c.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?)
    };
    let mut rows = Vec::new();
    for (mode, loss) in [
        ("fetch", 0),
        ("multicast", 0),
        ("fetch", 5),
        ("multicast", 5),
    ] {
        let name = format!(
            "{n} × {} {}",
            if mode == "fetch" {
                "`ferry client fetch` (HTTPS), at once"
            } else {
                "`ferry client multicast`, one session"
            },
            if loss > 0 {
                format!("with {loss} % loss at each computer")
            } else {
                "without loss".into()
            }
        );
        eprintln!("{name}");
        for p in pcs {
            p.clear_drops();
            if loss > 0 {
                if mode == "fetch" {
                    p.drop_tcp_from(8443, loss)?;
                } else {
                    p.drop_udp(PORTS, loss)?;
                }
            }
        }
        Command::new("sync").status()?;
        let outs: Vec<PathBuf> = (0..n)
            .map(|i| w.join(format!("{mode}{loss}-pc{i}")))
            .collect();
        let (sent0, cpu0) = (dp_host.sent_bytes()?, ferry_benches::cpu_time(pid)?);
        let t = Instant::now();
        let children = (0..n)
            .map(|i| client(i, mode, &outs[i]))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let reports = wait_all(children)?;
        let seconds = t.elapsed().as_secs_f64();
        let egress = dp_host.sent_bytes()? - sent0;
        let dp_cpu = (ferry_benches::cpu_time(pid)? - cpu0).as_secs_f64();
        // Every client checked every chunk; one file is hashed here too.
        anyhow::ensure!(
            blake3::hash(&fs::read(outs[0].join(&wim_name))?) == want,
            "{name}: the first client's image differs"
        );
        let detail = if mode == "multicast" {
            let r = &reports[0];
            let https: u64 = reports
                .iter()
                .map(|r| r["bytes_https"].as_u64().unwrap_or(0))
                .sum();
            format!(
                "session {}, {} pass(es) heard; {} blocks rebuilt from repair symbols at the first computer; {} B over HTTPS in all",
                r["session"].as_str().unwrap_or("?"),
                reports.iter().map(|r| r["passes"].as_u64().unwrap_or(0)).max().unwrap_or(0),
                r["datagrams"]["blocks_repaired"],
                https
            )
        } else {
            String::new()
        };
        for o in &outs {
            let _ = fs::remove_dir_all(o);
        }
        rows.push(Row {
            name,
            egress,
            seconds,
            dp_cpu,
            detail,
        });
    }
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let mut report = format!(
        "### {n} computers receiving one image from one DP: multicast beside HTTPS (release build)\n\n\
         The DP and {n} computers are network namespaces on one Linux bridge; the image is the \
         {:.2} GiB bench WIM. Multicast: one session at {RATE}, 5 % repair symbols in the first \
         pass. Egress: bytes the kernel counted leaving the DP's veth. Loss: nftables in each \
         computer's namespace drops that share of the session's datagrams (or of the DP's TCP \
         segments, for HTTPS) at random.\n\n\
         | how | DP egress | × the image | time until all are done | DP CPU s | notes |\n|---|---|---|---|---|---|\n",
        gib(image_bytes)
    );
    for r in &rows {
        report += &format!(
            "| {} | {:.2} GiB | {:.2}× | {:.1} s | {:.1} | {} |\n",
            r.name,
            gib(r.egress),
            r.egress as f64 / image_bytes as f64,
            r.seconds,
            r.dp_cpu,
            r.detail
        );
    }
    report += &format!(
        "\nDP egress, multicast / HTTPS: **{:.3}×** without loss, **{:.3}×** with 5 % loss.\n",
        rows[1].egress as f64 / rows[0].egress as f64,
        rows[3].egress as f64 / rows[2].egress as f64,
    );
    ferry_benches::save(
        "multicast",
        &report,
        &json!({
            "clients": n, "image_bytes": image_bytes, "rate": RATE,
            "rows": rows.iter().map(|r| json!({
                "name": r.name, "egress_bytes": r.egress, "seconds": r.seconds,
                "dp_cpu_seconds": r.dp_cpu, "detail": r.detail,
            })).collect::<Vec<_>>(),
        }),
    )?;
    dp.stop()?;
    Ok(())
}
