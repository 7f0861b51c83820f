//! Per-partition offset bookkeeping for one subscription: which offsets are
//! out with the application, which must be delivered again, and how far the
//! group's offset may safely move. Pure state, no I/O: the consumer loop
//! applies the [`Action`]s it asks for.
//!
//! # The window
//!
//! For each assigned partition the tracker keeps a window from the stored
//! offset (the next offset the group would consume after a restart) to
//! `next` (one past the highest offset delivered). Inside it every offset is
//! either *open* (delivered and not finally settled, or waiting to be
//! delivered again) or *done* (acked, rejected, or not a message at all:
//! Kafka offsets have gaps). The offset to store is always the lowest open
//! offset, or `next` when nothing is open, so it never passes a message whose
//! outcome is not final, whatever order settlements arrive in.
//!
//! # Redelivery
//!
//! A nack or a dropped delivery marks its offset for redelivery and asks for
//! a seek back to it. While the fetcher replays the window, offsets that are
//! done or still out with the application are skipped; only the ones marked
//! for redelivery are delivered again. Messages of other keys that happen to
//! lie behind a nacked one are therefore not handled twice by this consumer.
//!
//! A message marked for redelivery stays open until it is delivered again
//! and settled for good. If the fetcher keeps going past it (the seek did
//! not take, or retention deleted it), the tracker asks for a seek again
//! each time, and once it was missed more than [`MAX_MISSED_REDELIVERIES`]
//! times reports the partition as stalled ([`Action::Stalled`]): the stored
//! offset stays below the message, whatever happens after it.

use std::collections::{BTreeMap, HashMap};

/// How often a message marked for redelivery may be missed by the fetcher
/// (a seek that did not take, or the message deleted by retention) before
/// the tracker reports its partition as stalled. It keeps asking for seeks
/// after that, and never lets the stored offset move past the message.
pub(crate) const MAX_MISSED_REDELIVERIES: u32 = 3;

/// Identifies one delivery handed to the application.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Token {
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    generation: u64,
    delivery: u64,
}

/// What to do with a fetched message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Registered {
    /// Hand it to the application.
    Deliver {
        token: Token,
        /// This consumer delivered it before.
        redelivered: bool,
        /// How often this consumer delivered it, counting this time, when it
        /// delivered it before; `None` on a first delivery (an earlier member
        /// of the group may have seen it).
        delivery_count: Option<u32>,
    },
    /// Already handled or still being handled: do not deliver.
    Skip,
}

/// Work for the consumer loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// Store `offset` (the next offset to consume) for the next commit.
    Store { partition: i32, offset: i64 },
    /// Seek the partition back so that `offset` is fetched again.
    Seek { partition: i32, offset: i64 },
    /// The message at `offset`, marked for redelivery, was missed by the
    /// fetcher more than [`MAX_MISSED_REDELIVERIES`] times: the partition's
    /// stored offset is held below it until it is delivered and settled.
    Stalled { partition: i32, offset: i64 },
}

/// Why a settlement was not accepted. The message will be delivered again
/// (to this consumer or to the partition's next owner).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The subscription is closed.
    Closed,
    /// The partition was revoked (rebalance) after the delivery.
    Revoked,
    /// The delivery is no longer current (settled already).
    Stale,
}

impl Refused {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "the Kafka subscription is closed",
            Self::Revoked => "the partition was revoked from this consumer by a rebalance",
            Self::Stale => "the delivery is no longer current",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Out with the application.
    InFlight,
    /// Nacked or dropped: deliver again when the fetcher replays it.
    Redeliver { missed: u32 },
}

#[derive(Debug, Clone, Copy)]
struct Open {
    state: State,
    deliveries: u32,
    delivery: u64,
}

