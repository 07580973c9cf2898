//! Hostile and malformed protocol input against a real site process: each
//! gets a clear error on its stream, the stated limits hold, and the site
//! keeps serving.

use std::path::Path;
use std::time::Duration;

use ferry_tests::harness::{DpProc, SiteProc};
use ferry_wire::pb::{self, reply, request, Code};
use ferry_wire::{read_frame, write_frame, MAX_BATCH_CHUNKS, MAX_REPLY_BYTES, MAX_STREAMS};

/// A connection with the enrolled DP's certificate from `data`.
async fn connect_as(data: &Path, site: &str) -> quinn::Connection {
    let read = |f: &str| std::fs::read_to_string(data.join(f)).unwrap();
    let ca = ferry_net::pki::cert_der(&read("ca.pem"), "ca").unwrap();
    let id = ferry_net::tls::Identity::from_pem(&read("dp.pem"), &read("dp.key"), "dp").unwrap();
    let cfg = ferry_net::tls::dp_client(&ca, id, Default::default()).unwrap();
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.connect_with(cfg, site.parse().unwrap(), ferry_net::pki::SITE_SERVER_NAME)
        .unwrap()
        .await
        .unwrap()
}

/// Sends raw bytes as a request and returns the site's first reply.
async fn raw(conn: &quinn::Connection, bytes: &[u8]) -> pb::Reply {
    let (mut s, mut r) = conn.open_bi().await.unwrap();
    s.write_all(bytes).await.unwrap();
    let _ = s.finish();
    read_frame::<pb::Reply>(&mut r, MAX_REPLY_BYTES)
        .await
        .unwrap()
        .expect("a reply")
}

async fn ask(conn: &quinn::Connection, req: request::Kind) -> Vec<pb::Reply> {
    let (mut s, mut r) = conn.open_bi().await.unwrap();
    write_frame(&mut s, &pb::Request { kind: Some(req) })
        .await
        .unwrap();
    let _ = s.finish();
    let mut out = Vec::new();
    while let Some(rep) = read_frame::<pb::Reply>(&mut r, MAX_REPLY_BYTES)
        .await
        .unwrap()
    {
        out.push(rep);
    }
    out
}

/// Opens a chunk stream for `package` `revision`, sends each `Want`, ends
/// its half, and returns every reply frame.
async fn fetch(
    conn: &quinn::Connection,
    package: &str,
    revision: u32,
    wants: Vec<Vec<bytes::Bytes>>,
) -> Vec<pb::Reply> {
    fetch_with(conn, package, revision, None, wants).await
}

/// [`fetch`] showing `grant` (a source DP asks for one).
async fn fetch_with(
    conn: &quinn::Connection,
    package: &str,
    revision: u32,
    grant: Option<pb::SignedGrant>,
    wants: Vec<Vec<bytes::Bytes>>,
) -> Vec<pb::Reply> {
    let (mut s, mut r) = conn.open_bi().await.unwrap();
    let req = pb::Request {
        kind: Some(request::Kind::Fetch(pb::Fetch {
            package: package.into(),
            revision,
            grant,
        })),
    };
    write_frame(&mut s, &req).await.unwrap();
    for ids in wants {
        // The site may stop reading after a refusal; later writes can fail.
        if write_frame(&mut s, &pb::Want { ids, grant: None })
            .await
            .is_err()
        {
            break;
        }
    }
    let _ = s.finish();
    let mut out = Vec::new();
    while let Ok(Some(rep)) = read_frame::<pb::Reply>(&mut r, MAX_REPLY_BYTES).await {
        out.push(rep);
    }
    out
}

fn error_of(r: &pb::Reply) -> (i32, String) {
    match &r.kind {
        Some(reply::Kind::Error(e)) => (e.code, e.message.clone()),
        other => panic!("expected an error, got {other:?}"),
    }
}

