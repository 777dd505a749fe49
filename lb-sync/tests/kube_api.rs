//! The Kubernetes source and the ConfigMap sink against an in-test API server that serves the
//! real paths kube-rs calls: list and watch of EndpointSlices (with watch restarts and a
//! `410 Gone` resync) and server-side apply of a ConfigMap; over plain HTTP (as through
//! `kubectl proxy`) and over TLS with a bearer token, as a real API server wants it.

mod common;

use devgate_gateway::common::Validate;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch};
use common::{http_get, metric, wait_for};
use devgate_lb_sync::config::{Config, SinkKind, SourceKind};
use devgate_lb_sync::sink::configmap::FIELD_MANAGER;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

const NS: &str = "devgate";
const SERVICE: &str = "devgate-gateway";
const SELECTOR: &str = "kubernetes.io/service-name=devgate-gateway";

/// One recorded server-side apply.
#[derive(Debug, Clone)]
struct Apply {
    namespace: String,
    name: String,
    query: HashMap<String, String>,
    content_type: String,
    body: Value,
    /// When the fake API received it.
    at: tokio::time::Instant,
}

impl Apply {
    fn snippet(&self) -> String {
        self.body["data"]["stream-snippets"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }
}

#[derive(Default)]
struct ApiState {
    /// Current slices by name (what a list returns).
    slices: BTreeMap<String, Value>,
    resource_version: u64,
    lists: Vec<HashMap<String, String>>,
    watches: Vec<HashMap<String, String>>,
    /// Open watch streams; dropping a sender ends that stream.
    watchers: Vec<mpsc::Sender<String>>,
    /// Lists answered with 503 before the API "comes up".
    failing_lists: usize,
    /// Statuses the next watch requests are answered with, in order, before watches work.
    failing_watches: std::collections::VecDeque<StatusCode>,
    /// Watch requests answered with an error status.
    refused_watches: usize,
    applies: Vec<Apply>,
    /// The number of applies so far, for tests that await the next one.
    apply_count: tokio::sync::watch::Sender<usize>,
    /// The bearer token every request must carry (`None`: plain HTTP, no authentication).
    token: Option<String>,
    /// Requests refused for a missing or wrong token.
    unauthorized: usize,
}

/// A fake kube-apiserver on loopback.
#[derive(Clone)]
struct FakeApi {
    state: Arc<Mutex<ApiState>>,
    addr: SocketAddr,
}

fn slice(name: &str, rv: u64, endpoints: &[(&str, bool, bool)]) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": NS,
            "resourceVersion": rv.to_string(),
            "labels": { "kubernetes.io/service-name": SERVICE },
        },
        "addressType": "IPv4",
        "ports": [
            { "name": "http", "port": 9090, "protocol": "TCP" },
            { "name": "device", "port": 7000, "protocol": "TCP" },
        ],
        "endpoints": endpoints.iter().map(|(ip, ready, terminating)| json!({
            "addresses": [ip],
            "conditions": { "ready": ready, "serving": ready, "terminating": terminating },
        })).collect::<Vec<_>>(),
    })
}

/// A TLS listener for the fake API, with the test fixtures' server certificate (for
/// 127.0.0.1). Each handshake runs in its own task, so a client that stalls or fails one
/// delays nobody else; failed ones are dropped, as a real server would.
struct TlsListener {
    handshaken: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    addr: SocketAddr,
}

impl TlsListener {
    fn new(tcp: tokio::net::TcpListener) -> Self {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let fixture = devgate_tests::nats::tls_fixture;
        let certs = CertificateDer::pem_file_iter(fixture("server.pem"))
            .expect("server.pem")
            .collect::<Result<Vec<_>, _>>()
            .expect("certificates");
        let key = PrivateKeyDer::from_pem_file(fixture("server.key")).expect("server.key");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server TLS config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let addr = tcp.local_addr().expect("addr");
        let (tx, handshaken) = mpsc::channel(16);
        tokio::spawn(async move {
            while let Ok((stream, peer)) = tcp.accept().await {
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(stream).await {
                        let _ = tx.send((tls, peer)).await;
                    }
                });
            }
        });
        TlsListener { handshaken, addr }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.handshaken.recv().await {
            Some(accepted) => accepted,
            // The accept loop ended with the runtime: nothing more will come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.addr)
    }
}

