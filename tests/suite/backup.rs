//! `cmkfs backup` / `cmkfs restore` (issue 13): a round trip keeps every byte and every piece
//! of metadata (through real mounts); the archive holds no plaintext; `--new-dek` shares no
//! ciphertext block with the source; a disabled backup key refuses the restore; a tampered or
//! truncated archive is refused with nothing written; a backup taken while a writer runs is
//! one point in time.

use crate::common;

use std::collections::{BTreeMap, HashSet};
use std::ffi::{CString, OsStr};
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};

const MARKER: &[u8] = b"PLAINTEXT-MARKER-b4ckup";

/// A volume, a second key for backups, and a Disk Encryption Set `d` (key `dkey`).
pub(crate) fn setup(env: &Env) {
    env.init(&env.cipher);
    create_set_d(env);
    env.cmkfs(&["vault", "key", "create", "bkey", "--key-size", KEY_SIZE])
        .assert_ok();
}

/// A Disk Encryption Set `d` under a new key `dkey` (purge protection on, as a set needs).
pub(crate) fn create_set_d(env: &Env) {
    env.cmkfs(&["vault", "config", "--purge-protection", "on"])
        .assert_ok();
    env.cmkfs(&["vault", "key", "create", "dkey", "--key-size", KEY_SIZE])
        .assert_ok();
    env.cmkfs(&["des", "create", "d", "--key", "dkey"])
        .assert_ok();
}

/// `cmkfs backup` of the test volume to `archive` under the backup key `bkey` of [`setup`].
pub(crate) fn backup_with_bkey(env: &Env, archive: &Path) {
    env.cmkfs(&[
        "backup".as_ref(),
        env.cipher.as_os_str(),
        archive.as_os_str(),
        "--key".as_ref(),
        "bkey".as_ref(),
    ])
    .assert_ok();
}

/// The arguments of `cmkfs restore ARCHIVE TARGET --des d EXTRA...` (the set of [`setup`]).
fn restore_args<'a>(archive: &'a Path, target: &'a Path, extra: &[&'a str]) -> Vec<&'a OsStr> {
    let mut args: Vec<&OsStr> = vec![
        "restore".as_ref(),
        archive.as_os_str(),
        target.as_os_str(),
        "--des".as_ref(),
        "d".as_ref(),
    ];
    args.extend(extra.iter().map(|e| OsStr::new(*e)));
    args
}

/// Runs `cmkfs restore ARCHIVE TARGET --des d EXTRA...` (not asserted: the caller checks).
pub(crate) fn restore_to(env: &Env, archive: &Path, target: &Path, extra: &[&str]) -> Output {
    env.cmkfs(&restore_args(archive, target, extra))
}

pub(crate) fn setxattr(p: &Path, name: &str, value: &[u8]) {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    // SAFETY: valid strings and buffer.
    let r = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(
        r,
        0,
        "setxattr {name} on {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

pub(crate) fn set_times(p: &Path, mtime: (i64, i64)) {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    let ts = [
        libc::timespec {
            tv_sec: 1_600_000_000,
            tv_nsec: 5,
        },
        libc::timespec {
            tv_sec: mtime.0,
            tv_nsec: mtime.1,
        },
    ];
    // SAFETY: valid path and two timespecs.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(r, 0, "utimensat {}", p.display());
}

/// Fills a mounted volume with every kind of thing a backup must carry.
pub(crate) fn populate(root: &Path, rng: &mut StdRng) {
    let long_dir = root.join("d".repeat(220));
    for d in ["a/b/c", "empty", "sticky", "setgid"] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::create_dir(&long_dir).unwrap();
    let dirs = [
        root.to_path_buf(),
        root.join("a"),
        root.join("a/b/c"),
        long_dir.clone(),
    ];
    for i in 0..60 {
        let size = match i % 5 {
            0 => rng.gen_range(0..=8200),
            1 => 4096 * rng.gen_range(1..3) + rng.gen_range(1..16),
            2 => rng.gen_range(1..16),
            3 => 0,
            _ => rng.gen_range(8200..40_000),
        };
        let name = if i % 9 == 0 {
            format!("{}{i}", "long-name-".repeat(22))
        } else {
            format!("f{i}")
        };
        let mut data = random_bytes(rng, size);
        if size > MARKER.len() * 2 && i % 3 == 0 {
            data[..MARKER.len()].copy_from_slice(MARKER);
        }
        fs::write(dirs[i % dirs.len()].join(name), data).unwrap();
    }
    fs::write(root.join("marked"), repeated(MARKER, 20_000)).unwrap();
    // Sparse: a hole before and after data.
    let f = fs::File::create(root.join("sparse")).unwrap();
    f.set_len(3 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"middle", 1 << 20).unwrap();
    drop(f);
    symlink("a/f1", root.join("short-link")).unwrap();
    symlink("t".repeat(3500), root.join("long-link")).unwrap();
    symlink("x".repeat(200), long_dir.join("link-in-long-dir")).unwrap();
    fs::hard_link(root.join("a/f1"), root.join("hard-1")).unwrap();
    fs::hard_link(root.join("a/f1"), long_dir.join("hard-2")).unwrap();
    setxattr(&root.join("a/f1"), "user.note", b"hello\nworld\0=");
    setxattr(&root.join("a"), "user.dir", &[7u8; 300]);
    setxattr(
        &root.join("a/b/c"),
        &format!("user.{}", "x".repeat(200)),
        b"hashed",
    );
    setxattr(&root.join("short-link"), "trusted.on-a-symlink", b"t");
    let acl = std::process::Command::new("setfacl")
        .args(["-m", "u:1234:rw,g:99:r"])
        .arg(root.join("marked"))
        .status()
        .expect("setfacl (package acl; scripts/test.sh installs it)");
    assert!(acl.success());
    let dacl = std::process::Command::new("setfacl")
        .args(["-d", "-m", "u:42:rwx"])
        .arg(root.join("a/b"))
        .status()
        .unwrap();
    assert!(dacl.success());
    fs::set_permissions(root.join("sticky"), fs::Permissions::from_mode(0o1777)).unwrap();
    fs::set_permissions(root.join("setgid"), fs::Permissions::from_mode(0o2750)).unwrap();
    fs::set_permissions(root.join("a/f5"), fs::Permissions::from_mode(0o4711)).unwrap();
    fs::set_permissions(root.join("a/b"), fs::Permissions::from_mode(0o500)).unwrap();
    std::os::unix::fs::lchown(root.join("a/f13"), Some(1234), Some(5678)).unwrap();
    std::os::unix::fs::lchown(root.join("short-link"), Some(77), Some(88)).unwrap();
    std::os::unix::fs::chown(root.join("empty"), Some(4242), Some(4343)).unwrap();
    let c = CString::new(root.join("fifo").as_os_str().as_bytes()).unwrap();
    // SAFETY: valid path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o640) }, 0);
    let c = CString::new(root.join("null-dev").as_os_str().as_bytes()).unwrap();
    // SAFETY: valid path; root makes device nodes.
    assert_eq!(
        unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(1, 3)) },
        0
    );
    set_times(&root.join("a/f1"), (1_234_567_890, 123_456_789));
    set_times(&root.join("short-link"), (1_000_000_000, 1));
    set_times(&root.join("empty"), (1_500_000_000, 999_999_999));
}

