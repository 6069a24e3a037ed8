//! Symlinks: targets are stored encrypted; targets too long for a backing symlink live in a
//! side file at the backing root.
//!
//! Short form: the backing symlink's target is `base64url(nonce16 || AES-SIV(name key, AD =
//! ["symlink", nonce16], target))`. That fits a backing symlink (at most 4095 bytes) for
//! plaintext targets up to 3039 bytes. Long form (targets of 3040..=4095 bytes, as ext4
//! takes): the same sealed bytes, raw, in the file `.cmkfs.target.<32 hex>` at the backing
//! root, and the backing symlink's target is that file's name. The sealed bytes are the same
//! as in the short form, so they are authenticated alike. The side file is written
//! (atomically) before the symlink exists and removed after the symlink's last link is gone:
//! a crash leaves at worst an orphaned side file, which fsck removes.

use std::ffi::{OsStr, OsString};
use std::os::fd::AsFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine as _;

use super::names;
use super::{os, sys, Attr, Caller, Dir, Volume, VolumeError};

/// Longest plaintext symlink target (PATH_MAX - 1, as ext4 takes).
pub const MAX_TARGET: usize = 4095;
/// Longest backing symlink target.
const MAX_BACKING_TARGET: usize = 4095;
/// Name prefix of a long target's side file (at the backing root).
pub const LONG_TARGET_PREFIX: &str = ".cmkfs.target.";
/// Bytes the sealing adds to a target: nonce and SIV tag.
const SEAL_OVERHEAD: usize = 32;

