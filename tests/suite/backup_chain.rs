//! Incremental backups and restores of a chain (issue 13): a full backup, changes of every
//! kind through a real mount, incremental archives; the chain restores the volume byte for
//! byte (backing tree) and metadata for metadata (plaintext view); a missing, reordered,
//! replaced, foreign or tampered archive is refused with one line and nothing written; a
//! restore killed midway leaves only its temp directory, which fsck reports and a re-run
//! removes.

use crate::backup::{assert_views, backing, populate, setup, setxattr, tar_members, view};
use crate::common;

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use rand::rngs::StdRng;
use rand::SeedableRng;

fn os(args: &[&Path]) -> Vec<std::ffi::OsString> {
    args.iter().map(|p| p.as_os_str().to_owned()).collect()
}

/// `cmkfs backup CIPHER ARCHIVE [--incremental-from BASE] --json`.
fn backup(env: &Env, archive: &Path, base: Option<&Path>) -> serde_json::Value {
    let mut args = os(&[Path::new("backup"), &env.cipher, archive]);
    if let Some(b) = base {
        args.extend(os(&[Path::new("--incremental-from"), b]));
    }
    args.push("--json".into());
    json(&env.cmkfs(&args))
}

/// `cmkfs restore ARCHIVES... TARGET --des d [EXTRA...]`.
fn restore(env: &Env, archives: &[&Path], target: &Path, extra: &[&str]) -> Output {
    let mut args = os(archives);
    args.insert(0, "restore".into());
    args.push(target.as_os_str().to_owned());
    // The volumes `populate` fills hold a device node.
    args.extend(["--des", "d", "--allow-devices"].iter().map(Into::into));
    args.extend(extra.iter().map(Into::into));
    env.cmkfs(&args)
}

/// The backing tree as [`backing`] shows it, allocated block counts left out (a file written
/// in one go and one written in pieces may differ by an extent-index block); holes are
/// checked apart, by [`sparse_blocks`].
fn bytes_and_metadata(cipher: &Path) -> std::collections::BTreeMap<String, String> {
    backing(cipher)
        .into_iter()
        .map(|(k, v)| match v.rfind(" blocks ") {
            Some(at) => (k, v[..at].to_string()),
            None => (k, v),
        })
        .collect()
}

/// 512-byte blocks allocated to the backing files of more than 2 MiB (the sparse file).
fn sparse_blocks(cipher: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    data_files(cipher)
        .iter()
        .map(|f| fs::metadata(f).unwrap())
        .filter(|md| md.len() > 2 << 20)
        .map(|md| md.blocks())
        .sum()
}

fn temps_beside(dir: &Path) -> Vec<PathBuf> {
    crate::backup::restore_temps_in(dir)
}

/// A restore of `archives` must fail with one line naming `why`, and leave nothing.
#[track_caller]
fn assert_refused(env: &Env, archives: &[&Path], why: &str, extra: &[&str]) {
    let target = env.root.join("refused-target");
    let out = restore(env, archives, &target, extra);
    assert!(!out.ok(), "{why}: restore succeeded");
    out.assert_clear_error();
    assert!(out.stderr.contains(why), "expected {why:?}:\n{out}");
    assert!(!target.exists(), "{why}: the target was created");
    assert!(temps_beside(&env.root).is_empty(), "{why}: temp dirs left");
    let des = fs::read_to_string(env.home.join("des/d.json")).unwrap();
    assert!(
        !des.contains(&*target.to_string_lossy()),
        "{why}: listed in the set"
    );
}

