//! Disk Encryption Sets (DES): a named binding of a vault key (and version), the identity that
//! uses it, the encryption type and the auto-rotation setting, plus the volumes bound to it.
//! The operations here touch many volumes at once: bind a new volume, move every volume to a
//! new key version or a different key (a *rewrap*: the DEK is unwrapped with the old key and
//! wrapped with the new one; data is never touched), and auto-rotate when the vault gets a
//! newer version of the key.
//!
//! Records live in `$CMKFS_HOME/des/<name>.json` (0600, directory 0700), replaced atomically;
//! every change takes the exclusive `flock` on `$CMKFS_HOME/des/.lock`, so concurrent
//! `cmkfs des` commands and mounts that auto-rotate never interleave their updates.
//!
//! **Crash safety of a rewrap.** A key change first records its intent (the new key becomes
//! `activeKey`, the old one goes to `previousKeys`), then replaces each volume's header
//! atomically (temp file → fsync → rename → fsync directory), and only when every volume is
//! done clears `previousKeys`. At every point each volume's header names either the old or the
//! new key, and both are listed in the record until the rotation is complete, so an
//! interrupted rotation leaves volumes that mount with the old or the new wrap, and
//! `cmkfs des update NAME` finishes it. Every new wrap is unwrapped again and checked before
//! it is written. [`Hooks::fault`] lets tests stop the process of a rewrap after any step.
//!
//! **Double encryption** (`EncryptionAtRestWithPlatformAndCustomerKeys`): volumes get a second,
//! inner DEK wrapped by cmkfs's own platform key ([`PLATFORM_KEY`] in the `local:` vault,
//! created on demand). Rotations only rewrap the outer (customer) DEK.
//!
//! **Irreversibility.** Customer-managed keys cannot be traded back for the platform key: a DES
//! refuses [`PLATFORM_KEY`] as its key, a bound volume cannot leave its DES, and the encryption
//! type of a DES cannot change. Moving to a different customer key is fine.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::crypto::Dek;
use crate::fsutil;
use crate::home::Home;
use crate::keyring;
use crate::vault::{
    self, valid_key_name, CreateKeyOptions, Credential, DenyReason, KeyId, KeyInfo, Permission,
    Vault, VaultError,
};
use crate::volume::header::{VolumeHeader, HEADER_FILE};
use crate::volume::{CreateOptions, PlatformLayer, Volume, VolumeError};

/// Name of the platform key in cmkfs's own (`local:`) vault: it wraps the inner DEK of
/// double-encrypted volumes and is never a customer-managed key.
pub use crate::volume::header::PLATFORM_KEY;
/// RSA size of the platform key when cmkfs creates it.
pub const PLATFORM_KEY_SIZE: u32 = 3072;
/// Schema version of the DES record.
pub const SCHEMA: u32 = 1;
/// The permissions a DES identity needs on its key.
pub const REQUIRED_PERMISSIONS: [Permission; 3] =
    [Permission::Get, Permission::WrapKey, Permission::UnwrapKey];

const DES_DIR: &str = "des";
const LOCK_FILE: &str = ".lock";

/// What can go wrong with a Disk Encryption Set. Every message is one line that names what
/// was wrong.
#[derive(Debug, thiserror::Error)]
pub enum DesError {
    /// A name outside the allowed alphabet or length.
    #[error(
        "invalid Disk Encryption Set name {0:?}: use 1-80 letters, digits, dashes and underscores"
    )]
    InvalidName(String),
    /// No such DES.
    #[error("Disk Encryption Set {0} does not exist (see `cmkfs des list`)")]
    NotFound(String),
    /// The name is taken.
    #[error("Disk Encryption Set {0} already exists")]
    Exists(String),
    /// Caller input that cannot be right.
    #[error("{0}")]
    Invalid(String),
    /// A DES rule refuses the request (the message says which and why).
    #[error("{0}")]
    Refused(String),
    /// A vault call failed.
    #[error(transparent)]
    Vault(#[from] VaultError),
    /// A volume operation failed.
    #[error(transparent)]
    Volume(#[from] VolumeError),
    /// An I/O error on a named path.
    #[error("{}: {error}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        error: io::Error,
    },
    /// A DES record that cannot be read.
    #[error("Disk Encryption Set record {} is corrupt: {why}", path.display())]
    Corrupt {
        /// Record path.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// Some volumes could not be moved to the new key (the rotation stays in progress).
    #[error("{0}")]
    Incomplete(String),
    /// A fault hook stopped the operation (tests of crash safety).
    #[error("interrupted after step {0:?}")]
    Interrupted(RewrapStep),
}

impl DesError {
    fn io(path: &Path, error: io::Error) -> DesError {
        DesError::Io {
            path: path.to_path_buf(),
            error,
        }
    }
}

/// Azure's `encryptionType` of a Disk Encryption Set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum EncryptionType {
    /// One DEK, wrapped by the customer's key.
    #[default]
    EncryptionAtRestWithCustomerKey,
    /// Two independent DEKs: the inner one wrapped by cmkfs's platform key, the outer one by
    /// the customer's key; data is encrypted with both.
    EncryptionAtRestWithPlatformAndCustomerKeys,
}

impl EncryptionType {
    /// The Azure name.
    pub fn as_str(self) -> &'static str {
        match self {
            EncryptionType::EncryptionAtRestWithCustomerKey => "EncryptionAtRestWithCustomerKey",
            EncryptionType::EncryptionAtRestWithPlatformAndCustomerKeys => {
                "EncryptionAtRestWithPlatformAndCustomerKeys"
            }
        }
    }

    /// Whether volumes get the platform layer too.
    pub fn is_double(self) -> bool {
        self == EncryptionType::EncryptionAtRestWithPlatformAndCustomerKeys
    }
}

impl fmt::Display for EncryptionType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EncryptionType {
    type Err = DesError;
    /// The Azure names, case-insensitively.
    fn from_str(s: &str) -> Result<Self, DesError> {
        [
            EncryptionType::EncryptionAtRestWithCustomerKey,
            EncryptionType::EncryptionAtRestWithPlatformAndCustomerKeys,
        ]
        .into_iter()
        .find(|t| t.as_str().eq_ignore_ascii_case(s.trim()))
        .ok_or_else(|| {
            DesError::Invalid(format!(
                "unknown encryption type {s:?} (expected EncryptionAtRestWithCustomerKey or \
                 EncryptionAtRestWithPlatformAndCustomerKeys)"
            ))
        })
    }
}

/// A key reference as Azure writes it (`activeKey`, `previousKeys`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KeyRef {
    /// Full versioned key id.
    pub key_url: String,
}

impl KeyRef {
    /// The parsed key id.
    pub fn key_id(&self) -> Result<KeyId, DesError> {
        self.key_url.parse().map_err(DesError::Vault)
    }
}

/// The identity a DES reaches its vault as (a managed-identity analogue).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DesIdentity {
    /// Identity name in the vault.
    pub name: String,
    /// Its credential file (absolute path).
    pub credential_file: PathBuf,
}

/// Why the last auto-rotation failed (Azure's `autoKeyRotationError`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RotationError {
    /// Short code, e.g. `KeyRotationFailed`.
    pub code: String,
    /// The error, one line.
    pub message: String,
    /// When it happened (RFC 3339).
    pub time: String,
    /// The key version it tried to move to.
    pub target_key_url: String,
}

/// A Disk Encryption Set record, with Azure's field names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DiskEncryptionSet {
    /// Schema version of this record.
    pub schema: u32,
    /// DES name.
    pub name: String,
    /// Single or double encryption.
    pub encryption_type: EncryptionType,
    /// The key (full versioned id) new wraps use.
    pub active_key: KeyRef,
    /// Keys some volumes may still be wrapped with while a rotation is in progress; empty
    /// once every volume is on `activeKey`.
    #[serde(default)]
    pub previous_keys: Vec<KeyRef>,
    /// Move to the key's newest version automatically.
    pub rotation_to_latest_key_version_enabled: bool,
    /// When the last key change completed (RFC 3339).
    #[serde(default)]
    pub last_key_rotation_timestamp: Option<String>,
    /// Why the last auto-rotation failed; while set, auto-rotation is paused (cleared by
    /// `cmkfs des update`).
    #[serde(default)]
    pub auto_key_rotation_error: Option<RotationError>,
    /// The identity the DES uses; the vault owner when absent.
    #[serde(default)]
    pub identity: Option<DesIdentity>,
    /// Backing directories of the volumes bound to this DES (absolute).
    #[serde(default)]
    pub volumes: Vec<PathBuf>,
    /// When the DES was created (RFC 3339).
    pub created: String,
}

