//! A regular file with an encrypted name: its header, version, length and key generation
//! against the volume. The judgement is [`crate::volume::file_check::judge`]'s (shared with
//! re-encryption's preflight and backup's screen); what fsck makes of a defect — its finding,
//! detail and `--repair` action — is here. On a format v1 volume the v1 checks of
//! `volume::upgrade` (tails v1 reads as zeros) follow the header's.

use super::*;
use crate::volume::file_check::{self, Expect, FileDefect, Generations};
use crate::volume::layout::Layout;

/// What fsck reports for a file `expect`'s volume judges defective: `None` for a file the
/// volume reads; else the finding, its detail and its fix. With `expect.generations` `None`
/// (no key: the volume header is not verified) a file of another format or length is
/// reported but never moved, as the header's format may itself be the damage.
pub(crate) fn finding(
    expect: &Expect,
    len: u64,
    head: &[u8],
) -> Option<(ProblemKind, String, Fix)> {
    let d = file_check::judge(expect, len, head).err()?;
    Some(defect_finding(&d, expect.generations.is_some()))
}

/// The finding for defect `d`; `verified`: the volume header's format was verified with the
/// key.
fn defect_finding(d: &FileDefect, verified: bool) -> (ProblemKind, String, Fix) {
    let format = |kind: ProblemKind, detail: String| {
        if verified {
            (kind, detail, Fix::Quarantine)
        } else {
            (
                kind,
                format!(
                    "{detail} (not moved: without the key the volume header's format is not \
                     verified; run `cmkfs fsck --repair` with the key)"
                ),
                Fix::None,
            )
        }
    };
    match d {
        FileDefect::Truncated { .. } => (
            ProblemKind::FileHeaderTruncated,
            d.to_string(),
            Fix::Quarantine,
        ),
        FileDefect::BadMagic | FileDefect::UnknownVersion(_) => (
            ProblemKind::FileHeaderCorrupt,
            d.to_string(),
            Fix::Quarantine,
        ),
        // `cmkfs upgrade` is the fix, not the quarantine.
        FileDefect::V1File => (
            ProblemKind::FileFormatV1,
            format!(
                "{d} (restored from an old copy?): reads fail until `cmkfs upgrade` converts it"
            ),
            Fix::None,
        ),
        // Unreadable for good, like a corrupt header: to the quarantine.
        FileDefect::OtherFormat { .. } => format(
            ProblemKind::FileFormatMismatch,
            format!(
                "{d} (copied in from another volume?): its data would be read at the wrong \
                 offset, so reads fail; no upgrade converts it"
            ),
        ),
        FileDefect::BadLength { .. } => format(ProblemKind::FileLengthInvalid, d.to_string()),
        FileDefect::ProgressInvalid { .. } | FileDefect::ProgressPastEnd { .. } => (
            ProblemKind::ReencryptionProgressInvalid,
            format!(
                "{d} (a damaged header): a re-encryption would skip units it never converted, \
                 so it and a backup refuse the volume while it is there"
            ),
            Fix::Quarantine,
        ),
        FileDefect::UnknownGeneration { .. } | FileDefect::NotConverted { .. } => (
            ProblemKind::KeyGenerationUnknown,
            format!(
                "{d} (a damaged header, or a file put back from before a re-encryption): no DEK \
                 of the volume decrypts it, reads fail, and a re-encryption refuses the volume \
                 while it is there"
            ),
            Fix::Quarantine,
        ),
    }
}

