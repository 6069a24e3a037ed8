//! `cmkfs upgrade`: converts a format v1 volume to format v2 in place, crash-safe and
//! resumable (docs/FORMAT.md, "Upgrade from format v1").
//!
//! Only a file's last unit differs between the formats, and only when its size is not a
//! multiple of 16: then v1 stored it at its exact length (ciphertext stealing or the short
//! stream rule) and v2 stores it padded to whole blocks followed by filler. Every other byte
//! is identical, except the version field of each file header. So:
//!
//! * a file whose size is a multiple of 16 only gets its header version changed (a 2-byte
//!   write inside one sector: a crash leaves v1 or v2, and both read the same bytes);
//! * the others are converted in batches under an undo journal ([`journal`]): journal
//!   durable → new last unit and filler → header v2 → `syncfs` → next journal replaces it.
//!   After a crash, a journal present means: undo every file it names (restore the old
//!   bytes, length and header), then convert them again, with the same decision on an
//!   all-zero tail;
//! * the volume header flips to version 2 (MAC recomputed) only once every file is v2.
//!
//! The journal and the volume header are control files in the backing root, whose times are
//! the mount root's: the root's atime and mtime from before the upgrade are put back after
//! each change of the root (before the directory is fsynced, so that both are durable
//! together) and at the end; the journal records them, so that a run resumed after a crash
//! puts back those, not the times the crashed run left.
//!
//! Per-file versions live in the file headers, so a volume may be half converted; the mount
//! refuses it until the upgrade is done. The caller holds the volume lock exclusively
//! ([`VolumeLock`]): no mount and no other upgrade runs meanwhile. Hard links are converted
//! once (per inode). Files that are not cmkfs files at all are reported and left alone.

mod check;
pub mod journal;

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use serde::Serialize;

pub use check::{check_v1_volume_file, FormatFinding};
pub use journal::JOURNAL_FILE;
use journal::{Entry, Journal, RootTimes};

use super::header::{VolumeHeader, FORMAT_V2};
use super::layout::{self, FileHeader, FILE_HEADER_LEN};
use super::lock::{LockError, VolumeLock};
use super::names::{self, DirId, EntryKind, DIRID_FILE};
use super::sys::{self, Access};
use super::v1::{self, TailDecision, TailFinding};
use super::VolumeError;
use crate::crypto::{Dek, VolumeKeys};
use crate::fsutil::{self, TEMP_PREFIX};
use crate::home::Home;
use crate::vault::Vault;

/// Files per journal batch: one journal write (two fsyncs) and one `syncfs` per batch.
pub const BATCH_FILES: usize = 64;

/// Most bytes read from a journal ([`BATCH_FILES`] entries of one data unit and a path each
/// take far less): a journal is read from the backing store, which may be hostile.
const MAX_JOURNAL: usize = 16 << 20;

/// The steps of an upgrade, in order. A [`Hooks::fault`] hook is called after each one and
/// can stop the upgrade right there, as a crash would (nothing is cleaned up).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum Step {
    /// A file whose size is a multiple of 16 now has a v2 header.
    HeaderOnly,
    /// A batch's journal is complete and fsynced under its temp name.
    JournalTempSynced,
    /// The journal is in place and durable: the batch's files may change.
    JournalDurable,
    /// Half of a file's new last unit is written (a torn write).
    TailPartial,
    /// A file's new last unit and filler are written: it has its v2 length.
    TailWritten,
    /// A file's header says v2.
    FileHeaderWritten,
    /// A batch's files are durable.
    BatchSynced,
    /// A file named by the journal of an interrupted run was restored (before its redo).
    Undone,
    /// The journal of an interrupted run was undone and redone.
    Resumed,
    /// The last journal is removed.
    JournalRemoved,
    /// The volume header says version 2: the upgrade is complete.
    VolumeHeaderWritten,
}

/// A fault-injection hook (see [`Hooks::fault`]); the path is the file or directory the step
/// concerns.
pub type FaultHook<'a> = &'a mut dyn FnMut(Step, &Path) -> io::Result<()>;

