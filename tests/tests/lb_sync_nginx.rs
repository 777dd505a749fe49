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
    fn start(nats: &NatsServer, nginx: &Nginx) -> LbSync {
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
            .arg("--insecure-plaintext")
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
