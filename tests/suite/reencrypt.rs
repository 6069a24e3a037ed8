//! `cmkfs volume reencrypt` (issue 13): a volume re-encrypted under a new DEK keeps every
//! byte, name, symlink target, extended attribute and link; crashes at any step and SIGKILLs
//! at random moments are resumed; a mount of a half re-encrypted volume reads correctly; at
//! the end the old DEK is gone from the header and no ciphertext block of the old volume is
//! left.

use crate::common;

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, MetadataExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cmkfs::home::Home;
use cmkfs::keyring::KeyringConfig;
use cmkfs::volume::header::VolumeHeader;
use cmkfs::volume::reencrypt::{Hooks, ReencryptError, Session, Step};
use cmkfs::volume::{Dir, Target, Volume};
use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};

/// Fills a mounted volume with every kind of thing a re-encryption must carry over.
pub fn populate(root: &Path, rng: &mut StdRng, files: usize) {
    let dirs = [
        root.to_path_buf(),
        root.join("a"),
        root.join("a/b"),
        root.join("a/b/c"),
        root.join("d".repeat(200)),
    ];
    for d in &dirs[1..] {
        fs::create_dir_all(d).unwrap();
    }
    for i in 0..files {
        let dir = &dirs[i % dirs.len()];
        let size = match i % 7 {
            0 => rng.gen_range(0..=8200),
            1 => 4096 * rng.gen_range(1..4) + rng.gen_range(1..16),
            2 => rng.gen_range(1..16),
            3 => rng.gen_range(8200..70_000),
            _ => rng.gen_range(0..5000),
        };
        let name = if i % 11 == 0 {
            format!("{}{i}", "long-name-".repeat(20))
        } else {
            format!("f{i}")
        };
        fs::write(dir.join(&name), random_bytes(rng, size)).unwrap();
    }
    // Large enough to span batches of the test's batch size.
    fs::write(root.join("big"), random_bytes(rng, 700_000)).unwrap();
    // Sparse: holes stay holes.
    let f = fs::File::create(root.join("sparse")).unwrap();
    f.set_len(1 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"tail", (1 << 20) - 4).unwrap();
    drop(f);
    symlink("a/b/f2", root.join("short-link")).unwrap();
    symlink("t".repeat(3500), root.join("long-link")).unwrap();
    fs::hard_link(root.join("a/f1"), root.join("hard-link-of-f1")).unwrap();
    for (p, n, v) in [
        ("a/f1", "user.note", b"hello".to_vec()),
        ("a", "user.dir-attr", vec![7u8; 300]),
        (
            "a/b/c/f3",
            &*format!("user.{}", "x".repeat(200)),
            b"hashed name".to_vec(),
        ),
    ] {
        xattr_set(&root.join(p), n, &v);
    }
    std::process::Command::new("mkfifo")
        .arg(root.join("a/fifo"))
        .status()
        .unwrap();
}

fn xattr_set(path: &Path, name: &str, value: &[u8]) {
    let p = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    // SAFETY: valid strings and buffer.
    let r = unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(r, 0, "setxattr {name} on {}", path.display());
}

/// The plaintext view of a mounted tree: path → what it is (content hash, target, xattrs).
pub fn mount_view(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let md = fs::symlink_metadata(&p).unwrap();
            let ft = md.file_type();
            let desc = if ft.is_dir() {
                stack.push(p.clone());
                format!("dir {:o}", md.mode())
            } else if ft.is_symlink() {
                format!("link -> {}", fs::read_link(&p).unwrap().display())
            } else if ft.is_file() {
                let data = fs::read(&p).unwrap();
                format!(
                    "file {:o} {} {}",
                    md.mode(),
                    data.len(),
                    hex::encode(Sha256::digest(&data))
                )
            } else {
                format!("other {:o}", md.mode())
            };
            let mut x = xattrs(&p);
            x.sort();
            out.insert(rel, format!("{desc} {x:?}"));
        }
    }
    out
}

