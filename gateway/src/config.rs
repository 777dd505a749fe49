//! Gateway configuration: one typed struct, filled from defaults, an optional TOML file, env
//! vars and flags (in rising precedence), then validated as a whole before anything starts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use serde::{Deserialize, Serialize};

use crate::auth::DeviceAuth;
use crate::common::{ConfigError, LogFormat, Secret, Validate, load_validated};
use crate::contract::validate_instance_id;

/// Everything the gateway can be told. Field names are the config-file keys; each is also a
/// `--flag` and a `DEVGATE_*` env var (see [`Cli`]).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Device TCP listener.
    pub listen: SocketAddr,
    /// Kernel accept queue of the device listener (capped by `net.core.somaxconn`). Too small
    /// a queue drops SYNs during reconnect storms and costs devices a 1 s retransmit.
    pub listen_backlog: u32,
    /// Address other components (lb-sync) use to reach the device port. Default: `listen`, with
    /// an unspecified IP replaced by the pod IP from `POD_IP` when set.
    pub advertise_addr: Option<String>,
    /// Health, readiness and metrics listener.
    pub http_listen: SocketAddr,
    /// NATS server URL(s), comma-separated.
    pub nats_url: String,
    /// NATS user (with `nats_password`), for servers with accounts.
    pub nats_user: Option<String>,
    /// NATS password.
    pub nats_password: Option<Secret>,
    /// PEM CAs that sign the NATS server's certificate, for TLS (`tls://` URLs or a server
    /// that requires TLS); default: the system's CAs.
    pub nats_tls_ca: Option<PathBuf>,
    /// PEM client certificate (with `nats_tls_key`), for servers that verify clients.
    pub nats_tls_cert: Option<PathBuf>,
    /// PEM private key of `nats_tls_cert`.
    pub nats_tls_key: Option<PathBuf>,
    /// Instance id; default: the host name (pod name), made subject-safe.
    pub instance_id: Option<String>,
    /// Fleet secret for device tokens (HMAC-SHA256 of the device id).
    pub auth_secret: Option<Secret>,
    /// The fleet secret before a rotation: its tokens are still accepted (and counted in
    /// `devgate_gateway_logins_previous_secret_total`) until every device has a token under
    /// `auth_secret`, because a fleet is never re-provisioned in one instant.
    pub auth_secret_previous: Option<Secret>,
    /// Device ids that may not log in (one per line, `#` comments): revoking a device whose
    /// token leaked must not wait for a fleet-secret rotation. Re-read when it changes; live
    /// sessions of newly listed ids are closed `unauthorized`.
    pub denied_devices_file: Option<PathBuf>,
    /// How often `denied_devices_file` is checked for changes.
    pub denied_devices_check_ms: u64,
    /// PEM certificate chain for TLS that the gateway terminates itself (with
    /// `device_tls_key`). Needed to bind client certificates to device ids
    /// (`device_tls_client_ca`); otherwise TLS at nginx (lb-sync `--tls-cert`) does as well.
    /// With it, the device listener speaks only TLS.
    pub device_tls_cert: Option<PathBuf>,
    /// PEM private key of `device_tls_cert`.
    pub device_tls_key: Option<PathBuf>,
    /// PEM CAs that issue device certificates: every device must then present one, and a
    /// login is refused unless the certificate names its id (subject CN or a DNS SAN), so a
    /// leaked token alone no longer lets anyone pose as its device.
    pub device_tls_client_ca: Option<PathBuf>,
    /// How often the device TLS files are checked for a renewal.
    pub device_tls_check_ms: u64,
    /// What authenticates a device: its token (the default; with `device_tls_client_ca` its
    /// certificate must name its id as well), or its client certificate alone, for fleets
    /// provisioned with per-device certificates and no fleet secret.
    pub device_auth: DeviceAuthMode,
    /// Logins (past the token and denylist checks) one device id may make to this gateway per
    /// `login_window_s`; more are
    /// refused `overloaded` until the window ends. Stops two clients sharing an id (a cloned
    /// device, a leaked token) from replacing each other in a loop, and firmware stuck in a
    /// reconnect loop. 0: no limit.
    pub max_logins_per_id: u32,
    /// The window of `max_logins_per_id`, in seconds.
    pub login_window_s: u64,
    /// Accept every device without a token. Only for local experiments.
    pub insecure_no_auth: bool,
    /// Largest frame (type byte + body) accepted or sent.
    pub max_frame_len: usize,
    /// Largest first frame (HELLO, type byte + body); a smaller `max_frame_len` caps it too.
    /// Far below `max_frame_len`: before HELLO the peer is unauthenticated, and this is all it
    /// can make the gateway buffer.
    pub max_hello_len: usize,
    /// A connection must send HELLO within this time.
    pub hello_timeout_ms: u64,
    /// Most connections in their handshake (PROXY header + HELLO) at once. Beyond this, new
    /// connections are refused at once with `ERROR overloaded`, so sockets that connect and say
    /// nothing cannot fill `max_connections`; welcomed sessions do not count.
    pub max_handshakes: usize,
    /// Heartbeat period told to devices; silence for 3 periods closes the session.
    pub heartbeat_s: u64,
    /// Most concurrent device connections; more are refused with `ERROR overloaded`.
    pub max_connections: usize,
    /// Bytes of downlink a session may have queued towards a slow device.
    pub session_queue_bytes: usize,
    /// Most DOWN frames awaiting a device ACK, and most UP frames awaiting NATS confirmation,
    /// per session. At the uplink limit the gateway stops reading from the device.
    pub max_inflight: usize,
    /// Uplink messages per second one session may send on average. Beyond it (after the
    /// burst) the gateway stops reading that device's socket until the allowance refills:
    /// backpressure, nothing is dropped, and other devices keep their share of the gateway.
    pub up_rate_msgs: u64,
    /// Uplink bytes (UP frames on the wire) per second one session may send on average.
    pub up_rate_bytes: u64,
    /// Burst allowance, as this many milliseconds of both rates (2000: twice the rate).
    pub up_burst_ms: u64,
    /// How long the gateway waits for a device's ACK of a DOWN before answering `timeout`.
    pub ack_timeout_ms: u64,
    /// A session whose queued downlink makes no progress this long is closed `slow_consumer`.
    pub write_timeout_ms: u64,
    /// Expect a PROXY protocol (v1 or v2) header on every connection (behind nginx).
    pub proxy_protocol: bool,
    /// With `proxy_protocol`: the peers (nginx) allowed to send a PROXY header; a connection from
    /// any other address is refused `protocol_violation`. Empty: every peer is trusted (logged
    /// as a warning at start), because nginx pod addresses are rarely known in advance.
    pub proxy_trusted_cidrs: Vec<crate::proxy_protocol::Cidr>,
    /// On SIGTERM, GOAWAY draining is spread over this window so devices do not reconnect at
    /// once.
    pub drain_window_ms: u64,
    /// Upper bound of the random `reconnect_after_ms` told to drained devices.
    pub drain_reconnect_jitter_ms: u64,
    /// Period of the instance announcement on NATS.
    pub announce_interval_ms: u64,
    /// How long a login waits for the previous holder to let go.
    pub claim_timeout_ms: u64,
    /// Log format.
    pub log_format: LogFormat,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([0, 0, 0, 0], 7000)),
            listen_backlog: 4096,
            advertise_addr: None,
            http_listen: SocketAddr::from(([0, 0, 0, 0], 9090)),
            nats_url: "nats://127.0.0.1:4222".into(),
            nats_user: None,
            nats_password: None,
            nats_tls_ca: None,
            nats_tls_cert: None,
            nats_tls_key: None,
            instance_id: None,
            auth_secret: None,
            auth_secret_previous: None,
            denied_devices_file: None,
            denied_devices_check_ms: 5_000,
            device_tls_cert: None,
            device_tls_key: None,
            device_tls_client_ca: None,
            device_tls_check_ms: 10_000,
            device_auth: DeviceAuthMode::Token,
            max_logins_per_id: 20,
            login_window_s: 60,
            insecure_no_auth: false,
            max_frame_len: crate::codec::DEFAULT_MAX_FRAME_LEN,
            max_hello_len: crate::codec::DEFAULT_MAX_HELLO_LEN,
            hello_timeout_ms: 10_000,
            max_handshakes: 2048,
            heartbeat_s: 30,
            max_connections: 100_000,
            session_queue_bytes: 256 * 1024,
            max_inflight: 256,
            up_rate_msgs: 1_000,
            up_rate_bytes: 1024 * 1024,
            up_burst_ms: 2_000,
            ack_timeout_ms: 30_000,
            write_timeout_ms: 30_000,
            proxy_protocol: false,
            proxy_trusted_cidrs: Vec::new(),
            drain_window_ms: 10_000,
            drain_reconnect_jitter_ms: 2_000,
            announce_interval_ms: 1_000,
            claim_timeout_ms: 3_000,
            log_format: LogFormat::Text,
        }
    }
}

