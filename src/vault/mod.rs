//! Key vaults: where key-encryption keys (KEKs) live. One trait, several backends.
//!
//! Key material never leaves a vault: callers ask it to wrap and unwrap DEKs. Errors separate
//! *denied* (the key owner said no: disabled, deleted, no permission → revoke now) from
//! *unavailable* (cannot reach the vault → degrade, revoke after a grace period).

#[cfg(feature = "azure")]
pub mod azure;
pub mod azure_auth;
pub mod http;
pub mod local;
pub mod pkcs11;
pub mod server;
pub mod trust;
pub mod watch;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::home::Home;

/// Key-wrapping algorithm (JWA names, as Azure Key Vault uses them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum WrapAlg {
    /// RSAES-OAEP with SHA-256 and MGF1-SHA-256: the default.
    #[serde(rename = "RSA-OAEP-256")]
    #[default]
    RsaOaep256,
    /// RSAES-OAEP with SHA-1 and MGF1-SHA-1: for HSMs without SHA-2 OAEP (SoftHSM2 2.6).
    #[serde(rename = "RSA-OAEP")]
    RsaOaep,
}

impl WrapAlg {
    /// The JWA name.
    pub fn as_str(self) -> &'static str {
        match self {
            WrapAlg::RsaOaep256 => "RSA-OAEP-256",
            WrapAlg::RsaOaep => "RSA-OAEP",
        }
    }
}

impl fmt::Display for WrapAlg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for WrapAlg {
    type Err = VaultError;
    fn from_str(s: &str) -> Result<Self, VaultError> {
        match s {
            "RSA-OAEP-256" => Ok(WrapAlg::RsaOaep256),
            "RSA-OAEP" => Ok(WrapAlg::RsaOaep),
            "RSA1_5" => Err(rsa1_5_refused()),
            other => Err(VaultError::Invalid(format!(
                "unknown wrap algorithm {other:?} (expected RSA-OAEP-256 or RSA-OAEP)"
            ))),
        }
    }
}

/// A full, versioned key identifier: `<vault-url>/keys/<name>/<version>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KeyId {
    /// Vault URL, e.g. `local:` or `https://vault.example:8443`.
    pub vault: String,
    /// Key name.
    pub name: String,
    /// Version (32 lowercase hex digits for vaults cmkfs creates).
    pub version: String,
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/keys/{}/{}", self.vault, self.name, self.version)
    }
}

impl FromStr for KeyId {
    type Err = VaultError;
    fn from_str(s: &str) -> Result<Self, VaultError> {
        let bad = || {
            VaultError::Invalid(format!(
                "malformed key id {s:?}: expected <vault-url>/keys/<name>/<version>"
            ))
        };
        let idx = s.rfind("/keys/").ok_or_else(bad)?;
        let (vault, rest) = (&s[..idx], &s[idx + "/keys/".len()..]);
        let (name, version) = rest.split_once('/').ok_or_else(bad)?;
        if vault.is_empty() || !valid_key_name(name) || version.is_empty() || version.contains('/')
        {
            return Err(bad());
        }
        Ok(KeyId {
            vault: vault.to_string(),
            name: name.to_string(),
            version: version.to_string(),
        })
    }
}

/// Key names as Azure Key Vault allows them: 1-127 of `[0-9a-zA-Z-]`.
pub fn valid_key_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 127
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// Public facts about one key version (never the private key).
///
/// Fields added after the first release carry `#[serde(default)]` so older JSON still parses;
/// build values with `..Default::default()` so new fields do not break struct literals.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeyInfo {
    /// Full versioned id, as a string (`kid` in Key Vault's JSON).
    pub kid: String,
    /// Key name.
    pub name: String,
    /// Version id.
    pub version: String,
    /// Always `RSA` for now.
    pub kty: String,
    /// Modulus size in bits.
    pub key_size: u32,
    /// Permitted operations (`wrapKey`, `unwrapKey`, ...).
    pub key_ops: Vec<String>,
    /// Whether the version may be used at all.
    pub enabled: bool,
    /// Unix seconds.
    pub created: u64,
    /// Unix seconds.
    pub updated: u64,
    /// Algorithm this key wraps with by default.
    pub wrap_alg: WrapAlg,
    /// Not-before (Unix seconds): before it, wrap is refused (unwrap still works).
    #[serde(default)]
    pub nbf: Option<u64>,
    /// Expiry (Unix seconds): after it, wrap is refused (unwrap still works).
    #[serde(default)]
    pub exp: Option<u64>,
    /// RSA modulus, base64url without padding (JWK `n`): public.
    #[serde(default)]
    pub n: String,
    /// RSA public exponent, base64url without padding (JWK `e`): public.
    #[serde(default)]
    pub e: String,
    /// Azure's `recoveryLevel`: `Recoverable+Purgeable`, `Recoverable`,
    /// `CustomizedRecoverable+Purgeable` or `CustomizedRecoverable` (see [`recovery_level`]).
    #[serde(default)]
    pub recovery_level: String,
    /// Days a deleted key stays recoverable (Azure's `recoverableDays`).
    #[serde(default)]
    pub recoverable_days: u32,
    /// Whether the version's private key was imported rather than generated in the vault.
    #[serde(default)]
    pub imported: bool,
    /// Application tags of the version (Key Vault's `tags`; cmkfs's own wrap-algorithm tag is
    /// not among them: it is [`KeyInfo::wrap_alg`]).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub tags: std::collections::BTreeMap<String, String>,
}

