use std::sync::atomic::Ordering;

use actix_web::{web, HttpResponse};
use serde_json::json;

use super::AppState;

/// 200 while the process runs.
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// 200 only while the bus is connected and the replica is not draining (docs/PROTOCOL.md §16).
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    match not_ready(&state) {
        None => HttpResponse::Ok().json(json!({"ready": true})),
        Some(reason) => {
            HttpResponse::ServiceUnavailable().json(json!({"ready": false, "reason": reason}))
        }
    }
}

/// Why the replica is not ready, or `None` when it is.
pub fn not_ready(state: &AppState) -> Option<String> {
    if state.draining.load(Ordering::Acquire) {
        Some("draining".to_owned())
    } else {
        state.bus.readiness().err()
    }
}
