//! The embedded vault sealed at rest: a random 256-bit *vault master key* encrypts every
//! secret the vault keeps on disk (KEK private keys, the server's TLS keys, credential files in
//! `$CMKFS_HOME/credentials`), and is itself stored only wrapped by a key derived from a
//! passphrase with Argon2id (RFC 9106).
//!
//! ```text
//! <store>/seal.json   {"format":1,"id","created","kdf":{"alg":"argon2id","version":19,
//!                      "memoryKib","iterations","parallelism","salt"},"wrappedKey","check",
//!                      "complete"}
//! ```
//!
//! - `wrappedKey` = nonce ‖ AES-256-GCM(Argon2id(passphrase, salt), master key), with
//!   `cmkfs-vault-master-key\0<id>` as associated data: a wrong passphrase fails the tag.
//! - `check` = nonce ‖ GCM tag of an empty message under the master key: lets a master key
//!   that comes from the kernel keyring be verified without the passphrase.
//! - `complete` is false while `cmkfs vault seal` converts an existing store: readers then
//!   accept both sealed and clear files, and running the seal again finishes the job.
//!
//! A sealed file (a *blob*) is a JSON envelope, so it can never be mistaken for the PKCS#8 DER,
//! PEM or credential JSON it replaces:
//!
//! ```text
//! {"cmkfsSealed":1,"vault":"<seal id>","role":"kek-private-key","name":"<key>/<version>",
//!  "alg":"A256GCM","data":"<base64url: nonce ‖ ciphertext ‖ tag>"}
//! ```
//!
//! The AEAD key is HKDF-SHA256(master key, "cmkfs vault seal v1: blobs"); the associated data
//! binds the seal id, the role and the name, so a blob moved to another file (a TLS key put
//! where a KEK is expected, one key version's file swapped for another's) fails to open.
//! Roles are open-ended: a key backup (`key-backup`, see `local/backup.rs`) is one of them.

use std::fs;
use std::io::{ErrorKind, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::crypto::secret::Secret;

use super::unlock::{
    kdf_params, keyring_load, new_passphrase, passphrase, wrong_passphrase, Passphrase,
};
use crate::fsutil::write_atomic;
use crate::vault::VaultError;

/// File name of the seal record in a store.
pub const SEAL_FILE: &str = "seal.json";
const FORMAT: u32 = 1;
const MASTER_AAD: &str = "cmkfs-vault-master-key";
const CHECK_AAD: &str = "cmkfs-vault-key-check";
const BLOB_AAD: &str = "cmkfs-sealed-v1";
const BLOB_INFO: &[u8] = b"cmkfs vault seal v1: blobs";
/// GCM tag length.
const TAG_LEN: usize = 16;

/// What a sealed blob holds; part of its associated data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SealRole {
    /// A KEK version's PKCS#8 private key (`keys/<name>/<version>.pk8`); name `<key>/<version>`.
    KekPrivateKey,
    /// A credential file (`$CMKFS_HOME/credentials/*.json`); name: the file name.
    Credential,
    /// The vault server's TLS private key (`tls/key.pem`).
    TlsKey,
    /// The private key of the vault server's generated CA (`tls/ca-key.pem`).
    TlsCaKey,
    /// A key backup (`POST /keys/{name}/backup`): every version of a key, private keys
    /// included; name: the key name. Only a vault with the same master key opens it.
    KeyBackup,
}

impl SealRole {
    /// The name written in the envelope.
    pub fn as_str(self) -> &'static str {
        match self {
            SealRole::KekPrivateKey => "kek-private-key",
            SealRole::Credential => "credential",
            SealRole::TlsKey => "tls-key",
            SealRole::TlsCaKey => "tls-ca-key",
            SealRole::KeyBackup => "key-backup",
        }
    }
}

/// Argon2id cost parameters (RFC 9106 §4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KdfParams {
    /// Memory in KiB (`m`).
    pub memory_kib: u32,
    /// Passes over memory (`t`).
    pub iterations: u32,
    /// Lanes (`p`).
    pub parallelism: u32,
}

