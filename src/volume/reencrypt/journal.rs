//! The journal of a re-encryption: `CIPHERDIR/cmkfs.reencrypt.journal`.
//!
//! It says which phase the re-encryption is in (names, then contents) and, while a batch of
//! file ranges is being rewritten in place, enough to finish that batch after a crash: per
//! range its file (backing path from the root, checked against the file id), the units
//! `[from, to)`, and per *run* of the range (a stretch of units it rewrites; holes and
//! all-zero units between runs are neither written nor marked) a **mark** of every 512-byte
//! sector of the backing file the run touches: the first 8 bytes of the run's bytes in that sector *as they are written*
//! (ciphertext under the new DEK, never plaintext). After a crash, a sector that starts with
//! its mark holds new ciphertext, any other one old ciphertext: sectors are written whole
//! (the same assumption as LUKS2's "checksum" resilience; a killed process leaves whole
//! pages, which are whole sectors), and the old and the new ciphertext of a sector agree on
//! 8 bytes with probability 2^-64 (XTS under two independent keys). Every run is then
//! decrypted block by block with the key its sector says and written again under the new
//! DEK.
//!
//! Version 1 journals (older cmkfs) kept the first 8 bytes of SHA-256 over the sector's bytes
//! instead of the bytes themselves, over the whole range as one run: they are still read, so
//! a batch an older cmkfs left interrupted is finished the same way. A hash decides nothing
//! more than the bytes do (a sector that does not match is taken as old either way), and
//! hashing every sector took a quarter of a re-encryption's time.
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
/// The version this cmkfs writes (1 is still read).
const VERSION: u32 = 2;
/// Largest journal read back: a batch's marks are far smaller.
const MAX_LEN: usize = 16 << 20;
/// The sector size the journal's marks are taken over.
pub const MARK_SECTOR: u64 = 512;
/// Bytes of each sector mark.
pub const MARK_LEN: usize = 8;

/// One sector's mark.
pub type Mark = [u8; MARK_LEN];

/// Where a re-encryption stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Names, symlink targets and extended attributes are being re-encrypted.
    Names,
    /// File contents are being re-encrypted.
    Contents,
}

/// How a journal's marks were taken from a sector's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MarkKind {
    /// Version 2: the first [`MARK_LEN`] bytes.
    Head,
    /// Version 1: the first [`MARK_LEN`] bytes of SHA-256 over the bytes.
    Sha256,
}

impl MarkKind {
    /// The mark of one sector's `bytes` (the part of a run in that sector; never empty, a
    /// whole number of 16-byte blocks).
    pub fn of(self, bytes: &[u8]) -> Mark {
        let mut m = [0u8; MARK_LEN];
        match self {
            MarkKind::Head => {
                let n = bytes.len().min(MARK_LEN);
                m[..n].copy_from_slice(&bytes[..n]);
            }
            MarkKind::Sha256 => m.copy_from_slice(&Sha256::digest(bytes)[..MARK_LEN]),
        }
        m
    }
}

/// A stretch of units of one range that the batch rewrites, every one of them: a mark must
/// be taken from bytes that change (an all-zero unit is left as it is, and a sector may
/// begin with the end of one).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Run {
    /// First unit.
    pub from: u64,
    /// Unit after the run.
    pub to: u64,
    /// Base64 of the sector marks, [`MARK_LEN`] bytes per [`MARK_SECTOR`]-byte backing
    /// sector from the one holding the run's first byte.
    pub marks: String,
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
    /// The runs inside `[from, to)`, in order; the units between them were holes or all
    /// zeros and are not written.
    pub runs: Vec<Run>,
    /// The file's access and modification times before the batch, (seconds, nanoseconds):
    /// the batch's writes move them, and a recovery that finishes the batch sets them back
    /// (under the journal's MAC like the rest). Absent in journals of earlier versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub times: Option<[(i64, u32); 2]>,
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
    /// Names phase: the backing root's access and modification times, (seconds,
    /// nanoseconds), from before the re-encryption began. The names phase renames entries in
    /// the root and sets its times back only once they are all done: after a crash in
    /// between, the resumed phase sets these (the root's own times are then the crash's).
    /// Absent in journals of earlier cmkfs versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_times: Option<[(i64, u32); 2]>,
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

