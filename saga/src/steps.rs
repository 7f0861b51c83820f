//! The step-list builder: the common orchestration shape as data.
//!
//! A [`Steps`] definition is a list of [`Step`]s. Each step sends one
//! command to a participant's queue and waits for a reply, matched by its
//! message type: a success reply moves on to the next step, a business
//! failure (declined, out of stock) or an error reply starts compensation,
//! the step's deadline retries the step per its [`RetryPolicy`] and, once
//! the attempts are spent, starts compensation. Compensation sends the
//! [`Compensation`] command of each step that took effect, in reverse
//! order; a compensation that keeps failing ends the instance in
//! `compensation-failed`, which waits for an operator.
//!
//! `Steps` implements [`Saga`], so it runs on the [`Orchestrator`](crate::Orchestrator)
//! like a hand-written definition, and it stays pure: given/when/then and
//! property tests need no broker.
//!
//! ```
//! use std::time::Duration;
//! use surety_saga::steps::{Compensation, RetryPolicy, Step, StepReply, Steps, Status};
//! use surety_saga::{Input, Saga};
//!
//! let transfer = Steps::new("transfer")
//!     .step(Step::new("debit", "accounts", "account.debit")
//!         .replies("account.debited")
//!         .fails_on("account.insufficient-funds")
//!         .retry(RetryPolicy::attempts(3))
//!         .deadline(Duration::from_secs(10))
//!         .compensate(Compensation::new("accounts", "account.credit").replies("account.credited")))
//!     .step(Step::new("credit", "accounts", "account.credit").replies("account.credited"));
//!
//! let start = transfer.begin(serde_json::json!({"from": "a", "to": "b", "cents": 500}));
//! assert_eq!(start.commands()[0].message_type, "account.debit");
//! let state = start.state().unwrap().clone();
//!
//! let next = transfer.apply(&state, &Input::Message(StepReply::new("account.insufficient-funds")));
//! assert_eq!(next.state().unwrap().status, Status::Compensated, "nothing to undo");
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::definition::{Command, Input, OperatorAction, Saga, Transition};

/// The name of the one timer a step-list saga sets: the current step's (or
/// compensation's) deadline.
pub const DEADLINE: &str = "deadline";

/// The operator actions a step-list saga understands (the `action` of an
/// [`OperatorAction`]).
pub mod actions {
    /// Re-send the current step's command (or the current compensation,
    /// also from `compensation-failed`) as a new command with fresh attempts.
    pub const RETRY: &str = "retry";
    /// Stop going forward and compensate what was done.
    pub const COMPENSATE: &str = "compensate";
    /// End the instance as `resolved`, with the operator's reason; nothing
    /// more is sent.
    pub const RESOLVE: &str = "resolve";
}

/// How often a step's command (or a compensation) is sent before the saga
/// gives up on it: after a missed deadline it is sent again, with the same
/// message id, until `max_attempts` sends were made.
///
/// The same id is what makes a re-send safe, and it also means that a
/// participant behind `surety-idempotency` answers a re-sent command with
/// the reply it stored. So an error reply (the participant's permanent
/// failure; transient ones are retried on the participant's side, without
/// a reply) is final for the command and skips the attempts left: the
/// step compensates what came before it, a compensation ends in
/// `compensation-failed`. The attempts cover commands and replies that
/// were lost. To try again after fixing the cause, use the operator's
/// `retry`, which sends a new command.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Sends in all, the first included (at least 1).
    pub max_attempts: u32,
}

impl RetryPolicy {
    /// At most `max_attempts` sends (1 if given 0).
    pub fn attempts(max_attempts: u32) -> Self {
        Self {
            max_attempts: max_attempts.max(1),
        }
    }

    /// One send, no retry.
    pub fn none() -> Self {
        Self::attempts(1)
    }
}

impl Default for RetryPolicy {
    /// Three sends.
    fn default() -> Self {
        Self::attempts(3)
    }
}

/// The command that undoes a step, with the replies that confirm it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compensation {
    topic: String,
    command: String,
    ok: Vec<String>,
    error: String,
    retry: RetryPolicy,
    deadline: Duration,
}

impl Compensation {
    /// Sends a `command` to `topic`. Its error reply type defaults to
    /// `<command>.error`; retry and deadline default to 3 sends and 30 s.
    pub fn new(topic: impl Into<String>, command: impl Into<String>) -> Self {
        let command = command.into();
        Self {
            topic: topic.into(),
            error: format!("{command}.error"),
            command,
            ok: Vec::new(),
            retry: RetryPolicy::default(),
            deadline: Duration::from_secs(30),
        }
    }

