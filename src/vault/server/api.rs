//! Request handling: authenticate, check `api-version`, route ([`super::routes`]), read the
//! body, and hand the request to its family's handlers ([`super::keys`], [`super::crypto`],
//! [`super::manage`], [`super::deleted`]), which call the vault on tokio's blocking pool
//! (store I/O and RSA). Errors are shaped here, in Key Vault's envelope.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use http_body_util::BodyExt as _;
use serde::de::DeserializeOwned;
use serde::Serialize;
use zeroize::Zeroizing;

use super::routes::{Route, METHODS};
use super::throttle::Throttle;
use super::wire::{
    api_version_rank, ErrorBody, ErrorEnvelope, InnerError, WatchResult, API_VERSION_TABLE,
    NEWEST_API_VERSION,
};
use super::{crypto, deleted, keys, manage};
use crate::vault::local::LocalVault;
use crate::vault::{DenyReason, VaultError, WrapAlg};

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
pub(super) struct ApiError {
    pub(super) status: StatusCode,
    pub(super) code: &'static str,
    pub(super) message: String,
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

    pub(super) fn bad(message: impl Into<String>) -> ApiError {
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

    pub(super) fn internal() -> ApiError {
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

pub(super) fn json<T: Serialize>(status: StatusCode, value: &T) -> Response {
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
    // A throttled address still gets its valid tokens honoured: otherwise anyone sharing the
    // mount host's address (a local user, a NAT) could keep it throttled without a credential
    // and turn every key check into "unavailable" (Degraded, plaintext served through the
    // grace period) after a revocation. Requests without a token, and failed sign-ins, from
    // a throttled address are answered 429.
    let address_blocked = client.and_then(|ip| st.throttle.address_blocked(ip));
    // No token at all is how the Azure SDKs ask for the challenge: not a failed sign-in, but
    // it spends the address's allowance (a flood of them must not be free).
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        if let Some(wait) = address_blocked {
            return Err(ApiError::throttled(wait));
        }
        if let Some(ip) = client {
            if st.throttle.tokenless(ip) {
                tracing::warn!(client = %ip, "requests without a credential throttled");
            }
        }
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
        let audit = identity_blocked.is_none() && address_blocked.is_none();
        tokio::task::spawn_blocking(move || {
            LocalVault::open_as_client(&store, &who, &secret, client, audit)
        })
        .await
        .map_err(|_| ApiError::internal())?
    };
    match conn {
        Ok(v) => Ok(Arc::new(v)),
        Err(VaultError::Denied { .. }) | Err(VaultError::Invalid(_)) => {
            if let Some(wait) = identity_blocked.or(address_blocked) {
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

pub(super) fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::bad("the request needs a JSON body"));
    }
    serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("malformed JSON body: {e}")))
}

pub(super) fn decode_b64url(value: &str) -> Result<Zeroizing<Vec<u8>>, ApiError> {
    // Key Vault sends base64url without padding; tolerate padding, refuse anything else.
    URL_SAFE_NO_PAD
        .decode(value.trim_end_matches('='))
        .map(Zeroizing::new)
        .map_err(|_| ApiError::bad("`value` is not base64url"))
}

pub(super) fn parse_alg(alg: &str) -> Result<WrapAlg, ApiError> {
    alg.parse::<WrapAlg>().map_err(|e| match alg {
        "RSA1_5" => ApiError::from(e),
        _ => ApiError::bad(format!(
            "unsupported algorithm {alg:?}: use RSA-OAEP-256 or RSA-OAEP"
        )),
    })
}

pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, VaultError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| ApiError::internal())?
        .map_err(ApiError::from_vault)
}

/// One authenticated request, ready for its route's handler.
pub(super) struct Call {
    /// The caller's connection to the vault.
    pub conn: Arc<LocalVault>,
    /// The server's URL (key ids, next links).
    pub base: String,
    /// The request's api-version (a known one).
    pub api_version: String,
    /// Decoded query parameters.
    pub query: HashMap<String, String>,
    /// The JSON body (empty for routes without one).
    pub body: Vec<u8>,
}

