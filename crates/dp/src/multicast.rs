//! Multicast sessions: one stream of UDP datagrams from the DP to many
//! computers at once.
//!
//! A client asks over HTTPS (`POST /multicast/{package}`, with its client
//! token); the DP starts a session for the package or adds the client to
//! the running one and answers a [`SessionOffer`]: group, port, session id,
//! the block layout, the site-signed manifest, and the session key when
//! the package is encrypted. A session waits for `min_clients` or
//! `start_delay`, then runs carousel passes on a thread of its own:
//! `ferry_mcast::Schedule` says what each pass sends (every source symbol
//! plus a share of repair symbols first, then fresh repair symbols for
//! what the clients reported missing), `ferry_mcast::datagram` seals it,
//! and a byte-level token bucket paces it at the DP's multicast rate.
//! After each pass the clients report what they lack
//! (`POST /multicast/session/{id}/report`); the session ends once every
//! client is done (`…/done`), has left, or stayed silent for
//! [`MAX_SILENT_PASSES`], or after [`MAX_PASSES`].
//!
//! Settings come from the site (`ferry dp multicast NAME --enable`) with
//! the DP's client policy; a DP without them refuses with 409.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use ferry_mcast::datagram::{self, Header, Kind, SessionKey, SYMBOL_SIZE};
use ferry_mcast::fec::{self, BlockEncoder};
use ferry_mcast::layout::Block;
use ferry_mcast::schedule::{self, Need, Schedule, Send};
pub use ferry_mcast::SessionView;
use ferry_wire::pb;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};

/// A session ends after this many passes even if a client is unfinished
/// (it falls back to HTTPS, or joins the next session).
pub const MAX_PASSES: u32 = 50;
/// A client that reports nothing received (or no report at all) for this
/// many passes in a row is dropped from the session.
pub const MAX_SILENT_PASSES: u32 = 3;
/// How long a pass's end waits for the clients' reports.
const REPORT_WAIT: Duration = Duration::from_secs(3);
/// Each control datagram (end of pass, end of session) is sent this often.
const CONTROL_REPEAT: usize = 3;
/// Sessions kept for `ferry status` after they ended.
const RECENT: usize = 16;
/// Bytes the token bucket lets out at once beyond the rate.
const BURST_BYTES: f64 = 64.0 * 1024.0;
/// Datagrams sent per `sendmmsg` (23 KiB: well inside the burst, and a
/// sixteenth of the system calls of one `sendto` each).
const BATCH: usize = 16;

/// What `POST /multicast/{package}` answers.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SessionOffer {
    /// The session id (16 hex digits): what reports name.
    pub session: String,
    /// This client's number in the session.
    pub client: u32,
    /// The package id.
    pub package: String,
    /// Its revision the session sends.
    pub revision: u32,
    /// The package's name at the site.
    pub name: String,
    /// IPv4 multicast group.
    pub group: Ipv4Addr,
    /// UDP port.
    pub port: u16,
    /// Bytes of a symbol.
    pub symbol_size: u16,
    /// How the files are cut into blocks.
    pub blocks: Vec<Block>,
    /// The site-signed manifest body (protobuf `ManifestBody`), base64.
    pub manifest: String,
    /// Ed25519 signature over it, hex.
    pub signature: String,
    /// The site's public manifest key, hex.
    pub manifest_key: String,
    /// The session key (hex) when datagrams are sealed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The package may travel by multicast only: no HTTPS fallback.
    pub only: bool,
    /// Bytes per second the session sends at most.
    pub rate: u64,
}

/// Body of `POST /multicast/session/{id}/report`: what a client lacks
/// after a pass.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    /// The client's number.
    pub client: u32,
    /// The pass that ended.
    pub pass: u32,
    /// Blocks it lacks, with how many more symbols each needs.
    pub missing: Vec<(u32, u32)>,
    /// Data datagrams of the pass it received.
    pub received: u64,
    /// The share of the pass's datagrams it lost, 0 to 1.
    pub loss: f64,
    /// Datagrams it dropped so far, by reason (`garbage`, `forged`, …).
    #[serde(default)]
    pub dropped: BTreeMap<String, u64>,
}

