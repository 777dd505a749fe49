//! The whole comparison in one run: the NATS floor, then devgate, then Mosquitto, through the
//! same workloads with the same load processes, written to one JSON file.
//!
//! Workloads, in order, per system: idle sessions at each step of `sessions` (server RSS), a
//! connect storm from zero to the largest step, a crash-restart of the server with every
//! device reconnecting, downlink at full speed and at a fixed rate (latency), fan-in over
//! several publisher connections, uplink with and without acknowledgements, and for devgate
//! the same downlink through bridge-api's HTTP API.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_nats::Subject;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::bench::BenchError;
use crate::bench::fleet::{Command, Counters, FleetConfig, Protocol, Reply};
use crate::bench::hist::Sparse;
use crate::bench::load::{self, Pace, Sink};
use crate::bench::probe::Probe;
use crate::bench::procs::{self, Server};
use crate::bench::worker::{FleetClient, WorkerProcess, broadcast};
use crate::common::Secret;
use crate::contract::{DeviceId, subjects};

/// Everything the suite can be told; see `devgate-bench suite --help`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SuiteConfig {
    /// Directory holding `devgate-gateway`, `devgate-bridge-api` and `devgate-bench`.
    pub bin_dir: PathBuf,
    /// nats-server binary.
    pub nats_server: PathBuf,
    /// mosquitto binary; empty: skip the peer.
    pub mosquitto: Option<PathBuf>,
    /// Results file (JSON).
    pub out: PathBuf,
    /// Directory for server logs and configs.
    pub work_dir: PathBuf,
    /// Idle-session steps (cumulative); the largest is also the storm and restart size.
    pub sessions: Vec<usize>,
    /// Load processes (each binds its own 127.0.0.x source address).
    pub procs: usize,
    /// Logins in flight per load process.
    pub connect_concurrency: usize,
    /// Length of each throughput/latency window, ms.
    pub duration_ms: u64,
    /// Offered rate for the latency runs, msgs/s.
    pub latency_rate: u64,
    /// Offered rates (32 B, ascending) for the latency sweep, which finds where each system's
    /// p99 leaves the low milliseconds; a system's sweep stops at the first rate it cannot
    /// keep up with. Empty: no sweep.
    pub latency_sweep: Vec<u64>,
    /// Downlink payload sizes.
    pub payloads: Vec<usize>,
    /// Publisher connection counts for fan-in.
    pub fanin: Vec<usize>,
    /// Devices sending uplink.
    pub uplink_devices: usize,
    /// HTTP connections driving bridge-api.
    pub http_conns: usize,
    /// Gateway processes in the scale-out run (each holding the largest `sessions` step, behind
    /// one NATS); 0 skips it.
    pub scale_out_gateways: usize,
    /// PEM certificate for TLS terminated by the gateways (`--device-tls-cert`), with
    /// `device_tls_key` and `device_tls_ca`: every devgate device then logs in over TLS (full
    /// handshakes), so the figures include what TLS at the gateway costs. The peer stays
    /// plaintext: compare such a run with a plaintext one, not with Mosquitto.
    pub device_tls_cert: Option<PathBuf>,
    /// Its private key.
    pub device_tls_key: Option<PathBuf>,
    /// The CA the devices trust for it.
    pub device_tls_ca: Option<PathBuf>,
    /// The name the devices check the certificate against.
    pub device_tls_server_name: String,
}

impl Default for SuiteConfig {
    fn default() -> Self {
        SuiteConfig {
            bin_dir: PathBuf::from("target/release"),
            nats_server: PathBuf::from("nats-server"),
            mosquitto: Some(PathBuf::from("/usr/sbin/mosquitto")),
            out: PathBuf::from("docs/bench/results.json"),
            work_dir: std::env::temp_dir().join("devgate-bench"),
            sessions: vec![1_000, 5_000, 15_000],
            procs: 4,
            connect_concurrency: 32,
            duration_ms: 3_000,
            latency_rate: 100_000,
            latency_sweep: vec![10_000, 20_000, 30_000, 40_000, 50_000, 60_000, 80_000],
            payloads: vec![32, 1024],
            fanin: vec![1, 4, 16],
            uplink_devices: 1_000,
            http_conns: 32,
            scale_out_gateways: 3,
            device_tls_cert: None,
            device_tls_key: None,
            device_tls_ca: None,
            device_tls_server_name: "localhost".into(),
        }
    }
}

impl SuiteConfig {
    /// The gateway's device TLS flags, when the run is over TLS.
    fn gateway_tls_args(&self) -> Vec<String> {
        match (&self.device_tls_cert, &self.device_tls_key) {
            (Some(cert), Some(key)) => vec![
                "--device-tls-cert".into(),
                cert.display().to_string(),
                "--device-tls-key".into(),
                key.display().to_string(),
            ],
            _ => Vec::new(),
        }
    }

    /// What devgate devices use to dial a gateway of this run; `None`: plaintext.
    fn fleet_tls(&self, protocol: Protocol) -> Option<crate::bench::fleet::FleetTls> {
        if protocol != Protocol::Devgate {
            return None;
        }
        self.device_tls_ca
            .as_ref()
            .map(|ca| crate::bench::fleet::FleetTls {
                ca: ca.clone(),
                server_name: self.device_tls_server_name.clone(),
                resume: false,
            })
    }

