//! File contents (formats v2 and v3): read / write / truncate / fallocate of one backing file.
//!
//! The layout is in [`super::layout`]: the header area (the 32-byte file header; in v3 padded
//! with zeros to 4096 bytes), then the data units, then `S % 16` filler bytes, so the backing
//! length says the logical size `S` exactly. Unit `i` is plain XTS (IEEE 1619, no ciphertext
//! stealing) with tweak `file_id + i`; every unit is a whole number of 16-byte blocks, the last
//! one ending at `roundup16(S)`. Three rules keep every file consistent (docs/FORMAT.md,
//! "Files"):
//!
//! * **Whole units.** Any write that touches a unit re-encrypts the whole unit
//!   (read-modify-write; only the blocks whose ciphertext changes go back to disk, since XTS
//!   is deterministic per block), so a unit is either entirely ciphertext or entirely never
//!   written / punched. A stored 16-byte block that is all zero reads as zeros: whole units
//!   of them are holes, and single ones are what a torn or failed write into a hole did not
//!   reach; a block of real ciphertext is all zero with probability 2^-128.
//! * **Growth writes zeros.** The plaintext past `S` inside the last block is unspecified
//!   (stale after a shrink); everything that grows a file first rewrites the old last unit
//!   with zeros past the old size, so growth always reads zeros.
//! * **Data before length.** Each change writes the units first and moves the length last
//!   (often in the same `pwrite`), so a crash leaves the old or the new size over units that
//!   decrypt. Because XTS encrypts each block independently, a prefix of a unit is a valid
//!   shorter unit: a shrinking truncate only shortens the backing file, then scrubs the
//!   padding of the new last block.
//!
//! One file per family of operations: [`read`] (the read path), [`write`] (writes and every
//! size change: truncate, fallocate, punching), [`cipher`] (the units' encryption under the
//! keys of their generation); this module holds the per-file state and the header and I/O
//! helpers they share.

mod cipher;
mod read;
#[cfg(test)]
mod tests;
mod write;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, RwLock};

use super::direct::DirectFile;
use super::layout;
pub use super::layout::{FileHeader, Layout, FILE_HEADER_LEN};
use super::writeout;
use super::VolumeError;
use crate::crypto::VolumeKeys;
use crate::engine::SectorEngine;
use cipher::key_runs;
pub(crate) use cipher::{decrypt_with, encrypt_with};
pub use read::{read, read_buf, ReadBuf};
pub use write::{fallocate, truncate, write, write_mut};

/// Shared state of one backing file, common to all its open handles: the lock that makes
/// read-modify-write and size changes atomic, and the cached header.
///
/// The backing length is not cached: it is read (`fstat`) by every request, so a backing
/// file changed behind the mount (a sync client, a restore) is seen at once, never written
/// through with a stale length (docs/PERFORMANCE.md). The cached header is only used while
/// that same `fstat` shows the change time it was last checked at: a file rewritten in place
/// behind the mount (`rsync --inplace`, a restore: another file's bytes, another file id) has
/// its header read again before any unit is decrypted or encrypted (attack session 17, F1).
#[derive(Debug, Default)]
pub struct FileState {
    /// Shared for reads and whole-unit overwrites inside the file; exclusive for anything
    /// that reads-modifies-writes a unit or moves the end of the file.
    pub(crate) rmw: RwLock<()>,
    header: Mutex<Option<CachedHeader>>,
    /// Whether the last write through the exclusive lock grew the file: a hint that the
    /// next one will too (a sequential writer), so it takes the exclusive lock at once
    /// instead of first checking the length under the shared one (one `fstat` less per
    /// append). A wrong hint costs concurrency, never correctness: the exclusive path
    /// handles every write.
    appending: AtomicBool,
    /// The file's `O_DIRECT` descriptor for large reads ([`direct`]).
    direct: DirectFile,
    /// Bytes written since the last early write-out of the backing file ([`writeout`]).
    pending: writeout::Pending,
}

/// A file header as last read or written, and the backing file's change time it was last
/// checked at (`None`: not yet; the next request's `fstat` sets it after reading the header
/// again, which costs one 32-byte `pread` from the page cache).
#[derive(Debug, Clone, Copy)]
struct CachedHeader {
    h: FileHeader,
    seen: Option<Ctime>,
}

