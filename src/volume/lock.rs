//! The volume lock: an advisory `flock(2)` on [`LOCK_FILE`] in the backing directory, so that
//! a format upgrade never runs while the volume is mounted or being rewrapped.
//!
//! * Mounts and header rewraps hold it **shared**: several can run at once, as before.
//! * `cmkfs upgrade` (and a mount that converts an old volume first, or `fsck --repair`) holds
//!   it **exclusive**.
//!
//! The lock goes away with the process that holds it, crash included. It is taken on a file
//! that only the volume's owner can open (0600, created on demand with `O_EXCL|O_NOFOLLOW`,
//! refused unless it is a regular file owned by the caller): an `flock` needs nothing but an
//! open descriptor, so locking the backing directory itself (0755), as cmkfs did before, let
//! any local user hold it and block mounts, upgrades and header updates. Only where the file
//! cannot be created (a read-only backing store, on which nothing can be upgraded or rewrapped
//! anyway) is the directory locked as before. A volume mounted by a cmkfs older than the lock
//! file is not seen by it; callers that need certainty also look at the mount table
//! ([`crate::fsck::find_mount`]).

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::sys::{self, Access};

/// The lock file in the backing root (0600, empty; hidden from the plaintext view like every
/// name with a `.`).
pub const LOCK_FILE: &str = "cmkfs.lock";

/// Why the lock could not be had.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Someone holds it in a conflicting mode.
    #[error("{} is in use{holders}: {what}", .dir.display())]
    Busy {
        /// The backing directory.
        dir: PathBuf,
        /// Who presumably holds it, in words.
        what: &'static str,
        /// The holders found in `/proc/locks` (" (held by PID 12 `cmkfs`)"), or empty.
        holders: String,
    },
    /// The lock file is not one only the caller can open: refused, never used.
    #[error("{}: {why}", .path.display())]
    Untrusted {
        /// The lock file.
        path: PathBuf,
        /// What is wrong with it and what to do.
        why: String,
    },
    /// The directory or the lock file could not be opened or locked.
    #[error("locking {}: {error}", .dir.display())]
    Io {
        /// The backing directory.
        dir: PathBuf,
        /// The error.
        error: io::Error,
    },
}

/// A held volume lock; released on drop.
#[derive(Debug)]
pub struct VolumeLock {
    file: File,
    path: PathBuf,
    exclusive: bool,
}

const BUSY_EXCLUSIVE: &str =
    "it is mounted, or a header update or `cmkfs upgrade` of it is running (unmount it, or wait \
     for the other command to finish)";
const BUSY_SHARED: &str = "a command that needs it alone (`cmkfs volume reencrypt`, `cmkfs \
     upgrade`, `cmkfs restore` or `fsck --repair`) is working on it; wait for it to finish";

impl VolumeLock {
    /// Takes the lock shared (mounts, rewraps) without waiting.
    pub fn shared(dir: &Path) -> Result<VolumeLock, LockError> {
        VolumeLock::take(dir, false)
    }

    /// Takes the lock exclusive (upgrade, repair) without waiting.
    pub fn exclusive(dir: &Path) -> Result<VolumeLock, LockError> {
        VolumeLock::take(dir, true)
    }

    /// Takes the lock shared, waiting up to `limit` for an exclusive holder to finish.
    pub fn shared_wait(dir: &Path, limit: Duration) -> Result<VolumeLock, LockError> {
        let deadline = Instant::now() + limit;
        loop {
            match VolumeLock::shared(dir) {
                Err(LockError::Busy { .. }) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                other => return other,
            }
        }
    }

    fn take(dir: &Path, exclusive: bool) -> Result<VolumeLock, LockError> {
        let io_err = |error| LockError::Io {
            dir: dir.to_path_buf(),
            error,
        };
        let f = open_lock_file(dir)?;
        let op = if exclusive {
            libc::LOCK_EX
        } else {
            libc::LOCK_SH
        };
        flock(&f, op | libc::LOCK_NB).map_err(|e| match e.raw_os_error() {
            Some(libc::EWOULDBLOCK) => LockError::Busy {
                dir: dir.to_path_buf(),
                what: if exclusive {
                    BUSY_EXCLUSIVE
                } else {
                    BUSY_SHARED
                },
                holders: holders(&f),
            },
            _ => io_err(e),
        })?;
        Ok(VolumeLock {
            file: f,
            path: dir.to_path_buf(),
            exclusive,
        })
    }

    /// Whether this lock is held exclusive.
    pub fn is_exclusive(&self) -> bool {
        self.exclusive
    }

