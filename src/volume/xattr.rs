//! Extended attributes, stored encrypted as backing xattrs: `user.*`, `trusted.*`,
//! `security.*` (file capabilities, SELinux labels set by tools) and the POSIX ACLs
//! `system.posix_acl_access` / `system.posix_acl_default` (kept in step with the mode, see
//! [`super::acl`]). Other `system.*` names are not supported (`EOPNOTSUPP`).
//!
//! Backing name: a namespace prefix + base64url(AES-SIV(name key, AD = ["xattr-name"], full
//! plaintext name)) — deterministic, so a lookup can compute it. When that exceeds 255 bytes
//! (plaintext names over 167 bytes), the prefix + `h.` + base64url(SHA-256(sealed name)), and
//! the sealed name goes in front of the value. The prefix is
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
use sha2::{Digest, Sha256};

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

/// Marks a hashed backing name: `<prefix>h.<base64url(SHA-256(sealed name))>`, for plaintext
/// names whose sealed encoding would not fit the 255-byte backing limit. Base64url has no
/// `.`, so a hashed name is never an encoded one.
const HASHED: &str = "h.";

/// Where a plaintext attribute is stored.
pub struct Backing {
    /// The backing attribute name.
    pub name: OsString,
    /// For a hashed name: the sealed plaintext name, stored in front of the value.
    sealed_name: Option<Vec<u8>>,
}

/// The backing attribute of plaintext name `name` under `prefix`.
pub fn seal_name(keys: &VolumeKeys, prefix: &str, name: &OsStr) -> Backing {
    let sealed = keys.names.seal(&[b"xattr-name"], name.as_bytes());
    let full = format!("{prefix}{}", B64URL.encode(&sealed));
    if full.len() <= NAME_MAX {
        return Backing {
            name: full.into(),
            sealed_name: None,
        };
    }
    Backing {
        name: format!("{prefix}{HASHED}{}", B64URL.encode(Sha256::digest(&sealed))).into(),
        sealed_name: Some(sealed.to_vec()),
    }
}

/// The encoding after our prefix of a backing name (`None`: not ours).
fn strip_prefix(backing: &OsStr) -> Option<&[u8]> {
    let b = backing.as_bytes();
    b.strip_prefix(PREFIX.as_bytes())
        .or_else(|| b.strip_prefix(TRUSTED_PREFIX.as_bytes()))
}

/// Whether a backing name of ours is a hashed one (its plaintext name is in the value).
pub fn is_hashed(backing: &OsStr) -> bool {
    strip_prefix(backing).is_some_and(|e| e.starts_with(HASHED.as_bytes()))
}

/// The plaintext name of an encoded (not hashed) backing name (`None`: not ours, hashed, or
/// does not decrypt).
pub fn open_name(keys: &VolumeKeys, backing: &OsStr) -> Option<OsString> {
    let enc = strip_prefix(backing)?;
    let sealed = B64URL.decode(enc).ok()?;
    let plain = keys.names.open(&[b"xattr-name"], &sealed).ok()?;
    Some(OsString::from_vec(plain.to_vec()))
}

/// Seals a value for backing attribute `b`: nonce(16) || AES-SIV(value), preceded for a
/// hashed name by u16-LE length || sealed plaintext name.
pub fn seal_value(
    keys: &VolumeKeys,
    b: &Backing,
    value: &[u8],
) -> Result<Vec<u8>, getrandom::Error> {
    let mut nonce = [0u8; 16];
    getrandom::getrandom(&mut nonce)?;
    let mut out = Vec::new();
    if let Some(sn) = &b.sealed_name {
        out.extend((sn.len() as u16).to_le_bytes());
        out.extend(sn);
    }
    out.extend(nonce);
    out.extend(
        keys.names
            .seal(&[b"xattr-value", b.name.as_bytes(), &nonce], value),
    );
    Ok(out)
}

/// Opens a stored value of backing attribute `backing`: the plaintext name when it is kept
/// in the value (hashed names; checked against the hash) and the value. `None`: does not
/// decrypt, or the name does not belong to this backing name.
pub fn open_value(
    keys: &VolumeKeys,
    backing: &OsStr,
    stored: &[u8],
) -> Option<(Option<OsString>, Vec<u8>)> {
    let (name, rest) = if is_hashed(backing) {
        let len = u16::from_le_bytes([*stored.first()?, *stored.get(1)?]) as usize;
        let sn = stored.get(2..2 + len)?;
        let hash = &strip_prefix(backing)?[HASHED.len()..];
        if hash != B64URL.encode(Sha256::digest(sn)).as_bytes() {
            return None;
        }
        let plain = keys.names.open(&[b"xattr-name"], sn).ok()?;
        (Some(OsString::from_vec(plain.to_vec())), &stored[2 + len..])
    } else {
        (None, stored)
    };
    if rest.len() < 16 {
        return None;
    }
    let (nonce, sealed) = rest.split_at(16);
    let value = keys
        .names
        .open(&[b"xattr-value", backing.as_bytes(), nonce], sealed)
        .ok()?;
    Some((name, value.to_vec()))
}

