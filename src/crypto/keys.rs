use hkdf::Hkdf;
use sha2::Sha256;

use super::secret::{scrub_stack, Secret};
use super::{CryptoError, Dek, NameCipher, XtsCipher, DEK_LEN};

/// The ciphers a mounted volume works with, all derived from its DEK(s). Every key schedule
/// and subkey lives in secret pages ([`Secret`]: locked, kept out of core dumps) and is
/// zeroized on drop, so dropping the last `Arc<VolumeKeys>` erases the key.
pub struct VolumeKeys {
    /// Sector cipher (the DEK itself: K1 || K2). For a double-encrypted volume this is the
    /// outer layer, the customer-key DEK.
    pub xts: XtsCipher,
    /// Double encryption only: the inner layer's sector cipher (the platform-key DEK), applied
    /// before [`VolumeKeys::xts`] on write and after it on read. `None` for single encryption,
    /// whose data path then pays nothing but one branch.
    pub inner: Option<XtsCipher>,
    /// Name cipher (HKDF subkey "names"; of both DEKs for a double-encrypted volume).
    pub names: NameCipher,
    /// Key generation of these DEK(s): 0 for a volume never re-encrypted, one more after each
    /// `cmkfs volume reencrypt`. Every file header records the generation of its data.
    pub generation: u32,
    /// While a re-encryption runs: the ciphers of the DEK(s) being retired (the previous
    /// generation), for files not converted yet. `None` otherwise.
    pub retiring: Option<Box<VolumeKeys>>,
}

impl VolumeKeys {
    /// Builds the ciphers of a single-encryption volume from its DEK.
    pub fn from_dek(dek: &Dek, sector_size: usize) -> Result<VolumeKeys, CryptoError> {
        VolumeKeys::from_deks(dek, None, sector_size)
    }

    /// Builds the ciphers from the customer DEK (`outer`) and, for a double-encrypted volume,
    /// the platform DEK (`inner`). With two DEKs the name key is derived from both, so that
    /// names, like data, stay protected while either DEK is withheld.
    ///
    /// Key expansion and HKDF run on this thread's stack; it is scrubbed before returning, so
    /// the only copies of the keys are the secret pages.
    pub fn from_deks(
        outer: &Dek,
        inner: Option<&Dek>,
        sector_size: usize,
    ) -> Result<VolumeKeys, CryptoError> {
        let keys = Self::build(outer, inner, sector_size);
        scrub_stack();
        keys
    }

    #[inline(never)]
    fn build(
        outer: &Dek,
        inner: Option<&Dek>,
        sector_size: usize,
    ) -> Result<VolumeKeys, CryptoError> {
        let names = match inner {
            None => outer.derive_secret::<64>("names"),
            Some(inner) => {
                let mut ikm = Secret::<[u8; 2 * DEK_LEN]>::zeroed();
                ikm[..DEK_LEN].copy_from_slice(outer.as_bytes());
                ikm[DEK_LEN..].copy_from_slice(inner.as_bytes());
                let hk = Hkdf::<Sha256>::new(Some(b"cmkfs v1"), &ikm[..]);
                let mut out = Secret::<[u8; 64]>::zeroed();
                hk.expand(b"names+platform", &mut out[..])
                    .expect("HKDF output length is a small constant");
                out
            }
        };
        Ok(VolumeKeys {
            xts: XtsCipher::new(outer.as_bytes(), sector_size)?,
            inner: inner
                .map(|d| XtsCipher::new(d.as_bytes(), sector_size))
                .transpose()?,
            names: NameCipher::from_secret(names),
            generation: 0,
            retiring: None,
        })
    }

    /// These keys as generation `generation`, with `retiring` as the previous generation's
    /// keys while a re-encryption runs.
    pub fn with_generation(mut self, generation: u32, retiring: Option<VolumeKeys>) -> VolumeKeys {
        self.generation = generation;
        self.retiring = retiring.map(Box::new);
        self
    }

    /// The keys of file key generation `gen` (the low 16 bits of a generation, as file
    /// headers store it): these, or the retiring ones while a re-encryption runs.
    pub fn for_file_generation(&self, gen: u16) -> Option<&VolumeKeys> {
        if self.generation as u16 == gen {
            return Some(self);
        }
        self.retiring
            .as_deref()
            .filter(|r| r.generation as u16 == gen)
    }
}

impl std::fmt::Debug for VolumeKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VolumeKeys(<redacted>)")
    }
}
