//! lb-sync against a real nginx: the rendered configurations are valid nginx, and the static
//! source with the file sink puts both gateways in rotation.

mod common;

use devgate_gateway::common::Validate;
use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use common::{Device, EchoGateway, file_config, http_get, wait_for};
use devgate_lb_sync::config::{Config, SourceKind};
use devgate_lb_sync::endpoints::{DesiredSet, Endpoint, EndpointState};
use devgate_lb_sync::render::{RenderSettings, nginx_size, render, zone_exhausted, zone_size};
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

/// `n` ready servers: IPv4 addresses, or IPv6 addresses of the greatest text length (the
/// `server` text is the one per-server allocation in the zone that grows with the address).
fn servers(n: usize, v6: bool) -> DesiredSet {
    let eps: Vec<_> = (0..n)
        .map(|i| {
            let i = u32::try_from(i)
                .ok()
                .filter(|i| *i < 1 << 16)
                .expect("few servers");
            let addr: std::net::SocketAddr = if v6 {
                let ip = std::net::Ipv6Addr::new(
                    0xfd00,
                    0xffff,
                    0xffff,
                    0xffff,
                    0xffff,
                    0xffff,
                    0xf000 | (i >> 12) as u16,
                    0xf000 | (i & 0x0fff) as u16,
                );
                (ip, 65535).into()
            } else {
                (std::net::Ipv4Addr::from(0x0a00_0000 | i), 7000).into()
            };
            Endpoint {
                addr,
                state: EndpointState::Ready,
                weight: Some(100),
            }
        })
        .collect();
    DesiredSet::from_endpoints(&eps)
}

/// The zone lb-sync renders holds every set size nginx will see: a fixed 64k held 64 servers
/// at most, so 65 or more failed `nginx -t` forever and froze the upstream.
#[test]
fn the_upstream_zone_holds_hundreds_and_thousands_of_servers() {
    let nginx = Nginx::start(placeholder_stream);
    let settings = RenderSettings::default();
    for n in [1, 16, 17, 64, 65, 500, 2000, 5000] {
        for v6 in [false, true] {
            let set = servers(n, v6);
            assert_eq!(set.len(), n);
            let text = render(&set, &settings);
            let zone = nginx_size(zone_size(n, settings.zone_min_bytes));
            assert!(text.contains(&format!(" {zone};\n")), "{n}: zone {zone}");
            std::fs::write(nginx.upstream_path(), &text).expect("write render");
            let out = validate(&nginx);
            assert!(
                out.status.success(),
                "{n} servers (IPv6: {v6}) in zone {zone} rejected by nginx -t: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    // The old fixed zone: nginx refuses 500 servers, and lb-sync recognises why.
    let text = render(&servers(500, false), &settings);
    let old = text.replace(" zone devgate_gateways 2m;", " zone devgate_gateways 64k;");
    assert_ne!(old, text, "the render sized its zone at 2m");
    std::fs::write(nginx.upstream_path(), old).expect("write 64k render");
    let out = validate(&nginx);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "64k held 500 servers?");
    assert!(zone_exhausted(&stderr), "not recognised: {stderr}");
}

#[tokio::test]
async fn a_static_list_of_500_gateways_is_applied() {
    let nginx = Nginx::start(placeholder_stream);
    let config = Config {
        source: SourceKind::Static,
        static_endpoints: servers(500, false)
            .servers()
            .map(|(addr, _)| addr.to_string())
            .collect(),
        ..file_config(&nginx)
    };
    config.validate().expect("valid config");
    let lb = devgate_lb_sync::start(config, CancellationToken::new())
        .await
        .expect("lb-sync starts");
    wait_for(Duration::from_secs(10), "readiness", || async {
        let (status, body) = http_get(lb.http_addr(), "/readyz").await;
        assert!(!body.contains("failed"), "{body}");
        (status == 200).then_some(())
    })
    .await;
    let text = std::fs::read_to_string(nginx.upstream_path()).expect("upstream written");
    assert!(text.contains("    zone devgate_gateways 2m;\n"), "{text}");
    assert_eq!(text.matches("    server 10.").count(), 500);
    let (_, metrics) = http_get(lb.http_addr(), "/metrics").await;
    assert!(
        metrics.contains("devgate_lb_sync_servers_in_rotation 500"),
        "{metrics}"
    );
    assert_eq!(common::settled_reloads(lb.http_addr(), &nginx, 1).await, 1);
    lb.shutdown().await;
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
        metrics.lines().any(|l| {
            l.starts_with("devgate_lb_sync_failures_total{stage=\"validate\"}")
                && !l.ends_with(" 0")
        }),
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
