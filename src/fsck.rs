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
//!   volume's and its length (format v2: a data area of 1..15 bytes is corrupt); on a
//!   format v1 volume, every 1..15-byte tail stored as all zeros, which v1 reads as zeros
//!   (`volume::upgrade::check_file_format`);
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
//!   hidden from the plaintext view anyway).
//!
//! The walk reaches deep directories through descriptors (`/proc/self/fd/N/name`), so a
//! backing path longer than PATH_MAX is checked like any other.
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
use std::io::{self, Read};
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
use crate::mount::RunRecord;
use crate::vault::{Vault, VaultError};
use crate::volume::content::{FileHeader, FILE_HEADER_LEN};
use crate::volume::header::{VolumeHeader, FORMAT_VERSION, HEADER_FILE};
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
    /// A backing length no v2 file can have.
    FileLengthInvalid,
    /// The journal of an interrupted `cmkfs upgrade` (a mount or `cmkfs upgrade` finishes it).
    UpgradeInterrupted,
    /// A re-encryption under a new DEK is in progress or was interrupted (`cmkfs volume
    /// reencrypt` resumes it; the volume mounts meanwhile).
    ReencryptInProgress,
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
    let root = fs::canonicalize(dir).map_err(|e| FsckError::io(dir, e))?;
    if !root.is_dir() {
        return Err(FsckError::io(&root, io::Error::other("not a directory")));
    }
    let _lock = if opts.repair {
        if let Some((mountpoint, pid)) = find_mount(&root, opts.home) {
            return Err(FsckError::Mounted {
                cipherdir: root,
                mountpoint,
                pid,
            });
        }
        // Also keeps a mount or an upgrade from starting while repairs run.
        Some(VolumeLock::exclusive(&root).map_err(|e| FsckError::io(&root, io::Error::other(e)))?)
    } else {
        None
    };
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
    c.check_header(opts.vault)?;
    // The root never goes to the quarantine: its problems are recorded inside.
    let _ = c.check_dir(&root, Some(Path::new("/")));
    c.check_long_targets();
    c.write_manifest();
    c.report.finish();
    Ok(c.report)
}

/// The mount of the volume at `root` (canonical), if one is live: a FUSE mount whose source is
/// `root` in this process's mount table, or a live daemon whose run record names `root`.
/// Returns the mountpoint and the daemon's pid (0 when unknown).
pub fn find_mount(root: &Path, home: &Home) -> Option<(PathBuf, u32)> {
    if let Some(r) = RunRecord::all(home)
        .into_iter()
        .find(|r| r.cipherdir == root && r.alive())
    {
        return Some((r.mountpoint, r.pid));
    }
    let info = fs::read("/proc/self/mountinfo").ok()?;
    for line in info.split(|b| *b == b'\n') {
        let fields: Vec<&[u8]> = line.split(|b| *b == b' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == b"-") else {
            continue;
        };
        let (Some(fstype), Some(source), Some(mp)) =
            (fields.get(sep + 1), fields.get(sep + 2), fields.get(4))
        else {
            continue;
        };
        if fstype.starts_with(b"fuse") && unescape_mountinfo(source) == root.as_os_str().as_bytes()
        {
            let mp = OsStr::from_bytes(&unescape_mountinfo(mp)).to_owned();
            return Some((PathBuf::from(mp), 0));
        }
    }
    None
}

