//! XTS-AES-256 on AES-NI (x86_64), in the shape of OpenSSL's `aesni_xts`.
//!
//! What makes it fast, with the ratio to `openssl speed -evp aes-256-xts` measured at each
//! step (one thread, 4 KiB units, same run, on the 2-vCPU AMD EPYC Zen 2 it was written on):
//!
//! * Eight blocks in flight: AESENC has a latency of 4 cycles but two can issue per cycle,
//!   so a block at a time would leave the AES units idle most of the time.
//! * The rounds are issued round by round across the eight blocks, one `asm!` block per
//!   round (see `round8!`): written with the intrinsics, LLVM reorders them block by block,
//!   which serialises each block's 14 rounds (0.6x with that order, 0.8x with this one).
//! * The eight tweak masks of the next batch are computed on the integer side while this
//!   batch's rounds run, then moved to vector registers (`movq` + `punpcklqdq`): doubling in
//!   SIMD registers costs 5-7 vector ops per mask that compete with AESENC (0.8x → 0.9x).
//!   Doubling by PCLMULQDQ (α^8 as a byte shift) is slower still: it shares a port with AES.
//! * The doubling itself is ADD/ADC in `asm!` ([`double`]): the compiler's 128-bit shift is
//!   SHLD, 6 ops with a throughput of one per 3 cycles on Zen (0.9x → 1.03x).
//! * The mask is folded into the last round key (AESENCLAST ends with `⊕ key`), and
//!   `T = AES-K2(tweak)` is computed in the same function as the unit, so a unit costs one
//!   call and no trip of a vector through memory (about 10% on 512-byte units).
//!
//! Every function with `#[target_feature(enable = "aes,...")]` is only reached through
//! [`Keys`], and a `Keys` exists only once [`Keys::new`] has seen the features on this CPU.

use core::arch::x86_64::*;

use zeroize::Zeroize;

use super::{BlockOps, BLOCK};
use crate::crypto::secret::{Plain, Secret};

/// AES-256 has 14 rounds: 15 round keys.
pub(super) const ROUNDS: usize = 14;

pub(super) type Schedule = [__m128i; ROUNDS + 1];

/// The three key schedules. Round keys are wiped on drop.
pub(super) struct Keys {
    /// K1, encryption.
    pub(super) enc: Schedule,
    /// K1, decryption (the "equivalent inverse cipher" schedule: AESIMC of the middle keys).
    pub(super) dec: Schedule,
    /// K2, encryption only: the tweak is always encrypted.
    pub(super) tweak: Schedule,
}

// SAFETY: `__m128i` is plain data (16 bytes, no interior pointers); the schedules are only
// read after construction, so sharing and sending them across threads is sound.
unsafe impl Send for Keys {}
// SAFETY: as above, read-only after construction.
unsafe impl Sync for Keys {}
// SAFETY: three arrays of `__m128i`: no pointers, and all-zero is a valid value.
unsafe impl Plain for Keys {}

impl Drop for Keys {
    fn drop(&mut self) {
        self.enc.zeroize();
        self.dec.zeroize();
        self.tweak.zeroize();
    }
}

impl Keys {
    /// The schedules for `k1`/`k2`, or `None` when this CPU lacks AES-NI (the caller then uses
    /// the portable implementation).
    ///
    /// Expanded in place in secret pages, so the round keys exist in one place only (moving
    /// a cipher moves the pointer, not the schedules) and that place is locked, kept out of
    /// core dumps and wiped on drop.
    pub(super) fn new(k1: &[u8; 32], k2: &[u8; 32]) -> Option<Secret<Keys>> {
        if !(is_x86_feature_detected!("aes") && is_x86_feature_detected!("sse2")) {
            return None;
        }
        let mut keys = Secret::<Keys>::zeroed();
        // SAFETY: AES-NI and SSE2 were just detected on this CPU.
        unsafe { keys.expand(k1, k2) };
        Some(keys)
    }

