//! The gateway's own NATS client (`devgate_gateway::bus::link`) against a real nats-server:
//! routing by subscription, requests, the PING barrier, drain, reconnects, and refusals; and
//! against fake servers on a raw socket for what a real one never does.

use std::time::Duration;

use bytes::Bytes;
use devgate_gateway::bus::link::{Link, LinkError, LinkOptions, RequestError, parse_servers};
use devgate_gateway::bus::{Bus, Headers, Subscription};
use devgate_gateway::common::Secret;
use devgate_gateway::config::Config;
use devgate_gateway::metrics::Metrics;
use devgate_tests::NatsServer;
use futures::StreamExt;

const WAIT: Duration = Duration::from_secs(5);

fn link(nats: &NatsServer) -> Link {
    link_to(&nats.url(), None)
}

fn link_to(url: &str, user: Option<(&str, &str)>) -> Link {
    let options = LinkOptions {
        servers: parse_servers(url).expect("url"),
        name: "link-test".into(),
        user: user.map(|(u, p)| (u.to_owned(), Secret::new(p))),
        tls: None,
    };
    let mut registry = prometheus_client::registry::Registry::default();
    Link::start(options, Metrics::new(&mut registry))
}

/// A nats-server with the given config text, and the directory holding the file.
fn nats_with(config: &str) -> (NatsServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("nats.conf");
    std::fs::write(&path, config).expect("write nats config");
    (NatsServer::with_config(path), dir)
}

/// A fake NATS server on 127.0.0.1: every connection gets `INFO`, a `PONG` once the client's
/// `CONNECT`+`PING` arrived, then `script(n)` for the n-th connection (from 0): bytes to send and
/// whether to close right after. Each accepted connection is reported on the receiver.
async fn fake_server(
    script: impl Fn(usize) -> (Vec<u8>, bool) + Send + 'static,
) -> (String, tokio::sync::mpsc::UnboundedReceiver<usize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("nats://{}", listener.local_addr().expect("addr"));
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        for n in 0.. {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let _ = tx.send(n);
            let (after, close) = script(n);
            tokio::spawn(async move {
                let info =
                    b"INFO {\"server_id\":\"fake\",\"max_payload\":1048576,\"headers\":true}\r\n";
                if socket.write_all(info).await.is_err() {
                    return;
                }
                let mut seen = Vec::new();
                let mut chunk = [0u8; 4096];
                while !seen.windows(6).any(|w| w == b"PING\r\n") {
                    match socket.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&chunk[..n]),
                    }
                }
                if socket.write_all(b"PONG\r\n").await.is_err()
                    || socket.write_all(&after).await.is_err()
                    || close
                {
                    return;
                }
                // Stay open until the client goes.
                while matches!(socket.read(&mut chunk).await, Ok(n) if n > 0) {}
            });
        }
    });
    (url, rx)
}

async fn connected(link: &Link, up: bool) {
    let mut watch = link.connected_watch();
    tokio::time::timeout(WAIT, watch.wait_for(|c| *c == up))
        .await
        .unwrap_or_else(|_| panic!("link never became connected={up}"))
        .expect("link alive");
}

async fn next(sub: &mut Subscription) -> devgate_gateway::bus::Msg {
    tokio::time::timeout(WAIT, sub.next())
        .await
        .expect("message in time")
        .expect("subscription open")
}

/// A subscription is live once a PING sent after it came back (the server processed the SUB).
async fn live(link: &Link) {
    link.flush(WAIT).await.expect("PONG");
}

