//! Format v1 → v2 (issue 10): volumes made by the release that wrote format v1 keep every
//! byte, including the tails v1 itself misread as zeros.
//!
//! * The committed fixture (tests/fixtures/v1-volume, made by that release): `cmkfs fsck`
//!   reports the zero tails by plaintext path, `cmkfs upgrade` converts it, every file is
//!   byte-identical to the manifest through a mount, fsck is clean.
//! * `cmkfs mount` of a v1 volume converts it first and says so on stderr and in its log.
//! * Crash safety: the library's fault hook stops the upgrade after every single step (a
//!   crash there), a second run resumes; and `cmkfs upgrade` is SIGKILLed at random moments
//!   on a bigger volume. Every file is intact afterwards.
//! * Double encryption: both layers of v1 tails decode, including a tail whose inner layer
//!   v1 took for a hole.
//! * fsck on v2 (v1 files left over, invalid lengths), the lock against mounts, a damaged
//!   journal.

use crate::common;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cmkfs::crypto::{Dek, VolumeKeys};
use cmkfs::engine::SectorEngine;
use cmkfs::home::Home;
use cmkfs::volume::content::{self, Ctx, FileState};
use cmkfs::volume::header::{PlatformEnvelope, VolumeHeader};
use cmkfs::volume::layout;
use cmkfs::volume::lock::VolumeLock;
use cmkfs::volume::names::{self, DirId, DIRID_FILE};
use cmkfs::volume::upgrade::{self, Hooks, Step, UpgradeError, JOURNAL_FILE};
use cmkfs::volume::v1::TailDecision;
use common::v1_fixture::{self, V1Fixture};
use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};

fn sha(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{out}"))
}

/// `cmkfs fsck --json` (exit status, report).
fn fsck(env: &Env) -> (i32, serde_json::Value) {
    let out = env.cmkfs(&[
        OsStr::new("fsck"),
        env.cipher.as_os_str(),
        OsStr::new("--json"),
    ]);
    (out.status.code().unwrap_or(-1), json(&out))
}

