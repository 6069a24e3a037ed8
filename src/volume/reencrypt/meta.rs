//! The names phase of a re-encryption: every name, long-name side file, symlink target (short
//! and long form) and extended attribute is sealed again under the new DEK's name key.
//!
//! Idempotent, so a crash anywhere only means running it again: SIV authenticates, so each
//! stored name, target or attribute opens under exactly one of the two keys, and whatever
//! already opens under the new one is left alone. Each change is one atomic step (a rename
//! of the entry, an atomic replace of a side file, a symlink replaced by rename, an attribute
//! set under its new name before the old one goes, or, for one too large to be held twice,
//! a move recorded in the journal first), so a crash leaves every item readable
//! under one of the keys, and at worst an orphaned side file (`fsck --repair` removes it).
//! A hard-linked symlink gets one new symlink linked under all its names when they are met
//! in one run; a crash between two of its names leaves them as separate symlinks with the
//! same target.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD as B64STD;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine as _;

use std::os::fd::AsFd;

use super::journal::{Journal, Phase, XattrMove};
use super::{ReencryptError, Session, Step};
use crate::crypto::VolumeKeys;
use crate::volume::names::{self, EntryKind};
use crate::volume::symlink::{long_target_ref, LONG_TARGET_PREFIX};
use crate::volume::{sys, xattr, Dir};

/// Size bound of a long name's side file and of a long target's side file.
const MAX_SIDE: usize = 8192;

/// A symlink the names phase replaced by a new one (a symlink's target cannot be rewritten in
/// place), for a live mount.
#[derive(Debug)]
pub struct ReplacedSymlink {
    /// Backing inode number of the old symlink.
    pub old: u64,
    /// Backing inode number of the new one.
    pub new: u64,
    /// An `O_PATH` descriptor of the old inode (gone from the tree): while it is open the
    /// backing filesystem cannot give its number to another object, so a mount can keep
    /// showing the symlink under it (`st_ino` unchanged across the run).
    pub hold: std::os::fd::OwnedFd,
}

/// What the names phase changed.
#[derive(Debug, Default)]
pub struct MetaCounts {
    /// Entries renamed.
    pub names: u64,
    /// Symlink targets sealed again.
    pub targets: u64,
    /// Extended attributes sealed again.
    pub xattrs: u64,
    /// Online: the symlinks replaced (each old inode once).
    pub replaced: Vec<ReplacedSymlink>,
}

/// The directory ids of every directory met, by backing inode: the fs layer recomputes its
/// cached backing names with them.
pub type DirIds = HashMap<u64, names::DirId>;

