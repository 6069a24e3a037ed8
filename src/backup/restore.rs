//! `cmkfs restore`: verify first, write nothing that is not verified, rename at the end.
//!
//! 1. The target must be absent or an empty directory, the Disk Encryption Set usable; temp
//!    directories of killed restores into the target are removed (a running one refuses).
//! 2. For every archive of the chain (a full archive, then its incremental archives, oldest
//!    first): the seals are read ([`super::chain`]), the key envelope is unwrapped through
//!    the backup key's vault with the caller's rights (a disabled, deleted or forbidden key
//!    refuses here, with the vault's reason), the manifest MAC verified under the DEK; then
//!    the chain is checked (each incremental names its base by the SHA-256 of its
//!    manifest). All this before anything is written.
//! 3. Each archive is applied into a fresh `.<target>.cmkfs-restore.<random>` beside the
//!    target (held under the volume lock while in use), in manifest order: stored members
//!    are extracted (nothing followed: every entry is created relative to its parent's
//!    descriptor, names are single components, a hard link only repeats an earlier file),
//!    references to the previous state take its files over (moved, not copied), and each
//!    entry's digest must equal the manifest's as soon as it is made. The previous temp
//!    directory then goes. Any failure removes every temp directory.
//! 4. Directory metadata, then the header (the DEK wrapped by the set's key); with
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

use super::archive::{self, Parsed, KEY_MEMBER, MANIFEST_MEMBER};
use super::chain::{check_chain, read_sealed, read_small, Link};
use super::manifest::{self, Kind, Manifest, Member, Totals};
use super::{BackupError, Progress};
use crate::crypto::Dek;
use crate::des::{self, DesStore, DiskEncryptionSet};
use crate::home::Home;
use crate::keyring::KeyringConfig;
use crate::vault::{KeyId, Vault};
use crate::volume::header::{PlatformEnvelope, VolumeHeader};
use crate::volume::lock::VolumeLock;
use crate::volume::reencrypt::{Hooks, Report, Session};
use crate::volume::sys::{self, XTarget};
use crate::volume::Volume;

/// Opens the vault of a backup key, as the caller.
pub type OpenVault<'a> = &'a dyn Fn(&KeyId) -> Result<Box<dyn Vault>, BackupError>;

