//! `devgate-lb-sync`: parse the configuration, then run until SIGTERM/SIGINT.

use clap::Parser;
use devgate_gateway::common::{init_tracing, shutdown_on_signals};
use devgate_lb_sync::config::Cli;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Cli::parse().into_config()?;
    init_tracing(config.log_format);
    devgate_lb_sync::run(config, shutdown_on_signals()).await?;
    Ok(())
}
