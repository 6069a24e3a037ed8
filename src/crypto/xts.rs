//! XTS-AES-256 sector cipher (IEEE 1619-2018 / NIST SP 800-38E), in place, one data unit per
//! call.
//!
//! * Key: 64 bytes, `K1 || K2` (K1 encrypts data, K2 encrypts the tweak); equal halves are
//!   refused, as IEEE 1619-2018 §5.1, OpenSSL and aws-lc do.
//! * Data unit: a power of two in 512..=65536 bytes (4096 in cmkfs), fixed per cipher.
//! * Tweak: the 128-bit data unit sequence number, encoded little-endian
//!   ([`u128::to_le_bytes`]), as in the IEEE 1619 test vectors and OpenSSL's XTS IV.
//!
//! Units shorter than the unit size are file tails:
//!
//! * length a multiple of 16: plain XTS over those blocks — the only shape on-disk format v2
//!   uses (docs/FORMAT.md: the last block is padded);
//! * length >= 16, not a multiple of 16: standard XTS ciphertext stealing;
//! * length 1..=15 (no full block to steal from): see [`XtsCipher::encrypt_unit`] for the
//!   short-tail rule.
//!
//! The last two exist to read volumes of format v1 (`cmkfs upgrade`, `volume::v1`).
//!
//! Three interchangeable implementations sit behind [`XtsCipher`] ([`Implementation`]), the
//! best the CPU has chosen at construction:
//!
//! * VAES + AVX-512 (x86_64 with `vaes`, `vpclmulqdq`, `avx512f`): sixteen blocks in flight,
//!   four per instruction, with the hole check of [`XtsCipher::decrypt_unit_keeping_zero_blocks`]
//!   fused into decryption (`xts/vaes.rs`);
//! * AES-NI (x86_64): eight blocks in flight through the rounds, as OpenSSL's assembly does;
//! * portable, on the `aes` crate's batched block API.
//!
//! The environment variable `CMKFS_XTS` caps the choice, for benchmarks and as an escape
//! hatch: `vaes` (the default, same as `auto` or unset), `aes-ni`, or `portable`; a capped
//! choice the CPU cannot run falls to the next one down. Any other value is an error.
//! All are tested against the IEEE 1619 vectors, the `xts-mode` crate, aws-lc's XTS, the
//! `openssl` command and each other (`tests/suite/xts.rs`).

use std::fmt;
use std::sync::OnceLock;

use super::secret::Secret;
use super::CryptoError;

#[cfg(target_arch = "x86_64")]
mod aesni;
mod portable;
#[cfg(target_arch = "x86_64")]
mod vaes;

/// AES block size.
const BLOCK: usize = 16;

/// Smallest accepted data unit.
pub const MIN_UNIT_SIZE: usize = 512;
/// Largest accepted data unit.
pub const MAX_UNIT_SIZE: usize = 65536;

/// Multiplies a tweak by α (x) in GF(2^128) with the IEEE 1619 reduction polynomial
/// x^128 + x^7 + x^2 + x + 1, the tweak held as a little-endian integer (byte 0 = least
/// significant), which is exactly the standard's bit order.
#[inline(always)]
pub(crate) fn mul_alpha(t: u128) -> u128 {
    (t << 1) ^ ((t >> 127) * 0x87)
}

/// The key schedules of one implementation, in secret pages (locked, kept out of core dumps):
/// a cipher moved around moves a pointer, so the round keys live (and are wiped) in one place.
enum Backend {
    Portable(Secret<portable::Keys>),
    #[cfg(target_arch = "x86_64")]
    AesNi(Secret<aesni::Keys>),
    #[cfg(target_arch = "x86_64")]
    Vaes(Secret<vaes::Keys>),
}

/// Runs `$body` with `$k` bound to the backend's keys (one monomorphic copy per backend).
macro_rules! with_keys {
    ($backend:expr, $k:ident => $body:expr) => {
        match $backend {
            Backend::Portable($k) => $body,
            #[cfg(target_arch = "x86_64")]
            Backend::AesNi($k) => $body,
            #[cfg(target_arch = "x86_64")]
            Backend::Vaes($k) => $body,
        }
    };
}

