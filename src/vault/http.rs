//! The HTTP vault backend: a client of Azure Key Vault's keys REST API (api-version 7.6),
//! for a cmkfs vault server (`cmkfs vault serve`) or a real Azure Key Vault.
//!
//! - **Transport**: blocking `ureq` over rustls (aws-lc-rs). HTTPS only; certificates are
//!   always verified, against a pinned CA (the credential's `ca_cert`) or, without one, the
//!   Mozilla roots (a real Key Vault). Redirects are not followed (the bearer token must not
//!   travel elsewhere).
//! - **Authentication**: `Authorization: Bearer <token>`, the token being
//!   [`Credential::bearer_token`]: `<identity>.<secret>` for a cmkfs server, or an Azure AD
//!   access token for `https://vault.azure.net` kept whole in the credential's `secret`.
//! - **Errors** keep the trait's split: refusals the key owner made (401, 403, a key the
//!   caller names answering 404) are [`VaultError::Denied`]; connection failures, timeouts,
//!   429 and 5xx are [`VaultError::Unavailable`], after bounded retries (3 attempts, 250 ms
//!   then 500 ms apart; operations that create or delete something are retried only when the
//!   connection could not even be made, so they never run twice).
//! - **Push**: [`Vault::watch`] long-polls `GET /cmkfs/watch` (a cmkfs server extension; a
//!   real Key Vault has none, and then `watch` returns `None`).
//!
//! Key ids are always `<this client's URL>/keys/<name>/<version>`, whatever host name the
//! server put in them, so that a volume header names the URL a mount reconnects with.

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, TrySendError};
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::de::DeserializeOwned;
use serde::Serialize;
use ureq::http::{Method, Request};
use zeroize::Zeroizing;

use super::server::jwk;
use super::server::wire::{
    DeletedKeyBundle, DeletedKeyItem, ErrorEnvelope, KeyAttributesUpdate, KeyBundle,
    KeyCreateParameters, KeyImportParameters, KeyItem, KeyOperationParameters, KeyOperationResult,
    KeyUpdateParameters, Page, WatchResult, API_VERSION, WRAP_ALG_TAG,
};
use super::{
    CreateKeyOptions, Credential, DeletedKeyInfo, DenyReason, ImportKeyOptions, KeyId, KeyInfo,
    KeyUpdate, Permission, Vault, VaultError, VaultProperties, WrapAlg, Wrapped,
};
use crate::crypto::secret::SecretBytes;

/// Attempts per request (the first try included).
const ATTEMPTS: u32 = 3;
/// Wait before the second attempt; doubled for each further one.
const BACKOFF: Duration = Duration::from_millis(250);
/// Per-attempt limit of ordinary requests.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Per-attempt limit of requests that generate RSA keys (4096-bit generation can take seconds).
const SLOW_TIMEOUT: Duration = Duration::from_secs(90);
/// Connection set-up limit.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Server-side wait of one watch long poll.
const WATCH_WAIT_S: u64 = 25;
/// Largest answer read (lists of many keys stay well under this).
const MAX_RESPONSE: u64 = 8 * 1024 * 1024;
/// Pages followed by one list call.
const MAX_PAGES: usize = 1000;

/// Connection settings besides the URL and token.
#[derive(Clone, Debug, Default)]
pub struct HttpOptions {
    /// PEM certificates to trust instead of the public roots (the server's CA).
    pub ca_pem: Option<String>,
}

/// A connection to a Key Vault-compatible server as one identity.
pub struct HttpVault {
    url: String,
    agent: ureq::Agent,
    slow_agent: ureq::Agent,
    /// For wrap and unwrap, whose bodies carry a DEK: a fresh connection per request, dropped
    /// (and its buffers wiped by the zeroizing allocator) once the answer is read, so no
    /// pooled connection keeps a DEK in its buffers.
    key_agent: ureq::Agent,
    /// The bearer token, in secret pages (shared with the watch thread, never copied).
    token: Arc<SecretBytes>,
    /// Tells watch threads that the connection is gone.
    closed: Arc<AtomicBool>,
}

impl std::fmt::Debug for HttpVault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpVault")
            .field("url", &self.url)
            .field("token", &"<redacted>")
            .finish()
    }
}

impl Drop for HttpVault {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::Relaxed);
    }
}

/// Which operation a request is, for retries and for reading its errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Read,
    Create,
    Change,
    Wrap,
    Unwrap,
}

impl Op {
    /// Safe to send again after it may have reached the server.
    fn idempotent(self) -> bool {
        matches!(self, Op::Read | Op::Wrap | Op::Unwrap)
    }
}

