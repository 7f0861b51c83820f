//! The subscriber: a durable queue per consumer group, manual acks, and the
//! [`Settle`] implementation.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, BasicRejectOptions, ConfirmSelectOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Acker, BasicProperties, Channel, Consumer};
use surety_core::transport::{require_name, settle_failed};
use surety_core::{
    Delivery, DeliveryInfo, DeliveryStream, Result, Settle, Subscriber, TransportError,
    TransportErrorKind,
};
use tokio::sync::watch;

use crate::codec::{self, X_DELIVERY_COUNT, X_SURETY_DELIVERIES};
use crate::config::QueueType;
use crate::error::from_lapin;
use crate::metrics::{DeliveryOutcome, RabbitMetrics};
use crate::transport::{RabbitTransport, WaitError, wait_for_recovery};
use crate::{SYSTEM, queue_name};

static CONSUMER_SEQ: AtomicU64 = AtomicU64::new(0);

/// What a subscription's stream and its deliveries share. The channel closes
/// when the last of them is dropped, so deliveries in handlers can still be
/// acknowledged after the stream itself was dropped.
pub(crate) struct SubscriptionShared {
    pub(crate) channel: Channel,
    pub(crate) consumer_tag: ShortString,
    topic: String,
    group: String,
    /// The queue, for returning messages to its tail.
    queue: ShortString,
    quorum: bool,
    metrics: RabbitMetrics,
}

impl fmt::Debug for SubscriptionShared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("topic", &self.topic)
            .field("group", &self.group)
            .field("consumer_tag", &self.consumer_tag)
            .finish_non_exhaustive()
    }
}

/// The `x-*` arguments of a queue of `queue_type`.
/// How long a settlement (an ack, a nack, a requeue with its republish)
/// may take before it is given up as failed.
const SETTLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

pub(crate) fn queue_arguments(queue_type: QueueType, single_active: bool) -> FieldTable {
    let mut args = FieldTable::default();
    if single_active {
        args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    }
    if let QueueType::Quorum { delivery_limit } = queue_type {
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        if let Some(limit) = delivery_limit {
            args.insert(
                "x-delivery-limit".into(),
                AMQPValue::LongLongInt(i64::from(limit)),
            );
        }
    }
    args
}

