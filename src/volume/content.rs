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

use std::fs::File;
use std::ops::{Deref, Range};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, RwLock};

use super::bufpool::PoolBuf;
use super::direct::{self, DirectFile};
use super::layout::{self, roundup_block, unit_extent, units_end, BLOCK};
pub use super::layout::{FileHeader, Layout, FILE_HEADER_LEN};
use super::writeout;
use super::VolumeError;
use crate::crypto::VolumeKeys;
use crate::engine::{Holes, SectorEngine};

/// Shared state of one backing file, common to all its open handles: the lock that makes
/// read-modify-write and size changes atomic, and the cached header.
///
/// The backing length is not cached: it is read (`fstat`) by every request, so a backing
/// file changed behind the mount (a sync client, a restore) is seen at once, never written
/// through with a stale length (docs/PERFORMANCE.md).
#[derive(Debug, Default)]
pub struct FileState {
    /// Shared for reads and whole-unit overwrites inside the file; exclusive for anything
    /// that reads-modifies-writes a unit or moves the end of the file.
    pub(crate) rmw: RwLock<()>,
    header: Mutex<Option<FileHeader>>,
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

impl FileState {
    /// Replaces the cached file header (after writing it to disk).
    pub(crate) fn set_cached_header(&self, h: Option<FileHeader>) {
        *self.header.lock().unwrap_or_else(|p| p.into_inner()) = h;
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
    let h = existing_header(f, st, cx, Some(backing_len))?;
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

/// The backing length and the logical size it encodes.
fn backing_state(f: &File, cx: &Ctx) -> Result<(u64, u64), VolumeError> {
    let len = f.metadata().map_err(VolumeError::Os)?.len();
    Ok((len, cx.layout.logical_size(len).map_err(corrupt)?))
}

/// The file header, from the cache or the file (written first when `create` and the file is
/// empty). `len`: the backing length if the caller has just read it under the content lock
/// (saves an `fstat` on the first request of each open file).
fn header(
    f: &File,
    st: &FileState,
    cx: &Ctx,
    create: bool,
    len: Option<u64>,
) -> Result<Option<FileHeader>, VolumeError> {
    let mut cached = st.header.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(h) = *cached {
        return Ok(Some(h));
    }
    let len = match len {
        Some(l) => l,
        None => f.metadata().map_err(VolumeError::Os)?.len(),
    };
    if len == 0 {
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
        *cached = Some(h);
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
    let h = FileHeader::decode(&b).map_err(corrupt)?;
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
    *cached = Some(h);
    Ok(Some(h))
}

fn existing_header(
    f: &File,
    st: &FileState,
    cx: &Ctx,
    len: Option<u64>,
) -> Result<FileHeader, VolumeError> {
    header(f, st, cx, false, len)?.ok_or_else(|| corrupt("non-empty file without a header"))
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

/// [`write_at`] that, when it fails, also says how many bytes landed before: a full backing
/// disk (ENOSPC) or its file-size limit (EFBIG) stops a write midway, with a prefix stored.
fn write_counted(f: &File, cx: &Ctx, buf: &[u8], off: u64) -> Result<(), (usize, std::io::Error)> {
    let mut done = 0usize;
    while done < buf.len() {
        match f.write_at(&buf[done..], cx.layout.data_offset + off + done as u64) {
            Ok(0) => return Err((done, std::io::Error::from_raw_os_error(libc::ENOSPC))),
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err((done, e)),
        }
    }
    Ok(())
}

/// A write of the ciphertext `buf` at data offset `at` into a file of old logical `size`
/// stopped after `landed` bytes. Leaves every stored unit readable as old or new bytes and
/// returns where the new bytes end (a block boundary; at or before `at + landed`):
/// - a block that landed in part is completed (its rest is in a page the write already
///   allocated on local filesystems); when even that fails the block is garbled: EIO, logged;
/// - a unit that was a hole (all zeros stored) and now holds new blocks followed by stored
///   zeros inside the old data would decrypt those zeros to garbage: its new blocks are
///   zeroed again (overwriting bytes that landed needs no space), so it stays a hole, and the
///   new bytes end at the unit's start.
fn settle_torn(
    f: &File,
    cx: &Ctx,
    buf: &[u8],
    at: u64,
    landed: usize,
    size: u64,
) -> Result<u64, VolumeError> {
    let mut pos = at + landed as u64;
    if !pos.is_multiple_of(BLOCK) {
        let stop = roundup_block(pos).min(at + buf.len() as u64);
        if let Err((_, e)) = write_counted(f, cx, &buf[landed..(stop - at) as usize], pos) {
            tracing::error!(
                offset = pos,
                error = %e,
                "a write stopped inside an AES block and its rest cannot be stored: the block is garbled"
            );
            return Err(os_err(libc::EIO));
        }
        pos = stop;
    }
    let u_start = pos / cx.sector * cx.sector;
    let old_end = units_end(size);
    if pos != u_start && pos < old_end {
        let stop = (u_start + cx.sector).min(old_end);
        let mut rest = vec![0u8; (stop - pos) as usize];
        read_exact(f, cx, &mut rest, pos)?;
        if rest.iter().all(|b| *b == 0) {
            let from = u_start.max(at);
            write_at(f, cx, &vec![0u8; (pos - from) as usize], from)?;
            pos = u_start;
        }
    }
    Ok(pos)
}

/// Refuses a buffer that is not whole AES blocks: the cipher would fall back to ciphertext
/// stealing or the v1 short-tail rule, which format v2 never uses.
fn check_blocks(buf: &[u8]) -> Result<(), VolumeError> {
    if !(buf.len() as u64).is_multiple_of(BLOCK) {
        return Err(VolumeError::Internal(format!(
            "a {}-byte unit buffer is not whole AES blocks",
            buf.len()
        )));
    }
    Ok(())
}

/// The keys of a file's units `[first, first + n)` as runs: `(units, keys)`. A file is
/// under the DEK of its header's key generation, except while a re-encryption converts it:
/// then its first `reencrypted` units are under the volume's current DEK already.
fn key_runs<'k>(
    cx: &Ctx<'k>,
    h: &FileHeader,
    first: u64,
    n: u64,
) -> Result<[(u64, &'k VolumeKeys); 2], VolumeError> {
    let current: &'k VolumeKeys = cx.keys;
    if h.key_gen == current.generation as u16 {
        return Ok([(n, current), (0, current)]);
    }
    let Some(old) = current.for_file_generation(h.key_gen) else {
        return Err(corrupt(format!(
            "file data is under key generation {}, but the volume's keys are of generation {}{}",
            h.key_gen,
            current.generation as u16,
            match &current.retiring {
                Some(r) => format!(" and {} (retiring)", r.generation as u16),
                None => String::new(),
            }
        )));
    };
    let done = h.reencrypted.saturating_sub(first).min(n);
    Ok([(done, current), (n - done, old)])
}

/// The number of whole units `buf` covers starting at unit boundary (the last may be short).
fn units_in(cx: &Ctx, buf: &[u8]) -> u64 {
    (buf.len() as u64).div_ceil(cx.sector)
}

/// Encrypts consecutive units in place, each with the keys of its file's generation (see
/// [`key_runs`]): the inner (platform-key) layer first when the volume is double-encrypted,
/// then the outer one. Both layers use the same tweaks and the same whole-block units; their
/// keys are independent, so the passes do not cancel.
pub(crate) fn encrypt(
    cx: &Ctx,
    h: &FileHeader,
    first: u64,
    buf: &mut [u8],
) -> Result<(), VolumeError> {
    by_key_runs(cx, h, first, buf, encrypt_with)
}

/// Copies `data` into `buf[at..]` and encrypts `buf` as [`encrypt`] does, in one pass over
/// memory: each unit gets its part of `data` just before it is encrypted (the request's
/// plaintext goes from the FUSE buffer to ciphertext in the pooled one, never to plaintext
/// in a second buffer first).
fn encrypt_copying(
    cx: &Ctx,
    h: &FileHeader,
    first: u64,
    buf: &mut [u8],
    data: &[u8],
    at: usize,
) -> Result<(), VolumeError> {
    check_blocks(buf)?;
    let mut pos = 0usize;
    let mut unit = first;
    for (n, keys) in key_runs(cx, h, first, units_in(cx, buf))? {
        if n == 0 {
            continue;
        }
        let end = (pos + (n * cx.sector) as usize).min(buf.len());
        // The part of `data` inside this run (`lo >= at` whenever the part is not empty).
        let lo = at.clamp(pos, end);
        let hi = (at + data.len()).clamp(lo, end);
        let run = &mut buf[pos..end];
        let tweak = h.tweak();
        if hi > lo {
            let part = &data[lo - at..hi - at];
            let layer = keys.inner.as_ref().unwrap_or(&keys.xts);
            cx.engine
                .encrypt_from(layer, tweak, unit, run, part, lo - pos)
                .map_err(VolumeError::Crypto)?;
            if keys.inner.is_some() {
                cx.engine
                    .encrypt(&keys.xts, tweak, unit, run)
                    .map_err(VolumeError::Crypto)?;
            }
        } else {
            encrypt_with(cx, keys, tweak, unit, run)?;
        }
        pos = end;
        unit += n;
    }
    Ok(())
}

/// One cipher pass over consecutive units with one generation's keys: [`encrypt_with`] or
/// [`decrypt_with`] (context, keys, file tweak, first unit, buffer).
type CipherPass = fn(&Ctx, &VolumeKeys, u128, u64, &mut [u8]) -> Result<(), VolumeError>;

/// Runs `pass` over consecutive units of `buf` (unit `first` at its start), one run of units
/// per key generation ([`key_runs`]).
fn by_key_runs(
    cx: &Ctx,
    h: &FileHeader,
    first: u64,
    buf: &mut [u8],
    pass: CipherPass,
) -> Result<(), VolumeError> {
    check_blocks(buf)?;
    let mut at = 0usize;
    let mut unit = first;
    for (n, keys) in key_runs(cx, h, first, units_in(cx, buf))? {
        if n == 0 {
            continue;
        }
        let end = (at + (n * cx.sector) as usize).min(buf.len());
        pass(cx, keys, h.tweak(), unit, &mut buf[at..end])?;
        at = end;
        unit += n;
    }
    Ok(())
}

/// Encrypts consecutive units in place with `keys`.
pub(crate) fn encrypt_with(
    cx: &Ctx,
    keys: &VolumeKeys,
    tweak: u128,
    first: u64,
    buf: &mut [u8],
) -> Result<(), VolumeError> {
    check_blocks(buf)?;
    if let Some(inner) = &keys.inner {
        cx.engine
            .encrypt(inner, tweak, first, buf)
            .map_err(VolumeError::Crypto)?;
    }
    cx.engine
        .encrypt(&keys.xts, tweak, first, buf)
        .map_err(VolumeError::Crypto)
}

/// Decrypts consecutive units in place, the inverse of [`encrypt`]. All-zero stored blocks
/// (holes) stay zeros through both layers: the outer pass leaves them as they are, and a real
/// inner ciphertext block is all zero with probability 2^-128.
pub(crate) fn decrypt(
    cx: &Ctx,
    h: &FileHeader,
    first: u64,
    buf: &mut [u8],
) -> Result<(), VolumeError> {
    by_key_runs(cx, h, first, buf, decrypt_with)
}

/// Decrypts consecutive units in place with `keys`.
pub(crate) fn decrypt_with(
    cx: &Ctx,
    keys: &VolumeKeys,
    tweak: u128,
    first: u64,
    buf: &mut [u8],
) -> Result<(), VolumeError> {
    check_blocks(buf)?;
    cx.engine
        .decrypt(&keys.xts, tweak, first, buf, Holes::Zero)
        .map_err(VolumeError::Crypto)?;
    if let Some(inner) = &keys.inner {
        cx.engine
            .decrypt(inner, tweak, first, buf, Holes::Zero)
            .map_err(VolumeError::Crypto)?;
    }
    Ok(())
}

/// Reads unit `s` of a file of logical size `size` into the start of `out` as plaintext, with
/// every byte at or past `size` zeroed (the padding of the last block may hold stale bytes).
/// `out` must hold the unit's extent; bytes past it are left alone. Returns whether the unit
/// is a hole (all-zero stored bytes).
fn read_unit(
    f: &File,
    cx: &Ctx,
    h: &FileHeader,
    s: u64,
    size: u64,
    out: &mut [u8],
) -> Result<bool, VolumeError> {
    let (start, end) = unit_extent(s, cx.sector, size);
    let n = (end - start) as usize;
    read_exact(f, cx, &mut out[..n], start)?;
    let hole = out[..n].iter().all(|b| *b == 0);
    decrypt(cx, h, s, &mut out[..n])?;
    let live = (size - start).min(n as u64) as usize;
    out[live..n].fill(0);
    Ok(hole)
}

/// `n` rounded down to a whole number of AES blocks.
fn rounddown_block(n: u64) -> u64 {
    n / BLOCK * BLOCK
}

/// The plaintext of a read: the decrypted units in a pooled buffer and the part of them the
/// request asked for. Derefs to that part, so a reply goes out from the buffer the data was
/// read and decrypted in, without a copy.
#[derive(Debug)]
pub struct ReadBuf {
    buf: PoolBuf,
    range: Range<usize>,
}

impl ReadBuf {
    fn empty() -> ReadBuf {
        ReadBuf {
            buf: PoolBuf::take(0),
            range: 0..0,
        }
    }
}

impl Deref for ReadBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[self.range.clone()]
    }
}

/// Reads up to `len` bytes at `off`: the plaintext (shorter at end of file), in place in the
/// units it was decrypted in.
pub fn read_buf(
    f: &File,
    st: &FileState,
    cx: &Ctx,
    off: u64,
    len: usize,
) -> Result<ReadBuf, VolumeError> {
    let _g = st.rmw.read().unwrap_or_else(|p| p.into_inner());
    let (blen, size) = backing_state(f, cx)?;
    if off >= size || len == 0 {
        check_bare_header(f, st, cx, blen)?;
        return Ok(ReadBuf::empty());
    }
    let end = size.min(off.saturating_add(len as u64));
    let h = existing_header(f, st, cx, Some(blen))?;
    let first = off / cx.sector;
    let start = first * cx.sector;
    let stop = units_end(size).min((end - 1) / cx.sector * cx.sector + cx.sector);
    let n = (stop - start) as usize;
    // Large requests read without the page-cache copy, the units at `at` in an aligned
    // buffer; the others buffered, at its start. Every byte of the units is read from the
    // file before it is used.
    let (mut buf, at) = match direct::read(&st.direct, f, cx.layout.data_offset + start, n) {
        Some(r) => r.map_err(read_error)?,
        None => {
            let mut buf = PoolBuf::take(n);
            read_exact(f, cx, &mut buf, start)?;
            (buf, 0)
        }
    };
    decrypt(cx, &h, first, &mut buf[at..at + n])?;
    Ok(ReadBuf {
        buf,
        range: at + (off - start) as usize..at + (end - start) as usize,
    })
}

/// Reads up to `len` bytes at `off` into a new vector (shorter at end of file).
pub fn read(
    f: &File,
    st: &FileState,
    cx: &Ctx,
    off: u64,
    len: usize,
) -> Result<Vec<u8>, VolumeError> {
    read_buf(f, st, cx, off, len).map(|b| b.to_vec())
}

/// Writes `data` at `off`, growing the file as needed. Returns the bytes written.
pub fn write(
    f: &File,
    st: &FileState,
    cx: &Ctx,
    off: u64,
    data: &[u8],
) -> Result<usize, VolumeError> {
    if data.is_empty() {
        return Ok(0);
    }
    let end = off
        .checked_add(data.len() as u64)
        .ok_or_else(|| os_err(libc::EFBIG))?;
    checked_backing_len(cx, end)?;
    // Whole units inside the file (the last one counts when the write reaches the end of
    // file): no read-modify-write and no size change, so such writes run concurrently under
    // the shared lock. The last unit's padding is written as zeros; the filler is untouched.
    // (A write that starts inside a unit never is one, nor, most likely, is the next write of
    // a file that the last write grew: they go straight to the exclusive lock, with one
    // `fstat` instead of two.)
    let n = 'done: {
        if off.is_multiple_of(cx.sector) && !st.appending.load(Ordering::Relaxed) {
            let _g = st.rmw.read().unwrap_or_else(|p| p.into_inner());
            let (blen, size) = backing_state(f, cx)?;
            if end <= size && (end % cx.sector == 0 || end == size) {
                break 'done overwrite_units(f, st, cx, off, data, blen)?;
            }
        }
        let _g = st.rmw.write().unwrap_or_else(|p| p.into_inner());
        write_locked(f, st, cx, off, data)?
    };
    // Outside the content lock: starting the disk may wait for its queue.
    writeout::wrote(&st.pending, f, n);
    Ok(n)
}

/// Whole units inside the file, under the shared lock: encrypted in a pooled buffer (which
/// then holds ciphertext only), written back as they are.
fn overwrite_units(
    f: &File,
    st: &FileState,
    cx: &Ctx,
    off: u64,
    data: &[u8],
    blen: u64,
) -> Result<usize, VolumeError> {
    let h = existing_header(f, st, cx, Some(blen))?;
    let mut buf = PoolBuf::take(roundup_block(data.len() as u64) as usize);
    buf[data.len()..].fill(0);
    encrypt_copying(cx, &h, off / cx.sector, &mut buf, data, 0)?;
    match write_counted(f, cx, &buf, off) {
        Ok(()) => Ok(data.len()),
        Err((landed, e)) => {
            // A hole's units need new blocks: the disk may fill up midway. As a local
            // filesystem: the bytes that landed, or the error when none did.
            let size = cx.layout.logical_size(blen).map_err(corrupt)?;
            let pos = settle_torn(f, cx, &buf, off, landed, size)?;
            match pos.saturating_sub(off).min(data.len() as u64) {
                0 => Err(VolumeError::Os(e)),
                n => Ok(n as usize),
            }
        }
    }
}

/// The read-modify-write body of [`write`]; the caller holds the exclusive lock.
fn write_locked(
    f: &File,
    st: &FileState,
    cx: &Ctx,
    off: u64,
    data: &[u8],
) -> Result<usize, VolumeError> {
    let end = off + data.len() as u64;
    let (old_len, size) = backing_state(f, cx)?;
    st.appending.store(end > size, Ordering::Relaxed);
    let h = header(f, st, cx, true, Some(old_len))?
        .ok_or_else(|| corrupt("could not create the file header"))?;
    let ss = cx.sector;
    let new_size = size.max(end);
    let first = off / ss;
    let last = (end - 1) / ss;
    // A write that starts past the old last unit turns that unit into a full one (zeros past
    // the old end of file): written first, so a crash leaves a consistent file.
    if size > 0 && (size - 1) / ss < first {
        if let Err(e) = extend_last_unit(f, cx, &h, size, ((size - 1) / ss + 1) * ss) {
            // It re-encrypted the same plaintext (zeros past `size`): the old length
            // makes the file what it was.
            undo_growth(f, st, old_len);
            return Err(e);
        }
    }
    let start = first * ss;
    let stop = units_end(new_size).min((last + 1) * ss);
    let units = (stop - start) as usize;
    // Growth: the filler goes out in the same pwrite as the last unit, so the length moves
    // together with the data.
    let filler = if new_size != size {
        layout::filler_len(new_size) as usize
    } else {
        0
    };
    // Zeros wherever neither the old units nor `data` will be put: before and after the
    // written range (the edge units read below overwrite parts of that), and the filler.
    let mut buf = PoolBuf::take(units + filler);
    buf[..(off - start) as usize].fill(0);
    buf[(end - start) as usize..].fill(0);
    // What must go back to disk: `buf[lo..hi]`. XTS is deterministic per block, so a block
    // re-encrypted from the plaintext it already held comes out as the ciphertext stored:
    // the blocks of a read unit before the write (and before the old end of file, past which
    // the stale padding is zeroed) and after it (inside the old data) need no write. A hole
    // unit is written whole: its zeros become ciphertext.
    let (mut lo, mut hi) = (0u64, stop - start);
    // Keep the old bytes of the first and last units where the write does not cover them.
    let edges = [first, last];
    for &s in &edges[..if first == last { 1 } else { 2 }] {
        let (s_start, s_old_end) = (s * ss, size.min(s * ss + ss));
        if s_start < size && !(off <= s_start && end >= s_old_end) {
            let at = (s_start - start) as usize;
            if read_unit(f, cx, &h, s, size, &mut buf[at..])? {
                continue;
            }
            if s == first {
                lo = rounddown_block(off.min(size)) - start;
            }
            let unit_end = (s_start + ss).min(units_end(size));
            if s == last && new_size == size && unit_end <= rounddown_block(size) {
                hi = roundup_block(end).min(unit_end) - start;
            }
        }
    }
    encrypt_copying(
        cx,
        &h,
        first,
        &mut buf[..units],
        data,
        (off - start) as usize,
    )?;
    let want = cx.layout.backing_len(new_size);
    if new_size != size {
        hi = buf.len() as u64;
    }
    let torn = write_counted(f, cx, &buf[lo as usize..hi as usize], start + lo);
    let (written, want) = match torn {
        Ok(()) => (data.len(), want),
        Err((landed, e)) => {
            // The backing disk filled up (or its file-size limit came) midway. As a local
            // filesystem: a short count of the bytes that landed, the size grown to their
            // end at most; when none landed, the error and the file as it was.
            let pos = settle_torn(
                f,
                cx,
                &buf[lo as usize..hi as usize],
                start + lo,
                landed,
                size,
            )
            .inspect_err(|_| undo_growth(f, st, old_len))?;
            match pos.saturating_sub(off).min(data.len() as u64) {
                0 => {
                    undo_growth(f, st, old_len);
                    return Err(VolumeError::Os(e));
                }
                n => (n as usize, cx.layout.backing_len(size.max(off + n))),
            }
        }
    };
    // Growth inside the old filler shortens the backing file (e.g. 10 → 16 bytes); a torn
    // write may have left the length anywhere.
    if written < data.len() || old_len.max(cx.layout.data_offset + start + hi) != want {
        f.set_len(want).map_err(VolumeError::Os)?;
    }
    Ok(written)
}

/// A growing write failed: sets the backing length back to `old_len` (best effort: a shrink
/// needs no space), and forgets the header written for a file that was empty.
fn undo_growth(f: &File, st: &FileState, old_len: u64) {
    if let Err(e) = f.set_len(old_len) {
        tracing::error!(error = %e, "could not undo a failed write's growth of a file");
    }
    if old_len == 0 {
        *st.header.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// Rewrites the last unit of a file of logical `size` so that it reaches `new_end` (a block
/// boundary inside the same unit, at or past its current end), with zeros past `size`. Also
/// zeroes old filler bytes that would otherwise lie inside the grown file. Does not shrink
/// the backing file; the caller sets the final length.
fn extend_last_unit(
    f: &File,
    cx: &Ctx,
    h: &FileHeader,
    size: u64,
    new_end: u64,
) -> Result<(), VolumeError> {
    if size.is_multiple_of(cx.sector) {
        return Ok(()); // a full unit, no padding, no filler
    }
    let s = (size - 1) / cx.sector;
    let start = s * cx.sector;
    let old_data_end = layout::data_len(size);
    let mut buf = vec![0u8; (new_end - start) as usize];
    let units_end = units_end(size);
    read_exact(f, cx, &mut buf[..(units_end - start) as usize], start)?;
    if buf.iter().all(|b| *b == 0) {
        // A hole stays a hole (sparse files stay sparse): only the old filler, which the
        // grown unit or the next one now covers, must read as zeros.
        let filler = vec![0u8; (old_data_end - units_end) as usize];
        return write_at(f, cx, &filler, units_end);
    }
    read_unit(f, cx, h, s, size, &mut buf)?;
    encrypt(cx, h, s, &mut buf)?;
    if old_data_end > new_end {
        buf.resize((old_data_end - start) as usize, 0);
    }
    write_at(f, cx, &buf, start)
}

/// After a shrink to `size`: overwrites the padding of the last block (plaintext past `size`,
/// stale since the shrink) and the filler with zeros, so no truncated byte can show up again
/// when the file grows. A hole unit holds nothing stale: only the filler is zeroed.
fn scrub_tail(f: &File, cx: &Ctx, h: &FileHeader, size: u64) -> Result<(), VolumeError> {
    if size.is_multiple_of(BLOCK) {
        return Ok(()); // no padding and no filler
    }
    let s = (size - 1) / cx.sector;
    let (start, end) = unit_extent(s, cx.sector, size);
    let mut unit = vec![0u8; (end - start) as usize];
    read_exact(f, cx, &mut unit, start)?;
    let filler = vec![0u8; layout::filler_len(size) as usize];
    if unit.iter().all(|b| *b == 0) {
        return write_at(f, cx, &filler, end);
    }
    decrypt(cx, h, s, &mut unit)?;
    unit[(size - start) as usize..].fill(0);
    encrypt(cx, h, s, &mut unit)?;
    // Blocks are independent: only the last one changed.
    let mut tail = unit[unit.len() - BLOCK as usize..].to_vec();
    tail.extend_from_slice(&filler);
    write_at(f, cx, &tail, end - BLOCK)
}

/// Sets the logical size to `new_size` (shrink, or grow with zeros).
pub fn truncate(f: &File, st: &FileState, cx: &Ctx, new_size: u64) -> Result<(), VolumeError> {
    let _g = st.rmw.write().unwrap_or_else(|p| p.into_inner());
    truncate_locked(f, st, cx, new_size)
}

fn truncate_locked(f: &File, st: &FileState, cx: &Ctx, new_size: u64) -> Result<(), VolumeError> {
    checked_backing_len(cx, new_size)?;
    let (blen, size) = backing_state(f, cx)?;
    if new_size == size {
        return Ok(());
    }
    if new_size == 0 {
        // Dropping the header too means the next write picks a new file id: old and new
        // contents never share tweaks.
        f.set_len(0).map_err(VolumeError::Os)?;
        *st.header.lock().unwrap_or_else(|p| p.into_inner()) = None;
        return Ok(());
    }
    let h = header(f, st, cx, true, Some(blen))?
        .ok_or_else(|| corrupt("could not create the file header"))?;
    let want = cx.layout.backing_len(new_size);
    if new_size > size {
        if size > 0 {
            let s = (size - 1) / cx.sector;
            let new_end = units_end(new_size).min((s + 1) * cx.sector);
            extend_last_unit(f, cx, &h, size, new_end)?;
        }
        // Units past the old last one are holes of the backing file: they read as zeros.
        return f.set_len(want).map_err(VolumeError::Os);
    }
    let h = lower_progress(f, st, cx, h, size, new_size)?;
    // Every unit keeps a valid prefix (XTS blocks are independent): shortening the backing
    // file is the whole truncate, atomic as one system call. The scrub after it only
    // overwrites bytes past the new end.
    f.set_len(want).map_err(VolumeError::Os)?;
    scrub_tail(f, cx, &h, new_size)
}

/// Before a file of logical `size` that a running re-encryption has converted in part
/// shrinks to `new_size`: lowers its header's progress (`reencrypted`) to the new unit count,
/// so that `reencrypted <= units` holds in every state a crash can leave (docs/FORMAT.md,
/// "Re-encryption"; the file judge refuses a progress past the last unit, attack session
/// 15, F1). Returns the header in force. The caller holds the exclusive lock.
///
/// Order, each step durable before the next: the converted units the cut removes are made
/// holes (they read as zeros under either DEK, so none reads as garbage once the lowered
/// header calls them unconverted), then the header is lowered, then the caller cuts.
fn lower_progress(
    f: &File,
    st: &FileState,
    cx: &Ctx,
    h: FileHeader,
    size: u64,
    new_size: u64,
) -> Result<FileHeader, VolumeError> {
    let units = new_size.div_ceil(cx.sector);
    if h.reencrypted <= units {
        return Ok(h);
    }
    let converted_end = (h.reencrypted.saturating_mul(cx.sector)).min(size);
    if units * cx.sector < converted_end {
        zero_range(f, st, cx, units * cx.sector, converted_end, size)?;
        f.sync_data().map_err(VolumeError::Os)?;
    }
    let lowered = FileHeader {
        reencrypted: units,
        ..h
    };
    f.write_all_at(&lowered.encode(), 0)
        .map_err(VolumeError::Os)?;
    f.sync_data().map_err(VolumeError::Os)?;
    st.set_cached_header(Some(lowered));
    Ok(lowered)
}

/// The backing length of a file of logical size `size`, or EFBIG where it would pass the
/// largest file offset (`i64::MAX`): a local filesystem's errno, never the EIO of a length
/// the system call cannot take.
fn checked_backing_len(cx: &Ctx, size: u64) -> Result<u64, VolumeError> {
    size.checked_add(cx.layout.data_offset + BLOCK)
        .filter(|n| *n <= i64::MAX as u64)
        .map(|_| cx.layout.backing_len(size))
        .ok_or_else(|| os_err(libc::EFBIG))
}

/// EFBIG where a file of logical size `end` would pass the backing filesystem's file-size
/// limit, as the kernel answers an `fallocate` past it. The limit is the backing
/// filesystem's own (ext4: 16 TiB - 4 KiB with 4 KiB blocks), asked with a one-byte
/// `PUNCH_HOLE | KEEP_SIZE` past the backing file's end, which changes nothing.
fn check_size_limit(f: &File, cx: &Ctx, blen: u64, end: u64) -> Result<(), VolumeError> {
    let want = checked_backing_len(cx, end)?;
    if want <= blen {
        return Ok(());
    }
    let probe = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    match sys_fallocate(f, probe, want - 1, 1) {
        Err(e) if e.raw_os_error() == Some(libc::EFBIG) => Err(VolumeError::Os(e)),
        _ => Ok(()),
    }
}

/// `fallocate(2)` on the plaintext view. Supported: mode 0 and `KEEP_SIZE` (reserve space;
/// growth reads as zeros), `PUNCH_HOLE | KEEP_SIZE` and `ZERO_RANGE` (the range reads as
/// zeros). `COLLAPSE_RANGE` and `INSERT_RANGE` would move data across tweaks: EOPNOTSUPP.
pub fn fallocate(
    f: &File,
    st: &FileState,
    cx: &Ctx,
    mode: i32,
    off: u64,
    len: u64,
) -> Result<(), VolumeError> {
    let supported =
        libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE;
    if mode & !supported != 0 {
        return Err(os_err(libc::EOPNOTSUPP));
    }
    if len == 0 {
        return Err(os_err(libc::EINVAL));
    }
    let end = off.checked_add(len).ok_or_else(|| os_err(libc::EFBIG))?;
    let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
    let _g = st.rmw.write().unwrap_or_else(|p| p.into_inner());
    let (blen, size) = backing_state(f, cx)?;
    check_size_limit(f, cx, blen, end)?;
    if mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0 {
        zero_range(f, st, cx, off, end.min(size), size)?;
        if !keep && end > size {
            truncate_locked(f, st, cx, end)?;
        }
        return Ok(());
    }
    if !keep && end > size {
        truncate_locked(f, st, cx, end)?;
    }
    // Reserve the blocks so that a later write cannot fail with ENOSPC; unwritten extents
    // read as zero ciphertext, which reads as zeros. A 0-byte backing file (an empty file
    // without a header) gets its header first: the reservation lies behind it (attack
    // session 14, F1: `fallocate -n` of an empty file reserved nothing and said so nowhere).
    if header(f, st, cx, true, None)?.is_some() {
        let r = sys_fallocate(
            f,
            libc::FALLOC_FL_KEEP_SIZE,
            cx.layout.data_offset + off,
            len,
        );
        if let Err(e) = r {
            if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
                // As a local filesystem: a failed `fallocate` leaves the size it found (attack
                // session 13, F5: the file kept the grown size after ENOSPC).
                if !keep && end > size {
                    if let Err(undo) = truncate_locked(f, st, cx, size) {
                        tracing::warn!(error = %undo, "cannot undo a failed fallocate's growth");
                    }
                }
                return Err(VolumeError::Os(e));
            }
        }
    }
    Ok(())
}

fn sys_fallocate(f: &File, mode: i32, off: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: plain syscall on a valid descriptor.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, off as libc::off_t, len as libc::off_t) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Makes `[a, b)` (inside a file of logical `size`) read as zeros: whole units become holes
/// of the backing file (all-zero stored bytes), partial units are rewritten whole.
fn zero_range(
    f: &File,
    st: &FileState,
    cx: &Ctx,
    a: u64,
    b: u64,
    size: u64,
) -> Result<(), VolumeError> {
    if a >= b {
        return Ok(());
    }
    let ss = cx.sector;
    // Whole units inside [a, b): the first at or after a, up to the last ending by b (the
    // file's last unit counts as whole when b reaches the end of file; it is stored up to
    // the end of its last block, and the filler after it belongs to no unit).
    let first_full = a.div_ceil(ss) * ss;
    let last_full_end = if b == size {
        units_end(size)
    } else {
        b / ss * ss
    };
    if first_full < last_full_end {
        let (off, len) = (
            cx.layout.data_offset + first_full,
            last_full_end - first_full,
        );
        let punched = sys_fallocate(
            f,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        );
        if punched.is_err() {
            // No hole punching here: zero stored bytes read as zeros all the same.
            let zeros = vec![0u8; (ss as usize).min(len as usize)];
            let mut at = 0;
            while at < len {
                let n = zeros.len().min((len - at) as usize);
                f.write_all_at(&zeros[..n], off + at)
                    .map_err(VolumeError::Os)?;
                at += n as u64;
            }
        }
    }
    // The partial edges, rewritten as encrypted zeros.
    let head_end = b.min(first_full);
    if a < head_end {
        write_locked(f, st, cx, a, &vec![0u8; (head_end - a) as usize])?;
    }
    let tail_start = a.max(last_full_end);
    if tail_start < b && tail_start >= head_end {
        write_locked(f, st, cx, tail_start, &vec![0u8; (b - tail_start) as usize])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Dek;
    use rand::{Rng, SeedableRng};

    struct Fixture {
        _dir: tempfile::TempDir,
        file: File,
        st: FileState,
        keys: VolumeKeys,
        engine: SectorEngine,
        sector: u64,
        lay: Layout,
    }

    /// A file of a v3 volume (what `cmkfs init` makes).
    fn fixture_keys(sector: u64, threads: usize, double: bool) -> Fixture {
        fixture_in(Layout::V3, sector, threads, double)
    }

    fn fixture_in(lay: Layout, sector: u64, threads: usize, double: bool) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("f"))
            .unwrap();
        let inner = Dek::generate().unwrap();
        let keys = VolumeKeys::from_deks(
            &Dek::generate().unwrap(),
            double.then_some(&inner),
            sector as usize,
        )
        .unwrap();
        Fixture {
            _dir: dir,
            file,
            st: FileState::default(),
            keys,
            engine: SectorEngine::new(threads).unwrap(),
            sector,
            lay,
        }
    }

    fn fixture(sector: u64, threads: usize) -> Fixture {
        fixture_keys(sector, threads, false)
    }

    impl Fixture {
        fn cx(&self) -> Ctx<'_> {
            Ctx {
                keys: &self.keys,
                engine: &self.engine,
                sector: self.sector,
                layout: self.lay,
            }
        }
        /// The data offset in the backing file.
        fn h(&self) -> usize {
            self.lay.data_offset as usize
        }
        fn all(&self) -> Vec<u8> {
            read(&self.file, &self.st, &self.cx(), 0, usize::MAX / 2).unwrap()
        }
        fn raw(&self) -> Vec<u8> {
            std::fs::read(self._dir.path().join("f")).unwrap()
        }
        fn write(&self, off: u64, data: &[u8]) {
            write(&self.file, &self.st, &self.cx(), off, data).unwrap();
        }
        fn truncate(&self, n: u64) {
            truncate(&self.file, &self.st, &self.cx(), n).unwrap();
        }
        fn file_id(&self) -> FileHeader {
            FileHeader::decode(&self.raw()[..FILE_HEADER_LEN]).unwrap()
        }
    }

