//! The Kubernetes source and the ConfigMap sink against an in-test API server that serves the
//! real paths kube-rs calls: list and watch of EndpointSlices (with watch restarts and a
//! `410 Gone` resync) and server-side apply of a ConfigMap.

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
use common::{http_get, wait_for};
use devgate_lb_sync::config::{Config, SinkKind, SourceKind};
use devgate_lb_sync::sink::configmap::FIELD_MANAGER;
use serde_json::{Value, json};
use tokio::sync::mpsc;
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
    applies: Vec<Apply>,
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

impl FakeApi {
    async fn start(failing_lists: usize) -> FakeApi {
        let state = Arc::new(Mutex::new(ApiState {
            resource_version: 10,
            failing_lists,
            ..ApiState::default()
        }));
        let app = Router::new()
            .route(
                "/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices",
                get(list_or_watch),
            )
            .route("/api/v1/namespaces/{ns}/configmaps/{name}", patch(apply))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake API");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeApi { state, addr }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
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
        let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "etcd unavailable", "reason": "ServiceUnavailable", "code": 503});
        return (StatusCode::SERVICE_UNAVAILABLE, axum::Json(status)).into_response();
    }
    axum::Json(json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSliceList",
        "metadata": { "resourceVersion": s.resource_version.to_string() },
        "items": s.slices.values().cloned().collect::<Vec<_>>(),
    }))
    .into_response()
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
    });
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
        metrics.contains("devgate_lb_sync_failures_total{stage=\"source\"}"),
        "410 counted: {metrics}"
    );
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
