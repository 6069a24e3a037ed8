//! What a re-encryption checks before it changes anything and before it erases the old DEK
//! (session 5 findings F7, F8): a directory whose id is lost, and what `fsck --repair` set
//! aside in `cmkfs.quarantine/` (it cannot be sealed again, so it is never silently left
//! under a DEK about to be erased), through the CLI and, for the damage met mid-run, through
//! the library's fault hooks; and (F1) a batch a crash interrupted keeps its file's times.

use crate::common;

use std::fs;
use std::path::{Path, PathBuf};

use crate::reencrypt::run_in_process;
use cmkfs::home::Home;
use cmkfs::volume::header::VolumeHeader;
use cmkfs::volume::reencrypt::{ReencryptError, Step};
use common::*;

const JOURNAL: &str = "cmkfs.reencrypt.journal";
const QUARANTINE: &str = "cmkfs.quarantine";

/// A volume with `top.txt` and `d/x`; returns the backing path of `d`.
fn make(env: &Env) -> PathBuf {
    let m = env.mount(&env.cipher, &env.mnt);
    fs::create_dir(env.mnt.join("d")).unwrap();
    fs::write(env.mnt.join("d/x"), b"in d").unwrap();
    fs::write(env.mnt.join("top.txt"), b"top-level data").unwrap();
    m.unmount();
    backing_dir(&env.cipher)
}

/// The one backing directory at the root that is an entry (not metadata).
fn backing_dir(cipher: &Path) -> PathBuf {
    let dirs: Vec<PathBuf> = fs::read_dir(cipher)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir() && !is_metadata_name(p.file_name().unwrap()))
        .collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    dirs[0].clone()
}

/// Mounts, checks what it reads, unmounts.
fn assert_mount_reads(env: &Env, want: &[(&str, &[u8])], what: &str) {
    let m = env.mount(&env.cipher, &env.mnt);
    for (p, data) in want {
        let got = fs::read(env.mnt.join(p)).unwrap_or_else(|e| panic!("{what}: {p}: {e}"));
        assert_bytes_eq(&format!("{what}: {p}"), &got, data);
    }
    m.unmount();
}

fn reencrypt(env: &Env, extra: &[&str]) -> Output {
    let mut args = vec!["volume", "reencrypt", env.cipher.to_str().unwrap()];
    args.extend_from_slice(extra);
    env.cmkfs(&args)
}

