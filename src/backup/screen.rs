//! What a restore lets into the backing store (docs/FORMAT.md, "Backup archive", restore
//! step 4): only what a real volume holds.
//!
//! The manifest MAC proves only that whoever made an archive held *a* DEK: anyone can seal
//! an archive of a volume of their own under a backup key's public half. A restore runs as
//! root (to give entries their owners), and the restored backing directory sits on an
//! ordinary host filesystem that the mount's `nosuid,nodev` does not cover. So every record
//! is screened before its entry is created, and what the host could run, use as a device or
//! read through a stray permission is refused:
//!
//! - a regular file with an encrypted name (a *data file*) is empty or starts with a cmkfs
//!   file header (magic `CMKF`, a known version): a real one always does, and `execve` runs
//!   no such file, so the set-id bits a volume mirrors from its plaintext grant nothing;
//! - the side files (`.cmkfs.dirid`, `cmkfs.long.*.name`, `.cmkfs.target.*`,
//!   `.cmkfs.replaced`, the journals) are regular files of their bounded size, with no
//!   execute, set-id or sticky bit and no write bit for group or others, owned by root or
//!   by the owner of the backing root, as the volume makes them;
//! - entries in the quarantine (`cmkfs.quarantine/`) or under names cmkfs never makes have
//!   no set-id bit, and their regular files no execute bit;
//! - backing xattrs are cmkfs's own (`user.cmkfs.*`, `trusted.cmkfs.*`, name and value
//!   sealed): never `security.capability`, a POSIX ACL, or another namespace the kernel
//!   acts on;
//! - a hard link repeats an earlier entry of its own class (a data entry, never a side
//!   file); a data symlink's target is an encrypted target or a `.cmkfs.target.*` name;
//! - device nodes only with `--allow-devices`.

use super::manifest::{Kind, Member};
use super::BackupError;
use crate::volume::file_check::{self, Expect};
use crate::volume::layout::{FileHeader, FILE_HEADER_LEN};
use crate::volume::names::{DIRID_FILE, LONG_PREFIX, LONG_SUFFIX};
use crate::volume::rename::REPLACED_MARKER;
use crate::volume::symlink::LONG_TARGET_PREFIX;

/// What a backing path is, by its name (docs/FORMAT.md, "Layout").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    /// The root, or an entry with an encrypted name (short, or `cmkfs.long.<hash>`).
    Data,
    /// `.cmkfs.dirid`.
    DirId,
    /// `cmkfs.long.<hash>.name`.
    LongName,
    /// `.cmkfs.target.<32 hex>`.
    Target,
    /// `.cmkfs.replaced`.
    Replaced,
    /// `cmkfs.upgrade.journal`, `cmkfs.reencrypt.journal` at the root.
    Journal,
    /// `cmkfs.quarantine` at the root and everything below it.
    Quarantine,
    /// A name cmkfs never makes (say, a `lost+found` of a backing filesystem's root).
    Foreign,
}

