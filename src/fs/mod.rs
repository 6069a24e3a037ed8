//! The FUSE adapter: translates kernel requests into [`Volume`] calls. Thin by design: it
//! keeps the tables FUSE needs (inodes, open files, directory listings) and nothing else;
//! the format, the ciphers, the locking and every system call on the backing store live in
//! `volume`.
//!
//! One file per family of operations, as gocryptfs's frontend: `nodes` (the inode table and
//! how an inode is reached), `dir_ops` (lookup, mkdir, mknod, symlink, unlink, rmdir,
//! listings), `open_create` (create, open, read, write, fsync, release, allocation, copy),
//! `attr` (getattr, setattr, statfs, access), `rename_link`, `xattr`, `wb_errors` (what
//! FLUSH and FSYNC report of refused write-backs). The `Filesystem`
//! trait impl below only dispatches to them.

mod attr;
mod dir_ops;
mod drain;
mod held_writes;
mod nodes;
mod open_create;
mod payload;
mod rename_link;
mod wb_errors;
mod xattr;

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BsdFileFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, INodeNo,
    KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite,
    Request, TimeOrNow, WriteFlags,
};

pub use drain::{DrainError, Drained};
pub use nodes::NodeTable;

use crate::volume::{Attr, Caller, Dir, OpenFile, Target, Volume, VolumeError};
use payload::Payload;

/// How long the kernel may cache attributes and entries by default
/// ([`FsOptions::cache_timeout`]). Everything done through the mount keeps the kernel's
/// caches right on its own, and a revocation drops them explicitly
/// ([`invalidate_kernel_caches`]), so the timeout only bounds how late a change made to the
/// backing directory behind the mount shows.
pub const DEFAULT_CACHE_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest write the kernel may send (its own limit is 256 pages).
pub const MAX_WRITE: u32 = 1 << 20;

/// Background requests (write-backs, readahead) the kernel keeps in flight at most
/// (`max_background`; the congestion threshold is 3/4 of it). fuser's default is 16.
pub const MAX_BACKGROUND: u16 = 64;

type FsResult<T> = Result<T, VolumeError>;

/// Drops every cached page, attribute and dentry the kernel holds for this mount. Must run
/// on its own thread, never inside a request handler (the kernel waits on page locks held by
/// in-flight reads, which wait on the daemon).
pub fn invalidate_kernel_caches(table: &NodeTable, notifier: &fuser::Notifier) -> (usize, usize) {
    let (inodes, entries) = table.invalidation_targets();
    let mut done = (0, 0);
    for ino in &inodes {
        // Offset 0, length 0: all pages of the inode, and its attributes.
        if notifier.inval_inode(INodeNo(*ino), 0, 0).is_ok() {
            done.0 += 1;
        }
    }
    for (parent, name) in &entries {
        if notifier.inval_entry(INodeNo(*parent), name).is_ok() {
            done.1 += 1;
        }
    }
    done
}

/// One entry of a directory listing: inode and type as listed at opendir (what a reply
/// sends when it cannot read them again), and the backing name (`None` for `.` and `..`).
struct DirEntry {
    ino: u64,
    kind: FileType,
    name: OsString,
    bname: Option<OsString>,
}

struct DirSnapshot {
    entries: Vec<DirEntry>,
    /// The node table's epoch when taken: backing names of an older one are stale.
    epoch: u64,
}

/// The open files: by handle, and the handles of each inode (how a file with no name left
/// is still reached by requests that carry no handle).
#[derive(Default)]
struct Files {
    by_fh: HashMap<u64, (u64, Arc<OpenFile>)>,
    by_ino: HashMap<u64, Vec<u64>>,
    /// Refused write-backs and what each handle has reported of them.
    wb: wb_errors::WbErrors,
    /// Drops the kernel's pages of a file whose write-back was refused.
    refused_pages: wb_errors::RefusedPages,
}

/// GETATTRs parked during a backup's quiesce (`drain`), answered when it ends.
#[derive(Default)]
struct Parked {
    on: bool,
    getattrs: Vec<(INodeNo, Option<FileHandle>, ReplyAttr)>,
}