#[derive(Debug, Default)]
struct Track {
    generation: u64,
    /// One past the highest offset delivered; `None` before the first message.
    next: Option<i64>,
    /// The offset the fetcher returns next.
    position: Option<i64>,
    open: BTreeMap<i64, Open>,
    /// How many of `open` are in [`State::Redeliver`]: when none, a fetched
    /// message has nothing below it to check (the common case, and a scan
    /// of every open offset per message otherwise).
    redelivering: usize,
    /// The last offset handed to [`Action::Store`].
    stored: Option<i64>,
    pending_store: Option<i64>,
    seek_wanted: bool,
    /// Offsets that became stalled since the last [`Tracker::take_actions`].
    stalled: Vec<i64>,
}

impl Track {
    /// Moves the store position up to the lowest open offset (or `next`).
    fn advance(&mut self) -> bool {
        let Some(candidate) = self.open.keys().next().copied().or(self.next) else {
            return false;
        };
        if self.stored.is_none_or(|stored| candidate > stored) {
            self.stored = Some(candidate);
            self.pending_store = Some(candidate);
            true
        } else {
            false
        }
    }

    fn current(&self, token: &Token) -> Option<&Open> {
        self.open
            .get(&token.offset)
            .filter(|o| o.delivery == token.delivery && o.state == State::InFlight)
    }
}

/// The bookkeeping of one subscription.
#[derive(Debug, Default)]
pub(crate) struct Tracker {
    partitions: HashMap<i32, Track>,
    next_generation: u64,
    next_delivery: u64,
    closed: bool,
    /// Stores asked for since the last [`take_actions`](Self::take_actions).
    unapplied_stores: usize,
}

/// Stores that wait for the poll loop before a settlement wakes it (see
/// [`Tracker::finish`]).
pub(crate) const STORE_BATCH: usize = 64;

impl Tracker {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Partitions were assigned to this consumer.
    pub(crate) fn assign(&mut self, partitions: impl IntoIterator<Item = i32>) {
        for partition in partitions {
            self.next_generation += 1;
            self.partitions.insert(
                partition,
                Track {
                    generation: self.next_generation,
                    ..Track::default()
                },
            );
        }
    }

    /// Partitions were revoked. Returns the stores that must be applied
    /// before the revocation completes (so that the final commit has them).
    pub(crate) fn revoke(&mut self, partitions: impl IntoIterator<Item = i32>) -> Vec<Action> {
        let mut actions = Vec::new();
        for partition in partitions {
            if let Some(track) = self.partitions.remove(&partition)
                && let Some(offset) = track.pending_store
            {
                actions.push(Action::Store { partition, offset });
            }
        }
        actions
    }

    /// The partitions currently assigned.
    pub(crate) fn assigned(&self) -> Vec<i32> {
        let mut partitions: Vec<i32> = self.partitions.keys().copied().collect();
        partitions.sort_unstable();
        partitions
    }

    /// Whether `partition` is assigned.
    pub(crate) fn is_assigned(&self, partition: i32) -> bool {
        self.partitions.contains_key(&partition)
    }

