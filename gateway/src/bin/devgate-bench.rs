//! `devgate-bench`: load generator and side-by-side benchmark of devgate against Mosquitto.
//!
//! `devgate-bench suite` runs the whole comparison (see BENCHMARKS.md and `.ci/bench`);
//! `devgate-bench devices` holds a fleet of simulated devices against any gateway by hand;
//! `worker` and the `probe-*` commands are what the suite starts in child processes.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use devgate_gateway::bench::fleet::{Command, Fleet, FleetConfig, FleetTls, Protocol, Reply};
use devgate_gateway::bench::suite::SuiteConfig;
use devgate_gateway::bench::{probe, suite, worker};
use devgate_gateway::common::{Secret, load_config};
use serde::Serialize;

/// Load generator and benchmark suite for devgate.
#[derive(Debug, Parser)]
#[command(
    name = "devgate-bench",
    version,
    about = "Load generator and benchmark suite for devgate"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the whole comparison (devgate, Mosquitto, NATS floor) and write the results JSON.
    Suite(Box<SuiteCli>),
    /// Connect simulated devices to a gateway (or MQTT broker) and hold them.
    Devices(DevicesCli),
    /// (internal) A fleet driven over stdin/stdout by `suite`.
    #[command(hide = true)]
    Worker {
        /// Fleet configuration as JSON.
        #[arg(long)]
        fleet: String,
    },
    /// (internal) RSS per async-nats subscription.
    #[command(hide = true)]
    ProbeSubs {
        /// How many.
        #[arg(long, default_value_t = 15_000)]
        n: usize,
        /// NATS server.
        #[arg(long)]
        nats_url: String,
    },
    /// (internal) RSS per accepted tokio socket parked in a task.
    #[command(hide = true)]
    ProbeSockets {
        /// How many.
        #[arg(long, default_value_t = 8_000)]
        n: usize,
    },
}

/// Flags of `suite`; each is also a `DEVGATE_BENCH_*` env var and a TOML key.
#[derive(Debug, Parser, Serialize)]
struct SuiteCli {
    /// TOML file with any of the keys below.
    #[arg(long, env = "DEVGATE_BENCH_CONFIG")]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Directory with the release binaries [default: target/release].
    #[arg(long, env = "DEVGATE_BENCH_BIN_DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    bin_dir: Option<PathBuf>,
    /// nats-server binary.
    #[arg(long, env = "DEVGATE_BENCH_NATS_SERVER")]
    #[serde(skip_serializing_if = "Option::is_none")]
    nats_server: Option<PathBuf>,
    /// mosquitto binary [default: /usr/sbin/mosquitto].
    #[arg(long, env = "DEVGATE_BENCH_MOSQUITTO")]
    #[serde(skip_serializing_if = "Option::is_none")]
    mosquitto: Option<PathBuf>,
    /// Skip the peer.
    #[arg(long, env = "DEVGATE_BENCH_NO_PEER")]
    #[serde(skip)]
    no_peer: bool,
    /// Results JSON [default: docs/bench/results.json].
    #[arg(long, env = "DEVGATE_BENCH_OUT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    out: Option<PathBuf>,
    /// Logs and configs of the servers under test.
    #[arg(long, env = "DEVGATE_BENCH_WORK_DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    work_dir: Option<PathBuf>,
    /// Idle-session steps, comma-separated [default: 1000,5000,15000].
    #[arg(long, env = "DEVGATE_BENCH_SESSIONS", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    sessions: Option<Vec<usize>>,
    /// Load processes [default: 4].
    #[arg(long, env = "DEVGATE_BENCH_PROCS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    procs: Option<usize>,
    /// Logins in flight per load process [default: 32].
    #[arg(long, env = "DEVGATE_BENCH_CONNECT_CONCURRENCY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    connect_concurrency: Option<usize>,
    /// Throughput/latency window in ms [default: 3000].
    #[arg(long, env = "DEVGATE_BENCH_DURATION_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    duration_ms: Option<u64>,
    /// Offered rate for latency runs, msgs/s [default: 100000].
    #[arg(long, env = "DEVGATE_BENCH_LATENCY_RATE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    latency_rate: Option<u64>,
    /// Offered rates of the 32 B latency sweep, ascending, comma-separated
    /// [default: 10000,20000,30000,40000,50000,60000,80000].
    #[arg(long, env = "DEVGATE_BENCH_LATENCY_SWEEP", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    latency_sweep: Option<Vec<u64>>,
    /// Downlink payload sizes [default: 32,1024].
    #[arg(long, env = "DEVGATE_BENCH_PAYLOADS", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    payloads: Option<Vec<usize>>,
    /// Publisher connection counts [default: 1,4,16].
    #[arg(long, env = "DEVGATE_BENCH_FANIN", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    fanin: Option<Vec<usize>>,
    /// Devices sending uplink [default: 1000].
    #[arg(long, env = "DEVGATE_BENCH_UPLINK_DEVICES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    uplink_devices: Option<usize>,
    /// HTTP connections to bridge-api [default: 32].
    #[arg(long, env = "DEVGATE_BENCH_HTTP_CONNS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    http_conns: Option<usize>,
    /// Gateway processes in the scale-out run, each holding the largest sessions step; 0
    /// skips it [default: 3].
    #[arg(long, env = "DEVGATE_BENCH_SCALE_OUT_GATEWAYS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    scale_out_gateways: Option<usize>,
    /// Devices log in over TLS that the gateways terminate, with this PEM certificate (and
    /// --device-tls-key, --device-tls-ca); the peer stays plaintext.
    #[arg(long, env = "DEVGATE_BENCH_DEVICE_TLS_CERT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    device_tls_cert: Option<PathBuf>,
    /// Private key of --device-tls-cert.
    #[arg(long, env = "DEVGATE_BENCH_DEVICE_TLS_KEY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    device_tls_key: Option<PathBuf>,
    /// CA the devices trust for --device-tls-cert.
    #[arg(long, env = "DEVGATE_BENCH_DEVICE_TLS_CA")]
    #[serde(skip_serializing_if = "Option::is_none")]
    device_tls_ca: Option<PathBuf>,
    /// Name the devices check the certificate against [default: localhost].
    #[arg(long, env = "DEVGATE_BENCH_DEVICE_TLS_SERVER_NAME")]
    #[serde(skip_serializing_if = "Option::is_none")]
    device_tls_server_name: Option<String>,
}

