//! Instance-level control over NATS: the announcement heartbeat other components discover
//! gateways by, and the stats / session-list requests every instance answers.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::bus::Headers;
use crate::contract::{
    Announce, ControlError, GatewayStats, MAX_SESSION_PAGE, SessionList, SessionListRequest,
    subjects,
};
use crate::server::Shared;
use crate::session::publish_reply;

/// Starts the control task; it stops (after a last "draining, not ready" announcement) when
/// the gateway's hard stop fires.
pub(crate) fn spawn(shared: Arc<Shared>) -> JoinHandle<()> {
    tokio::spawn(run(shared))
}

fn json<T: Serialize>(v: &T) -> Bytes {
    Bytes::from(serde_json::to_vec(v).unwrap_or_default())
}

async fn run(shared: Arc<Shared>) {
    let link = shared.bus.link().clone();
    let mut stats = link.subscribe(subjects::STATS);
    let mut sessions = link.subscribe(&subjects::sessions(&shared.instance));
    let mut tick = tokio::time::interval(Duration::from_millis(shared.config.announce_interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut connected = shared.bus.connected_watch();
    let mut draining_announced = false;
    let mut announced = Announced::default();
    loop {
        tokio::select! {
            () = shared.hard_stop.cancelled() => break,
            _ = tick.tick() => announce(&shared, false, &mut announced),
            () = shared.draining.cancelled(), if !draining_announced => {
                draining_announced = true;
                announce(&shared, false, &mut announced);
            }
            changed = connected.changed() => {
                if changed.is_err() { break; }
                announce(&shared, false, &mut announced);
            }
            // Answered through `publish_reply`, which refuses reply subjects under `device.`
            // and `devgate.` (a forged reply subject would publish there as the gateway).
            Some(msg) = stats.next() => {
                if let Some(reply) = msg.reply {
                    publish_reply(&shared, &reply, &json(&stats_of(&shared)));
                }
            }
            Some(msg) = sessions.next() => {
                if let Some(reply) = msg.reply {
                    // A page is built only for a reply that will be sent.
                    let page = if crate::session::reply_allowed(&reply) {
                        session_page(&shared, &msg.payload)
                    } else {
                        Bytes::new()
                    };
                    publish_reply(&shared, &reply, &page);
                }
            }
        }
    }
    // The last word: stats and session requests go unanswered from here on.
    announce(&shared, true, &mut announced);
}

fn stats_of(shared: &Shared) -> GatewayStats {
    GatewayStats {
        instance: shared.instance.clone(),
        advertise_addr: shared.advertise_addr.clone(),
        ready: shared.readiness().is_ok(),
        draining: shared.draining.is_cancelled(),
        sessions: shared.metrics.sessions.get().max(0) as u64,
        started_ms: shared.started_ms,
    }
}

/// How many announcements the NATS server confirmed (a `PONG` after each), and where the
/// current connection's numbering began: what listeners check for lost ones (`peers.rs`).
/// Confirmed, not merely written: announcements written into a connection that died without
/// a word (found out only by the keepalive, up to a minute later) are never counted, so a
/// quiet outage of this gateway does not look to the others like announcements lost between
/// NATS nodes, which would make every one of them sweep its sessions.
#[derive(Default)]
struct Announced {
    count: u64,
    conn: u64,
    conn_first: u64,
    /// The confirmation of the last announcement asked for; until it comes, announcements
    /// repeat its number.
    unconfirmed: Option<oneshot::Receiver<()>>,
}

impl Announced {
    /// The numbers (`seq`, `conn_seq`) of the next announcement, on connection `conn`.
    fn numbers(&mut self, conn: u64) -> (u64, u64) {
        if let Some(mut confirmation) = self.unconfirmed.take() {
            match confirmation.try_recv() {
                Ok(()) => self.count += 1,
                // Still on its way (a slow server, or a beat shorter than its round trip):
                // this one repeats the number, and the confirmation counts when it comes.
                // Asking again at every beat would never let a slow one through.
                Err(oneshot::error::TryRecvError::Empty) => self.unconfirmed = Some(confirmation),
                // The connection it was on is gone.
                Err(oneshot::error::TryRecvError::Closed) => {}
            }
        }
        if conn != self.conn {
            self.conn = conn;
            self.conn_first = self.count;
        }
        (self.count, self.conn_first)
    }

    /// The announcement was handed to NATS: `confirm` asks the server to confirm it (a
    /// `PING`), unless a confirmation is still on its way.
    fn sent(&mut self, confirm: impl FnOnce() -> Option<oneshot::Receiver<()>>) {
        if self.unconfirmed.is_none() {
            self.unconfirmed = confirm();
        }
    }
}

/// Publishes this gateway's announcement, numbered (see [`Announced`]).
fn announce(shared: &Shared, stopped: bool, announced: &mut Announced) {
    let s = stats_of(shared);
    let link = shared.bus.link();
    let conn = link.epoch();
    let (seq, conn_seq) = announced.numbers(conn);
    let body = json(&Announce {
        instance: s.instance,
        advertise_addr: s.advertise_addr,
        ready: s.ready,
        draining: s.draining,
        sessions: s.sessions,
        heartbeat_ms: shared.config.announce_interval_ms,
        started_ms: s.started_ms,
        stopped,
        seq,
        conn,
        conn_seq,
    });
    match link.publish_now(subjects::ANNOUNCE, None, Headers::None, &body) {
        Ok(()) => announced.sent(|| link.ping().ok()),
        Err(error) => tracing::debug!(%error, "announce not published"),
    }
}

/// The page size a session-list request gets: what it asked for within 1..=1000, and 1000
/// when it did not say (docs/nats-subjects.md), so no caller can make one reply unbounded.
fn page_limit(asked: Option<usize>) -> usize {
    asked.unwrap_or(MAX_SESSION_PAGE).clamp(1, MAX_SESSION_PAGE)
}

fn session_page(shared: &Shared, payload: &[u8]) -> Bytes {
    let request = if payload.is_empty() {
        Ok(SessionListRequest::default())
    } else {
        serde_json::from_slice::<SessionListRequest>(payload)
    };
    // A cursor that is not a device id would silently restart the listing: refuse it.
    let request = request.map_err(|e| e.to_string()).and_then(|req| {
        if let Some(after) = &req.after {
            crate::contract::DeviceId::parse(after)
                .map_err(|e| format!("cursor `after` is not a device id: {e}"))?;
        }
        Ok(req)
    });
    match request {
        Ok(req) => {
            let (page, next_after) = shared
                .registry
                .page(req.after.as_deref(), page_limit(req.limit));
            json(&SessionList {
                instance: shared.instance.clone(),
                total: shared.metrics.sessions.get().max(0) as u64,
                sessions: page,
                next_after,
            })
        }
        Err(e) => json(&ControlError {
            error: "bad_request".into(),
            message: format!("expected {{\"after\": device id?, \"limit\": number?}}: {e}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends announcements on `conn`, each confirmed at once or never; returns their numbers.
    /// The senders of the unconfirmed are kept in `pending` (dropping one is the link
    /// dropping its waiters with the connection).
    fn numbered(
        a: &mut Announced,
        conn: u64,
        confirmed: &[bool],
        pending: &mut Vec<oneshot::Sender<()>>,
    ) -> Vec<(u64, u64)> {
        confirmed
            .iter()
            .map(|&ok| {
                let numbers = a.numbers(conn);
                a.sent(|| {
                    let (tx, rx) = oneshot::channel();
                    if ok {
                        let _ = tx.send(());
                    } else {
                        pending.push(tx);
                    }
                    Some(rx)
                });
                numbers
            })
            .collect()
    }

    #[test]
    fn announcements_count_once_confirmed_and_wait_for_a_slow_confirmation() {
        let mut pending = Vec::new();
        let mut a = Announced::default();
        assert_eq!(
            numbered(&mut a, 1, &[true, true, true], &mut pending),
            [(0, 0), (1, 0), (2, 0)]
        );
        // The fourth's confirmation is slow: numbers repeat, and nothing more is asked.
        assert_eq!(
            numbered(&mut a, 1, &[false, true, true], &mut pending),
            [(3, 0), (3, 0), (3, 0)]
        );
        assert_eq!(pending.len(), 1);
        // It comes: counted once, and the next one is asked for again.
        let _ = pending.remove(0).send(());
        assert_eq!(
            numbered(&mut a, 1, &[true, true], &mut pending),
            [(4, 0), (5, 0)]
        );
        // One written into a connection that died without a word is never confirmed; the
        // link drops its waiter with the connection, and the new connection numbers on from
        // the count, not counting it.
        assert_eq!(numbered(&mut a, 1, &[false], &mut pending), [(6, 0)]);
        pending.clear();
        assert_eq!(
            numbered(&mut a, 2, &[true, true], &mut pending),
            [(6, 6), (7, 6)]
        );
    }

    #[test]
    fn a_session_page_is_1_to_1000_and_1000_by_default() {
        assert_eq!(page_limit(None), 1000);
        assert_eq!(page_limit(Some(0)), 1);
        assert_eq!(page_limit(Some(250)), 250);
        assert_eq!(page_limit(Some(5000)), 1000);
    }
}
