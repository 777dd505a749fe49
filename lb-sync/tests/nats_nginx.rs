//! The NATS source with the file sink and a real nginx: instances that announce themselves get
//! device connections, new ones are used within about a second, draining and silent ones leave,
//! connections survive reloads, and a NATS outage never produces an upstream from partial data.
//!
//! The gateways here are stand-ins (TCP listeners that greet with their name, announced by fake
//! announcers that follow the contract); `tests/tests/lb_sync_nginx.rs` runs the same flow
//! with real gateways.

mod common;

use devgate_gateway::common::Validate;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{
    Announcer, Device, EchoGateway, Mode, eager_client, has_server, http_get, settled_reloads,
    spread, upstream, wait_for,
};
use devgate_lb_sync::config::{Config, SinkKind, SourceKind};
use devgate_tests::NatsServer;
use devgate_tests::nginx::{Nginx, placeholder_stream};
use tokio_util::sync::CancellationToken;

const HEARTBEAT_MS: u64 = 200;

fn nats_config(nats: &NatsServer, nginx: &Nginx) -> Config {
    Config {
        source: SourceKind::Nats,
        sink: SinkKind::File,
        nats_url: nats.url(),
        listen: nginx.addr(),
        http_listen: "127.0.0.1:0".parse().expect("addr"),
        output: Some(nginx.upstream_path()),
        validate_cmd: nginx.validate_cmd(),
        reload_cmd: nginx.reload_cmd(),
        insecure_plaintext: true,
        // The defaults: 200 ms debounce, at most one reload per second.
        ..Config::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_join_and_leave_the_rotation() {
    devgate_tests::init_logs();
    let nats = NatsServer::start();
    let nginx = Nginx::start(placeholder_stream);
    let client = eager_client(&nats.url()).await;
    let a = EchoGateway::start("a").await;
    let b = EchoGateway::start("b").await;
    let ann_a = Announcer::start(client.clone(), "gw-a", a.addr, HEARTBEAT_MS);
    let ann_b = Announcer::start(client.clone(), "gw-b", b.addr, HEARTBEAT_MS);

    let config = nats_config(&nats, &nginx);
    config.validate().expect("valid config");
    let lb = devgate_lb_sync::start(config, CancellationToken::new())
        .await
        .expect("lb-sync starts");

    // Both instances get devices.
    wait_for(Duration::from_secs(10), "a and b in rotation", || async {
        let names: BTreeSet<_> = spread(nginx.addr(), 4)
            .await
            .into_iter()
            .flatten()
            .collect();
        (names == BTreeSet::from(["a".to_owned(), "b".to_owned()])).then_some(())
    })
    .await;

    let reloads_before = settled_reloads(lb.http_addr(), &nginx, 1).await;
    // A device connected now must keep working across the reloads that follow.
    let mut old_device = Device::connect(nginx.addr()).await;
    let old_gateway = old_device.gateway.clone().expect("connected to a gateway");
    // Not synchronisation: let the one-reload-per-second cap expire, so the measurement below
    // shows the latency of a change arriving at an idle lb-sync (the common case).
    tokio::time::sleep(Duration::from_millis(1100)).await;

    // A third instance: time from its first announcement until nginx sends it a device.
    let c = EchoGateway::start("c").await;
    let started = Instant::now();
    let ann_c = Announcer::start(client.clone(), "gw-c", c.addr, HEARTBEAT_MS);
    wait_for(
        Duration::from_secs(10),
        "c gets new connections",
        || async {
            (Device::connect(nginx.addr()).await.gateway.as_deref() == Some("c")).then_some(())
        },
    )
    .await;
    let elapsed = started.elapsed();
    println!(
        "lb-sync: new instance received its first device {} ms after its first announcement",
        elapsed.as_millis()
    );
    assert_eq!(
        settled_reloads(lb.http_addr(), &nginx, reloads_before + 1).await,
        reloads_before + 1,
        "one reload for the new instance"
    );
    assert_eq!(
        old_device.echo("still-here").await,
        Some(format!("{old_gateway}:still-here")),
        "a device connected before the reload keeps working"
    );

    // b drains: it leaves the rotation promptly (no waiting for expiry).
    let drained = Instant::now();
    ann_b.set(Mode::Draining);
    wait_for(Duration::from_secs(10), "b out of the upstream", || async {
        (!has_server(&upstream(&nginx), b.addr)).then_some(())
    })
    .await;
    println!(
        "lb-sync: draining instance left the upstream after {} ms",
        drained.elapsed().as_millis()
    );
    // a dies silently: it leaves after 3 missed heartbeats.
    ann_a.set(Mode::Silent);
    wait_for(Duration::from_secs(10), "a out of the upstream", || async {
        (!has_server(&upstream(&nginx), a.addr)).then_some(())
    })
    .await;
    // Once nginx has the new workers, only c gets devices.
    wait_for(Duration::from_secs(10), "only c in rotation", || async {
        let names: BTreeSet<_> = spread(nginx.addr(), 4)
            .await
            .into_iter()
            .flatten()
            .collect();
        (names == BTreeSet::from(["c".to_owned()])).then_some(())
    })
    .await;
    assert_eq!(
        old_device.echo("after-three-reloads").await,
        Some(format!("{old_gateway}:after-three-reloads")),
    );

    let (_, metrics) = http_get(lb.http_addr(), "/metrics").await;
    assert!(
        metrics.contains("devgate_lb_sync_servers_in_rotation 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("devgate_lb_sync_source_connected 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("devgate_lb_sync_endpoints_seen{state=\"terminating\"} 1"),
        "{metrics}"
    );
    drop(ann_c);
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_outage_never_writes_a_partial_upstream() {
    devgate_tests::init_logs();
    let mut nats = NatsServer::start();
    let nginx = Nginx::start(placeholder_stream);
    let client = eager_client(&nats.url()).await;
    let a = EchoGateway::start("a").await;
    let b = EchoGateway::start("b").await;
    let _ann_a = Announcer::start(client.clone(), "gw-a", a.addr, HEARTBEAT_MS);
    let _ann_b = Announcer::start(client.clone(), "gw-b", b.addr, HEARTBEAT_MS);
    let lb = devgate_lb_sync::start(nats_config(&nats, &nginx), CancellationToken::new())
        .await
        .expect("lb-sync starts");
    wait_for(
        Duration::from_secs(10),
        "a and b in the upstream",
        || async {
            let t = upstream(&nginx);
            (has_server(&t, a.addr) && has_server(&t, b.addr)).then_some(())
        },
    )
    .await;
    let before = upstream(&nginx);
    let reloads = settled_reloads(lb.http_addr(), &nginx, 1).await;
    assert_eq!(reloads, 1, "one reload for the first complete set");

    // NATS goes away for much longer than the expiry (3 x 200 ms). Nothing is heard, so
    // nothing may be concluded: the upstream stays as it was.
    nats.stop();
    wait_for(
        Duration::from_secs(10),
        "lb-sync to notice the outage",
        || async {
            let (_, m) = http_get(lb.http_addr(), "/metrics").await;
            m.contains("devgate_lb_sync_source_connected 0")
                .then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(
        upstream(&nginx),
        before,
        "upstream rewritten during the outage"
    );
    assert_eq!(nginx.reloads(), reloads);

    // NATS is back; a new instance appears at the same moment. Whatever order lb-sync hears
    // them in, it must write one upstream with all three, never one with a subset.
    nats.restart();
    let c = EchoGateway::start("c").await;
    let _ann_c = Announcer::start(client.clone(), "gw-c", c.addr, HEARTBEAT_MS);
    wait_for(Duration::from_secs(15), "c in the upstream", || async {
        has_server(&upstream(&nginx), c.addr).then_some(())
    })
    .await;
    let after = upstream(&nginx);
    assert!(
        has_server(&after, a.addr) && has_server(&after, b.addr),
        "{after}"
    );
    assert_eq!(
        settled_reloads(lb.http_addr(), &nginx, reloads + 1).await,
        reloads + 1,
        "exactly one reload, with the complete set"
    );
    lb.shutdown().await;
}