impl KdfParams {
    /// RFC 9106's second recommended option (for memory-constrained settings), which is also
    /// above OWASP's minimum: 64 MiB, 3 passes, 4 lanes.
    pub const DEFAULT: KdfParams = KdfParams {
        memory_kib: 64 * 1024,
        iterations: 3,
        parallelism: 4,
    };
    /// A deliberately cheap setting for test suites (`CMKFS_VAULT_KDF=test`): 64 KiB, 1 pass.
    /// It protects nothing against a guessing attacker; never use it for real data.
    pub const TEST: KdfParams = KdfParams {
        memory_kib: 64,
        iterations: 1,
        parallelism: 1,
    };

    /// Parses `default`, `test`, or `m=KIB,t=N,p=N`.
    pub fn parse(s: &str) -> Result<KdfParams, VaultError> {
        let s = s.trim();
        let bad = || {
            VaultError::Invalid(format!(
                "invalid Argon2id parameters {s:?}: use default, test, or m=KIB,t=N,p=N \
                 (e.g. m=65536,t=3,p=4)"
            ))
        };
        match s {
            "default" => return Ok(KdfParams::DEFAULT),
            "test" => return Ok(KdfParams::TEST),
            _ => {}
        }
        let mut p = KdfParams::DEFAULT;
        for part in s.split(',') {
            let (k, v) = part.split_once('=').ok_or_else(bad)?;
            let v: u32 = v.trim().parse().map_err(|_| bad())?;
            match k.trim() {
                "m" => p.memory_kib = v,
                "t" => p.iterations = v,
                "p" => p.parallelism = v,
                _ => return Err(bad()),
            }
        }
        p.argon2().map_err(|_| bad())?;
        p.check().map_err(|why| {
            VaultError::Invalid(format!("invalid Argon2id parameters {s:?}: {why}"))
        })?;
        Ok(p)
    }

    /// Most memory a seal may ask for: 4 GiB (twice RFC 9106's first recommended option).
    pub const MAX_MEMORY_KIB: u32 = 4 * 1024 * 1024;
    /// Most passes a seal may ask for (t = 64 at the default memory takes about a minute here).
    pub const MAX_ITERATIONS: u32 = 64;
    /// Most lanes a seal may ask for.
    pub const MAX_PARALLELISM: u32 = 64;

    /// Checks the parameters against the bounds above and Argon2's own rules: a `seal.json`
    /// is read from disk, and its numbers decide how much memory and time an unseal takes.
    pub fn check(&self) -> Result<(), String> {
        if self.memory_kib > Self::MAX_MEMORY_KIB {
            return Err(format!(
                "m = {} KiB is more than the {} KiB (4 GiB) cmkfs allows",
                self.memory_kib,
                Self::MAX_MEMORY_KIB
            ));
        }
        if !(1..=Self::MAX_ITERATIONS).contains(&self.iterations) {
            return Err(format!(
                "t = {} is outside 1..={}",
                self.iterations,
                Self::MAX_ITERATIONS
            ));
        }
        if !(1..=Self::MAX_PARALLELISM).contains(&self.parallelism) {
            return Err(format!(
                "p = {} is outside 1..={}",
                self.parallelism,
                Self::MAX_PARALLELISM
            ));
        }
        self.argon2().map(|_| ()).map_err(|e| e.to_string())
    }

    fn argon2(&self) -> Result<argon2::Argon2<'static>, VaultError> {
        let params =
            argon2::Params::new(self.memory_kib, self.iterations, self.parallelism, Some(32))
                .map_err(|e| VaultError::Invalid(format!("Argon2id parameters: {e}")))?;
        Ok(argon2::Argon2::new(
            argon2::Algorithm::Argon2id,
            argon2::Version::V0x13,
            params,
        ))
    }
}

impl std::fmt::Display for KdfParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "argon2id m={} KiB, t={}, p={}",
            self.memory_kib, self.iterations, self.parallelism
        )
    }
}

/// `kdf` of `seal.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct KdfRecord {
    alg: String,
    version: u32,
    #[serde(flatten)]
    params: KdfParams,
    salt: String,
}

