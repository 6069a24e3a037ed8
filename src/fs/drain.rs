//! A backup's freeze of a mount whose kernel caches writes (FUSE writeback cache): quiesce,
//! drain, freeze (docs/ARCHITECTURE.md, "Gates").
//!
//! With the cache, `write(2)` copies into the kernel's pages and returns; the kernel's
//! writeback sends the pages later, in pieces of its own choosing. Closing the write gate
//! alone would then cut a running `write(2)` in two (part written back, part held). So,
//! with the kernel facts this relies on (Linux 6.18, fs/fuse):
//!
//! 1. **Quiesce** ([`crate::volume::Gates::quiesce`]): GETATTRs of regular files are parked
//!    (kept unanswered, holding no thread, in the order they came); replies give attributes
//!    no timeout; then every inode the kernel knows gets its attributes invalidated (`FUSE_NOTIFY_INVAL_INODE` with offset < 0:
//!    `fuse_reverse_inval_inode` invalidates attributes, pages only for offset >= 0). A
//!    cached `write(2)` (`fuse_cache_write_iter`) calls `fuse_update_attributes(..,
//!    STATX_SIZE | STATX_MODE)` before it takes the inode lock, and an invalid mode (or an
//!    expired timeout) makes that a GETATTR: every new `write(2)` waits for its answer,
//!    holding no lock. A reply to a request sent before the invalidation carries an older
//!    attribute version, which the kernel drops (`fuse_change_attributes_i`).
//! 2. **Drain**: a `write(2)` already past that point holds the inode lock while it
//!    copies. A thread of the daemon opens every regular file with an open handle through
//!    the mount (`open_by_handle_at`: the kernel finds the inode it holds by node id and
//!    generation, `fuse_get_dentry`) and `fsync`s it: `fuse_fsync` takes the inode lock
//!    (so waits for that `write(2)`), writes back and waits, then sends FSYNC. Two rounds
//!    (a `write(2)` that had passed its attribute check but not yet taken the lock when the
//!    first round's `fsync` took it is waited for by the second; one that still has not
//!    taken it after a whole round, a few instructions of the writer's, is the window this
//!    does not close), then `syncfs` of the mount (pages dirtied through `mmap` of closed
//!    files). The drain's own requests pass the
//!    quiesce (its thread id, [`crate::volume::Gates::set_drainer`]); WRITE, FSYNC,
//!    RELEASE and every other request go on meanwhile.
//! 3. **Freeze** ([`crate::volume::Quiesced::freeze`]): every change waits, WRITE
//!    included, then the parked GETATTRs are answered: new writes fill the kernel's pages
//!    and their WRITEs wait for the thaw.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuser::INodeNo;

use super::{lock, CmkFs, OnlineHandle};
use crate::volume::{Frozen, Volume};

/// Why a backup's freeze could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    /// The kernel's cached writes were not written back in time.
    #[error(
        "the mount could not write back its cached writes within {0} s (a program keeps a \
         file busy, or the backing disk is slow); nothing was frozen: back up again"
    )]
    Timeout(u64),
    /// A revocation's cut-off ended the quiesce.
    #[error("the volume's key was revoked while the mount prepared the freeze")]
    Lifted,
    /// The client that asked for the freeze went away (a backup that died) during the drain.
    #[error("the backup went away while the mount prepared the freeze")]
    ClientGone,
}

/// What the drain did.
#[derive(Debug, Default)]
pub struct Drained {
    /// Files opened and `fsync`ed through the mount (each round).
    pub files: usize,
    /// False when a file could not be opened by handle (no `CAP_DAC_READ_SEARCH`): only
    /// `syncfs` ran, and a `write(2)` running at the quiesce may be cut in two.
    pub exact: bool,
}

/// `struct file_handle` of a FUSE inode (`fuse_encode_fh`: `FILEID_INO64_GEN`, node id
/// high and low words, generation).
#[repr(C)]
struct FuseFileHandle {
    handle_bytes: u32,
    handle_type: i32,
    raw: [u32; 3],
}