    /// Fills the three schedules in place (the VAES backend embeds a `Keys` and calls this
    /// on its own secret pages).
    ///
    /// # Safety
    /// The CPU has AES-NI and SSE2.
    #[target_feature(enable = "aes,sse2")]
    pub(super) unsafe fn expand(&mut self, k1: &[u8; 32], k2: &[u8; 32]) {
        expand_256(k1, &mut self.enc);
        expand_256(k2, &mut self.tweak);
        self.dec[0] = self.enc[ROUNDS];
        for i in 1..ROUNDS {
            self.dec[i] = _mm_aesimc_si128(self.enc[ROUNDS - i]);
        }
        self.dec[ROUNDS] = self.enc[0];
    }
}

impl BlockOps for Keys {
    fn tweak(&self, tweak: u128) -> u128 {
        // SAFETY: `Keys` exists only on a CPU with AES-NI and SSE2 (see `Keys::new`).
        unsafe { from_m128(encrypt_m128(&self.tweak, to_m128(tweak))) }
    }

    fn encrypt_blocks(&self, tweak: u128, data: &mut [u8]) -> u128 {
        // SAFETY: CPU features as above; `xts_blocks` only touches `data`'s whole blocks.
        unsafe { xts_blocks::<true>(&self.tweak, &self.enc, tweak, data) }
    }

    fn decrypt_blocks(&self, tweak: u128, data: &mut [u8]) -> u128 {
        // SAFETY: as in `encrypt_blocks`.
        unsafe { xts_blocks::<false>(&self.tweak, &self.dec, tweak, data) }
    }

    fn encrypt_block(&self, block: &mut [u8; BLOCK]) {
        // SAFETY: CPU features as above.
        unsafe { encrypt1(&self.enc, block) }
    }

    fn decrypt_block(&self, block: &mut [u8; BLOCK]) {
        // SAFETY: CPU features as above.
        unsafe { decrypt1(&self.dec, block) }
    }
}

// The helpers below are `unsafe fn`s with `#[target_feature]` (rather than safe ones, which
// need Rust 1.86) and call the intrinsics directly: in edition 2021 the body of an `unsafe fn`
// is an unsafe context. Their common contract, the `# Safety` of each: the CPU has AES-NI and
// SSE2, which holds whenever a `Keys` exists.

/// One step of the AES-256 key schedule (Intel's AES-NI white paper): `prev` is the round
/// key two back, `assist` the broadcast word of the AESKEYGENASSIST of the previous key.
///
/// # Safety
/// SSE2 (x86_64 baseline).
#[inline]
#[target_feature(enable = "sse2")]
unsafe fn expand_step(prev: __m128i, assist: __m128i) -> __m128i {
    let mut k = prev;
    let mut s = _mm_slli_si128::<4>(k);
    k = _mm_xor_si128(k, s);
    s = _mm_slli_si128::<4>(s);
    k = _mm_xor_si128(k, s);
    s = _mm_slli_si128::<4>(s);
    k = _mm_xor_si128(k, s);
    _mm_xor_si128(k, assist)
}

/// AES-256 encryption key schedule of `key`, written into `rk`.
///
/// # Safety
/// The CPU has AES-NI and SSE2.
#[target_feature(enable = "aes,sse2")]
unsafe fn expand_256(key: &[u8; 32], rk: &mut Schedule) {
    // `key` is 32 readable bytes; unaligned loads.
    let mut a = _mm_loadu_si128(key.as_ptr().cast());
    let mut b = _mm_loadu_si128(key.as_ptr().add(16).cast());
    rk[0] = a;
    rk[1] = b;
    // AESKEYGENASSIST takes its round constant as an immediate, hence the macro.
    macro_rules! pair {
        ($i:expr, $rcon:expr) => {
            a = expand_step(
                a,
                _mm_shuffle_epi32::<0xff>(_mm_aeskeygenassist_si128::<$rcon>(b)),
            );
            rk[$i] = a;
            b = expand_step(
                b,
                _mm_shuffle_epi32::<0xaa>(_mm_aeskeygenassist_si128::<0>(a)),
            );
            rk[$i + 1] = b;
        };
    }
    pair!(2, 0x01);
    pair!(4, 0x02);
    pair!(6, 0x04);
    pair!(8, 0x08);
    pair!(10, 0x10);
    pair!(12, 0x20);
    // The last step makes only the even key.
    rk[14] = expand_step(
        a,
        _mm_shuffle_epi32::<0xff>(_mm_aeskeygenassist_si128::<0x40>(b)),
    );
}