/// `seal.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SealRecord {
    format: u32,
    /// Random 128-bit id (hex): names the seal in blobs and in the kernel keyring.
    pub id: String,
    created: u64,
    kdf: KdfRecord,
    wrapped_key: String,
    check: String,
    /// False while an existing store is being converted.
    pub complete: bool,
}

impl SealRecord {
    /// The Argon2id parameters the passphrase key is derived with.
    pub fn kdf(&self) -> KdfParams {
        self.kdf.params
    }
}

/// The vault master key. Never printed; in a secret page (mlocked, kept out of core dumps),
/// zeroized on drop.
pub struct MasterKey {
    id: String,
    key: Secret<[u8; 32]>,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MasterKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

fn no_random(e: impl std::fmt::Display) -> VaultError {
    VaultError::Store(format!("no randomness: {e}"))
}

fn random<const N: usize>() -> Result<[u8; N], VaultError> {
    let mut b = [0u8; N];
    getrandom::getrandom(&mut b).map_err(no_random)?;
    Ok(b)
}

/// AES-256-GCM with a random nonce: nonce ‖ ciphertext ‖ tag.
fn aead_seal(key: &[u8; 32], aad: &[u8], plain: &[u8]) -> Result<Vec<u8>, VaultError> {
    let k = LessSafeKey::new(
        UnboundKey::new(&AES_256_GCM, key).map_err(|_| VaultError::Store("AES-GCM key".into()))?,
    );
    let nonce = random::<NONCE_LEN>()?;
    // Encrypted in place: the plaintext copy becomes the ciphertext.
    let mut body = Vec::with_capacity(plain.len() + TAG_LEN);
    body.extend_from_slice(plain);
    k.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(aad),
        &mut body,
    )
    .map_err(|_| VaultError::Store("AES-GCM encryption failed".into()))?;
    let mut out = Vec::with_capacity(NONCE_LEN + body.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&body);
    Ok(out)
}

/// Opens nonce ‖ ciphertext ‖ tag; `None` when the tag does not verify.
fn aead_open(key: &[u8; 32], aad: &[u8], sealed: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    if sealed.len() < NONCE_LEN + TAG_LEN {
        return None;
    }
    let k = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).ok()?);
    let nonce = Nonce::try_assume_unique_for_key(&sealed[..NONCE_LEN]).ok()?;
    let mut body = Zeroizing::new(sealed[NONCE_LEN..].to_vec());
    let n = k
        .open_in_place(nonce, Aad::from(aad), &mut body)
        .ok()?
        .len();
    body.truncate(n);
    Some(body)
}

fn b64(b: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(b)
}

fn unb64(s: &str, what: &str) -> Result<Vec<u8>, VaultError> {
    URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| VaultError::Store(format!("{what} is damaged (not base64url)")))
}

impl MasterKey {
    fn generate(id: String) -> Result<MasterKey, VaultError> {
        let mut key = Secret::<[u8; 32]>::zeroed();
        getrandom::getrandom(&mut key[..]).map_err(no_random)?;
        Ok(MasterKey { id, key })
    }

    pub(crate) fn from_bytes(id: &str, bytes: &[u8]) -> Option<MasterKey> {
        let mut key = Secret::<[u8; 32]>::zeroed();
        if bytes.len() != 32 {
            return None;
        }
        key.copy_from_slice(bytes);
        Some(MasterKey {
            id: id.to_string(),
            key,
        })
    }

    /// The seal id this key belongs to.
    pub fn id(&self) -> &str {
        &self.id
    }

    pub(crate) fn bytes(&self) -> &[u8; 32] {
        &self.key
    }

    fn blob_key(&self) -> Zeroizing<[u8; 32]> {
        let hk = hkdf::Hkdf::<sha2::Sha256>::new(None, &self.key[..]);
        let mut out = Zeroizing::new([0u8; 32]);
        // 32 bytes is always a valid HKDF-SHA256 output length.
        let _ = hk.expand(BLOB_INFO, &mut out[..]);
        out
    }

    fn check_value(&self) -> Result<String, VaultError> {
        Ok(b64(&aead_seal(
            &self.key,
            format!("{CHECK_AAD}\0{}", self.id).as_bytes(),
            b"",
        )?))
    }

