//! `cmkfs backup`: walks the backing store through directory descriptors (as the mount does:
//! nothing followed, nothing but regular files opened for reading) and writes every entry's
//! ciphertext and metadata as it is, never a byte of plaintext, to a temp file beside the
//! archive that is renamed into place once complete and durable. Every entry is checked
//! first as a restore would check it (`screen`): a backup refuses, writing no archive, where
//! a restore of its archive would refuse the whole of it.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use rustix::fs::Stat;

use super::archive::{Writer, KEY_MEMBER, MAC_MEMBER, MANIFEST_MEMBER};
use super::delta::{self, ChunkHasher, Chunking};
use super::manifest::{
    self, BaseLink, ChangeKey, Delta, Digester, Entry, KeyEnvelope, Kind, Manifest, Member, Source,
    Stored, Totals,
};
use super::screen::Screen;
use super::temp::ArchiveTemp;
use super::{now, BackupError, BackupReport, Progress};
use crate::fsutil::TEMP_PREFIX;
use crate::keyring::Unwrapped;
use crate::vault::{Vault, WrapAlg};
use crate::volume::file_check::{Expect, Generations};
use crate::volume::header::{VolumeHeader, HEADER_FILE};
use crate::volume::sys::{self, XTarget};

/// The key a backup's DEK is wrapped with.
pub struct BackupKey<'a> {
    /// Its vault, reached as the caller.
    pub vault: &'a dyn Vault,
    /// Key name.
    pub name: String,
    /// Version (the latest when `None`).
    pub version: Option<String>,
    /// Wrap algorithm.
    pub alg: WrapAlg,
}

/// What to back up and where.
pub struct BackupRequest<'a> {
    /// The volume's backing directory (canonical).
    pub root: &'a Path,
    /// Its header, verified with `deks`.
    pub header: &'a VolumeHeader,
    /// The volume's DEK(s).
    pub deks: &'a Unwrapped,
    /// The backup key.
    pub key: BackupKey<'a>,
    /// The archive to create (it must not exist).
    pub archive: &'a Path,
    /// Whether nothing can change the volume during the backup (recorded in the manifest).
    pub point_in_time: bool,
    /// For an incremental backup: the previous archive of the chain.
    pub base: Option<&'a BaseState>,
}

/// The state a previous archive recorded, as an incremental backup compares against it.
pub struct BaseState {
    /// The previous archive.
    pub path: std::path::PathBuf,
    link: BaseLink,
    entries: HashMap<String, Entry>,
    by_ino: HashMap<u64, String>,
}

impl BaseState {
    /// Reads and authenticates the archive at `path` (its manifest's MAC under the volume's
    /// DEK) as the base of an incremental backup of the volume of `header`.
    pub fn load(
        path: &Path,
        header: &VolumeHeader,
        deks: &Unwrapped,
    ) -> Result<BaseState, BackupError> {
        let shown = path.display();
        let unusable = |e: BackupError| match e {
            BackupError::Corrupt(m) => BackupError::Refused(format!(
                "{shown} is damaged or was changed ({m}): name another base, or take a full \
                 backup"
            )),
            BackupError::Read(err) => BackupError::Refused(format!(
                "{shown} cannot be read ({err}): it is truncated or damaged; name another \
                 base, or take a full backup"
            )),
            other => other,
        };
        let sealed = super::chain::read_sealed(path).map_err(unusable)?;
        if sealed.envelope.volume_id != header.volume_id {
            return Err(BackupError::Refused(format!(
                "{shown} is a backup of volume {}, not of this one ({}): name a previous \
                 backup of this volume",
                sealed.envelope.volume_id, header.volume_id
            )));
        }
        if sealed.envelope.dek_fingerprint != deks.outer.fingerprint() {
            return Err(BackupError::Refused(format!(
                "{shown} was taken under another DEK (the volume was re-encrypted since): \
                 take a full backup"
            )));
        }
        let man = sealed
            .open(&deks.outer, deks.inner.is_some())
            .map_err(unusable)?;
        if man.version < 2 {
            return Err(BackupError::Refused(format!(
                "{shown} is an archive of version {} (an older cmkfs) without data digests: \
                 take a full backup to start a chain",
                man.version
            )));
        }
        let depth = man.base.as_ref().map_or(0, |b| b.depth) + 1;
        let mut by_ino = HashMap::new();
        let mut entries = HashMap::with_capacity(man.members.len());
        for e in man.members {
            if let Some(c) = &e.change {
                by_ino.insert(c.ino, e.path.clone());
            }
            entries.insert(e.path.clone(), e);
        }
        Ok(BaseState {
            path: path.to_path_buf(),
            link: BaseLink {
                manifest_sha256: sealed.manifest_sha256.clone(),
                created: man.created,
                archive: sealed.name(),
                depth,
            },
            entries,
            by_ino,
        })
    }

