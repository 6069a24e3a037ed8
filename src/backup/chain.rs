//! An archive's seals (key envelope, manifest, MAC) read before its contents, and the chain
//! of a full archive and its incremental archives checked as a whole, so a restore refuses a
//! missing, reordered, foreign or tampered archive before it writes anything.
//!
//! The seals are found by one pass over the tar headers that seeks past the data, so reading
//! them costs little even for a large archive.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use super::archive::{self, Parsed, KEY_MEMBER, MAC_MEMBER, MANIFEST_MEMBER};
use super::manifest::{self, KeyEnvelope, Kind, Manifest, MAX_MANIFEST, MAX_SMALL};
use super::BackupError;
use crate::crypto::Dek;

fn corrupt(what: impl std::fmt::Display) -> BackupError {
    BackupError::Corrupt(what.to_string())
}

/// Reads a small member whole, refusing one larger than `max`.
pub(super) fn read_small<R: Read>(
    e: &mut tar::Entry<'_, R>,
    max: u64,
    what: &str,
) -> Result<Vec<u8>, BackupError> {
    if e.size() > max {
        return Err(corrupt(format!("the {what} is too large")));
    }
    let mut v = Vec::with_capacity(e.size() as usize);
    e.read_to_end(&mut v).map_err(BackupError::Read)?;
    Ok(v)
}

/// An archive's seals, as read (nothing authenticated yet: see [`Sealed::open`]).
pub struct Sealed {
    /// The archive file.
    pub path: PathBuf,
    /// The key envelope member's bytes.
    pub env_bytes: Vec<u8>,
    /// The key envelope, parsed.
    pub envelope: KeyEnvelope,
    /// The manifest member's bytes.
    pub manifest_bytes: Vec<u8>,
    mac: Vec<u8>,
    /// SHA-256 (hex) of the manifest member: what an incremental archive names its base by.
    pub manifest_sha256: String,
    /// Members stored between the key envelope and the manifest.
    pub stored_members: u64,
    /// Size of the archive file.
    pub size: u64,
}

impl Sealed {
    /// The archive's file name, for messages.
    pub fn name(&self) -> String {
        self.path.file_name().map_or_else(
            || self.path.display().to_string(),
            |n| n.to_string_lossy().into(),
        )
    }
}

/// Reads the seals of the archive at `path` (key envelope first, manifest and MAC last,
/// nothing after them).
pub fn read_sealed(path: &Path) -> Result<Sealed, BackupError> {
    let shown = path.display().to_string();
    let f = File::open(path).map_err(|e| BackupError::io(&shown, e))?;
    let size = f.metadata().map_err(|e| BackupError::io(&shown, e))?.len();
    // A small buffer: every seek past a member's data drops it, and a member's headers are
    // a few blocks.
    let mut ar = tar::Archive::new(BufReader::with_capacity(4096, f));
    let mut entries = ar.entries_with_seek().map_err(BackupError::Read)?.raw(true);
    let (mut first, p) =
        archive::next(&mut entries)?.ok_or_else(|| corrupt("the archive is empty"))?;
    match p {
        Parsed::Own(n) if n == KEY_MEMBER => {}
        _ => {
            return Err(corrupt(
                "the archive does not start with its key envelope (not a cmkfs backup?)",
            ))
        }
    }
    let env_bytes = read_small(&mut first, MAX_SMALL, "key envelope")?;
    drop(first);
    let envelope = KeyEnvelope::parse(&env_bytes)?;
    let mut stored_members = 0u64;
    let manifest_bytes = loop {
        let (mut e, p) = archive::next(&mut entries)?
            .ok_or_else(|| corrupt("the archive ends before its manifest"))?;
        match p {
            Parsed::Member(_) => stored_members += 1,
            Parsed::Own(n) if n == MANIFEST_MEMBER => {
                break read_small(&mut e, MAX_MANIFEST, "manifest")?
            }
            Parsed::Own(n) => return Err(corrupt(format!("unexpected member {n:?}"))),
        }
    };
    let (mac, end) = {
        let (mut e, p) =
            archive::next(&mut entries)?.ok_or_else(|| corrupt("the manifest MAC is missing"))?;
        match p {
            Parsed::Own(n) if n == MAC_MEMBER => {
                let end = e.raw_file_position() + e.size().div_ceil(512) * 512;
                (read_small(&mut e, MAX_SMALL, "MAC")?, end)
            }
            _ => return Err(corrupt("the manifest MAC is missing")),
        }
    };
    if archive::next(&mut entries)?.is_some() {
        return Err(corrupt("members follow the manifest MAC"));
    }
    // Reading seeks past data, so a cut in the last member's padding or in the end-of-archive
    // blocks reads as an end: the size tells.
    if size < end + 1024 {
        return Err(BackupError::Read(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the end-of-archive blocks are missing",
        )));
    }
    Ok(Sealed {
        path: path.to_path_buf(),
        manifest_sha256: manifest::sha256_hex(&manifest_bytes),
        env_bytes,
        envelope,
        manifest_bytes,
        mac,
        stored_members,
        size,
    })
}

