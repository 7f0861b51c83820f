//! One subscription: a `StreamConsumer` polled by a task, a bounded buffer
//! to the [`DeliveryStream`], and the settlers that record outcomes.

use std::collections::VecDeque;
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::{FutureExt, Stream, StreamExt};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Headers as _, Message as _};
use rdkafka::topic_partition_list::Offset;
use surety_core::transport::settle_failed;
use surety_core::{
    Delivery, DeliveryInfo, DeliveryStream, Envelope, Headers, Result, Settle, TransportError,
    TransportErrorKind,
};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::SYSTEM;
use crate::config::deadline_after;
use crate::context::{ConsumerCtx, Shared};
use crate::error::transport_error;
use crate::tracker::{Action, Registered, Token};

/// How often the poll loop applies the offset stores that settlements left
/// waiting (at most this long after an ack its offset is stored).
const STORE_TICK: Duration = Duration::from_millis(100);

/// The consumer type of a subscription.
pub(crate) type KafkaConsumer = StreamConsumer<ConsumerCtx>;

enum Item {
    Delivery(Box<Pending>),
    Error(TransportError),
}

/// A delivery on its way to the application.
struct Pending {
    envelope: Envelope,
    info: DeliveryInfo,
    settle: KafkaSettle,
}

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

enum Event {
    Shutdown,
    Wake,
    DrainTimeout,
    HoldTimeout,
    StreamGone,
    Sent,
    Nothing,
}

impl Poller {
    /// Starts polling; returns the stream of deliveries and the task.
    pub(crate) fn spawn(self, buffer: usize) -> (DeliveryStream, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(buffer.max(1));
        let stream = Deliveries {
            rx,
            shared: self.shared.clone(),
        };
        let task = tokio::spawn(self.run(tx));
        (stream.boxed(), task)
    }

