//! Healing a split brain after this gateway reconnects to NATS.
//!
//! While the gateway's NATS connection is down its subscriptions are gone, so a login of one of
//! its devices on another gateway finds no holder and wins, and this gateway's session is not
//! told. When the connection comes back, the link resubscribes every session and both sessions
//! are subscribed: each message to the device reaches two sessions, and a presence request may
//! be answered by the stale one, until one of them ends (the stale one usually by its idle
//! timeout, minutes later).
//!
//! So after every (re)connect this task sends a `reclaim` for each welcomed session, with the
//! session's original [`ClaimKey`]. A holder elsewhere compares keys: the older session yields,
//! exactly as two concurrent logins settle. If ours is the older one we hear `superseded` and
//! release it (`GOAWAY replaced`, after delivering what was already routed to it). "No
//! responders", the common case, means nobody else holds the device. `released` means a
//! session elsewhere let go, but another may remain (a request keeps only the first answer),
//! so the reclaim is repeated, as a login's claim is.
//!
//! The same sweep runs when `peers.rs` finds in another gateway's announcements that a
//! partition between NATS cluster nodes healed: one splits devices the same way, without
//! disconnecting anyone (or after a reconnect whose sweep reached nobody).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::bus::RequestError;
use crate::contract::{ClaimKey, DeviceId, subjects, subjects::ControlOp};
use crate::metrics::Reclaim;
use crate::server::Shared;
use crate::session::{ClaimRound, MAX_CLAIM_ROUNDS, claim_request};

/// Reclaims in flight at once: enough to finish 100k sessions in seconds, few enough that a
/// reconnect does not flood a NATS server that every other gateway may be reconnecting to.
const CONCURRENCY: usize = 64;

/// Partition sweeps are at least this many beats apart (and 5 s).
const PARTITION_SWEEP_SPACING: u32 = 5;

/// Starts the task; it sweeps after every (re)connect and whenever `heal` rings (another
/// gateway's announcements show a healed NATS partition; rings during a sweep are kept for
/// one more), and ends at the gateway's hard stop.
pub(crate) fn spawn(shared: Arc<Shared>, heal: Arc<Notify>) -> JoinHandle<()> {
    tokio::spawn(run(shared, heal))
}

async fn run(shared: Arc<Shared>, heal: Arc<Notify>) {
    let link = shared.bus.link().clone();
    let mut connected = shared.bus.connected_watch();
    // The connection generation last swept; the first connect is swept too (it costs nothing:
    // logins wait for NATS, so there are no sessions yet).
    let mut swept = 0;
    let mut last_partition_sweep: Option<Instant> = None;
    loop {
        let reconnected = tokio::select! {
            () = shared.hard_stop.cancelled() => return,
            up = connected.wait_for(|up| *up && link.epoch() != swept) => {
                if up.is_err() {
                    return;
                }
                true
            }
            // While disconnected the reconnect's sweep comes anyway.
            () = heal.notified(), if link.is_connected() => false,
        };
        let why = if reconnected {
            // Whatever rang meanwhile is covered by this sweep.
            let _ = heal.notified().now_or_never();
            "NATS connected"
        } else {
            // Every gateway on the other side of a healed cut rings within about a beat: one
            // sweep for all of them. And a route that keeps flapping sweeps at most every
            // PARTITION_SWEEP_SPACING beats (5 s at least), not at every ring.
            let beat = Duration::from_millis(shared.config.announce_interval_ms);
            let spacing = (beat * PARTITION_SWEEP_SPACING).max(Duration::from_secs(5));
            let mut at = Instant::now() + beat;
            if let Some(last) = last_partition_sweep {
                at = at.max(last + spacing);
            }
            tokio::select! {
                () = shared.hard_stop.cancelled() => return,
                () = tokio::time::sleep_until(at) => {}
            }
            let _ = heal.notified().now_or_never();
            if !link.is_connected() || link.epoch() != swept {
                // Its reconnect sweep comes instead.
                continue;
            }
            last_partition_sweep = Some(Instant::now());
            shared.metrics.partition_sweeps.inc();
            "another gateway's announcements show a NATS partition that healed"
        };
        swept = link.epoch();
        // A sweep cut short by another disconnect ends quickly (its requests fail) and the
        // reconnect starts a new one over the sessions of that moment.
        tokio::select! {
            () = shared.hard_stop.cancelled() => return,
            () = sweep(&shared, why) => {}
        }
    }
}