/// Runs the names phase over the whole tree.
pub(super) fn run(
    s: &mut Session<'_>,
    new: &VolumeKeys,
    old: &VolumeKeys,
    counts: &mut MetaCounts,
) -> Result<DirIds, ReencryptError> {
    let root = s.vol.root_dir().clone();
    let mut ids = DirIds::new();
    let mut links: HashMap<u64, (Arc<Dir>, OsString)> = HashMap::new();
    // Renames inside a directory move its mtime: each directory gets its times back once
    // its entries are done (nothing else changes it meanwhile: offline the volume is locked,
    // online no request runs), so a re-encrypted tree looks untouched to `stat`.
    // The root's: those from before the run began (see `Session::root_times`).
    let root_times = match s.root_times {
        Some([a, m]) => Some([Some(Some(a)), Some(Some(m))]),
        None => sys::fstat(root.fd()).map(|st| sys::times_of(&st)).ok(),
    };
    // Long targets' side files live at the root.
    for ent in sys::list(root.fd()).map_err(ReencryptError::os)? {
        if ent
            .name
            .as_bytes()
            .starts_with(LONG_TARGET_PREFIX.as_bytes())
            && long_target_ref(ent.name.as_bytes()).is_some()
        {
            reseal_long_target(s, &root, &ent.name, new, old, counts)?;
        }
    }
    let root_ino = root.ino();
    let mut stack = vec![(root, Vec::new())];
    while let Some((dir, path)) = stack.pop() {
        let times = match dir.ino() == root_ino {
            true => root_times,
            false => sys::fstat(dir.fd()).map(|st| sys::times_of(&st)).ok(),
        };
        ids.insert(dir.ino(), *dir.id());
        let here = Loc {
            path: path.clone(),
            ino: dir.ino(),
        };
        convert_xattrs(s, sys::XTarget::Fd(dir.fd()), Some(&here), new, old, counts)?;
        let listed = sys::list(dir.fd()).map_err(ReencryptError::os)?;
        remove_leftovers(&dir, &listed);
        for ent in listed {
            let Some(bname) = convert_name(s, &dir, &ent.name, new, old, counts)? else {
                continue;
            };
            let st = match sys::stat_at(dir.fd(), &bname) {
                Ok(st) => st,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                Err(e) => return Err(ReencryptError::os(e)),
            };
            let mut sub_path = path.clone();
            sub_path.push(bname.clone());
            match st.st_mode & libc::S_IFMT {
                libc::S_IFDIR => match s.vol.open_dir(&dir, &bname, Some(st.st_ino)) {
                    Ok(sub) => stack.push((Arc::new(sub), sub_path)),
                    // Damaged after the run's check (or met by a mount's recovery): the rest
                    // is converted, and the run stops before the old DEK can go (see
                    // `Session::run`), so a damaged directory never makes the volume
                    // unmountable.
                    Err(e) => {
                        let at = super::preflight::show(&sub_path);
                        tracing::warn!(directory = %at, error = %e, "directory skipped by the names phase");
                        s.damaged.push(format!("{at}: {e}"));
                    }
                },
                libc::S_IFLNK => {
                    let name =
                        convert_symlink(s, &dir, &path, &bname, &st, new, old, counts, &mut links)?;
                    let ino = sys::stat_at(dir.fd(), &name).map_or(st.st_ino, |st| st.st_ino);
                    let at = Loc {
                        path: sub_path,
                        ino,
                    };
                    let t = sys::XTarget::At(dir.fd(), &name);
                    convert_xattrs(s, t, Some(&at), new, old, counts)?;
                }
                _ => {
                    let at = Loc {
                        path: sub_path,
                        ino: st.st_ino,
                    };
                    let t = sys::XTarget::At(dir.fd(), &bname);
                    convert_xattrs(s, t, Some(&at), new, old, counts)?;
                }
            }
        }
        if let Some(t) = times {
            let _ = sys::utimens_fd(dir.fd(), &t);
        }
    }
    Ok(ids)
}

/// Re-seals the extended attributes of files a mount holds open (those with no name left
/// are reached only so; the others again, harmlessly: already converted ones are skipped).
pub(super) fn convert_open_xattrs(
    s: &mut Session<'_>,
    files: &[Arc<crate::volume::OpenFile>],
    new: &VolumeKeys,
    old: &VolumeKeys,
    counts: &mut MetaCounts,
) -> Result<(), ReencryptError> {
    for of in files {
        let fd = std::os::fd::AsFd::as_fd(of.file());
        // No name to record: a crash takes such a file with it anyway.
        convert_xattrs(s, sys::XTarget::Fd(fd), None, new, old, counts)?;
    }
    Ok(())
}

/// Removes what an interrupted run of this phase leaves in `dir` (nothing runs beside it:
/// the gates are closed): new symlinks never renamed into place, temp files of side-file
/// writes, and long-name side files whose entry is gone (the old side file of a renamed
/// entry). All are garbage by construction (`fsck --repair` removes them too).
fn remove_leftovers(dir: &Dir, listed: &[sys::RawEntry]) {
    let names: std::collections::HashSet<&OsStr> =
        listed.iter().map(|e| e.name.as_os_str()).collect();
    let t = crate::fsutil::TEMP_PREFIX;
    let tmp_symlink = format!("{t}symlink.");
    let tmp_sides = [
        format!("{t}{}", names::LONG_PREFIX),
        format!("{t}{LONG_TARGET_PREFIX}"),
    ];
    for e in listed {
        let b = e.name.as_bytes();
        let orphan_side = b.starts_with(names::LONG_PREFIX.as_bytes())
            && b.ends_with(names::LONG_SUFFIX.as_bytes())
            && !names.contains(OsStr::from_bytes(&b[..b.len() - names::LONG_SUFFIX.len()]));
        let tmp_link = b.starts_with(tmp_symlink.as_bytes())
            && sys::stat_at(dir.fd(), &e.name)
                .is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFLNK);
        let tmp_side = tmp_sides.iter().any(|p| b.starts_with(p.as_bytes()))
            && sys::stat_at(dir.fd(), &e.name)
                .is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFREG);
        if orphan_side || tmp_link || tmp_side {
            let _ = sys::unlink(dir.fd(), &e.name);
        }
    }
}

