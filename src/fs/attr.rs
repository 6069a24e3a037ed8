//! Attributes: getattr, setattr (mode, owner, times, size), access, statfs.

use fuser::{FileAttr, FileHandle, INodeNo, ReplyAttr, ReplyEmpty, ReplyStatfs};

use super::{fattr, CmkFs, FsResult, Resolved};
use crate::volume::SetAttr;

impl CmkFs {
    /// FUSE attributes of `ino` (through the named handle when given).
    pub(super) fn getattr_of(&self, ino: INodeNo, fh: Option<FileHandle>) -> FsResult<FileAttr> {
        let r = self.resolve_inode(ino, fh)?;
        let a = match r {
            // The handle the request names is that inode by construction.
            Resolved::File(ref of) => self.vol.attr(crate::volume::Target::File(of))?,
            _ => self.attr_of(ino, &r)?,
        };
        Ok(fattr(ino.0, &a))
    }

    pub(super) fn do_getattr(&self, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.getattr_of(ino, fh) {
            Ok(a) => reply.attr(self.attr_ttl(), &a),
            Err(e) => reply.error(self.errno(&e, "getattr", Some(ino))),
        }
    }

    pub(super) fn do_setattr(
        &self,
        ino: INodeNo,
        fh: Option<FileHandle>,
        set: &SetAttr,
        reply: ReplyAttr,
    ) {
        // A named handle (ftruncate) is used; without one, the name, and if the file has no
        // name left (unlinked while open: fchmod, futimens), any open handle of the inode.
        // A size change without a handle goes by name (read-write): an open handle may be
        // read-only.
        let r = if set.size.is_some() {
            self.resolve(ino, fh)
        } else {
            self.resolve_inode(ino, fh)
        };
        let r = r.and_then(|r| self.change(ino, &r, |t| self.vol.set_attr(t, set)));
        match r {
            Ok(a) => reply.attr(self.attr_ttl(), &fattr(ino.0, &a)),
            Err(e) => reply.error(self.errno(&e, "setattr", Some(ino))),
        }
    }

    pub(super) fn do_access(&self, ino: INodeNo, reply: ReplyEmpty) {
        // Permission checks are the kernel's (default_permissions); this only says it exists.
        match self
            .resolve_inode(ino, None)
            .and_then(|r| self.attr_of(ino, &r))
        {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(self.errno(&e, "access", Some(ino))),
        }
    }

    pub(super) fn do_statfs(&self, reply: ReplyStatfs) {
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
            Err(e) => reply.error(self.errno(&e, "statfs", None)),
        }
    }
}
