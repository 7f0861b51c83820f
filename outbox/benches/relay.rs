//! The outbox relay on real brokers, against the adapter publishing the
//! same messages directly.
//!
//! For RabbitMQ and for the Kafka-protocol broker, each round takes N
//! messages (256-byte payload, 256 partition keys) and a fresh topic per
//! variant (on RabbitMQ with a queue bound, so that every publish is
//! routed; a few untimed publishes first, so a Kafka topic exists):
//!
//! - **direct**: the adapter's `Publisher` sends all N with up to 256 ×
//!   `in_flight_per_key` confirmations outstanding (the relay's own window:
//!   256 keys, that many rows of each in flight), and the clock stops at
//!   the N-th confirmation: what an application publishing without an
//!   outbox gets (the adapter itself is measured against the raw client by
//!   `surety-benches`, see `docs/benchmarks.md`);
//! - **control**: the direct variant again, on a topic of its own: its
//!   ratio to the first is the noise of the round;
//! - **direct per key**: the direct publisher under the relay's per-key
//!   rule (the next message of a key sent once its previous one
//!   confirmed, `in_flight_per_key` of a key at most): the direct
//!   publisher above keeps its window full with any message, so when one
//!   partition lags it runs ahead on the others with several messages of
//!   a key in flight, which the relay never does; relay / direct per key
//!   separates the relay's own cost from the cost of the order it keeps;
//! - **relay**: the N messages are first enqueued into a fresh SQLite
//!   outbox (not timed: that is the application's own transaction), then a
//!   [`Relay`] with default settings runs cycles until the outbox is
//!   empty: read a batch, publish it key-ordered with confirmation, mark
//!   the confirmed rows sent.
//!
//! Each variant also reports this process's CPU time per message over its
//! timed window (`surety_testkit::cpu`; the broker runs in its own
//! process): the relay's own cost beside the publisher's.
//!
//! Per round direct, control, direct per key, relay, the order reversed every other round,
//! after an unreported warm-up round. Printed: each round's rates and
//! ratios, the median relay/direct ratio against the target (**≥ 0.8**,
//! issue 10) and the median relay / direct per key, the control's spread and "within noise" when the ratio is
//! inside it. `cargo bench -p surety-outbox --bench relay` for the full run
//! (N = 10 000, 5 rounds; `SURETY_BENCH_MESSAGES` and `SURETY_BENCH_ROUNDS`
//! override); `cargo test -p surety-outbox --benches` runs one tiny round
//! per broker. A broker whose address variable is unset is skipped, unless
//! `SURETY_REQUIRE_SERVICES` is set, when that fails the run.

use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use surety_core::{Close, Envelope, Publisher};
use surety_kafka::{KafkaConfig, KafkaTransport};
use surety_outbox::{OutboxStore, Relay, SqliteOutbox};
use surety_rabbitmq::lapin::options::QueueDeleteOptions;
use surety_rabbitmq::topology::WorkQueue;
use surety_rabbitmq::{RabbitConfig, RabbitTransport, queue_name};
use surety_testkit::db::TempSqlite;
use surety_testkit::services;

/// Partition keys of the messages: with one row per key in flight (the
/// relay's default), the relay's window.
const KEYS: usize = 256;
/// The relay's target: relay / direct.
const TARGET: f64 = 0.8;
/// Upper bound on one variant of one round.
const STEP_LIMIT: Duration = Duration::from_secs(300);

struct Settings {
    messages: usize,
    rounds: usize,
    warmup: bool,
}

impl Settings {
    fn from_env() -> Self {
        let full = std::env::args().skip(1).any(|a| a == "--bench");
        let (messages, rounds) = if full { (10_000, 5) } else { (40, 1) };
        Self {
            messages: env("SURETY_BENCH_MESSAGES").unwrap_or(messages),
            rounds: env("SURETY_BENCH_ROUNDS").unwrap_or(rounds),
            warmup: full,
        }
    }
}

