//! TLS for devices, terminated by a real nginx that lb-sync configures: a real gateway behind
//! it (PROXY protocol on) and a real nats-server. Devices log in over TLS and receive what a
//! service sends; plaintext, an untrusted server certificate and (with a client CA) a missing
//! or unvouched device certificate are refused without disturbing the devices already in; a
//! renewed certificate is served after lb-sync notices the new files. Fixtures:
//! `tests/fixtures/tls/`.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{file_config, http_get, wait_for};
use devgate_gateway::bus::tls::TlsFiles;
use devgate_gateway::client::{ClientError, DeviceClient, DeviceTls};
use devgate_gateway::common::Validate;
use devgate_gateway::server::Gateway;
use devgate_lb_sync::LbSync;
use devgate_lb_sync::config::{Config, SourceKind};
use devgate_tests::NatsServer;
use devgate_tests::gateway::{config as gateway_config, start_with, token};
use devgate_tests::nats::tls_fixture;
use devgate_tests::nginx::{Nginx, placeholder_stream};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(10);

/// NATS, one gateway expecting the PROXY protocol, nginx, and lb-sync terminating TLS with
/// `cert`/`key` (and, for mutual TLS, a client CA and verify depth) in front of the gateway.
struct Stack {
    nats: NatsServer,
    _gateway: Gateway,
    nginx: Nginx,
    lb: LbSync,
}

impl Stack {
    /// The usual case: the test server certificate, no client CA.
    async fn start_with_server_certificate() -> Stack {
        let (cert, key) = (tls_fixture("server.pem"), tls_fixture("server.key"));
        Stack::start(&cert, &key, None, 10).await
    }

    /// Mutual TLS: the test server certificate, devices vouched for by the test CA, and
    /// `ssl_verify_depth` set to `depth`.
    async fn start_mutual(depth: u32) -> Stack {
        let (cert, key) = (tls_fixture("server.pem"), tls_fixture("server.key"));
        Stack::start(&cert, &key, Some((&tls_fixture("ca.pem"), depth)), 10).await
    }

    async fn start(
        cert: &Path,
        key: &Path,
        client_ca: Option<(&Path, u32)>,
        check_s: u64,
    ) -> Stack {
        let nats = NatsServer::start();
        let mut gw = gateway_config(&nats, "gw-tls");
        gw.proxy_protocol = true;
        let gateway = start_with(gw).await;
        let nginx = Nginx::start(placeholder_stream);
        let config = Config {
            source: SourceKind::Static,
            static_endpoints: vec![gateway.device_addr().to_string()],
            proxy_protocol: true,
            tls_cert: Some(cert.to_owned()),
            tls_key: Some(key.to_owned()),
            tls_client_ca: client_ca.map(|(ca, _)| ca.to_owned()),
            tls_verify_depth: client_ca.map_or(3, |(_, depth)| depth),
            tls_check_interval_s: check_s,
            insecure_plaintext: false,
            ..file_config(&nginx)
        };
        config.validate().expect("valid config");
        let lb = devgate_lb_sync::start(config, CancellationToken::new())
            .await
            .expect("lb-sync starts");
        wait_for(WAIT, "lb-sync ready", || async {
            (http_get(lb.http_addr(), "/readyz").await.0 == 200).then_some(())
        })
        .await;
        // Until the reload completes, old workers may still accept with the placeholder.
        wait_for(WAIT, "nginx reloaded with TLS", || async {
            (nginx.reloads() >= 1).then_some(())
        })
        .await;
        Stack {
            nats,
            _gateway: gateway,
            nginx,
            lb,
        }
    }

    /// Logs `id` in through nginx over TLS (as a device trusting `ca`, with `client` if given).
    async fn login(
        &self,
        id: &str,
        ca: &str,
        client: Option<(&str, &str)>,
    ) -> Result<DeviceClient, ClientError> {
        let tls = device_tls(ca, client);
        let token = token(id);
        let login = DeviceClient::connect_over(self.nginx.addr(), Some(&tls), id, &token);
        let (device, welcome) = tokio::time::timeout(WAIT, login)
            .await
            .unwrap_or_else(|_| panic!("login of {id} neither succeeded nor failed"))?;
        assert_eq!(welcome.gateway, "gw-tls");
        Ok(device)
    }

