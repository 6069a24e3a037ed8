//! Write-back errors: what FLUSH and FSYNC report of the kernel's cached writes the daemon
//! refused.
//!
//! With the writeback cache a `write(2)` returns once its bytes are in the kernel's page
//! cache; the daemon sees them later as WRITE requests flagged `FUSE_WRITE_CACHE` (every
//! write-back: the kernel's writepages at memory pressure, `sync`, `fsync`, `msync`,
//! `close`, a backup's drain, the last reference's release, and the `fsync` that ends an
//! `O_SYNC` write), and when it refuses one (full backing disk, file size limit, revoked key)
//! nobody is waiting for the answer. The daemon answers such a WRITE as done (the whole
//! count) and keeps the error itself: answered with the error, the kernel set its mapping
//! flags (`AS_ENOSPC`/`AS_EIO`), which the first `close` of ANY descriptor of the file
//! reported and cleared, a reader's or one opened after the refusal (attack session 11, F2),
//! and which anyone's `fsync` or `sync` cleared before the writer's `close` (attack session
//! 10, F1). The kernel's page of a refused write-back is clean after the answer; the daemon
//! then drops the inode's pages ([`RefusedPages`]), so readers see what is stored. The
//! kernel's size (its own with the cache) is the same whatever the answer.
//!
//! The record is like the kernel's `errseq_t`: per inode a counter of refused write-backs
//! and the last errno; each open handle remembers the counter it has reported up to (the
//! value at open: an error before a handle existed is not that handle's):
//! - FSYNC (`fsync`, `fdatasync`, `msync(MS_SYNC)`, the end of an `O_SYNC` write; the
//!   kernel writes the pages back and waits for the answers before it sends FSYNC) of any
//!   handle, a reader's too, reports the errno once when the counter moved since, as Linux
//!   does per open file description. The handle is then caught up for every process sharing
//!   it: its `close` does not repeat it (the kernel's `fsync` cleared its flag for `close`
//!   too, before the daemon owned the error).
//! - FLUSH (sent at every `close` with the writeback cache, after the kernel wrote the
//!   file's dirty pages back and waited) of a handle opened for writing reports it once per
//!   process (FLUSH's lock owner: forked children share the handle, and their closes at
//!   `exec` or exit must not use up the parent's report, attack session 11, F1). A `close`
//!   does not catch the handle up for `fsync`: a dup'd descriptor's `fsync` may hear it
//!   again. Handles opened for reading only say nothing at `close`: a reader has nothing to
//!   lose, and every reader's close (the backup's drain, `cat`) would otherwise fail.
//! - A refusal no handle open for writing was told of when the inode's last handle goes (the
//!   write-back the kernel makes at the release of the last reference, e.g. a mapping
//!   unmapped after its descriptor was closed: no `close` or `fsync` follows) is kept for
//!   the next handle opened, which reports it as if it had been open at the time (Linux
//!   hands an error nobody has seen to the next opener's `fsync` the same way), until the
//!   kernel forgets the inode (the kernel drops its own record with the inode too).
//!
//! `syncfs(2)` and `sync_file_range(2)` cannot report these: FUSE sends no request for
//! them, and the kernel's own sequences only see errors the kernel was given.

use std::collections::{BTreeSet, HashMap};
use std::sync::mpsc;

use fuser::{INodeNo, Notifier};

/// One inode's refused write-backs: how many, the errno of the last one, and how many of
/// them a handle open for writing (or one that took over an untold refusal) was told of.
#[derive(Clone, Copy, Debug, Default)]
struct Seq {
    count: u64,
    errno: i32,
    told: u64,
}

/// What one open handle has been told: `seen` is where FSYNC, and every process's first
/// FLUSH, start; `owners` where each process (FLUSH's lock owner: one per `files_struct`)
/// that closed a descriptor of it since is. `adopted`: opened when the inode had only an
/// untold refusal left, which it reports as the writer would.
#[derive(Clone, Debug)]
struct Cursor {
    ino: u64,
    seen: u64,
    write: bool,
    adopted: bool,
    owners: HashMap<u64, u64>,
}

