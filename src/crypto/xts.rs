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
//! Two interchangeable implementations sit behind [`XtsCipher`]: an AES-NI one (x86_64, chosen
//! at construction when the CPU has AES-NI) that keeps eight blocks in flight through the
//! rounds, as OpenSSL's assembly does, and a portable one on the `aes` crate's batched block
//! API. Both are tested against the IEEE 1619 vectors, the `xts-mode` crate, aws-lc's XTS and
//! the `openssl` command (`tests/suite/xts.rs`).

use std::fmt;

use super::secret::Secret;
use super::CryptoError;

#[cfg(target_arch = "x86_64")]
mod aesni;
mod portable;

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
    /// Uses the AES-NI implementation when the CPU has it (checked once, here), the portable
    /// one otherwise.
    pub fn new(key: &[u8], unit_size: usize) -> Result<Self, CryptoError> {
        let (k1, k2) = check_params(key, unit_size)?;
        #[cfg(target_arch = "x86_64")]
        if let Some(keys) = aesni::Keys::new(k1, k2) {
            return Ok(XtsCipher {
                unit_size,
                backend: Backend::AesNi(keys),
            });
        }
        Ok(XtsCipher {
            unit_size,
            backend: Backend::Portable(portable::Keys::new(k1, k2)),
        })
    }

    /// Like [`XtsCipher::new`] but always the portable (`aes` crate) implementation, so tests
    /// and benchmarks can exercise the fallback on a machine with AES-NI.
    #[doc(hidden)]
    pub fn new_portable(key: &[u8], unit_size: usize) -> Result<Self, CryptoError> {
        let (k1, k2) = check_params(key, unit_size)?;
        Ok(XtsCipher {
            unit_size,
            backend: Backend::Portable(portable::Keys::new(k1, k2)),
        })
    }

    /// The data unit size in bytes.
    pub fn unit_size(&self) -> usize {
        self.unit_size
    }

    /// Which implementation this cipher runs: `"aes-ni"` or `"portable"`.
    pub fn implementation(&self) -> &'static str {
        match self.backend {
            Backend::Portable(_) => "portable",
            #[cfg(target_arch = "x86_64")]
            Backend::AesNi(_) => "aes-ni",
        }
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
        match &self.backend {
            Backend::Portable(k) => self.encrypt_with(&**k, tweak, unit),
            #[cfg(target_arch = "x86_64")]
            Backend::AesNi(k) => self.encrypt_with(&**k, tweak, unit),
        }
        Ok(())
    }

    /// Decrypts one data unit in place, the inverse of [`XtsCipher::encrypt_unit`] (same
    /// lengths, same tweak).
    pub fn decrypt_unit(&self, tweak: u128, unit: &mut [u8]) -> Result<(), CryptoError> {
        self.check_len(unit.len())?;
        match &self.backend {
            Backend::Portable(k) => self.decrypt_with(&**k, tweak, unit),
            #[cfg(target_arch = "x86_64")]
            Backend::AesNi(k) => self.decrypt_with(&**k, tweak, unit),
        }
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
    /// One raw AES-K1 encryption.
    fn encrypt_block(&self, block: &mut [u8; BLOCK]);
    /// One raw AES-K1 decryption.
    fn decrypt_block(&self, block: &mut [u8; BLOCK]);
}

#[cfg(test)]
mod tests {
    use super::*;

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
