//! `cmkfs restore`: verify first, write nothing that is not verified, rename at the end.
//!
//! 1. The target must be absent or an empty directory, the Disk Encryption Set usable.
//! 2. For every archive of the chain (a full archive, then its incremental archives, oldest
//!    first): the seals are read ([`super::chain`]), the key envelope is unwrapped through
//!    the backup key's vault with the caller's rights (a disabled, deleted or forbidden key
//!    refuses here, with the vault's reason), the manifest MAC verified under the DEK; then
//!    the chain is checked (each incremental names its base by the SHA-256 of its
//!    manifest). With `--new-dek`, an archive whose quarantine holds entries is refused
//!    (from the last manifest; see `quarantine_names`). All this before anything is
//!    written; then temp directories of killed restores into the target are removed (a
//!    running one refuses).
//! 3. Each archive is applied into a fresh `.<target>.cmkfs-restore.<random>` beside the
//!    target (held under the volume lock while in use), in manifest order: stored members
//!    are extracted (nothing followed: every entry is created relative to its parent's
//!    descriptor, names are single components, a hard link only repeats an earlier file),
//!    references to the previous state take its files over (moved, not copied), and each
//!    entry's digest must equal the manifest's as soon as it is made. The previous temp
//!    directory then goes. Any failure removes every temp directory.
//! 4. Directory metadata, then the header (the DEK wrapped by the set's key); with
//!    `--new-dek` the tree is re-encrypted under a fresh DEK (the offline re-encryption);
//!    then, under the set's lock, the volume is listed in the set and renamed into place.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use super::chain::{check_chain, read_sealed, Link};
use super::extract::{apply, finish_dirs, State, Tree};
use super::manifest::{Manifest, Totals};
use super::renumber::{self, Renumbered};
use super::{BackupError, Progress};
use crate::crypto::Dek;
use crate::des::{self, DesStore, DiskEncryptionSet};
use crate::home::Home;
use crate::keyring::KeyringConfig;
use crate::vault::{KeyId, Vault};
use crate::volume::header::{PlatformEnvelope, VolumeHeader};
use crate::volume::lock::VolumeLock;
use crate::volume::reencrypt::{Hooks, Report, Session};
use crate::volume::sys;
use crate::volume::Volume;

/// Opens the vault of a backup key, as the caller.
pub type OpenVault<'a> = &'a dyn Fn(&KeyId) -> Result<Box<dyn Vault>, BackupError>;

/// What to restore, where, under which set.
pub struct RestoreRequest<'a> {
    /// The cmkfs home (Disk Encryption Sets, platform key).
    pub home: &'a Home,
    /// The archives: a full backup, then its incremental archives in the order they were
    /// taken (the last one is the state restored).
    pub archives: &'a [PathBuf],
    /// The backing directory to create (absent, or an empty directory).
    pub target: &'a Path,
    /// The Disk Encryption Set the restored volume belongs to.
    pub des: &'a str,
    /// Re-encrypt everything under a fresh DEK.
    pub new_dek: bool,
    /// With `new_dek`: leave the archive's `cmkfs.quarantine/` out (it cannot be
    /// re-encrypted: see `volume::reencrypt`); without it, an archive whose quarantine holds
    /// anything is refused.
    pub discard_quarantine: bool,
    /// Recreate the archive's device nodes; without it an archive holding one is refused
    /// (docs/FORMAT.md, restore step 4).
    pub allow_devices: bool,
    /// How to reach the backup key's vault.
    pub open_vault: OpenVault<'a>,
}