    /// A write into a hole unit that reaches the disk only in part (ENOSPC after the first
    /// page, or a power cut between the unit's two pages: in format v2, behind the 32-byte
    /// header, a unit straddles two pages) leaves whole old (zero) and new blocks, never
    /// garbage. Found by a hostile tester: the unfinished part decrypted to random bytes the
    /// user never wrote.
    #[test]
    fn a_torn_write_into_a_hole_leaves_zeros_where_it_did_not_land() {
        for (lay, double) in [
            (Layout::V2, false),
            (Layout::V2, true),
            (Layout::V3, false),
            (Layout::V3, true),
        ] {
            let fx = fixture_in(lay, 4096, 1, double);
            fx.truncate(3 * 4096);
            let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8 + 1).collect();
            // What a full write of unit 1 stores; then only a part of it reaches the disk.
            fx.write(4096, &data);
            let raw = fx.raw();
            let unit = fx.h() + 4096..fx.h() + 2 * 4096;
            // The backing page boundary inside unit 1 (v2); v3's unit 1 is one whole page.
            let page_end = 2 * 4096;
            for cut in [page_end, fx.h() + 4096 + 16, fx.h() + 4096 + 4080] {
                if !unit.contains(&cut) {
                    continue;
                }
                let mut torn = raw.clone();
                torn[cut..unit.end].fill(0);
                std::fs::write(fx._dir.path().join("f"), &torn).unwrap();
                let got = fx.all();
                assert_eq!(got.len(), 3 * 4096, "cut {cut}");
                let landed = cut - unit.start;
                assert_eq!(
                    &got[4096..4096 + landed],
                    &data[..landed],
                    "cut {cut} double {double}"
                );
                assert!(
                    got[4096 + landed..].iter().all(|&b| b == 0),
                    "cut {cut} double {double}: bytes the write never stored must read as zeros"
                );
                assert!(got[..4096].iter().all(|&b| b == 0));
            }
        }
    }

