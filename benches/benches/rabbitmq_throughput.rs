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
//! - **consume**: N messages pre-published to each of two durable queues,
//!   one consumed raw and one by the adapter, both with prefetch 64 (the
//!   adapter's default) and a manual `basic.ack` per message. Raw:
//!   `basic_consume` and `Acker::ack`. Adapter: the `Subscriber` stream and
//!   `Delivery::ack`. Clock: first message received to the last one acked.
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
    Clock, Comparison, Report, Sample, Settings, Window, adapter_consume, adapter_publish,
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

/// The AMQP properties the adapter writes for `envelope`: every
/// `Envelope::to_binary` header as a long string, persistent delivery mode,
/// and `message_id`, `type`, `app_id`, `content_type`, `correlation_id`,
/// `timestamp` from the attributes.
fn properties(envelope: &Envelope) -> BasicProperties {
    let (headers, _) = envelope.to_binary();
    let mut table = FieldTable::default();
    for (key, value) in headers {
        table.insert(
            ShortString::from(key),
            AMQPValue::LongString(LongString::from(value)),
        );
    }
    let mut props = BasicProperties::default()
        .with_headers(table)
        .with_delivery_mode(2)
        .with_message_id(ShortString::from(envelope.id.clone()))
        .with_type(ShortString::from(envelope.event_type.clone()))
        .with_app_id(ShortString::from(envelope.source.clone()))
        .with_content_type(ShortString::from(envelope.content_type.clone()));
    if let Some(correlation) = &envelope.correlation_id {
        props = props.with_correlation_id(ShortString::from(correlation.clone()));
    }
    if let Ok(seconds) = u64::try_from(envelope.time.timestamp()) {
        props = props.with_timestamp(seconds);
    }
    props
}

/// Messages encoded before the clock starts.
fn raw_messages(batch: Vec<Envelope>) -> Vec<(BasicProperties, bytes::Bytes)> {
    batch
        .into_iter()
        .map(|envelope| (properties(&envelope), envelope.payload))
        .collect()
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
        |round, n| bench.publish_round(round, n).map(|pair| [pair]),
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

    /// Publishes `n` raw and `n` through the adapter, each to its own topic
    /// and queue. Odd rounds start raw.
    async fn publish_round(&self, round: usize, n: usize) -> (Sample, Sample) {
        let (payload, keys) = (self.settings.payload, self.settings.keys);
        let raw_topic = self.name("publish-raw", round);
        let adapter_topic = self.name("publish-adapter", round);
        let raw_sink = queue_name(&raw_topic, "sink");
        let adapter_sink = queue_name(&adapter_topic, "sink");
        self.declare(&raw_sink, &raw_topic).await;
        self.declare(&adapter_sink, &adapter_topic).await;
        let raw = async {
            let messages = raw_messages(envelopes(n, payload, keys));
            within(
                STEP_LIMIT,
                "raw publish",
                raw_publish(&self.publisher, &raw_topic, messages),
            )
            .await
        };
        let adapter = self.settings.adapter_slot(
            STEP_LIMIT,
            "publish",
            || {
                let messages = raw_messages(envelopes(n, payload, keys));
                raw_publish(&self.publisher, &adapter_topic, messages)
            },
            || {
                let batch = envelopes(n, payload, keys);
                adapter_publish(&self.adapter, &adapter_topic, batch, WINDOW)
            },
        );
        let result = self.settings.in_turn(round % 2 == 1, raw, adapter).await;
        self.delete(&raw_sink).await;
        self.delete(&adapter_sink).await;
        self.settings.pause().await;
        result
    }

    /// Pre-publishes `n` messages to each of two queues (their own topics,
    /// so that they share no message bodies in the broker's store), lets the
    /// broker settle, then consumes one raw and the other through the
    /// adapter. Odd rounds start raw.
    async fn consume_round(&self, round: usize, n: usize) -> (Sample, Sample) {
        let (payload, keys) = (self.settings.payload, self.settings.keys);
        let raw_topic = self.name("consume-raw", round);
        let topic = self.name("consume-adapter", round);
        let raw_queue = queue_name(&raw_topic, "raw");
        let adapter_queue = queue_name(&topic, ADAPTER_GROUP);
        self.declare(&raw_queue, &raw_topic).await;
        self.declare(&adapter_queue, &topic).await;
        // Filled in the order they are consumed, so that each queue is about
        // as old when its consumer starts (a queue consumed right after it
        // was filled is slower: the broker is still settling it).
        let raw_first = round % 2 == 1;
        let order = if raw_first {
            [&raw_topic, &topic]
        } else {
            [&topic, &raw_topic]
        };
        for target in order {
            let messages = raw_messages(envelopes(n, payload, keys));
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
        let raw = async {
            within(
                STEP_LIMIT,
                "raw consume",
                raw_consume(&self.raw, &raw_queue, n),
            )
            .await
        };
        let adapter = self.settings.adapter_slot(
            STEP_LIMIT,
            "consume",
            || raw_consume(&self.raw, &adapter_queue, n),
            || adapter_consume(&self.adapter, &topic, ADAPTER_GROUP, n),
        );
        let result = self.settings.in_turn(raw_first, raw, adapter).await;
        self.delete(&raw_queue).await;
        self.delete(&adapter_queue).await;
        self.settings.pause().await;
        result
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
async fn raw_publish(
    channel: &Channel,
    topic: &str,
    messages: Vec<(BasicProperties, bytes::Bytes)>,
) -> Sample {
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
    for (properties, payload) in messages {
        let confirm = channel
            .basic_publish(
                EXCHANGE.into(),
                topic.into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                &payload,
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
