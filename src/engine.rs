//! The sector engine: runs the XTS sector cipher over buffers of many data units, across cores
//! when the buffer is large enough to pay for it.
//!
//! This is the one place where data-path parallelism lives. It knows nothing of files or FUSE:
//! a caller hands it a buffer of consecutive units, the sequence number of the first one and
//! the file's tweak base.
//!
//! * Buffers under [`PARALLEL_MIN_BYTES`] (or an engine with one thread) run inline on the
//!   calling thread: handing a 4 KiB request to another thread costs more than encrypting it.
//! * Larger buffers are cut into chunks of at least [`MIN_CHUNK_UNITS`] units (and
//!   [`MIN_CHUNK_BYTES`]). When that makes more than one chunk, the calling thread and the
//!   engine's own pool of `threads - 1` rayon workers (never the global pool, so the thread
//!   count is what the caller configured) claim chunks from a shared counter until none are
//!   left. The caller works instead of waiting: it starts at once, while a pool worker needs
//!   tens of microseconds to wake up — a tenth of a 1 MiB request, which is what keeps two
//!   threads near 2x one.
//! * Nothing is allocated per unit (one small job per pool worker per parallel request), and
//!   nothing is locked: the cipher is shared by reference (`XtsCipher: Sync`) and each chunk,
//!   claimed by exactly one thread, is a disjoint slice of the buffer.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use crate::crypto::{CryptoError, XtsCipher};

/// Buffers at least this long are split across the pool.
pub const PARALLEL_MIN_BYTES: usize = 64 * 1024;

/// Fewest units a parallel chunk holds: smaller chunks lose more to task overhead than they
/// gain in balance (about 20% at one 4 KiB unit per task on this hardware).
pub const MIN_CHUNK_UNITS: usize = 16;

/// Fewest bytes a parallel chunk holds, for small unit sizes (16 units of 512 bytes would be
/// too little work per task). A buffer that makes only one chunk runs inline.
pub const MIN_CHUNK_BYTES: usize = 64 * 1024;

/// How decryption treats a data unit whose ciphertext is all zero bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Holes {
    /// Decrypt every unit.
    Decrypt,
    /// Leave every all-zero 16-byte block as zeros: whole units of zeros are holes of a
    /// sparse backing file, and single zero blocks inside a unit are the parts of a hole unit
    /// that a torn or failed write did not reach (a backing `pwrite` can stop at a page
    /// boundary, and a unit straddles two pages behind the 32-byte file header). A real
    /// ciphertext block is all zeros with probability 2^-128: never in practice. Needs units
    /// that are whole blocks (format v2); a 1..15-byte v1 tail was not so safe.
    Zero,
}

/// Runs the sector cipher over buffers of many units, in parallel when it pays.
///
/// `Send + Sync`: one engine serves every FUSE thread of a mount.
pub struct SectorEngine {
    threads: usize,
    /// `threads - 1` workers (the calling thread is the last one); `None` when
    /// `threads == 1`: everything runs inline.
    pool: Option<rayon::ThreadPool>,
}

impl std::fmt::Debug for SectorEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SectorEngine")
            .field("threads", &self.threads)
            .finish()
    }
}

#[derive(Clone, Copy)]
enum Dir {
    Encrypt,
    Decrypt(Holes),
}

