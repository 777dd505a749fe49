//! bridge-api configuration: one typed struct, filled from defaults, an optional TOML file, env
//! vars and flags (in rising precedence), then validated as a whole before anything starts.
//! Same pattern as the gateway's, so an operator configures both the same way.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use devgate_gateway::codec::DEFAULT_MAX_FRAME_LEN;
use devgate_gateway::common::{ConfigError, LogFormat, Secret, Validate, load_validated};
use serde::{Deserialize, Serialize};

/// Largest `timeout_ms` a caller may ask for: long enough for a sleepy device to ACK, short
/// enough that a forgotten request does not hold a connection for ever.
pub const MAX_TIMEOUT_MS: u64 = 60_000;

/// Everything bridge-api can be told. Field names are the config-file keys; each is also a
/// `--flag` and a `DEVGATE_*` env var (see [`Cli`]).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// HTTP listener (API and `/healthz`, `/readyz`, `/metrics`).
    pub listen: SocketAddr,
    /// NATS server URL(s), comma-separated.
    pub nats_url: String,
    /// NATS user (with `nats_password`), for servers with accounts.
    pub nats_user: Option<String>,
    /// NATS password.
    pub nats_password: Option<Secret>,
    /// PEM CAs that sign the NATS server's certificate, for TLS (`tls://` URLs or a server that
    /// requires TLS); default: the system's CAs.
    pub nats_tls_ca: Option<PathBuf>,
    /// PEM client certificate (with `nats_tls_key`), for NATS servers that verify clients.
    pub nats_tls_cert: Option<PathBuf>,
    /// PEM private key of `nats_tls_cert`.
    pub nats_tls_key: Option<PathBuf>,
    /// Accepted bearer tokens; several allow rotating a token without downtime.
    pub api_tokens: Vec<Secret>,
    /// Bearer tokens that may only read (GET: presence, listings, tails): what a dashboard or
    /// a monitoring job needs, without the power to message or disconnect devices.
    pub api_read_tokens: Vec<Secret>,
    /// Serve `/v1` without authentication. Only for local runs; logged loudly.
    pub insecure_no_auth: bool,
    /// The gateways' `max_frame_len`; payloads longer than this minus
    /// the DOWN frame overhead ([`devgate_gateway::codec::max_down_payload_len`]) are refused with 413 before NATS is touched.
    pub max_frame_len: usize,
    /// `timeout_ms` used when a request gives none.
    pub default_timeout_ms: u64,
    /// Hard cap on any request's handling time, whatever `timeout_ms` says (SSE streams excepted,
    /// they end when the client leaves).
    pub request_timeout_ms: u64,
    /// Most device ids in one `POST /v1/messages`.
    pub bulk_max_devices: usize,
    /// Most deliveries of one bulk request in flight at once.
    pub bulk_concurrency: usize,
    /// How long a scatter request (`devgate.gateways.stats`) collects answers when not every
    /// announced instance has answered yet.
    pub scatter_window_ms: u64,
    /// Events buffered per SSE client. Once the buffer is full, further (newest) events are
    /// dropped and counted, never the buffered ones, and the client is told with a `lagged`
    /// event: NATS must never wait for a slow HTTP reader.
    pub sse_buffer: usize,
    /// Bytes buffered per SSE client (NATS wire size of the buffered messages: payload, headers,
    /// subject), on top of the `sse_buffer` message bound: 256 buffered 64 KiB uplinks would hold
    /// 16 MiB per slow client. Full means the same drop-and-`lagged` policy. Must hold the largest
    /// uplink (`max_frame_len` + [`TAIL_ENVELOPE_SLACK`]) so an empty buffer admits any message.
    pub tail_buffer_bytes: usize,
    /// Most SSE tails open at once, every kind together, of which read-only tokens may hold
    /// half (rounded down, at least 1); one more is refused with 429 `too_many_tails`. With
    /// `tail_buffer_bytes` this bounds the tails' memory (`max_tails` × `tail_buffer_bytes`).
    pub max_tails: usize,
    /// Most `-` (every-device) tails open at once, within `max_tails`: each carries the whole
    /// fleet's uplink through this process, so far fewer are allowed than single-device tails.
    pub max_wildcard_tails: usize,
    /// Log format.
    pub log_format: LogFormat,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            nats_url: "nats://127.0.0.1:4222".into(),
            nats_user: None,
            nats_password: None,
            nats_tls_ca: None,
            nats_tls_cert: None,
            nats_tls_key: None,
            api_tokens: Vec::new(),
            api_read_tokens: Vec::new(),
            insecure_no_auth: false,
            max_frame_len: DEFAULT_MAX_FRAME_LEN,
            default_timeout_ms: 5_000,
            request_timeout_ms: MAX_TIMEOUT_MS + 5_000,
            bulk_max_devices: 1_000,
            bulk_concurrency: 64,
            scatter_window_ms: 300,
            sse_buffer: 256,
            tail_buffer_bytes: 1 << 20,
            max_tails: 64,
            max_wildcard_tails: 4,
            log_format: LogFormat::Text,
        }
    }
}