/// Multiplies a tweak by α in GF(2^128): shift each 64-bit half left by one, then put the
/// carry out of bit 63 into bit 64 and fold the carry out of bit 127 back as 0x87. The carries
/// are the sign bits of 32-bit lanes 1 and 3 (SRAI), moved into lanes 2 and 0 (shuffle 0x13).
///
/// # Safety
/// SSE2 (x86_64 baseline).
#[inline(always)]
unsafe fn mul_alpha(t: __m128i) -> __m128i {
    let carries = _mm_shuffle_epi32::<0x13>(_mm_srai_epi32::<31>(t));
    let poly = _mm_set_epi32(0, 1, 0, 0x87);
    _mm_xor_si128(_mm_add_epi64(t, t), _mm_and_si128(carries, poly))
}

/// Multiplies the mask `hi:lo` by α (the scalar twin of [`mul_alpha`]).
///
/// In `asm!` because the plain Rust form compiles to SHLD for the 128-bit shift, which is a
/// 6-op, 3-cycle-throughput instruction on AMD Zen; ADD/ADC shifts the pair in two 1-op
/// instructions.
#[inline(always)]
fn double(lo: u64, hi: u64) -> (u64, u64) {
    let (mut lo, mut hi, mut fold) = (lo, hi, hi);
    // SAFETY: register-only arithmetic; no memory, no stack.
    unsafe {
        core::arch::asm!(
            "sar {fold}, 63",
            "and {fold:e}, 0x87",
            "add {lo}, {lo}",
            "adc {hi}, {hi}",
            "xor {lo}, {fold}",
            lo = inout(reg) lo,
            hi = inout(reg) hi,
            fold = inout(reg) fold,
            options(pure, nomem, nostack),
        );
    }
    let _ = fold;
    (lo, hi)
}

/// Multiplies the mask `hi:lo` by α^i (1 <= i <= 7) directly: shift the 128 bits left by `i`
/// and fold the `i` bits shifted out back in, multiplied (carry-less) by 0x87. Unlike `i`
/// calls of [`double`] there is no dependency chain, so the first batch of a unit does not
/// wait for one.
#[inline(always)]
pub(super) fn times_alpha_pow(lo: u64, hi: u64, i: u32) -> (u64, u64) {
    debug_assert!((1..8).contains(&i));
    let h = hi >> (64 - i);
    let fold = h ^ (h << 1) ^ (h << 2) ^ (h << 7);
    ((lo << i) ^ fold, (hi << i) | (lo >> (64 - i)))
}

/// `t` as a vector register, without a trip through memory (two 8-byte stores read back as
/// one 16-byte load cannot be store-forwarded, a stall on every call).
///
/// # Safety
/// SSE2 (x86_64 baseline).
#[inline(always)]
unsafe fn to_m128(t: u128) -> __m128i {
    _mm_set_epi64x((t >> 64) as i64, t as i64)
}

/// # Safety
/// SSE2 (x86_64 baseline).
#[inline(always)]
unsafe fn from_m128(v: __m128i) -> u128 {
    let mut b = [0u8; 16];
    _mm_storeu_si128(b.as_mut_ptr().cast(), v);
    u128::from_le_bytes(b)
}

/// One AES round, forward or inverse (a macro, not a function: the intrinsic must be
/// expanded inside the `#[target_feature(enable = "aes")]` function to be inlined).
macro_rules! round {
    ($enc:expr, $b:expr, $k:expr) => {
        if $enc {
            _mm_aesenc_si128($b, $k)
        } else {
            _mm_aesdec_si128($b, $k)
        }
    };
}

/// The last AES round, forward or inverse.
macro_rules! last_round {
    ($enc:expr, $b:expr, $k:expr) => {
        if $enc {
            _mm_aesenclast_si128($b, $k)
        } else {
            _mm_aesdeclast_si128($b, $k)
        }
    };
}

