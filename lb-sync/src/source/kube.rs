//! The Kubernetes source: the EndpointSlices of the gateway Service (label
//! `kubernetes.io/service-name`), followed with kube-runtime's watcher.
//!
//! The watcher lists, then watches; when the API server ends a watch it resumes from the last
//! version. After a failed list or watch lb-sync starts a new watcher, which lists again (see
//! [`KubeSource::run`] for why). Its events are folded into a [`SliceSet`], which publishes
//! only at points where it holds the complete set: after each full list (`InitDone`) and after
//! every later change. During a (re)list nothing is published, so an upstream is never built
//! from half a list.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use devgate_gateway::common::ErrorChain;
use futures::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::runtime::watcher;
use tokio_util::sync::CancellationToken;

use super::{SnapshotTx, publish};
use crate::controller::Status;
use crate::endpoints::{Endpoint, EndpointState};
use crate::metrics::Metrics;

/// The label every EndpointSlice carries with the name of its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Why a slice contributes no endpoints.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SliceError {
    /// FQDN slices name hosts, not addresses; nginx would resolve them only at load time.
    #[error("address type {0} is not supported (IPv4 and IPv6 are)")]
    AddressType(String),
    /// None of the slice's ports is the device port.
    #[error("no port named {wanted:?} among {found:?} (a single port is used only when unnamed)")]
    NoDevicePort {
        /// The configured port name.
        wanted: String,
        /// The slice's port names.
        found: Vec<String>,
    },
}

/// The endpoints of one slice, on the device port: the port named `port_name`, or else a
/// slice's only port if it is unnamed (a Service with one unnamed port). A single port with
/// another name is some other port, such as `http` when the EndpointSlice controller dropped a
/// named device port the pods could not resolve: devices sent there would reach the wrong
/// listener. An endpoint's first address is used (the API guarantees the others are fungible)
/// and its conditions decide its state.
pub fn slice_endpoints(
    slice: &EndpointSlice,
    port_name: &str,
) -> Result<Vec<Endpoint>, SliceError> {
    if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
        return Err(SliceError::AddressType(slice.address_type.clone()));
    }
    let ports = slice.ports.as_deref().unwrap_or_default();
    let port = ports
        .iter()
        .find(|p| p.name.as_deref() == Some(port_name))
        .or(match ports {
            [only] if only.name.as_deref().is_none_or(str::is_empty) => Some(only),
            _ => None,
        })
        .and_then(|p| p.port)
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0);
    let Some(port) = port else {
        // A slice with no ports at all has no endpoints either (the Service selects nothing).
        if ports.is_empty() && slice.endpoints.is_empty() {
            return Ok(Vec::new());
        }
        return Err(SliceError::NoDevicePort {
            wanted: port_name.to_owned(),
            found: ports
                .iter()
                .map(|p| p.name.clone().unwrap_or_default())
                .collect(),
        });
    };
    Ok(slice
        .endpoints
        .iter()
        .filter_map(|e| {
            let ip: std::net::IpAddr = e.addresses.first()?.parse().ok()?;
            let c = e.conditions.as_ref();
            Some(Endpoint {
                addr: std::net::SocketAddr::new(ip, port),
                state: EndpointState::from_conditions(
                    c.and_then(|c| c.ready),
                    c.and_then(|c| c.terminating),
                ),
                weight: None,
            })
        })
        .collect())
}

/// The slices of the Service, folded from watcher events. Pure, so the event sequences of a
/// relist or a `410 Gone` resync are unit-tested without an API server.
#[derive(Debug, Default)]
pub struct SliceSet {
    slices: BTreeMap<String, Vec<Endpoint>>,
    /// `Some` while a (re)list is in progress: the new list is collected here and replaces
    /// `slices` only when it is complete.
    relist: Option<BTreeMap<String, Vec<Endpoint>>>,
    /// True once a first list has completed.
    listed: bool,
}

fn slice_key(slice: &EndpointSlice) -> String {
    format!(
        "{}/{}",
        slice.metadata.namespace.as_deref().unwrap_or_default(),
        slice.metadata.name.as_deref().unwrap_or_default()
    )
}

impl SliceSet {
    /// Applies one watcher event; returns true when the set is complete and may have changed
    /// (time to publish).
    pub fn apply(&mut self, event: watcher::Event<EndpointSlice>, port_name: &str) -> bool {
        let convert = |slice: &EndpointSlice| match slice_endpoints(slice, port_name) {
            Ok(eps) => eps,
            Err(error) => {
                tracing::warn!(slice = %slice_key(slice), %error, "skipping EndpointSlice");
                Vec::new()
            }
        };
        match event {
            watcher::Event::Init => {
                self.relist = Some(BTreeMap::new());
                false
            }
            watcher::Event::InitApply(slice) => {
                let eps = convert(&slice);
                self.relist
                    .get_or_insert_default()
                    .insert(slice_key(&slice), eps);
                false
            }
            watcher::Event::InitDone => {
                self.slices = self.relist.take().unwrap_or_default();
                self.listed = true;
                true
            }
            watcher::Event::Apply(slice) => {
                let eps = convert(&slice);
                self.slices.insert(slice_key(&slice), eps);
                self.listed && self.relist.is_none()
            }
            watcher::Event::Delete(slice) => {
                self.slices.remove(&slice_key(&slice));
                self.listed && self.relist.is_none()
            }
        }
    }