impl Sealed {
    /// Authenticates the manifest with the unwrapped outer DEK and checks it against the
    /// key envelope and itself: format and version, the envelope's digest, the volume, the
    /// encryption type (`double`), safe and unique paths, references only in an incremental
    /// archive, and as many stored members as entries that are not references.
    pub fn open(&self, dek: &Dek, double: bool) -> Result<Manifest, BackupError> {
        manifest::verify_mac(dek, &self.manifest_bytes, &self.mac)?;
        let man: Manifest = serde_json::from_slice(&self.manifest_bytes)
            .map_err(|e| corrupt(format!("the manifest is invalid: {e}")))?;
        if man.format != manifest::FORMAT || man.version != self.envelope.version {
            return Err(corrupt("the manifest's format is unknown"));
        }
        if man.key_envelope_sha256 != manifest::sha256_hex(&self.env_bytes) {
            return Err(corrupt("the key envelope was replaced"));
        }
        if man.source.volume_id != self.envelope.volume_id || man.source.double != double {
            return Err(corrupt("the key envelope belongs to another volume"));
        }
        if crate::volume::layout::Layout::for_format(man.source.format_version).is_none() {
            return Err(BackupError::Refused(format!(
                "the archive holds a volume of on-disk format {}; this cmkfs restores {} and {}",
                man.source.format_version,
                crate::volume::header::FORMAT_V2,
                crate::volume::header::FORMAT_VERSION
            )));
        }
        if man.base.is_some() != man.stored.is_some() || (man.version < 2 && man.base.is_some()) {
            return Err(corrupt(
                "the manifest's incremental fields are inconsistent",
            ));
        }
        let mut seen = HashSet::with_capacity(man.members.len());
        let mut references = 0u64;
        for (i, e) in man.members.iter().enumerate() {
            archive::check_rel(&e.path)?;
            if (i == 0) != e.path.is_empty() {
                return Err(corrupt("the manifest does not start with the root"));
            }
            if !seen.insert(e.path.as_str()) {
                return Err(corrupt(format!("the manifest lists {:?} twice", e.path)));
            }
            if let Some(dl) = &e.delta {
                if man.base.is_none() || man.version < manifest::DELTA_VERSION || e.from.is_some() {
                    return Err(corrupt(format!(
                        "{:?} is stored as changed chunks, but not in an incremental archive \
                         of version {} or later",
                        e.path,
                        manifest::DELTA_VERSION
                    )));
                }
                archive::check_rel(&dl.from)?;
                match &e.record {
                    Some(r)
                        if r.path == e.path && r.kind == Kind::File && e.data_sha256.is_some() => {}
                    _ => {
                        return Err(corrupt(format!(
                            "{:?} is stored as changed chunks without its file record",
                            e.path
                        )))
                    }
                }
            } else if let Some(from) = &e.from {
                if man.base.is_none() {
                    return Err(corrupt(format!(
                        "{:?} refers to a base, but the archive is a full backup",
                        e.path
                    )));
                }
                archive::check_rel(from)?;
                match &e.record {
                    Some(r) if r.path != e.path => {
                        return Err(corrupt(format!(
                            "the record of {:?} names another path",
                            e.path
                        )))
                    }
                    Some(r) if r.kind == Kind::File && e.data_sha256.is_none() => {
                        return Err(corrupt(format!("{:?} lacks its data digest", e.path)))
                    }
                    None if *from != e.path => {
                        return Err(corrupt(format!("{:?} moved without its record", e.path)))
                    }
                    _ => {}
                }
                references += 1;
            } else if e.record.is_some() {
                return Err(corrupt(format!("{:?} has a record but no base", e.path)));
            }
        }
        if man.members.len() as u64 - references != self.stored_members {
            return Err(corrupt(format!(
                "the archive stores {} members, its manifest lists {}",
                self.stored_members,
                man.members.len() as u64 - references
            )));
        }
        Ok(man)
    }
}

