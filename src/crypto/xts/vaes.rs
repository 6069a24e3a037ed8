//! XTS-AES-256 on VAES + AVX-512 (x86_64): four blocks per instruction in 512-bit registers,
//! in the shape of Linux's `aes-xts-avx-x86_64.S` (the `avx10_512` variant, Eric Biggers).
//!
//! * 32 blocks per iteration: eight zmm vectors of four blocks in flight through the rounds,
//!   so the AES unit always has an independent VAESENC to issue (its latency is several
//!   cycles). Linux keeps four vectors in flight; eight measured 1.03x four here (`cmkfs bench
//!   sectors`, interleaved runs, docs/PERFORMANCE.md "Session 10"). As in `aesni.rs`, each
//!   round over the vectors is one `asm!` block, which pins that order (LLVM would otherwise
//!   schedule the rounds vector by vector); the round key is a memory operand of the
//!   instruction, broadcast to four lanes once, at key setup.
//! * Tweak masks: vector `j` holds the masks of blocks `4j..4j+3` of the iteration, and
//!   steps to the next iteration by one multiplication by α^32 per 128-bit lane: a 128-bit
//!   shift by 32 made of two 64-bit shifts and a qword move, the 32 bits shifted out folded
//!   back by one carry-less multiplication by 0x87 (VPCLMULQDQ), three inputs XORed by one
//!   VPTERNLOGQ. Five instructions per four masks, none of them an AES instruction.
//! * Whitening is one VPTERNLOGQ (block ⊕ mask ⊕ round key 0), and the mask is folded into
//!   the last round key as in `aesni.rs`.
//! * The last 1..31 blocks of a unit (file tails) run as one more iteration with masked
//!   loads and stores, using the masks already computed: no scalar tail loop.
//! * Hole keeping ([`BlockOps::decrypt_blocks_keeping_zero_blocks`]) is fused into
//!   decryption: the ciphertext is already in registers, so VPTESTNMQ finds its all-zero
//!   64-bit words, and only when one of the iteration's blocks has any (real ciphertext: never
//!   in practice) are exact block masks computed and the plaintext of the all-zero blocks
//!   left unstored (in place, so those blocks stay the zeros they were). No separate pass
//!   over the unit.
//!
//! `T = AES-K2(tweak)` and the single-block operations (ciphertext stealing, v1 short tails)
//! run on the AES-NI schedules this backend embeds. Every `#[target_feature]` function is only
//! reached through [`Keys`], which exists only once [`Keys::new`] has seen VAES, VPCLMULQDQ
//! and AVX-512F (and AES-NI) on this CPU.

use core::arch::x86_64::*;

use zeroize::Zeroize;

use super::aesni::{self, ROUNDS};
use super::{BlockOps, BLOCK};
use crate::crypto::secret::{Plain, Secret};

/// Blocks per zmm vector.
const LANES: usize = 4;
/// Vectors in flight per iteration.
const VECS: usize = 8;
/// Blocks per iteration.
const ITER_BLOCKS: usize = LANES * VECS;
/// Bytes per vector.
const VEC_BYTES: usize = LANES * BLOCK;

/// A round key schedule with each round key broadcast to the four lanes of a vector.
type Wide = [__m512i; ROUNDS + 1];

/// The AES-NI schedules (tweak, single blocks) and K1's schedules broadcast for VAES. Round
/// keys are wiped on drop.
pub(super) struct Keys {
    ni: aesni::Keys,
    /// K1, encryption, broadcast.
    enc: Wide,
    /// K1, decryption (equivalent inverse cipher), broadcast.
    dec: Wide,
}

// SAFETY: vectors are plain data; the schedules are read-only after construction.
unsafe impl Send for Keys {}
// SAFETY: as above.
unsafe impl Sync for Keys {}
// SAFETY: arrays of SIMD vectors and an `aesni::Keys` (itself `Plain`): no pointers, and
// all-zero is a valid value.
unsafe impl Plain for Keys {}

