//! The side-by-side load harness behind the `kafka_throughput` and
//! `rabbitmq_throughput` benchmarks: an adapter and the raw client it wraps
//! run the same workload against the same broker in one process, in
//! interleaved rounds, and the medians are printed as a ratio.
//!
//! Every round of every row runs three measurements of equal work with
//! equal settings: the raw client, the raw client again (the *control*),
//! and the adapter. The control's ratio to the first raw run is the noise
//! of this machine at that moment; a row whose adapter/raw ratio falls
//! inside the control's spread is printed as "within noise". Beside each
//! rate the harness prints the client's CPU time per message (every thread
//! of this process, measured around the timed window only).
//!
//! These are `harness = false` benchmarks that do not use criterion's
//! sampling (a broker round trip is milliseconds and rounds are seconds), but
//! they follow cargo's and criterion's convention: `cargo bench` passes
//! `--bench` and gets the full run ([`Mode::Full`]); `cargo test --benches`
//! passes nothing and gets a quick smoke run over every path
//! ([`Mode::Test`]). Timings are reported, never asserted.
//!
//! What the two benchmarks share lives here: their `main` ([`run_main`]),
//! the warm-up and the measured rounds ([`measure_rounds`]), the alternating
//! order of raw and adapter runs ([`Settings::in_turn`]), the adapter's slot
//! of a measurement with its control ([`Settings::trial`]), the adapter's publish and
//! consume loops ([`adapter_publish`], [`adapter_consume`]) and the report
//! ([`Settings::report`]). Each benchmark keeps its broker's raw client, its
//! set-up and its clean-up.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::StreamExt;
use surety_core::{Envelope, Publisher, Subscriber};

/// The throughput the adapters must reach, as a fraction of the raw client's.
pub const TARGET: f64 = 0.9;

/// Environment variable overriding the number of messages per measurement.
pub const MESSAGES_VAR: &str = "SURETY_BENCH_MESSAGES";
/// Environment variable overriding the number of measured rounds.
pub const ROUNDS_VAR: &str = "SURETY_BENCH_ROUNDS";
/// Environment variable restricting a run to one path: `publish` or
/// `consume` (e.g. to profile it).
pub const ONLY_VAR: &str = "SURETY_BENCH_ONLY";

/// Environment variable with a `tracing` filter (e.g. `warn` or
/// `surety_kafka=debug`); when set, the adapters' logs go to stderr. Unset,
/// no subscriber is installed, so logging costs nothing in the measurement.
pub const LOG_VAR: &str = "SURETY_BENCH_LOG";

/// Installs a `tracing` subscriber printing to stderr when [`LOG_VAR`] is set.
pub fn init_logging() {
    if let Ok(filter) = std::env::var(LOG_VAR) {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .try_init();
    }
}

/// Full benchmark or smoke test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `cargo bench`: full size, several rounds.
    Full,
    /// `cargo test --benches`: tiny size, one round, every path once.
    Test,
}

impl Mode {
    /// `Full` when the process was started with `--bench` (as `cargo bench`
    /// does), `Test` otherwise (as `cargo test --benches` does).
    pub fn from_args() -> Self {
        if std::env::args().skip(1).any(|arg| arg == "--bench") {
            Self::Full
        } else {
            Self::Test
        }
    }
}

/// The workload of one benchmark run.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Full run or smoke test.
    pub mode: Mode,
    /// Messages per publish measurement.
    pub publish_messages: usize,
    /// Messages per consume measurement.
    pub consume_messages: usize,
    /// Measured rounds; each round measures raw and adapter once per path.
    pub rounds: usize,
    /// Messages per path in the unreported warm-up round (0: none).
    pub warmup: usize,
    /// Payload bytes per message.
    pub payload: usize,
    /// Distinct partition keys.
    pub keys: usize,
    /// Run only this path ([`ONLY_VAR`]); `None` runs every path.
    pub only: Option<String>,
}

