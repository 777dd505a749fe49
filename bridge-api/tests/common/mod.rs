//! Test support: a real bridge-api on a loopback port, in front of real gateways on a real
//! nats-server, called through real HTTP.

#![allow(dead_code)]

use devgate_gateway::common::Validate;
use std::time::Duration;

use devgate_bridge_api::BridgeApi;
use devgate_bridge_api::config::Config;
use devgate_gateway::common::Secret;
use devgate_tests::NatsServer;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// The API token every test bridge accepts.
pub const TOKEN: &str = "test-api-token-0123456789";

/// Generous bound for things that must happen "soon".
pub const WAIT: Duration = Duration::from_secs(10);

/// A running bridge-api; shut down (gracefully) on drop.
pub struct Bridge {
    pub base: String,
    pub shutdown: CancellationToken,
    pub server: Option<BridgeApi>,
    pub http: reqwest::Client,
}

/// A bridge config for `nats` on a free loopback port.
pub fn bridge_config(nats: &NatsServer) -> Config {
    Config {
        listen: "127.0.0.1:0".parse().expect("addr"),
        nats_url: nats.url(),
        api_tokens: vec![Secret::new(TOKEN)],
        // Generous for loaded CI machines; answers come earlier once instances have announced.
        scatter_window_ms: 2_000,
        ..Config::default()
    }
}

impl Bridge {
    /// The `/metrics` text as a scraper sees it.
    pub async fn metrics_text(&self) -> String {
        self.http
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    }

    /// Starts bridge-api with `config` and waits until it is connected to NATS.
    pub async fn start_with(config: Config) -> Bridge {
        let bridge = Self::launch(config).await;
        bridge.wait_ready(true).await;
        bridge
    }

    /// Starts bridge-api with `config` without waiting for NATS (which may be down).
    pub async fn launch(config: Config) -> Bridge {
        config.validate().expect("test config valid");
        let shutdown = CancellationToken::new();
        let server = BridgeApi::start(config, shutdown.clone())
            .await
            .expect("bridge-api starts");
        Bridge {
            base: format!("http://{}", server.addr()),
            shutdown,
            server: Some(server),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("http client"),
        }
    }

    /// Starts bridge-api in front of `nats` with the default test config.
    pub async fn start(nats: &NatsServer) -> Bridge {
        Self::start_with(bridge_config(nats)).await
    }

    /// `base` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// An authenticated request.
    pub fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, self.url(path)).bearer_auth(TOKEN)
    }

    /// Authenticated GET returning status and JSON body.
    pub async fn get(&self, path: &str) -> (u16, Value) {
        send(self.req(reqwest::Method::GET, path)).await
    }

    /// Authenticated POST of raw bytes returning status and JSON body.
    pub async fn post(&self, path: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
        send(self.req(reqwest::Method::POST, path).body(body)).await
    }

    /// Polls `/readyz` until it says `ready` (there is no event to await).
    pub async fn wait_ready(&self, ready: bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let ok = match self.http.get(self.url("/readyz")).send().await {
                Ok(r) => r.status().is_success(),
                Err(_) => false,
            };
            if ok == ready {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "bridge-api readiness never became {ready}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Cancels and waits for the graceful shutdown to finish.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(server) = self.server.take() {
            tokio::time::timeout(WAIT, server.wait())
                .await
                .expect("shutdown finishes in time")
                .expect("server ends cleanly");
        }
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Sends and returns (status, JSON body or Null).
pub async fn send(req: reqwest::RequestBuilder) -> (u16, Value) {
    let response = req.send().await.expect("HTTP request");
    let status = response.status().as_u16();
    let bytes = response.bytes().await.expect("body");
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, body)
}

/// Asserts a JSON error with `code`.
pub fn assert_error(got: &(u16, Value), status: u16, code: &str) {
    assert_eq!(got.0, status, "unexpected status, body {}", got.1);
    assert_eq!(got.1["error"], code, "unexpected body {}", got.1);
    assert!(
        got.1["message"].as_str().is_some_and(|m| !m.is_empty()),
        "error without message: {}",
        got.1
    );
}

/// Reads an SSE response until an event named `name` arrives; returns its JSON data.
pub struct SseReader {
    response: reqwest::Response,
    buf: String,
}

impl SseReader {
    pub fn new(response: reqwest::Response) -> Self {
        SseReader {
            response,
            buf: String::new(),
        }
    }

    /// The next event as (event name, data); `None` when the stream ended.
    pub async fn next_event(&mut self) -> Option<(String, String)> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut name = String::from("message");
                let mut data = Vec::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        name = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push(v.strip_prefix(' ').unwrap_or(v).to_owned());
                    }
                }
                if data.is_empty() {
                    continue; // keep-alive comment
                }
                return Some((name, data.join("\n")));
            }
            match tokio::time::timeout(WAIT, self.response.chunk()).await {
                Ok(Ok(Some(chunk))) => self.buf.push_str(&String::from_utf8_lossy(&chunk)),
                Ok(Ok(None)) | Ok(Err(_)) => return None,
                Err(_) => panic!("no SSE event within {WAIT:?}"),
            }
        }
    }

    /// The next event with a JSON body.
    pub async fn next_json(&mut self) -> (String, Value) {
        let (name, data) = self.next_event().await.expect("stream still open");
        (name, serde_json::from_str(&data).expect("JSON event data"))
    }
}
