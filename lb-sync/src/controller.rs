//! The control loop: take the latest complete snapshot, render it, apply it when it differs from
//! what is applied, and pace the applies.
//!
//! Shaped like a kube-rs controller: [`reconcile`] makes the world match one desired state and
//! [`error_policy`] says when to try again after a failure. The [`Pacer`] adds what nginx
//! needs: a burst of changes (a rolling update) is debounced into one apply, and applies are at
//! least `min_interval` apart, because every reload leaves a generation of old workers holding
//! long-lived device connections.
//!
//! A sink that others can change behind lb-sync's back (the ConfigMap) is also re-applied
//! every [`Sink::resync`] interval, unchanged text included, through the same pacing.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use devgate_gateway::common::ErrorChain;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::endpoints::{DesiredSet, Snapshot};
use crate::metrics::Metrics;
use crate::render::{RenderSettings, nginx_size, render, zone_exhausted, zone_size};
use crate::sink::{Sink, SinkError};
use crate::source::SnapshotRx;

/// Decides when the next apply may run. Pure: every method takes `now`.
#[derive(Debug, Clone)]
pub struct Pacer {
    debounce: Duration,
    min_interval: Duration,
    /// First unapplied change of the current burst.
    pending_since: Option<Instant>,
    /// Last time the sink was called (success or failure).
    last_attempt: Option<Instant>,
    /// Earliest retry after a failure.
    retry_at: Option<Instant>,
}

impl Pacer {
    /// A pacer with nothing pending.
    pub fn new(debounce: Duration, min_interval: Duration) -> Self {
        Pacer {
            debounce,
            min_interval,
            pending_since: None,
            last_attempt: None,
            retry_at: None,
        }
    }

    /// A new snapshot arrived. Only the first change of a burst starts the debounce window, so
    /// a steady trickle of changes cannot postpone the apply forever.
    pub fn changed(&mut self, now: Instant) {
        self.pending_since.get_or_insert(now);
    }

    /// When to reconcile next, if anything is pending.
    pub fn due(&self) -> Option<Instant> {
        let since = self.pending_since?;
        let mut at = since + self.debounce;
        if let Some(last) = self.last_attempt {
            at = at.max(last + self.min_interval);
        }
        if let Some(retry) = self.retry_at {
            at = at.max(retry);
        }
        Some(at)
    }

    /// Reconciled without touching the sink (nothing changed): the burst is over, and the rate
    /// limit is not charged.
    pub fn settled(&mut self) {
        self.pending_since = None;
        self.retry_at = None;
    }

    /// The sink applied the change at `now`.
    pub fn applied(&mut self, now: Instant) {
        self.pending_since = None;
        self.retry_at = None;
        self.last_attempt = Some(now);
    }

    /// The sink failed at `now`; keep the change pending and retry after `backoff`.
    pub fn failed(&mut self, now: Instant, backoff: Duration) {
        self.pending_since.get_or_insert(now);
        self.last_attempt = Some(now);
        self.retry_at = Some(now + backoff);
    }
}

/// Why a reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The sink refused.
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// nginx refused the render because its upstream zone cannot hold the servers. The zone is
    /// sized with room to spare for the nginx lb-sync was measured with ([`zone_size`]); an
    /// nginx needing more per server keeps its last upstream until the floor is raised, and the
    /// message says so rather than leaving a bare validation failure to decode.
    #[error(
        "nginx cannot hold {servers} servers in the upstream zone of {zone}: raise \
         --upstream-zone-min-size (for example to {suggested})"
    )]
    ZoneTooSmall {
        /// Servers in the refused render.
        servers: usize,
        /// The zone size rendered.
        zone: String,
        /// Twice the rendered zone: the next step.
        suggested: String,
        /// nginx's refusal.
        #[source]
        source: SinkError,
    },
}

impl ReconcileError {
    /// The `stage` label of the failure metric.
    pub fn stage(&self) -> &'static str {
        match self {
            ReconcileError::Sink(e) | ReconcileError::ZoneTooSmall { source: e, .. } => e.stage(),
        }
    }
}

/// Retry delay after `failures` consecutive failures: 1 s doubling to 30 s. A broken render
/// (nginx refuses it) is retried too, since the next snapshot may fix it.
pub fn error_policy(_error: &ReconcileError, failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(5);
    Duration::from_secs(1u64 << exp).min(Duration::from_secs(30))
}

