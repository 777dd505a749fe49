//! Noticing that a NATS partition healed, so the split brain it may have caused is healed too.
//!
//! A partition *between NATS cluster nodes* disconnects no gateway: each keeps its connection
//! to its own side. A device that reconnects across the cut logs in on the other side, its
//! claim finds no holder (the old session's interest is on the unreachable side), and it wins;
//! the old session is not told. When the routes come back both sessions are subscribed, and
//! every message to the device reaches two sessions, until the stale one ends by its idle
//! timeout. The reconnect sweep (`reclaim.rs`) does not help: no connection was lost, or one
//! was and came back while the cut still stood, when its reclaims could reach nobody.
//!
//! What does change is visible: every gateway announces itself on [`subjects::ANNOUNCE`]
//! every `heartbeat_ms`, numbering its announcements, and the ones published during the cut
//! never reach the other side. So this task asks for a sweep of this gateway's sessions when
//! it hears, from another gateway:
//! - a skip in the numbers on one of its connections (lost on the way: a cut);
//! - across its reconnect, more lost before it than an outage explains, or any lost after it;
//! - after this gateway's own reconnect, its first announcement only later than its expiry
//!   (the cut outlived this gateway's own reconnect sweep);
//! - a first announcement with more numbers behind it than a start explains (it started on the
//!   other side during the cut).
//!
//! Numbers (counted once the server confirmed them) rather than clocks or silences, but for
//! the third rule, which applies only right after this gateway's own reconnect: a late
//! announcement, a busy listener or skewed clocks do not look like a partition. Both sides
//! notice, both sweep, and the reclaims settle each device on its newer session. What this
//! cannot see: a cut so short that it loses no announcement (under one beat), and gateways
//! too old to number their announcements.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::bus::Subscription;
use crate::contract::{Announce, subjects};
use crate::server::Shared;

/// Missed beats after which another gateway counts as out of sight (lb-sync's default too).
const EXPIRY_BEATS: u64 = 3;

/// The shortest silence that counts as out of sight, whatever the beat.
const MIN_EXPIRY: Duration = Duration::from_secs(2);

/// A gateway first heard with more announcements than this behind it was running, out of
/// earshot, before this gateway could hear it (a start is heard within a beat or two).
const FIRST_HEARD_SEQ: u64 = EXPIRY_BEATS + 2;

/// Announcements a gateway's own outage may lose at its end without a cut: confirmed by the
/// server, but not yet carried on by the routes. Announcements go out once per beat.
const LOST_TO_OUTAGE: u64 = 2;

/// How long a gateway out of sight is remembered.
const FORGET_AFTER: Duration = Duration::from_secs(3600);

/// At most this many gateways are remembered (only gateways may publish announcements);
/// beyond, the longest unheard go first.
const MAX_PEERS: usize = 10_000;

/// Why a sweep was asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Heal {
    /// `missed` announcements of a gateway never arrived.
    Gap { instance: String, missed: u64 },
    /// A gateway heard for the first time had announced `seq` times already.
    Unseen { instance: String, seq: u64 },
    /// After this gateway's own reconnect, a gateway was first heard `after` it.
    Unheard { instance: String, after: Duration },
}

struct Peer {
    /// The last announcement's connection and number.
    last: (u64, u64),
    /// Its last word was heard: later announcements of this process are late ones.
    stopped: bool,
    /// Set by this gateway's own outage: the next announcement re-synchronises.
    resync: bool,
    last_heard: Instant,
    /// Silence beyond which it is out of sight: [`EXPIRY_BEATS`] of its own heartbeat, at
    /// least [`MIN_EXPIRY`].
    expiry: Duration,
}

/// Older gateways number nothing (and connect at least once before announcing, so a numbered
/// one never says connection 0): kept in sight, never a reason to sweep.
fn numbered(a: &Announce) -> bool {
    a.conn != 0
}

