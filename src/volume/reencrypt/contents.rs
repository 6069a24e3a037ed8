//! The contents phase of a re-encryption: every file's units are rewritten in place under the
//! new DEK, in batches, crash-safe through the journal (see `journal`'s docs).
//!
//! A batch takes the exclusive content lock of each of its files (the same lock the data path
//! takes, so a mount's reads and writes of those files wait, and see either state whole),
//! computes the new ciphertext of a range of each, makes the journal durable, writes the
//! ranges and the file headers (key generation, or progress `reencrypted` for a file that
//! needs more batches), `syncfs`, retires the journal, and only then lets the files go: no
//! write can change a range between its journal and the end of its batch.
//!
//! What makes it fast (README, "Performance"): only data is touched — the data runs of a
//! range are found with `SEEK_DATA`/`SEEK_HOLE`, holes are never read nor written (a hole
//! stays a hole, and a sparse file costs what its data costs); a batch's runs are read into
//! one buffer kept from batch to batch (no allocation, no page faults, no wipe on free per
//! batch), with one `pread` per run; the cipher runs over whole runs of units per call, on
//! every core (the sector engine splits large runs, and small files are spread over the
//! cores); the journal's sector marks are bytes of the new ciphertext, not hashes of it.

use std::collections::{HashSet, VecDeque};
use std::ffi::OsString;
use std::fs::File;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use rayon::prelude::*;

use super::journal::{self, Item, Journal, Phase, Run, MARK_SECTOR};
use super::{ReencryptError, Session, Step};
use crate::crypto::VolumeKeys;
use crate::volume::content::{self, Ctx, FileState};
use crate::volume::layout::{self, FileHeader, BLOCK, FILE_HEADER_LEN};
use crate::volume::names::{self, EntryKind};
use crate::volume::{sys, Dir, OpenFile, VolumeError};

/// Bytes of data per batch (memory held, and how much a journal covers).
pub const BATCH_BYTES: u64 = 32 << 20;

/// The batch size: [`BATCH_BYTES`], or `CMKFS_REENCRYPT_BATCH_BYTES` (tests make batches
/// small so that files span several).
fn batch_bytes() -> u64 {
    std::env::var("CMKFS_REENCRYPT_BATCH_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n >= 4096)
        .unwrap_or(BATCH_BYTES)
}
/// Files per batch at most.
pub const BATCH_FILES: usize = 512;

/// A regular file found by the walk.
pub(super) struct Found {
    pub(super) dir: Arc<Dir>,
    pub(super) bname: OsString,
    pub(super) path: Vec<String>,
    /// Backing length when found.
    pub(super) len: u64,
    /// Backing bytes allocated when found (`st_blocks`): what a sparse file's data costs,
    /// for the budget and the progress total.
    pub(super) alloc: u64,
}

/// Every regular file of the tree (each inode once) that has data. A directory that cannot
/// be opened is skipped with a warning, unless `strict` (the final check before the old DEK
/// is erased: a file left unseen would be lost with it, so the run stops instead).
pub(super) fn walk(
    root: &Arc<Dir>,
    vol: &crate::volume::Volume,
    strict: bool,
) -> Result<Vec<Found>, ReencryptError> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut stack: Vec<(Arc<Dir>, Vec<String>)> = vec![(root.clone(), Vec::new())];
    while let Some((dir, path)) = stack.pop() {
        let ents = match list_keeping_atime(&dir) {
            Ok(e) => e,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => return Err(ReencryptError::os(e)),
        };
        for ent in ents {
            if names::classify(&ent.name) == EntryKind::Hidden {
                continue;
            }
            let Ok(name) = std::str::from_utf8(ent.name.as_bytes()) else {
                continue;
            };
            let st = match sys::stat_at(dir.fd(), &ent.name) {
                Ok(st) => st,
                Err(_) => continue,
            };
            let mut p = path.clone();
            p.push(name.to_string());
            match st.st_mode & libc::S_IFMT {
                libc::S_IFDIR => match vol.open_dir(&dir, &ent.name, Some(st.st_ino)) {
                    Ok(d) => stack.push((Arc::new(d), p)),
                    Err(e) if strict => return Err(unopened_dir(&p, &e)),
                    Err(e) => tracing::warn!(entry = ?ent.name, error = %e, "directory skipped"),
                },
                libc::S_IFREG if st.st_size > 0 && seen.insert(st.st_ino) => out.push(Found {
                    dir: dir.clone(),
                    bname: ent.name,
                    path: p,
                    len: st.st_size as u64,
                    alloc: (st.st_blocks as u64)
                        .saturating_mul(512)
                        .min(st.st_size as u64),
                }),
                _ => {}
            }
        }
    }
    Ok(out)
}

