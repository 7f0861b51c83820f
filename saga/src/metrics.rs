//! Prometheus metrics of the saga orchestrator, registered into a
//! caller-owned registry (the surety-core pattern; see
//! `docs/reference/metrics.md`).
//!
//! | metric | type | labels | meaning |
//! |---|---|---|---|
//! | `surety_saga_inputs_total` | counter | `saga`, `outcome` (`applied`, `ignored`, `finished`, `unknown`, `already_started`, `timer_stale`) | inputs the orchestrator handled (starts included), by outcome |
//! | `surety_saga_transitions_total` | counter | `saga`, `state` | stored transitions, by the step they led to (progress by state) |
//! | `surety_saga_started_total` | counter | `saga` | instances started |
//! | `surety_saga_finished_total` | counter | `saga`, `state` | instances that reached a final step (`completed`, `compensated`, `resolved`, ...) |
//! | `surety_saga_step_duration_seconds` | histogram | `saga`, `state` | how long an instance stayed at a step before an input moved it on |
//! | `surety_saga_instances` | gauge | `saga`, `state` | unfinished instances by step, set by [`SagaMetrics::observe`] (the `consumer::gauge_task`) |
//! | `surety_saga_stuck` | gauge | `saga` | unfinished instances that have not moved for the configured time, set the same way |
//! | `surety_saga_conflicts_total` | counter | `saga` | writes that lost to a concurrent writer and were decided again on the fresh state (not a delivery retry) |
//! | `surety_saga_duplicate_replies_total` | counter | `saga` | replies that changed nothing (a duplicate, or late for the step or the finished instance), each also a recorded no-op |
//! | `surety_saga_timeouts_total` | counter | `saga`, `outcome` (`fired`, `stale`) | timers fired as inputs, or found cancelled/fired by another orchestrator |
//!
//! ```
//! use prometheus_client::registry::Registry;
//! use surety_saga::metrics::SagaMetrics;
//!
//! let mut registry = Registry::default();
//! let metrics = SagaMetrics::register(&mut registry);
//! // Hand a clone to `Orchestrator::metrics`; read counts back in tests.
//! assert_eq!(metrics.inputs_count("checkout", "applied"), 0);
//! ```

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use surety_core::metrics::PREFIX;

use crate::Outcome;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    saga: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SagaLabels {
    saga: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    saga: String,
    state: String,
}

/// The orchestrator's metrics. Cheap to clone (the families are shared).
#[derive(Clone, Debug)]
pub struct SagaMetrics {
    inputs: Family<OutcomeLabels, Counter>,
    transitions: Family<StateLabels, Counter>,
    conflicts: Family<SagaLabels, Counter>,
    duplicate_replies: Family<SagaLabels, Counter>,
    timeouts: Family<OutcomeLabels, Counter>,
    started: Family<SagaLabels, Counter>,
    finished: Family<StateLabels, Counter>,
    steps: Family<StateLabels, Histogram, fn() -> Histogram>,
    instances: Family<StateLabels, Gauge>,
    stuck: Family<SagaLabels, Gauge>,
    seen: std::sync::Arc<std::sync::Mutex<std::collections::BTreeSet<(String, String)>>>,
}

impl Default for SagaMetrics {
    fn default() -> Self {
        fn histogram() -> Histogram {
            // 10 ms to about 2.8 hours.
            Histogram::new(exponential_buckets(0.01, 4.0, 10))
        }
        Self {
            inputs: Family::default(),
            transitions: Family::default(),
            conflicts: Family::default(),
            duplicate_replies: Family::default(),
            timeouts: Family::default(),
            started: Family::default(),
            finished: Family::default(),
            steps: Family::new_with_constructor(histogram),
            instances: Family::default(),
            stuck: Family::default(),
            seen: std::sync::Arc::default(),
        }
    }
}