/// Undoes mountinfo's `\ooo` escapes (space, tab, newline, backslash).
fn unescape_mountinfo(f: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(f.len());
    let mut i = 0;
    while i < f.len() {
        if f[i] == b'\\'
            && i + 3 < f.len()
            && f[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((f[i + 1] - b'0') * 64 + (f[i + 2] - b'0') * 8 + (f[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(f[i]);
            i += 1;
        }
    }
    out
}

/// How an entry's name turned out.
enum NameCheck {
    /// Decrypted (or not checked: no key): the plaintext name when known.
    Good(Option<OsString>),
    /// Wrong: the problem to record; the entry goes to the quarantine.
    Bad(ProblemKind, String),
}

struct Checker {
    root: PathBuf,
    repair: bool,
    keys: Option<VolumeKeys>,
    /// The volume header's format version and unit size, when it could be read.
    format: Option<(u32, u64)>,
    /// This run's quarantine batch, created on first use.
    batch: Option<PathBuf>,
    /// (backing path relative to the root, kind, detail) of everything quarantined, for the
    /// manifest.
    quarantined: Vec<(PathBuf, ProblemKind, String)>,
    /// (backing path, backing xattr name, raw value) of xattrs set aside by a repair.
    xattrs: Vec<(PathBuf, OsString, Vec<u8>)>,
    /// The directories being checked (the one in hand and its ancestors), held open: their
    /// entries are reached as `/proc/self/fd/N/name` (see [`Checker::io`]).
    deep: std::collections::HashMap<PathBuf, std::os::fd::OwnedFd>,
    /// Long-target side files some symlink refers to.
    targets_used: BTreeSet<OsString>,
    /// Whether every directory could be listed (orphans are only decided then).
    walk_complete: bool,
    report: Report,
}

impl Checker {
    /// The path to use for system calls on `p`: `p` itself, or for an entry of a deep
    /// directory, `/proc/self/fd/N/<name>` through the directory's descriptor (no length
    /// limit beyond one name; nothing on the way is a symlink we follow: the descriptors
    /// were opened with O_NOFOLLOW).
    fn io(&self, p: &Path) -> PathBuf {
        use std::os::fd::AsRawFd;
        if let Some(fd) = self.deep.get(p) {
            return PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
        }
        match (p.parent(), p.file_name()) {
            (Some(dir), Some(name)) => match self.deep.get(dir) {
                Some(fd) => PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd())).join(name),
                None => p.to_path_buf(),
            },
            _ => p.to_path_buf(),
        }
    }

    /// Holds `dir` open (`O_PATH|O_NOFOLLOW`, through its parent's descriptor) while it is
    /// checked, so that [`Checker::io`] reaches everything inside it through that descriptor:
    /// a directory swapped for a symlink while fsck runs cannot lead it (or `--repair`)
    /// outside the volume, and long paths need no length check.
    fn enter(&mut self, dir: &Path) -> io::Result<()> {
        if self.deep.contains_key(dir) {
            return Ok(());
        }
        let mut flags =
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC;
        // The root is the path the user named (it may be a symlink they chose).
        if dir != self.root {
            flags |= rustix::fs::OFlags::NOFOLLOW;
        }
        let fd = rustix::fs::open(self.io(dir).as_path(), flags, rustix::fs::Mode::empty())?;
        self.deep.insert(dir.to_path_buf(), fd);
        Ok(())
    }

    fn rel(&self, p: &Path) -> PathBuf {
        match p.strip_prefix(&self.root) {
            Ok(r) if r.as_os_str().is_empty() => PathBuf::from("."),
            Ok(r) => r.to_path_buf(),
            Err(_) => p.to_path_buf(),
        }
    }

    /// Records a problem and, when repairing, applies `fix` to `path` (plus `also`, e.g. a
    /// long name's side file that goes to the quarantine with its entry).
    #[allow(clippy::too_many_arguments)]
    fn problem(
        &mut self,
        kind: ProblemKind,
        path: &Path,
        plaintext: Option<PathBuf>,
        plaintext_dir: Option<&Path>,
        detail: String,
        fix: Fix,
        also: Option<&Path>,
    ) {
        let severity = match kind {
            ProblemKind::UnknownEntry
            | ProblemKind::FormatV1
            | ProblemKind::V1TailHole
            | ProblemKind::FileFormatV2
            | ProblemKind::ReencryptInProgress => Severity::Warning,
            _ => Severity::Error,
        };
        let mut p = Problem {
            kind,
            severity,
            backing: self.rel(path),
            plaintext,
            plaintext_dir: plaintext_dir.map(Path::to_path_buf),
            detail,
            fix,
            repaired: false,
            moved_to: None,
            repair_error: None,
        };
        if self.repair && severity == Severity::Error {
            let io_path = self.io(path);
            let result = match fix {
                Fix::Remove => remove_any(&io_path),
                Fix::Quarantine => self.quarantine(path, kind, &p.detail).map(|to| {
                    p.moved_to = Some(self.rel(&to));
                    if let Some(side) = also.filter(|s| s.exists()) {
                        if let Err(e) = self.quarantine(side, kind, &p.detail) {
                            tracing::warn!(path = %side.display(), error = %e, "could not quarantine a side file");
                        }
                    }
                }),
                Fix::Recreate => write_fresh_dir_id(&io_path),
                // Restores are applied where they are decided (they need the header).
                Fix::Restore => Ok(()),
                Fix::None => Err(io::Error::other("cannot be repaired automatically")),
            };
            match result {
                Ok(()) => p.repaired = true,
                Err(e) => p.repair_error = Some(e.to_string()),
            }
        }
        self.report.problems.push(p);
    }

    /// Moves `path` into this run's quarantine batch under its relative backing path.
    fn quarantine(&mut self, path: &Path, kind: ProblemKind, detail: &str) -> io::Result<PathBuf> {
        let batch = match &self.batch {
            Some(b) => b.clone(),
            None => {
                let b = new_batch(&self.root)?;
                self.report.quarantine = Some(self.rel(&b));
                self.batch = Some(b.clone());
                b
            }
        };
        let rel = self.rel(path);
        let to = batch.join(&rel);
        if let Some(parent) = to.parent() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)?;
        }
        rename_noreplace(&self.io(path), &to)?;
        self.quarantined.push((rel, kind, detail.to_string()));
        Ok(to)
    }

    /// Writes the quarantine batch's manifest: what was moved and why, in backing terms only;
    /// and the raw extended attributes set aside.
    fn write_manifest(&mut self) {
        if !self.xattrs.is_empty() && self.batch.is_none() {
            match new_batch(&self.root) {
                Ok(b) => {
                    self.report.quarantine = Some(self.rel(&b));
                    self.batch = Some(b);
                }
                Err(e) => tracing::warn!(error = %e, "could not create a quarantine batch"),
            }
        }
        let Some(batch) = self.batch.clone() else {
            return;
        };
        if !self.xattrs.is_empty() {
            let items: Vec<serde_json::Value> = self
                .xattrs
                .iter()
                .map(|(rel, name, value)| {
                    serde_json::json!({
                        "backing": rel,
                        "xattr": name.to_string_lossy(),
                        "value_base64": base64::engine::general_purpose::STANDARD.encode(value),
                    })
                })
                .collect();
            let path = batch.join(XATTRS_FILE);
            let bytes = serde_json::to_vec_pretty(&items).unwrap_or_default();
            if let Err(e) = fsutil::write_atomic(&path, &bytes, 0o600) {
                tracing::warn!(path = %path.display(), error = %e, "could not save the set-aside xattrs");
            }
        }
        let items: Vec<serde_json::Value> = self
            .quarantined
            .iter()
            .map(|(rel, kind, detail)| {
                serde_json::json!({ "backing": rel, "kind": kind, "detail": detail })
            })
            .collect();
        let doc = serde_json::json!({
            "schema": REPORT_SCHEMA,
            "volume_id": self.report.volume_id,
            "time": crate::keyring::rfc3339(SystemTime::now()),
            "items": items,
            "restore": "move an item back to its backing path (or under a new name) to make it visible again",
        });
        let path = batch.join(MANIFEST_FILE);
        let bytes = serde_json::to_vec_pretty(&doc).unwrap_or_default();
        if let Err(e) = fsutil::write_atomic(&path, &bytes, 0o600) {
            tracing::warn!(path = %path.display(), error = %e, "could not write the quarantine manifest");
        }
    }

    // -----------------------------------------------------------------------------------------
    // Volume header
    // -----------------------------------------------------------------------------------------

    fn check_header(&mut self, vault: Option<VaultOpener<'_>>) -> Result<(), FsckError> {
        let root = self.root.clone();
        let header_path = root.join(HEADER_FILE);
        let temps = header_temps(&root)?;
        // Why the main header cannot be used (None = it can).
        let trouble: Option<(ProblemKind, String)> = match VolumeHeader::read(&root) {
            Ok(h) => {
                self.report.volume_id = Some(h.volume_id.clone());
                self.format = Some((h.format_version, h.sector_size as u64));
                if h.format_version < FORMAT_VERSION {
                    self.problem(
                        ProblemKind::FormatV1,
                        &header_path,
                        None,
                        None,
                        format!(
                            "the volume is in on-disk format v{}; `cmkfs upgrade` (or a mount) \
                             converts it to v{FORMAT_VERSION} in place",
                            h.format_version
                        ),
                        Fix::None,
                        None,
                    );
                }
                match vault {
                    None => None,
                    Some(open) => match self.unlock(open, &h)? {
                        Ok(keys) => {
                            self.keys = Some(keys);
                            self.report.keys = KeyCheck::Verified;
                            None
                        }
                        Err(t) => Some(t),
                    },
                }
            }
            Err(VolumeError::NotAVolume(_)) => {
                if !root.join(DIRID_FILE).exists() && temps.is_empty() {
                    return Err(FsckError::NotAVolume(root));
                }
                Some((
                    ProblemKind::HeaderMissing,
                    format!("{HEADER_FILE} is missing"),
                ))
            }
            Err(VolumeError::CorruptHeader { why, .. }) => Some((ProblemKind::HeaderCorrupt, why)),
            Err(VolumeError::Io { path, error }) => return Err(FsckError::Io { path, error }),
            Err(e) => Some((ProblemKind::HeaderCorrupt, e.to_string())),
        };

        let Some((kind, why)) = trouble else {
            // The header is fine: any temp copy is an update that never took effect.
            for t in temps {
                self.problem(
                    ProblemKind::HeaderTempFile,
                    &t,
                    None,
                    None,
                    "temp file of an interrupted header update (the header itself is intact)"
                        .into(),
                    Fix::Remove,
                    None,
                );
            }
            return Ok(());
        };

        // The header is unusable: a temp copy that unwraps and verifies is the update that was
        // interrupted right before its rename, and can take its place.
        if vault.is_some() {
            self.report.keys = KeyCheck::HeaderUnusable;
        }
        let mut restore: Option<(PathBuf, VolumeHeader, VolumeKeys)> = None;
        if let Some(open) = vault {
            let mut candidates: Vec<(SystemTime, PathBuf)> = temps
                .iter()
                .map(|t| {
                    let m = fs::metadata(t)
                        .and_then(|m| m.modified())
                        .unwrap_or(SystemTime::UNIX_EPOCH);
                    (m, t.clone())
                })
                .collect();
            // Newest first.
            candidates.sort_by_key(|c| std::cmp::Reverse(c.0));
            for (_, t) in candidates {
                let Some(h) = parse_header_file(&t) else {
                    continue;
                };
                if let Ok(Ok(keys)) = self.unlock(open, &h) {
                    restore = Some((t, h, keys));
                    break;
                }
            }
        }
        match restore {
            Some((tmp, h, keys)) => {
                let detail = format!(
                    "{why}; {} holds a complete header that unwraps and verifies",
                    self.rel(&tmp).display()
                );
                let idx = self.report.problems.len();
                self.problem(kind, &header_path, None, None, detail, Fix::Restore, None);
                if self.repair {
                    let done =
                        fs::rename(&tmp, &header_path).and_then(|()| fsutil::sync_dir(&root));
                    let p = &mut self.report.problems[idx];
                    match done {
                        Ok(()) => p.repaired = true,
                        Err(e) => {
                            p.repaired = false;
                            p.repair_error = Some(e.to_string());
                        }
                    }
                }
                self.report.volume_id = Some(h.volume_id.clone());
                self.keys = Some(keys);
                self.report.keys = KeyCheck::Verified;
                for t in temps.into_iter().filter(|t| *t != tmp) {
                    self.problem(
                        ProblemKind::HeaderTempFile,
                        &t,
                        None,
                        None,
                        "temp file of an interrupted header update".into(),
                        Fix::Remove,
                        None,
                    );
                }
            }
            None => {
                self.problem(kind, &header_path, None, None, why, Fix::None, None);
                // Keep the temp copies: without a usable header they may be all that is left.
                for t in temps {
                    self.problem(
                        ProblemKind::HeaderTempFile,
                        &t,
                        None,
                        None,
                        "temp file of an interrupted header update (kept: the header is unusable)"
                            .into(),
                        Fix::None,
                        None,
                    );
                }
            }
        }
        Ok(())
    }

    /// Unwraps `h`'s DEK(s). `Ok(Err(..))` is a problem of the header; `Err` is a reason
    /// outside the volume (vault denied or unreachable) that stops the check.
    fn unlock(
        &self,
        open: VaultOpener<'_>,
        h: &VolumeHeader,
    ) -> Result<Result<VolumeKeys, (ProblemKind, String)>, FsckError> {
        let vault = open(h).map_err(FsckError::Key)?;
        let home = Home::from_env();
        Ok(
            match crate::unlock::keys(&home, &self.root, vault.as_ref(), h) {
                Ok(k) => Ok(k),
                Err(VolumeError::WrongKey(m)) => Err((ProblemKind::HeaderFingerprintMismatch, m)),
                Err(VolumeError::CorruptHeader { why, .. }) if why.contains("MAC") => {
                    Err((ProblemKind::HeaderMacMismatch, why))
                }
                Err(VolumeError::CorruptHeader { why, .. }) => {
                    Err((ProblemKind::HeaderCorrupt, why))
                }
                Err(e @ VolumeError::Vault(VaultError::UnwrapFailed { .. })) => {
                    Err((ProblemKind::HeaderUnwrapFailed, e.to_string()))
                }
                Err(e) => return Err(FsckError::Key(e.to_string())),
            },
        )
    }

    // -----------------------------------------------------------------------------------------
    // Directories and entries
    // -----------------------------------------------------------------------------------------

    /// Checks backing directory `dir` and everything below it. Returns why the directory
    /// itself must go to the quarantine (its id is lost and it holds entries whose names need
    /// it), if it must: the caller, which knows its name and side file, records and moves it.
    fn check_dir(&mut self, dir: &Path, plain: Option<&Path>) -> Option<(ProblemKind, String)> {
        if let Err(e) = self.enter(dir) {
            self.walk_complete = false;
            self.problem(
                ProblemKind::Unreadable,
                dir,
                plain.map(Path::to_path_buf),
                None,
                format!("cannot open the directory (it is no longer a directory?): {e}"),
                Fix::None,
                None,
            );
            return None;
        }
        let verdict = self.check_dir_entries(dir, plain);
        self.deep.remove(dir);
        verdict
    }

    fn check_dir_entries(
        &mut self,
        dir: &Path,
        plain: Option<&Path>,
    ) -> Option<(ProblemKind, String)> {
        self.report.counts.directories += 1;
        let is_root = dir == self.root;
        let mut entries: Vec<OsString> = match fs::read_dir(self.io(dir)) {
            Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.file_name())).collect(),
            Err(e) => {
                self.walk_complete = false;
                self.problem(
                    ProblemKind::Unreadable,
                    dir,
                    plain.map(Path::to_path_buf),
                    None,
                    format!("cannot list the directory: {e}"),
                    Fix::None,
                    None,
                );
                return None;
            }
        };
        entries.sort();
        let present: BTreeSet<OsString> = entries.iter().cloned().collect();
        let holds_names = entries
            .iter()
            .any(|n| names::classify(n) != EntryKind::Hidden);

        // The directory id: without it no name in here can be decrypted.
        let mut verdict = None;
        let id: Option<DirId> = match read_dir_id(&self.io(dir)) {
            Ok(id) => Some(id),
            Err((kind, why)) if !holds_names => {
                self.problem(
                    kind,
                    &dir.join(DIRID_FILE),
                    None,
                    plain,
                    format!("{why}; the directory holds no entries, so a fresh id loses nothing"),
                    Fix::Recreate,
                    None,
                );
                None
            }
            Err((kind, why)) if is_root => {
                self.problem(
                    kind,
                    &dir.join(DIRID_FILE),
                    None,
                    plain,
                    format!("{why}; the names in the root cannot be decrypted"),
                    Fix::None,
                    None,
                );
                None
            }
            Err((kind, why)) => {
                verdict = Some((
                    kind,
                    format!(
                        "{why}; the names of its entries cannot be decrypted, so the directory \
                         goes to the quarantine with everything in it"
                    ),
                ));
                None
            }
        };

        for name in &entries {
            let path = dir.join(name);
            let b = name.as_bytes();
            if b == DIRID_FILE.as_bytes() {
                continue;
            }
            if is_root && (b == HEADER_FILE.as_bytes() || b == QUARANTINE_DIR.as_bytes()) {
                continue;
            }
            if is_root && b == crate::volume::reencrypt::JOURNAL_FILE.as_bytes() {
                self.problem(
                    ProblemKind::ReencryptInProgress,
                    &path,
                    None,
                    plain,
                    "a re-encryption under a new DEK is in progress or was interrupted;                      `cmkfs volume reencrypt` resumes it (the volume mounts meanwhile)"
                        .into(),
                    Fix::None,
                    None,
                );
                continue;
            }
            if is_root && b == JOURNAL_FILE.as_bytes() {
                self.problem(
                    ProblemKind::UpgradeInterrupted,
                    &path,
                    None,
                    plain,
                    "an upgrade to format v2 was interrupted; `cmkfs upgrade` (or a mount) \
                     restores the files it was converting and finishes it"
                        .into(),
                    Fix::None,
                    None,
                );
                continue;
            }
            // Long symlink targets are checked after the walk (they need every symlink seen);
            // a rename's marker is checked with its directory (check_entry).
            if (is_root && b.starts_with(LONG_TARGET_PREFIX.as_bytes()))
                || b == REPLACED_MARKER.as_bytes()
            {
                continue;
            }
            if b.starts_with(TEMP_PREFIX.as_bytes()) {
                if is_root && b.starts_with(format!("{TEMP_PREFIX}{HEADER_FILE}.").as_bytes()) {
                    continue; // handled with the header
                }
                self.check_temp(&path, name, plain);
                continue;
            }
            match names::classify(name) {
                EntryKind::Hidden => {
                    if b.starts_with(LONG_PREFIX.as_bytes()) && b.ends_with(LONG_SUFFIX.as_bytes())
                    {
                        let entry = &b[..b.len() - LONG_SUFFIX.len()];
                        if !present.contains(OsStr::from_bytes(entry)) {
                            self.problem(
                                ProblemKind::LongNameOrphanSideFile,
                                &path,
                                None,
                                plain,
                                "long-name side file without its entry (left by an interrupted \
                                 create, rename or unlink)"
                                    .into(),
                                Fix::Remove,
                                None,
                            );
                        }
                    } else {
                        self.problem(
                            ProblemKind::UnknownEntry,
                            &path,
                            None,
                            plain,
                            "not part of the cmkfs format (hidden from the plaintext view); \
                             left alone"
                                .into(),
                            Fix::None,
                            None,
                        );
                    }
                }
                EntryKind::Encrypted | EntryKind::Long => {
                    self.check_entry(dir, &path, name, id.as_ref(), plain);
                }
            }
        }
        verdict
    }

    /// Checks one entry with an encrypted (or long) name: the name, then the object.
    fn check_entry(
        &mut self,
        dir: &Path,
        path: &Path,
        name: &OsStr,
        id: Option<&DirId>,
        plain_dir: Option<&Path>,
    ) {
        let long = names::classify(name) == EntryKind::Long;
        let side = long.then(|| dir.join(names::side_file_of(name)));
        if long {
            self.report.counts.long_names += 1;
        }
        let name_check = self.check_name(name, side.as_deref(), id);
        let plaintext: Option<PathBuf> = match (&name_check, plain_dir) {
            (NameCheck::Good(Some(n)), Some(d)) => Some(d.join(n)),
            _ => None,
        };
        let meta = match fs::symlink_metadata(self.io(path)) {
            Ok(m) => m,
            Err(e) => {
                self.problem(
                    ProblemKind::Unreadable,
                    path,
                    plaintext,
                    plain_dir,
                    format!("cannot stat: {e}"),
                    Fix::None,
                    None,
                );
                return;
            }
        };
        // The object's own problem, if any. Checked before anything moves: a directory is
        // walked (and repaired inside) before it may go to the quarantine.
        let ft = meta.file_type();
        if ft.is_dir() && self.replaced_leftover(path, side.as_deref(), plain_dir) {
            return;
        }
        let object_problem: Option<(ProblemKind, String)> = if ft.is_dir() {
            self.check_dir(path, plaintext.as_deref())
        } else if ft.is_file() {
            self.report.counts.files += 1;
            check_file(&self.io(path), meta.len()).or_else(|| {
                self.check_file_format(path, meta.len(), plaintext.as_deref(), plain_dir)
            })
        } else if ft.is_symlink() {
            self.report.counts.symlinks += 1;
            self.check_symlink(path)
        } else {
            // FIFOs, sockets, device nodes: they hold no data.
            self.report.counts.special += 1;
            None
        };

        self.check_xattrs(path, plaintext.as_deref(), plain_dir);

        // A bad name sends the entry (and its side file) to the quarantine.
        let mut moved_with_name: Option<(bool, Option<PathBuf>)> = None;
        if let NameCheck::Bad(kind, detail) = name_check {
            self.problem(
                kind,
                path,
                None,
                plain_dir,
                detail,
                Fix::Quarantine,
                side.as_deref(),
            );
            moved_with_name = self
                .report
                .problems
                .last()
                .map(|p| (p.repaired, p.moved_to.clone()));
        }
        let Some((kind, detail)) = object_problem else {
            return;
        };
        match moved_with_name {
            // Same entry, same move: record the second finding without moving twice.
            Some((repaired, moved_to)) => self.report.problems.push(Problem {
                kind,
                severity: Severity::Error,
                backing: self.rel(path),
                plaintext: None,
                plaintext_dir: plain_dir.map(Path::to_path_buf),
                detail: format!("{detail} (goes to the quarantine with its name)"),
                fix: Fix::Quarantine,
                repaired,
                moved_to,
                repair_error: None,
            }),
            None => {
                let fix = if kind == ProblemKind::Unreadable {
                    Fix::None
                } else {
                    Fix::Quarantine
                };
                self.problem(
                    kind,
                    path,
                    plaintext,
                    plain_dir,
                    detail,
                    fix,
                    side.as_deref(),
                );
            }
        }
    }

    /// The format of a file with a valid header: v1 tails that read as zeros, versions that
    /// do not match the volume's, lengths no v2 file has (volume::upgrade states the rules).
    /// An invalid length is returned (the file goes to the quarantine like a corrupt header);
    /// the rest is recorded here with no automatic fix: `cmkfs upgrade` is the fix.
    fn check_file_format(
        &mut self,
        path: &Path,
        len: u64,
        plaintext: Option<&Path>,
        plain_dir: Option<&Path>,
    ) -> Option<(ProblemKind, String)> {
        let (version, unit) = self.format?;
        let found = sys::open_regular_path(&self.io(path), Access::Read).and_then(|(f, _)| {
            upgrade::check_file_format(&f, len, version, self.keys.as_ref(), unit)
        });
        let (finding, detail) = match found {
            Ok(f) => f?,
            Err(e) => {
                return Some((
                    ProblemKind::Unreadable,
                    format!("cannot read the file: {e}"),
                ))
            }
        };
        let kind = match finding {
            FormatFinding::BadLength => return Some((ProblemKind::FileLengthInvalid, detail)),
            FormatFinding::V1TailReadAsZeros => ProblemKind::V1TailReadAsZeros,
            FormatFinding::V1TailHole => ProblemKind::V1TailHole,
            FormatFinding::FileFormatV1 => ProblemKind::FileFormatV1,
            FormatFinding::FileFormatV2 => ProblemKind::FileFormatV2,
        };
        self.problem(
            kind,
            path,
            plaintext.map(Path::to_path_buf),
            plain_dir,
            detail,
            Fix::None,
            None,
        );
        None
    }

    /// Checks that a symlink's target decrypts (with the key); a long target's side file
    /// must exist (and is noted as used).
    fn check_symlink(&mut self, path: &Path) -> Option<(ProblemKind, String)> {
        let stored = match fs::read_link(self.io(path)) {
            Ok(t) => t.into_os_string(),
            Err(e) => {
                return Some((
                    ProblemKind::Unreadable,
                    format!("cannot read the link: {e}"),
                ))
            }
        };
        let sealed = match long_target_ref(stored.as_bytes()) {
            Some(side) => {
                self.targets_used.insert(side.to_os_string());
                let p = self.root.join(side);
                match fs::symlink_metadata(&p) {
                    Ok(m) if m.is_file() && m.len() <= 32 + MAX_TARGET as u64 => {}
                    _ => {
                        return Some((
                            ProblemKind::SymlinkUndecryptable,
                            format!(
                                "the long target's side file {} is missing or not a small file",
                                side.to_string_lossy()
                            ),
                        ))
                    }
                }
                self.keys.as_ref()?;
                sys::read_bounded(&p, 32 + MAX_TARGET).ok()
            }
            None => {
                self.keys.as_ref()?;
                B64URL.decode(stored.as_bytes()).ok()
            }
        };
        let keys = self.keys.as_ref()?;
        let ok = sealed.is_some_and(|s| names::open_target(&keys.names, &s).is_ok());
        (!ok).then(|| {
            (
                ProblemKind::SymlinkUndecryptable,
                "the symlink target does not decrypt".into(),
            )
        })
    }

    /// A directory marked by an interrupted rename over an empty directory: removed with its
    /// name's side file when nothing of the user's is inside; otherwise only the marker goes
    /// (the directory stays, as it is visible). Returns whether the directory was handled.
    fn replaced_leftover(
        &mut self,
        path: &Path,
        side: Option<&Path>,
        plain_dir: Option<&Path>,
    ) -> bool {
        let marker = path.join(REPLACED_MARKER);
        if fs::symlink_metadata(self.io(&marker)).is_err() {
            return false;
        }
        let empty = path.as_os_str().len() <= LONG_PATH
            && fs::read_dir(path).is_ok_and(|rd| {
                rd.filter_map(|e| e.ok())
                    .all(|e| names::classify(&e.file_name()) == EntryKind::Hidden)
            });
        if empty {
            self.problem(
                ProblemKind::ReplacedDirLeftover,
                path,
                None,
                plain_dir,
                "an empty directory a rename replaced, left by a crash before its removal".into(),
                Fix::Remove,
                None,
            );
            if let Some(side) = side {
                if self.repair && self.report.problems.last().is_some_and(|p| p.repaired) {
                    let _ = remove_any(&self.io(side));
                }
            }
            return true;
        }
        self.problem(
            ProblemKind::ReplacedDirLeftover,
            &marker,
            None,
            plain_dir,
            "marker of an interrupted rename over an empty directory, but the directory holds              entries now: only the marker goes"
                .into(),
            Fix::Remove,
            None,
        );
        false
    }

    /// Long targets' side files at the root that no symlink refers to (only decided after a
    /// complete walk).
    fn check_long_targets(&mut self) {
        if !self.walk_complete {
            return;
        }
        let Ok(rd) = fs::read_dir(&self.root) else {
            return;
        };
        let mut orphans: Vec<OsString> = rd
            .filter_map(|e| e.ok().map(|e| e.file_name()))
            .filter(|n| long_target_ref(n.as_bytes()).is_some() && !self.targets_used.contains(n))
            .collect();
        orphans.sort();
        for n in orphans {
            let p = self.root.join(&n);
            self.problem(
                ProblemKind::LongTargetOrphan,
                &p,
                None,
                Some(Path::new("/")),
                "long symlink target without its symlink (left by an interrupted symlink or                  unlink)"
                    .into(),
                Fix::Remove,
                None,
            );
        }
    }

    /// Checks an entry's encrypted extended attributes (volume::xattr's format: backing name
    /// `user.cmkfs.` + base64url(SIV(name key, ["xattr-name"], name)), value nonce(16) ||
    /// SIV(name key, ["xattr-value", backing name, nonce], value)). One that does not decrypt
    /// is unreadable through the mount; a repair sets it aside raw and removes it.
    fn check_xattrs(&mut self, path: &Path, plaintext: Option<&Path>, plain_dir: Option<&Path>) {
        let Some(keys) = &self.keys else { return };
        let io_path = self.io(path);
        let list = match list_xattrs(&io_path) {
            Ok(l) => l,
            // The backing filesystem may not support xattrs at all: nothing to check.
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return,
            Err(e) => {
                self.problem(
                    ProblemKind::Unreadable,
                    path,
                    plaintext.map(Path::to_path_buf),
                    plain_dir,
                    format!("cannot list extended attributes: {e}"),
                    Fix::None,
                    None,
                );
                return;
            }
        };
        let mut bad = Vec::new();
        for name in list {
            if !XATTR_PREFIXES
                .iter()
                .any(|p| name.as_bytes().starts_with(p.as_bytes()))
            {
                continue; // not ours (e.g. a security label of the backing filesystem)
            }
            let value = get_xattr(&io_path, &name);
            let (name_ok, value_ok) = match &value {
                Ok(v) => crate::volume::xattr::verify_stored(keys, &name, v),
                Err(_) => (
                    crate::volume::xattr::open_name(keys, &name).is_some(),
                    false,
                ),
            };
            if !(name_ok && value_ok) {
                bad.push((name, value.unwrap_or_default(), name_ok));
            }
        }
        for (name, value, name_ok) in bad {
            let what = if name_ok { "value" } else { "name" };
            let idx = self.report.problems.len();
            self.problem(
                ProblemKind::XattrUndecryptable,
                path,
                plaintext.map(Path::to_path_buf),
                plain_dir,
                format!(
                    "the {what} of the extended attribute stored as {} does not decrypt",
                    name.to_string_lossy()
                ),
                // Applied below: the attribute is saved, not moved.
                Fix::Restore,
                None,
            );
            let p = &mut self.report.problems[idx];
            p.fix = Fix::Quarantine;
            p.repaired = false;
            if self.repair {
                match remove_xattr(&io_path, &name) {
                    Ok(()) => {
                        self.report.problems[idx].repaired = true;
                        self.xattrs.push((self.rel(path), name, value));
                    }
                    Err(e) => self.report.problems[idx].repair_error = Some(e.to_string()),
                }
            }
        }
    }

    /// Checks an entry's name: the long-name side file, and with the key, decryption.
    fn check_name(&self, name: &OsStr, side: Option<&Path>, id: Option<&DirId>) -> NameCheck {
        let encoded: Vec<u8> = match side {
            None => name.as_bytes().to_vec(),
            Some(side) => match sys::read_bounded(&self.io(side), MAX_SIDE_FILE) {
                Ok(full) => {
                    if !names::long_name_matches(name, &full) {
                        return NameCheck::Bad(
                            ProblemKind::LongNameHashMismatch,
                            "the long-name side file belongs to another name (its hash does not \
                             match the entry)"
                                .into(),
                        );
                    }
                    full
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return NameCheck::Bad(
                        ProblemKind::LongNameSideFileMissing,
                        "long-name entry without its side file: its name is lost".into(),
                    )
                }
                Err(e) => {
                    return NameCheck::Bad(
                        ProblemKind::LongNameSideFileMissing,
                        format!("the long-name side file cannot be read: {e}"),
                    )
                }
            },
        };
        let (Some(keys), Some(id)) = (&self.keys, id) else {
            return NameCheck::Good(None);
        };
        // During a re-encryption's names phase a name may still be under the retiring key.
        let retiring = keys.retiring.as_deref().map(|r| &r.names);
        match names::decrypt(&keys.names, id, &encoded)
            .or_else(|e| retiring.map_or(Err(e), |r| names::decrypt(r, id, &encoded)))
        {
            Ok(n) => NameCheck::Good(Some(n)),
            Err(_) => NameCheck::Bad(
                ProblemKind::NameUndecryptable,
                "the name does not decrypt in this directory (damaged, or moved here from \
                 another directory or volume)"
                    .into(),
            ),
        }
    }

    /// A `.cmkfs-tmp.*` entry outside the header's: an interrupted `mkdir` or atomic update.
    fn check_temp(&mut self, path: &Path, name: &OsStr, plain_dir: Option<&Path>) {
        let rest = &name.as_bytes()[TEMP_PREFIX.len()..];
        let meta = match fs::symlink_metadata(self.io(path)) {
            Ok(m) => m,
            Err(_) => return, // gone meanwhile
        };
        if meta.is_dir() {
            if rest.starts_with(b"mkdir.") {
                // mkdir builds a directory here, writes its id, then renames it into place;
                // until the rename the mkdir has not happened. Undo it, unless something
                // besides the id got in (then keep it in the quarantine).
                let only_id = fs::read_dir(self.io(path))
                    .map(|rd| {
                        rd.filter_map(|e| e.ok())
                            .all(|e| e.file_name() == DIRID_FILE)
                    })
                    .unwrap_or(false);
                let (fix, detail) = if only_id {
                    (
                        Fix::Remove,
                        "temp directory of an interrupted mkdir (never renamed into place, so \
                         the mkdir did not happen); holds nothing but its id"
                            .to_string(),
                    )
                } else {
                    (
                        Fix::Quarantine,
                        "temp directory of an interrupted mkdir with unexpected contents".into(),
                    )
                };
                self.problem(
                    ProblemKind::MkdirTempDir,
                    path,
                    None,
                    plain_dir,
                    detail,
                    fix,
                    None,
                );
            } else if rest.starts_with(b"rmdir.")
                && crate::volume::is_dead_temp_dir(&self.io(path), name)
            {
                // rmdir renames the directory here, then takes it apart: only metadata is left.
                self.problem(
                    ProblemKind::TempFile,
                    path,
                    None,
                    plain_dir,
                    "an interrupted rmdir: the directory was already gone from view; only its \
                     metadata is left"
                        .into(),
                    Fix::Remove,
                    None,
                );
            } else {
                self.problem(
                    ProblemKind::TempFile,
                    path,
                    None,
                    plain_dir,
                    "temp directory of an unknown kind of update".into(),
                    Fix::Quarantine,
                    None,
                );
            }
            return;
        }
        // write_atomic's temp files are `.cmkfs-tmp.<target name>.<random hex>`.
        let target = rest
            .iter()
            .rposition(|b| *b == b'.')
            .map(|i| &rest[..i])
            .unwrap_or(rest);
        let is_side = (target.starts_with(LONG_PREFIX.as_bytes())
            && target.ends_with(LONG_SUFFIX.as_bytes()))
            || long_target_ref(target).is_some();
        if meta.is_file() && target == crate::volume::reencrypt::JOURNAL_FILE.as_bytes() {
            self.problem(
                ProblemKind::TempFile,
                path,
                None,
                plain_dir,
                "temp file of a re-encryption journal that was never put in place".into(),
                Fix::Remove,
                None,
            );
        } else if meta.file_type().is_symlink() && target == b"symlink" {
            self.problem(
                ProblemKind::TempFile,
                path,
                None,
                plain_dir,
                "new symlink of an interrupted re-encryption, never renamed into place (the \
                 original is intact)"
                    .into(),
                Fix::Remove,
                None,
            );
        } else if meta.is_file() && target == JOURNAL_FILE.as_bytes() {
            self.problem(
                ProblemKind::TempFile,
                path,
                None,
                plain_dir,
                "temp file of an upgrade journal that was never put in place (no file was \
                 changed under it)"
                    .into(),
                Fix::Remove,
                None,
            );
        } else if meta.is_file() && is_side {
            self.problem(
                ProblemKind::TempFile,
                path,
                None,
                plain_dir,
                "temp file of an interrupted side-file update (a long name or a long symlink \
                 target; the update never took effect)"
                    .into(),
                Fix::Remove,
                None,
            );
        } else {
            self.problem(
                ProblemKind::TempFile,
                path,
                None,
                plain_dir,
                "temp file of an unknown kind of update; kept in the quarantine".into(),
                Fix::Quarantine,
                None,
            );
        }
    }
}

