//! The layout of one backing file: the per-file header, and how the logical size, the data
//! units and the backing length relate (docs/FORMAT.md, "Files").
//!
//! Format v2, for a file of logical size `S` (bytes):
//!
//! * The backing file is the 32-byte file header followed by the data area of `data_len(S)`
//!   bytes: `S` when `S % 16 == 0`, else `S + 16`. A 0-byte backing file is an empty file
//!   without a header.
//! * The data area holds the data units: unit `i` covers `[i·unit, (i+1)·unit)`, except the
//!   last, which covers `[i·unit, roundup16(S))` — every unit is a whole number of 16-byte
//!   AES blocks, at least one. The bytes of the last block past `S` are padding (unspecified
//!   plaintext). After the units come `S % 16` filler bytes that belong to no unit: they only
//!   make the length say `S`.
//! * Decoding: `D = backing length − 32`; `D % 16 == 0` → `S = D`; otherwise `S = D − 16`, and
//!   `D` in `1..=15` cannot happen (corrupt).
//!
//! Keeping the size in the length means `stat` needs nothing but the backing `stat`, and no
//! size record can disagree with the data after a crash.

/// Bytes of the per-file header.
pub const FILE_HEADER_LEN: usize = 32;
/// The AES block: every data unit is a whole number of these.
pub const BLOCK: u64 = 16;
const FILE_MAGIC: &[u8; 4] = b"CMKF";
/// The file format version this code writes (the data-unit rule of format v2).
pub const FILE_VERSION: u16 = 2;
/// Format v1's file version (short tails: ciphertext stealing / stream rule); read only by
/// `cmkfs upgrade`.
pub const FILE_VERSION_V1: u16 = 1;

/// The per-file header: magic, version, the key generation of the data, the random file id
/// used in the tweak, and a re-encryption's progress through the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileHeader {
    /// [`FILE_VERSION`] for files the data path reads; [`FILE_VERSION_V1`] for files not yet
    /// upgraded.
    pub version: u16,
    /// The low 16 bits of the key generation (volume header `key_generation`) whose DEK
    /// encrypts the data: 0 on volumes never re-encrypted.
    pub key_gen: u16,
    /// Random per-file id; the tweak of unit `i` is `file_id + i` (as a little-endian u128).
    pub file_id: [u8; 16],
    /// While a re-encryption converts this file: units `[0, reencrypted)` are already under
    /// the volume's current DEK, the rest under `key_gen`'s. 0 otherwise.
    pub reencrypted: u64,
}

impl FileHeader {
    /// A current-version header with a fresh random file id, for data of key generation
    /// `generation`.
    pub fn generate(generation: u32) -> Result<FileHeader, getrandom::Error> {
        let mut file_id = [0u8; 16];
        super::idrand::fill(&mut file_id)?;
        Ok(FileHeader {
            version: FILE_VERSION,
            key_gen: generation as u16,
            file_id,
            reencrypted: 0,
        })
    }

    /// On-disk encoding: magic(4) version(2, LE) key_gen(2, LE) file_id(16)
    /// reencrypted(8, LE).
    pub fn encode(&self) -> [u8; FILE_HEADER_LEN] {
        let mut b = [0u8; FILE_HEADER_LEN];
        b[..4].copy_from_slice(FILE_MAGIC);
        b[4..6].copy_from_slice(&self.version.to_le_bytes());
        b[6..8].copy_from_slice(&self.key_gen.to_le_bytes());
        b[8..24].copy_from_slice(&self.file_id);
        b[24..32].copy_from_slice(&self.reencrypted.to_le_bytes());
        b
    }

    /// Parses a header of a known version (1 or 2); says what is wrong if it is not one.
    pub fn decode(b: &[u8]) -> Result<FileHeader, String> {
        if b.len() < FILE_HEADER_LEN {
            return Err(format!("file header truncated to {} bytes", b.len()));
        }
        if &b[..4] != FILE_MAGIC {
            return Err("file header has a wrong magic".into());
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        if version != FILE_VERSION && version != FILE_VERSION_V1 {
            return Err(format!("file header version {version} is not supported"));
        }
        let mut file_id = [0u8; 16];
        file_id.copy_from_slice(&b[8..24]);
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[24..32]);
        Ok(FileHeader {
            version,
            key_gen: u16::from_le_bytes([b[6], b[7]]),
            file_id,
            reencrypted: u64::from_le_bytes(w),
        })
    }

    /// The tweak of unit 0 (unit `i` uses `tweak + i`, wrapping).
    pub fn tweak(&self) -> u128 {
        u128::from_le_bytes(self.file_id)
    }
}

