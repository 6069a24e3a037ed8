//! The embedded vault's files: layout, records, the cross-process lock and the generation
//! counter. Every write is atomic (temp file + fsync + rename + fsync dir) and happens under an
//! exclusive `flock` on `lock`; reads take no lock because each record is one file replaced
//! atomically, so a reader always sees a whole old or a whole new record.
//!
//! ```text
//! <store>/                    0700
//!   vault.json                settings: format, created, retentionDays, purgeProtection,
//!                             auditMaxBytes, auditKeep
//!   seal.json                 the master key, wrapped under the passphrase (seal.rs)
//!   lock                      flock(2) target that serializes writers across processes
//!   generation                decimal counter, bumped after every state change (watchers)
//!   audit.log                 JSON lines, one per operation (append-only; rotated by size
//!   audit.log.1 .. .N         to audit.log.1, .2, ... at auditMaxBytes, auditKeep kept)
//!   audit.lock                flock(2) target that serializes audit appends and rotation
//!   keys/<name>/key.json      the key: attributes and tags of every version, soft-delete
//!                             state, rotation policy (rotationPolicy) and the version whose
//!                             near-expiry notice was given (nearExpiryNotified)
//!   keys/<name>/<version>.pk8 the version's PKCS#8 private key, sealed by the master key
//!                             (clear DER only in a store sealed before this file existed)
//!   identities/<name>.json    an identity: SHA-256 of its secret and its access policies
//! ```
//!
//! `key.json` is the commit point of a key: a version file not listed in it is invisible (a
//! crash between writing the `.pk8` and `key.json` leaves only an orphan). A new key is built
//! in `keys/.staging-*` and renamed into place; a purge renames the key away to
//! `keys/.purging-*` before removing it, so no half key is ever visible.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::fsutil::{
    create_private_dir, rotate_numbered, sync_dir, write_atomic, write_new, TEMP_PREFIX,
};
use crate::vault::{Permission, VaultError, WrapAlg, MAX_RETENTION_DAYS};

/// Store format this code reads and writes.
pub(crate) const FORMAT: u32 = 1;

/// `vault.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct VaultRecord {
    pub format: u32,
    pub created: u64,
    pub retention_days: u32,
    pub purge_protection: bool,
    /// The audit log is rotated when a line would take it past this size (0 = never).
    #[serde(default = "default_audit_max_bytes")]
    pub audit_max_bytes: u64,
    /// Rotated audit logs kept (`audit.log.1` .. `audit.log.N`).
    #[serde(default = "default_audit_keep")]
    pub audit_keep: u32,
}

/// Default size at which the audit log is rotated: 64 MiB.
pub(crate) const DEFAULT_AUDIT_MAX_BYTES: u64 = 64 * 1024 * 1024;
/// Default number of rotated audit logs kept.
pub(crate) const DEFAULT_AUDIT_KEEP: u32 = 5;

fn default_audit_max_bytes() -> u64 {
    DEFAULT_AUDIT_MAX_BYTES
}

fn default_audit_keep() -> u32 {
    DEFAULT_AUDIT_KEEP
}

/// `keys/<name>/key.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct KeyRecord {
    pub format: u32,
    pub name: String,
    pub created: u64,
    pub updated: u64,
    /// Default wrap algorithm of the key.
    pub wrap_alg: WrapAlg,
    /// Oldest first; the last one is the current ("latest") version.
    pub versions: Vec<VersionRecord>,
    /// Set while the key is soft-deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted: Option<DeletedRecord>,
    /// The key's rotation policy, once one was set (see `local/policy.rs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation_policy: Option<RotationPolicyRecord>,
    /// The version whose near-expiry notice was last given (one notice per version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub near_expiry_notified: Option<String>,
}

/// A key's rotation policy as set: ISO 8601 durations kept as given (they round-trip to
/// clients unchanged) and parsed where they are applied.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub(crate) struct RotationPolicyRecord {
    pub created: u64,
    pub updated: u64,
    /// Expiry given to each new version, e.g. `P90D`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiry_time: Option<String>,
    #[serde(default)]
    pub actions: Vec<LifetimeActionRecord>,
}

