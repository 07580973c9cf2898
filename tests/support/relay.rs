//! A userspace UDP impairment relay: delay, jitter, loss, reordering and a
//! rate limit between a client and a server, for links this kernel's
//! missing `netem` cannot make.
//!
//! The client sends to [`Relay::addr`]; each datagram is forwarded to the
//! server from a socket of its own (one per client address, so replies find
//! their way back) after the impairments of its direction. Both directions
//! get the same [`Impairment`]; the round-trip time is twice its delay.
//!
//! Each direction is one thread that receives, queues and sends: no lock
//! per datagram, and quinn-udp's batched I/O with GRO in and GSO out (a
//! dozen datagrams per system call), so it keeps up with a gigabit on this
//! machine. Without jitter or reordering the queue is a FIFO (a constant
//! delay keeps order).

use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rustix::event::{poll, PollFd, PollFlags, Timespec};

/// What one direction of the link does to datagrams.
#[derive(Clone, Copy, Debug)]
pub struct Impairment {
    /// One-way delay.
    pub delay: Duration,
    /// Extra delay, uniform in `0..jitter` (late ones may overtake).
    pub jitter: Duration,
    /// Share of datagrams dropped (0.02 = 2 %).
    pub loss: f64,
    /// Share of datagrams held back by an extra delay so later ones pass
    /// them.
    pub reorder: f64,
    /// Bytes per second the direction carries at most (a queue forms).
    pub rate: Option<u64>,
    /// Seed of the random choices.
    pub seed: u64,
}

impl Default for Impairment {
    fn default() -> Self {
        Self {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: 0.0,
            reorder: 0.0,
            rate: None,
            seed: 1,
        }
    }
}

/// Datagrams the relay forwarded and dropped, per direction.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Client → server, forwarded.
    pub up: AtomicU64,
    /// Server → client, forwarded.
    pub down: AtomicU64,
    /// Dropped on purpose, both directions.
    pub dropped: AtomicU64,
    /// Lost because the outgoing socket refused them (its buffer full).
    pub send_failed: AtomicU64,
}

/// A socket with quinn-udp's state for batched, offloaded I/O.
struct Sock {
    socket: UdpSocket,
    state: quinn_udp::UdpSocketState,
}

impl Sock {
    fn bind(addr: SocketAddr) -> std::io::Result<Arc<Self>> {
        let socket = socket(addr)?;
        let state = quinn_udp::UdpSocketState::new((&socket).into())?;
        Ok(Arc::new(Self { socket, state }))
    }

    /// Sends `data`: one datagram, or several of `segment` bytes (GSO).
    fn send(&self, to: SocketAddr, data: &[u8], segment: Option<usize>) -> bool {
        let t = quinn_udp::Transmit {
            destination: to,
            ecn: None,
            contents: data,
            segment_size: segment,
            src_ip: None,
        };
        self.state.send((&self.socket).into(), &t).is_ok()
    }
}

struct Pending {
    at: Instant,
    seq: u64,
    data: Vec<u8>,
    to: SocketAddr,
    via: Arc<Sock>,
}

impl PartialEq for Pending {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Pending {
    // Earliest first out of a max-heap.
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

/// Datagrams waiting for their departure time.
enum Queue {
    Fifo(VecDeque<Pending>),
    Heap(BinaryHeap<Pending>),
}

impl Queue {
    fn push(&mut self, p: Pending) {
        match self {
            Self::Fifo(q) => q.push_back(p),
            Self::Heap(h) => h.push(p),
        }
    }
    fn next_at(&self) -> Option<Instant> {
        match self {
            Self::Fifo(q) => q.front().map(|p| p.at),
            Self::Heap(h) => h.peek().map(|p| p.at),
        }
    }
    fn pop(&mut self) -> Option<Pending> {
        match self {
            Self::Fifo(q) => q.pop_front(),
            Self::Heap(h) => h.pop(),
        }
    }
}

/// One direction: decides each datagram's fate and departure time.
struct Lane {
    imp: Impairment,
    rng: rand::rngs::SmallRng,
    /// When the rate limit lets the next byte out.
    free_at: Instant,
    queue: Queue,
    seq: u64,
}

impl Lane {
    fn new(imp: Impairment, seed: u64) -> Self {
        let ordered = imp.jitter.is_zero() && imp.reorder == 0.0;
        Self {
            imp,
            rng: rand::rngs::SmallRng::seed_from_u64(seed),
            free_at: Instant::now(),
            queue: if ordered {
                Queue::Fifo(VecDeque::new())
            } else {
                Queue::Heap(BinaryHeap::new())
            },
            seq: 0,
        }
    }

