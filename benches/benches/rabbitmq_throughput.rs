//! RabbitMQ throughput: surety-rabbitmq's `RabbitTransport` against raw
//! lapin on the same broker, in one process, in interleaved rounds (see
//! `surety_benches::load` and `docs/benchmarks.md`).
//!
//! - **publish**: N persistent, `mandatory` messages with publisher confirms
//!   and a window of 1 024 unconfirmed (the adapter's default
//!   `max_in_flight`), to a durable queue bound to the topic on the durable
//!   topic exchange. Raw: a lapin channel in confirm mode on its own
//!   connection, `basic_publish` of pre-encoded properties and payload (the
//!   bytes the adapter writes: CloudEvents headers plus AMQP properties),
//!   awaiting each `PublisherConfirm` and checking it is an ack with nothing
//!   returned. Adapter: `RabbitTransport::send` per envelope, then every
//!   `Confirmation`. Clock: first publish to last confirm.
//! - **consume**: N messages pre-published to each of three durable queues,
//!   one consumed raw, one raw again (the control) and one by the adapter, both with prefetch 64 (the
//!   adapter's default) and a manual `basic.ack` per message. Raw:
//!   `basic_consume` and `Acker::ack`. Adapter: the `Subscriber` stream and
//!   `Delivery::ack`. Clock: first message received to the last one acked.
//!
//! Every round runs each path three times with equal work and settings:
//! raw, raw again (the control, whose spread is the noise) and the adapter.
//!
//! `cargo bench -p surety-benches --bench rabbitmq_throughput` for the full
//! run; `cargo test -p surety-benches --benches` for a smoke run. Needs
//! `SURETY_AMQP_URL` (skipped without, unless `SURETY_REQUIRE_SERVICES` is
//! set). Queues are deleted after each round.

use std::time::Duration;

use futures::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use surety_benches::load::{
    Clock, Comparison, Report, Sample, Settings, Trial, Window, adapter_consume, adapter_publish,
    envelopes, measure_rounds, run_main, stalled, unique_suffix, within,
};
use surety_core::{Close, Envelope};
use surety_rabbitmq::{
    DEFAULT_MAX_IN_FLIGHT, DEFAULT_PREFETCH, RabbitConfig, RabbitTransport, queue_name,
};
use surety_testkit::services;

/// Messages per publish measurement in a full run.
const PUBLISH_MESSAGES: usize = 20_000;
/// Messages per consume measurement in a full run.
const CONSUME_MESSAGES: usize = 20_000;
/// Measured rounds in a full run.
const ROUNDS: usize = 6;
/// The exchange of the run (the adapter's is `surety` by default; a
/// separate one keeps the benchmark apart from tests).
const EXCHANGE: &str = "surety.bench";
/// Publishes awaiting their confirm, for both clients.
const WINDOW: usize = DEFAULT_MAX_IN_FLIGHT;
/// Unacknowledged deliveries per consumer, for both clients.
const PREFETCH: u16 = DEFAULT_PREFETCH;
/// Upper bound on any one step; a stuck step fails the run.
const STEP_LIMIT: Duration = Duration::from_secs(300);
/// The consumer group (queue suffix) the adapter consumes as.
const ADAPTER_GROUP: &str = "adapter";

fn main() {
    run_main(
        || services::require(services::amqp_url()),
        PUBLISH_MESSAGES,
        CONSUME_MESSAGES,
        ROUNDS,
        run,
    );
}

/// A message as plain strings and bytes, prepared before the clock: what a
/// raw lapin publisher of the same message would have in hand. The raw
/// client builds its AMQP properties from it on the clock ([`properties`]).
struct PlainMessage {
    headers: Vec<(String, String)>,
    id: String,
    event_type: String,
    source: String,
    content_type: String,
    correlation_id: Option<String>,
    timestamp: Option<u64>,
    payload: bytes::Bytes,
}

/// The adapter's wire format for `envelope` as plain data: every
/// `Envelope::to_binary` header, and the attributes the adapter copies into
/// AMQP properties. Runs before the clock.
fn plain_message(envelope: Envelope) -> PlainMessage {
    let (headers, _) = envelope.to_binary();
    PlainMessage {
        headers: headers.into_iter().collect(),
        timestamp: u64::try_from(envelope.time.timestamp()).ok(),
        id: envelope.id,
        event_type: envelope.event_type,
        source: envelope.source,
        content_type: envelope.content_type,
        correlation_id: envelope.correlation_id,
        payload: envelope.payload,
    }
}

/// [`plain_message`] for each envelope.
fn plain_messages(batch: Vec<Envelope>) -> Vec<PlainMessage> {
    batch.into_iter().map(plain_message).collect()
}

