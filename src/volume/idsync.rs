//! How a new directory's id (`.cmkfs.dirid`) is made durable before `mkdir` renames the
//! directory into place, decided once per backing filesystem.
//!
//! The promise: no crash can leave the directory under its final name with an id that is
//! missing, short or zero — every name in it, old files later moved in included, is
//! encrypted under that id and could never be decrypted again. `fsync` of the id file keeps
//! it anywhere, at the price of a journal commit and a device cache flush per `mkdir`.
//!
//! On ext4 with a journal in `data=ordered` mode, waiting for the id's own write-back
//! (`sync_file_range` with `WAIT_BEFORE | WRITE | WAIT_AFTER`, no commit, no flush) keeps it
//! too. What that rests on, in Linux 6.18:
//!
//! - `fs/sync.c` `sync_file_range`: `WRITE` with both waits is a `WB_SYNC_ALL` write-out of
//!   the range (`filemap_fdatawrite_range`), so `fs/ext4/inode.c` `ext4_do_writepages` → `mpage_map_one_extent` → `ext4_map_blocks`
//!   allocates the delayed block and sets the on-disk size (`mpage_map_and_submit_extent`)
//!   under a journal handle; `WAIT_AFTER` (`file_fdatawait_range`) returns once the page's
//!   write-back has ended, and reports a write-back error as `fsync` would.
//! - With `dioread_nolock` (the default) that block is allocated *unwritten*
//!   (`EXT4_GET_BLOCKS_IO_CREATE_EXT`), which `ext4_map_blocks` does not put on the
//!   transaction's ordered-data list (`!(map->m_flags & EXT4_MAP_UNWRITTEN)`); it becomes
//!   written in `fs/ext4/page-io.c` `ext4_end_io_end` → `ext4_convert_unwritten_io_end_vec`
//!   (its own handle, stopped) *before* `ext4_release_io_end` → `ext4_finish_bio` →
//!   `folio_end_writeback`. Start-only write-out (`WRITE` alone) is therefore not enough: the
//!   conversion could land in a transaction after the rename's, and a crash between them
//!   would leave a 16-byte id that reads as zeros. With `WAIT_AFTER` every handle that placed
//!   the id has stopped before the rename starts its own.
//! - Without `dioread_nolock` the block is allocated written and `ext4_map_blocks` adds the
//!   inode to the ordered list (`ext4_jbd2_inode_add_wait`); `fs/jbd2/commit.c`
//!   `jbd2_journal_commit_transaction` waits for those pages
//!   (`journal_finish_inode_data_buffers`) before it submits the commit record.
//! - jbd2 commits transactions in tid order and recovery (`fs/jbd2/recovery.c`
//!   `do_one_pass`) replays only up to the first transaction without a valid commit block;
//!   the commit record goes out with `REQ_PREFLUSH | REQ_FUA` (`journal_submit_commit_record`,
//!   barrier on, not `journal_async_commit`, which ext4 refuses with `data=ordered`:
//!   `fs/ext4/super.c`), which flushes the id's completed data write from the device cache
//!   first. So a recovered state that holds the rename holds the id's allocation, size,
//!   written extent and bytes.
//! - An inherited `+j` (data journaling) or inline data puts the id's bytes in the journal at
//!   `write` time, before the rename either way.
//!
//! tmpfs keeps the `fsync` (free there). Everything else — ext4 without a journal (no
//! ordering at all: the machine this was measured on), `data=writeback`, `data=journal`,
//! `nobarrier`, DAX, fast commits (a rename within one directory may go into a fast commit,
//! `ext4_rename` only marks moves of a directory to another parent ineligible; that path was
//! not checked), xfs, btrfs, an ext4 whose options cannot be read — defers it
//! ([`PendingIds`]): the id file is fsynced by a background thread [`DEFER`] after the first
//! id of its batch was written (plus the time the batch's fsyncs take; at most
//! [`MAX_PENDING`] wait), and before the daemon does anything that could put an *existing* name under a
//! pending id or promise durability: every rename and link (an old file or directory moved
//! into the new directory or below it), every `fsync` and `fsyncdir`, and the unmount. The
//! crash window that is left: a power loss or kernel crash in that time after a `mkdir`,
//! with none of those in between, can bring the directory back with an empty or zero id; what is lost
//! with it is what was created inside it in that window and never asked to be durable (the
//! entries are still there, and `fsck` reports them). Nothing that existed before the
//! `mkdir` can be in it without the id having been fsynced first.
//!
//! A failed fsync of a deferred id (EIO, ENOSPC: a failing disk) is not reported once and
//! forgotten: the id stays pending with its bytes, and every later flush writes them into a
//! new file, fsyncs it, renames it over the id file and fsyncs the directory (a bare second
//! `fsync` returns 0 once the failed write-back marked the pages clean, and an in-place
//! rewrite was seen to leave the id file's inode without its extent on ext4 without a
//! journal), failing with the first failure's errno until that succeeds. Until then every rename, link, `fsync` and `fsyncdir` of the
//! volume fails (not only those under that directory: a failing disk, kept simple), the
//! mount's status says so ([`IdHealth`], `cmkfs status`), and the unmount logs it (and
//! `cmkfs umount` reports it). An id whose file has no name left (its directory removed) is
//! dropped.
//!
//! An fsync that returned 0 is not taken as proof either: the id is read back from the disk
//! (`Inner::verify`, `O_DIRECT`), and one the disk does not hold is a failed fsync (EIO,
//! rewritten as above). Attack 17 F2: a loop device whose image sits on a full tmpfs
//! acknowledged a third party's `syncfs` that wrote several ids in one request, short, and
//! no error reached anyone (the ids' fsyncs found clean pages and an unset `wb_err`).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use super::bufpool::{PoolBuf, DIO_ALIGN};
use super::names::DIRID_FILE;
use super::sys;