/// A change time (`st_ctime`, `st_ctime_nsec`). Every write to a file moves it, and Linux
/// (6.13+, multigrain timestamps) gives a change after a `stat` a fine-grained time that
/// differs from the one that `stat` saw; on older kernels, or filesystems without
/// multigrain timestamps, a rewrite within one clock tick (a few ms) of our last `fstat`
/// can keep the time unchanged (docs/ARCHITECTURE.md, "File header cache").
type Ctime = (i64, i64);

/// How long after its change time a header check is trusted for later requests at that
/// same change time. A filesystem whose timestamps are coarse (ext4 with 128-byte inodes:
/// 1 s; FAT: 2 s; any filesystem without multigrain timestamps: a clock tick) gives a
/// rewrite in the same step as the last change the same ctime, so a check made within one
/// step of the ctime proves nothing about later requests (attack session 18, F1: a rewrite
/// in the second of our own write went unseen). Checked later than this, any further change
/// must carry a later time.
const CTIME_SETTLED: std::time::Duration = std::time::Duration::from_secs(3);

/// `Some(ctime)` when a header read now may be trusted while the file keeps change time
/// `ctime` ([`CTIME_SETTLED`] has passed since it), else `None`: the next request reads the
/// 32 bytes again. A change time in the future (a skewed clock) is never settled.
fn settled(ctime: Ctime) -> Option<Ctime> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?;
    let at = std::time::Duration::new(u64::try_from(ctime.0).ok()?, u32::try_from(ctime.1).ok()?);
    (now.checked_sub(at)? >= CTIME_SETTLED).then_some(ctime)
}

/// The backing file's length and change time, both from the one `fstat` a request makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Backing {
    /// Length in bytes.
    pub len: u64,
    ctime: Ctime,
}

