//! The admin HTTP API: probes, limits, keys, and the OpenAPI document that describes them.
//!
//! `/healthz` answers while the process runs (a liveness probe must not fail because NATS is
//! away: restarting Weir would not bring NATS back). `/readyz` answers 200 only while NATS is
//! connected, the process has joined the group, and every partition it runs has its consumer
//! bound. `/v1/cluster` shows the group ([`cluster`]).
//!
//! The operator's API (`/v1/...`) reads and writes the `WEIR_LIMITS` bucket ([`limits`]), asks
//! the partition tasks about keys ([`keys`]) and reads jobs' status ([`jobs`]). Writes (PUT,
//! DELETE) need `Authorization: Bearer <token>` when `admin_token` is configured; reads stay
//! open, as they show figures and where jobs are, never a job's payload or headers. Every error is JSON, `{"error": "..."}`, saying what was wrong and
//! how to fix it ([`error`]); a 5xx means NATS failed, never the request.
//!
//! The router is built from one table ([`endpoints`]), and a test checks that the committed
//! `openapi.json` lists exactly the table's routes, so the document cannot drift from the code.

use axum::extract::{Request, State};
use axum::handler::Handler;
use axum::http::{header, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{on, MethodFilter, MethodRouter};
use axum::{Json, Router};
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::config::AdminToken;

pub mod batch;
pub mod cluster;
pub mod error;
pub mod jobs;
pub mod keys;
pub mod limits;

pub use error::ApiError;

/// The OpenAPI 3.1 document of this API, served at `/openapi.json`. Hand-written (no code
/// generator in the build); `tests` below keep it in step with the router.
pub const OPENAPI: &str = include_str!("../openapi.json");

/// What the admin handlers read.
#[derive(Clone)]
pub struct AdminState {
    pub client: async_nats::Client,
    /// Which partitions run here, and the group's view.
    pub ownership: cluster::Ownership,
    /// Questions for the partition tasks (key status, busiest keys, purge).
    pub inspect: crate::inspect::Partitions,
    /// The `WEIR_LIMITS` bucket.
    pub limits: crate::limits::store::Store,
    /// Job status (`WEIR_JOB_STATUS`); off when `job_status_retention` is 0.
    pub status: crate::status::StatusStore,
    /// When set, writes need it as a bearer token.
    pub admin_token: Option<AdminToken>,
    /// Publishes `POST /v1/jobs:batch` ([`batch`]).
    pub jobs: crate::sharq::Publisher,
    /// The requeue limit of a batch job that names none (`sharq_default_requeue_limit`).
    pub default_requeue_limit: i64,
}

/// One route: a method on a path, and its handler.
pub struct Endpoint {
    pub method: Method,
    pub path: &'static str,
    route: MethodRouter<AdminState>,
}

fn ep<H, T>(method: Method, path: &'static str, handler: H) -> Endpoint
where
    H: Handler<T, AdminState>,
    T: 'static,
{
    let filter = MethodFilter::try_from(method.clone()).expect("a standard method");
    Endpoint {
        method,
        path,
        route: on(filter, handler),
    }
}

/// Every route of the API. The router is built from this table and nothing else.
pub fn endpoints() -> Vec<Endpoint> {
    use limits::{Destinations, Keys, Patterns};
    use Method as M;
    vec![
        ep(M::GET, "/healthz", || async {
            Json(json!({"status": "ok"}))
        }),
        ep(M::GET, "/readyz", readyz),
        ep(M::GET, "/openapi.json", openapi),
        ep(M::GET, "/v1/cluster", cluster::get),
        ep(M::GET, "/v1/limits", limits::list),
        ep(M::GET, "/v1/limits/default", limits::get_default),
        ep(M::PUT, "/v1/limits/default", limits::put_default),
        ep(M::GET, "/v1/limits/keys/{key}", limits::get::<Keys>),
        ep(M::PUT, "/v1/limits/keys/{key}", limits::put::<Keys>),
        ep(M::DELETE, "/v1/limits/keys/{key}", limits::delete::<Keys>),
        ep(
            M::GET,
            "/v1/limits/destinations/{dest}",
            limits::get::<Destinations>,
        ),
        ep(
            M::PUT,
            "/v1/limits/destinations/{dest}",
            limits::put::<Destinations>,
        ),
        ep(
            M::DELETE,
            "/v1/limits/destinations/{dest}",
            limits::delete::<Destinations>,
        ),
        ep(
            M::GET,
            "/v1/limits/patterns/{name}",
            limits::get::<Patterns>,
        ),
        ep(
            M::PUT,
            "/v1/limits/patterns/{name}",
            limits::put::<Patterns>,
        ),
        ep(
            M::DELETE,
            "/v1/limits/patterns/{name}",
            limits::delete::<Patterns>,
        ),
        ep(M::GET, "/v1/keys", keys::top),
        ep(M::GET, "/v1/keys/{key}", keys::status),
        ep(M::DELETE, "/v1/keys/{key}/jobs", keys::purge),
        ep(M::GET, "/v1/jobs/{job_id}", jobs::get),
        ep(M::POST, "/v1/jobs:batch", batch::batch),
    ]
}

pub fn router(state: AdminState) -> Router {
    let mut router = Router::new();
    for e in endpoints() {
        router = router.route(e.path, e.route);
    }
    router
        // Only on matched routes, so an unknown path is a 404 and a wrong method a 405 whether
        // or not a token came with it.
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize))
        // A full batch of jobs is larger than axum's 2 MB default.
        .layer(axum::extract::DefaultBodyLimit::max(crate::sharq::MAX_BODY))
        .method_not_allowed_fallback(|method: Method, uri: Uri| async move {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                format!(
                    "{method} is not allowed on {}; the Allow header lists the methods that are, and GET /openapi.json describes them all",
                    uri.path()
                ),
            )
        })
        .fallback(|uri: Uri| async move {
            ApiError::not_found(format!(
                "no such path {}; GET /openapi.json lists the API",
                uri.path()
            ))
        })
        .with_state(state)
}