    /// The base entry whose data `f` (at `path`, with `change` and record `m`) has: without
    /// reading when a candidate's change key is the same, else by comparing data digests.
    /// Returns the base path and the data digest; `hashed` counts files read.
    fn same_data(
        &self,
        path: &str,
        change: &ChangeKey,
        f: &File,
        m: &Member,
        hashed: &mut u64,
    ) -> Result<Option<(String, String)>, BackupError> {
        let mut cands: Vec<&Entry> = Vec::new();
        if let Some(e) = self.entries.get(path).filter(|e| e.change.is_some()) {
            cands.push(e);
        }
        if let Some(e) = self
            .by_ino
            .get(&change.ino)
            .and_then(|p| self.entries.get(p))
        {
            if e.path != path {
                cands.push(e);
            }
        }
        for e in &cands {
            if e.change.as_ref() == Some(change) {
                if let Some(d) = &e.data_sha256 {
                    return Ok(Some((e.path.clone(), d.clone())));
                }
            }
        }
        cands.retain(|e| {
            e.change
                .as_ref()
                .is_some_and(|c| c.size == change.size && c.layout == change.layout)
        });
        if cands.is_empty() {
            return Ok(None);
        }
        *hashed += 1;
        let mut d = Digester::new(m, manifest::VERSION);
        let mut r = ExtentReader {
            file: f,
            extents: &m.extents,
            done_in_extent: 0,
        };
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = r.read(&mut buf).map_err(|e| BackupError::io(path, e))?;
            if n == 0 {
                break;
            }
            d.update(&buf[..n]);
        }
        let Some(data) = d.finish().1 else {
            return Ok(None);
        };
        Ok(cands
            .iter()
            .find(|e| e.data_sha256.as_deref() == Some(data.as_str()))
            .map(|e| (e.path.clone(), data.clone())))
    }
}

/// Backing xattrs of cmkfs's own (everything else the backing filesystem may add, such as
/// `security.selinux`, belongs to the machine, not the volume).
fn ours(name: &OsStr) -> bool {
    let b = name.as_bytes();
    b.starts_with(b"user.cmkfs.") || b.starts_with(b"trusted.cmkfs.")
}

fn xattrs(t: XTarget<'_>, path: &str) -> Result<Vec<(String, String)>, BackupError> {
    let io = |e| BackupError::io(path, e);
    let mut out = Vec::new();
    let names = match sys::list_xattr(t) {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(out),
        Err(e) => return Err(io(e)),
    };
    for n in names.into_iter().filter(|n| ours(n)) {
        let v = match sys::get_xattr(t, &n) {
            Ok(v) => v,
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => continue,
            Err(e) => return Err(io(e)),
        };
        out.push((n.to_string_lossy().into_owned(), hex::encode(v)));
    }
    out.sort();
    Ok(out)
}