impl Settings {
    /// The settings for `mode`: for a full run `publish` and `consume`
    /// messages per measurement, `rounds` rounds and a warm-up of 1 000; for
    /// a smoke test 200 messages, 1 round and no warm-up. [`MESSAGES_VAR`]
    /// (both sizes) and [`ROUNDS_VAR`] override.
    pub fn from_env(mode: Mode, publish: usize, consume: usize, rounds: usize) -> Self {
        let (publish, consume, rounds, warmup) = match mode {
            Mode::Full => (publish, consume, rounds, 1_000),
            Mode::Test => (200, 200, 1, 0),
        };
        let var = |name: &str| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .filter(|v| *v > 0)
        };
        let messages = var(MESSAGES_VAR);
        Self {
            mode,
            publish_messages: messages.unwrap_or(publish).max(2),
            consume_messages: messages.unwrap_or(consume).max(2),
            rounds: var(ROUNDS_VAR).unwrap_or(rounds),
            warmup,
            payload: 256,
            keys: 16,
            only: std::env::var(ONLY_VAR)
                .ok()
                .filter(|v| !v.trim().is_empty()),
        }
    }

    /// Whether `path` (`publish` or `consume`) is to be measured.
    pub fn runs(&self, path: &str) -> bool {
        self.only.as_deref().is_none_or(|only| only.trim() == path)
    }

    /// A pause between measurements (0.5 s in a full run, none in a smoke
    /// test), for background work (commits, group leaves, queue deletion,
    /// the broker's own) to settle.
    pub async fn pause(&self) {
        if self.mode == Mode::Full {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Runs the `raw` and the `adapter` measurement one after the other,
    /// with a [pause](Self::pause) between: raw first when `raw_first` (odd
    /// rounds), the adapter first otherwise (even rounds).
    pub async fn in_turn<R, A>(
        &self,
        raw_first: bool,
        raw: impl Future<Output = R>,
        adapter: impl Future<Output = A>,
    ) -> (R, A) {
        if raw_first {
            let raw = raw.await;
            self.pause().await;
            (raw, adapter.await)
        } else {
            let adapter = adapter.await;
            self.pause().await;
            (raw.await, adapter)
        }
    }

    /// One [`Trial`]: the `raw` client, the raw client again (`control`)
    /// and the `adapter`, each a future made by its closure and failing the
    /// run when it takes longer than `limit`. Odd rounds (`raw_first`) run
    /// raw, control, adapter; even rounds adapter, control, raw, so that
    /// the control sits between the two it is compared with.
    pub async fn trial<R, C, A>(
        &self,
        raw_first: bool,
        limit: Duration,
        path: &str,
        raw: impl FnOnce() -> R,
        control: impl FnOnce() -> C,
        adapter: impl FnOnce() -> A,
    ) -> Trial
    where
        R: Future<Output = Sample>,
        C: Future<Output = Sample>,
        A: Future<Output = Sample>,
    {
        let raw = async { within(limit, &format!("raw {path}"), raw()).await };
        let control = async { within(limit, &format!("control {path}"), control()).await };
        let adapter = async { within(limit, &format!("adapter {path}"), adapter()).await };
        let rest = self.in_turn(raw_first, control, adapter);
        let (raw, (control, adapter)) = self.in_turn(raw_first, raw, rest).await;
        Trial {
            raw,
            control: Some(control),
            adapter,
        }
    }

    /// The report of a run: `title`; a settings line with the sizes, the
    /// payload and `workload`, then `lines`, then the rounds; and `rows`.
    pub fn report(
        &self,
        title: String,
        workload: &str,
        lines: impl IntoIterator<Item = String>,
        rows: Vec<Comparison>,
    ) -> Report {
        let mut settings = vec![format!(
            "publish {} / consume {} messages per measurement, {} B payload, {workload}",
            self.publish_messages, self.consume_messages, self.payload
        )];
        settings.extend(lines);
        settings.push(format!(
            "{} rounds, median; per round raw, control (raw again), adapter, the order \
             reversed every other round",
            self.rounds
        ));
        Report {
            title,
            settings,
            rows,
            mode: self.mode,
        }
    }
}

/// The `main` of a broker benchmark: installs logging ([`init_logging`]),
/// reads the [`Mode`], finds the broker's address with `service` (which
/// returns `None` to skip the run), reads the [`Settings`] (full run:
/// `publish` and `consume` messages, `rounds` rounds), runs `run` on a
/// two-worker tokio runtime and prints its report.
pub fn run_main<F>(
    service: impl FnOnce() -> Option<String>,
    publish: usize,
    consume: usize,
    rounds: usize,
    run: impl FnOnce(String, Settings) -> F,
) where
    F: Future<Output = Report> + Send + 'static,
{
    init_logging();
    let mode = Mode::from_args();
    let Some(address) = service() else {
        return;
    };
    let settings = Settings::from_env(mode, publish, consume, rounds);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    // On a worker thread, like a service's own tasks (block_on would run it
    // on the main thread, outside the worker pool).
    let report = runtime
        .block_on(runtime.spawn(run(address, settings)))
        .expect("the benchmark task");
    println!("{report}");
}

/// The warm-up round (when [`Settings::warmup`] is set, not reported) and
/// the measured rounds `1..=rounds` of a broker benchmark, on the paths
/// [`Settings::runs`] allows: per round, `publish_round(round, messages)`
/// then `consume_round(round, messages)`. `publish_round` returns one
/// [`Trial`] per row of `publish_rows`, in order; the consume trial goes to
/// the `consume` row. Returns the publish rows, then `consume`.
pub async fn measure_rounds<const N: usize, P, C>(
    settings: &Settings,
    mut publish_rows: [Comparison; N],
    publish_round: impl Fn(usize, usize) -> P,
    consume_round: impl Fn(usize, usize) -> C,
) -> Vec<Comparison>
where
    P: Future<Output = [Trial; N]>,
    C: Future<Output = Trial>,
{
    let mut consume = Comparison::new("consume");
    if settings.warmup > 0 {
        println!(
            "warm-up ({} messages per path, not reported)",
            settings.warmup
        );
        if settings.runs("publish") {
            publish_round(0, settings.warmup).await;
        }
        if settings.runs("consume") {
            consume_round(0, settings.warmup).await;
        }
    }
    for round in 1..=settings.rounds {
        if settings.runs("publish") {
            let trials = publish_round(round, settings.publish_messages).await;
            for (row, trial) in publish_rows.iter_mut().zip(trials) {
                row.record(round, trial);
            }
        }
        if !settings.runs("consume") {
            continue;
        }
        let trial = consume_round(round, settings.consume_messages).await;
        consume.record(round, trial);
    }
    publish_rows.into_iter().chain([consume]).collect()
}

/// `n` envelopes with a `payload`-byte body and `keys` partition keys
/// (`k-0` ...), distinct ids, no extra headers.
pub fn envelopes(n: usize, payload: usize, keys: usize) -> Vec<Envelope> {
    let body = Bytes::from(
        (0..payload)
            .map(|i| b'a' + (i % 26) as u8)
            .collect::<Vec<u8>>(),
    );
    (0..n)
        .map(|i| {
            let mut builder = Envelope::builder("/surety-bench", "bench.message")
                .content_type("application/octet-stream")
                .payload(body.clone());
            if keys > 0 {
                builder = builder.partition_key(format!("k-{}", i % keys));
            }
            builder.build()
        })
        .collect()
}

/// A suffix that makes topic, queue and group names unique to this process
/// and moment.
pub fn unique_suffix() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{}-{nanos:x}", std::process::id())
}

