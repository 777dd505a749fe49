//! lb-sync configuration: one typed struct, filled from defaults, an optional TOML file, env
//! vars and flags (in rising precedence), then validated as a whole before anything starts.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use devgate_gateway::common::{ConfigError, LogFormat, Secret, Validate, load_validated};
use serde::{Deserialize, Serialize};

use crate::endpoints::{Endpoint, parse_static_endpoint};
use crate::render::{RenderSettings, TlsSettings};
use crate::source;

/// TLS versions nginx may offer devices. Older ones are broken and not offered at all.
pub const TLS_PROTOCOLS: [&str; 2] = ["TLSv1.2", "TLSv1.3"];

/// Where the set of gateway instances comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// EndpointSlices of the gateway Service (inside Kubernetes).
    Kube,
    /// Gateway announcements on NATS (VMs, bare metal, the local stack).
    #[default]
    Nats,
    /// A fixed list from `--static-endpoints`.
    Static,
}

/// Where the rendered configuration goes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SinkKind {
    /// A key of a ConfigMap that an nginx ingress controller consumes (`stream-snippets`).
    Configmap,
    /// A file included by nginx, validated and reloaded by lb-sync.
    #[default]
    File,
}

/// Everything lb-sync can be told. Field names are the config-file keys; each is also a
/// `--flag` and a `DEVGATE_*` env var (see [`Cli`]).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where gateway instances are discovered.
    pub source: SourceKind,
    /// Where the rendered configuration is written.
    pub sink: SinkKind,
    /// Address nginx listens on for devices (the `listen` of the rendered `server` block).
    pub listen: SocketAddr,
    /// Health, readiness and metrics listener of lb-sync itself.
    pub http_listen: SocketAddr,
    /// Name of the nginx upstream (and its shared memory zone).
    pub upstream_name: String,
    /// Least size of the upstream's shared memory zone (an nginx size). lb-sync sizes the zone
    /// from the number of servers (2 KiB each, measured at most 835 bytes with nginx 1.22,
    /// rounded up to a power of two) and renders at least this. Raise it only for an nginx
    /// whose servers need more (nginx then refuses the render with `no memory in upstream
    /// zone`, and lb-sync's error names this setting), or on a system with 64k pages, where
    /// nginx wants at least 512k.
    pub upstream_zone_min_size: String,
    /// Send a PROXY protocol header to the gateways (they must run with `--proxy-protocol`).
    pub proxy_protocol: bool,
    /// nginx `proxy_timeout` in seconds; must exceed the gateway's idle timeout (3 x 30 s).
    pub proxy_timeout_s: u64,
    /// nginx `proxy_connect_timeout` in seconds.
    pub proxy_connect_timeout_s: u64,
    /// nginx `proxy_buffer_size` per direction of each device connection (an nginx size).
    pub proxy_buffer_size: String,
    /// nginx `max_fails` per server (0 disables failure accounting).
    pub max_fails: u32,
    /// nginx `fail_timeout` per server, in seconds.
    pub fail_timeout_s: u64,
    /// Changes arriving within this window after the first are applied together.
    pub debounce_ms: u64,
    /// Least time between two applies (each file-sink apply is an nginx reload).
    pub min_reload_interval_ms: u64,
    /// File sink: the file nginx includes inside `stream { }`.
    pub output: Option<PathBuf>,
    /// File sink: command that checks the configuration (split on whitespace, no shell).
    pub validate_cmd: String,
    /// File sink: command that makes nginx load the new file (split on whitespace, no shell).
    pub reload_cmd: String,
    /// File sink: a validate or reload command running longer than this is killed and failed.
    pub command_timeout_ms: u64,
    /// NATS source: server URL(s), comma-separated.
    pub nats_url: String,
    /// NATS user (with `nats_password`).
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
    /// NATS source: an instance leaves after this many announce periods without an
    /// announcement.
    pub announce_expiry_beats: u32,
    /// NATS source: the longest `announce_interval_ms` any gateway is configured with. lb-sync
    /// cannot know a gateway's interval before hearing it, and after a (re)connect it must hear
    /// every live gateway before it publishes; an interval longer than this assumption can have
    /// lb-sync publish a set without that gateway, or an empty upstream that refuses devices.
    pub announce_interval_max_ms: u64,
    /// Static source: `IP:PORT` or `IP:PORT=WEIGHT` entries.
    pub static_endpoints: Vec<String>,
    /// Kubernetes namespace of the Service, and of the ConfigMap unless `configmap_namespace`
    /// says otherwise [default: the client's namespace].
    pub kube_namespace: Option<String>,
    /// Kubernetes source: the gateway Service whose EndpointSlices are watched.
    pub kube_service: String,
    /// Kubernetes source: the EndpointSlice port name of the device port. A slice with exactly
    /// one port uses it only when that port is unnamed: a single port named otherwise (`http`,
    /// say, when the device port could not be resolved for the pods) is not the device port.
    pub kube_port_name: String,
    /// Kubernetes API URL, overriding in-cluster/kubeconfig discovery (e.g. `kubectl proxy`).
    pub kube_api_url: Option<String>,
    /// A kubeconfig file to use instead of the in-cluster service account or `$KUBECONFIG`:
    /// lb-sync run outside the cluster, against an API server that wants TLS and a token.
    pub kubeconfig: Option<PathBuf>,
    /// ConfigMap sink: the ConfigMap to write.
    pub configmap_name: Option<String>,
    /// ConfigMap sink: the data key that holds the rendered text.
    pub configmap_key: String,
    /// ConfigMap sink: the key is applied again this often even when nothing changed, so that
    /// a key someone else removed or edited is restored. Server-side apply of identical content
    /// changes nothing on the server, so the ingress controller does not reload for it.
    pub configmap_resync_ms: u64,
    /// ConfigMap sink: the ConfigMap's namespace, when it is not the Service's. An ingress
    /// controller reads its stream ConfigMap from its own namespace (often `ingress-nginx`),
    /// and the gateways usually run elsewhere [default: `kube_namespace`].
    pub configmap_namespace: Option<String>,
    /// PEM certificate chain nginx presents to devices: with `tls_key`, nginx terminates TLS
    /// on `listen`. Without, devices' TLS passes through (`tls_passthrough`) or they connect in
    /// plaintext (`insecure_plaintext`, and lb-sync warns).
    pub tls_cert: Option<PathBuf>,
    /// Private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// PEM CAs that sign device certificates: devices must present one (mutual TLS), on top of
    /// their tokens.
    pub tls_client_ca: Option<PathBuf>,
    /// With `tls_client_ca`: how many CAs may sit between a device certificate and that CA.
    pub tls_verify_depth: u32,
    /// TLS versions offered to devices (TLSv1.2, TLSv1.3).
    pub tls_protocols: Vec<String>,
    /// Seconds a device may take to complete its TLS handshake.
    pub tls_handshake_timeout_s: u64,
    /// Shared TLS session cache size (nginx size: `10m` holds about 40,000 sessions).
    pub tls_session_cache: String,
    /// Seconds a device may resume its TLS session.
    pub tls_session_timeout_s: u64,
    /// Seconds between checks of the TLS files for a renewal (nginx reloads with new files).
    pub tls_check_interval_s: u64,
    /// Accept that devices connect in plaintext (no `tls_cert`): their tokens and messages cross
    /// the network unencrypted. For a lab, or when TLS ends before nginx; it must be asked for,
    /// and lb-sync says so in its log at start.
    pub insecure_plaintext: bool,
    /// Devices' TLS ends at the gateways (their `--device-tls-cert`); nginx forwards the
    /// encrypted bytes untouched. Only a gateway can bind a device's client certificate to its
    /// device id: nginx cannot hand the certificate on, so terminating TLS there would lose it.
    pub tls_passthrough: bool,
    /// Log format.
    pub log_format: LogFormat,
}

