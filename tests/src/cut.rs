//! A TCP forwarder on loopback that a test can cut and restore: one component loses its
//! connection to a real server (a gateway's link to nats-server, say) while every other
//! component keeps its own, which a server restart cannot do.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::net::{TcpListener, TcpStream};
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
        let task = tokio::spawn(accept(listener, upstream, state.clone()));
        CuttableLink { addr, state, task }
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
}

impl Drop for CuttableLink {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

async fn accept(listener: TcpListener, upstream: SocketAddr, state: Arc<Mutex<State>>) {
    while let Ok((client, _)) = listener.accept().await {
        let period = {
            let st = lock(&state);
            st.open.then(|| st.period.clone())
        };
        // Cut: dropping the accepted socket closes it, as a broken path would.
        if let Some(period) = period {
            tokio::spawn(forward(client, upstream, period));
        }
    }
}

async fn forward(mut client: TcpStream, upstream: SocketAddr, period: CancellationToken) {
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return;
    };
    tokio::select! {
        () = period.cancelled() => {}
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
    }
}