/// Re-encrypts the name of entry `bname` of `dir` if it is under the old key; returns the
/// entry's backing name now (`None`: not an entry of ours, or gone).
fn convert_name(
    s: &mut Session<'_>,
    dir: &Dir,
    bname: &OsStr,
    new: &VolumeKeys,
    old: &VolumeKeys,
    counts: &mut MetaCounts,
) -> Result<Option<OsString>, ReencryptError> {
    let encoded = match names::classify(bname) {
        EntryKind::Hidden => return Ok(None),
        EntryKind::Encrypted => bname.as_bytes().to_vec(),
        EntryKind::Long => match sys::read_small(dir.fd(), &names::side_file_of(bname), MAX_SIDE) {
            Ok(full) if names::long_name_matches(bname, &full) => full,
            _ => {
                tracing::warn!(entry = ?bname, "long-name side file missing or wrong; entry left as it is");
                return Ok(None);
            }
        },
    };
    if names::decrypt(&new.names, dir.id(), &encoded).is_ok() {
        return Ok(Some(bname.to_os_string()));
    }
    let Ok(plain) = names::decrypt(&old.names, dir.id(), &encoded) else {
        tracing::warn!(entry = ?bname, "name decrypts under neither key; entry left as it is");
        return Ok(None);
    };
    let b = names::encrypt(&new.names, dir.id(), &plain)
        .map_err(|e| ReencryptError::Refused(format!("name cannot be re-encrypted: {e:?}")))?;
    if let names::BackingName::Long { full, .. } = &b {
        let side = b.side_file().unwrap_or_default();
        sys::write_atomic(dir.fd(), &side, full.as_bytes(), 0o644).map_err(ReencryptError::os)?;
    }
    match sys::rename(dir.fd(), bname, dir.fd(), b.entry(), libc::RENAME_NOREPLACE) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
        Err(e) => return Err(ReencryptError::os(e)),
    }
    if names::classify(bname) == EntryKind::Long {
        let _ = sys::unlink(dir.fd(), &names::side_file_of(bname));
    }
    counts.names += 1;
    s.hooks.step(Step::NameConverted)?;
    Ok(Some(b.entry().to_os_string()))
}

