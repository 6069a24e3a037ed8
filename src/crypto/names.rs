//! Deterministic encryption of names (file names, symlink targets) with AES-256-SIV.
//!
//! SIV is deterministic: the same name in the same directory always encrypts the same way,
//! which lookups need. The directory id goes in as associated data, so equal names in
//! different directories encrypt differently, and a name copied into another directory does
//! not authenticate there.

use aes_siv::siv::Aes256Siv;
use aes_siv::KeyInit;
use zeroize::Zeroizing;

use super::secret::{scrub_stack, Secret};
use super::CryptoError;

/// AES-256-SIV key length (CMAC key + CTR key).
pub const NAME_KEY_LEN: usize = 64;

/// Encrypts and decrypts names under one volume's name key (kept in a [`Secret`] page).
pub struct NameCipher {
    key: Secret<[u8; NAME_KEY_LEN]>,
}

impl NameCipher {
    /// A name cipher with a key derived from the DEK (copied into secret pages).
    pub fn new(key: Zeroizing<[u8; NAME_KEY_LEN]>) -> NameCipher {
        let mut s = Secret::<[u8; NAME_KEY_LEN]>::zeroed();
        s.copy_from_slice(&key[..]);
        NameCipher { key: s }
    }

    /// A name cipher whose key is already in secret pages.
    pub fn from_secret(key: Secret<[u8; NAME_KEY_LEN]>) -> NameCipher {
        NameCipher { key }
    }

    // Building the SIV state per call keeps NameCipher Sync without a lock; it is a key
    // schedule, far cheaper than the directory I/O around every name operation. It lives on
    // the stack of the calling thread, so each operation scrubs the stack afterwards
    // (`scrub_stack`): no copy of the name key outlives the call.
    #[inline(never)]
    fn seal_inner(&self, ad: &[&[u8]], plain: &[u8]) -> Vec<u8> {
        Aes256Siv::new((&self.key[..]).into())
            .encrypt(ad, plain)
            .expect("AES-SIV encryption of an in-memory buffer cannot fail")
    }

    #[inline(never)]
    fn open_inner(&self, ad: &[&[u8]], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        Aes256Siv::new((&self.key[..]).into())
            .decrypt(ad, sealed)
            .map(Zeroizing::new)
            .map_err(|_| CryptoError::Authentication)
    }

    /// Encrypts `plain` bound to the associated data `ad` (e.g. the directory id).
    pub fn seal(&self, ad: &[&[u8]], plain: &[u8]) -> Vec<u8> {
        let out = self.seal_inner(ad, plain);
        scrub_stack();
        out
    }

    /// Decrypts and authenticates; fails if the ciphertext or `ad` differs from sealing.
    pub fn open(&self, ad: &[&[u8]], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let out = self.open_inner(ad, sealed);
        scrub_stack();
        out
    }
}

impl std::fmt::Debug for NameCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NameCipher(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cipher(b: u8) -> NameCipher {
        NameCipher::new(Zeroizing::new([b; NAME_KEY_LEN]))
    }

    #[test]
    fn deterministic_per_ad_and_authenticated() {
        let c = cipher(1);
        let a = c.seal(&[b"dir-a"], b"secret.txt");
        assert_eq!(a, c.seal(&[b"dir-a"], b"secret.txt"));
        assert_ne!(a, c.seal(&[b"dir-b"], b"secret.txt"));
        assert_eq!(&c.open(&[b"dir-a"], &a).unwrap()[..], b"secret.txt");
        assert_eq!(
            c.open(&[b"dir-b"], &a).unwrap_err(),
            CryptoError::Authentication
        );
        assert!(cipher(2).open(&[b"dir-a"], &a).is_err());
    }
}