    /// Checks the values together; every problem is reported.
    pub fn validate(&self) -> Result<(), String> {
        let mut problems = Vec::new();
        if self.sessions.is_empty() || self.sessions.windows(2).any(|w| w[0] >= w[1]) {
            problems.push("sessions must be a non-empty increasing list".to_owned());
        }
        if self.procs == 0 || self.procs > 200 {
            problems.push("procs must be 1..=200".to_owned());
        }
        let per_proc = self.sessions.last().copied().unwrap_or(0) / self.procs.max(1);
        if per_proc > 18_000 {
            problems.push(format!(
                "{per_proc} devices per load process exceed the 20,000 open-file cap; raise procs"
            ));
        }
        for (name, v) in [
            ("duration_ms", self.duration_ms),
            ("latency_rate", self.latency_rate),
            ("connect_concurrency", self.connect_concurrency as u64),
            ("uplink_devices", self.uplink_devices as u64),
            ("http_conns", self.http_conns as u64),
        ] {
            if v == 0 {
                problems.push(format!("{name} must be greater than 0"));
            }
        }
        if self.payloads.iter().any(|&p| !(8..=60_000).contains(&p)) {
            problems.push("payloads must be 8..=60000 bytes".to_owned());
        }
        if self.scale_out_gateways > MAX_SCALE_OUT {
            problems.push(format!("scale_out_gateways must be 0..={MAX_SCALE_OUT}"));
        }
        let per_scale_out_proc = self.sessions.last().copied().unwrap_or(0) / SCALE_OUT_PROCS;
        if self.scale_out_gateways > 0 && per_scale_out_proc > 18_000 {
            problems.push(format!(
                "the scale-out run would put {per_scale_out_proc} devices in one load process \
                 (over the 20,000 open-file cap); lower the largest sessions step"
            ));
        }
        if self.latency_sweep.contains(&0) || self.latency_sweep.windows(2).any(|w| w[0] >= w[1]) {
            problems.push("latency_sweep must be increasing rates > 0".to_owned());
        }
        if self.fanin.is_empty() || self.fanin.contains(&0) {
            problems.push("fanin must list connection counts > 0".to_owned());
        }
        let tls_files = [
            &self.device_tls_cert,
            &self.device_tls_key,
            &self.device_tls_ca,
        ];
        if tls_files.iter().any(|f| f.is_some()) && !tls_files.iter().all(|f| f.is_some()) {
            problems
                .push("device_tls_cert, device_tls_key and device_tls_ca go together".to_owned());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }
}

/// Throughput of one run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Throughput {
    /// Payload bytes.
    pub payload: usize,
    /// Publisher connections.
    pub conns: usize,
    /// Offered rate (None: as fast as possible).
    pub offered_rate: Option<u64>,
    /// Messages published.
    pub sent: u64,
    /// Messages that arrived.
    pub delivered: u64,
    /// delivered / (time from the first publish to the last arrival).
    pub per_s: f64,
    /// Latency percentiles, microseconds.
    pub p50_us: f64,
    /// p99.
    pub p99_us: f64,
    /// p99.9.
    pub p999_us: f64,
    /// Server CPU seconds per second of the run (1.0 = one core busy).
    pub server_cpu: f64,
}

/// One idle-session reading.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdlePoint {
    /// Connected sessions.
    pub sessions: usize,
    /// Server RSS, bytes.
    pub rss: u64,
}

/// A login storm.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Storm {
    /// Devices that logged in.
    pub ok: usize,
    /// Devices that could not.
    pub failed: usize,
    /// Seconds from the first connect to the last login.
    pub seconds: f64,
    /// ok / seconds.
    pub per_s: f64,
    /// First failure, if any.
    pub first_error: Option<String>,
}

/// Everything measured on one system.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SystemResult {
    /// `devgate` or `mosquitto`.
    pub name: String,
    /// Idle RSS readings, starting with 0 sessions.
    pub idle: Vec<IdlePoint>,
    /// Least-squares slope of RSS over sessions from the first step on, bytes per session.
    pub bytes_per_session: f64,
    /// Storms while stepping up (one per step).
    pub step_storms: Vec<Storm>,
    /// Storm from zero to the largest step.
    pub storm: Storm,
    /// Seconds from killing the server until every device was logged in again.
    pub reconnect_s: f64,
    /// Of which, seconds from the restarted server being ready.
    pub reconnect_after_ready_s: f64,
    /// Devices that reconnected.
    pub reconnected: usize,
    /// Downlink at full speed, per payload.
    pub downlink_max: Vec<Throughput>,
    /// Downlink at the fixed rate, per payload.
    pub downlink_latency: Vec<Throughput>,
    /// Downlink of 32 B at each rate of `latency_sweep`, up to the first one not sustained.
    #[serde(default)]
    pub latency_sweep: Vec<Throughput>,
    /// Downlink at full speed with 1, 4, 16 publisher connections.
    pub fanin: Vec<Throughput>,
    /// Uplink without acknowledgements.
    pub uplink: Throughput,
    /// Uplink with acknowledgements (devgate `seq`, MQTT QoS 1).
    pub uplink_acked: Throughput,
    /// Device-side counters after the acked uplink run.
    pub uplink_acks_received: u64,
    /// bridge-api: `ack=sent` and `ack=device` (devgate only).
    pub http: Vec<HttpResult>,
}

/// bridge-api figures.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HttpResult {
    /// `sent` or `device`.
    pub ack: String,
    /// HTTP connections.
    pub conns: usize,
    /// Successful requests per second.
    pub per_s: f64,
    /// Failed requests.
    pub errors: u64,
    /// First failure.
    pub first_error: Option<String>,
    /// Request latency percentiles, microseconds.
    pub p50_us: f64,
    /// p99.
    pub p99_us: f64,
    /// p99.9.
    pub p999_us: f64,
}

/// Several gateway processes behind one NATS, each holding what one process held in the main
/// run: the per-process limits (20,000 open files here) are why a fleet beyond 15k devices is
/// split over processes, and this shows what the split costs. Devices are addressed by id
/// only; the publisher does not know which gateway holds which device.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ScaleOut {
    /// Gateway processes.
    pub gateways: usize,
    /// Sessions in all.
    pub sessions: usize,
    /// Storm from zero to `sessions`, all gateways at once.
    pub storm: Storm,
    /// Each gateway's RSS before any device connected, bytes.
    pub rss_before: Vec<u64>,
    /// Each gateway's RSS with its share of the sessions, bytes.
    pub rss_after: Vec<u64>,
    /// (sum of rss_after - sum of rss_before) / sessions.
    pub bytes_per_session: f64,
    /// Downlink at full speed to random devices on any gateway, per publisher count; the CPU
    /// figure is all gateways together.
    pub downlink_max: Vec<Throughput>,
    /// Downlink at [`SCALE_OUT_LATENCY_RATE`].
    pub downlink_latency: Throughput,
}

/// Payload of the latency sweep: the latency target is for 32 B.
const SWEEP_PAYLOAD: usize = 32;
/// A rate counts as sustained when this share of it is delivered (arrivals over the time from
/// the first publish to the last arrival, so a backlog that drains late counts against it).
const SUSTAINED: f64 = 0.95;