impl Backing {
    /// `fstat` of `f`.
    fn of(f: &File) -> Result<Backing, VolumeError> {
        use std::os::unix::fs::MetadataExt;
        let m = f.metadata().map_err(VolumeError::Os)?;
        Ok(Backing {
            len: m.len(),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }
}

impl FileState {
    /// Replaces the cached file header (after writing it to disk; writing it moved the
    /// change time, so the next request reads it back once before trusting it again).
    pub(crate) fn set_cached_header(&self, h: Option<FileHeader>) {
        *self.header.lock().unwrap_or_else(|p| p.into_inner()) =
            h.map(|h| CachedHeader { h, seen: None });
    }

    /// Whether the file header is cached and was checked at change time `ctime` (no system
    /// call).
    fn header_current(&self, bk: &Backing) -> bool {
        self.header
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|c| c.seen == Some(bk.ctime))
    }

    /// Whether a file header is cached, current or not (no system call).
    #[cfg(test)]
    pub(crate) fn header_cached(&self) -> bool {
        self.header
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Sets the appending hint (a file just created will most likely be written from its
    /// start to its end: its first write goes straight to the exclusive lock).
    pub(crate) fn expect_appends(&self) {
        self.appending.store(true, Ordering::Relaxed);
    }
}

/// The file header of `f` (cached in `st`), `None` for an empty file without one.
pub(crate) fn file_header(
    f: &File,
    st: &FileState,
    cx: &Ctx,
) -> Result<Option<FileHeader>, VolumeError> {
    header(f, st, cx, false, None)
}

/// Checks, when a file is opened, the header of a file whose backing length encodes size 0
/// but is not 0 (exactly the header area: `data_offset` bytes): no read or write would
/// otherwise look at it, and a bogus one (zeros a crash left, another volume's, another
/// version's) would read as a valid empty file that no write can extend. Such a file is
/// refused (`CorruptFile`, EIO) like every other corrupt header. A 0-byte backing file is an
/// empty file without a header; any other length is checked by the first read or write.
pub(crate) fn check_bare_header(
    f: &File,
    st: &FileState,
    cx: &Ctx,
    backing_len: u64,
) -> Result<(), VolumeError> {
    if backing_len == 0 || cx.layout.logical_size(backing_len) != Ok(0) {
        return Ok(());
    }
    // The length alone came with the caller's `fstat`: one more for the change time (this
    // is the rare file that is its header area alone).
    let h = existing_header(f, st, cx, None)?;
    if let Err(e) = key_runs(cx, &h, 0, 0) {
        st.set_cached_header(None);
        return Err(e);
    }
    Ok(())
}

/// The cipher context a content operation needs.
pub struct Ctx<'a> {
    /// Live keys.
    pub keys: &'a VolumeKeys,
    /// Sector engine.
    pub engine: &'a SectorEngine,
    /// Sector (XTS data unit) size.
    pub sector: u64,
    /// Where the data starts in the backing file, and the file header version.
    pub layout: layout::Layout,
}

fn corrupt(why: impl Into<String>) -> VolumeError {
    VolumeError::CorruptFile {
        path: None,
        why: why.into(),
    }
}

fn os_err(errno: i32) -> VolumeError {
    VolumeError::Os(std::io::Error::from_raw_os_error(errno))
}

/// The backing length and change time, and the logical size the length encodes.
fn backing_state(f: &File, cx: &Ctx) -> Result<(Backing, u64), VolumeError> {
    let bk = Backing::of(f)?;
    Ok((bk, cx.layout.logical_size(bk.len).map_err(corrupt)?))
}

/// The file header, from the cache or the file (written first when `create` and the file is
/// empty). `bk`: the backing length and change time if the caller has just read them under
/// the content lock (else one `fstat` here).
///
/// The cache is used only while the change time is the one it was checked at. Another one
/// (our own writes move it too) reads the header again: the same header is kept, with the
/// new time. A different valid header means the whole file was replaced in place by another
/// file of this volume (a sync client, `rsync --inplace`, a restore): its bytes are that
/// file's units under that header, so the new header is used for this and later requests,
/// reads return the new contents and writes are stored under the header that is on disk,
/// as if the file had been replaced by a rename. Answering EIO instead would make a file
/// that decrypts correctly unreadable until every handle closed, and would protect nothing:
/// the units on disk are readable under the new header only. An invalid header fails as
/// usual (`CorruptFile`, EIO) and is not cached.
fn header(
    f: &File,
    st: &FileState,
    cx: &Ctx,
    create: bool,
    bk: Option<Backing>,
) -> Result<Option<FileHeader>, VolumeError> {
    let mut cached = st.header.lock().unwrap_or_else(|p| p.into_inner());
    let bk = match bk {
        Some(b) => b,
        None => Backing::of(f)?,
    };
    let old = cached.take();
    if let Some(c) = old {
        if c.seen == Some(bk.ctime) && bk.len != 0 {
            *cached = Some(c);
            return Ok(Some(c.h));
        }
    }
    if bk.len == 0 {
        if !create {
            return Ok(None);
        }
        let h = cx
            .layout
            .generate_header(cx.keys.generation)
            .map_err(|e| VolumeError::Internal(e.to_string()))?;
        // The whole header area in one `pwrite` (v3: one page), so no length between the
        // header and the data offset survives it but a torn write, which the decoder refuses.
        if let Err(e) = f.write_all_at(&cx.layout.header_area(&h), 0) {
            // A torn header (full disk) would make the file unreadable: it stays empty.
            let _ = f.set_len(0);
            return Err(VolumeError::Os(e));
        }
        *cached = Some(CachedHeader { h, seen: None });
        return Ok(Some(h));
    }
    let mut b = [0u8; FILE_HEADER_LEN];
    f.read_exact_at(&mut b, 0).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            corrupt("file header truncated")
        } else {
            VolumeError::Os(e)
        }
    })?;
    let h = decode_header(cx, &b)?;
    note_replaced(old.map(|c| c.h), &h);
    *cached = Some(CachedHeader {
        h,
        seen: settled(bk.ctime),
    });
    Ok(Some(h))
}

/// Logs a file header that changed behind the mount (not a change of ours: those update the
/// cache as they write).
fn note_replaced(old: Option<FileHeader>, new: &FileHeader) {
    if let Some(old) = old {
        if old != *new {
            tracing::info!(
                "a backing file's header changed behind the mount (the file was replaced in \
                 place): its new header is used"
            );
        }
    }
}

