//! TLS between the gateway's NATS link and a real nats-server that requires it: the link
//! upgrades after `INFO`, verifies the server against the configured CA, and says why it stays
//! down when it cannot (wrong CA, no TLS configured). Fixtures: `tests/fixtures/tls/`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use devgate_gateway::bus::Subscription;
use devgate_gateway::bus::link::{Link, LinkOptions, parse_servers};
use devgate_gateway::bus::tls::{NatsTlsSettings, TlsFiles, client_config};
use devgate_gateway::config::Cli;
use devgate_gateway::metrics::Metrics;
use devgate_tests::NatsServer;

const WAIT: Duration = Duration::from_secs(5);

fn fixture(name: &str) -> PathBuf {
    devgate_tests::nats::tls_fixture(name)
}

fn link(url: &str, tls: Option<TlsFiles>) -> Link {
    let options = LinkOptions {
        servers: parse_servers(url).expect("url"),
        name: "tls-test".into(),
        user: None,
        tls: tls.map(|f| client_config(&f).expect("TLS config")),
    };
    let mut registry = prometheus_client::registry::Registry::default();
    Link::start(options, Metrics::new(&mut registry))
}

fn ca(name: &str) -> Option<TlsFiles> {
    Some(TlsFiles {
        ca: Some(fixture(name)),
        client: None,
    })
}

async fn connected(link: &Link) {
    let mut watch = link.connected_watch();
    tokio::time::timeout(WAIT, watch.wait_for(|c| *c))
        .await
        .unwrap_or_else(|_| panic!("never connected; last error: {:?}", link.last_error()))
        .expect("link alive");
}

/// Waits for the link's first failed attempt and returns its reason.
async fn refusal(link: &Link) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(e) = link.last_error() {
            assert!(!link.is_connected());
            return e;
        }
        assert!(Instant::now() < deadline, "no connection attempt failed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn next(sub: &mut Subscription) -> devgate_gateway::bus::Msg {
    tokio::time::timeout(WAIT, sub.next())
        .await
        .expect("message in time")
        .expect("subscription open")
}

#[tokio::test]
async fn the_link_speaks_tls_to_a_server_that_requires_it() {
    let nats = NatsServer::start_tls();
    let service = devgate_tests::nats::tls_client(&nats).await;
    // tls:// asks for TLS; nats:// upgrades because the server's INFO requires it.
    for scheme in ["tls", "nats"] {
        let link = link(
            &format!("{scheme}://127.0.0.1:{}", nats.port()),
            ca("ca.pem"),
        );
        connected(&link).await;
        assert_eq!(link.last_error(), None);
        let mut down = link.subscribe("device.t.down");
        link.flush(WAIT).await.expect("SUB processed");
        service
            .publish("device.t.down", Bytes::from_static(b"over tls"))
            .await
            .expect("publish");
        assert_eq!(
            &next(&mut down).await.payload[..],
            b"over tls",
            "{scheme}://"
        );

        let up = devgate_tests::nats::via_link(
            &link,
            &service,
            "device.t.up",
            devgate_gateway::bus::Headers::None,
            b"up",
        )
        .await;
        assert_eq!(&up.payload[..], b"up", "{scheme}://");
        link.close();
    }
}

#[tokio::test]
async fn a_server_the_ca_does_not_vouch_for_or_missing_tls_keeps_the_link_down_and_says_why() {
    let nats = NatsServer::start_tls();

    let wrong_ca = link(&nats.tls_url(), ca("other-ca.pem"));
    let why = refusal(&wrong_ca).await;
    assert!(why.contains("TLS") && why.contains("certificate"), "{why}");

    let no_tls = link(&format!("nats://127.0.0.1:{}", nats.port()), None);
    let why = refusal(&no_tls).await;
    assert!(
        why.contains("the server requires TLS; use a tls:// URL"),
        "{why}"
    );

    // A plain server behind a tls:// URL is not silently used in clear.
    let plain = NatsServer::start();
    let insist = link(&format!("tls://127.0.0.1:{}", plain.port()), ca("ca.pem"));
    let why = refusal(&insist).await;
    assert!(why.contains("TLS"), "{why}");
    // The same server is fine over nats:// (the refusal above is about TLS, not reachability).
    let fine = link(&plain.url(), None);
    connected(&fine).await;
}

#[test]
fn tls_settings_are_checked_when_the_configuration_is() {
    let parse = |extra: &[&str]| {
        let mut args = vec![
            "devgate-gateway",
            "--auth-secret",
            "0123456789abcdef0123456789abcdef",
            "--nats-url",
            "tls://127.0.0.1:4443",
        ];
        args.extend_from_slice(extra);
        Cli::try_parse_from(args)
            .expect("flags parse")
            .into_config()
    };
    let ca_path = fixture("ca.pem");
    let ca_flag = ca_path.to_str().expect("utf8");
    let ok = parse(&["--nats-tls-ca", ca_flag]).expect("valid");
    assert_eq!(ok.nats_tls().and_then(|f| f.ca), Some(ca_path.clone()));

    let cert = fixture("server.pem");
    let key = fixture("server.key");
    let err = parse(&["--nats-tls-cert", cert.to_str().expect("utf8")])
        .expect_err("cert without key")
        .to_string();
    assert!(
        err.contains("nats_tls_cert and nats_tls_key go together"),
        "{err}"
    );
    parse(&[
        "--nats-tls-ca",
        ca_flag,
        "--nats-tls-cert",
        cert.to_str().expect("utf8"),
        "--nats-tls-key",
        key.to_str().expect("utf8"),
    ])
    .expect("a client certificate with its key");

    let err = parse(&["--nats-tls-ca", "/nonexistent/ca.pem"])
        .expect_err("missing file")
        .to_string();
    assert!(err.contains("nats_tls_ca /nonexistent/ca.pem"), "{err}");
    let err = parse(&["--nats-tls-ca", key.to_str().expect("utf8")])
        .expect_err("a key is not a CA")
        .to_string();
    assert!(err.contains("no PEM certificate"), "{err}");
}