    pub(crate) fn verify(&self, rec: &SealRecord) -> bool {
        rec.id == self.id
            && unb64(&rec.check, "check")
                .ok()
                .and_then(|c| {
                    aead_open(&self.key, format!("{CHECK_AAD}\0{}", rec.id).as_bytes(), &c)
                })
                .is_some()
    }

    /// Seals `plain` as a blob of `role` named `name` (see the module docs).
    pub fn seal_blob(
        &self,
        role: SealRole,
        name: &str,
        plain: &[u8],
    ) -> Result<Vec<u8>, VaultError> {
        let data = aead_seal(&self.blob_key(), &blob_aad(&self.id, role, name), plain)?;
        let env = Envelope {
            cmkfs_sealed: 1,
            vault: self.id.clone(),
            role: role.as_str().into(),
            name: name.into(),
            alg: "A256GCM".into(),
            data: b64(&data),
        };
        let mut out = serde_json::to_vec(&env).map_err(|e| VaultError::Store(e.to_string()))?;
        out.push(b'\n');
        Ok(out)
    }

    /// Opens a blob that must be of `role` and, when `name` is given, carry that name.
    pub fn open_blob(
        &self,
        env: &Envelope,
        role: SealRole,
        name: Option<&str>,
        what: &str,
    ) -> Result<Zeroizing<Vec<u8>>, VaultError> {
        if env.vault != self.id {
            return Err(VaultError::Store(format!(
                "{what} is sealed by another vault (seal {}, this vault's is {})",
                env.vault, self.id
            )));
        }
        if env.role != role.as_str() || name.is_some_and(|n| n != env.name) || env.alg != "A256GCM"
        {
            return Err(VaultError::Store(format!(
                "{what} holds a sealed {} named {:?}, not the expected {}: it was moved or replaced",
                env.role,
                env.name,
                role.as_str()
            )));
        }
        let data = unb64(&env.data, what)?;
        aead_open(
            &self.blob_key(),
            &blob_aad(&env.vault, role, &env.name),
            &data,
        )
        .ok_or_else(|| {
            VaultError::Store(format!(
                "{what} does not open under the vault master key (damaged or tampered with)"
            ))
        })
    }
}

fn blob_aad(id: &str, role: SealRole, name: &str) -> Vec<u8> {
    format!("{BLOB_AAD}\0{id}\0{}\0{name}", role.as_str()).into_bytes()
}

/// The JSON envelope of a sealed file.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    cmkfs_sealed: u32,
    /// Seal id of the vault whose master key sealed it.
    pub vault: String,
    /// [`SealRole::as_str`].
    pub role: String,
    /// What it is (key/version, file name).
    pub name: String,
    alg: String,
    data: String,
}

impl Envelope {
    /// The envelope in `bytes`, if they are a sealed blob (`None` for anything else, such as a
    /// clear PKCS#8 file of a store sealed before this file was).
    pub fn parse(bytes: &[u8]) -> Option<Envelope> {
        let first = bytes.iter().find(|b| !b.is_ascii_whitespace())?;
        if *first != b'{' {
            return None;
        }
        serde_json::from_slice::<Envelope>(bytes)
            .ok()
            .filter(|e| e.cmkfs_sealed == 1)
    }
}

/// The seal record of a store; `None` for a store that was never sealed (legacy).
pub(crate) fn read_record(store: &Path) -> Result<Option<SealRecord>, VaultError> {
    let path = store.join(SEAL_FILE);
    match fs::read(&path) {
        Ok(b) => {
            let rec: SealRecord = serde_json::from_slice(&b)
                .map_err(|e| VaultError::Store(format!("{} is damaged: {e}", path.display())))?;
            if rec.format > FORMAT {
                return Err(VaultError::Store(format!(
                    "{} has format {} (this cmkfs reads {FORMAT}): upgrade cmkfs",
                    path.display(),
                    rec.format
                )));
            }
            // Its numbers decide how much memory and time an unseal takes: bounded before
            // anything is derived (an edited file must not exhaust memory or hang us).
            rec.kdf.params.check().map_err(|why| {
                VaultError::Store(format!(
                    "{} has Argon2id parameters out of bounds ({why}): the file is damaged or \
                     was edited; restore it from a backup",
                    path.display()
                ))
            })?;
            Ok(Some(rec))
        }
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(VaultError::Unavailable(format!(
            "cannot read {}: {e}",
            path.display()
        ))),
    }
}

