//! Names in directories: lookup, and making and removing entries (mkdir, mknod, unlink,
//! rmdir), with the long-name side files and the owner and ACL a new entry gets.

use std::ffi::{OsStr, OsString};
use std::os::fd::AsFd;

use super::dir::{is_logically_empty, remove_dead_dir, write_dir_id};
use super::names::{self, BackingName, EntryKind};
use super::{os, sys, Attr, Caller, Dir, Pinned, Target, Volume, VolumeError};

impl Volume {
    /// Where plaintext `name` lives in `dir`.
    pub fn backing_name(&self, dir: &Dir, name: &OsStr) -> Result<BackingName, VolumeError> {
        let keys = self.keys()?;
        Ok(names::encrypt(&keys.names, dir.id(), name)?)
    }

    /// Looks up `name` in `dir`: its backing name and attributes.
    pub fn lookup(&self, dir: &Dir, name: &OsStr) -> Result<(OsString, Attr), VolumeError> {
        let b = self.backing_name(dir, name)?;
        let attr = self.attr_at(dir, b.entry())?;
        Ok((b.entry().to_os_string(), attr))
    }

    /// Creates the entry for `name` in `dir`: writes a long name's side file first, then calls
    /// `make` with the backing name. Undoes the side file if `make` fails.
    pub(super) fn make_entry<T>(
        &self,
        dir: &Dir,
        name: &OsStr,
        make: impl FnOnce(&OsStr) -> Result<T, VolumeError>,
    ) -> Result<(OsString, T), VolumeError> {
        let b = self.backing_name(dir, name)?;
        let side = self.write_side_file(dir, &b)?;
        match make(b.entry()) {
            Ok(t) => Ok((b.entry().to_os_string(), t)),
            Err(e) => {
                if let Some(s) = side {
                    // Only remove it if no entry of that name exists (e.g. EEXIST keeps it).
                    if sys::stat_at(dir.fd(), b.entry()).is_err() {
                        let _ = sys::unlink(dir.fd(), &s);
                    }
                }
                Err(e)
            }
        }
    }

    /// Writes a long name's side file (atomically); returns its name.
    pub(super) fn write_side_file(
        &self,
        dir: &Dir,
        b: &BackingName,
    ) -> Result<Option<OsString>, VolumeError> {
        if let BackingName::Long { full, .. } = b {
            let side = b.side_file().unwrap_or_default();
            sys::write_atomic(dir.fd(), &side, full.as_bytes(), 0o644).map_err(os)?;
            return Ok(Some(side));
        }
        Ok(None)
    }

    /// Removes the side file of entry `bname` (if it has one).
    pub(super) fn remove_side_file(&self, dir: &Dir, bname: &OsStr) {
        if names::classify(bname) == EntryKind::Long {
            let _ = sys::unlink(dir.fd(), &names::side_file_of(bname));
        }
    }

    /// Sets ownership of a new entry to the caller when running as root (as a local
    /// filesystem would), honouring a setgid parent directory. A chown drops the setuid and
    /// setgid bits of a non-directory; `mode` (the entry's permission bits) puts them back.
    /// Returns whether anything was changed: nothing is when the entry already has that
    /// owner (a root caller, or the backing filesystem gave it the right group).
    pub(super) fn own(
        &self,
        dir: &Dir,
        new: &Pinned<'_>,
        caller: Caller,
        mode: u32,
    ) -> Result<bool, VolumeError> {
        if !self.as_root {
            return Ok(false);
        }
        let st = new.stat();
        // The group: the parent's when it is setgid, else the caller's. The backing
        // filesystem applied the same rule when it made the entry (a setgid directory gives
        // its group to every entry made in it), so an entry that has the caller's group has
        // the right one either way; only otherwise is the parent looked at.
        let gid = if st.st_gid == caller.gid {
            caller.gid
        } else {
            let parent = sys::fstat(dir.fd()).map_err(os)?;
            if parent.st_mode & libc::S_ISGID != 0 {
                parent.st_gid
            } else {
                caller.gid
            }
        };
        if st.st_uid == caller.uid && st.st_gid == gid {
            return Ok(false);
        }
        let t = Target::Pinned(new);
        self.chown_target(t, Some(caller.uid), Some(gid))?;
        if mode & (libc::S_ISUID | libc::S_ISGID) != 0 {
            self.chmod_target(t, mode)?;
        }
        Ok(true)
    }

