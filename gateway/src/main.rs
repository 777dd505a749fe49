//! `devgate-gateway`: accepts device TCP connections and routes them over NATS.
//! Configuration comes from flags, `DEVGATE_*` env vars and an optional TOML file.

use clap::Parser;
use devgate_gateway::common::{init_tracing, shutdown_on_signals};
use devgate_gateway::config::Cli;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = match Cli::parse().into_config() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("devgate-gateway: {error}");
            std::process::exit(2);
        }
    };
    init_tracing(config.log_format);
    tracing::info!(config = ?config, "starting devgate-gateway");
    devgate_gateway::run(config, shutdown_on_signals()).await?;
    Ok(())
}
