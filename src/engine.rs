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
//!   engine's own `threads - 1` helper threads claim chunks from a shared counter until none
//!   are left. The caller works instead of waiting: it starts at once, while a helper needs
//!   tens of microseconds to wake up — a tenth of a 1 MiB request, which is what keeps two
//!   threads near 2x one.
//! * Helpers sleep on a condition variable (a futex) between requests: they never spin. A
//!   rayon pool, used before, searched for work with `sched_yield` after every job (5,856
//!   `sched_yield` for 512 MiB read, docs/PERFORMANCE.md), which cost CPU time on a machine
//!   whose other core is busy. One request at a time uses the helpers; a request that finds
//!   them taken runs on its own thread (the other cores are busy with the first one then).
//! * Nothing is allocated per request, and the cipher is shared by reference
//!   (`XtsCipher: Sync`); each chunk, claimed by exactly one thread, is a disjoint slice of
//!   the buffer.
//! * Every thread that ran the cipher scrubs [`ENGINE_SCRUB_BYTES`] of its stack once per
//!   request, after its last chunk (register spills of round keys and tweak masks lay there):
//!   the depth the sector loop uses, pinned by a test, not the 16 KiB of the key setup paths.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;

use crate::crypto::{CryptoError, XtsCipher};

/// Buffers at least this long are split across the helpers.
pub const PARALLEL_MIN_BYTES: usize = 64 * 1024;

/// Fewest units a parallel chunk holds: smaller chunks lose more to task overhead than they
/// gain in balance (about 20% at one 4 KiB unit per task on this hardware).
pub const MIN_CHUNK_UNITS: usize = 16;

/// Fewest bytes a parallel chunk holds, for small unit sizes (16 units of 512 bytes would be
/// too little work per task). A buffer that makes only one chunk runs inline.
pub const MIN_CHUNK_BYTES: usize = 64 * 1024;

/// Bytes of stack a thread zeroes below its frame after running the sector cipher: the
/// deepest the sector loop goes (the `xts_stack_depth_fits_the_scrub` test measures it, in
/// the build under test, with room to spare) is far less than the 16 KiB
/// [`crate::crypto::secret::SCRUB_BYTES`] that key setup (HKDF, AES-SIV) needs.
///
/// Unoptimized builds (the tests) spill every intrinsic to the stack and go deeper (8.3 KiB
/// with the portable backend, 15.3 KiB with VAES, whose 64-byte vectors spill too), so they
/// scrub more.
pub const ENGINE_SCRUB_BYTES: usize = if cfg!(debug_assertions) {
    20 * 1024
} else {
    4 * 1024
};

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
    /// `threads - 1` helpers (the calling thread is the last one); `None` when
    /// `threads == 1`: everything runs inline.
    pool: Option<Helpers>,
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

/// Plaintext to copy into the buffer, unit by unit, just before each unit is encrypted:
/// `data` goes to `buf[at..at + data.len()]`. The copy and the cipher then make one pass over
/// memory (the unit is in L1 when it is encrypted) instead of two.
#[derive(Clone, Copy)]
struct Source<'a> {
    data: &'a [u8],
    at: usize,
}

impl Source<'_> {
    /// Copies the part of `data` that falls in `dst`, which lies at `dst_at` of the buffer.
    fn copy_into(&self, dst: &mut [u8], dst_at: usize) {
        let lo = self.at.max(dst_at);
        let hi = (self.at + self.data.len()).min(dst_at + dst.len());
        if lo < hi {
            dst[lo - dst_at..hi - dst_at].copy_from_slice(&self.data[lo - self.at..hi - self.at]);
        }
    }
}