/// Changes of every kind a backup must carry, through the mount at `m`.
fn change_everything(m: &Path) {
    use std::io::Write;
    // A write into a file with two more names (one in a directory that is renamed below).
    fs::OpenOptions::new()
        .append(true)
        .open(m.join("a/f1"))
        .unwrap()
        .write_all(b"appended to a hard-linked file")
        .unwrap();
    // Truncations: shorter (to a 1..15-byte tail), longer (a hole), to zero.
    fs::OpenOptions::new()
        .write(true)
        .open(m.join("a/f5"))
        .unwrap()
        .set_len(4097)
        .unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(m.join("f4"))
        .unwrap()
        .set_len(100_000)
        .unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(m.join("a/b/c/f2"))
        .unwrap()
        .set_len(0)
        .unwrap();
    // Deletions: a file, a symlink, an empty directory.
    fs::remove_file(m.join("f8")).unwrap();
    fs::remove_file(m.join("long-link")).unwrap();
    fs::remove_dir(m.join("empty")).unwrap();
    // Renames: a file across directories, a directory with everything in it, a file over
    // another one.
    fs::rename(m.join("a/f17"), m.join("sticky/f17-moved")).unwrap();
    fs::rename(m.join("a/b/c"), m.join("c-moved")).unwrap();
    fs::rename(m.join("f12"), m.join("f16")).unwrap();
    // New names: a hard link, a file, a symlink, a directory.
    fs::hard_link(m.join("f20"), m.join("sticky/hard-new")).unwrap();
    fs::create_dir(m.join("new-dir")).unwrap();
    fs::write(m.join("new-dir/new"), b"a new file with a tail").unwrap();
    symlink("c-moved/f2", m.join("new-dir/link")).unwrap();
    // Metadata only: an xattr set, one changed, a mode, a sparse write in a big hole.
    setxattr(&m.join("f24"), "user.added", b"later");
    setxattr(&m.join("a/f1"), "user.note", b"changed");
    fs::set_permissions(m.join("a/f13"), fs::Permissions::from_mode(0o600)).unwrap();
    let f = fs::OpenOptions::new()
        .write(true)
        .open(m.join("sparse"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"second island", 2 << 20).unwrap();
}

#[test]
fn an_incremental_chain_restores_every_change_byte_for_byte_with_its_metadata() {
    let env = Env::new();
    setup(&env);
    let mut rng = StdRng::seed_from_u64(seed("backup chain"));
    let mnt = env.mnt.clone();
    let m = env.mount(&env.cipher, &mnt);
    populate(&mnt, &mut rng);
    m.unmount();
    let full = env.root.join("full.tar");
    let f = backup(&env, &full, None);
    assert!(f["stored"].is_null() && f["base"].is_null(), "{f}");

    let m = env.mount(&env.cipher, &mnt);
    change_everything(&mnt);
    m.unmount();
    let backing1 = bytes_and_metadata(&env.cipher);
    let inc1 = env.root.join("inc1.tar");
    let i1 = backup(&env, &inc1, Some(&full));
    assert_eq!(i1["chain_depth"], 1, "{i1}");
    let stored = &i1["stored"];
    let (full_len, inc_len) = (
        fs::metadata(&full).unwrap().len(),
        fs::metadata(&inc1).unwrap().len(),
    );
    assert!(
        inc_len * 4 < full_len,
        "the incremental archive ({inc_len} bytes) is not much smaller than the full one \
         ({full_len}): {i1}"
    );
    assert!(
        stored["referenced"].as_u64().unwrap() > 40 && stored["members"].as_u64().unwrap() < 30,
        "{i1}"
    );
    // No plaintext in an incremental archive either.
    let bytes = fs::read(&inc1).unwrap();
    assert!(!bytes.windows(14).any(|w| w == b"second island"));

    // A second round on top of the first: a renamed file deleted, a file rewritten with the
    // same length, one touched only.
    let m = env.mount(&env.cipher, &mnt);
    fs::remove_file(mnt.join("sticky/f17-moved")).unwrap();
    let len = fs::metadata(mnt.join("f16")).unwrap().len() as usize;
    fs::write(mnt.join("f16"), vec![0x5a; len]).unwrap();
    let t = fs::File::open(mnt.join("c-moved/f10")).unwrap();
    t.set_modified(std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000))
        .unwrap();
    drop(t);
    m.unmount();
    // As stored: the kernel's cached mtime of the rewritten f16 may not be (see
    // `backup::view_as_stored`).
    let want2 = crate::backup::view_as_stored(&env);
    let inc2 = env.root.join("inc2.tar");
    let i2 = backup(&env, &inc2, Some(&inc1));
    assert_eq!(i2["chain_depth"], 2, "{i2}");

    // The whole chain: the backing tree byte for byte, the plaintext view entry for entry.
    let r = env.root.join("r-chain");
    let out = json(&restore(&env, &[&full, &inc1, &inc2], &r, &["--json"]));
    assert_eq!(out["archives"].as_array().unwrap().len(), 3, "{out}");
    assert_eq!(
        bytes_and_metadata(&r),
        bytes_and_metadata(&env.cipher),
        "restored backing tree"
    );
    assert!(
        sparse_blocks(&r) < 128,
        "holes filled: {}",
        sparse_blocks(&r)
    );
    let mnt2 = env.dir("mnt2");
    let m = env.mount(&r, &mnt2);
    assert_views(&view(&mnt2), &want2, "chain of three");
    m.unmount();
    // Part of the chain: the state of the first incremental.
    let r1 = env.root.join("r-first");
    restore(&env, &[&full, &inc1], &r1, &[]).assert_ok();
    // The same backing bytes and metadata under the same DEK: the same plaintext view
    // at the time of inc1, as the mount of the whole chain's restore above shows for its state.
    assert_eq!(bytes_and_metadata(&r1), backing1, "state of inc1");
    // The newest archive with the directory of its bases.
    let r3 = env.root.join("r-bases");
    restore(
        &env,
        &[&inc2],
        &r3,
        &["--bases", &env.root.to_string_lossy()],
    )
    .assert_ok();
    assert_eq!(
        bytes_and_metadata(&r3),
        bytes_and_metadata(&env.cipher),
        "--bases"
    );
}