/// The journal of cmkfs before version 2, field for field (its MAC is over these bytes).
mod v1 {
    use super::Phase;
    use serde::{Deserialize, Serialize};

    #[derive(Clone, Debug, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Item {
        pub path: Vec<String>,
        pub file_id: String,
        pub from: u64,
        pub to: u64,
        pub last: bool,
        /// Base64 of 8 bytes of SHA-256 per 512-byte sector over the whole range.
        pub hashes: String,
    }

    #[derive(Clone, Debug, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Journal {
        pub format: String,
        pub version: u32,
        pub volume_id: String,
        pub key_generation: u32,
        pub phase: Phase,
        pub items: Vec<Item>,
        pub mac: String,
    }
}

/// Just enough of a journal to tell its version.
#[derive(Deserialize)]
struct Probe {
    format: String,
    version: u32,
}

/// HMAC-SHA256 (hex) of `unsigned`'s JSON under the journal key derived from `dek`.
fn mac_of<T: Serialize>(unsigned: &T, dek: &Dek) -> Result<String, String> {
    let bytes = serde_json::to_vec(unsigned).map_err(|e| e.to_string())?;
    let key = dek.derive::<32>("reencrypt-journal");
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&key[..]).expect("HMAC takes any key length");
    m.update(&bytes);
    Ok(hex::encode(m.finalize().into_bytes()))
}