    async fn run(self, tx: mpsc::Sender<Item>) {
        let Self {
            consumer,
            shared,
            cancel,
            drain_timeout,
            pause_after,
        } = self;
        // Backpressure. While the buffer is full the loop stops taking
        // messages from librdkafka, whose own queue then fills and stops
        // fetching: nothing is dropped or fetched twice. Only when the
        // application takes nothing for `pause_after` are the partitions
        // paused, so that the loop can poll again (rebalances, statistics,
        // `max.poll.interval.ms`) without taking more. A pause throws away
        // what librdkafka had fetched, so it lasts until the buffer has
        // drained to half, not until one slot is free.
        let low_water = (tx.max_capacity() / 2).max(1);
        let mut overflow: VecDeque<Item> = VecDeque::new();
        let mut paused = false;
        let mut hold_until: Option<Instant> = None;
        let mut draining: Option<Instant> = None;
        // Settlements wake the loop once per batch of stores (see
        // `Tracker::finish`); this tick applies the stores that wait when
        // no batch fills, e.g. behind a message the application holds.
        let mut store_tick = tokio::time::interval(STORE_TICK);
        store_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if draining.is_none() {
                // Hand over what waited for room.
                while let Some(item) = overflow.pop_front() {
                    match tx.try_send(item) {
                        Ok(()) => {}
                        Err(mpsc::error::TrySendError::Full(item)) => {
                            overflow.push_front(item);
                            break;
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => break,
                    }
                }
                if overflow.is_empty() {
                    hold_until = None;
                }
                if paused && overflow.is_empty() && tx.capacity() >= low_water {
                    set_paused(&consumer, false);
                    paused = false;
                }
                if tx.is_closed() {
                    tracing::debug!(topic = %shared.topic, group = %shared.group, "stream dropped; draining");
                    draining = Some(deadline_after(drain_timeout));
                    overflow.clear();
                    hold_until = None;
                    set_paused(&consumer, true);
                    paused = true;
                }
            }
            if draining.is_some() && shared.tracker().in_flight() == 0 {
                break;
            }
            let open = draining.is_none();
            let has_overflow = !overflow.is_empty();
            // Holding: the buffer is full and the partitions still fetch.
            let holding = open && has_overflow && !paused;
            let deadline = draining.or(hold_until).unwrap_or_else(Instant::now);
            let event = tokio::select! {
                biased;
                () = cancel.cancelled() => Event::Shutdown,
                () = shared.wake.notified() => Event::Wake,
                _ = store_tick.tick() => Event::Wake,
                () = tokio::time::sleep_until(deadline), if !open || (holding && hold_until.is_some()) => {
                    if open { Event::HoldTimeout } else { Event::DrainTimeout }
                }
                () = tx.closed(), if open => Event::StreamGone,
                permit = tx.reserve(), if open && has_overflow => match (permit, overflow.pop_front()) {
                    (Ok(permit), Some(item)) => {
                        permit.send(item);
                        Event::Sent
                    }
                    _ => Event::Nothing,
                },
                // Paused: wake up once the buffer has drained to half.
                drained = tx.reserve_many(low_water), if open && paused && !has_overflow => {
                    drop(drained);
                    Event::Nothing
                }
                message = consumer.recv(), if !holding => {
                    match message {
                        Ok(message) if open => {
                            // Records librdkafka already holds are taken in
                            // this turn too (up to a batch), so the loop's
                            // select and the application's wake-up are paid
                            // once per burst, not once per record.
                            let mut next = Some(message);
                            let mut taken = 0;
                            let mut event = Event::Nothing;
                            while let Some(message) = next.take() {
                                taken += 1;
                                let item = accept(&shared, &message);
                                drop(message);
                                if shared.tracker().wants_actions() {
                                    // A message to be redelivered was fetched
                                    // past: seek again (or report the stall).
                                    shared.wake.notify_one();
                                }
                                if let Some(item) = item {
                                    if overflow.is_empty() {
                                        match tx.try_send(item) {
                                            Ok(()) => {}
                                            Err(mpsc::error::TrySendError::Full(item)) => {
                                                overflow.push_back(item);
                                            }
                                            Err(mpsc::error::TrySendError::Closed(_)) => {}
                                        }
                                    } else {
                                        overflow.push_back(item);
                                    }
                                    if paused && !overflow.is_empty() {
                                        // Fetched before the pause, or from a
                                        // partition assigned since: pause all.
                                        set_paused(&consumer, true);
                                    } else if !overflow.is_empty() {
                                        hold_until.get_or_insert_with(|| deadline_after(pause_after));
                                    }
                                }
                                if taken >= RECV_BATCH || !overflow.is_empty() || paused {
                                    break;
                                }
                                match consumer.recv().now_or_never() {
                                    Some(Ok(more)) => next = Some(more),
                                    Some(Err(err)) => {
                                        event = consumer_error(&shared, &tx, draining.is_none(), err);
                                    }
                                    None => {}
                                }
                            }
                            event
                        }
                        // Draining: not registered, not stored; the next
                        // owner of the partition fetches it again.
                        Ok(_) => Event::Nothing,
                        Err(err) => consumer_error(&shared, &tx, draining.is_none(), err),
                    }
                }
            };
            match event {
                Event::Shutdown => break,
                Event::Wake => {
                    let actions = shared.tracker().take_actions();
                    apply(&consumer, &shared, &actions);
                    for stall in actions.iter().filter_map(|a| stalled(&shared, a)) {
                        if draining.is_some() {
                            continue;
                        }
                        match tx.try_send(stall) {
                            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
                            Err(mpsc::error::TrySendError::Full(stall)) => {
                                overflow.push_back(stall);
                            }
                        }
                    }
                }
                Event::DrainTimeout => {
                    tracing::warn!(
                        topic = %shared.topic,
                        group = %shared.group,
                        in_flight = shared.tracker().in_flight(),
                        "drain timeout: closing with deliveries unsettled; they will be redelivered"
                    );
                    break;
                }
                Event::HoldTimeout => {
                    // The application took nothing for `pause_after`: pause
                    // and poll again, so that the group is served.
                    tracing::debug!(topic = %shared.topic, group = %shared.group, "buffer full; pausing partitions");
                    set_paused(&consumer, true);
                    paused = true;
                    hold_until = None;
                    shared.metrics.pause(&shared.topic, &shared.group);
                }
                Event::StreamGone | Event::Sent | Event::Nothing => {}
            }
        }
        // Final: no more settlements, store what they allowed, commit, leave.
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
            if faults::seek_fails(&shared.topic) {
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

/// Registers a fetched message and builds its delivery, unless it is not
/// to be delivered (already handled, or still being handled).
fn accept(shared: &Arc<Shared>, message: &BorrowedMessage<'_>) -> Option<Item> {
    let (partition, offset) = (message.partition(), message.offset());
    let registered = shared.tracker().register(partition, offset);
    let Registered::Deliver {
        token,
        redelivered,
        delivery_count,
    } = registered
    else {
        return None;
    };
    let envelope = to_envelope(&shared.topic, message);
    let mut info = DeliveryInfo::new(SYSTEM, shared.topic.clone(), shared.group.clone());
    info.partition = Some(partition);
    info.offset = Some(offset);
    info.timestamp = broker_timestamp(message);
    info.redelivered = redelivered;
    info.delivery_count = delivery_count;
    Some(Item::Delivery(Box::new(Pending {
        envelope,
        info,
        settle: KafkaSettle {
            shared: shared.clone(),
            token,
            settled: false,
        },
    })))
}

/// The record's timestamp (create or log-append time, as the topic keeps
/// it), when it has one.
pub(crate) fn broker_timestamp(
    message: &BorrowedMessage<'_>,
) -> Option<chrono::DateTime<chrono::Utc>> {
    message
        .timestamp()
        .to_millis()
        .and_then(chrono::DateTime::from_timestamp_millis)
}

/// Reads a record as an envelope; a record that is not one becomes an
/// [undecodable](Envelope::undecodable) envelope, which the pipeline treats
/// as poison.
pub(crate) fn to_envelope(topic: &str, message: &BorrowedMessage<'_>) -> Envelope {
    let (headers, header_error) = read_headers(message);
    let payload = Bytes::copy_from_slice(message.payload().unwrap_or_default());
    let undecodable = |headers, payload, error: &dyn fmt::Display| {
        Envelope::undecodable(
            format!("kafka://{topic}"),
            format!("{topic}/{}/{}", message.partition(), message.offset()),
            headers,
            payload,
            error,
        )
    };
    if let Some(error) = header_error {
        return undecodable(headers, payload, &error);
    }
    // No copy of the headers in case of failure: a failure hands them back.
    match Envelope::from_binary_or_return(headers, payload) {
        Ok(envelope) => envelope,
        Err((err, headers, payload)) => undecodable(headers, payload, &err),
    }
}

/// The record's headers as strings, and why they are not an envelope's
/// headers if they are not (a value or a key that is not UTF-8).
fn read_headers(message: &BorrowedMessage<'_>) -> (Headers, Option<String>) {
    let mut headers = Headers::new();
    let Some(raw) = message.headers() else {
        return (headers, None);
    };
    let mut error = None;
    for index in 0..raw.count() {
        // rdkafka panics on a header key that is not UTF-8; that is outside
        // data and must not take the consumer down.
        let header = std::panic::catch_unwind(AssertUnwindSafe(|| {
            raw.try_get(index)
                .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
        }));
        match header {
            Ok(Some((key, value))) => {
                let value = value.unwrap_or_default();
                let value = match String::from_utf8(value) {
                    Ok(value) => value,
                    Err(err) => {
                        error.get_or_insert_with(|| format!("header {key:?} is not UTF-8"));
                        String::from_utf8_lossy(err.as_bytes()).into_owned()
                    }
                };
                headers.insert(key, value);
            }
            Ok(None) => {}
            Err(_) => {
                error.get_or_insert_with(|| format!("header #{index} has a key that is not UTF-8"));
            }
        }
    }
    (headers, error)
}

/// Settles one delivery by recording its outcome in the tracker; the poll
/// loop turns outcomes into stored offsets and seeks.
pub(crate) struct KafkaSettle {
    shared: Arc<Shared>,
    token: Token,
    settled: bool,
}

impl fmt::Debug for KafkaSettle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaSettle")
            .field("topic", &self.shared.topic)
            .field("group", &self.shared.group)
            .field("partition", &self.token.partition)
            .field("offset", &self.token.offset)
            .finish()
    }
}

#[derive(Clone, Copy)]
enum Outcome {
    Acked,
    Rejected,
    Nacked,
}

impl KafkaSettle {
    fn is_live(&self) -> bool {
        self.shared.tracker().is_live(&self.token)
    }