/// Re-seals a short-form symlink target under the new key by replacing the symlink (a new
/// symlink under a temp name, owner and times as before, renamed over it). Returns the name
/// it has (unchanged).
#[allow(clippy::too_many_arguments)]
fn convert_symlink(
    s: &mut Session<'_>,
    dir: &Arc<Dir>,
    dir_path: &[OsString],
    bname: &OsStr,
    st: &rustix::fs::Stat,
    new: &VolumeKeys,
    old: &VolumeKeys,
    counts: &mut MetaCounts,
    links: &mut HashMap<u64, (Arc<Dir>, OsString)>,
) -> Result<OsString, ReencryptError> {
    let stored = sys::readlink(dir.fd(), bname).map_err(ReencryptError::os)?;
    if long_target_ref(&stored).is_some() {
        return Ok(bname.to_os_string()); // its side file was re-sealed at the root
    }
    let stored_os = OsStr::from_bytes(&stored);
    if names::decrypt_target(&new.names, stored_os).is_ok() {
        return Ok(bname.to_os_string());
    }
    let Ok(target) = names::decrypt_target(&old.names, stored_os) else {
        tracing::warn!(entry = ?bname, "symlink target decrypts under neither key; left as it is");
        return Ok(bname.to_os_string());
    };
    let tmp = sys::temp_name("symlink").map_err(ReencryptError::os)?;
    match links.get(&st.st_ino) {
        // Another name of this symlink was converted in this run: link to that one.
        Some((d, n)) => sys::link(d.fd(), n, dir.fd(), &tmp).map_err(ReencryptError::os)?,
        None => {
            let sealed =
                names::encrypt_target(&new.names, &target).map_err(ReencryptError::other)?;
            sys::symlink(sealed.as_bytes(), dir.fd(), &tmp).map_err(ReencryptError::os)?;
            let _ = sys::chown_at(dir.fd(), &tmp, Some(st.st_uid), Some(st.st_gid));
            // The attributes of the old symlink go onto the new one, sealed anew.
            for b in sys::list_xattr(sys::XTarget::At(dir.fd(), bname)).unwrap_or_default() {
                if let Ok(v) = sys::get_xattr(sys::XTarget::At(dir.fd(), bname), &b) {
                    let _ = sys::set_xattr(sys::XTarget::At(dir.fd(), &tmp), &b, &v, 0);
                }
            }
            let mut path = dir_path.to_vec();
            path.push(tmp.clone());
            let at = Loc {
                path,
                ino: sys::stat_at(dir.fd(), &tmp)
                    .map_err(ReencryptError::os)?
                    .st_ino,
            };
            convert_xattrs(
                s,
                sys::XTarget::At(dir.fd(), &tmp),
                Some(&at),
                new,
                old,
                counts,
            )?;
            let times: sys::Times = [
                Some(Some((st.st_atime, st.st_atime_nsec as u32))),
                Some(Some((st.st_mtime, st.st_mtime_nsec as u32))),
            ];
            let _ = sys::utimens_at(dir.fd(), &tmp, &times);
        }
    }
    // Online, the mount keeps showing the symlink under its old number: the old inode is
    // held (see ReplacedSymlink), once per inode (a second name of it links the same new one).
    let hold = match s.online {
        Some(_) if !counts.replaced.iter().any(|r| r.old == st.st_ino) => {
            let new = sys::stat_at(dir.fd(), &tmp).map(|t| t.st_ino);
            match (sys::open_path(dir.fd(), bname), new) {
                (Ok(fd), Ok(new)) => Some((fd, new)),
                // Out of descriptors: this symlink shows its new number (documented limit).
                (Err(e), _) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                    None
                }
                (Err(e), _) | (_, Err(e)) => {
                    let _ = sys::unlink(dir.fd(), &tmp);
                    return Err(ReencryptError::os(e));
                }
            }
        }
        _ => None,
    };
    if let Err(e) = sys::rename(dir.fd(), &tmp, dir.fd(), bname, 0) {
        let _ = sys::unlink(dir.fd(), &tmp);
        return Err(ReencryptError::os(e));
    }
    if let Some((hold, new)) = hold {
        counts.replaced.push(ReplacedSymlink {
            old: st.st_ino,
            new,
            hold,
        });
    }
    if st.st_nlink > 1 {
        links
            .entry(st.st_ino)
            .or_insert_with(|| (dir.clone(), bname.to_os_string()));
    }
    counts.targets += 1;
    s.hooks.step(Step::TargetConverted)?;
    Ok(bname.to_os_string())
}

/// Re-seals a long target's side file `.cmkfs.target.<hex>` (atomic replace).
fn reseal_long_target(
    s: &mut Session<'_>,
    root: &Dir,
    name: &OsStr,
    new: &VolumeKeys,
    old: &VolumeKeys,
    counts: &mut MetaCounts,
) -> Result<(), ReencryptError> {
    let Ok(raw) = sys::read_small(root.fd(), name, MAX_SIDE) else {
        return Ok(());
    };
    if names::open_target(&new.names, &raw).is_ok() {
        return Ok(());
    }
    let Ok(target) = names::open_target(&old.names, &raw) else {
        return Ok(());
    };
    let sealed = names::encrypt_target(&new.names, &target).map_err(ReencryptError::other)?;
    let raw_new = B64URL
        .decode(sealed.as_bytes())
        .map_err(ReencryptError::other)?;
    sys::write_atomic(root.fd(), name, &raw_new, 0o400).map_err(ReencryptError::os)?;
    counts.targets += 1;
    s.hooks.step(Step::TargetConverted)
}

