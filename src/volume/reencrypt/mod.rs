//! `cmkfs volume reencrypt`: replaces a volume's DEK, re-encrypting everything under a new
//! one, crash-safe and resumable, offline or inside a live mount (docs/FORMAT.md,
//! "Re-encryption").
//!
//! 1. **Start.** A new DEK (and a new inner DEK on a double-encrypted volume) is wrapped by
//!    the volume's KEK; the journal (phase *names*) is written, then the header: the new DEK
//!    one generation up, the current one as `retiring` (wrapped by the same KEK, so a
//!    revocation takes both). From here every check unwraps both, and everything new (file
//!    headers, names) is written under the new DEK.
//! 2. **Names** (`meta`): names, long-name side files, symlink targets and extended
//!    attributes are sealed again under the new name key, with every request held back
//!    (the mount's gates closed); idempotent, so an interrupted run is simply run again (a
//!    mount does that before it serves). Then `syncfs` and the journal says *contents*.
//! 3. **Contents** (`contents`): file data in batches under the journal; each file header
//!    records its key generation and, for a file that spans batches, how far it got, so the
//!    data path reads every unit with the right key at every moment.
//! 4. **Finish.** Once a walk finds nothing left (online: and no rename or link was in
//!    flight at its start or started during it), online a final check with every request
//!    held back converts whatever a walk may still have missed; then the header is written
//!    without `retiring` — the old DEK is gone — and the journal removed.

mod contents;
pub mod journal;
mod meta;
pub(crate) mod preflight;
use preflight::FilesAt;

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub use journal::JOURNAL_FILE;
use journal::{Journal, Phase};
pub use meta::{DirIds, ReplacedSymlink};
pub use preflight::quarantine_entries;

use super::header::{PlatformEnvelope, VolumeHeader};
use super::{Closed, OpenFile, Volume, VolumeError};
use crate::crypto::{Dek, VolumeKeys};
use crate::keyring::Unwrapped;
use crate::vault::Wrapped;

/// How often an offline re-encryption asks the vault again (a revocation stops it).
const CHECK_EVERY: Duration = Duration::from_secs(2);
/// Walks an online re-encryption makes beside the mount's requests while renames keep
/// happening, before the final check runs with every request held back.
const ONLINE_ROUNDS: usize = 4;

/// The steps of a re-encryption, for fault injection: a [`Hooks::fault`] hook called after
/// each can stop it there, as a crash would.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum Step {
    /// The journal of a new re-encryption is written.
    JournalStarted,
    /// The header with the new DEK and the retiring one is written.
    HeaderStarted,
    /// An entry was renamed under the new name key.
    NameConverted,
    /// A symlink target was sealed again.
    TargetConverted,
    /// An extended attribute was set under its new name (the old one not yet removed).
    XattrSet,
    /// The move of an extended attribute too large to be held twice is in the journal.
    XattrRecorded,
    /// Such an attribute's old form is removed (the new one not yet set).
    XattrRemoved,
    /// The names phase is complete and durable.
    NamesDone,
    /// A batch's journal is durable.
    JournalDurable,
    /// The first range of a batch is written.
    DataWritten,
    /// Every range and file header of a batch is written.
    HeadersWritten,
    /// A batch is durable.
    BatchSynced,
    /// A batch's journal is retired.
    JournalRetired,
    /// A range of an interrupted batch was restored.
    RangeRestored,
    /// The header without the retiring DEK is written.
    HeaderFinished,
}

/// A fault-injection hook (tests).
pub type FaultHook<'a> = &'a mut dyn FnMut(Step) -> io::Result<()>;

/// Where a re-encryption is.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Progress {
    /// `names` or `contents`.
    pub phase: String,
    /// Data bytes rewritten so far (holes are neither read nor written).
    pub bytes_done: u64,
    /// Data bytes of the files found: their allocated bytes, so a sparse file counts what it
    /// holds (an estimate; more while a mount writes).
    pub bytes_total: u64,
    /// Files converted so far.
    pub files_done: u64,
    /// Files found.
    pub files_total: u64,
}