    /// A reply type that confirms the compensation (call once per type).
    pub fn replies(mut self, message_type: impl Into<String>) -> Self {
        self.ok.push(message_type.into());
        self
    }

    /// The reply type a participant sends when it could not compensate.
    pub fn error_reply(mut self, message_type: impl Into<String>) -> Self {
        self.error = message_type.into();
        self
    }

    /// How often the compensation is sent before the saga ends in
    /// `compensation-failed`.
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// How long to wait for a reply before sending it again.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }
}

/// One step: a command to a participant, the replies that answer it, and
/// optionally the compensation that undoes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    name: String,
    topic: String,
    command: String,
    ok: Vec<String>,
    declined: Vec<String>,
    error: String,
    retry: RetryPolicy,
    deadline: Duration,
    compensation: Option<Compensation>,
}

impl Step {
    /// Step `name` sends a `command` to `topic`. Its error reply type
    /// defaults to `<command>.error`; retry and deadline default to 3 sends
    /// and 30 s.
    pub fn new(
        name: impl Into<String>,
        topic: impl Into<String>,
        command: impl Into<String>,
    ) -> Self {
        let command = command.into();
        Self {
            name: name.into(),
            topic: topic.into(),
            error: format!("{command}.error"),
            command,
            ok: Vec::new(),
            declined: Vec::new(),
            retry: RetryPolicy::default(),
            deadline: Duration::from_secs(30),
            compensation: None,
        }
    }

    /// A reply type that completes the step (call once per type).
    pub fn replies(mut self, message_type: impl Into<String>) -> Self {
        self.ok.push(message_type.into());
        self
    }

    /// A reply type that is a business failure (the step did not happen):
    /// the saga compensates the steps before it.
    pub fn fails_on(mut self, message_type: impl Into<String>) -> Self {
        self.declined.push(message_type.into());
        self
    }

    /// The reply type a participant sends when it failed with an error.
    pub fn error_reply(mut self, message_type: impl Into<String>) -> Self {
        self.error = message_type.into();
        self
    }

    /// How often the command is sent before the saga gives up on the step.
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// How long to wait for a reply before sending the command again.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// How to undo the step when a later one fails (or when this one timed
    /// out: its command may have taken effect).
    pub fn compensate(mut self, compensation: Compensation) -> Self {
        self.compensation = Some(compensation);
        self
    }

    /// The step's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// A reply to a step-list saga: its message type and JSON payload. The
/// [`reply_handler`](crate::consumer::reply_handler) builds it from the
/// envelope.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepReply {
    /// The reply's message type (CloudEvents `type`).
    pub message_type: String,
    /// The reply's payload.
    pub payload: serde_json::Value,
}

impl StepReply {
    /// A reply of `message_type` with a `null` payload.
    pub fn new(message_type: impl Into<String>) -> Self {
        Self {
            message_type: message_type.into(),
            payload: serde_json::Value::Null,
        }
    }

    /// The same reply with `payload`.
    pub fn with_payload(mut self, payload: serde_json::Value) -> Self {
        self.payload = payload;
        self
    }
}

/// Where a step-list saga instance is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Status {
    /// Waiting for the reply to step `step` (index), sent `attempt` times.
    Running {
        /// The step's index.
        step: usize,
        /// Sends so far.
        attempt: u32,
    },
    /// Waiting for the reply to the compensation of step `step`, sent
    /// `attempt` times.
    Compensating {
        /// The compensated step's index.
        step: usize,
        /// Sends so far.
        attempt: u32,
    },
    /// Every step succeeded. Final.
    Completed,
    /// A step failed and everything done before was undone. Final.
    Compensated,
    /// The compensation of step `step` failed on every attempt: waits for an
    /// operator (`retry` or `resolve`). Not final: a late reply confirming
    /// the compensation still moves it on; nothing else happens without an
    /// operator.
    CompensationFailed {
        /// The step whose compensation failed.
        step: usize,
    },
    /// An operator ended the instance. Final.
    Resolved,
}

