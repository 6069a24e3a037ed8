//! The FUSE adapter: translates kernel requests into [`Volume`] calls. Thin by design: it
//! keeps the inode and handle tables FUSE needs and nothing else; the format, the ciphers
//! and the locking live in `volume`.
//!
//! Inode numbers are the backing files' inode numbers (the root is 1), so hard links share
//! one number and numbers are stable across remounts.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BsdFileFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, KernelConfig, LockOwner, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

use crate::volume::{Attr, Caller, OpenFile, SetAttr, Volume, VolumeError};

/// How long the kernel may cache attributes and entries. Short, because a revocation must
/// not leave names usable from the dentry cache for long (it also invalidates explicitly).
const TTL: Duration = Duration::from_secs(1);
/// Largest write the kernel may send (its own limit is 256 pages).
pub const MAX_WRITE: u32 = 1 << 20;

/// One name of an inode: its parent, plaintext name and backing path.
#[derive(Clone)]
struct Link {
    parent: u64,
    name: std::ffi::OsString,
    path: PathBuf,
}

/// An inode the kernel knows. A hard-linked file may be known by several names; every one
/// the kernel looked up is kept, so unlinking one name leaves the others usable, and a
/// revocation can invalidate every dentry.
struct Node {
    nlookup: u64,
    /// Most recently used last. Never empty.
    links: Vec<Link>,
}

impl Node {
    fn path(&self) -> &Path {
        // `links` is never empty: nodes are created with one and the last is never removed.
        &self.links[self.links.len() - 1].path
    }
}

/// The inodes the kernel currently knows (handed out by lookup, create, readdirplus...).
/// Shared with the revocation monitor, which must invalidate every one of them.
#[derive(Default)]
pub struct NodeTable {
    nodes: Mutex<HashMap<u64, Node>>,
}

impl NodeTable {
    /// Every known inode, and every (parent, name) dentry the kernel may have cached.
    pub fn invalidation_targets(&self) -> (Vec<u64>, Vec<(u64, std::ffi::OsString)>) {
        let nodes = lock(&self.nodes);
        let inodes = nodes.keys().copied().collect();
        let entries = nodes
            .iter()
            .filter(|(ino, _)| **ino != INodeNo::ROOT.0)
            .flat_map(|(_, n)| n.links.iter().map(|l| (l.parent, l.name.clone())))
            .collect();
        (inodes, entries)
    }
}

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

/// One entry of a directory listing; `attr` (with the backing path) for readdirplus.
struct DirEntry {
    ino: u64,
    kind: FileType,
    name: std::ffi::OsString,
    attr: Option<(PathBuf, Attr)>,
}

struct DirSnapshot {
    entries: Vec<DirEntry>,
}

/// The FUSE filesystem of one mounted volume.
pub struct CmkFs {
    vol: Arc<Volume>,
    table: Arc<NodeTable>,
    /// Open files by handle, with the inode each belongs to.
    files: Mutex<HashMap<u64, (u64, Arc<OpenFile>)>>,
    dirs: Mutex<HashMap<u64, Arc<DirSnapshot>>>,
    next_fh: AtomicU64,
}

type FsResult<T> = Result<T, VolumeError>;

fn errno(e: &VolumeError, what: &str, path: &Path) -> Errno {
    if e.is_notable() {
        tracing::warn!(op = what, path = %path.display(), error = %e, "request failed");
    }
    Errno::from_i32(e.errno())
}

fn enoent() -> VolumeError {
    VolumeError::Os(std::io::Error::from_raw_os_error(libc::ENOENT))
}

fn kind_of(ft: std::fs::FileType) -> FileType {
    if ft.is_dir() {
        FileType::Directory
    } else if ft.is_symlink() {
        FileType::Symlink
    } else if ft.is_fifo() {
        FileType::NamedPipe
    } else if ft.is_socket() {
        FileType::Socket
    } else if ft.is_char_device() {
        FileType::CharDevice
    } else if ft.is_block_device() {
        FileType::BlockDevice
    } else {
        FileType::RegularFile
    }
}

fn time(secs: i64, nsecs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsecs as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + Duration::from_nanos(nsecs as u64)
    }
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
    }
}

impl CmkFs {
    /// Wraps an open volume.
    pub fn new(vol: Arc<Volume>) -> CmkFs {
        let table = NodeTable::default();
        lock(&table.nodes).insert(
            INodeNo::ROOT.0,
            Node {
                nlookup: 1,
                links: vec![Link {
                    parent: INodeNo::ROOT.0,
                    name: "/".into(),
                    path: vol.root().to_path_buf(),
                }],
            },
        );
        CmkFs {
            vol,
            table: Arc::new(table),
            files: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
        }
    }

