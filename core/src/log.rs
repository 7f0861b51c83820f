//! Positioned, replayable subscriptions to logs: the [`LogSubscriber`]
//! capability, beside [`Subscriber`](crate::Subscriber).
//!
//! A log (a Kafka topic, a [`MemoryLog`](crate::memory::MemoryLog) topic)
//! keeps its messages after they were read, in partitions, each an ordered
//! sequence of offsets. A positioned subscription reads it from where the
//! *caller* says, and the caller keeps its positions itself (in the same
//! database transaction as the read model it builds, say): records are not
//! acknowledged to the broker, and nothing is committed to the broker's
//! group offsets.
//!
//! The broker's consumer group still shares the partitions among the
//! members that subscribed with the same group name. The stream tells the
//! caller what it owns:
//!
//! 1. [`LogEvent::Assigned`] comes before any record of the partitions it
//!    names. The caller loads its checkpoints and calls
//!    [`Assignment::seek`] for each partition; records flow from those
//!    positions once the stream is polled again. A partition it does not
//!    seek starts at [`LogOptions::start`].
//! 2. [`LogEvent::Record`] carries the envelope and its partition, offset
//!    and broker timestamp ([`LogRecord::info`]).
//! 3. [`LogEvent::CaughtUp`] says a partition's position reached the end
//!    of the partition (once per assignment of that partition).
//! 4. [`LogEvent::Revoked`] comes after the last record of the partitions it
//!    names and before another member gets them: the caller flushes what it
//!    holds for them. The partitions are handed on when the stream is
//!    polled again.
//!
//! ```
//! use futures::StreamExt;
//! use surety_core::log::{LogEvent, LogOptions, LogSubscriber, StartPosition};
//! use surety_core::memory::MemoryLog;
//! use surety_core::{Envelope, Publisher};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> surety_core::Result<()> {
//! let log = MemoryLog::with_partitions(1);
//! for n in 0..3 {
//!     let env = Envelope::builder("/orders", "order.placed").payload(n.to_string()).build();
//!     log.publish("orders", env).await?;
//! }
//!
//! // The position the caller stored last time: offset 1 was the last handled.
//! let stored_next = 2;
//! let mut events = log.subscribe_log("orders", "read-model", LogOptions::default()).await?;
//! let Some(Ok(LogEvent::Assigned(assignment))) = events.next().await else { panic!() };
//! for partition in assignment.partitions() {
//!     assignment.seek(partition.partition, StartPosition::Offset(stored_next));
//! }
//! let Some(Ok(LogEvent::Record(record))) = events.next().await else { panic!() };
//! assert_eq!(record.offset(), 2);
//! assert_eq!(&record.envelope().payload[..], b"2");
//! let Some(Ok(LogEvent::CaughtUp { partition: 0, end_offset: 3 })) = events.next().await else {
//!     panic!()
//! };
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};

use chrono::{DateTime, Utc};
use futures::stream::BoxStream;

use crate::envelope::Envelope;
use crate::error::Result;
use crate::port::DeliveryInfo;

/// Where a partition starts being read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum StartPosition {
    /// The first record the log still retains.
    #[default]
    Earliest,
    /// The end of the partition: only records published from now on.
    Latest,
    /// This offset: the next record to read. An offset before the earliest
    /// retained record reads from the earliest; one past the end reads from
    /// the end.
    Offset(i64),
    /// The first record whose broker timestamp is at or after this time
    /// (the end when there is none).
    Timestamp(DateTime<Utc>),
}

/// How a positioned subscription starts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LogOptions {
    /// Where an assigned partition that the caller did not
    /// [seek](Assignment::seek) starts. Default: [`StartPosition::Earliest`].
    pub start: StartPosition,
}

impl LogOptions {
    /// Options that start unsought partitions at `start`.
    pub fn start(start: StartPosition) -> Self {
        Self { start }
    }
}

/// One assigned partition, as the broker described it at assignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct AssignedPartition {
    /// The partition number.
    pub partition: i32,
    /// The offset of the earliest retained record (the low watermark).
    pub earliest_offset: i64,
    /// The offset the next published record gets (the high watermark), as
    /// the broker reported it at assignment: the partition holds
    /// `end_offset - earliest_offset` records. tansu 0.6 reports the last
    /// record batch's base offset + 1 instead.
    pub end_offset: i64,
}

impl AssignedPartition {
    /// A partition whose retained records are `earliest_offset..end_offset`.
    pub fn new(partition: i32, earliest_offset: i64, end_offset: i64) -> Self {
        Self {
            partition,
            earliest_offset,
            end_offset,
        }
    }
}

/// Partitions newly assigned to this member, in [`LogEvent::Assigned`]:
/// [`seek`](Self::seek) sets where each starts before any of its records
/// is read.
#[derive(Clone)]
pub struct Assignment {
    partitions: Vec<AssignedPartition>,
    seeks: Arc<Mutex<HashMap<i32, StartPosition>>>,
}

