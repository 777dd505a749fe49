//! `devgate-lb-sync`: keeps nginx's stream upstream equal to the ready gateway instances.
//! Configuration comes from flags, `DEVGATE_*` env vars and an optional TOML file.

use clap::Parser;
use devgate_gateway::common::{init_tracing, shutdown_on_signals};
use devgate_lb_sync::config::Cli;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // First, before anything is read: see `harden_process`.
    let hardened = devgate_lb_sync::harden_process();
    let config = match Cli::parse().into_config() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("devgate-lb-sync: {error}");
            std::process::exit(2);
        }
    };
    init_tracing(config.log_format);
    if let Err(error) = hardened {
        tracing::warn!(%error, "other processes of this user can read this one's memory and files");
    }
    tracing::info!(config = ?config, "starting devgate-lb-sync");
    if let Err(error) = devgate_lb_sync::run(config, shutdown_on_signals()).await {
        eprintln!("devgate-lb-sync: {error}");
        std::process::exit(1);
    }
    Ok(())
}
