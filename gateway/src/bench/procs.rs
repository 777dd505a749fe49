//! The servers under test as child processes, and readings of their resource use.
//!
//! Every child is started with `kill_on_drop`, so whatever happens to the orchestrator the
//! servers it started go away with it; nothing here ever targets a non-loopback address.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::bench::BenchError;
use crate::bench::http::HttpConn;

/// Resident set size of a process in bytes (`VmRSS`), `None` if it is gone.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status_kib(&status, "VmRSS:").map(|k| k * 1024)
}

/// This process's resident set size in bytes.
pub fn self_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status_kib(&status, "VmRSS:").map(|k| k * 1024)
}

fn status_kib(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// CPU time (user + system) a process has used, in seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// Kernel memory of all TCP sockets, bytes (`/proc/net/sockstat` `TCP: ... mem <pages>`).
pub fn tcp_kernel_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/net/sockstat").ok()?;
    let line = s.lines().find(|l| l.starts_with("TCP:"))?;
    let mut it = line.split_whitespace();
    while let Some(w) = it.next() {
        if w == "mem" {
            return it.next()?.parse::<u64>().ok().map(|p| p * 4096);
        }
    }
    None
}

/// A free loopback port (bound and released; good enough on a quiet machine).
pub fn free_port() -> Result<u16, BenchError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// A running server.
pub struct Server {
    /// Short name for messages.
    pub name: String,
    child: Child,
}

impl Server {
    /// Starts `program args...` with `env`; stdout is discarded, stderr goes to `log`.
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(&str, &str)],
        log: &Path,
    ) -> Result<Server, BenchError> {
        let log = std::fs::File::create(log)?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .map_err(|e| BenchError::Setup(format!("cannot start {}: {e}", program.display())))?;
        Ok(Server {
            name: name.to_owned(),
            child,
        })
    }

    /// Process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Resident set size now.
    pub fn rss(&self) -> u64 {
        self.pid().and_then(rss_bytes).unwrap_or(0)
    }

    /// CPU seconds used so far.
    pub fn cpu(&self) -> f64 {
        self.pid().and_then(cpu_seconds).unwrap_or(0.0)
    }

    /// SIGKILL and reap: a crash, as far as clients can tell.
    pub async fn kill(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

/// Waits until `addr` accepts TCP connections.
pub async fn wait_port(addr: SocketAddr, timeout: Duration) -> Result<(), BenchError> {
    let deadline = Instant::now() + timeout;
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(BenchError::Setup(format!(
                "{addr} did not open within {timeout:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until `GET path` on `addr` answers 200 (e.g. `/readyz`).
pub async fn wait_http_ok(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<(), BenchError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(mut c) = HttpConn::connect(addr).await
            && let Ok((200, _)) = c.request("GET", path, &[], b"").await
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(BenchError::Setup(format!(
                "http://{addr}{path} not ready within {timeout:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A mosquitto configuration for the peer: loopback only, anonymous, no persistence, no
/// logging, TCP_NODELAY like the gateway, and no per-client queue limits that would make it
/// drop where devgate does not.
pub fn write_mosquitto_conf(dir: &Path, port: u16) -> Result<PathBuf, BenchError> {
    let path = dir.join("mosquitto.conf");
    std::fs::write(
        &path,
        format!(
            "listener {port} 127.0.0.1\n\
             allow_anonymous true\n\
             persistence false\n\
             log_dest stderr\n\
             log_type error\n\
             set_tcp_nodelay true\n\
             max_keepalive 65535\n\
             max_queued_messages 0\n\
             max_inflight_messages 0\n\
             sys_interval 0\n\
             user root\n"
        ),
    )?;
    Ok(path)
}