/// The refused write-backs of every inode with an open handle (or an untold refusal), and
/// each handle's cursor. Kept under the open-files lock; every call is a map look-up, no
/// system call.
#[derive(Default)]
pub(super) struct WbErrors {
    seqs: HashMap<u64, Seq>,
    cursors: HashMap<u64, Cursor>,
}

impl WbErrors {
    /// A handle `fh` of inode `ino` was opened (`write`: for writing): it reports only
    /// refusals from now on, or the refusal the inode's last handle left untold.
    pub(super) fn opened(&mut self, fh: u64, ino: u64, write: bool) {
        let (seen, adopted) = match self.seqs.get(&ino) {
            // Only an inode with a refusal costs a look at the other handles.
            Some(s) if s.told < s.count && !self.cursors.values().any(|c| c.ino == ino) => {
                (s.told, true)
            }
            Some(s) => (s.count, false),
            None => (0, false),
        };
        self.cursors.insert(
            fh,
            Cursor {
                ino,
                seen,
                write,
                adopted,
                owners: HashMap::new(),
            },
        );
    }

    /// Handle `fh` was released; `last`: it was the inode's last open handle, so the
    /// inode's record is dropped, unless a refusal in it was never told to a writer.
    pub(super) fn released(&mut self, fh: u64, last: bool) {
        if let Some(c) = self.cursors.remove(&fh) {
            if last {
                match self.seqs.get(&c.ino) {
                    // Said once, when no writer was told (not again by each later opener
                    // that leaves it untold, a `cat`).
                    Some(s) if s.told < s.count => {
                        if !c.adopted {
                            tracing::warn!(
                                ino = c.ino,
                                errno = s.errno,
                                "a refused write-back was not reported yet: the next open's \
                                 fsync will"
                            );
                        }
                    }
                    _ => {
                        self.seqs.remove(&c.ino);
                    }
                }
            }
        }
    }

    /// The kernel forgot inode `ino`, or the number was handed to a new file: a refusal
    /// kept for its next opener goes (the number may be another file's now).
    pub(super) fn forgotten(&mut self, ino: u64) {
        if self.seqs.contains_key(&ino) && !self.cursors.values().any(|c| c.ino == ino) {
            self.seqs.remove(&ino);
        }
    }

    /// The daemon refused a write-back of inode `ino` with `errno` (and answered it done).
    pub(super) fn refused(&mut self, ino: u64, errno: i32) {
        let s = self.seqs.entry(ino).or_default();
        s.count += 1;
        // ENOSYS to FLUSH or FSYNC would make the kernel stop sending them for good.
        s.errno = if errno == libc::ENOSYS {
            libc::EIO
        } else {
            errno
        };
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
        let s = self.seqs.get_mut(&c.ino)?;
        let seen = c.owners.get(&owner).copied().unwrap_or(c.seen);
        if s.count == seen {
            return None;
        }
        c.owners.insert(owner, s.count);
        s.told = s.count;
        Some(s.errno)
    }

    /// The errno an `fsync` of handle `fh` reports, if its inode had a write-back refused
    /// since the handle was opened or last caught up. The handle is then caught up for every
    /// process sharing it (one open file description), so their `close`s do not repeat it.
    pub(super) fn fsynced(&mut self, fh: u64) -> Option<i32> {
        let c = self.cursors.get_mut(&fh)?;
        let s = self.seqs.get_mut(&c.ino)?;
        c.owners.clear();
        if s.count == c.seen {
            return None;
        }
        c.seen = s.count;
        if c.write || c.adopted {
            s.told = s.count;
        }
        Some(s.errno)
    }
}

