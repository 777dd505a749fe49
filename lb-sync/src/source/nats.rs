//! The NATS source: gateway instances announce themselves on
//! [`devgate_gateway::contract::subjects::ANNOUNCE`] every heartbeat and on readiness changes.
//!
//! An instance is present while its announcements keep arriving and leaves after
//! `expiry_beats` missed heartbeats; it is in rotation only while it says `ready` and not
//! `draining`. Because NATS has no "list", completeness comes from time: after (re)connecting,
//! the roster is rebuilt from scratch and no snapshot is sent until a full heartbeat window has
//! passed, in which every live instance has announced itself at least once. A roster with no
//! instance in rotation waits longer (see [`Roster::is_complete`]), since publishing it refuses
//! every device.

use std::collections::HashMap;
use std::time::Duration;

use devgate_gateway::common::Secret;
use devgate_gateway::contract::{Announce, subjects};
use futures::StreamExt;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{SnapshotTx, publish};
use crate::endpoints::{Endpoint, EndpointState, parse_addr};
use crate::metrics::Metrics;

/// Announced heartbeats are clamped to this range, so one odd announcement can neither expire
/// instances at once nor keep a dead one for hours. The assumed longest heartbeat
/// (`announce_interval_max_ms`) is validated against it too.
pub const HEARTBEAT_RANGE: (Duration, Duration) =
    (Duration::from_millis(50), Duration::from_secs(60));

/// How often expiry and the learning window are checked.
const TICK: Duration = Duration::from_millis(50);

/// Why the NATS source could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    /// The URL or options were refused by the client.
    #[error("NATS {url}: {source}")]
    Connect {
        /// The configured URL.
        url: String,
        /// The client's error.
        source: async_nats::ConnectError,
    },
    /// The subscription could not be created.
    #[error("subscribing to {subject}: {source}")]
    Subscribe {
        /// The announce subject.
        subject: &'static str,
        /// The client's error.
        source: async_nats::SubscribeError,
    },
}

/// What the source knows about one instance.
#[derive(Debug, Clone)]
struct Seen {
    /// `None` when the announced address is unusable (host name, 0.0.0.0): the instance is
    /// known but can never be in rotation.
    endpoint: Option<Endpoint>,
    heartbeat: Duration,
    last_seen: Instant,
}

/// The set of announced instances and whether it is complete. Pure: every method takes `now`,
/// so expiry and the learning window are unit-tested without a clock.
#[derive(Debug)]
pub struct Roster {
    instances: HashMap<String, Seen>,
    expiry_beats: u32,
    /// The configured assumption of the longest heartbeat of any gateway, before any is heard.
    assumed_heartbeat: Duration,
    /// Longest heartbeat ever announced, and at least `assumed_heartbeat`: the learning window
    /// after a (re)connect.
    max_heartbeat: Duration,
    /// `Some(since)` while connected: the roster is complete from `since + window` on.
    connected_since: Option<Instant>,
    /// Complete since the last (re)connect: it stays so, so that the last ready instance
    /// draining just after the learning window leaves at once instead of after the longer
    /// empty window.
    complete: bool,
}

impl Roster {
    /// An empty, disconnected roster, assuming no gateway announces less often than every
    /// `assumed_heartbeat` until one says it does.
    pub fn new(expiry_beats: u32, assumed_heartbeat: Duration) -> Self {
        let assumed_heartbeat = assumed_heartbeat.clamp(HEARTBEAT_RANGE.0, HEARTBEAT_RANGE.1);
        Roster {
            instances: HashMap::new(),
            expiry_beats: expiry_beats.max(1),
            assumed_heartbeat,
            max_heartbeat: assumed_heartbeat,
            connected_since: None,
            complete: false,
        }
    }

    /// The connection is (re)established: forget everything and start learning again, since any
    /// instance may have come or gone while we could not hear.
    pub fn connected(&mut self, now: Instant) {
        self.instances.clear();
        self.connected_since = Some(now);
        self.complete = false;
    }

