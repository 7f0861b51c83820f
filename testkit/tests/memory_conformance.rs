//! The in-memory transport passes the transport conformance suite with every
//! capability, and the suite notices transports that misbehave.

use std::time::Duration;

use futures::StreamExt;
use surety_core::memory::MemoryTransport;
use surety_core::{
    Close, Confirmation, Delivery, DeliveryStream, Envelope, Publisher, Result, Settle, Subscriber,
};
use surety_testkit::conformance::{
    self, Capabilities, CheckFailure, CheckStatus, Report, transport_conformance,
};
use surety_testkit::fault::{FaultPlan, FaultyTransport};

fn caps() -> Capabilities {
    Capabilities::all()
        .receive_timeout(Duration::from_secs(5))
        .quiet_period(Duration::from_millis(300))
}

/// Short waits, for checks that are expected to fail.
fn impatient_caps(receive_timeout: Duration) -> Capabilities {
    caps()
        .receive_timeout(receive_timeout)
        .quiet_period(Duration::from_millis(100))
}

/// The in-memory transport, misbehaving as `plan` says.
fn faulty(plan: FaultPlan) -> FaultyTransport<MemoryTransport> {
    FaultyTransport::new(MemoryTransport::new(), plan)
}

#[track_caller]
fn assert_message_contains(failure: &CheckFailure, text: &str) {
    assert!(failure.message.contains(text), "{failure}");
}

fn failed_checks(report: &Report) -> Vec<&'static str> {
    report.failures().iter().map(|f| f.check).collect()
}

#[tokio::test]
async fn memory_transport_passes_every_check() {
    let report = transport_conformance(|| async { MemoryTransport::new() }, caps()).await;
    report.assert_ok();
    assert!(report.skipped().is_empty(), "{report}");
    assert_eq!(report.passed().len(), 13, "{report}");
}

#[tokio::test]
async fn memory_transport_passes_each_check_run_on_its_own() {
    let caps = caps().quiet_period(Duration::from_millis(100));
    let t = MemoryTransport::new();
    conformance::attributes_round_trip(&t, &caps).await.unwrap();
    conformance::headers_and_binary_payload(&t, &caps)
        .await
        .unwrap();
    conformance::ack_removes_message(&t, &caps).await.unwrap();
    conformance::nack_requeue_redelivers(&t, &caps)
        .await
        .unwrap();
    conformance::reject_does_not_redeliver(&t, &caps)
        .await
        .unwrap();
    conformance::dropped_delivery_redelivered(&t, &caps)
        .await
        .unwrap();
    conformance::per_key_order(&t, &caps).await.unwrap();
    conformance::worker_per_key_order(&t, &caps).await.unwrap();
    conformance::fan_out_to_groups(&t, &caps).await.unwrap();
    conformance::competing_consumers(&t, &caps).await.unwrap();
    // The close checks close the transport they are given.
    conformance::close_is_idempotent(&MemoryTransport::new(), &caps)
        .await
        .unwrap();
    conformance::publish_after_close_fails(&MemoryTransport::new(), &caps)
        .await
        .unwrap();
    conformance::close_ends_subscriptions(&MemoryTransport::new(), &caps)
        .await
        .unwrap();
}

#[tokio::test]
async fn undeclared_capabilities_are_skipped_not_failed() {
    let caps = Capabilities::default()
        .per_key_order(true)
        .quiet_period(Duration::from_millis(100));
    let report = transport_conformance(|| async { MemoryTransport::new() }, caps).await;
    report.assert_ok();
    assert_eq!(
        report.skipped(),
        [
            "nack_requeue_redelivers",
            "dropped_delivery_redelivered",
            "competing_consumers"
        ]
    );
    assert_eq!(
        report.status("competing_consumers"),
        Some(&CheckStatus::Skipped {
            capability: "competing_consumers"
        })
    );
}

#[tokio::test]
async fn a_fault_free_wrapper_is_transparent() {
    let report = transport_conformance(|| async { faulty(FaultPlan::new(9)) }, caps()).await;
    report.assert_ok();
}

