//! `ferry client multicast`: receive a package from a DP's multicast
//! session.
//!
//! It asks the DP for a session over HTTPS (`POST /multicast/{id}`, with
//! the client token), proves the site-signed manifest the DP sends, checks
//! the session's block layout against it, joins the group and feeds every
//! datagram to `ferry_mcast::Receiver`: source symbols are written in
//! place in `PATH.ferry-part` files as they arrive (the same part files as
//! `ferry client fetch`), a block that lost symbols is rebuilt from repair
//! symbols, and every block is checked against the manifest's chunk ids
//! before it counts. After each pass it reports to the DP what it still
//! lacks. Datagrams are read by a thread of their own into a queue, so a
//! block being decoded does not make the socket overflow.
//!
//! A session that stalls (nothing new for `--stall`) or ends with blocks
//! missing is left; the rest comes over HTTPS ranges with the `fetch`
//! code (which keeps every chunk the part files hold), unless the package
//! is multicast-only. Run again, it keeps every block it verified.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ferry_core::Manifest;
use ferry_dp::multicast::{Done, Report, SessionOffer};
use ferry_mcast::{Completion, Counters, Event, Layout, Receiver, SessionKey};
use serde::Serialize;

use ferry_store::file::PartFile;

use crate::fetch::{answer, http_client, prove};

/// Datagrams the reader thread may queue ahead of the writer (about 90 MiB).
const QUEUE_DATAGRAMS: usize = 1 << 16;
/// Receive buffer asked of the kernel (it caps it at `net.core.rmem_max`).
const RECV_BUFFER: usize = 16 << 20;

/// What was done.
#[derive(Debug, Default, Serialize)]
pub(crate) struct MulticastReport {
    pub(crate) package: String,
    pub(crate) revision: u32,
    pub(crate) name: String,
    pub(crate) files: usize,
    pub(crate) bytes_total: u64,
    pub(crate) out: PathBuf,
    /// The session joined (hex).
    pub(crate) session: String,
    pub(crate) encrypted: bool,
    /// `multicast`, or `multicast+https` when the rest came over HTTPS.
    pub(crate) via: String,
    /// Bytes verified from the session by this run.
    pub(crate) bytes_multicast: u64,
    /// Bytes already here from an earlier run.
    pub(crate) bytes_reused: u64,
    /// Bytes downloaded over HTTPS after leaving the session.
    pub(crate) bytes_https: u64,
    /// Why the session was left unfinished, if it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) fallback: Option<String>,
    /// Passes heard.
    pub(crate) passes: u32,
    /// Datagrams taken and dropped, by reason.
    pub(crate) datagrams: Counters,
}

/// Where and how to join.
pub(crate) struct Join {
    /// The DP, the package, where it goes and the credentials: the same as
    /// the HTTPS fallback's, which this runs when the session falls short.
    pub(crate) from: crate::fetch::Fetch,
    /// Leave when nothing new arrived for this long.
    pub(crate) stall: Duration,
    /// Leave after this long in all.
    pub(crate) timeout: Duration,
    /// Join the group on this interface (the routing table's choice when
    /// `None`).
    pub(crate) interface: Option<Ipv4Addr>,
}

/// How the receiving ended.
enum Outcome {
    Complete,
    Left(String),
}

/// One file of the package as the receiver writes it: its part file, or
/// `None` when an earlier run finished it.
type Target = Option<PartFile>;