/// Normalizes and checks a vault URL: `https://host[:port][/path]`, no trailing slash.
pub fn normalize_url(url: &str) -> Result<String, VaultError> {
    let u = url.trim().trim_end_matches('/');
    let Some(rest) = u.strip_prefix("https://") else {
        return Err(VaultError::Invalid(format!(
            "vault URL {url:?} must start with https:// (plain HTTP would expose the bearer token)"
        )));
    };
    if rest.is_empty() || rest.contains(['?', '#', ' ', '@']) {
        return Err(VaultError::Invalid(format!(
            "malformed vault URL {url:?}: expected https://host[:port]"
        )));
    }
    Ok(u.to_string())
}

fn agent(opts: &HttpOptions, timeout: Duration, pooled: bool) -> Result<ureq::Agent, VaultError> {
    use ureq::tls::{Certificate, RootCerts, TlsConfig, TlsProvider};
    let roots = match &opts.ca_pem {
        Some(pem) => {
            let certs: Vec<Certificate<'static>> = ureq::tls::parse_pem(pem.as_bytes())
                .filter_map(|item| match item {
                    Ok(ureq::tls::PemItem::Certificate(c)) => Some(Ok(c)),
                    Ok(_) => None,
                    Err(e) => Some(Err(e)),
                })
                .collect::<Result<_, _>>()
                .map_err(|e| VaultError::Invalid(format!("the pinned CA is not PEM: {e}")))?;
            if certs.is_empty() {
                return Err(VaultError::Invalid(
                    "the pinned CA holds no certificate".into(),
                ));
            }
            RootCerts::new_with_certs(&certs)
        }
        None => RootCerts::WebPki,
    };
    let tls = TlsConfig::builder()
        .provider(TlsProvider::Rustls)
        .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .root_certs(roots)
        .build();
    Ok(ureq::Agent::config_builder()
        .tls_config(tls)
        .https_only(true)
        .http_status_as_error(false)
        .max_redirects(0)
        .timeout_connect(Some(CONNECT_TIMEOUT))
        .timeout_global(Some(timeout))
        .max_idle_connections(if pooled { 10 } else { 0 })
        .max_idle_connections_per_host(if pooled { 3 } else { 0 })
        .user_agent(concat!("cmkfs/", env!("CARGO_PKG_VERSION")))
        .build()
        .new_agent())
}

/// A transport failure: whether the request surely never reached the server, and why.
struct Transport {
    unsent: bool,
    why: String,
}

fn transport(e: ureq::Error) -> Transport {
    use ureq::Error as E;
    let unsent = matches!(e, E::ConnectionFailed | E::HostNotFound)
        || matches!(&e, E::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused)
        || matches!(
            e,
            E::Timeout(ureq::Timeout::Connect | ureq::Timeout::Resolve)
        );
    let why = match e {
        E::Timeout(t) => format!("timed out ({t:?})"),
        other => other.to_string(),
    };
    Transport { unsent, why }
}

fn status_retryable(status: u16) -> bool {
    matches!(status, 429 | 500 | 502 | 503 | 504)
}

