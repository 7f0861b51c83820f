//! The side-by-side load harness behind the `kafka_throughput` and
//! `rabbitmq_throughput` benchmarks: an adapter and the raw client it wraps
//! run the same workload against the same broker in one process, in
//! interleaved rounds, and the medians are printed as a ratio.
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
//! of a measurement ([`Settings::adapter_slot`]), the adapter's publish and
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
/// Environment variable that, set to `1`, turns a run into a control (A/A)
/// run: the adapter's slot runs the raw client again, which shows how far
/// two identical clients differ on this machine (the noise floor).
pub const CONTROL_VAR: &str = "SURETY_BENCH_CONTROL";
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
    /// A control run ([`CONTROL_VAR`]): raw against raw.
    pub control: bool,
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
            control: std::env::var(CONTROL_VAR).is_ok_and(|v| v.trim() == "1"),
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

    /// The adapter's slot of a `path` (`publish` or `consume`) measurement:
    /// the future `adapter` makes, or in a [control](Self::control) run the
    /// one `control` makes (the raw client again). Either is started here and
    /// fails the run (as `adapter {path}` or `control {path}`) when it takes
    /// longer than `limit`.
    pub async fn adapter_slot<C, A>(
        &self,
        limit: Duration,
        path: &str,
        control: impl FnOnce() -> C,
        adapter: impl FnOnce() -> A,
    ) -> Sample
    where
        C: Future<Output = Sample>,
        A: Future<Output = Sample>,
    {
        if self.control {
            let control = control();
            return within(limit, &format!("control {path}"), control).await;
        }
        within(limit, &format!("adapter {path}"), adapter()).await
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
            "{} rounds, median; raw and adapter alternate which goes first",
            self.rounds
        ));
        Report {
            title,
            settings,
            rows,
            mode: self.mode,
            control: self.control,
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
/// (raw, adapter) pair per row of `publish_rows`, in order; the consume pair
/// goes to the `consume` row. Returns the publish rows, then `consume`.
pub async fn measure_rounds<const N: usize, P, C>(
    settings: &Settings,
    mut publish_rows: [Comparison; N],
    publish_round: impl Fn(usize, usize) -> P,
    consume_round: impl Fn(usize, usize) -> C,
) -> Vec<Comparison>
where
    P: Future<Output = [(Sample, Sample); N]>,
    C: Future<Output = (Sample, Sample)>,
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
            let pairs = publish_round(round, settings.publish_messages).await;
            for (row, (raw, adapter)) in publish_rows.iter_mut().zip(pairs) {
                row.record(round, raw, adapter);
            }
        }
        if !settings.runs("consume") {
            continue;
        }
        let (raw, adapter) = consume_round(round, settings.consume_messages).await;
        consume.record(round, raw, adapter);
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

/// CPU time (user + system) this process has used so far, from
/// `/proc/self/stat` (in 10 ms ticks); `None` where that is not readable.
/// It counts every thread, including librdkafka's and lapin's, and nothing of
/// the broker, which runs in its own process.
pub fn process_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name may contain spaces; the fields after it do not.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // utime and stime are fields 14 and 15, i.e. 12 and 13 after the name
    // and state; /proc reports them in USER_HZ, which is 100 on Linux.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 10))
}

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
    /// Adapter rate over raw rate, one per round.
    pub ratios: Vec<f64>,
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
            ratios: Vec::new(),
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
    pub fn record(&mut self, round: usize, raw: Sample, adapter: Sample) {
        let cpu = |sample: &Sample| {
            sample
                .cpu_per_message()
                .map_or_else(|| "?".to_owned(), |us| format!("{us:.1}"))
        };
        println!(
            "  round {round}: {:<30} raw {:>9.0} msg/s ({:>5} µs CPU/msg)  adapter {:>9.0} msg/s \
             ({:>5} µs CPU/msg)  ratio {:.2}",
            self.path,
            raw.rate(),
            cpu(&raw),
            adapter.rate(),
            cpu(&adapter),
            adapter.rate() / raw.rate().max(1e-9)
        );
        self.raw.push(raw.rate());
        self.adapter.push(adapter.rate());
        self.ratios.push(adapter.rate() / raw.rate().max(1e-9));
        self.raw_cpu.extend(raw.cpu_per_message());
        self.adapter_cpu.extend(adapter.cpu_per_message());
    }

    /// The median of the per-round ratios (each round pairs a raw and an
    /// adapter run taken back to back, so slow drifts of the machine cancel).
    pub fn ratio(&self) -> f64 {
        median(&self.ratios)
    }

    /// The smallest and largest per-round ratio.
    pub fn ratio_range(&self) -> (f64, f64) {
        let min = self.ratios.iter().copied().fold(f64::INFINITY, f64::min);
        let max = self
            .ratios
            .iter()
            .copied()
            .fold(f64::NEG_INFINITY, f64::max);
        (min, max)
    }

    /// `PASS` when the ratio reaches [`TARGET`], `BELOW` otherwise, `ref`
    /// for a [reference](Self::reference) row.
    pub fn verdict(&self) -> &'static str {
        if self.reference {
            "ref"
        } else if self.ratio() >= TARGET {
            "PASS"
        } else {
            "BELOW"
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
    /// Whether this was a control (A/A) run.
    pub control: bool,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f)?;
        writeln!(f, "== {} ==", self.title)?;
        for line in &self.settings {
            writeln!(f, "   {line}")?;
        }
        if self.control {
            writeln!(
                f,
                "   CONTROL RUN ({CONTROL_VAR}=1): the adapter column is the raw client again"
            )?;
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
            "| {:<width$} | {:>10} | {:>13} | {:>11} | {:>11} | {:>6} | {:>12} | {:>16} |",
            "path",
            "raw msg/s",
            "adapter msg/s",
            "adapter/raw",
            "range",
            "≥ 0.90",
            "raw CPU/msg",
            "adapter CPU/msg"
        )?;
        writeln!(
            f,
            "|{:-<w$}|{:->12}|{:->15}|{:->13}|{:->13}|{:->8}|{:->14}|{:->18}|",
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
                format!("{:.1} µs", median(values))
            }
        };
        for row in self.rows.iter().filter(|row| !row.raw.is_empty()) {
            let (low, high) = row.ratio_range();
            writeln!(
                f,
                "| {:<width$} | {:>10.0} | {:>13.0} | {:>11.2} | {:>11} | {:>6} | {:>12} | {:>16} |",
                row.path,
                median(&row.raw),
                median(&row.adapter),
                row.ratio(),
                format!("{low:.2}–{high:.2}"),
                row.verdict(),
                cpu(&row.raw_cpu),
                cpu(&row.adapter_cpu)
            )?;
        }
        writeln!(
            f,
            "   msg/s and CPU/msg: medians over the rounds; adapter/raw: median of the per-round \
             ratios (range: lowest–highest); CPU: this process's (the client's) user + system \
             time per message"
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
    fn process_cpu_is_readable_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(process_cpu().is_some());
        }
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
            control: false,
        }
    }

    fn sample(messages: usize) -> Sample {
        Sample {
            messages,
            elapsed: Duration::from_secs(1),
            cpu: None,
        }
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
                async move { [(sample(n), sample(2 * n)), (sample(n), sample(n))] }
            },
            |round, n| {
                calls.lock().unwrap().push(("consume", round, n));
                async move { (sample(n), sample(n)) }
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
