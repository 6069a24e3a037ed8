//! Backing directories held open by descriptor, their ids, listings, and the emptiness rule
//! (a directory whose backing side holds only metadata is empty in the plaintext view).

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::idsync::{self, IdDurability, PendingIds};
use super::names::{self, DirId, EntryKind, DIRID_FILE};
use super::{os, sys, Volume, VolumeError};
use crate::fsutil;

/// Size bound of a long name's side file: a base64url encoding of at most NAME_MAX bytes plus
/// the SIV tag is far below it.
const MAX_SIDE_FILE: usize = 4096;

/// A backing directory held open (`O_PATH`: usable as the directory of `*at` calls, never
/// read through), with its directory id. It stays the same directory when another request
/// renames it or one of its parents.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    id: DirId,
    ino: u64,
}

impl Dir {
    /// Opens the backing root `path` and reads its id.
    pub(super) fn open_root(path: &Path) -> Result<Dir, VolumeError> {
        let fd = sys::open_root(path).map_err(|e| VolumeError::io(path, e))?;
        Dir::from_fd(fd)
    }

    fn from_fd(fd: OwnedFd) -> Result<Dir, VolumeError> {
        let ino = sys::fstat(fd.as_fd()).map_err(os)?.st_ino;
        let id = read_dir_id(fd.as_fd())?;
        Ok(Dir { fd, id, ino })
    }

    /// The descriptor.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The directory id (associated data of the names inside).
    pub fn id(&self) -> &DirId {
        &self.id
    }

    /// The backing inode number.
    pub fn ino(&self) -> u64 {
        self.ino
    }
}

/// Reads the directory id of `dir`: a regular file of exactly 16 bytes (a symlink, FIFO or
/// large file in its place is corruption, refused without following or reading it whole).
pub(super) fn read_dir_id(dir: BorrowedFd<'_>) -> Result<DirId, VolumeError> {
    let bytes =
        sys::read_small(dir, OsStr::new(DIRID_FILE), 16).map_err(|e| VolumeError::CorruptFile {
            path: None,
            why: format!("directory id {DIRID_FILE} unreadable: {e}"),
        })?;
    let id: DirId = bytes
        .as_slice()
        .try_into()
        .map_err(|_| VolumeError::CorruptFile {
            path: None,
            why: format!("directory id has {} bytes, expected 16", bytes.len()),
        })?;
    // What a lost write leaves (never a random id, p = 2^-128): the names inside were
    // encrypted under the real id, so they cannot be decrypted, and names created under a
    // zero id would hide that loss. Refused like a short id (EIO), `cmkfs fsck` reports it.
    if id == [0; 16] {
        return Err(VolumeError::CorruptFile {
            path: None,
            why: format!(
                "directory id {DIRID_FILE} is all zeros (its write never reached the disk); \
                 run `cmkfs fsck`"
            ),
        });
    }
    Ok(id)
}

/// Writes a fresh random id into the new directory `dir`, durable before the caller renames
/// `dir` into place — fsynced, or on ext4 in `data=ordered` mode its write-back waited for —
/// or, elsewhere, handed to `pending` to be fsynced before any rename, link, fsync or
/// unmount (`idsync`, where the kernel code and the crash window are described).
pub(super) fn write_dir_id(dir: BorrowedFd<'_>, pending: &PendingIds) -> Result<(), VolumeError> {
    let mut id = [0u8; 16];
    super::idrand::fill(&mut id).map_err(|e| VolumeError::Internal(e.to_string()))?;
    let name = OsStr::new(DIRID_FILE);
    match idsync::for_dir(dir) {
        IdDurability::Fsync => sys::write_new_then(dir, name, &id, 0o444, File::sync_all),
        IdDurability::WrittenBack => sys::write_new_then(dir, name, &id, 0o444, sys::written_back),
        IdDurability::Deferred => {
            let mut f = sys::create_regular(dir, name, 0o444).map_err(os)?;
            if let Err(e) = f.write_all(&id) {
                let _ = sys::unlink(dir, name);
                return Err(os(e));
            }
            pending.push(dir, f, id)
        }
    }
    .map_err(os)
}