impl SuiteCli {
    fn into_config(self) -> anyhow::Result<SuiteConfig> {
        let no_peer = self.no_peer;
        let mut config: SuiteConfig = load_config(self.config.as_deref(), &self)?;
        if no_peer {
            config.mosquitto = None;
        }
        config
            .validate()
            .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
        Ok(config)
    }
}

/// Flags of `devices`.
#[derive(Debug, Parser)]
struct DevicesCli {
    /// Gateway or broker address.
    #[arg(long, env = "DEVGATE_BENCH_GATEWAY", default_value = "127.0.0.1:7000")]
    gateway: SocketAddr,
    /// Protocol.
    #[arg(long, value_enum, default_value = "devgate")]
    protocol: Protocol,
    /// How many devices.
    #[arg(long, default_value_t = 1000)]
    devices: usize,
    /// Device ids are this prefix plus a number.
    #[arg(long, default_value = "dev-")]
    id_prefix: String,
    /// First device number.
    #[arg(long, default_value_t = 1)]
    first: usize,
    /// Source address to bind (spread big fleets over 127.0.0.x).
    #[arg(long)]
    source_ip: Option<IpAddr>,
    /// Fleet secret (the gateway's --auth-secret).
    #[arg(long, env = "DEVGATE_AUTH_SECRET", hide_env_values = true)]
    auth_secret: Option<Secret>,
    /// Logins in flight at once (keep it under the server's listen backlog, often 128).
    #[arg(long, default_value_t = 100)]
    connect_concurrency: usize,
    /// Hold the devices this long, then exit (0: until Ctrl-C).
    #[arg(long, default_value_t = 0)]
    duration_s: u64,
    /// Dial TLS (a balancer that terminates it), trusting this PEM CA bundle.
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// With --tls-ca: the name to check the certificate against [default: the --gateway IP].
    #[arg(long, requires = "tls_ca")]
    tls_server_name: Option<String>,
    /// With --tls-ca: resume TLS sessions across the fleet's logins (tickets from earlier
    /// handshakes) instead of a full handshake each.
    #[arg(long, requires = "tls_ca")]
    tls_resume: bool,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Suite(args) => {
            let config = args.into_config()?;
            multi_thread()?.block_on(suite::run(config))?;
        }
        Cmd::Worker { fleet } => {
            let config: FleetConfig = serde_json::from_str(&fleet).context("--fleet JSON")?;
            // One thread per load process: several processes share the cores, and a
            // single-threaded runtime has the cheapest wakeups.
            current_thread()?.block_on(worker::serve_stdio(config))?;
        }
        Cmd::ProbeSubs { n, nats_url } => {
            let p = current_thread()?.block_on(probe::subscriptions(&nats_url, n))?;
            println!("{}", serde_json::to_string(&p)?);
        }
        Cmd::ProbeSockets { n } => {
            let p = current_thread()?.block_on(probe::sockets(n))?;
            println!("{}", serde_json::to_string(&p)?);
        }
        Cmd::Devices(args) => current_thread()?.block_on(devices(args))?,
    }
    Ok(())
}

async fn devices(args: DevicesCli) -> anyhow::Result<()> {
    let stop = devgate_gateway::common::shutdown_on_signals();
    let mut fleet = Fleet::new(FleetConfig {
        protocol: args.protocol,
        addr: args.gateway,
        source_ip: args.source_ip,
        id_prefix: args.id_prefix,
        first: args.first,
        auth_secret: args.auth_secret,
        connect_concurrency: args.connect_concurrency,
        ping_s: 15,
        tls: args.tls_ca.map(|ca| FleetTls {
            ca,
            server_name: args
                .tls_server_name
                .unwrap_or_else(|| args.gateway.ip().to_string()),
            resume: args.tls_resume,
        }),
    });
    let reply = fleet.handle(Command::Connect { n: args.devices }).await;
    if let Reply::Connected {
        ok,
        failed,
        elapsed_ms,
        first_error,
    } = &reply
    {
        eprintln!(
            "devgate-bench: {ok} devices logged in in {:.2} s ({:.0}/s), {failed} failed{}",
            elapsed_ms / 1e3,
            *ok as f64 / (elapsed_ms / 1e3).max(1e-3),
            first_error
                .as_ref()
                .map(|e| format!(" (first: {e})"))
                .unwrap_or_default()
        );
    }
    let wait = async {
        if args.duration_s > 0 {
            tokio::time::sleep(Duration::from_secs(args.duration_s)).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        () = wait => {}
        () = stop.cancelled() => {}
    }
    if let Reply::Counters(c) = fleet.handle(Command::Counters).await {
        eprintln!(
            "devgate-bench: connected={} logins={} reconnects={} downs={}",
            c.connected, c.logins, c.reconnects, c.downs
        );
    }
    fleet.handle(Command::Quit).await;
    Ok(())
}

fn multi_thread() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

fn current_thread() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}
