//! The on-disk format and every operation on it, independent of FUSE: the volume header,
//! the name transform, per-file headers and sector I/O. The FUSE adapter (`crate::fs`) maps
//! requests onto these calls; tests drive them directly too.
//!
//! Paths handed in and out are absolute backing paths (inside the cipher directory).

pub mod content;
pub mod header;
pub mod layout;
pub mod lock;
pub mod names;
pub mod upgrade;
pub mod v1;
mod xattr;

use std::collections::HashMap;
use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File, Metadata, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::SystemTime;

pub use content::FILE_HEADER_LEN;
use content::{Ctx, FileState};
use header::{VolumeHeader, HEADER_FILE};
use names::{BackingName, DirId, EntryKind, NameError, DIRID_FILE};

use crate::crypto::{CryptoError, Dek, VolumeKeys};
use crate::engine::SectorEngine;
use crate::fsutil;
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

/// Attributes of an entry as the plaintext view shows them: the backing metadata with the
/// logical size (files: without the header; symlinks: the plaintext target length).
#[derive(Debug, Clone)]
pub struct Attr {
    /// Backing metadata (inode, mode, owner, times, nlink).
    pub meta: Metadata,
    /// Logical size.
    pub size: u64,
}

/// Who a new entry belongs to (the requesting process's ids).
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

/// A backing file opened for content operations.
pub struct OpenFile {
    file: File,
    state: Arc<FileState>,
}

impl OpenFile {
    /// The backing file (for fsync, fstat).
    pub fn file(&self) -> &File {
        &self.file
    }
}

