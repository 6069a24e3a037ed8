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
//!    the mount and `fsync`s it: `fuse_fsync` takes the inode lock (so waits for that
//!    `write(2)`), writes back and waits for every WRITE of the inode (`fuse_sync_writes`),
//!    then sends FSYNC. The file is opened by its FUSE handle where the kernel allows it
//!    (`open_by_handle_at`, which needs `CAP_DAC_READ_SEARCH`: the kernel finds the inode it
//!    holds by node id and generation, `fuse_get_dentry`), else by one of its plaintext
//!    paths from the node table (a mount run by another user than root, or root without
//!    the capability): `openat2` below the mount's root, no symlink followed, read-only (or
//!    write-only where reading is refused), and its `st_ino` checked to be the node id (a
//!    rename may have given the name to another file meanwhile: the names are looked up
//!    again). A file with no name left whose backing file has no link either (unlinked
//!    while open) is in no backup and needs nothing; one that cannot be opened either way
//!    (a name the mount never looked up, permissions that refuse the daemon's user both
//!    reading and writing) leaves the drain not exact: logged, and the freeze's answer says
//!    so (`{"frozen":false}`), so the backup's archive says it is no point in time. Two rounds
//!    (a `write(2)` that had passed its attribute check but not yet taken the lock when the
//!    first round's `fsync` took it is waited for by the second; one that still has not
//!    taken it after a whole round, a few instructions of the writer's, is the window this
//!    does not close), then `syncfs` of the mount (it starts the write-back of pages
//!    dirtied through `mmap` of closed files; on FUSE it waits for none of it). `syncfs`
//!    alone is no drain: it returns while WRITEs still wait in the kernel's queue of
//!    background requests (docs/ARCHITECTURE.md, "What `sync(2)` and `syncfs(2)` promise
//!    on a FUSE mount"). The drain's own requests (LOOKUP, GETATTR, OPEN, FSYNC) pass the
//!    quiesce (its thread id, [`crate::volume::Gates::set_drainer`]: only GETATTRs are
//!    parked, and not its); WRITE, FSYNC, RELEASE and every other request go on meanwhile.
//! 3. **Freeze** ([`crate::volume::Quiesced::freeze`]): every change waits, WRITE
//!    included, then the parked GETATTRs are answered: new writes fill the kernel's pages
//!    and their WRITEs wait for the thaw.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, FromRawFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuser::INodeNo;

