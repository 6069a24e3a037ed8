//! What a backup archive says about itself (docs/FORMAT.md, "Backup archive"): the key
//! envelope (the DEK wrapped by the backup key), one [`Member`] record per backing entry with
//! its digest, and the manifest that lists them, authenticated by a MAC keyed from the DEK.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::BackupError;
use crate::crypto::Dek;
use crate::vault::{KeyId, WrapAlg, Wrapped};
use crate::volume::header::VolumeHeader;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// `format` of the key envelope and the manifest.
pub const FORMAT: &str = "cmkfs-backup";
/// Version of the archive layout this cmkfs writes: 3 (version 2 — member digests over the
/// data's SHA-256, per-file data digests and change keys, incremental archives — plus
/// per-chunk digests of each file, so an incremental archive may store only the chunks of a
/// file that changed: [`Delta`]).
pub const VERSION: u32 = 3;
/// The first version whose files carry chunk digests and may be stored as a [`Delta`].
pub const DELTA_VERSION: u32 = 3;
/// Oldest archive layout this cmkfs restores (1: member digests over the data bytes).
pub const MIN_VERSION: u32 = 1;
/// HKDF label (under the volume's outer DEK) of the manifest MAC key.
const MAC_LABEL: &str = "backup-manifest";
/// Upper bound on the key envelope and the MAC member (bytes).
pub const MAX_SMALL: u64 = 64 * 1024;
/// Upper bound on the manifest (bytes): about 100 bytes per member, so ~10 million members.
pub const MAX_MANIFEST: u64 = 1 << 30;

/// The DEK(s) of the volume wrapped by the backup key: the first member of an archive, so a
/// restore asks the vault before it writes anything.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KeyEnvelope {
    /// Always [`FORMAT`].
    pub format: String,
    /// Always [`VERSION`].
    pub version: u32,
    /// The source volume's id.
    pub volume_id: String,
    /// The backup key version that wrapped (full id).
    pub key_id: String,
    /// Wrap algorithm.
    pub wrap_alg: WrapAlg,
    /// The outer (customer) DEK, wrapped (standard base64).
    pub wrapped_dek: String,
    /// Its fingerprint (public; confirms the unwrap).
    pub dek_fingerprint: String,
    /// Double encryption: the inner (platform) DEK, wrapped by the same backup key (so the
    /// archive does not depend on the source machine's platform key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inner: Option<InnerEnvelope>,
}

/// The inner DEK of a double-encrypted volume in a [`KeyEnvelope`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct InnerEnvelope {
    /// Wrapped by the backup key (standard base64).
    pub wrapped_dek: String,
    /// Its fingerprint.
    pub dek_fingerprint: String,
}

impl KeyEnvelope {
    /// The envelope of `outer` (and `inner`) wrapped as `wrapped` (and `wrapped_inner`).
    pub fn new(
        volume_id: &str,
        outer: &Dek,
        wrapped: &Wrapped,
        inner: Option<(&Dek, &Wrapped)>,
    ) -> KeyEnvelope {
        KeyEnvelope {
            format: FORMAT.into(),
            version: VERSION,
            volume_id: volume_id.into(),
            key_id: wrapped.kid.to_string(),
            wrap_alg: wrapped.alg,
            wrapped_dek: B64.encode(&wrapped.value),
            dek_fingerprint: outer.fingerprint(),
            inner: inner.map(|(d, w)| InnerEnvelope {
                wrapped_dek: B64.encode(&w.value),
                dek_fingerprint: d.fingerprint(),
            }),
        }
    }

    /// Parses and checks the structure (format, version, key id, base64).
    pub fn parse(bytes: &[u8]) -> Result<KeyEnvelope, BackupError> {
        let e: KeyEnvelope = serde_json::from_slice(bytes)
            .map_err(|err| BackupError::Corrupt(format!("the key envelope is invalid: {err}")))?;
        if e.format != FORMAT || !(MIN_VERSION..=VERSION).contains(&e.version) {
            return Err(BackupError::Corrupt(format!(
                "the key envelope is {} version {}, this cmkfs reads {FORMAT} versions \
                 {MIN_VERSION} to {VERSION}",
                e.format, e.version
            )));
        }
        e.kid()?;
        for w in std::iter::once(&e.wrapped_dek).chain(e.inner.as_ref().map(|i| &i.wrapped_dek)) {
            B64.decode(w).map_err(|_| {
                BackupError::Corrupt("the key envelope's wrapped DEK is not base64".into())
            })?;
        }
        Ok(e)
    }

    /// The backup key id.
    pub fn kid(&self) -> Result<KeyId, BackupError> {
        self.key_id
            .parse()
            .map_err(|e| BackupError::Corrupt(format!("the key envelope's key id is invalid: {e}")))
    }