/// Most gateway processes in the scale-out run.
const MAX_SCALE_OUT: usize = 8;
/// Load processes per gateway in the scale-out run (each on its own source address).
const SCALE_OUT_PROCS: usize = 2;
/// Offered rate of the scale-out latency run: one the main runs show this machine sustains.
pub const SCALE_OUT_LATENCY_RATE: u64 = 20_000;

/// The NATS floor: publisher to subscriber over loopback, no gateway.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Floor {
    /// Full speed, per payload.
    pub max: Vec<Throughput>,
    /// Fixed-rate latency, per payload.
    pub latency: Vec<Throughput>,
    /// Full speed to subjects picked at random among `spread_subjects`, all subscribed on one
    /// connection (one subscription each): the shape of devgate's downlink with NATS's side
    /// only, per payload with one publisher, then 32 B with each fan-in count. One subject
    /// (`max`) lets nats-server answer every lookup from its subject cache; thousands of
    /// subjects in random order do not, so this is the floor the downlink figures compare to.
    #[serde(default)]
    pub spread: Vec<Throughput>,
    /// Subjects in the spread runs (the largest session step).
    #[serde(default)]
    pub spread_subjects: usize,
}

/// The results file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Results {
    /// Where it ran.
    pub machine: Machine,
    /// With what settings.
    pub config: Option<SuiteConfig>,
    /// NATS alone.
    pub nats_floor: Floor,
    /// devgate, then the peer.
    pub systems: Vec<SystemResult>,
    /// devgate beyond one process: several gateways behind one NATS.
    #[serde(default)]
    pub scale_out: Option<ScaleOut>,
    /// Per-part memory probes.
    pub probes: Vec<Probe>,
    /// Wall time of the whole suite.
    pub total_s: f64,
}

/// The machine the numbers come from.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Machine {
    /// CPU model.
    pub cpu: String,
    /// Logical CPUs.
    pub cpus: usize,
    /// Memory, bytes.
    pub memory: u64,
    /// Kernel release.
    pub kernel: String,
    /// `nats-server --version`.
    pub nats_server: String,
    /// `mosquitto -h` first line.
    pub mosquitto: String,
    /// Open-file limit of this process.
    pub nofile: String,
    /// When (unix seconds).
    pub at_unix_s: u64,
}

fn machine(config: &SuiteConfig) -> Machine {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let first_line = |prog: &Path, arg: &str| {
        std::process::Command::new(prog)
            .arg(arg)
            .output()
            .map(|o| {
                let text = if o.stdout.is_empty() {
                    o.stderr
                } else {
                    o.stdout
                };
                String::from_utf8_lossy(&text)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_owned()
            })
            .unwrap_or_default()
    };
    Machine {
        cpu: cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|s| s.trim_start_matches([' ', '\t', ':']).to_owned())
            .unwrap_or_default(),
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        memory: read("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map_or(0, |k| k * 1024),
        kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
        nats_server: first_line(&config.nats_server, "--version"),
        mosquitto: config
            .mosquitto
            .as_deref()
            .map(|m| first_line(m, "-h"))
            .unwrap_or_default(),
        nofile: read("/proc/self/limits")
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .unwrap_or("")
            .split_whitespace()
            .skip(3)
            .take(2)
            .collect::<Vec<_>>()
            .join("/"),
        at_unix_s: crate::common::unix_ms() / 1000,
    }
}

const AUTH_SECRET: &str = "bench-fleet-secret-0123456789";
const API_TOKEN: &str = "bench-api-token-0123456789";

fn us(ns: u64) -> f64 {
    ns as f64 / 1e3
}

fn percentiles(t: &mut Throughput, h: &Sparse) {
    t.p50_us = us(h.quantile(0.5));
    t.p99_us = us(h.quantile(0.99));
    t.p999_us = us(h.quantile(0.999));
}

fn log(msg: impl AsRef<str>) {
    eprintln!("[bench {:>7.1}s] {}", uptime(), msg.as_ref());
}

fn uptime() -> f64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_secs_f64()
}

/// Runs the whole comparison and writes the results file.
pub async fn run(config: SuiteConfig) -> Result<Results, BenchError> {
    config.validate().map_err(BenchError::Setup)?;
    uptime();
    let started = Instant::now();
    std::fs::create_dir_all(&config.work_dir)?;
    let mut results = Results {
        machine: machine(&config),
        config: Some(config.clone()),
        ..Results::default()
    };

    let nats_port = procs::free_port()?;
    let nats_url = format!("nats://127.0.0.1:{nats_port}");
    let nats = Server::spawn(
        "nats-server",
        &config.nats_server,
        &[
            "-a".into(),
            "127.0.0.1".into(),
            "-p".into(),
            nats_port.to_string(),
        ],
        &[],
        &config.work_dir.join("nats-server.log"),
    )?;
    procs::wait_port(
        SocketAddr::from(([127, 0, 0, 1], nats_port)),
        Duration::from_secs(10),
    )
    .await?;

    log("probes: per-part memory");
    results.probes = run_probes(&config, &nats_url).await;

    log("NATS floor");
    results.nats_floor = floor(&config, &nats_url).await?;

    log("devgate");
    results
        .systems
        .push(run_system(&config, System::Devgate, &nats_url).await?);
    write(&config.out, &results)?;

    if config.scale_out_gateways > 0 {
        log(format!(
            "devgate scale-out: {} gateways",
            config.scale_out_gateways
        ));
        results.scale_out = Some(scale_out(&config, &nats_url).await?);
        write(&config.out, &results)?;
    }

    if let Some(mosquitto) = &config.mosquitto {
        log("mosquitto");
        results
            .systems
            .push(run_system(&config, System::Mosquitto(mosquitto.clone()), &nats_url).await?);
    }
    nats.kill().await;
    results.total_s = started.elapsed().as_secs_f64();
    write(&config.out, &results)?;
    log(format!(
        "done in {:.0} s -> {}",
        results.total_s,
        config.out.display()
    ));
    Ok(results)
}

fn write(path: &Path, results: &Results) -> Result<(), BenchError> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, serde_json::to_vec_pretty(results)?)?;
    Ok(())
}

