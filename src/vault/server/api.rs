//! Request handling: authenticate, check `api-version`, route, read and parse the body, call
//! the vault (on tokio's blocking pool: store I/O and RSA), and shape the answer. One fallback
//! handler does the routing by hand so that trailing slashes and empty versions
//! (`/keys/k/`, `/keys/k//wrapkey`, as the Azure SDKs send them) and the error bodies of
//! unknown paths are under our control.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use http_body_util::BodyExt as _;
use serde::de::DeserializeOwned;
use serde::Serialize;
use zeroize::Zeroizing;

use super::jwk;
use super::throttle::Throttle;
use super::wire::{
    DeletedKeyBundle, DeletedKeyItem, ErrorBody, ErrorEnvelope, InnerError, KeyAttributes,
    KeyAttributesUpdate, KeyBundle, KeyCreateParameters, KeyImportParameters, KeyItem,
    KeyOperationParameters, KeyOperationResult, KeyUpdateParameters, Page, WatchResult,
    API_VERSIONS, WRAP_ALG_TAG,
};
use crate::vault::local::LocalVault;
use crate::vault::{
    default_key_ops, CreateKeyOptions, DeletedKeyInfo, DenyReason, ImportKeyOptions, KeyId,
    KeyInfo, KeyUpdate, Vault, VaultError, WrapAlg,
};

/// Bytes of an oversized body the server still reads (and drops) before answering 400, so
/// that a client that sends its whole body before reading gets the answer, not a reset.
const DRAIN_LIMIT: usize = 1024 * 1024;
/// Default and largest long-poll wait of `GET /cmkfs/watch`.
const WATCH_DEFAULT: Duration = Duration::from_secs(25);
const WATCH_MAX: Duration = Duration::from_secs(60);

/// Shared by all requests.
pub(super) struct AppState {
    store: PathBuf,
    /// The server's own URL: key ids and the 401 challenge.
    url: String,
    max_body: usize,
    body_timeout: Duration,
    generation: tokio::sync::watch::Receiver<u64>,
    shutdown: tokio::sync::watch::Sender<bool>,
    throttle: Throttle,
}

impl AppState {
    pub(super) fn new(
        store: PathBuf,
        url: String,
        max_body: usize,
        body_timeout: Duration,
        generation: tokio::sync::watch::Receiver<u64>,
        throttle: Throttle,
    ) -> AppState {
        AppState {
            store,
            url: url.trim_end_matches('/').to_string(),
            max_body,
            body_timeout,
            generation,
            shutdown: tokio::sync::watch::channel(false).0,
            throttle,
        }
    }

    pub(super) fn store(&self) -> &Path {
        &self.store
    }

    /// Makes long polls answer now (graceful shutdown must not wait for them).
    pub(super) fn shutting_down(&self) {
        self.shutdown.send_replace(true);
    }
}

