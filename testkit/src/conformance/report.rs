//! The outcome of a conformance run.

use std::fmt;

use super::CheckResult;

/// A conformance check that failed: which check, what was expected and what
/// was seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckFailure {
    /// The check's name (its function's name).
    pub check: &'static str,
    /// What was expected and what was seen instead.
    pub message: String,
}

impl CheckFailure {
    /// A failure of `check`: `expected` did not hold, `seen` happened instead.
    pub fn new(check: &'static str, expected: impl fmt::Display, seen: impl fmt::Display) -> Self {
        Self {
            check,
            message: format!("expected {expected}; saw {seen}"),
        }
    }
}

impl fmt::Display for CheckFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "conformance check `{}` failed: {}",
            self.check, self.message
        )
    }
}

impl std::error::Error for CheckFailure {}

/// How one check ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CheckStatus {
    /// The transport behaved as required.
    Passed,
    /// Not run: the transport does not declare the capability it tests.
    Skipped {
        /// The [`Capabilities`](super::Capabilities) field that was `false`.
        capability: &'static str,
    },
    /// The transport did not behave as required.
    Failed(CheckFailure),
}

/// One check of a run and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CheckOutcome {
    /// The check's name (its function's name).
    pub check: &'static str,
    /// How it ended.
    pub status: CheckStatus,
}

/// The result of [`transport_conformance`](super::transport_conformance):
/// every check, in the order they ran.
///
/// Its `Display` is a readable summary with one line per check;
/// [`assert_ok`](Self::assert_ok) panics with it when a check failed.
///
/// ```
/// use std::time::Duration;
/// use surety_core::memory::MemoryTransport;
/// use surety_testkit::conformance::{transport_conformance, Capabilities, CheckStatus};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let caps = Capabilities::default().quiet_period(Duration::from_millis(20));
/// let report = transport_conformance(|| async { MemoryTransport::new() }, caps).await;
/// assert!(report.is_ok(), "{report}");
/// // Capabilities that were not declared are skipped, not failed.
/// assert_eq!(
///     report.status("per_key_order"),
///     Some(&CheckStatus::Skipped { capability: "per_key_order" })
/// );
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The suite's name, first on the printed summary line.
    suite: &'static str,
    outcomes: Vec<CheckOutcome>,
}

impl Default for Report {
    fn default() -> Self {
        Self::for_suite("transport conformance")
    }
}

impl Report {
    /// An empty report of the suite named `suite`.
    pub(crate) fn for_suite(suite: &'static str) -> Self {
        Self {
            suite,
            outcomes: Vec::new(),
        }
    }

    pub(crate) fn push(&mut self, check: &'static str, status: CheckStatus) {
        self.outcomes.push(CheckOutcome { check, status });
    }

    /// Records a check that ran: passed, or failed with its failure.
    pub(crate) fn push_result(&mut self, check: &'static str, result: CheckResult) {
        let status = match result {
            Ok(()) => CheckStatus::Passed,
            Err(failure) => CheckStatus::Failed(failure),
        };
        self.push(check, status);
    }

    /// Writes one line per check, in order: `ok`, `skip` with the
    /// capability, or `FAIL` with the failure's message. Every suite's
    /// report prints these lines under a summary of its own.
    pub(crate) fn write_outcomes(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for outcome in &self.outcomes {
            match &outcome.status {
                CheckStatus::Passed => writeln!(f, "  ok    {}", outcome.check)?,
                CheckStatus::Skipped { capability } => writeln!(
                    f,
                    "  skip  {} (capability `{capability}` not declared)",
                    outcome.check
                )?,
                CheckStatus::Failed(failure) => {
                    writeln!(f, "  FAIL  {}: {}", outcome.check, failure.message)?
                }
            }
        }
        Ok(())
    }

    /// Every check, in the order they ran.
    pub fn outcomes(&self) -> &[CheckOutcome] {
        &self.outcomes
    }

    /// How the check named `check` ended, if it is part of the report.
    pub fn status(&self, check: &str) -> Option<&CheckStatus> {
        self.outcomes
            .iter()
            .find(|o| o.check == check)
            .map(|o| &o.status)
    }

    /// The checks that failed.
    pub fn failures(&self) -> Vec<&CheckFailure> {
        self.outcomes
            .iter()
            .filter_map(|o| match &o.status {
                CheckStatus::Failed(failure) => Some(failure),
                _ => None,
            })
            .collect()
    }

    /// The names of the checks that passed.
    pub fn passed(&self) -> Vec<&'static str> {
        self.outcomes
            .iter()
            .filter(|o| o.status == CheckStatus::Passed)
            .map(|o| o.check)
            .collect()
    }

    /// The names of the checks that were skipped.
    pub fn skipped(&self) -> Vec<&'static str> {
        self.outcomes
            .iter()
            .filter(|o| matches!(o.status, CheckStatus::Skipped { .. }))
            .map(|o| o.check)
            .collect()
    }

    /// Whether no check failed.
    pub fn is_ok(&self) -> bool {
        self.failures().is_empty()
    }

    /// Panics with the whole report when a check failed.
    #[track_caller]
    pub fn assert_ok(&self) {
        if !self.is_ok() {
            panic!("{self}");
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{}: {} passed, {} skipped, {} failed",
            self.suite,
            self.passed().len(),
            self.skipped().len(),
            self.failures().len()
        )?;
        self.write_outcomes(f)
    }
}
