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
//! handle's). FLUSH (sent at every `close` with the writeback cache) of a handle opened for
//! writing reports the errno when the counter moved since, and moves the cursor.
//!
//! `fsync` needs no help: the kernel's per-descriptor sequence (`f_wb_err`) is not consumed
//! by anyone else's `fsync` or `sync`, and the kernel answers an `fsync` that finds a new
//! error itself, without sending FSYNC. An FSYNC that does arrive therefore moves the
//! cursor silently (nothing new for this descriptor). A descriptor told at `fsync` by the
//! kernel may hear the same error again at its `close`: the daemon never sees that report.
//! Handles opened for reading only say nothing at `close`: a reader has nothing to lose,
//! and every reader's close (the backup's drain, `cat`) would otherwise fail.

use std::collections::{BTreeSet, HashMap};
use std::sync::mpsc;

use fuser::{INodeNo, Notifier};

/// One inode's refused write-backs: how many, and the errno of the last one.
#[derive(Clone, Copy, Debug, Default)]
struct Seq {
    count: u64,
    errno: i32,
}

/// What one open handle has been told: `seen` is where every process starts; `owners` where
/// each process (FLUSH's lock owner: one per `files_struct`) that closed a descriptor of it
/// since is. Forked children share the handle (one open file description), and their
/// closes (at `exec`, at exit) must not use up the parent's report (attack session 11, F1).
#[derive(Clone, Debug)]
struct Cursor {
    ino: u64,
    seen: u64,
    write: bool,
    owners: HashMap<u64, u64>,
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
        self.cursors.insert(
            fh,
            Cursor {
                ino,
                seen,
                write,
                owners: HashMap::new(),
            },
        );
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

    /// The errno a `close` of handle `fh` by the process `owner` (FLUSH's lock owner)
    /// reports, if its inode had a write-back refused since the handle was opened or last
    /// caught up, and this process was not told yet; it is then up to date. `None` for a
    /// handle opened for reading only, or an unknown one.
    pub(super) fn take(&mut self, fh: u64, owner: u64) -> Option<i32> {
        let c = self.cursors.get_mut(&fh)?;
        if !c.write {
            return None;
        }
        let s = self.seqs.get(&c.ino)?;
        let seen = c.owners.get(&owner).copied().unwrap_or(c.seen);
        if s.count == seen {
            return None;
        }
        c.owners.insert(owner, s.count);
        Some(s.errno)
    }

    /// An FSYNC of handle `fh` reached the daemon: the kernel checked its own sequence for
    /// this descriptor first and found nothing it had not reported already (it answers the
    /// `fsync` itself with the error otherwise, and sends no FSYNC), so every refusal the
    /// handle has not seen was told at an earlier `fsync`: a `close` must not repeat it.
    pub(super) fn caught_up(&mut self, fh: u64) {
        if let Some(c) = self.cursors.get_mut(&fh) {
            // The kernel's sequence is per open file description, shared with forked
            // children: every process sharing it was caught up with it.
            c.seen = self.seqs.get(&c.ino).map_or(0, |s| s.count);
            c.owners.clear();
        }
    }
}

/// Drops the kernel's pages of an inode after a refused write-back, so that readers see
/// what the backing file holds (zeros up to the size the kernel keeps) instead of the bytes
/// that were never stored (attack session 10, F3). The kernel keeps refused pages, clean,
/// until the inode leaves its cache otherwise. Done on a thread of its own after the WRITE
/// was answered, never inside the handler: the invalidation waits for pages under
/// write-back, and the kernel waits for that very reply. Dirty pages are written back
/// first (`launder`), so nothing accepted is dropped.
#[derive(Default)]
pub(super) struct RefusedPages {
    tx: Option<mpsc::Sender<u64>>,
}

impl RefusedPages {
    /// Starts the thread that invalidates, once the session's notifier exists. Without it
    /// (no thread could be started) refused pages stay cached, as before.
    pub(super) fn start(&mut self, n: Notifier) {
        let (tx, rx) = mpsc::channel::<u64>();
        let spawned = std::thread::Builder::new()
            .name("cmkfs-wb-inval".into())
            .spawn(move || {
                while let Ok(ino) = rx.recv() {
                    // Many refusals of one file (a write-back of several requests) come
                    // together: one invalidation each.
                    let inos: BTreeSet<u64> = std::iter::once(ino).chain(rx.try_iter()).collect();
                    for ino in inos {
                        // Offset 0, length 0: every page of the inode, and its attributes.
                        let _ = n.inval_inode(INodeNo(ino), 0, 0);
                    }
                }
            });
        match spawned {
            Ok(_) => self.tx = Some(tx),
            Err(e) => tracing::warn!(error = %e, "refused write-backs stay in the kernel's cache"),
        }
    }

    /// A write-back of inode `ino` was refused and answered: drop its pages soon.
    pub(super) fn refused(&self, ino: u64) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(ino);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::WbErrors;

    #[test]
    fn each_writer_open_at_the_refusal_reports_it_once() {
        let mut w = WbErrors::default();
        w.opened(1, 7, true);
        w.opened(2, 7, true);
        w.opened(3, 7, false);
        assert_eq!(w.take(1, 100), None);
        w.refused(7, libc::ENOSPC);
        w.opened(4, 7, true);
        assert_eq!(w.take(1, 100), Some(libc::ENOSPC));
        assert_eq!(w.take(1, 100), None);
        // Told by the kernel at an fsync (the FSYNC that follows reaches the daemon).
        w.caught_up(2);
        assert_eq!(w.take(2, 100), None);
        // A reader's close says nothing.
        assert_eq!(w.take(3, 100), None);
        // Opened after the refusal.
        assert_eq!(w.take(4, 100), None);
        w.refused(7, libc::EIO);
        assert_eq!(w.take(4, 100), Some(libc::EIO));
        assert_eq!(w.take(2, 100), Some(libc::EIO));
        // Another inode is not touched; the last release forgets the inode.
        assert_eq!(w.take(9, 100), None);
        for fh in 1..=3 {
            w.released(fh, false);
        }
        w.released(4, true);
        assert!(w.seqs.is_empty() && w.cursors.is_empty());
    }

    /// Forked children share a handle: each process that closes it is told once, and the
    /// children's closes (at exec, at exit) leave the parent's report (attack session 11).
    #[test]
    fn each_process_sharing_a_handle_is_told_once() {
        let mut w = WbErrors::default();
        w.opened(1, 7, true);
        w.refused(7, libc::ENOSPC);
        assert_eq!(w.take(1, 201), Some(libc::ENOSPC));
        assert_eq!(w.take(1, 202), Some(libc::ENOSPC));
        assert_eq!(w.take(1, 201), None);
        assert_eq!(w.take(1, 100), Some(libc::ENOSPC));
        assert_eq!(w.take(1, 100), None);
        // An fsync of the shared description caught every process up.
        w.refused(7, libc::EIO);
        w.caught_up(1);
        assert_eq!(w.take(1, 100), None);
        assert_eq!(w.take(1, 203), None);
    }
}