/// What authenticates a device at login.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DeviceAuthMode {
    /// The HELLO token (HMAC of the id under the fleet secret), and with a client CA also a
    /// certificate naming the id.
    #[default]
    Token,
    /// A client certificate from `device_tls_client_ca` naming the id; the HELLO token is
    /// ignored.
    Certificate,
}

/// Smallest and largest accepted `max_frame_len`: room for an UP header, and well under NATS's
/// default 1 MiB `max_payload` so every accepted frame can be published.
const FRAME_LEN_RANGE: std::ops::RangeInclusive<usize> = 64..=(1 << 20) - 4096;

/// Smallest accepted `max_hello_len`: a 128-character id, a 64-digit token and the JSON around
/// them, with room for a little metadata.
const HELLO_LEN_MIN: usize = 512;

/// Longest timer setting in seconds (see `Config::validate`).
const DAY_S: u64 = 24 * 60 * 60;
/// Longest timer setting in milliseconds.
const DAY_MS: u64 = DAY_S * 1000;

crate::impl_nats_tls_settings!(Config);

impl Validate for Config {
    /// Checks the values together; every problem is reported, not just the first.
    fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        match (&self.auth_secret, self.insecure_no_auth) {
            _ if self.device_auth == DeviceAuthMode::Certificate => {
                if self.device_tls_client_ca.is_none() {
                    problems.push(
                        "device_auth=certificate needs device_tls_client_ca (with \
                         device_tls_cert and device_tls_key): the certificate is what \
                         authenticates"
                            .to_owned(),
                    );
                }
                if self.insecure_no_auth {
                    problems.push(
                        "device_auth=certificate and --insecure-no-auth contradict each other"
                            .to_owned(),
                    );
                }
                if self.auth_secret.is_some() || self.auth_secret_previous.is_some() {
                    problems.push(
                        "--auth-secret is not used with device_auth=certificate (tokens are \
                         ignored); leave it out"
                            .to_owned(),
                    );
                }
            }
            (None, false) => problems.push(
                "devices must authenticate: set --auth-secret (DEVGATE_AUTH_SECRET), or pass \
                 --insecure-no-auth to run without device authentication"
                    .to_owned(),
            ),
            (Some(_), true) => problems.push(
                "--auth-secret and --insecure-no-auth contradict each other; choose one".to_owned(),
            ),
            (Some(s), false) if s.expose().len() < 16 => {
                problems.push("--auth-secret must be at least 16 characters".to_owned())
            }
            _ => {}
        }
        if let Some(previous) = &self.auth_secret_previous
            && self.device_auth == DeviceAuthMode::Token
        {
            match &self.auth_secret {
                _ if self.insecure_no_auth => problems.push(
                    "--auth-secret-previous and --insecure-no-auth contradict each other"
                        .to_owned(),
                ),
                None => problems.push(
                    "--auth-secret-previous needs --auth-secret (the secret rotated to)".to_owned(),
                ),
                Some(current) if current.expose() == previous.expose() => problems.push(
                    "--auth-secret-previous equals --auth-secret; a rotation needs a new secret"
                        .to_owned(),
                ),
                Some(_) if previous.expose().len() < 16 => problems
                    .push("--auth-secret-previous must be at least 16 characters".to_owned()),
                Some(_) => {}
            }
        }
        if !FRAME_LEN_RANGE.contains(&self.max_frame_len) {
            problems.push(format!(
                "max_frame_len {} is outside {}..={}",
                self.max_frame_len,
                FRAME_LEN_RANGE.start(),
                FRAME_LEN_RANGE.end()
            ));
        }
        if self.max_hello_len < HELLO_LEN_MIN {
            problems.push(format!(
                "max_hello_len {} is below {HELLO_LEN_MIN}",
                self.max_hello_len
            ));
        }
        if self.session_queue_bytes < self.max_frame_len + crate::codec::HEADER_LEN {
            problems.push(format!(
                "session_queue_bytes {} must hold at least one maximum frame ({})",
                self.session_queue_bytes,
                self.max_frame_len + crate::codec::HEADER_LEN
            ));
        }
        for (name, value) in [
            ("heartbeat_s", self.heartbeat_s),
            ("hello_timeout_ms", self.hello_timeout_ms),
            ("ack_timeout_ms", self.ack_timeout_ms),
            ("write_timeout_ms", self.write_timeout_ms),
            ("announce_interval_ms", self.announce_interval_ms),
            ("claim_timeout_ms", self.claim_timeout_ms),
            ("max_connections", self.max_connections as u64),
            ("max_handshakes", self.max_handshakes as u64),
            ("max_inflight", self.max_inflight as u64),
            ("up_rate_msgs", self.up_rate_msgs),
            ("up_rate_bytes", self.up_rate_bytes),
            ("up_burst_ms", self.up_burst_ms),
            ("listen_backlog", u64::from(self.listen_backlog)),
            ("denied_devices_check_ms", self.denied_devices_check_ms),
            ("device_tls_check_ms", self.device_tls_check_ms),
            ("login_window_s", self.login_window_s),
        ] {
            if value == 0 {
                problems.push(format!("{name} must be greater than 0"));
            }
        }
        // Timers are deadlines `now + value` (the idle timeout is three heartbeats): a value
        // beyond a day is a typo, and an astronomically large one would overflow the clock.
        for (name, value, limit) in [
            ("heartbeat_s", self.heartbeat_s, DAY_S),
            ("hello_timeout_ms", self.hello_timeout_ms, DAY_MS),
            ("ack_timeout_ms", self.ack_timeout_ms, DAY_MS),
            ("write_timeout_ms", self.write_timeout_ms, DAY_MS),
            ("drain_window_ms", self.drain_window_ms, DAY_MS),
            (
                "drain_reconnect_jitter_ms",
                self.drain_reconnect_jitter_ms,
                DAY_MS,
            ),
            ("announce_interval_ms", self.announce_interval_ms, DAY_MS),
            ("claim_timeout_ms", self.claim_timeout_ms, DAY_MS),
            ("up_burst_ms", self.up_burst_ms, DAY_MS),
            (
                "denied_devices_check_ms",
                self.denied_devices_check_ms,
                DAY_MS,
            ),
            ("device_tls_check_ms", self.device_tls_check_ms, DAY_MS),
            ("login_window_s", self.login_window_s, DAY_S),
        ] {
            if value > limit {
                problems.push(format!("{name} {value} is over one day ({limit})"));
            }
        }
        if let Some(id) = &self.instance_id
            && let Err(e) = validate_instance_id(id)
        {
            problems.push(format!("instance_id {id:?}: {e}"));
        }
        if let Err(e) = crate::bus::link::parse_servers(&self.nats_url) {
            problems.push(e.to_string());
        }
        if self.nats_password.is_some() != self.nats_user.is_some() {
            problems.push("nats_user and nats_password go together".to_owned());
        }
        if let Err(e) = crate::bus::tls::NatsTlsSettings::nats_tls_checked(self) {
            problems.push(e);
        }
        if self.device_tls_cert.is_some() != self.device_tls_key.is_some() {
            problems.push("device_tls_cert and device_tls_key go together".to_owned());
        }
        if self.device_tls_client_ca.is_some() && self.device_tls_cert.is_none() {
            problems.push(
                "device_tls_client_ca needs device_tls_cert and device_tls_key (certificates \
                 are bound to device ids only where the gateway terminates TLS)"
                    .to_owned(),
            );
        }
        if let Some(files) = self.device_tls_files()
            && let Err(e) = crate::device_tls::DeviceTls::load(files)
        {
            problems.push(e.to_string());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems.join("; ")))
        }
    }
}

