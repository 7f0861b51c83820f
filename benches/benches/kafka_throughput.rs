//! Kafka throughput: surety-kafka's `KafkaTransport` against raw rdkafka on
//! the same broker, in one process, in interleaved rounds (see
//! `surety_benches::load` and `docs/benchmarks.md`).
//!
//! Every round runs each path three times with equal work and settings:
//! raw, raw again (the control, whose spread is the noise) and the adapter.
//!
//! - **publish**: N envelopes with all confirmations in flight (librdkafka's
//!   queue is the window, for both). Raw: a `FutureProducer` with the
//!   adapter's producer settings (`enable.idempotence=true`, `acks=all`,
//!   `message.timeout.ms=30000`) building, per message on the clock, the
//!   record the adapter writes from plain bytes prepared before the clock
//!   (the key, the `ce_*` header names and values, the payload: no Surety
//!   code runs in the raw window), and awaiting every `DeliveryFuture`.
//!   Adapter: `KafkaTransport::send` per envelope, then every
//!   `Confirmation`. Clock: first send to last confirm.
//! - **consume**: N records (in the adapter's format) pre-produced to a
//!   fresh topic, then consumed by fresh groups with per-message offset
//!   storage, one after the other. Raw: a `StreamConsumer` with the
//!   adapter's consumer settings (`enable.auto.commit=true`,
//!   `enable.auto.offset.store=false`, `auto.offset.reset=earliest`)
//!   reading each message's payload and every header's name and value
//!   (borrowed: what any consumer reads to learn a message's id, type and
//!   trace; librdkafka parses a message's headers when they are first read)
//!   and calling `store_offset_from_message` per message. Adapter: the `Subscriber`
//!   stream with its defaults (`consumer_buffer` 256, far below N),
//!   `Delivery::ack` per message. Client CPU per message is the figure the
//!   adapter owns here (tansu bounds the rate). Clock: first message received to the last
//!   one settled (the group join is not measured).
//!
//! The consume topic is pre-produced one record per batch: tansu 0.6 answers
//! a fetch that starts inside a record batch with the *next* batch, so a
//! consumer that resumes or seeks into a batch skips records and, at the
//! end of the log, stalls. Real Kafka returns the containing batch.
//!
//! `cargo bench -p surety-benches --bench kafka_throughput` for the full
//! run; `cargo test -p surety-benches --benches` for a smoke run. Needs
//! `SURETY_KAFKA_BROKERS` (skipped without, unless `SURETY_REQUIRE_SERVICES`
//! is set). Topics are deleted at the end.

use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use surety_benches::load::{
    Clock, Comparison, Report, Sample, Settings, Trial, Window, adapter_consume, adapter_publish,
    envelopes, measure_rounds, run_main, stalled, unique_suffix, within,
};
use surety_core::{Close, Envelope};
use surety_kafka::{KafkaConfig, KafkaTransport};
use surety_testkit::services;

/// Messages per publish measurement in a full run.
const PUBLISH_MESSAGES: usize = 100_000;
/// Messages per consume measurement in a full run.
const CONSUME_MESSAGES: usize = 20_000;
/// Measured rounds in a full run.
const ROUNDS: usize = 4;
/// Partitions of every benchmark topic.
const PARTITIONS: i32 = 4;
/// Upper bound on any one step; a stuck step fails the run.
const STEP_LIMIT: Duration = Duration::from_secs(600);
/// How long the cluster gets to answer admin and metadata requests.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);
/// The adapter's default delivery timeout, as librdkafka milliseconds.
const MESSAGE_TIMEOUT_MS: &str = "30000";

fn main() {
    run_main(
        || services::require(services::kafka_brokers()),
        PUBLISH_MESSAGES,
        CONSUME_MESSAGES,
        ROUNDS,
        run,
    );
}

/// A record as plain bytes, prepared before the clock starts: what a raw
/// producer of the same record would have in hand (its key, header names
/// and values, payload). The raw client builds the librdkafka record from
/// it on the clock, as it would build one from its own data.
struct PlainRecord {
    key: Option<String>,
    headers: Vec<(String, Vec<u8>)>,
    payload: Bytes,
}