fn main() {
    let settings = Settings::from_env();
    let amqp = services::require(services::amqp_url());
    let kafka = services::require(services::kafka_brokers());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    if let Some(url) = amqp {
        runtime.block_on(rabbitmq(&url, &settings));
    }
    if let Some(brokers) = kafka {
        runtime.block_on(kafka_run(&brokers, &settings));
    }
}

fn unique(prefix: &str) -> String {
    format!("surety-outbox-bench.{prefix}.{}", uuid::Uuid::now_v7())
}

fn envelopes(n: usize) -> Vec<Envelope> {
    let payload = "x".repeat(256);
    (0..n)
        .map(|i| {
            Envelope::builder("/bench", "order.changed")
                .partition_key(format!("order-{}", i % KEYS))
                .payload(payload.clone())
                .build()
        })
        .collect()
}

async fn rabbitmq(url: &str, settings: &Settings) {
    let transport =
        RabbitTransport::connect(RabbitConfig::new(url).connection_name("surety-outbox-bench"))
            .await
            .expect("connects to RabbitMQ");
    let channel = transport.channel().await.expect("a channel");
    let exchange = transport.config().exchange.clone();
    let mut rounds = Vec::new();
    for round in 0..settings.rounds + usize::from(settings.warmup) {
        // A fresh queue per variant: neither publishes into the other's backlog.
        let topics = [
            unique("rabbitmq"),
            unique("rabbitmq"),
            unique("rabbitmq"),
            unique("rabbitmq"),
        ];
        for topic in &topics {
            WorkQueue::for_group(&exchange, topic, "bench")
                .without_dead_letter()
                .declare(&channel)
                .await
                .expect("declare a queue");
        }
        let measured = run_round(&transport, &topics, settings.messages, round).await;
        if !settings.warmup || round > 0 {
            rounds.push(measured);
        }
        for topic in &topics {
            let queue = queue_name(topic, "bench");
            channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await
                .ok();
        }
    }
    report("rabbitmq", &rounds);
    transport.close().await.ok();
}

async fn kafka_run(brokers: &str, settings: &Settings) {
    let config = KafkaConfig::new(brokers)
        .client_id("surety-outbox-bench")
        .create_missing_topics(4)
        .replication_factor(1);
    let transport = KafkaTransport::connect(config)
        .await
        .expect("connects to Kafka");
    let mut rounds = Vec::new();
    for round in 0..settings.rounds + usize::from(settings.warmup) {
        let topics = [
            unique("kafka"),
            unique("kafka"),
            unique("kafka"),
            unique("kafka"),
        ];
        let measured = run_round(&transport, &topics, settings.messages, round).await;
        if !settings.warmup || round > 0 {
            rounds.push(measured);
        }
    }
    report("kafka", &rounds);
    transport.close().await.ok();
}

/// One round: each variant on a topic of its own (`topics[0]` direct,
/// `topics[1]` control, `topics[2]` relay, `topics[3]` direct per key),
/// which eight messages readied untimed (a Kafka topic is created, its
/// partition leaders known); direct, control, direct per key, relay in
/// even rounds, the reverse in odd ones. Returns relay rate / direct rate,
/// control rate / direct rate and relay rate / direct-per-key rate.
async fn run_round<P: Publisher + Clone + 'static>(
    publisher: &P,
    topics: &[String; 4],
    n: usize,
    round: usize,
) -> Round {
    for topic in topics {
        for envelope in envelopes(8) {
            publisher
                .publish(topic, envelope)
                .await
                .expect("a warm-up publish");
        }
    }
    let window = KEYS * per_key();
    let (direct, control, keyed, relay) = if round.is_multiple_of(2) {
        let direct = direct(publisher, &topics[0], n, window).await;
        let control = self::direct(publisher, &topics[1], n, window).await;
        let keyed = direct_per_key(publisher, &topics[3], n).await;
        (
            direct,
            control,
            keyed,
            relay(publisher, &topics[2], n).await,
        )
    } else {
        let relay = relay(publisher, &topics[2], n).await;
        let keyed = direct_per_key(publisher, &topics[3], n).await;
        let control = direct(publisher, &topics[1], n, window).await;
        (
            direct(publisher, &topics[0], n, window).await,
            control,
            keyed,
            relay,
        )
    };
    let (direct_rate, control_rate, keyed_rate, relay_rate) = (
        rate(n, direct.took),
        rate(n, control.took),
        rate(n, keyed.took),
        rate(n, relay.took),
    );
    let (direct_cpu, relay_cpu) = (cpu_per_message(n, direct), cpu_per_message(n, relay));
    let (ratio, noise) = (relay_rate / direct_rate, control_rate / direct_rate);
    println!(
        "round {round}: direct {direct_rate:.0} msg/s, control {control_rate:.0} msg/s ({noise:.2}), \
         direct per key {keyed_rate:.0} msg/s ({:.2}), relay {relay_rate:.0} msg/s, ratio {ratio:.2}, \
         to direct per key {:.2} (window {window}); CPU per message: direct {direct_cpu:.1} µs, \
         relay {relay_cpu:.1} µs",
        keyed_rate / direct_rate,
        relay_rate / keyed_rate,
    );
    Round {
        ratio,
        noise,
        to_keyed: relay_rate / keyed_rate,
        direct_cpu,
        relay_cpu,
    }
}