impl Config {
    /// The instance id: configured, or the host name made subject-safe.
    pub fn instance_id(&self) -> String {
        self.instance_id.clone().unwrap_or_else(default_instance_id)
    }

    /// The device authentication this config asks for.
    pub fn device_auth(&self) -> DeviceAuth {
        if self.device_auth == DeviceAuthMode::Certificate {
            return DeviceAuth::Certificate;
        }
        match &self.auth_secret {
            Some(secret) if !self.insecure_no_auth => DeviceAuth::Hmac {
                current: secret.clone(),
                previous: self.auth_secret_previous.clone(),
            },
            _ => DeviceAuth::Insecure,
        }
    }

    /// The address announced for the device port, given the bound listener address.
    pub fn advertise_addr(&self, bound: SocketAddr) -> String {
        if let Some(addr) = &self.advertise_addr {
            return addr.clone();
        }
        if bound.ip().is_unspecified()
            && let Ok(pod_ip) = std::env::var("POD_IP")
            && !pod_ip.is_empty()
        {
            return SocketAddr::new(pod_ip.parse().unwrap_or(bound.ip()), bound.port()).to_string();
        }
        bound.to_string()
    }

    /// The device TLS files, when the gateway terminates TLS itself.
    pub fn device_tls_files(&self) -> Option<crate::device_tls::DeviceTlsFiles> {
        let (cert, key) = self
            .device_tls_cert
            .clone()
            .zip(self.device_tls_key.clone())?;
        Some(crate::device_tls::DeviceTlsFiles {
            cert,
            key,
            client_ca: self.device_tls_client_ca.clone(),
        })
    }

