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
}

impl Cleanup {
    /// A guard for the broker at `url` (an `amqp://` URL), with nothing
    /// registered yet.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            queues: Mutex::new(Vec::new()),
            exchanges: Mutex::new(Vec::new()),
        }
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
        let queues = std::mem::take(&mut *lock(&self.queues));
        let exchanges = std::mem::take(&mut *lock(&self.exchanges));
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
