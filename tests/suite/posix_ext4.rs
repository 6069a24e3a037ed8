//! What ext4 accepts, cmkfs accepts (issue 12): one test per finding of the conformance run
//! against the release before it (c00a716), each of which failed there:
//!
//! - a directory renamed over an empty directory (`mv -T a b`), crash-safely;
//! - block and character device nodes (as root);
//! - deep trees: every plaintext path up to PATH_MAX, and any depth reached step by step
//!   (the backing path is never built, so it has no limit of its own);
//! - symlink targets up to 4095 bytes;
//! - xattr calls through a descriptor of an unlinked file;
//! - POSIX ACLs enforced by the kernel (`setfacl`, default ACLs, chmod), `security.*` and
//!   `trusted.*` attributes (`setcap`/`getcap`), `rsync -aHAX` and `cp -a` round trips;
//! - a 65536-byte xattr value gets ENOSPC, as on ext4.
//!
//! Where a result can be compared, the same steps run on a plain directory of the host
//! filesystem (ext4 here) and the outputs must match. The hostile-backing-store findings
//! (symlinks followed by the daemon) are in `mount_corrupt.rs`.

use crate::common;

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::sys::*;
use common::*;

/// An unprivileged user for permission checks (the tests' users need not exist).
const NOBODY: u32 = 65534;

fn setup() -> (Env, Mount) {
    // Every other test run walks from the root for every directory (no descriptor cache).
    if std::process::id().is_multiple_of(2) {
        // SAFETY: set before any thread of this test process reads the environment.
        unsafe { std::env::set_var("CMKFS_DIR_CACHE", "1") };
    }
    let env = Env::new();
    env.init(&env.cipher);
    fs::set_permissions(&env.root, fs::Permissions::from_mode(0o755)).unwrap();
    let m = env.mount_with(&env.cipher, &env.mnt, &["--allow-other"]);
    fs::set_permissions(&env.mnt, fs::Permissions::from_mode(0o755)).unwrap();
    (env, m)
}

/// Runs a shell command line in `dir`; returns (exit status, stdout + stderr).
fn sh(dir: &Path, line: &str) -> (i32, String) {
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(line).current_dir(dir).env("LC_ALL", "C");
    let out = run_with_timeout(cmd, CMD_TIMEOUT).unwrap_or_else(|e| panic!("{line}: {e}"));
    (
        out.status.code().unwrap_or(-1),
        format!("{}{}", out.stdout, out.stderr),
    )
}

/// Runs `line` in both directories and asserts the same exit status and output.
#[track_caller]
fn same_in_both(plain: &Path, mnt: &Path, line: &str) -> String {
    let a = sh(plain, line);
    let b = sh(mnt, line);
    assert_eq!(a, b, "`{line}` differs: plain dir (left) vs cmkfs (right)");
    assert_eq!(a.0, 0, "`{line}` failed on the plain dir: {}", a.1);
    b.1
}

fn fsck_clean(env: &Env) {
    let out = env.cmkfs(&[
        std::ffi::OsStr::new("fsck"),
        env.cipher.as_os_str(),
        std::ffi::OsStr::new("--json"),
    ]);
    assert_eq!(out.status.code(), Some(0), "fsck not clean:\n{out}");
}

fn fsck(env: &Env, repair: bool) -> Output {
    let mut args = vec!["fsck".into(), env.cipher.clone().into_os_string()];
    if repair {
        args.push("--repair".into());
    }
    env.cmkfs(&args)
}

/// Backing entries at the root whose names start with `prefix`.
fn backing_root_entries(env: &Env, prefix: &str) -> Vec<PathBuf> {
    fs::read_dir(&env.cipher)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(prefix))
        .collect()
}

// ---------------------------------------------------------------------------------------------

