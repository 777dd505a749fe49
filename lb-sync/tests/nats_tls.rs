//! lb-sync's NATS source over TLS: a gateway announces itself over a TLS link, lb-sync hears it
//! over TLS and writes it into the upstream (nats-server requires TLS of every client).

mod common;

use std::time::Duration;

use common::wait_for;
use devgate_gateway::common::Validate;
use devgate_lb_sync::config::{Config, SinkKind, SourceKind};
use devgate_tests::NatsServer;
use devgate_tests::gateway::start_tls;
use devgate_tests::nats::tls_fixture;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn announcements_over_tls_reach_the_upstream() {
    let nats = NatsServer::start_tls();
    let gw = start_tls(&nats, "gw-tls").await;

    let dir = tempfile::tempdir().expect("tempdir");
    let output = dir.path().join("upstream.conf");
    let config = Config {
        source: SourceKind::Nats,
        sink: SinkKind::File,
        nats_url: nats.tls_url(),
        nats_tls_ca: Some(tls_fixture("ca.pem")),
        http_listen: "127.0.0.1:0".parse().expect("addr"),
        output: Some(output.clone()),
        validate_cmd: "true".into(),
        reload_cmd: "true".into(),
        debounce_ms: 50,
        insecure_plaintext: true,
        ..Config::default()
    };
    config.validate().expect("valid config");
    let lb = devgate_lb_sync::start(config, CancellationToken::new())
        .await
        .expect("lb-sync starts");
    let server = format!("server {}", gw.device_addr());
    wait_for(
        Duration::from_secs(10),
        "the gateway in the upstream",
        || async {
            let text = std::fs::read_to_string(&output).unwrap_or_default();
            text.contains(&server).then_some(())
        },
    )
    .await;
    lb.shutdown().await;
}
