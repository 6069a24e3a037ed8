//! Name transform: plaintext names ⇄ backing names.
//!
//! A backing name is `base64url(AES-SIV(name_key, ad = ["name", dir id], name))` without
//! padding. Each backing directory holds its random 16-byte id in [`DIRID_FILE`], so equal
//! names in two directories look unrelated and names do not move between directories. When the
//! encoding exceeds 255 bytes, the entry is stored as `cmkfs.long.<base64url(sha256(encoding))>`
//! and the full encoding in a side file with the same name plus `.name`.
//! Base64url has no `.`, so every metadata name (which contains one) is distinguishable from an
//! encrypted name.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine as _;
use sha2::{Digest, Sha256};

use crate::crypto::{CryptoError, NameCipher};

/// Per-directory id file in every backing directory.
pub const DIRID_FILE: &str = ".cmkfs.dirid";
/// Prefix of hashed long-name entries.
pub const LONG_PREFIX: &str = "cmkfs.long.";
/// Suffix of the side file holding a long name's full encoding.
pub const LONG_SUFFIX: &str = ".name";
/// Longest name a backing filesystem accepts (NAME_MAX).
pub const NAME_MAX: usize = 255;

/// A directory's id: associated data for the names inside it.
pub type DirId = [u8; 16];

/// Where a plaintext name lives in its backing directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackingName {
    /// The encoding fits: it is the entry's name.
    Short(OsString),
    /// Too long: `entry` is the hashed name, `full` goes into the side file `entry + ".name"`.
    Long {
        /// The hashed entry name.
        entry: OsString,
        /// The full encoded name.
        full: String,
    },
}

impl BackingName {
    /// The name of the directory entry.
    pub fn entry(&self) -> &OsStr {
        match self {
            BackingName::Short(n) => n,
            BackingName::Long { entry, .. } => entry,
        }
    }

    /// Side file name for a long name.
    pub fn side_file(&self) -> Option<OsString> {
        match self {
            BackingName::Short(_) => None,
            BackingName::Long { entry, .. } => Some(side_file_of(entry)),
        }
    }
}

/// How a backing directory entry is to be read.
#[derive(Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// An encrypted name (decode it directly).
    Encrypted,
    /// A long-name entry: read its side file for the encoding.
    Long,
    /// Metadata or a foreign file: not shown in the plaintext view.
    Hidden,
}

/// Classifies a backing directory entry.
pub fn classify(backing: &OsStr) -> EntryKind {
    let b = backing.as_bytes();
    if b.starts_with(LONG_PREFIX.as_bytes()) && !b.ends_with(LONG_SUFFIX.as_bytes()) {
        EntryKind::Long
    } else if b.contains(&b'.') || b.is_empty() {
        EntryKind::Hidden
    } else {
        EntryKind::Encrypted
    }
}

/// Side-file name of a long-name entry.
pub fn side_file_of(entry: &OsStr) -> OsString {
    let mut s = entry.to_os_string();
    s.push(LONG_SUFFIX);
    s
}

/// Why a plaintext name cannot be used.
#[derive(Debug, PartialEq, Eq)]
pub enum NameError {
    /// Empty, `.`, `..`, or contains `/` or NUL.
    Invalid,
    /// Longer than NAME_MAX.
    TooLong,
}

/// Encrypts a plaintext name for directory `dir`.
pub fn encrypt(cipher: &NameCipher, dir: &DirId, name: &OsStr) -> Result<BackingName, NameError> {
    let b = name.as_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') || b.contains(&0) {
        return Err(NameError::Invalid);
    }
    if b.len() > NAME_MAX {
        return Err(NameError::TooLong);
    }
    let enc = B64URL.encode(cipher.seal(&[b"name", dir], b));
    if enc.len() <= NAME_MAX {
        return Ok(BackingName::Short(enc.into()));
    }
    let hash = B64URL.encode(Sha256::digest(enc.as_bytes()));
    Ok(BackingName::Long {
        entry: format!("{LONG_PREFIX}{hash}").into(),
        full: enc,
    })
}

/// Decrypts an encoded name (an entry's name, or a long name's side-file content).
pub fn decrypt(cipher: &NameCipher, dir: &DirId, encoded: &[u8]) -> Result<OsString, CryptoError> {
    let sealed = B64URL.decode(encoded).map_err(|_| CryptoError::Encoding)?;
    let plain = cipher.open(&[b"name", dir], &sealed)?;
    Ok(OsString::from_vec(plain.to_vec()))
}

/// Whether `encoded` is the canonical long form's content: only encodings longer than
/// [`NAME_MAX`] go to a side file. A shorter one planted in long form would show its name
/// twice (beside its short form) and leave a ghost no lookup reaches.
pub fn is_long_encoding(full: &[u8]) -> bool {
    full.len() > NAME_MAX
}

/// The refusal of a header whose name key opens none of the names at the backing root
/// (`cipherdir`): another volume's valid header copied over this one's, which would show an
/// empty volume and encrypt new files under the other volume's DEK.
pub fn foreign_header_message(cipherdir: &std::path::Path) -> String {
    format!(
        "the volume header does not belong to the files in {} (another volume's header?): \
         restore this volume's own cmkfs.volume.json from a backup",
        cipherdir.display()
    )
}

