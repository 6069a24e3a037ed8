//! The volume lock: an advisory `flock(2)` on the backing directory itself, so that a format
//! upgrade never runs while the volume is mounted or being rewrapped.
//!
//! * Mounts and header rewraps hold it **shared**: several can run at once, as before.
//! * `cmkfs upgrade` (and a mount that converts an old volume first, or `fsck --repair`) holds
//!   it **exclusive**.
//!
//! Locking the directory (not a file in it) adds nothing to the format, and the lock goes
//! away with the process that holds it, crash included. A volume mounted by a cmkfs older
//! than the lock is not seen by it; callers that need certainty also look at the mount table
//! ([`crate::fsck::find_mount`]).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Why the lock could not be had.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Someone holds it in a conflicting mode.
    #[error("{} is in use: {what}", .dir.display())]
    Busy {
        /// The backing directory.
        dir: PathBuf,
        /// Who presumably holds it, in words.
        what: &'static str,
    },
    /// The directory could not be opened or locked.
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
    dir: File,
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
        let f = File::open(dir).map_err(io_err)?;
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
            },
            _ => io_err(e),
        })?;
        Ok(VolumeLock {
            dir: f,
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
        flock(&self.dir, libc::LOCK_SH).map_err(|error| LockError::Io {
            dir: self.path.clone(),
            error,
        })?;
        self.exclusive = false;
        Ok(())
    }
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
}