    /// Every endpoint of every slice, in any state.
    pub fn endpoints(&self) -> Vec<Endpoint> {
        self.slices.values().flatten().cloned().collect()
    }
}

/// A configured Kubernetes source.
pub struct KubeSource {
    api: Api<EndpointSlice>,
    service: String,
    port_name: String,
}

impl KubeSource {
    /// Watches the slices of `service` in `namespace`.
    pub fn new(client: kube::Client, namespace: &str, service: &str, port_name: &str) -> Self {
        KubeSource {
            api: Api::namespaced(client, namespace),
            service: service.to_owned(),
            port_name: port_name.to_owned(),
        }
    }

    /// Follows the slices until `shutdown`. A failed list or watch is logged and counted, sets
    /// `source_connected` to 0, and after a backoff a new watcher lists again;
    /// `source_connected` is 1 again once a list completes.
    ///
    /// Why a new watcher instead of kube-runtime's own retry: a watcher that resumes a watch
    /// after a failure emits nothing until the next slice changes, so nothing would tell that
    /// the API answers again, and `source_connected` would stay 0 for as long as the fleet is
    /// quiet (an alert fires on it). A list of one Service's slices is a small request, made
    /// once per failure, and it also proves the API answers with the complete set.
    pub async fn run(
        self,
        tx: SnapshotTx,
        metrics: Metrics,
        status: Arc<Status>,
        shutdown: CancellationToken,
    ) {
        let selector = format!("{SERVICE_NAME_LABEL}={}", self.service);
        let mut set = SliceSet::default();
        let mut last_sent = None;
        // kube-runtime's own retry policy, as before: 0.8 s doubling to 30 s with jitter, from
        // the start again after 2 quiet minutes. The doubling matters when the list works and
        // the watch keeps failing (RBAC without `watch`, say): each round is a list.
        let mut backoff = watcher::DefaultBackoff::default();
        loop {
            let stream = watcher(
                self.api.clone(),
                watcher::Config::default().labels(&selector),
            );
            let mut stream = std::pin::pin!(stream);
            let failed = loop {
                let event = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    event = stream.next() => event,
                };
                match event {
                    Some(Ok(event)) => {
                        if matches!(event, watcher::Event::Init) {
                            // Emitted before each (re)list is even sent: no proof the API
                            // answered, so the last failure stays readable in `/readyz`
                            // meanwhile, and `source_connected` stays as it is.
                            tracing::debug!(service = %self.service, "listing EndpointSlices");
                        } else {
                            status.source_error(None);
                        }
                        if set.apply(event, &self.port_name) {
                            metrics.source_connected.set(1);
                            publish(&tx, &mut last_sent, set.endpoints(), &metrics);
                        }
                    }
                    Some(Err(error)) => break ErrorChain(&error).to_string(),
                    None => {
                        tracing::error!("EndpointSlice watcher ended");
                        shutdown.cancelled().await;
                        return;
                    }
                }
            };
            let delay = backoff.next().unwrap_or(Duration::from_secs(30));
            tracing::warn!(
                service = %self.service,
                error = %failed,
                retry_in_ms = delay.as_millis() as u64,
                "EndpointSlice list or watch failed; listing again"
            );
            // The reason before the count: whoever sees the count can read why.
            status.source_error(Some(failed));
            metrics.failed("source");
            metrics.source_connected.set(0);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::discovery::v1::{
        Endpoint as K8sEndpoint, EndpointConditions, EndpointPort,
    };
    use kube::api::ObjectMeta;

    use super::*;

    fn slice(
        name: &str,
        ports: &[(&str, i32)],
        eps: &[(&str, Option<bool>, Option<bool>)],
    ) -> EndpointSlice {
        EndpointSlice {
            address_type: "IPv4".into(),
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("devgate".into()),
                ..Default::default()
            },
            ports: Some(
                ports
                    .iter()
                    .map(|(n, p)| EndpointPort {
                        name: Some((*n).into()),
                        port: Some(*p),
                        protocol: Some("TCP".into()),
                        ..Default::default()
                    })
                    .collect(),
            ),
            endpoints: eps
                .iter()
                .map(|(ip, ready, terminating)| K8sEndpoint {
                    addresses: vec![(*ip).into()],
                    conditions: Some(EndpointConditions {
                        ready: *ready,
                        serving: *ready,
                        terminating: *terminating,
                    }),
                    ..Default::default()
                })
                .collect(),
        }
    }

