//! [`Host`]: the consumers and background tasks of one service, run under
//! one shutdown signal with one grace period, with readiness and liveness.
//!
//! Without a host, each consumer needs its own subscribe call, [`Worker`],
//! spawn and stop signal, and each background task (an outbox relay, a
//! dedup-store cleanup, a timer poller) its own. A host owns all of them:
//!
//! - [`Host::consume`] subscribes (retrying with backoff until the broker
//!   answers), runs the worker, and subscribes again if the subscription
//!   ends while the service is running;
//! - [`Host::task`] runs a background task that takes a [`Shutdown`] signal;
//! - [`Host::run`] starts everything, waits for the shutdown signal, then
//!   gives everything one grace period to finish: workers stop taking
//!   deliveries and settle what is in flight, tasks see their [`Shutdown`]
//!   resolve;
//! - [`Host::health`] is a handle for readiness and liveness probes:
//!   ready when every subscription is connected and every worker and task
//!   runs, live unless something stopped by itself.
//!
//! ```
//! use surety_core::consumer::{handler_fn, Incoming, Worker};
//! use surety_core::host::Host;
//! use surety_core::{Envelope, Publisher, memory::MemoryTransport};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let transport = MemoryTransport::new();
//! let ok = |_msg: Incoming| async { Ok::<_, std::convert::Infallible>(()) };
//! let host = Host::new()
//!     .consume(transport.clone(), "orders", "billing", Worker::new(handler_fn(ok)))
//!     .consume(transport.clone(), "orders", "shipping", Worker::new(handler_fn(ok)))
//!     .task("heartbeat", |shutdown| async move { shutdown.wait().await });
//! let health = host.health();
//!
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! let running = tokio::spawn(host.run(async { stopped.await.ok(); }));
//! while !health.is_ready() {
//!     tokio::task::yield_now().await;
//! }
//! transport.publish("orders", Envelope::builder("/shop", "order.placed").build()).await?;
//! while transport.depth("orders", "billing") + transport.depth("orders", "shipping") > 0 {
//!     tokio::task::yield_now().await;
//! }
//! stop.send(()).ok();
//! let report = running.await?;
//! assert_eq!(report.total().handled, 2);
//! # Ok(()) }
//! ```

use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::consumer::{Handler, Worker, WorkerReport};
use crate::error::TransportErrorKind;
use crate::port::Subscriber;

/// This machine's name, for records that say where something happened
/// (a dead letter's host, a relay's lease holder): the kernel's host name,
/// else `HOSTNAME` or `COMPUTERNAME`, else `localhost`.
///
/// ```
/// assert!(!surety_core::host::host_name().is_empty());
/// ```
pub fn host_name() -> String {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|path| std::fs::read_to_string(path).ok())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// A shutdown signal handed to every part of a [`Host`]: cheap to clone,
/// resolves once the host is asked to stop.
#[derive(Debug, Clone)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

impl Shutdown {
    /// Resolves when shutdown was requested (at once if it already was).
    pub async fn wait(mut self) {
        // An error means the host is gone: stop too.
        let _ = self.rx.wait_for(|stop| *stop).await;
    }

    /// Whether shutdown was requested.
    pub fn is_requested(&self) -> bool {
        *self.rx.borrow()
    }
}

/// The state of one part of a [`Host`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum State {
    /// Not started yet.
    Starting,
    /// Subscribing (the first time, or again after the subscription ended
    /// or the broker refused).
    Connecting,
    /// Running: a worker has its subscription, a task is running.
    Running,
    /// Shutdown was requested; finishing in-flight work.
    Stopping,
    /// Stopped after a shutdown request.
    Stopped,
    /// Stopped by itself while the host was running (a task returned, or
    /// the transport was closed).
    Exited,
}

impl State {
    /// The stable lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Connecting => "connecting",
            Self::Running => "running",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
            Self::Exited => "exited",
        }
    }
}

/// Readiness and liveness of a [`Host`]'s parts; cheap to clone, read it
/// from a probe endpoint while the host runs.
#[derive(Clone, Default)]
pub struct Health {
    parts: Arc<Mutex<Vec<(String, State)>>>,
}

impl fmt::Debug for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.parts()).finish()
    }
}

