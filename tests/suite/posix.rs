//! POSIX conformance through a real mount (issue 6 items 1-3): extended attributes,
//! fallocate, copy_file_range, SEEK_DATA/SEEK_HOLE, rename flags, O_APPEND / O_TRUNC / O_EXCL,
//! hard links, FIFOs, sticky and setgid directories, timestamps, chmod/chown rules under
//! `default_permissions`, statfs, flock and fcntl locks, unlink and rename while open,
//! readdir while entries change, concurrent writers and appenders, and shared writable mmap.
//!
//! Each test mounts its own volume (see `common` for the hang guards). The expectations are
//! those of a local filesystem (ext4) on Linux; where POSIX or the kernel leaves a choice (a
//! `SEEK_HOLE` that reports no holes, an fallocate mode that is not supported) the test accepts
//! each correct answer and says which one it saw. Syscalls that std does not wrap go through
//! `libc`; failures report the errno seen and the one expected.
//!
//! Tests that act as other users fork a child that switches to that user with `setresuid`
//! and then makes only raw system calls (no allocation after `fork`), returning 0 or the
//! errno as its exit status.

use crate::common;

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use common::sys::*;
use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Two unprivileged users and a group the tests use (they need not exist in /etc/passwd).
const ALICE: u32 = 4101;
const BOB: u32 = 4102;
const STAFF: u32 = 4200;
const OTHERS: u32 = 4201;

/// A mounted fresh volume.
fn setup() -> (Env, Mount) {
    let env = Env::new();
    env.init(&env.cipher);
    let m = env.mount(&env.cipher, &env.mnt);
    (env, m)
}

/// A fresh volume mounted with `--allow-other`, its temp root opened up so that the test's
/// other users can reach the mountpoint.
fn setup_multiuser() -> (Env, Mount) {
    let env = Env::new();
    env.init(&env.cipher);
    fs::set_permissions(&env.root, fs::Permissions::from_mode(0o755)).unwrap();
    let m = env.mount_with(&env.cipher, &env.mnt, &["--allow-other"]);
    fs::set_permissions(&env.mnt, fs::Permissions::from_mode(0o755)).unwrap();
    (env, m)
}

fn file_with(p: &Path, data: &[u8]) {
    write(p, data);
}

fn stat(p: &Path) -> fs::Metadata {
    fs::symlink_metadata(p).unwrap_or_else(|e| panic!("stat {}: {e}", p.display()))
}

// ---------------------------------------------------------------------------------------------
// Extended attributes
// ---------------------------------------------------------------------------------------------

fn setx(p: &Path, name: &str, value: &[u8], flags: i32) -> Result<(), i32> {
    let (c, n) = (cpath(p), CString::new(name).unwrap());
    // SAFETY: valid C strings and a value buffer of the given length.
    sys(unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
    .map(|_| ())
}

fn getx(p: &Path, name: &str) -> Result<Vec<u8>, i32> {
    let (c, n) = (cpath(p), CString::new(name).unwrap());
    // SAFETY: size query with a null buffer, then a read into a buffer of that size.
    let len =
        sys_size(unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), std::ptr::null_mut(), 0) })?;
    let mut buf = vec![0u8; len + 1];
    let got = sys_size(unsafe {
        libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
    })?;
    buf.truncate(got);
    Ok(buf)
}

fn listx(p: &Path) -> Result<Vec<String>, i32> {
    let c = cpath(p);
    // SAFETY: as in getx.
    let len = sys_size(unsafe { libc::llistxattr(c.as_ptr(), std::ptr::null_mut(), 0) })?;
    let mut buf = vec![0u8; len + 1];
    let got =
        sys_size(unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) })?;
    buf.truncate(got);
    let mut names: Vec<String> = buf
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    names.sort();
    Ok(names)
}

fn removex(p: &Path, name: &str) -> Result<(), i32> {
    let (c, n) = (cpath(p), CString::new(name).unwrap());
    // SAFETY: valid C strings.
    sys(unsafe { libc::lremovexattr(c.as_ptr(), n.as_ptr()) }).map(|_| ())
}

/// The `user.` names of a listing (the kernel or a security module may add others).
fn user_names(names: &[String]) -> Vec<String> {
    names
        .iter()
        .filter(|n| n.starts_with("user."))
        .cloned()
        .collect()
}

/// Scans every backing entry's own extended attributes (names and values) for `markers`.
fn find_markers_in_backing_xattrs(dir: &Path, markers: &[&[u8]]) -> Vec<String> {
    let mut found = Vec::new();
    for p in walk(dir) {
        let Ok(names) = listx(&p) else { continue };
        for n in names {
            let value = getx(&p, &n).unwrap_or_default();
            for m in markers {
                let hit = |h: &[u8]| h.windows(m.len()).any(|w| w == *m);
                if hit(n.as_bytes()) || hit(&value) {
                    found.push(format!(
                        "backing xattr {n:?} of {} contains {:?}",
                        p.display(),
                        String::from_utf8_lossy(m)
                    ));
                }
            }
        }
    }
    found
}

#[test]
fn xattr_user_namespace_round_trip() {
    let (env, m) = setup();
    let f = m.path("file");
    file_with(&f, b"contents");
    let d = m.path("dir");
    fs::create_dir(&d).unwrap();
    let tag = unique_hex();
    let name = format!("user.secretname{tag}");
    let value = format!("secretvalue{tag}").into_bytes();
    let big = repeated(format!("bigvalue{tag}").as_bytes(), 3000);

    for target in [&f, &d] {
        let t = target.display().to_string();
        expect_errno(
            &format!("getxattr of a missing name on {t}"),
            getx(target, &name),
            &[libc::ENODATA],
        );
        expect_errno(
            &format!("XATTR_REPLACE of a missing name on {t}"),
            setx(target, &name, &value, libc::XATTR_REPLACE),
            &[libc::ENODATA],
        );
        ok(
            &format!("XATTR_CREATE on {t}"),
            setx(target, &name, &value, libc::XATTR_CREATE),
        );
        expect_errno(
            &format!("XATTR_CREATE of an existing name on {t}"),
            setx(target, &name, b"other", libc::XATTR_CREATE),
            &[libc::EEXIST],
        );
        assert_eq!(ok("getxattr", getx(target, &name)), value, "value on {t}");
        ok(
            "XATTR_REPLACE of an existing name",
            setx(target, &name, b"replaced", libc::XATTR_REPLACE),
        );
        assert_eq!(ok("getxattr", getx(target, &name)), b"replaced");
        ok("set without flags", setx(target, &name, &value, 0));
        ok("an empty value", setx(target, "user.empty", b"", 0));
        assert_eq!(ok("get empty", getx(target, "user.empty")), b"");
        ok("a 3000-byte value", setx(target, "user.big", &big, 0));
        assert_eq!(ok("get big", getx(target, "user.big")), big);

        // A buffer too small for the value is ERANGE, not a truncated value.
        let (c, n) = (cpath(target), CString::new(name.as_str()).unwrap());
        let mut small = [0u8; 4];
        // SAFETY: buffer of the given size.
        let r = sys_size(unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                n.as_ptr(),
                small.as_mut_ptr().cast(),
                small.len(),
            )
        });
        expect_errno("getxattr into a small buffer", r, &[libc::ERANGE]);

        let mut want = vec!["user.big".to_string(), "user.empty".into(), name.clone()];
        want.sort();
        assert_eq!(
            user_names(&ok("listxattr", listx(target))),
            want,
            "names on {t}"
        );
        ok("removexattr", removex(target, "user.empty"));
        expect_errno(
            "removexattr of a removed name",
            removex(target, "user.empty"),
            &[libc::ENODATA],
        );
        expect_errno(
            "getxattr of a removed name",
            getx(target, "user.empty"),
            &[libc::ENODATA],
        );
    }

    // Attributes follow the inode across a rename and a hard link.
    let renamed = m.path("renamed");
    fs::rename(&f, &renamed).unwrap();
    assert_eq!(ok("getxattr after rename", getx(&renamed, &name)), value);
    let link = m.path("link");
    fs::hard_link(&renamed, &link).unwrap();
    assert_eq!(
        ok("getxattr through a hard link", getx(&link, &name)),
        value
    );

    // Nothing of the names or values is in the backing store in plaintext.
    let marker_text = [
        format!("secretname{tag}"),
        format!("secretvalue{tag}"),
        format!("bigvalue{tag}"),
    ];
    let markers: Vec<&[u8]> = marker_text.iter().map(|s| s.as_bytes()).collect();
    let mut leaks = find_markers(&env.cipher, &markers);
    leaks.extend(find_markers_in_backing_xattrs(&env.cipher, &markers));
    assert!(
        leaks.is_empty(),
        "plaintext xattrs in the backing store: {leaks:#?}"
    );

    // They survive a remount.
    m.unmount();
    let m = env.mount(&env.cipher, &env.mnt);
    assert_eq!(
        ok("getxattr after remount", getx(&m.path("renamed"), &name)),
        value
    );
    assert_eq!(
        ok("get big after remount", getx(&m.path("dir"), "user.big")),
        big
    );
    m.unmount();
}

