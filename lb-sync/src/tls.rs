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
pub fn fingerprint(files: &[&Path]) -> Result<String, TlsFileError> {
    let mut hash = Sha256::new();
    for path in files {
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

/// Re-reads `files` every `interval` until `shutdown` and publishes each new fingerprint. A file
/// that cannot be read (mid-rotation, or removed) keeps the last good fingerprint, so nginx
/// keeps serving what it has; the failure is logged once per distinct error and counted as
/// `failures{stage="tls_files"}`.
pub async fn watch_files(
    files: Vec<PathBuf>,
    interval: Duration,
    tx: watch::Sender<String>,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let paths: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    let mut last_error: Option<String> = None;
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        match fingerprint(&paths) {
            Ok(new) => {
                last_error = None;
                if *tx.borrow() != new {
                    tracing::info!(
                        old = %*tx.borrow(),
                        new = %new,
                        "device TLS files changed; nginx will reload with them"
                    );
                    tx.send_replace(new);
                }
            }
            Err(error) => {
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
        rx.changed().await.expect("a new fingerprint");
        let renewed = rx.borrow_and_update().clone();
        assert_ne!(renewed, initial);
        assert_eq!(renewed, fingerprint(&[&cert]).expect("fingerprint"));

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
