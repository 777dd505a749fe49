//! The bounds on SSE tails: how many may be open at once (all kinds, and `-` tails apart), that a
//! client leaving frees its slot, and that a tail's buffer is bounded in bytes as well as in
//! messages.

mod common;

use std::time::Instant;

use bytes::Bytes;
use common::{Bridge, SseReader, WAIT, bridge_config};
use devgate_bridge_api::config::Config;
use devgate_tests::NatsServer;
use reqwest::{Method, Response};

/// Opens a tail of `id` (`-` for every device) and returns the response, whatever its status.
async fn tail(bridge: &Bridge, id: &str) -> Response {
    bridge
        .req(Method::GET, &format!("/v1/devices/{id}/messages"))
        .send()
        .await
        .expect("HTTP request")
}

/// Asserts `response` is the 429 `too_many_tails` refusal, with `Retry-After` and a message
/// containing `says`.
async fn assert_refused(response: Response, says: &str) {
    assert_eq!(response.status(), 429);
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    assert!(
        retry_after.is_some_and(|s| s > 0),
        "no Retry-After: {retry_after:?}"
    );
    let body: serde_json::Value = response.json().await.expect("JSON error body");
    assert_eq!(body["error"], "too_many_tails", "{body}");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(message.contains(says), "{says:?} not in {message:?}");
}

