//! The NATS side of bridge-api: one client, and the few request shapes the routes need.
//!
//! bridge-api keeps no registry of its own. Every answer comes from the gateways over NATS at
//! request time, which is what lets any number of replicas run side by side. The one thing
//! remembered is which gateway instances announced themselves recently, and only as a hint for
//! when a scatter request may stop waiting early.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::connection::State;
use async_nats::{Client, ConnectOptions, Event, HeaderMap, Message, StatusCode, Subscriber};
use bytes::Bytes;
use devgate_gateway::contract::{Announce, GatewayStats, subjects};
use futures::StreamExt;
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// How many missed heartbeats make an announced instance count as gone.
const MISSED_BEATS: u32 = 3;

/// Why a NATS operation did not produce an answer. Routes turn these into HTTP errors, because
/// what "no responders" means depends on the question (offline device vs. vanished instance).
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// Not connected to NATS when the operation started.
    #[error("not connected to NATS")]
    Unavailable,
    /// The connection dropped while waiting for the answer: the request may or may not have
    /// reached its target.
    #[error("the NATS connection was lost mid-request; the outcome is unknown")]
    LostMidRequest,
    /// Nobody subscribes to the subject.
    #[error("no responders")]
    NoResponders,
    /// Nobody answered in time.
    #[error("no answer within {0} ms")]
    TimedOut(u64),
    /// The answer is not the expected JSON.
    #[error("unreadable reply: {0}")]
    BadReply(String),
    /// The message exceeds the NATS server's `max_payload`.
    #[error("message exceeds the NATS server's max_payload")]
    TooLarge,
    /// Any other client error.
    #[error("NATS error: {0}")]
    Other(String),
}

/// The shared NATS connection and what bridge-api knows about it.
#[derive(Clone)]
pub struct Bus {
    client: Client,
    connected: watch::Receiver<bool>,
    instances: Arc<Instances>,
}

impl Bus {
    /// Connects to NATS. Start-up does not wait for the server: the client keeps retrying in the
    /// background, `/readyz` says "not ready" and requests answer 503 until it is connected. An
    /// announce listener runs until `shutdown`.
    pub async fn connect(config: &Config, shutdown: CancellationToken) -> Result<Bus, BusError> {
        devgate_gateway::bus::tls::ensure_crypto_provider();
        let (tx, connected) = watch::channel(false);
        let tx = Arc::new(tx);
        let mut options = ConnectOptions::new()
            .name("devgate-bridge-api")
            .retry_on_initial_connect()
            .max_reconnects(None)
            .event_callback(move |event| {
                let tx = tx.clone();
                async move {
                    match event {
                        Event::Connected => {
                            tracing::info!("connected to NATS");
                            tx.send_replace(true);
                        }
                        Event::Disconnected | Event::Closed => {
                            tracing::warn!(%event, "NATS connection lost");
                            tx.send_replace(false);
                        }
                        other => tracing::info!(event = %other, "NATS event"),
                    }
                }
            });
        if let (Some(user), Some(password)) = (&config.nats_user, &config.nats_password) {
            options = options.user_and_password(user.clone(), password.expose().to_owned());
        }
        if let Some(tls) = devgate_gateway::bus::tls::NatsTlsSettings::nats_tls(config) {
            options = tls.apply(options);
        }
        let client = options
            .connect(config.nats_url.as_str())
            .await
            .map_err(|e| BusError::Other(e.to_string()))?;
        let instances = Arc::new(Instances::default());
        let announces = client
            .subscribe(subjects::ANNOUNCE)
            .await
            .map_err(|e| BusError::Other(e.to_string()))?;
        tokio::spawn(track_announces(announces, instances.clone(), shutdown));
        Ok(Bus {
            client,
            connected,
            instances,
        })
    }