/// One AES round over all eight blocks of a batch, as one `asm!` block.
///
/// Written with the intrinsics, LLVM reorders the rounds block by block (all 14 rounds of
/// block 0, then of block 1, ...), turning eight independent streams into eight serial
/// dependency chains and losing about a third of the throughput. An `asm!` block per round
/// pins the order that keeps eight AESENCs in flight; the operands stay in registers. The
/// assembler needs no target feature; the caller is still `#[target_feature(enable = "aes")]`
/// and only runs on a CPU that has it.
macro_rules! round8 {
    ($op:literal, $key:expr, $b:ident) => {
        core::arch::asm!(
            "movdqu {k}, xmmword ptr [{kp}]",
            concat!($op, " {0}, {k}"),
            concat!($op, " {1}, {k}"),
            concat!($op, " {2}, {k}"),
            concat!($op, " {3}, {k}"),
            concat!($op, " {4}, {k}"),
            concat!($op, " {5}, {k}"),
            concat!($op, " {6}, {k}"),
            concat!($op, " {7}, {k}"),
            inout(xmm_reg) $b[0],
            inout(xmm_reg) $b[1],
            inout(xmm_reg) $b[2],
            inout(xmm_reg) $b[3],
            inout(xmm_reg) $b[4],
            inout(xmm_reg) $b[5],
            inout(xmm_reg) $b[6],
            inout(xmm_reg) $b[7],
            kp = in(reg) $key,
            k = out(xmm_reg) _,
            options(pure, readonly, nostack, preserves_flags),
        )
    };
}

/// XTS over the whole blocks of `data` with schedule `rk` (encryption schedule when `ENC`,
/// decryption schedule otherwise) for the unit with sequence number `tweak`, `tk` being K2's
/// schedule; returns the mask after the last block. A partial trailing block (if any) is left
/// alone.
///
/// # Safety
/// The CPU has AES-NI and SSE2.
#[target_feature(enable = "aes,sse2")]
unsafe fn xts_blocks<const ENC: bool>(
    tk: &Schedule,
    rk: &Schedule,
    tweak: u128,
    data: &mut [u8],
) -> u128 {
    // T = AES-K2(tweak), in line: this serial chain of 15 rounds starts every unit, and here
    // it needs no call and no trip through memory.
    let mut y = _mm_xor_si128(to_m128(tweak), tk[0]);
    for k in &tk[1..ROUNDS] {
        y = _mm_aesenc_si128(y, *k);
    }
    let t = from_m128(_mm_aesenclast_si128(y, tk[ROUNDS]));
    let mut chunks = data.chunks_exact_mut(8 * BLOCK);
    // The masks are generated in general-purpose registers and moved to vector registers
    // (`movq` + `punpcklqdq`): the integer ALUs are idle during the rounds, while the same
    // doublings in SIMD registers (5-7 vector ops each) compete with AESENC for the vector
    // pipes. The masks of the next batch are computed while this one's rounds run (software
    // pipelining, as OpenSSL does). The first batch's come from T without a dependency
    // chain, so the unit's first rounds do not wait for eight doublings.
    let (mut lo, mut hi) = (t as u64, (t >> 64) as u64);
    let mut tw = [_mm_setzero_si128(); 8];
    tw[0] = _mm_set_epi64x(hi as i64, lo as i64);
    let mut last = (lo, hi);
    for (i, m) in tw.iter_mut().enumerate().skip(1) {
        last = times_alpha_pow(lo, hi, i as u32);
        *m = _mm_set_epi64x(last.1 as i64, last.0 as i64);
    }
    (lo, hi) = double(last.0, last.1);
    for chunk in &mut chunks {
        let p = chunk.as_mut_ptr();
        // Whitening: block ⊕ mask ⊕ round key 0. The chunk is 128 bytes; block i is bytes
        // 16i..16i+16 (unaligned loads and stores).
        let mut b = [_mm_setzero_si128(); 8];
        for i in 0..8 {
            let x = _mm_loadu_si128(p.add(BLOCK * i).cast());
            b[i] = _mm_xor_si128(x, _mm_xor_si128(tw[i], rk[0]));
        }
        for k in &rk[1..ROUNDS] {
            // The key is loaded inside the asm (from its place in the schedule), so the
            // compiler does not copy the whole schedule to the stack on every call.
            let k: *const __m128i = k;
            if ENC {
                round8!("aesenc", k, b);
            } else {
                round8!("aesdec", k, b);
            }
        }
        let mut next = [_mm_setzero_si128(); 8];
        for m in next.iter_mut() {
            *m = _mm_set_epi64x(hi as i64, lo as i64);
            (lo, hi) = double(lo, hi);
        }
        for i in 0..8 {
            // AESENCLAST/AESDECLAST end with `⊕ round key`, so `⊕ mask` folds into the key.
            let y = last_round!(ENC, b[i], _mm_xor_si128(rk[ROUNDS], tw[i]));
            _mm_storeu_si128(p.add(BLOCK * i).cast(), y);
        }
        tw = next;
    }
    let mut t = tw[0];
    // Fewer than eight blocks left: only in stealing tails and short units.
    for blk in chunks.into_remainder().chunks_exact_mut(BLOCK) {
        let p = blk.as_mut_ptr();
        let mut y = _mm_xor_si128(_mm_loadu_si128(p.cast()), _mm_xor_si128(t, rk[0]));
        for k in &rk[1..ROUNDS] {
            y = round!(ENC, y, *k);
        }
        y = last_round!(ENC, y, _mm_xor_si128(rk[ROUNDS], t));
        _mm_storeu_si128(p.cast(), y);
        t = mul_alpha(t);
    }
    from_m128(t)
}