async fn run_probes(config: &SuiteConfig, nats_url: &str) -> Vec<Probe> {
    let exe = config.bin_dir.join("devgate-bench");
    let mut out = Vec::new();
    for args in [
        vec![
            "probe-subs".to_owned(),
            "--n".into(),
            "15000".into(),
            "--nats-url".into(),
            nats_url.to_owned(),
        ],
        vec!["probe-sockets".to_owned(), "--n".into(), "8000".into()],
    ] {
        match tokio::process::Command::new(&exe)
            .args(&args)
            .output()
            .await
        {
            Ok(o) if o.status.success() => match serde_json::from_slice::<Probe>(&o.stdout) {
                Ok(p) => out.push(p),
                Err(e) => log(format!("probe {args:?}: {e}")),
            },
            Ok(o) => log(format!(
                "probe {args:?} failed: {}",
                String::from_utf8_lossy(&o.stderr)
            )),
            Err(e) => log(format!("probe {args:?}: {e}")),
        }
    }
    out
}

async fn floor(config: &SuiteConfig, nats_url: &str) -> Result<Floor, BenchError> {
    let subjects = Arc::new(vec![Subject::from("bench.floor")]);
    let mut f = Floor::default();
    for &payload in &config.payloads {
        let sink = load::nats_sink(nats_url, "bench.floor").await?;
        let pace = Pace {
            rate: None,
            duration: Duration::from_millis(config.duration_ms),
            payload_len: payload,
        };
        let start = Instant::now();
        let published = load::nats_publish(nats_url, subjects.clone(), 1, pace).await?;
        let (delivered, secs) = settle(start, || async { Ok(sink.count()) }).await?;
        f.max.push(Throughput {
            payload,
            conns: 1,
            sent: published.sent,
            delivered,
            per_s: delivered as f64 / secs,
            ..Throughput::default()
        });
        let sink = load::nats_sink(nats_url, "bench.floor").await?;
        let pace = Pace {
            rate: Some(config.latency_rate),
            ..pace
        };
        let start = Instant::now();
        let published = load::nats_publish(nats_url, subjects.clone(), 1, pace).await?;
        let (delivered, secs) = settle(start, || async { Ok(sink.count()) }).await?;
        let mut t = Throughput {
            payload,
            conns: 1,
            offered_rate: pace.rate,
            sent: published.sent,
            delivered,
            per_s: delivered as f64 / secs,
            ..Throughput::default()
        };
        percentiles(&mut t, &sink.latency(false));
        f.latency.push(t);
    }
    spread_floor(config, nats_url, &mut f).await?;
    Ok(f)
}

/// The spread runs of the floor (see [`Floor::spread`]).
async fn spread_floor(
    config: &SuiteConfig,
    nats_url: &str,
    f: &mut Floor,
) -> Result<(), BenchError> {
    f.spread_subjects = config.sessions.last().copied().unwrap_or(0);
    if f.spread_subjects == 0 {
        return Ok(());
    }
    let subjects: Arc<Vec<Subject>> = Arc::new(
        (0..f.spread_subjects)
            .map(|n| Subject::from(format!("device.floor-{n}.down")))
            .collect(),
    );
    let sink = load::nats_spread_sink(nats_url, &subjects).await?;
    let runs = config.payloads.iter().map(|&p| (p, 1)).chain(
        config
            .fanin
            .iter()
            .filter(|&&c| c > 1)
            .map(|&c| (SWEEP_PAYLOAD, c)),
    );
    for (payload, conns) in runs {
        let before = sink.count();
        let pace = Pace {
            rate: None,
            duration: Duration::from_millis(config.duration_ms),
            payload_len: payload,
        };
        let start = Instant::now();
        let published = load::nats_publish(nats_url, subjects.clone(), conns, pace).await?;
        let (arrived, secs) = settle(start, || async { Ok(sink.count()) }).await?;
        let delivered = arrived - before;
        f.spread.push(Throughput {
            payload,
            conns,
            sent: published.sent,
            delivered,
            per_s: delivered as f64 / secs,
            ..Throughput::default()
        });
    }
    Ok(())
}

/// Polls a counter until it stops moving; returns its final value and the seconds from `start`
/// to its last increase.
async fn settle<F, Fut>(start: Instant, mut read: F) -> Result<(u64, f64), BenchError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<u64, BenchError>>,
{
    let mut last = read().await?;
    let mut last_change = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && last_change.elapsed() < Duration::from_millis(400) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = read().await?;
        if now != last {
            last = now;
            last_change = Instant::now();
        }
    }
    Ok((last, (last_change - start).as_secs_f64().max(1e-3)))
}

/// Longest wait for a run's leftover backlog to reach the service.
const DRAIN_LIMIT: Duration = Duration::from_secs(120);

/// How long the count may stand still before the rest counts as lost (dropped by a broker or a
/// slow consumer) rather than still on its way.
const DRAIN_STALL: Duration = Duration::from_secs(1);

/// Waits until `read` reaches `expected` (everything sent has arrived), stops moving for
/// `stall`, or `limit` passes; returns the last count and the time waited.
///
/// A flood leaves messages in device sockets and server queues after its window closes. Unless
/// they are through, the next phase runs on a server still busy with them: that is what made
/// bridge-api look slow and time out `ack=device` requests in the HTTP phase.
async fn drain(
    read: impl Fn() -> u64,
    expected: u64,
    stall: Duration,
    limit: Duration,
) -> (u64, Duration) {
    let start = Instant::now();
    let mut last = read();
    let mut last_change = start;
    while last < expected && last_change.elapsed() < stall && start.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = read();
        if now != last {
            last = now;
            last_change = Instant::now();
        }
    }
    (last, start.elapsed())
}

/// The system under test.
enum System {
    Devgate,
    Mosquitto(PathBuf),
}

/// A started server plus what clients need to reach it.
struct Running {
    server: Server,
    addr: SocketAddr,
}