/// Progress of an upgrade: files handled so far of all found.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    /// Files handled.
    pub done: u64,
    /// Files in all (distinct inodes).
    pub total: u64,
}

/// Observers of an upgrade.
#[derive(Default)]
pub struct Hooks<'a> {
    /// Progress reports (the CLI draws a progress bar from them).
    pub progress: Option<&'a mut dyn FnMut(&Progress)>,
    /// Fault injection for crash-safety tests: an `Err` stops the upgrade at once, leaving
    /// the disk as a crash at that point would.
    #[doc(hidden)]
    pub fault: Option<FaultHook<'a>>,
}

impl Hooks<'_> {
    fn step(&mut self, step: Step, at: &Path) -> Result<(), UpgradeError> {
        match &mut self.fault {
            Some(f) => f(step, at).map_err(|_| UpgradeError::Interrupted(step)),
            None => Ok(()),
        }
    }

    fn progress(&mut self, done: u64, total: u64) {
        if let Some(f) = &mut self.progress {
            f(&Progress { done, total });
        }
    }
}

/// Why an upgrade stopped.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// The volume header or key.
    #[error(transparent)]
    Volume(#[from] VolumeError),
    /// The volume is in use.
    #[error(transparent)]
    Lock(#[from] LockError),
    /// An I/O error on a named path.
    #[error("{}: {error}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        error: io::Error,
    },
    /// The journal of an interrupted run cannot be used.
    #[error("the upgrade journal {} cannot be used: {why}; nothing was changed; `cmkfs fsck` says more, and `cmkfs fsck --repair` moves the journal to the quarantine (keep a copy of the volume first if it was mid-upgrade)", path.display())]
    Journal {
        /// The journal's path.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A fault hook stopped the upgrade (tests).
    #[error("interrupted after step {0:?}")]
    Interrupted(Step),
    /// The caller broke a precondition.
    #[error("{0}")]
    Refused(String),
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> UpgradeError + '_ {
    move |error| UpgradeError::Io {
        path: path.to_path_buf(),
        error,
    }
}

/// A file the upgrade left alone.
#[derive(Clone, Debug, Serialize)]
pub struct Skipped {
    /// Backing path relative to the backing directory.
    pub backing: PathBuf,
    /// Plaintext path, when its name decrypts.
    pub plaintext: Option<PathBuf>,
    /// Why.
    pub why: String,
}

/// A v1 tail that the v1 reader showed as zeros, and what the upgrade took it for.
#[derive(Clone, Debug, Serialize)]
pub struct ZeroTailReport {
    /// Plaintext path, when its name decrypts.
    pub plaintext: Option<PathBuf>,
    /// Backing path relative to the backing directory.
    pub backing: PathBuf,
    /// Logical size of the file.
    pub size: u64,
    /// Logical offset of the tail.
    pub offset: u64,
    /// Tail length (1..=15).
    pub len: usize,
    /// `data`: recovered with the v1 rule (the file now shows the bytes v1 hid); `hole`:
    /// zeros, as before.
    pub decision: TailDecision,
    /// Why.
    pub reason: String,
}

/// What an upgrade did.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The backing directory (canonical).
    pub cipherdir: PathBuf,
    /// Volume id.
    pub volume_id: String,
    /// Format version before.
    pub from_version: u32,
    /// Format version after.
    pub to_version: u32,
    /// Files of an interrupted run's journal that were restored and converted again.
    pub resumed: usize,
    /// Distinct regular files (inodes) found.
    pub files: u64,
    /// Files whose last unit was re-encrypted (size not a multiple of 16).
    pub converted: u64,
    /// Files whose header version alone changed (size a multiple of 16).
    pub header_only: u64,
    /// Files already in format v2.
    pub already_v2: u64,
    /// Empty files (no header: nothing to convert).
    pub empty: u64,
    /// Files left alone (not cmkfs files: corrupt, foreign).
    pub skipped: Vec<Skipped>,
    /// Tails the v1 reader showed as zeros.
    pub zero_tails: Vec<ZeroTailReport>,
}

