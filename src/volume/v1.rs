//! Format v1's last data unit, read only to convert it (`cmkfs upgrade`) and to report the
//! files the v1 tail bug may have hit (`cmkfs fsck`). Nothing here writes v1.
//!
//! v1 stored a file with no expansion (logical size = backing length − 32) and its last unit
//! at its exact length: XTS with ciphertext stealing for 16 bytes or more, and for 1..=15
//! bytes the stream rule `C = P ⊕ AES-K1(AES-K2(tweak) ⊗ α^(unit/16))`
//! ([`crate::crypto::XtsCipher::decrypt_unit`] still implements both). Its reader took any
//! all-zero stored unit for a hole, so a 1..=15-byte tail whose ciphertext happened to be all
//! zero (probability 2^-8r for r bytes) read back as zeros: the bug of issue 10.
//!
//! An all-zero stored short tail is therefore either a hole (the file grew by `truncate` /
//! `fallocate` and the tail was never written, or it was punched) or data the old reader
//! misread. [`decide_zero_tail`] states how the upgrade tells them apart.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use serde::{Deserialize, Serialize};

use super::layout::FILE_HEADER_LEN;
use crate::crypto::{CryptoError, VolumeKeys};

/// Longest all-zero short tail that the upgrade reads as written data when the backing
/// file's allocation cannot tell. A written tail of `r` bytes is stored as all zeros with
/// probability 2^-8r: for 1 byte that is one file in 256 (the bug as users met it), for 2
/// bytes one in 65536; from 3 bytes on (one in 16.7 million and rarer) a file grown by
/// `truncate` is by far the likelier source, so those tails stay zeros.
pub const MAX_RECOVERED_TAIL: usize = 2;

/// Logical size of a v1 file whose backing file is `backing_len` bytes long.
pub fn logical_size(backing_len: u64) -> Result<u64, String> {
    match backing_len {
        0 => Ok(0),
        n if n < FILE_HEADER_LEN as u64 => Err(format!(
            "backing file of {n} bytes is shorter than a file header"
        )),
        n => Ok(n - FILE_HEADER_LEN as u64),
    }
}

/// The last data unit of a v1 file, as stored.
#[derive(Clone, Debug)]
pub struct LastUnit {
    /// Unit index (its tweak is `file tweak + index`).
    pub index: u64,
    /// Where it starts in the logical file (`index · unit size`).
    pub start: u64,
    /// Its stored bytes: `size − start` of them (1..=unit size).
    pub stored: Vec<u8>,
}

impl LastUnit {
    /// Whether every stored byte is zero (what the v1 reader took for a hole).
    pub fn is_zero(&self) -> bool {
        self.stored.iter().all(|b| *b == 0)
    }

    /// Whether it is a short tail (1..=15 bytes: the stream rule).
    pub fn is_short(&self) -> bool {
        self.stored.len() < 16
    }
}

/// Reads the last unit of a v1 file of logical `size` (> 0) with `unit_size`-byte units.
pub fn read_last_unit(f: &File, size: u64, unit_size: u64) -> io::Result<LastUnit> {
    let index = (size - 1) / unit_size;
    let start = index * unit_size;
    let mut stored = vec![0u8; (size - start) as usize];
    f.read_exact_at(&mut stored, FILE_HEADER_LEN as u64 + start)?;
    Ok(LastUnit {
        index,
        start,
        stored,
    })
}

/// What an all-zero stored v1 tail is taken to hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TailDecision {
    /// Written data that v1 misread as zeros: decrypted with the v1 rule (recovered).
    Data,
    /// A hole: zeros, as v1 read it.
    Hole,
}

/// The decision on an all-zero short tail, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZeroTail {
    /// The decision.
    pub decision: TailDecision,
    /// Why, in words (for logs and reports).
    pub reason: String,
}