/// The state of a step-list saga instance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct StepState {
    /// Where it is.
    pub status: Status,
    /// The data the saga started with; every command carries it as payload.
    pub data: serde_json::Value,
    /// The payload of each completed step's reply, by step name.
    pub results: BTreeMap<String, serde_json::Value>,
    /// The steps left to compensate, the next one last.
    pub undo: Vec<usize>,
    /// Why it went wrong (the failing reply, the missed deadline, the
    /// operator's reason).
    pub failure: Option<String>,
    /// Bumped by each operator retry: part of the command keys, so an
    /// operator retry is a new command.
    pub generation: u32,
    /// The version of the definition the instance started on (see
    /// [`Versions`]); 1 for states stored before versions existed.
    #[serde(default = "first_version")]
    pub definition: u32,
}

fn first_version() -> u32 {
    1
}

/// A saga made of [`Step`]s; see the [module docs](self).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Steps {
    name: String,
    steps: Vec<Step>,
    /// State names, by step: `running`, then `compensating`.
    names: Vec<(String, String)>,
    version: u32,
}

impl Steps {
    /// A definition named `name` (instances are stored under it), with no
    /// steps yet.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            steps: Vec::new(),
            names: Vec::new(),
            version: 1,
        }
    }

    /// Appends a step.
    pub fn step(mut self, step: Step) -> Self {
        self.names
            .push((step.name.clone(), format!("compensating-{}", step.name)));
        self.steps.push(step);
        self
    }

    /// The definition's version (default 1), recorded in every instance it
    /// starts. Bump it when a change would give an in-flight instance's
    /// step index another meaning, and keep the old definition draining
    /// with [`Versions`].
    pub fn version(mut self, version: u32) -> Self {
        self.version = version;
        self
    }

    /// The version set with [`version`](Self::version).
    pub fn version_number(&self) -> u32 {
        self.version
    }

    /// The steps, in order.
    pub fn steps(&self) -> &[Step] {
        &self.steps
    }

    /// Every reply type the definition reacts to (success, business
    /// failure, error and compensation replies), sorted, without
    /// duplicates: the routes of the reply consumer.
    pub fn reply_types(&self) -> Vec<String> {
        let mut types: Vec<String> = self
            .steps
            .iter()
            .flat_map(|step| {
                let comp = step
                    .compensation
                    .iter()
                    .flat_map(|c| c.ok.iter().cloned().chain(std::iter::once(c.error.clone())));
                step.ok
                    .iter()
                    .chain(&step.declined)
                    .cloned()
                    .chain(std::iter::once(step.error.clone()))
                    .chain(comp)
                    .collect::<Vec<_>>()
            })
            .collect();
        types.sort();
        types.dedup();
        types
    }

    /// The start of an instance with `data`: the first step's command and
    /// its deadline. Pass it to [`Orchestrator::start`](crate::Orchestrator::start).
    /// A definition without steps completes at once.
    pub fn begin(&self, data: serde_json::Value) -> Transition<StepState> {
        let state = StepState {
            status: Status::Completed,
            data,
            results: BTreeMap::new(),
            undo: Vec::new(),
            failure: None,
            generation: 0,
            definition: self.version,
        };
        if self.steps.is_empty() {
            return Transition::to(state);
        }
        self.send_step(state, 0, 1)
    }

    fn step_key(&self, state: &StepState, index: usize, compensation: bool) -> String {
        let name = self.steps.get(index).map_or("", |s| s.name.as_str());
        let kind = if compensation { "undo" } else { "do" };
        format!("{kind}:{name}:{}", state.generation)
    }

    fn send_step(&self, mut state: StepState, index: usize, attempt: u32) -> Transition<StepState> {
        let Some(step) = self.steps.get(index) else {
            return Transition::ignore();
        };
        let key = self.step_key(&state, index, false);
        let command = Command::new(&step.topic, &step.command, state.data.clone()).keyed(key);
        state.status = Status::Running {
            step: index,
            attempt,
        };
        Transition::to(state)
            .command(command)
            .set_timer(DEADLINE, step.deadline)
    }

    fn send_compensation(&self, mut state: StepState, attempt: u32) -> Transition<StepState> {
        // Skip steps without a compensation (they are never pushed, but a
        // definition may have changed under an old instance).
        while let Some(&index) = state.undo.last() {
            if let Some(comp) = self.steps.get(index).and_then(|s| s.compensation.as_ref()) {
                let key = self.step_key(&state, index, true);
                let command =
                    Command::new(&comp.topic, &comp.command, state.data.clone()).keyed(key);
                state.status = Status::Compensating {
                    step: index,
                    attempt,
                };
                return Transition::to(state)
                    .command(command)
                    .set_timer(DEADLINE, comp.deadline);
            }
            state.undo.pop();
        }
        state.status = Status::Compensated;
        Transition::to(state).cancel_timer(DEADLINE)
    }

    /// Starts compensating: the completed steps (and `current`, whose
    /// command may have taken effect, when `include_current`), in reverse.
    fn compensate(
        &self,
        state: &StepState,
        current: usize,
        include_current: bool,
        why: String,
    ) -> Transition<StepState> {
        let mut next = state.clone();
        next.failure = Some(why);
        next.undo = (0..current)
            .chain(include_current.then_some(current))
            .filter(|&i| self.steps.get(i).is_some_and(|s| s.compensation.is_some()))
            .collect();
        self.send_compensation(next, 1)
    }

    fn on_running(
        &self,
        state: &StepState,
        index: usize,
        attempt: u32,
        input: &Input<StepReply>,
    ) -> Transition<StepState> {
        let Some(step) = self.steps.get(index) else {
            return Transition::ignore();
        };
        match input {
            Input::Message(reply) if step.ok.contains(&reply.message_type) => {
                let mut next = state.clone();
                next.results
                    .insert(step.name.clone(), reply.payload.clone());
                if index + 1 < self.steps.len() {
                    self.send_step(next, index + 1, 1)
                } else {
                    next.status = Status::Completed;
                    Transition::to(next).cancel_timer(DEADLINE)
                }
            }
            Input::Message(reply) if step.declined.contains(&reply.message_type) => {
                let why = format!("{}: {}", step.name, reply.message_type);
                self.compensate(state, index, false, why)
            }
            // An error reply is final for this command: the participant's
            // idempotency layer stored it under the command's id, so a
            // re-send (same id) would only get it again. The command did
            // not take effect: compensate the steps before this one.
            Input::Message(reply) if reply.message_type == step.error => {
                let why = format!("{}: {} (final for this command)", step.name, step.error);
                self.compensate(state, index, false, why)
            }
            Input::Timeout { name } if name == DEADLINE => {
                if attempt < step.retry.max_attempts {
                    self.send_step(state.clone(), index, attempt + 1)
                } else {
                    let why = format!("{}: no reply after {attempt} attempts", step.name);
                    self.compensate(state, index, true, why)
                }
            }
            Input::Operator(action) => match action.action.as_str() {
                actions::RETRY => {
                    let mut next = state.clone();
                    next.generation += 1;
                    self.send_step(next, index, 1)
                }
                actions::COMPENSATE => self.compensate(state, index, true, operator_reason(action)),
                actions::RESOLVE => resolve(state, action),
                _ => Transition::ignore(),
            },
            _ => Transition::ignore(),
        }
    }

    fn on_compensating(
        &self,
        state: &StepState,
        index: usize,
        attempt: u32,
        input: &Input<StepReply>,
    ) -> Transition<StepState> {
        let Some(comp) = self.steps.get(index).and_then(|s| s.compensation.as_ref()) else {
            return Transition::ignore();
        };
        let fail = |state: &StepState| {
            let mut next = state.clone();
            next.status = Status::CompensationFailed { step: index };
            Transition::to(next).cancel_timer(DEADLINE)
        };
        match input {
            Input::Message(reply) if comp.ok.contains(&reply.message_type) => {
                let mut next = state.clone();
                next.undo.pop();
                self.send_compensation(next, 1)
            }
            // Final for this command, as for a step: an operator's retry
            // sends a new one.
            Input::Message(reply) if reply.message_type == comp.error => fail(state),
            Input::Timeout { name } if name == DEADLINE => {
                if attempt < comp.retry.max_attempts {
                    self.send_compensation(state.clone(), attempt + 1)
                } else {
                    fail(state)
                }
            }
            Input::Operator(action) => self.on_operator_compensating(state, action),
            _ => Transition::ignore(),
        }
    }

    fn on_operator_compensating(
        &self,
        state: &StepState,
        action: &OperatorAction,
    ) -> Transition<StepState> {
        match action.action.as_str() {
            actions::RETRY => {
                let mut next = state.clone();
                next.generation += 1;
                self.send_compensation(next, 1)
            }
            actions::RESOLVE => resolve(state, action),
            _ => Transition::ignore(),
        }
    }

    /// The definition as a Mermaid state diagram (`stateDiagram-v2`), for
    /// docs and the admin page.
    pub fn mermaid(&self) -> String {
        let mut out = String::from("stateDiagram-v2\n");
        let id = |s: &str| s.replace(|c: char| !c.is_ascii_alphanumeric(), "_");
        let Some(first) = self.steps.first() else {
            out.push_str("    [*] --> completed\n    completed --> [*]\n");
            return out;
        };
        let _ = writeln!(out, "    [*] --> {}", id(&first.name));
        for (index, step) in self.steps.iter().enumerate() {
            let here = id(&step.name);
            let next = self
                .steps
                .get(index + 1)
                .map_or_else(|| "completed".to_owned(), |s| id(&s.name));
            let _ = writeln!(
                out,
                "    {here} : {} to {}",
                step.command,
                step.topic.replace(':', "_")
            );
            let _ = writeln!(out, "    {here} --> {next} : {}", step.ok.join(" / "));
            let _ = writeln!(
                out,
                "    {here} --> {here} : {} or deadline {}s (up to {} sends)",
                step.error,
                step.deadline.as_secs(),
                step.retry.max_attempts
            );
            let undo_from = |include: bool| {
                (0..index)
                    .chain(include.then_some(index))
                    .rev()
                    .find(|&i| self.steps.get(i).is_some_and(|s| s.compensation.is_some()))
                    .and_then(|i| self.steps.get(i))
                    .map_or_else(
                        || "compensated".to_owned(),
                        |s| format!("compensating_{}", id(&s.name)),
                    )
            };
            if !step.declined.is_empty() {
                let _ = writeln!(
                    out,
                    "    {here} --> {} : {}",
                    undo_from(false),
                    step.declined.join(" / ")
                );
            }
            // Error replies say the command did not take effect: undo the
            // steps before. Silence may hide an effect: undo this one too.
            let _ = writeln!(out, "    {here} --> {} : {}", undo_from(false), step.error);
            let _ = writeln!(
                out,
                "    {here} --> {} : no reply, attempts spent",
                undo_from(true)
            );
            if let Some(comp) = &step.compensation {
                let undo = format!("compensating_{here}");
                let before = (0..index)
                    .rev()
                    .find(|&i| self.steps.get(i).is_some_and(|s| s.compensation.is_some()))
                    .and_then(|i| self.steps.get(i))
                    .map_or_else(
                        || "compensated".to_owned(),
                        |s| format!("compensating_{}", id(&s.name)),
                    );
                let _ = writeln!(out, "    {undo} : {} to {}", comp.command, comp.topic);
                let _ = writeln!(out, "    {undo} --> {before} : {}", comp.ok.join(" / "));
                let _ = writeln!(
                    out,
                    "    {undo} --> compensation_failed : {} / no reply, attempts spent",
                    comp.error
                );
            }
        }
        out.push_str("    compensation_failed --> resolved : operator resolve\n");
        out.push_str("    completed --> [*]\n    compensated --> [*]\n    resolved --> [*]\n");
        out
    }
}