/// What a restore did.
#[derive(Clone, Debug, Serialize)]
pub struct RestoreReport {
    /// The restored backing directory.
    pub target: PathBuf,
    /// The volume's id: the source's for a plain restore, a new one with `--new-dek` or when
    /// the source is still live here (`source_live_at`).
    pub volume_id: String,
    /// A plain restore whose source volume (same id, same DEK) is live on this machine, at
    /// this path: the restored copy got a new volume id.
    pub source_live_at: Option<PathBuf>,
    /// The Disk Encryption Set it belongs to.
    pub des: String,
    /// The key that wraps its DEK now.
    pub key_id: String,
    /// The key that wrapped the DEK in the archive.
    pub backup_key_id: String,
    /// When the backup was taken (Unix seconds) and whether writes were frozen for it.
    pub backup_created: u64,
    /// See [`Manifest::point_in_time`] (of every archive of the chain).
    pub backup_point_in_time: bool,
    /// The archives restored, oldest first.
    pub archives: Vec<PathBuf>,
    /// Entries restored.
    pub members: u64,
    /// What they are.
    pub totals: Totals,
    /// Owners that could not be set (not running as root); 0 as root.
    pub owners_skipped: u64,
    /// The re-encryption under a new DEK, with `--new-dek`.
    pub new_dek: Option<Report>,
    /// With `--new-dek`: the fresh directory ids, file ids and long-target names given.
    pub new_ids: Option<Renumbered>,
    /// Size of the archives.
    pub archive_bytes: u64,
    /// Temp directories of killed restores into the target, removed first.
    pub cleaned_up: Vec<PathBuf>,
    /// With `--new-dek --discard-quarantine`: entries of the archive's quarantine left out.
    pub quarantine_left_out: u64,
    /// Time taken.
    pub seconds: f64,
}

/// Checks the target: absent, or an empty directory.
fn check_target(target: &Path) -> Result<(), BackupError> {
    match std::fs::symlink_metadata(target) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(BackupError::io(&target.display().to_string(), e)),
        Ok(md) if md.is_dir() => {
            let empty = std::fs::read_dir(target)
                .map_err(|e| BackupError::io(&target.display().to_string(), e))?
                .next()
                .is_none();
            if empty {
                Ok(())
            } else {
                Err(BackupError::Refused(format!(
                    "{} is not empty: restore into a new or empty directory",
                    target.display()
                )))
            }
        }
        Ok(_) => Err(BackupError::Refused(format!(
            "{} exists and is not a directory",
            target.display()
        ))),
    }
}

