//! Taking a credential away without taking the fleet down: a fleet-secret rotation during
//! which both secrets' tokens log in, and a denylist of device ids that refuses their logins
//! and cuts their live sessions. Each test also shows that other devices are unaffected and
//! that a message in flight to a revoked device is answered, not lost.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use devgate_gateway::auth::device_token;
use devgate_gateway::client::{ClientError, DeviceClient};
use devgate_gateway::codec::{ErrorBody, ErrorCode, Frame, Welcome};
use devgate_gateway::common::Secret;
use devgate_gateway::config::Config;
use devgate_gateway::contract::{DeliveryReply, DeliveryStatus, DeviceId, headers, subjects};
use devgate_gateway::server::Gateway;
use devgate_tests::NatsServer;
use devgate_tests::gateway::{
    HeldLogin, SECRET, config, device, metric_reaches, start_with, try_device,
};

const WAIT: Duration = Duration::from_secs(5);

fn down(id: &str) -> String {
    subjects::down(&DeviceId::parse(id).expect("valid id"))
}

/// The gateway's refusal of a login.
fn refusal(result: Result<(DeviceClient, Welcome), ClientError>) -> ErrorBody {
    match result {
        Err(ClientError::Refused(e)) => e,
        Err(other) => panic!("expected an ERROR, got {other}"),
        Ok((_, w)) => panic!("expected a refusal, got WELCOME {w:?}"),
    }
}

/// A request to `id` is answered `sent` and the device receives it.
async fn reachable(service: &async_nats::Client, dev: &mut DeviceClient, id: &str) {
    let reply = tokio::time::timeout(WAIT, service.request(down(id), Bytes::from_static(b"ping")))
        .await
        .expect("answered in time")
        .unwrap_or_else(|e| panic!("{id} unreachable: {e}"));
    let reply: DeliveryReply = serde_json::from_slice(&reply.payload).expect("delivery reply");
    assert_eq!(reply.status, DeliveryStatus::Sent, "{id}");
    let (_, payload) = tokio::time::timeout(WAIT, dev.recv_down())
        .await
        .expect("in time")
        .expect("DOWN");
    assert_eq!(&payload[..], b"ping");
}

/// Replaces `path` the way the kubelet updates a mounted ConfigMap: a new file renamed over
/// the old one, so the gateway never reads half a list.
fn write_atomically(path: &Path, content: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

#[tokio::test]
async fn during_a_rotation_tokens_of_both_secrets_log_in_and_the_old_ones_are_counted() {
    let nats = NatsServer::start();
    let new_secret = Secret::new("the-new-fleet-secret-42");
    let dir = tempfile::tempdir().expect("tempdir");
    let list = dir.path().join("denied-devices");
    write_atomically(&list, "old-but-revoked\n");
    let gw = start_with(Config {
        auth_secret: Some(new_secret.clone()),
        auth_secret_previous: Some(Secret::new(SECRET)),
        denied_devices_file: Some(list),
        ..config(&nats, "gw-1")
    })
    .await;
    let connect = |id: &'static str, token: String| {
        let addr = gw.device_addr();
        async move { DeviceClient::connect(addr, id, &token).await }
    };

    // Not yet re-provisioned: its token is the previous secret's.
    let (mut old, _) = connect("old-token", device_token(&Secret::new(SECRET), "old-token"))
        .await
        .expect("a previous-secret token logs in during the rotation");
    metric_reaches(&gw, "devgate_gateway_logins_previous_secret_total 1").await;
    let (mut new, _) = connect("new-token", device_token(&new_secret, "new-token"))
        .await
        .expect("a current-secret token logs in");
    // The counter moves before WELCOME, so it is final here: the new token did not count.
    metric_reaches(&gw, "devgate_gateway_logins_previous_secret_total 1").await;

    // An old token that does not get in is not counted: the counter measures devices still
    // to re-provision, and must stop rising once they are.
    let revoked = device_token(&Secret::new(SECRET), "old-but-revoked");
    assert_eq!(
        refusal(connect("old-but-revoked", revoked).await).code,
        ErrorCode::Unauthorized
    );
    metric_reaches(&gw, "devgate_gateway_denied_logins_total 1").await;
    metric_reaches(&gw, "devgate_gateway_logins_previous_secret_total 1").await;

    // Neither secret admits another device's token, nor does a third secret.
    let stolen = device_token(&Secret::new(SECRET), "old-token");
    let e = refusal(connect("someone-else", stolen).await);
    assert_eq!(e.code, ErrorCode::Unauthorized);
    let e = refusal(
        connect(
            "third",
            device_token(&Secret::new("a-third-fleet-secret"), "third"),
        )
        .await,
    );
    assert_eq!(e.code, ErrorCode::Unauthorized);
    metric_reaches(&gw, "devgate_gateway_errors_total{code=\"unauthorized\"} 3").await;

    let service = nats.client().await;
    reachable(&service, &mut old, "old-token").await;
    reachable(&service, &mut new, "new-token").await;
}

