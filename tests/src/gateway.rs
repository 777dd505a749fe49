//! In-process gateways wired to a test nats-server, and devices that log in to them.

use devgate_gateway::common::Validate;
use std::time::Duration;

use bytes::Bytes;
use devgate_gateway::auth::device_token;
use devgate_gateway::client::{ClientError, DeviceClient};
use devgate_gateway::codec::{GoAwayReason, Welcome};
use devgate_gateway::common::Secret;
use devgate_gateway::config::Config;
use devgate_gateway::server::Gateway;

use crate::NatsServer;

/// The fleet secret every test gateway uses.
pub const SECRET: &str = "test-fleet-secret-0123456789";

/// A token valid for `device_id` under [`SECRET`].
pub fn token(device_id: &str) -> String {
    device_token(&Secret::new(SECRET), device_id)
}

/// A gateway config on loopback ports chosen by the OS, with short timeouts for tests.
pub fn config(nats: &NatsServer, instance: &str) -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap_or_else(|_| unreachable!()),
        http_listen: "127.0.0.1:0".parse().unwrap_or_else(|_| unreachable!()),
        nats_url: nats.url(),
        instance_id: Some(instance.to_owned()),
        auth_secret: Some(Secret::new(SECRET)),
        drain_window_ms: 300,
        drain_reconnect_jitter_ms: 100,
        announce_interval_ms: 200,
        claim_timeout_ms: 2_000,
        ..Config::default()
    }
}

/// Starts a gateway with `config` and waits until it is connected to NATS.
pub async fn start_with(config: Config) -> Gateway {
    config
        .validate()
        .unwrap_or_else(|e| panic!("test config invalid: {e}"));
    let gw = Gateway::start(config)
        .await
        .unwrap_or_else(|e| panic!("gateway failed to start: {e}"));
    tokio::time::timeout(Duration::from_secs(10), gw.wait_connected())
        .await
        .unwrap_or_else(|_| panic!("gateway {} never connected to NATS", gw.instance_id()));
    gw
}

/// Starts a gateway named `instance` on `nats`.
pub async fn start(nats: &NatsServer, instance: &str) -> Gateway {
    start_with(config(nats, instance)).await
}

/// Starts a gateway named `instance` on a [`NatsServer::start_tls`] server, trusting the test CA.
pub async fn start_tls(nats: &NatsServer, instance: &str) -> Gateway {
    start_with(Config {
        nats_url: nats.tls_url(),
        nats_tls_ca: Some(crate::nats::tls_fixture("ca.pem")),
        ..config(nats, instance)
    })
    .await
}

/// Logs `device_id` in to `gw` with a valid token.
pub async fn device(gw: &Gateway, device_id: &str) -> (DeviceClient, Welcome) {
    try_device(gw, device_id)
        .await
        .unwrap_or_else(|e| panic!("device {device_id} could not log in: {e}"))
}

/// Logs `device_id` in, returning the gateway's refusal if any.
pub async fn try_device(
    gw: &Gateway,
    device_id: &str,
) -> Result<(DeviceClient, Welcome), ClientError> {
    DeviceClient::connect(gw.device_addr(), device_id, &token(device_id)).await
}

/// Waits until `gw`'s `/metrics` contain `line` (a counter reaching a value); metrics have no
/// event to await, so this polls, with a deadline.
pub async fn metric_reaches(gw: &Gateway, line: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let text = reqwest::get(format!("http://{}/metrics", gw.http_addr()))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text");
        if text.lines().any(|l| l == line) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{line} never appeared in:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A request from `service` to device `id` that `dev` receives as `payload`; returns the
/// gateway's answer, checked to be `sent` (which gateway and session wrote it).
pub async fn request_reaches(
    service: &async_nats::Client,
    dev: &mut DeviceClient,
    id: &str,
    payload: &'static [u8],
) -> devgate_gateway::contract::DeliveryReply {
    let wait = Duration::from_secs(10);
    let reply = tokio::time::timeout(
        wait,
        service.request(format!("device.{id}.down"), Bytes::from_static(payload)),
    )
    .await
    .expect("answered in time")
    .expect("answered");
    let reply: devgate_gateway::contract::DeliveryReply =
        serde_json::from_slice(&reply.payload).expect("delivery reply");
    assert_eq!(
        reply.status,
        devgate_gateway::contract::DeliveryStatus::Sent,
        "{reply:?}"
    );
    let (_, received) = tokio::time::timeout(wait, dev.recv_down())
        .await
        .expect("DOWN in time")
        .expect("DOWN");
    assert_eq!(&received[..], payload);
    reply
}

/// Reads frames until the gateway's GOAWAY; returns the DOWN payloads seen before it.
pub async fn downs_until_goaway(dev: &mut DeviceClient) -> (Vec<Bytes>, GoAwayReason) {
    let mut seen = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), dev.recv_down())
            .await
            .expect("frame in time")
        {
            Ok((_, payload)) => seen.push(payload),
            Err(ClientError::GoAway(g)) => return (seen, g.reason),
            Err(other) => panic!("expected DOWN or GOAWAY, got {other}"),
        }
    }
}