/// Restores an archive, or a chain of a full archive and its incremental archives (module
/// docs).
pub fn restore(
    req: &RestoreRequest<'_>,
    mut progress: Option<&mut dyn FnMut(&Progress)>,
) -> Result<RestoreReport, BackupError> {
    let started = Instant::now();
    let target = std::path::absolute(req.target)
        .map_err(|e| BackupError::io(&req.target.display().to_string(), e))?;
    check_target(&target)?;
    let tname = target
        .file_name()
        .ok_or_else(|| {
            BackupError::Refused(format!("{} is not a directory name", target.display()))
        })?
        .to_string_lossy()
        .into_owned();
    let parent = target.parent().unwrap_or(Path::new("/")).to_path_buf();
    let store = DesStore::new(req.home);
    let des_rec = store.load(req.des)?;
    // The set's key must be usable before anything is unpacked.
    let des_vault = des::open_vault(req.home, &des_rec)?;
    let dkid = des_rec.active_key_id()?;
    des_vault.get_key(&dkid.name, Some(&dkid.version))?;

    // 1. Every archive's seals, key and MAC, and the chain, before anything is written.
    let mut links: Vec<Link> = Vec::with_capacity(req.archives.len());
    for path in req.archives {
        let sealed = read_sealed(path).map_err(|e| in_archive(path, req.archives.len(), e))?;
        let kid = sealed.envelope.kid()?;
        let vault = (req.open_vault)(&kid)?;
        let (dek, inner) = sealed.envelope.unwrap(vault.as_ref())?;
        drop(vault);
        if inner.is_some() != des_rec.encryption_type.is_double() {
            return Err(BackupError::Refused(format!(
                "the archive holds a {} volume, but Disk Encryption Set {} is {}: choose a set \
                 of the same encryption type",
                if inner.is_some() {
                    "double-encrypted"
                } else {
                    "single-encryption"
                },
                des_rec.name,
                des_rec.encryption_type.as_str()
            )));
        }
        let manifest = sealed
            .open(&dek, inner.is_some())
            .map_err(|e| in_archive(path, req.archives.len(), e))?;
        links.push(Link {
            sealed,
            manifest,
            dek,
            inner,
        });
    }
    check_chain(&links)?;
    if req.new_dek && !req.discard_quarantine {
        // Known from the manifest: refused before anything is written (the check on the
        // extracted tree below stays, as a backstop).
        if quarantine_names(&links[links.len() - 1].manifest) > 0 {
            return Err(quarantine_refusal("entries"));
        }
    }
    // Only now that everything is verified: temp directories of killed restores go.
    let cleaned_up = clean_leftovers(&target)?;
    let archive_bytes: u64 = links.iter().map(|l| l.sealed.size).sum();

    // 2. Each archive applied in turn into a temp directory of its own beside the target.
    let mut temps: Vec<PathBuf> = Vec::new();
    let result = (|| {
        let mut prog = Progress {
            bytes_total: archive_bytes,
            ..Progress::default()
        };
        let mut prev: Option<(Tree, State, VolumeLock)> = None;
        let mut dirs = Vec::new();
        for (i, link) in links.iter().enumerate() {
            let tmp = parent.join(super::leftovers::temp_name(&tname));
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&tmp)
                .map_err(|e| BackupError::io(&tmp.display().to_string(), e))?;
            temps.push(tmp.clone());
            // Held while the restore works in it: a later restore or fsck tells a running
            // restore from a killed one by it.
            let lock =
                VolumeLock::exclusive(&tmp).map_err(|e| BackupError::Refused(e.to_string()))?;
            let mut tree = Tree::new(&tmp)?;
            tree.allow_devices = req.allow_devices;
            let done_before = prog.bytes_done;
            let (state, d) = apply(
                &mut tree,
                prev.as_ref().map(|(t, s, _)| (t, s)),
                link,
                &mut |bytes, members| {
                    prog.bytes_done = done_before + bytes;
                    prog.members_done = members;
                    if let Some(p) = progress.as_mut() {
                        p(&prog);
                    }
                },
            )
            .map_err(|e| in_archive(&link.sealed.path, links.len(), e))?;
            prog.bytes_done = done_before + link.sealed.size;
            dirs = d;
            if let Some((_, _, old_lock)) = prev.take() {
                let old = &temps[i - 1];
                std::fs::remove_dir_all(old)
                    .map_err(|e| BackupError::io(&old.display().to_string(), e))?;
                drop(old_lock);
            }
            prev = Some((tree, state, lock));
        }
        let Some((mut tree, state, lock)) = prev else {
            return Err(BackupError::Internal("no archive applied".into()));
        };
        let tmp = temps.last().cloned().unwrap_or_default();
        let quarantine_left_out = match req.new_dek {
            true => quarantine(&tmp, req.discard_quarantine)?,
            false => 0,
        };
        if quarantine_left_out > 0 {
            // Its directories are gone: no metadata to set on them.
            let q = crate::fsck::QUARANTINE_DIR;
            dirs.retain(|m| m.path != q && !m.path.starts_with(&format!("{q}/")));
        }
        let first = &links[0];
        let last = &links[links.len() - 1];
        // 3. The header under the set's key (written before the directories' times are set,
        // the root's included), the new DEK, the set's record, the rename.
        let src = &last.manifest.source;
        // A plain restore is the source volume again (its id: its backups' chain goes on),
        // unless the source is still live here: two volumes, one id, would be mistaken for
        // each other (a backup chain continued across both), so the copy gets its own id.
        // A `--new-dek` restore is an independent volume: a new id, created now.
        let twin = if req.new_dek {
            None
        } else {
            live_twin(req.home, &src.volume_id, &target)
        };
        let ident = if req.new_dek || twin.is_some() {
            let mut id = [0u8; 16];
            getrandom::getrandom(&mut id).map_err(|e| BackupError::Internal(e.to_string()))?;
            let created = if req.new_dek {
                super::now()
            } else {
                src.created
            };
            (hex::encode(id), created)
        } else {
            (src.volume_id.clone(), src.created)
        };
        let header = header_for(
            req.home,
            &des_rec,
            des_vault.as_ref(),
            &last.manifest,
            &first.dek,
            first.inner.as_ref(),
            ident,
        )?;
        header.write(&tmp)?;
        finish_dirs(&mut tree, &dirs)?;
        let owners_skipped = tree.owners_skipped;
        drop(tree);
        let (new_dek, new_ids) = if req.new_dek {
            let keys = renumber::Keys {
                dek: &first.dek,
                inner: first.inner.as_ref(),
                sector: last.manifest.source.sector_size,
                generation: last.manifest.source.key_generation,
                layout: header.layout().ok_or_else(|| {
                    BackupError::Internal("a restored header without a data layout".into())
                })?,
            };
            let (r, ids) = reencrypt(req.home, &des_rec, &tmp, &keys)?;
            (Some(r), Some(ids))
        } else {
            (None, None)
        };
        rustix::fs::syncfs(File::open(&tmp).map_err(|e| BackupError::io("", e))?)
            .map_err(|e| BackupError::io("", e.into()))?;
        #[cfg(debug_assertions)]
        test_pause("CMKFS_TEST_RESTORE_PAUSE");
        // A key owner who disabled or revoked the backup key while the restore ran must not
        // find a usable volume published after that: the same unwrap as at the start, for
        // every archive of the chain, right before the rename (as a backup does before it
        // publishes its archive).
        for link in &links {
            let kid = link.sealed.envelope.kid()?;
            let still = (req.open_vault)(&kid)
                .and_then(|v| link.sealed.envelope.unwrap(v.as_ref()).map(drop));
            crate::crypto::secret::scrub_stack();
            if let Err(e) = still {
                return Err(BackupError::Refused(format!(
                    "{e}; the backup key stopped unwrapping the archive's DEK before the \
                     restore ended (disabled or revoked meanwhile?), so nothing was restored; \
                     restore again once the key owner allows it"
                )));
            }
        }
        let key_id = place(req.home, &store, req.des, &tmp, &target)?;
        drop(lock);
        temps.clear();
        Ok(RestoreReport {
            target: target.clone(),
            volume_id: header.volume_id.clone(),
            source_live_at: twin,
            des: req.des.to_string(),
            key_id,
            backup_key_id: last.sealed.envelope.key_id.clone(),
            backup_created: last.manifest.created,
            backup_point_in_time: links.iter().all(|l| l.manifest.point_in_time),
            archives: links.iter().map(|l| l.sealed.path.clone()).collect(),
            members: state.entries.len() as u64,
            totals: last.manifest.totals.clone(),
            owners_skipped,
            new_dek,
            new_ids,
            archive_bytes,
            cleaned_up: cleaned_up.clone(),
            quarantine_left_out,
            seconds: 0.0,
        })
    })();
    match result {
        Ok(mut r) => {
            r.seconds = started.elapsed().as_secs_f64();
            Ok(r)
        }
        Err(e) => {
            for t in &temps {
                let _ = super::leftovers::remove(t);
            }
            Err(e)
        }
    }
}

