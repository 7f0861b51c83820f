//! surety-dlq on real brokers: pipeline throughput with every message
//! failing, against a consume→publish loop over the same adapter on the
//! same broker (the *adapter loop*: not the raw client; the adapter's own
//! cost is measured against raw lapin / rdkafka by `surety-benches`'s
//! `rabbitmq_throughput` and `kafka_throughput`).
//!
//! For RabbitMQ and for the Kafka-protocol broker, each round publishes N
//! messages (256-byte payload, 256 partition keys) to a fresh topic that two
//! fresh consumer groups read, one per variant, both through the adapter:
//!
//! - **adapter loop** (printed `loop`): a plain loop over the adapter's `Subscriber` stream that, for
//!   each delivery, publishes a copy of the envelope to a DLQ topic through
//!   the adapter's `Publisher` (`send`, then the confirmation) and acks,
//!   with up to `C` deliveries between receipt and ack (the same bound as
//!   the worker's concurrency);
//! - **raw client**: the same loop written against raw lapin / raw
//!   rdkafka, no Surety code: a consumer on the group's queue (prefetch
//!   `C`) or as the group (offsets stored after each confirmation), a
//!   publish of the delivery's body and headers as they came to the DLQ
//!   topic, its confirmation, then the ack; up to `C` in flight;
//! - **dlq**: a core `Worker` (concurrency `C`) running a `DlqLayer` whose
//!   handler fails every message permanently, with a `TopicSink` to a DLQ
//!   topic: classification, the retry decision, the dead letter built and
//!   published with the broker's confirmation, then the ack.
//!
//! Clock, for both: first delivery received (so a Kafka group join is not
//! measured) to the N-th confirmed publish to the DLQ topic. The variants
//! run in interleaved rounds (which one goes first alternates), after an
//! unreported warm-up round. Printed: each round's rates and ratio, the
//! medians of the rates, and the median of the per-round ratios (the
//! variants of a round share the messages and the broker's state, so their
//! ratio is robust to drift between rounds) against the target of 0.8.
//!
//! `cargo bench -p surety-dlq --bench brokers` for the full run (N = 10 000,
//! 7 rounds, C = 64; `SURETY_BENCH_MESSAGES`, `SURETY_BENCH_ROUNDS` and
//! `SURETY_BENCH_CONCURRENCY` override); `cargo test -p surety-dlq --benches`
//! runs one tiny round per broker. A broker whose address variable
//! (`SURETY_AMQP_URL`, `SURETY_KAFKA_BROKERS`) is unset is skipped, unless
//! `SURETY_REQUIRE_SERVICES` is set, when that fails the run. RabbitMQ
//! queues are deleted after each round, Kafka topics once the transport
//! (and so every consumer) is closed. `SURETY_BENCH_LOG` (a `tracing`
//! filter) sends logs to stderr; unset, nothing is logged.
//!
//! On Kafka the subscription runs with the default buffer (256 deliveries):
//! a consumer that keeps up never pauses its partitions, which matters on
//! tansu (the test broker), whose answer to a fetch starting mid-way
//! through a record batch stalls or skips records.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use surety_core::consumer::{Incoming, Worker, handler_fn};
use surety_core::tower::Layer;
use surety_core::{
    Close, Confirmation, DeliveryStream, Envelope, HandlerError, Publisher, Receipt, Subscriber,
};
use surety_dlq::{DlqLayer, RetryPolicy};
use surety_kafka::rdkafka::ClientConfig;
use surety_kafka::rdkafka::Message as _;
use surety_kafka::rdkafka::admin::{AdminClient, AdminOptions};
use surety_kafka::rdkafka::client::DefaultClientContext;
use surety_kafka::rdkafka::consumer::{Consumer, StreamConsumer};
use surety_kafka::rdkafka::producer::{FutureProducer, FutureRecord};
use surety_kafka::{KafkaConfig, KafkaTransport};
use surety_rabbitmq::lapin::options::QueueDeleteOptions;
use surety_rabbitmq::topology::WorkQueue;
use surety_rabbitmq::{RabbitConfig, RabbitTransport, queue_name};
use surety_testkit::services;
use tokio::sync::Notify;

