//! The worker's own per-message cost, measured A/B in one run: the
//! variants of `pipeline.rs` run interleaved, round after round, so that a
//! slower or faster moment of the machine hits every variant alike; each
//! round's difference to the baseline is taken, and a second copy of the
//! baseline gives the control (what the same code differs from itself).
//!
//! Prints, per variant, the median time per message and the median and
//! 10th–90th percentile of its per-round difference to the baseline. A
//! difference inside the control's band is within noise.
//!
//! `cargo bench -p surety-benches --bench pipeline_ab` (`SURETY_BENCH_ROUNDS`
//! sets the rounds, default 40; `cargo test --benches` runs 2).

use std::time::{Duration, Instant};

use surety_benches::{envelopes, ready_deliveries};
use surety_core::Envelope;
use surety_core::consumer::{AckAll, Handler, Router, Worker};

const MESSAGES: usize = 10_000;
const KEYS: usize = 64;

/// Runs `batch` through a worker at concurrency 8; the time per message.
fn time<H: Handler>(rt: &tokio::runtime::Runtime, handler: H, batch: Vec<Envelope>) -> Duration {
    let n = batch.len() as u32;
    let started = Instant::now();
    let report = rt.block_on(
        Worker::new(handler)
            .concurrency(8)
            .run(ready_deliveries(batch), std::future::pending()),
    );
    let elapsed = started.elapsed();
    assert_eq!(report.handled, u64::from(n), "{report:?}");
    elapsed / n
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let index = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not.
    let test_mode = !std::env::args().skip(1).any(|a| a == "--bench");
    let rounds: usize = std::env::var("SURETY_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if test_mode { 2 } else { 40 });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let unkeyed = envelopes(MESSAGES, 0);
    let keyed = envelopes(MESSAGES, KEYS);
    let event_type = keyed[0].event_type.clone();
    let router = Router::new()
        .route("shop.order.cancelled", AckAll)
        .route(event_type, AckAll)
        .route("shop.order.shipped", AckAll);
    let names = [
        "unkeyed (baseline)",
        "unkeyed again (control)",
        "keyed",
        "keyed + router",
    ];
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    // One warm-up round, not recorded.
    for round in 0..=rounds {
        let times = [
            time(&rt, AckAll, unkeyed.clone()),
            time(&rt, AckAll, unkeyed.clone()),
            time(&rt, AckAll, keyed.clone()),
            time(&rt, router.clone(), keyed.clone()),
        ];
        if round > 0 {
            for (sample, t) in samples.iter_mut().zip(times) {
                sample.push(t.as_secs_f64() * 1e6);
            }
        }
    }
    println!("worker pipeline, {MESSAGES} messages a run, {rounds} interleaved rounds, one core");
    println!(
        "{:<26} {:>10} {:>12} {:>22}",
        "variant", "µs/msg", "Δ median", "Δ p10..p90"
    );
    let baseline = &samples[0];
    for (name, sample) in names.iter().zip(&samples) {
        let mut sorted = sample.clone();
        sorted.sort_by(f64::total_cmp);
        let mut diffs: Vec<f64> = sample.iter().zip(baseline).map(|(t, b)| t - b).collect();
        diffs.sort_by(f64::total_cmp);
        println!(
            "{name:<26} {:>10.3} {:>+12.3} {:>+10.3}..{:>+.3}",
            percentile(&sorted, 0.5),
            percentile(&diffs, 0.5),
            percentile(&diffs, 0.1),
            percentile(&diffs, 0.9),
        );
    }
}