fn member_of(path: &str, kind: Kind, st: &Stat) -> Member {
    Member {
        path: path.into(),
        kind,
        mode: st.st_mode & 0o7777,
        uid: u64::from(st.st_uid),
        gid: u64::from(st.st_gid),
        mtime: (st.st_mtime, st.st_mtime_nsec as u32),
        atime: (st.st_atime, st.st_atime_nsec as u32),
        target: None,
        rdev: None,
        xattrs: Vec::new(),
        size: 0,
        extents: Vec::new(),
    }
}

/// Data extents of `f` inside `[0, size)` (`SEEK_DATA` / `SEEK_HOLE`; a filesystem without
/// them reports the whole file as data).
fn extents(f: &File, size: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut off = 0u64;
    while off < size {
        // SAFETY: lseek on a valid descriptor.
        let d = unsafe { libc::lseek(f.as_raw_fd(), off as libc::off_t, libc::SEEK_DATA) };
        if d < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            return Err(e);
        }
        let d = d as u64;
        if d >= size {
            break;
        }
        // SAFETY: as above.
        let h = unsafe { libc::lseek(f.as_raw_fd(), d as libc::off_t, libc::SEEK_HOLE) };
        if h < 0 {
            return Err(io::Error::last_os_error());
        }
        let h = (h as u64).min(size);
        out.push((d, h - d));
        off = h;
    }
    Ok(out)
}

/// Asks that reading `f` leave its access time alone, so a backup does not change the
/// records the next incremental backup compares ([`sys::no_atime`]).
fn no_atime(f: &File) {
    sys::no_atime(std::os::fd::AsFd::as_fd(f));
}

/// The archive's output: each write that went through counts as progress ([`super::tick`]),
/// one that blocks (an archive on a frozen mount) does not.
struct Ticking(File);

impl Write for Ticking {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.0.write(buf)?;
        super::tick();
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// Reads the extents of a file in order (`pread`); a file that shrank ends early.
struct ExtentReader<'a> {
    file: &'a File,
    extents: &'a [(u64, u64)],
    done_in_extent: u64,
}

impl Read for ExtentReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let Some(&(off, len)) = self.extents.first() else {
                return Ok(0);
            };
            if self.done_in_extent == len {
                self.extents = &self.extents[1..];
                self.done_in_extent = 0;
                continue;
            }
            let want = ((len - self.done_in_extent) as usize).min(buf.len());
            let n = self
                .file
                .read_at(&mut buf[..want], off + self.done_in_extent)?;
            super::tick();
            self.done_in_extent += n as u64;
            return Ok(n);
        }
    }
}

/// What [`walk`] calls for each entry: its parent's descriptor (the root's own for the
/// root), its name (`None` for the root), its path and its `lstat`.
pub(super) type Visit<'v> =
    dyn FnMut(BorrowedFd<'_>, Option<&OsStr>, &str, &Stat) -> Result<(), BackupError> + 'v;

/// One walk over the tree, directories before their entries.
pub(super) fn walk(root: &OwnedFd, visit: &mut Visit<'_>) -> Result<(), BackupError> {
    let st = sys::fstat(root.as_fd()).map_err(|e| BackupError::io("", e))?;
    visit(root.as_fd(), None, "", &st)?;
    let mut stack: Vec<(OwnedFd, String)> = Vec::new();
    let dup = root.try_clone().map_err(|e| BackupError::io("", e))?;
    stack.push((dup, String::new()));
    while let Some((dir, rel)) = stack.pop() {
        let mut names: Vec<_> = sys::list(dir.as_fd())
            .map_err(|e| BackupError::io(&rel, e))?
            .into_iter()
            .map(|e| e.name)
            .collect();
        names.sort();
        for name in names {
            if name.as_bytes().starts_with(TEMP_PREFIX.as_bytes()) {
                continue; // an operation's transient file (garbage if left by a crash)
            }
            if rel.is_empty() && name == HEADER_FILE {
                continue; // the restore writes its own header
            }
            if rel.is_empty() && name == crate::volume::lock::LOCK_FILE {
                continue; // the volume lock: a restore's volume has its own
            }
            let s = name.to_str().ok_or_else(|| {
                BackupError::Refused(format!(
                    "{}/{} is not a cmkfs name (not UTF-8); run `cmkfs fsck --repair`",
                    rel,
                    name.to_string_lossy()
                ))
            })?;
            let path = if rel.is_empty() {
                s.to_string()
            } else {
                format!("{rel}/{s}")
            };
            let st = match sys::stat_at(dir.as_fd(), &name) {
                Ok(st) => st,
                // Removed by a writer of a forced backup: it is simply not in the archive.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                Err(e) => return Err(BackupError::io(&path, e)),
            };
            visit(dir.as_fd(), Some(&name), &path, &st)?;
            super::tick();
            if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
                let sub =
                    sys::open_dir(dir.as_fd(), &name).map_err(|e| BackupError::io(&path, e))?;
                stack.push((sub, path));
            }
        }
    }
    Ok(())
}

