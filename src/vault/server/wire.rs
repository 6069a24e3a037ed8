//! The JSON shapes of Azure Key Vault's keys REST API (api-versions 7.0-7.6 and 2025-07-01,
//! per the service's swagger `specification/keyvault/data-plane/Microsoft.KeyVault/stable/
//! */keys.json`), shared by the vault server and the HTTP client so that both speak exactly
//! the same wire format.
//!
//! Field names follow the service's own spelling (`key_ops`, `recoveryLevel`, `nextLink`...),
//! which is why the renames below are per field and not one `rename_all`.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};

/// One api-version of the keys API the service accepts, oldest first, and what it added
/// that the server serves. The server accepts every one and answers each with the newest
/// behaviour; an operation a version does not have is refused for that version (400).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApiVersion {
    /// The `api-version` value.
    pub name: &'static str,
    /// What it added to the keys API (documentation; the route table gates on the order).
    pub adds: &'static str,
}

/// Every api-version the service accepts for keys, oldest first; the last is the newest.
pub const API_VERSION_TABLE: [ApiVersion; 8] = [
    ApiVersion {
        name: "7.0",
        adds: "keys, versions, wrap/unwrap, encrypt/decrypt, sign/verify, backup/restore, \
               soft delete (deletedkeys, recover, purge)",
    },
    ApiVersion {
        name: "7.1",
        adds: "no new key operations",
    },
    ApiVersion {
        name: "7.2",
        adds: "no new key operations served here (Managed HSM key types)",
    },
    ApiVersion {
        name: "7.3",
        adds: "rotate, rotation policies, random bytes (rng), key release",
    },
    ApiVersion {
        name: "7.4",
        adds: "no new key operations",
    },
    ApiVersion {
        name: "7.5",
        adds: "no new key operations",
    },
    ApiVersion {
        name: "7.6",
        adds: "key attestation (Managed HSM)",
    },
    ApiVersion {
        name: "2025-07-01",
        adds: "no new key operations (the default of azure-keyvault-keys 4.11)",
    },
];

/// The position of an api-version in [`API_VERSION_TABLE`], `None` for one the service does
/// not accept.
pub fn api_version_rank(v: &str) -> Option<usize> {
    API_VERSION_TABLE.iter().position(|a| a.name == v)
}

/// The newest api-version.
pub const NEWEST_API_VERSION: &str = "2025-07-01";

/// The API version the client sends: 7.6, which every cmkfs server since the first accepts
/// (a newer client must keep working against an older server).
pub const API_VERSION: &str = "7.6";

/// Tag carrying a key's cmkfs wrap algorithm. Tags are a real Key Vault feature, so the
/// algorithm round-trips through a real Azure Key Vault as well as through a cmkfs server.
pub const WRAP_ALG_TAG: &str = "cmkfs-wrap-alg";

/// A JSON Web Key (public parts; `d`, `p`, `q`, `dp`, `dq`, `qi` only in imports).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct JsonWebKey {
    /// Key id: `<vault>/keys/<name>/<version>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    /// `RSA` or `RSA-HSM`.
    #[serde(default)]
    pub kty: String,
    /// Permitted operations.
    #[serde(default)]
    pub key_ops: Vec<String>,
    /// Modulus, base64url.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<String>,
    /// Public exponent, base64url.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub e: Option<String>,
    /// Private exponent (imports only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub d: Option<String>,
    /// First prime (imports only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p: Option<String>,
    /// Second prime (imports only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub q: Option<String>,
    /// d mod (p-1) (imports only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dp: Option<String>,
    /// d mod (q-1) (imports only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dq: Option<String>,
    /// q^-1 mod p (imports only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qi: Option<String>,
}

/// Key attributes as the service returns them.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeyAttributes {
    /// Whether the version may be used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Not-before, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Expiry, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
    /// Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<u64>,
    /// Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated: Option<u64>,
    /// `Recoverable+Purgeable`, `Recoverable`, ...
    #[serde(
        rename = "recoveryLevel",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub recovery_level: Option<String>,
    /// Days a deleted key stays recoverable.
    #[serde(
        rename = "recoverableDays",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub recoverable_days: Option<u32>,
    /// Whether the private key can be exported (never, here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exportable: Option<bool>,
}