/// Refuses a request without the expected bearer token, with the API server's `401` Status.
async fn authenticate(
    State(state): State<Arc<Mutex<ApiState>>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let expected = state.lock().expect("state").token.clone();
    if let Some(token) = expected {
        let given = request
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        if given != Some(format!("Bearer {token}").as_str()) {
            state.lock().expect("state").unauthorized += 1;
            let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                "status": "Failure", "message": "Unauthorized", "reason": "Unauthorized",
                "code": 401});
            return (StatusCode::UNAUTHORIZED, axum::Json(status)).into_response();
        }
    }
    next.run(request).await
}

impl FakeApi {
    /// Plain HTTP without authentication, as `kubectl proxy` serves the API.
    async fn start(failing_lists: usize) -> FakeApi {
        Self::serve(failing_lists, None).await
    }

    /// HTTPS with the fixtures' certificate, and `token` required on every request.
    async fn start_tls(token: &str) -> FakeApi {
        Self::serve(0, Some(token.to_owned())).await
    }

    async fn serve(failing_lists: usize, token: Option<String>) -> FakeApi {
        let tls = token.is_some();
        let state = Arc::new(Mutex::new(ApiState {
            resource_version: 10,
            failing_lists,
            token,
            ..ApiState::default()
        }));
        let app = Router::new()
            .route(
                "/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices",
                get(list_or_watch),
            )
            .route("/api/v1/namespaces/{ns}/configmaps/{name}", patch(apply))
            .layer(axum::middleware::from_fn_with_state(
                state.clone(),
                authenticate,
            ))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake API");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = if tls {
                axum::serve(TlsListener::new(listener), app).await
            } else {
                axum::serve(listener, app).await
            };
        });
        FakeApi { state, addr }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig for this API over TLS, trusting `ca` (a fixture) and presenting `token`.
    fn kubeconfig(&self, dir: &std::path::Path, ca: &str, token: &str) -> std::path::PathBuf {
        let ca = devgate_tests::nats::tls_fixture(ca);
        let text = format!(
            "apiVersion: v1\nkind: Config\n\
             clusters:\n- name: test\n  cluster:\n    server: https://{addr}\n    \
             certificate-authority: {ca}\n\
             users:\n- name: lb-sync\n  user:\n    token: {token}\n\
             contexts:\n- name: test\n  context:\n    cluster: test\n    user: lb-sync\n\
             current-context: test\n",
            addr = self.addr,
            ca = ca.display(),
        );
        let path = dir.join("kubeconfig");
        std::fs::write(&path, text).expect("write kubeconfig");
        path
    }

    fn unauthorized(&self) -> usize {
        self.lock().unauthorized
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ApiState> {
        self.state.lock().expect("fake API state")
    }

    /// Stores a slice (as the API would) and returns its new resource version.
    fn put(&self, name: &str, endpoints: &[(&str, bool, bool)]) -> Value {
        let mut s = self.lock();
        s.resource_version += 1;
        let obj = slice(name, s.resource_version, endpoints);
        s.slices.insert(name.to_owned(), obj.clone());
        obj
    }

    /// Sends a watch event to every open watch.
    fn event(&self, kind: &str, object: Value) {
        let line = json!({ "type": kind, "object": object }).to_string();
        let watchers = self.lock().watchers.clone();
        for w in watchers {
            let _ = w.try_send(line.clone());
        }
    }

    /// Ends every open watch stream (as the API server does on its timeout).
    fn end_watches(&self) {
        self.lock().watchers.clear();
    }

    /// Answers every open watch with `410 Gone` and ends it: the client must relist.
    fn gone(&self) {
        self.event(
            "ERROR",
            json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {},
                "status": "Failure", "message": "too old resource version",
                "reason": "Expired", "code": 410,
            }),
        );
        self.end_watches();
    }

    fn watch_count(&self) -> usize {
        self.lock().watches.len()
    }

    fn list_count(&self) -> usize {
        self.lock().lists.len()
    }

    fn applies(&self) -> Vec<Apply> {
        self.lock().applies.clone()
    }

    /// Waits (up to `timeout`) until at least `n` applies were received; returns them all.
    async fn wait_applies(&self, n: usize, timeout: Duration) -> Vec<Apply> {
        let mut count = self.lock().apply_count.subscribe();
        tokio::time::timeout(timeout, count.wait_for(|c| *c >= n))
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {n} applies"))
            .expect("the fake API keeps its sender");
        self.applies()
    }

    /// Waits for an apply whose snippet satisfies `check`.
    async fn wait_apply(&self, what: &str, check: impl Fn(&str) -> bool) -> Apply {
        wait_for(Duration::from_secs(15), what, || async {
            self.applies().pop().filter(|a| check(&a.snippet()))
        })
        .await
    }
}