/// Why the final check stops at a directory it cannot open.
fn unopened_dir(path: &[String], e: &VolumeError) -> ReencryptError {
    ReencryptError::Refused(format!(
        "backing directory {} cannot be opened ({e}); the old DEK is kept until every file \
         is converted: run `cmkfs fsck`, then the re-encryption again",
        path.join("/")
    ))
}

/// The entries of `dir`; a listing moves a directory's atime (relatime, once its ctime is
/// newer), which a re-encryption sets back: it leaves the tree looking untouched.
pub(super) fn list_keeping_atime(dir: &Dir) -> std::io::Result<Vec<sys::RawEntry>> {
    let before = sys::fstat(dir.fd()).map(|st| sys::times_of(&st)[0]);
    let ents = sys::list(dir.fd())?;
    if let Ok(atime) = before {
        if sys::fstat(dir.fd()).is_ok_and(|st| sys::times_of(&st)[0] != atime) {
            let _ = sys::utimens_fd(dir.fd(), &[atime, None]);
        }
    }
    Ok(ents)
}

/// One file's part of a batch.
struct Work {
    of: Arc<OpenFile>,
    path: Vec<String>,
    /// Data units this batch may take of it.
    max_units: u64,
}

/// A run of data units of a plan, and where its bytes are in the batch buffer.
struct DataRun {
    /// First unit.
    from: u64,
    /// Its bytes in the batch buffer (the last unit may be short: the file's last block).
    buf: Range<usize>,
}

/// What a batch computed for one file, before anything is written.
struct Plan {
    idx: usize,
    header: FileHeader,
    from: u64,
    to: u64,
    last: bool,
    /// The data runs of `[from, to)`; the units between them are holes.
    runs: Vec<DataRun>,
    /// The file's access and modification times before the batch, set back after it: a
    /// re-encrypted file looks untouched to `stat` (its ctime moves).
    times: sys::Times,
}

/// The buffer a batch's data runs are read, re-encrypted and written from, kept from batch
/// to batch: a fresh 32 MiB buffer per batch cost its page faults, its zeroing and (with the
/// binary's zeroizing allocator) its wipe on free.
#[derive(Default)]
pub(super) struct BatchBuf(Vec<u8>);

impl BatchBuf {
    /// At least `n` bytes (grown, never shrunk; what it held is not kept).
    fn at_least(&mut self, n: usize) -> &mut [u8] {
        if self.0.len() < n {
            self.0 = Vec::new();
            self.0.resize(n, 0);
        }
        &mut self.0[..n]
    }
}

