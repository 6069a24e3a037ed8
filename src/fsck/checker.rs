//! The checker's state and the bookkeeping every check shares: paths, problems, the
//! quarantine and its manifest.

use super::*;

/// How an entry's name turned out.
pub(super) enum NameCheck {
    /// Decrypted (or not checked: no key): the plaintext name when known.
    Good(Option<OsString>),
    /// Wrong: the problem to record; the entry goes to the quarantine.
    Bad(ProblemKind, String),
}

pub(super) struct Checker {
    pub(super) root: PathBuf,
    pub(super) repair: bool,
    pub(super) keys: Option<VolumeKeys>,
    /// The volume header's format version and unit size, when it could be read.
    pub(super) format: Option<(u32, u64)>,
    /// This run's quarantine batch, created on first use.
    pub(super) batch: Option<PathBuf>,
    /// (backing path relative to the root, kind, detail) of everything quarantined, for the
    /// manifest.
    pub(super) quarantined: Vec<(PathBuf, ProblemKind, String)>,
    /// (backing path, backing xattr name, raw value) of xattrs set aside by a repair.
    pub(super) xattrs: Vec<(PathBuf, OsString, Vec<u8>)>,
    /// The directories being checked (the one in hand and its ancestors), held open: their
    /// entries are reached as `/proc/self/fd/N/name` (see [`Checker::io`]).
    pub(super) deep: std::collections::HashMap<PathBuf, std::os::fd::OwnedFd>,
    /// Long-target side files some symlink refers to.
    pub(super) targets_used: BTreeSet<OsString>,
    /// Whether every directory could be listed (orphans are only decided then).
    pub(super) walk_complete: bool,
    /// Directory levels entered (the root is 1), at most [`MAX_DEPTH`].
    pub(super) depth: usize,
    pub(super) report: Report,
}

