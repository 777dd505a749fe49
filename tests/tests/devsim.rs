//! `devsim`, the device simulator users debug with, against a real gateway and nats-server.

use std::time::Duration;

use bytes::Bytes;
use devgate_gateway::contract::{DeviceId, subjects};
use devgate_tests::NatsServer;
use devgate_tests::bins::workspace_bin;
use devgate_tests::gateway::{SECRET, start};
use futures::StreamExt;

#[tokio::test]
async fn devsim_logs_devices_in_sends_uplink_and_prints_downlink() {
    let nats = NatsServer::start();
    let gw = start(&nats, "gw-1").await;
    let service = nats.client().await;
    let mut ups = service.subscribe(subjects::ALL_UP).await.expect("sub");
    let mut presence = devgate_tests::nats::presence_events(&service).await;

    let child = tokio::process::Command::new(workspace_bin("devsim"))
        .args([
            "--gateway",
            &gw.device_addr().to_string(),
            "--devices",
            "2",
            "--id-prefix",
            "sim-",
        ])
        .args([
            "--send",
            "hello",
            "--count",
            "3",
            "--interval-ms",
            "50",
            "--ack",
            "--duration-s",
            "3",
            "--no-reconnect",
        ])
        .env("DEVGATE_AUTH_SECRET", SECRET)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn devsim");

    // Both simulated devices come online, then each sends its 3 UPs.
    for _ in 0..2 {
        tokio::time::timeout(Duration::from_secs(5), presence.next())
            .await
            .expect("online")
            .expect("msg");
    }
    let mut from = std::collections::HashMap::<String, usize>::new();
    for _ in 0..6 {
        let m = tokio::time::timeout(Duration::from_secs(5), ups.next())
            .await
            .expect("uplink")
            .expect("msg");
        assert_eq!(&m.payload[..], b"hello");
        *from.entry(m.subject.to_string()).or_default() += 1;
    }
    assert_eq!(from.get("device.sim-1.up"), Some(&3));
    assert_eq!(from.get("device.sim-2.up"), Some(&3));
    // A downlink request with a device ack is acknowledged by devsim.
    let mut h = async_nats::HeaderMap::new();
    h.insert("Devgate-Ack", "device");
    let reply = service
        .request_with_headers(
            subjects::down(&DeviceId::parse("sim-2").expect("id")),
            h,
            Bytes::from_static(b"ping from service"),
        )
        .await
        .expect("answered");
    assert!(String::from_utf8_lossy(&reply.payload).contains("\"acked\""));

    let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .expect("exits")
        .expect("output");
    assert!(out.status.success(), "devsim exit {:?}", out.status);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("[sim-1] WELCOME session="), "{stdout}");
    assert!(
        stdout.contains("[sim-2] DOWN seq=1 \"ping from service\""),
        "{stdout}"
    );
    assert!(stdout.contains("[sim-1] ACK seq=3"), "{stdout}");
}

/// Two devsims with one id: the first is replaced and stops instead of logging in again, so
/// the two do not take the id from each other for ever and messages reach the newer one.
#[tokio::test]
async fn a_replaced_devsim_stops_and_leaves_the_id_to_the_newer_connection() {
    let nats = NatsServer::start();
    let gw = start(&nats, "gw-1").await;
    let service = nats.client().await;
    let mut presence = devgate_tests::nats::presence_events(&service).await;
    let spawn = || {
        tokio::process::Command::new(workspace_bin("devsim"))
            .args(["--gateway", &gw.device_addr().to_string()])
            .args(["--id-prefix", "twin-", "--duration-s", "20"])
            .env("DEVGATE_AUTH_SECRET", SECRET)
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn devsim")
    };
    let first = spawn();
    // The session of a `connected` presence event, if it is one.
    let connected = |m: &async_nats::Message| {
        let v: serde_json::Value = serde_json::from_slice(&m.payload).expect("presence json");
        (v["event"] == "connected").then(|| v["session"].as_str().expect("session").to_owned())
    };
    let event = tokio::time::timeout(Duration::from_secs(5), presence.next())
        .await
        .expect("first online")
        .expect("msg");
    let first_session = connected(&event).expect("a connected event");
    let _second = spawn();

    // The first exits on its own (well before its 20 s), saying why.
    let out = tokio::time::timeout(Duration::from_secs(10), first.wait_with_output())
        .await
        .expect("the replaced devsim exits instead of reconnecting")
        .expect("output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("[twin-1] GOAWAY replaced: another connection uses this id"),
        "{stdout}"
    );
    assert_eq!(stdout.matches("WELCOME").count(), 1, "{stdout}");
    // The newer connection is welcomed (a local takeover subscribes the newer session only
    // after the older one has let go, so wait for it rather than race it).
    loop {
        let event = tokio::time::timeout(Duration::from_secs(5), presence.next())
            .await
            .expect("the newer one online")
            .expect("msg");
        if connected(&event).is_some_and(|s| s != first_session) {
            break;
        }
    }
    // The newer connection holds the id and acknowledges a message sent to it.
    let mut h = async_nats::HeaderMap::new();
    h.insert("Devgate-Ack", "device");
    let reply = service
        .request_with_headers(
            subjects::down(&DeviceId::parse("twin-1").expect("id")),
            h,
            Bytes::from_static(b"to the newer one"),
        )
        .await
        .expect("answered");
    assert!(
        String::from_utf8_lossy(&reply.payload).contains("\"acked\""),
        "{reply:?}"
    );
}
