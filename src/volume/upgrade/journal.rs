//! The undo journal of `cmkfs upgrade`: `CIPHERDIR/cmkfs.upgrade.journal`.
//!
//! Before a batch of files has its last unit converted, the journal records, per file, what
//! is needed to put it back exactly as it was: its backing path (relative, as stored), its
//! file id, old length, old file header, and the old **ciphertext** of its last unit — never
//! plaintext — plus the decision taken on an all-zero tail, so that a redo after a crash
//! decides the same way (the undo rewrites the tail, which changes its allocation). It also
//! records the backing root's atime and mtime from before the upgrade began (the journal is a
//! control file in the root, whose times are the mount root's): a run resumed after a crash
//! puts those back, not the times the crashed run's journal writes left.
//!
//! Encoding: one line of JSON, then one line with the hex SHA-256 of that JSON line. The file
//! is replaced atomically (temp → fsync → rename → fsync dir), so a reader sees a whole
//! journal or none; the digest still catches a damaged one.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::volume::layout::FILE_HEADER_LEN;
use crate::volume::v1::TailDecision;

/// File name of the journal in the backing directory (contains a `.`: never an encrypted
/// name, hidden from the plaintext view).
pub const JOURNAL_FILE: &str = "cmkfs.upgrade.journal";
const FORMAT: &str = "cmkfs-upgrade-journal";
const VERSION: u32 = 1;

/// One file of a batch, as it was before the conversion.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Backing path relative to the backing directory.
    pub backing: PathBuf,
    /// The file id (from its header; the conversion keeps it).
    pub file_id: [u8; 16],
    /// Backing length before.
    pub old_len: u64,
    /// File header before (version 1).
    pub old_header: [u8; FILE_HEADER_LEN],
    /// Index of the last unit.
    pub unit: u64,
    /// Stored bytes of the last unit before (v1 ciphertext, `old_len − 32 − unit·size`).
    pub old_unit: Vec<u8>,
    /// For an all-zero short tail: what it was taken for.
    pub zero_tail: Option<TailDecision>,
}

/// A journal: the volume it belongs to and one batch of files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Journal {
    /// Volume id of the volume header.
    pub volume_id: String,
    /// Data unit size.
    pub sector_size: u32,
    /// The batch.
    pub entries: Vec<Entry>,
    /// The backing root's (atime, mtime) before the upgrade began, as (seconds, nanoseconds);
    /// `None` in a journal of a cmkfs that did not record them.
    pub root_times: Option<RootTimes>,
}

/// A directory's (atime, mtime), each (seconds, nanoseconds).
pub type RootTimes = [(i64, u32); 2];

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    format: String,
    version: u32,
    volume_id: String,
    sector_size: u32,
    entries: Vec<WireEntry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    root_times: Option<RootTimes>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireEntry {
    /// Base64 of the path's bytes (exact for any name).
    backing: String,
    file_id: String,
    old_len: u64,
    old_header: String,
    unit: u64,
    old_unit: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    zero_tail: Option<TailDecision>,
}