fn xattrs(p: &Path) -> Vec<String> {
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    let mut buf = vec![0u8; 65536];
    // SAFETY: valid path and buffer.
    let n = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n <= 0 {
        return Vec::new();
    }
    buf.truncate(n as usize);
    let mut out = Vec::new();
    for name in buf.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let nc = std::ffi::CString::new(name).unwrap();
        let mut v = vec![0u8; 65536];
        // SAFETY: as above.
        let m = unsafe { libc::lgetxattr(c.as_ptr(), nc.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        let v = if m >= 0 { &v[..m as usize] } else { &[][..] };
        out.push(format!(
            "{}={}",
            String::from_utf8_lossy(name),
            hex::encode(Sha256::digest(v))
        ));
    }
    out
}

/// The same view read in-process through the library (what a crash leaves, before any
/// mount touches it).
fn lib_view(vol: &Volume) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack: Vec<(Arc<Dir>, String)> = vec![(vol.root_dir().clone(), String::new())];
    while let Some((dir, path)) = stack.pop() {
        for l in vol.list(&dir).unwrap() {
            let rel = if path.is_empty() {
                l.name.to_string_lossy().into_owned()
            } else {
                format!("{path}/{}", l.name.to_string_lossy())
            };
            let attr = vol
                .attr_at(&dir, &l.bname)
                .unwrap_or_else(|e| panic!("{rel}: corrupt entry: {e}"));
            let desc = match l.kind {
                libc::S_IFDIR => {
                    let d = vol.open_dir(&dir, &l.bname, Some(l.ino)).unwrap();
                    stack.push((Arc::new(d), rel.clone()));
                    format!("dir {:o}", attr.mode)
                }
                libc::S_IFLNK => format!(
                    "link -> {}",
                    vol.readlink(&dir, &l.bname)
                        .unwrap_or_else(|e| panic!("{rel}: {e}"))
                        .to_string_lossy()
                ),
                libc::S_IFREG => {
                    let of = vol.open_file(&dir, &l.bname, false, None).unwrap();
                    let data = vol
                        .read(&of, 0, usize::MAX / 4)
                        .unwrap_or_else(|e| panic!("{rel}: {e}"));
                    format!(
                        "file {:o} {} {}",
                        attr.mode,
                        data.len(),
                        hex::encode(Sha256::digest(&data[..]))
                    )
                }
                _ => format!("other {:o}", attr.mode),
            };
            let t = Target::At(&dir, &l.bname);
            let mut x: Vec<String> = vol
                .list_xattr(t)
                .unwrap_or_default()
                .into_iter()
                .filter(|n| !n.as_bytes().starts_with(b"system."))
                .map(|n| {
                    let v = vol
                        .get_xattr(t, l.kind, &n)
                        .unwrap_or_else(|e| panic!("{rel}: xattr {}: {e}", n.to_string_lossy()));
                    format!(
                        "{}={}",
                        n.to_string_lossy(),
                        hex::encode(Sha256::digest(&v))
                    )
                })
                .collect();
            x.sort();
            out.insert(rel, format!("{desc} {x:?}"));
        }
    }
    out
}

/// Compares two views, showing only what differs.
#[track_caller]
fn assert_views(got: &BTreeMap<String, String>, want: &BTreeMap<String, String>, what: &str) {
    if got == want {
        return;
    }
    let short = |s: &str| s.chars().take(120).collect::<String>();
    let mut diff = Vec::new();
    for (k, v) in want {
        match got.get(k) {
            None => diff.push(format!("missing {}", short(k))),
            Some(g) if g != v => diff.push(format!("{}: {} != {}", short(k), short(g), short(v))),
            _ => {}
        }
    }
    for k in got.keys().filter(|k| !want.contains_key(*k)) {
        diff.push(format!("extra {}", short(k)));
    }
    diff.truncate(20);
    panic!("{what}: views differ:\n  {}", diff.join("\n  "));
}

/// Opens the volume in-process as a fresh process would (after a crash).
pub(crate) fn open(env: &Env) -> (Volume, cmkfs::unlock::HeaderHandle) {
    let home = Home::at(&env.home);
    let header = VolumeHeader::read(&env.cipher).unwrap();
    let vault = cmkfs::vault::open("local:", &home).unwrap();
    let (kr, header, handle) = cmkfs::unlock::unlock_with_handle(
        &home,
        vault,
        &env.cipher,
        &header,
        KeyringConfig::default(),
    )
    .unwrap();
    let vol = Volume::open(&env.cipher, header, Arc::new(kr), 1).unwrap();
    (vol, handle)
}

