//! Soak: a site and 4 DPs distributing and servicing 3 packages while the
//! site and the DPs are killed with SIGKILL at random moments (at least 50
//! kills, `FERRY_SOAK_KILLS` for more), then left alone: every DP must end
//! with the released revision of every package, byte for byte what the
//! site exports; the site's library must verify clean, its registry and
//! jobs read back whole, each DP's content validate intact; and the chunk
//! bytes the site sent, as the kernel counted them (nftables on loopback),
//! must stay within 1.2× what the DPs needed.
//!
//! Long (minutes), so not in the default test command:
//! `scripts/soak.sh` runs it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_tests::harness::{ferry_bin, wait_for, DpProc, SiteProc};
use ferry_tests::tree::{make_tree, TreeSpec};
use ferry_tests::updates::UpdateSpec;
use ferry_tests::wimtools::{self, WINDOWS_PROPS};
use rand::{Rng, SeedableRng};
use serde_json::Value;

const DPS: usize = 4;
const PACKAGES: usize = 3;
/// Bytes the site may send per byte the DPs needed.
const MAX_COST: f64 = 1.2;

fn kills_wanted() -> usize {
    std::env::var("FERRY_SOAK_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50)
        .max(50)
}

/// `ferry --data SITE ARGS --json`, tried again while the site is down or
/// restarting (up to a minute).
fn cli(site: &Path, args: &[&str]) -> Value {
    let t0 = Instant::now();
    loop {
        let out = Command::new(ferry_bin())
            .arg("--data")
            .arg(site)
            .arg("--json")
            .args(args)
            .output()
            .unwrap();
        if out.status.success() {
            return serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        }
        let said = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        let down = said.contains("cannot reach the site");
        assert!(
            down && t0.elapsed() < Duration::from_secs(60),
            "ferry {args:?}: {said}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// An nftables counter of the UDP bytes leaving the site's QUIC port on
/// loopback: the kernel's count of what the site sent the DPs.
struct Counter {
    table: String,
}

impl Counter {
    fn new(port: u16) -> Counter {
        let table = format!("ferry_soak_{port}");
        let nft = |args: &str| {
            let st = Command::new("nft")
                .args(args.split(' '))
                .status()
                .expect("nft (nftables; scripts/setup.sh installs it)");
            assert!(st.success(), "nft {args}");
        };
        nft(&format!("add table inet {table}"));
        nft(&format!(
            "add chain inet {table} out {{ type filter hook output priority 0 ; }}"
        ));
        nft(&format!(
            "add rule inet {table} out oifname lo udp sport {port} counter"
        ));
        Counter { table }
    }

    fn bytes(&self) -> u64 {
        let out = Command::new("nft")
            .args(["list", "table", "inet", &self.table])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let at = text.find("bytes ").expect("the counter");
        text[at + 6..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    }
}

impl Drop for Counter {
    fn drop(&mut self) {
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", &self.table])
            .status();
    }
}

/// Per DP, package and revision: the most chunk bytes and manifest bytes
/// the DP said it needed.
type Needs = Mutex<BTreeMap<(String, String, u64), (u64, u64)>>;

/// Records, for each DP, package and revision, the most chunk bytes the
/// DP said it needed (its first plan; a plan after a restart needs less).
fn note_needs(rows: &Value, needs: &Needs) {
    let mut n = needs.lock().unwrap();
    for r in rows.as_array().into_iter().flatten() {
        let (Some(dp), Some(p), Some(rev)) = (
            r["dp"].as_str(),
            r["package"].as_str(),
            r["revision"].as_u64(),
        ) else {
            continue;
        };
        let e = n.entry((dp.into(), p.into(), rev)).or_default();
        e.0 = e.0.max(r["bytes_needed"].as_u64().unwrap_or(0));
        e.1 = e.1.max(r["manifest_bytes"].as_u64().unwrap_or(0));
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    x.len() == y.len() && blake3::hash(&x) == blake3::hash(&y)
}

#[test]
#[ignore = "minutes long: scripts/soak.sh runs it"]
fn killed_again_and_again_the_site_and_dps_converge_intact() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut site = SiteProc::start(d).unwrap();
    // Every revision stays: the needs of each can be checked at the end.
    site.edit_config(|t| t.replace("keep_revisions = 1", "keep_revisions = 1000"))
        .unwrap();
    let data = site.data.clone();
    let counter = Counter::new(site.dp_port);
    let dps: Vec<DpProc> = (1..=DPS)
        .map(|i| DpProc::start(d, &format!("dp{i}"), &site).unwrap())
        .collect();
    let names: Vec<String> = dps.iter().map(|p| p.name.clone()).collect();
    let contents: Vec<PathBuf> = dps.iter().map(DpProc::content).collect();

    // Three packages of about 20 MiB, Windows-like, so they can be serviced.
    let mut ids = Vec::new();
    for p in 0..PACKAGES {
        let tree = d.join(format!("tree{p}"));
        make_tree(
            &tree,
            &TreeSpec {
                files: 300,
                seed: 100 + p as u64,
                size_scale: 1.5,
                ..TreeSpec::default()
            },
        )
        .unwrap();
        let wim = d.join(format!("os{p}.wim"));
        wimtools::capture(&tree, &wim, "Windows 11 Enterprise", "LZX", WINDOWS_PROPS).unwrap();
        let pkg = site.add_image(&wim, &[]).unwrap();
        ids.push(pkg["id"].as_str().unwrap().to_string());
    }
    for id in &ids {
        let mut args = vec!["distribute", id.as_str()];
        for n in &names {
            args.extend(["--dp", n.as_str()]);
        }
        cli(&data, &args);
    }

    let needs: Arc<Needs> = Arc::new(Mutex::new(BTreeMap::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let kills = Arc::new(AtomicUsize::new(0));
    let site = Arc::new(Mutex::new(site));
    let dps: Arc<Vec<Mutex<DpProc>>> = Arc::new(dps.into_iter().map(Mutex::new).collect());

    // The killer: a random victim every 0.3–3 s, back after 0–1 s.
    let killer = {
        let (site, dps, stop, kills) = (site.clone(), dps.clone(), stop.clone(), kills.clone());
        std::thread::spawn(move || {
            let mut rng = rand::rngs::StdRng::seed_from_u64(7);
            let mut by = BTreeMap::<String, usize>::new();
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(rng.random_range(300..3000)));
                let victim = rng.random_range(0..=DPS);
                let pause = Duration::from_millis(rng.random_range(0..1000));
                if victim == 0 {
                    let mut s = site.lock().unwrap();
                    s.kill();
                    std::thread::sleep(pause);
                    s.serve().expect("the site starts again after SIGKILL");
                    *by.entry("site".into()).or_default() += 1;
                } else {
                    let mut p = dps[victim - 1].lock().unwrap();
                    p.kill();
                    std::thread::sleep(pause);
                    p.serve().expect("the DP starts again after SIGKILL");
                    *by.entry(p.name.clone()).or_default() += 1;
                }
                kills.fetch_add(1, Ordering::Relaxed);
            }
            by
        })
    };
    // A watcher of the DPs' plans.
    let watcher = {
        let (data, needs, stop) = (data.clone(), needs.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                note_needs(&cli(&data, &["status"]), &needs);
                std::thread::sleep(Duration::from_millis(300));
            }
        })
    };

    // Servicing, round after round: each adds a file to one package and
    // sends the new revision to every DP that holds it.
    let mut rounds = 0;
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    while kills.load(Ordering::Relaxed) < kills_wanted() {
        let id = &ids[rounds % PACKAGES];
        let kb = format!("KB{}", 7_000_000 + rounds);
        let mut spec = UpdateSpec::new(&kb, "2026-12-01");
        let mut payload = vec![0u8; 1 << 20];
        rng.fill(&mut payload[..]);
        spec.add
            .push((format!("Windows/System32/soak{rounds}.dll"), payload));
        let folder = spec.write(&d.join("updates")).unwrap();
        cli(&data, &["update", "import", folder.to_str().unwrap()]);
        cli(
            &data,
            &["image", "service", id, "--updates", &kb, "--distribute"],
        );
        rounds += 1;
        std::thread::sleep(Duration::from_millis(rng.random_range(500..2500)));
    }
    stop.store(true, Ordering::Relaxed);
    let by = killer.join().unwrap();
    watcher.join().unwrap();
    let kills = kills.load(Ordering::Relaxed);
    eprintln!("soak: {kills} kills ({by:?}), {rounds} servicing rounds");
    assert!(kills >= kills_wanted());

    // Left alone, everything converges: the released revision of every
    // package on every DP.
    wait_for(
        "every DP to hold every package",
        Duration::from_secs(900),
        || {
            let jobs = cli(&data, &["jobs"]);
            let busy = jobs
                .as_array()
                .into_iter()
                .flatten()
                .any(|j| j["state"] == "running" || j["state"] == "scheduled");
            let rows = cli(&data, &["status"]);
            note_needs(&rows, &needs);
            let rows = rows.as_array().cloned().unwrap_or_default();
            let done = !busy
                && rows.len() == DPS * PACKAGES
                && rows.iter().all(|r| r["state"] == "installed");
            Ok(done.then_some(()))
        },
    )
    .unwrap();
    let site = Arc::try_unwrap(site).ok().unwrap().into_inner().unwrap();

    // Byte for byte what the site exports.
    for id in &ids {
        let out = d.join(format!("export-{id}.wim"));
        site.export(id, &out).unwrap();
        for (n, content) in names.iter().zip(&contents) {
            let held = std::fs::read_dir(content.join(id))
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .find(|p| p.extension().is_some_and(|x| x == "wim"))
                .unwrap_or_else(|| panic!("{n} holds no WIM of {id}"));
            assert!(same_file(&held, &out), "{n}'s copy of {id} differs");
        }
    }
    // The library verifies clean; the registry and the jobs read back.
    let report = cli(&data, &["content", "verify"]);
    assert_eq!(report["damaged"], serde_json::json!([]), "{report}");
    assert_eq!(cli(&data, &["dp", "list"]).as_array().unwrap().len(), DPS);
    let jobs = cli(&data, &["jobs"]);
    assert!(jobs.as_array().unwrap().len() >= rounds.min(1));
    // Each DP's content validates intact.
    for n in &names {
        cli(&data, &["dp", "validate", n]);
    }
    wait_for("validation", Duration::from_secs(300), || {
        let all = names.iter().all(|n| {
            let v = cli(&data, &["dp", "validation", n]);
            let results = v["results"].as_array().cloned().unwrap_or_default();
            results.len() == PACKAGES
                && results
                    .iter()
                    .all(|r| r["done"] == true && r["damaged"] == serde_json::json!([]))
        });
        Ok(all.then_some(()))
    })
    .unwrap();

    // What the site sent, against what the DPs needed.
    let needed: u64 = needs.lock().unwrap().values().map(|(c, m)| c + m).sum();
    let sent = counter.bytes();
    let cost = sent as f64 / needed.max(1) as f64;
    eprintln!(
        "soak: the site sent {sent} UDP bytes for {needed} bytes needed (chunks and manifests of {} transfers): {cost:.3}×",
        needs.lock().unwrap().len()
    );
    assert!(cost <= MAX_COST, "sent {cost:.3}× what was needed");
    let log = std::fs::read_to_string(&site.log).unwrap();
    assert!(!log.contains("panicked"), "the site never panicked");
    drop(site);
}