fn xattrs(p: &Path) -> Vec<String> {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    let mut buf = vec![0u8; 65536];
    // SAFETY: valid path and buffer.
    let n = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n <= 0 {
        return Vec::new();
    }
    buf.truncate(n as usize);
    let mut out: Vec<String> = buf
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
        .map(|name| {
            let nc = CString::new(name).unwrap();
            let mut v = vec![0u8; 65536];
            // SAFETY: as above.
            let m =
                unsafe { libc::lgetxattr(c.as_ptr(), nc.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
            let v = if m >= 0 { &v[..m as usize] } else { &[][..] };
            format!("{}={}", String::from_utf8_lossy(name), hex::encode(v))
        })
        .collect();
    out.sort();
    out
}

/// [`view`] of the test volume as stored, mounted afresh. With the writeback cache the
/// kernel owns a written file's mtime and does not always send it back (a file written and
/// closed keeps, in the backing store, the time its pages were written back, a few ms later:
/// README, "Writes, errors and the writeback cache"); a backup keeps what is stored.
pub(crate) fn view_as_stored(env: &Env) -> BTreeMap<String, String> {
    let m = env.mount(&env.cipher, &env.mnt);
    let v = view(&env.mnt);
    m.unmount();
    v
}

/// Everything a user sees of a mounted tree: per path its type, mode, owner, size, mtime
/// (ns), content hash, target, device number, xattrs (ACLs included), and which paths share
/// an inode.
pub(crate) fn view(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let rmd = fs::metadata(root).unwrap();
    out.insert(
        "(root)".into(),
        format!(
            "mode {:o} owner {}:{} mtime {}.{:09}",
            rmd.mode(),
            rmd.uid(),
            rmd.gid(),
            rmd.mtime(),
            rmd.mtime_nsec()
        ),
    );
    let mut inodes: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let md = fs::symlink_metadata(&p).unwrap();
            let ft = md.file_type();
            let what = if ft.is_dir() {
                stack.push(p.clone());
                "dir".to_string()
            } else if ft.is_symlink() {
                format!("link -> {}", fs::read_link(&p).unwrap().display())
            } else if ft.is_file() {
                inodes.entry(md.ino()).or_default().push(rel.clone());
                format!(
                    "file {}",
                    hex::encode(Sha256::digest(fs::read(&p).unwrap()))
                )
            } else {
                format!("special rdev {}", md.rdev())
            };
            out.insert(
                rel,
                format!(
                    "{what} mode {:o} owner {}:{} size {} mtime {}.{:09} xattrs {:?}",
                    md.mode(),
                    md.uid(),
                    md.gid(),
                    md.size(),
                    md.mtime(),
                    md.mtime_nsec(),
                    xattrs(&p)
                ),
            );
        }
    }
    for (_, mut names) in inodes.into_iter().filter(|(_, n)| n.len() > 1) {
        names.sort();
        out.insert(format!("links of {}", names[0]), names.join(" "));
    }
    out
}