/// Decodes a stored file header and checks that it is this volume's file format.
fn decode_header(cx: &Ctx, b: &[u8; FILE_HEADER_LEN]) -> Result<FileHeader, VolumeError> {
    let h = FileHeader::decode(b).map_err(corrupt)?;
    if h.version != cx.layout.file_version {
        // v1: its last unit follows another rule. Another current version: its data starts
        // elsewhere. Either way reading it with this volume's layout would return wrong bytes.
        return Err(corrupt(if h.version == layout::FILE_VERSION_V1 {
            format!(
                "file is in format v{} (written by an older cmkfs); `cmkfs upgrade` converts it",
                h.version
            )
        } else {
            format!(
                "file header says format v{} in a format v{} volume (copied in from another \
                 volume?): unreadable here; `cmkfs fsck --repair` moves it to the quarantine",
                h.version,
                cx.layout.format_version()
            )
        }));
    }
    Ok(h)
}

/// The header area's largest size ([`layout::Layout::data_offset`]: 32 bytes in v2, one
/// page in v3).
const MAX_HEADER_AREA: usize = 4096;

/// The file header and the first `buf.len()` bytes of data in one `preadv` (header area and
/// data are contiguous), when the header is not cached yet: the first read of a file opened
/// anew, at its start, costs one system call instead of two (`pread` of the header, `pread`
/// of the units; docs/PERFORMANCE.md, "Session 10"). Checked as [`header`] checks it, then
/// cached as checked at `bk`'s change time. `Ok(None)`, with `buf` in any state, when the
/// header is cached and current already or the
/// file gave fewer bytes than asked or an error (it shrank or changed behind the mount): the
/// caller reads the two apart, which says what is wrong. The cache lives while some handle
/// of the file is open, as before: nothing read here outlives what [`header`] would read.
fn header_and_data(
    f: &File,
    st: &FileState,
    cx: &Ctx,
    bk: &Backing,
    buf: &mut [u8],
) -> Result<Option<FileHeader>, VolumeError> {
    let mut cached = st.header.lock().unwrap_or_else(|p| p.into_inner());
    let area_len = cx.layout.data_offset as usize;
    if cached.is_some_and(|c| c.seen == Some(bk.ctime))
        || !(FILE_HEADER_LEN..=MAX_HEADER_AREA).contains(&area_len)
    {
        return Ok(None);
    }
    let mut area = [0u8; MAX_HEADER_AREA];
    let want = area_len + buf.len();
    let mut iov = [
        std::io::IoSliceMut::new(&mut area[..area_len]),
        std::io::IoSliceMut::new(buf),
    ];
    match rustix::io::preadv(f, &mut iov, 0) {
        Ok(got) if got == want => {}
        _ => return Ok(None),
    }
    let mut b = [0u8; FILE_HEADER_LEN];
    b.copy_from_slice(&area[..FILE_HEADER_LEN]);
    let h = match decode_header(cx, &b) {
        Ok(h) => h,
        Err(e) => {
            *cached = None;
            return Err(e);
        }
    };
    note_replaced(cached.map(|c| c.h), &h);
    *cached = Some(CachedHeader {
        h,
        seen: settled(bk.ctime),
    });
    Ok(Some(h))
}

fn existing_header(
    f: &File,
    st: &FileState,
    cx: &Ctx,
    bk: Option<Backing>,
) -> Result<FileHeader, VolumeError> {
    header(f, st, cx, false, bk)?.ok_or_else(|| corrupt("non-empty file without a header"))
}

/// A read of the backing file failed: short (the file shrank behind the mount) or an error.
fn read_error(e: std::io::Error) -> VolumeError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        corrupt("backing file shrank while reading (changed behind the mount?)")
    } else {
        VolumeError::Os(e)
    }
}

fn read_exact(f: &File, cx: &Ctx, buf: &mut [u8], off: u64) -> Result<(), VolumeError> {
    f.read_exact_at(buf, cx.layout.data_offset + off)
        .map_err(read_error)
}

fn write_at(f: &File, cx: &Ctx, buf: &[u8], off: u64) -> Result<(), VolumeError> {
    f.write_all_at(buf, cx.layout.data_offset + off)
        .map_err(VolumeError::Os)
}