/// What to restore, where, under which set.
pub struct RestoreRequest<'a> {
    /// The cmkfs home (Disk Encryption Sets, platform key).
    pub home: &'a Home,
    /// The archives: a full backup, then its incremental archives in the order they were
    /// taken (the last one is the state restored).
    pub archives: &'a [PathBuf],
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
    /// See [`Manifest::point_in_time`] (of every archive of the chain).
    pub backup_point_in_time: bool,
    /// The archives restored, oldest first.
    pub archives: Vec<PathBuf>,
    /// Entries restored.
    pub members: u64,
    /// What they are.
    pub totals: Totals,
    /// Owners that could not be set (not running as root); 0 as root.
    pub owners_skipped: u64,
    /// The re-encryption under a new DEK, with `--new-dek`.
    pub new_dek: Option<Report>,
    /// Size of the archives.
    pub archive_bytes: u64,
    /// Temp directories of killed restores into the target, removed first.
    pub cleaned_up: Vec<PathBuf>,
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
    fn new(dir: &Path) -> Result<Tree, BackupError> {
        Ok(Tree {
            root: sys::open_root(dir).map_err(|e| BackupError::io("", e))?,
            last: None,
            // SAFETY: geteuid has no preconditions.
            root_user: unsafe { libc::geteuid() } == 0,
            owners_skipped: 0,
        })
    }

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
/// digest and data digest ([`manifest::Digester`] of layout `version`).
fn extract(
    tree: &mut Tree,
    m: &Member,
    data: &mut dyn Read,
    files: &mut HashSet<String>,
    dirs: &mut Vec<Member>,
    version: u32,
) -> Result<(String, Option<String>), BackupError> {
    let mut hash = manifest::Digester::new(m, version);
    if m.path.is_empty() {
        if m.kind != Kind::Dir || !dirs.is_empty() {
            return Err(BackupError::Corrupt("the root member is misplaced".into()));
        }
        dirs.push(m.clone());
        return Ok(hash.finish());
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
    Ok(hash.finish())
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

/// Restores an archive, or a chain of a full archive and its incremental archives (module
/// docs).
pub fn restore(
    req: &RestoreRequest<'_>,
    mut progress: Option<&mut dyn FnMut(&Progress)>,
) -> Result<RestoreReport, BackupError> {
    let started = Instant::now();
    let target = std::path::absolute(req.target)
        .map_err(|e| BackupError::io(&req.target.display().to_string(), e))?;
    check_target(&target)?;
    let tname = target
        .file_name()
        .ok_or_else(|| {
            BackupError::Refused(format!("{} is not a directory name", target.display()))
        })?
        .to_string_lossy()
        .into_owned();
    let parent = target.parent().unwrap_or(Path::new("/")).to_path_buf();
    let cleaned_up = clean_leftovers(&target)?;
    let store = DesStore::new(req.home);
    let des_rec = store.load(req.des)?;
    // The set's key must be usable before anything is unpacked.
    let des_vault = des::open_vault(req.home, &des_rec)?;
    let dkid = des_rec.active_key_id()?;
    des_vault.get_key(&dkid.name, Some(&dkid.version))?;

    // 1. Every archive's seals, key and MAC, and the chain, before anything is written.
    let mut links: Vec<Link> = Vec::with_capacity(req.archives.len());
    for path in req.archives {
        let sealed = read_sealed(path).map_err(|e| in_archive(path, req.archives.len(), e))?;
        let kid = sealed.envelope.kid()?;
        let vault = (req.open_vault)(&kid)?;
        let (dek, inner) = sealed.envelope.unwrap(vault.as_ref())?;
        drop(vault);
        if inner.is_some() != des_rec.encryption_type.is_double() {
            return Err(BackupError::Refused(format!(
                "the archive holds a {} volume, but Disk Encryption Set {} is {}: choose a set \
                 of the same encryption type",
                if inner.is_some() {
                    "double-encrypted"
                } else {
                    "single-encryption"
                },
                des_rec.name,
                des_rec.encryption_type.as_str()
            )));
        }
        let manifest = sealed
            .open(&dek, inner.is_some())
            .map_err(|e| in_archive(path, req.archives.len(), e))?;
        links.push(Link {
            sealed,
            manifest,
            dek,
            inner,
        });
    }
    check_chain(&links)?;
    let archive_bytes: u64 = links.iter().map(|l| l.sealed.size).sum();

    // 2. Each archive applied in turn into a temp directory of its own beside the target.
    let mut temps: Vec<PathBuf> = Vec::new();
    let result = (|| {
        let mut prog = Progress {
            bytes_total: archive_bytes,
            ..Progress::default()
        };
        let mut prev: Option<(Tree, State, VolumeLock)> = None;
        let mut dirs = Vec::new();
        for (i, link) in links.iter().enumerate() {
            let tmp = parent.join(super::leftovers::temp_name(&tname));
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&tmp)
                .map_err(|e| BackupError::io(&tmp.display().to_string(), e))?;
            temps.push(tmp.clone());
            // Held while the restore works in it: a later restore or fsck tells a running
            // restore from a killed one by it.
            let lock =
                VolumeLock::exclusive(&tmp).map_err(|e| BackupError::Refused(e.to_string()))?;
            let mut tree = Tree::new(&tmp)?;
            let done_before = prog.bytes_done;
            let (state, d) = apply(
                &mut tree,
                prev.as_ref().map(|(t, s, _)| (t, s)),
                link,
                &mut |bytes, members| {
                    prog.bytes_done = done_before + bytes;
                    prog.members_done = members;
                    if let Some(p) = progress.as_mut() {
                        p(&prog);
                    }
                },
            )
            .map_err(|e| in_archive(&link.sealed.path, links.len(), e))?;
            prog.bytes_done = done_before + link.sealed.size;
            dirs = d;
            if let Some((_, _, old_lock)) = prev.take() {
                let old = &temps[i - 1];
                std::fs::remove_dir_all(old)
                    .map_err(|e| BackupError::io(&old.display().to_string(), e))?;
                drop(old_lock);
            }
            prev = Some((tree, state, lock));
        }
        let Some((mut tree, state, lock)) = prev else {
            return Err(BackupError::Internal("no archive applied".into()));
        };
        let tmp = temps.last().cloned().unwrap_or_default();
        let first = &links[0];
        let last = &links[links.len() - 1];
        // 3. The header under the set's key (written before the directories' times are set,
        // the root's included), the new DEK, the set's record, the rename.
        let header = header_for(
            req.home,
            &des_rec,
            des_vault.as_ref(),
            &last.manifest,
            &first.dek,
            first.inner.as_ref(),
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
        drop(lock);
        temps.clear();
        Ok(RestoreReport {
            target: target.clone(),
            volume_id: last.manifest.source.volume_id.clone(),
            des: req.des.to_string(),
            key_id,
            backup_key_id: last.sealed.envelope.key_id.clone(),
            backup_created: last.manifest.created,
            backup_point_in_time: links.iter().all(|l| l.manifest.point_in_time),
            archives: links.iter().map(|l| l.sealed.path.clone()).collect(),
            members: state.entries.len() as u64,
            totals: last.manifest.totals.clone(),
            owners_skipped,
            new_dek,
            archive_bytes,
            cleaned_up: cleaned_up.clone(),
            seconds: 0.0,
        })
    })();
    match result {
        Ok(mut r) => {
            r.seconds = started.elapsed().as_secs_f64();
            Ok(r)
        }
        Err(e) => {
            for t in &temps {
                let _ = super::leftovers::remove(t);
            }
            Err(e)
        }
    }
}

/// Names the archive an error is about when a chain has several.
fn in_archive(path: &Path, n: usize, e: BackupError) -> BackupError {
    if n < 2 {
        return e;
    }
    let name = path
        .file_name()
        .unwrap_or(path.as_os_str())
        .to_string_lossy();
    match e {
        BackupError::Corrupt(m) => BackupError::Corrupt(format!("{name}: {m}")),
        BackupError::Read(err) => BackupError::Corrupt(format!(
            "{name}: reading failed ({err}): it is truncated or damaged"
        )),
        other => other,
    }
}

/// Removes the temp directories of killed restores into `target`; refuses while another
/// restore into it runs.
fn clean_leftovers(target: &Path) -> Result<Vec<PathBuf>, BackupError> {
    let shown = target.display().to_string();
    let mut out = Vec::new();
    for l in super::leftovers::find(target).map_err(|e| BackupError::io(&shown, e))? {
        let removed = !l.running
            && super::leftovers::remove(&l.path)
                .map_err(|e| BackupError::io(&l.path.display().to_string(), e))?;
        if !removed {
            return Err(BackupError::Refused(format!(
                "another `cmkfs restore` into {shown} is running (it works in {}); wait for it \
                 to finish",
                l.path.display()
            )));
        }
        out.push(l.path);
    }
    Ok(out)
}

/// The entries of a restored state: each one's record and digests, by path.
#[derive(Default)]
struct State {
    entries: Vec<(Member, String, Option<String>)>,
    by_path: HashMap<String, usize>,
}

impl State {
    fn get(&self, path: &str) -> Option<&(Member, String, Option<String>)> {
        self.by_path.get(path).map(|i| &self.entries[*i])
    }
}

/// Applies one archive of a chain: its stored members are extracted, its references taken
/// from the previous state (`prev`, whose files are moved over), in manifest order, each
/// checked against the manifest as it is made. Returns the new state and its directories.
fn apply(
    tree: &mut Tree,
    prev: Option<(&Tree, &State)>,
    link: &Link,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(State, Vec<Member>), BackupError> {
    let man = &link.manifest;
    let version = man.version;
    let shown = link.sealed.path.display().to_string();
    let file = File::open(&link.sealed.path).map_err(|e| BackupError::io(&shown, e))?;
    let count = Arc::new(AtomicU64::new(0));
    let mut ar = tar::Archive::new(Counting {
        inner: BufReader::with_capacity(1 << 20, file),
        n: count.clone(),
    });
    let mut entries = ar.entries().map_err(BackupError::Read)?.raw(true);
    let corrupt = |m: String| BackupError::Corrupt(m);
    // The archive read now must be the one whose seals were checked.
    match archive::next(&mut entries)? {
        Some((mut e, Parsed::Own(n))) if n == KEY_MEMBER => {
            let b = read_small(&mut e, manifest::MAX_SMALL, "key envelope")?;
            if manifest::sha256_hex(&b) != man.key_envelope_sha256 {
                return Err(corrupt("the archive changed while it was restored".into()));
            }
        }
        _ => return Err(corrupt("the archive changed while it was restored".into())),
    }
    let mut state = State::default();
    let mut files = HashSet::new();
    let mut dirs: Vec<Member> = Vec::new();
    let mut moved: HashMap<String, String> = HashMap::new();
    let mut blocks = Allocation::new(man);
    for want in &man.members {
        let (m, digest, data) = match &want.from {
            None => {
                let (mut e, p) = archive::next(&mut entries)?.ok_or_else(|| {
                    corrupt(format!("the archive ends before member {:?}", want.path))
                })?;
                let Parsed::Member(m) = p else {
                    return Err(corrupt(format!(
                        "member {:?} is missing from the archive",
                        want.path
                    )));
                };
                if m.path != want.path {
                    return Err(corrupt(format!(
                        "member {:?} is not the one the manifest lists next ({:?})",
                        m.path, want.path
                    )));
                }
                blocks.admit(&m, want)?;
                let (d, data) = extract(tree, &m, &mut e, &mut files, &mut dirs, version)
                    .map_err(|e| crafted(&m.path, e))?;
                (*m, d, data)
            }
            Some(from) => {
                let Some((ptree, pstate)) = prev else {
                    return Err(corrupt(format!(
                        "{:?} refers to a base, but there is none",
                        want.path
                    )));
                };
                let (pm, psha, pdata) = pstate.get(from).ok_or_else(|| {
                    corrupt(format!(
                        "{:?} refers to {from:?}, which its base does not hold",
                        want.path
                    ))
                })?;
                let m = match &want.record {
                    Some(r) => (**r).clone(),
                    None if *psha == want.sha256 => pm.clone(),
                    None => {
                        return Err(corrupt(format!(
                            "{:?} is not the same as in its base",
                            want.path
                        )))
                    }
                };
                let data = if m.kind == Kind::File {
                    if pm.kind != Kind::File || pm.size != m.size || pm.extents != m.extents {
                        return Err(corrupt(format!(
                            "{:?} takes the data of {from:?}, which is not that data",
                            want.path
                        )));
                    }
                    pdata.clone()
                } else {
                    None
                };
                let d = manifest::Digester::with_data(&m, data.as_deref())?;
                if d != want.sha256 || data != want.data_sha256 {
                    return Err(corrupt(format!(
                        "{:?} does not match the manifest",
                        want.path
                    )));
                }
                if m.kind == Kind::File {
                    take_file(tree, ptree, from, &m, &mut moved)?;
                    files.insert(m.path.clone());
                } else {
                    extract(tree, &m, &mut io::empty(), &mut files, &mut dirs, version)?;
                }
                (m, d, data)
            }
        };
        if digest != want.sha256 || (want.data_sha256.is_some() && data != want.data_sha256) {
            return Err(corrupt(format!(
                "member {:?} does not match the manifest (its bytes or metadata changed)",
                want.path
            )));
        }
        state.by_path.insert(m.path.clone(), state.entries.len());
        state.entries.push((m, digest, data));
        progress(count.load(Ordering::Relaxed), state.entries.len() as u64);
    }
    match archive::next(&mut entries)? {
        Some((mut e, Parsed::Own(n))) if n == MANIFEST_MEMBER => {
            let b = read_small(&mut e, manifest::MAX_MANIFEST, "manifest")?;
            if b != link.sealed.manifest_bytes {
                return Err(corrupt("the archive changed while it was restored".into()));
            }
        }
        Some((_, Parsed::Member(m))) => {
            return Err(corrupt(format!(
                "member {:?} is not in the manifest",
                m.path
            )))
        }
        _ => return Err(corrupt("the manifest is missing".into())),
    }
    Ok((state, dirs))
}

/// What a name clash or a path through a non-directory says when a member is created: the
/// archive is crafted or damaged (a duplicate entry, a member below a symlink), not the
/// disk.
fn crafted(path: &str, e: BackupError) -> BackupError {
    match e {
        BackupError::Io { source, .. }
            if matches!(
                source.raw_os_error(),
                Some(libc::EEXIST | libc::ENOTDIR | libc::ELOOP | libc::ENOENT)
            ) =>
        {
            BackupError::Corrupt(format!("member {path:?} cannot be created ({source})"))
        }
        e => e,
    }
}

/// The disk blocks a restore may allocate for the stored files of an archive, checked
/// before a byte of a member is written: a stored file's size and data extents must be those
/// the manifest recorded (its change key), and all files together may not touch more 4 KiB
/// blocks than the manifest's data bytes need (plus a partial block at each end of a
/// file). A crafted sparse map of many tiny extents would otherwise allocate a block for
/// each byte.
struct Allocation {
    left: u64,
}

impl Allocation {
    const BLOCK: u64 = 4096;

    fn new(man: &Manifest) -> Allocation {
        let slack = 2 * Self::BLOCK * (man.totals.files + 1);
        Allocation {
            left: man.totals.bytes.saturating_add(slack),
        }
    }

    fn admit(&mut self, m: &Member, want: &manifest::Entry) -> Result<(), BackupError> {
        if m.kind != Kind::File {
            return Ok(());
        }
        if let Some(c) = &want.change {
            if c.size != m.size || c.layout != manifest::ChangeKey::layout_of(&m.extents) {
                return Err(BackupError::Corrupt(format!(
                    "member {:?}: its size or sparse map is not the one the manifest recorded",
                    m.path
                )));
            }
        }
        let touched = m.extents.iter().fold(0u64, |acc, &(off, len)| {
            let first = off / Self::BLOCK;
            let end = off.saturating_add(len).div_ceil(Self::BLOCK);
            acc.saturating_add((end - first).saturating_mul(Self::BLOCK))
        });
        self.left = self.left.checked_sub(touched).ok_or_else(|| {
            BackupError::Corrupt(format!(
                "member {:?}: its sparse map needs more disk blocks than the manifest's data \
                 bytes",
                m.path
            ))
        })?;
        Ok(())
    }
}

/// Moves the previous state's file `from` to `m.path` in the new tree (a second reference to
/// the same file gets a copy) and gives it `m`'s metadata.
fn take_file(
    tree: &mut Tree,
    ptree: &Tree,
    from: &str,
    m: &Member,
    moved: &mut HashMap<String, String>,
) -> Result<(), BackupError> {
    let (np, nn) = split(&m.path);
    if let Some(at) = moved.get(from).cloned() {
        let (ap, an) = split(&at);
        let src_dir = tree.open(ap)?;
        let (src, _) = sys::open_regular(src_dir.as_fd(), an, sys::Access::Read, None)
            .map_err(|e| BackupError::io(&at, e))?;
        let p = tree.parent(np)?;
        let dst = sys::create_regular(p, nn, 0o600).map_err(|e| BackupError::io(&m.path, e))?;
        let mut buf = vec![0u8; 1 << 20];
        for &(off, len) in &m.extents {
            let mut done = 0u64;
            while done < len {
                let k = ((len - done) as usize).min(buf.len());
                src.read_exact_at(&mut buf[..k], off + done)
                    .map_err(|e| BackupError::io(&at, e))?;
                dst.write_all_at(&buf[..k], off + done)
                    .map_err(|e| BackupError::io(&m.path, e))?;
                done += k as u64;
            }
        }
        dst.set_len(m.size)
            .map_err(|e| BackupError::io(&m.path, e))?;
    } else {
        let (pp, pn) = split(from);
        let src_dir = ptree.open(pp)?;
        let p = tree.parent(np)?;
        sys::rename(src_dir.as_fd(), pn, p, nn, libc::RENAME_NOREPLACE)
            .map_err(|e| BackupError::io(&m.path, e))?;
        moved.insert(from.to_string(), m.path.clone());
    }
    let p = tree.parent(np)?;
    let (f, _) = sys::open_regular(p, nn, sys::Access::Read, None)
        .map_err(|e| BackupError::io(&m.path, e))?;
    // The xattrs are exactly the record's: those of the base that it lacks go.
    let t = XTarget::Fd(f.as_fd());
    let have = sys::list_xattr(t).map_err(|e| BackupError::io(&m.path, e))?;
    for n in have {
        if !m.xattrs.iter().any(|(k, _)| OsStr::new(k) == n) {
            sys::remove_xattr(t, &n).map_err(|e| BackupError::io(&m.path, e))?;
        }
    }
    set_xattrs(t, m)?;
    let (uid, gid) = ids(m);
    let r = sys::chown_fd(f.as_fd(), uid, gid);
    tree.chown(r, &m.path)?;
    sys::chmod_fd(f.as_fd(), m.mode).map_err(|e| BackupError::io(&m.path, e))?;
    sys::utimens_fd(f.as_fd(), &times(m)).map_err(|e| BackupError::io(&m.path, e))?;
    Ok(())
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
    // The caller holds the volume lock on `dir` exclusive.
    let report = {
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

#[cfg(test)]
#[path = "hostile_tests.rs"]
mod hostile_tests;