#[tokio::test]
async fn messages_reach_the_right_subscription_with_headers_and_replies() {
    let nats = NatsServer::start();
    let link = link(&nats);
    connected(&link, true).await;
    let mut a = link.subscribe("device.a.down");
    let mut b = link.subscribe("device.b.down");
    live(&link).await;

    let service = nats.client().await;
    let mut h = async_nats::HeaderMap::new();
    h.insert("Devgate-Ack", "device");
    service
        .publish_with_reply_and_headers("device.b.down", "reply.here", h, Bytes::from("to-b"))
        .await
        .expect("publish");
    service
        .publish("device.a.down", Bytes::from("to-a"))
        .await
        .expect("publish");
    let got_b = next(&mut b).await;
    assert_eq!(&got_b.payload[..], b"to-b");
    assert_eq!(got_b.reply_str(), Some("reply.here"));
    assert_eq!(got_b.header("Devgate-Ack"), Some("device"));
    let got_a = next(&mut a).await;
    assert_eq!(&got_a.payload[..], b"to-a");
    assert!(got_a.reply.is_none() && got_a.raw_headers().is_none());
    assert!(
        a.try_next().is_none() && b.try_next().is_none(),
        "each once"
    );

    // What the link publishes arrives, headers included.
    let up = devgate_tests::nats::via_link(
        &link,
        &service,
        "device.a.up",
        Headers::Pairs(&[("Devgate-Seq", "7")]),
        b"up",
    )
    .await;
    assert_eq!(&up.payload[..], b"up");
    let seq = up.headers.as_ref().and_then(|h| h.get("Devgate-Seq"));
    assert_eq!(seq.map(|v| v.as_str()), Some("7"));
}

#[tokio::test]
async fn requests_get_answers_no_responders_and_timeouts() {
    let nats = NatsServer::start();
    let link = link(&nats);
    connected(&link, true).await;
    let service = nats.client().await;
    let mut echo = service.subscribe("svc.echo").await.expect("sub");
    let _silent = service.subscribe("svc.silent").await.expect("sub");
    devgate_tests::nats::processed(&service).await;
    let responder = {
        let service = service.clone();
        tokio::spawn(async move {
            while let Some(m) = echo.next().await {
                if let Some(reply) = m.reply {
                    let _ = service.publish(reply, m.payload).await;
                }
            }
        })
    };

    let answer = link
        .request("svc.echo", Headers::None, b"ping?", WAIT)
        .await
        .expect("answer");
    assert_eq!(&answer.payload[..], b"ping?");
    let nobody = link
        .request("svc.nobody", Headers::None, b"", WAIT)
        .await
        .expect_err("nobody listens");
    assert_eq!(nobody, RequestError::NoResponders);
    let silent = link
        .request("svc.silent", Headers::None, b"", Duration::from_millis(200))
        .await
        .expect_err("never answered");
    assert_eq!(silent, RequestError::TimedOut);
    responder.abort();
}

#[tokio::test]
async fn drain_returns_everything_routed_before_it_and_nothing_after() {
    let nats = NatsServer::start();
    let link = link(&nats);
    connected(&link, true).await;
    let mut sub = link.subscribe("device.d.down");
    live(&link).await;
    let service = nats.client().await;
    for n in 0..500u32 {
        service
            .publish("device.d.down", Bytes::from(n.to_string()))
            .await
            .expect("publish");
    }
    // A request from the same service connection after the burst: once the link sees it, the
    // burst is on the link's socket too (one server, one connection each, in order).
    let mut marker = link.subscribe("marker");
    live(&link).await;
    service
        .publish("marker", Bytes::new())
        .await
        .expect("marker");
    next(&mut marker).await;

    sub.drain(WAIT).await.expect("drain confirmed");
    let mut got = Vec::new();
    while let Some(m) = sub.next().await {
        got.push(String::from_utf8(m.payload.to_vec()).expect("utf8"));
    }
    let want: Vec<String> = (0..500u32).map(|n| n.to_string()).collect();
    assert_eq!(got, want, "every message, in order, then the end");

    // After the drain the server no longer routes there: a request finds no responders.
    let after = service
        .request("device.d.down", Bytes::from("late"))
        .await
        .expect_err("unsubscribed");
    assert_eq!(after.kind(), async_nats::RequestErrorKind::NoResponders);
}

#[tokio::test]
async fn a_dropped_subscription_stops_the_interest() {
    let nats = NatsServer::start();
    let link = link(&nats);
    connected(&link, true).await;
    let sub = link.subscribe("device.gone.down");
    live(&link).await;
    let service = nats.client().await;
    let held = tokio::time::timeout(
        Duration::from_millis(300),
        service.request("device.gone.down", Bytes::new()),
    )
    .await;
    assert!(
        held.is_err(),
        "subscribed, never answers: no 'no responders' while it lives"
    );
    drop(sub);
    live(&link).await;
    let err = service
        .request("device.gone.down", Bytes::new())
        .await
        .expect_err("gone");
    assert_eq!(err.kind(), async_nats::RequestErrorKind::NoResponders);
}