impl Drop for Keys {
    fn drop(&mut self) {
        for w in [&mut self.enc, &mut self.dec] {
            // SAFETY: a `Wide` is `size_of::<Wide>()` initialized bytes, any value valid.
            let bytes = unsafe {
                core::slice::from_raw_parts_mut(
                    w.as_mut_ptr().cast::<u8>(),
                    core::mem::size_of::<Wide>(),
                )
            };
            bytes.zeroize();
        }
        // `ni` wipes itself.
    }
}

/// True when this CPU (and OS: the detection checks the saved AVX-512 state) has what
/// this backend needs.
pub(super) fn available() -> bool {
    is_x86_feature_detected!("aes")
        && is_x86_feature_detected!("sse2")
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("vaes")
        && is_x86_feature_detected!("vpclmulqdq")
}

impl Keys {
    /// The schedules for `k1`/`k2`, or `None` when this CPU lacks VAES, VPCLMULQDQ,
    /// AVX-512F or AES-NI. Expanded in place in secret pages, as `aesni::Keys::new` does.
    pub(super) fn new(k1: &[u8; 32], k2: &[u8; 32]) -> Option<Secret<Keys>> {
        if !available() {
            return None;
        }
        let mut keys = Secret::<Keys>::zeroed();
        // SAFETY: the features were just detected.
        unsafe { keys.expand(k1, k2) };
        Some(keys)
    }

    /// # Safety
    /// The CPU has AES-NI and AVX-512F.
    #[target_feature(enable = "aes,sse2,avx512f")]
    unsafe fn expand(&mut self, k1: &[u8; 32], k2: &[u8; 32]) {
        self.ni.expand(k1, k2);
        for i in 0..=ROUNDS {
            self.enc[i] = _mm512_broadcast_i32x4(self.ni.enc[i]);
            self.dec[i] = _mm512_broadcast_i32x4(self.ni.dec[i]);
        }
    }
}

impl BlockOps for Keys {
    fn tweak(&self, tweak: u128) -> u128 {
        self.ni.tweak(tweak)
    }

    fn encrypt_blocks(&self, tweak: u128, data: &mut [u8]) -> u128 {
        // SAFETY: `Keys` exists only on a CPU with the features (see `Keys::new`); `xts`
        // only touches `data`'s whole blocks.
        unsafe { xts::<true, false>(self, tweak, data) }
    }

    fn decrypt_blocks(&self, tweak: u128, data: &mut [u8]) -> u128 {
        // SAFETY: as in `encrypt_blocks`.
        unsafe { xts::<false, false>(self, tweak, data) }
    }

    fn decrypt_blocks_keeping_zero_blocks(&self, tweak: u128, data: &mut [u8]) {
        // SAFETY: as in `encrypt_blocks`.
        unsafe { xts::<false, true>(self, tweak, data) };
    }

    fn encrypt_block(&self, block: &mut [u8; BLOCK]) {
        self.ni.encrypt_block(block)
    }

    fn decrypt_block(&self, block: &mut [u8; BLOCK]) {
        self.ni.decrypt_block(block)
    }
}

/// Multiplies each 128-bit lane of `t` by α^K (`R` = 64 - K, as const generics cannot
/// compute it): shift the lane left by K, and fold the K bits shifted out back in,
/// multiplied (carry-less) by 0x87, the low terms of the IEEE 1619 polynomial. `poly` holds
/// 0x87 in every 64-bit word. Valid for 1 <= K <= 57 (the folded product has K + 7 bits and
/// must fit in the low word).
///
/// # Safety
/// The CPU has AVX-512F and VPCLMULQDQ.
#[inline(always)]
unsafe fn mul_alpha_pow<const K: u32, const R: u32>(t: __m512i, poly: __m512i) -> __m512i {
    debug_assert!(K + R == 64 && (1..=57).contains(&K));
    // Per 64-bit word: its top K bits, moved to the bottom.
    let out = _mm512_srli_epi64::<R>(t);
    // The low word's overflow goes into the high word: (0, lo >> R) per lane.
    let carry = _mm512_unpacklo_epi64(_mm512_setzero_si512(), out);
    // The high word's overflow (bits 128..128+K) times 0x87 goes into the low word.
    let fold = _mm512_clmulepi64_epi128::<0x01>(out, poly);
    _mm512_ternarylogic_epi64::<0x96>(_mm512_slli_epi64::<K>(t), carry, fold)
}

