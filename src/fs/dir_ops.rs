//! Directory operations: lookup, making and removing names (mkdir, mknod, symlink, unlink,
//! rmdir), readlink, and listings (opendir / readdir / readdirplus snapshots, fsyncdir).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use fuser::{
    FileHandle, FileType, FopenFlags, INodeNo, ReplyData, ReplyDirectory, ReplyDirectoryPlus,
    ReplyEmpty, ReplyEntry, ReplyOpen,
};

use super::{kind_of, lock, CmkFs, DirEntry, DirSnapshot, FsResult, Resolved};
use crate::volume::{Attr, Caller};

impl CmkFs {
    /// Replies with a new entry the kernel now knows.
    fn entry_reply(
        &self,
        reply: ReplyEntry,
        op: &str,
        parent: INodeNo,
        name: &OsStr,
        r: FsResult<(std::ffi::OsString, Attr)>,
    ) {
        match r {
            Ok((bname, a)) => {
                let (attr, generation) = self.remember(parent, name, &bname, &a, op != "lookup");
                reply.entry(self.attr_ttl(), &attr, generation)
            }
            Err(e) => reply.error(self.errno(&e, op, Some(parent))),
        }
    }

    pub(super) fn do_lookup(&self, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let r = self.dir(parent).and_then(|d| self.vol.lookup(&d, name));
        self.entry_reply(reply, "lookup", parent, name, r)
    }

    pub(super) fn do_mknod(
        &self,
        c: Caller,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let r = self
            .dir(parent)
            .and_then(|d| self.vol.mknod(&d, name, mode, rdev as u64, c));
        self.entry_reply(reply, "mknod", parent, name, r)
    }

    pub(super) fn do_mkdir(
        &self,
        c: Caller,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        reply: ReplyEntry,
    ) {
        let r = self
            .dir(parent)
            .and_then(|d| self.vol.mkdir(&d, name, mode, c));
        self.entry_reply(reply, "mkdir", parent, name, r)
    }

    pub(super) fn do_symlink(
        &self,
        c: Caller,
        parent: INodeNo,
        name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let r = self
            .dir(parent)
            .and_then(|d| self.vol.symlink(&d, name, target.as_os_str(), c));
        self.entry_reply(reply, "symlink", parent, name, r)
    }

    pub(super) fn do_readlink(&self, ino: INodeNo, reply: ReplyData) {
        let r = self.resolve(ino, None).and_then(|r| match r {
            Resolved::At(d, b) => self.vol.readlink(&d, &b),
            _ => Err(crate::volume::VolumeError::Os(
                std::io::Error::from_raw_os_error(libc::EINVAL),
            )),
        });
        match r {
            Ok(t) => reply.data(t.as_bytes()),
            Err(e) => reply.error(self.errno(&e, "readlink", Some(ino))),
        }
    }

    pub(super) fn do_unlink(&self, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.dir(parent).and_then(|d| self.vol.unlink(&d, name)) {
            Ok(_) => {
                self.table.unlinked(parent.0, name, false);
                reply.ok()
            }
            Err(e) => reply.error(self.errno(&e, "unlink", Some(parent))),
        }
    }

    pub(super) fn do_rmdir(&self, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.dir(parent).and_then(|d| self.vol.rmdir(&d, name)) {
            Ok(_) => {
                self.table.unlinked(parent.0, name, true);
                reply.ok()
            }
            Err(e) => reply.error(self.errno(&e, "rmdir", Some(parent))),
        }
    }

    fn snapshot(&self, ino: INodeNo) -> FsResult<DirSnapshot> {
        let dir = self.dir(ino)?;
        let dot = |name: &str| DirEntry {
            ino: ino.0,
            kind: FileType::Directory,
            name: name.into(),
            bname: None,
        };
        let mut entries = vec![dot("."), dot("..")];
        for l in self.vol.list(&dir)? {
            entries.push(DirEntry {
                ino: self.table.fuse_ino(l.ino),
                kind: kind_of(l.kind),
                name: l.name,
                bname: Some(l.bname),
            });
        }
        Ok(DirSnapshot {
            entries,
            epoch: self.table.epoch(),
        })
    }

    pub(super) fn do_opendir(&self, ino: INodeNo, reply: ReplyOpen) {
        // Snapshot at open: offsets stay valid while entries change under a reader.
        match self.snapshot(ino) {
            Ok(s) => {
                let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
                lock(&self.dirs).insert(fh, Arc::new(s));
                reply.opened(FileHandle(fh), FopenFlags::empty());
            }
            Err(e) => reply.error(self.errno(&e, "opendir", Some(ino))),
        }
    }