/// Debug builds only (tests), [`crate::fsutil::test_pause`]: `CMKFS_TEST_RESTORE_PAUSE`:
/// the tree is complete, before the final backup-key check;
/// `CMKFS_TEST_RESTORE_PAUSE_NEW_DEK`: before the `--new-dek` re-encryption.
#[cfg(debug_assertions)]
fn test_pause(var: &str) {
    crate::fsutil::test_pause(var);
}

/// Names the archive an error is about when a chain has several.
fn in_archive(path: &Path, n: usize, e: BackupError) -> BackupError {
    if n < 2 {
        return e;
    }
    let name = path
        .file_name()
        .unwrap_or(path.as_os_str())
        .to_string_lossy();
    match e {
        BackupError::Corrupt(m) => BackupError::Corrupt(format!("{name}: {m}")),
        BackupError::Read(err) => BackupError::Corrupt(format!(
            "{name}: reading failed ({err}): it is truncated or damaged"
        )),
        other => other,
    }
}

/// Removes the temp directories of killed restores into `target`; refuses while another
/// restore into it runs.
fn clean_leftovers(target: &Path) -> Result<Vec<PathBuf>, BackupError> {
    let shown = target.display().to_string();
    let mut out = Vec::new();
    for l in super::leftovers::find(target).map_err(|e| BackupError::io(&shown, e))? {
        let removed = !l.running
            && super::leftovers::remove(&l.path)
                .map_err(|e| BackupError::io(&l.path.display().to_string(), e))?;
        if !removed {
            return Err(BackupError::Refused(format!(
                "another `cmkfs restore` into {shown} is running (it works in {}); wait for it \
                 to finish",
                l.path.display()
            )));
        }
        out.push(l.path);
    }
    Ok(out)
}