/// The value of the metric line starting with `series` (name and labels), if any.
async fn metric(bridge: &Bridge, series: &str) -> Option<u64> {
    let text = bridge.metrics_text().await;
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// Polls the `sse_tails` gauge of `kind` until it reads `want`: the server notices a client
/// that left on its own schedule, and the gauge falls only after the slot is free.
async fn await_open_tails(bridge: &Bridge, kind: &str, want: u64) {
    let series = format!("devgate_bridge_sse_tails{{kind=\"{kind}\"}}");
    let deadline = Instant::now() + WAIT;
    loop {
        let open = metric(bridge, &series).await;
        if open == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{series} stayed {open:?}, never {want}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn tails_beyond_max_tails_get_429_until_a_client_leaves() {
    let nats = NatsServer::start();
    let bridge = Bridge::start_with(Config {
        max_tails: 2,
        max_wildcard_tails: 1,
        ..bridge_config(&nats)
    })
    .await;

    let first = tail(&bridge, "dev-a").await;
    assert_eq!(first.status(), 200);
    let second = tail(&bridge, "dev-b").await;
    assert_eq!(second.status(), 200);
    await_open_tails(&bridge, "device", 2).await;
    assert_refused(tail(&bridge, "dev-c").await, "at most 2").await;
    // A `-` tail is a tail too: refused by max_tails although max_wildcard_tails has room.
    assert_refused(tail(&bridge, "-").await, "at most 2").await;

    // The client goes away without reading to the end: its stream is dropped, its slot freed.
    drop(first);
    await_open_tails(&bridge, "device", 1).await;
    let third = tail(&bridge, "dev-c").await;
    assert_eq!(third.status(), 200);
    assert_refused(tail(&bridge, "dev-d").await, "at most 2").await;
    drop((second, third));
    await_open_tails(&bridge, "device", 0).await;
    bridge.stop().await;
}

#[tokio::test]
async fn every_device_tails_have_their_own_smaller_limit() {
    let nats = NatsServer::start();
    let bridge = Bridge::start_with(Config {
        max_tails: 3,
        max_wildcard_tails: 1,
        ..bridge_config(&nats)
    })
    .await;

    let all = tail(&bridge, "-").await;
    assert_eq!(all.status(), 200);
    assert_refused(tail(&bridge, "-").await, "every-device").await;
    // Single-device tails still have room.
    let one = tail(&bridge, "dev-a").await;
    assert_eq!(one.status(), 200);

    drop(all);
    await_open_tails(&bridge, "all", 0).await;
    let again = tail(&bridge, "-").await;
    assert_eq!(again.status(), 200);
    await_open_tails(&bridge, "all", 1).await;
    drop((one, again));
    bridge.stop().await;
}

#[tokio::test]
async fn a_tail_that_is_not_read_lags_at_its_byte_bound_before_its_message_bound() {
    const MESSAGE_BOUND: usize = 2_000;
    let nats = NatsServer::start();
    let bridge = Bridge::start_with(Config {
        // Far more messages than the sockets between bridge-api and the client absorb, so only
        // the byte bound can make the tail drop within MESSAGE_BOUND uplinks.
        sse_buffer: MESSAGE_BOUND,
        tail_buffer_bytes: 256 * 1024,
        ..bridge_config(&nats)
    })
    .await;
    let publisher = async_nats::connect(nats.url()).await.expect("NATS");
    let subject = devgate_gateway::contract::subjects::up(
        &devgate_gateway::contract::DeviceId::parse("chatty").expect("id"),
    );
    let response = tail(&bridge, "chatty").await;
    assert_eq!(response.status(), 200);
    let mut sse = SseReader::new(response);

    // 60 KB uplinks, near the largest frame, while the client reads nothing. Fewer than
    // MESSAGE_BOUND in all, so a drop can only come from the byte bound; bridge-api may still be
    // reading flushed ones when the last is sent, so the drop is awaited after that.
    let chunk = Bytes::from("z".repeat(60_000));
    let dropped = || async {
        metric(&bridge, "devgate_bridge_sse_dropped_events_total")
            .await
            .is_some_and(|n| n > 0)
    };
    let mut sent = 0;
    while sent + 20 < MESSAGE_BOUND && !dropped().await {
        for _ in 0..20 {
            publisher
                .publish(subject.clone(), chunk.clone())
                .await
                .expect("publish");
        }
        sent += 20;
        publisher.flush().await.expect("flush");
    }
    let deadline = Instant::now() + WAIT;
    while !dropped().await {
        assert!(
            Instant::now() < deadline,
            "nothing dropped after {sent} uplinks of 60 KB: the tail buffers more than \
             tail_buffer_bytes"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    // The client hears about the loss before the next uplink.
    publisher
        .publish(subject.clone(), Bytes::from_static(b"last"))
        .await
        .expect("publish");
    publisher.flush().await.expect("flush");
    let mut ups = 0;
    loop {
        let (name, data) = sse.next_json().await;
        if name == "lagged" {
            assert!(data["dropped"].as_u64().is_some_and(|n| n > 0), "{data}");
            break;
        }
        assert_eq!(name, "up", "{data}");
        ups += 1;
        assert!(ups <= sent, "no lagged event after {ups} uplinks");
    }
    bridge.stop().await;
}

/// A read-only token (the kind that sits in a dashboard) may hold at most half the tail slots,
/// so it cannot lock the services holding full tokens out of tails.
#[tokio::test]
async fn read_only_tokens_hold_at_most_half_the_tails() {
    const READER: &str = "a-read-only-token-for-tails";
    let nats = NatsServer::start();
    let bridge = Bridge::start_with(Config {
        max_tails: 4,
        max_wildcard_tails: 4,
        api_read_tokens: vec![devgate_gateway::common::Secret::new(READER)],
        ..bridge_config(&nats)
    })
    .await;
    let as_reader = |id: &str| {
        bridge
            .http
            .get(bridge.url(&format!("/v1/devices/{id}/messages")))
            .bearer_auth(READER)
            .send()
    };
    let reader_a = as_reader("dev-a").await.expect("HTTP request");
    assert_eq!(reader_a.status(), 200);
    let reader_b = as_reader("-").await.expect("HTTP request");
    assert_eq!(reader_b.status(), 200);
    assert_refused(
        as_reader("dev-c").await.expect("HTTP request"),
        "read-only token tails",
    )
    .await;
    // The other half is the full tokens'.
    let full_c = tail(&bridge, "dev-c").await;
    assert_eq!(full_c.status(), 200);
    let full_d = tail(&bridge, "dev-d").await;
    assert_eq!(full_d.status(), 200);
    assert_refused(tail(&bridge, "dev-e").await, "uplink tails").await;
    // A reader leaving frees its share's slot.
    drop(reader_a);
    await_open_tails(&bridge, "device", 2).await;
    let again = as_reader("dev-a").await.expect("HTTP request");
    assert_eq!(again.status(), 200);
    drop((reader_b, full_c, full_d, again));
}
