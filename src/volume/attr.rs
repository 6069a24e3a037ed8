//! Attributes: what `stat` shows in the plaintext view, and changing them (mode, owner,
//! times, size) through whatever reaches the entry: its name in a directory, its own
//! directory descriptor, or an open handle (also of a file unlinked while open).

use std::ffi::OsStr;
use std::time::SystemTime;

use rustix::fs::Stat;

use super::open_create::OpenFile;
use super::{os, sys, to_timespec, Dir, Volume, VolumeError};

/// Attributes of an entry as the plaintext view shows them: the backing inode's metadata with
/// the logical size (files: without the file header; symlinks: the plaintext target length).
#[derive(Clone, Copy, Debug)]
pub struct Attr {
    /// Backing inode number.
    pub ino: u64,
    /// Type and permission bits (`st_mode`).
    pub mode: u32,
    /// Link count.
    pub nlink: u64,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Device number of a device node.
    pub rdev: u64,
    /// Logical size in bytes.
    pub size: u64,
    /// 512-byte blocks allocated in the backing store.
    pub blocks: u64,
    /// Access time (seconds, nanoseconds).
    pub atime: (i64, u32),
    /// Modification time.
    pub mtime: (i64, u32),
    /// Status change time.
    pub ctime: (i64, u32),
}

impl Attr {
    /// The backing metadata with `size` as the logical size.
    // The `stat` field widths differ between architectures: the casts are not all no-ops.
    #[allow(clippy::unnecessary_cast)]
    pub fn from_stat(st: &Stat, size: u64) -> Attr {
        Attr {
            ino: st.st_ino as u64,
            mode: st.st_mode,
            nlink: st.st_nlink as u64,
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: st.st_rdev as u64,
            size,
            blocks: st.st_blocks as u64,
            atime: (st.st_atime as i64, st.st_atime_nsec as u32),
            mtime: (st.st_mtime as i64, st.st_mtime_nsec as u32),
            ctime: (st.st_ctime as i64, st.st_ctime_nsec as u32),
        }
    }

    /// The file type bits (`S_IFMT`).
    pub fn kind(&self) -> u32 {
        self.mode & libc::S_IFMT
    }

    /// Whether this is a directory.
    pub fn is_dir(&self) -> bool {
        self.kind() == libc::S_IFDIR
    }
}

/// What reaches an existing entry.
#[derive(Clone, Copy)]
pub enum Target<'a> {
    /// Backing name `.1` in directory `.0`.
    At(&'a Dir, &'a OsStr),
    /// A directory, through its own descriptor (the root has no name).
    Dir(&'a Dir),
    /// An open file: works when the file has no name left.
    File(&'a OpenFile),
}

impl Target<'_> {
    pub(super) fn xtarget(&self) -> sys::XTarget<'_> {
        match self {
            Target::At(d, n) => sys::XTarget::At(d.fd(), n),
            Target::Dir(d) => sys::XTarget::Fd(d.fd()),
            Target::File(f) => sys::XTarget::Fd(std::os::fd::AsFd::as_fd(f.file())),
        }
    }
}

/// Attribute changes for [`Volume::set_attr`].
#[derive(Clone, Debug, Default)]
pub struct SetAttr {
    /// New permission bits.
    pub mode: Option<u32>,
    /// New owner.
    pub uid: Option<u32>,
    /// New group.
    pub gid: Option<u32>,
    /// New logical size.
    pub size: Option<u64>,
    /// New access time (`None` inside = now).
    pub atime: Option<Option<SystemTime>>,
    /// New modification time (`None` inside = now).
    pub mtime: Option<Option<SystemTime>>,
}

impl Volume {
    /// Attributes of entry `bname` in `dir`.
    pub fn attr_at(&self, dir: &Dir, bname: &OsStr) -> Result<Attr, VolumeError> {
        let st = sys::stat_at(dir.fd(), bname).map_err(os)?;
        self.attr_from(&st, Some((dir, bname)))
    }

