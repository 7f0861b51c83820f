//! The individual conformance checks and their helpers.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, SubsecRound, TimeDelta, Utc};
use futures::StreamExt;
use surety_core::consumer::{Incoming, Worker, handler_fn};
use surety_core::{
    Close, Delivery, DeliveryStream, Envelope, Publisher, Receipt, Subscriber, TransportErrorKind,
};
use tokio::time::Instant;
use uuid::Uuid;

use super::{Capabilities, CheckFailure, CheckResult};

/// The `source` of every message the suite publishes.
const SOURCE: &str = "/surety-testkit/conformance";
/// The header carrying a message's sequence number within its key.
const SEQ_HEADER: &str = "x-surety-testkit-seq";

/// Bounds on a loop of receives: one deadline for all, and a count.
struct Batch {
    deadline: Instant,
    limit: Duration,
    max: usize,
    received: usize,
}

/// What one check needs: its name for failures, the transport and the limits.
struct Ctx<'a, T> {
    check: &'static str,
    transport: &'a T,
    caps: &'a Capabilities,
}

enum Settlement {
    Ack,
    NackRequeue,
    Reject,
}

impl fmt::Display for Settlement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ack => "ack",
            Self::NackRequeue => "nack(requeue = true)",
            Self::Reject => "reject",
        })
    }
}

impl<'a, T> Ctx<'a, T> {
    fn new(check: &'static str, transport: &'a T, caps: &'a Capabilities) -> Self {
        Self {
            check,
            transport,
            caps,
        }
    }

    fn fail(&self, expected: impl fmt::Display, seen: impl fmt::Display) -> CheckFailure {
        CheckFailure::new(self.check, expected, seen)
    }

    /// A fresh name: only lowercase letters, digits, dashes and dots, so it
    /// is a valid Kafka topic, AMQP queue and routing key.
    fn name(&self, role: &str) -> String {
        format!(
            "{}.{}.{role}.{}",
            self.caps.name_prefix,
            self.check.replace('_', "-"),
            Uuid::now_v7()
        )
    }

    fn topic(&self) -> String {
        self.name("topic")
    }

    fn group(&self, role: &str) -> String {
        self.name(role)
    }

    /// Runs `op` within the receive timeout.
    async fn within<R>(
        &self,
        what: impl fmt::Display,
        op: impl Future<Output = surety_core::Result<R>>,
    ) -> Result<R, CheckFailure> {
        let limit = self.caps.receive_timeout;
        match tokio::time::timeout(limit, op).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => Err(self.fail(
                format!("{what} to succeed"),
                format!("an error of kind {}: {err}", err.kind()),
            )),
            Err(_) => Err(self.fail(format!("{what} to finish within {limit:?}"), "no answer")),
        }
    }

    async fn settle(&self, delivery: Delivery, how: Settlement) -> CheckResult {
        let what = format!("{how} of message {}", delivery.envelope().id);
        self.within(what, async move {
            match how {
                Settlement::Ack => delivery.ack().await,
                Settlement::NackRequeue => delivery.nack(true).await,
                Settlement::Reject => delivery.reject().await,
            }
        })
        .await
    }

    /// Waits for the next delivery.
    async fn receive(
        &self,
        stream: &mut DeliveryStream,
        what: impl fmt::Display,
    ) -> Result<Delivery, CheckFailure> {
        let limit = self.caps.receive_timeout;
        self.receive_by(stream, Instant::now() + limit, limit, what)
            .await
    }

    /// Waits for the next delivery until `deadline`, which is `limit` after
    /// the start of what is being waited for.
    async fn receive_by(
        &self,
        stream: &mut DeliveryStream,
        deadline: Instant,
        limit: Duration,
        what: impl fmt::Display,
    ) -> Result<Delivery, CheckFailure> {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(Ok(delivery))) => Ok(delivery),
            Ok(Some(Err(err))) => Err(self.fail(
                format!("{what} within {limit:?}"),
                format!("a subscription error of kind {}: {err}", err.kind()),
            )),
            Ok(None) => Err(self.fail(format!("{what} within {limit:?}"), "the subscription end")),
            Err(_) => Err(self.fail(format!("{what} within {limit:?}"), "no delivery")),
        }
    }

    /// Waits for many deliveries: all of them within one receive timeout,
    /// and at most `max` of them, so that a transport redelivering the same
    /// message again and again fails instead of spinning forever.
    fn batch(&self, max: usize) -> Batch {
        Batch {
            deadline: Instant::now() + self.caps.receive_timeout,
            limit: self.caps.receive_timeout,
            max,
            received: 0,
        }
    }

    async fn receive_in(
        &self,
        batch: &mut Batch,
        stream: &mut DeliveryStream,
        what: impl fmt::Display,
    ) -> Result<Delivery, CheckFailure> {
        if batch.received >= batch.max {
            return Err(self.fail(
                format!("{what} in at most {} deliveries", batch.max),
                format!(
                    "{} deliveries, so messages keep being delivered again",
                    batch.received
                ),
            ));
        }
        let delivery = self
            .receive_by(stream, batch.deadline, batch.limit, what)
            .await?;
        batch.received += 1;
        Ok(delivery)
    }

    /// Watches `stream` for the quiet period: nothing may arrive.
    async fn quiet(&self, stream: &mut DeliveryStream, after: impl fmt::Display) -> CheckResult {
        let period = self.caps.quiet_period;
        let expected = format!("no delivery within {period:?} after {after}");
        match tokio::time::timeout(period, stream.next()).await {
            Err(_) => Ok(()),
            Ok(Some(Ok(delivery))) => Err(self.fail(expected, describe(&delivery))),
            Ok(Some(Err(err))) => Err(self.fail(
                expected,
                format!("a subscription error of kind {}: {err}", err.kind()),
            )),
            Ok(None) => Err(self.fail(expected, "the subscription end (it was not closed)")),
        }
    }
}

