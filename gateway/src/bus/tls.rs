//! TLS for the gateway's NATS link: the client configuration built once from the operator's
//! files, so a bad CA or key fails configuration checks at start-up rather than every reconnect.

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
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// No trust anchors: neither a CA file nor any usable system certificate.
    #[error("no CA certificates to verify the NATS server with (give nats_tls_ca)")]
    NoRoots,
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

/// Builds the rustls client configuration. ring is named explicitly: the workspace links both
/// of rustls' crypto providers, and relying on a process default would be ambiguous.
pub fn client_config(files: &TlsFiles) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    match &files.ca {
        Some(path) => {
            for cert in certificates("nats_tls_ca", path)? {
                roots.add(cert).map_err(|e| TlsError::File {
                    what: "nats_tls_ca",
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
        return Err(TlsError::NoRoots);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let config = match &files.client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = certificates("nats_tls_cert", cert)?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::File {
                what: "nats_tls_key",
                path: key.clone(),
                reason: e.to_string(),
            })?;
            builder.with_client_auth_cert(chain, key)?
        }
    };
    Ok(Arc::new(config))
}

fn certificates(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |reason: String| TlsError::File {
        what,
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
