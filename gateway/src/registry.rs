//! The sessions of *this* gateway instance.
//!
//! NATS interest is the cluster-wide device->gateway registry; this local table only serves
//! what NATS cannot: settling two logins of the same device on the same gateway (NATS does not
//! echo a gateway's claim back to itself), drain, and the per-instance session listing. Entries
//! are ordered by device id so listings paginate without sorting.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Mutex;

use tokio::sync::oneshot;

use crate::contract::{DeviceId, SessionSummary};

/// What the rest of the gateway can ask of a running session.
#[derive(Debug)]
pub enum SessionCommand {
    /// A newer login of the same device on this gateway: deliver what is in flight, send
    /// `GOAWAY replaced`, unsubscribe, then signal `done`.
    Release {
        /// Signalled once the session no longer holds the device.
        done: oneshot::Sender<()>,
    },
    /// The gateway is shutting down: `GOAWAY draining` and close.
    Drain {
        /// Told to the device as `reconnect_after_ms`.
        reconnect_after_ms: u64,
    },
    /// The device id was added to the denylist: close with `ERROR unauthorized` (not a
    /// GOAWAY, which would invite the device straight back).
    Revoke,
}

/// Sends a session its one command. Both commands end the session, so a session acts on at
/// most one: a oneshot (about 80 bytes) instead of a channel whose first block alone is half a
/// kilobyte, multiplied by every idle device.
pub type CommandSender = oneshot::Sender<SessionCommand>;

/// The session's side of its command slot.
#[derive(Debug)]
pub struct CommandReceiver {
    rx: Option<oneshot::Receiver<SessionCommand>>,
}

/// A connected sender/receiver pair for one session.
pub fn command_channel() -> (CommandSender, CommandReceiver) {
    let (tx, rx) = oneshot::channel();
    (tx, CommandReceiver { rx: Some(rx) })
}

impl CommandReceiver {
    /// The command, once sent. Pending forever if the sender is dropped without one (nothing
    /// will ever be asked of this session). Cancel-safe.
    pub async fn recv(&mut self) -> SessionCommand {
        if let Some(rx) = &mut self.rx {
            let received = rx.await;
            self.rx = None;
            if let Ok(command) = received {
                return command;
            }
        }
        std::future::pending().await
    }
}

/// One session in the table.
#[derive(Debug)]
pub struct Entry {
    /// Session id.
    pub session: String,
    /// Login time of the session's [`crate::contract::ClaimKey`]: kept so that after a NATS
    /// reconnect the gateway can re-assert each session's claim, and a session answering such
    /// a re-check can compare keys, without every idle session carrying it.
    pub login_ns: u64,
    /// Command slot of the session task; taken when a command is sent.
    pub commands: Option<CommandSender>,
    /// Completes once the session has let go, when something other than a local login told it
    /// to release (a reclaim found a newer session elsewhere): a local login displacing the
    /// entry meanwhile waits on it as it would on its own release, so the two sessions never
    /// hold the device together.
    pub releasing: Option<oneshot::Receiver<()>>,
    /// Set once the session is welcomed; listed only then.
    pub summary: Option<SessionSummary>,
    /// This login displaced a welcomed session here, directly or through logins it displaced
    /// in turn (set by [`Registry::insert`]): winning it is a takeover even when the session it
    /// displaced itself never got WELCOME.
    pub replaces_welcomed: bool,
}

impl Entry {
    /// Whether this is `session`, welcomed and not ending: it holds the device here.
    fn is_welcomed(&self, session: &str) -> bool {
        self.session == session && self.summary.is_some()
    }

    /// Leaves the listings and the sweeps (see [`Registry::ending`]).
    fn mark_ending(&mut self) {
        self.summary = None;
        self.replaces_welcomed = false;
    }

    /// Whether displacing this entry takes a welcomed session's place.
    pub fn holds_welcomed(&self) -> bool {
        self.summary.is_some() || self.replaces_welcomed
    }
}