/// Converts every file in `files` (those already under the new generation are skipped);
/// returns (files converted, bytes rewritten).
pub(super) fn convert(
    s: &mut Session<'_>,
    files: Vec<Found>,
    gated: bool,
) -> Result<(u64, u64), ReencryptError> {
    let mut queue: VecDeque<(Found, Option<Arc<OpenFile>>)> =
        files.into_iter().map(|f| (f, None)).collect();
    let (mut converted, mut bytes) = (0u64, 0u64);
    let mut buf = BatchBuf::default();
    while !queue.is_empty() {
        s.check_revocation()?;
        let sector = s.vol.unit_size();
        let mut budget = batch_bytes() / sector;
        let mut batch: Vec<(Found, Arc<OpenFile>, u64)> = Vec::new();
        while budget > 0 && batch.len() < BATCH_FILES {
            let Some((f, of)) = queue.pop_front() else {
                break;
            };
            let of = match of {
                Some(of) => of,
                None => match s.vol.open_file(&f.dir, &f.bname, true, None) {
                    Ok(of) => Arc::new(of),
                    Err(e) if e.errno() == libc::ENOENT => continue,
                    // Online, a rename through the mount may have put a symlink, directory
                    // or special file under the name since the walk (the file itself is
                    // elsewhere now: a later walk finds it).
                    Err(_)
                        if sys::stat_at(f.dir.fd(), &f.bname)
                            .map_or(true, |st| st.st_mode & libc::S_IFMT != libc::S_IFREG) =>
                    {
                        continue
                    }
                    Err(e) => {
                        return Err(ReencryptError::Refused(format!(
                            "cannot open {} to re-encrypt it: {e}",
                            f.path.join("/")
                        )))
                    }
                },
            };
            // One inode once per batch: the batch takes each file's content lock
            // exclusively, and a second take of the same lock by the same thread never
            // returns (F10: every request to that file, then the final check's gate close,
            // then every request, waited on it forever). The walk lists each inode once,
            // but online the names it saw can reach one inode by the time they are opened
            // (a rename or a hard link moved onto a name listed for another file).
            if batch
                .iter()
                .any(|(_, other, _)| std::ptr::eq(other.shared(), of.shared()))
            {
                continue;
            }
            // Data units are what a batch holds: a sparse file's holes take no budget. Its
            // allocated blocks say about how many it has (a unit straddles two blocks behind
            // the 32-byte file header: one more); a file with more than that goes on in the
            // next batch.
            let units = f
                .len
                .div_ceil(sector)
                .min(f.alloc.div_ceil(sector) + 1)
                .max(1);
            let take = units.min(budget);
            budget -= take;
            batch.push((f, of, take));
        }
        if batch.is_empty() {
            continue;
        }
        let work: Vec<Work> = batch
            .iter()
            .map(|(f, of, take)| Work {
                of: of.clone(),
                path: f.path.clone(),
                max_units: *take,
            })
            .collect();
        let (done, wrote, unfinished) = run_batch(s, &work, gated, &mut buf)?;
        converted += done;
        bytes += wrote;
        s.progress.bytes_done += wrote;
        s.progress.files_done += done;
        s.report_progress();
        // Files that need more batches go first in the queue, still open.
        for (i, (f, of, _)) in batch.into_iter().enumerate().rev() {
            if unfinished.contains(&i) {
                queue.push_front((f, Some(of)));
            }
        }
    }
    Ok((converted, bytes))
}

/// Converts open files directly (a mount's files with no name left, at the end of an online
/// re-encryption; the gates are closed by the caller).
pub(super) fn convert_open(
    s: &mut Session<'_>,
    files: Vec<Arc<OpenFile>>,
) -> Result<u64, ReencryptError> {
    let mut n = 0;
    let mut buf = BatchBuf::default();
    for of in files {
        loop {
            let work = [Work {
                of: of.clone(),
                path: Vec::new(),
                max_units: batch_bytes() / s.vol.unit_size(),
            }];
            let (done, _, unfinished) = run_batch(s, &work, false, &mut buf)?;
            n += done;
            if unfinished.is_empty() {
                break;
            }
        }
    }
    Ok(n)
}

