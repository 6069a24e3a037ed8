//! Extended attributes, stored encrypted as backing xattrs: `user.*`, `trusted.*`,
//! `security.*` (file capabilities, SELinux labels set by tools) and the POSIX ACLs
//! `system.posix_acl_access` / `system.posix_acl_default` (kept in step with the mode, see
//! [`super::acl`]). Other `system.*` names are not supported (`EOPNOTSUPP`).
//!
//! Backing name: a namespace prefix + base64url(AES-SIV(name key, AD = ["xattr-name"], full
//! plaintext name)) — deterministic, so a lookup can compute it. The prefix is
//! `user.cmkfs.` on regular files and directories and `trusted.cmkfs.` on anything else
//! (the backing kernel allows `user.*` only on those two; `trusted.*` needs a daemon running
//! as root). Plaintext namespaces are never used in the backing store: a `security.capability`
//! stored as such would give the *backing* file real capabilities.
//! Value: nonce(16) || AES-SIV(name key, AD = ["xattr-value", backing name, nonce], value) —
//! randomized, and bound to its name.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine as _;

use super::{acl, os, sys, Caller, Dir, Target, Volume, VolumeError};
use crate::crypto::VolumeKeys;

/// Backing prefix on regular files and directories.
pub const PREFIX: &str = "user.cmkfs.";
/// Backing prefix on symlinks, FIFOs, sockets and device nodes.
pub const TRUSTED_PREFIX: &str = "trusted.cmkfs.";
/// Longest backing xattr name the kernel accepts (XATTR_NAME_MAX).
const NAME_MAX: usize = 255;
/// Largest value the kernel passes (XATTR_SIZE_MAX).
const SIZE_MAX: usize = 65536;
/// The file capability attribute (removed by writes, truncates and chowns).
const CAPABILITY: &str = "security.capability";

/// How the plaintext view treats an attribute name.
#[derive(Debug, PartialEq, Eq)]
enum Kind {
    /// Stored as given.
    Plain,
    /// A POSIX ACL (`system.posix_acl_*`).
    Acl,
}

fn classify(name: &OsStr) -> Result<Kind, VolumeError> {
    let n = name.as_bytes();
    if n == acl::ACCESS.as_bytes() || n == acl::DEFAULT.as_bytes() {
        return Ok(Kind::Acl);
    }
    for ns in [&b"user."[..], b"trusted.", b"security."] {
        if n.starts_with(ns) && n.len() > ns.len() {
            return Ok(Kind::Plain);
        }
    }
    Err(VolumeError::errno_of(libc::EOPNOTSUPP))
}

/// The backing prefix for an entry of type `fmt` (`S_IFMT` bits).
fn prefix_for(fmt: u32) -> &'static str {
    if fmt == libc::S_IFREG || fmt == libc::S_IFDIR {
        PREFIX
    } else {
        TRUSTED_PREFIX
    }
}

/// The backing name of plaintext attribute `name` under `prefix` (`None`: too long).
pub fn seal_name(keys: &VolumeKeys, prefix: &str, name: &OsStr) -> Option<OsString> {
    let enc = B64URL.encode(keys.names.seal(&[b"xattr-name"], name.as_bytes()));
    let full = format!("{prefix}{enc}");
    (full.len() <= NAME_MAX).then(|| full.into())
}

/// The plaintext name of a backing attribute name (`None`: not ours, or does not decrypt).
pub fn open_name(keys: &VolumeKeys, backing: &OsStr) -> Option<OsString> {
    let b = backing.as_bytes();
    let enc = b
        .strip_prefix(PREFIX.as_bytes())
        .or_else(|| b.strip_prefix(TRUSTED_PREFIX.as_bytes()))?;
    let sealed = B64URL.decode(enc).ok()?;
    let plain = keys.names.open(&[b"xattr-name"], &sealed).ok()?;
    Some(OsString::from_vec(plain.to_vec()))
}