impl SectorEngine {
    /// An engine using `threads` threads; 0 means the number of available cores.
    ///
    /// Fails only if the OS refuses to report the core count or to start the helper threads.
    pub fn new(threads: usize) -> Result<Self, std::io::Error> {
        let threads = match threads {
            0 => std::thread::available_parallelism()?.get(),
            n => n,
        };
        let pool = if threads > 1 {
            Some(Helpers::start(threads - 1)?)
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
        self.run(cipher, file_tweak, first_unit, buf, Dir::Encrypt, None)
    }

    /// Copies `data` into `buf[at..at + data.len()]` and encrypts `buf` as
    /// [`SectorEngine::encrypt`] does, in one pass: each unit gets its part of `data` just
    /// before it is encrypted. Bytes of `buf` outside that range are encrypted as they are.
    ///
    /// Panics if `data` does not fit in `buf` at `at`.
    pub fn encrypt_from(
        &self,
        cipher: &XtsCipher,
        file_tweak: u128,
        first_unit: u64,
        buf: &mut [u8],
        data: &[u8],
        at: usize,
    ) -> Result<(), CryptoError> {
        assert!(
            at.checked_add(data.len()).is_some_and(|e| e <= buf.len()),
            "encrypt_from: {} bytes at {at} do not fit in a {}-byte buffer",
            data.len(),
            buf.len()
        );
        let src = Source { data, at };
        self.run(cipher, file_tweak, first_unit, buf, Dir::Encrypt, Some(src))
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
        self.run(
            cipher,
            file_tweak,
            first_unit,
            buf,
            Dir::Decrypt(holes),
            None,
        )
    }

    fn run(
        &self,
        cipher: &XtsCipher,
        file_tweak: u128,
        first_unit: u64,
        buf: &mut [u8],
        dir: Dir,
        src: Option<Source>,
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
        let Some(pool) = self
            .pool
            .as_ref()
            .filter(|_| buf.len() >= PARALLEL_MIN_BYTES && units > per_chunk)
        else {
            return run_units(cipher, base, buf, 0, dir, src);
        };
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
                let at = c * chunks.bytes;
                if let Err(e) = run_units_inner(cipher, first, chunk, at, dir, src) {
                    let _ = failed.set(e);
                    break;
                }
            }
            crate::crypto::secret::scrub_stack_bytes::<ENGINE_SCRUB_BYTES>();
        };
        pool.run(chunks.count - 1, &work);
        failed.into_inner().map_or(Ok(()), Err)
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
// one thread; sharing it with the helpers of one `Helpers::run` (which returns only when no
// helper uses it any more) is what it is for.
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
        // SAFETY: `ptr..ptr+len` is the caller's `&mut [u8]`, borrowed until `run` returns,
        // and `Helpers::run` returns only once every helper has left the job. `fetch_add`
        // gives each index to exactly one caller, and chunk ranges of distinct indices do not
        // overlap, so no two live `&mut` alias. `start < len` because
        // `c < count = ceil(len / bytes)`.
        Some((c, unsafe {
            std::slice::from_raw_parts_mut(self.ptr.add(start), end - start)
        }))
    }
}

/// The job of one parallel request, as the helpers see it: the caller's closure with its
/// lifetime erased. Sound because [`Helpers::run`] takes it back and waits until no helper
/// runs it before the closure's frame ends.
#[derive(Clone, Copy)]
struct Job(&'static (dyn Fn() + Sync));

/// What the helpers and the callers share, under one mutex.
struct State {
    /// The request being worked on, if any: one at a time.
    job: Option<Job>,
    /// Bumped per job, so a helper joins each job at most once.
    seq: u64,
    /// Helpers wanted for the current job; each one that joins takes one.
    wanted: usize,
    /// A helper's job panicked (the caller panics too, as a scoped thread would).
    panicked: bool,
    shutdown: bool,
}

struct Shared {
    state: Mutex<State>,
    /// Helpers wait here for a job.
    work: Condvar,
    /// The caller waits here for the helpers in its job to leave.
    left: Condvar,
    /// Helpers inside the current job. Raised under the mutex (so a caller that took its
    /// job back sees every helper that can still touch it), lowered without it.
    active: AtomicUsize,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The engine's helper threads, parked on a condition variable between requests.
struct Helpers {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Helpers {
    fn start(n: usize) -> Result<Helpers, std::io::Error> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                job: None,
                seq: 0,
                wanted: 0,
                panicked: false,
                shutdown: false,
            }),
            work: Condvar::new(),
            left: Condvar::new(),
            active: AtomicUsize::new(0),
        });
        let mut helpers = Helpers {
            shared,
            threads: Vec::with_capacity(n),
        };
        for i in 0..n {
            let shared = helpers.shared.clone();
            // On failure, `helpers` is dropped: the threads started so far are stopped.
            helpers.threads.push(
                std::thread::Builder::new()
                    .name(format!("cmkfs-sector-{i}"))
                    .spawn(move || helper(&shared))?,
            );
        }
        Ok(helpers)
    }

    /// Runs `work` on this thread and on up to `extra` helpers at once; returns when every
    /// helper that joined has left it. If another request holds the helpers, `work` runs on
    /// this thread alone (it claims every chunk).
    fn run(&self, extra: usize, work: &(dyn Fn() + Sync)) {
        let extra = extra.min(self.threads.len());
        {
            let mut st = lock(&self.shared.state);
            if st.job.is_some() || extra == 0 {
                drop(st);
                work();
                return;
            }
            // SAFETY: only the lifetime is erased. `Retract` (below) takes the job back and
            // waits until no helper is inside it before this function returns or unwinds,
            // and helpers join only while the job is published.
            let job = Job(unsafe {
                std::mem::transmute::<&(dyn Fn() + Sync), &'static (dyn Fn() + Sync)>(work)
            });
            st.job = Some(job);
            st.seq = st.seq.wrapping_add(1);
            st.wanted = extra;
        }
        let retract = Retract(&self.shared);
        for _ in 0..extra {
            self.shared.work.notify_one();
        }
        work();
        drop(retract);
    }
}

