//! The admin HTTP listener: liveness and readiness probes.
//!
//! `/healthz` answers while the process runs (a liveness probe must not fail because NATS is
//! away: restarting Weir would not bring NATS back). `/readyz` answers 200 only while NATS is
//! connected and every partition's consumer is bound.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::partition::PartitionStats;

/// What the admin handlers read.
#[derive(Clone)]
pub struct AdminState {
    pub client: async_nats::Client,
    pub partitions: Arc<Vec<Arc<PartitionStats>>>,
    /// Questions for the partition tasks (key status, busiest keys, purge).
    pub inspect: crate::inspect::Partitions,
    /// The `WEIR_LIMITS` bucket.
    pub limits: crate::limits::store::Store,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                Json(json!({"error": "no such path"})),
            )
        })
        .with_state(state)
}

async fn readyz(State(s): State<AdminState>) -> (StatusCode, Json<serde_json::Value>) {
    let connected = s.client.connection_state() == async_nats::connection::State::Connected;
    let bound = s
        .partitions
        .iter()
        .filter(|p| p.bound.load(Relaxed))
        .count();
    let ready = connected && bound == s.partitions.len();
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        Json(json!({
            "ready": ready,
            "nats_connected": connected,
            "partitions_bound": bound,
            "partitions": s.partitions.len(),
        })),
    )
}
