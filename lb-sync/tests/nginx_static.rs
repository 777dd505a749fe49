//! lb-sync against a real nginx: the rendered configurations are valid nginx, and the static
//! source with the file sink puts both gateways in rotation.

mod common;

use devgate_gateway::common::Validate;
use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use common::{Device, EchoGateway, file_config, http_get, wait_for};
use devgate_lb_sync::config::{Config, SourceKind};
use devgate_lb_sync::endpoints::DesiredSet;
use devgate_lb_sync::render::{RenderSettings, render};
use devgate_tests::nginx::{Nginx, placeholder_stream};
use tokio_util::sync::CancellationToken;

fn validate(nginx: &Nginx) -> std::process::Output {
    let cmd = nginx.validate_cmd();
    let mut argv = cmd.split_whitespace();
    Command::new(argv.next().expect("program"))
        .args(argv)
        .output()
        .expect("run nginx -t")
}

#[test]
fn golden_files_are_valid_nginx() {
    let nginx = Nginx::start(placeholder_stream);
    let golden = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut checked = 0;
    for entry in std::fs::read_dir(&golden).expect("golden dir") {
        let path = entry.expect("entry").path();
        // The TLS goldens name the chart's mount paths; nginx -t reads the files, so point
        // them at the test certificates.
        let text = std::fs::read_to_string(&path).expect("read golden");
        let fixture = |name: &str| devgate_tests::nats::tls_fixture(name).display().to_string();
        let text = text
            .replace("/etc/devgate-device-tls/tls.crt", &fixture("server.pem"))
            .replace("/etc/devgate-device-tls/tls.key", &fixture("server.key"))
            .replace("/etc/devgate-device-ca/ca.crt", &fixture("ca.pem"));
        std::fs::write(nginx.upstream_path(), text).expect("write golden");
        let out = validate(&nginx);
        assert!(
            out.status.success(),
            "{} rejected by nginx -t: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        checked += 1;
    }
    assert!(checked >= 5, "golden files missing");
    // And nginx really refuses an upstream without servers, which is why the placeholder exists.
    std::fs::write(
        nginx.upstream_path(),
        "upstream u { least_conn; }\nserver { listen 127.0.0.1:1; proxy_pass u; }\n",
    )
    .expect("write empty upstream");
    assert!(
        !validate(&nginx).status.success(),
        "nginx accepted an empty upstream"
    );
}

#[test]
fn the_empty_placeholder_refuses_devices_cleanly() {
    let nginx = Nginx::start(|port| {
        let settings = RenderSettings {
            listen: ([127, 0, 0, 1], port).into(),
            ..RenderSettings::default()
        };
        render(&DesiredSet::default(), &settings)
    });
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let device = rt.block_on(Device::connect(nginx.addr()));
    assert_eq!(
        device.gateway, None,
        "nothing can answer behind the placeholder"
    );
}

#[tokio::test]
async fn static_list_puts_both_gateways_in_rotation() {
    let a = EchoGateway::start("a").await;
    let b = EchoGateway::start("b").await;
    let nginx = Nginx::start(placeholder_stream);
    let config = Config {
        source: SourceKind::Static,
        static_endpoints: vec![a.addr.to_string(), b.addr.to_string()],
        ..file_config(&nginx)
    };
    config.validate().expect("valid config");
    let shutdown = CancellationToken::new();
    let lb = devgate_lb_sync::start(config, shutdown.clone())
        .await
        .expect("lb-sync starts");

    let (status, body) = http_get(lb.http_addr(), "/healthz").await;
    assert_eq!(status, 200, "{body}");
    wait_for(Duration::from_secs(10), "readiness", || async {
        (http_get(lb.http_addr(), "/readyz").await.0 == 200).then_some(())
    })
    .await;
    let text = std::fs::read_to_string(nginx.upstream_path()).expect("upstream written");
    assert!(text.contains(&format!("server {} ", a.addr)), "{text}");
    assert!(text.contains(&format!("server {} ", b.addr)), "{text}");

    // Devices held open: least_conn spreads them over both gateways.
    let seen = wait_for(Duration::from_secs(10), "both gateways used", || async {
        let mut devices = Vec::new();
        for _ in 0..4 {
            devices.push(Device::connect(nginx.addr()).await);
        }
        let names: BTreeSet<_> = devices.iter().filter_map(|d| d.gateway.clone()).collect();
        (names.len() == 2).then_some(names)
    })
    .await;
    assert_eq!(seen, BTreeSet::from(["a".to_owned(), "b".to_owned()]));

    let (status, metrics) = http_get(lb.http_addr(), "/metrics").await;
    assert_eq!(status, 200);
    for needle in [
        "devgate_lb_sync_reloads_total 1",
        "devgate_lb_sync_servers_in_rotation 2",
        "devgate_lb_sync_endpoints_seen{state=\"ready\"} 2",
        "devgate_lb_sync_change_to_applied_seconds_count 1",
    ] {
        assert!(metrics.contains(needle), "{needle} missing from\n{metrics}");
    }
    assert_eq!(
        common::settled_reloads(lb.http_addr(), &nginx, 1).await,
        1,
        "one reload for one set: {}",
        nginx.error_log()
    );
    lb.shutdown().await;
}

#[tokio::test]
async fn nginx_refusing_the_render_keeps_the_last_good_file_and_reports() {
    let a = EchoGateway::start("a").await;
    let nginx = Nginx::start(placeholder_stream);
    let before = std::fs::read_to_string(nginx.upstream_path()).expect("initial");
    // An upstream name nginx's own config already uses makes nginx -t fail ("duplicate
    // upstream"), standing in for any render nginx refuses.
    std::fs::write(
        nginx.dir().join("nginx.conf"),
        std::fs::read_to_string(nginx.dir().join("nginx.conf"))
            .expect("conf")
            .replace("stream {", "stream { upstream dup { server 127.0.0.1:2; }"),
    )
    .expect("rewrite conf");
    let config = Config {
        source: SourceKind::Static,
        static_endpoints: vec![a.addr.to_string()],
        upstream_name: "dup".into(),
        ..file_config(&nginx)
    };
    let shutdown = CancellationToken::new();
    let lb = devgate_lb_sync::start(config, shutdown.clone())
        .await
        .expect("lb-sync starts");
    let body = wait_for(Duration::from_secs(10), "validation failure", || async {
        let (status, body) = http_get(lb.http_addr(), "/readyz").await;
        (status == 503 && body.contains("validation failed")).then_some(body)
    })
    .await;
    assert!(body.contains("duplicate upstream"), "{body}");
    let (_, metrics) = http_get(lb.http_addr(), "/metrics").await;
    assert!(
        metrics.contains("devgate_lb_sync_failures_total{stage=\"validate\"}"),
        "{metrics}"
    );
    assert_eq!(
        std::fs::read_to_string(nginx.upstream_path()).expect("file"),
        before,
        "last good file restored"
    );
    assert_eq!(nginx.reloads(), 0, "no reload after a failed validation");
    lb.shutdown().await;
}
