//! The on-disk format and every operation on it, independent of FUSE: the volume header,
//! the name transform, per-file headers and sector I/O. The FUSE adapter (`crate::fs`) maps
//! requests onto these calls; tests drive them directly too.
//!
//! No backing path is ever built: every operation names a backing directory held open by
//! descriptor ([`Dir`]) and one backing name in it, and goes through [`sys`], the one module
//! that makes system calls on the backing store (no symlink followed, nothing but regular
//! files opened for I/O, metadata read with a size bound). One file per family of operations:
//! `dir` (directories, listings, ids), `entries` (create and remove names), `symlink`,
//! `open_create` (file handles, read/write), `truncate` (size and allocation), `attr`
//! (attributes), `rename` (rename and link), `xattr` and `acl` (extended attributes, POSIX
//! ACLs).

pub mod acl;
mod attr;
pub mod bufpool;
pub mod content;
mod dir;
pub mod direct;
mod entries;
pub mod file_check;
pub mod header;
pub mod idrand;
pub mod idsync;
pub mod layout;
pub mod lock;
pub mod names;
mod open_create;
mod root_times;
pub(crate) use root_times::{keep_mtime, keep_times};
pub mod reencrypt;
pub mod rename;
pub mod symlink;
pub mod sys;
mod truncate;
pub mod upgrade;
pub mod v1;
pub mod writeout;
pub mod xattr;

pub use attr::{Attr, Pinned, SetAttr, Target};
pub use dir::{is_dead_temp_dir, Dir, Listed};
pub use open_create::OpenFile;

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};
use std::time::SystemTime;

use content::Ctx;
pub use content::FILE_HEADER_LEN;
use header::{VolumeHeader, HEADER_FILE};
use names::{NameError, DIRID_FILE};

use crate::crypto::{CryptoError, Dek, VolumeKeys};
use crate::engine::SectorEngine;
use crate::keyring::Keyring;
use crate::vault::{Vault, VaultError, WrapAlg};

/// Default XTS data unit: one 4 KiB sector.
pub const DEFAULT_SECTOR_SIZE: u32 = 4096;

/// Everything that can go wrong with a volume. [`VolumeError::errno`] maps it for FUSE.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// The directory has no volume header.
    #[error("{} is not a cmkfs volume (no {HEADER_FILE}); create one with `cmkfs init`", .0.display())]
    NotAVolume(PathBuf),
    /// The header exists but cannot be used.
    #[error("volume header {} is corrupt: {why}", path.display())]
    CorruptHeader {
        /// Header path.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The vault unwrapped something, but not this volume's DEK.
    #[error("{0}")]
    WrongKey(String),
    /// A vault call failed.
    #[error(transparent)]
    Vault(#[from] VaultError),
    /// An I/O error on a named path.
    #[error("{}: {error}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        error: io::Error,
    },
    /// A plain system call error (its errno goes back to the caller).
    #[error(transparent)]
    Os(io::Error),
    /// A backing file that is not in cmkfs format (corrupt, truncated, foreign).
    #[error("corrupt file{}: {why}", path.as_ref().map(|p| format!(" {}", p.display())).unwrap_or_default())]
    CorruptFile {
        /// Backing path, when known.
        path: Option<PathBuf>,
        /// What is wrong.
        why: String,
    },
    /// The keys are gone (revoked or locked).
    #[error("volume is inaccessible: {0}")]
    Inaccessible(String),
    /// A cipher refused its input.
    #[error(transparent)]
    Crypto(CryptoError),
    /// `init` needs an empty directory.
    #[error("{} is not empty; `cmkfs init` needs an empty or new directory", .0.display())]
    NotEmpty(PathBuf),
    /// A bug or an impossible state.
    #[error("internal error: {0}")]
    Internal(String),
    /// The volume is in an older on-disk format that this cmkfs converts before use.
    #[error("{} is in on-disk format v{version}; convert it with `cmkfs upgrade {}` (or mount it: the mount converts it first)", .path.display(), .path.display())]
    NeedsUpgrade {
        /// The backing directory.
        path: PathBuf,
        /// Its format version.
        version: u32,
    },
}

