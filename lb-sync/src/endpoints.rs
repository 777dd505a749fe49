//! The model lb-sync reconciles: gateway endpoints as the sources see them, and the desired set
//! of upstream servers derived from them.
//!
//! Sources report *everything* they know (ready or not) so metrics can show what was seen; only
//! [`DesiredSet`] decides what is in rotation. The desired set is ordered by address, so the same
//! set always renders to the same bytes and an unchanged set never causes a reload.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;

use tokio::time::Instant;

/// Where a gateway endpoint is in its life cycle. Only [`EndpointState::Ready`] endpoints get
/// new connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EndpointState {
    /// Accepting new devices.
    Ready,
    /// Alive but not accepting new devices (starting, lost NATS, ...).
    NotReady,
    /// Shutting down: must leave the rotation even if it still serves its existing devices.
    Terminating,
}

impl EndpointState {
    /// Label value for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            EndpointState::Ready => "ready",
            EndpointState::NotReady => "not_ready",
            EndpointState::Terminating => "terminating",
        }
    }

    /// Folds Kubernetes EndpointConditions into one state. `ready` absent means ready and
    /// `terminating` absent means not terminating (the API's documented defaults); `serving`
    /// alone never puts an endpoint in rotation, because a serving-but-terminating pod is
    /// draining its devices and must not get new ones.
    pub fn from_conditions(ready: Option<bool>, terminating: Option<bool>) -> Self {
        if terminating.unwrap_or(false) {
            EndpointState::Terminating
        } else if ready.unwrap_or(true) {
            EndpointState::Ready
        } else {
            EndpointState::NotReady
        }
    }

    /// Folds a gateway announcement's flags into one state: draining wins over ready.
    pub fn from_announce(ready: bool, draining: bool) -> Self {
        match (ready, draining) {
            (_, true) => EndpointState::Terminating,
            (true, false) => EndpointState::Ready,
            (false, false) => EndpointState::NotReady,
        }
    }
}

impl fmt::Display for EndpointState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One gateway instance's device port, as a source sees it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Endpoint {
    /// IP address and device port. Host names are not accepted: nginx resolves them only when it
    /// loads its configuration, and one unresolvable name would fail every later reload.
    pub addr: SocketAddr,
    /// Life-cycle state.
    pub state: EndpointState,
    /// Relative share of new connections (nginx `weight=`); `None` is nginx's default of 1.
    pub weight: Option<u32>,
}

impl Endpoint {
    /// A ready endpoint with the default weight (static lists, tests).
    pub fn ready(addr: SocketAddr) -> Self {
        Endpoint {
            addr,
            state: EndpointState::Ready,
            weight: None,
        }
    }
}

/// Why an address string was refused as an endpoint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    /// Not `IP:PORT` (IPv6 as `[IP]:PORT`).
    #[error("{0:?} is not IP:PORT (host names are not accepted; IPv6 as [IP]:PORT)")]
    Syntax(String),
    /// 0.0.0.0 or [::] means "every local address" to a listener but is not reachable as a
    /// destination; the gateway's `--advertise-addr` must be set to a routable address.
    #[error("{0} is an unspecified address; the instance must advertise a routable address")]
    Unspecified(SocketAddr),
    /// Port 0 is not a port anything listens on.
    #[error("{0} has port 0")]
    PortZero(SocketAddr),
    /// Weights are 1..=1000 so a typo cannot starve every other instance.
    #[error("weight {0} is outside 1..=1000")]
    Weight(u64),
}

/// Parses `IP:PORT` into a destination address fit for an upstream `server` line.
pub fn parse_addr(s: &str) -> Result<SocketAddr, AddrError> {
    let addr: SocketAddr = s
        .trim()
        .parse()
        .map_err(|_| AddrError::Syntax(s.to_owned()))?;
    if addr.ip().is_unspecified() {
        return Err(AddrError::Unspecified(addr));
    }
    if addr.port() == 0 {
        return Err(AddrError::PortZero(addr));
    }
    Ok(addr)
}

/// Parses a static endpoint: `IP:PORT` or `IP:PORT=WEIGHT`.
pub fn parse_static_endpoint(s: &str) -> Result<Endpoint, AddrError> {
    let (addr, weight) = match s.rsplit_once('=') {
        Some((addr, w)) => {
            let w: u64 = w
                .trim()
                .parse()
                .map_err(|_| AddrError::Syntax(s.to_owned()))?;
            (addr, Some(w))
        }
        None => (s, None),
    };
    let weight = weight
        .map(|w| match u32::try_from(w) {
            Ok(w) if (1..=MAX_WEIGHT).contains(&w) => Ok(w),
            _ => Err(AddrError::Weight(w)),
        })
        .transpose()?;
    Ok(Endpoint {
        addr: parse_addr(addr)?,
        state: EndpointState::Ready,
        weight,
    })
}

