//! The backend API: a separate HTTP listener (`api.listen`, off by default,
//! never the public port) through which an application's backends push
//! messages to sessions, entities and every live session of a user, read an
//! actor's status and end a session, with bearer keys.
//!
//! Every message is applied once per `Idempotency-Key` and receiver: it
//! travels as the actors' own messages do, from `Sender::Backend(key)`, and
//! the receiver's watermark `api:<key>` is written with the handler's
//! effects (see [`deliver`]; docs/applications.md, "Sending from a
//! backend", states the window). `docs/api/openapi.json` describes every
//! endpoint and is served at `GET /v1/openapi.json`.
//!
//! # Layout
//! - [`config`]: `[api]` and its keys' three sources.
//! - [`auth`]: the keys (digests, constant-time check, SIGHUP rotation) and
//!   the `Authorized` extractor.
//! - [`idempotency`]: what an `Idempotency-Key` may be.
//! - [`deliver`]: one message to one actor, retried within the deadline.
//! - [`routes`]: the endpoints.
//! - [`error`]: every error answer, mapped to its status in one place.
//! - here: the listener, its routes and its metrics
//!   (`berth_api_requests_total{route,status}`,
//!   `berth_api_request_duration_seconds{route}`).
//!
//! The cluster side of each question (who owns what, the other members'
//! live sessions of a user) is `crate::route::api`.

pub mod auth;
pub mod config;
pub mod deliver;
pub mod error;
pub mod idempotency;
pub mod routes;

use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix_web::dev::{Service, ServiceResponse};
use actix_web::{web, App, HttpServer};

use crate::node::Node;

pub use self::config::ApiConfig;

/// What the API's handlers share.
pub struct ApiState {
    /// The node (its host, router, limits and keys).
    pub node: Arc<Node>,
    /// How long one request keeps retrying (`api.retry_deadline_ms`).
    pub deadline: Duration,
    /// How long a question to another member may take.
    pub peer_timeout: Duration,
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Registers the API's routes.
pub fn routes(cfg: &mut web::ServiceConfig) {
    use routes::wrong_method as wrong;
    cfg.service(
        web::resource("/v1/sessions/{id}/messages")
            .route(web::post().to(routes::session_message))
            .default_service(wrong("POST")),
    )
    .service(
        web::resource("/v1/entities/{kind}/{key}/messages")
            .route(web::post().to(routes::entity_message))
            .default_service(wrong("POST")),
    )
    .service(
        web::resource("/v1/users/{user}/messages")
            .route(web::post().to(routes::user_message))
            .default_service(wrong("POST")),
    )
    .service(
        web::resource("/v1/sessions/{id}")
            .route(web::get().to(routes::session_status))
            .route(web::delete().to(routes::end_session))
            .default_service(wrong("GET, DELETE")),
    )
    .service(
        web::resource("/v1/entities/{kind}/{key}")
            .route(web::get().to(routes::entity_status))
            .default_service(wrong("GET")),
    )
    .service(
        web::resource("/v1/openapi.json")
            .route(web::get().to(routes::openapi))
            .default_service(wrong("GET")),
    )
    .default_service(web::to(routes::no_route));
}

/// Counts an answered request by its route pattern (bounded labels).
fn record(res: &ServiceResponse, started: Instant) {
    let route = format!(
        "{} {}",
        res.request().method(),
        res.request()
            .match_pattern()
            .unwrap_or_else(|| "unmatched".to_owned())
    );
    let status = res.status().as_u16().to_string();
    metrics::counter!("berth_api_requests_total", "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("berth_api_request_duration_seconds", "route" => route)
        .record(started.elapsed().as_secs_f64());
}

/// The API's HTTP server on `listener` (one worker: the work is in the
/// actors and on the peer links, not here).
pub fn server(
    node: web::Data<Node>,
    listener: TcpListener,
    shutdown_timeout_s: u64,
) -> std::io::Result<actix_web::dev::Server> {
    let state = web::Data::new(ApiState {
        deadline: Duration::from_millis(node.cfg.api.retry_deadline_ms),
        peer_timeout: Duration::from_millis(node.cfg.cluster.peer_timeout_ms),
        node: node.into_inner(),
    });
    Ok(HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .wrap_fn(|req, srv| {
                let started = Instant::now();
                let fut = srv.call(req);
                async move {
                    let res = fut.await?;
                    record(&res, started);
                    Ok(res)
                }
            })
            .configure(routes)
    })
    .workers(1)
    .disable_signals()
    .shutdown_timeout(shutdown_timeout_s)
    .listen(listener)?
    .run())
}
