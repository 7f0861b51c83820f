//! [`KafkaTransport`]: the producer, topic checks, subscriptions and close.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::consumer::Consumer;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use surety_core::transport::require_name;
use surety_core::{
    Close, Confirmation, DeliveryStream, Envelope, Publisher, Receipt, Result, Subscriber,
    TransportError, TransportErrorKind,
};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{KafkaConfig, config_error};
use crate::consumer::KafkaConsumer;
use crate::context::{ClientCtx, ConsumerCtx, Shared};
use crate::error::{kind_of, kind_of_code, transport_error};
use crate::metrics::KafkaMetrics;
use crate::poller::Poller;

/// How long to wait between looks at a topic being created.
const TOPIC_POLL: Duration = Duration::from_millis(100);

/// A Kafka transport: an idempotent producer shared by all publishes and one
/// consumer per subscription. Cheap to clone; clones share everything.
///
/// Implements [`Publisher`], [`Subscriber`] and [`Close`]; see the
/// [crate documentation](crate) for the delivery guarantees.
///
/// ```no_run
/// use futures::StreamExt;
/// use surety_core::{Close, Envelope, Publisher, Subscriber};
/// use surety_kafka::{KafkaConfig, KafkaTransport};
///
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let kafka = KafkaTransport::connect(KafkaConfig::new("127.0.0.1:9092")).await?;
/// let mut deliveries = kafka.subscribe("orders", "billing").await?;
///
/// let receipt = kafka
///     .publish("orders", Envelope::builder("/shop", "order.placed").partition_key("o-1").build())
///     .await?;
/// println!("stored at partition {:?} offset {:?}", receipt.partition, receipt.offset);
///
/// let delivery = deliveries.next().await.expect("subscribed")?;
/// delivery.ack().await?;
/// kafka.close().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct KafkaTransport {
    inner: Arc<Inner>,
}

struct Inner {
    config: KafkaConfig,
    producer: FutureProducer<ClientCtx>,
    admin: Option<AdminClient<ClientCtx>>,
    closed: AtomicBool,
    cancel: CancellationToken,
    /// Keeps concurrent sends that wait for room in the producer queue in
    /// call order.
    send_order: tokio::sync::Mutex<()>,
    /// Sends waiting for room (holding or waiting for `send_order`); while
    /// there are none, a send enqueues without taking the lock.
    waiting: AtomicUsize,
    known_topics: Mutex<HashMap<String, Arc<KnownTopic>>>,
    /// Subscriptions whose poll task may still run.
    subscriptions: Mutex<Vec<Subscription>>,
    /// Consumer threads of positioned log subscriptions.
    log_tasks: Mutex<Vec<JoinHandle<()>>>,
    close_done: tokio::sync::Mutex<bool>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn closed_error() -> TransportError {
    TransportError::closed("the Kafka transport is closed")
}

/// Runs blocking librdkafka calls off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|err| {
        TransportError::new(TransportErrorKind::Other, "a blocking Kafka call failed")
            .with_source(err)
    })
}

