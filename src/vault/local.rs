//! The embedded vault (`local:`): RSA key-encryption keys in a store directory under
//! `$CMKFS_HOME/vault`, with Key Vault's semantics: immutable versions, per-version attributes
//! (enabled, nbf, exp, key_ops), soft delete with retention, purge protection, identities with
//! per-key access policies checked on every call, and an audit log line per operation.
//!
//! Private keys never leave this module: no function returns them; wrap uses only the public
//! half, unwrap loads the PKCS#8 into a zeroized buffer for the duration of the call.
//!
//! At rest every private key is sealed by the vault master key ([`seal`]): a store is created
//! sealed, the master key is unsealed once per process (from this process's cache, the kernel
//! keyring, or the passphrase) when a private key is first needed. A store written before
//! sealing existed still opens, with a warning to run `cmkfs vault seal`.
//!
//! Every state change goes through one path: take the store lock, re-read, validate, write
//! atomically, bump `<store>/generation` (so a watcher can notice changes by polling or
//! inotify on that one file), release.

mod audit;
mod backup;
mod crypto;
mod identities;
mod keys;
pub mod policy;
mod rsa;
pub mod seal;
mod sealing;
mod settings;
mod store;
pub mod unlock;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

pub use audit::{AuditEvent, AuditProperties, AuditReader};
pub use rsa::KEY_SIZES;

use self::store::{DeletedRecord, IdentityRecord, KeyRecord, Store, VaultRecord, VersionRecord};
use super::{
    default_key_ops, recovery_level, valid_identity_name, valid_key_name, validate_key_ops,
    validate_tags, CreateKeyOptions, Credential, DeletedKeyInfo, DenyReason, ImportKeyOptions,
    KeyId, KeyInfo, KeyUpdate, Permission, Vault, VaultError, VaultProperties, WrapAlg,
    MAX_RETENTION_DAYS, MIN_RETENTION_DAYS, OWNER_IDENTITY,
};

static QUIET_UNSEALED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Stops the "not sealed" warning in this process (`cmkfs vault seal` itself).
pub fn suppress_unsealed_warning() {
    QUIET_UNSEALED.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// The URL of the embedded vault: the prefix of every key id it issues.
pub const URL: &str = "local:";

const DAY: u64 = 86_400;

/// The conflict of a conditional rotation that another writer already made.
const ALREADY_ROTATED: &str = "the key was rotated meanwhile";

/// Turns the bytes of a private key file (PKCS#8 PEM/DER, or PKCS#1 PEM/DER) into PKCS#8 DER
/// for [`Vault::import_key`]. Clear errors for encrypted, non-RSA or public-key files.
pub fn read_private_key(bytes: &[u8]) -> Result<Zeroizing<Vec<u8>>, VaultError> {
    rsa::pkcs8_from_file_bytes(bytes)
}

/// What `cmkfs vault seal` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealReport {
    /// The seal id (names the seal in sealed files and in the kernel keyring).
    pub id: String,
    /// Whether the store already had a seal (an interrupted seal resumed, or a re-run).
    pub resumed: bool,
    /// Files rewritten sealed by this run.
    pub sealed_files: usize,
}

/// Vault settings to change (`None` = leave as is).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConfigUpdate {
    /// Soft-delete retention, 7-90 days; applies to keys deleted from now on.
    pub retention_days: Option<u32>,
    /// `Some(true)` turns purge protection on; `Some(false)` is refused once it is on.
    pub purge_protection: Option<bool>,
    /// Rotate the audit log when a line would take it past this many bytes (0 = never;
    /// at least 4096 otherwise).
    pub audit_max_bytes: Option<u64>,
    /// Rotated audit logs kept (1-1000).
    pub audit_keep: Option<u32>,
}

/// An identity as listed (never its secret).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct IdentityInfo {
    /// Identity name.
    pub name: String,
    /// Unix seconds.
    pub created: u64,
}

/// Which keys an access policy covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolicyScope {
    /// Every key in the vault, present and future (stored as `*`).
    AllKeys,
    /// One key, by name.
    Key(String),
}

impl PolicyScope {
    fn as_str(&self) -> &str {
        match self {
            PolicyScope::AllKeys => "*",
            PolicyScope::Key(k) => k,
        }
    }
}