/// Every 16-byte block of the backing store's files that is not all zero (file headers and
/// metadata files excluded).
fn ciphertext_blocks(cipher: &Path) -> HashSet<[u8; 16]> {
    let mut out = HashSet::new();
    for p in data_files(cipher) {
        let b = fs::read(&p).unwrap();
        let at = data_offset(cipher) as usize;
        if b.len() <= at {
            continue;
        }
        for c in b[at..].chunks_exact(16) {
            if c.iter().any(|x| *x != 0) {
                out.insert(c.try_into().unwrap());
            }
        }
    }
    out
}

fn backing_names(cipher: &Path) -> HashSet<String> {
    walk(cipher)
        .into_iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .filter(|n| !n.contains('.'))
        .collect()
}

fn small_batches() {
    // Files span batches and every batch is a step of its own.
    std::env::set_var("CMKFS_REENCRYPT_BATCH_BYTES", "65536");
}

/// Runs (or resumes) a re-encryption in-process on the volume opened afresh ([`open`]),
/// with `fault` called after each step (an error stops it there, as a crash would);
/// `recover_only`: only what a mount runs before it serves.
pub(crate) fn run_in_process(
    env: &Env,
    recover_only: bool,
    fault: &mut dyn FnMut(Step) -> std::io::Result<()>,
) -> Result<cmkfs::volume::reencrypt::Report, ReencryptError> {
    let (vol, handle) = open(env);
    let home = Home::at(&env.home);
    let access = cmkfs::unlock::ReencryptAccess::new(&home, vol.keyring().vault(), handle).unwrap();
    let session = Session::new(
        &vol,
        &access,
        None,
        Hooks {
            progress: None,
            fault: Some(fault),
        },
    );
    match recover_only {
        true => session.recover(),
        false => session.run(),
    }
}

/// Runs (or resumes) a re-encryption in-process, stopped after `stop_after` fault steps
/// (`None`: to the end). Returns whether it finished and the steps it went through.
fn run_until(env: &Env, stop_after: Option<usize>, recover_only: bool) -> (bool, Vec<Step>) {
    let mut steps = Vec::new();
    let mut fault = |s: Step| {
        steps.push(s);
        if stop_after.is_some_and(|n| steps.len() >= n) {
            return Err(std::io::Error::other("crash"));
        }
        Ok(())
    };
    let done = match run_in_process(env, recover_only, &mut fault) {
        Ok(_) => true,
        Err(ReencryptError::Interrupted(_)) => false,
        Err(e) => panic!("re-encryption failed: {e}"),
    };
    (done, steps)
}

