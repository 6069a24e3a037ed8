//! The volume header `cmkfs.volume.json`: the envelope around the wrapped DEK.
//!
//! Replaced atomically (temp → fsync → rename → fsync dir), so a crash during a rewrap leaves
//! the old or the new header, never a torn one. Every field is covered by an HMAC under a
//! DEK-derived key (`mac_version` 2; version 1 covered the layout fields only and is upgraded
//! on the first mount), checked right after the unwrap and before anything else in the header
//! is acted on: a header edited by someone without the DEK is refused rather than obeyed. The
//! backing store is untrusted input; the order of checks is in docs/FORMAT.md.

use std::path::Path;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::layout::Layout;
use super::VolumeError;
use crate::crypto::Dek;
use crate::vault::{KeyId, Vault, WrapAlg, Wrapped};

mod transitions;

/// File name of the volume header in the backing directory.
pub const HEADER_FILE: &str = "cmkfs.volume.json";
/// The newest on-disk format, which `cmkfs init` writes by default: 3 (format v2's data-unit
/// rule with the data area at backing offset 4096, page-aligned; docs/FORMAT.md).
pub const FORMAT_VERSION: u32 = 3;
/// Format v2 (every data unit whole AES blocks, the size kept in the backing length, the data
/// right after the 32-byte file header): the oldest format the data path mounts, the one
/// `cmkfs upgrade` converts a v1 volume to, and what `cmkfs init --format 2` writes.
pub const FORMAT_V2: u32 = 2;
/// The oldest format this code still reads, to convert it (`cmkfs upgrade`).
pub const OLDEST_FORMAT_VERSION: u32 = 1;
/// Sector cipher name.
pub const CIPHER: &str = "AES-256-XTS";
/// Name cipher name.
pub const NAME_CIPHER: &str = "AES-256-SIV";
/// Longest header we will read: a header is a few hundred bytes, so anything larger is not one.
pub const MAX_HEADER_LEN: usize = 64 * 1024;
/// The header MAC this code writes: every field (docs/FORMAT.md).
pub const MAC_VERSION: u32 = 2;
/// Name of the platform key in cmkfs's own `local:` vault: the only key a platform envelope
/// may name.
pub const PLATFORM_KEY: &str = "cmkfs-platform";

fn mac_v1() -> u32 {
    1
}

fn is_mac_v1(v: &u32) -> bool {
    *v == 1
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

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
    /// Generation of the DEK(s) above: 0 (absent) for a volume never re-encrypted, one more
    /// after each `cmkfs volume reencrypt`. File headers record the generation of their data.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub key_generation: u32,
    /// Only while a re-encryption runs: the DEK(s) being retired, wrapped by the same key
    /// (`key_id`, `wrap_alg`). Files not converted yet are still encrypted with them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retiring: Option<RetiringEnvelope>,
    /// Which fields `header_mac` covers: 2 = all of them; 1 (absent on disk) = the layout
    /// fields only, as written before version 2 (accepted, and upgraded by the first mount).
    #[serde(default = "mac_v1", skip_serializing_if = "is_mac_v1")]
    pub mac_version: u32,
    /// HMAC-SHA256 (hex) over the fields `mac_version` says, keyed by a DEK-derived key.
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

/// The envelope of the DEK(s) a running re-encryption retires: the previous generation,
/// wrapped by the header's KEK (`key_id`, `wrap_alg`; a rewrap rewraps it too), and, for a
/// double-encrypted volume, the previous inner DEK under the platform key.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RetiringEnvelope {
    /// The retiring DEK's generation (the header's `key_generation` − 1).
    pub key_generation: u32,
    /// The retiring (outer) DEK wrapped by the header's KEK, standard base64.
    pub wrapped_dek: String,
    /// Its fingerprint.
    pub dek_fingerprint: String,
    /// Double encryption: the retiring inner DEK's envelope.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<PlatformEnvelope>,
}