/// One access policy: identity × key (or `*`) → permissions.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AccessPolicy {
    /// Identity name.
    pub identity: String,
    /// Key name, or `*` for every key.
    pub key: String,
    /// Granted permissions.
    pub permissions: Vec<Permission>,
}

/// Who a connection acts as.
enum Caller {
    /// The vault owner (whoever can read the store directory): allowed everything.
    Owner,
    /// An identity: authenticated and checked against its policies on every call.
    Identity {
        name: String,
        secret_sha256: [u8; 32],
    },
}

/// A connection to the embedded vault, as the owner ([`LocalVault::open`]) or as an identity
/// ([`LocalVault::open_as`]). Cheap to hold: it keeps paths, not keys.
pub struct LocalVault {
    store: Store,
    caller: Caller,
    /// Seconds added to the clock: lets tests step past nbf/exp and retention periods.
    clock_offset: i64,
    /// The address of the remote client this connection serves (the vault server), for the
    /// audit log.
    client: Option<IpAddr>,
    /// The master key, once resolved (`None` inside: a legacy unsealed store).
    master: OnceLock<Option<Arc<seal::MasterKey>>>,
    audit_limits: OnceLock<(u64, u32)>,
}

impl std::fmt::Debug for LocalVault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret hash stays out of Debug output.
        f.debug_struct("LocalVault")
            .field("store", &self.store.dir())
            .field("identity", &self.identity())
            .finish()
    }
}

fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

fn random_hex(bytes: usize) -> Result<String, VaultError> {
    let mut b = Zeroizing::new(vec![0u8; bytes]);
    getrandom::getrandom(&mut b).map_err(|e| VaultError::Store(format!("no randomness: {e}")))?;
    Ok(hex::encode(&*b))
}

fn check_name(name: &str) -> Result<(), VaultError> {
    if valid_key_name(name) {
        Ok(())
    } else {
        Err(VaultError::Invalid(format!(
            "invalid key name {name:?}: use 1-127 letters, digits and dashes"
        )))
    }
}

fn check_identity_name(name: &str) -> Result<(), VaultError> {
    if valid_identity_name(name) {
        Ok(())
    } else if name.eq_ignore_ascii_case(OWNER_IDENTITY) {
        Err(VaultError::Invalid(format!(
            "identity name {name:?} is reserved for the vault owner"
        )))
    } else {
        Err(VaultError::Invalid(format!(
            "invalid identity name {name:?}: use 1-127 letters, digits and dashes"
        )))
    }
}

fn key_url(name: &str) -> String {
    format!("{URL}/keys/{name}")
}

fn kid(name: &str, version: &str) -> String {
    format!("{URL}/keys/{name}/{version}")
}

fn denied(reason: DenyReason, what: impl Into<String>) -> VaultError {
    VaultError::Denied {
        reason,
        what: what.into(),
    }
}

fn fmt_time(t: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + std::time::Duration::from_secs(t)).to_string()
}

impl LocalVault {
    /// Opens the store at `dir` as its owner, creating it on first use.
    pub fn open(dir: &Path) -> Result<LocalVault, VaultError> {
        let v = LocalVault {
            store: Store::new(dir),
            caller: Caller::Owner,
            clock_offset: 0,
            client: None,
            master: OnceLock::new(),
            audit_limits: OnceLock::new(),
        };
        v.store.init_if_missing(v.now())?;
        v.store.read_vault()?;
        seal::check_seal_not_lost(v.store.dir())?;
        v.warn_if_unsealed();
        Ok(v)
    }

    /// Opens the existing store at `dir` as its owner, never creating one: for the commands
    /// that only use a vault (backup, restore, mount, status, fsck, `vault key list`...).
    ///
    /// Errors: [`VaultError::Invalid`] naming `dir`, the home to point `CMKFS_HOME` at and
    /// `cmkfs init`, when there is no store there; nothing is created.
    pub fn open_existing(dir: &Path) -> Result<LocalVault, VaultError> {
        let store = Store::new(dir);
        if let Err(e) = std::fs::symlink_metadata(store.vault_json()) {
            if e.kind() == std::io::ErrorKind::NotFound {
                let home = dir.parent().unwrap_or(dir);
                return Err(VaultError::Invalid(format!(
                    "there is no vault in {} (the home {}): this command uses an existing \
                     vault and never creates one; set CMKFS_HOME to the home that holds it, or \
                     create a vault with `cmkfs init` or `cmkfs vault key create`",
                    dir.display(),
                    home.display()
                )));
            }
        }
        let v = LocalVault {
            store,
            caller: Caller::Owner,
            clock_offset: 0,
            client: None,
            master: OnceLock::new(),
            audit_limits: OnceLock::new(),
        };
        v.store.read_vault()?;
        seal::check_seal_not_lost(v.store.dir())?;
        v.warn_if_unsealed();
        Ok(v)
    }