#[test]
fn a_crash_after_any_step_of_the_reencryption_is_resumed_without_losing_a_byte() {
    small_batches();
    let seed = seed("reencrypt crash steps");
    let mut rng = StdRng::seed_from_u64(seed);
    let env = Env::new();
    env.init(&env.cipher).assert_ok();
    let m = env.mount(&env.cipher, &env.mnt);
    populate(&env.mnt, &mut rng, 120);
    let want = mount_view(&env.mnt);
    m.unmount();
    // The backing root's times are the mount root's: no control-file write (journal,
    // header, their removal) may move its mtime, whatever step a crash stops at (F4).
    let root_mtime = || fs::metadata(&env.cipher).unwrap().modified().unwrap();
    fs::File::open(&env.cipher)
        .unwrap()
        .set_modified(std::time::UNIX_EPOCH + Duration::new(1_500_000_000, 5))
        .unwrap();
    let mtime = root_mtime();
    let before = VolumeHeader::read(&env.cipher).unwrap();
    let old_blocks = ciphertext_blocks(&env.cipher);
    let old_names = backing_names(&env.cipher);
    {
        let (vol, _) = open(&env);
        assert_views(&lib_view(&vol), &want, "the library's view before");
    }
    // Two re-encryptions in a row, each crashed at random steps until it finishes; after
    // every crash the volume, opened afresh, shows every byte.
    for generation in 1..=2u32 {
        let mut crashes = 0;
        let mut all = Vec::new();
        loop {
            // As a mount opens the volume: the interrupted step first (crashed too, at times).
            let stop = Some(rng.gen_range(1..=6)).filter(|_| crashes < 40 && rng.gen_bool(0.3));
            let (recovered, steps) = run_until(&env, stop, true);
            all.extend(steps);
            if !recovered {
                crashes += 1;
                continue;
            }
            // A crash in the names phase leaves the root renamed in, until this recovery.
            assert_eq!(
                root_mtime(),
                mtime,
                "seed {seed}: the root's mtime, at {all:?}"
            );
            let (vol, _) = open(&env);
            assert_views(
                &lib_view(&vol),
                &want,
                &format!(
                    "seed {seed}: generation {generation}, after crash {crashes} at {:?}",
                    all.last()
                ),
            );
            drop(vol);
            // A crash after the old DEK left the header (before the journal went) is
            // finished by the recovery alone: a `run` now would start the next generation.
            let h = VolumeHeader::read(&env.cipher).unwrap();
            if h.key_generation == generation
                && h.retiring.is_none()
                && !env.cipher.join("cmkfs.reencrypt.journal").exists()
            {
                assert_eq!(
                    root_mtime(),
                    mtime,
                    "seed {seed}: the root's mtime at the end"
                );
                break;
            }
            let stop = Some(rng.gen_range(1..=6)).filter(|_| crashes < 40);
            let (done, steps) = run_until(&env, stop, false);
            all.extend(steps);
            if done {
                assert_eq!(
                    root_mtime(),
                    mtime,
                    "seed {seed}: the root's mtime at the end"
                );
                break;
            }
            crashes += 1;
        }
        let h = VolumeHeader::read(&env.cipher).unwrap();
        assert_eq!(h.key_generation, generation);
        assert!(h.retiring.is_none(), "the old DEK is still in the header");
        assert!(!env.cipher.join("cmkfs.reencrypt.journal").exists());
        let kinds: HashSet<Step> = all.iter().copied().collect();
        for s in [Step::NameConverted, Step::JournalDurable, Step::BatchSynced] {
            assert!(kinds.contains(&s), "seed {seed}: never went through {s:?}");
        }
        eprintln!(
            "generation {generation}: {crashes} crashes over {} steps",
            all.len()
        );
    }
    let after = VolumeHeader::read(&env.cipher).unwrap();
    assert_ne!(after.dek_fingerprint, before.dek_fingerprint);
    assert_ne!(after.wrapped_dek, before.wrapped_dek);
    // Nothing of the old ciphertext or the old names is left.
    let shared = ciphertext_blocks(&env.cipher)
        .intersection(&old_blocks)
        .count();
    assert_eq!(
        shared, 0,
        "{shared} ciphertext blocks of the old DEK are left"
    );
    let names = backing_names(&env.cipher);
    assert!(
        names.is_disjoint(&old_names),
        "backing names of the old key are left"
    );
    // Through a mount, and fsck finds nothing.
    let m = env.mount(&env.cipher, &env.mnt);
    assert_views(&mount_view(&env.mnt), &want, "through a mount at the end");
    m.unmount();
    let out = env.cmkfs(&["fsck", env.cipher.to_str().unwrap()]);
    assert!(out.ok(), "fsck: {out}");
}