/// A gateway whose denylist, checked every 50 ms, starts as `content`; with the list's path
/// and the directory that holds it (removed on drop).
async fn gateway_with_denylist(
    nats: &NatsServer,
    content: &str,
) -> (Gateway, PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let list = dir.path().join("denied-devices");
    write_atomically(&list, content);
    let gw = start_with(Config {
        denied_devices_file: Some(list.clone()),
        denied_devices_check_ms: 50,
        ..config(nats, "gw-1")
    })
    .await;
    (gw, list, dir)
}

#[tokio::test]
async fn a_denied_id_is_refused_and_a_newly_denied_session_is_cut_off_with_its_request_answered() {
    let nats = NatsServer::start();
    let (gw, list, _dir) =
        gateway_with_denylist(&nats, "# revoked\nstolen-1  # leaked token\n").await;
    metric_reaches(&gw, "devgate_gateway_denied_devices 1").await;

    let e = refusal(try_device(&gw, "stolen-1").await);
    assert_eq!(e.code, ErrorCode::Unauthorized);
    assert!(e.message.contains("revoked"), "{}", e.message);
    metric_reaches(&gw, "devgate_gateway_denied_logins_total 1").await;

    let (mut bystander, _) = device(&gw, "bystander").await;
    let (mut victim, _) = device(&gw, "victim").await;
    let service = nats.client().await;
    // A request that waits for the victim's ACK, which never comes: the revocation must
    // answer it, not leave it to time out.
    let mut ack_device = async_nats::HeaderMap::new();
    ack_device.insert(headers::ACK, headers::ACK_DEVICE);
    let request = service.request_with_headers(
        down("victim"),
        ack_device,
        Bytes::from_static(b"confirm me"),
    );
    let revoke = async {
        let (seq, _) = tokio::time::timeout(WAIT, victim.recv_down())
            .await
            .expect("in time")
            .expect("DOWN");
        write_atomically(&list, "stolen-1\nvictim\n");
        seq
    };
    let (reply, seq) = tokio::join!(request, revoke);
    let reply: DeliveryReply =
        serde_json::from_slice(&reply.expect("answered").payload).expect("json");
    assert_eq!(reply.status, DeliveryStatus::Failed);
    assert_eq!(reply.reason.as_deref(), Some("session_closed_before_ack"));
    assert_eq!(reply.seq, seq);

    // The victim hears why, as an ERROR (a GOAWAY would invite it straight back).
    match tokio::time::timeout(WAIT, victim.next_frame())
        .await
        .expect("in time")
    {
        Ok(Some(Frame::Error(body))) => {
            let e: ErrorBody = serde_json::from_slice(&body).expect("error body");
            assert_eq!(e.code, ErrorCode::Unauthorized);
            assert!(e.message.contains("revoked"), "{}", e.message);
        }
        other => panic!("expected ERROR unauthorized, got {other:?}"),
    }
    metric_reaches(&gw, "devgate_gateway_revoked_sessions_total 1").await;
    metric_reaches(&gw, "devgate_gateway_denied_devices 2").await;
    let e = refusal(try_device(&gw, "victim").await);
    assert_eq!(e.code, ErrorCode::Unauthorized);
    reachable(&service, &mut bystander, "bystander").await;

    // Taken off the list, an id logs in again.
    write_atomically(&list, "victim\n");
    metric_reaches(&gw, "devgate_gateway_denied_devices 1").await;
    let (mut forgiven, _) = device(&gw, "stolen-1").await;
    reachable(&service, &mut forgiven, "stolen-1").await;
}

