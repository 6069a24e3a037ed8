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

#[test]
fn a_batch_interrupted_by_a_crash_keeps_its_files_times_after_recovery_and_resume() {
    // Files span batches: the crash lands inside one file's conversion.
    std::env::set_var("CMKFS_REENCRYPT_BATCH_BYTES", "65536");
    let env = Env::new();
    env.init(&env.cipher).assert_ok();
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed("reencrypt times"));
    let data = random_bytes(&mut rng, 300_000);
    let m = env.mount(&env.cipher, &env.mnt);
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