#[test]
fn sigkill_of_the_command_at_random_moments_then_mount_and_resume_keeps_every_file() {
    let seed = seed("reencrypt sigkill");
    let mut rng = StdRng::seed_from_u64(seed);
    let env = Env::new();
    env.init(&env.cipher).assert_ok();
    let m = env.mount(&env.cipher, &env.mnt);
    populate(&env.mnt, &mut rng, 400);
    let want = mount_view(&env.mnt);
    m.unmount();
    // Whatever the kills interrupt, the root (whose times are the mount root's) ends with
    // its mtime (F4).
    let set_root_mtime = || {
        fs::File::open(&env.cipher)
            .unwrap()
            .set_modified(std::time::UNIX_EPOCH + Duration::new(1_500_000_000, 5))
            .unwrap()
    };
    set_root_mtime();
    let cipher = env.cipher.to_str().unwrap().to_string();
    for round in 0..4 {
        let mut cmd = env.command(&["volume", "reencrypt", &cipher]);
        cmd.env("CMKFS_REENCRYPT_BATCH_BYTES", "65536")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let mut child = cmd.spawn().unwrap();
        std::thread::sleep(Duration::from_millis(rng.gen_range(20..400)));
        let _ = child.kill();
        let status = child.wait().unwrap();
        // A mount of whatever the kill left reads every file.
        let m = env.mount(&env.cipher, &env.mnt);
        assert_views(
            &mount_view(&env.mnt),
            &want,
            &format!("seed {seed}: round {round} ({status})"),
        );
        m.unmount();
    }
    // A kill between a header update's temp file and its rename leaves the temp file (the
    // header itself is intact). Whether a kill above hit that window is chance: plant one, a
    // half-written copy of the header, as the kill would. The completed run below removes it.
    let stale = env.cipher.join(".cmkfs-tmp.cmkfs.volume.json.0123456789ab");
    let header = fs::read(env.cipher.join("cmkfs.volume.json")).unwrap();
    fs::write(&stale, &header[..header.len() / 2]).unwrap();
    set_root_mtime();
    let mut cmd = env.command(&["volume", "reencrypt", &cipher, "--json"]);
    cmd.env("CMKFS_REENCRYPT_BATCH_BYTES", "65536");
    let out = run_with_timeout(cmd, Duration::from_secs(120)).unwrap();
    out.assert_ok();
    let h = VolumeHeader::read(&env.cipher).unwrap();
    assert!(h.retiring.is_none() && h.key_generation >= 1, "{out}");
    assert!(
        !stale.exists(),
        "a completed run left a header temp file: {out}"
    );
    assert_eq!(
        fs::metadata(&env.cipher).unwrap().modified().unwrap(),
        std::time::UNIX_EPOCH + Duration::new(1_500_000_000, 5),
        "seed {seed}: the root's mtime"
    );
    let m = env.mount(&env.cipher, &env.mnt);
    assert_views(&mount_view(&env.mnt), &want, "at the end");
    m.unmount();
    let out = env.cmkfs(&["fsck", &cipher]);
    assert!(out.ok(), "fsck: {out}");
}

#[test]
fn a_mounted_volume_is_refused_without_online_and_revocation_stops_the_command() {
    let env = Env::new();
    env.init(&env.cipher).assert_ok();
    let m = env.mount(&env.cipher, &env.mnt);
    fs::write(env.mnt.join("x"), b"data").unwrap();
    let cipher = env.cipher.to_str().unwrap();
    let out = env.cmkfs(&["volume", "reencrypt", cipher]);
    out.assert_clear_error();
    assert!(out.stderr.contains("--online"), "{out}");
    m.unmount();
    // A disabled key: nothing starts.
    let h = VolumeHeader::read(&env.cipher).unwrap();
    env.cmkfs(&["vault", "key", "update", "default", "--disable"])
        .assert_ok();
    let out = env.cmkfs(&["volume", "reencrypt", cipher]);
    out.assert_clear_error();
    assert_eq!(VolumeHeader::read(&env.cipher).unwrap(), h);
    env.cmkfs(&["vault", "key", "update", "default", "--enable"])
        .assert_ok();
    env.cmkfs(&["volume", "reencrypt", cipher]).assert_ok();
    let m = env.mount(&env.cipher, &env.mnt);
    assert_eq!(fs::read(env.mnt.join("x")).unwrap(), b"data");
    m.unmount();
}