/// One batch; returns (files completed, bytes written, indexes of files not complete).
fn run_batch(
    s: &mut Session<'_>,
    work: &[Work],
    gated: bool,
    buf: &mut BatchBuf,
) -> Result<(u64, u64, HashSet<usize>), ReencryptError> {
    let _pass = gated.then(|| s.vol.gates().write());
    let keys = s.vol.current_keys()?;
    let Some(old) = keys.retiring.as_deref() else {
        return Err(ReencryptError::Refused(
            "the volume has no retiring key: no re-encryption is running".into(),
        ));
    };
    let cx = s.vol.ctx(&keys);
    // The lock below is taken once per entry: an inode twice would wait on itself forever
    // (F10). `convert` never builds such a batch; should one come, stop rather than hang.
    let mut inodes = HashSet::new();
    if !work
        .iter()
        .all(|w| inodes.insert(w.of.shared() as *const _ as usize))
    {
        return Err(ReencryptError::Refused(
            "internal error: a re-encryption batch holds one file twice; nothing was changed, \
             run the command again"
                .into(),
        ));
    }
    let guards: Vec<_> = work
        .iter()
        .map(|w| {
            w.of.shared()
                .content
                .rmw
                .write()
                .unwrap_or_else(|p| p.into_inner())
        })
        .collect();
    let mut plans = Vec::new();
    let mut unfinished = HashSet::new();
    let mut used = 0usize;
    for (idx, w) in work.iter().enumerate() {
        let f = w.of.file();
        let st = &w.of.shared().content;
        if let Some(p) = plan(f, st, &cx, old, w.max_units, &mut used)
            .map_err(|e| ReencryptError::Refused(format!("{}: {e}", display_path(&w.path))))?
        {
            if !p.last {
                unfinished.insert(idx);
            }
            plans.push(Plan { idx, ..p });
        }
    }
    if plans.is_empty() {
        drop(guards);
        return Ok((0, 0, unfinished));
    }
    let data = buf.at_least(used);
    for p in &plans {
        let f = work[p.idx].of.file();
        for r in &p.runs {
            f.read_exact_at(
                &mut data[r.buf.clone()],
                cx.layout.data_offset + r.from * cx.sector,
            )
            .map_err(|e| {
                ReencryptError::Refused(format!("{}: {e}", display_path(&work[p.idx].path)))
            })?;
        }
    }
    reencrypt_runs(&cx, old, &plans, data).map_err(|e| ReencryptError::Refused(e.to_string()))?;
    let mut j = Journal::new(&s.volume_id, keys.generation, Phase::Contents);
    for p in &plans {
        j.items.push(Item {
            path: work[p.idx].path.clone(),
            file_id: hex::encode(p.header.file_id),
            from: p.from,
            to: p.to,
            last: p.last,
            times: match p.times {
                [Some(Some(a)), Some(Some(m))] => Some([a, m]),
                _ => None,
            },
            // One journal run per stretch of units that is written: a mark must come from
            // bytes the batch changes, and a sector can begin with the end of an all-zero
            // unit that is left as it is (its first 8 bytes would then match whether the
            // rest of the sector was written or not).
            runs: p
                .runs
                .iter()
                .flat_map(|r| {
                    let bytes = &data[r.buf.clone()];
                    live_stretches(bytes, cx.sector)
                        .into_iter()
                        .map(move |(a, b)| {
                            let part = &bytes[a..b];
                            let first = r.from + (a as u64) / cx.sector;
                            Run {
                                from: first,
                                to: first + (part.len() as u64).div_ceil(cx.sector),
                                marks: journal::encode_marks(
                                    cx.layout.data_offset + first * cx.sector,
                                    part,
                                ),
                            }
                        })
                })
                .collect(),
        });
    }
    let key = s.journal_key()?;
    s.vol
        .keeping_root_mtime(|k| j.write_then(s.vol.root_dir().fd(), key, &mut || k.put_back()))
        .map_err(ReencryptError::os)?;
    s.hooks.step(Step::JournalDurable)?;
    let mut wrote = 0u64;
    let mut done = 0u64;
    for (n, p) in plans.iter().enumerate() {
        let w = &work[p.idx];
        let f = w.of.file();
        for r in &p.runs {
            write_units(
                f,
                cx.layout.data_offset,
                cx.sector,
                r.from,
                &data[r.buf.clone()],
            )?;
            wrote += r.buf.len() as u64;
        }
        if n == 0 {
            s.hooks.step(Step::DataWritten)?;
        }
        let h = next_header(&p.header, keys.generation, p.to, p.last);
        f.write_all_at(&h.encode(), 0).map_err(ReencryptError::os)?;
        w.of.shared().content.set_cached_header(Some(h));
        sys::utimens_fd(std::os::fd::AsFd::as_fd(f), &p.times).map_err(ReencryptError::os)?;
        if p.last {
            done += 1;
        }
    }
    s.hooks.step(Step::HeadersWritten)?;
    syncfs(s.vol.root_dir())?;
    s.hooks.step(Step::BatchSynced)?;
    retire_journal(s, keys.generation)?;
    s.hooks.step(Step::JournalRetired)?;
    drop(guards);
    Ok((done, wrote, unfinished))
}

