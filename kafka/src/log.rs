//! Positioned log subscriptions on Kafka ([`LogSubscriber`]): the group
//! assigns partitions, the caller keeps the positions (nothing is committed
//! to Kafka), and a fetch that lands past the offset sought is repaired.
//!
//! One consumer per subscription, polled on a blocking thread. Its rebalance
//! callbacks hand [`LogEvent::Assigned`] and [`LogEvent::Revoked`] to the
//! stream and wait until the stream is polled again (the caller has sought,
//! or flushed) before the consumer goes on: with eager rebalancing no other
//! member gets a partition before this one gave it up.
//!
//! # Gap repair
//!
//! tansu 0.6 answers a fetch that starts inside a record batch with the
//! *next* batch; Kafka answers with the batch that holds the offset. After a
//! seek to offset `o`, a first record past `o` is such a gap: the consumer
//! seeks back (16 offsets, then twice as far each time, at most to the
//! earliest retained offset) and skips the records before `o`. On a broker
//! that fetches as Kafka does this never triggers. A gap that remains with
//! the seek at the earliest offset is real (compaction, transaction markers)
//! and is accepted.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rdkafka::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message as _};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use surety_core::log::{
    AssignedPartition, Assignment, LogEvent, LogOptions, LogRecord, LogStream, LogSubscriber,
    StartPosition,
};
use surety_core::transport::require_name;
use surety_core::{DeliveryInfo, Result, TransportError, TransportErrorKind};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::SYSTEM;
use crate::consumer::{broker_timestamp, to_envelope};
use crate::transport::KafkaTransport;

/// How long a poll of the consumer waits for a record.
const POLL: Duration = Duration::from_millis(100);
/// The first step back when a fetch landed past the offset sought.
const FIRST_STEP_BACK: i64 = 16;
/// Records and events buffered between the consumer thread and the stream.
const BUFFER: usize = 1024;

/// An event for the stream, with the acknowledgement the consumer thread
/// waits for (sent when the stream is polled again).
type Item = (Result<LogEvent>, Option<oneshot::Sender<()>>);

/// Where one assigned partition stands.
#[derive(Debug)]
struct PartState {
    low: i64,
    end: i64,
    /// The next offset expected, when known.
    next: Option<i64>,
    /// Set after a seek: the first record must be at `next`.
    verify: bool,
    /// How far back the last repair sought.
    back: i64,
    caught_up: bool,
    /// A timestamp start: records stored before this time are skipped.
    skip_before: Option<chrono::DateTime<chrono::Utc>>,
}

/// The consumer's context: rebalances become stream events.
struct LogCtx {
    topic: String,
    group: String,
    start: StartPosition,
    tx: mpsc::Sender<Item>,
    parts: Mutex<HashMap<i32, PartState>>,
    /// How long a rebalance callback waits for the stream to be polled.
    ack_timeout: Duration,
    /// Broker calls made from callbacks (watermarks, times).
    call_timeout: Duration,
    /// Cancelled when the transport closes: rebalance events are then not
    /// waited for.
    cancel: CancellationToken,
    /// Runs the waits of the consumer thread.
    runtime: tokio::runtime::Handle,
}

impl LogCtx {
    fn parts(&self) -> MutexGuard<'_, HashMap<i32, PartState>> {
        self.parts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends `event` and waits until the stream is polled past it; false
    /// when the stream is gone.
    fn send_and_wait(&self, event: LogEvent) -> bool {
        let (ack, acked) = oneshot::channel();
        if !self.put((Ok(event), Some(ack))) {
            return false;
        }
        let limit = self.ack_timeout;
        let waited = self.runtime.block_on(async {
            tokio::select! {
                _ = acked => true,
                () = self.cancel.cancelled() => true,
                () = tokio::time::sleep(limit) => false,
            }
        });
        if !waited {
            tracing::warn!(topic = %self.topic, group = %self.group, "the log stream was not polled after a rebalance event; going on");
        }
        true
    }

    fn send(&self, event: LogEvent) -> bool {
        self.put((Ok(event), None))
    }