#[tokio::test]
async fn the_suite_catches_a_transport_that_duplicates_messages() {
    let caps = impatient_caps(Duration::from_secs(1));
    let report =
        transport_conformance(|| async { faulty(FaultPlan::new(1).duplicate(1.0)) }, caps).await;
    assert_eq!(
        failed_checks(&report),
        [
            "ack_removes_message",
            "reject_does_not_redeliver",
            "per_key_order",
            "worker_per_key_order",
            "fan_out_to_groups",
            "competing_consumers"
        ],
        "{report}"
    );
    let Some(CheckStatus::Failed(failure)) = report.status("ack_removes_message") else {
        panic!("ack_removes_message should have failed:\n{report}");
    };
    assert!(
        failure
            .message
            .starts_with("expected nothing before marker")
            && failure
                .message
                .contains("delivered (redelivered: false, delivery count: Some(1))"),
        "{failure}"
    );
    let Some(CheckStatus::Failed(failure)) = report.status("per_key_order") else {
        panic!("per_key_order should have failed:\n{report}");
    };
    assert_message_contains(failure, "key-0: [0, 0, 1, 1, ");
    let text = report.to_string();
    assert!(
        text.contains("FAIL  ack_removes_message: expected"),
        "{text}"
    );
    assert!(std::panic::catch_unwind(|| report.assert_ok()).is_err());
}

#[tokio::test]
async fn the_suite_catches_a_transport_whose_acks_fail() {
    let caps = impatient_caps(Duration::from_secs(1));
    let t = faulty(FaultPlan::new(1).fail_ack(1.0));
    let failure = conformance::attributes_round_trip(&t, &caps)
        .await
        .unwrap_err();
    assert_eq!(failure.check, "attributes_round_trip");
    assert_message_contains(&failure, "to succeed; saw an error of kind ack");
}

#[tokio::test]
async fn the_suite_catches_a_transport_that_loses_messages() {
    let caps = impatient_caps(Duration::from_millis(300));
    // Every publish "fails": the check reports the publish, not a hang.
    let t = faulty(FaultPlan::new(1).fail_publish(1.0));
    let failure = conformance::ack_removes_message(&t, &caps)
        .await
        .unwrap_err();
    assert_message_contains(&failure, "to succeed; saw an error of kind connection");
    // Deliveries dropped for good: the receive deadline ends the check.
    let t = faulty(FaultPlan::new(1).drop(1.0));
    let failure = conformance::ack_removes_message(&t, &caps)
        .await
        .unwrap_err();
    assert_message_contains(&failure, "to be delivered within 300ms; saw no delivery");
}

/// A transport whose acks report success but are never applied.
#[derive(Debug, Clone, Default)]
struct LyingAcks(MemoryTransport);

#[derive(Debug)]
struct LyingSettle(Box<dyn Settle>);

#[async_trait::async_trait]
impl Settle for LyingSettle {
    async fn ack(self: Box<Self>) -> Result<()> {
        drop(self.0); // unsettled: the message comes back
        Ok(())
    }
    async fn nack(self: Box<Self>, requeue: bool) -> Result<()> {
        self.0.nack(requeue).await
    }
    async fn reject(self: Box<Self>) -> Result<()> {
        self.0.reject().await
    }
}

impl Publisher for LyingAcks {
    async fn send(&self, topic: &str, envelope: Envelope) -> Result<Confirmation> {
        self.0.send(topic, envelope).await
    }
}

impl Subscriber for LyingAcks {
    async fn subscribe(&self, topic: &str, group: &str) -> Result<DeliveryStream> {
        let stream = self.0.subscribe(topic, group).await?;
        Ok(stream
            .map(|item| {
                item.map(|d| {
                    let (env, info, settle) = d.into_parts();
                    Delivery::new(env, info, Box::new(LyingSettle(settle)))
                })
            })
            .boxed())
    }
}

impl Close for LyingAcks {
    async fn close(&self) -> Result<()> {
        self.0.close().await
    }
}

#[tokio::test]
async fn the_suite_catches_acks_that_are_not_applied() {
    let caps = impatient_caps(Duration::from_secs(1));
    let failure = conformance::ack_removes_message(&LyingAcks::default(), &caps)
        .await
        .unwrap_err();
    assert!(
        failure
            .message
            .starts_with("expected nothing before marker")
            && failure.message.contains("delivery count: Some(2)"),
        "{failure}"
    );
    // The other checks pass or fail on their own; acks matter everywhere.
    let report = transport_conformance(|| async { LyingAcks::default() }, caps).await;
    assert!(
        failed_checks(&report).contains(&"ack_removes_message"),
        "{report}"
    );
}

#[test]
fn public_types_are_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Capabilities>();
    check::<Report>();
    check::<conformance::CheckFailure>();
}