/// The store's change counter as a channel: a thread re-reads the `generation` file when
/// inotify says it was replaced, and once a second in any case (so a failed inotify only
/// slows pushes down to that).
pub(super) fn generation_channel(owner: &LocalVault) -> tokio::sync::watch::Receiver<u64> {
    let first = owner.generation().unwrap_or(0);
    let (tx, rx) = tokio::sync::watch::channel(first);
    let store = owner.store_dir().to_path_buf();
    let path = owner.generation_path();
    let spawned = std::thread::Builder::new()
        .name("cmkfs-vault-generation".into())
        .spawn(move || {
            let events = match crate::vault::watch::watch_file(&path) {
                Ok(rx) => Some(rx),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch the vault store; polling it");
                    None
                }
            };
            let Ok(vault) = LocalVault::open(&store) else {
                return;
            };
            loop {
                match &events {
                    Some(ev) => match ev.recv_timeout(Duration::from_secs(1)) {
                        Ok(()) | Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                            std::thread::sleep(Duration::from_secs(1));
                        }
                    },
                    None => std::thread::sleep(Duration::from_millis(250)),
                }
                if tx.is_closed() {
                    return;
                }
                if let Ok(g) = vault.generation() {
                    tx.send_if_modified(|cur| {
                        let changed = *cur != g;
                        *cur = g;
                        changed
                    });
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the generation watcher; pushes are off");
    }
    rx
}

/// A failed request: status, Key Vault error code, message, inner code.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    inner: Option<&'static str>,
    /// `Retry-After` of a 429.
    retry_after: Option<Duration>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            inner: None,
            retry_after: None,
        }
    }

    fn inner(mut self, inner: &'static str) -> ApiError {
        self.inner = Some(inner);
        self
    }

    fn bad(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "BadParameter", message)
    }

    fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "Unauthorized", message)
    }

    fn throttled(retry: Duration) -> ApiError {
        ApiError {
            retry_after: Some(retry),
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "Throttled",
                format!(
                    "Request was not processed because too many failed sign-ins were received: \
                     retry after {} s",
                    retry.as_secs().max(1)
                ),
            )
        }
    }

    fn internal() -> ApiError {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalServerError",
            "the vault server failed (see its log)",
        )
    }

    /// Key Vault's status and codes for a vault error. Store and availability problems are
    /// logged here and answered without detail (paths of the server are nobody's business).
    fn from_vault(e: VaultError) -> ApiError {
        use StatusCode as S;
        let msg = e.to_string();
        match &e {
            VaultError::Denied { reason, .. } => match reason {
                DenyReason::KeyDisabled => {
                    ApiError::new(S::FORBIDDEN, "Forbidden", msg).inner("KeyDisabled")
                }
                DenyReason::KeyExpired => {
                    ApiError::new(S::FORBIDDEN, "Forbidden", msg).inner("KeyExpired")
                }
                DenyReason::PermissionDenied => {
                    ApiError::new(S::FORBIDDEN, "Forbidden", msg).inner("AccessDenied")
                }
                DenyReason::OperationNotAllowed => {
                    ApiError::new(S::FORBIDDEN, "Forbidden", msg).inner("OperationNotAllowed")
                }
                // Key Vault answers 404 for a soft-deleted key's name under /keys; the inner
                // code tells cmkfs clients which of the two it is.
                DenyReason::KeyDeleted => {
                    ApiError::new(S::NOT_FOUND, "KeyNotFound", msg).inner("KeyDeleted")
                }
                DenyReason::KeyPurged => {
                    ApiError::new(S::NOT_FOUND, "KeyNotFound", msg).inner("KeyPurged")
                }
            },
            VaultError::NotFound(_) => ApiError::new(S::NOT_FOUND, "KeyNotFound", msg),
            VaultError::Conflict(_) => ApiError::new(S::CONFLICT, "Conflict", msg),
            VaultError::Invalid(_) => ApiError::bad(msg),
            VaultError::UnwrapFailed { .. } => ApiError::bad(msg).inner("UnwrapFailed"),
            VaultError::Unavailable(_) => {
                tracing::error!(error = %e, "vault store unavailable");
                ApiError::new(
                    S::SERVICE_UNAVAILABLE,
                    "ServiceUnavailable",
                    "the vault store is unavailable (see the server's log)",
                )
            }
            // The store never answers NotConfigured (a client-side refusal); if it did, it
            // would be a bug of the server.
            VaultError::Store(_) | VaultError::NotConfigured { .. } => {
                tracing::error!(error = %e, "vault store error");
                ApiError::internal()
            }
        }
    }

    fn into_response(self, base: &str) -> Response {
        let body = ErrorEnvelope {
            error: ErrorBody {
                code: self.code.to_string(),
                message: self.message,
                // Always present: the specific reason, or the code again when there is none.
                innererror: Some(InnerError {
                    code: self.inner.unwrap_or(self.code).to_string(),
                }),
            },
        };
        let mut resp = json(self.status, &body);
        if let Some(r) = self.retry_after {
            let secs = r.as_secs() + u64::from(r.subsec_nanos() > 0);
            if let Ok(v) = HeaderValue::from_str(&secs.max(1).to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        if self.status == StatusCode::UNAUTHORIZED {
            // Key Vault's challenge: where tokens come from and what they are for. No `=` or
            // `,` may appear inside the values (the Azure SDKs split on them).
            let challenge =
                format!("Bearer authorization=\"{base}/identities\", resource=\"{base}\"");
            if let Ok(v) = HeaderValue::from_str(&challenge) {
                resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
            }
        }
        resp
    }
}

impl From<VaultError> for ApiError {
    fn from(e: VaultError) -> ApiError {
        ApiError::from_vault(e)
    }
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => (
            status,
            [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
            body,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// Handles one request (the connection task in [`super::conn`] calls it).
pub(super) async fn handle(st: Arc<AppState>, req: Request) -> Response {
    use tracing::Instrument as _;
    let (parts, body) = req.into_parts();
    let client = parts
        .extensions
        .get::<super::conn::ClientAddr>()
        .map(|c| c.0.ip());
    let request_id = hex::encode(rand_bytes());
    let method = parts.method.clone();
    let path = parts.uri.path().to_string();
    let span = tracing::info_span!("request", id = %request_id);
    let base = st.url.clone();
    let mut resp = match dispatch(&st, &base, &parts, body, client)
        .instrument(span.clone())
        .await
    {
        Ok(r) => r,
        Err(mut e) => {
            if e.status.is_server_error() {
                // The cause went to the server log in this request's span: point at it.
                e.message = format!("{} (request {request_id})", e.message);
            }
            e.into_response(&base)
        }
    };
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert("x-ms-request-id", v);
    }
    // Never the query or headers: no tokens in logs.
    span.in_scope(|| {
        tracing::debug!(%method, %path, status = resp.status().as_u16(), client = ?client, "request")
    });
    resp
}

fn rand_bytes() -> [u8; 8] {
    let mut b = [0u8; 8];
    let _ = getrandom::getrandom(&mut b);
    b
}

/// The routes of the keys API.
#[derive(Debug, PartialEq, Eq)]
enum Route<'a> {
    ListKeys,
    Create(&'a str),
    Import(&'a str),
    Get(&'a str, Option<&'a str>),
    Versions(&'a str),
    Update(&'a str, Option<&'a str>),
    Delete(&'a str),
    Rotate(&'a str),
    Wrap(&'a str, Option<&'a str>),
    Unwrap(&'a str, Option<&'a str>),
    ListDeleted,
    GetDeleted(&'a str),
    Recover(&'a str),
    Purge(&'a str),
    Watch,
}

fn version(v: &str) -> Option<&str> {
    (!v.is_empty()).then_some(v)
}

impl<'a> Route<'a> {
    fn parse(method: &Method, segs: &[&'a str]) -> Option<Route<'a>> {
        let m = method.as_str();
        Some(match (m, segs) {
            ("GET", ["keys"] | ["keys", ""]) => Route::ListKeys,
            ("POST", ["keys", n, "create"]) => Route::Create(n),
            ("PUT", ["keys", n]) => Route::Import(n),
            ("GET", ["keys", n] | ["keys", n, ""]) => Route::Get(n, None),
            ("GET", ["keys", n, "versions"]) => Route::Versions(n),
            ("GET", ["keys", n, v]) => Route::Get(n, Some(v)),
            ("PATCH", ["keys", n] | ["keys", n, ""]) => Route::Update(n, None),
            ("PATCH", ["keys", n, v]) => Route::Update(n, Some(v)),
            ("DELETE", ["keys", n]) => Route::Delete(n),
            ("POST", ["keys", n, "rotate"]) => Route::Rotate(n),
            ("POST", ["keys", n, v, "wrapkey"]) => Route::Wrap(n, version(v)),
            ("POST", ["keys", n, v, "unwrapkey"]) => Route::Unwrap(n, version(v)),
            ("GET", ["deletedkeys"] | ["deletedkeys", ""]) => Route::ListDeleted,
            ("GET", ["deletedkeys", n]) => Route::GetDeleted(n),
            ("DELETE", ["deletedkeys", n]) => Route::Purge(n),
            ("POST", ["deletedkeys", n, "recover"]) => Route::Recover(n),
            ("GET", ["cmkfs", "watch"]) => Route::Watch,
            _ => return None,
        })
    }

    fn has_body(&self) -> bool {
        matches!(
            self,
            Route::Create(_)
                | Route::Import(_)
                | Route::Update(..)
                | Route::Wrap(..)
                | Route::Unwrap(..)
        )
    }
}

fn query(q: Option<&str>) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for pair in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        out.insert(
            crate::vault::percent_decode(k, true),
            crate::vault::percent_decode(v, true),
        );
    }
    out
}

/// `Authorization: Bearer <identity>.<secret>` → a connection as that identity, within the
/// failed sign-in limits of [`super::throttle`].
async fn authenticate(
    st: &AppState,
    headers: &HeaderMap,
    client: Option<std::net::IpAddr>,
) -> Result<Arc<LocalVault>, ApiError> {
    if let Some(wait) = client.and_then(|ip| st.throttle.address_blocked(ip)) {
        return Err(ApiError::throttled(wait));
    }
    // No token at all is how the Azure SDKs ask for the challenge: not a failed sign-in.
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err(ApiError::unauthorized(
            "this request needs a bearer token (Authorization: Bearer <token>)",
        ));
    };
    let text = value.to_str().unwrap_or("");
    let token = match text.split_once(' ') {
        Some((scheme, t)) if scheme.eq_ignore_ascii_case("bearer") => t.trim(),
        _ => "",
    };
    let (identity, secret) = token.split_once('.').unwrap_or(("", ""));
    let (identity, secret) = (identity.to_string(), Zeroizing::new(secret.to_string()));
    let identity_blocked = st.throttle.identity_blocked(&identity);
    let conn = if identity.is_empty() {
        Err(VaultError::Invalid("malformed bearer token".into()))
    } else {
        let store = st.store.clone();
        let who = identity.clone();
        let audit = identity_blocked.is_none();
        tokio::task::spawn_blocking(move || {
            LocalVault::open_as_client(&store, &who, &secret, client, audit)
        })
        .await
        .map_err(|_| ApiError::internal())?
    };
    match conn {
        Ok(v) => Ok(Arc::new(v)),
        Err(VaultError::Denied { .. }) | Err(VaultError::Invalid(_)) => {
            if let Some(wait) = identity_blocked {
                return Err(ApiError::throttled(wait));
            }
            if let Some(ip) = client {
                let f = st.throttle.failed(ip, &identity);
                if f.throttled_now {
                    let (store, who) = (st.store.clone(), identity.clone());
                    let secs = st.throttle.refill().as_secs().max(1);
                    tracing::warn!(client = %ip, identity = %who, "failed sign-ins throttled");
                    let _ = tokio::task::spawn_blocking(move || {
                        LocalVault::audit_sign_in_throttled(
                            &store,
                            &who,
                            Some(ip),
                            format!(
                                "too many failed sign-ins from {ip} or for identity {who}: \
                                 further ones are answered 429 and not logged one by one \
                                 (one more is allowed every {secs} s)"
                            ),
                        )
                    })
                    .await;
                }
            }
            if text.is_empty() || token.is_empty() {
                return Err(ApiError::unauthorized("only bearer tokens are accepted"));
            }
            Err(ApiError::unauthorized(
                "the bearer token is not valid for this vault (unknown identity, or its credential was replaced)",
            ))
        }
        Err(e) => Err(ApiError::from_vault(e)),
    }
}

/// Reads a body of at most `limit` bytes within `deadline` (a slow client is cut off).
async fn read_body(
    body: Body,
    headers: &HeaderMap,
    limit: usize,
    deadline: Duration,
) -> Result<Vec<u8>, ApiError> {
    tokio::time::timeout(deadline, read_body_inner(body, headers, limit))
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "RequestTimeout",
                format!(
                    "the request body did not arrive within {} s",
                    deadline.as_secs()
                ),
            )
        })?
}

async fn read_body_inner(
    body: Body,
    headers: &HeaderMap,
    limit: usize,
) -> Result<Vec<u8>, ApiError> {
    let too_large = || ApiError::bad(format!("the request body is larger than {limit} bytes"));
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > DRAIN_LIMIT as u64) {
        return Err(too_large());
    }
    let mut body = body;
    let mut buf = Vec::new();
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| ApiError::bad("cannot read the request body"))?;
        if let Ok(data) = frame.into_data() {
            total = total.saturating_add(data.len());
            if total > DRAIN_LIMIT {
                break;
            }
            if total <= limit {
                buf.extend_from_slice(&data);
            }
        }
    }
    if total > limit {
        return Err(too_large());
    }
    Ok(buf)
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::bad("the request needs a JSON body"));
    }
    serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("malformed JSON body: {e}")))
}

