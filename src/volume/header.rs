//! The volume header `cmkfs.volume.json`: the envelope around the wrapped DEK.
//!
//! Replaced atomically (temp → fsync → rename → fsync dir), so a crash during a rewrap leaves
//! the old or the new header, never a torn one. The fields that define how data is laid out
//! are covered by an HMAC under a DEK-derived key, checked after unwrap: a header edited by
//! someone without the DEK is refused rather than misread.

use std::path::Path;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::VolumeError;
use crate::crypto::Dek;
use crate::vault::{KeyId, WrapAlg, Wrapped};

/// File name of the volume header in the backing directory.
pub const HEADER_FILE: &str = "cmkfs.volume.json";
/// The on-disk format this code writes and mounts: 2 (every data unit whole AES blocks, the
/// size kept in the backing length; docs/FORMAT.md).
pub const FORMAT_VERSION: u32 = 2;
/// The oldest format this code still reads, to convert it (`cmkfs upgrade`).
pub const OLDEST_FORMAT_VERSION: u32 = 1;
/// Sector cipher name.
pub const CIPHER: &str = "AES-256-XTS";
/// Name cipher name.
pub const NAME_CIPHER: &str = "AES-256-SIV";
/// Longest header we will read: a header is a few hundred bytes, so anything larger is not one.
const MAX_HEADER_LEN: u64 = 64 * 1024;

/// The decoded volume header.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VolumeHeader {
    /// Always `"cmkfs"`: tells a volume header from any other JSON file.
    pub format: String,
    /// On-disk format version.
    pub format_version: u32,
    /// Random volume id (32 hex digits).
    pub volume_id: String,
    /// Unix seconds at `init`.
    pub created: u64,
    /// Sector cipher (`AES-256-XTS`).
    pub cipher: String,
    /// XTS data unit size in bytes.
    pub sector_size: u32,
    /// Name cipher (`AES-256-SIV`).
    pub name_cipher: String,
    /// Bytes of the per-file header in front of each file's ciphertext.
    pub file_header_len: u32,
    /// Full versioned id of the KEK that wraps the DEK.
    pub key_id: String,
    /// Wrap algorithm.
    pub wrap_alg: WrapAlg,
    /// The wrapped DEK, standard base64.
    pub wrapped_dek: String,
    /// Fingerprint of the DEK (see [`Dek::fingerprint`]): confirms an unwrap gave this volume's key.
    pub dek_fingerprint: String,
    /// Disk Encryption Set the volume belongs to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub des: Option<String>,
    /// Double encryption (`EncryptionAtRestWithPlatformAndCustomerKeys`): the envelope of the
    /// second, inner DEK, wrapped by cmkfs's platform key. Absent for single encryption.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<PlatformEnvelope>,
    /// HMAC-SHA256 (hex) over the layout fields, keyed by a DEK-derived key.
    pub header_mac: String,
}

/// The envelope of a double-encrypted volume's inner DEK: like the main envelope, but the KEK
/// is the platform key cmkfs keeps in its own vault, not the customer's key.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PlatformEnvelope {
    /// Full versioned id of the platform key that wraps the inner DEK.
    pub key_id: String,
    /// Wrap algorithm.
    pub wrap_alg: WrapAlg,
    /// The wrapped inner DEK, standard base64.
    pub wrapped_dek: String,
    /// Fingerprint of the inner DEK (covered by the header MAC).
    pub dek_fingerprint: String,
}

impl PlatformEnvelope {
    /// The envelope of an inner DEK the platform vault wrapped as `wrapped`.
    pub fn new(inner: &Dek, wrapped: &Wrapped) -> PlatformEnvelope {
        PlatformEnvelope {
            key_id: wrapped.kid.to_string(),
            wrap_alg: wrapped.alg,
            wrapped_dek: B64.encode(&wrapped.value),
            dek_fingerprint: inner.fingerprint(),
        }
    }

    /// The parsed platform key id.
    pub fn key_id(&self) -> Result<KeyId, VolumeError> {
        self.key_id
            .parse()
            .map_err(|e: crate::vault::VaultError| VolumeError::CorruptHeader {
                path: HEADER_FILE.into(),
                why: format!("platform key id: {e}"),
            })
    }

    /// The wrapped inner DEK bytes.
    pub fn wrapped(&self) -> Result<Vec<u8>, base64::DecodeError> {
        B64.decode(&self.wrapped_dek)
    }

