//! The admin API as an operator's script probes it: each refusal is the
//! right 4xx (or a generic 503), and none of them changes anything.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use surety_core::memory::MemoryTransport;
use surety_core::tower::ServiceExt;
use surety_core::{DeliveryInfo, Envelope, HandlerError};
use surety_dlq::admin::{AdminApi, ConfigError};
use surety_dlq::policy::DeadLetterReason;
use surety_dlq::store::{
    DlqStore, Filter, MemoryDlqStore, PageRequest, SqliteDlqStore, StoreError,
};
use surety_dlq::{DeadLetter, Replayer};

const TOKEN: &str = "ops-token-0123456789abcdef";

fn letter(n: u32) -> DeadLetter {
    let env = Envelope::builder("/shop", "order.placed")
        .subject(format!("order-{n}"))
        .payload("{}")
        .build();
    DeadLetter::new(
        &env,
        &DeliveryInfo::new("memory", "orders", "billing"),
        &HandlerError::permanent(format!("customer {n} unknown")),
        DeadLetterReason::NotRetryable,
        1,
        "billing",
        "host",
    )
}

async fn app_on(store: Arc<dyn DlqStore>) -> Router {
    let replayer = Replayer::new(store, MemoryTransport::new());
    let api = AdminApi::new(replayer)
        .token("ops", TOKEN)
        .max_body_bytes(64 * 1024);
    Router::new().nest("/dlq", api.router().expect("router"))
}

async fn send(
    app: &Router,
    method: &str,
    uri: &str,
    auth: Option<&str>,
    body: Option<String>,
) -> (StatusCode, Value) {
    let mut request = Request::builder().method(method).uri(uri);
    if let Some(auth) = auth {
        request = request.header(header::AUTHORIZATION, auth);
    }
    let request = match body {
        Some(b) => request
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(b)),
        None => request.body(Body::empty()),
    }
    .expect("request");
    let response = app.clone().oneshot(request).await.expect("response");
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn bearer() -> Option<String> {
    Some(format!("Bearer {TOKEN}"))
}

async fn audit_len(store: &dyn DlqStore) -> usize {
    store
        .audit_log(&PageRequest::first(100))
        .await
        .expect("audit")
        .items
        .len()
}

#[tokio::test]
async fn tokens_shorter_than_16_bytes_are_refused_at_start_up() {
    let api = AdminApi::new(Replayer::new(
        Arc::new(MemoryDlqStore::new()),
        MemoryTransport::new(),
    ))
    .token("ops", TOKEN)
    .token("intern", "short-token");
    assert!(matches!(
        api.router(),
        Err(ConfigError::TokenTooShort { actor }) if actor == "intern"
    ));
}

#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive_and_tokens_must_match_exactly() {
    let app = app_on(Arc::new(MemoryDlqStore::new())).await;
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let (status, _) = send(
            &app,
            "GET",
            "/dlq/stats",
            Some(&format!("{scheme} {TOKEN}")),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{scheme}");
    }
    let longer = format!("Bearer {TOKEN}x");
    let prefix = format!("Bearer {}", &TOKEN[..TOKEN.len() - 1]);
    for auth in [
        longer.as_str(),
        prefix.as_str(),
        "Basic b3BzOnNlY3JldA==",
        "Bearer",
    ] {
        let (status, _) = send(&app, "GET", "/dlq/stats", Some(auth), None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{auth}");
    }
}

/// A store that fails with text that must not reach clients.
#[derive(Debug, Default)]
struct Leaky(MemoryDlqStore);

#[async_trait::async_trait]
impl DlqStore for Leaky {
    async fn put(&self, l: &DeadLetter) -> Result<(), StoreError> {
        self.0.put(l).await
    }
    async fn get(&self, id: &str) -> Result<Option<DeadLetter>, StoreError> {
        self.0.get(id).await
    }
    async fn list(
        &self,
        _f: &Filter,
        _p: &PageRequest,
    ) -> Result<surety_dlq::store::Page<DeadLetter>, StoreError> {
        Err(StoreError::backend(
            "relation secret_schema.letters: password=hunter2",
        ))
    }
    async fn count(&self, f: &Filter) -> Result<u64, StoreError> {
        self.0.count(f).await
    }
    async fn transition(
        &self,
        id: &str,
        t: &surety_dlq::store::Transition,
    ) -> Result<Option<DeadLetter>, StoreError> {
        self.0.transition(id, t).await
    }
    async fn append_audit(&self, e: &surety_dlq::store::AuditEntry) -> Result<(), StoreError> {
        self.0.append_audit(e).await
    }
    async fn audit_log(
        &self,
        p: &PageRequest,
    ) -> Result<surety_dlq::store::Page<surety_dlq::store::AuditEntry>, StoreError> {
        self.0.audit_log(p).await
    }
    async fn depth(&self) -> Result<Vec<surety_dlq::store::Depth>, StoreError> {
        self.0.depth().await
    }
    async fn put_job(&self, j: &surety_dlq::job::Job) -> Result<(), StoreError> {
        self.0.put_job(j).await
    }
    async fn get_job(&self, id: &str) -> Result<Option<surety_dlq::job::Job>, StoreError> {
        self.0.get_job(id).await
    }
    async fn unfinished_jobs(&self) -> Result<Vec<surety_dlq::job::Job>, StoreError> {
        self.0.unfinished_jobs().await
    }
}