impl Default for Config {
    fn default() -> Self {
        let r = RenderSettings::default();
        Config {
            source: SourceKind::Nats,
            sink: SinkKind::File,
            listen: r.listen,
            http_listen: SocketAddr::from(([0, 0, 0, 0], 9092)),
            upstream_name: r.upstream_name,
            upstream_zone_min_size: crate::render::nginx_size(r.zone_min_bytes),
            proxy_protocol: r.proxy_protocol,
            proxy_timeout_s: r.proxy_timeout_s,
            proxy_connect_timeout_s: r.proxy_connect_timeout_s,
            proxy_buffer_size: r.proxy_buffer_size,
            max_fails: r.max_fails,
            fail_timeout_s: r.fail_timeout_s,
            debounce_ms: 200,
            min_reload_interval_ms: 1000,
            output: None,
            validate_cmd: "nginx -t".into(),
            reload_cmd: "nginx -s reload".into(),
            command_timeout_ms: 30_000,
            nats_url: "nats://127.0.0.1:4222".into(),
            nats_user: None,
            nats_password: None,
            nats_tls_ca: None,
            nats_tls_cert: None,
            nats_tls_key: None,
            announce_expiry_beats: 3,
            announce_interval_max_ms: DEFAULT_ANNOUNCE_INTERVAL_MAX_MS,
            static_endpoints: Vec::new(),
            kube_namespace: None,
            kube_service: "devgate-gateway".into(),
            kube_port_name: "device".into(),
            kube_api_url: None,
            kubeconfig: None,
            configmap_name: None,
            configmap_key: "stream-snippets".into(),
            configmap_resync_ms: DEFAULT_CONFIGMAP_RESYNC_MS,
            configmap_namespace: None,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            tls_verify_depth: DEFAULT_VERIFY_DEPTH,
            tls_protocols: TLS_PROTOCOLS.iter().map(|p| (*p).to_owned()).collect(),
            tls_handshake_timeout_s: 15,
            tls_session_cache: "10m".into(),
            tls_session_timeout_s: 3600,
            tls_check_interval_s: 10,
            insecure_plaintext: false,
            tls_passthrough: false,
            log_format: LogFormat::Text,
        }
    }
}

/// An nginx size (digits with an optional `k` or `m` suffix) in bytes; `None` for anything
/// nginx would not parse, zero, or more digits than its parser takes.
fn nginx_size_bytes(s: &str) -> Option<u64> {
    let (digits, unit) = match s.strip_suffix(['k', 'K']) {
        Some(d) => (d, 1024),
        None => match s.strip_suffix(['m', 'M']) {
            Some(d) => (d, 1024 * 1024),
            None => (s, 1),
        },
    };
    if digits.is_empty() || digits.len() > 9 || !digits.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let bytes = digits.parse::<u64>().ok()? * unit;
    (bytes > 0).then_some(bytes)
}

fn is_nginx_size(s: &str) -> bool {
    nginx_size_bytes(s).is_some()
}

/// Assumed longest gateway announce interval: the gateway's default `announce_interval_ms`.
const DEFAULT_ANNOUNCE_INTERVAL_MAX_MS: u64 = 1000;

/// How often the ConfigMap key is re-applied unchanged: minutes of drift at most, at one cheap
/// PATCH a minute.
const DEFAULT_CONFIGMAP_RESYNC_MS: u64 = 60_000;

/// One day in ms: the bound of durations that become deadlines (`now + value`), beyond which a
/// value is a typo.
const DAY_MS: u64 = 24 * 60 * 60 * 1000;

/// CAs allowed between a device certificate and the client CA unless told otherwise: nginx's own
/// default of 1 refuses a certificate two CAs below the trusted one (tested).
const DEFAULT_VERIFY_DEPTH: u32 = 3;

/// nginx refuses a shared memory zone (the SSL session cache, the upstream zone) under 8 pages
/// ("too small"): 32k with 4k pages.
const MIN_SHARED_ZONE: u64 = 32 * 1024;
/// A bound well above any sensible zone (1m holds about 4,000 TLS sessions, or 500 upstream
/// servers as lb-sync budgets them), beyond which a value is a typo.
const MAX_SHARED_ZONE: u64 = 1024 * 1024 * 1024;

/// Whether `s` is an nginx size nginx accepts for a shared memory zone.
fn is_shared_zone_size(s: &str) -> bool {
    nginx_size_bytes(s).is_some_and(|b| (MIN_SHARED_ZONE..=MAX_SHARED_ZONE).contains(&b))
}

/// Why a device TLS file path cannot go into nginx's config as it is, if it cannot. nginx
/// resolves a relative path against its own prefix, not lb-sync's working directory (lb-sync
/// would watch one file and nginx serve another), and the path is written unquoted, where
/// whitespace, `;`, braces, `#` and quotes end or break the directive and `$` is a variable.
fn unusable_in_nginx(path: &Path) -> Option<&'static str> {
    let Some(text) = path.to_str() else {
        return Some("is not UTF-8");
    };
    if !path.is_absolute() {
        return Some("must be absolute (nginx resolves relative paths against its own prefix)");
    }
    if text
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || ";{}#$\"'\\".contains(c))
    {
        return Some("must not contain whitespace, control characters or any of ;{}#$\"'\\");
    }
    None
}

/// Kubernetes object names (DNS-1123 labels/subdomains) as far as lb-sync needs to check them.
fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && !s.starts_with(['-', '.'])
        && !s.ends_with(['-', '.'])
}

devgate_gateway::impl_nats_tls_settings!(Config);

