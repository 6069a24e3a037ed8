//! Large reads of a backing file without the page-cache copy: `O_DIRECT` into an aligned
//! pooled buffer (docs/PERFORMANCE.md, "Direct reads").
//!
//! A buffered `pread` of ciphertext that the disk has just read copies it out of the page
//! cache, pages not in the CPU's caches: that copy was the largest single item of a cold
//! read's daemon CPU. A direct read has the device write into the request's buffer instead.
//! It must cover whole aligned blocks ([`DIO_ALIGN`]) of file offset, length and memory, so
//! it reads the aligned superset of the units the request needs (they start 32 bytes into
//! the file); the caller decrypts them where they landed.
//!
//! What stays buffered: requests under [`DIRECT_MIN`], ciphertext the page cache already
//! holds (a `RWF_NOWAIT` read takes it first: cached data, including data just written
//! through the mount and not yet on disk, is copied as before and never forces a
//! writeback), and files or filesystems that refuse `O_DIRECT`.
//!
//! Coherency with writes, which stay buffered: a direct read writes back and waits for the
//! dirty pages of its range first (the kernel's `kiocb_write_and_wait`), so it returns what
//! every completed `pwrite` stored, like a buffered read. The content lock of `content` is
//! held around both, as before.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, IoSliceMut};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use rustix::io::{preadv2, Errno, ReadWriteFlags};

use super::bufpool::{PoolBuf, DIO_ALIGN};
use super::sys;

/// Requests of at least this many bytes of units read directly; smaller ones (a random
/// 4 KiB read would read two 4 KiB blocks from the disk and lose the page cache of
/// ciphertext that buffered reads keep) stay buffered.
pub const DIRECT_MIN: usize = 128 << 10;

/// Requests this process read (partly) with `O_DIRECT`, for tests and profiles.
static DIRECT_READS: AtomicU64 = AtomicU64::new(0);

/// How many requests this process has read (at least partly) with `O_DIRECT`.
pub fn direct_reads() -> u64 {
    DIRECT_READS.load(Ordering::Relaxed)
}

/// Backing filesystems (`st_dev`) whose files refused `O_DIRECT` (`EINVAL` at open or at a
/// read): no file there is tried again while the process runs.
static REFUSED: Mutex<Option<HashSet<u64>>> = Mutex::new(None);

fn refused(dev: u64) -> bool {
    REFUSED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .is_some_and(|s| s.contains(&dev))
}

fn refuse(dev: u64) {
    REFUSED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_or_insert_with(HashSet::new)
        .insert(dev);
}

/// The `O_DIRECT` descriptor of one backing file, shared by its open handles (a second
/// open file description: toggling `O_DIRECT` with `fcntl` on the shared one would race
/// with buffered I/O of other requests). Opened at the first large read.
#[derive(Debug, Default)]
pub struct DirectFile {
    fd: OnceLock<Option<(File, u64)>>,
    /// Set when a direct read of this file was refused: buffered from then on.
    off: AtomicBool,
}

impl DirectFile {
    /// The direct descriptor and the backing filesystem's device, if this file takes
    /// direct reads.
    fn get(&self, f: &File) -> Option<&(File, u64)> {
        if self.off.load(Ordering::Relaxed) {
            return None;
        }
        self.fd.get_or_init(|| open(f)).as_ref()
    }
}

fn open(f: &File) -> Option<(File, u64)> {
    let dev = f.metadata().ok()?.dev();
    if refused(dev) {
        return None;
    }
    match sys::reopen_direct(f.as_fd()) {
        Ok(d) => Some((d, dev)),
        Err(e) => {
            if e.raw_os_error() == Some(libc::EINVAL) {
                refuse(dev);
            }
            None
        }
    }
}