/// One AES round over the vectors of an iteration, as one `asm!` block (see the module
/// doc); the round key is read from its place in the broadcast schedule.
macro_rules! round_all {
    ($op:literal, $key:expr, $b:ident, [$($i:literal),*]) => {
        core::arch::asm!(
            $(concat!($op, " {", $i, "}, {", $i, "}, zmmword ptr [{kp}]"),)*
            $(inout(zmm_reg) $b[$i],)*
            kp = in(reg) $key,
            options(pure, readonly, nostack, preserves_flags),
        )
    };
}

/// XTS over the vectors `b` (loaded blocks in, result out) with masks `tw` and the
/// broadcast schedule `rk` (encryption when `ENC`, decryption otherwise).
///
/// # Safety
/// The CPU has VAES and AVX-512F.
#[inline]
#[target_feature(enable = "avx512f,vaes")]
unsafe fn crypt_all<const ENC: bool>(b: &mut [__m512i; VECS], tw: &[__m512i; VECS], rk: &Wide) {
    for j in 0..VECS {
        b[j] = _mm512_ternarylogic_epi64::<0x96>(b[j], tw[j], rk[0]);
    }
    for k in &rk[1..ROUNDS] {
        let k: *const __m512i = k;
        if ENC {
            round_all!("vaesenc", k, b, [0, 1, 2, 3, 4, 5, 6, 7]);
        } else {
            round_all!("vaesdec", k, b, [0, 1, 2, 3, 4, 5, 6, 7]);
        }
    }
    for j in 0..VECS {
        // The last round ends with `⊕ round key`: `⊕ mask` folds into it.
        let last = _mm512_xor_si512(rk[ROUNDS], tw[j]);
        b[j] = if ENC {
            _mm512_aesenclast_epi128(b[j], last)
        } else {
            _mm512_aesdeclast_epi128(b[j], last)
        };
    }
}

/// For hole keeping: which 64-bit words to store of each loaded vector `x`, of those in
/// `loaded`, leaving out the words of every all-zero 16-byte block. `None` (store all of
/// `loaded`) unless some loaded 64-bit word is zero, which real ciphertext never has.
///
/// # Safety
/// The CPU has AVX-512F.
#[inline(always)]
unsafe fn kept_words(x: &[__m512i; VECS], loaded: [u8; VECS]) -> Option<[u8; VECS]> {
    let mut zero = [0u8; VECS];
    let mut any = 0u8;
    for j in 0..VECS {
        zero[j] = _mm512_testn_epi64_mask(x[j], x[j]) & loaded[j];
        any |= zero[j];
    }
    if any == 0 {
        return None;
    }
    Some(core::array::from_fn(|j| {
        // A block is zero when both of its words are: bits 2i and 2i+1.
        let both = zero[j] & (zero[j] >> 1) & 0x55;
        loaded[j] & !(both | (both << 1))
    }))
}