impl Validate for Config {
    /// Checks the values together; every problem is reported, not just the first.
    fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if self.upstream_name.is_empty()
            || !self
                .upstream_name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            problems.push(format!(
                "upstream_name {:?} must be non-empty and only A-Z, a-z, 0-9, '_'",
                self.upstream_name
            ));
        }
        if !is_shared_zone_size(&self.upstream_zone_min_size) {
            problems.push(format!(
                "upstream_zone_min_size {:?} must be an nginx size from 32k to 1024m, such as 64k",
                self.upstream_zone_min_size
            ));
        }
        if !is_nginx_size(&self.proxy_buffer_size) {
            problems.push(format!(
                "proxy_buffer_size {:?} must be an nginx size such as 4k",
                self.proxy_buffer_size
            ));
        }
        if self.listen.port() == 0 {
            problems.push("listen needs a port (nginx cannot listen on port 0)".to_owned());
        }
        for (name, value) in [
            ("proxy_timeout_s", self.proxy_timeout_s),
            ("proxy_connect_timeout_s", self.proxy_connect_timeout_s),
            ("fail_timeout_s", self.fail_timeout_s),
            ("command_timeout_ms", self.command_timeout_ms),
            (
                "announce_expiry_beats",
                u64::from(self.announce_expiry_beats),
            ),
        ] {
            if value == 0 {
                problems.push(format!("{name} must be greater than 0"));
            }
        }
        match self.source {
            SourceKind::Static => {
                if self.static_endpoints.is_empty() {
                    problems.push(
                        "--source static needs --static-endpoints (IP:PORT[=WEIGHT],...)"
                            .to_owned(),
                    );
                }
                if let Err(e) = self.parsed_static_endpoints() {
                    problems.push(e);
                }
            }
            SourceKind::Nats => {
                if self.nats_url.trim().is_empty() {
                    problems.push("--source nats needs --nats-url".to_owned());
                }
                if self.nats_password.is_some() != self.nats_user.is_some() {
                    problems.push("nats_user and nats_password go together".to_owned());
                }
                let (min, max) = source::nats::HEARTBEAT_RANGE;
                let range = min.as_millis() as u64..=max.as_millis() as u64;
                if !range.contains(&self.announce_interval_max_ms) {
                    problems.push(format!(
                        "announce_interval_max_ms {} must be from {} to {} (announced intervals \
                         are clamped to that range)",
                        self.announce_interval_max_ms,
                        range.start(),
                        range.end()
                    ));
                }
            }
            SourceKind::Kube => {
                if !is_dns_name(&self.kube_service) {
                    problems.push(format!(
                        "kube_service {:?} is not a valid Service name",
                        self.kube_service
                    ));
                }
                if self.kube_port_name.is_empty() {
                    problems.push("kube_port_name must not be empty".to_owned());
                }
            }
        }
        if self.source != SourceKind::Static && !self.static_endpoints.is_empty() {
            problems.push("--static-endpoints is only used with --source static".to_owned());
        }
        match self.sink {
            SinkKind::File => {
                match &self.output {
                    None => problems.push(
                        "--sink file needs --output (the file nginx includes in stream { })"
                            .to_owned(),
                    ),
                    Some(path) => {
                        let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
                        if path.file_name().is_none() {
                            problems
                                .push(format!("--output {} is not a file path", path.display()));
                        } else if let Some(dir) = dir
                            && !dir.is_dir()
                        {
                            problems.push(format!(
                                "--output directory {} does not exist",
                                dir.display()
                            ));
                        }
                    }
                }
                for (name, cmd) in [
                    ("validate_cmd", &self.validate_cmd),
                    ("reload_cmd", &self.reload_cmd),
                ] {
                    if cmd.split_whitespace().next().is_none() {
                        problems.push(format!("{name} must not be empty"));
                    }
                }
            }
            SinkKind::Configmap => {
                match &self.configmap_name {
                    None => problems.push("--sink configmap needs --configmap-name".to_owned()),
                    Some(n) if !is_dns_name(n) => problems.push(format!(
                        "configmap_name {n:?} is not a valid ConfigMap name"
                    )),
                    Some(_) => {}
                }
                if self.configmap_key.is_empty()
                    || !self
                        .configmap_key
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                {
                    problems.push(format!(
                        "configmap_key {:?} must be non-empty and only A-Z, a-z, 0-9, '-', '_', '.'",
                        self.configmap_key
                    ));
                }
                if !(1..=DAY_MS).contains(&self.configmap_resync_ms) {
                    problems.push(format!(
                        "configmap_resync_ms {} must be from 1 to {DAY_MS} (one day)",
                        self.configmap_resync_ms
                    ));
                }
            }
        }
        if self.sink != SinkKind::Configmap
            && self.configmap_resync_ms != DEFAULT_CONFIGMAP_RESYNC_MS
        {
            problems.push(format!(
                "configmap_resync_ms {} only applies to --sink configmap (the file sink applies \
                 only changes: each apply is an nginx reload)",
                self.configmap_resync_ms
            ));
        }
        if self.source != SourceKind::Nats
            && self.announce_interval_max_ms != DEFAULT_ANNOUNCE_INTERVAL_MAX_MS
        {
            problems.push(format!(
                "announce_interval_max_ms {} only applies to --source nats",
                self.announce_interval_max_ms
            ));
        }
        if self.configmap_namespace.is_some() && self.sink != SinkKind::Configmap {
            problems.push(
                "configmap_namespace only applies to --sink configmap (the file sink writes --output)"
                    .to_owned(),
            );
        }
        for (key, ns) in [
            ("kube_namespace", &self.kube_namespace),
            ("configmap_namespace", &self.configmap_namespace),
        ] {
            if let Some(ns) = ns
                && !is_dns_name(ns)
            {
                problems.push(format!("{key} {ns:?} is not a valid namespace"));
            }
        }
        if let Some(url) = &self.kube_api_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            problems.push(format!(
                "kube_api_url {url:?} must start with http:// or https://"
            ));
        }
        if self.kube_api_url.is_some() && self.kubeconfig.is_some() {
            problems
                .push("kube_api_url and kubeconfig both say where the API is: choose one".into());
        }
        if !self.needs_kube() && (self.kube_api_url.is_some() || self.kubeconfig.is_some()) {
            problems.push(
                "kube_api_url and kubeconfig are only used with --source kube or --sink configmap"
                    .into(),
            );
        }
        if let Err(e) = devgate_gateway::bus::tls::NatsTlsSettings::nats_tls_checked(self) {
            problems.push(e);
        }
        self.validate_device_tls(&mut problems);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems.join("; ")))
        }
    }
}

impl Config {
    /// The static endpoints, parsed (validation reports the first bad entry).
    pub fn parsed_static_endpoints(&self) -> Result<Vec<Endpoint>, String> {
        self.static_endpoints
            .iter()
            .map(|s| parse_static_endpoint(s).map_err(|e| format!("static_endpoints: {e}")))
            .collect()
    }