/// Re-asserts the claim of every welcomed session once.
async fn sweep(shared: &Shared, why: &str) {
    let claims = shared.registry.welcomed_claims();
    if claims.is_empty() {
        return;
    }
    let sessions = claims.len();
    tracing::info!(instance = %shared.instance, sessions, why, "re-checking that no other gateway took over a device meanwhile");
    let unanswered = AtomicUsize::new(0);
    futures::stream::iter(claims)
        .for_each_concurrent(CONCURRENCY, |(id, session, login_ns)| {
            let unanswered = &unanswered;
            async move {
                let outcome = match reclaim(shared, id, session, login_ns).await {
                    Ok(outcome) => outcome,
                    Err(error) => {
                        if unanswered.fetch_add(1, Ordering::Relaxed) == 0 {
                            tracing::warn!(instance = %shared.instance, %error, "a reclaim got no answer; its session stays, and the next reconnect re-checks it");
                        }
                        Reclaim::Unanswered
                    }
                };
                shared.metrics.reclaim(outcome);
            }
        })
        .await;
    let unanswered = unanswered.into_inner();
    if unanswered > 0 {
        tracing::warn!(instance = %shared.instance, sessions, unanswered, why, "reclaims that got no answer");
    }
}

/// Reclaims one session until it is settled.
async fn reclaim(
    shared: &Shared,
    id: DeviceId,
    session: String,
    login_ns: u64,
) -> Result<Reclaim, RequestError> {
    let key = ClaimKey {
        login_ns,
        gateway: shared.instance.clone(),
        session,
    };
    let down = subjects::down(&id);
    let mut took_back = false;
    let settled = |took_back| {
        if took_back {
            Reclaim::TookBack
        } else {
            Reclaim::Clear
        }
    };
    for _ in 0..MAX_CLAIM_ROUNDS {
        // Only for a session that still holds the device here: the key of one that ended
        // would make a live holder elsewhere yield for nothing.
        if shared.registry.unreleased_login_ns(&id, &key.session) != Some(key.login_ns) {
            return Ok(Reclaim::Ended);
        }
        match claim_request(shared, ControlOp::Reclaim, &down, &key, true).await? {
            // Nobody else holds it.
            Some(ClaimRound::Clear) => return Ok(settled(took_back)),
            // An older session let go; another may remain.
            Some(ClaimRound::Released { .. }) => took_back = true,
            // Not an answer to decide on (a gateway that does not know `reclaim` yet): this
            // session stays, as it would without the reclaim.
            None => return Ok(Reclaim::Unreadable),
            Some(ClaimRound::Superseded) => {
                // False: the session ended or is being replaced anyway.
                if !shared.registry.release(&id, &key.session) {
                    return Ok(Reclaim::Ended);
                }
                shared.metrics.reclaims_lost.inc();
                tracing::warn!(device_id = %id, session = %key.session, "a newer session of this device was welcomed elsewhere while NATS was away or split; releasing this one");
                return Ok(Reclaim::Lost);
            }
        }
    }
    // Every round heard `released`: sessions elsewhere keep letting go (a device flapping
    // between gateways). This one stays; another may remain until the next reconnect.
    tracing::warn!(device_id = %id, session = %key.session, rounds = MAX_CLAIM_ROUNDS, "reclaim still answered 'released' after every round; keeping this session");
    Ok(settled(took_back))
}