    /// Turns an exclusive lock into a shared one (after an upgrade, before serving). Not
    /// atomic in flock(2): another process may take the lock in between, which is harmless
    /// here (an upgrade then finds nothing to do, a mount shares).
    pub fn downgrade(&mut self) -> Result<(), LockError> {
        flock(&self.file, libc::LOCK_SH).map_err(|error| LockError::Io {
            dir: self.path.clone(),
            error,
        })?;
        self.exclusive = false;
        Ok(())
    }
}

/// Opens (creating it if needed) the lock file of the volume in `dir`: a regular file owned by
/// the caller and open to nobody else. Falls back to the directory itself only where the file
/// cannot be created because the backing store is read-only.
fn open_lock_file(dir: &Path) -> Result<File, LockError> {
    let io_err = |error| LockError::Io {
        dir: dir.to_path_buf(),
        error,
    };
    let path = dir.join(LOCK_FILE);
    let root = sys::open_root(dir).map_err(io_err)?;
    let name = std::ffi::OsStr::new(LOCK_FILE);
    let (file, st) = loop {
        match sys::open_regular(root.as_fd(), name, Access::ReadWrite, None) {
            Ok(f) => break f,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                let dir_before = sys::fstat(root.as_fd()).map_err(io_err)?;
                match sys::create_regular(root.as_fd(), name, 0o600) {
                    Ok(f) => {
                        // The backing root's mtime is the plaintext root's: a hidden lock file
                        // appearing (the first lock of a volume) must not show as a change.
                        let mtime = (dir_before.st_mtime as i64, dir_before.st_mtime_nsec as u32);
                        if let Err(e) = sys::utimens_fd(root.as_fd(), &[None, Some(Some(mtime))]) {
                            tracing::debug!(error = %e, "could not keep the backing root's mtime");
                        }
                        let st = sys::fstat(f.as_fd()).map_err(io_err)?;
                        break (f, st);
                    }
                    // Another process created it meanwhile: open theirs.
                    Err(e) if e.raw_os_error() == Some(libc::EEXIST) => continue,
                    Err(e) if e.raw_os_error() == Some(libc::EROFS) => {
                        // Nothing can change a read-only store: lock the directory.
                        return File::open(dir).map_err(io_err);
                    }
                    Err(e) => return Err(io_err(e)),
                }
            }
            // A read-only store: an existing lock file is locked read-only.
            Err(e) if e.raw_os_error() == Some(libc::EROFS) => {
                break sys::open_regular(root.as_fd(), name, Access::Read, None)
                    .map_err(|e| untrusted_or_io(dir, &path, e))?
            }
            Err(e) => return Err(untrusted_or_io(dir, &path, e)),
        }
    };
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if st.st_uid != me {
        return Err(LockError::Untrusted {
            path,
            why: format!(
                "the volume lock file is owned by uid {}, not by you (uid {me}), so another \
                 user could hold the lock; if the backing directory is yours, remove the file \
                 (cmkfs creates a new one)",
                st.st_uid
            ),
        });
    }
    if st.st_mode & 0o077 != 0 {
        // Ours, but others could open it (and so flock it): close it to them.
        sys::chmod_fd(file.as_fd(), 0o600).map_err(io_err)?;
    }
    Ok(file)
}

fn untrusted_or_io(dir: &Path, path: &Path, e: io::Error) -> LockError {
    match e.raw_os_error() {
        Some(libc::ELOOP) | Some(libc::EISDIR) | None => LockError::Untrusted {
            path: path.to_path_buf(),
            why: format!(
                "the volume lock file is not a regular file ({e}); if the backing directory is \
                 yours, remove it (cmkfs creates a new one)"
            ),
        },
        _ => LockError::Io {
            dir: dir.to_path_buf(),
            error: e,
        },
    }
}

/// Who holds an `flock` on the file of `f`, from `/proc/locks` (its PIDs and their command
/// names), as " (held by PID 12 `cmkfs`)"; empty when nobody can be named.
fn holders(f: &File) -> String {
    let Ok(st) = sys::fstat(f.as_fd()) else {
        return String::new();
    };
    let Ok(locks) = std::fs::read_to_string("/proc/locks") else {
        return String::new();
    };
    let pids = lock_holders(&locks, st.st_dev, st.st_ino);
    if pids.is_empty() {
        return String::new();
    }
    let named: Vec<String> = pids
        .iter()
        .map(
            |pid| match std::fs::read_to_string(format!("/proc/{pid}/comm")) {
                Ok(c) => format!("{pid} `{}`", c.trim_end()),
                Err(_) => pid.to_string(),
            },
        )
        .collect();
    format!(
        " (held by PID{} {})",
        if named.len() > 1 { "s" } else { "" },
        named.join(", ")
    )
}