/// Kernel-side choices of a mount.
#[derive(Clone, Copy, Debug, Default)]
pub struct FsOptions {
    /// Offer FUSE_WRITEBACK_CACHE: the kernel keeps written pages and sends them later in
    /// large requests; it then owns file sizes and mtimes, and errors of cached writes
    /// surface at fsync or close.
    pub writeback_cache: bool,
    /// Experimental: ask for FUSE over io_uring (`FUSE_OVER_IO_URING`, Linux 6.14+ with the
    /// fuse module's `enable_uring` on); requests then arrive on one ring per CPU instead of
    /// `read(2)` on /dev/fuse (vendor/fuser/CMKFS-PATCH.md, docs/PERFORMANCE.md).
    pub io_uring: bool,
    /// How long the kernel may cache entries and attributes (`None`:
    /// [`DEFAULT_CACHE_TIMEOUT`]; zero: ask the daemon every time).
    pub cache_timeout: Option<Duration>,
}

/// The FUSE filesystem of one mounted volume.
pub struct CmkFs {
    opts: FsOptions,
    /// Entry and attribute timeout given to the kernel.
    ttl: Duration,
    vol: Arc<Volume>,
    table: Arc<NodeTable>,
    files: Arc<Mutex<Files>>,
    dirs: Mutex<HashMap<u64, Arc<DirSnapshot>>>,
    next_fh: AtomicU64,
    parked: Arc<Mutex<Parked>>,
    /// Set (for good) before the first refused write-back is recorded in
    /// `Files::wb`: until then every FLUSH and FSYNC has nothing to report or catch up,
    /// and is answered without the open-files lock (a `close` sends FLUSH right before
    /// its RELEASE, which takes that lock: the two met on it at every other close).
    /// Shared with every [`CmkFs::view`]: a held WRITE answered there may be refused.
    wb_refused: Arc<AtomicBool>,
    /// WRITEs a backup's freeze holds, answered by a thread of their own after the thaw.
    held: Arc<held_writes::HeldWrites>,
}

/// What every handle on one mount's filesystem shares: the FUSE threads' [`CmkFs`], the
/// control thread's [`OnlineHandle`], and the views either makes for a thread of the
/// daemon's own ([`MountParts::view`]).
#[derive(Clone)]
struct MountParts {
    /// The mount's choices (a backup's freeze drains cached writes first).
    opts: FsOptions,
    /// Entry and attribute timeout given to the kernel.
    ttl: Duration,
    vol: Arc<Volume>,
    table: Arc<NodeTable>,
    files: Arc<Mutex<Files>>,
    parked: Arc<Mutex<Parked>>,
    /// [`CmkFs::wb_refused`]: a held WRITE answered by a view may be refused.
    wb_refused: Arc<AtomicBool>,
    held: Arc<held_writes::HeldWrites>,
}

impl MountParts {
    /// A filesystem on these parts whose new handles count from `next_fh`.
    fn fs(self, next_fh: u64) -> CmkFs {
        let MountParts {
            opts,
            ttl,
            vol,
            table,
            files,
            parked,
            wb_refused,
            held,
        } = self;
        CmkFs {
            opts,
            ttl,
            vol,
            table,
            files,
            dirs: Mutex::default(),
            next_fh: AtomicU64::new(next_fh),
            parked,
            wb_refused,
            held,
        }
    }

    /// The mount's filesystem for a thread of the daemon's own (it answers requests kept
    /// from the FUSE threads: a backup's parked GETATTRs, held WRITEs); directory listings
    /// and new handles are not its business.
    fn view(&self) -> CmkFs {
        self.clone().fs(0)
    }
}

/// The filesystem's side of an online re-encryption
/// ([`crate::volume::reencrypt::Online`]) and of a backup's freeze (`drain`).
pub struct OnlineHandle {
    parts: MountParts,
    /// The session's notifier, set once the session exists ([`OnlineHandle::set_notifier`]).
    notifier: std::sync::OnceLock<fuser::Notifier>,
}

impl crate::volume::reencrypt::Online for OnlineHandle {
    fn names_changed(
        &self,
        ids: &crate::volume::reencrypt::DirIds,
        keys: &crate::crypto::VolumeKeys,
    ) {
        self.parts.table.rekey(|parent, name| {
            let id = ids.get(&parent)?;
            crate::volume::names::encrypt(&keys.names, id, name)
                .ok()
                .map(|b| b.entry().to_os_string())
        });
    }