impl SectorEngine {
    /// An engine using `threads` threads; 0 means the number of available cores.
    ///
    /// Fails only if the OS refuses to report the core count or to start the pool's threads.
    pub fn new(threads: usize) -> Result<Self, std::io::Error> {
        let threads = match threads {
            0 => std::thread::available_parallelism()?.get(),
            n => n,
        };
        let pool = if threads > 1 {
            Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads - 1)
                    .thread_name(|i| format!("cmkfs-sector-{i}"))
                    .build()
                    .map_err(std::io::Error::other)?,
            )
        } else {
            None
        };
        Ok(SectorEngine { threads, pool })
    }

    /// Threads the engine uses.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Encrypts `buf` in place: consecutive units of `cipher.unit_size()` bytes, all full
    /// except the last, which may be short (1..=unit_size bytes). Unit `i` of the buffer uses
    /// tweak `file_tweak.wrapping_add(first_unit as u128 + i as u128)`. An empty buffer is a
    /// no-op.
    pub fn encrypt(
        &self,
        cipher: &XtsCipher,
        file_tweak: u128,
        first_unit: u64,
        buf: &mut [u8],
    ) -> Result<(), CryptoError> {
        self.run(cipher, file_tweak, first_unit, buf, Dir::Encrypt)
    }

    /// Decrypts `buf` in place, the inverse of [`SectorEngine::encrypt`]. With
    /// [`Holes::Zero`], units whose ciphertext is all zeros stay zeros.
    pub fn decrypt(
        &self,
        cipher: &XtsCipher,
        file_tweak: u128,
        first_unit: u64,
        buf: &mut [u8],
        holes: Holes,
    ) -> Result<(), CryptoError> {
        self.run(cipher, file_tweak, first_unit, buf, Dir::Decrypt(holes))
    }

    fn run(
        &self,
        cipher: &XtsCipher,
        file_tweak: u128,
        first_unit: u64,
        buf: &mut [u8],
        dir: Dir,
    ) -> Result<(), CryptoError> {
        let unit = cipher.unit_size();
        let base = file_tweak.wrapping_add(u128::from(first_unit));
        let units = buf.len().div_ceil(unit);
        // Several chunks per thread, so the work balances dynamically (a thread that starts
        // late or is descheduled takes fewer); never below the minimum chunk.
        let per_chunk = units
            .div_ceil(self.threads.saturating_mul(8))
            .max(MIN_CHUNK_UNITS)
            .max(MIN_CHUNK_BYTES.div_ceil(unit));
        match &self.pool {
            Some(pool) if buf.len() >= PARALLEL_MIN_BYTES && units > per_chunk => {
                let chunks = Chunks {
                    ptr: buf.as_mut_ptr(),
                    len: buf.len(),
                    bytes: per_chunk * unit,
                    count: units.div_ceil(per_chunk),
                    next: AtomicUsize::new(0),
                };
                let failed = OnceLock::new();
                let work = || {
                    while let Some((c, chunk)) = chunks.claim() {
                        let first = base.wrapping_add((c * per_chunk) as u128);
                        if let Err(e) = run_units(cipher, first, chunk, dir) {
                            let _ = failed.set(e);
                            return;
                        }
                    }
                };
                let helpers = (self.threads - 1).min(chunks.count - 1);
                pool.in_place_scope(|s| {
                    for _ in 0..helpers {
                        s.spawn(|_| work());
                    }
                    work();
                });
                failed.into_inner().map_or(Ok(()), Err)
            }
            _ => run_units(cipher, base, buf, dir),
        }
    }
}

/// A buffer cut into `count` chunks of `bytes` bytes (the last may be shorter), handed out
/// one at a time to whichever thread asks next.
struct Chunks {
    ptr: *mut u8,
    len: usize,
    bytes: usize,
    count: usize,
    next: AtomicUsize,
}

// SAFETY: `Chunks` hands out disjoint sub-slices of one `&mut [u8]` (see `claim`), each to
// one thread; sharing it across the threads of one `in_place_scope` is what it is for.
unsafe impl Sync for Chunks {}