/// A soft-deleted key: its latest version plus when it was deleted and when it goes for good.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeletedKeyInfo {
    /// The latest version as it was when deleted.
    pub key: KeyInfo,
    /// Where the deleted key is addressed: `<vault-url>/deletedkeys/<name>`.
    pub recovery_id: String,
    /// Unix seconds.
    pub deleted_date: u64,
    /// Unix seconds: from then on the vault may purge it (and, with purge protection, only then).
    pub scheduled_purge_date: u64,
}

/// Changes to a key version's attributes (`None` = leave as is).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyUpdate {
    /// Enable or disable the version.
    pub enabled: Option<bool>,
    /// New not-before: `Some(None)` clears it.
    pub nbf: Option<Option<u64>>,
    /// New expiry: `Some(None)` clears it.
    pub exp: Option<Option<u64>>,
    /// New permitted operations (JWK `key_ops` names, see [`KEY_OPS`]).
    pub key_ops: Option<Vec<String>>,
    /// New application tags of the version (replacing all of them; see [`validate_tags`]).
    pub tags: Option<std::collections::BTreeMap<String, String>>,
}

/// Options for importing an existing private key as a new version.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImportKeyOptions {
    /// Wrap algorithm of a key created by the import; `None` = `RSA-OAEP-256` for a new key,
    /// the key's own for an existing one (which must not be contradicted: it is per key).
    pub wrap_alg: Option<WrapAlg>,
}

/// The JWK `key_ops` values a key may carry. The vault acts on `wrapKey` and `unwrapKey`.
pub const KEY_OPS: [&str; 6] = [
    "encrypt",
    "decrypt",
    "sign",
    "verify",
    "wrapKey",
    "unwrapKey",
];

/// `key_ops` of a new key: the two operations a KEK exists for.
pub fn default_key_ops() -> Vec<String> {
    vec!["wrapKey".to_string(), "unwrapKey".to_string()]
}

/// `key_ops` Key Vault gives an RSA key created or imported without any: all six. The vault
/// server uses them for requests that name none, as the service does; the CLI keeps
/// [`default_key_ops`] (a KEK needs nothing else).
pub fn all_key_ops() -> Vec<String> {
    KEY_OPS.iter().map(|o| o.to_string()).collect()
}

/// Most tags a key version may carry (Key Vault's limit).
pub const MAX_TAGS: usize = 15;
/// Longest tag name and value, in characters (Key Vault's limit).
pub const MAX_TAG_LEN: usize = 256;

/// Checks application tags against Key Vault's limits: at most 15, names 1-256 characters,
/// values at most 256.
pub fn validate_tags(tags: &std::collections::BTreeMap<String, String>) -> Result<(), VaultError> {
    if tags.len() > MAX_TAGS {
        return Err(VaultError::Invalid(format!(
            "{} tags given: a key version carries at most {MAX_TAGS}",
            tags.len()
        )));
    }
    for (k, v) in tags {
        if k.is_empty() || k.chars().count() > MAX_TAG_LEN {
            return Err(VaultError::Invalid(format!(
                "tag name {k:?} must be 1-{MAX_TAG_LEN} characters"
            )));
        }
        if v.chars().count() > MAX_TAG_LEN {
            return Err(VaultError::Invalid(format!(
                "the value of tag {k:?} is longer than {MAX_TAG_LEN} characters"
            )));
        }
    }
    Ok(())
}

/// RSA signature algorithms (JWA names): what `sign` and `verify` accept. The value signed is
/// a digest the caller computed with the algorithm's hash, as in Key Vault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SignAlg {
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    Rs256,
    /// RSASSA-PKCS1-v1_5 with SHA-384.
    Rs384,
    /// RSASSA-PKCS1-v1_5 with SHA-512.
    Rs512,
    /// RSASSA-PSS with SHA-256, MGF1-SHA-256, salt of 32 bytes.
    Ps256,
    /// RSASSA-PSS with SHA-384, MGF1-SHA-384, salt of 48 bytes.
    Ps384,
    /// RSASSA-PSS with SHA-512, MGF1-SHA-512, salt of 64 bytes.
    Ps512,
}

