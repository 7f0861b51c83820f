//! The replayable in-memory log: the embedded default for event streams.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use chrono::{DateTime, Utc};
use tokio::sync::Notify;

use crate::envelope::Envelope;
use crate::error::{Result, TransportError};
use crate::log::{
    AssignedPartition, Assignment, LogEvent, LogOptions, LogRecord, LogStream, LogSubscriber,
    StartPosition,
};
use crate::memory::SYSTEM;
use crate::port::{Close, Confirmation, DeliveryInfo, Publisher, Receipt};
use crate::transport::require_name;

/// Default number of partitions of each topic of a [`MemoryLog`].
pub const DEFAULT_PARTITIONS: usize = 4;

/// How many records a reader copies out of one partition per lock.
const READ_BATCH: usize = 256;

/// A replayable in-memory log, the embedded default for event streams (a
/// Kafka topic in a process). Cheap to clone; clones share the same topics.
///
/// Each topic has a fixed number of partitions. A message with a
/// [`partition_key`](Envelope::partition_key) goes to the partition its key
/// hashes to, so one key's messages keep their order; one without a key goes
/// to the next partition in turn. Every message is retained with its offset
/// and publish time until the log is dropped, and is read through
/// [`LogSubscriber`] from any position, by any number of groups. The members
/// of one group share its partitions (partition `p` goes to the
/// `p % members`-th member in joining order); when a member joins or leaves,
/// a partition that moves is [revoked](LogEvent::Revoked) from its old
/// member, and [assigned](LogEvent::Assigned) to the new one only after the
/// old member polled past the revocation. Nothing survives the process.
///
/// ```
/// use surety_core::memory::MemoryLog;
/// use surety_core::{Envelope, Publisher};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> surety_core::Result<()> {
/// let log = MemoryLog::with_partitions(3);
/// let env = Envelope::builder("/orders", "order.placed").partition_key("o-1").build();
/// let receipt = log.publish("orders", env).await?;
/// assert_eq!(receipt.offset, Some(0));
/// assert_eq!(log.end_offsets("orders").iter().sum::<i64>(), 1);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct MemoryLog {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    changed: Notify,
    partitions: usize,
}

#[derive(Default)]
struct State {
    closed: bool,
    next_member: u64,
    topics: HashMap<String, Topic>,
}

struct Topic {
    partitions: Vec<Vec<Stored>>,
    round_robin: usize,
    groups: HashMap<String, Group>,
}

struct Stored {
    envelope: Envelope,
    timestamp: DateTime<Utc>,
}

#[derive(Default)]
struct Group {
    /// Members in joining order.
    members: Vec<u64>,
    /// The member that holds each partition, if any.
    owners: HashMap<i32, u64>,
}

impl Group {
    /// The member partition `p` belongs to once the group settled.
    fn target(&self, partition: i32) -> Option<u64> {
        let n = self.members.len();
        (n > 0).then(|| self.members[partition as usize % n])
    }

    fn release(&mut self, member: u64, partition: i32) {
        if self.owners.get(&partition) == Some(&member) {
            self.owners.remove(&partition);
        }
    }
}

impl Topic {
    fn new(partitions: usize) -> Self {
        Self {
            partitions: (0..partitions).map(|_| Vec::new()).collect(),
            round_robin: 0,
            groups: HashMap::new(),
        }
    }
}

/// The offset `start` designates in a partition holding `records`.
fn resolve(records: &[Stored], start: StartPosition) -> i64 {
    let end = records.len() as i64;
    match start {
        StartPosition::Latest => end,
        StartPosition::Offset(offset) => offset.clamp(0, end),
        StartPosition::Timestamp(t) => records.partition_point(|r| r.timestamp < t) as i64,
        _ => 0,
    }
}

