//! The effectful runner: loads an instance, applies one input, writes the
//! result.

use chrono::{DateTime, Utc};
use surety_core::{Classify, Envelope, ErrorClass};

use crate::definition::{Input, Saga, Transition};
use crate::metrics::SagaMetrics;
use crate::store::{
    HistoryRecord, InstanceRecord, NoopRecord, SagaStore, SentCommand, StoreError, TimerRecord,
    Write,
};

/// Instances an orchestrator remembers by default (see
/// [`Orchestrator::remember`]).
pub const DEFAULT_REMEMBERED: usize = 10_000;

/// How often [`Orchestrator::handle`] reloads and re-applies an input after
/// a concurrent write to the same instance before giving up.
const MAX_CONFLICT_RETRIES: usize = 8;

/// Why the orchestrator could not apply an input.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SagaError {
    /// The store failed, or the instance kept changing under us.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The stored state no longer decodes into the saga's state type.
    #[error("saga {saga} {id}: stored state does not decode: {source}")]
    Decode {
        /// The saga's name.
        saga: String,
        /// The saga id.
        id: String,
        /// The decode error.
        #[source]
        source: serde_json::Error,
    },
    /// A stored state written at an older schema version could not be
    /// brought up to the current one.
    #[error("saga {saga} {id}: stored state does not upcast: {source}")]
    Upcast {
        /// The saga's name.
        saga: String,
        /// The saga id.
        id: String,
        /// The upcast error.
        #[source]
        source: surety_core::upcast::UpcastError,
    },
    /// A state, input or command payload could not be encoded.
    #[error("saga {saga} {id}: cannot encode: {source}")]
    Encode {
        /// The saga's name.
        saga: String,
        /// The saga id.
        id: String,
        /// The encode error.
        #[source]
        source: serde_json::Error,
    },
    /// The stored state was written at a schema version this orchestrator
    /// has no upcaster for (a newer one, during a rolling deploy): reading
    /// it as the current version and writing it back would corrupt it.
    #[error(
        "saga {saga} {id}: stored state is at schema version {found}; this orchestrator reads version {known} and has no upcaster for it"
    )]
    UnknownStateVersion {
        /// The saga's name.
        saga: String,
        /// The saga id.
        id: String,
        /// The version stored.
        found: u32,
        /// The version this orchestrator reads.
        known: u32,
    },
}

impl Classify for SagaError {
    fn class(&self) -> ErrorClass {
        match self {
            SagaError::Store(error) => error.class(),
            SagaError::Decode { .. }
            | SagaError::Encode { .. }
            | SagaError::Upcast { .. }
            | SagaError::UnknownStateVersion { .. } => ErrorClass::Permanent,
        }
    }
}

/// What happened to an input.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// The transition was stored (with its commands and timers).
    Applied {
        /// The instance's new version.
        version: u64,
        /// The step it is at now.
        state_name: String,
        /// Whether that step is final.
        finished: bool,
        /// How many commands were written for relaying.
        commands: usize,
    },
    /// The definition ignored the input; nothing was written.
    Ignored,
    /// The instance had already finished; nothing was written.
    Finished,
    /// No instance has that id; nothing was written.
    Unknown,
    /// [`Orchestrator::start`] found the instance already started (a
    /// redelivered start); nothing was written.
    AlreadyStarted,
    /// The timer was cancelled or reset before it could fire.
    TimerStale,
}

/// Runs a [`Saga`] against a [`SagaStore`]: one input at a time per
/// instance, each stored with its history row, commands and timers in one
/// write, guarded by the instance version.
#[derive(Debug)]
pub struct Orchestrator<S, St> {
    saga: S,
    store: St,
    source: String,
    reply_to: Option<String>,
    metrics: Option<SagaMetrics>,
    upcasters: Option<std::sync::Arc<surety_core::upcast::Upcasters>>,
    recent: Recent,
}

