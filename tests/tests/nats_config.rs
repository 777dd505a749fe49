//! The NATS server configurations in `nats/`: the real nats-server accepts each of them, and
//! the accounts in `nats/accounts.conf` grant every devgate role exactly what it needs. The
//! permission tests run a real gateway (and its devices) as the `gateway` user, so a rule the
//! gateway's code needs but the file forgot fails here, not in a cluster.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use async_nats::{Client, ConnectOptions, Event, HeaderMap};
use bytes::Bytes;
use devgate_gateway::client::DeviceClient;
use devgate_gateway::common::Secret;
use devgate_gateway::config::Config;
use devgate_gateway::contract::{
    Announce, DeliveryReply, DeliveryStatus, DeviceId, GatewayStats, PresenceInfo, SessionList,
    headers, subjects,
};
use devgate_gateway::server::Gateway;
use devgate_tests::bins::{tool, workspace_bin, workspace_root};
use devgate_tests::gateway::{SECRET, device, start_with};
use devgate_tests::nats::tls_fixture;
use devgate_tests::nginx::free_port;
use futures::StreamExt;

const WAIT: Duration = Duration::from_secs(5);

/// Every user of `nats/accounts.conf`, its password variable and the password the tests use.
const USERS: &[(&str, &str, &str)] = &[
    (
        "gateway",
        "DEVGATE_NATS_GATEWAY_PASSWORD",
        "gateway-test-pass",
    ),
    (
        "bridge-api",
        "DEVGATE_NATS_BRIDGE_API_PASSWORD",
        "bridge-test-pass",
    ),
    ("lb-sync", "DEVGATE_NATS_LB_SYNC_PASSWORD", "lb-test-pass"),
    (
        "service",
        "DEVGATE_NATS_SERVICE_PASSWORD",
        "service-test-pass",
    ),
    ("sys", "DEVGATE_NATS_SYS_PASSWORD", "sys-test-pass"),
    (
        "gateway-alt",
        "DEVGATE_NATS_GATEWAY_ALT_PASSWORD",
        "gateway-alt-test-pass",
    ),
    (
        "bridge-api-alt",
        "DEVGATE_NATS_BRIDGE_API_ALT_PASSWORD",
        "bridge-alt-test-pass",
    ),
    (
        "lb-sync-alt",
        "DEVGATE_NATS_LB_SYNC_ALT_PASSWORD",
        "lb-alt-test-pass",
    ),
    (
        "service-alt",
        "DEVGATE_NATS_SERVICE_ALT_PASSWORD",
        "service-alt-test-pass",
    ),
];

fn nats_dir() -> PathBuf {
    workspace_root().join("nats")
}

fn nats_server() -> PathBuf {
    tool("nats-server", "NATS_SERVER_BIN")
}

fn password(user: &str) -> &'static str {
    USERS
        .iter()
        .find(|(u, _, _)| *u == user)
        .map(|(_, _, p)| *p)
        .unwrap_or_else(|| panic!("no such user {user}"))
}

/// The environment the cluster config expects from its pod (see `nats/cluster.conf`).
fn cluster_env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("POD_NAME", "devgate-nats-0"),
        (
            "NATS_ROUTES",
            "[nats://route:route-pass@devgate-nats-1.devgate-nats-headless:6222, \
             nats://route:route-pass@devgate-nats-2.devgate-nats-headless:6222]",
        ),
        ("NATS_ROUTE_PASSWORD", "route-pass"),
        ("NATS_JS_MAX_MEMORY", "256MB"),
        ("NATS_JS_MAX_FILE", "9GB"),
    ]
}

