//! The state every part of one faulty transport shares: the seeded RNG, the
//! counters, the event log and the per-message redelivery budget.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use surety_core::Envelope;

use super::plan::{FaultPlan, clamp};
use super::stats::{EVENT_LOG_LIMIT, Fault, FaultEvent, FaultStats};

pub(crate) struct Shared {
    pub(crate) plan: FaultPlan,
    state: Mutex<State>,
}

struct State {
    rng: StdRng,
    stats: FaultStats,
    events: Vec<FaultEvent>,
    /// Forced redeliveries per message (topic, group, dedup key).
    forced: HashMap<String, u32>,
}

impl State {
    /// One decision with probability `p`; `0` and `1` draw nothing.
    fn draw(&mut self, p: f64) -> bool {
        let p = clamp(p);
        if p <= 0.0 {
            false
        } else if p >= 1.0 {
            true
        } else {
            self.rng.random::<f64>() < p
        }
    }

    fn record(&mut self, fault: Fault, topic: &str, message_id: &str) {
        self.stats.count(fault);
        if self.events.len() < EVENT_LOG_LIMIT {
            self.events.push(FaultEvent {
                fault,
                topic: topic.to_owned(),
                message_id: message_id.to_owned(),
            });
        }
        tracing::debug!(%fault, topic, message_id, "fault injected");
    }

    fn budget_left(&self, max: Option<u32>, key: &str) -> bool {
        max.is_none_or(|max| self.forced.get(key).copied().unwrap_or(0) < max)
    }
}

/// Identifies one message in one group, for the redelivery budget.
#[derive(Debug, Clone)]
pub(crate) struct MessageKey {
    key: String,
    pub(crate) topic: String,
    pub(crate) message_id: String,
}

impl MessageKey {
    pub(crate) fn new(topic: &str, group: &str, envelope: &Envelope) -> Self {
        Self {
            key: format!("{topic}\u{0}{group}\u{0}{}", envelope.dedup_key()),
            topic: topic.to_owned(),
            message_id: envelope.id.clone(),
        }
    }
}

impl Shared {
    pub(crate) fn new(plan: FaultPlan) -> Self {
        Self {
            state: Mutex::new(State {
                rng: StdRng::seed_from_u64(plan.seed),
                stats: FaultStats::default(),
                events: Vec::new(),
                forced: HashMap::new(),
            }),
            plan,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is only counters and an RNG; a panic elsewhere while it
        // was held leaves nothing half-updated that matters.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Draws one decision with probability `p` without recording anything.
    pub(crate) fn chance(&self, p: f64) -> bool {
        self.lock().draw(p)
    }

    /// Records a fault that happened.
    pub(crate) fn record(&self, fault: Fault, topic: &str, message_id: &str) {
        self.lock().record(fault, topic, message_id);
    }

    /// Decides a fault with probability `p` and records it when it fires.
    pub(crate) fn decide(&self, p: f64, fault: Fault, topic: &str, message_id: &str) -> bool {
        let mut state = self.lock();
        let fired = state.draw(p);
        if fired {
            state.record(fault, topic, message_id);
        }
        fired
    }

    /// Decides a delay with probability `p`, uniform in `0..=max`, and
    /// records it when it fires.
    pub(crate) fn delay(
        &self,
        p: f64,
        max: Duration,
        fault: fn(Duration) -> Fault,
        topic: &str,
        message_id: &str,
    ) -> Option<Duration> {
        let mut state = self.lock();
        if !state.draw(p) {
            return None;
        }
        let max_micros = u64::try_from(max.as_micros()).unwrap_or(u64::MAX);
        let delay = if max_micros == 0 {
            Duration::ZERO
        } else {
            Duration::from_micros(state.rng.random_range(0..=max_micros))
        };
        state.record(fault(delay), topic, message_id);
        Some(delay)
    }

    /// Decides a fault that forces a redelivery of `message` now: fires with
    /// probability `p` while the message has budget left, spends the budget
    /// and records the fault.
    pub(crate) fn force_redelivery(&self, p: f64, fault: Fault, message: &MessageKey) -> bool {
        let max = self.plan.max_forced_redeliveries;
        let mut state = self.lock();
        if !state.draw(p) || !state.budget_left(max, &message.key) {
            return false;
        }
        *state.forced.entry(message.key.clone()).or_insert(0) += 1;
        state.record(fault, &message.topic, &message.message_id);
        true
    }

    /// Arms a fault that forces a redelivery later (a failed ack): draws with
    /// probability `p` now, in delivery order, so that decisions do not
    /// depend on when handlers finish. Nothing is recorded yet.
    pub(crate) fn arm(&self, p: f64, message: &MessageKey) -> bool {
        let max = self.plan.max_forced_redeliveries;
        let mut state = self.lock();
        state.draw(p) && state.budget_left(max, &message.key)
    }

    /// Fires an armed fault if the message still has budget left.
    pub(crate) fn fire_armed(&self, fault: Fault, message: &MessageKey) -> bool {
        let max = self.plan.max_forced_redeliveries;
        let mut state = self.lock();
        if !state.budget_left(max, &message.key) {
            return false;
        }
        *state.forced.entry(message.key.clone()).or_insert(0) += 1;
        state.record(fault, &message.topic, &message.message_id);
        true
    }

    pub(crate) fn stats(&self) -> FaultStats {
        self.lock().stats
    }

    pub(crate) fn events(&self) -> Vec<FaultEvent> {
        self.lock().events.clone()
    }
}
