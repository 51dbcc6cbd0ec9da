//! The one middleware that counts HTTP API requests (`confab_api_requests_total`, by endpoint
//! and status) and logs their refusals, so the handlers only answer.

use actix_web::body::BoxBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::{from_fn, Next};
use actix_web::{web, Route};

use super::{AppState, HttpError};

/// `route`, counted under `endpoint` (the metric's `endpoint` label).
pub fn counted(route: Route, endpoint: &'static str) -> Route {
    route.wrap(from_fn(move |req, next| count(endpoint, req, next)))
}

async fn count(
    endpoint: &'static str,
    req: ServiceRequest,
    next: Next<BoxBody>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let state = req.app_data::<web::Data<AppState>>().cloned();
    let res = next.call(req).await?;
    let status = res.status();
    // A refusal carries its HttpError: ours (5xx) are worth a warning, a client's are not.
    if let Some(e) = res
        .response()
        .error()
        .and_then(|e| e.as_error::<HttpError>())
    {
        if status.is_server_error() {
            log::warn!("api {endpoint}: {e}");
        } else {
            log::debug!("api {endpoint} refused: {e}");
        }
    }
    if let Some(state) = state {
        state.metrics.api_request(endpoint, status.as_u16());
    }
    Ok(res)
}
