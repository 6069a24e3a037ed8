//! The Azure vault backend: a real Azure Key Vault or Managed HSM through the official Azure
//! SDK for Rust (`azure_security_keyvault_keys`'s `KeyClient`), signing in with Microsoft
//! Entra ID through `azure_identity` ([`auth`]; the credential file's `azure` section, see
//! [`crate::vault::azure_auth`]). Built with the `azure` feature (on by default).
//!
//! - **Selection**: [`crate::vault::connect`] picks this backend for `*.vault.azure.net`,
//!   `*.managedhsm.azure.net` and the sovereign clouds' hosts, and for any vault whose
//!   credential has an `azure` section (a cmkfs server reached through the SDK with
//!   `"kind": "bearer-token"`, as the tests do). Other `https://` vaults use
//!   [`crate::vault::http`].
//! - **Transport** ([`transport`]): the SDK's reqwest over rustls (aws-lc-rs), no redirects,
//!   the credential's pinned CA if any; the SDK's retry policy, bounded to 3 attempts
//!   within 10 s so that a key check never waits long.
//! - **Errors** keep the trait's split: the key owner's refusals (401; 403; 404 for a key a
//!   volume names; Entra ID refusing the credential, e.g. a deleted client secret, answered
//!   with AADSTS error codes) are [`VaultError::Denied`]; network failures, timeouts, 429 and
//!   5xx after the retries, and a token that cannot be fetched (IMDS down) are
//!   [`VaultError::Unavailable`].
//! - **Runtime**: the SDK is async; each vault owns a one-thread tokio runtime and blocks on
//!   it (the FUSE daemon's threads are not tokio threads).
//!
//! Key ids are `<this vault's URL>/keys/<name>/<version>`, whatever host the service put in
//! them, as in [`crate::vault::http`].

mod auth;
mod transport;

pub use auth::PUBLIC_AUTHORITY;

use azure_core::error::ErrorKind;
use azure_core::http::{ExponentialRetryOptions, RequestContent, RetryOptions};
use azure_core::time::Duration as SdkDuration;
use azure_security_keyvault_keys::models::{
    CreateKeyParameters, DeletedKey, DeletedKeyProperties, EncryptionAlgorithm,
    ImportKeyParameters, JsonWebKey as SdkJwk, Key, KeyAttributes as SdkAttrs,
    KeyClientGetKeyOptions, KeyClientListDeletedKeyPropertiesOptions,
    KeyClientListKeyPropertiesOptions, KeyClientListKeyPropertiesVersionsOptions,
    KeyClientUpdateKeyPropertiesOptions, KeyClientWrapKeyOptions, KeyOperation,
    KeyOperationParameters, KeyProperties, KeyType, UpdateKeyPropertiesParameters,
};
use azure_security_keyvault_keys::{KeyClient, KeyClientOptions};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use futures::TryStreamExt as _;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::str::FromStr;
use zeroize::Zeroizing;

use super::azure_auth::is_azure_url;
use super::server::wire::{ErrorEnvelope, WRAP_ALG_TAG};
use super::{
    CreateKeyOptions, Credential, DeletedKeyInfo, DenyReason, ImportKeyOptions, KeyId, KeyInfo,
    KeyUpdate, Permission, Vault, VaultError, VaultProperties, WrapAlg, Wrapped,
};

/// The retries of every SDK pipeline here (Key Vault and token endpoints): 3 attempts within
/// 10 s, so that a mount's key check learns of an outage quickly (its grace period covers
/// longer ones).
pub(super) fn retry() -> RetryOptions {
    RetryOptions::exponential(ExponentialRetryOptions {
        initial_delay: SdkDuration::milliseconds(250),
        max_retries: 2,
        max_total_elapsed: SdkDuration::seconds(10),
        max_delay: SdkDuration::seconds(2),
    })
}

/// Which kind of call failed, for reading its errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Read,
    Change,
    Wrap,
    Unwrap,
}

/// A connection to an Azure Key Vault or Managed HSM (or a cmkfs server) through the SDK.
pub struct AzureVault {
    url: String,
    client: KeyClient,
    rt: tokio::runtime::Runtime,
}