#[tokio::test]
async fn reconnect_resubscribes_moves_the_epoch_and_refuses_work_while_down() {
    let mut nats = NatsServer::start();
    let link = link(&nats);
    connected(&link, true).await;
    let mut sub = link.subscribe("device.r.down");
    live(&link).await;
    let epoch = link.epoch();

    nats.stop();
    connected(&link, false).await;
    assert_eq!(
        link.publish("device.r.up", None, Headers::None, b"x").await,
        Err(LinkError::NotConnected),
        "publishing while down fails at once"
    );
    assert!(matches!(link.ping(), Err(LinkError::NotConnected)));
    assert_eq!(
        link.request("x", Headers::None, b"", WAIT)
            .await
            .expect_err("down"),
        RequestError::Link(LinkError::NotConnected)
    );

    nats.restart();
    connected(&link, true).await;
    assert!(link.epoch() > epoch, "a new connection is a new epoch");
    live(&link).await;
    let service = nats.client().await;
    service
        .publish("device.r.down", Bytes::from("after"))
        .await
        .expect("publish");
    assert_eq!(&next(&mut sub).await.payload[..], b"after");
}

#[tokio::test]
async fn oversize_publish_is_refused_before_it_reaches_the_server() {
    let nats = NatsServer::start();
    let link = link(&nats);
    connected(&link, true).await;
    let huge = vec![0u8; 2 * 1024 * 1024];
    let err = link
        .publish("device.x.up", None, Headers::None, &huge)
        .await
        .expect_err("above max_payload");
    assert!(
        matches!(err, LinkError::TooLarge { max, .. } if max == 1024 * 1024),
        "{err}"
    );
    // The connection survived (the server would have closed it on a violation).
    live(&link).await;
    assert!(link.is_connected());
}

#[test]
fn server_lists_parse_and_bad_ones_are_explained() {
    let servers = parse_servers("nats://a:4223, b , nats://u:p@[::1]:5000/, tls://n.example:4443")
        .expect("valid");
    assert_eq!(
        format!("{servers:?}"),
        "[nats://a:4223, nats://b:4222, nats://::1:5000, tls://n.example:4443]",
        "credentials never appear in Debug"
    );
    assert_eq!(
        servers.iter().map(|s| s.tls()).collect::<Vec<_>>(),
        [false, false, false, true]
    );
    for (bad, why) in [
        ("ws://a:4222", "not supported"),
        ("nats://a:port", "port is not a number"),
        ("", "no server"),
        ("nats://:4222", "no host"),
    ] {
        let e = parse_servers(bad).expect_err(bad).to_string();
        assert!(e.contains(why), "{bad}: {e}");
    }
}

#[tokio::test]
async fn a_message_announcing_an_impossible_size_drops_the_connection_and_reconnects() {
    let (url, mut accepted) = fake_server(|n| match n {
        // u64::MAX bytes: the length arithmetic overflowed and the connection task panicked,
        // leaving the link "connected" to nothing forever.
        0 => (
            b"MSG device.a.down 2 18446744073709551615\r\n".to_vec(),
            false,
        ),
        _ => (Vec::new(), false),
    })
    .await;
    let link = link_to(&url, None);
    for want in 0..2 {
        let n = tokio::time::timeout(WAIT, accepted.recv())
            .await
            .unwrap_or_else(|_| panic!("connection {want} never came"));
        assert_eq!(n, Some(want));
    }
    // Down between the two (the first was dropped), so this is the second connection.
    connected(&link, true).await;
    assert_eq!(
        link.epoch(),
        2,
        "the bad connection was dropped, a new one made"
    );
}