#[tokio::test]
async fn store_errors_are_a_generic_503() {
    let app = app_on(Arc::new(Leaky::default())).await;
    let (status, body) = send(&app, "GET", "/dlq/messages", bearer().as_deref(), None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let text = body.to_string();
    assert!(
        !text.contains("hunter2") && !text.contains("secret_schema"),
        "{text}"
    );
}

#[tokio::test]
async fn a_bulk_action_needs_a_filter_or_all_true() {
    let store = Arc::new(MemoryDlqStore::new());
    for n in 0..3 {
        store.put(&letter(n)).await.expect("put");
    }
    let app = app_on(store.clone()).await;
    for path in ["/dlq/replay", "/dlq/discard"] {
        for body in [
            json!({"filter": {}, "reason": "r"}),
            json!({"reason": "r"}),
            json!({"filter": {"topic": "orders"}, "all": true, "reason": "r"}),
        ] {
            let (status, reply) = send(
                &app,
                "POST",
                path,
                bearer().as_deref(),
                Some(body.to_string()),
            )
            .await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{path} {body}: {reply}");
        }
    }
    assert_eq!(audit_len(store.as_ref()).await, 0);
    let (status, reply) = send(
        &app,
        "POST",
        "/dlq/discard",
        bearer().as_deref(),
        Some(json!({"all": true, "reason": "r", "dry_run": true}).to_string()),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    assert_eq!(reply["done"].as_array().map(Vec::len), Some(3));
}

#[tokio::test]
async fn invalid_edits_are_400_and_change_nothing() {
    let store = Arc::new(MemoryDlqStore::new());
    let l = letter(1);
    store.put(&l).await.expect("put");
    let app = app_on(store.clone()).await;
    let uri = format!("/dlq/messages/{}/replay", l.id);
    let many: serde_json::Map<String, Value> =
        (0..65).map(|n| (format!("x-h{n}"), json!("v"))).collect();
    let bad = [
        json!({"reason": "r", "set_headers": {"bad name": "v"}}),
        json!({"reason": "r", "set_headers": {"x-ok": "a".repeat(256)}}),
        json!({"reason": "r", "set_headers": {"x-ok": "a\r\nx-injected: 1"}}),
        json!({"reason": "r", "set_headers": {"x-ok": "a\nb"}}),
        json!({"reason": "r", "set_headers": {"x-ok": "a\u{0}b"}}),
        json!({"reason": "r", "set_headers": {"Surety-Attempt": "1"}}),
        json!({"reason": "r", "set_headers": {"SURETY-DLQ-ID": "x"}}),
        json!({"reason": "r", "remove_headers": ["surety-replay-count"]}),
        json!({"reason": "r", "set_headers": {"h": "v"}, "remove_headers": [""]}),
        json!({"reason": "r", "set_headers": many}),
        json!({"reason": "r", "content_type": "not a type"}),
        json!({"reason": "r", "content_type": "application/json\r\nx: y"}),
        json!({"set_headers": {"x-ok": "v"}}),
    ];
    for body in bad {
        let (status, reply) = send(
            &app,
            "POST",
            &uri,
            bearer().as_deref(),
            Some(body.to_string()),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {reply}");
    }
    assert_eq!(store.get(&l.id).await.expect("get"), Some(l));
    assert_eq!(audit_len(store.as_ref()).await, 0);
}

#[tokio::test]
async fn unknown_ids_are_404_with_no_audit_entry() {
    let store = Arc::new(MemoryDlqStore::new());
    let app = app_on(store.clone()).await;
    for (path, body) in [
        ("/dlq/messages/no-such-id/replay", json!({"reason": "r"})),
        ("/dlq/messages/no-such-id/discard", json!({"reason": "r"})),
    ] {
        let (status, _) = send(
            &app,
            "POST",
            path,
            bearer().as_deref(),
            Some(body.to_string()),
        )
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
    }
    let (status, _) = send(
        &app,
        "GET",
        "/dlq/jobs/no-such-job",
        bearer().as_deref(),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(audit_len(store.as_ref()).await, 0);
}

#[tokio::test]
async fn an_oversized_body_is_413() {
    let app = app_on(Arc::new(MemoryDlqStore::new())).await;
    let body = json!({"reason": "r", "payload_base64": "A".repeat(100 * 1024)}).to_string();
    let (status, _) = send(
        &app,
        "POST",
        "/dlq/messages/x/replay",
        bearer().as_deref(),
        Some(body),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn a_huge_status_list_is_400_and_stores_bound_their_variables() {
    let store = Arc::new(SqliteDlqStore::in_memory().await.expect("sqlite"));
    store.put(&letter(1)).await.expect("put");
    // The default body limit (1 MiB) lets the list through to validation.
    let replayer = Replayer::new(store.clone(), MemoryTransport::new());
    let api = AdminApi::new(replayer).token("ops", TOKEN);
    let app = Router::new().nest("/dlq", api.router().expect("router"));
    let statuses = vec!["dead"; 40_000];
    let body = json!({"filter": {"status": statuses}, "reason": "r", "dry_run": true}).to_string();
    let (status, reply) = send(
        &app,
        "POST",
        "/dlq/discard",
        bearer().as_deref(),
        Some(body),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{reply}");
    // The store itself takes any list: one variable per distinct status.
    let filter = Filter::new().status(vec![surety_dlq::Status::Dead; 40_000]);
    assert_eq!(store.count(&filter).await.expect("count"), 1);
    assert_eq!(
        store
            .list(&filter, &PageRequest::first(10))
            .await
            .expect("list")
            .items
            .len(),
        1
    );
}

#[tokio::test]
async fn one_unreadable_record_does_not_fail_a_listing() {
    let store = Arc::new(SqliteDlqStore::in_memory().await.expect("sqlite"));
    for n in 0..3 {
        store.put(&letter(n)).await.expect("put");
    }
    sqlx::query("UPDATE surety_dlq_letters SET record = '{not json' WHERE seq = 2")
        .execute(store.pool())
        .await
        .expect("corrupt one record");
    let app = app_on(store.clone()).await;
    let (status, body) = send(
        &app,
        "GET",
        "/dlq/messages?limit=2",
        bearer().as_deref(),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let first = body["items"].as_array().map(Vec::len).unwrap_or(0);
    let cursor = body["next_cursor"]
        .as_str()
        .expect("a next page")
        .to_owned();
    let (status, body) = send(
        &app,
        "GET",
        &format!("/dlq/messages?limit=2&cursor={cursor}"),
        bearer().as_deref(),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let second = body["items"].as_array().map(Vec::len).unwrap_or(0);
    assert_eq!(
        first + second,
        2,
        "the two readable letters, over two pages"
    );
}

#[tokio::test]
async fn listings_count_only_on_request() {
    let store = Arc::new(MemoryDlqStore::new());
    store.put(&letter(1)).await.expect("put");
    let app = app_on(store).await;
    let (_, body) = send(&app, "GET", "/dlq/messages", bearer().as_deref(), None).await;
    assert!(body.get("total").is_none(), "{body}");
    let (_, body) = send(
        &app,
        "GET",
        "/dlq/messages?total=true",
        bearer().as_deref(),
        None,
    )
    .await;
    assert_eq!(body["total"], 1);
    let (status, _) = send(
        &app,
        "GET",
        "/dlq/messages?total=maybe",
        bearer().as_deref(),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

/// A store whose listing waits until released, to hold requests open.
#[derive(Debug, Default)]
struct Slow {
    inner: MemoryDlqStore,
    release: tokio::sync::Notify,
}

#[async_trait::async_trait]
impl DlqStore for Slow {
    async fn put(&self, l: &DeadLetter) -> Result<(), StoreError> {
        self.inner.put(l).await
    }
    async fn get(&self, id: &str) -> Result<Option<DeadLetter>, StoreError> {
        self.inner.get(id).await
    }
    async fn list(
        &self,
        f: &Filter,
        p: &PageRequest,
    ) -> Result<surety_dlq::store::Page<DeadLetter>, StoreError> {
        self.release.notified().await;
        self.inner.list(f, p).await
    }
    async fn count(&self, f: &Filter) -> Result<u64, StoreError> {
        self.inner.count(f).await
    }
    async fn transition(
        &self,
        id: &str,
        t: &surety_dlq::store::Transition,
    ) -> Result<Option<DeadLetter>, StoreError> {
        self.inner.transition(id, t).await
    }
    async fn append_audit(&self, e: &surety_dlq::store::AuditEntry) -> Result<(), StoreError> {
        self.inner.append_audit(e).await
    }
    async fn audit_log(
        &self,
        p: &PageRequest,
    ) -> Result<surety_dlq::store::Page<surety_dlq::store::AuditEntry>, StoreError> {
        self.inner.audit_log(p).await
    }
    async fn depth(&self) -> Result<Vec<surety_dlq::store::Depth>, StoreError> {
        self.inner.depth().await
    }
    async fn put_job(&self, j: &surety_dlq::job::Job) -> Result<(), StoreError> {
        self.inner.put_job(j).await
    }
    async fn get_job(&self, id: &str) -> Result<Option<surety_dlq::job::Job>, StoreError> {
        self.inner.get_job(id).await
    }
    async fn unfinished_jobs(&self) -> Result<Vec<surety_dlq::job::Job>, StoreError> {
        self.inner.unfinished_jobs().await
    }
}

#[tokio::test]
async fn requests_beyond_the_concurrency_limit_are_503() {
    let store = Arc::new(Slow::default());
    let replayer = Replayer::new(store.clone(), MemoryTransport::new());
    let app = Router::new().nest(
        "/dlq",
        AdminApi::new(replayer)
            .token("ops", TOKEN)
            .concurrency_limit(1)
            .router()
            .expect("router"),
    );
    let held = tokio::spawn({
        let app = app.clone();
        async move { send(&app, "GET", "/dlq/messages", bearer().as_deref(), None).await }
    });
    // Wait until the first request holds the only permit.
    surety_testkit::wait::eventually(
        std::time::Duration::from_secs(5),
        "the second request to be refused",
        || {
            let app = app.clone();
            async move {
                let (status, _) = send(&app, "GET", "/dlq/stats", bearer().as_deref(), None).await;
                status == StatusCode::SERVICE_UNAVAILABLE
            }
        },
    )
    .await;
    store.release.notify_one();
    let (status, _) = held.await.expect("task");
    assert_eq!(status, StatusCode::OK);
    let (status, _) = send(&app, "GET", "/dlq/stats", bearer().as_deref(), None).await;
    assert_eq!(status, StatusCode::OK, "the permit is back");
}

#[tokio::test]
async fn an_unfinished_job_can_be_resumed_through_the_api() {
    use surety_dlq::{ReplayRequest, Started};
    let store = Arc::new(SqliteDlqStore::in_memory().await.expect("sqlite"));
    let l = letter(1);
    store.put(&l).await.expect("put");
    let replayer = Replayer::new(store.clone(), MemoryTransport::new());
    // Started (intent written) but never run, as after a failed run.
    let Started::Job(job) = replayer
        .start_replay(ReplayRequest::ids("ops", [l.id.clone()]))
        .await
        .expect("start")
    else {
        panic!("not a dry run");
    };
    let app = Router::new().nest(
        "/dlq",
        AdminApi::new(replayer)
            .token("ops", TOKEN)
            .router()
            .expect("router"),
    );
    let uri = format!("/dlq/jobs/{}/resume", job.id);
    let (status, body) = send(&app, "POST", &uri, bearer().as_deref(), None).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    surety_testkit::wait::eventually(
        std::time::Duration::from_secs(10),
        "the job to finish",
        || async {
            store
                .get_job(&job.id)
                .await
                .ok()
                .flatten()
                .is_some_and(|j| j.finished)
        },
    )
    .await;
    let (status, body) = send(
        &app,
        "GET",
        &format!("/dlq/jobs/{}", job.id),
        bearer().as_deref(),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["finished"], true);
    assert_eq!(body["done"][0], l.id.as_str());
    let (status, _) = send(&app, "POST", &uri, bearer().as_deref(), None).await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "a finished job is not run again"
    );
    let (status, _) = send(
        &app,
        "POST",
        "/dlq/jobs/nope/resume",
        bearer().as_deref(),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}