    fn record(&mut self, outcome: Outcome) -> Result<()> {
        self.settled = true;
        let result = {
            let mut tracker = self.shared.tracker();
            match outcome {
                Outcome::Acked | Outcome::Rejected => tracker.finish(&self.token),
                Outcome::Nacked => tracker.redeliver(&self.token),
            }
        };
        let (topic, group) = (&self.shared.topic, &self.shared.group);
        match result {
            Ok(wake) => {
                if wake {
                    self.shared.wake.notify_one();
                }
                let counters = &self.shared.counters;
                match outcome {
                    Outcome::Acked => counters.acked.inc(),
                    Outcome::Rejected => counters.rejected.inc(),
                    Outcome::Nacked => counters.nacked.inc(),
                };
                Ok(())
            }
            Err(refused) => {
                self.shared.metrics.settled(topic, group, "refused");
                Err(settle_failed(&format!(
                    "{} (topic {topic}, partition {}, offset {})",
                    refused.as_str(),
                    self.token.partition,
                    self.token.offset
                )))
            }
        }
    }
}

#[async_trait::async_trait]
impl Settle for KafkaSettle {
    async fn ack(mut self: Box<Self>) -> Result<()> {
        self.record(Outcome::Acked)
    }

    async fn nack(mut self: Box<Self>, requeue: bool) -> Result<()> {
        self.record(if requeue {
            Outcome::Nacked
        } else {
            Outcome::Rejected
        })
    }