impl HttpVault {
    /// Connects to `url` with a bearer token. No request is made yet.
    pub fn new(
        url: &str,
        token: Zeroizing<String>,
        opts: &HttpOptions,
    ) -> Result<HttpVault, VaultError> {
        let url = normalize_url(url)?;
        if token.is_empty() || token.contains(['\r', '\n']) {
            return Err(VaultError::Invalid(
                "the bearer token is empty or malformed".into(),
            ));
        }
        Ok(HttpVault {
            url,
            agent: agent(opts, REQUEST_TIMEOUT, true)?,
            slow_agent: agent(opts, SLOW_TIMEOUT, true)?,
            key_agent: agent(opts, REQUEST_TIMEOUT, false)?,
            token: Arc::new(SecretBytes::new(token.as_bytes())),
            closed: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Connects as the identity of a credential for an `https://` vault.
    pub fn connect(cred: &Credential) -> Result<HttpVault, VaultError> {
        HttpVault::new(
            &cred.vault,
            cred.bearer_token(),
            &HttpOptions {
                ca_pem: cred.ca_cert.clone(),
            },
        )
    }

    fn token_str(&self) -> &str {
        // Built from a `String` in `new`: always UTF-8.
        self.token.as_str().unwrap_or_default()
    }

    fn endpoint(&self, path: &str, query: &str) -> String {
        format!("{}{path}?api-version={API_VERSION}{query}", self.url)
    }

    /// One request with retries: (status, body).
    fn call(
        &self,
        method: Method,
        url: &str,
        body: Option<&[u8]>,
        op: Op,
    ) -> Result<(u16, Zeroizing<Vec<u8>>), VaultError> {
        let agent = match op {
            Op::Create => &self.slow_agent,
            Op::Wrap | Op::Unwrap => &self.key_agent,
            Op::Read | Op::Change => &self.agent,
        };
        let mut last = String::new();
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                std::thread::sleep(BACKOFF * 2u32.pow(attempt - 1));
            }
            match self.send(agent, &method, url, body) {
                Ok((status, bytes)) => {
                    if status_retryable(status) && op.idempotent() && attempt + 1 < ATTEMPTS {
                        last = format!("HTTP {status}");
                        continue;
                    }
                    return Ok((status, bytes));
                }
                Err(t) => {
                    last = t.why;
                    if !(t.unsent || op.idempotent()) {
                        break;
                    }
                }
            }
        }
        Err(VaultError::Unavailable(format!(
            "cannot reach vault {}: {last}",
            self.url
        )))
    }

    fn send(
        &self,
        agent: &ureq::Agent,
        method: &Method,
        url: &str,
        body: Option<&[u8]>,
    ) -> Result<(u16, Zeroizing<Vec<u8>>), Transport> {
        let auth = Zeroizing::new(format!("Bearer {}", self.token_str()));
        let builder = Request::builder()
            .method(method.clone())
            .uri(url)
            .header("authorization", auth.as_str())
            .header("accept", "application/json");
        let built = match body {
            Some(b) => builder
                .header("content-type", "application/json")
                .body(b)
                .map(|r| agent.run(r)),
            None => builder.body(()).map(|r| agent.run(r)),
        };
        let mut resp = built
            .map_err(|e| Transport {
                unsent: true,
                why: format!("malformed request: {e}"),
            })?
            .map_err(transport)?;
        let status = resp.status().as_u16();
        let bytes = resp
            .body_mut()
            .with_config()
            .limit(MAX_RESPONSE)
            .read_to_vec()
            .map_err(transport)?;
        Ok((status, Zeroizing::new(bytes)))
    }

    /// A request whose success answer is JSON `T`; failures become vault errors.
    fn request<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&[u8]>,
        op: Op,
        what: &str,
    ) -> Result<T, VaultError> {
        let url = self.endpoint(path, "");
        let (status, bytes) = self.call(method, &url, body, op)?;
        if !(200..300).contains(&status) {
            return Err(error_from(status, &bytes, op, what, &self.url));
        }
        serde_json::from_slice(&bytes).map_err(|e| {
            VaultError::Unavailable(format!(
                "vault {} answered with malformed JSON ({e})",
                self.url
            ))
        })
    }

    fn json_body<T: Serialize>(value: &T) -> Result<Zeroizing<Vec<u8>>, VaultError> {
        serde_json::to_vec(value)
            .map(Zeroizing::new)
            .map_err(|e| VaultError::Invalid(format!("cannot encode the request: {e}")))
    }

    /// Every item of a paged list, following `nextLink` (only to this vault's URL).
    fn list<T: DeserializeOwned>(&self, path: &str, what: &str) -> Result<Vec<T>, VaultError> {
        let mut out = Vec::new();
        let mut url = self.endpoint(path, "");
        for _ in 0..MAX_PAGES {
            let (status, bytes) = self.call(Method::GET, &url, None, Op::Read)?;
            if !(200..300).contains(&status) {
                return Err(error_from(status, &bytes, Op::Read, what, &self.url));
            }
            let page: Page<T> = serde_json::from_slice(&bytes).map_err(|e| {
                VaultError::Unavailable(format!("vault {} sent a malformed list ({e})", self.url))
            })?;
            out.extend(page.value);
            match page.next_link.filter(|l| !l.is_empty()) {
                None => return Ok(out),
                Some(next) if next.starts_with(&format!("{}/", self.url)) => url = next,
                Some(next) => {
                    return Err(VaultError::Unavailable(format!(
                        "vault {} sent a next page link outside itself ({next}); not following it",
                        self.url
                    )))
                }
            }
        }
        Err(VaultError::Unavailable(format!(
            "vault {} sent more than {MAX_PAGES} pages",
            self.url
        )))
    }

    fn kid(&self, name: &str, version: &str) -> String {
        format!("{}/keys/{name}/{version}", self.url)
    }

