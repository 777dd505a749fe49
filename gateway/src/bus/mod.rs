//! The gateway's NATS connection: connection state for readiness and backpressure, and proof
//! that uplink messages were accepted before devices are told so.
//!
//! The connection itself is [`link`], a NATS client built for one subscription per device
//! ([`wire`] is its protocol codec). Core NATS has no publish acknowledgement, so to ACK an UP
//! honestly the gateway sends a `PING` after it: the server answers with `PONG` only after it
//! has processed everything the connection sent before. One such round trip confirms a whole
//! batch of UPs from all sessions. If the connection was re-established in between (the epoch
//! moved), bytes may have died in the old socket, so that batch is reported unconfirmed and
//! the devices resend. So is a batch during which the server refused a publish to an uplink
//! subject (a permission `-ERR`, after which the connection stays open): the epoch moves for
//! that too. Refused replies do not move it (see `link::Link::confirm_epoch`).

pub mod link;
pub mod tls;
pub mod wire;

use std::time::Duration;

use std::sync::Arc;

use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;

pub use link::{Link, LinkError, RequestError, Subscription};
pub use wire::{Headers, Msg};

use crate::config::Config;
use crate::metrics::Metrics;

/// Most confirmations one `PING` settles.
const CONFIRM_BATCH: usize = 4096;

/// How long one barrier round trip may take before its batch counts as unconfirmed.
const BARRIER_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the NATS connection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// Unusable server list (a reachable-but-down server is not an error: the gateway starts
    /// unready and keeps retrying).
    #[error("cannot configure the NATS connection: {0}")]
    Address(#[from] link::AddressError),
    /// Unusable TLS files.
    #[error("cannot configure TLS to NATS: {0}")]
    Tls(#[from] tls::TlsError),
}

struct Waiter {
    epoch: u64,
    done: oneshot::Sender<bool>,
}

/// Uplink messages waiting for the next barrier. Not a bounded channel: every session keeps
/// at most `max_inflight` UPs unconfirmed (it stops reading its device beyond that), which
/// bounds this list, and registering must not make a session task wait.
#[derive(Default)]
struct Pending {
    waiters: std::sync::Mutex<Vec<Waiter>>,
    arrived: tokio::sync::Notify,
}

/// The gateway's handle on NATS, cheap to clone.
#[derive(Clone)]
pub struct Bus {
    link: Link,
    pending: Arc<Pending>,
}

impl Bus {
    /// Connects to NATS (retrying in the background if it is down) and starts the uplink
    /// confirmer, which stops with `shutdown`.
    pub async fn connect(
        config: &Config,
        instance: &str,
        metrics: Metrics,
        shutdown: CancellationToken,
    ) -> Result<Bus, BusError> {
        let options = link::LinkOptions {
            servers: link::parse_servers(&config.nats_url)?,
            name: format!("devgate-gateway {instance}"),
            user: config.nats_user.clone().zip(config.nats_password.clone()),
            tls: tls::NatsTlsSettings::nats_tls(config)
                .map(|files| tls::client_config(&files))
                .transpose()?,
        };
        let link = Link::start(options, metrics);
        let pending = Arc::new(Pending::default());
        tokio::spawn(run_confirmer(link.clone(), pending.clone(), shutdown));
        Ok(Bus { link, pending })
    }

    /// The connection.
    pub fn link(&self) -> &Link {
        &self.link
    }

    /// Whether the connection is up right now.
    pub fn is_connected(&self) -> bool {
        self.link.is_connected()
    }

    /// A receiver that changes whenever the connection goes up or down.
    pub fn connected_watch(&self) -> watch::Receiver<bool> {
        self.link.connected_watch()
    }

    /// The confirmation generation ([`Link::confirm_epoch`]): read it *before* publishing
    /// something that must be confirmed.
    pub fn epoch(&self) -> u64 {
        self.link.confirm_epoch()
    }

    /// After publishing (with `epoch` read before the publish), resolves to `true` once NATS has
    /// provably accepted the message, `false` if that cannot be proven.
    pub fn confirm(&self, epoch: u64) -> oneshot::Receiver<bool> {
        let (done, rx) = oneshot::channel();
        // If the confirmer is gone (shutdown), `done` is dropped and the receiver reports an
        // error, which callers treat as unconfirmed.
        lock(&self.pending.waiters).push(Waiter { epoch, done });
        self.pending.arrived.notify_one();
        rx
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn run_confirmer(link: Link, pending: Arc<Pending>, shutdown: CancellationToken) {
    let mut batch = Vec::new();
    loop {
        {
            let mut waiters = lock(&pending.waiters);
            let take = waiters.len().min(CONFIRM_BATCH);
            batch.extend(waiters.drain(..take));
        }
        if batch.is_empty() {
            tokio::select! {
                () = pending.arrived.notified() => continue,
                () = shutdown.cancelled() => return,
            }
        }
        // The epoch is read before the PING: a PONG proves only what this connection sent, and
        // only if no publish was refused since each waiter read its epoch (a refusal arrives
        // before the PONG that follows the publish).
        let epoch_now = link.confirm_epoch();
        let accepted =
            link.flush(BARRIER_TIMEOUT).await.is_ok() && link.confirm_epoch() == epoch_now;
        if !accepted {
            tracing::warn!(
                batch = batch.len(),
                "NATS did not confirm a batch of uplink messages; devices will resend"
            );
        }
        for w in batch.drain(..) {
            let _ = w.done.send(accepted && w.epoch == epoch_now);
        }
    }
}
