//! The files of the devices' TLS, which nginx terminates: reading them to notice renewals.
//!
//! nginx reads certificates only when it loads its configuration, so a certificate renewed in
//! place (cert-manager rewriting a mounted Secret) would be served only after the next reload
//! that happened for another reason, possibly after the old one expired. lb-sync hashes the
//! files every `tls_check_interval_s`; a new hash is part of the rendered text, so the
//! controller validates and reloads exactly as for a change of gateways.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Why the TLS files could not be read.
#[derive(Debug, thiserror::Error)]
#[error("reading {path}: {source}")]
pub struct TlsFileError {
    /// The file.
    pub path: PathBuf,
    /// The OS error.
    pub source: std::io::Error,
}

/// A short hash of the files' contents, in order (each length-prefixed, so moving bytes from
/// one file to the next changes it): 16 hex digits, enough to tell renewals apart in a log
/// line and in the rendered text.
pub fn fingerprint(files: &[impl AsRef<Path>]) -> Result<String, TlsFileError> {
    let mut hash = Sha256::new();
    for path in files {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| TlsFileError {
            path: path.to_path_buf(),
            source,
        })?;
        hash.update((bytes.len() as u64).to_be_bytes());
        hash.update(&bytes);
    }
    let digest = hash.finalize();
    Ok(hex::encode(&digest[..8]))
}

/// Re-reads `files` every `interval` until `shutdown` and publishes each new fingerprint once
/// two consecutive reads agree: the files are read one after another, and a renewal that
/// replaces them at different moments (certbot; the kubelet's swap, read across it) would
/// otherwise publish a certificate with the other one's key, which nginx refuses. A file that
/// cannot be read (mid-rotation, or removed) keeps the last good fingerprint, so nginx keeps
/// serving what it has; the failure is logged once per distinct error and counted as
/// `failures{stage="tls_files"}`.
pub async fn watch_files(
    files: Vec<PathBuf>,
    interval: Duration,
    tx: watch::Sender<String>,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let mut last_error: Option<String> = None;
    // A changed fingerprint seen once, published when the next read agrees.
    let mut candidate: Option<String> = None;
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        match fingerprint(&files) {
            Ok(new) => {
                if last_error.take().is_some() {
                    tracing::info!("device TLS files are readable again");
                }
                if *tx.borrow() == new {
                    candidate = None;
                } else if candidate.as_deref() == Some(new.as_str()) {
                    tracing::info!(
                        old = %*tx.borrow(),
                        new = %new,
                        "device TLS files changed; nginx will reload with them"
                    );
                    candidate = None;
                    tx.send_replace(new);
                } else {
                    candidate = Some(new);
                }
            }
            Err(error) => {
                // Agreement needs two consecutive good reads.
                candidate = None;
                metrics.failed("tls_files");
                let text = error.to_string();
                if last_error.as_deref() != Some(&text) {
                    tracing::error!(%error, "cannot read the device TLS files; nginx keeps the ones it loaded");
                    last_error = Some(text);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fingerprint_follows_the_contents_and_their_split() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let write = |ab: (&str, &str)| {
            std::fs::write(&a, ab.0).expect("write a");
            std::fs::write(&b, ab.1).expect("write b");
            fingerprint(&[&a, &b]).expect("fingerprint")
        };
        let first = write(("cert", "key"));
        assert_eq!(first.len(), 16);
        assert_eq!(first, write(("cert", "key")), "same contents, same hash");
        assert_ne!(first, write(("cert2", "key")), "a renewed file");
        assert_ne!(
            write(("ab", "c")),
            write(("a", "bc")),
            "bytes moved across files"
        );
    }

    #[test]
    fn a_missing_file_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("tls.crt");
        let error = fingerprint(&[&missing]).expect_err("missing file");
        assert!(error.to_string().contains("tls.crt"), "{error}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_state_seen_once_is_not_published() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cert = dir.path().join("tls.crt");
        std::fs::write(&cert, "one").expect("write");
        let (tx, mut rx) = watch::channel(fingerprint(&[&cert]).expect("fingerprint"));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(watch_files(
            vec![cert.clone()],
            Duration::from_secs(10),
            tx,
            Metrics::default(),
            shutdown.clone(),
        ));
        // Checks run at t = 0, 10, 20, 30 s; the files change between them.
        tokio::time::sleep(Duration::from_secs(5)).await;
        std::fs::write(&cert, "half-renewed").expect("write");
        tokio::time::sleep(Duration::from_secs(10)).await;
        std::fs::write(&cert, "renewed").expect("write");
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(
            !rx.has_changed().expect("sender alive"),
            "the state read only at t = 10 s must not be published"
        );
        rx.changed().await.expect("published at t = 30 s");
        assert_eq!(
            *rx.borrow(),
            fingerprint(&[&cert]).expect("fingerprint"),
            "the state two reads agreed on"
        );
        shutdown.cancel();
        task.await.expect("watcher ends");
    }

    #[tokio::test(start_paused = true)]
    async fn renewed_files_are_published_and_unreadable_ones_keep_the_last() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cert = dir.path().join("tls.crt");
        std::fs::write(&cert, "one").expect("write");
        let initial = fingerprint(&[&cert]).expect("fingerprint");
        let (tx, mut rx) = watch::channel(initial.clone());
        let metrics = Metrics::default();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(watch_files(
            vec![cert.clone()],
            Duration::from_secs(10),
            tx,
            metrics.clone(),
            shutdown.clone(),
        ));

        std::fs::write(&cert, "two").expect("rewrite");
        let started = tokio::time::Instant::now();
        rx.changed().await.expect("a new fingerprint");
        let renewed = rx.borrow_and_update().clone();
        assert_ne!(renewed, initial);
        assert_eq!(renewed, fingerprint(&[&cert]).expect("fingerprint"));
        assert!(
            started.elapsed() >= Duration::from_secs(10),
            "published only after a second read agreed"
        );

        std::fs::remove_file(&cert).expect("remove");
        // Two more checks find nothing to read: the fingerprint stays, the failures count.
        tokio::time::sleep(Duration::from_secs(21)).await;
        assert!(!rx.has_changed().expect("sender alive"));
        assert_eq!(*rx.borrow(), renewed);
        assert!(metrics.failures_at("tls_files") >= 2);

        shutdown.cancel();
        task.await.expect("watcher ends on shutdown");
    }
}
