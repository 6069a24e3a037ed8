//! The contents phase of a re-encryption: every file's units are rewritten in place under the
//! new DEK, in batches, crash-safe through the journal (see `journal`'s docs).
//!
//! A batch takes the exclusive content lock of each of its files (the same lock the data path
//! takes, so a mount's reads and writes of those files wait, and see either state whole),
//! computes the new ciphertext of a range of each, makes the journal durable, writes the
//! ranges and the file headers (key generation, or progress `reencrypted` for a file that
//! needs more batches), `syncfs`, retires the journal, and only then lets the files go: no
//! write can change a range between its journal and the end of its batch.

use std::collections::{HashSet, VecDeque};
use std::ffi::OsString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use super::journal::{self, Item, Journal, Phase, HASH_SECTOR};
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
    dir: Arc<Dir>,
    bname: OsString,
    path: Vec<String>,
    /// Backing length when found (for the budget and the progress total).
    pub(super) len: u64,
}

/// Every regular file of the tree (each inode once) that has data.
pub(super) fn walk(
    root: &Arc<Dir>,
    vol: &crate::volume::Volume,
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
                    Err(e) => tracing::warn!(entry = ?ent.name, error = %e, "directory skipped"),
                },
                libc::S_IFREG if st.st_size > 0 && seen.insert(st.st_ino) => out.push(Found {
                    dir: dir.clone(),
                    bname: ent.name,
                    path: p,
                    len: st.st_size as u64,
                }),
                _ => {}
            }
        }
    }
    Ok(out)
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
    /// Units this batch may take of it.
    max_units: u64,
}

