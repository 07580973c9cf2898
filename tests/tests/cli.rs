//! The CLI's promises to operators and scripts, against a real site
//! process: every read-only command answers `--json` (found by walking the
//! command tree `ferry --help` prints), errors are JSON with a code under
//! `--json`, and the everyday commands of the operator's first week (image
//! set, update remove, jobs cancel/wait, `--at` durations) do what they say.

use std::collections::BTreeSet;
use std::fs;
use std::process::{Command, Output};

use ferry_tests::harness::{ferry_bin, SiteProc};
use ferry_tests::updates::UpdateSpec;
use ferry_tests::wimtools::{self, WINDOWS_PROPS};

fn ferry(args: &[&str]) -> Output {
    Command::new(ferry_bin())
        .args(args)
        .env_remove("FERRY_DATA")
        .output()
        .unwrap()
}

/// The subcommands `ferry ARGS… --help` lists (without `help`).
fn subcommands(path: &[&str]) -> Vec<String> {
    let mut args = path.to_vec();
    args.push("--help");
    let out = ferry(&args);
    assert!(out.status.success(), "ferry {args:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let Some(at) = text.find("Commands:\n") else {
        return Vec::new();
    };
    text[at + 10..]
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_string)
        .collect()
}

/// Every command path: leaves and commands that also run by themselves.
fn command_tree() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut todo = vec![Vec::<String>::new()];
    while let Some(path) = todo.pop() {
        let p: Vec<&str> = path.iter().map(String::as_str).collect();
        let subs = subcommands(&p);
        if !path.is_empty() {
            out.insert(path.join(" "));
        }
        for s in subs {
            let mut next = path.clone();
            next.push(s);
            todo.push(next);
        }
    }
    out
}

/// Commands that change something, run a server, or write files: covered
/// by the tests of what they do, not run here.
const CHANGING: &[&str] = &[
    "site",
    "site init",
    "site serve",
    "image",
    "image add",
    "image set",
    "image remove",
    "image service",
    "image rollback",
    "content",
    "content export",
    "content prestage",
    "content refresh",
    "dp",
    "dp add",
    "dp remove",
    "dp init",
    "dp serve",
    "dp revoke",
    "dp validate",
    "dp set",
    "dp prestage",
    "group",
    "group create",
    "group add",
    "group remove",
    "group delete",
    "distribute",
    "undistribute",
    "redistribute",
    "update",
    "update import",
    "update remove",
    "upgrade",
    "upgrade add",
    "upgrade set",
    "upgrade service",
    "upgrade rollback",
    "upgrade remove",
    "jobs cancel",
    "jobs wait",
    "client",
    "client token",
    "client token create",
    "client token revoke",
    "client fetch",
    "client multicast",
    "image multicast",
    "upgrade multicast",
    "dp multicast",
];