impl std::fmt::Debug for AzureVault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AzureVault")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl AzureVault {
    /// Connects as a credential (its `azure` section, or its secret as a bearer token). No
    /// request is made yet.
    pub fn connect(cred: &Credential) -> Result<AzureVault, VaultError> {
        let url = super::http::normalize_url(&cred.vault)?;
        let transport = transport::CmkfsTransport::new(cred.ca_cert.as_deref())?.into_sdk();
        let token = auth::token_credential(cred, &transport)?;
        let mut opts = KeyClientOptions::default();
        opts.client_options.transport = Some(transport);
        opts.client_options.retry = retry();
        // The SDK checks that the challenge names a Key Vault domain of the vault's host; a
        // cmkfs server names its own URL, which that check cannot know.
        opts.verify_challenge_resource = Some(is_azure_url(&url));
        let client = KeyClient::new(&url, token, Some(opts))
            .map_err(|e| VaultError::Invalid(format!("vault URL {url}: {e}")))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("cmkfs-azure")
            .enable_all()
            .build()
            .map_err(|e| VaultError::Unavailable(format!("cannot start the SDK runtime: {e}")))?;
        Ok(AzureVault { url, client, rt })
    }

    fn run<T>(
        &self,
        op: Op,
        what: &str,
        fut: impl Future<Output = azure_core::Result<T>>,
    ) -> Result<T, VaultError> {
        self.rt
            .block_on(fut)
            .map_err(|e| error_from(&e, op, what, &self.url))
    }

    fn what(&self, name: &str, version: Option<&str>) -> String {
        match version {
            Some(v) => format!("{}/keys/{name}/{v}", self.url),
            None => format!("{}/keys/{name}", self.url),
        }
    }

    fn info(&self, kid: Option<&str>, attrs: Option<&SdkAttrs>) -> Result<KeyInfo, VaultError> {
        let kid = kid.unwrap_or_default();
        let k = KeyId::from_str(kid).map_err(|_| {
            VaultError::Unavailable(format!(
                "vault {} answered with a malformed key id {kid:?}",
                self.url
            ))
        })?;
        let secs = |t: Option<time::OffsetDateTime>| t.map(|t| t.unix_timestamp().max(0) as u64);
        let a = attrs.cloned().unwrap_or_default();
        Ok(KeyInfo {
            kid: format!("{}/keys/{}/{}", self.url, k.name, k.version),
            name: k.name,
            version: k.version,
            kty: "RSA".into(),
            enabled: a.enabled.unwrap_or(true),
            created: secs(a.created).unwrap_or(0),
            updated: secs(a.updated).unwrap_or(0),
            nbf: secs(a.not_before),
            exp: secs(a.expires),
            recovery_level: a.recovery_level.map(|l| l.to_string()).unwrap_or_default(),
            recoverable_days: a.recoverable_days.map_or(0, |d| d.max(0) as u32),
            ..Default::default()
        })
    }

    fn key_info(&self, k: &Key) -> Result<KeyInfo, VaultError> {
        let jwk = k.key.clone().unwrap_or_default();
        let mut info = self.info(jwk.kid.as_deref(), k.attributes.as_ref())?;
        let n = jwk.n.clone().unwrap_or_default();
        info.key_size = modulus_bits(&n);
        info.n = URL_SAFE_NO_PAD.encode(&n);
        info.e = URL_SAFE_NO_PAD.encode(jwk.e.clone().unwrap_or_default());
        info.key_ops = jwk.key_ops.clone().unwrap_or_default();
        let (tags, alg) = split_tags(k.tags.as_ref());
        info.tags = tags;
        info.wrap_alg = alg;
        Ok(info)
    }

    fn props_info(&self, p: &KeyProperties) -> Result<KeyInfo, VaultError> {
        let mut info = self.info(p.kid.as_deref(), p.attributes.as_ref())?;
        let (tags, alg) = split_tags(p.tags.as_ref());
        info.tags = tags;
        info.wrap_alg = alg;
        Ok(info)
    }

    fn deleted_info(&self, d: &DeletedKey) -> Result<DeletedKeyInfo, VaultError> {
        let mut k = Key::default();
        k.attributes = d.attributes.clone();
        k.key = d.key.clone();
        k.tags = d.tags.clone();
        let key = self.key_info(&k)?;
        Ok(DeletedKeyInfo {
            recovery_id: format!("{}/deletedkeys/{}", self.url, key.name),
            deleted_date: d
                .deleted_date
                .map_or(0, |t| t.unix_timestamp().max(0) as u64),
            scheduled_purge_date: d
                .scheduled_purge_date
                .map_or(0, |t| t.unix_timestamp().max(0) as u64),
            key,
        })
    }

    fn deleted_props_info(&self, d: &DeletedKeyProperties) -> DeletedKeyInfo {
        let name = d
            .kid
            .as_deref()
            .unwrap_or_default()
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_string();
        let (tags, alg) = split_tags(d.tags.as_ref());
        DeletedKeyInfo {
            recovery_id: format!("{}/deletedkeys/{name}", self.url),
            deleted_date: d
                .deleted_date
                .map_or(0, |t| t.unix_timestamp().max(0) as u64),
            scheduled_purge_date: d
                .scheduled_purge_date
                .map_or(0, |t| t.unix_timestamp().max(0) as u64),
            key: KeyInfo {
                kid: format!("{}/keys/{name}", self.url),
                name,
                kty: "RSA".into(),
                tags,
                wrap_alg: alg,
                enabled: true,
                ..Default::default()
            },
        }
    }
}