/// Whether the volume at `dir` with header `header` needs (the rest of) an upgrade before it
/// can be mounted: an older format version, or the journal of an interrupted run.
pub fn needed(dir: &Path, header: &VolumeHeader) -> bool {
    header.format_version < FORMAT_V2 || Journal::path(dir).exists()
}

/// The number of files the journal of an interrupted run names (`None`: no journal), or why
/// it cannot be used: lets a caller refuse a damaged journal before saying anything else.
pub fn pending_journal(dir: &Path, header: &VolumeHeader) -> Result<Option<usize>, UpgradeError> {
    let path = Journal::path(dir);
    let bytes = match sys::read_bounded(&path, MAX_JOURNAL) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_at(&path)(e)),
    };
    let bad = |why: String| UpgradeError::Journal {
        path: path.clone(),
        why,
    };
    let j = Journal::decode(&bytes).map_err(bad)?;
    if j.volume_id != header.volume_id || j.sector_size != header.sector_size {
        return Err(bad(format!(
            "it belongs to volume {} ({}-byte units), not to this one",
            j.volume_id, j.sector_size
        )));
    }
    Ok(Some(j.entries.len()))
}

/// Unwraps the DEK(s) of the volume at `dir` with header `header`, as a mount would
/// (`crate::unlock`: the header's binding to this machine's Disk Encryption Sets, unwrap
/// through `vault`, fingerprint and MAC, then the platform DEK through cmkfs's own vault in
/// `home`): the outer DEK (which keys the header MAC) and the data ciphers.
pub fn unlock(
    home: &Home,
    dir: &Path,
    vault: &dyn Vault,
    header: &VolumeHeader,
) -> Result<(Dek, VolumeKeys), VolumeError> {
    crate::unlock::binding(home, dir, header)?;
    let u = crate::unlock::unwrap(home, vault, header)?;
    let keys = u.keys().map_err(VolumeError::Crypto)?;
    crate::crypto::secret::scrub_stack();
    Ok((u.outer, keys))
}

/// Converts the volume at `dir` to the current format (or finishes an interrupted
/// conversion). `lock` must be the volume's exclusive lock; `dek` and `keys` its keys
/// ([`unlock`]), checked against the header before anything is touched.
pub fn run(
    dir: &Path,
    lock: &VolumeLock,
    dek: &Dek,
    keys: &VolumeKeys,
    hooks: &mut Hooks,
) -> Result<Report, UpgradeError> {
    if !lock.is_exclusive() {
        return Err(UpgradeError::Refused(
            "an upgrade needs the volume lock held exclusively".into(),
        ));
    }
    let root = fs::canonicalize(dir).map_err(io_at(dir))?;
    let header = VolumeHeader::read(&root)?;
    header.verify(dek)?;
    if header.format_version > FORMAT_V2 {
        // Nothing converts to or from v3 in place; its files would be taken for v1 ones.
        return Err(UpgradeError::Refused(format!(
            "{} is on-disk format v{}: `cmkfs upgrade` converts format v1 to v2 only, and \
             this volume needs nothing",
            root.display(),
            header.format_version
        )));
    }
    let mut up = Upgrader {
        unit: header.sector_size as u64,
        keys,
        hooks,
        report: Report {
            cipherdir: root.clone(),
            volume_id: header.volume_id.clone(),
            from_version: header.format_version,
            to_version: header.format_version,
            resumed: 0,
            files: 0,
            converted: 0,
            header_only: 0,
            already_v2: 0,
            empty: 0,
            skipped: Vec::new(),
            zero_tails: Vec::new(),
        },
        root_fd: sys::open_root(&root).map_err(io_at(&root))?,
        root_times: None,
        root,
    };
    up.root_times = root_times_of(up.root_fd.as_fd());
    let r = (|| {
        up.remove_journal_temps()?;
        up.resume(&header)?;
        let files = find_files(&up.root, up.root_fd.as_fd(), keys)?;
        // The listing (atime) and the removed temps (mtime): put back before any crash point.
        up.put_back_root_times();
        up.convert_all(files)?;
        up.finish(dek)
    })();
    match r {
        // As a crash would: the journal has the root's times for the resumed run.
        Err(e @ UpgradeError::Interrupted(_)) => Err(e),
        r => {
            up.put_back_root_times();
            r.map(|()| up.report)
        }
    }
}

