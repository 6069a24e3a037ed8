//! Extended attributes: `user.*` names and values stored encrypted as backing xattrs.
//!
//! Backing name: `user.cmkfs.` + base64url(AES-SIV(name key, AD = ["xattr-name"], name)) —
//! deterministic, so a lookup can compute it. Value: nonce(16) || AES-SIV(name key,
//! AD = ["xattr-value", backing name, nonce], value) — randomized, and bound to its name.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine as _;

use super::VolumeError;
use crate::crypto::VolumeKeys;

const PREFIX: &str = "user.cmkfs.";
/// Longest backing xattr name the kernel accepts (XATTR_NAME_MAX).
const NAME_MAX: usize = 255;

pub(super) fn seal_name(keys: &VolumeKeys, name: &OsStr) -> Option<OsString> {
    let enc = B64URL.encode(keys.names.seal(&[b"xattr-name"], name.as_bytes()));
    let full = format!("{PREFIX}{enc}");
    (full.len() <= NAME_MAX).then(|| full.into())
}

pub(super) fn open_name(keys: &VolumeKeys, backing: &OsStr) -> Option<OsString> {
    let enc = backing.as_bytes().strip_prefix(PREFIX.as_bytes())?;
    let sealed = B64URL.decode(enc).ok()?;
    let plain = keys.names.open(&[b"xattr-name"], &sealed).ok()?;
    Some(OsString::from_vec(plain.to_vec()))
}

pub(super) fn seal_value(
    keys: &VolumeKeys,
    backing: &OsStr,
    value: &[u8],
) -> Result<Vec<u8>, getrandom::Error> {
    let mut nonce = [0u8; 16];
    getrandom::getrandom(&mut nonce)?;
    let mut out = nonce.to_vec();
    out.extend(
        keys.names
            .seal(&[b"xattr-value", backing.as_bytes(), &nonce], value),
    );
    Ok(out)
}

pub(super) fn open_value(keys: &VolumeKeys, backing: &OsStr, stored: &[u8]) -> Option<Vec<u8>> {
    if stored.len() < 16 {
        return None;
    }
    let (nonce, sealed) = stored.split_at(16);
    keys.names
        .open(&[b"xattr-value", backing.as_bytes(), nonce], sealed)
        .ok()
        .map(|v| v.to_vec())
}

fn c(p: &[u8]) -> Result<CString, VolumeError> {
    CString::new(p).map_err(|_| VolumeError::Os(io::Error::from_raw_os_error(libc::EINVAL)))
}

fn last_err() -> VolumeError {
    VolumeError::Os(io::Error::last_os_error())
}

pub(super) fn get(path: &Path, name: &OsStr) -> Result<Vec<u8>, VolumeError> {
    let (p, n) = (c(path.as_os_str().as_bytes())?, c(name.as_bytes())?);
    loop {
        // SAFETY: valid C strings; a null buffer of size 0 asks for the size.
        let size = unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), std::ptr::null_mut(), 0) };
        if size < 0 {
            return Err(last_err());
        }
        let mut buf = vec![0u8; size as usize];
        // SAFETY: buf has exactly the stated length.
        let got =
            unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if got >= 0 {
            buf.truncate(got as usize);
            return Ok(buf);
        }
        // ERANGE: it grew between the two calls; ask again.
        if io::Error::last_os_error().raw_os_error() != Some(libc::ERANGE) {
            return Err(last_err());
        }
    }
}

pub(super) fn set(path: &Path, name: &OsStr, value: &[u8], flags: i32) -> Result<(), VolumeError> {
    let (p, n) = (c(path.as_os_str().as_bytes())?, c(name.as_bytes())?);
    // SAFETY: valid C strings and a value buffer of the stated length.
    if unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    } != 0
    {
        return Err(last_err());
    }
    Ok(())
}

pub(super) fn remove(path: &Path, name: &OsStr) -> Result<(), VolumeError> {
    let (p, n) = (c(path.as_os_str().as_bytes())?, c(name.as_bytes())?);
    // SAFETY: valid C strings.
    if unsafe { libc::lremovexattr(p.as_ptr(), n.as_ptr()) } != 0 {
        return Err(last_err());
    }
    Ok(())
}

pub(super) fn list(path: &Path) -> Result<Vec<OsString>, VolumeError> {
    let p = c(path.as_os_str().as_bytes())?;
    loop {
        // SAFETY: as in `get`.
        let size = unsafe { libc::llistxattr(p.as_ptr(), std::ptr::null_mut(), 0) };
        if size < 0 {
            return Err(last_err());
        }
        let mut buf = vec![0u8; size as usize];
        // SAFETY: buf has exactly the stated length.
        let got = unsafe { libc::llistxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if got >= 0 {
            buf.truncate(got as usize);
            return Ok(buf
                .split(|b| *b == 0)
                .filter(|n| n.starts_with(PREFIX.as_bytes()))
                .map(|n| OsString::from_vec(n.to_vec()))
                .collect());
        }
        if io::Error::last_os_error().raw_os_error() != Some(libc::ERANGE) {
            return Err(last_err());
        }
    }
}