use super::{lock, MountParts, OnlineHandle};
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
    /// False when a file with an open handle could be opened neither by handle nor by a
    /// path (see the module docs): a `write(2)` into it that returned before the freeze may
    /// be missing from a backup, or in it in part.
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
    /// Returns the freeze and what the drain did (`None` without the writeback cache: nothing
    /// to drain, an exact freeze).
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
        if !self.parts.opts.writeback_cache {
            return Ok((vol.gates().freeze_writes(), None));
        }
        let quiet = vol.gates().quiesce();
        lock(&self.parts.parked).on = true;
        // Answers the parked GETATTRs however this ends (after the freeze when it is taken:
        // declared before it, dropped after).
        let _unpark = Unpark(self);
        if let Some(n) = self.notifier.get() {
            let (inodes, _) = self.parts.table.invalidation_targets();
            for ino in inodes {
                // Offset < 0: attributes only, no page is touched (and none written back).
                let _ = n.inval_inode(INodeNo(ino), -1, 0);
            }
        }
        let targets: Vec<(u64, u32)> = {
            let files = lock(&self.parts.files);
            files
                .by_ino
                .keys()
                .filter(|ino| self.parts.table.kind(**ino) == Some(libc::S_IFREG))
                .filter_map(|ino| Some((*ino, self.parts.table.generation(*ino)? as u32)))
                .collect()
        };
        tracing::debug!(
            handles = lock(&self.parts.files).by_ino.len(),
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
        // What the drain thread reaches besides the mount: the node table (a file's names, to
        // open it by path) and the open files (whether a file is still open, and whether one
        // with no name left still has a name in the volume).
        let reach = self.parts.clone();
        let spawned = std::thread::Builder::new()
            .name("cmkfs-drain".into())
            .spawn(move || {
                // SAFETY: gettid has no preconditions.
                let tid = unsafe { libc::gettid() } as u32;
                if tid_tx.send(tid).is_err() || go_rx.recv().is_err() {
                    return;
                }
                let r = drain(&mp, &targets, &thread_stop, &reach);
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
                // The drain thread ended without an answer (it panicked): what it reached
                // is unknown, so the freeze is not an exact one.
                Err(RecvTimeoutError::Disconnected) if started => {
                    tracing::warn!("the drain of cached writes ended without an answer");
                    break Some(Drained {
                        files: 0,
                        exact: false,
                    });
                }
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
            let mut p = lock(&self.0.parts.parked);
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
        let fs = self.0.parts.view();
        for (ino, fh, reply) in parked {
            let _pass = fs.vol.gates().read();
            fs.do_getattr(ino, fh, reply);
        }
    }
}

/// How one file fared in a round of the drain.
enum Synced {
    /// Opened through the mount and `fsync`ed.
    Done,
    /// Nothing of it can be in a backup's view: no handle open any more (its last `close`
    /// wrote it back), or no name left in the volume.
    Nothing,
    /// Could not be opened as itself through the mount: why.
    Missed(String),
}

/// Times the names of a file are looked up again when none opened it (a rename moved one
/// between the look-up and the open).
const PATH_TRIES: usize = 3;

/// Opens each `(node id, generation)` through the mount at `mp` and `fsync`s it, `ROUNDS`
/// times, then `syncfs`. By handle while the kernel allows it (`CAP_DAC_READ_SEARCH`), else
/// by one of its paths ([`sync_by_path`]). A file gone meanwhile (`ESTALE`, `ENOENT`) has
/// nothing to drain. Once `stop` is set (the freeze's preparation ended without it) nothing
/// more is done.
fn drain(mp: &Path, targets: &[(u64, u32)], stop: &AtomicBool, reach: &MountParts) -> Drained {
    let mut d = Drained {
        files: 0,
        exact: true,
    };
    let Ok(root) = File::open(mp) else {
        d.exact = false;
        return d;
    };
    let mut by_handle = true;
    for _ in 0..ROUNDS {
        for &(ino, generation) in targets {
            if stop.load(Ordering::SeqCst) {
                return d;
            }
            if by_handle {
                match open_by_handle(&root, ino, generation) {
                    Ok(f) => {
                        // Its error (a write-back that failed) is the writer's to see at its
                        // own fsync; the drain only needs the wait.
                        let _ = f.sync_all();
                        d.files += 1;
                        continue;
                    }
                    Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM | libc::EOPNOTSUPP)) => {
                        tracing::info!(error = %e, "cannot open files by handle through the mount (the daemon lacks CAP_DAC_READ_SEARCH): opening them by path");
                        by_handle = false;
                    }
                    Err(_) => continue,
                }
            }
            match sync_by_path(&root, reach, ino) {
                Synced::Done => d.files += 1,
                Synced::Nothing => {}
                Synced::Missed(why) => {
                    // The node id only: a plaintext name never goes to the log.
                    tracing::warn!(ino, why = %why, "cannot open a file with an open handle through the mount: a write(2) that returned before the backup may be in it in part, or missing");
                    d.exact = false;
                }
            }
        }
    }
    if !stop.load(Ordering::SeqCst) {
        let _ = rustix::fs::syncfs(&root);
    }
    d
}