/// An implementation of the cipher; all produce the same bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Implementation {
    /// VAES on 512-bit vectors (x86_64 with `vaes`, `vpclmulqdq` and `avx512f`).
    Vaes,
    /// AES-NI on 128-bit vectors (x86_64 with `aes`).
    AesNi,
    /// The `aes` crate (any CPU).
    Portable,
}

impl Implementation {
    /// Every implementation, fastest first.
    pub const ALL: [Implementation; 3] = [
        Implementation::Vaes,
        Implementation::AesNi,
        Implementation::Portable,
    ];

    /// The name [`XtsCipher::implementation`] reports and `CMKFS_XTS` takes.
    pub fn name(self) -> &'static str {
        match self {
            Implementation::Vaes => "vaes",
            Implementation::AesNi => "aes-ni",
            Implementation::Portable => "portable",
        }
    }

    /// True when this CPU can run it.
    pub fn available(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Implementation::Vaes => vaes::available(),
            #[cfg(target_arch = "x86_64")]
            Implementation::AesNi => {
                is_x86_feature_detected!("aes") && is_x86_feature_detected!("sse2")
            }
            #[cfg(not(target_arch = "x86_64"))]
            Implementation::Vaes | Implementation::AesNi => false,
            Implementation::Portable => true,
        }
    }

    /// The best implementation this CPU has at or below `self` in [`Implementation::ALL`].
    fn best_up_to(self) -> Implementation {
        Implementation::ALL
            .into_iter()
            .skip_while(|i| *i != self)
            .find(|i| i.available())
            .unwrap_or(Implementation::Portable)
    }
}

/// The environment variable that caps the implementation [`XtsCipher::new`] picks.
pub const IMPLEMENTATION_ENV: &str = "CMKFS_XTS";

/// `CMKFS_XTS` as read once per process: the cap, or the bad value.
fn env_cap() -> Result<Implementation, CryptoError> {
    static CAP: OnceLock<Result<Implementation, String>> = OnceLock::new();
    CAP.get_or_init(|| {
        let v = std::env::var(IMPLEMENTATION_ENV).unwrap_or_default();
        match v.trim().to_ascii_lowercase().as_str() {
            "" | "auto" | "vaes" => Ok(Implementation::Vaes),
            "aes-ni" | "aesni" => Ok(Implementation::AesNi),
            "portable" => Ok(Implementation::Portable),
            _ => Err(v),
        }
    })
    .clone()
    .map_err(|got| CryptoError::UnknownImplementation { got })
}

/// XTS-AES-256 with a fixed data-unit size.
///
/// `Send + Sync`: one cipher serves every thread of a mount. The round keys are zeroized when
/// it is dropped, and `Debug` prints only the unit size and the implementation in use.
pub struct XtsCipher {
    unit_size: usize,
    backend: Backend,
}

impl fmt::Debug for XtsCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("XtsCipher")
            .field("unit_size", &self.unit_size)
            .field("implementation", &self.implementation())
            .finish_non_exhaustive()
    }
}

/// Checks the key and unit size, and returns the two key halves.
fn check_params(key: &[u8], unit_size: usize) -> Result<(&[u8; 32], &[u8; 32]), CryptoError> {
    let Ok(key) = <&[u8; 64]>::try_from(key) else {
        return Err(CryptoError::BadKeyLength { got: key.len() });
    };
    let (k1, k2) = key.split_at(32);
    // Compare without an early exit, so the time taken says nothing about where the halves
    // first differ.
    let diff = k1.iter().zip(k2).fold(0u8, |acc, (a, b)| acc | (a ^ b));
    if diff == 0 {
        return Err(CryptoError::EqualKeyHalves);
    }
    if !unit_size.is_power_of_two() || !(MIN_UNIT_SIZE..=MAX_UNIT_SIZE).contains(&unit_size) {
        return Err(CryptoError::BadUnitSize { got: unit_size });
    }
    // The unwraps cannot fail: both halves are exactly 32 bytes.
    Ok((k1.try_into().unwrap(), k2.try_into().unwrap()))
}

