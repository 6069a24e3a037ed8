//! The format checks `cmkfs fsck` makes on each regular backing file (the rules of
//! docs/FORMAT.md "Files" and "Upgrade from format v1"): the file version against the
//! volume's, the length rule of the volume's layout (v2: data at 32, v3: at 4096), and on a v1
//! volume the tails v1 reads as zeros.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use crate::crypto::VolumeKeys;
use crate::volume::header::FORMAT_V2;
use crate::volume::layout::{self, FileHeader, Layout, FILE_HEADER_LEN};
use crate::volume::v1::{self, TailDecision, TailFinding};

/// What `cmkfs fsck` reports about one file's format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FormatFinding {
    /// v1 volume: the last bytes are stored so that v1 reads them as zeros, and the upgrade
    /// will recover them as data.
    V1TailReadAsZeros,
    /// v1 volume: the last bytes are stored as all zeros and taken for a hole (reported so
    /// the decision can be checked).
    V1TailHole,
    /// A v1 file in a v2 volume: the mount refuses to read it.
    FileFormatV1,
    /// A v2 file in a v1 volume: an upgrade was interrupted.
    FileFormatV2,
    /// A file whose header version is another format's, which no upgrade converts (a v2 or
    /// v1 file in a v3 volume, a v3 file in a v1 or v2 volume: copied in from another
    /// volume?). Reading it with the volume's layout would give wrong bytes: the mount
    /// refuses it.
    FileFormatMismatch,
    /// A backing length that no file of the volume's layout has.
    BadLength,
}

/// Checks the format of one regular backing file of `len` bytes in a volume of format
/// `volume_version` (for `cmkfs fsck`; the file header was found valid). `keys` lets it see
/// double-encrypted v1 tails whose inner layer looked like a hole.
pub fn check_file_format(
    f: &File,
    len: u64,
    volume_version: u32,
    keys: Option<&VolumeKeys>,
    unit_size: u64,
) -> io::Result<Option<(FormatFinding, String)>> {
    if len < FILE_HEADER_LEN as u64 {
        return Ok(None);
    }
    let mut b = [0u8; FILE_HEADER_LEN];
    f.read_exact_at(&mut b, 0)?;
    let Ok(h) = FileHeader::decode(&b) else {
        return Ok(None);
    };
    let mismatch = || {
        Ok(Some((
            FormatFinding::FileFormatMismatch,
            format!(
                "the file header says format v{} in a format v{volume_version} volume (copied \
                 in from another volume?): its data would be read at the wrong offset, so \
                 reads fail; no upgrade converts it",
                h.version
            ),
        )))
    };
    if let Some(lay) = Layout::for_format(volume_version) {
        if h.version == lay.file_version {
            if let Err(why) = lay.logical_size(len) {
                return Ok(Some((FormatFinding::BadLength, why)));
            }
            return Ok(None);
        }
        if volume_version == FORMAT_V2 && h.version == layout::FILE_VERSION_V1 {
            return Ok(Some((
                FormatFinding::FileFormatV1,
                "the file is in format v1 in a v2 volume (restored from an old copy?): reads \
                 fail until `cmkfs upgrade` converts it"
                    .into(),
            )));
        }
        return mismatch();
    }
    // A v1 volume (`cmkfs upgrade` converts it to v2).
    if h.version == layout::FILE_VERSION_V2 {
        if let Err(why) = Layout::V2.logical_size(len) {
            return Ok(Some((FormatFinding::BadLength, why)));
        }
        return Ok(Some((
            FormatFinding::FileFormatV2,
            "already in format v2 in a v1 volume (an interrupted upgrade): `cmkfs upgrade` \
             finishes it"
                .into(),
        )));
    }
    if h.version != layout::FILE_VERSION_V1 {
        return mismatch();
    }
    let size = len - FILE_HEADER_LEN as u64;
    Ok(
        match v1::inspect_tail(f, keys, h.tweak(), size, unit_size)? {
            None => None,
            Some(TailFinding::ZeroTail {
                start,
                len,
                decision,
            }) => Some(match decision.decision {
                TailDecision::Data => (
                    FormatFinding::V1TailReadAsZeros,
                    format!(
                        "its last {len} bytes (from offset {start}) are stored as all zeros, so \
                         format v1 reads them as zeros: data lost to the v1 tail bug until \
                         `cmkfs upgrade`, which recovers them ({})",
                        decision.reason
                    ),
                ),
                TailDecision::Hole => (
                    FormatFinding::V1TailHole,
                    format!(
                        "its last {len} bytes (from offset {start}) are stored as all zeros and \
                         read as zeros; `cmkfs upgrade` keeps them so ({})",
                        decision.reason
                    ),
                ),
            }),
            Some(TailFinding::InnerZero { start, len }) => Some((
                FormatFinding::V1TailReadAsZeros,
                format!(
                    "its last {len} bytes (from offset {start}) have an inner (platform-key) \
                     layer that is all zeros, so format v1 reads them as zeros: data lost to \
                     the v1 tail bug until `cmkfs upgrade`, which recovers them"
                ),
            )),
        },
    )
}