impl Health {
    /// Every part with its state, in the order they were added.
    pub fn parts(&self) -> Vec<(String, State)> {
        self.parts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Ready: every part is [`State::Running`] (every subscription
    /// connected, every worker and task running).
    pub fn is_ready(&self) -> bool {
        self.with(|parts| parts.iter().all(|(_, state)| *state == State::Running))
    }

    /// Live: no part stopped by itself ([`State::Exited`]). A host whose
    /// subscriptions are reconnecting is live but not ready.
    pub fn is_live(&self) -> bool {
        self.with(|parts| parts.iter().all(|(_, state)| *state != State::Exited))
    }

    fn with<T>(&self, f: impl FnOnce(&[(String, State)]) -> T) -> T {
        f(&self.parts.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn add(&self, name: String) -> usize {
        let mut parts = self.parts.lock().unwrap_or_else(PoisonError::into_inner);
        parts.push((name, State::Starting));
        parts.len() - 1
    }

    fn set(&self, index: usize, state: State) {
        if let Some(part) = self
            .parts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_mut(index)
        {
            part.1 = state;
        }
    }
}

/// What a [`Host`] did, returned by [`Host::run`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct HostReport {
    /// Each consumer's name (`topic/group`) and what its worker did, summed
    /// over its subscriptions.
    pub workers: Vec<(String, WorkerReport)>,
    /// Parts still running at the end of the grace period, which were
    /// aborted.
    pub abandoned: Vec<String>,
}

impl HostReport {
    /// The workers' reports added up.
    pub fn total(&self) -> WorkerReport {
        let mut total = WorkerReport::default();
        for (_, report) in &self.workers {
            total += *report;
        }
        total
    }
}

type Start = Box<dyn FnOnce(Shutdown, Health, usize, Duration) -> BoxFuture<'static, Done> + Send>;

enum Done {
    Worker(WorkerReport),
    Task,
}

struct Part {
    name: String,
    index: usize,
    start: Start,
}

/// The consumers and background tasks of one service; see the
/// [module docs](self).
pub struct Host {
    parts: Vec<Part>,
    grace: Duration,
    health: Health,
}

impl fmt::Debug for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Host")
            .field(
                "parts",
                &self.parts.iter().map(|p| &p.name).collect::<Vec<_>>(),
            )
            .field("grace", &self.grace)
            .finish()
    }
}

impl Default for Host {
    fn default() -> Self {
        Self::new()
    }
}

/// Delays between subscribe attempts: 100 ms doubling to 10 s, with jitter.
fn subscribe_backoff() -> impl Iterator<Item = Duration> {
    crate::retry::Backoff::exponential(Duration::from_millis(100), Duration::from_secs(10)).delays()
}

impl Host {
    /// An empty host with a 30 s grace period.
    pub fn new() -> Self {
        Self {
            parts: Vec::new(),
            grace: Duration::from_secs(30),
            health: Health::default(),
        }
    }

    /// How long in-flight work may run after shutdown was requested
    /// (default 30 s); it replaces each worker's own
    /// [`shutdown_grace`](Worker::shutdown_grace). Whatever still runs then
    /// is aborted; unsettled deliveries go back to the broker.
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// Runs `worker` over `topic` as a member of `group` on `subscriber`.
    /// Named `topic/group` in the health and the report.
    pub fn consume<T, S>(
        mut self,
        subscriber: T,
        topic: impl Into<String>,
        group: impl Into<String>,
        worker: Worker<S>,
    ) -> Self
    where
        T: Subscriber + 'static,
        S: Handler,
    {
        let (topic, group) = (topic.into(), group.into());
        let name = format!("{topic}/{group}");
        let start: Start = Box::new(move |shutdown, health, index, grace| {
            let worker = worker.shutdown_grace(grace);
            Box::pin(async move {
                let report =
                    consume(subscriber, &topic, &group, worker, shutdown, &health, index).await;
                Done::Worker(report)
            })
        });
        let index = self.health.add(name.clone());
        self.parts.push(Part { name, index, start });
        self
    }

    /// Runs a background task (an outbox relay, a store cleanup, a timer
    /// poller): `task` gets the host's [`Shutdown`] and should return soon
    /// after it resolves.
    ///
    /// ```
    /// use surety_core::host::Host;
    ///
    /// let host = Host::new().task("cleanup", |shutdown| async move {
    ///     let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
    ///     let stop = shutdown.wait();
    ///     tokio::pin!(stop);
    ///     loop {
    ///         tokio::select! {
    ///             () = &mut stop => break,
    ///             _ = tick.tick() => { /* delete old rows */ }
    ///         }
    ///     }
    /// });
    /// # let _ = host;
    /// ```
    pub fn task<F, Fut>(mut self, name: impl Into<String>, task: F) -> Self
    where
        F: FnOnce(Shutdown) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let start: Start = Box::new(move |shutdown, health, index, _grace| {
            Box::pin(async move {
                health.set(index, State::Running);
                let requested = shutdown.clone();
                task(shutdown).await;
                let state = if requested.is_requested() {
                    State::Stopped
                } else {
                    tracing::error!(task = index, "a background task stopped by itself");
                    State::Exited
                };
                health.set(index, state);
                Done::Task
            })
        });
        let name = name.into();
        let index = self.health.add(name.clone());
        self.parts.push(Part { name, index, start });
        self
    }