impl Join {
    fn post(&self, http: &reqwest::Client, url: &str) -> reqwest::RequestBuilder {
        let r = http.post(url);
        match &self.from.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    fn url(&self, rest: &str) -> String {
        format!("{}/multicast/{rest}", self.from.dp.trim_end_matches('/'))
    }

    /// Receives the package into `out`.
    pub(crate) async fn run(&self, show: bool) -> anyhow::Result<MulticastReport> {
        let http = http_client(&self.from.ca)?;
        let url = self.url(&self.from.package);
        let offer: SessionOffer = answer(
            self.post(&http, &url),
            &self.from.dp,
            &url,
            "a session offer",
        )
        .await?;
        let manifests = prove(
            &self.from.package,
            offer.revision,
            &offer.manifest,
            &offer.signature,
            self.from
                .manifest_key
                .as_deref()
                .unwrap_or(&offer.manifest_key),
        )?;
        let layout = Layout::check(&offer.blocks, &manifests).with_context(|| {
            format!(
                "the DP's session {} does not fit the signed manifest",
                offer.session
            )
        })?;
        let key = match &offer.key {
            Some(k) => Some(
                hex::decode(k)
                    .ok()
                    .and_then(|b| SessionKey::new(&b))
                    .context("the DP sent a session key that is not 32 hex bytes")?,
            ),
            None => None,
        };
        let session = u64::from_str_radix(&offer.session, 16)
            .with_context(|| format!("the session id {:?} is not hex", offer.session))?;
        std::fs::create_dir_all(&self.from.out)
            .with_context(|| format!("cannot create {}", self.from.out.display()))?;
        let total: u64 = manifests.iter().map(|m| m.size).sum();
        let mut report = MulticastReport {
            package: offer.package.clone(),
            revision: offer.revision,
            name: offer.name.clone(),
            files: manifests.len(),
            bytes_total: total,
            out: self.from.out.clone(),
            session: offer.session.clone(),
            encrypted: key.is_some(),
            via: "multicast".into(),
            ..Default::default()
        };
        // The part files, and the blocks an earlier run left verified.
        let (out, ms, l2) = (self.from.out.clone(), manifests.clone(), layout.clone());
        let (targets, held) =
            tokio::task::spawn_blocking(move || open_targets(&out, &ms, &l2)).await??;
        let sock = self.socket(&offer)?;
        let rx = Receiver::new(session, key, layout, |b| held[b]);
        report.bytes_reused = rx.bytes_done();
        let bar = crate::output::byte_bar(show, total, &format!("multicast {}", self.from.package));
        bar.set_position(rx.bytes_done());
        // Datagrams off the socket on a thread of their own.
        let stop = Arc::new(AtomicBool::new(false));
        let (qtx, qrx) = mpsc::sync_channel::<Vec<u8>>(QUEUE_DATAGRAMS);
        let reader = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("mcast-recv".into())
                .spawn(move || read_datagrams(sock, qtx, &stop))?
        };
        let ctx = Ctx {
            rt: tokio::runtime::Handle::current(),
            http: http.clone(),
            report_url: self.url(&format!("session/{}/report", offer.session)),
            token: self.from.token.clone(),
            client: offer.client,
            stall: self.stall,
            deadline: Instant::now() + self.timeout,
        };
        let (targets, bar2) = (Arc::new(targets), bar.clone());
        let t2 = targets.clone();
        let (rx, outcome, passes) =
            tokio::task::spawn_blocking(move || receive(rx, &qrx, &t2, &ctx, &bar2)).await??;
        stop.store(true, Ordering::Relaxed);
        let _ = reader.join();
        bar.finish_and_clear();
        report.passes = passes;
        report.datagrams = rx.counters().clone();
        report.bytes_multicast = rx.bytes_done() - report.bytes_reused;
        let done_url = self.url(&format!("session/{}/done", offer.session));
        match outcome {
            Outcome::Complete => {
                let t = targets.clone();
                tokio::task::spawn_blocking(move || finish(&t)).await??;
                let _ = self
                    .post(&http, &done_url)
                    .json(&Done {
                        client: offer.client,
                        left: false,
                        dropped: dropped_map(rx.counters()),
                    })
                    .send()
                    .await;
                Ok(report)
            }
            Outcome::Left(why) => {
                let _ = self
                    .post(&http, &done_url)
                    .json(&Done {
                        client: offer.client,
                        left: true,
                        dropped: dropped_map(rx.counters()),
                    })
                    .send()
                    .await;
                drop(targets);
                if offer.only {
                    bail!(
                        "{why}, with {} of {} blocks missing; {} is sent by multicast only, so there is no HTTPS fallback: run the same command again to join the next session (the {} verified are kept)",
                        rx.remaining(),
                        rx.layout().blocks().len(),
                        self.from.package,
                        crate::output::bytes(rx.bytes_done()),
                    );
                }
                eprintln!("{why}: fetching the rest over HTTPS");
                let r = self
                    .from
                    .run(show)
                    .await
                    .context("the HTTPS fallback failed")?;
                if r.revision != offer.revision {
                    bail!(
                        "the DP installed revision {} of {} while the session sent {}: run again",
                        r.revision,
                        self.from.package,
                        offer.revision
                    );
                }
                report.bytes_https = r.bytes_downloaded;
                report.via = "multicast+https".into();
                report.fallback = Some(why);
                Ok(report)
            }
        }
    }