    /// The connection is lost: nothing is complete until the next [`Roster::connected`].
    pub fn disconnected(&mut self) {
        self.connected_since = None;
        self.complete = false;
    }

    /// Whether the connection is up (complete or still learning).
    pub fn is_connected(&self) -> bool {
        self.connected_since.is_some()
    }

    /// How long after connecting the roster becomes complete: one full (longest) heartbeat plus
    /// a quarter for jitter.
    pub fn learning_window(&self) -> Duration {
        self.max_heartbeat + self.max_heartbeat / 4
    }

    /// How long after connecting a roster with no instance in rotation (nobody heard, or only
    /// unready, draining or unusable ones) becomes complete: `expiry_beats` of the longest
    /// heartbeat (at least the learning window). Publishing it replaces the whole upstream with
    /// the `down` placeholder and refuses every device, whereas an instance missing from a roster
    /// with others in rotation only joins a heartbeat later. So "nobody can take devices" is
    /// believed only after as long as lb-sync would take to expire a silent instance, which also
    /// covers gateways announcing up to `expiry_beats` times less often than assumed. The wait
    /// costs little: meanwhile there is nobody to route to anyway.
    pub fn empty_window(&self) -> Duration {
        (self.max_heartbeat * self.expiry_beats).max(self.learning_window())
    }

    /// Whether the roster may be published: connected for a full learning window, or for the
    /// longer [`Roster::empty_window`] while no instance heard is in rotation; once complete, it
    /// stays so until the connection changes.
    pub fn is_complete(&mut self, now: Instant) -> bool {
        if self.complete {
            return self.connected_since.is_some();
        }
        let in_rotation = self.instances.values().any(|s| {
            s.endpoint
                .as_ref()
                .is_some_and(|e| e.state == EndpointState::Ready)
        });
        let window = if in_rotation {
            self.learning_window()
        } else {
            self.empty_window()
        };
        self.complete = self
            .connected_since
            .is_some_and(|since| now >= since + window);
        self.complete
    }

    /// Whether `a` announces less often than assumed: then a (re)connect may publish a set
    /// without such instances (or an empty one) before they are heard, and
    /// `announce_interval_max_ms` should be raised.
    pub fn slower_than_assumed(&self, a: &Announce) -> bool {
        Duration::from_millis(a.heartbeat_ms) > self.assumed_heartbeat
    }

    /// Records an announcement. Returns the parse problem of its address, if any, the first
    /// time (or when it changes) so the caller can log it once rather than every heartbeat.
    pub fn observe(&mut self, a: &Announce, now: Instant) -> Option<String> {
        let heartbeat =
            Duration::from_millis(a.heartbeat_ms).clamp(HEARTBEAT_RANGE.0, HEARTBEAT_RANGE.1);
        self.max_heartbeat = self.max_heartbeat.max(heartbeat);
        let (endpoint, problem) = match parse_addr(&a.advertise_addr) {
            Ok(addr) => (
                Some(Endpoint {
                    addr,
                    state: EndpointState::from_announce(a.ready, a.draining),
                    weight: None,
                }),
                None,
            ),
            Err(e) => (None, Some(e.to_string())),
        };
        let previous = self.instances.insert(
            a.instance.clone(),
            Seen {
                endpoint,
                heartbeat,
                last_seen: now,
            },
        );
        let was_bad = previous.is_some_and(|p| p.endpoint.is_none());
        problem.filter(|_| !was_bad)
    }

    /// Drops instances silent for `expiry_beats` of their heartbeats; returns their ids.
    pub fn expire(&mut self, now: Instant) -> Vec<String> {
        let beats = self.expiry_beats;
        let expired: Vec<String> = self
            .instances
            .iter()
            .filter(|(_, s)| now.saturating_duration_since(s.last_seen) > s.heartbeat * beats)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &expired {
            self.instances.remove(id);
        }
        expired
    }

    /// Every known instance with a usable address, in any state.
    pub fn endpoints(&self) -> Vec<Endpoint> {
        self.instances
            .values()
            .filter_map(|s| s.endpoint.clone())
            .collect()
    }