impl Assignment {
    /// An assignment of `partitions`; the seeks the caller makes are read
    /// back by the transport with [`take_seeks`](Self::take_seeks).
    pub fn new(partitions: Vec<AssignedPartition>) -> Self {
        Self {
            partitions,
            seeks: Arc::default(),
        }
    }

    /// The partitions, with their offsets at assignment.
    pub fn partitions(&self) -> &[AssignedPartition] {
        &self.partitions
    }

    /// The partition numbers.
    pub fn partition_numbers(&self) -> Vec<i32> {
        self.partitions.iter().map(|p| p.partition).collect()
    }

    /// Sets where `partition` starts. Takes effect when the stream is polled
    /// next; a later seek of the same partition wins. Seeking a partition
    /// that is not in this assignment does nothing.
    pub fn seek(&self, partition: i32, start: StartPosition) {
        if self.partitions.iter().any(|p| p.partition == partition) {
            self.seeks
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(partition, start);
        }
    }

    /// Where each partition starts: the caller's seek, or `default`. For
    /// transports.
    pub fn take_seeks(&self, default: StartPosition) -> Vec<(i32, StartPosition)> {
        let seeks = self.seeks.lock().unwrap_or_else(PoisonError::into_inner);
        self.partitions
            .iter()
            .map(|p| {
                (
                    p.partition,
                    seeks.get(&p.partition).copied().unwrap_or(default),
                )
            })
            .collect()
    }
}

impl fmt::Debug for Assignment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Assignment")
            .field("partitions", &self.partitions)
            .finish_non_exhaustive()
    }
}

/// A record read from a log. Nothing to settle: the caller keeps its
/// position (the record's [`offset`](Self::offset) + 1 is the next to read).
#[derive(Debug, Clone)]
pub struct LogRecord {
    envelope: Envelope,
    info: DeliveryInfo,
}

impl LogRecord {
    /// A record of `envelope`; `info` has its partition, offset and, when
    /// the broker gives one, timestamp.
    pub fn new(envelope: Envelope, info: DeliveryInfo) -> Self {
        Self { envelope, info }
    }

    /// The message.
    pub fn envelope(&self) -> &Envelope {
        &self.envelope
    }

    /// Where it came from, with the broker's
    /// [timestamp](DeliveryInfo::timestamp).
    pub fn info(&self) -> &DeliveryInfo {
        &self.info
    }

    /// The partition.
    pub fn partition(&self) -> i32 {
        self.info.partition.unwrap_or_default()
    }

    /// The offset within the partition.
    pub fn offset(&self) -> i64 {
        self.info.offset.unwrap_or_default()
    }

    /// When the broker stored it, when the broker gives a time.
    pub fn timestamp(&self) -> Option<DateTime<Utc>> {
        self.info.timestamp
    }

    /// Splits into the envelope and the info.
    pub fn into_parts(self) -> (Envelope, DeliveryInfo) {
        (self.envelope, self.info)
    }
}

/// What a positioned subscription yields.
// Records are nearly every event: boxing them would cost an allocation each.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum LogEvent {
    /// These partitions are now this member's. No record of them comes
    /// before this event; seek them before polling the stream again.
    Assigned(Assignment),
    /// These partitions are no longer this member's: no record of them
    /// comes after this event. They go to another member when the stream is
    /// polled again.
    Revoked(Vec<i32>),
    /// A record.
    Record(LogRecord),
    /// The partition's position reached its end as the broker reports it:
    /// everything published before then has been read. `end_offset` is that
    /// position (the next offset to be read). Once per assignment of the
    /// partition.
    CaughtUp {
        /// The partition.
        partition: i32,
        /// Its end offset (the next offset to be written) when read.
        end_offset: i64,
    },
}

/// The stream of a positioned subscription.
pub type LogStream = BoxStream<'static, Result<LogEvent>>;

/// Reads logs from positions the caller keeps; see the [module](self).
///
/// The stream ends when the transport is closed. Dropping it leaves the
/// group; its partitions go to the other members.
pub trait LogSubscriber: Send + Sync {
    /// Joins `group` on `topic` for positioned reading. The first event for
    /// a partition is always [`LogEvent::Assigned`].
    fn subscribe_log(
        &self,
        topic: &str,
        group: &str,
        options: LogOptions,
    ) -> impl Future<Output = Result<LogStream>> + Send;
}

impl<S: LogSubscriber + ?Sized> LogSubscriber for Arc<S> {
    fn subscribe_log(
        &self,
        topic: &str,
        group: &str,
        options: LogOptions,
    ) -> impl Future<Output = Result<LogStream>> + Send {
        (**self).subscribe_log(topic, group, options)
    }
}