    /// Opens the existing store at `dir` as `identity`, proving it with `secret` (from its
    /// credential file). The credential is checked now and again on every call, so deleting
    /// the identity or changing its policies takes effect at once.
    pub fn open_as(dir: &Path, identity: &str, secret: &str) -> Result<LocalVault, VaultError> {
        LocalVault::open_as_client(dir, identity, secret, None, true)
    }

    /// [`LocalVault::open_as`] for a remote client at `client` (the vault server): the
    /// address goes into every audit line of the connection, failed sign-ins included (unless
    /// `audit_failure` is false: the server's throttle accounts for those).
    pub fn open_as_client(
        dir: &Path,
        identity: &str,
        secret: &str,
        client: Option<IpAddr>,
        audit_failure: bool,
    ) -> Result<LocalVault, VaultError> {
        check_identity_name(identity)?;
        let v = LocalVault {
            store: Store::new(dir),
            caller: Caller::Identity {
                name: identity.to_string(),
                secret_sha256: sha256(secret.as_bytes()),
            },
            clock_offset: 0,
            client,
            master: OnceLock::new(),
            audit_limits: OnceLock::new(),
        };
        v.store.read_vault()?;
        seal::check_seal_not_lost(v.store.dir())?;
        v.warn_if_unsealed();
        let started = SystemTime::now();
        let t0 = Instant::now();
        if let Err(e) = v.authenticate() {
            if !audit_failure {
                return Err(e);
            }
            // Failed sign-ins are what an auditor looks for first; successes are implied by
            // the operations that follow.
            let mut ev = AuditEvent::new(
                "Authentication",
                v.identity(),
                URL,
                started,
                t0.elapsed(),
                Some(&e),
            );
            ev.caller_ip_address = v.client.map(|a| a.to_string());
            v.write_audit(&ev);
            return Err(e);
        }
        Ok(v)
    }

    /// Opens as the identity of a credential (see [`LocalVault::open_as`]).
    pub fn open_with_credential(dir: &Path, cred: &Credential) -> Result<LocalVault, VaultError> {
        if cred.vault != URL && cred.vault != "local" {
            return Err(VaultError::Invalid(format!(
                "the credential of {} is for vault {:?}, not {URL}",
                cred.identity, cred.vault
            )));
        }
        LocalVault::open_as(dir, &cred.identity, &cred.secret)
    }

    /// Shifts this connection's clock by `secs` (tests of nbf/exp and retention).
    #[doc(hidden)]
    pub fn with_clock_offset(mut self, secs: i64) -> LocalVault {
        self.clock_offset = secs;
        self
    }

    /// The store directory.
    pub fn store_dir(&self) -> &Path {
        self.store.dir()
    }

    /// The identity this connection acts as (`owner` for the vault owner).
    pub fn identity(&self) -> &str {
        match &self.caller {
            Caller::Owner => OWNER_IDENTITY,
            Caller::Identity { name, .. } => name,
        }
    }

    /// The store's change counter: bumped after every change of keys, identities, policies
    /// or settings. Watch [`LocalVault::generation_path`] to learn of changes.
    pub fn generation(&self) -> Result<u64, VaultError> {
        self.store.generation()
    }

    /// The file holding the generation counter (replaced atomically on every change).
    pub fn generation_path(&self) -> PathBuf {
        self.store.generation_path()
    }

    /// A reader of the audit log from its beginning (owner only).
    pub fn audit_reader(&self) -> Result<AuditReader, VaultError> {
        self.require_owner("reading the audit log")?;
        self.store.read_vault()?;
        Ok(AuditReader::new(&self.store.audit_path()))
    }

