//! The web status page on the site's operator listener, read the way an
//! operator reads it: headless Chromium (driven over WebDriver by Debian's
//! chromedriver) logs in with the operator token and watches a transfer
//! go from in progress to installed without a reload; curl checks the
//! login's cookie and refusals; `chromium --dump-dom` reads the login page.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ferry_tests::harness::{free_port, wait_for, DpProc, SiteProc};
use ferry_tests::wimtools;
use serde_json::{json, Value};

const LIMIT: Duration = Duration::from_secs(120);
/// WebDriver's key for an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Where the test leaves its screenshots and DOM dumps: beside the test
/// binaries, in the build folder.
fn output_dir() -> PathBuf {
    let bin = ferry_tests::harness::ferry_bin();
    let dir = bin.parent().unwrap_or(Path::new(".")).join("test-output");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A chromedriver and one headless Chromium session.
struct Browser {
    driver: Child,
    base: String,
    session: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn start(width: u32, height: u32) -> Browser {
        let port = free_port().unwrap();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (Debian's chromium-driver; scripts/setup.sh installs it)");
        let base = format!("http://127.0.0.1:{port}");
        wait_for("chromedriver", LIMIT, || {
            Ok(call("GET", &format!("{base}/status"), None)
                .ok()
                .filter(|v| v["value"]["ready"] == true))
        })
        .unwrap();
        let profile = tempfile::tempdir().unwrap();
        let caps = json!({ "capabilities": { "alwaysMatch": { "browserName": "chrome",
            "goog:chromeOptions": { "binary": "/usr/bin/chromium",
            "mobileEmulation": { "deviceMetrics": { "width": width, "height": height, "pixelRatio": 1.0 } },
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                format!("--window-size={width},{height}"),
                format!("--user-data-dir={}", profile.path().display()),
            ] } } } });
        let v = call("POST", &format!("{base}/session"), Some(caps)).unwrap();
        let session = v["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {v}"))
            .to_string();
        Browser {
            driver,
            base,
            session,
            _profile: profile,
        }
    }

    fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let v = call(method, &url, body).unwrap();
        assert!(
            v["value"].get("error").is_none(),
            "WebDriver {method} {path}: {v}"
        );
        v["value"].clone()
    }

    fn go(&self, url: &str) {
        self.cmd("POST", "/url", Some(json!({ "url": url })));
    }

    fn url(&self) -> String {
        self.cmd("GET", "/url", None).as_str().unwrap().to_string()
    }

    fn js(&self, script: &str) -> Value {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": [] })),
        )
    }

    fn find(&self, css: &str) -> String {
        let v = self.cmd(
            "POST",
            "/element",
            Some(json!({ "using": "css selector", "value": css })),
        );
        v[ELEMENT].as_str().unwrap().to_string()
    }

    fn dom(&self) -> String {
        self.cmd("GET", "/source", None)
            .as_str()
            .unwrap()
            .to_string()
    }

    fn screenshot(&self, name: &str) -> PathBuf {
        use base64::Engine as _;
        let b64 = self.cmd("GET", "/screenshot", None);
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().unwrap())
            .unwrap();
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        let path = output_dir().join(name);
        std::fs::write(&path, png).unwrap();
        path
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = call(
            "DELETE",
            &format!("{}/session/{}", self.base, self.session),
            None,
        );
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// One WebDriver call with curl.
fn call(method: &str, url: &str, body: Option<Value>) -> anyhow::Result<Value> {
    let mut c = Command::new("curl");
    c.args(["-sS", "-X", method, url]);
    if let Some(b) = body {
        c.args(["-H", "content-type: application/json", "-d", &b.to_string()]);
    }
    let out = c.output()?;
    anyhow::ensure!(out.status.success(), "curl {url}: {out:?}");
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// curl against the site: status code, headers (as sent), body.
fn curl(args: &[&str]) -> (u16, String, String) {
    let out = Command::new("curl")
        .args([
            "-sS",
            "-D",
            "-",
            "-o",
            "/dev/stdout",
            "-w",
            "\n%{http_code}",
        ])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "curl: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (rest, code) = text.rsplit_once('\n').unwrap();
    let (head, body) = rest.split_once("\r\n\r\n").unwrap_or((rest, ""));
    (
        code.trim().parse().unwrap(),
        head.to_string(),
        body.to_string(),
    )
}

fn token(site: &SiteProc) -> String {
    std::fs::read_to_string(site.data.join("operator.token"))
        .unwrap()
        .trim()
        .to_string()
}

/// The row of `package` on `dp` as the browser shows it now, with its
/// state and percent: (outer HTML, data-state, percent or none).
fn row(b: &Browser, package: &str, dp: &str) -> Option<(String, String, Option<u64>)> {
    let v = b.js(&format!(
        r#"const r = document.querySelector('#rows tr[data-package="{package}"][data-dp="{dp}"]');
           if (!r) return null;
           const p = r.querySelector('progress');
           return [r.outerHTML, r.dataset.state, p ? Number(p.value) : null];"#
    ));
    let a = v.as_array()?;
    Some((
        a[0].as_str()?.to_string(),
        a[1].as_str()?.to_string(),
        a[2].as_u64(),
    ))
}

#[test]
fn the_status_page_logs_in_and_follows_a_transfer_without_reloading() {
    let dir = tempfile::tempdir().unwrap();
    let wim = wimtools::big_wim(dir.path(), 96, 31).unwrap();
    let site = SiteProc::start(dir.path()).unwrap();
    let _dp = DpProc::start(dir.path(), "dp1", &site).unwrap();
    let id = site.add_image(&wim, &[]).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    // Several seconds long, so the page catches it in progress.
    site.cli_ok(&["dp", "set", "dp1", "--rate", "8M"]).unwrap();
    let ui = format!("http://127.0.0.1:{}/ui/", site.port);

    // A phone's width.
    let b = Browser::start(390, 844);
    b.go(&ui);
    assert!(
        b.url().contains("/ui/login?next=/ui/"),
        "not logged in: sent to the login form, not {}",
        b.url()
    );
    // A wrong token is refused on the form.
    let field = b.find("#token");
    b.cmd(
        "POST",
        &format!("/element/{field}/value"),
        Some(json!({ "text": "not-the-token" })),
    );
    let button = b.find("form button[type=submit]");
    b.cmd("POST", &format!("/element/{button}/click"), Some(json!({})));
    wait_for("the refusal", LIMIT, || {
        Ok(b.dom()
            .contains("That is not the operator token")
            .then_some(()))
    })
    .unwrap();
    let field = b.find("#token");
    b.cmd(
        "POST",
        &format!("/element/{field}/value"),
        Some(json!({ "text": token(&site) })),
    );
    let button = b.find("form button[type=submit]");
    b.cmd("POST", &format!("/element/{button}/click"), Some(json!({})));
    wait_for("the overview", LIMIT, || {
        Ok((b.url() == ui && b.dom().contains("id=\"live\"")).then_some(()))
    })
    .unwrap();
    // The session cookie is out of the script's reach.
    assert_eq!(b.js("return document.cookie"), json!(""));
    // Set once: a reload of the page would lose it.
    b.js("window.ferryTestMark = 'loaded once'; return null");

    site.cli_ok(&["distribute", &id, "--dp", "dp1"]).unwrap();
    let (html, _, percent) = wait_for("the row in progress", LIMIT, || {
        Ok(row(&b, &id, "dp1").filter(|(_, state, p)| state == "in-progress" && p.is_some()))
    })
    .unwrap();
    assert!(
        html.contains("dp1") && html.contains("in-progress"),
        "{html}"
    );
    assert!(percent.unwrap() <= 100);
    assert!(
        html.contains("full copy"),
        "bytes beside a full copy: {html}"
    );
    b.screenshot("web-status-phone-in-progress.png");
    std::fs::write(output_dir().join("web-status-in-progress.html"), b.dom()).unwrap();

    let (html, _, percent) = wait_for("the row installed", LIMIT, || {
        Ok(row(&b, &id, "dp1").filter(|(_, state, _)| state == "installed"))
    })
    .unwrap();
    assert_eq!(percent, Some(100), "{html}");
    assert!(html.contains("100%"), "{html}");
    assert_eq!(
        b.js("return window.ferryTestMark || 'reloaded'"),
        json!("loaded once"),
        "the page followed the transfer without reloading"
    );
    // Readable on a phone: nothing wider than the screen.
    assert_eq!(
        b.js("return document.documentElement.scrollWidth <= window.innerWidth"),
        json!(true),
        "the overview fits a phone's width"
    );
    let shot = b.screenshot("web-status-phone-installed.png");
    std::fs::write(output_dir().join("web-status-installed.html"), b.dom()).unwrap();
    eprintln!(
        "screenshots and DOM dumps in {}",
        shot.parent().unwrap().display()
    );

    // The package's page: its revision and where it is installed.
    b.go(&format!("{ui}packages/{id}"));
    let dom = b.dom();
    assert!(dom.contains("data-revision=\"1\""), "{dom}");
    assert!(
        dom.contains("href=\"/ui/dps/dp1\""),
        "installed on dp1: {dom}"
    );
    assert!(dom.contains("Servicing history"), "{dom}");
    // The DP's page: online, its package, its validation.
    b.go(&format!("{ui}dps/dp1"));
    let dom = b.dom();
    assert!(dom.contains("online") && dom.contains(&id), "{dom}");
    assert!(dom.contains("Never validated"), "{dom}");
    b.go(&format!("{ui}jobs"));
    assert!(b.dom().contains("No servicing job"));
    b.go(&format!("{ui}multicast"));
    assert!(b.dom().contains("No session has run"));
    b.go(&format!("{ui}dps/nosuch"));
    assert!(b.dom().contains("no DP named nosuch"));

    // Logging out ends the session: the page sends the browser back.
    let out = b.find("header form button");
    b.cmd("POST", &format!("/element/{out}/click"), Some(json!({})));
    wait_for("the login form", LIMIT, || {
        Ok(b.url().contains("/ui/login").then_some(()))
    })
    .unwrap();
    b.go(&ui);
    assert!(b.url().contains("/ui/login"), "{}", b.url());
}

#[test]
fn the_login_sets_an_httponly_cookie_that_opens_pages_but_not_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let site = SiteProc::start(dir.path()).unwrap();
    let base = format!("http://127.0.0.1:{}", site.port);

    // No session: pages send to the form, their live part answers 401.
    let (code, head, _) = curl(&[&format!("{base}/ui/jobs")]);
    assert_eq!(code, 303);
    assert!(
        head.to_ascii_lowercase()
            .contains("location: /ui/login?next=/ui/jobs"),
        "{head}"
    );
    let (code, _, _) = curl(&["-H", "x-ferry-part: live", &format!("{base}/ui/")]);
    assert_eq!(code, 401);
    // A forged cookie is no session.
    let (code, _, _) = curl(&["-b", "ferry_session=forged", &format!("{base}/ui/")]);
    assert_eq!(code, 303);

    // A wrong token: 401, the form again, no cookie.
    let (code, head, body) = curl(&["-d", "token=wrong", &format!("{base}/ui/login")]);
    assert_eq!(code, 401);
    assert!(!head.to_ascii_lowercase().contains("set-cookie"), "{head}");
    assert!(body.contains("That is not the operator token"), "{body}");

    // The right one: a session cookie, HttpOnly and SameSite=Strict, and
    // back where the operator was going (never to another site).
    let (code, head, _) = curl(&[
        "-d",
        &format!("token={}&next=/ui/jobs", token(&site)),
        &format!("{base}/ui/login"),
    ]);
    assert_eq!(code, 303, "{head}");
    assert!(
        head.to_ascii_lowercase().contains("location: /ui/jobs"),
        "{head}"
    );
    let cookie_line = head
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .unwrap_or_else(|| panic!("no cookie: {head}"));
    let attrs = cookie_line.to_ascii_lowercase();
    assert!(attrs.contains("; httponly"), "{cookie_line}");
    assert!(attrs.contains("; samesite=strict"), "{cookie_line}");
    let session = cookie_line
        .split_once("ferry_session=")
        .unwrap()
        .1
        .split(';')
        .next()
        .unwrap();
    assert!(session.len() >= 32, "{cookie_line}");
    assert_ne!(session, token(&site), "the token is not the cookie");
    let cookie = format!("ferry_session={session}");
    let (code, head, body) = curl(&["-b", &cookie, &format!("{base}/ui/")]);
    assert_eq!(code, 200, "{body}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-security-policy: default-src 'none'"),
        "{head}"
    );
    assert!(body.contains("Overview"), "{body}");
    // An open redirect is not followed.
    let (code, head, _) = curl(&[
        "-d",
        &format!("token={}&next=https://evil.example/", token(&site)),
        &format!("{base}/ui/login"),
    ]);
    assert_eq!(code, 303);
    assert!(
        head.to_ascii_lowercase().contains("location: /ui/\r\n"),
        "{head}"
    );
    // The live part alone, as the page's script asks for it.
    let (code, _, part) = curl(&[
        "-b",
        &cookie,
        "-H",
        "x-ferry-part: live",
        &format!("{base}/ui/"),
    ]);
    assert_eq!(code, 200);
    assert!(
        part.contains("class=\"cards\"") && !part.contains("<html"),
        "{part}"
    );
    // A browser that takes gzip gets the page gzipped (curl unpacks it).
    let (code, head, page) = curl(&["--compressed", "-b", &cookie, &format!("{base}/ui/")]);
    assert_eq!(code, 200);
    let h = head.to_ascii_lowercase();
    assert!(h.contains("content-encoding: gzip"), "{head}");
    assert!(h.contains("vary: accept-encoding"), "{head}");
    assert!(
        page.contains("Overview") && page.trim_end().ends_with("</html>"),
        "{page}"
    );
    // Rows by state, and a query that does not read is refused.
    let (code, _, only) = curl(&["-b", &cookie, &format!("{base}/ui/?state=failed&page=2")]);
    assert_eq!(code, 200);
    assert!(only.contains("Only ") && only.contains("no row"), "{only}");
    let (code, _, _) = curl(&["-b", &cookie, &format!("{base}/ui/?page=two")]);
    assert_eq!(code, 400);
    // The API keeps bearer tokens: the cookie does not open it.
    let (code, _, _) = curl(&["-b", &cookie, &format!("{base}/api/v1/dps")]);
    assert_eq!(code, 401);

    // Chromium's own --dump-dom of the login page (no session needed).
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new("chromium")
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("{base}/ui/login"))
        .output()
        .expect("chromium (scripts/setup.sh installs it)");
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        dom.contains("name=\"token\"") && dom.contains("type=\"password\""),
        "{dom}"
    );
}