    /// Whether the client is connected right now (for `/readyz` and pre-send checks).
    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == State::Connected
    }

    /// Fails fast with [`BusError::Unavailable`] instead of letting the client buffer a message
    /// that may never leave.
    pub fn ensure_connected(&self) -> Result<(), BusError> {
        if self.is_connected() {
            Ok(())
        } else {
            Err(BusError::Unavailable)
        }
    }

    /// Resolves when the connection drops after this call (not if it is already down).
    fn connection_lost(&self) -> impl Future<Output = ()> + use<> {
        let mut rx = self.connected.clone();
        rx.mark_unchanged();
        async move {
            loop {
                if rx.changed().await.is_err() {
                    // The client is gone; nothing will ever be lost again.
                    return futures::future::pending().await;
                }
                if !*rx.borrow_and_update() {
                    return;
                }
            }
        }
    }

    /// Sends a request and waits up to `timeout` for the reply, failing fast when NATS is not
    /// connected or the connection drops mid-request.
    pub async fn request(
        &self,
        subject: String,
        headers: HeaderMap,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Message, BusError> {
        self.ensure_connected()?;
        let lost = self.connection_lost();
        let request = async_nats::Request::new()
            .headers(headers)
            .payload(payload)
            .timeout(Some(timeout));
        tokio::select! {
            reply = self.client.send_request(subject, request) => {
                reply.map_err(|e| map_request_error(&e, timeout))
            }
            () = lost => Err(BusError::LostMidRequest),
        }
    }

    /// [`Bus::request`] with a JSON answer.
    pub async fn request_json<T: DeserializeOwned>(
        &self,
        subject: String,
        headers: HeaderMap,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<T, BusError> {
        let reply = self.request(subject, headers, payload, timeout).await?;
        serde_json::from_slice(&reply.payload).map_err(|e| BusError::BadReply(e.to_string()))
    }

    /// Publishes without waiting for any answer, then flushes so the message has left this
    /// process before the caller is told `202`.
    pub async fn publish(
        &self,
        subject: String,
        headers: HeaderMap,
        payload: Bytes,
    ) -> Result<(), BusError> {
        self.ensure_connected()?;
        self.client
            .publish_with_headers(subject, headers, payload)
            .await
            .map_err(|e| match e.kind() {
                async_nats::client::PublishErrorKind::MaxPayloadExceeded => BusError::TooLarge,
                _ => BusError::Other(e.to_string()),
            })
    }

    /// Flushes published messages to the server, waiting at most `timeout`.
    pub async fn flush(&self, timeout: Duration) -> Result<(), BusError> {
        let lost = self.connection_lost();
        tokio::select! {
            r = tokio::time::timeout(timeout, self.client.flush()) => match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(BusError::Other(e.to_string())),
                Err(_) => Err(BusError::TimedOut(timeout.as_millis() as u64)),
            },
            () = lost => Err(BusError::LostMidRequest),
        }
    }

    /// Subscribes to `subject` (for the SSE tail).
    pub async fn subscribe(&self, subject: String) -> Result<Subscriber, BusError> {
        self.ensure_connected()?;
        self.client
            .subscribe(subject)
            .await
            .map_err(|e| BusError::Other(e.to_string()))
    }

    /// Waits until the NATS server has processed everything this client sent before (a
    /// subscription in particular), using the contract's barrier subject: the server itself
    /// answers "no responders" there, after the earlier commands.
    pub async fn barrier(&self, timeout: Duration) -> Result<(), BusError> {
        match self
            .request(
                subjects::barrier("bridge-api"),
                HeaderMap::new(),
                Bytes::new(),
                timeout,
            )
            .await
        {
            Ok(_) | Err(BusError::NoResponders) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Asks every gateway instance for its [`GatewayStats`] (scatter request on
    /// `devgate.gateways.stats`) and gathers the answers, sorted by instance id.
    ///
    /// Collection stops as soon as every recently announced instance has answered, when NATS
    /// reports that nobody listens, or after `window`, whichever comes first.
    pub async fn gateway_stats(&self, window: Duration) -> Result<Vec<GatewayStats>, BusError> {
        self.ensure_connected()?;
        let lost = self.connection_lost();
        tokio::pin!(lost);
        let inbox = self.client.new_inbox();
        let mut replies = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| BusError::Other(e.to_string()))?;
        self.client
            .publish_with_reply(subjects::STATS, inbox, Bytes::new())
            .await
            .map_err(|e| BusError::Other(e.to_string()))?;
        // Known instances allow an early stop; an unknown or empty set means waiting the window.
        let expected = self.instances.live().filter(|e| !e.is_empty());
        let deadline = tokio::time::Instant::now() + window;
        let mut seen: BTreeMap<String, GatewayStats> = BTreeMap::new();
        while !expected
            .as_ref()
            .is_some_and(|e| e.iter().all(|i| seen.contains_key(i)))
        {
            let next = tokio::select! {
                next = tokio::time::timeout_at(deadline, replies.next()) => next,
                () = &mut lost => return Err(BusError::LostMidRequest),
            };
            let message = match next {
                Ok(Some(m)) => m,
                Ok(None) | Err(_) => break,
            };
            if message.status == Some(StatusCode::NO_RESPONDERS) {
                break;
            }
            match serde_json::from_slice::<GatewayStats>(&message.payload) {
                Ok(stats) => {
                    seen.insert(stats.instance.clone(), stats);
                }
                Err(error) => tracing::warn!(%error, "ignoring unreadable gateway stats reply"),
            }
        }
        let _ = replies.unsubscribe().await;
        Ok(seen.into_values().collect())
    }
}

fn map_request_error(e: &async_nats::RequestError, timeout: Duration) -> BusError {
    use async_nats::RequestErrorKind as K;
    match e.kind() {
        K::NoResponders => BusError::NoResponders,
        K::TimedOut => BusError::TimedOut(timeout.as_millis() as u64),
        K::MaxPayloadExceeded => BusError::TooLarge,
        K::InvalidSubject | K::Other => BusError::Other(e.to_string()),
    }
}

/// Instances seen on `devgate.gateway.announce`, each with the time it expires.
struct Instances {
    /// When listening started: until every instance has had time to announce itself once, the
    /// set is incomplete and must not cut a scatter request short.
    started: Instant,
    state: Mutex<InstancesState>,
}

#[derive(Default)]
struct InstancesState {
    expiry: HashMap<String, Instant>,
    /// Longest announce period seen, which bounds how long an unseen instance can stay unseen.
    max_heartbeat: Duration,
}

/// Announce period assumed before any announce was seen (the gateway's default).
const DEFAULT_HEARTBEAT: Duration = Duration::from_millis(1_000);

impl Default for Instances {
    fn default() -> Self {
        Instances {
            started: Instant::now(),
            state: Mutex::new(InstancesState {
                expiry: HashMap::new(),
                max_heartbeat: DEFAULT_HEARTBEAT,
            }),
        }
    }
}

impl Instances {
    fn record(&self, announce: &Announce) {
        let beat = Duration::from_millis(announce.heartbeat_ms.max(1));
        if let Ok(mut state) = self.state.lock() {
            state.expiry.insert(
                announce.instance.clone(),
                Instant::now() + beat * MISSED_BEATS,
            );
            state.max_heartbeat = state.max_heartbeat.max(beat);
        }
    }

    /// Instances whose last announce is recent enough, forgetting the others; `None` while
    /// listening has not lasted long enough for every live instance to have announced itself.
    fn live(&self) -> Option<HashSet<String>> {
        let now = Instant::now();
        let mut state = self.state.lock().ok()?;
        if now.duration_since(self.started) < state.max_heartbeat * 2 {
            return None;
        }
        state.expiry.retain(|_, expires| *expires > now);
        Some(state.expiry.keys().cloned().collect())
    }
}

async fn track_announces(
    mut announces: Subscriber,
    instances: Arc<Instances>,
    shutdown: CancellationToken,
) {
    loop {
        let message = tokio::select! {
            m = announces.next() => m,
            () = shutdown.cancelled() => break,
        };
        let Some(message) = message else { break };
        match serde_json::from_slice::<Announce>(&message.payload) {
            Ok(announce) => instances.record(&announce),
            Err(error) => tracing::debug!(%error, "ignoring unreadable announce"),
        }
    }
    let _ = announces.unsubscribe().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn announce(instance: &str, heartbeat_ms: u64) -> Announce {
        Announce {
            instance: instance.into(),
            advertise_addr: "127.0.0.1:1".into(),
            ready: true,
            draining: false,
            sessions: 0,
            heartbeat_ms,
            started_ms: 0,
        }
    }

    #[test]
    fn the_instance_set_is_trusted_only_after_two_heartbeats_of_listening() {
        let fresh = Instances::default();
        fresh.record(&announce("gw-1", 10));
        assert_eq!(
            fresh.live(),
            None,
            "another instance may not have announced yet"
        );

        let warm = Instances {
            started: Instant::now() - Duration::from_secs(5),
            ..Instances::default()
        };
        warm.record(&announce("gw-1", 10));
        warm.record(&announce("gw-2", 1_000));
        let live = warm.live().expect("listened long enough");
        assert_eq!(live.len(), 2);
        std::thread::sleep(Duration::from_millis(40));
        let live = warm.live().expect("still warm");
        assert!(!live.contains("gw-1"), "gw-1 missed three beats");
        assert!(live.contains("gw-2"));
    }
}