impl<T: Subscriber> Ctx<'_, T> {
    async fn subscribe(&self, topic: &str, group: &str) -> Result<DeliveryStream, CheckFailure> {
        self.within(
            format!("subscribing to topic {topic} as group {group}"),
            self.transport.subscribe(topic, group),
        )
        .await
    }
}

impl<T: Publisher + Subscriber> Ctx<'_, T> {
    async fn publish(&self, topic: &str, envelope: Envelope) -> Result<Receipt, CheckFailure> {
        self.within(
            format!("publishing message {} to topic {topic}", envelope.id),
            self.transport.publish(topic, envelope),
        )
        .await
    }

    /// Publishes small message number `n` and returns its id.
    async fn publish_one(&self, topic: &str, n: usize) -> Result<String, CheckFailure> {
        let env = Envelope::builder(SOURCE, "surety.testkit.message")
            .header(SEQ_HEADER, n.to_string())
            .payload(format!("{{\"n\":{n}}}"))
            .build();
        let id = env.id.clone();
        self.publish(topic, env).await?;
        Ok(id)
    }

    /// Publishes `count` small messages and returns their ids.
    async fn publish_many(
        &self,
        topic: &str,
        count: usize,
    ) -> Result<HashSet<String>, CheckFailure> {
        let mut ids = HashSet::with_capacity(count);
        for n in 0..count {
            ids.insert(self.publish_one(topic, n).await?);
        }
        Ok(ids)
    }

    /// Subscribes to `topic` as `group`, publishes small message number 0
    /// and waits for it: the subscription, the message's id and its
    /// (unsettled) delivery.
    async fn deliver_one(
        &self,
        topic: &str,
        group: &str,
    ) -> Result<(DeliveryStream, String, Delivery), CheckFailure> {
        let mut stream = self.subscribe(topic, group).await?;
        let id = self.publish_one(topic, 0).await?;
        let delivery = self
            .receive(&mut stream, format!("message {id} to be delivered"))
            .await?;
        Ok((stream, id, delivery))
    }
}

/// A one-line description of a delivery for failure messages.
fn describe(delivery: &Delivery) -> String {
    let info = delivery.info();
    format!(
        "message {} delivered (redelivered: {}, delivery count: {:?})",
        delivery.envelope().id,
        info.redelivered,
        info.delivery_count
    )
}

fn rfc3339(time: &DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Nanos, true)
}

/// The differences between a sent and a received envelope, one line each.
#[derive(Default)]
struct Diffs(Vec<String>);

impl Diffs {
    /// Notes `name` when the value sent and the value received are not equal.
    fn compare<V: PartialEq + fmt::Debug>(&mut self, name: &str, sent: &V, got: &V) {
        if sent != got {
            self.note(name, sent, got);
        }
    }

    fn note(&mut self, name: &str, sent: &dyn fmt::Debug, got: &dyn fmt::Debug) {
        self.0
            .push(format!("{name}: sent {sent:?}, received {got:?}"));
    }
}