const FILEID_INO64_GEN: i32 = 0x81;

/// Rounds of `fsync` over the files with open handles (see the module docs).
const ROUNDS: usize = 2;

impl OnlineHandle {
    /// Holds every change to the volume back for a backup (the write gate closed, reads
    /// go on), after the kernel's cached writes were written back (module docs): what the
    /// backing store holds then has every `write(2)` that returned before it whole, and
    /// none that started after. Without the writeback cache the gate is closed at once.
    ///
    /// `client_gone` is looked at while the drain runs (every 50 ms): once it is true (the
    /// backup that asked died or hung up) the quiesce ends at once.
    ///
    /// Errors: [`DrainError::Timeout`] when the drain took longer than `limit`,
    /// [`DrainError::Lifted`] when a cut-off came meanwhile, and [`DrainError::ClientGone`]
    /// when `client_gone` became true; the quiesce then ends at once (the parked GETATTRs
    /// answered, attribute timeouts back), nothing is held, even while the drain thread is
    /// still blocked in an `fsync` (a `write(2)` that does not end): it stops after that
    /// `fsync` and its end changes nothing.
    pub fn freeze_for_backup<'v>(
        &self,
        vol: &'v Volume,
        mountpoint: &Path,
        limit: Duration,
        client_gone: &AtomicBool,
    ) -> Result<(Frozen<'v>, Option<Drained>), DrainError> {
        if !self.opts.writeback_cache {
            return Ok((vol.gates().freeze_writes(), None));
        }
        let quiet = vol.gates().quiesce();
        lock(&self.parked).on = true;
        // Answers the parked GETATTRs however this ends (after the freeze when it is taken:
        // declared before it, dropped after).
        let _unpark = Unpark(self);
        if let Some(n) = self.notifier.get() {
            let (inodes, _) = self.table.invalidation_targets();
            for ino in inodes {
                // Offset < 0: attributes only, no page is touched (and none written back).
                let _ = n.inval_inode(INodeNo(ino), -1, 0);
            }
        }
        let targets: Vec<(u64, u32)> = {
            let files = lock(&self.files);
            files
                .by_ino
                .keys()
                .filter(|ino| self.table.kind(**ino) == Some(libc::S_IFREG))
                .filter_map(|ino| Some((*ino, self.table.generation(*ino)? as u32)))
                .collect()
        };
        tracing::debug!(
            handles = lock(&self.files).by_ino.len(),
            files = targets.len(),
            "draining the kernel's cached writes"
        );
        // The drain thread may outlive this call (blocked in an `fsync` behind a `write(2)`
        // that does not end): `stop` (set however this call ends) makes it stop after that
        // `fsync`. It names itself the drainer only through this thread (`go`), while the
        // quiesce lasts: a late start never leaves a stale drainer for the next quiesce.
        let stop = Arc::new(AtomicBool::new(false));
        let _stop = StopDrain(&stop);
        let (tx, rx) = mpsc::channel();
        let (tid_tx, tid_rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let (mp, thread_stop) = (mountpoint.to_path_buf(), stop.clone());
        let spawned = std::thread::Builder::new()
            .name("cmkfs-drain".into())
            .spawn(move || {
                // SAFETY: gettid has no preconditions.
                let tid = unsafe { libc::gettid() } as u32;
                if tid_tx.send(tid).is_err() || go_rx.recv().is_err() {
                    return;
                }
                let r = drain(&mp, &targets, &thread_stop);
                let _ = tx.send(r);
            });
        if spawned.is_err() {
            return Err(DrainError::Timeout(0));
        }
        let deadline = Instant::now() + limit;
        let mut started = false;
        let drained = loop {
            if !started {
                if let Ok(tid) = tid_rx.try_recv() {
                    vol.gates().set_drainer(tid);
                    let _ = go_tx.send(());
                    started = true;
                }
            }
            match rx.recv_timeout(Duration::from_millis(if started { 50 } else { 1 })) {
                Ok(d) => break Some(d),
                Err(RecvTimeoutError::Disconnected) if started => break None,
                Err(RecvTimeoutError::Disconnected) => return Err(DrainError::Timeout(0)),
                Err(RecvTimeoutError::Timeout) => {
                    if vol.gates().lifted_since(quiet.lifts) {
                        return Err(DrainError::Lifted);
                    }
                    if client_gone.load(Ordering::SeqCst) {
                        tracing::warn!("the backup went away during the drain: the quiesce ends");
                        return Err(DrainError::ClientGone);
                    }
                    if Instant::now() >= deadline {
                        tracing::warn!(limit = ?limit, "the drain of cached writes did not end in time");
                        return Err(DrainError::Timeout(limit.as_secs()));
                    }
                }
            }
        };
        if let Some(d) = &drained {
            tracing::info!(files = d.files, exact = d.exact, "cached writes drained");
        }
        Ok((quiet.freeze(), drained))
    }
}