    /// The first frame's limit: `max_hello_len`, capped by `max_frame_len`.
    pub fn hello_limit(&self) -> usize {
        self.max_hello_len.min(self.max_frame_len)
    }

    /// `heartbeat_s` as a duration.
    pub fn heartbeat(&self) -> Duration {
        Duration::from_secs(self.heartbeat_s)
    }
}

/// The host name with every character outside `[A-Za-z0-9_-]` replaced by `-`, so it is a valid
/// subject token.
fn default_instance_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|s| s.trim().to_owned())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "gateway".to_owned());
    let safe: String = host
        .chars()
        .take(crate::contract::MAX_DEVICE_ID_LEN)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    safe
}

/// Command line of `devgate-gateway`. Every flag is optional and also read from its `DEVGATE_*`
/// env var; whatever is given overrides the config file.
#[derive(Debug, Parser, Serialize)]
#[command(
    name = "devgate-gateway",
    version,
    about = "Device connection gateway routed over NATS"
)]
pub struct Cli {
    /// TOML config file (keys are the flag names with `_` instead of `-`).
    #[arg(long, env = "DEVGATE_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Device TCP listen address [default: 0.0.0.0:7000].
    #[arg(long, env = "DEVGATE_LISTEN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// Device listener accept queue [default: 4096].
    #[arg(long, env = "DEVGATE_LISTEN_BACKLOG")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen_backlog: Option<u32>,
    /// Address announced for the device port [default: listen address or $POD_IP].
    #[arg(long, env = "DEVGATE_ADVERTISE_ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise_addr: Option<String>,
    /// Health/readiness/metrics listen address [default: 0.0.0.0:9090].
    #[arg(long, env = "DEVGATE_HTTP_LISTEN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_listen: Option<SocketAddr>,
    /// NATS URL(s), comma-separated [default: nats://127.0.0.1:4222].
    #[arg(long, env = "DEVGATE_NATS_URL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats_url: Option<String>,
    /// NATS user.
    #[arg(long, env = "DEVGATE_NATS_USER")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats_user: Option<String>,
    /// NATS password.
    #[arg(long, env = "DEVGATE_NATS_PASSWORD", hide_env_values = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats_password: Option<Secret>,
    /// TLS to NATS.
    #[command(flatten)]
    #[serde(flatten)]
    pub nats_tls: crate::bus::tls::NatsTlsFlags,
    /// Instance id [default: host name].
    #[arg(long, env = "DEVGATE_INSTANCE_ID")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    /// Fleet secret for device tokens.
    #[arg(long, env = "DEVGATE_AUTH_SECRET", hide_env_values = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_secret: Option<Secret>,
    /// Previous fleet secret, still accepted during a rotation.
    #[arg(long, env = "DEVGATE_AUTH_SECRET_PREVIOUS", hide_env_values = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_secret_previous: Option<Secret>,
    /// File of denied device ids, one per line, re-read when it changes.
    #[arg(long, env = "DEVGATE_DENIED_DEVICES_FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub denied_devices_file: Option<PathBuf>,
    /// How often the denied-devices file is checked, in ms [default: 5000].
    #[arg(long, env = "DEVGATE_DENIED_DEVICES_CHECK_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub denied_devices_check_ms: Option<u64>,
    /// PEM certificate for TLS terminated by the gateway (with --device-tls-key).
    #[arg(long, env = "DEVGATE_DEVICE_TLS_CERT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_tls_cert: Option<PathBuf>,
    /// PEM private key of --device-tls-cert.
    #[arg(long, env = "DEVGATE_DEVICE_TLS_KEY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_tls_key: Option<PathBuf>,
    /// PEM CAs of device certificates: devices must present one naming their id.
    #[arg(long, env = "DEVGATE_DEVICE_TLS_CLIENT_CA")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_tls_client_ca: Option<PathBuf>,
    /// How often the device TLS files are checked for a renewal, in ms [default: 10000].
    #[arg(long, env = "DEVGATE_DEVICE_TLS_CHECK_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_tls_check_ms: Option<u64>,
    /// Logins one device id may make per login window; 0: no limit [default: 20].
    #[arg(long, env = "DEVGATE_MAX_LOGINS_PER_ID")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_logins_per_id: Option<u32>,
    /// The login window in seconds [default: 60].
    #[arg(long, env = "DEVGATE_LOGIN_WINDOW_S")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub login_window_s: Option<u64>,
    /// Accept devices without authentication (local experiments only; logged loudly).
    #[arg(long, env = "DEVGATE_INSECURE_NO_AUTH", num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub insecure_no_auth: Option<bool>,
    /// Largest frame accepted or sent, in bytes [default: 65536].
    #[arg(long, env = "DEVGATE_MAX_FRAME_LEN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_frame_len: Option<usize>,
    /// Largest first frame (HELLO) in bytes [default: 4096].
    #[arg(long, env = "DEVGATE_MAX_HELLO_LEN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_hello_len: Option<usize>,
    /// Most connections in their handshake at once [default: 2048].
    #[arg(long, env = "DEVGATE_MAX_HANDSHAKES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_handshakes: Option<usize>,
    /// HELLO deadline in ms [default: 10000].
    #[arg(long, env = "DEVGATE_HELLO_TIMEOUT_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hello_timeout_ms: Option<u64>,
    /// Heartbeat period in seconds [default: 30].
    #[arg(long, env = "DEVGATE_HEARTBEAT_S")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heartbeat_s: Option<u64>,
    /// Most concurrent device connections [default: 100000].
    #[arg(long, env = "DEVGATE_MAX_CONNECTIONS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    /// Downlink bytes queued per session [default: 262144].
    #[arg(long, env = "DEVGATE_SESSION_QUEUE_BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_queue_bytes: Option<usize>,
    /// Unacknowledged frames per session and direction [default: 256].
    #[arg(long, env = "DEVGATE_MAX_INFLIGHT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_inflight: Option<usize>,
    /// Uplink messages per second per session [default: 1000].
    #[arg(long, env = "DEVGATE_UP_RATE_MSGS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub up_rate_msgs: Option<u64>,
    /// Uplink bytes per second per session [default: 1048576].
    #[arg(long, env = "DEVGATE_UP_RATE_BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub up_rate_bytes: Option<u64>,
    /// Uplink burst, in ms worth of both rates [default: 2000].
    #[arg(long, env = "DEVGATE_UP_BURST_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub up_burst_ms: Option<u64>,
    /// Device ACK timeout in ms [default: 30000].
    #[arg(long, env = "DEVGATE_ACK_TIMEOUT_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ack_timeout_ms: Option<u64>,
    /// Slow-consumer write timeout in ms [default: 30000].
    #[arg(long, env = "DEVGATE_WRITE_TIMEOUT_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub write_timeout_ms: Option<u64>,
    /// Expect a PROXY protocol v1/v2 header on each connection.
    #[arg(long, env = "DEVGATE_PROXY_PROTOCOL", num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Option<bool>,
    /// Peers allowed to send a PROXY header, comma-separated CIDRs [default: all, with a warning].
    #[arg(long, env = "DEVGATE_PROXY_TRUSTED_CIDRS", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_trusted_cidrs: Option<Vec<crate::proxy_protocol::Cidr>>,
    /// Drain window on SIGTERM in ms [default: 10000].
    #[arg(long, env = "DEVGATE_DRAIN_WINDOW_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain_window_ms: Option<u64>,
    /// Max random reconnect delay told to drained devices, ms [default: 2000].
    #[arg(long, env = "DEVGATE_DRAIN_RECONNECT_JITTER_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain_reconnect_jitter_ms: Option<u64>,
    /// Announcement period in ms [default: 1000].
    #[arg(long, env = "DEVGATE_ANNOUNCE_INTERVAL_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub announce_interval_ms: Option<u64>,
    /// Takeover claim timeout in ms [default: 3000].
    #[arg(long, env = "DEVGATE_CLAIM_TIMEOUT_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub claim_timeout_ms: Option<u64>,
    /// What authenticates devices: their token, or their client certificate alone
    /// (needs --device-tls-client-ca) [default: token].
    #[arg(long, value_enum, env = "DEVGATE_DEVICE_AUTH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_auth: Option<DeviceAuthMode>,
    /// Log format [default: text].
    #[arg(long, env = "DEVGATE_LOG_FORMAT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<LogFormat>,
}

