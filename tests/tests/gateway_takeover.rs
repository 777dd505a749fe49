//! At most one live session per device across all gateways; the newest login wins, nothing is
//! delivered twice, and nothing reaches the old session after the new one is welcomed.

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use devgate_gateway::client::{ClientError, DeviceClient};
use devgate_gateway::codec::{Frame, GoAwayReason, Welcome};
use devgate_gateway::config::Config;
use devgate_gateway::contract::{
    ClaimKey, ClaimReply, ClaimRequest, ControlError, DeliveryReply, DeliveryStatus, DeviceId,
    headers, subjects, subjects::ControlOp,
};
use devgate_gateway::server::Gateway;
use devgate_tests::NatsServer;
use devgate_tests::cut::CuttableLink;
use devgate_tests::gateway::{
    HeldLogin, config, device, downs_until_goaway, metric_reaches, start, start_with, try_device,
};
use futures::StreamExt;

const WAIT: Duration = Duration::from_secs(5);

fn down(s: &str) -> String {
    subjects::down(&DeviceId::parse(s).expect("valid id"))
}

async fn request_sent(
    service: &async_nats::Client,
    subject: &str,
    payload: Bytes,
) -> DeliveryReply {
    // During a takeover the device is briefly unsubscribed: a service retries "no responders".
    for _ in 0..100 {
        match service.request(subject.to_owned(), payload.clone()).await {
            Ok(reply) => return serde_json::from_slice(&reply.payload).expect("json reply"),
            Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
                tokio::task::yield_now().await;
            }
            Err(e) => panic!("request failed: {e}"),
        }
    }
    panic!("device never became reachable")
}

#[tokio::test]
async fn a_login_on_another_gateway_replaces_the_old_session() {
    let nats = NatsServer::start();
    let gw1 = start(&nats, "gw-1").await;
    let gw2 = start(&nats, "gw-2").await;
    let (mut old, _) = device(&gw1, "dev-1").await;
    let (mut new, welcome) = device(&gw2, "dev-1").await;
    let (seen, reason) = downs_until_goaway(&mut old).await;
    assert!(seen.is_empty());
    assert_eq!(reason, GoAwayReason::Replaced);
    assert!(
        old.next_frame().await.map(|f| f.is_none()).unwrap_or(true),
        "old connection closed"
    );

    let service = nats.client().await;
    let reply = request_sent(&service, &down("dev-1"), Bytes::from_static(b"hi")).await;
    assert_eq!(reply.status, DeliveryStatus::Sent);
    assert_eq!(
        (reply.gateway.as_str(), reply.session.as_str()),
        ("gw-2", welcome.session.as_str())
    );
    assert_eq!(&new.recv_down().await.expect("down").1[..], b"hi");
    // The login that took the device over counts it, wherever the old session was.
    metric_reaches(&gw2, "devgate_gateway_takeovers_total 1").await;
    metric_reaches(&gw1, "devgate_gateway_takeovers_total 0").await;
}

#[tokio::test]
async fn a_second_login_on_the_same_gateway_replaces_the_first() {
    let nats = NatsServer::start();
    let gw = start(&nats, "gw-1").await;
    let (mut old, w1) = device(&gw, "dev-1").await;
    let (mut new, w2) = device(&gw, "dev-1").await;
    assert_ne!(w1.session, w2.session);
    assert_eq!(downs_until_goaway(&mut old).await.1, GoAwayReason::Replaced);
    let service = nats.client().await;
    let reply = request_sent(&service, &down("dev-1"), Bytes::from_static(b"x")).await;
    assert_eq!(reply.session, w2.session);
    assert_eq!(&new.recv_down().await.expect("down").1[..], b"x");
}