    /// Number of known instances (usable address or not).
    pub fn len(&self) -> usize {
        self.instances.len()
    }

    /// No instance known.
    pub fn is_empty(&self) -> bool {
        self.instances.is_empty()
    }
}

/// Connection state reported by the client's event callback. The generation counts connects,
/// so a disconnect and reconnect between two looks is still seen as a reconnect.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Link {
    connected: bool,
    generation: u64,
}

/// A configured, connected-in-the-background NATS source.
pub struct NatsSource {
    /// Kept so the connection lives as long as the source.
    _client: async_nats::Client,
    subscriber: async_nats::Subscriber,
    link: watch::Receiver<Link>,
    expiry_beats: u32,
    assumed_heartbeat: Duration,
}

impl NatsSource {
    /// Creates the client (it keeps retrying the server in the background, from the first
    /// connect on) and subscribes to announcements.
    pub async fn connect(
        url: &str,
        user: Option<(&str, &Secret)>,
        tls: Option<&devgate_gateway::bus::tls::TlsFiles>,
        expiry_beats: u32,
        assumed_heartbeat: Duration,
    ) -> Result<Self, NatsError> {
        devgate_gateway::bus::tls::ensure_crypto_provider();
        let (link_tx, link) = watch::channel(Link::default());
        let mut options = async_nats::ConnectOptions::new()
            .name("devgate-lb-sync")
            .retry_on_initial_connect()
            .max_reconnects(None)
            .event_callback(move |event| {
                let link_tx = link_tx.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => link_tx.send_modify(|l| {
                            l.connected = true;
                            l.generation += 1;
                        }),
                        async_nats::Event::Disconnected | async_nats::Event::Closed => {
                            link_tx.send_modify(|l| l.connected = false)
                        }
                        _ => {}
                    }
                }
            });
        if let Some((user, password)) = user {
            options = options.user_and_password(user.to_owned(), password.expose().to_owned());
        }
        if let Some(tls) = tls {
            options = tls.apply(options);
        }
        let client = options
            .connect(url)
            .await
            .map_err(|source| NatsError::Connect {
                url: url.to_owned(),
                source,
            })?;
        let subscriber = client
            .subscribe(subjects::ANNOUNCE)
            .await
            .map_err(|source| NatsError::Subscribe {
                subject: subjects::ANNOUNCE,
                source,
            })?;
        Ok(NatsSource {
            _client: client,
            subscriber,
            link,
            expiry_beats,
            assumed_heartbeat,
        })
    }

    /// Follows announcements until `shutdown`, publishing the roster whenever it is complete
    /// and different from the last one sent.
    pub async fn run(mut self, tx: SnapshotTx, metrics: Metrics, shutdown: CancellationToken) {
        let mut roster = Roster::new(self.expiry_beats, self.assumed_heartbeat);
        let mut warned_slow = false;
        let mut seen_generation = 0;
        let mut last_sent = None;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                changed = self.link.changed() => {
                    if changed.is_err() {
                        // The client (and its callback) is gone; only shutdown is left.
                        shutdown.cancelled().await;
                        break;
                    }
                }
                msg = self.subscriber.next() => match msg {
                    Some(msg) => match serde_json::from_slice::<Announce>(&msg.payload) {
                        Ok(a) => {
                            if let Some(problem) = roster.observe(&a, Instant::now()) {
                                tracing::warn!(instance = %a.instance, advertise_addr = %a.advertise_addr, %problem, "instance announces an unusable address; it stays out of rotation");
                            }
                            if !warned_slow && roster.slower_than_assumed(&a) {
                                warned_slow = true;
                                tracing::warn!(
                                    instance = %a.instance,
                                    heartbeat_ms = a.heartbeat_ms,
                                    assumed_ms = self.assumed_heartbeat.as_millis() as u64,
                                    "instance announces less often than --announce-interval-max-ms; raise it, or a restart of lb-sync may publish an upstream without such instances"
                                );
                            }
                        }
                        Err(error) => {
                            metrics.failed("source");
                            tracing::warn!(%error, "ignoring malformed announcement");
                        }
                    },
                    None => {
                        tracing::error!("announce subscription ended; no further updates until restart");
                        metrics.source_connected.set(0);
                        shutdown.cancelled().await;
                        break;
                    }
                },
                _ = tick.tick() => {}
            }
            let now = Instant::now();
            let link = *self.link.borrow();
            if link.connected && link.generation != seen_generation {
                seen_generation = link.generation;
                roster.connected(now);
                metrics.source_connected.set(1);
                tracing::info!(
                    window_ms = roster.learning_window().as_millis() as u64,
                    empty_window_ms = roster.empty_window().as_millis() as u64,
                    "connected to NATS; learning instances"
                );
            } else if !link.connected && roster.is_connected() {
                roster.disconnected();
                metrics.source_connected.set(0);
                tracing::warn!(
                    "lost NATS; keeping the applied upstream until instances are re-learned"
                );
            }
            for instance in roster.expire(now) {
                tracing::info!(instance = %instance, "instance stopped announcing; dropping it");
            }
            if roster.is_complete(now) {
                publish(&tx, &mut last_sent, roster.endpoints(), &metrics);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default `announce_interval_max_ms`.
    const ASSUMED: Duration = Duration::from_millis(1000);

    fn announce(instance: &str, addr: &str, ready: bool, draining: bool) -> Announce {
        Announce {
            instance: instance.into(),
            advertise_addr: addr.into(),
            ready,
            draining,
            sessions: 0,
            heartbeat_ms: 1000,
            started_ms: 1,
            stopped: false,
            seq: 0,
            conn: 0,
            conn_seq: 0,
        }
    }

    #[test]
    fn nothing_is_complete_before_a_full_heartbeat_window() {
        let t0 = Instant::now();
        let mut r = Roster::new(3, ASSUMED);
        assert!(!r.is_complete(t0), "not connected yet");
        r.connected(t0);
        r.observe(&announce("a", "10.0.0.1:7000", true, false), t0);
        assert!(!r.is_complete(t0 + Duration::from_millis(900)));
        assert!(r.is_complete(t0 + Duration::from_millis(1250)));
    }

    #[test]
    fn an_empty_roster_is_not_complete_until_every_instance_could_have_announced() {
        let t0 = Instant::now();
        let mut r = Roster::new(3, ASSUMED);
        r.connected(t0);
        // Nobody heard after the 1.25 s learning window: gateways announcing every 5 s (or a
        // slow NATS) look exactly like this, and publishing now would refuse every device.
        assert!(!r.is_complete(t0 + Duration::from_millis(1300)));
        assert!(!r.is_complete(t0 + Duration::from_millis(2999)));
        // After expiry_beats x the assumed heartbeat, an empty set is believed.
        assert!(r.is_complete(t0 + Duration::from_secs(3)));
        assert!(r.endpoints().is_empty());

        // Heard instances that cannot take devices do not make the set any less empty.
        r.connected(t0);
        r.observe(&announce("a", "10.0.0.1:7000", false, false), t0);
        r.observe(&announce("b", "10.0.0.2:7000", true, true), t0);
        r.observe(&announce("c", "0.0.0.0:7000", true, false), t0);
        assert!(!r.is_complete(t0 + Duration::from_millis(1300)));
        assert!(r.is_complete(t0 + Duration::from_secs(3)));
        // One ready instance: the others only join later, so the short window holds.
        r.connected(t0);
        r.observe(&announce("d", "10.0.0.4:7000", true, false), t0);
        assert!(r.is_complete(t0 + Duration::from_millis(1300)));
        // Once complete, its last ready instance draining is published at once.
        r.observe(
            &announce("d", "10.0.0.4:7000", true, true),
            t0 + Duration::from_millis(1400),
        );
        assert!(r.is_complete(t0 + Duration::from_millis(1400)));
    }

    #[test]
    fn the_assumed_heartbeat_stretches_both_windows() {
        let t0 = Instant::now();
        let mut r = Roster::new(3, Duration::from_secs(5));
        r.connected(t0);
        assert!(
            !r.is_complete(t0 + Duration::from_secs(14)),
            "empty: 3 x 5 s"
        );
        assert!(r.is_complete(t0 + Duration::from_secs(15)));
        r.connected(t0);
        r.observe(&announce("a", "10.0.0.1:7000", true, false), t0);
        assert!(
            !r.is_complete(t0 + Duration::from_secs(6)),
            "another gateway may still announce within 5 s"
        );
        assert!(r.is_complete(t0 + Duration::from_millis(6250)));
        let mut slow = announce("s", "10.0.0.2:7000", true, false);
        assert!(!r.slower_than_assumed(&slow));
        slow.heartbeat_ms = 10_000;
        assert!(r.slower_than_assumed(&slow));
    }

    #[test]
    fn reconnect_forgets_and_relearns() {
        let t0 = Instant::now();
        let mut r = Roster::new(3, ASSUMED);
        r.connected(t0);
        r.observe(&announce("a", "10.0.0.1:7000", true, false), t0);
        r.observe(&announce("b", "10.0.0.2:7000", true, false), t0);
        r.disconnected();
        let t1 = t0 + Duration::from_secs(5);
        assert!(!r.is_complete(t1), "disconnected is never complete");
        r.connected(t1);
        assert!(r.is_empty(), "the old roster is not trusted after a gap");
        r.observe(&announce("a", "10.0.0.1:7000", true, false), t1);
        assert!(!r.is_complete(t1 + Duration::from_millis(500)));
        // Only "a" announced within the window: "b" is gone.
        let t2 = t1 + Duration::from_millis(1300);
        assert!(r.is_complete(t2));
        assert_eq!(r.endpoints().len(), 1);
    }

    #[test]
    fn longer_heartbeats_stretch_the_window() {
        let t0 = Instant::now();
        let mut r = Roster::new(3, ASSUMED);
        r.connected(t0);
        let mut slow = announce("slow", "10.0.0.1:7000", true, false);
        slow.heartbeat_ms = 4000;
        r.observe(&slow, t0);
        assert!(!r.is_complete(t0 + Duration::from_secs(2)));
        assert!(r.is_complete(t0 + Duration::from_secs(5)));
    }

    #[test]
    fn silent_instances_expire_after_the_configured_beats() {
        let t0 = Instant::now();
        let mut r = Roster::new(3, ASSUMED);
        r.connected(t0);
        r.observe(&announce("a", "10.0.0.1:7000", true, false), t0);
        r.observe(&announce("b", "10.0.0.2:7000", true, false), t0);
        let t1 = t0 + Duration::from_millis(2500);
        r.observe(&announce("b", "10.0.0.2:7000", true, false), t1);
        assert!(r.expire(t0 + Duration::from_millis(3000)).is_empty());
        assert_eq!(
            r.expire(t0 + Duration::from_millis(3001)),
            vec!["a".to_owned()]
        );
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn draining_and_unready_instances_are_seen_but_not_ready() {
        let t0 = Instant::now();
        let mut r = Roster::new(3, ASSUMED);
        r.observe(&announce("a", "10.0.0.1:7000", true, true), t0);
        r.observe(&announce("b", "10.0.0.2:7000", false, false), t0);
        let mut states: Vec<_> = r.endpoints().into_iter().map(|e| e.state).collect();
        states.sort();
        assert_eq!(
            states,
            vec![EndpointState::NotReady, EndpointState::Terminating]
        );
    }

    #[test]
    fn unusable_addresses_are_reported_once_and_kept_out() {
        let t0 = Instant::now();
        let mut r = Roster::new(3, ASSUMED);
        let bad = announce("a", "0.0.0.0:7000", true, false);
        assert!(r.observe(&bad, t0).is_some());
        assert!(r.observe(&bad, t0).is_none(), "reported only once");
        assert!(r.endpoints().is_empty());
        assert_eq!(r.len(), 1);
        assert!(
            r.observe(&announce("a", "10.0.0.1:7000", true, false), t0)
                .is_none()
        );
        assert_eq!(r.endpoints().len(), 1);
    }
}