#[test]
fn a_lost_directory_id_or_a_quarantine_is_refused_with_nothing_changed_and_restore_new_dek_too() {
    let env = Env::new();
    crate::backup::setup(&env);
    let d = make(&env);
    let header = fs::read(env.cipher.join(HEADER_NAME)).unwrap();
    // F8: one directory loses its id; the volume still mounts (that directory aside).
    let dirid = fs::read(d.join(".cmkfs.dirid")).unwrap();
    fs::remove_file(d.join(".cmkfs.dirid")).unwrap();
    let out = reencrypt(&env, &[]);
    out.assert_clear_error();
    assert!(
        out.stderr.contains("cmkfs fsck") && out.stderr.contains("nothing was changed"),
        "{out}"
    );
    assert_eq!(
        fs::read(env.cipher.join(HEADER_NAME)).unwrap(),
        header,
        "the header was changed"
    );
    assert!(!env.cipher.join(JOURNAL).exists(), "a journal was written");
    assert_mount_reads(&env, &[("top.txt", b"top-level data")], "after the refusal");
    // The id put back (as from a backup): the volume is whole again; not re-encrypted yet.
    fs::write(d.join(".cmkfs.dirid"), &dirid).unwrap();

    // F7: fsck --repair sets a file aside (its backing entry moved into another directory).
    let file = fs::read_dir(&env.cipher)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.is_file() && !is_metadata_name(p.file_name().unwrap()))
        .unwrap();
    fs::rename(&file, d.join(file.file_name().unwrap())).unwrap();
    env.cmkfs(&["fsck", "--repair", env.cipher.to_str().unwrap()]);
    assert!(env.cipher.join(QUARANTINE).is_dir());
    let out = reencrypt(&env, &[]);
    out.assert_clear_error();
    assert!(
        out.stderr.contains("cmkfs.quarantine/ holds 1 entries")
            && out.stderr.contains("--discard-quarantine")
            && out.stderr.contains("nothing was changed"),
        "{out}"
    );
    assert_eq!(fs::read(env.cipher.join(HEADER_NAME)).unwrap(), header);
    // Online: the same refusal, the mount serving on.
    let m = env.mount(&env.cipher, &env.mnt);
    let out = reencrypt(&env, &["--online"]);
    out.assert_clear_error();
    assert!(
        out.stderr.contains("cmkfs.quarantine/ holds 1 entries"),
        "{out}"
    );
    assert_eq!(fs::read(env.mnt.join("d/x")).unwrap(), b"in d");
    m.unmount();
    assert_eq!(fs::read(env.cipher.join(HEADER_NAME)).unwrap(), header);

    // restore --new-dek of an archive with a quarantine: refused, unless left out.
    let archive = env.root.join("q.tar");
    crate::backup::backup_with_bkey(&env, &archive);
    let restore = |dir: &str, extra: &[&str]| {
        let mut args = vec!["--new-dek"];
        args.extend_from_slice(extra);
        crate::backup::restore_to(&env, &archive, Path::new(dir), &args)
    };
    let r1 = env.root.join("r1");
    let out = restore(r1.to_str().unwrap(), &[]);
    out.assert_clear_error();
    assert!(
        out.stderr.contains("cmkfs.quarantine/ holds entries")
            && out.stderr.contains("--discard-quarantine"),
        "{out}"
    );
    assert!(!r1.exists(), "a refused restore left {}", r1.display());
    // Refused from the archive's manifest, before a single member is extracted (the check of
    // the extracted tree, "holds 1 entries", stays as a backstop).
    let home = Home::at(&env.home);
    let open = |kid: &cmkfs::vault::KeyId| -> Result<_, cmkfs::backup::BackupError> {
        Ok(cmkfs::vault::open(&kid.vault, &home)?)
    };
    let mut extracted = 0u64;
    let mut progress = |p: &cmkfs::backup::Progress| extracted = extracted.max(p.members_done);
    let archives = [archive.clone()];
    let r = cmkfs::backup::restore::restore(
        &cmkfs::backup::restore::RestoreRequest {
            home: &home,
            archives: &archives,
            target: &r1,
            des: "d",
            new_dek: true,
            discard_quarantine: false,
            allow_devices: false,
            open_vault: &open,
        },
        Some(&mut progress),
    );
    let err = r.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("holds entries"), "{err}");
    assert_eq!(extracted, 0, "members were extracted before the refusal");
    assert!(!r1.exists());
    let r2 = env.root.join("r2");
    let out = restore(r2.to_str().unwrap(), &["--discard-quarantine"]);
    out.assert_ok();
    assert!(
        out.stdout
            .contains("1 entries of the archive's cmkfs.quarantine/ left out"),
        "{out}"
    );
    assert!(!r2.join(QUARANTINE).exists(), "the quarantine was restored");

    // Discarded on request: the run finishes, the quarantine is gone with the old DEK.
    let out = reencrypt(&env, &["--discard-quarantine"]);
    out.assert_ok();
    assert!(
        out.stdout
            .contains("1 entries of cmkfs.quarantine/ were deleted"),
        "{out}"
    );
    assert!(!env.cipher.join(QUARANTINE).exists());
    let h = VolumeHeader::read(&env.cipher).unwrap();
    assert!(h.retiring.is_none() && h.key_generation == 1);
    assert_mount_reads(&env, &[("d/x", b"in d")], "at the end");
}

/// Runs (or resumes) a re-encryption in-process, calling `at` at each step.
fn run_with(env: &Env, at: &mut dyn FnMut(Step)) -> Result<(), ReencryptError> {
    run_in_process(env, false, &mut |s| {
        at(s);
        Ok(())
    })
    .map(|_| ())
}

