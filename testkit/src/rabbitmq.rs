//! Cleaning up after a test on RabbitMQ: a [`Cleanup`] guard deletes the
//! queues and exchanges a test declared when it is dropped, also when the
//! test fails, so test runs do not leave durable queues on the broker.
//!
//! ```no_run
//! use surety_testkit::rabbitmq::Cleanup;
//!
//! # fn url() -> String { String::new() }
//! let topic = "surety-test.orders.0192";
//! // Deleted when `_cleanup` goes out of scope, however the test ends.
//! let _cleanup = Cleanup::new(url()).queue(format!("{topic}.billing"));
//!
//! // Everything whose name starts with the test's unique topic: its group
//! // queues, dead-letter queues and exchanges, retry levels.
//! let _cleanup = Cleanup::new(url()).prefix(topic);
//! ```

use std::sync::Mutex;
use std::time::Duration;

use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::{Connection, ConnectionProperties};

/// How long a cleanup may take in all before it gives up (and says so).
const CLEANUP_LIMIT: Duration = Duration::from_secs(15);

/// Deletes, when dropped, the queues and exchanges registered with it.
///
/// Deleting runs on a thread of its own with its own runtime, so the guard
/// may be dropped inside or outside an async test. Names that do not exist
/// (any more) are fine. A failure to delete is printed, never a panic: a
/// cleanup must not hide the test's own result.
#[derive(Debug)]
pub struct Cleanup {
    url: String,
    queues: Mutex<Vec<String>>,
    exchanges: Mutex<Vec<String>>,
    prefixes: Mutex<Vec<String>>,
}

/// The shortest prefix [`Cleanup::prefix`] takes: long enough to hold a
/// unique id, so that a cleanup cannot reach another test's names.
pub const MIN_PREFIX_LEN: usize = 24;

impl Cleanup {
    /// A guard for the broker at `url` (an `amqp://` URL), with nothing
    /// registered yet.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            queues: Mutex::new(Vec::new()),
            exchanges: Mutex::new(Vec::new()),
            prefixes: Mutex::new(Vec::new()),
        }
    }

    /// Registers every queue and exchange whose name starts with `prefix`
    /// (a name unique to the test, such as its topic with a UUID in it).
    /// They are listed with [`rabbitmqctl`](crate::rabbitmqctl) when the
    /// guard is dropped, which takes a few seconds; prefer naming the
    /// queues when the test knows them.
    ///
    /// # Panics
    ///
    /// When `prefix` is shorter than [`MIN_PREFIX_LEN`].
    pub fn prefix(self, prefix: impl Into<String>) -> Self {
        let prefix = prefix.into();
        assert!(
            prefix.len() >= MIN_PREFIX_LEN,
            "cleanup prefix {prefix:?} is too short to be unique to one test"
        );
        lock(&self.prefixes).push(prefix);
        self
    }

    /// Registers a queue to delete.
    pub fn queue(self, name: impl Into<String>) -> Self {
        self.add_queue(name);
        self
    }

    /// Registers an exchange to delete.
    pub fn exchange(self, name: impl Into<String>) -> Self {
        self.add_exchange(name);
        self
    }

    /// Registers a queue to delete, through a shared reference.
    pub fn add_queue(&self, name: impl Into<String>) {
        lock(&self.queues).push(name.into());
    }

    /// Registers an exchange to delete, through a shared reference.
    pub fn add_exchange(&self, name: impl Into<String>) {
        lock(&self.exchanges).push(name.into());
    }
}

fn lock(names: &Mutex<Vec<String>>) -> std::sync::MutexGuard<'_, Vec<String>> {
    names.lock().unwrap_or_else(|e| e.into_inner())
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let mut queues = std::mem::take(&mut *lock(&self.queues));
        let mut exchanges = std::mem::take(&mut *lock(&self.exchanges));
        let prefixes = std::mem::take(&mut *lock(&self.prefixes));
        if !prefixes.is_empty() {
            let matching = |kind: &str| -> Vec<String> {
                // Not `rabbitmqctl::run`, which panics: this may run while
                // the test unwinds.
                let listing = std::process::Command::new("rabbitmqctl")
                    .args([
                        "-n",
                        crate::rabbitmqctl::NODE,
                        kind,
                        "-q",
                        "--no-table-headers",
                        "name",
                    ])
                    .output()
                    .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
                    .unwrap_or_else(|err| {
                        eprintln!("surety-testkit: rabbitmqctl {kind} failed: {err}");
                        String::new()
                    });
                listing
                    .lines()
                    .map(str::trim)
                    .filter(|name| prefixes.iter().any(|p| name.starts_with(p.as_str())))
                    .map(str::to_owned)
                    .collect()
            };
            queues.extend(matching("list_queues"));
            exchanges.extend(matching("list_exchanges"));
        }
        if queues.is_empty() && exchanges.is_empty() {
            return;
        }
        let url = self.url.clone();
        let worker = std::thread::spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(err) => return Err(format!("no runtime: {err}")),
            };
            runtime.block_on(async {
                tokio::time::timeout(CLEANUP_LIMIT, delete(&url, &queues, &exchanges))
                    .await
                    .unwrap_or_else(|_| Err(format!("timed out after {CLEANUP_LIMIT:?}")))
            })
        });
        match worker.join() {
            Ok(Ok(())) => {}
            Ok(Err(err)) => eprintln!("surety-testkit: RabbitMQ cleanup failed: {err}"),
            Err(_) => eprintln!("surety-testkit: RabbitMQ cleanup panicked"),
        }
    }
}

async fn delete(url: &str, queues: &[String], exchanges: &[String]) -> Result<(), String> {
    let connection = Connection::connect(url, ConnectionProperties::default())
        .await
        .map_err(|e| format!("connecting: {e}"))?;
    let mut failures = Vec::new();
    for queue in queues {
        // A failed delete closes the channel: one channel per name.
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| format!("opening a channel: {e}"))?;
        if let Err(err) = channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await
        {
            failures.push(format!("queue {queue}: {err}"));
        }
    }
    for exchange in exchanges {
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| format!("opening a channel: {e}"))?;
        if let Err(err) = channel
            .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await
        {
            failures.push(format!("exchange {exchange}: {err}"));
        }
    }
    let _ = connection.close(200, "surety test cleanup".into()).await;
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("; "))
    }
}