/// Reads backing bytes `[pos, pos + n)` (file offsets, header included) into a pooled
/// buffer aligned for `O_DIRECT`: returns it and where the bytes start in it (`at`;
/// `buf[at..at + n]`). Fewer bytes than `n` exist when the file is shorter: then
/// `UnexpectedEof`. `None` when this read should be buffered (too small, or direct reads
/// refused here); the caller then reads as before.
pub fn read(df: &DirectFile, f: &File, pos: u64, n: usize) -> Option<io::Result<(PoolBuf, usize)>> {
    if n < DIRECT_MIN {
        return None;
    }
    let (d, dev) = df.get(f)?;
    let align = DIO_ALIGN as u64;
    let a = pos / align * align;
    let end = pos + n as u64;
    let e = end.div_ceil(align) * align;
    let mut buf = PoolBuf::take_aligned((e - a) as usize);
    let at = (pos - a) as usize;
    // Whatever the page cache holds of the range, from its start: a copy from memory, and
    // no forced writeback of dirty pages. `RWF_NOWAIT` implies `IOCB_NOIO`: a miss starts
    // no readahead (which would read the range twice).
    let cached = match preadv2(
        f,
        &mut [IoSliceMut::new(&mut buf[at..at + n])],
        pos,
        ReadWriteFlags::NOWAIT,
    ) {
        Ok(k) => k,
        Err(Errno::AGAIN) => 0,
        // No `RWF_NOWAIT` here (or a real error, which the direct read will meet too).
        Err(_) => 0,
    };
    if cached == n {
        return Some(Ok((buf, at)));
    }
    // The rest from the block that holds its first byte (the bytes before it in that block
    // are read again, the same way, in one piece with what follows).
    let mut from = (pos + cached as u64) / align * align;
    DIRECT_READS.fetch_add(1, Ordering::Relaxed);
    while from < end {
        let i = (from - a) as usize;
        match d.read_at(&mut buf[i..], from) {
            Ok(0) => return Some(Err(io::ErrorKind::UnexpectedEof.into())),
            Ok(k) => {
                from += k as u64;
                // A short direct read ends at the end of file (not at a block boundary);
                // the next read would be refused as unaligned.
                if from < end && !from.is_multiple_of(align) {
                    return Some(Err(io::ErrorKind::UnexpectedEof.into()));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                // Alignment or direct I/O refused by this file or filesystem: buffered
                // from now on (the caller reads this request again, buffered).
                df.off.store(true, Ordering::Relaxed);
                refuse(*dev);
                return None;
            }
            Err(e) => return Some(Err(e)),
        }
    }
    Some(Ok((buf, at)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt as _;

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    /// A file in the target directory (a disk filesystem; `/tmp` may be tmpfs).
    fn scratch(name: &str) -> (tempfile::TempDir, File) {
        let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
        let dir = tempfile::tempdir_in(base).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join(name))
            .unwrap();
        (dir, f)
    }

    #[test]
    fn direct_reads_see_every_offset_length_and_fresh_write() {
        let (_d, f) = scratch("direct");
        let all = data(3 << 20);
        f.write_all_at(&all, 0).unwrap();
        let df = DirectFile::default();
        let mut rng = 0x9E37_79B9_7F4A_7C15u64;
        let before = direct_reads();
        for round in 0..200u64 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let pos = rng % (1 << 20) / 16 * 16 + 32 * (round % 2);
            let n = DIRECT_MIN + (rng >> 32) as usize % (1 << 20);
            // Out of the page cache (as after a cold start), so the read goes to the disk...
            f.sync_data().unwrap();
            rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed).unwrap();
            // ...but for a buffered write of a few bytes just before: a dirty page the read
            // must see (inside the range, or at its start: then a cached prefix).
            let at = pos as usize + (rng >> 8) as usize % n;
            let b = [round as u8; 3];
            f.write_all_at(&b, at as u64).unwrap();
            let mut want = all.clone();
            want[at..at + 3].copy_from_slice(&b);
            let (buf, i) = read(&df, &f, pos, n).unwrap().unwrap();
            assert_eq!(buf.as_ptr() as usize % DIO_ALIGN, 0);
            assert!(
                buf[i..i + n] == want[pos as usize..pos as usize + n],
                "round {round}"
            );
            f.write_all_at(&all[at..at + 3], at as u64).unwrap();
        }
        assert!(
            direct_reads() > before + 100,
            "the direct path was not taken"
        );
        // Past the end of file: short.
        let r = read(&df, &f, (3 << 20) - 4096, DIRECT_MIN).unwrap();
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        // Small reads stay buffered.
        assert!(read(&df, &f, 0, DIRECT_MIN - 16).is_none());
    }
}