impl DiskEncryptionSet {
    /// The active key id.
    pub fn active_key_id(&self) -> Result<KeyId, DesError> {
        self.active_key.key_id()
    }

    /// Whether a key id is the active key or one of the previous keys (a volume wrapped with
    /// it is consistent with this record).
    pub fn knows_key(&self, key_url: &str) -> bool {
        self.active_key.key_url == key_url
            || self.previous_keys.iter().any(|k| k.key_url == key_url)
    }

    fn identity_name(&self) -> &str {
        self.identity
            .as_ref()
            .map_or(vault::OWNER_IDENTITY, |i| i.name.as_str())
    }
}

/// DES names as Azure allows them: 1-80 of `[A-Za-z0-9_-]`.
pub fn valid_des_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 80
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn check_des_name(name: &str) -> Result<(), DesError> {
    if valid_des_name(name) {
        Ok(())
    } else {
        Err(DesError::InvalidName(name.to_string()))
    }
}

fn now_rfc3339() -> String {
    keyring::rfc3339(SystemTime::now())
}

// ---------------------------------------------------------------------------------------------
// Store
// ---------------------------------------------------------------------------------------------

/// The DES records of one cmkfs home.
#[derive(Clone, Debug)]
pub struct DesStore {
    dir: PathBuf,
}

/// Holds the DES store's exclusive lock until dropped (closing the file releases the flock).
pub struct DesLock {
    _file: File,
}

impl DesStore {
    /// The store of `home` (`$CMKFS_HOME/des`).
    pub fn new(home: &Home) -> DesStore {
        DesStore {
            dir: home.root().join(DES_DIR),
        }
    }

    /// The store directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the record of `name` lives.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }

    fn open_lock(&self) -> Result<File, DesError> {
        fsutil::create_private_dir(&self.dir).map_err(|e| DesError::io(&self.dir, e))?;
        let path = self.dir.join(LOCK_FILE);
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| DesError::io(&path, e))
    }

    /// Takes the exclusive lock, waiting for other writers.
    pub fn lock(&self) -> Result<DesLock, DesError> {
        let file = self.open_lock()?;
        loop {
            // SAFETY: flock on a descriptor we own; no memory is involved.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Ok(DesLock { _file: file });
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(DesError::io(&self.dir.join(LOCK_FILE), e));
            }
        }
    }

    /// Takes the lock if nobody holds it (`None` when busy): for mounts, whose monitor must
    /// not wait behind a long `cmkfs des update`.
    pub fn try_lock(&self) -> Result<Option<DesLock>, DesError> {
        let file = self.open_lock()?;
        // SAFETY: as in `lock`.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(Some(DesLock { _file: file }));
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            Ok(None)
        } else {
            Err(DesError::io(&self.dir.join(LOCK_FILE), e))
        }
    }

    /// Reads the record of `name`.
    pub fn load(&self, name: &str) -> Result<DiskEncryptionSet, DesError> {
        check_des_name(name)?;
        let path = self.path(name);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(DesError::NotFound(name.to_string()))
            }
            Err(e) => return Err(DesError::io(&path, e)),
        };
        let des: DiskEncryptionSet =
            serde_json::from_slice(&bytes).map_err(|e| DesError::Corrupt {
                path: path.clone(),
                why: format!("not a valid record ({e})"),
            })?;
        if des.schema != SCHEMA || des.name != name {
            return Err(DesError::Corrupt {
                path,
                why: format!("schema {} / name {:?} do not match", des.schema, des.name),
            });
        }
        des.active_key_id().map_err(|e| DesError::Corrupt {
            path: path.clone(),
            why: e.to_string(),
        })?;
        Ok(des)
    }

    /// Every record, by name.
    pub fn list(&self) -> Result<Vec<DiskEncryptionSet>, DesError> {
        let rd = match fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(DesError::io(&self.dir, e)),
        };
        let mut names = Vec::new();
        for ent in rd {
            let ent = ent.map_err(|e| DesError::io(&self.dir, e))?;
            let file = ent.file_name();
            let Some(name) = file.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            if valid_des_name(name) {
                names.push(name.to_string());
            }
        }
        names.sort();
        names.iter().map(|n| self.load(n)).collect()
    }

    /// Writes a record atomically (call with the lock held).
    pub fn save(&self, des: &DiskEncryptionSet) -> Result<(), DesError> {
        fsutil::create_private_dir(&self.dir).map_err(|e| DesError::io(&self.dir, e))?;
        let path = self.path(&des.name);
        let mut json = serde_json::to_vec_pretty(des)
            .map_err(|e| DesError::Invalid(format!("cannot encode the record: {e}")))?;
        json.push(b'\n');
        fsutil::write_atomic(&path, &json, 0o600).map_err(|e| DesError::io(&path, e))
    }
}

// ---------------------------------------------------------------------------------------------
// Keys, identities, vault checks
// ---------------------------------------------------------------------------------------------

/// A key as the user named it: a name (in `--vault`), a versionless key URL
/// (`<vault>/keys/<name>`) or a full versioned id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeySpec {
    /// Vault URL.
    pub vault: String,
    /// Key name.
    pub name: String,
    /// Version; the latest when `None`.
    pub version: Option<String>,
}

impl KeySpec {
    /// Parses `--key` (with `--version` and the default vault URL).
    pub fn parse(
        key: &str,
        version: Option<&str>,
        default_vault: &str,
    ) -> Result<KeySpec, DesError> {
        let key = key.trim();
        let (vault, name, id_version) = if let Some(idx) = key.rfind("/keys/") {
            let (vault, rest) = (&key[..idx], &key[idx + "/keys/".len()..]);
            match rest.split_once('/') {
                // A full versioned id: parse it strictly.
                Some(_) => {
                    let kid: KeyId = key.parse()?;
                    (kid.vault, kid.name, Some(kid.version))
                }
                None if !vault.is_empty() && valid_key_name(rest) => {
                    (vault.to_string(), rest.to_string(), None)
                }
                None => {
                    return Err(DesError::Invalid(format!(
                        "malformed key id {key:?}: expected <vault-url>/keys/<name>[/<version>]"
                    )))
                }
            }
        } else if valid_key_name(key) {
            (default_vault.to_string(), key.to_string(), None)
        } else {
            return Err(DesError::Invalid(format!(
                "invalid key {key:?}: give a key name (1-127 letters, digits and dashes) or a key \
                 id <vault-url>/keys/<name>[/<version>]"
            )));
        };
        let version = match (id_version, version) {
            (Some(a), Some(b)) if a != b => {
                return Err(DesError::Invalid(format!(
                    "--version {b} contradicts the version in key id {key:?}"
                )))
            }
            (Some(a), _) => Some(a),
            (None, Some(b)) => {
                let b = b.trim();
                if b.is_empty() || b.contains('/') {
                    return Err(DesError::Invalid(format!("malformed key version {b:?}")));
                }
                Some(b.to_string())
            }
            (None, None) => None,
        };
        Ok(KeySpec {
            vault: normalize_vault_url(&vault),
            name,
            version,
        })
    }

    fn is_platform_key(&self) -> bool {
        self.vault == crate::vault::local::URL && self.name == PLATFORM_KEY
    }
}

fn normalize_vault_url(url: &str) -> String {
    if url == "local" {
        crate::vault::local::URL.to_string()
    } else if url.starts_with("https://") {
        crate::vault::http::normalize_url(url).unwrap_or_else(|_| url.to_string())
    } else {
        url.to_string()
    }
}

/// Whether two vault URLs name the same vault (`local` = `local:`, https without a trailing
/// slash).
fn same_vault(a: &str, b: &str) -> bool {
    normalize_vault_url(a) == normalize_vault_url(b)
}

/// Who a DES acts as: `--identity` (and optionally `--credential`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdentitySpec {
    /// Identity name.
    pub name: String,
    /// Credential file; `$CMKFS_HOME/credentials/<name>.json` when `None`.
    pub credential_file: Option<PathBuf>,
}

fn resolve_identity(home: &Home, spec: &IdentitySpec) -> Result<DesIdentity, DesError> {
    if !vault::valid_identity_name(&spec.name) {
        return Err(DesError::Invalid(format!(
            "invalid identity {:?}: use 1-127 letters, digits and dashes (not `owner`)",
            spec.name
        )));
    }
    let path = match &spec.credential_file {
        Some(p) => p.clone(),
        None => home
            .root()
            .join("credentials")
            .join(format!("{}.json", spec.name)),
    };
    if !path.exists() {
        return Err(DesError::Invalid(format!(
            "no credential for identity {} at {} (create the identity with `cmkfs vault identity \
             create {}`, or give its file with --credential)",
            spec.name,
            path.display(),
            spec.name
        )));
    }
    let path = fs::canonicalize(&path).map_err(|e| DesError::io(&path, e))?;
    Ok(DesIdentity {
        name: spec.name.clone(),
        credential_file: path,
    })
}