#[test]
fn damage_met_mid_run_stops_it_with_the_old_dek_kept_and_the_volume_mounting() {
    let env = Env::new();
    env.init(&env.cipher).assert_ok();
    let d = make(&env);
    let dirid = fs::read(d.join(".cmkfs.dirid")).unwrap();
    // F8, mid-run: the directory loses its id after the check, as the header switches.
    let cipher = env.cipher.clone();
    let r = run_with(&env, &mut |s| {
        if s == Step::HeaderStarted {
            fs::remove_file(backing_dir(&cipher).join(".cmkfs.dirid")).unwrap();
        }
    });
    let e = r.expect_err("the run went on past a directory it could not enter");
    assert!(
        matches!(&e, ReencryptError::Refused(m) if m.contains("cmkfs fsck") && m.contains("old DEK is kept")),
        "{e}"
    );
    let h = VolumeHeader::read(&env.cipher).unwrap();
    assert!(h.retiring.is_some(), "the old DEK was erased");
    // The mount finishes what it can, leaves the directory, and serves the rest.
    assert_mount_reads(&env, &[("top.txt", b"top-level data")], "mid-run");
    // The id back (the entry has its new backing name by now): the run resumes, and a
    // quarantine filled meanwhile stops it before the old DEK goes.
    fs::write(backing_dir(&env.cipher).join(".cmkfs.dirid"), &dirid).unwrap();
    let r = run_with(&env, &mut |s| {
        if s == Step::NamesDone {
            let b = cipher.join(QUARANTINE).join("20260101T000000Z");
            fs::create_dir_all(&b).unwrap();
            fs::write(b.join("QUJDREVG"), b"set aside").unwrap();
        }
    });
    let e = r.expect_err("the old DEK was erased with a quarantine left under it");
    assert!(
        matches!(&e, ReencryptError::Refused(m) if m.contains("cmkfs.quarantine/ holds 1 entries")),
        "{e}"
    );
    assert!(VolumeHeader::read(&env.cipher).unwrap().retiring.is_some());
    assert_mount_reads(&env, &[("d/x", b"in d")], "before the end");
    reencrypt(&env, &["--discard-quarantine"]).assert_ok();
    let h = VolumeHeader::read(&env.cipher).unwrap();
    assert!(h.retiring.is_none() && h.key_generation == 1);
    assert_mount_reads(
        &env,
        &[("d/x", b"in d"), ("top.txt", b"top-level data")],
        "at the end",
    );
    let out = env.cmkfs(&["fsck", env.cipher.to_str().unwrap()]);
    assert!(out.ok(), "fsck: {out}");
}

/// A fresh volume, mounted, whose re-encryption converts 64 KiB per batch (so a file of
/// the returned 300 000 random bytes, seeded by `label`, spans batches).
fn mounted_in_small_batches(label: &str) -> (Env, Vec<u8>, Mount) {
    std::env::set_var("CMKFS_REENCRYPT_BATCH_BYTES", "65536");
    let env = Env::new();
    env.init(&env.cipher).assert_ok();
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed(label));
    let data = random_bytes(&mut rng, 300_000);
    let m = env.mount(&env.cipher, &env.mnt);
    (env, data, m)
}

#[test]
fn a_batch_interrupted_by_a_crash_keeps_its_files_times_after_recovery_and_resume() {
    // Files span batches: the crash lands inside one file's conversion.
    let (env, data, m) = mounted_in_small_batches("reencrypt times");
    let (f, g) = (env.mnt.join("f"), env.mnt.join("g"));
    fs::write(&f, &data).unwrap();
    fs::write(&g, &data[..5000]).unwrap();
    let old = std::time::UNIX_EPOCH + std::time::Duration::new(1_577_836_800, 123_000_000);
    for p in [&f, &g] {
        let times = fs::FileTimes::new().set_accessed(old).set_modified(old);
        fs::File::options()
            .write(true)
            .open(p)
            .unwrap()
            .set_times(times)
            .unwrap();
    }
    m.unmount();
    let mtimes = |what: &str| {
        let m = env.mount(&env.cipher, &env.mnt);
        for p in ["f", "g"] {
            let md = fs::metadata(env.mnt.join(p)).unwrap();
            assert_eq!(md.modified().unwrap(), old, "{what}: {p}'s mtime moved");
        }
        assert_bytes_eq(what, &fs::read(env.mnt.join("f")).unwrap(), &data);
        m.unmount();
    };
    // Stopped after the first range of its second batch is written (a crash there): the
    // file's header and times are the batch's to fix, which the mount's recovery does.
    let mut batches = 0;
    let mut fault = |s: Step| {
        if s == Step::DataWritten {
            batches += 1;
            if batches == 2 {
                return Err(std::io::Error::other("crash"));
            }
        }
        Ok(())
    };
    let r = run_in_process(&env, false, &mut fault);
    assert!(
        matches!(r, Err(ReencryptError::Interrupted(Step::DataWritten))),
        "{:?}",
        r.map(|_| ())
    );
    mtimes("after the mount's recovery");
    reencrypt(&env, &[]).assert_ok();
    mtimes("after the resumed run");
}

/// The backing files at the root that are entries (not metadata), sorted.
fn backing_files(cipher: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(cipher)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && !is_metadata_name(p.file_name().unwrap()))
        .collect();
    v.sort();
    v
}

