//! `cmkfs fsck`: checks a volume's backing directory against the on-disk format
//! (docs/FORMAT.md) and, on request, repairs what can be repaired without the data.
//!
//! What is checked:
//!
//! - the volume header: structure, and with the key (unwrapped through the vault as a mount
//!   would) the DEK fingerprint and the header MAC; leftover temp files of a header update;
//! - every directory's `.cmkfs.dirid` (present, 16 bytes);
//! - every regular file's per-file header (a 0-byte file is an empty file; 1..31 bytes is
//!   corrupt; 32 bytes or more must start with a valid header), its version against the
//!   volume's and its length (format v2: a data area of 1..15 bytes is corrupt), with the
//!   key its key generation and a re-encryption's progress (`reencrypted`); on a
//!   format v1 volume, every 1..15-byte tail stored as all zeros, which v1 reads as zeros
//!   (`volume::upgrade::check_v1_volume_file`); every check of a file's header is
//!   `volume::file_check::judge`'s, shared with re-encryption and backup (`data_file`);
//! - the journal of an interrupted `cmkfs upgrade`;
//! - every encrypted name decrypts in its directory (with the key);
//! - long names: every `cmkfs.long.<hash>` entry has its side file, the side file's hash
//!   matches, and no side file is left without its entry;
//! - symlink targets decrypt (with the key), long targets' side files (`.cmkfs.target.*` at
//!   the root) exist, and none is left without a symlink;
//! - encrypted extended attributes (`user.cmkfs.*` on backing files and directories,
//!   `trusted.cmkfs.*` on other entries): name and value decrypt (with the key);
//! - leftover temp files (`.cmkfs-tmp.*`) of interrupted atomic updates, interrupted `mkdir`
//!   temp directories included, and directories a rename over an empty directory replaced
//!   (marked `.cmkfs.replaced`) but did not get to remove;
//! - anything else that is not in the format (reported as a warning and left alone: it is
//!   hidden from the plaintext view anyway);
//! - beside the backing directory (or instead of it, when it is not a volume yet), the temp
//!   directory of a killed `cmkfs restore` into it (`restore_temp`).
//!
//! The walk reaches deep directories through descriptors (`/proc/self/fd/N/name`), so a
//! backing path longer than PATH_MAX is checked like any other. It recurses per directory
//! level on a thread of its own ([`WALK_STACK`]) and goes no deeper than [`MAX_DEPTH`] levels:
//! below that it reports [`ProblemKind::TooDeep`] instead of overflowing its stack (a writer
//! can nest a backing tree tens of thousands of levels deep by copying a directory into
//! itself).
//!
//! Repairs ([`Options::repair`]) never delete user data. Metadata that no entry needs any more
//! (orphaned side files, temp files of interrupted header / side-file updates, `mkdir` temp
//! directories holding nothing but their id) is removed; a directory without an id that holds
//! no entries gets a fresh one; a header lost in the middle of an update is restored from its
//! verified temp copy. Everything else that is wrong — a file whose header is corrupt, a name
//! that does not decrypt, an entry whose long name is lost, a directory whose id is lost —
//! is moved into `CIPHERDIR/cmkfs.quarantine/<timestamp>/` under its relative backing path,
//! out of the plaintext view (the name contains a `.`, so readdir hides it) but kept. An
//! extended attribute that does not decrypt is saved, raw, into the batch's
//! `cmkfs.xattrs.json` and then removed from its file.
//!
//! Plaintext names appear only in the [`Report`] handed to the caller, never in anything
//! written to the backing directory (the quarantine manifest names backing paths only).

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine as _;
use serde::Serialize;

use crate::crypto::VolumeKeys;
use crate::fsutil::{self, TEMP_PREFIX};
use crate::home::Home;
use crate::vault::{Vault, VaultError};
use crate::volume::content::FILE_HEADER_LEN;
use crate::volume::header::{VolumeHeader, FORMAT_V2, HEADER_FILE};
use crate::volume::lock::VolumeLock;
use crate::volume::names::{self, DirId, EntryKind, DIRID_FILE, LONG_PREFIX, LONG_SUFFIX};
use crate::volume::rename::REPLACED_MARKER;
use crate::volume::symlink::{long_target_ref, LONG_TARGET_PREFIX, MAX_TARGET};
use crate::volume::sys::{self, Access};
use crate::volume::upgrade::{self, FormatFinding, JOURNAL_FILE};
use crate::volume::VolumeError;