/// Where an inode whose extended attributes are converted is: backing path from the root
/// (empty: the root) and inode number, for the journal record and for error messages.
struct Loc {
    path: Vec<OsString>,
    ino: u64,
}

impl Loc {
    fn display(&self) -> String {
        if self.path.is_empty() {
            return "the backing root".into();
        }
        let p: Vec<_> = self.path.iter().map(|c| c.to_string_lossy()).collect();
        format!("backing entry {}", p.join("/"))
    }
}

/// Re-seals every extended attribute of ours on `t` that is under the old key: set under its
/// new backing name (value sealed anew), then the old one removed; one too large to be held
/// twice by the inode goes through the journal instead ([`move_xattr`]). `at`: where `t` is
/// (`None`: an open file with no name).
fn convert_xattrs(
    s: &mut Session<'_>,
    t: sys::XTarget<'_>,
    at: Option<&Loc>,
    new: &VolumeKeys,
    old: &VolumeKeys,
    counts: &mut MetaCounts,
) -> Result<(), ReencryptError> {
    let whose = || at.map_or_else(|| "an open file with no name".to_string(), Loc::display);
    let list = match sys::list_xattr(t) {
        Ok(l) => l,
        Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENOENT)) => {
            return Ok(())
        }
        Err(e) => {
            return Err(ReencryptError::Refused(format!(
                "{}: listing its extended attributes: {e}",
                whose()
            )))
        }
    };
    for b in list {
        let prefix = if b.as_bytes().starts_with(xattr::PREFIX.as_bytes()) {
            xattr::PREFIX
        } else if b.as_bytes().starts_with(xattr::TRUSTED_PREFIX.as_bytes()) {
            xattr::TRUSTED_PREFIX
        } else {
            continue;
        };
        let stored = match sys::get_xattr(t, &b) {
            Ok(v) => v,
            Err(_) => continue,
        };
        if xattr::open_value(new, &b, &stored).is_some() {
            continue;
        }
        let Some((kept_name, value)) = xattr::open_value(old, &b, &stored) else {
            continue;
        };
        let plain_name = match kept_name {
            Some(n) => n,
            None => match xattr::open_name(old, &b) {
                Some(n) => n,
                None => continue,
            },
        };
        let nb = xattr::seal_name(new, prefix, &plain_name);
        let sealed = xattr::seal_value(new, &nb, &value).map_err(ReencryptError::other)?;
        let fail = |e: std::io::Error| {
            ReencryptError::Refused(format!(
                "{}: extended attribute {}: {e}",
                whose(),
                b.to_string_lossy()
            ))
        };
        match sys::set_xattr(t, &nb.name, &sealed, 0) {
            Ok(()) => {
                s.hooks.step(Step::XattrSet)?;
                match sys::remove_xattr(t, &b) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {}
                    Err(e) => return Err(fail(e)),
                }
            }
            // No room for both forms at once (ext4: ENOSPC past one block of attributes).
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::E2BIG)) => {
                move_xattr(s, t, at, &b, &nb.name, &sealed).map_err(|e| match e {
                    ReencryptError::Io(e) => fail(e),
                    e => e,
                })?;
            }
            Err(e) => return Err(fail(e)),
        }
        counts.xattrs += 1;
    }
    Ok(())
}