    fn info_from_bundle(&self, b: &KeyBundle) -> Result<KeyInfo, VaultError> {
        let kid = b.key.kid.as_deref().unwrap_or_default();
        let (name, version) = split_kid(kid, &self.url)?;
        let n = b.key.n.clone().unwrap_or_default();
        Ok(KeyInfo {
            kid: self.kid(&name, &version),
            key_size: modulus_bits(&n),
            kty: "RSA".into(),
            key_ops: b.key.key_ops.clone(),
            n,
            e: b.key.e.clone().unwrap_or_default(),
            wrap_alg: wrap_alg_of(&b.tags),
            ..info_from_attrs(name, version, &b.attributes)
        })
    }

    fn info_from_item(&self, item: &KeyItem) -> Result<KeyInfo, VaultError> {
        let (name, version) = split_kid(&item.kid, &self.url)?;
        Ok(KeyInfo {
            kid: self.kid(&name, &version),
            kty: "RSA".into(),
            wrap_alg: wrap_alg_of(&item.tags),
            ..info_from_attrs(name, version, &item.attributes)
        })
    }

    fn deleted_info(&self, d: &DeletedKeyBundle) -> Result<DeletedKeyInfo, VaultError> {
        let key = self.info_from_bundle(&d.bundle)?;
        Ok(DeletedKeyInfo {
            recovery_id: format!("{}/deletedkeys/{}", self.url, key.name),
            deleted_date: d.deleted_date.unwrap_or(0),
            scheduled_purge_date: d.scheduled_purge_date.unwrap_or(0),
            key,
        })
    }

    fn deleted_item_info(&self, d: &DeletedKeyItem) -> Result<DeletedKeyInfo, VaultError> {
        // Deleted-key items carry a versionless kid: fill the name, leave the version empty.
        let name = d
            .item
            .kid
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_string();
        Ok(DeletedKeyInfo {
            recovery_id: format!("{}/deletedkeys/{name}", self.url),
            deleted_date: d.deleted_date.unwrap_or(0),
            scheduled_purge_date: d.scheduled_purge_date.unwrap_or(0),
            key: KeyInfo {
                kid: format!("{}/keys/{name}", self.url),
                kty: "RSA".into(),
                wrap_alg: wrap_alg_of(&d.item.tags),
                ..info_from_attrs(name, String::new(), &d.item.attributes)
            },
        })
    }

    /// One long poll of `GET /cmkfs/watch`.
    fn poll_generation(
        agent: &ureq::Agent,
        url: &str,
        token: &str,
    ) -> Result<Result<u64, u16>, String> {
        let auth = Zeroizing::new(format!("Bearer {token}"));
        let req = Request::builder()
            .method(Method::GET)
            .uri(url)
            .header("authorization", auth.as_str())
            .body(())
            .map_err(|e| e.to_string())?;
        let mut resp = agent.run(req).map_err(|e| transport(e).why)?;
        let status = resp.status().as_u16();
        let bytes = resp
            .body_mut()
            .with_config()
            .limit(64 * 1024)
            .read_to_vec()
            .map_err(|e| transport(e).why)?;
        if status != 200 {
            return Ok(Err(status));
        }
        serde_json::from_slice::<WatchResult>(&bytes)
            .map(|w| Ok(w.generation))
            .map_err(|e| format!("malformed watch answer: {e}"))
    }
}

/// `<url>/keys/<name>/<version>` (any host: servers may name themselves differently).
fn split_kid(kid: &str, vault: &str) -> Result<(String, String), VaultError> {
    let k = KeyId::from_str(kid).map_err(|_| {
        VaultError::Unavailable(format!(
            "vault {vault} answered with a malformed key id {kid:?}"
        ))
    })?;
    Ok((k.name, k.version))
}

fn wrap_alg_of(tags: &std::collections::BTreeMap<String, String>) -> WrapAlg {
    tags.get(WRAP_ALG_TAG)
        .and_then(|a| a.parse().ok())
        .unwrap_or_default()
}

fn modulus_bits(n: &str) -> u32 {
    let Ok(bytes) = URL_SAFE_NO_PAD.decode(n.trim_end_matches('=')) else {
        return 0;
    };
    let skip = bytes.iter().take_while(|b| **b == 0).count();
    let m = &bytes[skip..];
    match m.first() {
        None => 0,
        Some(first) => (m.len() as u32) * 8 - first.leading_zeros(),
    }
}

fn info_from_attrs(
    name: String,
    version: String,
    a: &super::server::wire::KeyAttributes,
) -> KeyInfo {
    KeyInfo {
        kid: String::new(),
        name,
        version,
        kty: "RSA".into(),
        enabled: a.enabled.unwrap_or(true),
        created: a.created.unwrap_or(0),
        updated: a.updated.unwrap_or(0),
        nbf: a.nbf,
        exp: a.exp,
        recovery_level: a.recovery_level.clone().unwrap_or_default(),
        recoverable_days: a.recoverable_days.unwrap_or(0),
        ..Default::default()
    }
}

