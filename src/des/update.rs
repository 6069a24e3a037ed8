//! `cmkfs des update`: a new key or version, auto-rotation on or off, identity changes, and
//! finishing an interrupted rotation.

use super::*;

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