/// Shared, readable-by-probes state of the controller.
#[derive(Debug, Default)]
pub struct Status {
    inner: Mutex<StatusInner>,
}

#[derive(Debug, Default)]
struct StatusInner {
    applied_once: bool,
    last_error: Option<String>,
    /// Why the source has no snapshot to give (the API refused us, say), until it has one.
    source_error: Option<String>,
}

impl Status {
    /// Ready once a complete snapshot has been applied; the reason otherwise.
    pub fn readiness(&self) -> Result<(), String> {
        let s = self
            .inner
            .lock()
            .map_err(|_| "status lock poisoned".to_owned())?;
        match (&s.applied_once, &s.last_error, &s.source_error) {
            (true, _, _) => Ok(()),
            (false, Some(e), _) => Err(format!("first apply failed: {e}")),
            (false, None, Some(e)) => Err(format!("no snapshot yet: the source failed: {e}")),
            (false, None, None) => {
                Err("waiting for a complete snapshot from the source".to_owned())
            }
        }
    }

    /// The source's latest failure (`None`: it works again), so that `/readyz` says why
    /// nothing was applied yet instead of only that nothing was.
    pub fn source_error(&self, error: Option<String>) {
        if let Ok(mut s) = self.inner.lock() {
            s.source_error = error;
        }
    }

    fn set(&self, applied: bool, error: Option<String>) {
        if let Ok(mut s) = self.inner.lock() {
            s.applied_once |= applied;
            s.last_error = error;
        }
    }
}

/// What the controller needs to reconcile.
pub struct Context {
    /// Renderer settings.
    pub settings: RenderSettings,
    /// Where the text goes.
    pub sink: Sink,
    /// Metrics.
    pub metrics: Metrics,
    /// Shared with `/readyz`.
    pub status: Arc<Status>,
    /// New fingerprints of the device TLS files ([`crate::tls::watch_files`]); `None` without
    /// TLS.
    pub tls_changes: Option<tokio::sync::watch::Receiver<String>>,
    /// How long an apply under way at shutdown may still take. Its validate and reload
    /// commands may each run up to `command_timeout_ms` (30 s), longer than Kubernetes' default
    /// grace period, which would end in a SIGKILL; past this the apply is abandoned (its
    /// commands are killed with it).
    pub shutdown_grace: Duration,
    /// The set and text currently applied (`None` before the first apply).
    applied: Option<(DesiredSet, String)>,
}

impl Context {
    /// A context with nothing applied yet.
    pub fn new(
        settings: RenderSettings,
        sink: Sink,
        metrics: Metrics,
        status: Arc<Status>,
    ) -> Self {
        Context {
            settings,
            sink,
            metrics,
            status,
            tls_changes: None,
            shutdown_grace: SHUTDOWN_GRACE,
            applied: None,
        }
    }
}

/// Default [`Context::shutdown_grace`]: well inside Kubernetes' default 30 s grace period.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// What a successful reconcile did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The sink was called and succeeded.
    Applied,
    /// The render equals what is applied; nothing was written.
    Unchanged,
}

/// Makes the sink hold the rendering of `snapshot`; nothing is written when that is what was
/// applied last.
pub async fn reconcile(snapshot: &Snapshot, ctx: &mut Context) -> Result<Outcome, ReconcileError> {
    reconcile_with(snapshot, ctx, false).await
}

/// Like [`reconcile`], but applies even a text equal to the last applied one: the periodic
/// resync of a sink someone else may have changed since (a ConfigMap key removed or edited).
pub async fn resync(snapshot: &Snapshot, ctx: &mut Context) -> Result<Outcome, ReconcileError> {
    reconcile_with(snapshot, ctx, true).await
}