/// Drops the kernel's pages of an inode after a refused write-back, so that readers see
/// what the backing file holds (zeros up to the size the kernel keeps) instead of the bytes
/// that were never stored (attack session 10, F3). The kernel keeps the pages of a
/// write-back answered done, clean, until the inode leaves its cache otherwise; the
/// invalidation also drops the inode's attributes (the size stays the kernel's while it
/// caches writes). Done on a thread of its own after the WRITE was answered, never inside
/// the handler: the invalidation waits for pages under write-back, and the kernel waits for
/// that very reply. Dirty pages are written back first (`launder`), so nothing accepted is
/// dropped.
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
        assert_eq!(w.fsynced(2), None);
        w.refused(7, libc::ENOSPC);
        w.opened(4, 7, true);
        assert_eq!(w.take(1, 100), Some(libc::ENOSPC));
        assert_eq!(w.take(1, 100), None);
        // Told at an fsync: once, and not again at close.
        assert_eq!(w.fsynced(2), Some(libc::ENOSPC));
        assert_eq!(w.fsynced(2), None);
        assert_eq!(w.take(2, 100), None);
        // A reader's close says nothing; its fsync reports, once.
        assert_eq!(w.take(3, 100), None);
        assert_eq!(w.fsynced(3), Some(libc::ENOSPC));
        assert_eq!(w.fsynced(3), None);
        // Opened after the refusal: nothing, at close or fsync.
        assert_eq!(w.take(4, 100), None);
        assert_eq!(w.fsynced(4), None);
        w.refused(7, libc::EIO);
        assert_eq!(w.take(4, 100), Some(libc::EIO));
        assert_eq!(w.take(2, 100), Some(libc::EIO));
        // A close does not catch the handle up for fsync (a dup'd descriptor's).
        assert_eq!(w.fsynced(4), Some(libc::EIO));
        // Another inode is not touched; the last release forgets the inode.
        assert_eq!(w.take(9, 100), None);
        assert_eq!(w.fsynced(9), None);
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
        assert_eq!(w.fsynced(1), Some(libc::EIO));
        assert_eq!(w.take(1, 100), None);
        assert_eq!(w.take(1, 203), None);
    }

    /// A refusal made while the last handle went (the release of a mapping's last
    /// reference) is told to the next handle opened, at fsync, or at close if it writes;
    /// once; and it goes when the kernel forgets the inode.
    #[test]
    fn a_refusal_no_writer_heard_goes_to_the_next_opener() {
        let mut w = WbErrors::default();
        w.opened(1, 7, true);
        w.opened(2, 7, false);
        w.refused(7, libc::ENOSPC);
        // A reader open at the time hears it at fsync: the writer still has not.
        assert_eq!(w.fsynced(2), Some(libc::ENOSPC));
        w.released(2, false);
        w.released(1, true);
        // A reader takes it over, and closes without fsync: still kept.
        w.opened(3, 7, false);
        assert_eq!(w.take(3, 100), None);
        w.released(3, true);
        // Two opened together: the first takes it over, the second is after it.
        w.opened(4, 7, true);
        w.opened(5, 7, true);
        assert_eq!(w.take(5, 100), None);
        assert_eq!(w.take(4, 100), Some(libc::ENOSPC));
        assert_eq!(w.fsynced(4), Some(libc::ENOSPC));
        w.released(5, false);
        w.released(4, true);
        assert!(w.seqs.is_empty());
        // Told to nobody, then the inode forgotten: its number may be another file's.
        w.opened(6, 8, true);
        w.refused(8, libc::EACCES);
        w.released(6, true);
        w.forgotten(8);
        w.opened(7, 8, true);
        assert_eq!(w.fsynced(7), None);
        assert_eq!(w.take(7, 100), None);
    }

    /// ENOSYS answered to FLUSH or FSYNC would switch them off in the kernel for good.
    #[test]
    fn enosys_is_reported_as_eio() {
        let mut w = WbErrors::default();
        w.opened(1, 7, true);
        w.refused(7, libc::ENOSYS);
        assert_eq!(w.take(1, 100), Some(libc::EIO));
    }

    /// 100 000 random operations on three inodes (opens for reading and writing, refusals,
    /// closes by three processes, fsyncs, releases, forgets), each answer compared with a
    /// model written in other terms: refusals as events with one number line for all
    /// inodes, the rules as the README states them. Seed printed; `CMKFS_SEED=N` replays.
    #[test]
    fn random_operations_follow_the_model() {
        use std::collections::{BTreeMap, HashMap};
        let seed: u64 = std::env::var("CMKFS_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            });
        println!("seed {seed} (CMKFS_SEED={seed} replays it)");
        let mut x = seed | 1;
        let mut rnd = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        /// An inode: its last refusal (event number) and errno, and up to which event a
        /// writer (or a handle that took an untold refusal over) was told.
        #[derive(Default)]
        struct Ino {
            last: u64,
            errno: i32,
            told: u64,
        }
        /// A handle: what its fsync and each process's close have heard up to.
        struct H {
            ino: u64,
            write: bool,
            adopted: bool,
            fsync: u64,
            owners: HashMap<u64, u64>,
        }
        let mut w = WbErrors::default();
        let mut inos: HashMap<u64, Ino> = HashMap::new();
        let mut hs: BTreeMap<u64, H> = BTreeMap::new();
        let (mut next_fh, mut event) = (1u64, 0u64);
        let errnos = [libc::ENOSPC, libc::EFBIG, libc::EACCES, libc::EIO];
        let mut reports = 0u32;
        for step in 0..100_000u32 {
            let ino = 1 + rnd(3);
            let fh = hs.keys().nth(rnd(hs.len().max(1) as u64) as usize).copied();
            let op = rnd(100);
            let ctx = format!("seed {seed}, step {step}, op {op}");
            let open_on = |hs: &BTreeMap<u64, H>, ino: u64| hs.values().any(|h| h.ino == ino);
            match (op, fh) {
                (0..=19, _) if hs.len() < 8 => {
                    let write = rnd(2) == 0;
                    let m = inos.entry(ino).or_default();
                    let adopted = !open_on(&hs, ino) && m.told < m.last;
                    let base = if adopted { m.told } else { m.last };
                    w.opened(next_fh, ino, write);
                    hs.insert(
                        next_fh,
                        H {
                            ino,
                            write,
                            adopted,
                            fsync: base,
                            owners: HashMap::new(),
                        },
                    );
                    next_fh += 1;
                }
                (20..=39, _) => {
                    event += 1;
                    let errno = errnos[rnd(4) as usize];
                    let m = inos.entry(ino).or_default();
                    m.last = event;
                    m.errno = errno;
                    w.refused(ino, errno);
                }
                (40..=59, Some(fh)) => {
                    let owner = 1 + rnd(3);
                    let h = hs.get_mut(&fh).expect("listed");
                    let m = inos.entry(h.ino).or_default();
                    let pt = h.owners.get(&owner).copied().unwrap_or(h.fsync);
                    let want = (h.write && m.last > pt).then(|| {
                        h.owners.insert(owner, m.last);
                        m.told = m.last;
                        m.errno
                    });
                    assert_eq!(w.take(fh, owner), want, "close: {ctx}");
                    reports += u32::from(want.is_some());
                }
                (60..=79, Some(fh)) => {
                    let h = hs.get_mut(&fh).expect("listed");
                    let m = inos.entry(h.ino).or_default();
                    h.owners.clear();
                    let want = (m.last > h.fsync).then(|| {
                        h.fsync = m.last;
                        if h.write || h.adopted {
                            m.told = m.last;
                        }
                        m.errno
                    });
                    assert_eq!(w.fsynced(fh), want, "fsync: {ctx}");
                    reports += u32::from(want.is_some());
                }
                (80..=94, Some(fh)) => {
                    let h = hs.remove(&fh).expect("listed");
                    w.released(fh, !open_on(&hs, h.ino));
                }
                (95..=99, _) => {
                    if !open_on(&hs, ino) {
                        let m = inos.entry(ino).or_default();
                        m.told = m.last;
                    }
                    w.forgotten(ino);
                }
                _ => {}
            }
            // The record holds nothing for an inode with no handle and nothing untold.
            for (i, m) in &inos {
                if !open_on(&hs, *i) && m.told >= m.last {
                    assert!(!w.seqs.contains_key(i), "kept for nothing: {ctx}");
                }
            }
        }
        println!("{reports} reports");
        assert!(reports > 1000, "the operations reached too few reports");
    }
}