impl Peer {
    /// Takes the next announcement of this (running) gateway, heard after this gateway has
    /// been `listening` for that long on its current connection.
    fn hear(
        &mut self,
        a: &Announce,
        now: Instant,
        expiry: Duration,
        listening: Duration,
    ) -> Option<Heal> {
        self.last_heard = now;
        self.expiry = expiry;
        let (conn, seq) = self.last;
        // From an earlier connection of its own: nothing to compare.
        if !numbered(a) || a.conn < conn {
            return None;
        }
        // Since its current connection began, as far as heard now.
        let on_this_conn = a.seq.saturating_sub(a.conn_seq);
        let heal = if self.resync {
            self.resync = false;
            // Heard late after this gateway's own reconnect: the cut outlived the reconnect
            // sweep. Unless the other one reconnected later itself and this is its first
            // announcement since (nothing lost after it), when its own reconnect sweep, run
            // with this gateway already connected, settled what the two share.
            let reconnected_later = a.conn > conn && on_this_conn == 0;
            (listening > expiry && !reconnected_later).then(|| Heal::Unheard {
                instance: a.instance.clone(),
                after: listening,
            })
        } else if a.conn == conn && a.seq <= seq {
            // Late or repeated: nothing new.
            return None;
        } else {
            let missed = if a.conn == conn {
                a.seq - seq - 1
            } else {
                // Before its own outage (beyond what an outage loses), and since.
                let before = a.conn_seq.saturating_sub(seq.saturating_add(1));
                before
                    .saturating_sub(LOST_TO_OUTAGE)
                    .saturating_add(on_this_conn)
            };
            (missed > 0).then(|| Heal::Gap {
                instance: a.instance.clone(),
                missed,
            })
        };
        self.last = (a.conn, a.seq);
        heal
    }
}

/// What this gateway knows of the others, from their announcements. Pure: time comes in.
/// Keyed by instance and start: two processes under one name (a misconfiguration) are two
/// gateways here, not one restarting at every beat.
pub(crate) struct PeerView {
    own_instance: String,
    /// Since when this gateway has been listening on its current connection.
    listening_since: Instant,
    peers: HashMap<(String, u64), Peer>,
}

impl PeerView {
    pub(crate) fn new(own_instance: &str, now: Instant) -> Self {
        PeerView {
            own_instance: own_instance.to_owned(),
            listening_since: now,
            peers: HashMap::new(),
        }
    }

    /// Takes one announcement; says whether it shows a partition this gateway was cut off by.
    pub(crate) fn observe(&mut self, a: &Announce, now: Instant) -> Option<Heal> {
        if a.instance == self.own_instance {
            return None;
        }
        let key = (a.instance.clone(), a.started_ms);
        let expiry =
            Duration::from_millis(a.heartbeat_ms.saturating_mul(EXPIRY_BEATS)).max(MIN_EXPIRY);
        let listening = now.saturating_duration_since(self.listening_since);
        match self.peers.get_mut(&key) {
            // A stopped one is kept for an expiry, so a late announcement of the same process
            // is not taken for a gateway first heard with many announcements behind it.
            Some(peer) if peer.stopped => None,
            Some(peer) if !a.stopped => peer.hear(a, now, expiry, listening),
            _ => {
                if self.peers.len() >= MAX_PEERS && !self.peers.contains_key(&key) {
                    self.forget_longest_unheard();
                }
                self.peers.insert(
                    key,
                    Peer {
                        last: (a.conn, a.seq),
                        stopped: a.stopped,
                        resync: false,
                        last_heard: now,
                        expiry,
                    },
                );
                (!a.stopped && numbered(a) && a.seq > FIRST_HEARD_SEQ && listening > expiry).then(
                    || Heal::Unseen {
                        instance: a.instance.clone(),
                        seq: a.seq,
                    },
                )
            }
        }
    }

    /// Forgets the gateways unheard for long, and returns how many were heard within their
    /// expiry: the gauge an alert compares across gateways.
    pub(crate) fn expire(&mut self, now: Instant) -> usize {
        self.peers.retain(|_, p| {
            let unheard = now.saturating_duration_since(p.last_heard);
            unheard < FORGET_AFTER && !(p.stopped && unheard > p.expiry)
        });
        self.peers
            .values()
            .filter(|p| !p.stopped && now.saturating_duration_since(p.last_heard) <= p.expiry)
            .count()
    }