/// Most bytes read from a long-name side file (a name is at most 255 bytes; its encrypted,
/// encoded form far less than this).
const MAX_SIDE_FILE: usize = 4096;
/// Most bytes read from a directory id file (16 are valid; a few more make a clear error).
const MAX_DIRID_FILE: usize = 64;

/// Deepest directory level the walk checks (the backing root is level 1); deeper directories
/// are reported as [`ProblemKind::TooDeep`], not entered. Every level holds its path and a
/// descriptor while the levels below it are checked, so the bound also bounds those.
pub const MAX_DEPTH: usize = 1000;

/// Stack of the walk's thread: the walk recurses once per directory level, and a debug build
/// takes a few KiB per level ([`MAX_DEPTH`] levels need far less than this; the pages are only
/// committed as they are used).
pub const WALK_STACK: usize = 64 << 20;

/// The quarantine directory at the backing root. Contains a `.`, so it is metadata: the
/// plaintext view never shows it and no encrypted name can collide with it.
pub const QUARANTINE_DIR: &str = "cmkfs.quarantine";
/// The manifest written into each quarantine batch (backing paths and reasons only).
pub const MANIFEST_FILE: &str = "cmkfs.fsck.json";
/// Raw extended attributes set aside by a repair, in each quarantine batch.
pub const XATTRS_FILE: &str = "cmkfs.xattrs.json";
/// Backing xattr names of encrypted attributes start with these (volume::xattr).
const XATTR_PREFIXES: [&str; 2] = [
    crate::volume::xattr::PREFIX,
    crate::volume::xattr::TRUSTED_PREFIX,
];
/// Longest backing path some checks still make by path (longer ones are skipped there).
const LONG_PATH: usize = 2048;

/// Version of the JSON report.
pub const REPORT_SCHEMA: u32 = 1;
/// Exit status: nothing wrong.
pub const EXIT_CLEAN: i32 = 0;
/// Exit status: problems were found and all of them repaired.
pub const EXIT_REPAIRED: i32 = 1;
/// Exit status: problems remain (found without `--repair`, or not repairable).
pub const EXIT_PROBLEMS_LEFT: i32 = 2;
/// Exit status: fsck itself could not run (not a volume, mounted, no key, I/O error).
pub const EXIT_ERROR: i32 = 8;

/// Opens the vault connection that unwraps a volume's DEK, given its header (the caller
/// decides which identity to use, exactly as a mount of that volume would).
pub type VaultOpener<'a> = &'a dyn Fn(&VolumeHeader) -> Result<Box<dyn Vault>, String>;

/// How to run a check.
pub struct Options<'a> {
    /// Repair what can be repaired and quarantine the rest (refused on a mounted volume).
    pub repair: bool,
    /// Where the DEK comes from; `None` checks the structure only (names, symlink targets
    /// and the header MAC need the key and are then not checked).
    pub vault: Option<VaultOpener<'a>>,
    /// The cmkfs home whose run records tell whether the volume is mounted.
    pub home: &'a Home,
}

/// Why fsck could not run (as opposed to problems it found in the volume).
#[derive(Debug, thiserror::Error)]
pub enum FsckError {
    /// Neither a header nor anything else of a volume.
    #[error("{} is not a cmkfs volume (no {HEADER_FILE} and no {DIRID_FILE})", .0.display())]
    NotAVolume(PathBuf),
    /// Repairs need the volume unmounted.
    #[error("{} is mounted at {} (daemon {pid}); unmount it before `fsck --repair`", cipherdir.display(), mountpoint.display())]
    Mounted {
        /// The backing directory.
        cipherdir: PathBuf,
        /// Where it is mounted.
        mountpoint: PathBuf,
        /// The daemon's pid (0 when only the kernel's mount table knows of it).
        pid: u32,
    },
    /// The DEK could not be had for reasons outside the volume (vault denied, unreachable).
    #[error("cannot unwrap the volume key: {0} (run with --no-key to check the structure only)")]
    Key(String),
    /// The header's key opens none of the names at the root: another volume's header. A
    /// walk would report (and `--repair` quarantine) every entry of the volume.
    #[error("{0}")]
    ForeignHeader(String),
    /// An I/O error that stops the whole check.
    #[error("{}: {error}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        error: io::Error,
    },
}