impl SagaMetrics {
    /// Creates the metrics and registers them under `surety_saga_`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        let registry = registry.sub_registry_with_prefix(PREFIX);
        let registry = registry.sub_registry_with_prefix("saga");
        registry.register(
            "inputs",
            "Inputs the saga orchestrator handled, by outcome",
            metrics.inputs.clone(),
        );
        registry.register(
            "transitions",
            "Stored saga transitions, by the step they led to",
            metrics.transitions.clone(),
        );
        registry.register(
            "conflicts",
            "Saga writes that lost to a concurrent writer and were decided again",
            metrics.conflicts.clone(),
        );
        registry.register(
            "duplicate_replies",
            "Replies that changed nothing: duplicates, or late for the step or the finished instance",
            metrics.duplicate_replies.clone(),
        );
        registry.register(
            "timeouts",
            "Saga timers fired, or found stale when fired, by outcome",
            metrics.timeouts.clone(),
        );
        registry.register("started", "Saga instances started", metrics.started.clone());
        registry.register(
            "finished",
            "Saga instances that reached a final step, by that step",
            metrics.finished.clone(),
        );
        registry.register_with_unit(
            "step_duration",
            "How long a saga instance stayed at a step before an input moved it on",
            prometheus_client::registry::Unit::Seconds,
            metrics.steps.clone(),
        );
        registry.register(
            "instances",
            "Unfinished saga instances by step",
            metrics.instances.clone(),
        );
        registry.register(
            "stuck",
            "Unfinished saga instances that have not moved for the configured time",
            metrics.stuck.clone(),
        );
        metrics
    }

    pub(crate) fn duplicate_reply(&self, saga: &str) {
        self.duplicate_replies
            .get_or_create(&SagaLabels { saga: saga.into() })
            .inc();
    }

    /// The count of duplicate or late replies of saga `saga` (recorded
    /// no-ops).
    pub fn duplicate_replies_count(&self, saga: &str) -> u64 {
        self.duplicate_replies
            .get_or_create(&SagaLabels { saga: saga.into() })
            .get()
    }

    pub(crate) fn started(&self, saga: &str) {
        self.started
            .get_or_create(&SagaLabels { saga: saga.into() })
            .inc();
    }

    pub(crate) fn step(&self, saga: &str, state: &str, waited: std::time::Duration) {
        self.steps
            .get_or_create(&StateLabels {
                saga: saga.into(),
                state: state.into(),
            })
            .observe(waited.as_secs_f64());
    }

    /// Sets the gauges of saga `saga` from the counts of its unfinished
    /// instances by step, `(step, all, idle)` as
    /// [`SagaStore::unfinished_counts`](crate::store::SagaStore::unfinished_counts)
    /// returns them. Steps no longer counted drop to 0.
    pub fn observe(&self, saga: &str, counts: &[(String, u64, u64)]) {
        // prometheus-client cannot iterate a family: the steps set before
        // are remembered, so a step that emptied drops to 0.
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (s, state) in seen.iter() {
            if s == saga && !counts.iter().any(|(c, _, _)| c == state) {
                self.instances
                    .get_or_create(&StateLabels {
                        saga: saga.into(),
                        state: state.clone(),
                    })
                    .set(0);
            }
        }
        let mut stuck = 0u64;
        for (state, all, idle) in counts {
            seen.insert((saga.to_owned(), state.clone()));
            self.instances
                .get_or_create(&StateLabels {
                    saga: saga.into(),
                    state: state.clone(),
                })
                .set(i64::try_from(*all).unwrap_or(i64::MAX));
            stuck = stuck.saturating_add(*idle);
        }
        drop(seen);
        self.stuck
            .get_or_create(&SagaLabels { saga: saga.into() })
            .set(i64::try_from(stuck).unwrap_or(i64::MAX));
    }

    /// The count of unfinished instances of saga `saga` at step `state`, as
    /// last observed.
    pub fn instances_count(&self, saga: &str, state: &str) -> i64 {
        self.instances
            .get_or_create(&StateLabels {
                saga: saga.into(),
                state: state.into(),
            })
            .get()
    }

    /// The stuck instances of saga `saga`, as last observed.
    pub fn stuck_count(&self, saga: &str) -> i64 {
        self.stuck
            .get_or_create(&SagaLabels { saga: saga.into() })
            .get()
    }

    /// The count of instances of saga `saga` started.
    pub fn started_count(&self, saga: &str) -> u64 {
        self.started
            .get_or_create(&SagaLabels { saga: saga.into() })
            .get()
    }

    /// The count of instances of saga `saga` that finished at `state`.
    pub fn finished_count(&self, saga: &str, state: &str) -> u64 {
        self.finished
            .get_or_create(&StateLabels {
                saga: saga.into(),
                state: state.into(),
            })
            .get()
    }

    pub(crate) fn conflict(&self, saga: &str) {
        self.conflicts
            .get_or_create(&SagaLabels { saga: saga.into() })
            .inc();
    }

    /// Creates the series of saga `saga` that do not depend on its steps
    /// at zero: inputs by outcome, starts, conflicts, duplicate replies,
    /// timeouts and the stuck gauge (the per-step series come as steps are
    /// reached, and from the gauge task).
    pub(crate) fn saga(&self, saga: &str) {
        let labels = SagaLabels { saga: saga.into() };
        let _ = self.started.get_or_create(&labels);
        let _ = self.conflicts.get_or_create(&labels);
        let _ = self.duplicate_replies.get_or_create(&labels);
        let _ = self.stuck.get_or_create(&labels);
        for outcome in [
            "applied",
            "ignored",
            "finished",
            "unknown",
            "already_started",
            "timer_stale",
        ] {
            let _ = self.inputs.get_or_create(&OutcomeLabels {
                saga: saga.into(),
                outcome: outcome.into(),
            });
        }
        for outcome in ["fired", "stale"] {
            let _ = self.timeouts.get_or_create(&OutcomeLabels {
                saga: saga.into(),
                outcome: outcome.into(),
            });
        }
    }

    pub(crate) fn timeout(&self, saga: &str, outcome: &Outcome) {
        let outcome = if matches!(outcome, Outcome::Applied { .. } | Outcome::Ignored) {
            "fired"
        } else {
            "stale"
        };
        self.timeouts
            .get_or_create(&OutcomeLabels {
                saga: saga.into(),
                outcome: outcome.into(),
            })
            .inc();
    }

    /// The count of version conflicts of saga `saga` decided again.
    pub fn conflicts_count(&self, saga: &str) -> u64 {
        self.conflicts
            .get_or_create(&SagaLabels { saga: saga.into() })
            .get()
    }

    /// The count of timers of saga `saga` fired (`fired`) or found stale
    /// (`stale`).
    pub fn timeouts_count(&self, saga: &str, outcome: &str) -> u64 {
        self.timeouts
            .get_or_create(&OutcomeLabels {
                saga: saga.into(),
                outcome: outcome.into(),
            })
            .get()
    }

    pub(crate) fn record(&self, saga: &str, outcome: &Outcome) {
        let name = match outcome {
            Outcome::Applied {
                state_name,
                finished,
                ..
            } => {
                if *finished {
                    self.finished
                        .get_or_create(&StateLabels {
                            saga: saga.into(),
                            state: state_name.clone(),
                        })
                        .inc();
                }
                self.transitions
                    .get_or_create(&StateLabels {
                        saga: saga.into(),
                        state: state_name.clone(),
                    })
                    .inc();
                "applied"
            }
            Outcome::Ignored => "ignored",
            Outcome::Finished => "finished",
            Outcome::Unknown => "unknown",
            Outcome::AlreadyStarted => "already_started",
            Outcome::TimerStale => "timer_stale",
        };
        self.inputs
            .get_or_create(&OutcomeLabels {
                saga: saga.into(),
                outcome: name.into(),
            })
            .inc();
    }

    /// The count of inputs of saga `saga` handled with `outcome`.
    pub fn inputs_count(&self, saga: &str, outcome: &str) -> u64 {
        self.inputs
            .get_or_create(&OutcomeLabels {
                saga: saga.into(),
                outcome: outcome.into(),
            })
            .get()
    }

    /// The count of transitions of saga `saga` into step `state`.
    pub fn transitions_count(&self, saga: &str, state: &str) -> u64 {
        self.transitions
            .get_or_create(&StateLabels {
                saga: saga.into(),
                state: state.into(),
            })
            .get()
    }
}