/// Body of `POST /multicast/session/{id}/done`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Done {
    /// The client's number.
    pub client: u32,
    /// Whether it left unfinished (to fetch the rest over HTTPS).
    #[serde(default)]
    pub left: bool,
    /// Datagrams it dropped in all, by reason.
    #[serde(default)]
    pub dropped: BTreeMap<String, u64>,
}

/// The report that carries `views` to the site.
pub fn report(views: &[SessionView]) -> pb::Report {
    pb::Report {
        multicast: Some(pb::MulticastSessions {
            sessions: views
                .iter()
                .map(|v| pb::MulticastSession {
                    session: v.session.clone(),
                    package: v.package.clone(),
                    revision: v.revision,
                    address: v.address.clone(),
                    encrypted: v.encrypted,
                    state: v.state.clone(),
                    clients_joined: v.clients_joined,
                    clients_done: v.clients_done,
                    clients_left: v.clients_left,
                    passes: v.passes,
                    rate: v.rate,
                    datagrams_sent: v.datagrams_sent,
                    bytes_sent: v.bytes_sent,
                    package_bytes: v.package_bytes,
                    send_errors: v.send_errors,
                    dropped: v.dropped.clone().into_iter().collect(),
                    opened: v.opened,
                    ended: v.ended.unwrap_or(0),
                })
                .collect(),
        }),
        ..Default::default()
    }
}

/// Why a session request is refused: an HTTP status and a message.
#[derive(Debug)]
pub struct Refused(pub u16, pub String);

#[derive(Debug, Default)]
struct Client {
    report: Option<Report>,
    /// Datagrams it dropped, by reason, as it last said.
    dropped: BTreeMap<String, u64>,
    done: bool,
    left: bool,
    silent: u32,
}

#[derive(Debug)]
struct Live {
    clients: BTreeMap<u32, Client>,
    next_client: u32,
    first_join: Instant,
    ended: bool,
    view: SessionView,
}

impl Live {
    fn joined(&self) -> u32 {
        self.clients.len() as u32
    }

    /// Adds up what the clients said they dropped.
    fn sum_dropped(&mut self) {
        let mut sum = BTreeMap::new();
        for c in self.clients.values() {
            for (why, n) in &c.dropped {
                *sum.entry(why.clone()).or_insert(0) += n;
            }
        }
        self.view.dropped = sum;
    }

    /// Clients still receiving.
    fn active(&self) -> impl Iterator<Item = (&u32, &Client)> {
        self.clients.iter().filter(|(_, c)| !c.done && !c.left)
    }
}

struct Session {
    id: u64,
    offer: SessionOffer,
    key: Option<[u8; datagram::KEY_LEN]>,
    settings: Settings,
    live: Mutex<Live>,
    wake: Condvar,
    /// Bumped whenever the session's view changes in a way the site should
    /// hear of.
    changed: Arc<watch::Sender<u64>>,
}

impl Session {
    fn lock(&self) -> std::sync::MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn notify(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    /// Adds a client; refused when the session is full.
    fn add_client(&self, live: &mut Live) -> Result<SessionOffer, Refused> {
        if live.joined() >= self.settings.max_clients {
            return Err(Refused(
                503,
                format!(
                    "the multicast session of {} is full ({} clients, the DP's --max-clients): fetch over HTTPS or join the next session",
                    self.offer.package, self.settings.max_clients
                ),
            ));
        }
        let n = live.next_client;
        live.next_client += 1;
        live.clients.insert(n, Client::default());
        live.view.clients_joined = live.joined();
        self.wake.notify_all();
        self.notify();
        let mut o = self.offer.clone();
        o.client = n;
        Ok(o)
    }
}

/// The settings a session runs with, from the site's policy.
#[derive(Clone, Debug)]
struct Settings {
    rate: u64,
    start_delay: Duration,
    min_clients: u32,
    max_clients: u32,
    ttl: u32,
    interface: Option<Ipv4Addr>,
}

fn settings(p: &pb::MulticastPolicy) -> Result<Settings, Refused> {
    Ok(Settings {
        rate: p.rate.max(64 * 1024),
        start_delay: Duration::from_millis(p.start_delay_ms),
        min_clients: p.min_clients.max(1),
        max_clients: p.max_clients.max(1),
        ttl: p.ttl.clamp(1, 255),
        interface: if p.interface.is_empty() {
            None
        } else {
            Some(p.interface.parse().map_err(|_| {
                Refused(
                    500,
                    format!(
                        "the site's multicast interface {:?} is not an IPv4 address",
                        p.interface
                    ),
                )
            })?)
        },
    })
}

#[derive(Default)]
struct Registry {
    running: HashMap<String, Arc<Session>>,
    recent: VecDeque<SessionView>,
}

type SharedRegistry = Arc<Mutex<Registry>>;

fn lock_reg(r: &SharedRegistry) -> std::sync::MutexGuard<'_, Registry> {
    r.lock().unwrap_or_else(|e| e.into_inner())
}