    /// Hands `item` to the stream, waiting while its buffer is full; false
    /// when the stream is gone or the transport closed.
    fn put(&self, item: Item) -> bool {
        self.runtime.block_on(async {
            tokio::select! {
                sent = self.tx.send(item) => sent.is_ok(),
                () = self.cancel.cancelled() => false,
            }
        })
    }

    fn partitions(&self, list: &TopicPartitionList) -> Vec<i32> {
        list.elements_for_topic(&self.topic)
            .into_iter()
            .map(|e| e.partition())
            .collect()
    }

    /// Handles a new assignment: tells the caller, waits for its seeks,
    /// assigns again at the chosen offsets.
    fn assigned(&self, consumer: &BaseConsumer<Self>, list: &TopicPartitionList) {
        let partitions = self.partitions(list);
        if partitions.is_empty() {
            return;
        }
        let mut described = Vec::with_capacity(partitions.len());
        for &p in &partitions {
            let (low, high) = consumer
                .fetch_watermarks(&self.topic, p, self.call_timeout)
                .unwrap_or_else(|err| {
                    tracing::warn!(error = %err, partition = p, "reading watermarks failed");
                    (0, 0)
                });
            described.push(AssignedPartition::new(p, low, high));
        }
        tracing::info!(topic = %self.topic, group = %self.group, ?partitions, "log partitions assigned");
        let assignment = Assignment::new(described.clone());
        if !self.send_and_wait(LogEvent::Assigned(assignment.clone())) {
            return;
        }
        let seeks = assignment.take_seeks(self.start);
        let mut tpl = TopicPartitionList::new();
        let mut states = Vec::new();
        // A Latest start is at the end by definition.
        let mut caught_up = Vec::new();
        for (p, start) in seeks {
            let Some(d) = described.iter().find(|d| d.partition == p) else {
                continue;
            };
            // Latest is left to the broker (a high watermark read before
            // may be stale, and tansu reports a wrong one).
            let (position, next) = match start {
                StartPosition::Latest => (Offset::End, None),
                _ => {
                    let offset = self.resolve(consumer, *d, start);
                    (Offset::Offset(offset), Some(offset))
                }
            };
            let skip_before = match start {
                StartPosition::Timestamp(t) => Some(t),
                _ => None,
            };
            let latest = matches!(start, StartPosition::Latest);
            if let Err(err) = tpl.add_partition_offset(&self.topic, p, position) {
                tracing::warn!(error = %err, partition = p, "cannot list a start offset");
            }
            states.push((
                p,
                PartState {
                    low: d.earliest_offset,
                    end: d.end_offset,
                    next,
                    verify: next.is_some() && skip_before.is_none(),
                    back: 0,
                    caught_up: latest,
                    skip_before,
                },
            ));
            if latest {
                caught_up.push((p, d.end_offset));
            }
        }
        if let Err(err) = consumer.assign(&tpl) {
            tracing::warn!(error = %err, "assigning the start offsets failed");
        }
        {
            let mut parts = self.parts();
            for (p, state) in states {
                parts.insert(p, state);
            }
        }
        for (partition, end_offset) in caught_up {
            self.send(LogEvent::CaughtUp {
                partition,
                end_offset,
            });
        }
    }

    /// The offset `start` designates in the described partition.
    fn resolve(
        &self,
        consumer: &BaseConsumer<Self>,
        d: AssignedPartition,
        start: StartPosition,
    ) -> i64 {
        match start {
            StartPosition::Latest => d.end_offset,
            StartPosition::Offset(o) => o.max(d.earliest_offset),
            StartPosition::Timestamp(t) => {
                let mut tpl = TopicPartitionList::new();
                let found = tpl
                    .add_partition_offset(
                        &self.topic,
                        d.partition,
                        Offset::Offset(t.timestamp_millis()),
                    )
                    .ok()
                    .and_then(|()| consumer.offsets_for_times(tpl, self.call_timeout).ok())
                    .and_then(|list| {
                        list.find_partition(&self.topic, d.partition)
                            .map(|e| e.offset())
                    });
                // Records before the time are skipped as they come, so a
                // broker that answers with an earlier offset (tansu) or none
                // at all (the mock cluster) costs reading, not correctness.
                match found {
                    Some(Offset::Offset(o)) if o >= 0 => o.max(d.earliest_offset),
                    _ => d.earliest_offset,
                }
            }
            _ => d.earliest_offset,
        }
    }