impl Checker {
    /// The path to use for system calls on `p`: `p` itself, or for an entry of a deep
    /// directory, `/proc/self/fd/N/<name>` through the directory's descriptor (no length
    /// limit beyond one name; nothing on the way is a symlink we follow: the descriptors
    /// were opened with O_NOFOLLOW).
    pub(super) fn io(&self, p: &Path) -> PathBuf {
        use std::os::fd::AsRawFd;
        if let Some(fd) = self.deep.get(p) {
            return PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
        }
        match (p.parent(), p.file_name()) {
            (Some(dir), Some(name)) => match self.deep.get(dir) {
                Some(fd) => PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd())).join(name),
                None => p.to_path_buf(),
            },
            _ => p.to_path_buf(),
        }
    }

    /// Holds `dir` open (`O_PATH|O_NOFOLLOW`, through its parent's descriptor) while it is
    /// checked, so that [`Checker::io`] reaches everything inside it through that descriptor:
    /// a directory swapped for a symlink while fsck runs cannot lead it (or `--repair`)
    /// outside the volume, and long paths need no length check.
    pub(super) fn enter(&mut self, dir: &Path) -> io::Result<()> {
        if self.deep.contains_key(dir) {
            return Ok(());
        }
        let mut flags =
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC;
        // The root is the path the user named (it may be a symlink they chose).
        if dir != self.root {
            flags |= rustix::fs::OFlags::NOFOLLOW;
        }
        let fd = rustix::fs::open(self.io(dir).as_path(), flags, rustix::fs::Mode::empty())?;
        self.deep.insert(dir.to_path_buf(), fd);
        Ok(())
    }

    pub(super) fn rel(&self, p: &Path) -> PathBuf {
        match p.strip_prefix(&self.root) {
            Ok(r) if r.as_os_str().is_empty() => PathBuf::from("."),
            Ok(r) => r.to_path_buf(),
            Err(_) => p.to_path_buf(),
        }
    }

    /// Records a problem and, when repairing, applies `fix` to `path` (plus `also`, e.g. a
    /// long name's side file that goes to the quarantine with its entry).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn problem(
        &mut self,
        kind: ProblemKind,
        path: &Path,
        plaintext: Option<PathBuf>,
        plaintext_dir: Option<&Path>,
        detail: String,
        fix: Fix,
        also: Option<&Path>,
    ) {
        let severity = match kind {
            ProblemKind::UnknownEntry
            | ProblemKind::FormatV1
            | ProblemKind::V1TailHole
            | ProblemKind::FileFormatV2
            | ProblemKind::ReencryptInProgress
            | ProblemKind::QuarantineNotEmpty => Severity::Warning,
            _ => Severity::Error,
        };
        let mut p = Problem {
            kind,
            severity,
            backing: self.rel(path),
            plaintext,
            plaintext_dir: plaintext_dir.map(Path::to_path_buf),
            detail,
            fix,
            repaired: false,
            moved_to: None,
            repair_error: None,
        };
        if self.repair && severity == Severity::Error {
            let io_path = self.io(path);
            let result = match fix {
                Fix::Remove => remove_any(&io_path),
                Fix::Quarantine => self.quarantine(path, kind, &p.detail).map(|to| {
                    p.moved_to = Some(self.rel(&to));
                    if let Some(side) = also.filter(|s| s.exists()) {
                        if let Err(e) = self.quarantine(side, kind, &p.detail) {
                            tracing::warn!(path = %side.display(), error = %e, "could not quarantine a side file");
                        }
                    }
                }),
                Fix::Recreate => write_fresh_dir_id(&io_path),
                // Restores are applied where they are decided (they need the header).
                Fix::Restore => Ok(()),
                Fix::None => Err(io::Error::other("cannot be repaired automatically")),
            };
            match result {
                Ok(()) => p.repaired = true,
                Err(e) => p.repair_error = Some(e.to_string()),
            }
        }
        self.report.problems.push(p);
    }

    /// Moves `path` into this run's quarantine batch under its relative backing path.
    pub(super) fn quarantine(
        &mut self,
        path: &Path,
        kind: ProblemKind,
        detail: &str,
    ) -> io::Result<PathBuf> {
        let batch = match &self.batch {
            Some(b) => b.clone(),
            None => {
                let b = new_batch(&self.root)?;
                self.report.quarantine = Some(self.rel(&b));
                self.batch = Some(b.clone());
                b
            }
        };
        let rel = self.rel(path);
        let to = batch.join(&rel);
        if let Some(parent) = to.parent() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)?;
        }
        rename_noreplace(&self.io(path), &to)?;
        self.quarantined.push((rel, kind, detail.to_string()));
        Ok(to)
    }

    /// Writes the quarantine batch's manifest: what was moved and why, in backing terms only;
    /// and the raw extended attributes set aside.
    pub(super) fn write_manifest(&mut self) {
        if !self.xattrs.is_empty() && self.batch.is_none() {
            match new_batch(&self.root) {
                Ok(b) => {
                    self.report.quarantine = Some(self.rel(&b));
                    self.batch = Some(b);
                }
                Err(e) => tracing::warn!(error = %e, "could not create a quarantine batch"),
            }
        }
        let Some(batch) = self.batch.clone() else {
            return;
        };
        if !self.xattrs.is_empty() {
            let items: Vec<serde_json::Value> = self
                .xattrs
                .iter()
                .map(|(rel, name, value)| {
                    serde_json::json!({
                        "backing": rel,
                        "xattr": name.to_string_lossy(),
                        "value_base64": base64::engine::general_purpose::STANDARD.encode(value),
                    })
                })
                .collect();
            let path = batch.join(XATTRS_FILE);
            let bytes = serde_json::to_vec_pretty(&items).unwrap_or_default();
            if let Err(e) = fsutil::write_atomic(&path, &bytes, 0o600) {
                tracing::warn!(path = %path.display(), error = %e, "could not save the set-aside xattrs");
            }
        }
        let items: Vec<serde_json::Value> = self
            .quarantined
            .iter()
            .map(|(rel, kind, detail)| {
                serde_json::json!({ "backing": rel, "kind": kind, "detail": detail })
            })
            .collect();
        let doc = serde_json::json!({
            "schema": REPORT_SCHEMA,
            "volume_id": self.report.volume_id,
            "time": crate::keyring::rfc3339(SystemTime::now()),
            "items": items,
            "restore": "move an item back to its backing path (or under a new name) to make it visible again",
        });
        let path = batch.join(MANIFEST_FILE);
        let bytes = serde_json::to_vec_pretty(&doc).unwrap_or_default();
        if let Err(e) = fsutil::write_atomic(&path, &bytes, 0o600) {
            tracing::warn!(path = %path.display(), error = %e, "could not write the quarantine manifest");
        }
    }
}