/// An extended attribute too large for ext4 to hold in its old and new forms at once (both
/// must fit in one block) once made the names phase fail with ENOSPC, for good (mount too).
/// It is moved through the journal: a crash after any step, then what a mount runs first,
/// shows every attribute; the run then finishes.
#[test]
fn an_xattr_too_large_to_be_held_twice_is_moved_through_the_journal_at_every_crash_point() {
    let env = Env::new();
    env.init(&env.cipher).assert_ok();
    let m = env.mount(&env.cipher, &env.mnt);
    fs::create_dir(env.mnt.join("d")).unwrap();
    fs::write(env.mnt.join("d/f"), b"a\n").unwrap();
    xattr_set(&env.mnt.join("d/f"), "user.big", &[b'A'; 2500]);
    xattr_set(&env.mnt.join("d/f"), "user.small", b"s");
    xattr_set(&env.mnt.join("d"), "user.big", &[b'B'; 2500]);
    let want = mount_view(&env.mnt);
    m.unmount();
    let pristine = env.cipher.with_extension("pristine");
    let cp = |from: &Path, to: &Path| {
        let _ = fs::remove_dir_all(to);
        let ok = std::process::Command::new("cp")
            .args(["-a", "--preserve=all"])
            .arg(from)
            .arg(to)
            .status()
            .unwrap()
            .success();
        assert!(ok, "cp -a");
    };
    cp(&env.cipher, &pristine);
    let mut seen = HashSet::new();
    for k in 1.. {
        cp(&pristine, &env.cipher);
        let (done, steps) = run_until(&env, Some(k), false);
        seen.extend(steps.iter().copied());
        if done {
            break;
        }
        assert!(run_until(&env, None, true).0);
        let (vol, _) = open(&env);
        assert_views(
            &lib_view(&vol),
            &want,
            &format!("after a crash at {:?} and recovery", steps.last()),
        );
    }
    for s in [Step::XattrRecorded, Step::XattrRemoved] {
        assert!(seen.contains(&s), "never went through {s:?}");
    }
    let _ = fs::remove_dir_all(&pristine);
    let h = VolumeHeader::read(&env.cipher).unwrap();
    assert!(h.retiring.is_none());
    let m = env.mount(&env.cipher, &env.mnt);
    assert_views(&mount_view(&env.mnt), &want, "through a mount at the end");
    m.unmount();
    // `restore --new-dek` runs the same names phase; the command itself, once more.
    let cipher = env.cipher.to_str().unwrap();
    env.cmkfs(&["volume", "reencrypt", cipher]).assert_ok();
    let m = env.mount(&env.cipher, &env.mnt);
    assert_views(&mount_view(&env.mnt), &want, "after a second re-encryption");
    m.unmount();
}

/// fsck of a volume whose re-encryption stopped in its names phase knows both keys: names,
/// symlink targets and attributes still under the retiring DEK are valid (once they were
/// reported undecryptable and `--repair` stripped them, for good).
#[test]
fn fsck_repair_of_a_volume_stopped_in_its_names_phase_finds_nothing_to_repair() {
    let env = Env::new();
    env.init(&env.cipher).assert_ok();
    let m = env.mount(&env.cipher, &env.mnt);
    for i in 0..8 {
        let f = env.mnt.join(format!("f{i}"));
        fs::write(&f, format!("file {i}")).unwrap();
        xattr_set(&f, "user.a", format!("value {i}").as_bytes());
        xattr_set(&f, "user.b", &[i as u8; 100]);
        symlink(format!("f{i}"), env.mnt.join(format!("l{i}"))).unwrap();
    }
    symlink("t".repeat(3000), env.mnt.join("long-link")).unwrap();
    fs::create_dir(env.mnt.join("d")).unwrap();
    xattr_set(&env.mnt.join("d"), "user.d", b"dir");
    let want = mount_view(&env.mnt);
    m.unmount();
    // Stopped after the header, a few names, targets and attributes in.
    let (done, steps) = run_until(&env, Some(12), false);
    assert!(!done, "{steps:?}");
    assert!(VolumeHeader::read(&env.cipher).unwrap().retiring.is_some());
    let cipher = env.cipher.to_str().unwrap();
    let out = env.cmkfs(&["fsck", cipher, "--repair", "--json"]);
    let report: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_default();
    let kinds: Vec<String> = report["problems"]
        .as_array()
        .map(|a| a.iter().map(|p| p["kind"].to_string()).collect())
        .unwrap_or_default();
    assert!(
        out.ok() && kinds.iter().all(|k| k.contains("reencrypt_in_progress")),
        "{kinds:?} {out}"
    );
    env.cmkfs(&["volume", "reencrypt", cipher]).assert_ok();
    let m = env.mount(&env.cipher, &env.mnt);
    assert_views(
        &mount_view(&env.mnt),
        &want,
        "after fsck --repair and the resumed run",
    );
    m.unmount();
}

/// Every data file's backing bytes, by path.
fn backing_bytes(cipher: &Path) -> BTreeMap<std::path::PathBuf, Vec<u8>> {
    data_files(cipher)
        .into_iter()
        .map(|p| {
            let b = fs::read(&p).unwrap();
            (p, b)
        })
        .collect()
}