#[tokio::test]
async fn a_server_that_closes_after_the_handshake_is_not_hammered() {
    let (url, mut accepted) = fake_server(|_| (Vec::new(), true)).await;
    let _link = link_to(&url, None);
    let window = tokio::time::Instant::now() + Duration::from_secs(2);
    let mut connections = 0;
    while let Ok(Some(_)) = tokio::time::timeout_at(window, accepted.recv()).await {
        connections += 1;
    }
    // Backoff 100 ms, 200 ms, ... (less up to a quarter): at most 7 in 2 s. Without backoff
    // after a connection that was up, hundreds.
    assert!(
        (2..10).contains(&connections),
        "{connections} connections in 2 s"
    );
}

#[tokio::test]
async fn a_publish_the_server_refuses_is_not_confirmed() {
    let (nats, _dir) = nats_with(
        "authorization {\n  users = [\n    { user: gw, password: pw, permissions: { publish: { deny: [\"device.bad.up\"] } } }\n  ]\n}\n",
    );
    let link = link_to(&nats.url(), Some(("gw", "pw")));
    connected(&link, true).await;

    let epoch = link.confirm_epoch();
    link.publish("device.bad.up", None, Headers::None, b"x")
        .await
        .expect("handed to the link");
    assert_eq!(link.flush(WAIT).await, Err(LinkError::PublishRefused));
    assert_ne!(link.confirm_epoch(), epoch);
    assert!(link.is_connected(), "the server keeps the connection");

    let epoch = link.confirm_epoch();
    link.publish("device.good.up", None, Headers::None, b"x")
        .await
        .expect("handed to the link");
    link.flush(WAIT)
        .await
        .expect("a permitted publish is confirmed");
    assert_eq!(link.confirm_epoch(), epoch);

    // The same through the gateway's confirmer (what ACKs a device's UP), including a refusal
    // that arrived before the confirmer's PING.
    let config = Config {
        nats_url: nats.url(),
        nats_user: Some("gw".into()),
        nats_password: Some(Secret::new("pw")),
        ..Config::default()
    };
    let mut registry = prometheus_client::registry::Registry::default();
    let stop = tokio_util::sync::CancellationToken::new();
    let bus = Bus::connect(&config, "t", Metrics::new(&mut registry), stop.clone())
        .await
        .expect("bus");
    connected(bus.link(), true).await;
    let confirm = async |subject: &str, settle_first: bool| {
        let epoch = bus.epoch();
        bus.link()
            .publish(subject, None, Headers::None, b"up")
            .await
            .expect("handed to the link");
        if settle_first {
            let _ = bus.link().flush(WAIT).await;
        }
        bus.confirm(epoch).await.expect("confirmer running")
    };
    assert!(!confirm("device.bad.up", false).await, "refused: no ACK");
    assert!(
        !confirm("device.bad.up", true).await,
        "refused earlier: no ACK"
    );
    assert!(confirm("device.good.up", false).await, "permitted: ACK");
    stop.cancel();
}

#[tokio::test]
async fn a_lone_token_in_the_url_is_an_auth_token() {
    let (nats, _dir) = nats_with("authorization {\n  token: s3cr3t\n}\n");
    let url = format!("nats://s3cr3t@127.0.0.1:{}", nats.port());
    // The server refuses anything but the token, so being connected proves it was sent as one.
    let link = link_to(&url, None);
    connected(&link, true).await;
    live(&link).await;
}

/// NATS refusing a subscription (the gateway user's permissions) registers no interest: the link ends that subscription and no other, so a session on it
/// cannot be welcomed where nothing reaches it.
#[tokio::test]
async fn a_subscription_the_server_refuses_ends_and_others_carry_on() {
    let (nats, _dir) = nats_with(
        "authorization {\n  users = [\n    { user: gw, password: pw, permissions: { subscribe: { allow: [\">\"], deny: [\"device.forbidden.down\"] } } }\n  ]\n}\n",
    );
    let link = link_to(&nats.url(), Some(("gw", "pw")));
    connected(&link, true).await;
    let mut allowed = link.subscribe("device.allowed.down");
    let mut forbidden = link.subscribe("device.forbidden.down");
    assert!(
        tokio::time::timeout(WAIT, forbidden.next())
            .await
            .expect("ended in time")
            .is_none(),
        "the refused subscription ends"
    );
    // From another connection: a link never hears its own publishes (echo off).
    let publisher = link_to(&nats.url(), Some(("gw", "pw")));
    connected(&publisher, true).await;
    publisher
        .publish("device.allowed.down", None, Headers::None, b"still here")
        .await
        .expect("publish");
    let msg = tokio::time::timeout(WAIT, allowed.next())
        .await
        .expect("in time")
        .expect("open");
    assert_eq!(&msg.payload[..], b"still here");
    assert!(link.is_connected(), "the server keeps the connection");
}

