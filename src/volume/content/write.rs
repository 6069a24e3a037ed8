//! Writes and size changes (write, truncate, fallocate, punching): the three rules of the
//! module's top comment (whole units, growth writes zeros, data before length), and what a
//! write that stops midway (ENOSPC, EFBIG) leaves.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;

use super::cipher::{decrypt, encrypt, encrypt_copying};
use super::read::read_unit;
use super::{
    backing_state, corrupt, existing_header, header, os_err, read_exact, write_at, writeout,
    Backing, Ctx, FileHeader, FileState, VolumeError,
};
use crate::volume::bufpool::PoolBuf;
use crate::volume::layout::{self, roundup_block, unit_extent, units_end, BLOCK};

/// The ciphertext of one write as it goes to the backing file: up to three consecutive pieces
/// (a pooled buffer's head unit, units encrypted in place in the request's own buffer, a
/// pooled buffer's tail unit and filler) that one `pwritev` stores without copying them
/// together first. Piece boundaries are block boundaries.
#[derive(Clone, Copy)]
struct Pieces<'b>([&'b [u8]; 3]);

impl<'b> Pieces<'b> {
    fn one(buf: &'b [u8]) -> Pieces<'b> {
        Pieces([buf, &[], &[]])
    }

    fn len(&self) -> usize {
        self.0.iter().map(|p| p.len()).sum()
    }

    /// The non-empty pieces of the bytes from `skip` on (at most three).
    fn from(&self, mut skip: usize) -> ([std::io::IoSlice<'b>; 3], usize) {
        let mut out = [std::io::IoSlice::new(&[]); 3];
        let mut n = 0;
        for p in self.0 {
            if skip >= p.len() {
                skip -= p.len();
                continue;
            }
            out[n] = std::io::IoSlice::new(&p[skip..]);
            skip = 0;
            n += 1;
        }
        (out, n)
    }

    /// A copy of bytes `[a, b)`.
    fn copy(&self, a: usize, b: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(b - a);
        let (mut pos, mut a) = (0usize, a);
        for p in self.0 {
            let end = pos + p.len();
            if a < b && a < end {
                let stop = b.min(end);
                out.extend_from_slice(&p[a - pos..stop - pos]);
                a = stop;
            }
            pos = end;
        }
        out
    }
}

/// [`write_at`] of `buf`'s pieces (one `pwrite`, or one `pwritev` when there are several)
/// that, when it fails, also says how many bytes landed before: a full backing disk (ENOSPC)
/// or its file-size limit (EFBIG) stops a write midway, with a prefix stored.
fn write_counted(f: &File, cx: &Ctx, buf: Pieces, off: u64) -> Result<(), (usize, std::io::Error)> {
    let total = buf.len();
    let mut done = 0usize;
    while done < total {
        let at = cx.layout.data_offset + off + done as u64;
        let r = match buf.from(done) {
            (p, 1) => f.write_at(&p[0], at),
            (p, n) => pwritev(f, &p[..n], at),
        };
        match r {
            Ok(0) => return Err((done, std::io::Error::from_raw_os_error(libc::ENOSPC))),
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err((done, e)),
        }
    }
    Ok(())
}

fn pwritev(f: &File, bufs: &[std::io::IoSlice], off: u64) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    let off =
        libc::off_t::try_from(off).map_err(|_| std::io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: `IoSlice` is ABI-compatible with `iovec` on Unix (std's guarantee); the slices
    // outlive the call, which only reads them.
    let r = unsafe {
        libc::pwritev(
            f.as_raw_fd(),
            bufs.as_ptr().cast::<libc::iovec>(),
            bufs.len() as libc::c_int,
            off,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r as usize)
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
    buf: Pieces,
    at: u64,
    landed: usize,
    size: u64,
) -> Result<u64, VolumeError> {
    let mut pos = at + landed as u64;
    if !pos.is_multiple_of(BLOCK) {
        let stop = roundup_block(pos).min(at + buf.len() as u64);
        let rest = buf.copy(landed, (stop - at) as usize);
        if let Err((_, e)) = write_counted(f, cx, Pieces::one(&rest), pos) {
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

/// `n` rounded down to a whole number of AES blocks.
fn rounddown_block(n: u64) -> u64 {
    n / BLOCK * BLOCK
}

/// The plaintext of a write: borrowed ([`write`]: copied into a pooled buffer as it is
/// encrypted), or a buffer the caller gives up ([`write_mut`]: the units it covers whole are
/// encrypted in place in it).
pub(super) enum Src<'a> {
    Shared(&'a [u8]),
    Mut(&'a mut [u8]),
}

impl Src<'_> {
    fn len(&self) -> usize {
        match self {
            Src::Shared(d) => d.len(),
            Src::Mut(d) => d.len(),
        }
    }

    /// `(data[..a], data[a..b], data[b..])`, the middle to be encrypted in place: empty
    /// (`a == b`) for a borrowed plaintext.
    fn split3(&mut self, a: usize, b: usize) -> (&[u8], &mut [u8], &[u8]) {
        match self {
            Src::Shared(d) => {
                debug_assert_eq!(a, b, "a borrowed plaintext is never encrypted in place");
                (&d[..a], Default::default(), &d[a..])
            }
            Src::Mut(d) => {
                let (pre, rest) = d.split_at_mut(a);
                let (mid, post) = rest.split_at_mut(b - a);
                (pre, mid, post)
            }
        }
    }

    /// After a write of `n` bytes of which `data[mid]` (units from `unit` on) were encrypted
    /// in place: keeps [`write_mut`]'s promise. All written: the plaintext left beside the
    /// middle (copied into the pooled buffer) is wiped. Short: the middle is decrypted back,
    /// so that what did not land is the plaintext as given, and the written prefix is wiped.
    pub(super) fn give_back(
        &mut self,
        cx: &Ctx,
        h: &FileHeader,
        mid: std::ops::Range<usize>,
        unit: u64,
        n: usize,
    ) -> Result<usize, VolumeError> {
        let Src::Mut(d) = self else {
            return Ok(n);
        };
        // `fill` (a `memset`), not byte-wise volatile writes: the buffer is the caller's and
        // outlives this call, so the stores cannot be dropped; the fence keeps them in place.
        if n == d.len() {
            d[..mid.start].fill(0);
            d[mid.end..].fill(0);
        } else {
            if !mid.is_empty() {
                decrypt(cx, h, unit, &mut d[mid])?;
            }
            d[..n].fill(0);
        }
        std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
        Ok(n)
    }
}

/// Writes `data` at `off`, growing the file as needed. Returns the bytes written.
pub fn write(
    f: &File,
    st: &FileState,
    cx: &Ctx,
    off: u64,
    data: &[u8],
) -> Result<usize, VolumeError> {
    write_src(f, st, cx, off, Src::Shared(data))
}

/// [`write`] from a buffer the caller gives up (a FUSE request's own buffer): the units
/// `data` covers whole are encrypted in place in it and stored from there, so they are
/// neither copied into a pooled buffer nor left as plaintext to be wiped; only the partial
/// units at its ends go through a pooled buffer (read-modify-write) as in [`write`].
///
/// On `Ok(n)`: `data[..n]` holds no plaintext (ciphertext, or zeros where it was copied out)
/// and `data[n..]` the plaintext as given, to be written again after a short count. On
/// `Err`: `data` may hold plaintext anywhere; the caller wipes it.
pub fn write_mut(
    f: &File,
    st: &FileState,
    cx: &Ctx,
    off: u64,
    data: &mut [u8],
) -> Result<usize, VolumeError> {
    write_src(f, st, cx, off, Src::Mut(data))
}

fn write_src(
    f: &File,
    st: &FileState,
    cx: &Ctx,
    off: u64,
    mut data: Src,
) -> Result<usize, VolumeError> {
    let len = data.len();
    if len == 0 {
        return Ok(0);
    }
    let end = off
        .checked_add(len as u64)
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
            let (bk, size) = backing_state(f, cx)?;
            if end <= size && (end % cx.sector == 0 || end == size) {
                break 'done overwrite_units(f, st, cx, off, &mut data, bk)?;
            }
        }
        let _g = st.rmw.write().unwrap_or_else(|p| p.into_inner());
        write_locked(f, st, cx, off, &mut data)?
    };
    // Outside the content lock: starting the disk may wait for its queue.
    writeout::wrote(&st.pending, f, n);
    Ok(n)
}

/// Whole units inside the file, under the shared lock: encrypted in place ([`write_mut`]) or
/// in a pooled buffer (which then holds ciphertext only; so does the file's short last unit
/// in either case), written back as they are.
fn overwrite_units(
    f: &File,
    st: &FileState,
    cx: &Ctx,
    off: u64,
    data: &mut Src,
    bk: Backing,
) -> Result<usize, VolumeError> {
    let blen = bk.len;
    let h = existing_header(f, st, cx, Some(bk))?;
    let len = data.len();
    let whole = match data {
        Src::Mut(_) => len / cx.sector as usize * cx.sector as usize,
        Src::Shared(_) => 0,
    };
    let (_, mid, rest) = data.split3(0, whole);
    let mut buf = PoolBuf::take(roundup_block(rest.len() as u64) as usize);
    buf[rest.len()..].fill(0);
    let m1 = off + whole as u64;
    if !buf.is_empty() {
        encrypt_copying(cx, &h, m1 / cx.sector, &mut buf, rest, 0)?;
    }
    encrypt(cx, &h, off / cx.sector, mid)?;
    let pieces = Pieces([&*mid, &buf, &[]]);
    let n = match write_counted(f, cx, pieces, off) {
        Ok(()) => len,
        Err((landed, e)) => {
            // A hole's units need new blocks: the disk may fill up midway. As a local
            // filesystem: the bytes that landed, or the error when none did.
            let size = cx.layout.logical_size(blen).map_err(corrupt)?;
            let pos = settle_torn(f, cx, pieces, off, landed, size)?;
            match pos.saturating_sub(off).min(len as u64) {
                0 => return Err(VolumeError::Os(e)),
                n => n as usize,
            }
        }
    };
    data.give_back(cx, &h, 0..whole, off / cx.sector, n)
}

/// The read-modify-write body of [`write`]; the caller holds the exclusive lock.
fn write_locked(
    f: &File,
    st: &FileState,
    cx: &Ctx,
    off: u64,
    data: &mut Src,
) -> Result<usize, VolumeError> {
    let len = data.len();
    let end = off + len as u64;
    let (bk, size) = backing_state(f, cx)?;
    let old_len = bk.len;
    st.appending.store(end > size, Ordering::Relaxed);
    let h = header(f, st, cx, true, Some(bk))?
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
    // Growth: the filler goes out in the same pwrite as the last unit, so the length moves
    // together with the data.
    let filler = if new_size != size {
        layout::filler_len(new_size) as usize
    } else {
        0
    };
    // The units `data` covers whole, `[m0, m1)`, are encrypted in place when it is given up
    // ([`write_mut`]); the pooled buffer holds the units before and after them (at most one
    // each: the partial ones) and the filler. With no such units, it holds everything.
    let (m0, m1) = match data {
        Src::Mut(_) if end / ss * ss > off.div_ceil(ss) * ss => {
            (off.div_ceil(ss) * ss, end / ss * ss)
        }
        _ => (stop, stop),
    };
    let head = (m0 - start) as usize;
    let gap = (m1 - m0) as usize;
    // Index in the pooled buffer of a byte at `p` (from `start`) outside `[m0, m1)`.
    let ix = |p: u64| -> usize {
        if p >= m1 - start {
            p as usize - gap
        } else {
            p as usize
        }
    };
    let (pre, mid, post) = data.split3(
        ((m0 - off) as usize).min(len),
        ((m1 - off) as usize).min(len),
    );
    // Zeros wherever neither the old units nor `data` will be put: before and after the
    // written range (the edge units read below overwrite parts of that), and the filler.
    let mut buf = PoolBuf::take((stop - start) as usize - gap + filler);
    buf[..(off - start) as usize].fill(0);
    buf[ix(end - start)..].fill(0);
    // What must go back to disk: bytes `[lo, hi)` from `start`. XTS is deterministic per
    // block, so a block re-encrypted from the plaintext it already held comes out as the
    // ciphertext stored: the blocks of a read unit before the write (and before the old end
    // of file, past which the stale padding is zeroed) and after it (inside the old data)
    // need no write. A hole unit is written whole: its zeros become ciphertext.
    let (mut lo, mut hi) = (0u64, stop - start);
    // Keep the old bytes of the first and last units where the write does not cover them
    // (never units of `[m0, m1)`: those it covers whole).
    let edges = [first, last];
    for &s in &edges[..if first == last { 1 } else { 2 }] {
        let (s_start, s_old_end) = (s * ss, size.min(s * ss + ss));
        if s_start < size && !(off <= s_start && end >= s_old_end) {
            let at = ix(s_start - start);
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
    if head > 0 {
        encrypt_copying(cx, &h, first, &mut buf[..head], pre, (off - start) as usize)?;
    }
    if gap > 0 {
        encrypt(cx, &h, m0 / ss, mid)?;
        if stop > m1 {
            let tail = head + (stop - m1) as usize;
            encrypt_copying(cx, &h, m1 / ss, &mut buf[head..tail], post, 0)?;
        }
    }
    let want = cx.layout.backing_len(new_size);
    if new_size != size {
        hi = (buf.len() + gap) as u64;
    }
    let pieces = if gap == 0 {
        Pieces::one(&buf[lo as usize..hi as usize])
    } else {
        debug_assert!(lo <= m0 - start && hi >= m1 - start);
        Pieces([&buf[lo as usize..head], &*mid, &buf[head..ix(hi)]])
    };
    let torn = write_counted(f, cx, pieces, start + lo);
    let (written, want) = match torn {
        Ok(()) => (len, want),
        Err((landed, e)) => {
            // The backing disk filled up (or its file-size limit came) midway. As a local
            // filesystem: a short count of the bytes that landed, the size grown to their
            // end at most; when none landed, the error and the file as it was.
            let pos = settle_torn(f, cx, pieces, start + lo, landed, size)
                .inspect_err(|_| undo_growth(f, st, old_len))?;
            match pos.saturating_sub(off).min(len as u64) {
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
    if written < len || old_len.max(cx.layout.data_offset + start + hi) != want {
        f.set_len(want).map_err(VolumeError::Os)?;
    }
    let mid = (m0.min(end) - off) as usize..(m1.min(end) - off) as usize;
    data.give_back(cx, &h, mid, m0 / ss, written)
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
    let (bk, size) = backing_state(f, cx)?;
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
    let h = header(f, st, cx, true, Some(bk))?
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
pub(super) fn lower_progress(
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
    let (bk, size) = backing_state(f, cx)?;
    check_size_limit(f, cx, bk.len, end)?;
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
        let zeros = vec![0u8; (head_end - a) as usize];
        write_locked(f, st, cx, a, &mut Src::Shared(&zeros))?;
    }
    let tail_start = a.max(last_full_end);
    if tail_start < b && tail_start >= head_end {
        let zeros = vec![0u8; (b - tail_start) as usize];
        write_locked(f, st, cx, tail_start, &mut Src::Shared(&zeros))?;
    }
    Ok(())
}
