//! Memory for secrets: where long-lived key material lives, and how the copies that key
//! operations leave behind are erased.
//!
//! * [`Secret<T>`] and [`SecretBytes`]: a value in pages of its own (anonymous `mmap`), locked
//!   in RAM (`mlock`: never written to swap), excluded from core dumps (`MADV_DONTDUMP`),
//!   wiped in a child after `fork` (`MADV_WIPEONFORK`), zeroized and unmapped on drop. Pages
//!   are never shared between two secrets, so unlocking one never unlocks another's page.
//! * [`scrub_stack`]: zeroes the stack below the caller, where the frames of the key
//!   operations it just called lay (key schedules, HKDF states, SIV subkeys are built there).
//! * [`ZeroizingAlloc`]: a global allocator that zeroes every heap block when it is freed, so
//!   buffers that libraries fill and free on their own (TLS records, HTTP bodies, JSON
//!   parsing) do not keep a DEK in freed memory.
//!
//! `mlock` may fail for an unprivileged user past `RLIMIT_MEMLOCK`; the secret is then still
//! kept out of dumps and zeroized, and [`locked_bytes`] tells how much is actually locked.

use std::alloc::{GlobalAlloc, Layout, System};
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Bytes [`scrub_stack`] zeroes: more than the deepest key operation uses (AES-SIV with the
/// `aes` crate's autodetected backend, HKDF, the XTS key expansion and sector loop, in
/// unoptimized builds too), far less than a thread's stack (2 MiB for Rust threads). About
/// 0.2 µs per call.
pub const SCRUB_BYTES: usize = 16 * 1024;

static LOCKED: AtomicUsize = AtomicUsize::new(0);

/// Bytes of secret pages currently locked in RAM by this process.
pub fn locked_bytes() -> usize {
    LOCKED.load(Ordering::Relaxed)
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
    }
}

/// An anonymous private mapping, locked and kept out of dumps where the kernel allows.
struct Pages {
    ptr: NonNull<u8>,
    len: usize,
    locked: bool,
}

impl Pages {
    /// At least `size` zeroed bytes, page aligned. Aborts like any allocation on OOM.
    fn new(size: usize) -> Pages {
        let page = page_size();
        let len = size.max(1).div_ceil(page) * page;
        // SAFETY: a fresh anonymous private mapping; no existing memory is touched.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            std::alloc::handle_alloc_error(
                Layout::from_size_align(len, page).unwrap_or(Layout::new::<u8>()),
            );
        }
        // SAFETY: `p` is the mapping just made, `len` its length. Failures are tolerated: the
        // pages are still zeroized on drop (madvise flags are hints on older kernels).
        let locked = unsafe {
            libc::madvise(p, len, libc::MADV_DONTDUMP);
            libc::madvise(p, len, libc::MADV_WIPEONFORK);
            libc::mlock(p, len) == 0
        };
        if locked {
            LOCKED.fetch_add(len, Ordering::Relaxed);
        }
        Pages {
            // mmap never returns null on success.
            ptr: NonNull::new(p.cast()).expect("mmap returned null"),
            len,
            locked,
        }
    }
}