    fn symlinks_replaced(&self, replaced: Vec<crate::volume::reencrypt::ReplacedSymlink>) {
        self.parts.table.symlinks_replaced(replaced);
    }

    fn open_files(&self) -> Vec<Arc<OpenFile>> {
        lock(&self.parts.files)
            .by_fh
            .values()
            .map(|(_, of)| of.clone())
            .collect()
    }
}

impl OnlineHandle {
    /// Gives the handle the session's notifier (kernel cache invalidation); the
    /// filesystem's pages of refused write-backs are dropped from then on.
    pub fn set_notifier(&self, n: fuser::Notifier) {
        lock(&self.parts.files).refused_pages.start(n.clone());
        let _ = self.notifier.set(n);
    }

    /// The volume.
    pub fn volume(&self) -> &Arc<Volume> {
        &self.parts.vol
    }
}

/// What a request's inode resolves to.
enum Resolved {
    /// A directory, held open.
    Dir(Arc<Dir>),
    /// A non-directory by its name: parent directory and backing name.
    At(Arc<Dir>, OsString),
    /// An open handle of the inode.
    File(Arc<OpenFile>),
}

impl Resolved {
    fn target(&self) -> Target<'_> {
        match self {
            Resolved::Dir(d) => Target::Dir(d),
            Resolved::At(d, n) => Target::At(d, n),
            Resolved::File(f) => Target::File(f),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn enoent() -> VolumeError {
    VolumeError::Os(std::io::Error::from_raw_os_error(libc::ENOENT))
}

fn ebadf() -> VolumeError {
    VolumeError::Os(std::io::Error::from_raw_os_error(libc::EBADF))
}

fn kind_of(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

fn time((secs, nsecs): (i64, u32)) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsecs)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + Duration::from_nanos(nsecs as u64)
    }
}

fn caller(req: &Request, umask: u32) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
        umask,
    }
}

fn fattr(ino: u64, a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: a.size,
        blocks: a.blocks,
        atime: time(a.atime),
        mtime: time(a.mtime),
        ctime: time(a.ctime),
        crtime: time(a.mtime),
        kind: kind_of(a.mode),
        perm: (a.mode & 0o7777) as u16,
        nlink: a.nlink as u32,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev as u32,
        blksize: 4096,
        flags: 0,
    }
}

impl CmkFs {
    /// Wraps an open volume, with the default options.
    pub fn new(vol: Arc<Volume>) -> CmkFs {
        Self::with_options(vol, FsOptions::default())
    }

    /// Wraps an open volume.
    pub fn with_options(vol: Arc<Volume>, opts: FsOptions) -> CmkFs {
        let table = Arc::new(NodeTable::new(&vol));
        MountParts {
            ttl: opts.cache_timeout.unwrap_or(DEFAULT_CACHE_TIMEOUT),
            opts,
            vol,
            table,
            files: Arc::default(),
            parked: Arc::default(),
            wb_refused: Arc::default(),
            held: Arc::default(),
        }
        .fs(1)
    }

    /// What this filesystem shares with every other handle on the mount.
    fn parts(&self) -> MountParts {
        MountParts {
            opts: self.opts,
            ttl: self.ttl,
            vol: self.vol.clone(),
            table: self.table.clone(),
            files: self.files.clone(),
            parked: self.parked.clone(),
            wb_refused: self.wb_refused.clone(),
            held: self.held.clone(),
        }
    }

    /// The same filesystem for a thread of the daemon's own ([`MountParts::view`]).
    fn view(&self) -> CmkFs {
        self.parts().view()
    }

    /// The volume served.
    pub fn volume(&self) -> &Arc<Volume> {
        &self.vol
    }

    /// The inode table, for the revocation monitor.
    pub fn node_table(&self) -> Arc<NodeTable> {
        self.table.clone()
    }

    /// What an online re-encryption run by the mount's control thread needs of the
    /// filesystem.
    pub fn online(&self) -> OnlineHandle {
        OnlineHandle {
            parts: self.parts(),
            notifier: std::sync::OnceLock::new(),
        }
    }