/// Ends session `s` if no client is still receiving (or `force`): it
/// leaves the running set (so a new request starts a new session) and its
/// view is kept among the recent ones. Whether it ended.
fn end(reg: &SharedRegistry, s: &Session, force: bool) -> bool {
    let mut r = lock_reg(reg);
    let mut live = s.lock();
    if live.ended {
        return true;
    }
    if !force && live.active().next().is_some() {
        return false;
    }
    live.ended = true;
    live.view.state = "ended".into();
    live.view.ended = Some(unix_now());
    s.notify();
    if r.running
        .get(&s.offer.package)
        .is_some_and(|x| x.id == s.id)
    {
        r.running.remove(&s.offer.package);
    }
    r.recent.push_back(live.view.clone());
    while r.recent.len() > RECENT {
        r.recent.pop_front();
    }
    true
}

/// The DP's sessions.
pub struct Sessions {
    reg: SharedRegistry,
    stop: Arc<AtomicBool>,
    changed: Arc<watch::Sender<u64>>,
}

impl Default for Sessions {
    fn default() -> Self {
        Self {
            reg: Arc::new(Mutex::new(Registry::default())),
            stop: Arc::new(AtomicBool::new(false)),
            changed: Arc::new(watch::channel(0).0),
        }
    }
}

fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

impl Drop for Sessions {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// What a new session needs that only the caller can read.
pub struct Content {
    /// Revision.
    pub revision: u32,
    /// Package name.
    pub name: String,
    /// Its files, open, in manifest order.
    pub files: Vec<Arc<File>>,
    /// The revision's manifests.
    pub manifests: Vec<ferry_core::Manifest>,
    /// Signed manifest body.
    pub body: Vec<u8>,
    /// Its signature.
    pub signature: Vec<u8>,
}

fn hex_id(id: u64) -> String {
    format!("{id:016x}")
}

impl Sessions {
    fn reg(&self) -> std::sync::MutexGuard<'_, Registry> {
        lock_reg(&self.reg)
    }

    /// Changes whenever a session starts, ends, begins a pass, or a client
    /// joins or finishes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Running sessions, then recent ones (newest first).
    pub fn views(&self) -> Vec<SessionView> {
        let reg = self.reg();
        let mut out: Vec<SessionView> = reg
            .running
            .values()
            .map(|s| s.lock().view.clone())
            .collect();
        out.sort_by(|a, b| a.package.cmp(&b.package));
        out.extend(reg.recent.iter().rev().cloned());
        out
    }

    /// Adds a client to `package`'s running session; `None` when there is
    /// none.
    pub fn join_running(&self, package: &str) -> Result<Option<SessionOffer>, Refused> {
        let reg = self.reg();
        let Some(s) = reg.running.get(package) else {
            return Ok(None);
        };
        let mut live = s.lock();
        if live.ended {
            return Ok(None);
        }
        s.add_client(&mut live).map(Some)
    }