/// Opens `url` as `identity` (the vault owner when `None`).
fn open_vault_as(
    home: &Home,
    url: &str,
    identity: Option<&DesIdentity>,
) -> Result<Box<dyn Vault>, DesError> {
    let Some(id) = identity else {
        return Ok(vault::open(url, home)?);
    };
    let cred = Credential::load(&id.credential_file)?;
    if cred.identity != id.name {
        return Err(DesError::Invalid(format!(
            "credential file {} is for identity {}, not {}",
            id.credential_file.display(),
            cred.identity,
            id.name
        )));
    }
    if !same_vault(&cred.vault, url) {
        return Err(DesError::Invalid(format!(
            "the credential of {} is for vault {:?}, but the key is in {url:?}",
            id.name, cred.vault
        )));
    }
    Ok(vault::open_with_credential(home, &cred)?)
}

/// Opens the vault of a DES's active key as the DES identity.
pub fn open_vault(home: &Home, des: &DiskEncryptionSet) -> Result<Box<dyn Vault>, DesError> {
    let kid = des.active_key_id()?;
    open_vault_as(home, &kid.vault, des.identity.as_ref())
}

/// Checks everything a DES needs of its key, through `vault` as the DES identity `who`, and
/// returns the exact version: not cmkfs's own platform key; get/wrapKey/unwrapKey for the
/// identity; the version enabled, currently valid and allowing wrapKey/unwrapKey; purge
/// protection on the vault.
///
/// Backends answer differently: where the vault reports its settings and the identity's
/// permissions (the local vault) they are read directly, so the refusal names exactly what is
/// missing; over the keys REST API, which has neither, purge protection comes from the key's
/// `recoveryLevel` (Azure reports `Recoverable` / `CustomizedRecoverable`, without
/// `+Purgeable`, exactly when purge protection is on) and the permissions are proven by
/// wrapping and unwrapping a random 64-byte probe.
pub fn check_key(vault: &dyn Vault, spec: &KeySpec, who: &str) -> Result<KeyInfo, DesError> {
    if spec.is_platform_key() {
        return Err(DesError::Refused(format!(
            "{PLATFORM_KEY} is cmkfs's platform key, not a customer-managed key: customer-managed \
             keys are irreversible, a Disk Encryption Set cannot use (or go back to) the platform key"
        )));
    }
    let no_purge_protection = || {
        DesError::Refused(format!(
            "vault {} does not have purge protection on: a Disk Encryption Set needs it, so that \
             its key cannot be purged while volumes depend on it (turn it on with `cmkfs vault \
             config --purge-protection on`)",
            spec.vault
        ))
    };
    // `Invalid` is how a backend says it cannot answer (see `vault::unsupported`).
    let props = match vault.properties() {
        Ok(p) => Some(p),
        Err(VaultError::Invalid(_)) => None,
        Err(e) => return Err(e.into()),
    };
    if props.as_ref().is_some_and(|p| !p.purge_protection) {
        return Err(no_purge_protection());
    }
    let have = match vault.permissions(&spec.name) {
        Ok(h) => Some(h),
        Err(VaultError::Invalid(_)) => None,
        Err(e) => return Err(e.into()),
    };
    if let Some(have) = &have {
        let missing: Vec<&str> = REQUIRED_PERMISSIONS
            .iter()
            .filter(|p| !have.contains(p))
            .map(|p| p.as_str())
            .collect();
        if !missing.is_empty() {
            return Err(DesError::Refused(format!(
                "identity {who} lacks the {} permission{} on key {} (grant them with `cmkfs vault \
                 policy set {who} --key {} --permissions get,wrapKey,unwrapKey`)",
                missing.join(", "),
                if missing.len() == 1 { "" } else { "s" },
                spec.name,
                spec.name
            )));
        }
    }
    let info = match vault.get_key(&spec.name, spec.version.as_deref()) {
        Ok(i) => i,
        Err(VaultError::Denied {
            reason: DenyReason::KeyDisabled,
            what,
        }) => {
            return Err(DesError::Refused(format!(
                "key {what} is disabled: a Disk Encryption Set needs an enabled key (enable it \
                 with `cmkfs vault key update {} --enable`)",
                spec.name
            )))
        }
        Err(e) => return Err(e.into()),
    };
    if props.is_none()
        && (info.recovery_level.is_empty() || info.recovery_level.contains("Purgeable"))
    {
        return Err(no_purge_protection());
    }
    for op in ["wrapKey", "unwrapKey"] {
        if !info.key_ops.iter().any(|o| o == op) {
            return Err(DesError::Refused(format!(
                "key {} does not allow {op} (its key_ops are {}); a Disk Encryption Set needs \
                 wrapKey and unwrapKey",
                info.kid,
                info.key_ops.join(", ")
            )));
        }
    }
    let now = crate::volume::unix_now();
    if info.nbf.is_some_and(|n| now < n) || info.exp.is_some_and(|x| now >= x) {
        return Err(DesError::Refused(format!(
            "key {} is expired or not yet valid: the vault would refuse to wrap with it",
            info.kid
        )));
    }
    if have.is_none() {
        probe_wrap_unwrap(vault, &info, who)?;
    }
    Ok(info)
}

/// Proves wrapKey and unwrapKey by a round trip of a random probe (never a real DEK).
fn probe_wrap_unwrap(vault: &dyn Vault, info: &KeyInfo, who: &str) -> Result<(), DesError> {
    let refused = |op: &str, e: VaultError| {
        DesError::Refused(format!(
            "identity {who} cannot {op} with key {} ({e}); a Disk Encryption Set needs get, \
             wrapKey and unwrapKey",
            info.kid
        ))
    };
    let probe = Dek::generate().map_err(|e| DesError::Invalid(format!("no randomness: {e}")))?;
    let w = vault
        .wrap_key(
            &info.name,
            Some(&info.version),
            info.wrap_alg,
            probe.as_bytes(),
        )
        .map_err(|e| refused("wrapKey", e))?;
    let back = vault
        .unwrap_key(&w.kid, w.alg, &w.value)
        .map_err(|e| refused("unwrapKey", e))?;
    if back.as_slice() != probe.as_bytes() {
        return Err(DesError::Invalid(format!(
            "key {} does not unwrap what it wrapped",
            info.kid
        )));
    }
    Ok(())
}

/// Opens cmkfs's platform vault (the `local:` vault of `home`, as its owner) and makes sure
/// the platform key exists and is enabled, creating it on first use.
pub fn ensure_platform_key(home: &Home) -> Result<(Box<dyn Vault>, KeyInfo), DesError> {
    let v = vault::open(crate::vault::local::URL, home)?;
    let info = match v.get_key(PLATFORM_KEY, None) {
        Ok(i) => i,
        Err(VaultError::NotFound(_)) => v.create_key(
            PLATFORM_KEY,
            &CreateKeyOptions {
                key_size: PLATFORM_KEY_SIZE,
                ..CreateKeyOptions::default()
            },
        )?,
        Err(VaultError::Denied { reason, what }) => {
            return Err(DesError::Refused(format!(
                "cmkfs's platform key is unusable ({what}: {reason}); double-encrypted volumes \
                 need it"
            )))
        }
        Err(e) => return Err(e.into()),
    };
    Ok((v, info))
}

// ---------------------------------------------------------------------------------------------
// Create, show, list, delete
// ---------------------------------------------------------------------------------------------

/// `cmkfs des create`.
#[derive(Clone, Debug)]
pub struct CreateRequest {
    /// DES name.
    pub name: String,
    /// The key: name, versionless URL or full id.
    pub key: String,
    /// Key version (latest when `None` and the key id has none).
    pub version: Option<String>,
    /// Vault URL for a bare key name.
    pub vault: String,
    /// Identity; the vault owner when `None`.
    pub identity: Option<IdentitySpec>,
    /// Single or double encryption.
    pub encryption_type: EncryptionType,
    /// Follow the key's newest version automatically.
    pub auto_rotate: bool,
}