/// Moves attribute `old_name` of `t` to `new_name` (value `sealed`, under the new key) by
/// remove-then-set, crash-safely: the move is recorded in the journal first and the record
/// cleared after ([`finish_xattr_move`] completes a recorded one).
fn move_xattr(
    s: &mut Session<'_>,
    t: sys::XTarget<'_>,
    at: Option<&Loc>,
    old_name: &OsStr,
    new_name: &OsStr,
    sealed: &[u8],
) -> Result<(), ReencryptError> {
    if let Some(at) = at {
        let utf8 = |c: &OsStr| {
            c.to_str().map(str::to_owned).ok_or_else(|| {
                ReencryptError::Refused(format!("{}: a name is not UTF-8", at.display()))
            })
        };
        let m = XattrMove {
            path: at.path.iter().map(|c| utf8(c)).collect::<Result<_, _>>()?,
            ino: at.ino,
            old_name: utf8(old_name)?,
            new_name: utf8(new_name)?,
            value: B64STD.encode(sealed),
        };
        write_names_journal(s, Some(m))?;
        s.hooks.step(Step::XattrRecorded)?;
    }
    match sys::remove_xattr(t, old_name) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {}
        Err(e) => return Err(ReencryptError::os(e)),
    }
    s.hooks.step(Step::XattrRemoved)?;
    sys::set_xattr(t, new_name, sealed, 0).map_err(ReencryptError::os)?;
    if at.is_some() {
        write_names_journal(s, None)?;
    }
    Ok(())
}

/// Writes the journal of the names phase, with attribute move `m` recorded or none.
fn write_names_journal(s: &mut Session<'_>, m: Option<XattrMove>) -> Result<(), ReencryptError> {
    let mut j = Journal::new(&s.volume_id, s.generation, Phase::Names);
    j.xattr = m;
    j.root_times = s.root_times;
    let root = s.vol.root_dir().clone();
    j.write(root.fd(), s.journal_key()?)
        .map_err(ReencryptError::os)
}

/// Completes attribute move `m` recorded by an interrupted run: on the inode it names (if it
/// is still there), the new attribute set unless it is, the old one removed; then the record
/// is cleared.
pub(super) fn finish_xattr_move(s: &mut Session<'_>, m: &XattrMove) -> Result<(), ReencryptError> {
    let value = B64STD
        .decode(&m.value)
        .map_err(|_| ReencryptError::Journal {
            why: "its recorded extended attribute is not base64".into(),
        })?;
    let root = s.vol.root_dir().clone();
    let comps: Vec<OsString> = m.path.iter().map(OsString::from).collect();
    let (new_name, old_name) = (OsStr::new(&m.new_name), OsStr::new(&m.old_name));
    let mut parent: Option<std::os::fd::OwnedFd> = None;
    let mut found = true;
    if let Some((last, dirs)) = comps.split_last() {
        for c in dirs {
            let at = parent.as_ref().map_or(root.fd(), |p| p.as_fd());
            match sys::open_dir(at, c) {
                Ok(fd) => parent = Some(fd),
                Err(_) => {
                    found = false;
                    break;
                }
            }
        }
        if found {
            let at = parent.as_ref().map_or(root.fd(), |p| p.as_fd());
            found = sys::stat_at(at, last).is_ok_and(|st| st.st_ino == m.ino);
        }
    } else {
        found = root.ino() == m.ino;
    }
    if found {
        let pfd = parent.as_ref().map_or(root.fd(), |p| p.as_fd());
        let t = match comps.last() {
            Some(last) => sys::XTarget::At(pfd, last),
            None => sys::XTarget::Fd(root.fd()),
        };
        let fail = |e: std::io::Error| {
            ReencryptError::Refused(format!(
                "{}: extended attribute {}: finishing its move under the new key: {e}",
                Loc {
                    path: comps.clone(),
                    ino: m.ino
                }
                .display(),
                m.old_name
            ))
        };
        if sys::get_xattr(t, new_name).is_err() {
            match sys::remove_xattr(t, old_name) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {}
                Err(e) => return Err(fail(e)),
            }
            sys::set_xattr(t, new_name, &value, 0).map_err(fail)?;
        } else {
            let _ = sys::remove_xattr(t, old_name);
        }
    } else {
        // A temp symlink of an interrupted run (garbage, removed by this run), or gone.
        tracing::warn!(path = ?m.path, "the inode of a recorded attribute move is gone; record dropped");
    }
    write_names_journal(s, None)
}
