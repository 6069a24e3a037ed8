//! The matrix: every defect the judge knows, crafted in a real file of each layout, is
//! rejected by all three callers — fsck's finding, re-encryption's preflight, backup's
//! screen — through the functions they call per file; healthy files pass all three.

use std::fs::File;

use super::*;
use crate::backup::screen::damaged_data_file;
use crate::fsck::data_file::finding;
use crate::fsck::{Fix, ProblemKind};
use crate::volume::layout::{data_len, FileHeader, Layout, FILE_VERSION_V1, FILE_VERSION_V2};
use crate::volume::reencrypt::preflight::{refusal, FilesAt};

/// The volume's current generation in the matrix (a re-encryption retires `CUR - 1`).
const CUR: u32 = 5;
const RET: u32 = CUR - 1;
/// The volume's data unit size in the matrix (bytes).
const UNIT: u64 = 4096;

/// The volume states the callers see: fsck and backup take the header's generations
/// ([`Generations::of`]); the run's preflight its phase.
#[derive(Clone, Copy, Debug, PartialEq)]
enum State {
    /// No re-encryption: fsck, backup, and a run's start.
    Idle,
    /// A re-encryption from `RET` to `CUR` runs: fsck, backup (whose volume-level check then
    /// refuses the whole volume first, "is being re-encrypted"), a resumed run.
    Running,
    /// A run about to erase `RET`'s DEK: the preflight only (fsck and backup never see it).
    Finishing,
}

impl State {
    fn header_generations(self) -> Option<Generations> {
        match self {
            State::Idle => Some(Generations::of(CUR, None)),
            State::Running => Some(Generations::of(CUR, Some(RET))),
            State::Finishing => None,
        }
    }

    fn phase(self) -> FilesAt {
        match self {
            State::Idle => FilesAt::Start(CUR),
            State::Running => FilesAt::Resume {
                retiring: RET,
                new: CUR,
            },
            State::Finishing => FilesAt::Finish(CUR),
        }
    }
}

/// A backing file: `header`'s area in `lay`, then a data area of `data` bytes.
fn file_bytes(lay: Layout, header: &FileHeader, data: usize) -> Vec<u8> {
    let mut b = lay.header_area(header);
    b.resize(b.len() + data, 0x5a);
    b
}

struct Verdicts {
    judge: Result<Option<FileHeader>, FileDefect>,
    fsck: Option<(ProblemKind, String, Fix)>,
    preflight: Option<String>,
    backup: Option<String>,
}

/// What each caller makes of `bytes` as a data file of a `lay` volume in `state`, read from a
/// real file as the callers read it.
fn verdicts(dir: &std::path::Path, lay: Layout, state: State, bytes: &[u8]) -> Verdicts {
    let p = dir.join("f");
    std::fs::write(&p, bytes).unwrap();
    let f = File::open(&p).unwrap();
    let len = bytes.len() as u64;
    let head = read_head(&f, len).unwrap();
    let gens = state.header_generations();
    let expect = Expect::new(
        lay,
        gens.or(Some(Generations::Converted {
            retiring: RET,
            current: CUR,
        })),
    )
    .with_unit_size(UNIT);
    let of = |g| Expect::new(lay, Some(g)).with_unit_size(UNIT);
    Verdicts {
        judge: judge(&expect, len, &head),
        fsck: gens.and_then(|g| finding(&of(g), len, &head)),
        preflight: refusal(lay, UNIT, state.phase(), len, read_head(&f, len)),
        backup: gens.and_then(|g| damaged_data_file("abc", &f, len, &of(g))),
    }
}