/// `nats-server -t -c <conf>` (config check mode) with `env`; `Err` carries its output.
pub fn config_check(conf: &Path, env: &[(&str, &str)]) -> Result<String, String> {
    let out = Command::new(nats_server())
        .arg("-t")
        .arg("-c")
        .arg(conf)
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("running nats-server -t: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

fn user_env() -> Vec<(&'static str, &'static str)> {
    USERS.iter().map(|(_, var, pass)| (*var, *pass)).collect()
}

#[test]
fn every_config_in_nats_dir_passes_the_servers_config_check() {
    let dir = nats_dir();
    config_check(&dir.join("local.conf"), &[]).expect("local.conf (no auth) is valid");
    config_check(&dir.join("local-auth.conf"), &user_env()).expect("local-auth.conf is valid");
    let mut env = user_env();
    env.extend(cluster_env());
    config_check(&dir.join("cluster.conf"), &env).expect("cluster.conf is valid");

    // cluster-tls.conf: the same plus TLS for clients and routes, from files its environment
    // names (the test-only pair and CA).
    let fixture = |name: &str| tls_fixture(name).display().to_string();
    let (cert, key, ca) = (
        fixture("server.pem"),
        fixture("server.key"),
        fixture("ca.pem"),
    );
    let mut tls_env = env.clone();
    tls_env.extend([
        ("NATS_TLS_CERT", cert.as_str()),
        ("NATS_TLS_KEY", key.as_str()),
        ("NATS_TLS_CA", ca.as_str()),
        (
            "NATS_CLUSTER_ADVERTISE",
            "devgate-nats-0.devgate-nats-headless.devgate.svc:6222",
        ),
    ]);
    config_check(&dir.join("cluster-tls.conf"), &tls_env).expect("cluster-tls.conf is valid");
    // A wrong path is reported, not ignored: the server would start without TLS otherwise.
    let missing = "/nonexistent/tls.crt";
    tls_env.retain(|(k, _)| *k != "NATS_TLS_CERT");
    tls_env.push(("NATS_TLS_CERT", missing));
    let err = config_check(&dir.join("cluster-tls.conf"), &tls_env)
        .expect_err("a missing certificate must fail the check");
    assert!(err.contains(missing), "{err}");
}

#[test]
fn a_missing_password_variable_is_refused_by_name() {
    let env: Vec<_> = user_env()
        .into_iter()
        .filter(|(var, _)| *var != "DEVGATE_NATS_SERVICE_PASSWORD")
        .collect();
    let err = config_check(&nats_dir().join("local-auth.conf"), &env)
        .expect_err("a missing password must fail the check");
    assert!(err.contains("DEVGATE_NATS_SERVICE_PASSWORD"), "{err}");
}

#[test]
fn the_cluster_config_needs_its_routes() {
    let mut env = user_env();
    env.extend(
        cluster_env()
            .into_iter()
            .filter(|(k, _)| *k != "NATS_ROUTES"),
    );
    let err = config_check(&nats_dir().join("cluster.conf"), &env)
        .expect_err("no routes must fail the check");
    assert!(err.contains("NATS_ROUTES"), "{err}");
}

/// nats-server running `nats/local-auth.conf` (or the chart's config) on a random loopback
/// port, killed on drop.
struct AuthNats {
    child: Child,
    port: u16,
    /// Holds the relocated copy of the chart's config, when running it; that config serves
    /// TLS only, with the test-only certificate.
    chart_config: Option<tempfile::TempDir>,
    /// The server's log lines, and those read so far, for [`AuthNats::wait_log`].
    logs: std::sync::Mutex<(mpsc::Receiver<String>, Vec<String>)>,
}

impl AuthNats {
    fn start() -> AuthNats {
        Self::start_config(
            &nats_dir().join("local-auth.conf"),
            &["-m", "0"],
            user_env(),
            None,
        )
    }

    /// The chart's TLS config, `nats/cluster-tls.conf` with the files it includes unchanged
    /// except for the pod's absolute paths (JetStream store, pid file), moved into a temporary
    /// directory, and its monitoring port, moved to a random loopback one. One node of a cluster whose route ports are `route_ports`; this node listens
    /// for routes on `route_ports[node]` and advertises it as `localhost:<port>`, a name the
    /// test certificate carries.
    fn start_cluster_tls(node: usize, route_ports: &[u16]) -> AuthNats {
        let dir = tempfile::tempdir().expect("tempdir");
        for file in [
            "cluster-tls.conf",
            "cluster.conf",
            "cluster-routes.conf",
            "common.conf",
            "accounts.conf",
        ] {
            let text = std::fs::read_to_string(nats_dir().join(file)).expect("nats file");
            let moved = text
                .replace(
                    "/data/jetstream",
                    &dir.path().join("js").display().to_string(),
                )
                .replace(
                    "/var/run/nats/nats.pid",
                    &dir.path().join("nats.pid").display().to_string(),
                )
                .replace("http: 0.0.0.0:8222", "http: 127.0.0.1:-1");
            std::fs::write(dir.path().join(file), moved).expect("write config");
        }
        let routes = route_ports
            .iter()
            .map(|p| format!("nats://route:route-pass@localhost:{p}"))
            .collect::<Vec<_>>()
            .join(", ");
        let own = route_ports[node];
        let mut env: Vec<(String, String)> = user_env()
            .into_iter()
            .chain(cluster_env())
            .filter(|(k, _)| !matches!(*k, "NATS_ROUTES" | "POD_NAME"))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let fixture = |name: &str| tls_fixture(name).display().to_string();
        env.extend([
            ("POD_NAME".to_owned(), format!("devgate-nats-{node}")),
            ("NATS_ROUTES".to_owned(), format!("[{routes}]")),
            (
                "NATS_CLUSTER_ADVERTISE".to_owned(),
                format!("localhost:{own}"),
            ),
            ("NATS_TLS_CERT".to_owned(), fixture("server.pem")),
            ("NATS_TLS_KEY".to_owned(), fixture("server.key")),
            ("NATS_TLS_CA".to_owned(), fixture("ca.pem")),
        ]);
        let conf = dir.path().join("cluster-tls.conf");
        let listen = format!("nats://127.0.0.1:{own}");
        Self::start_config(&conf, &["--cluster", &listen], env, Some(dir))
    }

    /// Waits until the server logs a line containing `needle` (or finds one it logged
    /// already), and returns it.
    fn wait_log(&self, needle: &str) -> String {
        self.wait_log_any(&[needle])
    }

    /// The first line, logged so far or next, that contains one of `needles`.
    fn wait_log_any(&self, needles: &[&str]) -> String {
        let mut logs = self.logs.lock().unwrap_or_else(|p| p.into_inner());
        let (lines, seen) = &mut *logs;
        let matches = |line: &str| needles.iter().any(|n| line.contains(n));
        if let Some(line) = seen.iter().find(|l| matches(l)) {
            return line.clone();
        }
        loop {
            match lines.recv_timeout(Duration::from_secs(10)) {
                Ok(line) => {
                    seen.push(line.clone());
                    if matches(&line) {
                        return line;
                    }
                }
                Err(e) => panic!("nats-server never logged any of {needles:?}: {e}"),
            }
        }
    }

    /// Whether the server bound its route port. The ports come from `free_port`, and another
    /// test can take one before nats-server binds it; the server then logs the error and exits.
    fn routes_listening(&self) -> bool {
        self.wait_log_any(&[
            "Listening for route connections on",
            "Error listening on router",
            "address already in use",
        ])
        .contains("Listening for route connections on")
    }

    /// `n` nodes of the chart's TLS cluster config, routed to each other, on fresh route ports
    /// again if one was taken meanwhile.
    fn start_tls_cluster(n: usize) -> Vec<AuthNats> {
        for _ in 0..5 {
            let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
            let nodes: Vec<AuthNats> = (0..n)
                .map(|node| AuthNats::start_cluster_tls(node, &ports))
                .collect();
            if nodes.iter().all(AuthNats::routes_listening) {
                return nodes;
            }
        }
        panic!("no free route ports after 5 tries")
    }

    fn start_config<K, V>(
        conf: &Path,
        args: &[&str],
        env: impl IntoIterator<Item = (K, V)>,
        dir: Option<tempfile::TempDir>,
    ) -> AuthNats
    where
        K: AsRef<std::ffi::OsStr>,
        V: AsRef<std::ffi::OsStr>,
    {
        let mut child = Command::new(nats_server())
            .arg("-c")
            .arg(conf)
            .args(["-a", "127.0.0.1", "-p", "-1"])
            .args(args)
            .env_clear()
            .envs(env)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting nats-server: {e}"));
        let stderr = child.stderr.take().unwrap_or_else(|| unreachable!("piped"));
        let (tx, rx) = mpsc::channel();
        let (log_tx, logs) = mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if !sent
                    && let Some(addr) = line.split("Listening for client connections on ").nth(1)
                {
                    let _ = tx.send(addr.rsplit(':').next().and_then(|p| p.trim().parse().ok()));
                    sent = true;
                }
                // Nobody listening is fine: most tests never read the log.
                let _ = log_tx.send(line);
            }
        });
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Some(port)) => AuthNats {
                child,
                port,
                chart_config: dir,
                logs: std::sync::Mutex::new((logs, Vec::new())),
            },
            other => {
                let _ = child.kill();
                panic!(
                    "nats-server with {} did not start: {other:?}",
                    conf.display()
                )
            }
        }
    }

    fn tls(&self) -> bool {
        self.chart_config.is_some()
    }

    fn url(&self) -> String {
        let scheme = if self.tls() { "tls" } else { "nats" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// Connects as `user`; server errors (permission violations) arrive on the receiver.
    async fn connect(&self, user: &str) -> (Client, tokio::sync::mpsc::Receiver<String>) {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let mut options =
            ConnectOptions::with_user_and_password(user.into(), password(user).into());
        if user.starts_with("gateway") {
            // A gateway's replies come back under its own prefix (it may not read `_INBOX.>`).
            let prefix = subjects::GATEWAY_INBOX_PREFIX.trim_end_matches('.');
            options = options.custom_inbox_prefix(prefix);
        }
        if self.tls() {
            devgate_gateway::bus::tls::ensure_crypto_provider();
            options = options
                .add_root_certificates(tls_fixture("ca.pem"))
                .require_tls(true);
        }
        let client = options
            .event_callback(move |event| {
                let tx = tx.clone();
                async move {
                    if let Event::ServerError(e) = event {
                        // Full: the test already has more errors than it will read.
                        let _ = tx.try_send(e.to_string());
                    }
                }
            })
            .connect(self.url())
            .await
            .unwrap_or_else(|e| panic!("connecting as {user}: {e}"));
        (client, rx)
    }

    /// A real gateway logged in as the `gateway` user.
    async fn gateway(&self, instance: &str) -> Gateway {
        self.gateway_as(instance, "gateway").await
    }

    /// A real gateway logged in as `user`.
    async fn gateway_as(&self, instance: &str, user: &str) -> Gateway {
        start_with(Config {
            listen: "127.0.0.1:0".parse().expect("addr"),
            http_listen: "127.0.0.1:0".parse().expect("addr"),
            nats_url: self.url(),
            nats_tls_ca: self.tls().then(|| tls_fixture("ca.pem")),
            nats_user: Some(user.into()),
            nats_password: Some(Secret::new(password(user))),
            instance_id: Some(instance.to_owned()),
            auth_secret: Some(Secret::new(SECRET)),
            drain_window_ms: 300,
            announce_interval_ms: 200,
            // Far longer than the tests wait for a login, so that claims getting no answer (the
            // gateway unable to subscribe to its own reply inbox) fail the test instead of
            // passing late.
            claim_timeout_ms: 60_000,
            ..Config::default()
        })
        .await
    }
}

impl Drop for AuthNats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits for the server to report a permission violation naming `subject`.
async fn violation(errors: &mut tokio::sync::mpsc::Receiver<String>, kind: &str, subject: &str) {
    let error = tokio::time::timeout(WAIT, errors.recv())
        .await
        .unwrap_or_else(|_| panic!("no permission violation for {kind} {subject}"))
        .unwrap_or_else(|| panic!("connection gone before the violation for {subject}"));
    let lower = error.to_lowercase();
    assert!(
        lower.contains("permissions violation")
            && lower.contains(kind)
            && error.contains(&format!("\"{subject}\"")),
        "expected a {kind} violation for {subject}, got {error}"
    );
}

/// `service` reaches device `id` (a request answered `sent` by its session `session`, and
/// the DOWN delivered), and hears its uplink: an UP asking for an ACK arrives on
/// `device.*.up`, and the device gets its ACK, which the gateway gives only after NATS
/// confirmed the UP under the gateway's permissions. Returns the uplink subscription.
async fn reaches_and_hears(
    service: &Client,
    dev: &mut DeviceClient,
    id_: &str,
    session: &str,
) -> async_nats::Subscriber {
    let reply = service
        .request(subjects::down(&id(id_)), Bytes::from_static(b"hello"))
        .await
        .expect("the holding gateway answers the service");
    let reply: DeliveryReply = serde_json::from_slice(&reply.payload).expect("json reply");
    assert_eq!(reply.status, DeliveryStatus::Sent);
    assert_eq!(reply.session, session);
    let (_, payload) = tokio::time::timeout(WAIT, dev.recv_down())
        .await
        .expect("in time")
        .expect("down");
    assert_eq!(&payload[..], b"hello");

    let mut up = service.subscribe(subjects::ALL_UP).await.expect("sub up");
    devgate_tests::nats::barrier(service, "device.barrier-probe.down").await;
    dev.send_up(7, Bytes::from_static(b"reading"))
        .await
        .expect("send up");
    let msg = tokio::time::timeout(WAIT, up.next())
        .await
        .expect("uplink in time")
        .expect("open");
    assert_eq!(msg.subject.as_str(), format!("device.{id_}.up"));
    assert_eq!(&msg.payload[..], b"reading");
    let acked = tokio::time::timeout(WAIT, dev.recv_ack())
        .await
        .expect("ack in time")
        .expect("ack");
    assert_eq!(acked, 7);
    up
}

fn id(s: &str) -> DeviceId {
    DeviceId::parse(s).expect("valid id")
}

async fn next_json<T: serde::de::DeserializeOwned>(sub: &mut async_nats::Subscriber) -> T {
    let msg = tokio::time::timeout(WAIT, sub.next())
        .await
        .expect("message in time")
        .expect("subscription open");
    serde_json::from_slice(&msg.payload).expect("json body")
}

#[tokio::test]
async fn a_service_reaches_devices_but_cannot_take_their_downlink() {
    let nats = AuthNats::start();
    let gw = nats.gateway("gw-1").await;
    // Within WAIT: with the gateway unable to read its reply inbox, the claims would wait out
    // their (long, see `AuthNats::gateway`) timeout.
    let (mut dev, welcome) = tokio::time::timeout(WAIT, device(&gw, "dev-1"))
        .await
        .expect("the login's claims are answered");
    let (service, mut errors) = nats.connect("service").await;

    // Publish / request on device.*.down, replies on _INBOX.>: the gateway answers; an UP
    // asking for an ACK arrives, and the gateway's confirmation works under its permissions.
    let mut up = reaches_and_hears(&service, &mut dev, "dev-1", &welcome.session).await;

    // A service may not listen on device.*.down: the server refuses the subscription, so it
    // registers no interest and an offline device still means "no responders" at once.
    let _denied = service
        .subscribe("device.nobody.down")
        .await
        .expect("client-side subscribe");
    violation(&mut errors, "subscription", "device.nobody.down").await;
    let err = service
        .request(subjects::down(&id("nobody")), Bytes::from_static(b"x"))
        .await
        .expect_err("nobody holds the device");
    assert_eq!(
        err.kind(),
        async_nats::client::RequestErrorKind::NoResponders,
        "{err}"
    );

    // Nor publish what only gateways publish, nor listen on the barrier subjects.
    for subject in [
        "device.dev-1.up",
        "device.dev-1.presence",
        "devgate.gateway.announce",
        "devgate.barrier.gw-1",
    ] {
        service
            .publish(subject, Bytes::from_static(b"forged"))
            .await
            .expect("client-side publish");
        violation(&mut errors, "publish", subject).await;
    }
    let _denied = service.subscribe("devgate.barrier.>").await.expect("sub");
    violation(&mut errors, "subscription", "devgate.barrier.>").await;

    // The forged UP never reached the uplink subscriber: the next uplink is the device's own.
    dev.send_up(0, Bytes::from_static(b"genuine"))
        .await
        .expect("send up");
    let msg = tokio::time::timeout(WAIT, up.next())
        .await
        .expect("uplink in time")
        .expect("open");
    assert_eq!(&msg.payload[..], b"genuine");
    gw.shutdown().await.expect("gateway stops");
}

#[tokio::test]
async fn the_charts_tls_config_carries_a_device_session_and_a_service_over_tls_only() {
    let nats = AuthNats::start_tls_cluster(1).remove(0);
    // The server says TLS is required, and a client that goes on in plain text gets no PONG.
    {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", nats.port))
            .await
            .expect("tcp");
        let (read, mut write) = stream.into_split();
        let mut lines = tokio::io::BufReader::new(read).lines();
        let info = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("INFO in time")
            .expect("read")
            .expect("INFO line");
        assert!(info.contains("\"tls_required\":true"), "{info}");
        let _ = write
            .write_all(b"CONNECT {\"user\":\"service\",\"pass\":\"service-test-pass\"}\r\nPING\r\n")
            .await;
        let answer = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("answer in time");
        assert!(
            !matches!(&answer, Ok(Some(line)) if line.starts_with("PONG")),
            "a plain-text client must not be served: {answer:?}"
        );
    }

    let gw = nats.gateway("gw-tls").await;
    let (mut dev, welcome) = tokio::time::timeout(WAIT, device(&gw, "dev-1"))
        .await
        .expect("login over a TLS link in time");
    let (service, _) = nats.connect("service").await;
    let reply = service
        .request(
            subjects::down(&id("dev-1")),
            Bytes::from_static(b"over tls"),
        )
        .await
        .expect("the gateway answers over TLS");
    let reply: DeliveryReply = serde_json::from_slice(&reply.payload).expect("json reply");
    assert_eq!(reply.session, welcome.session);
    let (_, payload) = tokio::time::timeout(WAIT, dev.recv_down())
        .await
        .expect("in time")
        .expect("down");
    assert_eq!(&payload[..], b"over tls");
}

#[tokio::test]
async fn the_charts_tls_config_encrypts_and_verifies_the_routes_between_nodes() {
    let nodes = AuthNats::start_tls_cluster(2);
    // The monitoring endpoint says what the routes require.
    let monitor = nodes[0].wait_log("Starting http monitor on ");
    let monitor = monitor
        .rsplit("Starting http monitor on ")
        .next()
        .expect("address")
        .trim();
    let varz: serde_json::Value = reqwest::get(format!("http://{monitor}/varz"))
        .await
        .expect("varz")
        .json()
        .await
        .expect("json");
    assert_eq!(varz["cluster"]["tls_required"], true, "{varz}");
    assert_eq!(varz["cluster"]["tls_verify"], true, "{varz}");
    // Both nodes verify each other's certificate against the CA: each logs the route only
    // once its handshake passed (a node given another CA never does).
    for node in &nodes {
        node.wait_log("Route connection created");
    }
}

#[tokio::test]
async fn bridge_api_can_make_every_call_it_makes() {
    let nats = AuthNats::start();
    let (bridge, mut errors) = nats.connect("bridge-api").await;
    let mut announces = bridge.subscribe(subjects::ANNOUNCE).await.expect("sub");
    let mut presence = bridge
        .subscribe(subjects::ALL_PRESENCE_EVENTS)
        .await
        .expect("sub");
    devgate_tests::nats::barrier(&bridge, "device.barrier-probe.down").await;
    let gw = nats.gateway("gw-1").await;
    let announce: Announce = next_json(&mut announces).await;
    assert_eq!(announce.instance, "gw-1");
    let (_dev, welcome) = device(&gw, "dev-1").await;
    let event: devgate_gateway::contract::PresenceEvent = next_json(&mut presence).await;
    assert_eq!(event.session, welcome.session);

    // The stats scatter, the way bridge-api sends it: its own inbox, then publish with reply.
    let inbox = bridge.new_inbox();
    let mut replies = bridge.subscribe(inbox.clone()).await.expect("sub inbox");
    bridge
        .publish_with_reply(subjects::STATS, inbox, Bytes::new())
        .await
        .expect("publish stats");
    let stats: GatewayStats = next_json(&mut replies).await;
    assert_eq!((stats.instance.as_str(), stats.sessions), ("gw-1", 1));

    let page = bridge
        .request(
            subjects::sessions("gw-1"),
            Bytes::from_static(br#"{"limit":10}"#),
        )
        .await
        .expect("sessions request answered");
    let page: SessionList = serde_json::from_slice(&page.payload).expect("json");
    assert_eq!(page.sessions.len(), 1);

    let info = bridge
        .request_with_headers(
            subjects::down(&id("dev-1")),
            headers::control(subjects::ControlOp::Presence),
            Bytes::new(),
        )
        .await
        .expect("presence answered");
    let info: PresenceInfo = serde_json::from_slice(&info.payload).expect("json");
    assert_eq!(info.gateway, "gw-1");

    let mut ack = HeaderMap::new();
    ack.insert(headers::CONTENT_TYPE, "text/plain");
    let reply = bridge
        .request_with_headers(subjects::down(&id("dev-1")), ack, Bytes::from_static(b"hi"))
        .await
        .expect("delivery answered");
    let reply: DeliveryReply = serde_json::from_slice(&reply.payload).expect("json");
    assert_eq!(reply.status, DeliveryStatus::Sent);

    // And nothing a gateway alone may do.
    let _denied = bridge.subscribe("device.*.down").await.expect("sub");
    violation(&mut errors, "subscription", "device.*.down").await;
    bridge
        .publish("device.dev-1.up", Bytes::from_static(b"forged"))
        .await
        .expect("publish");
    violation(&mut errors, "publish", "device.dev-1.up").await;
    gw.shutdown().await.expect("gateway stops");
}

#[tokio::test]
async fn gateways_hold_downlink_and_answer_each_others_claims() {
    let nats = AuthNats::start();
    // Two raw gateway-user connections stand in for two instances (claims go between them).
    let (holder, mut holder_errors) = nats.connect("gateway").await;
    let (claimant, _) = nats.connect("gateway").await;
    let mut down = holder
        .subscribe("device.dev-9.down")
        .await
        .expect("sub down");
    let mut stats = holder.subscribe(subjects::STATS).await.expect("sub stats");
    let mut sessions = holder
        .subscribe(subjects::sessions("gw-9"))
        .await
        .expect("sub sessions");
    devgate_tests::nats::barrier(&holder, "devgate.barrier.test-holder").await;

    let claim = claimant.request_with_headers(
        subjects::down(&id("dev-9")),
        headers::control(subjects::ControlOp::Claim),
        Bytes::from_static(b"{}"),
    );
    let answer = async {
        let msg = tokio::time::timeout(WAIT, down.next())
            .await
            .expect("claim in time")
            .expect("open");
        let reply = msg.reply.expect("a claim is a request");
        holder
            .publish(reply, Bytes::from_static(b"released"))
            .await
            .expect("reply to claim");
    };
    let (reply, ()) = tokio::join!(claim, answer);
    assert_eq!(&reply.expect("claim answered").payload[..], b"released");

    // The stats scatter and the sessions request reach the instance, and it may answer.
    let (service, _) = nats.connect("service").await;
    for (sub, subject) in [
        (&mut stats, subjects::STATS.to_owned()),
        (&mut sessions, subjects::sessions("gw-9")),
    ] {
        let request = service.request(subject, Bytes::new());
        let answer = async {
            let msg = tokio::time::timeout(WAIT, sub.next())
                .await
                .expect("request in time")
                .expect("open");
            holder
                .publish(msg.reply.expect("request"), Bytes::from_static(b"{}"))
                .await
                .expect("reply");
        };
        let (reply, ()) = tokio::join!(request, answer);
        reply.expect("the gateway's reply reaches the service");
    }

    // Even gateways may not listen on the barrier, on uplink, or to services' replies.
    for subject in ["devgate.barrier.>", "device.*.up", "_INBOX.>"] {
        let _denied = holder.subscribe(subject).await.expect("sub");
        violation(&mut holder_errors, "subscription", subject).await;
    }
}

#[tokio::test]
async fn lb_sync_only_hears_announcements() {
    let nats = AuthNats::start();
    let (lb, mut errors) = nats.connect("lb-sync").await;
    // Announcements repeat every 200 ms, so a subscription that lands late still hears one.
    let mut announces = lb.subscribe(subjects::ANNOUNCE).await.expect("sub");
    let gw = nats.gateway("gw-1").await;
    let announce: Announce = next_json(&mut announces).await;
    assert_eq!(announce.instance, "gw-1");
    let _denied = lb.subscribe(subjects::ALL_UP).await.expect("sub");
    violation(&mut errors, "subscription", "device.*.up").await;
    lb.publish("device.dev-1.down", Bytes::from_static(b"x"))
        .await
        .expect("publish");
    violation(&mut errors, "publish", "device.dev-1.down").await;
    gw.shutdown().await.expect("gateway stops");
}

#[tokio::test]
async fn a_wrong_password_is_refused() {
    let nats = AuthNats::start();
    // Passwords are per user: a twin's is not its role's, nor the other way round.
    for (user, other) in [("service", "service-alt"), ("gateway-alt", "gateway")] {
        let err = ConnectOptions::with_user_and_password(user.into(), password(other).into())
            .connect(nats.url())
            .await
            .expect_err("another user's password must be refused");
        assert!(
            err.to_string().to_lowercase().contains("authorization"),
            "{user}: {err}"
        );
    }
    drop(nats);
    let nats = AuthNats::start();
    let err = ConnectOptions::with_user_and_password("service".into(), "not-the-password".into())
        .connect(nats.url())
        .await
        .expect_err("a wrong password must be refused");
    assert!(
        err.to_string().to_lowercase().contains("authorization"),
        "{err}"
    );
    let err = ConnectOptions::new()
        .connect(nats.url())
        .await
        .expect_err("no credentials must be refused");
    assert!(
        err.to_string().to_lowercase().contains("authorization"),
        "{err}"
    );
}

/// The real `devgate-bridge-api` binary, logged in as the `bridge-api` user; killed on drop.
struct BridgeApi {
    child: Child,
    base: String,
}

impl BridgeApi {
    const TOKEN: &str = "bridge-test-token-0123456789";

    fn start(nats: &AuthNats) -> BridgeApi {
        let mut child = Command::new(workspace_bin("devgate-bridge-api"))
            .env("DEVGATE_LISTEN", "127.0.0.1:0")
            .env("DEVGATE_NATS_URL", nats.url())
            .env("DEVGATE_NATS_USER", "bridge-api")
            .env("DEVGATE_NATS_PASSWORD", password("bridge-api"))
            .env("DEVGATE_API_TOKEN", Self::TOKEN)
            .env("DEVGATE_LOG_FORMAT", "json")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("starting devgate-bridge-api: {e}"));
        let stdout = child.stdout.take().unwrap_or_else(|| unreachable!("piped"));
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let Ok(entry) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                if !sent && entry["message"] == "bridge-api listening" {
                    let _ = tx.send(entry["addr"].as_str().map(str::to_owned));
                    sent = true;
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Some(addr)) => BridgeApi {
                child,
                base: format!("http://{addr}"),
            },
            other => {
                let _ = child.kill();
                panic!("devgate-bridge-api did not report its address: {other:?}")
            }
        }
    }

    async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        let response = reqwest::Client::new()
            .get(format!("{}{path}", self.base))
            .bearer_auth(Self::TOKEN)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let status = response.status().as_u16();
        (status, response.json().await.expect("json body"))
    }
}

