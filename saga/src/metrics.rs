//! Prometheus metrics of the saga orchestrator, registered into a
//! caller-owned registry (the surety-core pattern; see
//! `docs/reference/metrics.md`).
//!
//! | metric | type | labels | meaning |
//! |---|---|---|---|
//! | `surety_saga_inputs_total` | counter | `saga`, `outcome` (`applied`, `ignored`, `finished`, `unknown`, `already_started`, `timer_stale`) | inputs the orchestrator handled (starts included), by outcome |
//! | `surety_saga_transitions_total` | counter | `saga`, `state` | stored transitions, by the step they led to (progress by state) |
//! | `surety_saga_conflicts_total` | counter | `saga` | writes that lost to a concurrent writer and were decided again on the fresh state (not a delivery retry) |
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
#[derive(Clone, Debug, Default)]
pub struct SagaMetrics {
    inputs: Family<OutcomeLabels, Counter>,
    transitions: Family<StateLabels, Counter>,
    conflicts: Family<SagaLabels, Counter>,
    timeouts: Family<OutcomeLabels, Counter>,
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
            "timeouts",
            "Saga timers fired, or found stale when fired, by outcome",
            metrics.timeouts.clone(),
        );
        metrics
    }

    pub(crate) fn conflict(&self, saga: &str) {
        self.conflicts
            .get_or_create(&SagaLabels { saga: saga.into() })
            .inc();
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
            Outcome::Applied { state_name, .. } => {
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