/// Writes the journal of a batch that is done (phase *contents*, no items), keeping the
/// backing root's mtime.
fn retire_journal(s: &Session<'_>, generation: u32) -> Result<(), ReencryptError> {
    let key = s.journal_key()?;
    s.vol
        .keeping_root_mtime(|k| {
            Journal::new(&s.volume_id, generation, Phase::Contents).write_then(
                s.vol.root_dir().fd(),
                key,
                &mut || k.put_back(),
            )
        })
        .map_err(ReencryptError::os)
}

/// The header a file gets after a batch took units up to `to`.
fn next_header(h: &FileHeader, generation: u32, to: u64, last: bool) -> FileHeader {
    if last {
        FileHeader {
            key_gen: generation as u16,
            reencrypted: 0,
            ..*h
        }
    } else {
        FileHeader {
            reencrypted: to,
            ..*h
        }
    }
}

/// Plans a file's next range under the new key (the caller holds its exclusive lock): at
/// most `max_units` data units from where it stands, their bytes at `*used..` of the batch
/// buffer (`*used` moves past them). `None`: nothing to do (empty, or already under the new
/// generation).
fn plan(
    f: &File,
    st: &FileState,
    cx: &Ctx,
    old: &VolumeKeys,
    max_units: u64,
    used: &mut usize,
) -> Result<Option<Plan>, VolumeError> {
    // Before anything reads the file (a read may move its atime).
    let fd = std::os::fd::AsFd::as_fd(f);
    let times = sys::times_of(&sys::fstat(fd).map_err(VolumeError::Os)?);
    let h = match content::file_header(f, st, cx)? {
        Some(h) if h.key_gen != cx.keys.generation as u16 => h,
        _ => {
            // Nothing to do, but reading the header may have moved the atime (relatime).
            if sys::fstat(fd).is_ok_and(|now| sys::times_of(&now)[0] != times[0]) {
                let _ = sys::utimens_fd(fd, &[times[0], None]);
            }
            return Ok(None);
        }
    };
    if h.key_gen != old.generation as u16 {
        return Err(VolumeError::CorruptFile {
            path: None,
            why: format!("file data is under unknown key generation {}", h.key_gen),
        });
    }
    let len = f.metadata().map_err(VolumeError::Os)?.len();
    let size = cx
        .layout
        .logical_size(len)
        .map_err(|why| VolumeError::CorruptFile { path: None, why })?;
    let end = layout::units_end(size);
    let n_units = end.div_ceil(cx.sector);
    let from = h.reencrypted.min(n_units);
    let (runs, to) = data_runs(
        f,
        cx.layout.data_offset,
        cx.sector,
        from,
        n_units,
        max_units.max(1),
    )?;
    let runs = runs
        .into_iter()
        .map(|(a, b)| {
            let bytes = ((b * cx.sector).min(end) - a * cx.sector) as usize;
            let r = DataRun {
                from: a,
                buf: *used..*used + bytes,
            };
            *used += bytes;
            r
        })
        .collect();
    Ok(Some(Plan {
        idx: 0,
        header: h,
        from,
        to,
        last: to >= n_units,
        runs,
        times,
    }))
}

