//! The operator API over the checkout on the in-memory store: listing,
//! showing, acting (audited first), the diagram, and its refusals.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use surety_saga::admin::AdminApi;
use surety_saga::checkout::{self, Deadlines};
use surety_saga::steps::{StepReply, Steps};
use surety_saga::store::{MemorySagaStore, SagaStore};
use surety_saga::{Input, Orchestrator};
use tower::ServiceExt;

const TOKEN: &str = "a-long-random-s3cret-token";

async fn setup() -> (axum::Router, Arc<Orchestrator<Steps, MemorySagaStore>>) {
    let saga = checkout::definition(Deadlines::default());
    let diagram = saga.mermaid();
    let orchestrator = Arc::new(Orchestrator::new(saga, MemorySagaStore::new()));
    for order in ["o-1", "o-2", "o-3"] {
        let start = orchestrator.saga().begin(json!({ "order": order }));
        orchestrator.start(order, start).await.unwrap();
    }
    let charged = Input::Message(StepReply::new("payment.charged"));
    orchestrator.handle("o-2", charged).await.unwrap();
    let declined = Input::Message(StepReply::new("payment.declined"));
    orchestrator.handle("o-3", declined).await.unwrap();
    let router = AdminApi::new(Arc::clone(&orchestrator))
        .token("alice", TOKEN)
        .diagram(diagram)
        .router()
        .unwrap();
    (router, orchestrator)
}

async fn call(
    router: &axum::Router,
    method: &str,
    uri: &str,
    body: Option<Value>,
    token: Option<&str>,
) -> (StatusCode, Value, String) {
    let mut request = Request::builder().method(method).uri(uri);
    if let Some(token) = token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let body = match body {
        Some(body) => {
            request = request.header(header::CONTENT_TYPE, "application/json");
            Body::from(body.to_string())
        }
        None => Body::empty(),
    };
    let response = router
        .clone()
        .oneshot(request.body(body).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::Null),
        text,
    )
}

/// Duplicate and late replies show as counted no-ops, one record per
/// (version, reply type), however many arrive.
#[tokio::test]
async fn duplicate_replies_show_as_counted_noops() {
    let (router, orchestrator) = setup().await;
    for _ in 0..50 {
        let again = Input::Message(StepReply::new("payment.charged"));
        orchestrator.handle("o-2", again).await.unwrap();
        let late = Input::Message(StepReply::new("payment.declined"));
        orchestrator.handle("o-3", late).await.unwrap();
    }
    let (_, body, _) = call(&router, "GET", "/instances/o-2", None, Some(TOKEN)).await;
    assert_eq!(
        body["history"].as_array().unwrap().len(),
        2,
        "no new history rows"
    );
    let noops = body["noops"].as_array().unwrap();
    assert_eq!(noops.len(), 1, "{noops:?}");
    assert_eq!(noops[0]["version"], 2);
    assert_eq!(noops[0]["input"], "payment.charged");
    assert_eq!(noops[0]["outcome"], "ignored");
    assert_eq!(noops[0]["count"], 50);
    let (_, body, _) = call(&router, "GET", "/instances/o-3", None, Some(TOKEN)).await;
    assert_eq!(body["noops"][0]["outcome"], "finished");
    assert_eq!(body["noops"][0]["count"], 50);
}

