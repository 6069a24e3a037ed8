//! Every system call on the backing store, relative to a directory descriptor and ONE name
//! component (what gocryptfs calls `syscallcompat`). This is the one place where backing
//! paths are resolved, so path safety is decided here and nowhere else:
//!
//! - no call takes a path: a name is a single component (no `/`, not `.` or `..`), looked up
//!   in a directory held open by descriptor, so no backing path is ever longer than one name
//!   and a directory renamed by another request is still the same directory;
//! - no symlink is followed: `O_NOFOLLOW` on every open, `AT_SYMLINK_NOFOLLOW` on every
//!   `*at` call, and `l*xattr` on `/proc/self/fd/<dirfd>/<name>` for extended attributes
//!   (the magic link is our own descriptor; the last component is not followed);
//! - nothing but a regular file is ever opened for I/O: an entry is first opened `O_PATH`
//!   (which runs no driver code and cannot block), checked with `fstat`, and only then
//!   reopened for reading or writing through its descriptor — so a FIFO, a device node or a
//!   symlink planted in the backing store is refused before it is touched;
//! - small metadata files are read with a size bound.

use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;

use rustix::fs::{self as rfs, AtFlags, Mode, OFlags, Stat, Timespec, Timestamps};

use crate::fsutil::TEMP_PREFIX;

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

/// Checks that `name` is one path component: not empty, not `.` or `..`, no `/` or NUL.
pub fn component(name: &OsStr) -> io::Result<&OsStr> {
    let b = name.as_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') || b.contains(&0) {
        return Err(errno(libc::EINVAL));
    }
    Ok(name)
}

fn cstr(name: &OsStr) -> io::Result<CString> {
    CString::new(component(name)?.as_bytes()).map_err(|_| errno(libc::EINVAL))
}

/// `/proc/self/fd/<fd>`: the magic link to what `fd` refers to (also an `O_PATH` descriptor,
/// also a file with no name left).
fn proc_fd(fd: BorrowedFd<'_>) -> CString {
    // A number never contains NUL.
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap_or_default()
}

/// `/proc/self/fd/<dirfd>/<name>`: entry `name` of the directory `dirfd`, for calls that
/// have no `*at` form (extended attributes, chmod). Used with the no-follow variants only.
fn proc_at(dirfd: BorrowedFd<'_>, name: &OsStr) -> io::Result<CString> {
    let mut p = format!("/proc/self/fd/{}/", dirfd.as_raw_fd()).into_bytes();
    p.extend_from_slice(component(name)?.as_bytes());
    CString::new(p).map_err(|_| errno(libc::EINVAL))
}