/// One round's ratios and CPU per message (µs).
struct Round {
    ratio: f64,
    noise: f64,
    to_keyed: f64,
    direct_cpu: f64,
    relay_cpu: f64,
}

/// The direct publisher under the relay's per-key rule: at most
/// `in_flight_per_key` messages of a key unconfirmed, the next one of a
/// key sent when one of its own confirms (so at most 256 ×
/// `in_flight_per_key` in flight, like the relay). It shows what the rule
/// itself costs on the broker, apart from the relay's own work.
async fn direct_per_key<P: Publisher>(publisher: &P, topic: &str, n: usize) -> Window {
    let messages = envelopes(n);
    let limit = per_key();
    let started = Started::now();
    let work = async {
        let mut queues: Vec<std::collections::VecDeque<Envelope>> = (0..KEYS)
            .map(|_| std::collections::VecDeque::new())
            .collect();
        for (i, envelope) in messages.into_iter().enumerate() {
            queues[i % KEYS].push_back(envelope);
        }
        let mut pending = FuturesUnordered::new();
        let confirming = |key: usize, confirmation: surety_core::Confirmation| async move {
            (key, confirmation.await)
        };
        for _ in 0..limit {
            for (key, queue) in queues.iter_mut().enumerate() {
                if let Some(envelope) = queue.pop_front() {
                    let confirmation = publisher.send(topic, envelope).await.expect("sent");
                    pending.push(confirming(key, confirmation));
                }
            }
        }
        while let Some((key, result)) = pending.next().await {
            result.expect("confirmed");
            if let Some(envelope) = queues[key].pop_front() {
                let confirmation = publisher.send(topic, envelope).await.expect("sent");
                pending.push(confirming(key, confirmation));
            }
        }
    };
    tokio::time::timeout(STEP_LIMIT, work)
        .await
        .expect("the per-key direct publishes finish in time");
    started.stop()
}

/// The relay's rows in flight per key (`SURETY_BENCH_PER_KEY`, default 1).
fn per_key() -> usize {
    env("SURETY_BENCH_PER_KEY").unwrap_or(1)
}

/// A positive number from the environment variable `name`.
fn env(name: &str) -> Option<usize> {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|v| *v > 0)
}

/// A timed window: wall time and this process's CPU time over it.
#[derive(Clone, Copy)]
struct Window {
    took: Duration,
    cpu: Option<Duration>,
}

/// The start of a [`Window`].
struct Started {
    wall: Instant,
    cpu: Option<Duration>,
}

impl Started {
    fn now() -> Self {
        Self {
            wall: Instant::now(),
            cpu: surety_testkit::cpu::process_cpu(),
        }
    }

    fn stop(self) -> Window {
        let took = self.wall.elapsed();
        let cpu = match (self.cpu, surety_testkit::cpu::process_cpu()) {
            (Some(before), Some(after)) => Some(after.saturating_sub(before)),
            _ => None,
        };
        Window { took, cpu }
    }
}

