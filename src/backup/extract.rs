//! Building a state's tree from an archive: stored members extracted, references to the
//! previous state taken over, every entry checked against the manifest as it is made
//! (docs/FORMAT.md, "Backup archive"; the restore's steps are in [`super::restore`]).

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::archive::{self, Parsed, KEY_MEMBER, MANIFEST_MEMBER};
use super::chain::{read_small, Link};
use super::delta;
use super::manifest::{self, Kind, Member};
use super::screen::Screen;
use super::BackupError;
use crate::volume::sys::{self, XTarget};

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
pub(super) struct Tree {
    root: OwnedFd,
    last: Option<(String, OwnedFd)>,
    root_user: bool,
    pub(super) owners_skipped: u64,
    /// Recreate device nodes (`--allow-devices`); refused otherwise ([`Screen`]).
    pub(super) allow_devices: bool,
}

fn split(path: &str) -> (&str, &OsStr) {
    match path.rsplit_once('/') {
        Some((p, n)) => (p, OsStr::new(n)),
        None => ("", OsStr::new(path)),
    }
}

impl Tree {
    pub(super) fn new(dir: &Path) -> Result<Tree, BackupError> {
        Ok(Tree {
            root: sys::open_root(dir).map_err(|e| BackupError::io("", e))?,
            last: None,
            // SAFETY: geteuid has no preconditions.
            root_user: unsafe { libc::geteuid() } == 0,
            owners_skipped: 0,
            allow_devices: false,
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
pub(super) fn finish_dirs(tree: &mut Tree, dirs: &[Member]) -> Result<(), BackupError> {
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

/// The entries of a restored state: each one's record and digests, by path.
#[derive(Default)]
pub(super) struct State {
    pub(super) entries: Vec<(Member, String, Option<String>)>,
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
pub(super) fn apply(
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
    let mut moved = Taken::default();
    // How many entries take each base file (a reference or a changed-chunk file).
    let mut uses: HashMap<&str, usize> = HashMap::new();
    for e in &man.members {
        if let Some(f) = e
            .from
            .as_deref()
            .or(e.delta.as_ref().map(|d| d.from.as_str()))
        {
            *uses.entry(f).or_default() += 1;
        }
    }
    let mut blocks = Allocation::default();
    let mut screen = Screen::new(tree.allow_devices);
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
                screen.record(&m)?;
                blocks.admit(&m, want)?;
                if let Some(delta) = &want.delta {
                    let r = rebuild(
                        tree,
                        prev,
                        want,
                        delta,
                        &m,
                        &mut e,
                        &mut moved,
                        &uses,
                        version,
                        &mut screen,
                    )
                    .map_err(|e| crafted(&m.path, e))?;
                    files.insert(r.0.path.clone());
                    r
                } else {
                    // A delta member's stream does not start with the file header; a whole
                    // file's does, checked before the file exists.
                    let head = screen.header(&m, &mut e)?;
                    let mut data = io::Cursor::new(head).chain(&mut e);
                    let (d, data) = extract(tree, &m, &mut data, &mut files, &mut dirs, version)
                        .map_err(|e| crafted(&m.path, e))?;
                    (*m, d, data)
                }
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
                screen.record(&m)?;
                screen.reference(&m, from)?;
                let d = manifest::Digester::with_data(&m, data.as_deref())?;
                if d != want.sha256 || data != want.data_sha256 {
                    return Err(corrupt(format!(
                        "{:?} does not match the manifest",
                        want.path
                    )));
                }
                if m.kind == Kind::File {
                    take_file(tree, ptree, from, &m, &mut moved, false)?;
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
/// the manifest recorded (its change key), and the 4 KiB blocks all stored files so far touch
/// may not exceed the data bytes they store in the archive (their maps' lengths, which must
/// be there to be read) plus two blocks per file (a partial block at each end). Nothing the
/// archive merely states (the manifest's `totals.bytes`) enters the bound: a crafted sparse
/// map of many tiny extents would otherwise allocate a block for each byte.
#[derive(Default)]
struct Allocation {
    /// Data bytes of the stored files admitted so far.
    stored: u64,
    /// Bytes of the 4 KiB blocks their extents touch.
    touched: u64,
    /// Stored files admitted so far.
    files: u64,
}

impl Allocation {
    const BLOCK: u64 = 4096;

    fn admit(&mut self, m: &Member, want: &manifest::Entry) -> Result<(), BackupError> {
        if m.kind != Kind::File {
            return Ok(());
        }
        // A delta member holds part of the file: `rebuild` checks it against the record.
        if let Some(c) = want.change.as_ref().filter(|_| want.delta.is_none()) {
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
        self.stored = self.stored.saturating_add(m.data_len());
        self.touched = self.touched.saturating_add(touched);
        self.files += 1;
        let allowed = self.stored.saturating_add(2 * Self::BLOCK * self.files);
        if self.touched > allowed {
            return Err(BackupError::Corrupt(format!(
                "member {:?}: its sparse map needs more disk blocks than the data the archive \
                 stores ({} bytes of blocks for {} data bytes in {} files)",
                m.path, self.touched, self.stored, self.files
            )));
        }
        Ok(())
    }
}

/// Makes a file stored as its changed chunks ([`delta`]): checks the member against the
/// manifest and the base entry's data digest before anything is written, takes the base's
/// file, applies the chunks, and checks the result (the data digest over the record's
/// extents, zeros elsewhere). Returns the record, its digest and data digest.
#[allow(clippy::too_many_arguments)]
fn rebuild(
    tree: &mut Tree,
    prev: Option<(&Tree, &State)>,
    want: &manifest::Entry,
    dl: &manifest::Delta,
    dm: &Member,
    data: &mut dyn Read,
    moved: &mut Taken,
    uses: &HashMap<&str, usize>,
    version: u32,
    screen: &mut Screen,
) -> Result<(Member, String, Option<String>), BackupError> {
    let p = &want.path;
    let corrupt = |m: String| BackupError::Corrupt(m);
    let record = want
        .record
        .as_deref()
        .ok_or_else(|| corrupt(format!("{p:?}: changed chunks without the file's record")))?;
    delta::check(dm, record, dl)?;
    if let Some(c) = &want.change {
        if c.size != record.size || c.layout != manifest::ChangeKey::layout_of(&record.extents) {
            return Err(corrupt(format!(
                "{p:?}: its size or sparse map is not the one the manifest recorded"
            )));
        }
    }
    let Some((ptree, pstate)) = prev else {
        return Err(corrupt(format!(
            "{p:?} refers to a base, but there is none"
        )));
    };
    let (pm, _, pdata) = pstate.get(&dl.from).ok_or_else(|| {
        corrupt(format!(
            "{p:?} changes {:?}, which its base does not hold",
            dl.from
        ))
    })?;
    if pm.kind != Kind::File || pdata.as_deref() != Some(dl.base_sha256.as_str()) {
        return Err(corrupt(format!(
            "{p:?} changes {:?}, whose data in the base is not the data it was compared with",
            dl.from
        )));
    }
    screen.record(record)?;
    screen.reference(record, &dl.from)?;
    let base_as = Member {
        path: record.path.clone(),
        ..pm.clone()
    };
    // Changed in place: taken as a copy when another entry of this archive also takes that
    // base file (it must still find the base's bytes).
    let shared = uses.get(dl.from.as_str()).is_some_and(|n| *n > 1);
    take_file(tree, ptree, &dl.from, &base_as, moved, shared)?;
    let (np, nn) = split(&record.path);
    let dir = tree.parent(np)?;
    // The base's mode may be read-only; `set_meta` below gives the record's.
    sys::chmod_at(dir, nn, 0o600).map_err(|e| BackupError::io(p, e))?;
    let (f, _) = sys::open_regular(dir, nn, sys::Access::ReadWrite, None)
        .map_err(|e| BackupError::io(p, e))?;
    let md = delta::write(&f, dm, dl, data, version, p)?;
    if md != dl.member_sha256 {
        return Err(corrupt(format!(
            "member {p:?} does not match the manifest (its bytes or metadata changed)"
        )));
    }
    let data = delta::verify(&f, record, p)?;
    // A chunk may have rewritten offset 0: the rebuilt file must still start with a header.
    if record.size > 0 {
        let mut h = vec![0u8; crate::volume::content::FILE_HEADER_LEN.min(record.size as usize)];
        f.read_exact_at(&mut h, 0)
            .map_err(|e| BackupError::io(p, e))?;
        screen.header(record, &mut &h[..])?;
    }
    set_meta(tree, &f, record)?;
    let d = manifest::Digester::with_data(record, Some(&data))?;
    Ok((record.clone(), d, Some(data)))
}

/// Moves the previous state's file `from` to `m.path` in the new tree (a second reference to
/// the same file gets a copy) and gives it `m`'s metadata.
fn take_file(
    tree: &mut Tree,
    ptree: &Tree,
    from: &str,
    m: &Member,
    moved: &mut Taken,
    copy: bool,
) -> Result<(), BackupError> {
    let (np, nn) = split(&m.path);
    let moved_to = moved.moved.get(from).cloned();
    if moved_to.is_some() || copy {
        // A real volume never has a base file taken by more than two entries (one move and
        // one copy: see `rebuild`); more would let a small crafted incremental copy one big
        // base file once per entry and fill the disk.
        if !moved.copied.insert(from.to_string()) {
            return Err(BackupError::Corrupt(format!(
                "{:?} takes the data of {from:?}, which other entries of this archive take \
                 already: crafted or damaged",
                m.path
            )));
        }
        let (src_dir, at) = match moved_to {
            Some(at) => (tree.open(split(&at).0)?, at),
            None => (ptree.open(split(from).0)?, from.to_string()),
        };
        let (src, _) = sys::open_regular(src_dir.as_fd(), split(&at).1, sys::Access::Read, None)
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
        moved.moved.insert(from.to_string(), m.path.clone());
    }
    let p = tree.parent(np)?;
    let (f, _) = sys::open_regular(p, nn, sys::Access::Read, None)
        .map_err(|e| BackupError::io(&m.path, e))?;
    set_meta(tree, &f, m)
}

/// The base files an archive's entries took so far: moved (base path -> new path) and copied.
#[derive(Default)]
struct Taken {
    moved: HashMap<String, String>,
    copied: HashSet<String>,
}

/// Gives the file `f` (taken from a base) exactly the xattrs, owner, mode and times of `m`.
fn set_meta(tree: &mut Tree, f: &File, m: &Member) -> Result<(), BackupError> {
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

#[cfg(test)]
#[path = "hostile_tests.rs"]
mod hostile_tests;
