//! The HTTP/JSON routes (see the crate doc for each) and the one mapping of cluster errors to
//! HTTP statuses ([`ApiError`]).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Map, Value};
use syncline_client::{Code, Error, Table};

use crate::clients::Clients;
use crate::json::{decode, put_bytes, RecordIn};

/// Largest request body: a value, or a records array.
pub const BODY_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Records one POST may carry.
pub const RECORDS_PER_POST_MAX: usize = 10_000;

/// What the routes share.
#[derive(Debug)]
pub struct Gateway {
    /// The cluster.
    pub clients: Clients,
    /// The tables being watched (`crate::watch`).
    pub tables: crate::watch::Tables,
    /// Per-subscriber bounds.
    pub limits: Limits,
    /// Web origins allowed to open a WebSocket besides the gateway's own (`--allow-origin`).
    pub origins: Vec<String>,
}

/// Refuses a browser request made from another site: a WebSocket upgrade whose `Origin` is
/// neither the gateway's own (its `Host`) nor one of `allowed` (`*` allows any). Browsers
/// send `Origin` on every WebSocket and cannot forge it; other clients send none and are not
/// concerned. Without this, any page a user visits could open a socket to a gateway on their
/// machine or network and act with the gateway's own `--token`.
pub(crate) fn check_origin(headers: &HeaderMap, allowed: &[String]) -> Result<(), ApiError> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let origin = origin.to_str().unwrap_or("");
    if allowed
        .iter()
        .any(|a| a == "*" || a.eq_ignore_ascii_case(origin))
    {
        return Ok(());
    }
    let origin_host = origin
        .split_once("://")
        .map_or("", |(_, rest)| rest.trim_end_matches('/'));
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if !origin_host.is_empty() && origin_host.eq_ignore_ascii_case(host) {
        return Ok(());
    }
    Err(ApiError {
        status: StatusCode::FORBIDDEN,
        body: json!({
            "error": format!(
                "a page from `{origin}` may not use this gateway: start it with `--allow-origin {origin}` to allow it"
            ),
            "code": "PERMISSION_DENIED",
        }),
    })
}

/// How far a subscriber may fall behind before it is disconnected (it then resumes from its
/// last token).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Events buffered per subscription (SSE stream or WebSocket subscription).
    pub subscriber_events: usize,
    /// Frames buffered per WebSocket.
    pub socket_frames: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            subscriber_events: crate::watch::SUBSCRIBER_BUFFER,
            socket_frames: crate::ws::SOCKET_BUFFER,
        }
    }
}

/// The gateway's routes over `gateway`.
pub fn router(gateway: Arc<Gateway>) -> Router {
    Router::new()
        .route("/v1/cluster", get(crate::admin::cluster))
        .route("/v1/groups", get(crate::admin::groups))
        .route("/v1/groups/{group}", get(crate::admin::group))
        .route("/v1/topics", get(list_topics))
        .route("/v1/topics/{topic}", get(crate::admin::topic))
        .route("/v1/topics/{topic}/records", post(post_records))
        .route("/v1/watch/{topic}", get(crate::watch::watch))
        .route("/v1/ws", get(crate::ws::ws))
        .route(
            "/v1/tables/{topic}/{key}",
            get(get_key).put(put_key).delete(delete_key),
        )
        .merge(crate::console::routes())
        .layer(DefaultBodyLimit::max(BODY_BYTES_MAX))
        .with_state(gateway)
}

/// An error answered as `{"error": MESSAGE, "code": GRPC_CODE}` with its HTTP status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: Value,
}

impl ApiError {
    pub(crate) fn not_found(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            body: json!({"error": message.into(), "code": "NOT_FOUND"}),
        }
    }

    /// The HTTP status and the JSON body.
    pub(crate) fn parts(self) -> (u16, Value) {
        (self.status.as_u16(), self.body)
    }

    /// A conflict's answer with the key's current value: `current_version` and
    /// `current_value` (null for an absent key) from one read after the refused write, so the
    /// pair is consistent (and may be newer than the version the write was refused at). Other
    /// errors, or a read that fails, are answered as they are.
    pub(crate) async fn with_current_value(mut self, table: &Table, key: &[u8]) -> ApiError {
        if self.status != StatusCode::PRECONDITION_FAILED {
            return self;
        }
        let Ok(entry) = table.get(key).await else {
            return self;
        };
        if let Value::Object(body) = &mut self.body {
            body.remove("current_value_encoding");
            match entry {
                Some(entry) => {
                    body.insert("current_version".into(), json!(entry.version));
                    put_bytes(body, "current_value", Some(&entry.value));
                }
                None => {
                    body.insert("current_version".into(), Value::Null);
                    body.insert("current_value".into(), Value::Null);
                }
            }
        }
        self
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            body: json!({"error": message.into(), "code": "INVALID_ARGUMENT"}),
        }
    }
}