/// A crash in the middle of writing a batch leaves each 512-byte sector the batch touches
/// old or new, in any mix (pages reach the disk in any order; a killed process stops between
/// two): the batch is run to the end, the sectors it changed are set back to their old bytes
/// at random (the file header on its own coin), and the resume must decide every sector
/// from the journal's marks and give back every byte. Several batches of two generations,
/// files spanning batches, tails of 1..15 bytes, a sparse file with data between holes.
#[test]
fn a_batch_torn_at_any_sector_is_finished_from_the_journal_marks() {
    // Batches of 256 units: the tree fits in a few of them, and each is torn.
    std::env::set_var("CMKFS_REENCRYPT_BATCH_BYTES", "1048576");
    let seed = seed("reencrypt torn sectors");
    let mut rng = StdRng::seed_from_u64(seed);
    let env = Env::new();
    env.init(&env.cipher).assert_ok();
    let m = env.mount(&env.cipher, &env.mnt);
    populate(&env.mnt, &mut rng, 30);
    {
        // Data between holes, crossing a unit boundary behind the file header: the sector
        // where a data unit begins also holds the end of an all-zero unit.
        let f = fs::File::create(env.mnt.join("holes")).unwrap();
        f.set_len(3 << 20).unwrap();
        for at in [0u64, 70_000, 1 << 20, (2 << 20) + 4093] {
            std::os::unix::fs::FileExt::write_all_at(&f, &random_bytes(&mut rng, 9000), at)
                .unwrap();
        }
    }
    let want = mount_view(&env.mnt);
    m.unmount();
    let mut torn = 0usize;
    let mut batches = 0usize;
    for generation in 1..=2u32 {
        // Each session runs one batch, stops after writing it, has it torn and recovered.
        loop {
            let mut before = None;
            let mut after = None;
            let done = {
                let cipher = env.cipher.clone();
                let mut fault = |s: Step| {
                    match s {
                        Step::JournalDurable => before = Some(backing_bytes(&cipher)),
                        Step::HeadersWritten => {
                            after = Some(backing_bytes(&cipher));
                            return Err(std::io::Error::other("crash"));
                        }
                        _ => {}
                    }
                    Ok(())
                };
                run_in_process(&env, false, &mut fault).is_ok()
            };
            if done {
                break;
            }
            batches += 1;
            // Tear: each changed sector old or new.
            let (before, after) = (before.unwrap(), after.unwrap());
            for (p, new) in &after {
                let Some(old) = before.get(p) else { continue };
                if old == new || old.len() != new.len() {
                    continue;
                }
                let mut mixed = new.clone();
                if rng.gen_bool(0.5) {
                    mixed[..FILE_HEADER_LEN as usize]
                        .copy_from_slice(&old[..FILE_HEADER_LEN as usize]);
                }
                for s in (0..new.len()).step_by(512) {
                    let e = (s + 512).min(new.len());
                    let body = s.max(data_offset(&env.cipher) as usize);
                    if body < e && old[body..e] != new[body..e] && rng.gen_bool(0.5) {
                        mixed[body..e].copy_from_slice(&old[body..e]);
                        torn += 1;
                    }
                }
                fs::write(p, &mixed).unwrap();
            }
            // What a mount does first.
            assert!(run_until(&env, None, true).0);
            let (vol, _) = open(&env);
            assert_views(
                &lib_view(&vol),
                &want,
                &format!("seed {seed}: generation {generation}, torn batch {batches}"),
            );
        }
        assert_eq!(
            VolumeHeader::read(&env.cipher).unwrap().key_generation,
            generation
        );
    }
    assert!(torn > 50, "seed {seed}: only {torn} sectors torn");
    let m = env.mount(&env.cipher, &env.mnt);
    assert_views(&mount_view(&env.mnt), &want, "through a mount at the end");
    m.unmount();
    let out = env.cmkfs(&["fsck", env.cipher.to_str().unwrap()]);
    assert!(out.ok(), "fsck: {out}");
}

