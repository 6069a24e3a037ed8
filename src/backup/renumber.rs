//! Fresh identifiers for a `--new-dek` restore (docs/FORMAT.md, "Backup archive", step 5).
//!
//! A restored tree is byte for byte the source's backing store: every directory id
//! (`.cmkfs.dirid`), every file id (bytes 8..24 of each file header, the XTS tweak base) and
//! every long symlink target's side-file name (`.cmkfs.target.<32 hex>`) is the source's.
//! Re-encrypting under a fresh DEK changes every key and ciphertext block but none of these
//! 16-byte values, so they would link each restored file and directory to its original. This
//! pass, run on the restore's private temp tree before the re-encryption, gives each one a
//! fresh random value:
//!
//! - a directory's entries are renamed to their names sealed with the new directory id (a
//!   long name's side file replaced), then the new id is written;
//! - a file's data units are decrypted with the old tweaks and encrypted with the new file
//!   id's (all-zero blocks, holes, stay zeros and unwritten), then its header is rewritten;
//! - a long target's side file gets a new random name, and the symlinks naming it are
//!   replaced by ones naming the new file (owner, xattrs and times kept).
//!
//! Crash safety is the restore's: all of this happens in the temp directory, which is never
//! renamed into place unless everything succeeded (and is removed otherwise).

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::BackupError;
use crate::crypto::{Dek, VolumeKeys};
use crate::engine::SectorEngine;
use crate::volume::content::{decrypt_with, encrypt_with, Ctx};
use crate::volume::file_check::{self, Expect, FileDefect, Generations};
use crate::volume::layout::{units_end, Layout};
use crate::volume::names::{self, DirId, EntryKind, DIRID_FILE};
use crate::volume::symlink::{long_target_ref, LONG_TARGET_PREFIX};
use crate::volume::sys;

/// Units read, re-tweaked and written at a time.
const CHUNK_UNITS: u64 = 256;
/// Size bound of a long name's side file.
const MAX_SIDE: usize = 8192;

/// What got a fresh identifier.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Renumbered {
    /// Directories (the root included): new directory ids, entries renamed.
    pub dirs: u64,
    /// Files whose data was re-tweaked under a new file id.
    pub files: u64,
    /// Entry names sealed again under their directory's new id.
    pub names: u64,
    /// Long symlink targets whose side file got a new name.
    pub long_targets: u64,
    /// Data bytes re-tweaked (holes excluded).
    pub bytes: u64,
    /// Time taken (seconds).
    pub seconds: f64,
}

/// The keys of the tree as extracted (the archive's DEK and, double-encrypted, its inner
/// DEK) and the layout facts needed to re-tweak its files.
pub(super) struct Keys<'a> {
    /// The archive's (outer) DEK.
    pub dek: &'a Dek,
    /// The archive's inner DEK (double encryption).
    pub inner: Option<&'a Dek>,
    /// Data unit size.
    pub sector: u32,
    /// Key generation of the data (file headers carry its low 16 bits).
    pub generation: u32,
    /// The volume's on-disk layout (where each file's data starts, its header version).
    pub layout: Layout,
}