/// fsck's check of one stored attribute of ours: (name decrypts, value decrypts).
pub fn verify_stored(keys: &VolumeKeys, backing: &OsStr, stored: &[u8]) -> (bool, bool) {
    if is_hashed(backing) {
        let ok = open_value(keys, backing, stored).is_some();
        return (ok, ok);
    }
    (
        open_name(keys, backing).is_some(),
        open_value(keys, backing, stored).is_some(),
    )
}

/// Whether an error says "no such attribute here": none stored, or a backing filesystem
/// without extended attributes (nothing can be stored there, so nothing is).
fn absent(e: &VolumeError) -> bool {
    matches!(e.errno(), libc::ENODATA | libc::EOPNOTSUPP)
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

impl Inherit {
    /// Whether an ACL is stored on the new entry ([`Volume::apply_inherited`]).
    pub(super) fn has_acl(&self) -> bool {
        self.access.is_some() || self.default.is_some()
    }

    /// Whether an access ACL is stored on the new entry.
    pub(super) fn has_access_acl(&self) -> bool {
        self.access.is_some()
    }
}

impl Volume {
    fn backing_xattr(&self, keys: &VolumeKeys, fmt: u32, name: &OsStr) -> Backing {
        seal_name(keys, prefix_for(fmt), name)
    }

    /// The type of what `t` reaches; `fmt` is the caller's knowledge (0: unknown).
    fn fmt_of(&self, t: Target<'_>, fmt: u32) -> Result<u32, VolumeError> {
        Ok(match t {
            Target::Dir(_) => libc::S_IFDIR,
            Target::File(_) => libc::S_IFREG,
            Target::Pinned(p) => p.kind(),
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
        let backing = self.backing_xattr(keys, fmt, name);
        let stored = sys::get_xattr(t.xtarget(), &backing.name).map_err(os)?;
        match open_value(keys, &backing.name, &stored) {
            Some((None, v)) => Ok(v),
            Some((Some(n), v)) if n == name => Ok(v),
            _ => Err(VolumeError::CorruptFile {
                path: None,
                why: "extended attribute value does not decrypt".into(),
            }),
        }
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
        let backing = self.backing_xattr(keys, fmt, name);
        let sealed =
            seal_value(keys, &backing, value).map_err(|e| VolumeError::Internal(e.to_string()))?;
        match sys::set_xattr(t.xtarget(), &backing.name, &sealed, flags) {
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
        let backing = self.backing_xattr(keys, fmt, name);
        sys::remove_xattr(t.xtarget(), &backing.name).map_err(os)
    }

    /// Reads extended attribute `name` of `t` (`fmt`: its type bits if known, else 0).
    pub fn get_xattr(&self, t: Target<'_>, fmt: u32, name: &OsStr) -> Result<Vec<u8>, VolumeError> {
        let keys = self.keys()?;
        classify(name)?;
        // The kernel asks for the capability before a file's first write and at every chown
        // (to know whether to drop it): a file this daemon knows has none is answered
        // without a system call.
        if name.as_bytes() == CAPABILITY.as_bytes() && self.surely_no_capability(t) {
            return Err(VolumeError::errno_of(libc::ENODATA));
        }
        let fmt = self.fmt_of(t, fmt)?;
        self.get_raw(&keys, t, fmt, name)
    }

    /// Whether `t` is a regular file that surely has no access ACL: one held open whose
    /// shared state says it was created here without one and none was set since (see
    /// `Shared::may_have_acl`).
    fn surely_no_acl(&self, t: Target<'_>) -> bool {
        let shared = match t {
            Target::File(of) => Some(of.shared.clone()),
            Target::Pinned(p) if p.kind() == libc::S_IFREG => self.open_shared(p.stat().st_ino),
            _ => None,
        };
        shared.is_some_and(|s| !s.may_have_acl.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Whether `t` is a regular file that surely has no `security.capability`: one held open
    /// whose shared state says none was stored since it was created here or since a write,
    /// truncate or chown through the mount removed it (see `Shared::may_have_cap`).
    fn surely_no_capability(&self, t: Target<'_>) -> bool {
        let shared = match t {
            Target::File(of) => Some(of.shared.clone()),
            Target::Pinned(p) if p.kind() == libc::S_IFREG => self.open_shared(p.stat().st_ino),
            _ => None,
        };
        shared.is_some_and(|s| !s.may_have_cap.load(std::sync::atomic::Ordering::Relaxed))
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
            // Before it is stored: a chmod meanwhile must not skip it.
            if let Ok(a) = self.attr(t) {
                self.note_acl(a.ino);
            }
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
        let mut out = Vec::new();
        for b in sys::list_xattr(t.xtarget()).map_err(os)? {
            if is_hashed(&b) {
                // The name lives in the value.
                let stored = match sys::get_xattr(t.xtarget(), &b) {
                    Ok(v) => v,
                    Err(e) if e.raw_os_error() == Some(libc::ENODATA) => continue,
                    Err(e) => return Err(os(e)),
                };
                if let Some((Some(n), _)) = open_value(&keys, &b, &stored) {
                    out.push(n);
                }
            } else if let Some(n) = open_name(&keys, &b) {
                out.push(n);
            }
        }
        Ok(out)
    }

    /// Removes extended attribute `name`.
    pub fn remove_xattr(&self, t: Target<'_>, fmt: u32, name: &OsStr) -> Result<(), VolumeError> {
        let keys = self.keys()?;
        classify(name)?;
        let fmt = self.fmt_of(t, fmt)?;
        self.remove_raw(&keys, t, fmt, name)
    }

    /// After a chmod to `mode`: rewrites a stored access ACL to match (owner, mask or group,
    /// other). Nothing to do (one failed lookup) for a file without one.
    pub(super) fn acl_chmod(&self, t: Target<'_>, mode: u32) -> Result<(), VolumeError> {
        let keys = self.keys()?;
        let fmt = self.fmt_of(t, 0)?;
        if fmt == libc::S_IFLNK || self.surely_no_acl(t) {
            return Ok(());
        }
        let name = OsStr::new(acl::ACCESS);
        let value = match self.get_raw(&keys, t, fmt, name) {
            Ok(v) => v,
            Err(e) if absent(&e) => return Ok(()),
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
        if fmt != libc::S_IFREG || self.surely_no_capability(t) {
            return Ok(());
        }
        match self.remove_raw(&keys, t, fmt, OsStr::new(CAPABILITY)) {
            Err(e) if absent(&e) => Ok(()),
            r => r,
        }?;
        if let Target::File(of) = t {
            of.shared
                .may_have_cap
                .store(false, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
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
            Err(e) if absent(&e) => {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Dek;

    fn keys() -> VolumeKeys {
        VolumeKeys::from_dek(&Dek::generate().unwrap(), 4096).unwrap()
    }

    #[test]
    fn names_and_values_round_trip_short_and_hashed() {
        let k = keys();
        for len in [1usize, 160, 167, 168, 250] {
            let name = OsString::from(format!("user.{}", "n".repeat(len)));
            let b = seal_name(&k, PREFIX, &name);
            assert!(b.name.len() <= NAME_MAX, "{len}");
            assert_eq!(is_hashed(&b.name), len > 162, "{len}: {:?}", b.name);
            let stored = seal_value(&k, &b, b"value").unwrap();
            let (n, v) = open_value(&k, &b.name, &stored).unwrap();
            assert_eq!(v, b"value");
            match n {
                Some(n) => assert_eq!(n, name),
                None => assert_eq!(open_name(&k, &b.name).unwrap(), name),
            }
            assert_eq!(verify_stored(&k, &b.name, &stored), (true, true));
            // Deterministic names, randomized values.
            assert_eq!(seal_name(&k, PREFIX, &name).name, b.name);
            assert_ne!(seal_value(&k, &b, b"value").unwrap(), stored);
        }
    }

    #[test]
    fn values_are_bound_to_their_names() {
        let k = keys();
        let a = seal_name(&k, PREFIX, OsStr::new("user.a"));
        let b = seal_name(&k, PREFIX, OsStr::new("user.b"));
        let stored = seal_value(&k, &a, b"secret").unwrap();
        assert!(open_value(&k, &b.name, &stored).is_none());
        // A hashed name's value moved under another hashed name does not open either.
        let long = |c: &str| OsString::from(format!("user.{}", c.repeat(200)));
        let (x, y) = (
            seal_name(&k, PREFIX, &long("x")),
            seal_name(&k, PREFIX, &long("y")),
        );
        let stored = seal_value(&k, &x, b"v").unwrap();
        assert!(open_value(&k, &y.name, &stored).is_none());
        assert_eq!(verify_stored(&k, &y.name, &stored), (false, false));
        // Another volume's key opens nothing.
        assert!(open_value(&keys(), &x.name, &stored).is_none());
    }
}
