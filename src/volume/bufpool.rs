//! Request buffers of the data path, reused instead of allocated per request.
//!
//! A 1 MiB read used to allocate a zeroed buffer (the allocator clears it), decrypt into it,
//! copy the requested part out, and free it (the binary's `ZeroizingAlloc` clears it again):
//! two passes over 1 MiB besides the cipher. A pooled buffer is taken as it is (every path
//! overwrites what it uses), and given back without being freed.
//!
//! While the volume is accessible, idle buffers hold the plaintext of recent requests (as
//! the kernel's page cache does). It must not outlive the access: freed memory is zeroed by
//! the allocator, and buffers kept here are zeroed by [`wipe`], which the revocation monitor
//! calls when the keys are erased. [`wipe`] also closes the pool until [`reopen`] (keys
//! usable again): a buffer that was out when it ran (a request in flight, which may still
//! hold the old keys and decrypt after the cut-off), or taken while closed, is zeroed when
//! it comes back and not kept, so nothing decrypted around the cut-off stays in the pool.
//!
//! At most [`MAX_IDLE`] buffers of [`POOL_BUF_LEN`] bytes are kept (about 8 MiB); a request
//! needing more than [`POOL_BUF_LEN`] gets a buffer of its own, freed (and zeroed) after use.
//!
//! [`PoolBuf::take_aligned`] gives a view that starts at a [`DIO_ALIGN`] boundary, for
//! `O_DIRECT` reads of the backing file (`direct`): every allocation has [`ALIGN_SLACK`]
//! spare bytes for that, so aligned and plain views share one pool (and one wipe).

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// Bytes of a pooled buffer: the largest FUSE request (1 MiB) plus a data unit on each side
/// (a request that starts and ends inside units) plus the filler of a file's end.
pub const POOL_BUF_LEN: usize = (1 << 20) + 2 * 4096 + 16;

/// Alignment of [`PoolBuf::take_aligned`] views: the largest logical block size `O_DIRECT`
/// asks of buffers and file offsets on common devices (512 or 4096 bytes).
pub const DIO_ALIGN: usize = 4096;

/// Spare bytes of every allocation: up to `DIO_ALIGN - 1` to reach an aligned address, and
/// up to two more blocks for the aligned superset of a request's units (the backing file's
/// units start 32 bytes in, so its first and last blocks straddle alignment boundaries).
pub const ALIGN_SLACK: usize = 3 * DIO_ALIGN;

/// Bytes of each pooled allocation.
const ALLOC_LEN: usize = POOL_BUF_LEN + ALIGN_SLACK;

/// Buffers kept when idle: more than the FUSE threads and engine helpers that can hold one
/// at a time on a small machine; more in use at once are simply allocated.
pub const MAX_IDLE: usize = 8;

static IDLE: Mutex<Vec<Box<[u8]>>> = Mutex::new(Vec::new());
/// Bumped by [`wipe`]; a buffer taken before a wipe is zeroed when it comes back.
static GENERATION: AtomicU64 = AtomicU64::new(0);
/// Set by [`wipe`], cleared by [`reopen`]: while set, buffers coming back are zeroed and
/// not kept.
static CLOSED: AtomicBool = AtomicBool::new(false);

/// A buffer of `len` bytes from the pool (or of its own when larger than [`POOL_BUF_LEN`]).
/// Its contents are unspecified (stale bytes of an earlier request of this process): every
/// user overwrites what it reads. Derefs to exactly `len` bytes.
pub struct PoolBuf {
    buf: Option<Box<[u8]>>,
    /// Start of the view in `buf` (non-zero only for aligned views).
    start: usize,
    len: usize,
    generation: u64,
}

impl PoolBuf {
    /// Takes a buffer of `len` bytes.
    pub fn take(len: usize) -> PoolBuf {
        PoolBuf::take_with(len, 1, POOL_BUF_LEN)
    }

    /// Takes a buffer of `len` bytes whose first byte lies at a [`DIO_ALIGN`] boundary (for
    /// `O_DIRECT` I/O). Pooled when `len <= POOL_BUF_LEN + 2 * DIO_ALIGN`.
    pub fn take_aligned(len: usize) -> PoolBuf {
        PoolBuf::take_with(len, DIO_ALIGN, POOL_BUF_LEN + 2 * DIO_ALIGN)
    }

    /// A view of `len` bytes at an `align` boundary; from the pool when `len <= pooled`.
    fn take_with(len: usize, align: usize, pooled: usize) -> PoolBuf {
        let generation = GENERATION.load(Ordering::Acquire);
        let buf = if len == 0 {
            return PoolBuf {
                buf: None,
                start: 0,
                len: 0,
                generation,
            };
        } else if len <= pooled {
            let idle = IDLE.lock().unwrap_or_else(|p| p.into_inner()).pop();
            idle.unwrap_or_else(|| vec![0u8; ALLOC_LEN].into_boxed_slice())
        } else {
            vec![0u8; len + align - 1].into_boxed_slice()
        };
        let start = buf.as_ptr().align_offset(align);
        PoolBuf {
            buf: Some(buf),
            start,
            len,
            generation,
        }
    }