impl VolumeError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: &Path, source: io::Error) -> VolumeError {
        VolumeError::Io {
            path: path.to_path_buf(),
            error: source,
        }
    }

    fn errno_of(e: i32) -> VolumeError {
        VolumeError::Os(io::Error::from_raw_os_error(e))
    }

    /// The errno a FUSE request gets for this error. Revocation is `EACCES`: the key owner
    /// denied access. Corrupt data is `EIO`.
    pub fn errno(&self) -> i32 {
        match self {
            VolumeError::Os(e) | VolumeError::Io { error: e, .. } => {
                e.raw_os_error().unwrap_or(libc::EIO)
            }
            VolumeError::Inaccessible(_) => libc::EACCES,
            VolumeError::NotEmpty(_) => libc::ENOTEMPTY,
            _ => libc::EIO,
        }
    }

    /// The error without the path it may carry (callers that log a path of their own).
    pub fn detail(&self) -> String {
        match self {
            VolumeError::CorruptFile { why, .. } => format!("corrupt file: {why}"),
            other => other.to_string(),
        }
    }

    /// Whether this should be logged (not an ordinary errno like ENOENT).
    pub fn is_notable(&self) -> bool {
        !matches!(
            self,
            VolumeError::Os(_) | VolumeError::Io { .. } | VolumeError::NotEmpty(_)
        )
    }
}

impl From<crate::keyring::NotLive> for VolumeError {
    fn from(e: crate::keyring::NotLive) -> Self {
        VolumeError::Inaccessible(e.0)
    }
}

impl From<NameError> for VolumeError {
    fn from(e: NameError) -> Self {
        VolumeError::errno_of(match e {
            NameError::Invalid => libc::EINVAL,
            NameError::TooLong => libc::ENAMETOOLONG,
        })
    }
}

/// Who a new entry belongs to (the requesting process's ids) and the umask its mode gets
/// when the parent directory has no default ACL.
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// The process's umask (applied here: the kernel leaves it to us with POSIX ACLs on).
    pub umask: u32,
}

/// Options for [`Volume::create`].
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// KEK name in the vault.
    pub key_name: String,
    /// KEK version (latest when `None`).
    pub key_version: Option<String>,
    /// Wrap algorithm.
    pub wrap_alg: WrapAlg,
    /// XTS data unit size.
    pub sector_size: u32,
    /// Disk Encryption Set to record.
    pub des: Option<String>,
    /// On-disk layout: [`layout::Layout::V3`] unless `cmkfs init --format 2` asked for v2.
    pub layout: layout::Layout,
}

/// The platform layer of a double-encrypted volume ([`Volume::create_double`]): which vault
/// and key wrap the inner DEK.
pub struct PlatformLayer<'a> {
    /// cmkfs's own vault (as its owner).
    pub vault: &'a dyn Vault,
    /// The platform key's name in it.
    pub key_name: &'a str,
    /// Wrap algorithm for the inner DEK.
    pub wrap_alg: WrapAlg,
}

/// An open (unlocked) volume.
pub struct Volume {
    root: PathBuf,
    root_dir: Arc<Dir>,
    header: VolumeHeader,
    keyring: Arc<Keyring>,
    engine: SectorEngine,
    sector: u64,
    /// Where the data of every backing file starts (from the header's format).
    layout: layout::Layout,
    as_root: bool,
    /// The backing root's device: inode numbers are unique on one filesystem only, and both
    /// the kernel's inodes and the per-file state below are keyed by them, so an entry on
    /// another device (a mount point inside the backing directory) is refused, never served
    /// under a number that may belong to another file.
    root_dev: u64,
    /// Per-inode state shared by every open handle of a file.
    files: Mutex<HashMap<u64, Weak<open_create::Shared>>>,
    gates: Gates,
    /// Renames and links (see [`Volume::moves`]).
    moves: Moves,
    /// New directories' ids not yet fsynced (`idsync`: filesystems where that is deferred).
    ids: idsync::PendingIds,
}