/// Takes a published job back and waits for the helpers inside it; on drop, so that an
/// unwinding caller waits too.
struct Retract<'a>(&'a Shared);

impl Drop for Retract<'_> {
    fn drop(&mut self) {
        let sh = self.0;
        let mut st = lock(&sh.state);
        st.job = None;
        st.wanted = 0;
        // A helper finishes its last chunk within microseconds (a chunk is 64 KiB of
        // cipher): wait on the condition variable, never spin.
        while sh.active.load(Ordering::Acquire) > 0 {
            st = sh.left.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        let panicked = std::mem::take(&mut st.panicked);
        drop(st);
        if panicked && !std::thread::panicking() {
            panic!("a sector engine helper panicked");
        }
    }
}

/// A helper thread: waits for a job it has not joined yet, runs it, and goes back to sleep.
fn helper(sh: &Shared) {
    let mut seen = 0u64;
    let mut st = lock(&sh.state);
    loop {
        if st.shutdown {
            return;
        }
        let job = match st.job {
            Some(job) if st.seq != seen && st.wanted > 0 => job,
            _ => {
                st = sh.work.wait(st).unwrap_or_else(|p| p.into_inner());
                continue;
            }
        };
        seen = st.seq;
        st.wanted -= 1;
        sh.active.fetch_add(1, Ordering::AcqRel);
        drop(st);
        let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job.0)).is_ok();
        st = lock(&sh.state);
        if !ok {
            st.panicked = true;
        }
        // Under the mutex: the caller checks `active` under it before it waits, so the
        // notification cannot be lost.
        if sh.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            sh.left.notify_all();
        }
    }
}