/// One lifetime action: `Rotate` or `Notify`, with its trigger.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub(crate) struct LifetimeActionRecord {
    /// `Rotate` or `Notify`.
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_after_create: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_before_expiry: Option<String>,
}

impl KeyRecord {
    /// The current version (keys always have at least one).
    pub fn latest(&self) -> Option<&VersionRecord> {
        self.versions.last()
    }

    /// A version by id.
    pub fn version(&self, v: &str) -> Option<&VersionRecord> {
        self.versions.iter().find(|r| r.version == v)
    }
}

/// One immutable key version's public half and mutable attributes.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct VersionRecord {
    pub version: String,
    pub key_size: u32,
    pub created: u64,
    pub updated: u64,
    pub enabled: bool,
    #[serde(default)]
    pub nbf: Option<u64>,
    #[serde(default)]
    pub exp: Option<u64>,
    pub key_ops: Vec<String>,
    /// JWK modulus (base64url): wrap needs only this and `e`.
    pub n: String,
    pub e: String,
    #[serde(default)]
    pub imported: bool,
    /// Application tags.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
}

/// Soft-delete state of a key.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct DeletedRecord {
    pub deleted_date: u64,
    pub scheduled_purge_date: u64,
}

/// `identities/<name>.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct IdentityRecord {
    pub format: u32,
    pub name: String,
    pub created: u64,
    /// Hex SHA-256 of the bearer secret (the secret itself is never stored).
    pub secret_sha256: String,
    /// Scope (`*` = every key, else a key name) → permissions.
    #[serde(default)]
    pub policies: BTreeMap<String, BTreeSet<Permission>>,
}

/// Holds the store's exclusive lock until dropped (closing the file releases the flock).
pub(crate) struct StoreLock {
    _file: File,
}

/// Paths and file operations of one store directory.
#[derive(Clone, Debug)]
pub(crate) struct Store {
    dir: PathBuf,
}

fn unavailable(what: impl std::fmt::Display, e: io::Error) -> VaultError {
    VaultError::Unavailable(format!("{what}: {e}"))
}