/// The next frame the gateway sends `dev`, whatever it is, within 5 s.
pub async fn next_frame(dev: &mut DeviceClient) -> devgate_gateway::codec::Frame {
    tokio::time::timeout(Duration::from_secs(5), dev.next_frame())
        .await
        .expect("a frame in time")
        .expect("readable")
        .expect("connection open")
}

/// A login kept deciding: a stand-in holder subscribed to the device's down subject never
/// answers, so each claim round waits the gateway's `claim_timeout_ms`.
pub struct HeldLogin {
    /// The login (`DeviceClient::connect`) running in its own task.
    pub login: tokio::task::JoinHandle<Result<(DeviceClient, Welcome), ClientError>>,
    /// The stand-in holder's connection (it sees every message on the down subject).
    pub holder: async_nats::Client,
    claims: async_nats::Subscriber,
}

impl HeldLogin {
    /// Starts a login of `device_id` on `gw` and returns once it has sent `rounds` claims.
    /// With `rounds = 2` the login has subscribed (its second claim is the confirm round)
    /// and waits `claim_timeout_ms` for an answer that never comes.
    pub async fn start(nats: &NatsServer, gw: &Gateway, device_id: &str, rounds: usize) -> Self {
        use futures::StreamExt;
        let holder = nats.client().await;
        let id = devgate_gateway::contract::DeviceId::parse(device_id).expect("device id");
        let mut claims = holder
            .subscribe(devgate_gateway::contract::subjects::down(&id))
            .await
            .expect("subscribe");
        crate::nats::processed(&holder).await;
        let (addr, token) = (gw.device_addr(), token(device_id));
        let device_id = device_id.to_owned();
        let login =
            tokio::spawn(async move { DeviceClient::connect(addr, &device_id, &token).await });
        for round in 0..rounds {
            tokio::time::timeout(Duration::from_secs(5), claims.next())
                .await
                .unwrap_or_else(|_| panic!("claim round {round} in time"))
                .expect("claim");
        }
        HeldLogin {
            login,
            holder,
            claims,
        }
    }

    /// The next claim the login sends (e.g. the confirm round, after the first).
    pub async fn next_claim(&mut self) -> async_nats::Message {
        use futures::StreamExt;
        tokio::time::timeout(Duration::from_secs(5), self.claims.next())
            .await
            .expect("a claim in time")
            .expect("claim")
    }

    /// How the login ended.
    pub async fn outcome(self) -> Result<(DeviceClient, Welcome), ClientError> {
        tokio::time::timeout(Duration::from_secs(10), self.login)
            .await
            .expect("the login ends in time")
            .expect("login task")
    }
}

/// The ERROR the gateway answers on `stream` (skipping a WELCOME before it), checking that it
/// carries a message and that the gateway closes the connection after it: how every refusal
/// must look to a device.
pub async fn read_error(stream: tokio::net::TcpStream) -> devgate_gateway::codec::ErrorBody {
    use devgate_gateway::codec::{ErrorBody, Frame, FrameCodec};
    use futures::StreamExt;
    const WAIT: Duration = Duration::from_secs(5);
    let mut frames = tokio_util::codec::FramedRead::new(stream, FrameCodec::default());
    loop {
        match tokio::time::timeout(WAIT, frames.next())
            .await
            .expect("answer in time")
        {
            Some(Ok(Frame::Error(body))) => {
                let err: ErrorBody = serde_json::from_slice(&body).expect("ERROR body is JSON");
                assert!(!err.message.is_empty(), "ERROR carries a message");
                let rest = tokio::time::timeout(WAIT, frames.next())
                    .await
                    .expect("closed in time");
                assert!(
                    rest.is_none() || matches!(rest, Some(Err(_))),
                    "connection closed after ERROR"
                );
                return err;
            }
            Some(Ok(Frame::Welcome(_))) => continue,
            other => panic!("expected an ERROR frame, got {other:?}"),
        }
    }
}

/// A control request for `op` to device `id` (presence, kick, ...), its answer parsed as `T`;
/// panics unless it is answered within 5 s.
pub async fn control<T: serde::de::DeserializeOwned>(
    service: &async_nats::Client,
    id: &str,
    op: devgate_gateway::contract::subjects::ControlOp,
) -> T {
    use devgate_gateway::contract::{DeviceId, headers, subjects};
    let down = subjects::down(&DeviceId::parse(id).expect("device id"));
    let reply = tokio::time::timeout(
        Duration::from_secs(5),
        service.request_with_headers(down, headers::control(op), Bytes::new()),
    )
    .await
    .expect("answered in time")
    .expect("answered");
    serde_json::from_slice(&reply.payload).expect("json reply")
}