/// Whether a backing symlink target is a long-target reference: the side file's name.
pub fn long_target_ref(stored: &[u8]) -> Option<&OsStr> {
    let hex = stored.strip_prefix(LONG_TARGET_PREFIX.as_bytes())?;
    (hex.len() == 32
        && hex
            .iter()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
    .then(|| OsStr::from_bytes(stored))
}

/// Seals a target for storage: `nonce16 || AES-SIV(...)` (random nonce: equal targets look
/// different).
fn seal(keys: &crate::crypto::VolumeKeys, target: &[u8]) -> Result<Vec<u8>, VolumeError> {
    let stored = names::encrypt_target(&keys.names, OsStr::from_bytes(target))
        .map_err(|e| VolumeError::Internal(e.to_string()))?;
    B64URL
        .decode(stored.as_bytes())
        .map_err(|e| VolumeError::Internal(e.to_string()))
}

impl Volume {
    /// Creates a symlink whose target is stored encrypted (long targets in a side file).
    pub fn symlink(
        &self,
        dir: &Dir,
        name: &OsStr,
        target: &OsStr,
        caller: Caller,
    ) -> Result<(OsString, Attr), VolumeError> {
        if target.len() > MAX_TARGET {
            return Err(VolumeError::errno_of(libc::ENAMETOOLONG));
        }
        let keys = self.keys()?;
        let sealed = seal(&keys, target.as_bytes())?;
        let short = B64URL.encode(&sealed);
        let (stored, side) = if short.len() <= MAX_BACKING_TARGET {
            (short.into_bytes(), None)
        } else {
            let mut rnd = [0u8; 16];
            getrandom::getrandom(&mut rnd).map_err(|e| VolumeError::Internal(e.to_string()))?;
            let side = OsString::from(format!("{LONG_TARGET_PREFIX}{}", hex::encode(rnd)));
            sys::write_atomic(self.root_dir.fd(), &side, &sealed, 0o400).map_err(os)?;
            (side.as_bytes().to_vec(), Some(side))
        };
        let made = self.make_entry(dir, name, |bname| {
            sys::symlink(&stored, dir.fd(), bname).map_err(os)?;
            let new = self.pin_new(dir, bname, libc::S_IFLNK)?;
            self.own(dir, &new, caller, 0).map(|_| ())
        });
        let (bname, ()) = match made {
            Ok(x) => x,
            Err(e) => {
                if let Some(s) = side {
                    let _ = sys::unlink(self.root_dir.fd(), &s);
                }
                return Err(e);
            }
        };
        let attr = self.attr_at(dir, &bname)?;
        Ok((bname, attr))
    }

    /// The sealed target bytes of symlink `bname` in `dir` (from its side file for a long
    /// target).
    fn sealed_target(&self, dir: &Dir, bname: &OsStr) -> Result<Vec<u8>, VolumeError> {
        let stored = sys::readlink(dir.fd(), bname).map_err(os)?;
        self.sealed_of(&stored)
    }

    fn sealed_of(&self, stored: &[u8]) -> Result<Vec<u8>, VolumeError> {
        match long_target_ref(stored) {
            Some(side) => sys::read_small(self.root_dir.fd(), side, SEAL_OVERHEAD + MAX_TARGET)
                .map_err(|e| VolumeError::CorruptFile {
                    path: None,
                    why: format!(
                        "long symlink target {} unreadable: {e}",
                        side.to_string_lossy()
                    ),
                }),
            None => B64URL.decode(stored).map_err(|_| VolumeError::CorruptFile {
                path: None,
                why: "symlink target is not base64url".into(),
            }),
        }
    }

    /// Reads and decrypts the target of symlink `bname` in `dir`.
    pub fn readlink(&self, dir: &Dir, bname: &OsStr) -> Result<OsString, VolumeError> {
        let keys = self.keys()?;
        let sealed = self.sealed_target(dir, bname)?;
        names::open_target(&keys.names, &sealed).map_err(|_| VolumeError::CorruptFile {
            path: Some(bname.into()),
            why: "symlink target does not decrypt".into(),
        })
    }

    /// Plaintext length of the target of symlink `bname` in `dir` (no decryption needed).
    pub(super) fn target_len(&self, dir: &Dir, bname: &OsStr) -> Result<u64, VolumeError> {
        let stored = sys::readlink(dir.fd(), bname).map_err(os)?;
        let sealed_len = match long_target_ref(&stored) {
            Some(side) => sys::stat_at(self.root_dir.fd(), side).map_err(os)?.st_size as usize,
            // Unpadded base64url: 4 characters per 3 bytes.
            None => stored.len() * 3 / 4,
        };
        Ok(sealed_len.saturating_sub(SEAL_OVERHEAD) as u64)
    }

    /// Unlinks symlink `bname` of `dir`; when that was its last link and its target lives in
    /// a side file, removes the side file after the symlink (a crash in between leaves an
    /// orphaned side file, never a symlink without its target).
    pub(super) fn unlink_symlink(&self, dir: &Dir, bname: &OsStr) -> Result<(), VolumeError> {
        let fd = sys::open_path(dir.fd(), bname).map_err(os)?;
        sys::unlink(dir.fd(), bname).map_err(os)?;
        self.release_target(fd);
        Ok(())
    }

    /// Given an `O_PATH` descriptor of a symlink whose name was just removed or replaced:
    /// removes its long target's side file if no link of it is left.
    pub(super) fn release_target(&self, fd: std::os::fd::OwnedFd) {
        let Ok(st) = sys::fstat(fd.as_fd()) else {
            return;
        };
        if st.st_mode & libc::S_IFMT != libc::S_IFLNK || st.st_nlink != 0 {
            return;
        }
        if let Ok(stored) = rustix::fs::readlinkat(&fd, c"", Vec::new()) {
            let stored = stored.into_bytes();
            if let Some(side) = long_target_ref(&stored) {
                let side = OsString::from_vec(side.as_bytes().to_vec());
                if let Err(e) = sys::unlink(self.root_dir.fd(), &side) {
                    tracing::warn!(side = ?side, error = %e, "long symlink target left behind; `cmkfs fsck --repair` removes it");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_target_references_are_recognised_strictly() {
        let good = format!("{LONG_TARGET_PREFIX}{}", "0a".repeat(16));
        assert!(long_target_ref(good.as_bytes()).is_some());
        for bad in [
            format!("{LONG_TARGET_PREFIX}{}", "0A".repeat(16)),
            format!("{LONG_TARGET_PREFIX}{}", "0a".repeat(15)),
            format!("{LONG_TARGET_PREFIX}{}/x", "0a".repeat(16)),
            "AAAA".to_string(),
        ] {
            assert!(long_target_ref(bad.as_bytes()).is_none(), "{bad}");
        }
        // A short-form target never looks like a reference (base64url has no '.').
        assert!(!B64URL.encode([0u8; 40]).contains('.'));
    }
}