/// Whether the hex MAC `given` is `want` (constant time).
fn mac_ok(want: &str, given: &str) -> bool {
    let given = hex::decode(given).unwrap_or_default();
    hex::decode(want)
        .map(|w| {
            w.len() == given.len()
                && w.iter().zip(&given).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
        })
        .unwrap_or(false)
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
            root_times: None,
            mac: String::new(),
        }
    }

    /// How this journal's marks were taken (by its version).
    pub fn mark_kind(&self) -> MarkKind {
        if self.version == 1 {
            MarkKind::Sha256
        } else {
            MarkKind::Head
        }
    }

    fn mac(&self, dek: &Dek) -> Result<String, String> {
        mac_of(
            &Journal {
                mac: String::new(),
                ..self.clone()
            },
            dek,
        )
    }

    /// Writes the journal (MAC by `dek`) atomically into the backing root `root`.
    pub fn write(&self, root: BorrowedFd<'_>, dek: &Dek) -> std::io::Result<()> {
        self.write_then(root, dek, &mut || ())
    }

    /// [`Journal::write`], calling `changed` right after each change of the root (the temp
    /// file created, the rename), before the fsyncs ([`sys::write_atomic_then`]).
    pub fn write_then(
        &self,
        root: BorrowedFd<'_>,
        dek: &Dek,
        changed: &mut dyn FnMut(),
    ) -> std::io::Result<()> {
        if self.version != VERSION {
            return Err(std::io::Error::other(
                "a journal of an older version is only read, never written",
            ));
        }
        let mut j = self.clone();
        j.mac = self.mac(dek).map_err(std::io::Error::other)?;
        let bytes = serde_json::to_vec(&j).map_err(std::io::Error::other)?;
        sys::write_atomic_then(root, OsStr::new(JOURNAL_FILE), &bytes, 0o600, changed)
    }

    /// Reads the journal of the volume `volume_id` at generation `generation` from `root`:
    /// `Ok(None)` when there is none; an error when it is damaged, forged or another volume's.
    /// A version 1 journal comes back with one run per item (its whole range) and
    /// [`MarkKind::Sha256`].
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
        let probe: Probe =
            serde_json::from_slice(&bytes).map_err(|e| format!("not a journal ({e})"))?;
        let j = match (probe.format.as_str(), probe.version) {
            (FORMAT, VERSION) => {
                let j: Journal =
                    serde_json::from_slice(&bytes).map_err(|e| format!("not a journal ({e})"))?;
                if !mac_ok(&j.mac(dek)?, &j.mac) {
                    return Err("its MAC does not verify with the volume's key".into());
                }
                j
            }
            (FORMAT, 1) => {
                let old: v1::Journal =
                    serde_json::from_slice(&bytes).map_err(|e| format!("not a journal ({e})"))?;
                let unsigned = v1::Journal {
                    mac: String::new(),
                    ..old.clone()
                };
                if !mac_ok(&mac_of(&unsigned, dek)?, &old.mac) {
                    return Err("its MAC does not verify with the volume's key".into());
                }
                Journal {
                    format: old.format,
                    version: 1,
                    volume_id: old.volume_id,
                    key_generation: old.key_generation,
                    phase: old.phase,
                    xattr: None,
                    root_times: None,
                    items: old
                        .items
                        .into_iter()
                        .map(|i| Item {
                            runs: vec![Run {
                                from: i.from,
                                to: i.to,
                                marks: i.hashes,
                            }],
                            path: i.path,
                            file_id: i.file_id,
                            from: i.from,
                            to: i.to,
                            last: i.last,
                            times: None,
                        })
                        .collect(),
                    mac: old.mac,
                }
            }
            (f, v) => return Err(format!("format {f} version {v} unknown")),
        };
        if j.volume_id != volume_id || j.key_generation != generation {
            // Authentic, but of an earlier re-encryption of this volume: stale.
            return Ok(None);
        }
        Ok(Some(j))
    }

    /// Removes the journal (and makes that durable), calling `removed` in between (see
    /// [`Journal::write_then`]).
    pub fn remove(root: BorrowedFd<'_>, removed: &mut dyn FnMut()) -> std::io::Result<()> {
        match sys::unlink(root, OsStr::new(JOURNAL_FILE)) {
            Ok(()) => {
                removed();
                sys::fsync_dir(root)
            }
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
}

impl Run {
    /// The decoded sector marks.
    pub fn marks(&self) -> Result<Vec<Mark>, String> {
        let raw = B64
            .decode(&self.marks)
            .map_err(|_| "sector marks are not base64".to_string())?;
        if raw.len() % MARK_LEN != 0 {
            return Err("sector marks have a wrong length".into());
        }
        Ok(raw
            .chunks(MARK_LEN)
            .map(|c| {
                let mut h = [0u8; MARK_LEN];
                h.copy_from_slice(c);
                h
            })
            .collect())
    }
}

/// Calls `f` with each [`MARK_SECTOR`]-byte sector's part of `data`, which is (or will be)
/// at backing offset `at`.
fn sector_parts<'d>(at: u64, data: &'d [u8], mut f: impl FnMut(&'d [u8])) {
    let mut pos = 0usize;
    while pos < data.len() {
        let abs = at + pos as u64;
        let sector_end = (abs / MARK_SECTOR + 1) * MARK_SECTOR;
        let n = ((sector_end - abs) as usize).min(data.len() - pos);
        f(&data[pos..pos + n]);
        pos += n;
    }
}

/// The marks (`kind`) of the bytes `data` will have once written at backing offset `at`:
/// one per [`MARK_SECTOR`]-byte sector of the backing file it touches, over the part of
/// `data` in it.
pub fn marks_of(kind: MarkKind, at: u64, data: &[u8]) -> Vec<Mark> {
    let mut out = Vec::with_capacity(data.len() / MARK_SECTOR as usize + 2);
    sector_parts(at, data, |part| out.push(kind.of(part)));
    out
}

/// The base64 marks of a run for a [`Run`] (version 2: [`MarkKind::Head`]), without a
/// `Vec` per sector.
pub fn encode_marks(at: u64, data: &[u8]) -> String {
    let mut raw = Vec::with_capacity((data.len() / MARK_SECTOR as usize + 2) * MARK_LEN);
    sector_parts(at, data, |part| {
        raw.extend_from_slice(&MarkKind::Head.of(part))
    });
    B64.encode(raw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn marks_follow_backing_sectors() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        // From offset 32: sector 0 holds 480 bytes, sector 1 512, sector 2 the last 8.
        for kind in [MarkKind::Head, MarkKind::Sha256] {
            let h = marks_of(kind, 32, &data);
            assert_eq!(h.len(), 3);
            assert_eq!(h[0], kind.of(&data[..480]));
            assert_eq!(h[1], kind.of(&data[480..992]));
            assert_eq!(h[2], kind.of(&data[992..]));
            assert_eq!(marks_of(kind, 512, &data[..512]).len(), 1);
        }
        assert_eq!(MarkKind::Head.of(&data[480..992]), data[480..488]);
        let run = Run {
            from: 0,
            to: 1,
            marks: encode_marks(32, &data),
        };
        assert_eq!(run.marks().unwrap(), marks_of(MarkKind::Head, 32, &data));
    }

    #[test]
    fn forged_and_foreign_journals_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let root = sys::open_root(d.path()).unwrap();
        let dek = Dek::generate().unwrap();
        let mut j = Journal::new("ab", 3, Phase::Contents);
        j.items.push(Item {
            path: vec!["x".into()],
            file_id: "00".repeat(16),
            from: 0,
            to: 9,
            last: true,
            runs: vec![Run {
                from: 2,
                to: 4,
                marks: B64.encode([1; 8]),
            }],
            times: Some([(1_577_836_800, 5), (1_577_836_800, 7)]),
        });
        j.write(root.as_fd(), &dek).unwrap();
        let back = Journal::read(root.as_fd(), &dek, "ab", 3).unwrap().unwrap();
        assert_eq!(back.items, j.items);
        assert_eq!(back.mark_kind(), MarkKind::Head);
        // Another generation: stale, ignored.
        assert_eq!(Journal::read(root.as_fd(), &dek, "ab", 4).unwrap(), None);
        // Another key: refused.
        let other = Dek::generate().unwrap();
        assert!(Journal::read(root.as_fd(), &other, "ab", 3).is_err());
        // Edited: refused.
        let p = d.path().join(JOURNAL_FILE);
        let text = std::fs::read_to_string(&p)
            .unwrap()
            .replace("\"to\":4", "\"to\":5");
        std::fs::write(&p, text).unwrap();
        assert!(Journal::read(root.as_fd(), &dek, "ab", 3).is_err());
        Journal::remove(root.as_fd(), &mut || ()).unwrap();
        assert_eq!(Journal::read(root.as_fd(), &dek, "ab", 3).unwrap(), None);
    }

    /// A batch an older cmkfs left interrupted: its version 1 journal (bytes as that version
    /// wrote them) is read, one run per item, with SHA-256 marks.
    #[test]
    fn a_version_1_journal_is_still_read() {
        let d = tempfile::tempdir().unwrap();
        let root = sys::open_root(d.path()).unwrap();
        let dek = Dek::generate().unwrap();
        let data = vec![9u8; 4096];
        let hashes = B64.encode(marks_of(MarkKind::Sha256, 32, &data).concat());
        let json = |mac: &str| {
            format!(
                "{{\"format\":\"cmkfs-reencrypt-journal\",\"version\":1,\"volume_id\":\"ab\",\
                 \"key_generation\":3,\"phase\":\"contents\",\"items\":[{{\"path\":[\"x\"],\
                 \"file_id\":\"{}\",\"from\":0,\"to\":1,\"last\":true,\"hashes\":\"{hashes}\"}}],\
                 \"mac\":\"{mac}\"}}",
                "00".repeat(16)
            )
        };
        let key = dek.derive::<32>("reencrypt-journal");
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&key[..]).unwrap();
        m.update(json("").as_bytes());
        let mac = hex::encode(m.finalize().into_bytes());
        let p = d.path().join(JOURNAL_FILE);
        std::fs::write(&p, json(&mac)).unwrap();
        let j = Journal::read(root.as_fd(), &dek, "ab", 3).unwrap().unwrap();
        assert_eq!(j.mark_kind(), MarkKind::Sha256);
        assert_eq!(j.items.len(), 1);
        let run = &j.items[0].runs[0];
        assert_eq!((run.from, run.to), (0, 1));
        assert_eq!(run.marks().unwrap(), marks_of(MarkKind::Sha256, 32, &data));
        // Read, never written back as version 1.
        assert!(j.write(root.as_fd(), &dek).is_err());
        // Edited: refused.
        std::fs::write(&p, json(&mac).replace("\"to\":1", "\"to\":2")).unwrap();
        assert!(Journal::read(root.as_fd(), &dek, "ab", 3).is_err());
    }
}