fn decode_b64url(value: &str) -> Result<Zeroizing<Vec<u8>>, ApiError> {
    // Key Vault sends base64url without padding; tolerate padding, refuse anything else.
    URL_SAFE_NO_PAD
        .decode(value.trim_end_matches('='))
        .map(Zeroizing::new)
        .map_err(|_| ApiError::bad("`value` is not base64url"))
}

fn parse_alg(alg: &str) -> Result<WrapAlg, ApiError> {
    alg.parse::<WrapAlg>().map_err(|_| {
        ApiError::bad(format!(
            "unsupported algorithm {alg:?}: use RSA-OAEP-256 or RSA-OAEP"
        ))
    })
}

fn wrap_alg_tag(
    tags: &Option<std::collections::BTreeMap<String, String>>,
) -> Result<Option<WrapAlg>, ApiError> {
    match tags.as_ref().and_then(|t| t.get(WRAP_ALG_TAG)) {
        Some(a) => parse_alg(a).map(Some),
        None => Ok(None),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, VaultError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| ApiError::internal())?
        .map_err(ApiError::from_vault)
}

fn kid(base: &str, name: &str, version: &str) -> String {
    format!("{base}/keys/{name}/{version}")
}

fn attributes(k: &KeyInfo) -> KeyAttributes {
    KeyAttributes {
        enabled: Some(k.enabled),
        nbf: k.nbf,
        exp: k.exp,
        created: Some(k.created),
        updated: Some(k.updated),
        recovery_level: Some(k.recovery_level.clone()),
        recoverable_days: Some(k.recoverable_days),
        exportable: Some(false),
    }
}

