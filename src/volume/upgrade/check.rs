//! The format checks `cmkfs fsck` makes on each regular backing file of a format v1 volume
//! (the rules of docs/FORMAT.md "Files" and "Upgrade from format v1"): files an interrupted
//! upgrade converted, files of another format, and the tails v1 reads as zeros. Files of
//! v2 and v3 volumes are judged by `volume::file_check`.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use crate::crypto::VolumeKeys;
use crate::volume::layout::{self, FileHeader, Layout, FILE_HEADER_LEN};
use crate::volume::v1::{self, TailDecision, TailFinding};

/// What `cmkfs fsck` reports about one file's format in a format v1 volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FormatFinding {
    /// v1 volume: the last bytes are stored so that v1 reads them as zeros, and the upgrade
    /// will recover them as data.
    V1TailReadAsZeros,
    /// v1 volume: the last bytes are stored as all zeros and taken for a hole (reported so
    /// the decision can be checked).
    V1TailHole,
    /// A v2 file in a v1 volume: an upgrade was interrupted.
    FileFormatV2,
    /// A v3 file in a v1 volume (copied in from another volume?), which no upgrade converts.
    FileFormatMismatch,
    /// A v2 file in a v1 volume whose backing length no v2 file has.
    BadLength,
}

/// Checks the format of one regular backing file of `len` bytes in a volume of format v1
/// (for `cmkfs fsck`; the file header was found valid). `keys` lets it see double-encrypted
/// v1 tails whose inner layer looked like a hole. Files of v2 and v3 volumes are judged by
/// [`crate::volume::file_check::judge`].
pub fn check_v1_volume_file(
    f: &File,
    len: u64,
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
                "the file header says format v{} in a format v1 volume (copied in from another \
                 volume?): its data would be read at the wrong offset, so reads fail; no \
                 upgrade converts it",
                h.version
            ),
        )))
    };
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