    /// A service sends `text` to `id` and the device must receive exactly that.
    async fn round_trip(&self, device: &mut DeviceClient, id: &str, text: &'static str) {
        let service = self.nats.client().await;
        let reply = service
            .request(
                format!("device.{id}.down"),
                Bytes::from_static(text.as_bytes()),
            )
            .await
            .expect("the gateway answers for the device");
        assert!(
            String::from_utf8_lossy(&reply.payload).contains("\"sent\""),
            "{reply:?}"
        );
        let (_, payload) = tokio::time::timeout(WAIT, device.recv_down())
            .await
            .expect("DOWN in time")
            .expect("DOWN");
        assert_eq!(payload, text.as_bytes());
    }
}

fn device_tls(ca: &str, client: Option<(&str, &str)>) -> DeviceTls {
    let files = TlsFiles {
        ca: Some(tls_fixture(ca)),
        client: client.map(|(cert, key)| (tls_fixture(cert), tls_fixture(key))),
    };
    DeviceTls::new(&files, "localhost").expect("device TLS settings")
}

/// nginx refused the device's certificate. TLS 1.3 finishes the client's side of the handshake
/// before the server checks the client's certificate, so the refusal arrives as nginx's alert
/// (or its close) on the first read.
fn assert_client_certificate_refused(case: &str, error: &str) {
    assert!(
        error.to_lowercase().contains("alert") || error.contains("closed"),
        "{case}: {error}"
    );
}

