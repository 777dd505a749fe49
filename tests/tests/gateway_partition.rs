//! A partition between NATS cluster nodes: two real nats-servers routed through a link the test
//! cuts, a gateway on each. No gateway loses its NATS connection (or one does and gets it back
//! while the cut stands, when its reconnect sweep reaches nobody), so only the gateways'
//! announcements, numbered, tell them that some were lost on the way.

use std::time::Duration;

use bytes::Bytes;
use devgate_gateway::client::DeviceClient;
use devgate_gateway::codec::{GoAwayReason, Welcome};
use devgate_gateway::config::Config;
use devgate_gateway::server::Gateway;
use devgate_tests::NatsServer;
use devgate_tests::cut::CuttableLink;
use devgate_tests::gateway::{
    config, device, downs_until_goaway, metric_reaches, request_reaches, start, start_with,
};

const WAIT: Duration = Duration::from_secs(10);

/// Returns once a subscription on `a` is routed to `b`: the cluster has formed (or healed).
/// Route interest has no event a client can await, so this asks until answered, with a
/// deadline.
async fn routed(a: &async_nats::Client, b: &async_nats::Client) {
    use futures::StreamExt;
    let subject = a.new_inbox();
    let mut probe = a.subscribe(subject.clone()).await.expect("subscribe");
    let answer = async move {
        while let Some(msg) = probe.next().await {
            if let Some(reply) = msg.reply {
                let _ = a.publish(reply, Bytes::new()).await;
            }
        }
    };
    let ask = async {
        loop {
            let asked = tokio::time::timeout(
                Duration::from_millis(200),
                b.request(subject.clone(), Bytes::new()),
            )
            .await;
            if matches!(asked, Ok(Ok(_))) {
                return;
            }
        }
    };
    tokio::select! {
        () = answer => panic!("probe subscription ended"),
        r = tokio::time::timeout(WAIT, ask) => r.expect("the cluster routes within the deadline"),
    }
}

/// Returns once `listener` (a client on the same NATS node as the gateway that should hear
/// them) has received `n` more announcements of `instance`: that gateway has heard them too.
async fn announcements(listener: &async_nats::Client, instance: &str, n: usize) {
    use futures::StreamExt;
    let mut sub = listener
        .subscribe(devgate_gateway::contract::subjects::ANNOUNCE)
        .await
        .expect("subscribe");
    devgate_tests::nats::processed(listener).await;
    let mut heard = 0;
    while heard < n {
        let msg = tokio::time::timeout(WAIT, sub.next())
            .await
            .expect("announcement in time")
            .expect("subscription open");
        let a: devgate_gateway::contract::Announce =
            serde_json::from_slice(&msg.payload).expect("announce");
        if a.instance == instance {
            heard += 1;
        }
    }
}

/// Two nodes whose route runs through a link the test cuts, and a client on each.
struct Cluster {
    side_a: NatsServer,
    side_b: NatsServer,
    route: CuttableLink,
    service_a: async_nats::Client,
    service_b: async_nats::Client,
}

async fn cluster() -> Cluster {
    let side_a = NatsServer::start_clustered(&[]);
    let route = CuttableLink::start(side_a.route_addr()).await;
    let side_b = NatsServer::start_clustered(&[route.addr()]);
    let service_a = side_a.client().await;
    let service_b = side_b.client().await;
    routed(&service_a, &service_b).await;
    Cluster {
        side_a,
        side_b,
        route,
        service_a,
        service_b,
    }
}

/// Waits until `a` and `b` hear each other, or (`false`) no longer do.
async fn in_sight(a: &Gateway, b: &Gateway, visible: bool) {
    let line = format!("devgate_gateway_peers_visible {}", u8::from(visible));
    metric_reaches(a, &line).await;
    metric_reaches(b, &line).await;
}