async fn list_or_watch(
    State(state): State<Arc<Mutex<ApiState>>>,
    Path(ns): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    assert_eq!(ns, NS, "wrong namespace");
    assert_eq!(
        q.get("labelSelector").map(String::as_str),
        Some(SELECTOR),
        "{q:?}"
    );
    let mut s = state.lock().expect("state");
    if q.get("watch").map(String::as_str) == Some("true") {
        if let Some(code) = s.failing_watches.pop_front() {
            s.refused_watches += 1;
            return failure(code);
        }
        s.watches.push(q);
        let (tx, mut rx) = mpsc::channel::<String>(64);
        s.watchers.push(tx);
        let stream = futures::stream::poll_fn(move |cx| {
            rx.poll_recv(cx)
                .map(|line| line.map(|l| Ok::<_, std::io::Error>(format!("{l}\n"))))
        });
        return Response::builder()
            .header("content-type", "application/json")
            .body(Body::from_stream(stream))
            .expect("watch response");
    }
    s.lists.push(q);
    if s.failing_lists > 0 {
        s.failing_lists -= 1;
        return failure(StatusCode::SERVICE_UNAVAILABLE);
    }
    axum::Json(json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSliceList",
        "metadata": { "resourceVersion": s.resource_version.to_string() },
        "items": s.slices.values().cloned().collect::<Vec<_>>(),
    }))
    .into_response()
}

/// An API server's failure Status with `code`.
fn failure(code: StatusCode) -> Response {
    let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": "etcd unavailable", "reason": code.canonical_reason(), "code": code.as_u16()});
    (code, axum::Json(status)).into_response()
}

async fn apply(
    State(state): State<Arc<Mutex<ApiState>>>,
    Path((ns, name)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let Ok(parsed) = serde_json::from_str::<Value>(&body) else {
        return (StatusCode::BAD_REQUEST, "apply body is not JSON").into_response();
    };
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let mut s = state.lock().expect("state");
    s.applies.push(Apply {
        namespace: ns.clone(),
        name: name.clone(),
        query,
        content_type,
        body: parsed.clone(),
        at: tokio::time::Instant::now(),
    });
    let count = s.applies.len();
    s.apply_count.send_replace(count);
    s.resource_version += 1;
    axum::Json(json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": { "name": name, "namespace": ns, "resourceVersion": s.resource_version.to_string() },
        "data": parsed["data"],
    }))
    .into_response()
}

fn config(api: &FakeApi) -> Config {
    Config {
        source: SourceKind::Kube,
        sink: SinkKind::Configmap,
        kube_api_url: Some(api.url()),
        kube_namespace: Some(NS.into()),
        kube_service: SERVICE.into(),
        configmap_name: Some("nginx-config".into()),
        http_listen: "127.0.0.1:0".parse().expect("addr"),
        listen: "0.0.0.0:7000".parse().expect("addr"),
        proxy_protocol: true,
        debounce_ms: 50,
        min_reload_interval_ms: 100,
        // The ingress controller's listener that lb-sync renders is plaintext.
        insecure_plaintext: true,
        ..Config::default()
    }
}