impl Journal {
    /// The journal's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let wire = Wire {
            format: FORMAT.into(),
            version: VERSION,
            volume_id: self.volume_id.clone(),
            sector_size: self.sector_size,
            entries: self
                .entries
                .iter()
                .map(|e| WireEntry {
                    backing: B64.encode(e.backing.as_os_str().as_bytes()),
                    file_id: hex::encode(e.file_id),
                    old_len: e.old_len,
                    old_header: B64.encode(e.old_header),
                    unit: e.unit,
                    old_unit: B64.encode(&e.old_unit),
                    zero_tail: e.zero_tail,
                })
                .collect(),
            root_times: self.root_times,
        };
        // Serializing plain strings and numbers cannot fail.
        let mut out = serde_json::to_vec(&wire).unwrap_or_default();
        let digest = hex::encode(Sha256::digest(&out));
        out.push(b'\n');
        out.extend_from_slice(digest.as_bytes());
        out.push(b'\n');
        out
    }

    /// Parses a journal; says what is wrong if it is not a whole one.
    pub fn decode(bytes: &[u8]) -> Result<Journal, String> {
        let text = bytes
            .strip_suffix(b"\n")
            .ok_or("journal is not terminated")?;
        let split = text
            .iter()
            .rposition(|b| *b == b'\n')
            .ok_or("journal has no digest line")?;
        let (body, digest) = (&text[..split], &text[split + 1..]);
        if hex::encode(Sha256::digest(body)).as_bytes() != digest {
            return Err("journal digest does not match its contents".into());
        }
        let w: Wire =
            serde_json::from_slice(body).map_err(|e| format!("journal is not valid: {e}"))?;
        if w.format != FORMAT || w.version != VERSION {
            return Err(format!(
                "journal format {} v{} is unknown",
                w.format, w.version
            ));
        }
        if w.root_times
            .is_some_and(|t| t.iter().any(|(_, ns)| *ns >= 1_000_000_000))
        {
            return Err("journal has bad root times".into());
        }
        let entries = w
            .entries
            .into_iter()
            .map(|e| {
                let bad = |what: &str| format!("journal entry has a bad {what}");
                let backing = B64.decode(&e.backing).map_err(|_| bad("path"))?;
                let backing = PathBuf::from(OsStr::from_bytes(&backing));
                if backing.is_absolute()
                    || backing
                        .components()
                        .any(|c| !matches!(c, std::path::Component::Normal(_)))
                {
                    return Err(bad("path"));
                }
                let file_id = hex::decode(&e.file_id)
                    .ok()
                    .and_then(|v| <[u8; 16]>::try_from(v).ok())
                    .ok_or_else(|| bad("file id"))?;
                let old_header = B64
                    .decode(&e.old_header)
                    .ok()
                    .and_then(|v| <[u8; FILE_HEADER_LEN]>::try_from(v).ok())
                    .ok_or_else(|| bad("file header"))?;
                let old_unit = B64.decode(&e.old_unit).map_err(|_| bad("unit"))?;
                let expect = e
                    .old_len
                    .checked_sub(FILE_HEADER_LEN as u64 + e.unit * w.sector_size as u64);
                if old_unit.is_empty() || expect != Some(old_unit.len() as u64) {
                    return Err(bad("unit length"));
                }
                Ok(Entry {
                    backing,
                    file_id,
                    old_len: e.old_len,
                    old_header,
                    unit: e.unit,
                    old_unit,
                    zero_tail: e.zero_tail,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Journal {
            volume_id: w.volume_id,
            sector_size: w.sector_size,
            entries,
            root_times: w.root_times,
        })
    }

    /// The journal's path in backing directory `dir`.
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(JOURNAL_FILE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let j = Journal {
            volume_id: "ab".repeat(16),
            sector_size: 4096,
            entries: vec![Entry {
                backing: PathBuf::from("dir/ABC_-"),
                file_id: [7; 16],
                old_len: 32 + 4096 + 3,
                old_header: [1; 32],
                unit: 1,
                old_unit: vec![0, 0, 0],
                zero_tail: Some(TailDecision::Hole),
            }],
            root_times: Some([(1_600_000_000, 5), (1_500_000_000, 999_999_999)]),
        };
        let b = j.encode();
        assert_eq!(Journal::decode(&b), Ok(j.clone()));
        let mut bad = b.clone();
        bad[20] ^= 1;
        assert!(Journal::decode(&bad).is_err());
        assert!(Journal::decode(&b[..b.len() - 5]).is_err());
        let mut escape = j.clone();
        escape.entries[0].backing = PathBuf::from("../x");
        assert!(Journal::decode(&escape.encode()).is_err());
        let mut times = j.clone();
        times.root_times = Some([(0, 1_000_000_000), (0, 0)]);
        assert!(Journal::decode(&times.encode()).is_err());
        // A journal without root times (an older cmkfs's) reads as such.
        let old = Journal {
            root_times: None,
            ..j
        };
        let b = old.encode();
        assert!(!String::from_utf8_lossy(&b).contains("root_times"));
        assert_eq!(Journal::decode(&b), Ok(old));
    }
}
