//! The service side of the benchmark: publishers of downlink and consumers of uplink, over NATS
//! (devgate and the NATS floor), MQTT (the peer) and HTTP (bridge-api).
//!
//! Every payload starts with the publisher's wall-clock nanoseconds ([`stamped`]), so whoever
//! receives it (a device in a fleet, or a sink here) records end-to-end latency; all processes
//! run on one host and share the clock.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::Subject;
use bytes::BytesMut;
use futures::StreamExt;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::bench::BenchError;
use crate::bench::fleet::{stamp, stamped};
use crate::bench::hist::{Histogram, Sparse};
use crate::bench::http::HttpConn;
use crate::bench::mqtt;
use crate::common::unix_ns;

/// Messages per publish batch on the unpaced path.
const BATCH: usize = 256;

/// How a publisher paces itself.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    /// Total messages per second over all connections; `None`: as fast as possible.
    pub rate: Option<u64>,
    /// How long to publish.
    pub duration: Duration,
    /// Payload bytes (at least 8).
    pub payload_len: usize,
}

/// What a publisher did.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Published {
    /// Messages handed to the connection(s).
    pub sent: u64,
    /// Seconds spent publishing.
    pub elapsed_s: f64,
}

/// How many messages are due `elapsed` into a run at `rate` per second.
fn due(rate: u64, elapsed: Duration) -> u64 {
    (rate as f64 * elapsed.as_secs_f64()) as u64
}

/// Connects a NATS client tuned for the benchmark (large buffers, so the client is not the
/// bottleneck and a sink does not drop).
pub async fn nats_connect(url: &str, name: &str) -> Result<async_nats::Client, BenchError> {
    async_nats::ConnectOptions::new()
        .name(name)
        .client_capacity(64 * 1024)
        .subscription_capacity(1 << 20)
        .connect(url)
        .await
        .map_err(|e| BenchError::Nats(e.to_string()))
}

/// Publishes to subjects picked at random, over `conns` NATS connections.
pub async fn nats_publish(
    url: &str,
    subjects: Arc<Vec<Subject>>,
    conns: usize,
    pace: Pace,
) -> Result<Published, BenchError> {
    let mut clients = Vec::new();
    for i in 0..conns.max(1) {
        clients.push(nats_connect(url, &format!("bench-publisher-{i}")).await?);
    }
    let per_conn = pace.rate.map(|r| (r / conns.max(1) as u64).max(1));
    let start = Instant::now();
    let tasks: Vec<JoinHandle<Result<u64, BenchError>>> = clients
        .into_iter()
        .map(|client| {
            let subjects = subjects.clone();
            tokio::spawn(async move {
                let publish = |client: async_nats::Client, subject: Subject, len: usize| async move {
                    client
                        .publish(subject, stamped(len))
                        .await
                        .map_err(|e| BenchError::Nats(e.to_string()))
                };
                let sent = pace_loop(start, pace, per_conn, |n| {
                    let client = client.clone();
                    let subjects = subjects.clone();
                    async move {
                        for _ in 0..n {
                            let subject = subjects[rand::random_range(0..subjects.len())].clone();
                            publish(client.clone(), subject, pace.payload_len).await?;
                        }
                        Ok(())
                    }
                })
                .await?;
                client
                    .flush()
                    .await
                    .map_err(|e| BenchError::Nats(e.to_string()))?;
                Ok(sent)
            })
        })
        .collect();
    finish(start, tasks).await
}

/// Publishes QoS 0 to topics picked at random, over `conns` MQTT connections.
pub async fn mqtt_publish(
    addr: SocketAddr,
    topics: Arc<Vec<String>>,
    conns: usize,
    pace: Pace,
) -> Result<Published, BenchError> {
    let mut streams = Vec::new();
    for i in 0..conns.max(1) {
        streams.push(mqtt_client(addr, &format!("bench-publisher-{i}")).await?);
    }
    let per_conn = pace.rate.map(|r| (r / conns.max(1) as u64).max(1));
    let start = Instant::now();
    let tasks: Vec<JoinHandle<Result<u64, BenchError>>> = streams
        .into_iter()
        .map(|stream| {
            let topics = topics.clone();
            tokio::spawn(async move {
                let stream = Arc::new(tokio::sync::Mutex::new(stream));
                pace_loop(start, pace, per_conn, |n| {
                    let topics = topics.clone();
                    let stream = stream.clone();
                    async move {
                        let mut buf = BytesMut::with_capacity(n as usize * (pace.payload_len + 32));
                        for _ in 0..n {
                            let topic = &topics[rand::random_range(0..topics.len())];
                            mqtt::publish(
                                &mut buf,
                                topic.as_bytes(),
                                None,
                                &stamped(pace.payload_len),
                            );
                        }
                        stream.lock().await.write_all(&buf).await?;
                        Ok(())
                    }
                })
                .await
            })
        })
        .collect();
    finish(start, tasks).await
}