#[tokio::test]
async fn endpoint_slices_follow_watch_restarts_and_resyncs_into_the_configmap() {
    devgate_tests::init_logs();
    let api = FakeApi::start(0).await;
    api.put(
        "gw-a",
        &[("10.0.0.1", true, false), ("10.0.0.2", false, true)],
    );
    let cfg = config(&api);
    cfg.validate().expect("valid config");
    let lb = devgate_lb_sync::start(cfg, CancellationToken::new())
        .await
        .expect("lb-sync starts");

    // The first list is applied: ready endpoint in, terminating one out.
    let first = api
        .wait_apply("first apply", |s| s.contains("server 10.0.0.1:7000"))
        .await;
    assert_eq!(first.name, "nginx-config");
    assert_eq!(
        first.namespace, NS,
        "the ConfigMap defaults to the Service's namespace"
    );
    assert_eq!(
        first.query.get("fieldManager").map(String::as_str),
        Some(FIELD_MANAGER)
    );
    assert_eq!(first.query.get("force").map(String::as_str), Some("true"));
    assert_eq!(first.content_type, "application/apply-patch+yaml");
    assert_eq!(first.body["kind"], "ConfigMap");
    let snippet = first.snippet();
    assert!(
        !snippet.contains("10.0.0.2"),
        "terminating endpoint in rotation:\n{snippet}"
    );
    assert!(snippet.contains("proxy_protocol on;"), "{snippet}");
    assert!(snippet.contains("listen 0.0.0.0:7000;"), "{snippet}");

    // A watch event: the second pod becomes ready.
    wait_for(Duration::from_secs(10), "a watch", || async {
        (api.watch_count() >= 1).then_some(())
    })
    .await;
    let watch = &api.lock().watches[0].clone();
    assert!(watch.contains_key("resourceVersion"), "{watch:?}");
    let obj = api.put(
        "gw-a",
        &[("10.0.0.1", true, false), ("10.0.0.2", true, false)],
    );
    api.event("MODIFIED", obj);
    api.wait_apply("10.0.0.2 ready", |s| s.contains("server 10.0.0.2:7000"))
        .await;

    // The API server ends the watch: kube-runtime watches again from the last version
    // (no relist), and later events still arrive.
    let lists = api.list_count();
    api.end_watches();
    wait_for(Duration::from_secs(10), "a new watch", || async {
        (api.watch_count() >= 2).then_some(())
    })
    .await;
    assert_eq!(api.list_count(), lists, "a watch restart must not relist");
    let obj = api.put("gw-b", &[("10.0.0.3", true, false)]);
    api.event("ADDED", obj);
    api.wait_apply("gw-b added", |s| s.contains("server 10.0.0.3:7000"))
        .await;

    // While no watch is open, gw-a is deleted (the DELETED event is lost); then the watch gets
    // 410 Gone. Only the relist can reveal the deletion: afterwards exactly gw-b is in rotation.
    api.end_watches();
    wait_for(Duration::from_secs(10), "a third watch", || async {
        (api.watch_count() >= 3).then_some(())
    })
    .await;
    api.lock().slices.remove("gw-a");
    api.gone();
    let resynced = api
        .wait_apply("resync drops gw-a", |s| !s.contains("10.0.0.1"))
        .await
        .snippet();
    assert!(resynced.contains("server 10.0.0.3:7000"), "{resynced}");
    assert_eq!(
        api.list_count(),
        lists + 1,
        "410 Gone forces exactly one relist"
    );

    // Never a partial upstream: every apply held one of the complete sets above.
    for a in api.applies() {
        let s = a.snippet();
        let servers: Vec<_> = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
            .into_iter()
            .filter(|ip| s.contains(&format!("server {ip}:7000")))
            .collect();
        assert!(
            [
                vec!["10.0.0.1"],
                vec!["10.0.0.1", "10.0.0.2"],
                vec!["10.0.0.1", "10.0.0.2", "10.0.0.3"],
                vec!["10.0.0.3"]
            ]
            .contains(&servers),
            "unexpected upstream {servers:?}"
        );
    }

    let (_, metrics) = http_get(lb.http_addr(), "/metrics").await;
    assert!(
        metrics.contains("devgate_lb_sync_applies_total 4"),
        "{metrics}"
    );
    assert!(
        metrics.lines().any(|l| {
            l.starts_with("devgate_lb_sync_failures_total{stage=\"source\"}") && !l.ends_with(" 0")
        }),
        "410 counted: {metrics}"
    );
    lb.shutdown().await;
}