/// `EXT4_SUPER_MAGIC` (also ext2/ext3, which the ext4 driver mounts: their options say
/// whether a journal is there).
const EXT4_MAGIC: i64 = 0xEF53;
/// `TMPFS_MAGIC`.
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// How long a deferred id may wait for its background fsync (the crash window of
/// [`IdDurability::Deferred`]); `CMKFS_ID_DEFER_MS` changes it (tests hold ids back with it).
pub const DEFER: Duration = Duration::from_millis(100);

/// At most this many ids wait at once (each holds its file open): a `mkdir` that finds the
/// list full flushes it itself, so a tree made faster than the disk fsyncs stays bounded.
pub const MAX_PENDING: usize = 256;

/// How a new id file is made durable before its directory is renamed into place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdDurability {
    /// `fsync` of the id file (tmpfs).
    Fsync,
    /// Its write-back waited for (`sync_file_range` WAIT_BEFORE | WRITE | WAIT_AFTER): ext4
    /// with a journal, `data=ordered`, barriers on.
    WrittenBack,
    /// fsynced later by [`PendingIds`]: in the background, and before any rename, link,
    /// fsync or unmount.
    Deferred,
}

/// The decision per backing filesystem (`st_dev`), taken on its first `mkdir`.
static DECIDED: Mutex<Option<HashMap<u64, IdDurability>>> = Mutex::new(None);

/// How ids of new directories inside `dir` are made durable (cached per `st_dev`). Any doubt
/// (a failed `fstat`) answers [`IdDurability::Fsync`].
pub fn for_dir(dir: BorrowedFd<'_>) -> IdDurability {
    let Ok(st) = sys::fstat(dir) else {
        return IdDurability::Fsync;
    };
    let dev = st.st_dev;
    let mut map = DECIDED.lock().unwrap_or_else(|p| p.into_inner());
    *map.get_or_insert_with(HashMap::new)
        .entry(dev)
        .or_insert_with(|| decide(dir, dev))
}

