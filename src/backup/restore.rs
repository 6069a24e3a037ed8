//! `cmkfs restore`: verify first, write nothing that is not verified, rename at the end.
//!
//! 1. The target must be absent or an empty directory, the Disk Encryption Set usable.
//! 2. The key envelope (first member) is unwrapped through the backup key's vault with the
//!    caller's rights: a disabled, deleted or forbidden key refuses the restore here, with
//!    the vault's reason, before anything is written.
//! 3. Members are extracted into `.<target>.cmkfs-restore.<random>` beside the target
//!    (nothing followed: every entry is created relative to its parent's descriptor, names
//!    are single components, a hard link only repeats an earlier file), each one's digest
//!    computed as it streams.
//! 4. The manifest must verify (MAC under the DEK) and list exactly those digests, and the
//!    archive must end there. Any failure removes the temp directory.
//! 5. Directory metadata, then the header (the DEK wrapped by the set's key); with
//!    `--new-dek` the tree is re-encrypted under a fresh DEK (the offline re-encryption);
//!    then, under the set's lock, the volume is listed in the set and renamed into place.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, FileExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use sha2::Digest;

use super::archive::{self, Parsed, KEY_MEMBER, MAC_MEMBER, MANIFEST_MEMBER};
use super::manifest::{self, Entry, KeyEnvelope, Kind, Manifest, Member, Totals};
use super::{BackupError, Progress};
use crate::crypto::Dek;
use crate::des::{self, DesStore, DiskEncryptionSet};
use crate::home::Home;
use crate::keyring::KeyringConfig;
use crate::vault::{KeyId, Vault};
use crate::volume::header::{PlatformEnvelope, VolumeHeader};
use crate::volume::reencrypt::{Hooks, Report, Session};
use crate::volume::sys::{self, XTarget};
use crate::volume::Volume;

/// Opens the vault of a backup key, as the caller.
pub type OpenVault<'a> = &'a dyn Fn(&KeyId) -> Result<Box<dyn Vault>, BackupError>;

/// What to restore, where, under which set.
pub struct RestoreRequest<'a> {
    /// The cmkfs home (Disk Encryption Sets, platform key).
    pub home: &'a Home,
    /// The archive.
    pub archive: &'a Path,
    /// The backing directory to create (absent, or an empty directory).
    pub target: &'a Path,
    /// The Disk Encryption Set the restored volume belongs to.
    pub des: &'a str,
    /// Re-encrypt everything under a fresh DEK.
    pub new_dek: bool,
    /// How to reach the backup key's vault.
    pub open_vault: OpenVault<'a>,
}

/// What a restore did.
#[derive(Clone, Debug, Serialize)]
pub struct RestoreReport {
    /// The restored backing directory.
    pub target: PathBuf,
    /// The volume's id.
    pub volume_id: String,
    /// The Disk Encryption Set it belongs to.
    pub des: String,
    /// The key that wraps its DEK now.
    pub key_id: String,
    /// The key that wrapped the DEK in the archive.
    pub backup_key_id: String,
    /// When the backup was taken (Unix seconds) and whether writes were frozen for it.
    pub backup_created: u64,
    /// See [`Manifest::point_in_time`].
    pub backup_point_in_time: bool,
    /// Members restored.
    pub members: u64,
    /// What they are.
    pub totals: Totals,
    /// Owners that could not be set (not running as root); 0 as root.
    pub owners_skipped: u64,
    /// The re-encryption under a new DEK, with `--new-dek`.
    pub new_dek: Option<Report>,
    /// Size of the archive.
    pub archive_bytes: u64,
    /// Time taken.
    pub seconds: f64,
}

/// Counts what is read from the archive.
struct Counting<R> {
    inner: R,
    n: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let k = self.inner.read(buf)?;
        self.n.fetch_add(k as u64, Ordering::Relaxed);
        Ok(k)
    }
}

/// The temp tree being filled: its root and the last parent directory used.
struct Tree {
    root: OwnedFd,
    last: Option<(String, OwnedFd)>,
    root_user: bool,
    owners_skipped: u64,
}

fn split(path: &str) -> (&str, &OsStr) {
    match path.rsplit_once('/') {
        Some((p, n)) => (p, OsStr::new(n)),
        None => ("", OsStr::new(path)),
    }
}

