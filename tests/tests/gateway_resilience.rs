//! NATS going away and coming back in the middle of traffic, and a SIGTERM drain of the real
//! binary.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use devgate_gateway::client::{ClientError, DeviceClient};
use devgate_gateway::codec::FrameCodec;
use devgate_gateway::codec::{ErrorCode, Frame, GoAwayReason};
use devgate_gateway::config::Config;
use devgate_gateway::contract::{Announce, DeliveryReply, DeliveryStatus, DeviceId, subjects};
use devgate_tests::NatsServer;
use devgate_tests::bins::workspace_bin;
use devgate_tests::gateway::{
    HeldLogin, SECRET, config, device, downs_until_goaway, metric_reaches, next_frame, start,
    start_with, token,
};
use futures::StreamExt;
use tokio_util::codec::FramedRead;

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn sessions_survive_a_nats_restart_and_unaccepted_uplink_is_never_acked() {
    let mut nats = NatsServer::start();
    let gw = start(&nats, "gw-1").await;
    let (mut dev, welcome) = device(&gw, "dev-1").await;
    dev.send_up(1, Bytes::from_static(b"before"))
        .await
        .expect("up");
    assert_eq!(dev.recv_ack().await.expect("ack"), 1);

    nats.stop();
    // Wait until the gateway has noticed (its readiness turns false).
    let http = reqwest::Client::new();
    let readyz = format!("http://{}/readyz", gw.http_addr());
    let deadline = Instant::now() + WAIT;
    while http.get(&readyz).send().await.expect("readyz").status() != 503 {
        assert!(
            Instant::now() < deadline,
            "gateway never noticed NATS going away"
        );
        tokio::time::sleep(Duration::from_millis(20)).await; // nothing to await from outside
    }
    // A login now could not claim its device across gateways: refused, and said why.
    match devgate_tests::gateway::try_device(&gw, "dev-2").await {
        Err(ClientError::Refused(e)) => assert_eq!(e.code, ErrorCode::Unavailable, "{e:?}"),
        Err(e) => panic!("expected ERROR unavailable, got {e}"),
        Ok(_) => panic!("a login succeeded while NATS was down"),
    }
    dev.send_up(2, Bytes::from_static(b"during outage"))
        .await
        .expect("up");
    // NATS cannot accept it, so it must not be acknowledged while NATS is down.
    assert!(
        tokio::time::timeout(Duration::from_millis(700), dev.recv_ack())
            .await
            .is_err(),
        "an UP was acknowledged while NATS was down"
    );

    nats.restart();
    let acked = tokio::time::timeout(WAIT, dev.recv_ack())
        .await
        .expect("acked after NATS returned")
        .expect("ack");
    assert_eq!(acked, 2);
    // The same session is still subscribed: downlink works again.
    let service = nats.client().await;
    let deadline = Instant::now() + WAIT;
    let reply = loop {
        match service
            .request(
                subjects::down(&DeviceId::parse("dev-1").expect("id")),
                Bytes::from_static(b"after"),
            )
            .await
        {
            Ok(r) => break r,
            Err(e)
                if e.kind() == async_nats::RequestErrorKind::NoResponders
                    && Instant::now() < deadline =>
            {
                // The gateway resubscribes right after reconnecting; retry until it has.
                tokio::task::yield_now().await;
            }
            Err(e) => panic!("downlink after restart: {e}"),
        }
    };
    assert!(String::from_utf8_lossy(&reply.payload).contains(&welcome.session));
    assert_eq!(&dev.recv_down().await.expect("down").1[..], b"after");
    let metrics = http
        .get(format!("http://{}/metrics", gw.http_addr()))
        .send()
        .await
        .expect("m")
        .text()
        .await
        .expect("t");
    assert!(
        metrics.contains("devgate_gateway_nats_disconnects_total 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_nats_outage_longer_than_the_idle_limit_does_not_close_pinging_devices() {
    let mut nats = NatsServer::start();
    let mut c = devgate_tests::gateway::config(&nats, "gw-1");
    c.heartbeat_s = 1;
    let gw = devgate_tests::gateway::start_with(c).await;
    let (mut dev, welcome) = device(&gw, "dev-1").await;
    nats.stop();
    // The device keeps its heartbeat for 4 s (> 3 x 1 s) while the gateway cannot read.
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        dev.send(devgate_gateway::codec::Frame::Ping(Bytes::new()))
            .await
            .expect("ping");
    }
    nats.restart();
    // Once NATS is back the queued PINGs are answered and the session is the same one.
    match tokio::time::timeout(WAIT, dev.next_frame())
        .await
        .expect("in time")
        .expect("frame")
    {
        Some(devgate_gateway::codec::Frame::Pong(_)) => {}
        other => panic!("expected PONG after the outage, got {other:?}"),
    }
    let service = nats.client().await;
    let info = loop {
        match service
            .request_with_headers(
                subjects::down(&DeviceId::parse("dev-1").expect("id")),
                devgate_gateway::contract::headers::control(
                    devgate_gateway::contract::subjects::ControlOp::Presence,
                ),
                Bytes::new(),
            )
            .await
        {
            Ok(r) => break r,
            Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
                tokio::task::yield_now().await
            }
            Err(e) => panic!("presence: {e}"),
        }
    };
    assert!(String::from_utf8_lossy(&info.payload).contains(&welcome.session));
}

