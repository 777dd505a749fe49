//! TLS client configurations built once from the operator's files, so a bad CA or key fails
//! configuration checks at start-up rather than every reconnect: the gateway's NATS link, and
//! devices (`devsim`, the tests) dialling a balancer that terminates TLS.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Why the TLS settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("{what} {path}: {reason}")]
    File {
        /// Which setting.
        what: String,
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// No trust anchors: neither a CA file nor any usable system certificate.
    #[error("no CA certificates to verify the server with (give {0})")]
    NoRoots(String),
    /// The name to verify the server's certificate against is neither a DNS name nor an IP.
    #[error("server name {name:?}: {reason}")]
    ServerName {
        /// As given.
        name: String,
        /// Why rustls refused it.
        reason: String,
    },
    /// rustls refused the combination (e.g. a key that does not match the certificate).
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The operator's TLS files for the NATS connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM bundle of the CAs that may sign the NATS server's certificate; `None`: the system's.
    pub ca: Option<PathBuf>,
    /// PEM client certificate chain and key, for servers that verify clients (mutual TLS).
    pub client: Option<(PathBuf, PathBuf)>,
}

/// Builds the rustls client configuration for the NATS link (errors name the `nats_tls_*`
/// settings).
pub fn client_config(files: &TlsFiles) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    client_config_named(files, "nats_tls")
}

/// Builds a rustls client configuration; errors name the settings `<prefix>_ca`,
/// `<prefix>_cert` and `<prefix>_key`. ring is named explicitly: the workspace links both of
/// rustls' crypto providers, and relying on a process default would be ambiguous.
pub fn client_config_named(
    files: &TlsFiles,
    prefix: &str,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let setting = |name: &str| format!("{prefix}_{name}");
    let mut roots = rustls::RootCertStore::empty();
    match &files.ca {
        Some(path) => {
            for cert in certificates(setting("ca"), path)? {
                roots.add(cert).map_err(|e| TlsError::File {
                    what: setting("ca"),
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(native.certs);
        }
    }
    if roots.is_empty() {
        return Err(TlsError::NoRoots(setting("ca")));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let config = match &files.client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = certificates(setting("cert"), cert)?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::File {
                what: setting("key"),
                path: key.clone(),
                reason: e.to_string(),
            })?;
            builder.with_client_auth_cert(chain, key)?
        }
    };
    Ok(Arc::new(config))
}

pub(crate) fn certificates(
    what: String,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |reason: String| TlsError::File {
        what: what.clone(),
        path: path.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no PEM certificate in the file".into()));
    }
    Ok(certs)
}

impl TlsFiles {
    /// The same files for an async-nats client (bridge-api, lb-sync), which upgrades to TLS for
    /// `tls://` URLs and for servers that require it.
    pub fn apply(&self, mut options: async_nats::ConnectOptions) -> async_nats::ConnectOptions {
        if let Some(ca) = &self.ca {
            options = options.add_root_certificates(ca.clone());
        }
        if let Some((cert, key)) = &self.client {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        options
    }
}

/// Makes ring rustls' process-wide default unless one is set already. async-nats (bridge-api,
/// lb-sync) and kube's client build their TLS configuration from that default, and a build
/// that links both of rustls' providers (any dependency enabling aws-lc-rs would do it) has
/// none: its first TLS connection would panic. Idempotent; call before connecting.
pub fn ensure_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race to another caller is fine: a default is then set either way.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// The `--nats-tls-*` flags of every component that talks to NATS (gateway, bridge-api,
/// lb-sync), flattened into each command line; the keys are the same in every config file.
#[derive(Debug, Clone, Default, clap::Args, serde::Serialize)]
pub struct NatsTlsFlags {
    /// PEM CA bundle for TLS to NATS [default: the system's CAs].
    #[arg(long, env = "DEVGATE_NATS_TLS_CA")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats_tls_ca: Option<PathBuf>,
    /// PEM client certificate for NATS servers that verify clients (with --nats-tls-key).
    #[arg(long, env = "DEVGATE_NATS_TLS_CERT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats_tls_cert: Option<PathBuf>,
    /// PEM private key of --nats-tls-cert.
    #[arg(long, env = "DEVGATE_NATS_TLS_KEY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats_tls_key: Option<PathBuf>,
}

/// A configuration carrying a NATS URL list and the three `nats_tls_*` settings (gateway,
/// bridge-api, lb-sync): TLS is decided, checked and turned into [`TlsFiles`] the same way
/// everywhere.
pub trait NatsTlsSettings {
    /// The comma-separated NATS server URLs.
    fn nats_urls(&self) -> &str;

    /// The CA bundle, client certificate and key paths as configured.
    fn nats_tls_paths(&self) -> (Option<&Path>, Option<&Path>, Option<&Path>);

    /// The files when TLS is configured at all (a `tls://` URL or any file; no file means the
    /// system's CAs), or why they cannot be used. Builds the rustls configuration once to
    /// check it, so validation catches unreadable files, a key without its certificate, and a
    /// system without CAs.
    fn nats_tls_checked(&self) -> Result<Option<TlsFiles>, String> {
        let (ca, cert, key) = self.nats_tls_paths();
        if cert.is_some() != key.is_some() {
            return Err("nats_tls_cert and nats_tls_key go together".into());
        }
        let files = TlsFiles {
            ca: ca.map(Path::to_owned),
            client: cert.map(Path::to_owned).zip(key.map(Path::to_owned)),
        };
        let tls_url = self
            .nats_urls()
            .split(',')
            .any(|url| url.trim().starts_with("tls://"));
        if !tls_url && files == TlsFiles::default() {
            return Ok(None);
        }
        client_config(&files).map_err(|e| e.to_string())?;
        Ok(Some(files))
    }

    /// The files when TLS is configured and usable (validation reports them otherwise).
    fn nats_tls(&self) -> Option<TlsFiles> {
        self.nats_tls_checked().ok().flatten()
    }
}

/// Implements [`NatsTlsSettings`] for a configuration struct with the usual fields (`nats_url`,
/// `nats_tls_ca`, `nats_tls_cert`, `nats_tls_key`): the same glue in every component.
#[macro_export]
macro_rules! impl_nats_tls_settings {
    ($config:ty) => {
        impl $crate::bus::tls::NatsTlsSettings for $config {
            fn nats_urls(&self) -> &str {
                &self.nats_url
            }

            fn nats_tls_paths(
                &self,
            ) -> (
                Option<&std::path::Path>,
                Option<&std::path::Path>,
                Option<&std::path::Path>,
            ) {
                (
                    self.nats_tls_ca.as_deref(),
                    self.nats_tls_cert.as_deref(),
                    self.nats_tls_key.as_deref(),
                )
            }
        }
    };
}
