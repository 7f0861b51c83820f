//! [`LeasePolicy`]: how long a claim lasts, whether it is renewed, and how
//! long a concurrent duplicate waits.

use std::time::Duration;

/// How claims are held.
///
/// - **lease** (default 30 s): how long a claim blocks other deliveries of
///   the same key. If the holder dies, the key is taken over this long after
///   its last renewal.
/// - **renew** (default on): while the handler runs, the lease is extended
///   every third of its length, so a long handler keeps its claim and a dead
///   one loses it quickly. Without renewal a handler that runs longer than
///   the lease can be run a second time by a duplicate.
/// - **busy wait** (default 2 s): how long a duplicate that finds its key
///   claimed polls for the holder to finish before it gives up with a
///   transient error (its delivery goes back to the broker and comes again
///   after the remaining lease).
///
/// ```
/// use std::time::Duration;
/// use surety_idempotency::LeasePolicy;
///
/// let policy = LeasePolicy::new(Duration::from_secs(10)).busy_wait(Duration::ZERO);
/// assert_eq!(policy.lease(), Duration::from_secs(10));
/// assert_eq!(policy.renew_every(), Some(Duration::from_secs(10) / 3));
/// assert_eq!(LeasePolicy::default().renew(false).renew_every(), None);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeasePolicy {
    lease: Duration,
    renew: bool,
    busy_wait: Duration,
}

/// The shortest lease and renewal period.
const MIN_LEASE: Duration = Duration::from_millis(30);

impl Default for LeasePolicy {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(30),
            renew: true,
            busy_wait: Duration::from_secs(2),
        }
    }
}

impl LeasePolicy {
    /// The default policy with a lease of `lease` (at least 30 ms).
    pub fn new(lease: Duration) -> Self {
        Self::default().lease_for(lease)
    }

    /// Sets the lease length (at least 30 ms).
    pub fn lease_for(mut self, lease: Duration) -> Self {
        self.lease = lease.max(MIN_LEASE);
        self
    }

    /// Turns renewal while the handler runs on or off.
    pub fn renew(mut self, renew: bool) -> Self {
        self.renew = renew;
        self
    }

    /// Sets how long a duplicate waits for a busy key (0: not at all).
    pub fn busy_wait(mut self, wait: Duration) -> Self {
        self.busy_wait = wait;
        self
    }

    /// The lease length.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// How long a duplicate waits for a busy key.
    pub fn busy_wait_for(&self) -> Duration {
        self.busy_wait
    }

    /// How often a held lease is renewed, if it is.
    pub fn renew_every(&self) -> Option<Duration> {
        self.renew.then(|| (self.lease / 3).max(MIN_LEASE / 3))
    }
}