/// CPU per message in µs (NaN where the process's CPU time is unreadable).
fn cpu_per_message(n: usize, window: Window) -> f64 {
    window
        .cpu
        .map_or(f64::NAN, |cpu| cpu.as_secs_f64() * 1e6 / n as f64)
}

fn rate(n: usize, took: Duration) -> f64 {
    n as f64 / took.as_secs_f64().max(1e-9)
}

async fn direct<P: Publisher>(publisher: &P, topic: &str, n: usize, window: usize) -> Window {
    let messages = envelopes(n);
    let started = Started::now();
    let mut pending: FuturesUnordered<surety_core::Confirmation> = FuturesUnordered::new();
    let work = async {
        for envelope in messages {
            if pending.len() >= window
                && let Some(result) = pending.next().await
            {
                result.expect("confirmed");
            }
            pending.push(publisher.send(topic, envelope).await.expect("sent"));
        }
        while let Some(result) = pending.next().await {
            result.expect("confirmed");
        }
    };
    tokio::time::timeout(STEP_LIMIT, work)
        .await
        .expect("the direct publishes finish in time");
    started.stop()
}

async fn relay<P: Publisher + Clone + 'static>(publisher: &P, topic: &str, n: usize) -> Window {
    let db = TempSqlite::new(4, Duration::from_secs(10)).await;
    surety_outbox::sqlite::migrate(&db.pool)
        .await
        .expect("migrates");
    for chunk in envelopes(n).chunks(100) {
        let mut tx = db.pool.begin().await.expect("a transaction");
        for envelope in chunk {
            SqliteOutbox::enqueue(&mut tx, topic, envelope)
                .await
                .expect("enqueued");
        }
        tx.commit().await.expect("committed");
    }
    let store = SqliteOutbox::new(db.pool.clone());
    let mut relay = Relay::new(store.clone(), publisher.clone());
    if let Some(rows) = env("SURETY_BENCH_BATCH") {
        relay = relay.batch_size(rows);
    }
    relay = relay.in_flight_per_key(per_key());
    let started = Started::now();
    let work = async {
        loop {
            let cycle = relay.run_once().await.expect("a relay cycle");
            assert_eq!(cycle.retried + cycle.parked, 0, "{cycle:?}");
            if cycle.fetched == 0 {
                break;
            }
        }
    };
    tokio::time::timeout(STEP_LIMIT, work)
        .await
        .expect("the relay finishes in time");
    let took = started.stop();
    let backlog = store.backlog().await.expect("the backlog");
    assert_eq!(backlog.pending, 0, "{backlog:?}");
    took
}

/// The median of `values` (NaN for none).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

fn report(broker: &str, rounds: &[Round]) {
    if rounds.is_empty() {
        return;
    }
    let median_of = |f: fn(&Round) -> f64| median(rounds.iter().map(f).collect());
    let ratio = median_of(|r| r.ratio);
    let low = rounds.iter().map(|r| r.noise).fold(1.0, f64::min);
    let high = rounds.iter().map(|r| r.noise).fold(1.0, f64::max);
    let noise = if (low..=high).contains(&ratio) {
        " (within noise)"
    } else {
        ""
    };
    let (direct_cpu, relay_cpu) = (median_of(|r| r.direct_cpu), median_of(|r| r.relay_cpu));
    println!(
        "{broker}: relay / direct publish (window {}), median of {} rounds: {ratio:.2} \
         (control {low:.2}–{high:.2}; target ≥ {TARGET}: {}{noise}); \
         CPU per message: direct {direct_cpu:.1} µs, relay {relay_cpu:.1} µs ({:.2}x)",
        KEYS * per_key(),
        rounds.len(),
        if ratio >= TARGET { "PASS" } else { "BELOW" },
        relay_cpu / direct_cpu,
    );
    println!(
        "{broker}: relay / direct publish under the same per-key rule, median: {:.2}",
        median_of(|r| r.to_keyed)
    );
}