impl XtsCipher {
    /// A cipher for `key` = `K1 || K2` (64 bytes, `K1 != K2`) and data units of `unit_size`
    /// bytes (a power of two in 512..=65536).
    ///
    /// Uses the fastest implementation the CPU has (checked here), at most the one
    /// `CMKFS_XTS` names; fails with [`CryptoError::UnknownImplementation`] when that variable
    /// holds something else.
    pub fn new(key: &[u8], unit_size: usize) -> Result<Self, CryptoError> {
        let imp = env_cap()?.best_up_to();
        Self::with_implementation(key, unit_size, imp)
    }

    /// Like [`XtsCipher::new`] but always the portable (`aes` crate) implementation, so tests
    /// and benchmarks can exercise the fallback on a machine with AES-NI.
    #[doc(hidden)]
    pub fn new_portable(key: &[u8], unit_size: usize) -> Result<Self, CryptoError> {
        Self::with_implementation(key, unit_size, Implementation::Portable)
    }

    /// Like [`XtsCipher::new`] with implementation `imp`, whatever `CMKFS_XTS` says (tests and
    /// benchmarks compare them); [`CryptoError::Unavailable`] if the CPU cannot run it.
    pub fn with_implementation(
        key: &[u8],
        unit_size: usize,
        imp: Implementation,
    ) -> Result<Self, CryptoError> {
        let (k1, k2) = check_params(key, unit_size)?;
        let unavailable = CryptoError::Unavailable {
            implementation: imp.name(),
        };
        let backend = match imp {
            Implementation::Portable => Backend::Portable(portable::Keys::new(k1, k2)),
            #[cfg(target_arch = "x86_64")]
            Implementation::AesNi => Backend::AesNi(aesni::Keys::new(k1, k2).ok_or(unavailable)?),
            #[cfg(target_arch = "x86_64")]
            Implementation::Vaes => Backend::Vaes(vaes::Keys::new(k1, k2).ok_or(unavailable)?),
            #[cfg(not(target_arch = "x86_64"))]
            Implementation::Vaes | Implementation::AesNi => return Err(unavailable),
        };
        Ok(XtsCipher { unit_size, backend })
    }

    /// The data unit size in bytes.
    pub fn unit_size(&self) -> usize {
        self.unit_size
    }