impl System {
    fn name(&self) -> &'static str {
        match self {
            System::Devgate => "devgate",
            System::Mosquitto(_) => "mosquitto",
        }
    }

    fn protocol(&self) -> Protocol {
        match self {
            System::Devgate => Protocol::Devgate,
            System::Mosquitto(_) => Protocol::Mqtt,
        }
    }

    /// Starts the server on `port` and waits until it takes logins.
    /// Starts the server on `port`; `instance` names a devgate gateway (and its log file).
    async fn start(
        &self,
        config: &SuiteConfig,
        nats_url: &str,
        port: u16,
        instance: &str,
    ) -> Result<Running, BenchError> {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        match self {
            System::Devgate => {
                let http_port = procs::free_port()?;
                let http = SocketAddr::from(([127, 0, 0, 1], http_port));
                let mut args = vec![
                    "--listen".into(),
                    addr.to_string(),
                    "--http-listen".into(),
                    http.to_string(),
                    "--nats-url".into(),
                    nats_url.to_owned(),
                    "--instance-id".into(),
                    instance.to_owned(),
                    "--auth-secret".into(),
                    AUTH_SECRET.into(),
                ];
                args.extend(config.gateway_tls_args());
                let server = Server::spawn(
                    "devgate-gateway",
                    &config.bin_dir.join("devgate-gateway"),
                    &args,
                    &[("RUST_LOG", "warn")],
                    &config.work_dir.join(format!("{instance}.log")),
                )?;
                procs::wait_http_ok(http, "/readyz", Duration::from_secs(20)).await?;
                Ok(Running { server, addr })
            }
            System::Mosquitto(bin) => {
                let conf = procs::write_mosquitto_conf(&config.work_dir, port)?;
                let server = Server::spawn(
                    "mosquitto",
                    bin,
                    &["-c".into(), conf.display().to_string()],
                    &[],
                    &config.work_dir.join("mosquitto.log"),
                )?;
                procs::wait_port(addr, Duration::from_secs(20)).await?;
                Ok(Running { server, addr })
            }
        }
    }
}

/// Which device ids each fleet holds (mirrors the fleets' own numbering).
struct Ids {
    next: Vec<usize>,
    live: Vec<Vec<String>>,
}

impl Ids {
    fn prefix(fleet: usize) -> String {
        format!("f{fleet}-")
    }

    fn connect(&mut self, fleet: usize, n: usize) {
        for k in self.next[fleet]..self.next[fleet] + n {
            self.live[fleet].push(format!("{}{k}", Self::prefix(fleet)));
        }
        self.next[fleet] += n;
    }

    fn all(&self) -> Vec<String> {
        self.live.iter().flatten().cloned().collect()
    }
}

async fn counters(fleets: &mut [FleetClient]) -> Result<Counters, BenchError> {
    let replies = broadcast(fleets, Command::Counters).await?;
    Ok(Counters::sum(replies.iter().filter_map(|r| match r {
        Reply::Counters(c) => Some(c),
        _ => None,
    })))
}

async fn stats(fleets: &mut [FleetClient], reset: bool) -> Result<(Counters, Sparse), BenchError> {
    let replies = broadcast(fleets, Command::Stats { reset }).await?;
    let mut hist = Sparse::default();
    let mut all = Vec::new();
    for r in &replies {
        if let Reply::Stats { counters, latency } = r {
            hist.merge(latency);
            all.push(*counters);
        }
    }
    Ok((Counters::sum(all.iter()), hist))
}

/// Connects `n` more devices spread evenly over the fleets.
async fn connect(fleets: &mut [FleetClient], ids: &mut Ids, n: usize) -> Result<Storm, BenchError> {
    let k = fleets.len();
    let shares: Vec<usize> = (0..k).map(|i| n / k + usize::from(i < n % k)).collect();
    for (i, &s) in shares.iter().enumerate() {
        ids.connect(i, s);
    }
    let start = Instant::now();
    let calls = fleets
        .iter_mut()
        .zip(shares)
        .map(|(f, s)| f.call(Command::Connect { n: s }));
    let replies = futures::future::join_all(calls).await;
    let seconds = start.elapsed().as_secs_f64();
    let mut storm = Storm {
        seconds,
        ..Storm::default()
    };
    for r in replies {
        if let Reply::Connected {
            ok,
            failed,
            first_error,
            ..
        } = r?
        {
            storm.ok += ok;
            storm.failed += failed;
            if storm.first_error.is_none() {
                storm.first_error = first_error;
            }
        }
    }
    storm.per_s = storm.ok as f64 / seconds.max(1e-3);
    Ok(storm)
}

/// Least-squares slope of y over x.
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let num: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let den: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    if den == 0.0 { 0.0 } else { num / den }
}