/// Runs `send(n)` until the deadline: batches of [`BATCH`] when unpaced, or every millisecond
/// whatever the rate says is due. Returns the number of messages sent.
async fn pace_loop<F, Fut>(
    start: Instant,
    pace: Pace,
    rate: Option<u64>,
    mut send: F,
) -> Result<u64, BenchError>
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = Result<(), BenchError>>,
{
    let deadline = start + pace.duration;
    let mut sent = 0u64;
    match rate {
        None => {
            while Instant::now() < deadline {
                send(BATCH as u64).await?;
                sent += BATCH as u64;
            }
        }
        Some(rate) => {
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tick.tick().await;
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                let n = due(rate, now - start).saturating_sub(sent);
                if n > 0 {
                    send(n).await?;
                    sent += n;
                }
            }
        }
    }
    Ok(sent)
}

async fn finish(
    start: Instant,
    tasks: Vec<JoinHandle<Result<u64, BenchError>>>,
) -> Result<Published, BenchError> {
    let mut sent = 0;
    for t in tasks {
        sent += t.await.map_err(|e| BenchError::Worker(e.to_string()))??;
    }
    Ok(Published {
        sent,
        elapsed_s: start.elapsed().as_secs_f64(),
    })
}

/// An MQTT connection after CONNACK (keepalive off: benchmark connections are short-lived).
pub async fn mqtt_client(addr: SocketAddr, client_id: &str) -> Result<TcpStream, BenchError> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let mut buf = BytesMut::new();
    mqtt::connect(&mut buf, client_id, 0);
    stream.write_all(&buf).await?;
    buf.clear();
    loop {
        if let Some(p) = mqtt::decode(&mut buf).map_err(|e| BenchError::Protocol(e.to_string()))? {
            return match p {
                mqtt::Packet::ConnAck(0) => Ok(stream),
                other => Err(BenchError::Protocol(format!(
                    "MQTT CONNECT answered {other:?}"
                ))),
            };
        }
        buf.reserve(256);
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(BenchError::Protocol("broker closed during CONNECT".into()));
        }
    }
}

/// Counts messages (and their latency) arriving at a service.
pub struct Sink {
    count: Arc<AtomicU64>,
    latency: Arc<Histogram>,
    task: JoinHandle<()>,
}

