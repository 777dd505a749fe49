//! The static source: a fixed list from the command line, for the simplest setups and tests.

use tokio_util::sync::CancellationToken;

use super::{SnapshotTx, publish};
use crate::endpoints::Endpoint;
use crate::metrics::Metrics;

/// Publishes `endpoints` once (a fixed list is complete by definition) and idles until shutdown.
pub async fn run(
    endpoints: Vec<Endpoint>,
    tx: SnapshotTx,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    metrics.source_connected.set(1);
    publish(&tx, &mut None, endpoints, &metrics);
    shutdown.cancelled().await;
}
