//! Attributes: what `stat` shows in the plaintext view, and changing them (mode, owner,
//! times, size) through whatever reaches the entry: its name in a directory, its own
//! directory descriptor, or an open handle (also of a file unlinked while open).

use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
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
    /// An entry held by descriptor and checked to be the inode a request is about
    /// ([`Volume::pin`]): a change reaches exactly that inode, whatever holds its name by then.
    Pinned(&'a Pinned<'a>),
}

impl Target<'_> {
    pub(super) fn xtarget(&self) -> sys::XTarget<'_> {
        match self.fd() {
            Some(fd) => sys::XTarget::Fd(fd),
            None => match self {
                Target::At(d, n) => sys::XTarget::At(d.fd(), n),
                _ => unreachable!("every other target has a descriptor"),
            },
        }
    }

    /// The descriptor a change goes through: every target but a bare name has one.
    pub(super) fn fd(&self) -> Option<BorrowedFd<'_>> {
        match self {
            Target::At(..) => None,
            Target::Dir(d) => Some(d.fd()),
            Target::File(f) => Some(f.file().as_fd()),
            Target::Pinned(p) => Some(p.fd.as_fd()),
        }
    }
}

/// An entry of a directory held by an `O_PATH` descriptor (never a symlink's target: the
/// symlink itself), with the `fstat` taken when it was pinned.
///
/// A writer of the backing store can swap an entry for a symlink, a hard link to a file
/// outside the volume or a FIFO between the kernel's lookup and a request that acts on it by
/// name. Calls made by name (`fchmodat`, `fchownat`, `utimensat`, `lsetxattr`) would then act
/// on whatever holds the name; calls through a pinned descriptor act on the inode that was
/// checked, so the daemon (root, on `--allow-other` mounts) never changes anything but the
/// entry the request is about.
pub struct Pinned<'a> {
    fd: PinFd<'a>,
    st: Stat,
    dir: &'a Dir,
    name: &'a OsStr,
}

/// A pin's descriptor: its own, or one its maker holds (a file just created).
enum PinFd<'a> {
    Owned(OwnedFd),
    Borrowed(BorrowedFd<'a>),
}

impl AsFd for PinFd<'_> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            PinFd::Owned(fd) => fd.as_fd(),
            PinFd::Borrowed(fd) => *fd,
        }
    }
}

