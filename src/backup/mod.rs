//! `cmkfs backup` and `cmkfs restore` (docs/FORMAT.md, "Backup archive").
//!
//! A backup is one POSIX tar file holding the volume's backing store as it is — ciphertext,
//! encrypted names, symlink targets and xattrs, never plaintext — with its structure (modes,
//! owners, times, hard links, sparse regions), the DEK wrapped by a backup key of the owner's
//! choosing (any key of any configured vault, or a Disk Encryption Set's), and a manifest of
//! per-member SHA-256 digests under a MAC keyed from the DEK.
//!
//! A restore unwraps the DEK with the caller's rights first, then extracts into a temp
//! directory beside the target, checking every member's digest, the manifest and its MAC;
//! only a fully verified tree gets a header (the DEK wrapped by the chosen Disk Encryption
//! Set's key), is optionally re-encrypted under a fresh DEK, and is renamed into place.
//! Anything wrong removes the temp directory: nothing is left half-written.
//!
//! An incremental backup (`--incremental-from PREVIOUS`) stores only the entries that
//! changed since the previous archive of the chain and names the rest by reference; it is
//! bound to its base by the SHA-256 of the base's manifest ([`chain`]).

pub mod archive;
pub mod chain;
pub mod create;
pub mod delta;
mod extract;
pub mod leftovers;
pub mod manifest;
mod renumber;
pub mod restore;
pub(crate) mod screen;
pub mod temp;

use std::io;
use std::path::PathBuf;

use serde::Serialize;

pub use create::{backup, backup_into, check_quiet, BackupKey, BackupRequest, BaseState};
pub use manifest::{Stored, Totals};
pub use renumber::Renumbered;
pub use restore::{restore, RestoreReport, RestoreRequest};
pub use temp::ArchiveTemp;

/// Work done by the backups of this process: entries walked, data read, archive bytes
/// written, keys wrapped. A mounted volume's freeze is renewed only while it advances, so a
/// backup that blocks (its archive on a frozen mount, a stuck disk) loses the freeze after
/// the mount's `--freeze-limit` instead of holding writers for ever.
static ACTIVITY: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The work count (compare two readings: progress if they differ).
pub fn activity() -> u64 {
    ACTIVITY.load(std::sync::atomic::Ordering::Relaxed)
}

/// Records a step of a backup's work.
pub(crate) fn tick() {
    ACTIVITY.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// Why a backup or restore failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The archive is damaged or was tampered with.
    #[error("the archive is damaged or was changed: {0}; nothing was restored")]
    Corrupt(String),
    /// Reading the archive failed (truncated, unreadable).
    #[error("reading the archive failed ({0}): it is truncated or damaged; nothing was restored")]
    Read(io::Error),
    /// The backup key refused (disabled, deleted, no permission) or is unreachable.
    #[error("the backup key {0} cannot be used: {1}")]
    Key(String, crate::vault::VaultError),
    /// A system call on a path failed.
    #[error("{path}: {source}")]
    Io {
        /// The path (relative to the volume, or a file the command names).
        path: String,
        /// The error.
        source: io::Error,
    },
    /// Not done, and why.
    #[error("{0}")]
    Refused(String),
    /// The volume.
    #[error(transparent)]
    Volume(#[from] crate::volume::VolumeError),
    /// The target's Disk Encryption Set.
    #[error(transparent)]
    Des(#[from] crate::des::DesError),
    /// The vault.
    #[error(transparent)]
    Vault(#[from] crate::vault::VaultError),
    /// The re-encryption of a restore with a new DEK.
    #[error("re-encrypting the restored volume under a new DEK: {0}")]
    Reencrypt(#[from] crate::volume::reencrypt::ReencryptError),
    /// A bug.
    #[error("internal error: {0}")]
    Internal(String),
}

impl BackupError {
    fn io(path: &str, source: io::Error) -> BackupError {
        BackupError::Io {
            path: if path.is_empty() {
                "/".into()
            } else {
                path.into()
            },
            source,
        }
    }
}

/// Where a backup or restore is.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Progress {
    /// Bytes processed (backup: file bytes read; restore: archive bytes read).
    pub bytes_done: u64,
    /// Bytes in all (backup: file sizes; restore: the archive's size).
    pub bytes_total: u64,
    /// Members written or restored.
    pub members_done: u64,
    /// Members in all (backup only; 0 when unknown).
    pub members_total: u64,
}

/// What a backup did.
#[derive(Clone, Debug, Serialize)]
pub struct BackupReport {
    /// The archive.
    pub archive: PathBuf,
    /// The volume's id.
    pub volume_id: String,
    /// The key that wrapped the DEK in the archive.
    pub key_id: String,
    /// Whether the archive is a point-in-time view (see [`manifest::Manifest::point_in_time`]).
    pub point_in_time: bool,
    /// How long writes were held back (seconds), for a mounted volume.
    pub freeze_seconds: Option<f64>,
    /// Members (backing entries).
    pub members: u64,
    /// What they are.
    pub totals: Totals,
    /// Sockets skipped (they hold nothing).
    pub sockets_skipped: u64,
    /// An incremental archive: its base (the previous archive of the chain).
    pub base: Option<PathBuf>,
    /// An incremental archive: archives before it in its chain.
    pub chain_depth: Option<u32>,
    /// An incremental archive: what it stores itself, and what it takes from its base.
    pub stored: Option<Stored>,
    /// An incremental archive: files read to compare their data with the base (their change
    /// key differed: touched, renamed, metadata changed).
    pub files_compared: u64,
    /// Size of the archive.
    pub archive_bytes: u64,
    /// Temp files of killed backups to the same archive name, removed first.
    pub stale_temp_removed: Vec<PathBuf>,
    /// Time taken.
    pub seconds: f64,
}

pub(crate) fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub(crate) fn random_hex() -> String {
    let mut b = [0u8; 8];
    // The OS CSPRNG failing is not something to recover from here; a fixed name still works
    // (create_new refuses a clash).
    let _ = getrandom::getrandom(&mut b);
    hex::encode(b)
}