/// Gives the tree at `dir` fresh directory ids, file ids and long-target side-file names
/// (module docs). The caller holds the tree's volume lock.
pub(super) fn renumber(dir: &Path, k: &Keys<'_>) -> Result<Renumbered, BackupError> {
    let started = std::time::Instant::now();
    let keys = VolumeKeys::from_deks(k.dek, k.inner, k.sector as usize)
        .map_err(|e| BackupError::Internal(e.to_string()))?
        .with_generation(k.generation, None);
    let engine = SectorEngine::new(0).map_err(|e| BackupError::io("", e))?;
    let cx = Ctx {
        keys: &keys,
        engine: &engine,
        sector: u64::from(k.sector),
        layout: k.layout,
    };
    let mut out = Renumbered::default();
    let root = sys::open_root(dir).map_err(|e| BackupError::io("", e))?;
    let targets = rename_long_targets(root.as_fd(), &mut out)?;
    let mut files_done: HashSet<u64> = HashSet::new();
    let mut symlinks_done: HashMap<u64, (OwnedFd, OsString)> = HashMap::new();
    let mut stack: Vec<(OwnedFd, String)> = vec![(root, String::new())];
    while let Some((fd, path)) = stack.pop() {
        let d = fd.as_fd();
        let old_id = read_id(d, &path)?;
        let mut new_id: DirId = [0u8; 16];
        getrandom::getrandom(&mut new_id).map_err(|e| BackupError::Internal(e.to_string()))?;
        for ent in sys::list(d).map_err(|e| BackupError::io(&path, e))? {
            let Some(bname) = rename_entry(&cx, d, &path, &ent.name, &old_id, &new_id)? else {
                continue;
            };
            out.names += 1;
            let sub = join(&path, &bname);
            let st = sys::stat_at(d, &bname).map_err(|e| BackupError::io(&sub, e))?;
            match st.st_mode & libc::S_IFMT {
                libc::S_IFDIR => {
                    let s = sys::open_dir(d, &bname).map_err(|e| BackupError::io(&sub, e))?;
                    stack.push((s, sub));
                }
                libc::S_IFREG if files_done.insert(st.st_ino) => {
                    if let Some(n) = retweak_file(&cx, d, &bname, &sub, k.generation)? {
                        out.files += 1;
                        out.bytes += n;
                    }
                }
                libc::S_IFLNK => {
                    replace_symlink(d, &bname, &sub, &st, &targets, &mut symlinks_done)?;
                }
                _ => {}
            }
        }
        write_id(d, &path, &new_id)?;
        out.dirs += 1;
    }
    out.seconds = started.elapsed().as_secs_f64();
    Ok(out)
}

fn join(path: &str, name: &OsStr) -> String {
    let n = name.to_string_lossy();
    if path.is_empty() {
        n.into_owned()
    } else {
        format!("{path}/{n}")
    }
}

fn read_id(d: BorrowedFd<'_>, path: &str) -> Result<DirId, BackupError> {
    let b = sys::read_small(d, OsStr::new(DIRID_FILE), 16)
        .map_err(|e| BackupError::io(&join(path, OsStr::new(DIRID_FILE)), e))?;
    b.as_slice().try_into().map_err(|_| {
        BackupError::Corrupt(format!(
            "directory {path:?} has a directory id of {} bytes, not 16",
            b.len()
        ))
    })
}

/// Replaces the directory id file (a new inode: its owner and times are the old one's).
fn write_id(d: BorrowedFd<'_>, path: &str, id: &DirId) -> Result<(), BackupError> {
    let name = OsStr::new(DIRID_FILE);
    let shown = join(path, name);
    let st = sys::stat_at(d, name).map_err(|e| BackupError::io(&shown, e))?;
    sys::write_atomic(d, name, id, st.st_mode & 0o7777).map_err(|e| BackupError::io(&shown, e))?;
    // Not root: the owner stays the restoring user's, as for every restored entry.
    let _ = sys::chown_at(d, name, Some(st.st_uid), Some(st.st_gid));
    sys::utimens_at(d, name, &sys::times_of(&st)).map_err(|e| BackupError::io(&shown, e))
}