async fn run_system(
    config: &SuiteConfig,
    system: System,
    nats_url: &str,
) -> Result<SystemResult, BenchError> {
    let mut result = SystemResult {
        name: system.name().into(),
        ..SystemResult::default()
    };
    let port = procs::free_port()?;
    let mut running = system.start(config, nats_url, port, MAIN_INSTANCE).await?;
    let exe = config.bin_dir.join("devgate-bench");
    let mut fleets = Vec::new();
    for i in 0..config.procs {
        let fleet = FleetConfig {
            protocol: system.protocol(),
            addr: running.addr,
            source_ip: Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 10 + i as u8))),
            id_prefix: Ids::prefix(i),
            first: 0,
            auth_secret: Some(Secret::new(AUTH_SECRET)),
            connect_concurrency: config.connect_concurrency,
            ping_s: 15,
            tls: config.fleet_tls(system.protocol()),
        };
        fleets.push(FleetClient::Process(Box::new(WorkerProcess::spawn(
            &exe, &fleet,
        )?)));
    }
    let mut ids = Ids {
        next: vec![0; config.procs],
        live: vec![Vec::new(); config.procs],
    };

    // 1. Idle sessions, stepping up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    result.idle.push(IdlePoint {
        sessions: 0,
        rss: running.server.rss(),
    });
    let mut have = 0;
    for &step in &config.sessions {
        let storm = connect(&mut fleets, &mut ids, step - have).await?;
        log(format!(
            "{}: {} sessions ({:.0}/s, {} failed)",
            result.name, step, storm.per_s, storm.failed
        ));
        have = step;
        result.step_storms.push(storm);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        result.idle.push(IdlePoint {
            sessions: step,
            rss: running.server.rss(),
        });
    }
    let pts: Vec<(f64, f64)> = result
        .idle
        .iter()
        .skip(1)
        .map(|p| (p.sessions as f64, p.rss as f64))
        .collect();
    result.bytes_per_session = slope(&pts);

    // 2. Connect storm from zero.
    broadcast(&mut fleets, Command::Disconnect).await?;
    ids.live.iter_mut().for_each(Vec::clear);
    tokio::time::sleep(Duration::from_secs(2)).await;
    result.storm = connect(&mut fleets, &mut ids, have).await?;
    log(format!(
        "{}: storm 0 -> {}: {:.0} logins/s",
        result.name, have, result.storm.per_s
    ));

    // 3. Crash-restart and reconnect.
    let killed = Instant::now();
    running.server.kill().await;
    running = system.start(config, nats_url, port, MAIN_INSTANCE).await?;
    let ready = killed.elapsed().as_secs_f64();
    let replies = broadcast(&mut fleets, Command::WaitAll { timeout_ms: 60_000 }).await?;
    result.reconnect_s = killed.elapsed().as_secs_f64();
    result.reconnect_after_ready_s = result.reconnect_s - ready;
    result.reconnected = replies
        .iter()
        .map(|r| match r {
            Reply::AllConnected { connected, .. } => *connected,
            _ => 0,
        })
        .sum();
    log(format!(
        "{}: {} reconnected in {:.2} s",
        result.name, result.reconnected, result.reconnect_s
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;

    // 4. Downlink.
    let all_ids = ids.all();
    let publish = Publisher::new(&system, nats_url, running.addr, &all_ids);
    let duration = Duration::from_millis(config.duration_ms);
    // The sweep first, from the lowest rate: each run starts with the path's queues empty.
    for &rate in &config.latency_sweep {
        let pace = Pace {
            rate: Some(rate),
            duration,
            payload_len: SWEEP_PAYLOAD,
        };
        let t = downlink(&mut fleets, &publish, &[&running.server], 1, pace).await?;
        let sustained = t.per_s >= SUSTAINED * rate as f64;
        log(format!(
            "{}: sweep {SWEEP_PAYLOAD} B at {rate}/s: delivered {:.0}/s p50 {:.0} us p99 {:.0} us",
            result.name, t.per_s, t.p50_us, t.p99_us
        ));
        result.latency_sweep.push(t);
        if !sustained {
            break;
        }
    }
    for &payload in &config.payloads {
        // The fixed rate first: a flood at full speed leaves every queue on the path (NATS,
        // sockets, the broker) at its largest, and a latency run right after it measures that
        // aftermath rather than the path.
        let pace = Pace {
            rate: Some(config.latency_rate),
            duration,
            payload_len: payload,
        };
        let t = downlink(&mut fleets, &publish, &[&running.server], 1, pace).await?;
        log(format!(
            "{}: downlink {payload} B at {}/s: p50 {:.0} us p99 {:.0} us",
            result.name, config.latency_rate, t.p50_us, t.p99_us
        ));
        result.downlink_latency.push(t);
        let pace = Pace {
            rate: None,
            duration,
            payload_len: payload,
        };
        let t = downlink(&mut fleets, &publish, &[&running.server], 1, pace).await?;
        log(format!(
            "{}: downlink max {payload} B: {:.0}/s",
            result.name, t.per_s
        ));
        result.downlink_max.push(t);
    }
    for &conns in &config.fanin {
        let pace = Pace {
            rate: None,
            duration,
            payload_len: 32,
        };
        let t = downlink(&mut fleets, &publish, &[&running.server], conns, pace).await?;
        log(format!(
            "{}: fan-in {conns} publishers: {:.0}/s",
            result.name, t.per_s
        ));
        result.fanin.push(t);
    }

    // 5. Uplink.
    let sink = match &system {
        System::Devgate => load::nats_sink(nats_url, subjects::ALL_UP).await?,
        System::Mosquitto(_) => load::mqtt_sink(running.addr, "device/+/up").await?,
    };
    let per_fleet = config.uplink_devices.div_ceil(config.procs);
    // Acknowledged first: an unacknowledged flood can leave a broker with a backlog that would
    // otherwise delay the next run's acknowledgements.
    for acked in [true, false] {
        let before = sink.count();
        let c0 = counters(&mut fleets).await?;
        let _ = sink.latency(true);
        let cpu0 = running.server.cpu();
        let start = Instant::now();
        let replies = broadcast(
            &mut fleets,
            Command::Uplink {
                devices: per_fleet,
                duration_ms: config.duration_ms,
                acked,
                payload_len: 32,
                window: 256,
            },
        )
        .await?;
        let (count, secs) = settle(start, || async { Ok(sink.count()) }).await?;
        let c = Counters::sum(replies.iter().filter_map(|r| match r {
            Reply::UplinkDone(c) => Some(c),
            _ => None,
        }));
        let mut t = Throughput {
            payload: 32,
            conns: config.uplink_devices,
            sent: c.ups_sent - c0.ups_sent,
            delivered: count - before,
            per_s: (count - before) as f64 / secs,
            server_cpu: (running.server.cpu() - cpu0) / secs,
            ..Throughput::default()
        };
        percentiles(&mut t, &sink.latency(true));
        log(format!(
            "{}: uplink acked={acked}: {:.0}/s",
            result.name, t.per_s
        ));
        // `settle` stops measuring after at most 10 s; what is still queued must not load the
        // next run (or the HTTP phase, whose `ack=device` ACKs would queue behind it).
        let expected = before + t.sent;
        let (drained, waited) = drain(|| sink.count(), expected, DRAIN_STALL, DRAIN_LIMIT).await;
        if drained < expected || waited >= Duration::from_millis(500) {
            log(format!(
                "{}: uplink backlog: {} of {} msgs arrived, waited {:.1} s after the measurement",
                result.name,
                drained - before,
                t.sent,
                waited.as_secs_f64()
            ));
        }
        if acked {
            result.uplink_acked = t;
            result.uplink_acks_received = c.up_acks - c0.up_acks;
        } else {
            result.uplink = t;
        }
    }
    drop(sink);

    // 6. bridge-api over HTTP.
    if let System::Devgate = system {
        result.http = http_runs(config, nats_url, &all_ids, &mut fleets).await?;
    }

    broadcast(&mut fleets, Command::Quit).await.ok();
    running.server.kill().await;
    Ok(result)
}

/// The gateway of the main (single-process) runs.
const MAIN_INSTANCE: &str = "bench-gw-1";

/// The scale-out run: `scale_out_gateways` gateways behind the same NATS, each with two load
/// processes of its own, all storming at once; then idle RSS and downlink to random devices
/// wherever they are.
async fn scale_out(config: &SuiteConfig, nats_url: &str) -> Result<ScaleOut, BenchError> {
    let gateways = config.scale_out_gateways;
    let per_gateway = config.sessions.last().copied().unwrap_or(0);
    let exe = config.bin_dir.join("devgate-bench");
    let mut running = Vec::new();
    let mut fleets = Vec::new();
    for g in 0..gateways {
        let port = procs::free_port()?;
        let gw = System::Devgate
            .start(config, nats_url, port, &format!("bench-gw-scale-{g}"))
            .await?;
        for j in 0..SCALE_OUT_PROCS {
            let k = g * SCALE_OUT_PROCS + j;
            let fleet = FleetConfig {
                protocol: Protocol::Devgate,
                addr: gw.addr,
                source_ip: Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 100 + k as u8))),
                id_prefix: Ids::prefix(k),
                first: 0,
                auth_secret: Some(Secret::new(AUTH_SECRET)),
                connect_concurrency: config.connect_concurrency,
                ping_s: 15,
                tls: config.fleet_tls(Protocol::Devgate),
            };
            fleets.push(FleetClient::Process(Box::new(WorkerProcess::spawn(
                &exe, &fleet,
            )?)));
        }
        running.push(gw);
    }
    let mut ids = Ids {
        next: vec![0; fleets.len()],
        live: vec![Vec::new(); fleets.len()],
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before: Vec<u64> = running.iter().map(|r| r.server.rss()).collect();
    let storm = connect(&mut fleets, &mut ids, gateways * per_gateway).await?;
    log(format!(
        "devgate scale-out: storm 0 -> {}: {:.0} logins/s ({} failed)",
        storm.ok, storm.per_s, storm.failed
    ));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let rss_after: Vec<u64> = running.iter().map(|r| r.server.rss()).collect();
    let grown = rss_after.iter().sum::<u64>() as f64 - rss_before.iter().sum::<u64>() as f64;
    let sessions = storm.ok;

    let all_ids = ids.all();
    let publish = Publisher::new(&System::Devgate, nats_url, running[0].addr, &all_ids);
    let duration = Duration::from_millis(config.duration_ms);
    let servers: Vec<&Server> = running.iter().map(|r| &r.server).collect();
    let pace = Pace {
        rate: Some(SCALE_OUT_LATENCY_RATE),
        duration,
        payload_len: 32,
    };
    let downlink_latency = downlink(&mut fleets, &publish, &servers, 1, pace).await?;
    log(format!(
        "devgate scale-out: downlink 32 B at {SCALE_OUT_LATENCY_RATE}/s: p50 {:.0} us p99 {:.0} us",
        downlink_latency.p50_us, downlink_latency.p99_us
    ));
    let mut downlink_max = Vec::new();
    for conns in [1, 4] {
        let pace = Pace {
            rate: None,
            duration,
            payload_len: 32,
        };
        let t = downlink(&mut fleets, &publish, &servers, conns, pace).await?;
        log(format!(
            "devgate scale-out: downlink max 32 B, {conns} publisher(s): {:.0}/s",
            t.per_s
        ));
        downlink_max.push(t);
    }

    broadcast(&mut fleets, Command::Quit).await.ok();
    for r in running {
        r.server.kill().await;
    }
    Ok(ScaleOut {
        gateways,
        sessions,
        storm,
        rss_before,
        rss_after,
        bytes_per_session: grown / sessions.max(1) as f64,
        downlink_max,
        downlink_latency,
    })
}

