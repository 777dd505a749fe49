//! `devgate-bench`: the load tool and the side-by-side comparison with an MQTT broker.
//!
//! Performance is a product feature, so the numbers must come from the same machine and the
//! same run as the alternative's. This module holds the parts: [`fleet`] (simulated devices,
//! devgate protocol or MQTT), [`worker`] (fleets in child processes), [`load`] (services that
//! publish downlink and consume uplink over NATS, MQTT or bridge-api's HTTP), [`hist`]
//! (latency histograms), [`procs`] (the servers under test as child processes) and [`suite`]
//! (the whole comparison, written to `docs/bench/results.json`).

pub mod fleet;
pub mod hist;
pub mod http;
pub mod load;
pub mod mqtt;
pub mod probe;
pub mod procs;
pub mod suite;
pub mod worker;

/// Why a benchmark step failed.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Local I/O (sockets, pipes, files).
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// A JSON line or file that does not parse.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    /// A worker process failed or answered an error.
    #[error("worker: {0}")]
    Worker(String),
    /// NATS failed.
    #[error("nats: {0}")]
    Nats(String),
    /// The broker or gateway broke the protocol.
    #[error("protocol: {0}")]
    Protocol(String),
    /// A server under test could not be started or reached.
    #[error("setup: {0}")]
    Setup(String),
}