    async fn reject(mut self: Box<Self>) -> Result<()> {
        self.record(Outcome::Rejected)
    }
}

impl Drop for KafkaSettle {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        // Dropped unsettled: deliver again. Refused means the delivery is
        // no longer this consumer's (revoked, closed): nothing to do, its
        // offset was never stored past.
        let redeliver = self.shared.tracker().redeliver(&self.token);
        if let Ok(wake) = redeliver {
            if wake {
                self.shared.wake.notify_one();
            }
            self.shared
                .metrics
                .settled(&self.shared.topic, &self.shared.group, "dropped");
        }
    }
}

/// The stream handed to the application. Deliveries that stopped being
/// current while buffered (their partition was revoked) are left out.
struct Deliveries {
    rx: mpsc::Receiver<Item>,
    shared: Arc<Shared>,
}

impl Drop for Deliveries {
    fn drop(&mut self) {
        // Seen at once by a new subscription of the same group, which then
        // waits for this consumer to leave (see `KafkaTransport::subscribe`).
        self.shared.leaving.store(true, Ordering::Release);
    }
}

impl Stream for Deliveries {
    type Item = Result<Delivery>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if self.shared.tracker().is_closed() {
                return Poll::Ready(None);
            }
            match self.rx.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Ready(Some(Item::Error(err))) => return Poll::Ready(Some(Err(err))),
                Poll::Ready(Some(Item::Delivery(pending))) => {
                    if !pending.settle.is_live() {
                        continue;
                    }
                    let shared = &self.shared;
                    shared.counters.received.inc();
                    let Pending {
                        envelope,
                        info,
                        settle,
                    } = *pending;
                    return Poll::Ready(Some(Ok(Delivery::new(envelope, info, Box::new(settle)))));
                }
            }
        }
    }
}

/// Fault injection for the tests of this crate: seeks on a topic that fail.
#[cfg(test)]
pub(crate) mod faults {
    use std::collections::HashSet;
    use std::sync::Mutex;

    static FAILING_SEEKS: Mutex<Option<HashSet<String>>> = Mutex::new(None);

    /// Makes every seek on `topic` fail (`true`) or work again.
    pub(crate) fn fail_seeks(topic: &str, fail: bool) {
        let mut topics = FAILING_SEEKS.lock().unwrap_or_else(|e| e.into_inner());
        let topics = topics.get_or_insert_with(HashSet::new);
        if fail {
            topics.insert(topic.to_owned());
        } else {
            topics.remove(topic);
        }
    }

    pub(super) fn seek_fails(topic: &str) -> bool {
        FAILING_SEEKS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|topics| topics.contains(topic))
    }
}

/// Against the real broker, with seeks made to fail.
#[cfg(test)]
mod stall_tests {
    use std::time::Duration;