#[test]
fn every_read_only_command_answers_json_and_errors_are_json_with_a_code() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let site = SiteProc::start(d).unwrap();
    let wim = wimtools::tree_wim(d, "small", 30, 61, WINDOWS_PROPS).unwrap();
    let image = site.add_image(&wim, &[]).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let media = d.join("media");
    fs::create_dir_all(media.join("sources")).unwrap();
    fs::write(media.join("setup.exe"), b"setup").unwrap();
    fs::copy(&wim, media.join("sources/install.wim")).unwrap();
    let upgrade = site
        .cli_json(&["upgrade", "add", media.to_str().unwrap(), "--name", "Setup"])
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut u = UpdateSpec::new("KB8100001", "2026-04-14");
    u.add = vec![("Windows/one.dll".into(), b"one".to_vec())];
    let folder = u.write(&d.join("updates")).unwrap();
    site.cli_ok(&["update", "import", folder.to_str().unwrap()])
        .unwrap();
    site.cli_ok(&["dp", "add", "dp1"]).unwrap();
    let job = site
        .cli_json(&[
            "image",
            "service",
            &image,
            "--updates",
            "KB8100001",
            "--at",
            "+1h30m",
        ])
        .unwrap();
    let n = job["id"].as_u64().unwrap().to_string();

    let read_only: Vec<(&str, Vec<&str>)> = vec![
        ("image list", vec![]),
        ("image show", vec![&image]),
        ("image updates", vec![&image]),
        ("image history", vec![&image]),
        ("image revisions", vec![&image]),
        ("content verify", vec![]),
        ("dp list", vec![]),
        ("dp show", vec!["dp1"]),
        ("dp validation", vec!["dp1"]),
        ("group list", vec![]),
        ("status", vec![]),
        ("status", vec!["--summary"]),
        ("update list", vec![]),
        ("update show", vec!["KB8100001"]),
        ("upgrade list", vec![]),
        ("upgrade show", vec![&upgrade]),
        ("upgrade updates", vec![&upgrade]),
        ("upgrade history", vec![&upgrade]),
        ("upgrade revisions", vec![&upgrade]),
        ("jobs", vec![]),
        ("jobs show", vec![&n]),
        ("client token list", vec![]),
    ];
    let tree = command_tree();
    let known: BTreeSet<String> = read_only
        .iter()
        .map(|(c, _)| c.to_string())
        .chain(CHANGING.iter().map(|c| c.to_string()))
        .collect();
    assert_eq!(
        tree, known,
        "a command was added or removed: list it as read-only (and run it here) or as changing"
    );
    for (cmd, extra) in &read_only {
        let mut args: Vec<&str> = cmd.split(' ').collect();
        args.extend(extra.iter().copied());
        let v = site
            .cli_json(&args)
            .unwrap_or_else(|e| panic!("{cmd}: {e}"));
        assert!(v.is_object() || v.is_array(), "{cmd}: {v}");
    }

    // Errors: JSON on stdout with a code, and a non-zero exit.
    let json_err = |out: Output| -> serde_json::Value {
        assert!(!out.status.success());
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "no JSON error ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    };
    let e = json_err(site.cli(&["image", "show", "FRY09999", "--json"]));
    assert_eq!(e["code"], "not-found", "{e}");
    assert!(e["error"].as_str().unwrap().contains("FRY09999"), "{e}");
    let e = json_err(site.cli(&["image", "show", "--json"]));
    assert_eq!(e["code"], "usage", "{e}");
    let e = json_err(ferry(&[
        "--site",
        "http://127.0.0.1:1",
        "--token",
        "x",
        "image",
        "list",
        "--json",
    ]));
    assert_eq!(e["code"], "unreachable", "{e}");
    let e = json_err(ferry(&[
        "--site",
        "http://127.0.0.1:1",
        "--token",
        "x",
        "--json",
        "status",
    ]));
    assert_eq!(e["code"], "unreachable", "{e}");
    // Multicast settings: checked on the site, named by their flag.
    let e = json_err(site.cli(&[
        "dp",
        "multicast",
        "dp1",
        "--enable",
        "--group",
        "10.0.0.0/8",
        "--json",
    ]));
    assert_eq!(e["code"], "invalid", "{e}");
    assert!(e["error"].as_str().unwrap().contains("--group"), "{e}");
    let e = json_err(site.cli(&["dp", "show", "nope", "--json"]));
    assert_eq!(e["code"], "not-found", "{e}");
    let e = json_err(site.cli(&["dp", "multicast", "nope", "--enable", "--json"]));
    assert_eq!(e["code"], "not-found", "{e}");
    let e = json_err(site.cli(&["dp", "multicast", "dp1", "--json"]));
    assert_eq!(e["code"], "usage", "neither --enable nor --disable: {e}");
    let e = json_err(site.cli(&[
        "dp",
        "multicast",
        "dp1",
        "--disable",
        "--ttl",
        "3",
        "--json",
    ]));
    assert_eq!(e["code"], "usage", "settings need --enable: {e}");
    let e = json_err(site.cli(&[
        "dp",
        "multicast",
        "dp1",
        "--enable",
        "--rate",
        "fast",
        "--json",
    ]));
    assert_eq!(e["code"], "usage", "{e}");
    let m = site
        .cli_json(&[
            "dp",
            "multicast",
            "dp1",
            "--enable",
            "--rate",
            "200Mbit",
            "--ports",
            "7000-7009",
        ])
        .unwrap();
    assert_eq!(
        (m["rate"].as_u64(), m["port_last"].as_u64()),
        (Some(25_000_000), Some(7009))
    );
    // A URL without its scheme is named as such.
    let out = ferry(&["--site", "127.0.0.1:4480", "--token", "x", "image", "list"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("http(s)://HOST:PORT"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A site code is checked by its flag, before anything is written.
    let out = ferry(&[
        "site",
        "init",
        "--data",
        d.join("s2").to_str().unwrap(),
        "--site-code",
        "TOOLONG",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--site-code"));
    assert!(!d.join("s2").exists());
    let made = ferry(&[
        "site",
        "init",
        "--data",
        d.join("s3").to_str().unwrap(),
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&made.stdout).unwrap();
    assert_eq!(v["site_code"], "FRY");
}

#[test]
fn image_set_update_remove_and_jobs_cancel_and_wait_do_what_they_say() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let site = SiteProc::start(d).unwrap();
    let wim = wimtools::tree_wim(d, "small", 20, 62, WINDOWS_PROPS).unwrap();
    let id = site.add_image(&wim, &[]).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let fails = |args: &[&str], says: &str| {
        let out = site.cli(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(err.contains(says), "{args:?}: {err}");
    };

    // Properties after import.
    site.cli_ok(&[
        "image",
        "set",
        &id,
        "--name",
        "Win 11 golden",
        "--version",
        "24H2",
        "--comment",
        "after the audit",
    ])
    .unwrap();
    let rec = site.cli_json(&["image", "show", &id]).unwrap();
    assert_eq!(rec["name"], "Win 11 golden");
    assert_eq!(rec["version"], "24H2");
    assert_eq!(rec["comment"], "after the audit");
    fails(
        &["image", "set", &id, "--arch", "x64"],
        "unexpected argument",
    );
    fails(
        &["upgrade", "set", &id, "--arch", "x64"],
        "upgrade packages",
    );
    fails(&["image", "set", &id], "nothing to set");
    fails(&["dp", "set", "dp1"], "nothing to set");
    fails(&["image", "set", &id, "--name", " "], "cannot be empty");
    fails(&["image", "set", "FRY09999", "--name", "x"], "FRY09999");
    assert_eq!(
        site.cli_json(&["image", "show", &id]).unwrap()["name"],
        "Win 11 golden",
        "a refused change changes nothing"
    );

    // A source that changed since import says which command picks it up.
    fs::File::options()
        .write(true)
        .open(&wim)
        .unwrap()
        .set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(3600))
        .unwrap();
    let shown = site.cli_ok(&["image", "show", &id]).unwrap();
    assert!(
        shown.contains(&format!(
            "CHANGED since import (not picked up: `ferry content refresh {id}`"
        )),
        "{shown}"
    );
    // Its content is what revision 1 holds: the refresh makes no revision,
    // and the source no longer shows as changed.
    let out = site.cli(&["content", "refresh", &id]);
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unchanged"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = site.cli_json(&["image", "show", &id]).unwrap();
    assert_eq!(v["revisions"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["source_state"], "unchanged", "{v}");
    let again = site.cli_json(&["content", "refresh", &id]).unwrap();
    assert_eq!(again["unchanged"], true);
    // A real change is a new revision.
    let mut bytes = fs::read(&wim).unwrap();
    bytes.extend_from_slice(b"appended");
    fs::write(&wim, bytes).unwrap();
    let r2 = site.cli_json(&["content", "refresh", &id]).unwrap();
    assert!(r2.get("unchanged").is_none(), "{r2}");
    assert_eq!(r2["revisions"].as_array().unwrap().len(), 2, "{r2}");

    // Two updates; jobs for later name them.
    for (kb, file) in [("KB8200001", "one"), ("KB8200002", "two")] {
        let mut u = UpdateSpec::new(kb, "2026-04-14");
        u.add = vec![(format!("Windows/{file}.dll"), file.as_bytes().to_vec())];
        let folder = u.write(&d.join("updates")).unwrap();
        site.cli_ok(&["update", "import", folder.to_str().unwrap()])
            .unwrap();
    }
    let before = time::OffsetDateTime::now_utc();
    let later = |kb: &str, at: &str| {
        site.cli_json(&["image", "service", &id, "--updates", kb, "--at", at])
            .unwrap()
    };
    let a = later("KB8200001", "+1h30m");
    let next = time::OffsetDateTime::parse(
        a["next_run"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let ahead = (next - before).whole_seconds();
    assert!((5395..=5460).contains(&ahead), "+1h30m is {ahead} s ahead");
    let b = later("KB8200002", "+2h");
    let (a_id, b_id) = (
        a["id"].as_u64().unwrap().to_string(),
        b["id"].as_u64().unwrap().to_string(),
    );
    fails(
        &[
            "image",
            "service",
            &id,
            "--updates",
            "KB8200001",
            "--at",
            "+3 fortnights",
        ],
        "+1h30m",
    );

    fails(&["update", "remove", "KB8200001"], "jobs cancel");
    let out = site.cli(&["jobs", "wait", &a_id, "--timeout", "1s"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("still scheduled"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A schedule in a stated zone: Saturdays at 02:00 in Berlin are 01:00
    // UTC in winter, 00:00 in summer; tables show UTC, with the weekday.
    let c = site
        .cli_json(&[
            "image",
            "service",
            &id,
            "--updates",
            "KB8200001",
            "--schedule",
            "CRON_TZ=Europe/Berlin 0 2 * * 6",
        ])
        .unwrap();
    let next = time::OffsetDateTime::parse(
        c["next_run"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert_eq!(next.weekday(), time::Weekday::Saturday, "{c}");
    assert!(next.hour() <= 1 && next.minute() == 0, "{c}");
    let table = site.cli_ok(&["jobs"]).unwrap();
    assert!(
        table.contains("(UTC)") && table.contains(&format!("Sat 0{}:00", next.hour())),
        "{table}"
    );
    fails(
        &[
            "image",
            "service",
            &id,
            "--updates",
            "KB8200001",
            "--schedule",
            "CRON_TZ=Mars/Olympus 0 2 * * 6",
        ],
        "not a time zone",
    );
    let c_id = c["id"].as_u64().unwrap().to_string();
    let cancelled = site
        .cli_json(&["jobs", "cancel", &a_id, &b_id, &c_id])
        .unwrap();
    assert_eq!(cancelled.as_array().unwrap().len(), 3);
    for j in [&a_id, &b_id] {
        assert_eq!(
            site.cli_json(&["jobs", "show", j]).unwrap()["state"],
            "cancelled"
        );
    }
    fails(&["jobs", "cancel", &a_id, "999"], "999");
    // Tables fit 100 columns off a terminal, and the log written to a file
    // has no colour codes.
    for args in [
        &["jobs"][..],
        &["image", "list"],
        &["image", "show", &id],
        &["image", "revisions", &id],
        &["update", "list"],
        &["status"],
    ] {
        let text = site.cli_ok(args).unwrap();
        let wide: Vec<&str> = text.lines().filter(|l| l.chars().count() > 100).collect();
        assert!(
            wide.is_empty(),
            "{args:?} is wider than 100 columns:\n{}",
            wide.join("\n")
        );
    }
    let log = fs::read_to_string(&site.log).unwrap();
    assert!(
        log.contains("INFO") && !log.contains('\x1b'),
        "colour codes in the log"
    );

    site.cli_ok(&["update", "remove", "KB8200001", "KB8200002"])
        .unwrap();
    assert_eq!(
        site.cli_json(&["update", "list"]).unwrap(),
        serde_json::json!([])
    );
    fails(&["update", "show", "KB8200001"], "KB8200001");
    fails(&["update", "remove", "KB8200001"], "KB8200001");
    // Removed means gone from disk too, and importing it again works.
    let catalog: Vec<_> = fs::read_dir(site.data.join("updates"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(catalog.is_empty(), "{catalog:?}");
    let mut u = UpdateSpec::new("KB8200001", "2026-04-14");
    u.add = vec![("Windows/one.dll".into(), b"one".to_vec())];
    let folder = u.write(&d.join("again")).unwrap();
    site.cli_ok(&["update", "import", folder.to_str().unwrap()])
        .unwrap();
}