/// True when `encodings` (the encoded names at the backing root) holds at least one and none
/// decrypts under `cipher` (nor `retiring`, a re-encryption's old name key) in directory
/// `dir`: the header does not belong to these files. A few damaged names among good ones
/// are not this (they stay per-entry errors).
pub fn none_decrypt(
    cipher: &NameCipher,
    retiring: Option<&NameCipher>,
    dir: &DirId,
    encodings: impl IntoIterator<Item = Vec<u8>>,
) -> bool {
    let mut any = false;
    for e in encodings {
        any = true;
        if decrypt(cipher, dir, &e).is_ok() || retiring.is_some_and(|r| decrypt(r, dir, &e).is_ok())
        {
            return false;
        }
    }
    any
}

/// Checks that a long-name side file really belongs to `entry` (its hash matches).
pub fn long_name_matches(entry: &OsStr, full: &[u8]) -> bool {
    let hash = B64URL.encode(Sha256::digest(full));
    entry.as_bytes() == format!("{LONG_PREFIX}{hash}").as_bytes()
}

/// Encrypts a symlink target: random nonce, so equal targets look different.
pub fn encrypt_target(cipher: &NameCipher, target: &OsStr) -> Result<OsString, getrandom::Error> {
    let mut nonce = [0u8; 16];
    getrandom::getrandom(&mut nonce)?;
    let mut out = nonce.to_vec();
    out.extend(cipher.seal(&[b"symlink", &nonce], target.as_bytes()));
    Ok(B64URL.encode(out).into())
}

/// Decrypts a symlink target.
pub fn decrypt_target(cipher: &NameCipher, stored: &OsStr) -> Result<OsString, CryptoError> {
    let raw = B64URL
        .decode(stored.as_bytes())
        .map_err(|_| CryptoError::Encoding)?;
    open_target(cipher, &raw)
}

/// Decrypts a sealed symlink target (`nonce16 || AES-SIV(...)`, not encoded: a long target's
/// side file holds it so).
pub fn open_target(cipher: &NameCipher, raw: &[u8]) -> Result<OsString, CryptoError> {
    if raw.len() < 16 {
        return Err(CryptoError::Authentication);
    }
    let (nonce, sealed) = raw.split_at(16);
    let plain = cipher.open(&[b"symlink", nonce], sealed)?;
    Ok(OsString::from_vec(plain.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use zeroize::Zeroizing;

    fn cipher() -> NameCipher {
        NameCipher::new(Zeroizing::new([3u8; 64]))
    }

    #[test]
    fn short_and_long_names_round_trip() {
        let c = cipher();
        let d = [1u8; 16];
        for len in [1usize, 10, 175, 176, 200, 255] {
            let name = OsString::from("n".repeat(len));
            let b = encrypt(&c, &d, &name).unwrap();
            match &b {
                BackingName::Short(e) => {
                    assert!(e.len() <= NAME_MAX);
                    assert_eq!(classify(e), EntryKind::Encrypted);
                    assert_eq!(decrypt(&c, &d, e.as_bytes()).unwrap(), name);
                }
                BackingName::Long { entry, full } => {
                    assert!(len > 175);
                    assert!(entry.len() <= NAME_MAX && b.side_file().unwrap().len() <= NAME_MAX);
                    assert_eq!(classify(entry), EntryKind::Long);
                    assert_eq!(classify(&b.side_file().unwrap()), EntryKind::Hidden);
                    assert!(long_name_matches(entry, full.as_bytes()));
                    assert_eq!(decrypt(&c, &d, full.as_bytes()).unwrap(), name);
                }
            }
        }
    }

    #[test]
    fn bad_names_and_wrong_directory() {
        let c = cipher();
        let d = [1u8; 16];
        assert_eq!(
            encrypt(&c, &d, OsStr::new("")).unwrap_err(),
            NameError::Invalid
        );
        assert_eq!(
            encrypt(&c, &d, OsStr::new("..")).unwrap_err(),
            NameError::Invalid
        );
        assert_eq!(
            encrypt(&c, &d, OsStr::new("a/b")).unwrap_err(),
            NameError::Invalid
        );
        assert_eq!(
            encrypt(&c, &d, &OsString::from("x".repeat(256))).unwrap_err(),
            NameError::TooLong
        );
        let e = encrypt(&c, &d, OsStr::new("secret")).unwrap();
        assert!(decrypt(&c, &[2u8; 16], e.entry().as_bytes()).is_err());
        assert_eq!(classify(OsStr::new(DIRID_FILE)), EntryKind::Hidden);
        assert_eq!(classify(OsStr::new("cmkfs.volume.json")), EntryKind::Hidden);
    }

    #[test]
    fn symlink_targets_are_randomized() {
        let c = cipher();
        let t = OsStr::new("/etc/secret-target");
        let a = encrypt_target(&c, t).unwrap();
        assert_ne!(a, encrypt_target(&c, t).unwrap());
        assert_eq!(decrypt_target(&c, &a).unwrap(), t);
        assert!(decrypt_target(&c, OsStr::new("AAAA")).is_err());
    }
}