/// A subscription's state and its poll task, which ends once its consumer
/// left the group.
struct Subscription {
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

/// A topic known to exist, with what each publish to it needs.
struct KnownTopic {
    name: String,
    confirmed: Counter,
    metrics: KafkaMetrics,
}

enum TopicState {
    Exists,
    Missing,
    /// Known to the cluster but without leaders yet.
    Pending,
}

impl KafkaTransport {
    /// Creates the producer and checks that the cluster answers within
    /// [`connect_timeout`](KafkaConfig::connect_timeout).
    ///
    /// # Errors
    ///
    /// [`Config`](TransportErrorKind::Config) for an invalid configuration
    /// (including an unknown librdkafka property or a
    /// [managed](crate::MANAGED_PROPERTIES) one);
    /// [`Connection`](TransportErrorKind::Connection) when no broker
    /// answers in time.
    pub async fn connect(config: KafkaConfig) -> Result<Self> {
        config.validate()?;
        let producer: FutureProducer<ClientCtx> = config
            .producer()
            .create_with_context(ClientCtx::new("producer"))
            .map_err(|err| config_error(format!("invalid Kafka producer configuration: {err}")))?;
        let admin = match config.create_missing_topics {
            None => None,
            Some(_) => Some(
                config
                    .admin()
                    .create_with_context(ClientCtx::new("admin"))
                    .map_err(|err| {
                        config_error(format!("invalid Kafka admin configuration: {err}"))
                    })?,
            ),
        };
        let probe = producer.clone();
        let timeout = config.connect_timeout;
        let metadata = blocking(move || probe.client().fetch_metadata(None, timeout))
            .await?
            .map_err(|err| {
                // Security and configuration problems stay `Config`; anything
                // else means the cluster could not be reached.
                let kind = match kind_of(&err) {
                    TransportErrorKind::Config => TransportErrorKind::Config,
                    _ => TransportErrorKind::Connection,
                };
                TransportError::new(
                    kind,
                    format!(
                        "no Kafka broker at {} answered within {timeout:?}: {err}",
                        config.bootstrap_servers
                    ),
                )
                .with_source(err)
            })?;
        if metadata.brokers().is_empty() {
            return Err(TransportError::new(
                TransportErrorKind::Connection,
                format!(
                    "the Kafka cluster at {} reported no brokers",
                    config.bootstrap_servers
                ),
            ));
        }
        tracing::info!(
            bootstrap = %config.bootstrap_servers,
            brokers = metadata.brokers().len(),
            "connected to Kafka"
        );
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                producer,
                admin,
                closed: AtomicBool::new(false),
                cancel: CancellationToken::new(),
                send_order: tokio::sync::Mutex::new(()),
                waiting: AtomicUsize::new(0),
                known_topics: Mutex::new(HashMap::new()),
                subscriptions: Mutex::new(Vec::new()),
                log_tasks: Mutex::new(Vec::new()),
                close_done: tokio::sync::Mutex::new(false),
            }),
        })
    }

    /// The configuration this transport was connected with.
    pub fn config(&self) -> &KafkaConfig {
        &self.inner.config
    }

    /// Keeps a log subscription's consumer thread for close to await.
    pub(crate) fn track_log_task(&self, task: JoinHandle<()>) {
        let mut tasks = lock(&self.inner.log_tasks);
        tasks.retain(|t| !t.is_finished());
        tasks.push(task);
    }

    /// A token cancelled when the transport closes.
    pub(crate) fn cancel_token(&self) -> CancellationToken {
        self.inner.cancel.child_token()
    }

    pub(crate) fn check_open(&self) -> Result<()> {
        if self.inner.closed.load(Ordering::Acquire) {
            Err(closed_error())
        } else {
            Ok(())
        }
    }

    /// Makes sure `topic` exists: known from an earlier check, present in
    /// the cluster's metadata, or created when
    /// [`create_missing_topics`](KafkaConfig::create_missing_topics) is set.
    ///
    /// Publishing and subscribing call this; call it yourself to fail fast
    /// at start-up.
    ///
    /// # Errors
    ///
    /// [`Config`](TransportErrorKind::Config) naming the topic when it does
    /// not exist and is not to be created, or its name is invalid;
    /// [`Connection`](TransportErrorKind::Connection) or
    /// [`Timeout`](TransportErrorKind::Timeout) when the cluster does not
    /// answer.
    pub async fn ensure_topic(&self, topic: &str) -> Result<()> {
        self.known_topic(topic).await.map(drop)
    }

    async fn known_topic(&self, topic: &str) -> Result<Arc<KnownTopic>> {
        if let Some(known) = lock(&self.inner.known_topics).get(topic) {
            return Ok(known.clone());
        }
        check_topic_name(topic)?;
        let deadline = Instant::now() + self.inner.config.connect_timeout;
        let mut created = false;
        loop {
            match self.topic_state(topic).await? {
                TopicState::Exists => {
                    let metrics = self.inner.config.metrics.clone();
                    let known = Arc::new(KnownTopic {
                        name: topic.to_owned(),
                        confirmed: metrics.sent_counter(topic, "confirmed"),
                        metrics,
                    });
                    lock(&self.inner.known_topics).insert(topic.to_owned(), known.clone());
                    return Ok(known);
                }
                TopicState::Missing if !created => match self.inner.config.create_missing_topics {
                    None => {
                        return Err(config_error(format!(
                            "Kafka topic {topic:?} does not exist (create it, or set \
                             KafkaConfig::create_missing_topics)"
                        )));
                    }
                    Some(partitions) => {
                        self.create_topic(topic, partitions).await?;
                        created = true;
                    }
                },
                TopicState::Missing | TopicState::Pending => {}
            }
            if Instant::now() >= deadline {
                return Err(TransportError::new(
                    TransportErrorKind::Timeout,
                    format!(
                        "Kafka topic {topic:?} has no partition leaders after {:?}",
                        self.inner.config.connect_timeout
                    ),
                ));
            }
            tokio::time::sleep(TOPIC_POLL).await;
        }
    }

    async fn topic_state(&self, topic: &str) -> Result<TopicState> {
        let producer = self.inner.producer.clone();
        let timeout = self.inner.config.connect_timeout;
        let name = topic.to_owned();
        let metadata = blocking(move || producer.client().fetch_metadata(Some(&name), timeout))
            .await?
            .map_err(|err| {
                transport_error(format!("reading metadata of Kafka topic {topic:?}"), err)
            })?;
        let Some(found) = metadata.topics().iter().find(|t| t.name() == topic) else {
            return Ok(TopicState::Missing);
        };
        match found.error().map(RDKafkaErrorCode::from) {
            None if found.partitions().is_empty() => Ok(TopicState::Pending),
            None => Ok(TopicState::Exists),
            Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic) => {
                Ok(TopicState::Missing)
            }
            Some(RDKafkaErrorCode::LeaderNotAvailable) => Ok(TopicState::Pending),
            Some(code) => Err(TransportError::new(
                kind_of_code(code),
                format!("Kafka topic {topic:?}: {code}"),
            )),
        }
    }

    async fn create_topic(&self, topic: &str, partitions: i32) -> Result<()> {
        let Some(admin) = &self.inner.admin else {
            return Err(config_error("topic creation is not configured"));
        };
        let timeout = self.inner.config.connect_timeout;
        let replication = self.inner.config.replication_factor.unwrap_or(-1);
        let new_topic = NewTopic::new(topic, partitions, TopicReplication::Fixed(replication));
        let options = AdminOptions::new()
            .operation_timeout(Some(timeout))
            .request_timeout(Some(timeout));
        let results = admin
            .create_topics([&new_topic], &options)
            .await
            .map_err(|err| transport_error(format!("creating Kafka topic {topic:?}"), err))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => {
                    return Err(TransportError::new(
                        kind_of_code(code),
                        format!("creating Kafka topic {name:?} failed: {code}"),
                    ));
                }
            }
        }
        tracing::info!(topic, partitions, "created Kafka topic");
        Ok(())
    }
}

