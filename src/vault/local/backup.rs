//! Key backup and restore (Key Vault's `POST /keys/{name}/backup` and `POST /keys/restore`).
//!
//! A backup is every version of one key, private keys included, with their attributes, tags
//! and the key's rotation policy, sealed by the vault master key as one blob of role
//! `key-backup` named after the key (AES-256-GCM; the associated data binds the seal id, the
//! role and the key name, see [`super::seal`]). It is opaque to its holder and opens only in
//! a vault with the same master key: the vault that made it, or a copy of that vault's store
//! (its `seal.json` with the same passphrase, e.g. a store restored from a file backup) —
//! cmkfs's analogue of Key Vault's rule that a backup restores only within the same
//! subscription and geography. A restore keeps the key's name and version ids and refuses a
//! name that is taken (also by a soft-deleted key), as the service does.
//!
//! An unsealed (legacy) store cannot make backups: it has no key to seal them with, and a key
//! backup in clear would be a private-key export.

use std::collections::BTreeMap;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use super::store::KeyRecord;
use super::{check_name, damaged, key_url, rsa, seal, LocalVault, URL};
use crate::vault::{KeyInfo, Permission, VaultError};

const BACKUP_FORMAT: u32 = 1;

/// The sealed content of a backup.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct BackupBody {
    format: u32,
    /// Unix seconds.
    made: u64,
    key: KeyRecord,
    /// Version id → PKCS#8 DER, base64url.
    private_keys: BTreeMap<String, String>,
}

impl Drop for BackupBody {
    fn drop(&mut self) {
        for v in self.private_keys.values_mut() {
            v.zeroize();
        }
    }
}

fn invalid_blob(why: &str) -> VaultError {
    VaultError::Invalid(format!("the key backup blob is not usable: {why}"))
}

impl LocalVault {
    fn sealing_key(&self, what: &str) -> Result<std::sync::Arc<seal::MasterKey>, VaultError> {
        self.master()?.ok_or_else(|| {
            VaultError::Invalid(format!(
                "{what} needs a sealed vault (backups are sealed by the vault master key): \
                 run `cmkfs vault seal` first"
            ))
        })
    }

    /// Backs up every version of key `name` (needs `backup`): an opaque blob only a vault
    /// with this vault's master key can restore.
    pub fn backup_key(&self, name: &str) -> Result<Vec<u8>, VaultError> {
        self.audited("KeyBackup", key_url(name), |_| {
            check_name(name)?;
            self.require(Permission::Backup, name)?;
            self.store.read_vault()?;
            let mk = self.sealing_key("a key backup")?;
            let mut rec = self.active_key(name)?;
            rec.near_expiry_notified = None;
            let mut body = BackupBody {
                format: BACKUP_FORMAT,
                made: self.now(),
                key: rec.clone(),
                private_keys: BTreeMap::new(),
            };
            for v in &rec.versions {
                let key = crate::vault::KeyId {
                    vault: URL.into(),
                    name: name.into(),
                    version: v.version.clone(),
                };
                let pkcs8 = self.private_key_of(&key, &key.to_string())?;
                body.private_keys
                    .insert(v.version.clone(), URL_SAFE_NO_PAD.encode(&*pkcs8));
            }
            let json = Zeroizing::new(
                serde_json::to_vec(&body).map_err(|e| VaultError::Store(e.to_string()))?,
            );
            mk.seal_blob(seal::SealRole::KeyBackup, name, &json)
        })
    }

    /// Restores a key from a backup blob (needs `restore` on the key's name): every version
    /// with its id, attributes and tags, and the rotation policy. Refused when the blob was
    /// sealed by a vault with another master key, or the name is taken.
    pub fn restore_key(&self, blob: &[u8]) -> Result<KeyInfo, VaultError> {
        self.audited("KeyRestore", format!("{URL}/keys"), |id| {
            self.store.read_vault()?;
            let env = seal::Envelope::parse(blob)
                .ok_or_else(|| invalid_blob("it is not a cmkfs key backup"))?;
            if env.role != seal::SealRole::KeyBackup.as_str() {
                return Err(invalid_blob("it is not a cmkfs key backup"));
            }
            let mk = self.sealing_key("restoring a key backup")?;
            if env.vault != mk.id() {
                return Err(VaultError::Invalid(format!(
                    "the key backup was made by another vault (seal {}; this vault's is {}): \
                     a backup restores only into the vault that made it, or a copy of that \
                     vault's store",
                    env.vault,
                    mk.id()
                )));
            }
            let json = mk
                .open_blob(&env, seal::SealRole::KeyBackup, None, "the key backup")
                .map_err(|_| invalid_blob("it is damaged or was altered"))?;
            let body: BackupBody = serde_json::from_slice(&json)
                .map_err(|_| invalid_blob("its content is malformed"))?;
            if body.format > BACKUP_FORMAT {
                return Err(invalid_blob("it was made by a newer cmkfs: upgrade cmkfs"));
            }
            let name = body.key.name.clone();
            check_name(&name)?;
            if name != env.name || body.key.versions.is_empty() {
                return Err(invalid_blob("its content does not match its name"));
            }
            *id = key_url(&name);
            self.require(Permission::Restore, &name)?;
            // Every private key must be whole and match its version's public key.
            let mut files = Vec::new();
            for v in &body.key.versions {
                let der = Zeroizing::new(
                    body.private_keys
                        .get(&v.version)
                        .and_then(|b| URL_SAFE_NO_PAD.decode(b).ok())
                        .ok_or_else(|| invalid_blob("a version's private key is missing"))?,
                );
                let m = rsa::material_from_pkcs8(&der)?;
                if m.n != v.n || m.e != v.e {
                    return Err(invalid_blob("a private key does not match its version"));
                }
                let sealed = Zeroizing::new(mk.seal_blob(
                    seal::SealRole::KekPrivateKey,
                    &format!("{name}/{}", v.version),
                    &m.pkcs8,
                )?);
                files.push((v.version.clone(), sealed));
            }
            let mut rec = body.key.clone();
            rec.deleted = None;
            rec.near_expiry_notified = None;
            self.mutate(|cfg| {
                if self.store.read_key(&name)?.is_some() {
                    return Err(VaultError::Conflict(format!(
                        "key {name} already exists in this vault (also when soft-deleted): \
                         restore needs a free name (purge the deleted key first)"
                    )));
                }
                self.store.create_key_versions(&rec, &files)?;
                let latest = rec.latest().ok_or_else(|| damaged(&name))?;
                Ok(self.info(cfg, &rec, latest))
            })
        })
    }
}
