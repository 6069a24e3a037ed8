//! Whether a volume is mounted now: the one test every command that refuses a mounted volume
//! uses (`volume reencrypt` offline, `fsck --repair`, `upgrade`, a second `mount`, `backup`'s
//! choice between a freeze and the lock).
//!
//! The backing directory is identified by its (device, inode), never by its path alone: a
//! bind mount or another path to the same directory names it differently, and so does a
//! directory renamed since it was mounted (attack session 6, F6: through a `mount --bind`
//! alias, with the lock file swapped by a writer of the backing store, an offline
//! re-encryption and a `fsck --repair` ran beside the live mount). Three sources, first
//! match wins:
//!
//! 1. the run records of the caller's cmkfs home (mountpoint and daemon pid);
//! 2. every cmkfs FUSE mount of this mount namespace (`/proc/self/mountinfo`, type `fuse` or
//!    `fuse.cmkfs`): its source is the backing directory's path at mount time, compared as a
//!    path and by (device, inode): this covers mounts made from any cmkfs home;
//! 3. every process that holds the FUSE device open (a FUSE daemon) and a descriptor of the
//!    backing directory itself (a cmkfs daemon keeps its backing root open for its whole
//!    life): this covers a directory renamed since, whatever its path was.
//!
//! Sources 2 and 3 count only mounts and processes of root or of the backing directory's
//! owner (attack session 8, F2: otherwise any local user could make the volume look
//! mounted).

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::home::Home;
use crate::mount::RunRecord;

/// What [`find_mount`] names as the mountpoint when only the daemon was found (source 3).
pub const UNKNOWN_MOUNTPOINT: &str = "an unknown mountpoint";

/// The mount of the volume at `root` (canonical), if one is live (module docs). Returns the
/// mountpoint and the daemon's pid (0 when unknown; the mountpoint is
/// [`UNKNOWN_MOUNTPOINT`] when only the daemon is known).
pub fn find_mount(root: &Path, home: &Home) -> Option<(PathBuf, u32)> {
    let id = dir_id(root);
    let same = |p: &Path| p == root || (id.is_some() && dir_id(p) == id);
    if let Some(r) = RunRecord::all(home)
        .into_iter()
        .find(|r| r.alive() && same(&r.cipherdir))
    {
        return Some((r.mountpoint, r.pid));
    }
    let owner = dir_owner(root);
    let mounts = fuse_mounts(owner);
    let daemon = || id.and_then(|id| daemon_holding(id, owner));
    if let Some((_, mp)) = mounts
        .iter()
        .find(|(source, _)| source.is_absolute() && same(source))
    {
        return Some((mp.clone(), daemon().map_or(0, |(pid, _)| pid)));
    }
    let (pid, held_as) = daemon()?;
    let mp = mounts
        .into_iter()
        .find(|(source, _)| *source == held_as)
        .map_or_else(|| PathBuf::from(UNKNOWN_MOUNTPOINT), |(_, mp)| mp);
    Some((mp, pid))
}

/// Whether the volume at `root` (canonical) is mounted now, from any cmkfs home: sources 2
/// and 3 of the module docs (no home's run records needed).
pub fn mounted_anywhere(root: &Path) -> bool {
    let Some(id) = dir_id(root) else {
        return false;
    };
    let owner = dir_owner(root);
    fuse_mounts(owner)
        .iter()
        .any(|(source, _)| source == root || (source.is_absolute() && dir_id(source) == Some(id)))
        || daemon_holding(id, owner).is_some()
}

/// The owner of the backing directory `root` (`None` when it cannot be read).
fn dir_owner(root: &Path) -> Option<u32> {
    fs::metadata(root).ok().map(|m| m.uid())
}

/// Whether a mount or daemon of user `uid` may be the volume's: root's, or the backing
/// directory's owner's. Anyone can make a FUSE mount whose source names any directory
/// (`fusermount` takes the source as given) or hold `/dev/fuse` and a descriptor of a
/// directory they may search: counted, that let any local user make `mount`, `fsck
/// --repair`, `volume reencrypt` and `backup` refuse a volume that was not mounted (attack
/// session 8, F2).
fn trusted(uid: u32, owner: Option<u32>) -> bool {
    uid == 0 || Some(uid) == owner
}