/// (kind, plaintext) of every problem of a fsck report.
fn problems(r: &serde_json::Value) -> Vec<(String, String)> {
    r["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["kind"].as_str().unwrap().to_string(),
                p["plaintext"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// Every manifest file through the mount: sizes and SHA-256.
fn check_files_through(m: &Mount, fx: &V1Fixture) {
    for (rel, truth) in &fx.files {
        let got = read(&m.path(rel));
        assert_eq!(got.len() as u64, truth.size, "{rel}: size");
        assert_eq!(sha(&got), truth.sha256, "{rel}: contents");
    }
}

#[test]
fn fixture_fsck_reports_zero_tails_and_upgrade_restores_every_file() {
    let env = Env::new();
    let fx = v1_fixture::copy(&env.root);
    assert_eq!(env.info(&env.cipher)["format_version"], 1);

    // fsck on v1: every tail v1 reads as zeros, by plaintext path; the data ones are errors.
    let (code, r) = fsck(&env);
    let p = problems(&r);
    assert_eq!(code, 2, "{r:#}");
    let mut read_as_zeros: Vec<String> = p
        .iter()
        .filter(|(k, _)| k == "v1_tail_read_as_zeros")
        .map(|(_, path)| path.trim_start_matches('/').to_string())
        .collect();
    read_as_zeros.sort();
    assert_eq!(read_as_zeros, fx.v1_misreads, "{r:#}");
    let holes: Vec<&str> = p
        .iter()
        .filter(|(k, _)| k == "v1_tail_hole")
        .map(|(_, path)| path.as_str())
        .collect();
    assert_eq!(
        holes.len(),
        3,
        "the three real holes are reported as such: {r:#}"
    );
    assert!(holes.iter().all(|h| h.starts_with("/holes/")), "{holes:?}");
    assert!(p.iter().any(|(k, _)| k == "format_v1"), "{r:#}");

    // The upgrade.
    crate::backup::set_times(&env.cipher, ROOT_MTIME);
    let out = env.cmkfs(&[
        OsStr::new("upgrade"),
        env.cipher.as_os_str(),
        OsStr::new("--json"),
    ]);
    out.assert_ok();
    assert_root_times_kept(&env.cipher, "cmkfs upgrade");
    let rep = json(&out);
    assert_eq!(rep["from_version"], 1);
    assert_eq!(rep["to_version"], 2);
    assert_eq!(rep["skipped"].as_array().unwrap().len(), 0, "{rep:#}");
    let mut recovered = Vec::new();
    for z in rep["zero_tails"].as_array().unwrap() {
        let path = z["plaintext"].as_str().unwrap().trim_start_matches('/');
        match z["decision"].as_str().unwrap() {
            "data" => recovered.push(path.to_string()),
            "hole" => assert!(path.starts_with("holes/"), "{z}"),
            d => panic!("decision {d}"),
        }
    }
    recovered.sort();
    assert_eq!(recovered, fx.v1_misreads, "{rep:#}");
    // Each inode once: the two names of links/a count as one file.
    let files = rep["files"].as_u64().unwrap();
    assert_eq!(
        files,
        fx.files.len() as u64 - 1,
        "one file per inode: {rep:#}"
    );
    assert_eq!(env.info(&env.cipher)["format_version"], 2);

    // Nothing left to do the second time; fsck finds nothing at all.
    let again = env.cmkfs(&[OsStr::new("upgrade"), env.cipher.as_os_str()]);
    again.assert_ok();
    assert!(again.stdout.contains("already"), "{again}");
    let (code, r) = fsck(&env);
    assert_eq!(code, 0, "{r:#}");
    assert!(problems(&r).is_empty(), "{r:#}");

    // Through a mount: every file byte-identical (the recovered tails included), and the
    // rest of the tree as it was.
    let m = env.mount(&env.cipher, &env.mnt);
    check_files_through(&m, &fx);
    let man = &fx.manifest;
    for (link, target) in man["symlinks"].as_object().unwrap() {
        assert_eq!(
            fs::read_link(m.path(link)).unwrap(),
            Path::new(target.as_str().unwrap())
        );
    }
    for group in man["hard_links"].as_array().unwrap() {
        let inos: Vec<u64> = group
            .as_array()
            .unwrap()
            .iter()
            .map(|p| fs::metadata(m.path(p.as_str().unwrap())).unwrap().ino())
            .collect();
        assert!(inos.windows(2).all(|w| w[0] == w[1]), "{group}");
        let nlink = fs::metadata(m.path(group[0].as_str().unwrap()))
            .unwrap()
            .nlink();
        assert_eq!(nlink, inos.len() as u64);
    }
    for (file, xs) in man["xattrs"].as_object().unwrap() {
        for (name, value) in xs.as_object().unwrap() {
            let c =
                std::ffi::CString::new(m.path(file).into_os_string().into_encoded_bytes()).unwrap();
            let n = std::ffi::CString::new(name.as_str()).unwrap();
            let mut buf = [0u8; 256];
            // SAFETY: valid C strings and buffer.
            let len =
                unsafe { libc::getxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), 256) };
            assert!(len >= 0, "getxattr {file} {name}");
            assert_eq!(&buf[..len as usize], value.as_str().unwrap().as_bytes());
        }
    }
    for (file, mode) in man["modes"].as_object().unwrap() {
        let got = fs::metadata(m.path(file)).unwrap().permissions().mode() & 0o7777;
        assert_eq!(format!("{got:o}"), mode.as_str().unwrap(), "{file}");
    }
    for d in man["directories"].as_array().unwrap() {
        assert!(m.path(d.as_str().unwrap()).is_dir(), "{d}");
    }
    // The recovered files go on working: an append keeps the recovered tail.
    let one = m.path("zero-tails/one-byte");
    let before = read(&one);
    fs::OpenOptions::new()
        .append(true)
        .open(&one)
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"+more"))
        .unwrap();
    assert_eq!(read(&one), [&before[..], b"+more"].concat());
    m.unmount();
}