impl FsckError {
    fn io(path: &Path, error: io::Error) -> FsckError {
        FsckError::Io {
            path: path.to_path_buf(),
            error,
        }
    }
}

/// What kind of problem an entry has.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    /// `cmkfs.volume.json` is missing although the directory holds a volume.
    HeaderMissing,
    /// The header does not parse or fails its structural checks.
    HeaderCorrupt,
    /// The wrapped DEK does not unwrap with the key the header names.
    HeaderUnwrapFailed,
    /// The unwrapped DEK does not match the header's fingerprint.
    HeaderFingerprintMismatch,
    /// The header MAC does not verify (layout fields changed).
    HeaderMacMismatch,
    /// A temp file of an interrupted header update.
    HeaderTempFile,
    /// A directory without `.cmkfs.dirid`.
    DirIdMissing,
    /// A `.cmkfs.dirid` that is not 16 bytes (or not a file).
    DirIdCorrupt,
    /// A `.cmkfs.dirid` of 16 zero bytes: what a lost write leaves, never a random id; the
    /// mount refuses the directory (EIO).
    DirIdZero,
    /// A backing file of 1..31 bytes: shorter than a file header.
    FileHeaderTruncated,
    /// A backing file whose first 32 bytes are not a cmkfs file header.
    FileHeaderCorrupt,
    /// An encrypted name that does not decrypt in its directory.
    NameUndecryptable,
    /// A long-name entry without its side file.
    LongNameSideFileMissing,
    /// A long-name side file whose content does not hash to its entry's name.
    LongNameHashMismatch,
    /// A long-name entry whose side file holds an encoding short enough for a plain entry:
    /// never written by cmkfs (planted); hidden from listings, else shown twice.
    LongNameNotCanonical,
    /// A long-name side file whose entry does not exist.
    LongNameOrphanSideFile,
    /// A symlink whose stored target does not decrypt.
    SymlinkUndecryptable,
    /// An encrypted extended attribute whose name or value does not decrypt.
    XattrUndecryptable,
    /// A temp file of an interrupted side-file (or other atomic) update.
    TempFile,
    /// A temp directory of an interrupted `mkdir`.
    MkdirTempDir,
    /// A device node (no longer a problem: cmkfs stores device nodes since format issue 12;
    /// kept so that old reports still parse).
    DeviceNode,
    /// A long symlink target's side file (`.cmkfs.target.*`) no symlink refers to (left by
    /// an interrupted symlink or unlink).
    LongTargetOrphan,
    /// A directory a rename over an empty directory replaced but did not get to remove
    /// (a crash between the two steps).
    ReplacedDirLeftover,
    /// An entry that could not be read.
    Unreadable,
    /// Something the format does not know (hidden from the plaintext view; left alone).
    UnknownEntry,
    /// The volume is in on-disk format v1 (`cmkfs upgrade` converts it).
    FormatV1,
    /// v1: a file's last 1..15 bytes read as zeros although they hold data (the v1 tail
    /// bug); `cmkfs upgrade` recovers them.
    V1TailReadAsZeros,
    /// v1: a file's last 1..15 bytes are stored as all zeros and taken for a hole.
    V1TailHole,
    /// A v1 file in a v2 volume (its reads fail until `cmkfs upgrade`).
    FileFormatV1,
    /// A v2 file in a v1 volume (an interrupted upgrade).
    FileFormatV2,
    /// A backing length no file of the volume's layout can have (v3: also 32..4095, inside
    /// the header area).
    FileLengthInvalid,
    /// A file whose header version is another format's than the volume's and that no upgrade
    /// converts (a v2 file in a v3 volume): unreadable, quarantined by `--repair`.
    FileFormatMismatch,
    /// A file whose header names a key generation that is neither the volume's current one
    /// nor, during a re-encryption, the retiring one: no DEK of the volume decrypts it
    /// (checked with the key only); quarantined by `--repair`.
    KeyGenerationUnknown,
    /// A file header whose `reencrypted` progress is set although its data is not under the
    /// retiring generation of a running re-encryption (damage: a re-encryption would skip
    /// units it never converted); checked with the key only; quarantined by `--repair`.
    ReencryptionProgressInvalid,
    /// `cmkfs.quarantine/` holds entries an earlier `--repair` (perhaps of an older cmkfs) set
    /// aside: not corruption (a warning), but the plaintext view lacks them until they are
    /// moved back (by the `cmkfs.fsck.json` of each batch) or deleted.
    QuarantineNotEmpty,
    /// The journal of an interrupted `cmkfs upgrade` (a mount or `cmkfs upgrade` finishes it).
    UpgradeInterrupted,
    /// An upgrade journal that cannot be used (damaged, or not this volume's): mounts and
    /// `cmkfs upgrade` refuse the volume while it is there.
    UpgradeJournalUnusable,
    /// `cmkfs.lock` is not a regular file of the volume's owner (a symlink, FIFO, directory, or
    /// another user's file): every mount and command refuses the volume while it is there.
    LockFileInvalid,
    /// `cmkfs.quarantine` is not a directory (a symlink could take repaired entries out of
    /// the volume): nothing is quarantined while it is there.
    QuarantineInvalid,
    /// A re-encryption under a new DEK is in progress or was interrupted (`cmkfs volume
    /// reencrypt` resumes it; the volume mounts meanwhile).
    ReencryptInProgress,
    /// A directory more than [`MAX_DEPTH`] levels below the root: not checked (nor anything
    /// below it), so orphans are not decided either.
    TooDeep,
    /// The temp directory of a `cmkfs restore` into this target that was killed (or, as a
    /// warning, of one still running), beside the target.
    RestoreLeftover,
}

