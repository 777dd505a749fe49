//! bridge-api end to end: real HTTP (reqwest) -> bridge-api -> real nats-server -> real
//! in-process gateways -> simulated devices (`DeviceClient`), and back.

mod common;

use std::time::{Duration, Instant};

use common::{Bridge, SseReader, TOKEN, WAIT, assert_error, bridge_config, send};
use devgate_gateway::client::ClientError;
use devgate_gateway::codec::GoAwayReason;
use devgate_gateway::contract::{ControlError, DeviceId, headers, subjects};
use devgate_tests::NatsServer;
use devgate_tests::gateway::{config as gw_config, device, start, start_with};
use futures::StreamExt;
use reqwest::Method;
use serde_json::{Value, json};

#[tokio::test]
async fn send_answers_sent_and_acked_and_keeps_content_type() {
    let nats = NatsServer::start();
    let gw = start(&nats, "gw-1").await;
    let bridge = Bridge::start(&nats).await;
    let (mut dev, welcome) = device(&gw, "dev-1").await;

    // A tap on the downlink subject shows what went over NATS.
    let tap_client = nats.client().await;
    let mut tap = tap_client
        .subscribe(subjects::down(&DeviceId::parse("dev-1").expect("id")))
        .await
        .expect("tap");
    // The server answers the barrier subject itself, after it has registered the tap.
    let _ = tap_client
        .request(subjects::barrier("test-tap"), "".into())
        .await;

    let got = send(
        bridge
            .req(Method::POST, "/v1/devices/dev-1/messages")
            .header("content-type", "text/plain")
            .body("hello"),
    )
    .await;
    assert_eq!(got.0, 200, "{}", got.1);
    assert_eq!(got.1["status"], "sent");
    assert_eq!(got.1["gateway"], "gw-1");
    assert_eq!(got.1["session"], welcome.session.as_str());
    let (seq, payload) = tokio::time::timeout(WAIT, dev.recv_down())
        .await
        .expect("in time")
        .expect("DOWN");
    assert_eq!((seq, payload.as_ref()), (0, b"hello".as_ref()));
    let tapped = tokio::time::timeout(WAIT, tap.next())
        .await
        .expect("tap in time")
        .expect("tapped");
    let ct = tapped.headers.as_ref().and_then(|h| h.get("Content-Type"));
    assert_eq!(ct.map(|v| v.as_str()), Some("text/plain"));

    // ack=device: the device ACKs, the answer is `acked`.
    let request = bridge
        .req(
            Method::POST,
            "/v1/devices/dev-1/messages?ack=device&timeout_ms=5000",
        )
        .body(vec![0u8, 159, 146, 150]);
    let pending = tokio::spawn(send(request));
    let (seq, payload) = tokio::time::timeout(WAIT, dev.recv_down())
        .await
        .expect("in time")
        .expect("DOWN");
    assert_eq!(payload.as_ref(), [0u8, 159, 146, 150]);
    assert_ne!(seq, 0, "a device ack was asked for");
    dev.ack(seq).await.expect("ack");
    let got = pending.await.expect("joined");
    assert_eq!(got.0, 200, "{}", got.1);
    assert_eq!(got.1["status"], "acked");
    assert_eq!(got.1["seq"], seq);
}

#[tokio::test]
async fn ack_none_is_202_even_for_an_offline_device() {
    let nats = NatsServer::start();
    let gw = start(&nats, "gw-1").await;
    let bridge = Bridge::start(&nats).await;
    let (mut dev, _) = device(&gw, "dev-1").await;

    let got = bridge
        .post("/v1/devices/dev-1/messages?ack=none", "fire")
        .await;
    assert_eq!(got.0, 202, "{}", got.1);
    assert_eq!(got.1["status"], "published");
    let (_, payload) = tokio::time::timeout(WAIT, dev.recv_down())
        .await
        .expect("in time")
        .expect("DOWN");
    assert_eq!(payload.as_ref(), b"fire");

    // The documented trap: nobody holds dev-2, yet ack=none cannot know.
    let got = bridge
        .post("/v1/devices/dev-2/messages?ack=none", "void")
        .await;
    assert_eq!(got.0, 202, "{}", got.1);
}

