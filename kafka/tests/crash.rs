//! A consumer killed (SIGKILL) after handling a message but before acking
//! it: the message is delivered again to the group's next member, and the
//! committed offset never passed it, although a later message was acked.
//!
//! Partition 0 holds m1, m2, m3; partition 1 holds n1. The child process
//! receives all four, "handles" m2 without acking it, acks m3 and m1 (out of
//! order) and n1. It waits until partition 0's committed offset is 1 (m1
//! done) and partition 1's is 1: librdkafka commits every partition's
//! stored offset together, so the commit that carried n1 also carried
//! partition 0's position after the m3 ack, and it is still 1. Then the
//! parent kills it. A new member of the group receives m2 and then m3
//! (acked, but after the unsettled m2, so its offset was never committed),
//! and neither m1 nor n1.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use futures::StreamExt;
use surety_core::{Close, Delivery, Envelope, Subscriber};
use surety_kafka::rdkafka::ClientConfig;
use surety_kafka::rdkafka::message::{Header, OwnedHeaders};
use surety_kafka::rdkafka::producer::{FutureProducer, FutureRecord};
use surety_kafka::{KafkaMetrics, KafkaTransport};
use surety_testkit::wait::eventually;

const CHILD: &str = "SURETY_KAFKA_CRASH_CHILD";
const TOPIC: &str = "SURETY_KAFKA_CRASH_TOPIC";
const GROUP: &str = "SURETY_KAFKA_CRASH_GROUP";
const LIMIT: Duration = Duration::from_secs(30);

/// Kills the child process however the test ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Produces `envelope` to an explicit partition, in the adapter's format.
async fn produce(producer: &FutureProducer, topic: &str, partition: i32, envelope: &Envelope) {
    let (headers, payload) = envelope.to_binary();
    let mut record_headers = OwnedHeaders::new();
    for (key, value) in headers.iter() {
        record_headers = record_headers.insert(Header {
            key,
            value: Some(value),
        });
    }
    let record = FutureRecord::<(), _>::to(topic)
        .partition(partition)
        .payload(payload.as_ref())
        .headers(record_headers);
    producer.send(record, LIMIT).await.expect("produced");
}

/// The child: handles m2 without acking it, acks the rest, reports and
/// waits to be killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "runs only as the child process of consumer_killed_before_ack_gets_its_message_redelivered"]
async fn crash_child() {
    let (Ok(brokers), Ok(topic), Ok(group)) = (
        std::env::var(surety_testkit::services::KAFKA_BROKERS),
        std::env::var(TOPIC),
        std::env::var(GROUP),
    ) else {
        panic!("{CHILD} runs only as a child process");
    };
    let metrics = KafkaMetrics::default();
    let kafka = KafkaTransport::connect(common::config(&brokers).metrics(metrics.clone()))
        .await
        .expect("child connects");
    let mut stream = kafka.subscribe(&topic, &group).await.expect("subscribe");
    let mut held: BTreeMap<(i32, i64), Delivery> = BTreeMap::new();
    while held.len() < 4 {
        let delivery = common::next(&mut stream, LIMIT).await;
        let info = delivery.info();
        let key = (
            info.partition.expect("partition"),
            info.offset.expect("offset"),
        );
        held.insert(key, delivery);
    }
    let m2 = held.remove(&(0, 1)).expect("m2 at partition 0 offset 1");
    println!("SURETY-CHILD HANDLED {}", m2.envelope().id);
    let take = |held: &mut BTreeMap<_, Delivery>, key| held.remove(&key).expect("delivered");
    take(&mut held, (0, 2)).ack().await.expect("ack m3");
    take(&mut held, (0, 0)).ack().await.expect("ack m1");
    eventually(LIMIT, "partition 0 committed at 1", || async {
        metrics
            .committed_offset(&topic, &group, 0)
            .filter(|&c| c == 1)
    })
    .await;
    take(&mut held, (1, 0)).ack().await.expect("ack n1");
    eventually(LIMIT, "partition 1 committed at 1", || async {
        metrics
            .committed_offset(&topic, &group, 1)
            .filter(|&c| c == 1)
    })
    .await;
    println!(
        "SURETY-CHILD READY {:?}",
        metrics.committed_offset(&topic, &group, 0)
    );
    // Killed here, m2 unsettled.
    std::future::pending::<()>().await;
    drop(m2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_killed_before_ack_gets_its_message_redelivered() {
    common::init_tracing();
    let Some(brokers) = common::brokers() else {
        return;
    };
    let kafka = KafkaTransport::connect(common::config(&brokers).create_missing_topics(2))
        .await
        .expect("connect");
    let topic = common::unique("crash");
    let _cleanup = common::delete_on_drop(&brokers, &[&topic]);
    let group = common::unique("group");
    kafka.ensure_topic(&topic).await.expect("topic");
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .expect("producer");
    let messages: Vec<Envelope> = ["m1", "m2", "m3", "n1"]
        .iter()
        .map(|name| {
            Envelope::builder("/test", "crash.test")
                .payload(*name)
                .build()
        })
        .collect();
    for (n, envelope) in messages.iter().enumerate() {
        produce(&producer, &topic, if n < 3 { 0 } else { 1 }, envelope).await;
    }
    let id = |name: &str| {
        messages
            .iter()
            .find(|m| m.payload == name)
            .map(|m| m.id.clone())
            .expect("known message")
    };

    let mut child = KillOnDrop(
        Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "--ignored",
                "--exact",
                "crash_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD, "1")
            .env(surety_testkit::services::KAFKA_BROKERS, &brokers)
            .env(TOPIC, &topic)
            .env(GROUP, &group)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("child started"),
    );
    let stdout = child.0.stdout.take().expect("child stdout");
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut handled = None;
    let ready = loop {
        let line = tokio::time::timeout(2 * LIMIT, lines.recv())
            .await
            .expect("the child reports within the deadline")
            .expect("the child reported READY before exiting");
        // libtest may print "test crash_child ... " on the same line.
        if let Some((_, id)) = line.split_once("SURETY-CHILD HANDLED ") {
            handled = Some(id.trim().to_owned());
        } else if let Some((_, committed)) = line.split_once("SURETY-CHILD READY ") {
            break committed.trim().to_owned();
        }
    };
    assert_eq!(handled.as_deref(), Some(id("m2").as_str()));
    // The out-of-order ack of m3 did not move partition 0 past m2.
    assert_eq!(ready, "Some(1)");
    child.0.kill().expect("SIGKILL the child");
    child.0.wait().expect("child reaped");

    // A new member (once the dead one's session expired) gets m2 again,
    // then m3; not m1, not n1.
    let mut stream = kafka.subscribe(&topic, &group).await.expect("rejoin");
    let first = common::next(&mut stream, LIMIT).await;
    assert_eq!(first.envelope().id, id("m2"), "m2 comes back first");
    assert_eq!(first.info().offset, Some(1));
    let second = common::next(&mut stream, LIMIT).await;
    assert_eq!(second.envelope().id, id("m3"));
    first.ack().await.expect("ack");
    second.ack().await.expect("ack");
    if let Ok(extra) = tokio::time::timeout(Duration::from_secs(1), stream.next()).await {
        let extra = extra.map(|d| d.map(|d| d.envelope().payload.clone()));
        panic!("nothing else may come back, got {extra:?}");
    }
    kafka.close().await.expect("close");
}
