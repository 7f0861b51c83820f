//! `single_active_consumer`: of two processes in one group, one receives
//! every message (in order) while the other stands by, and the other takes
//! over when the first leaves.

mod common;

use common::{config, connect, next, unique, url};
use surety_core::{Close, Envelope, Publisher, Subscriber};

fn keyed(n: usize) -> Envelope {
    Envelope::builder("/test", "test.sac")
        .partition_key("order-1")
        .payload(n.to_string())
        .build()
}

#[tokio::test]
async fn one_member_receives_everything_until_it_leaves() {
    let Some(url) = url() else { return };
    let first = connect(config(&url).single_active_consumer(true)).await;
    let second = connect(config(&url).single_active_consumer(true)).await;
    let topic = unique("surety-rabbitmq-test.sac");
    let _cleanup = surety_testkit::rabbitmq::Cleanup::new(url.clone()).prefix(topic.clone());
    let mut active = first.subscribe(&topic, "g").await.unwrap();
    let mut standby = second.subscribe(&topic, "g").await.unwrap();

    for n in 0..10 {
        first.publish(&topic, keyed(n)).await.unwrap();
    }
    // Without a single active consumer the broker would share these
    // between the two members; here the first gets them all, in order.
    for n in 0..10 {
        let delivery = next(&mut active).await;
        assert_eq!(delivery.envelope().payload, n.to_string().as_bytes());
        delivery.ack().await.unwrap();
    }

    // The active member leaves: the standby takes over, in order.
    drop(active);
    first.close().await.unwrap();
    for n in 10..15 {
        second.publish(&topic, keyed(n)).await.unwrap();
    }
    for n in 10..15 {
        let delivery = next(&mut standby).await;
        assert_eq!(delivery.envelope().payload, n.to_string().as_bytes());
        delivery.ack().await.unwrap();
    }
    second.close().await.unwrap();
}