fn write_record(store: &Path, rec: &SealRecord) -> Result<(), VaultError> {
    let mut v = serde_json::to_vec_pretty(rec).map_err(|e| VaultError::Store(e.to_string()))?;
    v.push(b'\n');
    let path = store.join(SEAL_FILE);
    write_atomic(&path, &v, 0o600)
        .map_err(|e| VaultError::Unavailable(format!("cannot write {}: {e}", path.display())))
}

fn derive(
    passphrase: &[u8],
    salt: &[u8],
    p: &KdfParams,
) -> Result<Zeroizing<[u8; 32]>, VaultError> {
    let mut out = Zeroizing::new([0u8; 32]);
    let argon = p.argon2()?;
    // The memory is ours to allocate, so that too little of it is an error and not an abort.
    let count = argon2::Params::new(p.memory_kib, p.iterations, p.parallelism, Some(32))
        .map_err(|e| VaultError::Invalid(format!("Argon2id parameters: {e}")))?
        .block_count();
    let mut blocks: Vec<argon2::Block> = Vec::new();
    blocks.try_reserve_exact(count).map_err(|_| {
        VaultError::Unavailable(format!(
            "not enough memory for the vault's Argon2id ({p}): free some, or change the \
             passphrase's cost on a bigger machine (`cmkfs vault change-passphrase --kdf ...`)"
        ))
    })?;
    blocks.resize(count, argon2::Block::default());
    let r = argon.hash_password_into_with_memory(passphrase, salt, &mut out[..], &mut blocks);
    // The blocks are derived from the passphrase.
    zeroize::Zeroize::zeroize(&mut blocks);
    r.map_err(|e| VaultError::Invalid(format!("Argon2id: {e}")))?;
    Ok(out)
}

/// Builds a record that wraps `mk` under `passphrase`.
fn wrap_record(
    mk: &MasterKey,
    passphrase: &[u8],
    kdf: KdfParams,
    created: u64,
    complete: bool,
) -> Result<SealRecord, VaultError> {
    if passphrase.is_empty() {
        return Err(VaultError::Invalid(
            "the vault passphrase is empty: choose a non-empty one".into(),
        ));
    }
    let salt = random::<16>()?;
    let pk = derive(passphrase, &salt, &kdf)?;
    let wrapped = aead_seal(
        &pk,
        format!("{MASTER_AAD}\0{}", mk.id).as_bytes(),
        &mk.key[..],
    )?;
    Ok(SealRecord {
        format: FORMAT,
        id: mk.id.clone(),
        created,
        kdf: KdfRecord {
            alg: "argon2id".into(),
            version: 0x13,
            params: kdf,
            salt: b64(&salt),
        },
        wrapped_key: b64(&wrapped),
        check: mk.check_value()?,
        complete,
    })
}

/// Unwraps the master key of `rec` with `passphrase`; `None` for a wrong passphrase.
pub(crate) fn unwrap_record(
    rec: &SealRecord,
    passphrase: &[u8],
) -> Result<Option<MasterKey>, VaultError> {
    if rec.kdf.alg != "argon2id" || rec.kdf.version != 0x13 {
        return Err(VaultError::Store(format!(
            "the vault seal uses {} version {}, which this cmkfs does not know",
            rec.kdf.alg, rec.kdf.version
        )));
    }
    let salt = unb64(&rec.kdf.salt, "seal.json salt")?;
    let wrapped = unb64(&rec.wrapped_key, "seal.json wrappedKey")?;
    let pk = derive(passphrase, &salt, &rec.kdf.params)?;
    let Some(raw) = aead_open(
        &pk,
        format!("{MASTER_AAD}\0{}", rec.id).as_bytes(),
        &wrapped,
    ) else {
        return Ok(None);
    };
    let mk = MasterKey::from_bytes(&rec.id, &raw).ok_or_else(|| {
        VaultError::Store("seal.json holds a master key of the wrong size".into())
    })?;
    Ok(Some(mk))
}

