//! Windowed analytics over event time: tumbling and sliding windows with
//! a watermark and allowed lateness, as a pure state machine a projection
//! drives and checkpoints with its position.
//!
//! Times are Unix milliseconds of *event* time (the envelope's `time`, or
//! a field of the event). The watermark is the latest event time seen. A
//! window `[start, end)` stays open until the watermark reaches
//! `end + allowed_lateness`; then it closes and its result is emitted once,
//! final. An event is added to every window containing its time that is
//! still open when it arrives; an event for which every such window has
//! closed is *late*: it is counted ([`Windows::late_events`]), never lost
//! silently.
//!
//! The state ([`Windows::snapshot`]) is plain data: store it in the read
//! model's transaction with the position (the runner's checkpoint), so a
//! restart resumes with the same open windows and watermark.
//!
//! ```
//! use surety_projection::windows::{CountSum, WindowSpec, Windows};
//!
//! // Orders per minute and revenue, accepting events up to 30 s late.
//! let mut windows: Windows<String, CountSum> =
//!     Windows::new(WindowSpec::tumbling(60_000).allowed_lateness(30_000));
//! windows.observe(10_000, "shop".to_owned(), &500);
//! windows.observe(70_000, "shop".to_owned(), &250);
//! windows.observe(20_000, "shop".to_owned(), &100); // late but allowed
//! let closed = windows.observe(100_000, "shop".to_owned(), &50); // closes [0, 60 s)
//! assert_eq!(closed.len(), 1);
//! assert_eq!((closed[0].start, closed[0].aggregate.count, closed[0].aggregate.sum), (0, 2, 600));
//! windows.observe(30_000, "shop".to_owned(), &999); // too late: counted, not added
//! assert_eq!(windows.late_events(), 1);
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The shape of the windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum WindowKind {
    /// Back-to-back windows of `size` ms, aligned on the epoch.
    Tumbling {
        /// The window length in ms.
        size: i64,
    },
    /// Windows of `size` ms starting every `slide` ms (aligned on the
    /// epoch); an event belongs to `size / slide` of them.
    Sliding {
        /// The window length in ms.
        size: i64,
        /// The distance between window starts in ms.
        slide: i64,
    },
}

/// The windows and how late an event may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct WindowSpec {
    /// Tumbling or sliding.
    pub kind: WindowKind,
    /// How long after its end (by the watermark) a window still accepts
    /// events, in ms.
    pub allowed_lateness: i64,
}

impl WindowSpec {
    /// Tumbling windows of `size` ms (at least 1).
    pub fn tumbling(size: i64) -> Self {
        Self {
            kind: WindowKind::Tumbling { size: size.max(1) },
            allowed_lateness: 0,
        }
    }

    /// Windows of `size` ms every `slide` ms (both at least 1, `slide` at
    /// most `size`).
    pub fn sliding(size: i64, slide: i64) -> Self {
        let size = size.max(1);
        Self {
            kind: WindowKind::Sliding {
                size,
                slide: slide.clamp(1, size),
            },
            allowed_lateness: 0,
        }
    }

    /// Accepts events up to `lateness` ms after a window's end.
    pub fn allowed_lateness(mut self, lateness: i64) -> Self {
        self.allowed_lateness = lateness.max(0);
        self
    }

    fn size_and_slide(&self) -> (i64, i64) {
        match self.kind {
            WindowKind::Tumbling { size } => (size, size),
            WindowKind::Sliding { size, slide } => (size, slide),
        }
    }

    /// The starts of the windows containing `time`, earliest first.
    pub fn starts(&self, time: i64) -> Vec<i64> {
        let (size, slide) = self.size_and_slide();
        let last = time.div_euclid(slide) * slide;
        let mut starts = Vec::new();
        let mut start = last;
        while start > time - size {
            starts.push(start);
            start -= slide;
        }
        starts.reverse();
        starts
    }

    /// The end of the window starting at `start`.
    pub fn end(&self, start: i64) -> i64 {
        start + self.size_and_slide().0
    }
}

/// What a window accumulates.
pub trait Aggregate: Default + Clone {
    /// The value an event contributes.
    type Value: ?Sized;
    /// Adds one event's value.
    fn add(&mut self, value: &Self::Value);
}

/// A count of events and the sum of their values (orders and revenue).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct CountSum {
    /// Events.
    pub count: u64,
    /// The sum of their values.
    pub sum: i64,
}

