//! Sinks put the rendered configuration where nginx picks it up.

pub mod configmap;
pub mod file;

/// Why an apply failed. The controller keeps the last applied state and retries.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// Writing the file (or restoring the last good one) failed.
    #[error("writing {path}: {source}")]
    Write {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// nginx refused the new configuration; the last good file was put back.
    #[error("validation failed, kept the last good configuration: {0}")]
    Validate(String),
    /// The new file is valid but nginx did not reload.
    #[error("reload failed: {0}")]
    Reload(String),
    /// The Kubernetes API refused or could not be reached.
    #[error("applying ConfigMap {name}: {source}")]
    Kube {
        /// The ConfigMap.
        name: String,
        /// The client's error.
        source: kube::Error,
    },
}

impl SinkError {
    /// The `stage` label of the failure metric.
    pub fn stage(&self) -> &'static str {
        match self {
            SinkError::Write { .. } => "write",
            SinkError::Validate(_) => "validate",
            SinkError::Reload(_) => "reload",
            SinkError::Kube { .. } => "apply",
        }
    }
}

/// One of the configured sinks.
pub enum Sink {
    /// File + validate + reload.
    File(file::FileSink),
    /// Server-side apply of a ConfigMap key.
    ConfigMap(Box<configmap::ConfigMapSink>),
}

impl Sink {
    /// Puts `text` in place. On success nginx uses it (file) or the ConfigMap holds it.
    pub async fn apply(&mut self, text: &str) -> Result<(), SinkError> {
        match self {
            Sink::File(s) => s.apply(text).await,
            Sink::ConfigMap(s) => s.apply(text).await,
        }
    }

    /// Undoes what an apply cut short may have left: the file sink puts the last good file
    /// back; a ConfigMap apply is atomic on the server and leaves nothing to undo.
    pub async fn abandon(&self) -> Result<(), SinkError> {
        match self {
            Sink::File(s) => s.restore_last_good().await,
            Sink::ConfigMap(_) => Ok(()),
        }
    }

    /// How often an unchanged text is applied again, if ever: a ConfigMap key someone removed
    /// or edited is only restored that way. Never for the file sink, whose every apply is an
    /// nginx reload (a new generation of workers), and whose file only lb-sync writes.
    pub fn resync(&self) -> Option<std::time::Duration> {
        match self {
            Sink::File(_) => None,
            Sink::ConfigMap(s) => Some(s.resync()),
        }
    }

    /// Whether a successful apply reloaded nginx (for the `reloads` metric).
    pub fn reloads(&self) -> bool {
        matches!(self, Sink::File(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_sink_never_resyncs() {
        let sink = Sink::File(file::FileSink::new(
            "/nonexistent/devgate-upstream.conf".into(),
            "true",
            "true",
            std::time::Duration::from_secs(1),
        ));
        assert_eq!(sink.resync(), None, "every file apply is an nginx reload");
    }
}