/// A directory's (atime, mtime) now.
fn root_times_of(dir: BorrowedFd<'_>) -> Option<RootTimes> {
    sys::fstat(dir).ok().map(|st| {
        [
            (st.st_atime, st.st_atime_nsec as u32),
            (st.st_mtime, st.st_mtime_nsec as u32),
        ]
    })
}

struct Upgrader<'a, 'h> {
    root: PathBuf,
    /// The backing root, held open: every file is reached from it one name at a time
    /// ([`open_rw`]), never by a path a swapped directory could redirect.
    root_fd: OwnedFd,
    unit: u64,
    keys: &'a VolumeKeys,
    hooks: &'a mut Hooks<'h>,
    report: Report,
    /// The backing root's (atime, mtime) from before the upgrade (an interrupted run's, from
    /// its journal), put back after each change of the root's entries.
    root_times: Option<RootTimes>,
}

/// A regular file found in the backing tree.
struct Found {
    /// For messages only: files are opened by `rel` from the root's descriptor.
    abs: PathBuf,
    rel: PathBuf,
    plain: Option<PathBuf>,
}

/// A v1 file whose last unit waits for its batch.
struct Pending {
    found: Found,
}

impl Upgrader<'_, '_> {
    /// Sets the backing root's times back to [`Upgrader::root_times`], if they moved.
    fn put_back_root_times(&self) {
        let Some(t) = self.root_times else {
            return;
        };
        if root_times_of(self.root_fd.as_fd()) != Some(t) {
            let [a, m] = t;
            if let Err(e) = sys::utimens_fd(self.root_fd.as_fd(), &[Some(Some(a)), Some(Some(m))]) {
                tracing::debug!(error = %e, "cannot set the backing root's times back");
            }
        }
    }

    fn remove_journal_temps(&mut self) -> Result<(), UpgradeError> {
        let prefix = format!("{TEMP_PREFIX}{JOURNAL_FILE}.");
        for e in fs::read_dir(&self.root).map_err(io_at(&self.root))? {
            let e = e.map_err(io_at(&self.root))?;
            if e.file_name().as_bytes().starts_with(prefix.as_bytes()) {
                fs::remove_file(e.path()).map_err(io_at(&e.path()))?;
            }
        }
        Ok(())
    }

    /// Undoes and redoes the batch of an interrupted run, if its journal is there.
    fn resume(&mut self, header: &VolumeHeader) -> Result<(), UpgradeError> {
        if pending_journal(&self.root, header)?.is_none() {
            return Ok(());
        }
        let path = Journal::path(&self.root);
        let bytes = sys::read_bounded(&path, MAX_JOURNAL).map_err(io_at(&path))?;
        let j = Journal::decode(&bytes).map_err(|why| UpgradeError::Journal {
            path: path.clone(),
            why,
        })?;
        tracing::warn!(journal = %path.display(), files = j.entries.len(), "resuming an interrupted upgrade: restoring and converting again the files it was converting");
        if j.root_times.is_some() {
            self.root_times = j.root_times;
        }
        for e in &j.entries {
            let abs = self.root.join(&e.backing);
            let Some(f) = self.open_journaled(&abs, e)? else {
                continue;
            };
            undo(&f, e, self.unit).map_err(io_at(&abs))?;
            self.hooks.step(Step::Undone, &abs)?;
            self.convert(&f, &abs, e)?;
            self.report.resumed += 1;
        }
        syncfs(&self.root)?;
        self.hooks.step(Step::Resumed, &path)
    }