/// XTS over the whole blocks of `data` (a trailing partial block is left alone) for the unit
/// with sequence number `tweak`; returns the mask after the last block. With `HOLES`
/// (decryption only), every all-zero 16-byte block of ciphertext is left as it is (zeros).
///
/// # Safety
/// The CPU has AES-NI, SSE2, AVX-512F, VAES and VPCLMULQDQ.
#[target_feature(enable = "aes,sse2,avx512f,vaes,vpclmulqdq")]
unsafe fn xts<const ENC: bool, const HOLES: bool>(
    keys: &Keys,
    tweak: u128,
    data: &mut [u8],
) -> u128 {
    debug_assert!(ENC || !HOLES || data.len().is_multiple_of(BLOCK));
    let rk = if ENC { &keys.enc } else { &keys.dec };
    let t = keys.ni.tweak(tweak);
    // The first four masks from T without a dependency chain; the next three vectors from
    // the first by α^4, α^8, α^12, the others from those four by α^16.
    let (lo, hi) = (t as u64, (t >> 64) as u64);
    let (l1, h1) = aesni::times_alpha_pow(lo, hi, 1);
    let (l2, h2) = aesni::times_alpha_pow(lo, hi, 2);
    let (l3, h3) = aesni::times_alpha_pow(lo, hi, 3);
    let poly = _mm512_set1_epi64(0x87);
    let tw0 = _mm512_set_epi64(
        h3 as i64, l3 as i64, h2 as i64, l2 as i64, h1 as i64, l1 as i64, hi as i64, lo as i64,
    );
    let mut tw = [tw0; VECS];
    tw[1] = mul_alpha_pow::<4, 60>(tw0, poly);
    tw[2] = mul_alpha_pow::<8, 56>(tw0, poly);
    tw[3] = mul_alpha_pow::<12, 52>(tw0, poly);
    for j in LANES..VECS {
        tw[j] = mul_alpha_pow::<16, 48>(tw[j - LANES], poly);
    }

    let blocks = data.len() / BLOCK;
    let full = blocks / ITER_BLOCKS;
    let p = data.as_mut_ptr();
    for it in 0..full {
        // In bounds: iteration `it` covers bytes 512·it .. 512·(it+1) <= 16·blocks.
        let q = p.add(it * ITER_BLOCKS * BLOCK);
        let mut b: [__m512i; VECS] =
            core::array::from_fn(|j| _mm512_loadu_si512(q.add(j * VEC_BYTES).cast()));
        let kept = if HOLES {
            kept_words(&b, [0xff; VECS])
        } else {
            None
        };
        crypt_all::<ENC>(&mut b, &tw, rk);
        match kept {
            None => {
                for (j, v) in b.iter().enumerate() {
                    _mm512_storeu_si512(q.add(j * VEC_BYTES).cast(), *v);
                }
            }
            Some(kept) => {
                for (j, v) in b.iter().enumerate() {
                    _mm512_mask_storeu_epi64(q.add(j * VEC_BYTES).cast(), kept[j], *v);
                }
            }
        }
        for m in tw.iter_mut() {
            *m = mul_alpha_pow::<32, 32>(*m, poly);
        }
    }

    let rem = blocks - full * ITER_BLOCKS;
    if rem > 0 {
        // One more iteration over the last 1..31 blocks with masked loads and stores: the
        // words of vector j that exist. A vector past the end is neither loaded nor stored
        // (its pointer is only formed with `wrapping_add`).
        let q = p.add(full * ITER_BLOCKS * BLOCK);
        let loaded: [u8; VECS] = core::array::from_fn(|j| {
            let n = rem.saturating_sub(j * LANES).min(LANES);
            ((1u32 << (2 * n)) - 1) as u8
        });
        let mut b = [_mm512_setzero_si512(); VECS];
        for j in 0..VECS {
            if loaded[j] != 0 {
                b[j] = _mm512_maskz_loadu_epi64(loaded[j], q.wrapping_add(j * VEC_BYTES).cast());
            }
        }
        let kept = if HOLES {
            kept_words(&b, loaded).unwrap_or(loaded)
        } else {
            loaded
        };
        crypt_all::<ENC>(&mut b, &tw, rk);
        for j in 0..VECS {
            if loaded[j] != 0 {
                _mm512_mask_storeu_epi64(q.wrapping_add(j * VEC_BYTES).cast(), kept[j], b[j]);
            }
        }
    }
    // The mask of block `rem` of the last vectors: lane rem % 4 of vector rem / 4.
    let mut lanes = [0u8; VEC_BYTES];
    _mm512_storeu_si512(lanes.as_mut_ptr().cast(), tw[rem / LANES]);
    let i = rem % LANES * BLOCK;
    let mut after = [0u8; BLOCK];
    after.copy_from_slice(&lanes[i..i + BLOCK]);
    lanes.zeroize();
    clear_vector_registers();
    u128::from_le_bytes(after)
}

