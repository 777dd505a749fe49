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

    /// The ids denied now.
    pub fn snapshot(&self) -> Arc<HashSet<DeviceId>> {
        self.ids.read().unwrap_or_else(|p| p.into_inner()).clone()
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

/// Largest denylist file read: a million ids fit in well under this, and a path pointing at
/// something huge by mistake must not be read into memory every few seconds.
pub const MAX_FILE_BYTES: u64 = 64 << 20;

/// Reads and parses the file: what the gateway does before it accepts its first device, so a
/// gateway never starts with a list it cannot read.
pub fn load(path: &Path) -> Result<(HashSet<DeviceId>, Vec<u8>), DenylistError> {
    let bytes = read_bounded(path)?;
    let ids = parse(path, &decode(&bytes))?;
    Ok((ids, bytes))
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, DenylistError> {
    use std::io::Read;
    let error = |source| DenylistError::Read {
        path: path.to_owned(),
        source,
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes))
        .map_err(error)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(error(std::io::Error::other(format!(
            "larger than {MAX_FILE_BYTES} bytes"
        ))));
    }
    Ok(bytes)
}

/// The file as text: invalid UTF-8 becomes U+FFFD, which no id contains (so such a line is
/// refused, never silently read as another id); a leading byte-order mark is dropped.
fn decode(bytes: &[u8]) -> std::borrow::Cow<'_, str> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    String::from_utf8_lossy(bytes)
}

/// Starts watching `path` (already loaded as `loaded`); the task ends at the hard stop.
pub(crate) fn spawn(shared: Arc<Shared>, path: PathBuf, loaded: Vec<u8>) -> JoinHandle<()> {
    tokio::spawn(watch(shared, path, loaded))
}

/// Checks the file every `denied_devices_check_ms` and applies what [`Reload`] decides.
/// Polling the content rather than waiting for inotify events: a ConfigMap update is a symlink
/// swap of the directory, which file watches on the file itself miss, and reading a small file
/// every few seconds costs nothing.
async fn watch(shared: Arc<Shared>, path: PathBuf, loaded: Vec<u8>) {
    let period = Duration::from_millis(shared.config.denied_devices_check_ms);
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    let mut reload = Reload::new(loaded);
    let mut failing = false;
    loop {
        tokio::select! {
            () = shared.hard_stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        // A read hung on a dead network mount must not hold up the gateway's shutdown.
        let read = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || read_bounded(&path))
        };
        let bytes = tokio::select! {
            () = shared.hard_stop.cancelled() => return,
            read = read => read.unwrap_or_else(|e| Err(DenylistError::Read {
                path: path.clone(),
                source: std::io::Error::other(e),
            })),
        };
        let bytes = match bytes {
            Ok(bytes) => bytes,
            Err(error) => {
                shared.metrics.denylist_stale.set(1);
                if !failing {
                    failing = true;
                    shared.metrics.denylist_errors.inc();
                    tracing::error!(instance = %shared.instance, %error, denied = shared.denylist.len(), "denylist not re-read; the previous list stays in force");
                }
                continue;
            }
        };
        failing = false;
        let step = reload.step(&path, bytes, &shared.denylist.snapshot());
        shared.metrics.denylist_stale.set(i64::from(matches!(
            step,
            Step::Refused(_) | Step::StillRefused
        )));
        match step {
            Step::Unchanged | Step::StillRefused => {}
            Step::Refused(error) => {
                shared.metrics.denylist_errors.inc();
                tracing::error!(instance = %shared.instance, %error, denied = shared.denylist.len(), "denylist change refused; the previous list stays in force");
            }
            Step::Apply { ids, removals_held } => {
                if removals_held > 0 {
                    tracing::info!(instance = %shared.instance, removals_held, "denylist removes ids: applied once the next check reads the same content");
                }
                apply(&shared, ids);
            }
        }
    }
}

/// How the watcher treats each content it reads. Additions apply at once (revoking is
/// urgent); removals only once the same content is read twice in a row, so a file caught
/// mid-write (truncated, or cut inside its last id) never re-admits revoked devices, not
/// even for one period.
#[derive(Debug)]
struct Reload {
    /// The content now in force, unless only its additions are (then `None`, so reading any
    /// content, the previous one included, is a change to decide on).
    applied: Option<Vec<u8>>,
    /// A valid content with removals, read once; they apply if the next read is the same.
    pending: Option<Vec<u8>>,
    /// The last content refused, so it is reported once, not every period.
    refused: Option<Vec<u8>>,
}

/// What to do after one read.
#[derive(Debug)]
enum Step {
    /// Nothing changed.
    Unchanged,
    /// The content is not a valid list; the current one stays.
    Refused(DenylistError),
    /// The content refused last time, read again: already reported, still not in force.
    StillRefused,
    /// Put `ids` in force; `removals_held` ids the file no longer lists stay denied for now.
    Apply {
        ids: HashSet<DeviceId>,
        removals_held: usize,
    },
}

impl Reload {
    fn new(loaded: Vec<u8>) -> Self {
        Reload {
            applied: Some(loaded),
            pending: None,
            refused: None,
        }
    }