/// Renames and links started and finished so far. Both counts, not one: a walk that began
/// while a rename was between its count and its backing `renameat2` can list the entry under
/// its old name, then fail to find it there, and a single count bumped before the move would
/// look unchanged to it (issue 13: a file missed by every walk of an online re-encryption,
/// left under the retiring DEK).
#[derive(Debug, Default)]
pub struct Moves {
    started: AtomicU64,
    finished: AtomicU64,
}

/// Where the [`Moves`] counts stood ([`Volume::moves`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MoveMark {
    started: u64,
    finished: u64,
}

impl Moves {
    /// Counts one move started; the guard counts it finished when dropped.
    pub fn begin(&self) -> MoveGuard<'_> {
        self.started.fetch_add(1, Ordering::SeqCst);
        MoveGuard(self)
    }

    /// The counts now: `finished` read before `started`, so equal counts mean no move was
    /// in flight at any moment between the two reads.
    pub fn mark(&self) -> MoveMark {
        let finished = self.finished.load(Ordering::SeqCst);
        MoveMark {
            started: self.started.load(Ordering::SeqCst),
            finished,
        }
    }

    /// Moves in flight now.
    pub fn in_flight(&self) -> u64 {
        let finished = self.finished.load(Ordering::SeqCst);
        self.started.load(Ordering::SeqCst).saturating_sub(finished)
    }

    /// True when no move was in flight at `mark` and none has started since: everything
    /// that looked at the tree in between saw every name at least once.
    pub fn quiet_since(&self, mark: MoveMark) -> bool {
        mark.started == mark.finished && self.started.load(Ordering::SeqCst) == mark.started
    }
}

/// A move in flight ([`Moves::begin`]).
#[must_use = "the move counts as finished when the guard drops"]
pub struct MoveGuard<'a>(&'a Moves);

impl Drop for MoveGuard<'_> {
    fn drop(&mut self) {
        self.0.finished.fetch_add(1, Ordering::SeqCst);
    }
}

/// Two gates every request of a mount passes (`crate::fs` takes them), which the mount's own
/// long operations close: `names` is held shared by every request and exclusively while a
/// re-encryption swaps keys or re-encrypts names (requests wait, none fails); `writes` is
/// held shared by every request that changes something and exclusively while a backup reads
/// a point-in-time view (reads go on). Always `names` before `writes`.
///
/// The long operations themselves (a [`Gates::close`], a [`Gates::freeze_writes`]) take
/// `exclusive` first, which requests never take: a close waiting behind a freeze waits
/// there, holding nothing, so reads go on during the freeze (a close queued on `names`
/// would hold every new request back until the freeze ends).
///
/// With the kernel's writeback cache a backup's freeze comes in two steps
/// ([`Gates::quiesce`], then [`Quiesced::freeze`]): meanwhile `crate::fs` parks every
/// GETATTR of a regular file but the drain's ([`Gates::parks`]; the kernel asks for a
/// regular file's attributes before each cached `write(2)`, outside the inode lock, once
/// they are invalid: so no new `write(2)` starts while the cached ones are written back).
#[derive(Debug, Default)]
pub struct Gates {
    exclusive: Mutex<()>,
    names: RwLock<()>,
    writes: RwLock<()>,
    /// Held shared by every request that changes the backing root's entries or times, and
    /// exclusively (never waited for) while cmkfs writes one of its control files there
    /// ([`Volume::keeping_root_mtime`]).
    root: RwLock<()>,
    /// True from the start of a quiesce until its freeze: attributes are then given to the
    /// kernel with a zero timeout, so that none it holds stays valid.
    quiescing: AtomicBool,
    /// The thread id (as FUSE requests carry it) of the drain, whose GETATTRs pass.
    drainer: AtomicU32,
    /// Bumped by [`Gates::lift_freezes`]: a freeze or quiesce that sees it move ends.
    lifts: AtomicU64,
}

/// A quiesce ([`Gates::quiesce`]): GETATTRs of regular files are parked, except the
/// drain's; every other request runs.
pub struct Quiesced<'a> {
    gates: &'a Gates,
    exclusive: Option<MutexGuard<'a, ()>>,
    /// [`Gates::lifts`] when it began.
    pub lifts: u64,
}