    /// A UDP socket on the session's port, in its group.
    fn socket(&self, offer: &SessionOffer) -> anyhow::Result<std::net::UdpSocket> {
        let what = || format!("group {}:{}", offer.group, offer.port);
        let s = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )
        .with_context(|| format!("cannot open a UDP socket for {}", what()))?;
        // Several clients on one computer share the port.
        s.set_reuse_address(true)?;
        s.set_reuse_port(true)?;
        let _ = s.set_recv_buffer_size(RECV_BUFFER);
        // Bound to the group, the socket takes only the group's datagrams.
        s.bind(&SocketAddrV4::new(offer.group, offer.port).into())
            .with_context(|| format!("cannot bind UDP {}", what()))?;
        let iface = self.interface.unwrap_or(Ipv4Addr::UNSPECIFIED);
        s.join_multicast_v4(&offer.group, &iface).with_context(|| {
            format!(
                "cannot join {} on {iface} (is there a route for 224.0.0.0/4? give --interface ADDR)",
                what()
            )
        })?;
        s.set_read_timeout(Some(Duration::from_millis(200)))?;
        Ok(s.into())
    }
}

/// Opens a part file per file not complete yet; answers, per block,
/// whether it is verified in place already.
fn open_targets(
    out: &std::path::Path,
    manifests: &[Manifest],
    layout: &Layout,
) -> anyhow::Result<(Vec<Target>, Vec<bool>)> {
    let blocks = layout.blocks();
    let mut held = vec![false; blocks.len()];
    let mut targets = Vec::new();
    let mut buf = Vec::new();
    for (fi, m) in manifests.iter().enumerate() {
        let dest = out.join(&m.path);
        let of_file = || {
            blocks
                .iter()
                .enumerate()
                .filter(move |(_, b)| b.file as usize == fi)
        };
        // A file an earlier run finished.
        if let Ok(f) = File::open(&dest) {
            let done = f.metadata().is_ok_and(|md| md.len() == m.size)
                && of_file().all(|(b, blk)| {
                    buf.resize(blk.len as usize, 0);
                    f.read_exact_at(&mut buf, blk.offset).is_ok() && layout.verify(b, &buf)
                });
            if done {
                for (b, _) in of_file() {
                    held[b] = true;
                }
                targets.push(None);
                continue;
            }
        }
        let part = PartFile::open(&dest, m.size)?;
        for (b, blk) in of_file() {
            held[b] = part.holds(blk.offset, blk.len as usize, &mut buf, |d| {
                layout.verify(b, d)
            });
        }
        targets.push(Some(part));
    }
    Ok((targets, held))
}

/// Puts every part file in place under its name.
fn finish(targets: &[Target]) -> anyhow::Result<()> {
    for part in targets.iter().flatten() {
        part.place()?;
    }
    Ok(())
}