#[test]
fn xattr_other_namespaces_get_sensible_errors() {
    let (_env, m) = setup();
    let f = m.path("file");
    file_with(&f, b"x");
    // No namespace at all, or an unknown system.* name: not supported (as on ext4).
    expect_errno(
        "setxattr without a namespace",
        setx(&f, "noprefix", b"v", 0),
        &[libc::EOPNOTSUPP],
    );
    expect_errno(
        "setxattr system.cmkfs_test",
        setx(&f, "system.cmkfs_test", b"v", 0),
        &[libc::EOPNOTSUPP],
    );
    // trusted.* and security.* (as root) are stored like user.* (issue 12).
    for name in ["trusted.cmkfs_test", "security.cmkfs_test"] {
        ok(name, setx(&f, name, b"v", 0));
        assert_eq!(ok("get back", getx(&f, name)), b"v", "{name}");
    }
    // user.* is for regular files and directories only (the kernel's rule on every fs);
    // trusted.* works on a symlink itself.
    let l = m.path("link");
    std::os::unix::fs::symlink("file", &l).unwrap();
    expect_errno(
        "user.* on a symlink",
        setx(&l, "user.x", b"v", 0),
        &[libc::EPERM],
    );
    let c = cpath(&l);
    let (n, v) = (CString::new("trusted.onlink").unwrap(), b"on the link");
    // SAFETY: valid C strings and buffer.
    ok(
        "lsetxattr trusted.* on a symlink",
        sys(unsafe { libc::lsetxattr(c.as_ptr(), n.as_ptr(), v.as_ptr().cast(), v.len(), 0) }),
    );
    let mut buf = [0u8; 64];
    // SAFETY: valid C strings and buffer.
    let got = ok(
        "lgetxattr trusted.* on a symlink",
        sys_size(unsafe {
            libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
        }),
    );
    assert_eq!(&buf[..got], v);
    expect_errno(
        "the symlink's target has no such attribute",
        getx(&f, "trusted.onlink"),
        &[libc::ENODATA],
    );
    // A name longer than XATTR_NAME_MAX (255) is ERANGE.
    let long = format!("user.{}", "n".repeat(300));
    expect_errno(
        "a 305-byte attribute name",
        setx(&f, &long, b"v", 0),
        &[libc::ERANGE],
    );
    m.unmount();
}

// ---------------------------------------------------------------------------------------------
// fallocate, copy_file_range, SEEK_DATA / SEEK_HOLE
// ---------------------------------------------------------------------------------------------

fn fallocate(f: &File, mode: i32, off: u64, len: u64) -> Result<(), i32> {
    // SAFETY: plain syscall on an open descriptor.
    sys(unsafe { libc::fallocate(f.as_raw_fd(), mode, off as i64, len as i64) }).map(|_| ())
}

fn rw(p: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .unwrap_or_else(|e| panic!("open {}: {e}", p.display()))
}

#[test]
fn fallocate_extends_keeps_size_and_punches_holes() {
    let (env, m) = setup();
    let mut rng = StdRng::seed_from_u64(seed("fallocate"));
    let p = m.path("f");
    let mut model = random_bytes(&mut rng, 3 * SECTOR + 100);
    file_with(&p, &model);
    let f = rw(&p);

    // Mode 0 past the end: the size grows, the new range reads as zeros, the rest is intact.
    ok(
        "fallocate(0) past EOF",
        fallocate(&f, 0, 2 * SECTOR as u64, 4 * SECTOR as u64 + 7),
    );
    model.resize(6 * SECTOR + 7, 0);
    assert_eq!(
        stat(&p).len(),
        model.len() as u64,
        "size after fallocate(0)"
    );
    assert_bytes_eq("after fallocate(0)", &read(&p), &model);
    // Mode 0 inside the file changes nothing visible.
    ok("fallocate(0) inside", fallocate(&f, 0, 10, 100));
    assert_bytes_eq("after fallocate(0) inside", &read(&p), &model);

    // KEEP_SIZE past the end: the size stays.
    ok(
        "fallocate(KEEP_SIZE)",
        fallocate(
            &f,
            libc::FALLOC_FL_KEEP_SIZE,
            model.len() as u64,
            8 * SECTOR as u64,
        ),
    );
    assert_eq!(stat(&p).len(), model.len() as u64, "size after KEEP_SIZE");
    assert_bytes_eq("after KEEP_SIZE", &read(&p), &model);
    // Writing at the end afterwards still works and reads back.
    let tail = random_bytes(&mut rng, 5000);
    f.write_all_at(&tail, model.len() as u64).unwrap();
    model.extend_from_slice(&tail);
    assert_bytes_eq("append after KEEP_SIZE", &read(&p), &model);

    // PUNCH_HOLE (with KEEP_SIZE, as the kernel requires): zeros, size unchanged. Aligned,
    // unaligned, and crossing sector boundaries.
    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    for (off, len) in [
        (SECTOR, SECTOR),
        (100, 50),
        (SECTOR - 10, 30),
        (3 * SECTOR + 1, 2 * SECTOR + 5),
        (model.len() - 3, 100),
    ] {
        ok(
            &format!("PUNCH_HOLE {off}+{len}"),
            fallocate(&f, punch, off as u64, len as u64),
        );
        let end = (off + len).min(model.len());
        model[off..end].fill(0);
        assert_eq!(
            stat(&p).len(),
            model.len() as u64,
            "size after punching {off}+{len}"
        );
        assert_bytes_eq(&format!("after punching {off}+{len}"), &read(&p), &model);
    }
    // PUNCH_HOLE without KEEP_SIZE is invalid on every Linux filesystem.
    expect_errno(
        "PUNCH_HOLE without KEEP_SIZE",
        fallocate(&f, libc::FALLOC_FL_PUNCH_HOLE, 0, 10),
        &[libc::EOPNOTSUPP, libc::EINVAL],
    );
    // Modes that would move data are not supported.
    for (mode, what) in [
        (libc::FALLOC_FL_COLLAPSE_RANGE, "COLLAPSE_RANGE"),
        (libc::FALLOC_FL_INSERT_RANGE, "INSERT_RANGE"),
    ] {
        expect_errno(
            what,
            fallocate(&f, mode, 0, SECTOR as u64),
            &[libc::EOPNOTSUPP],
        );
    }
    // ZERO_RANGE: either correct or unsupported.
    match fallocate(&f, libc::FALLOC_FL_ZERO_RANGE, 7, 9000) {
        Ok(()) => {
            model[7..9007].fill(0);
            assert_bytes_eq("after ZERO_RANGE", &read(&p), &model);
        }
        Err(e) => expect_errno("ZERO_RANGE", Err::<(), i32>(e), &[libc::EOPNOTSUPP]),
    }
    drop(f);
    // And it all survives a remount.
    m.unmount();
    let m = env.mount(&env.cipher, &env.mnt);
    assert_bytes_eq("after remount", &read(&m.path("f")), &model);
    m.unmount();
}

