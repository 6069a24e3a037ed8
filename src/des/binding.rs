//! Binding volumes to a set: `cmkfs init --des` and the checks a mount makes of a volume's
//! header against this machine's set records.

use super::*;

/// `cmkfs init CIPHERDIR --des NAME`: creates a volume of on-disk `layout` wrapped with the DES's active key, as
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
    layout: crate::volume::layout::Layout,
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
        layout,
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
                "the volume at {} belongs to Disk Encryption Set {}, but its header names {}: \
                 the header was changed",
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
                "the volume header names key {}, which Disk Encryption Set {} does not list \
                 (active: {}): an old or foreign header was put in place",
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
