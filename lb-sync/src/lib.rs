//! devgate lb-sync: keeps nginx's layer-4 upstream equal to the set of ready gateway instances.
//!
//! Devices dial one address; nginx's `stream` module spreads their TCP connections over the
//! gateway instances. lb-sync watches a [`source`] (Kubernetes EndpointSlices, gateway
//! announcements on NATS, or a static list), renders the upstream ([`render`]) from each
//! complete snapshot, and hands it to a [`sink`] (a file nginx includes, validated and
//! reloaded; or a ConfigMap key an ingress controller consumes). The [`controller`] debounces
//! bursts and caps the reload rate. See `docs/lb-sync.md`.

pub mod config;
pub mod controller;
pub mod endpoints;
pub mod metrics;
pub mod render;
pub mod sink;
pub mod source;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;

use devgate_gateway::common::{ops_router, serve_http};
use prometheus_client::registry::Registry;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, SinkKind, SourceKind};
use crate::controller::{Context, Pacer, Status};
use crate::metrics::Metrics;
use crate::sink::Sink;
use crate::source::Source;

/// Why lb-sync could not start. Once started, nothing a backend does stops it: lost NATS or
/// API connections are retried.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The ops HTTP listener could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The configured address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// No Kubernetes client could be configured (no in-cluster config, no kubeconfig, bad URL).
    #[error("Kubernetes client: {0}")]
    Kube(String),
    /// The NATS client refused its options.
    #[error(transparent)]
    Nats(#[from] source::nats::NatsError),
    /// The configuration is inconsistent (normally caught by `Config::validate`).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A process setting could not be applied.
    #[error("process setup: {0}")]
    Setup(String),
}