/// The adapter's wire format (`KafkaTransport::send`) as plain bytes:
/// partition key as the record key, the binary-mode `ce_*` headers as
/// name/value pairs. Runs before the clock.
fn plain_record(envelope: Envelope) -> PlainRecord {
    let mut headers = Vec::with_capacity(envelope.headers.len() + 11);
    envelope.for_each_binary_header(|key, value| {
        headers.push((key.to_owned(), value.as_bytes().to_vec()));
    });
    PlainRecord {
        key: envelope.partition_key,
        headers,
        payload: envelope.payload,
    }
}

/// [`plain_record`] for each envelope.
fn plain_records(envelopes: Vec<Envelope>) -> Vec<PlainRecord> {
    envelopes.into_iter().map(plain_record).collect()
}

/// A producer with the adapter's producer settings plus `extra`.
fn producer(brokers: &str, client_id: &str, extra: &[(&str, &str)]) -> FutureProducer {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("client.id", client_id)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", MESSAGE_TIMEOUT_MS);
    for (key, value) in extra {
        config.set(*key, *value);
    }
    config.create().expect("a raw Kafka producer")
}

async fn connect(config: KafkaConfig) -> KafkaTransport {
    within(STEP_LIMIT, "connecting the adapter", async {
        KafkaTransport::connect(config)
            .await
            .expect("the adapter connects to Kafka")
    })
    .await
}

struct Bench {
    brokers: String,
    settings: Settings,
    run: String,
    admin: AdminClient<DefaultClientContext>,
    /// The raw client under test.
    raw_producer: FutureProducer,
    /// Fills consume topics one record per batch (see the module docs).
    filler: FutureProducer,
    /// The adapter with its defaults.
    adapter: KafkaTransport,
    /// Every topic created, deleted at the end.
    topics: Mutex<Vec<String>>,
}

async fn run(brokers: String, settings: Settings) -> Report {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("client.id", "surety-bench-admin")
        .create()
        .expect("a Kafka admin client");
    let config = KafkaConfig::new(&brokers)
        .client_id("surety-bench")
        .create_missing_topics(PARTITIONS)
        .replication_factor(1);
    let bench = Bench {
        brokers: brokers.clone(),
        settings: settings.clone(),
        run: unique_suffix(),
        admin,
        raw_producer: producer(&brokers, "surety-bench-raw", &[]),
        filler: producer(
            &brokers,
            "surety-bench-filler",
            // One record per produce request is slow: give it time.
            &[
                ("batch.num.messages", "1"),
                ("linger.ms", "0"),
                ("message.timeout.ms", "600000"),
            ],
        ),
        adapter: connect(config).await,
        topics: Mutex::new(Vec::new()),
    };

    let rows = measure_rounds(
        &settings,
        [Comparison::new("publish")],
        |round, n| bench.publish_round(round, n),
        |round, n| bench.consume_round(round, n),
    )
    .await;
    bench.finish().await;

    settings.report(
        format!("Kafka at {brokers}: surety-kafka vs raw rdkafka"),
        &format!(
            "{} partition keys, {PARTITIONS} partitions, replication 1",
            settings.keys
        ),
        [
            "publish: all in flight (librdkafka queue); enable.idempotence=true, acks=all, \
             librdkafka default batching"
                .to_owned(),
            "consume: fresh group per measurement, offset stored per message, auto-commit; topic \
             pre-produced one record per batch (tansu)"
                .to_owned(),
        ],
        rows,
    )
}

impl Bench {
    fn name(&self, what: &str, round: usize) -> String {
        format!("surety-bench.{}.r{round}.{what}", self.run)
    }

