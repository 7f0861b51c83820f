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