/// A window of confirmations in flight: [`push`](Self::push) adds one and,
/// once more than `max` are pending, awaits the oldest.
#[derive(Debug)]
pub struct Window<F> {
    max: usize,
    pending: VecDeque<F>,
}

impl<F: Future> Window<F> {
    /// A window of at most `max` (at least 1) pending futures.
    pub fn new(max: usize) -> Self {
        Self {
            max: max.max(1),
            pending: VecDeque::new(),
        }
    }

    /// Adds `confirmation`; returns the output of the oldest one when the
    /// window was full.
    pub async fn push(&mut self, confirmation: F) -> Option<F::Output> {
        self.pending.push_back(confirmation);
        if self.pending.len() > self.max {
            self.next().await
        } else {
            None
        }
    }

    /// Awaits the oldest pending future; `None` when none is left.
    pub async fn next(&mut self) -> Option<F::Output> {
        match self.pending.pop_front() {
            Some(oldest) => Some(oldest.await),
            None => None,
        }
    }
}

/// Runs `fut`, panicking with `what` if it takes longer than `limit`: a
/// stuck benchmark is a failure, not a hang.
pub async fn within<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(value) => value,
        Err(_) => panic!("{what} did not finish within {limit:?}"),
    }
}

/// Sends `batch` through `adapter` with up to `window` confirmations in
/// flight and awaits them.
pub async fn adapter_publish(
    adapter: &impl Publisher,
    topic: &str,
    batch: Vec<Envelope>,
    window: usize,
) -> Sample {
    let n = batch.len();
    let mut in_flight = Window::new(window);
    let clock = Clock::start();
    for envelope in batch {
        let confirmation = adapter
            .send(topic, envelope)
            .await
            .expect("the adapter sends");
        if let Some(done) = in_flight.push(confirmation).await {
            done.expect("the adapter's publish is confirmed");
        }
    }
    while let Some(done) = in_flight.next().await {
        done.expect("the adapter's publish is confirmed");
    }
    clock.stop(n)
}

