//! A userspace UDP impairment relay: delay, jitter, loss, reordering and a
//! rate limit between a client and a server, for links this kernel's
//! missing `netem` cannot make.
//!
//! The client sends to [`Relay::addr`]; each datagram is forwarded to the
//! server from a socket of its own (one per client address, so replies find
//! their way back) after the impairments of its direction. Both directions
//! get the same [`Impairment`]; the round-trip time is twice its delay.

use std::collections::{BinaryHeap, HashMap};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

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
}

struct Pending {
    at: Instant,
    seq: u64,
    data: Vec<u8>,
    to: SocketAddr,
    via: Arc<UdpSocket>,
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

/// One direction: decides each datagram's fate and departure time.
struct Lane {
    imp: Impairment,
    rng: rand::rngs::SmallRng,
    /// When the rate limit lets the next byte out.
    free_at: Instant,
}

impl Lane {
    fn schedule(&mut self, now: Instant, len: usize) -> Option<Instant> {
        if self.imp.loss > 0.0 && self.rng.random_bool(self.imp.loss.min(1.0)) {
            return None;
        }
        let mut at = now;
        if let Some(rate) = self.imp.rate {
            let start = self.free_at.max(now);
            self.free_at = start + Duration::from_secs_f64(len as f64 / rate as f64);
            at = self.free_at;
        }
        at += self.imp.delay;
        if !self.imp.jitter.is_zero() {
            at += self.imp.jitter.mul_f64(self.rng.random::<f64>());
        }
        if self.imp.reorder > 0.0 && self.rng.random_bool(self.imp.reorder.min(1.0)) {
            at += self.imp.delay / 2 + Duration::from_millis(1);
        }
        Some(at)
    }
}

type Queue = Arc<(Mutex<BinaryHeap<Pending>>, Condvar)>;

/// A running relay; stops when dropped.
pub struct Relay {
    /// Where clients send.
    pub addr: SocketAddr,
    /// What it did.
    pub stats: Arc<RelayStats>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    queue: Queue,
}

impl Relay {
    /// Listens on `listen` and relays to `server`.
    pub fn start(listen: SocketAddr, server: SocketAddr, imp: Impairment) -> std::io::Result<Self> {
        let front = Arc::new(UdpSocket::bind(listen)?);
        front.set_read_timeout(Some(Duration::from_millis(50)))?;
        let addr = front.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(RelayStats::default());
        let queue: Queue = Arc::new((Mutex::new(BinaryHeap::new()), Condvar::new()));
        let seq = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();

        // The sender: releases datagrams when they are due.
        {
            let (queue, stop) = (queue.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                let (lock, cv) = &*queue;
                let mut q = lock.lock().unwrap_or_else(|p| p.into_inner());
                while !stop.load(Ordering::Relaxed) {
                    let now = Instant::now();
                    match q.peek() {
                        Some(p) if p.at <= now => {
                            if let Some(p) = q.pop() {
                                let _ = p.via.send_to(&p.data, p.to);
                            }
                        }
                        Some(p) => {
                            let wait = p.at - now;
                            q = cv
                                .wait_timeout(q, wait)
                                .unwrap_or_else(|p| p.into_inner())
                                .0;
                        }
                        None => {
                            q = cv
                                .wait_timeout(q, Duration::from_millis(50))
                                .unwrap_or_else(|p| p.into_inner())
                                .0;
                        }
                    }
                }
            }));
        }
        let push = {
            let queue = queue.clone();
            move |p: Pending| {
                let (lock, cv) = &*queue;
                lock.lock().unwrap_or_else(|p| p.into_inner()).push(p);
                cv.notify_one();
            }
        };

        // Client → server: one upstream socket per client, each with a
        // thread for the replies.
        {
            let (stop, stats, front) = (stop.clone(), stats.clone(), front.clone());
            let up_lane = Arc::new(Mutex::new(Lane {
                imp,
                rng: rand::rngs::SmallRng::seed_from_u64(imp.seed),
                free_at: Instant::now(),
            }));
            let down_lane = Arc::new(Mutex::new(Lane {
                imp,
                rng: rand::rngs::SmallRng::seed_from_u64(imp.seed ^ 0x5eed),
                free_at: Instant::now(),
            }));
            let push = push.clone();
            let seq = seq.clone();
            threads.push(std::thread::spawn(move || {
                let mut uplinks: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
                let mut repliers = Vec::new();
                let mut buf = vec![0u8; 65_536];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, from)) = front.recv_from(&mut buf) else {
                        continue;
                    };
                    let up = match uplinks.get(&from) {
                        Some(s) => s.clone(),
                        None => {
                            let bind: SocketAddr = if server.is_ipv6() {
                                "[::]:0".parse().unwrap_or(server)
                            } else {
                                "0.0.0.0:0".parse().unwrap_or(server)
                            };
                            let Ok(s) = UdpSocket::bind(bind) else {
                                continue;
                            };
                            let _ = s.set_read_timeout(Some(Duration::from_millis(50)));
                            let s = Arc::new(s);
                            uplinks.insert(from, s.clone());
                            // Replies to this client.
                            let (s2, front2, stop2, stats2) =
                                (s.clone(), front.clone(), stop.clone(), stats.clone());
                            let (lane, push2, seq2) =
                                (down_lane.clone(), push.clone(), seq.clone());
                            repliers.push(std::thread::spawn(move || {
                                let mut buf = vec![0u8; 65_536];
                                while !stop2.load(Ordering::Relaxed) {
                                    let Ok((n, _)) = s2.recv_from(&mut buf) else {
                                        continue;
                                    };
                                    let at = lane
                                        .lock()
                                        .unwrap_or_else(|p| p.into_inner())
                                        .schedule(Instant::now(), n);
                                    match at {
                                        Some(at) => {
                                            stats2.down.fetch_add(1, Ordering::Relaxed);
                                            push2(Pending {
                                                at,
                                                seq: seq2.fetch_add(1, Ordering::Relaxed),
                                                data: buf[..n].to_vec(),
                                                to: from,
                                                via: front2.clone(),
                                            });
                                        }
                                        None => {
                                            stats2.dropped.fetch_add(1, Ordering::Relaxed);
                                        }
                                    }
                                }
                            }));
                            s
                        }
                    };
                    let at = up_lane
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .schedule(Instant::now(), n);
                    match at {
                        Some(at) => {
                            stats.up.fetch_add(1, Ordering::Relaxed);
                            push(Pending {
                                at,
                                seq: seq.fetch_add(1, Ordering::Relaxed),
                                data: buf[..n].to_vec(),
                                to: server,
                                via: up,
                            });
                        }
                        None => {
                            stats.dropped.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                for r in repliers {
                    let _ = r.join();
                }
            }));
        }
        Ok(Self {
            addr,
            stats,
            stop,
            threads,
            queue,
        })
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.queue.1.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
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
}
