//! [`Rebuild`]: builds a new version of a read model from the start of the
//! log while the live version keeps serving, then promotes it.

use std::time::Duration;

use surety_core::log::LogSubscriber;
use surety_core::upcast::Upcasters;
use tokio::time::Instant;

use crate::error::ProjectionError;
use crate::metrics::ProjectionMetrics;
use crate::projection::{Mode, Projection};
use crate::runner::{Runner, RunnerOptions};
use crate::store::{CheckpointStore, VersionStore, versioned_name};

/// How far a rebuild is.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct RebuildProgress {
    /// The version being built.
    pub version: u32,
    /// Events applied by this run of the rebuild.
    pub applied: u64,
    /// Events still to apply to reach the end of the log as last seen.
    pub remaining: u64,
    /// Events applied per second since this run started.
    pub events_per_second: f64,
    /// The time left at that rate; `None` before any event was applied.
    pub eta: Option<Duration>,
}

/// Rebuilds a projection into a shadow version: a runner of the projection
/// made for the new version, from the earliest offset, in
/// [`Mode::Rebuild`] (side effects suppressed), under its own group and
/// checkpoint name (`name@v{version}`, see
/// [`versioned_name`]), so the live version's runner
/// and readers are untouched. Once every partition has caught up and the
/// lag left is at most the threshold, the shadow runner stops (committing
/// what it holds) and the shadow is promoted in one statement
/// ([`VersionStore::promote`]); start the live runner of the new version
/// afterwards, it resumes from the shadow's checkpoints.
///
/// A rebuild interrupted by a crash resumes: [`VersionStore::start_shadow`]
/// returns the same shadow version and its checkpoints are where the
/// crash left them. [`VersionStore::rollback`] swaps back to the previous
/// version.
pub struct Rebuild<L, S> {
    log: L,
    topic: String,
    group: String,
    store: S,
    upcasters: Upcasters,
    options: RunnerOptions,
    lag_threshold: u64,
    report_every: Duration,
    metrics: Option<ProjectionMetrics>,
}

impl<L, S> std::fmt::Debug for Rebuild<L, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rebuild")
            .field("topic", &self.topic)
            .field("group", &self.group)
            .field("lag_threshold", &self.lag_threshold)
            .finish_non_exhaustive()
    }
}

impl<L, S> Rebuild<L, S>
where
    L: LogSubscriber,
    S: CheckpointStore + VersionStore,
{
    /// A rebuild over `topic`; the shadow runner joins `{group}@v{version}`.
    pub fn new(log: L, topic: impl Into<String>, group: impl Into<String>, store: S) -> Self {
        Self {
            log,
            topic: topic.into(),
            group: group.into(),
            store,
            upcasters: Upcasters::new(),
            options: RunnerOptions::default().batch(1000, Duration::from_millis(100)),
            lag_threshold: 0,
            report_every: Duration::from_secs(1),
            metrics: None,
        }
    }

    /// Reports the shadow runner's metrics and the rebuild's progress to
    /// `metrics` (labelled `name@v{version}`).
    pub fn metrics(mut self, metrics: ProjectionMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Decodes through `upcasters`.
    pub fn upcasters(mut self, upcasters: Upcasters) -> Self {
        self.upcasters = upcasters;
        self
    }

    /// The shadow runner's options (its mode, start and checkpoint name are
    /// set by the rebuild). Default: batches of 1000 or 100 ms.
    pub fn options(mut self, options: RunnerOptions) -> Self {
        self.options = options;
        self
    }

    /// Promotes once caught up with at most `events` left. Default 0.
    pub fn lag_threshold(mut self, events: u64) -> Self {
        self.lag_threshold = events;
        self
    }

    /// Reports progress this often. Default 1 s.
    pub fn report_every(mut self, every: Duration) -> Self {
        self.report_every = every.max(Duration::from_millis(1));
        self
    }

    /// Builds the shadow version of the projection `make` returns for a
    /// version number, reporting progress to `progress`, and promotes it;
    /// returns the new live version.
    ///
    /// # Errors
    ///
    /// As [`Runner::run`]; nothing is promoted then, and running the
    /// rebuild again resumes it.
    pub async fn run<P>(
        self,
        name: &str,
        make: impl FnOnce(u32) -> P,
        mut progress: impl FnMut(RebuildProgress) + Send,
    ) -> Result<u32, ProjectionError>
    where
        P: Projection<S::Db>,
    {
        let version = self.store.start_shadow(name).await?;
        let label = versioned_name(name, version);
        let mut runner = Runner::new(
            self.log,
            self.topic,
            format!("{}@v{version}", self.group),
            make(version),
            self.store.clone(),
        )
        .upcasters(self.upcasters)
        .options(
            self.options
                .start(surety_core::log::StartPosition::Earliest)
                .mode(Mode::Rebuild)
                .checkpoint_name(label.clone()),
        );
        if let Some(metrics) = &self.metrics {
            runner = runner.metrics(metrics.clone());
        }
        let status = runner.status();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let run = runner.run_until(async {
            let _ = stopped.await;
        });
        let mut run = std::pin::pin!(run);
        let started = Instant::now();
        let mut ticks = tokio::time::interval(self.report_every.min(Duration::from_millis(50)));
        let mut last_report = started;
        let mut stop = Some(stop);
        loop {
            tokio::select! {
                result = &mut run => {
                    result?;
                    if stop.is_some() {
                        // The log ended before the rebuild caught up.
                        return Err(ProjectionError::Version(format!(
                            "the log of {name} ended before version {version} caught up"
                        )));
                    }
                    self.store.promote(name, version).await?;
                    return Ok(version);
                }
                _ = ticks.tick() => {
                    let applied = status.applied();
                    let remaining: u64 =
                        status.lag().values().map(|lag| u64::try_from(*lag).unwrap_or(0)).sum();
                    let elapsed = started.elapsed().as_secs_f64();
                    let rate = if elapsed > 0.0 { applied as f64 / elapsed } else { 0.0 };
                    let now = Instant::now();
                    if let Some(metrics) = &self.metrics {
                        let total = applied + remaining;
                        let ratio = if total == 0 { 0.0 } else { applied as f64 / total as f64 };
                        metrics.set_rebuild(&label, ratio, rate);
                    }
                    if now.duration_since(last_report) >= self.report_every {
                        last_report = now;
                        progress(RebuildProgress {
                            version,
                            applied,
                            remaining,
                            events_per_second: rate,
                            eta: (rate > 0.0)
                                .then(|| Duration::from_secs_f64(remaining as f64 / rate)),
                        });
                    }
                    if status.caught_up_within(self.lag_threshold)
                        && let Some(stop) = stop.take()
                    {
                        let _ = stop.send(());
                    }
                }
            }
        }
    }
}
