use super::{CryptoError, Dek, NameCipher, XtsCipher};

/// The ciphers a mounted volume works with, all derived from its DEK. Every part zeroizes
/// its key material on drop, so dropping the last `Arc<VolumeKeys>` erases the key.
pub struct VolumeKeys {
    /// Sector cipher (the DEK itself: K1 || K2).
    pub xts: XtsCipher,
    /// Name cipher (HKDF subkey "names").
    pub names: NameCipher,
}

impl VolumeKeys {
    /// Builds the ciphers from a DEK.
    pub fn from_dek(dek: &Dek, sector_size: usize) -> Result<VolumeKeys, CryptoError> {
        Ok(VolumeKeys {
            xts: XtsCipher::new(dek.as_bytes(), sector_size)?,
            names: NameCipher::new(dek.derive::<64>("names")),
        })
    }
}

impl std::fmt::Debug for VolumeKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VolumeKeys(<redacted>)")
    }
}
