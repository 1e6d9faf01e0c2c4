//! A small TCP fault-injection proxy for network-fault tests.
//!
//! `Proxy::start(upstream)` listens on 127.0.0.1:0 and forwards every accepted
//! connection to `upstream`. At any time a test can:
//! * [`Proxy::reset_all`] — abort all current connections with a TCP RST;
//! * [`Proxy::set_blackhole`] — stop moving bytes in both directions while the
//!   sockets stay open (like a silently dropping network; heartbeats time out);
//! * [`Proxy::set_latency`] — delay every forwarded chunk;
//! * [`Proxy::set_refuse`] — reset new connections right after accept;
//! * [`Proxy::hold_confirms`] / [`Proxy::release_confirms`] /
//!   [`Proxy::pass_confirms`] — hold the broker's publisher confirms
//!   (`basic.ack` / `basic.nack` sent by the broker, which only exist in
//!   confirm mode) while every other frame passes, then let them through one
//!   delivery tag at a time: the broker has the messages, the client has not
//!   heard so. A `multiple` confirm is split into one confirm per tag it
//!   covers, so a test can confirm the outputs of one input one by one;
//! * [`Proxy::send_blocked`] / [`Proxy::send_unblocked`] — tell the clients
//!   of connections picked by name that the broker blocks them (they stop
//!   writing, acks too), while the broker blocks nothing.
//!
//! Buffers are bounded (one 16 KiB buffer per direction); while blackholed the
//! proxy simply stops reading, so back-pressure ends up in the kernel buffers.
//! When the blackhole is lifted, bytes that were held are delivered (like TCP
//! retransmission after a network partition heals).
//!
//! Dependencies: std + tokio (features `net`, `io-util`, `sync`, `time`, `rt`, `macros`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

const BUF_SIZE: usize = 16 * 1024;

/// Handle to a running proxy. Dropping it stops the proxy and resets all its
/// connections.
pub struct Proxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    accept_task: JoinHandle<()>,
}

struct Shared {
    upstream: SocketAddr,
    blackhole: watch::Sender<bool>,
    latency: watch::Sender<Duration>,
    refuse: AtomicBool,
    /// live connections: id -> kill switch (send `true` to reset)
    conns: Mutex<HashMap<u64, watch::Sender<bool>>>,
    next_id: AtomicU64,
    accepted: AtomicU64,
    /// Publisher confirms held back (see [`Proxy::hold_confirms`]).
    gate: Mutex<Gate>,
    /// Bumped when confirms are released: each connection writes its own.
    released: watch::Sender<u64>,
    /// Bumped when a confirm is held (for [`Proxy::wait_held_confirms`]).
    held_changed: watch::Sender<u64>,
}

/// One confirm for one delivery tag, as the broker sent it (split from a
/// `multiple` one if need be).
#[derive(Clone, Copy, Debug)]
struct Confirm {
    channel: u16,
    tag: u64,
    nack: bool,
}

impl Confirm {
    /// The `basic.ack` / `basic.nack` method frame for this one tag.
    fn frame(&self) -> Vec<u8> {
        let mut f = Vec::with_capacity(21);
        f.push(FRAME_METHOD);
        f.extend_from_slice(&self.channel.to_be_bytes());
        f.extend_from_slice(&13u32.to_be_bytes());
        f.extend_from_slice(&BASIC_CLASS.to_be_bytes());
        let method = if self.nack { BASIC_NACK } else { BASIC_ACK };
        f.extend_from_slice(&method.to_be_bytes());
        f.extend_from_slice(&self.tag.to_be_bytes());
        // Not multiple; a nack is not requeued (the broker's own nacks never are).
        f.push(0);
        f.push(FRAME_END);
        f
    }
}

#[derive(Default)]
struct Gate {
    /// Confirms are being held.
    holding: bool,
    /// Confirms that may still pass while holding.
    allowance: usize,
    /// Held confirms, in the order the broker sent them.
    held: std::collections::VecDeque<(u64, Confirm)>,
    /// Frames to write to the client, per connection: released confirms,
    /// injected notifications.
    out: HashMap<u64, Vec<Vec<u8>>>,
    /// The first bytes each client sent (its `connection.start-ok` with
    /// the connection name), to pick connections by name.
    hello: HashMap<u64, Vec<u8>>,
}