#[tokio::test]
async fn a_login_still_deciding_when_its_id_is_denied_is_refused_not_welcomed() {
    let nats = NatsServer::start();
    let (gw, list, _dir) = gateway_with_denylist(&nats, "").await;
    let (mut bystander, _) = device(&gw, "bystander").await;
    // Past its token and denylist checks, subscribed, waiting on a claim nobody answers.
    let held = HeldLogin::start(&nats, &gw, "late", 2).await;
    write_atomically(&list, "late\n");
    let e = refusal(held.outcome().await);
    assert_eq!(e.code, ErrorCode::Unauthorized);
    assert!(e.message.contains("revoked"), "{}", e.message);
    metric_reaches(&gw, "devgate_gateway_denied_logins_total 1").await;
    metric_reaches(&gw, "devgate_gateway_logins_total 1").await;
    let service = nats.client().await;
    reachable(&service, &mut bystander, "bystander").await;
}

#[tokio::test]
async fn a_broken_or_missing_denylist_keeps_the_previous_one_in_force() {
    let nats = NatsServer::start();
    let (gw, list, _dir) = gateway_with_denylist(&nats, "stolen-1\n").await;
    let (mut bystander, _) = device(&gw, "bystander").await;

    // A typo would drop stolen-1 from the list if it were applied.
    metric_reaches(&gw, "devgate_gateway_denylist_stale 0").await;
    write_atomically(&list, "stolen 2\n");
    metric_reaches(&gw, "devgate_gateway_denylist_errors_total 1").await;
    metric_reaches(&gw, "devgate_gateway_denylist_stale 1").await;
    assert_eq!(
        refusal(try_device(&gw, "stolen-1").await).code,
        ErrorCode::Unauthorized
    );

    std::fs::remove_file(&list).expect("remove");
    metric_reaches(&gw, "devgate_gateway_denylist_errors_total 2").await;
    metric_reaches(&gw, "devgate_gateway_denylist_stale 1").await;
    assert_eq!(
        refusal(try_device(&gw, "stolen-1").await).code,
        ErrorCode::Unauthorized
    );
    metric_reaches(&gw, "devgate_gateway_denied_devices 1").await;

    let service = nats.client().await;
    reachable(&service, &mut bystander, "bystander").await;

    // Fixed, the file applies again.
    write_atomically(&list, "# nobody\n");
    metric_reaches(&gw, "devgate_gateway_denied_devices 0").await;
    metric_reaches(&gw, "devgate_gateway_denylist_stale 0").await;
    device(&gw, "stolen-1").await;
}

#[tokio::test]
async fn a_gateway_does_not_start_with_a_denylist_it_cannot_read() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("missing");
    let start = |path: &Path| {
        Gateway::start(Config {
            denied_devices_file: Some(path.to_owned()),
            ..config(&nats, "gw-1")
        })
    };
    let err = start(&missing)
        .await
        .err()
        .expect("a missing denylist stops the start");
    assert!(err.to_string().contains("missing"), "{err}");

    let bad = dir.path().join("bad");
    std::fs::write(&bad, "ok-1\nnot ok\n").expect("write");
    let err = start(&bad)
        .await
        .err()
        .expect("an invalid denylist stops the start");
    let msg = err.to_string();
    assert!(
        msg.contains("line 2") && msg.contains("\"not ok\""),
        "{msg}"
    );
}