    use futures::StreamExt;
    use surety_core::{
        Close, Delivery, DeliveryStream, Envelope, Publisher, Subscriber, TransportErrorKind,
    };
    use surety_testkit::services;

    use super::faults;
    use crate::tracker::MAX_MISSED_REDELIVERIES;
    use crate::{KafkaConfig, KafkaMetrics, KafkaTransport};

    const LIMIT: Duration = Duration::from_secs(30);

    fn unique(prefix: &str) -> String {
        format!("surety-kafka-test.{prefix}.{}", uuid::Uuid::now_v7())
    }

    async fn next(stream: &mut DeliveryStream, what: &str) -> surety_core::Result<Delivery> {
        tokio::time::timeout(LIMIT, stream.next())
            .await
            .unwrap_or_else(|_| panic!("no item in time: {what}"))
            .expect("the stream is open")
    }

    /// A nacked record that the consumer cannot seek back to is never
    /// passed: the stall is counted and surfaces on the stream, and the
    /// group's next member starts with that record.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_redelivery_that_cannot_be_fetched_stalls_and_is_never_skipped() {
        let Some(brokers) = services::require(services::kafka_brokers()) else {
            return;
        };
        let metrics = KafkaMetrics::default();
        let config = KafkaConfig::new(&brokers)
            .create_missing_topics(1)
            .replication_factor(1)
            .consumer_property("auto.commit.interval.ms", "200")
            .consumer_property("heartbeat.interval.ms", "500")
            .consumer_property("session.timeout.ms", "6000")
            .metrics(metrics.clone());
        let kafka = KafkaTransport::connect(config).await.expect("connect");
        let (topic, group) = (unique("stall"), unique("group"));
        let mut stream = kafka.subscribe(&topic, &group).await.unwrap();

        let nacked = Envelope::builder("/test", "test.nacked").build();
        kafka.publish(&topic, nacked.clone()).await.unwrap();
        let first = next(&mut stream, "the first record").await.unwrap();
        assert_eq!(first.envelope().id, nacked.id);
        let partition = first.info().partition.unwrap();
        faults::fail_seeks(&topic, true);
        first.nack(true).await.unwrap();

        // Every record handled after the nack is one more seek that did not
        // take; the one past the limit stalls the partition.
        let mut stall = None;
        for _ in 0..=MAX_MISSED_REDELIVERIES {
            let later = Envelope::builder("/test", "test.later").build();
            kafka.publish(&topic, later.clone()).await.unwrap();
            let delivery = loop {
                match next(&mut stream, "a later record").await {
                    Ok(delivery) => break delivery,
                    Err(err) => stall = Some(err),
                }
            };
            assert_eq!(delivery.envelope().id, later.id, "the seeks fail");
            delivery.ack().await.unwrap();
        }
        let stall = match stall {
            Some(err) => err,
            None => match next(&mut stream, "the stall").await {
                Err(err) => err,
                Ok(delivery) => panic!("expected the stall, got {:?}", delivery.envelope()),
            },
        };
        assert_eq!(stall.kind(), TransportErrorKind::Other);
        assert!(stall.to_string().contains("not fetched again"), "{stall}");
        assert_eq!(metrics.consumer_stalls(&topic, &group, partition), 1);

        // The offset was held: the group's next member starts at the record.
        drop(stream);
        faults::fail_seeks(&topic, false);
        let mut rejoined = kafka.subscribe(&topic, &group).await.unwrap();
        let again = next(&mut rejoined, "the nacked record, again")
            .await
            .unwrap();
        assert_eq!(again.envelope().id, nacked.id);
        again.ack().await.unwrap();
        drop(rejoined);
        kafka.close().await.unwrap();
        delete_topic(&brokers, &topic).await;
    }

    async fn delete_topic(brokers: &str, topic: &str) {
        use rdkafka::ClientConfig;
        use rdkafka::admin::{AdminClient, AdminOptions};
        use rdkafka::client::DefaultClientContext;

        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .create()
            .unwrap();
        let deleted = admin
            .delete_topics(&[topic], &AdminOptions::new())
            .await
            .unwrap();
        assert!(deleted.iter().all(Result::is_ok), "{deleted:?}");
    }
}