    /// Publishes `n` raw, `n` raw again (the control) and `n` through the
    /// adapter, each to a fresh topic known to its producer before the clock
    /// starts.
    async fn publish_round(&self, round: usize, n: usize) -> [Trial; 1] {
        let (payload, keys) = (self.settings.payload, self.settings.keys);
        let raw_topic = self.name("publish-raw", round);
        let control_topic = self.name("publish-control", round);
        let adapter_topic = self.name("publish-adapter", round);
        self.create_topics(&[&raw_topic, &control_topic, &adapter_topic])
            .await;
        within(STEP_LIMIT, "checking the adapter's topic", async {
            self.adapter
                .ensure_topic(&adapter_topic)
                .await
                .expect("the adapter sees its topic");
        })
        .await;
        let raw = |topic: String| {
            let records = plain_records(envelopes(n, payload, keys));
            async move { raw_publish(&self.raw_producer, &topic, records, n).await }
        };
        let trial = self
            .settings
            .trial(
                round % 2 == 1,
                STEP_LIMIT,
                "publish",
                || raw(raw_topic.clone()),
                || raw(control_topic.clone()),
                || {
                    adapter_publish(
                        &self.adapter,
                        &adapter_topic,
                        envelopes(n, payload, keys),
                        n,
                    )
                },
            )
            .await;
        self.settings.pause().await;
        [trial]
    }

    /// Pre-produces `n` records to a fresh topic, then consumes them raw,
    /// raw again (the control) and through the adapter, each as a fresh
    /// group.
    async fn consume_round(&self, round: usize, n: usize) -> Trial {
        let (payload, keys) = (self.settings.payload, self.settings.keys);
        let topic = self.name("consume", round);
        self.create_topics(&[&topic]).await;
        let records = plain_records(envelopes(n, payload, keys));
        within(
            STEP_LIMIT,
            "pre-producing for consume",
            raw_publish(&self.filler, &topic, records, n),
        )
        .await;

        let raw_group = self.name("raw", round);
        let control_group = self.name("control", round);
        let adapter_group = self.name("adapter", round);
        let trial = self
            .settings
            .trial(
                round % 2 == 1,
                STEP_LIMIT,
                "consume",
                || raw_consume(&self.brokers, &topic, &raw_group, n),
                || raw_consume(&self.brokers, &topic, &control_group, n),
                || adapter_consume(&self.adapter, &topic, &adapter_group, n),
            )
            .await;
        self.settings.pause().await;
        trial
    }