impl Tree {
    /// Opens directory `rel` below the root one component at a time (no symlink followed).
    fn open(&self, rel: &str) -> Result<OwnedFd, BackupError> {
        let mut fd = self.root.try_clone().map_err(|e| BackupError::io(rel, e))?;
        if rel.is_empty() {
            return Ok(fd);
        }
        for c in rel.split('/') {
            fd = sys::open_dir(fd.as_fd(), OsStr::new(c)).map_err(|e| BackupError::io(rel, e))?;
        }
        Ok(fd)
    }

    fn parent(&mut self, rel: &str) -> Result<BorrowedFd<'_>, BackupError> {
        if rel.is_empty() {
            return Ok(self.root.as_fd());
        }
        if self.last.as_ref().is_none_or(|(p, _)| p != rel) {
            self.last = Some((rel.to_string(), self.open(rel)?));
        }
        match &self.last {
            Some((_, fd)) => Ok(fd.as_fd()),
            None => Err(BackupError::Internal("no parent".into())),
        }
    }

    fn chown(&mut self, r: io::Result<()>, path: &str) -> Result<(), BackupError> {
        match r {
            Err(e) if e.raw_os_error() == Some(libc::EPERM) && !self.root_user => {
                self.owners_skipped += 1;
                Ok(())
            }
            r => r.map_err(|e| BackupError::io(path, e)),
        }
    }
}

fn set_xattrs(t: XTarget<'_>, m: &Member) -> Result<(), BackupError> {
    for (n, v) in &m.xattrs {
        let v = hex::decode(v).map_err(|e| BackupError::Internal(e.to_string()))?;
        sys::set_xattr(t, OsStr::new(n), &v, 0).map_err(|e| BackupError::io(&m.path, e))?;
    }
    Ok(())
}

fn times(m: &Member) -> sys::Times {
    [Some(Some(m.atime)), Some(Some(m.mtime))]
}

fn ids(m: &Member) -> (Option<u32>, Option<u32>) {
    (u32::try_from(m.uid).ok(), u32::try_from(m.gid).ok())
}

/// Creates one member in the temp tree, reading a file's extents from `data`; returns its
/// digest.
fn extract(
    tree: &mut Tree,
    m: &Member,
    data: &mut dyn Read,
    files: &mut HashSet<String>,
    dirs: &mut Vec<Member>,
) -> Result<String, BackupError> {
    let mut hash = m.digest_start();
    if m.path.is_empty() {
        if m.kind != Kind::Dir || !dirs.is_empty() {
            return Err(BackupError::Corrupt("the root member is misplaced".into()));
        }
        dirs.push(m.clone());
        return Ok(hex::encode(hash.finalize()));
    }
    if dirs.is_empty() {
        return Err(BackupError::Corrupt("the root member is missing".into()));
    }
    let (parent, name) = split(&m.path);
    let (uid, gid) = ids(m);
    match m.kind {
        Kind::Dir => {
            let p = tree.parent(parent)?;
            sys::mkdir(p, name, 0o700).map_err(|e| BackupError::io(&m.path, e))?;
            dirs.push(m.clone());
        }
        Kind::File => {
            let p = tree.parent(parent)?;
            let f = sys::create_regular(p, name, 0o600).map_err(|e| BackupError::io(&m.path, e))?;
            let mut buf = vec![0u8; 1 << 20];
            for &(off, len) in &m.extents {
                let mut done = 0u64;
                while done < len {
                    let k = ((len - done) as usize).min(buf.len());
                    data.read_exact(&mut buf[..k]).map_err(BackupError::Read)?;
                    hash.update(&buf[..k]);
                    f.write_all_at(&buf[..k], off + done)
                        .map_err(|e| BackupError::io(&m.path, e))?;
                    done += k as u64;
                }
            }
            f.set_len(m.size).map_err(|e| BackupError::io(&m.path, e))?;
            set_xattrs(XTarget::Fd(f.as_fd()), m)?;
            let r = sys::chown_fd(f.as_fd(), uid, gid);
            tree.chown(r, &m.path)?;
            sys::chmod_fd(f.as_fd(), m.mode).map_err(|e| BackupError::io(&m.path, e))?;
            sys::utimens_fd(f.as_fd(), &times(m)).map_err(|e| BackupError::io(&m.path, e))?;
            files.insert(m.path.clone());
        }
        Kind::Hardlink => {
            let t = m.target.as_deref().unwrap_or("");
            if !files.contains(t) {
                return Err(BackupError::Corrupt(format!(
                    "hard link {:?} names {t:?}, which is not an earlier file",
                    m.path
                )));
            }
            let (tp, tn) = split(t);
            let from = tree.open(tp)?;
            let p = tree.parent(parent)?;
            sys::link(from.as_fd(), tn, p, name).map_err(|e| BackupError::io(&m.path, e))?;
        }
        Kind::Symlink | Kind::Fifo | Kind::Char | Kind::Block => {
            let p = tree.parent(parent)?;
            let r = match m.kind {
                Kind::Symlink => {
                    sys::symlink(m.target.as_deref().unwrap_or("").as_bytes(), p, name)
                }
                Kind::Fifo => sys::mknod(p, name, libc::S_IFIFO | m.mode, 0),
                _ => {
                    let (maj, min) = m.rdev.unwrap_or((0, 0));
                    let fmt = if m.kind == Kind::Char {
                        libc::S_IFCHR
                    } else {
                        libc::S_IFBLK
                    };
                    sys::mknod(p, name, fmt | m.mode, libc::makedev(maj, min))
                }
            };
            r.map_err(|e| BackupError::io(&m.path, e))?;
            set_xattrs(XTarget::At(p, name), m)?;
            let r = sys::chown_at(p, name, uid, gid);
            let p_owned = tree.open(parent)?;
            tree.chown(r, &m.path)?;
            if m.kind != Kind::Symlink {
                sys::chmod_at(p_owned.as_fd(), name, m.mode)
                    .map_err(|e| BackupError::io(&m.path, e))?;
            }
            sys::utimens_at(p_owned.as_fd(), name, &times(m))
                .map_err(|e| BackupError::io(&m.path, e))?;
            files.insert(m.path.clone());
        }
    }
    Ok(hex::encode(hash.finalize()))
}