/// A login that must fail, and the error it failed with.
async fn refused(stack: &Stack, id: &str, ca: &str, client: Option<(&str, &str)>) -> String {
    match stack.login(id, ca, client).await {
        Ok(_) => panic!("{id} logged in but must be refused"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test]
async fn devices_log_in_over_tls_and_plaintext_or_an_untrusted_certificate_gets_nowhere() {
    let stack = Stack::start_with_server_certificate().await;
    let rendered = std::fs::read_to_string(stack.nginx.upstream_path()).expect("render");
    assert!(rendered.contains(" ssl;"), "{rendered}");
    assert!(!rendered.contains("ssl_verify_client"), "{rendered}");

    let mut bystander = stack
        .login("dev-1", "ca.pem", None)
        .await
        .expect("TLS login");
    stack.round_trip(&mut bystander, "dev-1", "over tls").await;

    // A device speaking plaintext to the TLS port: nginx reads its HELLO as a broken TLS
    // record and closes; no WELCOME, and the gateway never hears of it.
    let plain_token = token("dev-2");
    let plain = DeviceClient::connect(stack.nginx.addr(), "dev-2", &plain_token);
    match tokio::time::timeout(WAIT, plain)
        .await
        .expect("answer in time")
    {
        Ok(_) => panic!("a plaintext login got through the TLS listener"),
        Err(e) => assert!(
            matches!(e, ClientError::Closed | ClientError::Codec(_)),
            "{e}"
        ),
    }
    // A device that does not trust the certificate nginx shows stops in the handshake.
    let error = refused(&stack, "dev-3", "other-ca.pem", None).await;
    assert!(
        error.contains("TLS handshake") && error.contains("UnknownIssuer"),
        "{error}"
    );

    stack
        .round_trip(&mut bystander, "dev-1", "still here")
        .await;
}

#[tokio::test]
async fn with_a_client_ca_only_devices_with_a_certificate_from_it_get_in() {
    let stack = Stack::start_mutual(3).await;
    let rendered = std::fs::read_to_string(stack.nginx.upstream_path()).expect("render");
    assert!(rendered.contains("ssl_verify_client on;"), "{rendered}");

    let device_cert = Some(("device.pem", "device.key"));
    let mut admitted = stack
        .login("dev-1", "ca.pem", device_cert)
        .await
        .expect("a device with a certificate from the CA");
    stack.round_trip(&mut admitted, "dev-1", "mutual").await;

    let without = refused(&stack, "dev-2", "ca.pem", None).await;
    let untrusted = refused(
        &stack,
        "dev-3",
        "ca.pem",
        Some(("untrusted-device.pem", "untrusted-device.key")),
    )
    .await;
    for (case, error) in [("no certificate", &without), ("unvouched", &untrusted)] {
        assert_client_certificate_refused(case, error);
    }
    stack.round_trip(&mut admitted, "dev-1", "unaffected").await;
}

/// With mutual TLS, a device certificate two CAs below the trusted one (an issuing CA under an
/// intermediate; the device sends both along) passes at lb-sync's default `ssl_verify_depth`
/// (3), and is refused at nginx's own default (1): the setting is what makes such fleets work.
#[tokio::test]
async fn device_certificates_from_a_deeper_pki_pass_at_the_default_verify_depth() {
    let chained = Some(("device-chained.pem", "device-chained.key"));
    let stack = Stack::start_mutual(3).await;
    let mut device = stack
        .login("dev-2", "ca.pem", chained)
        .await
        .expect("a certificate two CAs below the trusted one");
    stack
        .round_trip(&mut device, "dev-2", "via intermediate")
        .await;

    let shallow = Stack::start_mutual(1).await;
    let error = refused(&shallow, "dev-2", "ca.pem", chained).await;
    assert_client_certificate_refused("depth 1", &error);
    // The same stack admits a certificate issued by the trusted CA itself: what refused the
    // chained one was its depth, not the stack.
    let mut direct = shallow
        .login("dev-1", "ca.pem", Some(("device.pem", "device.key")))
        .await
        .expect("a certificate from the trusted CA at depth 1");
    shallow.round_trip(&mut direct, "dev-1", "direct").await;
}

/// The DER certificate nginx presents to a new connection.
async fn served_certificate(nginx: &Nginx) -> Vec<u8> {
    let files = TlsFiles {
        ca: Some(tls_fixture("ca.pem")),
        client: None,
    };
    let config = devgate_gateway::bus::tls::client_config_named(&files, "tls").expect("config");
    let connector = tokio_rustls::TlsConnector::from(Arc::clone(&config));
    let tcp = tokio::net::TcpStream::connect(nginx.addr())
        .await
        .expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let tls = connector.connect(name, tcp).await.expect("handshake");
    let (_, session) = tls.get_ref();
    session
        .peer_certificates()
        .and_then(|chain| chain.first())
        .expect("a certificate")
        .to_vec()
}

fn pem_to_der(path: &Path) -> Vec<u8> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_file(path).expect("PEM").to_vec()
}

/// Replaces `dest` the way the kubelet updates a mounted Secret: whole, never half-written.
fn replace(src: &Path, dest: &Path) {
    let tmp = dest.with_extension("new");
    std::fs::copy(src, &tmp).expect("copy");
    std::fs::rename(&tmp, dest).expect("rename");
}

#[tokio::test]
async fn a_renewed_certificate_is_served_after_lb_sync_notices_the_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key): (PathBuf, PathBuf) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    replace(&tls_fixture("server.pem"), &cert);
    replace(&tls_fixture("server.key"), &key);
    let stack = Stack::start(&cert, &key, None, 1).await;
    assert_eq!(
        served_certificate(&stack.nginx).await,
        pem_to_der(&tls_fixture("server.pem"))
    );
    let mut connected = stack.login("dev-1", "ca.pem", None).await.expect("login");

    replace(&tls_fixture("server-rotated.key"), &key);
    replace(&tls_fixture("server-rotated.pem"), &cert);
    let renewed = pem_to_der(&tls_fixture("server-rotated.pem"));
    // After the reload, new connections reach the new workers, which present the new files,
    // and the rendered text names the renewed files' hash.
    let fingerprint = devgate_lb_sync::tls::fingerprint(&[&cert, &key]).expect("fingerprint");
    wait_for(WAIT, "the renewed certificate served", || async {
        let rendered = std::fs::read_to_string(stack.nginx.upstream_path()).ok()?;
        (rendered.contains(&fingerprint) && served_certificate(&stack.nginx).await == renewed)
            .then_some(())
    })
    .await;

    // The device connected before the renewal keeps its session through the reload.
    stack
        .round_trip(&mut connected, "dev-1", "after renewal")
        .await;
    let (_, metrics) = http_get(stack.lb.http_addr(), "/metrics").await;
    assert!(
        metrics.contains("devgate_lb_sync_failures_total{stage=\"tls_files\"} 0\n"),
        "no read failures: {metrics}"
    );
}

