//! TLS for devices, terminated by the gateway itself, so that a device's client certificate
//! can be bound to the id it logs in with.
//!
//! nginx can terminate TLS and verify client certificates, but it cannot tell the gateway whose
//! certificate it verified (the PROXY header carries addresses only). Behind it, any device
//! holding some valid certificate and a leaked token can log in as that token's device. Here
//! the gateway sees the certificate, and with `device_tls_client_ca` a login is refused unless
//! the certificate names the device id (its subject CN or a DNS name in its SANs, the usual
//! ways a fleet CA issues per-device certificates). nginx then forwards the bytes untouched
//! (lb-sync `--tls-passthrough`).
//!
//! The files are re-read every `device_tls_check_ms`, so a renewed certificate (cert-manager
//! rewriting a mounted Secret) is served to new connections without a restart. A change is
//! applied once two consecutive reads agree, so a certificate and key replaced a moment apart
//! are never loaded half-renewed; files that do not load keep the previous configuration.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use crate::contract::DeviceId;
use crate::server::Shared;

/// Why the device TLS files cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DeviceTlsError {
    /// A file could not be read, or holds no usable PEM.
    #[error("{setting} {path}: {reason}")]
    File {
        /// Which setting (`device_tls_cert`, ...).
        setting: &'static str,
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// rustls refused the combination (a key that does not match the certificate, a CA it
    /// cannot use).
    #[error("device TLS: {0}")]
    Config(String),
}

/// The operator's device TLS files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceTlsFiles {
    /// PEM certificate chain the gateway presents to devices.
    pub cert: PathBuf,
    /// Its PEM private key.
    pub key: PathBuf,
    /// PEM CAs that issue device certificates: when set, every device must present one, and
    /// it must name the device's id.
    pub client_ca: Option<PathBuf>,
}

/// The contents of the files, as read together: what a reload compares and builds from.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Contents {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

/// Largest file read: certificate bundles are kilobytes; this only stops a wrong path (a
/// device file, a huge log) from being read into memory.
const MAX_FILE_BYTES: u64 = 1024 * 1024;