    /// This gateway's own NATS connection is new, or down: it hears nobody, by its own fault,
    /// and its reconnect sweep covers what happened until now. What it missed meanwhile does
    /// not count; a gateway not heard again within its expiry of the reconnect does (the cut,
    /// if any, outlived that sweep).
    pub(crate) fn own_outage(&mut self, now: Instant) {
        self.listening_since = now;
        for peer in self.peers.values_mut() {
            peer.resync = true;
            // Those in sight stay so; those already gone are not brought back.
            if now.saturating_duration_since(peer.last_heard) <= peer.expiry {
                peer.last_heard = now;
            }
        }
    }

    fn forget_longest_unheard(&mut self) {
        let oldest = self
            .peers
            .iter()
            .min_by_key(|(_, p)| p.last_heard)
            .map(|(key, _)| key.clone());
        if let Some(key) = oldest {
            self.peers.remove(&key);
        }
    }
}

/// Starts the task; it rings `heal` (for `reclaim.rs`) and ends at the gateway's hard stop.
/// Subscribes before it returns, so the subscription precedes every device's.
pub(crate) fn spawn(shared: Arc<Shared>, heal: Arc<Notify>) -> JoinHandle<()> {
    let announces = shared.bus.link().subscribe(subjects::ANNOUNCE);
    tokio::spawn(run(shared, heal, announces))
}