    /// Opens a file the journal names, if it is still that file.
    fn open_journaled(&mut self, abs: &Path, e: &Entry) -> Result<Option<File>, UpgradeError> {
        let rel = e.backing.clone();
        let skip = |me: &mut Self, why: &str| {
            tracing::warn!(backing = %rel.display(), "{why}; left alone");
            me.report.skipped.push(Skipped {
                backing: rel.clone(),
                plaintext: None,
                why: why.into(),
            });
        };
        let f = match open_rw(self.root_fd.as_fd(), &e.backing) {
            Ok(f) => f,
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                skip(self, "named by the upgrade journal but gone");
                return Ok(None);
            }
            Err(err) => return Err(io_at(abs)(err)),
        };
        let mut h = [0u8; FILE_HEADER_LEN];
        let same = f.read_exact_at(&mut h, 0).is_ok()
            && h[..4] == e.old_header[..4]
            && h[8..24] == e.file_id;
        if !same {
            skip(
                self,
                "named by the upgrade journal, but another file is there now",
            );
            return Ok(None);
        }
        Ok(Some(f))
    }

    fn convert_all(&mut self, files: Vec<Found>) -> Result<(), UpgradeError> {
        let total = files.len() as u64;
        self.hooks.progress(0, total);
        let mut done = 0u64;
        let mut batch: Vec<Pending> = Vec::new();
        for found in files {
            self.report.files += 1;
            match self.classify(found)? {
                Some(p) => batch.push(p),
                None => {
                    done += 1;
                    self.hooks.progress(done, total);
                }
            }
            if batch.len() >= BATCH_FILES {
                done += batch.len() as u64;
                self.convert_batch(std::mem::take(&mut batch))?;
                self.hooks.progress(done, total);
            }
        }
        if !batch.is_empty() {
            done += batch.len() as u64;
            self.convert_batch(batch)?;
            self.hooks.progress(done, total);
        }
        Ok(())
    }

    /// Handles what needs no journal; returns the files whose last unit must be converted.
    fn classify(&mut self, found: Found) -> Result<Option<Pending>, UpgradeError> {
        let skip = |me: &mut Self, found: &Found, why: String| {
            tracing::warn!(backing = %found.rel.display(), "not converted: {why}");
            me.report.skipped.push(Skipped {
                backing: found.rel.clone(),
                plaintext: found.plain.clone(),
                why,
            });
            Ok(None)
        };
        let f = open_rw(self.root_fd.as_fd(), &found.rel).map_err(io_at(&found.abs))?;
        let len = f.metadata().map_err(io_at(&found.abs))?.len();
        if len == 0 {
            self.report.empty += 1;
            return Ok(None);
        }
        let mut b = [0u8; FILE_HEADER_LEN];
        if len < FILE_HEADER_LEN as u64 {
            return skip(
                self,
                &found,
                format!("{len} bytes: shorter than a file header"),
            );
        }
        f.read_exact_at(&mut b, 0).map_err(io_at(&found.abs))?;
        let h = match FileHeader::decode(&b) {
            Ok(h) => h,
            Err(why) => return skip(self, &found, why),
        };
        if h.version == layout::FILE_VERSION_V2 {
            self.report.already_v2 += 1;
            return Ok(None);
        }
        if h.version != layout::FILE_VERSION_V1 {
            // A v3 file copied in: its data is at 4096, not v1's 32; converting it as v1
            // would garble it.
            return skip(
                self,
                &found,
                format!("file header version {} is not v1 or v2", h.version),
            );
        }
        let size = len - FILE_HEADER_LEN as u64;
        if !size.is_multiple_of(layout::BLOCK) {
            return Ok(Some(Pending { found }));
        }
        // Whole blocks: v1 and v2 store the same bytes; only the version changes.
        let v2 = FileHeader {
            version: layout::FILE_VERSION_V2,
            ..h
        };
        f.write_all_at(&v2.encode()[4..6], 4)
            .map_err(io_at(&found.abs))?;
        self.report.header_only += 1;
        self.hooks.step(Step::HeaderOnly, &found.abs)?;
        Ok(None)
    }

    fn convert_batch(&mut self, batch: Vec<Pending>) -> Result<(), UpgradeError> {
        let mut items = Vec::with_capacity(batch.len());
        for p in batch {
            let abs = &p.found.abs;
            let f = open_rw(self.root_fd.as_fd(), &p.found.rel).map_err(io_at(abs))?;
            let len = f.metadata().map_err(io_at(abs))?.len();
            let mut old_header = [0u8; FILE_HEADER_LEN];
            f.read_exact_at(&mut old_header, 0).map_err(io_at(abs))?;
            let h = FileHeader::decode(&old_header).map_err(|why| {
                UpgradeError::Refused(format!(
                    "{} changed during the upgrade: {why}",
                    abs.display()
                ))
            })?;
            let size = len - FILE_HEADER_LEN as u64;
            let unit = v1::read_last_unit(&f, size, self.unit).map_err(io_at(abs))?;
            let mut zero_tail = None;
            let finding = if unit.is_zero() && unit.is_short() {
                let z = v1::decide_zero_tail(&f, unit.start, unit.stored.len());
                zero_tail = Some(z.decision);
                Some((z.decision, z.reason))
            } else {
                match v1::inspect_tail(&f, Some(self.keys), h.tweak(), size, self.unit)
                    .map_err(io_at(abs))?
                {
                    Some(TailFinding::InnerZero { .. }) => Some((
                        TailDecision::Data,
                        "double encryption: the inner layer's ciphertext was all zeros, which \
                         v1 read as a hole: recovered as data"
                            .to_string(),
                    )),
                    _ => None,
                }
            };
            if let Some((decision, reason)) = finding {
                // The backing path only: logs never name plaintext (the report, shown to the
                // user, does).
                tracing::warn!(
                    backing = %p.found.rel.display(),
                    offset = unit.start,
                    bytes = unit.stored.len(),
                    decision = ?decision,
                    "format v1 read this file's last bytes as zeros: {reason}"
                );
                self.report.zero_tails.push(ZeroTailReport {
                    plaintext: p.found.plain.clone(),
                    backing: p.found.rel.clone(),
                    size,
                    offset: unit.start,
                    len: unit.stored.len(),
                    decision,
                    reason,
                });
            }
            let entry = Entry {
                backing: p.found.rel.clone(),
                file_id: h.file_id,
                old_len: len,
                old_header,
                unit: unit.index,
                old_unit: unit.stored,
                zero_tail,
            };
            items.push((p, f, entry));
        }
        let j = Journal {
            volume_id: self.report.volume_id.clone(),
            sector_size: self.unit as u32,
            entries: items.iter().map(|(_, _, e)| e.clone()).collect(),
            root_times: self.root_times,
        };
        self.write_journal(&j)?;
        for (p, f, e) in &items {
            self.convert(f, &p.found.abs, e)?;
            self.report.converted += 1;
        }
        syncfs(&self.root)?;
        self.hooks.step(Step::BatchSynced, &self.root.clone())
    }

    /// Writes the journal atomically, step by step so that the fault hook can stop it.
    fn write_journal(&mut self, j: &Journal) -> Result<(), UpgradeError> {
        let path = Journal::path(&self.root);
        let mut rnd = [0u8; 6];
        getrandom::getrandom(&mut rnd).map_err(|e| io_at(&self.root)(io::Error::other(e)))?;
        let tmp = self
            .root
            .join(format!("{TEMP_PREFIX}{JOURNAL_FILE}.{}", hex::encode(rnd)));
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_at(&tmp))?;
        self.put_back_root_times();
        let written = f.write_all_at(&j.encode(), 0).and_then(|()| f.sync_all());
        drop(f);
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(io_at(&tmp)(e));
        }
        self.hooks.step(Step::JournalTempSynced, &tmp)?;
        fs::rename(&tmp, &path).map_err(io_at(&path))?;
        self.put_back_root_times();
        fsutil::sync_dir(&self.root).map_err(io_at(&self.root))?;
        self.hooks.step(Step::JournalDurable, &path)
    }

    /// Converts one journaled file: the new last unit and filler, then the v2 header.
    fn convert(&mut self, f: &File, abs: &Path, e: &Entry) -> Result<(), UpgradeError> {
        let size = e.old_len - FILE_HEADER_LEN as u64;
        let start = e.unit * self.unit;
        let unit = v1::LastUnit {
            index: e.unit,
            start,
            stored: e.old_unit.clone(),
        };
        let tweak = u128::from_le_bytes(e.file_id);
        let plain = v1::decrypt_last_unit(self.keys, tweak, &unit, e.zero_tail)
            .map_err(VolumeError::Crypto)?;
        match plain {
            // Stays a hole: the stored bytes are zeros already; the length adds zeros.
            None => f
                .set_len(layout::Layout::V2.backing_len(size))
                .map_err(io_at(abs))?,
            Some(mut buf) => {
                buf.resize(layout::roundup_block(buf.len() as u64) as usize, 0);
                let t = tweak.wrapping_add(e.unit as u128);
                if let Some(inner) = &self.keys.inner {
                    inner
                        .encrypt_unit(t, &mut buf)
                        .map_err(VolumeError::Crypto)?;
                }
                self.keys
                    .xts
                    .encrypt_unit(t, &mut buf)
                    .map_err(VolumeError::Crypto)?;
                buf.resize(buf.len() + layout::filler_len(size) as usize, 0);
                let at = FILE_HEADER_LEN as u64 + start;
                let half = buf.len() / 2;
                f.write_all_at(&buf[..half], at).map_err(io_at(abs))?;
                self.hooks.step(Step::TailPartial, abs)?;
                f.write_all_at(&buf[half..], at + half as u64)
                    .map_err(io_at(abs))?;
            }
        }
        self.hooks.step(Step::TailWritten, abs)?;
        let v2 = FileHeader {
            version: layout::FILE_VERSION_V2,
            key_gen: 0,
            file_id: e.file_id,
            reencrypted: 0,
        };
        f.write_all_at(&v2.encode()[4..6], 4).map_err(io_at(abs))?;
        self.hooks.step(Step::FileHeaderWritten, abs)
    }

    /// Makes everything durable, drops the journal and flips the volume header.
    fn finish(&mut self, dek: &Dek) -> Result<(), UpgradeError> {
        syncfs(&self.root)?;
        let path = Journal::path(&self.root);
        match fs::remove_file(&path) {
            Ok(()) => {
                self.put_back_root_times();
                fsutil::sync_dir(&self.root).map_err(io_at(&self.root))?;
                self.hooks.step(Step::JournalRemoved, &path)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_at(&path)(e)),
        }
        let header = VolumeHeader::read(&self.root)?;
        if header.format_version < FORMAT_V2 {
            header
                .format_upgraded(dek)
                .write_then(&self.root, &mut || self.put_back_root_times())?;
            tracing::info!(cipherdir = %self.root.display(), "volume header now says format v{FORMAT_V2}");
            self.hooks
                .step(Step::VolumeHeaderWritten, &self.root.clone())?;
        }
        self.report.to_version = FORMAT_V2;
        Ok(())
    }
}