/// The restored volume's header: the source's layout and key generation, the DEK wrapped by
/// the set's active key (and the inner one by cmkfs's platform key), bound to the set, with
/// the volume id and creation time `ident`.
#[allow(clippy::too_many_arguments)]
fn header_for(
    home: &Home,
    des_rec: &DiskEncryptionSet,
    v: &dyn Vault,
    man: &Manifest,
    dek: &Dek,
    inner: Option<&Dek>,
    ident: (String, u64),
) -> Result<VolumeHeader, BackupError> {
    let kid = des_rec.active_key_id()?;
    let info = v.get_key(&kid.name, Some(&kid.version))?;
    let wrapped = v.wrap_key(&kid.name, Some(&kid.version), info.wrap_alg, dek.as_bytes())?;
    let s = &man.source;
    let layout = crate::volume::layout::Layout::for_format(s.format_version).ok_or_else(|| {
        BackupError::Refused(format!(
            "the archive holds a volume of on-disk format {}",
            s.format_version
        ))
    })?;
    let (volume_id, created) = ident;
    let mut h = match inner {
        None => VolumeHeader::new(dek, volume_id, s.sector_size, &wrapped, created, layout),
        Some(i) => {
            let (pv, pinfo) = des::ensure_platform_key(home)?;
            let w = pv.wrap_key(des::PLATFORM_KEY, None, pinfo.wrap_alg, i.as_bytes())?;
            VolumeHeader::new_double(
                dek,
                volume_id,
                s.sector_size,
                &wrapped,
                created,
                PlatformEnvelope::new(i, &w),
                layout,
            )
        }
    };
    h.key_generation = s.key_generation;
    // `with_des` recomputes the MAC over every field, the key generation included.
    Ok(h.with_des(Some(des_rec.name.clone()), dek))
}

/// A live volume on this machine whose id is `volume_id` (other than `target`): one a Disk
/// Encryption Set lists, or one mounted now. Unreadable headers are no twin (nothing can
/// confuse them with the restored volume until they read again).
fn live_twin(home: &Home, volume_id: &str, target: &Path) -> Option<PathBuf> {
    let same =
        |p: &Path| p != target && VolumeHeader::read(p).is_ok_and(|h| h.volume_id == volume_id);
    let listed = DesStore::new(home)
        .list()
        .unwrap_or_default()
        .into_iter()
        .flat_map(|d| d.volumes);
    let mounted = crate::mount::RunRecord::all(home)
        .into_iter()
        .filter(|r| r.alive() && r.volume_id == volume_id)
        .map(|r| r.cipherdir);
    listed.chain(mounted).find(|p| same(p))
}

/// Times of every entry of the tree at `dir`, by inode.
fn times_by_inode(dir: &Path) -> Result<HashMap<u64, sys::Times>, BackupError> {
    let root = sys::open_root(dir).map_err(|e| BackupError::io("", e))?;
    let mut out = HashMap::new();
    super::create::walk(&root, &mut |_, _, _, st| {
        out.insert(
            st.st_ino,
            [
                Some(Some((st.st_atime, st.st_atime_nsec as u32))),
                Some(Some((st.st_mtime, st.st_mtime_nsec as u32))),
            ],
        );
        Ok(())
    })?;
    Ok(out)
}

