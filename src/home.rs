//! Where cmkfs keeps its own state: `$CMKFS_HOME`, else `$XDG_DATA_HOME/cmkfs`, else
//! `~/.local/share/cmkfs`.

use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Why the home cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum HomeError {
    /// The home is not cmkfs's own private directory.
    #[error("cmkfs home {path} {why}: point $CMKFS_HOME at a directory of your own", path = .0.display(), why = .1)]
    Unsafe(PathBuf, String),
    /// It cannot be inspected or tightened.
    #[error("cmkfs home {path}: {err}", path = .0.display(), err = .1)]
    Io(PathBuf, io::Error),
}

/// The cmkfs state directory and the well-known places inside it.
#[derive(Clone, Debug)]
pub struct Home {
    root: PathBuf,
}

impl Home {
    /// Resolves the home from the environment (see the module docs).
    pub fn from_env() -> Home {
        let root = if let Some(h) = std::env::var_os("CMKFS_HOME").filter(|v| !v.is_empty()) {
            PathBuf::from(h)
        } else if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
            PathBuf::from(x).join("cmkfs")
        } else {
            let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
            PathBuf::from(home).join(".local/share/cmkfs")
        };
        Home { root }
    }

    /// A home at an explicit directory (tests, `--home`).
    pub fn at(root: impl Into<PathBuf>) -> Home {
        Home { root: root.into() }
    }

    /// Makes an existing home private before it is used: 0700, owned by the user running
    /// cmkfs. A home left 0755/0777 (by hand, or by an older cmkfs) is tightened; a directory
    /// that belongs to someone else, or a shared one (sticky, like `/tmp`), is refused rather
    /// than changed. A missing home is left alone: it is created 0700 when first written.
    pub fn secure(&self) -> Result<(), HomeError> {
        let meta = match std::fs::metadata(&self.root) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(HomeError::Io(self.root.clone(), e)),
        };
        if !meta.is_dir() {
            return Err(HomeError::Unsafe(
                self.root.clone(),
                "is not a directory".into(),
            ));
        }
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        if meta.uid() != me {
            return Err(HomeError::Unsafe(
                self.root.clone(),
                format!("belongs to uid {}, not to you (uid {me})", meta.uid()),
            ));
        }
        if meta.mode() & libc::S_ISVTX != 0 {
            return Err(HomeError::Unsafe(
                self.root.clone(),
                "is a shared directory (sticky bit, like /tmp)".into(),
            ));
        }
        if meta.mode() & 0o077 != 0 {
            std::fs::set_permissions(&self.root, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| HomeError::Io(self.root.clone(), e))?;
        }
        Ok(())
    }

    /// The home directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The embedded (`local:`) vault's store.
    pub fn vault_dir(&self) -> PathBuf {
        self.root.join("vault")
    }

    /// The event log: one JSON line per state change of any mount.
    pub fn events_path(&self) -> PathBuf {
        self.root.join("events.jsonl")
    }

    /// Records of live mounts (status files, logs).
    pub fn run_dir(&self) -> PathBuf {
        self.root.join("run")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loose_home_is_tightened_and_a_shared_one_refused() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("home");
        Home::at(&root).secure().unwrap();
        assert!(
            !root.exists(),
            "a missing home is created on first write, not here"
        );
        std::fs::create_dir(&root).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o777)).unwrap();
        Home::at(&root).secure().unwrap();
        let mode = std::fs::metadata(&root).unwrap().mode() & 0o7777;
        assert_eq!(mode, 0o700);
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let e = Home::at(&root).secure().unwrap_err().to_string();
        assert!(e.contains("shared directory"), "{e}");
    }
}