/// The unfinished instances this orchestrator wrote last, as it wrote them:
/// the next input to one of them is decided without reading it back. The
/// store's version check keeps this safe: a record another writer moved on
/// since makes the write conflict, and the input is decided again on a
/// fresh read. A decision that writes nothing is never taken on a
/// remembered record (nothing would check it).
#[derive(Debug)]
struct Recent {
    records: std::sync::Mutex<std::collections::HashMap<String, InstanceRecord>>,
    capacity: usize,
}

impl Recent {
    fn new(capacity: usize) -> Self {
        Self {
            records: std::sync::Mutex::default(),
            capacity,
        }
    }

    fn records(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, InstanceRecord>> {
        // A panic while the lock is held leaves the map consistent (one
        // insert or remove): keep using it.
        self.records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn get(&self, id: &str) -> Option<InstanceRecord> {
        if self.capacity == 0 {
            return None;
        }
        self.records().get(id).cloned()
    }

    /// Remembers `record` as stored, unless it is final or older than what
    /// is remembered already.
    fn wrote(&self, record: InstanceRecord) {
        if self.capacity == 0 {
            return;
        }
        let mut records = self.records();
        if record.finished {
            records.remove(&record.id);
            return;
        }
        if let Some(known) = records.get(&record.id)
            && known.version >= record.version
        {
            return;
        }
        if records.len() >= self.capacity
            && !records.contains_key(&record.id)
            && let Some(any) = records.keys().next().cloned()
        {
            records.remove(&any);
        }
        records.insert(record.id.clone(), record);
    }

    fn forget(&self, id: &str) {
        if self.capacity > 0 {
            self.records().remove(id);
        }
    }
}

impl<S: Saga, St: SagaStore> Orchestrator<S, St> {
    /// Runs `saga` on `store`. Commands carry the source `/saga/<name>`
    /// unless [`Orchestrator::source`] says otherwise.
    pub fn new(saga: S, store: St) -> Self {
        Self {
            source: format!("/saga/{}", saga.name()),
            saga,
            store,
            reply_to: None,
            metrics: None,
            upcasters: None,
            recent: Recent::new(DEFAULT_REMEMBERED),
        }
    }

    /// How many unfinished instances this orchestrator remembers as it last
    /// wrote them (default [`DEFAULT_REMEMBERED`]; 0 turns it off), so that
    /// the next input to one of them is decided without a read: one store
    /// transaction per step. Safe with any number of orchestrators on one
    /// store: the write of a decision taken on a record another writer has
    /// moved on conflicts, and the input is decided again on a fresh read.
    pub fn remember(mut self, instances: usize) -> Self {
        self.recent = Recent::new(instances);
        self
    }

    /// Records inputs and transitions in `metrics`.
    pub fn metrics(mut self, metrics: SagaMetrics) -> Self {
        metrics.saga(self.saga.name());
        self.metrics = Some(metrics);
        self
    }

    fn record(&self, outcome: Result<Outcome, SagaError>) -> Result<Outcome, SagaError> {
        if let (Some(metrics), Ok(outcome)) = (&self.metrics, &outcome) {
            metrics.record(self.saga.name(), outcome);
        }
        outcome
    }

    /// Sets the CloudEvents `source` of the commands it sends.
    pub fn source(mut self, source: impl Into<String>) -> Self {
        self.source = source.into();
        self
    }

    /// Sets the reply-to topic of every command it sends: where the
    /// participants reply (see [`Envelope::reply`]). Consume that topic with
    /// [`reply_handler`](crate::consumer::reply_handler).
    pub fn reply_to(mut self, topic: impl Into<String>) -> Self {
        self.reply_to = Some(topic.into());
        self
    }

    /// Upcasts stored states written at an older schema version before they
    /// are decoded. The state's type in `upcasters` is `<saga name>.state`:
    /// register its current version (`current_version`) and a step per
    /// older version. Every write records the current version; a state
    /// from a newer version, or with a missing step, is a permanent
    /// [`SagaError::Upcast`].
    ///
    /// ```
    /// use surety_core::upcast::Upcasters;
    /// use surety_saga::{checkout, store::MemorySagaStore, Orchestrator};
    ///
    /// let saga = checkout::definition(checkout::Deadlines::default());
    /// // Version 2 renamed the data's `total` to `cents`.
    /// let upcasters = Upcasters::new()
    ///     .current_version("checkout.state", 2)
    ///     .step("checkout.state", 1, |mut state| {
    ///         state["data"]["cents"] = state["data"]["total"].take();
    ///         state
    ///     });
    /// let orchestrator = Orchestrator::new(saga, MemorySagaStore::new()).upcast_state(upcasters);
    /// # let _ = orchestrator;
    /// ```
    pub fn upcast_state(mut self, upcasters: surety_core::upcast::Upcasters) -> Self {
        self.upcasters = Some(std::sync::Arc::new(upcasters));
        self
    }

    fn state_type(&self) -> String {
        format!("{}.state", self.saga.name())
    }

    fn state_version(&self) -> u32 {
        self.upcasters
            .as_ref()
            .and_then(|u| u.current_version_of(&self.state_type()))
            .unwrap_or(1)
    }

    fn decode_state(&self, record: &InstanceRecord) -> Result<S::State, SagaError> {
        let Some(upcasters) = &self.upcasters else {
            if record.state_version != 1 {
                return Err(SagaError::UnknownStateVersion {
                    saga: record.saga.clone(),
                    id: record.id.clone(),
                    found: record.state_version,
                    known: 1,
                });
            }
            return decode_state::<S>(record);
        };
        if record.state_version == self.state_version() {
            return decode_state::<S>(record);
        }
        let upcast_error = |source| SagaError::Upcast {
            saga: record.saga.clone(),
            id: record.id.clone(),
            source,
        };
        let mut envelope = Envelope::builder(self.source.clone(), self.state_type())
            .schema_version(record.state_version)
            .json(&record.state)
            .map_err(|source| SagaError::Encode {
                saga: record.saga.clone(),
                id: record.id.clone(),
                source,
            })?
            .build();
        upcasters.upcast(&mut envelope).map_err(upcast_error)?;
        serde_json::from_slice(&envelope.payload).map_err(|source| SagaError::Decode {
            saga: record.saga.clone(),
            id: record.id.clone(),
            source,
        })
    }

    /// The saga definition.
    pub fn saga(&self) -> &S {
        &self.saga
    }

    /// The store.
    pub fn store(&self) -> &St {
        &self.store
    }

    /// Starts instance `id` with the state and commands of `start`. A second
    /// start of the same id (a redelivered trigger) writes nothing and
    /// returns [`Outcome::AlreadyStarted`], also after the instance finished
    /// and was purged (see [`SagaStore::purge_finished`]); so does an
    /// ignoring transition.
    pub async fn start(&self, id: &str, start: Transition<S::State>) -> Result<Outcome, SagaError> {
        let outcome = self.start_inner(id, start).await;
        self.record(outcome)
    }

    async fn start_inner(
        &self,
        id: &str,
        start: Transition<S::State>,
    ) -> Result<Outcome, SagaError> {
        // No read first: the store refuses a second instance of the id (a
        // conflict on version 0), so a start costs one transaction.
        let now = Utc::now();
        let Some(write) = self.prepare(id, 0, None, None, start, None, None, now)? else {
            return Ok(Outcome::AlreadyStarted);
        };
        let outcome = outcome_of(&write);
        let written = write.instance.clone();
        match self.store.write(write).await {
            Ok(()) => {
                self.recent.wrote(written);
                if let Some(metrics) = &self.metrics {
                    metrics.started(self.saga.name());
                }
                Ok(outcome)
            }
            Err(StoreError::Conflict { .. }) => Ok(Outcome::AlreadyStarted),
            Err(StoreError::Purged { .. }) => {
                tracing::info!(
                    saga = self.saga.name(),
                    id,
                    "a start of an instance that finished and was purged: not started again"
                );
                Ok(Outcome::AlreadyStarted)
            }
            Err(error) => Err(error.into()),
        }
    }

    /// Applies `input` to instance `id`, reloading and re-applying when
    /// another writer got there first.
    pub async fn handle(&self, id: &str, input: Input<S::Message>) -> Result<Outcome, SagaError> {
        self.apply_input(id, input, None, None, Utc::now()).await
    }

    /// [`handle`](Self::handle), recording `trace_id` (the trace the input
    /// came with) in the history row.
    pub async fn handle_traced(
        &self,
        id: &str,
        input: Input<S::Message>,
        trace_id: Option<&str>,
    ) -> Result<Outcome, SagaError> {
        self.apply_input(id, input, None, trace_id, Utc::now())
            .await
    }

    /// Fires the timers of this saga due at `now` (at most `limit`), each as
    /// an [`Input::Timeout`] to its instance. Returns the outcomes of the
    /// timers that fired, in due order. Call it on an interval from a
    /// background task.
    ///
    /// A timer whose instance cannot be handled for good (its stored state
    /// does not decode or upcast) is logged and left in place for an
    /// operator; the other timers of the batch still fire. A store failure
    /// (transient) ends the batch with the error: the next call retries.
    pub async fn fire_due_timers(
        &self,
        now: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<Outcome>, SagaError> {
        let due = self.store.due_timers(self.saga.name(), now, limit).await?;
        let mut outcomes = Vec::with_capacity(due.len());
        for timer in due {
            let (id, name) = (timer.id.clone(), timer.name.clone());
            match self.fire_timer(timer, now).await {
                Ok(outcome) => outcomes.push(outcome),
                Err(error) if !error.class().is_retryable() => {
                    tracing::error!(
                        saga = self.saga.name(),
                        id,
                        timer = name,
                        error = %error,
                        "a due timer cannot fire: its instance cannot be handled; the other timers go on"
                    );
                }
                Err(error) => return Err(error),
            }
        }
        Ok(outcomes)
    }

    /// Fires one polled timer as an [`Input::Timeout`] at `now`. A timer
    /// cancelled or reset since it was polled gives [`Outcome::TimerStale`]
    /// and writes nothing.
    pub async fn fire_timer(
        &self,
        timer: TimerRecord,
        now: DateTime<Utc>,
    ) -> Result<Outcome, SagaError> {
        let input = Input::Timeout {
            name: timer.name.clone(),
        };
        let id = timer.id.clone();
        let outcome = self.apply_input(&id, input, Some(timer), None, now).await;
        if let (Some(metrics), Ok(outcome)) = (&self.metrics, &outcome) {
            metrics.timeout(self.saga.name(), outcome);
        }
        outcome
    }

    /// The instance's current state, decoded.
    pub async fn state(&self, id: &str) -> Result<Option<S::State>, SagaError> {
        match self.store.load(self.saga.name(), id).await? {
            None => Ok(None),
            Some(record) => self.decode_state(&record).map(Some),
        }
    }

    /// The instance's recorded history: the start state and the inputs
    /// applied since, oldest first. Feed them to [`replay`](crate::replay)
    /// to recompute the state.
    pub async fn history(
        &self,
        id: &str,
    ) -> Result<Option<(S::State, Vec<Input<S::Message>>)>, SagaError> {
        let rows = self.store.history(self.saga.name(), id).await?;
        let mut rows = rows.into_iter();
        let Some(first) = rows.next() else {
            return Ok(None);
        };
        let decode_error = |source| SagaError::Decode {
            saga: self.saga.name().to_owned(),
            id: id.to_owned(),
            source,
        };
        let initial = serde_json::from_value(first.state).map_err(decode_error)?;
        let mut inputs = Vec::new();
        for row in rows {
            if let Some(input) = row.input {
                inputs.push(serde_json::from_value(input).map_err(decode_error)?);
            }
        }
        Ok(Some((initial, inputs)))
    }

    async fn apply_input(
        &self,
        id: &str,
        input: Input<S::Message>,
        fired: Option<TimerRecord>,
        trace_id: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<Outcome, SagaError> {
        let outcome = self.apply_inner(id, input, fired, trace_id, now).await;
        self.record(outcome)
    }

    async fn apply_inner(
        &self,
        id: &str,
        input: Input<S::Message>,
        fired: Option<TimerRecord>,
        trace_id: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<Outcome, SagaError> {
        let mut conflicts = 0;
        let mut remembered = self.recent.get(id);
        loop {
            // A remembered record is never finished (`Recent::wrote` drops
            // those) and only ever used for a decision that writes (the
            // write checks its version).
            let (record, from_memory) = match remembered.take() {
                Some(record) => (record, true),
                None => match self.store.load(self.saga.name(), id).await? {
                    Some(record) => (record, false),
                    None => return Ok(Outcome::Unknown),
                },
            };
            if record.finished {
                self.noop(&record, &input, "finished", trace_id, now)
                    .await?;
                return Ok(Outcome::Finished);
            }
            let state = self.decode_state(&record)?;
            let transition = self.saga.apply(&state, &input);
            let Some(write) = self.prepare(
                id,
                record.version,
                Some(&record.state_name),
                Some(&input),
                transition,
                fired.clone(),
                trace_id,
                now,
            )?
            else {
                if from_memory {
                    self.recent.forget(id);
                    continue;
                }
                // A timer the definition ignores would fall due again on
                // every poll: it is dropped (if it is still the one fired).
                if let Some(timer) = &fired {
                    self.store.delete_timer(timer).await?;
                }
                self.noop(&record, &input, "ignored", trace_id, now).await?;
                return Ok(Outcome::Ignored);
            };
            let outcome = outcome_of(&write);
            let written = write.instance.clone();
            let result = self.store.write(write).await;
            if result.is_err() {
                self.recent.forget(id);
            }
            match result {
                Ok(()) => {
                    self.recent.wrote(written);
                    if let Some(metrics) = &self.metrics {
                        let waited = (now - record.updated_at).to_std().unwrap_or_default();
                        metrics.step(self.saga.name(), &record.state_name, waited);
                    }
                    return Ok(outcome);
                }
                Err(StoreError::TimerGone { .. }) => return Ok(Outcome::TimerStale),
                Err(StoreError::Conflict { .. }) if conflicts < MAX_CONFLICT_RETRIES => {
                    conflicts += 1;
                    if let Some(metrics) = &self.metrics {
                        metrics.conflict(self.saga.name());
                    }
                }
                Err(error) => return Err(error.into()),
            }
        }
    }

    /// Records an input that changed nothing (bounded: one counted record
    /// per version, input and outcome) and counts a duplicate or late reply.
    async fn noop(
        &self,
        record: &InstanceRecord,
        input: &Input<S::Message>,
        outcome: &str,
        trace_id: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<(), SagaError> {
        if let (Some(metrics), Input::Message(_)) = (&self.metrics, input) {
            metrics.duplicate_reply(self.saga.name());
        }
        let noop = NoopRecord::new(
            record.version,
            input_label(input),
            outcome,
            now,
            trace_id.map(str::to_owned),
        );
        self.store
            .record_noop(&record.saga, &record.id, noop)
            .await?;
        Ok(())
    }

    // Private: the arguments are the parts of one write, named.
    #[allow(clippy::too_many_arguments)]
    fn prepare(
        &self,
        id: &str,
        loaded_version: u64,
        from_state: Option<&str>,
        input: Option<&Input<S::Message>>,
        transition: Transition<S::State>,
        fired_timer: Option<TimerRecord>,
        trace_id: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<Option<Write>, SagaError> {
        let Transition {
            state,
            commands,
            set_timers,
            cancel_timers,
        } = transition;
        let Some(state) = state else {
            return Ok(None);
        };
        let encode_error = |source| SagaError::Encode {
            saga: self.saga.name().to_owned(),
            id: id.to_owned(),
            source,
        };
        let version = loaded_version + 1;
        let state_json = serde_json::to_value(&state).map_err(encode_error)?;
        let input_json = input
            .map(serde_json::to_value)
            .transpose()
            .map_err(encode_error)?;
        let state_name = self.saga.state_name(&state).to_owned();
        let mut envelopes = Vec::with_capacity(commands.len());
        for (index, command) in commands.into_iter().enumerate() {
            let message_id = match &command.key {
                Some(key) => format!("{}:{id}:{key}", self.saga.name()),
                None => format!("{}:{id}:{version}:{index}", self.saga.name()),
            };
            let mut builder = Envelope::builder(self.source.clone(), command.message_type)
                .id(message_id)
                .time(now)
                .correlation_id(id)
                .partition_key(id);
            if let Some(key) = command.key {
                builder = builder.header(crate::definition::COMMAND_KEY_HEADER, key);
            }
            if let Some(reply_to) = &self.reply_to {
                builder = builder.reply_to(reply_to.clone());
            }
            let envelope = builder
                .json(&command.payload)
                .map_err(encode_error)?
                .build();
            envelopes.push((command.topic, envelope));
        }
        let sent = envelopes
            .iter()
            .map(|(topic, envelope)| {
                SentCommand::new(
                    topic.clone(),
                    envelope.event_type.clone(),
                    envelope.id.clone(),
                )
            })
            .collect();
        let set_timers = set_timers
            .into_iter()
            .map(|(name, after)| {
                let after = chrono::Duration::from_std(after).unwrap_or(chrono::Duration::MAX);
                (
                    name,
                    now.checked_add_signed(after)
                        .unwrap_or(DateTime::<Utc>::MAX_UTC),
                )
            })
            .collect();
        Ok(Some(Write {
            instance: InstanceRecord {
                saga: self.saga.name().to_owned(),
                id: id.to_owned(),
                state: state_json.clone(),
                state_name: state_name.clone(),
                version,
                finished: self.saga.is_finished(&state),
                updated_at: now,
                state_version: self.state_version(),
            },
            history: HistoryRecord {
                version,
                input: input_json,
                state: state_json,
                state_name,
                at: now,
                trace_id: trace_id.map(str::to_owned),
                from_state: from_state.map(str::to_owned),
                commands: sent,
                timer_due: fired_timer.as_ref().map(|timer| timer.due),
            },
            commands: envelopes,
            set_timers,
            cancel_timers,
            fired_timer,
        }))
    }
}

/// How a no-op record names an input: a reply by its type (a
/// [`StepReply`](crate::steps::StepReply)'s `message_type`, a unit enum
/// variant, or the variant of an enum with data), else `message`; a timer
/// or an operator action by its name. At most 200 bytes.
fn input_label<M: serde::Serialize>(input: &Input<M>) -> String {
    let mut label = match input {
        Input::Message(message) => match serde_json::to_value(message) {
            Ok(serde_json::Value::String(kind)) => kind,
            Ok(serde_json::Value::Object(fields)) => match fields.get("message_type") {
                Some(serde_json::Value::String(kind)) => kind.clone(),
                _ if fields.len() == 1 => fields.keys().next().cloned().unwrap_or_default(),
                _ => "message".to_owned(),
            },
            _ => "message".to_owned(),
        },
        Input::Timeout { name } => format!("timeout {name}"),
        Input::Operator(action) => format!("operator {}", action.action),
    };
    if label.len() > 200 {
        let mut end = 200;
        while !label.is_char_boundary(end) {
            end -= 1;
        }
        label.truncate(end);
    }
    label
}

fn outcome_of(write: &Write) -> Outcome {
    Outcome::Applied {
        version: write.instance.version,
        state_name: write.instance.state_name.clone(),
        finished: write.instance.finished,
        commands: write.commands.len(),
    }
}

fn decode_state<S: Saga>(record: &InstanceRecord) -> Result<S::State, SagaError> {
    serde_json::from_value(record.state.clone()).map_err(|source| SagaError::Decode {
        saga: record.saga.clone(),
        id: record.id.clone(),
        source,
    })
}
