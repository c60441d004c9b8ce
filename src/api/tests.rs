//! The router without sockets: each failure behind the traits is answered as what it is.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use tower::ServiceExt;

use super::*;

/// A collector whose every append fails with the given error.
struct Failing(fn() -> IngestError);

impl Collector for Failing {
    fn partitions(&self) -> u32 {
        1
    }
    fn append(
        &self,
        _: Vec<(PartitionId, Vec<Vec<u8>>)>,
    ) -> BoxFuture<'_, Result<(), IngestError>> {
        let e = (self.0)();
        Box::pin(async move { Err(e) })
    }
}

/// Results whose every read fails with the given error.
struct Unreadable(fn() -> ReadError);

impl Results for Unreadable {
    fn series(
        &self,
        _: &str,
        _: Slot,
        _: Minute,
        _: Minute,
    ) -> Result<(Vec<(Minute, u64)>, Watermark), ReadError> {
        Err((self.0)())
    }
    fn popular(
        &self,
        _: Slot,
        _: Minute,
        _: Minute,
        _: usize,
    ) -> Result<(Vec<Ranked>, Watermark), ReadError> {
        Err((self.0)())
    }
    fn totals(
        &self,
        _: Slot,
        _: Minute,
        _: Minute,
    ) -> Result<(Vec<(Minute, u64)>, Watermark), ReadError> {
        Err((self.0)())
    }
    fn health(&self) -> Health {
        Health { error: Some("down".into()), ..Health::new(HealthStatus::Unavailable) }
    }
}

fn state() -> AppState {
    let settings = crate::config::Config::default().validate().expect("the defaults are valid");
    AppState::new(&settings)
}

/// Status, `Retry-After` and the error message of one request.
async fn call(state: AppState, req: Request<Body>) -> (StatusCode, Option<String>, String) {
    let response = router(state).oneshot(req).await.expect("the router answers");
    let status = response.status();
    let retry = response.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
    let body = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let text = v.get("error").and_then(|e| e.as_str()).map_or(v.to_string(), str::to_string);
    (status, retry, text)
}

fn click() -> Request<Body> {
    let now = EventTime::now().0;
    let line = format!("{{\"ad_id\":\"a\",\"click_timestamp\":{now}}}");
    Request::post("/v1/clicks").body(Body::from(line)).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_log_that_cannot_sync_is_answered_as_what_it_is() {
    let poisoned = AppState {
        collector: Some(Arc::new(Failing(|| IngestError::Log(Arc::new(LogError::Poisoned))))),
        ..state()
    };
    let (status, retry, error) = call(poisoned, click()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(retry.as_deref(), Some("1"));
    assert!(error.contains("the click log failed") && error.contains("poisoned"), "{error}");

    // Not a failure of the disk: a bug, answered 500 without the details.
    let too_large = AppState {
        collector: Some(Arc::new(Failing(|| IngestError::Log(Arc::new(LogError::TooLarge(9)))))),
        ..state()
    };
    let (status, _, error) = call(too_large, click()).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(error, "internal error; see the server log");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_that_does_not_acknowledge_is_retried_later() {
    let broker = AppState {
        collector: Some(Arc::new(Failing(|| IngestError::Broker("no leader".into())))),
        ..state()
    };
    let (status, retry, error) = call(broker, click()).await;
    assert_eq!((status, retry.as_deref()), (StatusCode::SERVICE_UNAVAILABLE, Some("1")));
    assert!(error.contains("no leader"), "{error}");
}

#[tokio::test(flavor = "multi_thread")]
async fn reads_answer_503_when_the_database_is_away_and_404_without_the_role() {
    let away = AppState {
        results: Some(Arc::new(Unreadable(|| ReadError::Unavailable("connection refused".into())))),
        ..state()
    };
    let get = |uri: &str| Request::get(uri).body(Body::empty()).unwrap();
    for uri in ["/v1/ads/a/aggregated_count", "/v1/ads/popular_ads", "/v1/totals"] {
        let (status, retry, error) = call(away.clone(), get(uri)).await;
        assert_eq!(
            (status, retry.as_deref()),
            (StatusCode::SERVICE_UNAVAILABLE, Some("1")),
            "{uri}"
        );
        assert!(error.contains("connection refused"), "{uri}: {error}");
    }
    let (status, _, _) = call(away, get("/healthz")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let (status, _, error) = call(state(), get("/v1/totals")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(error.contains("does not run the query role"), "{error}");
    let (status, _, error) = call(state(), click()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(error.contains("does not run the collect role"), "{error}");
}