/// What a batch computed for one file, before anything is written.
struct Plan {
    idx: usize,
    header: FileHeader,
    from: u64,
    to: u64,
    last: bool,
    /// New ciphertext of units `[from, to)` (holes stay zero).
    data: Vec<u8>,
    /// Which of those units are holes (not written).
    holes: Vec<bool>,
    /// The file's access and modification times before the batch, set back after it: a
    /// re-encrypted file looks untouched to `stat` (its ctime moves).
    times: sys::Times,
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
            let units = f.len.div_ceil(sector).max(1);
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
        let (done, wrote, unfinished) = run_batch(s, &work, gated)?;
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
    for of in files {
        loop {
            let work = [Work {
                of: of.clone(),
                path: Vec::new(),
                max_units: batch_bytes() / s.vol.unit_size(),
            }];
            let (done, _, unfinished) = run_batch(s, &work, false)?;
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
) -> Result<(u64, u64, HashSet<usize>), ReencryptError> {
    let _pass = gated.then(|| s.vol.gates().write());
    let keys = s.vol.current_keys()?;
    let Some(old) = keys.retiring.as_deref() else {
        return Err(ReencryptError::Refused(
            "the volume has no retiring key: no re-encryption is running".into(),
        ));
    };
    let cx = s.vol.ctx(&keys);
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
    for (idx, w) in work.iter().enumerate() {
        let f = w.of.file();
        let st = &w.of.shared().content;
        if let Some(p) = plan(f, st, &cx, old, w.max_units)
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
    let mut j = Journal::new(&s.volume_id, keys.generation, Phase::Contents);
    for p in &plans {
        let at = FILE_HEADER_LEN as u64 + p.from * cx.sector;
        j.items.push(Item {
            path: work[p.idx].path.clone(),
            file_id: hex::encode(p.header.file_id),
            from: p.from,
            to: p.to,
            last: p.last,
            hashes: journal::encode_hashes(&journal::hashes_of(at, &p.data)),
        });
    }
    j.write(s.vol.root_dir().fd(), s.journal_key()?)
        .map_err(ReencryptError::os)?;
    s.hooks.step(Step::JournalDurable)?;
    let mut wrote = 0u64;
    let mut done = 0u64;
    for (n, p) in plans.iter().enumerate() {
        let w = &work[p.idx];
        let f = w.of.file();
        write_units(f, cx.sector, p.from, &p.data, &p.holes)?;
        wrote += p.data.len() as u64;
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
    Journal::new(&s.volume_id, keys.generation, Phase::Contents)
        .write(s.vol.root_dir().fd(), s.journal_key()?)
        .map_err(ReencryptError::os)?;
    s.hooks.step(Step::JournalRetired)?;
    drop(guards);
    Ok((done, wrote, unfinished))
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

/// Computes a file's next range under the new key (the caller holds its exclusive lock).
/// `None`: nothing to do (empty, or already under the new generation).
fn plan(
    f: &File,
    st: &FileState,
    cx: &Ctx,
    old: &VolumeKeys,
    max_units: u64,
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
    let size =
        layout::logical_size(len).map_err(|why| VolumeError::CorruptFile { path: None, why })?;
    let end = layout::units_end(size);
    let n_units = end.div_ceil(cx.sector);
    let from = h.reencrypted.min(n_units);
    let to = n_units.min(from + max_units.max(1));
    let last = to >= n_units;
    let start = from * cx.sector;
    // A file truncated below the point an earlier batch reached (`reencrypted`) has nothing
    // left under the old key: `from` is its last unit's end, past `end` when that unit is
    // partial, and the range is empty (it once underflowed here and killed the run).
    let stop = (to * cx.sector).min(end).max(start);
    let mut data = vec![0u8; (stop - start) as usize];
    f.read_exact_at(&mut data, FILE_HEADER_LEN as u64 + start)
        .map_err(VolumeError::Os)?;
    let mut holes = Vec::new();
    for (i, unit) in data.chunks_mut(cx.sector as usize).enumerate() {
        let hole = unit.iter().all(|b| *b == 0);
        holes.push(hole);
        if hole {
            continue;
        }
        let u = from + i as u64;
        content::decrypt_with(cx, old, h.tweak(), u, unit)?;
        content::encrypt_with(cx, cx.keys, h.tweak(), u, unit)?;
    }
    Ok(Some(Plan {
        idx: 0,
        header: h,
        from,
        to,
        last,
        data,
        holes,
        times,
    }))
}

/// Writes the non-hole units of `data` (units from `from`) in runs.
fn write_units(
    f: &File,
    sector: u64,
    from: u64,
    data: &[u8],
    holes: &[bool],
) -> Result<(), ReencryptError> {
    let mut i = 0;
    while i < holes.len() {
        if holes[i] {
            i += 1;
            continue;
        }
        let j = (i..holes.len()).find(|&k| holes[k]).unwrap_or(holes.len());
        let a = i * sector as usize;
        let b = (j * sector as usize).min(data.len());
        f.write_all_at(
            &data[a..b],
            FILE_HEADER_LEN as u64 + from * sector + a as u64,
        )
        .map_err(ReencryptError::os)?;
        i = j;
    }
    Ok(())
}

/// Finishes the batch a crash interrupted: every range the journal names is decided sector
/// by sector (new ciphertext where the sector's hash matches, old elsewhere) and written
/// again under the new key; returns how many ranges were restored.
pub(super) fn recover(s: &mut Session<'_>, j: &Journal) -> Result<u64, ReencryptError> {
    let keys = s.vol.current_keys()?;
    let Some(old) = keys.retiring.as_deref() else {
        return Ok(0);
    };
    let cx = s.vol.ctx(&keys);
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
        let hashes = item
            .hashes()
            .map_err(|why| ReencryptError::Journal { why })?;
        let len = f.metadata().map_err(ReencryptError::os)?.len();
        let size = layout::logical_size(len).unwrap_or(0);
        let end = layout::units_end(size);
        let start = item.from * cx.sector;
        let stop = (item.to * cx.sector).min(end);
        if start < stop {
            let at = FILE_HEADER_LEN as u64 + start;
            let mut data = vec![0u8; (stop - start) as usize];
            f.read_exact_at(&mut data, at).map_err(ReencryptError::os)?;
            let now = journal::hashes_of(at, &data);
            let first_sector = at / HASH_SECTOR;
            let is_new = |backing: u64| {
                let i = (backing / HASH_SECTOR - first_sector) as usize;
                hashes.get(i).is_some_and(|h| now.get(i) == Some(h))
            };
            let mut holes = Vec::new();
            for (i, unit) in data.chunks_mut(cx.sector as usize).enumerate() {
                let hole = unit.iter().all(|b| *b == 0);
                holes.push(hole);
                if hole {
                    continue;
                }
                let u = item.from + i as u64;
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
            write_units(f, cx.sector, item.from, &data, &holes)?;
        }
        let nh = next_header(&h, keys.generation, item.to, item.last);
        f.write_all_at(&nh.encode(), 0)
            .map_err(ReencryptError::os)?;
        of.shared().content.set_cached_header(Some(nh));
        n += 1;
        s.hooks.step(Step::RangeRestored)?;
    }
    syncfs(s.vol.root_dir())?;
    Journal::new(&s.volume_id, keys.generation, Phase::Contents)
        .write(s.vol.root_dir().fd(), s.journal_key()?)
        .map_err(ReencryptError::os)?;
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
    for f in walk(s.vol.root_dir(), s.vol)? {
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