// ---------------------------------------------------------------------------------------------
// The process cache: a master key, once unsealed, stays in this process (the mount daemon and
// the vault server unseal once at start).
// ---------------------------------------------------------------------------------------------

static CACHE: Mutex<Vec<Arc<MasterKey>>> = Mutex::new(Vec::new());

pub(crate) fn cache_get(id: &str) -> Option<Arc<MasterKey>> {
    let c = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    c.iter().find(|k| k.id == id).cloned()
}

pub(crate) fn cache_put(mk: MasterKey) -> Arc<MasterKey> {
    let mut c = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(k) = c.iter().find(|k| k.id == mk.id) {
        return k.clone();
    }
    let k = Arc::new(mk);
    c.push(k.clone());
    k
}

/// Forgets the master keys this process holds (tests of the unseal paths).
#[doc(hidden)]
pub fn forget_process_keys() {
    CACHE.lock().unwrap_or_else(|e| e.into_inner()).clear();
}

// ---------------------------------------------------------------------------------------------
// Getting the master key of a store
// ---------------------------------------------------------------------------------------------

/// The master key of the store at `store`, if it is sealed: from this process, the kernel
/// keyring, or a passphrase (see [`passphrase`]). `None` for a legacy (unsealed) store.
pub fn master_key(store: &Path) -> Result<Option<Arc<MasterKey>>, VaultError> {
    let Some(rec) = read_record(store)? else {
        check_seal_not_lost(store)?;
        return Ok(None);
    };
    master_key_of(store, &rec).map(Some)
}

/// Refuses a store without `seal.json` that holds sealed files: it was sealed and lost its
/// record (deleted by hand, a partial restore), and must not be taken for a legacy store in
/// clear (whose new keys would be written in clear).
pub(crate) fn check_seal_not_lost(store: &Path) -> Result<(), VaultError> {
    if read_record(store)?.is_some() {
        return Ok(());
    }
    match sealed_trace(store) {
        Some(trace) => Err(VaultError::Store(format!(
            "the vault {} has no seal.json, but it was sealed ({} is sealed): without seal.json \
             its keys cannot be opened; restore vault/seal.json from a backup",
            store.display(),
            trace.display()
        ))),
        None => Ok(()),
    }
}

/// A sealed file in a store that has no `seal.json` (it was deleted or lost): the store was
/// sealed and must not be taken for a legacy one. Looks at every KEK version and the TLS keys.
fn sealed_trace(store: &Path) -> Option<PathBuf> {
    let is_sealed = |p: &Path| {
        crate::volume::sys::read_bounded(p, 1 << 20)
            .ok()
            .map(Zeroizing::new)
            .is_some_and(|b| Envelope::parse(&b).is_some())
    };
    let mut candidates = vec![
        store.join("tls").join("key.pem"),
        store.join("tls").join("ca-key.pem"),
    ];
    if let Ok(keys) = fs::read_dir(store.join("keys")) {
        for k in keys.flatten() {
            if let Ok(versions) = fs::read_dir(k.path()) {
                candidates.extend(
                    versions
                        .flatten()
                        .map(|v| v.path())
                        .filter(|p| p.extension().is_some_and(|e| e == "pk8")),
                );
            }
        }
    }
    candidates.sort();
    candidates.into_iter().find(|p| is_sealed(p))
}

pub(crate) fn master_key_of(store: &Path, rec: &SealRecord) -> Result<Arc<MasterKey>, VaultError> {
    if let Some(k) = cache_get(&rec.id) {
        return Ok(k);
    }
    if let Some(k) = keyring_load(&rec.id).filter(|k| k.verify(rec)) {
        return Ok(cache_put(k));
    }
    let what = format!("the vault {}", store.display());
    let p = passphrase(&what)?;
    match unwrap_record(rec, p.value.as_bytes())? {
        Some(k) => Ok(cache_put(k)),
        None => Err(wrong_passphrase(store, &p.origin)),
    }
}