    /// The errno for a failed request; notable errors are logged with the absolute backing
    /// path: that of `ino` (the inode of the request, or the directory of a name-based one),
    /// joined with the backing name the error names when it is an entry inside it.
    fn errno(&self, e: &VolumeError, op: &str, ino: Option<INodeNo>) -> Errno {
        if e.is_notable() {
            let mut path = ino
                .and_then(|i| self.table.backing_path(i.0))
                .map(|p| self.vol.root().join(p))
                .unwrap_or_else(|| PathBuf::from(self.vol.root()));
            if let VolumeError::CorruptFile {
                path: Some(name), ..
            } = e
            {
                if !path.ends_with(name) {
                    path.push(name);
                }
            }
            tracing::warn!(op, path = %path.display(), error = %e.detail(), "request failed");
        }
        Errno::from_i32(e.errno())
    }

    /// Records an entry handed to the kernel (`fresh`: an object just made) and returns its
    /// FUSE attributes and generation.
    fn remember(
        &self,
        parent: INodeNo,
        name: &OsStr,
        bname: &OsStr,
        a: &Attr,
        fresh: bool,
    ) -> (FileAttr, fuser::Generation) {
        let (ino, generation) = self.table.remember(parent.0, name, bname, a, fresh);
        if fresh && self.wb_refused.load(Ordering::SeqCst) {
            // A new file under a reused inode number takes over no refused write-back of
            // the old one (`wb_errors`; none before the mount's first refusal).
            lock(&self.files).wb.forgotten(ino);
        }
        (fattr(ino, a), fuser::Generation(generation))
    }

    /// Directory inode `ino`, held open.
    fn dir(&self, ino: INodeNo) -> FsResult<Arc<Dir>> {
        self.table.dir(&self.vol, ino.0)
    }

    /// The entry and attribute timeout of a reply: none during a backup's quiesce, so that
    /// the kernel holds no valid attributes of a file then (see `Gates`).
    fn attr_ttl(&self) -> &Duration {
        if self.vol.gates().quiescing() {
            &Duration::ZERO
        } else {
            &self.ttl
        }
    }

    fn file(&self, fh: FileHandle) -> FsResult<Arc<OpenFile>> {
        lock(&self.files)
            .by_fh
            .get(&fh.0)
            .map(|(_, of)| of.clone())
            .ok_or_else(ebadf)
    }

    /// `EACCES` once the keys are gone (revocation): every request that reaches an inode goes
    /// through [`CmkFs::resolve`] or [`CmkFs::resolve_inode`], and neither a handle opened
    /// before the cut-off nor a name the node table still knows may change or describe it
    /// then (attack session 8, F3: `fchmod`, `fchown`, `futimens` through a descriptor opened
    /// before the cut-off were applied to the backing file; F1: `fstat` answered).
    fn require_keys(&self) -> FsResult<()> {
        self.vol
            .keyring()
            .keys::<crate::volume::VolumeError>()
            .map(drop)
    }

    /// Any open handle of inode `ino`.
    fn any_handle_of(&self, ino: INodeNo) -> Option<Arc<OpenFile>> {
        let files = lock(&self.files);
        let fh = files.by_ino.get(&ino.0)?.first()?;
        files.by_fh.get(fh).map(|(_, of)| of.clone())
    }

    /// What inode `ino` resolves to: the handle the request names; a directory's
    /// descriptor; a file's name; or, for a file with no name left, any open handle.
    fn resolve(&self, ino: INodeNo, fh: Option<FileHandle>) -> FsResult<Resolved> {
        self.require_keys()?;
        if let Some(of) = fh.and_then(|h| self.file(h).ok()) {
            return Ok(Resolved::File(of));
        }
        match self.table.kind(ino.0) {
            Some(libc::S_IFDIR) => Ok(Resolved::Dir(self.dir(ino)?)),
            Some(_) => {
                // Every name, freshest first: the kernel forgets a directory once no entry
                // below it is in use (memory pressure) while the inode stays known by
                // another name (a hard link elsewhere, a descriptor), and a name in a
                // directory it forgot cannot be reached until it is looked up again.
                for l in self.table.links(ino.0) {
                    match self.dir(INodeNo(l.parent)) {
                        Ok(d) => return Ok(Resolved::At(d, l.bname)),
                        Err(e) if e.errno() != libc::ENOENT => return Err(e),
                        Err(_) => {}
                    }
                }
                self.any_handle_of(ino)
                    .map(Resolved::File)
                    .ok_or_else(enoent)
            }
            None => self
                .any_handle_of(ino)
                .map(Resolved::File)
                .ok_or_else(enoent),
        }
    }