impl SignAlg {
    /// The JWA name.
    pub fn as_str(self) -> &'static str {
        match self {
            SignAlg::Rs256 => "RS256",
            SignAlg::Rs384 => "RS384",
            SignAlg::Rs512 => "RS512",
            SignAlg::Ps256 => "PS256",
            SignAlg::Ps384 => "PS384",
            SignAlg::Ps512 => "PS512",
        }
    }

    /// Length in bytes of the digest the algorithm signs.
    pub fn digest_len(self) -> usize {
        match self {
            SignAlg::Rs256 | SignAlg::Ps256 => 32,
            SignAlg::Rs384 | SignAlg::Ps384 => 48,
            SignAlg::Rs512 | SignAlg::Ps512 => 64,
        }
    }
}

impl fmt::Display for SignAlg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SignAlg {
    type Err = VaultError;
    fn from_str(s: &str) -> Result<Self, VaultError> {
        Ok(match s {
            "RS256" => SignAlg::Rs256,
            "RS384" => SignAlg::Rs384,
            "RS512" => SignAlg::Rs512,
            "PS256" => SignAlg::Ps256,
            "PS384" => SignAlg::Ps384,
            "PS512" => SignAlg::Ps512,
            other => {
                return Err(VaultError::Invalid(format!(
                    "signature algorithm {other:?} is not supported for RSA keys \
                     (use RS256, RS384, RS512, PS256, PS384 or PS512)"
                )))
            }
        })
    }
}

/// The refusal of `RSA1_5` (RSAES-PKCS1-v1_5), wherever an algorithm is named: decrypting it
/// is the Bleichenbacher padding oracle, and its timing variant ("Marvin", 2023) still breaks
/// careful implementations, so a vault that unwraps what remote callers send must not offer
/// it at all (half-support would let a client wrap with it and never unwrap again).
pub fn rsa1_5_refused() -> VaultError {
    VaultError::Invalid(
        "RSA1_5 (RSAES-PKCS1-v1_5) is refused by this vault: its decryption is a padding \
         oracle (Bleichenbacher 1998, Marvin 2023); use RSA-OAEP-256 (or RSA-OAEP)"
            .into(),
    )
}

/// Checks a `key_ops` list: known names only, no duplicates.
pub fn validate_key_ops(ops: &[String]) -> Result<(), VaultError> {
    for (i, op) in ops.iter().enumerate() {
        if !KEY_OPS.contains(&op.as_str()) {
            return Err(VaultError::Invalid(format!(
                "unknown key operation {op:?} (expected some of {})",
                KEY_OPS.join(", ")
            )));
        }
        if ops[..i].contains(op) {
            return Err(VaultError::Invalid(format!(
                "key operation {op:?} is listed twice"
            )));
        }
    }
    Ok(())
}

/// Azure's `recoveryLevel` for a vault with soft delete always on.
pub fn recovery_level(retention_days: u32, purge_protection: bool) -> &'static str {
    match (retention_days >= 90, purge_protection) {
        (true, false) => "Recoverable+Purgeable",
        (true, true) => "Recoverable",
        (false, false) => "CustomizedRecoverable+Purgeable",
        (false, true) => "CustomizedRecoverable",
    }
}

/// Smallest soft-delete retention a vault accepts, in days (Azure's range).
pub const MIN_RETENTION_DAYS: u32 = 7;
/// Largest (and default) soft-delete retention, in days.
pub const MAX_RETENTION_DAYS: u32 = 90;

/// Vault-wide settings.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VaultProperties {
    /// The vault URL.
    pub url: String,
    /// Soft delete is always on (as in Azure since 2020).
    pub soft_delete: bool,
    /// Days a deleted key stays recoverable (7-90).
    pub retention_days: u32,
    /// Once on, never off: purge of a deleted key waits for the retention to pass.
    pub purge_protection: bool,
}

