//! The journal of a re-encryption: `CIPHERDIR/cmkfs.reencrypt.journal`.
//!
//! It says which phase the re-encryption is in (names, then contents) and, while a batch of
//! file ranges is being rewritten in place, enough to finish that batch after a crash: per
//! range its file (backing path from the root, checked against the file id), the units
//! `[from, to)`, and for every 512-byte sector of the backing file that the range touches the
//! first 8 bytes of SHA-256 over the range's bytes in that sector *as they are written*
//! (ciphertext under the new DEK, never plaintext). After a crash, a sector whose bytes hash
//! to that value holds new ciphertext, any other one old ciphertext: sectors are written
//! whole (the same assumption as LUKS2's "checksum" resilience; a killed process leaves whole
//! pages, which are whole sectors). Every range is then decrypted block by block with the key
//! its sector says and written again under the new DEK.
//!
//! The journal is authenticated with HMAC-SHA256 under a key derived from the volume's
//! current (new) DEK (`"reencrypt-journal"`): a journal forged or copied from another volume
//! is refused before anything in it is acted on. It is replaced atomically (temp → fsync →
//! rename → fsync dir).

use std::ffi::{OsStr, OsString};
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::OsStrExt;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::crypto::Dek;
use crate::volume::sys;

/// File name of the journal in the backing root (contains a `.`: never an encrypted name).
pub const JOURNAL_FILE: &str = "cmkfs.reencrypt.journal";
const FORMAT: &str = "cmkfs-reencrypt-journal";
const VERSION: u32 = 1;
/// Largest journal read back: a batch's hashes are far smaller.
const MAX_LEN: usize = 16 << 20;
/// The sector size the journal's hashes are taken over.
pub const HASH_SECTOR: u64 = 512;
/// Bytes of each sector hash.
pub const HASH_LEN: usize = 8;

/// Where a re-encryption stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Names, symlink targets and extended attributes are being re-encrypted.
    Names,
    /// File contents are being re-encrypted.
    Contents,
}

/// One range of one file in the batch being written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Item {
    /// Backing path from the root, one name per component (a hint: checked by file id).
    pub path: Vec<String>,
    /// The file id (hex), which identifies the file wherever it is now.
    pub file_id: String,
    /// First unit of the range.
    pub from: u64,
    /// Unit after the range.
    pub to: u64,
    /// Whether the file is complete after this range (its header then says the new
    /// generation).
    pub last: bool,
    /// Base64 of the sector hashes, [`HASH_LEN`] bytes per [`HASH_SECTOR`]-byte backing
    /// sector from the one holding the range's first byte.
    pub hashes: String,
}

/// The journal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Journal {
    format: String,
    version: u32,
    /// The volume's id.
    pub volume_id: String,
    /// The key generation being written (the header's `key_generation`).
    pub key_generation: u32,
    /// The phase.
    pub phase: Phase,
    /// The batch being written (empty between batches).
    pub items: Vec<Item>,
    /// Names phase: the extended attribute being moved under the new key by
    /// remove-then-set (it did not fit beside its old form).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xattr: Option<XattrMove>,
    mac: String,
}

/// An extended attribute too large to be stored twice on its inode (ext4 keeps all of an
/// inode's attributes in one block: ENOSPC), moved under the new key in three durable steps:
/// this record (with the value already sealed under the new DEK: no plaintext), the old
/// attribute removed, the new one set; then the record goes. Recovery sets the new one on
/// the recorded inode if it is not there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct XattrMove {
    /// Backing path from the root, one name per component (empty: the root itself).
    pub path: Vec<String>,
    /// The backing inode number at `path` (the record applies to that inode only).
    pub ino: u64,
    /// The attribute's backing name under the retiring key.
    pub old_name: String,
    /// Its backing name under the new key.
    pub new_name: String,
    /// Base64 of its value sealed under the new key.
    pub value: String,
}

impl Journal {
    /// A journal of `phase` with no batch.
    pub fn new(volume_id: &str, key_generation: u32, phase: Phase) -> Journal {
        Journal {
            format: FORMAT.into(),
            version: VERSION,
            volume_id: volume_id.into(),
            key_generation,
            phase,
            items: Vec::new(),
            xattr: None,
            mac: String::new(),
        }
    }

    fn mac_of(&self, dek: &Dek) -> Result<String, String> {
        let unsigned = Journal {
            mac: String::new(),
            ..self.clone()
        };
        let bytes = serde_json::to_vec(&unsigned).map_err(|e| e.to_string())?;
        let key = dek.derive::<32>("reencrypt-journal");
        let mut m =
            <Hmac<Sha256> as Mac>::new_from_slice(&key[..]).expect("HMAC takes any key length");
        m.update(&bytes);
        Ok(hex::encode(m.finalize().into_bytes()))
    }

    /// Writes the journal (MAC by `dek`) atomically into the backing root `root`.
    pub fn write(&self, root: BorrowedFd<'_>, dek: &Dek) -> std::io::Result<()> {
        let mut j = self.clone();
        j.mac = self.mac_of(dek).map_err(std::io::Error::other)?;
        let bytes = serde_json::to_vec(&j).map_err(std::io::Error::other)?;
        sys::write_atomic(root, OsStr::new(JOURNAL_FILE), &bytes, 0o600)
    }