/// A login the gateway refused `unavailable`, as it must when NATS refused the device's
/// subscription (welcomed, nothing could reach the device).
fn assert_unavailable(
    login: Result<
        (
            devgate_gateway::client::DeviceClient,
            devgate_gateway::codec::Welcome,
        ),
        devgate_gateway::client::ClientError,
    >,
) {
    use devgate_gateway::client::ClientError;
    match login {
        Err(ClientError::Refused(e)) => {
            assert_eq!(
                e.code,
                devgate_gateway::codec::ErrorCode::Unavailable,
                "{e:?}"
            );
        }
        Err(other) => panic!("expected ERROR unavailable, got {other}"),
        Ok((_, w)) => panic!("welcomed a device nothing can reach: {w:?}"),
    }
}

/// A gateway whose NATS user may not subscribe to one device's downlink refuses that device's
/// login (`unavailable`, it may reconnect to another gateway) instead of welcoming a session no
/// message can reach; other devices log in and are reached as usual.
#[tokio::test]
async fn a_login_whose_subscription_nats_refuses_is_unavailable_and_others_are_unaffected() {
    use devgate_tests::gateway::{config, device, request_reaches, start_with, try_device};
    let (nats, _dir) = nats_with(
        "authorization {\n  users = [\n    { user: gw, password: pw, permissions: { subscribe: { allow: [\">\"], deny: [\"device.forbidden.down\"] } } }\n    { user: svc, password: svc }\n  ]\n}\n",
    );
    let mut cfg = config(&nats, "gw-1");
    cfg.nats_user = Some("gw".into());
    cfg.nats_password = Some(Secret::new("pw"));
    let gw = start_with(cfg).await;
    assert_unavailable(try_device(&gw, "forbidden").await);
    let (mut dev, _) = device(&gw, "allowed").await;
    let service = async_nats::ConnectOptions::with_user_and_password("svc".into(), "svc".into())
        .connect(nats.url())
        .await
        .expect("service connects");
    request_reaches(&service, &mut dev, "allowed", b"hello").await;
}

/// Whether `sub` ends (the server refused it) within [`WAIT`].
async fn ends(sub: &mut Subscription) -> bool {
    matches!(tokio::time::timeout(WAIT, sub.next()).await, Ok(None))
}

/// NATS refuses a `SUB` over `max_subs` with an error that names no subject. The link still
/// ends exactly the refused subscription (the one whose marked `PING` was oldest in flight),
/// even when later `SUB`s follow it at once; the others keep receiving.
#[tokio::test]
async fn a_subscription_over_max_subs_ends_and_no_other() {
    // The link's reply inbox takes one of the three.
    let (nats, _dir) = nats_with("max_subs: 3\n");
    let link = link(&nats);
    connected(&link, true).await;
    let first = link.subscribe("device.first.down");
    let mut second = link.subscribe("device.second.down");
    live(&link).await;
    // Written back to back: the refused SUB is not the newest one. Blaming the newest would
    // end `fourth`, which the server took once `first`'s UNSUB made room.
    let mut third = link.subscribe("device.third.down");
    drop(first);
    let mut fourth = link.subscribe("device.fourth.down");
    assert!(
        ends(&mut third).await,
        "the subscription over the limit ends"
    );
    live(&link).await;
    assert!(
        !second.is_ended() && !fourth.is_ended(),
        "the others live on"
    );
    let service = nats.client().await;
    for (subject, sub) in [
        ("device.second.down", &mut second),
        ("device.fourth.down", &mut fourth),
    ] {
        service
            .publish(subject, Bytes::from(subject))
            .await
            .expect("publish");
        assert_eq!(&next(sub).await.payload[..], subject.as_bytes());
    }
    assert!(link.is_connected(), "the server keeps the connection");
}