fn operator_reason(action: &OperatorAction) -> String {
    format!(
        "operator {} ({}): {}",
        action.action, action.actor, action.reason
    )
}

fn resolve(state: &StepState, action: &OperatorAction) -> Transition<StepState> {
    let mut next = state.clone();
    next.status = Status::Resolved;
    next.failure = Some(operator_reason(action));
    Transition::to(next).cancel_timer(DEADLINE)
}

impl Saga for Steps {
    type State = StepState;
    type Message = StepReply;

    fn name(&self) -> &str {
        &self.name
    }

    fn state_name<'a>(&'a self, state: &'a StepState) -> &'a str {
        match state.status {
            Status::Running { step, .. } => self.names.get(step).map_or("running", |n| &n.0),
            Status::Compensating { step, .. } => {
                self.names.get(step).map_or("compensating", |n| &n.1)
            }
            Status::Completed => "completed",
            Status::Compensated => "compensated",
            Status::CompensationFailed { .. } => "compensation-failed",
            Status::Resolved => "resolved",
        }
    }

    fn is_finished(&self, state: &StepState) -> bool {
        matches!(
            state.status,
            Status::Completed | Status::Compensated | Status::Resolved
        )
    }

    fn apply(&self, state: &StepState, input: &Input<StepReply>) -> Transition<StepState> {
        match state.status {
            Status::Running { step, attempt } => self.on_running(state, step, attempt, input),
            Status::Compensating { step, attempt } => {
                self.on_compensating(state, step, attempt, input)
            }
            Status::CompensationFailed { step } => match input {
                Input::Operator(action) => self.on_operator_compensating(state, action),
                // A late confirmation: the compensation did happen after all.
                Input::Message(reply)
                    if self
                        .steps
                        .get(step)
                        .and_then(|s| s.compensation.as_ref())
                        .is_some_and(|c| c.ok.contains(&reply.message_type)) =>
                {
                    let mut next = state.clone();
                    next.undo.pop();
                    self.send_compensation(next, 1)
                }
                _ => Transition::ignore(),
            },
            Status::Completed | Status::Compensated | Status::Resolved => Transition::ignore(),
        }
    }
}