/// Directories get their xattrs, owner, mode and times last, deepest first (creating their
/// entries changed their times; a read-only mode would have stopped it).
fn finish_dirs(tree: &mut Tree, dirs: &[Member]) -> Result<(), BackupError> {
    for m in dirs.iter().rev() {
        let fd = tree.open(&m.path)?;
        set_xattrs(XTarget::Fd(fd.as_fd()), m)?;
        let (uid, gid) = ids(m);
        let r = sys::chown_fd(fd.as_fd(), uid, gid);
        tree.chown(r, &m.path)?;
        sys::chmod_fd(fd.as_fd(), m.mode).map_err(|e| BackupError::io(&m.path, e))?;
        sys::utimens_fd(fd.as_fd(), &times(m)).map_err(|e| BackupError::io(&m.path, e))?;
    }
    Ok(())
}

fn read_small<R: Read>(
    e: &mut tar::Entry<'_, R>,
    max: u64,
    what: &str,
) -> Result<Vec<u8>, BackupError> {
    if e.size() > max {
        return Err(BackupError::Corrupt(format!("the {what} is too large")));
    }
    let mut v = Vec::with_capacity(e.size() as usize);
    e.read_to_end(&mut v).map_err(BackupError::Read)?;
    Ok(v)
}

/// Checks the target: absent, or an empty directory.
fn check_target(target: &Path) -> Result<(), BackupError> {
    match std::fs::symlink_metadata(target) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(BackupError::io(&target.display().to_string(), e)),
        Ok(md) if md.is_dir() => {
            let empty = std::fs::read_dir(target)
                .map_err(|e| BackupError::io(&target.display().to_string(), e))?
                .next()
                .is_none();
            if empty {
                Ok(())
            } else {
                Err(BackupError::Refused(format!(
                    "{} is not empty: restore into a new or empty directory",
                    target.display()
                )))
            }
        }
        Ok(_) => Err(BackupError::Refused(format!(
            "{} exists and is not a directory",
            target.display()
        ))),
    }
}