/// Same bounds as the gateway's `max_frame_len`, so a value the gateway refuses is refused here.
const FRAME_LEN_RANGE: std::ops::RangeInclusive<usize> = 64..=(1 << 20) - 4096;

/// Room for an uplink's subject and headers on top of its frame, in the smallest accepted
/// `tail_buffer_bytes`.
pub const TAIL_ENVELOPE_SLACK: usize = 4096;

/// Largest accepted `max_tails`: far beyond what one process should stream (each tail is a
/// connection and a NATS subscription), and it keeps the count well inside what a semaphore holds.
pub const MAX_TAILS_LIMIT: usize = 65_536;

/// Shortest accepted API token: a bearer token is the only thing standing between the internet
/// and every device, so it must not be guessable.
pub const MIN_TOKEN_LEN: usize = 16;

devgate_gateway::impl_nats_tls_settings!(Config);

impl Validate for Config {
    /// Checks the values together; every problem is reported, not just the first.
    fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        let no_tokens = self.api_tokens.is_empty() && self.api_read_tokens.is_empty();
        match (no_tokens, self.insecure_no_auth) {
            (true, false) => problems.push(
                "callers must authenticate: set --api-token (DEVGATE_API_TOKEN), or pass \
                 --insecure-no-auth to serve the API without authentication"
                    .to_owned(),
            ),
            (false, true) => problems.push(
                "--api-token / --api-read-token and --insecure-no-auth contradict each other; \
                 choose one"
                    .to_owned(),
            ),
            _ => {}
        }
        for (flag, tokens) in [
            ("--api-token", &self.api_tokens),
            ("--api-read-token", &self.api_read_tokens),
        ] {
            if tokens.iter().any(|t| t.expose().len() < MIN_TOKEN_LEN) {
                problems.push(format!(
                    "every {flag} must be at least {MIN_TOKEN_LEN} characters"
                ));
            }
            // A presented token is read without surrounding whitespace (HTTP strips it
            // anyway), so a configured one with such whitespace could never match. Refused
            // rather than trimmed: a secret is used exactly as given, or not at all.
            if tokens.iter().any(|t| t.expose().trim() != t.expose()) {
                problems.push(format!(
                    "an {flag} begins or ends with whitespace (a stray newline or a space after \
                     a comma?), so no caller could ever present it; remove the whitespace"
                ));
            }
        }
        // Which grant would such a token carry? Refused instead of guessed.
        if self
            .api_read_tokens
            .iter()
            .any(|r| self.api_tokens.iter().any(|t| t.expose() == r.expose()))
        {
            problems.push(
                "a token is both an --api-token and an --api-read-token; give the reader its own"
                    .to_owned(),
            );
        }
        if !FRAME_LEN_RANGE.contains(&self.max_frame_len) {
            problems.push(format!(
                "max_frame_len {} is outside {}..={}",
                self.max_frame_len,
                FRAME_LEN_RANGE.start(),
                FRAME_LEN_RANGE.end()
            ));
        }
        if self.default_timeout_ms == 0 || self.default_timeout_ms > MAX_TIMEOUT_MS {
            problems.push(format!(
                "default_timeout_ms must be within 1..={MAX_TIMEOUT_MS}"
            ));
        }
        if self.request_timeout_ms <= self.default_timeout_ms {
            problems.push(format!(
                "request_timeout_ms {} must exceed default_timeout_ms {}",
                self.request_timeout_ms, self.default_timeout_ms
            ));
        }
        for (name, value) in [
            ("bulk_max_devices", self.bulk_max_devices as u64),
            ("bulk_concurrency", self.bulk_concurrency as u64),
            ("scatter_window_ms", self.scatter_window_ms),
            ("sse_buffer", self.sse_buffer as u64),
            ("max_tails", self.max_tails as u64),
            ("max_wildcard_tails", self.max_wildcard_tails as u64),
        ] {
            if value == 0 {
                problems.push(format!("{name} must be greater than 0"));
            }
        }
        if self.max_tails > MAX_TAILS_LIMIT {
            problems.push(format!(
                "max_tails {} exceeds {MAX_TAILS_LIMIT}",
                self.max_tails
            ));
        }
        if self.max_wildcard_tails > self.max_tails {
            problems.push(format!(
                "max_wildcard_tails {} exceeds max_tails {} (a `-` tail also counts as a tail)",
                self.max_wildcard_tails, self.max_tails
            ));
        }
        let smallest_tail_buffer = self.max_frame_len.saturating_add(TAIL_ENVELOPE_SLACK);
        if self.tail_buffer_bytes < smallest_tail_buffer {
            problems.push(format!(
                "tail_buffer_bytes {} is below max_frame_len + {TAIL_ENVELOPE_SLACK} = \
                 {smallest_tail_buffer}: the largest uplink would never fit and always be dropped",
                self.tail_buffer_bytes
            ));
        }
        if self.nats_password.is_some() != self.nats_user.is_some() {
            problems.push("nats_user and nats_password go together".to_owned());
        }
        if let Err(e) = devgate_gateway::bus::tls::NatsTlsSettings::nats_tls_checked(self) {
            problems.push(e);
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems.join("; ")))
        }
    }
}