/// Restores a journaled file exactly as it was: old last unit, old length, old header.
fn undo(f: &File, e: &Entry, unit: u64) -> io::Result<()> {
    f.write_all_at(&e.old_unit, FILE_HEADER_LEN as u64 + e.unit * unit)?;
    f.set_len(e.old_len)?;
    f.write_all_at(&e.old_header, 0)?;
    f.sync_all()
}

/// Opens the backing file at `rel` below the root for reading and writing, one name at a
/// time from the root's descriptor, following no symlink on the way or at the end: a
/// directory swapped for a symlink after the walk found the file cannot lead the upgrade
/// outside the volume (`ELOOP`/`ENOTDIR`). A file without write permission for its owner is
/// opened through a brief `u+w` (the descriptor keeps its access; the mode is put back at
/// once), as cmkfs owns its backing files.
fn open_rw(root: BorrowedFd<'_>, rel: &Path) -> io::Result<File> {
    let name = rel
        .file_name()
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    let dir = sys::open_dir_beneath(root, rel.parent().unwrap_or(Path::new("")))?;
    // Never a symlink, FIFO or device planted in the backing store (sys::open_regular), and
    // the mode change goes through the descriptor: it reaches that file and no other.
    match sys::open_regular(dir.as_fd(), name, Access::ReadWrite, None) {
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            let (ro, st) = sys::open_regular(dir.as_fd(), name, Access::Read, None)?;
            let mode = st.st_mode & 0o7777;
            sys::chmod_fd(ro.as_fd(), mode | 0o200)?;
            let f = sys::reopen(ro.as_fd(), Access::ReadWrite);
            sys::chmod_fd(ro.as_fd(), mode)?;
            f
        }
        other => other.map(|(f, _)| f),
    }
}

