//! What a subscription hands to the application: a record from librdkafka
//! turned into a delivery, the [`DeliveryStream`] that yields it from the
//! poll loop's buffer (see `poller`), and the settler that records its
//! outcome.
//!
//! [`DeliveryStream`]: surety_core::DeliveryStream

use std::fmt;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::Stream;
use rdkafka::consumer::StreamConsumer;
use rdkafka::message::{BorrowedMessage, Headers as _, Message as _};
use surety_core::transport::settle_failed;
use surety_core::{Delivery, DeliveryInfo, Envelope, Headers, Result, Settle, TransportError};
use tokio::sync::mpsc;

use crate::SYSTEM;
use crate::context::{ConsumerCtx, Shared};
use crate::tracker::{Registered, Token};

/// The consumer type of a subscription.
pub(crate) type KafkaConsumer = StreamConsumer<ConsumerCtx>;

/// What the poll loop hands to the stream.
pub(crate) enum Item {
    Delivery(Box<Pending>),
    Error(TransportError),
}

/// A delivery on its way to the application.
pub(crate) struct Pending {
    envelope: Envelope,
    info: DeliveryInfo,
    settle: KafkaSettle,
}

/// Registers a fetched message and builds its delivery, unless it is not
/// to be delivered (already handled, or still being handled).
pub(crate) fn accept(shared: &Arc<Shared>, message: &BorrowedMessage<'_>) -> Option<Item> {
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
    let (pairs, header_error) = read_headers(message);
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
        let mut headers = Headers::new();
        for (key, value) in pairs {
            headers.insert(key, value);
        }
        return undecodable(headers, payload, &error);
    }
    // The attributes go straight to the envelope's fields; a failure hands
    // every header back.
    match Envelope::from_binary_pairs(pairs, payload) {
        Ok(envelope) => envelope,
        Err((err, headers, payload)) => undecodable(headers, payload, &err),
    }
}

/// The record's headers as (name, value) pairs in order, names borrowed
/// from the record; the first header that is not UTF-8, if any.
fn read_headers<'m>(message: &'m BorrowedMessage<'_>) -> (Vec<(&'m str, String)>, Option<String>) {
    let Some(raw) = message.headers() else {
        return (Vec::new(), None);
    };
    let mut pairs = Vec::with_capacity(raw.count());
    let mut error = None;
    for index in 0..raw.count() {
        // rdkafka panics on a header key that is not UTF-8; that is outside
        // data and must not take the consumer down.
        let header = std::panic::catch_unwind(AssertUnwindSafe(|| {
            raw.try_get(index)
                .map(|h| (h.key, h.value.unwrap_or_default()))
        }));
        match header {
            Ok(Some((key, value))) => {
                let value = match std::str::from_utf8(value) {
                    Ok(value) => value.to_owned(),
                    Err(_) => {
                        error.get_or_insert_with(|| format!("header {key:?} is not UTF-8"));
                        String::from_utf8_lossy(value).into_owned()
                    }
                };
                pairs.push((key, value));
            }
            Ok(None) => {}
            Err(_) => {
                error.get_or_insert_with(|| format!("header #{index} has a key that is not UTF-8"));
            }
        }
    }
    (pairs, error)
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
pub(crate) struct Deliveries {
    rx: mpsc::Receiver<Item>,
    shared: Arc<Shared>,
}

impl Deliveries {
    /// The stream of what the poll loop sends on `rx`'s channel.
    pub(crate) fn new(rx: mpsc::Receiver<Item>, shared: Arc<Shared>) -> Self {
        Self { rx, shared }
    }
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

    pub(crate) fn seek_fails(topic: &str) -> bool {
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