fn read_datagrams(sock: std::net::UdpSocket, q: mpsc::SyncSender<Vec<u8>>, stop: &AtomicBool) {
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        match sock.recv(&mut buf) {
            Ok(n) => {
                if q.send(buf[..n].to_vec()).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot receive from the multicast socket");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// What the receiving loop needs besides the receiver.
struct Ctx {
    rt: tokio::runtime::Handle,
    http: reqwest::Client,
    report_url: String,
    token: Option<String>,
    client: u32,
    stall: Duration,
    deadline: Instant,
}

impl Ctx {
    /// Sends a report without waiting for the answer.
    fn report(&self, r: Report) {
        let mut req = self.http.post(&self.report_url).json(&r);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        self.rt.spawn(async move {
            if let Err(e) = req.send().await {
                tracing::warn!(error = %e, "cannot report to the DP");
            }
        });
    }
}

fn dropped_map(c: &Counters) -> std::collections::BTreeMap<String, u64> {
    [
        ("garbage", c.garbage),
        ("other_session", c.other_session),
        ("forged", c.forged),
        ("replayed", c.replayed),
        ("out_of_range", c.out_of_range),
        ("blocks_refused", c.blocks_refused),
    ]
    .into_iter()
    .filter(|(_, n)| *n > 0)
    .map(|(k, n)| (k.to_string(), n))
    .collect()
}

/// Feeds datagrams to the receiver until every block is in place, the
/// session ends, nothing new arrives for the stall time, or the deadline.
fn receive(
    mut rx: Receiver,
    q: &mpsc::Receiver<Vec<u8>>,
    targets: &[Target],
    ctx: &Ctx,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<(Receiver, Outcome, u32)> {
    let mut last_progress = Instant::now();
    let mut passes = 0u32;
    let mut block = Vec::new();
    loop {
        if rx.remaining() == 0 {
            return Ok((rx, Outcome::Complete, passes));
        }
        if last_progress.elapsed() >= ctx.stall {
            let why = format!("no new multicast data for {} s", ctx.stall.as_secs());
            return Ok((rx, Outcome::Left(why), passes));
        }
        if Instant::now() >= ctx.deadline {
            return Ok((rx, Outcome::Left("the --timeout passed".into()), passes));
        }
        let mut d = match q.recv_timeout(Duration::from_millis(250)) {
            Ok(d) => d,
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                bail!("the multicast socket's reader stopped")
            }
        };
        let accepted = rx.counters().accepted;
        if let Ok(Some(w)) = rx.handle(&mut d) {
            if let Some(part) = &targets[w.file as usize] {
                part.out().write_at(w.data, w.offset)?;
            }
        }
        // A new symbol, source or repair, is progress.
        if rx.counters().accepted > accepted {
            last_progress = Instant::now();
        }
        while let Some(e) = rx.poll_event() {
            match e {
                Event::Ready(b) => {
                    last_progress = Instant::now();
                    let blk = rx.layout().blocks()[b as usize];
                    let Some(part) = &targets[blk.file as usize] else {
                        continue;
                    };
                    block.resize(blk.len as usize, 0);
                    part.out().read_at(&mut block, blk.offset)?;
                    if let Completion::Verified { repaired } = rx.complete(b, &block) {
                        if let Some(data) = repaired {
                            part.out().write_at(&data, blk.offset)?;
                        }
                        bar.set_position(rx.bytes_done());
                    }
                }
                Event::PassEnded(s) => {
                    passes = passes.max(s.pass);
                    bar.set_message(format!(
                        "multicast: pass {} heard, {} blocks to go",
                        s.pass,
                        rx.remaining()
                    ));
                    ctx.report(Report {
                        client: ctx.client,
                        pass: s.pass,
                        missing: rx.missing(),
                        received: s.received,
                        loss: s.loss(),
                        dropped: dropped_map(rx.counters()),
                    });
                }
                Event::SessionEnded => {
                    if rx.remaining() > 0 {
                        return Ok((rx, Outcome::Left("the DP ended the session".into()), passes));
                    }
                }
            }
        }
    }
}