/// `source_connected` says whether lb-sync follows the API. kube-runtime's watcher resumes a
/// failed watch without emitting anything, so a gauge set only by events stayed 0 after one
/// refused watch until the next slice change: on a quiet fleet, an alert firing for nothing.
#[tokio::test]
async fn source_connected_returns_to_1_after_a_failed_watch() {
    devgate_tests::init_logs();
    let api = FakeApi::start(0).await;
    api.put("gw-a", &[("10.0.0.1", true, false)]);
    let lb = devgate_lb_sync::start(config(&api), CancellationToken::new())
        .await
        .expect("lb-sync starts");
    let ops = lb.http_addr();
    let connected = || async { metric(ops, "devgate_lb_sync_source_connected").await };
    let failures =
        || async { metric(ops, "devgate_lb_sync_failures_total{stage=\"source\"}").await };
    api.wait_apply("first apply", |s| s.contains("server 10.0.0.1:7000"))
        .await;
    let watch = |n: usize| {
        let api = api.clone();
        async move {
            wait_for(Duration::from_secs(10), "a watch", || async {
                (api.watch_count() >= n).then_some(())
            })
            .await
        }
    };
    watch(1).await;
    assert_eq!(connected().await, Some(1.0));

    // A 503 never reaches lb-sync: kube's client retries 429, 503 and 504 itself.
    api.lock()
        .failing_watches
        .push_back(StatusCode::SERVICE_UNAVAILABLE);
    api.end_watches();
    watch(2).await;
    assert_eq!(api.lock().refused_watches, 1);
    assert_eq!(failures().await, Some(0.0), "no failure surfaced");
    assert_eq!(connected().await, Some(1.0));

    // A 500 does: the watch fails, and lb-sync lists again.
    let (lists, applies) = (api.list_count(), api.applies().len());
    api.lock()
        .failing_watches
        .push_back(StatusCode::INTERNAL_SERVER_ERROR);
    api.end_watches();
    wait_for(
        Duration::from_secs(10),
        "the failed watch counted",
        || async { (failures().await == Some(1.0)).then_some(()) },
    )
    .await;
    assert_eq!(api.lock().refused_watches, 2);
    // Nothing in the fleet changes, and still the gauge comes back.
    wait_for(
        Duration::from_secs(10),
        "source_connected back to 1",
        || async { (connected().await == Some(1.0)).then_some(()) },
    )
    .await;
    assert_eq!(api.list_count(), lists + 1, "one relist after the failure");
    watch(3).await;
    assert_eq!(
        api.applies().len(),
        applies,
        "the unchanged set is not applied again"
    );
    // And the new watch delivers changes.
    let obj = api.put(
        "gw-a",
        &[("10.0.0.1", true, false), ("10.0.0.2", true, false)],
    );
    api.event("MODIFIED", obj);
    api.wait_apply("10.0.0.2 ready", |s| s.contains("server 10.0.0.2:7000"))
        .await;
    assert_eq!(connected().await, Some(1.0));
    lb.shutdown().await;
}