/// Holes are neither read nor written: a sparse file keeps its allocated size (`st_blocks`)
/// through a re-encryption, the command's report counts only the data it rewrote, and every
/// byte reads back.
#[test]
fn holes_stay_holes_and_cost_nothing() {
    let env = Env::new();
    env.init(&env.cipher).assert_ok();
    let m = env.mount(&env.cipher, &env.mnt);
    let mut rng = StdRng::seed_from_u64(seed("reencrypt holes"));
    let f = fs::File::create(env.mnt.join("sparse")).unwrap();
    f.set_len(32 << 20).unwrap();
    for at in [0u64, 20 << 20, (32 << 20) - 5000] {
        std::os::unix::fs::FileExt::write_all_at(&f, &random_bytes(&mut rng, 5000), at).unwrap();
    }
    drop(f);
    fs::File::create(env.mnt.join("empty-but-long"))
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    fs::write(env.mnt.join("dense"), random_bytes(&mut rng, 100_000)).unwrap();
    let want = mount_view(&env.mnt);
    m.unmount();
    let blocks = |cipher: &Path| -> BTreeMap<std::path::PathBuf, u64> {
        data_files(cipher)
            .into_iter()
            .map(|p| {
                let b = fs::metadata(&p).unwrap().blocks();
                (p.strip_prefix(cipher).unwrap().to_path_buf(), b)
            })
            .collect()
    };
    let before: Vec<u64> = blocks(&env.cipher).into_values().collect();
    let out = env.cmkfs(&[
        "volume",
        "reencrypt",
        env.cipher.to_str().unwrap(),
        "--json",
    ]);
    out.assert_ok();
    let report: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    // Names are re-encrypted too (new backing names): compare the sorted block counts.
    let mut after: Vec<u64> = blocks(&env.cipher).into_values().collect();
    let mut b = before.clone();
    b.sort();
    after.sort();
    assert_eq!(after, b, "allocated blocks changed: {out}");
    let bytes = report["bytes"].as_u64().unwrap_or_else(|| panic!("{out}"));
    assert!(
        bytes < 1 << 20,
        "{bytes} bytes rewritten for 115 KB of data: holes were read"
    );
    let m = env.mount(&env.cipher, &env.mnt);
    assert_views(&mount_view(&env.mnt), &want, "after the re-encryption");
    m.unmount();
}

/// An offline re-encryption holds the volume lock and, to change the header, needs its Disk
/// Encryption Set's lock; `cmkfs des update` takes them in the other order. While another
/// command holds the set's lock, the re-encryption waits only a while, then stops with the
/// volume as it was (it still mounts) and resumes when run again: the two never wait for
/// each other for ever.
#[test]
fn an_offline_reencryption_does_not_wait_for_ever_for_a_busy_disk_encryption_set() {
    let env = Env::new();
    crate::backup::create_set_d(&env);
    env.cmkfs(&[
        "init".as_ref(),
        env.cipher.as_os_str(),
        "--des".as_ref(),
        "d".as_ref(),
    ])
    .assert_ok();
    {
        let m = env.mount(&env.cipher, &env.mnt);
        fs::write(env.mnt.join("f"), b"kept across a stopped run").unwrap();
        m.unmount();
    }
    // Held as `cmkfs des update` holds it while it waits for the volume.
    let set_lock = fs::File::open(env.home.join("des/.lock")).unwrap();
    // SAFETY: flock on a descriptor this test owns.
    assert_eq!(
        unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&set_lock), libc::LOCK_EX) },
        0
    );
    let mut cmd = env.command(&[
        "volume".as_ref(),
        "reencrypt".as_ref(),
        env.cipher.as_os_str(),
    ]);
    cmd.env("CMKFS_TEST_SET_LOCK_WAIT_MS", "300");
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("is busy"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    drop(set_lock);
    {
        let m = env.mount(&env.cipher, &env.mnt);
        assert_eq!(
            fs::read(env.mnt.join("f")).unwrap(),
            b"kept across a stopped run"
        );
        m.unmount();
    }
    env.cmkfs(&[
        "volume".as_ref(),
        "reencrypt".as_ref(),
        env.cipher.as_os_str(),
    ])
    .assert_ok();
    let m = env.mount(&env.cipher, &env.mnt);
    assert_eq!(
        fs::read(env.mnt.join("f")).unwrap(),
        b"kept across a stopped run"
    );
    m.unmount();
}