/// Lets reads through; a write needs the configured token, compared in constant time.
async fn authorize(State(s): State<AdminState>, req: Request, next: Next) -> Response {
    let Some(token) = &s.admin_token else {
        return next.run(req).await;
    };
    if matches!(*req.method(), Method::GET | Method::HEAD) {
        return next.run(req).await;
    }
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim());
    let refusal = match presented {
        None => "this write needs `Authorization: Bearer <token>` with the admin_token Weir was started with (WEIR_ADMIN_TOKEN)",
        Some(t) if bool::from(t.as_bytes().ct_eq(token.expose().as_bytes())) => {
            return next.run(req).await;
        }
        Some(_) => "the bearer token is not the admin_token Weir was started with",
    };
    tracing::info!(method = %req.method(), path = %req.uri().path(), "admin write refused: {refusal}");
    let mut res = ApiError::new(StatusCode::UNAUTHORIZED, refusal).into_response();
    res.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    res
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

async fn readyz(State(s): State<AdminState>) -> (StatusCode, Json<serde_json::Value>) {
    let connected = s.client.connection_state() == async_nats::connection::State::Connected;
    let (joined_and_bound, bound, running) = s.ownership.ready();
    let ready = connected && joined_and_bound;
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
            "partitions": running,
        })),
    )
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn document() -> serde_json::Value {
        serde_json::from_str(OPENAPI).expect("openapi.json is JSON")
    }

    #[test]
    fn the_document_lists_exactly_the_routes() {
        let doc = document();
        assert_eq!(doc["openapi"], "3.1.0");
        let methods = ["get", "put", "post", "delete", "patch", "head", "options"];
        let documented: BTreeSet<(String, String)> = doc["paths"]
            .as_object()
            .expect("paths")
            .iter()
            .flat_map(|(path, ops)| {
                let ops = ops.as_object().expect("a path item");
                methods
                    .iter()
                    .filter(|m| ops.contains_key(**m))
                    .map(move |m| (m.to_uppercase(), path.clone()))
            })
            .collect();
        let routed: BTreeSet<(String, String)> = endpoints()
            .iter()
            .map(|e| (e.method.to_string(), e.path.to_string()))
            .collect();
        let undocumented: Vec<_> = routed.difference(&documented).collect();
        let unrouted: Vec<_> = documented.difference(&routed).collect();
        assert!(
            undocumented.is_empty() && unrouted.is_empty(),
            "routes missing from openapi.json: {undocumented:?}; documented but not routed: {unrouted:?}"
        );
    }

    #[test]
    fn every_reference_in_the_document_resolves() {
        let doc = document();
        fn refs(v: &serde_json::Value, out: &mut Vec<String>) {
            match v {
                serde_json::Value::Object(m) => {
                    if let Some(serde_json::Value::String(r)) = m.get("$ref") {
                        out.push(r.clone());
                    }
                    m.values().for_each(|v| refs(v, out));
                }
                serde_json::Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
                _ => {}
            }
        }
        let mut all = Vec::new();
        refs(&doc, &mut all);
        assert!(!all.is_empty());
        for r in all {
            let pointer = r.strip_prefix('#').expect("local references only");
            assert!(doc.pointer(pointer).is_some(), "{r} does not resolve");
        }
    }

    #[test]
    fn writes_are_marked_as_needing_the_token() {
        let doc = document();
        for e in endpoints() {
            let op = &doc["paths"][e.path][e.method.as_str().to_lowercase()];
            let secured = op.get("security").is_some_and(|s| s != &json!([]));
            let write = e.method != Method::GET;
            assert_eq!(secured, write, "{} {}: security", e.method, e.path);
        }
    }
}