    /// Attributes of whatever `t` reaches.
    pub fn attr(&self, t: Target<'_>) -> Result<Attr, VolumeError> {
        match t {
            Target::At(d, n) => self.attr_at(d, n),
            Target::Dir(d) => self.attr_from(&sys::fstat(d.fd()).map_err(os)?, None),
            Target::File(f) => self.attr_from(
                &sys::fstat(std::os::fd::AsFd::as_fd(f.file())).map_err(os)?,
                None,
            ),
        }
    }

    /// Attributes from backing metadata; `at` is where the entry is (a symlink's length
    /// needs its target).
    pub(super) fn attr_from(
        &self,
        st: &Stat,
        at: Option<(&Dir, &OsStr)>,
    ) -> Result<Attr, VolumeError> {
        let size = match st.st_mode & libc::S_IFMT {
            libc::S_IFREG => super::content::logical_size(st.st_size as u64).map_err(|why| {
                VolumeError::CorruptFile {
                    // The backing name, relative to its directory (the caller knows where
                    // that is).
                    path: at.map(|(_, n)| n.into()),
                    why,
                }
            })?,
            libc::S_IFLNK => match at {
                Some((d, n)) => self.target_len(d, n).unwrap_or(0),
                None => 0,
            },
            _ => st.st_size as u64,
        };
        Ok(Attr::from_stat(st, size))
    }

    /// Applies attribute changes through `t` (the size through an open file when `t` is one,
    /// else through a handle opened for it).
    pub fn set_attr(&self, t: Target<'_>, set: &SetAttr) -> Result<Attr, VolumeError> {
        if let Some(size) = set.size {
            match t {
                Target::File(of) => self.truncate(of, size)?,
                Target::At(d, n) => {
                    let of = self.open_file(d, n, true, None)?;
                    self.truncate(&of, size)?
                }
                Target::Dir(_) => return Err(VolumeError::errno_of(libc::EISDIR)),
            }
            self.kill_capability(t)?;
            // Any size change request moves mtime and ctime, also to the same size (as ext4
            // does; truncate(2) sends no time of its own).
            if set.mtime.is_none() {
                let touch: sys::Times = [None, Some(None)];
                self.set_times(t, &touch)?;
            }
        }
        if let Some(mode) = set.mode {
            match t {
                Target::At(d, n) => sys::chmod_at(d.fd(), n, mode),
                Target::Dir(d) => sys::chmod_fd(d.fd(), mode),
                Target::File(f) => sys::chmod_fd(std::os::fd::AsFd::as_fd(f.file()), mode),
            }
            .map_err(os)?;
            // An access ACL follows the new mode bits (its owner, group-or-mask and other
            // entries), as `chmod` on a local filesystem with ACLs does.
            self.acl_chmod(t, mode)?;
        }
        if set.uid.is_some() || set.gid.is_some() {
            match t {
                Target::At(d, n) => sys::chown_at(d.fd(), n, set.uid, set.gid),
                Target::Dir(d) => sys::chown_fd(d.fd(), set.uid, set.gid),
                Target::File(f) => {
                    sys::chown_fd(std::os::fd::AsFd::as_fd(f.file()), set.uid, set.gid)
                }
            }
            .map_err(os)?;
            self.kill_capability(t)?;
        }
        if set.atime.is_some() || set.mtime.is_some() {
            let conv = |t: &Option<Option<SystemTime>>| t.map(|t| t.map(to_timespec));
            self.set_times(t, &[conv(&set.atime), conv(&set.mtime)])?;
        }
        self.attr(t)
    }

    fn set_times(&self, t: Target<'_>, times: &sys::Times) -> Result<(), VolumeError> {
        match t {
            Target::At(d, n) => sys::utimens_at(d.fd(), n, times),
            Target::Dir(d) => sys::utimens_fd(d.fd(), times),
            Target::File(f) => sys::utimens_fd(std::os::fd::AsFd::as_fd(f.file()), times),
        }
        .map_err(os)
    }
}
