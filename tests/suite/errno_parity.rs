//! Errno parity with ext4 (issue 12): one sequence of system calls runs on a plain directory
//! of the host filesystem (ext4) and on a cmkfs mount, and every result must be the same —
//! the errno of each failure, and for each success what it observably did (type, mode,
//! owner, link count, size, contents, attribute values, listings, which timestamps moved).
//!
//! The sequence covers EEXIST, ENOTEMPTY, ENOTDIR, EISDIR, EXDEV, ELOOP, ENAMETOOLONG, EPERM,
//! EACCES, EINVAL, ENOENT, ENODATA, ERANGE, E2BIG / ENOSPC for xattrs, sticky and setgid
//! directories, rename flags, hard-link counts and timestamps. Steps marked with a user run
//! in a forked child as that user (raw system calls only).

use crate::common;

use std::ffi::CString;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::sys::*;
use common::*;

const ALICE: u32 = 4101;
const BOB: u32 = 4102;
const STAFF: u32 = 4200;

/// One system call, with everything it needs prepared (children only make raw calls).
enum Call {
    Mkdir(&'static str, u32),
    Rmdir(&'static str),
    Create(&'static str, u32),
    Open(&'static str, i32),
    Unlink(&'static str),
    Rename(&'static str, &'static str, u32),
    Link(&'static str, &'static str),
    Symlink(String, &'static str),
    Mknod(&'static str, u32, u64),
    Chmod(&'static str, u32),
    Chown(&'static str, u32, u32),
    Lchown(&'static str, u32, u32),
    Truncate(&'static str, i64),
    Utimes(&'static str, i64, i64),
    SetXattr(&'static str, String, usize, i32),
    LSetXattr(&'static str, &'static str),
    GetXattr(&'static str, &'static str, usize),
    ListXattr(&'static str),
    RemoveXattr(&'static str, &'static str),
    /// Rename `.0` to a path outside the tested directory (another filesystem).
    RenameOut(&'static str),
    /// Observe: stat of a path (as the result).
    Stat(&'static str),
    /// Observe: sorted listing of a directory.
    List(&'static str),
    /// Observe: which of mtime/ctime of `.0` moved during the next call.
    Times(&'static str, Box<Call>),
    /// Observe: which of mtime/ctime of what was `.0` and is `.1` after the call moved.
    TimesMoved(&'static str, &'static str, Box<Call>),
    /// Read a symlink.
    Readlink(&'static str),
}

struct Step {
    user: Option<(u32, u32)>,
    call: Call,
}

fn root(call: Call) -> Step {
    Step { user: None, call }
}

fn as_(uid: u32, gid: u32, call: Call) -> Step {
    Step {
        user: Some((uid, gid)),
        call,
    }
}

fn c(base: &Path, rel: &str) -> CString {
    cpath(&base.join(rel))
}

fn observe_stat(p: &Path) -> String {
    match fs::symlink_metadata(p) {
        Ok(m) => {
            let size = if m.is_dir() { 0 } else { m.size() };
            format!(
                "mode={:o} uid={} gid={} nlink={} size={} rdev={:x}",
                m.mode(),
                m.uid(),
                m.gid(),
                m.nlink(),
                size,
                m.rdev()
            )
        }
        Err(e) => format!("stat: {}", ename(e.raw_os_error().unwrap_or(0))),
    }
}

/// Runs `call` in this process; the result text.
fn run(base: &Path, outside: &Path, call: &Call) -> String {
    let r = |x: Result<i32, i32>| match x {
        Ok(_) => "ok".to_string(),
        Err(e) => ename(e),
    };
    // SAFETY (all blocks below): raw system calls on valid C strings and buffers.
    unsafe {
        match call {
            Call::Mkdir(p, m) => r(sys(libc::mkdir(c(base, p).as_ptr(), *m))),
            Call::Rmdir(p) => r(sys(libc::rmdir(c(base, p).as_ptr()))),
            Call::Create(p, m) => match sys(libc::open(
                c(base, p).as_ptr(),
                libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY,
                *m,
            )) {
                Ok(fd) => {
                    libc::close(fd);
                    "ok".into()
                }
                Err(e) => ename(e),
            },
            Call::Open(p, flags) => match sys(libc::open(c(base, p).as_ptr(), *flags, 0o644)) {
                Ok(fd) => {
                    libc::close(fd);
                    "ok".into()
                }
                Err(e) => ename(e),
            },
            Call::Unlink(p) => r(sys(libc::unlink(c(base, p).as_ptr()))),
            Call::Rename(a, b, flags) => r(sys(libc::renameat2(
                libc::AT_FDCWD,
                c(base, a).as_ptr(),
                libc::AT_FDCWD,
                c(base, b).as_ptr(),
                *flags,
            ))),
            Call::Link(a, b) => r(sys(libc::link(c(base, a).as_ptr(), c(base, b).as_ptr()))),
            Call::Symlink(t, p) => {
                let t = CString::new(t.as_str()).unwrap();
                r(sys(libc::symlink(t.as_ptr(), c(base, p).as_ptr())))
            }
            Call::Mknod(p, m, d) => r(sys(libc::mknod(c(base, p).as_ptr(), *m, *d))),
            Call::Chmod(p, m) => r(sys(libc::chmod(c(base, p).as_ptr(), *m))),
            Call::Chown(p, u, g) => r(sys(libc::chown(c(base, p).as_ptr(), *u, *g))),
            Call::Lchown(p, u, g) => r(sys(libc::lchown(c(base, p).as_ptr(), *u, *g))),
            Call::Truncate(p, n) => r(sys(libc::truncate(c(base, p).as_ptr(), *n))),
            Call::Utimes(p, a, m) => {
                let ts = [
                    libc::timespec {
                        tv_sec: *a,
                        tv_nsec: 123,
                    },
                    libc::timespec {
                        tv_sec: *m,
                        tv_nsec: 456,
                    },
                ];
                r(sys(libc::utimensat(
                    libc::AT_FDCWD,
                    c(base, p).as_ptr(),
                    ts.as_ptr(),
                    libc::AT_SYMLINK_NOFOLLOW,
                )))
            }
            Call::SetXattr(p, n, len, flags) => {
                let n = CString::new(n.as_str()).unwrap();
                let v = vec![b'v'; *len];
                r(sys(libc::setxattr(
                    c(base, p).as_ptr(),
                    n.as_ptr(),
                    v.as_ptr().cast(),
                    v.len(),
                    *flags,
                )))
            }
            Call::LSetXattr(p, n) => {
                let n = CString::new(*n).unwrap();
                r(sys(libc::lsetxattr(
                    c(base, p).as_ptr(),
                    n.as_ptr(),
                    b"v".as_ptr().cast(),
                    1,
                    0,
                )))
            }
            Call::GetXattr(p, n, size) => {
                let n = CString::new(*n).unwrap();
                let mut buf = vec![0u8; *size];
                match sys_size(libc::getxattr(
                    c(base, p).as_ptr(),
                    n.as_ptr(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )) {
                    Ok(len) if *size == 0 => format!("size {len}"),
                    Ok(len) => format!("{:?}", String::from_utf8_lossy(&buf[..len])),
                    Err(e) => ename(e),
                }
            }
            Call::ListXattr(p) => {
                let mut buf = vec![0u8; 4096];
                match sys_size(libc::listxattr(
                    c(base, p).as_ptr(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )) {
                    Ok(len) => {
                        let mut v: Vec<_> = buf[..len]
                            .split(|b| *b == 0)
                            .filter(|n| !n.is_empty())
                            .map(|n| String::from_utf8_lossy(n).into_owned())
                            .collect();
                        v.sort();
                        format!("{v:?}")
                    }
                    Err(e) => ename(e),
                }
            }
            Call::RemoveXattr(p, n) => {
                let n = CString::new(*n).unwrap();
                r(sys(libc::removexattr(c(base, p).as_ptr(), n.as_ptr())))
            }
            Call::RenameOut(p) => r(sys(libc::rename(
                c(base, p).as_ptr(),
                cpath(&outside.join("moved")).as_ptr(),
            ))),
            Call::Stat(p) => observe_stat(&base.join(p)),
            Call::List(p) => match fs::read_dir(base.join(p)) {
                Ok(rd) => {
                    let mut v: Vec<String> = rd
                        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                        .collect();
                    v.sort();
                    format!("{v:?}")
                }
                Err(e) => ename(e.raw_os_error().unwrap_or(0)),
            },
            Call::Times(p, inner) => times(base, outside, p, p, inner),
            Call::TimesMoved(p, q, inner) => times(base, outside, p, q, inner),
            Call::Readlink(p) => match fs::read_link(base.join(p)) {
                Ok(t) => format!("-> {} bytes", t.as_os_str().len()),
                Err(e) => ename(e.raw_os_error().unwrap_or(0)),
            },
        }
    }
}

/// Runs `inner` and says which of mtime / ctime moved, from `p` before to `q` after.
fn times(base: &Path, outside: &Path, p: &str, q: &str, inner: &Call) -> String {
    let before = fs::symlink_metadata(base.join(p)).ok();
    // Timestamps have a granularity: make sure a change shows.
    std::thread::sleep(Duration::from_millis(15));
    let res = run(base, outside, inner);
    let after = fs::symlink_metadata(base.join(q)).ok();
    let moved = |a: (i64, i64), b: (i64, i64)| if a != b { "moved" } else { "kept" };
    match (before, after) {
        (Some(b), Some(a)) => format!(
            "{res}; mtime {} ctime {}",
            moved((a.mtime(), a.mtime_nsec()), (b.mtime(), b.mtime_nsec())),
            moved((a.ctime(), a.ctime_nsec()), (b.ctime(), b.ctime_nsec()))
        ),
        _ => format!("{res}; gone"),
    }
}

/// Runs a permission-sensitive call as another user: only calls whose arguments are
/// prepared here, then raw system calls in the child.
fn run_as(base: &Path, uid: u32, gid: u32, call: &Call) -> String {
    let (a, b) = match call {
        Call::Rename(x, y, _) | Call::Link(x, y) => (c(base, x), c(base, y)),
        Call::Mkdir(x, _)
        | Call::Rmdir(x)
        | Call::Create(x, _)
        | Call::Open(x, _)
        | Call::Unlink(x)
        | Call::Chmod(x, _)
        | Call::Chown(x, _, _)
        | Call::Mknod(x, _, _)
        | Call::Truncate(x, _)
        | Call::Utimes(x, _, _) => (c(base, x), CString::default()),
        _ => panic!("not a call for another user"),
    };
    let n = CString::new("user.x").unwrap();
    let e = as_user(uid, gid, &[gid], || {
        // SAFETY: raw system calls on prepared C strings.
        unsafe {
            match call {
                Call::Mkdir(_, m) => rc(libc::mkdir(a.as_ptr(), *m)),
                Call::Rmdir(_) => rc(libc::rmdir(a.as_ptr())),
                Call::Create(_, m) => {
                    let fd = libc::open(
                        a.as_ptr(),
                        libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY,
                        *m,
                    );
                    if fd >= 0 {
                        libc::close(fd);
                    }
                    rc(fd)
                }
                Call::Open(_, f) => {
                    let fd = libc::open(a.as_ptr(), *f, 0o644);
                    if fd >= 0 {
                        libc::close(fd);
                    }
                    rc(fd)
                }
                Call::Unlink(_) => rc(libc::unlink(a.as_ptr())),
                Call::Rename(_, _, f) => rc(libc::renameat2(
                    libc::AT_FDCWD,
                    a.as_ptr(),
                    libc::AT_FDCWD,
                    b.as_ptr(),
                    *f,
                )),
                Call::Link(..) => rc(libc::link(a.as_ptr(), b.as_ptr())),
                Call::Chmod(_, m) => rc(libc::chmod(a.as_ptr(), *m)),
                Call::Chown(_, u, g) => rc(libc::chown(a.as_ptr(), *u, *g)),
                Call::Mknod(_, m, d) => rc(libc::mknod(a.as_ptr(), *m, *d)),
                Call::Truncate(_, len) => rc(libc::truncate(a.as_ptr(), *len)),
                Call::Utimes(..) => rc(libc::utimensat(
                    libc::AT_FDCWD,
                    a.as_ptr(),
                    std::ptr::null(),
                    0,
                )),
                _ => rc(libc::removexattr(a.as_ptr(), n.as_ptr())),
            }
        }
    });
    if e == 0 {
        "ok".into()
    } else {
        ename(e)
    }
}

fn sequence() -> Vec<Step> {
    use Call::*;
    let long = "n".repeat(256);
    let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    vec![
        // Names and types.
        root(Mkdir("d", 0o755)),
        root(Mkdir("d", 0o755)),
        root(Create("d/f", 0o644)),
        root(Create("d/f", 0o644)),
        root(Mkdir("d/f/x", 0o755)),
        root(Create("d/f/x", 0o644)),
        root(Rmdir("d")),
        root(Unlink("d")),
        root(Rmdir("d/f")),
        root(Open("d", libc::O_WRONLY)),
        root(Open("d/missing", libc::O_RDONLY)),
        root(Unlink("d/missing")),
        root(Rename("d/f", "d/f/y", 0)),
        root(Create(leak(format!("d/{long}")), 0o644)),
        root(Mkdir(leak(format!("d/{}", "m".repeat(255))), 0o755)),
        root(Stat(leak(format!("d/{}", "m".repeat(255))))),
        root(Symlink("l2".into(), "d/l1")),
        root(Symlink("l1".into(), "d/l2")),
        root(Open("d/l1", libc::O_RDONLY)),
        root(Open("d/l1", libc::O_RDONLY | libc::O_NOFOLLOW)),
        root(Symlink("x".repeat(4095), "d/s4095")),
        root(Readlink("d/s4095")),
        root(Stat("d/s4095")),
        root(Symlink("x".repeat(4096), "d/s4096")),
        // Hard links and link counts.
        root(Link("d/f", "d/g")),
        root(Stat("d/f")),
        root(Link("d/f", "d/g")),
        root(Link("d", "d2")),
        root(Times("d/f", Box::new(Unlink("d/g")))),
        root(Stat("d/f")),
        root(Times("d", Box::new(Mkdir("d/sub", 0o700)))),
        root(Stat("d")),
        root(Rmdir("d/sub")),
        root(Stat("d")),
        // Renames.
        root(Rename("d", "d/inside", 0)),
        root(Mkdir("e", 0o755)),
        root(Mkdir("e/x", 0o755)),
        root(Rename("e", "d", 0)),
        root(Rename("d/f", "e", 0)),
        root(Rename("e", "d/f", 0)),
        root(Mkdir("empty1", 0o755)),
        root(Mkdir("empty2", 0o755)),
        root(Rename("empty1", "empty2", libc::RENAME_NOREPLACE)),
        root(TimesMoved(
            "e/x",
            "empty2",
            Box::new(Rename("e/x", "empty2", 0)),
        )),
        root(List("e")),
        root(Stat("e")),
        root(Rename("d/f", "e/f", libc::RENAME_EXCHANGE)),
        root(Create("e/f", 0o600)),
        root(Rename("d/f", "e/f", libc::RENAME_EXCHANGE)),
        root(Stat("e/f")),
        root(Stat("d/f")),
        root(TimesMoved(
            "d/f",
            "d/f2",
            Box::new(Rename("d/f", "d/f2", 0)),
        )),
        root(RenameOut("d/f2")),
        root(Rmdir(".")),
        // Modes, owners, sticky and setgid directories, permission errors.
        root(Mkdir("t", 0o777)),
        root(Chmod("t", 0o1777)),
        as_(ALICE, ALICE, Create("t/alice", 0o644)),
        as_(BOB, BOB, Unlink("t/alice")),
        as_(BOB, BOB, Rename("t/alice", "t/bob", 0)),
        as_(BOB, BOB, Chmod("t/alice", 0o777)),
        as_(BOB, BOB, Chown("t/alice", BOB, BOB)),
        as_(ALICE, ALICE, Chown("t/alice", BOB, ALICE)),
        as_(ALICE, ALICE, Chown("t/alice", ALICE, STAFF)),
        as_(ALICE, ALICE, Chmod("t/alice", 0o4755)),
        root(Stat("t/alice")),
        as_(ALICE, ALICE, Utimes("t/alice", 0, 0)),
        as_(BOB, BOB, Utimes("t/alice", 0, 0)),
        as_(ALICE, ALICE, Unlink("t/alice")),
        // Setuid and setgid bits asked for at creation stay (the daemon's chown to the
        // caller must not drop them).
        as_(ALICE, ALICE, Create("t/suid", 0o6755)),
        root(Stat("t/suid")),
        as_(ALICE, ALICE, Mknod("t/sfifo", libc::S_IFIFO | 0o6644, 0)),
        root(Stat("t/sfifo")),
        root(Mkdir("s", 0o775)),
        root(Chown("s", 0, STAFF)),
        root(Chmod("s", 0o2775)),
        root(Create("s/file", 0o644)),
        root(Mkdir("s/dir", 0o755)),
        root(Stat("s/file")),
        root(Stat("s/dir")),
        root(Mkdir("p", 0o700)),
        as_(ALICE, ALICE, Create("p/x", 0o644)),
        as_(ALICE, ALICE, Mkdir("p/y", 0o755)),
        as_(ALICE, ALICE, Open("p", libc::O_RDONLY)),
        root(Create("p/ro", 0o444)),
        as_(ALICE, ALICE, Open("p/ro", libc::O_RDONLY)),
        root(Chmod("p", 0o755)),
        as_(ALICE, ALICE, Open("p/ro", libc::O_WRONLY)),
        as_(ALICE, ALICE, Truncate("p/ro", 0)),
        as_(
            ALICE,
            ALICE,
            Mknod("t/node", libc::S_IFCHR | 0o600, libc::makedev(1, 3)),
        ),
        as_(ALICE, ALICE, Link("p/ro", "t/hard")),
        root(Lchown("d/l1", ALICE, STAFF)),
        root(Stat("d/l1")),
        // Devices, FIFOs, truncation.
        root(Mknod("blk", libc::S_IFBLK | 0o600, libc::makedev(8, 1))),
        root(Mknod("fifo", libc::S_IFIFO | 0o644, 0)),
        root(Stat("blk")),
        root(Stat("fifo")),
        root(Truncate("p/ro", 5000)),
        root(Stat("p/ro")),
        root(Truncate("p/ro", -1)),
        root(Truncate("d", 0)),
        // A size change moves both times. (A truncate to the size the file has already
        // moves them on ext4 but not through the writeback cache, where the kernel owns a
        // regular file's times and moves them only when the size changes: README.)
        root(Times("p/ro", Box::new(Truncate("p/ro", 4000)))),
        root(Times("p/ro", Box::new(Chmod("p/ro", 0o600)))),
        root(Times(
            "p/ro",
            Box::new(Utimes("p/ro", 1_000_000_000, 2_000_000_000)),
        )),
        // Extended attributes.
        root(SetXattr("p/ro", "user.a".into(), 10, 0)),
        root(SetXattr("p/ro", "user.a".into(), 10, libc::XATTR_CREATE)),
        root(SetXattr("p/ro", "user.b".into(), 10, libc::XATTR_REPLACE)),
        root(GetXattr("p/ro", "user.a", 64)),
        root(GetXattr("p/ro", "user.a", 0)),
        root(GetXattr("p/ro", "user.a", 4)),
        root(GetXattr("p/ro", "user.missing", 64)),
        root(SetXattr("p/ro", "user.big".into(), 65536, 0)),
        root(SetXattr("p/ro", "user.big".into(), 65537, 0)),
        root(SetXattr("p/ro", format!("user.{}", "k".repeat(251)), 1, 0)),
        // The longest name there is: its encrypted form is hashed in the backing store.
        root(SetXattr("p/ro", format!("user.{}", "L".repeat(250)), 5, 0)),
        root(GetXattr(
            "p/ro",
            leak(format!("user.{}", "L".repeat(250))),
            64,
        )),
        root(SetXattr("p/ro", "trusted.t".into(), 3, 0)),
        root(SetXattr("p/ro", "security.s".into(), 3, 0)),
        root(SetXattr("p/ro", "system.nonsense".into(), 3, 0)),
        root(SetXattr("p/ro", "nonamespace".into(), 3, 0)),
        root(SetXattr("p/ro", "system.posix_acl_access".into(), 3, 0)),
        root(ListXattr("p/ro")),
        root(RemoveXattr(
            "p/ro",
            leak(format!("user.{}", "L".repeat(250))),
        )),
        root(RemoveXattr("p/ro", "user.missing")),
        root(RemoveXattr("p/ro", "user.a")),
        root(ListXattr("p/ro")),
        root(LSetXattr("d/l1", "user.x")),
        root(LSetXattr("d/l1", "trusted.x")),
        root(LSetXattr("fifo", "user.x")),
        root(LSetXattr("fifo", "trusted.x")),
        root(Times(
            "p/ro",
            Box::new(SetXattr("p/ro", "user.c".into(), 1, 0)),
        )),
        root(Mkdir("full", 0o755)),
        root(Create("full/a", 0o644)),
        root(List("full")),
        root(List(".")),
    ]
}

/// Runs the whole sequence in `base`; one line per step.
fn run_all(base: &Path, outside: &Path) -> Vec<String> {
    sequence()
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let res = match s.user {
                None => run(base, outside, &s.call),
                Some((u, g)) => run_as(base, u, g, &s.call),
            };
            format!("{i:3} {res}")
        })
        .collect()
}

#[test]
fn the_same_calls_give_the_same_results_as_ext4() {
    let env = Env::new();
    env.init(&env.cipher);
    fs::set_permissions(&env.root, fs::Permissions::from_mode(0o755)).unwrap();
    let m = env.mount_with(&env.cipher, &env.mnt, &["--allow-other"]);
    fs::set_permissions(&env.mnt, fs::Permissions::from_mode(0o755)).unwrap();
    let plain = env.dir("plain");
    fs::set_permissions(&plain, fs::Permissions::from_mode(0o755)).unwrap();
    // Another filesystem for EXDEV: the mount for the plain dir, the plain dir for the mount.
    let (out_for_plain, out_for_mnt): (PathBuf, PathBuf) = (env.mnt.clone(), plain.clone());
    let want = run_all(&plain, &out_for_plain);
    let got = run_all(&env.mnt, &out_for_mnt);
    let calls = sequence();
    let mut diffs = Vec::new();
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        if w != g {
            diffs.push(format!(
                "step {i} ({}): ext4 {w:?} cmkfs {g:?}",
                describe(&calls[i].call)
            ));
        }
    }
    assert!(
        diffs.is_empty(),
        "{} differences:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
    // And the errnos the sequence is about did come up.
    let all = want.join("\n");
    for e in [
        "EEXIST",
        "ENOTEMPTY",
        "ENOTDIR",
        "EISDIR",
        "EXDEV",
        "ELOOP",
        "ENAMETOOLONG",
        "EPERM",
        "EACCES",
        "ENOSPC",
        "E2BIG",
        "ERANGE",
        "ENODATA",
        "EOPNOTSUPP",
        "EINVAL",
    ] {
        assert!(all.contains(e), "the sequence never produced {e}");
    }
    m.unmount();
    let out = env.cmkfs(&[std::ffi::OsStr::new("fsck"), env.cipher.as_os_str()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "fsck after the sequence:\n{out}"
    );
}

fn describe(c: &Call) -> String {
    match c {
        Call::Times(p, inner) => format!("times of {p} around {}", describe(inner)),
        Call::TimesMoved(p, q, inner) => {
            format!("times of {p} (then {q}) around {}", describe(inner))
        }
        Call::Symlink(t, p) => format!("symlink {}-byte target at {p}", t.len()),
        Call::SetXattr(p, n, len, f) => format!("setxattr {p} {n} {len} bytes flags {f}"),
        other => {
            let s = match other {
                Call::Mkdir(p, m) => format!("mkdir {p} {m:o}"),
                Call::Rmdir(p) => format!("rmdir {p}"),
                Call::Create(p, m) => format!("create {p} {m:o}"),
                Call::Open(p, f) => format!("open {p} flags {f:#x}"),
                Call::Unlink(p) => format!("unlink {p}"),
                Call::Rename(a, b, f) => format!("rename {a} {b} flags {f}"),
                Call::Link(a, b) => format!("link {a} {b}"),
                Call::Mknod(p, m, d) => format!("mknod {p} {m:o} {d:x}"),
                Call::Chmod(p, m) => format!("chmod {p} {m:o}"),
                Call::Chown(p, u, g) => format!("chown {p} {u}:{g}"),
                Call::Lchown(p, u, g) => format!("lchown {p} {u}:{g}"),
                Call::Truncate(p, n) => format!("truncate {p} {n}"),
                Call::Utimes(p, a, m) => format!("utimes {p} {a} {m}"),
                Call::LSetXattr(p, n) => format!("lsetxattr {p} {n}"),
                Call::GetXattr(p, n, s) => format!("getxattr {p} {n} size {s}"),
                Call::ListXattr(p) => format!("listxattr {p}"),
                Call::RemoveXattr(p, n) => format!("removexattr {p} {n}"),
                Call::RenameOut(p) => format!("rename {p} to another filesystem"),
                Call::Stat(p) => format!("stat {p}"),
                Call::List(p) => format!("list {p}"),
                Call::Readlink(p) => format!("readlink {p}"),
                _ => String::new(),
            };
            s
        }
    }
}

/// Third hostile finding of session 7, near the largest file size: `fallocate(PUNCH_HOLE |
/// KEEP_SIZE)` past the backing filesystem's limit succeeded (ext4: EFBIG), `ftruncate` to
/// 2^63 - 1 said EIO (ext4: EFBIG), and a pwrite that failed with EFBIG had grown the file.
/// Each against a plain directory of the same filesystem (the pwrite: where the two limits
/// differ by cmkfs's file header, a failed write must leave the size as it was and a short
/// one grow it to what it wrote).
#[test]
fn calls_past_the_largest_file_size_fail_as_on_the_backing_filesystem() {
    use std::os::unix::fs::FileExt;
    let env = Env::new();
    env.init(&env.cipher);
    let m = env.mount(&env.cipher, &env.mnt);
    let plain = env.dir("plain");
    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    let near_max = (1u64 << 44) - 4096 - 10;
    let mut results = Vec::new();
    for dir in [&plain, &env.mnt] {
        let p = dir.join("edge");
        fs::write(&p, b"hello").unwrap();
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        let errno = |r: i32| {
            (r != 0)
                .then(std::io::Error::last_os_error)
                .map(|e| e.raw_os_error())
        };
        use std::os::fd::AsRawFd;
        // SAFETY: plain system calls on a descriptor the test holds open.
        let punched = errno(unsafe { libc::fallocate(f.as_raw_fd(), punch, 0, 1 << 44) });
        let truncated = f.set_len(i64::MAX as u64).map_err(|e| e.raw_os_error());
        let written = f.write_at(&[b'y'; 10], near_max);
        let size = f.metadata().unwrap().len();
        match &written {
            Ok(n) => assert_eq!(size, near_max + *n as u64, "{}", p.display()),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EFBIG), "{}", p.display());
                assert_eq!(size, 5, "a failed pwrite grew {}", p.display());
            }
        }
        let mut head = [0u8; 5];
        f.read_exact_at(&mut head, 0).unwrap();
        assert_eq!(&head, b"hello");
        results.push((punched, truncated));
        // A 16 TiB sparse file left for the harness's cleanup costs it seconds.
        drop(f);
        fs::remove_file(&p).unwrap();
    }
    assert_eq!(
        results[1], results[0],
        "cmkfs (right) and the plain directory (left) differ"
    );
    m.unmount();
}