/// Reads and checks a directory's id file.
fn read_dir_id(dir: &Path) -> Result<DirId, (ProblemKind, String)> {
    let p = dir.join(DIRID_FILE);
    let meta = match fs::symlink_metadata(&p) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err((
                ProblemKind::DirIdMissing,
                format!("{DIRID_FILE} is missing"),
            ))
        }
        Err(e) => return Err((ProblemKind::DirIdCorrupt, format!("{DIRID_FILE}: {e}"))),
    };
    if !meta.is_file() {
        return Err((
            ProblemKind::DirIdCorrupt,
            format!("{DIRID_FILE} is not a regular file"),
        ));
    }
    let bytes = sys::read_bounded(&p, MAX_DIRID_FILE)
        .map_err(|e| (ProblemKind::DirIdCorrupt, format!("{DIRID_FILE}: {e}")))?;
    bytes.as_slice().try_into().map_err(|_| {
        (
            ProblemKind::DirIdCorrupt,
            format!("{DIRID_FILE} has {} bytes, expected 16", bytes.len()),
        )
    })
}

/// Checks a regular file's per-file header. `None` = fine.
fn check_file(path: &Path, len: u64) -> Option<(ProblemKind, String)> {
    match len {
        0 => None, // an empty file: no header until the first write
        n if n < FILE_HEADER_LEN as u64 => Some((
            ProblemKind::FileHeaderTruncated,
            format!("backing file of {n} bytes is shorter than a file header ({FILE_HEADER_LEN})"),
        )),
        _ => {
            let mut b = [0u8; FILE_HEADER_LEN];
            let read = sys::open_regular_path(path, Access::Read)
                .and_then(|(mut f, _)| f.read_exact(&mut b));
            match read {
                Ok(()) => FileHeader::decode(&b)
                    .err()
                    .map(|why| (ProblemKind::FileHeaderCorrupt, why)),
                Err(e) => Some((
                    ProblemKind::Unreadable,
                    format!("cannot read the file header: {e}"),
                )),
            }
        }
    }
}