/// Several versions of one step-list saga: new instances start on the
/// current one, and each stored instance keeps running on the version it
/// started on ([`StepState::definition`]) until it finishes. That is how
/// an old version drains: keep it here until the operator API lists no
/// unfinished instance of it, then drop it. An input for an instance whose
/// version is not loaded is ignored (and logged), so the instance shows up
/// as stuck instead of running on a definition it did not start on.
///
/// ```
/// use surety_saga::steps::{Step, Steps, Versions};
/// use surety_saga::{Input, Saga};
///
/// let v1 = Steps::new("pay").step(Step::new("charge", "payments", "payment.charge").replies("payment.charged"));
/// let v2 = Steps::new("pay").version(2)
///     .step(Step::new("check", "fraud", "fraud.check").replies("fraud.cleared"))
///     .step(Step::new("charge", "payments", "payment.charge").replies("payment.charged"));
/// let old = v1.begin(serde_json::json!({})).state().cloned().unwrap();
/// let saga = Versions::new(v2).draining(v1);
///
/// assert_eq!(saga.begin(serde_json::json!({})).commands()[0].message_type, "fraud.check");
/// let reply = Input::Message(surety_saga::steps::StepReply::new("payment.charged"));
/// assert!(saga.is_finished(saga.apply(&old, &reply).state().unwrap()), "v1 runs on v1");
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versions {
    current: Steps,
    draining: Vec<Steps>,
}