/// Creates a DES after checking its key and identity (see [`check_key`]). Nothing is written
/// unless every check passes.
pub fn create(home: &Home, req: &CreateRequest) -> Result<DiskEncryptionSet, DesError> {
    check_des_name(&req.name)?;
    let spec = KeySpec::parse(&req.key, req.version.as_deref(), &req.vault)?;
    let identity = req
        .identity
        .as_ref()
        .map(|i| resolve_identity(home, i))
        .transpose()?;
    let store = DesStore::new(home);
    if store.path(&req.name).exists() {
        return Err(DesError::Exists(req.name.clone()));
    }
    // Every check before the lock (whose file creates the store directory): a refused create
    // leaves nothing behind.
    let v = open_vault_as(home, &spec.vault, identity.as_ref())?;
    let who = identity
        .as_ref()
        .map_or(vault::OWNER_IDENTITY, |i| i.name.as_str());
    let info = check_key(v.as_ref(), &spec, who)?;
    let _lock = store.lock()?;
    if store.path(&req.name).exists() {
        return Err(DesError::Exists(req.name.clone()));
    }
    if req.encryption_type.is_double() {
        ensure_platform_key(home)?;
    }
    let des = DiskEncryptionSet {
        schema: SCHEMA,
        name: req.name.clone(),
        encryption_type: req.encryption_type,
        active_key: KeyRef {
            key_url: info.kid.clone(),
        },
        previous_keys: Vec::new(),
        rotation_to_latest_key_version_enabled: req.auto_rotate,
        last_key_rotation_timestamp: None,
        auto_key_rotation_error: None,
        identity,
        volumes: Vec::new(),
        created: now_rfc3339(),
    };
    store.save(&des)?;
    Ok(des)
}

/// Where one volume of a DES stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeState {
    /// Backing directory.
    pub cipherdir: PathBuf,
    /// The key its header names (absent when there is no volume there).
    pub key_url: Option<String>,
    /// `active` (on the active key), `previous` (still on a previous key: rotation in
    /// progress), `missing` (no volume there any more), `foreign` (the header names another
    /// DES or none), `unknown-key` (a key the record does not list), `unreadable`.
    pub state: String,
}

/// The state of every volume of `des`, read from their headers.
pub fn volume_states(des: &DiskEncryptionSet) -> Vec<VolumeState> {
    des.volumes
        .iter()
        .map(|p| {
            let (key_url, state) = match VolumeHeader::read(p) {
                Ok(h) if h.des.as_deref() != Some(des.name.as_str()) => (Some(h.key_id), "foreign"),
                Ok(h) if h.key_id == des.active_key.key_url => (Some(h.key_id), "active"),
                Ok(h) if des.knows_key(&h.key_id) => (Some(h.key_id), "previous"),
                Ok(h) => (Some(h.key_id), "unknown-key"),
                Err(VolumeError::NotAVolume(_)) => (None, "missing"),
                Err(_) => (None, "unreadable"),
            };
            VolumeState {
                cipherdir: p.clone(),
                key_url,
                state: state.into(),
            }
        })
        .collect()
}

/// Reads one DES.
pub fn show(home: &Home, name: &str) -> Result<DiskEncryptionSet, DesError> {
    DesStore::new(home).load(name)
}

/// Every DES.
pub fn list(home: &Home) -> Result<Vec<DiskEncryptionSet>, DesError> {
    DesStore::new(home).list()
}

/// Deletes a DES; refused while a volume bound to it still exists (volumes cannot leave
/// their DES: see the module docs on irreversibility).
pub fn delete(home: &Home, name: &str) -> Result<(), DesError> {
    let store = DesStore::new(home);
    store.load(name)?; // fail before the lock creates anything
    let _lock = store.lock()?;
    let des = store.load(name)?;
    let live: Vec<String> = volume_states(&des)
        .into_iter()
        .filter(|s| s.state != "missing" && s.state != "foreign")
        .map(|s| s.cipherdir.display().to_string())
        .collect();
    if !live.is_empty() {
        return Err(DesError::Refused(format!(
            "Disk Encryption Set {name} still has {} volume{}: {} (a volume cannot leave its \
             Disk Encryption Set; delete the volumes first)",
            live.len(),
            if live.len() == 1 { "" } else { "s" },
            live.join(", ")
        )));
    }
    let path = store.path(name);
    fs::remove_file(&path).map_err(|e| DesError::io(&path, e))?;
    fsutil::sync_dir(store.dir()).map_err(|e| DesError::io(store.dir(), e))
}

// ---------------------------------------------------------------------------------------------
// Binding a new volume
// ---------------------------------------------------------------------------------------------

/// `cmkfs init CIPHERDIR --des NAME`: creates a volume wrapped with the DES's active key, as
/// the DES identity (double-encrypted when the DES says so), records the DES in its header
/// and the volume in the DES.
///
/// The volume is listed in the record *before* it is created, so a crash in between leaves
/// a listed path without a volume (harmless: rotations skip it), never a volume its DES does
/// not know about (which a rotation would miss).
pub fn init_volume(
    home: &Home,
    des_name: &str,
    cipherdir: &Path,
    sector_size: u32,
) -> Result<VolumeHeader, DesError> {
    let store = DesStore::new(home);
    store.load(des_name)?; // fail before the lock creates anything
    let _lock = store.lock()?;
    let mut des = store.load(des_name)?;
    let v = open_vault(home, &des)?;
    let kid = des.active_key_id()?;
    let info = v.get_key(&kid.name, Some(&kid.version))?;
    let path = std::path::absolute(cipherdir).map_err(|e| DesError::io(cipherdir, e))?;
    let listed = des.volumes.contains(&path);
    if !listed {
        des.volumes.push(path.clone());
        store.save(&des)?;
    }
    let opts = CreateOptions {
        key_name: kid.name.clone(),
        key_version: Some(kid.version.clone()),
        wrap_alg: info.wrap_alg,
        sector_size,
        des: Some(des.name.clone()),
    };
    let created = if des.encryption_type.is_double() {
        ensure_platform_key(home).and_then(|(pv, pinfo)| {
            let layer = PlatformLayer {
                vault: pv.as_ref(),
                key_name: PLATFORM_KEY,
                wrap_alg: pinfo.wrap_alg,
            };
            Ok(Volume::create_double(&path, v.as_ref(), &layer, &opts)?)
        })
    } else {
        Volume::create(&path, v.as_ref(), &opts).map_err(DesError::from)
    };
    let header = match created {
        Ok(h) => h,
        Err(e) => {
            if !listed {
                // Nothing was created: take the entry back out (best effort; a leftover entry
                // without a volume is harmless).
                des.volumes.retain(|p| p != &path);
                let _ = store.save(&des);
            }
            return Err(e);
        }
    };
    // Record the canonical path (symlinks resolved) now that the directory exists.
    if let Ok(canon) = fs::canonicalize(&path) {
        if canon != path {
            des.volumes.retain(|p| p != &path);
            if !des.volumes.contains(&canon) {
                des.volumes.push(canon);
            }
            store.save(&des)?;
        }
    }
    Ok(header)
}

/// Checks a volume header against this machine's Disk Encryption Set records, which (unlike
/// the header) a writer of the backing store cannot change:
///
/// - a volume a record lists must name that set in its header (a header stripped of its
///   `des` would be mounted as the vault owner, past the set's identity and its policies);
/// - a volume naming a set recorded here must be wrapped with a key the record lists (active
///   or previous): an older header put back after a rotation is refused, so disabling the
///   new key version cuts the volume off.
///
/// Records that cannot be read are skipped (and logged); a set not recorded here is not
/// checked (the header's MAC still binds it).
pub fn check_binding(home: &Home, dir: &Path, header: &VolumeHeader) -> Result<(), DesError> {
    let store = DesStore::new(home);
    let names: Vec<String> = match fs::read_dir(store.dir()) {
        Ok(rd) => rd
            .flatten()
            .filter_map(|e| {
                let n = e.file_name().to_str()?.strip_suffix(".json")?.to_string();
                valid_des_name(&n).then_some(n)
            })
            .collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(DesError::io(store.dir(), e)),
    };
    let abs = std::path::absolute(dir).ok();
    let canon = fs::canonicalize(dir).ok();
    for name in names {
        let des = match store.load(&name) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "skipping an unreadable Disk Encryption Set record");
                continue;
            }
        };
        let lists = des
            .volumes
            .iter()
            .any(|v| Some(v) == abs.as_ref() || Some(v) == canon.as_ref());
        if lists && header.des.as_deref() != Some(des.name.as_str()) {
            return Err(DesError::Refused(format!(
                "the volume at {} belongs to Disk Encryption Set {}, but its header names {}:                  the header was changed",
                dir.display(),
                des.name,
                header
                    .des
                    .as_deref()
                    .map_or("none".to_string(), |d| format!("set {d}"))
            )));
        }
        if header.des.as_deref() == Some(des.name.as_str()) && !des.knows_key(&header.key_id) {
            return Err(DesError::Refused(format!(
                "the volume header names key {}, which Disk Encryption Set {} does not list                  (active: {}): an old or foreign header was put in place",
                header.key_id, des.name, des.active_key.key_url
            )));
        }
    }
    Ok(())
}