    /// Unwraps the DEK(s) through `vault` (as the caller) and checks their fingerprints.
    pub fn unwrap(
        &self,
        vault: &dyn crate::vault::Vault,
    ) -> Result<(Dek, Option<Dek>), BackupError> {
        let kid = self.kid()?;
        let one = |wrapped: &str, fp: &str| -> Result<Dek, BackupError> {
            let w = B64
                .decode(wrapped)
                .map_err(|_| BackupError::Corrupt("wrapped DEK is not base64".into()))?;
            let raw = vault
                .unwrap_key(&kid, self.wrap_alg, &w)
                .map_err(|e| BackupError::Key(kid.to_string(), e))?;
            let dek = Dek::from_slice(&raw).map_err(|_| {
                BackupError::Corrupt(format!("{kid} unwrapped something that is not a cmkfs DEK"))
            })?;
            if dek.fingerprint() != fp {
                return Err(BackupError::Corrupt(format!(
                    "the DEK unwrapped by {kid} does not match the archive's fingerprint"
                )));
            }
            Ok(dek)
        };
        let outer = one(&self.wrapped_dek, &self.dek_fingerprint)?;
        let inner = match &self.inner {
            Some(i) => Some(one(&i.wrapped_dek, &i.dek_fingerprint)?),
            None => None,
        };
        Ok((outer, inner))
    }
}

/// The source volume's layout, as the restored header needs it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Source {
    /// Volume id (kept by a plain restore; see docs/FORMAT.md, "Restore", step 5).
    pub volume_id: String,
    /// Creation time of the volume (Unix seconds).
    pub created: u64,
    /// On-disk format version (2 or 3): the restored volume keeps it.
    pub format_version: u32,
    /// Data unit size.
    pub sector_size: u32,
    /// Key generation of the DEK (file headers name it).
    pub key_generation: u32,
    /// Whether the volume is double-encrypted.
    pub double: bool,
    /// The key that wrapped the source's DEK (for the record only).
    pub key_id: String,
    /// The source's Disk Encryption Set (for the record only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub des: Option<String>,
}

impl Source {
    /// The layout of `h`.
    pub fn of(h: &VolumeHeader) -> Source {
        Source {
            volume_id: h.volume_id.clone(),
            created: h.created,
            format_version: h.format_version,
            sector_size: h.sector_size,
            key_generation: h.key_generation,
            double: h.platform.is_some(),
            key_id: h.key_id.clone(),
            des: h.des.clone(),
        }
    }
}

/// What kind of backing entry a member is.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A directory.
    Dir,
    /// A regular file (its ciphertext).
    File,
    /// A symlink (its stored, encrypted target).
    Symlink,
    /// Another name of a regular file or symlink met earlier (`target`).
    Hardlink,
    /// A FIFO.
    Fifo,
    /// A character device node.
    Char,
    /// A block device node.
    Block,
}

/// Everything the archive says about one backing entry. Its digest ([`Digester`]) covers
/// this record (as canonical JSON) and the data bytes of its extents, so a change to any
/// byte that means something — a mode in a tar header, an xattr value in a PAX record, a
/// data byte — is found.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Member {
    /// Path below the volume root (`""` for the root), `/`-separated backing names.
    pub path: String,
    /// Kind.
    pub kind: Kind,
    /// Permission bits (`0o7777`).
    pub mode: u32,
    /// Owner.
    pub uid: u64,
    /// Group.
    pub gid: u64,
    /// Modification time (seconds, nanoseconds).
    pub mtime: (i64, u32),
    /// Access time (seconds, nanoseconds).
    pub atime: (i64, u32),
    /// Symlink target (bytes as stored: base64url or a side file's name) or the path of
    /// the member a hard link repeats.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Device number (major, minor) of a device node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rdev: Option<(u32, u32)>,
    /// Backing extended attributes (cmkfs's own, name and value encrypted), sorted by name;
    /// values hex.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub xattrs: Vec<(String, String)>,
    /// Length of a regular file's backing file.
    #[serde(default)]
    pub size: u64,
    /// Data extents (offset, length) of a regular file, sorted, non-empty, inside `size`;
    /// the rest are holes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extents: Vec<(u64, u64)>,
}

impl Member {
    /// Bytes of data the member carries.
    pub fn data_len(&self) -> u64 {
        self.extents.iter().map(|e| e.1).sum()
    }
}

