//! A plain FUSE passthrough on the same fuser setup as a cmkfs mount (threads, `clone_fd`,
//! 1 MiB requests, readahead, writeback cache), with no encryption: what FUSE and fuser cost
//! by themselves. `scripts/bench-fio.sh` mounts it beside cmkfs so that a table shows which
//! part of cmkfs's distance to the raw disk is FUSE's and which is cmkfs's own.
//!
//!   cargo run --release --example passthrough -- BACKING MOUNTPOINT [--threads N]
//!       [--no-writeback-cache] [--readahead-kb N]
//!
//! Runs in the foreground until unmounted. A benchmark aid, not a filesystem to keep data in:
//! paths are kept per inode (renamed directories leave stale children) and there are no
//! xattrs, locks or special files.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    BsdFileFlags, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, KernelConfig, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyWrite, Request, Session, TimeOrNow, WriteFlags,
};

const TTL: Duration = Duration::from_secs(1);

struct Passthrough {
    root: PathBuf,
    root_ino: u64,
    writeback: bool,
    /// Our inode (the backing inode; 1 for the root) → backing path.
    paths: RwLock<HashMap<u64, PathBuf>>,
    files: RwLock<HashMap<u64, Arc<File>>>,
    next_fh: AtomicU64,
}

fn errno(e: std::io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

fn time(secs: i64, nsecs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsecs as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

fn cstr(p: &Path) -> std::ffi::CString {
    std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap_or_default()
}

fn check(r: libc::c_int) -> Result<(), Errno> {
    if r == 0 {
        Ok(())
    } else {
        Err(errno(std::io::Error::last_os_error()))
    }
}

impl Passthrough {
    fn ino(&self, m: &fs::Metadata) -> u64 {
        if m.ino() == self.root_ino {
            1
        } else {
            m.ino()
        }
    }

    fn attr(&self, m: &fs::Metadata) -> FileAttr {
        let ft = m.file_type();
        use std::os::unix::fs::FileTypeExt;
        let kind = if ft.is_dir() {
            FileType::Directory
        } else if ft.is_symlink() {
            FileType::Symlink
        } else if ft.is_fifo() {
            FileType::NamedPipe
        } else {
            FileType::RegularFile
        };
        FileAttr {
            ino: INodeNo(self.ino(m)),
            size: m.size(),
            blocks: m.blocks(),
            atime: time(m.atime(), m.atime_nsec()),
            mtime: time(m.mtime(), m.mtime_nsec()),
            ctime: time(m.ctime(), m.ctime_nsec()),
            crtime: time(m.mtime(), m.mtime_nsec()),
            kind,
            perm: (m.mode() & 0o7777) as u16,
            nlink: m.nlink() as u32,
            uid: m.uid(),
            gid: m.gid(),
            rdev: m.rdev() as u32,
            blksize: 4096,
            flags: 0,
        }
    }

    fn path(&self, ino: INodeNo) -> Result<PathBuf, Errno> {
        self.paths
            .read()
            .unwrap()
            .get(&ino.0)
            .cloned()
            .ok_or(Errno::ENOENT)
    }

    fn child(&self, parent: INodeNo, name: &OsStr) -> Result<PathBuf, Errno> {
        Ok(self.path(parent)?.join(name))
    }

    /// Stats `p` and records it under its inode.
    fn entry(&self, p: PathBuf) -> Result<FileAttr, Errno> {
        let m = fs::symlink_metadata(&p).map_err(errno)?;
        let a = self.attr(&m);
        self.paths.write().unwrap().insert(a.ino.0, p);
        Ok(a)
    }

    fn file(&self, fh: FileHandle) -> Result<Arc<File>, Errno> {
        self.files
            .read()
            .unwrap()
            .get(&fh.0)
            .cloned()
            .ok_or(Errno::EBADF)
    }

    fn add(&self, f: File) -> FileHandle {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.files.write().unwrap().insert(fh, Arc::new(f));
        FileHandle(fh)
    }

    fn open_opts(flags: i32) -> OpenOptions {
        let mut o = OpenOptions::new();
        match flags & libc::O_ACCMODE {
            libc::O_RDONLY => o.read(true),
            libc::O_WRONLY => o.write(true),
            _ => o.read(true).write(true),
        };
        // O_APPEND is the kernel's business with the writeback cache, and positions come
        // with every request anyway; O_DIRECT would need aligned buffers.
        o.custom_flags(
            flags & !(libc::O_ACCMODE | libc::O_APPEND | libc::O_DIRECT | libc::O_CREAT),
        );
        o
    }

    // The arguments of fuser's `setattr`, passed on as they come.
    #[allow(clippy::too_many_arguments)]
    fn setattr_inner(
        &self,
        ino: INodeNo,
        fh: Option<FileHandle>,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
    ) -> Result<FileAttr, Errno> {
        let p = self.path(ino)?;
        if let Some(m) = mode {
            fs::set_permissions(&p, fs::Permissions::from_mode(m & 0o7777)).map_err(errno)?;
        }
        if uid.is_some() || gid.is_some() {
            std::os::unix::fs::lchown(&p, uid, gid).map_err(errno)?;
        }
        if let Some(s) = size {
            match fh.and_then(|h| self.file(h).ok()) {
                Some(f) => f.set_len(s).map_err(errno)?,
                None => OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .and_then(|f| f.set_len(s))
                    .map_err(errno)?,
            }
        }
        if atime.is_some() || mtime.is_some() {
            let ts = |t: Option<TimeOrNow>| match t {
                None => libc::timespec {
                    tv_sec: 0,
                    tv_nsec: libc::UTIME_OMIT,
                },
                Some(TimeOrNow::Now) => libc::timespec {
                    tv_sec: 0,
                    tv_nsec: libc::UTIME_NOW,
                },
                Some(TimeOrNow::SpecificTime(t)) => {
                    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
                    libc::timespec {
                        tv_sec: d.as_secs() as libc::time_t,
                        tv_nsec: d.subsec_nanos() as libc::c_long,
                    }
                }
            };
            let times = [ts(atime), ts(mtime)];
            // SAFETY: a valid C path and two timespecs.
            check(unsafe {
                libc::utimensat(
                    libc::AT_FDCWD,
                    cstr(&p).as_ptr(),
                    times.as_ptr(),
                    libc::AT_SYMLINK_NOFOLLOW,
                )
            })?;
        }
        self.entry(p)
    }
}

impl Filesystem for Passthrough {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(1 << 20);
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_PARALLEL_DIROPS);
        // As cmkfs: a libaio/io_uring submitter's O_DIRECT requests in flight together.
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_ASYNC_DIO);
        if self.writeback {
            let _ = config.add_capabilities(fuser::InitFlags::FUSE_WRITEBACK_CACHE);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.child(parent, name).and_then(|p| self.entry(p)) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let r = match fh.and_then(|h| self.file(h).ok()) {
            Some(f) => f.metadata().map_err(errno).map(|m| self.attr(&m)),
            None => self
                .path(ino)
                .and_then(|p| fs::symlink_metadata(p).map_err(errno))
                .map(|m| self.attr(&m)),
        };
        match r {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
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
        match self.setattr_inner(ino, fh, mode, uid, gid, size, atime, mtime) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.path(ino).and_then(|p| fs::read_link(p).map_err(errno)) {
            Ok(t) => reply.data(t.as_os_str().as_bytes()),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let r = self.child(parent, name).and_then(|p| {
            std::os::unix::fs::DirBuilderExt::mode(&mut fs::DirBuilder::new(), mode)
                .create(&p)
                .map_err(errno)?;
            self.entry(p)
        });
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self
            .child(parent, name)
            .and_then(|p| fs::remove_file(p).map_err(errno))
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self
            .child(parent, name)
            .and_then(|p| fs::remove_dir(p).map_err(errno))
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn symlink(
        &self,
        _req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let r = self.child(parent, link_name).and_then(|p| {
            std::os::unix::fs::symlink(target, &p).map_err(errno)?;
            self.entry(p)
        });
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let r = self.child(parent, name).and_then(|from| {
            let to = self.child(newparent, newname)?;
            fs::rename(&from, &to).map_err(errno)?;
            self.entry(to).map(|_| ())
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
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
        let r = self.path(ino).and_then(|from| {
            let to = self.child(newparent, newname)?;
            fs::hard_link(&from, &to).map_err(errno)?;
            self.entry(to)
        });
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self
            .path(ino)
            .and_then(|p| Self::open_opts(flags.0).open(p).map_err(errno))
        {
            Ok(f) => reply.opened(self.add(f), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let r = self.file(fh).and_then(|f| {
            let mut buf = vec![0u8; size as usize];
            let mut n = 0;
            while n < buf.len() {
                match f.read_at(&mut buf[n..], offset + n as u64) {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(errno(e)),
                }
            }
            buf.truncate(n);
            Ok(buf)
        });
        match r {
            Ok(b) => reply.data(&b),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self
            .file(fh)
            .and_then(|f| f.write_all_at(data, offset).map_err(errno))
        {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
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
        self.files.write().unwrap().remove(&fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let r = self.file(fh).and_then(|f| {
            if datasync {
                f.sync_data()
            } else {
                f.sync_all()
            }
            .map_err(errno)
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let p = match self.path(ino) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        let mut entries: Vec<(u64, FileType, OsString)> = vec![
            (ino.0, FileType::Directory, ".".into()),
            (ino.0, FileType::Directory, "..".into()),
        ];
        match fs::read_dir(&p) {
            Ok(rd) => {
                for e in rd.flatten() {
                    let Ok(m) = e.metadata() else { continue };
                    let kind = self.attr(&m).kind;
                    entries.push((self.ino(&m), kind, e.file_name()));
                }
            }
            Err(e) => return reply.error(errno(e)),
        }
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*ino), (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // SAFETY: zeroed statvfs filled by the call on a valid C path.
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        match check(unsafe { libc::statvfs(cstr(&self.root).as_ptr(), &mut s) }) {
            Ok(()) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                255,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let r = self.child(parent, name).and_then(|p| {
            let mut o = Self::open_opts(flags);
            // Writes read partial pages back with the writeback cache: always readable.
            o.read(true).create(true).mode(mode);
            if flags & libc::O_EXCL != 0 {
                o.create_new(true);
            }
            let f = o.open(&p).map_err(errno)?;
            Ok((self.entry(p)?, f))
        });
        match r {
            Ok((a, f)) => reply.created(&TTL, &a, Generation(0), self.add(f), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut pos = Vec::new();
    let (mut threads, mut writeback, mut ra_kb) = (2usize, true, Some(1024u32));
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--threads" => threads = it.next().and_then(|v| v.parse().ok()).unwrap_or(2),
            "--no-writeback-cache" => writeback = false,
            "--readahead-kb" => ra_kb = it.next().and_then(|v| v.parse().ok()),
            _ => pos.push(PathBuf::from(a)),
        }
    }
    let [root, mp] = &pos[..] else {
        eprintln!("usage: passthrough BACKING MOUNTPOINT [--threads N] [--no-writeback-cache] [--readahead-kb N]");
        std::process::exit(2);
    };
    let root = fs::canonicalize(root).expect("backing directory");
    // Before mounting: once mounted, resolving the path would ask this very daemon.
    let mp = fs::canonicalize(mp).expect("mountpoint");
    let root_ino = fs::metadata(&root).expect("backing directory").ino();
    let fs = Passthrough {
        root: root.clone(),
        root_ino,
        writeback,
        paths: RwLock::new(HashMap::from([(1, root)])),
        files: RwLock::new(HashMap::new()),
        next_fh: AtomicU64::new(1),
    };
    let mut c = Config::default();
    c.n_threads = Some(threads);
    c.clone_fd = true;
    c.mount_options = vec![
        MountOption::FSName("passthrough".into()),
        MountOption::DefaultPermissions,
    ];
    // The kernel applies the caller's umask; files get exactly the modes asked for.
    // SAFETY: umask has no preconditions.
    unsafe { libc::umask(0) };
    let session = Session::new(fs, &mp, &c).expect("mount");
    if let Some(kb) = ra_kb {
        if let Err(e) = cmkfs::mount::set_readahead(&mp, kb) {
            eprintln!("passthrough: readahead not raised: {e}");
        }
    }
    if let Err(e) = session.run() {
        eprintln!("passthrough: {e}");
        std::process::exit(1);
    }
}