fn tags(k: &KeyInfo) -> std::collections::BTreeMap<String, String> {
    [(WRAP_ALG_TAG.to_string(), k.wrap_alg.to_string())].into()
}

fn bundle(base: &str, k: &KeyInfo) -> KeyBundle {
    KeyBundle {
        key: super::wire::JsonWebKey {
            kid: Some(kid(base, &k.name, &k.version)),
            kty: k.kty.clone(),
            key_ops: k.key_ops.clone(),
            n: Some(k.n.clone()),
            e: Some(k.e.clone()),
            ..Default::default()
        },
        attributes: attributes(k),
        tags: tags(k),
    }
}

fn item(base: &str, k: &KeyInfo, versioned: bool) -> KeyItem {
    KeyItem {
        kid: if versioned {
            kid(base, &k.name, &k.version)
        } else {
            format!("{base}/keys/{}", k.name)
        },
        attributes: attributes(k),
        tags: tags(k),
        managed: None,
    }
}

fn deleted_bundle(base: &str, d: &DeletedKeyInfo) -> DeletedKeyBundle {
    DeletedKeyBundle {
        bundle: bundle(base, &d.key),
        recovery_id: format!("{base}/deletedkeys/{}", d.key.name),
        deleted_date: Some(d.deleted_date),
        scheduled_purge_date: Some(d.scheduled_purge_date),
    }
}