    /// Starts a session of `package` under `policy` with `content` and adds
    /// the first client, or joins the one another request started
    /// meanwhile.
    pub fn start(
        &self,
        package: &str,
        policy: &pb::MulticastPolicy,
        pkg: &pb::MulticastPackage,
        content: Content,
        manifest_key: &str,
    ) -> Result<SessionOffer, Refused> {
        let mut reg = self.reg();
        if let Some(s) = reg.running.get(package) {
            let mut live = s.lock();
            if !live.ended {
                return s.add_client(&mut live);
            }
        }
        let settings = settings(policy)?;
        let (group, count) = ferry_mcast::group::parse_group(&policy.group)
            .map_err(|e| Refused(500, format!("the site's multicast group: {e}")))?;
        let first = u16::try_from(policy.port_first).unwrap_or(0);
        let last = u16::try_from(policy.port_last).unwrap_or(0);
        let used: Vec<u16> = reg.running.values().map(|s| s.offer.port).collect();
        let Some(port) = (first..=last).find(|p| *p != 0 && !used.contains(p)) else {
            return Err(Refused(
                503,
                format!(
                    "every port of this DP's multicast range {first}-{last} carries a session: try again when one ends"
                ),
            ));
        };
        let group = Ipv4Addr::from(u32::from(group) + u32::from(port - first) % count);
        let blocks = ferry_mcast::layout::of_manifests(&content.manifests);
        let rand_err = |e: getrandom::Error| Refused(500, format!("no randomness: {e}"));
        let mut id = [0u8; 8];
        getrandom::fill(&mut id).map_err(rand_err)?;
        let id = u64::from_be_bytes(id).max(1);
        let key = if pkg.encrypt {
            Some(SessionKey::generate().map_err(rand_err)?)
        } else {
            None
        };
        use base64::Engine as _;
        let package_bytes = content.manifests.iter().map(|m| m.size).sum();
        let offer = SessionOffer {
            session: hex_id(id),
            client: 0,
            package: package.to_string(),
            revision: content.revision,
            name: content.name.clone(),
            group,
            port,
            symbol_size: SYMBOL_SIZE,
            blocks: blocks.clone(),
            manifest: base64::engine::general_purpose::STANDARD.encode(&content.body),
            signature: hex::encode(&content.signature),
            manifest_key: manifest_key.to_string(),
            key: key.map(hex::encode),
            only: pkg.only,
            rate: settings.rate,
        };
        let s = Arc::new(Session {
            id,
            key,
            live: Mutex::new(Live {
                clients: BTreeMap::new(),
                next_client: 0,
                first_join: Instant::now(),
                ended: false,
                view: SessionView {
                    session: hex_id(id),
                    package: package.to_string(),
                    revision: content.revision,
                    address: format!("{group}:{port}"),
                    encrypted: key.is_some(),
                    state: "waiting".into(),
                    rate: settings.rate,
                    package_bytes,
                    opened: unix_now(),
                    ..Default::default()
                },
            }),
            wake: Condvar::new(),
            changed: self.changed.clone(),
            settings,
            offer,
        });
        let first_offer = s.add_client(&mut s.lock())?;
        reg.running.insert(package.to_string(), s.clone());
        drop(reg);
        info!(package, session = %hex_id(id), %group, port, encrypted = key.is_some(), "multicast session opened");
        let (stop, shared) = (self.stop.clone(), self.reg.clone());
        let files = content.files;
        let spawned = std::thread::Builder::new()
            .name(format!("mcast-{package}"))
            .spawn({
                let s = s.clone();
                move || {
                    let r = Sender::run(&s, &files, &blocks, &stop);
                    end(&shared, &s, true);
                    let v = s.lock().view.clone();
                    match r {
                        Ok(()) => info!(
                            package = %v.package, session = %v.session, passes = v.passes,
                            clients = v.clients_joined, done = v.clients_done,
                            bytes_sent = v.bytes_sent, "multicast session ended"
                        ),
                        Err(e) => warn!(package = %v.package, session = %v.session, error = %e, "multicast session failed"),
                    }
                }
            });
        if let Err(e) = spawned {
            end(&self.reg, &s, true);
            return Err(Refused(
                500,
                format!("cannot start the session's sender: {e}"),
            ));
        }
        Ok(first_offer)
    }

    /// Takes a client's report of session `id`; false when no such session
    /// runs.
    pub fn report(&self, id: &str, r: Report) -> bool {
        self.with_session(id, |s, live| {
            if let Some(c) = live.clients.get_mut(&r.client) {
                c.dropped = r.dropped.clone();
                c.report = Some(r);
            }
            live.sum_dropped();
            s.wake.notify_all();
        })
    }