/// The AMQP properties the adapter writes, built by raw lapin from plain
/// data: every header as a long string, persistent delivery mode, and
/// `message_id`, `type`, `app_id`, `content_type`, `correlation_id`,
/// `timestamp`.
fn properties(message: &PlainMessage) -> BasicProperties {
    let mut table = FieldTable::default();
    for (key, value) in &message.headers {
        table.insert(
            ShortString::from(key.as_str()),
            AMQPValue::LongString(LongString::from(value.as_str())),
        );
    }
    let mut props = BasicProperties::default()
        .with_headers(table)
        .with_delivery_mode(2)
        .with_message_id(ShortString::from(message.id.as_str()))
        .with_type(ShortString::from(message.event_type.as_str()))
        .with_app_id(ShortString::from(message.source.as_str()))
        .with_content_type(ShortString::from(message.content_type.as_str()));
    if let Some(correlation) = &message.correlation_id {
        props = props.with_correlation_id(ShortString::from(correlation.as_str()));
    }
    if let Some(seconds) = message.timestamp {
        props = props.with_timestamp(seconds);
    }
    props
}

struct Bench {
    settings: Settings,
    run: String,
    raw: Connection,
    /// Declares and deletes queues.
    setup: Channel,
    /// The raw publisher, in confirm mode.
    publisher: Channel,
    adapter: RabbitTransport,
}