impl Drop for BridgeApi {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn the_real_bridge_api_works_under_its_nats_user() {
    let nats = AuthNats::start();
    let gw = nats.gateway("gw-1").await;
    let (mut dev, _) = device(&gw, "dev-1").await;
    let api = BridgeApi::start(&nats);
    // bridge-api trusts the announced instance set after two heartbeats; poll its answer
    // (there is no event to await from outside the process).
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, body) = api.get("/v1/gateways").await;
        if status == 200 && body["count"] == 1 {
            assert_eq!(body["gateways"][0]["instance"], "gw-1", "{body}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "GET /v1/gateways never listed gw-1: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, body) = api.get("/v1/devices/dev-1").await;
    assert_eq!(
        (status, &body["online"]),
        (200, &serde_json::json!(true)),
        "{body}"
    );
    let (status, body) = api.get("/v1/devices?limit=10").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["devices"][0]["device_id"], "dev-1", "{body}");

    let response = reqwest::Client::new()
        .post(format!("{}/v1/devices/dev-1/messages", api.base))
        .bearer_auth(BridgeApi::TOKEN)
        .header("Content-Type", "text/plain")
        .body("over http")
        .send()
        .await
        .expect("POST message");
    assert_eq!(response.status().as_u16(), 200);
    let reply: DeliveryReply = response.json().await.expect("json reply");
    assert_eq!(reply.status, DeliveryStatus::Sent);
    let (_, payload) = tokio::time::timeout(WAIT, dev.recv_down())
        .await
        .expect("in time")
        .expect("down");
    assert_eq!(&payload[..], b"over http");