impl Config {
    /// Largest payload one DOWN frame can carry.
    pub fn max_payload_len(&self) -> usize {
        devgate_gateway::codec::max_down_payload_len(self.max_frame_len)
    }

    /// `default_timeout_ms` as a duration.
    pub fn default_timeout(&self) -> Duration {
        Duration::from_millis(self.default_timeout_ms)
    }

    /// `request_timeout_ms` as a duration.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    /// `scatter_window_ms` as a duration.
    pub fn scatter_window(&self) -> Duration {
        Duration::from_millis(self.scatter_window_ms)
    }

    /// How long before the request cap a bulk send stops waiting for deliveries: enough time
    /// left to flush and answer 200 with every device's outcome, instead of being cut off with a
    /// bare 504 that hides what was delivered. A fifth of the cap, at most one second.
    pub fn bulk_answer_margin(&self) -> Duration {
        (self.request_timeout() / 5).min(Duration::from_secs(1))
    }

    /// Largest `POST /v1/messages` body: the base64 of the largest payload plus
    /// `bulk_max_devices` ids, and some slack for the JSON around them.
    pub fn bulk_body_limit(&self) -> usize {
        self.max_payload_len().div_ceil(3) * 4
            + self.bulk_max_devices * (devgate_gateway::contract::MAX_DEVICE_ID_LEN + 4)
            + BULK_BODY_SLACK
    }
}

/// Slack on top of the payload and ids for the JSON around a bulk request's payload and ids.
const BULK_BODY_SLACK: usize = 64 * 1024;