/// A key version: `GET /keys/{name}/{version}` and most write operations answer with it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeyBundle {
    /// The public key and its id.
    pub key: JsonWebKey,
    /// Attributes.
    #[serde(default)]
    pub attributes: KeyAttributes,
    /// Application tags (cmkfs keeps its wrap algorithm in [`WRAP_ALG_TAG`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
}

/// A soft-deleted key: the bundle plus its deletion facts.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeletedKeyBundle {
    /// The latest version as it was when deleted.
    #[serde(flatten)]
    pub bundle: KeyBundle,
    /// `<vault>/deletedkeys/<name>`.
    #[serde(rename = "recoveryId", default)]
    pub recovery_id: String,
    /// Unix seconds.
    #[serde(rename = "deletedDate", default)]
    pub deleted_date: Option<u64>,
    /// Unix seconds.
    #[serde(rename = "scheduledPurgeDate", default)]
    pub scheduled_purge_date: Option<u64>,
}

/// One entry of `GET /keys` (versionless `kid`) or `GET /keys/{name}/versions` (versioned).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeyItem {
    /// Key id.
    pub kid: String,
    /// Attributes.
    #[serde(default)]
    pub attributes: KeyAttributes,
    /// Tags.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    /// Whether the service manages the key's lifetime (never, here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub managed: Option<bool>,
}

/// One entry of `GET /deletedkeys`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeletedKeyItem {
    /// The item.
    #[serde(flatten)]
    pub item: KeyItem,
    /// `<vault>/deletedkeys/<name>`.
    #[serde(rename = "recoveryId", default)]
    pub recovery_id: String,
    /// Unix seconds.
    #[serde(rename = "deletedDate", default)]
    pub deleted_date: Option<u64>,
    /// Unix seconds.
    #[serde(rename = "scheduledPurgeDate", default)]
    pub scheduled_purge_date: Option<u64>,
}

/// A page of a list: `{"value": [...], "nextLink": url-or-null}`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Page<T> {
    /// The items of this page.
    #[serde(default = "Vec::new")]
    pub value: Vec<T>,
    /// The next page's full URL, if any.
    #[serde(rename = "nextLink", default)]
    pub next_link: Option<String>,
}

/// `POST /keys/{name}/create`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct KeyCreateParameters {
    /// `RSA` or `RSA-HSM` (others are refused).
    pub kty: String,
    /// Modulus bits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_size: Option<u32>,
    /// Public exponent (only 65537 is supported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_exponent: Option<u32>,
    /// Permitted operations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_ops: Option<Vec<String>>,
    /// Attributes of the first version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attributes: Option<KeyAttributesUpdate>,
    /// Tags.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<BTreeMap<String, String>>,
}

/// `PUT /keys/{name}` (import).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct KeyImportParameters {
    /// The private key as a JWK.
    pub key: JsonWebKey,
    /// Whether to keep it in an HSM (ignored).
    #[serde(
        rename = "Hsm",
        alias = "hsm",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub hsm: Option<bool>,
    /// Attributes of the new version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attributes: Option<KeyAttributesUpdate>,
    /// Tags.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<BTreeMap<String, String>>,
}

/// Attributes a client may set: a field that is absent stays as is; `nbf`/`exp` set to JSON
/// `null` are cleared.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeyAttributesUpdate {
    /// Enable or disable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// `Some(None)`: clear.
    #[serde(
        default,
        deserialize_with = "double_option",
        skip_serializing_if = "Option::is_none"
    )]
    pub nbf: Option<Option<u64>>,
    /// `Some(None)`: clear.
    #[serde(
        default,
        deserialize_with = "double_option",
        skip_serializing_if = "Option::is_none"
    )]
    pub exp: Option<Option<u64>>,
}

/// `PATCH /keys/{name}/{version}`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct KeyUpdateParameters {
    /// New permitted operations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_ops: Option<Vec<String>>,
    /// New attributes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attributes: Option<KeyAttributesUpdate>,
    /// Tags: replace the version's tags when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<BTreeMap<String, String>>,
}

/// `POST .../wrapkey|unwrapkey` request.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeyOperationParameters {
    /// `RSA-OAEP-256` or `RSA-OAEP`.
    pub alg: String,
    /// base64url without padding.
    pub value: String,
}

/// `POST .../sign` request.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeySignParameters {
    /// `RS256` ... `PS512`.
    pub alg: String,
    /// The digest, base64url.
    pub value: String,
}

