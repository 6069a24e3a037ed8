//! Write-back errors: what FLUSH and FSYNC report of the kernel's cached writes the daemon
//! refused.
//!
//! With the writeback cache a `write(2)` returns once its bytes are in the kernel's page
//! cache; the daemon sees them later as WRITE requests flagged `FUSE_WRITE_CACHE`, and when
//! it refuses one (full backing disk, file size limit, revoked key) nobody is waiting for
//! the answer. The kernel keeps such an error in two places: the mapping's `AS_ENOSPC` /
//! `AS_EIO` flags, which `close` looks at and which the first `fsync` or `sync` of anyone
//! clears (attack session 10, F1: a plain `sync` before the writer's `close` made the close
//! return 0 and the data was gone), and a per-descriptor sequence that only `fsync` reads.
//! So the daemon keeps its own, like the kernel's `errseq_t`: per inode a counter of
//! refused write-backs and the last errno; each open handle remembers the counter it has
//! reported up to (the value at open: an error before a handle existed is not that
//! handle's). FLUSH (sent at every `close` with the writeback cache) and FSYNC of a handle
//! report the errno when the counter moved since, and move the handle's cursor.
//!
//! Only handles opened for writing report at FLUSH: a reader's `close` has nothing to lose,
//! and every reader's close (the backup's drain, `cat`) would otherwise fail. FSYNC reports
//! to every handle, as the kernel's own sequence does.

use std::collections::HashMap;

/// One inode's refused write-backs: how many, and the errno of the last one.
#[derive(Clone, Copy, Debug, Default)]
struct Seq {
    count: u64,
    errno: i32,
}

/// What one open handle has been told.
#[derive(Clone, Copy, Debug)]
struct Cursor {
    ino: u64,
    seen: u64,
    write: bool,
}

/// The refused write-backs of every inode with an open handle, and each handle's cursor.
/// Kept under the open-files lock; every call is a map look-up, no system call.
#[derive(Default)]
pub(super) struct WbErrors {
    seqs: HashMap<u64, Seq>,
    cursors: HashMap<u64, Cursor>,
}

impl WbErrors {
    /// A handle `fh` of inode `ino` was opened (`write`: for writing): it reports only
    /// refusals from now on.
    pub(super) fn opened(&mut self, fh: u64, ino: u64, write: bool) {
        let seen = self.seqs.get(&ino).map_or(0, |s| s.count);
        self.cursors.insert(fh, Cursor { ino, seen, write });
    }

    /// Handle `fh` was released; `last`: it was the inode's last open handle, so nothing
    /// can report the inode's errors any more.
    pub(super) fn released(&mut self, fh: u64, last: bool) {
        if let Some(c) = self.cursors.remove(&fh) {
            if last {
                self.seqs.remove(&c.ino);
            }
        }
    }

    /// The daemon refused a write-back of inode `ino` with `errno`.
    pub(super) fn refused(&mut self, ino: u64, errno: i32) {
        let s = self.seqs.entry(ino).or_default();
        s.count += 1;
        s.errno = errno;
    }

    /// The errno to report to handle `fh` (for a `close` when `flush`, else an `fsync`), if
    /// its inode had a write-back refused since the handle last reported one; the handle
    /// is then up to date. `None` for an unknown handle.
    pub(super) fn take(&mut self, fh: u64, flush: bool) -> Option<i32> {
        let c = self.cursors.get_mut(&fh)?;
        if flush && !c.write {
            return None;
        }
        let s = self.seqs.get(&c.ino)?;
        if s.count == c.seen {
            return None;
        }
        c.seen = s.count;
        Some(s.errno)
    }
}

#[cfg(test)]
mod tests {
    use super::WbErrors;

    #[test]
    fn each_handle_open_at_the_refusal_reports_it_once() {
        let mut w = WbErrors::default();
        w.opened(1, 7, true);
        w.opened(2, 7, true);
        w.opened(3, 7, false);
        assert_eq!(w.take(1, true), None);
        w.refused(7, libc::ENOSPC);
        w.opened(4, 7, true);
        assert_eq!(w.take(1, true), Some(libc::ENOSPC));
        assert_eq!(w.take(1, true), None);
        assert_eq!(w.take(2, false), Some(libc::ENOSPC));
        assert_eq!(w.take(2, true), None);
        // A reader's close says nothing; its fsync does.
        assert_eq!(w.take(3, true), None);
        assert_eq!(w.take(3, false), Some(libc::ENOSPC));
        // Opened after the refusal.
        assert_eq!(w.take(4, true), None);
        w.refused(7, libc::EIO);
        assert_eq!(w.take(4, true), Some(libc::EIO));
        // Another inode is not touched; the last release forgets the inode.
        assert_eq!(w.take(9, true), None);
        for fh in 1..=3 {
            w.released(fh, false);
        }
        w.released(4, true);
        assert!(w.seqs.is_empty() && w.cursors.is_empty());
    }
}
