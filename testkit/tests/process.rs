//! `surety_testkit::process`: a child test process started with its role
//! variable runs its role, exits on its own or dies of SIGKILL.

use std::time::Duration;

use surety_testkit::process::{TestProcess, role};

const ROLE: &str = "SURETY_TESTKIT_PROCESS_CHILD";

/// The child: sleeps (`sleep`) or exits at once with success (`exit`).
#[test]
fn child() {
    match role(ROLE).as_deref() {
        Some("sleep") => std::thread::sleep(Duration::from_secs(600)),
        Some("fail") => panic!("the child fails on purpose"),
        _ => {}
    }
}

#[tokio::test]
async fn a_child_exits_on_its_own_or_is_killed() {
    if role(ROLE).is_some() {
        return;
    }
    let mut done = TestProcess::new("child")
        .env(ROLE, "exit")
        .spawn()
        .expect("starts");
    assert!(
        done.wait_for(Duration::from_secs(60))
            .await
            .expect("exits")
            .success()
    );

    let mut failed = TestProcess::new("child")
        .env(ROLE, "fail")
        .spawn()
        .expect("starts");
    assert!(
        !failed
            .wait_for(Duration::from_secs(60))
            .await
            .expect("exits")
            .success(),
        "the child's test result is its exit status"
    );

    let mut sleeping = TestProcess::new("child")
        .env(ROLE, "sleep")
        .spawn()
        .expect("starts");
    let timed_out = sleeping
        .wait_for(Duration::from_millis(300))
        .await
        .expect_err("still sleeping");
    assert_eq!(timed_out.kind(), std::io::ErrorKind::TimedOut);
    assert!(sleeping.exited(), "killed at the deadline");

    let mut killed = TestProcess::new("child")
        .env(ROLE, "sleep")
        .spawn()
        .expect("starts");
    assert!(!killed.exited());
    let status = killed.kill().await.expect("killed");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(9), "SIGKILL");
}