/// Tells the drain thread to stop at its next step, however the freeze's preparation ends.
struct StopDrain<'a>(&'a AtomicBool);

impl Drop for StopDrain<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Ends the parking of GETATTRs and answers those parked, in order.
struct Unpark<'a>(&'a OnlineHandle);

impl Drop for Unpark<'_> {
    fn drop(&mut self) {
        let parked = {
            let mut p = lock(&self.0.parked);
            p.on = false;
            std::mem::take(&mut p.getattrs)
        };
        if parked.is_empty() {
            return;
        }
        tracing::debug!(
            n = parked.len(),
            "answering the GETATTRs parked by the quiesce"
        );
        let fs = CmkFs {
            opts: self.0.opts,
            ttl: self.0.ttl,
            vol: self.0.vol.clone(),
            table: self.0.table.clone(),
            files: self.0.files.clone(),
            dirs: std::sync::Mutex::default(),
            next_fh: std::sync::atomic::AtomicU64::new(0),
            parked: self.0.parked.clone(),
            held: Arc::default(),
        };
        for (ino, fh, reply) in parked {
            let _pass = fs.vol.gates().read();
            fs.do_getattr(ino, fh, reply);
        }
    }
}

/// Opens each `(node id, generation)` through the mount at `mp` and `fsync`s it, `ROUNDS`
/// times, then `syncfs`. A file gone meanwhile (`ESTALE`, `ENOENT`) has nothing to drain.
/// Once `stop` is set (the freeze's preparation ended without it) nothing more is done.
fn drain(mp: &Path, targets: &[(u64, u32)], stop: &AtomicBool) -> Drained {
    let mut d = Drained {
        files: 0,
        exact: true,
    };
    let Ok(root) = File::open(mp) else {
        d.exact = false;
        return d;
    };
    'rounds: for _ in 0..ROUNDS {
        for &(ino, generation) in targets {
            if stop.load(Ordering::SeqCst) {
                return d;
            }
            match open_by_handle(&root, ino, generation) {
                Ok(f) => {
                    // Its error (a write-back that failed) is the writer's to see at its own
                    // fsync; the drain only needs the wait.
                    let _ = f.sync_all();
                    d.files += 1;
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM | libc::EOPNOTSUPP)) => {
                    tracing::warn!(error = %e, "cannot open files by handle through the mount (the daemon needs CAP_DAC_READ_SEARCH): a write(2) running at the freeze may be in a backup in part");
                    d.exact = false;
                    break 'rounds;
                }
                Err(_) => {}
            }
        }
    }
    if !stop.load(Ordering::SeqCst) {
        let _ = rustix::fs::syncfs(&root);
    }
    d
}

fn open_by_handle(root: &File, ino: u64, generation: u32) -> std::io::Result<File> {
    let mut h = FuseFileHandle {
        handle_bytes: 12,
        handle_type: FILEID_INO64_GEN,
        raw: [(ino >> 32) as u32, ino as u32, generation],
    };
    // SAFETY: a valid directory descriptor and a file_handle of the size it declares.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            root.as_raw_fd(),
            &mut h as *mut FuseFileHandle,
            libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOCTTY,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor just opened and owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd as i32) })
}