/// Zeroes every vector register (masks, plaintext, the round keys held in registers), as
/// the last step of a unit: the next user of these registers may be any code. VZEROALL
/// clears zmm0-15; zmm16-31 are cleared one by one. About twenty instructions per unit.
///
/// # Safety
/// The CPU has AVX-512F.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn clear_vector_registers() {
    core::arch::asm!(
        "vzeroall",
        "vpxord zmm16, zmm16, zmm16",
        "vpxord zmm17, zmm17, zmm17",
        "vpxord zmm18, zmm18, zmm18",
        "vpxord zmm19, zmm19, zmm19",
        "vpxord zmm20, zmm20, zmm20",
        "vpxord zmm21, zmm21, zmm21",
        "vpxord zmm22, zmm22, zmm22",
        "vpxord zmm23, zmm23, zmm23",
        "vpxord zmm24, zmm24, zmm24",
        "vpxord zmm25, zmm25, zmm25",
        "vpxord zmm26, zmm26, zmm26",
        "vpxord zmm27, zmm27, zmm27",
        "vpxord zmm28, zmm28, zmm28",
        "vpxord zmm29, zmm29, zmm29",
        "vpxord zmm30, zmm30, zmm30",
        "vpxord zmm31, zmm31, zmm31",
        out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _,
        out("zmm4") _, out("zmm5") _, out("zmm6") _, out("zmm7") _,
        out("zmm8") _, out("zmm9") _, out("zmm10") _, out("zmm11") _,
        out("zmm12") _, out("zmm13") _, out("zmm14") _, out("zmm15") _,
        out("zmm16") _, out("zmm17") _, out("zmm18") _, out("zmm19") _,
        out("zmm20") _, out("zmm21") _, out("zmm22") _, out("zmm23") _,
        out("zmm24") _, out("zmm25") _, out("zmm26") _, out("zmm27") _,
        out("zmm28") _, out("zmm29") _, out("zmm30") _, out("zmm31") _,
        options(nomem, nostack, preserves_flags),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// α^K per lane equals K scalar doublings, for the K this file uses, on values whose
    /// top bits exercise the fold.
    #[test]
    fn mul_alpha_pow_matches_scalar() {
        if !available() {
            eprintln!("NOTE: no VAES/AVX-512 on this CPU; skipping");
            return;
        }
        #[target_feature(enable = "avx512f,vpclmulqdq")]
        unsafe fn lanes<const K: u32, const R: u32>(v: [u128; 4]) -> [u128; 4] {
            let poly = _mm512_set1_epi64(0x87);
            let t = _mm512_loadu_si512(v.as_ptr().cast());
            let mut out = [0u128; 4];
            _mm512_storeu_si512(out.as_mut_ptr().cast(), mul_alpha_pow::<K, R>(t, poly));
            out
        }
        let vals = [0u128, 1, u128::MAX, 1 << 127, 0xffff << 112, 0x8001 << 63];
        for w in vals
            .windows(4)
            .chain([[0x1234u128 << 100, 7, 1 << 64, u128::MAX >> 1].as_slice()])
        {
            let v: [u128; 4] = w.try_into().unwrap();
            let pow = |k: u32| {
                v.map(|mut x| {
                    for _ in 0..k {
                        x = super::super::mul_alpha(x);
                    }
                    x
                })
            };
            // SAFETY: the features were checked above.
            unsafe {
                assert_eq!(lanes::<4, 60>(v), pow(4));
                assert_eq!(lanes::<8, 56>(v), pow(8));
                assert_eq!(lanes::<12, 52>(v), pow(12));
                assert_eq!(lanes::<16, 48>(v), pow(16));
                assert_eq!(lanes::<32, 32>(v), pow(32));
            }
        }
    }
}