/// How serious a finding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// The volume is not consistent: counts for the exit status.
    Error,
    /// Worth knowing, harmless to the plaintext view: does not change the exit status.
    Warning,
}

/// What `--repair` does (or did) about a problem.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fix {
    /// Delete it: metadata nothing refers to, or an unfinished update that never took effect.
    Remove,
    /// Move it (and its side file) into the quarantine: it cannot be fixed without the data.
    Quarantine,
    /// Put the verified temp copy of the header in place.
    Restore,
    /// Write a fresh directory id (the directory holds no entries whose names need the old one).
    Recreate,
    /// Nothing can be done automatically.
    None,
}

/// One problem, where it is, and what was done about it.
#[derive(Clone, Debug, Serialize)]
pub struct Problem {
    /// What is wrong.
    pub kind: ProblemKind,
    /// Whether it counts for the exit status.
    pub severity: Severity,
    /// The backing path, relative to the backing directory (`.` for the root).
    pub backing: PathBuf,
    /// The entry's plaintext path, when its name (and its parents' names) decrypted.
    pub plaintext: Option<PathBuf>,
    /// The plaintext path of the directory the entry is in, when known.
    pub plaintext_dir: Option<PathBuf>,
    /// Details (never plaintext).
    pub detail: String,
    /// What `--repair` does about it.
    pub fix: Fix,
    /// With `--repair`: whether the fix was applied.
    pub repaired: bool,
    /// With `--repair`: where a quarantined entry went (relative to the backing directory).
    pub moved_to: Option<PathBuf>,
    /// With `--repair`: why the fix failed.
    pub repair_error: Option<String>,
}

/// How much of the volume was looked at.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Counts {
    /// Directories, the root included.
    pub directories: u64,
    /// Regular files.
    pub files: u64,
    /// Symlinks.
    pub symlinks: u64,
    /// FIFOs, sockets and device nodes.
    pub special: u64,
    /// Entries stored under a long name.
    pub long_names: u64,
}