/// The refusal of a backup of a volume with a damaged data file: a restore would refuse the
/// whole archive for it, so no archive is made.
fn damaged(root: &Path, path: &str, why: &str) -> BackupError {
    BackupError::Refused(format!(
        "{}: damaged data file ({why}); no archive was written, as a restore would refuse it: \
         run `cmkfs fsck --repair` (it moves it to cmkfs.quarantine), then back up again",
        root.join(path).display()
    ))
}

/// The refusal of a backup of a volume with an entry a restore's screen refuses (a side file
/// of the wrong mode or owner, an executable file under a name cmkfs never makes): a restore
/// would refuse the whole archive for it, so no archive is made.
fn unrestorable(root: &Path, path: &str, e: BackupError) -> BackupError {
    let why = match e {
        BackupError::Corrupt(m) => m,
        other => other.to_string(),
    };
    BackupError::Refused(format!(
        "{}: {why}; no archive was written, as a restore would refuse it: run `cmkfs fsck` to \
         see what the volume should not hold, fix or remove it, then back up again",
        root.join(path).display()
    ))
}

/// Refuses a volume that is in the middle of something (a re-encryption, a format upgrade).
pub fn check_quiet(root: &Path, header: &VolumeHeader) -> Result<(), BackupError> {
    if header.retiring.is_some() || root.join(crate::volume::reencrypt::JOURNAL_FILE).exists() {
        return Err(BackupError::Refused(format!(
            "{} is being re-encrypted: finish it with `cmkfs volume reencrypt` first",
            root.display()
        )));
    }
    if crate::volume::upgrade::needed(root, header) {
        return Err(BackupError::Refused(format!(
            "{} needs `cmkfs upgrade` (format v1) first",
            root.display()
        )));
    }
    Ok(())
}

/// Creates the archive: the key envelope, every backing entry, the manifest and its MAC
/// (prepares its temp file, then [`backup_into`]).
pub fn backup(
    req: &BackupRequest<'_>,
    progress: Option<&mut dyn FnMut(&Progress)>,
) -> Result<BackupReport, BackupError> {
    let temp = ArchiveTemp::prepare(req.archive)?;
    backup_into(req, temp, progress)
}