#[test]
fn a_directory_renames_over_an_empty_directory() {
    let (env, m) = setup();
    fs::create_dir(m.path("a")).unwrap();
    fs::create_dir(m.path("b")).unwrap();
    write(&m.path("a/f"), b"moved with its directory");
    // The finding, with the real tool.
    let (code, out) = sh(&env.mnt, "mv -T a b");
    assert_eq!(code, 0, "mv -T a b: {out}");
    assert_eq!(read(&m.path("b/f")), b"moved with its directory");
    assert!(!m.path("a").exists());
    // The other cases keep their errnos.
    fs::create_dir_all(m.path("c/inner")).unwrap();
    fs::create_dir(m.path("e")).unwrap();
    write(&m.path("file"), b"x");
    let r = |a: &str, b: &str, flags: u32| {
        let (a, b) = (cpath(&m.path(a)), cpath(&m.path(b)));
        // SAFETY: valid C paths.
        sys(unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                a.as_ptr(),
                libc::AT_FDCWD,
                b.as_ptr(),
                flags,
            )
        })
    };
    expect_errno(
        "dir over a non-empty dir",
        r("b", "c", 0),
        &[libc::ENOTEMPTY],
    );
    expect_errno(
        "NOREPLACE over an empty dir",
        r("b", "e", libc::RENAME_NOREPLACE),
        &[libc::EEXIST],
    );
    expect_errno("file over an empty dir", r("file", "e", 0), &[libc::EISDIR]);
    expect_errno("dir over a file", r("e", "file", 0), &[libc::ENOTDIR]);
    // Across directories, and an empty directory over an empty one.
    fs::create_dir(m.path("e2")).unwrap();
    ok("empty dir over an empty dir", r("e", "e2", 0));
    ok("across directories", r("b", "c/inner", 0));
    assert_eq!(read(&m.path("c/inner/f")), b"moved with its directory");
    assert_eq!(fs::metadata(m.path("c")).unwrap().nlink(), 3);
    assert!(
        walk(&env.cipher)
            .iter()
            .all(|p| !p.to_string_lossy().contains(".cmkfs-tmp.")
                && !p.to_string_lossy().contains(".cmkfs.replaced")),
        "no leftovers of the exchange: {:#?}",
        walk(&env.cipher)
    );
    m.unmount();
    fsck_clean(&env);
    let m = env.mount(&env.cipher, &env.mnt);
    assert_eq!(read(&m.path("c/inner/f")), b"moved with its directory");
    m.unmount();
}

#[test]
fn a_crash_inside_a_rename_over_an_empty_directory_is_repaired_by_fsck() {
    // A crash between the exchange and the removal leaves the replaced (empty) directory
    // under the source name, marked. Make that state by hand and let fsck see it.
    let env = Env::new();
    env.init(&env.cipher);
    let m = env.mount(&env.cipher, &env.mnt);
    fs::create_dir(m.path("leftover")).unwrap();
    fs::create_dir(m.path("kept")).unwrap();
    write(&m.path("kept/data"), b"user data");
    m.unmount();
    let dirs: Vec<PathBuf> = fs::read_dir(&env.cipher)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir() && !is_metadata_name(p.file_name().unwrap()))
        .collect();
    for d in &dirs {
        fs::write(d.join(".cmkfs.replaced"), b"").unwrap();
    }
    let out = fsck(&env, false);
    assert_eq!(
        out.status.code(),
        Some(2),
        "fsck must report the leftover:\n{out}"
    );
    let out = fsck(&env, true);
    assert_eq!(out.status.code(), Some(1), "fsck --repair:\n{out}");
    fsck_clean(&env);
    let m = env.mount(&env.cipher, &env.mnt);
    assert!(
        !m.path("leftover").exists(),
        "the replaced empty directory is gone"
    );
    assert_eq!(
        read(&m.path("kept/data")),
        b"user data",
        "user data is never removed"
    );
    m.unmount();
}