impl Cli {
    /// Layers defaults, the config file and these flags into a validated [`Config`].
    pub fn into_config(self) -> Result<Config, ConfigError> {
        load_validated(self.config.as_deref(), &self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("devgate-gateway").chain(args.iter().copied()))
            .expect("flags parse")
    }

    /// `args` fail validation with a message containing `needle`.
    fn refused<S: AsRef<str>>(args: &[S], needle: &str) {
        let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
        let err = cli(&args).into_config().expect_err(needle);
        assert!(err.to_string().contains(needle), "{needle:?} not in: {err}");
    }

    #[test]
    fn auth_is_required_unless_insecure_is_explicit() {
        let err = cli(&[]).into_config().expect_err("no auth must fail");
        assert!(err.to_string().contains("--auth-secret"), "{err}");
        let c = cli(&["--insecure-no-auth"])
            .into_config()
            .expect("explicit insecure");
        assert!(matches!(c.device_auth(), DeviceAuth::Insecure));
        let c = cli(&["--auth-secret", "0123456789abcdef"])
            .into_config()
            .expect("secret");
        assert!(matches!(
            c.device_auth(),
            DeviceAuth::Hmac { previous: None, .. }
        ));
    }

    #[test]
    fn a_previous_secret_is_accepted_only_as_part_of_a_rotation() {
        let c = cli(&[
            "--auth-secret",
            "new-secret-0123456789",
            "--auth-secret-previous",
            "old-secret-0123456789",
        ])
        .into_config()
        .expect("rotation");
        assert!(matches!(
            c.device_auth(),
            DeviceAuth::Hmac {
                previous: Some(_),
                ..
            }
        ));
        assert!(!format!("{c:?}").contains("old-secret-0123456789"));
        for (args, needle) in [
            (
                &["--auth-secret-previous", "old-secret-0123456789"][..],
                "needs --auth-secret",
            ),
            (
                &[
                    "--insecure-no-auth",
                    "--auth-secret-previous",
                    "old-secret-0123456789",
                ][..],
                "contradict",
            ),
            (
                &[
                    "--auth-secret",
                    "same-secret-0123456789",
                    "--auth-secret-previous",
                    "same-secret-0123456789",
                ][..],
                "equals --auth-secret",
            ),
            (
                &[
                    "--auth-secret",
                    "new-secret-0123456789",
                    "--auth-secret-previous",
                    "short",
                ][..],
                "--auth-secret-previous must be at least 16",
            ),
        ] {
            let err = cli(args).into_config().expect_err("refused");
            assert!(err.to_string().contains(needle), "{args:?}: {err}");
        }
    }