    /// Checks an unwrapped inner DEK against the fingerprint.
    pub fn verify(&self, inner: &Dek) -> Result<(), VolumeError> {
        if inner.fingerprint() != self.dek_fingerprint {
            return Err(VolumeError::WrongKey(format!(
                "the unwrapped platform key's fingerprint does not match the volume ({})",
                self.key_id
            )));
        }
        Ok(())
    }
}

impl VolumeHeader {
    /// A header for a new volume whose DEK the vault wrapped as `wrapped`.
    pub fn new(
        dek: &Dek,
        volume_id: String,
        sector_size: u32,
        wrapped: &Wrapped,
        created: u64,
    ) -> VolumeHeader {
        let mut h = VolumeHeader {
            format: "cmkfs".into(),
            format_version: FORMAT_VERSION,
            volume_id,
            created,
            cipher: CIPHER.into(),
            sector_size,
            name_cipher: NAME_CIPHER.into(),
            file_header_len: super::content::FILE_HEADER_LEN as u32,
            key_id: wrapped.kid.to_string(),
            wrap_alg: wrapped.alg,
            wrapped_dek: B64.encode(&wrapped.value),
            dek_fingerprint: dek.fingerprint(),
            des: None,
            platform: None,
            header_mac: String::new(),
        };
        h.header_mac = h.mac(dek);
        h
    }

    /// A header for a new double-encrypted volume: `dek` is the outer (customer) DEK,
    /// `platform` the envelope of the inner one. The MAC covers the inner DEK's fingerprint,
    /// so the platform layer cannot be stripped or swapped unnoticed.
    pub fn new_double(
        dek: &Dek,
        volume_id: String,
        sector_size: u32,
        wrapped: &Wrapped,
        created: u64,
        platform: PlatformEnvelope,
    ) -> VolumeHeader {
        let mut h = VolumeHeader::new(dek, volume_id, sector_size, wrapped, created);
        h.platform = Some(platform);
        h.header_mac = h.mac(dek);
        h
    }