/// One plaintext entry of a listing, as the backing directory's listing gives it (no
/// attributes: they are read when a reply needs them, see [`Volume::entry_kind`]).
pub struct Listed {
    /// Plaintext name.
    pub name: OsString,
    /// Backing name (the entry in the backing directory).
    pub bname: OsString,
    /// Backing inode number.
    pub ino: u64,
    /// Type bits (`S_IFMT`).
    pub kind: u32,
}

impl Volume {
    /// Opens subdirectory `bname` of `parent`; `expect_ino` refuses a directory that is not
    /// that inode (the name was taken over: `ENOENT`).
    pub fn open_dir(
        &self,
        parent: &Dir,
        bname: &OsStr,
        expect_ino: Option<u64>,
    ) -> Result<Dir, VolumeError> {
        let fd = sys::open_dir(parent.fd(), bname).map_err(os)?;
        let d = Dir::from_fd(fd)?;
        if expect_ino.is_some_and(|i| i != d.ino) {
            return Err(VolumeError::errno_of(libc::ENOENT));
        }
        Ok(d)
    }

    /// Lists the plaintext entries of `dir` (without `.` and `..`). Entries whose names do
    /// not decrypt (e.g. copied from another volume) are skipped and logged: they have no
    /// plaintext name.
    pub fn list(&self, dir: &Dir) -> Result<Vec<Listed>, VolumeError> {
        let keys = self.keys()?;
        let mut out = Vec::new();
        for ent in sys::list(dir.fd()).map_err(os)? {
            let bname = ent.name;
            let encoded: Vec<u8> = match names::classify(&bname) {
                EntryKind::Hidden => continue,
                EntryKind::Encrypted => bname.as_bytes().to_vec(),
                EntryKind::Long => match self.read_side_file(dir, &bname) {
                    Some(full) if names::is_long_encoding(&full) => full,
                    Some(_) => {
                        tracing::warn!(entry = ?bname, "long-name entry for a name that has a short form (planted?); entry hidden, `cmkfs fsck --repair` quarantines it");
                        continue;
                    }
                    None => {
                        tracing::warn!(entry = ?bname, "long-name side file missing or wrong; entry hidden");
                        continue;
                    }
                },
            };
            match names::decrypt(&keys.names, dir.id(), &encoded) {
                Ok(name) => {
                    // The listing's own inode and type: no `stat` per entry (a reply reads
                    // what it sends when it is built); only a backing filesystem that gives
                    // no `d_type` needs one here.
                    let (ino, kind) = match ent.kind {
                        Some(k) => (ent.ino, k),
                        None => match sys::stat_at(dir.fd(), &bname) {
                            Ok(st) => (st.st_ino, st.st_mode & libc::S_IFMT),
                            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                            Err(e) => return Err(os(e)),
                        },
                    };
                    out.push(Listed {
                        name,
                        bname,
                        ino,
                        kind,
                    })
                }
                Err(_) => {
                    tracing::warn!(entry = ?bname, "name does not decrypt in this directory; entry hidden")
                }
            }
        }
        Ok(out)
    }

    /// Refuses a header whose name key opens none of the names at the backing root (see
    /// [`names::none_decrypt`]): checked at mount, before anything is served or written.
    /// Costs one listing of the root, ended at the first name that decrypts.
    pub fn check_root_names(&self) -> Result<(), VolumeError> {
        let keys = self.keys()?;
        let root = self.root_dir();
        let mut encodings = Vec::new();
        // Listing moves the root's atime: a mount or fsck that only looks leaves it as it was.
        let listed = super::root_times::keep_times(root.fd(), || sys::list(root.fd()));
        for ent in listed.map_err(os)? {
            let encoded = match names::classify(&ent.name) {
                EntryKind::Hidden => continue,
                EntryKind::Encrypted => ent.name.as_bytes().to_vec(),
                EntryKind::Long => match self.read_side_file(root, &ent.name) {
                    Some(full) => full,
                    None => continue,
                },
            };
            if names::decrypt(&keys.names, root.id(), &encoded).is_ok() {
                return Ok(());
            }
            encodings.push(encoded);
        }
        let retiring = keys.retiring.as_deref().map(|r| &r.names);
        if names::none_decrypt(&keys.names, retiring, root.id(), encodings) {
            return Err(VolumeError::WrongKey(names::foreign_header_message(
                self.root(),
            )));
        }
        Ok(())
    }