    /// A message at `offset` was fetched from `partition`.
    pub(crate) fn register(&mut self, partition: i32, offset: i64) -> Registered {
        if self.closed {
            return Registered::Skip;
        }
        let Some(track) = self.partitions.get_mut(&partition) else {
            return Registered::Skip;
        };
        // Messages marked for redelivery that the fetcher went past after a
        // seek back to them: the seek did not take or the message is gone.
        // Ask again; never move past them (they stay open, so the stored
        // offset stays below them). Once stalled, every message fetched
        // counts as a miss and the seeks thin out (at 8, 16, 32, ...
        // misses), so a message that is gone for good does not keep the
        // fetcher replaying the partition.
        let position = track.position;
        if track.redelivering > 0 {
            for (&missed_offset, open) in track.open.range_mut(..offset) {
                let State::Redeliver { missed } = &mut open.state else {
                    continue;
                };
                let passed_after_seek =
                    position.is_some_and(|position| offset > position && missed_offset >= position);
                if !passed_after_seek && *missed <= MAX_MISSED_REDELIVERIES {
                    continue;
                }
                *missed = missed.saturating_add(1);
                if *missed <= MAX_MISSED_REDELIVERIES || missed.is_power_of_two() {
                    track.seek_wanted = true;
                }
                if *missed == MAX_MISSED_REDELIVERIES + 1 {
                    track.stalled.push(missed_offset);
                }
            }
        }
        track.position = Some(offset + 1);
        let next = *track.next.get_or_insert(offset);
        // The window starts at the first message fetched: storing that
        // offset would change nothing.
        track.stored.get_or_insert(next);
        if offset >= next {
            self.next_delivery += 1;
            track.next = Some(offset + 1);
            track.open.insert(
                offset,
                Open {
                    state: State::InFlight,
                    deliveries: 1,
                    delivery: self.next_delivery,
                },
            );
            return Registered::Deliver {
                token: Token {
                    partition,
                    offset,
                    generation: track.generation,
                    delivery: self.next_delivery,
                },
                redelivered: false,
                delivery_count: None,
            };
        }
        match track.open.get_mut(&offset) {
            Some(open) if matches!(open.state, State::Redeliver { .. }) => {
                if let State::Redeliver { missed } = open.state
                    && missed > MAX_MISSED_REDELIVERIES
                {
                    tracing::info!(
                        partition,
                        offset,
                        "a stalled message was fetched again; the partition moves on"
                    );
                }
                self.next_delivery += 1;
                open.state = State::InFlight;
                track.redelivering = track.redelivering.saturating_sub(1);
                open.deliveries += 1;
                open.delivery = self.next_delivery;
                Registered::Deliver {
                    token: Token {
                        partition,
                        offset,
                        generation: track.generation,
                        delivery: self.next_delivery,
                    },
                    redelivered: true,
                    delivery_count: Some(open.deliveries),
                }
            }
            // Done, or still out with the application.
            _ => Registered::Skip,
        }
    }

    fn track_for(&mut self, token: &Token) -> Result<&mut Track, Refused> {
        if self.closed {
            return Err(Refused::Closed);
        }
        let track = self
            .partitions
            .get_mut(&token.partition)
            .filter(|t| t.generation == token.generation)
            .ok_or(Refused::Revoked)?;
        if track.current(token).is_none() {
            return Err(Refused::Stale);
        }
        Ok(track)
    }

    /// Whether the delivery is still out with the application and may be
    /// settled.
    pub(crate) fn is_live(&self, token: &Token) -> bool {
        !self.closed
            && self
                .partitions
                .get(&token.partition)
                .filter(|t| t.generation == token.generation)
                .and_then(|t| t.current(token))
                .is_some()
    }

    /// The delivery's outcome is final (ack or reject). Returns whether the
    /// loop should apply the stores now (it also does every 100 ms): once
    /// [`STORE_BATCH`] stores wait,
    /// or when nothing is open any more (the application caught up, or a
    /// draining loop waits for the last settlement). Waking the loop for
    /// every store cost a cross-task wake-up per message; a store that
    /// waits is applied with the next batch, and an offset is never stored
    /// past an unsettled message either way.
    pub(crate) fn finish(&mut self, token: &Token) -> Result<bool, Refused> {
        let track = self.track_for(token)?;
        if let Some(open) = track.open.remove(&token.offset)
            && matches!(open.state, State::Redeliver { .. })
        {
            track.redelivering = track.redelivering.saturating_sub(1);
        }
        if !track.advance() {
            return Ok(false);
        }
        self.unapplied_stores += 1;
        Ok(self.unapplied_stores >= STORE_BATCH
            || self.partitions.values().all(|t| t.open.is_empty()))
    }

    /// The delivery must be delivered again (nack with requeue, or dropped).
    /// Returns whether the loop has work to do.
    pub(crate) fn redeliver(&mut self, token: &Token) -> Result<bool, Refused> {
        let track = self.track_for(token)?;
        if let Some(open) = track.open.get_mut(&token.offset) {
            if !matches!(open.state, State::Redeliver { .. }) {
                track.redelivering += 1;
            }
            open.state = State::Redeliver { missed: 0 };
        }
        track.seek_wanted = true;
        Ok(true)
    }

