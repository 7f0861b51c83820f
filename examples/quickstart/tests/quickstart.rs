//! Runs the quickstart binary and checks that it tells the promised story.

use std::process::Command;

#[test]
fn quickstart_handles_retries_and_rejects() {
    let output = Command::new(env!("CARGO_BIN_EXE_surety-quickstart"))
        .env_remove("RUST_LOG")
        .output()
        .expect("the quickstart binary runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "quickstart exited with {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );

    let expected = [
        // Handled on the first attempt.
        "handled   order o-1 (attempt 1)",
        // Failed transiently, requeued, handled on the second attempt.
        "failed    order o-2 attempt 1: inventory service busy (transient) -> will retry",
        "handled   order o-2 (attempt 2)",
        // Rejected as poison by the decoder; the handler never ran.
        "as poison before its handler ran: payload does not decode",
        // The fulfilment worker's report, then the notifications worker's.
        "fulfilment:    WorkerReport { acked: 2, handled: 2,",
        "requeued: 1, rejected: 1,",
        "notifications: WorkerReport { acked: 2, handled: 2,",
        r#"outcome="requeued"} 1"#,
    ];
    let mut from = 0;
    for line in expected {
        let at = stdout[from..]
            .find(line)
            .unwrap_or_else(|| panic!("missing (or out of order) {line:?} in stdout:\n{stdout}"));
        from += at + line.len();
    }
    // Each handled order emitted an event, published before the order was
    // acknowledged and handled by the second consumer.
    for order in ["o-1", "o-2"] {
        assert!(
            stdout.contains(&format!("notified  customer of order {order}")),
            "missing the event of {order}:\n{stdout}"
        );
    }
    assert!(
        !stdout.contains("handled   order o-3"),
        "the poison order must never be handled:\n{stdout}"
    );
}