    /// Creates a directory with its own directory id. Built under a temporary name (id,
    /// owner, ACLs) and renamed into place, so a crash never leaves a directory without an
    /// id.
    pub fn mkdir(
        &self,
        dir: &Dir,
        name: &OsStr,
        mode: u32,
        caller: Caller,
    ) -> Result<(OsString, Attr), VolumeError> {
        let mut inherit = self.inherit_acl(dir, libc::S_IFDIR | (mode & 0o7777), caller)?;
        // A directory made inside a setgid directory is setgid too (as on ext4).
        inherit.mode |= sys::fstat(dir.fd()).map_err(os)?.st_mode & libc::S_ISGID;
        let (bname, ()) = self.make_entry(dir, name, |bname| {
            let tmp = sys::temp_name("mkdir").map_err(os)?;
            sys::mkdir(dir.fd(), &tmp, 0o700).map_err(os)?;
            let built = (|| {
                // Set up through its descriptor, never by name (see `Pinned`).
                let new = self.pin_new(dir, &tmp, libc::S_IFDIR)?;
                write_dir_id(new.fd(), &self.ids)?;
                self.chmod_target(Target::Pinned(&new), inherit.mode)?;
                self.own(dir, &new, caller, inherit.mode)?;
                self.apply_inherited(Target::Pinned(&new), &inherit)?;
                sys::rename(dir.fd(), &tmp, dir.fd(), bname, libc::RENAME_NOREPLACE).map_err(os)
            })();
            if built.is_err() {
                let _ = remove_dead_dir(dir.fd(), &tmp);
            }
            built
        })?;
        let attr = self.attr_at(dir, &bname)?;
        Ok((bname, attr))
    }

    /// Creates a special file (FIFO, socket, block or character device) or an empty regular
    /// file. Device nodes are backing device nodes with the same number (creating one needs
    /// CAP_MKNOD, which the kernel checks for the caller; the daemon never opens them).
    pub fn mknod(
        &self,
        dir: &Dir,
        name: &OsStr,
        mode: u32,
        rdev: u64,
        caller: Caller,
    ) -> Result<(OsString, Attr), VolumeError> {
        let fmt = match mode & libc::S_IFMT {
            0 => libc::S_IFREG,
            f
            @ (libc::S_IFREG | libc::S_IFIFO | libc::S_IFSOCK | libc::S_IFCHR | libc::S_IFBLK) => f,
            _ => return Err(VolumeError::errno_of(libc::EINVAL)),
        };
        let inherit = self.inherit_acl(dir, fmt | (mode & 0o7777), caller)?;
        let (bname, ()) = self.make_entry(dir, name, |bname| {
            sys::mknod(dir.fd(), bname, fmt | inherit.mode, rdev).map_err(os)?;
            let new = self.pin_new(dir, bname, fmt)?;
            self.own(dir, &new, caller, inherit.mode)?;
            self.apply_inherited(Target::Pinned(&new), &inherit)
        })?;
        let attr = self.attr_at(dir, &bname)?;
        Ok((bname, attr))
    }

    /// Removes a non-directory entry; returns its backing name.
    pub fn unlink(&self, dir: &Dir, name: &OsStr) -> Result<OsString, VolumeError> {
        let b = self.backing_name(dir, name)?;
        let st = sys::stat_at(dir.fd(), b.entry()).map_err(os)?;
        if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
            self.unlink_symlink(dir, b.entry())?;
        } else {
            sys::unlink(dir.fd(), b.entry()).map_err(os)?;
        }
        self.remove_side_file(dir, b.entry());
        Ok(b.entry().to_os_string())
    }

    /// Removes an empty directory (its id file and stray metadata go with it); returns its
    /// backing name and backing inode number.
    pub fn rmdir(&self, dir: &Dir, name: &OsStr) -> Result<(OsString, u64), VolumeError> {
        let b = self.backing_name(dir, name)?;
        let st = sys::stat_at(dir.fd(), b.entry()).map_err(os)?;
        if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
            return Err(VolumeError::errno_of(libc::ENOTDIR));
        }
        // Decide before touching anything.
        let fd = sys::open_dir(dir.fd(), b.entry()).map_err(os)?;
        if !is_logically_empty(fd.as_fd())? {
            return Err(VolumeError::errno_of(libc::ENOTEMPTY));
        }
        drop(fd);
        self.discard_dir(dir, b.entry())?;
        self.remove_side_file(dir, b.entry());
        Ok((b.entry().to_os_string(), st.st_ino))
    }

    /// Takes away the (empty) directory `bname` of `dir`: its name vanishes in one step, a
    /// rename to a hidden temp name, then the leftover is taken apart. A crash in between
    /// leaves hidden garbage (removed by the parent's rmdir or by fsck), never a visible
    /// directory without its id.
    pub(super) fn discard_dir(&self, dir: &Dir, bname: &OsStr) -> Result<(), VolumeError> {
        let trash = sys::temp_name("rmdir").map_err(os)?;
        sys::rename(dir.fd(), bname, dir.fd(), &trash, libc::RENAME_NOREPLACE).map_err(os)?;
        if let Err(e) = remove_dead_dir(dir.fd(), &trash) {
            tracing::warn!(entry = ?trash, error = %e, "leftover of rmdir; `cmkfs fsck --repair` removes it");
        }
        Ok(())
    }
}