#[tokio::test]
async fn an_ack_outstanding_on_a_replaced_session_is_answered_failed_with_its_seq() {
    let nats = NatsServer::start();
    let gw_a = start(&nats, "gw-a").await;
    let gw_b = start(&nats, "gw-b").await;
    let (mut old, old_welcome) = device(&gw_a, "dev-1").await;
    let service = nats.client().await;
    let mut ack_device = async_nats::HeaderMap::new();
    ack_device.insert(headers::ACK, headers::ACK_DEVICE);
    let request =
        service.request_with_headers(down("dev-1"), ack_device, Bytes::from_static(b"confirm me"));
    // The device gets the DOWN and, instead of ACKing, logs in again elsewhere.
    let takeover = async {
        let (seq, _) = tokio::time::timeout(WAIT, old.recv_down())
            .await
            .expect("in time")
            .expect("DOWN");
        device(&gw_b, "dev-1").await;
        seq
    };
    let (reply, seq) = tokio::join!(request, takeover);
    let reply: DeliveryReply =
        serde_json::from_slice(&reply.expect("answered").payload).expect("json");
    assert_eq!(reply.status, DeliveryStatus::Failed);
    assert_eq!(reply.reason.as_deref(), Some("session_closed_before_ack"));
    assert_eq!(
        (reply.seq, reply.session.as_str()),
        (seq, old_welcome.session.as_str()),
        "the written frame's seq, from the session that wrote it"
    );
}

#[tokio::test]
async fn messages_during_a_takeover_reach_exactly_one_session_and_the_old_one_only_before_the_new_welcome()
 {
    let nats = NatsServer::start();
    let gw1 = start(&nats, "gw-1").await;
    let gw2 = start(&nats, "gw-2").await;
    let (mut old, old_welcome) = device(&gw1, "dev-1").await;
    let service = nats.client().await;
    const N: usize = 200;

    let sender = {
        let service = service.clone();
        tokio::spawn(async move {
            let mut replies = Vec::new();
            for i in 0..N {
                let payload = Bytes::from(format!("m{i}"));
                replies.push((i, request_sent(&service, &down("dev-1"), payload).await));
            }
            replies
        })
    };
    // Take over while the stream of requests is flowing.
    tokio::task::yield_now().await;
    let (mut new, new_welcome) = device(&gw2, "dev-1").await;
    let replies = sender.await.expect("sender");
    let (old_seen, reason) = downs_until_goaway(&mut old).await;
    assert_eq!(reason, GoAwayReason::Replaced);

    let mut new_seen = Vec::new();
    let for_new = replies
        .iter()
        .filter(|(_, r)| r.session == new_welcome.session)
        .count();
    while new_seen.len() < for_new {
        let (_, p) = tokio::time::timeout(WAIT, new.recv_down())
            .await
            .expect("in time")
            .expect("down");
        new_seen.push(p);
    }
    let old_set: HashSet<_> = old_seen.iter().cloned().collect();
    let new_set: HashSet<_> = new_seen.iter().cloned().collect();
    assert!(
        old_set.is_disjoint(&new_set),
        "a message reached both sessions"
    );
    assert_eq!(
        old_set.len() + new_set.len(),
        N,
        "every message reached exactly one session"
    );
    for (i, r) in &replies {
        assert_eq!(r.status, DeliveryStatus::Sent, "m{i}");
        let payload = Bytes::from(format!("m{i}"));
        if r.session == old_welcome.session {
            assert!(
                old_set.contains(&payload),
                "m{i} answered by the old session but not received by it"
            );
        } else {
            assert_eq!(r.session, new_welcome.session);
            assert!(
                new_set.contains(&payload),
                "m{i} answered by the new session but not received by it"
            );
        }
    }
    // Everything the old session got was numbered before everything the new one got.
    let num = |b: &Bytes| -> usize {
        std::str::from_utf8(&b[1..])
            .expect("utf8")
            .parse()
            .expect("n")
    };
    if let (Some(last_old), Some(first_new)) = (
        old_seen.iter().map(num).max(),
        new_seen.iter().map(num).min(),
    ) {
        assert!(
            last_old < first_new,
            "old got m{last_old} after new got m{first_new}"
        );
    }
}

/// Outcome of one side of a login race: welcomed and still holding, or told to go away.
async fn race_side(
    result: Result<(DeviceClient, devgate_gateway::codec::Welcome), ClientError>,
) -> Option<(DeviceClient, String)> {
    match result {
        Ok((dev, w)) => Some((dev, w.session)),
        Err(ClientError::GoAway(g)) => {
            assert_eq!(g.reason, GoAwayReason::Replaced);
            None
        }
        Err(e) => panic!("unexpected login outcome: {e}"),
    }
}