/// Renames entry `bname` of directory `d` to its name sealed with `new_id`; returns its new
/// backing name, or `None` for what is not an entry of ours (metadata, a name that opens
/// under neither id: left as the source had it).
fn rename_entry(
    cx: &Ctx<'_>,
    d: BorrowedFd<'_>,
    path: &str,
    bname: &OsStr,
    old_id: &DirId,
    new_id: &DirId,
) -> Result<Option<OsString>, BackupError> {
    let kind = names::classify(bname);
    let encoded = match kind {
        EntryKind::Hidden => return Ok(None),
        EntryKind::Encrypted => bname.as_bytes().to_vec(),
        EntryKind::Long => match sys::read_small(d, &names::side_file_of(bname), MAX_SIDE) {
            Ok(full) if names::long_name_matches(bname, &full) => full,
            _ => {
                tracing::warn!(entry = ?bname, "long-name side file missing or wrong; entry left as it is");
                return Ok(None);
            }
        },
    };
    let Ok(plain) = names::decrypt(&cx.keys.names, old_id, &encoded) else {
        tracing::warn!(entry = ?bname, "name does not decrypt; entry left as it is");
        return Ok(None);
    };
    let shown = join(path, bname);
    let b = names::encrypt(&cx.keys.names, new_id, &plain).map_err(|e| {
        BackupError::Internal(format!("{shown}: name cannot be sealed again: {e:?}"))
    })?;
    if let Some(side) = b.side_file() {
        if let names::BackingName::Long { full, .. } = &b {
            let old = sys::stat_at(d, &names::side_file_of(bname))
                .map_err(|e| BackupError::io(&shown, e))?;
            sys::write_new(d, &side, full.as_bytes(), old.st_mode & 0o7777)
                .map_err(|e| BackupError::io(&shown, e))?;
            let _ = sys::chown_at(d, &side, Some(old.st_uid), Some(old.st_gid));
        }
    }
    sys::rename(d, bname, d, b.entry(), libc::RENAME_NOREPLACE)
        .map_err(|e| BackupError::io(&shown, e))?;
    if kind == EntryKind::Long {
        sys::unlink(d, &names::side_file_of(bname)).map_err(|e| BackupError::io(&shown, e))?;
    }
    Ok(Some(b.entry().to_os_string()))
}

/// Re-tweaks the data of file `bname` under a fresh file id; returns the data bytes written
/// (`None` for a file without a header: empty). Its times are put back.
fn retweak_file(
    cx: &Ctx<'_>,
    d: BorrowedFd<'_>,
    bname: &OsStr,
    shown: &str,
    generation: u32,
) -> Result<Option<u64>, BackupError> {
    let io = |e: std::io::Error| BackupError::io(shown, e);
    let (f, st) = sys::open_regular(d, bname, sys::Access::ReadWrite, None).map_err(io)?;
    let len = st.st_size as u64;
    let lay = cx.layout;
    let head = file_check::read_head(&f, len).map_err(io)?;
    let expect = Expect::new(lay, Some(Generations::Current(generation)));
    let old = match file_check::judge(&expect, len, &head) {
        Ok(Some(h)) => h,
        Ok(None) => return Ok(None),
        Err(
            d @ (FileDefect::Truncated { .. }
            | FileDefect::BadMagic
            | FileDefect::UnknownVersion(_)
            | FileDefect::BadLength { .. }),
        ) => return Err(BackupError::Corrupt(format!("backing file {shown:?}: {d}"))),
        Err(d) => {
            return Err(BackupError::Refused(format!(
                "backing file {shown:?} is not a complete format-{} file of key generation \
                 {generation} ({d}: an interrupted upgrade or re-encryption in the source?): \
                 restore without --new-dek, then run `cmkfs volume reencrypt`",
                lay.file_version
            )))
        }
    };
    let size = lay
        .logical_size(len)
        .map_err(|e| BackupError::Corrupt(format!("backing file {shown:?}: {e}")))?;
    let mut new = lay
        .generate_header(generation)
        .map_err(|e| BackupError::Internal(e.to_string()))?;
    new.key_gen = old.key_gen;
    let hdr = lay.data_offset;
    let end = hdr + units_end(size);
    let sector = cx.sector;
    let mut buf = vec![0u8; (CHUNK_UNITS * sector) as usize];
    let mut zero = Vec::new();
    let mut pos = hdr;
    let mut written = 0u64;
    while pos < end {
        // The next stretch of data; holes are neither read nor written.
        let data = match rustix::fs::seek(&f, rustix::fs::SeekFrom::Data(pos)) {
            Ok(o) => o,
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(io(e.into())),
        };
        if data >= end {
            break;
        }
        let hole = match rustix::fs::seek(&f, rustix::fs::SeekFrom::Hole(data)) {
            Ok(o) => o.min(end),
            Err(e) => return Err(io(e.into())),
        };
        // Whole units around [data, hole), a chunk at a time; only bytes inside the stretch
        // are written back (a unit it shares with a hole keeps its hole part a hole).
        let mut unit = (data - hdr) / sector;
        while hdr + unit * sector < hole {
            let from = hdr + unit * sector;
            let to = (from + CHUNK_UNITS * sector).min(end);
            let b = &mut buf[..(to - from) as usize];
            f.read_exact_at(b, from).map_err(io)?;
            zero.clear();
            zero.extend(b.chunks_exact(16).map(|c| c.iter().all(|x| *x == 0)));
            decrypt_with(cx, cx.keys, old.tweak(), unit, b)
                .and_then(|()| encrypt_with(cx, cx.keys, new.tweak(), unit, b))
                .map_err(|e| BackupError::Internal(format!("{shown}: {e}")))?;
            for (c, z) in b.chunks_exact_mut(16).zip(&zero) {
                if *z {
                    c.fill(0);
                }
            }
            let (w0, w1) = (from.max(data), to.min(hole));
            if w1 > w0 {
                f.write_all_at(&b[(w0 - from) as usize..(w1 - from) as usize], w0)
                    .map_err(io)?;
                written += w1 - w0;
            }
            unit += CHUNK_UNITS;
        }
        pos = hole;
    }
    f.write_all_at(&new.encode(), 0).map_err(io)?;
    sys::utimens_fd(f.as_fd(), &sys::times_of(&st)).map_err(io)?;
    Ok(Some(written))
}

