//! The file sink: write the include file atomically, have nginx validate it, then reload.
//!
//! The file is written to a temporary name in the same directory and renamed over the old one,
//! so nginx (or anyone) never reads a half-written file. If validation fails the last good
//! content is put back, so a later reload by someone else does not pick up a broken file, and
//! the error is reported.
//!
//! Every reload starts new nginx workers and leaves the old ones alive while they hold device
//! connections (up to nginx's `worker_shutdown_timeout`), which is why the controller debounces
//! and rate-limits applies.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use super::SinkError;

/// Most bytes of a failing command's output kept in the error message.
const MAX_OUTPUT: usize = 2000;

/// A configured file sink.
pub struct FileSink {
    output: PathBuf,
    validate_cmd: Vec<String>,
    reload_cmd: Vec<String>,
    timeout: Duration,
    /// Content nginx accepted last (initially whatever the file held at start, which is what
    /// nginx runs with); restored when a new render fails validation.
    last_good: Option<String>,
}

impl FileSink {
    /// A sink writing `output`; commands are split on whitespace and run without a shell.
    pub fn new(output: PathBuf, validate_cmd: &str, reload_cmd: &str, timeout: Duration) -> Self {
        let last_good = std::fs::read_to_string(&output).ok();
        let split = |s: &str| s.split_whitespace().map(str::to_owned).collect();
        FileSink {
            output,
            validate_cmd: split(validate_cmd),
            reload_cmd: split(reload_cmd),
            timeout,
            last_good,
        }
    }

    /// Writes, validates and reloads; on validation failure restores the last good file.
    pub async fn apply(&mut self, text: &str) -> Result<(), SinkError> {
        write_atomic(&self.output, text).await?;
        if let Err(why) = run(&self.validate_cmd, self.timeout).await {
            self.restore_last_good().await?;
            return Err(SinkError::Validate(why));
        }
        self.last_good = Some(text.to_owned());
        run(&self.reload_cmd, self.timeout)
            .await
            .map_err(SinkError::Reload)
    }
}

impl FileSink {
    /// Puts back what nginx last accepted: after a failed validation, or an apply cut short at
    /// shutdown (perhaps while `nginx -t` ran), so that a later reload or restart of nginx does
    /// not load a file nobody checked. With nothing good ever written, no file is left.
    pub async fn restore_last_good(&self) -> Result<(), SinkError> {
        match &self.last_good {
            Some(good) => write_atomic(&self.output, good).await,
            None => {
                let _ = tokio::fs::remove_file(&self.output).await;
                Ok(())
            }
        }
    }
}

/// Writes `text` to a temporary file next to `path`, syncs it and renames it over `path`.
pub async fn write_atomic(path: &Path, text: &str) -> Result<(), SinkError> {
    let err = |source| SinkError::Write {
        path: path.display().to_string(),
        source,
    };
    let name = path
        .file_name()
        .ok_or_else(|| err(std::io::Error::other("not a file path")))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let result = async {
        let mut f = tokio::fs::File::create(&tmp).await?;
        f.write_all(text.as_bytes()).await?;
        f.sync_all().await?;
        drop(f);
        tokio::fs::rename(&tmp, path).await
    }
    .await;
    if result.is_err() {
        let _ = tokio::fs::remove_file(&tmp).await;
    }
    result.map_err(err)
}

/// Runs `argv` with a timeout; `Err` carries the exit status and the tail of its output.
async fn run(argv: &[String], timeout: Duration) -> Result<(), String> {
    let Some((program, args)) = argv.split_first() else {
        return Err("empty command".to_owned());
    };
    let child = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("{program}: {e}"))?;
    let output = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(output)) => output,
        Ok(Err(e)) => return Err(format!("{program}: {e}")),
        Err(_) => return Err(format!("{} timed out after {timeout:?}", argv.join(" "))),
    };
    if output.status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&output.stderr).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stdout));
    let text = text.trim();
    let start = text.len().saturating_sub(MAX_OUTPUT);
    let start = (start..text.len())
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(text.len());
    Err(format!(
        "`{}` exited with {}: {}",
        argv.join(" "),
        output.status,
        &text[start..]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sink(dir: &Path, validate: &str, reload: &str) -> FileSink {
        FileSink::new(
            dir.join("upstream.conf"),
            validate,
            reload,
            Duration::from_secs(5),
        )
    }

    #[tokio::test]
    async fn writes_validates_and_reloads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let marker = dir.path().join("reloaded");
        let mut s = sink(dir.path(), "true", &format!("touch {}", marker.display()));
        s.apply("new\n").await.expect("apply");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("upstream.conf")).expect("read"),
            "new\n"
        );
        assert!(marker.exists(), "reload command ran");
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
            .collect();
        assert!(leftovers.is_empty(), "temporary file left behind");
    }

    #[tokio::test]
    async fn failed_validation_restores_the_last_good_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("upstream.conf");
        std::fs::write(&path, "good\n").expect("seed");
        let marker = dir.path().join("reloaded");
        // The validator refuses any file containing "bad".
        let validator = dir.path().join("validate.sh");
        std::fs::write(
            &validator,
            format!(
                "#!/bin/sh\n! grep -q bad {} || {{ echo 'bad directive' >&2; exit 1; }}\n",
                path.display()
            ),
        )
        .expect("write validator");
        let mut s = sink(
            dir.path(),
            &format!("sh {}", validator.display()),
            &format!("touch {}", marker.display()),
        );
        let err = s.apply("bad\n").await.expect_err("must fail validation");
        assert!(matches!(err, SinkError::Validate(_)), "{err}");
        assert!(err.to_string().contains("bad directive"), "{err}");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "good\n");
        assert!(!marker.exists(), "no reload after failed validation");
        s.apply("better\n").await.expect("valid again");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "better\n");
    }

    #[tokio::test]
    async fn reload_failure_is_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = sink(dir.path(), "true", "false");
        let err = s.apply("x\n").await.expect_err("reload fails");
        assert!(matches!(err, SinkError::Reload(_)), "{err}");
        assert!(err.to_string().contains("`false` exited"), "{err}");
    }

    #[tokio::test]
    async fn missing_command_and_timeout_are_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = sink(dir.path(), "/nonexistent/nginx -t", "true");
        let err = s.apply("x\n").await.expect_err("no validator");
        assert!(err.to_string().contains("/nonexistent/nginx"), "{err}");
        assert!(
            !dir.path().join("upstream.conf").exists(),
            "no broken file left"
        );
        let mut s = FileSink::new(
            dir.path().join("upstream.conf"),
            "sleep 5",
            "true",
            Duration::from_millis(100),
        );
        let err = s.apply("x\n").await.expect_err("timeout");
        assert!(err.to_string().contains("timed out"), "{err}");
    }
}