impl<'a> Quiesced<'a> {
    /// Closes the write gate (as [`Gates::freeze_writes`]) and ends the quiesce: the parked
    /// GETATTRs are then answered (`crate::fs`), a `write(2)` that waited in one writes into
    /// the kernel's pages, and their WRITEs wait for the thaw.
    pub fn freeze(mut self) -> Frozen<'a> {
        let writes = self.gates.writes.write().unwrap_or_else(|p| p.into_inner());
        self.end();
        Frozen {
            _writes: writes,
            _exclusive: self.exclusive.take().expect("held until freeze or drop"),
        }
    }

    fn end(&mut self) {
        self.gates.quiescing.store(false, Ordering::SeqCst);
        self.gates.drainer.store(0, Ordering::SeqCst);
    }
}

impl Drop for Quiesced<'_> {
    fn drop(&mut self) {
        self.end();
    }
}

/// A request's pass through the [`Gates`].
pub struct Pass<'a> {
    _names: RwLockReadGuard<'a, ()>,
    _writes: Option<RwLockReadGuard<'a, ()>>,
    _root: Option<RwLockReadGuard<'a, ()>>,
}

/// The [`Gates`] closed: no request runs.
pub struct Closed<'a> {
    _writes: RwLockWriteGuard<'a, ()>,
    _names: RwLockWriteGuard<'a, ()>,
    _exclusive: MutexGuard<'a, ()>,
}

/// Writes frozen ([`Gates::freeze_writes`]): no request that changes anything runs.
pub struct Frozen<'a> {
    _writes: RwLockWriteGuard<'a, ()>,
    _exclusive: MutexGuard<'a, ()>,
}

impl Gates {
    /// For a request that reads (lookups, listings, attributes, reads).
    pub fn read(&self) -> Pass<'_> {
        Pass {
            _names: self.names.read().unwrap_or_else(|p| p.into_inner()),
            _writes: None,
            _root: None,
        }
    }

    /// For a request that changes anything (and for a re-encryption's own batches).
    pub fn write(&self) -> Pass<'_> {
        let names = self.names.read().unwrap_or_else(|p| p.into_inner());
        Pass {
            _names: names,
            _writes: Some(self.writes.read().unwrap_or_else(|p| p.into_inner())),
            _root: None,
        }
    }

    /// [`Gates::write`] without waiting for the write gate: `None` while writes are frozen
    /// (or a freeze or close is being taken). A WRITE then waits off its FUSE thread
    /// (`crate::fs`). The name gate is taken first, waiting, as [`Gates::write`] does: the
    /// same order, so no deadlock with [`Gates::close`].
    pub fn try_write(&self) -> Option<Pass<'_>> {
        let names = self.names.read().unwrap_or_else(|p| p.into_inner());
        let writes = match self.writes.try_read() {
            Ok(w) => w,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        Some(Pass {
            _names: names,
            _writes: Some(writes),
            _root: None,
        })
    }

    /// [`Gates::write`] for a request that may change the backing root (`root`: it creates,
    /// removes or renames a name in the root directory, or sets the root's attributes):
    /// it also holds the root gate, so that cmkfs never sets the root's mtime back over
    /// such a change ([`Volume::keeping_root_mtime`]).
    pub fn write_in(&self, root: bool) -> Pass<'_> {
        let mut pass = self.write();
        if root {
            pass._root = Some(self.root.read().unwrap_or_else(|p| p.into_inner()));
        }
        pass
    }

    /// Waits for every request in flight and holds all new ones back.
    pub fn close(&self) -> Closed<'_> {
        let exclusive = self.exclusive.lock().unwrap_or_else(|p| p.into_inner());
        let names = self.names.write().unwrap_or_else(|p| p.into_inner());
        Closed {
            _writes: self.writes.write().unwrap_or_else(|p| p.into_inner()),
            _names: names,
            _exclusive: exclusive,
        }
    }

    /// Whether a GETATTR of a regular file by thread `tid` (the FUSE request's pid) is
    /// parked: during a quiesce, unless `tid` is the drain's.
    pub fn parks(&self, tid: u32) -> bool {
        self.quiescing() && !(tid != 0 && self.drainer.load(Ordering::SeqCst) == tid)
    }

    /// True during a quiesce: attributes go to the kernel with a zero timeout.
    pub fn quiescing(&self) -> bool {
        self.quiescing.load(Ordering::SeqCst)
    }

    /// Names the thread whose requests pass a quiesce (`0`: none).
    pub fn set_drainer(&self, tid: u32) {
        self.drainer.store(tid, Ordering::SeqCst);
    }

    /// First step of a backup's freeze with the writeback cache (see [`Gates`]): from now
    /// on replies give no attribute timeout and GETATTRs of regular files are parked. The
    /// caller then invalidates the kernel's attributes and drains its cached writes, then
    /// calls [`Quiesced::freeze`]; dropping the guard instead ends the quiesce.
    pub fn quiesce(&self) -> Quiesced<'_> {
        let exclusive = self.exclusive.lock().unwrap_or_else(|p| p.into_inner());
        self.quiescing.store(true, Ordering::SeqCst);
        Quiesced {
            gates: self,
            exclusive: Some(exclusive),
            lifts: self.lifts.load(Ordering::SeqCst),
        }
    }

    /// Ends every quiesce and freeze soon (their owners watch [`Gates::lifted_since`]): a
    /// revocation's cut-off sends the kernel's dirty pages to the daemon, and those WRITEs
    /// must not wait for a backup.
    pub fn lift_freezes(&self) {
        self.lifts.fetch_add(1, Ordering::SeqCst);
    }

    /// True when [`Gates::lift_freezes`] was called since `lifts` was read.
    pub fn lifted_since(&self, lifts: u64) -> bool {
        self.lifts.load(Ordering::SeqCst) != lifts
    }

    /// The current [`Gates::lift_freezes`] count.
    pub fn lifts(&self) -> u64 {
        self.lifts.load(Ordering::SeqCst)
    }

    /// Waits for every change in flight and holds new ones back; reads go on.
    pub fn freeze_writes(&self) -> Frozen<'_> {
        let exclusive = self.exclusive.lock().unwrap_or_else(|p| p.into_inner());
        Frozen {
            _writes: self.writes.write().unwrap_or_else(|p| p.into_inner()),
            _exclusive: exclusive,
        }
    }
}