/// Every difference between what was sent and what arrived: attributes
/// (time truncated to microseconds), sent headers (the transport may add
/// its own) and the payload.
fn envelope_diffs(sent: &Envelope, got: &Envelope) -> Vec<String> {
    let mut diffs = Diffs::default();
    diffs.compare("id", &sent.id, &got.id);
    diffs.compare("source", &sent.source, &got.source);
    diffs.compare("type", &sent.event_type, &got.event_type);
    if sent.time.trunc_subsecs(6) != got.time.trunc_subsecs(6) {
        let (sent, got) = (rfc3339(&sent.time), rfc3339(&got.time));
        diffs.note("time (to the microsecond)", &sent, &got);
    }
    diffs.compare("content type", &sent.content_type, &got.content_type);
    diffs.compare("schema version", &sent.schema_version, &got.schema_version);
    diffs.compare("subject", &sent.subject, &got.subject);
    diffs.compare("partition key", &sent.partition_key, &got.partition_key);
    diffs.compare("correlation id", &sent.correlation_id, &got.correlation_id);
    diffs.compare("causation id", &sent.causation_id, &got.causation_id);
    for (key, value) in sent.headers.iter() {
        let name = format!("header {key:?}");
        diffs.compare(&name, &Some(value), &got.headers.get(key));
    }
    if sent.payload != got.payload {
        let first = sent
            .payload
            .iter()
            .zip(got.payload.iter())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| sent.payload.len().min(got.payload.len()));
        let byte = |p: &[u8]| {
            p.get(first)
                .map_or("end".to_owned(), |b| format!("0x{b:02x}"))
        };
        diffs.0.push(format!(
            "payload: sent {} bytes, received {} bytes, first difference at byte {first} (sent {}, received {})",
            sent.payload.len(),
            got.payload.len(),
            byte(&sent.payload),
            byte(&got.payload)
        ));
    }
    diffs.0
}

/// Publishes `sent`, receives it and compares everything.
async fn round_trip<T: Publisher + Subscriber>(cx: &Ctx<'_, T>, sent: Envelope) -> CheckResult {
    let topic = cx.topic();
    let mut stream = cx.subscribe(&topic, &cx.group("group")).await?;
    cx.publish(&topic, sent.clone()).await?;
    let got = cx
        .receive(&mut stream, format!("message {} to be delivered", sent.id))
        .await?;
    let diffs = envelope_diffs(&sent, got.envelope());
    cx.settle(got, Settlement::Ack).await?;
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(cx.fail(
            "the delivered envelope to equal the published one",
            diffs.join("; "),
        ))
    }
}