/// Opens node `ino` through the mount by one of the paths the node table knows for it and
/// `fsync`s it. What is opened is checked to be `ino` (`st_ino` is the node id): a name that
/// a rename gave another file meanwhile is not it, and the names are looked up again.
fn sync_by_path(root: &File, reach: &MountParts, ino: u64) -> Synced {
    let mut why = String::new();
    for _ in 0..PATH_TRIES {
        if !lock(&reach.files).by_ino.contains_key(&ino) {
            return Synced::Nothing;
        }
        let paths = reach.table.plain_paths(ino);
        if paths.is_empty() {
            return nameless(reach, ino);
        }
        for p in &paths {
            match open_path(root, p) {
                Ok(f) => match f.metadata() {
                    Ok(m) if m.ino() == ino && m.file_type().is_file() => {
                        let _ = f.sync_all();
                        return Synced::Done;
                    }
                    Ok(_) => why = "its name now names another file".into(),
                    Err(e) => why = e.to_string(),
                },
                Err(e) => why = e.to_string(),
            }
        }
    }
    if lock(&reach.files).by_ino.contains_key(&ino) {
        Synced::Missed(why)
    } else {
        Synced::Nothing
    }
}

/// A file with an open handle but no name the kernel knows: unlinked (or renamed over)
/// while open, when its backing file has no link left, so no backup can hold it and its
/// cached writes do not matter; otherwise it has a name the mount was never asked for (a
/// hard link not looked up since the mount), which the drain cannot open.
fn nameless(reach: &MountParts, ino: u64) -> Synced {
    let of = {
        let files = lock(&reach.files);
        let Some(fh) = files.by_ino.get(&ino).and_then(|v| v.first()) else {
            return Synced::Nothing;
        };
        files.by_fh.get(fh).map(|(_, of)| of.clone())
    };
    let Some(of) = of else {
        return Synced::Nothing;
    };
    match reach.vol.attr(crate::volume::Target::File(&of)) {
        Ok(a) if a.nlink == 0 => Synced::Nothing,
        Ok(_) => {
            Synced::Missed("it has no name the mount knows (a hard link not looked up)".into())
        }
        Err(e) => Synced::Missed(e.to_string()),
    }
}

/// Opens the file at `parts` below the mount's root `root`: read-only, or write-only where
/// reading is refused (a file of mode 0200), never creating or truncating. No symlink is
/// followed and the walk stays in the mount (`RESOLVE_BENEATH`, `RESOLVE_NO_SYMLINKS`,
/// `RESOLVE_NO_XDEV`); `O_NONBLOCK`, so that a FIFO a rename put there does not block.
/// Opening changes nothing of the file (no read: its atime stays). A path longer than
/// `PATH_MAX` is walked in pieces, each directory held by an `O_PATH` descriptor.
fn open_path(root: &File, parts: &[std::ffi::OsString]) -> std::io::Result<File> {
    use rustix::fs::{openat2, Mode, OFlags, ResolveFlags};
    // Bytes of a path argument, its NUL included (PATH_MAX).
    const PATH_MAX: usize = 4096;
    let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_XDEV;
    let base = OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NOFOLLOW | OFlags::NONBLOCK;
    let mut dir: Option<std::os::fd::OwnedFd> = None;
    let mut rest = parts;
    loop {
        let (mut n, mut len) = (0, 0);
        while n < rest.len() && len + rest[n].len() + 1 < PATH_MAX {
            len += rest[n].len() + 1;
            n += 1;
        }
        if n == 0 {
            return Err(std::io::Error::from_raw_os_error(libc::ENAMETOOLONG));
        }
        let path: std::path::PathBuf = rest[..n].iter().collect();
        let at = match &dir {
            Some(d) => d.as_fd(),
            None => root.as_fd(),
        };
        if n < rest.len() {
            let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
            dir = Some(openat2(at, &path, flags, Mode::empty(), resolve)?);
            rest = &rest[n..];
            continue;
        }
        let fd = match openat2(at, &path, base | OFlags::RDONLY, Mode::empty(), resolve) {
            Err(rustix::io::Errno::ACCESS) => {
                openat2(at, &path, base | OFlags::WRONLY, Mode::empty(), resolve)?
            }
            r => r?,
        };
        return Ok(File::from(fd));
    }
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