async fn run(url: String, settings: Settings) -> Report {
    let raw = within(STEP_LIMIT, "connecting raw lapin", async {
        Connection::connect(&url, ConnectionProperties::default())
            .await
            .expect("raw lapin connects to RabbitMQ")
    })
    .await;
    let setup = raw.create_channel().await.expect("a setup channel");
    setup
        .exchange_declare(
            EXCHANGE.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("the exchange is declared");
    let publisher = raw.create_channel().await.expect("a publisher channel");
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    let config = RabbitConfig::new(&url)
        .exchange(EXCHANGE)
        .prefetch(PREFETCH)
        .max_in_flight(WINDOW)
        .connection_name("surety-bench");
    let adapter = within(STEP_LIMIT, "connecting the adapter", async {
        RabbitTransport::connect(config)
            .await
            .expect("the adapter connects to RabbitMQ")
    })
    .await;
    let bench = Bench {
        settings: settings.clone(),
        run: unique_suffix(),
        raw,
        setup,
        publisher,
        adapter,
    };

    let rows = measure_rounds(
        &settings,
        [Comparison::new("publish")],
        |round, n| bench.publish_round(round, n).map(|trial| [trial]),
        |round, n| bench.consume_round(round, n),
    )
    .await;
    bench.finish().await;

    settings.report(
        format!(
            "RabbitMQ at {}: surety-rabbitmq vs raw lapin",
            services::host_port(&url).unwrap_or_default()
        ),
        "persistent, durable classic queues",
        [
            format!(
                "publish: mandatory, publisher confirms, window {WINDOW} unconfirmed; \
                 one connection per client"
            ),
            format!("consume: prefetch {PREFETCH}, manual ack per message"),
        ],
        rows,
    )
}

impl Bench {
    fn name(&self, what: &str, round: usize) -> String {
        format!("surety-bench.{}.r{round}.{what}", self.run)
    }

    /// Declares the durable `queue` (as the adapter would) bound to `topic`.
    async fn declare(&self, queue: &str, topic: &str) {
        self.setup
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("the queue is declared");
        self.setup
            .queue_bind(
                queue.into(),
                EXCHANGE.into(),
                topic.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("the queue is bound");
    }

    async fn delete(&self, queue: &str) {
        if let Err(err) = self
            .setup
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await
        {
            eprintln!("note: deleting queue {queue} failed: {err}");
        }
    }

    /// Publishes `n` raw, `n` raw again (the control) and `n` through the
    /// adapter, each to its own topic and queue.
    async fn publish_round(&self, round: usize, n: usize) -> Trial {
        let (payload, keys) = (self.settings.payload, self.settings.keys);
        let topics = ["publish-raw", "publish-control", "publish-adapter"]
            .map(|what| self.name(what, round));
        let sinks = topics.clone().map(|topic| queue_name(&topic, "sink"));
        for (sink, topic) in sinks.iter().zip(&topics) {
            self.declare(sink, topic).await;
        }
        let raw = |topic: &str| {
            let messages = plain_messages(envelopes(n, payload, keys));
            let topic = topic.to_owned();
            async move { raw_publish(&self.publisher, &topic, messages).await }
        };
        let trial = self
            .settings
            .trial(
                round % 2 == 1,
                STEP_LIMIT,
                "publish",
                || raw(&topics[0]),
                || raw(&topics[1]),
                || {
                    let batch = envelopes(n, payload, keys);
                    adapter_publish(&self.adapter, &topics[2], batch, WINDOW)
                },
            )
            .await;
        for sink in &sinks {
            self.delete(sink).await;
        }
        self.settings.pause().await;
        trial
    }

    /// Pre-publishes `n` messages to each of three queues (their own
    /// topics, so that they share no message bodies in the broker's store),
    /// lets the broker settle, then consumes one raw, one raw again (the
    /// control) and the third through the adapter.
    async fn consume_round(&self, round: usize, n: usize) -> Trial {
        let (payload, keys) = (self.settings.payload, self.settings.keys);
        let raw_topic = self.name("consume-raw", round);
        let control_topic = self.name("consume-control", round);
        let topic = self.name("consume-adapter", round);
        let raw_queue = queue_name(&raw_topic, "raw");
        let control_queue = queue_name(&control_topic, "raw");
        let adapter_queue = queue_name(&topic, ADAPTER_GROUP);
        self.declare(&raw_queue, &raw_topic).await;
        self.declare(&control_queue, &control_topic).await;
        self.declare(&adapter_queue, &topic).await;
        // Filled in the order they are consumed, so that each queue is about
        // as old when its consumer starts (a queue consumed right after it
        // was filled is slower: the broker is still settling it).
        let raw_first = round % 2 == 1;
        let order = if raw_first {
            [&raw_topic, &control_topic, &topic]
        } else {
            [&topic, &control_topic, &raw_topic]
        };
        for target in order {
            let messages = plain_messages(envelopes(n, payload, keys));
            within(
                STEP_LIMIT,
                "pre-publishing for consume",
                raw_publish(&self.publisher, target, messages),
            )
            .await;
        }
        for _ in 0..4 {
            self.settings.pause().await;
        }
        let trial = self
            .settings
            .trial(
                raw_first,
                STEP_LIMIT,
                "consume",
                || raw_consume(&self.raw, &raw_queue, n),
                || raw_consume(&self.raw, &control_queue, n),
                || adapter_consume(&self.adapter, &topic, ADAPTER_GROUP, n),
            )
            .await;
        for queue in [&raw_queue, &control_queue, &adapter_queue] {
            self.delete(queue).await;
        }
        self.settings.pause().await;
        trial
    }

    async fn finish(self) {
        within(STEP_LIMIT, "closing the adapter", async {
            self.adapter.close().await.expect("the adapter closes");
        })
        .await;
        // The exchange stays (declared durable, idempotently, by every run).
        let _ = self.raw.close(200, "surety-bench: done".into()).await;
    }
}

/// Publishes `messages` to `topic` with up to [`WINDOW`] unconfirmed and
/// awaits every confirm.
async fn raw_publish(channel: &Channel, topic: &str, messages: Vec<PlainMessage>) -> Sample {
    let n = messages.len();
    let mut in_flight = Window::new(WINDOW);
    let check = |confirmed: lapin::Result<lapin::Confirmation>| {
        let confirmation = confirmed.expect("a raw publisher confirm");
        assert!(confirmation.is_ack(), "the broker nacked a raw publish");
        assert!(
            confirmation.take_message().is_none(),
            "the broker returned a raw publish"
        );
    };
    let clock = Clock::start();
    for message in messages {
        let properties = properties(&message);
        let confirm = channel
            .basic_publish(
                EXCHANGE.into(),
                topic.into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                &message.payload,
                properties,
            )
            .await
            .expect("raw publish");
        if let Some(done) = in_flight.push(confirm).await {
            check(done);
        }
    }
    while let Some(done) = in_flight.next().await {
        check(done);
    }
    clock.stop(n)
}

/// Consumes and acks `n` messages of `queue` on a new channel.
async fn raw_consume(connection: &Connection, queue: &str, n: usize) -> Sample {
    let channel = connection
        .create_channel()
        .await
        .expect("a consumer channel");
    channel
        .basic_qos(PREFETCH, BasicQosOptions::default())
        .await
        .expect("the prefetch is set");
    let tag = ShortString::from(format!("surety-bench-raw-{}", std::process::id()));
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            tag.clone(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("raw consume");
    let mut bytes = 0usize;
    let mut clock = Clock::start();
    for received in 0..n {
        let delivery = stalled(consumer.next(), "raw", received, n)
            .await
            .expect("the consumer stays open")
            .expect("a raw delivery");
        bytes += delivery.data.len();
        delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .expect("the raw ack");
        if received == 0 {
            clock = Clock::start();
        }
    }
    let sample = clock.stop(n - 1);
    assert!(bytes > 0);
    let _ = channel
        .basic_cancel(tag, BasicCancelOptions::default())
        .await;
    let _ = channel.close(200, "surety-bench: done".into()).await;
    sample
}
