//! The in-memory log passes the positioned-subscription conformance suite.

use std::time::Duration;

use surety_core::memory::MemoryLog;
use surety_testkit::conformance::log::{self, LogCapabilities, log_conformance};

fn caps() -> LogCapabilities {
    LogCapabilities::default().receive_timeout(Duration::from_secs(5))
}

#[tokio::test]
async fn memory_log_passes_every_check() {
    let report = log_conformance(|| async { MemoryLog::new() }, caps()).await;
    println!("{report}");
    report.assert_ok();
    assert!(report.skipped().is_empty(), "{report}");
    assert_eq!(report.passed().len(), 5, "{report}");
}

#[tokio::test]
async fn memory_log_with_one_partition_passes() {
    let report = log_conformance(|| async { MemoryLog::with_partitions(1) }, caps()).await;
    report.assert_ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_log_passes_on_a_multi_threaded_runtime() {
    let report = log_conformance(|| async { MemoryLog::with_partitions(8) }, caps()).await;
    report.assert_ok();
}

#[tokio::test]
async fn checks_run_on_their_own() {
    let caps = caps().messages(50);
    let log = MemoryLog::new();
    log::restart_from_stored_positions(&log, &caps)
        .await
        .unwrap();
    log::revoke_and_assign_across_two_members(&log, &caps)
        .await
        .unwrap();
}

/// A log that ignores the caller's seeks: every partition starts where the
/// options say.
#[derive(Debug, Clone, Default)]
struct IgnoresSeeks(MemoryLog);

impl surety_core::Publisher for IgnoresSeeks {
    async fn send(
        &self,
        topic: &str,
        envelope: surety_core::Envelope,
    ) -> surety_core::Result<surety_core::Confirmation> {
        self.0.send(topic, envelope).await
    }
}

impl surety_core::log::LogSubscriber for IgnoresSeeks {
    async fn subscribe_log(
        &self,
        topic: &str,
        group: &str,
        options: surety_core::log::LogOptions,
    ) -> surety_core::Result<surety_core::log::LogStream> {
        use futures::StreamExt;
        use surety_core::log::{Assignment, LogEvent};
        let stream = self.0.subscribe_log(topic, group, options).await?;
        Ok(stream
            .map(|event| match event {
                // The caller seeks a copy the log never reads.
                Ok(LogEvent::Assigned(a)) => {
                    Ok(LogEvent::Assigned(Assignment::new(a.partitions().to_vec())))
                }
                other => other,
            })
            .boxed())
    }
}

#[tokio::test]
async fn the_suite_catches_a_log_that_ignores_seeks() {
    let caps = caps().receive_timeout(Duration::from_secs(1));
    let failure = log::restart_from_stored_positions(&IgnoresSeeks::default(), &caps)
        .await
        .unwrap_err();
    assert!(
        failure.message.contains("records skipped or repeated"),
        "{failure}"
    );
}