/// `lseek(fd, off, whence)`; `None` for `ENXIO` (no data at or after `off`).
fn seek(f: &File, off: u64, whence: i32) -> std::io::Result<Option<u64>> {
    // SAFETY: lseek on a valid descriptor; it changes only the file offset, which nothing
    // here uses (every read and write is positioned).
    let r = unsafe { libc::lseek(f.as_raw_fd(), off as libc::off_t, whence) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some(r as u64))
}

/// The runs of units of `[from, n_units)` that hold data, found with `SEEK_DATA`/`SEEK_HOLE`
/// (a unit is data if any of its backing bytes is allocated), up to `max_units` units of
/// them; and the end of the range they cover: `n_units` when no data is left after them.
/// A filesystem that cannot tell holes makes the whole range one run.
fn data_runs(
    f: &File,
    hdr: u64,
    sector: u64,
    from: u64,
    n_units: u64,
    max_units: u64,
) -> Result<(Vec<(u64, u64)>, u64), VolumeError> {
    let unit_of = |backing: u64| backing.saturating_sub(hdr) / sector;
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut taken = 0u64;
    let mut u = from;
    while u < n_units {
        let d = match seek(f, hdr + u * sector, libc::SEEK_DATA) {
            Ok(Some(d)) => d,
            Ok(None) => return Ok((runs, n_units)),
            // Cannot tell: data from here.
            Err(_) => hdr + u * sector,
        };
        if taken == max_units {
            // Budget spent: more data follows, in the next batch.
            return Ok((runs, u));
        }
        let hole = match seek(f, d, libc::SEEK_HOLE) {
            Ok(Some(h)) => h,
            _ => u64::MAX,
        };
        let a = unit_of(d).max(u);
        if a >= n_units {
            break;
        }
        let b = (hole.saturating_sub(hdr).div_ceil(sector))
            .min(n_units)
            .min(a + (max_units - taken))
            .max(a + 1);
        match runs.last_mut() {
            Some(last) if last.1 == a => last.1 = b,
            _ => runs.push((a, b)),
        }
        taken += b - a;
        u = b;
    }
    Ok((runs, n_units))
}

/// Decrypts every plan's data runs (in `data`) with the old keys and encrypts them with the
/// new ones, leaving all-zero units (holes inside an allocated extent) as they are. Runs of
/// at least [`crate::engine::PARALLEL_MIN_BYTES`] go one by one through the sector engine,
/// which splits them over the cores; smaller ones (small files) are spread over the cores
/// whole.
fn reencrypt_runs(
    cx: &Ctx,
    old: &VolumeKeys,
    plans: &[Plan],
    data: &mut [u8],
) -> Result<(), VolumeError> {
    // Cut the buffer into the plans' runs (they follow each other in it), then each run into
    // its stretches of non-zero units: one cipher call per stretch.
    struct Job<'d> {
        tweak: u128,
        unit: u64,
        bytes: &'d mut [u8],
    }
    let mut jobs: Vec<Job<'_>> = Vec::new();
    let mut rest = data;
    let mut at = 0usize;
    let sector = cx.sector as usize;
    for p in plans {
        for r in &p.runs {
            let (_, tail) = std::mem::take(&mut rest).split_at_mut(r.buf.start - at);
            let (mut run, tail) = tail.split_at_mut(r.buf.len());
            rest = tail;
            at = r.buf.end;
            let mut unit = r.from;
            while !run.is_empty() {
                // Skip zero units, then take the non-zero ones that follow.
                let zeros = run.chunks(sector).take_while(|u| is_zero(u)).count();
                let skip = (zeros * sector).min(run.len());
                unit += zeros as u64;
                run = &mut std::mem::take(&mut run)[skip..];
                let live = run.chunks(sector).take_while(|u| !is_zero(u)).count();
                let take = (live * sector).min(run.len());
                if take == 0 {
                    continue;
                }
                let (bytes, tail) = std::mem::take(&mut run).split_at_mut(take);
                jobs.push(Job {
                    tweak: p.header.tweak(),
                    unit,
                    bytes,
                });
                unit += live as u64;
                run = tail;
            }
        }
    }
    let one = |j: &mut Job<'_>| -> Result<(), VolumeError> {
        content::decrypt_with(cx, old, j.tweak, j.unit, j.bytes)?;
        content::encrypt_with(cx, cx.keys, j.tweak, j.unit, j.bytes)
    };
    let (mut large, mut small): (Vec<Job<'_>>, Vec<Job<'_>>) = jobs
        .into_iter()
        .partition(|j| j.bytes.len() >= crate::engine::PARALLEL_MIN_BYTES);
    large.iter_mut().try_for_each(one)?;
    small.par_iter_mut().try_for_each(one)
}