    /// The health handle, to read while the host runs.
    pub fn health(&self) -> Health {
        self.health.clone()
    }

    /// Starts every part, runs until `shutdown` resolves (or every part
    /// stopped by itself), then stops them all within the grace period.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> HostReport {
        let (tx, rx) = watch::channel(false);
        let mut running = JoinSet::new();
        let mut names = Vec::with_capacity(self.parts.len());
        for part in self.parts {
            let index = part.index;
            names.push(part.name);
            let start = (part.start)(
                Shutdown { rx: rx.clone() },
                self.health.clone(),
                index,
                self.grace,
            );
            running.spawn(async move { (index, start.await) });
        }
        let mut done: Vec<Option<Done>> = names.iter().map(|_| None).collect();
        let mut record = |finished: Result<(usize, Done), tokio::task::JoinError>| match finished {
            Ok((index, result)) => {
                if let Some(slot) = done.get_mut(index) {
                    *slot = Some(result);
                }
            }
            Err(err) => tracing::error!(error = %err, "a host part failed"),
        };
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                finished = running.join_next() => match finished {
                    Some(finished) => record(finished),
                    None => break,
                },
            }
        }
        tx.send_replace(true);
        for (index, (_, state)) in self.health.parts().iter().enumerate() {
            if matches!(state, State::Running | State::Connecting | State::Starting) {
                self.health.set(index, State::Stopping);
            }
        }
        // Workers use the same grace themselves; the margin lets them
        // settle what finished at the deadline.
        let drain = async {
            while let Some(finished) = running.join_next().await {
                record(finished);
            }
        };
        let timed_out = tokio::time::timeout(self.grace + Duration::from_secs(1), drain)
            .await
            .is_err();
        if timed_out {
            running.abort_all();
            while running.join_next().await.is_some() {}
        }
        let mut report = HostReport::default();
        for (index, (name, result)) in names.into_iter().zip(done).enumerate() {
            match result {
                Some(Done::Worker(worker)) => report.workers.push((name, worker)),
                Some(Done::Task) => {}
                None => {
                    self.health.set(index, State::Stopped);
                    report.abandoned.push(name);
                }
            }
        }
        report
    }
}

async fn consume<T, S>(
    subscriber: T,
    topic: &str,
    group: &str,
    worker: Worker<S>,
    shutdown: Shutdown,
    health: &Health,
    index: usize,
) -> WorkerReport
where
    T: Subscriber,
    S: Handler,
{
    let mut total = WorkerReport::default();
    let mut backoff = subscribe_backoff();
    while !shutdown.is_requested() {
        health.set(index, State::Connecting);
        let deliveries = tokio::select! {
            biased;
            () = shutdown.clone().wait() => break,
            subscribed = subscriber.subscribe(topic, group) => subscribed,
        };
        let deliveries = match deliveries {
            Ok(deliveries) => deliveries,
            Err(err) if err.kind() == TransportErrorKind::Closed => {
                tracing::error!(topic, group, error = %err, "the transport is closed; the consumer stops");
                health.set(index, State::Exited);
                return total;
            }
            Err(err) => {
                let delay = backoff.next().unwrap_or(Duration::from_secs(10));
                tracing::warn!(topic, group, error = %err, retry_in = ?delay, "subscribing failed");
                tokio::select! {
                    biased;
                    () = shutdown.clone().wait() => break,
                    () = tokio::time::sleep(delay) => continue,
                }
            }
        };
        backoff = subscribe_backoff();
        health.set(index, State::Running);
        let report = worker
            .clone()
            .run(deliveries, shutdown.clone().wait())
            .await;
        total += report;
        if !shutdown.is_requested() {
            tracing::warn!(topic, group, "the subscription ended; subscribing again");
        }
    }
    health.set(index, State::Stopped);
    total
}