#[track_caller]
pub(crate) fn assert_views(
    got: &BTreeMap<String, String>,
    want: &BTreeMap<String, String>,
    what: &str,
) {
    if got == want {
        return;
    }
    let short = |s: &str| s.chars().take(160).collect::<String>();
    let mut diff = Vec::new();
    for (k, v) in want {
        match got.get(k) {
            None => diff.push(format!("missing {}", short(k))),
            Some(g) if g != v => {
                // Show where they start to differ.
                let at = g
                    .bytes()
                    .zip(v.bytes())
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                let from = g[..at].rfind(' ').unwrap_or(0);
                diff.push(format!(
                    "{}:\n    got  ...{}\n    want ...{}",
                    short(k),
                    short(&g[from..]),
                    short(&v[from..])
                ))
            }
            _ => {}
        }
    }
    for k in got.keys().filter(|k| !want.contains_key(*k)) {
        diff.push(format!("extra {}", short(k)));
    }
    diff.truncate(12);
    panic!("{what}: views differ:\n  {}", diff.join("\n  "));
}

/// Every non-zero 16-byte block of the backing store's file data (headers and metadata files
/// excluded).
fn ciphertext_blocks(cipher: &Path) -> HashSet<[u8; 16]> {
    let mut out = HashSet::new();
    for p in data_files(cipher) {
        let b = fs::read(&p).unwrap();
        for c in b
            .get(data_offset(cipher) as usize..)
            .unwrap_or(&[])
            .chunks_exact(16)
        {
            if c.iter().any(|x| *x != 0) {
                out.insert(c.try_into().unwrap());
            }
        }
    }
    out
}

/// Backing view: relative path -> type and bytes (the header excluded).
pub(crate) fn backing(cipher: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for p in walk(cipher) {
        let rel = p.strip_prefix(cipher).unwrap().display().to_string();
        // The header and the volume lock are each volume's own (neither is backed up).
        if rel == HEADER_NAME || rel == "cmkfs.lock" {
            continue;
        }
        let md = fs::symlink_metadata(&p).unwrap();
        let d = if md.is_file() {
            format!(
                "{} blocks {}",
                hex::encode(Sha256::digest(fs::read(&p).unwrap())),
                md.blocks()
            )
        } else if md.file_type().is_symlink() {
            fs::read_link(&p).unwrap().display().to_string()
        } else {
            String::new()
        };
        out.insert(
            rel,
            format!("{:o} {}:{} {d}", md.mode(), md.uid(), md.gid()),
        );
    }
    out
}