/// The vault a mount of a volume should use: the DES identity of the volume's DES. `None`
/// when the volume has no DES, or its DES has no identity (the owner then), or the DES record
/// is not in this home (logged; the owner then).
pub fn mount_vault(home: &Home, header: &VolumeHeader) -> Result<Option<MountVault>, DesError> {
    let Some(name) = &header.des else {
        return Ok(None);
    };
    let des = match DesStore::new(home).load(name) {
        Ok(d) => d,
        Err(DesError::NotFound(_)) => {
            tracing::warn!(des = %name, "the volume's Disk Encryption Set is not in this cmkfs home; using the vault owner");
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let Some(id) = &des.identity else {
        return Ok(None);
    };
    let kid = header.key_id()?;
    Ok(Some((
        open_vault_as(home, &kid.vault, Some(id))?,
        id.name.clone(),
    )))
}

// ---------------------------------------------------------------------------------------------
// Rewrap
// ---------------------------------------------------------------------------------------------

/// The steps of a key change, in order. A [`Hooks::fault`] hook is called after each one and
/// can stop the operation right there, as a crash would (nothing is cleaned up).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RewrapStep {
    /// The record names the new key as active and the old one in `previousKeys`.
    IntentRecorded,
    /// A volume's DEK was unwrapped with its current key.
    Unwrapped,
    /// The DEK was wrapped with the new key.
    Wrapped,
    /// The new wrap was unwrapped again and matches the volume.
    Verified,
    /// Half of the new header is in the temp file (a torn write).
    TempPartial,
    /// The temp file is complete and fsynced.
    TempSynced,
    /// The temp file was renamed over the header.
    Renamed,
    /// The directory was fsynced: the new header is durable.
    DirSynced,
    /// Every volume is done and `previousKeys` is cleared.
    Completed,
}

impl RewrapStep {
    /// Every step, in order.
    pub const ALL: [RewrapStep; 9] = [
        RewrapStep::IntentRecorded,
        RewrapStep::Unwrapped,
        RewrapStep::Wrapped,
        RewrapStep::Verified,
        RewrapStep::TempPartial,
        RewrapStep::TempSynced,
        RewrapStep::Renamed,
        RewrapStep::DirSynced,
        RewrapStep::Completed,
    ];
}

/// Progress of a multi-volume rewrap: called once with `volume: None` before the first
/// volume, then after each volume.
#[derive(Clone, Debug)]
pub struct Progress<'p> {
    /// Volumes handled so far.
    pub done: usize,
    /// Volumes in all.
    pub total: usize,
    /// The volume just handled.
    pub volume: Option<&'p Path>,
}

/// A fault-injection hook (see [`Hooks::fault`]).
pub type FaultHook<'a> = &'a mut dyn FnMut(RewrapStep, &Path) -> io::Result<()>;

/// The vault connection of a mount and the identity it acts as.
pub type MountVault = (Box<dyn Vault>, String);

/// Observers of a rewrap.
#[derive(Default)]
pub struct Hooks<'a> {
    /// Progress reports (the CLI draws a progress bar from them).
    pub progress: Option<&'a mut dyn FnMut(&Progress)>,
    /// Fault injection for crash-safety tests: called after every [`RewrapStep`] with the
    /// volume concerned (the DES directory for record steps); an `Err` stops the operation
    /// at once, leaving the disk as a crash at that point would.
    #[doc(hidden)]
    pub fault: Option<FaultHook<'a>>,
}

impl Hooks<'_> {
    fn step(&mut self, step: RewrapStep, at: &Path) -> Result<(), DesError> {
        match &mut self.fault {
            Some(f) => f(step, at).map_err(|_| DesError::Interrupted(step)),
            None => Ok(()),
        }
    }

    fn progress(&mut self, p: &Progress) {
        if let Some(f) = &mut self.progress {
            f(p);
        }
    }
}

/// What a rewrap did to one volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum RewrapOutcome {
    /// The header now names the new key.
    Rewrapped,
    /// It already did.
    AlreadyCurrent,
    /// No volume there any more (nothing to protect): skipped.
    Missing,
}

/// The new key of a rewrap.
struct Target {
    kid: KeyId,
    info: KeyInfo,
}

/// The vault connections of a key change: the new key's vault, and, opened on demand, the
/// vaults of the keys volumes are still wrapped with (a key change may move to a key in
/// another vault). Each is reached as the DES identity whose credential is for it, else with
/// that vault's default connection (the owner of `local:`, a token's PIN, a credential found
/// in `$CMKFS_HOME/credentials`).
struct Vaults<'a> {
    home: &'a Home,
    target_url: String,
    target: &'a dyn Vault,
    identities: Vec<DesIdentity>,
    others: Vec<(String, Box<dyn Vault>)>,
}

impl<'a> Vaults<'a> {
    fn new(
        home: &'a Home,
        target_url: &str,
        target: &'a dyn Vault,
        identities: Vec<DesIdentity>,
    ) -> Vaults<'a> {
        Vaults {
            home,
            target_url: target_url.to_string(),
            target,
            identities,
            others: Vec::new(),
        }
    }

    /// The connection for vault `url`.
    fn for_url(&mut self, url: &str) -> Result<&dyn Vault, DesError> {
        if same_vault(url, &self.target_url) {
            return Ok(self.target);
        }
        if let Some(i) = self.others.iter().position(|(u, _)| same_vault(u, url)) {
            return Ok(self.others[i].1.as_ref());
        }
        let id = self.identities.iter().find(|id| {
            Credential::load(&id.credential_file).is_ok_and(|c| same_vault(&c.vault, url))
        });
        let v = open_vault_as(self.home, url, id)?;
        self.others.push((url.to_string(), v));
        Ok(self
            .others
            .last()
            .map(|(_, v)| v.as_ref())
            .unwrap_or(self.target))
    }
}

/// How long a rewrap waits for a running `cmkfs upgrade` of the volume.
const UPGRADE_WAIT: std::time::Duration = std::time::Duration::from_secs(600);

/// Moves one volume to `target`: unwrap with its current key, wrap with the new one, check
/// the new wrap, replace the header atomically. The DEK and data are untouched.
fn rewrap_volume(
    dir: &Path,
    des: &DiskEncryptionSet,
    vaults: &mut Vaults,
    target: &Target,
    hooks: &mut Hooks,
) -> Result<RewrapOutcome, DesError> {
    if let Err(VolumeError::NotAVolume(_)) = VolumeHeader::read(dir) {
        return Ok(RewrapOutcome::Missing);
    }
    // Not while `cmkfs upgrade` rewrites this header (it holds the volume lock exclusively):
    // wait for it. Mounts share the lock, so online rewraps go ahead.
    let _lock = crate::volume::lock::VolumeLock::shared_wait(dir, UPGRADE_WAIT)
        .map_err(|e| DesError::Refused(e.to_string()))?;
    let header = VolumeHeader::read(dir)?;
    if header.des.as_deref() != Some(des.name.as_str()) {
        return Err(DesError::Refused(format!(
            "the volume at {} belongs to {}, not to Disk Encryption Set {}",
            dir.display(),
            header
                .des
                .as_deref()
                .map_or("no Disk Encryption Set".into(), |d| format!(
                    "Disk Encryption Set {d}"
                )),
            des.name
        )));
    }
    let new_url = target.kid.to_string();
    if header.key_id == new_url {
        return Ok(RewrapOutcome::AlreadyCurrent);
    }
    let vault = vaults.target;
    let dek = header.unwrap_dek(vaults.for_url(&header.key_id()?.vault)?)?;
    hooks.step(RewrapStep::Unwrapped, dir)?;
    let wrapped = vault.wrap_key(
        &target.kid.name,
        Some(&target.kid.version),
        target.info.wrap_alg,
        dek.as_bytes(),
    )?;
    if wrapped.kid != target.kid {
        return Err(DesError::Invalid(format!(
            "the vault wrapped with {} instead of {new_url}",
            wrapped.kid
        )));
    }
    hooks.step(RewrapStep::Wrapped, dir)?;
    // A re-encryption in progress: its retiring DEK moves to the new key as well, so that
    // both stay reachable with the key the record lists.
    let retiring = match &header.retiring {
        None => None,
        Some(_) => {
            let old = header.unwrap_retiring_dek(vaults.for_url(&header.key_id()?.vault)?)?;
            Some(vault.wrap_key(
                &target.kid.name,
                Some(&target.kid.version),
                target.info.wrap_alg,
                old.as_bytes(),
            )?)
        }
    };
    let new_header = header.rewrapped_both(&wrapped, retiring.as_ref(), &dek);
    // Never write a wrap that does not come back: unwrap it again and check it against the
    // volume's fingerprint and MAC.
    let check = new_header.unwrap_dek(vault)?;
    if check.as_bytes() != dek.as_bytes() {
        return Err(DesError::Invalid(format!(
            "the new wrap of {} does not unwrap to the volume's key",
            dir.display()
        )));
    }
    if new_header.retiring.is_some() {
        new_header.unwrap_retiring_dek(vault)?;
    }
    drop((check, dek));
    hooks.step(RewrapStep::Verified, dir)?;
    replace_header(dir, &new_header, hooks)?;
    Ok(RewrapOutcome::Rewrapped)
}