/// Attribute changes for [`Volume::set_attr`].
#[derive(Clone, Debug, Default)]
pub struct SetAttr {
    /// New permission bits.
    pub mode: Option<u32>,
    /// New owner.
    pub uid: Option<u32>,
    /// New group.
    pub gid: Option<u32>,
    /// New logical size.
    pub size: Option<u64>,
    /// New access time (`None` inside = now).
    pub atime: Option<Option<SystemTime>>,
    /// New modification time (`None` inside = now).
    pub mtime: Option<Option<SystemTime>>,
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
    header: VolumeHeader,
    keyring: Arc<Keyring>,
    engine: SectorEngine,
    sector: u64,
    as_root: bool,
    dir_ids: Mutex<HashMap<u64, DirId>>,
    files: Mutex<HashMap<u64, Weak<FileState>>>,
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
        // The data path knows the current unit rule only: an older volume's short tails
        // would be misread (docs/FORMAT.md, "Upgrade from format v1").
        if header.format_version != header::FORMAT_VERSION {
            return Err(VolumeError::NeedsUpgrade {
                path: root,
                version: header.format_version,
            });
        }
        let engine = SectorEngine::new(threads).map_err(VolumeError::Os)?;
        Ok(Volume {
            root,
            sector: header.sector_size as u64,
            header,
            keyring,
            engine,
            // SAFETY: geteuid has no preconditions.
            as_root: unsafe { libc::geteuid() } == 0,
            dir_ids: Mutex::new(HashMap::new()),
            files: Mutex::new(HashMap::new()),
        })
    }

    /// The backing (cipher) directory.
    pub fn root(&self) -> &Path {
        &self.root
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

    /// The id of backing directory `dir` (cached by inode; ids never change).
    pub fn dir_id(&self, dir: &Path) -> Result<DirId, VolumeError> {
        let ino = fs::metadata(dir).map_err(VolumeError::Os)?.ino();
        if let Some(id) = lock(&self.dir_ids).get(&ino) {
            return Ok(*id);
        }
        let p = dir.join(DIRID_FILE);
        let bytes = fs::read(&p).map_err(|e| VolumeError::CorruptFile {
            path: Some(p.clone()),
            why: format!("directory id unreadable: {e}"),
        })?;
        let id: DirId = bytes
            .as_slice()
            .try_into()
            .map_err(|_| VolumeError::CorruptFile {
                path: Some(p.clone()),
                why: format!("directory id has {} bytes, expected 16", bytes.len()),
            })?;
        lock(&self.dir_ids).insert(ino, id);
        Ok(id)
    }

    /// Where plaintext `name` lives in backing directory `dir`.
    pub fn backing_name(&self, dir: &Path, name: &OsStr) -> Result<BackingName, VolumeError> {
        let keys = self.keys()?;
        let id = self.dir_id(dir)?;
        Ok(names::encrypt(&keys.names, &id, name)?)
    }

    /// Looks up `name` in `dir`: its backing path and attributes.
    pub fn lookup(&self, dir: &Path, name: &OsStr) -> Result<(PathBuf, Attr), VolumeError> {
        let b = self.backing_name(dir, name)?;
        let path = dir.join(b.entry());
        let attr = self.attr(&path)?;
        Ok((path, attr))
    }

    /// Attributes of the entry at backing `path`.
    pub fn attr(&self, path: &Path) -> Result<Attr, VolumeError> {
        let meta = fs::symlink_metadata(path).map_err(VolumeError::Os)?;
        self.attr_from(path, meta)
    }

    /// Attributes from metadata already at hand (an open file's fstat).
    pub fn attr_from(&self, path: &Path, meta: Metadata) -> Result<Attr, VolumeError> {
        let size = if meta.is_file() {
            content::logical_size(meta.len()).map_err(|why| VolumeError::CorruptFile {
                path: Some(path.into()),
                why,
            })?
        } else if meta.file_type().is_symlink() {
            self.readlink(path).map(|t| t.len() as u64).unwrap_or(0)
        } else {
            meta.len()
        };
        Ok(Attr { meta, size })
    }

    /// Lists the plaintext entries of backing directory `dir` (without `.` and `..`).
    /// Entries whose names do not decrypt (e.g. copied from another volume) are skipped and
    /// logged: they have no plaintext name.
    pub fn list(&self, dir: &Path) -> Result<Vec<(OsString, PathBuf, Metadata)>, VolumeError> {
        let keys = self.keys()?;
        let id = self.dir_id(dir)?;
        let mut out = Vec::new();
        for ent in fs::read_dir(dir).map_err(VolumeError::Os)? {
            let ent = ent.map_err(VolumeError::Os)?;
            let bname = ent.file_name();
            let encoded: Vec<u8> = match names::classify(&bname) {
                EntryKind::Hidden => continue,
                EntryKind::Encrypted => bname.as_bytes().to_vec(),
                EntryKind::Long => match fs::read(dir.join(names::side_file_of(&bname))) {
                    Ok(full) if names::long_name_matches(&bname, &full) => full,
                    _ => {
                        tracing::warn!(path = %ent.path().display(), "long-name side file missing or wrong; entry hidden");
                        continue;
                    }
                },
            };
            match names::decrypt(&keys.names, &id, &encoded) {
                Ok(plain) => {
                    let path = ent.path();
                    match fs::symlink_metadata(&path) {
                        Ok(m) => out.push((plain, path, m)),
                        Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                        Err(e) => return Err(VolumeError::Os(e)),
                    }
                }
                Err(_) => {
                    tracing::warn!(path = %ent.path().display(), "name does not decrypt in this directory; entry hidden")
                }
            }
        }
        Ok(out)
    }

    /// Creates the directory entry for `name` in `dir`: writes a long name's side file first,
    /// then calls `make` with the entry path. Undoes the side file if `make` fails.
    fn make_entry<T>(
        &self,
        dir: &Path,
        name: &OsStr,
        make: impl FnOnce(&Path) -> Result<T, VolumeError>,
    ) -> Result<(PathBuf, T), VolumeError> {
        let b = self.backing_name(dir, name)?;
        let path = dir.join(b.entry());
        let side = self.write_side_file(dir, &b)?;
        match make(&path) {
            Ok(t) => Ok((path, t)),
            Err(e) => {
                if let Some(s) = side {
                    // Only remove it if no entry of that name exists (e.g. EEXIST keeps it).
                    if fs::symlink_metadata(&path).is_err() {
                        let _ = fs::remove_file(s);
                    }
                }
                Err(e)
            }
        }
    }

    fn write_side_file(&self, dir: &Path, b: &BackingName) -> Result<Option<PathBuf>, VolumeError> {
        if let BackingName::Long { full, .. } = b {
            let side = dir.join(b.side_file().unwrap_or_default());
            fsutil::write_atomic(&side, full.as_bytes(), 0o644).map_err(VolumeError::Os)?;
            return Ok(Some(side));
        }
        Ok(None)
    }

    fn remove_side_file(&self, dir: &Path, entry: &OsStr) {
        if names::classify(entry) == EntryKind::Long {
            let _ = fs::remove_file(dir.join(names::side_file_of(entry)));
        }
    }

    /// Sets ownership of a new entry to the caller when running as root (as a local
    /// filesystem would), honouring a setgid parent directory.
    fn own(&self, dir: &Path, path: &Path, caller: Caller) -> Result<(), VolumeError> {
        if !self.as_root {
            return Ok(());
        }
        let parent = fs::metadata(dir).map_err(VolumeError::Os)?;
        let gid = if parent.mode() & libc::S_ISGID != 0 {
            parent.gid()
        } else {
            caller.gid
        };
        std::os::unix::fs::lchown(path, Some(caller.uid), Some(gid)).map_err(VolumeError::Os)
    }

    /// Creates and opens a regular file.
    pub fn create_file(
        &self,
        dir: &Path,
        name: &OsStr,
        mode: u32,
        exclusive: bool,
        caller: Caller,
    ) -> Result<(PathBuf, Attr, OpenFile), VolumeError> {
        let (path, file) = self.make_entry(dir, name, |p| {
            let mut o = OpenOptions::new();
            o.read(true).write(true).mode(mode & 0o7777);
            if exclusive {
                o.create_new(true);
            } else {
                o.create(true);
            }
            o.open(p).map_err(VolumeError::Os)
        })?;
        self.own(dir, &path, caller)?;
        let of = self.wrap_open(file)?;
        let attr = self.attr_from(&path, of.file.metadata().map_err(VolumeError::Os)?)?;
        Ok((path, attr, of))
    }

    /// Creates a directory with its own directory id. Built under a temporary name and
    /// renamed into place, so a crash never leaves a directory without an id.
    pub fn mkdir(
        &self,
        dir: &Path,
        name: &OsStr,
        mode: u32,
        caller: Caller,
    ) -> Result<(PathBuf, Attr), VolumeError> {
        let (path, ()) = self.make_entry(dir, name, |p| {
            let mut rnd = [0u8; 8];
            getrandom::getrandom(&mut rnd).map_err(|e| VolumeError::Internal(e.to_string()))?;
            let tmp = dir.join(format!("{}mkdir.{}", fsutil::TEMP_PREFIX, hex::encode(rnd)));
            fs::create_dir(&tmp).map_err(VolumeError::Os)?;
            let built = (|| {
                write_dir_id(&tmp)?;
                // A directory made inside a setgid directory is setgid too (as on ext4).
                let inherit = fs::metadata(dir)
                    .map(|m| m.mode() & libc::S_ISGID)
                    .unwrap_or(0);
                fs::set_permissions(&tmp, fs::Permissions::from_mode((mode & 0o7777) | inherit))
                    .map_err(VolumeError::Os)?;
                self.own(dir, &tmp, caller)?;
                rename_noreplace(&tmp, p)
            })();
            if built.is_err() {
                let _ = fs::remove_file(tmp.join(DIRID_FILE));
                let _ = fs::remove_dir(&tmp);
            }
            built
        })?;
        let attr = self.attr(&path)?;
        Ok((path, attr))
    }

    /// Creates a special file (FIFO, socket) or an empty regular file.
    pub fn mknod(
        &self,
        dir: &Path,
        name: &OsStr,
        mode: u32,
        rdev: u32,
        caller: Caller,
    ) -> Result<(PathBuf, Attr), VolumeError> {
        let fmt = mode & libc::S_IFMT;
        if fmt != libc::S_IFIFO && fmt != libc::S_IFSOCK && fmt != libc::S_IFREG && fmt != 0 {
            // Device nodes would let an unprivileged user of the backing store reach devices.
            return Err(VolumeError::errno_of(libc::EPERM));
        }
        let (path, ()) = self.make_entry(dir, name, |p| {
            let c = cstring(p)?;
            // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
            if unsafe { libc::mknod(c.as_ptr(), mode, rdev as libc::dev_t) } != 0 {
                return Err(VolumeError::Os(io::Error::last_os_error()));
            }
            Ok(())
        })?;
        self.own(dir, &path, caller)?;
        let attr = self.attr(&path)?;
        Ok((path, attr))
    }

    /// Creates a symlink whose target is stored encrypted.
    pub fn symlink(
        &self,
        dir: &Path,
        name: &OsStr,
        target: &OsStr,
        caller: Caller,
    ) -> Result<(PathBuf, Attr), VolumeError> {
        let keys = self.keys()?;
        let stored = names::encrypt_target(&keys.names, target)
            .map_err(|e| VolumeError::Internal(e.to_string()))?;
        let (path, ()) = self.make_entry(dir, name, |p| {
            std::os::unix::fs::symlink(&stored, p).map_err(VolumeError::Os)
        })?;
        self.own(dir, &path, caller)?;
        let attr = self.attr(&path)?;
        Ok((path, attr))
    }

    /// Reads and decrypts a symlink target.
    pub fn readlink(&self, path: &Path) -> Result<OsString, VolumeError> {
        let keys = self.keys()?;
        let stored = fs::read_link(path).map_err(VolumeError::Os)?;
        names::decrypt_target(&keys.names, stored.as_os_str()).map_err(|_| {
            VolumeError::CorruptFile {
                path: Some(path.to_path_buf()),
                why: "symlink target does not decrypt".into(),
            }
        })
    }

    /// Removes a non-directory entry.
    pub fn unlink(&self, dir: &Path, name: &OsStr) -> Result<PathBuf, VolumeError> {
        let b = self.backing_name(dir, name)?;
        let path = dir.join(b.entry());
        fs::remove_file(&path).map_err(VolumeError::Os)?;
        self.remove_side_file(dir, b.entry());
        Ok(path)
    }

    /// Removes an empty directory (its id file and stray metadata go with it).
    pub fn rmdir(&self, dir: &Path, name: &OsStr) -> Result<PathBuf, VolumeError> {
        let b = self.backing_name(dir, name)?;
        let path = dir.join(b.entry());
        let meta = fs::symlink_metadata(&path).map_err(VolumeError::Os)?;
        if !meta.is_dir() {
            return Err(VolumeError::errno_of(libc::ENOTDIR));
        }
        // Decide before touching anything: only hidden metadata may be left inside (the id,
        // stray side and temp files), and leftover temp directories of an interrupted mkdir
        // or rmdir that hold nothing but hidden files.
        for ent in fs::read_dir(&path).map_err(VolumeError::Os)? {
            let ent = ent.map_err(VolumeError::Os)?;
            let n = ent.file_name();
            if names::classify(&n) != EntryKind::Hidden {
                return Err(VolumeError::NotEmpty(path));
            }
            if ent.file_type().map_err(VolumeError::Os)?.is_dir()
                && !is_dead_temp_dir(&ent.path(), &n)
            {
                return Err(VolumeError::NotEmpty(path));
            }
        }
        // The name vanishes in one step: renamed to a hidden temp name, then taken apart. A
        // crash in between leaves hidden garbage (removed by the parent's rmdir or by fsck),
        // never a visible directory without its id.
        let mut rnd = [0u8; 8];
        getrandom::getrandom(&mut rnd).map_err(|e| VolumeError::Internal(e.to_string()))?;
        let trash = dir.join(format!("{}rmdir.{}", fsutil::TEMP_PREFIX, hex::encode(rnd)));
        fs::rename(&path, &trash).map_err(VolumeError::Os)?;
        if let Err(e) = remove_dead_dir(&trash) {
            tracing::warn!(path = %trash.display(), error = %e, "leftover of rmdir; `cmkfs fsck --repair` removes it");
        }
        lock(&self.dir_ids).remove(&meta.ino());
        self.remove_side_file(dir, b.entry());
        Ok(path)
    }

    /// Renames `dir/name` to `newdir/newname`. `flags` are renameat2 flags
    /// (`RENAME_NOREPLACE`, `RENAME_EXCHANGE`). Returns the old and new backing paths.
    pub fn rename(
        &self,
        dir: &Path,
        name: &OsStr,
        newdir: &Path,
        newname: &OsStr,
        flags: u32,
    ) -> Result<(PathBuf, PathBuf), VolumeError> {
        let from = self.backing_name(dir, name)?;
        let to = self.backing_name(newdir, newname)?;
        let (src, dst) = (dir.join(from.entry()), newdir.join(to.entry()));
        // RENAME_EXCHANGE swaps the objects behind two existing names: the names, and so
        // their side files, stay where they are. A plain rename moves the name.
        self.write_side_file(newdir, &to)?;
        renameat2(&src, &dst, flags)?;
        if flags & libc::RENAME_EXCHANGE == 0 && src != dst {
            self.remove_side_file(dir, from.entry());
        }
        Ok((src, dst))
    }

    /// Makes a hard link to `path` as `newdir/newname`.
    pub fn link(
        &self,
        path: &Path,
        newdir: &Path,
        newname: &OsStr,
    ) -> Result<(PathBuf, Attr), VolumeError> {
        let (new, ()) = self.make_entry(newdir, newname, |p| {
            fs::hard_link(path, p).map_err(VolumeError::Os)
        })?;
        let attr = self.attr(&new)?;
        Ok((new, attr))
    }

    /// Opens the backing file at `path` for content operations.
    pub fn open_file(&self, path: &Path, write: bool) -> Result<OpenFile, VolumeError> {
        let _ = self.keys()?;
        // Always read-write when allowed: partial-sector writes read the sector back.
        let file = match OpenOptions::new().read(true).write(true).open(path) {
            Ok(f) => f,
            Err(e) if !write && e.raw_os_error() == Some(libc::EACCES) => {
                File::open(path).map_err(VolumeError::Os)?
            }
            Err(e) => return Err(VolumeError::Os(e)),
        };
        self.wrap_open(file)
    }

    fn wrap_open(&self, file: File) -> Result<OpenFile, VolumeError> {
        let ino = file.metadata().map_err(VolumeError::Os)?.ino();
        let mut files = lock(&self.files);
        let state = match files.get(&ino).and_then(Weak::upgrade) {
            Some(s) => s,
            None => {
                files.retain(|_, w| w.strong_count() > 0);
                let s = Arc::new(FileState::default());
                files.insert(ino, Arc::downgrade(&s));
                s
            }
        };
        Ok(OpenFile { file, state })
    }

    fn ctx<'a>(&'a self, keys: &'a VolumeKeys) -> Ctx<'a> {
        Ctx {
            keys,
            engine: &self.engine,
            sector: self.sector,
        }
    }

    /// Reads up to `len` plaintext bytes at `off`.
    pub fn read(&self, of: &OpenFile, off: u64, len: usize) -> Result<Vec<u8>, VolumeError> {
        let keys = self.keys()?;
        content::read(&of.file, &of.state, &self.ctx(&keys), off, len)
    }

    /// Writes plaintext at `off`.
    pub fn write(&self, of: &OpenFile, off: u64, data: &[u8]) -> Result<usize, VolumeError> {
        let keys = self.keys()?;
        content::write(&of.file, &of.state, &self.ctx(&keys), off, data)
    }

    /// Clears setuid (and setgid when group-executable) before an unprivileged write, as a
    /// local filesystem does; the kernel delegates this to us (FUSE_HANDLE_KILLPRIV_V2).
    pub fn kill_suidgid(&self, of: &OpenFile) -> Result<(), VolumeError> {
        let mode = of.file.metadata().map_err(VolumeError::Os)?.mode();
        let mut kill = libc::S_ISUID;
        if mode & libc::S_IXGRP != 0 {
            kill |= libc::S_ISGID;
        }
        if mode & kill != 0 {
            of.file
                .set_permissions(fs::Permissions::from_mode(mode & 0o7777 & !kill))
                .map_err(VolumeError::Os)?;
        }
        Ok(())
    }

    /// Sets the logical size of an open file.
    pub fn truncate(&self, of: &OpenFile, size: u64) -> Result<(), VolumeError> {
        let keys = self.keys()?;
        content::truncate(&of.file, &of.state, &self.ctx(&keys), size)
    }

    /// `fallocate(2)` on an open file (see [`content::fallocate`]).
    pub fn fallocate(
        &self,
        of: &OpenFile,
        mode: i32,
        off: u64,
        len: u64,
    ) -> Result<(), VolumeError> {
        let keys = self.keys()?;
        content::fallocate(&of.file, &of.state, &self.ctx(&keys), mode, off, len)
    }

    /// Copies up to `len` plaintext bytes between open files (`copy_file_range`), in 1 MiB
    /// steps; returns the bytes copied (fewer at end of input).
    pub fn copy_range(
        &self,
        from: &OpenFile,
        off_in: u64,
        to: &OpenFile,
        off_out: u64,
        len: u64,
    ) -> Result<u64, VolumeError> {
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(1 << 20) as usize;
            let buf = self.read(from, off_in + done, n)?;
            if buf.is_empty() {
                break;
            }
            self.write(to, off_out + done, &buf)?;
            done += buf.len() as u64;
        }
        Ok(done)
    }

    /// Reads extended attribute `name` of `path`. Only `user.*` exists (stored encrypted);
    /// other namespaces have no attributes.
    pub fn get_xattr(&self, path: &Path, name: &OsStr) -> Result<Vec<u8>, VolumeError> {
        let keys = self.keys()?;
        let backing = xattr_name(&keys, name)?;
        let stored = xattr::get(path, &backing)?;
        xattr::open_value(&keys, &backing, &stored).ok_or_else(|| VolumeError::CorruptFile {
            path: Some(path.to_path_buf()),
            why: "extended attribute value does not decrypt".into(),
        })
    }

    /// Sets extended attribute `name` (`flags`: XATTR_CREATE / XATTR_REPLACE).
    pub fn set_xattr(
        &self,
        path: &Path,
        name: &OsStr,
        value: &[u8],
        flags: i32,
    ) -> Result<(), VolumeError> {
        let keys = self.keys()?;
        let backing = xattr_name(&keys, name).map_err(|e| match e.errno() {
            libc::ENODATA => VolumeError::errno_of(libc::EOPNOTSUPP),
            _ => e,
        })?;
        let sealed = xattr::seal_value(&keys, &backing, value)
            .map_err(|e| VolumeError::Internal(e.to_string()))?;
        xattr::set(path, &backing, &sealed, flags)
    }

    /// Lists the plaintext names of `path`'s extended attributes.
    pub fn list_xattr(&self, path: &Path) -> Result<Vec<OsString>, VolumeError> {
        let keys = self.keys()?;
        Ok(xattr::list(path)?
            .into_iter()
            .filter_map(|b| xattr::open_name(&keys, &b))
            .collect())
    }

    /// Removes extended attribute `name`.
    pub fn remove_xattr(&self, path: &Path, name: &OsStr) -> Result<(), VolumeError> {
        let keys = self.keys()?;
        // Outside `user.*` nothing can be stored, so nothing can be removed either (the kernel
        // also turns setting an empty POSIX ACL into a remove).
        let backing = xattr_name(&keys, name).map_err(|e| match e.errno() {
            libc::ENODATA => VolumeError::errno_of(libc::EOPNOTSUPP),
            _ => e,
        })?;
        xattr::remove(path, &backing)
    }

    /// Applies attribute changes to `path` (through `of` for the size when given).
    pub fn set_attr(
        &self,
        path: &Path,
        of: Option<&OpenFile>,
        set: &SetAttr,
    ) -> Result<Attr, VolumeError> {
        if let Some(size) = set.size {
            match of {
                Some(of) => self.truncate(of, size)?,
                None => self.truncate(&self.open_file(path, true)?, size)?,
            }
        }
        // With an open file, work on it (fchmod, fchown, futimens, fstat): it may have no
        // name left (unlinked while open) and still be a perfectly good file.
        let fd = of.map(|o| std::os::fd::AsRawFd::as_raw_fd(&o.file));
        let check = |r: libc::c_int| {
            if r != 0 {
                Err(VolumeError::Os(io::Error::last_os_error()))
            } else {
                Ok(())
            }
        };
        if let Some(mode) = set.mode {
            let mode = (mode & 0o7777) as libc::mode_t;
            match fd {
                // SAFETY: a valid open descriptor.
                Some(fd) => check(unsafe { libc::fchmod(fd, mode) })?,
                None => {
                    let c = cstring(path)?;
                    // SAFETY: valid C path (symlink modes are moot, so following is fine).
                    check(unsafe { libc::chmod(c.as_ptr(), mode) })?
                }
            }
        }
        if set.uid.is_some() || set.gid.is_some() {
            match of {
                Some(o) => std::os::unix::fs::fchown(&o.file, set.uid, set.gid),
                None => std::os::unix::fs::lchown(path, set.uid, set.gid),
            }
            .map_err(VolumeError::Os)?;
        }
        if set.atime.is_some() || set.mtime.is_some() {
            let ts = |t: &Option<Option<SystemTime>>| match t {
                None => libc::timespec {
                    tv_sec: 0,
                    tv_nsec: libc::UTIME_OMIT,
                },
                Some(None) => libc::timespec {
                    tv_sec: 0,
                    tv_nsec: libc::UTIME_NOW,
                },
                Some(Some(t)) => to_timespec(*t),
            };
            let times = [ts(&set.atime), ts(&set.mtime)];
            match fd {
                // SAFETY: a valid descriptor and a two-element timespec array.
                Some(fd) => check(unsafe { libc::futimens(fd, times.as_ptr()) })?,
                None => {
                    let c = cstring(path)?;
                    // SAFETY: valid C path and a two-element timespec array.
                    check(unsafe {
                        libc::utimensat(
                            libc::AT_FDCWD,
                            c.as_ptr(),
                            times.as_ptr(),
                            libc::AT_SYMLINK_NOFOLLOW,
                        )
                    })?
                }
            }
        }
        match of {
            Some(o) => self.attr_from(path, o.file.metadata().map_err(VolumeError::Os)?),
            None => self.attr(path),
        }
    }

    /// Flushes a file's data (and metadata unless `datasync`) to the backing store.
    pub fn fsync(&self, of: &OpenFile, datasync: bool) -> Result<(), VolumeError> {
        if datasync {
            of.file.sync_data()
        } else {
            of.file.sync_all()
        }
        .map_err(VolumeError::Os)
    }

    /// Space figures of the backing filesystem.
    pub fn statfs(&self) -> Result<libc::statvfs, VolumeError> {
        let c = cstring(&self.root)?;
        // SAFETY: zeroed statvfs is a valid out-parameter; c is a valid path.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
            return Err(VolumeError::Os(io::Error::last_os_error()));
        }
        Ok(st)
    }
}