    fn listing(&self, fh: FileHandle) -> FsResult<Arc<DirSnapshot>> {
        // A listing snapshot holds plaintext names: serve it only while the keys are live.
        self.vol.keyring().keys::<crate::volume::VolumeError>()?;
        lock(&self.dirs)
            .get(&fh.0)
            .cloned()
            .ok_or_else(super::ebadf)
    }

    /// The backing name of listed entry `e` now: the snapshot's, recomputed when a
    /// re-encryption sealed every name again since it was taken (`stale`).
    fn listed_bname(
        &self,
        dir: &crate::volume::Dir,
        e: &DirEntry,
        stale: bool,
    ) -> Option<std::ffi::OsString> {
        let b = e.bname.as_ref()?;
        if stale {
            self.vol
                .backing_name(dir, &e.name)
                .ok()
                .map(|nb| nb.entry().to_owned())
        } else {
            Some(b.clone())
        }
    }

    /// READDIR: the snapshot's names, each with its inode number and type read now (as
    /// LOOKUP gives them); an entry that cannot be read any more (gone since opendir) keeps
    /// what the backing listing said.
    pub(super) fn do_readdir(
        &self,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let s = match self.listing(fh) {
            Ok(s) => s,
            Err(e) => return reply.error(self.errno(&e, "readdir", None)),
        };
        let dir = self.dir(ino).ok();
        let stale = s.epoch != self.table.epoch();
        for (i, e) in s.entries.iter().enumerate().skip(offset as usize) {
            let now = dir.as_ref().and_then(|dir| {
                let b = self.listed_bname(dir, e, stale)?;
                self.vol.entry_kind(dir, &b).ok()
            });
            let (ino, kind) = match now {
                Some((b, k)) => (self.table.fuse_ino(b), kind_of(k)),
                None => (e.ino, e.kind),
            };
            if reply.add(INodeNo(ino), (i + 1) as u64, kind, &e.name) {
                break;
            }
        }
        reply.ok();
    }

    /// READDIRPLUS: the snapshot's names, each with attributes read now (as LOOKUP would),
    /// so the kernel gets them without a LOOKUP per entry. The snapshot's own attributes
    /// are not sent: taken at opendir, they may be older than a write or rename the kernel
    /// has seen since, and the kernel would take a stale size for the truth (it only
    /// guards against changes made while this request is in flight). An entry whose name
    /// is gone, or is corrupt, is listed without attributes (as READDIR lists it).
    pub(super) fn do_readdirplus(
        &self,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let s = match self.listing(fh) {
            Ok(s) => s,
            Err(e) => return reply.error(self.errno(&e, "readdirplus", Some(ino))),
        };
        // A directory that cannot be reached now (moved or removed behind the mount) still
        // lists its snapshot, as READDIR does: without attributes.
        let dir = self.dir(ino).ok();
        // Taken before a re-encryption sealed every name again: backing names recomputed.
        let stale = s.epoch != self.table.epoch();
        for (i, e) in s.entries.iter().enumerate().skip(offset as usize) {
            let off = (i + 1) as u64;
            // "." and "..": sent without attributes. The kernel reads nothing of a
            // READDIRPLUS entry by these names but the dirent (`fuse_direntplus_link`
            // returns before the node id and attributes), so their `fstat`s (two per
            // directory listed) bought nothing.
            if e.name == "." || e.name == ".." {
                if reply.add_bare(INodeNo(e.ino), off, e.kind, &e.name) {
                    break;
                }
                continue;
            }
            let fresh = dir.as_ref().and_then(|dir| {
                let b = self.listed_bname(dir, e, stale)?;
                match self.vol.attr_at(dir, &b) {
                    Ok(a) => Some((b, a)),
                    Err(err) => {
                        if err.errno() != libc::ENOENT {
                            tracing::warn!(entry = ?b, error = %err, "corrupt entry");
                        }
                        None
                    }
                }
            });
            let (full, generation) = match fresh {
                // Entries handed out with attributes count as lookups, as the kernel expects.
                Some((b, a)) => self.remember(ino, &e.name, b.as_os_str(), &a, false),
                None => {
                    if reply.add_bare(INodeNo(e.ino), off, e.kind, &e.name) {
                        break;
                    }
                    continue;
                }
            };
            if reply.add(full.ino, off, &e.name, self.attr_ttl(), &full, generation) {
                // Buffer full, entry not sent: undo the lookup count just taken.
                self.table.forget(full.ino.0, 1);
                break;
            }
        }
        reply.ok();
    }

    pub(super) fn do_fsyncdir(&self, ino: INodeNo, reply: ReplyEmpty) {
        match self.dir(ino).and_then(|d| self.vol.fsync_dir(&d)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(self.errno(&e, "fsyncdir", Some(ino))),
        }
    }
}