/// Turns a non-2xx answer into the vault error it stands for (see the module docs).
fn error_from(status: u16, body: &[u8], op: Op, what: &str, vault: &str) -> VaultError {
    let env: Option<ErrorEnvelope> = serde_json::from_slice(body).ok();
    let (code, message, inner) = match &env {
        Some(e) => (
            e.error.code.as_str(),
            e.error.message.as_str(),
            e.error.innererror.as_ref().map(|i| i.code.as_str()),
        ),
        None => ("", "", None),
    };
    let detail = if message.is_empty() {
        format!("HTTP {status}")
    } else {
        message.to_string()
    };
    let denied = |reason: DenyReason| VaultError::Denied {
        reason,
        what: format!("{what} ({detail})"),
    };
    match status {
        401 => VaultError::Denied {
            reason: DenyReason::PermissionDenied,
            what: format!("{what} (vault {vault} rejected the credential: {detail})"),
        },
        403 => match inner {
            Some("KeyDisabled") => denied(DenyReason::KeyDisabled),
            Some("KeyExpired") => denied(DenyReason::KeyExpired),
            Some("OperationNotAllowed") => denied(DenyReason::OperationNotAllowed),
            // A real Key Vault words some of these only in the message.
            _ if message.contains("disabled") => denied(DenyReason::KeyDisabled),
            _ if message.contains("expired") => denied(DenyReason::KeyExpired),
            _ => denied(DenyReason::PermissionDenied),
        },
        404 => match inner {
            Some("KeyDeleted") => denied(DenyReason::KeyDeleted),
            Some("KeyPurged") => denied(DenyReason::KeyPurged),
            // The key a volume header names is gone (Key Vault answers 404 for deleted and
            // purged keys alike): the owner's decision.
            _ if matches!(op, Op::Unwrap | Op::Wrap) => denied(DenyReason::KeyDeleted),
            _ if code == "NotFound" => VaultError::Invalid(format!(
                "vault {vault} does not offer this operation ({detail})"
            )),
            _ => VaultError::NotFound(detail),
        },
        409 => VaultError::Conflict(detail),
        400 if inner == Some("UnwrapFailed") => VaultError::UnwrapFailed {
            kid: what.to_string(),
        },
        400 => VaultError::Invalid(detail),
        s if status_retryable(s) => {
            VaultError::Unavailable(format!("vault {vault} answered HTTP {s}: {detail}"))
        }
        _ => VaultError::Invalid(format!("vault {vault} answered HTTP {status}: {detail}")),
    }
}

fn seg(name: &str) -> Result<&str, VaultError> {
    if super::valid_key_name(name) {
        Ok(name)
    } else {
        Err(VaultError::Invalid(format!(
            "invalid key name {name:?}: use 1-127 letters, digits and dashes"
        )))
    }
}

fn version_seg(v: &str) -> Result<&str, VaultError> {
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        Ok(v)
    } else {
        Err(VaultError::Invalid(format!("invalid key version {v:?}")))
    }
}

impl Vault for HttpVault {
    fn url(&self) -> String {
        self.url.clone()
    }

    fn create_key(&self, name: &str, opts: &CreateKeyOptions) -> Result<KeyInfo, VaultError> {
        let body = Self::json_body(&KeyCreateParameters {
            kty: "RSA".into(),
            key_size: Some(opts.key_size),
            key_ops: Some(super::default_key_ops()),
            tags: Some([(WRAP_ALG_TAG.to_string(), opts.wrap_alg.to_string())].into()),
            ..Default::default()
        })?;
        let b: KeyBundle = self.request(
            Method::POST,
            &format!("/keys/{}/create", seg(name)?),
            Some(&body),
            Op::Create,
            &format!("{}/keys/{name}", self.url),
        )?;
        self.info_from_bundle(&b)
    }

    fn get_key(&self, name: &str, version: Option<&str>) -> Result<KeyInfo, VaultError> {
        let path = match version {
            Some(v) => format!("/keys/{}/{}", seg(name)?, version_seg(v)?),
            None => format!("/keys/{}", seg(name)?),
        };
        let what = format!(
            "{}/keys/{name}{}",
            self.url,
            version.map(|v| format!("/{v}")).unwrap_or_default()
        );
        let b: KeyBundle = self.request(Method::GET, &path, None, Op::Read, &what)?;
        self.info_from_bundle(&b)
    }