/// Consumes `n` messages of `topic` through `adapter` as `group`, acking
/// each. Clock: first message received to the last one acked.
pub async fn adapter_consume(
    adapter: &impl Subscriber,
    topic: &str,
    group: &str,
    n: usize,
) -> Sample {
    let mut stream = adapter
        .subscribe(topic, group)
        .await
        .expect("the adapter subscribes");
    let mut bytes = 0usize;
    let mut clock = Clock::start();
    for received in 0..n {
        let delivery = stalled(stream.next(), "adapter", received, n)
            .await
            .expect("the subscription stays open")
            .expect("an adapter delivery");
        bytes += delivery.envelope().payload.len();
        delivery.ack().await.expect("the adapter acks");
        if received == 0 {
            clock = Clock::start();
        }
    }
    let sample = clock.stop(n - 1);
    drop(stream);
    assert!(bytes > 0);
    sample
}

/// How long a consumer may wait for its next message before the run fails.
pub const STALL_LIMIT: Duration = Duration::from_secs(60);

/// Awaits `next` (a consumer's next message), panicking with how far
/// `who` got when nothing arrives within [`STALL_LIMIT`].
pub async fn stalled<T>(next: impl Future<Output = T>, who: &str, received: usize, n: usize) -> T {
    match tokio::time::timeout(STALL_LIMIT, next).await {
        Ok(value) => value,
        Err(_) => panic!(
            "{who} consumer stalled: nothing for {STALL_LIMIT:?} after {received} of {n} messages"
        ),
    }
}

pub use surety_testkit::cpu::process_cpu;

/// Starts a measurement: wall clock and process CPU time.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    wall: Instant,
    cpu: Option<Duration>,
}

impl Clock {
    /// Starts now.
    pub fn start() -> Self {
        Self {
            wall: Instant::now(),
            cpu: process_cpu(),
        }
    }

    /// Ends the measurement of `messages`.
    pub fn stop(&self, messages: usize) -> Sample {
        let elapsed = self.wall.elapsed();
        let cpu = match (self.cpu, process_cpu()) {
            (Some(start), Some(end)) => Some(end.saturating_sub(start)),
            _ => None,
        };
        Sample {
            messages,
            elapsed,
            cpu,
        }
    }
}

/// One timed measurement: `messages` in `elapsed`, using `cpu` of this
/// process's CPU time.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Messages counted.
    pub messages: usize,
    /// Time taken.
    pub elapsed: Duration,
    /// CPU time the benchmark process used meanwhile (the client's cost).
    pub cpu: Option<Duration>,
}