/// The master key from a passphrase only (never the caches): `cmkfs vault unseal` proves the
/// passphrase, it does not just repeat a cached key.
pub fn master_key_from_passphrase(store: &Path) -> Result<Arc<MasterKey>, VaultError> {
    let rec = read_record(store)?.ok_or_else(|| not_sealed(store))?;
    let p = passphrase(&format!("the vault {}", store.display()))?;
    match unwrap_record(&rec, p.value.as_bytes())? {
        Some(k) => Ok(cache_put(k)),
        None => Err(wrong_passphrase(store, &p.origin)),
    }
}

pub(crate) fn not_sealed(store: &Path) -> VaultError {
    VaultError::Invalid(format!(
        "the vault {} is not sealed: seal it with `cmkfs vault seal`",
        store.display()
    ))
}

/// The master key of whichever vault sealed `env`: this process, the kernel keyring, or the
/// home's own store (`home_store`) when the seal ids match.
pub fn master_key_for_blob(
    env: &Envelope,
    home_store: &Path,
    what: &str,
) -> Result<Arc<MasterKey>, VaultError> {
    if let Some(k) = cache_get(&env.vault) {
        return Ok(k);
    }
    match read_record(home_store)? {
        Some(rec) if rec.id == env.vault => master_key_of(home_store, &rec),
        _ => Err(VaultError::Invalid(format!(
            "{what} is sealed by a vault other than {} (seal {}): open it on the host that \
             sealed it, or point $CMKFS_HOME there",
            home_store.display(),
            env.vault
        ))),
    }
}

/// Opens a sealed credential file (`path` is for messages): the key of the vault that
/// sealed it comes from this process, the kernel keyring, or `$CMKFS_HOME/vault`'s seal.
pub fn open_credential(env: &Envelope, path: &Path) -> Result<Zeroizing<Vec<u8>>, VaultError> {
    let what = format!("credential file {}", path.display());
    let home = crate::home::Home::from_env().vault_dir();
    let mk = master_key_for_blob(env, &home, &what)?;
    mk.open_blob(env, SealRole::Credential, None, &what)
}

/// The passphrase of a new store at `store`, asked before anything of it is made (a
/// command without one leaves nothing behind).
pub(crate) fn new_store_passphrase(store: &Path) -> Result<Passphrase, VaultError> {
    new_passphrase(&format!("the new vault {}", store.display()))
}

/// Creates the seal of a new store under `p` ([`new_store_passphrase`]; called while the
/// store is being created).
pub(crate) fn create(store: &Path, now: u64, p: &Passphrase) -> Result<Arc<MasterKey>, VaultError> {
    let mk = MasterKey::generate(hex::encode(random::<16>()?))?;
    let rec = wrap_record(&mk, p.value.as_bytes(), kdf_params()?, now, true)?;
    write_record(store, &rec)?;
    Ok(cache_put(mk))
}

/// Starts or resumes the seal of an existing store: returns the master key and whether the
/// seal record already existed. The caller holds the store lock.
pub(crate) fn begin_seal(
    store: &Path,
    now: u64,
    kdf: KdfParams,
) -> Result<(Arc<MasterKey>, bool), VaultError> {
    if let Some(rec) = read_record(store)? {
        // Resuming (or re-checking a sealed store): the seal's own key.
        return Ok((master_key_of(store, &rec)?, true));
    }
    let p = new_passphrase(&format!("the vault {}", store.display()))?;
    let mk = MasterKey::generate(hex::encode(random::<16>()?))?;
    let rec = wrap_record(&mk, p.value.as_bytes(), kdf, now, false)?;
    write_record(store, &rec)?;
    Ok((cache_put(mk), false))
}

/// Marks the seal complete: from now on clear key files are refused.
pub(crate) fn finish_seal(store: &Path) -> Result<(), VaultError> {
    let mut rec = read_record(store)?.ok_or_else(|| not_sealed(store))?;
    if !rec.complete {
        rec.complete = true;
        write_record(store, &rec)?;
    }
    Ok(())
}