/// Runs `devsim` (the binary users debug with) as one device through the stack's nginx.
fn devsim(stack: &Stack, id: &str, tls_args: &[&str]) -> tokio::process::Child {
    tokio::process::Command::new(devgate_tests::bins::workspace_bin("devsim"))
        .args(["--gateway", &stack.nginx.addr().to_string()])
        .args(["--id-prefix", id, "--devices", "1", "--no-reconnect"])
        .args([
            "--send",
            "hello over tls",
            "--count",
            "1",
            "--duration-s",
            "5",
        ])
        .args(tls_args)
        .env("DEVGATE_AUTH_SECRET", devgate_tests::gateway::SECRET)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn devsim")
}

#[tokio::test]
async fn devsim_dials_tls_with_the_ca_and_says_why_when_it_cannot() {
    use futures::StreamExt;
    let stack = Stack::start_with_server_certificate().await;
    let service = stack.nats.client().await;
    let mut ups = service.subscribe("device.*.up").await.expect("subscribe");
    devgate_tests::nats::processed(&service).await;

    let ca = tls_fixture("ca.pem").display().to_string();
    let _sim = devsim(
        &stack,
        "sim-",
        &["--tls-ca", &ca, "--tls-server-name", "localhost"],
    );
    let up = tokio::time::timeout(WAIT, ups.next())
        .await
        .expect("devsim's UP in time")
        .expect("message");
    assert_eq!(up.subject.as_str(), "device.sim-1.up");
    assert_eq!(&up.payload[..], b"hello over tls");

    let other = tls_fixture("other-ca.pem").display().to_string();
    let refused = devsim(&stack, "lost-", &["--tls-ca", &other])
        .wait_with_output()
        .await
        .expect("devsim exits");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(
        stderr.contains("TLS handshake") && stderr.contains("UnknownIssuer"),
        "{stderr}"
    );
}

/// The load tool's devices (`devgate-bench devices --tls-ca`, used by `.ci/bench-nginx`) over
/// TLS: they log in through nginx, and with a CA that does not vouch for nginx they fail with
/// the reason.
#[tokio::test]
async fn the_load_tool_logs_devices_in_over_tls() {
    use devgate_gateway::bench::fleet::{Command, Fleet, FleetConfig, FleetTls, Protocol, Reply};
    let stack = Stack::start_with_server_certificate().await;
    let fleet = |prefix: &str, ca: &str| {
        Fleet::new(FleetConfig {
            protocol: Protocol::Devgate,
            addr: stack.nginx.addr(),
            source_ip: None,
            id_prefix: prefix.into(),
            first: 1,
            auth_secret: Some(devgate_gateway::common::Secret::new(
                devgate_tests::gateway::SECRET,
            )),
            connect_concurrency: 8,
            ping_s: 15,
            tls: Some(FleetTls {
                ca: tls_fixture(ca),
                server_name: "localhost".into(),
                resume: false,
            }),
        })
    };
    let mut trusted = fleet("load-", "ca.pem");
    match trusted.handle(Command::Connect { n: 20 }).await {
        Reply::Connected { ok, failed, .. } => assert_eq!((ok, failed), (20, 0)),
        other => panic!("{other:?}"),
    }
    let mut untrusting = fleet("lost-", "other-ca.pem");
    match untrusting.handle(Command::Connect { n: 2 }).await {
        Reply::Connected {
            ok, first_error, ..
        } => {
            assert_eq!(ok, 0);
            let error = first_error.unwrap_or_default();
            assert!(error.contains("UnknownIssuer"), "{error}");
        }
        other => panic!("{other:?}"),
    }
    let _ = trusted.handle(Command::Disconnect).await;
}
