//! CPU time of the running process, for benchmarks that report client CPU
//! per message beside throughput.
//!
//! ```
//! let before = surety_testkit::cpu::process_cpu();
//! let _work: u64 = (0..1_000u64).sum();
//! if let (Some(before), Some(after)) = (before, surety_testkit::cpu::process_cpu()) {
//!     assert!(after >= before);
//! }
//! ```

use std::time::Duration;

/// CPU time this process has used so far: the sum over its threads of the
/// nanoseconds each has run (`/proc/self/task/*/schedstat`), or where that
/// is not readable the user + system time of `/proc/self/stat` (10 ms
/// ticks, too coarse for short windows); `None` where neither is. It counts
/// every live thread, including librdkafka's and lapin's, and nothing of the
/// broker, which runs in its own process. The clients under test start
/// their threads before the clock and stop them after it, so a thread that
/// ends inside the window (and takes its time with it) is not one of theirs.
pub fn process_cpu() -> Option<Duration> {
    threads_cpu().or_else(process_stat_cpu)
}

fn threads_cpu() -> Option<Duration> {
    let mut total: u64 = 0;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let Ok(task) = task else { continue };
        // A thread may end between the listing and the read: skip it.
        let Ok(stat) = std::fs::read_to_string(task.path().join("schedstat")) else {
            continue;
        };
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(Duration::from_nanos(total))
}

fn process_stat_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name may contain spaces; the fields after it do not.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // utime and stime are fields 14 and 15, i.e. 12 and 13 after the name
    // and state; /proc reports them in USER_HZ, which is 100 on Linux.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 10))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_cpu_is_readable_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(process_cpu().is_some());
        }
    }
}
