//! What `deploy/` gives an operator, checked by the tools that will read
//! it: the systemd units by `systemd-analyze verify`, the sysusers and
//! tmpfiles snippets by `systemd-sysusers` and `systemd-tmpfiles` run into a
//! scratch root, the sysctl snippet against the kernel's own keys. (The
//! example `site.toml` and `dp.toml` are parsed by the crates' unit tests,
//! the Prometheus and Grafana files by the metrics test.)

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use ferry_tests::harness::ferry_bin;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Runs `c`: what it printed, or a failure with it.
fn run(c: &mut Command) -> String {
    let out = c.output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{c:?}: {said}");
    said
}

/// `KEY=value` lines of a unit, in order.
fn directives(unit: &str) -> Vec<(String, String)> {
    unit.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn one<'a>(d: &'a [(String, String)], key: &str) -> &'a str {
    let all: Vec<&str> = d
        .iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(all.len(), 1, "{key}: {all:?}");
    all[0]
}

#[test]
fn the_units_verify_and_confine_each_service_to_its_data_folder() {
    let scratch = tempfile::tempdir().unwrap();
    let installed = "/usr/local/bin/ferry";
    for (unit, role) in [("ferry-site.service", "site"), ("ferry-dp.service", "dp")] {
        let text = fs::read_to_string(deploy().join("systemd").join(unit)).unwrap();
        let d = directives(&text);
        let data = format!("/var/lib/ferry/{role}");
        assert_eq!(
            one(&d, "ExecStart"),
            format!("{installed} {role} serve --data {data}")
        );
        assert_eq!(one(&d, "User"), "ferry");
        assert_eq!(one(&d, "ProtectSystem"), "strict");
        assert_eq!(one(&d, "ReadWritePaths"), data);
        assert_eq!(one(&d, "Restart"), "on-failure");
        assert_eq!(one(&d, "NoNewPrivileges"), "yes");
        // Configuration is read at start: no reload that would do nothing.
        assert!(d.iter().all(|(k, _)| k != "ExecReload"), "{unit}");
        // systemd-analyze checks the program exists: the one built here
        // stands where the unit says it is installed.
        let here = scratch.path().join(unit);
        fs::write(
            &here,
            text.replace(installed, ferry_bin().to_str().unwrap()),
        )
        .unwrap();
        let said = run(Command::new("systemd-analyze").arg("verify").arg(&here));
        assert!(said.trim().is_empty(), "{unit}: {said}");
    }
}

#[test]
fn sysusers_and_tmpfiles_make_the_user_and_its_private_data_folders() {
    let root = tempfile::tempdir().unwrap();
    fs::create_dir_all(root.path().join("etc")).unwrap();
    let sd = deploy().join("systemd");
    run(Command::new("systemd-sysusers")
        .arg(format!("--root={}", root.path().display()))
        .arg(sd.join("ferry.sysusers.conf")));
    let passwd = fs::read_to_string(root.path().join("etc/passwd")).unwrap();
    let line = passwd
        .lines()
        .find(|l| l.starts_with("ferry:"))
        .unwrap_or_else(|| panic!("no ferry user in {passwd}"));
    let uid: u32 = line.split(':').nth(2).unwrap().parse().unwrap();
    assert!(line.ends_with(":/usr/sbin/nologin"), "{line}");
    run(Command::new("systemd-tmpfiles")
        .arg(format!("--root={}", root.path().display()))
        .arg("--create")
        .arg(sd.join("ferry.tmpfiles.conf")));
    // Each unit's data folder exists, the ferry user's, closed to others.
    for role in ["site", "dp"] {
        let m = fs::metadata(root.path().join("var/lib/ferry").join(role)).unwrap();
        assert!(m.is_dir());
        assert_eq!(m.uid(), uid, "{role}");
        assert_eq!(m.mode() & 0o777, 0o750, "{role}");
    }
}

#[test]
fn the_sysctl_snippet_sets_kernel_keys_to_what_ferry_asks_for() {
    let text = fs::read_to_string(deploy().join("sysctl/90-ferry.conf")).unwrap();
    let mut keys = 0;
    for l in text.lines().map(str::trim) {
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let (k, v) = l.split_once('=').unwrap();
        let (k, v) = (k.trim(), v.trim());
        let proc = Path::new("/proc/sys").join(k.replace('.', "/"));
        assert!(proc.exists(), "{k}: no {}", proc.display());
        assert_eq!(
            v.parse::<usize>().unwrap(),
            ferry_net::tls::UDP_BUFFER_BYTES,
            "{k}"
        );
        keys += 1;
    }
    assert_eq!(keys, 2);
}
