//! Prometheus metrics: what the source sees, what was rendered and applied, what failed, and how
//! long a change in the gateway fleet takes to reach nginx.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::endpoints::{DesiredSet, EndpointState, Snapshot};

/// Label of `endpoints_seen`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct StateLabel {
    /// `ready`, `not_ready` or `terminating`.
    pub state: &'static str,
}

/// Label of `failures_total`: which step failed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct StageLabel {
    /// One of [`STAGES`].
    pub stage: &'static str,
}

/// Every value of the `stage` label. Each series exists from start-up at 0, so a first failure
/// is an increase that `increase()`/`rate()` see (a series born at 1 looks unchanged to them)
/// and an alert may name a stage before it ever failed.
pub const STAGES: [&str; 6] = [
    "source",
    "write",
    "validate",
    "reload",
    "apply",
    "tls_files",
];

/// Every lb-sync metric; cheap to clone handles are shared by the source, controller and sink.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Endpoints in the latest complete snapshot, by state.
    pub endpoints_seen: Family<StateLabel, Gauge>,
    /// Servers in the upstream that was last applied.
    pub servers_in_rotation: Gauge,
    /// Complete snapshots produced by the source.
    pub snapshots: Counter,
    /// Renders of the configuration.
    pub renders: Counter,
    /// Renders identical to what is applied already (no write, no reload).
    pub unchanged: Counter,
    /// Successful applies (file written, validated and nginx reloaded; or ConfigMap applied).
    pub applies: Counter,
    /// nginx reloads run by the file sink.
    pub reloads: Counter,
    /// Failures by stage.
    pub failures: Family<StageLabel, Counter>,
    /// Seconds from the source observing a change to the change being applied.
    pub change_to_applied: Histogram,
    /// 1 while the source is connected to its backend: NATS connected; for the Kubernetes API,
    /// from each complete list until a list or watch fails (after a failure lb-sync lists
    /// again, so the gauge comes back without waiting for a slice to change).
    pub source_connected: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let metrics = Metrics {
            endpoints_seen: Family::default(),
            servers_in_rotation: Gauge::default(),
            snapshots: Counter::default(),
            renders: Counter::default(),
            unchanged: Counter::default(),
            applies: Counter::default(),
            reloads: Counter::default(),
            failures: Family::default(),
            change_to_applied: Histogram::new(exponential_buckets(0.01, 2.0, 12)),
            source_connected: Gauge::default(),
        };
        for stage in STAGES {
            let _created = metrics.failures.get_or_create(&StageLabel { stage });
        }
        for state in [
            EndpointState::Ready,
            EndpointState::NotReady,
            EndpointState::Terminating,
        ] {
            let _created = metrics.endpoints_seen.get_or_create(&StateLabel {
                state: state.as_str(),
            });
        }
        metrics
    }
}

impl Metrics {
    /// Registers every metric under the `devgate_lb_sync` prefix.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("devgate_lb_sync");
        r.register(
            "endpoints_seen",
            "Endpoints in the latest complete snapshot, by state",
            self.endpoints_seen.clone(),
        );
        r.register(
            "servers_in_rotation",
            "Servers in the upstream last applied",
            self.servers_in_rotation.clone(),
        );
        r.register(
            "snapshots",
            "Complete snapshots from the source",
            self.snapshots.clone(),
        );
        r.register("renders", "Configuration renders", self.renders.clone());
        r.register(
            "unchanged",
            "Renders identical to the applied configuration",
            self.unchanged.clone(),
        );
        r.register("applies", "Successful applies", self.applies.clone());
        r.register(
            "reloads",
            "nginx reloads run by the file sink",
            self.reloads.clone(),
        );
        r.register("failures", "Failures by stage", self.failures.clone());
        r.register(
            "change_to_applied_seconds",
            "Time from a fleet change being observed to it being applied",
            self.change_to_applied.clone(),
        );
        r.register(
            "source_connected",
            "1 while the source is connected to its backend (Kubernetes: from a complete list \
             until a list or watch fails)",
            self.source_connected.clone(),
        );
    }

    /// Counts a failure of `stage` (one of [`STAGES`]).
    pub fn failed(&self, stage: &'static str) {
        debug_assert!(STAGES.contains(&stage), "stage {stage} is not in STAGES");
        self.failures.get_or_create(&StageLabel { stage }).inc();
    }

    /// How many failures of `stage` were counted (for tests and probes).
    pub fn failures_at(&self, stage: &'static str) -> u64 {
        self.failures.get_or_create(&StageLabel { stage }).get()
    }

    /// Records a complete snapshot from the source.
    pub fn snapshot(&self, snapshot: &Snapshot) {
        self.snapshots.inc();
        for (state, n) in snapshot.counts() {
            self.endpoints_seen
                .get_or_create(&StateLabel {
                    state: state.as_str(),
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// Records the set that is now applied.
    pub fn applied(&self, set: &DesiredSet) {
        self.servers_in_rotation
            .set(i64::try_from(set.len()).unwrap_or(i64::MAX));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_failure_stage_and_endpoint_state_is_exported_from_the_start() {
        let mut registry = Registry::default();
        Metrics::default().register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        for stage in STAGES {
            let line = format!("devgate_lb_sync_failures_total{{stage=\"{stage}\"}} 0");
            assert!(text.contains(&line), "{line} missing in:\n{text}");
        }
        for state in ["ready", "not_ready", "terminating"] {
            let line = format!("devgate_lb_sync_endpoints_seen{{state=\"{state}\"}} 0");
            assert!(text.contains(&line), "{line} missing in:\n{text}");
        }
    }
}