fn copy_range(src: &File, off_in: u64, dst: &File, off_out: u64, len: usize) -> Result<usize, i32> {
    let (mut i, mut o) = (off_in as i64, off_out as i64);
    let mut done = 0;
    while done < len {
        // SAFETY: valid descriptors and offset pointers.
        let n = sys_size(unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut i,
                dst.as_raw_fd(),
                &mut o,
                len - done,
                0,
            )
        })?;
        if n == 0 {
            break;
        }
        done += n;
    }
    Ok(done)
}

#[test]
fn copy_file_range_copies_bytes() {
    let (env, m) = setup();
    let mut rng = StdRng::seed_from_u64(seed("copy_file_range"));
    let src_data = random_bytes(&mut rng, 5 * SECTOR + 123);
    let a = m.path("a");
    file_with(&a, &src_data);
    let b = m.path("b");
    let mut want = random_bytes(&mut rng, 2 * SECTOR + 1);
    file_with(&b, &want);
    let (fa, fb) = (File::open(&a).unwrap(), rw(&b));

    // Unaligned source and destination, crossing sectors, growing the destination.
    let n = ok(
        "copy_file_range",
        copy_range(&fa, 1000, &fb, 3000, 3 * SECTOR),
    );
    assert_eq!(n, 3 * SECTOR);
    want.resize(3000 + 3 * SECTOR, 0);
    want[3000..3000 + 3 * SECTOR].copy_from_slice(&src_data[1000..1000 + 3 * SECTOR]);
    assert_bytes_eq("after copy_file_range", &read(&b), &want);
    // Past the source's end it copies what there is.
    let n = ok(
        "copy past EOF",
        copy_range(&fa, src_data.len() as u64 - 10, &fb, 0, 1000),
    );
    assert_eq!(n, 10);
    want[..10].copy_from_slice(&src_data[src_data.len() - 10..]);
    assert_bytes_eq("after copying the tail", &read(&b), &want);
    // Within one file (non-overlapping ranges).
    let fa_rw = rw(&a);
    let mut a_want = src_data.clone();
    let n = ok(
        "copy within a file",
        copy_range(&fa_rw, 0, &fa_rw, 4 * SECTOR as u64, 100),
    );
    assert_eq!(n, 100);
    a_want.copy_within(0..100, 4 * SECTOR);
    assert_bytes_eq("after copying within a file", &read(&a), &a_want);
    drop((fa, fb, fa_rw));
    m.unmount();
    let m = env.mount(&env.cipher, &env.mnt);
    assert_bytes_eq("b after remount", &read(&m.path("b")), &want);
    m.unmount();
}

fn lseek(f: &File, off: u64, whence: i32) -> Result<u64, i32> {
    // SAFETY: plain syscall on an open descriptor.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off as i64, whence) };
    if r < 0 {
        Err(errno())
    } else {
        Ok(r as u64)
    }
}

#[test]
fn lseek_data_and_hole_are_correct_or_the_whole_file_is_data() {
    let (_env, m) = setup();
    let p = m.path("sparse");
    // data [0, 8K) | hole [8K, 1M) | data [1M, 1M+5000)
    let size = (1 << 20) + 5000;
    let mut model = vec![0u8; size];
    model[..2 * SECTOR].fill(0xaa);
    model[1 << 20..].fill(0xbb);
    {
        let f = File::create(&p).unwrap();
        f.write_all_at(&model[..2 * SECTOR], 0).unwrap();
        f.write_all_at(&model[1 << 20..], 1 << 20).unwrap();
    }
    assert_bytes_eq("sparse file", &read(&p), &model);
    let f = File::open(&p).unwrap();
    let mut saw_hole = false;
    for off in [
        0u64,
        100,
        8191,
        8192,
        9000,
        500_000,
        (1 << 20) - 1,
        1 << 20,
        size as u64 - 1,
    ] {
        let d = ok(
            &format!("SEEK_DATA from {off}"),
            lseek(&f, off, libc::SEEK_DATA),
        );
        assert!(
            d >= off && d < size as u64,
            "SEEK_DATA from {off} gave {d} (size {size})"
        );
        // Everything skipped must be a hole (zeros).
        assert!(
            model[off as usize..d as usize].iter().all(|b| *b == 0),
            "SEEK_DATA from {off} skipped data (to {d})"
        );
        let h = ok(
            &format!("SEEK_HOLE from {off}"),
            lseek(&f, off, libc::SEEK_HOLE),
        );
        assert!(
            h >= off && h <= size as u64,
            "SEEK_HOLE from {off} gave {h} (size {size})"
        );
        if h < size as u64 {
            saw_hole = true;
            assert_eq!(
                model[h as usize], 0,
                "SEEK_HOLE from {off} gave {h}, which holds data"
            );
        }
    }
    // At or past the end: ENXIO for both.
    expect_errno(
        "SEEK_DATA at EOF",
        lseek(&f, size as u64, libc::SEEK_DATA),
        &[libc::ENXIO],
    );
    expect_errno(
        "SEEK_HOLE past EOF",
        lseek(&f, size as u64 + 1, libc::SEEK_HOLE),
        &[libc::ENXIO],
    );
    eprintln!(
        "SEEK_HOLE {}",
        if saw_hole {
            "reports the hole"
        } else {
            "reports the whole file as data (the kernel's fallback)"
        }
    );
    drop(f);
    m.unmount();
}

// ---------------------------------------------------------------------------------------------
// rename flags, O_APPEND, O_TRUNC, O_EXCL
// ---------------------------------------------------------------------------------------------

fn renameat2(a: &Path, b: &Path, flags: u32) -> Result<(), i32> {
    let (ca, cb) = (cpath(a), cpath(b));
    // SAFETY: valid C paths.
    sys(unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            flags,
        )
    })
    .map(|_| ())
}

#[test]
fn rename_noreplace_and_exchange() {
    let (env, m) = setup();
    let long_a = "a".repeat(200);
    let long_b = "b".repeat(220);
    fs::create_dir(m.path("d")).unwrap();
    for (x, y) in [
        ("x".to_string(), "y".to_string()),
        (long_a.clone(), long_b.clone()),
        ("short".to_string(), format!("d/{long_b}")),
    ] {
        let (px, py) = (m.path(&x), m.path(&y));
        file_with(&px, format!("content of {x}").as_bytes());
        file_with(&py, format!("content of {y}").as_bytes());
        expect_errno(
            "RENAME_NOREPLACE onto an existing name",
            renameat2(&px, &py, libc::RENAME_NOREPLACE),
            &[libc::EEXIST],
        );
        assert_eq!(
            read(&px),
            format!("content of {x}").as_bytes(),
            "source untouched"
        );
        ok(
            "RENAME_EXCHANGE",
            renameat2(&px, &py, libc::RENAME_EXCHANGE),
        );
        assert_eq!(
            read(&px),
            format!("content of {y}").as_bytes(),
            "{x} after exchange"
        );
        assert_eq!(
            read(&py),
            format!("content of {x}").as_bytes(),
            "{y} after exchange"
        );
        let fresh = m.path(format!("{x}-new"));
        ok(
            "RENAME_NOREPLACE onto a new name",
            renameat2(&px, &fresh, libc::RENAME_NOREPLACE),
        );
        assert!(!px.exists() && fresh.exists());
        expect_errno(
            "RENAME_EXCHANGE with a missing name",
            renameat2(&fresh, &px, libc::RENAME_EXCHANGE),
            &[libc::ENOENT],
        );
    }
    // A file and a directory can trade places.
    let (f, d) = (m.path("file"), m.path("dir"));
    file_with(&f, b"file");
    fs::create_dir(&d).unwrap();
    file_with(&d.join("inner"), b"inner");
    ok(
        "RENAME_EXCHANGE file <-> dir",
        renameat2(&f, &d, libc::RENAME_EXCHANGE),
    );
    assert!(stat(&f).is_dir() && stat(&d).is_file());
    assert_eq!(read(&f.join("inner")), b"inner");
    assert_eq!(read(&d), b"file");
    m.unmount();
    // Names and side files are consistent after all that.
    let m = env.mount(&env.cipher, &env.mnt);
    assert_eq!(
        read(&m.path(format!("{long_a}-new"))),
        format!("content of {long_b}").as_bytes()
    );
    assert_eq!(
        read(&m.path(&long_b)),
        format!("content of {long_a}").as_bytes()
    );
    assert_eq!(read(&m.path("file/inner")), b"inner");
    m.unmount();
    let out = env.cmkfs(&[
        std::ffi::OsStr::new("fsck"),
        env.cipher.as_os_str(),
        std::ffi::OsStr::new("--json"),
    ]);
    assert_eq!(out.status.code(), Some(0), "fsck after renames:\n{out}");
}