    /// Reads the journal of the volume `volume_id` at generation `generation` from `root`:
    /// `Ok(None)` when there is none; an error when it is damaged, forged or another volume's.
    pub fn read(
        root: BorrowedFd<'_>,
        dek: &Dek,
        volume_id: &str,
        generation: u32,
    ) -> Result<Option<Journal>, String> {
        let bytes = match sys::read_small(root, OsStr::new(JOURNAL_FILE), MAX_LEN) {
            Ok(b) => b,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
            Err(e) => return Err(format!("unreadable: {e}")),
        };
        let j: Journal =
            serde_json::from_slice(&bytes).map_err(|e| format!("not a journal ({e})"))?;
        if j.format != FORMAT || j.version != VERSION {
            return Err(format!("format {} version {} unknown", j.format, j.version));
        }
        let want = j.mac_of(dek)?;
        let given = hex::decode(&j.mac).unwrap_or_default();
        let ok = hex::decode(&want)
            .map(|w| {
                w.len() == given.len()
                    && w.iter().zip(&given).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
            })
            .unwrap_or(false);
        if !ok {
            return Err("its MAC does not verify with the volume's key".into());
        }
        if j.volume_id != volume_id || j.key_generation != generation {
            // Authentic, but of an earlier re-encryption of this volume: stale.
            return Ok(None);
        }
        Ok(Some(j))
    }

    /// Removes the journal (and makes that durable).
    pub fn remove(root: BorrowedFd<'_>) -> std::io::Result<()> {
        match sys::unlink(root, OsStr::new(JOURNAL_FILE)) {
            Ok(()) => sys::fsync_dir(root),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

impl Item {
    /// The backing path's components.
    pub fn components(&self) -> Vec<OsString> {
        self.path
            .iter()
            .map(|c| OsStr::from_bytes(c.as_bytes()).to_os_string())
            .collect()
    }

    /// The decoded sector hashes.
    pub fn hashes(&self) -> Result<Vec<[u8; HASH_LEN]>, String> {
        let raw = B64
            .decode(&self.hashes)
            .map_err(|_| "sector hashes are not base64".to_string())?;
        if raw.len() % HASH_LEN != 0 {
            return Err("sector hashes have a wrong length".into());
        }
        Ok(raw
            .chunks(HASH_LEN)
            .map(|c| {
                let mut h = [0u8; HASH_LEN];
                h.copy_from_slice(c);
                h
            })
            .collect())
    }
}

/// The hash the journal keeps of one sector's bytes.
pub fn sector_hash(bytes: &[u8]) -> [u8; HASH_LEN] {
    let d = Sha256::digest(bytes);
    let mut h = [0u8; HASH_LEN];
    h.copy_from_slice(&d[..HASH_LEN]);
    h
}

/// Hashes of the bytes `data` will have once written at backing offset `at`: one per
/// [`HASH_SECTOR`]-byte sector of the backing file it touches, over the part of `data` in it.
pub fn hashes_of(at: u64, data: &[u8]) -> Vec<[u8; HASH_LEN]> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos < data.len() {
        let abs = at + pos as u64;
        let sector_end = (abs / HASH_SECTOR + 1) * HASH_SECTOR;
        let n = ((sector_end - abs) as usize).min(data.len() - pos);
        out.push(sector_hash(&data[pos..pos + n]));
        pos += n;
    }
    out
}

/// Encodes sector hashes for an [`Item`].
pub fn encode_hashes(h: &[[u8; HASH_LEN]]) -> String {
    B64.encode(h.concat())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_follow_backing_sectors() {
        let data = vec![7u8; 1000];
        // From offset 32: sector 0 holds 480 bytes, sector 1 512, sector 2 the last 8.
        let h = hashes_of(32, &data);
        assert_eq!(h.len(), 3);
        assert_eq!(h[0], sector_hash(&data[..480]));
        assert_eq!(h[1], sector_hash(&data[480..992]));
        assert_eq!(h[2], sector_hash(&data[992..]));
        assert_eq!(hashes_of(512, &data[..512]).len(), 1);
    }

    #[test]
    fn forged_and_foreign_journals_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let root = sys::open_root(d.path()).unwrap();
        use std::os::fd::AsFd;
        let dek = Dek::generate().unwrap();
        let mut j = Journal::new("ab", 3, Phase::Contents);
        j.items.push(Item {
            path: vec!["x".into()],
            file_id: "00".repeat(16),
            from: 0,
            to: 2,
            last: true,
            hashes: encode_hashes(&[[1; 8]]),
        });
        j.write(root.as_fd(), &dek).unwrap();
        assert_eq!(
            Journal::read(root.as_fd(), &dek, "ab", 3)
                .unwrap()
                .unwrap()
                .items,
            j.items
        );
        // Another generation: stale, ignored.
        assert_eq!(Journal::read(root.as_fd(), &dek, "ab", 4).unwrap(), None);
        // Another key: refused.
        let other = Dek::generate().unwrap();
        assert!(Journal::read(root.as_fd(), &other, "ab", 3).is_err());
        // Edited: refused.
        let p = d.path().join(JOURNAL_FILE);
        let text = std::fs::read_to_string(&p)
            .unwrap()
            .replace("\"to\":2", "\"to\":9");
        std::fs::write(&p, text).unwrap();
        assert!(Journal::read(root.as_fd(), &dek, "ab", 3).is_err());
        Journal::remove(root.as_fd()).unwrap();
        assert_eq!(Journal::read(root.as_fd(), &dek, "ab", 3).unwrap(), None);
    }
}
