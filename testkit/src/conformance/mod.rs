//! The transport conformance suite: one set of checks every
//! [`Publisher`] + [`Subscriber`] + [`Close`] implementation runs, with the
//! capabilities it declares.
//!
//! An adapter calls [`transport_conformance`] from a test with a function
//! that makes a fresh transport and its [`Capabilities`], and asserts the
//! [`Report`]. Each check is also a public function taking a transport, for
//! running one check on its own.
//!
//! | check | needs |
//! |---|---|
//! | [`attributes_round_trip`] | |
//! | [`headers_and_binary_payload`] | |
//! | [`ack_removes_message`] | |
//! | [`nack_requeue_redelivers`] | [`redelivers_on_nack`](Capabilities::redelivers_on_nack) |
//! | [`reject_does_not_redeliver`] | |
//! | [`dropped_delivery_redelivered`] | [`redelivers_dropped`](Capabilities::redelivers_dropped) |
//! | [`per_key_order`] | [`per_key_order`](Capabilities::per_key_order) |
//! | [`worker_per_key_order`] | |
//! | [`fan_out_to_groups`] | |
//! | [`competing_consumers`] | [`competing_consumers`](Capabilities::competing_consumers) |
//! | [`close_is_idempotent`] | |
//! | [`publish_after_close_fails`] | |
//! | [`close_ends_subscriptions`] | |
//!
//! # Running against a real broker
//!
//! Every check publishes to a topic of its own and consumes with groups of
//! its own, named `<prefix>.<check>.<role>.<uuid v7>` (lowercase
//! letters, digits, dashes and dots only; the prefix is
//! [`Capabilities::name_prefix`], `surety-testkit` by default), so the suite
//! can run again and again against one long-lived broker, and in parallel
//! with other tests. It subscribes before it publishes. The suite does not
//! delete what it created: give it a prefix unique to the run and delete
//! what starts with it afterwards (for RabbitMQ,
//! `surety_testkit::rabbitmq::Cleanup::prefix`).
//!
//! Every wait has a deadline: a transport that loses a message fails after
//! [`receive_timeout`](Capabilities::receive_timeout) rather than hanging.
//! That an acked or rejected message does not come back is shown with a
//! marker published afterwards, which must be the next delivery; the
//! fan-out and competing-consumer checks, whose messages reach several
//! members, watch for [`quiet_period`](Capabilities::quiet_period) that
//! nothing more arrives.
//!
//! ```
//! use std::time::Duration;
//! use surety_core::memory::MemoryTransport;
//! use surety_testkit::conformance::{self, Capabilities};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! // One check on its own: it returns what went wrong, if anything.
//! let transport = MemoryTransport::new();
//! let caps = Capabilities::all().quiet_period(Duration::from_millis(20));
//! conformance::nack_requeue_redelivers(&transport, &caps).await.unwrap();
//! # }
//! ```

mod capabilities;
mod checks;
pub mod log;
mod report;

use std::future::Future;

use surety_core::{Close, Publisher, Subscriber};

pub use capabilities::Capabilities;
pub use checks::{
    ack_removes_message, attributes_round_trip, close_ends_subscriptions, close_is_idempotent,
    competing_consumers, dropped_delivery_redelivered, fan_out_to_groups,
    headers_and_binary_payload, nack_requeue_redelivers, per_key_order, publish_after_close_fails,
    reject_does_not_redeliver, worker_per_key_order,
};
pub use report::{CheckFailure, CheckOutcome, CheckStatus, Report};

/// The result of one check.
pub type CheckResult = Result<(), CheckFailure>;

/// Runs every conformance check against transports made by `make`, skipping
/// the checks whose capability `caps` does not declare.
///
/// Each check gets a new transport from `make` and closes it afterwards, so
/// a check that leaves a transport in a bad state does not affect the next.
/// The checks run one after another; the report lists them in order.
///
/// ```
/// use std::time::Duration;
/// use surety_core::memory::MemoryTransport;
/// use surety_testkit::conformance::{transport_conformance, Capabilities};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let caps = Capabilities::all()
///     .receive_timeout(Duration::from_secs(5))
///     .quiet_period(Duration::from_millis(20));
/// let report = transport_conformance(|| async { MemoryTransport::new() }, caps).await;
/// report.assert_ok();
/// assert_eq!(report.passed().len(), report.outcomes().len());
/// # }
/// ```
pub async fn transport_conformance<T, F, Fut>(make: F, caps: Capabilities) -> Report
where
    F: Fn() -> Fut,
    Fut: Future<Output = T>,
    T: Publisher + Subscriber + Close + Send + Sync + 'static,
{
    let mut report = Report::default();
    for check in Check::ALL {
        if let Some(capability) = check.missing_capability(&caps) {
            report.push(check.name(), CheckStatus::Skipped { capability });
            continue;
        }
        tracing::info!(check = check.name(), "running transport conformance check");
        let transport = make().await;
        let result = check.run(&transport, &caps).await;
        match tokio::time::timeout(caps.receive_timeout, transport.close()).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                tracing::warn!(check = check.name(), error = %err, "closing the transport after the check failed")
            }
            Err(_) => tracing::warn!(
                check = check.name(),
                "closing the transport after the check timed out"
            ),
        }
        if let Err(failure) = &result {
            tracing::warn!(%failure, "transport conformance check failed");
        }
        report.push_result(check.name(), result);
    }
    report
}