#[test]
fn o_append_from_two_descriptors() {
    let (_env, m) = setup();
    let p = m.path("log");
    file_with(&p, b"start\n");
    let open_append = || {
        OpenOptions::new()
            .append(true)
            .open(&p)
            .unwrap_or_else(|e| panic!("open O_APPEND: {e}"))
    };
    let (mut a, mut b) = (open_append(), open_append());
    let mut want = b"start\n".to_vec();
    for i in 0..200 {
        let (f, who) = if i % 3 == 0 {
            (&mut a, "a")
        } else {
            (&mut b, "b")
        };
        // Vary lengths so appends straddle sector boundaries.
        let line = format!("{who}{i}:{}\n", "z".repeat(i * 37 % 5000));
        f.write_all(line.as_bytes()).unwrap();
        want.extend_from_slice(line.as_bytes());
    }
    drop((a, b));
    assert_bytes_eq("O_APPEND log", &read(&p), &want);
    m.unmount();
}

#[test]
fn o_trunc_and_o_excl() {
    let (_env, m) = setup();
    let p = m.path("f");
    file_with(&p, &repeated(b"old", 3 * SECTOR));
    // O_EXCL on an existing name: EEXIST, contents untouched.
    let r = OpenOptions::new().write(true).create_new(true).open(&p);
    expect_errno(
        "O_CREAT|O_EXCL on an existing file",
        r.map(|_| ()).map_err(|e| e.raw_os_error().unwrap_or(0)),
        &[libc::EEXIST],
    );
    assert_eq!(stat(&p).len(), 3 * SECTOR as u64);
    // O_TRUNC empties it; new contents replace the old completely.
    {
        let mut f = OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        assert_eq!(f.metadata().unwrap().len(), 0, "size right after O_TRUNC");
        f.write_all(b"new").unwrap();
    }
    assert_eq!(read(&p), b"new");
    let q = m.path("g");
    ok(
        "O_CREAT|O_EXCL on a new name",
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&q)
            .map(|_| ())
            .map_err(|e| e.raw_os_error().unwrap_or(0)),
    );
    // O_EXCL on a dangling symlink: EEXIST (the symlink itself exists).
    let l = m.path("dangling");
    std::os::unix::fs::symlink("nowhere", &l).unwrap();
    let r = OpenOptions::new().write(true).create_new(true).open(&l);
    expect_errno(
        "O_CREAT|O_EXCL on a dangling symlink",
        r.map(|_| ()).map_err(|e| e.raw_os_error().unwrap_or(0)),
        &[libc::EEXIST],
    );
    m.unmount();
}

// ---------------------------------------------------------------------------------------------
// Hard links, FIFOs
// ---------------------------------------------------------------------------------------------

#[test]
fn hard_links_share_inode_and_count_links() {
    let (env, m) = setup();
    let a = m.path("a");
    file_with(&a, b"shared contents");
    fs::create_dir(m.path("sub")).unwrap();
    let b = m.path("sub/b");
    let c = m.path("c".repeat(200)); // a long name
    fs::hard_link(&a, &b).unwrap();
    fs::hard_link(&b, &c).unwrap();
    let ino = stat(&a).ino();
    for p in [&a, &b, &c] {
        let md = stat(p);
        assert_eq!(md.ino(), ino, "inode number of {}", p.display());
        assert_eq!(md.nlink(), 3, "nlink of {}", p.display());
    }
    // A write through one name shows through the others.
    OpenOptions::new()
        .write(true)
        .open(&b)
        .unwrap()
        .write_all_at(b"SHARED", 0)
        .unwrap();
    assert_eq!(read(&c), b"SHARED contents");
    // Unlinking counts down and the rest survive.
    fs::remove_file(&a).unwrap();
    assert_eq!(stat(&b).nlink(), 2);
    assert_eq!(stat(&c).nlink(), 2);
    assert_eq!(read(&b), b"SHARED contents");
    m.unmount();
    let m = env.mount(&env.cipher, &env.mnt);
    let (b, c) = (m.path("sub/b"), m.path("c".repeat(200)));
    assert_eq!(stat(&b).ino(), stat(&c).ino(), "same inode after remount");
    assert_eq!(stat(&b).nlink(), 2);
    fs::remove_file(&c).unwrap();
    assert_eq!(stat(&b).nlink(), 1);
    assert_eq!(read(&b), b"SHARED contents");
    // Linking to a directory is refused.
    fs::create_dir(m.path("dir")).unwrap();
    expect_errno(
        "link to a directory",
        fs::hard_link(m.path("dir"), m.path("dirlink")).map_err(|e| e.raw_os_error().unwrap_or(0)),
        &[libc::EPERM],
    );
    m.unmount();
}

#[test]
fn fifos_pass_data_and_survive_remount() {
    let (env, m) = setup();
    let p = m.path("pipe");
    let c = cpath(&p);
    // SAFETY: valid C path.
    ok("mkfifo", sys(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }));
    assert!(stat(&p).file_type().is_fifo());
    // Reader (non-blocking open), then writer, then data through the pipe.
    let mut reader = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&p)
        .unwrap();
    let mut writer = OpenOptions::new().write(true).open(&p).unwrap();
    writer.write_all(b"through the fifo").unwrap();
    drop(writer);
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < 16 && Instant::now() < deadline {
        let mut buf = [0u8; 64];
        match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("read fifo: {e}"),
        }
    }
    assert_eq!(got, b"through the fifo");
    drop(reader);
    m.unmount();
    let m = env.mount(&env.cipher, &env.mnt);
    assert!(stat(&m.path("pipe")).file_type().is_fifo(), "still a fifo");
    fs::remove_file(m.path("pipe")).unwrap();
    m.unmount();
}

// ---------------------------------------------------------------------------------------------
// Sticky and setgid directories, chmod / chown rules, timestamps
// ---------------------------------------------------------------------------------------------

#[test]
fn sticky_directory_protects_other_users_files() {
    let (_env, m) = setup_multiuser();
    let d = m.path("tmp");
    fs::create_dir(&d).unwrap();
    fs::set_permissions(&d, fs::Permissions::from_mode(0o1777)).unwrap();
    assert_eq!(stat(&d).mode() & 0o7777, 0o1777, "sticky bit kept");
    let alices = cpath(&d.join("alices"));
    let bobs_target = cpath(&d.join("bobs"));
    let r = as_user(ALICE, ALICE, &[], || {
        // SAFETY: raw syscalls on prepared C strings.
        unsafe {
            let fd = libc::open(alices.as_ptr(), libc::O_CREAT | libc::O_WRONLY, 0o666);
            if fd < 0 {
                return errno();
            }
            libc::close(fd);
        }
        0
    });
    assert_eq!(r, 0, "alice creates a file in the sticky dir: {}", ename(r));
    assert_eq!(stat(&d.join("alices")).uid(), ALICE, "owned by alice");
    let r = as_user(BOB, BOB, &[], || {
        rc(unsafe { libc::unlink(alices.as_ptr()) })
    });
    assert!(
        r == libc::EPERM || r == libc::EACCES,
        "bob unlinks alice's file in a sticky dir: got {}, expected EPERM",
        ename(r)
    );
    let r = as_user(BOB, BOB, &[], || {
        // SAFETY: raw syscalls on prepared C strings.
        unsafe {
            let fd = libc::open(bobs_target.as_ptr(), libc::O_CREAT | libc::O_WRONLY, 0o666);
            if fd < 0 {
                return errno();
            }
            libc::close(fd);
            rc(libc::rename(bobs_target.as_ptr(), alices.as_ptr()))
        }
    });
    assert!(
        r == libc::EPERM || r == libc::EACCES,
        "bob renames over alice's file in a sticky dir: got {}, expected EPERM",
        ename(r)
    );
    assert!(d.join("alices").exists(), "alice's file survived");
    let r = as_user(ALICE, ALICE, &[], || {
        rc(unsafe { libc::unlink(alices.as_ptr()) })
    });
    assert_eq!(r, 0, "alice removes her own file: {}", ename(r));
    m.unmount();
}