/// The DLQ pipeline's throughput must reach this fraction of the adapter loop's.
const TARGET: f64 = 0.8;
/// Upper bound on any one step; a stuck step fails the run.
const STEP_LIMIT: Duration = Duration::from_secs(300);
/// Partitions of every Kafka topic.
const KAFKA_PARTITIONS: i32 = 4;

/// Full run or smoke test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// `cargo bench` (passes `--bench`).
    Full,
    /// `cargo test --benches` (passes nothing).
    Test,
}

#[derive(Debug, Clone)]
struct Settings {
    mode: Mode,
    messages: usize,
    rounds: usize,
    warmup: usize,
    concurrency: usize,
    payload: usize,
    keys: usize,
}

impl Settings {
    fn from_env() -> Self {
        let mode = if std::env::args().skip(1).any(|a| a == "--bench") {
            Mode::Full
        } else {
            Mode::Test
        };
        let (messages, rounds, warmup) = match mode {
            Mode::Full => (10_000, 7, 1_000),
            Mode::Test => (40, 1, 0),
        };
        let var = |name: &str| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .filter(|v| *v > 0)
        };
        Self {
            mode,
            messages: var("SURETY_BENCH_MESSAGES").unwrap_or(messages),
            rounds: var("SURETY_BENCH_ROUNDS").unwrap_or(rounds),
            warmup,
            concurrency: var("SURETY_BENCH_CONCURRENCY").unwrap_or(64),
            payload: 256,
            keys: 256,
        }
    }
}

