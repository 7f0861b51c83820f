//! A subscription's poll loop: takes records from librdkafka, hands them to
//! the [`DeliveryStream`] through a bounded buffer, applies the stores and
//! seeks that settlements ask for, and closes the consumer at the end.
//!
//! [`DeliveryStream`]: surety_core::DeliveryStream

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::topic_partition_list::Offset;
use surety_core::{DeliveryStream, TransportError, TransportErrorKind};
use tokio::sync::mpsc;
use tokio::time::{Instant, Interval};
use tokio_util::sync::CancellationToken;

use crate::config::deadline_after;
use crate::consumer::{Deliveries, Item, KafkaConsumer, accept};
use crate::context::Shared;
use crate::error::transport_error;
use crate::tracker::Action;

/// How often the poll loop applies the offset stores that settlements left
/// waiting (at most this long after an ack its offset is stored).
const STORE_TICK: Duration = Duration::from_millis(100);

/// Runs a subscription's poll loop until the transport closes it or its
/// stream is dropped (and in-flight deliveries are settled or the drain
/// timeout passes), then commits and closes the consumer.
pub(crate) struct Poller {
    pub(crate) consumer: KafkaConsumer,
    pub(crate) shared: Arc<Shared>,
    pub(crate) cancel: CancellationToken,
    pub(crate) drain_timeout: Duration,
    pub(crate) pause_after: Duration,
}

/// What woke one turn of the loop.
enum Event {
    Shutdown,
    Wake,
    DrainTimeout,
    HoldTimeout,
    /// A record from librdkafka, already registered and turned into the
    /// item to hand over (`None`: not to be delivered).
    Received(Option<Item>),
    Failed(KafkaError),
    Nothing,
}

impl Poller {
    /// Starts polling; returns the stream of deliveries and the task.
    pub(crate) fn spawn(self, buffer: usize) -> (DeliveryStream, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(buffer.max(1));
        let stream = Deliveries::new(rx, self.shared.clone());
        let task = tokio::spawn(PollLoop::new(self, tx).run());
        (stream.boxed(), task)
    }
}

/// The state of the poll loop.
///
/// Backpressure. While the buffer is full the loop stops taking messages
/// from librdkafka, whose own queue then fills and stops fetching: nothing
/// is dropped or fetched twice. Only when the application takes nothing for
/// `pause_after` are the partitions paused, so that the loop can poll again
/// (rebalances, statistics, `max.poll.interval.ms`) without taking more. A
/// pause throws away what librdkafka had fetched, so it lasts until the
/// buffer has drained to `low_water` (half), not until one slot is free.
struct PollLoop {
    consumer: KafkaConsumer,
    shared: Arc<Shared>,
    cancel: CancellationToken,
    drain_timeout: Duration,
    pause_after: Duration,
    tx: mpsc::Sender<Item>,
    /// Items that found the buffer full, in order, before any newer one.
    overflow: VecDeque<Item>,
    low_water: usize,
    paused: bool,
    /// While holding (buffer full, partitions fetching): when to pause.
    hold_until: Option<Instant>,
    /// Once the stream is gone: when to stop waiting for settlements.
    draining: Option<Instant>,
    /// Settlements wake the loop once per batch of stores (see
    /// `Tracker::finish`); this tick applies the stores that wait when no
    /// batch fills, e.g. behind a message the application holds.
    store_tick: Interval,
}

impl PollLoop {
    fn new(poller: Poller, tx: mpsc::Sender<Item>) -> Self {
        let Poller {
            consumer,
            shared,
            cancel,
            drain_timeout,
            pause_after,
        } = poller;
        let mut store_tick = tokio::time::interval(STORE_TICK);
        store_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self {
            consumer,
            shared,
            cancel,
            drain_timeout,
            pause_after,
            low_water: (tx.max_capacity() / 2).max(1),
            tx,
            overflow: VecDeque::new(),
            paused: false,
            hold_until: None,
            draining: None,
            store_tick,
        }
    }