async fn reconcile_with(
    snapshot: &Snapshot,
    ctx: &mut Context,
    force: bool,
) -> Result<Outcome, ReconcileError> {
    let set = DesiredSet::from_endpoints(&snapshot.endpoints);
    let text = render(&set, &ctx.settings);
    ctx.metrics.renders.inc();
    let unchanged = ctx.applied.as_ref().is_some_and(|(_, t)| *t == text);
    if unchanged && !force {
        ctx.metrics.unchanged.inc();
        return Ok(Outcome::Unchanged);
    }
    let diff = match &ctx.applied {
        Some((old, _)) => set.diff(old),
        None => set.diff(&DesiredSet::default()),
    };
    if let Err(error) = ctx.sink.apply(&text).await {
        // Unless nginx refused the text (the sink then put the last good file, the one applied,
        // back), what the sink holds is unknown now: the file may be valid and in place with
        // the reload failed (nginx loads it at its next start), or an apply may have reached
        // the API server before the client gave up. Forget the last apply then, so the next
        // reconcile writes whatever is desired even if it equals that one.
        if !matches!(error, SinkError::Validate(_)) {
            ctx.applied = None;
        }
        if let SinkError::Validate(why) = &error
            && zone_exhausted(why)
        {
            let zone = zone_size(set.len(), ctx.settings.zone_min_bytes);
            return Err(ReconcileError::ZoneTooSmall {
                servers: set.len(),
                zone: nginx_size(zone),
                suggested: nginx_size(zone.saturating_mul(2)),
                source: error,
            });
        }
        return Err(error.into());
    }
    ctx.metrics.applies.inc();
    if ctx.sink.reloads() {
        ctx.metrics.reloads.inc();
    }
    ctx.metrics.applied(&set);
    if unchanged {
        tracing::debug!(
            servers = set.len(),
            "upstream re-applied unchanged (resync)"
        );
    } else {
        tracing::info!(servers = set.len(), %diff, "upstream applied");
    }
    ctx.applied = Some((set, text));
    Ok(Outcome::Applied)
}

/// Runs the loop until `shutdown`: waits for snapshots, paces them and reconciles.
pub async fn run(
    mut rx: SnapshotRx,
    mut ctx: Context,
    mut pacer: Pacer,
    shutdown: CancellationToken,
) {
    let mut failures = 0u32;
    // When the oldest unapplied change was observed by the source.
    let mut first_observed: Option<Instant> = None;
    // When the sink is next re-applied unchanged (`Sink::resync`; scheduled after each apply),
    // and whether the pending reconcile is that resync.
    let mut resync_at: Option<Instant> = None;
    let mut resync_pending = false;
    loop {
        let due = pacer.due();
        tokio::select! {
            _ = shutdown.cancelled() => break,
            changed = rx.changed() => {
                if changed.is_err() {
                    // The source is gone, which only happens on shutdown.
                    shutdown.cancelled().await;
                    break;
                }
                if let Some(s) = rx.borrow().as_ref() {
                    first_observed.get_or_insert(s.observed_at);
                }
                pacer.changed(Instant::now());
            }
            fingerprint = tls_changed(&mut ctx.tls_changes) => {
                if let Some(tls) = ctx.settings.tls.as_mut() {
                    tls.fingerprint = fingerprint;
                }
                pacer.changed(Instant::now());
            }
            _ = sleep_until(resync_at), if resync_at.is_some() => {
                resync_at = None;
                resync_pending = true;
                pacer.changed(Instant::now());
            }
            _ = sleep_until(due), if due.is_some() => {
                let Some(snapshot) = rx.borrow_and_update().clone() else {
                    pacer.settled();
                    continue;
                };
                let Some(result) = reconcile_before_stop(&snapshot, &mut ctx, &shutdown, resync_pending).await else {
                    tracing::warn!(grace_ms = ctx.shutdown_grace.as_millis() as u64, "shutting down: abandoned an apply still under way");
                    if let Err(error) = ctx.sink.abandon().await {
                        tracing::error!(error = %ErrorChain(&error), "could not put the last good upstream back");
                    }
                    break;
                };
                match result {
                    Ok(outcome) => {
                        let now = Instant::now();
                        failures = 0;
                        if let Some(t) = first_observed.take() {
                            ctx.metrics
                                .change_to_applied
                                .observe(now.saturating_duration_since(t).as_secs_f64());
                        }
                        match outcome {
                            Outcome::Applied => {
                                pacer.applied(now);
                                resync_pending = false;
                                resync_at = ctx.sink.resync().map(|every| now + every);
                            }
                            Outcome::Unchanged => pacer.settled(),
                        }
                        ctx.status.set(true, None);
                    }
                    Err(error) => {
                        failures = failures.saturating_add(1);
                        let backoff = error_policy(&error, failures);
                        ctx.metrics.failed(error.stage());
                        let error = ErrorChain(&error).to_string();
                        tracing::error!(%error, retry_in_ms = backoff.as_millis() as u64, "apply failed");
                        ctx.status.set(false, Some(error));
                        pacer.failed(Instant::now(), backoff);
                    }
                }
            }
        }
    }
}