#[tokio::test]
async fn concurrent_logins_on_two_gateways_leave_exactly_one_live_session() {
    let nats = NatsServer::start();
    let gw1 = start(&nats, "gw-1").await;
    let gw2 = start(&nats, "gw-2").await;
    let service = nats.client().await;
    for round in 0..15 {
        let id = format!("race-{round}");
        let (a, b) = tokio::join!(try_device(&gw1, &id), try_device(&gw2, &id));
        let mut alive = Vec::new();
        for side in [race_side(a).await, race_side(b).await]
            .into_iter()
            .flatten()
        {
            alive.push(side);
        }
        assert!(!alive.is_empty(), "{id}: somebody must win");
        // A welcomed loser is told to go away right after; find the one that keeps the device.
        let reply = request_sent(&service, &down(&id), Bytes::from_static(b"who")).await;
        let mut holders = 0;
        for (mut dev, session) in alive {
            if session == reply.session {
                holders += 1;
                let (_, p) = tokio::time::timeout(WAIT, dev.recv_down())
                    .await
                    .expect("in time")
                    .expect("down");
                assert_eq!(&p[..], b"who");
            } else {
                let (seen, reason) = downs_until_goaway(&mut dev).await;
                assert_eq!(reason, GoAwayReason::Replaced, "{id}");
                assert!(
                    seen.is_empty(),
                    "{id}: the loser must not receive the probe"
                );
            }
        }
        assert_eq!(holders, 1, "{id}: exactly one live session");
        let _ = Frame::Ack(0);
    }
}

/// Sends a `reclaim` control request with `body` to dev-1 and returns the answer.
async fn reclaim(service: &async_nats::Client, body: Vec<u8>) -> async_nats::Message {
    tokio::time::timeout(
        WAIT,
        service.request_with_headers(
            down("dev-1"),
            headers::control(ControlOp::Reclaim),
            body.into(),
        ),
    )
    .await
    .expect("answered in time")
    .expect("answered")
}

fn reclaim_body(login_ns: u64, gateway: &str, session: &str) -> Vec<u8> {
    serde_json::to_vec(&ClaimRequest {
        key: ClaimKey {
            login_ns,
            gateway: gateway.into(),
            session: session.into(),
        },
        subscribed: true,
    })
    .expect("json")
}

#[tokio::test]
async fn a_reclaim_is_decided_by_claim_key_and_the_older_session_yields() {
    let nats = NatsServer::start();
    let gw = start(&nats, "gw-1").await;
    let (mut dev, welcome) = device(&gw, "dev-1").await;
    let service = nats.client().await;

    // An unreadable body is refused and changes nothing.
    let refused: ControlError =
        serde_json::from_slice(&reclaim(&service, b"{".to_vec()).await.payload).expect("json");
    assert_eq!(refused.error, "bad_request");

    // A session older than the holder (one kept through an outage elsewhere) is told so, with
    // the holder's own key, and the holder carries on.
    let older = reclaim(&service, reclaim_body(1, "gw-0", "kept-through-outage")).await;
    let holder = match serde_json::from_slice(&older.payload).expect("claim reply") {
        ClaimReply::Superseded { key } => {
            assert_eq!(
                (key.gateway.as_str(), key.session.as_str()),
                ("gw-1", welcome.session.as_str())
            );
            assert!(key.login_ns > 1, "the holder's real login time");
            key
        }
        other => panic!("an older claimant must be superseded, got {other:?}"),
    };
    // Its own key (its own reclaim, republished back to it by another gateway) changes
    // nothing either. Published before the request below, so handled before it.
    service
        .publish_with_headers(
            down("dev-1"),
            headers::control(ControlOp::Reclaim),
            reclaim_body(holder.login_ns, &holder.gateway, &holder.session).into(),
        )
        .await
        .expect("publish");
    let reply = request_sent(&service, &down("dev-1"), Bytes::from_static(b"still here")).await;
    assert_eq!(reply.session, welcome.session);
    assert_eq!(&dev.recv_down().await.expect("down").1[..], b"still here");

    // A newer one makes the holder let go, exactly as a login's claim does.
    let (newer, (seen, reason)) = tokio::join!(
        reclaim(&service, reclaim_body(u64::MAX, "gw-9", "newer")),
        downs_until_goaway(&mut dev)
    );
    assert!(
        matches!(
            serde_json::from_slice(&newer.payload).expect("claim reply"),
            ClaimReply::Released { .. }
        ),
        "the holder answers released once it has let go"
    );
    assert!(seen.is_empty());
    assert_eq!(reason, GoAwayReason::Replaced);
}