/// The PIDs `/proc/locks` names as holders (not waiters) of an `flock` on inode `ino` of
/// device `dev`, this process excluded.
fn lock_holders(locks: &str, dev: u64, ino: u64) -> Vec<u32> {
    // The kernel prints the device as "%02x:%02x" of its major and minor numbers.
    let want = format!(
        "{:02x}:{:02x}:{ino}",
        libc::major(dev as libc::dev_t),
        libc::minor(dev as libc::dev_t)
    );
    let me = std::process::id();
    let mut pids: Vec<u32> = locks
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // "1: FLOCK ADVISORY WRITE 1234 fe:00:5678 0 EOF"; waiters have "->" after "1:".
            if f.get(1) != Some(&"FLOCK") || f.get(5) != Some(&want.as_str()) {
                return None;
            }
            f.get(4)?.parse().ok()
        })
        .filter(|p| *p != me)
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

fn flock(f: &File, op: i32) -> io::Result<()> {
    loop {
        // SAFETY: flock on a valid descriptor; no memory is passed.
        if unsafe { libc::flock(f.as_raw_fd(), op) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_locks_share_and_exclusive_excludes() {
        let d = tempfile::tempdir().unwrap();
        let a = VolumeLock::shared(d.path()).unwrap();
        let b = VolumeLock::shared(d.path()).unwrap();
        assert!(matches!(
            VolumeLock::exclusive(d.path()),
            Err(LockError::Busy { .. })
        ));
        drop((a, b));
        let mut x = VolumeLock::exclusive(d.path()).unwrap();
        assert!(x.is_exclusive());
        let e = VolumeLock::shared(d.path()).unwrap_err();
        assert!(e.to_string().contains("upgrade"), "{e}");
        x.downgrade().unwrap();
        assert!(!x.is_exclusive());
        VolumeLock::shared(d.path()).unwrap();
        assert!(VolumeLock::shared_wait(d.path(), Duration::from_millis(10)).is_ok());
    }

    #[test]
    fn the_lock_file_is_private_and_never_a_planted_one() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let d = tempfile::tempdir().unwrap();
        let old = std::time::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        std::fs::File::open(d.path())
            .unwrap()
            .set_modified(old)
            .unwrap();
        let lock = VolumeLock::exclusive(d.path()).unwrap();
        // Creating the (hidden) lock file does not change the root's mtime, which the
        // plaintext view shows.
        assert_eq!(
            std::fs::metadata(d.path()).unwrap().modified().unwrap(),
            old
        );
        let md = std::fs::symlink_metadata(d.path().join(LOCK_FILE)).unwrap();
        assert!(md.is_file());
        assert_eq!(md.mode() & 0o777, 0o600);
        // Another open file description of it conflicts: the lock is on the file.
        let e = VolumeLock::shared(d.path()).unwrap_err();
        assert!(matches!(e, LockError::Busy { .. }), "{e}");
        drop(lock);
        // Loosened bits are closed again.
        let p = d.path().join(LOCK_FILE);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        VolumeLock::shared(d.path()).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        // A symlink, a directory or a FIFO in its place is refused, never followed.
        let outside = d.path().join("outside");
        std::fs::write(&outside, b"").unwrap();
        for plant in ["symlink", "dir", "fifo"] {
            let _ = std::fs::remove_file(&p);
            let _ = std::fs::remove_dir(&p);
            match plant {
                "symlink" => std::os::unix::fs::symlink(&outside, &p).unwrap(),
                "dir" => std::fs::create_dir(&p).unwrap(),
                _ => {
                    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
                    // SAFETY: a valid C string.
                    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
                }
            }
            let e = VolumeLock::exclusive(d.path()).unwrap_err();
            assert!(matches!(e, LockError::Untrusted { .. }), "{plant}: {e}");
            assert!(e.to_string().contains("remove"), "{e}");
        }
        assert_eq!(std::fs::read(&outside).unwrap(), b"");
    }

    #[test]
    fn holders_are_read_from_proc_locks() {
        let locks = "1: FLOCK  ADVISORY  WRITE 4242 fe:00:77 0 EOF\n\
                     1: -> FLOCK  ADVISORY  WRITE 4343 fe:00:77 0 EOF\n\
                     2: POSIX  ADVISORY  WRITE 4444 fe:00:77 0 EOF\n\
                     3: FLOCK  ADVISORY  READ 4545 fe:00:78 0 EOF\n";
        let dev = libc::makedev(0xfe, 0);
        assert_eq!(lock_holders(locks, dev, 77), vec![4242]);
        assert_eq!(lock_holders(locks, dev, 78), vec![4545]);
        assert!(lock_holders(locks, dev, 79).is_empty());
    }
}