    /// Takes a buffer of `len` zero bytes.
    pub fn zeroed(len: usize) -> PoolBuf {
        let mut b = PoolBuf::take(len);
        b.fill(0);
        b
    }

    /// Shortens the view to `len` bytes (no effect if longer than it is).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Lengthens the view to `len` bytes within the buffer, the new bytes set to zero.
    /// Returns false (and changes nothing) when the buffer is too small.
    pub fn extend_zeroed(&mut self, len: usize) -> bool {
        let cap = self.buf.as_ref().map_or(0, |b| b.len() - self.start);
        if len > cap {
            return false;
        }
        if len > self.len {
            let old = self.len;
            self.len = len;
            self[old..].fill(0);
        }
        true
    }
}

impl Deref for PoolBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.buf {
            Some(b) => &b[self.start..self.start + self.len],
            None => &[],
        }
    }
}

impl DerefMut for PoolBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        match &mut self.buf {
            Some(b) => &mut b[self.start..self.start + self.len],
            None => &mut [],
        }
    }
}

impl Drop for PoolBuf {
    fn drop(&mut self) {
        let Some(mut buf) = self.buf.take() else {
            return;
        };
        if buf.len() != ALLOC_LEN {
            return; // freed, and zeroed by the allocator
        }
        if CLOSED.load(Ordering::Acquire) || GENERATION.load(Ordering::Acquire) != self.generation {
            // Freed below or kept: zeroed either way (the allocator of a library user may
            // not clear freed memory).
            buf.fill(0);
            if CLOSED.load(Ordering::Acquire) {
                return;
            }
        }
        let mut idle = IDLE.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(buf);
        }
    }
}

impl std::fmt::Debug for PoolBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the contents: they may be plaintext.
        f.debug_struct("PoolBuf").field("len", &self.len).finish()
    }
}

/// Zeroes and frees every idle buffer, marks those in use to be zeroed when they come back,
/// and keeps none until [`reopen`]. The revocation monitor calls this when the keys are
/// erased.
pub fn wipe() {
    CLOSED.store(true, Ordering::Release);
    GENERATION.fetch_add(1, Ordering::AcqRel);
    let mut idle = IDLE.lock().unwrap_or_else(|p| p.into_inner());
    for b in idle.iter_mut() {
        b.fill(0);
    }
    // Nothing is kept while closed; the zeroed buffers go back to the allocator.
    idle.clear();
}

/// Opens the pool again after [`wipe`]: the keys are usable again (the volume became
/// accessible), so buffers may be kept.
pub fn reopen() {
    CLOSED.store(false, Ordering::Release);
}

/// Bytes held by idle pooled buffers (for tests and the memory report).
pub fn idle_bytes() -> usize {
    IDLE.lock().unwrap_or_else(|p| p.into_inner()).len() * ALLOC_LEN
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One test for the whole life cycle: the pool is process-wide, and other tests of this
    /// binary take and return buffers meanwhile (so reuse is checked only when it happens).
    #[test]
    fn buffers_are_reused_wiped_and_not_kept_while_closed() {
        let mut a = PoolBuf::take(4096);
        a.fill(0xAB);
        let ptr = a.as_ptr();
        drop(a);
        let b = PoolBuf::take(10);
        if b.as_ptr() == ptr {
            // Reused as it was: stale bytes, which every user overwrites.
            assert_eq!(b[0], 0xAB);
        }
        let mut out = PoolBuf::take(64);
        out.fill(0xCD);
        drop(b);
        wipe();
        assert_eq!(idle_bytes(), 0, "idle buffers survived the wipe");
        // A buffer out during the wipe, and one taken while closed, are not kept.
        drop(out);
        let late = PoolBuf::take(64);
        drop(late);
        assert_eq!(idle_bytes(), 0, "a buffer was kept while closed");
        reopen();
    }

    #[test]
    fn large_requests_get_their_own_buffer_and_views_work() {
        let b = PoolBuf::take(POOL_BUF_LEN + 1);
        assert_eq!(b.len(), POOL_BUF_LEN + 1);
        let mut z = PoolBuf::zeroed(100);
        assert!(z.iter().all(|x| *x == 0));
        z[..3].copy_from_slice(b"abc");
        assert!(z.extend_zeroed(200));
        assert_eq!(z.len(), 200);
        assert!(z[100..].iter().all(|x| *x == 0));
        z.truncate(3);
        assert_eq!(&z[..], b"abc");
        assert!(!z.extend_zeroed(ALLOC_LEN + 1));
        assert_eq!(format!("{z:?}"), "PoolBuf { len: 3 }");
    }

    #[test]
    fn aligned_views_start_at_a_block_boundary_pooled_or_not() {
        for len in [
            1,
            4096,
            POOL_BUF_LEN + 2 * DIO_ALIGN,
            POOL_BUF_LEN + 3 * DIO_ALIGN,
        ] {
            let mut b = PoolBuf::take_aligned(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr() as usize % DIO_ALIGN, 0, "len {len}");
            b.fill(0x5A); // the whole view is inside the allocation
            assert!(b.extend_zeroed(len));
        }
    }
}