/// [`backup`] into a temp file prepared before (for a mounted volume: before its writes
/// were frozen); `req.archive` must be the archive `temp` was prepared for.
pub fn backup_into(
    req: &BackupRequest<'_>,
    mut temp: ArchiveTemp,
    progress: Option<&mut dyn FnMut(&Progress)>,
) -> Result<BackupReport, BackupError> {
    let started = Instant::now();
    if temp.archive != req.archive {
        return Err(BackupError::Internal(
            "the temp file was prepared for another archive".into(),
        ));
    }
    check_quiet(req.root, req.header)?;
    let k = &req.key;
    let wrap = |dek: &crate::crypto::Dek| {
        let w = k
            .vault
            .wrap_key(&k.name, k.version.as_deref(), k.alg, dek.as_bytes())
            .map_err(|e| BackupError::Key(format!("{}/keys/{}", k.vault.url(), k.name), e));
        super::tick();
        w
    };
    let wrapped = wrap(&req.deks.outer)?;
    let inner = match &req.deks.inner {
        Some(d) => Some((d, wrap(d)?)),
        None => None,
    };
    let envelope = KeyEnvelope::new(
        &req.header.volume_id,
        &req.deks.outer,
        &wrapped,
        inner.as_ref().map(|(d, w)| (*d, w)),
    );
    let env_bytes =
        serde_json::to_vec_pretty(&envelope).map_err(|e| BackupError::Internal(e.to_string()))?;

    let root = sys::open_root(req.root).map_err(|e| BackupError::io("", e))?;
    // A first walk for the progress bar's total.
    let mut total = Progress::default();
    walk(&root, &mut |_, _, _, st| {
        total.members_total += 1;
        if st.st_mode & libc::S_IFMT == libc::S_IFREG {
            total.bytes_total += st.st_size as u64;
        }
        Ok(())
    })?;
    let out = temp
        .out
        .take()
        .ok_or_else(|| BackupError::Internal("the temp file was used already".into()))?;
    let mut report = write_archive(req, &root, out, &env_bytes, total, progress)?;
    report.stale_temp_removed = std::mem::take(&mut temp.stale);
    report.archive_bytes = temp.commit()?;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

fn write_archive(
    req: &BackupRequest<'_>,
    root: &OwnedFd,
    out: File,
    env_bytes: &[u8],
    mut prog: Progress,
    mut progress: Option<&mut dyn FnMut(&Progress)>,
) -> Result<BackupReport, BackupError> {
    let created = now();
    let werr = |e: io::Error| BackupError::io(&req.archive.display().to_string(), e);
    let mut w = Writer::new(BufWriter::with_capacity(1 << 20, Ticking(out)));
    w.small(KEY_MEMBER, env_bytes, created as i64)
        .map_err(werr)?;
    let mut entries: Vec<Entry> = Vec::new();
    let mut totals = Totals::default();
    let mut stored = Stored::default();
    let mut files_compared = 0u64;
    let mut sockets = 0u64;
    let base = req.base;
    let entry = |path: &str, sha256: String| Entry {
        path: path.into(),
        sha256,
        data_sha256: None,
        change: None,
        from: None,
        record: None,
        chunks: None,
        delta: None,
    };
    let mut seen: HashMap<(u64, u64), String> = HashMap::new();
    // What a restore screens, checked before anything of an entry is stored (device nodes
    // pass: a restore takes them with `--allow-devices`).
    let mut screen = Screen::new(true);
    let mut screened = |m: &Member| {
        screen
            .record(m)
            .map_err(|e| unrestorable(req.root, &m.path, e))
    };
    walk(root, &mut |dir, name, path, st| {
        let fmt = st.st_mode & libc::S_IFMT;
        let xt = match name {
            Some(n) => XTarget::At(dir, n),
            None => XTarget::Fd(dir),
        };
        let kind = match fmt {
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFREG => Kind::File,
            libc::S_IFLNK => Kind::Symlink,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFCHR => Kind::Char,
            libc::S_IFBLK => Kind::Block,
            _ => {
                // A socket holds no data and cannot be recreated meaningfully (GNU tar
                // skips them too).
                sockets += 1;
                return Ok(());
            }
        };
        let mut m = member_of(path, kind, st);
        if kind != Kind::Dir && st.st_nlink > 1 {
            let key = (st.st_dev, st.st_ino);
            if let Some(first) = seen.get(&key) {
                m.kind = Kind::Hardlink;
                m.target = Some(first.clone());
                screened(&m)?;
                totals.hardlinks += 1;
                let (d, _) = Digester::new(&m, manifest::VERSION).finish();
                if base.is_some_and(|b| b.entries.get(path).is_some_and(|e| e.sha256 == d)) {
                    stored.referenced += 1;
                    entries.push(Entry {
                        from: Some(path.into()),
                        ..entry(path, d)
                    });
                } else {
                    let (d, _) = w.member(&m, None).map_err(werr)?;
                    stored.members += 1;
                    entries.push(entry(path, d));
                }
                return Ok(());
            }
            seen.insert(key, path.to_string());
        }
        m.xattrs = xattrs(xt, path)?;
        if kind == Kind::File {
            let Some(n) = name else {
                return Err(BackupError::Internal("the root is a file".into()));
            };
            let (f, fst) = match sys::open_regular(dir, n, sys::Access::Read, Some(st.st_ino)) {
                Ok(x) => x,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
                Err(e) => return Err(BackupError::io(path, e)),
            };
            no_atime(&f);
            m.size = fst.st_size as u64;
            if let Some(why) = req.header.layout().and_then(|lay| {
                let generations = Generations::of(
                    req.header.key_generation,
                    req.header.retiring.as_ref().map(|r| r.key_generation),
                );
                let expect = Expect::new(lay, Some(generations))
                    .with_unit_size(u64::from(req.header.sector_size));
                let expect = match req.point_in_time {
                    true => expect,
                    false => expect.lengths_in_flux(),
                };
                super::screen::damaged_data_file(path, &f, m.size, &expect)
            }) {
                return Err(damaged(req.root, path, &why));
            }
            screened(&m)?;
            m.extents = extents(&f, m.size).map_err(|e| BackupError::io(path, e))?;
            totals.files += 1;
            totals.bytes += m.data_len();
            if m.extents != [(0, m.size)] && m.size > 0 {
                totals.sparse += 1;
            }
            let change = ChangeKey {
                ino: fst.st_ino,
                size: m.size,
                mtime: (fst.st_mtime, fst.st_mtime_nsec as u32),
                ctime: (fst.st_ctime, fst.st_ctime_nsec as u32),
                layout: ChangeKey::layout_of(&m.extents),
            };
            let same = match base {
                Some(b) => b.same_data(path, &change, &f, &m, &mut files_compared)?,
                None => None,
            };
            let e = match same {
                Some((from, data)) => {
                    let d = Digester::with_data(&m, Some(&data))?;
                    let unchanged = from == path
                        && base.is_some_and(|b| b.entries.get(path).is_some_and(|e| e.sha256 == d));
                    stored.referenced += 1;
                    if !unchanged {
                        stored.changed_records += 1;
                    }
                    let chunks = base
                        .and_then(|b| b.entries.get(&from))
                        .and_then(|e| e.chunks.clone());
                    Entry {
                        data_sha256: Some(data),
                        change: Some(change),
                        from: Some(from),
                        record: (!unchanged).then(|| Box::new(m.clone())),
                        chunks,
                        ..entry(path, d)
                    }
                }
                None => {
                    // Only the changed chunks, when the base entry has chunk digests and
                    // that saves half of the data; not under `--force` (the file may change
                    // between the comparison and the copy).
                    let planned = match base.and_then(|b| b.entries.get(path)) {
                        Some(be) if req.point_in_time && be.data_sha256.is_some() => {
                            delta::plan(be, &m, &f)
                                .map_err(|e| BackupError::io(path, e))?
                                .map(|p| (p, be.data_sha256.clone().unwrap_or_default()))
                        }
                        _ => None,
                    };
                    match planned {
                        Some((p, base_sha256)) => {
                            let mut r = ExtentReader {
                                file: &f,
                                extents: &p.member.extents,
                                done_in_extent: 0,
                            };
                            let (md, _) = w.member(&p.member, Some(&mut r)).map_err(werr)?;
                            stored.members += 1;
                            stored.bytes += p.member.data_len();
                            stored.deltas += 1;
                            let d = Digester::with_data(&m, Some(&p.data_sha256))?;
                            Entry {
                                data_sha256: Some(p.data_sha256),
                                change: Some(change),
                                record: Some(Box::new(m.clone())),
                                chunks: Some(p.digests),
                                delta: Some(Delta {
                                    from: path.into(),
                                    base_sha256,
                                    chunks: p.chunks,
                                    member_sha256: md,
                                }),
                                ..entry(path, d)
                            }
                        }
                        None => {
                            let mut ch = ChunkHasher::new(m.size, &m.extents);
                            let (d, data) = {
                                let mut r = Chunking {
                                    inner: ExtentReader {
                                        file: &f,
                                        extents: &m.extents,
                                        done_in_extent: 0,
                                    },
                                    hash: &mut ch,
                                };
                                w.member(&m, Some(&mut r)).map_err(werr)?
                            };
                            stored.members += 1;
                            stored.bytes += m.data_len();
                            Entry {
                                data_sha256: data,
                                change: Some(change),
                                chunks: Some(ch.finish()),
                                ..entry(path, d)
                            }
                        }
                    }
                }
            };
            entries.push(e);
            prog.bytes_done += m.size;
            prog.members_done += 1;
            if let Some(p) = progress.as_mut() {
                p(&prog);
            }
            return Ok(());
        }
        match kind {
            Kind::Symlink => {
                let Some(n) = name else {
                    return Err(BackupError::Internal("the root is a symlink".into()));
                };
                let t = sys::readlink(dir, n).map_err(|e| BackupError::io(path, e))?;
                m.target = Some(String::from_utf8(t).map_err(|_| {
                    BackupError::Refused(format!(
                        "{path}: the symlink target is not a cmkfs target; run `cmkfs fsck`"
                    ))
                })?);
                totals.symlinks += 1;
            }
            Kind::Char | Kind::Block => {
                let rdev = st.st_rdev as libc::dev_t;
                m.rdev = Some((libc::major(rdev), libc::minor(rdev)));
                totals.special += 1;
            }
            Kind::Dir => totals.dirs += 1,
            _ => totals.special += 1,
        }
        screened(&m)?;
        let (d, _) = Digester::new(&m, manifest::VERSION).finish();
        if base.is_some_and(|b| b.entries.get(path).is_some_and(|e| e.sha256 == d)) {
            stored.referenced += 1;
            entries.push(Entry {
                from: Some(path.into()),
                ..entry(path, d)
            });
        } else {
            let (d, _) = w.member(&m, None).map_err(werr)?;
            stored.members += 1;
            entries.push(entry(path, d));
        }
        prog.members_done += 1;
        if let Some(p) = progress.as_mut() {
            p(&prog);
        }
        Ok(())
    })?;
    let manifest = Manifest {
        format: manifest::FORMAT.into(),
        version: manifest::VERSION,
        created,
        point_in_time: req.point_in_time,
        source: Source::of(req.header),
        key_envelope_sha256: manifest::sha256_hex(env_bytes),
        totals: totals.clone(),
        members: entries,
        base: base.map(|b| b.link.clone()),
        stored: base.map(|_| stored.clone()),
    };
    let mbytes = serde_json::to_vec(&manifest).map_err(|e| BackupError::Internal(e.to_string()))?;
    let mac = manifest::mac(&req.deks.outer, &mbytes);
    w.small(MANIFEST_MEMBER, &mbytes, created as i64)
        .map_err(werr)?;
    w.small(MAC_MEMBER, mac.as_bytes(), created as i64)
        .map_err(werr)?;
    let mut buf = w.finish().map_err(werr)?;
    buf.flush().map_err(werr)?;
    Ok(BackupReport {
        archive: req.archive.to_path_buf(),
        volume_id: req.header.volume_id.clone(),
        key_id: KeyEnvelope::parse(env_bytes)?.key_id,
        point_in_time: req.point_in_time,
        members: manifest.members.len() as u64,
        totals,
        sockets_skipped: sockets,
        base: base.map(|b| b.path.clone()),
        chain_depth: base.map(|b| b.link.depth),
        stored: base.map(|_| stored),
        files_compared,
        archive_bytes: 0,
        stale_temp_removed: Vec::new(),
        seconds: 0.0,
        freeze_seconds: None,
    })
}