impl Store {
    pub fn new(dir: &Path) -> Store {
        Store {
            dir: dir.to_path_buf(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn vault_json(&self) -> PathBuf {
        self.dir.join("vault.json")
    }
    pub fn generation_path(&self) -> PathBuf {
        self.dir.join("generation")
    }
    pub fn audit_path(&self) -> PathBuf {
        self.dir.join("audit.log")
    }
    fn keys_dir(&self) -> PathBuf {
        self.dir.join("keys")
    }
    fn key_dir(&self, name: &str) -> PathBuf {
        self.keys_dir().join(name)
    }
    fn key_json(&self, name: &str) -> PathBuf {
        self.key_dir(name).join("key.json")
    }
    fn pk8(&self, name: &str, version: &str) -> PathBuf {
        self.key_dir(name).join(format!("{version}.pk8"))
    }
    fn identities_dir(&self) -> PathBuf {
        self.dir.join("identities")
    }
    fn identity_json(&self, name: &str) -> PathBuf {
        self.identities_dir().join(format!("{name}.json"))
    }

    /// Creates the store on first use (idempotent, safe against a concurrent creator).
    pub fn init_if_missing(&self, now: u64) -> Result<(), VaultError> {
        match fs::metadata(self.vault_json()) {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => {
                return Err(unavailable(
                    format!("cannot open vault store {}", self.dir.display()),
                    e,
                ))
            }
        }
        // The passphrase first: without one nothing of the store is made.
        let passphrase = super::seal::new_store_passphrase(&self.dir)?;
        create_private_dir(&self.dir).map_err(|e| {
            unavailable(
                format!("cannot create vault store {}", self.dir.display()),
                e,
            )
        })?;
        let _lock = self.lock()?;
        if self.vault_json().exists() {
            return Ok(());
        }
        let io = |e| {
            unavailable(
                format!("cannot create vault store {}", self.dir.display()),
                e,
            )
        };
        create_private_dir(&self.keys_dir()).map_err(io)?;
        create_private_dir(&self.identities_dir()).map_err(io)?;
        // A new store is sealed from the start: its first key is never written in clear.
        super::seal::create(&self.dir, now, &passphrase)?;
        let rec = VaultRecord {
            format: FORMAT,
            created: now,
            retention_days: MAX_RETENTION_DAYS,
            purge_protection: false,
            audit_max_bytes: DEFAULT_AUDIT_MAX_BYTES,
            audit_keep: DEFAULT_AUDIT_KEEP,
        };
        // vault.json last: its presence means "store complete".
        self.write_json(&self.generation_path(), &0u64)?;
        self.write_vault(&rec)
    }

    /// Takes the exclusive writer lock (blocks until other writers finish).
    pub fn lock(&self) -> Result<StoreLock, VaultError> {
        let path = self.dir.join("lock");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| unavailable(format!("cannot open vault lock {}", path.display()), e))?;
        loop {
            // SAFETY: flock on a file descriptor we own; no memory is involved.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                return Ok(StoreLock { _file: file });
            }
            let err = io::Error::last_os_error();
            if err.kind() != ErrorKind::Interrupted {
                return Err(unavailable(format!("cannot lock {}", path.display()), err));
            }
        }
    }

    /// Reads `vault.json`. A missing store is *unavailable* (an unmounted disk, a wrong
    /// `$CMKFS_HOME`), never "no keys": that would revoke every volume on a transient fault.
    pub fn read_vault(&self) -> Result<VaultRecord, VaultError> {
        match self.read_json::<VaultRecord>(&self.vault_json())? {
            Some(rec) if rec.format > FORMAT => Err(VaultError::Store(format!(
                "vault store {} has format {} (this cmkfs reads {FORMAT}): upgrade cmkfs",
                self.dir.display(),
                rec.format
            ))),
            Some(rec) => Ok(rec),
            None => Err(VaultError::Unavailable(format!(
                "vault store {} is missing or unreachable (is $CMKFS_HOME right and its disk mounted?)",
                self.dir.display()
            ))),
        }
    }

    pub fn write_vault(&self, rec: &VaultRecord) -> Result<(), VaultError> {
        self.write_json(&self.vault_json(), rec)
    }

    /// Reads a key record; `None` if no key has that name.
    pub fn read_key(&self, name: &str) -> Result<Option<KeyRecord>, VaultError> {
        let rec = self.read_json::<KeyRecord>(&self.key_json(name))?;
        if let Some(r) = &rec {
            if r.name != name || r.versions.is_empty() {
                return Err(VaultError::Store(format!(
                    "{} is damaged (name or versions do not match)",
                    self.key_json(name).display()
                )));
            }
        }
        Ok(rec)
    }

    /// Replaces a key record atomically (the key directory must exist).
    pub fn write_key(&self, rec: &KeyRecord) -> Result<(), VaultError> {
        self.write_json(&self.key_json(&rec.name), rec)
    }

    /// Names of all keys (active and soft-deleted), sorted.
    pub fn key_names(&self) -> Result<Vec<String>, VaultError> {
        self.list_dir(&self.keys_dir(), |n| {
            (!n.starts_with('.')).then(|| n.to_string())
        })
    }

    /// Creates a key directory with its first version, atomically: staged, then renamed.
    pub fn create_key(&self, rec: &KeyRecord, pkcs8: &[u8]) -> Result<(), VaultError> {
        let version = rec.versions[0].version.clone();
        self.create_key_versions(rec, &[(version, Zeroizing::new(pkcs8.to_vec()))])
    }

    /// Creates a key directory with every version's private-key file (a restore),
    /// atomically: staged, then renamed. A key name that is taken is a conflict.
    pub fn create_key_versions(
        &self,
        rec: &KeyRecord,
        files: &[(String, Zeroizing<Vec<u8>>)],
    ) -> Result<(), VaultError> {
        let mut rnd = [0u8; 8];
        getrandom::getrandom(&mut rnd).map_err(|e| VaultError::Store(e.to_string()))?;
        let staging = self
            .keys_dir()
            .join(format!(".staging-{}", hex::encode(rnd)));
        let io = |e| unavailable(format!("cannot write key {}", rec.name), e);
        let result = (|| {
            create_private_dir(&staging).map_err(io)?;
            for (version, bytes) in files {
                write_new(&staging.join(format!("{version}.pk8")), bytes, 0o600).map_err(io)?;
            }
            write_new(&staging.join("key.json"), &to_json(rec)?, 0o600).map_err(io)?;
            if self.key_dir(&rec.name).exists() {
                return Err(VaultError::Conflict(format!(
                    "key {} already exists in this vault",
                    rec.name
                )));
            }
            fs::rename(&staging, self.key_dir(&rec.name)).map_err(io)?;
            sync_dir(&self.keys_dir()).map_err(io)
        })();
        if result.is_err() {
            let _ = fs::remove_dir_all(&staging);
        }
        result
    }

    /// Writes the private key file of a new version (before `key.json` lists it).
    pub fn write_version_key(
        &self,
        name: &str,
        version: &str,
        pkcs8: &[u8],
    ) -> Result<(), VaultError> {
        write_new(&self.pk8(name, version), pkcs8, 0o600)
            .map_err(|e| unavailable(format!("cannot write key {name}"), e))
    }

    /// Every version private-key file of every key: (key name, version, path).
    pub fn version_key_files(&self) -> Result<Vec<(String, String, PathBuf)>, VaultError> {
        let mut out = Vec::new();
        for name in self.key_names()? {
            let dir = self.key_dir(&name);
            let entries = fs::read_dir(&dir)
                .map_err(|e| unavailable(format!("cannot list {}", dir.display()), e))?;
            for entry in entries.flatten() {
                let file = entry.file_name();
                let Some(version) = file.to_str().and_then(|f| f.strip_suffix(".pk8")) else {
                    continue;
                };
                if !version.starts_with('.') {
                    out.push((name.clone(), version.to_string(), entry.path()));
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Removes a version file that never got listed (failed rotation).
    pub fn remove_version_key(&self, name: &str, version: &str) {
        let _ = fs::remove_file(self.pk8(name, version));
    }

    /// Reads a version's private key; `None` if its file is gone.
    pub fn read_version_key(
        &self,
        name: &str,
        version: &str,
    ) -> Result<Option<Zeroizing<Vec<u8>>>, VaultError> {
        let path = self.pk8(name, version);
        match fs::read(&path) {
            Ok(b) => Ok(Some(Zeroizing::new(b))),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(unavailable(format!("cannot read {}", path.display()), e)),
        }
    }

    /// Purges a key: renamed out of sight first (atomic), then its private keys are
    /// overwritten and the directory removed.
    pub fn purge_key(&self, name: &str) -> Result<(), VaultError> {
        let mut rnd = [0u8; 8];
        getrandom::getrandom(&mut rnd).map_err(|e| VaultError::Store(e.to_string()))?;
        let gone = self
            .keys_dir()
            .join(format!(".purging-{}", hex::encode(rnd)));
        fs::rename(self.key_dir(name), &gone)
            .map_err(|e| unavailable(format!("cannot purge key {name}"), e))?;
        sync_dir(&self.keys_dir())
            .map_err(|e| unavailable(format!("cannot purge key {name}"), e))?;
        remove_tree_scrubbing(&gone);
        Ok(())
    }

    /// Removes leftovers of interrupted writers. Call with the lock held.
    pub fn cleanup(&self) {
        let Ok(entries) = fs::read_dir(self.keys_dir()) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(".staging-") || name.starts_with(".purging-") {
                remove_tree_scrubbing(&entry.path());
            }
        }
    }

    pub fn read_identity(&self, name: &str) -> Result<Option<IdentityRecord>, VaultError> {
        self.read_json(&self.identity_json(name))
    }

    pub fn write_identity(&self, rec: &IdentityRecord) -> Result<(), VaultError> {
        self.write_json(&self.identity_json(&rec.name), rec)
    }

    pub fn create_identity(&self, rec: &IdentityRecord) -> Result<(), VaultError> {
        write_new(&self.identity_json(&rec.name), &to_json(rec)?, 0o600)
            .map_err(|e| unavailable(format!("cannot write identity {}", rec.name), e))
    }

    pub fn remove_identity(&self, name: &str) -> Result<(), VaultError> {
        fs::remove_file(self.identity_json(name))
            .and_then(|()| sync_dir(&self.identities_dir()))
            .map_err(|e| unavailable(format!("cannot delete identity {name}"), e))
    }

    pub fn identity_names(&self) -> Result<Vec<String>, VaultError> {
        self.list_dir(&self.identities_dir(), |n| {
            n.strip_suffix(".json")
                .filter(|s| !s.starts_with('.'))
                .map(str::to_string)
        })
    }

    /// Current generation (0 when never bumped).
    pub fn generation(&self) -> Result<u64, VaultError> {
        Ok(self.read_json::<u64>(&self.generation_path())?.unwrap_or(0))
    }

    /// Increments the generation. Call with the lock held, after the change is durable.
    pub fn bump_generation(&self) -> Result<u64, VaultError> {
        let next = self.generation()?.wrapping_add(1);
        self.write_json(&self.generation_path(), &next)?;
        Ok(next)
    }

    fn list_dir(
        &self,
        dir: &Path,
        pick: impl Fn(&str) -> Option<String>,
    ) -> Result<Vec<String>, VaultError> {
        let entries = fs::read_dir(dir)
            .map_err(|e| unavailable(format!("cannot list {}", dir.display()), e))?;
        let mut out = Vec::new();
        for entry in entries {
            let entry =
                entry.map_err(|e| unavailable(format!("cannot list {}", dir.display()), e))?;
            if let Some(n) = entry.file_name().to_str().and_then(&pick) {
                if !n.starts_with(TEMP_PREFIX) {
                    out.push(n);
                }
            }
        }
        out.sort();
        Ok(out)
    }

    fn read_json<T: DeserializeOwned>(&self, path: &Path) -> Result<Option<T>, VaultError> {
        match fs::read(path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| VaultError::Store(format!("{} is damaged: {e}", path.display()))),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(unavailable(format!("cannot read {}", path.display()), e)),
        }
    }

    fn write_json<T: Serialize>(&self, path: &Path, value: &T) -> Result<(), VaultError> {
        write_atomic(path, &to_json(value)?, 0o600)
            .map_err(|e| unavailable(format!("cannot write {}", path.display()), e))
    }

    /// Appends one line to the audit log (created 0600), rotating it first when the line
    /// would take it past `max_bytes` (see [`rotate_numbered`]). Appends and rotations of
    /// every process are serialized by an flock on `audit.lock`, so a line is never lost to a
    /// rotation and never torn.
    pub fn append_audit(&self, line: &str, max_bytes: u64, keep: u32) -> io::Result<()> {
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(self.dir.join("audit.lock"))?;
        flock_exclusive(&lock)?;
        let open = || {
            OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o600)
                .open(self.audit_path())
        };
        let mut f = open()?;
        let size = f.metadata()?.len();
        if max_bytes > 0 && size > 0 && size + line.len() as u64 + 1 > max_bytes {
            rotate_numbered(&self.audit_path(), keep)?;
            f = open()?;
        }
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        f.write_all(&buf)
        // `lock` closes here, releasing the flock.
    }
}

fn flock_exclusive(file: &File) -> io::Result<()> {
    loop {
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

fn to_json<T: Serialize>(value: &T) -> Result<Vec<u8>, VaultError> {
    let mut v = serde_json::to_vec_pretty(value).map_err(|e| VaultError::Store(e.to_string()))?;
    v.push(b'\n');
    Ok(v)
}

/// Overwrites private-key files with zeros before unlinking (best effort: filesystems may
/// keep old blocks, but nothing is left in the obvious place), then removes the tree.
fn remove_tree_scrubbing(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            let p = entry.path();
            if p.extension().is_some_and(|e| e == "pk8") {
                if let (Ok(meta), Ok(mut f)) =
                    (fs::metadata(&p), OpenOptions::new().write(true).open(&p))
                {
                    let zeros = vec![0u8; usize::try_from(meta.len()).unwrap_or(0)];
                    let _ = f.write_all(&zeros).and_then(|()| f.sync_all());
                }
            }
        }
    }
    let _ = fs::remove_dir_all(dir);
}