/// `POST .../verify` request.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeyVerifyParameters {
    /// `RS256` ... `PS512`.
    pub alg: String,
    /// The digest that was signed, base64url.
    pub digest: String,
    /// The signature, base64url.
    pub value: String,
}

/// `POST .../verify` answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeyVerifyResult {
    /// Whether the signature verifies.
    pub value: bool,
}

/// `POST /keys/{name}/backup` answer and `POST /keys/restore` request.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeyBackupBlob {
    /// The backup blob, base64url.
    pub value: String,
}

/// `POST /rng` request.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RandomBytesRequest {
    /// 1-128.
    pub count: i64,
}

/// `POST /rng` answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RandomBytes {
    /// The bytes, base64url.
    pub value: String,
}

/// `GET|PUT /keys/{name}/rotationpolicy`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeyRotationPolicy {
    /// `<vault>/keys/<name>/rotationpolicy` (answers only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// At most one `Rotate` and one `Notify`.
    #[serde(rename = "lifetimeActions", default)]
    pub lifetime_actions: Vec<LifetimeActions>,
    /// `expiryTime`, `created`, `updated`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attributes: Option<KeyRotationPolicyAttributes>,
}

/// One lifetime action.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct LifetimeActions {
    /// When.
    #[serde(default)]
    pub trigger: LifetimeActionsTrigger,
    /// What.
    #[serde(default)]
    pub action: LifetimeActionsType,
}

/// A lifetime action's trigger (ISO 8601 durations).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct LifetimeActionsTrigger {
    /// After the latest version's creation.
    #[serde(
        rename = "timeAfterCreate",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub time_after_create: Option<String>,
    /// Before the latest version's expiry.
    #[serde(
        rename = "timeBeforeExpiry",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub time_before_expiry: Option<String>,
}

/// A lifetime action's type.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct LifetimeActionsType {
    /// `Rotate` or `Notify` (case-insensitive).
    #[serde(rename = "type", default)]
    pub kind: String,
}

/// A rotation policy's attributes.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeyRotationPolicyAttributes {
    /// ISO 8601 expiry given to new versions.
    #[serde(
        rename = "expiryTime",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub expiry_time: Option<String>,
    /// Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<u64>,
    /// Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated: Option<u64>,
}

/// `POST .../wrapkey|unwrapkey` answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeyOperationResult {
    /// The versioned key that did the operation.
    pub kid: String,
    /// base64url without padding.
    pub value: String,
}

/// The error envelope: `{"error": {"code", "message", "innererror": {"code"}}}`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorEnvelope {
    /// The error.
    pub error: ErrorBody,
}

/// The `error` object.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    /// `Unauthorized`, `Forbidden`, `KeyNotFound`, `Conflict`, `BadParameter`, ...
    pub code: String,
    /// Human-readable.
    #[serde(default)]
    pub message: String,
    /// A finer reason, e.g. `KeyDisabled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub innererror: Option<InnerError>,
}

/// The `innererror` object.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InnerError {
    /// e.g. `KeyDisabled`, `AccessDenied`, `KeyDeleted`, `UnwrapFailed`.
    pub code: String,
}

/// `GET /cmkfs/watch` answer (a cmkfs extension, see the server's module docs).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct WatchResult {
    /// The vault's change counter.
    pub generation: u64,
}

/// Distinguishes an absent field (`None`) from an explicit `null` (`Some(None)`).
fn double_option<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<u64>>, D::Error> {
    Option::<u64>::deserialize(d).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn null_clears_absent_keeps() {
        let u: KeyAttributesUpdate = serde_json::from_str(r#"{"nbf":null,"exp":5}"#).unwrap();
        assert_eq!(u.nbf, Some(None));
        assert_eq!(u.exp, Some(Some(5)));
        let u: KeyAttributesUpdate = serde_json::from_str(r#"{"enabled":false}"#).unwrap();
        assert_eq!((u.enabled, u.nbf, u.exp), (Some(false), None, None));
    }

    #[test]
    fn deleted_bundle_flattens() {
        let d = DeletedKeyBundle {
            recovery_id: "r".into(),
            ..Default::default()
        };
        let v = serde_json::to_value(&d).unwrap();
        assert!(v.get("key").is_some() && v.get("recoveryId").is_some());
    }
}