fn main() {
    if let Ok(filter) = std::env::var("SURETY_BENCH_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .try_init();
    }
    let settings = Settings::from_env();
    // Resolve both addresses first, so a required but missing service
    // fails before anything runs.
    let amqp = services::require(services::amqp_url());
    let kafka = services::require(services::kafka_brokers());
    if amqp.is_none() && kafka.is_none() {
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    if let Some(url) = amqp {
        let report = runtime.block_on(rabbitmq(&url, &settings));
        println!("{report}");
    }
    if let Some(brokers) = kafka {
        let report = runtime.block_on(kafka_run(&brokers, &settings));
        println!("{report}");
    }
}

/// Creates and deletes what a round needs on one broker.
trait Topology {
    /// Makes `topic` ready for the `groups` to read it from the start.
    fn declare(&self, topic: &str, groups: &[String]) -> impl Future<Output = ()>;
    /// Deletes `topic` and the `groups`' queues.
    fn remove(&self, topic: &str, groups: &[String]) -> impl Future<Output = ()>;
    /// The consume→publish loop on the raw client: `messages` of `topic`
    /// read as `group`, each published to `out`, confirmed, then acked.
    fn raw_client_loop(
        &self,
        topic: &str,
        group: &str,
        out: &str,
        messages: usize,
        settings: &Settings,
    ) -> impl Future<Output = Sample>;
}

struct Rabbit {
    channel: surety_rabbitmq::lapin::Channel,
    exchange: String,
    url: String,
}

impl Topology for Rabbit {
    async fn declare(&self, topic: &str, groups: &[String]) {
        for group in groups {
            WorkQueue::for_group(&self.exchange, topic, group)
                .without_dead_letter()
                .declare(&self.channel)
                .await
                .expect("declare a queue");
        }
    }

    async fn remove(&self, topic: &str, groups: &[String]) {
        for group in groups {
            let queue = queue_name(topic, group);
            if let Err(err) = self
                .channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await
            {
                eprintln!("note: deleting queue {queue} failed: {err}");
            }
        }
    }

    async fn raw_client_loop(
        &self,
        topic: &str,
        group: &str,
        out: &str,
        messages: usize,
        settings: &Settings,
    ) -> Sample {
        use surety_rabbitmq::lapin::options::{
            BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
            ConfirmSelectOptions,
        };
        use surety_rabbitmq::lapin::types::FieldTable;
        use surety_rabbitmq::lapin::{Connection, ConnectionProperties};

        let connection = Connection::connect(&self.url, ConnectionProperties::default())
            .await
            .expect("raw lapin connects");
        let consumer_channel = connection.create_channel().await.expect("a channel");
        let concurrency = u16::try_from(settings.concurrency).unwrap_or(u16::MAX);
        consumer_channel
            .basic_qos(concurrency, BasicQosOptions::default())
            .await
            .expect("prefetch");
        let publisher = connection.create_channel().await.expect("a channel");
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        let queue = queue_name(topic, group);
        let mut deliveries = consumer_channel
            .basic_consume(
                queue.as_str().into(),
                "surety-dlq-bench-raw".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("raw consume");
        let mut pending = FuturesUnordered::new();
        let (mut received, mut confirmed) = (0, 0);
        let mut first = None;
        let mut last = None;
        let work = async {
            while confirmed < messages {
                tokio::select! {
                    Some(at) = pending.next(), if !pending.is_empty() => {
                        confirmed += 1;
                        last = Some(at);
                    }
                    next = deliveries.next(), if received < messages && pending.len() < settings.concurrency => {
                        let delivery = next.expect("the consumer is open").expect("a delivery");
                        first.get_or_insert_with(Instant::now);
                        received += 1;
                        let confirm = publisher
                            .basic_publish(
                                self.exchange.as_str().into(),
                                out.into(),
                                BasicPublishOptions::default(),
                                &delivery.data,
                                delivery.properties.clone(),
                            )
                            .await
                            .expect("raw publish");
                        pending.push(async move {
                            let confirmation = confirm.await.expect("a confirm");
                            assert!(confirmation.is_ack(), "the broker nacked");
                            let at = Instant::now();
                            delivery.acker.ack(BasicAckOptions::default()).await.expect("ack");
                            at
                        });
                    }
                }
            }
        };
        within("the raw client loop", work).await;
        let _ = connection.close(200, "surety-dlq-bench: done".into()).await;
        Sample {
            messages,
            elapsed: last.expect("a confirmation") - first.expect("a delivery"),
        }
    }
}

async fn rabbitmq(url: &str, settings: &Settings) -> Report {
    let transport =
        RabbitTransport::connect(RabbitConfig::new(url).connection_name("surety-dlq-bench"))
            .await
            .expect("connects to RabbitMQ");
    let topology = Rabbit {
        channel: transport.channel().await.expect("a channel"),
        exchange: transport.config().exchange.clone(),
        url: url.to_owned(),
    };
    let report = run("rabbitmq", &transport, &topology, settings).await;
    transport.close().await.ok();
    report
}

struct Kafka {
    transport: KafkaTransport,
    brokers: String,
    /// Topics to delete once the transport and its consumers are closed:
    /// librdkafka (against tansu) can crash when a topic disappears under a
    /// consumer that is still shutting down.
    done_with: Mutex<Vec<String>>,
}

impl Topology for Kafka {
    async fn declare(&self, topic: &str, _groups: &[String]) {
        self.transport
            .ensure_topic(topic)
            .await
            .expect("create a topic");
    }

    async fn remove(&self, topic: &str, _groups: &[String]) {
        self.done_with.lock().unwrap().push(topic.to_owned());
    }

    async fn raw_client_loop(
        &self,
        topic: &str,
        group: &str,
        out: &str,
        messages: usize,
        settings: &Settings,
    ) -> Sample {
        // The adapter's managed settings, on the raw clients.
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", group)
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "true")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .create()
            .expect("a raw consumer");
        consumer.subscribe(&[topic]).expect("raw subscribe");
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", "30000")
            .create()
            .expect("a raw producer");
        let mut pending = FuturesUnordered::new();
        let (mut received, mut confirmed) = (0, 0);
        let mut first = None;
        let mut last = None;
        let work = async {
            while confirmed < messages {
                tokio::select! {
                    Some((partition, offset, at)) = pending.next(), if !pending.is_empty() => {
                        confirmed += 1;
                        last = Some(at);
                        let _ = consumer.store_offset(topic, partition, offset + 1);
                    }
                    next = consumer.recv(), if received < messages && pending.len() < settings.concurrency => {
                        let message = next.expect("a raw message");
                        first.get_or_insert_with(Instant::now);
                        received += 1;
                        let mut record = FutureRecord::<[u8], [u8]>::to(out)
                            .payload(message.payload().unwrap_or_default());
                        if let Some(key) = message.key() {
                            record = record.key(key);
                        }
                        if let Some(headers) = message.headers() {
                            record = record.headers(headers.detach());
                        }
                        let delivery = producer.send_result(record).map_err(|(e, _)| e).expect("raw send");
                        let (partition, offset) = (message.partition(), message.offset());
                        pending.push(async move {
                            delivery.await.expect("delivered").map_err(|(e, _)| e).expect("confirmed");
                            (partition, offset, Instant::now())
                        });
                    }
                }
            }
        };
        within("the raw client loop", work).await;
        tokio::task::spawn_blocking(move || drop((consumer, producer)))
            .await
            .expect("the raw clients close");
        Sample {
            messages,
            elapsed: last.expect("a confirmation") - first.expect("a delivery"),
        }
    }
}

async fn kafka_run(brokers: &str, settings: &Settings) -> Report {
    let transport = KafkaTransport::connect(
        KafkaConfig::new(brokers)
            .client_id("surety-dlq-bench")
            .create_missing_topics(KAFKA_PARTITIONS)
            .replication_factor(1),
    )
    .await
    .expect("connects to Kafka");
    let topology = Kafka {
        transport: transport.clone(),
        brokers: brokers.to_owned(),
        done_with: Mutex::default(),
    };
    let report = run("kafka", &transport, &topology, settings).await;
    transport.close().await.ok();
    drop(topology.transport);
    let topics = topology.done_with.into_inner().unwrap();
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("a Kafka admin client");
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    match admin.delete_topics(&names, &options).await {
        Ok(results) if results.iter().all(Result::is_ok) => {}
        Ok(results) => eprintln!("note: deleting the benchmark topics failed: {results:?}"),
        Err(err) => eprintln!("note: deleting the benchmark topics failed: {err}"),
    }
    report
}

/// One measured variant of one round.
#[derive(Debug, Clone, Copy)]
struct Sample {
    messages: usize,
    elapsed: Duration,
}

impl Sample {
    fn rate(&self) -> f64 {
        self.messages as f64 / self.elapsed.as_secs_f64()
    }
}

struct Report {
    broker: &'static str,
    settings: Settings,
    /// Per round: the adapter loop, the DLQ pipeline, the raw client loop.
    rounds: Vec<(Sample, Sample, Sample)>,
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = &self.settings;
        writeln!(
            f,
            "surety-dlq pipeline on {}: every message failing vs the adapter's consume→publish loop \
             ({} messages per round, {} rounds{}, concurrency {}, {}-byte payload, {} keys{})",
            self.broker,
            s.messages,
            self.rounds.len(),
            if s.warmup > 0 {
                format!(" after a warm-up of {}", s.warmup)
            } else {
                String::new()
            },
            s.concurrency,
            s.payload,
            s.keys,
            if s.mode == Mode::Test {
                ", smoke test"
            } else {
                ""
            },
        )?;
        for (n, (raw, dlq, client)) in self.rounds.iter().enumerate() {
            writeln!(
                f,
                "  round {}: adapter loop {:>8.0} msg/s, dlq {:>8.0} msg/s, ratio {:.2}; raw client loop {:>8.0} msg/s (dlq / raw client {:.2})",
                n + 1,
                raw.rate(),
                dlq.rate(),
                dlq.rate() / raw.rate(),
                client.rate(),
                dlq.rate() / client.rate()
            )?;
        }
        let client_ratio = median(
            self.rounds
                .iter()
                .map(|(_, d, c)| d.rate() / c.rate())
                .collect(),
        );
        let loop_ratio = median(
            self.rounds
                .iter()
                .map(|(r, _, c)| r.rate() / c.rate())
                .collect(),
        );
        writeln!(
            f,
            "  against the raw client loop ({}): dlq / raw client {client_ratio:.2}, adapter loop / raw client {loop_ratio:.2} (medians of the rounds' ratios; reference, no target)",
            if self.broker == "kafka" {
                "rdkafka"
            } else {
                "lapin"
            },
        )?;
        let raw = median(self.rounds.iter().map(|(r, _, _)| r.rate()).collect());
        let dlq = median(self.rounds.iter().map(|(_, d, _)| d.rate()).collect());
        // Each round pairs the variants on the same messages and the same
        // broker state, one right after the other: the median of the
        // per-round ratios is robust to drift between rounds.
        let ratio = median(
            self.rounds
                .iter()
                .map(|(r, d, _)| d.rate() / r.rate())
                .collect(),
        );
        writeln!(
            f,
            "  median: adapter loop {raw:.0} msg/s, dlq (every message failing) {dlq:.0} msg/s \
             (ratio of the medians {:.2})",
            dlq / raw
        )?;
        write!(
            f,
            "  {} ratio dlq/adapter loop = {ratio:.2} (median of the rounds' ratios; target >= {TARGET:.2}): {}",
            self.broker,
            match (s.mode, ratio >= TARGET) {
                (Mode::Test, _) => "no verdict (smoke test: too few messages to measure)",
                (Mode::Full, true) => "PASS",
                (Mode::Full, false) => "BELOW",
            }
        )
    }
}

