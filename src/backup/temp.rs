//! The temp file a backup writes beside its archive (`.cmkfs-tmp.<archive>.<16 hex>`), and
//! the removal of those that killed backups left. Prepared before a mounted volume's writes
//! are frozen: nothing in the archive's directory (a shared one, writable by others) may
//! make a frozen backup wait.

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::BackupError;
use crate::fsutil::TEMP_PREFIX;

/// How old an unlocked temp file must be to count as a killed backup's (one just created
/// is locked a moment later).
pub(super) const STALE_AFTER: std::time::Duration = std::time::Duration::from_secs(10);

/// The temp file of one backup, created empty and locked; removed when dropped unless
/// [`ArchiveTemp::commit`] renamed it to the archive.
pub struct ArchiveTemp {
    pub(super) archive: PathBuf,
    pub(super) tmp: PathBuf,
    pub(super) out: Option<File>,
    /// Held until the end (the lock is the open file's, shared by this descriptor): it
    /// tells a later backup that this temp file is being written, not left by a killed one.
    _writing: File,
    /// Temp files of killed backups removed while preparing.
    pub(super) stale: Vec<PathBuf>,
    committed: bool,
}

impl ArchiveTemp {
    /// Refuses an `archive` that exists, removes what killed backups to the same name left
    /// beside it, and creates the (locked, mode 0600) temp file the backup writes.
    pub fn prepare(archive: &Path) -> Result<ArchiveTemp, BackupError> {
        if archive.symlink_metadata().is_ok() {
            return Err(BackupError::Refused(format!(
                "{} exists; remove it or choose another archive name",
                archive.display()
            )));
        }
        let dir = archive
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let fname = archive.file_name().ok_or_else(|| {
            BackupError::Refused(format!("{} is not a file name", archive.display()))
        })?;
        let stale = remove_stale_temps(dir, &fname.to_string_lossy());
        let tmp = dir.join(format!(
            "{TEMP_PREFIX}{}.{}",
            fname.to_string_lossy(),
            super::random_hex()
        ));
        let shown = |e| BackupError::io(&tmp.display().to_string(), e);
        let out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(shown)?;
        let writing = out
            .try_clone()
            .and_then(|f| {
                rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive)?;
                Ok(f)
            })
            .map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                shown(e)
            })?;
        Ok(ArchiveTemp {
            archive: archive.to_path_buf(),
            tmp,
            out: Some(out),
            _writing: writing,
            stale,
            committed: false,
        })
    }

    /// Makes the complete temp file durable and renames it to the archive (never over an
    /// existing file).
    pub(super) fn commit(&mut self) -> Result<u64, BackupError> {
        let shown = |e| BackupError::io(&self.tmp.display().to_string(), e);
        let f = File::open(&self.tmp).map_err(shown)?;
        f.sync_all().map_err(shown)?;
        rustix::fs::renameat_with(
            rustix::fs::CWD,
            &self.tmp,
            rustix::fs::CWD,
            &self.archive,
            rustix::fs::RenameFlags::NOREPLACE,
        )
        .map_err(|e| BackupError::io(&self.archive.display().to_string(), e.into()))?;
        self.committed = true;
        let dir = self
            .archive
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(f.metadata().map(|m| m.len()).unwrap_or(0))
    }
}

impl Drop for ArchiveTemp {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Removes the temp files that killed backups to the archive named `fname` left in `dir`
/// (`.cmkfs-tmp.<fname>.<16 hex>`): a running backup holds an exclusive `flock` on its
/// own, so one that can be locked, and is not brand new, has no writer. Anything but a
/// regular file under such a name (a FIFO, a device, a symlink someone planted) is left
/// alone and never opened in a way that can block. Returns what was removed.
pub(super) fn remove_stale_temps(dir: &Path, fname: &str) -> Vec<PathBuf> {
    let prefix = format!("{TEMP_PREFIX}{fname}.");
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(rand) = name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
            continue;
        };
        if rand.len() != 16 || !rand.bytes().all(|b| b.is_ascii_hexdigit()) {
            continue;
        }
        // The entry's own type (not followed); checked again on the descriptor below, as
        // the name may be replaced in between.
        if !e.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        let p = e.path();
        // O_NONBLOCK: a FIFO swapped in after the check above cannot make open() wait for
        // a writer; O_NOFOLLOW: a symlink is not followed.
        let Ok(f) = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&p)
        else {
            continue;
        };
        let old = f
            .metadata()
            .ok()
            .filter(|m| m.is_file() && !m.file_type().is_fifo())
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age >= STALE_AFTER);
        if old
            && rustix::fs::flock(
                f.as_fd(),
                rustix::fs::FlockOperation::NonBlockingLockExclusive,
            )
            .is_ok()
            && std::fs::remove_file(&p).is_ok()
        {
            tracing::info!(path = %p.display(), "removed the temp file of a killed backup");
            out.push(p);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_unlocked_old_temp_files_of_the_same_archive_are_removed() {
        let d = tempfile::tempdir().unwrap();
        let old = std::time::SystemTime::now() - 2 * STALE_AFTER;
        let make = |name: &str, aged: bool| {
            let p = d.path().join(name);
            let f = File::create(&p).unwrap();
            if aged {
                f.set_modified(old).unwrap();
            }
            (p, f)
        };
        let (killed, _) = make(".cmkfs-tmp.a.tar.0123456789abcdef", true);
        let (running, rf) = make(".cmkfs-tmp.a.tar.fedcba9876543210", true);
        rustix::fs::flock(&rf, rustix::fs::FlockOperation::NonBlockingLockExclusive).unwrap();
        let (fresh, _) = make(".cmkfs-tmp.a.tar.00112233445566ff", false);
        let (other, _) = make(".cmkfs-tmp.b.tar.0123456789abcdef", true);
        let (odd, _) = make(".cmkfs-tmp.a.tar.not-hex", true);
        assert_eq!(remove_stale_temps(d.path(), "a.tar"), vec![killed.clone()]);
        assert!(!killed.exists());
        for p in [running, fresh, other, odd] {
            assert!(p.exists(), "{}", p.display());
        }
    }

    /// Round-3 attacker F6: a FIFO planted under a killed backup's temp name made the
    /// cleanup block in open() (waiting for a writer) — with the mount frozen. It is skipped
    /// at once, and left alone; so is a symlink to one.
    #[test]
    fn a_planted_fifo_or_symlink_is_skipped_without_blocking() {
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join(".cmkfs-tmp.a.tar.0123456789abcdef");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o666) }, 0);
        let link = d.path().join(".cmkfs-tmp.a.tar.fedcba9876543210");
        std::os::unix::fs::symlink(&fifo, &link).unwrap();
        // A hang here is the bug: the check runs in a thread with a time limit.
        let dir = d.path().to_path_buf();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(remove_stale_temps(&dir, "a.tar"));
        });
        let removed = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("remove_stale_temps blocked on a planted FIFO");
        assert!(removed.is_empty(), "{removed:?}");
        assert!(fifo.symlink_metadata().unwrap().file_type().is_fifo());
        assert!(link.symlink_metadata().unwrap().file_type().is_symlink());
        // The backup's own preparation goes on beside them.
        let t = ArchiveTemp::prepare(&d.path().join("a.tar")).unwrap();
        assert!(t.tmp.exists());
        let tmp = t.tmp.clone();
        drop(t);
        assert!(!tmp.exists(), "an uncommitted temp file is removed on drop");
    }
}
