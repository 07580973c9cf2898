//! What DP reports cost the site, and how fast `ferry status` and the web
//! status page answer, with 100 DPs × 20 packages in the registry and every
//! DP reporting progress on all of its packages four times a second; then,
//! with one more DP connecting and disconnecting in a loop on top (each
//! connection and each disconnection is a durable write of the registry).
//!
//! ```text
//! scripts/bench.sh --bench status
//! ```
//! The DPs are enrolled for real (`ferry dp add`, `ferry dp init`); this
//! program then speaks for them over QUIC with their own certificates, as
//! their agents would, sending the agents' `Report` frames. Writes
//! `$CARGO_TARGET_DIR/ferry-bench/status.md` and `.json`.

use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use ferry_benches::{cpu_time, root};
use ferry_site::web::pages::ROWS_PER_PAGE;
use ferry_tests::harness::{ferry_bin, SiteProc};
use ferry_tests::wimtools;
use ferry_wire::pb::{self, request};
use serde_json::json;

const DPS: usize = 100;
const PACKAGES: usize = 20;
const REPORTS_PER_SEC: u64 = 4;
/// How long the site's CPU is sampled, idle and under reports.
const WINDOW: Duration = Duration::from_secs(10);

/// Share of one core the site used over `window`.
fn core_share(pid: u32, window: Duration) -> anyhow::Result<f64> {
    let before = cpu_time(pid)?;
    std::thread::sleep(window);
    Ok((cpu_time(pid)? - before).as_secs_f64() / window.as_secs_f64())
}

/// One DP's connection to the site, as its agent makes it.
async fn connect(data: &Path, site: std::net::SocketAddr) -> anyhow::Result<quinn::Connection> {
    let read = |f: &str| fs::read_to_string(data.join(f)).with_context(|| f.to_string());
    let ca = ferry_net::pki::cert_der(&read("ca.pem")?, "site CA")?;
    let id = ferry_net::tls::Identity::from_pem(&read("dp.pem")?, &read("dp.key")?, "DP")?;
    let client = ferry_net::tls::dp_client(&ca, id, Default::default())?;
    let endpoint = ferry_net::tls::endpoint((std::net::Ipv4Addr::LOCALHOST, 0).into(), None)?;
    Ok(endpoint
        .connect_with(client, site, ferry_net::pki::SITE_SERVER_NAME)?
        .await?)
}

/// Opens the control stream and sends the `Watch` an agent starts with.
async fn watch(conn: &quinn::Connection) -> anyhow::Result<(quinn::SendStream, quinn::RecvStream)> {
    let (mut send, recv) = conn.open_bi().await?;
    let hello = pb::Request {
        kind: Some(request::Kind::Watch(pb::Watch {
            protocol: ferry_wire::PROTOCOL_VERSION,
            holdings: Vec::new(),
            disk: None,
            peer_address: String::new(),
        })),
    };
    ferry_wire::write_frame(&mut send, &hello).await?;
    Ok((send, recv))
}