/// Observers of a re-encryption.
#[derive(Default)]
pub struct Hooks<'a> {
    /// Progress reports.
    pub progress: Option<&'a mut dyn FnMut(&Progress)>,
    /// Fault injection for crash-safety tests.
    #[doc(hidden)]
    pub fault: Option<FaultHook<'a>>,
}

impl Hooks<'_> {
    fn step(&mut self, step: Step) -> Result<(), ReencryptError> {
        match &mut self.fault {
            Some(f) => f(step).map_err(|_| ReencryptError::Interrupted(step)),
            None => Ok(()),
        }
    }
}

/// Why a re-encryption stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReencryptError {
    /// The volume or its keys.
    #[error(transparent)]
    Volume(#[from] VolumeError),
    /// A system call on the backing store.
    #[error("{0}")]
    Io(io::Error),
    /// The journal cannot be used.
    #[error("the re-encryption journal {JOURNAL_FILE} cannot be used: {why}; nothing was changed")]
    Journal {
        /// What is wrong.
        why: String,
    },
    /// The keys were revoked meanwhile.
    #[error("the volume became inaccessible during the re-encryption ({0}); it resumes with `cmkfs volume reencrypt` once access is back")]
    Revoked(String),
    /// A fault hook stopped it (tests).
    #[error("interrupted after step {0:?}")]
    Interrupted(Step),
    /// Something makes it impossible.
    #[error("{0}")]
    Refused(String),
}

impl ReencryptError {
    fn os(e: io::Error) -> ReencryptError {
        ReencryptError::Io(e)
    }

    fn other(e: impl std::fmt::Display) -> ReencryptError {
        ReencryptError::Refused(e.to_string())
    }
}

/// What a re-encryption needs from outside the volume layer: the vault (unwrap, wrap) and
/// the header this process keeps in force (a mount's checks must adopt what it writes).
pub trait KeyAccess {
    /// The header in force.
    fn current_header(&self) -> VolumeHeader;
    /// Unwraps and verifies every DEK of `header` (current, inner, retiring).
    fn unwrap(&self, header: &VolumeHeader) -> Result<Unwrapped, VolumeError>;
    /// Wraps new DEKs with `header`'s key (same key version) and, for a double-encrypted
    /// volume, the platform key.
    fn wrap(
        &self,
        header: &VolumeHeader,
        outer: &Dek,
        inner: Option<&Dek>,
    ) -> Result<(Wrapped, Option<PlatformEnvelope>), VolumeError>;
    /// Writes `new` as the volume header (atomically; under the Disk Encryption Set's lock
    /// where one applies) and makes it the one in force; `changed` is called right after each
    /// change of the backing root (the temp file created, the rename), before the fsyncs
    /// (the root's mtime is put back there).
    fn replace_header(
        &self,
        new: &VolumeHeader,
        changed: &mut dyn FnMut(),
    ) -> Result<(), VolumeError>;
}

/// What a live mount does for an online re-encryption.
pub trait Online: Sync {
    /// The names phase changed every backing name (with every request held back): cached
    /// backing names must be recomputed with `keys` and the directory ids `ids`.
    fn names_changed(&self, ids: &DirIds, keys: &VolumeKeys);
    /// Still with every request held back: the symlinks the names phase replaced by new
    /// inodes. The mount keeps showing each under the number the kernel knows it by (no
    /// kernel notification: none may be sent while requests wait on the gates).
    fn symlinks_replaced(&self, replaced: Vec<meta::ReplacedSymlink>);
    /// Every file the mount holds open (those with no name left are reached only so).
    fn open_files(&self) -> Vec<Arc<OpenFile>>;
}