/// Restores an archive (module docs).
pub fn restore(
    req: &RestoreRequest<'_>,
    mut progress: Option<&mut dyn FnMut(&Progress)>,
) -> Result<RestoreReport, BackupError> {
    let started = Instant::now();
    let target = std::path::absolute(req.target)
        .map_err(|e| BackupError::io(&req.target.display().to_string(), e))?;
    check_target(&target)?;
    let store = DesStore::new(req.home);
    let des_rec = store.load(req.des)?;
    // The set's key must be usable before anything is unpacked.
    let des_vault = des::open_vault(req.home, &des_rec)?;
    let dkid = des_rec.active_key_id()?;
    des_vault.get_key(&dkid.name, Some(&dkid.version))?;

    let file = File::open(req.archive)
        .map_err(|e| BackupError::io(&req.archive.display().to_string(), e))?;
    let archive_bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
    let count = Arc::new(AtomicU64::new(0));
    let mut ar = tar::Archive::new(Counting {
        inner: BufReader::with_capacity(1 << 20, file),
        n: count.clone(),
    });
    let mut entries = ar.entries().map_err(BackupError::Read)?.raw(true);

    // 2. The key envelope, and the caller's right to unwrap it.
    let (mut first, p) = archive::next(&mut entries)?
        .ok_or_else(|| BackupError::Corrupt("the archive is empty".into()))?;
    match p {
        Parsed::Own(n) if n == KEY_MEMBER => {}
        _ => {
            return Err(BackupError::Corrupt(
                "the archive does not start with its key envelope (not a cmkfs backup?)".into(),
            ))
        }
    }
    let env_bytes = read_small(&mut first, manifest::MAX_SMALL, "key envelope")?;
    drop(first);
    let envelope = KeyEnvelope::parse(&env_bytes)?;
    let bkid = envelope.kid()?;
    let bvault = (req.open_vault)(&bkid)?;
    let (dek, inner) = envelope.unwrap(bvault.as_ref())?;
    drop(bvault);
    if inner.is_some() != des_rec.encryption_type.is_double() {
        return Err(BackupError::Refused(format!(
            "the archive holds a {} volume, but Disk Encryption Set {} is {}: choose a set of \
             the same encryption type",
            if inner.is_some() {
                "double-encrypted"
            } else {
                "single-encryption"
            },
            des_rec.name,
            des_rec.encryption_type.as_str()
        )));
    }

    // 3. Extract into a temp directory beside the target.
    let parent = target.parent().unwrap_or(Path::new("/"));
    let tname = target.file_name().ok_or_else(|| {
        BackupError::Refused(format!("{} is not a directory name", target.display()))
    })?;
    let tmp = parent.join(format!(
        ".{}.cmkfs-restore.{}",
        tname.to_string_lossy(),
        super::random_hex()
    ));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&tmp)
        .map_err(|e| BackupError::io(&tmp.display().to_string(), e))?;
    let result = (|| {
        let root = sys::open_root(&tmp).map_err(|e| BackupError::io("", e))?;
        let mut tree = Tree {
            root,
            last: None,
            // SAFETY: geteuid has no preconditions.
            root_user: unsafe { libc::geteuid() } == 0,
            owners_skipped: 0,
        };
        let mut got: Vec<Entry> = Vec::new();
        let mut files = HashSet::new();
        let mut dirs: Vec<Member> = Vec::new();
        let mut prog = Progress {
            bytes_total: archive_bytes,
            ..Progress::default()
        };
        let manifest_bytes = loop {
            let (mut e, p) = archive::next(&mut entries)?.ok_or_else(|| {
                BackupError::Corrupt("the archive ends before its manifest".into())
            })?;
            match p {
                Parsed::Member(m) => {
                    let d = extract(&mut tree, &m, &mut e, &mut files, &mut dirs)?;
                    got.push(Entry {
                        path: m.path.clone(),
                        sha256: d,
                    });
                    prog.members_done += 1;
                    prog.bytes_done = count.load(Ordering::Relaxed);
                    if let Some(p) = progress.as_mut() {
                        p(&prog);
                    }
                }
                Parsed::Own(n) if n == MANIFEST_MEMBER => {
                    break read_small(&mut e, manifest::MAX_MANIFEST, "manifest")?
                }
                Parsed::Own(n) => {
                    return Err(BackupError::Corrupt(format!("unexpected member {n:?}")))
                }
            }
        };
        let mac = {
            let (mut e, p) = archive::next(&mut entries)?
                .ok_or_else(|| BackupError::Corrupt("the manifest MAC is missing".into()))?;
            match p {
                Parsed::Own(n) if n == MAC_MEMBER => {
                    read_small(&mut e, manifest::MAX_SMALL, "MAC")?
                }
                _ => return Err(BackupError::Corrupt("the manifest MAC is missing".into())),
            }
        };
        if archive::next(&mut entries)?.is_some() {
            return Err(BackupError::Corrupt(
                "members follow the manifest MAC".into(),
            ));
        }
        // 4. The manifest.
        manifest::verify_mac(&dek, &manifest_bytes, &mac)?;
        let man: Manifest = serde_json::from_slice(&manifest_bytes)
            .map_err(|e| BackupError::Corrupt(format!("the manifest is invalid: {e}")))?;
        if man.format != manifest::FORMAT || man.version != manifest::VERSION {
            return Err(BackupError::Corrupt(
                "the manifest's format is unknown".into(),
            ));
        }
        if man.key_envelope_sha256 != manifest::sha256_hex(&env_bytes) {
            return Err(BackupError::Corrupt("the key envelope was replaced".into()));
        }
        if man.source.volume_id != envelope.volume_id || man.source.double != inner.is_some() {
            return Err(BackupError::Corrupt(
                "the key envelope belongs to another volume".into(),
            ));
        }
        if man.source.format_version != crate::volume::header::FORMAT_VERSION {
            return Err(BackupError::Refused(format!(
                "the archive holds a volume of on-disk format {}; this cmkfs restores {}",
                man.source.format_version,
                crate::volume::header::FORMAT_VERSION
            )));
        }
        if man.members != got {
            let at = man
                .members
                .iter()
                .zip(&got)
                .position(|(a, b)| a != b)
                .unwrap_or(man.members.len().min(got.len()));
            let which = got
                .get(at)
                .or(man.members.get(at))
                .map_or("(end)".to_string(), |e| e.path.clone());
            return Err(BackupError::Corrupt(format!(
                "member {which:?} does not match the manifest (its bytes or metadata changed, or \
                 members were added or removed)"
            )));
        }
        // 5. The header under the set's key (written before the directories' times are set,
        // the root's included), the new DEK, the set's record, the rename.
        let header = header_for(
            req.home,
            &des_rec,
            des_vault.as_ref(),
            &man,
            &dek,
            inner.as_ref(),
        )?;
        header.write(&tmp)?;
        finish_dirs(&mut tree, &dirs)?;
        let owners_skipped = tree.owners_skipped;
        drop(tree);
        let new_dek = if req.new_dek {
            Some(reencrypt(req.home, &des_rec, &tmp, &header)?)
        } else {
            None
        };
        rustix::fs::syncfs(File::open(&tmp).map_err(|e| BackupError::io("", e))?)
            .map_err(|e| BackupError::io("", e.into()))?;
        let key_id = place(req.home, &store, req.des, &tmp, &target)?;
        Ok(RestoreReport {
            target: target.clone(),
            volume_id: man.source.volume_id.clone(),
            des: req.des.to_string(),
            key_id,
            backup_key_id: envelope.key_id.clone(),
            backup_created: man.created,
            backup_point_in_time: man.point_in_time,
            members: got.len() as u64,
            totals: man.totals.clone(),
            owners_skipped,
            new_dek,
            archive_bytes,
            seconds: 0.0,
        })
    })();
    match result {
        Ok(mut r) => {
            r.seconds = started.elapsed().as_secs_f64();
            Ok(r)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

/// The restored volume's header: the source's layout and key generation, the DEK wrapped by
/// the set's active key (and the inner one by cmkfs's platform key), bound to the set.
fn header_for(
    home: &Home,
    des_rec: &DiskEncryptionSet,
    v: &dyn Vault,
    man: &Manifest,
    dek: &Dek,
    inner: Option<&Dek>,
) -> Result<VolumeHeader, BackupError> {
    let kid = des_rec.active_key_id()?;
    let info = v.get_key(&kid.name, Some(&kid.version))?;
    let wrapped = v.wrap_key(&kid.name, Some(&kid.version), info.wrap_alg, dek.as_bytes())?;
    let s = &man.source;
    let mut h = match inner {
        None => VolumeHeader::new(dek, s.volume_id.clone(), s.sector_size, &wrapped, s.created),
        Some(i) => {
            let (pv, pinfo) = des::ensure_platform_key(home)?;
            let w = pv.wrap_key(des::PLATFORM_KEY, None, pinfo.wrap_alg, i.as_bytes())?;
            VolumeHeader::new_double(
                dek,
                s.volume_id.clone(),
                s.sector_size,
                &wrapped,
                s.created,
                PlatformEnvelope::new(i, &w),
            )
        }
    };
    h.key_generation = s.key_generation;
    // `with_des` recomputes the MAC over every field, the key generation included.
    Ok(h.with_des(Some(des_rec.name.clone()), dek))
}

/// Times of every entry of the tree at `dir`, by inode.
fn times_by_inode(dir: &Path) -> Result<HashMap<u64, sys::Times>, BackupError> {
    let root = sys::open_root(dir).map_err(|e| BackupError::io("", e))?;
    let mut out = HashMap::new();
    super::create::walk(&root, &mut |_, _, _, st| {
        out.insert(
            st.st_ino,
            [
                Some(Some((st.st_atime, st.st_atime_nsec as u32))),
                Some(Some((st.st_mtime, st.st_mtime_nsec as u32))),
            ],
        );
        Ok(())
    })?;
    Ok(out)
}

/// `--new-dek`: the offline re-encryption of the restored tree (names, targets, xattrs and
/// every data unit under a fresh DEK; the archive's DEK is gone from the header at the end).
/// It rewrites data in place and renames entries (same inodes), which moves their times:
/// those of files and directories are put back as the archive had them.
fn reencrypt(
    home: &Home,
    des_rec: &DiskEncryptionSet,
    dir: &Path,
    header: &VolumeHeader,
) -> Result<Report, BackupError> {
    let times = times_by_inode(dir)?;
    let report = {
        let _lock = crate::volume::lock::VolumeLock::exclusive(dir)
            .map_err(|e| BackupError::Refused(e.to_string()))?;
        let v = des::open_vault(home, des_rec)?;
        let (kr, header, handle) =
            crate::unlock::unlock_with_handle(home, v, dir, header, KeyringConfig::default())?;
        let kr = Arc::new(kr);
        let vol = Volume::open(dir, header, kr.clone(), 0)?;
        let access = crate::unlock::ReencryptAccess::new(home, kr.vault(), handle)?;
        Session::new(
            &vol,
            &access,
            None,
            Hooks {
                progress: None,
                fault: None,
            },
        )
        .run()?
    };
    let root = sys::open_root(dir).map_err(|e| BackupError::io("", e))?;
    // Setting an entry's times does not touch its directory's: any order will do.
    super::create::walk(&root, &mut |parent, name, path, st| {
        // Symlinks are made anew (with their times) and may reuse a freed inode number of
        // another entry: left alone. Files and directories keep their inodes.
        if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
            return Ok(());
        }
        let Some(t) = times.get(&st.st_ino) else {
            return Ok(());
        };
        match name {
            Some(n) => sys::utimens_at(parent, n, t),
            None => sys::utimens_fd(parent, t),
        }
        .map_err(|e| BackupError::io(path, e))
    })?;
    Ok(report)
}

/// Under the set's lock: the header rewrapped if the set's key changed meanwhile, the target
/// listed in the set, the temp directory renamed into place (over an empty directory, or
/// where nothing is). Returns the key id of the header.
fn place(
    home: &Home,
    store: &DesStore,
    des_name: &str,
    tmp: &Path,
    target: &Path,
) -> Result<String, BackupError> {
    let _lock = store.lock()?;
    let mut rec = store.load(des_name)?;
    let mut header = VolumeHeader::read(tmp)?;
    if header.key_id != rec.active_key.key_url {
        let v = des::open_vault(home, &rec)?;
        let dek = header.unwrap_dek(v.as_ref())?;
        let kid = rec.active_key_id()?;
        let info = v.get_key(&kid.name, Some(&kid.version))?;
        let w = v.wrap_key(&kid.name, Some(&kid.version), info.wrap_alg, dek.as_bytes())?;
        header = header.rewrapped(&w, &dek);
        header.write(tmp)?;
    }
    let listed = rec.volumes.iter().any(|p| p == target);
    if !listed {
        rec.volumes.push(target.to_path_buf());
        store.save(&rec)?;
    }
    let exists = target.symlink_metadata().is_ok();
    let r = if exists {
        std::fs::rename(tmp, target)
    } else {
        rustix::fs::renameat_with(
            rustix::fs::CWD,
            tmp,
            rustix::fs::CWD,
            target,
            rustix::fs::RenameFlags::NOREPLACE,
        )
        .map_err(io::Error::from)
    };
    if let Err(e) = r {
        if !listed {
            rec.volumes.retain(|p| p != target);
            let _ = store.save(&rec);
        }
        return Err(BackupError::io(&target.display().to_string(), e));
    }
    if let Some(p) = target.parent() {
        if let Ok(d) = File::open(p) {
            let _ = d.sync_all();
        }
    }
    Ok(header.key_id)
}