#[test]
fn device_nodes_are_created_as_root() {
    let (env, m) = setup();
    let plain = env.dir("plain");
    for dir in [plain.as_path(), env.mnt.as_path()] {
        for (name, kind, major, minor) in [
            ("blk", libc::S_IFBLK, 1, 2),
            ("chr", libc::S_IFCHR, 4, 5),
            ("big", libc::S_IFCHR, 300, 70000),
        ] {
            let c = cpath(&dir.join(name));
            // SAFETY: valid C path.
            ok(
                &format!("mknod {name}"),
                sys(unsafe { libc::mknod(c.as_ptr(), kind | 0o640, libc::makedev(major, minor)) }),
            );
        }
    }
    for name in ["blk", "chr", "big"] {
        let (a, b) = (stat(&plain.join(name)), stat(&m.path(name)));
        assert_eq!(
            (a.mode(), a.rdev(), a.nlink()),
            (b.mode(), b.rdev(), b.nlink()),
            "{name}"
        );
    }
    assert!(stat(&m.path("blk")).file_type().is_block_device());
    // As an unprivileged user (in a directory it may write): EPERM on both.
    for dir in [plain.as_path(), env.mnt.as_path()] {
        fs::create_dir(dir.join("open")).unwrap();
        fs::set_permissions(dir.join("open"), fs::Permissions::from_mode(0o777)).unwrap();
        let c = cpath(&dir.join("open/denied"));
        let e = as_user(NOBODY, NOBODY, &[], || {
            // SAFETY: raw system call in the child.
            rc(unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(1, 3)) })
        });
        assert_eq!(e, libc::EPERM, "{}: {}", dir.display(), ename(e));
    }
    m.unmount();
    fsck_clean(&env);
    let m = env.mount(&env.cipher, &env.mnt);
    assert_eq!(stat(&m.path("chr")).rdev(), libc::makedev(4, 5));
    fs::remove_file(m.path("blk")).unwrap();
    m.unmount();
}

fn stat(p: &Path) -> fs::Metadata {
    fs::symlink_metadata(p).unwrap_or_else(|e| panic!("stat {}: {e}", p.display()))
}

