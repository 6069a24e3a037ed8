//! The volume header: structure, key, DEK fingerprint and MAC, leftovers of header updates.

use super::*;

impl Checker {
    pub(super) fn check_header(&mut self, vault: Option<VaultOpener<'_>>) -> Result<(), FsckError> {
        let root = self.root.clone();
        let header_path = root.join(HEADER_FILE);
        let temps = header_temps(&root)?;
        // Why the main header cannot be used (None = it can).
        let trouble: Option<(ProblemKind, String)> = match VolumeHeader::read(&root) {
            Ok(h) => {
                self.report.volume_id = Some(h.volume_id.clone());
                self.format = Some((h.format_version, h.sector_size as u64));
                if h.format_version < FORMAT_V2 {
                    self.problem(
                        ProblemKind::FormatV1,
                        &header_path,
                        None,
                        None,
                        format!(
                            "the volume is in on-disk format v{}; `cmkfs upgrade` (or a mount) \
                             converts it to v{FORMAT_V2} in place",
                            h.format_version
                        ),
                        Fix::None,
                        None,
                    );
                }
                match vault {
                    None => None,
                    Some(open) => match self.unlock(open, &h)? {
                        Ok(keys) => {
                            self.keys = Some(keys);
                            self.report.keys = KeyCheck::Verified;
                            None
                        }
                        Err(t) => Some(t),
                    },
                }
            }
            Err(VolumeError::NotAVolume(_)) => {
                if !root.join(DIRID_FILE).exists() && temps.is_empty() {
                    return Err(FsckError::NotAVolume(root));
                }
                Some((
                    ProblemKind::HeaderMissing,
                    format!("{HEADER_FILE} is missing"),
                ))
            }
            Err(VolumeError::CorruptHeader { why, .. }) => Some((ProblemKind::HeaderCorrupt, why)),
            Err(VolumeError::Io { path, error }) => return Err(FsckError::Io { path, error }),
            Err(e) => Some((ProblemKind::HeaderCorrupt, e.to_string())),
        };

        let Some((kind, why)) = trouble else {
            // The header is fine: any temp copy is an update that never took effect.
            for t in temps {
                self.problem(
                    ProblemKind::HeaderTempFile,
                    &t,
                    None,
                    None,
                    "temp file of an interrupted header update (the header itself is intact)"
                        .into(),
                    Fix::Remove,
                    None,
                );
            }
            return Ok(());
        };

        // The header is unusable: a temp copy that unwraps and verifies is the update that was
        // interrupted right before its rename, and can take its place.
        if vault.is_some() {
            self.report.keys = KeyCheck::HeaderUnusable;
        }
        let mut restore: Option<(PathBuf, VolumeHeader, VolumeKeys)> = None;
        if let Some(open) = vault {
            let mut candidates: Vec<(SystemTime, PathBuf)> = temps
                .iter()
                .map(|t| {
                    let m = fs::metadata(t)
                        .and_then(|m| m.modified())
                        .unwrap_or(SystemTime::UNIX_EPOCH);
                    (m, t.clone())
                })
                .collect();
            // Newest first.
            candidates.sort_by_key(|c| std::cmp::Reverse(c.0));
            for (_, t) in candidates {
                let Some(h) = parse_header_file(&t) else {
                    continue;
                };
                if let Ok(Ok(keys)) = self.unlock(open, &h) {
                    restore = Some((t, h, keys));
                    break;
                }
            }
        }
        match restore {
            Some((tmp, h, keys)) => {
                let detail = format!(
                    "{why}; {} holds a complete header that unwraps and verifies",
                    self.rel(&tmp).display()
                );
                let idx = self.report.problems.len();
                self.problem(kind, &header_path, None, None, detail, Fix::Restore, None);
                if self.repair {
                    let done =
                        fs::rename(&tmp, &header_path).and_then(|()| fsutil::sync_dir(&root));
                    let p = &mut self.report.problems[idx];
                    match done {
                        Ok(()) => p.repaired = true,
                        Err(e) => {
                            p.repaired = false;
                            p.repair_error = Some(e.to_string());
                        }
                    }
                }
                self.report.volume_id = Some(h.volume_id.clone());
                self.keys = Some(keys);
                self.report.keys = KeyCheck::Verified;
                for t in temps.into_iter().filter(|t| *t != tmp) {
                    self.problem(
                        ProblemKind::HeaderTempFile,
                        &t,
                        None,
                        None,
                        "temp file of an interrupted header update".into(),
                        Fix::Remove,
                        None,
                    );
                }
            }
            None => {
                // Nothing in a header is acted on before its DEK has verified it: the format
                // it states may be the damage, and checking files against it would set every
                // intact file aside.
                let why = if vault.is_some() && self.format.take().is_some() {
                    format!(
                        "{why}; the files were not checked against the format it states \
                         (nothing was moved): put back `{HEADER_FILE}` from a backup of the \
                         volume, then run `cmkfs fsck` again"
                    )
                } else {
                    why
                };
                self.problem(kind, &header_path, None, None, why, Fix::None, None);
                // Keep the temp copies: without a usable header they may be all that is left.
                for t in temps {
                    self.problem(
                        ProblemKind::HeaderTempFile,
                        &t,
                        None,
                        None,
                        "temp file of an interrupted header update (kept: the header is unusable)"
                            .into(),
                        Fix::None,
                        None,
                    );
                }
            }
        }
        Ok(())
    }

