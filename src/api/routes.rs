//! The backend API's endpoints (see `docs/api/openapi.json`, served at
//! `GET /v1/openapi.json`).

use std::time::{Duration, Instant};

use actix_web::http::header::RETRY_AFTER;
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use berth_actors::address::Address;
use berth_actors::ids::SessionId;
use berth_actors::session::EndError;
use futures_util::StreamExt;
use serde_json::{json, Value};

use super::auth::Authorized;
use super::error::{ApiError, RETRY_AFTER_S};
use super::{deliver, idempotency, ApiState};

/// Longest user id in a path, in characters.
const MAX_USER_CHARS: usize = 256;
/// Deliveries of one user fan-out in flight at once.
const FAN_OUT: usize = 32;

/// The OpenAPI document of this API.
pub const OPENAPI: &str = include_str!("../../docs/api/openapi.json");

type Answer = Result<HttpResponse, ApiError>;

fn session_id(text: &str) -> Result<SessionId, ApiError> {
    SessionId::parse(text).ok_or_else(|| {
        ApiError::BadAddress("a session id is 22 characters of URL-safe base64".into())
    })
}

fn entity(st: &ApiState, kind: &str, key: &str) -> Result<Address, ApiError> {
    let to = Address::entity(kind, key).map_err(|e| ApiError::BadAddress(e.to_string()))?;
    if !st.node.host.knows(&to) {
        return Err(ApiError::UnknownKind(kind.to_owned()));
    }
    Ok(to)
}

/// The body as JSON, at most `limits.max_message_bytes` (read as it comes,
/// so a larger body is refused without being held).
async fn message(
    st: &ApiState,
    req: &HttpRequest,
    mut payload: web::Payload,
) -> Result<Value, ApiError> {
    let json = req
        .headers()
        .get(actix_web::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        return Err(ApiError::NotJson);
    }
    let limit = st.node.limits().max_message_bytes;
    let declared = req
        .headers()
        .get(actix_web::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::TooLarge(limit));
    }
    let mut buf = Vec::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ApiError::BadJson(e.to_string()))?;
        if buf.len() + chunk.len() > limit {
            return Err(ApiError::TooLarge(limit));
        }
        buf.extend_from_slice(&chunk);
    }
    serde_json::from_slice(&buf).map_err(|e| ApiError::BadJson(e.to_string()))
}

/// `POST /v1/sessions/{id}/messages`
pub async fn session_message(
    _: Authorized,
    st: web::Data<ApiState>,
    req: HttpRequest,
    id: web::Path<String>,
    payload: web::Payload,
) -> Answer {
    let to = Address::Session(session_id(&id)?);
    send(&st, &req, to, payload).await
}

/// `POST /v1/entities/{kind}/{key}/messages`
pub async fn entity_message(
    _: Authorized,
    st: web::Data<ApiState>,
    req: HttpRequest,
    path: web::Path<(String, String)>,
    payload: web::Payload,
) -> Answer {
    let to = entity(&st, &path.0, &path.1)?;
    send(&st, &req, to, payload).await
}

async fn send(st: &ApiState, req: &HttpRequest, to: Address, payload: web::Payload) -> Answer {
    let key = idempotency::of(req)?;
    let body = message(st, req, payload).await?;
    deliver::once(&st.node.router, &to, &key, &body, st.deadline).await?;
    Ok(HttpResponse::Ok().json(json!({ "delivered": true })))
}

