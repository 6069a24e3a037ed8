//! Starting the backing disk early: after a file has taken enough written bytes, its dirty
//! backing pages are handed to the disk at once (`sync_file_range(2)` with
//! `SYNC_FILE_RANGE_WRITE`), so the write-out overlaps the encryption of what follows and
//! the writer's `fsync` finds little left (docs/PERFORMANCE.md, "Session 9").
//!
//! Without it a large write through the mount encrypts everything into the backing page
//! cache first (the kernel starts background write-out only past `dirty_background_ratio`,
//! gigabytes on a large machine) and the disk sits idle until the `fsync`, which then
//! flushes the whole file: the time of a written-then-synced file is the cipher's time
//! plus the disk's, where a plain file's is the copy's plus the disk's.
//!
//! `SYNC_FILE_RANGE_WRITE` only starts write-out (pages already under write-out are
//! skipped; nothing waits for completion, though handing pages over may wait for room in the
//! device queue, which is why the caller is outside the content lock); a write-out error is recorded in the backing
//! file's mapping and reported by the next `fsync` of it as before, so durability and error
//! reporting do not change. It is a hint: when it fails the data is written back later, as
//! without it.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// How many bytes a file takes between two write-outs started by [`wrote`], by default.
pub const CHUNK: u64 = 16 << 20;

/// Only writes of at least this many bytes count (a streaming writer's requests; with the
/// writeback cache even 4 KiB `write(2)`s of one reach the daemon as 1 MiB requests).
/// Scattered small writes are left to the kernel's own write-back as before: starting it
/// early for them writes pages that may be rewritten or deleted before the kernel would
/// have written them, and allocates their blocks one by one (a hole-filling random 4 KiB
/// writer cost 3x the daemon CPU in `scripts/bench-daemon.sh`'s rand4k job).
pub const LARGE: usize = 128 << 10;

/// Bytes of file content written through this process since the last write-out it started,
/// per file ([`super::content::FileState`]).
#[derive(Debug, Default)]
pub struct Pending(AtomicU64);

/// The write-out chunk: [`CHUNK`], or `CMKFS_WRITEOUT_KIB` (0: never) for measurements.
fn chunk() -> u64 {
    static C: OnceLock<u64> = OnceLock::new();
    *C.get_or_init(|| {
        std::env::var("CMKFS_WRITEOUT_KIB")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(CHUNK, |k| k << 10)
    })
}

/// Counts a write of `n` bytes just stored in `f` and, once [`LARGE`] writes have gathered a
/// chunk, starts the write-out of all of `f`'s dirty pages (a write-out walks the file's
/// dirty pages only, so the whole file costs no more than the written part). Returns whether
/// it started one (for tests).
pub fn wrote(p: &Pending, f: &File, n: usize) -> bool {
    let chunk = chunk();
    if chunk == 0 || n < LARGE {
        return false;
    }
    let total = p.0.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
    if total < chunk {
        return false;
    }
    p.0.store(0, Ordering::Relaxed);
    // SAFETY: `f` is an open descriptor; the call reads no memory of ours.
    let r = unsafe { libc::sync_file_range(f.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
    if r != 0 {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "could not start the write-out of a backing file (it is written back later)"
        );
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::direct::page_states;
    use std::os::unix::fs::FileExt;

    /// A streaming writer's dirty pages go to the disk a chunk at a time, without an
    /// `fsync`; small writes start nothing. Skipped where the filesystem has no write-back
    /// or `cachestat(2)` is missing (tmpfs, before Linux 6.5).
    #[test]
    fn large_writes_start_the_write_out_a_chunk_at_a_time() {
        let (_dir, f) = crate::volume::direct::tests::scratch("w");
        if chunk() == 0 {
            return; // switched off for a measurement
        }
        let p = Pending::default();
        let small = vec![7u8; LARGE - 4096];
        for i in 0..(2 * CHUNK as usize / small.len()) {
            f.write_all_at(&small, (i * small.len()) as u64).unwrap();
            assert!(
                !wrote(&p, &f, small.len()),
                "a small write started a write-out"
            );
        }
        f.set_len(0).unwrap();
        let mb = vec![9u8; 1 << 20];
        let per_chunk = (chunk() / (1 << 20)) as usize;
        let mut started = 0;
        for i in 0..3 * per_chunk + 1 {
            f.write_all_at(&mb, (i as u64) << 20).unwrap();
            if wrote(&p, &f, mb.len()) {
                started += 1;
                assert_eq!((i + 1) % per_chunk, 0, "write-out after request {i}");
            }
        }
        assert_eq!(started, 3);
        // tmpfs has no write-back to start.
        if rustix::fs::fstatfs(&f).unwrap().f_type == libc::TMPFS_MAGIC {
            return;
        }
        let Some(s) = page_states(&f, 0, (3 * per_chunk as u64 + 1) << 20) else {
            return;
        };
        // Only the request after the last write-out may still be dirty (a page the kernel
        // skipped because another writer held it would be counted too: none here).
        assert!(
            s.dirty <= 2 * 256,
            "{} pages still dirty after three write-outs ({s:?})",
            s.dirty
        );
    }
}
