//! Checks a re-encryption makes before it changes anything, and again before it erases the
//! old DEK (docs/FORMAT.md, "Re-encryption"): the rule is that no DEK is erased while
//! anything encrypted under it is left.
//!
//! - **Directories.** Every directory the walks reach must open (its `.cmkfs.dirid` readable)
//!   and list: a directory the names phase cannot enter would keep its names under the old
//!   key. Checked before the header switches, so a damaged tree is refused with nothing
//!   written (`cmkfs fsck` names the damage; restoring the id from a backup, or `fsck
//!   --repair`, fixes it).
//! - **Quarantine.** What `cmkfs fsck --repair` set aside in `cmkfs.quarantine/` keeps the
//!   backing names of its original directory, whose id is lost or unknown there, so it cannot
//!   be sealed again; erasing the old DEK would make it unreadable for good (while a leaked
//!   copy of that DEK still reads it). A re-encryption refuses while the quarantine holds
//!   anything, unless told to discard it ([`Session::discard_quarantine`]), which deletes it.
//! - **Files.** Every file header must be acceptable to [`file_check::judge`] (the judge
//!   fsck and backup share) and name a key generation the run expects:
//!   before the header switches, the current one only; when a run resumes, the retiring or
//!   the new one; before the old DEK is erased, the new one with no conversion in progress.
//!   A file under any other generation (a flipped bit, a file put back from before an
//!   earlier re-encryption) would stop the run half-way, or, claiming the generation the run
//!   creates, be taken for converted and lose the only DEK that might read it. `cmkfs fsck
//!   --repair` sets such a file aside (`key_generation_unknown`, `file_header_corrupt`).
//!   What the check cannot see: a header whose generation flips from the retiring to the
//!   new one *during* a run, before the run reaches that file (the data units carry no MAC).

use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::Path;
use std::sync::Arc;

use super::{contents, ReencryptError, Session};
use crate::fsck::{MANIFEST_FILE, QUARANTINE_DIR, XATTRS_FILE};
use crate::volume::file_check::{self, Expect, Generations};
use crate::volume::layout::{Layout, FILE_HEADER_LEN};
use crate::volume::names::{self, EntryKind};
use crate::volume::sys::{self, Access};
use crate::volume::{Dir, Volume};

/// Most bytes read of a quarantine manifest (to count its items).
const MAX_MANIFEST: usize = 64 << 20;

/// Every directory of the tree opens and lists; otherwise a one-line refusal naming the first
/// that does not (by its backing path) and what to do.
pub(super) fn check_dirs(vol: &Volume, before_start: bool) -> Result<(), ReencryptError> {
    let mut stack: Vec<(Arc<Dir>, Vec<OsString>)> = vec![(vol.root_dir().clone(), Vec::new())];
    while let Some((dir, path)) = stack.pop() {
        let ents = match super::contents::list_keeping_atime(&dir) {
            Ok(e) => e,
            // Removed meanwhile (online, a mount's rmdir): nothing of it is left to convert.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => return Err(damaged(&path, &e, before_start)),
        };
        for ent in ents {
            if names::classify(&ent.name) == EntryKind::Hidden {
                continue;
            }
            let Ok(st) = sys::stat_at(dir.fd(), &ent.name) else {
                continue;
            };
            if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
                continue;
            }
            let mut p = path.clone();
            p.push(ent.name.clone());
            match vol.open_dir(&dir, &ent.name, Some(st.st_ino)) {
                Ok(d) => stack.push((Arc::new(d), p)),
                // Online a rename or rmdir may have moved it meanwhile: where it went, the
                // walks (and the final check) meet it.
                Err(_)
                    if !sys::stat_at(dir.fd(), &ent.name)
                        .is_ok_and(|now| now.st_ino == st.st_ino) => {}
                Err(e) => return Err(damaged(&p, &e, before_start)),
            }
        }
    }
    Ok(())
}

/// When a file check runs (which generations a file header may name, and what the refusal
/// says was kept).
#[derive(Clone, Copy, Debug)]
pub(crate) enum FilesAt {
    /// Before the header switches: the current generation only; nothing was changed.
    Start(u32),
    /// A resumed run: `retiring` (not converted yet) or `new` (converted, or in progress).
    Resume { retiring: u32, new: u32 },
    /// Before the old DEK is erased: `new`, every file wholly converted.
    Finish(u32),
}

