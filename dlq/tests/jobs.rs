//! Replays and discards run as jobs that survive their caller: a process
//! killed (SIGKILL) mid-batch and an HTTP client that disconnects mid-batch
//! leave every dead letter either published with an audit entry or still
//! replayable, and a restart finishes the job. Twenty concurrent replays of
//! one letter publish it once; a failed publish restores the replay count;
//! an action whose audit entry cannot be written changes nothing.

mod common;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use surety_core::memory::MemoryTransport;
use surety_core::{DeliveryInfo, Envelope, HandlerError, Subscriber};
use surety_dlq::policy::DeadLetterReason;
use surety_dlq::store::{DlqStore, Filter, MemoryDlqStore, PageRequest, SqliteDlqStore};
use surety_dlq::{DeadLetter, ReplayRequest, Replayer, Status};
use surety_rabbitmq::lapin::options::QueueDeleteOptions;
use surety_rabbitmq::topology::WorkQueue;
use surety_rabbitmq::{RabbitConfig, RabbitTransport};
use surety_testkit::services;

use common::eventually;

const DEADLINE: Duration = Duration::from_secs(30);
const CHILD_MODE: &str = "SURETY_DLQ_JOB_CHILD";
const CHILD_DB: &str = "SURETY_DLQ_JOB_DB";
const CHILD_TOPIC: &str = "SURETY_DLQ_JOB_TOPIC";
const GROUP: &str = "billing";

fn letter(n: u32, system: &'static str, topic: &str) -> DeadLetter {
    let env = Envelope::builder("/shop", "order.placed")
        .subject(format!("order-{n}"))
        .partition_key(format!("order-{n}"))
        .payload(format!("{{\"n\":{n}}}"))
        .build();
    DeadLetter::new(
        &env,
        &DeliveryInfo::new(system, topic, GROUP),
        &HandlerError::permanent(format!("customer {n} unknown")),
        DeadLetterReason::NotRetryable,
        1,
        GROUP,
        "host",
    )
}

async fn rabbit(url: &str, name: &str) -> RabbitTransport {
    RabbitTransport::connect(RabbitConfig::new(url).connection_name(name.to_owned()))
        .await
        .expect("connects to RabbitMQ")
}

/// The child process of [`a_replay_killed_mid_batch_is_finished_after_a_restart`]:
/// a no-op unless started by it with `SURETY_DLQ_JOB_CHILD` set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_job_child_process() {
    let Ok(mode) = std::env::var(CHILD_MODE) else {
        return;
    };
    let db = std::env::var(CHILD_DB).expect("db");
    let topic = std::env::var(CHILD_TOPIC).expect("topic");
    let url = services::amqp_url().expect("amqp url");
    let store: Arc<dyn DlqStore> = if db.starts_with("postgres") {
        Arc::new(common::open_postgres(&db).await.expect("postgres"))
    } else {
        Arc::new(common::open_sqlite(&db).await.expect("sqlite"))
    };
    let transport = rabbit(&url, "surety-dlq-test-job-child").await;
    let replayer = Replayer::new(store, transport).rate_limit(25);
    match mode.as_str() {
        "run" => {
            replayer
                .replay(
                    ReplayRequest::filter("ops", Filter::new().topic(topic)).reason("bug fixed"),
                )
                .await
                .expect("replay");
        }
        _ => {
            let jobs = replayer.resume().await.expect("resume");
            assert_eq!(jobs.len(), 1, "one unfinished job to resume");
        }
    }
}

