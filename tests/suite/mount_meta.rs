//! The metadata path's shortcuts (issue 15, docs/PERFORMANCE.md "Session 10"), each through a
//! real mount: "." and ".." of a READDIRPLUS listing sent without attributes, and the first
//! read of a freshly opened file taking its header and data in one system call.
//!
//! One mount per test, `--cache-timeout 0`: the kernel drops a file's pages at every open,
//! so every read below reaches the daemon with nothing of the file cached there either. And
//! a backing file rewritten in place behind an open handle (attack session 17, F1).

use crate::common;

use std::collections::BTreeSet;
use std::ffi::{CStr, CString};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use common::*;
use rand::{Rng, SeedableRng};

/// `(name, d_type, d_ino)` of every entry `readdir(3)` gives, "." and ".." included.
fn raw_listing(dir: &Path) -> Vec<(String, u8, u64)> {
    let c = CString::new(dir.as_os_str().as_bytes()).unwrap();
    let d = unsafe { libc::opendir(c.as_ptr()) };
    assert!(!d.is_null(), "opendir {}", dir.display());
    let mut out = Vec::new();
    loop {
        let e = unsafe { libc::readdir(d) };
        if e.is_null() {
            break;
        }
        let e = unsafe { &*e };
        let name = unsafe { CStr::from_ptr(e.d_name.as_ptr()) };
        out.push((name.to_string_lossy().into_owned(), e.d_type, e.d_ino));
    }
    unsafe { libc::closedir(d) };
    out
}

/// "." and ".." are listed as directories by a READDIRPLUS listing that carries no
/// attributes for them, the same names as a plain directory's, and every path through them
/// still reaches the right inode (the kernel never took those two entries' attributes).
#[test]
fn dot_entries_of_a_listing_with_attributes_list_and_resolve_as_before() {
    let env = Env::new();
    env.init(&env.cipher).assert_ok();
    let m = env.mount_with(&env.cipher, &env.mnt, &["--cache-timeout", "0"]);
    let plain = env.dir("plain");
    for root in [m.path(""), plain.clone()] {
        fs::create_dir_all(root.join("d/sub")).unwrap();
        fs::write(root.join("d/f"), b"x").unwrap();
    }
    let names = |dir: &Path| -> BTreeSet<(String, u8)> {
        raw_listing(dir)
            .into_iter()
            .map(|(n, t, _)| (n, t))
            .collect()
    };
    for rel in ["", "d", "d/sub"] {
        assert_eq!(
            names(&m.path(rel)),
            names(&plain.join(rel)),
            "listing of /{rel}"
        );
    }
    let listed = raw_listing(&m.path("d"));
    for dot in [".", ".."] {
        assert!(
            listed
                .iter()
                .any(|(n, t, _)| n == dot && *t == libc::DT_DIR),
            "{dot} missing or not a directory: {listed:?}"
        );
    }
    let ino = |p: &Path| fs::symlink_metadata(p).unwrap().ino();
    assert_eq!(ino(&m.path("d/.")), ino(&m.path("d")));
    assert_eq!(ino(&m.path("d/..")), ino(&m.path("")));
    assert_eq!(ino(&m.path("d/sub/..")), ino(&m.path("d")));
    assert_eq!(fs::read(m.path("d/sub/../f")).unwrap(), b"x");
    // Listed twice more: the entries with attributes still resolve (lookup counts right).
    for _ in 0..2 {
        for (n, _, _) in raw_listing(&m.path("d")) {
            fs::symlink_metadata(m.path("d").join(&n)).unwrap();
        }
    }
    m.unmount();
}

