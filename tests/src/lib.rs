//! Test support for devgate's end-to-end tests: real external processes (nats-server, nginx,
//! devgate binaries) on loopback with free ports, each killed when its handle is dropped.

pub mod bins;
pub mod cut;
pub mod gateway;
pub mod helm;
pub mod nats;
pub mod nginx;

pub use nats::NatsServer;

/// Installs a test log subscriber once (`RUST_LOG=debug cargo test` to see gateway logs).
pub fn init_logs() {
    devgate_gateway::common::init_tracing(devgate_gateway::common::LogFormat::Text);
}