/// What a re-encryption did.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    /// Whether it resumed an interrupted one.
    pub resumed: bool,
    /// The key generation now.
    pub key_generation: u32,
    /// The new DEK's fingerprint.
    pub dek_fingerprint: String,
    /// Entries renamed under the new name key.
    pub names: u64,
    /// Symlink targets sealed again.
    pub symlink_targets: u64,
    /// Extended attributes sealed again.
    pub xattrs: u64,
    /// Files whose data was re-encrypted.
    pub files: u64,
    /// Data bytes rewritten.
    pub bytes: u64,
    /// Ranges of an interrupted batch restored.
    pub ranges_restored: u64,
    /// Online: files the final check found still under the retiring DEK although the last
    /// walk looked complete (0 unless a walk missed a file; each was converted before the
    /// old DEK was erased).
    #[serde(default)]
    pub missed: u64,
    /// Entries of `cmkfs.quarantine/` deleted on request (`--discard-quarantine`).
    #[serde(default)]
    pub quarantine_discarded: u64,
    /// Directories the names phase could not enter (backing path and why); while there are
    /// any the run stops before its contents phase and the old DEK is kept. A mount's
    /// recovery serves the volume with them left as they are.
    #[serde(default)]
    pub damaged: Vec<String>,
    /// Seconds taken.
    pub seconds: f64,
}

/// A re-encryption of one open volume.
pub struct Session<'a> {
    vol: &'a Volume,
    access: &'a dyn KeyAccess,
    online: Option<&'a dyn Online>,
    hooks: Hooks<'a>,
    /// Checks the vault itself every [`CHECK_EVERY`] (offline: no monitor does it).
    check_vault: bool,
    last_check: Instant,
    volume_id: String,
    /// The key generation being written (the journal's).
    generation: u32,
    /// The current (new) outer DEK: the journal's MAC key.
    journal_dek: Option<Dek>,
    progress: Progress,
    /// Online: step 3 ended on a walk it took for complete (see [`Report::missed`]).
    walks_complete: bool,
    /// Delete `cmkfs.quarantine/` rather than refuse (see `preflight`).
    discard_quarantine: bool,
    /// Directories the names phase could not enter (see [`Report::damaged`]).
    damaged: Vec<String>,
    /// The backing root's (atime, mtime) from before the names phase began, which it sets
    /// back once the root's entries are renamed: read when this session starts a run, else
    /// from the journal of the interrupted one (`Journal::root_times`) when nothing can
    /// have changed the root since (offline, or a mount's recovery before it serves).
    root_times: Option<[(i64, u32); 2]>,
}

