//! The in-memory transport: the embedded default for examples, tests and
//! single-process deployments.
//!
//! It behaves like a small broker: named topics, consumer groups that each
//! receive every message, competing members within a group, redelivery on
//! nack and on deliveries dropped without being settled, per-key ordering and
//! bounded buffers that make publishers wait (backpressure).
//!
//! Messages published to a topic that no group has joined yet are held (up
//! to the capacity) and handed to the first group that subscribes, like a
//! durable queue declared by the publisher. Rejected messages are kept per
//! group and can be read back with [`MemoryTransport::rejected`], like a
//! broker's dead-letter queue. Nothing survives the process.
//!
//! ```
//! use futures::StreamExt;
//! use surety_core::{Envelope, Publisher, Subscriber, memory::MemoryTransport};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> surety_core::Result<()> {
//! let transport = MemoryTransport::with_capacity(1_000);
//! let mut stream = transport.subscribe("orders", "shipping").await?;
//! transport.publish("orders", Envelope::builder("/orders", "order.placed").build()).await?;
//!
//! let first = stream.next().await.expect("delivered")?;
//! first.nack(true).await?; // not now: deliver again
//! let again = stream.next().await.expect("redelivered")?;
//! assert_eq!(again.info().delivery_count, Some(2));
//! again.ack().await?;
//! assert_eq!(transport.depth("orders", "shipping"), 0);
//! # Ok(()) }
//! ```

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use futures::StreamExt;
use tokio::sync::Notify;

pub use crate::memory_log::{DEFAULT_PARTITIONS, MemoryLog};

use crate::envelope::Envelope;
use crate::error::{Result, TransportError};
use crate::port::{
    Close, Confirmation, Delivery, DeliveryInfo, DeliveryStream, Publisher, Receipt, Settle,
    Subscriber,
};
use crate::transport::{require_name, settle_failed};

/// The `messaging.system` name of the in-memory transport.
pub const SYSTEM: &str = "memory";

/// Default capacity of each group's buffer.
pub const DEFAULT_CAPACITY: usize = 10_000;

/// An in-memory broker. Cheap to clone; clones share the same topics.
#[derive(Clone)]
pub struct MemoryTransport {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    changed: Notify,
    capacity: usize,
}

#[derive(Default)]
struct State {
    closed: bool,
    next_tag: u64,
    topics: HashMap<String, Topic>,
}

#[derive(Default)]
struct Topic {
    next_offset: i64,
    /// Messages published before any group joined.
    held: VecDeque<Entry>,
    groups: HashMap<String, Group>,
}

#[derive(Default)]
struct Group {
    /// Waiting messages, in offset order.
    pending: VecDeque<Entry>,
    /// Delivered, not yet settled, by delivery tag.
    in_flight: HashMap<u64, Entry>,
    /// Partition keys with a message in flight.
    busy_keys: HashSet<String>,
    rejected: Vec<Envelope>,
}

#[derive(Clone)]
struct Entry {
    offset: i64,
    /// When it was published.
    published: chrono::DateTime<chrono::Utc>,
    deliveries: u32,
    envelope: Envelope,
}

impl Group {
    fn len(&self) -> usize {
        self.pending.len() + self.in_flight.len()
    }

    /// Takes the first pending message whose key has nothing in flight.
    fn take_next(&mut self, tag: u64) -> Option<Entry> {
        let index = self.pending.iter().position(|e| {
            e.envelope
                .partition_key
                .as_ref()
                .is_none_or(|k| !self.busy_keys.contains(k))
        })?;
        let mut entry = self.pending.remove(index)?;
        entry.deliveries += 1;
        if let Some(key) = &entry.envelope.partition_key {
            self.busy_keys.insert(key.clone());
        }
        self.in_flight.insert(tag, entry.clone());
        Some(entry)
    }

    fn settle(&mut self, tag: u64) -> Option<Entry> {
        let entry = self.in_flight.remove(&tag)?;
        if let Some(key) = &entry.envelope.partition_key {
            self.busy_keys.remove(key);
        }
        Some(entry)
    }

    fn requeue(&mut self, entry: Entry) {
        let at = self.pending.partition_point(|e| e.offset < entry.offset);
        self.pending.insert(at, entry);
    }
}

impl MemoryTransport {
    /// A transport whose groups buffer up to [`DEFAULT_CAPACITY`] messages.
    pub fn new() -> Self {
        Self::with_capacity(DEFAULT_CAPACITY)
    }

