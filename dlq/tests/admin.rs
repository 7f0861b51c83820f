//! The admin HTTP API: writes need the bearer token (401), bad input is a
//! 400 with a reason, pagination works, and a replay through the API is
//! audited under the token's actor. One test runs over a real TCP socket.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use surety_core::memory::MemoryTransport;
use surety_core::tower::ServiceExt;
use surety_core::{DeliveryInfo, Envelope, HandlerError};
use surety_dlq::admin::AdminApi;
use surety_dlq::policy::DeadLetterReason;
use surety_dlq::store::{DlqStore, MemoryDlqStore, PageRequest};
use surety_dlq::{DeadLetter, Replayer};

const TOKEN: &str = "test-token-0123456789";

async fn app() -> (Router, Arc<MemoryDlqStore>, Vec<DeadLetter>) {
    let store = Arc::new(MemoryDlqStore::new());
    let mut letters = Vec::new();
    for n in 0..5 {
        let env = Envelope::builder("/shop", "order.placed")
            .subject(format!("order-{n}"))
            .payload("{}")
            .build();
        let class_err = if n % 2 == 0 {
            HandlerError::permanent(format!("customer {n} unknown"))
        } else {
            HandlerError::poison("payload does not decode")
        };
        let letter = DeadLetter::new(
            &env,
            &DeliveryInfo::new("memory", "orders", "billing"),
            &class_err,
            DeadLetterReason::NotRetryable,
            1,
            "billing",
            "host",
        );
        store.put(&letter).await.unwrap();
        letters.push(letter);
    }
    let replayer = Replayer::new(store.clone(), MemoryTransport::new());
    let app = Router::new().nest(
        "/dlq",
        AdminApi::new(replayer)
            .token("alice", TOKEN)
            .router()
            .unwrap(),
    );
    (app, store, letters)
}

async fn call(
    app: &Router,
    method: &str,
    uri: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (StatusCode, Value) {
    let mut request = Request::builder().method(method).uri(uri);
    if let Some(token) = token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = match body {
        Some(b) => request
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(b.to_owned())),
        None => request.body(Body::empty()),
    }
    .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, value)
}

