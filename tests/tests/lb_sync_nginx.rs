//! End to end: real gateways announce themselves on NATS, the `devgate-lb-sync` binary (NATS
//! source, file sink) keeps a real nginx's stream upstream equal to the ready ones, and devices
//! connect through nginx with the PROXY protocol on.
//!
//! Needs the workspace binaries (`cargo test --workspace` builds them).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use devgate_gateway::client::DeviceClient;
use devgate_gateway::server::Gateway;
use devgate_tests::NatsServer;
use devgate_tests::bins::workspace_bin;
use devgate_tests::gateway::{config, start_with, token};
use devgate_tests::nginx::{Nginx, free_port, placeholder_stream};

/// The lb-sync binary, killed on drop.
struct LbSync {
    child: Child,
    ops: SocketAddr,
}

impl LbSync {
    /// lb-sync for plaintext devices.
    fn start(nats: &NatsServer, nginx: &Nginx) -> LbSync {
        Self::start_with(nats, nginx, "--insecure-plaintext")
    }

    /// lb-sync with `device_tls` saying where device TLS ends (`--insecure-plaintext`: nowhere;
    /// `--tls-passthrough`: at the gateways).
    fn start_with(nats: &NatsServer, nginx: &Nginx, device_tls: &str) -> LbSync {
        let ops = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let child = Command::new(workspace_bin("devgate-lb-sync"))
            .args([
                "--source",
                "nats",
                "--nats-url",
                &nats.url(),
                "--sink",
                "file",
            ])
            .arg("--output")
            .arg(nginx.upstream_path())
            .args(["--validate-cmd", &nginx.validate_cmd()])
            .args(["--reload-cmd", &nginx.reload_cmd()])
            .args(["--listen", &nginx.addr().to_string()])
            .args(["--http-listen", &ops.to_string()])
            .arg("--proxy-protocol")
            .arg(device_tls)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting devgate-lb-sync: {e}"));
        LbSync { child, ops }
    }

    async fn metric(&self, name: &str) -> Option<f64> {
        let body = reqwest::get(format!("http://{}/metrics", self.ops))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }
}

