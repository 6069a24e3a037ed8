//! The one judge of a data file's header against its volume (docs/FORMAT.md, "Files" and
//! "Re-encryption"): whether a backing file with an encrypted name is a file this volume
//! reads, given its backing length and its first 32 bytes.
//!
//! `cmkfs fsck`, re-encryption's preflight and `cmkfs backup`'s screen each judged this on
//! their own until they drifted apart (attack session 14: only the backup looked at
//! `reencrypted`, so a file marked converted at the current generation passed fsck, and a
//! re-encryption skipped its units and retired the only DEK that read them). Now they all
//! ask [`judge`] and keep only their policy: fsck's finding names and `--repair`, the run's
//! refusal, the backup's refusal.
//!
//! What is judged, in this order (the first defect found is the verdict):
//!
//! 1. the backing length holds a file header (0 bytes: an empty file, no header; 1..31:
//!    [`FileDefect::Truncated`]);
//! 2. the header's encoding: magic `CMKF` and a version cmkfs knows;
//! 3. the version is the volume's (a v1 file in a v2 volume is the one `cmkfs upgrade`
//!    converts);
//! 4. the length is one a file of the volume's layout has ([`Layout::logical_size`]), unless
//!    the caller says lengths are not at rest;
//! 5. with the volume's key generations (from a verified header): `reencrypted` is non-zero
//!    only on a file still under the generation a running re-encryption retires, and
//!    `key_gen` names the current generation or, during a run, the retiring one; when a run
//!    is about to erase the retiring DEK, every file is wholly under the current one.
//!
//! 6. with the volume's data unit size ([`Expect::unit_size`]) and a length at rest: a file
//!    still under the retiring generation marks no unit past its last converted
//!    (`reencrypted <= units`, [`FileDefect::ProgressPastEnd`]). A run writes progress below
//!    the file's unit count only, and a mount that shrinks such a file during a run lowers
//!    its progress to the new unit count before it cuts the length (`content::truncate`), so
//!    no state a crash can leave breaks it (attack session 15, F1: a flipped high bit made a
//!    resumed run take the file as converted and erase the only DEK that read it).
//!
//! What cannot be told: `reencrypted` exactly equal to the unit count is what a file shrunk
//! during a run holds until the run's next batch flips its generation, so a flip to that
//! value passes. The data units themselves carry no MAC: what a header names cannot be
//! checked against them here.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use super::layout::{
    FileHeader, HeaderError, Layout, FILE_HEADER_LEN, FILE_VERSION_V1, FILE_VERSION_V2,
};

/// Which key generations a volume's files may be under, and where a re-encryption's progress
/// may show (generations are the volume header's `key_generation`; a file header keeps their
/// low 16 bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Generations {
    /// No re-encryption runs: every file is under `current`, with `reencrypted` 0.
    Current(u32),
    /// A re-encryption from `retiring` to `current` runs: a file is under either; only one
    /// still under `retiring` may have units marked converted.
    Converting {
        /// The generation whose DEK the run retires (`current − 1`).
        retiring: u32,
        /// The generation the run converts to.
        current: u32,
    },
    /// A re-encryption is about to erase the DEK of `retiring`: every file must be wholly
    /// under `current`.
    Converted {
        /// The generation whose DEK is about to go.
        retiring: u32,
        /// The only generation a file may be under.
        current: u32,
    },
}

impl Generations {
    /// The generations a volume's keys allow: `current`, and `retiring` while a re-encryption
    /// runs ([`Generations::Converting`]).
    pub fn of(current: u32, retiring: Option<u32>) -> Generations {
        match retiring {
            None => Generations::Current(current),
            Some(retiring) => Generations::Converting { retiring, current },
        }
    }

    /// What a file header's `key_gen` should be, for messages ("0", "0 or 1",
    /// "1 (wholly converted)").
    fn expects(&self) -> String {
        match *self {
            Generations::Current(c) => format!("{}", c as u16),
            Generations::Converting { retiring, current } => {
                format!("{} or {}", retiring as u16, current as u16)
            }
            Generations::Converted { current, .. } => {
                format!("{} (wholly converted)", current as u16)
            }
        }
    }
}

/// What a caller knows about the volume a file is judged against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expect {
    /// The volume's layout (format v2 or v3): the file version and the data offset.
    pub layout: Layout,
    /// The volume's key generations, from a header whose MAC was verified; `None` when the
    /// header is not verified (`cmkfs fsck` without the key): generations are then not
    /// judged.
    pub generations: Option<Generations>,
    /// Whether the backing length is at rest (a backup that writers may run through,
    /// `--force`, sees files pass through lengths no file at rest has: `false` there).
    pub settled_length: bool,
    /// The volume's data unit size (bytes; the verified header's `sector_size`): with it and
    /// a length at rest, a retiring file's progress is judged against its unit count;
    /// `None`: not judged.
    pub unit_size: Option<u64>,
}

