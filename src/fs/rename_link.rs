//! Rename (with its flags) and hard links.

use std::ffi::OsStr;

use fuser::{INodeNo, ReplyEmpty, ReplyEntry};

use super::{CmkFs, Resolved};
use crate::volume::VolumeError;

impl CmkFs {
    pub(super) fn do_rename(
        &self,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: u32,
        reply: ReplyEmpty,
    ) {
        let r = self.dir(parent).and_then(|d| {
            let nd = self.dir(newparent)?;
            // No directory walk sees the names while they move (the descriptors resolved
            // above stay the right directories whatever moves meanwhile).
            let moving = self.table.moving();
            self.vol
                .rename(&d, name, &nd, newname, flags)
                .map(|done| (done, moving))
        });
        match r {
            Ok((done, _moving)) => {
                self.table.renamed(
                    parent.0,
                    name,
                    newparent.0,
                    newname,
                    &done.from,
                    &done.to,
                    flags & libc::RENAME_EXCHANGE != 0,
                );
                reply.ok()
            }
            Err(e) => reply.error(self.errno(&e, "rename", Some(parent))),
        }
    }

    pub(super) fn do_link(
        &self,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let r = self.resolve(ino, None).and_then(|r| {
            let nd = self.dir(newparent)?;
            match r {
                Resolved::At(d, b) => self.vol.link(&d, &b, &nd, newname),
                Resolved::Dir(_) => Err(VolumeError::Os(std::io::Error::from_raw_os_error(
                    libc::EPERM,
                ))),
                // The kernel refuses links to a file with no name left; nothing to do here.
                Resolved::File(_) => Err(super::enoent()),
            }
        });
        match r {
            Ok((bname, a)) => {
                let (attr, generation) = self.remember(newparent, newname, &bname, &a, false);
                reply.entry(self.attr_ttl(), &attr, generation)
            }
            Err(e) => reply.error(self.errno(&e, "link", Some(ino))),
        }
    }
}