/// Decides what an all-zero stored short tail of `len` bytes at logical offset `start`
/// holds:
///
/// 1. If the backing file has no data in the tail's range (`SEEK_DATA` skips it), it was
///    never written: a **hole**. Certain: a write always allocates.
/// 2. Otherwise allocation proves nothing: the tail shares its filesystem block with the
///    file header (files under 4 KiB) or with the last 32 bytes of the previous unit, so the
///    block is allocated whether or not the tail was written. Then the likelier source wins
///    ([`MAX_RECOVERED_TAIL`]): 1 or 2 bytes → **data** (recovered), 3..=15 → **hole**.
///
/// Case 2 can be wrong: a 1- or 2-byte tail made by `truncate` right after data is turned
/// into the v1 keystream bytes, and a 3..15-byte tail whose plaintext was exactly the v1
/// keystream stays zeros. Every such decision is reported with the file's path.
pub fn decide_zero_tail(f: &File, start: u64, len: usize) -> ZeroTail {
    let off = FILE_HEADER_LEN as u64 + start;
    match data_in_range(f, off, len as u64) {
        Some(false) => ZeroTail {
            decision: TailDecision::Hole,
            reason: "the backing file holds no data there: never written (a hole)".into(),
        },
        allocated => {
            let why = match allocated {
                Some(_) => {
                    "the backing block is allocated, which proves nothing (it also holds \
                            the file header or the previous unit)"
                }
                None => "the backing filesystem does not report holes",
            };
            if len <= MAX_RECOVERED_TAIL {
                ZeroTail {
                    decision: TailDecision::Data,
                    reason: format!(
                        "{why}; a written {len}-byte tail is stored as zeros once in {}, the \
                         likelier case: recovered as data",
                        1u64 << (8 * len)
                    ),
                }
            } else {
                ZeroTail {
                    decision: TailDecision::Hole,
                    reason: format!(
                        "{why}; a written {len}-byte tail is stored as zeros once in 2^{} \
                         tails: kept as zeros (a hole)",
                        8 * len
                    ),
                }
            }
        }
    }
}

/// Whether the backing file holds data in `[off, off + len)`: `Some(false)` when that range
/// is a hole, `None` when the filesystem cannot say.
fn data_in_range(f: &File, off: u64, len: u64) -> Option<bool> {
    // SAFETY: lseek on a valid descriptor.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off as libc::off_t, libc::SEEK_DATA) };
    if r < 0 {
        return match io::Error::last_os_error().raw_os_error() {
            Some(libc::ENXIO) => Some(false), // no data at or after `off`
            _ => None,
        };
    }
    Some((r as u64) < off + len)
}

/// The plaintext of a v1 last unit, `stored.len()` bytes, or `None` for a hole: decrypted
/// with the v1 length rules (ciphertext stealing / stream rule), outer layer then inner.
/// Unlike the v1 reader it never takes an intermediate all-zero buffer for a hole: an
/// all-zero stored unit is a hole only when `zero` says so ([`decide_zero_tail`]; longer
/// units are holes), and a double-encrypted tail whose outer layer decrypts to zeros is data.
pub fn decrypt_last_unit(
    keys: &VolumeKeys,
    tweak: u128,
    unit: &LastUnit,
    zero: Option<TailDecision>,
) -> Result<Option<Vec<u8>>, CryptoError> {
    if unit.is_zero() {
        let decision = if unit.is_short() {
            zero.unwrap_or(TailDecision::Hole)
        } else {
            TailDecision::Hole
        };
        if decision == TailDecision::Hole {
            return Ok(None);
        }
    }
    let t = tweak.wrapping_add(unit.index as u128);
    let mut buf = unit.stored.clone();
    keys.xts.decrypt_unit(t, &mut buf)?;
    if let Some(inner) = &keys.inner {
        inner.decrypt_unit(t, &mut buf)?;
    }
    Ok(Some(buf))
}

/// What the v1 reader showed wrongly (or may have) in a v1 file's last unit, for `fsck`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TailFinding {
    /// The short tail is stored as all zeros: it read as zeros; the upgrade decides as said.
    ZeroTail {
        /// Logical offset of the tail.
        start: u64,
        /// Its length (1..=15).
        len: usize,
        /// What the upgrade will take it for.
        decision: ZeroTail,
    },
    /// Double encryption: the stored tail is not zero, but its outer layer decrypts to all
    /// zeros, which the v1 reader took for a hole: data it read as zeros (recovered by the
    /// upgrade).
    InnerZero {
        /// Logical offset of the tail.
        start: u64,
        /// Its length (1..=15).
        len: usize,
    },
}

