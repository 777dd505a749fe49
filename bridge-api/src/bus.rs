//! The NATS side of bridge-api: one client, and the few request shapes the routes need.
//!
//! bridge-api keeps no registry of its own. Every answer comes from the gateways over NATS at
//! request time, which is what lets any number of replicas run side by side. The one thing
//! remembered is which gateway instances announced themselves recently: a hint for when a
//! scatter request may stop waiting early, and for naming the instances that did not answer.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use async_nats::connection::State;
use async_nats::{Client, ConnectOptions, Event, HeaderMap, Message, StatusCode, Subscriber};
use bytes::Bytes;
use devgate_gateway::contract::{Announce, ControlError, GatewayStats, subjects};
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
        let instances = Arc::new(Instances::default());
        let on_event = instances.clone();
        let mut options = ConnectOptions::new()
            .name("devgate-bridge-api")
            .retry_on_initial_connect()
            .max_reconnects(None)
            .event_callback(move |event| {
                let tx = tx.clone();
                let instances = on_event.clone();
                async move {
                    match event {
                        Event::Connected => {
                            tracing::info!("connected to NATS");
                            // Announces reach us only from now on (the client connects in the
                            // background, and resubscribes after an outage): the instance set
                            // is incomplete again until every gateway has had time to announce.
                            instances.connected(Instant::now());
                            tx.send_replace(true);
                        }
                        Event::Disconnected | Event::Closed => {
                            tracing::warn!(%event, "NATS connection lost");
                            instances.disconnected();
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

    /// A control request on `device.<id>.down` (presence, kick) whose answer is `T`.
    ///
    /// A session that ends with such a request still queued answers it with the contract's
    /// ControlError `session_closed` rather than `T`: the device went offline while the question
    /// was on its way, a race every disconnect or takeover can produce, so it is an outcome of
    /// its own and not a reply outside the contract. Any other ControlError is one (502).
    pub async fn request_control<T: DeserializeOwned>(
        &self,
        subject: String,
        headers: HeaderMap,
        timeout: Duration,
    ) -> Result<ControlReply<T>, BusError> {
        let reply = self
            .request(subject, headers, Bytes::new(), timeout)
            .await?;
        parse_control_reply(&reply.payload)
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
    /// reports that nobody listens, or after `window`, whichever comes first. Announced instances
    /// that did not answer are returned too, because a list built from the answers alone looks
    /// complete when it is not.
    pub async fn gateway_stats(&self, window: Duration) -> Result<StatsScatter, BusError> {
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
        // Taken when the request has left: an instance first announced later may have missed it,
        // and must not be named as silent.
        let known = self.instances.known(Instant::now());
        // A complete known set allows an early stop; an incomplete or empty one means waiting
        // the window.
        let early_stop = known.complete && !known.announced.is_empty();
        let deadline = tokio::time::Instant::now() + window;
        let mut seen: BTreeMap<String, GatewayStats> = BTreeMap::new();
        while !(early_stop && known.announced.iter().all(|i| seen.contains_key(i))) {
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
        let silent: Vec<String> = known
            .announced
            .into_iter()
            .filter(|i| !seen.contains_key(i))
            .collect();
        if !silent.is_empty() {
            tracing::warn!(
                ?silent,
                "announced gateway instances did not answer the stats request"
            );
        }
        Ok(StatsScatter {
            answered: seen.into_values().collect(),
            silent,
        })
    }
}

/// The outcome of a [`Bus::gateway_stats`] scatter request.
#[derive(Debug, Clone, Default)]
pub struct StatsScatter {
    /// The answers, sorted by instance id.
    pub answered: Vec<GatewayStats>,
    /// Instances that announced themselves recently but did not answer within the window (hung,
    /// overloaded, cut off, or shut down less than a few announce periods ago), sorted. Their
    /// devices are unknown, so a caller must not present the answers as the whole fleet.
    pub silent: Vec<String>,
}

/// What a device's holder answered a control request with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlReply<T> {
    /// The answer the operation expects.
    Answered(T),
    /// The session ended before it handled the request (ControlError `session_closed`): the
    /// device is offline now, as if nobody had held it.
    SessionClosed,
}

/// The ControlError code of a request caught by a session as it ended.
const SESSION_CLOSED: &str = "session_closed";

/// Reads a control reply: the expected answer, or the one ControlError the contract gives a
/// request a session could no longer handle.
fn parse_control_reply<T: DeserializeOwned>(payload: &[u8]) -> Result<ControlReply<T>, BusError> {
    let expected = match serde_json::from_slice::<T>(payload) {
        Ok(answer) => return Ok(ControlReply::Answered(answer)),
        Err(e) => e,
    };
    match serde_json::from_slice::<ControlError>(payload) {
        Ok(e) if e.error == SESSION_CLOSED => Ok(ControlReply::SessionClosed),
        Ok(e) => Err(BusError::BadReply(format!(
            "control error {:?}: {}",
            e.error, e.message
        ))),
        Err(_) => Err(BusError::BadReply(expected.to_string())),
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
///
/// Methods take the current time as an argument so that the logic can be tested without
/// waiting for real time to pass.
#[derive(Default)]
struct Instances {
    state: Mutex<InstancesState>,
}

struct InstancesState {
    /// The latest (re)connection to NATS, `None` while not connected. Announces can only have
    /// reached us since then, so until every instance has had time to announce itself once
    /// after it, the set may miss some and must not cut a scatter request short. Counting from
    /// process start instead would trust the first instance heard after a late connection or an
    /// outage as the whole fleet.
    connected_since: Option<Instant>,
    expiry: HashMap<String, Instant>,
    /// Longest announce period seen, which bounds how long an unseen instance can stay unseen.
    max_heartbeat: Duration,
}

impl Default for InstancesState {
    fn default() -> Self {
        InstancesState {
            connected_since: None,
            expiry: HashMap::new(),
            max_heartbeat: DEFAULT_HEARTBEAT,
        }
    }
}

/// Announce period assumed before any announce was seen (the gateway's default).
const DEFAULT_HEARTBEAT: Duration = Duration::from_millis(1_000);

/// The instance set at one moment.
#[derive(Debug, PartialEq, Eq)]
struct Known {
    /// Instances whose last announce is recent enough.
    announced: BTreeSet<String>,
    /// Whether we have been connected long enough for every live instance to have announced
    /// itself, so that `announced` can be taken as all of them.
    complete: bool,
}

impl Instances {
    fn lock(&self) -> MutexGuard<'_, InstancesState> {
        // Every update leaves the state consistent, so a panic elsewhere cannot corrupt it.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The connection to NATS is (re)established at `now`: the announce clock starts again.
    ///
    /// Known instances are kept: each expires on its own after missing a few beats, and an
    /// announce that arrived on the resubscribed subscription before this event must not be
    /// lost.
    fn connected(&self, now: Instant) {
        self.lock().connected_since = Some(now);
    }

    /// The connection to NATS is lost: announces may be missed from now on.
    fn disconnected(&self) {
        self.lock().connected_since = None;
    }

    fn record(&self, announce: &Announce, now: Instant) {
        let beat = Duration::from_millis(announce.heartbeat_ms.max(1));
        let mut state = self.lock();
        if announce.stopped {
            // Its last word: it answers nothing more, so it is neither waited for nor named
            // unavailable.
            state.expiry.remove(&announce.instance);
            return;
        }
        state
            .expiry
            .insert(announce.instance.clone(), now + beat * MISSED_BEATS);
        state.max_heartbeat = state.max_heartbeat.max(beat);
    }

    /// Instances whose last announce is recent enough at `now`, forgetting the others.
    fn known(&self, now: Instant) -> Known {
        let mut state = self.lock();
        state.expiry.retain(|_, expires| *expires > now);
        let warm_up = state.max_heartbeat * 2;
        let complete = state
            .connected_since
            .is_some_and(|since| now.saturating_duration_since(since) >= warm_up);
        Known {
            announced: state.expiry.keys().cloned().collect(),
            complete,
        }
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
            Ok(announce) => instances.record(&announce, Instant::now()),
            Err(error) => tracing::debug!(%error, "ignoring unreadable announce"),
        }
    }
    let _ = announces.unsubscribe().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use devgate_gateway::contract::KickReply;

    #[test]
    fn control_replies_tell_session_closed_from_other_errors() {
        let kicked = br#"{"status":"kicked","gateway":"gw-1","session":"9b2f6c0e4d1a7735"}"#;
        assert!(matches!(
            parse_control_reply::<KickReply>(kicked),
            Ok(ControlReply::Answered(KickReply { status, .. })) if status == "kicked"
        ));
        let closed = br#"{"error":"session_closed","message":"the device is offline"}"#;
        assert!(matches!(
            parse_control_reply::<KickReply>(closed),
            Ok(ControlReply::SessionClosed)
        ));
        let other = br#"{"error":"bad_request","message":"no"}"#;
        assert!(matches!(
            parse_control_reply::<KickReply>(other),
            Err(BusError::BadReply(why)) if why.contains("bad_request")
        ));
        assert!(matches!(
            parse_control_reply::<KickReply>(b"not json"),
            Err(BusError::BadReply(_))
        ));
    }

    fn announce(instance: &str, heartbeat_ms: u64) -> Announce {
        Announce {
            instance: instance.into(),
            advertise_addr: "127.0.0.1:1".into(),
            ready: true,
            draining: false,
            sessions: 0,
            heartbeat_ms,
            started_ms: 0,
            stopped: false,
            seq: 0,
            conn: 0,
            conn_seq: 0,
        }
    }

    fn names(known: &Known) -> Vec<&str> {
        known.announced.iter().map(String::as_str).collect()
    }

    #[test]
    fn the_instance_set_is_trusted_only_after_two_heartbeats_of_connection() {
        let t0 = Instant::now();
        let instances = Instances::default();
        instances.connected(t0);
        instances.record(&announce("gw-1", 10), t0);
        let known = instances.known(t0 + Duration::from_millis(5));
        assert_eq!(names(&known), ["gw-1"]);
        assert!(
            !known.complete,
            "another instance may not have announced yet"
        );

        let t1 = t0 + Duration::from_secs(5);
        instances.record(&announce("gw-1", 10), t1);
        instances.record(&announce("gw-2", 1_000), t1);
        let known = instances.known(t1);
        assert!(known.complete, "connected long enough");
        assert_eq!(names(&known), ["gw-1", "gw-2"]);
        let known = instances.known(t1 + Duration::from_millis(40));
        assert_eq!(names(&known), ["gw-2"], "gw-1 missed three beats");
        assert!(known.complete);
    }

    #[test]
    fn a_stopped_instance_is_forgotten_at_once() {
        let t0 = Instant::now();
        let instances = Instances::default();
        instances.connected(t0);
        instances.record(&announce("gw-1", 1_000), t0);
        instances.record(&announce("gw-2", 1_000), t0);
        let last = Announce {
            stopped: true,
            draining: true,
            ..announce("gw-1", 1_000)
        };
        instances.record(&last, t0 + Duration::from_millis(10));
        let known = instances.known(t0 + Duration::from_millis(20));
        assert_eq!(
            names(&known),
            ["gw-2"],
            "not waited for, not named unavailable"
        );
    }

    #[test]
    fn nothing_is_trusted_before_the_first_connection() {
        let t0 = Instant::now();
        let instances = Instances::default();
        instances.record(&announce("gw-1", 10), t0 + Duration::from_secs(5));
        assert!(!instances.known(t0 + Duration::from_secs(6)).complete);
    }

    #[test]
    fn a_late_connection_or_a_reconnection_starts_the_announce_clock_again() {
        let t0 = Instant::now();
        let instances = Instances::default();
        // NATS becomes reachable long after the process started: the first instance heard is
        // not the whole fleet.
        let connected = t0 + Duration::from_secs(10);
        instances.connected(connected);
        instances.record(&announce("gw-1", 1_000), connected);
        let known = instances.known(connected + Duration::from_millis(100));
        assert!(!known.complete, "gw-2 may announce up to a beat later");
        assert!(
            instances
                .known(connected + Duration::from_millis(2_000))
                .complete
        );

        // An outage: nothing is trusted while it lasts, nor for two beats after it.
        let lost = connected + Duration::from_secs(5);
        instances.record(&announce("gw-1", 1_000), lost);
        instances.disconnected();
        assert!(!instances.known(lost + Duration::from_millis(500)).complete);
        let back = lost + Duration::from_secs(10);
        instances.connected(back);
        instances.record(&announce("gw-2", 1_000), back);
        let known = instances.known(back + Duration::from_millis(100));
        assert_eq!(names(&known), ["gw-2"], "gw-1 expired during the outage");
        assert!(!known.complete, "gw-1 may still announce");
        let known = instances.known(back + Duration::from_millis(2_000));
        assert!(known.complete);
    }

    #[test]
    fn an_announce_received_just_before_the_connected_event_is_kept() {
        let t0 = Instant::now();
        let instances = Instances::default();
        instances.record(&announce("gw-1", 1_000), t0);
        instances.connected(t0 + Duration::from_millis(1));
        assert_eq!(
            names(&instances.known(t0 + Duration::from_millis(2))),
            ["gw-1"]
        );
    }
}