    /// Which implementation this cipher runs: `"vaes"`, `"aes-ni"` or `"portable"`
    /// ([`Implementation::name`]).
    pub fn implementation(&self) -> &'static str {
        match self.backend {
            Backend::Portable(_) => Implementation::Portable,
            #[cfg(target_arch = "x86_64")]
            Backend::AesNi(_) => Implementation::AesNi,
            #[cfg(target_arch = "x86_64")]
            Backend::Vaes(_) => Implementation::Vaes,
        }
        .name()
    }

    fn check_len(&self, len: usize) -> Result<(), CryptoError> {
        if len == 0 || len > self.unit_size {
            return Err(CryptoError::BadLength {
                len,
                unit: self.unit_size,
            });
        }
        Ok(())
    }

    /// Encrypts one data unit in place; `unit` is 1..=`unit_size` bytes and `tweak` its data
    /// unit sequence number.
    ///
    /// A unit of 16·k bytes is plain XTS; a longer unit of another length uses XTS ciphertext
    /// stealing. A unit of 1..=15 bytes (only possible as a whole file tail) has no block to
    /// steal from and follows this **short-tail rule**: with `T = AES-K2(tweak)` and
    /// `n = unit_size / 16`, the keystream is `AES-K1(T ⊗ α^n)` and `C = P XOR` its first
    /// `L` bytes (encryption and decryption are the same operation).
    ///
    /// Format v1 only (v2 pads the last block instead). This is a stream rule: two versions
    /// of the same short tail (same key and tweak) leak their XOR, where a full XTS block
    /// would only leak equality; and with v1's "an all-zero unit is a hole" it made one
    /// 1-byte tail in 256 read back as zeros (issue 10). It is still sound for the
    /// threat model (an attacker who reads the backing store, possibly several times): the
    /// keystream block is unique per (key, tweak) because `T ⊗ α^n` is the mask of block index
    /// `n`, which no block of any unit of this size ever uses (blocks are `0..n-1`), and the
    /// AES input never repeats for a different tweak; so no keystream is shared between files,
    /// sectors, or with any ciphertext block. What leaks is limited to at most 15 bytes of a file
    /// that is rewritten in place, the same class of leak XTS already has for rewritten blocks.
    pub fn encrypt_unit(&self, tweak: u128, unit: &mut [u8]) -> Result<(), CryptoError> {
        self.check_len(unit.len())?;
        with_keys!(&self.backend, k => self.encrypt_with(&**k, tweak, unit));
        Ok(())
    }

    /// Decrypts one data unit in place, the inverse of [`XtsCipher::encrypt_unit`] (same
    /// lengths, same tweak).
    pub fn decrypt_unit(&self, tweak: u128, unit: &mut [u8]) -> Result<(), CryptoError> {
        self.check_len(unit.len())?;
        with_keys!(&self.backend, k => self.decrypt_with(&**k, tweak, unit));
        Ok(())
    }

    /// Decrypts one data unit in place as [`XtsCipher::decrypt_unit`] does, except that every
    /// 16-byte block whose ciphertext is all zeros stays all zeros, and a unit that is all
    /// zeros (of any length) stays zeros: the engine's `Holes::Zero` (docs/FORMAT.md: a
    /// stored all-zero block reads as zeros). A unit of another length than 16·k bytes
    /// (format v1's stealing and short tails) is otherwise decrypted whole.
    ///
    /// XTS decrypts each block on its own (no stealing in whole-block units), so leaving a
    /// block's ciphertext in place is the same as zeroing its plaintext afterwards. The VAES
    /// implementation checks for zero blocks on the ciphertext already in its registers; the
    /// others scan the unit first.
    pub fn decrypt_unit_keeping_zero_blocks(
        &self,
        tweak: u128,
        unit: &mut [u8],
    ) -> Result<(), CryptoError> {
        self.check_len(unit.len())?;
        if is_zero(unit) {
            return Ok(());
        }
        if !unit.len().is_multiple_of(BLOCK) {
            return self.decrypt_unit(tweak, unit);
        }
        with_keys!(&self.backend, k => k.decrypt_blocks_keeping_zero_blocks(tweak, unit));
        Ok(())
    }

    /// The short-tail rule (length 1..=15): XOR with `AES-K1(AES-K2(tweak) ⊗ α^n)`.
    fn short_tail<B: BlockOps>(&self, keys: &B, tweak: u128, unit: &mut [u8]) {
        let mut t = keys.tweak(tweak);
        for _ in 0..self.unit_size / BLOCK {
            t = mul_alpha(t);
        }
        let mut ks = t.to_le_bytes();
        keys.encrypt_block(&mut ks);
        for (b, k) in unit.iter_mut().zip(ks) {
            *b ^= k;
        }
    }

    fn encrypt_with<B: BlockOps>(&self, keys: &B, tweak: u128, unit: &mut [u8]) {
        let len = unit.len();
        if len < BLOCK {
            return self.short_tail(keys, tweak, unit);
        }
        let rem = len % BLOCK;
        if rem == 0 {
            keys.encrypt_blocks(tweak, unit);
            return;
        }
        // Ciphertext stealing (IEEE 1619-2018 §5.3.2): the last full block is encrypted
        // first, the short block takes the head of its ciphertext, and the short plaintext
        // padded with the tail of that ciphertext is encrypted with the next tweak into the
        // last full block's place.
        let full = len - rem - BLOCK;
        let (head, tail) = unit.split_at_mut(full);
        let t = keys.encrypt_blocks(tweak, head);
        let (last, short) = tail.split_at_mut(BLOCK);
        let mut cc: [u8; BLOCK] = (*last).try_into().unwrap();
        xex_encrypt(keys, t, &mut cc);
        let mut pp = cc;
        pp[..rem].copy_from_slice(short);
        short.copy_from_slice(&cc[..rem]);
        xex_encrypt(keys, mul_alpha(t), &mut pp);
        last.copy_from_slice(&pp);
    }

    fn decrypt_with<B: BlockOps>(&self, keys: &B, tweak: u128, unit: &mut [u8]) {
        let len = unit.len();
        if len < BLOCK {
            return self.short_tail(keys, tweak, unit);
        }
        let rem = len % BLOCK;
        if rem == 0 {
            keys.decrypt_blocks(tweak, unit);
            return;
        }
        // Ciphertext stealing, inverse: the stored last full block was made with the next
        // tweak, so it is decrypted first.
        let full = len - rem - BLOCK;
        let (head, tail) = unit.split_at_mut(full);
        let t = keys.decrypt_blocks(tweak, head);
        let (last, short) = tail.split_at_mut(BLOCK);
        let mut pp: [u8; BLOCK] = (*last).try_into().unwrap();
        xex_decrypt(keys, mul_alpha(t), &mut pp);
        let mut cc = pp;
        cc[..rem].copy_from_slice(short);
        short.copy_from_slice(&pp[..rem]);
        xex_decrypt(keys, t, &mut cc);
        last.copy_from_slice(&cc);
    }
}