impl Volume {
    /// Creates a new volume in `dir` (which must be empty or absent): a fresh DEK wrapped by
    /// the vault key, the root directory id, and the header, written last so that a volume
    /// either has a header or is not a volume at all.
    pub fn create(
        dir: &Path,
        vault: &dyn Vault,
        opts: &CreateOptions,
    ) -> Result<VolumeHeader, VolumeError> {
        Volume::create_layers(dir, vault, None, opts)
    }

    /// Creates a double-encrypted volume (`EncryptionAtRestWithPlatformAndCustomerKeys`): two
    /// independent DEKs, the inner one wrapped by the platform key, the outer one by the
    /// customer key in `vault`. Otherwise as [`Volume::create`].
    pub fn create_double(
        dir: &Path,
        vault: &dyn Vault,
        platform: &PlatformLayer<'_>,
        opts: &CreateOptions,
    ) -> Result<VolumeHeader, VolumeError> {
        Volume::create_layers(dir, vault, Some(platform), opts)
    }

    fn create_layers(
        dir: &Path,
        vault: &dyn Vault,
        platform: Option<&PlatformLayer<'_>>,
        opts: &CreateOptions,
    ) -> Result<VolumeHeader, VolumeError> {
        let existed = Volume::check_new_dir(dir)?;
        if !(512..=65536).contains(&opts.sector_size) || !opts.sector_size.is_power_of_two() {
            return Err(VolumeError::Crypto(CryptoError::BadUnitSize {
                got: opts.sector_size as usize,
            }));
        }
        let dek = Dek::generate().map_err(|e| VolumeError::Internal(e.to_string()))?;
        // Wrap before touching the disk: a vault refusal leaves nothing behind.
        let wrapped = vault.wrap_key(
            &opts.key_name,
            opts.key_version.as_deref(),
            opts.wrap_alg,
            dek.as_bytes(),
        )?;
        let mut id = [0u8; 16];
        getrandom::getrandom(&mut id).map_err(|e| VolumeError::Internal(e.to_string()))?;
        let mut header = match platform {
            None => VolumeHeader::new(
                &dek,
                hex::encode(id),
                opts.sector_size,
                &wrapped,
                unix_now(),
                opts.layout,
            ),
            Some(p) => {
                let inner = Dek::generate().map_err(|e| VolumeError::Internal(e.to_string()))?;
                let pw = p
                    .vault
                    .wrap_key(p.key_name, None, p.wrap_alg, inner.as_bytes())?;
                let env = header::PlatformEnvelope::new(&inner, &pw);
                VolumeHeader::new_double(
                    &dek,
                    hex::encode(id),
                    opts.sector_size,
                    &wrapped,
                    unix_now(),
                    env,
                    opts.layout,
                )
            }
        };
        // The MAC covers `des` too: bind it with the DEK.
        header = header.with_des(opts.des.clone(), &dek);
        let result = (|| {
            if !existed {
                fs::create_dir_all(dir).map_err(|e| VolumeError::io(dir, e))?;
            }
            write_dir_id(dir)?;
            header.write(dir)
        })();
        if result.is_err() {
            let _ = fs::remove_file(dir.join(DIRID_FILE));
            if !existed {
                let _ = fs::remove_dir(dir);
            }
        }
        result.map(|_| header)
    }