#[tokio::test]
async fn an_unchanged_configmap_key_is_applied_again_every_resync_interval() {
    devgate_tests::init_logs();
    let api = FakeApi::start(0).await;
    api.put("gw-a", &[("10.0.0.1", true, false)]);
    let resync = Duration::from_millis(300);
    let cfg = Config {
        configmap_resync_ms: resync.as_millis() as u64,
        ..config(&api)
    };
    cfg.validate().expect("valid config");
    let lb = devgate_lb_sync::start(cfg, CancellationToken::new())
        .await
        .expect("lb-sync starts");

    let first = api.wait_applies(1, Duration::from_secs(10)).await[0].clone();
    assert!(
        first.snippet().contains("server 10.0.0.1:7000"),
        "{}",
        first.snippet()
    );
    // Nothing changes from here on. Someone may still remove or edit the key (lb-sync never
    // reads the ConfigMap), so the same text must be applied again, and again.
    let applies = api.wait_applies(3, Duration::from_secs(10)).await;
    for (earlier, later) in applies.iter().zip(&applies[1..]) {
        assert!(
            later.at.duration_since(earlier.at) >= resync,
            "re-applied after {:?}, before the resync interval",
            later.at.duration_since(earlier.at)
        );
    }
    for again in &applies[1..] {
        assert_eq!(again.snippet(), first.snippet(), "the same text");
        assert_eq!(again.body, first.body, "the same apply body");
        assert_eq!(
            again.query.get("fieldManager").map(String::as_str),
            Some(FIELD_MANAGER)
        );
        assert_eq!(again.query.get("force").map(String::as_str), Some("true"));
        assert_eq!(again.content_type, "application/apply-patch+yaml");
    }
    lb.shutdown().await;
}

#[tokio::test]
async fn an_unavailable_api_is_retried_and_nothing_is_written_meanwhile() {
    devgate_tests::init_logs();
    let api = FakeApi::start(2).await;
    api.put("gw-a", &[("10.0.0.1", true, false)]);
    let lb = devgate_lb_sync::start(config(&api), CancellationToken::new())
        .await
        .expect("lb-sync starts despite the API being down");
    wait_for(Duration::from_secs(10), "two failed lists", || async {
        (api.list_count() >= 2).then_some(())
    })
    .await;
    assert!(
        api.applies().is_empty(),
        "nothing may be written without a complete list"
    );
    let (status, body) = http_get(lb.http_addr(), "/readyz").await;
    assert_eq!(status, 503, "{body}");
    api.wait_apply("apply after the API recovers", |s| {
        s.contains("server 10.0.0.1:7000")
    })
    .await;
    assert_eq!(api.applies().len(), 1);
    wait_for(Duration::from_secs(10), "ready", || async {
        (http_get(lb.http_addr(), "/readyz").await.0 == 200).then_some(())
    })
    .await;
    lb.shutdown().await;
}

#[tokio::test]
async fn the_configmap_is_written_in_the_ingress_controllers_namespace() {
    devgate_tests::init_logs();
    let api = FakeApi::start(0).await;
    api.put("gw-a", &[("10.0.0.1", true, false)]);
    let cfg = Config {
        configmap_namespace: Some("ingress-nginx".into()),
        ..config(&api)
    };
    cfg.validate().expect("valid config");
    let lb = devgate_lb_sync::start(cfg, CancellationToken::new())
        .await
        .expect("lb-sync starts");
    // The slices are still watched in the gateways' namespace (the fake API refuses any
    // other), and the apply goes to the controller's.
    let apply = api
        .wait_apply("apply", |s| s.contains("server 10.0.0.1:7000"))
        .await;
    assert_eq!(apply.namespace, "ingress-nginx");
    assert_eq!(apply.name, "nginx-config");
    assert!(
        api.applies().iter().all(|a| a.namespace == "ingress-nginx"),
        "nothing is written in the gateways' namespace"
    );
    lb.shutdown().await;
}

/// lb-sync configured by a kubeconfig for `api` (TLS and a token), the way it runs outside the
/// cluster; in the cluster the service account gives the same two things.
fn kubeconfig_config(api: &FakeApi, kubeconfig: std::path::PathBuf) -> Config {
    Config {
        kube_api_url: None,
        kubeconfig: Some(kubeconfig),
        ..config(api)
    }
}