impl From<Error> for ApiError {
    fn from(error: Error) -> ApiError {
        if let Error::Conflict { current, .. } = &error {
            return ApiError {
                status: StatusCode::PRECONDITION_FAILED,
                body: json!({"error": error.to_string(), "current_version": current}),
            };
        }
        let code = error.code();
        let status = match code {
            Some(Code::NotFound) => StatusCode::NOT_FOUND,
            Some(Code::PermissionDenied) => StatusCode::FORBIDDEN,
            Some(Code::Unauthenticated) => StatusCode::UNAUTHORIZED,
            Some(Code::InvalidArgument) | Some(Code::OutOfRange) => StatusCode::BAD_REQUEST,
            Some(Code::AlreadyExists) => StatusCode::CONFLICT,
            Some(Code::FailedPrecondition) => StatusCode::CONFLICT,
            Some(Code::ResourceExhausted) => StatusCode::TOO_MANY_REQUESTS,
            Some(Code::Unavailable) | Some(Code::DeadlineExceeded) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            _ => match error {
                Error::RecordTooLarge { .. } | Error::TooManyHeaders { .. } => {
                    StatusCode::PAYLOAD_TOO_LARGE
                }
                Error::DeliveryTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
                _ => StatusCode::BAD_GATEWAY,
            },
        };
        let code = code.map_or("UNKNOWN".to_string(), |c| {
            format!("{c:?}").chars().fold(String::new(), |mut out, ch| {
                if ch.is_uppercase() && !out.is_empty() {
                    out.push('_');
                }
                out.push(ch.to_ascii_uppercase());
                out
            })
        });
        ApiError {
            status,
            body: json!({"error": error.to_string(), "code": code}),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

/// The caller's bearer token, if it sent one.
/// The cluster as the caller of a request reaches it: with its bearer token, else the
/// gateway's own credentials.
pub(crate) async fn caller_client(
    gateway: &Gateway,
    headers: &HeaderMap,
) -> Result<syncline_client::Client, ApiError> {
    let token = token(headers)?;
    Ok(gateway.clients.client(token.as_deref()).await?)
}

pub(crate) fn token(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| ApiError::bad_request("the Authorization header is not text"))?;
    let token = text
        .strip_prefix("Bearer ")
        .or_else(|| text.strip_prefix("bearer "))
        .ok_or_else(|| ApiError::bad_request("the Authorization header is not `Bearer TOKEN`"))?;
    Ok(Some(token.trim().to_string()))
}

/// The key of a table path: its UTF-8 text, or with `?encoding=base64` the bytes it encodes.
fn path_key(key: &str, query: Option<&str>) -> Result<Vec<u8>, ApiError> {
    let encoding = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|pair| pair.strip_prefix("encoding="));
    decode(key, encoding, "key").map_err(ApiError::bad_request)
}

/// A version from `If-Match` (`5` or the ETag form `"5"`).
fn if_match(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(value) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let text = value.to_str().unwrap_or("").trim().trim_matches('"');
    text.parse().map(Some).map_err(|_| {
        ApiError::bad_request(format!(
            "If-Match must be a version (an integer, as the ETag gives it), not `{text}`"
        ))
    })
}

/// What a write expects: `If-Match: N` (version N), `If-None-Match: *` (absent), or nothing.
enum Condition {
    None,
    Version(u64),
    Absent,
}

fn condition(headers: &HeaderMap) -> Result<Condition, ApiError> {
    let version = if_match(headers)?;
    let absent = match headers.get(header::IF_NONE_MATCH) {
        None => false,
        Some(value) if value.as_bytes() == b"*" => true,
        Some(_) => {
            return Err(ApiError::bad_request(
                "If-None-Match takes only `*` (write only where the key is absent)",
            ))
        }
    };
    match (version, absent) {
        (Some(_), true) => Err(ApiError::bad_request(
            "give If-Match or If-None-Match, not both",
        )),
        (Some(version), false) => Ok(Condition::Version(version)),
        (None, true) => Ok(Condition::Absent),
        (None, false) => Ok(Condition::None),
    }
}

fn etag(version: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{version}\"")).unwrap_or(HeaderValue::from_static("\"\""))
}

async fn table(gateway: &Gateway, token: Option<&str>, topic: &str) -> Result<Table, ApiError> {
    gateway
        .clients
        .table(token, topic)
        .await
        .map_err(ApiError::from)
}

/// Forgets the caller's handle on a topic that went away, then answers the error.
fn failed(gateway: &Gateway, token: Option<&str>, topic: &str, error: Error) -> ApiError {
    if error.code() == Some(Code::NotFound) {
        gateway.clients.forget(token, topic);
    }
    ApiError::from(error)
}

async fn list_topics(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let client = caller_client(&gateway, &headers).await?;
    let topics: Vec<Value> = client
        .list_topics()
        .await?
        .into_iter()
        .map(|t| {
            json!({
                "name": t.name,
                "partitions": t.partitions,
                "table": t.cleanup_policy == syncline_client::CleanupPolicy::Compact,
            })
        })
        .collect();
    Ok(Json(json!({ "topics": topics })))
}