/// A stable hash of a partition key (FNV-1a), so that a key always lands in
/// the same partition.
fn key_hash(key: &str) -> u32 {
    key.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

impl MemoryLog {
    /// A log with [`DEFAULT_PARTITIONS`] partitions per topic.
    pub fn new() -> Self {
        Self::with_partitions(DEFAULT_PARTITIONS)
    }

    /// A log with `partitions` partitions per topic (at least one).
    pub fn with_partitions(partitions: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                state: Mutex::default(),
                changed: Notify::new(),
                partitions: partitions.max(1),
            }),
        }
    }

    /// The number of partitions of each topic.
    pub fn partitions(&self) -> usize {
        self.inner.partitions
    }

    /// The end offset (the next offset to be written) of each partition of
    /// `topic`, by partition number; zeros for a topic never used.
    pub fn end_offsets(&self, topic: &str) -> Vec<i64> {
        let state = self.inner.lock();
        match state.topics.get(topic) {
            Some(t) => t.partitions.iter().map(|p| p.len() as i64).collect(),
            None => vec![0; self.inner.partitions],
        }
    }

    /// Whether [`close`](Close::close) was called.
    pub fn is_closed(&self) -> bool {
        self.inner.lock().closed
    }
}

impl Default for MemoryLog {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MemoryLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryLog")
            .field("partitions", &self.inner.partitions)
            .finish_non_exhaustive()
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Publisher for MemoryLog {
    async fn send(&self, topic: &str, envelope: Envelope) -> Result<Confirmation> {
        require_name("topic", topic)?;
        let receipt = {
            let mut state = self.inner.lock();
            if state.closed {
                return Err(TransportError::closed("the in-memory log is closed"));
            }
            let n = self.inner.partitions;
            let t = state
                .topics
                .entry(topic.to_owned())
                .or_insert_with(|| Topic::new(n));
            let partition = match &envelope.partition_key {
                Some(key) => key_hash(key) as usize % n,
                None => {
                    t.round_robin = t.round_robin.wrapping_add(1);
                    t.round_robin % n
                }
            };
            let records = &mut t.partitions[partition];
            let now = Utc::now();
            // Timestamps never go back within a partition, so a timestamp
            // start is a binary search.
            let timestamp = records.last().map_or(now, |r| r.timestamp.max(now));
            let offset = records.len() as i64;
            records.push(Stored {
                envelope,
                timestamp,
            });
            Receipt::new(topic).at(Some(partition as i32), Some(offset))
        };
        self.inner.changed.notify_waiters();
        Ok(Confirmation::ready(Ok(receipt)))
    }
}

impl Close for MemoryLog {
    async fn close(&self) -> Result<()> {
        self.inner.lock().closed = true;
        self.inner.changed.notify_waiters();
        Ok(())
    }
}

impl LogSubscriber for MemoryLog {
    async fn subscribe_log(
        &self,
        topic: &str,
        group: &str,
        options: LogOptions,
    ) -> Result<LogStream> {
        require_name("topic", topic)?;
        require_name("group", group)?;
        let member = {
            let mut state = self.inner.lock();
            if state.closed {
                return Err(TransportError::closed("the in-memory log is closed"));
            }
            let member = state.next_member;
            state.next_member += 1;
            let n = self.inner.partitions;
            state
                .topics
                .entry(topic.to_owned())
                .or_insert_with(|| Topic::new(n))
                .groups
                .entry(group.to_owned())
                .or_default()
                .members
                .push(member);
            member
        };
        self.inner.changed.notify_waiters();
        let reader = Reader {
            inner: self.inner.clone(),
            topic: topic.to_owned(),
            group: group.to_owned(),
            member,
            options,
            owned: Vec::new(),
            pending: None,
            releasing: Vec::new(),
            buffer: VecDeque::new(),
        };
        Ok(Box::pin(futures::stream::unfold(
            reader,
            |mut reader| async move { reader.next().await.map(|event| (Ok(event), reader)) },
        )))
    }
}

/// A partition a reader holds and reads.
struct Owned {
    partition: i32,
    position: i64,
    caught_up: bool,
}

/// One member's side of a positioned subscription.
struct Reader {
    inner: Arc<Inner>,
    topic: String,
    group: String,
    member: u64,
    options: LogOptions,
    owned: Vec<Owned>,
    /// An assignment handed out, whose seeks apply at the next poll.
    pending: Option<Assignment>,
    /// Partitions revoked, released at the next poll.
    releasing: Vec<i32>,
    buffer: VecDeque<LogEvent>,
}

impl Reader {
    async fn next(&mut self) -> Option<LogEvent> {
        loop {
            if let Some(event) = self.buffer.pop_front() {
                return Some(event);
            }
            let notified = self.inner.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let mut released = false;
            {
                let mut state = self.inner.lock();
                if state.closed {
                    return None;
                }
                let topic = state.topics.get_mut(&self.topic)?;
                let Topic {
                    partitions, groups, ..
                } = topic;
                let group = groups.get_mut(&self.group)?;
                for partition in self.releasing.drain(..) {
                    group.release(self.member, partition);
                    released = true;
                }
                if let Some(assignment) = self.pending.take() {
                    for (partition, start) in assignment.take_seeks(self.options.start) {
                        let records = partitions
                            .get(partition as usize)
                            .map_or(&[][..], Vec::as_slice);
                        self.owned.push(Owned {
                            partition,
                            position: resolve(records, start),
                            caught_up: false,
                        });
                    }
                    self.owned.sort_by_key(|o| o.partition);
                }
                let revoked: Vec<i32> = self
                    .owned
                    .iter()
                    .map(|o| o.partition)
                    .filter(|p| group.target(*p) != Some(self.member))
                    .collect();
                if !revoked.is_empty() {
                    self.owned.retain(|o| !revoked.contains(&o.partition));
                    self.releasing.clone_from(&revoked);
                    drop(state);
                    if released {
                        self.inner.changed.notify_waiters();
                    }
                    return Some(LogEvent::Revoked(revoked));
                }
                let mut assigned = Vec::new();
                for partition in 0..partitions.len() as i32 {
                    if group.target(partition) == Some(self.member)
                        && !group.owners.contains_key(&partition)
                    {
                        group.owners.insert(partition, self.member);
                        let end = partitions[partition as usize].len() as i64;
                        assigned.push(AssignedPartition::new(partition, 0, end));
                    }
                }
                if !assigned.is_empty() {
                    let assignment = Assignment::new(assigned);
                    self.pending = Some(assignment.clone());
                    drop(state);
                    if released {
                        self.inner.changed.notify_waiters();
                    }
                    return Some(LogEvent::Assigned(assignment));
                }
                for owned in &mut self.owned {
                    let records = &partitions[owned.partition as usize];
                    let end = records.len() as i64;
                    let from = owned.position.clamp(0, end) as usize;
                    let to = (from + READ_BATCH).min(records.len());
                    for (i, stored) in records[from..to].iter().enumerate() {
                        let mut info = DeliveryInfo::new(SYSTEM, &self.topic, &self.group);
                        info.partition = Some(owned.partition);
                        info.offset = Some((from + i) as i64);
                        info.timestamp = Some(stored.timestamp);
                        self.buffer.push_back(LogEvent::Record(LogRecord::new(
                            stored.envelope.clone(),
                            info,
                        )));
                    }
                    owned.position = to as i64;
                    if !owned.caught_up && owned.position >= end {
                        owned.caught_up = true;
                        self.buffer.push_back(LogEvent::CaughtUp {
                            partition: owned.partition,
                            end_offset: end,
                        });
                    }
                }
            }
            if released {
                self.inner.changed.notify_waiters();
            }
            if self.buffer.is_empty() {
                notified.await;
            }
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        {
            let mut state = self.inner.lock();
            let Some(group) = state
                .topics
                .get_mut(&self.topic)
                .and_then(|t| t.groups.get_mut(&self.group))
            else {
                return;
            };
            group.members.retain(|m| *m != self.member);
            group.owners.retain(|_, m| *m != self.member);
        }
        self.inner.changed.notify_waiters();
    }
}