    /// A transport whose groups buffer up to `capacity` messages each
    /// (pending plus in flight); a publish to a topic with a full group waits.
    /// A capacity of 0 is treated as 1.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                changed: Notify::new(),
                capacity: capacity.max(1),
            }),
        }
    }

    /// Messages waiting or in flight for `group` on `topic`.
    pub fn depth(&self, topic: &str, group: &str) -> usize {
        let state = self.inner.lock();
        state
            .topics
            .get(topic)
            .and_then(|t| t.groups.get(group))
            .map_or(0, Group::len)
    }

    /// Messages `group` rejected on `topic` (or nacked without requeue), oldest first.
    pub fn rejected(&self, topic: &str, group: &str) -> Vec<Envelope> {
        let state = self.inner.lock();
        state
            .topics
            .get(topic)
            .and_then(|t| t.groups.get(group))
            .map(|g| g.rejected.clone())
            .unwrap_or_default()
    }

    fn settle(&self, topic: &str, group: &str, tag: u64, action: Action) -> Result<()> {
        let mut state = self.inner.lock();
        if state.closed {
            return Err(settle_failed("the in-memory transport is closed"));
        }
        let group = state
            .topics
            .get_mut(topic)
            .and_then(|t| t.groups.get_mut(group))
            .ok_or_else(|| settle_failed("unknown group"))?;
        let entry = group
            .settle(tag)
            .ok_or_else(|| settle_failed("delivery already settled"))?;
        match action {
            Action::Ack => {}
            Action::Requeue => group.requeue(entry),
            Action::Reject => group.rejected.push(entry.envelope),
        }
        drop(state);
        self.inner.changed.notify_waiters();
        Ok(())
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated
        // in a way that matters more than losing the transport: keep going.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Default for MemoryTransport {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MemoryTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.inner.lock();
        f.debug_struct("MemoryTransport")
            .field("capacity", &self.inner.capacity)
            .field("topics", &state.topics.len())
            .field("closed", &state.closed)
            .finish()
    }
}

impl Publisher for MemoryTransport {
    async fn send(&self, topic: &str, envelope: Envelope) -> Result<Confirmation> {
        require_name("topic", topic)?;
        let capacity = self.inner.capacity;
        loop {
            let notified = self.inner.changed.notified();
            {
                let mut state = self.inner.lock();
                if state.closed {
                    return Err(TransportError::closed("the in-memory transport is closed"));
                }
                let t = state.topics.entry(topic.to_owned()).or_default();
                let full = if t.groups.is_empty() {
                    t.held.len() >= capacity
                } else {
                    t.groups.values().any(|g| g.len() >= capacity)
                };
                if !full {
                    let offset = t.next_offset;
                    t.next_offset += 1;
                    let entry = Entry {
                        offset,
                        published: chrono::Utc::now(),
                        deliveries: 0,
                        envelope,
                    };
                    if t.groups.is_empty() {
                        t.held.push_back(entry);
                    } else {
                        for group in t.groups.values_mut() {
                            group.pending.push_back(entry.clone());
                        }
                    }
                    drop(state);
                    self.inner.changed.notify_waiters();
                    return Ok(Confirmation::ready(Ok(
                        Receipt::new(topic).at(None, Some(offset))
                    )));
                }
            }
            notified.await;
        }
    }
}

impl Subscriber for MemoryTransport {
    async fn subscribe(&self, topic: &str, group: &str) -> Result<DeliveryStream> {
        require_name("topic", topic)?;
        require_name("group", group)?;
        {
            let mut state = self.inner.lock();
            if state.closed {
                return Err(TransportError::closed("the in-memory transport is closed"));
            }
            let t = state.topics.entry(topic.to_owned()).or_default();
            if !t.groups.contains_key(group) {
                let g = Group {
                    pending: std::mem::take(&mut t.held),
                    ..Group::default()
                };
                t.groups.insert(group.to_owned(), g);
            }
        }
        let transport = self.clone();
        let (topic, group) = (topic.to_owned(), group.to_owned());
        Ok(futures::stream::unfold((), move |()| {
            let transport = transport.clone();
            let (topic, group) = (topic.clone(), group.clone());
            async move {
                let delivery = transport.next_delivery(&topic, &group).await?;
                Some((Ok(delivery), ()))
            }
        })
        .fuse()
        .boxed())
    }
}

impl MemoryTransport {
    /// Waits for the next deliverable message; `None` once closed.
    async fn next_delivery(&self, topic: &str, group: &str) -> Option<Delivery> {
        // A consumer that keeps dropping deliveries gets them back at once;
        // spending tokio's cooperative budget keeps such a loop from starving
        // timers and other tasks.
        tokio::task::consume_budget().await;
        loop {
            let notified = self.inner.changed.notified();
            {
                let mut state = self.inner.lock();
                if state.closed {
                    return None;
                }
                let tag = state.next_tag;
                let entry = state
                    .topics
                    .get_mut(topic)
                    .and_then(|t| t.groups.get_mut(group))
                    .and_then(|g| g.take_next(tag));
                if let Some(entry) = entry {
                    state.next_tag += 1;
                    let mut info = DeliveryInfo::new(SYSTEM, topic, group);
                    info.offset = Some(entry.offset);
                    info.timestamp = Some(entry.published);
                    info.redelivered = entry.deliveries > 1;
                    info.delivery_count = Some(entry.deliveries);
                    let settle = MemorySettle {
                        transport: self.clone(),
                        topic: topic.to_owned(),
                        group: group.to_owned(),
                        tag,
                        settled: false,
                    };
                    return Some(Delivery::new(entry.envelope, info, Box::new(settle)));
                }
            }
            notified.await;
        }
    }
}

