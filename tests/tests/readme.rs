//! The README's quick start, run as written against a scratch site and DP:
//! its command block is taken from README.md, the machine-specific parts
//! (folders, the WIM and setup folder it names, the site's address, the
//! token `ferry dp add` prints, free ports) are put in, and bash runs it
//! with `set -e`.

use std::fs;
use std::net::{TcpListener, UdpSocket};
use std::path::Path;
use std::process::Command;

use ferry_tests::harness::ferry_bin;
use ferry_tests::tree::make_tree_of;
use ferry_tests::wimtools::{self, WINDOWS_PROPS};

/// The first ```sh block after the heading `heading`.
fn block_after(readme: &str, heading: &str) -> String {
    let at = readme
        .find(heading)
        .unwrap_or_else(|| panic!("README has no {heading:?}"));
    let rest = &readme[at..];
    let start = rest.find("```sh\n").expect("a ```sh block") + 6;
    let end = rest[start..].find("```").expect("the block's end") + start;
    rest[start..end].to_string()
}

/// Replaces `from` (which must be in `text`) with `to`.
fn put(text: &mut String, from: &str, to: &str) {
    assert!(
        text.contains(from),
        "the quick start no longer says {from:?}: update this test with it"
    );
    *text = text.replace(from, to);
}

fn tree(dir: &Path, files: usize, seed: u64) {
    make_tree_of(dir, files, seed).unwrap();
}