/// Publish one message with every envelope attribute set and receive it:
/// id, source, type, time (compared to the microsecond; the published time
/// has nanoseconds, which a broker may drop), content type, schema version,
/// subject, partition key, correlation id and causation id arrive unchanged.
pub async fn attributes_round_trip<T>(transport: &T, caps: &Capabilities) -> CheckResult
where
    T: Publisher + Subscriber,
{
    let cx = Ctx::new("attributes_round_trip", transport, caps);
    let unique = Uuid::now_v7();
    let time = Utc::now().trunc_subsecs(6) + TimeDelta::nanoseconds(789);
    let sent = Envelope::builder(SOURCE, "surety.testkit.attributes")
        .id(format!("attributes-{unique}"))
        .time(time)
        .content_type("application/vnd.surety-testkit+json")
        .schema_version(7)
        .subject(format!("subject-{unique}"))
        .partition_key(format!("key-{unique}"))
        .correlation_id(format!("correlation-{unique}"))
        .causation_id(format!("causation-{unique}"))
        .payload(r#"{"check":"attributes_round_trip"}"#)
        .build();
    round_trip(&cx, sent).await
}

/// Headers (including an empty value and non-ASCII text) and a binary
/// payload holding every byte value `0..=255` arrive unchanged. The
/// transport may add headers of its own.
pub async fn headers_and_binary_payload<T>(transport: &T, caps: &Capabilities) -> CheckResult
where
    T: Publisher + Subscriber,
{
    let cx = Ctx::new("headers_and_binary_payload", transport, caps);
    let payload: Vec<u8> = (0..=255u8).collect();
    let sent = Envelope::builder(SOURCE, "surety.testkit.binary")
        .content_type("application/octet-stream")
        .header("x-surety-testkit-tenant", "acme")
        .header("x-surety-testkit-text", "grüße, 東京 ✓")
        .header("x-surety-testkit-spaces", " padded value ")
        .header("x-surety-testkit-empty", "")
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .payload(payload)
        .build();
    round_trip(&cx, sent).await
}

/// An acknowledged message is not delivered again, not even after the
/// consumer left the group and joined again: a marker published then is the
/// new member's first delivery.
pub async fn ack_removes_message<T>(transport: &T, caps: &Capabilities) -> CheckResult
where
    T: Publisher + Subscriber,
{
    let cx = Ctx::new("ack_removes_message", transport, caps);
    let (topic, group) = (cx.topic(), cx.group("group"));
    let (stream, id, delivery) = cx.deliver_one(&topic, &group).await?;
    cx.settle(delivery, Settlement::Ack).await?;
    let after = format!("message {id} was acknowledged");
    settled_for_good(&cx, stream, &topic, &group, after).await
}

/// After a final settlement: leaves the group and joins it again, publishes
/// a marker and expects it to be the new member's first delivery. A
/// settlement the broker never applied shows up at the latest when the
/// member holding the message leaves, since its unsettled deliveries go
/// back to the group, ahead of a message published after that.
async fn settled_for_good<T: Publisher + Subscriber>(
    cx: &Ctx<'_, T>,
    stream: DeliveryStream,
    topic: &str,
    group: &str,
    after: String,
) -> CheckResult {
    drop(stream);
    let mut rejoined = cx.subscribe(topic, group).await?;
    let marker = Envelope::builder(SOURCE, "surety.testkit.marker").build();
    let marker_id = marker.id.clone();
    cx.publish(topic, marker).await?;
    let first = cx
        .receive(&mut rejoined, format!("marker {marker_id} to be delivered"))
        .await?;
    if first.envelope().id != marker_id {
        return Err(cx.fail(
            format!(
                "nothing before marker {marker_id} after {after} and the group was left and joined again"
            ),
            describe(&first),
        ));
    }
    cx.settle(first, Settlement::Ack).await
}

/// A message nacked with `requeue = true` is delivered again; with
/// [`redelivered_flag`](Capabilities::redelivered_flag) the redelivery is
/// marked redelivered, with [`delivery_count`](Capabilities::delivery_count)
/// the counts are 1 and then 2.
pub async fn nack_requeue_redelivers<T>(transport: &T, caps: &Capabilities) -> CheckResult
where
    T: Publisher + Subscriber,
{
    let cx = Ctx::new("nack_requeue_redelivers", transport, caps);
    let (mut stream, id, first) = cx.deliver_one(&cx.topic(), &cx.group("group")).await?;
    check_first_delivery(&cx, &first)?;
    cx.settle(first, Settlement::NackRequeue).await?;
    receive_redelivery(&cx, &mut stream, &id, "nack(requeue = true)").await
}

/// A rejected message is not delivered again, not even after the consumer
/// left the group and joined again: a marker published then is the new
/// member's first delivery.
pub async fn reject_does_not_redeliver<T>(transport: &T, caps: &Capabilities) -> CheckResult
where
    T: Publisher + Subscriber,
{
    let cx = Ctx::new("reject_does_not_redeliver", transport, caps);
    let (topic, group) = (cx.topic(), cx.group("group"));
    let (stream, id, delivery) = cx.deliver_one(&topic, &group).await?;
    cx.settle(delivery, Settlement::Reject).await?;
    let after = format!("message {id} was rejected");
    settled_for_good(&cx, stream, &topic, &group, after).await
}

/// A delivery dropped without being settled, while the subscription stays
/// open, is delivered again (marked as a redelivery as the capabilities say).
pub async fn dropped_delivery_redelivered<T>(transport: &T, caps: &Capabilities) -> CheckResult
where
    T: Publisher + Subscriber,
{
    let cx = Ctx::new("dropped_delivery_redelivered", transport, caps);
    let (mut stream, id, first) = cx.deliver_one(&cx.topic(), &cx.group("group")).await?;
    check_first_delivery(&cx, &first)?;
    drop(first);
    receive_redelivery(&cx, &mut stream, &id, "its delivery was dropped unsettled").await
}

fn check_first_delivery<T>(cx: &Ctx<'_, T>, first: &Delivery) -> CheckResult {
    let info = first.info();
    if cx.caps.redelivered_flag && info.redelivered {
        return Err(cx.fail(
            "a first delivery not to be marked redelivered",
            describe(first),
        ));
    }
    if cx.caps.delivery_count && info.delivery_count != Some(1) {
        return Err(cx.fail(
            "delivery count Some(1) on a first delivery",
            describe(first),
        ));
    }
    Ok(())
}

/// Waits for message `id` to be delivered again on `stream` after `after`,
/// checks the redelivery with [`check_redelivery`] and acks it.
async fn receive_redelivery<T>(
    cx: &Ctx<'_, T>,
    stream: &mut DeliveryStream,
    id: &str,
    after: &str,
) -> CheckResult {
    let again = cx
        .receive(
            stream,
            format!("message {id} to be delivered again after {after}"),
        )
        .await?;
    let result = check_redelivery(cx, &again, id);
    cx.settle(again, Settlement::Ack).await?;
    result
}

fn check_redelivery<T>(cx: &Ctx<'_, T>, again: &Delivery, id: &str) -> CheckResult {
    let info = again.info();
    if again.envelope().id != id {
        return Err(cx.fail(format!("message {id} again"), describe(again)));
    }
    if cx.caps.redelivered_flag && !info.redelivered {
        return Err(cx.fail("the redelivery to be marked redelivered", describe(again)));
    }
    if cx.caps.delivery_count && info.delivery_count != Some(2) {
        return Err(cx.fail("delivery count Some(2) on the redelivery", describe(again)));
    }
    Ok(())
}

/// Publishes `keys` × `per_key` messages interleaved by key (`key-0`,
/// `key-1`, ...) with their sequence number in [`SEQ_HEADER`], as one
/// window of sends, then awaits every confirmation.
async fn publish_keyed<T: Publisher>(
    cx: &Ctx<'_, T>,
    topic: &str,
    keys: usize,
    per_key: usize,
) -> CheckResult {
    let mut confirmations = Vec::with_capacity(keys * per_key);
    for n in 0..keys * per_key {
        let (key, seq) = (format!("key-{}", n % keys), n / keys);
        let env = Envelope::builder(SOURCE, "surety.testkit.ordered")
            .partition_key(key)
            .header(SEQ_HEADER, seq.to_string())
            .build();
        let what = format!("sending message {} to topic {topic}", env.id);
        confirmations.push(cx.within(what, cx.transport.send(topic, env)).await?);
    }
    for (n, confirmation) in confirmations.into_iter().enumerate() {
        cx.within(format!("the confirmation of send #{n}"), confirmation)
            .await?;
    }
    Ok(())
}

/// Checks that each of `keys` keys arrived once each as `0..per_key`.
fn check_sequences<T>(
    cx: &Ctx<'_, T>,
    by_key: &BTreeMap<String, Vec<usize>>,
    keys: usize,
    per_key: usize,
    what: &str,
) -> CheckResult {
    let expected: Vec<usize> = (0..per_key).collect();
    let wrong: Vec<String> = by_key
        .iter()
        .filter(|(_, seqs)| **seqs != expected)
        .map(|(key, seqs)| format!("{key}: {seqs:?}"))
        .collect();
    if wrong.is_empty() && by_key.len() == keys {
        return Ok(());
    }
    Err(cx.fail(
        format!("each of {keys} keys {what} as the sequence {expected:?}"),
        if wrong.is_empty() {
            format!("only the keys {:?}", by_key.keys().collect::<Vec<_>>())
        } else {
            wrong.join("; ")
        },
    ))
}

/// 50 messages over 5 partition keys, sent as one window of
/// [`send`](Publisher::send)s and then confirmed, arrive with each key's
/// messages in publish order, each exactly once.
pub async fn per_key_order<T>(transport: &T, caps: &Capabilities) -> CheckResult
where
    T: Publisher + Subscriber,
{
    const KEYS: usize = 5;
    const PER_KEY: usize = 10;
    let cx = Ctx::new("per_key_order", transport, caps);
    let topic = cx.topic();
    let mut stream = cx.subscribe(&topic, &cx.group("group")).await?;
    publish_keyed(&cx, &topic, KEYS, PER_KEY).await?;
    let mut by_key: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let mut batch = cx.batch(KEYS * PER_KEY);
    for received in 0..KEYS * PER_KEY {
        let delivery = cx
            .receive_in(
                &mut batch,
                &mut stream,
                format!("{} messages (received {received})", KEYS * PER_KEY),
            )
            .await?;
        let env = delivery.envelope();
        let seq = env.headers.get(SEQ_HEADER).and_then(|s| s.parse().ok());
        let (Some(key), Some(seq)) = (env.partition_key.clone(), seq) else {
            return Err(cx.fail(
                format!("a partition key and a {SEQ_HEADER} header on every message"),
                format!(
                    "message {} with partition key {:?} and {SEQ_HEADER} {:?}",
                    env.id,
                    env.partition_key,
                    env.headers.get(SEQ_HEADER)
                ),
            ));
        };
        by_key.entry(key).or_default().push(seq);
        cx.settle(delivery, Settlement::Ack).await?;
    }
    check_sequences(&cx, &by_key, KEYS, PER_KEY, "to arrive")
}

/// A [`Worker`] handling 8 deliveries at once with a slow handler, over 60
/// messages of 5 partition keys published interleaved as one window: no two
/// messages of one key are handled at the same time, each key's messages
/// are handled in publish order, and each message once. Different keys do
/// run in parallel, whatever order and concurrency the transport hands
/// deliveries out in: the worker keeps the order, not the transport.
pub async fn worker_per_key_order<T>(transport: &T, caps: &Capabilities) -> CheckResult
where
    T: Publisher + Subscriber,
{
    const KEYS: usize = 5;
    const PER_KEY: usize = 12;
    const TOTAL: usize = KEYS * PER_KEY;
    let cx = Ctx::new("worker_per_key_order", transport, caps);
    let topic = cx.topic();
    let stream = cx.subscribe(&topic, &cx.group("group")).await?;
    publish_keyed(&cx, &topic, KEYS, PER_KEY).await?;

    #[derive(Default)]
    struct Seen {
        running: HashMap<String, u32>,
        most_at_once: usize,
        overlaps: Vec<String>,
        by_key: BTreeMap<String, Vec<usize>>,
        handled: usize,
    }
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let record = Arc::clone(&seen);
    let handler = handler_fn(move |msg: Incoming| {
        let seen = Arc::clone(&record);
        async move {
            let key = msg.envelope.partition_key.clone().unwrap_or_default();
            let seq = msg
                .envelope
                .headers
                .get(SEQ_HEADER)
                .and_then(|s| s.parse::<usize>().ok())
                .unwrap_or(usize::MAX);
            {
                let mut seen = seen.lock().unwrap_or_else(PoisonError::into_inner);
                let running = seen.running.entry(key.clone()).or_default();
                *running += 1;
                if *running > 1 {
                    seen.overlaps.push(format!("{key} #{seq}"));
                }
                let at_once = seen.running.values().filter(|n| **n > 0).count();
                seen.most_at_once = seen.most_at_once.max(at_once);
            }
            // Simulated work, long enough for deliveries to pile up.
            tokio::time::sleep(Duration::from_millis(3)).await;
            let mut seen = seen.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(running) = seen.running.get_mut(&key) {
                *running -= 1;
            }
            seen.by_key.entry(key).or_default().push(seq);
            seen.handled += 1;
            Ok::<_, std::convert::Infallible>(())
        }
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(Worker::new(handler).concurrency(8).run(stream, async {
        stopped.await.ok();
    }));
    let deadline = Instant::now() + cx.caps.receive_timeout * 2;
    let handled =
        |seen: &Arc<Mutex<Seen>>| seen.lock().unwrap_or_else(PoisonError::into_inner).handled;
    while handled(&seen) < TOTAL && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Anything more (a duplicate) shows within the quiet period.
    tokio::time::sleep(cx.caps.quiet_period).await;
    stop.send(()).ok();
    let _ = tokio::time::timeout(cx.caps.receive_timeout, worker).await;

    let seen = seen.lock().unwrap_or_else(PoisonError::into_inner);
    if seen.handled < TOTAL {
        return Err(cx.fail(
            format!(
                "{TOTAL} messages handled within {:?}",
                cx.caps.receive_timeout * 2
            ),
            format!("{} handled", seen.handled),
        ));
    }
    if !seen.overlaps.is_empty() {
        return Err(cx.fail(
            "no two messages of one key handled at the same time",
            format!(
                "handled while another of their key ran: {}",
                seen.overlaps.join(", ")
            ),
        ));
    }
    check_sequences(&cx, &seen.by_key, KEYS, PER_KEY, "handled once each")?;
    if seen.most_at_once < 2 {
        return Err(cx.fail(
            "different keys handled in parallel",
            "at most one key at a time",
        ));
    }
    Ok(())
}

/// Receives from `stream` until every id in `expected` arrived, acking each
/// delivery; returns every id received, duplicates included.
async fn collect<T>(
    cx: &Ctx<'_, T>,
    stream: &mut DeliveryStream,
    expected: &HashSet<String>,
    what: &str,
) -> Result<Vec<String>, CheckFailure> {
    let mut received = Vec::new();
    let mut missing = expected.clone();
    let mut batch = cx.batch(expected.len() * 3);
    while !missing.is_empty() {
        let delivery = cx
            .receive_in(
                &mut batch,
                stream,
                format!(
                    "{what}: {} more of {} messages ({} received so far)",
                    missing.len(),
                    expected.len(),
                    received.len()
                ),
            )
            .await?;
        let id = delivery.envelope().id.clone();
        missing.remove(&id);
        received.push(id);
        cx.settle(delivery, Settlement::Ack).await?;
    }
    Ok(received)
}

/// Ids that occur more than once, and ids that were not expected.
fn surplus(received: &[String], expected: &HashSet<String>) -> Vec<String> {
    let mut seen = HashSet::new();
    received
        .iter()
        .filter(|id| !seen.insert(id.as_str()) || !expected.contains(*id))
        .cloned()
        .collect()
}

/// Two groups on one topic each receive every message, once.
pub async fn fan_out_to_groups<T>(transport: &T, caps: &Capabilities) -> CheckResult
where
    T: Publisher + Subscriber,
{
    const COUNT: usize = 10;
    let cx = Ctx::new("fan_out_to_groups", transport, caps);
    let topic = cx.topic();
    let mut first = cx.subscribe(&topic, &cx.group("first")).await?;
    let mut second = cx.subscribe(&topic, &cx.group("second")).await?;
    let expected = cx.publish_many(&topic, COUNT).await?;
    for (name, stream) in [("first group", &mut first), ("second group", &mut second)] {
        let received = collect(&cx, stream, &expected, name).await?;
        let extra = surplus(&received, &expected);
        if !extra.is_empty() {
            return Err(cx.fail(
                format!("the {name} to receive each of {COUNT} messages once"),
                format!("these extra deliveries: {extra:?}"),
            ));
        }
    }
    let mut both = futures::stream::select(first, second).boxed();
    cx.quiet(
        &mut both,
        "both groups received and acknowledged every message",
    )
    .await
}

/// Two subscriptions in one group compete: each message goes to one of
/// them, so the two sets of messages are disjoint and together hold every
/// message. (Both need not get some: a broker may give all to one.)
pub async fn competing_consumers<T>(transport: &T, caps: &Capabilities) -> CheckResult
where
    T: Publisher + Subscriber,
{
    const COUNT: usize = 20;
    let cx = Ctx::new("competing_consumers", transport, caps);
    let topic = cx.topic();
    let group = cx.group("group");
    let first = cx.subscribe(&topic, &group).await?;
    let second = cx.subscribe(&topic, &group).await?;
    let expected = cx.publish_many(&topic, COUNT).await?;

    // Tag each delivery with the member that got it.
    let tagged = |stream: DeliveryStream, member: &'static str| {
        stream.map(move |item| {
            item.map(|delivery| {
                let (mut env, info, settle) = delivery.into_parts();
                env.headers.insert("x-surety-testkit-member", member);
                Delivery::new(env, info, settle)
            })
        })
    };
    let mut both =
        futures::stream::select(tagged(first, "first"), tagged(second, "second")).boxed();
    let mut members: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut missing = expected.clone();
    let mut received = Vec::new();
    let mut batch = cx.batch(COUNT * 3);
    while !missing.is_empty() {
        let delivery = cx
            .receive_in(
                &mut batch,
                &mut both,
                format!(
                    "{} more of {COUNT} messages from the two members ({} received so far)",
                    missing.len(),
                    received.len()
                ),
            )
            .await?;
        let env = delivery.envelope();
        let member = env.headers.get("x-surety-testkit-member").unwrap_or("?");
        members
            .entry(member.to_owned())
            .or_default()
            .push(env.id.clone());
        missing.remove(&env.id);
        received.push(env.id.clone());
        cx.settle(delivery, Settlement::Ack).await?;
    }
    let extra = surplus(&received, &expected);
    if !extra.is_empty() {
        let split: Vec<String> = members
            .iter()
            .map(|(member, ids)| format!("{member} member got {}", ids.len()))
            .collect();
        return Err(cx.fail(
            format!("each of {COUNT} messages to go to exactly one member of the group"),
            format!(
                "these delivered more than once: {extra:?} ({})",
                split.join(", ")
            ),
        ));
    }
    cx.quiet(
        &mut both,
        "every message was received by one member and acknowledged",
    )
    .await
}

/// Closing twice succeeds both times.
pub async fn close_is_idempotent<T>(transport: &T, caps: &Capabilities) -> CheckResult
where
    T: Close,
{
    let cx = Ctx::new("close_is_idempotent", transport, caps);
    cx.within("the first close", transport.close()).await?;
    cx.within("a second close", transport.close()).await
}

/// Publishing after close fails with
/// [`TransportErrorKind::Closed`].
pub async fn publish_after_close_fails<T>(transport: &T, caps: &Capabilities) -> CheckResult
where
    T: Publisher + Close,
{
    let cx = Ctx::new("publish_after_close_fails", transport, caps);
    let topic = cx.topic();
    cx.within("close", transport.close()).await?;
    let env = Envelope::builder(SOURCE, "surety.testkit.closed").build();
    let limit = caps.receive_timeout;
    let expected = format!(
        "publish after close to fail with kind {}",
        TransportErrorKind::Closed
    );
    match tokio::time::timeout(limit, transport.publish(&topic, env)).await {
        Ok(Err(err)) if err.kind() == TransportErrorKind::Closed => Ok(()),
        Ok(Err(err)) => Err(cx.fail(expected, format!("an error of kind {}: {err}", err.kind()))),
        Ok(Ok(receipt)) => Err(cx.fail(expected, format!("a confirmed publish: {receipt:?}"))),
        Err(_) => Err(cx.fail(expected, format!("no answer within {limit:?}"))),
    }
}

/// A subscription ends (or yields a
/// [`Closed`](TransportErrorKind::Closed) error) when its transport is closed.
pub async fn close_ends_subscriptions<T>(transport: &T, caps: &Capabilities) -> CheckResult
where
    T: Subscriber + Close,
{
    let cx = Ctx::new("close_ends_subscriptions", transport, caps);
    let mut stream = cx.subscribe(&cx.topic(), &cx.group("group")).await?;
    cx.within("close", transport.close()).await?;
    let limit = caps.receive_timeout;
    let expected = format!("the subscription to end within {limit:?} after close");
    match tokio::time::timeout(limit, stream.next()).await {
        Ok(None) => Ok(()),
        Ok(Some(Err(err))) if err.kind() == TransportErrorKind::Closed => Ok(()),
        Ok(Some(Err(err))) => {
            Err(cx.fail(expected, format!("an error of kind {}: {err}", err.kind())))
        }
        Ok(Some(Ok(delivery))) => Err(cx.fail(expected, describe(&delivery))),
        Err(_) => Err(cx.fail(expected, "the subscription still open")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_use_only_safe_characters() {
        let caps = Capabilities::default();
        let cx = Ctx::new("attributes_round_trip", &(), &caps);
        let name = cx.topic();
        assert!(
            name.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.'),
            "{name}"
        );
        assert_ne!(name, cx.topic(), "names are unique");
    }

    #[test]
    fn diffs_name_the_field_and_both_values() {
        let sent = Envelope::builder("/a", "t")
            .subject("s")
            .header("h", "v")
            .payload(vec![1u8, 2, 3])
            .build();
        let mut got = sent.clone();
        got.subject = None;
        got.headers = Default::default();
        got.payload = vec![1u8, 9].into();
        got.time = sent.time.trunc_subsecs(6) + TimeDelta::nanoseconds(999);
        let diffs = envelope_diffs(&sent, &got);
        assert_eq!(diffs.len(), 3, "{diffs:?}");
        assert_eq!(diffs[0], r#"subject: sent Some("s"), received None"#);
        assert_eq!(diffs[1], r#"header "h": sent Some("v"), received None"#);
        assert_eq!(
            diffs[2],
            "payload: sent 3 bytes, received 2 bytes, first difference at byte 1 (sent 0x02, received 0x09)"
        );
    }

    #[test]
    fn time_is_compared_to_the_microsecond() {
        let sent = Envelope::builder("/a", "t").build();
        let mut got = sent.clone();
        got.time = sent.time.trunc_subsecs(6) + TimeDelta::microseconds(1);
        let diffs = envelope_diffs(&sent, &got);
        assert_eq!(diffs.len(), 1, "{diffs:?}");
        assert!(diffs[0].starts_with("time"), "{diffs:?}");
    }

    #[test]
    fn surplus_finds_duplicates_and_strangers() {
        let expected: HashSet<String> = ["a", "b"].map(String::from).into();
        let received = ["a", "b", "a", "c"].map(String::from);
        assert_eq!(surplus(&received, &expected), ["a", "c"]);
    }
}
