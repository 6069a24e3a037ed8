//! Encrypted extended attributes: every name and value must decrypt.

use super::*;

impl Checker {
    /// Checks an entry's encrypted extended attributes (volume::xattr's format: backing name
    /// `user.cmkfs.` + base64url(SIV(name key, ["xattr-name"], name)), value nonce(16) ||
    /// SIV(name key, ["xattr-value", backing name, nonce], value)). One that does not decrypt
    /// is unreadable through the mount; a repair sets it aside raw and removes it.
    pub(super) fn check_xattrs(
        &mut self,
        path: &Path,
        plaintext: Option<&Path>,
        plain_dir: Option<&Path>,
    ) {
        let Some(keys) = &self.keys else { return };
        let io_path = self.io(path);
        let list = match list_xattrs(&io_path) {
            Ok(l) => l,
            // The backing filesystem may not support xattrs at all: nothing to check.
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return,
            Err(e) => {
                self.problem(
                    ProblemKind::Unreadable,
                    path,
                    plaintext.map(Path::to_path_buf),
                    plain_dir,
                    format!("cannot list extended attributes: {e}"),
                    Fix::None,
                    None,
                );
                return;
            }
        };
        let mut bad = Vec::new();
        for name in list {
            if !XATTR_PREFIXES
                .iter()
                .any(|p| name.as_bytes().starts_with(p.as_bytes()))
            {
                continue; // not ours (e.g. a security label of the backing filesystem)
            }
            let value = get_xattr(&io_path, &name);
            let verify = |k: &VolumeKeys| match &value {
                Ok(v) => crate::volume::xattr::verify_stored(k, &name, v),
                Err(_) => (crate::volume::xattr::open_name(k, &name).is_some(), false),
            };
            // While a re-encryption is in progress an attribute may still be under the
            // retiring key (the names phase converts it): valid, never to be "repaired".
            let (name_ok, value_ok) = match (verify(keys), keys.retiring.as_deref()) {
                ((true, true), _) | (_, None) => verify(keys),
                (current, Some(r)) => match verify(r) {
                    (true, true) => (true, true),
                    _ => current,
                },
            };
            if !(name_ok && value_ok) {
                bad.push((name, value.unwrap_or_default(), name_ok));
            }
        }
        for (name, value, name_ok) in bad {
            let what = if name_ok { "value" } else { "name" };
            let idx = self.report.problems.len();
            self.problem(
                ProblemKind::XattrUndecryptable,
                path,
                plaintext.map(Path::to_path_buf),
                plain_dir,
                format!(
                    "the {what} of the extended attribute stored as {} does not decrypt",
                    name.to_string_lossy()
                ),
                // Applied below: the attribute is saved, not moved.
                Fix::Restore,
                None,
            );
            let p = &mut self.report.problems[idx];
            p.fix = Fix::Quarantine;
            p.repaired = false;
            if self.repair {
                match remove_xattr(&io_path, &name) {
                    Ok(()) => {
                        self.report.problems[idx].repaired = true;
                        self.xattrs.push((self.rel(path), name, value));
                    }
                    Err(e) => self.report.problems[idx].repair_error = Some(e.to_string()),
                }
            }
        }
    }
}

pub(super) fn cpath(p: &[u8]) -> io::Result<std::ffi::CString> {
    std::ffi::CString::new(p).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// The backing extended attribute names of `path` (not following symlinks).
pub(super) fn list_xattrs(path: &Path) -> io::Result<Vec<OsString>> {
    let c = cpath(path.as_os_str().as_bytes())?;
    loop {
        // SAFETY: valid C path; a null buffer of size 0 asks for the size.
        let size = unsafe { libc::llistxattr(c.as_ptr(), std::ptr::null_mut(), 0) };
        if size < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; size as usize];
        // SAFETY: buf has exactly the stated length.
        let got = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if got < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ERANGE) {
                continue; // grew in between
            }
            return Err(e);
        }
        buf.truncate(got as usize);
        return Ok(buf
            .split(|b| *b == 0)
            .filter(|n| !n.is_empty())
            .map(|n| OsStr::from_bytes(n).to_owned())
            .collect());
    }
}

/// One backing extended attribute's raw value.
pub(super) fn get_xattr(path: &Path, name: &OsStr) -> io::Result<Vec<u8>> {
    let (p, n) = (cpath(path.as_os_str().as_bytes())?, cpath(name.as_bytes())?);
    loop {
        // SAFETY: valid C strings; size query first.
        let size = unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), std::ptr::null_mut(), 0) };
        if size < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; size as usize];
        // SAFETY: buf has exactly the stated length.
        let got =
            unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if got < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ERANGE) {
                continue;
            }
            return Err(e);
        }
        buf.truncate(got as usize);
        return Ok(buf);
    }
}

pub(super) fn remove_xattr(path: &Path, name: &OsStr) -> io::Result<()> {
    let (p, n) = (cpath(path.as_os_str().as_bytes())?, cpath(name.as_bytes())?);
    // SAFETY: valid C strings.
    if unsafe { libc::lremovexattr(p.as_ptr(), n.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
