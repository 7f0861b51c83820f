//! The [`FaultPlan`]: which faults to inject, how often, and the seed.

use std::time::Duration;

/// Which faults a [`FaultyTransport`](super::FaultyTransport) injects and how
/// often.
///
/// Every probability is a number in `0.0..=1.0` (values outside are clamped,
/// NaN counts as `0.0`). A probability of `0.0` never fires and `1.0` always
/// fires; neither consumes randomness, so plans that only use `0.0` and `1.0`
/// behave the same for every seed. Everything else is decided by one
/// `StdRng` seeded with [`seed`](Self::seed): the same seed and the same
/// sequence of calls give the same faults.
///
/// The default plan injects nothing; a [`FaultyTransport`](super::FaultyTransport)
/// with it behaves exactly like the transport it wraps.
///
/// ```
/// use std::time::Duration;
/// use surety_testkit::fault::FaultPlan;
///
/// let plan = FaultPlan::new(42)
///     .drop(0.1)
///     .duplicate(0.05)
///     .reorder(0.2)
///     .delay_delivery(0.1, Duration::from_millis(20))
///     .fail_ack(0.1)
///     .max_forced_redeliveries(3);
/// assert_eq!(plan.seed, 42);
/// assert_eq!(plan.duplicate, 0.05);
/// assert_eq!(FaultPlan::new(1).drop(7.0).drop, 1.0, "probabilities are clamped");
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct FaultPlan {
    /// Seed of the random number generator that makes every decision.
    pub seed: u64,
    /// Consume side: probability that a delivery is dropped before it
    /// reaches the consumer, without being settled, so that the wrapped
    /// transport delivers it again (a consumer that crashed before handling
    /// it).
    pub drop: f64,
    /// Publish side: probability that a message is published twice (the
    /// duplicate an at-least-once producer makes when it retries a publish
    /// whose confirmation was lost).
    pub duplicate: f64,
    /// Consume side: probability that a delivery is held back and yielded
    /// after the next one. When no next delivery arrives within
    /// [`reorder_window`](Self::reorder_window), the held delivery is
    /// yielded on its own.
    pub reorder: f64,
    /// How long a held-back delivery waits for the next one (default 100 ms).
    pub reorder_window: Duration,
    /// Publish side: probability that a publish is delayed before it is sent.
    pub delay_publish: f64,
    /// Longest publish delay; each delay is uniform in `0..=max_publish_delay`.
    pub max_publish_delay: Duration,
    /// Consume side: probability that a delivery is delayed before it is
    /// yielded.
    pub delay_delivery: f64,
    /// Longest delivery delay; each delay is uniform in `0..=max_delivery_delay`.
    pub max_delivery_delay: Duration,
    /// Publish side: probability that [`send`](surety_core::Publisher::send)
    /// fails with a [`Connection`](surety_core::TransportErrorKind::Connection)
    /// error without publishing anything.
    pub fail_publish: f64,
    /// Consume side: probability that acknowledging a delivery fails with an
    /// [`Ack`](surety_core::TransportErrorKind::Ack) error. The message is then
    /// not acknowledged: its settler is dropped unsettled, so the wrapped
    /// transport delivers it again.
    pub fail_ack: f64,
    /// At most this many redeliveries of one message (per topic and group)
    /// are forced by [`drop`](Self::drop) and [`fail_ack`](Self::fail_ack);
    /// once a message used them up, those two faults leave it alone. `None`
    /// (the default) sets no limit: with a probability of `1.0` a message is
    /// then never handled. A limit makes "every message is eventually
    /// handled" hold for any probabilities.
    pub max_forced_redeliveries: Option<u32>,
}

impl FaultPlan {
    /// A plan that injects nothing, with the given seed. Turn faults on with
    /// the builder methods.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            drop: 0.0,
            duplicate: 0.0,
            reorder: 0.0,
            reorder_window: Duration::from_millis(100),
            delay_publish: 0.0,
            max_publish_delay: Duration::ZERO,
            delay_delivery: 0.0,
            max_delivery_delay: Duration::ZERO,
            fail_publish: 0.0,
            fail_ack: 0.0,
            max_forced_redeliveries: None,
        }
    }

    /// Sets the seed.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Sets the probability of dropping a delivery unsettled, so that it is
    /// delivered again.
    pub fn drop(mut self, probability: f64) -> Self {
        self.drop = clamp(probability);
        self
    }

    /// Sets the probability of publishing a message twice.
    pub fn duplicate(mut self, probability: f64) -> Self {
        self.duplicate = clamp(probability);
        self
    }

    /// Sets the probability of holding a delivery back behind the next one.
    pub fn reorder(mut self, probability: f64) -> Self {
        self.reorder = clamp(probability);
        self
    }

    /// Sets how long a held-back delivery waits for the next one.
    pub fn reorder_window(mut self, window: Duration) -> Self {
        self.reorder_window = window;
        self
    }

    /// Delays publishes with `probability`, each by up to `max`.
    pub fn delay_publish(mut self, probability: f64, max: Duration) -> Self {
        self.delay_publish = clamp(probability);
        self.max_publish_delay = max;
        self
    }

    /// Delays deliveries with `probability`, each by up to `max`.
    pub fn delay_delivery(mut self, probability: f64, max: Duration) -> Self {
        self.delay_delivery = clamp(probability);
        self.max_delivery_delay = max;
        self
    }

    /// Sets the probability that a publish fails without publishing.
    pub fn fail_publish(mut self, probability: f64) -> Self {
        self.fail_publish = clamp(probability);
        self
    }

    /// Sets the probability that an ack fails and the message comes back.
    pub fn fail_ack(mut self, probability: f64) -> Self {
        self.fail_ack = clamp(probability);
        self
    }

    /// Limits the redeliveries that drops and failed acks force on one message.
    pub fn max_forced_redeliveries(mut self, max: u32) -> Self {
        self.max_forced_redeliveries = Some(max);
        self
    }
}

impl Default for FaultPlan {
    fn default() -> Self {
        Self::new(0)
    }
}

/// Clamps a probability into `0.0..=1.0`; NaN becomes `0.0`.
pub(crate) fn clamp(probability: f64) -> f64 {
    if probability.is_nan() {
        0.0
    } else {
        probability.clamp(0.0, 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probabilities_are_clamped() {
        let plan = FaultPlan::new(1)
            .drop(-1.0)
            .duplicate(f64::NAN)
            .reorder(2.0);
        assert_eq!((plan.drop, plan.duplicate, plan.reorder), (0.0, 0.0, 1.0));
    }

    #[test]
    fn the_default_plan_injects_nothing() {
        let plan = FaultPlan::default();
        for p in [
            plan.drop,
            plan.duplicate,
            plan.reorder,
            plan.delay_publish,
            plan.delay_delivery,
            plan.fail_publish,
            plan.fail_ack,
        ] {
            assert_eq!(p, 0.0);
        }
    }
}