/// True when every byte is zero. 64 bytes at a time (an OR-fold the compiler vectorises),
/// stopping at the first non-zero chunk: ciphertext, the common case, stops at once.
fn is_zero(b: &[u8]) -> bool {
    let mut chunks = b.chunks_exact(64);
    for c in &mut chunks {
        if c.iter().fold(0u8, |a, x| a | x) != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|x| *x == 0)
}

/// The byte ranges of `data` (consecutive units of `sector` bytes, the last maybe short) that
/// are maximal stretches of units not all zero.
fn live_stretches(data: &[u8], sector: u64) -> Vec<(usize, usize)> {
    let sector = sector as usize;
    let units = data.len().div_ceil(sector);
    let zero = |k: usize| is_zero(&data[k * sector..((k + 1) * sector).min(data.len())]);
    let mut out = Vec::new();
    let mut i = 0;
    while i < units {
        if zero(i) {
            i += 1;
            continue;
        }
        let j = (i..units).find(|&k| zero(k)).unwrap_or(units);
        out.push((i * sector, (j * sector).min(data.len())));
        i = j;
    }
    out
}

/// Writes the non-zero units of `data` (units from `from`) in runs: an all-zero unit was a
/// hole inside an allocated extent and stays as it is (real ciphertext is never all zeros).
/// `hdr`: the volume's data offset.
fn write_units(
    f: &File,
    hdr: u64,
    sector: u64,
    from: u64,
    data: &[u8],
) -> Result<(), ReencryptError> {
    for (a, b) in live_stretches(data, sector) {
        f.write_all_at(&data[a..b], hdr + from * sector + a as u64)
            .map_err(ReencryptError::os)?;
    }
    Ok(())
}