impl Chunks {
    /// The next unclaimed chunk and its index, or `None` when all are taken.
    // `&self` → `&mut`: sound here because the atomic counter hands each chunk out once (see
    // the SAFETY note), which the lint cannot see.
    #[allow(clippy::mut_from_ref)]
    fn claim(&self) -> Option<(usize, &mut [u8])> {
        let c = self.next.fetch_add(1, Ordering::Relaxed);
        if c >= self.count {
            return None;
        }
        let start = c * self.bytes;
        let end = (start + self.bytes).min(self.len);
        // SAFETY: `ptr..ptr+len` is the caller's `&mut [u8]`, borrowed for the whole scope
        // (the scope ends before `run` returns). `fetch_add` gives each index to exactly one
        // caller, and chunk ranges of distinct indices do not overlap, so no two live `&mut`
        // alias. `start < len` because `c < count = ceil(len / bytes)`.
        Some((c, unsafe {
            std::slice::from_raw_parts_mut(self.ptr.add(start), end - start)
        }))
    }
}

/// Runs the cipher over consecutive units of `buf` on this thread; unit `i` gets tweak
/// `first + i`. Afterwards the stack the cipher ran on is scrubbed: register spills of round
/// keys must not outlive the request on a FUSE or pool thread's stack.
fn run_units(cipher: &XtsCipher, first: u128, buf: &mut [u8], dir: Dir) -> Result<(), CryptoError> {
    let r = run_units_inner(cipher, first, buf, dir);
    crate::crypto::secret::scrub_stack();
    r
}

#[inline(never)]
fn run_units_inner(
    cipher: &XtsCipher,
    first: u128,
    buf: &mut [u8],
    dir: Dir,
) -> Result<(), CryptoError> {
    for (i, u) in buf.chunks_mut(cipher.unit_size()).enumerate() {
        let tweak = first.wrapping_add(i as u128);
        match dir {
            Dir::Encrypt => cipher.encrypt_unit(tweak, u)?,
            Dir::Decrypt(Holes::Zero) => decrypt_keeping_zero_blocks(cipher, tweak, u)?,
            Dir::Decrypt(Holes::Decrypt) => cipher.decrypt_unit(tweak, u)?,
        }
    }
    Ok(())
}

/// Decrypts one unit, leaving its all-zero 16-byte blocks as zeros ([`Holes::Zero`]). XTS
/// decrypts each block on its own (no ciphertext stealing in whole-block units), so zeroing a
/// block's plaintext afterwards is the same as never decrypting it.
fn decrypt_keeping_zero_blocks(
    cipher: &XtsCipher,
    tweak: u128,
    u: &mut [u8],
) -> Result<(), CryptoError> {
    if is_zero(u) {
        return Ok(());
    }
    let zero_blocks: Vec<usize> = if u.len().is_multiple_of(BLOCK) {
        u.chunks_exact(BLOCK)
            .enumerate()
            .filter(|(_, b)| b.iter().fold(0u8, |a, &x| a | x) == 0)
            .map(|(i, _)| i)
            .collect()
    } else {
        Vec::new()
    };
    cipher.decrypt_unit(tweak, u)?;
    for i in zero_blocks {
        u[i * BLOCK..(i + 1) * BLOCK].fill(0);
    }
    Ok(())
}

/// The AES block size: the granularity of [`Holes::Zero`].
const BLOCK: usize = 16;

/// True when every byte is zero. Works 64 bytes at a time with an OR-fold the compiler
/// vectorises, and stops at the first non-zero chunk (real ciphertext stops at the first).
fn is_zero(buf: &[u8]) -> bool {
    let mut chunks = buf.chunks_exact(64);
    for c in &mut chunks {
        if c.iter().fold(0u8, |a, &b| a | b) != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_zero_works() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0; 4096]));
        assert!(is_zero(&[0; 5]));
        for pos in [0, 63, 64, 100, 4095] {
            let mut b = [0u8; 4096];
            b[pos] = 1;
            assert!(!is_zero(&b), "{pos}");
        }
        assert!(!is_zero(&[0, 0, 1]));
    }

    #[test]
    fn threads_default_and_explicit() {
        assert!(SectorEngine::new(0).unwrap().threads() >= 1);
        assert_eq!(SectorEngine::new(3).unwrap().threads(), 3);
    }
}