/// Whether the key was used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyCheck {
    /// Unwrapped and verified (fingerprint, MAC); names and symlink targets were checked.
    Verified,
    /// Not asked for: structure only.
    NotUsed,
    /// The header is unusable, so names could not be checked.
    HeaderUnusable,
}

/// The overall result, as the exit status says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Nothing wrong (warnings aside).
    Clean,
    /// Problems found, all repaired.
    Repaired,
    /// Problems remain.
    ProblemsLeft,
}

impl Outcome {
    /// The process exit status for this outcome.
    pub fn exit_code(self) -> i32 {
        match self {
            Outcome::Clean => EXIT_CLEAN,
            Outcome::Repaired => EXIT_REPAIRED,
            Outcome::ProblemsLeft => EXIT_PROBLEMS_LEFT,
        }
    }
}

/// Everything one run found.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Report format version.
    pub schema: u32,
    /// The backing directory (canonical).
    pub cipherdir: PathBuf,
    /// The volume id, when the header could be read.
    pub volume_id: Option<String>,
    /// Whether repairs were asked for.
    pub repair: bool,
    /// Whether the key was used.
    pub keys: KeyCheck,
    /// What was looked at.
    pub counts: Counts,
    /// Every finding, in walk order.
    pub problems: Vec<Problem>,
    /// The quarantine batch of this run (relative to the backing directory), if anything
    /// was moved there.
    pub quarantine: Option<PathBuf>,
    /// The outcome (see [`Outcome::exit_code`]).
    pub outcome: Outcome,
    /// The exit status the CLI uses.
    pub exit_code: i32,
}

impl Report {
    fn finish(&mut self) {
        let errors = self
            .problems
            .iter()
            .filter(|p| p.severity == Severity::Error);
        let (mut any, mut left) = (false, false);
        for p in errors {
            any = true;
            left |= !p.repaired;
        }
        self.outcome = match (any, left) {
            (false, _) => Outcome::Clean,
            (true, false) => Outcome::Repaired,
            (true, true) => Outcome::ProblemsLeft,
        };
        self.exit_code = self.outcome.exit_code();
    }

    /// The problems that count for the exit status.
    pub fn errors(&self) -> impl Iterator<Item = &Problem> {
        self.problems
            .iter()
            .filter(|p| p.severity == Severity::Error)
    }
}

/// Checks (and with [`Options::repair`], repairs) the volume in `dir`.
pub fn run(dir: &Path, opts: &Options<'_>) -> Result<Report, FsckError> {
    if let Some(r) = restore_temp::check_target(dir, opts.repair) {
        return Ok(r);
    }
    let root = fs::canonicalize(dir).map_err(|e| FsckError::io(dir, e))?;
    if !root.is_dir() {
        return Err(FsckError::io(&root, io::Error::other("not a directory")));
    }
    if opts.repair {
        if let Some((mountpoint, pid)) = find_mount(&root, opts.home) {
            return Err(FsckError::Mounted {
                cipherdir: root,
                mountpoint,
                pid,
            });
        }
    }
    let mut c = Checker {
        root: root.clone(),
        repair: opts.repair,
        keys: None,
        format: None,
        batch: None,
        quarantined: Vec::new(),
        xattrs: Vec::new(),
        deep: std::collections::HashMap::new(),
        targets_used: BTreeSet::new(),
        walk_complete: true,
        depth: 0,
        report: Report {
            schema: REPORT_SCHEMA,
            cipherdir: root.clone(),
            volume_id: None,
            repair: opts.repair,
            keys: KeyCheck::NotUsed,
            counts: Counts::default(),
            problems: Vec::new(),
            quarantine: None,
            outcome: Outcome::Clean,
            exit_code: EXIT_CLEAN,
        },
    };
    // A lock file no command can use is set aside first: the repair needs the lock itself.
    c.check_quarantine_dir();
    c.check_lock_file();
    // Also keeps a mount or an upgrade from starting while repairs run.
    let _lock = if opts.repair {
        Some(VolumeLock::exclusive(&root).map_err(|e| FsckError::io(&root, io::Error::other(e)))?)
    } else {
        None
    };
    c.check_header(opts.vault)?;
    if c.header_is_foreign() {
        return Err(FsckError::ForeignHeader(names::foreign_header_message(
            &root,
        )));
    }
    // The root never goes to the quarantine: its problems are recorded inside. The walk runs
    // on a thread with a stack sized for MAX_DEPTH levels, whatever the caller's stack.
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("fsck-walk".into())
            .stack_size(WALK_STACK)
            .spawn_scoped(s, || {
                let _ = c.check_dir(&root, Some(Path::new("/")));
            })
            .map_err(|e| FsckError::io(&root, e))?
            .join()
            .map_err(|_| FsckError::io(&root, io::Error::other("the directory walk panicked")))
    })?;
    c.check_long_targets();
    c.write_manifest();
    c.report
        .problems
        .extend(restore_temp::beside(&root, opts.repair));
    c.report.finish();
    Ok(c.report)
}