impl Close for MemoryTransport {
    async fn close(&self) -> Result<()> {
        self.inner.lock().closed = true;
        self.inner.changed.notify_waiters();
        Ok(())
    }
}

enum Action {
    Ack,
    Requeue,
    Reject,
}

struct MemorySettle {
    transport: MemoryTransport,
    topic: String,
    group: String,
    tag: u64,
    settled: bool,
}

impl MemorySettle {
    fn finish(&mut self, action: Action) -> Result<()> {
        self.settled = true;
        self.transport
            .settle(&self.topic, &self.group, self.tag, action)
    }
}

impl fmt::Debug for MemorySettle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemorySettle")
            .field("topic", &self.topic)
            .field("group", &self.group)
            .field("tag", &self.tag)
            .finish()
    }
}

#[async_trait::async_trait]
impl Settle for MemorySettle {
    async fn ack(mut self: Box<Self>) -> Result<()> {
        self.finish(Action::Ack)
    }

    async fn nack(mut self: Box<Self>, requeue: bool) -> Result<()> {
        self.finish(if requeue {
            Action::Requeue
        } else {
            Action::Reject
        })
    }

    async fn reject(mut self: Box<Self>) -> Result<()> {
        self.finish(Action::Reject)
    }
}

impl Drop for MemorySettle {
    fn drop(&mut self) {
        if !self.settled {
            // Dropped without a decision: deliver again. An error only means
            // the transport is closed, and then there is no one to deliver to.
            let _ = self
                .transport
                .settle(&self.topic, &self.group, self.tag, Action::Requeue);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TransportErrorKind;
    use std::time::Duration;

    fn env(key: &str, n: u32) -> Envelope {
        Envelope::builder("/test", "t")
            .partition_key(key)
            .payload(n.to_string())
            .build()
    }

    #[tokio::test]
    async fn messages_before_the_first_group_are_held_for_it() {
        let t = MemoryTransport::new();
        t.publish("a", env("k", 1)).await.unwrap();
        let mut s = t.subscribe("a", "g").await.unwrap();
        let d = s.next().await.unwrap().unwrap();
        assert_eq!(d.envelope().payload, "1");
    }

    #[tokio::test]
    async fn a_full_group_makes_the_publisher_wait() {
        let t = MemoryTransport::with_capacity(2);
        let mut s = t.subscribe("a", "g").await.unwrap();
        t.publish("a", env("k1", 1)).await.unwrap();
        t.publish("a", env("k2", 2)).await.unwrap();
        let blocked = tokio::time::timeout(Duration::from_millis(50), t.publish("a", env("k3", 3)));
        assert!(blocked.await.is_err(), "third publish should wait");
        let d = s.next().await.unwrap().unwrap();
        d.ack().await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), t.publish("a", env("k3", 3)))
            .await
            .expect("publish resumes once there is room")
            .unwrap();
    }

    #[tokio::test]
    async fn a_busy_key_does_not_block_other_keys() {
        let t = MemoryTransport::new();
        let mut s = t.subscribe("a", "g").await.unwrap();
        t.publish("a", env("k", 1)).await.unwrap();
        t.publish("a", env("k", 2)).await.unwrap();
        t.publish("a", env("other", 3)).await.unwrap();
        let first = s.next().await.unwrap().unwrap();
        let next = s.next().await.unwrap().unwrap();
        assert_eq!(next.envelope().payload, "3", "k#2 waits for k#1");
        drop(first); // unsettled: k#1 comes back before k#2
        let again = s.next().await.unwrap().unwrap();
        assert_eq!(again.envelope().payload, "1");
        assert!(again.info().redelivered);
        next.ack().await.unwrap();
    }

    #[tokio::test]
    async fn settling_twice_is_impossible_and_reject_keeps_the_message() {
        let t = MemoryTransport::new();
        let mut s = t.subscribe("a", "g").await.unwrap();
        t.publish("a", env("k", 1)).await.unwrap();
        let d = s.next().await.unwrap().unwrap();
        d.reject().await.unwrap();
        assert_eq!(t.depth("a", "g"), 0);
        assert_eq!(t.rejected("a", "g").len(), 1);
    }

    #[tokio::test]
    async fn empty_names_are_config_errors() {
        let t = MemoryTransport::new();
        let err = t.publish("", env("k", 1)).await.unwrap_err();
        assert_eq!(err.kind(), TransportErrorKind::Config);
        let err = t.subscribe("a", "").await.err().unwrap();
        assert_eq!(err.kind(), TransportErrorKind::Config);
    }
}