    #[test]
    fn all_problems_are_reported_together() {
        let err = cli(&[
            "--max-frame-len",
            "1",
            "--heartbeat-s",
            "0",
            "--instance-id",
            "a.b",
        ])
        .into_config()
        .expect_err("invalid");
        let msg = err.to_string();
        for needle in [
            "--auth-secret",
            "max_frame_len",
            "heartbeat_s",
            "instance_id",
        ] {
            assert!(msg.contains(needle), "{needle} missing from {msg}");
        }
    }

    #[test]
    fn timers_beyond_a_day_are_refused_before_they_can_overflow() {
        let err = cli(&[
            "--insecure-no-auth",
            "--heartbeat-s",
            &u64::MAX.to_string(),
            "--write-timeout-ms",
            "86400001",
        ])
        .into_config()
        .expect_err("invalid");
        let msg = err.to_string();
        assert!(
            msg.contains("heartbeat_s 18446744073709551615 is over one day"),
            "{msg}"
        );
        assert!(
            msg.contains("write_timeout_ms 86400001 is over one day"),
            "{msg}"
        );
        cli(&["--insecure-no-auth", "--heartbeat-s", "86400"])
            .into_config()
            .expect("a day is allowed");
    }

    #[test]
    fn handshake_limits_are_validated() {
        let c = cli(&["--insecure-no-auth"])
            .into_config()
            .expect("defaults");
        assert_eq!((c.max_hello_len, c.max_handshakes), (4096, 2048));
        let err = cli(&[
            "--insecure-no-auth",
            "--max-hello-len",
            "100",
            "--max-handshakes",
            "0",
        ])
        .into_config()
        .expect_err("invalid");
        let msg = err.to_string();
        assert!(msg.contains("max_hello_len 100"), "{msg}");
        assert!(
            msg.contains("max_handshakes must be greater than 0"),
            "{msg}"
        );
        // A smaller max_frame_len caps HELLO too, without having to lower max_hello_len.
        let c = cli(&["--insecure-no-auth", "--max-frame-len", "1024"])
            .into_config()
            .expect("hello limit over a small frame limit");
        assert_eq!(c.hello_limit(), 1024);
    }

