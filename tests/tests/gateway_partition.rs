//! A partition between NATS cluster nodes: two real nats-servers routed through a link the test
//! cuts, a gateway on each. No gateway loses its NATS connection, so only the gateways'
//! announcements, numbered, tell them that some were lost on the way.

use std::time::Duration;

use bytes::Bytes;
use devgate_gateway::codec::GoAwayReason;
use devgate_tests::NatsServer;
use devgate_tests::cut::CuttableLink;
use devgate_tests::gateway::{device, downs_until_goaway, metric_reaches, request_reaches, start};

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

#[tokio::test]
async fn a_device_split_by_a_nats_partition_settles_on_its_newer_session_when_it_heals() {
    let side_a = NatsServer::start_clustered(&[]);
    let route = CuttableLink::start(side_a.route_addr()).await;
    let side_b = NatsServer::start_clustered(&[route.addr()]);
    let service_a = side_a.client().await;
    let service_b = side_b.client().await;
    routed(&service_a, &service_b).await;

    let gw_a = start(&side_a, "gw-a").await;
    let gw_b = start(&side_b, "gw-b").await;
    metric_reaches(&gw_a, "devgate_gateway_peers_visible 1").await;
    metric_reaches(&gw_b, "devgate_gateway_peers_visible 1").await;
    let (mut old, _) = device(&gw_a, "split").await;
    // Hearing each other at start is no partition.
    metric_reaches(&gw_a, "devgate_gateway_partition_sweeps_total 0").await;
    metric_reaches(&gw_b, "devgate_gateway_partition_sweeps_total 0").await;
    let (mut bystander, _) = device(&gw_a, "bystander").await;

    // The routes break; both gateways keep their own connections and lose sight of each other.
    route.cut();
    metric_reaches(&gw_a, "devgate_gateway_peers_visible 0").await;
    metric_reaches(&gw_b, "devgate_gateway_peers_visible 0").await;
    // The device comes back on the other side: nobody there holds it, so it is welcomed.
    let (mut new, welcome) = device(&gw_b, "split").await;
    // The split: each side routes the device to its own session.
    let reply = request_reaches(&service_a, &mut old, "split", b"a-side").await;
    assert_eq!(reply.gateway, "gw-a");
    let reply = request_reaches(&service_b, &mut new, "split", b"b-side").await;
    assert_eq!(reply.gateway, "gw-b");

    // The routes come back. The gateways hear each other again and re-check their sessions:
    // the older one yields, and is told so.
    route.restore();
    let (_, reason) = downs_until_goaway(&mut old).await;
    assert_eq!(reason, GoAwayReason::Replaced);
    routed(&service_a, &service_b).await;
    let reply = request_reaches(&service_a, &mut new, "split", b"healed").await;
    assert_eq!(
        (reply.gateway.as_str(), reply.session.as_str()),
        ("gw-b", welcome.session.as_str())
    );
    metric_reaches(&gw_a, "devgate_gateway_reclaims_lost_total 1").await;
    // Both sides noticed, once each.
    metric_reaches(&gw_a, "devgate_gateway_partition_sweeps_total 1").await;
    metric_reaches(&gw_b, "devgate_gateway_partition_sweeps_total 1").await;

    // A device only one side ever held is left alone.
    let reply = request_reaches(&service_b, &mut bystander, "bystander", b"still").await;
    assert_eq!(reply.gateway, "gw-a");
}