    /// The device TLS settings, checked together: the files must be readable now (nginx
    /// reads them at every reload), and TLS needs the file sink, whose nginx lb-sync
    /// controls (an ingress controller terminates TLS with its own settings).
    fn validate_device_tls(&self, problems: &mut Vec<String>) {
        if self.tls_passthrough {
            // Reported instead of the pairing checks below, whose advice (add the other file)
            // would only lead to the same contradiction.
            self.validate_tls_passthrough(problems);
        } else {
            if self.tls_cert.is_some() != self.tls_key.is_some() {
                problems.push("tls_cert and tls_key go together".to_owned());
            }
            if self.tls_client_ca.is_some() && self.tls_cert.is_none() {
                problems.push(
                    "tls_client_ca needs tls_cert and tls_key (mutual TLS is TLS)".to_owned(),
                );
            }
        }
        if self.tls_client_ca.is_none() && self.tls_verify_depth != DEFAULT_VERIFY_DEPTH {
            let fix = if self.tls_passthrough {
                "with tls_passthrough the gateways check them"
            } else {
                "give tls_client_ca"
            };
            problems.push(format!(
                "tls_verify_depth {} only applies to device certificates: {fix}",
                self.tls_verify_depth
            ));
        }
        if self.tls_cert.is_none() && self.tls_key.is_none() {
            self.refuse_nginx_tls_settings(problems);
        }
        if self.tls_protocols.is_empty() {
            problems.push(format!(
                "tls_protocols must name at least one of {TLS_PROTOCOLS:?}"
            ));
        }
        for p in &self.tls_protocols {
            if !TLS_PROTOCOLS.contains(&p.as_str()) {
                problems.push(format!(
                    "tls_protocols: {p:?} is not offered (one of {TLS_PROTOCOLS:?})"
                ));
            }
        }
        if !is_shared_zone_size(&self.tls_session_cache) {
            problems.push(format!(
                "tls_session_cache {:?} must be an nginx size from 32k to 1024m, such as 10m",
                self.tls_session_cache
            ));
        }
        for (name, value) in [
            ("tls_handshake_timeout_s", self.tls_handshake_timeout_s),
            ("tls_session_timeout_s", self.tls_session_timeout_s),
            ("tls_check_interval_s", self.tls_check_interval_s),
            ("tls_verify_depth", u64::from(self.tls_verify_depth)),
        ] {
            if value == 0 {
                problems.push(format!("{name} must be greater than 0"));
            }
        }
        let Some(tls) = self.device_tls() else {
            if !self.insecure_plaintext
                && !self.tls_passthrough
                && self.tls_cert.is_none()
                && self.tls_key.is_none()
            {
                problems.push(
                    "devices would connect in plaintext: give tls_cert and tls_key (nginx \
                     terminates TLS), tls_passthrough (the gateways terminate TLS with their \
                     --device-tls-cert), or insecure_plaintext to accept that their tokens and \
                     messages cross the network unencrypted"
                        .to_owned(),
                );
            }
            return;
        };
        if self.insecure_plaintext {
            problems.push("insecure_plaintext contradicts tls_cert: choose one".to_owned());
        }
        if self.sink != SinkKind::File {
            problems.push(
                "tls_cert needs --sink file: with --sink configmap the ingress controller's nginx \
                 serves devices, and TLS is configured there"
                    .to_owned(),
            );
        }
        for path in tls.files() {
            if let Some(why) = unusable_in_nginx(&path) {
                problems.push(format!("device TLS file {}: {why}", path.display()));
                continue;
            }
            match std::fs::metadata(&path) {
                Err(e) => problems.push(format!("device TLS file {}: {e}", path.display())),
                Ok(m) if !m.is_file() => {
                    problems.push(format!("device TLS file {}: not a file", path.display()))
                }
                Ok(_) => {}
            }
        }
    }

    /// Refuses nginx's TLS settings changed from their defaults when nginx terminates no TLS
    /// (passthrough or plaintext): ignored, they would let an operator believe, say, that
    /// devices are held to TLSv1.3 when nothing here enforces it.
    fn refuse_nginx_tls_settings(&self, problems: &mut Vec<String>) {
        let defaults = Config::default();
        let changed = [
            (
                "tls_protocols",
                self.tls_protocols != defaults.tls_protocols,
            ),
            (
                "tls_handshake_timeout_s",
                self.tls_handshake_timeout_s != defaults.tls_handshake_timeout_s,
            ),
            (
                "tls_session_cache",
                self.tls_session_cache != defaults.tls_session_cache,
            ),
            (
                "tls_session_timeout_s",
                self.tls_session_timeout_s != defaults.tls_session_timeout_s,
            ),
            (
                "tls_check_interval_s",
                self.tls_check_interval_s != defaults.tls_check_interval_s,
            ),
        ];
        let ends = if self.tls_passthrough {
            "with tls_passthrough the gateways terminate TLS with their own settings"
        } else {
            "devices connect in plaintext"
        };
        for (name, _) in changed.iter().filter(|(_, changed)| *changed) {
            problems.push(format!(
                "{name} only applies when nginx terminates TLS (tls_cert, tls_key): {ends}"
            ));
        }
    }

    /// Refuses, with `tls_passthrough`, every setting that says device TLS ends elsewhere or
    /// not at all: nginx cannot check a client certificate in a session it does not terminate,
    /// and `insecure_plaintext` says devices have no TLS, which gateways expecting a handshake
    /// would refuse. Either way the operator meant something other than what would run.
    fn validate_tls_passthrough(&self, problems: &mut Vec<String>) {
        for (key, given) in [
            ("tls_cert", self.tls_cert.is_some()),
            ("tls_key", self.tls_key.is_some()),
        ] {
            if given {
                problems.push(format!(
                    "tls_passthrough contradicts {key}: TLS ends either at nginx or at the \
                     gateways, not both"
                ));
            }
        }
        if self.tls_client_ca.is_some() {
            problems.push(
                "tls_passthrough contradicts tls_client_ca: nginx cannot check device \
                 certificates in TLS it passes through; give the gateways \
                 --device-tls-client-ca instead"
                    .to_owned(),
            );
        }
        if self.insecure_plaintext {
            problems.push(
                "tls_passthrough contradicts insecure_plaintext: devices' TLS either passes \
                 through to the gateways or devices connect in plaintext; choose one"
                    .to_owned(),
            );
        }
    }

    /// The device TLS settings when TLS is configured (its fingerprint still empty: the
    /// caller reads the files).
    pub fn device_tls(&self) -> Option<TlsSettings> {
        let (cert, key) = self.tls_cert.clone().zip(self.tls_key.clone())?;
        Some(TlsSettings {
            cert,
            key,
            client_ca: self.tls_client_ca.clone(),
            verify_depth: self.tls_verify_depth,
            protocols: self.tls_protocols.clone(),
            handshake_timeout_s: self.tls_handshake_timeout_s,
            session_cache: self.tls_session_cache.clone(),
            session_timeout_s: self.tls_session_timeout_s,
            fingerprint: String::new(),
        })
    }

    /// The renderer's settings (a TLS fingerprint, if any, still empty).
    pub fn render_settings(&self) -> RenderSettings {
        RenderSettings {
            upstream_name: self.upstream_name.clone(),
            // Validated at start; the default only stands in for a Config never validated.
            zone_min_bytes: nginx_size_bytes(&self.upstream_zone_min_size)
                .unwrap_or(crate::render::DEFAULT_ZONE_MIN_BYTES),
            listen: self.listen,
            proxy_protocol: self.proxy_protocol,
            proxy_timeout_s: self.proxy_timeout_s,
            proxy_connect_timeout_s: self.proxy_connect_timeout_s,
            proxy_buffer_size: self.proxy_buffer_size.clone(),
            max_fails: self.max_fails,
            fail_timeout_s: self.fail_timeout_s,
            tls: self.device_tls(),
            tls_passthrough: self.tls_passthrough,
        }
    }

    /// `tls_check_interval_s` as a duration.
    pub fn tls_check_interval(&self) -> Duration {
        Duration::from_secs(self.tls_check_interval_s)
    }

    /// `debounce_ms` as a duration.
    pub fn debounce(&self) -> Duration {
        Duration::from_millis(self.debounce_ms)
    }

    /// `min_reload_interval_ms` as a duration.
    pub fn min_reload_interval(&self) -> Duration {
        Duration::from_millis(self.min_reload_interval_ms)
    }

    /// `command_timeout_ms` as a duration.
    pub fn command_timeout(&self) -> Duration {
        Duration::from_millis(self.command_timeout_ms)
    }

    /// `configmap_resync_ms` as a duration.
    pub fn configmap_resync(&self) -> Duration {
        Duration::from_millis(self.configmap_resync_ms)
    }