    async fn run(mut self) {
        loop {
            if self.draining.is_none() {
                self.hand_over_overflow();
                self.resume_if_drained();
                if self.tx.is_closed() {
                    self.start_draining();
                }
            }
            if self.draining.is_some() && self.shared.tracker().in_flight() == 0 {
                break;
            }
            let event = self.next_event().await;
            if !self.handle(event) {
                break;
            }
        }
        self.close().await;
    }

    /// Hands to the stream what waited for room, as much as fits.
    fn hand_over_overflow(&mut self) {
        while let Some(item) = self.overflow.pop_front() {
            match self.tx.try_send(item) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(item)) => {
                    self.overflow.push_front(item);
                    break;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => break,
            }
        }
        if self.overflow.is_empty() {
            self.hold_until = None;
        }
    }

    /// Ends a pause once the buffer has drained to `low_water`.
    fn resume_if_drained(&mut self) {
        if self.paused && self.overflow.is_empty() && self.tx.capacity() >= self.low_water {
            set_paused(&self.consumer, false);
            self.paused = false;
        }
    }

    /// The stream is gone: take nothing more, wait for the settlements of
    /// what is in flight (up to the drain timeout).
    fn start_draining(&mut self) {
        tracing::debug!(topic = %self.shared.topic, group = %self.shared.group, "stream dropped; draining");
        self.draining = Some(deadline_after(self.drain_timeout));
        self.overflow.clear();
        self.hold_until = None;
        set_paused(&self.consumer, true);
        self.paused = true;
    }

    /// Waits for the next thing to do. Handing over overflow happens here
    /// too (it needs a reserved slot); a record taken from librdkafka is
    /// registered at once (it borrows the consumer).
    async fn next_event(&mut self) -> Event {
        let open = self.draining.is_none();
        let has_overflow = !self.overflow.is_empty();
        // Holding: the buffer is full and the partitions still fetch.
        let holding = open && has_overflow && !self.paused;
        let paused = self.paused;
        let deadline = self
            .draining
            .or(self.hold_until)
            .unwrap_or_else(Instant::now);
        let timed = !open || (holding && self.hold_until.is_some());
        let low_water = self.low_water;
        tokio::select! {
            biased;
            () = self.cancel.cancelled() => Event::Shutdown,
            () = self.shared.wake.notified() => Event::Wake,
            _ = self.store_tick.tick() => Event::Wake,
            () = tokio::time::sleep_until(deadline), if timed => {
                if open { Event::HoldTimeout } else { Event::DrainTimeout }
            }
            () = self.tx.closed(), if open => Event::Nothing,
            permit = self.tx.reserve(), if open && has_overflow => {
                if let (Ok(permit), Some(item)) = (permit, self.overflow.pop_front()) {
                    permit.send(item);
                }
                Event::Nothing
            }
            // Paused: wake up once the buffer has drained to half.
            drained = self.tx.reserve_many(low_water), if open && paused && !has_overflow => {
                drop(drained);
                Event::Nothing
            }
            message = self.consumer.recv(), if !holding => match message {
                Ok(message) if open => Event::Received(accept(&self.shared, &message)),
                // Draining: not registered, not stored; the next owner of
                // the partition fetches it again.
                Ok(_) => Event::Nothing,
                Err(err) => Event::Failed(err),
            },
        }
    }

    /// Acts on one event; `false` ends the loop.
    fn handle(&mut self, event: Event) -> bool {
        match event {
            Event::Shutdown => return false,
            Event::Wake => self.apply_actions(),
            Event::DrainTimeout => {
                tracing::warn!(
                    topic = %self.shared.topic,
                    group = %self.shared.group,
                    in_flight = self.shared.tracker().in_flight(),
                    "drain timeout: closing with deliveries unsettled; they will be redelivered"
                );
                return false;
            }
            Event::HoldTimeout => self.pause(),
            Event::Received(item) => return self.take_burst(item),
            Event::Failed(err) => return self.failed(err),
            Event::Nothing => {}
        }
        true
    }

    /// After a record: takes the ones librdkafka already holds in this turn
    /// too (up to [`RECV_BATCH`]), so that the loop's select and the
    /// application's wake-up are paid once per burst, not once per record.
    /// `false` when a fatal error ends the loop.
    fn take_burst(&mut self, first: Option<Item>) -> bool {
        let mut item = first;
        let mut taken = 1;
        loop {
            if self.shared.tracker().wants_actions() {
                // A message to be redelivered was fetched past: seek again
                // (or report the stall).
                self.shared.wake.notify_one();
            }
            if let Some(item) = item.take() {
                self.offer(item);
            }
            if taken >= RECV_BATCH || !self.overflow.is_empty() || self.paused {
                return true;
            }
            match self.consumer.recv().now_or_never() {
                Some(Ok(message)) => {
                    taken += 1;
                    item = accept(&self.shared, &message);
                }
                Some(Err(err)) => return self.failed(err),
                None => return true,
            }
        }
    }

    /// Hands `item` to the stream, or queues it behind what waits; a full
    /// buffer starts holding (or, if paused, pauses what was assigned since).
    fn offer(&mut self, item: Item) {
        if self.overflow.is_empty() {
            match self.tx.try_send(item) {
                Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
                Err(mpsc::error::TrySendError::Full(item)) => self.overflow.push_back(item),
            }
        } else {
            self.overflow.push_back(item);
        }
        if self.overflow.is_empty() {
            return;
        }
        if self.paused {
            // Fetched before the pause, or from a partition assigned since:
            // pause all.
            set_paused(&self.consumer, true);
        } else {
            let pause_after = self.pause_after;
            self.hold_until
                .get_or_insert_with(|| deadline_after(pause_after));
        }
    }

    /// A consumer error; `false` when it is fatal.
    fn failed(&mut self, err: KafkaError) -> bool {
        let open = self.draining.is_none();
        !matches!(
            consumer_error(&self.shared, &self.tx, open, err),
            Event::Shutdown
        )
    }

    /// Applies the stores and seeks settlements asked for, and reports
    /// stalls on the stream.
    fn apply_actions(&mut self) {
        let actions = self.shared.tracker().take_actions();
        apply(&self.consumer, &self.shared, &actions);
        for stall in actions.iter().filter_map(|a| stalled(&self.shared, a)) {
            if self.draining.is_some() {
                continue;
            }
            match self.tx.try_send(stall) {
                Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
                Err(mpsc::error::TrySendError::Full(stall)) => self.overflow.push_back(stall),
            }
        }
    }

    /// The application took nothing for `pause_after`: pause and poll
    /// again, so that the group is served.
    fn pause(&mut self) {
        let shared = &self.shared;
        tracing::debug!(topic = %shared.topic, group = %shared.group, "buffer full; pausing partitions");
        set_paused(&self.consumer, true);
        self.paused = true;
        self.hold_until = None;
        shared.metrics.pause(&shared.topic, &shared.group);
    }

    /// No more settlements: stores what they allowed, commits, leaves the
    /// group.
    async fn close(self) {
        let Self {
            consumer,
            shared,
            overflow,
            tx,
            ..
        } = self;
        let stores = shared.tracker().close();
        apply(&consumer, &shared, &stores);
        drop(overflow);
        drop(tx);
        let assigned = shared.tracker().assigned();
        for partition in assigned {
            shared
                .metrics
                .forget_partition(&shared.topic, &shared.group, partition);
        }
        let (topic, group) = (shared.topic.clone(), shared.group.clone());
        let closing = tokio::task::spawn_blocking(move || {
            match consumer.commit_consumer_state(CommitMode::Sync) {
                Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
                Err(err) => {
                    tracing::warn!(%topic, %group, error = %err, "final offset commit failed")
                }
            }
            // Dropping closes the consumer: it leaves the group after
            // librdkafka's own commit of the revoked partitions.
            drop(consumer);
        });
        if let Err(err) = closing.await {
            tracing::warn!(error = %err, "closing the Kafka consumer failed");
        }
        shared.left.send_replace(true);
        tracing::debug!(topic = %shared.topic, group = %shared.group, "subscription closed");
    }
}

