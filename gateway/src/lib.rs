//! devgate gateway: device TCP sessions routed over NATS.
//!
//! A device connects, logs in with `HELLO`, and its session subscribes the gateway to
//! `device.<id>.down`: NATS's interest graph is the device->gateway registry, so any service
//! reaches the device with a plain publish or request. Device traffic goes out on
//! `device.<id>.up`.
//!
//! This crate also owns the shared wire contract ([`contract`], [`codec`]) and the operational
//! plumbing ([`common`]) that bridge-api and lb-sync build on, so the three cannot drift apart.

pub mod auth;
pub mod bench;
pub mod bus;
pub mod client;
pub mod codec;
pub mod common;
pub mod config;
pub mod conn;
pub mod contract;
mod control;
pub mod denylist;
pub mod device_tls;
mod log_budget;
mod login_limit;
pub mod metrics;
mod peers;
pub mod proxy_protocol;
mod reclaim;
pub mod registry;
pub mod server;
mod session;

pub use server::{Gateway, GatewayError, run};