    fn now(&self) -> u64 {
        let real = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        real.saturating_add_signed(self.clock_offset)
    }

    /// Runs one operation and writes its audit line. `id` names what it addresses; the
    /// operation may refine it (e.g. to the versioned key id it resolved).
    fn audited<T>(
        &self,
        operation: &str,
        id: String,
        f: impl FnOnce(&mut String) -> Result<T, VaultError>,
    ) -> Result<T, VaultError> {
        let started = SystemTime::now();
        let t0 = Instant::now();
        let mut id = id;
        let result = f(&mut id);
        let mut ev = AuditEvent::new(
            operation,
            self.identity(),
            &id,
            started,
            t0.elapsed(),
            result.as_ref().err(),
        );
        ev.caller_ip_address = self.client.map(|a| a.to_string());
        self.write_audit(&ev);
        result
    }

    /// Rotation settings of the audit log, read once per connection.
    fn audit_limits(&self) -> (u64, u32) {
        *self
            .audit_limits
            .get_or_init(|| match self.store.read_vault() {
                Ok(c) => (c.audit_max_bytes, c.audit_keep),
                Err(_) => (store::DEFAULT_AUDIT_MAX_BYTES, store::DEFAULT_AUDIT_KEEP),
            })
    }

    /// Writes the one audit line of a throttling episode: failed sign-ins from `client` (or
    /// for `identity`) are answered 429 from now on, without a line each.
    pub fn audit_sign_in_throttled(
        dir: &Path,
        identity: &str,
        client: Option<IpAddr>,
        description: String,
    ) {
        let v = LocalVault {
            store: Store::new(dir),
            caller: Caller::Owner,
            clock_offset: 0,
            client,
            master: OnceLock::new(),
            audit_limits: OnceLock::new(),
        };
        let mut ev = AuditEvent::new(
            "Authentication",
            identity,
            URL,
            SystemTime::now(),
            std::time::Duration::ZERO,
            None,
        );
        ev.result_type = "Failure".into();
        ev.result_signature = "TooManyRequests".into();
        ev.properties.http_status_code = 429;
        ev.result_description = description;
        ev.caller_ip_address = client.map(|a| a.to_string());
        v.write_audit(&ev);
    }