/// Flips one byte in the middle of the data of the first regular member whose name contains
/// `what`.
fn tamper(src: &Path, dst: &Path, what: &[u8]) {
    let mut b = fs::read(src).unwrap();
    let (_, _, data, len) = tar_members(&b)
        .into_iter()
        .find(|&(h, t, _, len)| {
            t == b'0' && len > 0 && b[h..h + 100].windows(what.len()).any(|w| w == what)
        })
        .expect("a member to tamper with");
    b[data + len / 2] ^= 1;
    fs::write(dst, b).unwrap();
}

/// What may stand in for a backing data file written straight into the backing store: the
/// header area of a format v3 file of key generation 0 (a file id), then `body` (a body of
/// 1..15 bytes gets the 16 filler bytes that make its length a valid one). A restore copies
/// ciphertext as it is, but a backup refuses a data file whose header or length the volume
/// would refuse.
fn data_file(body: &[u8]) -> Vec<u8> {
    let lay = cmkfs::volume::layout::Layout::V3;
    let mut b = lay.header_area(&lay.generate_header(0).unwrap());
    b.extend_from_slice(body);
    if (1..16).contains(&body.len()) {
        b.extend_from_slice(&[0; 16]);
    }
    b
}

#[test]
fn a_missing_reordered_replaced_foreign_or_tampered_archive_of_a_chain_is_refused() {
    let env = Env::new();
    setup(&env);
    // Written straight into the backing store (a restore copies ciphertext as it is, so
    // these need not decrypt; only a file header, `data_file`; no mount needed for what is
    // tested here).
    let c = env.cipher.clone();
    for i in 0..6 {
        fs::write(
            c.join(format!("f{i}")),
            data_file(&vec![i as u8; 20_000 + i]),
        )
        .unwrap();
    }
    let [full, inc1, inc2, full2] = ["full.tar", "inc1.tar", "inc2.tar", "full2.tar"]
        .map(|n| env.root.join("archives").join(n));
    fs::create_dir(env.root.join("archives")).unwrap();
    backup(&env, &full, None);
    for (i, (inc, base)) in [(&inc1, &full), (&inc2, &inc1)].into_iter().enumerate() {
        fs::write(c.join(format!("new{i}")), data_file(b"new")).unwrap();
        fs::write(c.join("f1"), data_file(&vec![9u8; 1000 + i])).unwrap();
        backup(&env, inc, Some(base));
    }
    backup(&env, &full2, None);

    assert_refused(&env, &[&inc1], "is an incremental backup", &[]);
    assert_refused(&env, &[&inc1, &full], "is an incremental backup", &[]);
    assert_refused(&env, &[&full, &inc2], "missing from the chain", &[]);
    assert_refused(&env, &[&full, &inc2, &inc1], "out of order", &[]);
    assert_refused(&env, &[&full2, &inc1], "missing from the chain", &[]);
    assert_refused(&env, &[&full, &inc1, &full2], "is a full backup", &[]);
    // Tampered: a data byte of the base (found as its member is extracted, after the
    // incremental's seals were checked), a byte of the base's manifest (its MAC), a byte of
    // the incremental's manifest.
    let bad = env.root.join("bad.tar");
    tamper(&full, &bad, b"volume/");
    assert_refused(&env, &[&bad, &inc1], "does not match the manifest", &[]);
    tamper(&full, &bad, b"manifest.json");
    assert_refused(&env, &[&bad, &inc1], "MAC", &[]);
    tamper(&inc1, &bad, b"manifest.json");
    assert_refused(&env, &[&full, &bad], "MAC", &[]);
    // A truncated incremental.
    let b = fs::read(&inc1).unwrap();
    fs::write(&bad, &b[..b.len() / 2]).unwrap();
    assert_refused(&env, &[&full, &bad], "bad.tar", &[]);
    fs::remove_file(&bad).unwrap();
    // --bases where the base is not.
    let lone = env.dir("lone");
    fs::copy(&inc2, lone.join("inc2.tar")).unwrap();
    fs::copy(&inc1, lone.join("inc1.tar")).unwrap();
    assert_refused(
        &env,
        &[&lone.join("inc2.tar")],
        "not among the archives",
        &["--bases", &lone.to_string_lossy()],
    );

    // Backup side: a base of another volume, or a damaged one, is refused with one line and
    // no archive.
    let other = env.dir("other-cipher");
    env.init(&other);
    let foreign = env.root.join("foreign.tar");
    env.cmkfs(&os(&[Path::new("backup"), &other, &foreign]))
        .assert_ok();
    tamper(&full, &bad, b"manifest.json");
    for (base, why) in [(&foreign, "not of this one"), (&bad, "MAC")] {
        let out_path = env.root.join("never.tar");
        let out = env.cmkfs(&os(&[
            Path::new("backup"),
            &env.cipher,
            &out_path,
            Path::new("--incremental-from"),
            base,
        ]));
        out.assert_clear_error();
        assert!(out.stderr.contains(why), "{why}: {out}");
        assert!(!out_path.exists());
    }
    // The good chain still restores.
    restore(&env, &[&full, &inc1, &inc2], &env.root.join("ok"), &[]).assert_ok();
}