fn child(mode: &str, db: &str, topic: &str) -> std::process::Child {
    Command::new(std::env::current_exe().expect("test binary"))
        .args(["replay_job_child_process", "--exact", "--nocapture"])
        .env(CHILD_MODE, mode)
        .env(CHILD_DB, db)
        .env(CHILD_TOPIC, topic)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the child")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_killed_mid_batch_is_finished_after_a_restart() {
    let Some(url) = services::require(services::amqp_url()) else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("surety-dlq-job-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let db = format!("sqlite://{}", dir.join("dlq.db").display());
    let store = Arc::new(common::open_sqlite(&db).await.expect("sqlite"));
    killed_and_resumed(&url, &db, store).await;
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_killed_mid_batch_is_finished_after_a_restart_on_postgres() {
    let Some(url) = services::require(services::amqp_url()) else {
        return;
    };
    let Some(pg) = services::require(services::postgres_url()) else {
        return;
    };
    let schema = format!("surety_dlq_jobs_{}", uuid::Uuid::now_v7().simple());
    let admin = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&pg)
        .await
        .expect("postgres");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
        .execute(&admin)
        .await
        .expect("create schema");
    let sep = if pg.contains('?') { '&' } else { '?' };
    let db = format!("{pg}{sep}options[search_path]={schema}");
    let store = Arc::new(common::open_postgres(&db).await.expect("postgres store"));
    killed_and_resumed(&url, &db, store.clone()).await;
    store.pool().close().await;
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
        .execute(&admin)
        .await
        .ok();
}

/// Seeds letters, runs a replay job in a child process, SIGKILLs it
/// mid-batch, checks the invariant, resumes in a second child, and checks
/// that every letter was replayed once and reached the group's queue.
async fn killed_and_resumed(url: &str, db: &str, store: Arc<dyn DlqStore>) {
    const N: u32 = 40;
    let topic = format!("surety-dlq-test.jobs.{}", uuid::Uuid::now_v7());
    let mut ids = Vec::new();
    for n in 0..N {
        let l = letter(n, "rabbitmq", &topic);
        store.put(&l).await.expect("put");
        ids.push(l.id);
    }
    // The group's queue exists before anything is replayed to the topic.
    let observer = rabbit(url, "surety-dlq-test-job-observer").await;
    let channel = observer.channel().await.expect("channel");
    let work = WorkQueue::for_group(&observer.config().exchange, &topic, GROUP);
    work.declare(&channel).await.expect("declare the queue");

    let mut run = child("run", db, &topic);
    let job_progress = || async {
        match store.unfinished_jobs().await {
            Ok(jobs) => jobs.first().map_or(0, |j| j.next),
            Err(_) => 0,
        }
    };
    eventually(DEADLINE, "the job to be a few letters in", || async {
        job_progress().await >= 5
    })
    .await;
    run.kill().expect("SIGKILL the child");
    run.wait().expect("reap the child");

    // Right after the kill: every letter is published and audited, or
    // still replayable (`dead`, or `replaying` for the resumed job).
    let jobs = store.unfinished_jobs().await.expect("jobs");
    assert_eq!(jobs.len(), 1, "the killed job is unfinished");
    let job = &jobs[0];
    assert!(job.next < N as usize, "killed mid-batch, not after it");
    let audit = store
        .audit_log(&PageRequest::first(10))
        .await
        .expect("audit");
    assert_eq!(audit.items.len(), 1);
    assert_eq!(audit.items[0].job.as_deref(), Some(job.id.as_str()));
    assert!(!audit.items[0].finished);
    for id in &ids {
        let l = store.get(id).await.expect("get").expect("letter");
        match l.status {
            Status::Replayed => assert!(audit.items[0].planned.contains(id)),
            Status::Dead | Status::Replaying => {}
            other => panic!("letter {id} is {other:?} after the kill"),
        }
    }

    // The restarted process resumes the job and finishes it.
    let status = child("resume", db, &topic).wait().expect("resume child");
    assert!(status.success(), "the resuming child failed");
    for id in &ids {
        let l = store.get(id).await.expect("get").expect("letter");
        assert_eq!(l.status, Status::Replayed, "{id}");
        assert_eq!(l.replay_count, 1, "{id}: counted once");
    }
    let entry = store
        .audit_log(&PageRequest::first(10))
        .await
        .expect("audit");
    assert_eq!(entry.items.len(), 1);
    assert!(entry.items[0].finished);
    assert_eq!(entry.items[0].succeeded.len(), N as usize);
    assert!(store.unfinished_jobs().await.expect("jobs").is_empty());

    // Every letter reached the group's queue (a letter in flight at the
    // kill may have been published twice, with the same message id).
    let mut seen = std::collections::HashSet::new();
    let mut deliveries = observer.subscribe(&topic, GROUP).await.expect("subscribe");
    while seen.len() < N as usize {
        let delivery = tokio::time::timeout(DEADLINE, deliveries.next())
            .await
            .expect("every replayed letter arrives")
            .expect("stream open")
            .expect("delivery");
        let dlq_id = delivery
            .envelope()
            .headers
            .get("surety-dlq-id")
            .expect("surety-dlq-id")
            .to_owned();
        assert!(ids.contains(&dlq_id));
        seen.insert(dlq_id);
        delivery.ack().await.expect("ack");
    }
    drop(deliveries);
    channel
        .queue_delete(work.name().into(), QueueDeleteOptions::default())
        .await
        .ok();
}

/// Serves the admin API over TCP; returns its address.
async fn serve(app: axum::Router) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

const TOKEN: &str = "ops-token-0123456789abcdef";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_batch_does_not_stop_the_replay() {
    use tokio::io::AsyncWriteExt;
    const N: usize = 30;
    let store = Arc::new(SqliteDlqStore::in_memory().await.expect("sqlite"));
    let mut ids = Vec::new();
    for n in 0..N as u32 {
        let l = letter(n, "memory", "orders");
        store.put(&l).await.expect("put");
        ids.push(l.id);
    }
    let transport = MemoryTransport::new();
    let mut orders = transport
        .subscribe("orders", GROUP)
        .await
        .expect("subscribe");
    let replayer = Replayer::new(store.clone(), transport.clone()).rate_limit(50);
    let api = surety_dlq::admin::AdminApi::new(replayer).token("ops", TOKEN);
    let api = api.router().expect("router");
    let addr = serve(axum::Router::new().nest("/dlq", api)).await;

    // A raw HTTP/1.1 request, and the connection dropped 100 ms later,
    // long before 30 replays at 50 per second are through.
    let body = r#"{"filter": {"topic": "orders"}, "reason": "bug fixed"}"#;
    let mut socket = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!(
        "POST /dlq/replay HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TOKEN}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    socket.write_all(request.as_bytes()).await.expect("send");
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(socket);

    // The job goes on without the client and finishes: every letter
    // published once, replayed, and in the finished audit entry.
    let mut published = Vec::new();
    while published.len() < N {
        let d = tokio::time::timeout(DEADLINE, orders.next())
            .await
            .expect("every letter is replayed")
            .expect("open")
            .expect("delivery");
        published.push(
            d.envelope()
                .headers
                .get("surety-dlq-id")
                .unwrap_or("")
                .to_owned(),
        );
        d.ack().await.expect("ack");
    }
    published.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(published, expected, "each letter published exactly once");
    eventually(DEADLINE, "the audit entry to be final", || async {
        store
            .audit_log(&PageRequest::first(5))
            .await
            .ok()
            .and_then(|p| p.items.first().cloned())
            .is_some_and(|e| e.finished && e.succeeded.len() == N)
    })
    .await;
    for id in &ids {
        let l = store.get(id).await.expect("get").expect("letter");
        assert_eq!(l.status, Status::Replayed);
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(200), orders.next())
            .await
            .is_err(),
        "nothing published twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_replays_of_one_letter_publish_once() {
    let store = Arc::new(SqliteDlqStore::in_memory().await.expect("sqlite"));
    let l = letter(1, "memory", "orders");
    store.put(&l).await.expect("put");
    let transport = MemoryTransport::new();
    let mut orders = transport
        .subscribe("orders", GROUP)
        .await
        .expect("subscribe");
    let replayer = Replayer::new(store.clone(), transport.clone());
    let mut tasks = Vec::new();
    for n in 0..20 {
        let replayer = replayer.clone();
        let id = l.id.clone();
        tasks.push(tokio::spawn(async move {
            replayer
                .replay(ReplayRequest::ids(format!("op-{n}"), [id]))
                .await
                .expect("replay")
        }));
    }
    let mut done = 0;
    for t in tasks {
        done += t.await.expect("task").done.len();
    }
    assert_eq!(done, 1, "exactly one request replays it");
    let first = orders.next().await.expect("published").expect("delivery");
    first.ack().await.expect("ack");
    assert!(
        tokio::time::timeout(Duration::from_millis(200), orders.next())
            .await
            .is_err(),
        "published once"
    );
    let now = store.get(&l.id).await.expect("get").expect("letter");
    assert_eq!(now.replay_count, 1);
    // Asked for explicitly, it is replayed again.
    let again = replayer
        .replay(ReplayRequest::ids("op", [l.id.clone()]).again(true))
        .await
        .expect("again");
    assert_eq!(again.done, std::slice::from_ref(&l.id));
}

/// A publisher that always fails.
#[derive(Debug, Clone)]
struct Down;

impl surety_core::Publisher for Down {
    async fn send(
        &self,
        _topic: &str,
        _envelope: Envelope,
    ) -> surety_core::Result<surety_core::Confirmation> {
        Err(surety_core::TransportError::new(
            surety_core::TransportErrorKind::Connection,
            "broker down",
        ))
    }
}

#[tokio::test]
async fn a_failed_publish_restores_the_status_and_the_count() {
    let store = Arc::new(SqliteDlqStore::in_memory().await.expect("sqlite"));
    let l = letter(1, "memory", "orders");
    store.put(&l).await.expect("put");
    let report = Replayer::new(store.clone(), Down)
        .replay(ReplayRequest::ids("op", [l.id.clone()]))
        .await
        .expect("replay");
    assert_eq!(report.failed.len(), 1);
    let now = store.get(&l.id).await.expect("get").expect("letter");
    assert_eq!(now.status, Status::Dead);
    assert_eq!(now.replay_count, 0, "the failed replay is not counted");
    let entry = &store
        .audit_log(&PageRequest::first(5))
        .await
        .expect("audit")
        .items[0];
    assert!(entry.finished);
    assert_eq!(entry.failed, std::slice::from_ref(&l.id));
}

/// A store whose audit log cannot be written.
#[derive(Debug, Default)]
struct NoAudit(MemoryDlqStore);

#[async_trait::async_trait]
impl DlqStore for NoAudit {
    async fn put(&self, l: &DeadLetter) -> Result<(), surety_dlq::store::StoreError> {
        self.0.put(l).await
    }
    async fn get(&self, id: &str) -> Result<Option<DeadLetter>, surety_dlq::store::StoreError> {
        self.0.get(id).await
    }
    async fn list(
        &self,
        f: &Filter,
        p: &PageRequest,
    ) -> Result<surety_dlq::store::Page<DeadLetter>, surety_dlq::store::StoreError> {
        self.0.list(f, p).await
    }
    async fn count(&self, f: &Filter) -> Result<u64, surety_dlq::store::StoreError> {
        self.0.count(f).await
    }
    async fn transition(
        &self,
        id: &str,
        t: &surety_dlq::store::Transition,
    ) -> Result<Option<DeadLetter>, surety_dlq::store::StoreError> {
        self.0.transition(id, t).await
    }
    async fn append_audit(
        &self,
        _e: &surety_dlq::store::AuditEntry,
    ) -> Result<(), surety_dlq::store::StoreError> {
        Err(surety_dlq::store::StoreError::backend("disk full"))
    }
    async fn audit_log(
        &self,
        p: &PageRequest,
    ) -> Result<surety_dlq::store::Page<surety_dlq::store::AuditEntry>, surety_dlq::store::StoreError>
    {
        self.0.audit_log(p).await
    }
    async fn depth(&self) -> Result<Vec<surety_dlq::store::Depth>, surety_dlq::store::StoreError> {
        self.0.depth().await
    }
    async fn put_job(&self, j: &surety_dlq::job::Job) -> Result<(), surety_dlq::store::StoreError> {
        self.0.put_job(j).await
    }
    async fn get_job(
        &self,
        id: &str,
    ) -> Result<Option<surety_dlq::job::Job>, surety_dlq::store::StoreError> {
        self.0.get_job(id).await
    }
    async fn unfinished_jobs(
        &self,
    ) -> Result<Vec<surety_dlq::job::Job>, surety_dlq::store::StoreError> {
        self.0.unfinished_jobs().await
    }
}

#[tokio::test]
async fn an_action_whose_audit_entry_cannot_be_written_changes_nothing() {
    let store = Arc::new(NoAudit::default());
    let l = letter(1, "memory", "orders");
    store.put(&l).await.expect("put");
    let transport = MemoryTransport::new();
    let mut orders = transport
        .subscribe("orders", GROUP)
        .await
        .expect("subscribe");
    let replayer = Replayer::new(store.clone(), transport.clone());
    assert!(
        replayer
            .replay(ReplayRequest::ids("op", [l.id.clone()]))
            .await
            .is_err()
    );
    assert!(
        replayer
            .discard(surety_dlq::DiscardRequest::new(
                "op",
                surety_dlq::Selection::Ids(vec![l.id.clone()]),
                "obsolete"
            ))
            .await
            .is_err()
    );
    assert_eq!(store.get(&l.id).await.expect("get"), Some(l));
    assert!(store.unfinished_jobs().await.expect("jobs").is_empty());
    assert!(
        tokio::time::timeout(Duration::from_millis(100), orders.next())
            .await
            .is_err(),
        "nothing published"
    );
}

/// On the real stores: with the audit table gone, a replay and a discard
/// fail before touching anything (no status change, no job, no publish).
async fn audit_failure_changes_nothing(store: Arc<dyn DlqStore>, drop_audit: impl AsyncFnOnce()) {
    let l = letter(1, "memory", "orders");
    store.put(&l).await.expect("put");
    drop_audit().await;
    let transport = MemoryTransport::new();
    let mut orders = transport
        .subscribe("orders", GROUP)
        .await
        .expect("subscribe");
    let replayer = Replayer::new(store.clone(), transport.clone());
    let replay = replayer
        .replay(ReplayRequest::filter("op", Filter::new().topic("orders")).reason("fixed"))
        .await;
    assert!(replay.is_err(), "{replay:?}");
    let discard = replayer
        .discard(surety_dlq::DiscardRequest::new(
            "op",
            surety_dlq::Selection::Ids(vec![l.id.clone()]),
            "obsolete",
        ))
        .await;
    assert!(discard.is_err(), "{discard:?}");
    assert_eq!(store.get(&l.id).await.expect("get"), Some(l));
    assert!(store.unfinished_jobs().await.expect("jobs").is_empty());
    assert!(
        tokio::time::timeout(Duration::from_millis(100), orders.next())
            .await
            .is_err(),
        "nothing published"
    );
}

#[tokio::test]
async fn an_unwritable_audit_log_changes_nothing_on_sqlite() {
    let store = Arc::new(SqliteDlqStore::in_memory().await.expect("sqlite"));
    let pool = store.pool().clone();
    audit_failure_changes_nothing(store, async move || {
        sqlx::query("DROP TABLE surety_dlq_audit")
            .execute(&pool)
            .await
            .expect("drop the audit table");
    })
    .await;
}

#[tokio::test]
async fn an_unwritable_audit_log_changes_nothing_on_postgres() {
    let Some(pg) = services::require(services::postgres_url()) else {
        return;
    };
    let schema = format!("surety_dlq_noaudit_{}", uuid::Uuid::now_v7().simple());
    let admin = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&pg)
        .await
        .expect("postgres");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
        .execute(&admin)
        .await
        .expect("create schema");
    let sep = if pg.contains('?') { '&' } else { '?' };
    let store = Arc::new(
        common::open_postgres(&format!("{pg}{sep}options[search_path]={schema}"))
            .await
            .expect("postgres store"),
    );
    let pool = store.pool().clone();
    audit_failure_changes_nothing(store.clone(), async move || {
        sqlx::query("DROP TABLE surety_dlq_audit")
            .execute(&pool)
            .await
            .expect("drop the audit table");
    })
    .await;
    store.pool().close().await;
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
        .execute(&admin)
        .await
        .ok();
}