/// One raw AES-256 block encryption of a register.
///
/// # Safety
/// The CPU has AES-NI and SSE2.
#[target_feature(enable = "aes,sse2")]
unsafe fn encrypt_m128(rk: &Schedule, block: __m128i) -> __m128i {
    let mut y = _mm_xor_si128(block, rk[0]);
    for k in &rk[1..ROUNDS] {
        y = _mm_aesenc_si128(y, *k);
    }
    _mm_aesenclast_si128(y, rk[ROUNDS])
}

/// One raw AES-256 block encryption.
///
/// # Safety
/// The CPU has AES-NI and SSE2.
#[target_feature(enable = "aes,sse2")]
unsafe fn encrypt1(rk: &Schedule, block: &mut [u8; BLOCK]) {
    let mut y = _mm_xor_si128(_mm_loadu_si128(block.as_ptr().cast()), rk[0]);
    for k in &rk[1..ROUNDS] {
        y = _mm_aesenc_si128(y, *k);
    }
    y = _mm_aesenclast_si128(y, rk[ROUNDS]);
    _mm_storeu_si128(block.as_mut_ptr().cast(), y);
}

/// One raw AES-256 block decryption (with the decryption schedule).
///
/// # Safety
/// The CPU has AES-NI and SSE2.
#[target_feature(enable = "aes,sse2")]
unsafe fn decrypt1(rk: &Schedule, block: &mut [u8; BLOCK]) {
    let mut y = _mm_xor_si128(_mm_loadu_si128(block.as_ptr().cast()), rk[0]);
    for k in &rk[1..ROUNDS] {
        y = _mm_aesdec_si128(y, *k);
    }
    y = _mm_aesdeclast_si128(y, rk[ROUNDS]);
    _mm_storeu_si128(block.as_mut_ptr().cast(), y);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// FIPS-197 Appendix C.3: AES-256, key 00..1f, plaintext 00112233..ff.
    #[test]
    fn fips197_aes256() {
        let mut key = [0u8; 32];
        for (i, b) in key.iter_mut().enumerate() {
            *b = i as u8;
        }
        let Some(keys) = Keys::new(&key, &[0xff; 32]) else {
            eprintln!("NOTE: no AES-NI on this CPU; skipping");
            return;
        };
        let pt: [u8; 16] = core::array::from_fn(|i| (i as u8) * 0x11);
        let ct = [
            0x8e, 0xa2, 0xb7, 0xca, 0x51, 0x67, 0x45, 0xbf, 0xea, 0xfc, 0x49, 0x90, 0x4b, 0x49,
            0x60, 0x89,
        ];
        let mut b = pt;
        keys.encrypt_block(&mut b);
        assert_eq!(b, ct);
        keys.decrypt_block(&mut b);
        assert_eq!(b, pt);
    }

    #[test]
    fn simd_mul_alpha_matches_scalar() {
        for v in [
            0u128,
            1,
            1 << 31,
            1 << 63,
            1 << 64,
            1 << 127,
            u128::MAX,
            0x8000_0001 << 95,
        ] {
            // SAFETY: SSE2 is part of the x86_64 baseline.
            let simd = unsafe { from_m128(mul_alpha(to_m128(v))) };
            assert_eq!(simd, super::super::mul_alpha(v), "{v:#x}");
        }
    }
}