const FRAME_METHOD: u8 = 1;
const FRAME_END: u8 = 0xCE;
const BASIC_CLASS: u16 = 60;
const BASIC_ACK: u16 = 80;
const BASIC_NACK: u16 = 120;
const CONFIRM_CLASS: u16 = 85;
const CONNECTION_CLASS: u16 = 10;
const CONNECTION_BLOCKED: u16 = 60;
const CONNECTION_UNBLOCKED: u16 = 61;
/// How much of what a client sends first is kept to find its name.
const HELLO_BYTES: usize = 4096;
const CONFIRM_SELECT_OK: u16 = 11;
/// The largest frame the proxy buffers whole (RabbitMQ's `frame_max` is at
/// most 128 KiB by default); a longer one turns the connection to raw copying.
const MAX_FRAME: usize = 4 * 1024 * 1024;

impl Proxy {
    /// Start a proxy on 127.0.0.1:0 forwarding to `upstream`. Must be called
    /// inside a tokio runtime. Panics if it cannot bind (test support).
    pub async fn start(upstream: SocketAddr) -> Proxy {
        Self::try_start(upstream)
            .await
            .expect("proxy: bind 127.0.0.1:0")
    }

    /// Fallible version of [`Proxy::start`].
    pub async fn try_start(upstream: SocketAddr) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            upstream,
            blackhole: watch::channel(false).0,
            latency: watch::channel(Duration::ZERO).0,
            refuse: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            gate: Mutex::new(Gate::default()),
            released: watch::channel(0).0,
            held_changed: watch::channel(0).0,
        });
        let accept_task = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(Proxy {
            addr,
            upstream,
            shared,
            accept_task,
        })
    }

    /// Address clients should connect to (`127.0.0.1:<port>`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Port clients should connect to.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `amqp://guest:guest@127.0.0.1:<proxy port>/%2f`.
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }

    /// The upstream address being forwarded to.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// Abruptly drop all current connections (RST to both the client and the
    /// upstream). New connections are still accepted afterwards.
    pub fn reset_all(&self) {
        let conns: Vec<_> = self.shared.conns.lock().unwrap().drain().collect();
        for (_, kill) in conns {
            let _ = kill.send(true);
        }
    }

    /// While `true`, no bytes are forwarded in either direction, but sockets
    /// stay open (new connections are accepted and connected upstream too).
    pub fn set_blackhole(&self, on: bool) {
        self.shared.blackhole.send_replace(on);
    }

    /// Delay applied to every forwarded chunk, in both directions.
    pub fn set_latency(&self, latency: Duration) {
        self.shared.latency.send_replace(latency);
    }

    /// While `true`, newly accepted connections are immediately reset
    /// ("connection refused"-like for the client; existing ones keep working).
    pub fn set_refuse(&self, on: bool) {
        self.shared.refuse.store(on, Ordering::SeqCst);
    }

    /// From now on the broker's publisher confirms are held back (every
    /// other frame passes): the broker has routed and stored the messages,
    /// the client waits for their confirms.
    pub fn hold_confirms(&self) {
        let mut g = self.shared.gate.lock().unwrap();
        g.holding = true;
        g.allowance = 0;
    }

    /// Lets the next `n` confirms through (one delivery tag each), held
    /// ones first in the order the broker sent them; confirms still to come
    /// use up what is left. Holding goes on for the rest.
    pub fn release_confirms(&self, n: usize) {
        let mut g = self.shared.gate.lock().unwrap();
        let mut left = n;
        while left > 0 {
            let Some((conn, c)) = g.held.pop_front() else {
                break;
            };
            g.out.entry(conn).or_default().push(c.frame());
            left -= 1;
        }
        g.allowance += left;
        drop(g);
        self.shared.released.send_modify(|v| *v += 1);
    }

    /// Releases every held confirm and stops holding.
    pub fn pass_confirms(&self) {
        let mut g = self.shared.gate.lock().unwrap();
        g.holding = false;
        g.allowance = 0;
        while let Some((conn, c)) = g.held.pop_front() {
            g.out.entry(conn).or_default().push(c.frame());
        }
        drop(g);
        self.shared.released.send_modify(|v| *v += 1);
    }

    /// Confirms held right now (one per delivery tag).
    pub fn held_confirms(&self) -> usize {
        self.shared.gate.lock().unwrap().held.len()
    }

    /// Waits until at least `n` confirms are held; `false` after `timeout`.
    pub async fn wait_held_confirms(&self, n: usize, timeout: Duration) -> bool {
        let mut rx = self.shared.held_changed.subscribe();
        let wait = async {
            loop {
                if self.held_confirms() >= n {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok() && self.held_confirms() >= n
    }

    /// Sends `connection.blocked` (as a broker under a resource alarm does)
    /// to every connection whose client named itself with `name_part` in
    /// its `connection.start-ok` (e.g. flowgate's `-consume` connection);
    /// how many got it. The client stops writing on them, acks included,
    /// while the broker itself blocks nothing.
    pub fn send_blocked(&self, name_part: &str) -> usize {
        let mut f = vec![FRAME_METHOD, 0, 0];
        let reason = b"flowgate test proxy";
        f.extend_from_slice(&(5 + reason.len() as u32).to_be_bytes());
        f.extend_from_slice(&CONNECTION_CLASS.to_be_bytes());
        f.extend_from_slice(&CONNECTION_BLOCKED.to_be_bytes());
        f.push(reason.len() as u8);
        f.extend_from_slice(reason);
        f.push(FRAME_END);
        self.inject(name_part, &f)
    }

    /// Sends `connection.unblocked` to the connections named like
    /// [`send_blocked`](Self::send_blocked)'s.
    pub fn send_unblocked(&self, name_part: &str) -> usize {
        let mut f = vec![FRAME_METHOD, 0, 0];
        f.extend_from_slice(&4u32.to_be_bytes());
        f.extend_from_slice(&CONNECTION_CLASS.to_be_bytes());
        f.extend_from_slice(&CONNECTION_UNBLOCKED.to_be_bytes());
        f.push(FRAME_END);
        self.inject(name_part, &f)
    }

    fn inject(&self, name_part: &str, frame: &[u8]) -> usize {
        let mut g = self.shared.gate.lock().unwrap();
        let conns: Vec<u64> = g
            .hello
            .iter()
            .filter(|(_, hello)| {
                hello
                    .windows(name_part.len())
                    .any(|w| w == name_part.as_bytes())
            })
            .map(|(id, _)| *id)
            .collect();
        for id in &conns {
            g.out.entry(*id).or_default().push(frame.to_vec());
        }
        drop(g);
        self.shared.released.send_modify(|v| *v += 1);
        conns.len()
    }

    /// Number of currently proxied connections.
    pub fn connection_count(&self) -> usize {
        self.shared.conns.lock().unwrap().len()
    }

    /// Total connections accepted since start.
    pub fn accepted_total(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept_task.abort();
        self.reset_all();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let (client, _) = match listener.accept().await {
            Ok(c) => c,
            Err(_) => {
                // e.g. EMFILE: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        if shared.refuse.load(Ordering::SeqCst) {
            let _ = client.set_zero_linger();
            drop(client);
            continue;
        }
        let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
        let (kill_tx, kill_rx) = watch::channel(false);
        shared.conns.lock().unwrap().insert(id, kill_tx);
        let shared2 = shared.clone();
        tokio::spawn(async move {
            handle_conn(id, client, kill_rx, &shared2).await;
            shared2.conns.lock().unwrap().remove(&id);
            let mut g = shared2.gate.lock().unwrap();
            g.out.remove(&id);
            g.hello.remove(&id);
        });
    }
}

async fn handle_conn(
    id: u64,
    mut client: TcpStream,
    mut kill: watch::Receiver<bool>,
    shared: &Shared,
) {
    let _ = client.set_nodelay(true);
    let connect = TcpStream::connect(shared.upstream);
    let mut upstream = tokio::select! {
        r = connect => match r {
            Ok(s) => s,
            Err(_) => {
                let _ = client.set_zero_linger();
                return;
            }
        },
        _ = kill.wait_for(|k| *k) => {
            let _ = client.set_zero_linger();
            return;
        }
    };
    let _ = upstream.set_nodelay(true);

    let reset = {
        let (mut cr, mut cw) = client.split();
        let (mut ur, mut uw) = upstream.split();
        let c2u = pipe(Some(id), &mut cr, &mut uw, shared);
        let u2c = pipe_frames(id, &mut ur, &mut cw, shared);
        tokio::select! {
            _ = async { tokio::join!(c2u, u2c) } => false,
            _ = kill.wait_for(|k| *k) => true,
        }
    };
    if reset {
        let _ = client.set_zero_linger();
        let _ = upstream.set_zero_linger();
    }
    // Dropping both streams closes them (RST if zero-linger was set).
}

/// Copy one direction with a single bounded buffer, honouring blackhole and
/// latency. On EOF the write side is shut down (half-close propagates FIN).
async fn pipe<R, W>(hello_of: Option<u64>, r: &mut R, w: &mut W, shared: &Shared)
where
    R: AsyncReadExt + Unpin,
    W: AsyncWriteExt + Unpin,
{
    let mut blackhole = shared.blackhole.subscribe();
    let latency = shared.latency.subscribe();
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        // Do not even read while blackholed: data stays in kernel buffers.
        if blackhole.wait_for(|b| !*b).await.is_err() {
            return;
        }
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = w.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        if let Some(id) = hello_of {
            let mut g = shared.gate.lock().unwrap();
            let hello = g.hello.entry(id).or_default();
            let room = HELLO_BYTES.saturating_sub(hello.len());
            hello.extend_from_slice(&buf[..n.min(room)]);
        }
        let delay = *latency.borrow();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        // Blackhole may have been switched on while we were reading.
        if blackhole.wait_for(|b| !*b).await.is_err() {
            return;
        }
        if w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Broker → client: like [`pipe`], but frame by frame, so that publisher
/// confirms can be held (see [`Proxy::hold_confirms`]). Anything that does
/// not parse as AMQP frames is copied raw from then on.
async fn pipe_frames<R, W>(id: u64, r: &mut R, w: &mut W, shared: &Shared)
where
    R: AsyncReadExt + Unpin,
    W: AsyncWriteExt + Unpin,
{
    let mut blackhole = shared.blackhole.subscribe();
    let latency = shared.latency.subscribe();
    let mut released = shared.released.subscribe();
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; BUF_SIZE];
    // Per channel: every tag up to `.0` is confirmed, and so are those in `.1`.
    let mut confirmed: HashMap<u16, (u64, std::collections::BTreeSet<u64>)> = HashMap::new();
    let mut raw = false;
    loop {
        if blackhole.wait_for(|b| !*b).await.is_err() {
            return;
        }
        let n = tokio::select! {
            read = r.read(&mut chunk) => match read {
                Ok(0) | Err(_) => {
                    let _ = w.shutdown().await;
                    return;
                }
                Ok(n) => n,
            },
            changed = released.changed() => {
                if changed.is_err() {
                    return;
                }
                let mine = shared.gate.lock().unwrap().out.remove(&id).unwrap_or_default();
                for frame in mine {
                    if w.write_all(&frame).await.is_err() {
                        return;
                    }
                }
                continue;
            }
        };
        let delay = *latency.borrow();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if blackhole.wait_for(|b| !*b).await.is_err() {
            return;
        }
        if raw {
            if w.write_all(&chunk[..n]).await.is_err() {
                return;
            }
            continue;
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut out: Vec<u8> = Vec::new();
        let mut at = 0;
        while buf.len() - at >= 7 {
            let size =
                u32::from_be_bytes([buf[at + 3], buf[at + 4], buf[at + 5], buf[at + 6]]) as usize;
            if size > MAX_FRAME {
                raw = true;
                break;
            }
            let end = at + 7 + size;
            if buf.len() < end + 1 {
                break;
            }
            if buf[end] != FRAME_END {
                raw = true;
                break;
            }
            let frame = &buf[at..=end];
            let payload = &buf[at + 7..end];
            let channel = u16::from_be_bytes([buf[at + 1], buf[at + 2]]);
            let method = (buf[at] == FRAME_METHOD && payload.len() >= 4).then(|| {
                (
                    u16::from_be_bytes([payload[0], payload[1]]),
                    u16::from_be_bytes([payload[2], payload[3]]),
                )
            });
            match method {
                Some((BASIC_CLASS, m @ (BASIC_ACK | BASIC_NACK))) if payload.len() >= 13 => {
                    let tag = u64::from_be_bytes(payload[4..12].try_into().unwrap());
                    let multiple = payload[12] & 1 == 1;
                    let nack = m == BASIC_NACK;
                    let (upto, singles) = confirmed.entry(channel).or_default();
                    let tags: Vec<u64> = if multiple {
                        (*upto + 1..=tag).filter(|t| !singles.contains(t)).collect()
                    } else {
                        vec![tag]
                    };
                    if multiple {
                        *upto = (*upto).max(tag);
                    } else {
                        singles.insert(tag);
                    }
                    while singles.remove(&(*upto + 1)) {
                        *upto += 1;
                    }
                    singles.retain(|t| *t > *upto);
                    let mut g = shared.gate.lock().unwrap();
                    let mut held_any = false;
                    for tag in tags {
                        let c = Confirm { channel, tag, nack };
                        if !g.holding {
                            out.extend_from_slice(&c.frame());
                        } else if g.allowance > 0 {
                            g.allowance -= 1;
                            out.extend_from_slice(&c.frame());
                        } else {
                            g.held.push_back((id, c));
                            held_any = true;
                        }
                    }
                    drop(g);
                    if held_any {
                        shared.held_changed.send_modify(|v| *v += 1);
                    }
                }
                Some((CONFIRM_CLASS, CONFIRM_SELECT_OK)) => {
                    // Confirm mode (re)starts on this channel: tags from 1.
                    confirmed.remove(&channel);
                    out.extend_from_slice(frame);
                }
                _ => out.extend_from_slice(frame),
            }
            at = end + 1;
        }
        if raw {
            out.extend_from_slice(&buf[at..]);
            buf.clear();
        } else {
            buf.drain(..at);
        }
        if !out.is_empty() && w.write_all(&out).await.is_err() {
            return;
        }
    }
}