#[test]
fn setgid_directory_passes_its_group_on() {
    let (_env, m) = setup_multiuser();
    let d = m.path("shared");
    fs::create_dir(&d).unwrap();
    std::os::unix::fs::chown(&d, None, Some(STAFF)).unwrap();
    fs::set_permissions(&d, fs::Permissions::from_mode(0o2777)).unwrap();
    assert_eq!(
        stat(&d).mode() & 0o7777,
        0o2777,
        "setgid bit kept on the directory"
    );
    // Root creates a file and a directory.
    file_with(&d.join("by-root"), b"x");
    fs::create_dir(d.join("subdir-root")).unwrap();
    assert_eq!(
        stat(&d.join("by-root")).gid(),
        STAFF,
        "file group inherited"
    );
    let sub = stat(&d.join("subdir-root"));
    assert_eq!(sub.gid(), STAFF, "directory group inherited");
    assert_ne!(
        sub.mode() & libc::S_ISGID,
        0,
        "a new directory in a setgid directory is setgid too (mode {:o})",
        sub.mode() & 0o7777
    );
    // Another user (not in the group) creates a file, a dir, a symlink and a fifo.
    let (f, sd, sl, ff) = (
        cpath(&d.join("by-alice")),
        cpath(&d.join("subdir-alice")),
        cpath(&d.join("link-alice")),
        cpath(&d.join("fifo-alice")),
    );
    let target = CString::new("by-alice").unwrap();
    let r = as_user(ALICE, ALICE, &[], || unsafe {
        let fd = libc::open(f.as_ptr(), libc::O_CREAT | libc::O_WRONLY, 0o644);
        if fd < 0 {
            return errno();
        }
        libc::close(fd);
        if libc::mkdir(sd.as_ptr(), 0o755) != 0
            || libc::symlink(target.as_ptr(), sl.as_ptr()) != 0
            || libc::mkfifo(ff.as_ptr(), 0o644) != 0
        {
            return errno();
        }
        0
    });
    assert_eq!(r, 0, "alice creates entries: {}", ename(r));
    for name in ["by-alice", "subdir-alice", "link-alice", "fifo-alice"] {
        let md = stat(&d.join(name));
        assert_eq!(md.uid(), ALICE, "{name} owned by alice");
        assert_eq!(md.gid(), STAFF, "{name} has the directory's group");
    }
    assert_ne!(
        stat(&d.join("subdir-alice")).mode() & libc::S_ISGID,
        0,
        "alice's subdir is setgid"
    );
    m.unmount();
}

#[test]
fn chmod_and_chown_follow_the_kernel_rules() {
    let (_env, m) = setup_multiuser();
    let d = m.path("d");
    fs::create_dir(&d).unwrap();
    fs::set_permissions(&d, fs::Permissions::from_mode(0o777)).unwrap();
    let roots = d.join("roots");
    file_with(&roots, b"root's");
    fs::set_permissions(&roots, fs::Permissions::from_mode(0o666)).unwrap();
    let (cr, ca) = (cpath(&roots), cpath(&d.join("alices")));
    // A non-owner may not chmod or chown, even with write permission.
    let r = as_user(ALICE, ALICE, &[], || {
        rc(unsafe { libc::chmod(cr.as_ptr(), 0o777) })
    });
    assert_eq!(
        r,
        libc::EPERM,
        "non-owner chmod: got {}, expected EPERM",
        ename(r)
    );
    let r = as_user(ALICE, ALICE, &[], || {
        rc(unsafe { libc::chown(cr.as_ptr(), ALICE, ALICE) })
    });
    assert_eq!(
        r,
        libc::EPERM,
        "non-owner chown: got {}, expected EPERM",
        ename(r)
    );
    assert_eq!(stat(&roots).mode() & 0o7777, 0o666, "mode unchanged");
    // The owner may chmod; may not give the file away; may chgrp only to own groups.
    let r = as_user(ALICE, ALICE, &[STAFF], || unsafe {
        let fd = libc::open(ca.as_ptr(), libc::O_CREAT | libc::O_WRONLY, 0o600);
        if fd < 0 {
            return errno();
        }
        libc::close(fd);
        rc(libc::chmod(ca.as_ptr(), 0o640))
    });
    assert_eq!(r, 0, "owner chmod: {}", ename(r));
    assert_eq!(stat(&d.join("alices")).mode() & 0o7777, 0o640);
    let r = as_user(ALICE, ALICE, &[STAFF], || {
        rc(unsafe { libc::chown(ca.as_ptr(), BOB, u32::MAX) })
    });
    assert_eq!(
        r,
        libc::EPERM,
        "owner gives the file away: got {}, expected EPERM",
        ename(r)
    );
    let r = as_user(ALICE, ALICE, &[STAFF], || {
        rc(unsafe { libc::chown(ca.as_ptr(), u32::MAX, OTHERS) })
    });
    assert_eq!(
        r,
        libc::EPERM,
        "chgrp to a foreign group: got {}, expected EPERM",
        ename(r)
    );
    let r = as_user(ALICE, ALICE, &[STAFF], || {
        rc(unsafe { libc::chown(ca.as_ptr(), u32::MAX, STAFF) })
    });
    assert_eq!(r, 0, "chgrp to an own group: {}", ename(r));
    assert_eq!(stat(&d.join("alices")).gid(), STAFF);
    // Setting the setgid bit on a file of a group one is not in: the bit is dropped (Linux).
    let r = as_user(ALICE, ALICE, &[], || {
        rc(unsafe { libc::chmod(ca.as_ptr(), 0o2755) })
    });
    assert_eq!(r, 0, "chmod g+s as a non-member: {}", ename(r));
    assert_eq!(
        stat(&d.join("alices")).mode() & libc::S_ISGID,
        0,
        "setgid bit set by a non-member of the file's group"
    );
    // Root may do all of it.
    std::os::unix::fs::chown(&roots, Some(BOB), Some(OTHERS)).unwrap();
    assert_eq!((stat(&roots).uid(), stat(&roots).gid()), (BOB, OTHERS));
    fs::set_permissions(&roots, fs::Permissions::from_mode(0o4755)).unwrap();
    assert_eq!(stat(&roots).mode() & 0o7777, 0o4755);
    // A write by someone else clears setuid (the kernel's rule; needs write permission).
    fs::set_permissions(&roots, fs::Permissions::from_mode(0o4777)).unwrap();
    let r = as_user(ALICE, ALICE, &[], || unsafe {
        let fd = libc::open(cr.as_ptr(), libc::O_WRONLY);
        if fd < 0 {
            return errno();
        }
        let n = libc::write(fd, b"x".as_ptr().cast(), 1);
        libc::close(fd);
        if n != 1 {
            return errno();
        }
        0
    });
    assert_eq!(r, 0, "alice writes the world-writable file: {}", ename(r));
    assert_eq!(
        stat(&roots).mode() & libc::S_ISUID,
        0,
        "setuid bit survived a write by another user (mode {:o})",
        stat(&roots).mode() & 0o7777
    );
    m.unmount();
}