impl Sample {
    /// Messages per second.
    pub fn rate(&self) -> f64 {
        self.messages as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Client CPU microseconds per message, if known.
    pub fn cpu_per_message(&self) -> Option<f64> {
        self.cpu
            .map(|cpu| cpu.as_secs_f64() * 1e6 / self.messages.max(1) as f64)
    }
}

/// One round of one row: equal work by the raw client, by the raw client
/// again (the control: how far two identical runs differ right now) and by
/// the adapter.
#[derive(Debug, Clone, Copy)]
pub struct Trial {
    /// The raw client.
    pub raw: Sample,
    /// The raw client again, `None` for a row without a control.
    pub control: Option<Sample>,
    /// The adapter (or the library's pipeline).
    pub adapter: Sample,
}

/// The smallest and largest of `values` (infinities when empty).
pub fn range(values: &[f64]) -> (f64, f64) {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (min, max)
}

/// The median of `values` (0 when empty).
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// Raw client against adapter on one path (publish or consume).
#[derive(Debug, Clone)]
pub struct Comparison {
    /// The path, e.g. `publish`.
    pub path: String,
    /// Raw client rates, one per round (msg/s).
    pub raw: Vec<f64>,
    /// Adapter rates, one per round (msg/s).
    pub adapter: Vec<f64>,
    /// Raw client CPU per message, one per round (µs).
    pub raw_cpu: Vec<f64>,
    /// Adapter CPU per message, one per round (µs).
    pub adapter_cpu: Vec<f64>,
    /// Control CPU per message, one per round (µs).
    pub control_cpu: Vec<f64>,
    /// Adapter rate over raw rate, one per round.
    pub ratios: Vec<f64>,
    /// Control rate over raw rate, one per round: the noise.
    pub control: Vec<f64>,
    /// Adapter CPU per message over raw CPU per message, one per round.
    pub cpu_ratios: Vec<f64>,
    /// Control CPU per message over raw CPU per message, one per round.
    pub control_cpu_ratios: Vec<f64>,
    /// A reference row: printed, not held to [`TARGET`].
    pub reference: bool,
}

impl Comparison {
    /// An empty comparison for `path`.
    pub fn new(path: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            raw: Vec::new(),
            adapter: Vec::new(),
            raw_cpu: Vec::new(),
            adapter_cpu: Vec::new(),
            control_cpu: Vec::new(),
            ratios: Vec::new(),
            control: Vec::new(),
            cpu_ratios: Vec::new(),
            control_cpu_ratios: Vec::new(),
            reference: false,
        }
    }

    /// A comparison printed for reference, without a verdict.
    pub fn reference(path: impl Into<String>) -> Self {
        Self {
            reference: true,
            ..Self::new(path)
        }
    }

    /// Records one round and prints it.
    pub fn record(&mut self, round: usize, trial: Trial) {
        let Trial {
            raw,
            control,
            adapter,
        } = trial;
        let cpu = |sample: &Sample| {
            sample
                .cpu_per_message()
                .map_or_else(|| "?".to_owned(), |us| format!("{us:.2}"))
        };
        let ratio = |sample: &Sample| sample.rate() / raw.rate().max(1e-9);
        let control_text = control.map_or_else(String::new, |control| {
            format!(
                "  control {:>9.0} msg/s ({:>6} µs CPU/msg, ratio {:.2})",
                control.rate(),
                cpu(&control),
                ratio(&control)
            )
        });
        println!(
            "  round {round}: {:<30} raw {:>9.0} msg/s ({:>6} µs CPU/msg)  adapter {:>9.0} msg/s \
             ({:>6} µs CPU/msg)  ratio {:.2}{control_text}",
            self.path,
            raw.rate(),
            cpu(&raw),
            adapter.rate(),
            cpu(&adapter),
            ratio(&adapter),
        );
        self.raw.push(raw.rate());
        self.adapter.push(adapter.rate());
        self.ratios.push(ratio(&adapter));
        let raw_cpu = raw.cpu_per_message();
        self.raw_cpu.extend(raw_cpu);
        self.adapter_cpu.extend(adapter.cpu_per_message());
        if let (Some(base), Some(ours)) = (raw_cpu, adapter.cpu_per_message()) {
            self.cpu_ratios.push(ours / base.max(1e-9));
        }
        if let Some(control) = control {
            self.control.push(ratio(&control));
            self.control_cpu.extend(control.cpu_per_message());
            if let (Some(base), Some(again)) = (raw_cpu, control.cpu_per_message()) {
                self.control_cpu_ratios.push(again / base.max(1e-9));
            }
        }
    }

    /// The median of the per-round ratios (each round pairs a raw and an
    /// adapter run taken back to back, so slow drifts of the machine cancel).
    pub fn ratio(&self) -> f64 {
        median(&self.ratios)
    }

    /// The smallest and largest per-round ratio.
    pub fn ratio_range(&self) -> (f64, f64) {
        range(&self.ratios)
    }

    /// The noise band: the smallest and largest control/raw ratio of the
    /// rounds, widened to include 1.0; `None` without a control.
    pub fn noise(&self) -> Option<(f64, f64)> {
        if self.control.is_empty() {
            return None;
        }
        let (low, high) = range(&self.control);
        Some((low.min(1.0), high.max(1.0)))
    }

    /// Whether the median adapter/raw ratio lies inside the [noise
    /// band](Self::noise): the run cannot tell the two apart.
    pub fn within_noise(&self) -> bool {
        self.noise()
            .is_some_and(|(low, high)| (low..=high).contains(&self.ratio()))
    }