mod backing;
mod checker;
mod control_files;
pub(crate) mod data_file;
mod header;
mod mounted;
mod restore_temp;
mod walk;
mod xattrs;

use backing::*;
use checker::*;
#[cfg(test)]
use mounted::unescape_mountinfo;
pub use mounted::{find_mount, mounted_anywhere, UNKNOWN_MOUNTPOINT};

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(r: &Report) -> Vec<(ProblemKind, Fix, bool)> {
        r.problems
            .iter()
            .map(|p| (p.kind, p.fix, p.repaired))
            .collect()
    }

    #[test]
    fn a_lock_file_that_is_not_a_regular_file_is_reported_and_set_aside() {
        let d = tempfile::tempdir().unwrap();
        let home = Home::at(d.path().join("home"));
        let victim = d.path().join("victim");
        fs::write(&victim, b"untouched").unwrap();
        for planted in ["symlink", "fifo", "dir"] {
            let root = d.path().join(planted);
            fs::create_dir(&root).unwrap();
            fs::write(root.join(DIRID_FILE), [1u8; 16]).unwrap();
            let lock = root.join(crate::volume::lock::LOCK_FILE);
            match planted {
                "symlink" => std::os::unix::fs::symlink(&victim, &lock).unwrap(),
                "fifo" => rustix::fs::mknodat(
                    rustix::fs::CWD,
                    &lock,
                    rustix::fs::FileType::Fifo,
                    rustix::fs::Mode::from_raw_mode(0o600),
                    0,
                )
                .unwrap(),
                _ => fs::create_dir(&lock).unwrap(),
            }
            assert!(VolumeLock::exclusive(&root).is_err(), "{planted}");
            for repair in [false, true] {
                let opts = Options {
                    repair,
                    vault: None,
                    home: &home,
                };
                // (Without a header this volume also reports `header_missing`.)
                let r = run(&root, &opts).unwrap();
                assert_eq!(
                    kinds(&r)[0],
                    (ProblemKind::LockFileInvalid, Fix::Quarantine, repair),
                    "{planted}"
                );
            }
            // Moved, not followed: the lock works again, the symlink's target is untouched.
            assert!(fs::symlink_metadata(&lock).unwrap().is_file(), "{planted}");
            assert!(VolumeLock::exclusive(&root).is_ok(), "{planted}");
            let r = run(
                &root,
                &Options {
                    repair: false,
                    vault: None,
                    home: &home,
                },
            )
            .unwrap();
            assert!(
                r.problems
                    .iter()
                    .all(|p| p.kind != ProblemKind::LockFileInvalid),
                "{planted}: {:?}",
                kinds(&r)
            );
        }
        assert_eq!(fs::read(&victim).unwrap(), b"untouched");
    }

    #[test]
    fn a_quarantine_that_is_a_symlink_is_never_followed_and_repair_removes_the_link() {
        let d = tempfile::tempdir().unwrap();
        let home = Home::at(d.path().join("home"));
        let outside = d.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let root = d.path().join("v");
        fs::create_dir(&root).unwrap();
        fs::write(root.join(DIRID_FILE), [1u8; 16]).unwrap();
        std::os::unix::fs::symlink(&outside, root.join(QUARANTINE_DIR)).unwrap();
        // Something a repair would move to the quarantine: a lock file that is a directory.
        fs::create_dir(root.join(crate::volume::lock::LOCK_FILE)).unwrap();
        for repair in [false, true] {
            let opts = Options {
                repair,
                vault: None,
                home: &home,
            };
            let r = run(&root, &opts).unwrap();
            let k = kinds(&r);
            assert_eq!(
                k[0],
                (ProblemKind::QuarantineInvalid, Fix::Remove, repair),
                "{k:?}"
            );
            assert!(
                k.contains(&(ProblemKind::LockFileInvalid, Fix::Quarantine, repair)),
                "{k:?}"
            );
            assert_eq!(
                fs::read_dir(&outside).unwrap().count(),
                0,
                "repair {repair}"
            );
        }
        // The link is gone, the quarantine is a real directory holding the lock directory.
        let q = fs::symlink_metadata(root.join(QUARANTINE_DIR)).unwrap();
        assert!(q.is_dir() && !q.file_type().is_symlink());
        assert!(
            fs::symlink_metadata(root.join(crate::volume::lock::LOCK_FILE))
                .unwrap()
                .is_file()
        );
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape_mountinfo(br"/a\040b\134c"), b"/a b\\c".to_vec());
        assert_eq!(unescape_mountinfo(br"/x\04"), br"/x\04".to_vec());
    }

    #[test]
    fn not_a_volume_is_an_error_not_a_report() {
        let d = tempfile::tempdir().unwrap();
        let home = Home::at(d.path().join("home"));
        let opts = Options {
            repair: false,
            vault: None,
            home: &home,
        };
        assert!(matches!(
            run(d.path(), &opts),
            Err(FsckError::NotAVolume(_))
        ));
    }

    /// Structure-only checks and repairs, without a header or a key: a directory id is all
    /// it takes to be recognised as (the remains of) a volume.
    #[test]
    fn structural_problems_are_found_and_repaired_without_the_key() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("v");
        fs::create_dir(&root).unwrap();
        fs::write(root.join(DIRID_FILE), [1u8; 16]).unwrap();
        fs::write(root.join("cmkfs.long.orphan.name"), b"x").unwrap();
        fs::write(root.join("QUJD"), b"short").unwrap(); // 5 bytes: truncated header
        fs::write(root.join("QUJE"), b"").unwrap(); // empty file: fine
        let mk = root.join(".cmkfs-tmp.mkdir.00");
        fs::create_dir(&mk).unwrap();
        fs::write(mk.join(DIRID_FILE), [2u8; 16]).unwrap();
        let sub = root.join("QUJF");
        fs::create_dir(&sub).unwrap(); // a directory without an id, holding nothing
        let home = Home::at(d.path().join("home"));

        let check = Options {
            repair: false,
            vault: None,
            home: &home,
        };
        let r = run(&root, &check).unwrap();
        assert_eq!(r.outcome, Outcome::ProblemsLeft);
        assert_eq!(r.exit_code, EXIT_PROBLEMS_LEFT);
        assert_eq!(r.keys, KeyCheck::NotUsed);
        let k = kinds(&r);
        for want in [
            (ProblemKind::HeaderMissing, Fix::None, false),
            (ProblemKind::LongNameOrphanSideFile, Fix::Remove, false),
            (ProblemKind::FileHeaderTruncated, Fix::Quarantine, false),
            (ProblemKind::MkdirTempDir, Fix::Remove, false),
            (ProblemKind::DirIdMissing, Fix::Recreate, false),
        ] {
            assert!(k.contains(&want), "{want:?} missing from {k:?}");
        }
        assert_eq!(r.counts.files, 2);

        let repair = Options {
            repair: true,
            ..check
        };
        let r = run(&root, &repair).unwrap();
        // The missing header cannot be repaired: problems stay.
        assert_eq!(r.outcome, Outcome::ProblemsLeft);
        assert!(!root.join("cmkfs.long.orphan.name").exists());
        assert!(!mk.exists());
        assert!(sub.join(DIRID_FILE).is_file());
        let batch = root.join(r.quarantine.as_ref().expect("a quarantine batch"));
        assert!(batch.join("QUJD").is_file(), "kept under its relative path");
        assert!(batch.join(MANIFEST_FILE).is_file());
        assert!(root.join("QUJE").is_file(), "an empty file is left alone");
        assert_eq!(
            names::classify(OsStr::new(QUARANTINE_DIR)),
            EntryKind::Hidden,
            "the quarantine is hidden from the plaintext view"
        );
        // A second repair finds only the header problem, and notes what the first set aside.
        let r = run(&root, &repair).unwrap();
        let k = kinds(&r);
        assert_eq!(
            k,
            vec![
                (ProblemKind::QuarantineNotEmpty, Fix::None, false),
                (ProblemKind::HeaderMissing, Fix::None, false)
            ]
        );
        assert_eq!(r.problems[0].severity, Severity::Warning);
    }

    /// A backing tree 30 000 levels deep (a directory a writer copied into itself) made fsck
    /// overflow its stack and abort. It now checks MAX_DEPTH levels and reports where it
    /// stopped, and `--repair` leaves the subtree alone.
    #[test]
    fn a_30000_level_tree_is_reported_not_a_crash() {
        use rustix::fs::{Mode, OFlags};
        use std::os::fd::AsFd;
        const LEVELS: usize = 30_000;
        // On tmpfs where there is one: removing 30 000 levels from a disk filesystem takes
        // a minute on a busy machine, from memory a second.
        let shm = Path::new("/dev/shm");
        let d = if shm.is_dir() {
            tempfile::tempdir_in(shm).unwrap()
        } else {
            tempfile::tempdir().unwrap()
        };
        let root = d.path().join("v");
        fs::create_dir(&root).unwrap();
        fs::write(root.join(DIRID_FILE), [1u8; 16]).unwrap();
        // mkdirat chains: one descriptor at a time, no path longer than one name.
        let mut fd = sys::open_root(&root).unwrap();
        for level in 0..LEVELS {
            rustix::fs::mkdirat(&fd, "QUJF", Mode::from_raw_mode(0o700)).unwrap();
            let next = rustix::fs::openat(
                &fd,
                "QUJF",
                OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .unwrap();
            if level <= MAX_DEPTH + 1 {
                // Ids where the walk goes: the only finding is the depth.
                // (Not sys::write_new: a thousand fsyncs would make this slow.)
                let mut f =
                    sys::create_regular(next.as_fd(), OsStr::new(DIRID_FILE), 0o444).unwrap();
                io::Write::write_all(&mut f, &[2u8; 16]).unwrap();
            }
            fd = next;
        }
        drop(fd);
        let home = Home::at(d.path().join("home"));
        for repair in [false, true] {
            // On a small stack of its own, as a CLI caller's thread might be.
            let r = std::thread::scope(|s| {
                std::thread::Builder::new()
                    .stack_size(256 << 10)
                    .spawn_scoped(s, || {
                        let opts = Options {
                            repair,
                            vault: None,
                            home: &home,
                        };
                        run(&root, &opts).unwrap()
                    })
                    .unwrap()
                    .join()
                    .unwrap()
            });
            let k = kinds(&r);
            assert_eq!(
                k,
                vec![
                    (ProblemKind::HeaderMissing, Fix::None, false),
                    (ProblemKind::TooDeep, Fix::None, false)
                ],
                "repair: {repair}"
            );
            let deep = &r.problems[1];
            assert_eq!(deep.backing.components().count(), MAX_DEPTH);
            assert!(deep.detail.contains("not checked below"), "{}", deep.detail);
            assert_eq!(r.counts.directories as usize, MAX_DEPTH);
            assert_eq!(r.exit_code, EXIT_PROBLEMS_LEFT);
        }
        assert!(!root.join(QUARANTINE_DIR).exists(), "nothing was moved");
        // std's remove_dir_all holds a descriptor per level: rm(1) walks it without.
        let rm = std::process::Command::new("rm")
            .arg("-rf")
            .arg(&root)
            .status()
            .unwrap();
        assert!(rm.success());
    }
}