/// Command line of `devgate-bridge-api`. Every flag is optional and also read from its
/// `DEVGATE_*` env var; whatever is given overrides the config file.
#[derive(Debug, Parser, Serialize)]
#[command(
    name = "devgate-bridge-api",
    version,
    about = "HTTP API that turns curl calls into devgate's NATS traffic"
)]
pub struct Cli {
    /// TOML config file (keys are the flag names with `_` instead of `-`; tokens: `api_tokens`,
    /// `api_read_tokens`).
    #[arg(long, env = "DEVGATE_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Print the OpenAPI document this binary serves and exit.
    #[arg(long)]
    #[serde(skip)]
    pub print_openapi: bool,
    /// HTTP listen address [default: 0.0.0.0:8080].
    #[arg(long, env = "DEVGATE_LISTEN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
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
    pub nats_tls: devgate_gateway::bus::tls::NatsTlsFlags,
    /// Accepted bearer token; repeat the flag (or separate with commas) for several.
    #[arg(
        long = "api-token",
        env = "DEVGATE_API_TOKEN",
        value_delimiter = ',',
        hide_env_values = true
    )]
    #[serde(rename = "api_tokens", skip_serializing_if = "Option::is_none")]
    pub api_tokens: Option<Vec<Secret>>,
    /// Bearer token that may only read (GET); repeat the flag (or separate with commas).
    #[arg(
        long = "api-read-token",
        env = "DEVGATE_API_READ_TOKEN",
        value_delimiter = ',',
        hide_env_values = true
    )]
    #[serde(rename = "api_read_tokens", skip_serializing_if = "Option::is_none")]
    pub api_read_tokens: Option<Vec<Secret>>,
    /// Serve the API without authentication (local runs only; logged loudly).
    #[arg(long, env = "DEVGATE_INSECURE_NO_AUTH", num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub insecure_no_auth: Option<bool>,
    /// The gateways' largest frame, in bytes [default: 65536].
    #[arg(long, env = "DEVGATE_MAX_FRAME_LEN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_frame_len: Option<usize>,
    /// `timeout_ms` when a request gives none [default: 5000].
    #[arg(long, env = "DEVGATE_DEFAULT_TIMEOUT_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_timeout_ms: Option<u64>,
    /// Cap on any request's handling time in ms [default: 65000].
    #[arg(long, env = "DEVGATE_REQUEST_TIMEOUT_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_timeout_ms: Option<u64>,
    /// Most device ids per bulk request [default: 1000].
    #[arg(long, env = "DEVGATE_BULK_MAX_DEVICES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bulk_max_devices: Option<usize>,
    /// Deliveries of one bulk request in flight at once [default: 64].
    #[arg(long, env = "DEVGATE_BULK_CONCURRENCY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bulk_concurrency: Option<usize>,
    /// How long gateway lists wait for instances to answer, ms [default: 300].
    #[arg(long, env = "DEVGATE_SCATTER_WINDOW_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scatter_window_ms: Option<u64>,
    /// Events buffered per SSE client before dropping [default: 256].
    #[arg(long, env = "DEVGATE_SSE_BUFFER")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sse_buffer: Option<usize>,
    /// Bytes buffered per SSE client before dropping [default: 1048576].
    #[arg(long, env = "DEVGATE_TAIL_BUFFER_BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tail_buffer_bytes: Option<usize>,
    /// Most SSE tails open at once, half of them (at least 1) for read-only tokens; more get
    /// 429 too_many_tails [default: 64].
    #[arg(long, env = "DEVGATE_MAX_TAILS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tails: Option<usize>,
    /// Most `-` (every-device) SSE tails open at once, within --max-tails [default: 4].
    #[arg(long, env = "DEVGATE_MAX_WILDCARD_TAILS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_wildcard_tails: Option<usize>,
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
        Cli::try_parse_from(std::iter::once("devgate-bridge-api").chain(args.iter().copied()))
            .expect("flags parse")
    }

    const TOKEN: &str = "0123456789abcdef";

    #[test]
    fn auth_is_required_unless_insecure_is_explicit() {
        let err = cli(&[]).into_config().expect_err("no token must fail");
        assert!(err.to_string().contains("--api-token"), "{err}");
        let c = cli(&["--insecure-no-auth"])
            .into_config()
            .expect("explicit insecure");
        assert!(c.insecure_no_auth && c.api_tokens.is_empty());
        let c = cli(&["--api-token", TOKEN, "--api-token", "fedcba9876543210"])
            .into_config()
            .expect("two tokens");
        assert_eq!(c.api_tokens.len(), 2);
        let err = cli(&["--api-token", TOKEN, "--insecure-no-auth"])
            .into_config()
            .expect_err("contradiction");
        assert!(err.to_string().contains("contradict"), "{err}");
    }

    #[test]
    fn read_tokens_alone_suffice_but_not_with_insecure_or_shared_with_a_full_token() {
        let c = cli(&["--api-read-token", TOKEN])
            .into_config()
            .expect("a read-only bridge is a valid bridge");
        assert_eq!((c.api_tokens.len(), c.api_read_tokens.len()), (0, 1));
        assert!(!format!("{c:?}").contains(TOKEN), "masked in Debug");
        for (args, needle) in [
            (
                &["--api-read-token", TOKEN, "--insecure-no-auth"][..],
                "contradict",
            ),
            (
                &["--api-token", TOKEN, "--api-read-token", TOKEN][..],
                "both an --api-token and an --api-read-token",
            ),
            (
                &["--api-read-token", "short"][..],
                "every --api-read-token must be at least 16",
            ),
            (
                &["--api-read-token", &format!("{TOKEN} ")][..],
                "an --api-read-token begins or ends with whitespace",
            ),
        ] {
            let err = cli(args).into_config().expect_err("refused");
            assert!(err.to_string().contains(needle), "{args:?}: {err}");
        }
    }

    #[test]
    fn defaults_match_the_gateway_frame() {
        let c = cli(&["--api-token", TOKEN]).into_config().expect("ok");
        assert_eq!(c.listen.port(), 8080);
        assert_eq!(c.max_payload_len(), 65536 - 5);
        assert_eq!(c.default_timeout_ms, 5000);
    }

    #[test]
    fn all_problems_are_reported_together() {
        let err = cli(&[
            "--api-token",
            "short",
            "--max-frame-len",
            "1",
            "--bulk-concurrency",
            "0",
            "--default-timeout-ms",
            "70000",
        ])
        .into_config()
        .expect_err("invalid");
        let msg = err.to_string();
        for needle in [
            "at least 16",
            "max_frame_len",
            "bulk_concurrency",
            "default_timeout_ms",
        ] {
            assert!(msg.contains(needle), "{needle} missing from {msg}");
        }
    }

    #[test]
    fn tokens_with_surrounding_whitespace_are_refused_not_trimmed() {
        for bad in [
            format!(" {TOKEN}"),
            format!("{TOKEN}\n"),
            format!("{TOKEN}\t"),
            format!("\r\n{TOKEN}"),
        ] {
            let err = cli(&["--api-token", &bad])
                .into_config()
                .expect_err("a token with surrounding whitespace can never match");
            let msg = err.to_string();
            assert!(msg.contains("whitespace"), "{msg}");
            assert!(!msg.contains(TOKEN), "the token must not be printed: {msg}");
        }
        // The comma-separated env form with a space after the comma is the likely way to get one.
        let err = cli(&["--api-token", &format!("{TOKEN}, fedcba9876543210")])
            .into_config()
            .expect_err("space after the comma");
        assert!(err.to_string().contains("whitespace"), "{err}");
        // Whitespace inside a token is presented unchanged, so it stays allowed.
        let c = cli(&["--api-token", "0123456789 abcdef"])
            .into_config()
            .expect("inner space");
        assert_eq!(c.api_tokens.len(), 1);
    }

    #[test]
    fn tail_limits_default_and_are_checked() {
        let c = cli(&["--api-token", TOKEN]).into_config().expect("ok");
        assert_eq!(
            (c.max_tails, c.max_wildcard_tails, c.tail_buffer_bytes),
            (64, 4, 1 << 20)
        );
        // The default buffer holds the largest uplink of the largest accepted frame.
        let c = cli(&[
            "--api-token",
            TOKEN,
            "--max-frame-len",
            &FRAME_LEN_RANGE.end().to_string(),
        ])
        .into_config()
        .expect("largest frame with the default tail buffer");
        assert_eq!(c.tail_buffer_bytes, 1 << 20);
        let err = cli(&[
            "--api-token",
            TOKEN,
            "--max-tails",
            "2",
            "--max-wildcard-tails",
            "3",
            "--tail-buffer-bytes",
            "65536",
        ])
        .into_config()
        .expect_err("invalid");
        let msg = err.to_string();
        for needle in [
            "max_wildcard_tails 3 exceeds max_tails 2",
            "tail_buffer_bytes",
        ] {
            assert!(msg.contains(needle), "{needle} missing from {msg}");
        }
        for (flag, value) in [
            ("--max-tails", "0"),
            ("--max-wildcard-tails", "0"),
            ("--max-tails", "65537"),
        ] {
            let err = cli(&["--api-token", TOKEN, flag, value])
                .into_config()
                .expect_err("out of range");
            assert!(
                err.to_string().contains(&flag[2..].replace('-', "_")),
                "{err}"
            );
        }
    }

    #[test]
    fn the_bulk_answer_margin_stays_inside_the_request_cap() {
        let c = Config::default();
        assert_eq!(c.bulk_answer_margin(), Duration::from_secs(1));
        let short = Config {
            request_timeout_ms: 500,
            ..Config::default()
        };
        assert_eq!(short.bulk_answer_margin(), Duration::from_millis(100));
    }

    #[test]
    fn file_tokens_and_flags_layer() {
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        std::io::Write::write_all(
            &mut f,
            format!("api_tokens = [\"{TOKEN}\"]\nlisten = \"127.0.0.1:9999\"\n").as_bytes(),
        )
        .expect("write");
        let path = f.path().to_str().expect("utf-8 path").to_owned();
        let c = cli(&["--config", &path, "--listen", "127.0.0.1:1234"])
            .into_config()
            .expect("loads");
        assert_eq!(c.api_tokens.len(), 1);
        assert_eq!(c.listen.port(), 1234);
        assert!(!format!("{c:?}").contains(TOKEN), "tokens must not print");
    }

    #[test]
    fn unknown_file_keys_are_refused() {
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        std::io::Write::write_all(&mut f, b"api_token = [\"x\"]\n").expect("write");
        let path = f.path().to_str().expect("utf-8 path").to_owned();
        let err = cli(&["--config", &path]).into_config().expect_err("typo");
        assert!(err.to_string().contains("api_token"), "{err}");
    }
}