/// A gateway whose NATS connection runs through a link the test can cut.
async fn gateway_behind_a_cuttable_link(
    nats: &NatsServer,
    instance: &str,
) -> (CuttableLink, Gateway) {
    let link = CuttableLink::start(([127, 0, 0, 1], nats.port()).into()).await;
    let gw = start_with(Config {
        nats_url: format!("nats://{}", link.addr()),
        ..config(nats, instance)
    })
    .await;
    (link, gw)
}

#[tokio::test]
async fn after_a_nats_outage_a_session_kept_through_it_yields_to_a_login_welcomed_elsewhere() {
    let nats = NatsServer::start();
    let (link, gw_a) = gateway_behind_a_cuttable_link(&nats, "gw-a").await;
    let gw_b = start(&nats, "gw-b").await;
    let (mut kept, _) = device(&gw_a, "dev-1").await;
    // A device nobody else took over meanwhile: the same re-check must leave it alone.
    let (mut alone, alone_welcome) = device(&gw_a, "dev-2").await;

    // gw-a loses NATS and keeps its session; the device (a new connection) comes back through
    // gw-b, whose claim nobody answers, so it is welcomed there.
    link.cut();
    tokio::time::timeout(WAIT, gw_a.wait_disconnected())
        .await
        .expect("gw-a notices the outage");
    let (mut fresh, welcome) = device(&gw_b, "dev-1").await;

    // gw-a reconnects and resubscribes: for a moment both sessions hold the device, until
    // gw-a's re-check meets the newer session and releases its own.
    link.restore();
    let (seen, reason) = downs_until_goaway(&mut kept).await;
    assert_eq!(reason, GoAwayReason::Replaced);
    assert!(seen.is_empty());

    let service = nats.client().await;
    let reply = request_sent(&service, &down("dev-1"), Bytes::from_static(b"after")).await;
    assert_eq!(
        (reply.gateway.as_str(), reply.session.as_str()),
        ("gw-b", welcome.session.as_str())
    );
    assert_eq!(&fresh.recv_down().await.expect("down").1[..], b"after");
    assert!(
        kept.next_frame().await.map(|f| f.is_none()).unwrap_or(true),
        "the released connection is closed"
    );

    // dev-2's reclaim started with dev-1's and needed no answer from another gateway, so it
    // was settled before dev-1's release came through: its session is still there.
    let reply = request_sent(&service, &down("dev-2"), Bytes::from_static(b"alone")).await;
    assert_eq!(
        (reply.gateway.as_str(), reply.session.as_str()),
        ("gw-a", alone_welcome.session.as_str())
    );
    assert_eq!(&alone.recv_down().await.expect("down").1[..], b"alone");
    // And the operator sees both re-checks.
    metric_reaches(&gw_a, "devgate_gateway_reclaims_total{outcome=\"lost\"} 1").await;
    metric_reaches(&gw_a, "devgate_gateway_reclaims_total{outcome=\"clear\"} 1").await;
}

/// Claim timeout for the reclaim tests whose stand-in answers: long enough that a loaded CI
/// machine never turns a late answer into `unanswered` (nothing waits for it to expire).
const ANSWERED_IN_TIME: u64 = 10_000;

/// A gateway that held dev-1 through a NATS outage, and a stand-in for another gateway that
/// holds dev-1 too (a plain NATS subscriber whose answers the test writes), as after a
/// split brain. After the reconnect the stand-in has received the gateway's `reclaim`.
struct ReclaimAfterOutage {
    nats: NatsServer,
    _link: CuttableLink,
    gw: Gateway,
    /// dev-1's connection to the gateway (`None` once the test hung up).
    dev: Option<DeviceClient>,
    welcome: Welcome,
    other: async_nats::Client,
    held: async_nats::Subscriber,
    /// The reclaim request the stand-in must answer (or not).
    reclaim: async_nats::Message,
}

