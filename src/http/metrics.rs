//! `GET /metrics`: the replica's metrics in the Prometheus text format.

use actix_web::{web, HttpResponse, ResponseError};

use super::{health, AppState, HttpError};

pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    // Readiness is a state, not an event: read it when scraped rather than tracking each
    // change of the bus and the drain flag.
    let ready = health::not_ready(&state).is_none();
    state.metrics.ready.set(i64::from(ready));
    match state.metrics.render() {
        Ok(text) => HttpResponse::Ok()
            .content_type("text/plain; version=0.0.4; charset=utf-8")
            .body(text),
        Err(e) => {
            log::error!("cannot render metrics: {e}");
            HttpError::Internal("cannot render metrics".into()).error_response()
        }
    }
}