/// A backing file's header fields (key generation, units already re-encrypted).
fn key_gen_of(p: &Path) -> (u16, u64) {
    let b = fs::read(p).unwrap();
    (
        u16::from_le_bytes([b[6], b[7]]),
        u64::from_le_bytes(b[24..32].try_into().unwrap()),
    )
}

/// Writes a backing file's `key_gen` field (bytes 6..8 of the file header), as one flipped
/// bit or a file put back from an older copy would leave it.
fn set_key_gen(p: &Path, g: u16) {
    use std::os::unix::fs::FileExt;
    let f = fs::File::options().write(true).open(p).unwrap();
    f.write_all_at(&g.to_le_bytes(), 6).unwrap();
}

/// `fsck --json` of the volume: exit code and the (kind, fix, severity) of every finding.
fn fsck_kinds(env: &Env, extra: &[&str]) -> (i32, Vec<(String, String, String)>, Output) {
    let mut args = vec!["fsck", env.cipher.to_str().unwrap(), "--json"];
    args.extend_from_slice(extra);
    let out = env.cmkfs(&args);
    let v: serde_json::Value =
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out}"));
    let kinds = v["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let s = |k: &str| p[k].as_str().unwrap_or_default().to_string();
            (s("kind"), s("fix"), s("severity"))
        })
        .collect();
    (out.status.code().unwrap(), kinds, out)
}

/// Session 8 findings F5, F6, F3, F7: a file header under a key generation the volume does
/// not have (one flipped bit: 0 -> 1, the generation a re-encryption is about to create;
/// or a file put back from before a re-encryption) or a corrupt file header. fsck reports it
/// (`key_generation_unknown`, quarantined by `--repair`); `volume reencrypt`, offline and
/// online, refuses before the header switches, naming the file and `cmkfs fsck --repair`;
/// a quarantine left by a repair is a warning of a clean fsck (exit 0) saying where it is.
#[test]
fn a_file_under_a_generation_the_volume_lacks_is_found_by_fsck_and_refused_before_anything_changes()
{
    let env = Env::new();
    env.init(&env.cipher).assert_ok();
    let m = env.mount(&env.cipher, &env.mnt);
    fs::write(env.mnt.join("a"), vec![7u8; 5000]).unwrap();
    fs::write(env.mnt.join("b"), b"second file").unwrap();
    m.unmount();
    let files = backing_files(&env.cipher);
    assert_eq!(files.len(), 2);
    // `a`'s (the longer one): `b` is read through the mount meanwhile.
    let victim = files
        .iter()
        .max_by_key(|p| fs::metadata(p).unwrap().len())
        .unwrap()
        .clone();
    let header = fs::read(env.cipher.join(HEADER_NAME)).unwrap();
    let refused = |env: &Env, extra: &[&str], what: &str| {
        let out = reencrypt(env, extra);
        out.assert_clear_error();
        assert!(
            out.stderr
                .contains(victim.file_name().unwrap().to_str().unwrap())
                && out.stderr.contains(what)
                && out.stderr.contains("cmkfs fsck --repair")
                && out.stderr.contains("nothing was changed"),
            "{out}"
        );
        assert_eq!(
            fs::read(env.cipher.join(HEADER_NAME)).unwrap(),
            header,
            "the header was changed"
        );
        assert!(!env.cipher.join(JOURNAL).exists(), "a journal was written");
    };

    // F5: key_gen 0 -> 1 in a generation-0 volume.
    set_key_gen(&victim, 1);
    let (code, kinds, out) = fsck_kinds(&env, &[]);
    assert_eq!(code, 2, "{out}");
    assert_eq!(
        kinds,
        [(
            "key_generation_unknown".into(),
            "quarantine".into(),
            "error".into()
        )],
        "{out}"
    );
    refused(&env, &[], "key generation 1 where the volume expects 0");
    let m = env.mount(&env.cipher, &env.mnt);
    refused(
        &env,
        &["--online"],
        "key generation 1 where the volume expects 0",
    );
    assert_eq!(fs::read(env.mnt.join("b")).unwrap(), b"second file");
    m.unmount();

    // F3: a corrupt file header (an unknown version).
    set_key_gen(&victim, 0);
    let saved = fs::read(&victim).unwrap();
    let mut bad = saved.clone();
    bad[4] = 9;
    fs::write(&victim, &bad).unwrap();
    refused(&env, &[], "file header version 9 is not supported");
    fs::write(&victim, &saved).unwrap();

    // Attack 14, F2: `reencrypted` (header offset 24) set on a file at the current
    // generation: the run took units before it as converted and retired the old DEK.
    let mut bad = saved.clone();
    bad[24] = 2;
    fs::write(&victim, &bad).unwrap();
    let (code, kinds, out) = fsck_kinds(&env, &[]);
    assert_eq!(code, 2, "{out}");
    assert_eq!(
        kinds,
        [(
            "reencryption_progress_invalid".into(),
            "quarantine".into(),
            "error".into()
        )],
        "{out}"
    );
    refused(&env, &[], "with units before 2 marked converted");
    fs::write(&victim, &saved).unwrap();

    // F6: the volume re-encrypted (generation 1), then the file put back from before.
    reencrypt(&env, &[]).assert_ok();
    // Its backing name is under the new name key now: the one of the same length.
    let victim = backing_files(&env.cipher)
        .into_iter()
        .find(|p| fs::metadata(p).unwrap().len() == saved.len() as u64)
        .unwrap();
    assert_eq!(key_gen_of(&victim), (1, 0));
    fs::write(&victim, &saved).unwrap();
    let header = fs::read(env.cipher.join(HEADER_NAME)).unwrap();
    let out = reencrypt(&env, &[]);
    assert!(
        out.stderr
            .contains("key generation 0 where the volume expects 1")
            && out.stderr.contains("nothing was changed"),
        "{out}"
    );
    assert_eq!(fs::read(env.cipher.join(HEADER_NAME)).unwrap(), header);
    let (code, kinds, out) = fsck_kinds(&env, &["--repair"]);
    assert_eq!(code, 1, "{out}");
    assert_eq!(kinds[0].0, "key_generation_unknown", "{out}");

    // F7: what was set aside is named by every later fsck, which stays clean (exit 0).
    let (code, kinds, out) = fsck_kinds(&env, &[]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        kinds,
        [(
            "quarantine_not_empty".into(),
            "none".into(),
            "warning".into()
        )],
        "{out}"
    );
    assert!(
        out.stdout.contains("1 entries") && out.stdout.contains("cmkfs.fsck.json"),
        "{out}"
    );
    let out = env.cmkfs(&["fsck", env.cipher.to_str().unwrap()]);
    assert!(
        out.ok() && out.stdout.contains("clean, but cmkfs.quarantine/"),
        "{out}"
    );
    reencrypt(&env, &["--discard-quarantine"]).assert_ok();
    let m = env.mount(&env.cipher, &env.mnt);
    let left: Vec<_> = fs::read_dir(&env.mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 1, "{left:?}");
    m.unmount();
}