impl Aggregate for CountSum {
    type Value = i64;

    fn add(&mut self, value: &i64) {
        self.count += 1;
        self.sum = self.sum.saturating_add(*value);
    }
}

/// A window's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct WindowResult<K, A> {
    /// The window's start (ms, inclusive).
    pub start: i64,
    /// Its end (ms, exclusive).
    pub end: i64,
    /// The key (a product, a shop).
    pub key: K,
    /// What it accumulated.
    pub aggregate: A,
}

/// Open windows per key, the watermark and the late events; see the
/// [module](self).
#[derive(Debug, Clone, PartialEq)]
pub struct Windows<K, A> {
    spec: WindowSpec,
    watermark: Option<i64>,
    open: BTreeMap<(i64, K), A>,
    late_events: u64,
}

/// The checkpointable state of [`Windows`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct WindowsSnapshot<K, A> {
    /// The spec.
    pub spec: WindowSpec,
    /// The latest event time seen.
    pub watermark: Option<i64>,
    /// The open windows: start, key, aggregate.
    pub open: Vec<(i64, K, A)>,
    /// Events that came too late.
    pub late_events: u64,
}

impl<K: Ord + Clone, A: Aggregate> Windows<K, A> {
    /// No windows yet.
    pub fn new(spec: WindowSpec) -> Self {
        Self {
            spec,
            watermark: None,
            open: BTreeMap::new(),
            late_events: 0,
        }
    }

    /// The windows as they were when `snapshot` was taken.
    pub fn restore(snapshot: WindowsSnapshot<K, A>) -> Self {
        Self {
            spec: snapshot.spec,
            watermark: snapshot.watermark,
            open: snapshot
                .open
                .into_iter()
                .map(|(start, key, aggregate)| ((start, key), aggregate))
                .collect(),
            late_events: snapshot.late_events,
        }
    }

    /// The state to checkpoint.
    pub fn snapshot(&self) -> WindowsSnapshot<K, A> {
        WindowsSnapshot {
            spec: self.spec,
            watermark: self.watermark,
            open: self
                .open
                .iter()
                .map(|((start, key), aggregate)| (*start, key.clone(), aggregate.clone()))
                .collect(),
            late_events: self.late_events,
        }
    }

    /// The latest event time seen.
    pub fn watermark(&self) -> Option<i64> {
        self.watermark
    }

    /// Events that arrived after every window containing them had closed.
    pub fn late_events(&self) -> u64 {
        self.late_events
    }

    /// The open windows, by start then key.
    pub fn open(&self) -> impl Iterator<Item = WindowResult<K, A>> + '_ {
        self.open
            .iter()
            .map(|((start, key), aggregate)| WindowResult {
                start: *start,
                end: self.spec.end(*start),
                key: key.clone(),
                aggregate: aggregate.clone(),
            })
    }

    fn is_open(&self, start: i64) -> bool {
        self.watermark
            .is_none_or(|w| w < self.spec.end(start) + self.spec.allowed_lateness)
    }

    /// Adds an event at `time` for `key`, then moves the watermark; returns
    /// the windows that closed, final, by start then key.
    pub fn observe(&mut self, time: i64, key: K, value: &A::Value) -> Vec<WindowResult<K, A>> {
        let mut accepted = false;
        for start in self.spec.starts(time) {
            if self.is_open(start) {
                accepted = true;
                self.open
                    .entry((start, key.clone()))
                    .or_default()
                    .add(value);
            }
        }
        if !accepted {
            self.late_events += 1;
        }
        self.advance(time)
    }

    /// Moves the watermark to `time` if it is later (an idle source's
    /// heartbeat, say); returns the windows that closed.
    pub fn advance(&mut self, time: i64) -> Vec<WindowResult<K, A>> {
        if self.watermark.is_some_and(|w| w >= time) {
            return Vec::new();
        }
        self.watermark = Some(time);
        let closing: Vec<(i64, K)> = self
            .open
            .keys()
            .take_while(|(start, _)| !self.is_open(*start))
            .cloned()
            .collect();
        closing
            .into_iter()
            .filter_map(|(start, key)| {
                let aggregate = self.open.remove(&(start, key.clone()))?;
                Some(WindowResult {
                    start,
                    end: self.spec.end(start),
                    key,
                    aggregate,
                })
            })
            .collect()
    }
}