    fn step(&mut self, path: &Path, bytes: Vec<u8>, current: &HashSet<DeviceId>) -> Step {
        if self.applied.as_ref() == Some(&bytes) {
            self.pending = None;
            return Step::Unchanged;
        }
        let listed = match parse(path, &decode(&bytes)) {
            Ok(ids) => ids,
            Err(error) => {
                if self.refused.as_ref() == Some(&bytes) {
                    return Step::StillRefused;
                }
                self.refused = Some(bytes);
                return Step::Refused(error);
            }
        };
        let removals = current.difference(&listed).count();
        if removals == 0 || self.pending.as_ref() == Some(&bytes) {
            self.applied = Some(bytes);
            self.pending = None;
            return Step::Apply {
                ids: listed,
                removals_held: 0,
            };
        }
        self.pending = Some(bytes);
        let mut ids = current.clone();
        if listed
            .into_iter()
            .filter(|id| ids.insert(id.clone()))
            .count()
            > 0
        {
            self.applied = None;
        }
        Step::Apply {
            ids,
            removals_held: removals,
        }
    }
}

/// Puts a new list in force and closes the live sessions of ids it adds. (During a drain the
/// sessions' command slots are already taken by the drain schedule: a newly denied device
/// then gets its `GOAWAY draining` within the drain window, and is refused on reconnecting by
/// every gateway whose list has it.)
fn apply(shared: &Shared, ids: HashSet<DeviceId>) {
    let before = shared.denylist.len();
    let added = shared.denylist.replace(ids);
    let denied = shared.denylist.len();
    shared.metrics.denied_devices.set(denied as i64);
    let closing = shared.registry.revoke(&added);
    if added.is_empty() && before == denied {
        return;
    }
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

    const ALREADY_REPORTED: &str = "already reported";

    /// Feeds `reads` to a watcher that loaded `loaded`; returns the list in force after each,
    /// or the refusal (`ALREADY_REPORTED` for a refused content read again).
    fn run(loaded: &str, reads: &[&str]) -> Vec<Result<HashSet<DeviceId>, String>> {
        let path = Path::new("f");
        let mut current = parse(path, loaded).expect("valid start");
        let mut reload = Reload::new(loaded.as_bytes().to_vec());
        reads
            .iter()
            .map(
                |read| match reload.step(path, read.as_bytes().to_vec(), &current) {
                    Step::Unchanged => Ok(current.clone()),
                    Step::Refused(e) => Err(e.to_string()),
                    Step::StillRefused => Err(ALREADY_REPORTED.to_owned()),
                    Step::Apply { ids, .. } => {
                        current = ids;
                        Ok(current.clone())
                    }
                },
            )
            .collect()
    }

    #[test]
    fn additions_apply_at_once_and_removals_after_a_second_identical_read() {
        assert_eq!(run("a\n", &["a\nb\n"]), vec![Ok(ids(&["a", "b"]))]);
        assert_eq!(
            run("a\nb\n", &["a\n", "a\n"]),
            vec![Ok(ids(&["a", "b"])), Ok(ids(&["a"]))]
        );
    }

    #[test]
    fn a_file_caught_mid_write_never_readmits_anyone() {
        // Truncated, then written again: b is never admitted, and a later truncation is again
        // only a first sight.
        assert_eq!(
            run("a\nb\n", &["", "a\nb\n", "", "a\nb\n"]),
            vec![Ok(ids(&["a", "b"])); 4]
        );
        // Cut inside the last id: the fragment is denied at once (harmless), "victim" stays
        // denied, and the full content, read twice, drops the fragment again.
        assert_eq!(
            run("x\nvictim\n", &["x\nvic", "x\nvictim\n", "x\nvictim\n"]),
            vec![
                Ok(ids(&["x", "victim", "vic"])),
                Ok(ids(&["x", "victim", "vic"])),
                Ok(ids(&["x", "victim"])),
            ]
        );
        // Emptying the list on purpose works: the same empty content, read twice.
        assert_eq!(
            run("a\n", &["# nobody\n", "# nobody\n"]),
            vec![Ok(ids(&["a"])), Ok(ids(&[]))]
        );
    }

    #[test]
    fn an_invalid_content_is_refused_once_and_changes_nothing() {
        let steps = run("a\n", &["a\nb c\n", "a\nb c\n", "a\nb d\n", "a\nb\n"]);
        assert!(
            matches!(&steps[0], Err(e) if e.contains("line 2")),
            "{steps:?}"
        );
        assert_eq!(
            steps[1],
            Err(ALREADY_REPORTED.to_owned()),
            "reported once, and still refused"
        );
        assert!(steps[2].is_err(), "a different bad content is reported");
        assert_eq!(steps[3], Ok(ids(&["a", "b"])));
    }

    #[test]
    fn a_byte_order_mark_is_not_part_of_the_first_id() {
        let parsed = parse(Path::new("f"), &decode(b"\xEF\xBB\xBFdev-1\n")).expect("valid");
        assert_eq!(parsed, ids(&["dev-1"]));
        assert!(parse(Path::new("f"), &decode(b"dev-\xFF1\n")).is_err());
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