/// Kafka's rules for topic names: 1 to 249 characters out of ASCII
/// letters, digits, `.`, `_` and `-`, and not `.` or `..`.
fn check_topic_name(topic: &str) -> Result<()> {
    let valid = !topic.is_empty()
        && topic.len() <= 249
        && topic != "."
        && topic != ".."
        && topic
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(config_error(format!(
            "{topic:?} is not a valid Kafka topic name"
        )))
    }
}

impl fmt::Debug for KafkaTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaTransport")
            .field("bootstrap_servers", &self.inner.config.bootstrap_servers)
            .field("closed", &self.inner.closed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Publisher for KafkaTransport {
    /// Checks the topic (once per topic), then enqueues the record in the
    /// producer in call order. The confirmation resolves with the partition
    /// and offset when the broker acknowledged the write to all in-sync
    /// replicas.
    async fn send(&self, topic: &str, envelope: Envelope) -> Result<Confirmation> {
        let sent = self.enqueue(topic, envelope).await;
        if let Err(err) = &sent {
            self.inner.config.metrics.sent(topic, err.kind().as_str());
        }
        sent
    }
}

impl KafkaTransport {
    async fn enqueue(&self, topic: &str, envelope: Envelope) -> Result<Confirmation> {
        self.check_open()?;
        let known = self.known_topic(topic).await?;
        let inner = &self.inner;
        // `insert` takes the headers by value.
        let mut headers = Some(OwnedHeaders::new_with_capacity(envelope.headers.len() + 11));
        envelope.for_each_binary_header(|key, value| {
            headers = headers.take().map(|headers| {
                headers.insert(Header {
                    key,
                    value: Some(value.as_bytes()),
                })
            });
        });
        let mut record = FutureRecord::<[u8], [u8]>::to(topic).payload(envelope.payload.as_ref());
        if let Some(headers) = headers {
            record = record.headers(headers);
        }
        if let Some(key) = &envelope.partition_key {
            record = record.key(key.as_bytes());
        }
        // Without sends waiting for room, enqueue at once; otherwise, or
        // when the queue is full, take a place in line.
        if inner.waiting.load(Ordering::Acquire) == 0 {
            match inner.producer.send_result(record) {
                Ok(delivery) => return Ok(confirmation(known, delivery)),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                    record = returned;
                }
                Err((err, _)) => {
                    return Err(transport_error(
                        format!("publishing to Kafka topic {topic:?}"),
                        err,
                    ));
                }
            }
        }
        inner.waiting.fetch_add(1, Ordering::AcqRel);
        let waited = self.enqueue_in_line(topic, record).await;
        inner.waiting.fetch_sub(1, Ordering::AcqRel);
        Ok(confirmation(known, waited?))
    }

    /// Enqueues `record` after the sends already waiting for room, waiting
    /// (up to the delivery timeout) while the producer's queue is full: the
    /// publisher's backpressure.
    async fn enqueue_in_line<'a>(
        &self,
        topic: &str,
        mut record: FutureRecord<'a, [u8], [u8]>,
    ) -> Result<DeliveryFuture> {
        let inner = &self.inner;
        let deadline = Instant::now() + inner.config.delivery_timeout;
        let _order = inner.send_order.lock().await;
        loop {
            self.check_open()?;
            match inner.producer.send_result(record) {
                Ok(delivery) => return Ok(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned))
                    if Instant::now() < deadline =>
                {
                    record = returned;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((err, _)) => {
                    return Err(transport_error(
                        format!("publishing to Kafka topic {topic:?}"),
                        err,
                    ));
                }
            }
        }
    }
}