/// What an identity may do with a key (Key Vault's key permissions).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Permission {
    /// Read a key's public facts.
    Get,
    /// List keys, versions and deleted keys.
    List,
    /// Wrap a DEK.
    WrapKey,
    /// Unwrap a DEK.
    UnwrapKey,
    /// Change attributes (enable, disable, nbf, exp, key_ops).
    Update,
    /// Create a key.
    Create,
    /// Import a private key as a key version.
    Import,
    /// Soft-delete a key.
    Delete,
    /// Recover a soft-deleted key.
    Recover,
    /// Purge a soft-deleted key for good.
    Purge,
    /// Add a new version.
    Rotate,
    /// Encrypt with a key (`POST .../encrypt`).
    Encrypt,
    /// Decrypt with a key (`POST .../decrypt`).
    Decrypt,
    /// Sign a digest (`POST .../sign`).
    Sign,
    /// Verify a signature (`POST .../verify`).
    Verify,
    /// Export a key as a backup blob sealed by the vault.
    Backup,
    /// Restore a key from a backup blob.
    Restore,
    /// Read a key's rotation policy.
    #[serde(rename = "getrotationpolicy")]
    GetRotationPolicy,
    /// Change a key's rotation policy.
    #[serde(rename = "setrotationpolicy")]
    SetRotationPolicy,
}

impl Permission {
    /// Every permission, in display order.
    pub const ALL: [Permission; 19] = [
        Permission::Get,
        Permission::List,
        Permission::WrapKey,
        Permission::UnwrapKey,
        Permission::Update,
        Permission::Create,
        Permission::Import,
        Permission::Delete,
        Permission::Recover,
        Permission::Purge,
        Permission::Rotate,
        Permission::Encrypt,
        Permission::Decrypt,
        Permission::Sign,
        Permission::Verify,
        Permission::Backup,
        Permission::Restore,
        Permission::GetRotationPolicy,
        Permission::SetRotationPolicy,
    ];

    /// The Key Vault name (`wrapKey`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Permission::Get => "get",
            Permission::List => "list",
            Permission::WrapKey => "wrapKey",
            Permission::UnwrapKey => "unwrapKey",
            Permission::Update => "update",
            Permission::Create => "create",
            Permission::Import => "import",
            Permission::Delete => "delete",
            Permission::Recover => "recover",
            Permission::Purge => "purge",
            Permission::Rotate => "rotate",
            Permission::Encrypt => "encrypt",
            Permission::Decrypt => "decrypt",
            Permission::Sign => "sign",
            Permission::Verify => "verify",
            Permission::Backup => "backup",
            Permission::Restore => "restore",
            Permission::GetRotationPolicy => "getrotationpolicy",
            Permission::SetRotationPolicy => "setrotationpolicy",
        }
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Permission {
    type Err = VaultError;
    /// Case-insensitive (`wrapkey` = `wrapKey`).
    fn from_str(s: &str) -> Result<Self, VaultError> {
        Permission::ALL
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| {
                let all: Vec<&str> = Permission::ALL.iter().map(|p| p.as_str()).collect();
                VaultError::Invalid(format!(
                    "unknown permission {s:?} (expected some of {})",
                    all.join(", ")
                ))
            })
    }
}

/// Identity names follow the key-name rule; `owner` is reserved for the vault owner.
pub fn valid_identity_name(name: &str) -> bool {
    valid_key_name(name) && !name.eq_ignore_ascii_case(OWNER_IDENTITY)
}

/// The identity the audit log names for owner (admin) connections.
pub const OWNER_IDENTITY: &str = "owner";

/// A credential: what an identity presents to the vault (a managed-identity token analogue).
///
/// Stored as a 0600 JSON file; the vault keeps only the SHA-256 of the secret. `Debug` hides
/// the secret.
#[derive(Clone, Serialize, Deserialize)]
pub struct Credential {
    /// Vault URL the credential is for.
    pub vault: String,
    /// Identity name.
    pub identity: String,
    /// The bearer secret (base64url). Never logged.
    #[serde(with = "zeroizing_string")]
    pub secret: Zeroizing<String>,
    /// PEM certificate(s) an `https://` vault's TLS certificate must chain to (the server's
    /// `tls/ca.pem`); absent = the public web roots (a real Azure Key Vault).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<String>,
    /// How to sign in to a real Azure Key Vault or Managed HSM with Entra ID (see
    /// [`azure_auth`]); absent for a cmkfs vault.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub azure: Option<azure_auth::AzureAuth>,
}

/// serde for `Zeroizing<String>` (zeroize's own serde feature is not enabled).
mod zeroizing_string {
    use serde::{Deserialize, Deserializer, Serializer};
    use zeroize::Zeroizing;

    pub fn serialize<S: Serializer>(v: &Zeroizing<String>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Zeroizing<String>, D::Error> {
        String::deserialize(d).map(Zeroizing::new)
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("vault", &self.vault)
            .field("identity", &self.identity)
            .field("secret", &"<redacted>")
            .field("ca_cert", &self.ca_cert.is_some())
            .field("azure", &self.azure)
            .finish()
    }
}

impl Credential {
    /// The HTTP bearer token: `<identity>.<secret>`, which a cmkfs vault server splits to
    /// authenticate the identity. A secret that already contains a `.` is a complete token
    /// issued elsewhere (e.g. an Azure AD access token for `https://vault.azure.net`, which is
    /// a JWT) and is sent as it is.
    pub fn bearer_token(&self) -> Zeroizing<String> {
        if self.secret.contains('.') {
            self.secret.clone()
        } else {
            Zeroizing::new(format!("{}.{}", self.identity, &*self.secret))
        }
    }

