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
//! responders", the common case, means nobody else holds the device.

use std::sync::Arc;

use futures::StreamExt;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::contract::{ClaimKey, DeviceId, subjects, subjects::ControlOp};
use crate::registry::SessionCommand;
use crate::server::Shared;
use crate::session::{ClaimRound, claim_request};

/// Reclaims in flight at once: enough to finish 100k sessions in seconds, few enough that a
/// reconnect does not flood a NATS server that every other gateway may be reconnecting to.
const CONCURRENCY: usize = 64;

/// Starts the task; it ends at the gateway's hard stop.
pub(crate) fn spawn(shared: Arc<Shared>) -> JoinHandle<()> {
    tokio::spawn(run(shared))
}

async fn run(shared: Arc<Shared>) {
    let link = shared.bus.link().clone();
    let mut connected = shared.bus.connected_watch();
    // The connection generation last swept; the first connect is swept too (it costs nothing:
    // logins wait for NATS, so there are no sessions yet).
    let mut swept = 0;
    loop {
        tokio::select! {
            () = shared.hard_stop.cancelled() => return,
            up = connected.wait_for(|up| *up && link.epoch() != swept) => if up.is_err() { return },
        }
        swept = link.epoch();
        // A sweep cut short by another disconnect ends quickly (its requests fail) and the
        // reconnect starts a new one over the sessions of that moment.
        tokio::select! {
            () = shared.hard_stop.cancelled() => return,
            () = sweep(&shared) => {}
        }
    }
}

/// Re-asserts the claim of every welcomed session once.
async fn sweep(shared: &Shared) {
    let claims = shared.registry.welcomed_claims();
    if claims.is_empty() {
        return;
    }
    tracing::info!(instance = %shared.instance, sessions = claims.len(), "NATS connected: re-checking that no other gateway took over a device meanwhile");
    futures::stream::iter(claims)
        .for_each_concurrent(CONCURRENCY, |(id, session, login_ns)| {
            reclaim(shared, id, session, login_ns)
        })
        .await;
}

async fn reclaim(shared: &Shared, id: DeviceId, session: String, login_ns: u64) {
    let key = ClaimKey {
        login_ns,
        gateway: shared.instance.clone(),
        session,
    };
    let down = subjects::down(&id);
    match claim_request(shared, ControlOp::Reclaim, &down, &key).await {
        Ok(ClaimRound::Superseded) => {
            let Some(commands) = shared.registry.take_commands(&id, &key.session) else {
                return; // the session ended or is being replaced anyway
            };
            shared.metrics.reclaims_lost.inc();
            tracing::warn!(device_id = %id, session = %key.session, "a newer session of this device was welcomed elsewhere while NATS was away; releasing this one");
            let (done, _released) = oneshot::channel();
            let _ = commands.send(SessionCommand::Release { done });
        }
        // Nobody else holds it, or the other (older) session let go.
        Ok(ClaimRound::Clear | ClaimRound::Released) => {}
        Err(error) => {
            tracing::debug!(device_id = %id, session = %key.session, %error, "reclaim not answered; the next reconnect re-checks");
        }
    }
}
