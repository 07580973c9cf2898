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
    let (mut s, mut r) = conn.open_bi().await.unwrap();
    let req = pb::Request {
        kind: Some(request::Kind::Fetch(pb::Fetch {
            package: package.into(),
            revision,
        })),
    };
    write_frame(&mut s, &req).await.unwrap();
    for ids in wants {
        // The site may stop reading after a refusal; later writes can fail.
        if write_frame(&mut s, &pb::Want { ids }).await.is_err() {
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
