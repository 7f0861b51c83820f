//! Child processes for crash tests: the test binary runs again as a child
//! that executes one named test, selected by an environment variable the
//! parent sets, and the parent kills it with SIGKILL.
//!
//! The child role is an ordinary `#[test]` that returns at once unless its
//! variable is set, so a normal test run passes over it. The parent starts
//! it with [`TestProcess`], kills it with [`Child::kill`] (SIGKILL on Unix:
//! no destructor, no flush, no goodbye to the broker) and waits for it
//! with a deadline.
//!
//! ```no_run
//! use std::time::Duration;
//! use surety_testkit::process::{TestProcess, role};
//!
//! const ROLE: &str = "MYCRATE_CRASH_DB";
//!
//! // The child, in the test binary: `#[test] fn child_worker()` doing
//! // nothing unless the parent started it.
//! fn child_worker() {
//!     let Some(path) = role(ROLE) else { return };
//!     // ... work on `path` until killed
//! #   let _ = path;
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> std::io::Result<()> {
//! # child_worker();
//! // The parent:
//! let mut child = TestProcess::new("child_worker").env(ROLE, "/tmp/db").spawn()?;
//! // ... once it is mid-work:
//! child.kill().await?;
//! // A last child left to finish on its own:
//! let mut last = TestProcess::new("child_worker").env(ROLE, "/tmp/db").spawn()?;
//! assert!(last.wait_for(Duration::from_secs(60)).await?.success());
//! # Ok(()) }
//! ```

use std::ffi::OsString;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The value of the child-role variable `name`, when this process is a
/// child started for that role (`None` in a normal test run).
pub fn role(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|value| !value.is_empty())
}

/// How to start the current test binary as a child running one test.
#[derive(Debug, Clone)]
pub struct TestProcess {
    test: String,
    envs: Vec<(OsString, OsString)>,
    output: bool,
    capture: bool,
}

impl TestProcess {
    /// The child runs the test named `test` only (`--exact`), on one test
    /// thread.
    pub fn new(test: impl Into<String>) -> Self {
        Self {
            test: test.into(),
            envs: Vec::new(),
            output: false,
            capture: false,
        }
    }

    /// Sets `key` to `value` in the child's environment (the rest is
    /// inherited).
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.envs.push((key.into(), value.into()));
        self
    }

    /// Passes the child's stdout and stderr through to the parent's (with
    /// `--nocapture`) instead of discarding them; for debugging a child.
    pub fn show_output(mut self, show: bool) -> Self {
        self.output = show;
        self
    }

    /// Keeps the child's stdout lines (with `--nocapture`) for the parent to
    /// read with [`Child::lines_containing`]: a condition to wait on that
    /// only the child's own log shows (a rebalance it went through, say).
    /// Takes precedence over [`show_output`](Self::show_output) for stdout.
    pub fn capture_output(mut self, capture: bool) -> Self {
        self.capture = capture;
        self
    }

    /// Starts the child. It is killed when the returned [`Child`] is
    /// dropped.
    ///
    /// # Errors
    ///
    /// When the current executable cannot be found or started.
    pub fn spawn(&self) -> std::io::Result<Child> {
        let exe = std::env::current_exe()?;
        let mut command = tokio::process::Command::new(exe);
        command
            .args([self.test.as_str(), "--exact", "--test-threads", "1"])
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .kill_on_drop(true);
        if self.output || self.capture {
            command.arg("--nocapture");
        }
        let stderr = if self.output {
            Stdio::inherit()
        } else {
            Stdio::null()
        };
        let stdout = if self.capture {
            Stdio::piped()
        } else if self.output {
            Stdio::inherit()
        } else {
            Stdio::null()
        };
        command.stdout(stdout).stderr(stderr);
        let mut child = command.spawn()?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        if let Some(stdout) = child.stdout.take() {
            let lines = Arc::clone(&lines);
            let echo = self.output;
            tokio::spawn(async move {
                use tokio::io::AsyncBufReadExt as _;
                let mut reader = tokio::io::BufReader::new(stdout).lines();
                while let Ok(Some(line)) = reader.next_line().await {
                    if echo {
                        println!("{line}");
                    }
                    lines
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push(line);
                }
            });
        }
        Ok(Child {
            test: self.test.clone(),
            child,
            lines,
        })
    }
}

/// A running child test process.
#[derive(Debug)]
pub struct Child {
    test: String,
    child: tokio::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Child {
    /// The operating-system process id, while it runs.
    pub fn id(&self) -> Option<u32> {
        self.child.id()
    }

    /// How many of the stdout lines kept so far contain `needle` (none
    /// unless started with [`TestProcess::capture_output`]).
    pub fn lines_containing(&self, needle: &str) -> usize {
        self.lines
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .filter(|line| line.contains(needle))
            .count()
    }

    /// Whether the child has exited (reaps it when it has).
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Kills the child (SIGKILL on Unix) and waits until it is gone.
    ///
    /// # Errors
    ///
    /// When the signal cannot be sent or the wait fails.
    pub async fn kill(&mut self) -> std::io::Result<ExitStatus> {
        self.child.start_kill()?;
        self.child.wait().await
    }

    /// Waits up to `deadline` for the child to exit on its own.
    ///
    /// # Errors
    ///
    /// [`std::io::ErrorKind::TimedOut`] (the child is killed then) when it
    /// is still running at the deadline, or when the wait fails.
    pub async fn wait_for(&mut self, deadline: Duration) -> std::io::Result<ExitStatus> {
        match tokio::time::timeout(deadline, self.child.wait()).await {
            Ok(status) => status,
            Err(_) => {
                let _ = self.kill().await;
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("the child {} still ran after {deadline:?}", self.test),
                ))
            }
        }
    }
}

/// A small seeded generator (xorshift64*) for picking kill times: enough
/// randomness to vary where a child dies, and a seed to print so a failing
/// run can be repeated.
///
/// ```
/// use surety_testkit::process::Seeded;
///
/// let mut a = Seeded::new(42);
/// let mut b = Seeded::new(42);
/// assert_eq!(a.next_u64(), b.next_u64());
/// assert!(a.below(10) < 10);
/// ```
#[derive(Debug, Clone)]
pub struct Seeded {
    seed: u64,
    state: u64,
}

impl Seeded {
    /// A generator started from `seed` (made odd, so never zero).
    pub fn new(seed: u64) -> Self {
        let seed = seed | 1;
        Self { seed, state: seed }
    }

    /// A generator seeded from the variable `name` when it holds a number
    /// (to repeat a run), else from the clock. Print [`seed`](Self::seed)
    /// so a failing run can be repeated with `name=<seed>`.
    pub fn from_env(name: &str) -> Self {
        let seed = std::env::var(name)
            .ok()
            .and_then(|seed| seed.trim().parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            });
        Self::new(seed)
    }

    /// The seed this generator started from.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// The next number below `bound` (0 when `bound` is 0).
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next_u64().checked_rem(bound).unwrap_or(0)
    }
}