#[tokio::test]
async fn writes_without_a_valid_token_are_401_before_the_body_is_read() {
    let (app, store, letters) = app().await;
    let id = &letters[0].id;
    let writes = [
        format!("/dlq/messages/{id}/replay"),
        format!("/dlq/messages/{id}/discard"),
        "/dlq/replay".to_owned(),
        "/dlq/discard".to_owned(),
    ];
    for uri in &writes {
        for token in [None, Some("wrong-token"), Some("")] {
            // Even an invalid body gets 401, not 400.
            let (status, body) = call(&app, "POST", uri, token, Some("{not json")).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{uri} with {token:?}");
            assert!(
                body["error"].as_str().unwrap().contains("bearer token"),
                "{body}"
            );
        }
    }
    // Nothing changed.
    assert!(
        store
            .all()
            .iter()
            .all(|l| l.status == surety_dlq::Status::Dead)
    );
    assert!(
        store
            .audit_log(&PageRequest::first(10))
            .await
            .unwrap()
            .items
            .is_empty()
    );
    // Reads need the token too, by default.
    let (status, _) = call(&app, "GET", "/dlq/messages", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = call(&app, "GET", "/dlq/messages", Some(TOKEN), None).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn bad_filters_and_bodies_are_400_with_a_reason() {
    let (app, _store, letters) = app().await;
    let bad_queries = [
        ("/dlq/messages?class=fatal", "unknown class"),
        ("/dlq/messages?status=zombie", "unknown status"),
        ("/dlq/messages?from=yesterday", "RFC 3339"),
        (
            "/dlq/messages?from=2024-02-01T00:00:00Z&to=2024-01-01T00:00:00Z",
            "`from` must be before `to`",
        ),
        ("/dlq/messages?limit=0", "`limit`"),
        ("/dlq/messages?limit=1000", "`limit`"),
        ("/dlq/messages?limit=ten", "`limit`"),
        ("/dlq/messages?colour=red", "unknown query parameter"),
        ("/dlq/messages?topic=a&topic=b", "twice"),
        ("/dlq/messages?topic=", "must not be empty"),
        ("/dlq/messages?cursor=not-a-cursor", "invalid cursor"),
        ("/dlq/audit?cursor=-5", "invalid cursor"),
        ("/dlq/stats?x=1", "unknown query parameter"),
    ];
    for (uri, reason) in bad_queries {
        let (status, body) = call(&app, "GET", uri, Some(TOKEN), None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}: {body}");
        let error = body["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(reason),
            "{uri}: {error:?} should mention {reason:?}"
        );
    }
    let id = &letters[0].id;
    let bad_bodies = [
        (
            "/dlq/replay",
            r#"{"ids": ["a"], "filter": {}}"#,
            "exactly one of",
        ),
        ("/dlq/replay", r#"{}"#, "exactly one of"),
        (
            "/dlq/replay",
            r#"{"filter": {"class": "fatal"}}"#,
            "filter.class: unknown variant `fatal`, expected one of",
        ),
        (
            "/dlq/replay",
            r#"{"filter": {"colour": "red"}}"#,
            "unknown field",
        ),
        ("/dlq/replay", r#"{"ids": []}"#, "no ids"),
        (
            "/dlq/discard",
            &format!(r#"{{"ids": ["{id}"]}}"#),
            "reason is required",
        ),
        (
            "/dlq/replay",
            r#"{"ids": ["a"], "dry_run": "yes"}"#,
            "dry_run",
        ),
        (
            &format!("/dlq/messages/{id}/replay"),
            r#"{"payload_json": {"a": 1}}"#,
            "reason is required",
        ),
        (
            &format!("/dlq/messages/{id}/replay"),
            r#"{"payload_base64": "***", "reason": "x"}"#,
            "base64",
        ),
        (
            &format!("/dlq/messages/{id}/replay"),
            r#"{"payload_base64": "e30=", "payload_json": {}, "reason": "x"}"#,
            "not both",
        ),
        (
            &format!("/dlq/messages/{id}/replay"),
            r#"{"set_headers": {"surety-attempt": "9"}, "reason": "x"}"#,
            "cannot be edited",
        ),
        ("/dlq/replay", "{not json", "JSON"),
    ];
    for (uri, body, reason) in bad_bodies {
        let (status, answer) = call(&app, "POST", uri, Some(TOKEN), Some(body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri} {body}: {answer}");
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(reason),
            "{uri} {body}: {error:?} should mention {reason:?}"
        );
    }
    // Not JSON at all: 415.
    let request = Request::builder()
        .method("POST")
        .uri("/dlq/replay")
        .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
        .body(Body::from("ids=a"))
        .unwrap();
    assert_eq!(
        app.clone().oneshot(request).await.unwrap().status(),
        StatusCode::UNSUPPORTED_MEDIA_TYPE
    );
    // Unknown id: 404.
    let (status, _) = call(&app, "GET", "/dlq/messages/nope", Some(TOKEN), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn listing_filters_and_pages() {
    let (app, _store, letters) = app().await;
    let (status, page1) = call(
        &app,
        "GET",
        "/dlq/messages?limit=2&class=permanent&total=true",
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page1["total"], 3);
    assert_eq!(page1["items"].as_array().unwrap().len(), 2);
    let cursor = page1["next_cursor"].as_str().unwrap().to_owned();
    let (_, page2) = call(
        &app,
        "GET",
        &format!("/dlq/messages?limit=2&class=permanent&cursor={cursor}"),
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(page2["items"].as_array().unwrap().len(), 1);
    assert!(page2["next_cursor"].is_null());
    let ids: Vec<_> = page1["items"]
        .as_array()
        .unwrap()
        .iter()
        .chain(page2["items"].as_array().unwrap())
        .map(|i| i["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        ids,
        [
            letters[0].id.clone(),
            letters[2].id.clone(),
            letters[4].id.clone()
        ]
    );
    let (_, text) = call(
        &app,
        "GET",
        "/dlq/messages?q=ORDER-3&total=true",
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(text["total"], 1);
    let (_, one) = call(
        &app,
        "GET",
        &format!("/dlq/messages/{}", letters[1].id),
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(one["error"]["class"], "poison");
    assert_eq!(one["version"], 1);
    let (_, stats) = call(&app, "GET", "/dlq/stats", Some(TOKEN), None).await;
    assert_eq!(stats["waiting"], 5);
    assert_eq!(stats["depth"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn replay_and_discard_through_the_api_are_audited() {
    let (app, store, letters) = app().await;
    let dry = json!({"filter": {"class": "poison"}, "dry_run": true}).to_string();
    let (status, report) = call(&app, "POST", "/dlq/replay", Some(TOKEN), Some(&dry)).await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(report["done"].as_array().unwrap().len(), 2);
    assert!(
        store
            .audit_log(&PageRequest::first(10))
            .await
            .unwrap()
            .items
            .is_empty(),
        "dry run is not audited"
    );

    let (status, report) = call(
        &app,
        "POST",
        &format!("/dlq/messages/{}/replay", letters[1].id),
        Some(TOKEN),
        Some("{}"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(report["done"][0], letters[1].id.as_str());
    let body = json!({"reason": "test data"}).to_string();
    let (status, _) = call(
        &app,
        "POST",
        &format!("/dlq/messages/{}/discard", letters[0].id),
        Some(TOKEN),
        Some(&body),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (_, audit) = call(&app, "GET", "/dlq/audit?limit=1", Some(TOKEN), None).await;
    assert_eq!(audit["items"][0]["action"], "discard");
    assert_eq!(audit["items"][0]["actor"], "alice");
    assert_eq!(audit["items"][0]["reason"], "test data");
    let cursor = audit["next_cursor"].as_str().unwrap();
    let (_, older) = call(
        &app,
        "GET",
        &format!("/dlq/audit?limit=1&cursor={cursor}"),
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(older["items"][0]["action"], "replay");
}

#[tokio::test]
async fn reads_can_be_opened_explicitly() {
    let store = Arc::new(MemoryDlqStore::new());
    let api = AdminApi::new(Replayer::new(store, MemoryTransport::new()))
        .token("alice", TOKEN)
        .open_reads();
    let app = api.router().unwrap();
    let (status, _) = call(&app, "GET", "/messages", None, None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = call(&app, "POST", "/replay", None, Some("{}")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "writes stay protected");
}

/// Over a real TCP socket, with a real HTTP client.
#[tokio::test]
async fn over_http() {
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    let (app, _store, letters) = app().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                stopped.await.ok();
            })
            .await
    });
    let client: Client<_, http_body_util::Full<bytes::Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let send = |method: &str, path: &str, token: Option<&str>, body: &str| {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("http://{addr}{path}"))
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = request
            .body(http_body_util::Full::new(bytes::Bytes::from(
                body.to_owned(),
            )))
            .unwrap();
        let client = client.clone();
        async move {
            let response =
                tokio::time::timeout(std::time::Duration::from_secs(10), client.request(request))
                    .await
                    .expect("the server answers in time")
                    .unwrap();
            let status = response.status();
            let bytes = response.into_body().collect().await.unwrap().to_bytes();
            (
                status,
                serde_json::from_slice::<Value>(&bytes).unwrap_or(Value::Null),
            )
        }
    };
    let replay_body = json!({"ids": [letters[0].id], "dry_run": true}).to_string();
    let (status, body) = send("POST", "/dlq/replay", None, &replay_body).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body["error"].is_string());
    let (status, body) = send("GET", "/dlq/messages?class=nonsense", Some(TOKEN), "").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["error"].as_str().unwrap().contains("unknown class"));
    let (status, body) = send("POST", "/dlq/replay", Some(TOKEN), &replay_body).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["done"][0], letters[0].id.as_str());
    stop.send(()).ok();
    server.await.unwrap().unwrap();
}