/// F5, during a run: a resumed run refuses a file under neither the retiring nor the new
/// generation, and the old DEK is never erased while a file is not wholly under the new
/// one (a file set back to the retiring generation after its batch: the check before the
/// header loses the old DEK stops the run, the old DEK kept).
#[test]
fn a_run_resumed_or_finishing_with_a_file_not_converted_keeps_the_old_dek() {
    let env = Env::new();
    env.init(&env.cipher).assert_ok();
    let m = env.mount(&env.cipher, &env.mnt);
    fs::write(env.mnt.join("a"), vec![7u8; 5000]).unwrap();
    m.unmount();
    let victim = backing_files(&env.cipher)[0].clone();
    // Stopped right after the header switched (a crash there).
    let r = run_in_process(&env, false, &mut |s| match s {
        Step::HeaderStarted => Err(std::io::Error::other("crash")),
        _ => Ok(()),
    });
    assert!(
        matches!(r, Err(ReencryptError::Interrupted(_))),
        "{:?}",
        r.map(|_| ())
    );
    set_key_gen(&victim, 7);
    let out = reencrypt(&env, &[]);
    out.assert_clear_error();
    assert!(
        out.stderr
            .contains("key generation 7 where the volume expects 0 or 1")
            && out.stderr.contains("old DEK is kept")
            && out.stderr.contains("cmkfs fsck --repair"),
        "{out}"
    );
    assert!(VolumeHeader::read(&env.cipher).unwrap().retiring.is_some());
    set_key_gen(&victim, 0);
    // The file converted, then set back to the retiring generation before the end.
    let cipher = env.cipher.clone();
    let r = run_in_process(&env, false, &mut |s| {
        // Its backing name is under the new name key by now.
        let path = &backing_files(&cipher)[0];
        if s == Step::JournalRetired && key_gen_of(path).0 == 1 {
            set_key_gen(path, 0);
        }
        Ok(())
    });
    let e = r
        .map(|_| ())
        .expect_err("the old DEK was erased with a file under it");
    assert!(
        matches!(&e, ReencryptError::Refused(m) if m.contains("expects 1 (wholly converted)") && m.contains("old DEK is kept")),
        "{e}"
    );
    assert!(VolumeHeader::read(&env.cipher).unwrap().retiring.is_some());
}

