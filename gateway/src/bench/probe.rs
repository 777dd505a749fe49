//! Memory probes that split the gateway's per-session cost into its parts.
//!
//! The gateway's RSS slope says what one idle session costs in total; these probes, each run
//! in a fresh child process, measure the parts in isolation so the remainder can be attributed
//! to the session task itself: one async-nats subscription, and one accepted tokio socket
//! parked in a minimal task. Kernel socket memory is not in any RSS and is read separately.

use std::time::Duration;

use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::bench::BenchError;
use crate::bench::procs::{self_rss_bytes, tcp_kernel_bytes};

/// What a probe measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Probe {
    /// What was created.
    pub what: String,
    /// How many.
    pub n: usize,
    /// RSS before and after, bytes.
    pub rss_before: u64,
    /// RSS after creating them.
    pub rss_after: u64,
    /// (after - before) / n.
    pub bytes_each: f64,
    /// Kernel TCP memory per connection (socket probe only), bytes.
    pub kernel_bytes_each: Option<f64>,
    /// `size_of::<async_nats::Message>()` (the element type of a subscription's channel).
    pub message_size: usize,
}

async fn settle() {
    tokio::time::sleep(Duration::from_millis(300)).await;
}

/// `n` subscriptions on one NATS connection, held like sessions hold theirs.
pub async fn subscriptions(url: &str, n: usize) -> Result<Probe, BenchError> {
    let client = async_nats::connect(url)
        .await
        .map_err(|e| BenchError::Nats(e.to_string()))?;
    // Warm the client (first subscription allocates shared structures).
    let mut warm = client
        .subscribe("probe.warm")
        .await
        .map_err(|e| BenchError::Nats(e.to_string()))?;
    let _ = futures::FutureExt::now_or_never(warm.next());
    settle().await;
    let rss_before = self_rss_bytes().unwrap_or(0);
    let mut subs = Vec::with_capacity(n);
    for i in 0..n {
        subs.push(
            client
                .subscribe(format!("device.probe-{i}.down"))
                .await
                .map_err(|e| BenchError::Nats(e.to_string()))?,
        );
    }
    client
        .flush()
        .await
        .map_err(|e| BenchError::Nats(e.to_string()))?;
    settle().await;
    let rss_after = self_rss_bytes().unwrap_or(0);
    drop(subs);
    Ok(Probe {
        what: "async-nats subscription".into(),
        n,
        rss_before,
        rss_after,
        bytes_each: (rss_after.saturating_sub(rss_before)) as f64 / n.max(1) as f64,
        kernel_bytes_each: None,
        message_size: std::mem::size_of::<async_nats::Message>(),
    })
}

/// `n` accepted loopback connections, each parked in a task waiting for readability (the
/// client ends are plain std sockets: no heap memory of their own).
pub async fn sockets(n: usize) -> Result<Probe, BenchError> {
    // Batches stay under the listen backlog: the client side connects with blocking calls on
    // this very thread, so a dropped SYN would stall the probe for a retransmit timeout.
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))?;
    let listener = socket.listen(1024)?;
    let addr = listener.local_addr()?;
    settle().await;
    let rss_before = self_rss_bytes().unwrap_or(0);
    let kernel_before = tcp_kernel_bytes().unwrap_or(0);
    let mut clients = Vec::with_capacity(n);
    let mut tasks = Vec::with_capacity(n);
    let mut left = n;
    while left > 0 {
        let batch = left.min(64);
        for _ in 0..batch {
            clients.push(std::net::TcpStream::connect(addr)?);
        }
        for _ in 0..batch {
            let (stream, _) = listener.accept().await?;
            tasks.push(tokio::spawn(async move {
                loop {
                    if stream.readable().await.is_err() {
                        return;
                    }
                    let mut b = [0u8; 1];
                    match stream.try_read(&mut b) {
                        Ok(0) => return,
                        Ok(_) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(_) => return,
                    }
                }
            }));
        }
        left -= batch;
    }
    settle().await;
    let rss_after = self_rss_bytes().unwrap_or(0);
    let kernel_after = tcp_kernel_bytes().unwrap_or(0);
    for t in &tasks {
        t.abort();
    }
    drop(clients);
    Ok(Probe {
        what: "tokio socket + parked task".into(),
        n,
        rss_before,
        rss_after,
        bytes_each: (rss_after.saturating_sub(rss_before)) as f64 / n.max(1) as f64,
        // Both ends of each loopback connection live in this kernel: half is the server's.
        kernel_bytes_each: Some(
            kernel_after.saturating_sub(kernel_before) as f64 / (2 * n.max(1)) as f64,
        ),
        message_size: std::mem::size_of::<async_nats::Message>(),
    })
}
