//! The Disk Encryption Set record (`$CMKFS_HOME/des/<name>.json`: encryption type, key
//! references, identity, rotation state, bound volumes) and its store: atomic saves under
//! the exclusive `flock` on `des/.lock`.

use super::*;

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

    pub(super) fn identity_name(&self) -> &str {
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

pub(super) fn check_des_name(name: &str) -> Result<(), DesError> {
    if valid_des_name(name) {
        Ok(())
    } else {
        Err(DesError::InvalidName(name.to_string()))
    }
}

pub(super) fn now_rfc3339() -> String {
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