    /// `announce_interval_max_ms` as a duration.
    pub fn announce_interval_max(&self) -> Duration {
        Duration::from_millis(self.announce_interval_max_ms)
    }

    /// Whether a Kubernetes client is needed at all.
    pub fn needs_kube(&self) -> bool {
        self.source == SourceKind::Kube || self.sink == SinkKind::Configmap
    }
}

/// Command line of `devgate-lb-sync`. Every flag is optional and also read from its `DEVGATE_*`
/// env var; whatever is given overrides the config file.
#[derive(Debug, Parser, Serialize)]
#[command(
    name = "devgate-lb-sync",
    version,
    about = "Keeps an nginx stream upstream equal to the set of ready gateway instances"
)]
pub struct Cli {
    /// TOML config file (keys are the flag names with `_` instead of `-`).
    #[arg(long, env = "DEVGATE_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Where gateway instances are discovered [default: nats].
    #[arg(long, env = "DEVGATE_SOURCE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<SourceKind>,
    /// Where the rendered configuration goes [default: file].
    #[arg(long, env = "DEVGATE_SINK")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sink: Option<SinkKind>,
    /// Address nginx listens on for devices [default: 0.0.0.0:7000].
    #[arg(long, env = "DEVGATE_LISTEN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// Health/readiness/metrics listen address [default: 0.0.0.0:9092].
    #[arg(long, env = "DEVGATE_HTTP_LISTEN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_listen: Option<SocketAddr>,
    /// nginx upstream name [default: devgate_gateways].
    #[arg(long, env = "DEVGATE_UPSTREAM_NAME")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_name: Option<String>,
    /// Least size of the upstream zone, 32k to 1024m; larger sets get 2 KiB per server,
    /// rounded up to a power of two [default: 64k].
    #[arg(long, env = "DEVGATE_UPSTREAM_ZONE_MIN_SIZE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_zone_min_size: Option<String>,
    /// Send the PROXY protocol to the gateways.
    #[arg(long, env = "DEVGATE_PROXY_PROTOCOL", num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Option<bool>,
    /// nginx proxy_timeout in seconds [default: 120].
    #[arg(long, env = "DEVGATE_PROXY_TIMEOUT_S")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_timeout_s: Option<u64>,
    /// nginx proxy_connect_timeout in seconds [default: 2].
    #[arg(long, env = "DEVGATE_PROXY_CONNECT_TIMEOUT_S")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_connect_timeout_s: Option<u64>,
    /// nginx proxy_buffer_size per direction of a device connection [default: 4k].
    #[arg(long, env = "DEVGATE_PROXY_BUFFER_SIZE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_buffer_size: Option<String>,
    /// nginx max_fails per server [default: 3].
    #[arg(long, env = "DEVGATE_MAX_FAILS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_fails: Option<u32>,
    /// nginx fail_timeout per server in seconds [default: 10].
    #[arg(long, env = "DEVGATE_FAIL_TIMEOUT_S")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fail_timeout_s: Option<u64>,
    /// Debounce window for bursts of changes, ms [default: 200].
    #[arg(long, env = "DEVGATE_DEBOUNCE_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub debounce_ms: Option<u64>,
    /// Least time between two reloads, ms [default: 1000].
    #[arg(long, env = "DEVGATE_MIN_RELOAD_INTERVAL_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_reload_interval_ms: Option<u64>,
    /// File sink: file nginx includes inside `stream { }`.
    #[arg(long, env = "DEVGATE_OUTPUT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<PathBuf>,
    /// File sink: configuration check command [default: "nginx -t"].
    #[arg(long, env = "DEVGATE_VALIDATE_CMD")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub validate_cmd: Option<String>,
    /// File sink: reload command [default: "nginx -s reload"].
    #[arg(long, env = "DEVGATE_RELOAD_CMD")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reload_cmd: Option<String>,
    /// File sink: timeout of the validate and reload commands, ms [default: 30000].
    #[arg(long, env = "DEVGATE_COMMAND_TIMEOUT_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command_timeout_ms: Option<u64>,
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
    /// Missed announce periods before an instance leaves [default: 3].
    #[arg(long, env = "DEVGATE_ANNOUNCE_EXPIRY_BEATS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub announce_expiry_beats: Option<u32>,
    /// Longest announce_interval_ms of any gateway, ms: after a (re)connect lb-sync waits this
    /// long (x1.25; an empty set x expiry beats) to hear every gateway [default: 1000].
    #[arg(long, env = "DEVGATE_ANNOUNCE_INTERVAL_MAX_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub announce_interval_max_ms: Option<u64>,
    /// Static source: comma-separated IP:PORT[=WEIGHT] list.
    #[arg(long, env = "DEVGATE_STATIC_ENDPOINTS", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub static_endpoints: Option<Vec<String>>,
    /// Namespace of the Service (and of the ConfigMap unless --configmap-namespace is given)
    /// [default: the client's namespace].
    #[arg(long, env = "DEVGATE_KUBE_NAMESPACE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kube_namespace: Option<String>,
    /// Gateway Service name [default: devgate-gateway].
    #[arg(long, env = "DEVGATE_KUBE_SERVICE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kube_service: Option<String>,
    /// EndpointSlice port name of the device port; a slice's only port is used only when
    /// unnamed [default: device].
    #[arg(long, env = "DEVGATE_KUBE_PORT_NAME")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kube_port_name: Option<String>,
    /// Kubernetes API URL instead of in-cluster/kubeconfig discovery.
    #[arg(long, env = "DEVGATE_KUBE_API_URL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kube_api_url: Option<String>,
    /// A kubeconfig file instead of in-cluster discovery (its current context is used).
    #[arg(long, env = "DEVGATE_KUBECONFIG")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kubeconfig: Option<PathBuf>,
    /// ConfigMap sink: ConfigMap name.
    #[arg(long, env = "DEVGATE_CONFIGMAP_NAME")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub configmap_name: Option<String>,
    /// ConfigMap sink: data key [default: stream-snippets].
    #[arg(long, env = "DEVGATE_CONFIGMAP_KEY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub configmap_key: Option<String>,
    /// ConfigMap sink: re-apply the key this often even when unchanged, restoring it if someone
    /// removed or edited it, ms [default: 60000].
    #[arg(long, env = "DEVGATE_CONFIGMAP_RESYNC_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub configmap_resync_ms: Option<u64>,
    /// ConfigMap sink: the ConfigMap's namespace, e.g. the ingress controller's
    /// [default: the Service's namespace].
    #[arg(long, env = "DEVGATE_CONFIGMAP_NAMESPACE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub configmap_namespace: Option<String>,
    /// PEM certificate chain nginx presents to devices (with --tls-key): TLS for devices,
    /// terminated by nginx [default: none, devices connect in plaintext].
    #[arg(long, env = "DEVGATE_TLS_CERT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "DEVGATE_TLS_KEY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    /// PEM CAs that sign device certificates: devices must present one (mutual TLS).
    #[arg(long, env = "DEVGATE_TLS_CLIENT_CA")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_client_ca: Option<PathBuf>,
    /// With --tls-client-ca: CAs allowed between a device certificate and it [default: 3].
    #[arg(long, env = "DEVGATE_TLS_VERIFY_DEPTH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_verify_depth: Option<u32>,
    /// TLS versions offered to devices, comma-separated [default: TLSv1.2,TLSv1.3].
    #[arg(long, env = "DEVGATE_TLS_PROTOCOLS", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_protocols: Option<Vec<String>>,
    /// Seconds a device may take for its TLS handshake [default: 15].
    #[arg(long, env = "DEVGATE_TLS_HANDSHAKE_TIMEOUT_S")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_handshake_timeout_s: Option<u64>,
    /// Shared TLS session cache size [default: 10m, about 40,000 sessions].
    #[arg(long, env = "DEVGATE_TLS_SESSION_CACHE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_session_cache: Option<String>,
    /// Seconds a device may resume its TLS session [default: 3600].
    #[arg(long, env = "DEVGATE_TLS_SESSION_TIMEOUT_S")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_session_timeout_s: Option<u64>,
    /// Seconds between checks of the TLS files for renewal [default: 10].
    #[arg(long, env = "DEVGATE_TLS_CHECK_INTERVAL_S")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_check_interval_s: Option<u64>,
    /// Accept that devices connect in plaintext (no --tls-cert): tokens and messages cross the
    /// network unencrypted. Logged loudly.
    #[arg(long, env = "DEVGATE_INSECURE_PLAINTEXT", num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub insecure_plaintext: Option<bool>,
    /// Devices' TLS ends at the gateways (their --device-tls-cert): nginx forwards the encrypted
    /// bytes untouched, so gateways can bind client certificates to device ids.
    #[arg(long, env = "DEVGATE_TLS_PASSTHROUGH", num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_passthrough: Option<bool>,
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
        Cli::try_parse_from(std::iter::once("devgate-lb-sync").chain(args.iter().copied()))
            .expect("flags parse")
    }

    /// A file sink's output, in plaintext (asked for, as every test not about TLS does).
    fn out_flag() -> [&'static str; 3] {
        [
            "--output",
            "/tmp/devgate-upstream.conf",
            "--insecure-plaintext",
        ]
    }

    /// A file sink's output, for tests that give TLS settings.
    fn tls_out_flag() -> [&'static str; 2] {
        ["--output", "/tmp/devgate-upstream.conf"]
    }

    #[test]
    fn defaults_need_an_output_file() {
        let err = cli(&[])
            .into_config()
            .expect_err("file sink without output");
        assert!(err.to_string().contains("--output"), "{err}");
        let c = cli(&out_flag()).into_config().expect("nats + file");
        assert_eq!(c.source, SourceKind::Nats);
        assert_eq!(c.sink, SinkKind::File);
        assert_eq!(c.proxy_timeout_s, 120);
    }

    #[test]
    fn static_endpoints_are_comma_separated_and_parsed() {
        let mut args = vec![
            "--source",
            "static",
            "--static-endpoints",
            "127.0.0.1:7001,127.0.0.1:7002=2",
        ];
        args.extend(out_flag());
        let c = cli(&args).into_config().expect("static");
        let eps = c.parsed_static_endpoints().expect("parsed");
        assert_eq!(eps.len(), 2);
        assert_eq!(eps[1].weight, Some(2));
    }

    #[test]
    fn bad_static_endpoint_is_named() {
        let mut args = vec!["--source", "static", "--static-endpoints", "gw-1:7000"];
        args.extend(out_flag());
        let err = cli(&args).into_config().expect_err("host name");
        assert!(err.to_string().contains("gw-1:7000"), "{err}");
        let err = cli(&["--source", "static", "--output", "/tmp/x.conf"])
            .into_config()
            .expect_err("empty static list");
        assert!(err.to_string().contains("--static-endpoints"), "{err}");
    }

    /// A kube source writing a ConfigMap (whose listener is plaintext), before the flag under
    /// test.
    const KUBE_TO_CONFIGMAP: [&str; 7] = [
        "--insecure-plaintext",
        "--source",
        "kube",
        "--sink",
        "configmap",
        "--configmap-name",
        "nginx-config",
    ];

    #[test]
    fn configmap_sink_needs_a_name_and_a_valid_key() {
        let err = cli(&["--source", "kube", "--sink", "configmap"])
            .into_config()
            .expect_err("no name");
        assert!(err.to_string().contains("--configmap-name"), "{err}");
        let mut args = KUBE_TO_CONFIGMAP.to_vec();
        args.extend(["--configmap-key", "bad key"]);
        let err = cli(&args).into_config().expect_err("bad key");
        assert!(err.to_string().contains("configmap_key"), "{err}");
        let c = cli(&KUBE_TO_CONFIGMAP).into_config().expect("valid");
        assert_eq!(c.configmap_key, "stream-snippets");
        assert!(c.needs_kube());
    }

    #[test]
    fn the_api_is_named_by_a_url_or_a_kubeconfig_not_both() {
        let mut args = KUBE_TO_CONFIGMAP.to_vec();
        args.extend(["--kubeconfig", "/etc/devgate/kubeconfig"]);
        let c = cli(&args).into_config().expect("kubeconfig alone");
        assert_eq!(
            c.kubeconfig.as_deref(),
            Some(std::path::Path::new("/etc/devgate/kubeconfig"))
        );
        args.extend(["--kube-api-url", "http://127.0.0.1:8001"]);
        let err = cli(&args).into_config().expect_err("both");
        assert!(
            err.to_string()
                .contains("kube_api_url and kubeconfig both say where the API is"),
            "{err}"
        );
    }

    #[test]
    fn the_configmap_may_live_in_another_namespace_but_only_for_the_configmap_sink() {
        let base = KUBE_TO_CONFIGMAP;
        let c = cli(&base).into_config().expect("default");
        assert_eq!(c.configmap_namespace, None, "defaults to the Service's");
        let mut args = base.to_vec();
        args.extend([
            "--kube-namespace",
            "devgate",
            "--configmap-namespace",
            "ingress-nginx",
        ]);
        let c = cli(&args).into_config().expect("other namespace");
        assert_eq!(c.kube_namespace.as_deref(), Some("devgate"));
        assert_eq!(c.configmap_namespace.as_deref(), Some("ingress-nginx"));
        let mut args = base.to_vec();
        args.extend(["--configmap-namespace", "Ingress_NGINX"]);
        let err = cli(&args).into_config().expect_err("invalid name");
        assert!(err.to_string().contains("configmap_namespace"), "{err}");
        let mut args = vec!["--configmap-namespace", "ingress-nginx"];
        args.extend(out_flag());
        let err = cli(&args).into_config().expect_err("file sink");
        assert!(
            err.to_string().contains("only applies to --sink configmap"),
            "{err}"
        );
    }

    #[test]
    fn the_configmap_resync_is_bounded_and_only_for_the_configmap_sink() {
        let c = cli(&KUBE_TO_CONFIGMAP).into_config().expect("default");
        assert_eq!(c.configmap_resync(), Duration::from_secs(60));
        let mut args = KUBE_TO_CONFIGMAP.to_vec();
        args.extend(["--configmap-resync-ms", "5000"]);
        let c = cli(&args).into_config().expect("shorter resync");
        assert_eq!(c.configmap_resync(), Duration::from_secs(5));
        for bad in ["0", "86400001"] {
            let mut args = KUBE_TO_CONFIGMAP.to_vec();
            args.extend(["--configmap-resync-ms", bad]);
            let err = cli(&args).into_config().expect_err(bad);
            assert!(err.to_string().contains("configmap_resync_ms"), "{err}");
        }
        let mut args = vec!["--configmap-resync-ms", "5000"];
        args.extend(out_flag());
        let err = cli(&args).into_config().expect_err("file sink");
        assert!(
            err.to_string().contains("only applies to --sink configmap"),
            "{err}"
        );
    }

    #[test]
    fn the_assumed_announce_interval_is_bounded_and_only_for_nats() {
        let c = cli(&out_flag()).into_config().expect("default");
        assert_eq!(c.announce_interval_max(), Duration::from_secs(1));
        let mut args = vec!["--announce-interval-max-ms", "5000"];
        args.extend(out_flag());
        let c = cli(&args).into_config().expect("slow gateways");
        assert_eq!(c.announce_interval_max(), Duration::from_secs(5));
        for bad in ["0", "49", "60001"] {
            let mut args = vec!["--announce-interval-max-ms", bad];
            args.extend(out_flag());
            let err = cli(&args).into_config().expect_err(bad);
            assert!(
                err.to_string().contains("announce_interval_max_ms"),
                "{err}"
            );
        }
        let mut args = KUBE_TO_CONFIGMAP.to_vec();
        args.extend(["--announce-interval-max-ms", "5000"]);
        let err = cli(&args).into_config().expect_err("kube source");
        assert!(
            err.to_string().contains("only applies to --source nats"),
            "{err}"
        );
    }

    fn fixture(name: &str) -> String {
        format!(
            "{}/../tests/fixtures/tls/{name}",
            env!("CARGO_MANIFEST_DIR")
        )
    }

    #[test]
    fn device_tls_is_off_unless_given_and_then_renders_its_files() {
        let c = cli(&out_flag()).into_config().expect("plaintext");
        assert_eq!(c.render_settings().tls, None);
        let (cert, key, ca) = (
            fixture("server.pem"),
            fixture("server.key"),
            fixture("ca.pem"),
        );
        let mut args = vec![
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-client-ca",
            &ca,
        ];
        args.extend(tls_out_flag());
        let tls = cli(&args)
            .into_config()
            .expect("TLS")
            .render_settings()
            .tls
            .expect("TLS settings");
        assert_eq!(tls.files().len(), 3);
        assert_eq!(tls.protocols, ["TLSv1.2", "TLSv1.3"]);
        assert_eq!(tls.handshake_timeout_s, 15);
    }

    #[test]
    fn bad_device_tls_settings_are_named() {
        let (cert, key, ca) = (
            fixture("server.pem"),
            fixture("server.key"),
            fixture("ca.pem"),
        );
        let cases: Vec<(Vec<&str>, &str)> = vec![
            (
                vec!["--tls-cert", &cert],
                "tls_cert and tls_key go together",
            ),
            (vec!["--tls-client-ca", &ca], "tls_client_ca needs tls_cert"),
            (
                vec!["--tls-cert", "/nonexistent/tls.crt", "--tls-key", &key],
                "device TLS file /nonexistent/tls.crt",
            ),
            (
                vec![
                    "--tls-cert",
                    &cert,
                    "--tls-key",
                    &key,
                    "--tls-protocols",
                    "TLSv1.2,TLSv1",
                ],
                "\"TLSv1\" is not offered",
            ),
            (
                vec!["--tls-session-cache", "lots"],
                "tls_session_cache \"lots\"",
            ),
            (
                vec!["--tls-session-cache", "16k"],
                "must be an nginx size from 32k to 1024m",
            ),
            (
                vec!["--tls-session-cache", "99999999999k"],
                "must be an nginx size from 32k to 1024m",
            ),
            (
                vec!["--tls-check-interval-s", "0"],
                "tls_check_interval_s must be",
            ),
            (
                vec!["--tls-cert", "server.pem", "--tls-key", &key],
                "device TLS file server.pem: must be absolute",
            ),
            (
                vec!["--tls-cert", "/etc/my certs/tls.crt", "--tls-key", &key],
                "must not contain whitespace",
            ),
            (
                vec!["--tls-cert", "/etc/tls;include/x", "--tls-key", &key],
                "must not contain whitespace",
            ),
            (
                vec!["--tls-cert", "/", "--tls-key", &key],
                "device TLS file /: not a file",
            ),
            (
                vec!["--kubeconfig", "/etc/devgate/kubeconfig"],
                "only used with --source kube or --sink configmap",
            ),
            (
                vec!["--tls-verify-depth", "5"],
                "tls_verify_depth 5 only applies to device certificates",
            ),
            (
                vec!["--tls-handshake-timeout-s", "5"],
                "tls_handshake_timeout_s only applies when nginx terminates TLS (tls_cert, \
                 tls_key): devices connect in plaintext",
            ),
            (
                vec!["--tls-session-timeout-s", "60"],
                "tls_session_timeout_s only applies when nginx terminates TLS",
            ),
            (
                vec!["--tls-check-interval-s", "60"],
                "tls_check_interval_s only applies when nginx terminates TLS",
            ),
        ];
        for (mut args, expected) in cases {
            args.extend(out_flag());
            let err = cli(&args).into_config().expect_err(expected);
            assert!(err.to_string().contains(expected), "{args:?}: {err}");
        }
        let mut args = KUBE_TO_CONFIGMAP.to_vec();
        args.extend(["--tls-cert", &cert, "--tls-key", &key]);
        let err = cli(&args).into_config().expect_err("configmap sink");
        assert!(
            err.to_string().contains("tls_cert needs --sink file"),
            "{err}"
        );
    }

    #[test]
    fn plaintext_must_be_asked_for_and_excludes_tls() {
        let err = cli(&tls_out_flag()).into_config().expect_err("neither");
        assert!(
            err.to_string()
                .contains("devices would connect in plaintext"),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("tls_passthrough (the gateways terminate TLS"),
            "the third way out is named: {err}"
        );
        let (cert, key) = (fixture("server.pem"), fixture("server.key"));
        let mut args = vec!["--tls-cert", &cert, "--tls-key", &key];
        args.extend(out_flag());
        let err = cli(&args).into_config().expect_err("both");
        assert!(err.to_string().contains("contradicts"), "{err}");
        let err = cli(&[
            "--source",
            "kube",
            "--sink",
            "configmap",
            "--configmap-name",
            "x",
        ])
        .into_config()
        .expect_err("a ConfigMap's listener is plaintext too");
        assert!(
            err.to_string()
                .contains("devices would connect in plaintext"),
            "{err}"
        );
    }

    #[test]
    fn tls_passthrough_is_neither_plaintext_nor_nginx_tls() {
        let mut args = vec!["--tls-passthrough"];
        args.extend(tls_out_flag());
        let c = cli(&args)
            .into_config()
            .expect("passthrough with the file sink");
        assert!(c.tls_passthrough);
        assert!(!c.insecure_plaintext);
        let settings = c.render_settings();
        assert_eq!(settings.tls, None, "nginx terminates nothing");
        assert!(settings.tls_passthrough);
        // The ingress controller's stream-snippets listener is plain, so passthrough fits it.
        let mut args = vec!["--tls-passthrough"];
        args.extend(&KUBE_TO_CONFIGMAP[1..]);
        let c = cli(&args)
            .into_config()
            .expect("passthrough with the configmap sink");
        assert_eq!(c.sink, SinkKind::Configmap);
        assert!(c.render_settings().tls_passthrough);
        let mut args = vec!["--tls-passthrough", "false"];
        args.extend(tls_out_flag());
        let err = cli(&args).into_config().expect_err("turned off");
        assert!(
            err.to_string()
                .contains("devices would connect in plaintext"),
            "{err}"
        );
    }

    #[test]
    fn tls_passthrough_contradicts_every_nginx_tls_file() {
        let (cert, key, ca) = (
            fixture("server.pem"),
            fixture("server.key"),
            fixture("ca.pem"),
        );
        let both = "TLS ends either at nginx or at the gateways, not both";
        let cases: Vec<(Vec<&str>, Vec<String>)> = vec![
            (
                vec!["--tls-cert", &cert, "--tls-key", &key],
                vec![
                    format!("tls_passthrough contradicts tls_cert: {both}"),
                    format!("tls_passthrough contradicts tls_key: {both}"),
                ],
            ),
            (
                vec!["--tls-cert", &cert],
                vec![format!("tls_passthrough contradicts tls_cert: {both}")],
            ),
            (
                vec!["--tls-key", &key],
                vec![format!("tls_passthrough contradicts tls_key: {both}")],
            ),
            (
                vec!["--tls-client-ca", &ca],
                vec![
                    "tls_passthrough contradicts tls_client_ca: nginx cannot check device \
                     certificates in TLS it passes through; give the gateways \
                     --device-tls-client-ca instead"
                        .to_owned(),
                ],
            ),
            (
                vec!["--tls-verify-depth", "5"],
                vec![
                    "tls_verify_depth 5 only applies to device certificates: with \
                     tls_passthrough the gateways check them"
                        .to_owned(),
                ],
            ),
            (
                vec!["--tls-protocols", "TLSv1.3", "--tls-session-cache", "20m"],
                vec![
                    "tls_protocols only applies when nginx terminates TLS (tls_cert, tls_key): \
                     with tls_passthrough the gateways terminate TLS with their own settings"
                        .to_owned(),
                    "tls_session_cache only applies when nginx terminates TLS".to_owned(),
                ],
            ),
        ];
        for (mut args, expected) in cases {
            args.push("--tls-passthrough");
            args.extend(tls_out_flag());
            let err = cli(&args).into_config().expect_err("contradiction");
            let msg = err.to_string();
            for needle in expected {
                assert!(
                    msg.contains(&needle),
                    "{args:?}: {needle} missing from {msg}"
                );
            }
            // The pairing advice (add the other file) would only lead to the same refusal.
            for misleading in ["go together", "mutual TLS is TLS", "give tls_client_ca"] {
                assert!(!msg.contains(misleading), "{args:?}: {msg}");
            }
        }
    }

    #[test]
    fn tls_passthrough_contradicts_insecure_plaintext() {
        let mut args = vec!["--tls-passthrough"];
        args.extend(out_flag());
        let err = cli(&args).into_config().expect_err("both");
        assert!(
            err.to_string().contains(
                "tls_passthrough contradicts insecure_plaintext: devices' TLS either passes \
                 through to the gateways or devices connect in plaintext; choose one"
            ),
            "{err}"
        );
        let err = cli(&["--tls-passthrough"]
            .iter()
            .chain(&KUBE_TO_CONFIGMAP)
            .copied()
            .collect::<Vec<_>>())
        .into_config()
        .expect_err("both, configmap sink");
        assert!(
            err.to_string()
                .contains("tls_passthrough contradicts insecure_plaintext"),
            "{err}"
        );
    }

    #[test]
    fn tls_passthrough_is_a_config_file_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("lb.toml");
        std::fs::write(&file, "output = \"/tmp/u.conf\"\ntls_passthrough = true\n")
            .expect("write config");
        let c = cli(&["--config", file.to_str().expect("utf8")])
            .into_config()
            .expect("passthrough from the file");
        assert!(c.tls_passthrough);
        assert!(c.render_settings().tls_passthrough);
    }

    #[test]
    fn the_proxy_buffer_is_small_by_default_and_must_be_an_nginx_size() {
        let c = cli(&out_flag()).into_config().expect("defaults");
        assert_eq!(c.render_settings().proxy_buffer_size, "4k");
        let mut args = vec!["--proxy-buffer-size", "4 kilobytes"];
        args.extend(out_flag());
        let err = cli(&args).into_config().expect_err("not a size");
        assert!(err.to_string().contains("proxy_buffer_size"), "{err}");
    }

    #[test]
    fn the_upstream_zone_floor_is_an_nginx_zone_size() {
        let c = cli(&out_flag()).into_config().expect("defaults");
        assert_eq!(c.upstream_zone_min_size, "64k");
        assert_eq!(c.render_settings().zone_min_bytes, 64 * 1024);
        let mut args = vec!["--upstream-zone-min-size", "8m"];
        args.extend(out_flag());
        let c = cli(&args).into_config().expect("larger floor");
        assert_eq!(c.render_settings().zone_min_bytes, 8 * 1024 * 1024);
        for bad in ["16k", "2048m", "lots", "0"] {
            let mut args = vec!["--upstream-zone-min-size", bad];
            args.extend(out_flag());
            let err = cli(&args).into_config().expect_err(bad);
            assert!(
                err.to_string().contains("upstream_zone_min_size")
                    && err.to_string().contains("32k to 1024m"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn all_problems_are_reported_together() {
        let err = cli(&[
            "--insecure-plaintext",
            "--output",
            "/nonexistent-dir/x.conf",
            "--proxy-timeout-s",
            "0",
            "--upstream-name",
            "bad name",
            "--reload-cmd",
            " ",
        ])
        .into_config()
        .expect_err("invalid");
        let msg = err.to_string();
        for needle in [
            "/nonexistent-dir",
            "proxy_timeout_s",
            "upstream_name",
            "reload_cmd",
        ] {
            assert!(msg.contains(needle), "{needle} missing from {msg}");
        }
    }

    #[test]
    fn unknown_source_is_a_parse_error() {
        let err = Cli::try_parse_from(["devgate-lb-sync", "--source", "consul"]).expect_err("bad");
        assert!(err.to_string().contains("consul"), "{err}");
    }

    #[test]
    fn config_file_keys_and_flags_layer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("lb.toml");
        std::fs::write(
            &file,
            "source = \"static\"\nstatic_endpoints = [\"127.0.0.1:7001\"]\noutput = \"/tmp/u.conf\"\n\
             debounce_ms = 50\ninsecure_plaintext = true\n",
        )
        .expect("write config");
        let c = cli(&[
            "--config",
            file.to_str().expect("utf8"),
            "--debounce-ms",
            "75",
        ])
        .into_config()
        .expect("file + flag");
        assert_eq!(c.source, SourceKind::Static);
        assert_eq!(c.static_endpoints, vec!["127.0.0.1:7001".to_owned()]);
        assert_eq!(c.debounce_ms, 75);
        std::fs::write(&file, "sorce = \"static\"\n").expect("write config");
        let err = cli(&["--config", file.to_str().expect("utf8")])
            .into_config()
            .expect_err("typo");
        assert!(err.to_string().contains("sorce"), "{err}");
    }
}