/// [`VolumeHeader::write`]'s atomic replace, step by step so that [`Hooks::fault`] can stop
/// it between steps: temp file → fsync → rename over the header → fsync the directory.
fn replace_header(dir: &Path, header: &VolumeHeader, hooks: &mut Hooks) -> Result<(), DesError> {
    let path = dir.join(HEADER_FILE);
    let bytes = header.to_bytes()?;
    let mut rnd = [0u8; 6];
    getrandom::getrandom(&mut rnd).map_err(|e| DesError::io(dir, io::Error::other(e)))?;
    let tmp = dir.join(format!(
        "{}{HEADER_FILE}.{}",
        fsutil::TEMP_PREFIX,
        hex::encode(rnd)
    ));
    let mut interrupted = None;
    let result = (|| -> Result<(), DesError> {
        let io_err = |e| DesError::io(&tmp, e);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err)?;
        let half = bytes.len() / 2;
        f.write_all(&bytes[..half]).map_err(io_err)?;
        hooks
            .step(RewrapStep::TempPartial, dir)
            .inspect_err(|_| interrupted = Some(()))?;
        f.write_all(&bytes[half..]).map_err(io_err)?;
        f.sync_all().map_err(io_err)?;
        drop(f);
        hooks
            .step(RewrapStep::TempSynced, dir)
            .inspect_err(|_| interrupted = Some(()))?;
        fs::rename(&tmp, &path).map_err(|e| DesError::io(&path, e))?;
        Ok(())
    })();
    if let Err(e) = result {
        // A real error cleans up after itself; an injected crash leaves what a crash would.
        if interrupted.is_none() {
            let _ = fs::remove_file(&tmp);
        }
        return Err(e);
    }
    hooks.step(RewrapStep::Renamed, dir)?;
    fsutil::sync_dir(dir).map_err(|e| DesError::io(dir, e))?;
    hooks.step(RewrapStep::DirSynced, dir)
}

/// What a key change did.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RotationReport {
    /// DES name.
    pub des: String,
    /// The key(s) volumes were moved from.
    pub from: Vec<String>,
    /// The key they are on now.
    pub to: String,
    /// Per volume.
    pub volumes: Vec<(PathBuf, RewrapOutcome)>,
}

impl RotationReport {
    /// Volumes whose header was rewritten.
    pub fn rewrapped(&self) -> usize {
        self.volumes
            .iter()
            .filter(|(_, o)| *o == RewrapOutcome::Rewrapped)
            .count()
    }
}

/// Moves `des` (locked by the caller) to `target` and rewraps all its volumes: records the
/// intent, rewraps each volume, then completes the record. On failure of some volumes the
/// record stays "in progress" (old keys in `previousKeys`) and the error lists them.
fn rotate_locked(
    store: &DesStore,
    des: &mut DiskEncryptionSet,
    vaults: &mut Vaults,
    target: &Target,
    hooks: &mut Hooks,
) -> Result<RotationReport, DesError> {
    let new_url = target.kid.to_string();
    if des.active_key.key_url != new_url {
        let old = std::mem::replace(
            &mut des.active_key,
            KeyRef {
                key_url: new_url.clone(),
            },
        );
        if !des.previous_keys.contains(&old) {
            des.previous_keys.push(old);
        }
    }
    des.previous_keys.retain(|k| k.key_url != new_url);
    let from: Vec<String> = des
        .previous_keys
        .iter()
        .map(|k| k.key_url.clone())
        .collect();
    store.save(des)?;
    hooks.step(RewrapStep::IntentRecorded, store.dir())?;
    let total = des.volumes.len();
    hooks.progress(&Progress {
        done: 0,
        total,
        volume: None,
    });
    let mut outcomes = Vec::new();
    let mut failures = Vec::new();
    for (i, dir) in des.volumes.clone().iter().enumerate() {
        match rewrap_volume(dir, des, vaults, target, hooks) {
            Ok(o) => outcomes.push((dir.clone(), o)),
            Err(e @ DesError::Interrupted(_)) => return Err(e),
            Err(e) => failures.push(format!("{}: {e}", dir.display())),
        }
        hooks.progress(&Progress {
            done: i + 1,
            total,
            volume: Some(dir),
        });
    }
    if !failures.is_empty() {
        return Err(DesError::Incomplete(format!(
            "Disk Encryption Set {}: {} of {total} volume{} could not be moved to {new_url} \
             (first: {}); the rotation stays in progress with the old key{} in previousKeys: \
             fix the cause and run `cmkfs des update {}` to finish",
            des.name,
            failures.len(),
            if total == 1 { "" } else { "s" },
            failures[0],
            if from.len() == 1 { "" } else { "s" },
            des.name
        )));
    }
    let changed = !from.is_empty() || outcomes.iter().any(|(_, o)| *o == RewrapOutcome::Rewrapped);
    des.previous_keys.clear();
    if changed {
        des.last_key_rotation_timestamp = Some(now_rfc3339());
    }
    store.save(des)?;
    hooks.step(RewrapStep::Completed, store.dir())?;
    Ok(RotationReport {
        des: des.name.clone(),
        from,
        to: new_url,
        volumes: outcomes,
    })
}

/// `cmkfs des update`.
#[derive(Clone, Debug, Default)]
pub struct UpdateRequest {
    /// New key (name, versionless URL or full id); with `version` alone, a version of the
    /// current key.
    pub key: Option<String>,
    /// Key version.
    pub version: Option<String>,
    /// Vault URL for a bare key name (the current key's vault when `None`).
    pub vault: Option<String>,
    /// New identity.
    pub identity: Option<IdentitySpec>,
    /// Turn auto-rotation on or off.
    pub auto_rotate: Option<bool>,
    /// Requested encryption type: refused if it differs (it cannot change).
    pub encryption_type: Option<EncryptionType>,
    /// Volumes to drop from the list (only where no volume of this DES exists any more).
    pub forget_volumes: Vec<PathBuf>,
}

/// What `des update` did.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UpdateReport {
    /// The record afterwards.
    pub des: DiskEncryptionSet,
    /// The key change, if one ran (also when it only finished an interrupted one).
    pub rotation: Option<RotationReport>,
}