fn deleted_item(base: &str, d: &DeletedKeyInfo) -> DeletedKeyItem {
    DeletedKeyItem {
        item: item(base, &d.key, false),
        recovery_id: format!("{base}/deletedkeys/{}", d.key.name),
        deleted_date: Some(d.deleted_date),
        scheduled_purge_date: Some(d.scheduled_purge_date),
    }
}

fn key_update(key_ops: Option<Vec<String>>, a: Option<KeyAttributesUpdate>) -> KeyUpdate {
    let a = a.unwrap_or_default();
    KeyUpdate {
        enabled: a.enabled,
        nbf: a.nbf,
        exp: a.exp,
        key_ops,
    }
}

/// Whether an update asks for anything a new version does not already have.
fn changes_defaults(u: &KeyUpdate) -> bool {
    u.enabled == Some(false)
        || matches!(u.nbf, Some(Some(_)))
        || matches!(u.exp, Some(Some(_)))
        || u.key_ops.as_ref().is_some_and(|o| *o != default_key_ops())
}

async fn dispatch(
    st: &Arc<AppState>,
    base: &str,
    parts: &axum::http::request::Parts,
    body: Body,
    client: Option<std::net::IpAddr>,
) -> Result<Response, ApiError> {
    // Authentication first: the Azure SDKs send a body-less first request and expect the
    // challenge, whatever else is wrong with it.
    let conn = authenticate(st, &parts.headers, client).await?;
    let q = query(parts.uri.query());
    match q.get("api-version") {
        None => {
            return Err(ApiError::bad(
                "the api-version query parameter is required (supported: 7.4, 7.5, 7.6)",
            ))
        }
        Some(v) if !API_VERSIONS.contains(&v.as_str()) => {
            return Err(ApiError::bad(format!(
                "api-version {v:?} is not supported (supported: 7.4, 7.5, 7.6)"
            )))
        }
        Some(_) => {}
    }
    let path = parts.uri.path();
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let Some(route) = Route::parse(&parts.method, &segs) else {
        let known = [
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
        ]
        .iter()
        .any(|m| Route::parse(m, &segs).is_some());
        return Err(if known {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                format!("{} is not allowed on {path}", parts.method),
            )
        } else {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("no such endpoint: {path}"),
            )
        });
    };
    let body = if route.has_body() {
        read_body(body, &parts.headers, st.max_body, st.body_timeout).await?
    } else {
        Vec::new()
    };
    let base = base.to_string();
    match route {
        Route::ListKeys => {
            let keys = blocking(move || conn.list_keys()).await?;
            let page = Page {
                value: keys.iter().map(|k| item(&base, k, false)).collect(),
                next_link: None,
            };
            Ok(json(StatusCode::OK, &page))
        }
        Route::Versions(n) => {
            let n = n.to_string();
            let keys = blocking(move || conn.list_key_versions(&n)).await?;
            let page = Page {
                value: keys.iter().map(|k| item(&base, k, true)).collect(),
                next_link: None,
            };
            Ok(json(StatusCode::OK, &page))
        }
        Route::Get(n, v) => {
            let (n, v) = (n.to_string(), v.map(str::to_string));
            let k = blocking(move || conn.get_key(&n, v.as_deref())).await?;
            Ok(json(StatusCode::OK, &bundle(&base, &k)))
        }
        Route::Create(n) => {
            let p: KeyCreateParameters = parse(&body)?;
            if !matches!(p.kty.as_str(), "RSA" | "RSA-HSM") {
                return Err(ApiError::bad(format!(
                    "key type {:?} is not supported: only RSA (RSA-HSM) keys",
                    p.kty
                )));
            }
            if p.public_exponent.is_some_and(|e| e != 65537) {
                return Err(ApiError::bad("only the public exponent 65537 is supported"));
            }
            let opts = CreateKeyOptions {
                key_size: p.key_size.unwrap_or(2048),
                wrap_alg: wrap_alg_tag(&p.tags)?.unwrap_or_default(),
            };
            let upd = key_update(p.key_ops, p.attributes);
            let n = n.to_string();
            let k = blocking(move || {
                let k = conn.create_key(&n, &opts)?;
                if changes_defaults(&upd) {
                    return conn.update_key(&n, Some(&k.version), &upd);
                }
                Ok(k)
            })
            .await?;
            Ok(json(StatusCode::OK, &bundle(&base, &k)))
        }
        Route::Import(n) => {
            let mut p: KeyImportParameters = parse(&body)?;
            let pkcs1 = jwk::pkcs1_from_jwk(&p.key);
            let key_ops = std::mem::take(&mut p.key.key_ops);
            jwk::zeroize_private(&mut p.key);
            let der = crate::vault::local::read_private_key(&pkcs1?)?;
            let opts = ImportKeyOptions {
                wrap_alg: wrap_alg_tag(&p.tags)?,
            };
            let upd = key_update((!key_ops.is_empty()).then_some(key_ops), p.attributes);
            let n = n.to_string();
            let k = blocking(move || {
                let k = conn.import_key(&n, &der, &opts)?;
                if changes_defaults(&upd) {
                    return conn.update_key(&n, Some(&k.version), &upd);
                }
                Ok(k)
            })
            .await?;
            Ok(json(StatusCode::OK, &bundle(&base, &k)))
        }
        Route::Update(n, v) => {
            let p: KeyUpdateParameters = parse(&body)?;
            let upd = key_update(p.key_ops, p.attributes);
            let (n, v) = (n.to_string(), v.map(str::to_string));
            let k = blocking(move || conn.update_key(&n, v.as_deref(), &upd)).await?;
            Ok(json(StatusCode::OK, &bundle(&base, &k)))
        }
        Route::Delete(n) => {
            let n = n.to_string();
            let d = blocking(move || conn.delete_key(&n)).await?;
            Ok(json(StatusCode::OK, &deleted_bundle(&base, &d)))
        }
        Route::Rotate(n) => {
            let n = n.to_string();
            let k = blocking(move || conn.rotate_key(&n)).await?;
            Ok(json(StatusCode::OK, &bundle(&base, &k)))
        }
        Route::ListDeleted => {
            let ds = blocking(move || conn.list_deleted_keys()).await?;
            let page = Page {
                value: ds.iter().map(|d| deleted_item(&base, d)).collect(),
                next_link: None,
            };
            Ok(json(StatusCode::OK, &page))
        }
        Route::GetDeleted(n) => {
            let n = n.to_string();
            let d = blocking(move || conn.get_deleted_key(&n)).await?;
            Ok(json(StatusCode::OK, &deleted_bundle(&base, &d)))
        }
        Route::Recover(n) => {
            let n = n.to_string();
            let k = blocking(move || conn.recover_deleted_key(&n)).await?;
            Ok(json(StatusCode::OK, &bundle(&base, &k)))
        }
        Route::Purge(n) => {
            let n = n.to_string();
            blocking(move || conn.purge_deleted_key(&n)).await?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        Route::Wrap(n, v) => {
            let p: KeyOperationParameters = parse(&body)?;
            let alg = parse_alg(&p.alg)?;
            let pt = decode_b64url(&p.value)?;
            let (n, v) = (n.to_string(), v.map(str::to_string));
            let w = blocking(move || conn.wrap_key(&n, v.as_deref(), alg, &pt)).await?;
            Ok(json(
                StatusCode::OK,
                &KeyOperationResult {
                    kid: kid(&base, &w.kid.name, &w.kid.version),
                    value: URL_SAFE_NO_PAD.encode(&w.value),
                },
            ))
        }
        Route::Unwrap(n, v) => {
            let p: KeyOperationParameters = parse(&body)?;
            let alg = parse_alg(&p.alg)?;
            let wrapped = decode_b64url(&p.value)?;
            let (n, v) = (n.to_string(), v.map(str::to_string));
            let (version, plain) = blocking(move || match v {
                Some(v) => {
                    let key = KeyId {
                        vault: crate::vault::local::URL.into(),
                        name: n,
                        version: v,
                    };
                    let plain = conn.unwrap_key(&key, alg, &wrapped)?;
                    Ok((key, plain))
                }
                // A versionless unwrap uses the latest version and, as in Key Vault, needs
                // only unwrapKey.
                None => conn.unwrap_key_latest(&n, alg, &wrapped),
            })
            .await?;
            // The plaintext DEK leaves in this answer; our copies are zeroized. (hyper's
            // output buffer is not ours to clear.)
            let value = Zeroizing::new(URL_SAFE_NO_PAD.encode(&*plain));
            let body = Zeroizing::new(
                serde_json::to_vec(&KeyOperationResult {
                    kid: kid(&base, &version.name, &version.version),
                    value: value.to_string(),
                })
                .map_err(|_| ApiError::internal())?,
            );
            Ok((
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
                body.to_vec(),
            )
                .into_response())
        }
        Route::Watch => {
            let since = match q.get("generation") {
                Some(g) => Some(
                    g.parse::<u64>()
                        .map_err(|_| ApiError::bad("`generation` must be a number"))?,
                ),
                None => None,
            };
            let wait = match q.get("timeout") {
                Some(t) => Duration::from_secs(
                    t.parse::<u64>()
                        .map_err(|_| ApiError::bad("`timeout` must be seconds"))?,
                )
                .min(WATCH_MAX),
                None => WATCH_DEFAULT,
            };
            drop(conn);
            let mut rx = st.generation.clone();
            let mut stop = st.shutdown.subscribe();
            let current = *rx.borrow_and_update();
            if since.is_some_and(|s| s == current) && !*stop.borrow() {
                tokio::select! {
                    _ = rx.changed() => {}
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.changed() => {}
                }
            }
            let generation = *rx.borrow();
            Ok(json(StatusCode::OK, &WatchResult { generation }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let p = |m: Method, path: &'static str| {
            let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
            Route::parse(&m, &segs)
        };
        assert_eq!(p(Method::GET, "/keys"), Some(Route::ListKeys));
        assert_eq!(p(Method::GET, "/keys/"), Some(Route::ListKeys));
        assert_eq!(p(Method::GET, "/keys/k/"), Some(Route::Get("k", None)));
        assert_eq!(
            p(Method::GET, "/keys/k/v1"),
            Some(Route::Get("k", Some("v1")))
        );
        assert_eq!(
            p(Method::GET, "/keys/k/versions"),
            Some(Route::Versions("k"))
        );
        assert_eq!(p(Method::PATCH, "/keys/k/"), Some(Route::Update("k", None)));
        assert_eq!(
            p(Method::POST, "/keys/k//wrapkey"),
            Some(Route::Wrap("k", None))
        );
        assert_eq!(
            p(Method::POST, "/keys/k/v/unwrapkey"),
            Some(Route::Unwrap("k", Some("v")))
        );
        assert_eq!(p(Method::DELETE, "/deletedkeys/k"), Some(Route::Purge("k")));
        assert_eq!(p(Method::GET, "/secrets/x"), None);
    }

    #[test]
    fn query_decodes() {
        let q = query(Some("api-version=7.6&x=a%2Fb&flag"));
        assert_eq!(q["api-version"], "7.6");
        assert_eq!(q["x"], "a/b");
        assert_eq!(q["flag"], "");
        assert_eq!(crate::vault::percent_decode("%zz%4", true), "%zz%4");
    }
}