fn decide(dir: BorrowedFd<'_>, dev: u64) -> IdDurability {
    let d = match sys::fs_magic(dir) {
        Ok(EXT4_MAGIC) if ext4_options(dev).is_some_and(|o| ordered_ext4(&o)) => {
            IdDurability::WrittenBack
        }
        Ok(TMPFS_MAGIC) | Err(_) => IdDurability::Fsync,
        Ok(_) => IdDurability::Deferred,
    };
    tracing::debug!(dev, durability = ?d, "directory ids on this backing filesystem");
    d
}

/// Every option of the ext4 filesystem on block device `dev`, defaults included
/// (`/proc/fs/ext4/<device>/options`, one per line). `/proc/self/mountinfo` cannot decide
/// this: it leaves out the default `data=ordered`, and shows no `data=` either when the
/// filesystem has no journal (the ext4 driver clears the data mode then), so "none shown"
/// means ordered or no journal at all.
fn ext4_options(dev: u64) -> Option<String> {
    let (maj, min) = (rustix::fs::major(dev), rustix::fs::minor(dev));
    // The block device's kernel name (`vda`, `loop0`, `dm-1`) is the ext4 superblock's s_id.
    let link = std::fs::read_link(format!("/sys/dev/block/{maj}:{min}")).ok()?;
    let name = link.file_name()?;
    std::fs::read_to_string(Path::new("/proc/fs/ext4").join(name).join("options")).ok()
}

/// Whether an ext4 options list (as `/proc/fs/ext4/<device>/options` prints it) has a
/// journal in `data=ordered` mode with barriers, and nothing that changes how data reaches
/// the disk (DAX) or how a rename is logged (fast commits).
pub fn ordered_ext4(options: &str) -> bool {
    let (mut ordered, mut barrier) = (false, false);
    for o in options.lines().map(str::trim) {
        match o {
            "data=ordered" => ordered = true,
            "barrier" => barrier = true,
            // 6.18 prints the fast-commit mount flag as `fc_debug_force` (seen on an image
            // made with `mkfs.ext4 -O fast_commit`).
            "nobarrier" | "journal_async_commit" | "fc_debug_force" => return false,
            _ if o.contains("fast_commit") => return false,
            _ if o.starts_with("dax") => return false,
            _ => {}
        }
    }
    ordered && barrier
}

/// Id files written but not fsynced yet ([`IdDurability::Deferred`]), and the thread that
/// fsyncs them within [`DEFER`]. [`PendingIds::flush`] makes every one durable before it
/// returns; dropping the set (the volume closing at unmount) flushes it too.
///
/// An id whose fsync failed stays pending, with its 16 bytes and its directory: Linux
/// reports a write-back error once and marks the pages clean, so a second `fsync` would
/// return 0 without the id being on the disk. Rewriting the bytes in place is not enough
/// either: on ext4 without a journal the failed fsync can leave the id file's inode
/// unwritten (seen: size 16, no extent, so zeros after a power cut) while the retry finds
/// it clean. Every later flush (the background thread's, and the one before each rename,
/// link, fsync, fsyncdir and the unmount) therefore writes a new id file (a temp name in the
/// directory), fsyncs it, renames it over `.cmkfs.dirid` and fsyncs the directory, and fails
/// with the first failure's errno until that succeeds: nothing moves under, or is promised
/// durable below, a directory whose id may not be on the disk.
pub struct PendingIds {
    inner: Arc<Inner>,
}

/// New directories' ids whose fsync failed and that are not durable yet (see [`PendingIds`]):
/// while there are any, every rename, link, `fsync` and `fsyncdir` of the volume fails.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotDurable {
    /// How many ids wait to be written again.
    pub ids: usize,
    /// The errno those requests fail with: the first failure of the oldest id.
    pub errno: i32,
    /// The error of the latest try, as the system words it (`No space left on device (os
    /// error 28)`).
    pub last_error: String,
    /// When the flushes began to fail (the first failure since all ids were last durable).
    pub since: SystemTime,
}

/// What the last flush of a volume's pending ids left not durable: a handle the mount's
/// monitor reads for its status file ([`PendingIds::health`]); cheap to clone and to read.
#[derive(Clone, Default)]
pub struct IdHealth(Arc<HealthState>);