#[tokio::test]
async fn a_drain_turns_unready_delivers_what_was_routed_first_and_welcomes_nobody() {
    let nats = NatsServer::start();
    // Twenty devices over a 3 s window: their GOAWAYs come at random moments and the drain
    // lasts until the last one, so it is under way while the test looks (all twenty within
    // the first second has a chance of 3^-20).
    let gw = start_with(Config {
        drain_window_ms: 3_000,
        ..config(&nats, "gw-drain")
    })
    .await;
    let ids: Vec<String> = (0..20).map(|i| format!("dev-{i}")).collect();
    let mut devices = Vec::new();
    for id in &ids {
        devices.push(device(&gw, id).await.0);
    }
    // A connection still in its handshake (no HELLO yet) when the drain starts.
    let pending = tokio::net::TcpStream::connect(gw.device_addr())
        .await
        .expect("connect");
    metric_reaches(&gw, "devgate_gateway_connections 21").await;
    // Messages routed to dev-0 (NATS has them all) just before the drain.
    let service = nats.client().await;
    let down = |id: &str| subjects::down(&DeviceId::parse(id).expect("id"));
    let sent: Vec<Bytes> = (0..50).map(|i| Bytes::from(format!("m{i}"))).collect();
    for payload in &sent {
        service
            .publish(down("dev-0"), payload.clone())
            .await
            .expect("publish");
    }
    devgate_tests::nats::processed(&service).await;

    let (http, addr) = (gw.http_addr(), gw.device_addr());
    let stopping = tokio::spawn(gw.shutdown());
    // Unready at once, and says why.
    let readyz = format!("http://{http}/readyz");
    let deadline = Instant::now() + WAIT;
    loop {
        let response = reqwest::get(&readyz).await.expect("readyz");
        if response.status() == 503 {
            let body = response.text().await.expect("body");
            assert!(body.contains("draining"), "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "never turned unready");
        tokio::time::sleep(Duration::from_millis(10)).await; // nothing to await from outside
    }
    // The listener is closed: a new device is refused at connect.
    let refused = tokio::net::TcpStream::connect(addr)
        .await
        .expect_err("connected during the drain");
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    // The connection in its handshake is told to go elsewhere instead of being welcomed.
    let mut frames = FramedRead::new(pending, FrameCodec::default());
    match tokio::time::timeout(WAIT, frames.next())
        .await
        .expect("in time")
    {
        Some(Ok(frame)) => match devgate_gateway::client::into_error(frame) {
            ClientError::GoAway(g) => assert_eq!(g.reason, GoAwayReason::Draining),
            other => panic!("expected GOAWAY draining, got {other}"),
        },
        other => panic!("expected GOAWAY draining, got {other:?}"),
    }

    // During the drain, a request to each device: answered `sent` only if its session wrote it
    // before its GOAWAY (its subscription is drained first), "no responders" once it has let
    // go; never answered and lost.
    let answers = futures::future::join_all(ids.iter().map(|id| {
        let (service, subject) = (service.clone(), down(id));
        async move {
            match service
                .request(subject, Bytes::from(format!("late-{id}")))
                .await
            {
                Ok(reply) => {
                    let reply: devgate_gateway::contract::DeliveryReply =
                        serde_json::from_slice(&reply.payload).expect("reply");
                    assert_eq!(
                        reply.status,
                        devgate_gateway::contract::DeliveryStatus::Sent
                    );
                    true
                }
                Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => false,
                Err(e) => panic!("request to {id} during the drain: {e}"),
            }
        }
    }))
    .await;
    for ((id, dev), delivered) in ids.iter().zip(&mut devices).zip(answers) {
        let (seen, reason) = downs_until_goaway(dev).await;
        assert_eq!(reason, GoAwayReason::Draining, "{id}");
        let late = Bytes::from(format!("late-{id}"));
        assert_eq!(seen.contains(&late), delivered, "{id}: {seen:?}");
        if id == "dev-0" {
            // Everything routed before the drain, in order, ahead of the rest.
            assert_eq!(seen[..sent.len()], sent[..]);
        }
    }
    stopping
        .await
        .expect("shutdown task")
        .expect("gateway stops");
}

#[tokio::test]
async fn sigterm_drains_devices_with_spread_goaways_and_exits_cleanly() {
    let nats = NatsServer::start();
    let service = nats.client().await;
    let mut announces = service.subscribe(subjects::ANNOUNCE).await.expect("sub");
    devgate_tests::nats::processed(&service).await;
    let mut child = Command::new(workspace_bin("devgate-gateway"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--instance-id",
            "gw-term",
        ])
        .args([
            "--nats-url",
            &nats.url(),
            "--drain-window-ms",
            "1000",
            "--drain-reconnect-jitter-ms",
            "500",
        ])
        .args(["--announce-interval-ms", "200", "--log-format", "json"])
        .env("DEVGATE_AUTH_SECRET", SECRET)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn gateway");
    // The bound device address comes from the start-up log line.
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                && v["message"] == "gateway accepting devices"
            {
                let _ = tx.send(v["advertise_addr"].as_str().unwrap_or_default().to_owned());
            }
        }
    });
    let addr: std::net::SocketAddr = rx
        .recv_timeout(WAIT)
        .expect("gateway started")
        .parse()
        .expect("addr");
    // Wait for its first "ready" announcement (NATS connected).
    loop {
        let m = tokio::time::timeout(WAIT, announces.next())
            .await
            .expect("announce")
            .expect("msg");
        let a: Announce = serde_json::from_slice(&m.payload).expect("json");
        if a.instance == "gw-term" && a.ready {
            break;
        }
    }
    let mut devices = Vec::new();
    for i in 0..12 {
        let id = format!("d{i}");
        devices.push(
            DeviceClient::connect(addr, &id, &token(&id))
                .await
                .expect("login")
                .0,
        );
    }

    let started = Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    // Each device records when its own GOAWAY arrives (read concurrently).
    let arrivals: Vec<Duration> =
        futures::future::join_all(devices.iter_mut().map(|dev| async move {
            match tokio::time::timeout(WAIT, dev.recv_down())
                .await
                .expect("goaway in time")
            {
                Err(ClientError::GoAway(g)) => {
                    assert_eq!(g.reason, GoAwayReason::Draining);
                    assert!(g.reconnect_after_ms <= 500);
                    started.elapsed()
                }
                other => panic!("expected GOAWAY draining, got {other:?}"),
            }
        }))
        .await;
    // Draining is announced so balancers take the instance out of rotation.
    loop {
        let m = tokio::time::timeout(WAIT, announces.next())
            .await
            .expect("announce")
            .expect("msg");
        let a: Announce = serde_json::from_slice(&m.payload).expect("json");
        if a.instance == "gw-term" && a.draining {
            assert!(!a.ready);
            assert!(!a.stopped, "still answering while it drains");
            break;
        }
    }
    // Its last announce says it stopped, so listeners forget it at once.
    loop {
        let m = tokio::time::timeout(WAIT, announces.next())
            .await
            .expect("the last announce")
            .expect("msg");
        let a: Announce = serde_json::from_slice(&m.payload).expect("json");
        if a.instance == "gw-term" && a.stopped {
            assert!(a.draining && !a.ready, "{a:?}");
            break;
        }
    }
    let spread = arrivals
        .iter()
        .max()
        .expect("some")
        .saturating_sub(*arrivals.iter().min().expect("some"));
    assert!(
        spread >= Duration::from_millis(200),
        "GOAWAYs were not spread: {arrivals:?}"
    );
    let deadline = Instant::now() + WAIT;
    let exit = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "gateway did not exit after draining"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(exit.success(), "exit status {exit:?}");
}