/// The FUSE device (character device 10, 229), followed through `/proc/PID/fd/N`: not
/// whatever file has that name in the holder's mount namespace.
fn is_fuse_device(fd: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    fs::metadata(fd)
        .is_ok_and(|m| m.file_type().is_char_device() && m.rdev() == libc::makedev(10, 229))
}

/// A directory's (device, inode), following symlinks.
fn dir_id(p: &Path) -> Option<(u64, u64)> {
    fs::metadata(p)
        .ok()
        .filter(|m| m.is_dir())
        .map(|m| (m.dev(), m.ino()))
}

/// (source, mountpoint) of every mount that may be a cmkfs one: type `fuse` (fuser's own
/// mount passes no subtype to mount(2)) or `fuse.cmkfs`. Other FUSE filesystems (their
/// sources are not cmkfs backing directories, and stat-ing them could wait on a remote
/// server) are left out.
fn fuse_mounts(owner: Option<u32>) -> Vec<(PathBuf, PathBuf)> {
    let Ok(info) = fs::read("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for line in info.split(|b| *b == b'\n') {
        let fields: Vec<&[u8]> = line.split(|b| *b == b' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == b"-") else {
            continue;
        };
        let (Some(fstype), Some(source), Some(mp)) =
            (fields.get(sep + 1), fields.get(sep + 2), fields.get(4))
        else {
            continue;
        };
        // A FUSE mount's super options name its owner (`user_id=`).
        let by_trusted = fields.get(sep + 3).is_some_and(|opts| {
            opts.split(|b| *b == b',').any(|o| {
                o.strip_prefix(b"user_id=")
                    .and_then(|v| std::str::from_utf8(v).ok()?.parse::<u32>().ok())
                    .is_some_and(|uid| trusted(uid, owner))
            })
        });
        if (*fstype == b"fuse" || *fstype == b"fuse.cmkfs") && by_trusted {
            let path = |f: &[u8]| PathBuf::from(OsStr::from_bytes(&unescape_mountinfo(f)));
            out.push((path(source), path(mp)));
        }
    }
    out
}

/// A FUSE daemon (other than this process) holding a descriptor of the directory `id`:
/// its pid and the directory's path as the kernel names it now.
fn daemon_holding(id: (u64, u64), owner: Option<u32>) -> Option<(u32, PathBuf)> {
    let me = std::process::id();
    for proc_ent in fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = proc_ent
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        // The process's owner (its effective uid owns its /proc directory).
        if !fs::metadata(proc_ent.path()).is_ok_and(|m| trusted(m.uid(), owner)) {
            continue;
        }
        let fd_dir = proc_ent.path().join("fd");
        // Unreadable (another user's process, or gone): not ours to judge.
        let Ok(fds) = fs::read_dir(&fd_dir) else {
            continue;
        };
        let links: Vec<(PathBuf, PathBuf)> = fds
            .flatten()
            .filter_map(|e| fs::read_link(e.path()).ok().map(|t| (e.path(), t)))
            .collect();
        if !links
            .iter()
            .any(|(fd, t)| t == Path::new("/dev/fuse") && is_fuse_device(fd))
        {
            continue;
        }
        for (fd, target) in links {
            // Only directories can be the backing root: sockets, pipes and anonymous
            // descriptors have no absolute path.
            if target.is_absolute() && !target.starts_with("/dev") && dir_id(&fd) == Some(id) {
                return Some((pid, target));
            }
        }
    }
    None
}

/// Undoes mountinfo's `\ooo` escapes (space, tab, newline, backslash).
pub(super) fn unescape_mountinfo(f: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(f.len());
    let mut i = 0;
    while i < f.len() {
        if f[i] == b'\\'
            && i + 3 < f.len()
            && f[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((f[i + 1] - b'0') * 64 + (f[i + 2] - b'0') * 8 + (f[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(f[i]);
            i += 1;
        }
    }
    out
}