#[derive(Default)]
struct HealthState {
    now: Mutex<Option<NotDurable>>,
    /// Told when a flush changed the count or the errno ([`IdHealth::on_change`]).
    changed: std::sync::OnceLock<Box<dyn Fn() + Send + Sync>>,
}

impl std::fmt::Debug for IdHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IdHealth({:?})", self.now())
    }
}

impl IdHealth {
    /// The ids not durable after the latest flush (`None`: every id written so far is).
    pub fn now(&self) -> Option<NotDurable> {
        lock(&self.0.now).clone()
    }

    /// Has `f` called after each flush that changed how many ids are not durable, or the
    /// errno they fail with (the monitor rewrites the status file at once). `f` runs on the
    /// flushing thread (a request's, or the background one's): it must be quick and never
    /// block. One only; a second is ignored.
    pub fn on_change(&self, f: impl Fn() + Send + Sync + 'static) {
        let _ = self.0.changed.set(Box::new(f));
    }

    /// Records what a flush left: `kept` ids not durable, failing with `errno` (`None`:
    /// none), the latest try's error `last_error`.
    fn flushed(&self, kept: usize, errno: Option<i32>, last_error: String) {
        let changed = {
            let mut now = lock(&self.0.now);
            let next = errno.filter(|_| kept > 0).map(|errno| NotDurable {
                ids: kept,
                errno,
                last_error,
                since: now.as_ref().map_or_else(SystemTime::now, |n| n.since),
            });
            let key = |n: &Option<NotDurable>| n.as_ref().map(|n| (n.ids, n.errno));
            let changed = key(&now) != key(&next);
            *now = next;
            changed
        };
        if changed {
            if let Some(f) = self.0.changed.get() {
                f();
            }
        }
    }
}

/// One id file waiting for its fsync.
struct Pending {
    file: File,
    /// The new directory (its descriptor follows it to its final name), where a failed id
    /// is written anew.
    dir: OwnedFd,
    /// What was written (the daemon made it), to write again after a failed fsync.
    id: [u8; 16],
    /// The errno of the first failed fsync; `Some` means the bytes must be rewritten first.
    failed: Option<i32>,
}

struct Inner {
    files: Mutex<Vec<Pending>>,
    /// Held for a whole flush, so a second caller waits for the ids the first one took
    /// rather than finding the list empty and going on before they are durable.
    flushing: Mutex<()>,
    wake: Condvar,
    closed: AtomicBool,
    started: AtomicBool,
    defer: Duration,
    /// Set by each flush, under `flushing`: read while a flush runs (which takes the ids
    /// out of `files`), it still says what the last one left.
    health: IdHealth,
    /// Tests: this many of the next fsyncs fail with `EIO`.
    #[cfg(test)]
    fail_next: std::sync::atomic::AtomicUsize,
    /// Tests: this many of the next read-backs find the id lost.
    #[cfg(test)]
    lose_next: std::sync::atomic::AtomicUsize,
    /// Tests: how many failed ids were written again.
    #[cfg(test)]
    rewrites: std::sync::atomic::AtomicUsize,
}

