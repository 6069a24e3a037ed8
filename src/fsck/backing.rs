//! Small reads and writes of backing-store metadata that the checks and repairs share.

use super::*;

/// Reads and checks a directory's id file.
pub(super) fn read_dir_id(dir: &Path) -> Result<DirId, (ProblemKind, String)> {
    let p = dir.join(DIRID_FILE);
    let meta = match fs::symlink_metadata(&p) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err((
                ProblemKind::DirIdMissing,
                format!("{DIRID_FILE} is missing"),
            ))
        }
        Err(e) => return Err((ProblemKind::DirIdCorrupt, format!("{DIRID_FILE}: {e}"))),
    };
    if !meta.is_file() {
        return Err((
            ProblemKind::DirIdCorrupt,
            format!("{DIRID_FILE} is not a regular file"),
        ));
    }
    let bytes = sys::read_bounded(&p, MAX_DIRID_FILE)
        .map_err(|e| (ProblemKind::DirIdCorrupt, format!("{DIRID_FILE}: {e}")))?;
    let id: DirId = bytes.as_slice().try_into().map_err(|_| {
        (
            ProblemKind::DirIdCorrupt,
            format!("{DIRID_FILE} has {} bytes, expected 16", bytes.len()),
        )
    })?;
    if id == [0; 16] {
        return Err((
            ProblemKind::DirIdZero,
            format!(
                "{DIRID_FILE} is all zeros: its write never reached the disk (a lost write), \
                 the id the names were encrypted under is gone"
            ),
        ));
    }
    Ok(id)
}

/// The header temp files in the backing root.
pub(super) fn header_temps(root: &Path) -> Result<Vec<PathBuf>, FsckError> {
    let prefix = format!("{TEMP_PREFIX}{HEADER_FILE}.");
    let mut out: Vec<PathBuf> = fs::read_dir(root)
        .map_err(|e| FsckError::io(root, e))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().as_bytes().starts_with(prefix.as_bytes()))
        .map(|e| e.path())
        .collect();
    out.sort();
    Ok(out)
}

/// Parses a header from any file (a temp copy); `None` if it is not a complete header.
/// Structural checks beyond the JSON shape happen in the unwrap (key id) and the MAC check.
pub(super) fn parse_header_file(path: &Path) -> Option<VolumeHeader> {
    let bytes = sys::read_bounded(path, 64 * 1024).ok()?;
    let h: VolumeHeader = serde_json::from_slice(&bytes).ok()?;
    (h.format == "cmkfs").then_some(h)
}

/// A new quarantine batch directory `root/cmkfs.quarantine/<UTC timestamp>[-n]`.
pub(super) fn new_batch(root: &Path) -> io::Result<PathBuf> {
    let q = root.join(QUARANTINE_DIR);
    match fs::DirBuilder::new().mode(0o700).create(&q) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    // Whoever can write the backing store can put a symlink there: entries moved through it
    // would leave the volume (`check_quarantine_dir` reports it; nothing is moved meanwhile).
    if !fs::symlink_metadata(&q)?.is_dir() {
        return Err(io::Error::other(format!(
            "{QUARANTINE_DIR} is not a directory; nothing is moved into it"
        )));
    }
    // 2025-01-31T12:00:00Z → 20250131T120000Z: no `.` needed, sorts by time.
    let stamp: String = humantime::format_rfc3339_seconds(SystemTime::now())
        .to_string()
        .chars()
        .filter(|c| *c != '-' && *c != ':')
        .collect();
    for n in 0..1000 {
        let name = if n == 0 {
            stamp.clone()
        } else {
            format!("{stamp}-{n}")
        };
        match fs::DirBuilder::new().mode(0o700).create(q.join(&name)) {
            Ok(()) => return Ok(q.join(name)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::other("no free quarantine batch name"))
}

/// Removes a file, or a directory with its contents (temp dirs of mkdir; never user data).
pub(super) fn remove_any(path: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(path)?;
    if meta.is_dir() {
        // A mkdir temp dir may have been given a mode without write permission already.
        let _ = fs::set_permissions(path, fs::Permissions::from_mode(0o700));
        fs::remove_dir_all(path)?;
    } else {
        fs::remove_file(path)?;
    }
    if let Some(parent) = path.parent() {
        fsutil::sync_dir(parent)?;
    }
    Ok(())
}

/// Writes a fresh random id as `dirid_path` (replacing a corrupt one).
pub(super) fn write_fresh_dir_id(dirid_path: &Path) -> io::Result<()> {
    let mut id = [0u8; 16];
    getrandom::getrandom(&mut id).map_err(io::Error::other)?;
    match fs::symlink_metadata(dirid_path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(dirid_path)?,
        Ok(_) => fs::remove_file(dirid_path)?,
        Err(_) => {}
    }
    fsutil::write_new(dirid_path, &id, 0o444)
}

pub(super) fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
    };
    let (a, b) = (c(from)?, c(to)?);
    // SAFETY: valid NUL-terminated paths; renameat2 is a plain syscall wrapper.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
