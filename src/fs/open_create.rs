//! Open files: create, open, read, write, flush, fsync, release, fallocate, copy_file_range.

use std::ffi::OsStr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use fuser::{
    FileHandle, FopenFlags, INodeNo, OpenAccMode, OpenFlags, ReplyCreate, ReplyData, ReplyEmpty,
    ReplyOpen, ReplyWrite, WriteFlags,
};

use super::{lock, payload::Payload, CmkFs, Resolved};
use crate::volume::{Caller, OpenFile, VolumeError};

impl CmkFs {
    /// Records an open handle of inode `ino` (`write`: opened for writing) and returns it.
    fn add_file(&self, ino: u64, of: OpenFile, write: bool) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let mut files = lock(&self.files);
        files.by_fh.insert(fh, (ino, Arc::new(of)));
        files.by_ino.entry(ino).or_default().push(fh);
        files.wb.opened(fh, ino, write);
        fh
    }

    /// The flags of an open file's reply. The kernel keeps a file's cached pages across
    /// opens (`cat f; sha256sum f` reads it once) while it caches attributes at all:
    /// everything written through the mount updates them, a size or mtime changed behind the
    /// mount drops them when the attributes are next fetched (FUSE_AUTO_INVAL_DATA), and a
    /// revocation drops them all. With a zero cache timeout (a backing directory others
    /// write to) every open drops them, as without the flag.
    fn open_flags(&self) -> FopenFlags {
        if self.ttl.is_zero() {
            FopenFlags::empty()
        } else {
            FopenFlags::FOPEN_KEEP_CACHE
        }
    }

    pub(super) fn do_release(&self, fh: FileHandle, reply: fuser::ReplyEmpty) {
        let mut files = lock(&self.files);
        if let Some((ino, _)) = files.by_fh.remove(&fh.0) {
            let mut last = true;
            if let Some(v) = files.by_ino.get_mut(&ino) {
                v.retain(|h| *h != fh.0);
                last = v.is_empty();
                if last {
                    files.by_ino.remove(&ino);
                }
            }
            files.wb.released(fh.0, last);
        }
        reply.ok();
    }

    pub(super) fn do_create(
        &self,
        c: Caller,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let r = self.dir(parent).and_then(|d| {
            match self.vol.create_file(&d, name, mode, c) {
                Ok((bname, attr, of)) => Ok((bname, attr, of, true)),
                // Created by someone else since the kernel's lookup: open it, as open(2)
                // without O_EXCL does.
                Err(e) if e.errno() == libc::EEXIST && flags & libc::O_EXCL == 0 => {
                    let (bname, attr) = self.vol.lookup(&d, name)?;
                    let of = self.vol.open_file(&d, &bname, true, Some(attr.ino))?;
                    Ok((bname, attr, of, false))
                }
                Err(e) => Err(e),
            }
        });
        match r {
            Ok((bname, a, of, fresh)) => {
                let (attr, generation) = self.remember(parent, name, &bname, &a, fresh);
                let write = flags & libc::O_ACCMODE != libc::O_RDONLY;
                let fh = self.add_file(attr.ino.0, of, write);
                reply.created(
                    self.attr_ttl(),
                    &attr,
                    generation,
                    FileHandle(fh),
                    self.open_flags(),
                )
            }
            Err(e) => reply.error(self.errno(&e, "create", Some(parent))),
        }
    }

    pub(super) fn do_open(&self, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let write = flags.acc_mode() != OpenAccMode::O_RDONLY;
        let expect = self.table.backing_ino(ino.0);
        let r = self.resolve(ino, None).and_then(|r| match r {
            Resolved::At(d, b) => self.vol.open_file(&d, &b, write, Some(expect)),
            Resolved::Dir(_) => Err(VolumeError::Os(std::io::Error::from_raw_os_error(
                libc::EISDIR,
            ))),
            // No name left, but open (via /proc/PID/fd): reopen the same backing file.
            Resolved::File(of) => self.vol.reopen(&of, write),
        });
        match r {
            Ok(of) => reply.opened(
                FileHandle(self.add_file(ino.0, of, write)),
                self.open_flags(),
            ),
            Err(e) => reply.error(self.errno(&e, "open", Some(ino))),
        }
    }

    pub(super) fn do_read(
        &self,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        reply: ReplyData,
    ) {
        match self
            .file(fh)
            .and_then(|of| self.vol.read(&of, offset, size as usize))
        {
            Ok(buf) => reply.data(&buf),
            Err(e) => reply.error(self.errno(&e, "read", Some(ino))),
        }
    }

    pub(super) fn do_write(
        &self,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut data: Payload,
        write_flags: WriteFlags,
        reply: ReplyWrite,
    ) {
        let kill = write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID);
        // A write-back of the kernel's cache: the `write(2)` that made it returned long ago.
        let cached = write_flags.contains(WriteFlags::FUSE_WRITE_CACHE);
        let len = data.len();
        let r = self.file(fh).and_then(|of| {
            if kill {
                self.vol.kill_suidgid(&of)?;
            }
            let mut n = data.write(&self.vol, &of, offset, 0)?;
            // The kernel takes a write-back as all or nothing (it drops a short count): the
            // rest is written again, which stores it or says why not (a full backing disk,
            // `ENOSPC`; a file size limit, `EFBIG`).
            while cached && n < len {
                match data.write(&self.vol, &of, offset + n as u64, n)? {
                    0 => break,
                    k => n += k,
                }
            }
            Ok(n)
        });
        // No plaintext of the request outlives it (`payload`): what was not written is wiped.
        data.wipe_from(*r.as_ref().unwrap_or(&0));
        let refused = match r {
            // Nothing more could be placed and no error said why: a full backing disk.
            Ok(n) if n < len && cached => fuser::Errno::ENOSPC,
            Ok(n) => return reply.written(n as u32),
            Err(e) => self.errno(&e, "write", Some(ino)),
        };
        if !cached {
            return reply.error(refused);
        }
        // The daemon owns a refused write-back's error (`wb_errors`): recorded before the
        // answer (the kernel sends the FSYNC or FLUSH that reports it only after the answer
        // came), then answered done, so that the kernel keeps no flag of its own for the
        // first `close` of whoever opens the file next (attack session 11, F2). Nothing of
        // it was stored: the inode's pages are dropped just after. The flag first: a FLUSH
        // or FSYNC that finds it clear answers without the record.
        self.wb_refused.store(true, Ordering::SeqCst);
        lock(&self.files).wb.refused(ino.0, refused.code());
        tracing::debug!(
            ino = ino.0,
            errno = refused.code(),
            "refused a write-back; its writers are told at fsync or close"
        );
        reply.written(len as u32);
        lock(&self.files).refused_pages.refused(ino.0);
    }

    /// FLUSH (every `close`): the write-back error this handle has not reported yet.
    pub(super) fn do_flush(&self, ino: INodeNo, fh: FileHandle, owner: u64, reply: ReplyEmpty) {
        // No write-back refused since the mount: nothing any handle could report. A refusal
        // answered before this FLUSH was sent set the flag before its reply went out.
        if !self.wb_refused.load(Ordering::SeqCst) {
            return reply.ok();
        }
        match lock(&self.files).wb.take(fh.0, owner) {
            None => reply.ok(),
            Some(errno) => {
                tracing::debug!(ino = ino.0, errno, "close reports a refused write-back");
                reply.error(fuser::Errno::from_i32(errno))
            }
        }
    }

    /// FSYNC (`fsync`, `fdatasync`, `msync(MS_SYNC)`): the kernel has written the file's
    /// pages back and had every answer; a write-back refused since this handle last heard
    /// of one is reported once (`wb_errors`), before the backing file is synced.
    pub(super) fn do_fsync(&self, ino: INodeNo, fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        // Nothing to report before the mount's first refusal (`wb_refused`).
        if self.wb_refused.load(Ordering::SeqCst) {
            if let Some(errno) = lock(&self.files).wb.fsynced(fh.0) {
                tracing::debug!(ino = ino.0, errno, "fsync reports a refused write-back");
                return reply.error(fuser::Errno::from_i32(errno));
            }
        }
        match self.file(fh).and_then(|of| self.vol.fsync(&of, datasync)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(self.errno(&e, "fsync", Some(ino))),
        }
    }

    pub(super) fn do_fallocate(
        &self,
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
            Err(e) => reply.error(self.errno(&e, "fallocate", Some(ino))),
        }
    }

    pub(super) fn do_copy_file_range(
        &self,
        fh_in: FileHandle,
        offset_in: u64,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
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
            Err(e) => reply.error(self.errno(&e, "copy_file_range", None)),
        }
    }
}