/// Runs one reconcile; at `shutdown` it gets [`Context::shutdown_grace`] more to finish, and
/// `None` means it did not.
async fn reconcile_before_stop(
    snapshot: &Snapshot,
    ctx: &mut Context,
    shutdown: &CancellationToken,
    force: bool,
) -> Option<Result<Outcome, ReconcileError>> {
    let grace = ctx.shutdown_grace;
    let applying = reconcile_with(snapshot, ctx, force);
    tokio::pin!(applying);
    tokio::select! {
        result = &mut applying => Some(result),
        _ = shutdown.cancelled() => tokio::time::timeout(grace, applying).await.ok(),
    }
}

/// The next fingerprint of the TLS files; never resolves without TLS (or once the watcher is
/// gone, which only happens on shutdown).
async fn tls_changed(rx: &mut Option<tokio::sync::watch::Receiver<String>>) -> String {
    if let Some(rx) = rx
        && rx.changed().await.is_ok()
    {
        return rx.borrow_and_update().clone();
    }
    std::future::pending().await
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A context over a file sink at `output` whose validate and reload commands are given.
    fn file_context(
        output: &std::path::Path,
        validate: &str,
        reload: &str,
        timeout: Duration,
    ) -> Context {
        let sink = Sink::File(crate::sink::file::FileSink::new(
            output.to_path_buf(),
            validate,
            reload,
            timeout,
        ));
        Context::new(
            RenderSettings::default(),
            sink,
            Metrics::default(),
            Arc::new(Status::default()),
        )
    }

    const MS: Duration = Duration::from_millis(1);

    #[tokio::test(start_paused = true)]
    async fn a_burst_is_applied_once_after_the_debounce() {
        let mut p = Pacer::new(200 * MS, 1000 * MS);
        let t0 = Instant::now();
        assert_eq!(p.due(), None);
        p.changed(t0);
        tokio::time::advance(150 * MS).await;
        p.changed(Instant::now());
        assert_eq!(p.due(), Some(t0 + 200 * MS), "later changes join the burst");
        p.applied(t0 + 200 * MS);
        assert_eq!(p.due(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn applies_are_rate_limited() {
        let mut p = Pacer::new(200 * MS, 1000 * MS);
        let t0 = Instant::now();
        p.changed(t0);
        p.applied(t0 + 200 * MS);
        p.changed(t0 + 300 * MS);
        assert_eq!(
            p.due(),
            Some(t0 + 1200 * MS),
            "min interval after the last apply"
        );
        p.applied(t0 + 1200 * MS);
        p.changed(t0 + 5000 * MS);
        assert_eq!(
            p.due(),
            Some(t0 + 5200 * MS),
            "only the debounce when idle long enough"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn unchanged_renders_do_not_charge_the_rate_limit() {
        let mut p = Pacer::new(200 * MS, 1000 * MS);
        let t0 = Instant::now();
        p.changed(t0);
        p.settled();
        p.changed(t0 + 300 * MS);
        assert_eq!(p.due(), Some(t0 + 500 * MS));
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off() {
        let mut p = Pacer::new(200 * MS, 1000 * MS);
        let t0 = Instant::now();
        p.changed(t0);
        p.failed(t0 + 200 * MS, Duration::from_secs(4));
        assert_eq!(p.due(), Some(t0 + 4200 * MS));
        let e = ReconcileError::Sink(SinkError::Reload("x".into()));
        assert_eq!(error_policy(&e, 1), Duration::from_secs(1));
        assert_eq!(error_policy(&e, 3), Duration::from_secs(4));
        assert_eq!(error_policy(&e, 50), Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn zero_debounce_and_interval_apply_at_once() {
        let mut p = Pacer::new(Duration::ZERO, Duration::ZERO);
        let t0 = Instant::now();
        p.changed(t0);
        assert_eq!(p.due(), Some(t0));
    }

    #[test]
    fn readiness_explains_itself() {
        let s = Status::default();
        assert!(s.readiness().expect_err("not yet").contains("waiting"));
        s.set(false, Some("nginx said no".into()));
        assert!(s.readiness().expect_err("failed").contains("nginx said no"));
        s.set(true, None);
        assert!(s.readiness().is_ok());
        s.set(false, Some("later failure".into()));
        assert!(
            s.readiness().is_ok(),
            "stays ready: nginx keeps the last good upstream"
        );
    }

    #[tokio::test]
    async fn shutdown_abandons_an_apply_that_outlasts_the_grace() {
        use crate::endpoints::Endpoint;

        let dir = tempfile::tempdir().expect("tempdir");
        let output = dir.path().join("upstream.conf");
        std::fs::write(&output, "# what nginx accepted last\n").expect("last good");
        // A validation that hangs (an nginx stuck on a slow disk, say), within its own
        // 60 s command timeout.
        let mut ctx = file_context(&output, "sleep 60", "true", Duration::from_secs(60));
        let metrics = ctx.metrics.clone();
        ctx.shutdown_grace = Duration::from_millis(200);
        let (tx, rx) = tokio::sync::watch::channel(None);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(
            rx,
            ctx,
            Pacer::new(Duration::ZERO, Duration::ZERO),
            shutdown.clone(),
        ));
        tx.send(Some(Snapshot::now(vec![Endpoint::ready(
            ([10, 0, 0, 1], 7000).into(),
        )])))
        .expect("controller alive");
        // The apply is under way once the controller rendered.
        let deadline = Instant::now() + Duration::from_secs(5);
        while metrics.renders.get() == 0 {
            assert!(Instant::now() < deadline, "never rendered");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let stopping = Instant::now();
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the controller stops after the grace, not after the command")
            .expect("controller task");
        assert!(
            stopping.elapsed() >= Duration::from_millis(200),
            "the apply under way got its grace"
        );
        assert_eq!(metrics.applies.get(), 0);
        assert_eq!(
            std::fs::read_to_string(&output).expect("upstream file"),
            "# what nginx accepted last\n",
            "the unchecked render is not left for nginx's next reload"
        );
    }

    #[tokio::test]
    async fn after_a_failed_apply_the_next_reconcile_writes_even_an_unchanged_set() {
        use crate::endpoints::Endpoint;

        let dir = tempfile::tempdir().expect("tempdir");
        let output = dir.path().join("upstream.conf");
        let broken = dir.path().join("nginx-down");
        // The reload fails while `broken` exists (an nginx master that is restarting).
        let reload = format!("test ! -e {}", broken.display());
        let mut ctx = file_context(&output, "true", &reload, Duration::from_secs(5));
        let a = Snapshot::now(vec![
            Endpoint::ready(([10, 0, 0, 1], 7000).into()),
            Endpoint::ready(([10, 0, 0, 2], 7000).into()),
        ]);
        let b = Snapshot::now(vec![Endpoint::ready(([10, 0, 0, 1], 7000).into())]);
        let read = || std::fs::read_to_string(&output).expect("upstream file");

        assert_eq!(reconcile(&a, &mut ctx).await.expect("A"), Outcome::Applied);
        std::fs::write(&broken, "").expect("flag");
        let error = reconcile(&b, &mut ctx).await.expect_err("the reload fails");
        assert!(error.to_string().contains("reload failed"), "{error}");
        assert!(
            !read().contains("10.0.0.2:7000"),
            "the valid B stays in the file, and nginx loads it when it comes back"
        );
        // The set returns to A: it must be written again, not skipped as unchanged.
        std::fs::remove_file(&broken).expect("nginx back");
        assert_eq!(
            reconcile(&a, &mut ctx).await.expect("A again"),
            Outcome::Applied
        );
        assert!(read().contains("server 10.0.0.2:7000 "), "{}", read());
    }

    #[tokio::test]
    async fn after_a_refused_render_the_last_applied_set_is_still_known() {
        use crate::endpoints::Endpoint;

        let dir = tempfile::tempdir().expect("tempdir");
        let output = dir.path().join("upstream.conf");
        let refusing = dir.path().join("nginx-refuses");
        // Validation fails while `refusing` exists; the sink then puts the last good file back.
        let validate = format!("test ! -e {}", refusing.display());
        let mut ctx = file_context(&output, &validate, "true", Duration::from_secs(5));
        let metrics = ctx.metrics.clone();
        let a = Snapshot::now(vec![Endpoint::ready(([10, 0, 0, 1], 7000).into())]);
        let b = Snapshot::now(vec![Endpoint::ready(([10, 0, 0, 2], 7000).into())]);
        assert_eq!(reconcile(&a, &mut ctx).await.expect("A"), Outcome::Applied);
        std::fs::write(&refusing, "").expect("flag");
        let error = reconcile(&b, &mut ctx).await.expect_err("refused");
        assert!(
            matches!(error, ReconcileError::Sink(SinkError::Validate(_))),
            "{error}"
        );
        std::fs::remove_file(&refusing).expect("flag");
        // The file holds A again, and lb-sync knows it: no rewrite, no reload.
        assert_eq!(
            reconcile(&a, &mut ctx).await.expect("A again"),
            Outcome::Unchanged
        );
        assert_eq!(metrics.applies.get(), 1);
    }

    #[tokio::test]
    async fn a_zone_too_small_for_the_set_is_an_error_that_names_the_fix() {
        use crate::endpoints::Endpoint;

        let dir = tempfile::tempdir().expect("tempdir");
        let output = dir.path().join("upstream.conf");
        std::fs::write(&output, "# what nginx accepted last\n").expect("last good");
        // What nginx -t prints when the servers do not fit the zone (nginx 1.22.1, verbatim).
        let validator = dir.path().join("nginx-t.sh");
        std::fs::write(
            &validator,
            "#!/bin/sh\n\
             echo 'nginx: [crit] ngx_slab_alloc() failed: no memory in upstream zone \
             \"devgate_gateways\"' >&2\n\
             echo 'nginx: configuration file /etc/nginx/nginx.conf test failed' >&2\n\
             exit 1\n",
        )
        .expect("validator");
        let validate = format!("sh {}", validator.display());
        let mut ctx = file_context(&output, &validate, "true", Duration::from_secs(5));
        let set: Vec<_> = (1..=3u8)
            .map(|i| Endpoint::ready(([10, 0, 0, i], 7000).into()))
            .collect();
        let error = reconcile(&Snapshot::now(set), &mut ctx)
            .await
            .expect_err("nginx refuses");
        assert_eq!(error.stage(), "validate");
        let text = ErrorChain(&error).to_string();
        for needle in [
            "cannot hold 3 servers in the upstream zone of 64k",
            "--upstream-zone-min-size (for example to 128k)",
            "no memory in upstream zone",
            "kept the last good configuration",
        ] {
            assert!(text.contains(needle), "{needle:?} missing from {text}");
        }
        assert_eq!(
            std::fs::read_to_string(&output).expect("upstream file"),
            "# what nginx accepted last\n"
        );
    }

    #[tokio::test]
    async fn a_burst_of_snapshots_becomes_one_apply_of_the_latest() {
        use crate::endpoints::Endpoint;

        let dir = tempfile::tempdir().expect("tempdir");
        let output = dir.path().join("upstream.conf");
        let ctx = file_context(&output, "true", "true", Duration::from_secs(5));
        let metrics = ctx.metrics.clone();
        let status = ctx.status.clone();
        let (tx, rx) = tokio::sync::watch::channel(None);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(
            rx,
            ctx,
            Pacer::new(Duration::from_millis(300), Duration::from_secs(1)),
            shutdown.clone(),
        ));
        let mut endpoints = Vec::new();
        for i in 1..=5u16 {
            endpoints.push(Endpoint::ready(([10, 0, 0, 1], 7000 + i).into()));
            tx.send(Some(Snapshot::now(endpoints.clone())))
                .expect("controller alive");
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while metrics.applies.get() == 0 {
            assert!(Instant::now() < deadline, "never applied");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(metrics.renders.get(), 1, "one render for the whole burst");
        let text = std::fs::read_to_string(&output).expect("written");
        assert!(
            text.contains("server 10.0.0.1:7005 "),
            "latest snapshot applied:\n{text}"
        );
        assert!(status.readiness().is_ok());

        // The same set again renders identically: no second apply.
        tx.send(Some(Snapshot::now(endpoints)))
            .expect("controller alive");
        while metrics.renders.get() < 2 {
            assert!(Instant::now() < deadline, "never re-rendered");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(metrics.applies.get(), 1);
        assert_eq!(metrics.unchanged.get(), 1);
        shutdown.cancel();
        task.await.expect("controller stops");
    }
}