#[tokio::test]
async fn every_endpoint_needs_a_valid_token() {
    let (router, _) = setup().await;
    for (method, uri) in [
        ("GET", "/instances"),
        ("GET", "/instances/o-1"),
        ("GET", "/definition"),
        ("POST", "/instances/o-1/resolve"),
    ] {
        let (status, body, _) =
            call(&router, method, uri, Some(json!({"reason": "x"})), None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {uri}");
        assert!(body["error"].is_string());
        let (status, _, _) = call(
            &router,
            method,
            uri,
            None,
            Some("wrong-token-of-some-length"),
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {uri}");
    }
    let short = AdminApi::new(setup().await.1)
        .token("bob", "short")
        .router();
    assert!(short.is_err(), "a short token is refused at start-up");
}

#[tokio::test]
async fn lists_filter_by_state_and_stuck_and_show_the_history() {
    let (router, _) = setup().await;
    let (status, body, _) = call(
        &router,
        "GET",
        "/instances?saga=checkout",
        None,
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["instances"].as_array().unwrap().len(), 3);

    let (_, body, _) = call(
        &router,
        "GET",
        "/instances?state=inventory",
        None,
        Some(TOKEN),
    )
    .await;
    let ids: Vec<&str> = body["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["o-2"]);

    // Stuck: unfinished and not moved for 0 s: the two still running.
    let (_, body, _) = call(&router, "GET", "/instances?stuck_secs=0", None, Some(TOKEN)).await;
    assert_eq!(body["instances"].as_array().unwrap().len(), 2);
    let (_, body, _) = call(
        &router,
        "GET",
        "/instances?stuck_secs=3600",
        None,
        Some(TOKEN),
    )
    .await;
    assert!(body["instances"].as_array().unwrap().is_empty());
    let (_, body, _) = call(
        &router,
        "GET",
        "/instances?finished=true",
        None,
        Some(TOKEN),
    )
    .await;
    assert_eq!(body["instances"][0]["id"], "o-3");

    let (status, body, _) = call(&router, "GET", "/instances/o-2", None, Some(TOKEN)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["instance"]["state_name"], "inventory");
    let history = body["history"].as_array().unwrap();
    assert_eq!(history.len(), 2);
    assert_eq!(history[0]["from_state"], Value::Null, "the start");
    assert_eq!(history[0]["commands"][0]["message_type"], "payment.charge");
    assert_eq!(
        history[1]["input"]["Message"]["message_type"],
        "payment.charged"
    );
    assert_eq!(history[1]["from_state"], "payment");
    assert_eq!(history[1]["state_name"], "inventory");
    assert_eq!(
        history[1]["commands"],
        json!([{
            "topic": "inventory",
            "message_type": "inventory.reserve",
            "id": "checkout:o-2:do:inventory:0",
        }])
    );
    assert_eq!(body["noops"], json!([]));

    for bad in [
        "/instances?limit=0",
        "/instances?finished=maybe",
        "/instances?stuck_secs=soon",
        "/instances?colour=red",
    ] {
        let (status, _, _) = call(&router, "GET", bad, None, Some(TOKEN)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
    }
    let (status, _, _) = call(&router, "GET", "/instances/nope", None, Some(TOKEN)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn actions_are_audited_then_applied_as_recorded_inputs() {
    let (router, orchestrator) = setup().await;
    let (status, body, _) = call(
        &router,
        "POST",
        "/instances/o-2/compensate",
        Some(json!({"reason": "customer cancelled by phone"})),
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["state"], "compensating-inventory");
    assert_eq!(body["commands"], 1);

    let audit = orchestrator
        .store()
        .audit_log("checkout", "o-2")
        .await
        .unwrap();
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].actor, "alice");
    assert_eq!(audit[0].action, "compensate");
    let (_, history) = orchestrator.history("o-2").await.unwrap().unwrap();
    assert!(matches!(history.last(), Some(Input::Operator(a)) if a.actor == "alice"));

    // A finished instance takes no action; an unknown action is refused.
    let (status, _, _) = call(
        &router,
        "POST",
        "/instances/o-3/retry",
        Some(json!({"reason": "again"})),
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, _, _) = call(
        &router,
        "POST",
        "/instances/o-1/dance",
        Some(json!({"reason": "why not"})),
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, _) = call(
        &router,
        "POST",
        "/instances/o-1/resolve",
        Some(json!({"reason": "  "})),
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _, _) = call(&router, "POST", "/instances/o-1/resolve", None, Some(TOKEN)).await;
    assert!(status.is_client_error(), "{status}");
    // A body without the reason field: a bad request that says what is missing.
    let (status, body, _) = call(
        &router,
        "POST",
        "/instances/o-1/resolve",
        Some(json!({"why": "refunded by hand"})),
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.to_string().contains("reason"), "{body}");

    let (status, body, _) = call(
        &router,
        "POST",
        "/instances/o-1/resolve",
        Some(json!({"reason": "refunded by hand"})),
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["state"], "resolved");
    assert_eq!(body["finished"], true);
}

#[tokio::test]
async fn the_definition_is_a_mermaid_diagram() {
    let (router, _) = setup().await;
    let (status, _, text) = call(&router, "GET", "/definition", None, Some(TOKEN)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(text.starts_with("stateDiagram-v2"));
    assert!(text.contains("payment --> inventory"));
}