#[test]
fn a_restore_killed_midway_leaves_its_temp_dir_which_fsck_reports_and_a_rerun_removes() {
    let env = Env::new();
    setup(&env);
    // Large backing files written straight into the backing store (a restore copies
    // ciphertext as it is, so they need not decrypt; only a file header): the restore takes
    // long enough to be killed in the middle.
    let mut rng = StdRng::seed_from_u64(seed("backup killed restore"));
    for i in 0..2 {
        fs::write(
            env.cipher.join(format!("big{i}")),
            data_file(&random_bytes(&mut rng, 12 << 20)),
        )
        .unwrap();
    }
    let archive = env.root.join("a.tar");
    env.cmkfs(&os(&[Path::new("backup"), &env.cipher, &archive]))
        .assert_ok();
    let target = env.root.join("target");
    let kill_midway = || {
        let mut args = os(&[Path::new("restore"), &archive, &target]);
        args.extend(["--des", "d"].iter().map(Into::into));
        let mut child = env
            .command(&args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        // Killed once its temp directory holds part of the data.
        let hit = loop {
            let partial = temps_beside(&env.root).into_iter().any(|t| {
                fs::read_dir(&t)
                    .map(|rd| {
                        rd.flatten()
                            .any(|e| e.metadata().is_ok_and(|m| m.len() > 0))
                    })
                    .unwrap_or(false)
            });
            if partial || Instant::now() > deadline {
                break partial;
            }
            if let Some(st) = child.try_wait().unwrap() {
                panic!("the restore ended ({st}) before it could be killed");
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(hit, "no temp directory appeared");
        assert!(!target.exists(), "a killed restore created the target");
        let left = temps_beside(&env.root);
        assert_eq!(left.len(), 1, "{left:?}");
        left[0].clone()
    };

    let left = kill_midway();
    // fsck of the target (absent) and of the temp dir itself: the leftover, what to do.
    for dir in [&target, &left] {
        let out = env.cmkfs(&os(&[Path::new("fsck"), dir, Path::new("--json")]));
        assert_eq!(out.status.code(), Some(2), "{out}");
        let r: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        let p = &r["problems"][0];
        assert_eq!(p["kind"], "restore_leftover", "{r}");
        assert_eq!(p["fix"], "remove", "{r}");
        assert!(
            p["detail"]
                .as_str()
                .unwrap()
                .contains("run the restore again"),
            "{r}"
        );
    }
    let out = env.cmkfs(&os(&[Path::new("fsck"), &target]));
    assert!(out.stdout.contains(&*left.to_string_lossy()), "{out}");
    let out = env.cmkfs(&os(&[Path::new("fsck"), &target, Path::new("--repair")]));
    assert_eq!(out.status.code(), Some(1), "{out}");
    assert!(temps_beside(&env.root).is_empty(), "fsck --repair left it");

    // Killed again: the re-run removes the leftover and restores.
    let left = kill_midway();
    let r = json(&restore(&env, &[&archive], &target, &["--json"]));
    assert_eq!(r["cleaned_up"][0], left.to_string_lossy().as_ref(), "{r}");
    assert!(temps_beside(&env.root).is_empty());
    assert_eq!(bytes_and_metadata(&target), bytes_and_metadata(&env.cipher));

    // A restore that is still running (its temp dir locked) is not touched: refused.
    let target2 = env.root.join("target2");
    let busy = env.root.join(".target2.cmkfs-restore.0123456789abcdef");
    fs::create_dir(&busy).unwrap();
    // Held as a restore holds it: the volume lock (its lock file) of the temp dir.
    let held = cmkfs::volume::lock::VolumeLock::exclusive(&busy).unwrap();
    let out = restore(&env, &[&archive], &target2, &[]);
    out.assert_clear_error();
    assert!(out.stderr.contains("is running"), "{out}");
    assert!(busy.exists() && !target2.exists());
    drop(held);
}

/// Writes `bytes` at `off` of the file at `p` (through a mount).
fn pwrite(p: &Path, off: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(bytes, off).unwrap();
}

#[test]
fn a_changed_file_is_stored_as_its_changed_chunks_and_a_chain_of_three_rebuilds_it() {
    let env = Env::new();
    setup(&env);
    let mut rng = StdRng::seed_from_u64(seed("backup deltas"));
    let mnt = env.mnt.clone();
    let m = env.mount(&env.cipher, &mnt);
    fs::write(mnt.join("big"), random_bytes(&mut rng, 64 << 20)).unwrap();
    // Sparse: data in its second MiB only.
    let sp = fs::File::create(mnt.join("sparse")).unwrap();
    sp.set_len(8 << 20).unwrap();
    drop(sp);
    pwrite(
        &mnt.join("sparse"),
        1 << 20,
        &random_bytes(&mut rng, 1 << 20),
    );
    fs::write(mnt.join("doc"), random_bytes(&mut rng, 1 << 20)).unwrap();
    m.unmount();
    let full = env.root.join("full.tar");
    backup(&env, &full, None);

    // Three sectors of the 64 MiB file, far apart.
    let m = env.mount(&env.cipher, &mnt);
    for off in [5 << 20, (30 << 20) + 3 * 4096 + 7, (64 << 20) - 100] {
        pwrite(&mnt.join("big"), off, b"three changed sectors");
    }
    m.unmount();
    let inc1 = env.root.join("inc1.tar");
    let i1 = backup(&env, &inc1, Some(&full));
    let len1 = fs::metadata(&inc1).unwrap().len();
    assert!(len1 < 1 << 20, "incremental of {len1} bytes: {i1}");
    assert_eq!(i1["stored"]["deltas"], 1, "{i1}");

    // Shrunk to a tail of 5 bytes mid-chunk, grown by a hole and data past the old end,
    // a hole punched in the middle of the data.
    let m = env.mount(&env.cipher, &mnt);
    // An editor's save: the old file renamed to a backup name (a reference to the base's
    // file) and a changed copy written under the name: a new file, with a new file id, so
    // all of its ciphertext differs and it is stored whole.
    let doc = fs::read(mnt.join("doc")).unwrap();
    fs::rename(mnt.join("doc"), mnt.join("doc~")).unwrap();
    let mut doc2 = doc.clone();
    doc2[300_000] ^= 0xff;
    fs::write(mnt.join("doc"), &doc2).unwrap();
    let big = fs::OpenOptions::new()
        .write(true)
        .open(mnt.join("big"))
        .unwrap();
    big.set_len((40 << 20) + 5).unwrap();
    drop(big);
    pwrite(&mnt.join("big"), 10 << 20, b"x");
    pwrite(
        &mnt.join("sparse"),
        11 << 20,
        b"grown past its end, after a hole",
    );
    let c =
        std::ffi::CString::new(mnt.join("sparse").as_os_str().as_encoded_bytes().to_vec()).unwrap();
    // SAFETY: a valid path; plain system calls.
    unsafe {
        let fd = libc::open(c.as_ptr(), libc::O_WRONLY);
        assert!(fd >= 0);
        let r = libc::fallocate(
            fd,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            (1 << 20) + (256 << 10),
            128 << 10,
        );
        assert_eq!(r, 0, "punch: {}", std::io::Error::last_os_error());
        libc::close(fd);
    }
    m.unmount();
    let inc2 = env.root.join("inc2.tar");
    let i2 = backup(&env, &inc2, Some(&inc1));
    assert_eq!(i2["stored"]["deltas"], 2, "{i2}");
    let len2 = fs::metadata(&inc2).unwrap().len();
    // The 1 MiB of the new doc, and the chunks of the two deltas.
    assert!(len2 < 2 << 20, "incremental of {len2} bytes: {i2}");

    // The same backing bytes under the same DEK: the same plaintext (the other chain test
    // mounts its restore).
    let r = env.root.join("r");
    restore(&env, &[&full, &inc1, &inc2], &r, &[]).assert_ok();
    assert_eq!(
        bytes_and_metadata(&r),
        bytes_and_metadata(&env.cipher),
        "chain of three"
    );
    let (src, got) = (sparse_blocks(&env.cipher), sparse_blocks(&r));
    assert!(
        got <= src + 64,
        "holes filled: {got} blocks, the source has {src}"
    );
}