fn syncfs(root: &Path) -> Result<(), UpgradeError> {
    let d = File::open(root).map_err(io_at(root))?;
    // SAFETY: syncfs on a valid descriptor.
    if unsafe { libc::syncfs(d.as_raw_fd()) } != 0 {
        return Err(io_at(root)(io::Error::last_os_error()));
    }
    Ok(())
}

/// Every regular file of the backing tree that may be a cmkfs file (encrypted or long names,
/// quarantined ones included), each inode once, with its plaintext path when the names on
/// the way decrypt. The walk goes through directory descriptors, one name at a time
/// (`O_NOFOLLOW`): symlinks are neither followed nor listed. Pending directories are held as
/// (parent descriptor, name): only the ancestors of the walk's position stay open.
fn find_files(
    root: &Path,
    root_fd: BorrowedFd<'_>,
    keys: &VolumeKeys,
) -> Result<Vec<Found>, UpgradeError> {
    let mut out = Vec::new();
    let mut seen: HashSet<(u64, u64)> = HashSet::new();
    let top = Rc::new(sys::open_dir_beneath(root_fd, Path::new("")).map_err(io_at(root))?);
    let mut stack = vec![PendingDir {
        parent: top,
        name: None,
        rel: PathBuf::new(),
        plain: Some("/".into()),
    }];
    while let Some(PendingDir {
        parent,
        name,
        rel,
        plain: plain_dir,
    }) = stack.pop()
    {
        let abs = root.join(&rel);
        let dir = match &name {
            None => parent,
            Some(n) => Rc::new(sys::open_dir(parent.as_fd(), n).map_err(io_at(&abs))?),
        };
        let id: Option<DirId> = sys::read_small(dir.as_fd(), OsStr::new(DIRID_FILE), 64)
            .ok()
            .and_then(|b| b.as_slice().try_into().ok());
        let mut entries = sys::list(dir.as_fd()).map_err(io_at(&abs))?;
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        for ent in entries {
            let name = ent.name;
            let st = match sys::stat_at(dir.as_fd(), &name) {
                Ok(st) => st,
                // Gone since the listing: nothing to convert.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_at(&abs.join(&name))(e)),
            };
            let fmt = st.st_mode & libc::S_IFMT;
            let kind = names::classify(&name);
            let plain = match (&plain_dir, &id, &kind) {
                (Some(d), Some(id), EntryKind::Encrypted | EntryKind::Long) => {
                    plaintext_name(dir.as_fd(), &name, id, keys).map(|n| d.join(n))
                }
                _ => None,
            };
            if fmt == libc::S_IFDIR {
                stack.push(PendingDir {
                    parent: dir.clone(),
                    name: Some(name.clone()),
                    rel: rel.join(&name),
                    plain,
                });
            } else if fmt == libc::S_IFREG
                && kind != EntryKind::Hidden
                && seen.insert((st.st_dev, st.st_ino))
            {
                out.push(Found {
                    abs: abs.join(&name),
                    rel: rel.join(&name),
                    plain,
                });
            }
        }
    }
    Ok(out)
}

/// A directory [`find_files`] has yet to list: entry `name` of `parent` (the root itself when
/// `None`), at `rel` below the root, with its plaintext path when known.
struct PendingDir {
    parent: Rc<OwnedFd>,
    name: Option<OsString>,
    rel: PathBuf,
    plain: Option<PathBuf>,
}

fn plaintext_name(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    id: &DirId,
    keys: &VolumeKeys,
) -> Option<PathBuf> {
    let encoded = match names::classify(name) {
        EntryKind::Long => {
            let full = sys::read_small(dir, &names::side_file_of(name), 4096).ok()?;
            names::long_name_matches(name, &full).then_some(full)?
        }
        _ => name.as_bytes().to_vec(),
    };
    names::decrypt(&keys.names, id, &encoded)
        .ok()
        .map(PathBuf::from)
}