/// The first bytes of `f` (at most one [`DIO_ALIGN`] block) as the disk holds them: read
/// through a second, `O_DIRECT` open of the same file.
fn read_back(f: &File) -> io::Result<Vec<u8>> {
    let d = sys::reopen_direct(f.as_fd())?;
    let mut buf = PoolBuf::take_aligned(DIO_ALIGN);
    loop {
        match d.read_at(&mut buf[..], 0) {
            Ok(n) => return Ok(buf[..n].to_vec()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// A read-back that did not find the id just fsynced: `EIO`, worded for the status.
fn lost_write() -> io::Error {
    io::Error::other(
        "the id read back from the disk is not the one written: the device lost the write",
    )
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Default for PendingIds {
    fn default() -> PendingIds {
        let defer = std::env::var("CMKFS_ID_DEFER_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map_or(DEFER, Duration::from_millis);
        PendingIds::with_defer(defer)
    }
}

impl PendingIds {
    fn with_defer(defer: Duration) -> PendingIds {
        PendingIds {
            inner: Arc::new(Inner {
                files: Mutex::new(Vec::new()),
                flushing: Mutex::new(()),
                wake: Condvar::new(),
                closed: AtomicBool::new(false),
                started: AtomicBool::new(false),
                defer,
                health: IdHealth::default(),
                #[cfg(test)]
                fail_next: std::sync::atomic::AtomicUsize::new(0),
                #[cfg(test)]
                lose_next: std::sync::atomic::AtomicUsize::new(0),
                #[cfg(test)]
                rewrites: std::sync::atomic::AtomicUsize::new(0),
            }),
        }
    }
}

impl std::fmt::Debug for PendingIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PendingIds({})", lock(&self.inner.files).len())
    }
}

impl PendingIds {
    /// Adds the id file (`.cmkfs.dirid`) of directory `dir` to which `id` was written; the
    /// background thread starts on the first one. With [`MAX_PENDING`] waiting, flushes them
    /// all first (its error is returned).
    pub fn push(&self, dir: BorrowedFd<'_>, file: File, id: [u8; 16]) -> io::Result<()> {
        let dir = dir.try_clone_to_owned()?;
        let full = {
            let mut files = lock(&self.inner.files);
            files.push(Pending {
                file,
                dir,
                id,
                failed: None,
            });
            files.len() >= MAX_PENDING
        };
        if full {
            return self.flush();
        }
        if !self.inner.started.swap(true, Ordering::SeqCst) {
            let inner = Arc::clone(&self.inner);
            let spawned = std::thread::Builder::new()
                .name("cmkfs-dirids".into())
                .spawn(move || inner.background());
            if spawned.is_err() {
                // No thread: the next rename, link, fsync or the unmount still flushes.
                self.inner.started.store(false, Ordering::SeqCst);
            }
        }
        self.inner.wake.notify_one();
        Ok(())
    }

    /// Makes every pending id durable; returns once all are. While one is not (its fsync
    /// failed, now or in an earlier flush or the background thread, and rewriting it did
    /// not succeed yet), an error with the errno of its first failure; the others were
    /// still tried.
    pub fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }

    /// What the flushes leave not durable, for the mount's status.
    pub fn health(&self) -> IdHealth {
        self.inner.health.clone()
    }
}

impl Inner {
    fn flush(&self) -> io::Result<()> {
        let _one = lock(&self.flushing);
        let files = std::mem::take(&mut *lock(&self.files));
        let mut first = Ok(());
        let mut kept = Vec::new();
        let mut last_error = String::new();
        for mut p in files {
            if let Err(e) = self.make_durable(&mut p) {
                let errno = *p
                    .failed
                    .get_or_insert(e.raw_os_error().unwrap_or(libc::EIO));
                if self.unlinked(&p) {
                    // Its directory is gone (a failed mkdir cleaned up, or an rmdir): no name
                    // can ever be under this id.
                    continue;
                }
                tracing::error!(error = %e, "fsync of a new directory's id failed; kept, to be written again");
                last_error = e.to_string();
                if first.is_ok() {
                    first = Err(io::Error::from_raw_os_error(errno));
                }
                kept.push(p);
            }
        }
        self.health.flushed(
            kept.len(),
            first.as_ref().err().and_then(io::Error::raw_os_error),
            last_error,
        );
        if !kept.is_empty() {
            // Ahead of those pushed meanwhile: the oldest are retried first.
            let mut files = lock(&self.files);
            kept.append(&mut files);
            *files = kept;
        }
        first
    }

    /// fsyncs `p`'s file; if an earlier fsync failed, writes the id anew instead.
    fn make_durable(&self, p: &mut Pending) -> io::Result<()> {
        if p.failed.is_some() {
            return self.rewrite(p);
        }
        self.sync(&p.file)?;
        self.verify(&p.file, &p.id)
    }

    /// A new id file with `p`'s bytes, fsynced, renamed over the old one, the directory
    /// fsynced: nothing of what the failed fsync may have left unwritten is relied on.
    fn rewrite(&self, p: &mut Pending) -> io::Result<()> {
        #[cfg(test)]
        self.rewrites.fetch_add(1, Ordering::SeqCst);
        let dir = p.dir.as_fd();
        let tmp = sys::temp_name("dirid")?;
        let r = (|| {
            let mut f = sys::create_regular(dir, &tmp, 0o444)?;
            f.write_all(&p.id)?;
            self.sync(&f)?;
            self.verify(&f, &p.id)?;
            sys::rename(dir, &tmp, dir, OsStr::new(DIRID_FILE), 0)?;
            p.file = f;
            sys::fsync_dir(dir)
        })();
        if r.is_err() {
            let _ = sys::unlink(dir, &tmp);
        }
        r
    }

    /// `fsync` (tests: failed on demand).
    fn sync(&self, f: &File) -> io::Result<()> {
        #[cfg(test)]
        if self
            .fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        f.sync_all()
    }

    /// Reads the just-fsynced id back from the disk (`O_DIRECT`, past the page cache) and
    /// fails with `EIO` unless it is `id`: a device may acknowledge a write it did not do.
    /// Seen (attack 17 F2, Linux 6.18): a loop device whose image sits on a full tmpfs
    /// completes a short write as a success (`drivers/block/loop.c` `lo_complete_rq` only
    /// looks at short reads), so after a third party's `syncfs` merged several ids' blocks
    /// into one request, every fsync returned 0 with the ids' blocks never written. A
    /// filesystem that refuses `O_DIRECT` (`EINVAL`) or serves it from the page cache
    /// (inline data) cannot be checked this way; the fsync's word is taken there.
    fn verify(&self, f: &File, id: &[u8; 16]) -> io::Result<()> {
        #[cfg(test)]
        if self
            .lose_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(lost_write());
        }
        match read_back(f) {
            Ok(bytes) if bytes == id => Ok(()),
            Ok(_) => Err(lost_write()),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Whether `p`'s directory was removed (`st_nlink` 0: an `rmdir`, or a failed `mkdir`
    /// cleaning up).
    fn unlinked(&self, p: &Pending) -> bool {
        sys::fstat(p.dir.as_fd()).is_ok_and(|st| st.st_nlink == 0)
    }

    fn background(&self) {
        let mut failing = false;
        while !self.closed.load(Ordering::SeqCst) {
            {
                let files = lock(&self.files);
                // After a failure, the ids left are retried once a second, not in a loop.
                let (files, _) = self
                    .wake
                    .wait_timeout_while(files, Duration::from_secs(1), |f| {
                        (f.is_empty() || failing) && !self.closed.load(Ordering::SeqCst)
                    })
                    .unwrap_or_else(|p| p.into_inner());
                failing = false;
                if files.is_empty() {
                    continue;
                }
            }
            // Later mkdirs join the same batch.
            std::thread::sleep(self.defer);
            // A failure stays with its ids: every later flush reports it until they are written.
            failing = self.flush().is_err();
        }
    }
}

impl Drop for PendingIds {
    fn drop(&mut self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        self.inner.wake.notify_all();
        let _ = self.inner.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As this machine printed them (Linux 6.18): the root ext4 has no journal (no `data=`
    /// line), a fresh `mkfs.ext4` image mounted with defaults has `data=ordered`.
    #[test]
    fn options_decide() {
        let nojournal = "rw\nbsddf\ndioread_nolock\ndelalloc\nnojournal_checksum\nbarrier\n\
                         errors=continue\ncommit=5\n";
        let ordered = "rw\nbsddf\ndioread_nolock\ndelalloc\njournal_checksum\nbarrier\n\
                       data=ordered\ncommit=5\n";
        assert!(!ordered_ext4(nojournal));
        assert!(ordered_ext4(ordered));
        assert!(!ordered_ext4(
            &ordered.replace("data=ordered", "data=writeback")
        ));
        assert!(!ordered_ext4(
            &ordered.replace("data=ordered", "data=journal")
        ));
        assert!(!ordered_ext4(&ordered.replace("\nbarrier", "\nnobarrier")));
        assert!(!ordered_ext4(&format!("{ordered}dax=always\n")));
        assert!(!ordered_ext4(&format!("{ordered}fc_debug_force\n")));
        assert!(!ordered_ext4(""));
    }

    fn pending_len(p: &PendingIds) -> usize {
        lock(&p.inner.files).len()
    }

    /// A flush takes every pending id; without one, the background thread does within
    /// [`DEFER`] (waited for up to 10 s here, for a loaded machine).
    #[test]
    fn pending_ids_are_flushed_on_demand_and_in_the_background() {
        let dir = tempfile::tempdir().unwrap();
        let p = PendingIds::default();
        push_id(&p, dir.path(), "a", [1; 16]);
        push_id(&p, dir.path(), "b", [2; 16]);
        p.flush().unwrap();
        assert_eq!(pending_len(&p), 0);
        push_id(&p, dir.path(), "c", [3; 16]);
        let t0 = std::time::Instant::now();
        while pending_len(&p) > 0 && t0.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(pending_len(&p), 0, "the background thread flushed");
    }

    /// A directory `name` in `dir` with `id` written into its `.cmkfs.dirid`, as
    /// `write_dir_id` does, handed on; returns the id file's path.
    fn push_id(p: &PendingIds, dir: &Path, name: &str, id: [u8; 16]) -> std::path::PathBuf {
        let d = dir.join(name);
        std::fs::create_dir(&d).unwrap();
        let path = d.join(DIRID_FILE);
        let mut f = File::create(&path).unwrap();
        f.write_all(&id).unwrap();
        let dfd = File::open(&d).unwrap();
        p.push(dfd.as_fd(), f, id).unwrap();
        path
    }

    fn fail_next(p: &PendingIds, n: usize) {
        p.inner.fail_next.store(n, Ordering::SeqCst);
    }

    /// What the disk may hold after a failed fsync: not the id.
    fn lose(path: &Path) {
        std::fs::remove_file(path).unwrap();
        std::fs::write(path, [0u8; 16]).unwrap();
    }

    /// Attack 16 F1: a failed id fsync is reported to every later flush, not to one, and
    /// the id is written anew (a new file renamed over it: the failed write-back marked its
    /// pages clean and may have left its inode unwritten, so a bare second fsync would prove
    /// nothing) until its fsync succeeds.
    #[test]
    fn a_failed_id_fsync_fails_every_flush_until_the_id_is_rewritten_and_durable() {
        let dir = tempfile::tempdir().unwrap();
        // No background flush in this test: every flush is one of these calls.
        let p = PendingIds::with_defer(Duration::from_secs(3600));
        let id = *b"0123456789abcdef";
        let a = push_id(&p, dir.path(), "a", id);
        let health = p.health();
        assert_eq!(health.now(), None);
        let changes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let c = changes.clone();
        health.on_change(move || {
            c.fetch_add(1, Ordering::SeqCst);
        });
        fail_next(&p, 3);
        let mut since = None;
        for i in 0..3 {
            let e = p.flush().expect_err("an id not durable yet");
            assert_eq!(e.raw_os_error(), Some(libc::EIO), "flush {i}");
            assert_eq!(pending_len(&p), 1, "the failed id stays pending");
            // What `cmkfs status` shows: one id, the errno requests fail with, and the
            // time of the first failure, kept over the retries.
            let h = health.now().expect("reported as not durable");
            assert_eq!((h.ids, h.errno), (1, libc::EIO), "flush {i}");
            assert!(h.last_error.contains("os error 5"), "{}", h.last_error);
            assert_eq!(*since.get_or_insert(h.since), h.since, "flush {i}");
            lose(&a);
        }
        assert_eq!(p.inner.rewrites.load(Ordering::SeqCst), 2);
        p.flush().unwrap();
        assert_eq!(p.inner.rewrites.load(Ordering::SeqCst), 3);
        assert_eq!(pending_len(&p), 0);
        assert_eq!(health.now(), None, "cleared once the id is durable");
        // Told twice: when the id became not durable, and when it became durable again;
        // the failed retries between changed nothing the status shows but the latest error.
        assert_eq!(changes.load(Ordering::SeqCst), 2);
        assert_eq!(std::fs::read(&a).unwrap(), id);
        let names: Vec<_> = std::fs::read_dir(dir.path().join("a"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [DIRID_FILE], "no temp file left");
        p.flush().unwrap();

        // The id of a directory that is gone is given up.
        let b = push_id(&p, dir.path(), "b", [7; 16]);
        fail_next(&p, 1);
        assert!(p.flush().is_err());
        std::fs::remove_file(&b).unwrap();
        std::fs::remove_dir(dir.path().join("b")).unwrap();
        fail_next(&p, 1);
        p.flush().unwrap();
        assert_eq!(pending_len(&p), 0);
    }

    /// Attack 17 F2: an fsync that returned 0 for an id the device never wrote (a loop
    /// device completes a short write as a success) is caught by reading the id back past
    /// the page cache: the flush fails with EIO, the status says so, and the next flush
    /// writes a new id file. On a real disk the read-back finds the id and costs no retry.
    #[test]
    fn an_id_the_disk_lost_after_a_successful_fsync_is_written_again() {
        let dir = tempfile::tempdir().unwrap();
        let p = PendingIds::with_defer(Duration::from_secs(3600));
        let id = [5; 16];
        let a = push_id(&p, dir.path(), "a", id);
        p.inner.lose_next.store(1, Ordering::SeqCst);
        assert_eq!(p.flush().unwrap_err().raw_os_error(), Some(libc::EIO));
        let h = p.health().now().expect("reported as not durable");
        assert_eq!((h.ids, h.errno), (1, libc::EIO));
        assert!(h.last_error.contains("lost the write"), "{}", h.last_error);
        assert_eq!(pending_len(&p), 1);
        p.flush().unwrap();
        assert_eq!(p.inner.rewrites.load(Ordering::SeqCst), 1);
        assert_eq!(p.health().now(), None);
        assert_eq!(std::fs::read(&a).unwrap(), id);
        // The real read-back (no test hook): the disk has what was fsynced.
        let b = push_id(&p, dir.path(), "b", [6; 16]);
        p.flush().unwrap();
        assert_eq!(p.inner.rewrites.load(Ordering::SeqCst), 1, "no retry");
        assert_eq!(std::fs::read(&b).unwrap(), [6; 16]);
        let f = File::open(&b).unwrap();
        match read_back(&f) {
            Ok(bytes) => assert_eq!(bytes, [6; 16]),
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{e}"),
        }
    }

    /// The same when the background thread is the one whose fsync fails: the error is not
    /// its to keep, every flush after it fails until a new id file is durable.
    #[test]
    fn a_failed_background_id_fsync_fails_every_later_flush() {
        let dir = tempfile::tempdir().unwrap();
        let p = PendingIds::default();
        fail_next(&p, usize::MAX);
        let id = [9; 16];
        let c = push_id(&p, dir.path(), "c", id);
        let t0 = std::time::Instant::now();
        while p.inner.fail_next.load(Ordering::SeqCst) == usize::MAX
            && t0.elapsed() < Duration::from_secs(10)
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(
            p.inner.fail_next.load(Ordering::SeqCst) < usize::MAX,
            "the background thread tried"
        );
        for _ in 0..3 {
            assert_eq!(p.flush().unwrap_err().raw_os_error(), Some(libc::EIO));
        }
        lose(&c);
        fail_next(&p, 0);
        p.flush().unwrap();
        assert_eq!(std::fs::read(&c).unwrap(), id);
        assert_eq!(pending_len(&p), 0);
    }
}
