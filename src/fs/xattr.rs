//! Extended attributes (and with them POSIX ACLs): through the inode's name, its directory
//! descriptor, or an open handle — so they work on a file unlinked while open too.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use fuser::{INodeNo, ReplyEmpty, ReplyXattr};

use super::{xattr_reply, CmkFs};

impl CmkFs {
    fn kind_hint(&self, ino: INodeNo) -> u32 {
        self.table.kind(ino.0).unwrap_or(0)
    }

    pub(super) fn do_getxattr(&self, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let r = self
            .resolve_inode(ino, None)
            .and_then(|r| self.vol.get_xattr(r.target(), self.kind_hint(ino), name));
        match r {
            Ok(v) => xattr_reply(reply, size, &v),
            Err(e) => reply.error(self.errno(&e, "getxattr", Some(ino))),
        }
    }

    pub(super) fn do_setxattr(
        &self,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        reply: ReplyEmpty,
    ) {
        let r = self.resolve_inode(ino, None).and_then(|r| {
            self.change(ino, &r, |t| {
                self.vol
                    .set_xattr(t, self.kind_hint(ino), name, value, flags)
            })
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(self.errno(&e, "setxattr", Some(ino))),
        }
    }

    pub(super) fn do_listxattr(&self, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self
            .resolve_inode(ino, None)
            .and_then(|r| self.vol.list_xattr(r.target()))
        {
            Ok(names) => {
                let mut buf = Vec::new();
                for n in names {
                    buf.extend_from_slice(n.as_bytes());
                    buf.push(0);
                }
                xattr_reply(reply, size, &buf)
            }
            Err(e) => reply.error(self.errno(&e, "listxattr", Some(ino))),
        }
    }

    pub(super) fn do_removexattr(&self, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self.resolve_inode(ino, None).and_then(|r| {
            self.change(ino, &r, |t| {
                self.vol.remove_xattr(t, self.kind_hint(ino), name)
            })
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(self.errno(&e, "removexattr", Some(ino))),
        }
    }
}