fn set_times(p: &Path, atime: (i64, i64), mtime: (i64, i64)) -> Result<(), i32> {
    let ts = [
        libc::timespec {
            tv_sec: atime.0,
            tv_nsec: atime.1,
        },
        libc::timespec {
            tv_sec: mtime.0,
            tv_nsec: mtime.1,
        },
    ];
    let c = cpath(p);
    // SAFETY: valid path and a two-element timespec array.
    sys(unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(|_| ())
}

#[test]
fn timestamps_keep_nanoseconds_and_go_beyond_2038() {
    let (env, m) = setup();
    let f = m.path("f");
    file_with(&f, b"x");
    fs::create_dir(m.path("d")).unwrap();
    std::os::unix::fs::symlink("f", m.path("l")).unwrap();
    // 2100-01-01 and just past the 32-bit limit, with odd nanoseconds.
    let cases = [
        ((1_700_000_000, 123_456_789), (4_102_444_800, 987_654_321)),
        (((1i64 << 31) + 5, 1), ((1i64 << 32) + 17, 999_999_999)),
        ((0, 0), (1, 500_000_000)),
    ];
    for name in ["f", "d", "l"] {
        let p = m.path(name);
        for (at, mt) in cases {
            ok(&format!("utimensat {name}"), set_times(&p, at, mt));
            let md = stat(&p);
            assert_eq!((md.atime(), md.atime_nsec()), at, "atime of {name}");
            assert_eq!((md.mtime(), md.mtime_nsec()), mt, "mtime of {name}");
        }
    }
    // Through an open descriptor too.
    let file = rw(&f);
    let ts = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: 5_000_000_000,
            tv_nsec: 42,
        },
    ];
    // SAFETY: valid descriptor and timespec array.
    ok(
        "futimens",
        sys(unsafe { libc::futimens(file.as_raw_fd(), ts.as_ptr()) }),
    );
    let md = stat(&f);
    assert_eq!((md.mtime(), md.mtime_nsec()), (5_000_000_000, 42));
    assert_eq!(
        (md.atime(), md.atime_nsec()),
        cases[2].0,
        "UTIME_OMIT left atime alone"
    );
    drop(file);
    // A write moves mtime forward to about now.
    set_times(&f, (1, 0), (1, 0)).unwrap();
    OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .write_all(b"y")
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let mt = stat(&f).mtime();
    assert!(
        (mt - now).abs() < 3600,
        "mtime after a write is {mt}, now is {now}"
    );
    set_times(&f, cases[0].0, cases[0].1).unwrap();
    m.unmount();
    let m = env.mount(&env.cipher, &env.mnt);
    let md = stat(&m.path("f"));
    assert_eq!(
        (md.mtime(), md.mtime_nsec()),
        cases[0].1,
        "mtime after remount"
    );
    let md = stat(&m.path("d"));
    assert_eq!(
        (md.mtime(), md.mtime_nsec()),
        cases[2].1,
        "dir mtime after remount"
    );
    m.unmount();
}

// ---------------------------------------------------------------------------------------------
// statfs, locks
// ---------------------------------------------------------------------------------------------

fn statvfs(p: &Path) -> libc::statvfs {
    let c = cpath(p);
    // SAFETY: zeroed statvfs is a valid out-parameter.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    ok(
        "statvfs",
        sys(unsafe { libc::statvfs(c.as_ptr(), &mut st) }),
    );
    st
}

#[test]
fn statfs_reports_the_backing_store() {
    let (env, m) = setup();
    let (a, b) = (statvfs(&m.mnt), statvfs(&env.cipher));
    assert_eq!(a.f_bsize, b.f_bsize, "f_bsize");
    assert_eq!(a.f_frsize, b.f_frsize, "f_frsize");
    assert_eq!(a.f_blocks, b.f_blocks, "f_blocks");
    assert_eq!(a.f_files, b.f_files, "f_files");
    assert_eq!(a.f_namemax, 255, "f_namemax");
    // Free space moves as other tests write; it must be the backing store's, give or take.
    let tol = b.f_blocks / 100 + 1024;
    assert!(
        a.f_bavail.abs_diff(b.f_bavail) <= tol && a.f_bfree.abs_diff(b.f_bfree) <= tol,
        "free blocks {}/{} vs backing {}/{}",
        a.f_bfree,
        a.f_bavail,
        b.f_bfree,
        b.f_bavail
    );
    m.unmount();
}

#[test]
fn flock_conflicts_between_open_files() {
    let (_env, m) = setup();
    let p = m.path("lockfile");
    file_with(&p, b"x");
    let (a, b) = (File::open(&p).unwrap(), File::open(&p).unwrap());
    let flock = |f: &File, op| sys(unsafe { libc::flock(f.as_raw_fd(), op) });
    ok("flock LOCK_EX", flock(&a, libc::LOCK_EX | libc::LOCK_NB));
    expect_errno(
        "second LOCK_EX on another open file",
        flock(&b, libc::LOCK_EX | libc::LOCK_NB),
        &[libc::EWOULDBLOCK],
    );
    expect_errno(
        "LOCK_SH against LOCK_EX",
        flock(&b, libc::LOCK_SH | libc::LOCK_NB),
        &[libc::EWOULDBLOCK],
    );
    ok("unlock", flock(&a, libc::LOCK_UN));
    ok("LOCK_SH", flock(&a, libc::LOCK_SH | libc::LOCK_NB));
    ok("second LOCK_SH", flock(&b, libc::LOCK_SH | libc::LOCK_NB));
    expect_errno(
        "LOCK_EX against LOCK_SH",
        flock(&b, libc::LOCK_EX | libc::LOCK_NB),
        &[libc::EWOULDBLOCK],
    );
    // Closing the holder releases its lock.
    drop(a);
    ok(
        "LOCK_EX after the other closed",
        flock(&b, libc::LOCK_EX | libc::LOCK_NB),
    );
    // Another process sees the lock too.
    let c = cpath(&p);
    let r = as_user(0, 0, &[], || unsafe {
        let fd = libc::open(c.as_ptr(), libc::O_RDONLY);
        if fd < 0 {
            return errno();
        }
        rc(libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB))
    });
    assert_eq!(
        r,
        libc::EWOULDBLOCK,
        "flock from another process: got {}",
        ename(r)
    );
    drop(b);
    m.unmount();
}

fn fcntl_lock(fd: i32, cmd: i32, ty: i32, start: i64, len: i64) -> Result<libc::flock, i32> {
    let mut fl = libc::flock {
        l_type: ty as i16,
        l_whence: libc::SEEK_SET as i16,
        l_start: start,
        l_len: len,
        l_pid: 0,
    };
    // SAFETY: valid descriptor and flock struct.
    sys(unsafe { libc::fcntl(fd, cmd, &mut fl) })?;
    Ok(fl)
}