/// One block of XEX: `C = AES-K1(P ⊕ T) ⊕ T`.
fn xex_encrypt<B: BlockOps>(keys: &B, t: u128, block: &mut [u8; BLOCK]) {
    *block = (u128::from_le_bytes(*block) ^ t).to_le_bytes();
    keys.encrypt_block(block);
    *block = (u128::from_le_bytes(*block) ^ t).to_le_bytes();
}

/// One block of XEX decryption: `P = AES-K1⁻¹(C ⊕ T) ⊕ T`.
fn xex_decrypt<B: BlockOps>(keys: &B, t: u128, block: &mut [u8; BLOCK]) {
    *block = (u128::from_le_bytes(*block) ^ t).to_le_bytes();
    keys.decrypt_block(block);
    *block = (u128::from_le_bytes(*block) ^ t).to_le_bytes();
}

/// What an implementation provides; the XTS framing (lengths, stealing, short tails) is
/// shared above so both implementations agree by construction.
trait BlockOps {
    /// `AES-K2(tweak as 16 little-endian bytes)`, as a little-endian integer.
    fn tweak(&self, tweak: u128) -> u128;
    /// XTS over the whole blocks of `data` (any trailing partial block is left alone) as the
    /// start of the unit with sequence number `tweak`: computes `T = AES-K2(tweak)` itself
    /// (one call per unit keeps the fast path in one function) and returns the mask of the
    /// block after the last one.
    fn encrypt_blocks(&self, tweak: u128, data: &mut [u8]) -> u128;
    /// Inverse of [`BlockOps::encrypt_blocks`].
    fn decrypt_blocks(&self, tweak: u128, data: &mut [u8]) -> u128;
    /// [`BlockOps::decrypt_blocks`] over `data` of whole blocks, leaving every all-zero
    /// block as zeros. This default scans first; a backend can fuse the check into its loop.
    fn decrypt_blocks_keeping_zero_blocks(&self, tweak: u128, data: &mut [u8]) {
        // Real ciphertext has no zero block: one cheap pass (a 16-byte compare per block, no
        // allocation) settles the common case. Collecting the indices of every block, as the
        // rare case below does, cost more than the cipher itself (51% of a 1 MiB read's
        // instructions, docs/PERFORMANCE.md).
        if !has_zero_block(data) {
            self.decrypt_blocks(tweak, data);
            return;
        }
        let zero_blocks: Vec<usize> = data
            .chunks_exact(BLOCK)
            .enumerate()
            .filter(|(_, b)| b.iter().fold(0u8, |a, &x| a | x) == 0)
            .map(|(i, _)| i)
            .collect();
        self.decrypt_blocks(tweak, data);
        for i in zero_blocks {
            data[i * BLOCK..(i + 1) * BLOCK].fill(0);
        }
    }
    /// One raw AES-K1 encryption.
    fn encrypt_block(&self, block: &mut [u8; BLOCK]);
    /// One raw AES-K1 decryption.
    fn decrypt_block(&self, block: &mut [u8; BLOCK]);
}