async fn run(shared: Arc<Shared>, heal: Arc<Notify>, mut announces: Subscription) {
    let link = shared.bus.link().clone();
    let mut view = PeerView::new(&shared.instance, Instant::now());
    let mut tick = tokio::time::interval(Duration::from_millis(shared.config.announce_interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut epoch = link.epoch();
    loop {
        tokio::select! {
            () = shared.hard_stop.cancelled() => return,
            msg = announces.next() => {
                // Only at the link's end: a refused subscription stays in the table (and is
                // counted and logged by the link, naming the subject).
                let Some(msg) = msg else { return };
                if link.epoch() != epoch {
                    epoch = link.epoch();
                    own_outage(&mut view, &mut announces);
                    continue;
                }
                let Ok(announce) = serde_json::from_slice::<Announce>(&msg.payload) else {
                    continue;
                };
                if let Some(why) = view.observe(&announce, Instant::now()) {
                    match why {
                        Heal::Gap { instance, missed } => tracing::warn!(instance = %shared.instance, peer = %instance, missed, "announcements of another gateway were lost on the way (a NATS partition healed?): re-checking that no device is held twice"),
                        Heal::Unseen { instance, seq } => tracing::warn!(instance = %shared.instance, peer = %instance, announced = seq, "a gateway heard for the first time has been announcing out of earshot (a NATS partition healed?): re-checking that no device is held twice"),
                        Heal::Unheard { instance, after } => tracing::warn!(instance = %shared.instance, peer = %instance, after_ms = u64::try_from(after.as_millis()).unwrap_or(u64::MAX), "a gateway was heard only long after this gateway's reconnect (a NATS partition outlived it?): re-checking that no device is held twice"),
                    }
                    heal.notify_one();
                }
            }
            _ = tick.tick() => {
                let now = Instant::now();
                if !link.is_connected() || link.epoch() != epoch {
                    epoch = link.epoch();
                    own_outage(&mut view, &mut announces);
                }
                let in_sight = view.expire(now);
                shared.metrics.peers_visible.set(i64::try_from(in_sight).unwrap_or(i64::MAX));
            }
        }
    }
}

/// [`PeerView::own_outage`], and what the previous connection left in the queue goes: read
/// after the new connection's first announcements, it would look like a skip.
fn own_outage(view: &mut PeerView, announces: &mut Subscription) {
    while announces.try_next().is_some() {}
    view.own_outage(Instant::now());
}

#[cfg(test)]
mod tests {
    use super::*;

    const START_MS: u64 = 1_000_000;

    fn announce(instance: &str, conn: u64, seq: u64) -> Announce {
        Announce {
            instance: instance.into(),
            advertise_addr: "10.0.0.1:7000".into(),
            ready: true,
            draining: false,
            sessions: 1,
            heartbeat_ms: 1000,
            started_ms: START_MS,
            stopped: false,
            seq,
            conn,
            conn_seq: 0,
        }
    }

    /// An announcement on a later connection of its own, which began at `conn_seq`.
    fn reconnected(instance: &str, conn: u64, conn_seq: u64, seq: u64) -> Announce {
        Announce {
            conn_seq,
            ..announce(instance, conn, seq)
        }
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// A view that has listened for a minute, with `peer` heard at every beat up to seq 60.
    fn settled(t0: Instant, peer: &str) -> PeerView {
        let mut view = PeerView::new("me", t0);
        for seq in 0..=60 {
            assert_eq!(
                view.observe(&announce(peer, 1, seq), t0 + secs(seq)),
                None,
                "heard from our own start (seq {seq}): nothing missed"
            );
        }
        view
    }

    fn gap(instance: &str, missed: u64) -> Option<Heal> {
        Some(Heal::Gap {
            instance: instance.into(),
            missed,
        })
    }

    #[test]
    fn consecutive_late_or_repeated_announcements_ask_for_nothing() {
        let t0 = Instant::now();
        let mut view = settled(t0, "b");
        // Ten seconds late but consecutive: a busy sender or listener, not a partition.
        assert_eq!(view.observe(&announce("b", 1, 61), t0 + secs(75)), None);
        assert_eq!(view.observe(&announce("b", 1, 61), t0 + secs(75)), None);
        assert_eq!(view.observe(&announce("b", 1, 60), t0 + secs(75)), None);
        assert_eq!(view.observe(&announce("b", 1, 62), t0 + secs(76)), None);
        assert_eq!(
            view.expire(t0 + secs(78)),
            1,
            "a late one keeps it in sight"
        );
    }

    #[test]
    fn a_skip_on_one_connection_asks_for_a_sweep_once() {
        let t0 = Instant::now();
        let mut view = settled(t0, "b");
        assert_eq!(
            view.observe(&announce("b", 1, 62), t0 + secs(62)),
            gap("b", 1),
            "even one lost announcement: the cut was there"
        );
        assert_eq!(
            view.observe(&announce("b", 1, 63), t0 + secs(63)),
            None,
            "once"
        );
    }

    #[test]
    fn across_the_peers_reconnect_only_what_its_outage_does_not_explain_counts() {
        let t0 = Instant::now();
        // Its outage lost the last two the server confirmed (61, 62) before the routes carried
        // them on; the new connection starts at 63.
        let mut view = settled(t0, "b");
        assert_eq!(
            view.observe(&reconnected("b", 2, 63, 63), t0 + secs(70)),
            None
        );
        assert_eq!(
            view.observe(&reconnected("b", 2, 63, 64), t0 + secs(71)),
            None
        );
        // Ten lost before its outage: a cut came first (and its reconnect sweep, during the
        // cut, reached nobody).
        let mut view = settled(t0, "b");
        assert_eq!(
            view.observe(&reconnected("b", 2, 71, 71), t0 + secs(80)),
            gap("b", 8)
        );
        // Lost after its reconnect: the cut outlived its outage.
        let mut view = settled(t0, "b");
        assert_eq!(
            view.observe(&reconnected("b", 2, 61, 75), t0 + secs(80)),
            gap("b", 14)
        );
        // Late words from its earlier connection change nothing.
        assert_eq!(view.observe(&announce("b", 1, 60), t0 + secs(80)), None);
    }

    #[test]
    fn after_its_own_reconnect_a_gateway_heard_late_asks_for_a_sweep() {
        let t0 = Instant::now();
        let mut view = settled(t0, "b");
        let back = t0 + secs(100);
        view.own_outage(back);
        // Heard within its expiry of the reconnect: nothing missed counts.
        assert_eq!(view.observe(&announce("b", 1, 90), back + secs(1)), None);
        assert_eq!(view.observe(&announce("b", 1, 91), back + secs(2)), None);
        // Heard only later: the cut outlived this gateway's reconnect sweep.
        let mut view = settled(t0, "b");
        view.own_outage(back);
        assert_eq!(
            view.observe(&announce("b", 1, 95), back + secs(5)),
            Some(Heal::Unheard {
                instance: "b".into(),
                after: secs(5)
            })
        );
        assert_eq!(
            view.observe(&announce("b", 1, 96), back + secs(6)),
            None,
            "once"
        );
    }

    #[test]
    fn after_its_own_reconnect_a_peer_that_reconnected_later_itself_is_no_reason() {
        let t0 = Instant::now();
        let mut view = settled(t0, "b");
        let back = t0 + secs(100);
        view.own_outage(back);
        // "b" noticed the same dead NATS node 20 s later: its own reconnect sweep ran while
        // this gateway was connected already.
        assert_eq!(
            view.observe(&reconnected("b", 2, 61, 61), back + secs(20)),
            None
        );
        // But one whose announcements since its reconnect (even one) did not arrive was cut
        // off from here after it.
        for seq in [62, 63, 70] {
            let mut view = settled(t0, "b");
            view.own_outage(back);
            assert_eq!(
                view.observe(&reconnected("b", 2, 61, seq), back + secs(20)),
                Some(Heal::Unheard {
                    instance: "b".into(),
                    after: secs(20)
                }),
                "{seq}"
            );
        }
    }

    #[test]
    fn late_words_of_an_earlier_connection_do_not_move_a_peer_back() {
        let t0 = Instant::now();
        let mut view = settled(t0, "b");
        assert_eq!(
            view.observe(&reconnected("b", 2, 61, 61), t0 + secs(61)),
            None
        );
        view.own_outage(t0 + secs(62));
        assert_eq!(view.observe(&announce("b", 1, 60), t0 + secs(62)), None);
        assert_eq!(
            view.observe(&reconnected("b", 2, 61, 62), t0 + secs(63)),
            None,
            "still counted from connection 2"
        );
    }

    #[test]
    fn a_late_announcement_after_the_last_word_is_no_new_gateway() {
        let t0 = Instant::now();
        let mut view = settled(t0, "b");
        let last_word = Announce {
            stopped: true,
            ..announce("b", 1, 61)
        };
        assert_eq!(view.observe(&last_word, t0 + secs(61)), None);
        assert_eq!(view.observe(&announce("b", 1, 60), t0 + secs(61)), None);
        assert_eq!(
            view.expire(t0 + secs(61)),
            0,
            "stopped: out of sight at once"
        );
        assert_eq!(view.expire(t0 + secs(70)), 0);
        assert!(view.peers.is_empty(), "and forgotten after an expiry");
    }

    #[test]
    fn its_own_outage_does_not_bring_back_gateways_already_gone() {
        let t0 = Instant::now();
        let mut view = settled(t0, "b");
        view.observe(&announce("c", 1, 0), t0 + secs(90));
        view.own_outage(t0 + secs(91));
        assert_eq!(view.expire(t0 + secs(91)), 1, "only c was in sight");
    }

    #[test]
    fn hostile_numbers_do_not_overflow() {
        let t0 = Instant::now();
        let mut view = settled(t0, "b");
        // Whatever they say, they are taken without a panic (a debug build checks overflow).
        for (conn, conn_seq, seq) in [
            (2, u64::MAX, u64::MAX),
            (u64::MAX, 0, u64::MAX),
            (u64::MAX, u64::MAX, 0),
            (u64::MAX, u64::MAX, u64::MAX),
        ] {
            let _ = view.observe(&reconnected("b", conn, conn_seq, seq), t0 + secs(61));
        }
        let mut view = settled(t0, "b");
        assert!(
            view.observe(&reconnected("b", 2, 0, u64::MAX), t0 + secs(61))
                .is_some()
        );
    }

    #[test]
    fn a_gateway_first_heard_with_many_announcements_behind_it_asks_for_a_sweep() {
        let t0 = Instant::now();
        let mut view = settled(t0, "b");
        // Announced 30 times out of earshot: it started on the other side of a partition.
        assert_eq!(
            view.observe(&announce("c", 1, 30), t0 + secs(61)),
            Some(Heal::Unseen {
                instance: "c".into(),
                seq: 30
            })
        );
        // Heard at its start, however long its start took (a slow first NATS connect
        // announces nothing: only what reached NATS is numbered).
        assert_eq!(view.observe(&announce("d", 1, 0), t0 + secs(61)), None);
        assert_eq!(
            view.observe(&reconnected("e", 3, 0, 1), t0 + secs(61)),
            None
        );
        // "b" restarted: a new process, heard as it starts.
        let restarted = Announce {
            started_ms: START_MS + 60_000,
            ..announce("b", 1, 1)
        };
        assert_eq!(view.observe(&restarted, t0 + secs(61)), None);
    }

    #[test]
    fn right_after_its_own_start_or_reconnect_every_gateway_is_new_to_it() {
        let t0 = Instant::now();
        let mut view = PeerView::new("me", t0);
        assert_eq!(view.observe(&announce("b", 1, 500), t0 + secs(1)), None);
        let mut view = settled(t0, "b");
        view.own_outage(t0 + secs(100));
        assert_eq!(view.observe(&announce("c", 1, 500), t0 + secs(101)), None);
        assert_eq!(
            view.observe(&announce("f", 1, 500), t0 + secs(104)),
            Some(Heal::Unseen {
                instance: "f".into(),
                seq: 500
            }),
            "listening again for longer than an expiry"
        );
    }

    #[test]
    fn two_processes_under_one_name_are_two_gateways_not_endless_restarts() {
        let t0 = Instant::now();
        let mut view = PeerView::new("me", t0);
        let twin = |seq| Announce {
            started_ms: START_MS + 5,
            ..announce("b", 1, seq)
        };
        for seq in 0..30 {
            let now = t0 + secs(seq);
            assert_eq!(view.observe(&announce("b", 1, seq + 100), now), None);
            assert_eq!(view.observe(&twin(seq), now), None);
        }
        assert_eq!(view.expire(t0 + secs(30)), 2);
    }

    #[test]
    fn gateways_that_number_nothing_stay_in_sight_and_never_ask_for_a_sweep() {
        let t0 = Instant::now();
        let mut view = PeerView::new("me", t0);
        for beat in 0..60 {
            assert_eq!(view.observe(&announce("old", 0, 0), t0 + secs(beat)), None);
        }
        assert_eq!(view.expire(t0 + secs(60)), 1);
    }

    #[test]
    fn in_sight_counts_the_gateways_heard_within_three_beats() {
        let t0 = Instant::now();
        let mut view = settled(t0, "b");
        assert_eq!(view.expire(t0 + secs(63)), 1, "three beats: still in sight");
        assert_eq!(view.expire(t0 + secs(64)), 0);
        let mut view = settled(t0, "b");
        view.own_outage(t0 + secs(62));
        assert_eq!(view.expire(t0 + secs(65)), 1, "its own outage hides nobody");
    }

    #[test]
    fn its_own_and_stopped_announcements_are_no_peers() {
        let t0 = Instant::now();
        let mut view = settled(t0, "b");
        assert_eq!(view.observe(&announce("me", 1, 500), t0 + secs(61)), None);
        // A late last word of an earlier process with the same name changes nothing.
        let old_stop = Announce {
            stopped: true,
            started_ms: START_MS - 1,
            ..announce("b", 1, 9)
        };
        assert_eq!(view.observe(&old_stop, t0 + secs(61)), None);
        assert_eq!(view.expire(t0 + secs(61)), 1);
        let stopped = Announce {
            stopped: true,
            ..announce("b", 1, 61)
        };
        assert_eq!(view.observe(&stopped, t0 + secs(61)), None);
        assert_eq!(
            view.expire(t0 + secs(61)),
            0,
            "a stopped gateway is forgotten"
        );
    }

    #[test]
    fn the_remembered_gateways_are_bounded() {
        let t0 = Instant::now();
        let mut view = PeerView::new("me", t0);
        for i in 0..MAX_PEERS + 10 {
            let now = t0 + Duration::from_millis(i as u64);
            view.observe(&announce(&format!("g{i}"), 1, 0), now);
        }
        assert_eq!(view.peers.len(), MAX_PEERS);
        assert!(
            !view.peers.contains_key(&("g0".to_owned(), START_MS)),
            "the longest unheard went first"
        );
    }
}