#[test]
fn mount_of_a_v1_volume_converts_it_first_and_says_so() {
    let env = Env::new();
    let fx = v1_fixture::copy(&env.root);
    let out = env.cmkfs(&[
        OsStr::new("mount"),
        env.cipher.as_os_str(),
        env.mnt.as_os_str(),
    ]);
    out.assert_ok();
    assert!(wait_until(MOUNT_TIMEOUT, || is_mounted(&env.mnt)), "{out}");
    let m = Mount::adopt(&env, &env.cipher, &env.mnt);
    assert!(
        out.stderr.contains(
            "is on-disk format v1: converting it in place to format v2 before mounting (one time"
        ),
        "{out}"
    );
    assert!(out.stderr.contains("is now on-disk format v2"), "{out}");
    assert!(
        out.stderr
            .contains("/zero-tails/one-byte: last 1 bytes (offset 0) recovered"),
        "{out}"
    );
    // The mount's log has the same line, and the per-file decisions.
    let logs: String = fs::read_dir(env.home.join("run"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
        .map(|e| fs::read_to_string(e.path()).unwrap())
        .collect();
    assert!(
        logs.contains("converting it in place to format v2"),
        "{logs}"
    );
    assert!(
        logs.contains("format v1 read this file's last bytes as zeros"),
        "{logs}"
    );
    check_files_through(&m, &fx);
    assert_eq!(env.info(&env.cipher)["format_version"], 2);
    m.unmount();
    // The next mount has nothing to say.
    let out = env.cmkfs(&[
        OsStr::new("mount"),
        env.cipher.as_os_str(),
        env.mnt.as_os_str(),
    ]);
    out.assert_ok();
    let m = Mount::adopt(&env, &env.cipher, &env.mnt);
    assert!(!out.stderr.contains("format"), "{out}");
    m.unmount();
}

// ---------------------------------------------------------------------------------------------
// In-process helpers: keys, plaintext reads through the library, v1 files made by hand
// ---------------------------------------------------------------------------------------------

fn fixture_keys(fx: &V1Fixture) -> (VolumeHeader, Dek, VolumeKeys) {
    let header = VolumeHeader::read(&fx.cipher).unwrap();
    let vault = cmkfs::vault::open("local:", &Home::at(&fx.home)).unwrap();
    let (dek, keys) =
        upgrade::unlock(&Home::at(&fx.home), &fx.cipher, vault.as_ref(), &header).unwrap();
    (header, dek, keys)
}

/// The backing path of plaintext `rel` (following directory ids and encrypted names).
fn backing_path(root: &Path, keys: &VolumeKeys, rel: &str) -> PathBuf {
    let mut dir = root.to_path_buf();
    for comp in rel.split('/') {
        let id: DirId = fs::read(dir.join(DIRID_FILE)).unwrap().try_into().unwrap();
        let b = names::encrypt(&keys.names, &id, OsStr::new(comp)).unwrap();
        dir = dir.join(b.entry());
    }
    dir
}

/// Reads a backing file as format v2, through the library's data path.
fn read_v2(path: &Path, keys: &VolumeKeys, unit: u64) -> Result<Vec<u8>, String> {
    let f = File::open(path).map_err(|e| e.to_string())?;
    let engine = SectorEngine::new(1).unwrap();
    let cx = Ctx {
        keys,
        engine: &engine,
        sector: unit,
        layout: cmkfs::volume::layout::Layout::V2,
    };
    content::read(&f, &FileState::default(), &cx, 0, usize::MAX / 2).map_err(|e| e.to_string())
}

/// Every manifest file of a converted fixture copy, read in-process.
fn check_files_in_process(root: &Path, keys: &VolumeKeys, fx: &V1Fixture) -> Result<(), String> {
    for (rel, truth) in &fx.files {
        let got = read_v2(&backing_path(root, keys, rel), keys, 4096)
            .map_err(|e| format!("{rel}: {e}"))?;
        if got.len() as u64 != truth.size || sha(&got) != truth.sha256 {
            return Err(format!("{rel}: contents differ ({} bytes)", got.len()));
        }
    }
    Ok(())
}

/// The v1 encryption of `plain` (units of 4096 at their exact length, inner layer first).
fn v1_ciphertext(keys: &VolumeKeys, file_id: [u8; 16], plain: &[u8]) -> Vec<u8> {
    let base = u128::from_le_bytes(file_id);
    let mut out = Vec::with_capacity(plain.len());
    for (i, chunk) in plain.chunks(4096).enumerate() {
        let mut u = chunk.to_vec();
        let t = base.wrapping_add(i as u128);
        if let Some(inner) = &keys.inner {
            inner.encrypt_unit(t, &mut u).unwrap();
        }
        keys.xts.encrypt_unit(t, &mut u).unwrap();
        out.extend(u);
    }
    out
}

/// Writes plaintext `name` in backing directory `dir` as a v1 file of `plain`; returns its
/// path. `make_zero_tail` replaces the tail by the bytes v1 stores as all zeros (the bug).
fn write_v1_file(
    dir: &Path,
    keys: &VolumeKeys,
    name: &str,
    plain: &mut [u8],
    make_zero_tail: bool,
) -> PathBuf {
    let id: DirId = fs::read(dir.join(DIRID_FILE)).unwrap().try_into().unwrap();
    let path = dir.join(
        names::encrypt(&keys.names, &id, OsStr::new(name))
            .unwrap()
            .entry(),
    );
    let mut file_id = [0u8; 16];
    getrandom::getrandom(&mut file_id).unwrap();
    if make_zero_tail {
        let r = plain.len() % 4096;
        assert!((1..16).contains(&r));
        let t = u128::from_le_bytes(file_id).wrapping_add((plain.len() / 4096) as u128);
        // The tail whose stored bytes are zero: the outer keystream, inner layer undone.
        let mut k = vec![0u8; r];
        keys.xts.encrypt_unit(t, &mut k).unwrap();
        if let Some(inner) = &keys.inner {
            inner.decrypt_unit(t, &mut k).unwrap();
        }
        let at = plain.len() - r;
        plain[at..].copy_from_slice(&k);
    }
    let h = layout::FileHeader {
        version: layout::FILE_VERSION_V1,
        key_gen: 0,
        file_id,
        reencrypted: 0,
    };
    let mut bytes = h.encode().to_vec();
    bytes.extend(v1_ciphertext(keys, file_id, plain));
    if make_zero_tail {
        assert!(bytes[bytes.len() - plain.len() % 4096..]
            .iter()
            .all(|b| *b == 0));
    }
    fs::write(&path, bytes).unwrap();
    path
}

/// Makes plaintext directory `name` in backing directory `dir`; returns its backing path.
fn mkdir_backing(dir: &Path, keys: &VolumeKeys, name: &str) -> PathBuf {
    let id: DirId = fs::read(dir.join(DIRID_FILE)).unwrap().try_into().unwrap();
    let path = dir.join(
        names::encrypt(&keys.names, &id, OsStr::new(name))
            .unwrap()
            .entry(),
    );
    fs::create_dir(&path).unwrap();
    let mut new_id = [0u8; 16];
    getrandom::getrandom(&mut new_id).unwrap();
    fs::write(path.join(DIRID_FILE), new_id).unwrap();
    path
}

/// Runs the library upgrade with `fault` (None: to completion).
fn run_upgrade(
    root: &Path,
    dek: &Dek,
    keys: &VolumeKeys,
    fault: Option<upgrade::FaultHook<'_>>,
) -> Result<upgrade::Report, UpgradeError> {
    let lock = VolumeLock::exclusive(root).unwrap();
    let mut hooks = Hooks {
        progress: None,
        fault,
    };
    upgrade::run(root, &lock, dek, keys, &mut hooks)
}

/// What a completed upgrade must leave: a v2 header, no journal, no journal temp.
fn assert_finished(root: &Path) {
    assert_eq!(VolumeHeader::read(root).unwrap().format_version, 2);
    for e in fs::read_dir(root).unwrap().flatten() {
        let n = e.file_name();
        assert!(
            !n.to_string_lossy().contains(JOURNAL_FILE),
            "{n:?} left behind"
        );
    }
}

/// The backing root's mtime before an upgrade (its atime: [`crate::backup::set_times`]'s).
const ROOT_MTIME: (i64, i64) = (1_500_000_000, 7);

/// The upgrade's journal and header writes in the backing root (whose times are the mount
/// root's) leave the root's atime and mtime as they were, after a crash and resume too.
#[track_caller]
fn assert_root_times_kept(root: &Path, what: &str) {
    let m = fs::metadata(root).unwrap();
    assert_eq!(
        [(m.atime(), m.atime_nsec()), (m.mtime(), m.mtime_nsec())],
        [(1_600_000_000, 5), ROOT_MTIME],
        "{what}: the backing root's (atime, mtime)"
    );
}

#[test]
fn a_crash_after_any_step_of_the_upgrade_is_resumed_without_losing_a_byte() {
    let env = Env::new();
    let count_dir = env.dir("count");
    let fx = v1_fixture::copy(&count_dir);
    let (_, dek, keys) = fixture_keys(&fx);
    // A full run, counting the steps.
    let mut steps: Vec<Step> = Vec::new();
    let mut count = |s: Step, _: &Path| -> io::Result<()> {
        steps.push(s);
        Ok(())
    };
    crate::backup::set_times(&fx.cipher, ROOT_MTIME);
    run_upgrade(&fx.cipher, &dek, &keys, Some(&mut count)).unwrap();
    assert_root_times_kept(&fx.cipher, "a full run");
    check_files_in_process(&fx.cipher, &keys, &fx).unwrap();
    let total = steps.len();
    for s in [
        Step::HeaderOnly,
        Step::JournalTempSynced,
        Step::JournalDurable,
        Step::TailPartial,
        Step::TailWritten,
        Step::FileHeaderWritten,
        Step::BatchSynced,
        Step::JournalRemoved,
        Step::VolumeHeaderWritten,
    ] {
        assert!(steps.contains(&s), "{s:?} never happened: {steps:?}");
    }
    let seed = seed("upgrade crash points");
    let mut rng = StdRng::seed_from_u64(seed);
    // Which steps to crash after. Every step that is not one of a file's three conversion
    // steps (journal writes, batch syncs, header-only files, the end), and the conversion
    // steps of the first two files, of the last file of the first batch, of the first of the
    // next, and of the last file; plus a seeded sample of the others (each CI run covers
    // different ones). `CMKFS_UPGRADE_ALL_STEPS=1` crashes after every single step.
    let per_file = |s: &Step| {
        matches!(
            s,
            Step::TailPartial | Step::TailWritten | Step::FileHeaderWritten
        )
    };
    let mut file_index = Vec::with_capacity(total);
    let mut k = 0usize;
    for s in &steps {
        file_index.push(k);
        if *s == Step::FileHeaderWritten {
            k += 1;
        }
    }
    let files = k;
    let batch = upgrade::BATCH_FILES;
    let all = std::env::var_os("CMKFS_UPGRADE_ALL_STEPS").is_some();
    let chosen: Vec<usize> = (0..total)
        .filter(|&i| {
            all || !per_file(&steps[i])
                || [0, 1, batch - 1, batch, files - 1].contains(&file_index[i])
                || rng.gen_ratio(1, 12)
        })
        .collect();
    eprintln!(
        "{} of {total} crash points ({files} converted files)",
        chosen.len()
    );
    let started = Instant::now();
    for crash_at in chosen {
        let step = &steps[crash_at];
        let dir = env.dir(&format!("crash{crash_at}"));
        let fx = v1_fixture::copy(&dir);
        crate::backup::set_times(&fx.cipher, ROOT_MTIME);
        let mut n = 0usize;
        let mut crash = |s: Step, _: &Path| -> io::Result<()> {
            n += 1;
            if n > crash_at {
                return Err(io::Error::other(format!("crash after {s:?}")));
            }
            Ok(())
        };
        let r = run_upgrade(&fx.cipher, &dek, &keys, Some(&mut crash));
        assert!(
            matches!(r, Err(UpgradeError::Interrupted(_))),
            "crash point {crash_at}: {r:?}"
        );
        // Sometimes the resume crashes too (after one of its own steps), then resumes again.
        if rng.gen_ratio(1, 4) {
            let again_at = rng.gen_range(0..8usize);
            let mut m = 0usize;
            let mut crash2 = |_: Step, _: &Path| -> io::Result<()> {
                m += 1;
                if m > again_at {
                    return Err(io::Error::other("second crash"));
                }
                Ok(())
            };
            let _ = run_upgrade(&fx.cipher, &dek, &keys, Some(&mut crash2));
        }
        let rep = run_upgrade(&fx.cipher, &dek, &keys, None).unwrap_or_else(|e| {
            panic!("seed {seed}, crash point {crash_at} ({step:?}): resume failed: {e}")
        });
        assert_root_times_kept(
            &fx.cipher,
            &format!("seed {seed}, crash point {crash_at} ({step:?})"),
        );
        assert_finished(&fx.cipher);
        check_files_in_process(&fx.cipher, &keys, &fx).unwrap_or_else(|e| {
            panic!(
                "seed {seed}, crash after step {crash_at} ({step:?}), resumed {}: {e}",
                rep.resumed
            )
        });
        fs::remove_dir_all(&dir).unwrap();
    }
    eprintln!(
        "resumed every one in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// A bigger v1 volume: the fixture plus `n` files made in-process (odd sizes, some zero
/// tails); returns the expected plaintext of the extra files by backing path.
fn bulk_volume(fx: &V1Fixture, keys: &VolumeKeys, n: usize, seed: u64) -> Vec<(PathBuf, Vec<u8>)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let bulk = mkdir_backing(&fx.cipher, keys, "bulk");
    (0..n)
        .map(|i| {
            let size = match i % 4 {
                0 => rng.gen_range(1..16),
                1 => rng.gen_range(1..3) * 4096 + rng.gen_range(1..16),
                _ => rng.gen_range(1..9000),
            };
            let mut plain: Vec<u8> = (0..size).map(|_| rng.gen()).collect();
            let zero = size % 4096 <= 2 && size % 4096 > 0 && i % 3 == 0;
            let p = write_v1_file(&bulk, keys, &format!("f{i}"), &mut plain, zero);
            (p, plain)
        })
        .collect()
}

#[test]
fn sigkill_of_cmkfs_upgrade_at_random_moments_then_resume_keeps_every_file() {
    let env = Env::new();
    let seed = seed("upgrade sigkill");
    let mut rng = StdRng::seed_from_u64(seed);
    let upgrade = |fx: &V1Fixture| {
        let mut c = Command::new(bin());
        c.args([OsStr::new("upgrade"), fx.cipher.as_os_str()])
            .env("CMKFS_HOME", &fx.home)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        c
    };
    // Kills land at random points of a whole run: how long one takes here.
    let timing = env.dir("timing");
    let fx = v1_fixture::copy(&timing);
    let (_, _, keys) = fixture_keys(&fx);
    bulk_volume(&fx, &keys, 800, seed);
    let t0 = Instant::now();
    assert!(upgrade(&fx).status().unwrap().success());
    let full = t0.elapsed();
    let mut kills = 0;
    for round in 0..5 {
        let dir = env.dir(&format!("round{round}"));
        let fx = v1_fixture::copy(&dir);
        let extra = bulk_volume(&fx, &keys, 800, seed ^ round);
        // One kill during the run, one during the resume, then a run to the end.
        for _ in 0..2 {
            let mut child = upgrade(&fx).spawn().unwrap();
            let delay = full.mul_f64(rng.gen_range(0.05..0.7));
            let deadline = Instant::now() + delay;
            while Instant::now() < deadline && child.try_wait().unwrap().is_none() {
                std::thread::sleep(Duration::from_millis(1));
            }
            if child.try_wait().unwrap().is_none() {
                // SAFETY: kill(2) of our own child.
                unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
                kills += 1;
            }
            let st = child.wait().unwrap();
            eprintln!("round {round}: delay {delay:?}: {st}");
        }
        assert!(upgrade(&fx).status().unwrap().success(), "seed {seed}");
        assert_finished(&fx.cipher);
        check_files_in_process(&fx.cipher, &keys, &fx)
            .unwrap_or_else(|e| panic!("seed {seed} round {round}: {e}"));
        for (p, plain) in &extra {
            let got = read_v2(p, &keys, 4096)
                .unwrap_or_else(|e| panic!("seed {seed} round {round}: {e}"));
            assert!(
                got == *plain,
                "seed {seed} round {round}: {} differs",
                p.display()
            );
        }
    }
    eprintln!("a full upgrade takes {full:?} here; {kills} of 10 kills landed mid-run");
    assert!(kills > 0, "no kill landed before the upgrade finished");
}

#[test]
fn double_encrypted_v1_tails_decode_through_both_layers() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("v");
    fs::create_dir(&root).unwrap();
    fs::write(root.join(DIRID_FILE), [3u8; 16]).unwrap();
    let (outer, inner) = (Dek::generate().unwrap(), Dek::generate().unwrap());
    let wrapped = |dek: &Dek, key: &str| cmkfs::vault::Wrapped {
        kid: format!("local:/keys/{key}/0123456789abcdef0123456789abcdef")
            .parse()
            .unwrap(),
        alg: cmkfs::vault::WrapAlg::RsaOaep256,
        value: dek.as_bytes()[..8].to_vec(),
    };
    let header = VolumeHeader::new_double(
        &outer,
        "ab".repeat(16),
        4096,
        &wrapped(&outer, "test"),
        1,
        PlatformEnvelope::new(&inner, &wrapped(&inner, "cmkfs-platform")),
        cmkfs::volume::layout::Layout::V2,
    )
    // As the v1 release wrote it: format 1, MAC version 1.
    .with_format_version(1, &outer)
    .with_mac_v1_for_tests(&outer);
    header.write(&root).unwrap();
    let keys = VolumeKeys::from_deks(&outer, Some(&inner), 4096).unwrap();
    let mut files = Vec::new();
    for (i, size) in [1usize, 2, 3, 15, 17, 4097, 4098, 8200]
        .into_iter()
        .enumerate()
    {
        for zero in [false, true] {
            if zero && size % 4096 > 2 {
                continue;
            }
            let mut plain: Vec<u8> = (0..size).map(|j| (i * 31 + j) as u8).collect();
            let p = write_v1_file(&root, &keys, &format!("f{i}-{zero}"), &mut plain, zero);
            files.push((p, plain));
        }
    }
    // A tail whose inner layer is all zeros (its plaintext is the inner keystream): v1 read
    // it as zeros although its stored bytes are not.
    let mut file_id = [9u8; 16];
    file_id[0] = 1;
    let t = u128::from_le_bytes(file_id);
    let mut ks = vec![0u8; 5];
    keys.inner
        .as_ref()
        .unwrap()
        .encrypt_unit(t, &mut ks)
        .unwrap();
    let id: DirId = [3u8; 16];
    let inner_zero = root.join(
        names::encrypt(&keys.names, &id, OsStr::new("inner-zero"))
            .unwrap()
            .entry(),
    );
    let mut bytes = layout::FileHeader {
        version: layout::FILE_VERSION_V1,
        key_gen: 0,
        file_id,
        reencrypted: 0,
    }
    .encode()
    .to_vec();
    bytes.extend(v1_ciphertext(&keys, file_id, &ks));
    fs::write(&inner_zero, &bytes).unwrap();
    files.push((inner_zero, ks));

    let rep = run_upgrade(&root, &outer, &keys, None).unwrap();
    assert_finished(&root);
    let header = VolumeHeader::read(&root).unwrap();
    header.verify(&outer).unwrap();
    assert!(header.platform.is_some());
    assert_eq!(
        (header.format_version, header.mac_version),
        (2, cmkfs::volume::header::MAC_VERSION)
    );
    for (p, plain) in &files {
        assert_eq!(&read_v2(p, &keys, 4096).unwrap(), plain, "{}", p.display());
    }
    let data: Vec<_> = rep
        .zero_tails
        .iter()
        .filter(|z| z.decision == TailDecision::Data)
        .collect();
    // Four made zero tails and the inner-zero one (a 1- or 2-byte tail of the others comes out
    // all zero by chance once in 256: it is recovered as data too).
    assert!(data.len() >= 5, "{rep:#?}");
    assert!(
        data.iter().any(|z| z.reason.contains("inner layer")),
        "{rep:#?}"
    );
}

#[test]
fn fsck_on_v2_reports_leftover_v1_files_and_invalid_lengths_and_the_mount_refuses_them() {
    let env = Env::new();
    let fx = v1_fixture::copy(&env.root);
    let (_, _dek, keys) = fixture_keys(&fx);
    let old = backing_path(&env.cipher, &keys, "sizes/s00005");
    let v1_copy = read(&old);
    env.cmkfs(&[OsStr::new("upgrade"), env.cipher.as_os_str()])
        .assert_ok();
    // A v1 file restored from an old copy, and a v2 file with a length no v2 file has.
    fs::write(&old, &v1_copy).unwrap();
    let bad_len = backing_path(&env.cipher, &keys, "sizes/s00016");
    File::options()
        .write(true)
        .open(&bad_len)
        .unwrap()
        .set_len(32 + 7)
        .unwrap();
    let (code, r) = fsck(&env);
    assert_eq!(code, 2, "{r:#}");
    let p = problems(&r);
    assert!(
        p.contains(&("file_format_v1".into(), "/sizes/s00005".into())),
        "{r:#}"
    );
    assert!(
        p.contains(&("file_length_invalid".into(), "/sizes/s00016".into())),
        "{r:#}"
    );
    // The mount refuses to read either (EIO), and says why in its log.
    let m = env.mount_foreground(&env.cipher, &env.mnt);
    for f in ["sizes/s00005", "sizes/s00016"] {
        let e = fs::read(m.path(f)).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "{f}");
    }
    assert!(
        m.daemon_log().contains("cmkfs upgrade"),
        "{}",
        m.daemon_log()
    );
    m.unmount();
    // `cmkfs upgrade` converts the leftover v1 file.
    let out = env.cmkfs(&[
        OsStr::new("upgrade"),
        env.cipher.as_os_str(),
        OsStr::new("--json"),
    ]);
    out.assert_ok();
    assert_eq!(json(&out)["converted"], 1, "{out}");
    assert_eq!(json(&out)["header_only"], 0, "{out}");
    let got = read_v2(&old, &keys, 4096).unwrap();
    assert_eq!(sha(&got), fx.files["sizes/s00005"].sha256);
}

#[test]
fn upgrade_refuses_a_mounted_volume_a_non_volume_and_a_damaged_journal() {
    let env = Env::new();
    let _fx = v1_fixture::copy(&env.root);
    env.cmkfs(&[OsStr::new("upgrade"), env.cipher.as_os_str()])
        .assert_ok();
    let m = env.mount(&env.cipher, &env.mnt);
    let out = env.cmkfs(&[OsStr::new("upgrade"), env.cipher.as_os_str()]);
    out.assert_clear_error();
    assert!(out.stderr.contains("mounted"), "{out}");
    // The lock alone refuses too (a mount that left no run record).
    assert!(VolumeLock::exclusive(&env.cipher).is_err());
    m.unmount();
    let out = env.cmkfs(&[OsStr::new("upgrade"), env.root.join("home").as_os_str()]);
    out.assert_clear_error();
    assert!(out.stderr.contains("not a cmkfs volume"), "{out}");
    // A damaged journal: refused, and nothing changes.
    fs::write(env.cipher.join(JOURNAL_FILE), b"{\"format\":\"x\"}\n00\n").unwrap();
    let before = snapshot(&env.cipher);
    let out = env.cmkfs(&[OsStr::new("upgrade"), env.cipher.as_os_str()]);
    out.assert_clear_error();
    assert!(out.stderr.contains("journal"), "{out}");
    assert_same_snapshot("damaged journal", &before, &snapshot(&env.cipher));
    let out = env.try_mount(&env.cipher, &env.mnt);
    out.assert_clear_error();
    let (code, r) = fsck(&env);
    assert_eq!(code, 2);
    assert!(
        problems(&r)
            .iter()
            .any(|(k, _)| k == "upgrade_journal_unusable"),
        "{r:#}"
    );
    // `fsck --repair` sets the journal aside (kept in the quarantine), and the volume mounts.
    let out = env.cmkfs(&[
        OsStr::new("fsck"),
        env.cipher.as_os_str(),
        OsStr::new("--repair"),
    ]);
    assert!(out.status.code().is_some_and(|c| c <= 1), "{out}");
    assert!(!env.cipher.join(JOURNAL_FILE).exists());
    let (code, r) = fsck(&env);
    assert_eq!(code, 0, "{r:#}");
    env.mount(&env.cipher, &env.mnt).unmount();
}

#[test]
fn files_whose_size_is_a_multiple_of_16_change_only_their_version_byte() {
    // Files whose size is a multiple of 16 are byte-identical in both formats but for the
    // header version: the upgrade writes two bytes of them and nothing else.
    let env = Env::new();
    let fx = v1_fixture::copy(&env.root);
    let (_, dek, keys) = fixture_keys(&fx);
    let mut before: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for (rel, t) in &fx.files {
        if t.size % 16 == 0 && t.size > 0 {
            before.insert(rel.clone(), read(&backing_path(&env.cipher, &keys, rel)));
        }
    }
    assert!(before.len() >= 5);
    run_upgrade(&env.cipher, &dek, &keys, None).unwrap();
    for (rel, old) in before {
        let new = read(&backing_path(&env.cipher, &keys, &rel));
        assert_eq!(new.len(), old.len(), "{rel}");
        let diff: Vec<usize> = (0..new.len()).filter(|&i| new[i] != old[i]).collect();
        assert_eq!(diff, vec![4], "{rel}: only the version byte changes");
    }
}

/// `cmkfs upgrade` used to walk the backing tree, then open each file by its full path: a
/// directory swapped for a symlink in between led it into the symlink's target (here a
/// writer's copy of the directory outside the volume, which it converted). Files are now
/// reached one name at a time from the root's descriptor, following no symlink.
#[test]
fn a_directory_swapped_for_a_symlink_mid_upgrade_leads_it_nowhere() {
    let env = Env::new();
    let fx = v1_fixture::copy(&env.root);
    let (_, dek, keys) = fixture_keys(&fx);
    let root = fx.cipher.clone();
    let sub = mkdir_backing(&root, &keys, "swapped");
    // 5003 bytes: a short last unit, converted under the journal.
    let mut plain = vec![7u8; 5003];
    write_v1_file(&sub, &keys, "f", &mut plain, false);
    // A writer's copy of that directory outside the volume: valid v1 files of this volume.
    let outside = env.dir("outside");
    let st = Command::new("cp")
        .arg("-a")
        .arg(&sub)
        .arg(outside.join("copy"))
        .status()
        .unwrap();
    assert!(st.success());
    let before = snapshot(&outside);

    // Once the walk has found every file: the directory becomes a symlink to the copy.
    let moved = env.root.join("moved-away");
    let mut swapped = false;
    let mut swap = |p: &upgrade::Progress| {
        if !swapped && p.done == 0 {
            fs::rename(&sub, &moved).unwrap();
            std::os::unix::fs::symlink(outside.join("copy"), &sub).unwrap();
            swapped = true;
        }
    };
    let lock = VolumeLock::exclusive(&root).unwrap();
    let r = upgrade::run(
        &root,
        &lock,
        &dek,
        &keys,
        &mut Hooks {
            progress: Some(&mut swap),
            fault: None,
        },
    );
    drop(lock);
    assert!(swapped);
    let e = r.expect_err("a directory that became a symlink stops the upgrade");
    println!("upgrade over the swapped directory: {e}");
    assert_same_snapshot("outside the volume", &before, &snapshot(&outside));

    // Put back, the upgrade completes and every file reads as it was.
    fs::remove_file(&sub).unwrap();
    fs::rename(&moved, &sub).unwrap();
    run_upgrade(&root, &dek, &keys, None).unwrap();
    assert_finished(&root);
    check_files_in_process(&root, &keys, &fx).unwrap();
    let f = backing_path(&root, &keys, "swapped/f");
    assert_eq!(read_v2(&f, &keys, 4096).unwrap(), plain);
}