impl<'a> Session<'a> {
    /// A re-encryption of `vol`. `online`: the live mount serving it (`None` offline, where
    /// the caller holds the volume lock exclusively and the session checks the vault itself).
    pub fn new(
        vol: &'a Volume,
        access: &'a dyn KeyAccess,
        online: Option<&'a dyn Online>,
        hooks: Hooks<'a>,
    ) -> Session<'a> {
        Session {
            vol,
            access,
            online,
            hooks,
            check_vault: online.is_none(),
            last_check: Instant::now(),
            volume_id: vol.header().volume_id.clone(),
            generation: 0,
            journal_dek: None,
            progress: Progress::default(),
            walks_complete: false,
            discard_quarantine: false,
            damaged: Vec::new(),
            root_times: None,
        }
    }

    /// Whether `cmkfs.quarantine/` is deleted (`true`) or makes the run refuse (`false`, the
    /// default): its entries cannot be sealed again under the new DEK, and erasing the old
    /// one would make them unreadable for good.
    pub fn discard_quarantine(mut self, discard: bool) -> Session<'a> {
        self.discard_quarantine = discard;
        self
    }

    fn journal_key(&self) -> Result<&Dek, ReencryptError> {
        self.journal_dek
            .as_ref()
            .ok_or_else(|| ReencryptError::Refused("no journal key".into()))
    }

    fn report_progress(&mut self) {
        if let Some(f) = &mut self.hooks.progress {
            f(&self.progress);
        }
    }

    /// Offline: asks the vault again now and then; a denial stops the run.
    fn check_revocation(&mut self) -> Result<(), ReencryptError> {
        if self.check_vault && self.last_check.elapsed() >= CHECK_EVERY {
            self.vol.keyring().check();
            self.last_check = Instant::now();
        }
        self.vol
            .current_keys()
            .map(|_| ())
            .map_err(|e| ReencryptError::Revoked(e.to_string()))
    }

    /// Runs (or resumes) the re-encryption to its end.
    pub fn run(mut self) -> Result<Report, ReencryptError> {
        let t0 = Instant::now();
        let mut report = Report::default();
        let mut header = self.access.current_header();
        let vol = self.vol;
        if header.retiring.is_none() {
            preflight::check_dirs(vol, true)?;
            preflight::check_files(vol, FilesAt::Start(header.key_generation))?;
        } else {
            preflight::check_files(
                vol,
                FilesAt::Resume {
                    retiring: header.key_generation.wrapping_sub(1),
                    new: header.key_generation,
                },
            )?;
        }
        report.quarantine_discarded += preflight::check_quarantine(&self)?;
        let deks = match header.retiring {
            None => {
                // From the new keys to the end of the names phase no request runs: a mount
                // looks names up under the current key only, so it must not see a name that
                // is still under the old one.
                let closed = vol.gates().close();
                let d = self.start(&header, &closed)?;
                header = self.access.current_header();
                self.journal_dek = Some(copy_dek(&d.outer)?);
                self.resume(&header, &mut report, Some(closed))?;
                d
            }
            Some(_) => {
                report.resumed = true;
                let d = self.access.unwrap(&header)?;
                self.journal_dek = Some(copy_dek(&d.outer)?);
                self.resume(&header, &mut report, None)?;
                d
            }
        };
        if !self.damaged.is_empty() {
            return Err(ReencryptError::Refused(format!(
                "the names phase could not enter {} director{} ({}): the old DEK is kept and \
                 the volume mounts meanwhile; run `cmkfs fsck` on the volume (put a \
                 directory's `.cmkfs.dirid` back from a backup, or `cmkfs fsck --repair`), \
                 then the re-encryption again",
                self.damaged.len(),
                if self.damaged.len() == 1 { "y" } else { "ies" },
                self.damaged.join("; ")
            )));
        }
        self.contents(&mut report)?;
        self.finish(&deks, &mut report)?;
        report.key_generation = header.key_generation;
        report.dek_fingerprint = header.dek_fingerprint.clone();
        report.seconds = t0.elapsed().as_secs_f64();
        Ok(report)
    }

    /// Brings an interrupted re-encryption to a state the data path serves: the names
    /// phase completed, an interrupted batch finished. What a mount runs before it serves a
    /// volume whose header has a retiring DEK (the rest resumes with the command).
    pub fn recover(mut self) -> Result<Report, ReencryptError> {
        let header = self.access.current_header();
        let mut report = Report::default();
        if header.retiring.is_none() {
            return Ok(report);
        }
        let deks = self.access.unwrap(&header)?;
        self.journal_dek = Some(copy_dek(&deks.outer)?);
        report.resumed = true;
        self.resume(&header, &mut report, None)?;
        if !self.damaged.is_empty() {
            tracing::warn!(
                directories = %self.damaged.join("; "),
                "the interrupted names phase could not enter these directories: they are \
                 left as they are (run `cmkfs fsck`); the rest of the volume is served"
            );
            report.damaged = std::mem::take(&mut self.damaged);
        }
        Ok(report)
    }

    /// Step 1: new DEK(s), journal, header, keys (the caller holds the gates `closed`).
    fn start(
        &mut self,
        header: &VolumeHeader,
        _closed: &Closed<'_>,
    ) -> Result<Unwrapped, ReencryptError> {
        if header.layout().is_none() {
            return Err(ReencryptError::Refused(
                "the volume needs `cmkfs upgrade` first".into(),
            ));
        }
        let old = self.access.unwrap(header)?;
        let outer = Dek::generate().map_err(ReencryptError::other)?;
        let inner = match header.platform {
            Some(_) => Some(Dek::generate().map_err(ReencryptError::other)?),
            None => None,
        };
        let (wrapped, platform) = self.access.wrap(header, &outer, inner.as_ref())?;
        let retiring = Wrapped {
            kid: header.key_id()?,
            alg: header.wrap_alg,
            value: header.wrapped().map_err(ReencryptError::other)?,
        };
        let new_header = header.reencrypting(&outer, &wrapped, platform, &retiring);
        let gen = new_header.key_generation;
        let vol = self.vol;
        self.root_times = root_times(vol);
        let mut journal = Journal::new(&header.volume_id, gen, Phase::Names);
        journal.root_times = self.root_times;
        vol.keeping_root_mtime(|k| {
            journal.write_then(vol.root_dir().fd(), &outer, &mut || k.put_back())
        })
        .map_err(ReencryptError::os)?;
        self.hooks.step(Step::JournalStarted)?;
        let sector = header.sector_size as usize;
        let deks = Unwrapped {
            outer,
            inner,
            sector_size: sector,
            generation: gen,
            retiring: Some(Box::new(old)),
        };
        vol.keeping_root_mtime(|k| {
            self.access
                .replace_header(&new_header, &mut || k.put_back())
        })?;
        if !self
            .vol
            .keyring()
            .install(&deks)
            .map_err(ReencryptError::other)?
        {
            return Err(ReencryptError::Revoked("the keys are not live".into()));
        }
        self.hooks.step(Step::HeaderStarted)?;
        tracing::info!(
            generation = gen,
            "re-encryption started: new DEK in the header, the old one retiring"
        );
        Ok(deks)
    }

    /// The names phase if it is not done, and an interrupted batch. `closed`: the gates, if
    /// the caller closed them already (they are opened once the names phase is done).
    fn resume(
        &mut self,
        header: &VolumeHeader,
        report: &mut Report,
        closed: Option<Closed<'a>>,
    ) -> Result<(), ReencryptError> {
        let root = self.vol.root_dir().clone();
        let journal = Journal::read(
            root.fd(),
            self.journal_key()?,
            &header.volume_id,
            header.key_generation,
        )
        .map_err(|why| ReencryptError::Journal { why })?
        // No journal (removed by hand?): the names phase is idempotent, run it again.
        .unwrap_or_else(|| Journal::new(&header.volume_id, header.key_generation, Phase::Names));
        if journal.phase == Phase::Names {
            if self.root_times.is_none() {
                // Online a mount served the root since the journal was written: its users'
                // changes stand.
                self.root_times = journal
                    .root_times
                    .filter(|_| self.online.is_none())
                    .or_else(|| root_times(self.vol));
            }
            self.progress.phase = "names".into();
            self.report_progress();
            let keys = self.vol.current_keys()?;
            let Some(old) = keys.retiring.as_deref() else {
                return Err(ReencryptError::Refused("no retiring key".into()));
            };
            let mut counts = meta::MetaCounts::default();
            {
                let vol = self.vol;
                let _closed = closed.unwrap_or_else(|| vol.gates().close());
                self.generation = header.key_generation;
                if let Some(m) = &journal.xattr {
                    meta::finish_xattr_move(self, m)?;
                }
                let ids = meta::run(self, &keys, old, &mut counts)?;
                if let Some(o) = self.online {
                    meta::convert_open_xattrs(self, &o.open_files(), &keys, old, &mut counts)?;
                    o.names_changed(&ids, &keys);
                    o.symlinks_replaced(std::mem::take(&mut counts.replaced));
                }
            }
            report.names += counts.names;
            report.symlink_targets += counts.targets;
            report.xattrs += counts.xattrs;
            contents::syncfs(&root)?;
            if !self.damaged.is_empty() {
                // The journal stays at *names*: the next run enters those directories again
                // once they are repaired, and the old DEK is kept meanwhile.
                return Ok(());
            }
            let key = self.journal_key()?;
            self.vol
                .keeping_root_mtime(|k| {
                    Journal::new(&header.volume_id, header.key_generation, Phase::Contents)
                        .write_then(root.fd(), key, &mut || k.put_back())
                })
                .map_err(ReencryptError::os)?;
            self.hooks.step(Step::NamesDone)?;
        } else if !journal.items.is_empty() {
            report.ranges_restored += contents::recover(self, &journal)?;
        }
        Ok(())
    }

    /// Step 3: every file's data. Online, walks again while renames and links move files
    /// between directories a walk has and has not visited, until one converts nothing while
    /// no move was in flight or started (or [`ONLINE_ROUNDS`] walks were made); the final
    /// check of [`Session::finish`] catches whatever is left, with every request held back.
    fn contents(&mut self, report: &mut Report) -> Result<(), ReencryptError> {
        self.progress.phase = "contents".into();
        let root = self.vol.root_dir().clone();
        for round in 0..ONLINE_ROUNDS {
            #[cfg(debug_assertions)]
            if round == 0 {
                race::before_first_walk(self.vol);
            }
            let mark = self.vol.moves().mark();
            let files = contents::walk(&root, self.vol, false)?;
            let files = test_hide(files);
            if round == 0 {
                self.progress.files_total = files.len() as u64;
                self.progress.bytes_total = files.iter().map(|f| f.alloc).sum();
                self.report_progress();
            }
            #[cfg(debug_assertions)]
            if round == 0 {
                race::after_first_walk(self.vol);
            }
            let (n, bytes) = contents::convert(self, files, true)?;
            report.files += n;
            report.bytes += bytes;
            // Offline nothing moves; online, a walk that converted nothing while no move was
            // in flight or started has seen every file.
            if self.online.is_none() || (n == 0 && self.vol.moves().quiet_since(mark)) {
                self.walks_complete = true;
                break;
            }
        }
        Ok(())
    }

    /// Step 4: the header without the retiring DEK. Online, first a final check with every
    /// request held back: a walk of the whole tree converts any file still under the
    /// retiring DEK (the walks of step 3 ran beside renames; a file they all missed would
    /// otherwise be lost with the key), then the open files with no name left.
    fn finish(&mut self, deks: &Unwrapped, report: &mut Report) -> Result<(), ReencryptError> {
        let root = self.vol.root_dir().clone();
        let vol = self.vol;
        {
            let _closed = vol.gates().close();
            // Nothing under the old DEK may be left once it is erased: the quarantine (which
            // `fsck --repair` may have filled since the run began), and offline, where the
            // walks skip a directory they cannot open with a warning, every directory.
            report.quarantine_discarded += preflight::check_quarantine(self)?;
            if self.online.is_none() {
                preflight::check_dirs(vol, false)?;
            }
            if let Some(o) = self.online {
                let files = contents::walk(&root, vol, true)?;
                let (n, bytes) = contents::convert(self, files, false)?;
                report.files += n;
                report.bytes += bytes;
                if n > 0 && self.walks_complete {
                    // Step 3 ended on a walk it took for complete: a bug, caught here.
                    report.missed += n;
                    tracing::warn!(
                        files = n,
                        "the final check found files the re-encryption's walks had missed; \
                         they are converted now, before the old DEK goes"
                    );
                }
                // Files the mount holds open with no name left.
                let mut seen = std::collections::HashSet::new();
                let open: Vec<_> = o
                    .open_files()
                    .into_iter()
                    .filter(|of| {
                        crate::volume::sys::fstat(std::os::fd::AsFd::as_fd(of.file()))
                            .is_ok_and(|st| seen.insert(st.st_ino))
                    })
                    .collect();
                contents::convert_open(self, open)?;
            }
            // The backstop of the rule above: not one file may be left under the old DEK
            // (or under a generation the run did not write).
            preflight::check_files(vol, FilesAt::Finish(deks.generation))?;
            contents::syncfs(&root)?;
            // The header in force (a rotation may have rewrapped it meanwhile).
            let done = self.access.current_header().reencrypted(&deks.outer);
            vol.keeping_root_mtime(|k| self.access.replace_header(&done, &mut || k.put_back()))?;
            let now = Unwrapped {
                outer: copy_dek(&deks.outer)?,
                inner: deks.inner.as_ref().map(copy_dek).transpose()?,
                sector_size: deks.sector_size,
                generation: deks.generation,
                retiring: None,
            };
            self.vol
                .keyring()
                .install(&now)
                .map_err(ReencryptError::other)?;
        }
        self.hooks.step(Step::HeaderFinished)?;
        vol.keeping_root_mtime(|k| {
            Journal::remove(root.fd(), &mut || k.put_back())?;
            // Temp files of journal writes a crash interrupted.
            let tmp = format!("{}{JOURNAL_FILE}.", crate::fsutil::TEMP_PREFIX);
            for e in contents::list_keeping_atime(&root).unwrap_or_default() {
                if e.name.as_encoded_bytes().starts_with(tmp.as_bytes()) {
                    let _ = crate::volume::sys::unlink(root.fd(), &e.name);
                }
            }
            Ok(())
        })
        .map_err(ReencryptError::os)?;
        tracing::info!(
            generation = deks.generation,
            "re-encryption finished: the old DEK is gone from the header"
        );
        Ok(())
    }
}

