//! Auto-rotation to the key's newest version around a mount's key checks, and the one-shot
//! unwrap of a volume's keys as a mount does it.

use super::*;

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