    #[test]
    fn proxy_trusted_cidrs_come_from_flags_and_env_lists() {
        let c = cli(&[
            "--insecure-no-auth",
            "--proxy-trusted-cidrs",
            "10.0.0.0/8,fd00::/8",
        ])
        .into_config()
        .expect("cidrs");
        assert_eq!(c.proxy_trusted_cidrs.len(), 2);
        assert!(
            Cli::try_parse_from(["devgate-gateway", "--proxy-trusted-cidrs", "10.0.0.0/33"])
                .is_err()
        );
    }

    #[test]
    fn device_tls_files_are_checked_together_and_loaded_before_start() {
        let fixture = |name: &str| crate::device_tls::fixture(name).display().to_string();
        let (cert, key, ca) = (
            fixture("server.pem"),
            fixture("server.key"),
            fixture("ca.pem"),
        );
        let ok = cli(&[
            "--insecure-no-auth",
            "--device-tls-cert",
            &cert,
            "--device-tls-key",
            &key,
            "--device-tls-client-ca",
            &ca,
        ])
        .into_config()
        .expect("valid device TLS");
        let files = ok.device_tls_files().expect("device TLS configured");
        assert_eq!(files.client_ca.as_deref(), Some(std::path::Path::new(&ca)));
        assert!(
            cli(&["--insecure-no-auth"])
                .into_config()
                .expect("valid")
                .device_tls_files()
                .is_none()
        );

        refused(
            &["--insecure-no-auth", "--device-tls-cert", &cert],
            "device_tls_cert and device_tls_key go together",
        );
        refused(
            &["--insecure-no-auth", "--device-tls-client-ca", &ca],
            "device_tls_client_ca needs device_tls_cert",
        );
        // A key that does not match: refused at start, not at the first device's handshake.
        refused(
            &[
                "--insecure-no-auth",
                "--device-tls-cert",
                &cert,
                "--device-tls-key",
                &fixture("device.key"),
            ],
            "device_tls_cert and device_tls_key:",
        );
        refused(
            &["--insecure-no-auth", "--device-tls-check-ms", "0"],
            "device_tls_check_ms must be greater than 0",
        );
    }