#[tokio::test]
async fn offline_device_is_404_at_once_not_a_timeout() {
    let nats = NatsServer::start();
    let _gw = start(&nats, "gw-1").await;
    let bridge = Bridge::start(&nats).await;
    let started = Instant::now();
    let got = bridge
        .post(
            "/v1/devices/nobody/messages?ack=device&timeout_ms=10000",
            "x",
        )
        .await;
    assert_error(&got, 404, "device_offline");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "offline took {:?}, must not wait for timeout_ms",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_device_that_never_acks_gives_504() {
    let nats = NatsServer::start();
    let gw = start_with(devgate_gateway::config::Config {
        ack_timeout_ms: 300,
        ..gw_config(&nats, "gw-1")
    })
    .await;
    let bridge = Bridge::start(&nats).await;
    let (mut dev, _) = device(&gw, "mute").await;

    // The gateway gives up first: `device_timeout`.
    let got = bridge
        .post("/v1/devices/mute/messages?ack=device&timeout_ms=5000", "x")
        .await;
    assert_error(&got, 504, "device_timeout");
    // bridge-api gives up first: `timeout`.
    let gw2 = start(&nats, "gw-2").await;
    let (mut dev2, _) = device(&gw2, "mute-2").await;
    let started = Instant::now();
    let got = bridge
        .post("/v1/devices/mute-2/messages?ack=device&timeout_ms=300", "x")
        .await;
    assert_error(&got, 504, "timeout");
    assert!(started.elapsed() < Duration::from_secs(3));
    // Both devices did get the frame; they just never acknowledged it.
    for d in [&mut dev, &mut dev2] {
        let (seq, _) = tokio::time::timeout(WAIT, d.recv_down())
            .await
            .expect("in time")
            .expect("DOWN");
        assert_ne!(seq, 0);
    }
}

#[tokio::test]
async fn a_takeover_before_the_device_acks_gives_502_session_closed_before_ack() {
    let nats = NatsServer::start();
    let gw1 = start(&nats, "gw-1").await;
    let gw2 = start(&nats, "gw-2").await;
    let bridge = Bridge::start(&nats).await;
    let (mut old, _) = device(&gw1, "dev-1").await;

    // The message reaches the device, which does not ACK it before it logs in elsewhere.
    let post = bridge.post(
        "/v1/devices/dev-1/messages?ack=device&timeout_ms=10000",
        "x",
    );
    let takeover = async {
        let (_, payload) = tokio::time::timeout(WAIT, old.recv_down())
            .await
            .expect("in time")
            .expect("DOWN");
        assert_eq!(&payload[..], b"x");
        device(&gw2, "dev-1").await
    };
    let (got, _new) = tokio::join!(post, takeover);

    // Not a timeout and not "acked": the old session ended with the ACK outstanding, and the
    // caller learns why (the frame was written; the device may or may not have it).
    assert_error(&got, 502, "delivery_failed");
    let text = got.1.to_string();
    assert!(text.contains("session_closed_before_ack"), "{text}");
}

#[tokio::test]
async fn payload_limit_matches_the_gateway_frame_exactly() {
    let nats = NatsServer::start();
    let gw = start(&nats, "gw-1").await;
    let bridge = Bridge::start(&nats).await;
    let (mut dev, _) = device(&gw, "big").await;
    let max = 65536 - 5;

    let got = bridge
        .post("/v1/devices/big/messages", vec![7u8; max])
        .await;
    assert_eq!(got.0, 200, "the largest frame payload must pass: {}", got.1);
    let (_, payload) = tokio::time::timeout(WAIT, dev.recv_down())
        .await
        .expect("in time")
        .expect("DOWN");
    assert_eq!(payload.len(), max);

    let got = bridge
        .post("/v1/devices/big/messages", vec![7u8; max + 1])
        .await;
    assert_error(&got, 413, "payload_too_large");

    // A bridge configured larger than the gateway: the gateway's `too_large` is still a 413.
    let loose = Bridge::start_with(devgate_bridge_api::config::Config {
        max_frame_len: 70_000,
        ..bridge_config(&nats)
    })
    .await;
    let got = loose
        .post("/v1/devices/big/messages", vec![7u8; max + 1])
        .await;
    assert_error(&got, 413, "payload_too_large");
}

#[tokio::test]
async fn callers_need_a_valid_bearer_token() {
    let nats = NatsServer::start();
    let bridge = Bridge::start(&nats).await;
    let http = &bridge.http;

    let missing = http
        .get(bridge.url("/v1/gateways"))
        .send()
        .await
        .expect("http");
    assert_eq!(missing.status(), 401);
    assert!(
        missing
            .headers()
            .get("www-authenticate")
            .is_some_and(|v| v.to_str().unwrap_or("").starts_with("Bearer")),
        "401 must say how to authenticate"
    );
    let body: Value = missing.json().await.expect("json");
    assert_eq!(body["error"], "unauthorized");

    for bad in ["wrong-token-0123456789", "", TOKEN.get(..10).unwrap_or("x")] {
        let got = send(http.get(bridge.url("/v1/gateways")).bearer_auth(bad)).await;
        assert_error(&got, 401, "unauthorized");
    }
    let got = send(
        http.post(bridge.url("/v1/devices/d/messages"))
            .header("authorization", format!("Basic {TOKEN}")),
    )
    .await;
    assert_error(&got, 401, "unauthorized");

    // Unauthenticated on purpose: probes, metrics and the API description.
    for path in ["/healthz", "/readyz", "/metrics", "/v1/openapi.json"] {
        let r = http.get(bridge.url(path)).send().await.expect("http");
        assert_eq!(r.status(), 200, "{path}");
    }
    let doc: Value = http
        .get(bridge.url("/v1/openapi.json"))
        .send()
        .await
        .expect("http")
        .json()
        .await
        .expect("json");
    assert_eq!(
        doc,
        serde_json::to_value(devgate_bridge_api::openapi_document()).expect("json")
    );
}

#[tokio::test]
async fn a_read_token_may_look_but_not_message_or_disconnect_devices() {
    const READER: &str = "dashboard-read-token-0123";
    let nats = NatsServer::start();
    let gw = start(&nats, "gw-1").await;
    let bridge = Bridge::start_with(devgate_bridge_api::config::Config {
        api_read_tokens: vec![devgate_gateway::common::Secret::new(READER)],
        ..bridge_config(&nats)
    })
    .await;
    let (mut dev, _) = device(&gw, "d1").await;
    let as_reader = |method: Method, path: &str| {
        bridge
            .http
            .request(method, bridge.url(path))
            .bearer_auth(READER)
    };

    // Looking is allowed: presence, listings, and a tail of the device's uplink.
    let got = send(as_reader(Method::GET, "/v1/devices/d1")).await;
    assert_eq!((got.0, &got.1["online"]), (200, &json!(true)), "{}", got.1);
    let got = send(as_reader(Method::GET, "/v1/devices")).await;
    assert_eq!(got.0, 200, "{}", got.1);
    assert_eq!(got.1["devices"][0]["device_id"], "d1", "{}", got.1);
    let got = send(as_reader(Method::GET, "/v1/gateways")).await;
    assert_eq!(got.0, 200, "{}", got.1);
    let tail = as_reader(Method::GET, "/v1/devices/d1/messages")
        .send()
        .await
        .expect("tail");
    assert_eq!(tail.status(), 200);
    drop(tail);

    // Acting is not: a send, a bulk send and a kick are refused before anything reaches NATS.
    let refused = [
        send(as_reader(Method::POST, "/v1/devices/d1/messages").body("not from a reader")).await,
        send(
            as_reader(Method::POST, "/v1/messages")
                .json(&json!({"device_ids": ["d1"], "payload_base64": "eA=="})),
        )
        .await,
        send(as_reader(Method::DELETE, "/v1/devices/d1/session")).await,
    ];
    for got in &refused {
        assert_error(got, 403, "forbidden");
        assert!(
            got.1["message"]
                .as_str()
                .is_some_and(|m| m.contains("--api-token")),
            "{}",
            got.1
        );
    }
    // The device is still online and the first DOWN it sees is the full token's.
    let got = bridge
        .post("/v1/devices/d1/messages", "from a writer")
        .await;
    assert_eq!(got.0, 200, "{}", got.1);
    let (_, payload) = tokio::time::timeout(WAIT, dev.recv_down())
        .await
        .expect("in time")
        .expect("DOWN");
    assert_eq!(&payload[..], b"from a writer");
    // A wrong token is still a 401, not a 403.
    let got = send(
        bridge
            .http
            .delete(bridge.url("/v1/devices/d1/session"))
            .bearer_auth("dashboard-read-token-0124"),
    )
    .await;
    assert_error(&got, 401, "unauthorized");
}

#[tokio::test]
async fn insecure_mode_serves_without_a_token() {
    let nats = NatsServer::start();
    let bridge = Bridge::start_with(devgate_bridge_api::config::Config {
        api_tokens: vec![],
        insecure_no_auth: true,
        ..bridge_config(&nats)
    })
    .await;
    let got = send(bridge.http.get(bridge.url("/v1/gateways"))).await;
    assert_eq!(got.0, 200, "{}", got.1);
}

#[tokio::test]
async fn bad_inputs_get_clear_400s_and_json_404_405() {
    let nats = NatsServer::start();
    let bridge = Bridge::start(&nats).await;
    let long = "a".repeat(129);
    // (method, path, JSON body, status, error code, text the message must contain)
    type Case<'a> = (Method, String, Option<&'a str>, u16, &'a str, &'a str);
    let cases: Vec<Case> = vec![
        (
            Method::POST,
            "/v1/devices/a.b/messages".into(),
            None,
            400,
            "bad_device_id",
            "'.'",
        ),
        (
            Method::POST,
            format!("/v1/devices/{long}/messages"),
            None,
            400,
            "bad_device_id",
            "129",
        ),
        (
            Method::GET,
            "/v1/devices/a*b".into(),
            None,
            400,
            "bad_device_id",
            "'*'",
        ),
        (
            Method::DELETE,
            "/v1/devices/a%20b/session".into(),
            None,
            400,
            "bad_device_id",
            "' '",
        ),
        (
            Method::GET,
            "/v1/devices/a.b/messages".into(),
            None,
            400,
            "bad_device_id",
            "'.'",
        ),
        (
            Method::POST,
            "/v1/devices/d/messages?ack=maybe".into(),
            None,
            400,
            "bad_request",
            "ack",
        ),
        (
            Method::POST,
            "/v1/devices/d/messages?timeout_ms=0".into(),
            None,
            400,
            "bad_request",
            "timeout_ms",
        ),
        (
            Method::POST,
            "/v1/devices/d/messages?timeout_ms=60001".into(),
            None,
            400,
            "bad_request",
            "timeout_ms",
        ),
        (
            Method::POST,
            "/v1/devices/d/messages?timeout_ms=soon".into(),
            None,
            400,
            "bad_request",
            "timeout_ms",
        ),
        (
            Method::POST,
            "/v1/devices/d/messages?bogus=1".into(),
            None,
            400,
            "bad_request",
            "bogus",
        ),
        (
            Method::POST,
            "/v1/messages".into(),
            Some("{not json"),
            400,
            "bad_request",
            "JSON",
        ),
        (
            Method::POST,
            "/v1/messages".into(),
            Some(r#"{"device_ids":[],"payload":"x"}"#),
            400,
            "bad_request",
            "empty",
        ),
        (
            Method::POST,
            "/v1/messages".into(),
            Some(r#"{"device_ids":["a","a"],"payload":"x"}"#),
            400,
            "bad_request",
            "twice",
        ),
        (
            Method::POST,
            "/v1/messages".into(),
            Some(r#"{"device_ids":["a.b"],"payload":"x"}"#),
            400,
            "bad_device_id",
            "a.b",
        ),
        (
            Method::POST,
            "/v1/messages".into(),
            Some(r#"{"device_ids":["a"],"payload":"x","payload_base64":"eA=="}"#),
            400,
            "bad_request",
            "exactly one",
        ),
        (
            Method::POST,
            "/v1/messages".into(),
            Some(r#"{"device_ids":["a"]}"#),
            400,
            "bad_request",
            "exactly one",
        ),
        (
            Method::POST,
            "/v1/messages".into(),
            Some(r#"{"device_ids":["a"],"payload_base64":"%%%"}"#),
            400,
            "bad_request",
            "base64",
        ),
        (
            Method::POST,
            "/v1/messages".into(),
            Some(r#"{"device_ids":["a"],"payload":"x","extra":1}"#),
            400,
            "bad_request",
            "extra",
        ),
        (
            Method::GET,
            "/v1/devices?limit=0".into(),
            None,
            400,
            "bad_request",
            "limit",
        ),
        (
            Method::GET,
            "/v1/devices?limit=1001".into(),
            None,
            400,
            "bad_request",
            "limit",
        ),
        (
            Method::GET,
            "/v1/devices?cursor=!!".into(),
            None,
            400,
            "bad_request",
            "cursor",
        ),
        (
            Method::GET,
            "/v1/nothing-here".into(),
            None,
            404,
            "not_found",
            "/v1/nothing-here",
        ),
        (
            Method::PUT,
            "/v1/gateways".into(),
            None,
            405,
            "method_not_allowed",
            "method",
        ),
    ];
    for (method, path, body, status, code, needle) in cases {
        let mut req = bridge.req(method.clone(), &path);
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b);
        }
        let got = send(req).await;
        assert_eq!(got.0, status, "{method} {path}: {}", got.1);
        assert_eq!(got.1["error"], code, "{method} {path}: {}", got.1);
        let message = got.1["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(needle),
            "{method} {path}: {message:?} lacks {needle:?}"
        );
    }
    let ids: Vec<String> = (0..1001).map(|i| format!("d{i}")).collect();
    let got = send(
        bridge
            .req(Method::POST, "/v1/messages")
            .json(&json!({"device_ids": ids, "payload": "x"})),
    )
    .await;
    assert_error(&got, 400, "bad_request");
    assert!(
        got.1["message"]
            .as_str()
            .unwrap_or("")
            .contains("at most 1000")
    );
}

#[tokio::test]
async fn bulk_send_reports_each_device() {
    let nats = NatsServer::start();
    let gw1 = start(&nats, "gw-1").await;
    let gw2 = start(&nats, "gw-2").await;
    let bridge = Bridge::start(&nats).await;
    let (mut a, _) = device(&gw1, "a").await;
    let (mut b, _) = device(&gw2, "b").await;

    let got = send(
        bridge
            .req(Method::POST, "/v1/messages")
            .json(&json!({"device_ids": ["b", "ghost", "a"], "payload_base64": "AAEC"})),
    )
    .await;
    assert_eq!(got.0, 200, "{}", got.1);
    assert_eq!(
        (got.1["succeeded"].as_u64(), got.1["failed"].as_u64()),
        (Some(2), Some(1))
    );
    let r = &got.1["results"];
    assert_eq!(r[0]["device_id"], "b");
    assert_eq!(r[0]["http_status"], 200);
    assert_eq!(r[0]["status"], "sent");
    assert_eq!(r[0]["gateway"], "gw-2");
    assert_eq!(r[1]["device_id"], "ghost");
    assert_eq!(r[1]["http_status"], 404);
    assert_eq!(r[1]["error"], "device_offline");
    assert_eq!(r[2]["gateway"], "gw-1");
    for d in [&mut a, &mut b] {
        let (_, p) = tokio::time::timeout(WAIT, d.recv_down())
            .await
            .expect("in time")
            .expect("DOWN");
        assert_eq!(p.as_ref(), [0u8, 1, 2]);
    }

    let got = send(
        bridge
            .req(Method::POST, "/v1/messages?ack=none")
            .json(&json!({"device_ids": ["a", "b"], "payload": "text"})),
    )
    .await;
    assert_eq!(got.0, 200, "{}", got.1);
    assert_eq!(got.1["results"][0]["http_status"], 202);
    assert_eq!(got.1["results"][1]["status"], "published");
    let (_, p) = tokio::time::timeout(WAIT, a.recv_down())
        .await
        .expect("in time")
        .expect("DOWN");
    assert_eq!(p.as_ref(), b"text");

    let got = send(
        bridge
            .req(Method::POST, "/v1/messages")
            .json(&json!({"device_ids": ["a"], "payload": "x".repeat(65536 - 4)})),
    )
    .await;
    assert_error(&got, 413, "payload_too_large");
}

#[tokio::test]
async fn a_bulk_send_answers_inside_the_request_cap_with_every_device() {
    let nats = NatsServer::start();
    let gw = start(&nats, "gw-1").await;
    let bridge = Bridge::start_with(devgate_bridge_api::config::Config {
        default_timeout_ms: 100,
        request_timeout_ms: 2_000,
        bulk_concurrency: 2,
        ..bridge_config(&nats)
    })
    .await;
    // mute-1 and mute-2 never ACK; a, b and c ACK every DOWN at once.
    let (mut mute_1, _) = device(&gw, "mute-1").await;
    let (mut mute_2, _) = device(&gw, "mute-2").await;
    let mut ackers = Vec::new();
    for id in ["a", "b", "c"] {
        let (mut dev, _) = device(&gw, id).await;
        ackers.push(tokio::spawn(async move {
            while let Ok((seq, _)) = dev.recv_down().await {
                if dev.ack(seq).await.is_err() {
                    break;
                }
            }
        }));
    }
    let (mut d, _) = device(&gw, "d").await;
    let (mut e, _) = device(&gw, "e").await;

    // Two slots: mute-1 holds one while a, b and c pass through the other, until mute-2 holds it
    // too. d and e never get their turn. Each device may wait 30 s, far beyond the 2 s cap.
    let ids = ["mute-1", "a", "b", "c", "mute-2", "d", "e"];
    let got = send(
        bridge
            .req(Method::POST, "/v1/messages?ack=device&timeout_ms=30000")
            .json(&json!({"device_ids": ids, "payload": "bulk"})),
    )
    .await;
    // A 200 at all means it came before the cap, which would have answered 504.
    assert_eq!(
        got.0, 200,
        "a bulk send must answer inside the cap: {}",
        got.1
    );
    let results = got.1["results"].as_array().expect("results");
    let order: Vec<&str> = results
        .iter()
        .map(|r| r["device_id"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(order, ids, "results in request order: {}", got.1);
    for r in &results[1..4] {
        assert_eq!(
            (r["http_status"].as_u64(), r["status"].as_str()),
            (Some(200), Some("acked")),
            "{r}"
        );
    }
    for r in [&results[0], &results[4]] {
        assert_eq!(
            (r["http_status"].as_u64(), r["error"].as_str()),
            (Some(504), Some("timeout")),
            "{r}"
        );
        assert!(
            r["message"]
                .as_str()
                .unwrap_or_default()
                .contains("may have been delivered"),
            "{r}"
        );
    }
    for r in &results[5..] {
        assert_eq!(
            (r["http_status"].as_u64(), r["error"].as_str()),
            (Some(504), Some("request_timeout")),
            "{r}"
        );
        assert!(
            r["message"]
                .as_str()
                .unwrap_or_default()
                .contains("not sent"),
            "{r}"
        );
    }
    assert_eq!(
        (got.1["succeeded"].as_u64(), got.1["failed"].as_u64()),
        (Some(3), Some(4))
    );
    // The muted devices hold the frame: it was in flight, as reported.
    for m in [&mut mute_1, &mut mute_2] {
        let (_, p) = tokio::time::timeout(WAIT, m.recv_down())
            .await
            .expect("in time")
            .expect("DOWN");
        assert_eq!(p.as_ref(), b"bulk");
    }
    // d and e really got nothing: the first DOWN they see is a later message.
    for (id, dev) in [("d", &mut d), ("e", &mut e)] {
        let got = bridge
            .post(&format!("/v1/devices/{id}/messages"), "later")
            .await;
        assert_eq!(got.0, 200, "{}", got.1);
        let (_, p) = tokio::time::timeout(WAIT, dev.recv_down())
            .await
            .expect("in time")
            .expect("DOWN");
        assert_eq!(p.as_ref(), b"later", "{id} was reported not sent");
    }
    for a in ackers {
        a.abort();
    }
}

#[tokio::test]
async fn a_bulk_content_type_with_cr_or_lf_is_400_and_the_server_keeps_serving() {
    let nats = NatsServer::start();
    let gw = start(&nats, "gw-1").await;
    let bridge = Bridge::start(&nats).await;
    let (mut dev, _) = device(&gw, "dev-1").await;
    for bad in [
        "text/plain\r\nX-Injected: 1",
        "text/plain\n",
        "a\rb",
        "caf\u{e9}",
        "a\u{7f}",
    ] {
        let got = send(bridge.req(Method::POST, "/v1/messages").json(&json!({
            "device_ids": ["dev-1"],
            "payload": "x",
            "content_type": bad,
        })))
        .await;
        assert_error(&got, 400, "bad_request");
        assert!(
            got.1["message"]
                .as_str()
                .unwrap_or_default()
                .contains("content_type"),
            "{}",
            got.1
        );
    }
    // Nothing reached the device, and the next request is served as usual.
    let got = send(bridge.req(Method::POST, "/v1/messages").json(&json!({
        "device_ids": ["dev-1"],
        "payload": "fine",
        "content_type": "text/plain; charset=utf-8",
    })))
    .await;
    assert_eq!(got.0, 200, "{}", got.1);
    assert_eq!(got.1["results"][0]["status"], "sent", "{}", got.1);
    let (_, p) = tokio::time::timeout(WAIT, dev.recv_down())
        .await
        .expect("in time")
        .expect("DOWN");
    assert_eq!(p.as_ref(), b"fine");
}

#[tokio::test]
async fn an_oversized_bulk_body_is_413_payload_too_large() {
    let nats = NatsServer::start();
    let bridge = Bridge::start(&nats).await;
    let limit = devgate_bridge_api::config::Config::default().bulk_body_limit();
    let got = send(
        bridge
            .req(Method::POST, "/v1/messages")
            .json(&json!({"device_ids": ["a"], "payload": "x".repeat(limit + 1)})),
    )
    .await;
    assert_error(&got, 413, "payload_too_large");
    assert!(
        got.1["message"]
            .as_str()
            .unwrap_or_default()
            .contains(&limit.to_string()),
        "{}",
        got.1
    );
}

#[tokio::test]
async fn presence_comes_from_the_holder() {
    let nats = NatsServer::start();
    let gw = start(&nats, "gw-7").await;
    let bridge = Bridge::start(&nats).await;
    let (_dev, welcome) = device(&gw, "here").await;

    let (status, body) = bridge.get("/v1/devices/here").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["online"], true);
    assert_eq!(body["gateway"], "gw-7");
    assert_eq!(body["session"], welcome.session.as_str());
    assert!(body["since_ms"].as_u64().is_some_and(|t| t > 0));
    assert!(
        body["remote_addr"]
            .as_str()
            .is_some_and(|a| a.starts_with("127.0.0.1:"))
    );

    let (status, body) = bridge.get("/v1/devices/away").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"device_id": "away", "online": false}));
}

#[tokio::test]
async fn devices_list_merges_two_gateways_page_by_page() {
    let nats = NatsServer::start();
    let gw1 = start(&nats, "gw-1").await;
    let gw2 = start(&nats, "gw-2").await;
    let bridge = Bridge::start(&nats).await;
    let mut held = Vec::new();
    for (gw, id) in [
        (&gw1, "d-0"),
        (&gw2, "d-1"),
        (&gw1, "d-2"),
        (&gw2, "d-3"),
        (&gw1, "d-4"),
    ] {
        held.push(device(gw, id).await);
    }

    let mut seen = Vec::new();
    let mut path = "/v1/devices?limit=2".to_owned();
    for page in 0.. {
        assert!(page < 5, "pagination does not end");
        let (status, body) = bridge.get(&path).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["count"], 5);
        let devices = body["devices"].as_array().expect("devices");
        assert!(devices.len() <= 2);
        for d in devices {
            let gw = if d["device_id"]
                .as_str()
                .is_some_and(|i| i.ends_with(['1', '3']))
            {
                "gw-2"
            } else {
                "gw-1"
            };
            assert_eq!(d["gateway"], gw, "{d}");
            seen.push(d["device_id"].as_str().expect("id").to_owned());
        }
        match body["next_cursor"].as_str() {
            Some(c) => path = format!("/v1/devices?limit=2&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(seen, ["d-0", "d-1", "d-2", "d-3", "d-4"]);

    let (_, body) = bridge.get("/v1/devices").await;
    assert_eq!(body["devices"].as_array().map(Vec::len), Some(5));
    assert!(body.get("next_cursor").is_none(), "{body}");
}

#[tokio::test]
async fn an_instance_that_does_not_list_its_sessions_is_named_unavailable() {
    let nats = NatsServer::start();
    let gw = start(&nats, "gw-1").await;
    let (_dev, _) = device(&gw, "dev-1").await;
    // "gw-ghost" answers the stats scatter, as a gateway does, but not the session list
    // request that follows (a gateway hung or cut off after answering, say).
    let ghost = nats.client().await;
    let mut stats = ghost.subscribe(subjects::STATS).await.expect("sub");
    devgate_tests::nats::processed(&ghost).await;
    let ghost_task = tokio::spawn(async move {
        while let Some(msg) = stats.next().await {
            let Some(reply) = msg.reply else { continue };
            let body = devgate_gateway::contract::GatewayStats {
                instance: "gw-ghost".into(),
                advertise_addr: "127.0.0.1:9".into(),
                ready: true,
                draining: false,
                sessions: 5,
                started_ms: 1,
            };
            let body = serde_json::to_vec(&body).expect("json");
            let _ = ghost.publish(reply, body.into()).await;
        }
    });
    let bridge = Bridge::start(&nats).await;

    let (status, body) = bridge.get("/v1/devices").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["unavailable_gateways"], json!(["gw-ghost"]), "{body}");
    // What the instances that answered hold is still listed.
    assert_eq!(body["devices"][0]["device_id"], "dev-1", "{body}");
    assert_eq!(body["count"], 1, "{body}");
    ghost_task.abort();
}

#[tokio::test]
async fn an_announced_instance_that_does_not_answer_stats_is_named_unavailable() {
    let nats = NatsServer::start();
    let gw = start(&nats, "gw-1").await;
    let (_dev, _) = device(&gw, "dev-1").await;
    // "gw-mute" announces itself like a gateway but never answers the stats scatter (hung, or
    // its reply is lost): it holds devices as far as anyone knows.
    let mute = nats.client().await;
    let announcer = tokio::spawn(async move {
        let announce = devgate_gateway::contract::Announce {
            instance: "gw-mute".into(),
            advertise_addr: "127.0.0.1:9".into(),
            ready: true,
            draining: false,
            sessions: 3,
            heartbeat_ms: 200,
            started_ms: 1,
            stopped: false,
            seq: 0,
            conn: 0,
            conn_seq: 0,
        };
        let body = bytes::Bytes::from(serde_json::to_vec(&announce).expect("json"));
        let mut beat = tokio::time::interval(Duration::from_millis(200));
        loop {
            beat.tick().await;
            let _ = mute.publish(subjects::ANNOUNCE, body.clone()).await;
        }
    });
    let bridge = Bridge::start_with(devgate_bridge_api::config::Config {
        // Every answer naming gw-mute waits the whole window for it.
        scatter_window_ms: 500,
        ..bridge_config(&nats)
    })
    .await;

    // bridge-api learns of gw-mute from its next announce; there is no event to await from
    // outside the process, so poll the list until it names it, with a deadline.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, body) = bridge.get("/v1/devices").await;
        assert_eq!(status, 200, "{body}");
        // What the instance that answered holds is always listed.
        assert_eq!(body["devices"][0]["device_id"], "dev-1", "{body}");
        assert_eq!(body["devices"][0]["gateway"], "gw-1", "{body}");
        assert_eq!(body["count"], 1, "{body}");
        if body.get("unavailable_gateways").is_some() {
            assert_eq!(body["unavailable_gateways"], json!(["gw-mute"]), "{body}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "GET /v1/devices never named the announced, silent gw-mute: {body}"
        );
    }
    let (status, body) = bridge.get("/v1/gateways").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["count"], 1, "{body}");
    assert_eq!(body["gateways"][0]["instance"], "gw-1", "{body}");
    assert_eq!(body["unavailable_gateways"], json!(["gw-mute"]), "{body}");
    announcer.abort();
}

#[tokio::test]
async fn gateways_list_shows_every_instance() {
    let nats = NatsServer::start();
    let bridge = Bridge::start(&nats).await;
    let (_, body) = bridge.get("/v1/gateways").await;
    assert_eq!(body, json!({"count": 0, "sessions": 0, "gateways": []}));

    let gw1 = start(&nats, "gw-1").await;
    let gw2 = start(&nats, "gw-2").await;
    let _a = device(&gw1, "a").await;
    let _b = device(&gw2, "b").await;
    let _c = device(&gw2, "c").await;
    let (status, body) = bridge.get("/v1/gateways").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["count"], 2);
    assert_eq!(body["sessions"], 3);
    assert_eq!(body["gateways"][0]["instance"], "gw-1");
    assert_eq!(body["gateways"][0]["sessions"], 1);
    assert_eq!(body["gateways"][1]["instance"], "gw-2");
    assert_eq!(body["gateways"][1]["sessions"], 2);
    assert_eq!(body["gateways"][1]["ready"], true);
    assert_eq!(
        body["gateways"][1]["advertise_addr"],
        gw2.device_addr().to_string()
    );
}

#[tokio::test]
async fn kick_sends_goaway_kicked() {
    let nats = NatsServer::start();
    let gw = start(&nats, "gw-1").await;
    let bridge = Bridge::start(&nats).await;
    let (mut dev, welcome) = device(&gw, "victim").await;

    let got = send(bridge.req(Method::DELETE, "/v1/devices/victim/session")).await;
    assert_eq!(got.0, 200, "{}", got.1);
    assert_eq!(
        got.1,
        json!({"status": "kicked", "gateway": "gw-1", "session": welcome.session})
    );
    match tokio::time::timeout(WAIT, dev.recv_down())
        .await
        .expect("in time")
    {
        Err(ClientError::GoAway(g)) => assert_eq!(g.reason, GoAwayReason::Kicked),
        other => panic!("expected GOAWAY kicked, got {other:?}"),
    }
    let got = send(bridge.req(Method::DELETE, "/v1/devices/victim/session")).await;
    assert_error(&got, 404, "device_offline");
}

#[tokio::test]
async fn sse_tail_streams_uplink() {
    let nats = NatsServer::start();
    let gw = start(&nats, "gw-1").await;
    let bridge = Bridge::start(&nats).await;
    let (mut dev, welcome) = device(&gw, "talker").await;
    let (mut other, _) = device(&gw, "other").await;

    let one = bridge
        .req(Method::GET, "/v1/devices/talker/messages")
        .send()
        .await
        .expect("sse");
    assert_eq!(one.status(), 200);
    assert!(
        one.headers()["content-type"]
            .to_str()
            .unwrap_or("")
            .starts_with("text/event-stream")
    );
    let all = bridge
        .req(Method::GET, "/v1/devices/-/messages")
        .send()
        .await
        .expect("sse");
    let (mut one, mut all) = (SseReader::new(one), SseReader::new(all));

    other
        .send_up(0, "not for the one-device tail")
        .await
        .expect("up");
    dev.send_up(1, "hello\nworld").await.expect("up");
    dev.send_up(2, vec![0xffu8, 0x00]).await.expect("up");

    let (name, data) = one.next_json().await;
    assert_eq!(name, "up");
    assert_eq!(data["device_id"], "talker");
    assert_eq!(data["payload"], "hello\nworld");
    assert_eq!(data["encoding"], "utf8");
    assert_eq!(data["seq"], 1);
    assert_eq!(data["gateway"], "gw-1");
    assert_eq!(data["session"], welcome.session.as_str());
    let (name, data) = one.next_json().await;
    assert_eq!(name, "up_base64");
    assert_eq!(
        (data["encoding"].as_str(), data["payload"].as_str()),
        (Some("base64"), Some("/wA="))
    );

    let mut from = Vec::new();
    for _ in 0..3 {
        let (_, data) = all.next_json().await;
        from.push(data["device_id"].as_str().expect("id").to_owned());
    }
    assert_eq!(from, ["other", "talker", "talker"]);
}

#[tokio::test]
async fn metrics_count_requests_by_route_and_status() {
    let nats = NatsServer::start();
    let _gw = start(&nats, "gw-1").await;
    let bridge = Bridge::start(&nats).await;
    let _ = bridge.post("/v1/devices/ghost-1/messages", "x").await;
    let _ = bridge.post("/v1/devices/ghost-2/messages", "x").await;
    let text = bridge.metrics_text().await;
    let line = text
        .lines()
        .find(|l| {
            l.starts_with("devgate_bridge_http_requests_total{")
                && l.contains(r#"route="/v1/devices/{id}/messages""#)
                && l.contains(r#"status="404""#)
        })
        .unwrap_or_else(|| panic!("no 404 counter for the route in:\n{text}"));
    assert!(line.ends_with(" 2"), "{line}");
    assert!(text.contains("devgate_bridge_http_request_duration_seconds_bucket"));
}

#[tokio::test]
async fn a_reply_outside_the_contract_is_502_bad_gateway_reply() {
    let nats = NatsServer::start();
    let bridge = Bridge::start(&nats).await;
    // Something that is not a devgate gateway holds the device's subject and answers nonsense.
    let impostor = nats.client().await;
    let mut held = impostor
        .subscribe(subjects::down(&DeviceId::parse("dev-1").expect("id")))
        .await
        .expect("sub");
    devgate_tests::nats::processed(&impostor).await;
    let answer = tokio::spawn(async move {
        let msg = held.next().await.expect("the request");
        let reply = msg.reply.expect("a request");
        impostor
            .publish(reply, "not json at all".into())
            .await
            .expect("answer");
        impostor.flush().await.expect("flush");
    });
    let got = bridge.post("/v1/devices/dev-1/messages", "x").await;
    assert_error(&got, 502, "bad_gateway_reply");
    answer.await.expect("impostor answered");
}

#[tokio::test]
async fn without_timeout_ms_the_configured_default_applies() {
    let nats = NatsServer::start();
    // The gateway would wait 30 s for the device's ACK; bridge-api's own default is shorter.
    let gw = start(&nats, "gw-1").await;
    let bridge = Bridge::start_with(devgate_bridge_api::config::Config {
        default_timeout_ms: 400,
        ..bridge_config(&nats)
    })
    .await;
    let (mut dev, _) = device(&gw, "mute").await;
    let started = Instant::now();
    let got = bridge
        .post("/v1/devices/mute/messages?ack=device", "x")
        .await;
    assert_error(&got, 504, "timeout");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(400) && waited < Duration::from_secs(3),
        "answered after {waited:?}"
    );
    // The device did get it; it just never acknowledged.
    let (seq, _) = tokio::time::timeout(WAIT, dev.recv_down())
        .await
        .expect("in time")
        .expect("DOWN");
    assert_ne!(seq, 0);
}

/// Stands in for a gateway session holding `device`: answers the next request on its down
/// subject with `answer`, after checking it is the control request `op`. Returns once the
/// subscription is in place, so a request sent afterwards reaches it.
async fn fake_holder(
    nats: &NatsServer,
    device: &str,
    op: subjects::ControlOp,
    answer: Value,
) -> tokio::task::JoinHandle<()> {
    let fake = nats.client().await;
    let mut held = fake
        .subscribe(subjects::down(&DeviceId::parse(device).expect("id")))
        .await
        .expect("sub");
    devgate_tests::nats::processed(&fake).await;
    tokio::spawn(async move {
        let msg = held.next().await.expect("the request");
        let got = msg.headers.as_ref().and_then(|h| h.get(headers::CONTROL));
        assert_eq!(got.map(|v| v.as_str()), Some(op.token()));
        let reply = msg.reply.expect("a request");
        let body = serde_json::to_vec(&answer).expect("json");
        fake.publish(reply, body.into()).await.expect("answer");
        fake.flush().await.expect("flush");
    })
}

/// The reply a gateway gives a presence request that was still queued at a session as it
/// ended (the contract's words, built from the contract's own type).
fn session_closed() -> Value {
    serde_json::to_value(ControlError {
        error: "session_closed".into(),
        message: "the session ended while the request was queued; the device is offline".into(),
    })
    .expect("json")
}

#[tokio::test]
async fn presence_caught_by_a_closing_session_is_offline_not_502() {
    let nats = NatsServer::start();
    let bridge = Bridge::start(&nats).await;
    let holder = fake_holder(
        &nats,
        "leaving",
        subjects::ControlOp::Presence,
        session_closed(),
    )
    .await;

    let (status, body) = bridge.get("/v1/devices/leaving").await;
    assert_eq!(status, 200, "{body}");
    // The same answer as for a device nobody holds.
    assert_eq!(body, json!({"device_id": "leaving", "online": false}));
    holder.await.expect("the fake holder answered");

    // Any other control error is still outside what presence may answer.
    let holder = fake_holder(
        &nats,
        "odd",
        subjects::ControlOp::Presence,
        json!({"error": "bad_request", "message": "no"}),
    )
    .await;
    let got = bridge.get("/v1/devices/odd").await;
    assert_error(&got, 502, "bad_gateway_reply");
    holder.await.expect("the fake holder answered");
}

#[tokio::test]
async fn kick_caught_by_a_closing_session_is_device_offline_not_502() {
    let nats = NatsServer::start();
    let bridge = Bridge::start(&nats).await;
    let holder = fake_holder(
        &nats,
        "leaving",
        subjects::ControlOp::Kick,
        session_closed(),
    )
    .await;

    let got = send(bridge.req(Method::DELETE, "/v1/devices/leaving/session")).await;
    // What a kick of a device nobody holds answers.
    assert_error(&got, 404, "device_offline");
    holder.await.expect("the fake holder answered");

    let holder = fake_holder(
        &nats,
        "odd",
        subjects::ControlOp::Kick,
        json!({"error": "bad_request", "message": "no"}),
    )
    .await;
    let got = send(bridge.req(Method::DELETE, "/v1/devices/odd/session")).await;
    assert_error(&got, 502, "bad_gateway_reply");
    holder.await.expect("the fake holder answered");
}

#[tokio::test]
async fn request_metrics_count_unknown_methods_as_one_other_series() {
    const CUSTOM: usize = 25;
    let nats = NatsServer::start();
    let bridge = Bridge::start(&nats).await;
    // Unauthenticated and on a route without such methods: the metrics middleware sees them all
    // anyway, so each distinct method would be a new series if the label were the raw input.
    for i in 0..CUSTOM {
        let method = Method::from_bytes(format!("AAAA{i}").as_bytes()).expect("method token");
        let response = bridge
            .http
            .request(method, bridge.url("/v1/gateways"))
            .send()
            .await
            .expect("HTTP request");
        assert!(response.status().is_client_error(), "{}", response.status());
    }
    // Standard methods keep their name.
    let got = send(bridge.http.put(bridge.url("/v1/gateways"))).await;
    assert!(got.0 >= 400, "{}", got.1);

    let text = bridge.metrics_text().await;
    let series: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("devgate_bridge_http_requests_total{"))
        .collect();
    assert!(
        !series.iter().any(|l| l.contains("AAAA")),
        "a raw method became a label:\n{text}"
    );
    let other: Vec<&&str> = series
        .iter()
        .filter(|l| l.contains(r#"method="other""#))
        .collect();
    assert_eq!(
        other.len(),
        1,
        "one series for every unknown method:\n{text}"
    );
    assert!(other[0].ends_with(&format!(" {CUSTOM}")), "{}", other[0]);
    assert!(
        series.iter().any(|l| l.contains(r#"method="PUT""#)),
        "no PUT series:\n{text}"
    );
}

#[tokio::test]
async fn a_wrong_method_on_a_v1_route_asks_for_a_token_before_saying_405() {
    let nats = NatsServer::start();
    let bridge = Bridge::start(&nats).await;
    let custom = Method::from_bytes(b"AAAA1").expect("method token");
    let wrong = [
        (Method::PUT, "/v1/gateways"),
        (Method::DELETE, "/v1/devices"),
        (Method::PATCH, "/v1/devices/d1"),
        (Method::PUT, "/v1/devices/d1/messages"),
        (Method::GET, "/v1/devices/d1/session"),
        (Method::GET, "/v1/messages"),
        (custom, "/v1/gateways"),
    ];
    for (method, path) in &wrong {
        let response = bridge
            .http
            .request(method.clone(), bridge.url(path))
            .send()
            .await
            .expect("HTTP request");
        let challenge = response
            .headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        assert_error(&(status, body), 401, "unauthorized");
        assert!(
            challenge.is_some_and(|c| c.starts_with("Bearer")),
            "{method} {path}: 401 without WWW-Authenticate"
        );
    }
    // With a token the route's real answer: the method is not allowed.
    for (method, path) in wrong {
        let got = send(bridge.req(method.clone(), path)).await;
        assert_eq!(got.0, 405, "{method} {path}: {}", got.1);
        assert_error(&got, 405, "method_not_allowed");
    }
    // The unauthenticated API description stays unauthenticated, wrong method included.
    let got = send(bridge.http.post(bridge.url("/v1/openapi.json"))).await;
    assert_error(&got, 405, "method_not_allowed");
}

#[tokio::test]
async fn a_single_send_with_a_content_type_that_is_not_visible_ascii_is_400() {
    use reqwest::header::{CONTENT_TYPE, HeaderValue};
    let nats = NatsServer::start();
    let gw = start(&nats, "gw-1").await;
    let bridge = Bridge::start(&nats).await;
    let (mut dev, _) = device(&gw, "dev-1").await;
    // Legal in HTTP (obs-text), not in a NATS header: refused, as a bulk send refuses it, not
    // passed on without its Content-Type.
    for bad in [&b"text/plain; charset=caf\xe9"[..], b"\xff", b"a\x80b"] {
        let value = HeaderValue::from_bytes(bad).expect("an HTTP header value");
        let got = send(
            bridge
                .req(Method::POST, "/v1/devices/dev-1/messages")
                .header(CONTENT_TYPE, value)
                .body("must not arrive"),
        )
        .await;
        assert_error(&got, 400, "bad_request");
        assert!(
            got.1["message"]
                .as_str()
                .unwrap_or_default()
                .contains("Content-Type"),
            "{}",
            got.1
        );
    }
    // Nothing reached the device: the first DOWN it gets is the next valid send's.
    let got = send(
        bridge
            .req(Method::POST, "/v1/devices/dev-1/messages")
            .header(CONTENT_TYPE, "text/plain; charset=utf-8")
            .body("fine"),
    )
    .await;
    assert_eq!(got.0, 200, "{}", got.1);
    let (_, payload) = tokio::time::timeout(WAIT, dev.recv_down())
        .await
        .expect("in time")
        .expect("DOWN");
    assert_eq!(payload.as_ref(), b"fine");
}

/// `count` is documented as the sum of the instances' own totals: a device caught mid-takeover
/// on two instances counts once per instance while `devices` lists it once (the newer session).
#[tokio::test]
async fn a_device_on_two_instances_is_listed_once_and_counted_by_each() {
    use devgate_gateway::contract::{GatewayStats, SessionList, SessionSummary};
    let nats = NatsServer::start();
    let gw = start(&nats, "gw-1").await;
    let (_dev, welcome) = device(&gw, "dev-1").await;
    // "gw-old" still holds an older session of dev-1, as the losing side of a takeover does
    // until it has closed it.
    let old = nats.client().await;
    let mut stats = old.subscribe(subjects::STATS).await.expect("sub");
    let mut sessions = old
        .subscribe(subjects::sessions("gw-old"))
        .await
        .expect("sub");
    devgate_tests::nats::processed(&old).await;
    let old_task = tokio::spawn(async move {
        loop {
            let (msg, body) = tokio::select! {
                Some(msg) = stats.next() => {
                    let body = serde_json::to_vec(&GatewayStats {
                        instance: "gw-old".into(),
                        advertise_addr: "127.0.0.1:9".into(),
                        ready: true,
                        draining: false,
                        sessions: 1,
                        started_ms: 1,
                    });
                    (msg, body)
                }
                Some(msg) = sessions.next() => {
                    let body = serde_json::to_vec(&SessionList {
                        instance: "gw-old".into(),
                        total: 1,
                        sessions: vec![SessionSummary {
                            device_id: DeviceId::parse("dev-1").expect("id"),
                            session: "old-session".into(),
                            since_ms: 1,
                            remote_addr: "127.0.0.1:9".into(),
                        }],
                        next_after: None,
                    });
                    (msg, body)
                }
                else => break,
            };
            let Some(reply) = msg.reply else { continue };
            let body = body.expect("json");
            let _ = old.publish(reply, body.into()).await;
        }
    });
    let bridge = Bridge::start(&nats).await;

    let (status, body) = bridge.get("/v1/devices").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["count"], 2, "{body}");
    let devices = body["devices"].as_array().expect("devices");
    assert_eq!(devices.len(), 1, "{body}");
    assert_eq!(devices[0]["gateway"], "gw-1", "{body}");
    assert_eq!(devices[0]["session"], welcome.session.as_str(), "{body}");
    old_task.abort();
}
