//! Device ids that may not log in, whatever token they present.
//!
//! A device's token is derived from its id and the fleet secret, so one leaked token cannot be
//! revoked on its own: without this list the only remedy would be rotating the fleet secret
//! and re-provisioning every device. The list is a plain file, one id per line, so on
//! Kubernetes it is a mounted ConfigMap that an operator edits with `kubectl`; the gateway
//! re-reads it when its content changes and closes the live sessions of ids newly listed.
//!
//! A change that cannot be applied (the file vanished, an id is invalid) keeps the list in
//! force: failing open would re-admit every revoked device because of a typo.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::contract::{DeviceId, IdError};
use crate::server::Shared;

/// Why a denylist could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum DenylistError {
    /// The file could not be read.
    #[error("cannot read the denied-devices file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A line is not a valid device id.
    #[error("denied-devices file {path}, line {line}: {id:?} is not a device id: {source}")]
    BadId {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The offending text (at most 64 characters of it).
        id: String,
        /// What is wrong with it.
        source: IdError,
    },
}

/// The ids denied now. Read on every login (twice), written only when the file changes, so a
/// read lock around a shared set costs a login next to nothing, even when the list is empty.
#[derive(Debug, Default)]
pub struct Denylist {
    ids: RwLock<Arc<HashSet<DeviceId>>>,
}

impl Denylist {
    /// Whether `id` is denied.
    pub fn contains(&self, id: &DeviceId) -> bool {
        let ids = self.ids.read().unwrap_or_else(|p| p.into_inner());
        !ids.is_empty() && ids.contains(id)
    }