/// Finishes the batch a crash interrupted: every data run the journal names is decided
/// sector by sector (new ciphertext where the sector's mark matches, old elsewhere) and
/// written again under the new key; returns how many ranges were restored.
pub(super) fn recover(s: &mut Session<'_>, j: &Journal) -> Result<u64, ReencryptError> {
    let keys = s.vol.current_keys()?;
    let Some(old) = keys.retiring.as_deref() else {
        return Ok(0);
    };
    let cx = s.vol.ctx(&keys);
    let kind = j.mark_kind();
    let mut n = 0;
    for item in &j.items {
        let Some(of) = locate(s, item)? else {
            tracing::warn!(path = %item.path.join("/"), "a file of the interrupted batch is gone; nothing to restore");
            continue;
        };
        let _g = of
            .shared()
            .content
            .rmw
            .write()
            .unwrap_or_else(|p| p.into_inner());
        let f = of.file();
        let h = match content::file_header(f, &of.shared().content, &cx) {
            Ok(Some(h)) => h,
            _ => continue,
        };
        let len = f.metadata().map_err(ReencryptError::os)?.len();
        let size = cx.layout.logical_size(len).unwrap_or(0);
        let end = layout::units_end(size);
        for run in &item.runs {
            let marks = run.marks().map_err(|why| ReencryptError::Journal { why })?;
            let start = run.from * cx.sector;
            let stop = (run.to * cx.sector).min(end);
            if start >= stop {
                continue;
            }
            let at = cx.layout.data_offset + start;
            let mut data = vec![0u8; (stop - start) as usize];
            f.read_exact_at(&mut data, at).map_err(ReencryptError::os)?;
            let now = journal::marks_of(kind, at, &data);
            let first_sector = at / MARK_SECTOR;
            let is_new = |backing: u64| {
                let i = (backing / MARK_SECTOR - first_sector) as usize;
                marks.get(i).is_some_and(|m| now.get(i) == Some(m))
            };
            for (i, unit) in data.chunks_mut(cx.sector as usize).enumerate() {
                if is_zero(unit) {
                    continue;
                }
                let u = run.from + i as u64;
                let mut as_old = unit.to_vec();
                content::decrypt_with(&cx, old, h.tweak(), u, &mut as_old)?;
                let mut as_new = unit.to_vec();
                content::decrypt_with(&cx, cx.keys, h.tweak(), u, &mut as_new)?;
                let unit_at = at + (i as u64) * cx.sector;
                for (b, block) in unit.chunks_mut(BLOCK as usize).enumerate() {
                    let off = b * BLOCK as usize;
                    let src = if is_new(unit_at + off as u64) {
                        &as_new
                    } else {
                        &as_old
                    };
                    block.copy_from_slice(&src[off..off + block.len()]);
                }
                content::encrypt_with(&cx, cx.keys, h.tweak(), u, unit)?;
            }
            write_units(f, cx.layout.data_offset, cx.sector, run.from, &data)?;
        }
        let nh = next_header(&h, keys.generation, item.to, item.last);
        f.write_all_at(&nh.encode(), 0)
            .map_err(ReencryptError::os)?;
        of.shared().content.set_cached_header(Some(nh));
        // The batch's writes moved the times (a crash kept it from setting them back).
        if let Some([a, m]) = item.times {
            sys::utimens_fd(std::os::fd::AsFd::as_fd(f), &[Some(Some(a)), Some(Some(m))])
                .map_err(ReencryptError::os)?;
        }
        n += 1;
        s.hooks.step(Step::RangeRestored)?;
    }
    syncfs(s.vol.root_dir())?;
    retire_journal(s, keys.generation)?;
    Ok(n)
}

/// The file a journal item names: by its path if the file there has its file id, else by a
/// search of the whole tree for that file id (it was renamed during the batch).
fn locate(s: &Session<'_>, item: &Item) -> Result<Option<Arc<OpenFile>>, ReencryptError> {
    let want = item.file_id.clone();
    let matches = |of: &OpenFile| -> bool {
        let mut b = [0u8; FILE_HEADER_LEN];
        of.file().read_exact_at(&mut b, 0).is_ok()
            && FileHeader::decode(&b).is_ok_and(|h| hex::encode(h.file_id) == want)
    };
    let comps = item.components();
    if let Some((last, dirs)) = comps.split_last() {
        let mut dir = s.vol.root_dir().clone();
        let mut ok = true;
        for c in dirs {
            match s.vol.open_dir(&dir, c, None) {
                Ok(d) => dir = Arc::new(d),
                Err(_) => {
                    ok = false;
                    break;
                }
            }
        }
        if ok {
            if let Ok(of) = s.vol.open_file(&dir, last, true, None) {
                if matches(&of) {
                    return Ok(Some(Arc::new(of)));
                }
            }
        }
    }
    for f in walk(s.vol.root_dir(), s.vol, false)? {
        if let Ok(of) = s.vol.open_file(&f.dir, &f.bname, true, None) {
            if matches(&of) {
                return Ok(Some(Arc::new(of)));
            }
        }
    }
    Ok(None)
}

fn display_path(p: &[String]) -> String {
    if p.is_empty() {
        "an open file with no name".into()
    } else {
        p.join("/")
    }
}

/// `syncfs` of the backing filesystem.
pub(super) fn syncfs(root: &Dir) -> Result<(), ReencryptError> {
    let fd = sys::open_dir_readable(root.fd()).map_err(ReencryptError::os)?;
    // SAFETY: syncfs on a valid descriptor.
    if unsafe { libc::syncfs(fd.as_raw_fd()) } != 0 {
        return Err(ReencryptError::os(std::io::Error::last_os_error()));
    }
    Ok(())
}
