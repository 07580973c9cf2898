//! Clients downloading from a DP over HTTPS: a real site, a real DP agent in
//! a network namespace serving HTTPS with a certificate from the site CA,
//! `curl` and `ferry client fetch` on the host side of the veth.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use ferry_tests::harness::{ferry_bin, wait_for, DpProc, SiteProc};
use ferry_tests::netns::Netns;
use ferry_tests::tree::Content;
use ferry_tests::updates::tree_hashes;
use ferry_tests::wimtools::{self, WINDOWS_PROPS};

const LIMIT: Duration = Duration::from_secs(120);
const PORT: u16 = 8443;

/// A setup folder: setup.exe, a captured install.wim, a 24 MiB file and
/// a hundred small ones.
fn media(dir: &Path) -> PathBuf {
    let root = dir.join("media");
    let sources = root.join("sources");
    fs::create_dir_all(&sources).unwrap();
    let mut c = Content::new(9);
    fs::write(root.join("setup.exe"), c.bytes(300_000)).unwrap();
    fs::write(sources.join("big.dat"), c.bytes(24 << 20)).unwrap();
    for i in 0..100 {
        let sub = sources.join(format!("x{:02}", i % 9));
        fs::create_dir_all(&sub).unwrap();
        let len = c.size(0.3);
        fs::write(sub.join(format!("f{i:03}.mui")), c.bytes(len)).unwrap();
    }
    let img = dir.join("img");
    ferry_tests::tree::make_tree_of(&img, 40, 77).unwrap();
    wimtools::capture(
        &img,
        &sources.join("install.wim"),
        "Windows 11 Pro",
        "LZX",
        WINDOWS_PROPS,
    )
    .unwrap();
    root
}

/// An answer of curl: status, headers (lower-case names), body.
struct Answer {
    status: u16,
    headers: String,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }
}

fn curl(work: &Path, ca: &Path, args: &[&str]) -> Answer {
    let (h, b) = (work.join("curl.headers"), work.join("curl.body"));
    let _ = fs::remove_file(&h);
    let _ = fs::remove_file(&b);
    let out = Command::new("curl")
        .args(["-sS", "--path-as-is", "--cacert"])
        .arg(ca)
        .arg("-D")
        .arg(&h)
        .arg("-o")
        .arg(&b)
        .args(["-w", "%{http_code}"])
        .args(args)
        .output()
        .expect("curl runs");
    assert!(
        out.status.success(),
        "curl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Answer {
        status: String::from_utf8_lossy(&out.stdout).trim().parse().unwrap(),
        headers: fs::read_to_string(&h).unwrap_or_default(),
        body: fs::read(&b).unwrap_or_default(),
    }
}

/// `ferry client token create ARGS` on `site`: the token.
fn client_token(site: &SiteProc, args: &[&str]) -> String {
    let mut all = vec!["client", "token", "create"];
    all.extend_from_slice(args);
    site.cli_json(&all).unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string()
}

fn bearer(token: &str) -> String {
    format!("Authorization: Bearer {token}")
}

fn fetch(work: &Path, base: &str, id: &str, out: &Path, token: &str, ca: &Path) -> Command {
    let mut c = Command::new(ferry_bin());
    c.args(["client", "fetch", "--dp", base, id, "--out"])
        .arg(out)
        .args(["--token", token, "--ca"])
        .arg(ca)
        .args(["--json", "--parallel", "2"])
        .current_dir(work)
        .stdin(Stdio::null());
    c
}