    /// Creates `topics` and waits until the raw producer sees their leaders.
    async fn create_topics(&self, topics: &[&str]) {
        let new: Vec<NewTopic<'_>> = topics
            .iter()
            .map(|t| NewTopic::new(t, PARTITIONS, TopicReplication::Fixed(1)))
            .collect();
        let options = AdminOptions::new()
            .operation_timeout(Some(ADMIN_TIMEOUT))
            .request_timeout(Some(ADMIN_TIMEOUT));
        let results = within(STEP_LIMIT, "creating topics", async {
            self.admin
                .create_topics(new.iter(), &options)
                .await
                .expect("the admin client creates topics")
        })
        .await;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => panic!("creating topic {topic} failed: {code}"),
            }
        }
        self.topics
            .lock()
            .expect("the topic list")
            .extend(topics.iter().map(|t| (*t).to_owned()));
        for topic in topics {
            self.wait_for_leaders(topic).await;
        }
    }

    /// Polls the raw producer's metadata until `topic` has all its
    /// partitions with leaders; this also puts the topic into the raw
    /// producer's cache, as `ensure_topic` does for the adapter.
    async fn wait_for_leaders(&self, topic: &str) {
        let deadline = Instant::now() + STEP_LIMIT;
        loop {
            let producer = self.raw_producer.clone();
            let name = topic.to_owned();
            let ready = tokio::task::spawn_blocking(move || {
                let metadata = producer
                    .client()
                    .fetch_metadata(Some(&name), ADMIN_TIMEOUT)
                    .ok()?;
                let found = metadata.topics().iter().find(|t| t.name() == name)?;
                let complete = found.error().is_none()
                    && found.partitions().len() == PARTITIONS as usize
                    && found.partitions().iter().all(|p| p.leader() >= 0);
                complete.then_some(())
            })
            .await
            .expect("a metadata request");
            if ready.is_some() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "topic {topic} has no leaders after {STEP_LIMIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Closes the adapters and producers, then deletes every topic of the
    /// run. Deleting a topic while a client still has it in its metadata
    /// cache crashed librdkafka 2.12.1 against tansu (SIGSEGV in
    /// `rd_kafka_metadata_cache_find`), so deletion waits for the clients.
    async fn finish(self) {
        within(STEP_LIMIT, "closing the adapters", async {
            self.adapter.close().await.expect("the adapter closes");
        })
        .await;
        let Self {
            admin,
            raw_producer,
            filler,
            adapter,
            topics,
            ..
        } = self;
        drop(adapter);
        tokio::task::spawn_blocking(move || drop((raw_producer, filler)))
            .await
            .expect("the producers close");
        let topics = topics.into_inner().expect("the topic list");
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        let options = AdminOptions::new().operation_timeout(Some(ADMIN_TIMEOUT));
        match admin.delete_topics(&names, &options).await {
            Ok(results) => {
                for result in results {
                    if let Err((topic, code)) = result {
                        eprintln!("note: deleting topic {topic} failed: {code}");
                    }
                }
            }
            Err(err) => eprintln!("note: deleting the benchmark topics failed: {err}"),
        }
    }
}

/// Sends `records`, each built into a librdkafka record from its plain
/// bytes on the clock, with up to `window` deliveries in flight and awaits
/// them.
async fn raw_publish(
    producer: &FutureProducer,
    topic: &str,
    records: Vec<PlainRecord>,
    window: usize,
) -> Sample {
    let n = records.len();
    let mut in_flight = Window::new(window);
    let check = |delivered: <DeliveryFuture as Future>::Output| match delivered {
        Ok(Ok(_)) => {}
        Ok(Err((err, _))) => panic!("raw publish failed: {err}"),
        Err(_) => panic!("raw publish: the producer dropped the delivery"),
    };
    let clock = Clock::start();
    for record in records {
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
        for (key, value) in &record.headers {
            headers = headers.insert(Header {
                key,
                value: Some(value),
            });
        }
        let mut out = FutureRecord::<str, [u8]>::to(topic)
            .payload(record.payload.as_ref())
            .headers(headers);
        if let Some(key) = &record.key {
            out = out.key(key.as_str());
        }
        let delivery = loop {
            match producer.send_result(out) {
                Ok(delivery) => break delivery,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    // The adapter's backpressure, the same way.
                    out = back;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((err, _)) => panic!("raw publish failed: {err}"),
            }
        };
        if let Some(done) = in_flight.push(delivery).await {
            check(done);
        }
    }
    while let Some(done) = in_flight.next().await {
        check(done);
    }
    clock.stop(n)
}

/// Consumes `n` messages of `topic` as a fresh `group`, storing each offset.
async fn raw_consume(brokers: &str, topic: &str, group: &str, n: usize) -> Sample {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("client.id", format!("surety-bench-raw-{group}"))
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .set("group.id", group)
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .create()
        .expect("a raw Kafka consumer");
    consumer.subscribe(&[topic]).expect("raw subscribe");
    let mut bytes = 0usize;
    let sample = {
        let mut stream = consumer.stream();
        let mut clock = Clock::start();
        for received in 0..n {
            let message = stalled(stream.next(), "raw", received, n)
                .await
                .expect("Kafka streams do not end")
                .expect("a raw Kafka message");
            bytes += message.payload().map_or(0, <[u8]>::len);
            // A consumer learns a message's id, type and trace from its
            // headers: read every name and value (borrowed, no copy).
            if let Some(headers) = message.headers() {
                for header in headers.iter() {
                    bytes += header.key.len() + header.value.map_or(0, <[u8]>::len);
                }
            }
            consumer
                .store_offset_from_message(&message)
                .expect("the offset is stored");
            if received == 0 {
                clock = Clock::start();
            }
        }
        clock.stop(n - 1)
    };
    assert!(bytes > 0);
    // Closing leaves the group, which blocks.
    tokio::task::spawn_blocking(move || drop(consumer))
        .await
        .expect("the raw consumer closes");
    sample
}