/// `--new-dek`: fresh directory ids, file ids and long-target names ([`renumber`]), then
/// the offline re-encryption of the restored tree (names, targets, xattrs and every data
/// unit under a fresh DEK; the archive's DEK is gone from the header at the end). Both
/// rewrite data in place and rename entries (same inodes), which moves their times: those of
/// files and directories are put back as the archive had them.
fn reencrypt(
    home: &Home,
    des_rec: &DiskEncryptionSet,
    dir: &Path,
    keys: &renumber::Keys<'_>,
) -> Result<(Report, Renumbered), BackupError> {
    let times = times_by_inode(dir)?;
    let ids = renumber::renumber(dir, keys)?;
    #[cfg(debug_assertions)]
    test_pause("CMKFS_TEST_RESTORE_PAUSE_NEW_DEK");
    // The set's key may have changed since the header was written (`cmkfs des update`
    // meanwhile): the temp tree is not listed in the set, so nothing rewrapped it, and the
    // unlock below would take its header for an old one put back.
    let (des_rec, header) = rewrap_to_active(home, &DesStore::new(home), &des_rec.name, dir)?;
    let header = &header;
    // The caller holds the volume lock on `dir` exclusive.
    let report = {
        let v = des::open_vault(home, &des_rec)?;
        let (kr, header, handle) =
            crate::unlock::unlock_with_handle(home, v, dir, header, KeyringConfig::default())?;
        let kr = Arc::new(kr);
        let vol = Volume::open(dir, header, kr.clone(), 0)?;
        let access = crate::unlock::ReencryptAccess::new(home, kr.vault(), handle)?;
        Session::new(
            &vol,
            &access,
            None,
            Hooks {
                progress: None,
                fault: None,
            },
        )
        .run()?
    };
    let root = sys::open_root(dir).map_err(|e| BackupError::io("", e))?;
    // Setting an entry's times does not touch its directory's: any order will do.
    super::create::walk(&root, &mut |parent, name, path, st| {
        // Symlinks are made anew (with their times) and may reuse a freed inode number of
        // another entry: left alone. Files and directories keep their inodes.
        if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
            return Ok(());
        }
        let Some(t) = times.get(&st.st_ino) else {
            return Ok(());
        };
        match name {
            Some(n) => sys::utimens_at(parent, n, t),
            None => sys::utimens_fd(parent, t),
        }
        .map_err(|e| BackupError::io(path, e))
    })?;
    Ok((report, ids))
}

/// [`rewrap_locked`] under the set's lock.
fn rewrap_to_active(
    home: &Home,
    store: &DesStore,
    des_name: &str,
    tmp: &Path,
) -> Result<(DiskEncryptionSet, VolumeHeader), BackupError> {
    let _lock = store.lock()?;
    rewrap_locked(home, store, des_name, tmp)
}

/// The set's record as it is now, and the header of the restore's temp tree `tmp` wrapped by
/// the set's active key: rewrapped (same DEK) and rewritten if the set's key changed since it
/// was written. The caller holds the set's lock.
fn rewrap_locked(
    home: &Home,
    store: &DesStore,
    des_name: &str,
    tmp: &Path,
) -> Result<(DiskEncryptionSet, VolumeHeader), BackupError> {
    let rec = store.load(des_name)?;
    let mut header = VolumeHeader::read(tmp)?;
    if header.key_id != rec.active_key.key_url {
        let v = des::open_vault(home, &rec)?;
        let dek = header.unwrap_dek(v.as_ref())?;
        let kid = rec.active_key_id()?;
        let info = v.get_key(&kid.name, Some(&kid.version))?;
        let w = v.wrap_key(&kid.name, Some(&kid.version), info.wrap_alg, dek.as_bytes())?;
        header = header.rewrapped(&w, &dek);
        header.write(tmp)?;
    }
    Ok((rec, header))
}