    /// Handles a record: repairs a gap after a seek, or passes it on.
    fn record(&self, consumer: &BaseConsumer<Self>, message: &BorrowedMessage<'_>) -> bool {
        let (p, offset) = (message.partition(), message.offset());
        {
            let mut parts = self.parts();
            let Some(state) = parts.get_mut(&p) else {
                return true; // not (or no longer) ours
            };
            if let Some(t) = state.skip_before {
                if broker_timestamp(message).is_some_and(|ts| ts < t) {
                    state.next = Some(offset + 1);
                    return true;
                }
                state.skip_before = None;
            }
            if let Some(next) = state.next {
                if offset < next {
                    return true; // before the position: a repair reads from earlier
                }
                if state.verify
                    && offset > next
                    && next > state.low
                    && self.step_back(consumer, p, state, next)
                {
                    return true;
                }
            }
            state.verify = false;
            state.back = 0;
            state.next = Some(offset + 1);
        }
        let envelope = to_envelope(&self.topic, message);
        let mut info = DeliveryInfo::new(SYSTEM, self.topic.clone(), self.group.clone());
        info.partition = Some(p);
        info.offset = Some(offset);
        info.timestamp = broker_timestamp(message);
        self.send(LogEvent::Record(LogRecord::new(envelope, info)))
    }

    /// Handles the end of a partition (librdkafka's partition EOF): a seek
    /// that landed in tansu's last batch returned nothing, to be repaired;
    /// otherwise the partition is caught up, once per assignment.
    fn end_of_partition(&self, consumer: &BaseConsumer<Self>, p: i32) -> bool {
        let end_offset = {
            let mut parts = self.parts();
            let Some(state) = parts.get_mut(&p) else {
                return true;
            };
            if let Some(next) = state.next
                && state.verify
                && next > state.low
                && next < state.end.max(state.low + 1)
            {
                // Sought inside the partition, and nothing came.
                if self.step_back(consumer, p, state, next) {
                    return true;
                }
            }
            if state.caught_up {
                return true;
            }
            state.caught_up = true;
            state.next.unwrap_or(state.end)
        };
        self.send(LogEvent::CaughtUp {
            partition: p,
            end_offset,
        })
    }

    /// Seeks `p` further back than last time to repair a gap at `next`;
    /// false when the seek failed.
    fn step_back(
        &self,
        consumer: &BaseConsumer<Self>,
        p: i32,
        state: &mut PartState,
        next: i64,
    ) -> bool {
        let back = if state.back == 0 {
            FIRST_STEP_BACK
        } else {
            state.back * 2
        };
        let target = (next - back).max(state.low);
        state.back = back;
        tracing::debug!(topic = %self.topic, partition = p, wanted = next, target, "fetch landed past the offset sought; seeking back");
        if target == state.low {
            state.verify = false; // last try: what comes is accepted
        }
        match consumer.seek(&self.topic, p, Offset::Offset(target), self.call_timeout) {
            Ok(()) => true,
            Err(err) => {
                tracing::warn!(error = %err, partition = p, "seeking back to repair a gap failed");
                state.verify = false;
                false
            }
        }
    }
}

impl ClientContext for LogCtx {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(target: "surety_kafka::librdkafka", client = "log-consumer", facility = fac, "{log_message}")
            }
            RDKafkaLogLevel::Warning => {
                tracing::warn!(target: "surety_kafka::librdkafka", client = "log-consumer", facility = fac, "{log_message}")
            }
            _ => {
                tracing::debug!(target: "surety_kafka::librdkafka", client = "log-consumer", facility = fac, "{log_message}")
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(topic = %self.topic, group = %self.group, error = %error, "librdkafka log consumer: {reason}");
    }
}