    fn describe_key(&self, name: &str, version: Option<&str>) -> Result<KeyInfo, VaultError> {
        match self.get_key(name, version) {
            // Key Vault refuses to GET a disabled version but lists it: describe it from there.
            Err(VaultError::Denied {
                reason: DenyReason::KeyDisabled,
                what,
            }) => {
                let versions = self.list_key_versions(name)?;
                let pick = match version {
                    Some(v) => versions.into_iter().find(|k| k.version == v),
                    None => versions.into_iter().max_by_key(|k| k.created),
                };
                pick.ok_or(VaultError::Denied {
                    reason: DenyReason::KeyDisabled,
                    what,
                })
            }
            other => other,
        }
    }

    fn list_keys(&self) -> Result<Vec<KeyInfo>, VaultError> {
        let items: Vec<KeyItem> = self.list("/keys", &format!("{}/keys", self.url))?;
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            let name = item.kid.rsplit('/').next().unwrap_or_default().to_string();
            // List items carry no version: ask for each key's latest.
            match self.describe_key(&name, None) {
                Ok(k) => out.push(k),
                Err(VaultError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    fn list_key_versions(&self, name: &str) -> Result<Vec<KeyInfo>, VaultError> {
        let items: Vec<KeyItem> = self.list(
            &format!("/keys/{}/versions", seg(name)?),
            &format!("{}/keys/{name}", self.url),
        )?;
        let mut out = items
            .iter()
            .map(|i| self.info_from_item(i))
            .collect::<Result<Vec<_>, _>>()?;
        out.sort_by_key(|a| a.created);
        Ok(out)
    }

    fn rotate_key(&self, name: &str) -> Result<KeyInfo, VaultError> {
        let b: KeyBundle = self.request(
            Method::POST,
            &format!("/keys/{}/rotate", seg(name)?),
            Some(b"{}"),
            Op::Create,
            &format!("{}/keys/{name}", self.url),
        )?;
        self.info_from_bundle(&b)
    }

    fn import_key(
        &self,
        name: &str,
        pkcs8_der: &[u8],
        opts: &ImportKeyOptions,
    ) -> Result<KeyInfo, VaultError> {
        let mut key = jwk::jwk_from_pkcs8(pkcs8_der)?;
        key.key_ops = super::default_key_ops();
        let mut params = KeyImportParameters {
            key,
            hsm: None,
            attributes: None,
            tags: opts
                .wrap_alg
                .map(|a| [(WRAP_ALG_TAG.to_string(), a.to_string())].into()),
        };
        let body = Self::json_body(&params);
        jwk::zeroize_private(&mut params.key);
        let body = body?;
        let b: KeyBundle = self.request(
            Method::PUT,
            &format!("/keys/{}", seg(name)?),
            Some(&body),
            Op::Create,
            &format!("{}/keys/{name}", self.url),
        )?;
        self.info_from_bundle(&b)
    }

    fn update_key(
        &self,
        name: &str,
        version: Option<&str>,
        update: &KeyUpdate,
    ) -> Result<KeyInfo, VaultError> {
        let body = Self::json_body(&KeyUpdateParameters {
            key_ops: update.key_ops.clone(),
            attributes: Some(KeyAttributesUpdate {
                enabled: update.enabled,
                nbf: update.nbf,
                exp: update.exp,
            }),
            tags: update.tags.clone(),
        })?;
        let path = format!(
            "/keys/{}/{}",
            seg(name)?,
            match version {
                Some(v) => version_seg(v)?,
                None => "",
            }
        );
        let b: KeyBundle = self.request(
            Method::PATCH,
            &path,
            Some(&body),
            Op::Change,
            &format!("{}/keys/{name}", self.url),
        )?;
        self.info_from_bundle(&b)
    }

    fn delete_key(&self, name: &str) -> Result<DeletedKeyInfo, VaultError> {
        let d: DeletedKeyBundle = self.request(
            Method::DELETE,
            &format!("/keys/{}", seg(name)?),
            None,
            Op::Change,
            &format!("{}/keys/{name}", self.url),
        )?;
        self.deleted_info(&d)
    }

    fn list_deleted_keys(&self) -> Result<Vec<DeletedKeyInfo>, VaultError> {
        let items: Vec<DeletedKeyItem> =
            self.list("/deletedkeys", &format!("{}/deletedkeys", self.url))?;
        items.iter().map(|d| self.deleted_item_info(d)).collect()
    }

    fn get_deleted_key(&self, name: &str) -> Result<DeletedKeyInfo, VaultError> {
        let d: DeletedKeyBundle = self.request(
            Method::GET,
            &format!("/deletedkeys/{}", seg(name)?),
            None,
            Op::Read,
            &format!("{}/deletedkeys/{name}", self.url),
        )?;
        self.deleted_info(&d)
    }

    fn recover_deleted_key(&self, name: &str) -> Result<KeyInfo, VaultError> {
        let b: KeyBundle = self.request(
            Method::POST,
            &format!("/deletedkeys/{}/recover", seg(name)?),
            Some(b"{}"),
            Op::Change,
            &format!("{}/deletedkeys/{name}", self.url),
        )?;
        self.info_from_bundle(&b)
    }

    fn purge_deleted_key(&self, name: &str) -> Result<(), VaultError> {
        let url = self.endpoint(&format!("/deletedkeys/{}", seg(name)?), "");
        let (status, bytes) = self.call(Method::DELETE, &url, None, Op::Change)?;
        if (200..300).contains(&status) {
            Ok(())
        } else {
            Err(error_from(
                status,
                &bytes,
                Op::Change,
                &format!("{}/deletedkeys/{name}", self.url),
                &self.url,
            ))
        }
    }

    fn properties(&self) -> Result<VaultProperties, VaultError> {
        Err(VaultError::Invalid(
            "vault settings are not part of the keys API: read them on the vault host \
             (`cmkfs vault config`)"
                .into(),
        ))
    }

    fn permissions(&self, _name: &str) -> Result<Vec<Permission>, VaultError> {
        Err(VaultError::Invalid(
            "access policies are not part of the keys API: read them on the vault host \
             (`cmkfs vault policy list`)"
                .into(),
        ))
    }

    fn wrap_key(
        &self,
        name: &str,
        version: Option<&str>,
        alg: WrapAlg,
        plaintext: &[u8],
    ) -> Result<Wrapped, VaultError> {
        let mut params = KeyOperationParameters {
            alg: alg.to_string(),
            value: URL_SAFE_NO_PAD.encode(plaintext),
        };
        let body = Self::json_body(&params);
        zeroize::Zeroize::zeroize(&mut params.value);
        let body = body?;
        let path = format!(
            "/keys/{}/{}/wrapkey",
            seg(name)?,
            match version {
                Some(v) => version_seg(v)?,
                None => "",
            }
        );
        let what = format!(
            "{}/keys/{name}{}",
            self.url,
            version.map(|v| format!("/{v}")).unwrap_or_default()
        );
        let r: KeyOperationResult =
            self.request(Method::POST, &path, Some(&body), Op::Wrap, &what)?;
        let (rname, rversion) = split_kid(&r.kid, &self.url)?;
        if rname != name || version.is_some_and(|v| v != rversion) {
            return Err(VaultError::Unavailable(format!(
                "vault {} wrapped with {} instead of {what}",
                self.url, r.kid
            )));
        }
        let value = URL_SAFE_NO_PAD
            .decode(r.value.trim_end_matches('='))
            .map_err(|_| {
                VaultError::Unavailable(format!("vault {} sent a malformed wrapped key", self.url))
            })?;
        Ok(Wrapped {
            kid: KeyId {
                vault: self.url.clone(),
                name: rname,
                version: rversion,
            },
            alg,
            value,
        })
    }

    fn unwrap_key(
        &self,
        kid: &KeyId,
        alg: WrapAlg,
        wrapped: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, VaultError> {
        if kid.vault != self.url {
            return Err(VaultError::Invalid(format!(
                "key id {kid} belongs to vault {:?}, not {}",
                kid.vault, self.url
            )));
        }
        let body = Self::json_body(&KeyOperationParameters {
            alg: alg.to_string(),
            value: URL_SAFE_NO_PAD.encode(wrapped),
        })?;
        let path = format!(
            "/keys/{}/{}/unwrapkey",
            seg(&kid.name)?,
            version_seg(&kid.version)?
        );
        let mut r: KeyOperationResult = self.request(
            Method::POST,
            &path,
            Some(&body),
            Op::Unwrap,
            &kid.to_string(),
        )?;
        let value = Zeroizing::new(std::mem::take(&mut r.value));
        URL_SAFE_NO_PAD
            .decode(value.trim_end_matches('='))
            .map(Zeroizing::new)
            .map_err(|_| {
                VaultError::Unavailable(format!(
                    "vault {} sent a malformed unwrapped key",
                    self.url
                ))
            })
    }

    fn watch(&self) -> Option<Receiver<()>> {
        let probe_url = self.endpoint("/cmkfs/watch", "");
        let first = match Self::poll_generation(&self.agent, &probe_url, self.token_str()) {
            Ok(Ok(g)) => Some(g),
            // Not a cmkfs server (a real Key Vault): periodic checks only.
            Ok(Err(400 | 404 | 405)) => return None,
            // Unreachable or refusing now: keep trying in the background.
            _ => None,
        };
        let long_agent = self.slow_agent.clone();
        let token = self.token.clone();
        let closed = self.closed.clone();
        let base = self.endpoint("/cmkfs/watch", "");
        let (tx, rx) = sync_channel(1);
        let spawned = std::thread::Builder::new()
            .name("cmkfs-vault-watch".into())
            .spawn(move || {
                let mut last = first;
                let mut failing = first.is_none();
                let mut backoff = Duration::from_millis(250);
                let notify = || !matches!(tx.try_send(()), Err(TrySendError::Disconnected(())));
                while !closed.load(Ordering::Relaxed) {
                    // After a failure, ask without a generation: the answer comes at once
                    // (a restarted server may still be at the generation we know).
                    let url = match last {
                        Some(g) if !failing => {
                            format!("{base}&generation={g}&timeout={WATCH_WAIT_S}")
                        }
                        _ => base.clone(),
                    };
                    match Self::poll_generation(
                        &long_agent,
                        &url,
                        token.as_str().unwrap_or_default(),
                    ) {
                        Ok(Ok(g)) => {
                            // A changed counter, or a connection back after a failure (the
                            // server may have restarted, or changes were missed): re-check.
                            let changed = failing || last.is_some_and(|l| l != g);
                            last = Some(g);
                            failing = false;
                            backoff = Duration::from_millis(250);
                            if changed && !notify() {
                                return;
                            }
                        }
                        Ok(Err(_)) | Err(_) => {
                            if !failing {
                                // Lost the server: let the monitor find out (and degrade) now.
                                failing = true;
                                if !notify() {
                                    return;
                                }
                            }
                            std::thread::sleep(backoff);
                            backoff = (backoff * 2).min(Duration::from_secs(2));
                        }
                    }
                }
            });
        match spawned {
            Ok(_) => Some(rx),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the vault watch thread; periodic checks only");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_https_only() {
        assert_eq!(normalize_url("https://h:1/").unwrap(), "https://h:1");
        assert!(normalize_url("http://h:1").is_err());
        assert!(normalize_url("https://").is_err());
        assert!(normalize_url("https://u@h").is_err());
    }

    #[test]
    fn errors_classify() {
        let body = |code: &str, inner: Option<&str>| {
            serde_json::to_vec(&serde_json::json!({
                "error": {"code": code, "message": "m", "innererror": inner.map(|c| serde_json::json!({"code": c}))}
            }))
            .unwrap()
        };
        let deny = |e: VaultError| match e {
            VaultError::Denied { reason, .. } => Some(reason),
            _ => None,
        };
        let e = error_from(
            403,
            &body("Forbidden", Some("KeyDisabled")),
            Op::Unwrap,
            "k",
            "v",
        );
        assert_eq!(deny(e), Some(DenyReason::KeyDisabled));
        let e = error_from(401, b"", Op::Unwrap, "k", "v");
        assert_eq!(deny(e), Some(DenyReason::PermissionDenied));
        let e = error_from(404, &body("KeyNotFound", None), Op::Unwrap, "k", "v");
        assert_eq!(deny(e), Some(DenyReason::KeyDeleted));
        assert!(matches!(
            error_from(404, &body("KeyNotFound", None), Op::Read, "k", "v"),
            VaultError::NotFound(_)
        ));
        assert!(matches!(
            error_from(503, b"", Op::Read, "k", "v"),
            VaultError::Unavailable(_)
        ));
        assert!(matches!(
            error_from(
                400,
                &body("BadParameter", Some("UnwrapFailed")),
                Op::Unwrap,
                "k",
                "v"
            ),
            VaultError::UnwrapFailed { .. }
        ));
        assert!(matches!(
            error_from(409, &body("Conflict", None), Op::Create, "k", "v"),
            VaultError::Conflict(_)
        ));
    }

    #[test]
    fn modulus_size() {
        let n = URL_SAFE_NO_PAD.encode([0x80u8; 256]);
        assert_eq!(modulus_bits(&n), 2048);
        let mut b = vec![0u8];
        b.extend([0xc0u8; 384]);
        assert_eq!(modulus_bits(&URL_SAFE_NO_PAD.encode(&b)), 3072);
    }
}