    /// The volume served.
    pub fn volume(&self) -> &Arc<Volume> {
        &self.vol
    }

    /// The inode table, for the revocation monitor.
    pub fn node_table(&self) -> Arc<NodeTable> {
        self.table.clone()
    }

    fn ino_of(&self, a: &Attr) -> u64 {
        // The backing root keeps ino 1 in the plaintext view whatever its backing number.
        if a.meta.ino() == INodeNo::ROOT.0 {
            u64::MAX
        } else {
            a.meta.ino()
        }
    }

    fn fattr(&self, ino: u64, a: &Attr) -> FileAttr {
        let m = &a.meta;
        FileAttr {
            ino: INodeNo(ino),
            size: a.size,
            blocks: m.blocks(),
            atime: time(m.atime(), m.atime_nsec()),
            mtime: time(m.mtime(), m.mtime_nsec()),
            ctime: time(m.ctime(), m.ctime_nsec()),
            crtime: time(m.mtime(), m.mtime_nsec()),
            kind: kind_of(m.file_type()),
            perm: (m.mode() & 0o7777) as u16,
            nlink: m.nlink() as u32,
            uid: m.uid(),
            gid: m.gid(),
            rdev: m.rdev() as u32,
            blksize: 4096,
            flags: 0,
        }
    }

    /// The backing path of `ino` for log lines (empty when unknown).
    fn at(&self, ino: INodeNo) -> PathBuf {
        self.path(ino).unwrap_or_default()
    }

    fn path(&self, ino: INodeNo) -> FsResult<PathBuf> {
        lock(&self.table.nodes)
            .get(&ino.0)
            .map(|n| n.path().to_path_buf())
            .ok_or_else(enoent)
    }

    /// Records a lookup of `name` in `parent` (backing `path`) and returns the FUSE
    /// attributes for the reply.
    fn remember(&self, parent: INodeNo, name: &OsStr, path: PathBuf, a: &Attr) -> FileAttr {
        let ino = self.ino_of(a);
        let mut nodes = lock(&self.table.nodes);
        let link = Link {
            parent: parent.0,
            name: name.to_os_string(),
            path,
        };
        let n = nodes.entry(ino).or_insert(Node {
            nlookup: 0,
            links: Vec::new(),
        });
        n.nlookup += 1;
        // The freshest name goes last: it is the one most likely to still exist.
        n.links.retain(|l| l.path != link.path);
        n.links.push(link);
        drop(nodes);
        self.fattr(ino, a)
    }

    fn file(&self, fh: FileHandle) -> FsResult<Arc<OpenFile>> {
        lock(&self.files)
            .get(&fh.0)
            .map(|(_, of)| of.clone())
            .ok_or_else(|| VolumeError::Os(std::io::Error::from_raw_os_error(libc::EBADF)))
    }

    /// Any open handle of inode `ino`: how a file that is open but has no name left (unlinked
    /// while open) is still reached by requests that carry no handle (fstat, fchmod).
    fn any_handle_of(&self, ino: INodeNo) -> Option<Arc<OpenFile>> {
        lock(&self.files)
            .values()
            .find(|(i, _)| *i == ino.0)
            .map(|(_, of)| of.clone())
    }