/// Updates a DES: identity, auto-rotation, forgotten volumes, and a key change (new version
/// or different key), which rewraps every volume (mounted ones pick the new header up on
/// their next key check). Always finishes an interrupted rotation and clears
/// `autoKeyRotationError` when it succeeds.
pub fn update(
    home: &Home,
    name: &str,
    req: &UpdateRequest,
    hooks: &mut Hooks,
) -> Result<UpdateReport, DesError> {
    check_des_name(name)?;
    let store = DesStore::new(home);
    store.load(name)?; // fail before the lock creates anything
    let _lock = store.lock()?;
    let mut des = store.load(name)?;
    if let Some(t) = req.encryption_type {
        if t != des.encryption_type {
            return Err(DesError::Refused(format!(
                "the encryption type of Disk Encryption Set {name} is {} and cannot change (it \
                 would mean re-encrypting every volume's data)",
                des.encryption_type
            )));
        }
    }
    let active = des.active_key_id()?;
    // Validate everything before changing anything.
    let spec = match (&req.key, &req.version) {
        (Some(k), v) => Some(KeySpec::parse(
            k,
            v.as_deref(),
            req.vault.as_deref().unwrap_or(&active.vault),
        )?),
        (None, Some(v)) => Some(KeySpec::parse(&active.name, Some(v), &active.vault)?),
        (None, None) => None,
    };
    for p in &req.forget_volumes {
        let abs = std::path::absolute(p).map_err(|e| DesError::io(p, e))?;
        let found = des
            .volumes
            .iter()
            .position(|q| q == &abs || fs::canonicalize(&abs).is_ok_and(|c| &c == q));
        let Some(i) = found else {
            return Err(DesError::Invalid(format!(
                "{} is not a volume of Disk Encryption Set {name}",
                p.display()
            )));
        };
        match VolumeHeader::read(&des.volumes[i]) {
            Ok(h) if h.des.as_deref() == Some(name) => {
                return Err(DesError::Refused(format!(
                    "{} still holds a volume of Disk Encryption Set {name}: a volume cannot leave \
                     its Disk Encryption Set",
                    p.display()
                )))
            }
            _ => {
                des.volumes.remove(i);
            }
        }
    }
    let identity = match &req.identity {
        Some(i) => Some(resolve_identity(home, i)?),
        None => des.identity.clone(),
    };
    let key_vault = spec
        .as_ref()
        .map_or(active.vault.clone(), |s| s.vault.clone());
    let v = open_vault_as(home, &key_vault, identity.as_ref())?;
    let who = identity
        .as_ref()
        .map_or(vault::OWNER_IDENTITY, |i| i.name.as_str())
        .to_string();
    let target_spec = spec.unwrap_or_else(|| KeySpec {
        vault: active.vault.clone(),
        name: active.name.clone(),
        version: Some(active.version.clone()),
    });
    let info = check_key(v.as_ref(), &target_spec, &who)?;
    let kid: KeyId = info.kid.parse()?;
    if req.identity.is_some()
        && same_vault(&kid.vault, &active.vault)
        && !des.previous_keys.is_empty()
    {
        // The new identity must also be able to unwrap volumes still on a previous key.
        for k in des.previous_keys.clone() {
            let pk = k.key_id()?;
            check_permissions(v.as_ref(), &pk.name, &who)?;
        }
    }
    // Volumes still on a key of another vault are unwrapped as whichever identity (new or
    // previous) holds a credential for it.
    let identities: Vec<DesIdentity> = identity
        .iter()
        .chain(des.identity.iter())
        .cloned()
        .collect();
    des.identity = identity;
    if let Some(a) = req.auto_rotate {
        des.rotation_to_latest_key_version_enabled = a;
    }
    des.auto_key_rotation_error = None;
    let needs_rotation = kid.to_string() != des.active_key.key_url
        || !des.previous_keys.is_empty()
        || volume_states(&des)
            .iter()
            .any(|s| s.state == "previous" || s.state == "unknown-key");
    let rotation = if needs_rotation {
        let mut vaults = Vaults::new(home, &key_vault, v.as_ref(), identities);
        Some(rotate_locked(
            &store,
            &mut des,
            &mut vaults,
            &Target { kid, info },
            hooks,
        )?)
    } else {
        store.save(&des)?;
        None
    };
    Ok(UpdateReport { des, rotation })
}

