//! The read path: buffered or direct reads of whole units, decrypted in place.

use std::fs::File;
use std::ops::{Deref, Range};

use super::cipher::decrypt;
use super::{
    backing_state, check_bare_header, existing_header, header_and_data, read_error, read_exact,
    Ctx, FileHeader, FileState, VolumeError,
};
use crate::volume::bufpool::PoolBuf;
use crate::volume::direct;
use crate::volume::layout::{unit_extent, units_end};

/// Reads unit `s` of a file of logical size `size` into the start of `out` as plaintext, with
/// every byte at or past `size` zeroed (the padding of the last block may hold stale bytes).
/// `out` must hold the unit's extent; bytes past it are left alone. Returns whether the unit
/// is a hole (all-zero stored bytes).
pub(super) fn read_unit(
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
    let (bk, size) = backing_state(f, cx)?;
    if off >= size || len == 0 {
        check_bare_header(f, st, cx, bk.len)?;
        return Ok(ReadBuf::empty());
    }
    let end = size.min(off.saturating_add(len as u64));
    let first = off / cx.sector;
    let start = first * cx.sector;
    let stop = units_end(size).min((end - 1) / cx.sector * cx.sector + cx.sector);
    let n = (stop - start) as usize;
    // The first read of a file opened anew, at its start and buffered (a direct read needs
    // an aligned buffer and offset): header and units in one system call.
    if start == 0 && n < direct::DIRECT_MIN && !st.header_current(&bk) {
        let mut buf = PoolBuf::take(n);
        if let Some(h) = header_and_data(f, st, cx, &bk, &mut buf[..n])? {
            decrypt(cx, &h, first, &mut buf[..n])?;
            return Ok(ReadBuf {
                buf,
                range: off as usize..(end - start) as usize,
            });
        }
    }
    let h = existing_header(f, st, cx, Some(bk))?;
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