impl ReclaimAfterOutage {
    async fn start(claim_timeout_ms: u64) -> Self {
        let nats = NatsServer::start();
        let link = CuttableLink::start(([127, 0, 0, 1], nats.port()).into()).await;
        let gw = start_with(Config {
            nats_url: format!("nats://{}", link.addr()),
            claim_timeout_ms,
            ..config(&nats, "gw-new")
        })
        .await;
        let (dev, welcome) = device(&gw, "dev-1").await;
        let other = nats.client().await;
        let mut held = other.subscribe(down("dev-1")).await.expect("subscribe");
        devgate_tests::nats::processed(&other).await;

        link.cut();
        tokio::time::timeout(WAIT, gw.wait_disconnected())
            .await
            .expect("the gateway notices the outage");
        link.restore();
        let reclaim = tokio::time::timeout(WAIT, held.next())
            .await
            .expect("the re-check after the reconnect arrives")
            .expect("message");
        let op = reclaim
            .headers
            .as_ref()
            .and_then(|h| h.get(headers::CONTROL))
            .map(|v| v.as_str().to_owned());
        assert_eq!(op.as_deref(), Some("reclaim"));
        Self {
            nats,
            _link: link,
            gw,
            dev: Some(dev),
            welcome,
            other,
            held,
            reclaim,
        }
    }

    /// The stand-in's answer to the reclaim.
    async fn answer(&self, body: Vec<u8>) {
        let reply = self.reclaim.reply.clone().expect("a request");
        self.other
            .publish(reply, body.into())
            .await
            .expect("answer");
        devgate_tests::nats::processed(&self.other).await;
    }

    /// The stand-in stops holding dev-1 (as a gateway that let it go).
    async fn stand_in_lets_go(&mut self) {
        self.held.unsubscribe().await.expect("unsubscribe");
        devgate_tests::nats::processed(&self.other).await;
    }

    /// The gateway's session kept dev-1: a request reaches it and the device gets the message.
    async fn session_still_holds_the_device(&mut self, payload: &'static [u8]) {
        let service = self.nats.client().await;
        let reply = request_sent(&service, &down("dev-1"), Bytes::from_static(payload)).await;
        assert_eq!(
            (reply.gateway.as_str(), reply.session.as_str()),
            ("gw-new", self.welcome.session.as_str())
        );
        let dev = self.dev.as_mut().expect("the device is connected");
        assert_eq!(&dev.recv_down().await.expect("down").1[..], payload);
    }
}

fn claim_reply(reply: &ClaimReply) -> Vec<u8> {
    serde_json::to_vec(reply).expect("json")
}

fn key_elsewhere(login_ns: u64) -> ClaimKey {
    ClaimKey {
        login_ns,
        gateway: "gw-other".into(),
        session: "s-other".into(),
    }
}

#[tokio::test]
async fn a_reclaim_answered_by_a_gateway_without_reclaim_leaves_the_session_as_it_was() {
    let mut t = ReclaimAfterOutage::start(ANSWERED_IN_TIME).await;
    // The stand-in is a gateway of the previous version. It answers a control request it does
    // not know with `bad_request`, as those gateways did.
    let refusal = ControlError {
        error: "bad_request".into(),
        message: "unknown Devgate-Control value \"reclaim\"".into(),
    };
    t.answer(serde_json::to_vec(&refusal).expect("json")).await;

    // Not taken for "released" (which would ask again and, unanswered, end as such): the
    // re-check ends at once, and the session stays as it would have without it.
    metric_reaches(
        &t.gw,
        "devgate_gateway_reclaims_total{outcome=\"unreadable\"} 1",
    )
    .await;
    // Asked once: no second reclaim follows (a bounded wait for something that must not come).
    assert!(
        tokio::time::timeout(Duration::from_millis(300), t.held.next())
            .await
            .is_err(),
        "a second reclaim was sent"
    );
    t.stand_in_lets_go().await;
    t.session_still_holds_the_device(b"still here").await;
}

#[tokio::test]
async fn a_reclaim_that_an_older_holder_answers_with_released_takes_the_device_back() {
    let mut t = ReclaimAfterOutage::start(ANSWERED_IN_TIME).await;
    // The stand-in is an older session elsewhere: it lets go, then says so.
    t.stand_in_lets_go().await;
    t.answer(claim_reply(&ClaimReply::Released {
        key: key_elsewhere(1),
        held: true,
    }))
    .await;

    // `released` is not the end: the gateway asks again, hears nobody, and counts the session
    // as taken back, not as clear.
    metric_reaches(
        &t.gw,
        "devgate_gateway_reclaims_total{outcome=\"took_back\"} 1",
    )
    .await;
    metric_reaches(&t.gw, "devgate_gateway_reclaims_total{outcome=\"clear\"} 0").await;
    t.session_still_holds_the_device(b"taken back").await;
}