#[test]
fn malformed_oversized_and_excess_requests_get_errors_and_the_site_survives() {
    let dir = tempfile::tempdir().unwrap();
    let mut site = SiteProc::start(dir.path()).unwrap();
    let dp = DpProc::enroll(dir.path(), "dp1", &site).unwrap();
    // A package assigned to dp1 (the agent is not running: this test is it).
    let wim = ferry_tests::wimtools::tree_wim(dir.path(), "small", 20, 4, &[]).unwrap();
    let id = site.add_image(&wim, &[]).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    site.cli_ok(&["distribute", &id, "--dp", "dp1"]).unwrap();
    let first_chunk: bytes::Bytes = {
        site.stop().unwrap();
        let lib = ferry_store::Library::open(&site.data.join("library")).unwrap();
        let m = lib.manifests(&id, 1).unwrap();
        let c = m[0].chunks[0].id.as_bytes().to_vec().into();
        drop(lib);
        site.serve().unwrap();
        c
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // Hundreds of streams: at most MAX_STREAMS are open at once; the
        // next waits until one closes.
        let fresh = connect_as(&dp.data, &site.dp_addr()).await;
        let mut held = Vec::new();
        for _ in 0..MAX_STREAMS {
            let (mut s, r) = tokio::time::timeout(Duration::from_secs(10), fresh.open_bi())
                .await
                .expect("the first MAX_STREAMS streams open at once")
                .unwrap();
            s.write_all(&[0]).await.unwrap(); // make the stream known
            held.push((s, r));
        }
        let extra = tokio::time::timeout(Duration::from_millis(700), fresh.open_bi()).await;
        assert!(
            extra.is_err(),
            "stream {} opened past the limit",
            MAX_STREAMS + 1
        );
        for (mut s, _r) in held.drain(..) {
            let _ = s.finish();
        }
        drop(held);
        let next = tokio::time::timeout(Duration::from_secs(10), async {
            let mut all = Vec::new();
            for _ in 0..300 {
                let (mut s, r) = fresh.open_bi().await.unwrap();
                let _ = s.finish();
                all.push(r);
            }
            all
        })
        .await;
        assert!(next.is_ok(), "streams were not released");

        let conn = connect_as(&dp.data, &site.dp_addr()).await;

        // A length prefix far above the request limit.
        let (code, msg) = error_of(&raw(&conn, &u32::MAX.to_be_bytes()).await);
        assert_eq!(code, Code::BadRequest as i32);
        assert!(msg.contains("exceeds the limit"), "{msg}");
        // A frame that ends early.
        let mut short = 100u32.to_be_bytes().to_vec();
        short.extend([0u8; 10]);
        let (_, msg) = error_of(&raw(&conn, &short).await);
        assert!(msg.contains("ended inside a frame"), "{msg}");
        // Bytes that are no protobuf message.
        let mut junk = 4u32.to_be_bytes().to_vec();
        junk.extend([0xFF; 4]);
        let (_, msg) = error_of(&raw(&conn, &junk).await);
        assert!(msg.contains("malformed"), "{msg}");

        // A chunk stream of a package that is not assigned to this DP.
        let r = fetch(&conn, "FRY09999", 1, vec![]).await;
        let (code, msg) = error_of(&r[0]);
        assert_eq!(code, Code::NotAllowed as i32);
        assert!(msg.contains("not assigned to DP dp1"), "{msg}");
        // Nor of another revision of an assigned one.
        let r = fetch(&conn, &id, 7, vec![]).await;
        assert_eq!(error_of(&r[0]).0, Code::NotAllowed as i32);
        // Too many ids in one `Want`.
        let ids: Vec<bytes::Bytes> = (0..=MAX_BATCH_CHUNKS)
            .map(|i| vec![i as u8; 32].into())
            .collect();
        let r = fetch(&conn, &id, 1, vec![ids]).await;
        let (code, msg) = error_of(&r[0]);
        assert_eq!(code, Code::BadRequest as i32);
        assert!(msg.contains("the limit is"), "{msg}");
        // A chunk outside the revision is refused in its place; a chunk of
        // it is sent; a malformed id ends the stream with an error.
        let r = fetch(
            &conn,
            &id,
            1,
            vec![
                vec![vec![7u8; 32].into(), first_chunk.clone()],
                vec![vec![7u8; 5].into()],
            ],
        )
        .await;
        let (code, msg) = error_of(&r[0]);
        assert_eq!(code, Code::NotAllowed as i32);
        assert!(msg.contains("is not in"), "{msg}");
        match &r[1].kind {
            Some(reply::Kind::Chunk(c)) => {
                assert_eq!(c.id, first_chunk);
                assert_eq!(blake3::hash(&c.data).as_bytes().as_slice(), c.id.as_ref());
            }
            other => panic!("expected the chunk, got {other:?}"),
        }
        assert_eq!(error_of(&r[2]).0, Code::BadRequest as i32);
        assert_eq!(r.len(), 3);
        // A manifest of a package that is not assigned to this DP, and of
        // a revision it is not assigned.
        for (package, revision) in [("FRY09999", 1), (id.as_str(), 7)] {
            let r = ask(
                &conn,
                request::Kind::GetManifest(pb::GetManifest {
                    package: package.into(),
                    revision,
                    base_revision: 0,
                }),
            )
            .await;
            assert_eq!(
                error_of(&r[0]).0,
                Code::NotAllowed as i32,
                "{package} r{revision}"
            );
        }
        // In maintenance, the assigned revision it never started is refused
        // too; out of it, it is served.
        let manifest = || {
            ask(
                &conn,
                request::Kind::GetManifest(pb::GetManifest {
                    package: id.clone(),
                    revision: 1,
                    base_revision: 0,
                }),
            )
        };
        site.cli_ok(&["dp", "set", "dp1", "--maintenance", "on"])
            .unwrap();
        let r = manifest().await;
        let (code, msg) = error_of(&r[0]);
        assert_eq!(code, Code::NotAllowed as i32);
        assert!(msg.contains("in maintenance"), "{msg}");
        site.cli_ok(&["dp", "set", "dp1", "--maintenance", "off"])
            .unwrap();
        let r = manifest().await;
        assert!(
            matches!(r[0].kind, Some(reply::Kind::Manifest(_))),
            "{:?}",
            r[0]
        );
        // Another protocol version.
        let r = ask(
            &conn,
            request::Kind::Watch(pb::Watch {
                protocol: 99,
                holdings: vec![],
                disk: None,
                peer_address: String::new(),
            }),
        )
        .await;
        assert!(error_of(&r[0]).1.contains("protocol version 99"));

        // An enrolling (certificate-less) connection may only enroll.
        let ca = std::fs::read_to_string(dp.data.join("ca.pem")).unwrap();
        let fp = ferry_net::pki::fingerprint(&ferry_net::pki::cert_der(&ca, "ca").unwrap());
        let anon_cfg = ferry_net::tls::enroll_client(&fp).unwrap();
        let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let anon = ep
            .connect_with(
                anon_cfg,
                site.dp_addr().parse().unwrap(),
                ferry_net::pki::SITE_SERVER_NAME,
            )
            .unwrap()
            .await
            .unwrap();
        let r = fetch(&anon, &id, 1, vec![]).await;
        let (code, msg) = error_of(&r[0]);
        assert_eq!(code, Code::NotAllowed as i32);
        assert!(msg.contains("enroll first"), "{msg}");
        let r = ask(
            &anon,
            request::Kind::Enroll(pb::Enroll {
                token: "0".repeat(64),
                csr_der: vec![1, 2, 3].into(),
            }),
        )
        .await;
        assert_eq!(error_of(&r[0]).0, Code::BadToken as i32);
    });
    // Still serving operators and DPs.
    assert!(site.cli_ok(&["dp", "list"]).unwrap().contains("dp1"));
    let log = std::fs::read_to_string(&site.log).unwrap();
    assert!(
        log.contains("bad request from DP"),
        "the site logs the bad input"
    );
    assert!(!log.contains("panicked"));
}