    /// A client finished (or left); false when no such session runs.
    pub fn done(&self, id: &str, d: Done) -> bool {
        self.with_session(id, |s, live| {
            if let Some(c) = live.clients.get_mut(&d.client) {
                if d.left {
                    c.left = true;
                } else {
                    c.done = true;
                }
                c.dropped = d.dropped;
            }
            live.sum_dropped();
            live.view.clients_done = live.clients.values().filter(|c| c.done).count() as u32;
            live.view.clients_left = live.clients.values().filter(|c| c.left).count() as u32;
            s.wake.notify_all();
            s.notify();
        })
    }

    fn with_session(&self, id: &str, f: impl FnOnce(&Session, &mut Live)) -> bool {
        let reg = self.reg();
        let Some(s) = reg.running.values().find(|s| hex_id(s.id) == id) else {
            return false;
        };
        let mut live = s.lock();
        f(s, &mut live);
        true
    }
}

/// A byte-level token bucket: a send waits until the rate allows it.
struct Bucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate: u64) -> Self {
        Self {
            rate: rate as f64,
            tokens: 0.0,
            last: Instant::now(),
        }
    }

    fn set_rate(&mut self, rate: u64) {
        self.rate = rate as f64;
    }

    fn take(&mut self, bytes: usize) {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate)
            .min(BURST_BYTES);
        self.last = now;
        self.tokens -= bytes as f64;
        if self.tokens < 0.0 {
            std::thread::sleep(Duration::from_secs_f64(-self.tokens / self.rate));
        }
    }
}

/// One session's sending side.
struct Sender<'a> {
    s: &'a Session,
    /// Connected to the group: `sendmmsg` needs no address per message.
    sock: UdpSocket,
    to: SocketAddr,
    key: Option<SessionKey>,
    seq: u64,
    bucket: Bucket,
    /// Sealed datagrams waiting for the next `sendmmsg` (the first
    /// `queued` of them).
    batch: Vec<Vec<u8>>,
    queued: usize,
    /// Counters not yet added to the view.
    sent: (u64, u64, u64),
}

impl<'a> Sender<'a> {
    fn run(
        s: &'a Session,
        files: &[Arc<File>],
        blocks: &[Block],
        stop: &AtomicBool,
    ) -> std::io::Result<()> {
        let st = &s.settings;
        let sock = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )?;
        if let Some(i) = st.interface {
            sock.set_multicast_if_v4(&i)?;
        }
        sock.set_multicast_ttl_v4(st.ttl)?;
        sock.set_multicast_loop_v4(true)?;
        let _ = sock.set_send_buffer_size(4 << 20);
        let bind = SocketAddrV4::new(st.interface.unwrap_or(Ipv4Addr::UNSPECIFIED), 0);
        sock.bind(&bind.into())?;
        let to: SocketAddr = SocketAddrV4::new(s.offer.group, s.offer.port).into();
        sock.connect(&to.into())?;
        let mut tx = Sender {
            s,
            sock: sock.into(),
            to,
            key: s.key.as_ref().and_then(|k| SessionKey::new(k)),
            seq: 0,
            bucket: Bucket::new(st.rate),
            batch: (0..BATCH)
                .map(|_| Vec::with_capacity(datagram::MAX_DATAGRAM))
                .collect(),
            queued: 0,
            sent: (0, 0, 0),
        };
        // Wait for enough clients or the start delay.
        {
            let mut live = s.lock();
            loop {
                if stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
                if live.active().next().is_none() {
                    // Every client had it all already.
                    return Ok(());
                }
                let waited = live.first_join.elapsed();
                if live.joined() >= st.min_clients || waited >= st.start_delay {
                    break;
                }
                let left = st.start_delay - waited;
                live = s
                    .wake
                    .wait_timeout(live, left.min(Duration::from_millis(500)))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            live.view.state = "sending".into();
            s.notify();
        }
        let mut sched = Schedule::new(blocks, schedule::REPAIR_SHARE);
        let mut rate = st.rate;
        let mut plan = sched.first_pass();
        loop {
            let pass = sched.passes();
            s.lock().view.passes = pass;
            s.notify();
            tx.pass(pass, &plan, files, blocks, stop)?;
            if stop.load(Ordering::Relaxed) {
                tx.control(Kind::SessionEnd, pass);
                return Ok(());
            }
            for _ in 0..CONTROL_REPEAT {
                tx.control(Kind::PassEnd, pass);
                std::thread::sleep(Duration::from_millis(5));
            }
            tx.flush();
            // Reports, then the next pass for what the clients lack.
            let (needs, loss) = collect(s, pass, stop);
            if needs.is_none() || pass >= MAX_PASSES || stop.load(Ordering::Relaxed) {
                for _ in 0..CONTROL_REPEAT {
                    tx.control(Kind::SessionEnd, pass);
                    std::thread::sleep(Duration::from_millis(5));
                }
                tx.flush();
                return Ok(());
            }
            let needs = needs.unwrap_or_default();
            rate = schedule::next_rate(rate, loss, st.rate, (st.rate / 8).max(64 * 1024));
            tx.bucket.set_rate(rate);
            s.lock().view.rate = rate;
            let views: Vec<Need<'_>> = needs
                .iter()
                .map(|n| match n {
                    None => Need::Everything,
                    Some(b) => Need::Blocks(b),
                })
                .collect();
            plan = sched.next_pass(&views, loss);
        }
    }

