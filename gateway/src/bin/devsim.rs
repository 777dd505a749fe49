//! `devsim`: simulated devices speaking protocol v1, for debugging a deployment by hand and as
//! the base of load tests. It connects N devices, keeps them alive with PINGs, optionally sends
//! UP messages, prints everything the gateway sends, acknowledges DOWNs that ask for it, and
//! reconnects after GOAWAY.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use devgate_gateway::auth::device_token;
use devgate_gateway::bus::tls::TlsFiles;
use devgate_gateway::client::{ClientError, DeviceClient, DeviceTls, into_error};
use devgate_gateway::codec::{Frame, GoAwayReason};
use devgate_gateway::common::Secret;
use tokio_util::sync::CancellationToken;

/// Simulated devices for devgate.
#[derive(Debug, Parser, Clone)]
#[command(
    name = "devsim",
    version,
    about = "Simulated devices speaking the devgate protocol"
)]
struct Args {
    /// Gateway (or load balancer) address.
    #[arg(long, env = "DEVSIM_GATEWAY", default_value = "127.0.0.1:7000")]
    gateway: SocketAddr,
    /// How many devices to connect.
    #[arg(long, default_value_t = 1)]
    devices: usize,
    /// Device ids are the prefix followed by a number.
    #[arg(long, default_value = "dev-")]
    id_prefix: String,
    /// First device number.
    #[arg(long, default_value_t = 1)]
    first: usize,
    /// Fleet secret to compute tokens (the gateway's --auth-secret).
    #[arg(long, env = "DEVGATE_AUTH_SECRET", hide_env_values = true)]
    auth_secret: Option<Secret>,
    /// Send UP with this payload every --interval-ms.
    #[arg(long)]
    send: Option<String>,
    /// How many UPs each device sends (0 = until stopped).
    #[arg(long, default_value_t = 0)]
    count: u64,
    /// Period between UPs.
    #[arg(long, default_value_t = 1000)]
    interval_ms: u64,
    /// Ask the gateway to ACK every UP (non-zero seq).
    #[arg(long)]
    ack: bool,
    /// Exit after this many seconds (0 = run until Ctrl-C).
    #[arg(long, default_value_t = 0)]
    duration_s: u64,
    /// Do not reconnect after GOAWAY or errors.
    #[arg(long)]
    no_reconnect: bool,
    /// Print only errors and a summary.
    #[arg(long)]
    quiet: bool,
    /// Connect over TLS (the balancer terminates it), trusting the system's CAs unless
    /// --tls-ca is given.
    #[arg(long)]
    tls: bool,
    /// PEM CA bundle that signs the balancer's certificate (implies --tls).
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// Name to verify the balancer's certificate against (implies --tls) [default: the
    /// --gateway IP].
    #[arg(long)]
    tls_server_name: Option<String>,
    /// PEM client certificate, for balancers that verify devices (with --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

impl Args {
    /// The TLS settings when any TLS flag is given, read once for every device.
    fn device_tls(&self) -> anyhow::Result<Option<Arc<DeviceTls>>> {
        if !self.tls
            && self.tls_ca.is_none()
            && self.tls_cert.is_none()
            && self.tls_server_name.is_none()
        {
            return Ok(None);
        }
        let files = TlsFiles {
            ca: self.tls_ca.clone(),
            client: self.tls_cert.clone().zip(self.tls_key.clone()),
        };
        let name = self
            .tls_server_name
            .clone()
            .unwrap_or_else(|| self.gateway.ip().to_string());
        Ok(Some(Arc::new(DeviceTls::new(&files, &name)?)))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let stop = devgate_gateway::common::shutdown_on_signals();
    if args.duration_s > 0 {
        let stop = stop.clone();
        let d = Duration::from_secs(args.duration_s);
        tokio::spawn(async move {
            tokio::time::sleep(d).await;
            stop.cancel();
        });
    }
    let tls = args.device_tls().context("TLS settings")?;
    let mut tasks = tokio::task::JoinSet::new();
    for n in args.first..args.first + args.devices {
        let id = format!("{}{n}", args.id_prefix);
        tasks.spawn(run_device(args.clone(), tls.clone(), id, stop.clone()));
    }
    let (mut ok, mut failed) = (0, 0);
    while let Some(res) = tasks.join_next().await {
        match res.context("device task")? {
            Ok(()) => ok += 1,
            Err(e) => {
                failed += 1;
                eprintln!("{e:#}");
            }
        }
    }
    eprintln!("devsim: {ok} devices finished cleanly, {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}

async fn run_device(
    args: Args,
    tls: Option<Arc<DeviceTls>>,
    id: String,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let token = args
        .auth_secret
        .as_ref()
        .map(|s| device_token(s, &id))
        .unwrap_or_default();
    let mut sent = 0u64;
    let mut backoff = Duration::from_millis(200);
    loop {
        let connect = DeviceClient::connect_over(args.gateway, tls.as_deref(), &id, &token);
        let (mut dev, welcome) = tokio::select! {
            r = connect => match r {
                Ok(ok) => ok,
                Err(e) if args.no_reconnect => return Err(e).with_context(|| format!("[{id}] login")),
                Err(e) => {
                    eprintln!("[{id}] login failed: {e}; retrying in {backoff:?}");
                    tokio::select! { () = tokio::time::sleep(backoff) => {}, () = stop.cancelled() => return Ok(()) }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    continue;
                }
            },
            () = stop.cancelled() => return Ok(()),
        };
        backoff = Duration::from_millis(200);
        if !args.quiet {
            println!(
                "[{id}] WELCOME session={} gateway={} heartbeat={}s",
                welcome.session, welcome.gateway, welcome.heartbeat_s
            );
        }
        let heartbeat = Duration::from_secs(welcome.heartbeat_s.max(1)) / 2;
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
        let mut send = tokio::time::interval(Duration::from_millis(args.interval_ms.max(1)));
        let sending = args.send.is_some();
        let outcome: Result<(), ClientError> = loop {
            tokio::select! {
                () = stop.cancelled() => return Ok(()),
                frame = dev.next_frame() => match frame {
                    Ok(Some(Frame::Down { seq, payload })) => {
                        if !args.quiet {
                            println!("[{id}] DOWN seq={seq} {}", show(&payload));
                        }
                        if seq != 0
                            && let Err(e) = dev.ack(seq).await
                        {
                            break Err(e);
                        }
                    }
                    Ok(Some(Frame::Ack(seq))) => if !args.quiet { println!("[{id}] ACK seq={seq}") },
                    Ok(Some(Frame::Pong(_))) => {}
                    Ok(Some(other)) => break Err(into_error(other)),
                    Ok(None) => break Err(ClientError::Closed),
                    Err(e) => break Err(e),
                },
                _ = ping.tick() => if let Err(e) = dev.send(Frame::Ping(Bytes::new())).await { break Err(e) },
                _ = send.tick(), if sending && (args.count == 0 || sent < args.count) => {
                    sent += 1;
                    let seq = if args.ack { (sent % u64::from(u32::MAX)) as u32 } else { 0 };
                    let payload = args.send.clone().unwrap_or_default();
                    if let Err(e) = dev.send_up(seq, payload).await {
                        break Err(e);
                    }
                    if args.count > 0 && sent >= args.count && !args.ack && args.duration_s == 0 {
                        return Ok(());
                    }
                }
            }
        };
        let delay = match &outcome {
            Err(ClientError::GoAway(g)) if g.reason == GoAwayReason::Replaced => {
                // Another connection logged in with this id. Reconnecting would take the id
                // back and the two would replace each other for ever (docs/protocol.md:
                // back off on `replaced`); a simulator simply lets the newer one have it.
                println!(
                    "[{id}] GOAWAY replaced: another connection uses this id; not reconnecting"
                );
                return Ok(());
            }
            Err(ClientError::GoAway(g)) => {
                println!(
                    "[{id}] GOAWAY {} reconnect_after_ms={}",
                    g.reason.as_str(),
                    g.reconnect_after_ms
                );
                Duration::from_millis(g.reconnect_after_ms)
            }
            Err(e) => {
                eprintln!("[{id}] session ended: {e}");
                backoff
            }
            Ok(()) => backoff,
        };
        if args.no_reconnect {
            return outcome.with_context(|| format!("[{id}] session"));
        }
        tokio::select! { () = tokio::time::sleep(delay) => {}, () = stop.cancelled() => return Ok(()) }
    }
}

/// Payload as text when it is UTF-8, else hex.
fn show(payload: &[u8]) -> String {
    match std::str::from_utf8(payload) {
        Ok(s) => format!("{s:?}"),
        Err(_) => format!("0x{}", hex::encode(payload)),
    }
}