/// Opens the control stream (a `Watch`, as the agent sends it), then sends
/// a progress report for each of `packages` every quarter second until
/// `stop`; drains the site's assignment pushes meanwhile.
async fn speak(
    conn: quinn::Connection,
    packages: Arc<Vec<(String, u32)>>,
    reporting: Arc<std::sync::atomic::AtomicBool>,
    sent: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let (mut send, mut recv) = watch(&conn).await?;
    tokio::spawn(async move {
        while let Ok(Some(_)) =
            ferry_wire::read_frame::<pb::Reply>(&mut recv, ferry_wire::MAX_REPLY_BYTES).await
        {
        }
    });
    let mut tick = tokio::time::interval(Duration::from_millis(1000 / REPORTS_PER_SEC));
    let mut done = 0u64;
    loop {
        tick.tick().await;
        if conn.close_reason().is_some() {
            anyhow::bail!("the site closed the connection");
        }
        if !reporting.load(Ordering::Relaxed) {
            continue;
        }
        done += 1 << 20;
        for (package, revision) in packages.iter() {
            let r = pb::Report {
                package: package.clone(),
                revision: *revision,
                state: pb::State::InProgress as i32,
                bytes_needed: 1 << 40,
                bytes_done: done,
                full_bytes: 1 << 40,
                wire_bytes: done + done / 50,
                manifest_bytes: 1 << 20,
                ..pb::Report::default()
            };
            ferry_wire::write_frame(&mut send, &r).await?;
            sent.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// One DP connecting, opening its control stream and leaving, again and
/// again until `stop`; counts the connections.
async fn churn(
    data: std::path::PathBuf,
    site: std::net::SocketAddr,
    stop: Arc<std::sync::atomic::AtomicBool>,
    cycles: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    while !stop.load(Ordering::Relaxed) {
        let conn = connect(&data, site).await?;
        let _control = watch(&conn).await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
        conn.close(0u32.into(), b"churn");
        conn.closed().await;
        cycles.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

/// `ferry status --json`, timed `runs` times: (median, slowest, rows
/// listed, rows showing reported progress).
fn time_status(site: &SiteProc, runs: usize) -> anyhow::Result<(Duration, Duration, usize, usize)> {
    let mut times = Vec::new();
    let (mut rows, mut moving) = (0, 0);
    for _ in 0..runs {
        let t = Instant::now();
        let out = std::process::Command::new(ferry_bin())
            .arg("--data")
            .arg(&site.data)
            .args(["status", "--json"])
            .output()?;
        times.push(t.elapsed());
        anyhow::ensure!(out.status.success(), "ferry status failed");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let list = v.as_array().context("status printed no list")?;
        rows = list.len();
        moving = list
            .iter()
            .filter(|r| r["state"] == "in-progress" && r["bytes_done"].as_u64() > Some(0))
            .count();
        std::thread::sleep(Duration::from_millis(100));
    }
    times.sort();
    Ok((times[times.len() / 2], times[times.len() - 1], rows, moving))
}

/// What one fetch of the status page measured (medians and slowest of the
/// fetches).
struct PageTimes {
    server_median: Duration,
    server_max: Duration,
    whole_median: Duration,
    /// Bytes of HTML.
    html: u64,
    /// Bytes on the wire (gzipped, as a browser asks for it).
    wire: u64,
    rows: usize,
}

/// The web status page's overview (`GET /ui/`, logged in, gzip accepted as
/// a browser does), fetched by curl `runs` times: the server's time (first
/// byte back after the request was sent) median and slowest, the whole
/// fetch's median, and the page's bytes and rows.
fn time_page(site: &SiteProc, cookie: &str, part: bool, runs: usize) -> anyhow::Result<PageTimes> {
    let (mut server, mut whole) = (Vec::new(), Vec::new());
    let (mut size, mut wire, mut rows) = (0, 0, 0);
    for _ in 0..runs {
        let mut c = std::process::Command::new("curl");
        c.args(["-sS", "--fail", "--compressed", "-b", cookie]);
        if part {
            c.args(["-H", "x-ferry-part: live"]);
        }
        let out = c
            .args([
                "-w",
                "\n%{time_pretransfer} %{time_starttransfer} %{time_total} %{size_download}",
            ])
            .arg(format!("http://127.0.0.1:{}/ui/", site.port))
            .output()?;
        anyhow::ensure!(out.status.success(), "GET /ui/: {out:?}");
        let text = String::from_utf8(out.stdout)?;
        let (body, times) = text.rsplit_once('\n').context("curl's times")?;
        let t: Vec<f64> = times.split(' ').map(str::parse).collect::<Result<_, _>>()?;
        server.push(Duration::from_secs_f64(t[1] - t[0]));
        whole.push(Duration::from_secs_f64(t[2]));
        wire = t[3] as u64;
        size = body.len() as u64;
        rows = body.matches("<tr data-package=").count();
        std::thread::sleep(Duration::from_millis(100));
    }
    server.sort();
    whole.sort();
    Ok(PageTimes {
        server_median: server[runs / 2],
        server_max: server[runs - 1],
        whole_median: whole[runs / 2],
        html: size,
        wire,
        rows,
    })
}

/// Logs in to the status page as a browser does; the session cookie.
fn login(site: &SiteProc) -> anyhow::Result<String> {
    let token = fs::read_to_string(site.data.join("operator.token"))?;
    let out = std::process::Command::new("curl")
        .args(["-sS", "-D", "-", "-o", "/dev/null", "-d"])
        .arg(format!("token={}", token.trim()))
        .arg(format!("http://127.0.0.1:{}/ui/login", site.port))
        .output()?;
    let head = String::from_utf8(out.stdout)?;
    let id = head
        .split_once("ferry_session=")
        .and_then(|(_, rest)| rest.split(';').next())
        .with_context(|| format!("no session cookie: {head}"))?;
    Ok(format!("ferry_session={id}"))
}

fn main() -> anyhow::Result<()> {
    if ferry_benches::listing() {
        return Ok(());
    }
    fs::create_dir_all(root())?;
    let work = tempfile::tempdir_in(root())?;
    let w = work.path();
    let site = SiteProc::start(w)?;
    let pid = site.pid().context("site pid")?;

    // 20 packages: small WIMs of distinct content.
    let mut packages = Vec::new();
    for i in 0..PACKAGES {
        let tree = w.join(format!("tree{i}"));
        fs::create_dir_all(&tree)?;
        fs::write(
            tree.join("setup.txt"),
            format!("package {i}\n").repeat(1000),
        )?;
        let wim = w.join(format!("p{i}.wim"));
        wimtools::capture(&tree, &wim, &format!("P{i}"), "LZX", &[])?;
        let pkg = site.add_image(&wim, &[])?;
        let id = pkg["id"].as_str().context("id")?.to_string();
        packages.push((id, 1u32));
    }
    // 100 enrolled DPs, one group holding all 20 packages; one more that
    // only connects and disconnects.
    let names: Vec<String> = (0..DPS).map(|i| format!("dp{i:03}")).collect();
    let churner = "churn".to_string();
    let mut dirs = Vec::new();
    for name in names.iter().chain([&churner]) {
        let token = site.cli_json(&["dp", "add", name])?["token"]
            .as_str()
            .context("token")?
            .to_string();
        let data = w.join(name);
        let out = std::process::Command::new(ferry_bin())
            .args(["dp", "init", "--site", &site.dp_addr(), "--token", &token])
            .arg("--data")
            .arg(&data)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "dp init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        dirs.push(data);
    }
    site.cli_ok(&["group", "create", "all"])?;
    let mut add = vec!["group", "add", "all"];
    add.extend(names.iter().map(String::as_str));
    site.cli_ok(&add)?;
    for (id, _) in &packages {
        site.cli_ok(&["distribute", id, "--group", "all"])?;
    }

    let churn_dir = dirs.pop().context("the churning DP")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let addr: std::net::SocketAddr = site.dp_addr().parse()?;
    let reporting = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let pk = Arc::new(packages.clone());
    rt.block_on(async {
        for d in &dirs {
            let conn = connect(d, addr).await?;
            let (pk, reporting, sent) = (pk.clone(), reporting.clone(), sent.clone());
            tokio::spawn(async move {
                if let Err(e) = speak(conn, pk, reporting, sent).await {
                    eprintln!("a DP stopped: {e:#}");
                }
            });
        }
        anyhow::Ok(())
    })?;
    // Connected and silent: the site's baseline.
    std::thread::sleep(Duration::from_secs(2));
    let idle = core_share(pid, WINDOW)?;
    let (idle_median, idle_max, ..) = time_status(&site, 15)?;
    // Everyone reports; the first report of each transfer is written to
    // the registry (a new state), so measure after that settles.
    reporting.store(true, Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs(5));
    let before = sent.load(Ordering::Relaxed);
    let busy = core_share(pid, WINDOW)?;
    let rate = (sent.load(Ordering::Relaxed) - before) as f64 / WINDOW.as_secs_f64();
    let (median, max, rows, moving) = time_status(&site, 15)?;
    let cookie = login(&site)?;
    let page = time_page(&site, &cookie, false, 15)?;
    let part = time_page(&site, &cookie, true, 15)?;
    anyhow::ensure!(
        page.rows == ROWS_PER_PAGE.min(DPS * PACKAGES),
        "the status page showed {} rows, not {}",
        page.rows,
        ROWS_PER_PAGE.min(DPS * PACKAGES)
    );
    // And one DP connecting and leaving in a loop.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let cycles = Arc::new(AtomicU64::new(0));
    let churning = rt.spawn(churn(churn_dir.clone(), addr, stop.clone(), cycles.clone()));
    std::thread::sleep(Duration::from_secs(2));
    let c0 = cycles.load(Ordering::Relaxed);
    let t0 = Instant::now();
    let (churn_median, churn_max, churn_rows, _) = time_status(&site, 15)?;
    let churn_rate = (cycles.load(Ordering::Relaxed) - c0) as f64 / t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    rt.block_on(churning)??;
    reporting.store(false, Ordering::Relaxed);
    anyhow::ensure!(
        churn_rows == DPS * PACKAGES,
        "status listed {churn_rows} rows during the churn"
    );
    anyhow::ensure!(
        rows == DPS * PACKAGES && moving == rows,
        "status listed {rows} rows ({moving} with reported progress), not {}",
        DPS * PACKAGES
    );
    let reports_share = busy - idle;
    let report = format!(
        "## DP reports and `ferry status` ({DPS} DPs × {PACKAGES} packages)\n\n\
Every DP connected over QUIC with its own certificate, reporting progress on each of its {PACKAGES} packages {REPORTS_PER_SEC}× a second: {rate:.0} reports/s measured.\n\n\
| | site CPU (share of one core) | `ferry status --json` median | slowest of 15 |\n|---|---:|---:|---:|\n\
| DPs connected, silent | {:.1} % | {:.0} ms | {:.0} ms |\n\
| every DP reporting | {:.1} % | {:.0} ms | {:.0} ms |\n\
| every DP reporting, one more connecting and leaving ({churn_rate:.1}/s) | | {:.0} ms | {:.0} ms |\n\n\
CPU for the reports: {:.1} % of a core. `ferry status` lists {rows} rows (process start included).\n\n\
The web status page with every DP reporting, logged in, fetched by curl 15 times: server time (request sent to first byte) \
median {:.1} ms, slowest {:.1} ms; whole fetch median {:.1} ms; {} KiB of HTML, {} KiB gzipped on the wire, \
its first {} rows of {} (failed first; `?page=` and `?state=` show the rest). \
Its live part alone (what the page's script fetches every 2 s): median {:.1} ms, slowest {:.1} ms.\n",
        idle * 100.0,
        idle_median.as_secs_f64() * 1000.0,
        idle_max.as_secs_f64() * 1000.0,
        busy * 100.0,
        median.as_secs_f64() * 1000.0,
        max.as_secs_f64() * 1000.0,
        churn_median.as_secs_f64() * 1000.0,
        churn_max.as_secs_f64() * 1000.0,
        reports_share * 100.0,
        page.server_median.as_secs_f64() * 1000.0,
        page.server_max.as_secs_f64() * 1000.0,
        page.whole_median.as_secs_f64() * 1000.0,
        page.html / 1024,
        page.wire / 1024,
        page.rows,
        DPS * PACKAGES,
        part.server_median.as_secs_f64() * 1000.0,
        part.server_max.as_secs_f64() * 1000.0,
    );
    let results = json!({
        "dps": DPS, "packages": PACKAGES, "reports_per_sec": rate,
        "site_core_idle": idle, "site_core_busy": busy, "site_core_for_reports": reports_share,
        "status_ms_idle_median": idle_median.as_secs_f64() * 1000.0,
        "status_ms_median": median.as_secs_f64() * 1000.0,
        "status_ms_max": max.as_secs_f64() * 1000.0,
        "churn_connections_per_sec": churn_rate,
        "status_ms_churn_median": churn_median.as_secs_f64() * 1000.0,
        "status_ms_churn_max": churn_max.as_secs_f64() * 1000.0,
        "rows": rows,
        "page_server_ms_median": page.server_median.as_secs_f64() * 1000.0,
        "page_server_ms_max": page.server_max.as_secs_f64() * 1000.0,
        "page_fetch_ms_median": page.whole_median.as_secs_f64() * 1000.0,
        "page_bytes": page.html,
        "page_wire_bytes": page.wire,
        "page_rows": page.rows,
        "page_live_ms_median": part.server_median.as_secs_f64() * 1000.0,
        "page_live_ms_max": part.server_max.as_secs_f64() * 1000.0,
        "page_live_wire_bytes": part.wire,
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    drop(site);
    ferry_benches::save("status", &report, &results)
}