/// True when some whole 16-byte block of `u` is all zeros (a trailing partial block is not
/// looked at).
fn has_zero_block(u: &[u8]) -> bool {
    u.chunks_exact(BLOCK).any(|b| {
        let mut w = [0u8; BLOCK];
        w.copy_from_slice(b);
        u128::from_ne_bytes(w) == 0
    })
}

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
    fn has_zero_block_finds_every_position() {
        assert!(!has_zero_block(&[1u8; 4096]));
        assert!(!has_zero_block(&[]));
        for i in [0usize, 1, 100, 255] {
            let mut u = [1u8; 4096];
            u[i * 16..i * 16 + 16].fill(0);
            assert!(has_zero_block(&u), "{i}");
            // Fifteen zeros are not a zero block.
            u[i * 16 + 7] = 9;
            assert!(!has_zero_block(&u), "{i}");
        }
        // Zeros straddling two blocks are not a zero block either.
        let mut u = [1u8; 64];
        u[8..24].fill(0);
        assert!(!has_zero_block(&u));
    }

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

    fn key() -> [u8; 64] {
        let mut k = [0u8; 64];
        for (i, b) in k.iter_mut().enumerate() {
            *b = i as u8;
        }
        k
    }

    #[test]
    fn mul_alpha_matches_byte_rule() {
        // IEEE 1619 §5.2 on bytes: shift left through the bytes, carry out of byte 15 folds
        // back as 0x87 into byte 0.
        fn bytes_rule(t: [u8; 16]) -> [u8; 16] {
            let mut out = [0u8; 16];
            let mut carry = 0u8;
            for j in 0..16 {
                out[j] = (t[j] << 1) | carry;
                carry = t[j] >> 7;
            }
            if carry == 1 {
                out[0] ^= 0x87;
            }
            out
        }
        for v in [
            0u128,
            1,
            1 << 63,
            1 << 127,
            u128::MAX,
            0x0123_4567_89ab_cdef_u128 << 60,
        ] {
            assert_eq!(mul_alpha(v).to_le_bytes(), bytes_rule(v.to_le_bytes()));
        }
    }

    #[test]
    fn rejects_bad_parameters() {
        assert_eq!(
            XtsCipher::new(&[1u8; 63], 4096).unwrap_err(),
            CryptoError::BadKeyLength { got: 63 }
        );
        assert_eq!(
            XtsCipher::new(&[7u8; 64], 4096).unwrap_err(),
            CryptoError::EqualKeyHalves
        );
        for bad in [0, 256, 1000, 4095, 131072] {
            assert_eq!(
                XtsCipher::new(&key(), bad).unwrap_err(),
                CryptoError::BadUnitSize { got: bad }
            );
        }
        let c = XtsCipher::new(&key(), 512).unwrap();
        let mut big = [0u8; 513];
        assert_eq!(
            c.encrypt_unit(0, &mut big).unwrap_err(),
            CryptoError::BadLength {
                len: 513,
                unit: 512
            }
        );
        assert_eq!(
            c.decrypt_unit(0, &mut []).unwrap_err(),
            CryptoError::BadLength { len: 0, unit: 512 }
        );
    }

    #[test]
    fn debug_hides_keys() {
        let c = XtsCipher::new(&key(), 4096).unwrap();
        let s = format!("{c:?}");
        assert!(s.contains("4096") && !s.contains("[0, 1, 2"), "{s}");
    }

    #[test]
    fn backends_agree_all_lengths() {
        let fast = XtsCipher::new(&key(), 512).unwrap();
        let port = XtsCipher::new_portable(&key(), 512).unwrap();
        for len in 1..=512 {
            let orig: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let mut a = orig.clone();
            let mut b = orig.clone();
            fast.encrypt_unit(0xdead_beef, &mut a).unwrap();
            port.encrypt_unit(0xdead_beef, &mut b).unwrap();
            assert_eq!(a, b, "len {len}");
            assert_ne!(a, orig, "len {len}");
            fast.decrypt_unit(0xdead_beef, &mut a).unwrap();
            port.decrypt_unit(0xdead_beef, &mut b).unwrap();
            assert_eq!(a, orig, "len {len}");
            assert_eq!(b, orig, "len {len}");
        }
    }
}