    /// Checks that `dir` can hold a new volume (empty or absent) without touching anything;
    /// returns whether it exists. Callers run it before any vault work, so a refused `init`
    /// changes nothing anywhere.
    pub fn check_new_dir(dir: &Path) -> Result<bool, VolumeError> {
        match fs::read_dir(dir) {
            Ok(mut it) => {
                if it.next().is_some() {
                    return Err(VolumeError::NotEmpty(dir.to_path_buf()));
                }
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
                Err(VolumeError::io(dir, io::Error::other("not a directory")))
            }
            Err(e) => Err(VolumeError::io(dir, e)),
        }
    }

    /// Opens a volume whose keyring is already unlocked. `threads` = 0: all cores.
    pub fn open(
        dir: &Path,
        header: VolumeHeader,
        keyring: Arc<Keyring>,
        threads: usize,
    ) -> Result<Volume, VolumeError> {
        let root = fs::canonicalize(dir).map_err(|e| VolumeError::io(dir, e))?;
        // The data path knows the v2 unit rule only (v2 and v3 differ in the data offset):
        // an older volume's short tails would be misread (docs/FORMAT.md, "Upgrade from
        // format v1").
        let Some(layout) = header.layout() else {
            return Err(VolumeError::NeedsUpgrade {
                path: root,
                version: header.format_version,
            });
        };
        let root_dir = Arc::new(Dir::open_root(&root)?);
        #[allow(clippy::unnecessary_cast)] // dev_t is not u64 everywhere
        let root_dev = sys::fstat(root_dir.fd()).map_err(VolumeError::Os)?.st_dev as u64;
        let engine = SectorEngine::new(threads).map_err(VolumeError::Os)?;
        Ok(Volume {
            root,
            root_dir,
            root_dev,
            sector: header.sector_size as u64,
            layout,
            header,
            keyring,
            engine,
            // SAFETY: geteuid has no preconditions.
            as_root: unsafe { libc::geteuid() } == 0,
            files: Mutex::new(HashMap::new()),
            gates: Gates::default(),
            moves: Moves::default(),
            ids: idsync::PendingIds::default(),
        })
    }

    /// Makes every new directory's id that is still pending durable (`idsync`): before a
    /// rename or link (an existing name could move under it), an fsync, and the unmount.
    pub fn flush_ids(&self) -> Result<(), VolumeError> {
        self.ids.flush().map_err(VolumeError::Os)
    }

    /// New directories' ids whose fsync failed and that are not durable yet, as the last
    /// flush left them (`idsync`; the mount's status publishes it).
    pub fn id_health(&self) -> idsync::IdHealth {
        self.ids.health()
    }