    #[test]
    fn random_writes_and_truncates_match_a_model() {
        for (seed, sector, double, lay) in [
            (1u64, 512u64, false, Layout::V3),
            (2, 512, true, Layout::V2),
            (3, 4096, false, Layout::V3),
            (4, 4096, true, Layout::V3),
            (5, 1024, false, Layout::V2),
            (6, 4096, false, Layout::V2),
        ] {
            let fx = fixture_in(lay, sector, 2, double);
            let mut model: Vec<u8> = Vec::new();
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            for step in 0..400 {
                let max = (sector * 6) as usize;
                if rng.gen_ratio(1, 5) {
                    let n = rng.gen_range(0..max);
                    fx.truncate(n as u64);
                    model.resize(n, 0);
                } else if rng.gen_ratio(1, 6) {
                    let off = rng.gen_range(0..max);
                    let len = rng.gen_range(1..(sector as usize * 3));
                    let mode = [
                        0,
                        libc::FALLOC_FL_KEEP_SIZE,
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        libc::FALLOC_FL_ZERO_RANGE,
                    ][rng.gen_range(0..4)];
                    fallocate(&fx.file, &fx.st, &fx.cx(), mode, off as u64, len as u64).unwrap();
                    let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
                    if !keep && model.len() < off + len {
                        model.resize(off + len, 0);
                    }
                    if mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0 {
                        let stop = (off + len).min(model.len());
                        if off < stop {
                            model[off..stop].fill(0);
                        }
                    }
                } else {
                    let off = rng.gen_range(0..max);
                    let len = rng.gen_range(1..(sector as usize * 3));
                    let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                    fx.write(off as u64, &data);
                    if model.len() < off + len {
                        model.resize(off + len, 0);
                    }
                    model[off..off + len].copy_from_slice(&data);
                }
                let got = fx.all();
                assert_eq!(got.len(), model.len(), "seed {seed} step {step}: size");
                assert!(got == model, "seed {seed} step {step}: contents differ");
                let backing = fx.file.metadata().unwrap().len();
                assert!(
                    backing == fx.lay.backing_len(model.len() as u64)
                        || (model.is_empty() && backing == 0),
                    "seed {seed} step {step}: backing length {backing} for size {}",
                    model.len()
                );
                // Random partial reads agree with the model too.
                if !model.is_empty() {
                    let off = rng.gen_range(0..model.len());
                    let len = rng.gen_range(1..=model.len() - off + 10);
                    let part = read(&fx.file, &fx.st, &fx.cx(), off as u64, len).unwrap();
                    assert_eq!(part[..], model[off..(off + len).min(model.len())]);
                }
            }
        }
    }