/// Restores the route; then the older session (on `gw_a`) is told `GOAWAY replaced`, the newer
/// one (welcomed as `welcome` on gw-b) gets what is sent from either side, and `gw_a` counted
/// the loss once.
async fn heal_and_settle(
    c: &Cluster,
    gw_a: &Gateway,
    (old, new): (&mut DeviceClient, &mut DeviceClient),
    welcome: &Welcome,
) {
    c.route.restore();
    let (_, reason) = downs_until_goaway(old).await;
    assert_eq!(reason, GoAwayReason::Replaced);
    routed(&c.service_a, &c.service_b).await;
    let reply = request_reaches(&c.service_a, new, "split", b"healed").await;
    assert_eq!(
        (reply.gateway.as_str(), reply.session.as_str()),
        ("gw-b", welcome.session.as_str())
    );
    metric_reaches(gw_a, "devgate_gateway_reclaims_lost_total 1").await;
}

#[tokio::test]
async fn a_device_split_by_a_nats_partition_settles_on_its_newer_session_when_it_heals() {
    let c = cluster().await;
    let gw_a = start(&c.side_a, "gw-a").await;
    let gw_b = start(&c.side_b, "gw-b").await;
    in_sight(&gw_a, &gw_b, true).await;
    let (mut old, _) = device(&gw_a, "split").await;
    let (mut bystander, _) = device(&gw_a, "bystander").await;
    // Hearing each other, beat after beat, is no partition.
    announcements(&c.service_a, "gw-b", 5).await;
    announcements(&c.service_b, "gw-a", 5).await;
    metric_reaches(&gw_a, "devgate_gateway_partition_sweeps_total 0").await;
    metric_reaches(&gw_b, "devgate_gateway_partition_sweeps_total 0").await;

    // The routes break; both gateways keep their own connections and lose sight of each other.
    c.route.cut();
    in_sight(&gw_a, &gw_b, false).await;
    // The device comes back on the other side: nobody there holds it, so it is welcomed.
    let (mut new, welcome) = device(&gw_b, "split").await;
    // The split: each side routes the device to its own session.
    let reply = request_reaches(&c.service_a, &mut old, "split", b"a-side").await;
    assert_eq!(reply.gateway, "gw-a");
    let reply = request_reaches(&c.service_b, &mut new, "split", b"b-side").await;
    assert_eq!(reply.gateway, "gw-b");

    // The routes come back. The gateways find the lost announcements and re-check their
    // sessions: the older one yields, and is told so.
    heal_and_settle(&c, &gw_a, (&mut old, &mut new), &welcome).await;
    // Both sides noticed, once each.
    metric_reaches(&gw_a, "devgate_gateway_partition_sweeps_total 1").await;
    metric_reaches(&gw_b, "devgate_gateway_partition_sweeps_total 1").await;

    // A device only one side ever held is left alone.
    let reply = request_reaches(&c.service_b, &mut bystander, "bystander", b"still").await;
    assert_eq!(reply.gateway, "gw-a");
}

#[tokio::test]
async fn a_gateway_that_reconnects_while_the_cut_stands_still_heals_the_split_when_it_ends() {
    let c = cluster().await;
    // gw-a reaches its node through a link of its own, which the test also cuts.
    let link_a = CuttableLink::start(([127, 0, 0, 1], c.side_a.port()).into()).await;
    let gw_a = start_with(Config {
        nats_url: format!("nats://{}", link_a.addr()),
        ..config(&c.side_a, "gw-a")
    })
    .await;
    let gw_b = start(&c.side_b, "gw-b").await;
    in_sight(&gw_a, &gw_b, true).await;
    let (mut old, _) = device(&gw_a, "split").await;

    c.route.cut();
    in_sight(&gw_a, &gw_b, false).await;
    let (mut new, welcome) = device(&gw_b, "split").await;
    // gw-a loses NATS and gets it back while the cut stands: its reconnect sweep finds nobody
    // else holding the device, since nobody on its side does.
    link_a.cut();
    tokio::time::timeout(WAIT, gw_a.wait_disconnected())
        .await
        .expect("gw-a notices");
    link_a.restore();
    tokio::time::timeout(WAIT, gw_a.wait_connected())
        .await
        .expect("gw-a reconnects");
    metric_reaches(&gw_a, "devgate_gateway_reclaims_total{outcome=\"clear\"} 1").await;
    let reply = request_reaches(&c.service_a, &mut old, "split", b"still split").await;
    assert_eq!(reply.gateway, "gw-a");

    // When the cut ends, the split is found all the same.
    heal_and_settle(&c, &gw_a, (&mut old, &mut new), &welcome).await;
}