    #[test]
    fn slices_map_conditions_and_the_named_port() {
        let s = slice(
            "gw-a",
            &[("http", 9090), ("device", 7000)],
            &[
                ("10.0.0.1", Some(true), None),
                ("10.0.0.2", Some(false), Some(true)),
                ("10.0.0.3", Some(false), Some(false)),
                ("10.0.0.4", None, None),
            ],
        );
        let eps = slice_endpoints(&s, "device").expect("valid slice");
        let got: Vec<_> = eps.iter().map(|e| (e.addr.to_string(), e.state)).collect();
        assert_eq!(
            got,
            vec![
                ("10.0.0.1:7000".to_owned(), EndpointState::Ready),
                ("10.0.0.2:7000".to_owned(), EndpointState::Terminating),
                ("10.0.0.3:7000".to_owned(), EndpointState::NotReady),
                ("10.0.0.4:7000".to_owned(), EndpointState::Ready),
            ]
        );
    }

    #[test]
    fn a_single_unnamed_port_is_used() {
        let mut s = slice("gw-a", &[("", 7001)], &[("10.0.0.1", Some(true), None)]);
        let eps = slice_endpoints(&s, "device").expect("single empty-named port");
        assert_eq!(eps[0].addr.port(), 7001);
        if let Some(port) = s.ports.as_mut().and_then(|p| p.first_mut()) {
            port.name = None;
        }
        let eps = slice_endpoints(&s, "device").expect("single unnamed port");
        assert_eq!(eps[0].addr.port(), 7001);
    }

    #[test]
    fn a_single_port_named_otherwise_is_not_the_device_port() {
        let s = slice("gw-a", &[("http", 9090)], &[("10.0.0.1", Some(true), None)]);
        assert_eq!(
            slice_endpoints(&s, "device"),
            Err(SliceError::NoDevicePort {
                wanted: "device".into(),
                found: vec!["http".into()],
            })
        );
    }

    #[test]
    fn a_single_port_named_as_the_device_port_is_used() {
        let s = slice(
            "gw-a",
            &[("device", 7000)],
            &[("10.0.0.1", Some(true), None)],
        );
        let eps = slice_endpoints(&s, "device").expect("named device port");
        assert_eq!(eps[0].addr.port(), 7000);
    }

    #[test]
    fn ambiguous_ports_and_fqdn_slices_are_refused() {
        let s = slice(
            "gw-a",
            &[("a", 1), ("b", 2)],
            &[("10.0.0.1", Some(true), None)],
        );
        assert!(matches!(
            slice_endpoints(&s, "device"),
            Err(SliceError::NoDevicePort { .. })
        ));
        let mut f = slice(
            "gw-a",
            &[("device", 7000)],
            &[("gw.example", Some(true), None)],
        );
        f.address_type = "FQDN".into();
        assert!(matches!(
            slice_endpoints(&f, "device"),
            Err(SliceError::AddressType(_))
        ));
    }

    #[test]
    fn nothing_is_published_until_the_list_is_complete() {
        let mut set = SliceSet::default();
        let a = slice("a", &[("device", 7000)], &[("10.0.0.1", Some(true), None)]);
        let b = slice("b", &[("device", 7000)], &[("10.0.0.2", Some(true), None)]);
        assert!(!set.apply(watcher::Event::Init, "device"));
        assert!(!set.apply(watcher::Event::InitApply(a.clone()), "device"));
        assert!(set.endpoints().is_empty(), "partial list not visible");
        assert!(!set.apply(watcher::Event::InitApply(b.clone()), "device"));
        assert!(set.apply(watcher::Event::InitDone, "device"));
        assert_eq!(set.endpoints().len(), 2);
        // A resync (410 Gone) relists: the old set stays until the new list is done, and
        // slices missing from the new list are gone afterwards.
        assert!(!set.apply(watcher::Event::Init, "device"));
        assert!(!set.apply(watcher::Event::InitApply(a.clone()), "device"));
        assert_eq!(set.endpoints().len(), 2, "old set kept during relist");
        assert!(set.apply(watcher::Event::InitDone, "device"));
        assert_eq!(set.endpoints().len(), 1);
    }

    #[test]
    fn watch_events_update_the_complete_set() {
        let mut set = SliceSet::default();
        let a = slice("a", &[("device", 7000)], &[("10.0.0.1", Some(true), None)]);
        assert!(
            !set.apply(watcher::Event::Apply(a.clone()), "device"),
            "not listed yet"
        );
        set.apply(watcher::Event::Init, "device");
        set.apply(watcher::Event::InitDone, "device");
        assert!(set.apply(watcher::Event::Apply(a.clone()), "device"));
        assert_eq!(set.endpoints().len(), 1);
        assert!(set.apply(watcher::Event::Delete(a), "device"));
        assert!(set.endpoints().is_empty());
    }
}