/// A connection to source DP `addr` with the certificate of the DP in
/// `data`, accepting the source by its certificate `source_fp`.
async fn connect_to_source(data: &Path, addr: &str, source_fp: &str) -> quinn::Connection {
    let read = |f: &str| std::fs::read_to_string(data.join(f)).unwrap();
    let id = ferry_net::tls::Identity::from_pem(&read("dp.pem"), &read("dp.key"), "dp").unwrap();
    let cfg = ferry_net::tls::dp_peer_client(id, source_fp, Default::default()).unwrap();
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.connect_with(cfg, addr.parse().unwrap(), "ferry-dp")
        .unwrap()
        .await
        .unwrap()
}

/// The fingerprint of the certificate of the DP in `data`.
fn cert_fingerprint(data: &Path) -> String {
    let pem = std::fs::read_to_string(data.join("dp.pem")).unwrap();
    ferry_net::pki::fingerprint(&ferry_net::pki::cert_der(&pem, "dp").unwrap())
}

#[test]
fn a_source_dp_serves_only_what_a_site_grant_allows_the_dp_it_names() {
    let dir = tempfile::tempdir().unwrap();
    let mut site = SiteProc::start(dir.path()).unwrap();
    let port = ferry_tests::harness::free_udp_port().unwrap();
    let listen = format!("127.0.0.1:{port}");
    let mut src = DpProc::enroll_with(
        dir.path(),
        "src",
        &site,
        &site.dp_addr(),
        &[],
        &["--peer-listen", &listen],
    )
    .unwrap();
    src.serve().unwrap();
    // The test is the pull DP (and another DP that steals its grant).
    let puller = DpProc::enroll(dir.path(), "puller", &site).unwrap();
    let other = DpProc::enroll(dir.path(), "other", &site).unwrap();
    let wim = ferry_tests::wimtools::tree_wim(dir.path(), "small", 20, 7, &[]).unwrap();
    let id = site.add_image(&wim, &[]).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    site.cli_ok(&["distribute", &id, "--dp", "src"]).unwrap();
    site.wait_installed(&id, "src", 1, Duration::from_secs(120))
        .unwrap();
    let (key, ids) = {
        site.stop().unwrap();
        let key_text = std::fs::read_to_string(site.data.join("manifest.key")).unwrap();
        let key = ferry_net::pki::SigningKey::from_text(&key_text, "site key").unwrap();
        let lib = ferry_store::Library::open(&site.data.join("library")).unwrap();
        let ids: Vec<bytes::Bytes> = lib.manifests(&id, 1).unwrap()[0]
            .chunks
            .iter()
            .take(3)
            .map(|c| c.id.as_bytes().to_vec().into())
            .collect();
        drop(lib);
        site.serve().unwrap();
        (key, ids)
    };
    let (src_fp, puller_fp) = (cert_fingerprint(&src.data), cert_fingerprint(&puller.data));
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let grant = |key: &ferry_net::pki::SigningKey, revision: u32, expires: i64| {
        ferry_net::grant::sign(
            key,
            &pb::Grant {
                site_code: "FRY".into(),
                dp: "puller".into(),
                fingerprint: puller_fp.clone(),
                package: id.clone(),
                revision,
                expires,
                pace: Vec::new(),
            },
        )
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let conn = connect_to_source(&puller.data, &listen, &src_fp).await;
        // With the site's grant: the chunks, each hashing to its id.
        let got = fetch_with(
            &conn,
            &id,
            1,
            Some(grant(&key, 1, now + 600)),
            vec![ids.clone()],
        )
        .await;
        assert_eq!(got.len(), 3, "{got:?}");
        for (r, want) in got.iter().zip(&ids) {
            let Some(reply::Kind::Chunk(c)) = &r.kind else {
                panic!("expected a chunk, got {r:?}");
            };
            assert_eq!(&c.id, want);
            assert_eq!(blake3::hash(&c.data).as_bytes(), &want[..]);
        }
        // A chunk outside the revision, after one inside: refused in order.
        let stray: bytes::Bytes = vec![7u8; 32].into();
        let got = fetch_with(
            &conn,
            &id,
            1,
            Some(grant(&key, 1, now + 600)),
            vec![vec![ids[0].clone(), stray]],
        )
        .await;
        assert!(matches!(got[0].kind, Some(reply::Kind::Chunk(_))));
        let (code, msg) = error_of(&got[1]);
        assert_eq!(code, Code::NotAllowed as i32, "{msg}");
        assert!(msg.contains("is not in"), "{msg}");

        let refused = |got: Vec<pb::Reply>, code: Code, words: &str| {
            assert_eq!(got.len(), 1, "{got:?}");
            let (c, msg) = error_of(&got[0]);
            assert_eq!(c, code as i32, "{msg}");
            assert!(msg.contains(words), "{msg:?} lacks {words:?}");
        };
        // No grant; an expired one; one the site did not sign; one for
        // another revision than asked.
        refused(
            fetch_with(&conn, &id, 1, None, vec![ids.clone()]).await,
            Code::NotAllowed,
            "no grant",
        );
        refused(
            fetch_with(
                &conn,
                &id,
                1,
                Some(grant(&key, 1, now - 1)),
                vec![ids.clone()],
            )
            .await,
            Code::NotAllowed,
            "expired",
        );
        let forger = ferry_net::pki::SigningKey::from_text(
            &ferry_net::pki::SigningKey::generate().unwrap(),
            "forger",
        )
        .unwrap();
        refused(
            fetch_with(
                &conn,
                &id,
                1,
                Some(grant(&forger, 1, now + 600)),
                vec![ids.clone()],
            )
            .await,
            Code::NotAllowed,
            "not signed by this site",
        );
        refused(
            fetch_with(
                &conn,
                &id,
                1,
                Some(grant(&key, 2, now + 600)),
                vec![ids.clone()],
            )
            .await,
            Code::NotAllowed,
            "revision 2",
        );
        // A revision the source does not hold, granted: not found there.
        refused(
            fetch_with(
                &conn,
                &id,
                2,
                Some(grant(&key, 2, now + 600)),
                vec![ids.clone()],
            )
            .await,
            Code::NotFound,
            "does not hold",
        );
        // The puller's grant on another DP's connection.
        let thief = connect_to_source(&other.data, &listen, &src_fp).await;
        refused(
            fetch_with(
                &thief,
                &id,
                1,
                Some(grant(&key, 1, now + 600)),
                vec![ids.clone()],
            )
            .await,
            Code::NotAllowed,
            "not the certificate",
        );
        // A source that is not the one the site named: the handshake fails.
        let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let read = |f: &str| std::fs::read_to_string(puller.data.join(f)).unwrap();
        let me =
            ferry_net::tls::Identity::from_pem(&read("dp.pem"), &read("dp.key"), "dp").unwrap();
        let wrong =
            ferry_net::tls::dp_peer_client(me, &"00".repeat(32), Default::default()).unwrap();
        let r = ep
            .connect_with(wrong, listen.parse().unwrap(), "ferry-dp")
            .unwrap()
            .await;
        assert!(r.is_err(), "a source with another certificate is refused");
    });
    let log = src.log_text();
    assert!(log.contains("chunks refused to a pull DP"), "{log}");
}