    /// The gates requests pass (see [`Gates`]).
    pub fn gates(&self) -> &Gates {
        &self.gates
    }

    /// The renames and links of this volume: a walk of the tree that began at
    /// [`Moves::mark`] saw every name at least once if [`Moves::quiet_since`] that mark
    /// holds at its end.
    pub fn moves(&self) -> &Moves {
        &self.moves
    }

    /// Counts a rename or link in flight until the guard drops (hold it across the backing
    /// call).
    fn note_move(&self) -> MoveGuard<'_> {
        self.moves.begin()
    }

    /// The backing (cipher) directory, for messages and the mount table (never used to
    /// reach a file: see [`Volume::root_dir`]).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The backing root directory, held open.
    pub fn root_dir(&self) -> &Arc<Dir> {
        &self.root_dir
    }

    /// The volume header as opened.
    pub fn header(&self) -> &VolumeHeader {
        &self.header
    }

    /// The keyring.
    pub fn keyring(&self) -> &Arc<Keyring> {
        &self.keyring
    }

    fn keys(&self) -> Result<Arc<VolumeKeys>, VolumeError> {
        self.keyring.keys()
    }

    /// The live keys (an error when revoked or locked).
    pub fn current_keys(&self) -> Result<Arc<VolumeKeys>, VolumeError> {
        self.keyring.keys()
    }

    /// The data unit size in bytes.
    pub fn unit_size(&self) -> u64 {
        self.sector
    }

    pub(crate) fn ctx<'a>(&'a self, keys: &'a VolumeKeys) -> Ctx<'a> {
        Ctx {
            keys,
            engine: &self.engine,
            sector: self.sector,
            layout: self.layout,
        }
    }

    /// The on-disk layout of this volume's backing files.
    pub fn layout(&self) -> layout::Layout {
        self.layout
    }

    /// Space figures of the backing filesystem.
    pub fn statfs(&self) -> Result<rustix::fs::StatVfs, VolumeError> {
        sys::statvfs(self.root_dir.fd()).map_err(VolumeError::Os)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The errno of the last failed libc call, as a [`VolumeError`].
fn os(e: io::Error) -> VolumeError {
    VolumeError::Os(e)
}

fn write_dir_id(dir: &Path) -> Result<(), VolumeError> {
    let mut id = [0u8; 16];
    getrandom::getrandom(&mut id).map_err(|e| VolumeError::Internal(e.to_string()))?;
    let p = dir.join(DIRID_FILE);
    crate::fsutil::write_new(&p, &id, 0o444).map_err(|e| VolumeError::io(&p, e))
}

/// Seconds and nanoseconds since the Unix epoch (negative before it).
pub fn to_timespec(t: SystemTime) -> (i64, u32) {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, d.subsec_nanos()),
        Err(e) => {
            let d = e.duration();
            let (mut s, mut ns) = (-(d.as_secs() as i64), -(d.subsec_nanos() as i64));
            if ns < 0 {
                s -= 1;
                ns += 1_000_000_000;
            }
            (s, ns as u32)
        }
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod move_tests {
    use super::Moves;

    /// Issue 13's lost file: a rename counted before a walk began but done after the walk
    /// listed its directory must not let that walk pass for complete.
    #[test]
    fn a_move_in_flight_when_a_walk_begins_makes_the_walk_incomplete() {
        let m = Moves::default();
        let g = m.begin();
        let mark = m.mark();
        // The walk lists the directory here; then the backing rename happens.
        drop(g);
        assert!(!m.quiet_since(mark), "a move in flight at the mark");
        // A walk begun after it ended is complete if nothing else moves.
        let mark = m.mark();
        assert!(m.quiet_since(mark));
        let g = m.begin();
        assert!(!m.quiet_since(mark), "a move started after the mark");
        drop(g);
        assert!(!m.quiet_since(mark), "and finished before the end");
    }

    #[test]
    fn overlapping_moves_are_quiet_only_once_all_have_ended() {
        let m = Moves::default();
        let a = m.begin();
        let b = m.begin();
        drop(a);
        assert!(!m.quiet_since(m.mark()));
        drop(b);
        assert!(m.quiet_since(m.mark()));
    }
}