impl Pinned<'_> {
    /// The descriptor (`O_PATH`, or the open file it was made from).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The entry's metadata when it was pinned.
    pub(super) fn stat(&self) -> &Stat {
        &self.st
    }

    /// The entry's type bits (`S_IFMT`).
    pub fn kind(&self) -> u32 {
        self.st.st_mode & libc::S_IFMT
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
    /// Pins entry `bname` of `dir` ([`Pinned`]): opened `O_PATH|O_NOFOLLOW` and, when
    /// `expect_ino` is given, checked to be that backing inode (`ENOENT` if the name now
    /// belongs to another: the entry the request was about is gone from it).
    pub fn pin<'a>(
        &self,
        dir: &'a Dir,
        bname: &'a OsStr,
        expect_ino: Option<u64>,
    ) -> Result<Pinned<'a>, VolumeError> {
        let fd = sys::open_path(dir.fd(), bname).map_err(os)?;
        let st = sys::fstat(fd.as_fd()).map_err(os)?;
        if expect_ino.is_some_and(|i| i != st.st_ino) {
            return Err(VolumeError::errno_of(libc::ENOENT));
        }
        Ok(Pinned {
            fd: PinFd::Owned(fd),
            st,
            dir,
            name: bname,
        })
    }

    /// Pins an entry this daemon has just created by name (`mknodat`, `symlinkat`, `mkdirat`
    /// give no descriptor): it must still be of type `kind`, have one name (a hard link to a
    /// file elsewhere has two) and, for a daemon running as root, belong to root (anyone
    /// else's file is not the one just made). Otherwise the entry was swapped before it could be set up: `EIO`.
    pub(super) fn pin_new<'a>(
        &self,
        dir: &'a Dir,
        bname: &'a OsStr,
        kind: u32,
    ) -> Result<Pinned<'a>, VolumeError> {
        let p = self.pin(dir, bname, None)?;
        // (Directories cannot be hard-linked, and some filesystems count their links oddly.)
        let linked = kind != libc::S_IFDIR && p.st.st_nlink != 1;
        // SAFETY: geteuid has no preconditions.
        let foreign = self.as_root && p.st.st_uid != unsafe { libc::geteuid() };
        if p.kind() != kind || linked || foreign {
            tracing::warn!(
                entry = ?bname,
                "a new backing entry was replaced before it was set up (a writer of the backing store?)"
            );
            return Err(VolumeError::errno_of(libc::EIO));
        }
        Ok(p)
    }

    /// A pin of a descriptor this daemon already holds for entry `bname` (a file it created
    /// with `O_EXCL`), with that descriptor's `fstat`: no system call.
    pub(super) fn pin_fd<'a>(
        &self,
        fd: BorrowedFd<'a>,
        st: Stat,
        dir: &'a Dir,
        bname: &'a OsStr,
    ) -> Pinned<'a> {
        Pinned {
            fd: PinFd::Borrowed(fd),
            st,
            dir,
            name: bname,
        }
    }

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
            Target::File(f) => self.attr_from(&sys::fstat(f.file().as_fd()).map_err(os)?, None),
            Target::Pinned(p) => {
                let st = sys::fstat(p.fd.as_fd()).map_err(os)?;
                // A symlink's length needs its target, read by name (nothing is changed).
                self.attr_from(&st, Some((p.dir, p.name)))
            }
        }
    }

    /// Attributes from backing metadata; `at` is where the entry is (a symlink's length
    /// needs its target).
    pub(super) fn attr_from(
        &self,
        st: &Stat,
        at: Option<(&Dir, &OsStr)>,
    ) -> Result<Attr, VolumeError> {
        #[allow(clippy::unnecessary_cast)] // dev_t is not u64 everywhere
        if st.st_dev as u64 != self.root_dev {
            return Err(VolumeError::CorruptFile {
                path: at.map(|(_, n)| n.into()),
                why: "it is on another filesystem than the volume (a mount point inside the \
                      backing directory): inode numbers would collide; keep a volume's \
                      backing directory on one filesystem"
                    .into(),
            });
        }
        let size = match st.st_mode & libc::S_IFMT {
            libc::S_IFREG => self.layout.logical_size(st.st_size as u64).map_err(|why| {
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
                Target::Pinned(p) => {
                    let of = self.open_file(p.dir, p.name, true, Some(p.st.st_ino))?;
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
            self.chmod_target(t, mode)?;
            // An access ACL follows the new mode bits (its owner, group-or-mask and other
            // entries), as `chmod` on a local filesystem with ACLs does.
            self.acl_chmod(t, mode)?;
        }
        if set.uid.is_some() || set.gid.is_some() {
            self.chown_target(t, set.uid, set.gid)?;
            self.kill_capability(t)?;
        }
        if set.atime.is_some() || set.mtime.is_some() {
            let conv = |t: &Option<Option<SystemTime>>| t.map(|t| t.map(to_timespec));
            self.set_times(t, &[conv(&set.atime), conv(&set.mtime)])?;
        }
        self.attr(t)
    }

    /// Sets times through `t`. A regular file's are set under its content lock (shared):
    /// a re-encryption batch holds it exclusively from the moment it reads a file's times
    /// to the moment it sets them back after rewriting the file, so a time set in between
    /// would be undone; it waits for the batch instead.
    fn set_times(&self, t: Target<'_>, times: &sys::Times) -> Result<(), VolumeError> {
        let shared = match t {
            Target::File(of) => Some(of.shared.clone()),
            Target::Pinned(p) if p.kind() == libc::S_IFREG => Some(self.shared_of(p.st.st_ino)),
            Target::At(d, n) => sys::stat_at(d.fd(), n)
                .ok()
                .filter(|st| st.st_mode & libc::S_IFMT == libc::S_IFREG)
                .map(|st| self.shared_of(st.st_ino)),
            _ => None,
        };
        let _lock = shared
            .as_ref()
            .map(|s| s.content.rmw.read().unwrap_or_else(|p| p.into_inner()));
        match (t.fd(), t) {
            (Some(fd), _) => sys::utimens_fd(fd, times),
            (None, Target::At(d, n)) => sys::utimens_at(d.fd(), n, times),
            (None, _) => unreachable!("every other target has a descriptor"),
        }
        .map_err(os)
    }

    /// chmod of what `t` reaches (never through a symlink).
    pub(super) fn chmod_target(&self, t: Target<'_>, mode: u32) -> Result<(), VolumeError> {
        if let Target::Pinned(p) = t {
            // A symlink has no mode of its own (the magic link would reach the symlink).
            if p.kind() == libc::S_IFLNK {
                return Err(VolumeError::errno_of(libc::EOPNOTSUPP));
            }
        }
        match (t.fd(), t) {
            (Some(fd), _) => sys::chmod_fd(fd, mode),
            (None, Target::At(d, n)) => sys::chmod_at(d.fd(), n, mode),
            (None, _) => unreachable!("every other target has a descriptor"),
        }
        .map_err(os)
    }

    /// chown of what `t` reaches (a symlink itself, never its target).
    pub(super) fn chown_target(
        &self,
        t: Target<'_>,
        uid: Option<u32>,
        gid: Option<u32>,
    ) -> Result<(), VolumeError> {
        match (t.fd(), t) {
            (Some(fd), _) => sys::chown_fd(fd, uid, gid),
            (None, Target::At(d, n)) => sys::chown_at(d.fd(), n, uid, gid),
            (None, _) => unreachable!("every other target has a descriptor"),
        }
        .map_err(os)
    }
}