impl KafkaTransport {
    /// Waits (up to the group join timeout) until the consumers of `group`
    /// on `topic` whose streams were dropped have left the group. Joining
    /// while such a member is still in the group starts a rebalance that
    /// waits for it; letting it leave first avoids that round.
    async fn wait_for_leaving_members(&self, topic: &str, group: &str) {
        let leaving: Vec<_> = {
            let mut subscriptions = lock(&self.inner.subscriptions);
            subscriptions.retain(|s| !s.task.is_finished());
            subscriptions
                .iter()
                .map(|s| &s.shared)
                .filter(|shared| {
                    shared.topic == topic
                        && shared.group == group
                        && shared.leaving.load(Ordering::Acquire)
                })
                .map(|shared| shared.left.subscribe())
                .collect()
        };
        if leaving.is_empty() {
            return;
        }
        let all_left = async {
            for mut left in leaving {
                // An error means the member's state is gone: it left.
                let _ = left.wait_for(|left| *left).await;
            }
        };
        if tokio::time::timeout(self.inner.config.group_join_timeout, all_left)
            .await
            .is_err()
        {
            tracing::warn!(
                topic,
                group,
                "a dropped subscription of this group is still settling its deliveries; joining anyway"
            );
        }
    }
}

/// The confirmation of an enqueued record: the delivery report, counted.
fn confirmation(known: Arc<KnownTopic>, delivery: DeliveryFuture) -> Confirmation {
    Confirmation::new(async move {
        match delivery.await {
            Ok(Ok(stored)) => {
                known.confirmed.inc();
                Ok(
                    Receipt::new(known.name.clone())
                        .at(Some(stored.partition), Some(stored.offset)),
                )
            }
            report => {
                let err = match report {
                    Ok(Err((err, _message))) => {
                        transport_error(format!("publishing to Kafka topic {:?}", known.name), err)
                    }
                    _ => closed_error(),
                };
                known.metrics.sent(&known.name, err.kind().as_str());
                Err(err)
            }
        }
    })
}

