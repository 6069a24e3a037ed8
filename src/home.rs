//! Where cmkfs keeps its own state: `$CMKFS_HOME`, else `$XDG_DATA_HOME/cmkfs`, else
//! `~/.local/share/cmkfs`.

use std::path::{Path, PathBuf};

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