/// Gives every long target's side file at the root a new random name; returns the old names
/// with their new ones.
fn rename_long_targets(
    root: BorrowedFd<'_>,
    out: &mut Renumbered,
) -> Result<HashMap<OsString, OsString>, BackupError> {
    let mut map = HashMap::new();
    for ent in sys::list(root).map_err(|e| BackupError::io("", e))? {
        if long_target_ref(ent.name.as_bytes()).is_none() {
            continue;
        }
        let mut rnd = [0u8; 16];
        getrandom::getrandom(&mut rnd).map_err(|e| BackupError::Internal(e.to_string()))?;
        let new = OsString::from(format!("{LONG_TARGET_PREFIX}{}", hex::encode(rnd)));
        sys::rename(root, &ent.name, root, &new, libc::RENAME_NOREPLACE)
            .map_err(|e| BackupError::io(&ent.name.to_string_lossy(), e))?;
        map.insert(ent.name, new);
        out.long_targets += 1;
    }
    Ok(map)
}

/// Replaces symlink `bname` by one naming its long target's renamed side file (a new symlink
/// under a temp name, with the old one's owner, xattrs and times, renamed over it); the
/// other names of a hard-linked symlink link the same new one. Short targets are left alone
/// (the re-encryption seals them again under a fresh nonce).
fn replace_symlink(
    d: BorrowedFd<'_>,
    bname: &OsStr,
    shown: &str,
    st: &rustix::fs::Stat,
    targets: &HashMap<OsString, OsString>,
    done: &mut HashMap<u64, (OwnedFd, OsString)>,
) -> Result<(), BackupError> {
    let io = |e: std::io::Error| BackupError::io(shown, e);
    let stored = sys::readlink(d, bname).map_err(io)?;
    let Some(new) = long_target_ref(&stored).and_then(|r| targets.get(r)) else {
        return Ok(());
    };
    let tmp = sys::temp_name("symlink").map_err(io)?;
    match done.get(&st.st_ino) {
        Some((pd, pn)) => sys::link(pd.as_fd(), pn, d, &tmp).map_err(io)?,
        None => {
            sys::symlink(new.as_bytes(), d, &tmp).map_err(io)?;
            let _ = sys::chown_at(d, &tmp, Some(st.st_uid), Some(st.st_gid));
            let from = sys::XTarget::At(d, bname);
            for n in sys::list_xattr(from).map_err(io)? {
                let v = sys::get_xattr(from, &n).map_err(io)?;
                sys::set_xattr(sys::XTarget::At(d, &tmp), &n, &v, 0).map_err(io)?;
            }
            sys::utimens_at(d, &tmp, &sys::times_of(st)).map_err(io)?;
        }
    }
    if let Err(e) = sys::rename(d, &tmp, d, bname, 0) {
        let _ = sys::unlink(d, &tmp);
        return Err(io(e));
    }
    if st.st_nlink > 1 && !done.contains_key(&st.st_ino) {
        let dup = d.try_clone_to_owned().map_err(io)?;
        done.insert(st.st_ino, (dup, bname.to_os_string()));
    }
    Ok(())
}