fn is_b64url(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The hash of a long name: base64url of a SHA-256, 43 characters (never a short, chosen
/// "extension" that a `binfmt_misc` handler could match).
fn is_long_hash(s: &str) -> bool {
    s.len() == 43 && is_b64url(s)
}

fn is_target_name(s: &str) -> bool {
    s.strip_prefix(LONG_TARGET_PREFIX)
        .is_some_and(|h| h.len() == 32 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn class(path: &str) -> Class {
    if path.is_empty() {
        return Class::Data;
    }
    let q = crate::fsck::QUARANTINE_DIR;
    if path == q || path.strip_prefix(q).is_some_and(|r| r.starts_with('/')) {
        return Class::Quarantine;
    }
    let (parent, name) = path.rsplit_once('/').unwrap_or(("", path));
    let at_root = parent.is_empty();
    // Below a directory the volume cannot name (a foreign one), nothing is the volume's.
    let data_name = |c: &str| is_b64url(c) || c.strip_prefix(LONG_PREFIX).is_some_and(is_long_hash);
    if !at_root && !parent.split('/').all(data_name) {
        return Class::Foreign;
    }
    if is_b64url(name) {
        return Class::Data;
    }
    if let Some(rest) = name.strip_prefix(LONG_PREFIX) {
        if is_long_hash(rest) {
            return Class::Data;
        }
        if rest.strip_suffix(LONG_SUFFIX).is_some_and(is_long_hash) {
            return Class::LongName;
        }
    }
    match name {
        DIRID_FILE => Class::DirId,
        REPLACED_MARKER => Class::Replaced,
        _ if at_root && is_target_name(name) => Class::Target,
        _ if at_root
            && (name == crate::volume::upgrade::JOURNAL_FILE
                || name == crate::volume::reencrypt::JOURNAL_FILE) =>
        {
            Class::Journal
        }
        _ => Class::Foreign,
    }
}

/// Upper bound on a side file's length (bytes), `None`: unbounded.
fn side_max(c: Class) -> Option<u64> {
    match c {
        // 16 bytes written; fsck reads up to 64.
        Class::DirId => Some(64),
        // The base64url of a sealed 255-byte name is 362 bytes.
        Class::LongName => Some(4096),
        // nonce 16 + SIV tag 16 + a 4095-byte target.
        Class::Target => Some(8192),
        Class::Replaced => Some(0),
        _ => None,
    }
}

fn crafted(path: &str, why: impl std::fmt::Display) -> BackupError {
    BackupError::Corrupt(format!(
        "member {path:?} is not something a cmkfs volume holds ({why}): crafted or damaged"
    ))
}

/// Screens the records of one archive's entries, in manifest order.
pub(super) struct Screen {
    allow_devices: bool,
    root_uid: Option<u64>,
}

impl Screen {
    /// A screen that lets device nodes through only if `allow_devices`.
    pub(super) fn new(allow_devices: bool) -> Screen {
        Screen {
            allow_devices,
            root_uid: None,
        }
    }

    /// Checks the record `m` (a stored member's, or a reference's) before its entry is made.
    pub(super) fn record(&mut self, m: &Member) -> Result<(), BackupError> {
        let p = m.path.as_str();
        if p.is_empty() {
            self.root_uid = Some(m.uid);
        }
        for (n, _) in &m.xattrs {
            if !(n.starts_with("user.cmkfs.") || n.starts_with("trusted.cmkfs.")) {
                return Err(crafted(
                    p,
                    format!(
                        "backing xattr {n:?}: a volume's backing entries carry only its sealed \
                         user.cmkfs.* and trusted.cmkfs.* attributes"
                    ),
                ));
            }
        }
        if matches!(m.kind, Kind::Char | Kind::Block) && !self.allow_devices {
            let (maj, min) = m.rdev.unwrap_or((0, 0));
            return Err(BackupError::Refused(format!(
                "the archive holds a {} device node {p:?} (device {maj}:{min}, mode {:04o}, \
                 owner {}); nothing was restored: device nodes are recreated only with \
                 `cmkfs restore --allow-devices`, for archives whose origin you trust (put the \
                 restored directory on a nodev filesystem)",
                if m.kind == Kind::Char {
                    "character"
                } else {
                    "block"
                },
                m.mode & 0o7777,
                m.uid
            )));
        }
        let c = class(p);
        let mode = m.mode & 0o7777;
        let setid = libc::S_ISUID | libc::S_ISGID;
        match c {
            Class::Data => match m.kind {
                Kind::Symlink => {
                    let t = m.target.as_deref().unwrap_or("");
                    if !(is_b64url(t) || is_target_name(t)) {
                        return Err(crafted(p, "a symlink whose target is not an encrypted one"));
                    }
                }
                Kind::Hardlink => self.link(m, c)?,
                // A data file's first bytes are checked by `header`; directories, FIFOs
                // and devices mirror their plaintext's mode and owner.
                _ => {}
            },
            Class::DirId | Class::LongName | Class::Target | Class::Replaced | Class::Journal => {
                if m.kind != Kind::File {
                    return Err(crafted(p, format!("a side file that is a {:?}", m.kind)));
                }
                if mode & !0o644 != 0 {
                    return Err(crafted(
                        p,
                        format!(
                            "a side file of mode {mode:04o}: the volume makes them without \
                             execute, set-id or sticky bits, writable by their owner only"
                        ),
                    ));
                }
                if let Some(max) = side_max(c).filter(|max| m.size > *max) {
                    return Err(crafted(
                        p,
                        format!("a side file of {} bytes (at most {max})", m.size),
                    ));
                }
                if m.uid != 0 && Some(m.uid) != self.root_uid {
                    return Err(crafted(
                        p,
                        format!(
                            "a side file owned by uid {}: the volume's own files belong to \
                             root or to the owner of the backing root",
                            m.uid
                        ),
                    ));
                }
            }
            Class::Quarantine | Class::Foreign => {
                // fsck moves entries into `cmkfs.quarantine/`: anything but a directory there
                // (a symlink to a host directory) would take them out of the volume.
                if p == crate::fsck::QUARANTINE_DIR && m.kind != Kind::Dir {
                    return Err(crafted(
                        p,
                        "the quarantine of a volume is a directory, never a link or a file",
                    ));
                }
                if m.kind == Kind::Hardlink {
                    return self.link(m, c);
                }
                let exec = if m.kind == Kind::File { 0o111 } else { 0 };
                if mode & (setid | exec) != 0 {
                    return Err(crafted(
                        p,
                        format!(
                            "a {} that is not a cmkfs entry, of mode {mode:04o}: only the \
                             volume's own entries may carry set-id bits, and a file that is \
                             not a cmkfs data file no execute bit",
                            if m.kind == Kind::File {
                                "file"
                            } else {
                                "entry"
                            }
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    fn link(&self, m: &Member, c: Class) -> Result<(), BackupError> {
        let t = m.target.as_deref().unwrap_or("");
        if class(t) != c {
            return Err(crafted(
                &m.path,
                format!("a hard link to {t:?}, which is not an entry of the same kind"),
            ));
        }
        Ok(())
    }

    /// Checks that a reference of an incremental archive takes a regular file's data from
    /// an entry of the same class (a data file's data was checked when its base was
    /// restored; a side file's never may become a data file's).
    pub(super) fn reference(&self, m: &Member, from: &str) -> Result<(), BackupError> {
        if m.kind == Kind::File && class(from) != class(&m.path) {
            return Err(crafted(
                &m.path,
                format!("it takes the data of {from:?}, an entry of another kind"),
            ));
        }
        Ok(())
    }

    /// For a stored data file: reads and checks its file header from `data` (positioned at
    /// its extents' bytes) before anything of it is written, and returns the bytes read,
    /// which the extraction must consume first. Empty for anything else.
    pub(super) fn header(
        &self,
        m: &Member,
        data: &mut dyn std::io::Read,
    ) -> Result<Vec<u8>, BackupError> {
        if m.kind != Kind::File || m.size == 0 || class(&m.path) != Class::Data {
            return Ok(Vec::new());
        }
        let n = FILE_HEADER_LEN as u64;
        if m.extents.first().is_none_or(|&(o, l)| o != 0 || l < n) {
            return Err(crafted(
                &m.path,
                "a data file whose first 32 bytes are not stored: it has no cmkfs file header",
            ));
        }
        let mut head = vec![0u8; FILE_HEADER_LEN];
        data.read_exact(&mut head).map_err(BackupError::Read)?;
        FileHeader::decode(&head).map_err(|why| {
            crafted(
                &m.path,
                format!("a data file that does not start with a cmkfs file header: {why}"),
            )
        })?;
        Ok(head)
    }
}

/// At backup time: checks data file `path` (its backing length `len`, read from `f`) as the
/// volume `expect` describes reads it ([`file_check::judge`], the judge fsck and
/// re-encryption share), so that an archive never holds a member that [`Screen::header`] (or
/// `restore --new-dek`) refuses at restore, which would refuse the whole archive. Entries of
/// other classes (the quarantine, foreign names) are not data files and are stored as they
/// are. A backup that writers may run through (`--force`) passes
/// [`Expect::lengths_in_flux`]: a file being written may pass through lengths no file at rest
/// has. Returns what is wrong with the file.
pub(crate) fn damaged_data_file(
    path: &str,
    f: &std::fs::File,
    len: u64,
    expect: &Expect,
) -> Option<String> {
    if len == 0 || class(path) != Class::Data {
        return None;
    }
    let head = match file_check::read_head(f, len) {
        Ok(h) => h,
        Err(e) => return Some(format!("its file header cannot be read: {e}")),
    };
    file_check::judge(expect, len, &head)
        .err()
        .map(|d| d.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only data files are judged at backup time: anything in the quarantine or under a
    /// foreign name is stored as it is, and an empty file has no header (the defects
    /// themselves: `volume::file_check`'s matrix, which runs this too).
    #[test]
    fn only_data_files_are_judged_at_backup_time() {
        use crate::volume::file_check::Generations;
        use crate::volume::layout::Layout;
        let dir = tempfile::tempdir().unwrap();
        let lay = Layout::V3;
        let expect = Expect::new(lay, Some(Generations::Current(0)));
        let h = lay.generate_header(0).unwrap();
        let check = |path: &str, bytes: &[u8], expect: &Expect| {
            let p = dir.path().join("f");
            std::fs::write(&p, bytes).unwrap();
            let f = std::fs::File::open(&p).unwrap();
            damaged_data_file(path, &f, bytes.len() as u64, expect)
        };
        let mut torn = lay.header_area(&h);
        torn.resize(torn.len() + 7, 7);
        assert_eq!(check("abc", b"", &expect), None);
        assert_eq!(check("abc", &lay.header_area(&h), &expect), None);
        let why = check("abc", &torn, &expect).expect("a length no v3 file has");
        assert!(why.contains("not a valid format v3 length"), "{why}");
        assert_eq!(check("abc", &torn, &expect.lengths_in_flux()), None);
        let q = format!("{}/20261130T000000Z/abc", crate::fsck::QUARANTINE_DIR);
        for bytes in [&torn[..10], &torn] {
            assert_eq!(check(&q, bytes, &expect), None, "in the quarantine");
            assert_eq!(check("lost+found", bytes, &expect), None, "a foreign name");
        }
    }

    #[test]
    fn names_are_classed_as_the_volume_makes_them() {
        let long = format!("{LONG_PREFIX}{}", "A".repeat(43));
        for (p, c) in [
            ("", Class::Data),
            ("abc-_9", Class::Data),
            ("d/abc", Class::Data),
            (long.as_str(), Class::Data),
            (&format!("d/{long}.name"), Class::LongName),
            (".cmkfs.dirid", Class::DirId),
            ("d/.cmkfs.dirid", Class::DirId),
            (&format!(".cmkfs.target.{}", "a".repeat(32)), Class::Target),
            (
                &format!("d/.cmkfs.target.{}", "a".repeat(32)),
                Class::Foreign,
            ),
            (".cmkfs.target.x", Class::Foreign),
            ("d/.cmkfs.replaced", Class::Replaced),
            ("cmkfs.reencrypt.journal", Class::Journal),
            ("d/cmkfs.reencrypt.journal", Class::Foreign),
            ("cmkfs.quarantine", Class::Quarantine),
            ("cmkfs.quarantine/b/x.y", Class::Quarantine),
            ("cmkfs.quarantinex", Class::Foreign),
            ("lost+found", Class::Foreign),
            ("cmkfs.long.jar", Class::Foreign),
            ("cmkfs.long.jar.name", Class::Foreign),
            ("lost+found/abc", Class::Foreign),
            ("lost+found/.cmkfs.dirid", Class::Foreign),
            (&format!("{long}/abc/.cmkfs.dirid"), Class::DirId),
            ("suid.id", Class::Foreign),
        ] {
            assert_eq!(class(p), c, "{p}");
        }
    }
}