/// Test hook (debug builds only; a release build ignores the variable): with
/// `CMKFS_TEST_REENCRYPT_RACE=1`, issue 13's interleaving is forced. A rename through the
/// mount, once counted, waits (at most 5 s) until the contents phase's first walk has listed
/// the tree; that walk begins only once a rename is in flight, and its batches only once
/// the rename is done: the walk lists the file under its old name, and the batch finds it
/// gone. With `CMKFS_TEST_REENCRYPT_PAUSE_DIR=DIR`, the first walk's batches wait until the
/// test has changed the tree (F10, see `after_first_walk`).
#[cfg(debug_assertions)]
mod race {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    static WALKED: AtomicBool = AtomicBool::new(false);

    fn on() -> bool {
        std::env::var_os("CMKFS_TEST_REENCRYPT_RACE").is_some_and(|v| v == "1")
    }

    fn wait(cond: impl Fn() -> bool) {
        let end = Instant::now() + Duration::from_secs(5);
        while !cond() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    pub fn rename_counted() {
        if on() {
            wait(|| WALKED.load(Ordering::SeqCst));
        }
    }

    pub fn before_first_walk(vol: &crate::volume::Volume) {
        if on() {
            wait(|| vol.moves().in_flight() > 0);
        }
    }

    pub fn after_first_walk(vol: &crate::volume::Volume) {
        if on() {
            WALKED.store(true, Ordering::SeqCst);
            wait(|| vol.moves().in_flight() == 0);
        }
        // F10's interleaving: the test changes the tree through the mount between the first
        // walk's listing and its batches' opens (`walked` says the listing is done; the
        // batches wait, at most 5 s, for `go`).
        if let Some(dir) = std::env::var_os("CMKFS_TEST_REENCRYPT_PAUSE_DIR") {
            let dir = std::path::PathBuf::from(dir);
            let _ = std::fs::write(dir.join("walked"), b"");
            wait(|| dir.join("go").exists());
        }
    }
}

/// A rename waits here between its count and its backing call when the `race` test hook
/// is on (debug builds only).
pub(crate) fn test_rename_counted() {
    #[cfg(debug_assertions)]
    race::rename_counted();
}

/// Test hook: `CMKFS_TEST_REENCRYPT_WALKS_MISS=1` makes every walk of step 3 find nothing,
/// as a walk that missed files would, so that the final check must convert them all.
/// Debug builds only.
fn test_hide(files: Vec<contents::Found>) -> Vec<contents::Found> {
    #[cfg(debug_assertions)]
    if std::env::var_os("CMKFS_TEST_REENCRYPT_WALKS_MISS").is_some_and(|v| v == "1") {
        return Vec::new();
    }
    files
}

/// The backing root's (atime, mtime) now.
fn root_times(vol: &Volume) -> Option<[(i64, u32); 2]> {
    let st = super::sys::fstat(vol.root_dir().fd()).ok()?;
    Some([
        (st.st_atime, st.st_atime_nsec as u32),
        (st.st_mtime, st.st_mtime_nsec as u32),
    ])
}

fn copy_dek(d: &Dek) -> Result<Dek, ReencryptError> {
    Dek::from_slice(d.as_bytes()).map_err(ReencryptError::other)
}