/// Largest accepted weight.
pub const MAX_WEIGHT: u32 = 1000;

/// A complete view of the gateway endpoints from one source at one moment.
///
/// Sources only ever produce complete snapshots (after a full list, or after a full heartbeat
/// window of announcements), so the controller can never write an upstream built from partial
/// data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Every endpoint the source knows, in any state.
    pub endpoints: Vec<Endpoint>,
    /// When the source observed the change that produced this snapshot; the controller measures
    /// change-to-applied time from here.
    pub observed_at: Instant,
}

impl Snapshot {
    /// A snapshot observed now.
    pub fn now(endpoints: Vec<Endpoint>) -> Self {
        Snapshot {
            endpoints,
            observed_at: Instant::now(),
        }
    }

    /// How many endpoints are in each state, for the `endpoints_seen` gauge.
    pub fn counts(&self) -> [(EndpointState, usize); 3] {
        let count = |s| self.endpoints.iter().filter(|e| e.state == s).count();
        [
            (EndpointState::Ready, count(EndpointState::Ready)),
            (EndpointState::NotReady, count(EndpointState::NotReady)),
            (
                EndpointState::Terminating,
                count(EndpointState::Terminating),
            ),
        ]
    }
}

/// The upstream servers that should be in rotation: ready endpoints only, one entry per
/// address, ordered by address so rendering is deterministic.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DesiredSet {
    servers: BTreeMap<SocketAddr, Option<u32>>,
}

impl DesiredSet {
    /// Keeps the ready endpoints. When two report the same address (an instance restarted on
    /// the same IP:port before the old announcement expired) it is one server, with the larger
    /// weight.
    pub fn from_endpoints<'a>(endpoints: impl IntoIterator<Item = &'a Endpoint>) -> Self {
        let mut servers = BTreeMap::new();
        for e in endpoints {
            if e.state != EndpointState::Ready {
                continue;
            }
            servers
                .entry(e.addr)
                .and_modify(|w: &mut Option<u32>| *w = (*w).max(e.weight))
                .or_insert(e.weight);
        }
        DesiredSet { servers }
    }

    /// Servers in render order: `(address, weight)`.
    pub fn servers(&self) -> impl Iterator<Item = (SocketAddr, Option<u32>)> + '_ {
        self.servers.iter().map(|(a, w)| (*a, *w))
    }

    /// Number of servers in rotation.
    pub fn len(&self) -> usize {
        self.servers.len()
    }

    /// No server in rotation (the renderer then emits its placeholder).
    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }

    /// What changed from `old` to `self`, for the log line of every applied change.
    pub fn diff(&self, old: &DesiredSet) -> Diff {
        let added = self
            .servers
            .keys()
            .filter(|a| !old.servers.contains_key(a))
            .copied()
            .collect();
        let removed = old
            .servers
            .keys()
            .filter(|a| !self.servers.contains_key(a))
            .copied()
            .collect();
        let reweighted = self
            .servers
            .iter()
            .filter(|(a, w)| old.servers.get(a).is_some_and(|old_w| old_w != *w))
            .map(|(a, _)| *a)
            .collect();
        Diff {
            added,
            removed,
            reweighted,
        }
    }
}

/// Difference between two desired sets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diff {
    /// Now in rotation, were not before.
    pub added: Vec<SocketAddr>,
    /// Left the rotation.
    pub removed: Vec<SocketAddr>,
    /// Still in rotation with a different weight.
    pub reweighted: Vec<SocketAddr>,
}

impl Diff {
    /// Nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.reweighted.is_empty()
    }
}

