//! The gateway's NATS connection: connection state for readiness and backpressure, and proof
//! that uplink messages were accepted before devices are told so.
//!
//! Core NATS has no publish acknowledgement, and async-nats's `flush()` only means "written to
//! the socket". To ACK an UP honestly the gateway sends a request to a subject nobody
//! subscribes ([`subjects::barrier`]): the server answers "no responders" only after it has
//! processed everything this connection sent before. One such round trip confirms a whole batch
//! of UPs from all sessions. If the connection was re-established in between (the reconnect
//! counter moved), bytes may have died in the old socket, so that batch is reported unconfirmed
//! and the devices resend.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::{Client, ConnectOptions, Event};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::contract::subjects;
use crate::metrics::Metrics;

/// Most uplink confirmations waiting for the next barrier. Senders wait when it is full, which
/// slows the sessions' reading: backpressure instead of unbounded memory.
const CONFIRM_QUEUE: usize = 64 * 1024;

/// How long one barrier round trip may take before its batch counts as unconfirmed.
const BARRIER_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the NATS connection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// Bad URL or options (a reachable-but-down server is not an error: the gateway starts
    /// unready and keeps retrying).
    #[error("cannot configure the NATS connection to {url}: {source}")]
    Connect {
        /// The configured URL.
        url: String,
        /// The client's error.
        source: async_nats::ConnectError,
    },
}

struct Waiter {
    epoch: u64,
    done: oneshot::Sender<bool>,
}

/// The gateway's handle on NATS, cheap to clone.
#[derive(Clone)]
pub struct Bus {
    client: Client,
    connected: watch::Receiver<bool>,
    confirm_tx: mpsc::Sender<Waiter>,
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
        let (state_tx, connected) = watch::channel(false);
        let state_tx = Arc::new(state_tx);
        let events_metrics = metrics.clone();
        let mut options = ConnectOptions::new()
            .name(format!("devgate-gateway {instance}"))
            // A gateway never needs its own messages back, and without echo a takeover claim
            // sent by this gateway only reaches *other* gateways (local takeovers are settled in
            // the local registry).
            .no_echo()
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(2))
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis((100 * attempts as u64).min(2_000))
            })
            .event_callback(move |event| {
                let state_tx = state_tx.clone();
                let metrics = events_metrics.clone();
                async move {
                    match event {
                        Event::Connected => {
                            state_tx.send_replace(true);
                            metrics.nats_connected.set(1);
                            tracing::info!("NATS connected");
                        }
                        Event::Disconnected => {
                            state_tx.send_replace(false);
                            metrics.nats_connected.set(0);
                            metrics.nats_disconnects.inc();
                            tracing::warn!(
                                "NATS disconnected: sessions kept, uplink paused, resubscribing on reconnect"
                            );
                        }
                        Event::SlowConsumer(sid) => {
                            metrics.nats_slow_consumers.inc();
                            tracing::warn!(sid, "NATS client dropped a message for a slow session");
                        }
                        other => tracing::info!(event = %other, "NATS event"),
                    }
                }
            });
        if let (Some(user), Some(password)) = (&config.nats_user, &config.nats_password) {
            options = options.user_and_password(user.clone(), password.expose().to_owned());
        }
        let client = options
            .connect(config.nats_url.as_str())
            .await
            .map_err(|source| BusError::Connect {
                url: config.nats_url.clone(),
                source,
            })?;

        let (confirm_tx, confirm_rx) = mpsc::channel(CONFIRM_QUEUE);
        tokio::spawn(run_confirmer(
            client.clone(),
            subjects::barrier(instance),
            confirm_rx,
            shutdown,
        ));
        Ok(Bus {
            client,
            connected,
            confirm_tx,
        })
    }

    /// The underlying client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Whether the connection is up right now.
    pub fn is_connected(&self) -> bool {
        *self.connected.borrow()
    }

    /// A receiver that changes whenever the connection goes up or down.
    pub fn connected_watch(&self) -> watch::Receiver<bool> {
        self.connected.clone()
    }

    /// The connection generation: read it *before* publishing something that must be confirmed.
    pub fn epoch(&self) -> u64 {
        self.client.statistics().connects.load(Ordering::Acquire)
    }

    /// After publishing (with `epoch` read before the publish), resolves to `true` once NATS has
    /// provably accepted the message, `false` if that cannot be proven.
    pub async fn confirm(&self, epoch: u64) -> oneshot::Receiver<bool> {
        let (done, rx) = oneshot::channel();
        // If the confirmer is gone (shutdown), `done` is dropped and the receiver reports an
        // error, which callers treat as unconfirmed.
        let _ = self.confirm_tx.send(Waiter { epoch, done }).await;
        rx
    }
}

async fn run_confirmer(
    client: Client,
    barrier: String,
    mut rx: mpsc::Receiver<Waiter>,
    shutdown: CancellationToken,
) {
    let mut batch = Vec::new();
    loop {
        let first = tokio::select! {
            w = rx.recv() => match w { Some(w) => w, None => return },
            () = shutdown.cancelled() => return,
        };
        batch.push(first);
        while batch.len() < 4096 {
            match rx.try_recv() {
                Ok(w) => batch.push(w),
                Err(_) => break,
            }
        }
        let accepted = match tokio::time::timeout(
            BARRIER_TIMEOUT,
            client.request(barrier.clone(), bytes::Bytes::new()),
        )
        .await
        {
            Ok(Ok(_)) => true,
            Ok(Err(e)) => e.kind() == async_nats::RequestErrorKind::NoResponders,
            Err(_elapsed) => false,
        };
        let epoch_now = client.statistics().connects.load(Ordering::Acquire);
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
