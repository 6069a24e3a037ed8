//! The temp directories of a restore (`.<target>.cmkfs-restore.<16 hex>` beside the target):
//! how they are named, how a running restore is told from a killed one (the running one
//! holds the volume lock on its temp directory exclusive; the lock dies with its process),
//! and how a killed one's are removed. `cmkfs restore` removes them before it starts;
//! `cmkfs fsck` reports them.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::volume::lock::{LockError, VolumeLock};

/// What separates the target's name from the random part.
const MARK: &str = ".cmkfs-restore.";

/// A new temp directory name for a restore into the directory named `target_name`.
pub fn temp_name(target_name: &str) -> String {
    format!(".{target_name}{MARK}{}", super::random_hex())
}

/// The target name a temp directory name belongs to, if it is one.
pub fn target_name_of(temp_name: &str) -> Option<&str> {
    let rest = temp_name.strip_prefix('.')?;
    let at = rest.rfind(MARK)?;
    let random = &rest[at + MARK.len()..];
    (random.len() == 16 && random.bytes().all(|b| b.is_ascii_hexdigit()) && at > 0)
        .then(|| &rest[..at])
}

/// A restore's temp directory beside a target.
#[derive(Debug)]
pub struct Leftover {
    /// Its path.
    pub path: PathBuf,
    /// Whether a restore is still working in it (its lock is held).
    pub running: bool,
}

/// The temp directories of restores into `target` (an absolute path).
pub fn find(target: &Path) -> io::Result<Vec<Leftover>> {
    let (Some(parent), Some(name)) = (target.parent(), target.file_name()) else {
        return Ok(Vec::new());
    };
    let name = name.to_string_lossy();
    let rd = match fs::read_dir(parent) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for e in rd {
        let e = e?;
        let n = e.file_name();
        let n = n.to_string_lossy();
        if target_name_of(&n) != Some(&*name) || !e.file_type()?.is_dir() {
            continue;
        }
        let path = e.path();
        let running = matches!(VolumeLock::exclusive(&path), Err(LockError::Busy { .. }));
        out.push(Leftover { path, running });
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// Removes the temp directory `path` of a restore that is no longer running (its lock is
/// taken, and held while it goes). Returns `false`, removing nothing, when a restore still
/// works in it.
pub fn remove(path: &Path) -> io::Result<bool> {
    let _lock = match VolumeLock::exclusive(path) {
        Ok(l) => l,
        Err(LockError::Busy { .. }) => return Ok(false),
        Err(LockError::Io { error, .. }) => return Err(error),
    };
    if fs::remove_dir_all(path).is_err() {
        // Directories restored read-only (only a final tree gets its modes, but a kill may
        // come after that): make them writable, then again.
        make_writable(path)?;
        fs::remove_dir_all(path)?;
    }
    if let Some(p) = path.parent() {
        crate::fsutil::sync_dir(p)?;
    }
    Ok(true)
}

fn make_writable(dir: &Path) -> io::Result<()> {
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    for e in fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            make_writable(&e.path())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_names_name_their_target_and_nothing_else() {
        let t = temp_name("vol.b");
        assert_eq!(target_name_of(&t), Some("vol.b"));
        assert_eq!(target_name_of(".vol.cmkfs-restore.0123456789abcdeZ"), None);
        assert_eq!(target_name_of(".cmkfs-restore.0123456789abcdef"), None);
        assert_eq!(target_name_of("vol.cmkfs-restore.0123456789abcdef"), None);
        assert_eq!(
            target_name_of(".a.cmkfs-restore.x.cmkfs-restore.0123456789abcdef"),
            Some("a.cmkfs-restore.x")
        );
    }
}
