//! A TCP forwarder on loopback that a test can cut and restore: one component loses its
//! connection to a real server (a gateway's link to nats-server, say) while every other
//! component keeps its own, which a server restart cannot do. It can also hold back what the
//! server sends while the connection stays up: a server that has gone quiet.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Whether traffic flows, and the token every forwarded connection of the current period ends
/// with.
#[derive(Debug)]
struct State {
    open: bool,
    period: CancellationToken,
}

/// Forwards every connection to `upstream` until cut; stops when dropped.
#[derive(Debug)]
pub struct CuttableLink {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    /// `true` while what the upstream sends is forwarded.
    replies: watch::Sender<bool>,
    task: JoinHandle<()>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

impl CuttableLink {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> CuttableLink {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("bind the forwarder: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("forwarder address: {e}"));
        let state = Arc::new(Mutex::new(State {
            open: true,
            period: CancellationToken::new(),
        }));
        let (replies, _) = watch::channel(true);
        let task = tokio::spawn(accept(listener, upstream, state.clone(), replies.clone()));
        CuttableLink {
            addr,
            state,
            replies,
            task,
        }
    }

    /// Where clients connect instead of the upstream.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes every forwarded connection, both ways, and closes new ones at once until
    /// [`CuttableLink::restore`].
    pub fn cut(&self) {
        let mut st = lock(&self.state);
        st.open = false;
        st.period.cancel();
    }

    /// Forwards new connections again.
    pub fn restore(&self) {
        let mut st = lock(&self.state);
        st.open = true;
        st.period = CancellationToken::new();
    }

    /// Holds back everything the upstream sends (what the client sends still goes through, and
    /// the connection stays up) until [`CuttableLink::release_replies`].
    pub fn hold_replies(&self) {
        self.replies.send_replace(false);
    }

    /// Forwards what the upstream sent meanwhile, and everything after it.
    pub fn release_replies(&self) {
        self.replies.send_replace(true);
    }
}

impl Drop for CuttableLink {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

async fn accept(
    listener: TcpListener,
    upstream: SocketAddr,
    state: Arc<Mutex<State>>,
    replies: watch::Sender<bool>,
) {
    while let Ok((client, _)) = listener.accept().await {
        let period = {
            let st = lock(&state);
            st.open.then(|| st.period.clone())
        };
        // Cut: dropping the accepted socket closes it, as a broken path would.
        if let Some(period) = period {
            tokio::spawn(forward(client, upstream, period, replies.subscribe()));
        }
    }
}

async fn forward(
    client: TcpStream,
    upstream: SocketAddr,
    period: CancellationToken,
    replies: watch::Receiver<bool>,
) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let (mut client_read, client_write) = client.into_split();
    let (server_read, mut server_write) = server.into_split();
    // Each direction ends on its own (passing the close on), as copy_bidirectional does: a
    // side that closes does not cut off what the other side is still sending.
    let requests = async {
        let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
        let _ = server_write.shutdown().await;
    };
    tokio::select! {
        () = period.cancelled() => {}
        _ = async { tokio::join!(requests, forward_replies(server_read, client_write, replies)) } => {}
    }
}

/// Copies what the upstream sends to the client, waiting while replies are held (a chunk read
/// just before a hold waits too).
async fn forward_replies(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut flowing: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        if flowing.wait_for(|open| *open).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