impl RetiringEnvelope {
    /// The wrapped retiring DEK bytes.
    pub fn wrapped(&self) -> Result<Vec<u8>, base64::DecodeError> {
        B64.decode(&self.wrapped_dek)
    }
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

/// Unwraps one DEK envelope (`what` names its field in messages) through `vault`: the
/// wrapped bytes must be base64 and must unwrap to a DEK-shaped key. Checking it against the
/// header (fingerprint, MAC) is the caller's.
fn unwrap_envelope(
    vault: &dyn Vault,
    kid: &KeyId,
    alg: WrapAlg,
    wrapped: Result<Vec<u8>, base64::DecodeError>,
    what: &str,
) -> Result<Dek, VolumeError> {
    let wrapped = wrapped.map_err(|_| VolumeError::CorruptHeader {
        path: HEADER_FILE.into(),
        why: format!("{what} is not valid base64"),
    })?;
    let raw = vault.unwrap_key(kid, alg, &wrapped)?;
    Dek::from_slice(&raw).map_err(|_| {
        VolumeError::WrongKey(format!("{kid} unwrapped something that is not a cmkfs DEK"))
    })
}

impl VolumeHeader {
    /// The layout of this volume's backing files; `None` for a format the data path does not
    /// mount (v1: `cmkfs upgrade` first). The header was validated on read, so
    /// `file_header_len` agrees with it.
    pub fn layout(&self) -> Option<Layout> {
        Layout::for_format(self.format_version)
    }

    /// A header for a new volume of on-disk layout `layout` whose DEK the vault wrapped as
    /// `wrapped`.
    pub fn new(
        dek: &Dek,
        volume_id: String,
        sector_size: u32,
        wrapped: &Wrapped,
        created: u64,
        layout: Layout,
    ) -> VolumeHeader {
        let mut h = VolumeHeader {
            format: "cmkfs".into(),
            format_version: layout.format_version(),
            volume_id,
            created,
            cipher: CIPHER.into(),
            sector_size,
            name_cipher: NAME_CIPHER.into(),
            file_header_len: layout.data_offset as u32,
            key_id: wrapped.kid.to_string(),
            wrap_alg: wrapped.alg,
            wrapped_dek: B64.encode(&wrapped.value),
            dek_fingerprint: dek.fingerprint(),
            des: None,
            platform: None,
            key_generation: 0,
            retiring: None,
            mac_version: MAC_VERSION,
            header_mac: String::new(),
        };
        h.header_mac = h.mac(dek);
        h
    }

    /// A header for a new double-encrypted volume of layout `layout`: `dek` is the outer
    /// (customer) DEK,
    /// `platform` the envelope of the inner one. The MAC covers the inner DEK's fingerprint,
    /// so the platform layer cannot be stripped or swapped unnoticed.
    pub fn new_double(
        dek: &Dek,
        volume_id: String,
        sector_size: u32,
        wrapped: &Wrapped,
        created: u64,
        platform: PlatformEnvelope,
        layout: Layout,
    ) -> VolumeHeader {
        let mut h = VolumeHeader::new(dek, volume_id, sector_size, wrapped, created, layout);
        h.platform = Some(platform);
        h.header_mac = h.mac(dek);
        h
    }

    /// This header bound to a Disk Encryption Set (the MAC is recomputed: `des` is covered).
    pub fn with_des(&self, des: Option<String>, dek: &Dek) -> VolumeHeader {
        let mut h = VolumeHeader {
            des,
            ..self.clone()
        };
        h.header_mac = h.mac(dek);
        h
    }