impl DeviceTlsFiles {
    fn read(&self) -> Result<Contents, DeviceTlsError> {
        let read = |setting: &'static str, path: &PathBuf| {
            let err = |reason: String| DeviceTlsError::File {
                setting,
                path: path.clone(),
                reason,
            };
            use std::io::Read;
            let file = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
            let mut bytes = Vec::new();
            file.take(MAX_FILE_BYTES + 1)
                .read_to_end(&mut bytes)
                .map_err(|e| err(e.to_string()))?;
            if bytes.len() as u64 > MAX_FILE_BYTES {
                return Err(err(format!(
                    "over {MAX_FILE_BYTES} bytes; a PEM file is far smaller"
                )));
            }
            Ok(bytes)
        };
        Ok(Contents {
            cert: read("device_tls_cert", &self.cert)?,
            key: read("device_tls_key", &self.key)?,
            client_ca: self
                .client_ca
                .as_ref()
                .map(|path| read("device_tls_client_ca", path))
                .transpose()?,
        })
    }

    fn build(&self, contents: &Contents) -> Result<Loaded, DeviceTlsError> {
        let file_err =
            |setting: &'static str, path: &PathBuf, reason: String| DeviceTlsError::File {
                setting,
                path: path.clone(),
                reason,
            };
        let chain = pem_certificates(&contents.cert)
            .map_err(|reason| file_err("device_tls_cert", &self.cert, reason))?;
        let not_after = not_after(&chain[0])
            .map_err(|reason| file_err("device_tls_cert", &self.cert, reason))?;
        let key = PrivateKeyDer::from_pem_slice(&contents.key)
            .map_err(|e| file_err("device_tls_key", &self.key, e.to_string()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| DeviceTlsError::Config(e.to_string()))?;
        let builder = match (&self.client_ca, &contents.client_ca) {
            (Some(path), Some(pem)) => {
                let mut roots = rustls::RootCertStore::empty();
                for ca in pem_certificates(pem)
                    .map_err(|reason| file_err("device_tls_client_ca", path, reason))?
                {
                    roots
                        .add(ca)
                        .map_err(|e| file_err("device_tls_client_ca", path, e.to_string()))?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|e| file_err("device_tls_client_ca", path, e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
            _ => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(chain, key).map_err(|e| {
            DeviceTlsError::Config(format!("device_tls_cert and device_tls_key: {e}"))
        })?;
        // Devices reconnect in storms (a gateway restart, a network blip): resumed handshakes
        // skip the certificate exchange and the signature. Tickets are per gateway process.
        config.session_storage = rustls::server::ServerSessionMemoryCache::new(4096);
        Ok(Loaded {
            config: Arc::new(config),
            not_after,
        })
    }
}

/// A built configuration and when its certificate expires.
struct Loaded {
    config: Arc<rustls::ServerConfig>,
    not_after: u64,
}

fn pem_certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    if certs.is_empty() {
        return Err("no PEM certificate in the file".into());
    }
    Ok(certs)
}

/// The gateway's device TLS: the configuration new connections get, replaced when the files
/// change.
pub struct DeviceTls {
    files: DeviceTlsFiles,
    current: RwLock<Arc<rustls::ServerConfig>>,
    /// What the configuration in use was built from.
    applied: RwLock<Contents>,
    not_after: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for DeviceTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceTls")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl DeviceTls {
    /// Reads and checks the files: a gateway that cannot serve TLS must not start and take
    /// devices in some other way.
    pub fn load(files: DeviceTlsFiles) -> Result<Self, DeviceTlsError> {
        let contents = files.read()?;
        let loaded = files.build(&contents)?;
        Ok(DeviceTls {
            files,
            current: RwLock::new(loaded.config),
            applied: RwLock::new(contents),
            not_after: loaded.not_after.into(),
        })
    }

    /// The configuration for a new connection.
    pub fn config(&self) -> Arc<rustls::ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Whether devices must present a certificate naming their id.
    pub fn binds_ids(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// When the certificate in use expires, in Unix seconds.
    pub fn not_after(&self) -> u64 {
        self.not_after.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// One check of the files. `seen` is what the previous check read: a change is applied
    /// only when this read equals it (two reads agree).
    fn check(&self, seen: &mut Option<Contents>) -> Result<Reload, DeviceTlsError> {
        let contents = match self.files.read() {
            Ok(c) => c,
            Err(e) => {
                *seen = None;
                return Err(e);
            }
        };
        let applied = self
            .applied
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        if contents == applied {
            *seen = Some(contents);
            return Ok(Reload::Unchanged);
        }
        if seen.as_ref() != Some(&contents) {
            *seen = Some(contents);
            return Ok(Reload::Settling);
        }
        let loaded = self.files.build(&contents)?;
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = loaded.config;
        *self
            .applied
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = contents;
        self.not_after
            .store(loaded.not_after, std::sync::atomic::Ordering::Relaxed);
        Ok(Reload::Applied)
    }
}

/// What one check of the files did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reload {
    Unchanged,
    /// Changed since what is in use; applied if the next read is the same.
    Settling,
    Applied,
}

/// Re-reads the files every `device_tls_check_ms` until the gateway stops.
pub(crate) fn spawn(shared: Arc<Shared>) -> Option<JoinHandle<()>> {
    shared.device_tls.as_ref()?;
    Some(tokio::spawn(async move {
        let Some(tls) = shared.device_tls.as_ref() else {
            return;
        };
        let mut ticks =
            tokio::time::interval(Duration::from_millis(shared.config.device_tls_check_ms));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        let mut seen = None;
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                () = shared.hard_stop.cancelled() => return,
            }
            match tls.check(&mut seen) {
                Ok(Reload::Applied) => {
                    shared.metrics.tls_stale.set(0);
                    shared
                        .metrics
                        .tls_certificate_expiry
                        .set(tls.not_after() as i64);
                    tracing::info!(instance = %shared.instance, not_after = tls.not_after(), "device TLS files changed; new connections get the new certificate");
                }
                Ok(Reload::Unchanged) => {
                    shared.metrics.tls_stale.set(0);
                }
                Ok(Reload::Settling) => {}
                Err(error) => {
                    if shared.metrics.tls_stale.get() == 0 {
                        tracing::error!(instance = %shared.instance, %error, "device TLS files not loaded; the previous certificate stays in use");
                    }
                    shared.metrics.tls_stale.set(1);
                }
            }
        }
    }))
}

/// Why a device's TLS handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The peer closed (or reset) without sending a byte: a TCP health check (nginx's
    /// readiness probe through the balancer, a cloud load balancer's), not a device. Not a
    /// failure.
    #[error("connection closed before any TLS byte")]
    Silent,
    /// The peer closed before the handshake completed.
    #[error("connection closed during the TLS handshake")]
    Closed,
    /// The peer broke TLS: not TLS at all, no certificate or an untrusted one, no common
    /// cipher. rustls has queued an alert saying which.
    #[error("TLS handshake failed: {0}")]
    Tls(#[from] rustls::Error),
    /// Socket error.
    #[error("i/o error in the TLS handshake: {0}")]
    Io(#[from] std::io::Error),
}

/// Runs the server side of a device's TLS handshake over `tcp`. `leftover` holds bytes already
/// read from the socket (after a PROXY header): the start of the ClientHello. Bound it with a
/// timeout: it waits for the peer.
pub(crate) async fn accept(
    tcp: &TcpStream,
    config: Arc<rustls::ServerConfig>,
    leftover: &mut BytesMut,
) -> Result<rustls::ServerConnection, HandshakeError> {
    let mut tls = rustls::ServerConnection::new(config)?;
    let mut heard = !leftover.is_empty();
    let fail = |tls: &mut rustls::ServerConnection, tcp: &TcpStream, e: rustls::Error| {
        // Send rustls' alert, as far as the socket takes it: the device learns why.
        let _ = crate::conn::flush_tls(tls, tcp);
        HandshakeError::Tls(e)
    };
    while !leftover.is_empty() {
        let n = tls.read_tls(&mut &leftover[..])?;
        leftover.advance(n);
        if let Err(e) = tls.process_new_packets() {
            return Err(fail(&mut tls, tcp, e));
        }
    }
    loop {
        while !crate::conn::flush_tls(&mut tls, tcp)? {
            tcp.writable().await?;
        }
        if !tls.is_handshaking() {
            return Ok(tls);
        }
        tcp.readable().await?;
        match crate::conn::read_tls(&mut tls, tcp) {
            Ok(0) if heard => return Err(HandshakeError::Closed),
            Ok(0) => return Err(HandshakeError::Silent),
            Ok(_) => heard = true,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            // Health checks often end with a reset instead of a FIN.
            Err(e) if !heard && e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Err(HandshakeError::Silent);
            }
            Err(e) => return Err(e.into()),
        }
        if let Err(e) = tls.process_new_packets() {
            return Err(fail(&mut tls, tcp, e));
        }
    }
}

/// The device ids a certificate can stand for: the DNS names of its subjectAltName extension,
/// or, when it has none, its subject's common names. As in RFC 6125 the CN is ignored beside
/// DNS SANs: a CA that vets only the SANs must not have issued a usable CN by accident.
pub fn certificate_names(der: &[u8]) -> Result<Vec<String>, String> {
    use x509_cert::der::Decode;
    use x509_cert::der::asn1::{Ia5StringRef, PrintableStringRef, Utf8StringRef};
    use x509_cert::ext::pkix::SubjectAltName;
    use x509_cert::ext::pkix::name::GeneralName;

    let cert = x509_cert::Certificate::from_der(der).map_err(|e| e.to_string())?;
    let mut dns_names = Vec::new();
    if let Some((_, san)) = cert
        .tbs_certificate
        .get::<SubjectAltName>()
        .map_err(|e| e.to_string())?
    {
        for name in san.0 {
            if let GeneralName::DnsName(dns) = name {
                dns_names.push(dns.as_str().to_owned());
            }
        }
    }
    if !dns_names.is_empty() {
        return Ok(dns_names);
    }
    let mut common_names = Vec::new();
    for rdn in cert.tbs_certificate.subject.0.iter() {
        for atv in rdn.0.iter() {
            if atv.oid != x509_cert::der::oid::db::rfc4519::CN {
                continue;
            }
            let value = &atv.value;
            let text = Utf8StringRef::try_from(value)
                .map(|s| s.as_str().to_owned())
                .or_else(|_| PrintableStringRef::try_from(value).map(|s| s.as_str().to_owned()))
                .or_else(|_| Ia5StringRef::try_from(value).map(|s| s.as_str().to_owned()));
            if let Ok(text) = text {
                common_names.push(text);
            }
        }
    }
    Ok(common_names)
}

/// When the first certificate of a PEM file expires, in Unix seconds (what
/// `devgate_gateway_tls_certificate_expiry_timestamp_seconds` shows for it).
pub fn not_after_pem(pem: &[u8]) -> Result<u64, String> {
    not_after(&pem_certificates(pem)?[0])
}

/// When the certificate expires, in Unix seconds.
fn not_after(cert: &CertificateDer<'_>) -> Result<u64, String> {
    use x509_cert::der::Decode;
    let cert = x509_cert::Certificate::from_der(cert).map_err(|e| e.to_string())?;
    Ok(cert
        .tbs_certificate
        .validity
        .not_after
        .to_unix_duration()
        .as_secs())
}

/// Whether the certificate the device presented names `id`; the error says what it names
/// instead, for the device's ERROR and the log.
pub(crate) fn check_binding(tls: &rustls::ServerConnection, id: &DeviceId) -> Result<(), String> {
    let Some(leaf) = tls.peer_certificates().and_then(|chain| chain.first()) else {
        // The verifier requires a certificate whenever ids are bound; this is defence in depth.
        return Err("no client certificate; this gateway binds certificates to device ids".into());
    };
    let names =
        certificate_names(leaf).map_err(|e| format!("unreadable client certificate: {e}"))?;
    if names.iter().any(|n| n == id.as_str()) {
        return Ok(());
    }
    let shown: Vec<String> = names.iter().take(4).map(|n| format!("{n:?}")).collect();
    Err(format!(
        "the client certificate is issued to {}, not to device id {:?}",
        if shown.is_empty() {
            "no name (no subject CN or DNS SAN)".to_owned()
        } else {
            shown.join(", ")
        },
        id.as_str()
    ))
}

/// A file of the test TLS material (`tests/fixtures/tls`), for the crate's unit tests.
#[cfg(test)]
pub(crate) fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/tls")
        .join(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn der(name: &str) -> Vec<u8> {
        let pem = std::fs::read(fixture(name)).expect("fixture");
        pem_certificates(&pem).expect("certificates")[0].to_vec()
    }

    #[test]
    fn names_come_from_the_subject_cn_and_dns_sans() {
        assert_eq!(
            certificate_names(&der("device.pem")).expect("parses"),
            ["dev-1"]
        );
        assert_eq!(
            certificate_names(&der("device-chained.pem")).expect("parses"),
            ["dev-2"]
        );
        // CN localhost, SAN IP:127.0.0.1 and DNS:localhost: IP SANs are not device ids.
        assert_eq!(
            certificate_names(&der("server.pem")).expect("parses"),
            ["localhost"]
        );
        // CN not-the-id, SAN DNS:dev-5: the SAN alone counts.
        assert_eq!(
            certificate_names(&der("device-san.pem")).expect("parses"),
            ["dev-5"]
        );
    }

    #[test]
    fn a_certificate_that_does_not_parse_is_an_error() {
        assert!(certificate_names(b"\x30\x03\x02\x01\x01").is_err());
    }

    fn files(cert: &str, key: &str, ca: Option<&str>) -> DeviceTlsFiles {
        DeviceTlsFiles {
            cert: fixture(cert),
            key: fixture(key),
            client_ca: ca.map(fixture),
        }
    }

    #[test]
    fn loading_names_the_setting_at_fault() {
        let missing = DeviceTls::load(files("server.pem", "nope.key", None)).expect_err("no key");
        assert!(
            missing.to_string().starts_with("device_tls_key "),
            "{missing}"
        );
        let mismatch =
            DeviceTls::load(files("server.pem", "device.key", None)).expect_err("wrong key");
        assert!(
            mismatch
                .to_string()
                .contains("device_tls_cert and device_tls_key"),
            "{mismatch}"
        );
        let not_a_ca = DeviceTls::load(files("server.pem", "server.key", Some("server.key")))
            .expect_err("a key is not a CA bundle");
        assert!(
            not_a_ca.to_string().starts_with("device_tls_client_ca "),
            "{not_a_ca}"
        );
        let tls =
            DeviceTls::load(files("server.pem", "server.key", Some("ca.pem"))).expect("loads");
        assert!(tls.binds_ids());
        // The fixtures are valid for 100 years from 2025.
        assert!(tls.not_after() > 4_000_000_000, "{}", tls.not_after());
    }

    #[test]
    fn a_change_applies_once_two_reads_agree_and_a_bad_one_keeps_the_old() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cert = dir.path().join("tls.crt");
        let key = dir.path().join("tls.key");
        std::fs::copy(fixture("server.pem"), &cert).expect("copy");
        std::fs::copy(fixture("server.key"), &key).expect("copy");
        let tls = DeviceTls::load(DeviceTlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: None,
        })
        .expect("loads");
        let first = tls.config();
        let mut seen = None;
        assert_eq!(tls.check(&mut seen).expect("reads"), Reload::Unchanged);
        // Half a renewal: the new certificate with the old key. Not applied on the first read,
        // and refused on the second, keeping what is in use.
        std::fs::copy(fixture("server-rotated.pem"), &cert).expect("copy");
        assert_eq!(tls.check(&mut seen).expect("reads"), Reload::Settling);
        assert!(tls.check(&mut seen).is_err());
        assert!(Arc::ptr_eq(&first, &tls.config()));
        std::fs::copy(fixture("server-rotated.key"), &key).expect("copy");
        assert_eq!(tls.check(&mut seen).expect("reads"), Reload::Settling);
        assert_eq!(tls.check(&mut seen).expect("reads"), Reload::Applied);
        assert!(!Arc::ptr_eq(&first, &tls.config()));
        assert_eq!(tls.check(&mut seen).expect("reads"), Reload::Unchanged);
        std::fs::remove_file(&key).expect("remove");
        assert!(tls.check(&mut seen).is_err());
    }
}