#[test]
fn every_defect_is_rejected_by_fsck_reencryption_and_backup_and_healthy_files_pass_all_three() {
    let dir = tempfile::tempdir().unwrap();
    for lay in [Layout::V2, Layout::V3] {
        let ok = FileHeader {
            version: lay.file_version,
            key_gen: CUR as u16,
            file_id: [9; 16],
            reencrypted: 0,
        };
        let other_version = if lay == Layout::V2 { 3 } else { 2 };
        let with = |h: FileHeader| file_bytes(lay, &h, 5016);
        let mut wrong_magic = with(ok);
        wrong_magic[0] = b'X';

        // (what, state, bytes, the judge's verdict, fsck's finding and whether it moves it)
        type Row = (&'static str, State, Vec<u8>, FileDefect, ProblemKind, Fix);
        let q = Fix::Quarantine;
        let mut rows: Vec<Row> = vec![
            (
                "torn: 10 bytes",
                State::Idle,
                with(ok)[..10].to_vec(),
                FileDefect::Truncated { len: 10 },
                ProblemKind::FileHeaderTruncated,
                q,
            ),
            (
                "wrong magic",
                State::Idle,
                wrong_magic,
                FileDefect::BadMagic,
                ProblemKind::FileHeaderCorrupt,
                q,
            ),
            (
                "unknown version",
                State::Idle,
                with(FileHeader { version: 9, ..ok }),
                FileDefect::UnknownVersion(9),
                ProblemKind::FileHeaderCorrupt,
                q,
            ),
            (
                "another format's version",
                State::Idle,
                with(FileHeader {
                    version: other_version,
                    ..ok
                }),
                FileDefect::OtherFormat {
                    found: other_version,
                    volume: lay.file_version,
                },
                ProblemKind::FileFormatMismatch,
                q,
            ),
            (
                "a data area of 7 bytes",
                State::Idle,
                file_bytes(lay, &ok, 7),
                FileDefect::BadLength {
                    len: lay.data_offset + 7,
                    why: lay.logical_size(lay.data_offset + 7).unwrap_err(),
                },
                ProblemKind::FileLengthInvalid,
                q,
            ),
            (
                "reencrypted set at the current generation, no run",
                State::Idle,
                with(FileHeader {
                    reencrypted: 2,
                    ..ok
                }),
                FileDefect::ProgressInvalid {
                    key_gen: CUR as u16,
                    reencrypted: 2,
                    expected: Generations::Current(CUR),
                },
                ProblemKind::ReencryptionProgressInvalid,
                q,
            ),
            (
                "reencrypted set at the current generation during a run",
                State::Running,
                with(FileHeader {
                    reencrypted: 1,
                    ..ok
                }),
                FileDefect::ProgressInvalid {
                    key_gen: CUR as u16,
                    reencrypted: 1,
                    expected: Generations::of(CUR, Some(RET)),
                },
                ProblemKind::ReencryptionProgressInvalid,
                q,
            ),
            (
                "reencrypted set under an unknown generation",
                State::Running,
                with(FileHeader {
                    key_gen: 77,
                    reencrypted: 1,
                    ..ok
                }),
                FileDefect::ProgressInvalid {
                    key_gen: 77,
                    reencrypted: 1,
                    expected: Generations::of(CUR, Some(RET)),
                },
                ProblemKind::ReencryptionProgressInvalid,
                q,
            ),
        ];
        for (what, key_gen, state) in [
            (
                "the generation a re-encryption would create",
                CUR + 1,
                State::Idle,
            ),
            (
                "a retiring generation where none is retiring",
                RET,
                State::Idle,
            ),
            ("a generation far off", 7777, State::Idle),
            (
                "neither the retiring nor the current",
                RET - 1,
                State::Running,
            ),
            ("the next one during a run", CUR + 1, State::Running),
        ] {
            rows.push((
                what,
                state,
                with(FileHeader {
                    key_gen: key_gen as u16,
                    ..ok
                }),
                FileDefect::UnknownGeneration {
                    key_gen: key_gen as u16,
                    expected: state.header_generations().unwrap(),
                },
                ProblemKind::KeyGenerationUnknown,
                q,
            ));
        }
        // During a run, a file still under the retiring generation whose progress passes
        // its last unit (attack session 15, F1: a flipped high bit; a resumed run took the
        // file as converted and erased the only DEK that read it).
        let units = lay
            .logical_size(with(ok).len() as u64)
            .unwrap()
            .div_ceil(UNIT);
        for reencrypted in [units + 1, units | 1 << 56, 1 << 40, u64::MAX] {
            rows.push((
                "a retiring file's progress past its last unit",
                State::Running,
                with(FileHeader {
                    key_gen: RET as u16,
                    reencrypted,
                    ..ok
                }),
                FileDefect::ProgressPastEnd { reencrypted, units },
                ProblemKind::ReencryptionProgressInvalid,
                q,
            ));
        }
        if lay == Layout::V3 {
            // The v3 header area is a page: a length with the file header but not the area.
            rows.push((
                "a v3 file of 100 bytes",
                State::Idle,
                with(ok)[..100].to_vec(),
                FileDefect::BadLength {
                    len: 100,
                    why: lay.logical_size(100).unwrap_err(),
                },
                ProblemKind::FileLengthInvalid,
                q,
            ));
            rows.push((
                "a v1 file in a v3 volume",
                State::Idle,
                with(FileHeader {
                    version: FILE_VERSION_V1,
                    ..ok
                }),
                FileDefect::OtherFormat {
                    found: FILE_VERSION_V1,
                    volume: 3,
                },
                ProblemKind::FileFormatMismatch,
                q,
            ));
        } else {
            // `cmkfs upgrade` converts it: fsck reports it without moving it.
            rows.push((
                "a v1 file in a v2 volume",
                State::Idle,
                with(FileHeader {
                    version: FILE_VERSION_V1,
                    ..ok
                }),
                FileDefect::V1File,
                ProblemKind::FileFormatV1,
                Fix::None,
            ));
        }

        for (what, state, bytes, defect, kind, fix) in rows {
            let at = format!("{what} ({lay:?}, {state:?})");
            let v = verdicts(dir.path(), lay, state, &bytes);
            assert_eq!(v.judge, Err(defect.clone()), "{at}");
            let line = defect.to_string();
            assert!(!line.is_empty() && !line.contains('\n'), "{at}: {line:?}");
            let (k, detail, f) = v.fsck.unwrap_or_else(|| panic!("fsck passed {at}"));
            assert_eq!((k, f), (kind, fix), "{at}");
            assert!(detail.contains(&line), "{at}: {detail}");
            let why = v.preflight.unwrap_or_else(|| panic!("the run passed {at}"));
            assert_eq!(why, line, "{at}");
            let why = v.backup.unwrap_or_else(|| panic!("backup passed {at}"));
            assert_eq!(why, line, "{at}");
        }

        // The run about to erase the retiring DEK: every file wholly under the current one.
        for (what, h, defect) in [
            (
                "still under the retiring generation",
                FileHeader {
                    key_gen: RET as u16,
                    ..ok
                },
                FileDefect::NotConverted {
                    key_gen: RET as u16,
                    reencrypted: 0,
                    current: CUR as u16,
                },
            ),
            (
                "part-converted",
                FileHeader {
                    key_gen: RET as u16,
                    reencrypted: 1,
                    ..ok
                },
                FileDefect::NotConverted {
                    key_gen: RET as u16,
                    reencrypted: 1,
                    current: CUR as u16,
                },
            ),
            (
                "current with units marked converted",
                FileHeader {
                    reencrypted: 3,
                    ..ok
                },
                FileDefect::ProgressInvalid {
                    key_gen: CUR as u16,
                    reencrypted: 3,
                    expected: Generations::Converted {
                        retiring: RET,
                        current: CUR,
                    },
                },
            ),
        ] {
            let v = verdicts(dir.path(), lay, State::Finishing, &with(h));
            assert_eq!(v.judge, Err(defect.clone()), "{what} ({lay:?})");
            assert_eq!(v.preflight, Some(defect.to_string()), "{what} ({lay:?})");
        }

        // Healthy files pass all three: empty, a bare header area, data of every tail length
        // at the current generation; during a run, also the retiring generation, converted
        // in part or not at all.
        let mut healthy: Vec<(State, Vec<u8>)> = vec![(State::Idle, Vec::new())];
        for state in [State::Idle, State::Running, State::Finishing] {
            healthy.push((state, file_bytes(lay, &ok, 0)));
            for size in [1, 15, 16, 17, 4095, 4096, 4097, 8200] {
                healthy.push((state, file_bytes(lay, &ok, data_len(size) as usize)));
            }
        }
        // Up to its unit count: a file shrunk during the run holds exactly that until the
        // run's next batch flips its generation.
        for reencrypted in [0, 1, units - 1, units] {
            let h = FileHeader {
                key_gen: RET as u16,
                reencrypted,
                ..ok
            };
            healthy.push((State::Running, with(h)));
        }
        for (state, bytes) in healthy {
            let at = format!("{} bytes ({lay:?}, {state:?})", bytes.len());
            let v = verdicts(dir.path(), lay, state, &bytes);
            assert!(v.judge.is_ok(), "{at}: {:?}", v.judge);
            assert_eq!(v.fsck, None, "{at}");
            assert_eq!(v.preflight, None, "{at}");
            assert_eq!(v.backup, None, "{at}");
        }
    }
}

/// Without the key (an unverified volume header) fsck still reports a file of another
/// format or length, but moves nothing, and judges no generation; a backup under `--force`
/// passes a length no file at rest has, never a torn header.
#[test]
fn unverified_and_in_flux_judgements_leave_out_what_they_cannot_know() {
    let lay = Layout::V2;
    let ok = FileHeader {
        version: FILE_VERSION_V2,
        key_gen: 3,
        file_id: [1; 16],
        reencrypted: 9,
    };
    let bytes = file_bytes(lay, &ok, 7);
    let len = bytes.len() as u64;
    let unverified = Expect::new(lay, None);
    let (kind, detail, fix) = finding(&unverified, len, &bytes).unwrap();
    assert_eq!((kind, fix), (ProblemKind::FileLengthInvalid, Fix::None));
    assert!(detail.contains("not moved"), "{detail}");
    let good_len = file_bytes(lay, &ok, 32);
    assert_eq!(finding(&unverified, 64, &good_len), None);
    let flux = Expect::new(lay, Some(Generations::Current(3))).lengths_in_flux();
    assert!(matches!(
        judge(&flux, len, &bytes),
        Err(FileDefect::ProgressInvalid { .. })
    ));
    let ok0 = FileHeader {
        reencrypted: 0,
        ..ok
    };
    assert!(judge(&flux, len, &file_bytes(lay, &ok0, 7)).is_ok());
    assert_eq!(
        judge(&flux, 20, &bytes[..20]),
        Err(FileDefect::Truncated { len: 20 })
    );
    // A retiring file's progress past its 1 unit: judged only with the unit size and a
    // length at rest (a writer may be growing the file under a backup's `--force`).
    let running = Expect::new(lay, Some(Generations::of(4, Some(3))));
    assert!(judge(&running, 64, &good_len).is_ok());
    assert!(judge(
        &running.with_unit_size(4096).lengths_in_flux(),
        64,
        &good_len
    )
    .is_ok());
    assert_eq!(
        judge(&running.with_unit_size(4096), 64, &good_len),
        Err(FileDefect::ProgressPastEnd {
            reencrypted: 9,
            units: 1
        })
    );
}