impl fmt::Display for Diff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |v: &[SocketAddr]| {
            v.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        write!(
            f,
            "added=[{}] removed=[{}] reweighted=[{}]",
            list(&self.added),
            list(&self.removed),
            list(&self.reweighted)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(addr: &str, state: EndpointState, weight: Option<u32>) -> Endpoint {
        Endpoint {
            addr: addr.parse().expect("test addr"),
            state,
            weight,
        }
    }

    #[test]
    fn conditions_follow_the_api_defaults() {
        use EndpointState::*;
        assert_eq!(EndpointState::from_conditions(None, None), Ready);
        assert_eq!(
            EndpointState::from_conditions(Some(true), Some(false)),
            Ready
        );
        assert_eq!(EndpointState::from_conditions(Some(false), None), NotReady);
        // serving + terminating (a draining pod) is out of rotation.
        assert_eq!(
            EndpointState::from_conditions(Some(false), Some(true)),
            Terminating
        );
        assert_eq!(
            EndpointState::from_conditions(Some(true), Some(true)),
            Terminating
        );
    }

    #[test]
    fn draining_wins_over_ready() {
        use EndpointState::*;
        assert_eq!(EndpointState::from_announce(true, false), Ready);
        assert_eq!(EndpointState::from_announce(true, true), Terminating);
        assert_eq!(EndpointState::from_announce(false, false), NotReady);
    }

    #[test]
    fn only_ready_endpoints_are_desired_in_address_order() {
        let eps = [
            ep("10.0.0.3:7000", EndpointState::Ready, None),
            ep("10.0.0.1:7000", EndpointState::Ready, Some(2)),
            ep("10.0.0.2:7000", EndpointState::Terminating, None),
            ep("10.0.0.4:7000", EndpointState::NotReady, None),
        ];
        let set = DesiredSet::from_endpoints(&eps);
        let servers: Vec<_> = set.servers().collect();
        assert_eq!(
            servers,
            vec![
                ("10.0.0.1:7000".parse().expect("addr"), Some(2)),
                ("10.0.0.3:7000".parse().expect("addr"), None),
            ]
        );
        // Input order does not matter.
        let mut reversed = eps.to_vec();
        reversed.reverse();
        assert_eq!(DesiredSet::from_endpoints(&reversed), set);
    }

    #[test]
    fn duplicate_addresses_collapse_to_one_server() {
        let eps = [
            ep("10.0.0.1:7000", EndpointState::Ready, None),
            ep("10.0.0.1:7000", EndpointState::Ready, Some(3)),
        ];
        let set = DesiredSet::from_endpoints(&eps);
        assert_eq!(set.len(), 1);
        assert_eq!(set.servers().next().map(|s| s.1), Some(Some(3)));
    }

    #[test]
    fn diff_reports_added_removed_and_reweighted() {
        let old = DesiredSet::from_endpoints(&[
            ep("10.0.0.1:7000", EndpointState::Ready, None),
            ep("10.0.0.2:7000", EndpointState::Ready, None),
        ]);
        let new = DesiredSet::from_endpoints(&[
            ep("10.0.0.2:7000", EndpointState::Ready, Some(5)),
            ep("10.0.0.3:7000", EndpointState::Ready, None),
        ]);
        let d = new.diff(&old);
        assert_eq!(d.added, vec!["10.0.0.3:7000".parse().expect("addr")]);
        assert_eq!(d.removed, vec!["10.0.0.1:7000".parse().expect("addr")]);
        assert_eq!(d.reweighted, vec!["10.0.0.2:7000".parse().expect("addr")]);
        assert!(new.diff(&new).is_empty());
        assert_eq!(
            d.to_string(),
            "added=[10.0.0.3:7000] removed=[10.0.0.1:7000] reweighted=[10.0.0.2:7000]"
        );
    }

    #[test]
    fn addresses_must_be_routable_ip_and_port() {
        assert!(parse_addr("10.1.2.3:7000").is_ok());
        assert!(parse_addr("[fd00::1]:7000").is_ok());
        assert!(matches!(
            parse_addr("gw-0.gw:7000"),
            Err(AddrError::Syntax(_))
        ));
        assert!(matches!(parse_addr("10.1.2.3"), Err(AddrError::Syntax(_))));
        assert!(matches!(
            parse_addr("0.0.0.0:7000"),
            Err(AddrError::Unspecified(_))
        ));
        assert!(matches!(
            parse_addr("[::]:7000"),
            Err(AddrError::Unspecified(_))
        ));
        assert!(matches!(
            parse_addr("10.1.2.3:0"),
            Err(AddrError::PortZero(_))
        ));
    }

    #[test]
    fn static_endpoints_take_an_optional_weight() {
        let e = parse_static_endpoint("127.0.0.1:7001=3").expect("weighted");
        assert_eq!(e.weight, Some(3));
        assert_eq!(e.state, EndpointState::Ready);
        assert_eq!(
            parse_static_endpoint("127.0.0.1:7001")
                .expect("plain")
                .weight,
            None
        );
        assert!(matches!(
            parse_static_endpoint("127.0.0.1:7001=0"),
            Err(AddrError::Weight(0))
        ));
        assert!(matches!(
            parse_static_endpoint("127.0.0.1:7001=x"),
            Err(AddrError::Syntax(_))
        ));
    }
}