    fn add_file(&self, ino: u64, of: OpenFile) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        lock(&self.files).insert(fh, (ino, Arc::new(of)));
        fh
    }

    fn getattr_of(&self, ino: INodeNo, fh: Option<FileHandle>) -> FsResult<FileAttr> {
        let attr = match (self.path(ino), fh.and_then(|h| self.file(h).ok())) {
            // With the handle the request names, stat the open file itself.
            (path, Some(of)) => {
                let meta = of.file().metadata().map_err(VolumeError::Os)?;
                self.vol.attr_from(&path.unwrap_or_default(), meta)?
            }
            (Ok(path), None) => match self.vol.attr(&path) {
                Err(e) if e.errno() == libc::ENOENT => match self.any_handle_of(ino) {
                    Some(of) => self
                        .vol
                        .attr_from(&path, of.file().metadata().map_err(VolumeError::Os)?)?,
                    None => return Err(e),
                },
                r => r?,
            },
            (Err(e), None) => match self.any_handle_of(ino) {
                Some(of) => self.vol.attr_from(
                    Path::new(""),
                    of.file().metadata().map_err(VolumeError::Os)?,
                )?,
                None => return Err(e),
            },
        };
        Ok(self.fattr(ino.0, &attr))
    }

    /// Follows a rename in the table: every backing path under `from` moves under `to` (and
    /// back for an exchange), and the renamed entry takes its new parent and name.
    fn renamed(&self, from: &Path, to: &Path, exchange: bool, newparent: INodeNo, newname: &OsStr) {
        let moved = |p: &Path, a: &Path, b: &Path| {
            p.strip_prefix(a).ok().map(|rest| {
                if rest.as_os_str().is_empty() {
                    b.to_path_buf()
                } else {
                    b.join(rest)
                }
            })
        };
        let mut nodes = lock(&self.table.nodes);
        for n in nodes.values_mut() {
            for l in &mut n.links {
                if let Some(p) = moved(&l.path, from, to) {
                    if l.path == from {
                        l.parent = newparent.0;
                        l.name = newname.to_os_string();
                    }
                    l.path = p;
                } else if exchange {
                    if let Some(p) = moved(&l.path, to, from) {
                        l.path = p;
                    }
                }
            }
        }
    }

    /// Forgets the name at backing `path` (unlink, rmdir, replaced by a rename): an inode
    /// with other names keeps them; its last name stays as is (an open handle answers).
    fn unlinked(&self, path: &Path) {
        let mut nodes = lock(&self.table.nodes);
        for n in nodes.values_mut() {
            if n.links.len() > 1 {
                n.links.retain(|l| l.path != path);
            }
        }
    }

    fn snapshot(&self, ino: INodeNo, plus: bool) -> FsResult<DirSnapshot> {
        let path = self.path(ino)?;
        let dot = |name: &str| DirEntry {
            ino: ino.0,
            kind: FileType::Directory,
            name: name.into(),
            attr: None,
        };
        let mut entries = vec![dot("."), dot("..")];
        for (name, p, meta) in self.vol.list(&path)? {
            let kind = kind_of(meta.file_type());
            let bino = meta.ino();
            let attr = if plus {
                self.vol.attr_from(&p, meta).ok()
            } else {
                None
            };
            let ino = attr.as_ref().map(|a| self.ino_of(a)).unwrap_or(bino);
            entries.push(DirEntry {
                ino,
                kind,
                name,
                attr: attr.map(|a| (p, a)),
            });
        }
        Ok(DirSnapshot { entries })
    }

    fn forget_n(&self, ino: u64, nlookup: u64) {
        if ino == INodeNo::ROOT.0 {
            return;
        }
        let mut nodes = lock(&self.table.nodes);
        if let Some(n) = nodes.get_mut(&ino) {
            n.nlookup = n.nlookup.saturating_sub(nlookup);
            if n.nlookup == 0 {
                nodes.remove(&ino);
            }
        }
    }

    fn dir(&self, fh: FileHandle) -> FsResult<Arc<DirSnapshot>> {
        lock(&self.dirs)
            .get(&fh.0)
            .cloned()
            .ok_or_else(|| VolumeError::Os(std::io::Error::from_raw_os_error(libc::EBADF)))
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
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
        // We clear setuid/setgid on write ourselves (FUSE_WRITE_KILL_SUIDGID); in exchange the
        // kernel stops asking getxattr("security.capability") before every single write.
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_HANDLE_KILLPRIV_V2);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let r = self
            .path(parent)
            .and_then(|dir| self.vol.lookup(&dir, name));
        match r {
            Ok((path, a)) => {
                reply.entry(&TTL, &self.remember(parent, name, path, &a), Generation(0))
            }
            Err(e) => reply.error(errno(&e, "lookup", Path::new(name))),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.forget_n(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.getattr_of(ino, fh) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(errno(&e, "getattr", &self.at(ino))),
        }
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
        let set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: time_or_now(atime),
            mtime: time_or_now(mtime),
        };
        // A named handle (ftruncate) is used; without one, the path, and if the file has no
        // name left (unlinked while open: fchmod, futimens), any open handle of the inode.
        let named = fh.and_then(|h| self.file(h).ok());
        let path = self.path(ino);
        let alive = path
            .as_ref()
            .map(|p| p.symlink_metadata().is_ok())
            .unwrap_or(false);
        let of = if named.is_some() || alive {
            named
        } else {
            self.any_handle_of(ino)
        };
        let r = match (path, &of) {
            (Ok(path), _) => self.vol.set_attr(&path, of.as_deref(), &set),
            (Err(_), Some(of)) => self.vol.set_attr(&self.at(ino), Some(of), &set),
            (Err(e), None) => Err(e),
        };
        match r {
            Ok(a) => reply.attr(&TTL, &self.fattr(ino.0, &a)),
            Err(e) => reply.error(errno(&e, "setattr", &self.at(ino))),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.path(ino).and_then(|p| self.vol.readlink(&p)) {
            Ok(t) => reply.data(std::os::unix::ffi::OsStrExt::as_bytes(t.as_os_str())),
            Err(e) => reply.error(errno(&e, "readlink", &self.at(ino))),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let r = self
            .path(parent)
            .and_then(|d| self.vol.mknod(&d, name, mode, rdev, caller(req)));
        match r {
            Ok((p, a)) => reply.entry(&TTL, &self.remember(parent, name, p, &a), Generation(0)),
            Err(e) => reply.error(errno(&e, "mknod", Path::new(name))),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let r = self
            .path(parent)
            .and_then(|d| self.vol.mkdir(&d, name, mode, caller(req)));
        match r {
            Ok((p, a)) => reply.entry(&TTL, &self.remember(parent, name, p, &a), Generation(0)),
            Err(e) => reply.error(errno(&e, "mkdir", Path::new(name))),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.path(parent).and_then(|d| self.vol.unlink(&d, name)) {
            Ok(p) => {
                self.unlinked(&p);
                reply.ok()
            }
            Err(e) => reply.error(errno(&e, "unlink", Path::new(name))),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.path(parent).and_then(|d| self.vol.rmdir(&d, name)) {
            Ok(p) => {
                self.unlinked(&p);
                reply.ok()
            }
            Err(e) => reply.error(errno(&e, "rmdir", Path::new(name))),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let r = self.path(parent).and_then(|d| {
            self.vol
                .symlink(&d, link_name, target.as_os_str(), caller(req))
        });
        match r {
            Ok((p, a)) => reply.entry(
                &TTL,
                &self.remember(parent, link_name, p, &a),
                Generation(0),
            ),
            Err(e) => reply.error(errno(&e, "symlink", Path::new(link_name))),
        }
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
        let r = self.path(parent).and_then(|d| {
            let nd = self.path(newparent)?;
            self.vol.rename(&d, name, &nd, newname, flags.bits())
        });
        match r {
            Ok((from, to)) => {
                let exchange = flags.bits() & libc::RENAME_EXCHANGE != 0;
                if !exchange {
                    // Whatever the destination name held before is gone.
                    self.unlinked(&to);
                }
                self.renamed(&from, &to, exchange, newparent, newname);
                reply.ok()
            }
            Err(e) => reply.error(errno(&e, "rename", Path::new(name))),
        }
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let r = self.path(ino).and_then(|p| {
            let nd = self.path(newparent)?;
            self.vol.link(&p, &nd, newname)
        });
        match r {
            Ok((p, a)) => reply.entry(
                &TTL,
                &self.remember(newparent, newname, p, &a),
                Generation(0),
            ),
            Err(e) => reply.error(errno(&e, "link", Path::new(newname))),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let write = flags.acc_mode() != OpenAccMode::O_RDONLY;
        match self.path(ino).and_then(|p| self.vol.open_file(&p, write)) {
            Ok(of) => reply.opened(FileHandle(self.add_file(ino.0, of)), FopenFlags::empty()),
            Err(e) => reply.error(errno(&e, "open", &self.at(ino))),
        }
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
        match self
            .file(fh)
            .and_then(|of| self.vol.read(&of, offset, size as usize))
        {
            Ok(buf) => reply.data(&buf),
            Err(e) => reply.error(errno(&e, "read", &self.at(ino))),
        }
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
        let kill = write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID);
        let r = self.file(fh).and_then(|of| {
            if kill {
                self.vol.kill_suidgid(&of)?;
            }
            self.vol.write(&of, offset, data)
        });
        match r {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(errno(&e, "write", &self.at(ino))),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lo: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Nothing is buffered in the daemon: every write reached the backing file already.
        reply.ok();
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
        lock(&self.files).remove(&fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.file(fh).and_then(|of| self.vol.fsync(&of, datasync)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e, "fsync", &self.at(ino))),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // Snapshot at open: offsets stay valid while entries change under a reader.
        match self.snapshot(ino, true) {
            Ok(s) => {
                let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
                lock(&self.dirs).insert(fh, Arc::new(s));
                reply.opened(FileHandle(fh), FopenFlags::empty());
            }
            Err(e) => reply.error(errno(&e, "opendir", Path::new(""))),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        // A listing snapshot holds plaintext names: serve it only while the keys are live.
        match self.vol.keyring().keys().and_then(|_| self.dir(fh)) {
            Ok(s) => {
                for (i, e) in s.entries.iter().enumerate().skip(offset as usize) {
                    if reply.add(INodeNo(e.ino), (i + 1) as u64, e.kind, &e.name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(errno(&e, "readdir", Path::new(""))),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let s = match self.vol.keyring().keys().and_then(|_| self.dir(fh)) {
            Ok(s) => s,
            Err(e) => return reply.error(errno(&e, "readdirplus", Path::new(""))),
        };
        for (i, e) in s.entries.iter().enumerate().skip(offset as usize) {
            let full = match &e.attr {
                // Entries handed out with attributes count as lookups, as the kernel expects.
                Some((p, a)) => self.remember(ino, &e.name, p.clone(), a),
                None => {
                    match self.getattr_of(if e.name == ".." { ino } else { INodeNo(e.ino) }, None) {
                        Ok(a) => a,
                        Err(_) => continue,
                    }
                }
            };
            if reply.add(
                INodeNo(e.ino),
                (i + 1) as u64,
                &e.name,
                &TTL,
                &full,
                Generation(0),
            ) {
                // Buffer full, entry not sent: undo the lookup count just taken.
                if e.attr.is_some() {
                    self.forget_n(e.ino, 1);
                }
                break;
            }
        }
        reply.ok();
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
        match self
            .path(ino)
            .and_then(|p| crate::fsutil::sync_dir(&p).map_err(VolumeError::Os))
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e, "fsyncdir", Path::new(""))),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.vol.statfs() {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                crate::volume::names::NAME_MAX as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(errno(&e, "statfs", Path::new(""))),
        }
    }

    fn getxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        size: u32,
        reply: fuser::ReplyXattr,
    ) {
        match self.path(ino).and_then(|p| self.vol.get_xattr(&p, name)) {
            Ok(v) => xattr_reply(reply, size, &v),
            Err(e) => reply.error(errno(&e, "getxattr", Path::new(name))),
        }
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
        match self
            .path(ino)
            .and_then(|p| self.vol.set_xattr(&p, name, value, flags))
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e, "setxattr", Path::new(name))),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: fuser::ReplyXattr) {
        match self.path(ino).and_then(|p| self.vol.list_xattr(&p)) {
            Ok(names) => {
                let mut buf = Vec::new();
                for n in names {
                    buf.extend_from_slice(std::os::unix::ffi::OsStrExt::as_bytes(n.as_os_str()));
                    buf.push(0);
                }
                xattr_reply(reply, size, &buf)
            }
            Err(e) => reply.error(errno(&e, "listxattr", &self.at(ino))),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.path(ino).and_then(|p| self.vol.remove_xattr(&p, name)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e, "removexattr", Path::new(name))),
        }
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
        match self
            .file(fh)
            .and_then(|of| self.vol.fallocate(&of, mode, offset, length))
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e, "fallocate", &self.at(ino))),
        }
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
        let r = self.file(fh_in).and_then(|i| {
            let o = self.file(fh_out)?;
            // One FUSE reply carries a u32 count; the kernel asks again for the rest.
            self.vol
                .copy_range(&i, offset_in, &o, offset_out, len.min(1 << 30))
        });
        match r {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(errno(&e, "copy_file_range", Path::new(""))),
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // Permission checks are the kernel's (default_permissions); this only says it exists.
        match self.path(ino).and_then(|p| self.vol.attr(&p)) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(errno(&e, "access", Path::new(""))),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let r = self.path(parent).and_then(|d| {
            self.vol
                .create_file(&d, name, mode, flags & libc::O_EXCL != 0, caller(req))
        });
        match r {
            Ok((p, a, of)) => {
                let attr = self.remember(parent, name, p, &a);
                let fh = self.add_file(attr.ino.0, of);
                reply.created(
                    &TTL,
                    &attr,
                    Generation(0),
                    FileHandle(fh),
                    FopenFlags::empty(),
                )
            }
            Err(e) => reply.error(errno(&e, "create", Path::new(name))),
        }
    }
}