    /// What inode `ino` resolves to for a request about the inode itself (attributes,
    /// xattrs): like [`CmkFs::resolve`], but a non-directory with an open handle is reached
    /// through that handle. The handle is that inode by construction, so this is what the
    /// name would reach once checked (`change` pins a name to the inode and falls back to a
    /// handle anyway), without opening and checking the name: while a program holds a file
    /// open (`tar` setting owner, mode and times before `close`), each request is one
    /// system call on the backing store instead of four.
    fn resolve_inode(&self, ino: INodeNo, fh: Option<FileHandle>) -> FsResult<Resolved> {
        self.require_keys()?;
        if fh.is_none() && !matches!(self.table.kind(ino.0), Some(libc::S_IFDIR)) {
            if let Some(of) = self.any_handle_of(ino) {
                return Ok(Resolved::File(of));
            }
        }
        self.resolve(ino, fh)
    }

    /// Runs the change `f` on what `r` reaches, pinned to inode `ino` when `r` is a name: a
    /// change never lands on whatever took the name over behind the kernel's back (see
    /// `volume::Pinned`). A name that now holds another inode falls back to an open handle
    /// of `ino`, else `ENOENT`.
    fn change<T>(
        &self,
        ino: INodeNo,
        r: &Resolved,
        f: impl FnOnce(Target<'_>) -> FsResult<T>,
    ) -> FsResult<T> {
        let Resolved::At(d, b) = r else {
            return f(r.target());
        };
        match self.vol.pin(d, b, Some(self.table.backing_ino(ino.0))) {
            Ok(p) => f(Target::Pinned(&p)),
            Err(e) if e.errno() == libc::ENOENT => match self.any_handle_of(ino) {
                Some(of) => f(Target::File(&of)),
                None => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    /// Attributes through `r`, checked to be inode `ino` (a name taken over by another inode
    /// behind our back falls back to an open handle, else ENOENT).
    fn attr_of(&self, ino: INodeNo, r: &Resolved) -> FsResult<Attr> {
        let a = match self.vol.attr(r.target()) {
            Err(e) if e.errno() == libc::ENOENT && matches!(r, Resolved::At(..)) => None,
            r => Some(r?),
        };
        match a {
            Some(a) if a.ino == self.table.backing_ino(ino.0) => Ok(a),
            // A re-encryption replaces a symlink whole (its target is sealed again under the
            // new key): under the same name, it is the same symlink.
            Some(a)
                if a.kind() == libc::S_IFLNK
                    && self.table.kind(ino.0) == Some(libc::S_IFLNK)
                    && matches!(r, Resolved::At(..)) =>
            {
                Ok(a)
            }
            _ => match self.any_handle_of(ino) {
                Some(of) => self.vol.attr(Target::File(&of)),
                None => Err(enoent()),
            },
        }
    }
}

/// The xattr size protocol: size 0 asks for the length; too small a buffer is ERANGE.
fn xattr_reply(reply: fuser::ReplyXattr, size: u32, data: &[u8]) {
    if size == 0 {
        reply.size(data.len() as u32);
    } else if data.len() > size as usize {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(data);
    }
}

fn time_or_now(t: Option<TimeOrNow>) -> Option<Option<SystemTime>> {
    t.map(|t| match t {
        TimeOrNow::SpecificTime(t) => Some(t),
        TimeOrNow::Now => None,
    })
}

impl Filesystem for CmkFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if let Err(nearest) = config.set_max_write(MAX_WRITE) {
            let _ = config.set_max_write(nearest);
        }
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_PARALLEL_DIROPS);
        // Each WRITE a backup's freeze holds counts against the kernel's limit of background
        // requests until its reply, and readahead READs are background requests too: at the
        // default 16, a heavy writer's held write-backs made every read of uncached pages
        // wait for the thaw. Write-backs in flight are bounded by the FUSE device's dirty
        // limit (about 47 MiB here: 1 MiB WRITEs), so 64 leaves room for reads behind a
        // sequential writer (README, "Backups of a mounted volume").
        if let Err(nearest) = config.set_max_background(MAX_BACKGROUND) {
            let _ = config.set_max_background(nearest);
        }
        // Listings carry each entry's attributes (READDIRPLUS), so `ls -l`, `find` and
        // `rm -rf` need no LOOKUP per entry; AUTO lets the kernel fall back to plain READDIR
        // for a directory read again without lookups in between.
        let _ = config.add_capabilities(
            fuser::InitFlags::FUSE_DO_READDIRPLUS | fuser::InitFlags::FUSE_READDIRPLUS_AUTO,
        );
        // Pages kept across opens (FOPEN_KEEP_CACHE) are dropped when a refreshed size or
        // mtime differs from the cached one: a change behind the mount is not served stale
        // past the attribute timeout.
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_AUTO_INVAL_DATA);
        // Without it the kernel sends an O_DIRECT read or write of an asynchronous submitter
        // (libaio, io_uring) as a synchronous request: `io_submit` waits for the reply, so a
        // queue of 16 reaches the daemon one request at a time and extra FUSE threads have
        // nothing to do. With it the requests of one submitter (and the pieces of one direct
        // request above `max_read`) are in flight together; the kernel still sends a write
        // that extends the file synchronously (docs/PERFORMANCE.md, "Session 9: threads").
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_ASYNC_DIO);
        if self.opts.writeback_cache {
            let _ = config.add_capabilities(fuser::InitFlags::FUSE_WRITEBACK_CACHE);
        }
        if self.opts.io_uring
            && config
                .add_capabilities(fuser::InitFlags::FUSE_OVER_IO_URING)
                .is_err()
        {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "the kernel did not offer FUSE over io_uring (fuse module parameter enable_uring is off)",
            ));
        }
        // We clear setuid/setgid and file capabilities on write ourselves; in exchange the
        // kernel stops asking getxattr("security.capability") before every single write: the
        // flag sets SB_NOSEC, so the first write that finds no capability marks the inode
        // S_NOSEC (`file_remove_privs`) and later writes skip the question. Two per new file
        // are left and no reply or flag removes them (6.18): the first write after CREATE
        // (every attribute reply clears S_NOSEC, `fuse_change_attributes_common`) and each
        // chown (`notify_change` asks for ATTR_KILL_PRIV whatever S_NOSEC says). Only ENOSYS
        // to GETXATTR (`fc->no_getxattr`: every xattr and ACL gone) would stop them; the
        // daemon answers them without a system call instead (`Shared::may_have_cap`).
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_HANDLE_KILLPRIV_V2);
        // The kernel enforces POSIX ACLs (with default_permissions); we store them and keep
        // mode bits in step. With ACLs on, the umask is ours to apply (a default ACL
        // replaces it), so the kernel must pass modes unmasked.
        let _ = config
            .add_capabilities(fuser::InitFlags::FUSE_POSIX_ACL | fuser::InitFlags::FUSE_DONT_MASK);
        Ok(())
    }

    fn destroy(&mut self) {
        // The unmount: every pending directory id becomes durable before the daemon goes.
        if let Err(e) = self.vol.flush_ids() {
            tracing::error!(error = %e, "directory ids not made durable at unmount");
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _pass = self.vol.gates().read();
        self.do_lookup(parent, name, reply)
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.table.forget(ino.0, nlookup);
        if self.wb_refused.load(Ordering::SeqCst) && self.table.kind(ino.0).is_none() {
            // Gone from the kernel: a refused write-back kept for its next opener goes too.
            lock(&self.files).wb.forgotten(ino.0);
        }
    }

    fn getattr(&self, req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        // A cached `write(2)` asks for a regular file's attributes first once they are
        // invalid: a backup's quiesce parks it here (see `Gates`), holding no thread.
        if self.vol.gates().parks(req.pid()) && self.table.kind(ino.0) == Some(libc::S_IFREG) {
            let mut p = lock(&self.parked);
            if p.on {
                p.getattrs.push((ino, fh, reply));
                return;
            }
        }
        let _pass = self.vol.gates().read();
        self.do_getattr(ino, fh, reply)
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let set = crate::volume::SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: time_or_now(atime),
            mtime: time_or_now(mtime),
        };
        let _pass = self.vol.gates().write_in(ino == INodeNo::ROOT);
        self.do_setattr(ino, fh, &set, reply)
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let _pass = self.vol.gates().read();
        self.do_readlink(ino, reply)
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let _pass = self.vol.gates().write_in(parent == INodeNo::ROOT);
        self.do_mknod(caller(req, umask), parent, name, mode, rdev, reply)
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let _pass = self.vol.gates().write_in(parent == INodeNo::ROOT);
        self.do_mkdir(caller(req, umask), parent, name, mode, reply)
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _pass = self.vol.gates().write_in(parent == INodeNo::ROOT);
        self.do_unlink(parent, name, reply)
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _pass = self.vol.gates().write_in(parent == INodeNo::ROOT);
        self.do_rmdir(parent, name, reply)
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let _pass = self.vol.gates().write_in(parent == INodeNo::ROOT);
        self.do_symlink(caller(req, 0), parent, link_name, target, reply)
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let _pass = self
            .vol
            .gates()
            .write_in(parent == INodeNo::ROOT || newparent == INodeNo::ROOT);
        self.do_rename(parent, name, newparent, newname, flags.bits(), reply)
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let _pass = self.vol.gates().write_in(newparent == INodeNo::ROOT);
        self.do_link(ino, newparent, newname, reply)
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let _pass = self.vol.gates().read();
        self.do_open(ino, flags, reply)
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let _pass = self.vol.gates().read();
        self.do_read(ino, fh, offset, size, reply)
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        self.gated_write(ino, fh, offset, Payload::Shared(data), write_flags, reply)
    }

    /// Every WRITE over `/dev/fuse`: the payload is the request buffer, encrypted in place
    /// where it covers whole units (`payload`).
    fn write_mut(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &mut [u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        self.gated_write(ino, fh, offset, Payload::Mut(data), write_flags, reply)
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lo: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Sent at every close with the writeback cache, after the kernel wrote its dirty
        // pages back: reports a write-back the daemon refused since this handle last did
        // (see `wb_errors`: the daemon owns these errors, the kernel never hears of them).
        // A map look-up: no gate (a backup's freeze must not hold a reader's close),
        // no keys (after a revocation a refused write is still reported), no system call.
        // No lock is ours to release (the kernel keeps POSIX locks).
        // The lock owner tells processes apart (one per `files_struct`), so a forked child's
        // close does not use up its parent's report.
        self.do_flush(ino, fh, lo.0, reply)
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let _pass = self.vol.gates().read();
        self.do_release(fh, reply)
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _pass = self.vol.gates().read();
        self.do_fsync(ino, fh, datasync, reply)
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let _pass = self.vol.gates().read();
        self.do_opendir(ino, reply)
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectory,
    ) {
        let _pass = self.vol.gates().read();
        self.do_readdir(ino, fh, offset, reply)
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectoryPlus,
    ) {
        let _pass = self.vol.gates().read();
        self.do_readdirplus(ino, fh, offset, reply)
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        lock(&self.dirs).remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _pass = self.vol.gates().read();
        self.do_fsyncdir(ino, reply)
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let _pass = self.vol.gates().read();
        self.do_statfs(reply)
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let _pass = self.vol.gates().write();
        self.do_setxattr(ino, name, value, flags, reply)
    }

    fn getxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        size: u32,
        reply: fuser::ReplyXattr,
    ) {
        let _pass = self.vol.gates().read();
        self.do_getxattr(ino, name, size, reply)
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: fuser::ReplyXattr) {
        let _pass = self.vol.gates().read();
        self.do_listxattr(ino, size, reply)
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _pass = self.vol.gates().write();
        self.do_removexattr(ino, name, reply)
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        let _pass = self.vol.gates().read();
        self.do_access(ino, reply)
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let _pass = self.vol.gates().write_in(parent == INodeNo::ROOT);
        self.do_create(caller(req, umask), parent, name, mode, flags, reply)
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let _pass = self.vol.gates().write();
        self.do_fallocate(ino, fh, offset, length, mode, reply)
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        _ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: fuser::CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        let _pass = self.vol.gates().write();
        self.do_copy_file_range(fh_in, offset_in, fh_out, offset_out, len, reply)
    }
}