impl Versions {
    /// New instances start on `current`.
    pub fn new(current: Steps) -> Self {
        Self {
            current,
            draining: Vec::new(),
        }
    }

    /// Keeps `old` running for the instances that started on it. Its name
    /// must be the current one's (instances are stored under it).
    pub fn draining(mut self, old: Steps) -> Self {
        self.draining.push(old);
        self
    }

    /// The definition new instances start on.
    pub fn current(&self) -> &Steps {
        &self.current
    }

    /// The start of an instance on the current version.
    pub fn begin(&self, data: serde_json::Value) -> Transition<StepState> {
        self.current.begin(data)
    }

    fn of(&self, state: &StepState) -> Option<&Steps> {
        std::iter::once(&self.current)
            .chain(&self.draining)
            .find(|s| s.version == state.definition)
    }
}

/// A saga whose replies are [`StepReply`]s of known types: what the
/// [`reply_handler`](crate::consumer::reply_handler) routes.
pub trait ReplyTypes {
    /// Every reply type the saga reacts to, sorted, without duplicates.
    fn reply_types(&self) -> Vec<String>;
}

impl ReplyTypes for Steps {
    fn reply_types(&self) -> Vec<String> {
        Steps::reply_types(self)
    }
}

impl ReplyTypes for Versions {
    fn reply_types(&self) -> Vec<String> {
        let mut types: Vec<String> = std::iter::once(&self.current)
            .chain(&self.draining)
            .flat_map(Steps::reply_types)
            .collect();
        types.sort();
        types.dedup();
        types
    }
}

impl Saga for Versions {
    type State = StepState;
    type Message = StepReply;

    fn name(&self) -> &str {
        &self.current.name
    }

    fn state_name<'a>(&'a self, state: &'a StepState) -> &'a str {
        self.of(state)
            .map_or("unknown-version", |s| s.state_name(state))
    }

    fn is_finished(&self, state: &StepState) -> bool {
        self.current.is_finished(state)
    }

    fn apply(&self, state: &StepState, input: &Input<StepReply>) -> Transition<StepState> {
        match self.of(state) {
            Some(steps) => steps.apply(state, input),
            None => {
                tracing::warn!(
                    saga = self.current.name,
                    version = state.definition,
                    "an instance of a definition version that is not loaded; input ignored"
                );
                Transition::ignore()
            }
        }
    }
}