impl Subscriber for KafkaTransport {
    /// Checks the topic, starts a consumer in `group` and waits until it has
    /// joined the group (received its first partition assignment, possibly
    /// empty), within [`group_join_timeout`](KafkaConfig::group_join_timeout).
    ///
    /// A subscription of the same group and topic on this transport whose
    /// stream was dropped is waited for first, until its consumer has left
    /// the group (it leaves once the deliveries it handed out are settled;
    /// at most the join timeout): joining next to a member on its way out
    /// would start a rebalance that waits for that member.
    async fn subscribe(&self, topic: &str, group: &str) -> Result<DeliveryStream> {
        self.check_open()?;
        require_name("group", group)?;
        self.ensure_topic(topic).await?;
        let inner = &self.inner;
        let config = &inner.config;
        self.wait_for_leaving_members(topic, group).await;
        let shared = Arc::new(Shared::new(topic, group, config.metrics.clone()));
        let consumer: KafkaConsumer = config
            .consumer(group)
            .create_with_context(ConsumerCtx {
                shared: shared.clone(),
            })
            .map_err(|err| config_error(format!("invalid Kafka consumer configuration: {err}")))?;
        consumer
            .subscribe(&[topic])
            .map_err(|err| transport_error(format!("subscribing to Kafka topic {topic:?}"), err))?;
        let mut joined = shared.joined.subscribe();
        let subscription_state = shared.clone();
        let cancel = inner.cancel.child_token();
        let poller = Poller {
            consumer,
            shared,
            cancel: cancel.clone(),
            drain_timeout: config.drain_timeout,
            pause_after: config.pause_after,
        };
        let (stream, task) = poller.spawn(config.consumer_buffer);
        let joined = tokio::time::timeout(config.group_join_timeout, async {
            joined.wait_for(|joined| *joined).await.is_ok()
        })
        .await
        .unwrap_or(false);
        if !joined {
            cancel.cancel();
            drop(stream);
            if let Err(err) = task.await {
                tracing::warn!(error = %err, "stopping a consumer that did not join failed");
            }
            return Err(TransportError::new(
                TransportErrorKind::Timeout,
                format!(
                    "the consumer for group {group:?} on Kafka topic {topic:?} was not assigned \
                     partitions within {:?}",
                    config.group_join_timeout
                ),
            ));
        }
        {
            let mut subscriptions = lock(&inner.subscriptions);
            subscriptions.retain(|s| !s.task.is_finished());
            subscriptions.push(Subscription {
                shared: subscription_state,
                task,
            });
        }
        // A close that ran while this subscription was starting did not see
        // its task: stop it here.
        if inner.closed.load(Ordering::Acquire) {
            cancel.cancel();
        }
        Ok(stream)
    }
}

impl Close for KafkaTransport {
    /// Stops every subscription (each stores and commits the offsets its
    /// settlements allowed, then leaves its group; unsettled deliveries are
    /// redelivered later) and every positioned log subscription (it leaves
    /// its group; its stream ends), then flushes the producer within the
    /// [delivery timeout](KafkaConfig::delivery_timeout). Idempotent.
    async fn close(&self) -> Result<()> {
        let inner = &self.inner;
        let mut done = inner.close_done.lock().await;
        if *done {
            return Ok(());
        }
        inner.closed.store(true, Ordering::Release);
        inner.cancel.cancel();
        let subscriptions = std::mem::take(&mut *lock(&inner.subscriptions));
        for Subscription { task, .. } in subscriptions {
            if let Err(err) = task.await {
                tracing::warn!(error = %err, "a Kafka subscription task failed");
            }
        }
        let log_tasks = std::mem::take(&mut *lock(&inner.log_tasks));
        for task in log_tasks {
            if let Err(err) = task.await {
                tracing::warn!(error = %err, "a Kafka log subscription thread failed");
            }
        }
        let producer = inner.producer.clone();
        let timeout = inner.config.delivery_timeout;
        let flushed = blocking(move || producer.flush(timeout)).await?;
        *done = true;
        flushed.map_err(|err| transport_error("flushing the Kafka producer on close", err))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names_follow_kafka_rules() {
        assert!(check_topic_name("orders.v1_eu-west").is_ok());
        for bad in ["", ".", "..", "orders/v1", "orders v1", &"x".repeat(250)] {
            let err = check_topic_name(bad).unwrap_err();
            assert_eq!(err.kind(), TransportErrorKind::Config, "{bad:?}");
        }
    }
}