#[test]
fn fcntl_locks_conflict_between_processes() {
    let (_env, m) = setup();
    let p = m.path("lockfile");
    file_with(&p, &[0u8; 1000]);
    let f = rw(&p);
    ok(
        "F_SETLK write [0,100)",
        fcntl_lock(f.as_raw_fd(), libc::F_SETLK, libc::F_WRLCK, 0, 100),
    );
    let c = cpath(&p);
    let me = std::process::id() as i32;
    // A second process: conflicting range fails, a disjoint one succeeds, F_GETLK names us.
    let r = as_user(0, 0, &[], || unsafe {
        let fd = libc::open(c.as_ptr(), libc::O_RDWR);
        if fd < 0 {
            return errno();
        }
        let mut fl = libc::flock {
            l_type: libc::F_WRLCK as i16,
            l_whence: libc::SEEK_SET as i16,
            l_start: 50,
            l_len: 10,
            l_pid: 0,
        };
        if libc::fcntl(fd, libc::F_SETLK, &mut fl) == 0 {
            return 101; // should have conflicted
        }
        let e = errno();
        if e != libc::EAGAIN && e != libc::EACCES {
            return e;
        }
        fl.l_type = libc::F_RDLCK as i16;
        if libc::fcntl(fd, libc::F_SETLK, &mut fl) == 0 {
            return 102; // a read lock conflicts with a write lock too
        }
        fl.l_type = libc::F_WRLCK as i16;
        if libc::fcntl(fd, libc::F_GETLK, &mut fl) != 0 {
            return errno();
        }
        if fl.l_type != libc::F_WRLCK as i16 || fl.l_pid != me {
            return 103; // F_GETLK must report our lock and pid
        }
        fl.l_type = libc::F_WRLCK as i16;
        fl.l_start = 200;
        fl.l_len = 100;
        if libc::fcntl(fd, libc::F_SETLK, &mut fl) != 0 {
            return 104; // disjoint range
        }
        0
    });
    let why = match r {
        101 => "a conflicting write lock was granted".to_string(),
        102 => "a read lock over a write lock was granted".into(),
        103 => "F_GETLK did not report the holder".into(),
        104 => "a lock on a disjoint range was refused".into(),
        e => ename(e),
    };
    assert_eq!(r, 0, "fcntl locks from a second process: {why}");
    // Unlocked, the other process gets it.
    ok(
        "F_SETLK unlock",
        fcntl_lock(f.as_raw_fd(), libc::F_SETLK, libc::F_UNLCK, 0, 100),
    );
    let r = as_user(0, 0, &[], || unsafe {
        let fd = libc::open(c.as_ptr(), libc::O_RDWR);
        let mut fl = libc::flock {
            l_type: libc::F_WRLCK as i16,
            l_whence: libc::SEEK_SET as i16,
            l_start: 0,
            l_len: 100,
            l_pid: 0,
        };
        rc(libc::fcntl(fd, libc::F_SETLK, &mut fl))
    });
    assert_eq!(r, 0, "lock after unlock: {}", ename(r));
    drop(f);
    m.unmount();
}

// ---------------------------------------------------------------------------------------------
// Open files under renames and unlinks; readdir under change
// ---------------------------------------------------------------------------------------------

#[test]
fn unlink_while_open_keeps_the_file_readable() {
    let (env, m) = setup();
    let mut rng = StdRng::seed_from_u64(seed("unlink_while_open"));
    let p = m.path("u".repeat(190)); // long name: its side file goes too
    let mut data = random_bytes(&mut rng, 3 * SECTOR + 17);
    file_with(&p, &data);
    let f = rw(&p);
    fs::remove_file(&p).unwrap();
    assert!(!p.exists(), "the name is gone");
    assert!(
        list_names(&m.mnt).is_empty(),
        "no entries left in the listing"
    );
    assert_bytes_eq(
        "read after unlink",
        &pread_all(&f, 0, data.len() + 10),
        &data,
    );
    // Still writable, and the size follows.
    let more = random_bytes(&mut rng, 5000);
    f.write_all_at(&more, data.len() as u64).unwrap();
    data.extend_from_slice(&more);
    let md = f
        .metadata()
        .unwrap_or_else(|e| panic!("fstat after unlink: {e}; expected success"));
    assert_eq!(md.len(), data.len() as u64, "fstat size after unlink");
    assert_bytes_eq(
        "read back after unlink",
        &pread_all(&f, 0, data.len()),
        &data,
    );
    f.set_len(100).unwrap();
    assert_bytes_eq(
        "truncated after unlink",
        &pread_all(&f, 0, 1000),
        &data[..100],
    );
    drop(f);
    // A new file of the same name is a different file.
    file_with(&p, b"new");
    assert_eq!(read(&p), b"new");
    fs::remove_file(&p).unwrap();
    m.unmount();
    let data_left = data_files(&env.cipher);
    assert!(
        data_left.is_empty(),
        "backing files left after unlink+close: {data_left:?}"
    );
}

fn list_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("readdir {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn rename_while_open_keeps_the_descriptor_working() {
    let (_env, m) = setup();
    let p = m.path("orig");
    file_with(&p, b"0123456789");
    fs::create_dir(m.path("sub")).unwrap();
    let f = rw(&p);
    let targets = [
        m.path("renamed"),
        m.path("sub/moved"),
        m.path(format!("sub/{}", "L".repeat(230))),
        m.path("back"),
    ];
    let mut want = b"0123456789".to_vec();
    let mut from = p.clone();
    for (i, t) in targets.iter().enumerate() {
        fs::rename(&from, t).unwrap();
        let piece = format!("[{i}]");
        f.write_all_at(piece.as_bytes(), want.len() as u64).unwrap();
        want.extend_from_slice(piece.as_bytes());
        assert_bytes_eq("through the descriptor", &pread_all(&f, 0, 1000), &want);
        assert_bytes_eq("through the new name", &read(t), &want);
        assert!(!from.exists(), "old name {} still there", from.display());
        from = t.clone();
    }
    // Renamed over while open: the descriptor keeps the replaced file.
    let victim = m.path("victim");
    file_with(&victim, b"victim");
    let v = File::open(&victim).unwrap();
    fs::rename(&from, &victim).unwrap();
    assert_eq!(
        pread_all(&v, 0, 100),
        b"victim",
        "the replaced file stays readable"
    );
    assert_bytes_eq("the new file under the name", &read(&victim), &want);
    drop((f, v));
    m.unmount();
}