/// After a reconnect to a server with a lower `max_subs`, the resubscriptions the server
/// refuses end, and every other one is routed as before. The link's own (non-device)
/// subscriptions go first, so they are never the ones refused. (Created second, the own one
/// is the last a walk of the sid table meets: sent in table order, it would be refused.)
#[tokio::test]
async fn resubscriptions_over_a_lowered_max_subs_end_and_the_rest_are_routed() {
    let (mut nats, dir) = nats_with("max_subs: 5\n");
    let link = link(&nats);
    connected(&link, true).await;
    let mut a = link.subscribe("device.a.down");
    let mut own = link.subscribe("devgate.gateways.stats");
    let mut b = link.subscribe("device.b.down");
    let mut c = link.subscribe("device.c.down");
    live(&link).await;
    assert!(
        [&a, &own, &b, &c].iter().all(|s| !s.is_ended()),
        "all fit under 5"
    );

    nats.stop();
    connected(&link, false).await;
    // The inbox, the link's own and one device; two devices are refused.
    std::fs::write(dir.path().join("nats.conf"), "max_subs: 3\n").expect("lower max_subs");
    nats.restart();
    connected(&link, true).await;
    live(&link).await;
    let mut devices = [
        ("device.a.down", &mut a),
        ("device.b.down", &mut b),
        ("device.c.down", &mut c),
    ];
    let ended: Vec<bool> = devices.iter().map(|(_, s)| s.is_ended()).collect();
    assert_eq!(
        ended.iter().filter(|e| **e).count(),
        2,
        "two device resubscriptions are over the limit: {ended:?}"
    );
    let service = nats.client().await;
    service
        .publish("devgate.gateways.stats", Bytes::from("own"))
        .await
        .expect("publish");
    assert_eq!(&next(&mut own).await.payload[..], b"own");
    for (name, sub) in &mut devices {
        if sub.is_ended() {
            continue;
        }
        service
            .publish(*name, Bytes::from(*name))
            .await
            .expect("publish");
        assert_eq!(&next(sub).await.payload[..], name.as_bytes());
    }
}

/// A gateway whose NATS connection reaches `max_subs` refuses the next login `unavailable`
/// (welcomed, nothing could reach the device), counts it, and keeps serving the devices it
/// holds; once one leaves, a login fits again.
#[tokio::test]
async fn a_login_over_max_subs_is_unavailable_and_the_devices_held_are_unaffected() {
    use devgate_tests::gateway::{device, metric_reaches, request_reaches, start, try_device};
    // The gateway's own subscriptions (reply inbox, announcements, stats, sessions) take 4 of the 6.
    let (nats, _dir) = nats_with("max_subs: 6\n");
    let gw = start(&nats, "gw-1").await;
    let service = nats.client().await;
    // Answered: the stats and sessions subscriptions (written together) are in place, and the
    // announcements' before them (at start), so the devices' are the ones that meet the limit.
    tokio::time::timeout(
        WAIT,
        service.request("devgate.gateways.stats", Bytes::new()),
    )
    .await
    .expect("stats in time")
    .expect("stats answered");
    let (mut one, _) = device(&gw, "one").await;
    let (two, _) = device(&gw, "two").await;
    assert_unavailable(try_device(&gw, "three").await);
    metric_reaches(&gw, "devgate_gateway_nats_subscriptions_refused_total 1").await;
    request_reaches(&service, &mut one, "one", b"still here").await;

    // A session's end drains its subscription before it tells its presence: once the event is
    // here, the server has freed the slot.
    let mut presence = service
        .subscribe("device.two.presence")
        .await
        .expect("subscribe");
    devgate_tests::nats::processed(&service).await;
    drop(two);
    let event = tokio::time::timeout(WAIT, presence.next())
        .await
        .expect("presence in time")
        .expect("presence");
    assert!(
        String::from_utf8_lossy(&event.payload).contains("disconnected"),
        "{event:?}"
    );
    try_device(&gw, "three")
        .await
        .expect("a login fits once a device left");
}