fn check_permissions(vault: &dyn Vault, key: &str, who: &str) -> Result<(), DesError> {
    let have = match vault.permissions(key) {
        Ok(h) => h,
        // A backend that cannot tell (the keys REST API): the rewrap itself will say.
        Err(VaultError::Invalid(_)) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if REQUIRED_PERMISSIONS.iter().all(|p| have.contains(p)) {
        Ok(())
    } else {
        Err(DesError::Refused(format!(
            "identity {who} lacks get, wrapKey or unwrapKey on key {key}, which volumes of this \
             Disk Encryption Set still use"
        )))
    }
}

// ---------------------------------------------------------------------------------------------
// Auto-rotation
// ---------------------------------------------------------------------------------------------

/// Auto-rotation for the volume at `cipherdir`, called by its mount around each key check
/// (so it happens within one key-check interval of a new key version): if the volume belongs
/// to a DES with `rotationToLatestKeyVersionEnabled` and no `autoKeyRotationError`, and the
/// vault has a newer version of the DES key (or this volume is not yet on the active key),
/// moves the DES to the newest version and rewraps all its volumes. `vault` is the mount's
/// connection (the DES identity).
///
/// Returns `Ok(None)` when there is nothing to do, the DES is busy (another process holds its
/// lock: the next check tries again) or the newest version cannot be read (a revoked key is
/// the key check's business, not a rotation failure). A rotation that fails is recorded as
/// `autoKeyRotationError`, which pauses auto-rotation until `cmkfs des update`.
pub fn auto_rotate_for_volume(
    home: &Home,
    cipherdir: &Path,
    vault: &dyn Vault,
) -> Result<Option<RotationReport>, DesError> {
    let header = VolumeHeader::read(cipherdir)?;
    let Some(name) = header.des.clone() else {
        return Ok(None);
    };
    let store = DesStore::new(home);
    let des = match store.load(&name) {
        Ok(d) => d,
        Err(DesError::NotFound(_)) => return Ok(None),
        Err(e) => return Err(e),
    };
    let due = |des: &DiskEncryptionSet, latest: &KeyInfo| {
        des.rotation_to_latest_key_version_enabled
            && des.auto_key_rotation_error.is_none()
            && (latest.kid != des.active_key.key_url
                || header.key_id != des.active_key.key_url
                || !des.previous_keys.is_empty())
    };
    if !des.rotation_to_latest_key_version_enabled || des.auto_key_rotation_error.is_some() {
        return Ok(None);
    }
    let active = des.active_key_id()?;
    let latest = match vault.get_key(&active.name, None) {
        Ok(i) => i,
        Err(e) => {
            tracing::debug!(error = %e, des = %name, "auto-rotation: cannot read the newest key version");
            return Ok(None);
        }
    };
    if !due(&des, &latest) {
        return Ok(None);
    }
    let Some(_lock) = store.try_lock()? else {
        return Ok(None);
    };
    // Re-read under the lock: another mount may have rotated in the meantime.
    let mut des = store.load(&name)?;
    if !due(&des, &latest) {
        return Ok(None);
    }
    let latest_url = latest.kid.clone();
    let result = (|| {
        let kid: KeyId = latest.kid.parse()?;
        let spec = KeySpec {
            vault: kid.vault.clone(),
            name: kid.name.clone(),
            version: Some(kid.version.clone()),
        };
        let info = check_key(vault, &spec, des.identity_name())?;
        let mut vaults = Vaults::new(
            home,
            &kid.vault,
            vault,
            des.identity.iter().cloned().collect(),
        );
        rotate_locked(
            &store,
            &mut des,
            &mut vaults,
            &Target { kid, info },
            &mut Hooks::default(),
        )
    })();
    match result {
        Ok(r) => Ok(Some(r)),
        Err(e) => {
            // Reload: rotate_locked may have saved the intent already.
            let mut des = store.load(&name).unwrap_or(des);
            des.auto_key_rotation_error = Some(RotationError {
                code: "KeyRotationFailed".into(),
                message: e.to_string(),
                time: now_rfc3339(),
                target_key_url: latest_url,
            });
            store.save(&des)?;
            Err(e)
        }
    }
}

/// [`auto_rotate_for_volume`] for a mount's monitor: resolves the home from the environment
/// and logs instead of returning errors (a failed rotation is recorded in the DES and must not
/// disturb the mount).
/// Returns whether volumes were rewrapped.
pub fn auto_rotate_mounted(cipherdir: &Path, vault: &dyn Vault) -> bool {
    match auto_rotate_for_volume(&Home::from_env(), cipherdir, vault) {
        Ok(None) => false,
        Ok(Some(r)) => {
            tracing::info!(
                des = %r.des,
                to = %r.to,
                rewrapped = r.rewrapped(),
                "Disk Encryption Set auto-rotated to the key's newest version"
            );
            r.rewrapped() > 0
        }
        Err(e) => {
            tracing::warn!(error = %e, "Disk Encryption Set auto-rotation failed; paused until `cmkfs des update`");
            false
        }
    }
}

/// Unwraps a volume's keys the way a mount does (both layers for double encryption), through
/// `vault` and cmkfs's platform vault of `home`: for tests and checks that want the answer
/// without mounting.
pub fn unwrap_volume(
    home: &Home,
    vault: &dyn Vault,
    header: &VolumeHeader,
) -> Result<(), DesError> {
    header.unwrap_dek(vault)?;
    if header.platform.is_some() {
        let pv = vault::open(crate::vault::local::URL, home)?;
        header.unwrap_platform_dek(pv.as_ref())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{Dek, VolumeKeys};
    use crate::vault::local::{ConfigUpdate, LocalVault};
    use crate::vault::{WrapAlg, Wrapped};

    #[test]
    fn key_specs_parse_names_urls_and_ids() {
        let v = "0123456789abcdef0123456789abcdef";
        assert_eq!(
            KeySpec::parse("k1", None, "local:").unwrap(),
            KeySpec {
                vault: "local:".into(),
                name: "k1".into(),
                version: None
            }
        );
        assert_eq!(
            KeySpec::parse("local:/keys/k1", Some(v), "x").unwrap(),
            KeySpec {
                vault: "local:".into(),
                name: "k1".into(),
                version: Some(v.into())
            }
        );
        let full = format!("local:/keys/k1/{v}");
        assert_eq!(
            KeySpec::parse(&full, None, "x").unwrap().version.as_deref(),
            Some(v)
        );
        assert_eq!(
            KeySpec::parse(&full, Some(v), "x")
                .unwrap()
                .version
                .as_deref(),
            Some(v)
        );
        for bad in [
            "",
            "bad name",
            "k/1",
            "local:/keys/",
            "/keys/k1",
            "local:/keys/k1/a/b",
            "local:/keys/b@d/1",
        ] {
            let e = KeySpec::parse(bad, None, "local:").unwrap_err().to_string();
            assert!(
                !e.contains('\n') && (e.contains("key") || e.contains("malformed")),
                "{bad:?}: {e}"
            );
        }
        let e = KeySpec::parse(&full, Some("other"), "local:")
            .unwrap_err()
            .to_string();
        assert!(e.contains("contradicts"), "{e}");
        assert!(KeySpec::parse("k1", Some("a/b"), "local:").is_err());
        assert!(KeySpec::parse(PLATFORM_KEY, None, "local:")
            .unwrap()
            .is_platform_key());
    }

    #[test]
    fn names_and_encryption_types() {
        assert!(valid_des_name("des-1_A"));
        assert!(!valid_des_name(""));
        assert!(!valid_des_name("a b"));
        assert!(!valid_des_name("../x"));
        assert!(!valid_des_name(&"a".repeat(81)));
        assert_eq!(
            "encryptionatrestwithplatformandcustomerkeys"
                .parse::<EncryptionType>()
                .unwrap(),
            EncryptionType::EncryptionAtRestWithPlatformAndCustomerKeys
        );
        assert!("Platform".parse::<EncryptionType>().is_err());
        let json = serde_json::to_string(&EncryptionType::EncryptionAtRestWithCustomerKey).unwrap();
        assert_eq!(json, "\"EncryptionAtRestWithCustomerKey\"");
    }

    fn wrapped(kid: &str) -> Wrapped {
        Wrapped {
            kid: kid.parse().unwrap(),
            alg: WrapAlg::RsaOaep256,
            value: vec![1, 2, 3],
        }
    }

    #[test]
    fn platform_envelope_is_covered_by_the_mac_and_single_headers_are_unchanged() {
        let (outer, inner) = (Dek::generate().unwrap(), Dek::generate().unwrap());
        let w = wrapped("local:/keys/k/00000000000000000000000000000001");
        let pw = wrapped("local:/keys/cmkfs-platform/00000000000000000000000000000002");
        let id = "ab".repeat(16);
        let single = VolumeHeader::new(&outer, id.clone(), 4096, &w, 1);
        let env = crate::volume::header::PlatformEnvelope::new(&inner, &pw);
        let double = VolumeHeader::new_double(&outer, id, 4096, &w, 1, env);
        double.verify(&outer).unwrap();
        double.platform.as_ref().unwrap().verify(&inner).unwrap();
        assert!(double.platform.as_ref().unwrap().verify(&outer).is_err());
        // Stripping the platform layer, or swapping its DEK, breaks the MAC.
        let stripped = VolumeHeader {
            platform: None,
            ..double.clone()
        };
        assert!(stripped.verify(&outer).is_err());
        let mut swapped = double.clone();
        swapped.platform.as_mut().unwrap().dek_fingerprint = Dek::generate().unwrap().fingerprint();
        assert!(swapped.verify(&outer).is_err());
        // A single-encryption header has the MAC it had before double encryption existed.
        assert_eq!(
            VolumeHeader {
                platform: None,
                ..single.clone()
            }
            .header_mac,
            single.header_mac
        );
        assert_ne!(single.header_mac, double.header_mac);
        assert!(!String::from_utf8(single.to_bytes().unwrap())
            .unwrap()
            .contains("platform"));
        // A rewrap keeps the platform envelope.
        let moved = double.rewrapped(
            &wrapped("local:/keys/k2/00000000000000000000000000000003"),
            &outer,
        );
        assert_eq!(moved.platform, double.platform);
        moved.verify(&outer).unwrap();
    }

    #[test]
    fn double_keys_need_both_deks() {
        let (outer, inner) = (Dek::generate().unwrap(), Dek::generate().unwrap());
        let single = VolumeKeys::from_dek(&outer, 4096).unwrap();
        let double = VolumeKeys::from_deks(&outer, Some(&inner), 4096).unwrap();
        assert!(single.inner.is_none() && double.inner.is_some());
        let id = [7u8; 16];
        let n1 =
            crate::volume::names::encrypt(&single.names, &id, std::ffi::OsStr::new("x")).unwrap();
        let n2 =
            crate::volume::names::encrypt(&double.names, &id, std::ffi::OsStr::new("x")).unwrap();
        assert_ne!(
            n1.entry(),
            n2.entry(),
            "the name key depends on the inner DEK too"
        );
    }

    /// A home with a purge-protected local vault and a 2048-bit key `k`.
    fn home_with_key() -> (tempfile::TempDir, Home, LocalVault) {
        crate::vault::local::unlock::use_test_passphrase();
        let t = tempfile::tempdir().unwrap();
        let home = Home::at(t.path());
        let v = LocalVault::open(&home.vault_dir()).unwrap();
        v.configure(&ConfigUpdate {
            purge_protection: Some(true),
            ..Default::default()
        })
        .unwrap();
        v.create_key(
            "k",
            &CreateKeyOptions {
                key_size: 2048,
                ..Default::default()
            },
        )
        .unwrap();
        (t, home, v)
    }

    fn request(name: &str) -> CreateRequest {
        CreateRequest {
            name: name.into(),
            key: "k".into(),
            version: None,
            vault: "local:".into(),
            identity: None,
            encryption_type: EncryptionType::default(),
            auto_rotate: false,
        }
    }

    #[test]
    fn records_are_private_and_round_trip() {
        use std::os::unix::fs::PermissionsExt;
        let (_t, home, _v) = home_with_key();
        let d = create(&home, &request("d1")).unwrap();
        let store = DesStore::new(&home);
        assert_eq!(store.load("d1").unwrap(), d);
        assert_eq!(
            fs::metadata(store.path("d1")).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            fs::metadata(store.dir()).unwrap().permissions().mode() & 0o777,
            0o700
        );
        assert!(matches!(
            create(&home, &request("d1")),
            Err(DesError::Exists(_))
        ));
        assert_eq!(list(&home).unwrap().len(), 1);
        // The lock excludes a second holder; try_lock reports busy instead of waiting.
        let held = store.lock().unwrap();
        assert!(store.try_lock().unwrap().is_none());
        drop(held);
        assert!(store.try_lock().unwrap().is_some());
        delete(&home, "d1").unwrap();
        assert!(matches!(show(&home, "d1"), Err(DesError::NotFound(_))));
    }

    #[test]
    fn platform_key_is_refused_as_a_customer_key() {
        let (_t, home, _v) = home_with_key();
        ensure_platform_key(&home).unwrap();
        let e = create(
            &home,
            &CreateRequest {
                key: PLATFORM_KEY.into(),
                ..request("d")
            },
        )
        .unwrap_err();
        assert!(
            matches!(e, DesError::Refused(_)) && e.to_string().contains("irreversible"),
            "{e}"
        );
        create(&home, &request("d")).unwrap();
        let req = UpdateRequest {
            key: Some(PLATFORM_KEY.into()),
            ..Default::default()
        };
        let e = update(&home, "d", &req, &mut Hooks::default()).unwrap_err();
        assert!(e.to_string().contains("irreversible"), "{e}");
        let req = UpdateRequest {
            encryption_type: Some(EncryptionType::EncryptionAtRestWithPlatformAndCustomerKeys),
            ..Default::default()
        };
        let e = update(&home, "d", &req, &mut Hooks::default()).unwrap_err();
        assert!(e.to_string().contains("cannot change"), "{e}");
    }
}