    #[test]
    fn certificate_authentication_needs_a_client_ca_and_no_fleet_secret() {
        let fixture = |name: &str| crate::device_tls::fixture(name).display().to_string();
        let (cert, key, ca) = (
            fixture("server.pem"),
            fixture("server.key"),
            fixture("ca.pem"),
        );
        let tls = [
            "--device-tls-cert",
            cert.as_str(),
            "--device-tls-key",
            key.as_str(),
        ];
        let with = |extra: &[&str]| -> Vec<String> {
            tls.iter().chain(extra).map(|a| (*a).to_owned()).collect()
        };
        // Certificate authentication with its client CA, and `extra`.
        let certificate = |extra: &[&str]| -> Vec<String> {
            let auth = [
                "--device-auth",
                "certificate",
                "--device-tls-client-ca",
                &ca,
            ];
            with(&auth.iter().chain(extra).copied().collect::<Vec<_>>())
        };
        let ok = certificate(&[]);
        let ok = cli(&ok.iter().map(String::as_str).collect::<Vec<_>>())
            .into_config()
            .expect("certificates alone authenticate");
        assert!(matches!(ok.device_auth(), DeviceAuth::Certificate));

        refused(
            &with(&["--device-auth", "certificate"]),
            "device_auth=certificate needs device_tls_client_ca",
        );
        refused(
            &certificate(&["--auth-secret", "0123456789abcdef0123"]),
            "--auth-secret is not used",
        );
        refused(&certificate(&["--insecure-no-auth"]), "contradict");
        // Tokens stay the default: without a secret, the old refusal.
        refused(
            &with(&["--device-tls-client-ca", &ca]),
            "devices must authenticate",
        );
    }

    #[test]
    fn secret_is_masked_in_debug() {
        let c = cli(&["--auth-secret", "super-secret-value-123"])
            .into_config()
            .expect("ok");
        assert!(!format!("{c:?}").contains("super-secret-value-123"));
    }

    #[test]
    fn default_instance_id_is_subject_safe() {
        assert!(validate_instance_id(&default_instance_id()).is_ok());
    }
}
