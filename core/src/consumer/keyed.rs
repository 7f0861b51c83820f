//! Per-key ordering inside a [`Worker`](super::Worker): at most one delivery
//! of a key in flight, later ones wait in arrival order.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;

use foldhash::fast::RandomState;

use crate::port::Delivery;

/// The ordering key of a delivery: its partition key, or without one its
/// partition (Kafka), or none (free to run beside anything).
///
/// Keys with a delivery in flight, and the deliveries waiting behind them.
#[derive(Default)]
pub(super) struct KeyedQueue {
    /// Seeded per worker, so that keys chosen by producers cannot be made to
    /// collide on purpose.
    hasher: RandomState,
    /// Busy keys, each with the deliveries waiting for it (often none).
    busy: HashMap<u64, VecDeque<Delivery>, RandomState>,
    waiting: usize,
}

impl KeyedQueue {
    /// The ordering key of a delivery: its partition key, or without one
    /// its partition (Kafka), or none (free to run beside anything).
    ///
    /// Keys are hashed: two keys with the same hash are only ordered
    /// together (which is safe), never run together.
    pub(super) fn key_of(&self, delivery: &Delivery) -> Option<u64> {
        match &delivery.envelope().partition_key {
            Some(key) => Some(self.hasher.hash_one((0u8, key.as_str()))),
            None => {
                let partition = delivery.info().partition?;
                Some(self.hasher.hash_one((1u8, partition)))
            }
        }
    }

    /// Deliveries waiting for their key.
    pub(super) fn waiting(&self) -> usize {
        self.waiting
    }

    /// Admits `delivery`: returns it back if its key is free (now busy), or
    /// queues it behind its key.
    pub(super) fn admit(&mut self, key: u64, delivery: Delivery) -> Option<Delivery> {
        match self.busy.entry(key) {
            Entry::Vacant(slot) => {
                slot.insert(VecDeque::new());
                Some(delivery)
            }
            Entry::Occupied(mut slot) => {
                slot.get_mut().push_back(delivery);
                self.waiting += 1;
                None
            }
        }
    }

    /// The delivery of `key` finished: returns the next one of that key to
    /// run (the key stays busy), or frees the key.
    pub(super) fn finish(&mut self, key: u64) -> Option<Delivery> {
        let Entry::Occupied(mut slot) = self.busy.entry(key) else {
            return None;
        };
        match slot.get_mut().pop_front() {
            Some(next) => {
                self.waiting -= 1;
                Some(next)
            }
            None => {
                slot.remove();
                None
            }
        }
    }
}