    // The uplink tail answers only once its subscription is live, proven by a request on
    // `devgate.barrier.bridge-api`; a user not allowed to publish there gets every tail
    // refused with 504 after the timeout.
    let mut tail = reqwest::Client::new()
        .get(format!("{}/v1/devices/dev-1/messages", api.base))
        .bearer_auth(BridgeApi::TOKEN)
        .send()
        .await
        .expect("GET the uplink tail");
    assert_eq!(tail.status().as_u16(), 200, "the tail starts");
    dev.send_up(1, "over tcp").await.expect("up");
    let mut stream = String::new();
    while !stream.contains(r#""payload":"over tcp""#) {
        let chunk = tokio::time::timeout(WAIT, tail.chunk())
            .await
            .unwrap_or_else(|_| panic!("the UP reaches the tail in time; so far: {stream}"))
            .expect("tail readable")
            .unwrap_or_else(|| panic!("the tail ended early: {stream}"));
        stream.push_str(&String::from_utf8_lossy(&chunk));
    }
    gw.shutdown().await.expect("gateway stops");
}

/// Each role's `-alt` twin has the role's permissions under its own password, so clients can
/// move to it while the role's password changes (docs/deploy.md, "Rotating NATS passwords").
#[tokio::test]
async fn each_roles_alt_twin_has_the_roles_permissions() {
    let nats = AuthNats::start();
    // A real gateway under gateway-alt: its logins' claims, downlink and acknowledged uplink
    // work, for a service under service-alt.
    let gw = nats.gateway_as("gw-alt", "gateway-alt").await;
    let (mut dev, welcome) = tokio::time::timeout(WAIT, device(&gw, "dev-alt"))
        .await
        .expect("the login's claims are answered");
    let (service, mut errors) = nats.connect("service-alt").await;
    let _up = reaches_and_hears(&service, &mut dev, "dev-alt", &welcome.session).await;

    // And the role's limits: service-alt may not take downlink, lb-sync-alt may not publish.
    let _denied = service
        .subscribe("device.nobody.down")
        .await
        .expect("client-side subscribe");
    violation(&mut errors, "subscription", "device.nobody.down").await;
    let (lb, mut lb_errors) = nats.connect("lb-sync-alt").await;
    lb.publish("device.dev-alt.down", Bytes::from_static(b"forged"))
        .await
        .expect("client-side publish");
    lb.flush().await.expect("flush");
    violation(&mut lb_errors, "publish", "device.dev-alt.down").await;
    // bridge-api-alt may send its barrier request: "no responders", not a refused publish
    // (which would time out).
    let (bridge, _) = nats.connect("bridge-api-alt").await;
    let err = bridge
        .request("devgate.barrier.bridge-api", Bytes::new())
        .await
        .expect_err("nobody listens on the barrier");
    assert_eq!(
        err.kind(),
        async_nats::RequestErrorKind::NoResponders,
        "{err}"
    );
}