/// How the service reaches the devices of the system under test.
enum Publisher {
    Nats {
        url: String,
        subjects: Arc<Vec<Subject>>,
    },
    Mqtt {
        addr: SocketAddr,
        topics: Arc<Vec<String>>,
    },
}

impl Publisher {
    fn new(system: &System, nats_url: &str, addr: SocketAddr, ids: &[String]) -> Publisher {
        match system {
            System::Devgate => Publisher::Nats {
                url: nats_url.to_owned(),
                subjects: Arc::new(
                    ids.iter()
                        .filter_map(|id| DeviceId::parse(id).ok())
                        .map(|id| Subject::from(subjects::down(&id)))
                        .collect(),
                ),
            },
            System::Mosquitto(_) => Publisher::Mqtt {
                addr,
                topics: Arc::new(ids.iter().map(|id| format!("device/{id}/down")).collect()),
            },
        }
    }

    async fn run(&self, conns: usize, pace: Pace) -> Result<load::Published, BenchError> {
        match self {
            Publisher::Nats { url, subjects } => {
                load::nats_publish(url, subjects.clone(), conns, pace).await
            }
            Publisher::Mqtt { addr, topics } => {
                load::mqtt_publish(*addr, topics.clone(), conns, pace).await
            }
        }
    }
}

/// One downlink run; the CPU figure is the servers' together (one gateway, or all of the
/// scale-out run's).
async fn downlink(
    fleets: &mut [FleetClient],
    publisher: &Publisher,
    servers: &[&Server],
    conns: usize,
    pace: Pace,
) -> Result<Throughput, BenchError> {
    let cpu = || servers.iter().map(|s| s.cpu()).sum::<f64>();
    let (before, _) = stats(fleets, true).await?;
    let cpu0 = cpu();
    let start = Instant::now();
    let published = publisher.run(conns, pace).await?;
    let fleets_cell = tokio::sync::Mutex::new(fleets);
    let (downs, secs) = settle(start, || async {
        let mut f = fleets_cell.lock().await;
        Ok(counters(&mut f).await?.downs)
    })
    .await?;
    let fleets = fleets_cell.into_inner();
    let (_, hist) = stats(fleets, true).await?;
    let delivered = downs - before.downs;
    let mut t = Throughput {
        payload: pace.payload_len,
        conns,
        offered_rate: pace.rate,
        sent: published.sent,
        delivered,
        per_s: delivered as f64 / secs,
        server_cpu: (cpu() - cpu0) / secs,
        ..Throughput::default()
    };
    percentiles(&mut t, &hist);
    Ok(t)
}

