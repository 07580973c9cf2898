//! Pull DPs: DPs that take their chunks from other DPs (`ferry dp set
//! NAME --pull-from SRC`) over QUIC with mutual TLS, on hosts of one
//! Ethernet segment (a bridge, a namespace per DP); the site's own bytes
//! are counted by the kernel on the bridge.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_tests::harness::{wait_for, DpProc, SiteProc};
use ferry_tests::netns::Bridge;
use ferry_tests::tree::TreeSpec;
use ferry_tests::wimtools::{self, ServiceSpec};

const LIMIT: Duration = Duration::from_secs(180);
/// Where sources serve pull DPs, in their namespaces.
const PEER_LISTEN: &str = "0.0.0.0:7444";

fn same_file(a: &Path, b: &Path) -> bool {
    let (x, y) = (fs::read(a).unwrap(), fs::read(b).unwrap());
    x.len() == y.len() && blake3::hash(&x) == blake3::hash(&y)
}

/// A site on a bridge and a DP per host; those named in `sources` serve
/// pull DPs.
struct Lab {
    seg: Bridge,
    site: SiteProc,
    dps: Vec<DpProc>,
    dir: tempfile::TempDir,
}

impl Lab {
    fn new(tag: &str, n: u8, names: &[&str], sources: &[&str]) -> Self {
        let seg = Bridge::create(tag, n, names).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let site = SiteProc::start_at(dir.path(), "site", &seg.ip, &[]).unwrap();
        let mut dps = Vec::new();
        for (name, host) in names.iter().zip(&seg.hosts) {
            let args: &[&str] = if sources.contains(name) {
                &["--peer-listen", PEER_LISTEN]
            } else {
                &[]
            };
            let mut dp = DpProc::enroll_with(
                dir.path(),
                name,
                &site,
                &site.dp_addr(),
                &host.exec_prefix(),
                args,
            )
            .unwrap();
            dp.serve().unwrap();
            dps.push(dp);
        }
        let lab = Self {
            seg,
            site,
            dps,
            dir,
        };
        for s in sources {
            lab.wait_peer_address(s);
        }
        lab
    }

    fn dp(&mut self, name: &str) -> &mut DpProc {
        self.dps.iter_mut().find(|d| d.name == name).unwrap()
    }