    #[test]
    fn large_reads_decrypt_where_the_direct_read_put_the_units() {
        // Units at every alignment in the direct buffer (sector 512: the units of a request
        // start at any multiple of 512, plus the 32-byte header), holes, the last partial
        // unit, both layers; the backing file's page cache dropped so the disk is read.
        for (seed, sector, double, lay) in [
            (1u64, 512u64, false, Layout::V3),
            (2, 4096, true, Layout::V3),
            (3, 1024, false, Layout::V2),
            (4, 4096, false, Layout::V2),
        ] {
            let fx = fixture_in(lay, sector, 2, double);
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let size = (700 << 10) + rng.gen_range(1..16);
            let mut model: Vec<u8> = (0..size).map(|_| rng.gen()).collect();
            fx.write(0, &model);
            // A hole of whole units in the middle.
            let hole = 200 * 1024..(300 << 10);
            fallocate(
                &fx.file,
                &fx.st,
                &fx.cx(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                hole.start as u64,
                (hole.end - hole.start) as u64,
            )
            .unwrap();
            model[hole].fill(0);
            let before = direct::direct_reads();
            for i in 0..24 {
                if i % 3 == 0 {
                    fx.file.sync_data().unwrap();
                    rustix::fs::fadvise(&fx.file, 0, None, rustix::fs::Advice::DontNeed).unwrap();
                }
                let off = rng.gen_range(0..size - 1000);
                let len = rng.gen_range(direct::DIRECT_MIN..(1 << 20) + 8192);
                let got = read(&fx.file, &fx.st, &fx.cx(), off as u64, len).unwrap();
                let stop = (off + len).min(size);
                assert!(got == model[off..stop], "seed {seed} read {i}: {off}+{len}");
            }
            assert!(fx.all() == model, "seed {seed}: whole file");
            // Skipped where the backing filesystem has no O_DIRECT (tmpfs before Linux 6.6).
            if fx.st.direct.get(&fx.file).is_some() {
                assert!(direct::direct_reads() > before, "seed {seed}: never direct");
            }
        }
    }

    #[test]
    fn tails_of_every_short_length_round_trip() {
        for len in [
            1usize, 2, 15, 16, 17, 31, 4095, 4096, 4097, 4111, 4112, 8191,
        ] {
            let fx = fixture(4096, 1);
            let data: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            fx.write(0, &data);
            assert_eq!(fx.all(), data, "len {len}");
            let raw = fx.raw();
            assert_eq!(
                raw.len() as u64,
                fx.lay.backing_len(len as u64),
                "len {len}"
            );
            assert_ne!(raw[fx.h()..][..len], data[..], "len {len}: in the clear");
        }
    }

    /// The v1 keystream of a short tail: what plaintext the old rule stored as all zeros.
    fn v1_zero_making_tail(keys: &VolumeKeys, tweak: u128, r: usize) -> Vec<u8> {
        let mut k = vec![0u8; r];
        keys.xts.encrypt_unit(tweak, &mut k).unwrap();
        k
    }

    #[test]
    fn contents_that_v1_stored_as_zeros_read_back() {
        // The deterministic form, for every tail length and in the first three units:
        // the plaintext the v1 stream rule turned into all-zero stored bytes (read back as a
        // hole) is ordinary data now.
        for r in 1..=15usize {
            for unit in 0..3u64 {
                let fx = fixture(4096, 1);
                let off = unit * 4096;
                fx.write(0, &vec![0x11; off as usize + r]);
                let h = fx.file_id();
                let k = v1_zero_making_tail(&fx.keys, h.tweak().wrapping_add(unit as u128), r);
                fx.write(off, &k);
                let all = fx.all();
                assert_eq!(&all[off as usize..], &k[..], "r {r} unit {unit}");
                let raw = fx.raw();
                let stored = &raw[fx.h() + off as usize..][..16];
                assert!(stored.iter().any(|b| *b != 0), "r {r} unit {unit}");
                // Appending after it keeps it (v1 re-encrypted the misread zeros).
                fx.write(off + r as u64, b"more");
                assert_eq!(&fx.all()[off as usize..][..r], &k[..], "r {r} unit {unit}");
            }
        }
    }

    #[test]
    fn two_versions_of_a_tail_reveal_nothing_like_their_xor() {
        let fx = fixture(4096, 1);
        let (a, b) = (*b"secret", *b"public");
        fx.write(0, &a);
        let ca = fx.raw()[fx.h()..][..16].to_vec();
        fx.write(0, &b);
        let cb = fx.raw()[fx.h()..][..16].to_vec();
        let xc: Vec<u8> = ca.iter().zip(&cb).map(|(x, y)| x ^ y).collect();
        let xp: Vec<u8> = a.iter().zip(&b).map(|(x, y)| x ^ y).collect();
        assert_ne!(
            &xc[..6],
            &xp[..],
            "stored XOR equals plaintext XOR: a stream rule"
        );
        // A one-bit change of the plaintext changes about half of the stored block's bits.
        fx.write(0, b"secreu");
        let cc = fx.raw()[fx.h()..][..16].to_vec();
        let flipped: u32 = ca.iter().zip(&cc).map(|(x, y)| (x ^ y).count_ones()).sum();
        assert!(flipped > 20, "only {flipped} stored bits changed");
    }

    #[test]
    fn a_flipped_stored_bit_garbles_a_whole_block() {
        for len in [6usize, 17, 4097, 5000] {
            let fx = fixture(4096, 1);
            let data: Vec<u8> = (0..len).map(|i| (i * 13 + 1) as u8).collect();
            fx.write(0, &data);
            // Flip one bit of the last stored block that holds data.
            let at = fx.h() + (len - 1) / 16 * 16 + 3;
            let mut raw = fx.raw();
            raw[at] ^= 0x10;
            fx.file.write_all_at(&raw, 0).unwrap();
            let got = fx.all();
            let block = (len - 1) / 16 * 16;
            assert_eq!(
                got[..block],
                data[..block],
                "len {len}: other blocks intact"
            );
            let diff = got[block..]
                .iter()
                .zip(&data[block..])
                .filter(|(x, y)| x != y)
                .count();
            let live = len - block;
            assert!(
                diff + 2 >= live,
                "len {len}: only {diff} of {live} bytes of the block changed"
            );
        }
    }

    /// A shrink of a file a re-encryption has converted in part (attack session 15, F1):
    /// the header's progress comes down to the new unit count before the length does, and
    /// the state a crash can leave between the two (progress lowered, length not cut yet)
    /// reads every kept byte right and the cut-off converted units as zeros, never as
    /// garbage under the wrong DEK.
    #[test]
    fn a_shrink_during_a_reencryption_lowers_the_progress_before_the_length() {
        for lay in [Layout::V2, Layout::V3] {
            let fx = fixture_in(lay, 4096, 1, false);
            let sector = fx.sector;
            let old_dek = Dek::generate().unwrap();
            let old = VolumeKeys::from_dek(&old_dek, 4096).unwrap();
            let retiring =
                VolumeKeys::from_dek(&Dek::from_slice(old_dek.as_bytes()).unwrap(), 4096).unwrap();
            let new = VolumeKeys::from_dek(&Dek::generate().unwrap(), 4096)
                .unwrap()
                .with_generation(1, Some(retiring));
            let cx_of = |keys| Ctx {
                keys,
                engine: &fx.engine,
                sector,
                layout: lay,
            };
            let size = 10 * sector + 7;
            let plain: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
            write(&fx.file, &fx.st, &cx_of(&old), 0, &plain).unwrap();
            // Units [0, 6) converted, as a batch leaves them: rewritten under the new DEK,
            // then the header's progress.
            let h = fx.file_id();
            assert_eq!(h.key_gen, 0);
            let part = FileHeader {
                reencrypted: 6,
                ..h
            };
            fx.file.write_all_at(&part.encode(), 0).unwrap();
            fx.st.set_cached_header(Some(part));
            let cx = cx_of(&new);
            write(&fx.file, &fx.st, &cx, 0, &plain[..6 * sector as usize]).unwrap();
            assert_eq!(
                read(&fx.file, &fx.st, &cx, 0, size as usize).unwrap(),
                plain
            );

            // The crash state between the lowered header and the cut.
            let cut = 2 * sector + 5;
            let lowered = lower_progress(&fx.file, &fx.st, &cx, part, size, cut).unwrap();
            assert_eq!((lowered.key_gen, lowered.reencrypted), (0, 3), "{lay:?}");
            assert_eq!(fx.file_id(), lowered, "{lay:?}: not on disk");
            let fresh = FileState::default();
            let got = read(&fx.file, &fresh, &cx, 0, size as usize).unwrap();
            assert_eq!(
                &got[..3 * sector as usize],
                &plain[..3 * sector as usize],
                "{lay:?}"
            );
            assert!(
                got[3 * sector as usize..6 * sector as usize]
                    .iter()
                    .all(|b| *b == 0),
                "{lay:?}: a cut-off converted unit reads as garbage"
            );
            assert_eq!(
                &got[6 * sector as usize..],
                &plain[6 * sector as usize..],
                "{lay:?}"
            );

            // The whole truncate, then a resumed conversion's view: progress within the file.
            truncate(&fx.file, &fx.st, &cx, cut).unwrap();
            assert_eq!(fx.file_id().reencrypted, 3, "{lay:?}");
            let got = read(&fx.file, &FileState::default(), &cx, 0, size as usize).unwrap();
            assert_eq!(got, &plain[..cut as usize], "{lay:?}");
            // A shrink that keeps every converted unit leaves the progress alone.
            truncate(&fx.file, &fx.st, &cx, 2 * sector + 1).unwrap();
            assert_eq!(fx.file_id().reencrypted, 3, "{lay:?}");
        }
    }

    #[test]
    fn shrink_is_one_set_len_and_growth_reads_zeros() {
        let fx = fixture(4096, 1);
        let data: Vec<u8> = (0..10_000).map(|i| (i % 251 + 1) as u8).collect();
        fx.write(0, &data);
        for n in [9_999u64, 8_193, 8_192, 4_100, 33, 17, 5, 1] {
            fx.truncate(n);
            assert_eq!(fx.all(), data[..n as usize], "shrink to {n}");
            assert_eq!(fx.raw().len() as u64, fx.lay.backing_len(n));
            // Growth shows zeros, not the bytes that were cut off.
            fx.truncate(n + 20);
            let all = fx.all();
            assert_eq!(all[..n as usize], data[..n as usize]);
            assert!(all[n as usize..].iter().all(|b| *b == 0), "grow from {n}");
            fx.truncate(n);
        }
    }

    #[test]
    fn filler_and_padding_are_never_read_as_data() {
        // Stale bytes in the padding or the filler (e.g. left by a crash between a shrink
        // and its scrub) must not show up when the file grows by any means.
        for (size, grow) in [
            (10u64, 12u64),
            (10, 5000),
            (4095, 4097),
            (4090, 9000),
            (17, 40),
        ] {
            for how in 0..3 {
                let fx = fixture(4096, 1);
                let data = vec![0xA5u8; size as usize];
                fx.write(0, &data);
                let mut raw = fx.raw();
                let data_end = raw.len();
                // Garbage in the filler (stale padding: see the next test).
                for b in &mut raw[fx.h() + units_end(size) as usize..data_end] {
                    *b = 0xEE;
                }
                fx.file.write_all_at(&raw, 0).unwrap();
                assert_eq!(fx.all(), data);
                match how {
                    0 => fx.truncate(grow),
                    1 => fx.write(grow - 1, &[7]),
                    _ => fallocate(&fx.file, &fx.st, &fx.cx(), 0, 0, grow).unwrap(),
                }
                let all = fx.all();
                assert_eq!(all.len() as u64, grow, "{size}->{grow} how {how}");
                assert_eq!(all[..size as usize], data[..], "{size}->{grow} how {how}");
                let end = if how == 1 { grow - 1 } else { grow } as usize;
                assert!(
                    all[size as usize..end].iter().all(|b| *b == 0),
                    "{size}->{grow} how {how}: growth does not read zeros"
                );
            }
        }
    }

    #[test]
    fn stale_padding_after_a_bare_set_len_stays_invisible() {
        // A crash between a shrink's set_len and its scrub leaves stale plaintext in the
        // padding of the last block; growth still reads zeros there.
        let fx = fixture(4096, 1);
        fx.write(0, &[0x5A; 40]);
        fx.file.set_len(fx.lay.backing_len(20)).unwrap();
        assert_eq!(fx.all(), vec![0x5A; 20]);
        fx.write(25, b"x");
        let all = fx.all();
        assert_eq!(all[..20], [0x5A; 20]);
        assert_eq!(all[20..25], [0; 5]);
        assert_eq!(&all[25..], b"x");
    }

    #[test]
    fn sparse_growth_reads_zeros_and_keeps_old_tail() {
        let fx = fixture(4096, 1);
        fx.write(0, b"0123456789");
        fx.truncate(3 * 4096 + 100);
        fx.write(5 * 4096 + 1, b"end");
        let all = fx.all();
        assert_eq!(all.len(), 5 * 4096 + 4);
        assert_eq!(&all[..10], b"0123456789");
        assert!(all[10..5 * 4096 + 1].iter().all(|b| *b == 0));
        assert_eq!(&all[5 * 4096 + 1..], b"end");
        // Units 1..=4 were never written: they stay holes of the backing file.
        let raw = fx.raw();
        for u in 1..5 {
            let unit = &raw[fx.h() + u * 4096..][..4096];
            assert!(unit.iter().all(|b| *b == 0), "unit {u} was written");
        }
    }

    #[test]
    fn concurrent_disjoint_writers_lose_nothing() {
        let fx = std::sync::Arc::new(fixture(4096, 2));
        let threads: Vec<_> = (0..4u8)
            .map(|t| {
                let fx = fx.clone();
                std::thread::spawn(move || {
                    for i in 0..32u64 {
                        // Unaligned, sector-straddling chunks interleaved across threads.
                        let off = (i * 4 + t as u64) * 3000;
                        fx.write(off, &[t + 1; 3000]);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let all = fx.all();
        assert_eq!(all.len(), 128 * 3000);
        for (chunk, bytes) in all.chunks(3000).enumerate() {
            assert!(
                bytes.iter().all(|b| *b == (chunk % 4) as u8 + 1),
                "chunk {chunk} torn"
            );
        }
    }

    #[test]
    fn corrupt_headers_lengths_and_v1_files_are_errors_not_panics() {
        let fx = fixture(4096, 1);
        fx.file.write_all_at(b"short", 0).unwrap();
        assert!(matches!(
            read(&fx.file, &fx.st, &fx.cx(), 0, 10),
            Err(VolumeError::CorruptFile { .. })
        ));
        fx.file.write_all_at(&[0xAA; 64], 0).unwrap();
        assert!(matches!(
            read(&fx.file, &fx.st, &fx.cx(), 0, 10),
            Err(VolumeError::CorruptFile { .. })
        ));
        // A data area of 1..15 bytes cannot be a v2 file.
        let h = fx.lay.generate_header(0).unwrap();
        fx.file.set_len(0).unwrap();
        fx.file.write_all_at(&h.encode(), 0).unwrap();
        fx.file.set_len(fx.h() as u64 + 7).unwrap();
        assert!(matches!(
            read(&fx.file, &fx.st, &fx.cx(), 0, 10),
            Err(VolumeError::CorruptFile { .. })
        ));
        // v3: every length inside the header area is corrupt (1..4095), the bare area is an
        // empty file.
        for n in [1u64, 31, 32, 33, 48, 2048, 4095] {
            let fx = fixture(4096, 1);
            fx.file.write_all_at(&h.encode(), 0).unwrap();
            fx.file.set_len(n).unwrap();
            assert!(
                matches!(
                    read(&fx.file, &fx.st, &fx.cx(), 0, 10),
                    Err(VolumeError::CorruptFile { .. })
                ),
                "length {n}"
            );
        }
        let fx = fixture(4096, 1);
        fx.file.write_all_at(&fx.lay.header_area(&h), 0).unwrap();
        assert_eq!(fx.all(), b"");
        // A header of the other current version is refused, not read at the wrong offset.
        for (lay, other) in [(Layout::V3, Layout::V2), (Layout::V2, Layout::V3)] {
            let fx = fixture_in(lay, 4096, 1, false);
            let foreign = other.generate_header(0).unwrap();
            fx.file.write_all_at(&lay.header_area(&foreign), 0).unwrap();
            fx.file.write_all_at(&[1; 48], lay.data_offset).unwrap();
            let e = read(&fx.file, &fx.st, &fx.cx(), 0, 10).unwrap_err();
            assert!(
                matches!(e, VolumeError::CorruptFile { .. })
                    && e.to_string().contains("says format"),
                "{e}"
            );
        }
        // A bare header area (v3: 4096 bytes, v2: 32) is an empty file only under a header of
        // this volume: zeros, random bytes, the other version or an unknown key generation
        // are refused at open and read (attack12 F4), not served as an empty file.
        for (lay, other) in [(Layout::V3, Layout::V2), (Layout::V2, Layout::V3)] {
            let n = lay.data_offset as usize;
            let good = lay.generate_header(0).unwrap();
            let kg = FileHeader { key_gen: 1, ..good };
            let mut foreign = lay.header_area(&other.generate_header(0).unwrap());
            foreign.resize(n, 0);
            for (what, area) in [
                ("zeros", vec![0u8; n]),
                ("random", vec![0x5A; n]),
                ("other version", foreign),
                ("key generation 1", lay.header_area(&kg)),
            ] {
                let fx = fixture_in(lay, 4096, 1, false);
                fx.file.write_all_at(&area, 0).unwrap();
                let e = check_bare_header(&fx.file, &fx.st, &fx.cx(), n as u64).unwrap_err();
                assert!(matches!(e, VolumeError::CorruptFile { .. }), "{what}: {e}");
                let e = read(&fx.file, &fx.st, &fx.cx(), 0, 10).unwrap_err();
                assert!(matches!(e, VolumeError::CorruptFile { .. }), "{what}: {e}");
            }
            let fx = fixture_in(lay, 4096, 1, false);
            fx.file.write_all_at(&lay.header_area(&good), 0).unwrap();
            check_bare_header(&fx.file, &fx.st, &fx.cx(), n as u64).unwrap();
            assert_eq!(fx.all(), b"");
        }
        // A v1 file (in a v2 volume being upgraded) is refused, not misread.
        let fx = fixture_in(Layout::V2, 4096, 1, false);
        let v1 = FileHeader {
            version: layout::FILE_VERSION_V1,
            ..h
        };
        fx.file.write_all_at(&v1.encode(), 0).unwrap();
        fx.file.write_all_at(&[1; 48], 32).unwrap();
        let e = read(&fx.file, &fx.st, &fx.cx(), 0, 10).unwrap_err();
        assert!(e.to_string().contains("cmkfs upgrade"), "{e}");
    }

    #[test]
    fn units_are_whole_block_xts_with_zero_padding() {
        // The last unit is XTS over whole blocks (padding zero-filled), never ciphertext
        // stealing, followed by the filler.
        let fx = fixture(4096, 1);
        let data: Vec<u8> = (0..4096 + 21).map(|i| (i * 31 + 7) as u8).collect();
        fx.write(0, &data);
        let h = fx.file_id();
        let raw = fx.raw();
        let mut unit1 = data[4096..].to_vec();
        unit1.resize(32, 0);
        fx.keys
            .xts
            .encrypt_unit(h.tweak().wrapping_add(1), &mut unit1)
            .unwrap();
        assert_eq!(&raw[fx.h() + 4096..][..32], &unit1[..]);
        assert_eq!(raw.len(), fx.h() + 4096 + 32 + 5);
    }
}