/// Every regular file with data has a valid header of the volume's layout, under a key
/// generation `at` allows (judged by [`file_check::judge`]); otherwise a one-line refusal
/// naming the first that does not (by its backing path) and what to do. Reads 32 bytes per
/// file (`O_NOATIME`).
///
/// Each file's length and header are judged as one state: read under the file's content
/// lock (shared), the lock a mount's writes and truncates and the run's batches take
/// exclusively. Online, a file truncated or written through the mount between the walk and
/// the read would otherwise be judged with the walk's length against a header read later
/// (a short read: "failed to fill whole buffer", and a healthy volume refused).
pub(super) fn check_files(vol: &Volume, at: FilesAt) -> Result<(), ReencryptError> {
    let layout = vol.layout();
    let unit = vol.unit_size();
    let files = contents::walk(vol.root_dir(), vol, false)?;
    test_pause(at);
    for f in files {
        let (file, st) = match sys::open_regular(f.dir.fd(), &f.bname, Access::Read, None) {
            Ok(x) => x,
            // Online a mount may have removed or renamed it meanwhile.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => return Err(bad_file(&f.path, &format!("cannot be opened: {e}"), at)),
        };
        let fd = std::os::fd::AsFd::as_fd(&file);
        let shared = vol.shared_of(st.st_ino);
        let lock = shared.content.rmw.read().unwrap_or_else(|p| p.into_inner());
        let len = match sys::fstat(fd) {
            Ok(now) => now.st_size as u64,
            Err(e) => return Err(bad_file(&f.path, &format!("cannot be read: {e}"), at)),
        };
        // Read without moving atime. Putting a moved one back instead would race a user's
        // `utimensat` through the mount during an online run and undo it (found by
        // `reencrypt_online::times_set_while_batches_rewrite_the_file_are_never_undone`);
        // only where the kernel refuses O_NOATIME (not the owner) is it put back.
        let quiet = sys::no_atime(fd);
        let atime = sys::times_of(&st)[0];
        let head = file_check::read_head(&file, len);
        if !quiet && sys::fstat(fd).is_ok_and(|now| sys::times_of(&now)[0] != atime) {
            let _ = sys::utimens_fd(fd, &[atime, None]);
        }
        drop(lock);
        if let Some(why) = refusal(layout, unit, at, len, head) {
            return Err(bad_file(&f.path, &why, at));
        }
    }
    Ok(())
}

