//! Sources discover the gateway instances and publish COMPLETE snapshots of them.
//!
//! A snapshot is only ever sent once the source knows the whole set (the Kubernetes list is
//! done, or a full heartbeat window of NATS announcements has been heard), so the controller can
//! never write an upstream built from partial data. Snapshots travel on a `watch` channel: each
//! one supersedes the previous, so when the controller is busy the older unread snapshot is
//! simply replaced (latest wins) and the channel never grows.

pub mod kube;
pub mod nats;
pub mod static_list;

use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::controller::Status;
use crate::endpoints::{Endpoint, Snapshot};
use crate::metrics::Metrics;

/// Sending side of the snapshot channel; `None` until the first complete snapshot.
pub type SnapshotTx = watch::Sender<Option<Snapshot>>;

/// Receiving side of the snapshot channel.
pub type SnapshotRx = watch::Receiver<Option<Snapshot>>;

/// One of the configured sources, ready to run.
pub enum Source {
    /// A fixed list.
    Static(Vec<Endpoint>),
    /// Gateway announcements on NATS.
    Nats(nats::NatsSource),
    /// EndpointSlices of the gateway Service.
    Kube(kube::KubeSource),
}

impl Source {
    /// Runs until `shutdown`, sending complete snapshots on `tx`. Connection problems are retried
    /// inside; nothing a backend does ends this early. `status` hears why the source fails.
    pub async fn run(
        self,
        tx: SnapshotTx,
        metrics: Metrics,
        status: Arc<Status>,
        shutdown: CancellationToken,
    ) {
        match self {
            Source::Static(endpoints) => static_list::run(endpoints, tx, metrics, shutdown).await,
            Source::Nats(s) => s.run(tx, metrics, shutdown).await,
            Source::Kube(s) => s.run(tx, metrics, status, shutdown).await,
        }
    }
}

/// Sends `endpoints` as a new snapshot unless they equal the last one sent (compared in sorted
/// order), so a source that re-learns the same set does not wake the controller.
pub(crate) fn publish(
    tx: &SnapshotTx,
    last: &mut Option<Vec<Endpoint>>,
    mut endpoints: Vec<Endpoint>,
    metrics: &Metrics,
) {
    endpoints.sort();
    if last.as_ref() == Some(&endpoints) {
        return;
    }
    let snapshot = Snapshot::now(endpoints.clone());
    metrics.snapshot(&snapshot);
    *last = Some(endpoints);
    // An error means the controller is gone (shutting down): nothing left to tell.
    let _ = tx.send(Some(snapshot));
}