    fn path(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// Waits until the site knows where source `dp` serves pull DPs: its
    /// address on the segment and the port of its [peers] listener.
    fn wait_peer_address(&self, dp: &str) {
        let host = &self.seg.hosts[self.dps.iter().position(|d| d.name == dp).unwrap()];
        let want = format!("{}:7444", host.ip);
        wait_for(&format!("{dp}'s peer address"), LIMIT, || {
            let row = self.site.dp_row(dp)?;
            Ok((row["peer_address"] == want.as_str()).then_some(()))
        })
        .unwrap();
    }

    /// The sources of a status row: (source, bytes) pairs.
    fn sources(row: &serde_json::Value) -> Vec<(String, u64)> {
        row["sources"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|s| {
                        (
                            s["source"].as_str().unwrap().to_string(),
                            s["bytes"].as_u64().unwrap(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[test]
fn pull_dps_take_the_image_from_their_source_then_the_delta_and_loops_are_refused() {
    let lab = Lab::new("pull", 61, &["dp1", "dp2", "dp3", "dp4"], &["dp3"]);
    let site = &lab.site;
    site.cli_ok(&["dp", "set", "dp1", "--pull-from", "dp3"])
        .unwrap();
    site.cli_ok(&["dp", "set", "dp2", "--pull-from", "dp3:1"])
        .unwrap();

    // What cannot be: a loop, itself, an unknown source; nothing changes.
    let e = site.cli(&["dp", "set", "dp3", "--pull-from", "dp4,dp1:2"]);
    let err = String::from_utf8_lossy(&e.stderr);
    assert!(!e.status.success(), "a loop is refused");
    assert!(
        err.contains("loop") && err.contains("dp3 → dp1 → dp3"),
        "{err}"
    );
    let e = site.cli(&["dp", "set", "dp3", "--pull-from", "dp3"]);
    assert!(String::from_utf8_lossy(&e.stderr).contains("itself"));
    let e = site.cli(&["dp", "set", "dp4", "--pull-from", "nosuch"]);
    assert!(!e.status.success());
    assert!(String::from_utf8_lossy(&e.stderr).contains("nosuch"));
    let e = site.cli(&["dp", "set", "dp4", "--pull-from", "dp3:x"]);
    assert!(String::from_utf8_lossy(&e.stderr).contains("rank"));
    for dp in ["dp3", "dp4"] {
        let row = site.dp_row(dp).unwrap();
        assert!(row.get("pull_from").is_none(), "{dp}: {row}");
    }
    let row = site.dp_row("dp1").unwrap();
    assert_eq!(row["pull_from"][0]["dp"], "dp3");
    let show = String::from_utf8(site.cli(&["dp", "show", "dp1"]).stdout).unwrap();
    assert!(show.contains("pulls from dp3 (rank 1)"), "{show}");
    let show = String::from_utf8(site.cli(&["dp", "show", "dp3"]).stdout).unwrap();
    assert!(show.contains("serves pull DPs on 10.78.61."), "{show}");

    let spec = TreeSpec {
        files: 1500,
        seed: 61,
        ..TreeSpec::default()
    };
    let dir = lab.path();
    let pair = wimtools::serviced_pair(&dir, &spec, "LZX", &ServiceSpec::default()).unwrap();
    let full = fs::metadata(&pair.base).unwrap().len();
    let pkg = site.add_image(&pair.base, &[]).unwrap();
    let id = pkg["id"].as_str().unwrap().to_string();

    let before = lab.seg.local_sent_bytes().unwrap();
    site.cli_ok(&["distribute", &id, "--dp", "dp1", "dp2", "dp3", "dp4"])
        .unwrap();
    for dp in &lab.dps {
        site.wait_installed(&id, &dp.name, 1, LIMIT).unwrap();
        assert!(
            same_file(&dp.content().join(&id).join("base.wim"), &pair.base),
            "{} holds a different file",
            dp.name
        );
    }
    let sent = lab.seg.local_sent_bytes().unwrap() - before;
    eprintln!(
        "one distribution to 4 DPs (2 pulling): the site sent {sent} bytes, {:.2} images of {full}",
        sent as f64 / full as f64
    );
    assert!(
        sent as f64 <= 2.2 * full as f64,
        "the site sent {sent} bytes, more than 2.2 images of {full}"
    );
    for (dp, from) in [
        ("dp1", "dp3"),
        ("dp2", "dp3"),
        ("dp3", "site"),
        ("dp4", "site"),
    ] {
        let row = site.row(&id, dp).unwrap().unwrap();
        let sources = Lab::sources(&row);
        assert_eq!(sources.len(), 1, "{dp}: {row}");
        assert_eq!(sources[0].0, from, "{dp}: {row}");
        assert!(sources[0].1 > 0, "{dp}: {row}");
    }
    let status = String::from_utf8(site.cli(&["status", &id, "--dp", "dp1"]).stdout).unwrap();
    let words: Vec<&str> = status.split_whitespace().collect();
    assert!(words.contains(&"dp3"), "{status}");

    // Serviced: the pull DPs get the delta, from their source again.
    site.refresh(&id, &pair.serviced).unwrap();
    for dp in &lab.dps {
        let row = site.wait_installed(&id, &dp.name, 2, LIMIT).unwrap();
        assert!(
            same_file(&dp.content().join(&id).join("base.wim"), &pair.serviced),
            "{} did not move to r2",
            dp.name
        );
        let needed = row["bytes_needed"].as_u64().unwrap();
        assert!(
            needed > 0 && needed < full / 2,
            "{}: a delta of {needed} bytes of {full}",
            dp.name
        );
        if ["dp1", "dp2"].contains(&dp.name.as_str()) {
            let sources = Lab::sources(&row);
            assert_eq!(sources.len(), 1, "{}: {row}", dp.name);
            assert_eq!(sources[0].0, "dp3", "{}: {row}", dp.name);
            assert!(sources[0].1 <= needed, "{}: {row}", dp.name);
        }
    }
    // The source logged what it served.
    let log = lab.dps[2].log_text();
    assert!(log.contains("serving a pull DP"), "{log}");
}

#[test]
fn a_pull_dp_whose_source_dies_mid_transfer_finishes_from_the_site() {
    let mut lab = Lab::new("pullfail", 62, &["dp1", "dp3"], &["dp3"]);
    let dir = lab.path();
    let wim = wimtools::big_wim(&dir, 64, 62).unwrap();
    let pkg = lab.site.add_image(&wim, &[]).unwrap();
    let id = pkg["id"].as_str().unwrap().to_string();
    let site = &lab.site;
    site.cli_ok(&["distribute", &id, "--dp", "dp3"]).unwrap();
    site.wait_installed(&id, "dp3", 1, LIMIT).unwrap();
    // 6 MB/s: the source holds dp1 to it too (the grant carries it), so
    // the transfer lasts long enough to kill the source in the middle.
    site.cli_ok(&["dp", "set", "dp1", "--pull-from", "dp3", "--rate", "6M"])
        .unwrap();
    site.cli_ok(&["distribute", &id, "--dp", "dp1"]).unwrap();
    let started = std::time::Instant::now();
    let row = wait_for("dp1 to receive from dp3", LIMIT, || {
        let Some(row) = site.row(&id, "dp1")? else {
            return Ok(None);
        };
        let done = row["bytes_done"].as_u64().unwrap_or(0);
        Ok((row["state"] == "in-progress" && done > 8 << 20).then_some(row))
    })
    .unwrap();
    let secs = started.elapsed().as_secs_f64();
    let done = row["bytes_done"].as_u64().unwrap();
    eprintln!("dp1 had {done} bytes from dp3 after {secs:.1} s");
    assert_eq!(Lab::sources(&row)[0].0, "dp3", "{row}");
    // The source paces dp1 at its rate: far below what the link moves.
    assert!(
        done as f64 / secs <= 6e6 * 1.5,
        "{done} bytes in {secs:.1} s: the source did not hold dp1's rate"
    );
    lab.dp("dp3").kill();
    let site = &lab.site;
    let row = site.wait_installed(&id, "dp1", 1, LIMIT).unwrap();
    let sources = Lab::sources(&row);
    eprintln!("dp1 got its bytes from {sources:?}");
    let names: Vec<&str> = sources.iter().map(|s| s.0.as_str()).collect();
    assert_eq!(names, ["dp3", "site"], "{row}");
    assert!(sources.iter().all(|s| s.1 > 0), "{row}");
    assert!(same_file(
        &lab.dps[0]
            .content()
            .join(&id)
            .join(wim.file_name().unwrap()),
        &wim
    ));
    let log = lab.dps[0].log_text();
    assert!(log.contains("a source DP failed"), "{log}");
}