impl Expect {
    /// Files of a volume of layout `layout`, at rest.
    pub fn new(layout: Layout, generations: Option<Generations>) -> Expect {
        Expect {
            layout,
            generations,
            settled_length: true,
            unit_size: None,
        }
    }

    /// The same, with the volume's data unit size (bytes): a file under the retiring
    /// generation whose progress passes its last unit is then a defect.
    pub fn with_unit_size(self, unit_size: u64) -> Expect {
        Expect {
            unit_size: Some(unit_size).filter(|n| *n > 0),
            ..self
        }
    }

    /// The same, with lengths not judged beyond holding a file header.
    pub fn lengths_in_flux(self) -> Expect {
        Expect {
            settled_length: false,
            ..self
        }
    }
}

/// Why a data file's header is not acceptable in its volume: one variant per defect.
/// `Display` says what is wrong in one line (no advice: that is each caller's policy).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileDefect {
    /// A backing file of 1..31 bytes (`len`): not even a file header fits.
    Truncated {
        /// The backing length (bytes).
        len: u64,
    },
    /// The first 4 bytes are not `CMKF`.
    BadMagic,
    /// A file version no cmkfs writes.
    UnknownVersion(u16),
    /// A format v1 file in a format v2 volume (written before the volume was upgraded and
    /// put back since): `cmkfs upgrade` converts it.
    V1File,
    /// A file of another format's version (`found`) than the volume's (`volume`): its data
    /// would be read at the wrong offset or with the wrong tail rule.
    OtherFormat {
        /// The file header's version.
        found: u16,
        /// The volume's file version.
        volume: u16,
    },
    /// A backing length (`len`) no file of the volume's layout has; `why` from
    /// [`Layout::logical_size`].
    BadLength {
        /// The backing length (bytes).
        len: u64,
        /// What is wrong with it.
        why: String,
    },
    /// `reencrypted` is non-zero on a file that is not under the generation a running
    /// re-encryption retires: a run would take its first units as converted.
    ProgressInvalid {
        /// The file header's key generation (low 16 bits).
        key_gen: u16,
        /// The units the header marks converted.
        reencrypted: u64,
        /// What the volume allows.
        expected: Generations,
    },
    /// A file still under the retiring generation whose progress (`reencrypted`) passes its
    /// last unit (`units`): a run would take it as converted without converting it.
    ProgressPastEnd {
        /// The units the header marks converted.
        reencrypted: u64,
        /// The file's data units (its logical size over the unit size, rounded up).
        units: u64,
    },
    /// A key generation the volume has no DEK of (a flipped bit, a file put back from before
    /// a re-encryption).
    UnknownGeneration {
        /// The file header's key generation (low 16 bits).
        key_gen: u16,
        /// What the volume allows.
        expected: Generations,
    },
    /// A file still under the retiring generation (or part-converted) when the retiring DEK
    /// is about to be erased ([`Generations::Converted`]).
    NotConverted {
        /// The file header's key generation (low 16 bits).
        key_gen: u16,
        /// The units the header marks converted.
        reencrypted: u64,
        /// The generation every file must be under.
        current: u16,
    },
}

impl fmt::Display for FileDefect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let converted = |n: u64| match n {
            0 => String::new(),
            n => format!(" with units before {n} marked converted"),
        };
        match self {
            FileDefect::Truncated { len } => write!(
                f,
                "backing file of {len} bytes is shorter than its header area (not even the \
                 {FILE_HEADER_LEN}-byte file header fits)"
            ),
            FileDefect::BadMagic => write!(f, "{}", HeaderError::BadMagic),
            FileDefect::UnknownVersion(v) => write!(f, "{}", HeaderError::UnknownVersion(*v)),
            FileDefect::V1File => write!(
                f,
                "its file header says format v{FILE_VERSION_V1} in a format v{FILE_VERSION_V2} \
                 volume"
            ),
            FileDefect::OtherFormat { found, volume } => write!(
                f,
                "its file header says format v{found} in a format v{volume} volume"
            ),
            FileDefect::BadLength { why, .. } => write!(f, "{why}"),
            FileDefect::ProgressInvalid {
                key_gen,
                reencrypted,
                expected,
            } => write!(
                f,
                "its file header says key generation {key_gen}{} where {}",
                converted(*reencrypted),
                match expected {
                    Generations::Current(_) => "no re-encryption runs".to_string(),
                    Generations::Converting { retiring, .. } => format!(
                        "only a file still under the retiring generation {} may say so",
                        *retiring as u16
                    ),
                    Generations::Converted { .. } => "every file must be wholly converted".into(),
                }
            ),
            FileDefect::ProgressPastEnd { reencrypted, units } => write!(
                f,
                "its file header marks units before {reencrypted} converted, past the file's \
                 {units} data unit{}",
                if *units == 1 { "" } else { "s" }
            ),
            FileDefect::UnknownGeneration { key_gen, expected } => write!(
                f,
                "its file header says key generation {key_gen} where the volume expects {}",
                expected.expects()
            ),
            FileDefect::NotConverted {
                key_gen,
                reencrypted,
                current,
            } => write!(
                f,
                "its file header says key generation {key_gen}{} where the volume expects \
                 {current} (wholly converted)",
                converted(*reencrypted)
            ),
        }
    }
}

