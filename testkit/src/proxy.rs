//! A small TCP fault-injection proxy for network-fault tests.
//!
//! `Proxy::start(upstream)` listens on 127.0.0.1:0 and forwards every accepted
//! connection to `upstream`. At any time a test can:
//! * [`Proxy::reset_all`] — abort all current connections with a TCP RST;
//! * [`Proxy::set_blackhole`] — stop moving bytes in both directions while the
//!   sockets stay open (like a silently dropping network; heartbeats time out);
//! * [`Proxy::set_latency`] — delay every forwarded chunk;
//! * [`Proxy::set_refuse`] — reset new connections right after accept.
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
}

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
            handle_conn(client, kill_rx, &shared2).await;
            shared2.conns.lock().unwrap().remove(&id);
        });
    }
}

async fn handle_conn(mut client: TcpStream, mut kill: watch::Receiver<bool>, shared: &Shared) {
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
        let c2u = pipe(&mut cr, &mut uw, shared);
        let u2c = pipe(&mut ur, &mut cw, shared);
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
async fn pipe<R, W>(r: &mut R, w: &mut W, shared: &Shared)
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