    fn header(&mut self, kind: Kind, pass: u32, block: u32, esi: u32) -> Header {
        self.seq += 1;
        Header {
            sealed: self.key.is_some(),
            kind,
            session: self.s.id,
            seq: self.seq,
            pass,
            block,
            esi,
        }
    }

    /// Seals a datagram into the batch; sends the batch when it is full.
    fn datagram(&mut self, h: Header, payload: &[u8]) {
        datagram::seal_into(h, payload, self.key.as_ref(), &mut self.batch[self.queued]);
        self.queued += 1;
        if self.queued == BATCH {
            self.send_batch();
        }
    }

    /// Sends the queued datagrams with as few `sendmmsg` calls as the
    /// kernel takes, once the token bucket lets their bytes out.
    fn send_batch(&mut self) {
        let n = std::mem::take(&mut self.queued);
        if n == 0 {
            return;
        }
        let bytes: usize = self.batch[..n].iter().map(Vec::len).sum();
        self.bucket.take(bytes);
        let mut at = 0;
        while at < n {
            let iovs: Vec<[std::io::IoSlice<'_>; 1]> = self.batch[at..n]
                .iter()
                .map(|d| [std::io::IoSlice::new(d)])
                .collect();
            let mut controls: Vec<rustix::net::SendAncillaryBuffer<'_, '_, '_>> =
                (at..n).map(|_| Default::default()).collect();
            let mut msgs: Vec<rustix::net::MMsgHdr<'_>> = iovs
                .iter()
                .zip(controls.iter_mut())
                .map(|(iov, c)| rustix::net::MMsgHdr::new(iov, c))
                .collect();
            match rustix::net::sendmmsg(&self.sock, &mut msgs, rustix::net::SendFlags::empty()) {
                Ok(sent) if sent > 0 => {
                    self.sent.0 += sent as u64;
                    self.sent.1 += msgs[..sent]
                        .iter()
                        .map(|m| m.bytes_sent() as u64)
                        .sum::<u64>();
                    at += sent;
                }
                Ok(_) => at = n,
                Err(e) => {
                    // This datagram is lost (the clients make it up from
                    // repair symbols); the rest of the batch goes on.
                    self.sent.2 += 1;
                    if self.sent.2 == 1 || self.sent.2.is_power_of_two() {
                        warn!(error = %e, to = %self.to, "cannot send a multicast datagram");
                    }
                    at += 1;
                    // The queue is full: let it drain.
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
        if self.sent.0 >= 256 {
            self.flush();
        }
    }

    /// Adds the counters to the view.
    fn flush(&mut self) {
        let (d, b, e) = std::mem::take(&mut self.sent);
        let mut live = self.s.lock();
        live.view.datagrams_sent += d;
        live.view.bytes_sent += b;
        live.view.send_errors += e;
    }

    /// A control datagram, sent at once after every data datagram queued.
    fn control(&mut self, kind: Kind, pass: u32) {
        let h = self.header(kind, pass, 0, 0);
        self.datagram(h, &[]);
        self.send_batch();
    }

    fn pass(
        &mut self,
        pass: u32,
        plan: &[Send],
        files: &[Arc<File>],
        blocks: &[Block],
        stop: &AtomicBool,
    ) -> std::io::Result<()> {
        // The block last read (and its encoder): the first pass sends a
        // block's source symbols, then its repair symbols.
        let mut cache: Option<(u32, Vec<u8>, Option<BlockEncoder>)> = None;
        for step in plan {
            // Once nobody is receiving (all done or left), the rest of the
            // pass would go to no one.
            if stop.load(Ordering::Relaxed) || self.s.lock().active().next().is_none() {
                return Ok(());
            }
            let b = match *step {
                Send::Source { block } | Send::Repair { block, .. } => block,
            };
            if cache.as_ref().is_none_or(|c| c.0 != b) {
                let blk = blocks.get(b as usize).copied().ok_or_else(|| {
                    std::io::Error::other(format!(
                        "the schedule names block {b} of {}",
                        blocks.len()
                    ))
                })?;
                let f = files.get(blk.file as usize).ok_or_else(|| {
                    std::io::Error::other(format!("block {b} names file {}", blk.file))
                })?;
                let mut data = vec![0u8; blk.len as usize];
                f.read_exact_at(&mut data, blk.offset).map_err(|e| {
                    std::io::Error::new(
                        e.kind(),
                        format!(
                            "cannot read file {} of {} at {}: {e}",
                            blk.file, self.s.offer.package, blk.offset
                        ),
                    )
                })?;
                cache = Some((b, data, None));
            }
            let Some((_, data, enc)) = cache.as_mut() else {
                continue;
            };
            match *step {
                Send::Source { block } => {
                    for esi in 0..ferry_mcast::layout::symbols(data.len() as u64) {
                        let sym = fec::source_symbol(data, esi);
                        let h = self.header(Kind::Data, pass, block, esi);
                        self.datagram(h, &sym);
                    }
                }
                Send::Repair { block, from, count } => {
                    let enc = enc.get_or_insert_with(|| BlockEncoder::new(data));
                    for (esi, sym) in enc.repair(from, count) {
                        let h = self.header(Kind::Data, pass, block, esi);
                        self.datagram(h, &sym);
                    }
                }
            }
        }
        Ok(())
    }
}

/// Waits for the reports of `pass`: what each client still receiving
/// lacks (`None`: everything, it has not reported), and the worst loss
/// reported. `None` in place of the list when no client is receiving.
#[allow(clippy::type_complexity)]
fn collect(
    s: &Session,
    pass: u32,
    stop: &AtomicBool,
) -> (Option<Vec<Option<Vec<(u32, u32)>>>>, f64) {
    let deadline = Instant::now() + REPORT_WAIT;
    let mut live = s.lock();
    loop {
        let waiting = live
            .active()
            .any(|(_, c)| c.report.as_ref().is_none_or(|r| r.pass < pass));
        let now = Instant::now();
        if !waiting || now >= deadline || stop.load(Ordering::Relaxed) {
            break;
        }
        live = s
            .wake
            .wait_timeout(live, deadline - now)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
    let mut needs = Vec::new();
    let mut loss: f64 = 0.0;
    for c in live.clients.values_mut().filter(|c| !c.done && !c.left) {
        match &c.report {
            Some(r) if r.pass >= pass => {
                c.silent = if r.received == 0 { c.silent + 1 } else { 0 };
                if !r.missing.is_empty() {
                    needs.push(Some(r.missing.clone()));
                    loss = loss.max(r.loss);
                }
            }
            Some(r) => {
                c.silent += 1;
                needs.push(Some(r.missing.clone()));
            }
            None => {
                c.silent += 1;
                needs.push(None);
            }
        }
        if c.silent >= MAX_SILENT_PASSES {
            c.left = true;
        }
    }
    live.view.clients_left = live.clients.values().filter(|c| c.left).count() as u32;
    if live.active().next().is_none() {
        return (None, loss);
    }
    if needs.is_empty() {
        // Every client still receiving has what it needs: wait for its
        // done rather than send a pass nobody wants.
        let deadline = Instant::now() + REPORT_WAIT;
        while live.active().next().is_some() && Instant::now() < deadline {
            live = s
                .wake
                .wait_timeout(live, Duration::from_millis(200))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        return (None, loss);
    }
    (Some(needs), loss)
}