/// `POST /v1/users/{user}/messages`: to every live session of the user
/// (see `berth_actors::users`), each once per key.
pub async fn user_message(
    _: Authorized,
    st: web::Data<ApiState>,
    req: HttpRequest,
    user: web::Path<String>,
    payload: web::Payload,
) -> Answer {
    let user = user.into_inner();
    if user.is_empty()
        || user.chars().count() > MAX_USER_CHARS
        || user.chars().any(char::is_control)
    {
        return Err(ApiError::BadUser(format!(
            "a user is 1 to {MAX_USER_CHARS} characters, none a control character"
        )));
    }
    let key = idempotency::of(&req)?;
    let body = message(&st, &req, payload).await?;
    let router = &st.node.router;
    let found = router.api_user_sessions(&user, st.peer_timeout).await;
    let results: Vec<(SessionId, Result<(), ApiError>)> =
        futures_util::stream::iter(found.sessions)
            .map(|(id, _member)| {
                let (key, body, st) = (&key, &body, &st);
                async move {
                    let to = Address::Session(id.clone());
                    let r = deliver::once(router, &to, key, body, st.deadline).await;
                    (id, r)
                }
            })
            .buffer_unordered(FAN_OUT)
            .collect()
            .await;
    let mut delivered = Vec::new();
    let mut failed = Vec::new();
    let mut retry = !found.unanswered.is_empty();
    for (id, r) in results {
        match r {
            Ok(()) => delivered.push(id.to_string()),
            Err(e) => {
                retry |= matches!(e, ApiError::Unavailable(_));
                failed.push(json!({ "session": id.to_string(), "error": e.body()["error"] }));
            }
        }
    }
    delivered.sort();
    let unanswered: Vec<Value> = found
        .unanswered
        .iter()
        .map(|u| json!({ "member": u.member.as_str(), "why": u.why }))
        .collect();
    let body = json!({
        "user": user,
        "delivered": delivered,
        "failed": failed,
        "unanswered_members": unanswered,
    });
    Ok(if retry {
        HttpResponse::ServiceUnavailable()
            .insert_header((RETRY_AFTER, RETRY_AFTER_S.to_string()))
            .json(body)
    } else {
        HttpResponse::Ok().json(body)
    })
}

/// `GET /v1/sessions/{id}`
pub async fn session_status(
    _: Authorized,
    st: web::Data<ApiState>,
    id: web::Path<String>,
) -> Answer {
    status(&st, Address::Session(session_id(&id)?)).await
}

/// `GET /v1/entities/{kind}/{key}`
pub async fn entity_status(
    _: Authorized,
    st: web::Data<ApiState>,
    path: web::Path<(String, String)>,
) -> Answer {
    let to = entity(&st, &path.0, &path.1)?;
    status(&st, to).await
}

/// `exists`: a checkpoint in the store; `live`: an actor in service on its
/// owner; `owner`: the ring's owner; `version`: the live actor's, else the
/// checkpoint's; `epoch`: the live activation's, else the store's.
async fn status(st: &ApiState, to: Address) -> Answer {
    let id = to.actor_id();
    let router = &st.node.router;
    let store = st.node.host.store();
    let unavailable = |e: String| ApiError::Unavailable(e);
    let ((stored, epoch), live) = futures_util::future::join(
        futures_util::future::join(store.peek(&id), store.epoch(&id)),
        router.api_status(&id, st.peer_timeout),
    )
    .await;
    let stored = stored.map_err(|e| unavailable(e.to_string()))?;
    let live = live.map_err(|u| unavailable(u.to_string()))?;
    let epoch = epoch.map_err(|e| unavailable(e.to_string()))?;
    let stored_version = stored
        .as_deref()
        .and_then(|b| berth_actors::codec::decode(b).ok())
        .map(|ck| ck.version);
    let (version, epoch) = match live {
        Some(s) => (Some(s.version), Some(s.epoch)),
        None => (stored_version, stored.as_ref().map(|_| epoch)),
    };
    Ok(HttpResponse::Ok().json(json!({
        "address": to.to_string(),
        "exists": stored.is_some(),
        "live": live.is_some(),
        "owner": router.owner_name(&id).as_str(),
        "version": version,
        "epoch": epoch,
    })))
}

/// `DELETE /v1/sessions/{id}`: the backend's `bye`.
pub async fn end_session(_: Authorized, st: web::Data<ApiState>, id: web::Path<String>) -> Answer {
    let id = session_id(&id)?;
    let until = Instant::now() + st.deadline;
    let mut wait = Duration::from_millis(50);
    loop {
        let why = match st.node.router.api_end(id.clone()).await {
            Ok(()) => return Ok(HttpResponse::Ok().json(json!({ "ended": true }))),
            Err(EndError::Gone) => return Err(ApiError::SessionNotFound),
            Err(EndError::Retry(why)) => why,
        };
        if Instant::now() + wait >= until {
            return Err(ApiError::Unavailable(format!(
                "not ended within api.retry_deadline_ms: {why}"
            )));
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(1));
    }
}

/// `GET /v1/openapi.json` (no key needed: it holds no secret).
pub async fn openapi() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(OPENAPI)
}

/// Any other path.
pub async fn no_route() -> HttpResponse {
    ApiError::NoRoute.error_response()
}

/// A known path with another method: 405 naming the ones it takes.
pub fn wrong_method(allow: &'static str) -> actix_web::Route {
    web::to(move || async move { ApiError::MethodNotAllowed(allow).error_response() })
}