    /// Queues a datagram, or drops it (false).
    fn admit(&mut self, now: Instant, data: &[u8], via: Arc<Sock>, to: SocketAddr) -> bool {
        if self.imp.loss > 0.0 && self.rng.random_bool(self.imp.loss.min(1.0)) {
            return false;
        }
        let mut at = now;
        if let Some(rate) = self.imp.rate {
            let start = self.free_at.max(now);
            self.free_at = start + Duration::from_secs_f64(data.len() as f64 / rate as f64);
            at = self.free_at;
        }
        at += self.imp.delay;
        if !self.imp.jitter.is_zero() {
            at += self.imp.jitter.mul_f64(self.rng.random::<f64>());
        }
        if self.imp.reorder > 0.0 && self.rng.random_bool(self.imp.reorder.min(1.0)) {
            at += self.imp.delay / 2 + Duration::from_millis(1);
        }
        self.seq += 1;
        self.queue.push(Pending {
            at,
            seq: self.seq,
            data: data.to_vec(),
            to,
            via,
        });
        true
    }

    /// Sends what is due: runs of equal-sized datagrams to the same place
    /// through the same socket leave in one GSO send.
    fn release(&mut self, now: Instant, out: &mut Vec<u8>, stats: &RelayStats) {
        let mut run: Option<(Arc<Sock>, SocketAddr, usize, usize)> = None;
        let flush = |run: &mut Option<(Arc<Sock>, SocketAddr, usize, usize)>, out: &mut Vec<u8>| {
            if let Some((via, to, size, n)) = run.take() {
                if !via.send(to, out, (n > 1).then_some(size)) {
                    stats.send_failed.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
            out.clear();
        };
        while self.queue.next_at().is_some_and(|at| at <= now) {
            let Some(p) = self.queue.pop() else {
                break;
            };
            let joins = run.as_ref().is_some_and(|(via, to, size, n)| {
                Arc::ptr_eq(via, &p.via)
                    && *to == p.to
                    && p.data.len() <= *size
                    && out.len().is_multiple_of(*size)
                    && *n < via.state.max_gso_segments()
                    && out.len() + p.data.len() <= MAX_GSO_BYTES
            });
            if !joins {
                flush(&mut run, out);
                run = Some((p.via.clone(), p.to, p.data.len(), 0));
            }
            out.extend_from_slice(&p.data);
            if let Some(r) = run.as_mut() {
                r.3 += 1;
            }
            // A shorter datagram ends a GSO run; one longer than an
            // Ethernet frame carries (an MTU probe) leaves alone.
            if run.as_ref().is_some_and(|(_, _, size, _)| {
                p.data.len() < *size || p.data.len() > ETHERNET_PAYLOAD
            }) {
                flush(&mut run, out);
            }
        }
        flush(&mut run, out);
    }
}

fn timespec(d: Duration) -> Timespec {
    Timespec {
        tv_sec: d.as_secs() as _,
        tv_nsec: d.subsec_nanos() as _,
    }
}

/// The most one GSO send may carry: an IPv4 UDP datagram's payload
/// limit. A larger one fails, and quinn-udp swallows that error (QUIC would
/// resend), so every datagram in it would be silently lost.
const MAX_GSO_BYTES: usize = 65_507;

/// The UDP payload a 1,500-byte Ethernet frame carries. A longer datagram
/// (QUIC's path MTU probe) is sent on its own: where the next hop cannot
/// carry it, the kernel refuses the send and quinn-udp drops it without a
/// word — batched in one GSO send, the datagrams after it would be dropped
/// with it, losses a router would not cause (they once cost cubic half of
/// its rate through this relay; BENCHMARKS.md).
const ETHERNET_PAYLOAD: usize = 1_472;

/// The shortest and longest a lane waits for datagrams between releases.
const MIN_WAIT: Duration = Duration::from_micros(20);
const MAX_WAIT: Duration = Duration::from_millis(1);

/// Runs one direction until `stop`: receives from `from` (waiting at most
/// until the next queued datagram is due, and never more than a
/// millisecond), queues each datagram, sends what is due; `route` names the socket and address each sender's
/// datagrams go on to.
fn lane_loop(
    from: Arc<Sock>,
    mut lane: Lane,
    stop: Arc<AtomicBool>,
    stats: Arc<RelayStats>,
    up: bool,
    mut route: impl FnMut(SocketAddr) -> Option<(Arc<Sock>, SocketAddr)>,
) {
    let batch = quinn_udp::BATCH_SIZE.min(32);
    let mut storage = vec![vec![0u8; 65_536]; batch];
    let mut meta = vec![quinn_udp::RecvMeta::default(); batch];
    let mut out = Vec::with_capacity(65_536);
    while !stop.load(Ordering::Relaxed) {
        let wait = lane.queue.next_at().map_or(MAX_WAIT, |at| {
            at.saturating_duration_since(Instant::now())
                .clamp(MIN_WAIT, MAX_WAIT)
        });
        // quinn-udp's socket is non-blocking: wait in poll (a
        // high-resolution timeout, unlike SO_RCVTIMEO's jiffies) instead of
        // spinning on the cores the site and DP under test need.
        let mut fds = [PollFd::new(&from.socket, PollFlags::IN)];
        let _ = poll(&mut fds, Some(&timespec(wait)));
        let mut bufs: Vec<std::io::IoSliceMut<'_>> = storage
            .iter_mut()
            .map(|b| std::io::IoSliceMut::new(b))
            .collect();
        let got = from
            .state
            .recv((&from.socket).into(), &mut bufs, &mut meta)
            .unwrap_or(0);
        drop(bufs);
        let now = Instant::now();
        for (m, buf) in meta.iter().zip(&storage).take(got) {
            let Some((via, to)) = route(m.addr) else {
                continue;
            };
            let stride = if m.stride == 0 { m.len } else { m.stride };
            for d in buf[..m.len].chunks(stride.max(1)) {
                if lane.admit(now, d, via.clone(), to) {
                    let c = if up { &stats.up } else { &stats.down };
                    c.fetch_add(1, Ordering::Relaxed);
                } else {
                    stats.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        lane.release(Instant::now(), &mut out, &stats);
    }
}

/// A UDP socket with kernel buffers large enough for a gigabit burst.
fn socket(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    use rustix::net::sockopt;
    let s = UdpSocket::bind(addr)?;
    let size = 16 << 20;
    if sockopt::set_socket_recv_buffer_size_force(&s, size).is_err() {
        let _ = sockopt::set_socket_recv_buffer_size(&s, size);
    }
    if sockopt::set_socket_send_buffer_size_force(&s, size).is_err() {
        let _ = sockopt::set_socket_send_buffer_size(&s, size);
    }
    Ok(s)
}

/// A running relay; stops when dropped.
pub struct Relay {
    /// Where clients send.
    pub addr: SocketAddr,
    /// What it did.
    pub stats: Arc<RelayStats>,
    stop: Arc<AtomicBool>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Relay {
    /// Listens on `listen` and relays to `server`.
    pub fn start(listen: SocketAddr, server: SocketAddr, imp: Impairment) -> std::io::Result<Self> {
        let front = Sock::bind(listen)?;
        let addr = front.socket.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(RelayStats::default());
        let threads: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::new(Mutex::new(Vec::new()));
        let bind: SocketAddr = if server.is_ipv6() {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        };
        // Client → server. A new client gets an upstream socket and a
        // thread for its replies (server → client).
        let (stop2, stats2, front2, threads2) =
            (stop.clone(), stats.clone(), front.clone(), threads.clone());
        let up = std::thread::spawn(move || {
            let mut uplinks: HashMap<SocketAddr, Arc<Sock>> = HashMap::new();
            let route = |src: SocketAddr| -> Option<(Arc<Sock>, SocketAddr)> {
                if let Some(s) = uplinks.get(&src) {
                    return Some((s.clone(), server));
                }
                let s = Sock::bind(bind).ok()?;
                uplinks.insert(src, s.clone());
                let down = Lane::new(imp, imp.seed ^ 0x5eed);
                let (stop, stats, front) = (stop2.clone(), stats2.clone(), front2.clone());
                let from = s.clone();
                let t = std::thread::spawn(move || {
                    lane_loop(from, down, stop, stats, false, |_| {
                        Some((front.clone(), src))
                    })
                });
                threads2.lock().unwrap_or_else(|p| p.into_inner()).push(t);
                Some((s, server))
            };
            lane_loop(
                front2.clone(),
                Lane::new(imp, imp.seed),
                stop2.clone(),
                stats2.clone(),
                true,
                route,
            );
        });
        threads.lock().unwrap_or_else(|p| p.into_inner()).push(up);
        Ok(Self {
            addr,
            stats,
            stop,
            threads,
        })
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Until none is left: reply threads may start while the first ones
        // are joined.
        loop {
            let threads: Vec<JoinHandle<()>> = self
                .threads
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .drain(..)
                .collect();
            if threads.is_empty() {
                break;
            }
            for t in threads {
                let _ = t.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagrams_come_back_late_and_some_are_lost() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let server_addr = server.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = server.recv_from(&mut buf) {
                let _ = server.send_to(&buf[..n], from);
            }
        });
        let relay = Relay::start(
            "127.0.0.1:0".parse().unwrap(),
            server_addr,
            Impairment {
                delay: Duration::from_millis(20),
                loss: 0.2,
                ..Impairment::default()
            },
        )
        .unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let t = Instant::now();
        client.send_to(b"ping", relay.addr).unwrap();
        let mut buf = [0u8; 16];
        // With 20 % loss each way a single ping may vanish; try a few.
        let mut got = None;
        for _ in 0..10 {
            if let Ok((n, _)) = client.recv_from(&mut buf) {
                got = Some((n, t.elapsed()));
                break;
            }
            client.send_to(b"ping", relay.addr).unwrap();
        }
        let (n, rtt) = got.expect("an echo through the relay");
        assert_eq!(&buf[..n], b"ping");
        assert!(rtt >= Duration::from_millis(40), "round trip {rtt:?}");
        for _ in 0..200 {
            client.send_to(b"x", relay.addr).unwrap();
        }
        std::thread::sleep(Duration::from_millis(200));
        let dropped = relay.stats.dropped.load(Ordering::Relaxed);
        assert!((20..=150).contains(&dropped), "dropped {dropped}");
    }

    #[test]
    fn a_rate_limit_paces_what_passes() {
        let server = socket("127.0.0.1:0".parse().unwrap()).unwrap();
        let server_addr = server.local_addr().unwrap();
        server
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let relay = Relay::start(
            "127.0.0.1:0".parse().unwrap(),
            server_addr,
            Impairment {
                rate: Some(1_000_000),
                ..Impairment::default()
            },
        )
        .unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        let t = Instant::now();
        for _ in 0..200 {
            client.send_to(&[0u8; 1000], relay.addr).unwrap();
        }
        let mut got = 0;
        let mut buf = [0u8; 2048];
        while got < 200 {
            if server.recv_from(&mut buf).is_err() {
                break;
            }
            got += 1;
        }
        let took = t.elapsed();
        assert_eq!(got, 200);
        // 200 kB at 1 MB/s: 0.2 s.
        assert!(took >= Duration::from_millis(180), "{took:?}");
    }
}