/// Records taken from librdkafka in one turn of the poll loop, at most.
const RECV_BATCH: usize = 64;

/// Logs a consumer error and forwards the ones the application must act on
/// (fatal, configuration) to the stream while it is `open`; a fatal error
/// ends the subscription.
fn consumer_error(shared: &Shared, tx: &mpsc::Sender<Item>, open: bool, err: KafkaError) -> Event {
    let fatal = matches!(err, KafkaError::MessageConsumptionFatal(_));
    tracing::warn!(topic = %shared.topic, group = %shared.group, error = %err, "consuming failed");
    let err = transport_error(
        format!("consuming topic {} as group {}", shared.topic, shared.group),
        err,
    );
    // librdkafka recovers from transient errors by itself (they are only
    // logged); the application hears of the ones it must act on.
    let forward = fatal || err.kind() == TransportErrorKind::Config;
    if forward && open && tx.try_send(Item::Error(err)).is_err() {
        tracing::debug!("subscription buffer full; error not forwarded");
    }
    if fatal {
        Event::Shutdown
    } else {
        Event::Nothing
    }
}

fn set_paused(consumer: &KafkaConsumer, pause: bool) {
    let assignment = match consumer.assignment() {
        Ok(assignment) if assignment.count() > 0 => assignment,
        Ok(_) => return,
        Err(err) => {
            tracing::warn!(error = %err, "reading the assignment failed");
            return;
        }
    };
    let result = if pause {
        consumer.pause(&assignment)
    } else {
        consumer.resume(&assignment)
    };
    if let Err(err) = result {
        tracing::warn!(error = %err, pause, "pausing or resuming partitions failed");
    }
}