/// The backing name of plaintext xattr `name`: `user.*` only; other namespaces have none.
fn xattr_name(keys: &VolumeKeys, name: &OsStr) -> Result<OsString, VolumeError> {
    if !name.as_bytes().starts_with(b"user.") {
        return Err(VolumeError::errno_of(libc::ENODATA));
    }
    xattr::seal_name(keys, name).ok_or_else(|| VolumeError::errno_of(libc::ERANGE))
}

/// A temp directory left by an interrupted mkdir or rmdir: a `.cmkfs-tmp.*` name holding only
/// hidden files (its id, side files, temp files) — nothing of the user's.
pub(crate) fn is_dead_temp_dir(path: &Path, name: &OsStr) -> bool {
    if !name.as_bytes().starts_with(fsutil::TEMP_PREFIX.as_bytes()) {
        return false;
    }
    match fs::read_dir(path) {
        Ok(rd) => rd.into_iter().all(|e| {
            e.map(|e| {
                names::classify(&e.file_name()) == EntryKind::Hidden
                    && e.file_type().map(|t| !t.is_dir()).unwrap_or(false)
            })
            .unwrap_or(false)
        }),
        Err(_) => false,
    }
}

/// Removes a directory that holds only hidden files, and any dead temp dirs in it.
fn remove_dead_dir(path: &Path) -> io::Result<()> {
    for ent in fs::read_dir(path)? {
        let ent = ent?;
        if ent.file_type()?.is_dir() {
            remove_dead_dir(&ent.path())?;
        } else {
            fs::remove_file(ent.path())?;
        }
    }
    fs::remove_dir(path)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn write_dir_id(dir: &Path) -> Result<(), VolumeError> {
    let mut id = [0u8; 16];
    getrandom::getrandom(&mut id).map_err(|e| VolumeError::Internal(e.to_string()))?;
    let p = dir.join(DIRID_FILE);
    fsutil::write_new(&p, &id, 0o444).map_err(|e| VolumeError::io(&p, e))
}

fn cstring(p: &Path) -> Result<CString, VolumeError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| VolumeError::errno_of(libc::EINVAL))
}

fn renameat2(src: &Path, dst: &Path, flags: u32) -> Result<(), VolumeError> {
    let (a, b) = (cstring(src)?, cstring(dst)?);
    // SAFETY: valid C paths; renameat2 is a plain syscall wrapper.
    if unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            flags,
        )
    } != 0
    {
        return Err(VolumeError::Os(io::Error::last_os_error()));
    }
    Ok(())
}

fn rename_noreplace(src: &Path, dst: &Path) -> Result<(), VolumeError> {
    renameat2(src, dst, libc::RENAME_NOREPLACE)
}

fn to_timespec(t: SystemTime) -> libc::timespec {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => libc::timespec {
            tv_sec: d.as_secs() as libc::time_t,
            tv_nsec: d.subsec_nanos() as _,
        },
        Err(e) => {
            let d = e.duration();
            let (mut s, mut ns) = (-(d.as_secs() as i64), -(d.subsec_nanos() as i64));
            if ns < 0 {
                s -= 1;
                ns += 1_000_000_000;
            }
            libc::timespec {
                tv_sec: s as libc::time_t,
                tv_nsec: ns as _,
            }
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