    /// Stores and seeks for the loop to apply, in order.
    pub(crate) fn take_actions(&mut self) -> Vec<Action> {
        self.unapplied_stores = 0;
        let mut actions = Vec::new();
        let mut partitions: Vec<_> = self.partitions.iter_mut().collect();
        partitions.sort_unstable_by_key(|(p, _)| **p);
        for (&partition, track) in partitions {
            if let Some(offset) = track.pending_store.take() {
                actions.push(Action::Store { partition, offset });
            }
            for offset in track.stalled.drain(..) {
                actions.push(Action::Stalled { partition, offset });
            }
            if std::mem::take(&mut track.seek_wanted) && !self.closed {
                let lowest = track
                    .open
                    .iter()
                    .find(|(_, o)| matches!(o.state, State::Redeliver { .. }))
                    .map(|(&offset, _)| offset);
                if let Some(offset) = lowest
                    && track.position.is_none_or(|p| offset < p)
                {
                    track.position = Some(offset);
                    actions.push(Action::Seek { partition, offset });
                }
            }
        }
        actions
    }

    /// Whether [`take_actions`](Self::take_actions) has a seek or a stall
    /// to report (asked for while registering fetched messages).
    pub(crate) fn wants_actions(&self) -> bool {
        !self.closed
            && self
                .partitions
                .values()
                .any(|t| t.seek_wanted || !t.stalled.is_empty())
    }

    /// Deliveries out with the application.
    pub(crate) fn in_flight(&self) -> usize {
        self.partitions
            .values()
            .flat_map(|t| t.open.values())
            .filter(|o| o.state == State::InFlight)
            .count()
    }