async fn get_key(
    State(gateway): State<Arc<Gateway>>,
    Path((topic, key)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let token = token(&headers)?;
    let key = path_key(&key, query.as_deref())?;
    let table = table(&gateway, token.as_deref(), &topic).await?;
    let entry = table
        .get(&key)
        .await
        .map_err(|e| failed(&gateway, token.as_deref(), &topic, e))?;
    let Some(entry) = entry else {
        return Err(ApiError::not_found("no such key"));
    };
    let mut object = Map::new();
    put_bytes(&mut object, "key", Some(&key));
    put_bytes(&mut object, "value", Some(&entry.value));
    object.insert("version".into(), json!(entry.version));
    let mut response = Json(Value::Object(object)).into_response();
    response
        .headers_mut()
        .insert(header::ETAG, etag(entry.version));
    Ok(response)
}

async fn put_key(
    State(gateway): State<Arc<Gateway>>,
    Path((topic, key)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    write_key(gateway, topic, key, query, headers, Some(body)).await
}

async fn delete_key(
    State(gateway): State<Arc<Gateway>>,
    Path((topic, key)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    write_key(gateway, topic, key, query, headers, None).await
}

/// A put (`value`) or delete (None), conditional as the headers say.
async fn write_key(
    gateway: Arc<Gateway>,
    topic: String,
    key: String,
    query: Option<String>,
    headers: HeaderMap,
    value: Option<Bytes>,
) -> Result<Response, ApiError> {
    let token = token(&headers)?;
    let key = path_key(&key, query.as_deref())?;
    let condition = condition(&headers)?;
    let table = table(&gateway, token.as_deref(), &topic).await?;
    let written = match (condition, &value) {
        (Condition::None, Some(value)) => table.put(&key, value).await,
        (Condition::None, None) => table.delete(&key).await,
        (Condition::Version(version), Some(value)) => table.put_if(&key, value, version).await,
        (Condition::Version(version), None) => table.delete_if(&key, version).await,
        (Condition::Absent, Some(value)) => table.put_if_absent(&key, value).await,
        (Condition::Absent, None) => {
            return Err(ApiError::bad_request(
                "If-None-Match: * on a DELETE: a key that is absent has nothing to delete",
            ))
        }
    };
    let written = match written {
        Ok(written) => written,
        Err(error) => {
            let error = failed(&gateway, token.as_deref(), &topic, error);
            return Err(error.with_current_value(&table, &key).await);
        }
    };
    let mut response = Json(json!({ "version": written.version })).into_response();
    response
        .headers_mut()
        .insert(header::ETAG, etag(written.version));
    Ok(response)
}

async fn post_records(
    State(gateway): State<Arc<Gateway>>,
    Path(topic): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let token = token(&headers)?;
    // A JSON content type makes a browser's cross-site POST need a CORS preflight (which this
    // gateway does not grant), so another site's page cannot write records through it.
    let json_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .to_ascii_lowercase()
                .starts_with("application/json")
        });
    if !json_type {
        return Err(ApiError {
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            body: json!({
                "error": "send the records as `Content-Type: application/json`",
                "code": "INVALID_ARGUMENT",
            }),
        });
    }
    let records: Vec<RecordIn> = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!(
            "the body must be a JSON array of {{\"key\", \"value\"}} objects: {e}"
        ))
    })?;
    if records.is_empty() {
        return Err(ApiError::bad_request("the body holds no record"));
    }
    if records.len() > RECORDS_PER_POST_MAX {
        return Err(ApiError::bad_request(format!(
            "{} records in one request: at most {RECORDS_PER_POST_MAX}",
            records.len()
        )));
    }
    let mut decoded = Vec::with_capacity(records.len());
    for (index, record) in records.iter().enumerate() {
        decoded.push(
            record
                .bytes()
                .map_err(|e| ApiError::bad_request(format!("record {index}: {e}")))?,
        );
    }
    let producer = gateway
        .clients
        .producer(token.as_deref(), &topic)
        .await
        .map_err(|e| failed(&gateway, token.as_deref(), &topic, e))?;
    // Enqueued in order, then awaited: the records share batches.
    let mut pending = Vec::with_capacity(decoded.len());
    for (key, value) in &decoded {
        let delivery = producer
            .enqueue(key.as_deref(), value.as_deref(), &[])
            .await
            .map_err(|e| failed(&gateway, token.as_deref(), &topic, e))?;
        pending.push(delivery);
    }
    let mut out = Vec::with_capacity(pending.len());
    for delivery in pending {
        let delivery = delivery
            .await
            .map_err(|e| failed(&gateway, token.as_deref(), &topic, e))?;
        out.push(json!({"partition": delivery.partition, "offset": delivery.offset}));
    }
    Ok(Json(json!({ "records": out })))
}