/// `n` rounded up to a whole number of AES blocks.
pub fn roundup_block(n: u64) -> u64 {
    n.div_ceil(BLOCK) * BLOCK
}

/// Length of the data area (after the file header) of a file of logical size `size`.
pub fn data_len(size: u64) -> u64 {
    match size % BLOCK {
        0 => size,
        _ => size + BLOCK,
    }
}

/// Backing length of a file of logical size `size` that has a header (an empty file may also
/// be a 0-byte backing file).
pub fn backing_len(size: u64) -> u64 {
    FILE_HEADER_LEN as u64 + data_len(size)
}

/// Where the data units of a file of logical size `size` end (the last block's end; the
/// filler follows).
pub fn units_end(size: u64) -> u64 {
    roundup_block(size)
}

/// Bytes of filler after the units of a file of logical size `size`.
pub fn filler_len(size: u64) -> u64 {
    data_len(size) - units_end(size)
}

/// Logical size of a file whose backing file is `backing_len` bytes long (format v2).
pub fn logical_size(backing_len: u64) -> Result<u64, String> {
    let hdr = FILE_HEADER_LEN as u64;
    match backing_len {
        0 => Ok(0),
        n if n < hdr => Err(format!(
            "backing file of {n} bytes is shorter than a file header"
        )),
        n => {
            let d = n - hdr;
            match d % BLOCK {
                0 => Ok(d),
                _ if d < BLOCK => Err(format!(
                    "data area of {d} bytes is not a valid format v2 length (a file shorter \
                     than 16 bytes is stored as one 16-byte block and its filler; a file written \
                     by an older cmkfs needs `cmkfs upgrade`)"
                )),
                _ => Ok(d - BLOCK),
            }
        }
    }
}

/// The extent `[start, end)` of unit `unit` in a file of logical size `size` (`unit` must
/// hold data: `unit · unit_size < size`).
pub fn unit_extent(unit: u64, unit_size: u64, size: u64) -> (u64, u64) {
    let start = unit * unit_size;
    (start, (start + unit_size).min(units_end(size)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_round_trip_through_the_backing_length() {
        for s in (0..=8200u64).chain([1 << 20, (1 << 20) + 1, u32::MAX as u64 + 7]) {
            let len = backing_len(s);
            assert_eq!(logical_size(len), Ok(s), "size {s}");
            // The units end on a block boundary, at least one block past the start of the last
            // unit, and never past the data area.
            assert_eq!(units_end(s) % BLOCK, 0);
            assert!(units_end(s) >= s && units_end(s) < s + BLOCK);
            assert_eq!(units_end(s) + filler_len(s), data_len(s));
            assert_eq!(filler_len(s), s % BLOCK);
        }
        assert_eq!(logical_size(0), Ok(0));
        for bad in 1..32 {
            assert!(logical_size(bad).is_err(), "{bad}");
        }
        for d in 1..16 {
            assert!(logical_size(32 + d).is_err(), "data area {d}");
        }
        assert_eq!(logical_size(32 + 16), Ok(16));
        assert_eq!(logical_size(32 + 17), Ok(1));
        assert_eq!(logical_size(32 + 31), Ok(15));
    }

    #[test]
    fn unit_extents_are_whole_blocks() {
        assert_eq!(unit_extent(0, 4096, 1), (0, 16));
        assert_eq!(unit_extent(0, 4096, 16), (0, 16));
        assert_eq!(unit_extent(0, 4096, 17), (0, 32));
        assert_eq!(unit_extent(0, 4096, 5000), (0, 4096));
        assert_eq!(unit_extent(1, 4096, 4097), (4096, 4112));
        assert_eq!(unit_extent(1, 4096, 8192), (4096, 8192));
    }

    #[test]
    fn header_round_trip_and_versions() {
        let h = FileHeader::generate(0).unwrap();
        assert_eq!(h.version, FILE_VERSION);
        let g = FileHeader {
            key_gen: 7,
            reencrypted: 99,
            ..h
        };
        assert_eq!(FileHeader::decode(&g.encode()), Ok(g));
        assert_eq!(FileHeader::decode(&h.encode()), Ok(h));
        let v1 = FileHeader {
            version: FILE_VERSION_V1,
            ..h
        };
        assert_eq!(FileHeader::decode(&v1.encode()), Ok(v1));
        let mut b = h.encode();
        b[4] = 3;
        assert!(FileHeader::decode(&b).is_err());
        b = h.encode();
        b[0] = b'X';
        assert!(FileHeader::decode(&b).is_err());
        assert!(FileHeader::decode(&b[..10]).is_err());
    }
}