/// Computes a member's digest as its data streams (docs/FORMAT.md, "Backup archive"):
///
/// - version 1: SHA-256(len(json) as u64 LE ‖ json ‖ data bytes);
/// - version 2: SHA-256(len(json) as u64 LE ‖ json ‖ D) for a regular file, where D, the
///   member's *data digest*, is SHA-256(size ‖ extent count ‖ (offset, length)… ‖ data
///   bytes), all numbers u64 LE; SHA-256(len(json) ‖ json) for anything else. An
///   incremental archive can so name a file's data by D without carrying it.
pub struct Digester {
    version: u32,
    record: Sha256,
    data: Option<Sha256>,
}

impl Digester {
    /// A digester of `m` under archive layout `version`.
    pub fn new(m: &Member, version: u32) -> Digester {
        let mut record = Sha256::new();
        // Serializing a plain struct of strings and integers cannot fail.
        let json = serde_json::to_vec(m).unwrap_or_default();
        record.update((json.len() as u64).to_le_bytes());
        record.update(&json);
        let data = (version >= 2 && m.kind == Kind::File).then(|| {
            let mut d = Sha256::new();
            d.update(m.size.to_le_bytes());
            d.update((m.extents.len() as u64).to_le_bytes());
            for (o, l) in &m.extents {
                d.update(o.to_le_bytes());
                d.update(l.to_le_bytes());
            }
            d
        });
        Digester {
            version,
            record,
            data,
        }
    }

    /// Feeds data bytes (the extents', in order).
    pub fn update(&mut self, bytes: &[u8]) {
        match (&mut self.data, self.version) {
            (Some(d), _) => d.update(bytes),
            (None, 1) => self.record.update(bytes),
            // Version 2 and not a file: there is no data.
            (None, _) => {}
        }
    }

    /// The member digest and, for a version 2 file, its data digest (hex).
    pub fn finish(mut self) -> (String, Option<String>) {
        let data = self.data.take().map(|d| d.finalize());
        if let Some(d) = &data {
            self.record.update(d);
        }
        (hex::encode(self.record.finalize()), data.map(hex::encode))
    }

    /// The version 2 digest of `m` whose data digest is `data` (hex; files only), without
    /// the data: how an incremental archive's references are checked.
    pub fn with_data(m: &Member, data: Option<&str>) -> Result<String, BackupError> {
        let mut d = Digester::new(m, 2);
        d.data = None;
        match (m.kind, data) {
            (Kind::File, Some(h)) => {
                let raw = hex::decode(h)
                    .ok()
                    .filter(|r| r.len() == 32)
                    .ok_or_else(|| {
                        BackupError::Corrupt(format!("{:?}: bad data digest", m.path))
                    })?;
                d.record.update(&raw);
            }
            (Kind::File, None) => {
                return Err(BackupError::Corrupt(format!(
                    "{:?}: a file without its data digest",
                    m.path
                )))
            }
            _ => {}
        }
        Ok(hex::encode(d.record.finalize()))
    }
}

/// What tells an incremental backup, without reading a file, that its ciphertext has not
/// changed since the base (as restic and git do): the backing file's inode, size, mtime,
/// ctime (which no caller can set back) and data layout, all as the base saw them.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ChangeKey {
    /// Inode number.
    pub ino: u64,
    /// Length.
    pub size: u64,
    /// Modification time (seconds, nanoseconds).
    pub mtime: (i64, u32),
    /// Status change time (seconds, nanoseconds).
    pub ctime: (i64, u32),
    /// SHA-256 (hex, first 16 bytes) of the data extents list.
    pub layout: String,
}

impl ChangeKey {
    /// The layout hash of `extents`.
    pub fn layout_of(extents: &[(u64, u64)]) -> String {
        let mut h = Sha256::new();
        for (o, l) in extents {
            h.update(o.to_le_bytes());
            h.update(l.to_le_bytes());
        }
        hex::encode(&h.finalize()[..16])
    }
}

/// One line of the manifest: an entry of the volume, in walk order (parents first).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// [`Member::path`].
    pub path: String,
    /// The member digest ([`Digester`], hex).
    pub sha256: String,
    /// Version 2, regular files: the data digest ([`Digester`], hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_sha256: Option<String>,
    /// Version 2, regular files: the change key the backup saw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change: Option<ChangeKey>,
    /// Incremental archives: the entry is not stored in this archive; its data (a regular
    /// file's) is that of the base state's entry at this path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// With `from`: the entry's record when it differs from the base entry's (renamed,
    /// owner, mode, times or xattrs changed); absent when identical (then `from` is `path`).
    /// With `delta`: the file's whole record (the stored member carries only the changed
    /// chunks' extents).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<Box<Member>>,
    /// Version 3, regular files: the chunk digests ([`super::delta::chunk_digests`]), one per
    /// [`super::delta::grain`] bytes of the backing file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunks: Option<Vec<String>>,
    /// Version 3 incremental archives: the file is stored as the chunks that changed since
    /// the base entry `delta.from`; the rest is the base's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<Delta>,
}