/// A running lb-sync.
pub struct LbSync {
    http_addr: SocketAddr,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl LbSync {
    /// Where `/healthz`, `/readyz` and `/metrics` are served.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Stops every task and waits for them.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// Starts lb-sync: connects the source and sink, serves the ops endpoints and runs the control
/// loop in the background until `shutdown` is cancelled (or [`LbSync::shutdown`]).
pub async fn start(config: Config, shutdown: CancellationToken) -> Result<LbSync, Error> {
    let metrics = Metrics::default();
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    let status = Arc::new(Status::default());

    let kube = if config.needs_kube() {
        Some(kube_client(&config).await?)
    } else {
        None
    };
    let namespace = |client: &kube::Client| {
        config
            .kube_namespace
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_owned())
    };

    let source = match (config.source, &kube) {
        (SourceKind::Static, _) => {
            Source::Static(config.parsed_static_endpoints().map_err(Error::Config)?)
        }
        (SourceKind::Nats, _) => {
            let user = config
                .nats_user
                .as_deref()
                .zip(config.nats_password.as_ref());
            Source::Nats(
                source::nats::NatsSource::connect(
                    &config.nats_url,
                    user,
                    devgate_gateway::bus::tls::NatsTlsSettings::nats_tls(&config).as_ref(),
                    config.announce_expiry_beats,
                    config.announce_interval_max(),
                )
                .await?,
            )
        }
        (SourceKind::Kube, Some(client)) => Source::Kube(source::kube::KubeSource::new(
            client.clone(),
            &namespace(client),
            &config.kube_service,
            &config.kube_port_name,
        )),
        (SourceKind::Kube, None) => return Err(Error::Config("kube source without client".into())),
    };
    let sink = match (config.sink, &kube) {
        (SinkKind::File, _) => {
            let output = config
                .output
                .clone()
                .ok_or_else(|| Error::Config("--sink file needs --output".into()))?;
            Sink::File(sink::file::FileSink::new(
                output,
                &config.validate_cmd,
                &config.reload_cmd,
                config.command_timeout(),
            ))
        }
        (SinkKind::Configmap, Some(client)) => {
            let name = config
                .configmap_name
                .as_deref()
                .ok_or_else(|| Error::Config("--sink configmap needs --configmap-name".into()))?;
            let configmap_namespace = config
                .configmap_namespace
                .clone()
                .unwrap_or_else(|| namespace(client));
            Sink::ConfigMap(Box::new(sink::configmap::ConfigMapSink::new(
                client.clone(),
                &configmap_namespace,
                name,
                &config.configmap_key,
                config.configmap_resync(),
            )))
        }
        (SinkKind::Configmap, None) => {
            return Err(Error::Config("configmap sink without client".into()));
        }
    };

    let listener = tokio::net::TcpListener::bind(config.http_listen)
        .await
        .map_err(|source| Error::Bind {
            addr: config.http_listen,
            source,
        })?;
    let http_addr = listener.local_addr().map_err(|source| Error::Bind {
        addr: config.http_listen,
        source,
    })?;
    let probe_status = status.clone();
    let router = ops_router(
        Arc::new(registry),
        Arc::new(move || probe_status.readiness()),
    );

    let (tx, rx) = tokio::sync::watch::channel(None);
    let mut settings = config.render_settings();
    let tls_watch = match settings.tls.as_mut() {
        Some(tls) => {
            let files = tls.files();
            tls.fingerprint = tls::fingerprint(&files).map_err(|e| Error::Config(e.to_string()))?;
            tracing::info!(
                cert = %tls.cert.display(),
                client_ca = ?tls.client_ca,
                fingerprint = %tls.fingerprint,
                "nginx terminates the devices' TLS"
            );
            let (tls_tx, tls_rx) = tokio::sync::watch::channel(tls.fingerprint.clone());
            Some((files, tls_tx, tls_rx))
        }
        None if settings.tls_passthrough => {
            tracing::info!(
                listen = %config.listen,
                proxy_protocol = config.proxy_protocol,
                "device TLS passes through nginx to the gateways (--tls-passthrough): they \
                 terminate it with their --device-tls-cert; nginx forwards the encrypted bytes \
                 untouched"
            );
            None
        }
        None => {
            tracing::warn!(
                listen = %config.listen,
                "INSECURE (--insecure-plaintext): devices connect to nginx in PLAINTEXT; their \
                 tokens and messages cross the network unencrypted. Give --tls-cert and \
                 --tls-key to terminate TLS at nginx, or --tls-passthrough when the gateways \
                 terminate it."
            );
            None
        }
    };
    let mut ctx = Context::new(settings, sink, metrics.clone(), status.clone());
    let pacer = Pacer::new(config.debounce(), config.min_reload_interval());
    tracing::info!(
        source = ?config.source,
        sink = ?config.sink,
        listen = %config.listen,
        http = %http_addr,
        "lb-sync started"
    );
    let mut tasks = vec![
        tokio::spawn({
            let shutdown = shutdown.clone();
            async move {
                if let Err(error) = serve_http(listener, router, shutdown).await {
                    tracing::error!(%error, "ops HTTP server failed");
                }
            }
        }),
        tokio::spawn(source.run(tx, metrics.clone(), status.clone(), shutdown.clone())),
    ];
    if let Some((files, tls_tx, tls_rx)) = tls_watch {
        ctx.tls_changes = Some(tls_rx);
        tasks.push(tokio::spawn(tls::watch_files(
            files,
            config.tls_check_interval(),
            tls_tx,
            metrics.clone(),
            shutdown.clone(),
        )));
    }
    tasks.push(tokio::spawn(controller::run(
        rx,
        ctx,
        pacer,
        shutdown.clone(),
    )));
    Ok(LbSync {
        http_addr,
        shutdown,
        tasks,
    })
}

/// Makes this process non-dumpable, which keeps other processes of the same user out of its
/// `/proc/<pid>` (memory, environment, root filesystem). In the chart lb-sync shares a process
/// namespace and a user with nginx, the container that faces the devices, so that it can signal
/// nginx's master; this keeps nginx from reading lb-sync's Kubernetes API token through
/// `/proc/<lb-sync>/root`. It narrows, but does not close, that path: the `nginx -t` and
/// `nginx -s reload` commands lb-sync runs are dumpable again while they run. Linux only (a
/// no-op elsewhere).
pub fn harden_process() -> Result<(), Error> {
    #[cfg(target_os = "linux")]
    nix::sys::prctl::set_dumpable(false)
        .map_err(|e| Error::Setup(format!("prctl(PR_SET_DUMPABLE, 0): {e}")))?;
    Ok(())
}

/// Runs lb-sync until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    let running = start(config, shutdown.clone()).await?;
    shutdown.cancelled().await;
    running.shutdown().await;
    Ok(())
}

/// A Kubernetes client: from `kube_api_url` if set (e.g. `kubectl proxy`), else from
/// `kubeconfig` if set, otherwise the in-cluster service account or the local kubeconfig.
pub async fn kube_client(config: &Config) -> Result<kube::Client, Error> {
    devgate_gateway::bus::tls::ensure_crypto_provider();
    let kube_config = if let Some(url) = &config.kube_api_url {
        kube::Config::new(
            url.parse()
                .map_err(|e| Error::Kube(format!("kube_api_url {url:?}: {e}")))?,
        )
    } else if let Some(path) = &config.kubeconfig {
        let file = kube::config::Kubeconfig::read_from(path)
            .map_err(|e| Error::Kube(format!("kubeconfig {}: {e}", path.display())))?;
        kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
            .await
            .map_err(|e| Error::Kube(format!("kubeconfig {}: {e}", path.display())))?
    } else {
        kube::Config::infer()
            .await
            .map_err(|e| Error::Kube(format!("no in-cluster config or kubeconfig: {e}")))?
    };
    kube::Client::try_from(kube_config).map_err(|e| Error::Kube(e.to_string()))
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    #[test]
    fn the_process_is_made_non_dumpable() {
        super::harden_process().expect("prctl");
        assert!(
            !nix::sys::prctl::get_dumpable().expect("prctl"),
            "same-user processes must not read this one's /proc entries"
        );
    }
}
