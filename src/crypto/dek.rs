use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroizing;

use super::secret::Secret;
use super::CryptoError;

/// Length of a DEK: XTS-AES-256 takes two independent AES-256 keys.
pub const DEK_LEN: usize = 64;

/// A volume's data encryption key.
///
/// Lives in a [`Secret`] page of its own (`mlock`ed, kept out of core dumps), is zeroized on
/// drop, and has no `Debug`/`Display` that could print it.
pub struct Dek {
    bytes: Secret<[u8; DEK_LEN]>,
}

impl Dek {
    /// A fresh random DEK; never one with equal XTS halves.
    pub fn generate() -> Result<Dek, getrandom::Error> {
        loop {
            let mut dek = Dek::zeroed();
            getrandom::getrandom(&mut dek.bytes[..])?;
            if dek.bytes[..32] != dek.bytes[32..] {
                return Ok(dek);
            }
        }
    }

    /// Takes a DEK from unwrapped bytes; refuses a wrong length or equal halves.
    pub fn from_slice(bytes: &[u8]) -> Result<Dek, CryptoError> {
        if bytes.len() != DEK_LEN {
            return Err(CryptoError::BadKeyLength { got: bytes.len() });
        }
        if bytes[..32] == bytes[32..] {
            return Err(CryptoError::EqualKeyHalves);
        }
        let mut dek = Dek::zeroed();
        dek.bytes.copy_from_slice(bytes);
        Ok(dek)
    }

    fn zeroed() -> Dek {
        Dek {
            bytes: Secret::zeroed(),
        }
    }

    /// The raw key, for the XTS cipher and for wrapping by the vault.
    pub fn as_bytes(&self) -> &[u8; DEK_LEN] {
        &self.bytes
    }

    /// Derives a subkey for `label` with HKDF-SHA256 (the DEK as input key material), so names,
    /// header MAC and fingerprint never reuse the XTS key directly.
    pub fn derive<const N: usize>(&self, label: &str) -> Zeroizing<[u8; N]> {
        let hk = Hkdf::<Sha256>::new(Some(b"cmkfs v1"), &self.bytes[..]);
        let mut out = Zeroizing::new([0u8; N]);
        // N is a compile-time constant far below HKDF's 255*32 limit.
        hk.expand(label.as_bytes(), &mut out[..])
            .expect("HKDF output length is a small constant");
        out
    }

    /// Like [`Dek::derive`], but the subkey is expanded straight into secret pages: for keys
    /// that live as long as the mount (the name key).
    pub fn derive_secret<const N: usize>(&self, label: &str) -> Secret<[u8; N]> {
        let hk = Hkdf::<Sha256>::new(Some(b"cmkfs v1"), &self.bytes[..]);
        let mut out = Secret::<[u8; N]>::zeroed();
        hk.expand(label.as_bytes(), &mut out[..])
            .expect("HKDF output length is a small constant");
        out
    }

    /// A public, non-secret fingerprint that identifies the DEK (hex of 16 derived bytes):
    /// lets a mount confirm that an unwrap produced the volume's key and not some other one.
    pub fn fingerprint(&self) -> String {
        hex::encode(&self.derive::<16>("fingerprint")[..])
    }
}

impl std::fmt::Debug for Dek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Dek(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_bad_lengths_and_equal_halves() {
        assert_eq!(
            Dek::from_slice(&[1u8; 63]).unwrap_err(),
            CryptoError::BadKeyLength { got: 63 }
        );
        assert_eq!(
            Dek::from_slice(&[7u8; 64]).unwrap_err(),
            CryptoError::EqualKeyHalves
        );
    }

    #[test]
    fn fingerprint_is_stable_and_debug_redacts() {
        let d = Dek::generate().unwrap();
        let e = Dek::from_slice(d.as_bytes()).unwrap();
        assert_eq!(d.fingerprint(), e.fingerprint());
        assert_eq!(d.fingerprint().len(), 32);
        assert_ne!(d.fingerprint(), Dek::generate().unwrap().fingerprint());
        assert_eq!(format!("{d:?}"), "Dek(<redacted>)");
        assert_ne!(&d.derive::<32>("a")[..], &d.derive::<32>("b")[..]);
    }
}