#[tokio::test]
async fn at_max_inflight_unconfirmed_ups_the_gateway_stops_reading_until_nats_confirms() {
    let nats = NatsServer::start();
    let link = devgate_tests::cut::CuttableLink::start(([127, 0, 0, 1], nats.port()).into()).await;
    let gw = start_with(Config {
        nats_url: format!("nats://{}", link.addr()),
        max_inflight: 4,
        ..config(&nats, "gw-window")
    })
    .await;
    let (mut dev, _) = device(&gw, "dev-1").await;

    // NATS goes quiet without the connection breaking: UPs are published but not confirmed.
    link.hold_replies();
    for seq in 1..=3 {
        dev.send_up(seq, Bytes::from_static(b"u"))
            .await
            .expect("up");
    }
    // Three of four awaiting confirmation: the session still reads, and answers a PING.
    dev.send(Frame::Ping(Bytes::from_static(b"a")))
        .await
        .expect("ping");
    assert_eq!(
        next_frame(&mut dev).await,
        Frame::Pong(Bytes::from_static(b"a"))
    );
    // The fourth fills the window: the gateway stops reading this socket, so the next PING
    // waits (a bounded wait for an answer that must not come yet).
    dev.send_up(4, Bytes::from_static(b"u")).await.expect("up");
    dev.send(Frame::Ping(Bytes::from_static(b"b")))
        .await
        .expect("ping");
    assert!(
        tokio::time::timeout(Duration::from_millis(500), dev.next_frame())
            .await
            .is_err(),
        "the gateway kept reading with max_inflight UPs unconfirmed"
    );

    // NATS confirms: the four ACKs come, in order, and reading resumes as soon as the window
    // has room, so the PING is answered too (possibly between ACKs).
    link.release_replies();
    let mut acks = Vec::new();
    let mut ponged = false;
    while acks.len() < 4 || !ponged {
        match next_frame(&mut dev).await {
            Frame::Ack(seq) => acks.push(seq),
            Frame::Pong(body) => {
                assert_eq!(&body[..], b"b");
                ponged = true;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(acks, [1, 2, 3, 4]);
}

#[tokio::test]
async fn a_login_under_way_when_the_drain_starts_is_sent_elsewhere_not_welcomed() {
    let nats = NatsServer::start();
    // A long window: the login ends (two unanswered claim rounds, 2 s) before this device's
    // moment to hear GOAWAY comes, almost surely (if it comes first, the login also ends with
    // GOAWAY draining and the same answer to the request).
    let gw = start_with(Config {
        claim_timeout_ms: 1_000,
        drain_window_ms: 60_000,
        ..config(&nats, "gw-drain-login")
    })
    .await;
    // A stand-in holder that never answers keeps the login in its claim rounds for
    // claim_timeout_ms each; in the second it has subscribed.
    let held = HeldLogin::start(&nats, &gw, "dev-1", 2).await;
    // A request reaches the login's subscription before the drain.
    let service = nats.client().await;
    let mut answers = devgate_tests::nats::send_request(
        &service,
        subjects::down(&DeviceId::parse("dev-1").expect("id")),
        async_nats::HeaderMap::new(),
        Bytes::from_static(b"during the login"),
    )
    .await;
    devgate_tests::nats::processed(&service).await;
    // The drain starts while the login waits for its claim.
    let stopping = tokio::spawn(gw.shutdown());
    match held.outcome().await {
        Err(ClientError::GoAway(g)) => assert_eq!(g.reason, GoAwayReason::Draining),
        Ok((_, welcome)) => panic!("a draining gateway welcomed {welcome:?}"),
        Err(other) => panic!("expected GOAWAY draining, got {other}"),
    }
    // Nobody else holds the device: the request hears so at once instead of timing out.
    let reply = devgate_tests::nats::answer(&mut answers, WAIT).await;
    let reply: DeliveryReply = serde_json::from_slice(&reply.payload).expect("delivery reply");
    assert_eq!(
        (reply.status, reply.reason.as_deref()),
        (DeliveryStatus::Failed, Some("session_closed")),
        "{reply:?}"
    );
    tokio::time::timeout(WAIT, stopping)
        .await
        .expect("the gateway stops in time")
        .expect("shutdown task")
        .expect("gateway stops");
}
