//! `devgate-bridge-api`: parse the configuration, then hand over to the library.

use anyhow::Context;
use clap::Parser;
use devgate_bridge_api::config::Cli;
use devgate_gateway::common::{init_tracing, shutdown_on_signals};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if cli.print_openapi {
        let doc = devgate_bridge_api::openapi_document()
            .to_pretty_json()
            .context("rendering the OpenAPI document")?;
        use std::io::Write;
        writeln!(std::io::stdout().lock(), "{doc}").context("writing the OpenAPI document")?;
        return Ok(());
    }
    let config = cli.into_config()?;
    init_tracing(config.log_format);
    tracing::info!(?config, "starting devgate-bridge-api");
    let shutdown = shutdown_on_signals();
    devgate_bridge_api::run(config, shutdown)
        .await
        .context("bridge-api failed")
}