/// Under the set's lock: the header rewrapped if the set's key changed meanwhile, the target
/// listed in the set, the temp directory renamed into place (over an empty directory, or
/// where nothing is). Returns the key id of the header.
fn place(
    home: &Home,
    store: &DesStore,
    des_name: &str,
    tmp: &Path,
    target: &Path,
) -> Result<String, BackupError> {
    let _lock = store.lock()?;
    let (mut rec, header) = rewrap_locked(home, store, des_name, tmp)?;
    let listed = rec.volumes.iter().any(|p| p == target);
    if !listed {
        rec.volumes.push(target.to_path_buf());
        store.save(&rec)?;
    }
    let exists = target.symlink_metadata().is_ok();
    let r = if exists {
        std::fs::rename(tmp, target)
    } else {
        rustix::fs::renameat_with(
            rustix::fs::CWD,
            tmp,
            rustix::fs::CWD,
            target,
            rustix::fs::RenameFlags::NOREPLACE,
        )
        .map_err(io::Error::from)
    };
    if let Err(e) = r {
        if !listed {
            rec.volumes.retain(|p| p != target);
            let _ = store.save(&rec);
        }
        return Err(BackupError::io(&target.display().to_string(), e));
    }
    if let Some(p) = target.parent() {
        if let Ok(d) = File::open(p) {
            let _ = d.sync_all();
        }
    }
    Ok(header.key_id)
}

/// The refusal of `--new-dek` while the archive's quarantine holds `what` (a count).
fn quarantine_refusal(what: &str) -> BackupError {
    let q = crate::fsck::QUARANTINE_DIR;
    BackupError::Refused(format!(
        "the archive's {q}/ holds {what} set aside by `cmkfs fsck --repair`, which cannot be \
         re-encrypted under a new DEK: restore without --new-dek to look at them (listed in \
         {q}/*/{m} of the restored volume), or add --discard-quarantine to leave them out; \
         nothing was restored",
        m = crate::fsck::MANIFEST_FILE,
    ))
}

/// Names in the quarantine of the state `manifest` describes that hold something fsck set
/// aside: anything below a batch directory (`cmkfs.quarantine/<time>/`) but the batch's own
/// report, `cmkfs.fsck.json` (its set-aside extended attributes, `cmkfs.xattrs.json`, count).
/// An empty batch directory, or a quarantine that is not a directory, is left to the check
/// on the extracted tree (`quarantine`), which counts exactly as a re-encryption does.
fn quarantine_names(manifest: &Manifest) -> u64 {
    let q = crate::fsck::QUARANTINE_DIR;
    manifest
        .members
        .iter()
        .filter_map(|e| e.path.strip_prefix(q)?.strip_prefix('/'))
        .filter_map(|below| below.split_once('/').map(|(_, rest)| rest))
        .filter(|rest| *rest != crate::fsck::MANIFEST_FILE)
        .count() as u64
}

/// `--new-dek`: the archive's `cmkfs.quarantine/` keeps the names of the source's
/// directories, so it cannot be sealed again; re-encrypted around, it would share ciphertext
/// with the source under a DEK the restored volume no longer has. Refused while it holds
/// anything, unless `discard` (then removed from `dir`, the restore's temp tree); returns
/// how many entries were left out.
fn quarantine(dir: &Path, discard: bool) -> Result<u64, BackupError> {
    let q = crate::fsck::QUARANTINE_DIR;
    let held =
        crate::volume::reencrypt::quarantine_entries(dir).map_err(|e| BackupError::io(q, e))?;
    if held == 0 {
        return Ok(0);
    }
    if !discard {
        return Err(quarantine_refusal(&format!("{held} entries")));
    }
    // Nothing followed: a symlink planted there is removed, not its target.
    let path = dir.join(q);
    match std::fs::symlink_metadata(&path) {
        Ok(md) if md.is_dir() => std::fs::remove_dir_all(&path),
        _ => std::fs::remove_file(&path),
    }
    .map_err(|e| BackupError::io(q, e))?;
    Ok(held)
}