    /// Number of denied ids.
    pub fn len(&self) -> usize {
        self.ids.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether no id is denied.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Puts `ids` in force and returns those that were not denied before: the sessions to
    /// close. Callers must look for live sessions only *after* this returns, so a login that
    /// registers meanwhile is caught by its own check of the new list (see `session.rs`).
    pub fn replace(&self, ids: HashSet<DeviceId>) -> Vec<DeviceId> {
        let mut current = self.ids.write().unwrap_or_else(|p| p.into_inner());
        let added = ids.difference(&current).cloned().collect();
        *current = Arc::new(ids);
        added
    }
}

/// Parses a denylist: one device id per line; blank lines and everything after a `#` are
/// ignored (device ids cannot contain `#`), so each entry can carry its reason.
pub fn parse(path: &Path, text: &str) -> Result<HashSet<DeviceId>, DenylistError> {
    let mut ids = HashSet::new();
    for (n, line) in text.lines().enumerate() {
        let entry = line.split('#').next().unwrap_or_default().trim();
        if entry.is_empty() {
            continue;
        }
        let id = DeviceId::parse(entry).map_err(|source| DenylistError::BadId {
            path: path.to_owned(),
            line: n + 1,
            id: entry.chars().take(64).collect(),
            source,
        })?;
        ids.insert(id);
    }
    Ok(ids)
}

/// Reads and parses the file: what the gateway does before it accepts its first device, so a
/// gateway never starts with a list it cannot read.
pub fn load(path: &Path) -> Result<(HashSet<DeviceId>, Vec<u8>), DenylistError> {
    let bytes = std::fs::read(path).map_err(|source| DenylistError::Read {
        path: path.to_owned(),
        source,
    })?;
    let ids = parse(path, &String::from_utf8_lossy(&bytes))?;
    Ok((ids, bytes))
}

/// Starts watching `path` (already loaded as `loaded`); the task ends at the hard stop.
pub(crate) fn spawn(shared: Arc<Shared>, path: PathBuf, loaded: Vec<u8>) -> JoinHandle<()> {
    tokio::spawn(watch(shared, path, loaded))
}

/// Checks the file every `denied_devices_check_ms` and applies a changed content. Polling the
/// content rather than waiting for inotify events: a ConfigMap update is a symlink swap of
/// the directory, which file watches on the file itself miss, and reading a small file every
/// few seconds costs nothing.
async fn watch(shared: Arc<Shared>, path: PathBuf, mut last: Vec<u8>) {
    let period = Duration::from_millis(shared.config.denied_devices_check_ms);
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    let mut failing = false;
    loop {
        tokio::select! {
            () = shared.hard_stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let bytes = match tokio::fs::read(&path).await {
            Ok(bytes) => bytes,
            Err(source) => {
                if !failing {
                    failing = true;
                    shared.metrics.denylist_errors.inc();
                    let error = DenylistError::Read {
                        path: path.clone(),
                        source,
                    };
                    tracing::error!(instance = %shared.instance, %error, denied = shared.denylist.len(), "denylist not re-read; the previous list stays in force");
                }
                continue;
            }
        };
        failing = false;
        if bytes == last {
            continue;
        }
        match parse(&path, &String::from_utf8_lossy(&bytes)) {
            Ok(ids) => apply(&shared, ids),
            Err(error) => {
                shared.metrics.denylist_errors.inc();
                tracing::error!(instance = %shared.instance, %error, denied = shared.denylist.len(), "denylist change refused; the previous list stays in force");
            }
        }
        // A refused content is not re-parsed (and re-logged) every period; the next edit is.
        last = bytes;
    }
}

/// Puts a new list in force and closes the live sessions of ids it adds.
fn apply(shared: &Shared, ids: HashSet<DeviceId>) {
    let before = shared.denylist.len();
    let added = shared.denylist.replace(ids);
    let denied = shared.denylist.len();
    shared.metrics.denied_devices.set(denied as i64);
    let closing = shared.registry.revoke(&added);
    tracing::info!(
        instance = %shared.instance,
        denied,
        added = added.len(),
        removed = (before + added.len()).saturating_sub(denied),
        closing,
        "denylist changed"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(list: &[&str]) -> HashSet<DeviceId> {
        list.iter()
            .map(|s| DeviceId::parse(s).unwrap_or_else(|e| panic!("{s}: {e}")))
            .collect()
    }

    #[test]
    fn lines_comments_and_blanks() {
        let text =
            "# revoked devices\n\ndev-1\n  dev-2   # token leaked 2026-11\r\ndev-1\n#dev-3\n";
        let parsed = parse(Path::new("f"), text).expect("valid");
        assert_eq!(parsed, ids(&["dev-1", "dev-2"]));
        assert!(
            parse(Path::new("f"), "")
                .expect("an empty file is valid")
                .is_empty()
        );
    }

    #[test]
    fn an_invalid_id_names_its_line() {
        let err = parse(Path::new("/etc/denied"), "dev-1\ndev 2\n").expect_err("space");
        let msg = err.to_string();
        assert!(msg.contains("/etc/denied, line 2"), "{msg}");
        assert!(msg.contains("\"dev 2\""), "{msg}");
        let long = "x".repeat(200);
        let err = parse(Path::new("f"), &long).expect_err("too long");
        assert!(
            matches!(&err, DenylistError::BadId { id, line: 1, .. } if id.len() == 64),
            "{err}"
        );
    }

    #[test]
    fn replacing_reports_only_newly_denied_ids() {
        let list = Denylist::default();
        let dev1 = DeviceId::parse("dev-1").expect("valid");
        let dev3 = DeviceId::parse("dev-3").expect("valid");
        assert!(!list.contains(&dev1));
        let added: HashSet<DeviceId> = list.replace(ids(&["dev-1", "dev-2"])).into_iter().collect();
        assert_eq!(added, ids(&["dev-1", "dev-2"]));
        assert!(list.contains(&dev1));
        assert_eq!(list.replace(ids(&["dev-2", "dev-3"])), vec![dev3.clone()]);
        assert!(!list.contains(&dev1), "removed ids are admitted again");
        assert!(list.contains(&dev3));
        assert_eq!(list.len(), 2);
        assert!(list.replace(HashSet::new()).is_empty());
        assert!(list.is_empty());
    }
}