#[test]
fn readdir_while_entries_change() {
    let (_env, m) = setup();
    let d = m.path("busy");
    fs::create_dir(&d).unwrap();
    let keep: Vec<String> = (0..60).map(|i| format!("keep-{i:03}")).collect();
    for k in &keep {
        file_with(&d.join(k), b"k");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let churn = {
        let (d, stop) = (d.clone(), stop.clone());
        thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) && i < 20_000 {
                let name = if i.is_multiple_of(7) {
                    format!("churn-{}-{}", i % 50, "x".repeat(180))
                } else {
                    format!("churn-{}", i % 50)
                };
                let p = d.join(&name);
                match i % 3 {
                    0 | 1 => {
                        let _ = fs::write(&p, b"c");
                    }
                    _ => {
                        let _ = fs::remove_file(&p);
                    }
                }
                if i.is_multiple_of(11) {
                    let _ = fs::rename(&p, d.join(format!("renamed-{}", i % 13)));
                }
                i += 1;
            }
            i
        })
    };
    for round in 0..150 {
        let names = list_names(&d);
        let mut seen = std::collections::HashSet::new();
        for n in &names {
            assert!(seen.insert(n.clone()), "round {round}: {n} listed twice");
        }
        for k in &keep {
            assert!(
                seen.contains(k),
                "round {round}: {k} missing from the listing"
            );
        }
        for n in &names {
            assert!(
                n.starts_with("keep-") || n.starts_with("churn-") || n.starts_with("renamed-"),
                "round {round}: unexpected name {n:?}"
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    let ops = churn.join().expect("churn thread");
    eprintln!("readdir survived {ops} concurrent changes");
    m.unmount();
}

// ---------------------------------------------------------------------------------------------
// Concurrency: overlapping writers, appenders
// ---------------------------------------------------------------------------------------------

#[test]
fn concurrent_overlapping_writers_never_tear_a_sector() {
    let (env, m) = setup();
    let p = m.path("contended");
    const WRITERS: usize = 6;
    const ROUNDS: usize = 40;
    // Everyone writes the same ranges: an aligned 16-sector range and an unaligned one.
    let aligned = (0usize, 16 * SECTOR);
    let unaligned = (20 * SECTOR + 1000, 9 * SECTOR + 333);
    file_with(&p, &vec![0xffu8; unaligned.0 + unaligned.1 + 5000]);
    let barrier = Arc::new(Barrier::new(WRITERS));
    let handles: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (p, barrier) = (p.clone(), barrier.clone());
            thread::spawn(move || {
                let f = OpenOptions::new().write(true).open(&p).unwrap();
                let pattern = vec![w as u8 + 1; 16 * SECTOR];
                barrier.wait();
                for r in 0..ROUNDS {
                    let (off, len) = if (r + w) % 2 == 0 { aligned } else { unaligned };
                    f.write_all_at(&pattern[..len], off as u64)
                        .unwrap_or_else(|e| panic!("writer {w}: {e}"));
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("writer");
    }
    let check = |data: &[u8], when: &str| {
        for (off, len) in [aligned, unaligned] {
            let range = &data[off..off + len];
            // Each sector (of the backing layout) within the range is one writer's pattern.
            let mut s = off - off % SECTOR;
            while s < off + len {
                let (a, b) = (s.max(off), (s + SECTOR).min(off + len));
                let part = &data[a..b];
                let first = part[0];
                assert!(
                    (1..=WRITERS as u8).contains(&first) && part.iter().all(|x| *x == first),
                    "{when}: sector at {s} is torn or foreign (first byte {first})"
                );
                s += SECTOR;
            }
            assert!(range.iter().all(|x| (1..=WRITERS as u8).contains(x)));
        }
        assert!(
            data[16 * SECTOR..unaligned.0].iter().all(|x| *x == 0xff),
            "{when}: gap changed"
        );
        assert!(
            data[unaligned.0 + unaligned.1..].iter().all(|x| *x == 0xff),
            "{when}: tail changed"
        );
    };
    check(&read(&p), "through the mount");
    let before = read(&p);
    m.unmount();
    let m = env.mount(&env.cipher, &env.mnt);
    let after = read(&m.path("contended"));
    assert_bytes_eq("after remount", &after, &before);
    check(&after, "after remount");
    m.unmount();
}

#[test]
fn concurrent_appenders_lose_nothing() {
    let (env, m) = setup();
    let p = m.path("journal");
    File::create(&p).unwrap();
    const WRITERS: usize = 5;
    const RECORDS: usize = 150;
    let handles: Vec<_> = (0..WRITERS)
        .map(|w| {
            let p = p.clone();
            thread::spawn(move || {
                let mut f = OpenOptions::new().append(true).open(&p).unwrap();
                let mut total = 0;
                for r in 0..RECORDS {
                    // One write() per record; lengths vary so records straddle sectors.
                    let pad = "p".repeat((w * 131 + r * 71) % 3000);
                    let rec = format!("<{w}:{r}:{pad}>\n");
                    f.write_all(rec.as_bytes()).unwrap();
                    total += rec.len();
                }
                total
            })
        })
        .collect();
    let total: usize = handles
        .into_iter()
        .map(|h| h.join().expect("appender"))
        .sum();
    let check = |data: Vec<u8>, when: &str| {
        assert_eq!(data.len(), total, "{when}: journal size");
        let text = String::from_utf8(data).unwrap_or_else(|_| panic!("{when}: not UTF-8: torn"));
        let mut seen = vec![vec![false; RECORDS]; WRITERS];
        for line in text.lines() {
            let inner = line
                .strip_prefix('<')
                .and_then(|l| l.strip_suffix('>'))
                .unwrap_or_else(|| panic!("{when}: torn record {:?}", &line[..line.len().min(40)]));
            let mut parts = inner.splitn(3, ':');
            let w: usize = parts.next().unwrap().parse().unwrap();
            let r: usize = parts.next().unwrap().parse().unwrap();
            let pad = parts.next().unwrap();
            assert_eq!(
                pad.len(),
                (w * 131 + r * 71) % 3000,
                "{when}: record {w}:{r} damaged"
            );
            assert!(!seen[w][r], "{when}: record {w}:{r} twice");
            seen[w][r] = true;
        }
        assert!(seen.iter().flatten().all(|s| *s), "{when}: records lost");
    };
    check(read(&p), "through the mount");
    m.unmount();
    let m = env.mount(&env.cipher, &env.mnt);
    check(read(&m.path("journal")), "after remount");
    m.unmount();
}

// ---------------------------------------------------------------------------------------------
// mmap
// ---------------------------------------------------------------------------------------------

/// A shared writable mapping of `len` bytes of `f`; unmapped on drop.
struct Map {
    ptr: *mut u8,
    len: usize,
}

impl Map {
    fn new(f: &File, len: usize) -> Map {
        // SAFETY: a fresh shared mapping of an open descriptor; checked for MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED, "mmap: {}", ename(errno()));
        Map {
            ptr: ptr.cast(),
            len,
        }
    }

    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is `len` bytes, live until drop, and only we touch it.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    fn sync(&self) {
        // SAFETY: the whole live mapping.
        ok(
            "msync",
            sys(unsafe { libc::msync(self.ptr.cast(), self.len, libc::MS_SYNC) }),
        );
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping once.
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
}

#[test]
fn mmap_shared_writes_round_trip_and_grow() {
    let (env, m) = setup();
    let mut rng = StdRng::seed_from_u64(seed("mmap"));
    let p = m.path("mapped");
    let mut want = random_bytes(&mut rng, 5 * SECTOR + 321);
    file_with(&p, &want);
    {
        let f = rw(&p);
        let mut map = Map::new(&f, want.len());
        assert_bytes_eq("mapping shows the file", map.bytes(), &want);
        // Unaligned stores across sector boundaries.
        for _ in 0..50 {
            let off = rng.gen_range(0..want.len());
            let len = rng.gen_range(1..=(want.len() - off).min(3 * SECTOR));
            let data = random_bytes(&mut rng, len);
            map.bytes()[off..off + len].copy_from_slice(&data);
            want[off..off + len].copy_from_slice(&data);
        }
        map.sync();
        assert_bytes_eq(
            "read() after msync",
            &pread_all(&f, 0, want.len() + 10),
            &want,
        );
    }
    assert_bytes_eq("read after munmap+close", &read(&p), &want);
    // Growing: ftruncate, then map the larger size and write into the new part.
    {
        let f = rw(&p);
        let grown = 9 * SECTOR + 77;
        f.set_len(grown as u64).unwrap();
        want.resize(grown, 0);
        let mut map = Map::new(&f, grown);
        let data = random_bytes(&mut rng, grown - 5 * SECTOR);
        map.bytes()[5 * SECTOR..].copy_from_slice(&data);
        want[5 * SECTOR..].copy_from_slice(&data);
        map.sync();
        drop(map);
        f.sync_all().unwrap();
    }
    assert_eq!(stat(&p).len(), want.len() as u64, "size after growing");
    assert_bytes_eq("grown file", &read(&p), &want);
    // A mapping without msync is written back on munmap/close too.
    {
        let f = rw(&p);
        let mut map = Map::new(&f, want.len());
        map.bytes()[..4].copy_from_slice(b"LAST");
        want[..4].copy_from_slice(b"LAST");
    }
    m.unmount();
    let m = env.mount(&env.cipher, &env.mnt);
    assert_bytes_eq("after remount", &read(&m.path("mapped")), &want);
    m.unmount();
}

#[test]
fn fsck_is_clean_after_the_posix_workout() {
    // Everything the other tests do leaves a volume that fsck finds clean: run a compact
    // mix of the same operations and check.
    let (env, m) = setup();
    let d = m.path("d");
    fs::create_dir(&d).unwrap();
    file_with(&d.join("f"), b"data");
    fs::hard_link(d.join("f"), m.path("h".repeat(200))).unwrap();
    std::os::unix::fs::symlink("d/f", m.path("l")).unwrap();
    let c = cpath(&m.path("fifo"));
    // SAFETY: valid path.
    unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
    let _ = setx(&d.join("f"), "user.k", b"v", 0);
    fs::rename(m.path("h".repeat(200)), m.path("r".repeat(210))).unwrap();
    m.unmount();
    let out = env.cmkfs(&[std::ffi::OsStr::new("fsck"), env.cipher.as_os_str()]);
    assert_eq!(out.status.code(), Some(0), "fsck:\n{out}");
}