    /// Reads a credential file.
    pub fn load(path: &std::path::Path) -> Result<Credential, VaultError> {
        let mut bytes = Zeroizing::new(std::fs::read(path).map_err(|e| {
            VaultError::Invalid(format!(
                "cannot read credential file {}: {e}",
                path.display()
            ))
        })?);
        // Sealed by the embedded vault's master key (files in $CMKFS_HOME/credentials).
        if let Some(env) = local::seal::Envelope::parse(&bytes) {
            bytes = local::seal::open_credential(&env, path)?;
        }
        serde_json::from_slice(&bytes).map_err(|e| {
            VaultError::Invalid(format!(
                "{} is not a cmkfs credential file ({e})",
                path.display()
            ))
        })
    }

    /// The credential as the JSON a credential file holds (before any sealing).
    pub fn to_json(&self) -> Result<Zeroizing<Vec<u8>>, VaultError> {
        serde_json::to_vec_pretty(self)
            .map(Zeroizing::new)
            .map_err(|e| VaultError::Store(e.to_string()))
    }

    /// Writes the credential to a new 0600 file (refuses to overwrite one), in clear.
    pub fn save_new(&self, path: &std::path::Path) -> Result<(), VaultError> {
        Credential::save_bytes_new(&self.to_json()?, path)
    }

    /// Writes a credential file's bytes (clear JSON or sealed) to a new 0600 file.
    pub fn save_bytes_new(json: &[u8], path: &std::path::Path) -> Result<(), VaultError> {
        crate::fsutil::write_new(path, json, 0o600).map_err(|e| {
            VaultError::Invalid(format!(
                "cannot write credential file {}: {e}",
                path.display()
            ))
        })
    }
}

/// Result of a wrap: the exact key version used and the wrapped bytes.
#[derive(Clone, Debug)]
pub struct Wrapped {
    /// The versioned key that wrapped.
    pub kid: KeyId,
    /// Algorithm used.
    pub alg: WrapAlg,
    /// Wrapped key bytes.
    pub value: Vec<u8>,
}

/// Options for a new key (or a new version on rotation).
#[derive(Clone, Debug)]
pub struct CreateKeyOptions {
    /// RSA modulus bits: 2048, 3072 or 4096.
    pub key_size: u32,
    /// Default wrap algorithm for this key.
    pub wrap_alg: WrapAlg,
}

impl Default for CreateKeyOptions {
    fn default() -> Self {
        CreateKeyOptions {
            key_size: 3072,
            wrap_alg: WrapAlg::RsaOaep256,
        }
    }
}

/// Why a vault refused: the owner's decision, not a fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DenyReason {
    /// The key version is disabled.
    KeyDisabled,
    /// The key is (soft-)deleted.
    KeyDeleted,
    /// Outside nbf/exp for an operation the rules refuse.
    KeyExpired,
    /// The caller's identity lacks the permission.
    PermissionDenied,
    /// The key version no longer exists (purged).
    KeyPurged,
    /// The key's `key_ops` do not include the operation.
    OperationNotAllowed,
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DenyReason::KeyDisabled => "key disabled",
            DenyReason::KeyDeleted => "key deleted",
            DenyReason::KeyExpired => "key expired or not yet valid",
            DenyReason::PermissionDenied => "permission denied",
            DenyReason::KeyPurged => "key purged",
            DenyReason::OperationNotAllowed => "operation not allowed by key_ops",
        })
    }
}

/// Vault errors; [`VaultError::class`] is what callers branch on.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    /// The key owner refuses (revocation).
    #[error("vault denied access to {what}: {reason}")]
    Denied {
        /// Why.
        reason: DenyReason,
        /// Key (id or name) concerned.
        what: String,
    },
    /// The vault cannot be reached or did not answer in time.
    #[error("vault unavailable: {0}")]
    Unavailable(String),
    /// No such key, version or identity (the message names which).
    #[error("not found: {0}")]
    NotFound(String),
    /// A name is taken (e.g. by a soft-deleted key).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The wrapped bytes do not unwrap under that key (wrong key or corrupt wrap).
    #[error("the key {kid} cannot unwrap this DEK (wrong key, or the wrapped key is corrupt)")]
    UnwrapFailed {
        /// Key tried.
        kid: String,
    },
    /// Caller input that cannot be right (malformed id, bad size...).
    #[error("{0}")]
    Invalid(String),
    /// The vault store on disk is damaged or unreadable.
    #[error("vault store: {0}")]
    Store(String),
    /// A vault URL (from a volume header or an argument) that this machine is not configured
    /// to use: cmkfs talks only to the vaults of `cmkfs vault add` (see [`trust`]).
    #[error(
        "vault {url:?} is not configured on this machine (a volume header or argument only \
         names a vault; the machine decides which it uses): if you trust it, run \
         `cmkfs vault add NAME {url:?}`"
    )]
    NotConfigured {
        /// The URL as given.
        url: String,
    },
}

