//! A real `nats-server` child process on a random loopback port.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::bins::tool;

/// A running nats-server, killed on drop. Like the nats.rs `nats-server` test crate, but it
/// reads the bound port back from the server instead of guessing a free one.
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    /// Where it listens for routes from other cluster nodes ([`NatsServer::start_clustered`]).
    route_port: Option<u16>,
    config: Option<PathBuf>,
    /// Holds a generated config file for as long as the server may restart.
    config_dir: Option<tempfile::TempDir>,
}

impl NatsServer {
    /// Starts a server on a random port of 127.0.0.1.
    pub fn start() -> Self {
        Self::spawn(None, None)
    }

    /// Starts a server with a config file (ports in it are overridden).
    pub fn with_config(config: impl Into<PathBuf>) -> Self {
        Self::spawn(None, Some(config.into()))
    }

    fn spawn(port: Option<u16>, config: Option<PathBuf>) -> Self {
        Self::spawn_reporting_routes(port, config).0
    }

    /// [`NatsServer::spawn`], and where the route port, if the config has a cluster, will be
    /// reported (after the client port, which this already waited for).
    fn spawn_reporting_routes(
        port: Option<u16>,
        config: Option<PathBuf>,
    ) -> (Self, mpsc::Receiver<Option<u16>>) {
        let mut cmd = Command::new(tool("nats-server", "NATS_SERVER_BIN"));
        if let Some(c) = &config {
            cmd.arg("-c").arg(c);
        }
        let port_arg = port.map_or("-1".to_owned(), |p| p.to_string());
        cmd.args(["-a", "127.0.0.1", "-p", &port_arg, "-m", "0"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting nats-server: {e}"));
        let stderr = child.stderr.take().unwrap_or_else(|| unreachable!("piped"));
        let (tx, rx) = mpsc::channel();
        let (route_tx, route_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let port_after = |line: &str, prefix: &str| -> Option<Option<u16>> {
                let addr = line.split(prefix).nth(1)?;
                Some(addr.rsplit(':').next().and_then(|p| p.trim().parse().ok()))
            };
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(port) = port_after(&line, "Listening for client connections on ") {
                    let _ = tx.send(port);
                }
                if let Some(port) = port_after(&line, "Listening for route connections on ") {
                    let _ = route_tx.send(port);
                }
            }
        });
        let port = match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Some(p)) => p,
            other => {
                let _ = child.kill();
                panic!("nats-server did not report its port: {other:?}")
            }
        };
        let server = NatsServer {
            child: Some(child),
            port,
            route_port: None,
            config,
            config_dir: None,
        };
        (server, route_rx)
    }

    /// Starts a node of the cluster `devgate-test` that listens for routes on a random port of
    /// 127.0.0.1 and dials `routes` (other nodes' [`NatsServer::route_addr`], or a
    /// [`crate::cut::CuttableLink`] in front of one, which a test cuts to partition the
    /// cluster without disconnecting any client). With two nodes nothing dials around the
    /// link: the node that accepted the route does not dial it again, and `no_advertise` keeps
    /// clients to the URL they were given. (A third node could learn another route by gossip.)
    pub fn start_clustered(routes: &[std::net::SocketAddr]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let conf = dir.path().join("cluster.conf");
        let routes: Vec<String> = routes
            .iter()
            .map(|r| format!("\"nats-route://{r}\""))
            .collect();
        std::fs::write(
            &conf,
            format!(
                "cluster {{\n  name: devgate-test\n  host: 127.0.0.1\n  port: -1\n  no_advertise: true\n  routes: [{}]\n}}\n",
                routes.join(", ")
            ),
        )
        .expect("write nats config");
        let (mut server, route_rx) = Self::spawn_reporting_routes(None, Some(conf));
        server.config_dir = Some(dir);
        server.route_port = match route_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Some(p)) => Some(p),
            other => panic!("nats-server did not report its route port: {other:?}"),
        };
        server
    }

    /// Where a [`NatsServer::start_clustered`] node listens for routes.
    pub fn route_addr(&self) -> std::net::SocketAddr {
        let port = self.route_port.expect("a clustered server");
        ([127, 0, 0, 1], port).into()
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// `tls://127.0.0.1:<port>`, for a [`NatsServer::start_tls`] server.
    pub fn tls_url(&self) -> String {
        format!("tls://127.0.0.1:{}", self.port)
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server (clients see the connection drop).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        let mut fresh = Self::spawn(Some(self.port), self.config.clone());
        fresh.config_dir = self.config_dir.take();
        *self = fresh;
    }

    /// Starts a server that accepts TLS clients only, with the test certificate
    /// `tests/fixtures/tls/server.pem` (signed by [`tls_fixture`]`("ca.pem")`, valid for
    /// 127.0.0.1).
    pub fn start_tls() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let conf = dir.path().join("tls.conf");
        std::fs::write(
            &conf,
            format!(
                "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  timeout: 2\n}}\n",
                tls_fixture("server.pem"),
                tls_fixture("server.key")
            ),
        )
        .expect("write nats config");
        let mut server = Self::with_config(conf);
        server.config_dir = Some(dir);
        server
    }

    /// A client connection for a test's "service" side.
    pub async fn client(&self) -> async_nats::Client {
        async_nats::connect(self.url())
            .await
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", self.url()))
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Returns once the server has processed everything `client` sent before this call, its
/// `SUB`s in particular. async-nats' `flush()` only waits until the bytes left the client, so a
/// message published right after it from *another* connection can still beat the
/// subscription (seen in CI).
pub async fn processed(client: &async_nats::Client) {
    barrier(client, &format!("devgate.test.sync.{}", client.new_inbox())).await;
}

/// Every device's presence events, subscribed before this returns: nothing published after it
/// is missed.
pub async fn presence_events(client: &async_nats::Client) -> async_nats::Subscriber {
    let events = client
        .subscribe(devgate_gateway::contract::subjects::ALL_PRESENCE_EVENTS)
        .await
        .expect("subscribe to presence events");
    processed(client).await;
    events
}

/// [`processed`] through a given `subject`, which nobody may subscribe to (for clients whose
/// permissions limit where they publish): the server answers "no responders" itself, and only
/// after reading, in order, what the client sent before.
pub async fn barrier(client: &async_nats::Client, subject: &str) {
    let answer = tokio::time::timeout(
        Duration::from_secs(5),
        client.request(subject.to_owned(), bytes::Bytes::new()),
    )
    .await
    .unwrap_or_else(|_| panic!("barrier request on {subject} timed out"));
    match answer {
        Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => {}
        other => panic!("expected the server's no-responders answer on {subject}, got {other:?}"),
    }
}

/// Publishes through the gateway's own NATS link and returns the message as `service` received
/// it on `subject` (subscribed, and confirmed by the server, before the publish).
pub async fn via_link(
    link: &devgate_gateway::bus::Link,
    service: &async_nats::Client,
    subject: &str,
    headers: devgate_gateway::bus::Headers<'_>,
    payload: &[u8],
) -> async_nats::Message {
    use futures::StreamExt;
    let mut sub = service
        .subscribe(subject.to_owned())
        .await
        .expect("subscribe");
    processed(service).await;
    link.publish(subject, None, headers, payload)
        .await
        .expect("link publish");
    tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .unwrap_or_else(|_| panic!("nothing arrived on {subject}"))
        .expect("subscription open")
}

/// A file of the test-only TLS material in `tests/fixtures/tls/`.
pub fn tls_fixture(name: &str) -> PathBuf {
    crate::bins::workspace_root()
        .join("tests/fixtures/tls")
        .join(name)
}

/// A service connection to a [`NatsServer::start_tls`] server.
pub async fn tls_client(nats: &NatsServer) -> async_nats::Client {
    devgate_gateway::bus::tls::ensure_crypto_provider();
    async_nats::ConnectOptions::new()
        .add_root_certificates(tls_fixture("ca.pem"))
        .require_tls(true)
        .connect(nats.tls_url())
        .await
        .expect("service connects over TLS")
}

/// Publishes a request on `subject` and returns the subscription its answer will arrive on.
/// Unlike a spawned `client.request(..)`, the request is on its way (ordered before anything
/// `client` sends after) when this returns, so a following [`processed`] covers it.
pub async fn send_request(
    client: &async_nats::Client,
    subject: String,
    headers: async_nats::HeaderMap,
    payload: bytes::Bytes,
) -> async_nats::Subscriber {
    let inbox = client.new_inbox();
    let answers = client
        .subscribe(inbox.clone())
        .await
        .expect("subscribe to the reply inbox");
    client
        .publish_with_reply_and_headers(subject, inbox, headers, payload)
        .await
        .expect("publish the request");
    answers
}

/// The answer to a request sent with [`send_request`], within `wait`.
pub async fn answer(answers: &mut async_nats::Subscriber, wait: Duration) -> async_nats::Message {
    use futures::StreamExt;
    tokio::time::timeout(wait, answers.next())
        .await
        .expect("answered in time, not left to time out")
        .expect("answer")
}