/// Sets a backing file's `reencrypted` field (bytes 24..32 of the file header).
fn set_progress(p: &Path, units: u64) {
    use std::os::unix::fs::FileExt;
    let f = fs::File::options().write(true).open(p).unwrap();
    f.write_all_at(&units.to_le_bytes(), 24).unwrap();
}

/// Attack session 15, F1: during an interrupted run, a file still under the retiring
/// generation whose progress passes its last unit (one flipped high bit) is found by fsck
/// and refused by the resumed run, offline and online, with the old DEK kept (a resume used
/// to take it as converted and erase the only DEK that read it). A file shrunk through the
/// mount meanwhile has its progress lowered to its new unit count in the same step: fsck
/// stays clean and the resumed run ends with every byte intact.
#[test]
fn a_retiring_file_past_its_last_unit_is_refused_and_one_shrunk_mid_run_keeps_its_data() {
    // Files span batches: the run stops between two batches of the big file.
    let (env, data, m) = mounted_in_small_batches("past its end");
    fs::write(env.mnt.join("big"), &data).unwrap();
    fs::write(env.mnt.join("small"), &data[..5000]).unwrap();
    m.unmount();
    let mut batches = 0;
    let r = run_in_process(&env, false, &mut |s| {
        if s == Step::JournalRetired {
            batches += 1;
            if batches == 2 {
                return Err(std::io::Error::other("stopped"));
            }
        }
        Ok(())
    });
    assert!(
        matches!(r, Err(ReencryptError::Interrupted(_))),
        "{:?}",
        r.map(|_| ())
    );
    let big = backing_files(&env.cipher)
        .into_iter()
        .max_by_key(|p| fs::metadata(p).unwrap().len())
        .unwrap();
    let (gen, done) = key_gen_of(&big);
    assert!(
        gen == 0 && done >= 16,
        "({gen}, {done}): not a part-converted file"
    );

    // One flipped high bit: fsck finds it, the resume refuses it (offline and online), the
    // old DEK stays.
    set_progress(&big, done | 1 << 56);
    let (code, kinds, out) = fsck_kinds(&env, &[]);
    assert_ne!(code, 0, "{out}");
    assert!(
        kinds.iter().any(|k| k.0 == "reencryption_progress_invalid"),
        "{kinds:?}"
    );
    let out = reencrypt(&env, &[]);
    out.assert_clear_error();
    assert!(
        out.stderr.contains("past the file's 74 data units")
            && out.stderr.contains("old DEK is kept"),
        "{out}"
    );
    assert!(VolumeHeader::read(&env.cipher).unwrap().retiring.is_some());
    let m = env.mount(&env.cipher, &env.mnt);
    set_progress(&big, done | 1 << 56);
    let out = reencrypt(&env, &["--online"]);
    out.assert_clear_error();
    assert!(out.stderr.contains("past the file's"), "{out}");
    assert!(VolumeHeader::read(&env.cipher).unwrap().retiring.is_some());

    // Put back, then shrunk through the mount below its progress: lowered with the cut.
    set_progress(&big, done);
    let keep = 3 * 4096 + 7;
    fs::File::options()
        .write(true)
        .open(env.mnt.join("big"))
        .unwrap()
        .set_len(keep as u64)
        .unwrap();
    assert_eq!(key_gen_of(&big), (0, 4), "the progress was not lowered");
    assert_bytes_eq(
        "shrunk",
        &fs::read(env.mnt.join("big")).unwrap(),
        &data[..keep],
    );
    m.unmount();
    let (code, kinds, out) = fsck_kinds(&env, &[]);
    assert!(
        code == 0 && kinds.iter().all(|k| k.0 == "reencrypt_in_progress"),
        "{out}"
    );
    reencrypt(&env, &[]).assert_ok();
    let h = VolumeHeader::read(&env.cipher).unwrap();
    assert!(h.retiring.is_none() && h.key_generation == 1);
    assert_mount_reads(
        &env,
        &[("big", &data[..keep]), ("small", &data[..5000])],
        "after the resumed run",
    );
}