#[tokio::test]
async fn a_reclaim_nobody_answers_keeps_the_session_and_is_counted() {
    // A short claim timeout: the stand-in stays subscribed and never answers, as a holder
    // that is hung or cut off from NATS again.
    let mut t = ReclaimAfterOutage::start(300).await;
    metric_reaches(
        &t.gw,
        "devgate_gateway_reclaims_total{outcome=\"unanswered\"} 1",
    )
    .await;
    metric_reaches(&t.gw, "devgate_gateway_reclaims_total{outcome=\"lost\"} 0").await;
    t.stand_in_lets_go().await;
    t.session_still_holds_the_device(b"kept").await;
}

#[tokio::test]
async fn a_reclaim_whose_session_ended_meanwhile_releases_nothing() {
    let mut t = ReclaimAfterOutage::start(ANSWERED_IN_TIME).await;
    // The device goes away while its reclaim is in flight; then a newer holder answers.
    drop(t.dev.take());
    metric_reaches(&t.gw, "devgate_gateway_sessions 0").await;
    t.answer(claim_reply(&ClaimReply::Superseded {
        key: key_elsewhere(u64::MAX),
    }))
    .await;

    // Nothing was released on behalf of a session that no longer exists.
    metric_reaches(&t.gw, "devgate_gateway_reclaims_total{outcome=\"ended\"} 1").await;
    metric_reaches(&t.gw, "devgate_gateway_reclaims_lost_total 0").await;
}

#[tokio::test]
async fn a_takeover_is_counted_only_when_a_live_session_let_go() {
    let nats = NatsServer::start();
    let gw = start(&nats, "gw-1").await;
    let other = nats.client().await;
    // A stand-in for another gateway's session of the device answers the login's first claim
    // `released`, then holds nothing. Only `held: true` (a welcomed session yielded) is a
    // takeover; a rival login that never got WELCOME replaced nothing.
    for (id, held, takeovers) in [("dev-1", false, 0), ("dev-2", true, 1)] {
        let mut holder = other.subscribe(down(id)).await.expect("subscribe");
        devgate_tests::nats::processed(&other).await;
        let answer = async {
            let claim = tokio::time::timeout(WAIT, holder.next())
                .await
                .expect("the claim in time")
                .expect("message");
            holder.unsubscribe().await.expect("unsubscribe");
            devgate_tests::nats::processed(&other).await;
            let body = claim_reply(&ClaimReply::Released {
                key: key_elsewhere(1),
                held,
            });
            other
                .publish(claim.reply.expect("a request"), body.into())
                .await
                .expect("answer");
            devgate_tests::nats::processed(&other).await;
        };
        let ((_dev, _), ()) = tokio::join!(device(&gw, id), answer);
        metric_reaches(&gw, &format!("devgate_gateway_takeovers_total {takeovers}")).await;
    }
}

#[tokio::test]
async fn a_login_displacing_a_local_login_that_was_never_welcomed_is_no_takeover() {
    let nats = NatsServer::start();
    let gw = start_with(Config {
        claim_timeout_ms: 1_000,
        ..config(&nats, "gw-1")
    })
    .await;
    // A silent stand-in keeps the first login in its claim rounds; in the second it has
    // subscribed, and a request reaches it.
    let first = HeldLogin::start(&nats, &gw, "dev-1", 2).await;
    let service = nats.client().await;
    let mut answers = devgate_tests::nats::send_request(
        &service,
        down("dev-1"),
        async_nats::HeaderMap::new(),
        Bytes::from_static(b"to the first login"),
    )
    .await;
    devgate_tests::nats::processed(&service).await;
    // A second login of the device on the same gateway displaces it before its WELCOME.
    let (_dev, _) = device(&gw, "dev-1").await;
    match first.outcome().await {
        Err(ClientError::GoAway(g)) => assert_eq!(g.reason, GoAwayReason::Replaced),
        Ok((_, welcome)) => panic!("both logins welcomed: {welcome:?}"),
        Err(other) => panic!("expected GOAWAY replaced, got {other}"),
    }
    metric_reaches(&gw, "devgate_gateway_logins_total 1").await;
    metric_reaches(&gw, "devgate_gateway_takeovers_total 0").await;
    // The displaced login answers what reached it (a hand-back could not reach the new login
    // on the same gateway, and it subscribes only after): no time-out.
    let reply = devgate_tests::nats::answer(&mut answers, WAIT).await;
    let reply: DeliveryReply = serde_json::from_slice(&reply.payload).expect("delivery reply");
    assert_eq!(
        (reply.status, reply.reason.as_deref()),
        (DeliveryStatus::Failed, Some("session_closed")),
        "{reply:?}"
    );
}