    /// Reads and structurally validates the header of the volume at `dir`.
    pub fn read(dir: &Path) -> Result<VolumeHeader, VolumeError> {
        let path = dir.join(HEADER_FILE);
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(VolumeError::NotAVolume(dir.to_path_buf()))
            }
            Err(e) => return Err(VolumeError::io(&path, e)),
        };
        let corrupt = |why: String| VolumeError::CorruptHeader {
            path: path.clone(),
            why,
        };
        if meta.len() > MAX_HEADER_LEN {
            return Err(corrupt(format!(
                "{} bytes is too large for a header",
                meta.len()
            )));
        }
        let bytes = std::fs::read(&path).map_err(|e| VolumeError::io(&path, e))?;
        let h: VolumeHeader = serde_json::from_slice(&bytes)
            .map_err(|e| corrupt(format!("not valid header JSON ({e})")))?;
        h.validate().map_err(corrupt)?;
        Ok(h)
    }

    fn validate(&self) -> Result<(), String> {
        if self.format != "cmkfs" {
            return Err(format!("format is {:?}, not \"cmkfs\"", self.format));
        }
        if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&self.format_version) {
            return Err(format!(
                "format version {} is not supported (this cmkfs reads versions \
                 {OLDEST_FORMAT_VERSION} to {FORMAT_VERSION})",
                self.format_version
            ));
        }
        if self.cipher != CIPHER || self.name_cipher != NAME_CIPHER {
            return Err(format!(
                "unsupported ciphers {} / {}",
                self.cipher, self.name_cipher
            ));
        }
        if !(512..=65536).contains(&self.sector_size) || !self.sector_size.is_power_of_two() {
            return Err(format!("sector size {} is invalid", self.sector_size));
        }
        if self.file_header_len != super::content::FILE_HEADER_LEN as u32 {
            return Err(format!(
                "file header length {} is invalid",
                self.file_header_len
            ));
        }
        self.key_id.parse::<KeyId>().map_err(|e| e.to_string())?;
        self.wrapped()
            .map_err(|_| "wrapped_dek is not valid base64".to_string())?;
        if self.volume_id.len() != 32 || hex::decode(&self.volume_id).is_err() {
            return Err("volume_id is not 32 hex digits".into());
        }
        if let Some(p) = &self.platform {
            p.key_id
                .parse::<KeyId>()
                .map_err(|e| format!("platform key id: {e}"))?;
            p.wrapped()
                .map_err(|_| "platform wrapped_dek is not valid base64".to_string())?;
            if p.dek_fingerprint.len() != 32 || hex::decode(&p.dek_fingerprint).is_err() {
                return Err("platform dek_fingerprint is not 32 hex digits".into());
            }
        }
        Ok(())
    }

    /// The parsed key id (validated by [`VolumeHeader::read`]).
    pub fn key_id(&self) -> Result<KeyId, VolumeError> {
        self.key_id
            .parse()
            .map_err(|e: crate::vault::VaultError| VolumeError::CorruptHeader {
                path: HEADER_FILE.into(),
                why: e.to_string(),
            })
    }

    /// The wrapped DEK bytes.
    pub fn wrapped(&self) -> Result<Vec<u8>, base64::DecodeError> {
        B64.decode(&self.wrapped_dek)
    }

    /// Checks an unwrapped DEK against the fingerprint and the header MAC.
    pub fn verify(&self, dek: &Dek) -> Result<(), VolumeError> {
        if dek.fingerprint() != self.dek_fingerprint {
            return Err(VolumeError::WrongKey(format!(
                "the unwrapped key's fingerprint does not match the volume ({})",
                self.key_id
            )));
        }
        let expected = self.mac(dek);
        // Constant-time compare through the MAC type would need the bytes; hex strings of a
        // public MAC leak nothing secret, so plain equality is fine here.
        if expected != self.header_mac {
            return Err(VolumeError::CorruptHeader {
                path: HEADER_FILE.into(),
                why: "header MAC does not verify: layout fields were changed".into(),
            });
        }
        Ok(())
    }

    /// Re-points the header at a new wrap of the same DEK (rotation / key change). The
    /// platform envelope of a double-encrypted volume is kept as it is: only the customer
    /// key changes.
    pub fn rewrapped(&self, wrapped: &Wrapped) -> VolumeHeader {
        VolumeHeader {
            key_id: wrapped.kid.to_string(),
            wrap_alg: wrapped.alg,
            wrapped_dek: B64.encode(&wrapped.value),
            ..self.clone()
        }
    }

    /// The same header in the current format version, its MAC recomputed with `dek` (the
    /// outer DEK): the last step of `cmkfs upgrade`, once every file is converted.
    pub fn upgraded(&self, dek: &Dek) -> VolumeHeader {
        self.with_format_version(FORMAT_VERSION, dek)
    }

    /// The same header claiming format `version`, MAC recomputed (tests build old volumes
    /// with it).
    #[doc(hidden)]
    pub fn with_format_version(&self, version: u32, dek: &Dek) -> VolumeHeader {
        let mut h = VolumeHeader {
            format_version: version,
            ..self.clone()
        };
        h.header_mac = h.mac(dek);
        h
    }

    /// Writes the header atomically into `dir`.
    pub fn write(&self, dir: &Path) -> Result<(), VolumeError> {
        let path = dir.join(HEADER_FILE);
        let json = self.to_bytes()?;
        crate::fsutil::write_atomic(&path, &json, 0o600).map_err(|e| VolumeError::io(&path, e))
    }

    /// The header file's exact bytes (pretty JSON and a newline), for writers that replace
    /// the file step by step themselves (the DES rewrap, which can be interrupted in tests).
    pub fn to_bytes(&self) -> Result<Vec<u8>, VolumeError> {
        let mut json =
            serde_json::to_vec_pretty(self).map_err(|e| VolumeError::Internal(e.to_string()))?;
        json.push(b'\n');
        Ok(json)
    }

    fn mac(&self, dek: &Dek) -> String {
        let key = dek.derive::<32>("header-mac");
        let mut m =
            <Hmac<Sha256> as Mac>::new_from_slice(&key[..]).expect("HMAC takes any key length");
        // Length-prefixed fields: no two different headers give the same MAC input.
        for field in [
            self.format.as_bytes(),
            &self.format_version.to_le_bytes(),
            self.volume_id.as_bytes(),
            &self.created.to_le_bytes(),
            self.cipher.as_bytes(),
            &self.sector_size.to_le_bytes(),
            self.name_cipher.as_bytes(),
            &self.file_header_len.to_le_bytes(),
            self.dek_fingerprint.as_bytes(),
        ] {
            m.update(&(field.len() as u64).to_le_bytes());
            m.update(field);
        }
        // Double encryption is a layout property (data has two layers): its inner DEK's
        // fingerprint is covered too. Appended only when present, so single-encryption
        // headers keep the MAC they always had.
        if let Some(p) = &self.platform {
            for field in [b"platform".as_slice(), p.dek_fingerprint.as_bytes()] {
                m.update(&(field.len() as u64).to_le_bytes());
                m.update(field);
            }
        }
        hex::encode(m.finalize().into_bytes())
    }
}