    /// Backing inode number and type bits (`S_IFMT`) of entry `bname` of `dir` now.
    pub fn entry_kind(&self, dir: &Dir, bname: &OsStr) -> Result<(u64, u32), VolumeError> {
        let st = sys::stat_at(dir.fd(), bname).map_err(os)?;
        Ok((st.st_ino, st.st_mode & libc::S_IFMT))
    }

    /// A long name's full encoding from its side file, if present and matching.
    pub(super) fn read_side_file(&self, dir: &Dir, entry: &OsStr) -> Option<Vec<u8>> {
        let full = sys::read_small(dir.fd(), &names::side_file_of(entry), MAX_SIDE_FILE).ok()?;
        names::long_name_matches(entry, &full).then_some(full)
    }
}

/// Whether `dir` is empty in the plaintext view: only hidden metadata inside (its id, stray
/// side and temp files) and leftover temp directories of an interrupted mkdir or rmdir that
/// hold nothing but hidden files.
pub(super) fn is_logically_empty(dir: BorrowedFd<'_>) -> Result<bool, VolumeError> {
    for ent in sys::list(dir).map_err(os)? {
        if names::classify(&ent.name) != EntryKind::Hidden {
            return Ok(false);
        }
        let is_dir = match ent.is_dir {
            Some(d) => d,
            None => {
                sys::stat_at(dir, &ent.name).map_err(os)?.st_mode & libc::S_IFMT == libc::S_IFDIR
            }
        };
        if is_dir && !dead_temp_dir_at(dir, &ent.name) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Whether entry `name` of `parent` is a temp directory left by an interrupted mkdir or
/// rmdir: a `.cmkfs-tmp.*` name holding only hidden files, nothing of the user's.
fn dead_temp_dir_at(parent: BorrowedFd<'_>, name: &OsStr) -> bool {
    if !name.as_bytes().starts_with(fsutil::TEMP_PREFIX.as_bytes()) {
        return false;
    }
    let Ok(fd) = sys::open_dir(parent, name) else {
        return false;
    };
    match sys::list(fd.as_fd()) {
        Ok(ents) => ents
            .iter()
            .all(|e| names::classify(&e.name) == EntryKind::Hidden && e.is_dir == Some(false)),
        Err(_) => false,
    }
}

/// [`dead_temp_dir_at`] for callers that walk by path (fsck).
pub fn is_dead_temp_dir(path: &Path, name: &OsStr) -> bool {
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(_)) if name.as_bytes().starts_with(fsutil::TEMP_PREFIX.as_bytes()) => {
            match sys::open_root(parent) {
                Ok(p) => dead_temp_dir_at(p.as_fd(), name),
                Err(_) => false,
            }
        }
        _ => false,
    }
}

/// Removes directory `name` of `parent`, which holds only hidden files and dead temp
/// directories (an rmdir leftover), contents first. Stops at anything of the user's
/// (`ENOTEMPTY`): this never deletes user data.
pub(super) fn remove_dead_dir(parent: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    let fd = sys::open_dir(parent, name)?;
    for ent in sys::list(fd.as_fd())? {
        if names::classify(&ent.name) != EntryKind::Hidden {
            return Err(io::Error::from_raw_os_error(libc::ENOTEMPTY));
        }
        let is_dir = match ent.is_dir {
            Some(d) => d,
            None => sys::stat_at(fd.as_fd(), &ent.name)?.st_mode & libc::S_IFMT == libc::S_IFDIR,
        };
        if is_dir {
            remove_dead_dir(fd.as_fd(), &ent.name)?;
        } else {
            sys::unlink(fd.as_fd(), &ent.name)?;
        }
    }
    drop(fd);
    sys::rmdir(parent, name)
}
