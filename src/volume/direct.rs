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
//! What stays buffered: requests under [`DIRECT_MIN`], ranges the page cache holds (half or
//! more of it, or any dirty page: data just written through the mount is copied from memory
//! as before and never forced to disk by a read; `cachestat(2)` tells), and files or
//! filesystems that refuse `O_DIRECT`.
//!
//! Coherency with writes, which stay buffered: a direct read writes back and waits for the
//! dirty pages of its range first (the kernel's `kiocb_write_and_wait`), so it returns what
//! every completed `pwrite` stored, like a buffered read. The content lock of `content` is
//! held around both, as before.

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

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
    pub(crate) fn get(&self, f: &File) -> Option<&(File, u64)> {
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
/// `UnexpectedEof`. `None` when this read should be buffered (too small, cached, or direct
/// reads refused here); the caller then reads as before.
pub fn read(df: &DirectFile, f: &File, pos: u64, n: usize) -> Option<io::Result<(PoolBuf, usize)>> {
    if n < DIRECT_MIN {
        return None;
    }
    let (d, dev) = df.get(f)?;
    if cached(f, pos, n) {
        return None;
    }
    match read_direct(d, pos, n) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            // Alignment or direct I/O refused by this file or filesystem: buffered from
            // now on (the caller reads this request again, buffered).
            df.off.store(true, Ordering::Relaxed);
            refuse(*dev);
            None
        }
        r => Some(r),
    }
}

/// `cachestat(2)` (Linux 6.5): the number is the same on every architecture.
const SYS_CACHESTAT: libc::c_long = 451;

/// `struct cachestat_range`.
#[repr(C)]
struct CachestatRange {
    off: u64,
    len: u64,
}

/// `struct cachestat`.
#[repr(C)]
#[derive(Default)]
struct Cachestat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

/// The page-cache state of backing bytes `[pos, pos + n)` of `f`: pages cached, dirty, and
/// under write-back, from `cachestat(2)`, which starts no I/O. `None` where it is missing
/// (before Linux 6.5).
pub(crate) fn page_states(f: &File, pos: u64, n: u64) -> Option<PageStates> {
    let range = CachestatRange { off: pos, len: n };
    let mut cs = Cachestat::default();
    // SAFETY: the kernel reads `range` and writes `cs`, both live `repr(C)` values of the
    // layout `cachestat(2)` documents; `f` is an open descriptor.
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            f.as_raw_fd(),
            &range as *const CachestatRange,
            &mut cs as *mut Cachestat,
            0u32,
        )
    };
    (r == 0).then_some(PageStates {
        cached: cs.nr_cache,
        dirty: cs.nr_dirty,
        writeback: cs.nr_writeback,
    })
}

/// Page counts of a range of a file ([`page_states`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct PageStates {
    /// Pages in the page cache.
    pub cached: u64,
    /// Dirty pages (not yet handed to the disk).
    pub dirty: u64,
    /// Pages being written to the disk.
    pub writeback: u64,
}

/// Whether a buffered read suits `[pos, pos + n)` better: the page cache holds half of it
/// or more (a copy from memory beats the disk), or any page of it is dirty or being written
/// back (a direct read would first write it back and wait: data just written through the
/// mount is read from memory, as before). Where `cachestat(2)` is missing (before Linux
/// 6.5), nothing counts as cached: correct, since a direct read writes back what is dirty
/// first. (A `RWF_NOWAIT` read would start readahead on a miss.)
fn cached(f: &File, pos: u64, n: usize) -> bool {
    let Some(cs) = page_states(f, pos, n as u64) else {
        return false;
    };
    let pages = (pos + n as u64).div_ceil(4096) - pos / 4096;
    cs.dirty + cs.writeback > 0 || cs.cached * 2 >= pages
}

/// The direct read itself: the aligned superset of `[pos, pos + n)` into an aligned buffer.
fn read_direct(d: &File, pos: u64, n: usize) -> io::Result<(PoolBuf, usize)> {
    let align = DIO_ALIGN as u64;
    let a = pos / align * align;
    let end = pos + n as u64;
    let e = end.div_ceil(align) * align;
    let mut buf = PoolBuf::take_aligned((e - a) as usize);
    DIRECT_READS.fetch_add(1, Ordering::Relaxed);
    let mut from = a;
    while from < end {
        let i = (from - a) as usize;
        match d.read_at(&mut buf[i..], from) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(k) => {
                from += k as u64;
                // A short direct read ends at the end of file (not at a block boundary);
                // the next read would be refused as unaligned.
                if from < end && !from.is_multiple_of(align) {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok((buf, (pos - a) as usize))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    /// A file in the target directory (a disk filesystem; `/tmp` may be tmpfs).
    pub(crate) fn scratch(name: &str) -> (tempfile::TempDir, File) {
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

    fn drop_cache(f: &File) {
        f.sync_data().unwrap();
        rustix::fs::fadvise(f, 0, None, rustix::fs::Advice::DontNeed).unwrap();
    }

    #[test]
    fn direct_reads_see_every_offset_length_and_dirty_page() {
        let (_d, f) = scratch("direct");
        let all = data(3 << 20);
        f.write_all_at(&all, 0).unwrap();
        let df = DirectFile::default();
        let Some((d, _)) = df.get(&f) else {
            return; // no O_DIRECT on this filesystem: nothing to test
        };
        let mut rng = 0x9E37_79B9_7F4A_7C15u64;
        for round in 0..30u64 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let pos = rng % (1 << 20) / 16 * 16 + 32 * (round % 2);
            let n = DIRECT_MIN + (rng >> 32) as usize % (1 << 20);
            // A buffered write of a few bytes just before: a dirty page the direct read must
            // see (the kernel writes it back first).
            let at = pos as usize + (rng >> 8) as usize % n;
            let b = [round as u8; 3];
            f.write_all_at(&b, at as u64).unwrap();
            let (buf, i) = read_direct(d, pos, n).unwrap();
            assert_eq!(buf.as_ptr() as usize % DIO_ALIGN, 0);
            let want = |k: usize| {
                if (at..at + 3).contains(&k) {
                    b[k - at]
                } else {
                    all[k]
                }
            };
            assert!(
                buf[i..i + n]
                    .iter()
                    .enumerate()
                    .all(|(j, x)| *x == want(pos as usize + j)),
                "round {round}"
            );
            f.write_all_at(&all[at..at + 3], at as u64).unwrap();
        }
        // Past the end of file: short.
        let r = read_direct(d, (3 << 20) - 4096, DIRECT_MIN);
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn cached_and_dirty_ranges_and_small_reads_stay_buffered() {
        let (_d, f) = scratch("choice");
        f.write_all_at(&data(2 << 20), 0).unwrap();
        let df = DirectFile::default();
        if df.get(&f).is_none() {
            return;
        }
        drop_cache(&f);
        // (`read` answers `None` exactly when the caller must read buffered.)
        assert!(read(&df, &f, 32, 1 << 20).is_some(), "cold: direct");
        assert!(
            read(&df, &f, 32, DIRECT_MIN - 16).is_none(),
            "small: buffered"
        );
        // A dirty page inside the range: buffered (no writeback forced by a read).
        f.write_all_at(b"x", 600 << 10).unwrap();
        assert!(read(&df, &f, 32, 1 << 20).is_none(), "dirty: buffered");
        // Mostly cached (read buffered before): buffered.
        drop_cache(&f);
        let mut b = vec![0u8; 1 << 20];
        f.read_exact_at(&mut b, 32).unwrap();
        assert!(read(&df, &f, 32, 1 << 20).is_none(), "cached: buffered");
    }
}
