//! RabbitMQ administration through `rabbitmqctl`, for tests that act on the
//! broker: close a client's connection, read a queue's depth.
//!
//! Every function runs `rabbitmqctl -n` [`NODE`] (the node `scripts/services`
//! starts) and blocks until it exits. An async test whose runtime must keep
//! running meanwhile calls them through [`tokio::task::spawn_blocking`].
//!
//! ```no_run
//! use surety_testkit::rabbitmqctl;
//!
//! // Only this test's connection, found by its unique name, is closed.
//! assert_eq!(rabbitmqctl::force_close_connection("my-test.conn.1", "surety test: forced close"), 1);
//! assert_eq!(rabbitmqctl::queue_depth("my-test.queue"), Some(0));
//! ```

use std::process::Command;

/// The RabbitMQ node the functions of this module address.
pub const NODE: &str = "rabbit@localhost";

/// Runs `rabbitmqctl -n NODE args...` and returns its standard output.
///
/// # Panics
///
/// When `rabbitmqctl` cannot be run or exits with a failure (the message
/// carries its standard error).
pub fn run(args: &[&str]) -> String {
    let output = Command::new("rabbitmqctl")
        .args(["-n", NODE])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("rabbitmqctl runs: {e}"));
    assert!(
        output.status.success(),
        "rabbitmqctl {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Closes, on the broker's side, the connections whose client properties
/// carry `name` (a unique connection name), giving `reason`; returns how
/// many it closed.
///
/// # Panics
///
/// As [`run`].
pub fn force_close_connection(name: &str, reason: &str) -> usize {
    let listing = run(&[
        "list_connections",
        "-q",
        "--no-table-headers",
        "pid",
        "client_properties",
    ]);
    let mut closed = 0;
    for line in listing.lines().filter(|line| line.contains(name)) {
        if let Some(pid) = line.split_whitespace().next() {
            run(&["close_connection", pid, reason]);
            closed += 1;
        }
    }
    closed
}

/// Messages in `queue` (ready and unacknowledged), as the broker counts
/// them; `None` when the broker does not list the queue (or lists no
/// count for it).
///
/// # Panics
///
/// As [`run`].
pub fn queue_depth(queue: &str) -> Option<u64> {
    let listing = run(&[
        "list_queues",
        "-q",
        "--no-table-headers",
        "name",
        "messages",
    ]);
    listing.lines().find_map(|line| {
        let mut cols = line.split('\t');
        (cols.next()? == queue).then(|| cols.next()?.trim().parse().ok())?
    })
}