impl Sink {
    /// Messages received so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Latency histogram; `reset` empties it.
    pub fn latency(&self, reset: bool) -> Sparse {
        self.latency.snapshot(reset)
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn record(count: &AtomicU64, latency: &Histogram, payload: &[u8]) {
    count.fetch_add(1, Ordering::Relaxed);
    if let Some(sent) = stamp(payload) {
        latency.record(unix_ns().saturating_sub(sent));
    }
}

/// A NATS subscriber on `subject`, registered with the server when this returns.
pub async fn nats_sink(url: &str, subject: &str) -> Result<Sink, BenchError> {
    let client = nats_connect(url, "bench-sink").await?;
    let mut sub = client
        .subscribe(subject.to_owned())
        .await
        .map_err(|e| BenchError::Nats(e.to_string()))?;
    client
        .flush()
        .await
        .map_err(|e| BenchError::Nats(e.to_string()))?;
    let count = Arc::new(AtomicU64::new(0));
    let latency = Arc::new(Histogram::default());
    let (c, l) = (count.clone(), latency.clone());
    let task = tokio::spawn(async move {
        let _client = client;
        while let Some(msg) = sub.next().await {
            record(&c, &l, &msg.payload);
        }
    });
    Ok(Sink {
        count,
        latency,
        task,
    })
}

/// One NATS connection subscribed to every subject in `subjects`, one subscription each,
/// registered with the server when this returns: what a gateway holding those devices presents
/// to NATS, without the gateway. It uses the gateway's own link, so the difference between this
/// floor and devgate's downlink is the gateway's device side, not a different NATS client.
pub async fn nats_spread_sink(url: &str, subjects: &[Subject]) -> Result<Sink, BenchError> {
    use crate::bus::link::{Link, LinkOptions, parse_servers};
    let nats = |e: &dyn std::fmt::Display| BenchError::Nats(e.to_string());
    let options = LinkOptions {
        servers: parse_servers(url).map_err(|e| nats(&e))?,
        name: "bench-spread-sink".into(),
        user: None,
        tls: None,
    };
    let link = Link::start(
        options,
        crate::metrics::Metrics::new(&mut prometheus_client::registry::Registry::default()),
    );
    let mut up = link.connected_watch();
    tokio::time::timeout(Duration::from_secs(10), up.wait_for(|c| *c))
        .await
        .map_err(|_| BenchError::Nats(format!("{url}: not connected within 10 s")))?
        .map_err(|e| nats(&e))?;
    let count = Arc::new(AtomicU64::new(0));
    let latency = Arc::new(Histogram::default());
    let mut readers = tokio::task::JoinSet::new();
    for subject in subjects.iter() {
        let mut sub = link.subscribe(subject.as_str());
        let (c, l) = (count.clone(), latency.clone());
        readers.spawn(async move {
            while let Some(msg) = sub.next().await {
                record(&c, &l, &msg.payload);
            }
        });
    }
    link.flush(Duration::from_secs(10))
        .await
        .map_err(|e| nats(&e))?;
    /// The link runs until closed; the sink's task owns it, so aborting the task closes it.
    struct Closing(Link);
    impl Drop for Closing {
        fn drop(&mut self) {
            self.0.close();
        }
    }
    let task = tokio::spawn(async move {
        let _link = Closing(link);
        while readers.join_next().await.is_some() {}
    });
    Ok(Sink {
        count,
        latency,
        task,
    })
}

/// An MQTT subscriber on `filter` (QoS 0), registered (SUBACK) when this returns.
pub async fn mqtt_sink(addr: SocketAddr, filter: &str) -> Result<Sink, BenchError> {
    let mut stream = mqtt_client(addr, "bench-sink").await?;
    let mut buf = BytesMut::new();
    mqtt::subscribe(&mut buf, 1, filter, 0);
    stream.write_all(&buf).await?;
    buf.clear();
    loop {
        if let Some(p) = mqtt::decode(&mut buf).map_err(|e| BenchError::Protocol(e.to_string()))? {
            match p {
                mqtt::Packet::SubAck(_) => break,
                other => {
                    return Err(BenchError::Protocol(format!(
                        "SUBSCRIBE answered {other:?}"
                    )));
                }
            }
        }
        buf.reserve(256);
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(BenchError::Protocol(
                "broker closed during SUBSCRIBE".into(),
            ));
        }
    }
    let count = Arc::new(AtomicU64::new(0));
    let latency = Arc::new(Histogram::default());
    let (c, l) = (count.clone(), latency.clone());
    let task = tokio::spawn(async move {
        loop {
            while let Ok(Some(p)) = mqtt::decode(&mut buf) {
                if let mqtt::Packet::Publish { payload, .. } = p {
                    record(&c, &l, &payload);
                }
            }
            if buf.capacity() - buf.len() < 16 * 1024 {
                buf.reserve(64 * 1024);
            }
            match stream.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    });
    Ok(Sink {
        count,
        latency,
        task,
    })
}

/// Result of driving bridge-api.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HttpLoad {
    /// 2xx answers.
    pub ok: u64,
    /// Other answers or failures.
    pub errors: u64,
    /// First non-2xx answer, for the report.
    pub first_error: Option<String>,
    /// Seconds spent.
    pub elapsed_s: f64,
    /// Request latency (client side), nanoseconds.
    #[serde(skip)]
    pub latency: Sparse,
}

/// `conns` keep-alive connections each sending `POST /v1/devices/{id}/messages?ack=...` back to
/// back to random devices for `duration`.
pub async fn http_downlink(
    addr: SocketAddr,
    ids: Arc<Vec<String>>,
    conns: usize,
    duration: Duration,
    ack: &'static str,
    token: Arc<String>,
) -> Result<HttpLoad, BenchError> {
    let start = Instant::now();
    let deadline = start + duration;
    let latency = Arc::new(Histogram::default());
    let mut tasks = Vec::new();
    for _ in 0..conns.max(1) {
        let ids = ids.clone();
        let token = token.clone();
        let latency = latency.clone();
        let mut conn = HttpConn::connect(addr).await?;
        tasks.push(tokio::spawn(async move {
            let auth = format!("Bearer {token}");
            let (mut ok, mut errors, mut first_error) = (0u64, 0u64, None);
            while Instant::now() < deadline {
                let id = &ids[rand::random_range(0..ids.len())];
                let path = format!("/v1/devices/{id}/messages?ack={ack}");
                let t0 = Instant::now();
                let (status, body) = conn
                    .request(
                        "POST",
                        &path,
                        &[
                            ("authorization", &auth),
                            ("content-type", "application/octet-stream"),
                        ],
                        &stamped(32),
                    )
                    .await?;
                latency.record(t0.elapsed().as_nanos() as u64);
                if (200..300).contains(&status) {
                    ok += 1;
                } else {
                    errors += 1;
                    first_error.get_or_insert_with(|| {
                        format!("{status} {}", String::from_utf8_lossy(&body))
                    });
                }
            }
            Ok::<_, BenchError>((ok, errors, first_error))
        }));
    }
    let mut out = HttpLoad::default();
    for t in tasks {
        let (ok, errors, first) = t.await.map_err(|e| BenchError::Worker(e.to_string()))??;
        out.ok += ok;
        out.errors += errors;
        if out.first_error.is_none() {
            out.first_error = first;
        }
    }
    out.elapsed_s = start.elapsed().as_secs_f64();
    out.latency = latency.snapshot(false);
    Ok(out)
}
