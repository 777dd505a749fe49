//! The whole path with TLS to NATS: a service `POST`s through bridge-api, which reaches NATS
//! over TLS, to a device on a gateway whose link is TLS too (nats-server requires TLS of every
//! client).

mod common;

use common::{Bridge, WAIT, bridge_config, send};
use devgate_tests::NatsServer;
use devgate_tests::gateway::{device, start_tls};
use devgate_tests::nats::tls_fixture;
use reqwest::Method;

#[tokio::test]
async fn a_message_crosses_bridge_api_nats_and_the_gateway_over_tls() {
    let nats = NatsServer::start_tls();
    let gw = start_tls(&nats, "gw-1").await;
    let (mut dev, welcome) = device(&gw, "dev-1").await;

    let mut config = bridge_config(&nats);
    config.nats_url = nats.tls_url();
    config.nats_tls_ca = Some(tls_fixture("ca.pem"));
    let bridge = Bridge::start_with(config).await;

    let got = send(
        bridge
            .req(Method::POST, "/v1/devices/dev-1/messages")
            .body("secret"),
    )
    .await;
    assert_eq!(got.0, 200, "{}", got.1);
    assert_eq!(got.1["status"], "sent");
    assert_eq!(got.1["session"], welcome.session.as_str());
    let (_, payload) = tokio::time::timeout(WAIT, dev.recv_down())
        .await
        .expect("in time")
        .expect("DOWN");
    assert_eq!(payload.as_ref(), b"secret");
}