fn envelopes(n: usize, settings: &Settings) -> Vec<Envelope> {
    let payload = bytes::Bytes::from(vec![b'x'; settings.payload]);
    (0..n)
        .map(|i| {
            Envelope::builder("/surety-bench", "order.placed")
                .partition_key(format!("k-{}", i % settings.keys))
                .payload(payload.clone())
                .build()
        })
        .collect()
}

async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    tokio::time::timeout(STEP_LIMIT, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} took longer than {STEP_LIMIT:?}"))
}

async fn run<T, P>(broker: &'static str, transport: &T, topology: &P, settings: &Settings) -> Report
where
    T: Publisher + Subscriber + Clone + 'static,
    P: Topology,
{
    let run_id = uuid::Uuid::now_v7().simple().to_string();
    if settings.warmup > 0 {
        round(transport, topology, settings, &run_id, 0, settings.warmup).await;
    }
    let mut rounds = Vec::new();
    for n in 1..=settings.rounds {
        rounds.push(round(transport, topology, settings, &run_id, n, settings.messages).await);
    }
    Report {
        broker,
        settings: settings.clone(),
        rounds,
    }
}

/// One round: `messages` published to a fresh topic, consumed by both
/// variants (each with its own group and DLQ topic), in alternating order.
async fn round<T, P>(
    transport: &T,
    topology: &P,
    settings: &Settings,
    run_id: &str,
    n: usize,
    messages: usize,
) -> (Sample, Sample, Sample)
where
    T: Publisher + Subscriber + Clone + 'static,
    P: Topology,
{
    let topic = format!("surety-dlq-bench.{run_id}.{n}");
    let groups = [
        format!("loop-{run_id}-{n}"),
        format!("dlq-{run_id}-{n}"),
        format!("rawclient-{run_id}-{n}"),
    ];
    let dlq_topics = [
        format!("{topic}.loop-out"),
        format!("{topic}.dlq-out"),
        format!("{topic}.rawclient-out"),
    ];
    let sink = vec![format!("sink-{run_id}-{n}")];
    topology.declare(&topic, &groups).await;
    for t in &dlq_topics {
        topology.declare(t, &sink).await;
    }
    within(
        "publishing the round's messages",
        futures::stream::iter(envelopes(messages, settings))
            .map(|env| {
                let topic = &topic;
                async move { transport.publish(topic, env).await.expect("publish") }
            })
            .buffer_unordered(512)
            .count(),
    )
    .await;
    let raw = || {
        raw_consume_publish(
            transport,
            &topic,
            &groups[0],
            &dlq_topics[0],
            messages,
            settings,
        )
    };
    let dlq = || {
        dlq_every_message_fails(
            transport,
            &topic,
            &groups[1],
            &dlq_topics[1],
            messages,
            settings,
        )
    };
    let raw_client =
        || topology.raw_client_loop(&topic, &groups[2], &dlq_topics[2], messages, settings);
    let (raw, dlq, raw_client) = if n.is_multiple_of(2) {
        let dlq = dlq().await;
        let raw = raw().await;
        (raw, dlq, raw_client().await)
    } else {
        let raw_client = raw_client().await;
        let raw = raw().await;
        (raw, dlq().await, raw_client)
    };
    topology.remove(&topic, &groups).await;
    for t in &dlq_topics {
        topology.remove(t, &sink).await;
    }
    (raw, dlq, raw_client)
}

/// The baseline: receive, publish a copy, wait for its confirmation, ack;
/// up to `concurrency` deliveries between receipt and ack.
async fn raw_consume_publish<T>(
    transport: &T,
    topic: &str,
    group: &str,
    out: &str,
    messages: usize,
    settings: &Settings,
) -> Sample
where
    T: Publisher + Subscriber,
{
    let mut deliveries = transport.subscribe(topic, group).await.expect("subscribe");
    let mut pending = FuturesUnordered::new();
    let (mut received, mut confirmed) = (0, 0);
    let mut first = None;
    let mut last = None;
    let work = async {
        while confirmed < messages {
            tokio::select! {
                Some(at) = pending.next(), if !pending.is_empty() => {
                    confirmed += 1;
                    last = Some(at);
                }
                next = deliveries.next(), if received < messages && pending.len() < settings.concurrency => {
                    let delivery = next.expect("the stream is open").expect("a delivery");
                    first.get_or_insert_with(Instant::now);
                    received += 1;
                    let confirmation: Confirmation = transport
                        .send(out, delivery.envelope().clone())
                        .await
                        .expect("send");
                    pending.push(async move {
                        confirmation.await.expect("confirmed");
                        let at = Instant::now();
                        delivery.ack().await.expect("ack");
                        at
                    });
                }
            }
        }
    };
    within("the raw loop", work).await;
    Sample {
        messages,
        elapsed: last.expect("a confirmation") - first.expect("a delivery"),
    }
}

/// Publishes through `inner` and notes when the `target`-th publish was
/// confirmed.
#[derive(Clone)]
struct Counting<T> {
    inner: T,
    target: usize,
    published: Arc<AtomicUsize>,
    last: Arc<Mutex<Option<Instant>>>,
    done: Arc<Notify>,
}

impl<T: Publisher> Publisher for Counting<T> {
    async fn send(&self, topic: &str, envelope: Envelope) -> surety_core::Result<Confirmation> {
        self.inner.send(topic, envelope).await
    }

    async fn publish(&self, topic: &str, envelope: Envelope) -> surety_core::Result<Receipt> {
        let receipt = self.inner.publish(topic, envelope).await?;
        if self.published.fetch_add(1, Ordering::SeqCst) + 1 == self.target {
            *self.last.lock().unwrap() = Some(Instant::now());
            self.done.notify_one();
        }
        Ok(receipt)
    }
}

/// The DLQ pipeline: a worker with the layer, every message failing
/// permanently and dead-lettered to a DLQ topic.
async fn dlq_every_message_fails<T>(
    transport: &T,
    topic: &str,
    group: &str,
    out: &str,
    messages: usize,
    settings: &Settings,
) -> Sample
where
    T: Publisher + Subscriber + Clone + 'static,
{
    let counting = Counting {
        inner: transport.clone(),
        target: messages,
        published: Arc::default(),
        last: Arc::default(),
        done: Arc::default(),
    };
    let done = counting.done.clone();
    let last = counting.last.clone();
    let handler = DlqLayer::new("bench")
        .policy(RetryPolicy::new().max_attempts(3))
        .dead_letter_to(counting, out)
        .host("bench-host")
        .layer(handler_fn(|_msg: Incoming| async {
            Err::<(), _>(HandlerError::permanent(
                "order 42: quantity must be positive",
            ))
        }));
    let first: Arc<OnceLock<Instant>> = Arc::default();
    let seen = first.clone();
    let deliveries: DeliveryStream = transport
        .subscribe(topic, group)
        .await
        .expect("subscribe")
        .inspect(move |_| {
            seen.get_or_init(Instant::now);
        })
        .boxed();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(Worker::new(handler).concurrency(settings.concurrency).run(
        deliveries,
        async {
            stopped.await.ok();
        },
    ));
    within("the DLQ pipeline", done.notified()).await;
    stop.send(()).ok();
    let report = within("the worker to stop", worker).await.expect("worker");
    assert_eq!(report.acked as usize, messages, "{report:?}");
    assert_eq!(report.rejected + report.requeued, 0, "{report:?}");
    let end = last.lock().unwrap().expect("the last confirmation");
    Sample {
        messages,
        elapsed: end - *first.get().expect("a delivery"),
    }
}