impl RabbitTransport {
    /// Declares, binds and consumes the queue of `group` on `topic` on a new
    /// channel of the current connection.
    async fn open_subscription(
        &self,
        topic: &str,
        group: &str,
    ) -> Result<(Consumer, Arc<SubscriptionShared>, u64)> {
        let queue = queue_name(topic, group);
        let (queue_short, topic_short) = match (
            ShortString::try_new(queue.clone()),
            ShortString::try_new(topic),
        ) {
            (Ok(q), Ok(t)) => (q, t),
            _ => {
                return Err(TransportError::new(
                    TransportErrorKind::Config,
                    format!("queue name {queue:?} is longer than the 255 bytes AMQP allows"),
                ));
            }
        };
        let config = &self.inner.config;
        let (connection, generation) = self.current();
        let open = || async {
            connection
                .create_channel()
                .await
                .map_err(|err| from_lapin("opening a channel", err))
        };
        // A queue declared beforehand (with dead-lettering, see `topology`)
        // is used as it is: redeclaring it with other arguments would fail.
        let exists = open()
            .await?
            .queue_declare(
                queue_short.clone(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .is_ok();
        let channel = open().await?;
        if !exists {
            channel
                .queue_declare(
                    queue_short.clone(),
                    QueueDeclareOptions {
                        durable: true,
                        ..QueueDeclareOptions::default()
                    },
                    queue_arguments(config.queue_type, config.single_active_consumer),
                )
                .await
                .map_err(|err| from_lapin(&format!("declaring queue {queue:?}"), err))?;
        }
        channel
            .queue_bind(
                queue_short.clone(),
                self.inner.exchange.clone(),
                topic_short,
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|err| from_lapin(&format!("binding queue {queue:?}"), err))?;
        channel
            .basic_qos(config.prefetch, BasicQosOptions::default())
            .await
            .map_err(|err| from_lapin("setting the prefetch", err))?;
        // Returning a message with a count (see `RabbitSettle::requeue`) is
        // a publish that must be confirmed before the original is acked.
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|err| from_lapin("enabling publisher confirms", err))?;
        let consumer_tag = ShortString::from(format!(
            "surety-{}-{}",
            std::process::id(),
            CONSUMER_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let consumer = channel
            .basic_consume(
                queue_short.clone(),
                consumer_tag.clone(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|err| from_lapin(&format!("consuming queue {queue:?}"), err))?;

        let shared = Arc::new(SubscriptionShared {
            channel,
            consumer_tag,
            topic: topic.to_owned(),
            group: group.to_owned(),
            queue: queue_short,
            quorum: matches!(config.queue_type, QueueType::Quorum { .. }),
            metrics: config.metrics.clone(),
        });
        let mut subs = self.subscriptions();
        subs.retain(|s| s.strong_count() > 0);
        subs.push(Arc::downgrade(&shared));
        Ok((consumer, shared, generation))
    }
}

impl Subscriber for RabbitTransport {
    /// Declares (idempotently) the durable queue `{topic}.{group}` of the
    /// configured [`QueueType`], binds it to the exchange with routing key
    /// `topic`, and consumes it on a channel of its own with the configured
    /// prefetch and manual acknowledgements. A queue that already exists is
    /// consumed as it is (so one declared with the [`topology`](crate::topology)
    /// helpers keeps its dead-lettering).
    ///
    /// The stream survives reconnects. It ends when the transport is closed
    /// or the broker cancels the consumer (the queue was deleted), and after
    /// yielding an error the connection will not recover from.
    async fn subscribe(&self, topic: &str, group: &str) -> Result<DeliveryStream> {
        self.ensure_open()?;
        require_name("topic", topic)?;
        require_name("group", group)?;
        let (consumer, shared, generation) = self.open_subscription(topic, group).await?;
        self.inner.config.metrics.subscribed(topic, group);
        let state = StreamState {
            consumer: ReturnOnDrop(Some((consumer, shared.clone()))),
            shared,
            queue: queue_name(topic, group),
            transport: self.clone(),
            closed: self.inner.closed.subscribe(),
            generations: self.inner.generation.subscribe(),
            generation,
            done: false,
        };
        Ok(futures::stream::unfold(state, next_delivery).boxed())
    }
}

struct StreamState {
    consumer: ReturnOnDrop,
    shared: Arc<SubscriptionShared>,
    queue: String,
    transport: RabbitTransport,
    closed: watch::Receiver<bool>,
    generations: watch::Receiver<u64>,
    /// The generation of the connection the consumer is on.
    generation: u64,
    done: bool,
}

/// The lapin consumer; when dropped (the stream was dropped), the consumer
/// is cancelled and the deliveries it had received but not yielded are
/// returned to the queue at once, rather than when the channel closes.
struct ReturnOnDrop(Option<(Consumer, Arc<SubscriptionShared>)>);

/// Bound on each step of returning a dropped stream's deliveries.
const RETURN_STEP: std::time::Duration = std::time::Duration::from_secs(5);

impl ReturnOnDrop {
    fn consumer(&mut self) -> Option<&mut Consumer> {
        self.0.as_mut().map(|(consumer, _)| consumer)
    }
}

impl Drop for ReturnOnDrop {
    fn drop(&mut self) {
        let Some((mut consumer, shared)) = self.0.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // Dropping the consumer cancels it; what it had received goes
            // back when the channel closes.
            return;
        };
        runtime.spawn(async move {
            // After cancel-ok the broker sends nothing more for this
            // consumer, and everything it sent before is in the buffer,
            // which then ends.
            let cancel = shared
                .channel
                .basic_cancel(shared.consumer_tag.clone(), BasicCancelOptions::default());
            let _ = tokio::time::timeout(RETURN_STEP, cancel).await;
            while let Ok(Some(Ok(delivery))) =
                tokio::time::timeout(RETURN_STEP, consumer.next()).await
            {
                let requeue = BasicNackOptions {
                    multiple: false,
                    requeue: true,
                };
                if let Ok(true) = delivery.acker.nack(requeue).await {
                    shared
                        .metrics
                        .delivery(&shared.topic, &shared.group, DeliveryOutcome::Nacked);
                }
            }
        });
    }
}

/// How long a subscription waits between attempts to consume again on a
/// replaced connection.
const RESUBSCRIBE_DELAY: std::time::Duration = std::time::Duration::from_secs(1);

/// Consumes again on the current connection after it was replaced.
async fn resubscribe(state: &mut StreamState) -> bool {
    loop {
        let (topic, group) = (state.shared.topic.clone(), state.shared.group.clone());
        match state.transport.open_subscription(&topic, &group).await {
            Ok((consumer, shared, generation)) => {
                state.consumer = ReturnOnDrop(Some((consumer, shared.clone())));
                state.shared = shared;
                state.generation = generation;
                return true;
            }
            Err(err) => {
                tracing::warn!(error = %err, queue = %state.queue, "consuming again on the new connection failed");
                tokio::select! {
                    _ = state.closed.wait_for(|closed| *closed) => return false,
                    () = tokio::time::sleep(RESUBSCRIBE_DELAY) => {}
                }
            }
        }
    }
}

async fn next_delivery(mut state: StreamState) -> Option<(Result<Delivery>, StreamState)> {
    loop {
        if state.done {
            return None;
        }
        if *state.generations.borrow_and_update() != state.generation
            && !resubscribe(&mut state).await
        {
            return None;
        }
        let mine = state.generation;
        let consumer = state.consumer.consumer()?;
        let next = tokio::select! {
            biased;
            _ = state.closed.wait_for(|closed| *closed) => return None,
            _ = state.generations.wait_for(|g| *g != mine) => continue,
            next = consumer.next() => next,
        };
        match next {
            // Cancelled: by close, or by the broker (queue deleted).
            None => return None,
            Some(Ok(delivery)) => {
                let delivery = convert(&state, delivery);
                return Some((Ok(delivery), state));
            }
            Some(Err(err)) => {
                let connection = state.transport.connection();
                let channel = state.shared.channel.clone();
                let mut generations = state.generations.clone();
                let wait = wait_for_recovery(&connection, &channel, err, None, &mut generations);
                let waited = tokio::select! {
                    biased;
                    _ = state.closed.wait_for(|closed| *closed) => return None,
                    waited = wait => waited,
                };
                match waited {
                    Ok(()) | Err(WaitError::TimedOut) => continue,
                    Err(WaitError::Gone(err)) => {
                        if !connection.status().connected() {
                            // Lapin gave up; the supervisor replaces the
                            // connection and the loop consumes again there.
                            tokio::select! {
                                _ = state.closed.wait_for(|closed| *closed) => return None,
                                _ = state.generations.wait_for(|g| *g != mine) => continue,
                            }
                        }
                        state.done = true;
                        let err = from_lapin(&format!("consuming queue {:?}", state.queue), err);
                        return Some((Err(err), state));
                    }
                }
            }
        }
    }
}

fn convert(state: &StreamState, delivery: lapin::message::Delivery) -> Delivery {
    let shared = &state.shared;
    let lapin::message::Delivery {
        redelivered,
        properties,
        data,
        acker,
        ..
    } = delivery;
    let data = Bytes::from(data);
    let decoded = codec::decode(&state.queue, &properties, data.clone());
    let count = delivery_count(
        redelivered,
        decoded.x_delivery_count,
        decoded.surety_deliveries,
    );
    // Who counts this message's deliveries: the broker (a quorum queue), or
    // the adapter, which returns it with the count in a header. A message
    // that carries the adapter's count, or that comes back without the
    // broker's (the queue is not a quorum queue, whatever the config
    // says), is counted by the adapter.
    let adapter_counts = !shared.quorum
        || decoded.surety_deliveries.is_some()
        || (redelivered && decoded.x_delivery_count.is_none());
    let mut info = DeliveryInfo::new(SYSTEM, shared.topic.clone(), shared.group.clone());
    info.redelivered = redelivered || count > 1;
    info.delivery_count = Some(count);
    shared
        .metrics
        .delivery(&shared.topic, &shared.group, DeliveryOutcome::Consumed);
    let settle = RabbitSettle {
        acker: Some(acker),
        shared: shared.clone(),
        counted: adapter_counts.then(|| Counted {
            properties,
            body: data,
            deliveries: count,
        }),
    };
    Delivery::new(decoded.envelope, info, Box::new(settle))
}

/// The delivery count of a message, counting this delivery: one more than
/// the highest of the earlier attempts the broker (`x-delivery-count`) and
/// the adapter ([`X_SURETY_DELIVERIES`]) recorded, and at least 2 for a
/// message the broker marks redelivered. Only ever grows for one message, so
/// a producer's header can start it high but never keep it low.
fn delivery_count(redelivered: bool, broker: Option<u32>, adapter: Option<u32>) -> u32 {
    let earlier = broker.max(adapter).unwrap_or(0);
    earlier
        .saturating_add(1)
        .max(if redelivered { 2 } else { 1 })
}

/// A delivery whose attempts the adapter counts: what it needs to return the
/// message to the queue with the count.
struct Counted {
    properties: BasicProperties,
    body: Bytes,
    /// Deliveries so far, counting this one.
    deliveries: u32,
}

/// The properties of the copy that returns a counted message to its queue:
/// the original's, with [`X_SURETY_DELIVERIES`] set to `deliveries` and the
/// broker's `x-delivery-count` left out.
fn counted_properties(properties: &BasicProperties, deliveries: u32) -> BasicProperties {
    let mut headers = FieldTable::default();
    if let Some(table) = properties.headers() {
        for (key, value) in table {
            if key.as_str() != X_DELIVERY_COUNT && key.as_str() != X_SURETY_DELIVERIES {
                headers.insert(key.clone(), value.clone());
            }
        }
    }
    headers.insert(X_SURETY_DELIVERIES.into(), AMQPValue::LongUInt(deliveries));
    properties.clone().with_headers(headers)
}

/// Returns a delivery to its queue for another attempt. A counted delivery
/// is published again to the queue's tail with its count (confirmed), then
/// acked; if that fails, or for a delivery the broker counts, it is nacked
/// with requeue. Returns whether the broker took the settlement.
async fn requeue(
    acker: Acker,
    shared: &SubscriptionShared,
    counted: Option<Counted>,
) -> std::result::Result<bool, lapin::Error> {
    if let Some(counted) = counted {
        match republish(shared, &counted).await {
            Ok(()) => return acker.ack(BasicAckOptions::default()).await,
            Err(err) => {
                tracing::warn!(
                    queue = %shared.queue,
                    error = %err,
                    "returning a message with its delivery count failed; requeued without the count"
                );
            }
        }
    }
    acker
        .nack(BasicNackOptions {
            multiple: false,
            requeue: true,
        })
        .await
}

/// Publishes the copy of a counted delivery to its queue's tail through the
/// default exchange and waits for the broker's confirmation.
async fn republish(shared: &SubscriptionShared, counted: &Counted) -> Result<()> {
    let properties = counted_properties(&counted.properties, counted.deliveries);
    let confirm = shared
        .channel
        .basic_publish(
            ShortString::from(""),
            shared.queue.clone(),
            BasicPublishOptions {
                mandatory: true,
                immediate: false,
            },
            &counted.body,
            properties,
        )
        .await
        .map_err(|err| from_lapin("returning a message to its queue", err))?;
    let confirmation = confirm
        .await
        .map_err(|err| from_lapin("returning a message to its queue", err))?;
    match confirmation {
        lapin::Confirmation::Ack(None) => Ok(()),
        other => Err(TransportError::new(
            TransportErrorKind::Rejected,
            format!(
                "the broker did not take the message back into queue {}: {other:?}",
                shared.queue
            ),
        )),
    }
}

/// Settles one RabbitMQ delivery on the channel it came from.
struct RabbitSettle {
    acker: Option<Acker>,
    shared: Arc<SubscriptionShared>,
    /// Set when the adapter counts this message's deliveries.
    counted: Option<Counted>,
}

impl fmt::Debug for RabbitSettle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitSettle")
            .field("subscription", &self.shared)
            .field("settled", &self.acker.is_none())
            .finish()
    }
}

#[derive(Clone, Copy)]
enum Action {
    Ack,
    Nack { requeue: bool },
    Reject,
}

impl RabbitSettle {
    async fn finish(&mut self, action: Action) -> Result<()> {
        let shared = &self.shared;
        let Some(acker) = self.acker.take() else {
            return Err(settle_failed("delivery already settled"));
        };
        let counted = self.counted.take();
        let settle = async {
            match action {
                Action::Ack => acker.ack(BasicAckOptions::default()).await,
                Action::Nack { requeue: true } => requeue(acker, shared, counted).await,
                Action::Nack { requeue: false } => {
                    acker
                        .nack(BasicNackOptions {
                            multiple: false,
                            requeue: false,
                        })
                        .await
                }
                Action::Reject => acker.reject(BasicRejectOptions { requeue: false }).await,
            }
        };
        // A settlement on a channel that is going away can wait for a frame
        // that is never sent: it must not hold the worker for ever. What
        // was not settled in time is redelivered by the broker.
        let Ok(result) = tokio::time::timeout(SETTLE_TIMEOUT, settle).await else {
            shared
                .metrics
                .delivery(&shared.topic, &shared.group, DeliveryOutcome::SettleFailed);
            return Err(settle_failed(
                "the settlement was not sent in time (the channel is going away)",
            ));
        };
        let outcome = match action {
            Action::Ack => DeliveryOutcome::Acked,
            Action::Nack { requeue: true } => DeliveryOutcome::Nacked,
            Action::Nack { requeue: false } | Action::Reject => DeliveryOutcome::Rejected,
        };
        match result {
            Ok(true) => {
                shared
                    .metrics
                    .delivery(&shared.topic, &shared.group, outcome);
                Ok(())
            }
            Ok(false) => {
                shared.metrics.delivery(
                    &shared.topic,
                    &shared.group,
                    DeliveryOutcome::SettleFailed,
                );
                Err(settle_failed(
                    "the delivery's channel was closed (connection lost or transport closed)",
                ))
            }
            Err(err) => {
                shared.metrics.delivery(
                    &shared.topic,
                    &shared.group,
                    DeliveryOutcome::SettleFailed,
                );
                Err(settle_failed("the broker did not take the settlement").with_source(err))
            }
        }
    }
}

#[async_trait::async_trait]
impl Settle for RabbitSettle {
    async fn ack(mut self: Box<Self>) -> Result<()> {
        self.finish(Action::Ack).await
    }

    async fn nack(mut self: Box<Self>, requeue: bool) -> Result<()> {
        self.finish(Action::Nack { requeue }).await
    }

    async fn reject(mut self: Box<Self>) -> Result<()> {
        self.finish(Action::Reject).await
    }
}

impl Drop for RabbitSettle {
    /// Dropped unsettled: nack with requeue, so the broker delivers the
    /// message again now rather than when the channel closes. Needs a Tokio
    /// runtime; without one (or if the channel is gone) the broker
    /// redelivers when the channel closes.
    fn drop(&mut self) {
        let Some(acker) = self.acker.take() else {
            return;
        };
        if !acker.usable() {
            return;
        }
        let shared = self.shared.clone();
        let counted = self.counted.take();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Ok(true) = requeue(acker, &shared, counted).await {
                    shared
                        .metrics
                        .delivery(&shared.topic, &shared.group, DeliveryOutcome::Nacked);
                }
            });
        }
    }
}
