//! The header's successors: each change of a volume's state (a rewrap, a re-encryption's
//! start and end, the MAC and format upgrades) as a new header with its MAC recomputed under
//! the DEK, and the check that a header read later differs from this one only as a rewrap
//! would ([`VolumeHeader::change_outside_rewrap`]).

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;

use super::{PlatformEnvelope, RetiringEnvelope, VolumeHeader, FORMAT_V2, MAC_VERSION};
use crate::crypto::Dek;
use crate::vault::Wrapped;

impl VolumeHeader {
    /// Re-points the header at a new wrap of the same DEK (rotation / key change) and
    /// recomputes the MAC (version 2), which needs the DEK: only someone who could unwrap
    /// the volume can rewrap it. The platform envelope of a double-encrypted volume is kept as
    /// it is: only the customer key changes. A re-encrypting volume's retiring DEK must be
    /// rewrapped by the same key (`retiring`), so that both stay reachable.
    pub fn rewrapped(&self, wrapped: &Wrapped, dek: &Dek) -> VolumeHeader {
        self.rewrapped_both(wrapped, None, dek)
    }

    /// [`VolumeHeader::rewrapped`] of a header whose retiring DEK `retiring` wrapped as well
    /// (`None`: keep it as it is; only for headers without one).
    pub fn rewrapped_both(
        &self,
        wrapped: &Wrapped,
        retiring: Option<&Wrapped>,
        dek: &Dek,
    ) -> VolumeHeader {
        let mut h = VolumeHeader {
            key_id: wrapped.kid.to_string(),
            wrap_alg: wrapped.alg,
            wrapped_dek: B64.encode(&wrapped.value),
            mac_version: MAC_VERSION,
            ..self.clone()
        };
        if let (Some(r), Some(w)) = (h.retiring.as_mut(), retiring) {
            r.wrapped_dek = B64.encode(&w.value);
        }
        h.header_mac = h.mac(dek);
        h
    }

    /// The header of a re-encryption's start: the new DEK (`dek`, wrapped as `wrapped`,
    /// with the new inner envelope `platform` for a double-encrypted volume) becomes the
    /// volume's, one generation up, and the current one moves to `retiring` (wrapped again
    /// by the same key as `retiring_wrapped`). The MAC is the new DEK's.
    pub fn reencrypting(
        &self,
        dek: &Dek,
        wrapped: &Wrapped,
        platform: Option<PlatformEnvelope>,
        retiring_wrapped: &Wrapped,
    ) -> VolumeHeader {
        let mut h = VolumeHeader {
            key_id: wrapped.kid.to_string(),
            wrap_alg: wrapped.alg,
            wrapped_dek: B64.encode(&wrapped.value),
            dek_fingerprint: dek.fingerprint(),
            platform,
            key_generation: self.key_generation.wrapping_add(1),
            retiring: Some(RetiringEnvelope {
                key_generation: self.key_generation,
                wrapped_dek: B64.encode(&retiring_wrapped.value),
                dek_fingerprint: self.dek_fingerprint.clone(),
                platform: self.platform.clone(),
            }),
            mac_version: MAC_VERSION,
            ..self.clone()
        };
        h.header_mac = h.mac(dek);
        h
    }

    /// The header at a re-encryption's end: the retiring DEK is gone (MAC by `dek`, the
    /// current DEK).
    pub fn reencrypted(&self, dek: &Dek) -> VolumeHeader {
        let mut h = VolumeHeader {
            retiring: None,
            ..self.clone()
        };
        h.header_mac = h.mac(dek);
        h
    }

    /// The same header with a version 2 MAC (over every field): what the first mount of a
    /// volume made before version 2 writes back.
    pub fn upgraded(&self, dek: &Dek) -> VolumeHeader {
        let mut h = VolumeHeader {
            mac_version: MAC_VERSION,
            ..self.clone()
        };
        h.header_mac = h.mac(dek);
        h
    }

    /// The same header with a version 1 MAC, as cmkfs wrote them before version 2: for tests
    /// of the upgrade path only.
    #[doc(hidden)]
    pub fn with_mac_v1_for_tests(&self, dek: &Dek) -> VolumeHeader {
        let mut h = VolumeHeader {
            mac_version: 1,
            ..self.clone()
        };
        h.header_mac = h.mac(dek);
        h
    }

    /// Why `newer` cannot be a rewrap of this header: the first field outside the outer
    /// envelope (`key_id`'s key and version, `wrap_alg`, `wrapped_dek`, the MAC) that differs,
    /// a different vault, or a MAC version going back. `None` when it could be one.
    pub fn change_outside_rewrap(&self, newer: &VolumeHeader) -> Option<String> {
        let retiring_same = match (&self.retiring, &newer.retiring) {
            (None, None) => true,
            // A rewrap rewraps the retiring DEK too: only its wrap may change.
            (Some(a), Some(b)) => {
                a.key_generation == b.key_generation
                    && a.dek_fingerprint == b.dek_fingerprint
                    && a.platform == b.platform
            }
            _ => false,
        };
        let fixed: [(&str, bool); 13] = [
            ("format", self.format == newer.format),
            (
                "format_version",
                self.format_version == newer.format_version,
            ),
            ("volume_id", self.volume_id == newer.volume_id),
            ("created", self.created == newer.created),
            ("cipher", self.cipher == newer.cipher),
            ("sector_size", self.sector_size == newer.sector_size),
            ("name_cipher", self.name_cipher == newer.name_cipher),
            (
                "file_header_len",
                self.file_header_len == newer.file_header_len,
            ),
            (
                "dek_fingerprint",
                self.dek_fingerprint == newer.dek_fingerprint,
            ),
            ("des", self.des == newer.des),
            ("platform", self.platform == newer.platform),
            (
                "key_generation",
                self.key_generation == newer.key_generation,
            ),
            ("retiring", retiring_same),
        ];
        if let Some((name, _)) = fixed.iter().find(|(_, same)| !same) {
            return Some(match *name {
                "platform" => match (&self.platform, &newer.platform) {
                    (None, Some(_)) => "a platform entry was added".into(),
                    (Some(_), None) => "the platform entry was removed".into(),
                    _ => "the platform entry was changed".into(),
                },
                other => format!("{other} was changed"),
            });
        }
        if newer.mac_version < self.mac_version {
            return Some("the header MAC version went back".into());
        }
        match (self.key_id(), newer.key_id()) {
            (Ok(a), Ok(b)) if a.vault != b.vault => Some(format!(
                "the key's vault was changed from {:?} to {:?}",
                a.vault, b.vault
            )),
            (Ok(_), Ok(_)) => None,
            _ => Some("the key id is malformed".into()),
        }
    }

    /// The same header in on-disk format v2 (what `cmkfs upgrade` converts v1 to; the data
    /// offset stays 32), with a current (version 2) MAC recomputed with `dek` (the outer
    /// DEK): the last step of `cmkfs upgrade`, once every file is converted.
    pub fn format_upgraded(&self, dek: &Dek) -> VolumeHeader {
        let mut h = VolumeHeader {
            format_version: FORMAT_V2,
            mac_version: MAC_VERSION,
            ..self.clone()
        };
        h.header_mac = h.mac(dek);
        h
    }

    /// The same header claiming on-disk format `version`, its MAC (of the same MAC version)
    /// recomputed: tests build old volumes with it.
    #[doc(hidden)]
    pub fn with_format_version(&self, version: u32, dek: &Dek) -> VolumeHeader {
        let mut h = VolumeHeader {
            format_version: version,
            ..self.clone()
        };
        h.header_mac = h.mac(dek);
        h
    }
}