/// What the twins are for: NATS restarting with a new password for a user nobody is on (the
/// rolling restart after `secrets.nats.gatewayPassword` changed) leaves the clients on its twin
/// alone. The gateway reconnects under `gateway-alt`, its device's session carries on, and the
/// old `gateway` password no longer opens anything.
#[tokio::test]
async fn a_gateway_on_the_twin_rides_out_a_restart_that_changes_the_other_password() {
    const NEW: &str = "gateway-new-pass";
    let nats = AuthNats::start();
    let port = nats.port;
    let gw = nats.gateway_as("gw-alt", "gateway-alt").await;
    let (mut dev, welcome) = tokio::time::timeout(WAIT, device(&gw, "dev-r"))
        .await
        .expect("login in time");
    drop(nats);
    let env: Vec<(&str, &str)> = user_env()
        .into_iter()
        .map(|(var, pass)| {
            let pass = if var == "DEVGATE_NATS_GATEWAY_PASSWORD" {
                NEW
            } else {
                pass
            };
            (var, pass)
        })
        .collect();
    let port_arg = port.to_string();
    let nats = AuthNats::start_config(
        &nats_dir().join("local-auth.conf"),
        &["-m", "0", "-p", &port_arg],
        env,
        None,
    );
    let (service, _) = nats.connect("service").await;
    // The gateway reconnects on its own (backoff) and subscribes its sessions again: the
    // device is reachable once a request is answered.
    let reply = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match service
                .request(
                    subjects::down(&id("dev-r")),
                    Bytes::from_static(b"still here"),
                )
                .await
            {
                Ok(reply) => break reply,
                Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
                    // Not resubscribed yet: wait for the next presence of interest.
                    tokio::task::yield_now().await;
                    let _ = service.flush().await;
                }
                Err(e) => panic!("request failed: {e}"),
            }
        }
    })
    .await
    .expect("the gateway came back under gateway-alt");
    let reply: DeliveryReply = serde_json::from_slice(&reply.payload).expect("json reply");
    assert_eq!(reply.status, DeliveryStatus::Sent);
    assert_eq!(reply.session, welcome.session, "the same session");
    let (_, payload) = tokio::time::timeout(WAIT, dev.recv_down())
        .await
        .expect("in time")
        .expect("down");
    assert_eq!(&payload[..], b"still here");
    // The changed user: the old password is refused, the new one accepted.
    let old = ConnectOptions::with_user_and_password("gateway".into(), password("gateway").into())
        .connect(nats.url())
        .await;
    assert!(old.is_err(), "the old gateway password still works");
    ConnectOptions::with_user_and_password("gateway".into(), NEW.into())
        .custom_inbox_prefix(subjects::GATEWAY_INBOX_PREFIX.trim_end_matches('.'))
        .connect(nats.url())
        .await
        .expect("the new gateway password works");
}