/// Opens the backing root (the one path the user names; it may be a symlink).
pub fn open_root(path: &Path) -> io::Result<OwnedFd> {
    Ok(rfs::open(
        path,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// Opens subdirectory `name` of `dir` as an `O_PATH` descriptor (a symlink is refused:
/// `ELOOP` or `ENOTDIR`).
pub fn open_dir(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<OwnedFd> {
    Ok(rfs::openat(
        dir,
        cstr(name)?.as_c_str(),
        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// A readable descriptor of directory `dir` itself (for listing and fsync).
pub fn open_dir_readable(dir: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    Ok(rfs::openat(
        dir,
        c".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// Opens entry `name` of `dir` without following a symlink or touching a device: `O_PATH`.
pub fn open_path(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<OwnedFd> {
    Ok(rfs::openat(
        dir,
        cstr(name)?.as_c_str(),
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// How [`open_regular`] opens a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Read only.
    Read,
    /// Read and write.
    ReadWrite,
}

/// What a non-regular file is, for error messages.
fn file_kind(mode: u32) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFIFO => "a FIFO",
        libc::S_IFSOCK => "a socket",
        libc::S_IFCHR => "a character device",
        libc::S_IFBLK => "a block device",
        libc::S_IFLNK => "a symlink",
        libc::S_IFDIR => "a directory",
        _ => "not a regular file",
    }
}

/// Opens the regular file `name` in `dir` for I/O. Refuses anything else (`ELOOP` for a
/// symlink, `EIO` for a FIFO, socket or device planted in the backing store) before it is
/// opened for I/O, and, when `expect_ino` is given, a file that is not that inode (`ENOENT`:
/// the name now belongs to something else). Returns the file and its `fstat`.
///
/// Four system calls (`openat` `O_PATH`, `fstat`, `open` of `/proc/self/fd/N`, `close`),
/// the cost of an OPEN (docs/PERFORMANCE.md, "Session 10"). No shorter way keeps the promise
/// that a device node or FIFO in the backing store is never opened, on Linux 6.18:
/// - a direct `openat`/`openat2` (`O_NOFOLLOW | O_NONBLOCK | O_NOCTTY`, `RESOLVE_BENEATH |
///   RESOLVE_NO_MAGICLINKS`) followed by `fstat` and a refusal opens whatever holds the name
///   first: a device driver's `open` runs (a tape drive rewinds at its close, a serial line
///   hangs up, a watchdog arms), and a FIFO's blocked openers are woken. `RESOLVE_*` limit
///   where a path leads, not what kind of inode is opened; the kernel has no `O_REGULAR`;
/// - checking first by name (`fstatat`, or the inode the node table knows) and then opening
///   the name leaves a window in which whoever can write the backing directory renames a
///   device node or FIFO over it;
/// - a `nodev` backing mount refuses devices in `may_open` before the driver is reached, but
///   neither FIFOs nor a backing directory on a mount without `nodev`.
///
/// The `O_PATH` descriptor opens nothing (no driver call, no FIFO side); its `fstat` says
/// what the inode is, and the reopen through its magic link reaches that inode and no other.
pub fn open_regular(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    access: Access,
    expect_ino: Option<u64>,
) -> io::Result<(File, Stat)> {
    regular_from_path(open_path(dir, name)?, access, expect_ino)
}

/// Opens the regular file at `path` for I/O, for tools that walk the backing store by path
/// (`fsck`, `upgrade`) and for the volume header: the last component is never followed
/// (`ELOOP`), and a FIFO, socket or device is refused before it is opened for I/O, like
/// [`open_regular`]. Components before the last are resolved as usual (the caller named
/// them, or walked them as directories).
pub fn open_regular_path(path: &Path, access: Access) -> io::Result<(File, Stat)> {
    let fd = rfs::open(
        path,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    regular_from_path(fd, access, None)
}

/// The checks of [`open_regular`] on an `O_PATH` descriptor, then the reopen for I/O.
fn regular_from_path(
    path: OwnedFd,
    access: Access,
    expect_ino: Option<u64>,
) -> io::Result<(File, Stat)> {
    let st = rfs::fstat(&path)?;
    let fmt = st.st_mode & libc::S_IFMT;
    if fmt == libc::S_IFLNK {
        return Err(errno(libc::ELOOP));
    }
    if fmt == libc::S_IFDIR {
        return Err(errno(libc::EISDIR));
    }
    if fmt != libc::S_IFREG {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "backing entry is {} where a regular file was expected",
                file_kind(st.st_mode)
            ),
        ));
    }
    if expect_ino.is_some_and(|i| i != st.st_ino) {
        return Err(errno(libc::ENOENT));
    }
    let flags = match access {
        Access::Read => OFlags::RDONLY,
        Access::ReadWrite => OFlags::RDWR,
    };
    // Reopening the O_PATH descriptor through its magic link opens exactly that inode (a
    // regular file: O_NONBLOCK changes nothing for it, and guards the reopen all the same).
    let fd = rfs::open(
        proc_fd(path.as_fd()).as_c_str(),
        flags | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK,
        Mode::empty(),
    )?;
    Ok((File::from(fd), st))
}

/// Opens what `fd` refers to (an open file, also one with no name left) again, as a new
/// open file description.
pub fn reopen(fd: BorrowedFd<'_>, access: Access) -> io::Result<File> {
    let flags = match access {
        Access::Read => OFlags::RDONLY,
        Access::ReadWrite => OFlags::RDWR,
    };
    let fd = rfs::open(
        proc_fd(fd).as_c_str(),
        flags | OFlags::CLOEXEC | OFlags::NOCTTY,
        Mode::empty(),
    )?;
    Ok(File::from(fd))
}

/// Opens the file behind `fd` again, read-only with `O_DIRECT` (a second open file
/// description, so buffered I/O through `fd` is unaffected). `EINVAL`: the filesystem does
/// not do direct I/O.
pub fn reopen_direct(fd: BorrowedFd<'_>) -> io::Result<File> {
    let fd = rfs::open(
        proc_fd(fd).as_c_str(),
        OFlags::RDONLY | OFlags::DIRECT | OFlags::CLOEXEC | OFlags::NOCTTY,
        Mode::empty(),
    )?;
    Ok(File::from(fd))
}

/// Creates regular file `name` in `dir` (`O_EXCL`: never opens an existing entry) with
/// `mode`, open for reading and writing.
pub fn create_regular(dir: BorrowedFd<'_>, name: &OsStr, mode: u32) -> io::Result<File> {
    let fd = rfs::openat(
        dir,
        cstr(name)?.as_c_str(),
        OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(mode & 0o7777),
    )?;
    Ok(File::from(fd))
}

/// Reads the small regular file `name` in `dir`: at most `max` bytes, else `EFBIG`. Refuses
/// symlinks, FIFOs and devices like [`open_regular`].
pub fn read_small(dir: BorrowedFd<'_>, name: &OsStr, max: usize) -> io::Result<Vec<u8>> {
    let (f, st) = open_regular(dir, name, Access::Read, None)?;
    read_bounded_file(f, &st, max)
}

/// Reads the regular file at `path` with the rules of [`open_regular_path`]: at most `max`
/// bytes, else `EFBIG` (a file that grows while read is cut at `max + 1` and refused). The
/// one reader of backing-store files that tools reach by path: nothing it is given can block
/// it (a FIFO), send it elsewhere (a symlink) or make it allocate more than `max` bytes
/// (`/dev/zero`, a huge file).
pub fn read_bounded(path: &Path, max: usize) -> io::Result<Vec<u8>> {
    let (f, st) = open_regular_path(path, Access::Read)?;
    read_bounded_file(f, &st, max)
}

fn read_bounded_file(f: File, st: &Stat, max: usize) -> io::Result<Vec<u8>> {
    if st.st_size as u64 > max as u64 {
        return Err(errno(libc::EFBIG));
    }
    let mut buf = Vec::with_capacity((st.st_size as usize).min(max) + 1);
    f.take(max as u64 + 1).read_to_end(&mut buf)?;
    if buf.len() > max {
        return Err(errno(libc::EFBIG));
    }
    Ok(buf)
}

/// Writes a new file `name` in `dir` that must not exist, and fsyncs it (not the directory).
pub fn write_new(dir: BorrowedFd<'_>, name: &OsStr, bytes: &[u8], mode: u32) -> io::Result<()> {
    write_new_then(dir, name, bytes, mode, File::sync_all)
}

/// [`write_new`] with `settle` instead of the fsync (e.g. [`written_back`]); the file is
/// removed again when writing or `settle` fails.
pub fn write_new_then(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    bytes: &[u8],
    mode: u32,
    settle: fn(&File) -> io::Result<()>,
) -> io::Result<()> {
    let mut f = create_regular(dir, name, mode)?;
    let r = f.write_all(bytes).and_then(|()| settle(&f));
    if r.is_err() {
        let _ = unlink(dir, name);
    }
    r
}

/// Writes the dirty pages of `f` back and waits until that write-back has ended
/// (`sync_file_range(fd, 0, 0, WAIT_BEFORE | WRITE | WAIT_AFTER)`): the bytes have reached
/// the device, which may still hold them in its volatile cache, and the filesystem's own
/// updates that placed them are done; no journal commit, no cache flush. A write-back error
/// is reported as `fsync` reports it. Alone this makes nothing durable: see
/// `volume::idsync` for the one place it is enough.
pub fn written_back(f: &File) -> io::Result<()> {
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // SAFETY: a system call on a descriptor `f` holds open; no memory is passed.
    if unsafe { libc::sync_file_range(f.as_raw_fd(), 0, 0, flags) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The filesystem type (`f_type` of `fstatfs`, e.g. `0xEF53` for ext2/3/4) holding `fd`.
pub fn fs_magic(fd: BorrowedFd<'_>) -> io::Result<i64> {
    Ok(rfs::fstatfs(fd)?.f_type as i64)
}

/// Replaces `name` in `dir` with `bytes` atomically: a temp file beside it, fsync, rename
/// over the name, fsync the directory. A crash leaves the old or the new content.
pub fn write_atomic(dir: BorrowedFd<'_>, name: &OsStr, bytes: &[u8], mode: u32) -> io::Result<()> {
    write_atomic_then(dir, name, bytes, mode, &mut || ())
}

/// [`write_atomic`], calling `changed` right after each change of the directory (the temp
/// file created, then renamed into place), before the fsyncs: what it changes in the
/// directory's own inode (its times, set back) is made durable with the rename, and a kill
/// between a change and the call has a few instructions to land in, not an fsync.
pub fn write_atomic_then(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    bytes: &[u8],
    mode: u32,
    changed: &mut dyn FnMut(),
) -> io::Result<()> {
    let tmp = temp_name(&name.to_string_lossy())?;
    let mut f = create_regular(dir, &tmp, mode)?;
    changed();
    let r = f
        .write_all(bytes)
        .and_then(|()| f.sync_all())
        .and_then(|()| rename(dir, &tmp, dir, name, 0))
        .and_then(|()| {
            changed();
            fsync_dir(dir)
        });
    if r.is_err() {
        let _ = unlink(dir, &tmp);
    }
    r
}

/// A fresh hidden temp name `.cmkfs-tmp.<what>.<random>` (fsck knows the prefix).
pub fn temp_name(what: &str) -> io::Result<OsString> {
    let mut rnd = [0u8; 8];
    super::idrand::fill(&mut rnd).map_err(io::Error::other)?;
    Ok(format!("{TEMP_PREFIX}{what}.{}", hex::encode(rnd)).into())
}

/// fsyncs directory `dir` (renames and creations inside it become durable).
pub fn fsync_dir(dir: BorrowedFd<'_>) -> io::Result<()> {
    Ok(rfs::fsync(open_dir_readable(dir)?)?)
}

/// The directory at relative path `rel` below `root`, reached one component at a time with
/// [`open_dir`] (`O_PATH|O_NOFOLLOW`): a symlink anywhere on the way is refused (`ELOOP` or
/// `ENOTDIR`), never followed, and `rel` must be relative and hold no `..` (`EINVAL`), so
/// the result is always inside `root`. For tools that walk the backing tree and come back to
/// an entry later by its relative path (`upgrade`).
pub fn open_dir_beneath(root: BorrowedFd<'_>, rel: &Path) -> io::Result<OwnedFd> {
    let mut dir = rfs::openat(
        root,
        c".",
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    for c in rel.components() {
        match c {
            std::path::Component::Normal(name) => dir = open_dir(dir.as_fd(), name)?,
            std::path::Component::CurDir => {}
            _ => return Err(errno(libc::EINVAL)),
        }
    }
    Ok(dir)
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`.
pub fn stat_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<Stat> {
    Ok(rfs::statat(
        dir,
        cstr(name)?.as_c_str(),
        AtFlags::SYMLINK_NOFOLLOW,
    )?)
}

/// `fstat` of any descriptor (`O_PATH` ones too).
pub fn fstat(fd: BorrowedFd<'_>) -> io::Result<Stat> {
    Ok(rfs::fstat(fd)?)
}

/// `mkdirat`.
pub fn mkdir(dir: BorrowedFd<'_>, name: &OsStr, mode: u32) -> io::Result<()> {
    Ok(rfs::mkdirat(
        dir,
        cstr(name)?.as_c_str(),
        Mode::from_raw_mode(mode & 0o7777),
    )?)
}

/// `unlinkat` of a non-directory.
pub fn unlink(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    Ok(rfs::unlinkat(
        dir,
        cstr(name)?.as_c_str(),
        AtFlags::empty(),
    )?)
}

/// `unlinkat(AT_REMOVEDIR)`.
pub fn rmdir(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    Ok(rfs::unlinkat(
        dir,
        cstr(name)?.as_c_str(),
        AtFlags::REMOVEDIR,
    )?)
}

/// `renameat2` with raw flags (`RENAME_NOREPLACE`, `RENAME_EXCHANGE`).
pub fn rename(
    from_dir: BorrowedFd<'_>,
    from: &OsStr,
    to_dir: BorrowedFd<'_>,
    to: &OsStr,
    flags: u32,
) -> io::Result<()> {
    let flags = rfs::RenameFlags::from_bits(flags).ok_or_else(|| errno(libc::EINVAL))?;
    Ok(rfs::renameat_with(
        from_dir,
        cstr(from)?.as_c_str(),
        to_dir,
        cstr(to)?.as_c_str(),
        flags,
    )?)
}

/// `symlinkat(target, dir, name)`; the target is stored as given (never resolved by us).
pub fn symlink(target: &[u8], dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    let t = CString::new(target).map_err(|_| errno(libc::EINVAL))?;
    Ok(rfs::symlinkat(t.as_c_str(), dir, cstr(name)?.as_c_str())?)
}

/// `readlinkat`: the stored target bytes of symlink `name`.
pub fn readlink(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<Vec<u8>> {
    Ok(rfs::readlinkat(dir, cstr(name)?.as_c_str(), Vec::new())?.into_bytes())
}

/// `linkat` without following a symlink at `from` (a link to a symlink links the symlink).
pub fn link(
    from_dir: BorrowedFd<'_>,
    from: &OsStr,
    to_dir: BorrowedFd<'_>,
    to: &OsStr,
) -> io::Result<()> {
    Ok(rfs::linkat(
        from_dir,
        cstr(from)?.as_c_str(),
        to_dir,
        cstr(to)?.as_c_str(),
        AtFlags::empty(),
    )?)
}

/// `mknodat` with a full mode (type bits included) and a device number.
pub fn mknod(dir: BorrowedFd<'_>, name: &OsStr, mode: u32, rdev: u64) -> io::Result<()> {
    let c = cstr(name)?;
    // SAFETY: a valid descriptor and C string; mknodat is a plain system call.
    let r = unsafe {
        libc::mknodat(
            dir.as_raw_fd(),
            c.as_ptr(),
            mode as libc::mode_t,
            rdev as libc::dev_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `fchownat(AT_SYMLINK_NOFOLLOW)`; `None` leaves an id unchanged.
pub fn chown_at(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    uid: Option<u32>,
    gid: Option<u32>,
) -> io::Result<()> {
    Ok(rfs::chownat(
        dir,
        cstr(name)?.as_c_str(),
        uid.map(rfs::Uid::from_raw_unchecked),
        gid.map(rfs::Gid::from_raw_unchecked),
        AtFlags::SYMLINK_NOFOLLOW,
    )?)
}

/// Changes the owner of what `fd` refers to (`O_PATH` descriptors too).
pub fn chown_fd(fd: BorrowedFd<'_>, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
    Ok(rfs::chownat(
        fd,
        c"",
        uid.map(rfs::Uid::from_raw_unchecked),
        gid.map(rfs::Gid::from_raw_unchecked),
        AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
    )?)
}

/// chmod of entry `name` without following a symlink: `fchmodat2(AT_SYMLINK_NOFOLLOW)`, or on
/// kernels without it (before 6.6) `O_PATH`, check, chmod through the magic link. A symlink
/// has no mode of its own: `EOPNOTSUPP`.
pub fn chmod_at(dir: BorrowedFd<'_>, name: &OsStr, mode: u32) -> io::Result<()> {
    let c = cstr(name)?;
    // SAFETY: valid descriptor and C string; an unknown syscall number just fails ENOSYS.
    let r = unsafe {
        libc::syscall(
            libc::SYS_fchmodat2,
            dir.as_raw_fd(),
            c.as_ptr(),
            (mode & 0o7777) as libc::c_uint,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::ENOSYS) {
        return Err(err);
    }
    let fd = open_path(dir, name)?;
    if rfs::fstat(&fd)?.st_mode & libc::S_IFMT == libc::S_IFLNK {
        return Err(errno(libc::EOPNOTSUPP));
    }
    chmod_fd(fd.as_fd(), mode)
}

/// chmod of what `fd` refers to (`O_PATH` descriptors too, never a symlink's target: an
/// `O_PATH|O_NOFOLLOW` descriptor of a symlink is refused above).
pub fn chmod_fd(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    Ok(rfs::chmod(
        proc_fd(fd).as_c_str(),
        Mode::from_raw_mode(mode & 0o7777),
    )?)
}

/// Timestamps for `utimensat`: `None` keeps a time, `Some(None)` sets it to now.
pub type Times = [Option<Option<(i64, u32)>>; 2];

fn timestamps(t: &Times) -> Timestamps {
    let one = |x: &Option<Option<(i64, u32)>>| match x {
        None => Timespec {
            tv_sec: 0,
            tv_nsec: rfs::UTIME_OMIT,
        },
        Some(None) => Timespec {
            tv_sec: 0,
            tv_nsec: rfs::UTIME_NOW,
        },
        Some(Some((s, ns))) => Timespec {
            tv_sec: *s,
            tv_nsec: *ns as _,
        },
    };
    Timestamps {
        last_access: one(&t[0]),
        last_modification: one(&t[1]),
    }
}

/// `utimensat(AT_SYMLINK_NOFOLLOW)` of entry `name`.
pub fn utimens_at(dir: BorrowedFd<'_>, name: &OsStr, t: &Times) -> io::Result<()> {
    Ok(rfs::utimensat(
        dir,
        cstr(name)?.as_c_str(),
        &timestamps(t),
        AtFlags::SYMLINK_NOFOLLOW,
    )?)
}

/// Asks that reads through `fd` leave the file's access time alone (`O_NOATIME`, set with
/// `fcntl`); `true` when the kernel took it (the file's owner or a process with
/// `CAP_FOWNER`; for anyone else reads move atime as usual).
pub fn no_atime(fd: BorrowedFd<'_>) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: fcntl on a valid descriptor with integer arguments only.
    unsafe {
        let fl = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        fl >= 0 && libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NOATIME) == 0
    }
}

/// The access and modification times of `st`, to set them back with [`utimens_fd`] or
/// [`utimens_at`] (work done behind the user's back, a re-encryption, keeps them).
pub fn times_of(st: &Stat) -> Times {
    [
        Some(Some((st.st_atime, st.st_atime_nsec as u32))),
        Some(Some((st.st_mtime, st.st_mtime_nsec as u32))),
    ]
}

/// Sets the times of what `fd` refers to (`O_PATH` descriptors too).
pub fn utimens_fd(fd: BorrowedFd<'_>, t: &Times) -> io::Result<()> {
    Ok(rfs::utimensat(
        rustix::fs::CWD,
        proc_fd(fd).as_c_str(),
        &timestamps(t),
        AtFlags::empty(),
    )?)
}

/// Space figures of the filesystem holding `fd`.
pub fn statvfs(fd: BorrowedFd<'_>) -> io::Result<rfs::StatVfs> {
    Ok(rfs::fstatvfs(fd)?)
}

/// One entry of a backing directory listing.
pub struct RawEntry {
    /// Backing name.
    pub name: OsString,
    /// Whether it is a directory (from the listing's `d_type`; `None` when unknown).
    pub is_dir: Option<bool>,
    /// Inode number (the listing's `d_ino`).
    pub ino: u64,
    /// Type bits (`S_IFMT`) from the listing's `d_type`; `None` when unknown.
    pub kind: Option<u32>,
}

/// Lists directory `dir` (without `.` and `..`).
pub fn list(dir: BorrowedFd<'_>) -> io::Result<Vec<RawEntry>> {
    let mut d = rfs::Dir::new(open_dir_readable(dir)?)?;
    let mut out = Vec::new();
    while let Some(ent) = d.read() {
        let ent = ent?;
        let name = ent.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        let kind = match ent.file_type() {
            rfs::FileType::RegularFile => Some(libc::S_IFREG),
            rfs::FileType::Directory => Some(libc::S_IFDIR),
            rfs::FileType::Symlink => Some(libc::S_IFLNK),
            rfs::FileType::Fifo => Some(libc::S_IFIFO),
            rfs::FileType::Socket => Some(libc::S_IFSOCK),
            rfs::FileType::CharacterDevice => Some(libc::S_IFCHR),
            rfs::FileType::BlockDevice => Some(libc::S_IFBLK),
            _ => None,
        };
        out.push(RawEntry {
            name: OsString::from_vec(name.to_vec()),
            is_dir: kind.map(|k| k == libc::S_IFDIR),
            ino: ent.ino(),
            kind,
        });
    }
    Ok(out)
}

/// Where an extended-attribute call goes.
#[derive(Clone, Copy)]
pub enum XTarget<'a> {
    /// Entry `name` of directory descriptor `dir` (not followed if it is a symlink).
    At(BorrowedFd<'a>, &'a OsStr),
    /// What a descriptor refers to: an open file, or a directory's `O_PATH` descriptor.
    Fd(BorrowedFd<'a>),
}

enum XPath {
    NoFollow(CString),
    Magic(CString),
}

impl XTarget<'_> {
    fn path(&self) -> io::Result<XPath> {
        Ok(match self {
            XTarget::At(dir, name) => XPath::NoFollow(proc_at(*dir, name)?),
            // `f*xattr` refuses O_PATH descriptors; the magic link leads to the same inode.
            XTarget::Fd(fd) => XPath::Magic(proc_fd(*fd)),
        })
    }
}

/// `getxattr`: the whole value (asks again if it grows between the size query and the read).
pub fn get_xattr(t: XTarget<'_>, name: &OsStr) -> io::Result<Vec<u8>> {
    let n = CString::new(name.as_bytes()).map_err(|_| errno(libc::EINVAL))?;
    let p = t.path()?;
    loop {
        let size = match &p {
            XPath::NoFollow(p) => rfs::lgetxattr_query(p.as_c_str(), n.as_c_str())?,
            XPath::Magic(p) => rfs::getxattr_query(p.as_c_str(), n.as_c_str())?,
        };
        let mut buf = vec![0u8; size];
        let got = match &p {
            XPath::NoFollow(p) => rfs::lgetxattr(p.as_c_str(), n.as_c_str(), &mut buf[..]),
            XPath::Magic(p) => rfs::getxattr(p.as_c_str(), n.as_c_str(), &mut buf[..]),
        };
        match got {
            Ok(len) => {
                buf.truncate(len);
                return Ok(buf);
            }
            Err(rustix::io::Errno::RANGE) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// `setxattr` with `XATTR_CREATE` / `XATTR_REPLACE` flags.
pub fn set_xattr(t: XTarget<'_>, name: &OsStr, value: &[u8], flags: i32) -> io::Result<()> {
    let n = CString::new(name.as_bytes()).map_err(|_| errno(libc::EINVAL))?;
    let f = rfs::XattrFlags::from_bits(flags as _).ok_or_else(|| errno(libc::EINVAL))?;
    Ok(match t.path()? {
        XPath::NoFollow(p) => rfs::lsetxattr(p.as_c_str(), n.as_c_str(), value, f),
        XPath::Magic(p) => rfs::setxattr(p.as_c_str(), n.as_c_str(), value, f),
    }?)
}

/// `removexattr`.
pub fn remove_xattr(t: XTarget<'_>, name: &OsStr) -> io::Result<()> {
    let n = CString::new(name.as_bytes()).map_err(|_| errno(libc::EINVAL))?;
    Ok(match t.path()? {
        XPath::NoFollow(p) => rfs::lremovexattr(p.as_c_str(), n.as_c_str()),
        XPath::Magic(p) => rfs::removexattr(p.as_c_str(), n.as_c_str()),
    }?)
}

/// `listxattr`: every backing attribute name.
pub fn list_xattr(t: XTarget<'_>) -> io::Result<Vec<OsString>> {
    let p = t.path()?;
    loop {
        let size = match &p {
            XPath::NoFollow(p) => rfs::llistxattr_query(p.as_c_str())?,
            XPath::Magic(p) => rfs::listxattr_query(p.as_c_str())?,
        };
        let mut buf = vec![0u8; size];
        let got = match &p {
            XPath::NoFollow(p) => rfs::llistxattr(p.as_c_str(), &mut buf[..]),
            XPath::Magic(p) => rfs::listxattr(p.as_c_str(), &mut buf[..]),
        };
        match got {
            Ok(len) => {
                buf.truncate(len);
                return Ok(buf
                    .split(|b| *b == 0)
                    .filter(|n| !n.is_empty())
                    .map(|n| OsString::from_vec(n.to_vec()))
                    .collect());
            }
            Err(rustix::io::Errno::RANGE) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink as std_symlink;

    fn root(d: &tempfile::TempDir) -> OwnedFd {
        open_root(d.path()).unwrap()
    }

    #[test]
    fn names_are_single_components() {
        for bad in ["", ".", "..", "a/b", "/abs"] {
            assert_eq!(
                component(OsStr::new(bad)).unwrap_err().raw_os_error(),
                Some(libc::EINVAL),
                "{bad:?}"
            );
        }
        assert!(component(OsStr::new("a.b")).is_ok());
    }

    #[test]
    fn symlinks_fifos_and_big_files_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"outside").unwrap();
        std_symlink(outside.path().join("secret"), d.path().join("link")).unwrap();
        std_symlink(outside.path(), d.path().join("dirlink")).unwrap();
        let fifo = CString::new(d.path().join("fifo").as_os_str().as_bytes()).unwrap();
        // SAFETY: valid C path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        std::fs::write(d.path().join("big"), vec![7u8; 100]).unwrap();
        let r = root(&d);
        fn e<T>(r: io::Result<T>) -> io::Error {
            r.map(|_| ()).unwrap_err()
        }
        assert_eq!(
            e(open_regular(
                r.as_fd(),
                OsStr::new("link"),
                Access::ReadWrite,
                None
            ))
            .raw_os_error(),
            Some(libc::ELOOP)
        );
        assert!(open_dir(r.as_fd(), OsStr::new("dirlink")).is_err());
        // A FIFO is refused without blocking (an O_RDONLY open of a FIFO would).
        assert_eq!(
            e(read_small(r.as_fd(), OsStr::new("fifo"), 16)).kind(),
            io::ErrorKind::InvalidData
        );
        assert_eq!(
            e(read_small(r.as_fd(), OsStr::new("big"), 16)).raw_os_error(),
            Some(libc::EFBIG)
        );
        assert_eq!(
            read_small(r.as_fd(), OsStr::new("big"), 100).unwrap().len(),
            100
        );
        // Writes through the link never reach the outside file.
        assert!(write_atomic(r.as_fd(), OsStr::new("link"), b"x", 0o600).is_ok());
        assert_eq!(
            std::fs::read(outside.path().join("secret")).unwrap(),
            b"outside"
        );
        // chmod / chown / xattrs of a symlink never touch its target.
        std_symlink(outside.path().join("secret"), d.path().join("link2")).unwrap();
        let before = std::fs::metadata(outside.path().join("secret")).unwrap();
        let _ = chmod_at(r.as_fd(), OsStr::new("link2"), 0o777);
        let after = std::fs::metadata(outside.path().join("secret")).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&before.permissions()),
            std::os::unix::fs::PermissionsExt::mode(&after.permissions())
        );
        assert!(set_xattr(
            XTarget::At(r.as_fd(), OsStr::new("link2")),
            OsStr::new("user.x"),
            b"v",
            0
        )
        .is_err());
    }

    #[test]
    fn entries_are_reached_by_descriptor_after_a_parent_rename() {
        let d = tempfile::tempdir().unwrap();
        let r = root(&d);
        mkdir(r.as_fd(), OsStr::new("a"), 0o755).unwrap();
        let a = open_dir(r.as_fd(), OsStr::new("a")).unwrap();
        write_new(a.as_fd(), OsStr::new("f"), b"hello", 0o644).unwrap();
        rename(r.as_fd(), OsStr::new("a"), r.as_fd(), OsStr::new("b"), 0).unwrap();
        assert_eq!(
            read_small(a.as_fd(), OsStr::new("f"), 10).unwrap(),
            b"hello"
        );
        set_xattr(XTarget::Fd(a.as_fd()), OsStr::new("user.k"), b"v", 0).unwrap();
        assert_eq!(
            get_xattr(
                XTarget::At(r.as_fd(), OsStr::new("b")),
                OsStr::new("user.k")
            )
            .unwrap(),
            b"v"
        );
        let names: Vec<_> = list(a.as_fd())
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(names, vec![OsString::from("f")]);
    }
}