    fn write_audit(&self, ev: &AuditEvent) {
        // A full disk must not take mounted volumes down with it: the operation stands, the
        // failure to record it is reported on the daemon's log.
        match serde_json::to_string(ev) {
            Ok(line) => {
                let (max, keep) = self.audit_limits();
                if let Err(e) = self.store.append_audit(&line, max, keep) {
                    tracing::warn!(error = %e, op = %ev.operation_name, "cannot write vault audit log");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot encode vault audit event"),
        }
    }

    /// Checks the caller's credential; returns its record (None for the owner).
    fn authenticate(&self) -> Result<Option<IdentityRecord>, VaultError> {
        let Caller::Identity {
            name,
            secret_sha256,
        } = &self.caller
        else {
            return Ok(None);
        };
        let rejected = || {
            denied(
                DenyReason::PermissionDenied,
                format!("{URL} (identity {name} is unknown or its credential was replaced; ask the vault owner for a new credential)"),
            )
        };
        let rec = self.store.read_identity(name)?.ok_or_else(rejected)?;
        let stored = hex::decode(&rec.secret_sha256)
            .map_err(|_| VaultError::Store(format!("identity {name} record is damaged")))?;
        aws_lc_rs::constant_time::verify_slices_are_equal(&stored, secret_sha256)
            .map_err(|_| rejected())?;
        Ok(Some(rec))
    }

    /// The caller's permissions on key `name`.
    fn permissions_on(&self, name: &str) -> Result<BTreeSet<Permission>, VaultError> {
        Ok(match self.authenticate()? {
            None => Permission::ALL.into_iter().collect(),
            Some(rec) => effective(&rec, name),
        })
    }

    /// Refuses unless the caller holds `perm` on key `name`.
    fn require(&self, perm: Permission, name: &str) -> Result<(), VaultError> {
        if self.permissions_on(name)?.contains(&perm) {
            Ok(())
        } else {
            Err(denied(
                DenyReason::PermissionDenied,
                format!(
                    "{} (identity {} lacks the {perm} permission)",
                    key_url(name),
                    self.identity()
                ),
            ))
        }
    }

    fn require_owner(&self, what: &str) -> Result<(), VaultError> {
        match &self.caller {
            Caller::Owner => Ok(()),
            Caller::Identity { name, .. } => Err(denied(
                DenyReason::PermissionDenied,
                format!("{what} (only the vault owner may; identity {name} is not)"),
            )),
        }
    }

    fn info(&self, cfg: &VaultRecord, rec: &KeyRecord, v: &VersionRecord) -> KeyInfo {
        KeyInfo {
            kid: kid(&rec.name, &v.version),
            name: rec.name.clone(),
            version: v.version.clone(),
            kty: "RSA".into(),
            key_size: v.key_size,
            key_ops: v.key_ops.clone(),
            enabled: v.enabled,
            created: v.created,
            updated: v.updated,
            wrap_alg: rec.wrap_alg,
            nbf: v.nbf,
            exp: v.exp,
            n: v.n.clone(),
            e: v.e.clone(),
            recovery_level: recovery_level(cfg.retention_days, cfg.purge_protection).into(),
            recoverable_days: cfg.retention_days,
            imported: v.imported,
            tags: v.tags.clone(),
        }
    }

    fn deleted_info(
        &self,
        cfg: &VaultRecord,
        rec: &KeyRecord,
        d: &DeletedRecord,
    ) -> Result<DeletedKeyInfo, VaultError> {
        let latest = rec.latest().ok_or_else(|| damaged(&rec.name))?;
        Ok(DeletedKeyInfo {
            key: self.info(cfg, rec, latest),
            recovery_id: format!("{URL}/deletedkeys/{}", rec.name),
            deleted_date: d.deleted_date,
            scheduled_purge_date: d.scheduled_purge_date,
        })
    }

    /// An active (not deleted) key, or NotFound / Denied(KeyDeleted).
    fn active_key(&self, name: &str) -> Result<KeyRecord, VaultError> {
        let rec = self.store.read_key(name)?.ok_or_else(|| not_found(name))?;
        if rec.deleted.is_some() {
            return Err(denied(
                DenyReason::KeyDeleted,
                format!(
                    "{} (recover it with `cmkfs vault key recover {name}`)",
                    key_url(name)
                ),
            ));
        }
        Ok(rec)
    }

    /// Housekeeping under the lock: leftovers of crashed writers, and deleted keys whose
    /// retention has run out (purged, as Key Vault does on its scheduled purge date).
    /// `spare` is a key the current operation addresses itself (an explicit purge).
    fn maintenance(&self, spare: Option<&str>) {
        self.store.cleanup();
        let now = self.now();
        let Ok(names) = self.store.key_names() else {
            return;
        };
        for name in names {
            if spare == Some(name.as_str()) {
                continue;
            }
            let Ok(Some(rec)) = self.store.read_key(&name) else {
                continue;
            };
            let Some(d) = &rec.deleted else { continue };
            if now < d.scheduled_purge_date {
                continue;
            }
            let started = SystemTime::now();
            let t0 = Instant::now();
            let result = self.store.purge_key(&name);
            let mut ev = AuditEvent::new(
                "KeyPurge",
                OWNER_IDENTITY,
                &key_url(&name),
                started,
                t0.elapsed(),
                result.as_ref().err(),
            );
            ev.result_description = match &result {
                Ok(()) => "retention period ended: purged automatically".into(),
                Err(e) => format!("automatic purge failed: {e}"),
            };
            self.write_audit(&ev);
            if result.is_ok() {
                self.bump();
            }
        }
    }

    fn bump(&self) {
        // After the change is durable: a missed bump delays watchers, it loses no state.
        if let Err(e) = self.store.bump_generation() {
            tracing::warn!(error = %e, "cannot bump the vault generation counter");
        }
    }

    /// Runs a state change under the store lock: maintenance, `f`, generation bump.
    fn mutate<T>(
        &self,
        f: impl FnOnce(&VaultRecord) -> Result<T, VaultError>,
    ) -> Result<T, VaultError> {
        self.mutate_sparing(None, f)
    }

    fn mutate_sparing<T>(
        &self,
        spare: Option<&str>,
        f: impl FnOnce(&VaultRecord) -> Result<T, VaultError>,
    ) -> Result<T, VaultError> {
        let _lock = self.store.lock()?;
        self.store.read_vault()?;
        self.maintenance(spare);
        let cfg = self.store.read_vault()?;
        let out = f(&cfg)?;
        self.bump();
        Ok(out)
    }

    fn new_version(&self, m: &rsa::Material, imported: bool) -> Result<VersionRecord, VaultError> {
        let now = self.now();
        Ok(VersionRecord {
            version: random_hex(16)?,
            key_size: m.key_size,
            created: now,
            updated: now,
            enabled: true,
            nbf: None,
            exp: None,
            key_ops: default_key_ops(),
            n: m.n.clone(),
            e: m.e.clone(),
            imported,
            tags: Default::default(),
        })
    }

    /// Adds a version to key `name` (creating the key when `create`), under the lock.
    fn add_version(
        &self,
        name: &str,
        m: &rsa::Material,
        imported: bool,
        wrap_alg: Option<WrapAlg>,
        create: CreateMode,
    ) -> Result<KeyInfo, VaultError> {
        self.add_version_checked(name, m, imported, wrap_alg, create, None)
    }

    /// [`LocalVault::add_version`], refused with [`ALREADY_ROTATED`] when `if_latest` is given
    /// and the key's latest version is another one by the time the lock is held (two
    /// processes applying the same due rotation make one version, not two).
    fn add_version_checked(
        &self,
        name: &str,
        m: &rsa::Material,
        imported: bool,
        wrap_alg: Option<WrapAlg>,
        create: CreateMode,
        if_latest: Option<&str>,
    ) -> Result<KeyInfo, VaultError> {
        // Resolved before the lock: it may ask for the passphrase.
        self.master()?;
        self.mutate(|cfg| {
            let existing = self.store.read_key(name)?;
            if let (Some(want), Some(rec)) = (if_latest, &existing) {
                if rec.latest().map(|v| v.version.as_str()) != Some(want) || rec.deleted.is_some() {
                    return Err(VaultError::Conflict(ALREADY_ROTATED.into()));
                }
            }
            let mut v = self.new_version(m, imported)?;
            match existing {
                Some(rec) if rec.deleted.is_some() => Err(VaultError::Conflict(format!(
                    "key {name} is soft-deleted: recover it (`cmkfs vault key recover {name}`) \
                     or purge it (`cmkfs vault key purge {name}`) before reusing the name"
                ))),
                Some(_) if create == CreateMode::New => Err(VaultError::Conflict(format!(
                    "key {name} already exists: add a version with `cmkfs vault key rotate {name}`"
                ))),
                Some(mut rec) => {
                    if create == CreateMode::Rotate {
                        // A rotation keeps the key's operations and tags; attributes start
                        // fresh, but for the expiry the rotation policy gives new versions.
                        if let Some(last) = rec.latest() {
                            v.key_ops = last.key_ops.clone();
                            v.tags = last.tags.clone();
                        }
                        v.exp = policy::new_version_expiry(&rec, v.created, self.limits())?;
                    }
                    if let Some(alg) = wrap_alg.filter(|a| *a != rec.wrap_alg) {
                        return Err(VaultError::Invalid(format!(
                            "key {name} wraps with {}, not {alg}: the algorithm is per key \
                             (import under a new name to use {alg})",
                            rec.wrap_alg
                        )));
                    }
                    let stored = self.seal_private_key(name, &v.version, &m.pkcs8)?;
                    self.store.write_version_key(name, &v.version, &stored)?;
                    rec.versions.push(v.clone());
                    rec.updated = v.created;
                    if let Err(e) = self.store.write_key(&rec) {
                        self.store.remove_version_key(name, &v.version);
                        return Err(e);
                    }
                    Ok(self.info(cfg, &rec, &v))
                }
                None if create == CreateMode::Rotate => Err(not_found(name)),
                None => {
                    let rec = KeyRecord {
                        format: store::FORMAT,
                        name: name.to_string(),
                        created: v.created,
                        updated: v.created,
                        wrap_alg: wrap_alg.unwrap_or_default(),
                        versions: vec![v.clone()],
                        deleted: None,
                        rotation_policy: None,
                        near_expiry_notified: None,
                    };
                    let stored = self.seal_private_key(name, &v.version, &m.pkcs8)?;
                    self.store.create_key(&rec, &stored)?;
                    Ok(self.info(cfg, &rec, &v))
                }
            }
        })
    }

    fn lookup_version<'a>(
        rec: &'a KeyRecord,
        version: Option<&str>,
    ) -> Result<&'a VersionRecord, VaultError> {
        match version {
            None => rec.latest().ok_or_else(|| damaged(&rec.name)),
            Some(v) => rec.version(v).ok_or_else(|| {
                VaultError::NotFound(format!(
                    "key {} has no version {v:?} in vault {URL} (see `cmkfs vault key versions {}`)",
                    rec.name, rec.name
                ))
            }),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum CreateMode {
    /// A new key; refuse an existing name.
    New,
    /// A new version of an existing key.
    Rotate,
    /// A new version, or a new key when absent.
    Import,
}

fn effective(rec: &IdentityRecord, name: &str) -> BTreeSet<Permission> {
    let mut set = rec.policies.get("*").cloned().unwrap_or_default();
    if let Some(p) = rec.policies.get(name) {
        set.extend(p.iter().copied());
    }
    set
}

fn not_found(name: &str) -> VaultError {
    VaultError::NotFound(format!(
        "key {name} does not exist in vault {URL} (see `cmkfs vault key list`)"
    ))
}

fn damaged(name: &str) -> VaultError {
    VaultError::Store(format!(
        "key {name} has no versions: its key.json is damaged"
    ))
}

/// Refuses a disabled version or one whose `key_ops` lack `op`.
fn usable(v: &VersionRecord, id: &str, op: &str) -> Result<(), VaultError> {
    if !v.enabled {
        return Err(disabled(id));
    }
    if !v.key_ops.iter().any(|o| o == op) {
        return Err(denied(
            DenyReason::OperationNotAllowed,
            format!("{id} (key_ops lacks {op})"),
        ));
    }
    Ok(())
}

fn disabled(id: &str) -> VaultError {
    let hint = match id.parse::<KeyId>() {
        Ok(k) => format!(
            " (enable it with `cmkfs vault key update {} --version {} --enable`)",
            k.name, k.version
        ),
        Err(_) => String::new(),
    };
    denied(DenyReason::KeyDisabled, format!("{id}{hint}"))
}

fn not_deleted(name: &str) -> VaultError {
    VaultError::NotFound(format!(
        "key {name} is not deleted (see `cmkfs vault key list-deleted`)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vault() -> (tempfile::TempDir, LocalVault) {
        unlock::use_test_passphrase();
        let d = tempfile::tempdir().unwrap();
        let v = LocalVault::open(&d.path().join("vault")).unwrap();
        (d, v)
    }

    fn opts() -> CreateKeyOptions {
        CreateKeyOptions {
            key_size: 2048,
            wrap_alg: WrapAlg::RsaOaep256,
        }
    }

    #[test]
    fn create_wrap_unwrap_rotate() {
        let (_d, v) = vault();
        let k = v.create_key("k1", &opts()).unwrap();
        assert_eq!(k.version.len(), 32);
        assert!(k
            .version
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        let w = v
            .wrap_key("k1", None, WrapAlg::RsaOaep256, &[5u8; 64])
            .unwrap();
        assert_eq!(w.kid.to_string(), k.kid);
        let r = v.rotate_key("k1").unwrap();
        assert_ne!(r.version, k.version);
        assert_eq!(v.get_key("k1", None).unwrap().version, r.version);
        // Old version still unwraps what it wrapped.
        assert_eq!(
            &v.unwrap_key(&w.kid, WrapAlg::RsaOaep256, &w.value).unwrap()[..],
            &[5u8; 64]
        );
        assert!(v.generation().unwrap() >= 2);
    }

    #[test]
    fn missing_store_is_unavailable() {
        let (d, v) = vault();
        v.create_key("k", &opts()).unwrap();
        std::fs::rename(d.path().join("vault"), d.path().join("moved")).unwrap();
        let e = v.get_key("k", None).unwrap_err();
        assert_eq!(e.class(), crate::vault::ErrorClass::Unavailable, "{e}");
    }
}