/// Re-wraps the master key under a new passphrase (the old one is asked first). The caller
/// holds the store lock.
pub(crate) fn change_passphrase(
    store: &Path,
    old: &Passphrase,
    new: &Passphrase,
    kdf: KdfParams,
) -> Result<(), VaultError> {
    let rec = read_record(store)?.ok_or_else(|| not_sealed(store))?;
    let mk = unwrap_record(&rec, old.value.as_bytes())?
        .ok_or_else(|| wrong_passphrase(store, &old.origin))?;
    let new_rec = wrap_record(&mk, new.value.as_bytes(), kdf, rec.created, rec.complete)?;
    write_record(store, &new_rec)?;
    cache_put(mk);
    Ok(())
}

/// Replaces a clear file with its sealed form, atomically; then overwrites the old inode's
/// bytes with zeros (best effort: a copy-on-write filesystem or an SSD may keep old blocks).
/// Returns whether the file was changed.
pub(crate) fn seal_file_in_place(
    mk: &MasterKey,
    path: &Path,
    role: SealRole,
    name: &str,
) -> Result<bool, VaultError> {
    let io =
        |e: std::io::Error| VaultError::Unavailable(format!("cannot seal {}: {e}", path.display()));
    let clear = Zeroizing::new(match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io(e)),
    });
    if Envelope::parse(&clear).is_some() {
        return Ok(false);
    }
    let sealed = mk.seal_blob(role, name, &clear)?;
    let old = fs::OpenOptions::new().write(true).open(path).map_err(io)?;
    write_atomic(path, &sealed, 0o600).map_err(io)?;
    scrub(old, clear.len());
    Ok(true)
}

/// Overwrites an (unlinked) file's bytes with zeros and syncs it.
pub(crate) fn scrub(mut f: fs::File, len: usize) {
    let zeros = vec![0u8; len];
    let _ = f.write_all(&zeros).and_then(|()| f.sync_all());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_round_trip_and_binding() {
        let mk = MasterKey::generate("00".repeat(16)).unwrap();
        let b = mk
            .seal_blob(SealRole::KekPrivateKey, "k/v1", b"secret")
            .unwrap();
        let env = Envelope::parse(&b).unwrap();
        assert_eq!(
            &mk.open_blob(&env, SealRole::KekPrivateKey, Some("k/v1"), "x")
                .unwrap()[..],
            b"secret"
        );
        // Another name or role: refused before decryption; a forged name fails the tag.
        assert!(mk
            .open_blob(&env, SealRole::KekPrivateKey, Some("k/v2"), "x")
            .is_err());
        assert!(mk.open_blob(&env, SealRole::TlsKey, None, "x").is_err());
        let mut forged = env.clone();
        forged.name = "k/v2".into();
        assert!(mk
            .open_blob(&forged, SealRole::KekPrivateKey, Some("k/v2"), "x")
            .is_err());
        let other = MasterKey::generate("00".repeat(16)).unwrap();
        assert!(other
            .open_blob(&env, SealRole::KekPrivateKey, None, "x")
            .is_err());
        assert!(Envelope::parse(b"0\x82\x04").is_none());
    }

    #[test]
    fn record_wraps_under_the_passphrase_only() {
        let mk = MasterKey::generate("ab".repeat(16)).unwrap();
        let rec = wrap_record(&mk, b"pass", KdfParams::TEST, 1, true).unwrap();
        let back = unwrap_record(&rec, b"pass").unwrap().unwrap();
        assert_eq!(&back.key[..], &mk.key[..]);
        assert!(unwrap_record(&rec, b"wrong").unwrap().is_none());
        assert!(mk.verify(&rec));
        assert!(!MasterKey::generate("ab".repeat(16)).unwrap().verify(&rec));
        assert!(wrap_record(&mk, b"", KdfParams::TEST, 1, true).is_err());
    }

    #[test]
    fn kdf_params_parse() {
        assert_eq!(KdfParams::parse("test").unwrap(), KdfParams::TEST);
        assert_eq!(
            KdfParams::parse("m=1024,t=2,p=1").unwrap(),
            KdfParams {
                memory_kib: 1024,
                iterations: 2,
                parallelism: 1
            }
        );
        assert!(KdfParams::parse("m=1,t=1,p=1").is_err());
        assert!(KdfParams::parse("x=1").is_err());
    }
}