/// For a stall reported by the tracker: logs it, counts it and returns the
/// error to yield on the stream.
fn stalled(shared: &Shared, action: &Action) -> Option<Item> {
    let Action::Stalled { partition, offset } = *action else {
        return None;
    };
    tracing::error!(
        topic = %shared.topic,
        group = %shared.group,
        partition,
        offset,
        "a message to be redelivered could not be fetched again; the partition's \
         offset is held below it until it is delivered and settled"
    );
    shared
        .metrics
        .stall(&shared.topic, &shared.group, partition);
    Some(Item::Error(TransportError::new(
        TransportErrorKind::Other,
        format!(
            "topic {} partition {partition}: the message at offset {offset} was not fetched \
             again after {} seeks (seeks failing, or the message deleted by retention); \
             the group's offset stays below it until it is delivered and settled",
            shared.topic,
            crate::tracker::MAX_MISSED_REDELIVERIES + 1,
        ),
    )))
}

/// Applies stores and seeks asked for by the tracker.
fn apply(consumer: &KafkaConsumer, shared: &Shared, actions: &[Action]) {
    if actions.is_empty() {
        return;
    }
    let stores = shared.stores(actions);
    if stores.count() > 0
        && let Err(err) = consumer.store_offsets(&stores)
    {
        // Only fails for partitions no longer assigned; their next owner
        // starts from the last commit, which is never past an unsettled one.
        tracing::debug!(error = %err, "storing offsets failed");
    }
    for action in actions {
        if let Action::Seek { partition, offset } = *action {
            tracing::debug!(topic = %shared.topic, partition, offset, "seeking back to redeliver");
            #[cfg(test)]
            if crate::consumer::faults::seek_fails(&shared.topic) {
                tracing::warn!(partition, offset, "seek failed (injected fault)");
                continue;
            }
            // Asynchronous: the version barrier is set before `seek`
            // returns, so nothing fetched before it is returned after it.
            if let Err(err) = consumer.seek(
                &shared.topic,
                partition,
                Offset::Offset(offset),
                Duration::ZERO,
            ) {
                tracing::warn!(error = %err, partition, offset, "seek failed; retried when the fetcher skips the message");
            }
        }
    }
}