fn check_api_version(q: &HashMap<String, String>) -> Result<String, ApiError> {
    let supported = || {
        API_VERSION_TABLE
            .iter()
            .map(|v| v.name)
            .collect::<Vec<_>>()
            .join(", ")
    };
    match q.get("api-version") {
        None => Err(ApiError::bad(format!(
            "The api-version query parameter is required. Consider using the latest supported \
             version ({NEWEST_API_VERSION}); supported: {}.",
            supported()
        ))),
        // The service's own words for an unknown version.
        Some(v) if api_version_rank(v).is_none() => Err(ApiError::bad(format!(
            "The specified version ({v}) is not recognized. Consider using the latest \
             supported version ({NEWEST_API_VERSION})."
        ))),
        Some(v) => Ok(v.clone()),
    }
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
    let api_version = check_api_version(&q)?;
    let path = parts.uri.path();
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let Some(route) = Route::parse(&parts.method, &segs) else {
        let known = METHODS.iter().any(|m| Route::parse(m, &segs).is_some());
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
    if !route.in_version(&api_version) {
        return Err(ApiError::bad(format!(
            "this operation ({} {path}) is not in api-version {api_version}: use {} or later",
            parts.method,
            route.since()
        )));
    }
    let body = if route.has_body() {
        read_body(body, &parts.headers, st.max_body, st.body_timeout).await?
    } else {
        Vec::new()
    };
    if let Route::Watch = route {
        drop(conn);
        return watch(st, &q).await;
    }
    let call = Call {
        conn,
        base: base.to_string(),
        api_version,
        query: q,
        body,
    };
    let s = |x: &str| x.to_string();
    let o = |x: Option<&str>| x.map(str::to_string);
    match route {
        Route::ListKeys => keys::list(call).await,
        Route::Versions(n) => keys::versions(call, s(n)).await,
        Route::Get(n, v) => keys::get(call, s(n), o(v)).await,
        Route::Create(n) => keys::create(call, s(n)).await,
        Route::Import(n) => keys::import(call, s(n)).await,
        Route::Update(n, v) => keys::update(call, s(n), o(v)).await,
        Route::Delete(n) => keys::delete(call, s(n)).await,
        Route::Rotate(n) => keys::rotate(call, s(n)).await,
        Route::Wrap(n, v) => crypto::wrap(call, s(n), o(v)).await,
        Route::Unwrap(n, v) => crypto::unwrap(call, s(n), o(v)).await,
        Route::Encrypt(n, v) => crypto::encrypt(call, s(n), o(v)).await,
        Route::Decrypt(n, v) => crypto::decrypt(call, s(n), o(v)).await,
        Route::Sign(n, v) => crypto::sign(call, s(n), o(v)).await,
        Route::Verify(n, v) => crypto::verify(call, s(n), o(v)).await,
        Route::Random => crypto::random(call).await,
        Route::Release(n, _) => crypto::release(call, s(n)).await,
        Route::Attestation(n, _) => crypto::attestation(call, s(n)).await,
        Route::Backup(n) => manage::backup(call, s(n)).await,
        Route::Restore => manage::restore(call).await,
        Route::GetPolicy(n) => manage::get_policy(call, s(n)).await,
        Route::SetPolicy(n) => manage::set_policy(call, s(n)).await,
        Route::ListDeleted => deleted::list(call).await,
        Route::GetDeleted(n) => deleted::get(call, s(n)).await,
        Route::Recover(n) => deleted::recover(call, s(n)).await,
        Route::Purge(n) => deleted::purge(call, s(n)).await,
        Route::Watch => unreachable_watch(),
    }
}

fn unreachable_watch() -> Result<Response, ApiError> {
    Err(ApiError::internal())
}

/// `GET /cmkfs/watch`: the long poll (see the module docs of the server).
async fn watch(st: &Arc<AppState>, q: &HashMap<String, String>) -> Result<Response, ApiError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_decodes() {
        let q = query(Some("api-version=7.6&x=a%2Fb&flag"));
        assert_eq!(q["api-version"], "7.6");
        assert_eq!(q["x"], "a/b");
        assert_eq!(q["flag"], "");
        assert_eq!(crate::vault::percent_decode("%zz%4", true), "%zz%4");
    }

    #[test]
    fn api_versions_in_the_service_words() {
        let q = |v: &str| query(Some(&format!("api-version={v}")));
        for v in [
            "7.0",
            "7.1",
            "7.2",
            "7.3",
            "7.4",
            "7.5",
            "7.6",
            "2025-07-01",
        ] {
            assert_eq!(check_api_version(&q(v)).unwrap(), v);
        }
        let e = check_api_version(&q("7.9")).unwrap_err();
        assert_eq!(
            (e.status, e.code),
            (StatusCode::BAD_REQUEST, "BadParameter")
        );
        assert_eq!(
            e.message,
            "The specified version (7.9) is not recognized. Consider using the latest \
             supported version (2025-07-01)."
        );
        assert!(check_api_version(&query(None)).is_err());
    }
}