impl Drop for Helpers {
    fn drop(&mut self) {
        lock(&self.shared.state).shutdown = true;
        self.shared.work.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Runs the cipher over consecutive units of `buf` (at offset `at` of the request's buffer)
/// on this thread; unit `i` gets tweak `first + i`. Afterwards the stack the cipher ran on is
/// scrubbed: register spills of round keys must not outlive the request on a FUSE thread's
/// stack.
fn run_units(
    cipher: &XtsCipher,
    first: u128,
    buf: &mut [u8],
    at: usize,
    dir: Dir,
    src: Option<Source>,
) -> Result<(), CryptoError> {
    let r = run_units_inner(cipher, first, buf, at, dir, src);
    crate::crypto::secret::scrub_stack_bytes::<ENGINE_SCRUB_BYTES>();
    r
}

#[inline(never)]
fn run_units_inner(
    cipher: &XtsCipher,
    first: u128,
    buf: &mut [u8],
    at: usize,
    dir: Dir,
    src: Option<Source>,
) -> Result<(), CryptoError> {
    let size = cipher.unit_size();
    for (i, u) in buf.chunks_mut(size).enumerate() {
        let tweak = first.wrapping_add(i as u128);
        match dir {
            Dir::Encrypt => {
                if let Some(s) = &src {
                    s.copy_into(u, at + i * size);
                }
                cipher.encrypt_unit(tweak, u)?
            }
            Dir::Decrypt(Holes::Zero) => cipher.decrypt_unit_keeping_zero_blocks(tweak, u)?,
            Dir::Decrypt(Holes::Decrypt) => cipher.decrypt_unit(tweak, u)?,
        }
    }
    Ok(())
}

/// The deepest the sector loop writes into the stack below its caller, in bytes, in this
/// build, for every cipher backend the CPU has and every path of the loop (encryption with a copy, hole
/// keeping, ciphertext stealing, short tails): the stack below is painted with a pattern, the
/// loop runs, and the deepest byte that changed is found. Conservative: whatever else runs in
/// between (the painter's own calls, the allocator) counts too. For the test that pins
/// [`ENGINE_SCRUB_BYTES`] and for `examples/datapath_cost.rs`, which reports the figure of an
/// optimized build.
#[cfg(target_arch = "x86_64")]
#[doc(hidden)]
pub fn stack_depth() -> usize {
    const PAINT: usize = 64 * 1024;
    // Below the painter's red zone (128 bytes) and the calls its loop makes.
    const SKIP: usize = 512;

    #[inline(always)]
    fn sp() -> usize {
        let sp: usize;
        // SAFETY: reads the stack pointer register, nothing else.
        unsafe {
            std::arch::asm!("mov {}, rsp", out(reg) sp, options(nomem, nostack, preserves_flags))
        };
        sp
    }
    #[inline(never)]
    fn paint() -> usize {
        let top = sp();
        let mut a = top - PAINT;
        while a < top - SKIP {
            // SAFETY: unused stack of this thread below its stack pointer (every thread of
            // the daemon and of the tests has far more than 64 KiB); nothing lives there
            // between the calls.
            unsafe { (a as *mut u8).write_volatile(0xA5) };
            a += 1;
        }
        top
    }
    #[inline(never)]
    fn depth(top: usize) -> usize {
        let mut a = top - PAINT;
        while a < top - SKIP {
            // SAFETY: as in `paint`.
            if unsafe { (a as *const u8).read_volatile() } != 0xA5 {
                return top - a;
            }
            a += 1;
        }
        SKIP
    }

    let key: [u8; 64] = std::array::from_fn(|i| 0x42u8.wrapping_add(i as u8));
    let data = vec![0x5Au8; 4096];
    let mut worst = 0;
    for imp in crate::crypto::xts::Implementation::ALL {
        let Ok(c) = XtsCipher::with_implementation(&key, 4096, imp) else {
            continue;
        };
        for (dir, len) in [
            (Dir::Encrypt, 3 * 4096),
            (Dir::Encrypt, 4096 + 40),
            (Dir::Encrypt, 7),
            (Dir::Decrypt(Holes::Zero), 2 * 4096),
            (Dir::Decrypt(Holes::Decrypt), 4096 + 40),
            (Dir::Decrypt(Holes::Decrypt), 7),
        ] {
            let mut buf = vec![1u8; len];
            if len >= 32 {
                // A zero block inside a unit: the hole-keeping path's bookkeeping too.
                buf[16..32].fill(0);
            }
            let src = matches!(dir, Dir::Encrypt).then_some(Source { data: &data, at: 0 });
            let top = paint();
            let r = run_units_inner(&c, 9, &mut buf, 0, dir, src);
            worst = worst.max(depth(top));
            std::hint::black_box(r.is_ok());
        }
    }
    worst
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 64-byte XTS key with distinct halves.
    fn key(seed: u8) -> [u8; 64] {
        std::array::from_fn(|i| seed.wrapping_add(i as u8))
    }

    #[test]
    fn threads_default_and_explicit() {
        assert!(SectorEngine::new(0).unwrap().threads() >= 1);
        assert_eq!(SectorEngine::new(3).unwrap().threads(), 3);
    }

    #[test]
    fn encrypt_from_equals_copy_then_encrypt() {
        let c = XtsCipher::new(&key(7), 4096).unwrap();
        for threads in [1, 2, 3] {
            let e = SectorEngine::new(threads).unwrap();
            for (len, at, n) in [
                (4096usize, 0usize, 4096usize),
                (32, 3, 20),
                (256 << 10, 0, 256 << 10),
                ((256 << 10) + 8192, 4095, (256 << 10) + 1),
                (300 * 1024, 70_000, 100),
            ] {
                let data: Vec<u8> = (0..n).map(|i| (i * 31 + 5) as u8).collect();
                let mut want: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
                let mut got = want.clone();
                want[at..at + n].copy_from_slice(&data);
                e.encrypt(&c, 99, 5, &mut want).unwrap();
                e.encrypt_from(&c, 99, 5, &mut got, &data, at).unwrap();
                assert!(got == want, "threads {threads} len {len} at {at} n {n}");
            }
        }
    }

    /// Many requests from several threads at once: each finds the helpers free or taken, and
    /// every result is right (a helper joining a job twice, or late, would garble one).
    #[test]
    fn concurrent_requests_share_the_helpers_correctly() {
        let c = XtsCipher::new(&key(3), 4096).unwrap();
        let e = SectorEngine::new(3).unwrap();
        let plain: Vec<u8> = (0..(256 << 10)).map(|i| (i % 253) as u8).collect();
        let serial = SectorEngine::new(1).unwrap();
        let mut want = plain.clone();
        serial.encrypt(&c, 1, 0, &mut want).unwrap();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..20 {
                        let mut b = plain.clone();
                        e.encrypt(&c, 1, 0, &mut b).unwrap();
                        assert!(b == want);
                        e.decrypt(&c, 1, 0, &mut b, Holes::Zero).unwrap();
                        assert!(b == plain);
                    }
                });
            }
        });
    }

    /// The scrub after the sector loop covers what the loop leaves on the stack, in this
    /// build (CI runs it unoptimized, the deepest case; `datapath_cost stackdepth` prints the
    /// release figure), with at least 1 KiB to spare.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn xts_stack_depth_fits_the_scrub() {
        let worst = stack_depth();
        assert!(
            worst + 1024 <= ENGINE_SCRUB_BYTES,
            "the sector loop uses {worst} bytes of stack; ENGINE_SCRUB_BYTES = {} leaves less \
             than 1 KiB to spare",
            ENGINE_SCRUB_BYTES
        );
    }
}