/// The header temp files in the backing root.
fn header_temps(root: &Path) -> Result<Vec<PathBuf>, FsckError> {
    let prefix = format!("{TEMP_PREFIX}{HEADER_FILE}.");
    let mut out: Vec<PathBuf> = fs::read_dir(root)
        .map_err(|e| FsckError::io(root, e))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().as_bytes().starts_with(prefix.as_bytes()))
        .map(|e| e.path())
        .collect();
    out.sort();
    Ok(out)
}

/// Parses a header from any file (a temp copy); `None` if it is not a complete header.
/// Structural checks beyond the JSON shape happen in the unwrap (key id) and the MAC check.
fn parse_header_file(path: &Path) -> Option<VolumeHeader> {
    let bytes = sys::read_bounded(path, 64 * 1024).ok()?;
    let h: VolumeHeader = serde_json::from_slice(&bytes).ok()?;
    (h.format == "cmkfs").then_some(h)
}

/// A new quarantine batch directory `root/cmkfs.quarantine/<UTC timestamp>[-n]`.
fn new_batch(root: &Path) -> io::Result<PathBuf> {
    let q = root.join(QUARANTINE_DIR);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&q)?;
    // 2025-01-31T12:00:00Z → 20250131T120000Z: no `.` needed, sorts by time.
    let stamp: String = humantime::format_rfc3339_seconds(SystemTime::now())
        .to_string()
        .chars()
        .filter(|c| *c != '-' && *c != ':')
        .collect();
    for n in 0..1000 {
        let name = if n == 0 {
            stamp.clone()
        } else {
            format!("{stamp}-{n}")
        };
        match fs::DirBuilder::new().mode(0o700).create(q.join(&name)) {
            Ok(()) => return Ok(q.join(name)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::other("no free quarantine batch name"))
}

/// Removes a file, or a directory with its contents (temp dirs of mkdir; never user data).
fn remove_any(path: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(path)?;
    if meta.is_dir() {
        // A mkdir temp dir may have been given a mode without write permission already.
        let _ = fs::set_permissions(path, fs::Permissions::from_mode(0o700));
        fs::remove_dir_all(path)?;
    } else {
        fs::remove_file(path)?;
    }
    if let Some(parent) = path.parent() {
        fsutil::sync_dir(parent)?;
    }
    Ok(())
}

/// Writes a fresh random id as `dirid_path` (replacing a corrupt one).
fn write_fresh_dir_id(dirid_path: &Path) -> io::Result<()> {
    let mut id = [0u8; 16];
    getrandom::getrandom(&mut id).map_err(io::Error::other)?;
    match fs::symlink_metadata(dirid_path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(dirid_path)?,
        Ok(_) => fs::remove_file(dirid_path)?,
        Err(_) => {}
    }
    fsutil::write_new(dirid_path, &id, 0o444)
}

fn cpath(p: &[u8]) -> io::Result<std::ffi::CString> {
    std::ffi::CString::new(p).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// The backing extended attribute names of `path` (not following symlinks).
fn list_xattrs(path: &Path) -> io::Result<Vec<OsString>> {
    let c = cpath(path.as_os_str().as_bytes())?;
    loop {
        // SAFETY: valid C path; a null buffer of size 0 asks for the size.
        let size = unsafe { libc::llistxattr(c.as_ptr(), std::ptr::null_mut(), 0) };
        if size < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; size as usize];
        // SAFETY: buf has exactly the stated length.
        let got = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if got < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ERANGE) {
                continue; // grew in between
            }
            return Err(e);
        }
        buf.truncate(got as usize);
        return Ok(buf
            .split(|b| *b == 0)
            .filter(|n| !n.is_empty())
            .map(|n| OsStr::from_bytes(n).to_owned())
            .collect());
    }
}