/// Seals a value for backing attribute `backing`.
pub fn seal_value(
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

/// Opens a stored value of backing attribute `backing` (`None`: does not decrypt).
pub fn open_value(keys: &VolumeKeys, backing: &OsStr, stored: &[u8]) -> Option<Vec<u8>> {
    if stored.len() < 16 {
        return None;
    }
    let (nonce, sealed) = stored.split_at(16);
    keys.names
        .open(&[b"xattr-value", backing.as_bytes(), nonce], sealed)
        .ok()
        .map(|v| v.to_vec())
}

/// The mode and ACLs a new entry gets from its parent ([`Volume::inherit_acl`]).
pub(super) struct Inherit {
    /// Permission bits (special bits included) to create the entry with.
    pub(super) mode: u32,
    /// Access ACL to store on it.
    access: Option<Vec<u8>>,
    /// Default ACL to store on it (directories).
    default: Option<Vec<u8>>,
}

impl Volume {
    fn backing_xattr(
        &self,
        keys: &VolumeKeys,
        fmt: u32,
        name: &OsStr,
    ) -> Result<OsString, VolumeError> {
        seal_name(keys, prefix_for(fmt), name).ok_or_else(|| VolumeError::errno_of(libc::ERANGE))
    }

    /// The type of what `t` reaches; `fmt` is the caller's knowledge (0: unknown).
    fn fmt_of(&self, t: Target<'_>, fmt: u32) -> Result<u32, VolumeError> {
        Ok(match t {
            Target::Dir(_) => libc::S_IFDIR,
            Target::File(_) => libc::S_IFREG,
            Target::At(..) if fmt != 0 => fmt,
            Target::At(..) => self.attr(t)?.kind(),
        })
    }

    fn get_raw(
        &self,
        keys: &VolumeKeys,
        t: Target<'_>,
        fmt: u32,
        name: &OsStr,
    ) -> Result<Vec<u8>, VolumeError> {
        let backing = self.backing_xattr(keys, fmt, name)?;
        let stored = sys::get_xattr(t.xtarget(), &backing).map_err(os)?;
        open_value(keys, &backing, &stored).ok_or_else(|| VolumeError::CorruptFile {
            path: None,
            why: "extended attribute value does not decrypt".into(),
        })
    }

    fn set_raw(
        &self,
        keys: &VolumeKeys,
        t: Target<'_>,
        fmt: u32,
        name: &OsStr,
        value: &[u8],
        flags: i32,
    ) -> Result<(), VolumeError> {
        let backing = self.backing_xattr(keys, fmt, name)?;
        let sealed =
            seal_value(keys, &backing, value).map_err(|e| VolumeError::Internal(e.to_string()))?;
        match sys::set_xattr(t.xtarget(), &backing, &sealed, flags) {
            // The nonce and tag push a value near the kernel's 64 KiB limit over it; a local
            // filesystem says the value does not fit, not that it is too big to pass.
            Err(e) if e.raw_os_error() == Some(libc::E2BIG) => {
                Err(VolumeError::errno_of(libc::ENOSPC))
            }
            r => r.map_err(os),
        }
    }

    fn remove_raw(
        &self,
        keys: &VolumeKeys,
        t: Target<'_>,
        fmt: u32,
        name: &OsStr,
    ) -> Result<(), VolumeError> {
        let backing = self.backing_xattr(keys, fmt, name)?;
        sys::remove_xattr(t.xtarget(), &backing).map_err(os)
    }

    /// Reads extended attribute `name` of `t` (`fmt`: its type bits if known, else 0).
    pub fn get_xattr(&self, t: Target<'_>, fmt: u32, name: &OsStr) -> Result<Vec<u8>, VolumeError> {
        let keys = self.keys()?;
        classify(name)?;
        let fmt = self.fmt_of(t, fmt)?;
        self.get_raw(&keys, t, fmt, name)
    }

    /// Sets extended attribute `name` (`flags`: XATTR_CREATE / XATTR_REPLACE). Setting the
    /// access ACL also sets the mode bits it implies, and stores the ACL only when it says
    /// more than they do (as ext4).
    pub fn set_xattr(
        &self,
        t: Target<'_>,
        fmt: u32,
        name: &OsStr,
        value: &[u8],
        flags: i32,
    ) -> Result<(), VolumeError> {
        let keys = self.keys()?;
        if value.len() > SIZE_MAX {
            return Err(VolumeError::errno_of(libc::E2BIG));
        }
        let kind = classify(name)?;
        let fmt = self.fmt_of(t, fmt)?;
        if kind == Kind::Acl && name.as_bytes() == acl::ACCESS.as_bytes() {
            let entries = acl::parse(value).map_err(|_| VolumeError::errno_of(libc::EINVAL))?;
            let (perm, not_equiv) = acl::equiv_mode(&entries);
            let old = self.attr(t)?.mode;
            let mode = (old & 0o7000) | perm;
            if mode != old & 0o7777 {
                self.chmod_target(t, mode)?;
            }
            if !not_equiv {
                return match self.remove_raw(&keys, t, fmt, name) {
                    Err(e) if e.errno() == libc::ENODATA => Ok(()),
                    r => r,
                };
            }
        }
        self.set_raw(&keys, t, fmt, name, value, flags)?;
        if name.as_bytes() == CAPABILITY.as_bytes() {
            if let Ok(a) = self.attr(t) {
                self.note_capability(a.ino);
            }
        }
        Ok(())
    }

    /// Lists the plaintext names of `t`'s extended attributes.
    pub fn list_xattr(&self, t: Target<'_>) -> Result<Vec<OsString>, VolumeError> {
        let keys = self.keys()?;
        Ok(sys::list_xattr(t.xtarget())
            .map_err(os)?
            .into_iter()
            .filter_map(|b| open_name(&keys, &b))
            .collect())
    }

    /// Removes extended attribute `name`.
    pub fn remove_xattr(&self, t: Target<'_>, fmt: u32, name: &OsStr) -> Result<(), VolumeError> {
        let keys = self.keys()?;
        classify(name)?;
        let fmt = self.fmt_of(t, fmt)?;
        self.remove_raw(&keys, t, fmt, name)
    }

    fn chmod_target(&self, t: Target<'_>, mode: u32) -> Result<(), VolumeError> {
        use std::os::fd::AsFd;
        match t {
            Target::At(d, n) => sys::chmod_at(d.fd(), n, mode),
            Target::Dir(d) => sys::chmod_fd(d.fd(), mode),
            Target::File(f) => sys::chmod_fd(f.file().as_fd(), mode),
        }
        .map_err(os)
    }

    /// After a chmod to `mode`: rewrites a stored access ACL to match (owner, mask or group,
    /// other). Nothing to do (one failed lookup) for a file without one.
    pub(super) fn acl_chmod(&self, t: Target<'_>, mode: u32) -> Result<(), VolumeError> {
        let keys = self.keys()?;
        let fmt = self.fmt_of(t, 0)?;
        if fmt == libc::S_IFLNK {
            return Ok(());
        }
        let name = OsStr::new(acl::ACCESS);
        let value = match self.get_raw(&keys, t, fmt, name) {
            Ok(v) => v,
            Err(e) if e.errno() == libc::ENODATA => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut entries = acl::parse(&value).map_err(|_| VolumeError::CorruptFile {
            path: None,
            why: "stored access ACL does not parse".into(),
        })?;
        acl::chmod(&mut entries, mode).map_err(|_| VolumeError::CorruptFile {
            path: None,
            why: "stored access ACL has no group entry".into(),
        })?;
        self.set_raw(&keys, t, fmt, name, &acl::serialize(&entries), 0)
    }

    /// Removes a stored `security.capability` from `t` (writes, truncates and chowns drop
    /// file capabilities, as on a local filesystem).
    pub(super) fn kill_capability(&self, t: Target<'_>) -> Result<(), VolumeError> {
        let keys = self.keys()?;
        let fmt = self.fmt_of(t, 0)?;
        if fmt != libc::S_IFREG {
            return Ok(());
        }
        match self.remove_raw(&keys, t, fmt, OsStr::new(CAPABILITY)) {
            Err(e) if e.errno() == libc::ENODATA => Ok(()),
            r => r,
        }
    }

    /// The mode and ACLs of a new entry of type and mode `mode` in `dir`: with a default ACL
    /// on `dir`, the ACL masked by the mode (the umask does not apply); without one, the
    /// mode less the caller's umask.
    pub(super) fn inherit_acl(
        &self,
        dir: &Dir,
        mode: u32,
        caller: Caller,
    ) -> Result<Inherit, VolumeError> {
        let keys = self.keys()?;
        let perm = mode & 0o7777;
        let default = match self.get_raw(
            &keys,
            Target::Dir(dir),
            libc::S_IFDIR,
            OsStr::new(acl::DEFAULT),
        ) {
            Ok(v) => v,
            Err(e) if e.errno() == libc::ENODATA => {
                return Ok(Inherit {
                    mode: perm & !(caller.umask & 0o777),
                    access: None,
                    default: None,
                })
            }
            Err(e) => return Err(e),
        };
        let mut entries = acl::parse(&default).map_err(|_| VolumeError::CorruptFile {
            path: None,
            why: "stored default ACL does not parse".into(),
        })?;
        let (new_mode, store) =
            acl::create_masq(&mut entries, perm).ok_or_else(|| VolumeError::CorruptFile {
                path: None,
                why: "stored default ACL has no group entry".into(),
            })?;
        Ok(Inherit {
            mode: new_mode,
            access: store.then(|| acl::serialize(&entries)),
            default: (mode & libc::S_IFMT == libc::S_IFDIR).then_some(default),
        })
    }

    /// Stores the ACLs [`Volume::inherit_acl`] gave a new entry.
    pub(super) fn apply_inherited(&self, t: Target<'_>, inh: &Inherit) -> Result<(), VolumeError> {
        if inh.access.is_none() && inh.default.is_none() {
            return Ok(());
        }
        let keys = self.keys()?;
        let fmt = self.fmt_of(t, 0)?;
        if let Some(a) = &inh.access {
            self.set_raw(&keys, t, fmt, OsStr::new(acl::ACCESS), a, 0)?;
        }
        if let Some(d) = &inh.default {
            self.set_raw(&keys, t, fmt, OsStr::new(acl::DEFAULT), d, 0)?;
        }
        Ok(())
    }
}