    /// Whether the subscription is closed.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed
    }

    /// No more deliveries or settlements. Returns the stores still to apply.
    pub(crate) fn close(&mut self) -> Vec<Action> {
        let actions = self.take_actions();
        self.closed = true;
        actions
            .into_iter()
            .filter(|a| matches!(a, Action::Store { .. }))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deliver(t: &mut Tracker, partition: i32, offset: i64) -> Token {
        match t.register(partition, offset) {
            Registered::Deliver { token, .. } => token,
            Registered::Skip => panic!("offset {offset} was skipped"),
        }
    }

    fn stores(actions: &[Action]) -> Vec<i64> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Store { offset, .. } => Some(*offset),
                Action::Seek { .. } | Action::Stalled { .. } => None,
            })
            .collect()
    }

    #[test]
    fn acks_wake_the_loop_once_per_batch_of_stores_or_when_nothing_is_open() {
        let mut t = Tracker::new();
        t.assign([0]);
        let n = STORE_BATCH as i64 * 2 + 1;
        let tokens: Vec<Token> = (0..n).map(|offset| deliver(&mut t, 0, offset)).collect();
        let wakes: Vec<i64> = tokens
            .iter()
            .filter(|token| t.finish(token).unwrap())
            .map(|token| token.offset)
            .collect();
        // Without take_actions in between, the count keeps rising: the
        // batch boundary, then every ack after it, then the last (idle).
        assert_eq!(wakes.first(), Some(&(STORE_BATCH as i64 - 1)));
        assert_eq!(wakes.last(), Some(&(n - 1)));
        assert_eq!(stores(&t.take_actions()), [n], "the latest store");

        let a = deliver(&mut t, 0, n);
        let b = deliver(&mut t, 0, n + 1);
        assert!(
            !t.finish(&a).unwrap(),
            "one store, one still open: no wake-up"
        );
        assert!(t.finish(&b).unwrap(), "nothing open: wake up");
        assert_eq!(stores(&t.take_actions()), [n + 2]);
    }

    #[test]
    fn out_of_order_acks_do_not_pass_an_unsettled_message() {
        let mut t = Tracker::new();
        t.assign([0]);
        let a = deliver(&mut t, 0, 10);
        let b = deliver(&mut t, 0, 11);
        let c = deliver(&mut t, 0, 12);
        t.finish(&a).unwrap();
        t.finish(&c).unwrap();
        assert_eq!(stores(&t.take_actions()), [11], "11 is still unsettled");
        t.finish(&b).unwrap();
        assert_eq!(stores(&t.take_actions()), [13]);
    }

    #[test]
    fn nack_seeks_back_and_replays_only_what_needs_it() {
        let mut t = Tracker::new();
        t.assign([0]);
        let a = deliver(&mut t, 0, 0);
        let b = deliver(&mut t, 0, 1);
        let c = deliver(&mut t, 0, 2);
        t.finish(&c).unwrap();
        t.redeliver(&a).unwrap();
        assert_eq!(
            t.take_actions(),
            [Action::Seek {
                partition: 0,
                offset: 0
            }]
        );
        // The replay: 0 again, 1 is still in flight, 2 is done.
        match t.register(0, 0) {
            Registered::Deliver {
                redelivered,
                delivery_count,
                ..
            } => {
                assert!(redelivered);
                assert_eq!(delivery_count, Some(2));
            }
            Registered::Skip => panic!("the nacked message must come back"),
        }
        assert_eq!(t.register(0, 1), Registered::Skip);
        assert_eq!(t.register(0, 2), Registered::Skip);
        assert!(t.is_live(&b));
        assert!(!t.is_live(&a), "the nacked delivery is spent");
        assert_eq!(t.finish(&a), Err(Refused::Stale));
    }

    #[test]
    fn revoked_partitions_refuse_settlement_and_flush_their_store() {
        let mut t = Tracker::new();
        t.assign([0, 1]);
        let a = deliver(&mut t, 0, 5);
        let b = deliver(&mut t, 1, 7);
        t.finish(&a).unwrap();
        assert_eq!(
            t.revoke([0]),
            [Action::Store {
                partition: 0,
                offset: 6
            }]
        );
        assert_eq!(t.finish(&a), Err(Refused::Revoked));
        assert!(t.is_live(&b));
        t.assign([0]);
        let again = deliver(&mut t, 0, 6);
        assert_ne!(again, a);
    }

    #[test]
    fn a_missed_redelivery_stalls_the_partition_and_never_passes_it() {
        let mut t = Tracker::new();
        t.assign([0]);
        let a = deliver(&mut t, 0, 0);
        t.redeliver(&a).unwrap();
        assert_eq!(t.take_actions().len(), 1);
        let seek = Action::Seek {
            partition: 0,
            offset: 0,
        };
        let stalled = Action::Stalled {
            partition: 0,
            offset: 0,
        };
        let mut stalls = 0;
        for n in 1..=i64::from(MAX_MISSED_REDELIVERIES) + 5 {
            // The fetcher did not go back: a later offset arrives instead of
            // 0, and is handled.
            let later = deliver(&mut t, 0, n);
            t.finish(&later).unwrap();
            let missed = u32::try_from(n).unwrap();
            let seeks = missed <= MAX_MISSED_REDELIVERIES + 1 || missed.is_power_of_two();
            assert_eq!(t.wants_actions(), seeks, "{n}");
            let actions = t.take_actions();
            assert_eq!(actions.contains(&seek), seeks, "{n}: {actions:?}");
            assert!(
                stores(&actions).is_empty(),
                "the store must stay at 0: {actions:?}"
            );
            stalls += actions.iter().filter(|a| **a == stalled).count();
            if n == i64::from(MAX_MISSED_REDELIVERIES) + 1 {
                assert_eq!(stalls, 1, "{actions:?}");
            }
        }
        assert_eq!(stalls, 1, "a stall is reported once");
        // The seek finally takes: 0 comes back, and once acked the store
        // moves past everything.
        let again = deliver(&mut t, 0, 0);
        t.finish(&again).unwrap();
        assert_eq!(
            stores(&t.take_actions()),
            [i64::from(MAX_MISSED_REDELIVERIES) + 6]
        );
    }

    #[test]
    fn close_refuses_everything_and_returns_pending_stores() {
        let mut t = Tracker::new();
        t.assign([0]);
        let a = deliver(&mut t, 0, 0);
        let b = deliver(&mut t, 0, 1);
        t.finish(&a).unwrap();
        assert_eq!(stores(&t.close()), [1]);
        assert_eq!(t.finish(&b), Err(Refused::Closed));
        assert_eq!(t.register(0, 2), Registered::Skip);
    }
}