fn json_of(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {} / {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
fn clients_download_over_https_with_tokens_ranges_resume_and_pinned_revisions() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let ns = Netns::create("clients", 31).unwrap();
    let site = SiteProc::start_at(w, "site", &ns.host_ip, &[]).unwrap();
    let site_addr = format!("{}:{}", ns.host_ip, site.dp_port);
    let listen = format!("{}:{PORT}", ns.ns_ip);
    let mut dp = DpProc::enroll_with(
        w,
        "dp1",
        &site,
        &site_addr,
        &ns.exec_prefix(),
        &[
            "--client-listen",
            &listen,
            "--client-name",
            &ns.ns_ip,
            "--client-name",
            "dp1.branch.test",
        ],
    )
    .unwrap();
    dp.serve().unwrap();
    // A name no certificate can carry is refused before the token is used.
    let t = site.cli_json(&["dp", "add", "dp9"]).unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let bad = Command::new(ferry_bin())
        .args([
            "dp",
            "init",
            "--site",
            &site.dp_addr(),
            "--token",
            &t,
            "--data",
        ])
        .arg(w.join("dp9"))
        .args([
            "--client-listen",
            "127.0.0.1:9",
            "--client-name",
            "*.branch",
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("--client-name") && err.contains("*.branch"),
        "{err}"
    );
    assert!(!w.join("dp9").exists(), "nothing written");
    assert_eq!(
        site.dp_row("dp9").unwrap()["enrollment"],
        "waiting-enrollment"
    );
    let root = media(w);
    let pkg = site
        .cli_json(&[
            "upgrade",
            "add",
            root.to_str().unwrap(),
            "--name",
            "Win11 setup",
        ])
        .unwrap();
    let id = pkg["id"].as_str().unwrap().to_string();
    site.cli_ok(&["distribute", &id, "--dp", "dp1"]).unwrap();
    site.wait_installed(&id, "dp1", 1, LIMIT).unwrap();
    let ca = site.data.join("ca.pem");
    let base = format!("https://{listen}");
    let index_url = format!("{base}/content/{id}/");
    let big_url = format!("{base}/content/{id}/sources/big.dat");
    let big = fs::read(root.join("sources/big.dat")).unwrap();

    // The listener is up once the site issued its certificate.
    let token = client_token(&site, &["--name", "lab"]);
    let auth = bearer(&token);
    wait_for("the DP's HTTPS listener", LIMIT, || {
        let out = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
            .arg(&ca)
            .args(["-H", &auth, &index_url])
            .output()?;
        Ok((String::from_utf8_lossy(&out.stdout) == "200").then_some(()))
    })
    .unwrap();

    // The index: revision, files with sizes and hashes, a signed manifest.
    let a = curl(w, &ca, &["-H", &auth, &index_url]);
    assert_eq!(a.status, 200);
    let index: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
    assert_eq!(index["revision"], 1);
    let files = index["files"].as_array().unwrap();
    let source = tree_hashes(&root).unwrap();
    assert_eq!(
        files.len(),
        source.len(),
        "every file of the package is listed"
    );
    let entry = files
        .iter()
        .find(|f| f["path"] == "sources/big.dat")
        .unwrap();
    assert_eq!(entry["size"], big.len() as u64);
    assert_eq!(entry["blake3"], blake3::hash(&big).to_hex().as_str());
    assert!(!index["manifest"].as_str().unwrap().is_empty());
    let etag = format!("\"{}\"", blake3::hash(&big).to_hex());

    // HEAD: length, ranges, ETag; no body.
    let a = curl(w, &ca, &["-I", "-H", &auth, &big_url]);
    assert_eq!(a.status, 200);
    assert_eq!(a.header("content-length"), Some(big.len().to_string()));
    assert_eq!(a.header("accept-ranges").as_deref(), Some("bytes"));
    assert_eq!(a.header("etag"), Some(etag.clone()));
    // (curl -I writes the headers where a body would go.)
    assert!(
        a.body.starts_with(b"HTTP/") && a.body.len() < 2048,
        "no body"
    );

    // One range.
    let a = curl(w, &ca, &["-r", "1000-1999", "-H", &auth, &big_url]);
    assert_eq!(a.status, 206);
    assert_eq!(a.body, big[1000..2000]);
    assert_eq!(
        a.header("content-range"),
        Some(format!("bytes 1000-1999/{}", big.len()))
    );
    // Several: multipart/byteranges with each part and its Content-Range.
    let a = curl(
        w,
        &ca,
        &["-r", "0-9,5000000-5000099,-16", "-H", &auth, &big_url],
    );
    assert_eq!(a.status, 206);
    let ctype = a.header("content-type").unwrap();
    let boundary = ctype
        .strip_prefix("multipart/byteranges; boundary=")
        .unwrap_or_else(|| panic!("{ctype}"));
    let parts = multipart(&a.body, boundary);
    let n = big.len();
    assert_eq!(
        parts,
        vec![
            (format!("bytes 0-9/{n}"), big[0..10].to_vec()),
            (
                format!("bytes 5000000-5000099/{n}"),
                big[5_000_000..5_000_100].to_vec()
            ),
            (
                format!("bytes {}-{}/{n}", n - 16, n - 1),
                big[n - 16..].to_vec()
            ),
        ]
    );
    assert_eq!(a.header("content-length"), Some(a.body.len().to_string()));
    // If-Range: the range when the ETag matches, the whole file when not.
    let a = curl(
        w,
        &ca,
        &[
            "-r",
            "10-19",
            "-H",
            &format!("If-Range: {etag}"),
            "-H",
            &auth,
            &big_url,
        ],
    );
    assert_eq!((a.status, a.body.as_slice()), (206, &big[10..20]));
    let a = curl(
        w,
        &ca,
        &[
            "-r",
            "10-19",
            "-H",
            "If-Range: \"0000\"",
            "-H",
            &auth,
            &big_url,
        ],
    );
    assert_eq!(a.status, 200);
    assert_eq!(a.body.len(), big.len());
    // If-Match compares strongly (RFC 9110): the file's own tag passes, the
    // same tag marked weak does not; If-None-Match compares weakly.
    let weak = format!("W/{etag}");
    let ranged = |header: &str| curl(w, &ca, &["-r", "0-9", "-H", header, "-H", &auth, &big_url]);
    let a = ranged(&format!("If-Match: {etag}"));
    assert_eq!((a.status, a.body.as_slice()), (206, &big[..10]));
    let a = ranged(&format!("If-Match: {weak}"));
    assert_eq!(a.status, 412, "a weak tag never passes If-Match");
    let a = ranged(&format!("If-Match: \"00ff\", {etag}"));
    assert_eq!(a.status, 206, "one of a list is enough");
    let a = ranged(&format!("If-Range: {weak}"));
    assert_eq!(
        (a.status, a.body.len()),
        (200, big.len()),
        "a weak If-Range is no match: the whole file"
    );
    let a = ranged(&format!("If-None-Match: {weak}"));
    assert_eq!(a.status, 304, "If-None-Match compares weakly");
    // Past the end: 416.
    let a = curl(w, &ca, &["-r", "999999999-", "-H", &auth, &big_url]);
    assert_eq!(a.status, 416);
    assert_eq!(a.header("content-range"), Some(format!("bytes */{n}")));

    // Paths outside the package, and unknown packages: 404, never a file.
    for bad in [
        format!("{base}/content/{id}/../../dp.toml"),
        format!("{base}/content/{id}/%2e%2e/%2e%2e/dp.toml"),
        format!("{base}/content/../dp.toml"),
        format!("{base}/content/{id}/sources/../../../../etc/passwd"),
        format!("{base}/content/NOPE0001/setup.exe"),
        format!("{base}/content/NOPE0001/"),
        format!("{base}/dp.toml"),
    ] {
        let a = curl(w, &ca, &["-H", &auth, &bad]);
        assert_eq!(a.status, 404, "{bad}: {}", String::from_utf8_lossy(&a.body));
        assert!(!String::from_utf8_lossy(&a.body).contains("site_code"));
    }

    // Tokens: none, forged, another site's, expired, revoked: 401, logged.
    let a = curl(w, &ca, &[&index_url]);
    assert_eq!(a.status, 401);
    assert!(a.header("www-authenticate").is_some());
    let (head, sig) = token.rsplit_once('.').unwrap();
    let flipped: String = sig
        .chars()
        .enumerate()
        .map(|(i, c)| {
            if i == 3 {
                if c == 'A' {
                    'B'
                } else {
                    'A'
                }
            } else {
                c
            }
        })
        .collect();
    let forged = format!("{head}.{flipped}");
    let other_site = SiteProc::start(&w.join("other")).unwrap();
    let foreign = client_token(&other_site, &["--name", "lab"]);
    let short = client_token(&site, &["--name", "short", "--expires", "1s"]);
    let gone = client_token(&site, &["--name", "gone"]);
    assert_eq!(
        curl(w, &ca, &["-H", &bearer(&gone), &index_url]).status,
        200
    );
    site.cli_ok(&["client", "token", "revoke", "gone"]).unwrap();
    let unknown = site.cli(&["client", "token", "revoke", "nobody", "--json"]);
    assert!(!unknown.status.success());
    let e = json_of(&unknown);
    assert_eq!(e["code"], "not-found", "{e}");
    let again = site.cli(&["client", "token", "create", "--name", "lab", "--json"]);
    assert_eq!(
        json_of(&again)["code"],
        "conflict",
        "an active token keeps its name"
    );
    std::thread::sleep(Duration::from_millis(1500));
    for (what, t) in [
        ("forged", &forged),
        ("foreign", &foreign),
        ("expired", &short),
    ] {
        let a = curl(w, &ca, &["-H", &bearer(t), &index_url]);
        assert_eq!(a.status, 401, "{what} token");
    }
    wait_for("the DP to refuse the revoked token", LIMIT, || {
        Ok((curl(w, &ca, &["-H", &bearer(&gone), &index_url]).status == 401).then_some(()))
    })
    .unwrap();
    let a = curl(w, &ca, &["-H", "Authorization: Basic eDp5", &index_url]);
    assert_eq!(a.status, 401);
    let log = dp.log_text();
    for why in [
        "no client token",
        "not signed by this site",
        "expired",
        "was revoked",
    ] {
        assert!(
            log.lines()
                .any(|l| l.contains("client refused") && l.contains(why)),
            "the DP logs a refusal for {why:?}:\n{log}"
        );
    }
    let list = site.cli_json(&["client", "token", "list"]).unwrap();
    let states: Vec<(String, String)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["name"].as_str().unwrap().into(),
                t["state"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert!(
        states.contains(&("gone".into(), "revoked".into())),
        "{states:?}"
    );
    assert!(
        states.contains(&("short".into(), "expired".into())),
        "{states:?}"
    );
    assert!(
        states.contains(&("lab".into(), "active".into())),
        "{states:?}"
    );
    // Anonymous clients, when the site allows them on this DP.
    site.cli_ok(&["dp", "set", "dp1", "--anonymous-clients", "on"])
        .unwrap();
    wait_for("anonymous downloads allowed", LIMIT, || {
        Ok((curl(w, &ca, &[&index_url]).status == 200).then_some(()))
    })
    .unwrap();
    site.cli_ok(&["dp", "set", "dp1", "--anonymous-clients", "off"])
        .unwrap();
    wait_for("anonymous downloads refused again", LIMIT, || {
        Ok((curl(w, &ca, &[&index_url]).status == 401).then_some(()))
    })
    .unwrap();

    // The site knows where clients reach the DP.
    let row = site.dp_row("dp1").unwrap();
    assert_eq!(
        row["client_names"],
        serde_json::json!([ns.ns_ip.clone(), "dp1.branch.test"])
    );

    // Bad input on the listener: garbage instead of TLS, an oversized
    // header, a client that hangs up mid-file; the DP answers the next one.
    let garbage = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "head -c 20000 /dev/urandom > /dev/tcp/{}/{PORT}",
            ns.ns_ip
        ))
        .status()
        .unwrap();
    assert!(garbage.success() || garbage.code() == Some(1));
    let long = format!("Authorization: Bearer ferryc1.{}", "A".repeat(5000));
    let a = curl(w, &ca, &["-H", &long, &index_url]);
    assert_eq!(a.status, 401);
    assert!(String::from_utf8_lossy(&a.body).contains("longer than any token"));
    let hung = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "--limit-rate",
            "2M",
            "--max-time",
            "1",
            "--cacert",
        ])
        .arg(&ca)
        .args(["-H", &auth, &big_url])
        .status()
        .unwrap();
    assert_eq!(hung.code(), Some(28), "curl gave up mid-file (timeout)");
    let a = curl(w, &ca, &["-r", "0-99", "-H", &auth, &big_url]);
    assert_eq!((a.status, a.body.as_slice()), (206, &big[..100]));
    assert!(dp.exited().unwrap().is_none(), "the DP runs on");
    // What a client gets wrong is said, naming it.
    let other_ca = other_site.data.join("ca.pem");
    for (args, want) in [
        (vec!["--dp", "http://127.0.0.1:1"], "https://HOST:PORT"),
        (vec!["--dp", "https://127.0.0.1:1"], "cannot reach the DP"),
        (
            vec!["--dp", &base, "--ca", "/nonexistent/ca.pem"],
            "/nonexistent/ca.pem",
        ),
        (
            vec!["--dp", &base, "--ca", other_ca.to_str().unwrap()],
            "invalid peer certificate",
        ),
    ] {
        let mut c = Command::new(ferry_bin());
        c.args(["client", "fetch", &id, "--out"])
            .arg(w.join("nowhere"));
        c.args(["--token", &token, "--json"]);
        if !args.contains(&"--ca") {
            c.arg("--ca").arg(&ca);
        }
        let out = c.args(&args).output().unwrap();
        assert!(!out.status.success(), "{args:?}");
        let e = json_of(&out);
        let msg = e["error"].as_str().unwrap();
        assert!(msg.contains(want), "{args:?}: {msg}");
    }
    assert!(
        !w.join("nowhere").exists(),
        "nothing written on a failed start"
    );

    // ferry client fetch, slowed down, killed part way, run again: it
    // resumes with what it has and ends byte-identical.
    let out = w.join("fetched");
    ns.limit_out(Some("24mbit")).unwrap();
    let mut child = fetch(w, &base, &id, &out, &token, &ca)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let part = out.join("sources/big.dat.ferry-part");
    wait_for("part of big.dat downloaded", LIMIT, || {
        let held = fs::read(&part).map(|b| b.iter().filter(|&&x| x != 0).count());
        Ok(held.is_ok_and(|n| n > 1 << 20).then_some(()))
    })
    .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    ns.limit_out(None).unwrap();
    // The DP's next write to that client's connection meets its reset: it
    // must cost the connection, not the DP (a server keeps SIGPIPE ignored).
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        dp.exited().unwrap().is_none(),
        "the DP died when a client was killed mid-download"
    );
    assert!(
        !out.join("sources/big.dat").exists(),
        "killed before the end"
    );
    let done = fetch(w, &base, &id, &out, &token, &ca).output().unwrap();
    assert!(
        done.status.success(),
        "{} {}",
        String::from_utf8_lossy(&done.stdout),
        String::from_utf8_lossy(&done.stderr)
    );
    let r = json_of(&done);
    assert!(
        r["bytes_reused"].as_u64().unwrap() > 1 << 20,
        "the second run keeps what the first downloaded: {r}"
    );
    assert!(r["bytes_downloaded"].as_u64().unwrap() < r["bytes_total"].as_u64().unwrap());
    assert_eq!(
        tree_hashes(&out).unwrap(),
        source,
        "byte-identical to the source"
    );
    // curl reads the same bytes as the fetch wrote.
    let a = curl(w, &ca, &["-H", &auth, &big_url]);
    assert_eq!(a.body, big);

    // A download begun on revision 1 finishes on revision 1 after the DP
    // switched to revision 2 and deleted revision 1's folder.
    let old_setup = fs::read(root.join("setup.exe")).unwrap();
    let old_tag = format!("\"{}\"", blake3::hash(&old_setup).to_hex());
    let setup_url = format!("{base}/content/{id}/setup.exe");
    assert_eq!(
        curl(w, &ca, &["-r", "0-99", "-H", &auth, &setup_url]).status,
        206
    );
    let mut new_setup = old_setup.clone();
    new_setup[..16].copy_from_slice(b"serviced setup!!");
    fs::write(root.join("setup.exe"), &new_setup).unwrap();
    site.cli_ok(&["content", "refresh", &id]).unwrap();
    site.wait_installed(&id, "dp1", 2, LIMIT).unwrap();
    let r1 = dp.data.join("content/.ferry").join(format!("{id}.r1"));
    wait_for("revision 1's folder gone", LIMIT, || {
        Ok((!r1.exists()).then_some(()))
    })
    .unwrap();
    let a = curl(
        w,
        &ca,
        &[
            "-r",
            "0-99",
            "-H",
            &format!("If-Match: {old_tag}"),
            "-H",
            &auth,
            &setup_url,
        ],
    );
    assert_eq!((a.status, a.body.as_slice()), (206, &old_setup[..100]));
    assert_eq!(a.header("etag"), Some(old_tag.clone()));
    let a = curl(w, &ca, &["-r", "0-99", "-H", &auth, &setup_url]);
    assert_eq!((a.status, a.body.as_slice()), (206, &new_setup[..100]));
    let a = curl(
        w,
        &ca,
        &[
            "-r",
            "0-9",
            "-H",
            "If-Match: \"00ff\"",
            "-H",
            &auth,
            &setup_url,
        ],
    );
    assert_eq!(a.status, 412);

    // Multicast-only: HTTPS downloads of the package are refused with the
    // reason (its index still answers); --off serves them again.
    let refused = site.cli(&["upgrade", "multicast", &id, "--only"]);
    assert!(!refused.status.success(), "--only needs --allow");
    let m = site
        .cli_json(&["upgrade", "multicast", &id, "--allow", "--only"])
        .unwrap();
    assert_eq!(
        (m["allow"].clone(), m["only"].clone(), m["encrypt"].clone()),
        (true.into(), true.into(), false.into())
    );
    let shown = site.cli_ok(&["upgrade", "show", &id]).unwrap();
    assert!(
        shown.contains("only way") && shown.contains("in clear"),
        "{shown}"
    );
    wait_for("HTTPS refused for a multicast-only package", LIMIT, || {
        Ok((curl(w, &ca, &["-H", &auth, &setup_url]).status == 403).then_some(()))
    })
    .unwrap();
    let a = curl(w, &ca, &["-H", &auth, &setup_url]);
    assert!(String::from_utf8_lossy(&a.body).contains("multicast only"));
    assert_eq!(curl(w, &ca, &["-H", &auth, &index_url]).status, 200);
    site.cli_ok(&["upgrade", "multicast", &id, "--off"])
        .unwrap();
    wait_for("HTTPS served again", LIMIT, || {
        Ok((curl(w, &ca, &["-r", "0-0", "-H", &auth, &setup_url]).status == 206).then_some(()))
    })
    .unwrap();

    // A chunk damaged on the DP's disk: the fetch refuses it, names it.
    // (setup.exe: revision 2's own file; big.dat is still served from
    // revision 1's open file, which holds the same bytes.)
    let installed = dp
        .data
        .join("content/.ferry")
        .join(format!("{id}.r2"))
        .join("setup.exe");
    let f = fs::OpenOptions::new().write(true).open(&installed).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"DAMAGE", 150_000).unwrap();
    drop(f);
    let out2 = w.join("fetched2");
    let bad = fetch(w, &base, &id, &out2, &token, &ca).output().unwrap();
    assert!(!bad.status.success());
    let e = json_of(&bad);
    let msg = e["error"].as_str().unwrap();
    assert!(
        msg.contains("setup.exe") && msg.contains("does not match the signed manifest"),
        "{msg}"
    );
    assert!(!out2.join("setup.exe").exists());
    dp.stop().unwrap();
}

/// The parts of a multipart/byteranges body: (Content-Range, bytes).
fn multipart(body: &[u8], boundary: &str) -> Vec<(String, Vec<u8>)> {
    let delim = format!("\r\n--{boundary}");
    let text = body;
    let mut parts = Vec::new();
    let mut rest = text;
    while let Some(at) = find(rest, delim.as_bytes()) {
        rest = &rest[at + delim.len()..];
        if rest.starts_with(b"--") {
            break;
        }
        let head_end = find(rest, b"\r\n\r\n").unwrap();
        let head = String::from_utf8_lossy(&rest[..head_end]).into_owned();
        let range = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Range: "))
            .unwrap()
            .to_string();
        rest = &rest[head_end + 4..];
        let end = find(rest, delim.as_bytes()).unwrap();
        parts.push((range, rest[..end].to_vec()));
        rest = &rest[end..];
    }
    parts
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