/// The local session table.
#[derive(Debug, Default)]
pub struct Registry {
    entries: Mutex<BTreeMap<DeviceId, Entry>>,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<DeviceId, Entry>> {
        // A panic while holding this short, non-async lock cannot leave the map inconsistent
        // (every operation is a single insert/remove/read), so poisoning is ignored.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a login in progress and returns the entry it displaces (an older session of
    /// the same device on this gateway, welcomed or still logging in), which the caller must
    /// tell to release.
    pub fn insert(&self, id: DeviceId, mut entry: Entry) -> Option<Entry> {
        let mut map = self.lock();
        entry.replaces_welcomed = map.get(&id).is_some_and(Entry::holds_welcomed);
        map.insert(id, entry)
    }

    /// Marks the session welcomed so it is listed.
    pub fn welcome(&self, id: &DeviceId, session: &str, summary: SessionSummary) {
        if let Some(e) = self.lock().get_mut(id)
            && e.session == session
        {
            e.summary = Some(summary);
            // From here `summary` says it; the takeover this login made is counted already.
            e.replaces_welcomed = false;
        }
    }

    /// Removes the entry if it still belongs to `session` (a newer login may have replaced it).
    pub fn remove(&self, id: &DeviceId, session: &str) {
        let mut map = self.lock();
        if map.get(id).is_some_and(|e| e.session == session) {
            map.remove(id);
        }
    }

    /// Login time of `session`, if it is welcomed and still holds `id` here (not ending): the
    /// key it compares a reclaim against. A session told to go (draining, revoked, released)
    /// still has one: until it leaves, a claim older than it must not win.
    pub fn login_ns(&self, id: &DeviceId, session: &str) -> Option<u64> {
        self.lock()
            .get(id)
            .filter(|e| e.is_welcomed(session))
            .map(|e| e.login_ns)
    }

    /// [`Registry::login_ns`] of a session that no command was sent to yet: one whose claim a
    /// sweep may still re-assert (one told to go is leaving anyway).
    pub fn unreleased_login_ns(&self, id: &DeviceId, session: &str) -> Option<u64> {
        self.lock()
            .get(id)
            .filter(|e| e.is_welcomed(session) && e.commands.is_some())
            .map(|e| e.login_ns)
    }

    /// Marks `session` ending because another gateway's reclaim found it older; returns
    /// whether that loss is new. It is not when its own gateway's reclaim lost first and told
    /// it to release (and counted). Checked and marked under one lock, so of the two, exactly
    /// one counts: a release after this finds the session ending and refuses.
    pub fn lose(&self, id: &DeviceId, session: &str) -> bool {
        let mut map = self.lock();
        let Some(e) = map.get_mut(id).filter(|e| e.session == session) else {
            return false;
        };
        let new = e.releasing.is_none() && e.is_welcomed(session);
        e.mark_ending();
        new
    }

    /// Marks `session` as ending: it leaves the listings and is no longer re-asserted by a
    /// reclaim, whose claim would say "subscribed" while the session is giving its
    /// subscription up. Its entry stays until the session has let go (see [`Registry::remove`]),
    /// so a new local login still waits for it.
    pub fn ending(&self, id: &DeviceId, session: &str) {
        if let Some(e) = self.lock().get_mut(id)
            && e.session == session
        {
            e.mark_ending();
        }
    }

    /// Device, session and login time of every welcomed session not told to go: the claims to
    /// re-assert after a reconnect. (Sessions still logging in run their own claim rounds.)
    pub fn welcomed_claims(&self) -> Vec<(DeviceId, String, u64)> {
        self.lock()
            .iter()
            .filter(|(_, e)| e.summary.is_some() && e.commands.is_some())
            .map(|(id, e)| (id.clone(), e.session.clone(), e.login_ns))
            .collect()
    }

    /// Tells `session` to release the device, if it still holds `id` here and no command was
    /// sent to it yet. Returns whether it was told.
    pub fn release(&self, id: &DeviceId, session: &str) -> bool {
        let mut map = self.lock();
        // An ending session (it yielded to another gateway's reclaim meanwhile, say) has let
        // go already.
        let Some(entry) = map.get_mut(id).filter(|e| e.is_welcomed(session)) else {
            return false;
        };
        let Some(commands) = entry.commands.take() else {
            return false;
        };
        let (done, released) = oneshot::channel();
        entry.releasing = Some(released);
        commands.send(SessionCommand::Release { done }).is_ok()
    }

    /// Tells the sessions of `ids` here (welcomed or logging in) to close as revoked, unless a
    /// command was already sent to them (they are ending anyway). Returns how many were told.
    pub fn revoke(&self, ids: &[DeviceId]) -> usize {
        let mut map = self.lock();
        ids.iter()
            .filter_map(|id| map.get_mut(id)?.commands.take())
            .map(|commands| commands.send(SessionCommand::Revoke).is_ok())
            .filter(|told| *told)
            .count()
    }

    /// Welcomed sessions.
    pub fn welcomed(&self) -> u64 {
        self.lock().values().filter(|e| e.summary.is_some()).count() as u64
    }

    /// One page of welcomed sessions with device ids after `after`; returns the page and the
    /// cursor for the next one.
    pub fn page(&self, after: Option<&str>, limit: usize) -> (Vec<SessionSummary>, Option<String>) {
        let map = self.lock();
        let start = match after.and_then(|a| DeviceId::parse(a).ok()) {
            Some(a) => Bound::Excluded(a),
            None => Bound::Unbounded,
        };
        let mut page: Vec<SessionSummary> = map
            .range((start, Bound::Unbounded))
            .filter_map(|(_, e)| e.summary.clone())
            .take(limit.saturating_add(1))
            .collect();
        let next = if page.len() > limit {
            page.truncate(limit);
            page.last().map(|s| s.device_id.to_string())
        } else {
            None
        };
        (page, next)
    }

    /// Takes the command slot of every session, for drain.
    pub fn take_all_commands(&self) -> Vec<CommandSender> {
        self.lock()
            .values_mut()
            .filter_map(|e| e.commands.take())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(session: &str, welcomed: bool, id: &str) -> Entry {
        let (tx, _rx) = command_channel();
        Entry {
            session: session.into(),
            login_ns: 7,
            commands: Some(tx),
            releasing: None,
            summary: welcomed.then(|| SessionSummary {
                device_id: DeviceId::parse(id).expect("id"),
                session: session.into(),
                since_ms: 0,
                remote_addr: String::new(),
            }),
            replaces_welcomed: false,
        }
    }

    fn id(s: &str) -> DeviceId {
        DeviceId::parse(s).expect("id")
    }

    #[test]
    fn insert_returns_the_displaced_session() {
        let r = Registry::default();
        assert!(r.insert(id("d"), entry("s1", true, "d")).is_none());
        let old = r
            .insert(id("d"), entry("s2", false, "d"))
            .expect("displaced");
        assert_eq!(old.session, "s1");
        // The displaced session's cleanup must not remove its successor.
        r.remove(&id("d"), "s1");
        assert_eq!(r.take_all_commands().len(), 1);
        assert!(r.take_all_commands().is_empty(), "a slot is taken once");
        r.remove(&id("d"), "s2");
        assert_eq!(r.welcomed(), 0);
    }

    #[test]
    fn a_login_displacing_a_login_that_displaced_a_welcomed_session_inherits_it() {
        let r = Registry::default();
        r.insert(id("d"), entry("s0", true, "d"));
        let s0 = r.insert(id("d"), entry("l1", false, "d")).expect("s0");
        assert!(s0.holds_welcomed(), "s0 was welcomed");
        let l1 = r.insert(id("d"), entry("l2", false, "d")).expect("l1");
        assert!(l1.holds_welcomed(), "l1 had displaced the welcomed s0");
        r.remove(&id("d"), "l2");
        r.insert(id("d"), entry("l3", false, "d"));
        let l3 = r.insert(id("d"), entry("l4", false, "d")).expect("l3");
        assert!(!l3.holds_welcomed(), "l3 displaced nothing");
        // l5 displaces the welcomed l4... and once l5 itself is welcomed and then ends, a
        // login replacing it replaces nothing live.
        let summary = |s: &str| SessionSummary {
            device_id: id("d"),
            session: s.into(),
            since_ms: 0,
            remote_addr: String::new(),
        };
        r.welcome(&id("d"), "l4", summary("l4"));
        r.insert(id("d"), entry("l5", false, "d"));
        r.welcome(&id("d"), "l5", summary("l5"));
        r.ending(&id("d"), "l5");
        let l5 = r.insert(id("d"), entry("l6", false, "d")).expect("l5");
        assert!(
            !l5.holds_welcomed(),
            "l5 was ending: nothing live to take over"
        );
    }

    #[test]
    fn claims_are_listed_for_welcomed_sessions_and_login_times_only_for_their_holder() {
        let r = Registry::default();
        r.insert(id("a"), entry("s-a", true, "a"));
        r.insert(id("b"), entry("s-b", false, "b"));
        assert_eq!(
            r.welcomed_claims(),
            vec![(id("a"), "s-a".to_owned(), 7)],
            "only welcomed sessions re-assert their claim"
        );
        assert_eq!(r.login_ns(&id("a"), "s-a"), Some(7));
        assert_eq!(r.login_ns(&id("a"), "s-old"), None);
        assert_eq!(r.login_ns(&id("b"), "s-b"), None, "not welcomed yet");
        r.insert(id("c"), entry("s-c", true, "c"));
        // Told to go (the session's end of the channel is gone here, so the send fails, but
        // the command slot is used up either way).
        let _ = r.release(&id("c"), "s-c");
        assert_eq!(
            r.unreleased_login_ns(&id("c"), "s-c"),
            None,
            "told to go: not re-asserted"
        );
        assert_eq!(
            r.login_ns(&id("c"), "s-c"),
            Some(7),
            "still holds its key against older claims until it leaves"
        );
        assert!(!r.release(&id("c"), "s-c"), "told once");
        assert!(
            !r.lose(&id("c"), "s-c"),
            "its own gateway's reclaim counted the loss"
        );
        r.insert(id("d"), entry("s-d", true, "d"));
        assert!(r.lose(&id("d"), "s-d"), "lost to another gateway's reclaim");
        assert!(
            !r.release(&id("d"), "s-d"),
            "so its own reclaim finds it gone"
        );
        r.ending(&id("a"), "s-a");
        assert_eq!(r.login_ns(&id("a"), "s-a"), None, "ending");
        assert!(!r.release(&id("a"), "s-a"), "an ending session has let go");
        assert!(
            r.welcomed_claims().is_empty(),
            "an ending session is not re-asserted"
        );
    }

    #[tokio::test]
    async fn a_release_told_by_the_gateway_leaves_a_waiter_for_a_local_login() {
        let r = Registry::default();
        let (tx, mut session) = command_channel();
        r.insert(
            id("a"),
            Entry {
                session: "s-a".into(),
                login_ns: 7,
                commands: Some(tx),
                releasing: None,
                // Welcomed: only a session that holds the device is released.
                summary: entry("s-a", true, "a").summary,
                replaces_welcomed: false,
            },
        );
        assert!(
            !r.release(&id("a"), "s-old"),
            "only the session that holds it"
        );
        assert!(r.release(&id("a"), "s-a"));
        assert!(!r.release(&id("a"), "s-a"), "told once");
        // A local login displacing it now finds no command slot, but a release to wait for.
        let displaced = r
            .insert(id("a"), entry("s-new", false, "a"))
            .expect("displaced");
        assert!(displaced.commands.is_none());
        let mut waiter = displaced.releasing.expect("a release to wait for");
        assert!(waiter.try_recv().is_err(), "not released yet");
        let SessionCommand::Release { done } = session.recv().await else {
            panic!("expected Release");
        };
        let _ = done.send(());
        waiter.await.expect("released");
    }

    #[tokio::test]
    async fn revoking_tells_only_the_listed_devices_once() {
        let r = Registry::default();
        let (tx, mut revoked) = command_channel();
        let mut listed = entry("s-a", true, "a");
        listed.commands = Some(tx);
        r.insert(id("a"), listed);
        let (tx, mut spared) = command_channel();
        let mut other = entry("s-b", false, "b");
        other.commands = Some(tx);
        r.insert(id("b"), other);
        assert_eq!(r.revoke(&[id("a"), id("not-here")]), 1);
        assert!(matches!(revoked.recv().await, SessionCommand::Revoke));
        assert_eq!(r.revoke(&[id("a")]), 0, "a session is told once");
        let untold =
            tokio::time::timeout(std::time::Duration::from_millis(20), spared.recv()).await;
        assert!(untold.is_err(), "a device not listed is left alone");
    }

    #[tokio::test]
    async fn a_command_arrives_once_and_a_dropped_sender_means_none_will() {
        let (tx, mut rx) = command_channel();
        let _ = tx.send(SessionCommand::Drain {
            reconnect_after_ms: 5,
        });
        assert!(matches!(
            rx.recv().await,
            SessionCommand::Drain {
                reconnect_after_ms: 5
            }
        ));
        let (tx, mut rx) = command_channel();
        drop(tx);
        let waited = tokio::time::timeout(std::time::Duration::from_millis(50), rx.recv()).await;
        assert!(waited.is_err(), "no command, and not a spurious one");
    }

    #[test]
    fn pages_are_sorted_and_only_list_welcomed_sessions() {
        let r = Registry::default();
        for (d, w) in [
            ("c", true),
            ("a", true),
            ("b", false),
            ("d", true),
            ("e", true),
        ] {
            r.insert(id(d), entry(&format!("s-{d}"), w, d));
        }
        assert_eq!(r.welcomed(), 4);
        let (p1, next) = r.page(None, 2);
        assert_eq!(
            p1.iter().map(|s| s.device_id.as_str()).collect::<Vec<_>>(),
            ["a", "c"]
        );
        assert_eq!(next.as_deref(), Some("c"));
        let (p2, next) = r.page(next.as_deref(), 2);
        assert_eq!(
            p2.iter().map(|s| s.device_id.as_str()).collect::<Vec<_>>(),
            ["d", "e"]
        );
        assert_eq!(next, None);
    }
}