async fn http_runs(
    config: &SuiteConfig,
    nats_url: &str,
    ids: &[String],
    fleets: &mut [FleetClient],
) -> Result<Vec<HttpResult>, BenchError> {
    let port = procs::free_port()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let bridge = Server::spawn(
        "devgate-bridge-api",
        &config.bin_dir.join("devgate-bridge-api"),
        &[
            "--listen".into(),
            addr.to_string(),
            "--nats-url".into(),
            nats_url.to_owned(),
            "--api-token".into(),
            API_TOKEN.into(),
        ],
        &[("RUST_LOG", "warn")],
        &config.work_dir.join("bridge-api.log"),
    )?;
    procs::wait_http_ok(addr, "/readyz", Duration::from_secs(20)).await?;
    let ids = Arc::new(ids.to_vec());
    let token = Arc::new(API_TOKEN.to_owned());
    let mut out = Vec::new();
    for ack in ["sent", "device"] {
        let _ = stats(fleets, true).await?;
        let r = load::http_downlink(
            addr,
            ids.clone(),
            config.http_conns,
            Duration::from_millis(config.duration_ms),
            ack,
            token.clone(),
        )
        .await?;
        let h = HttpResult {
            ack: ack.into(),
            conns: config.http_conns,
            per_s: r.ok as f64 / r.elapsed_s,
            errors: r.errors,
            first_error: r.first_error.clone(),
            p50_us: us(r.latency.quantile(0.5)),
            p99_us: us(r.latency.quantile(0.99)),
            p999_us: us(r.latency.quantile(0.999)),
        };
        log(format!(
            "devgate: bridge-api ack={ack}: {:.0} req/s p99 {:.0} us ({} errors)",
            h.per_s, h.p99_us, h.errors
        ));
        out.push(h);
    }
    bridge.kill().await;
    Ok(out)
}

/// A short in-process run for the smoke test: `devices` devgate devices in one local fleet, one
/// second of downlink over NATS and one of uplink. Returns (downlink, uplink).
pub async fn smoke(
    gateway: SocketAddr,
    nats_url: &str,
    auth_secret: Option<Secret>,
    devices: usize,
    duration: Duration,
) -> Result<(Throughput, Throughput, Storm), BenchError> {
    let fleet = crate::bench::fleet::Fleet::new(FleetConfig {
        protocol: Protocol::Devgate,
        addr: gateway,
        source_ip: None,
        id_prefix: Ids::prefix(0),
        first: 0,
        auth_secret,
        connect_concurrency: 64,
        ping_s: 15,
        tls: None,
    });
    let mut fleets = vec![FleetClient::Local(Box::new(fleet))];
    let mut ids = Ids {
        next: vec![0],
        live: vec![Vec::new()],
    };
    let storm = connect(&mut fleets, &mut ids, devices).await?;
    let publisher = Publisher::Nats {
        url: nats_url.to_owned(),
        subjects: Arc::new(
            ids.all()
                .iter()
                .filter_map(|id| DeviceId::parse(id).ok())
                .map(|id| Subject::from(subjects::down(&id)))
                .collect(),
        ),
    };
    // The local fleet runs on this runtime; a dummy server handle reads no CPU.
    let down = downlink_local(
        &mut fleets,
        &publisher,
        Pace {
            rate: Some(2_000),
            duration,
            payload_len: 32,
        },
    )
    .await?;
    let sink: Sink = load::nats_sink(nats_url, subjects::ALL_UP).await?;
    let start = Instant::now();
    let replies = broadcast(
        &mut fleets,
        Command::Uplink {
            devices,
            duration_ms: duration.as_millis() as u64,
            acked: true,
            payload_len: 32,
            window: 16,
        },
    )
    .await?;
    let (count, secs) = settle(start, || async { Ok(sink.count()) }).await?;
    let c = Counters::sum(replies.iter().filter_map(|r| match r {
        Reply::UplinkDone(c) => Some(c),
        _ => None,
    }));
    let mut up = Throughput {
        payload: 32,
        conns: devices,
        sent: c.ups_sent,
        delivered: count,
        per_s: count as f64 / secs,
        ..Throughput::default()
    };
    percentiles(&mut up, &sink.latency(false));
    broadcast(&mut fleets, Command::Quit).await?;
    Ok((down, up, storm))
}

async fn downlink_local(
    fleets: &mut [FleetClient],
    publisher: &Publisher,
    pace: Pace,
) -> Result<Throughput, BenchError> {
    let start = Instant::now();
    let published = publisher.run(1, pace).await?;
    let fleets_cell = tokio::sync::Mutex::new(fleets);
    let (downs, secs) = settle(start, || async {
        let mut f = fleets_cell.lock().await;
        Ok(counters(&mut f).await?.downs)
    })
    .await?;
    let fleets = fleets_cell.into_inner();
    let (_, hist) = stats(fleets, true).await?;
    let mut t = Throughput {
        payload: pace.payload_len,
        conns: 1,
        offered_rate: pace.rate,
        sent: published.sent,
        delivered: downs,
        per_s: downs as f64 / secs,
        ..Throughput::default()
    };
    percentiles(&mut t, &hist);
    Ok(t)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    #[tokio::test]
    async fn drain_waits_for_a_backlog_still_arriving() {
        let count = Arc::new(AtomicU64::new(0));
        let feeder = {
            let count = count.clone();
            tokio::spawn(async move {
                for _ in 0..10 {
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    count.fetch_add(100, Ordering::Relaxed);
                }
            })
        };
        let (got, _) = drain(
            || count.load(Ordering::Relaxed),
            1_000,
            Duration::from_secs(2),
            Duration::from_secs(10),
        )
        .await;
        assert_eq!(got, 1_000, "returned before the backlog was through");
        feeder.await.expect("feeder task");
    }

    #[tokio::test]
    async fn drain_gives_up_when_the_rest_is_lost() {
        let (got, waited) = drain(
            || 7,
            1_000,
            Duration::from_millis(200),
            Duration::from_secs(10),
        )
        .await;
        assert_eq!(got, 7);
        assert!(
            waited < Duration::from_secs(5),
            "waited {waited:?} for messages that will never come"
        );
    }
}
