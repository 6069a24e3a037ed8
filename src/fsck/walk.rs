//! The walk over the backing tree: directories, entries, file headers and formats, symlinks,
//! names (short and long) and leftover temp files.

use super::*;

impl Checker {
    /// Checks backing directory `dir` and everything below it. Returns why the directory
    /// itself must go to the quarantine (its id is lost and it holds entries whose names need
    /// it), if it must: the caller, which knows its name and side file, records and moves it.
    pub(super) fn check_dir(
        &mut self,
        dir: &Path,
        plain: Option<&Path>,
    ) -> Option<(ProblemKind, String)> {
        if let Err(e) = self.enter(dir) {
            self.walk_complete = false;
            self.problem(
                ProblemKind::Unreadable,
                dir,
                plain.map(Path::to_path_buf),
                None,
                format!("cannot open the directory (it is no longer a directory?): {e}"),
                Fix::None,
                None,
            );
            return None;
        }
        self.depth += 1;
        let verdict = self.check_dir_entries(dir, plain);
        self.depth -= 1;
        self.deep.remove(dir);
        verdict
    }

    pub(super) fn check_dir_entries(
        &mut self,
        dir: &Path,
        plain: Option<&Path>,
    ) -> Option<(ProblemKind, String)> {
        self.report.counts.directories += 1;
        let is_root = dir == self.root;
        let mut entries: Vec<OsString> = match fs::read_dir(self.io(dir)) {
            Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.file_name())).collect(),
            Err(e) => {
                self.walk_complete = false;
                self.problem(
                    ProblemKind::Unreadable,
                    dir,
                    plain.map(Path::to_path_buf),
                    None,
                    format!("cannot list the directory: {e}"),
                    Fix::None,
                    None,
                );
                return None;
            }
        };
        entries.sort();
        let present: BTreeSet<OsString> = entries.iter().cloned().collect();
        let holds_names = entries
            .iter()
            .any(|n| names::classify(n) != EntryKind::Hidden);

        // The directory id: without it no name in here can be decrypted.
        let mut verdict = None;
        let id: Option<DirId> = match read_dir_id(&self.io(dir)) {
            Ok(id) => Some(id),
            Err((kind, why)) if !holds_names => {
                self.problem(
                    kind,
                    &dir.join(DIRID_FILE),
                    None,
                    plain,
                    format!("{why}; the directory holds no entries, so a fresh id loses nothing"),
                    Fix::Recreate,
                    None,
                );
                None
            }
            Err((kind, why)) if is_root => {
                self.problem(
                    kind,
                    &dir.join(DIRID_FILE),
                    None,
                    plain,
                    format!("{why}; the names in the root cannot be decrypted"),
                    Fix::None,
                    None,
                );
                None
            }
            Err((kind, why)) => {
                verdict = Some((
                    kind,
                    format!(
                        "{why}; the names of its entries cannot be decrypted, so the directory \
                         goes to the quarantine with everything in it"
                    ),
                ));
                None
            }
        };

        for name in &entries {
            let path = dir.join(name);
            let b = name.as_bytes();
            if b == DIRID_FILE.as_bytes() {
                continue;
            }
            if is_root
                && (b == HEADER_FILE.as_bytes()
                    || b == QUARANTINE_DIR.as_bytes()
                    || b == crate::volume::lock::LOCK_FILE.as_bytes())
            {
                continue;
            }
            if is_root && b == crate::volume::reencrypt::JOURNAL_FILE.as_bytes() {
                self.problem(
                    ProblemKind::ReencryptInProgress,
                    &path,
                    None,
                    plain,
                    "a re-encryption under a new DEK is in progress or was interrupted; \
                     `cmkfs volume reencrypt` resumes it (the volume mounts meanwhile)"
                        .into(),
                    Fix::None,
                    None,
                );
                continue;
            }
            if is_root && b == JOURNAL_FILE.as_bytes() {
                if let Some(why) = self.unusable_upgrade_journal() {
                    self.problem(
                        ProblemKind::UpgradeJournalUnusable,
                        &path,
                        None,
                        plain,
                        format!(
                            "{why}; mounts and `cmkfs upgrade` refuse the volume while it is \
                             there; `cmkfs fsck --repair` moves it to the quarantine (then \
                             `cmkfs fsck` checks the files it may have named)"
                        ),
                        Fix::Quarantine,
                        None,
                    );
                    continue;
                }
                self.problem(
                    ProblemKind::UpgradeInterrupted,
                    &path,
                    None,
                    plain,
                    "an upgrade to format v2 was interrupted; `cmkfs upgrade` (or a mount) \
                     restores the files it was converting and finishes it"
                        .into(),
                    Fix::None,
                    None,
                );
                continue;
            }
            // Long symlink targets are checked after the walk (they need every symlink seen);
            // a rename's marker is checked with its directory (check_entry).
            if (is_root && b.starts_with(LONG_TARGET_PREFIX.as_bytes()))
                || b == REPLACED_MARKER.as_bytes()
            {
                continue;
            }
            if b.starts_with(TEMP_PREFIX.as_bytes()) {
                if is_root && b.starts_with(format!("{TEMP_PREFIX}{HEADER_FILE}.").as_bytes()) {
                    continue; // handled with the header
                }
                self.check_temp(&path, name, plain);
                continue;
            }
            match names::classify(name) {
                EntryKind::Hidden => {
                    if b.starts_with(LONG_PREFIX.as_bytes()) && b.ends_with(LONG_SUFFIX.as_bytes())
                    {
                        let entry = &b[..b.len() - LONG_SUFFIX.len()];
                        if !present.contains(OsStr::from_bytes(entry)) {
                            self.problem(
                                ProblemKind::LongNameOrphanSideFile,
                                &path,
                                None,
                                plain,
                                "long-name side file without its entry (left by an interrupted \
                                 create, rename or unlink)"
                                    .into(),
                                Fix::Remove,
                                None,
                            );
                        }
                    } else {
                        self.problem(
                            ProblemKind::UnknownEntry,
                            &path,
                            None,
                            plain,
                            "not part of the cmkfs format (hidden from the plaintext view); \
                             left alone"
                                .into(),
                            Fix::None,
                            None,
                        );
                    }
                }
                EntryKind::Encrypted | EntryKind::Long => {
                    self.check_entry(dir, &path, name, id.as_ref(), plain);
                }
            }
        }
        verdict
    }

    /// Checks one entry with an encrypted (or long) name: the name, then the object.
    pub(super) fn check_entry(
        &mut self,
        dir: &Path,
        path: &Path,
        name: &OsStr,
        id: Option<&DirId>,
        plain_dir: Option<&Path>,
    ) {
        let long = names::classify(name) == EntryKind::Long;
        let side = long.then(|| dir.join(names::side_file_of(name)));
        if long {
            self.report.counts.long_names += 1;
        }
        let name_check = self.check_name(name, side.as_deref(), id);
        let plaintext: Option<PathBuf> = match (&name_check, plain_dir) {
            (NameCheck::Good(Some(n)), Some(d)) => Some(d.join(n)),
            _ => None,
        };
        let meta = match fs::symlink_metadata(self.io(path)) {
            Ok(m) => m,
            Err(e) => {
                self.problem(
                    ProblemKind::Unreadable,
                    path,
                    plaintext,
                    plain_dir,
                    format!("cannot stat: {e}"),
                    Fix::None,
                    None,
                );
                return;
            }
        };
        // The object's own problem, if any. Checked before anything moves: a directory is
        // walked (and repaired inside) before it may go to the quarantine.
        let ft = meta.file_type();
        if ft.is_dir() && self.replaced_leftover(path, side.as_deref(), plain_dir) {
            return;
        }
        let object_problem: Option<(ProblemKind, String)> =
            if ft.is_dir() && self.depth >= MAX_DEPTH {
                // Recursing further would only risk the stack: report where the check stops.
                self.walk_complete = false;
                self.problem(
                    ProblemKind::TooDeep,
                    path,
                    plaintext.clone(),
                    plain_dir,
                    format!(
                    "directories nest more than {MAX_DEPTH} levels deep here: not checked below \
                     (a tree this deep is usually a directory a writer of the backing store \
                     copied into itself)"
                ),
                    Fix::None,
                    None,
                );
                None
            } else if ft.is_dir() {
                self.check_dir(path, plaintext.as_deref())
            } else if ft.is_file() {
                self.report.counts.files += 1;
                self.check_data_file(path, meta.len(), plaintext.as_deref(), plain_dir)
            } else if ft.is_symlink() {
                self.report.counts.symlinks += 1;
                self.check_symlink(path)
            } else {
                // FIFOs, sockets, device nodes: they hold no data.
                self.report.counts.special += 1;
                None
            };

        self.check_xattrs(path, plaintext.as_deref(), plain_dir);

        // A bad name sends the entry (and its side file) to the quarantine.
        let mut moved_with_name: Option<(bool, Option<PathBuf>)> = None;
        if let NameCheck::Bad(kind, detail) = name_check {
            self.problem(
                kind,
                path,
                None,
                plain_dir,
                detail,
                Fix::Quarantine,
                side.as_deref(),
            );
            moved_with_name = self
                .report
                .problems
                .last()
                .map(|p| (p.repaired, p.moved_to.clone()));
        }
        let Some((kind, detail)) = object_problem else {
            return;
        };
        match moved_with_name {
            // Same entry, same move: record the second finding without moving twice.
            Some((repaired, moved_to)) => self.report.problems.push(Problem {
                kind,
                severity: Severity::Error,
                backing: self.rel(path),
                plaintext: None,
                plaintext_dir: plain_dir.map(Path::to_path_buf),
                detail: format!("{detail} (goes to the quarantine with its name)"),
                fix: Fix::Quarantine,
                repaired,
                moved_to,
                repair_error: None,
            }),
            None => {
                let fix = if kind == ProblemKind::Unreadable {
                    Fix::None
                } else {
                    Fix::Quarantine
                };
                self.problem(
                    kind,
                    path,
                    plaintext,
                    plain_dir,
                    detail,
                    fix,
                    side.as_deref(),
                );
            }
        }
    }

    /// Checks that a symlink's target decrypts (with the key); a long target's side file
    /// must exist (and is noted as used).
    pub(super) fn check_symlink(&mut self, path: &Path) -> Option<(ProblemKind, String)> {
        let stored = match fs::read_link(self.io(path)) {
            Ok(t) => t.into_os_string(),
            Err(e) => {
                return Some((
                    ProblemKind::Unreadable,
                    format!("cannot read the link: {e}"),
                ))
            }
        };
        let sealed = match long_target_ref(stored.as_bytes()) {
            Some(side) => {
                self.targets_used.insert(side.to_os_string());
                let p = self.root.join(side);
                match fs::symlink_metadata(&p) {
                    Ok(m) if m.is_file() && m.len() <= 32 + MAX_TARGET as u64 => {}
                    _ => {
                        return Some((
                            ProblemKind::SymlinkUndecryptable,
                            format!(
                                "the long target's side file {} is missing or not a small file",
                                side.to_string_lossy()
                            ),
                        ))
                    }
                }
                self.keys.as_ref()?;
                sys::read_bounded(&p, 32 + MAX_TARGET).ok()
            }
            None => {
                self.keys.as_ref()?;
                B64URL.decode(stored.as_bytes()).ok()
            }
        };
        let keys = self.keys.as_ref()?;
        // While a re-encryption is in progress a target may still be under the retiring key.
        let ok = sealed.is_some_and(|s| {
            names::open_target(&keys.names, &s).is_ok()
                || keys
                    .retiring
                    .as_deref()
                    .is_some_and(|r| names::open_target(&r.names, &s).is_ok())
        });
        (!ok).then(|| {
            (
                ProblemKind::SymlinkUndecryptable,
                "the symlink target does not decrypt".into(),
            )
        })
    }

    /// A directory marked by an interrupted rename over an empty directory: removed with its
    /// name's side file when nothing of the user's is inside; otherwise only the marker goes
    /// (the directory stays, as it is visible). Returns whether the directory was handled.
    pub(super) fn replaced_leftover(
        &mut self,
        path: &Path,
        side: Option<&Path>,
        plain_dir: Option<&Path>,
    ) -> bool {
        let marker = path.join(REPLACED_MARKER);
        if fs::symlink_metadata(self.io(&marker)).is_err() {
            return false;
        }
        let empty = path.as_os_str().len() <= LONG_PATH
            && fs::read_dir(path).is_ok_and(|rd| {
                rd.filter_map(|e| e.ok())
                    .all(|e| names::classify(&e.file_name()) == EntryKind::Hidden)
            });
        if empty {
            self.problem(
                ProblemKind::ReplacedDirLeftover,
                path,
                None,
                plain_dir,
                "an empty directory a rename replaced, left by a crash before its removal".into(),
                Fix::Remove,
                None,
            );
            if let Some(side) = side {
                if self.repair && self.report.problems.last().is_some_and(|p| p.repaired) {
                    let _ = remove_any(&self.io(side));
                }
            }
            return true;
        }
        self.problem(
            ProblemKind::ReplacedDirLeftover,
            &marker,
            None,
            plain_dir,
            "marker of an interrupted rename over an empty directory, but the directory holds \
             entries now: only the marker goes"
                .into(),
            Fix::Remove,
            None,
        );
        false
    }

    /// Long targets' side files at the root that no symlink refers to (only decided after a
    /// complete walk).
    pub(super) fn check_long_targets(&mut self) {
        if !self.walk_complete {
            return;
        }
        let Ok(rd) = fs::read_dir(&self.root) else {
            return;
        };
        let mut orphans: Vec<OsString> = rd
            .filter_map(|e| e.ok().map(|e| e.file_name()))
            .filter(|n| long_target_ref(n.as_bytes()).is_some() && !self.targets_used.contains(n))
            .collect();
        orphans.sort();
        for n in orphans {
            let p = self.root.join(&n);
            self.problem(
                ProblemKind::LongTargetOrphan,
                &p,
                None,
                Some(Path::new("/")),
                "long symlink target without its symlink (left by an interrupted symlink or \
                 unlink)"
                    .into(),
                Fix::Remove,
                None,
            );
        }
    }

    /// Checks an entry's name: the long-name side file, and with the key, decryption.
    pub(super) fn check_name(
        &self,
        name: &OsStr,
        side: Option<&Path>,
        id: Option<&DirId>,
    ) -> NameCheck {
        let encoded: Vec<u8> = match side {
            None => name.as_bytes().to_vec(),
            Some(side) => match sys::read_bounded(&self.io(side), MAX_SIDE_FILE) {
                Ok(full) => {
                    if !names::long_name_matches(name, &full) {
                        return NameCheck::Bad(
                            ProblemKind::LongNameHashMismatch,
                            "the long-name side file belongs to another name (its hash does not \
                             match the entry)"
                                .into(),
                        );
                    }
                    if !names::is_long_encoding(&full) {
                        return NameCheck::Bad(
                            ProblemKind::LongNameNotCanonical,
                            "long-name entry for a name whose encoding fits a plain entry: \
                             cmkfs never writes one (planted); hidden from listings"
                                .into(),
                        );
                    }
                    full
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return NameCheck::Bad(
                        ProblemKind::LongNameSideFileMissing,
                        "long-name entry without its side file: its name is lost".into(),
                    )
                }
                Err(e) => {
                    return NameCheck::Bad(
                        ProblemKind::LongNameSideFileMissing,
                        format!("the long-name side file cannot be read: {e}"),
                    )
                }
            },
        };
        let (Some(keys), Some(id)) = (&self.keys, id) else {
            return NameCheck::Good(None);
        };
        // During a re-encryption's names phase a name may still be under the retiring key.
        let retiring = keys.retiring.as_deref().map(|r| &r.names);
        match names::decrypt(&keys.names, id, &encoded)
            .or_else(|e| retiring.map_or(Err(e), |r| names::decrypt(r, id, &encoded)))
        {
            Ok(n) => NameCheck::Good(Some(n)),
            Err(_) => NameCheck::Bad(
                ProblemKind::NameUndecryptable,
                "the name does not decrypt in this directory (damaged, or moved here from \
                 another directory or volume)"
                    .into(),
            ),
        }
    }

    /// A `.cmkfs-tmp.*` entry outside the header's: an interrupted `mkdir` or atomic update.
    pub(super) fn check_temp(&mut self, path: &Path, name: &OsStr, plain_dir: Option<&Path>) {
        let rest = &name.as_bytes()[TEMP_PREFIX.len()..];
        let meta = match fs::symlink_metadata(self.io(path)) {
            Ok(m) => m,
            Err(_) => return, // gone meanwhile
        };
        if meta.is_dir() {
            if rest.starts_with(b"mkdir.") {
                // mkdir builds a directory here, writes its id, then renames it into place;
                // until the rename the mkdir has not happened. Undo it, unless something
                // besides the id got in (then keep it in the quarantine).
                let only_id = fs::read_dir(self.io(path))
                    .map(|rd| {
                        rd.filter_map(|e| e.ok())
                            .all(|e| e.file_name() == DIRID_FILE)
                    })
                    .unwrap_or(false);
                let (fix, detail) = if only_id {
                    (
                        Fix::Remove,
                        "temp directory of an interrupted mkdir (never renamed into place, so \
                         the mkdir did not happen); holds nothing but its id"
                            .to_string(),
                    )
                } else {
                    (
                        Fix::Quarantine,
                        "temp directory of an interrupted mkdir with unexpected contents".into(),
                    )
                };
                self.problem(
                    ProblemKind::MkdirTempDir,
                    path,
                    None,
                    plain_dir,
                    detail,
                    fix,
                    None,
                );
            } else if rest.starts_with(b"rmdir.")
                && crate::volume::is_dead_temp_dir(&self.io(path), name)
            {
                // rmdir renames the directory here, then takes it apart: only metadata is left.
                self.problem(
                    ProblemKind::TempFile,
                    path,
                    None,
                    plain_dir,
                    "an interrupted rmdir: the directory was already gone from view; only its \
                     metadata is left"
                        .into(),
                    Fix::Remove,
                    None,
                );
            } else {
                self.problem(
                    ProblemKind::TempFile,
                    path,
                    None,
                    plain_dir,
                    "temp directory of an unknown kind of update".into(),
                    Fix::Quarantine,
                    None,
                );
            }
            return;
        }
        // write_atomic's temp files are `.cmkfs-tmp.<target name>.<random hex>`.
        let target = rest
            .iter()
            .rposition(|b| *b == b'.')
            .map(|i| &rest[..i])
            .unwrap_or(rest);
        let is_side = (target.starts_with(LONG_PREFIX.as_bytes())
            && target.ends_with(LONG_SUFFIX.as_bytes()))
            || long_target_ref(target).is_some();
        if meta.is_file() && target == crate::volume::reencrypt::JOURNAL_FILE.as_bytes() {
            self.problem(
                ProblemKind::TempFile,
                path,
                None,
                plain_dir,
                "temp file of a re-encryption journal that was never put in place".into(),
                Fix::Remove,
                None,
            );
        } else if meta.file_type().is_symlink() && target == b"symlink" {
            self.problem(
                ProblemKind::TempFile,
                path,
                None,
                plain_dir,
                "new symlink of an interrupted re-encryption, never renamed into place (the \
                 original is intact)"
                    .into(),
                Fix::Remove,
                None,
            );
        } else if meta.is_file() && target == JOURNAL_FILE.as_bytes() {
            self.problem(
                ProblemKind::TempFile,
                path,
                None,
                plain_dir,
                "temp file of an upgrade journal that was never put in place (no file was \
                 changed under it)"
                    .into(),
                Fix::Remove,
                None,
            );
        } else if meta.is_file() && is_side {
            self.problem(
                ProblemKind::TempFile,
                path,
                None,
                plain_dir,
                "temp file of an interrupted side-file update (a long name or a long symlink \
                 target; the update never took effect)"
                    .into(),
                Fix::Remove,
                None,
            );
        } else {
            self.problem(
                ProblemKind::TempFile,
                path,
                None,
                plain_dir,
                "temp file of an unknown kind of update; kept in the quarantine".into(),
                Fix::Quarantine,
                None,
            );
        }
    }
}
