//! Rename and hard links.
//!
//! A rename is one `renameat2` of the backing entries, with two exceptions the format needs:
//! a long name's side file is written before its entry exists and removed after it is gone,
//! and a directory renamed over an *empty* directory (whose backing side still holds its id,
//! so the backing rename says ENOTEMPTY) is done as an exchange followed by the removal of
//! the old, empty directory, marked beforehand so that a crash between the two leaves
//! something fsck recognises.

use std::ffi::{OsStr, OsString};
use std::os::fd::AsFd;

use super::dir::is_logically_empty;
use super::{os, sys, Attr, Dir, Volume, VolumeError};

/// Marker file written into an empty directory just before a rename replaces it: a directory
/// holding it was replaced and can go (fsck removes it when nothing else is inside).
pub const REPLACED_MARKER: &str = ".cmkfs.replaced";

/// What a rename did, for the caller's inode table.
#[derive(Debug)]
pub struct Renamed {
    /// Backing name the entry had.
    pub from: OsString,
    /// Backing name it has now.
    pub to: OsString,
}

impl Volume {
    /// Renames `dir/name` to `newdir/newname`. `flags` are renameat2 flags
    /// (`RENAME_NOREPLACE`, `RENAME_EXCHANGE`).
    pub fn rename(
        &self,
        dir: &Dir,
        name: &OsStr,
        newdir: &Dir,
        newname: &OsStr,
        flags: u32,
    ) -> Result<Renamed, VolumeError> {
        // Counted from before the move to after it: a re-encryption's walk that saw no move
        // in flight and none started missed nothing (see `Moves`).
        // An existing entry must never land under a directory id that is not durable yet.
        self.flush_ids()?;
        let _moving = self.note_move();
        super::reencrypt::test_rename_counted();
        let from = self.backing_name(dir, name)?;
        let to = self.backing_name(newdir, newname)?;
        let (src, dst) = (from.entry(), to.entry());
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
        // RENAME_EXCHANGE swaps the objects behind two existing names: the names, and so
        // their side files, stay where they are. A plain rename moves the name.
        self.write_side_file(newdir, &to)?;
        let old = if exchange {
            None
        } else {
            sys::stat_at(newdir.fd(), dst).ok()
        };
        // A symlink about to be replaced may own a long target's side file.
        let replaced_link = match &old {
            Some(st) if st.st_mode & libc::S_IFMT == libc::S_IFLNK => {
                sys::open_path(newdir.fd(), dst).ok()
            }
            _ => None,
        };
        match sys::rename(dir.fd(), src, newdir.fd(), dst, flags) {
            Ok(()) => {}
            Err(e)
                if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY | libc::EEXIST))
                    && flags == 0
                    && old
                        .as_ref()
                        .is_some_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFDIR) =>
            {
                self.replace_empty_dir(dir, src, newdir, dst)?;
            }
            Err(e) => {
                if old.is_none() && !exchange {
                    self.remove_side_file(newdir, dst);
                }
                return Err(os(e));
            }
        }
        if let Some(fd) = replaced_link {
            self.release_target(fd);
        }
        if !exchange && (dir.ino() != newdir.ino() || src != dst) {
            self.remove_side_file(dir, src);
        }
        Ok(Renamed {
            from: src.to_os_string(),
            to: dst.to_os_string(),
        })
    }

    /// Renames directory `src` of `dir` over directory `dst` of `newdir`, which must be
    /// empty in the plaintext view: mark `dst`, exchange the two, then discard the old `dst`
    /// (now under the source name). The destination name always exists.
    fn replace_empty_dir(
        &self,
        dir: &Dir,
        src: &OsStr,
        newdir: &Dir,
        dst: &OsStr,
    ) -> Result<(), VolumeError> {
        let src_st = sys::stat_at(dir.fd(), src).map_err(os)?;
        if src_st.st_mode & libc::S_IFMT != libc::S_IFDIR {
            return Err(VolumeError::errno_of(libc::EISDIR));
        }
        let victim = sys::open_dir(newdir.fd(), dst).map_err(os)?;
        if !is_logically_empty(victim.as_fd())? {
            return Err(VolumeError::errno_of(libc::ENOTEMPTY));
        }
        let marker = OsStr::new(REPLACED_MARKER);
        match sys::write_new(victim.as_fd(), marker, b"", 0o400) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(os(e)),
        }
        if let Err(e) = sys::rename(dir.fd(), src, newdir.fd(), dst, libc::RENAME_EXCHANGE) {
            let _ = sys::unlink(victim.as_fd(), marker);
            return Err(os(e));
        }
        drop(victim);
        self.discard_dir(dir, src)
    }

    /// Makes a hard link to entry `bname` of `dir` as `newdir/newname` (a symlink is linked
    /// itself, not followed).
    pub fn link(
        &self,
        dir: &Dir,
        bname: &OsStr,
        newdir: &Dir,
        newname: &OsStr,
    ) -> Result<(OsString, Attr), VolumeError> {
        self.flush_ids()?;
        let _moving = self.note_move();
        let (new, ()) = self.make_entry(newdir, newname, |nb| {
            sys::link(dir.fd(), bname, newdir.fd(), nb).map_err(os)
        })?;
        let attr = self.attr_at(newdir, &new)?;
        Ok((new, attr))
    }
}