impl Checker {
    /// Checks regular file `path` of backing length `len`. Returns the problem that sends it
    /// to the quarantine, if one does; findings with no automatic fix (a v1 file in a v2
    /// volume, a format finding without the key, v1 tails) are recorded here.
    pub(super) fn check_data_file(
        &mut self,
        path: &Path,
        len: u64,
        plaintext: Option<&Path>,
        plain_dir: Option<&Path>,
    ) -> Option<(ProblemKind, String)> {
        let read = if len < FILE_HEADER_LEN as u64 {
            // Nothing to read: the length alone decides (an empty file, or a torn one).
            Ok(([0u8; FILE_HEADER_LEN], None))
        } else {
            sys::open_regular_path(&self.io(path), Access::Read)
                .and_then(|(f, _)| Ok((file_check::read_head(&f, len)?, Some(f))))
        };
        let (head, file) = match read {
            Ok(x) => x,
            Err(e) => {
                return Some((
                    ProblemKind::Unreadable,
                    format!("cannot read the file header: {e}"),
                ))
            }
        };
        let Some((version, unit)) = self.format else {
            // The volume header is unusable: only what every volume agrees on is checked.
            let d = file_check::parse_head(len, &head).err()?;
            let (kind, detail, _) = defect_finding(&d, false);
            return Some((kind, detail));
        };
        let Some(layout) = Layout::for_format(version) else {
            // Format v1 (`cmkfs upgrade` converts it).
            if let Err(d) = file_check::parse_head(len, &head) {
                let (kind, detail, _) = defect_finding(&d, false);
                return Some((kind, detail));
            }
            let f = file?;
            return self.check_v1_volume_file(&f, path, len, unit, plaintext, plain_dir);
        };
        let generations = self
            .keys
            .as_ref()
            .map(|k| Generations::of(k.generation, k.retiring.as_deref().map(|r| r.generation)));
        let expect = Expect::new(layout, generations).with_unit_size(unit);
        let (kind, detail, fix) = finding(&expect, len, &head)?;
        if fix == Fix::Quarantine {
            return Some((kind, detail));
        }
        self.report_only(kind, path, plaintext, plain_dir, detail);
        None
    }

    /// Records a finding about a data file that no `--repair` acts on.
    fn report_only(
        &mut self,
        kind: ProblemKind,
        path: &Path,
        plaintext: Option<&Path>,
        plain_dir: Option<&Path>,
        detail: String,
    ) {
        self.problem(
            kind,
            path,
            plaintext.map(Path::to_path_buf),
            plain_dir,
            detail,
            Fix::None,
            None,
        );
    }

    /// A file with a valid header in a format v1 volume: v1 tails that read as zeros, files
    /// an interrupted upgrade converted, files of another format (volume::upgrade states the
    /// rules). A file of another format that no upgrade converts, or of a length no v2 file
    /// has, is returned (to the quarantine, like a corrupt header); the rest is recorded here
    /// with no automatic fix: `cmkfs upgrade` is the fix.
    fn check_v1_volume_file(
        &mut self,
        f: &fs::File,
        path: &Path,
        len: u64,
        unit: u64,
        plaintext: Option<&Path>,
        plain_dir: Option<&Path>,
    ) -> Option<(ProblemKind, String)> {
        let (finding, detail) =
            match upgrade::check_v1_volume_file(f, len, self.keys.as_ref(), unit) {
                Ok(f) => f?,
                Err(e) => {
                    return Some((
                        ProblemKind::Unreadable,
                        format!("cannot read the file: {e}"),
                    ))
                }
            };
        let kind = match finding {
            // Without the key the header's format is unverified: reported, never acted on.
            FormatFinding::BadLength | FormatFinding::FileFormatMismatch if self.keys.is_none() => {
                let kind = match finding {
                    FormatFinding::BadLength => ProblemKind::FileLengthInvalid,
                    _ => ProblemKind::FileFormatMismatch,
                };
                self.report_only(
                    kind,
                    path,
                    plaintext,
                    plain_dir,
                    format!(
                        "{detail} (not moved: without the key the volume header's format is \
                         not verified; run `cmkfs fsck --repair` with the key)"
                    ),
                );
                return None;
            }
            FormatFinding::BadLength => return Some((ProblemKind::FileLengthInvalid, detail)),
            FormatFinding::FileFormatMismatch => {
                return Some((ProblemKind::FileFormatMismatch, detail))
            }
            FormatFinding::V1TailReadAsZeros => ProblemKind::V1TailReadAsZeros,
            FormatFinding::V1TailHole => ProblemKind::V1TailHole,
            FormatFinding::FileFormatV2 => ProblemKind::FileFormatV2,
        };
        self.report_only(kind, path, plaintext, plain_dir, detail);
        None
    }
}