/// The first read of each fresh open (header not cached: it comes in the same `preadv` as
/// the data when the read starts at 0) returns exactly what a plain file holds, for sizes
/// 0..=8200 and tails of 1..15 bytes past unit boundaries, whatever the first read's offset
/// and length; a backing file whose header is bad or cut short is still refused (EIO) at
/// that first read; and a backing file replaced behind an open handle leaves that handle on
/// the file it opened.
#[test]
fn first_reads_of_fresh_opens_match_a_plain_directory() {
    let env = Env::new();
    env.init(&env.cipher).assert_ok();
    let m = env.mount_with(&env.cipher, &env.mnt, &["--cache-timeout", "0"]);
    let plain = env.dir("plain");
    fs::create_dir_all(&plain).unwrap();
    let seed = seed("mount_meta::first_reads");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut sizes: Vec<usize> = vec![0, 1, 15, 16, 17, 4095, 4096, 4097, 8192, 8200];
    for u in [4096usize, 8192] {
        for t in 1..=15 {
            sizes.push(u + t);
        }
    }
    for _ in 0..40 {
        sizes.push(rng.gen_range(0..=8200));
    }
    for (i, &n) in sizes.iter().enumerate() {
        let data = random_bytes(&mut rng, n);
        fs::write(m.path(format!("f{i}")), &data).unwrap();
        fs::write(plain.join(format!("f{i}")), &data).unwrap();
    }
    for (i, &n) in sizes.iter().enumerate() {
        let (a, b) = (m.path(format!("f{i}")), plain.join(format!("f{i}")));
        // Whole file, from offset 0.
        assert_eq!(
            fs::read(&a).unwrap(),
            fs::read(&b).unwrap(),
            "f{i} ({n} bytes), seed {seed}"
        );
        // A first read of a random length at 0, then one at a random offset (fresh opens).
        let len = rng.gen_range(1..=64);
        let (mut x, mut y) = (vec![0u8; len], vec![0u8; len]);
        let got = File::open(&a).unwrap().read_at(&mut x, 0).unwrap();
        assert_eq!(got, File::open(&b).unwrap().read_at(&mut y, 0).unwrap());
        assert_eq!(x[..got], y[..got], "f{i}: first {len} bytes, seed {seed}");
        let off = rng.gen_range(0..=n as u64 + 16);
        let got = File::open(&a).unwrap().read_at(&mut x, off).unwrap();
        assert_eq!(got, File::open(&b).unwrap().read_at(&mut y, off).unwrap());
        assert_eq!(
            x[..got],
            y[..got],
            "f{i}: {len} bytes at {off}, seed {seed}"
        );
    }

    // A bad header (format version byte) or one cut short: EIO at the first read.
    let off = data_offset(&env.cipher);
    for (name, damage) in [("badver", 0u8), ("cut", 1u8)] {
        fs::write(m.path(name), vec![7u8; 5000]).unwrap();
        let back = backing_of(&env.cipher, &m.path(name));
        let f = OpenOptions::new().write(true).open(&back).unwrap();
        match damage {
            0 => f.write_all_at(&[0x7f], 4).unwrap(),
            _ => f.set_len(20).unwrap(),
        }
        drop(f);
        let e = File::open(m.path(name))
            .and_then(|mut f| f.read(&mut [0u8; 100]))
            .expect_err(name);
        // A length cut inside the header area is no valid size: refused at open or read.
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "{name}: {e}");
    }
    assert!(off == 32 || off == 4096, "data offset {off}");

    // Replaced behind an open handle: the handle keeps reading the file it opened (its
    // header was taken from that file), the name then reaches the new file.
    fs::write(m.path("old"), b"the old contents").unwrap();
    fs::write(m.path("new"), b"the new contents, longer").unwrap();
    let mut h = File::open(m.path("old")).unwrap();
    let mut s = String::new();
    h.read_to_string(&mut s).unwrap();
    assert_eq!(s, "the old contents");
    let (bo, bn) = (
        backing_of(&env.cipher, &m.path("old")),
        backing_of(&env.cipher, &m.path("new")),
    );
    fs::rename(&bn, &bo).unwrap();
    h.seek(SeekFrom::Start(0)).unwrap();
    s.clear();
    h.read_to_string(&mut s).unwrap();
    assert_eq!(s, "the old contents", "open handle after the replace");
    drop(h);
    // The kernel still knows "old" as the old inode: a fresh open by that name is refused
    // (the name holds another inode now) until the name is looked up again.
    let again = fs::read(m.path("old"));
    assert!(
        again
            .as_deref()
            .map_or(true, |b| b == b"the new contents, longer"),
        "{again:?}"
    );
    let mut w = OpenOptions::new().append(true).open(m.path("f0")).unwrap();
    w.write_all(b"!").unwrap();
    drop(w);
    assert_eq!(fs::read(m.path("f0")).unwrap(), b"!");
    m.unmount();
}

/// Attack session 17, F1: a backing file rewritten in place behind the mount (same inode,
/// another file's bytes: another file id in its header, what `rsync --inplace`, a sync
/// client or a restore does) while a handle of it is open. Reads through that handle and
/// through a fresh open return the other file's contents (the kernel may still serve the
/// handle's pages it holds of the old ones), never bytes decrypted under the stale file id;
/// a `pwrite` + `fsync` through the handle is stored under the header on disk, so it reads
/// back after a remount. With the kernel's writeback cache and without.
#[test]
fn a_file_rewritten_in_place_behind_an_open_handle_reads_and_writes_as_the_new_file() {
    let env = Env::new();
    env.init(&env.cipher).assert_ok();
    let seed = seed("mount_meta::rewritten_in_place");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for extra in [&["--no-writeback-cache"][..], &[][..]] {
        let mut args = vec!["--cache-timeout", "0"];
        args.extend_from_slice(extra);
        let m = env.mount_with(&env.cipher, &env.mnt, &args);
        let a = random_bytes(&mut rng, 3 * 4096);
        let b = random_bytes(&mut rng, 3 * 4096);
        fs::write(m.path("A"), &a).unwrap();
        fs::write(m.path("B"), &b).unwrap();
        let (ba, bb) = (
            backing_of(&env.cipher, &m.path("A")),
            backing_of(&env.cipher, &m.path("B")),
        );
        let h = OpenOptions::new()
            .read(true)
            .write(true)
            .open(m.path("A"))
            .unwrap();
        let mut buf = vec![0u8; 10];
        h.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(buf, a[..10]);
        // In place: same inode, B's bytes (its header, its units).
        let f = OpenOptions::new().write(true).open(&ba).unwrap();
        let ino = f.metadata().unwrap().ino();
        f.write_all_at(&fs::read(&bb).unwrap(), 0).unwrap();
        drop(f);
        assert_eq!(fs::metadata(&ba).unwrap().ino(), ino);
        let mut got = vec![0u8; a.len()];
        h.read_exact_at(&mut got, 0).unwrap();
        assert!(
            got == b || got == a,
            "{extra:?}: the open handle read neither file's contents, seed {seed}"
        );
        assert!(
            fs::read(m.path("A")).unwrap() == b,
            "{extra:?}: a fresh open read garbage, seed {seed}"
        );
        let w = random_bytes(&mut rng, 4096);
        h.write_all_at(&w, 4096).unwrap();
        h.sync_all().unwrap();
        drop(h);
        m.unmount();
        let m = env.mount_with(&env.cipher, &env.mnt, &args);
        let mut want = b.clone();
        want[4096..8192].copy_from_slice(&w);
        assert!(
            fs::read(m.path("A")).unwrap() == want,
            "{extra:?}: the acknowledged write does not read back after a remount, seed {seed}"
        );
        m.unmount();
    }
}