impl ConsumerContext for LogCtx {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(list) = rebalance {
            let partitions = self.partitions(list);
            if partitions.is_empty() {
                return;
            }
            tracing::info!(topic = %self.topic, group = %self.group, ?partitions, "log partitions revoked");
            {
                let mut parts = self.parts();
                for p in &partitions {
                    parts.remove(p);
                }
            }
            self.send_and_wait(LogEvent::Revoked(partitions));
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance {
            self.assigned(consumer, list);
        }
    }
}

/// Polls the consumer until the stream is dropped or the transport closes.
fn run(consumer: BaseConsumer<LogCtx>) {
    loop {
        let ctx = consumer.context();
        if ctx.cancel.is_cancelled() || ctx.tx.is_closed() {
            break;
        }
        let open = match consumer.poll(POLL) {
            None => true,
            Some(Ok(message)) => ctx.record(&consumer, &message),
            Some(Err(KafkaError::PartitionEOF(p))) => ctx.end_of_partition(&consumer, p),
            Some(Err(err)) => {
                tracing::warn!(topic = %ctx.topic, group = %ctx.group, error = %err, "log consumer poll failed");
                if matches!(err, KafkaError::MessageConsumptionFatal(_)) {
                    let error =
                        TransportError::new(TransportErrorKind::Connection, err.to_string());
                    // Best effort: the stream may be gone already.
                    let _ = ctx.put((Err(error), None));
                    false
                } else {
                    true
                }
            }
        };
        if !open {
            break;
        }
    }
    consumer.unsubscribe();
}

/// The stream side: acknowledges the last rebalance event when polled again.
struct Events {
    rx: mpsc::Receiver<Item>,
    ack: Option<oneshot::Sender<()>>,
}

impl Events {
    async fn next(&mut self) -> Option<Result<LogEvent>> {
        if let Some(ack) = self.ack.take() {
            // The consumer thread may have stopped waiting already.
            let _ = ack.send(());
        }
        let (event, ack) = self.rx.recv().await?;
        self.ack = ack;
        Some(event)
    }
}

impl LogSubscriber for KafkaTransport {
    /// Starts a consumer in `group` on `topic` that commits nothing: the
    /// group assigns partitions; the caller seeks on
    /// [`Assigned`](LogEvent::Assigned) and keeps its positions. Records
    /// carry Kafka's record timestamp; end offsets are the high watermarks
    /// read at assignment.
    async fn subscribe_log(
        &self,
        topic: &str,
        group: &str,
        options: LogOptions,
    ) -> Result<LogStream> {
        self.check_open()?;
        require_name("group", group)?;
        self.ensure_topic(topic).await?;
        let config = self.config();
        let (tx, rx) = mpsc::channel(BUFFER);
        let ctx = LogCtx {
            topic: topic.to_owned(),
            group: group.to_owned(),
            start: options.start,
            tx,
            parts: Mutex::default(),
            ack_timeout: config.group_join_timeout.max(Duration::from_secs(30)),
            call_timeout: config.connect_timeout,
            cancel: self.cancel_token(),
            runtime: tokio::runtime::Handle::current(),
        };
        let mut client = config.consumer(group);
        // Positions are the caller's: nothing is stored or committed.
        client
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            // The end of a partition is how a reader learns it caught up.
            .set("enable.partition.eof", "true")
            // An offset past the end (kept from a log since truncated)
            // waits for new records rather than replaying the partition.
            .set("auto.offset.reset", "latest");
        let consumer: BaseConsumer<LogCtx> = client.create_with_context(ctx).map_err(|err| {
            TransportError::new(
                TransportErrorKind::Config,
                format!("invalid Kafka consumer configuration: {err}"),
            )
        })?;
        consumer.subscribe(&[topic]).map_err(|err| {
            TransportError::new(
                TransportErrorKind::Connection,
                format!("subscribing to Kafka topic {topic:?}: {err}"),
            )
        })?;
        self.track_log_task(tokio::task::spawn_blocking(move || run(consumer)));
        let events = Events { rx, ack: None };
        Ok(Box::pin(futures::stream::unfold(
            events,
            |mut events| async move { events.next().await.map(|e| (e, events)) },
        )))
    }
}