#[test]
fn round_trip_keeps_every_byte_and_metadata_and_new_dek_shares_no_ciphertext_block() {
    let env = Env::new();
    setup(&env);
    let mut rng = StdRng::seed_from_u64(seed("backup round trip"));
    let want = {
        let m = env.mount(&env.cipher, &env.mnt);
        populate(&env.mnt, &mut rng);
        m.unmount();
        view_as_stored(&env)
    };
    let archive = env.root.join("vol.tar");
    let b = json(&env.cmkfs(&[
        "backup".as_ref(),
        env.cipher.as_os_str(),
        archive.as_os_str(),
        "--key".as_ref(),
        "bkey".as_ref(),
        "--json".as_ref(),
    ]));
    assert!(b["key_id"].as_str().unwrap().contains("/keys/bkey/"), "{b}");
    assert_eq!(b["point_in_time"], true);
    assert!(b["totals"]["sparse"].as_u64().unwrap() >= 1, "{b}");
    assert_eq!(
        fs::metadata(&archive).unwrap().mode() & 0o777,
        0o600,
        "the archive is private"
    );
    let bytes = fs::read(&archive).unwrap();
    assert!(
        !bytes.windows(MARKER.len()).any(|w| w == MARKER),
        "the archive contains plaintext"
    );
    assert!(
        !bytes.windows(5).any(|w| w == b"f1\0\0\0"),
        "a plaintext name in the archive"
    );
    // A sparse file is stored as its data extents only (GNU sparse 1.0): the archive is far
    // smaller than the 3 MiB file.
    assert!(
        bytes.len() < 2 << 20,
        "archive of {} bytes: holes were stored",
        bytes.len()
    );
    // A standard tool reads it.
    let list = std::process::Command::new("tar")
        .arg("tvf")
        .arg(&archive)
        .output()
        .unwrap();
    assert!(
        list.status.success(),
        "tar tvf: {}",
        String::from_utf8_lossy(&list.stderr)
    );

    // The volume holds a device node (null-dev): without --allow-devices the restore says
    // so, and nothing is written.
    let r1 = env.root.join("restored");
    let out = restore_to(&env, &archive, &r1, &[]);
    assert!(
        !out.status.success()
            && out.stderr.contains("character device node")
            && out.stderr.contains("(device 1:3, mode 0600, owner 0)")
            && out.stderr.contains("--allow-devices"),
        "{out}"
    );
    assert!(!r1.exists(), "written by a refused restore");
    let beside: Vec<_> = fs::read_dir(&env.root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("cmkfs-restore"))
        .collect();
    assert!(beside.is_empty(), "temp left: {beside:?}");
    // Restore under the set: the same backing bytes (set-id data files, FIFO, sticky and
    // setgid directories, xattrs, ACLs, long names and targets), a header under the set's key.
    let r = json(&restore_to(
        &env,
        &archive,
        &r1,
        &["--allow-devices", "--json"],
    ));
    assert!(r["key_id"].as_str().unwrap().contains("/keys/dkey/"), "{r}");
    assert_eq!(backing(&r1), backing(&env.cipher), "backing trees differ");
    let info = env.info(&r1);
    assert_eq!(info["des"], "d", "{info}");
    assert_eq!(
        info["volume_id"],
        env.info(&env.cipher)["volume_id"],
        "a plain restore is the same volume"
    );
    // Restored again while that copy is live (listed in set d): same DEK, but its own id.
    let r3 = env.root.join("restored-again");
    let r = json(&restore_to(
        &env,
        &archive,
        &r3,
        &["--allow-devices", "--json"],
    ));
    assert_eq!(r["source_live_at"], r1.display().to_string(), "{r}");
    let info3 = env.info(&r3);
    assert_ne!(
        info3["volume_id"], info["volume_id"],
        "two live volumes, one id"
    );
    assert_eq!(r["volume_id"], info3["volume_id"], "{r}");
    assert_eq!(info3["dek_fingerprint"], info["dek_fingerprint"]);
    let mnt2 = env.dir("mnt2");
    let m = env.mount(&r1, &mnt2);
    assert_views(&view(&mnt2), &want, "restored");
    // Sparse regions stay holes.
    let sparse = fs::metadata(mnt2.join("sparse")).unwrap();
    assert_eq!(sparse.len(), 3 << 20);
    m.unmount();
    let blocks_of = |p: &Path| -> u64 {
        data_files(p)
            .iter()
            .map(|f| fs::metadata(f).unwrap())
            .filter(|md| md.len() > 2 << 20)
            .map(|md| md.blocks())
            .sum()
    };
    assert!(
        blocks_of(&r1) < 64,
        "the sparse file's holes were filled: {} blocks",
        blocks_of(&r1)
    );

    // --new-dek: same plaintext, no shared key, no shared ciphertext block.
    let r2 = env.root.join("restored-new-dek");
    let r = json(&restore_to(
        &env,
        &archive,
        &r2,
        &["--new-dek", "--allow-devices", "--json"],
    ));
    assert!(r["new_dek"]["files"].as_u64().unwrap() > 10, "{r}");
    let (h1, h2) = (env.info(&env.cipher), env.info(&r2));
    assert_ne!(h1["dek_fingerprint"], h2["dek_fingerprint"]);
    let raw: serde_json::Value =
        serde_json::from_slice(&fs::read(r2.join(HEADER_NAME)).unwrap()).unwrap();
    assert!(
        raw.get("retiring").is_none(),
        "the archive's DEK is still in the header"
    );
    let old = ciphertext_blocks(&env.cipher);
    let new = ciphertext_blocks(&r2);
    assert!(old.len() > 1000 && new.len() > 1000);
    let shared = old.intersection(&new).count();
    assert_eq!(
        shared, 0,
        "{shared} ciphertext blocks shared with the source"
    );
    assert!(
        blocks_of(&r2) < 64,
        "--new-dek filled the sparse file's holes: {} blocks",
        blocks_of(&r2)
    );
    // Unlinkable (F7): no 16-byte id of the source (volume id, file ids, directory ids, long
    // targets' side-file names), raw or hex, anywhere in the restored store.
    assert_ne!(
        h1["volume_id"], h2["volume_id"],
        "the source's volume id was kept"
    );
    assert_eq!(r["volume_id"], h2["volume_id"], "{r}");
    let ids = source_ids(&env.cipher);
    assert!(ids.len() > 40, "only {} ids found in the source", ids.len());
    // The scan sees them where they are: a plain restore is the source volume again.
    assert!(ids_in(&r1, &ids).len() > 40);
    let found = ids_in(&r2, &ids);
    assert!(
        found.is_empty(),
        "source ids in the restored store:\n{}",
        found.join("\n")
    );
    assert_eq!(r["new_ids"]["long_targets"], 1, "{r}");
    let m = env.mount(&r2, &mnt2);
    assert_views(&view(&mnt2), &want, "restored with a new DEK");
    m.unmount();
}

/// Where any of `ids`, raw or as lowercase hex, is in the tree at `dir` (entry names, symlink
/// targets, file contents): one line per finding.
fn ids_in(dir: &Path, ids: &[[u8; 16]]) -> Vec<String> {
    let hexes: Vec<String> = ids.iter().map(hex::encode).collect();
    // The needles of each length, and which first two bytes they have (a cheap filter before
    // the set: the test binary is not optimized, and a tree holds megabytes).
    /// Needle length, the needles, and the first-two-bytes filter.
    type Needles<'a> = (usize, HashSet<&'a [u8]>, Vec<bool>);
    let sets: Vec<Needles> = [
        ids.iter().map(|i| &i[..]).collect::<Vec<_>>(),
        hexes.iter().map(|h| h.as_bytes()).collect(),
    ]
    .into_iter()
    .map(|needles| {
        let mut first = vec![false; 1 << 16];
        for n in &needles {
            first[usize::from(n[0]) << 8 | usize::from(n[1])] = true;
        }
        (needles[0].len(), needles.into_iter().collect(), first)
    })
    .collect();
    let hit = |b: &[u8]| {
        sets.iter().any(|(len, set, first)| {
            (0..(b.len() + 1).saturating_sub(*len)).any(|k| {
                first[usize::from(b[k]) << 8 | usize::from(b[k + 1])]
                    && set.contains(&b[k..k + len])
            })
        })
    };
    let mut found = Vec::new();
    for p in walk(dir) {
        let md = fs::symlink_metadata(&p).unwrap();
        let mut check = |what: &str, b: &[u8]| {
            if hit(b) {
                found.push(format!("{what} of {}", p.display()));
            }
        };
        check("name", p.file_name().unwrap().as_bytes());
        if md.file_type().is_symlink() {
            check("target", fs::read_link(&p).unwrap().as_os_str().as_bytes());
        } else if md.is_file() {
            check("contents", &fs::read(&p).unwrap());
        }
    }
    found
}