    /// Unwraps `h`'s DEK(s). `Ok(Err(..))` is a problem of the header; `Err` is a reason
    /// outside the volume (vault denied or unreachable) that stops the check.
    pub(super) fn unlock(
        &self,
        open: VaultOpener<'_>,
        h: &VolumeHeader,
    ) -> Result<Result<VolumeKeys, (ProblemKind, String)>, FsckError> {
        let vault = open(h).map_err(FsckError::Key)?;
        let home = Home::from_env();
        Ok(
            match crate::unlock::keys(&home, &self.root, vault.as_ref(), h) {
                Ok(k) => Ok(k),
                Err(VolumeError::WrongKey(m)) => Err((ProblemKind::HeaderFingerprintMismatch, m)),
                Err(VolumeError::CorruptHeader { why, .. }) if why.contains("MAC") => {
                    Err((ProblemKind::HeaderMacMismatch, why))
                }
                Err(VolumeError::CorruptHeader { why, .. }) => {
                    Err((ProblemKind::HeaderCorrupt, why))
                }
                Err(e @ VolumeError::Vault(VaultError::UnwrapFailed { .. })) => {
                    Err((ProblemKind::HeaderUnwrapFailed, e.to_string()))
                }
                Err(e) => return Err(FsckError::Key(e.to_string())),
            },
        )
    }

    /// With the key: true when the root holds encrypted names and none of them decrypts
    /// ([`names::none_decrypt`]). A root whose id or listing cannot be read is left to the
    /// walk, which reports it.
    pub(super) fn header_is_foreign(&self) -> bool {
        let Some(keys) = &self.keys else {
            return false;
        };
        let Ok(id) = fs::read(self.root.join(DIRID_FILE)) else {
            return false;
        };
        let Ok(id) = DirId::try_from(id.as_slice()) else {
            return false;
        };
        let Ok(rd) = fs::read_dir(&self.root) else {
            return false;
        };
        let encodings = rd.filter_map(|e| e.ok()).filter_map(|e| {
            let name = e.file_name();
            match names::classify(&name) {
                EntryKind::Hidden => None,
                EntryKind::Encrypted => Some(name.as_bytes().to_vec()),
                EntryKind::Long => {
                    let side = self.root.join(names::side_file_of(&name));
                    sys::read_bounded(&side, MAX_SIDE_FILE)
                        .ok()
                        .filter(|full| names::long_name_matches(&name, full))
                }
            }
        });
        let retiring = keys.retiring.as_deref().map(|r| &r.names);
        names::none_decrypt(&keys.names, retiring, &id, encodings)
    }
}