/// User tags and cmkfs's wrap-algorithm tag.
fn split_tags(tags: Option<&HashMap<String, String>>) -> (BTreeMap<String, String>, WrapAlg) {
    let mut t: BTreeMap<String, String> = tags
        .map(|t| t.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    let alg = t
        .remove(WRAP_ALG_TAG)
        .and_then(|a| a.parse().ok())
        .unwrap_or_default();
    (t, alg)
}

fn modulus_bits(n: &[u8]) -> u32 {
    let skip = n.iter().take_while(|b| **b == 0).count();
    let m = &n[skip..];
    match m.first() {
        None => 0,
        Some(first) => (m.len() as u32) * 8 - first.leading_zeros(),
    }
}

fn enc_alg(alg: WrapAlg) -> EncryptionAlgorithm {
    match alg {
        WrapAlg::RsaOaep256 => EncryptionAlgorithm::RsaOaep256,
        WrapAlg::RsaOaep => EncryptionAlgorithm::RsaOaep,
    }
}

fn content<T>(v: T) -> Result<RequestContent<T>, VaultError>
where
    RequestContent<T>: TryFrom<T, Error = azure_core::Error>,
{
    RequestContent::try_from(v).map_err(|e| VaultError::Invalid(format!("cannot encode: {e}")))
}

/// The inner error code of a Key Vault error answer, if its body came back.
fn inner_code(e: &azure_core::Error) -> Option<String> {
    let ErrorKind::HttpResponse {
        raw_response: Some(raw),
        ..
    } = e.kind()
    else {
        return None;
    };
    let env: ErrorEnvelope = serde_json::from_slice(raw.body().as_ref()).ok()?;
    env.error.innererror.map(|i| i.code)
}

/// The error that carries the HTTP answer: the SDK wraps a token endpoint's refusal in the
/// policies it passed through, so look down the source chain.
fn http_cause(e: &azure_core::Error) -> &azure_core::Error {
    let mut cur: &(dyn std::error::Error + 'static) = e;
    loop {
        if let Some(a) = cur.downcast_ref::<azure_core::Error>() {
            if matches!(a.kind(), ErrorKind::HttpResponse { .. }) {
                return a;
            }
        }
        match cur.source() {
            Some(s) => cur = s,
            None => return e,
        }
    }
}

/// Maps an SDK error onto the trait's classes (see the module docs).
fn error_from(outer: &azure_core::Error, op: Op, what: &str, vault: &str) -> VaultError {
    let e = http_cause(outer);
    let detail = if std::ptr::eq(e, outer) {
        outer.to_string()
    } else {
        format!("{outer}: {e}")
    };
    let denied = |reason| VaultError::Denied {
        reason,
        what: format!("{what} ({detail})"),
    };
    match e.kind() {
        ErrorKind::HttpResponse {
            status, error_code, ..
        } => {
            let status = u16::from(*status);
            let code = error_code.as_deref().unwrap_or_default();
            // Entra ID's refusals carry numeric AADSTS codes; Key Vault's are words.
            let entra = !code.is_empty() && code.bytes().all(|b| b.is_ascii_digit() || b == b',');
            let inner = inner_code(e);
            let lower = detail.to_ascii_lowercase();
            match status {
                401 => VaultError::Denied {
                    reason: DenyReason::PermissionDenied,
                    what: format!(
                        "{what} (vault {vault} or Entra ID refused the credential: {detail})"
                    ),
                },
                400 if entra => VaultError::Denied {
                    reason: DenyReason::PermissionDenied,
                    what: format!("{what} (Entra ID refused the credential: {detail})"),
                },
                403 => match inner.as_deref() {
                    Some("KeyDisabled") => denied(DenyReason::KeyDisabled),
                    Some("KeyExpired") => denied(DenyReason::KeyExpired),
                    Some("OperationNotAllowed") => denied(DenyReason::OperationNotAllowed),
                    _ if lower.contains("disabled") => denied(DenyReason::KeyDisabled),
                    _ if lower.contains("expired") || lower.contains("not yet valid") => {
                        denied(DenyReason::KeyExpired)
                    }
                    _ if lower.contains("not permitted") => denied(DenyReason::OperationNotAllowed),
                    _ => denied(DenyReason::PermissionDenied),
                },
                404 => match inner.as_deref() {
                    Some("KeyDeleted") => denied(DenyReason::KeyDeleted),
                    Some("KeyPurged") => denied(DenyReason::KeyPurged),
                    // The key a volume names is gone: the owner's decision.
                    _ if matches!(op, Op::Wrap | Op::Unwrap) => denied(DenyReason::KeyDeleted),
                    _ => VaultError::NotFound(detail),
                },
                409 => VaultError::Conflict(detail),
                400 if op == Op::Unwrap => VaultError::UnwrapFailed {
                    kid: what.to_string(),
                },
                429 | 500..=599 => VaultError::Unavailable(format!(
                    "vault {vault} answered HTTP {status}: {detail}"
                )),
                _ => VaultError::Invalid(format!("vault {vault} answered HTTP {status}: {detail}")),
            }
        }
        ErrorKind::Credential => VaultError::Unavailable(format!(
            "cannot get an Entra ID token for {vault}: {detail}"
        )),
        _ => VaultError::Unavailable(format!("cannot reach vault {vault}: {detail}")),
    }
}

fn check_name(name: &str) -> Result<(), VaultError> {
    if super::valid_key_name(name) {
        Ok(())
    } else {
        Err(VaultError::Invalid(format!(
            "invalid key name {name:?}: use 1-127 letters, digits and dashes"
        )))
    }
}

fn to_time(t: u64) -> Option<time::OffsetDateTime> {
    time::OffsetDateTime::from_unix_timestamp(i64::try_from(t).ok()?).ok()
}

impl Vault for AzureVault {
    fn url(&self) -> String {
        self.url.clone()
    }

    fn create_key(&self, name: &str, opts: &CreateKeyOptions) -> Result<KeyInfo, VaultError> {
        check_name(name)?;
        let params = content(CreateKeyParameters {
            kty: Some(KeyType::Rsa),
            key_size: Some(opts.key_size as i32),
            key_ops: Some(vec![KeyOperation::WrapKey, KeyOperation::UnwrapKey]),
            tags: Some([(WRAP_ALG_TAG.to_string(), opts.wrap_alg.to_string())].into()),
            ..Default::default()
        })?;
        let k = self.run(Op::Change, &self.what(name, None), async {
            self.client
                .create_key(name, params, None)
                .await?
                .into_model()
        })?;
        self.key_info(&k)
    }

    fn get_key(&self, name: &str, version: Option<&str>) -> Result<KeyInfo, VaultError> {
        check_name(name)?;
        let opts = KeyClientGetKeyOptions {
            key_version: version.map(str::to_string),
            ..Default::default()
        };
        let k = self.run(Op::Read, &self.what(name, version), async {
            self.client.get_key(name, Some(opts)).await?.into_model()
        })?;
        self.key_info(&k)
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
        let what = format!("{}/keys", self.url);
        let items: Vec<KeyProperties> = self.run(Op::Read, &what, async {
            let opts = KeyClientListKeyPropertiesOptions::default();
            self.client
                .list_key_properties(Some(opts))?
                .try_collect()
                .await
        })?;
        let mut out = Vec::with_capacity(items.len());
        for p in items {
            let name = p
                .kid
                .as_deref()
                .unwrap_or_default()
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .to_string();
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
        check_name(name)?;
        let items: Vec<KeyProperties> = self.run(Op::Read, &self.what(name, None), async {
            let opts = KeyClientListKeyPropertiesVersionsOptions::default();
            self.client
                .list_key_properties_versions(name, Some(opts))?
                .try_collect()
                .await
        })?;
        let mut out = items
            .iter()
            .map(|p| self.props_info(p))
            .collect::<Result<Vec<_>, _>>()?;
        out.sort_by_key(|a| a.created);
        Ok(out)
    }

    fn rotate_key(&self, name: &str) -> Result<KeyInfo, VaultError> {
        check_name(name)?;
        let k = self.run(Op::Change, &self.what(name, None), async {
            self.client.rotate_key(name, None).await?.into_model()
        })?;
        self.key_info(&k)
    }

    fn import_key(
        &self,
        name: &str,
        pkcs8_der: &[u8],
        opts: &ImportKeyOptions,
    ) -> Result<KeyInfo, VaultError> {
        check_name(name)?;
        let mut w = super::server::jwk::jwk_from_pkcs8(pkcs8_der)?;
        let dec = |s: &Option<String>| s.as_deref().and_then(|v| URL_SAFE_NO_PAD.decode(v).ok());
        let mut key = SdkJwk {
            kty: Some(KeyType::Rsa),
            n: dec(&w.n),
            e: dec(&w.e),
            d: dec(&w.d),
            p: dec(&w.p),
            q: dec(&w.q),
            dp: dec(&w.dp),
            dq: dec(&w.dq),
            qi: dec(&w.qi),
            key_ops: Some(super::default_key_ops()),
            ..Default::default()
        };
        super::server::jwk::zeroize_private(&mut w);
        let params = content(ImportKeyParameters {
            key: Some(key.clone()),
            tags: opts
                .wrap_alg
                .map(|a| [(WRAP_ALG_TAG.to_string(), a.to_string())].into()),
            ..Default::default()
        });
        // The private parts are cleared from our copies (the request body is the SDK's).
        for part in [
            &mut key.d,
            &mut key.p,
            &mut key.q,
            &mut key.dp,
            &mut key.dq,
            &mut key.qi,
        ] {
            if let Some(v) = part.as_mut() {
                zeroize::Zeroize::zeroize(v);
            }
        }
        let params = params?;
        let k = self.run(Op::Change, &self.what(name, None), async {
            self.client
                .import_key(name, params, None)
                .await?
                .into_model()
        })?;
        self.key_info(&k)
    }

    fn update_key(
        &self,
        name: &str,
        version: Option<&str>,
        update: &KeyUpdate,
    ) -> Result<KeyInfo, VaultError> {
        check_name(name)?;
        if matches!(update.nbf, Some(None)) || matches!(update.exp, Some(None)) {
            return Err(VaultError::Invalid(
                "clearing nbf or exp is not possible through the Azure SDK: set a new date \
                 instead"
                    .into(),
            ));
        }
        let key_ops = match &update.key_ops {
            Some(ops) => Some(
                ops.iter()
                    .map(|o| KeyOperation::from_str(o))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| VaultError::Invalid(format!("key_ops: {e}")))?,
            ),
            None => None,
        };
        let current = match &update.tags {
            Some(_) => Some(self.describe_key(name, version)?),
            None => None,
        };
        let tags = update.tags.as_ref().map(|t| {
            let mut t: HashMap<String, String> = t.clone().into_iter().collect();
            if let Some(k) = &current {
                t.insert(WRAP_ALG_TAG.to_string(), k.wrap_alg.to_string());
            }
            t
        });
        let params = content(UpdateKeyPropertiesParameters {
            key_attributes: Some(SdkAttrs {
                enabled: update.enabled,
                not_before: update.nbf.flatten().and_then(to_time),
                expires: update.exp.flatten().and_then(to_time),
                ..Default::default()
            }),
            key_ops,
            tags,
            ..Default::default()
        })?;
        let opts = KeyClientUpdateKeyPropertiesOptions {
            key_version: version.map(str::to_string),
            ..Default::default()
        };
        let k = self.run(Op::Change, &self.what(name, version), async {
            self.client
                .update_key_properties(name, params, Some(opts))
                .await?
                .into_model()
        })?;
        self.key_info(&k)
    }

    fn delete_key(&self, name: &str) -> Result<DeletedKeyInfo, VaultError> {
        check_name(name)?;
        let d = self.run(Op::Change, &self.what(name, None), async {
            self.client.delete_key(name, None).await?.into_model()
        })?;
        self.deleted_info(&d)
    }

    fn list_deleted_keys(&self) -> Result<Vec<DeletedKeyInfo>, VaultError> {
        let what = format!("{}/deletedkeys", self.url);
        let items: Vec<DeletedKeyProperties> = self.run(Op::Read, &what, async {
            let opts = KeyClientListDeletedKeyPropertiesOptions::default();
            self.client
                .list_deleted_key_properties(Some(opts))?
                .try_collect()
                .await
        })?;
        Ok(items.iter().map(|d| self.deleted_props_info(d)).collect())
    }

    fn get_deleted_key(&self, name: &str) -> Result<DeletedKeyInfo, VaultError> {
        check_name(name)?;
        let what = format!("{}/deletedkeys/{name}", self.url);
        let d = self.run(Op::Read, &what, async {
            self.client.get_deleted_key(name, None).await?.into_model()
        })?;
        self.deleted_info(&d)
    }

    fn recover_deleted_key(&self, name: &str) -> Result<KeyInfo, VaultError> {
        check_name(name)?;
        let what = format!("{}/deletedkeys/{name}", self.url);
        let k = self.run(Op::Change, &what, async {
            self.client
                .recover_deleted_key(name, None)
                .await?
                .into_model()
        })?;
        self.key_info(&k)
    }

    fn purge_deleted_key(&self, name: &str) -> Result<(), VaultError> {
        check_name(name)?;
        let what = format!("{}/deletedkeys/{name}", self.url);
        self.run(Op::Change, &what, async {
            self.client.purge_deleted_key(name, None).await.map(|_| ())
        })
    }

    fn properties(&self) -> Result<VaultProperties, VaultError> {
        Err(VaultError::Invalid(
            "vault settings are not part of the keys API: see them in the Azure portal or with \
             `az keyvault show`"
                .into(),
        ))
    }

    fn permissions(&self, _name: &str) -> Result<Vec<Permission>, VaultError> {
        Err(VaultError::Invalid(
            "access policies and role assignments are not part of the keys API: see them with \
             `az keyvault show` or `az role assignment list`"
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
        check_name(name)?;
        let what = self.what(name, version);
        let params = content(KeyOperationParameters {
            algorithm: Some(enc_alg(alg)),
            value: Some(plaintext.to_vec()),
            ..Default::default()
        })?;
        let opts = KeyClientWrapKeyOptions {
            key_version: version.map(str::to_string),
            ..Default::default()
        };
        let r = self.run(Op::Wrap, &what, async {
            self.client
                .wrap_key(name, params, Some(opts))
                .await?
                .into_model()
        })?;
        let kid = r.kid.as_deref().unwrap_or_default();
        let k = KeyId::from_str(kid).map_err(|_| {
            VaultError::Unavailable(format!(
                "vault {} answered with a malformed key id",
                self.url
            ))
        })?;
        if k.name != name || version.is_some_and(|v| v != k.version) {
            return Err(VaultError::Unavailable(format!(
                "vault {} wrapped with {kid} instead of {what}",
                self.url
            )));
        }
        Ok(Wrapped {
            kid: KeyId {
                vault: self.url.clone(),
                name: k.name,
                version: k.version,
            },
            alg,
            value: r.result.unwrap_or_default(),
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
        check_name(&kid.name)?;
        let params = content(KeyOperationParameters {
            algorithm: Some(enc_alg(alg)),
            value: Some(wrapped.to_vec()),
            ..Default::default()
        })?;
        let mut r = self.run(Op::Unwrap, &kid.to_string(), async {
            self.client
                .unwrap_key(&kid.name, &kid.version, params, None)
                .await?
                .into_model()
        })?;
        Ok(Zeroizing::new(r.result.take().unwrap_or_default()))
    }
}