/// A connection without a DP certificate (as `ferry dp init` opens) from
/// `from`.
async fn enrolling(site: &SiteProc, ca_pem: &str, from: &str) -> quinn::Connection {
    let fp = ferry_net::pki::fingerprint(&ferry_net::pki::cert_der(ca_pem, "ca").unwrap());
    let cfg = ferry_net::tls::enroll_client(&fp).unwrap();
    let ep = quinn::Endpoint::client(format!("{from}:0").parse().unwrap()).unwrap();
    ep.connect_with(
        cfg,
        site.dp_addr().parse().unwrap(),
        ferry_net::pki::SITE_SERVER_NAME,
    )
    .unwrap()
    .await
    .unwrap()
}

/// Whether the site closed `conn` within a moment, and its reason.
async fn closed_by_site(conn: &quinn::Connection) -> Option<(u32, String)> {
    match tokio::time::timeout(Duration::from_secs(2), conn.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(c)) => Some((
            c.error_code.into_inner() as u32,
            String::from_utf8_lossy(&c.reason).into_owned(),
        )),
        Ok(other) => Some((0, other.to_string())),
        Err(_) => None,
    }
}

#[test]
fn enrollment_connections_are_capped_per_address_and_in_total() {
    let dir = tempfile::tempdir().unwrap();
    let mut site = SiteProc::start(dir.path()).unwrap();
    site.edit_config(|t| {
        t.replace("max_enrolling = 64", "max_enrolling = 5")
            .replace(
                "max_enrolling_per_address = 4",
                "max_enrolling_per_address = 2",
            )
    })
    .unwrap();
    let ca = std::fs::read_to_string(site.data.join("ca.pem")).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let a1 = enrolling(&site, &ca, "127.0.0.1").await;
        let a2 = enrolling(&site, &ca, "127.0.0.1").await;
        let a3 = enrolling(&site, &ca, "127.0.0.1").await;
        let (code, why) = closed_by_site(&a3)
            .await
            .expect("the third from one address is closed");
        assert_eq!(code, ferry_wire::CLOSE_BUSY);
        assert!(
            why.contains("127.0.0.1") && why.contains("max_enrolling_per_address"),
            "{why}"
        );
        assert!(closed_by_site(&a1).await.is_none() && closed_by_site(&a2).await.is_none());
        let b1 = enrolling(&site, &ca, "127.0.0.2").await;
        let b2 = enrolling(&site, &ca, "127.0.0.2").await;
        let c1 = enrolling(&site, &ca, "127.0.0.3").await;
        let c2 = enrolling(&site, &ca, "127.0.0.3").await;
        let (code, why) = closed_by_site(&c2)
            .await
            .expect("the sixth in all is closed");
        assert_eq!(code, ferry_wire::CLOSE_BUSY);
        assert!(
            why.contains("the site has 5") && why.contains("[dp] max_enrolling)"),
            "{why}"
        );
        assert!(closed_by_site(&b1).await.is_none());
        // A place freed is a place taken again.
        a1.close(0u32.into(), b"done");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let c3 = enrolling(&site, &ca, "127.0.0.3").await;
        assert!(
            closed_by_site(&c3).await.is_none(),
            "admitted once a place was free"
        );
        for c in [a2, b1, b2, c1, c3] {
            c.close(0u32.into(), b"done");
        }
    });
    // Once they are gone, a DP enrolls as ever.
    std::thread::sleep(Duration::from_millis(500));
    let _dp = DpProc::start(dir.path(), "dp1", &site).unwrap();
    let log = std::fs::read_to_string(&site.log).unwrap();
    assert!(log.contains("enrollment connection refused"), "logged");
    assert!(!log.contains("panicked"));
}
