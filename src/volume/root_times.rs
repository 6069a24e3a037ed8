//! The backing root's mtime across cmkfs's own control files.
//!
//! The backing root's times are the mount root's. cmkfs keeps control files there (the
//! volume header, the re-encryption journal, their temp files): creating, replacing or
//! removing one moves the directory's mtime, and a volume re-encrypted or rewrapped would
//! show a root "modified" at the time of the run (attack session 6, F4), although README
//! promises every directory keeps its times. Each such write puts the root's mtime back.
//!
//! Only the mtime: creating, renaming and removing names moves a directory's mtime and ctime,
//! never its atime (a listing moves that, see `reencrypt::contents::list_keeping_atime`),
//! so a user's read of the root is never undone. The ctime cannot be set back.
//!
//! A mount's users may change the root meanwhile (create a file in it, `touch` it): their
//! change must stand. Every request that changes the root's entries or attributes holds the
//! root gate shared ([`super::Gates::write_in`]); the control-file write takes it exclusive
//! around "read the mtime, write, put the mtime back", so no such request runs in between.
//! It never waits for the gate (a request holding it may be waiting for a file lock a
//! re-encryption batch holds while it writes its journal): it tries for a moment, and if a
//! request keeps changing the root meanwhile it writes without putting anything back; the
//! root's mtime then moves to "now", as that request's change moves it anyway.

use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use super::{sys, Volume};

/// How long a control-file write tries for the root gate before writing without it.
const TRY_FOR: Duration = Duration::from_millis(50);

/// The backing root's mtime from before a control-file write, for
/// [`Volume::keeping_root_mtime`]'s `op` to put back as soon as its change is made (then
/// again after `op`, if it moved since).
pub struct RootMtime<'a> {
    dir: BorrowedFd<'a>,
    /// (seconds, nanoseconds); `None`: not to be put back (the gate was busy).
    before: Option<(i64, u32)>,
}

impl RootMtime<'_> {
    /// Whether the root gate is held: the mtime will be put back.
    pub fn held(&self) -> bool {
        self.before.is_some()
    }

    /// Sets the root's mtime back, if it moved.
    pub fn put_back(&self) {
        let Some(m) = self.before else {
            return;
        };
        let moved = sys::fstat(self.dir).is_ok_and(|st| sys::times_of(&st)[1] != Some(Some(m)));
        if moved {
            if let Err(e) = sys::utimens_fd(self.dir, &[None, Some(Some(m))]) {
                tracing::debug!(error = %e, "cannot set the backing root's mtime back");
            }
        }
    }
}

impl Volume {
    /// Runs `op`, which creates, replaces or removes control files in the backing root, and
    /// puts the root's mtime back as it was before (module docs); `op` may put it back
    /// itself as soon as its change is made ([`RootMtime::put_back`]: before the directory
    /// is fsynced, so that both are durable together and a kill in between is unlikely).
    /// Offline (no requests) the gate is always free.
    pub fn keeping_root_mtime<T>(&self, op: impl FnOnce(&RootMtime<'_>) -> T) -> T {
        let deadline = Instant::now() + TRY_FOR;
        let held = loop {
            match self.gates.root.try_write() {
                Ok(g) => break Some(g),
                Err(std::sync::TryLockError::Poisoned(p)) => break Some(p.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(std::sync::TryLockError::WouldBlock) => break None,
            }
        };
        let dir = self.root_dir.fd();
        let keeper = RootMtime {
            dir,
            before: held
                .as_ref()
                .and_then(|_| sys::fstat(dir).ok())
                .and_then(|st| sys::times_of(&st)[1].flatten()),
        };
        let r = op(&keeper);
        keeper.put_back();
        r
    }
}

/// Runs `op` and sets `dir`'s mtime back to what it was before, if `op` moved it. For a
/// directory nothing else changes meanwhile (a locked volume, or the root gate held).
pub fn keep_mtime<T>(dir: BorrowedFd<'_>, op: impl FnOnce() -> T) -> T {
    keep(dir, false, op)
}

/// [`keep_mtime`], and the atime too: for an `op` that also lists `dir` (which moves its
/// atime), on a volume nobody else uses meanwhile (an offline command holding the lock).
pub fn keep_times<T>(dir: BorrowedFd<'_>, op: impl FnOnce() -> T) -> T {
    keep(dir, true, op)
}

fn keep<T>(dir: BorrowedFd<'_>, atime: bool, op: impl FnOnce() -> T) -> T {
    let before = sys::fstat(dir).ok().map(|st| sys::times_of(&st));
    let r = op();
    if let Some([a, m]) = before {
        let now = sys::fstat(dir).ok().map(|st| sys::times_of(&st));
        let put = [
            a.filter(|_| atime && now.is_some_and(|[na, _]| na != a)),
            m.filter(|_| now.is_some_and(|[_, nm]| nm != m)),
        ];
        if put.iter().any(Option::is_some) {
            if let Err(e) = sys::utimens_fd(dir, &put) {
                tracing::debug!(error = %e, "cannot set the backing root's times back");
            }
        }
    }
    r
}