/// A file of an incremental archive stored as its changed chunks: the stored member is the
/// file's record with only the data extents inside those chunks (a GNU sparse member); the
/// restore takes the base entry's file, makes each listed chunk a hole, writes the member's
/// extents, sets the size, and checks the result against `data_sha256`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Delta {
    /// The base state's entry whose file this one starts from (a regular file).
    pub from: String,
    /// The data digest of that base entry, which the chunk digests were compared against:
    /// a restore checks it before it takes the base's file.
    pub base_sha256: String,
    /// Indices of the chunks stored (sorted, unique, inside the file).
    pub chunks: Vec<u64>,
    /// The stored member's own digest (its record with the changed extents only).
    pub member_sha256: String,
}

/// The archive an incremental archive is based on.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BaseLink {
    /// SHA-256 (hex) of the base's manifest member: binds the whole base (every member
    /// digest, its key envelope, its own base).
    pub manifest_sha256: String,
    /// When the base was taken (Unix seconds).
    pub created: u64,
    /// The base's file name when this archive was made (for messages only).
    pub archive: String,
    /// Archives before this one in its chain (1: the base is a full backup).
    pub depth: u32,
}

/// What an incremental archive itself carries.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Stored {
    /// Members stored (new or changed entries).
    pub members: u64,
    /// Data bytes stored.
    pub bytes: u64,
    /// Entries taken from the base by reference.
    pub referenced: u64,
    /// Of those, files whose record changed (renamed, metadata) with the same data.
    pub changed_records: u64,
    /// Of the members stored, files stored as their changed chunks only ([`Delta`]).
    #[serde(default)]
    pub deltas: u64,
}

/// Counts of what an archive holds.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Totals {
    /// Directories (the root included).
    pub dirs: u64,
    /// Regular files.
    pub files: u64,
    /// Symlinks.
    pub symlinks: u64,
    /// Hard links (names past the first).
    pub hardlinks: u64,
    /// FIFOs and device nodes.
    pub special: u64,
    /// Data bytes (holes excluded).
    pub bytes: u64,
    /// Sparse files.
    pub sparse: u64,
}

/// The manifest: the second-to-last member, followed by its MAC.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always [`FORMAT`].
    pub format: String,
    /// Always [`VERSION`].
    pub version: u32,
    /// When the backup was taken (Unix seconds).
    pub created: u64,
    /// Whether the archive is a point-in-time view: the volume was locked (not mounted) or
    /// its writes were frozen through the mount after a drain that reached every file open
    /// through it; false for `--force` on a mount that could not freeze, and for a freeze
    /// whose drain could not reach such a file or whose daemon does not say
    /// ([`crate::control::FrozenAnswer::exact`]).
    pub point_in_time: bool,
    /// The source volume.
    pub source: Source,
    /// SHA-256 of the key envelope member (hex).
    pub key_envelope_sha256: String,
    /// Counts (of the whole volume, also in an incremental archive).
    pub totals: Totals,
    /// Every entry of the volume, in walk order; in a full archive each is a member after
    /// the key envelope, in the same order.
    pub members: Vec<Entry>,
    /// Incremental archives: the archive this one is based on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<BaseLink>,
    /// Incremental archives: what this archive carries itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored: Option<Stored>,
}

/// The manifest MAC: HMAC-SHA256 under HKDF(outer DEK, "backup-manifest") over the
/// manifest member's exact bytes.
pub fn mac(dek: &Dek, manifest: &[u8]) -> String {
    hex::encode(mac_state(dek, manifest).finalize().into_bytes())
}

fn mac_state(dek: &Dek, manifest: &[u8]) -> Hmac<Sha256> {
    let key = dek.derive::<32>(MAC_LABEL);
    // HMAC takes keys of any length.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&key[..]).expect("HMAC key of any length");
    m.update(manifest);
    m
}

/// Checks the manifest MAC in constant time.
pub fn verify_mac(dek: &Dek, manifest: &[u8], given_hex: &[u8]) -> Result<(), BackupError> {
    let given = std::str::from_utf8(given_hex)
        .ok()
        .and_then(|s| hex::decode(s.trim()).ok())
        .unwrap_or_default();
    mac_state(dek, manifest).verify_slice(&given).map_err(|_| {
        BackupError::Corrupt(
            "the manifest MAC does not verify: the archive was changed by someone without the key"
                .into(),
        )
    })
}

/// SHA-256 of `bytes`, hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}