#[test]
fn the_readme_quick_start_runs_as_written() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let readme = fs::read_to_string(repo.join("README.md")).unwrap();
    let mut script = block_after(&readme, "## Quick start");

    let dir = tempfile::tempdir().unwrap();
    let w = dir.path();
    // What it imports: an install.wim the example update applies to, and a
    // setup folder whose install.wim has three images.
    tree(&w.join("t1"), 40, 71);
    let wim = w.join("install.wim");
    wimtools::capture(
        &w.join("t1"),
        &wim,
        "Windows 11 Enterprise",
        "LZX",
        WINDOWS_PROPS,
    )
    .unwrap();
    let media = w.join("media");
    fs::create_dir_all(media.join("sources")).unwrap();
    fs::write(media.join("setup.exe"), vec![7u8; 50_000]).unwrap();
    let setup_wim = media.join("sources/install.wim");
    for (i, name) in ["Windows 11 Home", "Windows 11 Pro", "Windows 11 Enterprise"]
        .iter()
        .enumerate()
    {
        let t = w.join(format!("m{i}"));
        tree(&t, 20, 80 + i as u64);
        if i == 0 {
            wimtools::capture(&t, &setup_wim, name, "LZX", WINDOWS_PROPS).unwrap();
        } else {
            wimtools::append(&t, &setup_wim, name, WINDOWS_PROPS).unwrap();
        }
    }
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let tcp2 = TcpListener::bind("127.0.0.1:0").unwrap();
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let (api, https, dp_port) = (
        tcp.local_addr().unwrap().port(),
        tcp2.local_addr().unwrap().port(),
        udp.local_addr().unwrap().port(),
    );
    drop((tcp, tcp2, udp));

    // The build lines: this test runs on the build they make.
    for line in [
        "scripts/setup.sh",
        "source scripts/env.sh",
        "cargo test --workspace --no-run",
        "export PATH=\"$CARGO_TARGET_DIR/debug:$PATH\"",
    ] {
        let kept: Vec<&str> = script.lines().filter(|l| !l.starts_with(line)).collect();
        assert!(kept.len() < script.lines().count(), "no line {line:?}");
        script = kept.join("\n") + "\n";
    }
    let (site, dp) = (w.join("site"), w.join("dp"));
    put(&mut script, "/srv/ferry-dp", &dp.display().to_string());
    put(&mut script, "/srv/ferry", &site.display().to_string());
    put(
        &mut script,
        &format!("ferry site init --data {}", site.display()),
        &format!(
            "ferry site init --listen 127.0.0.1:{api} --dp-listen 127.0.0.1:{dp_port} --data {}",
            site.display()
        ),
    );
    // Background servers: wait until each answers.
    put(
        &mut script,
        &format!("ferry site serve --data {} &", site.display()),
        &format!(
            "ferry site serve --data {} 2>{}/site.log &\nuntil ferry --data {} image list >/dev/null 2>&1; do sleep 0.1; done",
            site.display(),
            w.display(),
            site.display()
        ),
    );
    put(
        &mut script,
        &format!("ferry dp serve --data {} &", dp.display()),
        &format!(
            "ferry dp serve --data {} 2>{}/dp.log &\nuntil ferry dp list --json | tr -d ' \\n' | grep -q '\"online\":true'; do sleep 0.2; done",
            dp.display(),
            w.display()
        ),
    );
    put(
        &mut script,
        "/images/install.wim",
        &wim.display().to_string(),
    );
    put(
        &mut script,
        "/media/win11-23h2",
        &media.display().to_string(),
    );
    put(
        &mut script,
        "ferry dp add dp1 ",
        "TOKEN=$(ferry dp add dp1) ",
    );
    put(
        &mut script,
        "site.example:4433",
        &format!("127.0.0.1:{dp_port}"),
    );
    put(&mut script, "ferry1.…", "\"$TOKEN\"");
    put(&mut script, "0.0.0.0:8443", &format!("127.0.0.1:{https}"));
    put(
        &mut script,
        "--client-name dp1.example",
        "--client-name 127.0.0.1",
    );
    put(
        &mut script,
        "ferry client token create --name lab-pcs --expires 30d",
        "CTOKEN=$(ferry client token create --name lab-pcs --expires 30d)",
    );
    put(&mut script, "ferryc1.…", "\"$CTOKEN\"");
    put(
        &mut script,
        "https://dp1.example:8443",
        &format!("https://127.0.0.1:{https}"),
    );
    put(
        &mut script,
        "/tmp/win11",
        &w.join("win11").display().to_string(),
    );
    // The package reaches the DP in the background: wait for it.
    put(
        &mut script,
        "ferry client fetch",
        "until ferry status FRY00002 --json | tr -d ' \\n' | grep -q '\"state\":\"installed\"'; do sleep 0.2; done\nferry client fetch",
    );
    put(
        &mut script,
        "deploy/updates/KB5031356",
        &repo.join("deploy/updates/KB5031356").display().to_string(),
    );

    let bin = ferry_bin();
    let path = format!(
        "{}:{}",
        bin.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    // Afterwards, what it did, for the checks below (the servers stop at
    // the script's end).
    let after = format!(
        "ferry image history FRY00001 --json > {w}/history.json\nferry status --json > {w}/status.json\n",
        w = w.display()
    );
    let full = format!(
        "set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null; wait' EXIT\nset -x\n{script}{after}"
    );
    let out = Command::new("bash")
        .arg("-c")
        .arg(&full)
        .env("PATH", path)
        .env_remove("FERRY_DATA")
        .current_dir(w)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the quick start failed:\n--- script\n{full}\n--- output\n{}\n{}\n--- site log\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        fs::read_to_string(w.join("site.log")).unwrap_or_default()
    );
    // It did what it says: the image serviced with the example update, both
    // packages on dp1.
    let read = |f: &str| -> serde_json::Value {
        serde_json::from_slice(&fs::read(w.join(f)).unwrap()).unwrap()
    };
    let history = read("history.json");
    assert_eq!(
        history["applied"],
        serde_json::json!(["KB5031356"]),
        "{history}"
    );
    // The client's download: the setup folder's files as imported.
    assert_eq!(
        fs::read(w.join("win11/setup.exe")).unwrap(),
        fs::read(media.join("setup.exe")).unwrap(),
        "the client fetched the package"
    );
    let status = read("status.json");
    let rows = status.as_array().unwrap();
    for p in ["FRY00001", "FRY00002"] {
        assert!(
            rows.iter().any(|r| r["package"] == p && r["dp"] == "dp1"),
            "{p} is assigned to dp1: {status}"
        );
    }
}
