//! `cmkfs des create`, `show`, `list`, `delete`, and the state of a set's volumes.

use super::*;

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