    /// `ref` for a [reference](Self::reference) row; otherwise `PASS` when
    /// the ratio reaches [`TARGET`], `BELOW` when not, with "(within noise)"
    /// added when the ratio is inside the control's spread.
    pub fn verdict(&self) -> String {
        if self.reference {
            return "ref".to_owned();
        }
        let verdict = if self.ratio() >= TARGET {
            "PASS"
        } else {
            "BELOW"
        };
        if self.within_noise() {
            format!("{verdict} (within noise)")
        } else {
            verdict.to_owned()
        }
    }
}

/// The results of one broker's run, printed as a table by `Display`.
#[derive(Debug, Clone)]
pub struct Report {
    /// What was measured, e.g. `Kafka (surety-kafka vs rdkafka)`.
    pub title: String,
    /// The settings, one line each.
    pub settings: Vec<String>,
    /// One row per path.
    pub rows: Vec<Comparison>,
    /// Whether this was a smoke test (timings meaningless).
    pub mode: Mode,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f)?;
        writeln!(f, "== {} ==", self.title)?;
        for line in &self.settings {
            writeln!(f, "   {line}")?;
        }
        if self.mode == Mode::Test {
            writeln!(
                f,
                "   smoke test (cargo test --benches): the numbers are not a measurement"
            )?;
        }
        let width = self
            .rows
            .iter()
            .map(|row| row.path.len())
            .chain([4])
            .max()
            .unwrap_or(4);
        writeln!(
            f,
            "| {:<width$} | {:>10} | {:>13} | {:>11} | {:>11} | {:>13} | {:>20} | {:>11} | {:>15} | {:>11} | {:>13} |",
            "path",
            "raw msg/s",
            "adapter msg/s",
            "adapter/raw",
            "range",
            "control/raw",
            "verdict (≥ 0.90)",
            "raw CPU/msg",
            "adapter CPU/msg",
            "CPU ratio",
            "control CPU"
        )?;
        writeln!(
            f,
            "|{:-<w$}|{:->12}|{:->15}|{:->13}|{:->13}|{:->15}|{:->22}|{:->13}|{:->17}|{:->13}|{:->15}|",
            "",
            "",
            "",
            "",
            "",
            "",
            "",
            "",
            "",
            "",
            "",
            w = width + 2
        )?;
        let cpu = |values: &[f64]| {
            if values.is_empty() {
                "?".to_owned()
            } else {
                format!("{:.2} µs", median(values))
            }
        };
        let spread = |values: &[f64]| {
            if values.is_empty() {
                "—".to_owned()
            } else {
                let (low, high) = range(values);
                format!("{low:.2}–{high:.2}")
            }
        };
        let ratio = |values: &[f64]| {
            if values.is_empty() {
                "?".to_owned()
            } else {
                format!("{:.2}", median(values))
            }
        };
        for row in self.rows.iter().filter(|row| !row.raw.is_empty()) {
            writeln!(
                f,
                "| {:<width$} | {:>10.0} | {:>13.0} | {:>11.2} | {:>11} | {:>13} | {:>20} | {:>11} | {:>15} | {:>11} | {:>13} |",
                row.path,
                median(&row.raw),
                median(&row.adapter),
                row.ratio(),
                spread(&row.ratios),
                spread(&row.control),
                row.verdict(),
                cpu(&row.raw_cpu),
                cpu(&row.adapter_cpu),
                ratio(&row.cpu_ratios),
                spread(&row.control_cpu_ratios)
            )?;
        }
        writeln!(
            f,
            "   msg/s and CPU/msg: medians over the rounds; adapter/raw: median of the per-round \
             ratios (range: lowest–highest); control/raw: the raw client run again in the same \
             round, its lowest–highest ratio is the noise (\"within noise\": adapter/raw inside \
             it, widened to 1.00); CPU: this process's (the client's) CPU time per message, all \
             threads, over the timed window; CPU ratio: median of adapter/raw per round; control \
             CPU: the control's per-round CPU ratios"
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }

    #[test]
    fn envelopes_carry_keys_and_payload() {
        let envs = envelopes(20, 256, 16);
        assert_eq!(envs[0].payload.len(), 256);
        assert_eq!(envs[17].partition_key.as_deref(), Some("k-1"));
        assert_ne!(envs[0].id, envs[1].id);
    }

    fn settings(warmup: usize, rounds: usize) -> Settings {
        Settings {
            mode: Mode::Test,
            publish_messages: 3,
            consume_messages: 2,
            rounds,
            warmup,
            payload: 8,
            keys: 2,
            only: None,
        }
    }

    fn sample(messages: usize) -> Sample {
        Sample {
            messages,
            elapsed: Duration::from_secs(1),
            cpu: None,
        }
    }

    fn trial(raw: usize, adapter: usize) -> Trial {
        Trial {
            raw: sample(raw),
            control: Some(sample(raw)),
            adapter: sample(adapter),
        }
    }

    #[test]
    fn a_ratio_inside_the_controls_spread_is_within_noise() {
        let mut row = Comparison::new("publish");
        for (control, adapter) in [(90, 95), (110, 97), (100, 93)] {
            row.record(
                1,
                Trial {
                    raw: sample(100),
                    control: Some(sample(control)),
                    adapter: sample(adapter),
                },
            );
        }
        assert_eq!(row.noise(), Some((0.9, 1.1)));
        assert!(row.within_noise());
        assert_eq!(row.verdict(), "PASS (within noise)");

        let mut slow = Comparison::new("consume");
        for adapter in [50, 60, 55] {
            slow.record(
                1,
                Trial {
                    raw: sample(100),
                    control: Some(sample(98)),
                    adapter: sample(adapter),
                },
            );
        }
        assert!(!slow.within_noise());
        assert_eq!(slow.verdict(), "BELOW");
    }

    #[tokio::test]
    async fn in_turn_starts_raw_in_odd_rounds_and_ends_raw_in_even_ones() {
        let settings = settings(0, 1);
        for (raw_first, expected) in [
            (true, ["raw", "encoded", "adapter"]),
            (false, ["adapter", "encoded", "raw"]),
        ] {
            let order = std::sync::Mutex::new(Vec::new());
            let step = |name: &'static str| {
                let order = &order;
                async move {
                    order.lock().unwrap().push(name);
                    name
                }
            };
            let rest = settings.in_turn(raw_first, step("encoded"), step("adapter"));
            let (raw, (encoded, adapter)) = settings.in_turn(raw_first, step("raw"), rest).await;
            assert_eq!((raw, encoded, adapter), ("raw", "encoded", "adapter"));
            assert_eq!(order.into_inner().unwrap(), expected);
        }
    }

    #[tokio::test]
    async fn measure_rounds_warms_up_then_fills_the_rows_in_order() {
        let settings = settings(5, 2);
        let calls = std::sync::Mutex::new(Vec::new());
        let rows = measure_rounds(
            &settings,
            [Comparison::new("publish"), Comparison::reference("ref")],
            |round, n| {
                calls.lock().unwrap().push(("publish", round, n));
                async move { [trial(n, 2 * n), trial(n, n)] }
            },
            |round, n| {
                calls.lock().unwrap().push(("consume", round, n));
                async move { trial(n, n) }
            },
        )
        .await;
        assert_eq!(
            calls.into_inner().unwrap(),
            [
                ("publish", 0, 5),
                ("consume", 0, 5),
                ("publish", 1, 3),
                ("consume", 1, 2),
                ("publish", 2, 3),
                ("consume", 2, 2),
            ]
        );
        let paths: Vec<&str> = rows.iter().map(|row| row.path.as_str()).collect();
        assert_eq!(paths, ["publish", "ref", "consume"]);
        assert_eq!(rows[0].ratios, [2.0, 2.0]);
        assert_eq!(rows[1].ratios, [1.0, 1.0]);
        assert!(rows[1].reference);
        assert_eq!(rows[2].raw, [2.0, 2.0]);
    }

    #[tokio::test]
    async fn window_awaits_the_oldest_when_full() {
        let mut window = Window::new(2);
        assert_eq!(window.push(std::future::ready(1)).await, None);
        assert_eq!(window.push(std::future::ready(2)).await, None);
        assert_eq!(window.push(std::future::ready(3)).await, Some(1));
        assert_eq!(window.next().await, Some(2));
        assert_eq!(window.next().await, Some(3));
        assert_eq!(window.next().await, None);
    }
}