#[derive(Debug, Clone, Copy)]
enum Check {
    AttributesRoundTrip,
    HeadersAndBinaryPayload,
    AckRemovesMessage,
    NackRequeueRedelivers,
    RejectDoesNotRedeliver,
    DroppedDeliveryRedelivered,
    PerKeyOrder,
    WorkerPerKeyOrder,
    FanOutToGroups,
    CompetingConsumers,
    CloseIsIdempotent,
    PublishAfterCloseFails,
    CloseEndsSubscriptions,
}

impl Check {
    const ALL: [Self; 13] = [
        Self::AttributesRoundTrip,
        Self::HeadersAndBinaryPayload,
        Self::AckRemovesMessage,
        Self::NackRequeueRedelivers,
        Self::RejectDoesNotRedeliver,
        Self::DroppedDeliveryRedelivered,
        Self::PerKeyOrder,
        Self::WorkerPerKeyOrder,
        Self::FanOutToGroups,
        Self::CompetingConsumers,
        Self::CloseIsIdempotent,
        Self::PublishAfterCloseFails,
        Self::CloseEndsSubscriptions,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::AttributesRoundTrip => "attributes_round_trip",
            Self::HeadersAndBinaryPayload => "headers_and_binary_payload",
            Self::AckRemovesMessage => "ack_removes_message",
            Self::NackRequeueRedelivers => "nack_requeue_redelivers",
            Self::RejectDoesNotRedeliver => "reject_does_not_redeliver",
            Self::DroppedDeliveryRedelivered => "dropped_delivery_redelivered",
            Self::PerKeyOrder => "per_key_order",
            Self::WorkerPerKeyOrder => "worker_per_key_order",
            Self::FanOutToGroups => "fan_out_to_groups",
            Self::CompetingConsumers => "competing_consumers",
            Self::CloseIsIdempotent => "close_is_idempotent",
            Self::PublishAfterCloseFails => "publish_after_close_fails",
            Self::CloseEndsSubscriptions => "close_ends_subscriptions",
        }
    }

    /// The capability this check needs and `caps` does not declare.
    fn missing_capability(self, caps: &Capabilities) -> Option<&'static str> {
        let (declared, capability) = match self {
            Self::NackRequeueRedelivers => (caps.redelivers_on_nack, "redelivers_on_nack"),
            Self::DroppedDeliveryRedelivered => (caps.redelivers_dropped, "redelivers_dropped"),
            Self::PerKeyOrder => (caps.per_key_order, "per_key_order"),
            Self::CompetingConsumers => (caps.competing_consumers, "competing_consumers"),
            _ => return None,
        };
        (!declared).then_some(capability)
    }

    async fn run<T>(self, transport: &T, caps: &Capabilities) -> CheckResult
    where
        T: Publisher + Subscriber + Close,
    {
        match self {
            Self::AttributesRoundTrip => attributes_round_trip(transport, caps).await,
            Self::HeadersAndBinaryPayload => headers_and_binary_payload(transport, caps).await,
            Self::AckRemovesMessage => ack_removes_message(transport, caps).await,
            Self::NackRequeueRedelivers => nack_requeue_redelivers(transport, caps).await,
            Self::RejectDoesNotRedeliver => reject_does_not_redeliver(transport, caps).await,
            Self::DroppedDeliveryRedelivered => dropped_delivery_redelivered(transport, caps).await,
            Self::PerKeyOrder => per_key_order(transport, caps).await,
            Self::WorkerPerKeyOrder => worker_per_key_order(transport, caps).await,
            Self::FanOutToGroups => fan_out_to_groups(transport, caps).await,
            Self::CompetingConsumers => competing_consumers(transport, caps).await,
            Self::CloseIsIdempotent => close_is_idempotent(transport, caps).await,
            Self::PublishAfterCloseFails => publish_after_close_fails(transport, caps).await,
            Self::CloseEndsSubscriptions => close_ends_subscriptions(transport, caps).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_names_are_unique() {
        let names: std::collections::HashSet<_> = Check::ALL.iter().map(|c| c.name()).collect();
        assert_eq!(names.len(), Check::ALL.len());
    }

    #[test]
    fn undeclared_capabilities_skip_their_checks() {
        let none = Capabilities::default();
        let skipped: Vec<_> = Check::ALL
            .iter()
            .filter_map(|c| c.missing_capability(&none))
            .collect();
        assert_eq!(
            skipped,
            [
                "redelivers_on_nack",
                "redelivers_dropped",
                "per_key_order",
                "competing_consumers"
            ]
        );
        assert!(
            Check::ALL
                .iter()
                .all(|c| c.missing_capability(&Capabilities::all()).is_none())
        );
    }
}