#[tokio::test]
async fn the_api_is_reached_over_tls_with_a_bearer_token() {
    devgate_tests::init_logs();
    let api = FakeApi::start_tls("s3cret-token").await;
    api.put("gw-a", &[("10.0.0.1", true, false)]);
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = kubeconfig_config(&api, api.kubeconfig(dir.path(), "ca.pem", "s3cret-token"));
    cfg.validate().expect("valid config");
    let lb = devgate_lb_sync::start(cfg, CancellationToken::new())
        .await
        .expect("lb-sync starts");

    // List, watch and apply all went through TLS with the token: a watch event still arrives.
    api.wait_apply("apply over TLS", |s| s.contains("server 10.0.0.1:7000"))
        .await;
    wait_for(Duration::from_secs(10), "a watch", || async {
        (api.watch_count() >= 1).then_some(())
    })
    .await;
    let obj = api.put(
        "gw-a",
        &[("10.0.0.1", true, false), ("10.0.0.2", true, false)],
    );
    api.event("MODIFIED", obj);
    api.wait_apply("watch event over TLS", |s| {
        s.contains("server 10.0.0.2:7000")
    })
    .await;
    assert_eq!(api.unauthorized(), 0, "every request carried the token");
    lb.shutdown().await;
}

/// lb-sync against an API over TLS that wants `s3cret-token`, trusting `ca` and presenting
/// `token`, when that must fail: not ready, with `reason` in `/readyz`, a source failure
/// counted, and nothing written. Returns the API for what it saw.
async fn refused_api_stays_unused(ca: &str, token: &str, reason: &str) -> FakeApi {
    devgate_tests::init_logs();
    let api = FakeApi::start_tls("s3cret-token").await;
    api.put("gw-a", &[("10.0.0.1", true, false)]);
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = api.kubeconfig(dir.path(), ca, token);
    let lb = devgate_lb_sync::start(
        kubeconfig_config(&api, kubeconfig),
        CancellationToken::new(),
    )
    .await
    .expect("lb-sync starts, and retries");
    wait_for(
        Duration::from_secs(10),
        "a counted source failure",
        || async {
            let (_, metrics) = http_get(lb.http_addr(), "/metrics").await;
            metrics
                .lines()
                .any(|l| {
                    l.starts_with("devgate_lb_sync_failures_total{stage=\"source\"}")
                        && !l.ends_with(" 0")
                })
                .then_some(())
        },
    )
    .await;
    let (status, body) = http_get(lb.http_addr(), "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("the source failed") && body.contains(reason),
        "/readyz should say why: {body}"
    );
    assert!(api.applies().is_empty(), "nothing may be written");
    lb.shutdown().await;
    api
}

#[tokio::test]
async fn an_api_certificate_from_another_ca_is_refused() {
    let api = refused_api_stays_unused(
        "other-ca.pem",
        "s3cret-token",
        "invalid peer certificate: UnknownIssuer",
    )
    .await;
    // The handshake failed before any request: not even a list reached the API.
    assert_eq!(api.list_count(), 0);
    assert_eq!(api.unauthorized(), 0);
}

#[tokio::test]
async fn a_wrong_token_is_refused_by_the_api_and_nothing_is_written() {
    let api = refused_api_stays_unused("ca.pem", "stolen-token", "Unauthorized").await;
    assert!(api.unauthorized() >= 1, "the API saw and refused the token");
}

#[tokio::test]
async fn an_unreadable_kubeconfig_is_a_clear_start_error() {
    let api = FakeApi::start_tls("s3cret-token").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("no-such-kubeconfig");
    let error = devgate_lb_sync::start(
        kubeconfig_config(&api, missing.clone()),
        CancellationToken::new(),
    )
    .await
    .err()
    .expect("no start without a kubeconfig")
    .to_string();
    assert!(
        error.contains("kubeconfig") && error.contains(&missing.display().to_string()),
        "{error}"
    );
}