/// mkdirat + openat one level down; returns the new directory's descriptor.
fn descend(dir: &File, name: &CString) -> Result<File, i32> {
    // SAFETY: valid descriptor and C string.
    sys(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), 0o755) })?;
    // SAFETY: as above.
    let fd = sys(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: a descriptor we own from here on.
    Ok(unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

#[test]
fn deep_trees_have_no_backing_path_limit() {
    let (env, m) = setup();
    let name = CString::new("d".repeat(127)).unwrap();
    let plain = env.dir("plain");
    // Step by step (mkdirat/openat), far past the depth whose *backing* path would exceed
    // PATH_MAX (encrypted names are longer than plaintext ones): the old daemon failed at
    // depth 21-22 with ENAMETOOLONG.
    let mut dir = File::open(&env.mnt).unwrap();
    for depth in 1..=48 {
        dir = descend(&dir, &name).unwrap_or_else(|e| panic!("depth {depth}: {}", ename(e)));
    }
    let f = CString::new("file").unwrap();
    // SAFETY: valid descriptor and C string.
    let fd = ok(
        "create at depth 48",
        sys(unsafe {
            libc::openat(
                dir.as_raw_fd(),
                f.as_ptr(),
                libc::O_CREAT | libc::O_RDWR | libc::O_CLOEXEC,
                0o644,
            )
        }),
    );
    // SAFETY: a descriptor we own.
    let mut file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    std::io::Write::write_all(&mut file, b"deep").unwrap();
    drop((file, dir));
    // Every plaintext path up to PATH_MAX works by name, as on ext4: 31 levels of 128 bytes
    // make a 3967-byte relative path.
    let comp = Path::new(std::ffi::OsStr::from_bytes(name.as_bytes()));
    let rel: PathBuf = std::iter::repeat_n(comp, 31).collect();
    let rel_file = rel.join("x");
    assert!(rel_file.as_os_str().len() < 4096);
    let mut plain_dir = File::open(&plain).unwrap();
    for _ in 0..31 {
        plain_dir = descend(&plain_dir, &name).unwrap();
    }
    for base in [&plain, &env.mnt] {
        let root = File::open(base).unwrap();
        let p = CString::new(rel_file.as_os_str().as_bytes()).unwrap();
        // SAFETY: valid descriptor and C string.
        let fd = ok(
            "create by a 3969-byte path",
            sys(unsafe {
                libc::openat(
                    root.as_raw_fd(),
                    p.as_ptr(),
                    libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                    0o600,
                )
            }),
        );
        // SAFETY: our descriptor.
        unsafe { libc::close(fd) };
        let q = CString::new(rel.join("y").as_os_str().as_bytes()).unwrap();
        // SAFETY: valid descriptor and C strings.
        ok(
            "rename by long paths",
            sys(unsafe {
                libc::renameat(root.as_raw_fd(), p.as_ptr(), root.as_raw_fd(), q.as_ptr())
            }),
        );
        let s = CString::new(rel.join("s").as_os_str().as_bytes()).unwrap();
        // SAFETY: as above.
        ok(
            "symlink by a long path",
            sys(unsafe { libc::symlinkat(c"y".as_ptr(), root.as_raw_fd(), s.as_ptr()) }),
        );
    }
    m.unmount();
    fsck_clean(&env);
    let m = env.mount(&env.cipher, &env.mnt);
    let mut dir = File::open(&env.mnt).unwrap();
    for _ in 0..48 {
        // SAFETY: valid descriptor and C string.
        let fd = ok(
            "reopen after remount",
            sys(unsafe {
                libc::openat(
                    dir.as_raw_fd(),
                    name.as_ptr(),
                    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
                )
            }),
        );
        // SAFETY: our descriptor.
        dir = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    }
    // SAFETY: valid descriptor and C string.
    let fd = ok(
        "open the deep file",
        sys(unsafe {
            libc::openat(
                dir.as_raw_fd(),
                f.as_ptr(),
                libc::O_RDONLY | libc::O_CLOEXEC,
            )
        }),
    );
    // SAFETY: our descriptor.
    let mut file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut file, &mut got).unwrap();
    assert_eq!(got, b"deep");
    drop((file, dir));
    m.unmount();
}

#[test]
fn symlink_targets_up_to_4095_bytes() {
    let (env, m) = setup();
    let plain = env.dir("plain");
    // Every byte value but NUL and '/', in long runs.
    let target = |len: usize| -> Vec<u8> {
        (0..len)
            .map(|i| (i % 254 + 1) as u8)
            .map(|b| if b == b'/' { b'.' } else { b })
            .collect()
    };
    for len in [1usize, 3039, 3040, 3041, 4000, 4095] {
        for dir in [&plain, &env.mnt] {
            let t = target(len);
            std::os::unix::fs::symlink(
                std::ffi::OsStr::from_bytes(&t),
                dir.join(format!("s{len}")),
            )
            .unwrap_or_else(|e| panic!("symlink of {len} bytes in {}: {e}", dir.display()));
        }
        let got = fs::read_link(m.path(format!("s{len}"))).unwrap();
        assert_eq!(got.as_os_str().as_bytes(), target(len), "{len}");
        assert_eq!(
            stat(&m.path(format!("s{len}"))).len(),
            len as u64,
            "lstat size"
        );
    }
    for dir in [&plain, &env.mnt] {
        let too_long = target(4096);
        let e =
            std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&too_long), dir.join("s4096"))
                .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENAMETOOLONG));
    }
    // Long targets live in side files; links, renames and unlinks keep them exactly as long
    // as some link of the symlink exists.
    let sides = || backing_root_entries(&env, ".cmkfs.target.").len();
    let long = sides();
    assert_eq!(
        long, 4,
        "one side file per long target (3040, 3041, 4000, 4095)"
    );
    fs::hard_link(m.path("s4095"), m.path("s4095-link")).unwrap();
    fs::remove_file(m.path("s4095")).unwrap();
    assert_eq!(sides(), long, "a link is left");
    assert_eq!(
        fs::read_link(m.path("s4095-link"))
            .unwrap()
            .as_os_str()
            .as_bytes(),
        target(4095)
    );
    fs::remove_file(m.path("s4095-link")).unwrap();
    assert_eq!(sides(), long - 1, "the last link took its side file");
    fs::rename(m.path("s3039"), m.path("s4000")).unwrap();
    assert_eq!(
        sides(),
        long - 2,
        "a long symlink replaced by a rename took its side file"
    );
    m.unmount();
    fsck_clean(&env);
    let m = env.mount(&env.cipher, &env.mnt);
    assert_eq!(
        fs::read_link(m.path("s3041"))
            .unwrap()
            .as_os_str()
            .as_bytes(),
        target(3041)
    );
    assert_eq!(
        fs::read_link(m.path("s4000"))
            .unwrap()
            .as_os_str()
            .as_bytes(),
        target(3039)
    );
    m.unmount();
    // An orphaned side file (a crash between writing it and making the symlink) is found
    // and removed by fsck.
    fs::write(
        env.cipher
            .join(format!(".cmkfs.target.{}", "ab".repeat(16))),
        b"orphan",
    )
    .unwrap();
    assert_eq!(fsck(&env, false).status.code(), Some(2));
    assert_eq!(fsck(&env, true).status.code(), Some(1));
    fsck_clean(&env);
}