/// Coarse classes of [`VaultError`] for the keyring's state machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// Revoke now.
    Denied,
    /// Degrade, revoke after the grace period.
    Unavailable,
    /// Neither: a caller or store error.
    Other,
}

impl VaultError {
    /// The HTTP status Key Vault would answer with (audit log, REST server).
    pub fn http_status(&self) -> u16 {
        match self {
            VaultError::Denied { .. } => 403,
            VaultError::NotFound(_) => 404,
            VaultError::Conflict(_) => 409,
            VaultError::Invalid(_) | VaultError::UnwrapFailed { .. } => 400,
            VaultError::Unavailable(_) => 503,
            VaultError::Store(_) => 500,
            VaultError::NotConfigured { .. } => 403,
        }
    }

    /// Which class of failure this is.
    pub fn class(&self) -> ErrorClass {
        match self {
            VaultError::Denied { .. }
            | VaultError::NotFound(_)
            | VaultError::UnwrapFailed { .. }
            | VaultError::NotConfigured { .. } => ErrorClass::Denied,
            VaultError::Unavailable(_) => ErrorClass::Unavailable,
            _ => ErrorClass::Other,
        }
    }
}

/// One vault connection, made for one identity (the credential is part of the connection).
pub trait Vault: Send + Sync {
    /// The vault URL: prefix of every key id it issues.
    fn url(&self) -> String;
    /// Creates a key (its first version).
    fn create_key(&self, name: &str, opts: &CreateKeyOptions) -> Result<KeyInfo, VaultError>;
    /// Public facts of a version (the latest when `version` is None). Denied for a disabled
    /// version, as Key Vault refuses every operation on one; see [`Vault::describe_key`].
    fn get_key(&self, name: &str, version: Option<&str>) -> Result<KeyInfo, VaultError>;
    /// Latest version of every key.
    fn list_keys(&self) -> Result<Vec<KeyInfo>, VaultError>;
    /// Adds a new version with the same parameters; returns it.
    fn rotate_key(&self, name: &str) -> Result<KeyInfo, VaultError>;
    /// Wraps `plaintext` (a DEK) with the given or latest version.
    fn wrap_key(
        &self,
        name: &str,
        version: Option<&str>,
        alg: WrapAlg,
        plaintext: &[u8],
    ) -> Result<Wrapped, VaultError>;
    /// Unwraps with exactly the version named in `kid`.
    fn unwrap_key(
        &self,
        kid: &KeyId,
        alg: WrapAlg,
        wrapped: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, VaultError>;

    // Lifecycle operations below have defaults so that test doubles need not implement them.

    /// Public facts of a version for administration: unlike [`Vault::get_key`] it also
    /// describes a *disabled* version (Azure's list-versions view), so it can be re-enabled.
    fn describe_key(&self, name: &str, version: Option<&str>) -> Result<KeyInfo, VaultError> {
        self.get_key(name, version)
    }
    /// Every version of a key, oldest first.
    fn list_key_versions(&self, _name: &str) -> Result<Vec<KeyInfo>, VaultError> {
        Err(unsupported("listing key versions"))
    }
    /// Imports a PKCS#8 DER RSA private key as a new version (creating the key if needed).
    fn import_key(
        &self,
        _name: &str,
        _pkcs8_der: &[u8],
        _opts: &ImportKeyOptions,
    ) -> Result<KeyInfo, VaultError> {
        Err(unsupported("key import"))
    }
    /// Changes a version's attributes (latest when `version` is None).
    fn update_key(
        &self,
        _name: &str,
        _version: Option<&str>,
        _update: &KeyUpdate,
    ) -> Result<KeyInfo, VaultError> {
        Err(unsupported("key update"))
    }
    /// Soft-deletes a key (all its versions).
    fn delete_key(&self, _name: &str) -> Result<DeletedKeyInfo, VaultError> {
        Err(unsupported("key deletion"))
    }
    /// Soft-deleted keys.
    fn list_deleted_keys(&self) -> Result<Vec<DeletedKeyInfo>, VaultError> {
        Err(unsupported("listing deleted keys"))
    }
    /// One soft-deleted key.
    fn get_deleted_key(&self, _name: &str) -> Result<DeletedKeyInfo, VaultError> {
        Err(unsupported("reading deleted keys"))
    }
    /// Undoes a soft delete; returns the latest version.
    fn recover_deleted_key(&self, _name: &str) -> Result<KeyInfo, VaultError> {
        Err(unsupported("key recovery"))
    }
    /// Deletes a soft-deleted key for good.
    fn purge_deleted_key(&self, _name: &str) -> Result<(), VaultError> {
        Err(unsupported("key purge"))
    }
    /// Vault-wide settings (soft delete, retention, purge protection).
    fn properties(&self) -> Result<VaultProperties, VaultError> {
        Err(unsupported("reading vault properties"))
    }
    /// What this connection's identity may do with the key `name` (everything for the owner).
    fn permissions(&self, _name: &str) -> Result<Vec<Permission>, VaultError> {
        Err(unsupported("reading permissions"))
    }

    /// A key's rotation policy (Key Vault's default one when none was set).
    fn rotation_policy(&self, _name: &str) -> Result<local::policy::RotationPolicy, VaultError> {
        Err(unsupported("rotation policies"))
    }
    /// Replaces a key's rotation policy; returns it as stored.
    fn set_rotation_policy(
        &self,
        _name: &str,
        _policy: &local::policy::RotationPolicy,
    ) -> Result<local::policy::RotationPolicy, VaultError> {
        Err(unsupported("rotation policies"))
    }

    /// Applies the rotation policies that are due (new key versions on schedule, near-expiry
    /// notices), as the vault itself: the embedded vault does it whenever a long-running
    /// process (a mount's monitor) checks its key; a vault server does it on its own timer,
    /// so remote backends have nothing to do here. Returns the versions created.
    fn apply_due_rotations(&self) -> Result<Vec<KeyInfo>, VaultError> {
        Ok(Vec::new())
    }

    /// Push notifications: a channel that receives `()` soon after any key, identity or
    /// policy change in the vault (bursts may coalesce), so a mount can re-check at once
    /// instead of waiting for its next periodic check. `None`: this backend cannot push.
    fn watch(&self) -> Option<std::sync::mpsc::Receiver<()>> {
        None
    }
}

fn unsupported(what: &str) -> VaultError {
    VaultError::Invalid(format!("{what} is not supported by this vault backend"))
}

/// Opens the vault a URL names, as its owner where the backend has one (see [`connect`]),
/// for a command that only uses it: the embedded `local:` vault must exist (one line naming
/// the home otherwise, nothing created).
pub fn open(url: &str, home: &Home) -> Result<Box<dyn Vault>, VaultError> {
    connect_as(url, home, None, false)
}

/// [`open`] that creates the embedded `local:` vault on first use (`cmkfs init`, a Disk
/// Encryption Set's platform key).
pub fn open_or_create(url: &str, home: &Home) -> Result<Box<dyn Vault>, VaultError> {
    connect_as(url, home, None, true)
}

/// Opens the vault a credential is for, as the credential's identity: every call is checked
/// against that identity's access policies.
pub fn open_with_credential(home: &Home, cred: &Credential) -> Result<Box<dyn Vault>, VaultError> {
    connect(&cred.vault, home, Some(cred))
}

/// Connects to the vault a URL (or a configured vault's name) refers to. Only `local:` and the
/// vaults configured with `cmkfs vault add` are reachable ([`trust`]): any other URL is
/// [`VaultError::NotConfigured`], before anything is loaded or contacted.
///
/// - `local:` — the embedded vault of `home` (created on first use by `connect` and
///   [`open_or_create`], never by [`open`]): as the owner without a credential, as the
///   credential's identity with one.
/// - `https://host[:port]` — a cmkfs vault server, as the credential's identity
///   ([`http::HttpVault`]); or a real Azure Key Vault or Managed HSM (`*.vault.azure.net`,
///   `*.managedhsm.azure.net`, sovereign clouds), or any vault whose credential has an
///   `azure` section ([`azure_auth`]): the official Azure SDK signing in with Entra ID
///   (`azure::AzureVault`, feature `azure`). Without a credential: the configured one, else
///   the one file in `$CMKFS_HOME/credentials/*.json` whose `vault` is this URL. A CA
///   configured with the vault is pinned instead of the credential's.
/// - `pkcs11:/path/module.so?token=LABEL...` — a configured PKCS#11 token
///   ([`pkcs11::Pkcs11Vault`]), opened with the *configured* URL (module and PIN source): the
///   URL given only selects it. The module is checked ([`trust::check_module`]) before every
///   load.
pub fn connect(
    url: &str,
    home: &Home,
    credential: Option<&Credential>,
) -> Result<Box<dyn Vault>, VaultError> {
    connect_as(url, home, credential, true)
}

/// [`connect`]; `create`: whether the embedded vault is created when `home` has none.
fn connect_as(
    url: &str,
    home: &Home,
    credential: Option<&Credential>,
    create: bool,
) -> Result<Box<dyn Vault>, VaultError> {
    let Some(configured) = trust::lookup(home, url)? else {
        return Ok(match credential {
            Some(c) => Box::new(local::LocalVault::open_as(
                &home.vault_dir(),
                &c.identity,
                &c.secret,
            )?),
            None if create => Box::new(local::LocalVault::open(&home.vault_dir())?),
            None => Box::new(local::LocalVault::open_existing(&home.vault_dir())?),
        });
    };
    match configured.kind {
        trust::VaultKind::Https => {
            let want = &configured.url;
            let mut cred = match (credential, &configured.credential) {
                (Some(c), _) => c.clone(),
                (None, Some(p)) => Credential::load(p)?,
                (None, None) => find_credential(home, want)?,
            };
            if http::normalize_url(&cred.vault)? != *want {
                return Err(VaultError::Invalid(format!(
                    "the credential of {} is for vault {:?}, not {want}",
                    cred.identity, cred.vault
                )));
            }
            if let Some(ca) = &configured.ca_pem {
                cred.ca_cert = Some(ca.clone());
            }
            // A real Azure Key Vault or Managed HSM (by its URL), or a credential that signs
            // in with Entra ID: the Azure SDK. Otherwise a cmkfs vault server.
            if azure_auth::is_azure_url(want) || cred.azure.is_some() {
                #[cfg(feature = "azure")]
                return Ok(Box::new(azure::AzureVault::connect(&cred)?));
                #[cfg(not(feature = "azure"))]
                return Err(VaultError::Invalid(format!(
                    "vault {want} is an Azure Key Vault (or the credential signs in with Entra \
                     ID), and this cmkfs was built without Azure support: rebuild with the \
                     `azure` feature"
                )));
            }
            Ok(Box::new(http::HttpVault::connect(&cred)?))
        }
        trust::VaultKind::Pkcs11 => {
            if let Some(m) = &configured.module {
                trust::check_module(m)?;
            }
            Ok(Box::new(pkcs11::Pkcs11Vault::open(&configured.url)?))
        }
        trust::VaultKind::Local => Err(VaultError::Invalid(format!(
            "vault {} is configured as local; only local: is the embedded vault",
            configured.name
        ))),
    }
}

/// The credential in `$CMKFS_HOME/credentials/` for an `https://` vault.
fn find_credential(home: &Home, url: &str) -> Result<Credential, VaultError> {
    let dir = home.root().join("credentials");
    let mut found = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&dir) {
        let mut paths: Vec<_> = entries.flatten().map(|e| e.path()).collect();
        paths.sort();
        for p in paths {
            if p.extension().is_some_and(|e| e == "json") {
                if let Ok(c) = Credential::load(&p) {
                    if http::normalize_url(&c.vault).ok().as_deref() == Some(url) {
                        found.push((p, c));
                    }
                }
            }
        }
    }
    match found.len() {
        1 => Ok(found.remove(0).1),
        0 => Err(VaultError::Invalid(format!(
            "vault {url} needs a credential: pass --credential FILE, or put one in {}",
            dir.display()
        ))),
        _ => Err(VaultError::Invalid(format!(
            "several credentials in {} are for vault {url} ({}): pass --credential FILE",
            dir.display(),
            found
                .iter()
                .map(|(p, _)| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// Decodes `%XX` escapes; anything else passes through. `plus_is_space`: form-encoded query
/// strings (HTTP) write a space as `+`; RFC 7512 PKCS#11 URIs do not.
pub(crate) fn percent_decode(s: &str, plus_is_space: bool) -> String {
    let b = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(if plus_is_space && b[i] == b'+' {
            b' '
        } else {
            b[i]
        });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod percent_tests {
    #[test]
    fn decodes_escapes_and_keeps_broken_ones() {
        assert_eq!(super::percent_decode("a%20b%2F", false), "a b/");
        assert_eq!(super::percent_decode("100%", false), "100%");
        assert_eq!(super::percent_decode("%zz", false), "%zz");
        assert_eq!(super::percent_decode("a+b", false), "a+b");
        assert_eq!(super::percent_decode("a+b%41", true), "a bA");
        assert_eq!(super::percent_decode("%4", false), "%4");
    }
}