/// Inspects a v1 file of logical `size` for a short tail the v1 reader showed as zeros.
/// `keys` (when known) also finds double-encrypted tails whose inner layer looked like a hole.
pub fn inspect_tail(
    f: &File,
    keys: Option<&VolumeKeys>,
    tweak: u128,
    size: u64,
    unit_size: u64,
) -> io::Result<Option<TailFinding>> {
    if size == 0 || size % unit_size >= 16 || size.is_multiple_of(unit_size) {
        return Ok(None);
    }
    let unit = read_last_unit(f, size, unit_size)?;
    let len = unit.stored.len();
    if unit.is_zero() {
        return Ok(Some(TailFinding::ZeroTail {
            start: unit.start,
            len,
            decision: decide_zero_tail(f, unit.start, len),
        }));
    }
    if let Some(keys) = keys.filter(|k| k.inner.is_some()) {
        let mut x = unit.stored.clone();
        let t = tweak.wrapping_add(unit.index as u128);
        if keys.xts.decrypt_unit(t, &mut x).is_ok() && x.iter().all(|b| *b == 0) {
            return Ok(Some(TailFinding::InnerZero {
                start: unit.start,
                len,
            }));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Dek;
    use std::io::Write;

    fn keys(double: bool) -> VolumeKeys {
        let inner = Dek::generate().unwrap();
        VolumeKeys::from_deks(&Dek::generate().unwrap(), double.then_some(&inner), 4096).unwrap()
    }

    /// A v1 file: header bytes (content irrelevant here) + the v1 encryption of `plain`.
    fn v1_file(dir: &std::path::Path, keys: &VolumeKeys, tweak: u128, plain: &[u8]) -> File {
        let mut stored = Vec::new();
        for (i, chunk) in plain.chunks(4096).enumerate() {
            let mut u = chunk.to_vec();
            let t = tweak.wrapping_add(i as u128);
            if let Some(inner) = &keys.inner {
                inner.encrypt_unit(t, &mut u).unwrap();
            }
            keys.xts.encrypt_unit(t, &mut u).unwrap();
            stored.extend(u);
        }
        let p = dir.join(format!("f{}", plain.len()));
        let mut f = File::create(&p).unwrap();
        f.write_all(&[1u8; FILE_HEADER_LEN]).unwrap();
        f.write_all(&stored).unwrap();
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .unwrap()
    }

    #[test]
    fn v1_units_decrypt_at_every_tail_length() {
        let d = tempfile::tempdir().unwrap();
        for double in [false, true] {
            let k = keys(double);
            for size in [1u64, 2, 15, 16, 17, 31, 4095, 4096, 4097, 4111, 4113, 8193] {
                let plain: Vec<u8> = (0..size).map(|i| (i * 7 + 1) as u8).collect();
                let f = v1_file(d.path(), &k, 99, &plain);
                let u = read_last_unit(&f, size, 4096).unwrap();
                // These tails are data: with random keys a 1..15-byte one is stored as all
                // zeros once in 256^len (the bug itself), so say so.
                let got = decrypt_last_unit(&k, 99, &u, Some(TailDecision::Data))
                    .unwrap()
                    .unwrap();
                assert_eq!(got[..], plain[u.start as usize..], "size {size}");
            }
        }
    }

    #[test]
    fn zero_tails_are_found_and_decided() {
        let d = tempfile::tempdir().unwrap();
        let k = keys(false);
        for r in 1..=15usize {
            // The plaintext the stream rule stores as all zeros: its keystream.
            let mut ks = vec![0u8; r];
            k.xts.encrypt_unit(5, &mut ks).unwrap();
            let f = v1_file(d.path(), &k, 5, &ks);
            let found = inspect_tail(&f, Some(&k), 5, r as u64, 4096).unwrap();
            let Some(TailFinding::ZeroTail { len, decision, .. }) = found else {
                panic!("r {r}: {found:?}");
            };
            assert_eq!(len, r);
            // The header shares the block: allocation cannot tell, the length decides.
            let want = if r <= MAX_RECOVERED_TAIL {
                TailDecision::Data
            } else {
                TailDecision::Hole
            };
            assert_eq!(decision.decision, want, "r {r}: {}", decision.reason);
            let u = read_last_unit(&f, r as u64, 4096).unwrap();
            let got = decrypt_last_unit(&k, 5, &u, Some(TailDecision::Data)).unwrap();
            assert_eq!(got.as_deref(), Some(&ks[..]), "r {r}: recovered");
            assert_eq!(
                decrypt_last_unit(&k, 5, &u, Some(TailDecision::Hole)).unwrap(),
                None
            );
        }
    }

    #[test]
    fn an_unallocated_tail_is_a_hole_whatever_its_length() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sparse");
        let f = File::create(&p).unwrap();
        f.write_all_at(&[1u8; FILE_HEADER_LEN], 0).unwrap();
        // 3 units of nothing, then a 1-byte tail: never written.
        f.set_len(FILE_HEADER_LEN as u64 + 3 * 4096 + 1).unwrap();
        let z = decide_zero_tail(&f, 3 * 4096, 1);
        assert_eq!(z.decision, TailDecision::Hole, "{}", z.reason);
    }

    #[test]
    fn double_encryption_inner_zero_is_data() {
        let d = tempfile::tempdir().unwrap();
        let k = keys(true);
        let inner = k.inner.as_ref().unwrap();
        // The plaintext whose inner layer is all zeros: the inner keystream.
        let mut ks = vec![0u8; 3];
        inner.encrypt_unit(8, &mut ks).unwrap();
        let f = v1_file(d.path(), &k, 8, &ks);
        let found = inspect_tail(&f, Some(&k), 8, 3, 4096).unwrap();
        assert!(
            matches!(found, Some(TailFinding::InnerZero { len: 3, .. })),
            "{found:?}"
        );
        let u = read_last_unit(&f, 3, 4096).unwrap();
        assert_eq!(
            decrypt_last_unit(&k, 8, &u, None).unwrap().as_deref(),
            Some(&ks[..])
        );
    }
}