#[tokio::test]
async fn a_login_yielding_to_a_subscribed_claimant_hands_back_only_what_the_claimant_lacks() {
    use futures::FutureExt;

    let nats = NatsServer::start();
    let gw = start_with(Config {
        claim_timeout_ms: 1_000,
        ..config(&nats, "gw-1")
    })
    .await;
    // Held in its confirm round (subscribed) by a holder that never answers.
    let held = HeldLogin::start(&nats, &gw, "dev-1", 2).await;
    // A rival login elsewhere (newer key) subscribes, claims, and right behind its claim a
    // service's messages arrive: the rival has them, so the yielding login must not hand
    // them back a second time.
    let rival = nats.client().await;
    let mut rival_down = rival.subscribe(down("dev-1")).await.expect("subscribe");
    let inbox = rival.new_inbox();
    let mut answers = rival.subscribe(inbox.clone()).await.expect("inbox");
    devgate_tests::nats::processed(&rival).await;
    let claim = serde_json::to_vec(&ClaimRequest {
        key: key_elsewhere(u64::MAX),
        subscribed: true,
    })
    .expect("json");
    rival
        .publish_with_reply_and_headers(
            down("dev-1"),
            inbox,
            headers::control(ControlOp::Claim),
            claim.into(),
        )
        .await
        .expect("claim");
    for n in 0..5 {
        rival
            .publish(down("dev-1"), Bytes::from(format!("m{n}")))
            .await
            .expect("publish");
    }
    rival.flush().await.expect("flush");
    let answer = tokio::time::timeout(WAIT, answers.next())
        .await
        .expect("the yielding login answers")
        .expect("answer");
    let answer: ClaimReply = serde_json::from_slice(&answer.payload).expect("claim reply");
    assert!(matches!(answer, ClaimReply::Released { .. }), "{answer:?}");
    match held.outcome().await {
        Err(ClientError::GoAway(g)) => assert_eq!(g.reason, GoAwayReason::Replaced),
        Ok((_, welcome)) => panic!("the older login was welcomed: {welcome:?}"),
        Err(other) => panic!("expected GOAWAY replaced, got {other}"),
    }
    // The hand-off was published before the answer, on the same connection: it is here now.
    devgate_tests::nats::processed(&rival).await;
    let mut data = Vec::new();
    while let Some(Some(msg)) = rival_down.next().now_or_never() {
        if msg.payload.starts_with(b"m") {
            data.push(String::from_utf8_lossy(&msg.payload).into_owned());
        }
    }
    assert_eq!(data, ["m0", "m1", "m2", "m3", "m4"], "each exactly once");
}

#[tokio::test]
async fn a_login_that_displaces_a_login_which_had_replaced_a_live_session_is_a_takeover() {
    let nats = NatsServer::start();
    let gw = start_with(Config {
        claim_timeout_ms: 1_000,
        ..config(&nats, "gw-1")
    })
    .await;
    let (mut live, _) = device(&gw, "dev-1").await;
    // A second login displaces the live session, then is kept in its claim round...
    let second = HeldLogin::start(&nats, &gw, "dev-1", 1).await;
    let (_, reason) = downs_until_goaway(&mut live).await;
    assert_eq!(reason, GoAwayReason::Replaced);
    // ...and a third displaces it before its WELCOME: the live session was taken over all the
    // same, once.
    let (_third, _) = device(&gw, "dev-1").await;
    match second.outcome().await {
        Err(ClientError::GoAway(g)) => assert_eq!(g.reason, GoAwayReason::Replaced),
        Ok((_, welcome)) => panic!("two logins welcomed: {welcome:?}"),
        Err(other) => panic!("expected GOAWAY replaced, got {other}"),
    }
    metric_reaches(&gw, "devgate_gateway_logins_total 2").await;
    metric_reaches(&gw, "devgate_gateway_takeovers_total 1").await;
}