/// Every 16-byte id of a backing store: its volume id, each file's id (header bytes 8..24),
/// each directory's id, each long target's side-file name.
fn source_ids(cipher: &Path) -> Vec<[u8; 16]> {
    let h: serde_json::Value =
        serde_json::from_slice(&fs::read(cipher.join(HEADER_NAME)).unwrap()).unwrap();
    let mut out = vec![hex::decode(h["volume_id"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap()];
    for p in data_files(cipher) {
        let b = fs::read(&p).unwrap();
        if b.len() >= FILE_HEADER_LEN as usize {
            out.push(b[8..24].try_into().unwrap());
        }
    }
    for p in walk(cipher) {
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if name == ".cmkfs.dirid" {
            out.push(fs::read(&p).unwrap().try_into().unwrap());
        } else if let Some(x) = name.strip_prefix(".cmkfs.target.") {
            out.push(hex::decode(x).unwrap().try_into().unwrap());
        }
    }
    out
}

/// Offsets in a tar file: (header offset, type flag, data offset, data length) per block
/// header, in order.
pub(crate) fn tar_members(b: &[u8]) -> Vec<(usize, u8, usize, usize)> {
    let mut out = Vec::new();
    let mut o = 0;
    while o + 512 <= b.len() && b[o..o + 512].iter().any(|x| *x != 0) {
        let size_field = std::str::from_utf8(&b[o + 124..o + 136]).unwrap();
        let size =
            usize::from_str_radix(size_field.trim_matches(|c: char| c == '\0' || c == ' '), 8)
                .unwrap();
        out.push((o, b[o + 156], o + 512, size));
        o += 512 + size.div_ceil(512) * 512;
    }
    out
}

fn fix_checksum(b: &mut [u8], hdr: usize) {
    b[hdr + 148..hdr + 156].fill(b' ');
    let sum: u32 = b[hdr..hdr + 512].iter().map(|x| u32::from(*x)).sum();
    let s = format!("{sum:06o}\0 ");
    b[hdr + 148..hdr + 156].copy_from_slice(s.as_bytes());
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// What a restore left in `dir`: its temp trees (`cmkfs-restore` in the name).
pub(crate) fn restore_temps_in(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .contains("cmkfs-restore")
        })
        .collect()
}

/// Restore of `archive` into a fresh target must fail with one line and leave nothing.
#[track_caller]
fn assert_refused(env: &Env, archive: &Path, what: &str) -> String {
    let target = env.root.join("target");
    let out = restore_to(env, archive, &target, &[]);
    assert!(!out.ok(), "{what}: restore succeeded");
    out.assert_clear_error();
    assert!(!target.exists(), "{what}: the target was created");
    let left = restore_temps_in(&env.root);
    assert!(left.is_empty(), "{what}: left {left:?}");
    let des = fs::read_to_string(env.home.join("des/d.json")).unwrap();
    assert!(
        !des.contains(&*target.to_string_lossy()),
        "{what}: listed in the set"
    );
    out.stderr
}

#[test]
fn tampered_truncated_or_foreign_archives_and_a_disabled_backup_key_are_refused_with_nothing_written(
) {
    let env = Env::new();
    setup(&env);
    {
        let m = env.mount(&env.cipher, &env.mnt);
        fs::create_dir(env.mnt.join("dir")).unwrap();
        fs::write(env.mnt.join("dir/file"), vec![5u8; 10_000]).unwrap();
        symlink("dir/file", env.mnt.join("link")).unwrap();
        setxattr(&env.mnt.join("dir/file"), "user.x", b"value");
        m.unmount();
    }
    let archive = env.root.join("a.tar");
    backup_with_bkey(&env, &archive);
    let good = fs::read(&archive).unwrap();
    let members = tar_members(&good);
    let bad = env.root.join("bad.tar");
    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
    let flip = |at: usize| {
        let mut b = good.clone();
        b[at] ^= 0x01;
        b
    };
    // A byte of each member's data (pax records, key envelope, files, manifest, MAC).
    for (i, &(hdr, t, data, len)) in members.iter().enumerate() {
        if len > 0 {
            let name = String::from_utf8_lossy(&good[hdr..hdr + 100])
                .trim_end_matches('\0')
                .to_string();
            cases.push((
                format!("data of member {i} ({name}, type {})", t as char),
                flip(data + len / 2),
            ));
        }
    }
    // Metadata in tar headers, with the header checksum made right again (so only our digests
    // can tell): a directory's mode, a file's mode, a symlink's ustar target.
    for &(hdr, t, _, _) in &members {
        if (t == b'5' || t == b'0') && good[hdr..].starts_with(b"volume/") {
            let mut b = good.clone();
            b[hdr + 106] ^= 0x01; // a mode digit
            fix_checksum(&mut b, hdr);
            cases.push((format!("mode in the header of type {}", t as char), b));
        }
    }
    // Values inside pax records: an xattr value, a symlink target, a time.
    for key in [&b"SCHILY.xattr.user.cmkfs."[..], b"linkpath=", b"mtime="] {
        let at = find(&good, key).unwrap_or_else(|| panic!("{}", String::from_utf8_lossy(key)));
        let eq = at + good[at..].iter().position(|b| *b == b'=').unwrap();
        let mut b = good.clone();
        b[eq + 3] ^= 0x01;
        cases.push((
            format!("value of pax record {}", String::from_utf8_lossy(key)),
            b,
        ));
    }
    // A path that climbs out (`..`), same length so the pax record stays well formed.
    let mut escape = None;
    let mut from = 0;
    while let Some(at) = find(&good[from..], b" path=volume/") {
        let start = from + at + b" path=".len();
        let end = start + good[start..].iter().position(|b| *b == b'\n').unwrap();
        if end - start > 30 && good[end - 1] != b'/' {
            let mut evil = b"volume/../../../cmkfs-evil-".to_vec();
            evil.resize(end - start, b'A');
            let mut b = good.clone();
            b[start..end].copy_from_slice(&evil);
            escape = Some(b);
            break;
        }
        from = end;
    }
    let escape = escape.expect("a member path to rewrite");
    fs::write(&bad, &escape).unwrap();
    let e = assert_refused(&env, &bad, "a path with ..");
    assert!(e.contains("unsafe path"), "{e}");
    // Header checksum broken (tar itself refuses).
    cases.push(("a header byte".into(), flip(members[1].0 + 3)));
    for cut in [
        100,
        512 * 3,
        good.len() / 2,
        good.len() - 2048,
        good.len() - 1100,
    ] {
        cases.push((format!("truncated at {cut}"), good[..cut].to_vec()));
    }
    // Members dropped: everything after the first file member's data.
    cases.push((
        "trailing members removed".into(),
        good[..members[members.len() - 3].0].to_vec(),
    ));
    for (what, bytes) in &cases {
        fs::write(&bad, bytes).unwrap();
        assert_refused(&env, &bad, what);
    }
    // Another backup's key envelope in front of this one's members (both wrapped by keys the
    // caller may use): the manifest names the first envelope, so the swap is found.
    let other = env.root.join("other.tar");
    env.cmkfs(&[
        "backup".as_ref(),
        env.cipher.as_os_str(),
        other.as_os_str(),
        "--key".as_ref(),
        "dkey".as_ref(),
    ])
    .assert_ok();
    let ob = fs::read(&other).unwrap();
    let om = tar_members(&ob);
    let mut swapped = ob[..om[1].0].to_vec();
    swapped.extend_from_slice(&good[members[1].0..]);
    fs::write(&bad, &swapped).unwrap();
    let e = assert_refused(&env, &bad, "swapped key envelope");
    assert!(e.contains("key envelope") || e.contains("MAC"), "{e}");

    // The backup key disabled: refused, with the reason; enabled again: restored.
    env.cmkfs(&["vault", "key", "update", "bkey", "--disable"])
        .assert_ok();
    let e = assert_refused(&env, &archive, "disabled backup key");
    assert!(e.contains("bkey") && e.contains("disabled"), "{e}");
    env.cmkfs(&["vault", "key", "update", "bkey", "--enable"])
        .assert_ok();
    let target = env.root.join("target");
    restore_to(&env, &archive, &target, &[]).assert_ok();
    // A missing archive: one line that says its OS error once.
    let out = restore_to(
        &env,
        &env.root.join("missing.tar"),
        &env.root.join("t2"),
        &[],
    );
    out.assert_clear_error();
    assert_eq!(out.stderr.matches("os error 2").count(), 1, "{out}");
    // A non-empty target is refused before anything else.
    let out = restore_to(&env, &archive, &target, &[]);
    out.assert_clear_error();
    assert!(out.stderr.contains("not empty"), "{out}");
}

/// A KEK revoked while a backup runs: the archive (a new copy of the DEK under the backup
/// key, made after the revocation) is removed and the backup fails with the reason.
#[test]
fn a_backup_whose_volume_key_is_disabled_before_it_ends_removes_its_archive() {
    let env = Env::new();
    setup(&env);
    let archive = env.root.join("late.tar");
    let gate = env.root.join("gate");
    let mut cmd = env.command(&[
        "backup".as_ref(),
        env.cipher.as_os_str(),
        archive.as_os_str(),
        "--key".as_ref(),
        "bkey".as_ref(),
    ]);
    cmd.env("CMKFS_TEST_BACKUP_PAUSE", &gate)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = cmd.spawn().unwrap();
    let reached = env.root.join("gate.reached");
    let end = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !reached.exists() {
        assert!(
            std::time::Instant::now() < end,
            "the backup never reached its end"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    env.cmkfs(&["vault", "key", "disable", "default"])
        .assert_ok();
    fs::write(&gate, b"").unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("revoked or disabled"), "{stderr}");
    assert!(
        !stderr.contains("   "),
        "one line, no runs of spaces: {stderr}"
    );
    assert!(
        !archive.exists(),
        "the archive made after the revocation is still there"
    );
}

/// Runs `restore ARCHIVE TARGET --des d [extra]` with the debug gate `var`, calls `at_gate`
/// once the restore reached it, then lets it go on; returns its output.
fn restore_across_a_gate(
    env: &Env,
    archive: &Path,
    target: &Path,
    extra: &[&str],
    var: &str,
    at_gate: impl FnOnce(),
) -> std::process::Output {
    let gate = env.root.join(format!("gate-{var}"));
    let cmd = env.command(&restore_args(archive, target, extra));
    run_across_a_gate(cmd, var, &gate, &gate, at_gate)
}

/// A backup key disabled while a restore runs: nothing is published (the mirror of the
/// backup's final check). A set whose key changes (`des update`) while a `--new-dek` restore
/// runs: the restore ends under the set's new key.
#[test]
fn a_restore_ends_under_a_key_changed_meanwhile_and_publishes_nothing_once_its_backup_key_is_disabled(
) {
    let env = Env::new();
    setup(&env);
    {
        let m = env.mount(&env.cipher, &env.mnt);
        fs::create_dir(env.mnt.join("dir")).unwrap();
        fs::write(env.mnt.join("dir/file"), vec![7u8; 20_000]).unwrap();
        m.unmount();
    }
    let archive = env.root.join("a.tar");
    backup_with_bkey(&env, &archive);
    env.cmkfs(&["vault", "key", "create", "dkey2", "--key-size", KEY_SIZE])
        .assert_ok();
    let renewed = env.root.join("renewed");
    let out = restore_across_a_gate(
        &env,
        &archive,
        &renewed,
        &["--new-dek"],
        "CMKFS_TEST_RESTORE_PAUSE_NEW_DEK",
        || {
            env.cmkfs(&["des", "update", "d", "--key", "dkey2"])
                .assert_ok();
        },
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let header = fs::read_to_string(renewed.join("cmkfs.volume.json")).unwrap();
    assert!(header.contains("/keys/dkey2/"), "{header}");
    {
        let m = env.mount(&renewed, &env.mnt);
        assert_eq!(
            fs::read(env.mnt.join("dir/file")).unwrap(),
            vec![7u8; 20_000]
        );
        m.unmount();
    }

    let late = env.root.join("late");
    let out = restore_across_a_gate(
        &env,
        &archive,
        &late,
        &[],
        "CMKFS_TEST_RESTORE_PAUSE",
        || {
            env.cmkfs(&["vault", "key", "disable", "bkey"]).assert_ok();
        },
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("nothing was restored"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(!stderr.contains("   "), "no runs of spaces: {stderr}");
    assert!(
        !late.exists(),
        "a restore was published after its backup key was disabled"
    );
    let left: Vec<PathBuf> = fs::read_dir(&env.root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains("cmkfs-restore"))
        .collect();
    assert!(left.is_empty(), "left {left:?}");
    let des = fs::read_to_string(env.home.join("des/d.json")).unwrap();
    assert!(!des.contains(&*late.to_string_lossy()), "listed in the set");
}

#[test]
fn backup_of_a_mounted_volume_while_a_writer_runs_is_one_point_in_time() {
    let env = Env::new();
    setup(&env);
    let m = env.mount(&env.cipher, &env.mnt);
    // The writer rewrites two files in turn, each whole in one write, with the version
    // number in every byte: a point-in-time view has each file whole, and `b` at most one
    // version behind `a`.
    const SIZE: usize = 1 << 20;
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    // Its own descriptor table: the backups spawned below inherit none of its files (their
    // close at `exec` would write the cached pages back before the freeze, drain or not).
    let writer = {
        let (stop, done, mnt) = (stop.clone(), done.clone(), env.mnt.clone());
        spawn_own_files(move || {
            use std::os::unix::fs::FileExt;
            let fa = fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(mnt.join("a"))
                .unwrap();
            let fb = fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(mnt.join("b"))
                .unwrap();
            let (mut v, mut rounds) = (0u8, 0u64);
            while !stop.load(Ordering::SeqCst) {
                v = v.wrapping_add(1).max(1);
                fa.write_all_at(&vec![v; SIZE], 0).unwrap();
                fb.write_all_at(&vec![v; SIZE], 0).unwrap();
                rounds += 1;
                done.store(rounds, Ordering::SeqCst);
            }
            // The round count, not `v`: `v` wraps, and ended at 1 or 2 in one run of ~128.
            rounds
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    // A mount that cannot freeze (its control socket gone): refused, unless --force, whose
    // archive says it is no point in time.
    let sock = env.control_socket();
    let hidden = sock.with_extension("hidden");
    fs::rename(&sock, &hidden).unwrap();
    let forced = env.root.join("forced.tar");
    let out = env.cmkfs(&[
        "backup".as_ref(),
        env.cipher.as_os_str(),
        forced.as_os_str(),
    ]);
    out.assert_clear_error();
    assert!(out.stderr.contains("--force") && !forced.exists(), "{out}");
    let f = json(&env.cmkfs(&[
        "backup".as_ref(),
        env.cipher.as_os_str(),
        forced.as_os_str(),
        "--force".as_ref(),
        "--json".as_ref(),
    ]));
    assert_eq!(f["point_in_time"], false, "{f}");
    if let Ok(v) = std::env::var("CMKFS_TEST_SHOW_TORN") {
        // Evidence that the writer does tear an unfrozen copy (not asserted: timing).
        let t = env.root.join(format!("torn-{v}"));
        restore_to(&env, &forced, &t, &[]).assert_ok();
        let m2 = env.dir("m-torn");
        let mm = env.mount(&t, &m2);
        let (a, b) = (
            fs::read(m2.join("a")).unwrap(),
            fs::read(m2.join("b")).unwrap(),
        );
        let versions = |d: &[u8]| {
            d.iter()
                .copied()
                .collect::<std::collections::BTreeSet<u8>>()
        };
        eprintln!(
            "unfrozen copy: a holds versions {:?}, b {:?}",
            versions(&a),
            versions(&b)
        );
        mm.unmount();
    }
    fs::rename(&hidden, &sock).unwrap();
    let archive = env.root.join("live.tar");
    let b = json(&env.cmkfs(&[
        "backup".as_ref(),
        env.cipher.as_os_str(),
        archive.as_os_str(),
        "--json".as_ref(),
    ]));
    // A few more rounds after the backup (a loaded machine may need seconds for them).
    let after = done.load(Ordering::SeqCst) + 3;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while done.load(Ordering::SeqCst) < after && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::SeqCst);
    let rounds = writer.join().unwrap();
    assert!(rounds > 2, "the writer did not run: {rounds} rounds");
    assert_eq!(b["point_in_time"], true, "{b}");
    assert!(b["freeze_seconds"].as_f64().is_some(), "{b}");
    m.unmount();

    let target = env.root.join("r");
    restore_to(&env, &archive, &target, &[]).assert_ok();
    let m = env.mount(&target, &env.mnt);
    let a = fs::read(env.mnt.join("a")).unwrap();
    let bb = fs::read(env.mnt.join("b")).unwrap();
    assert_eq!((a.len(), bb.len()), (SIZE, SIZE));
    let whole = |d: &[u8]| d.iter().all(|x| *x == d[0]);
    assert!(
        whole(&a) && whole(&bb),
        "a torn file: a {:?}, b {:?}",
        &a[..4],
        &bb[..4]
    );
    let (va, vb) = (a[0], bb[0]);
    assert!(
        va == vb || va == vb.wrapping_add(1).max(1),
        "a at {va}, b at {vb}: not one point in time"
    );
    m.unmount();
}

#[test]
fn a_double_encrypted_volume_round_trips_under_a_double_set_and_is_refused_by_a_single_one() {
    let env = Env::new();
    env.cmkfs(&["vault", "config", "--purge-protection", "on"])
        .assert_ok();
    for k in ["bkey", "dkey"] {
        env.cmkfs(&["vault", "key", "create", k, "--key-size", KEY_SIZE])
            .assert_ok();
    }
    env.cmkfs(&[
        "des",
        "create",
        "dd",
        "--key",
        "dkey",
        "--encryption-type",
        "EncryptionAtRestWithPlatformAndCustomerKeys",
    ])
    .assert_ok();
    env.cmkfs(&["des", "create", "d", "--key", "dkey"])
        .assert_ok();
    env.init_with(&env.cipher, &["--des", "dd"]);
    let mut rng = StdRng::seed_from_u64(seed("backup double"));
    let want = {
        let m = env.mount(&env.cipher, &env.mnt);
        fs::create_dir(env.mnt.join("d")).unwrap();
        for i in 0..12 {
            let n = rng.gen_range(0..=8200);
            fs::write(env.mnt.join(format!("d/f{i}")), random_bytes(&mut rng, n)).unwrap();
        }
        symlink("d/f1", env.mnt.join("l")).unwrap();
        m.unmount();
        view_as_stored(&env)
    };
    let archive = env.root.join("double.tar");
    backup_with_bkey(&env, &archive);
    let e = assert_refused(&env, &archive, "double archive into a single set");
    assert!(e.contains("double-encrypted"), "{e}");
    for (dir, extra) in [("r", None), ("r-new", Some("--new-dek"))] {
        let target = env.root.join(dir);
        let mut args = vec![
            "restore".as_ref(),
            archive.as_os_str(),
            target.as_os_str(),
            "--des".as_ref(),
            "dd".as_ref(),
        ];
        args.extend(extra.map(std::ffi::OsStr::new));
        env.cmkfs(&args).assert_ok();
        assert!(
            env.info(&target)["platform_key_id"].is_string(),
            "not double-encrypted"
        );
        let m = env.mount(&target, &env.mnt);
        let mut got = view(&env.mnt);
        let mut want = want.clone();
        got.remove("(root)");
        want.remove("(root)");
        assert_views(&got, &want, dir);
        m.unmount();
    }
}