impl Drop for LbSync {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn gateway(nats: &NatsServer, instance: &str) -> Gateway {
    let mut c = config(nats, instance);
    c.proxy_protocol = true;
    start_with(c).await
}

/// Logs a device in through nginx; `None` when nginx has no gateway for it yet.
async fn device(nginx: &Nginx, id: &str) -> Option<(DeviceClient, String)> {
    let token = token(id);
    let login = DeviceClient::connect(nginx.addr(), id, &token);
    match tokio::time::timeout(Duration::from_secs(5), login).await {
        Ok(Ok((client, welcome))) => Some((client, welcome.gateway)),
        _ => None,
    }
}

async fn wait_for<T, Fut: std::future::Future<Output = Option<T>>>(
    what: &str,
    mut check: impl FnMut() -> Fut,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until lb-sync has reloaded at least `min` times and nginx has finished as many.
async fn settled(lb: &LbSync, nginx: &Nginx, min: usize) -> usize {
    wait_for("nginx to finish lb-sync's reloads", || async {
        let ran = lb.metric("devgate_lb_sync_reloads_total").await? as usize;
        (ran >= min && nginx.reloads() == ran).then_some(ran)
    })
    .await
}

fn upstream(nginx: &Nginx) -> String {
    std::fs::read_to_string(nginx.upstream_path()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_follows_real_gateways() {
    devgate_tests::init_logs();
    let nats = NatsServer::start();
    let nginx = Nginx::start(placeholder_stream);
    let gw1 = gateway(&nats, "gw-1").await;
    let gw2 = gateway(&nats, "gw-2").await;
    let lb = LbSync::start(&nats, &nginx);

    // Devices through nginx reach both gateways (held open, so least_conn alternates).
    let mut held = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    for n in 0.. {
        if let Some(d) = device(&nginx, &format!("dev-{n}")).await {
            held.push(d);
        }
        let used: BTreeSet<_> = held.iter().map(|(_, g)| g.clone()).collect();
        if used.len() == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "both gateways never got devices: {used:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reloads = settled(&lb, &nginx, 1).await;
    let (mut old_device, old_gateway) = device(&nginx, "dev-old").await.expect("device logs in");

    // A third gateway: how long until nginx gives it a device?
    let started = Instant::now();
    let gw3 = gateway(&nats, "gw-3").await;
    for k in 0.. {
        if device(&nginx, &format!("probe-{k}"))
            .await
            .is_some_and(|(_, g)| g == "gw-3")
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "gw-3 never got a device"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "lb-sync e2e: gw-3 got its first device {} ms after it started",
        started.elapsed().as_millis()
    );
    settled(&lb, &nginx, reloads + 1).await;

    // The device connected before the reload still exchanges messages on its gateway.
    old_device
        .send_up(7, Bytes::from_static(b"after-reload"))
        .await
        .expect("send after reload");
    let acked = tokio::time::timeout(Duration::from_secs(5), old_device.recv_ack())
        .await
        .expect("ack in time")
        .expect("ack");
    assert_eq!(
        acked, 7,
        "uplink acknowledged by {old_gateway} after the reload"
    );

    // gw-1 shuts down: it leaves the rotation and new devices only reach gw-2 and gw-3.
    let gw1_addr = gw1.device_addr();
    gw1.shutdown().await.expect("gw-1 shuts down");
    wait_for("gw-1 out of the upstream", || async {
        (!upstream(&nginx).contains(&format!("server {gw1_addr} "))).then_some(())
    })
    .await;
    let total = lb
        .metric("devgate_lb_sync_reloads_total")
        .await
        .expect("metric") as usize;
    settled(&lb, &nginx, total).await;
    for i in 0..6 {
        let (_, g) = device(&nginx, &format!("after-{i}"))
            .await
            .expect("device logs in");
        assert_ne!(g, "gw-1", "a device reached the stopped gateway");
    }
    gw2.shutdown().await.expect("gw-2 shuts down");
    gw3.shutdown().await.expect("gw-3 shuts down");
}

/// TLS ending at the gateways, through nginx as lb-sync renders it with `--tls-passthrough`:
/// nginx sends the PROXY header and forwards the device's TLS untouched, the gateway reads the
/// header, terminates TLS and binds the client certificate to the device id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_reach_gateways_that_terminate_tls_through_nginx() {
    use devgate_gateway::bus::tls::TlsFiles;
    use devgate_gateway::client::{ClientError, DeviceTls};
    use devgate_gateway::codec::{ErrorCode, Hello};
    use devgate_gateway::contract::PresenceInfo;
    use devgate_gateway::contract::subjects::ControlOp;
    use devgate_tests::nats::tls_fixture;

    let nats = NatsServer::start();
    let nginx = Nginx::start(placeholder_stream);
    let mut c = config(&nats, "gw-tls");
    c.proxy_protocol = true;
    c.proxy_trusted_cidrs = vec!["127.0.0.0/8".parse().expect("cidr")];
    c.device_tls_cert = Some(tls_fixture("server.pem"));
    c.device_tls_key = Some(tls_fixture("server.key"));
    c.device_tls_client_ca = Some(tls_fixture("ca.pem"));
    let gw = start_with(c).await;
    let lb = LbSync::start_with(&nats, &nginx, "--tls-passthrough");
    settled(&lb, &nginx, 1).await;
    assert!(
        upstream(&nginx).contains("passes through to the gateways")
            && !upstream(&nginx).contains(" ssl;"),
        "{}",
        upstream(&nginx)
    );

    let tls = DeviceTls::new(
        &TlsFiles {
            ca: Some(tls_fixture("ca.pem")),
            client: Some((tls_fixture("device.pem"), tls_fixture("device.key"))),
        },
        "localhost",
    )
    .expect("device TLS");
    let login = |id: &'static str| {
        let tls = tls.clone();
        let addr = nginx.addr();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let local = tcp.local_addr().expect("local address");
            let hello = Hello {
                device_id: id.into(),
                token: token(id),
                metadata: Default::default(),
            };
            let io = tls.wrap(tcp).await?;
            let login = DeviceClient::login_over(io, &hello);
            let (client, _) = tokio::time::timeout(Duration::from_secs(5), login)
                .await
                .expect("answered in time")?;
            Ok::<_, ClientError>((client, local))
        }
    };
    // device.pem names dev-1: it logs in as dev-1, through nginx, with its own address.
    let (_dev, local) = login("dev-1").await.expect("dev-1 logs in through nginx");
    let service = nats.client().await;
    let info: PresenceInfo =
        devgate_tests::gateway::control(&service, "dev-1", ControlOp::Presence).await;
    assert_eq!(info.remote_addr, local.to_string());
    assert_eq!(info.gateway, "gw-tls");
    // The same certificate with another id's valid token is refused by the gateway.
    match login("dev-2").await {
        Err(ClientError::Refused(e)) => assert_eq!(e.code, ErrorCode::Unauthorized),
        other => panic!("expected unauthorized, got {:?}", other.map(|(_, a)| a)),
    }
    gw.shutdown().await.expect("gateway shuts down");
}