#[cfg(test)]
mod props {
    //! Model-based property test: a fake partition log and fetcher, random
    //! settlements in random order.

    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Fetch,
        Ack(usize),
        Reject(usize),
        Nack(usize),
        Drop(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => Just(Op::Fetch),
            3 => any::<usize>().prop_map(Op::Ack),
            1 => any::<usize>().prop_map(Op::Reject),
            1 => any::<usize>().prop_map(Op::Nack),
            1 => any::<usize>().prop_map(Op::Drop),
        ]
    }

    struct Model {
        tracker: Tracker,
        /// Offsets in the log (with gaps, like compacted or transactional topics).
        log: Vec<i64>,
        /// Index into `log` of the next message the fetcher returns.
        fetch_at: usize,
        held: Vec<Token>,
        finally_settled: std::collections::BTreeSet<i64>,
        stored: Option<i64>,
    }

    impl Model {
        fn apply_actions(&mut self) {
            for action in self.tracker.take_actions() {
                match action {
                    Action::Store { offset, .. } => {
                        assert!(self.stored.is_none_or(|s| offset >= s), "store went back");
                        self.stored = Some(offset);
                    }
                    Action::Seek { offset, .. } => {
                        self.fetch_at = self.log.partition_point(|&o| o < offset);
                    }
                    Action::Stalled { .. } => {}
                }
            }
        }

        fn fetch(&mut self) {
            if let Some(&offset) = self.log.get(self.fetch_at) {
                self.fetch_at += 1;
                if let Registered::Deliver { token, .. } = self.tracker.register(0, offset) {
                    assert!(
                        self.held.iter().all(|h| h.offset != offset),
                        "offset {offset} delivered twice at once"
                    );
                    self.held.push(token);
                }
            }
        }

        fn check(&self) {
            // Never past an offset whose outcome is not final.
            if let Some(stored) = self.stored {
                for &offset in self.log.iter().take_while(|&&o| o < stored) {
                    assert!(
                        self.finally_settled.contains(&offset),
                        "stored {stored} passes unsettled {offset}"
                    );
                }
            }
        }
    }

    proptest! {
        #[test]
        fn stored_offset_never_passes_an_unsettled_message(
            gaps in proptest::collection::vec(1i64..3, 1..30),
            ops in proptest::collection::vec(op(), 0..200),
        ) {
            let mut offset = 0;
            let log: Vec<i64> = gaps.iter().map(|g| { offset += g; offset }).collect();
            let mut m = Model {
                tracker: Tracker::new(),
                log,
                fetch_at: 0,
                held: Vec::new(),
                finally_settled: Default::default(),
                stored: None,
            };
            m.tracker.assign([0]);
            for op in ops {
                match op {
                    Op::Fetch => m.fetch(),
                    Op::Ack(i) | Op::Reject(i) if !m.held.is_empty() => {
                        let token = m.held.remove(i % m.held.len());
                        m.tracker.finish(&token).unwrap();
                        m.finally_settled.insert(token.offset);
                    }
                    Op::Nack(i) | Op::Drop(i) if !m.held.is_empty() => {
                        let token = m.held.remove(i % m.held.len());
                        m.tracker.redeliver(&token).unwrap();
                    }
                    _ => {}
                }
                m.apply_actions();
                m.check();
            }
            // Liveness: keep fetching and acking; every message ends settled
            // and the stored offset reaches the end of the log.
            for _ in 0..10 * m.log.len() + 10 {
                m.fetch();
                for token in std::mem::take(&mut m.held) {
                    m.tracker.finish(&token).unwrap();
                    m.finally_settled.insert(token.offset);
                }
                m.apply_actions();
                m.check();
            }
            let last = *m.log.last().unwrap();
            prop_assert_eq!(m.stored, Some(last + 1));
            prop_assert_eq!(m.finally_settled.len(), m.log.len());
        }
    }
}