/// One backing extended attribute's raw value.
fn get_xattr(path: &Path, name: &OsStr) -> io::Result<Vec<u8>> {
    let (p, n) = (cpath(path.as_os_str().as_bytes())?, cpath(name.as_bytes())?);
    loop {
        // SAFETY: valid C strings; size query first.
        let size = unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), std::ptr::null_mut(), 0) };
        if size < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; size as usize];
        // SAFETY: buf has exactly the stated length.
        let got =
            unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if got < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ERANGE) {
                continue;
            }
            return Err(e);
        }
        buf.truncate(got as usize);
        return Ok(buf);
    }
}

fn remove_xattr(path: &Path, name: &OsStr) -> io::Result<()> {
    let (p, n) = (cpath(path.as_os_str().as_bytes())?, cpath(name.as_bytes())?);
    // SAFETY: valid C strings.
    if unsafe { libc::lremovexattr(p.as_ptr(), n.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
    };
    let (a, b) = (c(from)?, c(to)?);
    // SAFETY: valid NUL-terminated paths; renameat2 is a plain syscall wrapper.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

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
        // A second repair finds only the header problem.
        let r = run(&root, &repair).unwrap();
        let k = kinds(&r);
        assert_eq!(k, vec![(ProblemKind::HeaderMissing, Fix::None, false)]);
    }
}