    /// Reads and structurally validates the header of the volume at `dir` (a path the user
    /// named; it may be a symlink). The header file itself is untrusted: it is read through
    /// [`sys::read_bounded`](super::sys::read_bounded) — never through a symlink, never a
    /// FIFO, socket or device, at most [`MAX_HEADER_LEN`] bytes — so no planted file can block
    /// or exhaust the reader. A header that is there but is not such a file is
    /// [`VolumeError::CorruptHeader`].
    pub fn read(dir: &Path) -> Result<VolumeHeader, VolumeError> {
        let path = dir.join(HEADER_FILE);
        let corrupt = |why: String| VolumeError::CorruptHeader {
            path: path.clone(),
            why,
        };
        let bytes = match super::sys::read_bounded(&path, MAX_HEADER_LEN) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(VolumeError::NotAVolume(dir.to_path_buf()))
            }
            Err(e) => {
                return Err(match e.raw_os_error() {
                    Some(libc::ELOOP) => corrupt(
                        "it is a symlink; cmkfs never follows a symlink in the backing store \
                         (put the volume's real header back)"
                            .into(),
                    ),
                    Some(libc::EFBIG) => corrupt(format!(
                        "it is larger than {MAX_HEADER_LEN} bytes, too large for a header"
                    )),
                    Some(libc::EISDIR) => corrupt("it is a directory".into()),
                    None if e.kind() == std::io::ErrorKind::InvalidData => {
                        corrupt(format!("{e} (put the volume's real header back)"))
                    }
                    _ => VolumeError::io(&path, e),
                })
            }
        };
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
        // The data offset is the format's: v1 and v2 keep the data right after the 32-byte
        // file header, v3 at 4096.
        let want = Layout::for_format(self.format_version)
            .map_or(super::content::FILE_HEADER_LEN as u64, |l| l.data_offset);
        if self.file_header_len as u64 != want {
            return Err(format!(
                "file header length {} is invalid for format v{} (it is {want})",
                self.file_header_len, self.format_version
            ));
        }
        self.key_id.parse::<KeyId>().map_err(|e| e.to_string())?;
        self.wrapped()
            .map_err(|_| "wrapped_dek is not valid base64".to_string())?;
        if self.volume_id.len() != 32 || hex::decode(&self.volume_id).is_err() {
            return Err("volume_id is not 32 hex digits".into());
        }
        if self.dek_fingerprint.len() != 32 || hex::decode(&self.dek_fingerprint).is_err() {
            return Err("dek_fingerprint is not 32 hex digits".into());
        }
        if !(1..=MAC_VERSION).contains(&self.mac_version) {
            return Err(format!(
                "header MAC version {} is not supported (this cmkfs knows 1 and {MAC_VERSION})",
                self.mac_version
            ));
        }
        if let Some(d) = &self.des {
            let ok = !d.is_empty()
                && d.len() <= 80
                && d.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !ok {
                return Err(format!("des {d:?} is not a Disk Encryption Set name"));
            }
        }
        if let Some(p) = &self.platform {
            let kid = p
                .key_id
                .parse::<KeyId>()
                .map_err(|e| format!("platform key id: {e}"))?;
            // The inner DEK is wrapped by cmkfs's own platform key, never by anything a
            // header could point elsewhere.
            if kid.vault != crate::vault::local::URL || kid.name != PLATFORM_KEY {
                return Err(format!(
                    "platform key {} is not cmkfs's platform key ({}/keys/{PLATFORM_KEY}/...)",
                    p.key_id,
                    crate::vault::local::URL
                ));
            }
            p.wrapped()
                .map_err(|_| "platform wrapped_dek is not valid base64".to_string())?;
            if p.dek_fingerprint.len() != 32 || hex::decode(&p.dek_fingerprint).is_err() {
                return Err("platform dek_fingerprint is not 32 hex digits".into());
            }
        }
        if (self.key_generation != 0 || self.retiring.is_some()) && self.mac_version < 2 {
            // Only a MAC over every field covers them (version 1 did not).
            return Err("a re-encrypted volume's header needs a version 2 MAC".into());
        }
        if let Some(r) = &self.retiring {
            if self.key_generation == 0 || r.key_generation != self.key_generation - 1 {
                return Err(format!(
                    "retiring key generation {} does not precede generation {}",
                    r.key_generation, self.key_generation
                ));
            }
            r.wrapped()
                .map_err(|_| "retiring wrapped_dek is not valid base64".to_string())?;
            if r.dek_fingerprint.len() != 32 || hex::decode(&r.dek_fingerprint).is_err() {
                return Err("retiring dek_fingerprint is not 32 hex digits".into());
            }
            if r.platform.is_some() != self.platform.is_some() {
                return Err("the retiring keys and the current ones differ in layers".into());
            }
            if let Some(p) = &r.platform {
                let kid = p
                    .key_id
                    .parse::<KeyId>()
                    .map_err(|e| format!("retiring platform key id: {e}"))?;
                if kid.vault != crate::vault::local::URL || kid.name != PLATFORM_KEY {
                    return Err(format!(
                        "retiring platform key {} is not cmkfs's platform key",
                        p.key_id
                    ));
                }
                p.wrapped()
                    .map_err(|_| "retiring platform wrapped_dek is not valid base64".to_string())?;
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

    /// Checks an unwrapped DEK against the fingerprint and the header MAC (of its
    /// `mac_version`; constant-time comparison).
    pub fn verify(&self, dek: &Dek) -> Result<(), VolumeError> {
        if dek.fingerprint() != self.dek_fingerprint {
            return Err(VolumeError::WrongKey(format!(
                "the unwrapped key's fingerprint does not match the volume ({})",
                self.key_id
            )));
        }
        let given = hex::decode(&self.header_mac).unwrap_or_default();
        if self.mac_state(dek).verify_slice(&given).is_err() {
            return Err(VolumeError::CorruptHeader {
                path: HEADER_FILE.into(),
                why: if self.mac_version == 1 {
                    "header MAC does not verify: layout fields were changed".into()
                } else {
                    "header MAC does not verify: the header was changed by someone without the key"
                        .into()
                },
            });
        }
        Ok(())
    }

    /// Unwraps the (outer, customer-key) DEK through `vault` and verifies it against this
    /// header: fingerprint, then the MAC over the header. Nothing else in the header (the
    /// platform envelope above all) may be acted on before this succeeds.
    pub fn unwrap_dek(&self, vault: &dyn Vault) -> Result<Dek, VolumeError> {
        let kid = self.key_id()?;
        let dek = unwrap_envelope(vault, &kid, self.wrap_alg, self.wrapped(), "wrapped_dek")?;
        self.verify(&dek)?;
        Ok(dek)
    }

    /// Unwraps and verifies a double-encrypted header's inner (platform-key) DEK through
    /// `platform` (cmkfs's own `local:` vault). Call it only with a header whose outer DEK
    /// verified ([`VolumeHeader::unwrap_dek`]): the MAC is what says the volume is
    /// double-encrypted at all.
    pub fn unwrap_platform_dek(&self, platform: &dyn Vault) -> Result<Dek, VolumeError> {
        let Some(p) = &self.platform else {
            return Err(VolumeError::Internal(
                "the volume is not double-encrypted".into(),
            ));
        };
        let kid = p.key_id()?;
        let dek = unwrap_envelope(
            platform,
            &kid,
            p.wrap_alg,
            p.wrapped(),
            "platform wrapped_dek",
        )?;
        p.verify(&dek)?;
        Ok(dek)
    }

    /// Unwraps a re-encrypting volume's retiring (outer) DEK through `vault` (the header's
    /// KEK) and checks its fingerprint. Call it only with a header whose current DEK verified
    /// ([`VolumeHeader::unwrap_dek`]): the MAC covers the retiring envelope.
    pub fn unwrap_retiring_dek(&self, vault: &dyn Vault) -> Result<Dek, VolumeError> {
        let Some(r) = &self.retiring else {
            return Err(VolumeError::Internal(
                "no re-encryption is running on the volume".into(),
            ));
        };
        let kid = self.key_id()?;
        let dek = unwrap_envelope(
            vault,
            &kid,
            self.wrap_alg,
            r.wrapped(),
            "retiring wrapped_dek",
        )?;
        if dek.fingerprint() != r.dek_fingerprint {
            return Err(VolumeError::WrongKey(format!(
                "the unwrapped retiring key's fingerprint does not match the volume ({kid})"
            )));
        }
        Ok(dek)
    }

    /// Unwraps a re-encrypting double-encrypted volume's retiring inner DEK through
    /// `platform` and checks its fingerprint (after [`VolumeHeader::unwrap_dek`]).
    pub fn unwrap_retiring_platform_dek(&self, platform: &dyn Vault) -> Result<Dek, VolumeError> {
        let Some(p) = self.retiring.as_ref().and_then(|r| r.platform.as_ref()) else {
            return Err(VolumeError::Internal(
                "the retiring keys have no platform layer".into(),
            ));
        };
        let kid = p.key_id()?;
        let dek = unwrap_envelope(
            platform,
            &kid,
            p.wrap_alg,
            p.wrapped(),
            "retiring platform wrapped_dek",
        )?;
        p.verify(&dek)?;
        Ok(dek)
    }

    /// Writes the header atomically into `dir`.
    pub fn write(&self, dir: &Path) -> Result<(), VolumeError> {
        self.write_then(dir, &mut || ())
    }

    /// [`VolumeHeader::write`], calling `changed` right after each change of `dir` (the temp
    /// file created, the rename), before the fsyncs (`fsutil::write_atomic_then`).
    pub fn write_then(&self, dir: &Path, changed: &mut dyn FnMut()) -> Result<(), VolumeError> {
        let path = dir.join(HEADER_FILE);
        let json = self.to_bytes()?;
        crate::fsutil::write_atomic_then(&path, &json, 0o600, changed)
            .map_err(|e| VolumeError::io(&path, e))
    }

    /// Removes the temp files header updates killed before their rename left in `dir`
    /// (`.cmkfs-tmp.cmkfs.volume.json.<hex>`: updates that never took effect; `cmkfs fsck`
    /// reports them as `header_temp_file`). Only for a caller that holds the volume lock
    /// **exclusively**: every header writer (mount, rewrap) holds it, so none of them can be
    /// between its temp file and its rename. Returns how many were removed; the first error
    /// other than "already gone" stops it.
    pub fn remove_stale_temps(dir: &Path) -> Result<usize, VolumeError> {
        let prefix = format!("{}{HEADER_FILE}.", crate::fsutil::TEMP_PREFIX);
        let mut removed = 0;
        for entry in std::fs::read_dir(dir).map_err(|e| VolumeError::io(dir, e))? {
            let entry = entry.map_err(|e| VolumeError::io(dir, e))?;
            let name = entry.file_name();
            if !name.as_encoded_bytes().starts_with(prefix.as_bytes()) {
                continue;
            }
            // Never a directory's contents: a directory under this name is not ours.
            match std::fs::remove_file(entry.path()) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(VolumeError::io(&entry.path(), e)),
            }
        }
        Ok(removed)
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
        hex::encode(self.mac_state(dek).finalize().into_bytes())
    }

    /// The HMAC state over the fields of this header's `mac_version`, ready to finalize or
    /// verify.
    fn mac_state(&self, dek: &Dek) -> Hmac<Sha256> {
        let key = dek.derive::<32>("header-mac");
        let mut m =
            <Hmac<Sha256> as Mac>::new_from_slice(&key[..]).expect("HMAC takes any key length");
        // Length-prefixed fields: no two different headers give the same MAC input.
        let mut put = |field: &[u8]| {
            m.update(&(field.len() as u64).to_le_bytes());
            m.update(field);
        };
        if self.mac_version >= 2 {
            // Every field, in this order; optional ones behind a presence byte.
            put(b"cmkfs header MAC v2");
            put(self.format.as_bytes());
            put(&self.format_version.to_le_bytes());
            put(self.volume_id.as_bytes());
            put(&self.created.to_le_bytes());
            put(self.cipher.as_bytes());
            put(&self.sector_size.to_le_bytes());
            put(self.name_cipher.as_bytes());
            put(&self.file_header_len.to_le_bytes());
            put(self.key_id.as_bytes());
            put(self.wrap_alg.as_str().as_bytes());
            put(self.wrapped_dek.as_bytes());
            put(self.dek_fingerprint.as_bytes());
            match &self.des {
                None => put(&[0]),
                Some(d) => {
                    put(&[1]);
                    put(d.as_bytes());
                }
            }
            match &self.platform {
                None => put(&[0]),
                Some(p) => {
                    put(&[1]);
                    put(p.key_id.as_bytes());
                    put(p.wrap_alg.as_str().as_bytes());
                    put(p.wrapped_dek.as_bytes());
                    put(p.dek_fingerprint.as_bytes());
                }
            }
            // Re-encryption fields, only when present: a header without them keeps the MAC
            // it had before they existed.
            if self.key_generation != 0 || self.retiring.is_some() {
                put(b"key generation");
                put(&self.key_generation.to_le_bytes());
                match &self.retiring {
                    None => put(&[0]),
                    Some(r) => {
                        put(&[1]);
                        put(&r.key_generation.to_le_bytes());
                        put(r.wrapped_dek.as_bytes());
                        put(r.dek_fingerprint.as_bytes());
                        match &r.platform {
                            None => put(&[0]),
                            Some(p) => {
                                put(&[1]);
                                put(p.key_id.as_bytes());
                                put(p.wrap_alg.as_str().as_bytes());
                                put(p.wrapped_dek.as_bytes());
                                put(p.dek_fingerprint.as_bytes());
                            }
                        }
                    }
                }
            }
            put(&self.mac_version.to_le_bytes());
            return m;
        }
        // Version 1: the layout fields only (the envelope was left out so that a rewrap needed
        // no DEK; version 2 covers it).
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
            put(field);
        }
        // Double encryption is a layout property (data has two layers): its inner DEK's
        // fingerprint is covered too, appended only when present.
        if let Some(p) = &self.platform {
            for field in [b"platform".as_slice(), p.dek_fingerprint.as_bytes()] {
                put(field);
            }
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vault::{KeyId, WrapAlg, Wrapped};

    fn wrapped(kid: &str) -> Wrapped {
        Wrapped {
            kid: kid.parse::<KeyId>().unwrap(),
            alg: WrapAlg::RsaOaep256,
            value: vec![7u8; 256],
        }
    }

    fn double() -> (Dek, VolumeHeader) {
        let (outer, inner) = (Dek::generate().unwrap(), Dek::generate().unwrap());
        let env = PlatformEnvelope::new(
            &inner,
            &wrapped("local:/keys/cmkfs-platform/00000000000000000000000000000002"),
        );
        let h = VolumeHeader::new_double(
            &outer,
            "ab".repeat(16),
            4096,
            &wrapped("local:/keys/k/00000000000000000000000000000001"),
            1,
            env,
            Layout::V3,
        )
        .with_des(Some("set-1".into()), &outer);
        (outer, h)
    }

    /// Every field of the header, at every depth, is covered: changing any one of them
    /// (through the JSON a writer of the backing store would edit) fails verification.
    #[test]
    fn every_field_is_covered_by_the_mac() {
        let (dek, h) = double();
        h.verify(&dek).unwrap();
        let json = serde_json::to_value(&h).unwrap();
        let mut paths: Vec<Vec<String>> = Vec::new();
        for (k, v) in json.as_object().unwrap() {
            if let Some(o) = v.as_object() {
                for k2 in o.keys() {
                    paths.push(vec![k.clone(), k2.clone()]);
                }
            } else if k != "header_mac" {
                paths.push(vec![k.clone()]);
            }
        }
        assert!(paths.len() >= 18, "{paths:?}");
        for path in &paths {
            let mut j = json.clone();
            let mut slot = &mut j;
            for p in path {
                slot = slot.get_mut(p).unwrap();
            }
            *slot = match slot.clone() {
                serde_json::Value::Number(n) => (n.as_u64().unwrap() ^ 1).into(),
                serde_json::Value::String(s) if s == "RSA-OAEP-256" => "RSA-OAEP".into(),
                serde_json::Value::String(s) => {
                    // Same shape, one character changed (hex stays hex, ids stay ids).
                    let mut c: Vec<char> = s.chars().collect();
                    let last = c.len() - 1;
                    c[last] = if c[last] == '1' { '2' } else { '1' };
                    c.into_iter().collect::<String>().into()
                }
                other => panic!("unexpected {other}"),
            };
            let changed: VolumeHeader = serde_json::from_value(j).unwrap();
            assert!(
                changed.verify(&dek).is_err(),
                "changing {path:?} went unnoticed"
            );
        }
        // Optional fields: removing them is a change too.
        for strip in ["des", "platform"] {
            let mut j = json.clone();
            j.as_object_mut().unwrap().remove(strip);
            let changed: VolumeHeader = serde_json::from_value(j).unwrap();
            assert!(
                changed.verify(&dek).is_err(),
                "removing {strip} went unnoticed"
            );
        }
    }

    #[test]
    fn version_1_macs_still_verify_and_upgrade() {
        let (dek, h) = double();
        let v1 = h.with_mac_v1_for_tests(&dek);
        assert_eq!(v1.mac_version, 1);
        v1.verify(&dek).unwrap();
        let text = String::from_utf8(v1.to_bytes().unwrap()).unwrap();
        assert!(!text.contains("mac_version"), "{text}");
        // Version 1 left the envelope uncovered: that is what the upgrade closes.
        let moved = VolumeHeader {
            des: None,
            ..v1.clone()
        };
        moved.verify(&dek).unwrap();
        let up = v1.upgraded(&dek);
        assert_eq!(up.mac_version, MAC_VERSION);
        up.verify(&dek).unwrap();
        assert!(VolumeHeader {
            des: None,
            ..up.clone()
        }
        .verify(&dek)
        .is_err());
        // Claiming version 1 for a version 2 header's MAC fails.
        assert!(VolumeHeader {
            mac_version: 1,
            ..up
        }
        .verify(&dek)
        .is_err());
    }

    #[test]
    fn a_rewrap_keeps_only_the_envelope_changing() {
        let (dek, h) = double();
        let r = h.rewrapped(
            &wrapped("local:/keys/k/00000000000000000000000000000009"),
            &dek,
        );
        r.verify(&dek).unwrap();
        assert_eq!(h.change_outside_rewrap(&r), None);
        let elsewhere = h.rewrapped(
            &wrapped("https://127.0.0.1:1/keys/k/00000000000000000000000000000009"),
            &dek,
        );
        assert!(h
            .change_outside_rewrap(&elsewhere)
            .unwrap()
            .contains("vault"));
        let single = VolumeHeader {
            platform: None,
            ..h.clone()
        };
        assert!(single
            .change_outside_rewrap(&h)
            .unwrap()
            .contains("platform entry was added"));
    }

    #[test]
    fn a_platform_envelope_must_name_cmkfs_platform_key() {
        let (_, mut h) = double();
        h.validate().unwrap();
        h.platform.as_mut().unwrap().key_id =
            "pkcs11:/tmp/x.so?token=x/keys/cmkfs-platform/00000000000000000000000000000002".into();
        assert!(h
            .validate()
            .unwrap_err()
            .contains("not cmkfs's platform key"));
    }
}