/// `ferry …` against the site in `data`, with extra arguments first.
fn ferry(args: &[&str]) -> std::process::Output {
    Command::new(ferry_tests::harness::ferry_bin())
        .args(args)
        .output()
        .unwrap()
}

/// Starts `ferry site serve` on `data` (its log in `log`) and waits until
/// `url`'s /healthz answers over HTTPS trusting only `ca` (`resolve`: a
/// curl `--resolve` for a name); the log in the panic when it does not.
fn serve_https(data: &Path, log: &Path, ca: &Path, url: &str, resolve: Option<&str>) -> Child {
    let mut serving = Command::new(ferry_tests::harness::ferry_bin())
        .args(["site", "serve", "--data"])
        .arg(data)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let up = wait_for("the site over HTTPS", LIMIT, || {
        let mut c = Command::new("curl");
        c.args(["-sS", "--cacert"]).arg(ca);
        if let Some(r) = resolve {
            c.args(["--resolve", r]);
        }
        let out = c.arg(format!("{url}/healthz")).output()?;
        Ok((out.stdout == b"ok").then_some(()))
    });
    if let Err(e) = up {
        let _ = serving.kill();
        panic!("{e:#} at {url}: {:?}", std::fs::read_to_string(log));
    }
    serving
}

#[test]
fn off_loopback_the_operator_api_speaks_https_only_and_the_cli_pins_the_site_ca() {
    let dir = tempfile::tempdir().unwrap();
    let mut site = SiteProc::start(dir.path()).unwrap();
    site.stop().unwrap();
    let data = site.data.clone();
    let ca = data.join("ca.pem");
    let cfg_path = data.join("site.toml");
    let loopback = std::fs::read_to_string(&cfg_path).unwrap();
    let at = format!("listen = \"127.0.0.1:{}\"", site.port);
    assert!(loopback.contains(&at), "{loopback}");
    let wide = loopback.replace(&at, &format!("listen = \"0.0.0.0:{}\"", site.port));

    // Plain HTTP off loopback: the site refuses to start, and says why.
    std::fs::write(
        &cfg_path,
        wide.replace("[operator]\n", "[operator]\ntls = false\n"),
    )
    .unwrap();
    let out = ferry(&["site", "serve", "--data", data.to_str().unwrap()]);
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("HTTPS only") && said.contains("site.toml"),
        "{said}"
    );

    // Off loopback without the setting: HTTPS, a certificate from the site CA.
    std::fs::write(&cfg_path, &wide).unwrap();
    let https = format!("https://127.0.0.1:{}", site.port);
    let mut serving = serve_https(&data, &dir.path().join("https-site.log"), &ca, &https, None);
    // Not in clear, and not to a client that does not trust the site CA.
    let (code, _, _) = {
        let out = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
            .arg(format!("http://127.0.0.1:{}/api/v1/dps", site.port))
            .output()
            .unwrap();
        (String::from_utf8_lossy(&out.stdout).to_string(), (), ())
    };
    assert_eq!(code, "000", "plain HTTP gets no answer");
    let out = Command::new("curl")
        .args(["-sS", &format!("{https}/healthz")])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "the system's CAs do not vouch for it"
    );

    // The CLI on the site server: URL and CA from the data folder.
    let out = ferry(&["--data", data.to_str().unwrap(), "dp", "add", "dp1"]);
    assert!(out.status.success(), "{out:?}");
    let list = ferry(&["--data", data.to_str().unwrap(), "--json", "dp", "list"]);
    assert!(list.status.success(), "{list:?}");
    assert!(String::from_utf8_lossy(&list.stdout).contains("\"dp1\""));
    // From another machine: --site, --token and --ca.
    let t = token(&site);
    let remote = |extra: &[&str]| {
        let mut args = vec!["--site", &https, "--token", &t, "--json"];
        args.extend_from_slice(extra);
        args.extend(["dp", "list"]);
        ferry(&args)
    };
    let out = remote(&["--ca", ca.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let said = |out: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let out = remote(&[]);
    assert!(!out.status.success());
    assert!(said(&out).contains("--ca FILE"), "{}", said(&out));
    // Another site's CA does not vouch for this one: the token stays home.
    let other = dir.path().join("other");
    let out = ferry(&[
        "site",
        "init",
        "--listen",
        "127.0.0.1:1",
        "--dp-listen",
        "127.0.0.1:2",
        "--data",
        other.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    let out = remote(&["--ca", other.join("ca.pem").to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        said(&out).contains("cannot reach the site"),
        "{}",
        said(&out)
    );

    // The status page's session cookie is Secure over HTTPS.
    let (code, head, _) = curl(&[
        "--cacert",
        ca.to_str().unwrap(),
        "-d",
        &format!("token={t}"),
        &format!("{https}/ui/login"),
    ]);
    assert_eq!(code, 303, "{head}");
    let head = head.to_ascii_lowercase();
    assert!(head.contains("; secure"), "{head}");
    let _ = serving.kill();
    let _ = serving.wait();

    // A damaged operator key: the site does not start, names the file and
    // what to do; the rest of the data folder is as it was. Deleted, the
    // key and certificate are issued again.
    let key = data.join("operator-https.key");
    std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\ndamaged\n").unwrap();
    let out = ferry(&["site", "serve", "--data", data.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = said(&out);
    assert!(err.contains("operator HTTPS"), "{err}");
    assert!(err.contains("operator-https.key"), "{err}");
    assert!(data.join("ca.key").exists() && data.join("operator-https.pem").exists());
    std::fs::remove_file(&key).unwrap();
    let mut serving = serve_https(
        &data,
        &dir.path().join("https-site-again.log"),
        &ca,
        &https,
        None,
    );
    let _ = serving.kill();
    let _ = serving.wait();

    // New names in site.toml: a certificate for them at the next start.
    let named = wide.replace("[operator]\n", "[operator]\nnames = [\"ferry.example\"]\n");
    assert_ne!(named, wide);
    std::fs::write(&cfg_path, &named).unwrap();
    let resolve = format!("ferry.example:{}:127.0.0.1", site.port);
    let named_url = format!("https://ferry.example:{}", site.port);
    let mut serving = serve_https(
        &data,
        &dir.path().join("https-site-named.log"),
        &ca,
        &named_url,
        Some(&resolve),
    );
    let _ = serving.kill();
    let _ = serving.wait();
}

#[test]
fn the_operator_listener_refuses_long_paths_and_large_bodies_and_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let site = SiteProc::start(dir.path()).unwrap();
    let base = format!("http://127.0.0.1:{}", site.port);
    let bearer = format!("Authorization: Bearer {}", token(&site));

    // A path past 4 KiB: 414 with the API's error body, before the token
    // is even looked at.
    let long = format!("{base}/api/v1/images/{}", "A".repeat(5000));
    let (code, _, body) = curl(&["-H", &bearer, &long]);
    assert_eq!(code, 414, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["code"], "too-large");
    assert!(
        v["error"].as_str().unwrap().contains("at most 4096"),
        "{body}"
    );
    // A path just under it gets its ordinary answer.
    let fits = format!("{base}/api/v1/images/{}", "A".repeat(4000));
    let (code, _, _) = curl(&["-H", &bearer, &fits]);
    assert_eq!(code, 404);

    // A JSON body past 64 KiB: 413.
    let big = json!({ "name": "g".repeat(100 * 1024) }).to_string();
    let (code, _, body) = curl(&[
        "-H",
        &bearer,
        "-H",
        "content-type: application/json",
        "--data-binary",
        &big,
        &format!("{base}/api/v1/groups"),
    ]);
    assert_eq!(code, 413, "{body}");
    // A login form past 4 KiB: 413, no session.
    let (code, head, _) = curl(&[
        "-d",
        &format!("token={}", "t".repeat(8192)),
        &format!("{base}/ui/login"),
    ]);
    assert_eq!(code, 413);
    assert!(!head.to_ascii_lowercase().contains("set-cookie"));

    // Nothing was made, and the site serves on.
    let groups = site.cli_json(&["group", "list"]).unwrap();
    assert_eq!(groups, json!({}), "{groups}");
    assert!(site.cli_ok(&["dp", "list"]).is_ok());
}