/// Test hook (debug builds only; a release build ignores the variable): with
/// `CMKFS_TEST_PREFLIGHT_PAUSE_DIR=DIR`, the check before the header switches, once its walk
/// has listed the tree, creates `DIR/walked` and waits (at most 5 s) for `DIR/go`, so that a
/// test changes files through the mount between the walk and the reads.
fn test_pause(at: FilesAt) {
    #[cfg(debug_assertions)]
    if let (FilesAt::Start(_), Some(dir)) = (at, std::env::var_os("CMKFS_TEST_PREFLIGHT_PAUSE_DIR"))
    {
        let dir = std::path::PathBuf::from(dir);
        let _ = fs::write(dir.join("walked"), b"");
        let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !dir.join("go").exists() && std::time::Instant::now() < end {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }
    #[cfg(not(debug_assertions))]
    let _ = at;
}

/// Why a file of backing length `len`, whose first bytes were read as `head`, stops the run
/// at `at` in a volume of data units of `unit` bytes; `None` if it does not. The judgement
/// is [`file_check::judge`]'s.
pub(crate) fn refusal(
    layout: Layout,
    unit: u64,
    at: FilesAt,
    len: u64,
    head: io::Result<[u8; FILE_HEADER_LEN]>,
) -> Option<String> {
    let generations = match at {
        FilesAt::Start(current) => Generations::Current(current),
        FilesAt::Resume { retiring, new } => Generations::Converting {
            retiring,
            current: new,
        },
        // The header still names the retiring generation, `new − 1`: no file may be under it.
        FilesAt::Finish(new) => Generations::Converted {
            retiring: new.wrapping_sub(1),
            current: new,
        },
    };
    let head = match head {
        Ok(h) => h,
        Err(e) => return Some(format!("its file header cannot be read: {e}")),
    };
    let expect = Expect::new(layout, Some(generations)).with_unit_size(unit);
    file_check::judge(&expect, len, &head)
        .err()
        .map(|d| d.to_string())
}

fn bad_file(path: &[String], why: &str, at: FilesAt) -> ReencryptError {
    let then = match at {
        FilesAt::Start(_) => "nothing was changed",
        _ => "the old DEK is kept and the volume mounts meanwhile",
    };
    ReencryptError::Refused(format!(
        "backing file {} cannot be re-encrypted: {why}; {then}; run `cmkfs fsck --repair` on \
         the volume (it sets the file aside in cmkfs.quarantine/), then the re-encryption \
         again (with --discard-quarantine once what was set aside is dealt with)",
        path.join("/")
    ))
}

/// A backing path for messages.
pub(super) fn show(path: &[OsString]) -> String {
    if path.is_empty() {
        return "/".into();
    }
    path.iter()
        .map(|c| c.to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

fn damaged(path: &[OsString], e: &dyn std::fmt::Display, before_start: bool) -> ReencryptError {
    let then = if before_start {
        "nothing was changed"
    } else {
        "the old DEK is kept and the volume mounts meanwhile"
    };
    ReencryptError::Refused(format!(
        "backing directory {} cannot be read ({e}): {then}; run `cmkfs fsck` on the volume \
         (put the directory's `.cmkfs.dirid` back from a backup, or `cmkfs fsck --repair`), \
         then the re-encryption again",
        show(path)
    ))
}

/// Entries in the quarantine: the items of each batch's manifest and its set-aside extended
/// attributes (a batch without a readable manifest counts its entries).
pub fn quarantine_entries(root: &Path) -> io::Result<u64> {
    let q = root.join(QUARANTINE_DIR);
    let md = match fs::symlink_metadata(&q) {
        Ok(md) => md,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    if !md.is_dir() {
        return Ok(1);
    }
    let mut n = 0u64;
    for batch in fs::read_dir(&q)? {
        let batch = batch?;
        if !batch.file_type()?.is_dir() {
            n += 1;
            continue;
        }
        let b = batch.path();
        let items = |name: &str| -> Option<u64> {
            let bytes = sys::read_bounded(&b.join(name), MAX_MANIFEST).ok()?;
            let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
            let list = match name {
                MANIFEST_FILE => v.get("items")?,
                _ => &v,
            };
            Some(list.as_array()?.len() as u64)
        };
        match items(MANIFEST_FILE) {
            Some(k) => n += k + items(XATTRS_FILE).unwrap_or(0),
            None => {
                for e in fs::read_dir(&b)? {
                    let e = e?;
                    if e.file_name() != MANIFEST_FILE {
                        n += 1;
                    }
                }
            }
        }
    }
    Ok(n)
}

/// The quarantine check: with nothing in it, nothing to do; told to discard it, it is
/// deleted (returns how many entries went); otherwise a one-line refusal.
pub(super) fn check_quarantine(s: &Session<'_>) -> Result<u64, ReencryptError> {
    let root = s.vol.root();
    let n = quarantine_entries(root).map_err(|e| {
        ReencryptError::Refused(format!(
            "{QUARANTINE_DIR}/ cannot be read ({e}); nothing was changed"
        ))
    })?;
    if n == 0 {
        return Ok(0);
    }
    if !s.discard_quarantine {
        return Err(ReencryptError::Refused(format!(
            "{QUARANTINE_DIR}/ holds {n} entries set aside by `cmkfs fsck --repair`, under the \
             current DEK, which re-encryption would make unreadable for good (their names \
             cannot be sealed again): they are listed in {}/{QUARANTINE_DIR}/*/{MANIFEST_FILE}; \
             move one back to its backing path to make it visible again (then `cmkfs fsck`), \
             or add --discard-quarantine to delete them; nothing was changed",
            root.display()
        )));
    }
    let q = root.join(QUARANTINE_DIR);
    // Does not follow symlinks: a link planted there is removed, not its target.
    // Hidden from the mount, like every control file: the root keeps its mtime.
    let r = s
        .vol
        .keeping_root_mtime(|_| match fs::symlink_metadata(&q) {
            Ok(md) if md.is_dir() => fs::remove_dir_all(&q),
            Ok(_) => fs::remove_file(&q),
            Err(e) => Err(e),
        });
    r.and_then(|()| crate::fsutil::sync_dir(root))
        .map_err(|e| {
            ReencryptError::Refused(format!(
                "{QUARANTINE_DIR}/ could not be deleted ({e}); the old DEK is kept"
            ))
        })?;
    tracing::warn!(
        entries = n,
        "the quarantine was discarded before the re-encryption (--discard-quarantine)"
    );
    Ok(n)
}