fn fsetx(f: &File, name: &str, v: &[u8]) -> Result<(), i32> {
    let n = CString::new(name).unwrap();
    // SAFETY: valid descriptor, C string and buffer.
    sys(unsafe { libc::fsetxattr(f.as_raw_fd(), n.as_ptr(), v.as_ptr().cast(), v.len(), 0) })
        .map(|_| ())
}

fn fgetx(f: &File, name: &str) -> Result<Vec<u8>, i32> {
    let n = CString::new(name).unwrap();
    let mut buf = vec![0u8; 65536];
    // SAFETY: valid descriptor, C string and buffer.
    let len = sys_size(unsafe {
        libc::fgetxattr(
            f.as_raw_fd(),
            n.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    })?;
    buf.truncate(len);
    Ok(buf)
}

fn flistx(f: &File) -> Result<Vec<String>, i32> {
    let mut buf = vec![0u8; 65536];
    // SAFETY: valid descriptor and buffer.
    let len =
        sys_size(unsafe { libc::flistxattr(f.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) })?;
    let mut names: Vec<String> = buf[..len]
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .collect();
    names.sort();
    Ok(names)
}

#[test]
fn xattrs_through_a_descriptor_of_an_unlinked_file() {
    let (env, m) = setup();
    let plain = env.dir("plain");
    let mut results = Vec::new();
    for dir in [&plain, &env.mnt] {
        let p = dir.join("gone");
        let f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        fsetx(&f, "user.before", b"1").unwrap();
        fs::remove_file(&p).unwrap();
        let mut r = vec![format!("{:?}", fsetx(&f, "user.after", b"2"))];
        r.push(format!("{:?}", fgetx(&f, "user.before")));
        r.push(format!("{:?}", fgetx(&f, "user.after")));
        r.push(format!("{:?}", flistx(&f)));
        let n = CString::new("user.before").unwrap();
        // SAFETY: valid descriptor and C string.
        r.push(format!(
            "{:?}",
            sys(unsafe { libc::fremovexattr(f.as_raw_fd(), n.as_ptr()) })
        ));
        r.push(format!("{:?}", flistx(&f)));
        r.push(format!("{:?}", fgetx(&f, "user.missing")));
        // SAFETY: valid descriptor.
        r.push(format!(
            "{:?}",
            sys(unsafe { libc::fchmod(f.as_raw_fd(), 0o600) })
        ));
        results.push(r);
    }
    assert_eq!(results[0], results[1], "plain dir (left) vs cmkfs (right)");
    assert_eq!(results[1][0], "Ok(())");
    m.unmount();
}

#[test]
fn posix_acls_are_enforced_and_round_trip() {
    let (env, m) = setup();
    let plain = env.dir("plain");
    fs::set_permissions(&plain, fs::Permissions::from_mode(0o755)).unwrap();
    // The same steps on ext4 and on cmkfs give the same getfacl output and modes.
    for line in [
        "umask 022; echo data > f; chmod 600 f",
        "setfacl -m u:nobody:rw f",
        "getfacl -n f; stat -c %A f",
        "chmod 640 f; getfacl -n f; stat -c %A f",
        "setfacl -m m::rwx f; stat -c %A f",
        "setfacl -x u:nobody f; getfacl -n f",
        "setfacl -m u:nobody:rw,g:4200:r f; setfacl -b f; getfacl -n f; stat -c %A f",
        "setfacl -m u:nobody:rw f",
        // Default ACLs are inherited by new files (masked by their mode, no umask) and
        // directories (also as their own default ACL).
        "mkdir d; setfacl -d -m u:nobody:rwx,g::rx,o::- d; getfacl -n d",
        "umask 077; touch d/new; mkdir d/sub; mkfifo d/fifo; getfacl -n d/new d/sub d/fifo; stat -c '%n %A' d/new d/sub d/fifo",
        "setfacl -k d; umask 027; touch d/plain; stat -c %A d/plain; getfacl -n d/plain",
        // Held open since it was made (the daemon then knows it was made without an ACL):
        // an ACL set meanwhile still follows a chmod, and inherited ones are still seen.
        "exec 3>held; setfacl -m u:nobody:rwx held; chmod 640 held; getfacl -n held; exec 3>&-",
        "exec 3>d/held; chmod 600 d/held; getfacl -n d/held; exec 3>&-",
    ] {
        same_in_both(&plain, &env.mnt, line);
    }
    // The kernel enforces them: nobody may write f through the ACL entry only.
    let c = cpath(&m.path("f"));
    let try_write = || {
        as_user(NOBODY, NOBODY, &[], || {
            // SAFETY: raw system calls in the child.
            unsafe {
                let fd = libc::open(c.as_ptr(), libc::O_WRONLY);
                if fd < 0 {
                    return errno();
                }
                libc::close(fd);
                0
            }
        })
    };
    assert_eq!(try_write(), 0, "u:nobody:rw lets nobody open f for writing");
    let (code, out) = sh(&env.mnt, "setfacl -m m::r f");
    assert_eq!(code, 0, "{out}");
    assert_eq!(try_write(), libc::EACCES, "the mask limits the named entry");
    let (code, out) = sh(&env.mnt, "setfacl -b f");
    assert_eq!(code, 0, "{out}");
    assert_eq!(try_write(), libc::EACCES);
    m.unmount();
    fsck_clean(&env);
    let m = env.mount_with(&env.cipher, &env.mnt, &["--allow-other"]);
    let (code, out) = sh(&env.mnt, "getfacl -n d/new");
    assert_eq!(code, 0);
    assert!(
        out.contains("user:65534:rwx"),
        "ACL survives a remount:\n{out}"
    );
    m.unmount();
}

#[test]
fn capabilities_and_trusted_attributes_round_trip_with_real_tools() {
    let (env, m) = setup();
    let plain = env.dir("plain");
    for line in [
        "cp /bin/true tool && setcap cap_net_raw+ep tool && getcap tool",
        "setfattr -n trusted.t -v tv tool && setfattr -n security.s -v sv tool && setfattr -n user.u -v uv tool",
        "getfattr -d -m - --absolute-names tool | sort",
        // A write drops the capability, whoever writes (as the kernel does locally).
        "cp tool tool2 && setcap cap_net_raw+ep tool2 && echo >> tool2 && getcap tool2; getfattr -n security.capability tool2 2>&1 | sed 's/^[^:]*: //'",
        // Held open since it was made (the daemon then knows it has no capability): one set
        // meanwhile is seen, and a chown, then a write, drop it.
        "exec 3>held; setcap cap_net_raw+ep held && getcap held; chown 0:0 held; getcap held; setcap cap_net_raw+ep held; echo x >&3; getcap held; exec 3>&-; echo end",
        "ln -s tool lnk && setfattr -h -n trusted.onlink -v x lnk && getfattr -h -d -m trusted lnk",
    ] {
        same_in_both(&plain, &env.mnt, line);
    }
    m.unmount();
    fsck_clean(&env);
    let m = env.mount(&env.cipher, &env.mnt);
    let (code, out) = sh(&env.mnt, "getcap tool");
    assert_eq!((code, out.trim()), (0, "tool cap_net_raw=ep"));
    m.unmount();
}

#[test]
fn rsync_and_cp_preserve_acls_xattrs_links_and_specials() {
    let (env, m) = setup();
    let src = env.dir("src");
    let (code, out) = sh(
        &src,
        "set -e; umask 022; mkdir -p d/e; echo one > d/f; ln d/f d/hard; ln -s f d/sym; \
         mkfifo d/fifo; mknod d/chr c 4 5; cp /bin/true d/tool; setcap cap_net_raw+ep d/tool; \
         setfacl -m u:nobody:rwx d/f; setfacl -d -m g:4200:rx d/e; \
         setfattr -n user.u -v 1 d/f; setfattr -n trusted.t -v 2 d/f; setfattr -h -n trusted.l -v 3 d/sym; \
         head -c 100000 /dev/urandom > d/big",
    );
    assert_eq!(code, 0, "{out}");
    let dump = |dir: &Path| {
        // Sorted, so readdir order does not matter; inode numbers and directory sizes are
        // the filesystem's own, everything else must match.
        let (code, out) = sh(
            dir,
            "cd d && find . -type d -printf '%p %y %m %n\\n' | sort && \
             find . ! -type d -printf '%p %y %m %n %s %l\\n' | sort && \
             for p in $(find . | sort); do getfacl -n -p \"$p\" 2>&1; \
               getfattr -h -d -m - \"$p\" 2>&1 | sort; done && \
             getcap -r . | sort && md5sum big f tool",
        );
        assert_eq!(code, 0, "{out}");
        out
    };
    let want = dump(&src);
    let (code, out) = sh(
        &env.root,
        &format!("rsync -aHAX src/d {}/", env.mnt.display()),
    );
    assert_eq!(code, 0, "rsync -aHAX into cmkfs: {out}");
    assert_eq!(dump(&env.mnt), want, "rsync -aHAX into cmkfs");
    let back = env.dir("back");
    let (code, out) = sh(
        &env.root,
        &format!("rsync -aHAX {}/d back/", env.mnt.display()),
    );
    assert_eq!(code, 0, "rsync -aHAX out of cmkfs: {out}");
    assert_eq!(dump(&back), want, "rsync -aHAX out of cmkfs");
    fs::create_dir(m.path("cp")).unwrap();
    let (code, out) = sh(&env.root, &format!("cp -a src/d {}/cp/", env.mnt.display()));
    assert_eq!(code, 0, "cp -a: {out}");
    assert_eq!(dump(&env.mnt.join("cp")), want, "cp -a into cmkfs");
    m.unmount();
    fsck_clean(&env);
}

#[test]
fn big_xattr_values_get_the_errnos_of_ext4() {
    let (env, m) = setup();
    let plain = env.dir("plain");
    let mut results = Vec::new();
    for dir in [&plain, &env.mnt] {
        let f = File::create(dir.join("f")).unwrap();
        let mut r = Vec::new();
        for len in [100usize, 65536, 65537] {
            r.push((len, fsetx(&f, "user.big", &vec![b'v'; len]).map_err(ename)));
        }
        results.push(r);
    }
    assert_eq!(results[0], results[1], "plain dir (left) vs cmkfs (right)");
    assert_eq!(results[1][1].1, Err(ename(libc::ENOSPC)));
    assert_eq!(results[1][2].1, Err(ename(libc::E2BIG)));
    m.unmount();
}

#[test]
fn requests_stay_correct_while_other_requests_rename_the_parents() {
    // The directory cache is off: every request finds its directory by walking from the
    // root while another thread keeps moving the directories on that walk around.
    // SAFETY: set before the mount is started and before any other thread exists.
    unsafe { std::env::set_var("CMKFS_DIR_CACHE", "1") };
    let (env, m) = setup();
    fs::create_dir_all(m.path("a/mid/leaf")).unwrap();
    fs::create_dir_all(m.path("b")).unwrap();
    write(&m.path("a/mid/leaf/f"), b"the leaf file");
    let leaf = File::open(m.path("a/mid/leaf")).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mover = {
        let (stop, mnt) = (stop.clone(), env.mnt.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            let (mut from, mut to) = (mnt.join("a/mid"), mnt.join("b/mid"));
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                fs::rename(&from, &to).expect("rename of a parent");
                std::mem::swap(&mut from, &mut to);
                n += 1;
            }
            n
        })
    };
    let f = CString::new("f").unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    let mut reads = 0;
    while std::time::Instant::now() < deadline {
        // SAFETY: valid descriptor and C string.
        let fd = ok(
            "openat inside a moving directory",
            sys(unsafe {
                libc::openat(
                    leaf.as_raw_fd(),
                    f.as_ptr(),
                    libc::O_RDONLY | libc::O_CLOEXEC,
                )
            }),
        );
        // SAFETY: a descriptor we own.
        let mut file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut file, &mut got).unwrap();
        assert_eq!(got, b"the leaf file");
        // Creating and removing names in it too.
        let n = CString::new(format!("x{reads}")).unwrap();
        // SAFETY: as above.
        ok(
            "mkdirat inside a moving directory",
            sys(unsafe { libc::mkdirat(leaf.as_raw_fd(), n.as_ptr(), 0o755) }),
        );
        // SAFETY: as above.
        ok(
            "unlinkat inside a moving directory",
            sys(unsafe { libc::unlinkat(leaf.as_raw_fd(), n.as_ptr(), libc::AT_REMOVEDIR) }),
        );
        reads += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let renames = mover.join().unwrap();
    eprintln!("{reads} opens and {renames} renames of a parent");
    assert!(
        reads > 10 && renames > 10,
        "{reads} opens, {renames} renames"
    );
    drop(leaf);
    m.unmount();
    fsck_clean(&env);
}