impl std::error::Error for FileDefect {}

/// Reads the bytes [`judge`] looks at: the first 32 of a file of backing length `len` (zeros
/// when `len` is below 32: nothing there is judged). An error is the caller's to report (a
/// file that shrank meanwhile reads short: `UnexpectedEof`).
pub fn read_head(f: &File, len: u64) -> io::Result<[u8; FILE_HEADER_LEN]> {
    let mut b = [0u8; FILE_HEADER_LEN];
    if len >= FILE_HEADER_LEN as u64 {
        f.read_exact_at(&mut b, 0)?;
    }
    Ok(b)
}

/// Steps 1 and 2 of [`judge`], for a volume whose layout is not known (an unusable volume
/// header) or is format v1: `Ok(None)` for an empty file (no header), the header if it is
/// one of a known version.
pub fn parse_head(len: u64, head: &[u8]) -> Result<Option<FileHeader>, FileDefect> {
    match len {
        0 => Ok(None),
        n if n < FILE_HEADER_LEN as u64 => Err(FileDefect::Truncated { len: n }),
        _ => FileHeader::parse(head).map(Some).map_err(|e| match e {
            // `head` must be the file's first 32 bytes ([`read_head`]).
            HeaderError::Short(n) => FileDefect::Truncated { len: n as u64 },
            HeaderError::BadMagic => FileDefect::BadMagic,
            HeaderError::UnknownVersion(v) => FileDefect::UnknownVersion(v),
        }),
    }
}

/// Judges a data file of backing length `len` whose first bytes are `head` ([`read_head`])
/// against the volume `expect` describes (docs/FORMAT.md, "Files"; key generations and
/// `reencrypted`: "Re-encryption"). `Ok(None)`: an empty file without a header;
/// `Ok(Some(h))`: a file the volume reads, with its header; otherwise the first defect in
/// the order the module documentation gives.
pub fn judge(expect: &Expect, len: u64, head: &[u8]) -> Result<Option<FileHeader>, FileDefect> {
    let Some(h) = parse_head(len, head)? else {
        return Ok(None);
    };
    let lay = expect.layout;
    if h.version != lay.file_version {
        return Err(
            if h.version == FILE_VERSION_V1 && lay.file_version == FILE_VERSION_V2 {
                FileDefect::V1File
            } else {
                FileDefect::OtherFormat {
                    found: h.version,
                    volume: lay.file_version,
                }
            },
        );
    }
    if expect.settled_length {
        if let Err(why) = lay.logical_size(len) {
            return Err(FileDefect::BadLength { len, why });
        }
    }
    let Some(expected) = expect.generations else {
        return Ok(Some(h));
    };
    let low = |g: u32| g as u16;
    // A file no run is converting: no progress recorded, under the current key.
    let settled_under = |current: u32| {
        if h.reencrypted != 0 {
            Err(FileDefect::ProgressInvalid {
                key_gen: h.key_gen,
                reencrypted: h.reencrypted,
                expected,
            })
        } else if h.key_gen != low(current) {
            Err(FileDefect::UnknownGeneration {
                key_gen: h.key_gen,
                expected,
            })
        } else {
            Ok(())
        }
    };
    match expected {
        Generations::Current(current) => settled_under(current)?,
        Generations::Converting { retiring, current } => {
            if h.key_gen == low(retiring) {
                if let (true, Some(unit), Ok(size)) = (
                    expect.settled_length,
                    expect.unit_size,
                    lay.logical_size(len),
                ) {
                    let units = size.div_ceil(unit);
                    if h.reencrypted > units {
                        return Err(FileDefect::ProgressPastEnd {
                            reencrypted: h.reencrypted,
                            units,
                        });
                    }
                }
                return Ok(Some(h));
            }
            settled_under(current)?
        }
        Generations::Converted { retiring, current } => {
            if h.key_gen == low(retiring) {
                return Err(FileDefect::NotConverted {
                    key_gen: h.key_gen,
                    reencrypted: h.reencrypted,
                    current: low(current),
                });
            }
            settled_under(current)?
        }
    }
    Ok(Some(h))
}

#[cfg(test)]
#[path = "file_check_tests.rs"]
mod tests;