impl Drop for Pages {
    fn drop(&mut self) {
        // SAFETY: the mapping is ours and nothing refers to it any more.
        unsafe {
            wipe(self.ptr.as_ptr(), self.len);
            if self.locked {
                libc::munlock(self.ptr.as_ptr().cast(), self.len);
                LOCKED.fetch_sub(self.len, Ordering::Relaxed);
            }
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// Zeroes `len` bytes at `p` in a way the optimizer cannot drop as a dead store (the memory
/// is freed right after, which lets LLVM remove a plain memset).
///
/// # Safety
/// `p..p+len` is writable memory.
#[inline]
unsafe fn wipe(p: *mut u8, len: usize) {
    std::ptr::write_bytes(p, 0, len);
    std::hint::black_box(p);
    std::sync::atomic::compiler_fence(Ordering::SeqCst);
}

/// Types that may live in a [`Secret`]: plain data with no pointers to other memory (their
/// bytes are all there is to wipe).
///
/// # Safety
/// The type holds no heap pointers or other resources besides its own bytes, and, for
/// [`Secret::zeroed`], the all-zero bit pattern is a valid value.
pub unsafe trait Plain {}

// SAFETY: byte arrays are plain and valid when zero.
unsafe impl<const N: usize> Plain for [u8; N] {}

/// A `T` in locked, undumpable pages of its own, zeroized and unmapped on drop (see the
/// module docs). `Debug` never shows the contents.
pub struct Secret<T: Plain> {
    pages: Pages,
    _t: PhantomData<T>,
}

// SAFETY: `Secret<T>` owns its `T` exactly like a `Box<T>` does.
unsafe impl<T: Plain + Send> Send for Secret<T> {}
// SAFETY: as above; shared access only hands out `&T`.
unsafe impl<T: Plain + Sync> Sync for Secret<T> {}

impl<T: Plain> Secret<T> {
    fn slot() -> Pages {
        assert!(
            std::mem::align_of::<T>() <= page_size(),
            "a secret's alignment must not exceed a page"
        );
        Pages::new(std::mem::size_of::<T>())
    }

    /// A zeroed `T`, to be filled in place (so the key never exists anywhere else).
    pub fn zeroed() -> Secret<T> {
        // Fresh anonymous pages are zero, and `Plain` says zero is a valid `T`.
        Secret {
            pages: Self::slot(),
            _t: PhantomData,
        }
    }

    /// Moves `value` into secret pages. The moved-from copy (on the caller's stack) is the
    /// caller's to erase: call [`scrub_stack`] once the key setup is done.
    pub fn new(value: T) -> Secret<T> {
        let pages = Self::slot();
        // SAFETY: the pages are large enough and page-aligned for `T`.
        unsafe { std::ptr::write(pages.ptr.as_ptr().cast::<T>(), value) };
        Secret {
            pages,
            _t: PhantomData,
        }
    }
}

impl<T: Plain> Deref for Secret<T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the pages hold an initialized `T` for the life of `self`.
        unsafe { &*self.pages.ptr.as_ptr().cast::<T>() }
    }
}

impl<T: Plain> DerefMut for Secret<T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`, and `&mut self` is unique.
        unsafe { &mut *self.pages.ptr.as_ptr().cast::<T>() }
    }
}

impl<T: Plain> Drop for Secret<T> {
    fn drop(&mut self) {
        // Let the value wipe itself if it knows how (the `aes` crate's key schedules), then
        // `Pages` zeroes every byte anyway.
        // SAFETY: the `T` is initialized and dropped exactly once, here.
        unsafe { std::ptr::drop_in_place(self.pages.ptr.as_ptr().cast::<T>()) };
    }
}

impl<T: Plain> std::fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// A secret byte string of any length (a bearer token, a PIN) in locked, undumpable pages.
pub struct SecretBytes {
    pages: Pages,
    len: usize,
}

// SAFETY: owned bytes, like a `Vec<u8>`.
unsafe impl Send for SecretBytes {}
// SAFETY: shared access only hands out `&[u8]`.
unsafe impl Sync for SecretBytes {}

impl SecretBytes {
    /// A copy of `bytes`. The caller should zeroize its own copy.
    pub fn new(bytes: &[u8]) -> SecretBytes {
        let pages = Pages::new(bytes.len());
        // SAFETY: the pages hold at least `bytes.len()` bytes and do not overlap `bytes`.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), pages.ptr.as_ptr(), bytes.len()) };
        SecretBytes {
            pages,
            len: bytes.len(),
        }
    }

    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: `len` bytes were written in `new` and live as long as `self`.
        unsafe { std::slice::from_raw_parts(self.pages.ptr.as_ptr(), self.len) }
    }

    /// The bytes as text, when they are UTF-8 (tokens and PINs are).
    pub fn as_str(&self) -> Option<&str> {
        std::str::from_utf8(self.as_bytes()).ok()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Clone for SecretBytes {
    fn clone(&self) -> SecretBytes {
        SecretBytes::new(self.as_bytes())
    }
}

impl std::fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretBytes(<redacted>)")
    }
}

/// Zeroes [`SCRUB_BYTES`] of stack below the caller's frame: the frames of the functions it
/// called last (key expansion, HKDF, SIV) lay there and still hold copies of their keys.
/// Call it from the function that ran the key operations, after they returned.
#[inline(never)]
pub fn scrub_stack() {
    scrub_stack_bytes::<SCRUB_BYTES>();
}

/// Zeroes `N` bytes of stack below the caller's frame, for a caller that knows how deep the
/// key operations it ran go (the sector engine: [`crate::engine::ENGINE_SCRUB_BYTES`], pinned
/// by a test). [`scrub_stack`] is this with [`SCRUB_BYTES`].
#[inline(never)]
pub fn scrub_stack_bytes<const N: usize>() {
    let mut area = [0u8; N];
    // SAFETY: `area` is a local array of exactly this size.
    unsafe { wipe(area.as_mut_ptr(), area.len()) };
    std::hint::black_box(&mut area);
}

/// The global allocator of the cmkfs binary: the system allocator, but every block is zeroed
/// before it is freed (and before a reallocation moves it), so no freed heap memory holds a
/// key, a token or plaintext that a library buffered. The cost is one `memset` per free.
pub struct ZeroizingAlloc;

// SAFETY: every call forwards to `System` with the same layouts; blocks are only wiped while
// still owned.
unsafe impl GlobalAlloc for ZeroizingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        System.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        wipe(ptr, layout.size());
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // Never let the system allocator move a block without wiping the old copy.
        let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
        let new = System.alloc(new_layout);
        if !new.is_null() {
            std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
            self.dealloc(ptr, layout);
        }
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm_lck_kb() -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmLck:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    #[test]
    fn secrets_are_page_backed_locked_and_readable() {
        let mut s = Secret::<[u8; 64]>::zeroed();
        assert_eq!(*s, [0u8; 64]);
        s[0] = 7;
        assert_eq!(s[0], 7);
        assert_eq!(s.pages.ptr.as_ptr() as usize % page_size(), 0);
        let t = Secret::new([9u8; 32]);
        assert_eq!(*t, [9u8; 32]);
        assert_ne!(s.pages.ptr, t.pages.ptr);
        let b = SecretBytes::new(b"token");
        assert_eq!(b.as_str(), Some("token"));
        assert_eq!(
            format!("{b:?} {t:?}"),
            "SecretBytes(<redacted>) Secret(<redacted>)"
        );
        if locked_bytes() > 0 {
            assert!(vm_lck_kb() > 0);
        }
        drop((s, t, b));
    }

    #[test]
    fn dropping_one_secret_keeps_the_others_locked() {
        let a = Secret::new([1u8; 16]);
        let b = Secret::new([2u8; 16]);
        let before = locked_bytes();
        drop(a);
        assert_eq!(*b, [2u8; 16]);
        assert!(before == 0 || locked_bytes() >= page_size());
    }

    #[test]
    fn scrub_stack_runs() {
        scrub_stack();
    }

    #[test]
    fn the_allocator_wipes_blocks_it_frees() {
        let a = ZeroizingAlloc;
        let layout = Layout::from_size_align(256, 8).unwrap();
        // SAFETY: a plain alloc/realloc/dealloc round trip with matching layouts.
        unsafe {
            let p = a.alloc(layout);
            assert!(!p.is_null());
            std::ptr::write_bytes(p, 0xAB, 256);
            let q = a.realloc(p, layout, 512);
            assert!(!q.is_null());
            assert!(std::slice::from_raw_parts(q, 256)
                .iter()
                .all(|b| *b == 0xAB));
            a.dealloc(q, Layout::from_size_align(512, 8).unwrap());
        }
    }
}