/// One archive of a chain, authenticated.
pub struct Link {
    /// Its seals.
    pub sealed: Sealed,
    /// Its manifest (authenticated).
    pub manifest: Manifest,
    /// The outer DEK it was unwrapped to.
    pub dek: Dek,
    /// The inner DEK of a double-encrypted volume.
    pub inner: Option<Dek>,
}

fn when(secs: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
        .to_string()
}

/// Checks that `links` are one chain, oldest first: a full archive, then each incremental
/// archive based on the one before it (by the SHA-256 of its manifest), all of one volume
/// under one DEK.
pub fn check_chain(links: &[Link]) -> Result<(), BackupError> {
    let Some(first) = links.first() else {
        return Err(BackupError::Refused("no archive to restore".into()));
    };
    if let Some(b) = &first.manifest.base {
        return Err(BackupError::Refused(format!(
            "{} is an incremental backup based on {} (taken {}): give the full backup first, \
             then each incremental archive in the order they were taken",
            first.sealed.name(),
            b.archive,
            when(b.created)
        )));
    }
    for (i, l) in links.iter().enumerate().skip(1) {
        let prev = &links[i - 1];
        let Some(b) = &l.manifest.base else {
            return Err(BackupError::Refused(format!(
                "{} is a full backup, not an incremental archive of {}: give one chain, the \
                 full backup first",
                l.sealed.name(),
                prev.sealed.name()
            )));
        };
        let fp = |d: Option<&Dek>| d.map(Dek::fingerprint);
        if l.sealed.envelope.volume_id != first.sealed.envelope.volume_id
            || l.dek.fingerprint() != first.dek.fingerprint()
            || fp(l.inner.as_ref()) != fp(first.inner.as_ref())
        {
            return Err(BackupError::Refused(format!(
                "{} is a backup of another volume (or of it under another DEK) than {}",
                l.sealed.name(),
                first.sealed.name()
            )));
        }
        if b.manifest_sha256 != prev.sealed.manifest_sha256 {
            let elsewhere = links
                .iter()
                .find(|o| o.sealed.manifest_sha256 == b.manifest_sha256);
            return Err(BackupError::Refused(match elsewhere {
                Some(o) => format!(
                    "the archives are out of order: {} is based on {}, not on {}; give them \
                     oldest first",
                    l.sealed.name(),
                    o.sealed.name(),
                    prev.sealed.name()
                ),
                None => format!(
                    "{} is based on {} (taken {}, manifest SHA-256 {}…), but the archive \
                     before it, {}, is another one: that base is missing from the chain or \
                     was replaced",
                    l.sealed.name(),
                    b.archive,
                    when(b.created),
                    &b.manifest_sha256[..b.manifest_sha256.len().min(12)],
                    prev.sealed.name()
                ),
            }));
        }
    }
    Ok(())
}

/// The chain that ends in `newest`, oldest first, its bases found among the archives in
/// `dir` (by the SHA-256 of their manifests; nothing is trusted here: the restore
/// authenticates every archive and the chain).
pub fn find_chain(newest: &Path, dir: &Path) -> Result<Vec<PathBuf>, BackupError> {
    let base_of = |s: &Sealed| -> Result<Option<manifest::BaseLink>, BackupError> {
        let m: Manifest = serde_json::from_slice(&s.manifest_bytes).map_err(|e| {
            corrupt(format!(
                "{}: the manifest is invalid: {e}",
                s.path.display()
            ))
        })?;
        Ok(m.base)
    };
    let mut chain = vec![read_sealed(newest)?];
    let mut known: Option<std::collections::HashMap<String, PathBuf>> = None;
    while let Some(b) = base_of(&chain[chain.len() - 1])? {
        if chain.len() > 10_000 {
            return Err(corrupt("the chain does not end"));
        }
        let known = match &mut known {
            Some(k) => k,
            None => {
                let rd = std::fs::read_dir(dir)
                    .map_err(|e| BackupError::io(&dir.display().to_string(), e))?;
                let mut k = std::collections::HashMap::new();
                for e in rd.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_file()) {
                        if let Ok(s) = read_sealed(&e.path()) {
                            k.insert(s.manifest_sha256.clone(), e.path());
                        }
                    }
                }
                known.insert(k)
            }
        };
        let Some(p) = known.get(&b.manifest_sha256) else {
            return Err(BackupError::Refused(format!(
                "{} is based on {} (taken {}), which is not among the archives in {}",
                chain[chain.len() - 1].name(),
                b.archive,
                when(b.created),
                dir.display()
            )));
        };
        chain.push(read_sealed(p)?);
    }
    Ok(chain.into_iter().rev().map(|s| s.path).collect())
}
