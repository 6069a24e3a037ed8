//! A writer of the backing store swaps entries behind the kernel's back (second review,
//! findings C3 and the entry part of C4). The daemon runs as root: if it ever followed a
//! symlink planted in the backing store, or acted on an inode other than the one the kernel
//! asked about, an unprivileged user of an `--allow-other` mount could make root chmod, chown,
//! truncate, write or create things outside the volume. The review did exactly that on the
//! release before the descriptor-based volume layer:
//!
//! ```text
//! alice$ ln -s /tmp/rootonly $BD/sl && mv -T $BD/sl $BD$F; chmod 666 m3/alice/x
//! ```
//!
//! made `/tmp/rootonly` 0666, and a parent directory swapped for a symlink while cached made
//! the daemon create a new file outside the volume. These tests repeat those steps for every
//! operation that takes a name or a cached inode, as an unprivileged user (a fresh uid, on an
//! `--allow-other` mount) and as root racing a backing-store writer (which can also plant hard
//! links and FIFOs), and check that nothing outside the volume changed. Planted FIFOs,
//! `/dev/zero` links and huge files as directory ids or long-name side files must neither
//! block a request nor make the daemon allocate them.

use crate::common;

use std::ffi::CString;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::sys::{as_user, cpath, rc};
use common::*;

/// The unprivileged user (no account needed: a uid the test switches to).
const ALICE: u32 = 4301;
/// Owner of the outside file a root writer hard-links into the backing store.
const CAROL: u32 = 4302;

/// The backing entry of mount path `p` (found by inode: the mount shows backing numbers).
fn backing_of(env: &Env, p: &Path) -> PathBuf {
    let ino = fs::symlink_metadata(p).unwrap().ino();
    walk(&env.cipher)
        .into_iter()
        .find(|b| fs::symlink_metadata(b).map(|m| m.ino()).ok() == Some(ino))
        .unwrap_or_else(|| panic!("no backing entry for {}", p.display()))
}

fn xattrs(p: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let c = cpath(p);
    let mut names = vec![0u8; 4096];
    // SAFETY: valid C path and buffer.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n <= 0 {
        return Vec::new();
    }
    names.truncate(n as usize);
    names
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
        .map(|n| {
            let cn = CString::new(n).unwrap();
            let mut v = vec![0u8; 4096];
            // SAFETY: valid C strings and buffer.
            let len =
                unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
            v.truncate(len.max(0) as usize);
            (n.to_vec(), v)
        })
        .collect()
}

/// Everything about `p` (and, for a directory, its entries) that an escape could change. The
/// link count is left out: a hard link planted in the backing store is the attack itself.
fn state(p: &Path) -> String {
    let m = fs::symlink_metadata(p).unwrap();
    let mut s = format!(
        "{}: mode {:o} uid {} gid {} size {} mtime {}.{} xattrs {:?}",
        p.display(),
        m.mode(),
        m.uid(),
        m.gid(),
        m.size(),
        m.mtime(),
        m.mtime_nsec(),
        xattrs(p)
    );
    if m.is_file() {
        s += &format!(" data {:?}", fs::read(p).unwrap());
    }
    if m.is_dir() {
        let mut names: Vec<PathBuf> = fs::read_dir(p)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        names.sort();
        for n in names {
            s += "\n  ";
            s += &state(&n);
        }
    }
    s
}

fn chown(p: &Path, uid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), Some(uid)).unwrap();
}

fn set_xattr(p: &Path, name: &str, value: &[u8]) {
    let (c, n) = (cpath(p), CString::new(name).unwrap());
    // SAFETY: valid C strings and buffer.
    let r = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(r, 0, "setxattr {}", p.display());
}

/// Operations on one entry whose backing entry was swapped.
#[derive(Clone, Copy, Debug)]
enum EntryOp {
    Chmod,
    Chown,
    Utimens,
    Truncate,
    OpenTruncWrite,
    OpenRead,
    Setxattr,
    Removexattr,
    Link,
    Rename,
    Unlink,
    Readlink,
}

const ENTRY_OPS: [EntryOp; 12] = [
    EntryOp::Chmod,
    EntryOp::Chown,
    EntryOp::Utimens,
    EntryOp::Truncate,
    EntryOp::OpenTruncWrite,
    EntryOp::OpenRead,
    EntryOp::Setxattr,
    EntryOp::Removexattr,
    EntryOp::Link,
    EntryOp::Rename,
    EntryOp::Unlink,
    EntryOp::Readlink,
];

/// Operations in (or on) a directory whose backing directory was swapped.
#[derive(Clone, Copy, Debug)]
enum DirOp {
    Create,
    Mkdir,
    Mknod,
    Symlink,
    LinkInto,
    RenameInto,
    Unlink,
    Rmdir,
    Readdir,
    Chmod,
    Setxattr,
}

const DIR_OPS: [DirOp; 11] = [
    DirOp::Create,
    DirOp::Mkdir,
    DirOp::Mknod,
    DirOp::Symlink,
    DirOp::LinkInto,
    DirOp::RenameInto,
    DirOp::Unlink,
    DirOp::Rmdir,
    DirOp::Readdir,
    DirOp::Chmod,
    DirOp::Setxattr,
];

/// How the backing entry is swapped.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Swap {
    /// `ln -s TARGET tmp && mv -T tmp ENTRY` (anyone who can write the backing dir).
    Symlink,
    /// A hard link to the target (a root writer; `protected_hardlinks` stops others).
    Hardlink,
    /// A FIFO (must not block the request).
    Fifo,
}

/// Paths prepared before a fork (the child makes raw system calls only).
struct Prep {
    view: CString,
    view2: CString,
    backing: CString,
    tmp: CString,
    moved: CString,
    target: CString,
}

/// Runs `f` as `uid` in a forked child, or as root in this process.
fn run_as(uid: Option<u32>, f: impl FnOnce() -> i32) -> i32 {
    match uid {
        Some(u) => as_user(u, u, &[], f),
        None => f(),
    }
}

/// The attacker's steps on a file entry: cache it, swap its backing entry, act through the
/// view. Returns the op's errno (0 = it succeeded, which is fine as long as nothing outside
/// changed), or 100+ if the swap itself failed.
fn entry_attack(p: &Prep, swap: Swap, op: EntryOp) -> i32 {
    // SAFETY: raw system calls on prepared C strings and stack buffers.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::lstat(p.view.as_ptr(), &mut st) != 0 {
            return 100;
        }
        let planted = match swap {
            Swap::Symlink => libc::symlink(p.target.as_ptr(), p.tmp.as_ptr()),
            Swap::Hardlink => libc::link(p.target.as_ptr(), p.tmp.as_ptr()),
            Swap::Fifo => libc::mkfifo(p.tmp.as_ptr(), 0o666),
        };
        if planted != 0 {
            return 101;
        }
        if libc::rename(p.tmp.as_ptr(), p.backing.as_ptr()) != 0 {
            return 102;
        }
        // Root gives the file away (to ALICE), a user takes it (a no-op for its own file).
        let uid = match libc::geteuid() {
            0 => ALICE,
            u => u,
        };
        let ts = [
            libc::timespec {
                tv_sec: 1,
                tv_nsec: 0,
            },
            libc::timespec {
                tv_sec: 1,
                tv_nsec: 0,
            },
        ];
        let x = c"user.x".as_ptr();
        match op {
            EntryOp::Chmod => rc(libc::chmod(p.view.as_ptr(), 0o6777)),
            EntryOp::Chown => rc(libc::chown(p.view.as_ptr(), uid, uid)),
            EntryOp::Utimens => rc(libc::utimensat(
                libc::AT_FDCWD,
                p.view.as_ptr(),
                ts.as_ptr(),
                0,
            )),
            EntryOp::Truncate => rc(libc::truncate(p.view.as_ptr(), 0)),
            EntryOp::OpenTruncWrite => {
                let fd = libc::open(p.view.as_ptr(), libc::O_WRONLY | libc::O_TRUNC);
                if fd < 0 {
                    return rc(fd);
                }
                libc::write(fd, b"owned".as_ptr().cast(), 5);
                libc::close(fd);
                0
            }
            EntryOp::OpenRead => {
                let fd = libc::open(p.view.as_ptr(), libc::O_RDONLY);
                if fd < 0 {
                    return rc(fd);
                }
                let mut buf = [0u8; 64];
                let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
                libc::close(fd);
                if n > 0 && buf[..n as usize].windows(6).any(|w| w == b"secret") {
                    return 99;
                }
                0
            }
            EntryOp::Setxattr => rc(libc::setxattr(
                p.view.as_ptr(),
                x,
                b"v".as_ptr().cast(),
                1,
                0,
            )),
            EntryOp::Removexattr => rc(libc::removexattr(p.view.as_ptr(), c"user.keep".as_ptr())),
            EntryOp::Link => rc(libc::link(p.view.as_ptr(), p.view2.as_ptr())),
            EntryOp::Rename => rc(libc::rename(p.view.as_ptr(), p.view2.as_ptr())),
            EntryOp::Unlink => rc(libc::unlink(p.view.as_ptr())),
            EntryOp::Readlink => {
                let mut buf = [0u8; 256];
                let n = libc::readlink(p.view.as_ptr(), buf.as_mut_ptr().cast(), buf.len());
                if n > 0 && buf[..n as usize].windows(6).any(|w| w == b"secret") {
                    return 99;
                }
                rc(n as i32)
            }
        }
    }
}

/// The attacker's steps on a directory: cache it, move its backing directory aside and put a
/// symlink to `target` in its place, act through the view.
fn dir_attack(p: &Prep, op: DirOp, src: &CString) -> i32 {
    // SAFETY: raw system calls on prepared C strings and stack buffers.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::lstat(p.view.as_ptr(), &mut st) != 0 || libc::lstat(p.view2.as_ptr(), &mut st) != 0
        {
            return 100;
        }
        if libc::rename(p.backing.as_ptr(), p.moved.as_ptr()) != 0 {
            return 101;
        }
        if libc::symlink(p.target.as_ptr(), p.backing.as_ptr()) != 0 {
            return 102;
        }
        let dirfd = libc::open(p.view.as_ptr(), libc::O_PATH | libc::O_DIRECTORY);
        let r = match op {
            DirOp::Create => {
                let fd = libc::openat(
                    dirfd,
                    c"new".as_ptr(),
                    libc::O_CREAT | libc::O_WRONLY,
                    0o644,
                );
                if fd >= 0 {
                    libc::close(fd);
                }
                rc(fd)
            }
            DirOp::Mkdir => rc(libc::mkdirat(dirfd, c"newdir".as_ptr(), 0o755)),
            DirOp::Mknod => rc(libc::mknodat(
                dirfd,
                c"fifo".as_ptr(),
                libc::S_IFIFO | 0o644,
                0,
            )),
            DirOp::Symlink => rc(libc::symlinkat(c"/etc".as_ptr(), dirfd, c"sl".as_ptr())),
            DirOp::LinkInto => rc(libc::linkat(
                libc::AT_FDCWD,
                src.as_ptr(),
                dirfd,
                c"lnk".as_ptr(),
                0,
            )),
            DirOp::RenameInto => rc(libc::renameat(
                libc::AT_FDCWD,
                src.as_ptr(),
                dirfd,
                c"moved".as_ptr(),
            )),
            // `view2` is the decoy entry, whose backing copy the outside directory holds too.
            DirOp::Unlink => rc(libc::unlink(p.view2.as_ptr())),
            DirOp::Rmdir => rc(libc::rmdir(p.view2.as_ptr())),
            DirOp::Readdir => {
                let fd = libc::open(p.view.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY);
                if fd < 0 {
                    return rc(fd);
                }
                let mut buf = [0u8; 16384];
                let mut seen = 0;
                loop {
                    let n = libc::syscall(libc::SYS_getdents64, fd, buf.as_mut_ptr(), buf.len());
                    if n <= 0 {
                        break;
                    }
                    if buf[..n as usize].windows(12).any(|w| w == b"only-outside") {
                        seen = 99;
                    }
                }
                libc::close(fd);
                seen
            }
            DirOp::Chmod => rc(libc::chmod(p.view.as_ptr(), 0o777)),
            DirOp::Setxattr => rc(libc::setxattr(
                p.view.as_ptr(),
                c"user.x".as_ptr(),
                b"v".as_ptr().cast(),
                1,
                0,
            )),
        };
        if dirfd >= 0 {
            libc::close(dirfd);
        }
        r
    }
}

/// A volume mounted `--allow-other` with its temp root opened up, and `alice/` (owned by
/// ALICE) in it; `outside/` beside it, owned by root.
fn setup() -> (Env, Mount, PathBuf) {
    let env = Env::new();
    env.init(&env.cipher);
    fs::set_permissions(&env.root, fs::Permissions::from_mode(0o755)).unwrap();
    let m = env.mount_with(&env.cipher, &env.mnt, &["--allow-other"]);
    fs::set_permissions(&env.mnt, fs::Permissions::from_mode(0o755)).unwrap();
    fs::create_dir(m.path("alice")).unwrap();
    chown(&m.path("alice"), ALICE);
    let outside = env.dir("outside");
    fs::set_permissions(&outside, fs::Permissions::from_mode(0o755)).unwrap();
    (env, m, outside)
}

/// A file outside the volume that nobody but its owner may touch: 0600, an xattr, content.
fn outside_file(outside: &Path, name: &str, owner: u32) -> PathBuf {
    let f = outside.join(name);
    fs::write(&f, b"root secret").unwrap();
    fs::set_permissions(&f, fs::Permissions::from_mode(0o600)).unwrap();
    set_xattr(&f, "user.keep", b"kept");
    chown(&f, owner);
    f
}

/// Runs every [`EntryOp`] with `swap` as `uid` (None: root) and checks the outside target.
fn attack_entries(env: &Env, m: &Mount, outside: &Path, uid: Option<u32>, swap: Swap) {
    let owner = if swap == Swap::Hardlink { CAROL } else { 0 };
    for op in ENTRY_OPS {
        let tag = format!("{swap:?}-{op:?}").to_lowercase();
        let target = outside_file(outside, &tag, owner);
        let before = state(&target);
        let view = m.path(format!("alice/{tag}"));
        match op {
            EntryOp::Readlink => std::os::unix::fs::symlink("some/where", &view).unwrap(),
            _ => write(&view, b"alice's file"),
        }
        chown(&view, ALICE);
        let backing = backing_of(env, &view);
        let p = Prep {
            view: cpath(&view),
            view2: cpath(&m.path(format!("alice/{tag}-2"))),
            tmp: cpath(&backing.with_file_name(format!("{tag}.planted"))),
            moved: cpath(&backing.with_file_name(format!("{tag}.moved"))),
            backing: cpath(&backing),
            target: cpath(&target),
        };
        let code = run_as(uid, || entry_attack(&p, swap, op));
        assert!(
            code < 99,
            "{tag}: the attack's setup failed ({code}), or it read outside"
        );
        println!("{tag} as {uid:?}: {}", common::sys::ename(code));
        assert_eq!(state(&target), before, "{tag}: changed outside the volume");
        // A FIFO must not have hung the request (the watchdog would have); the volume
        // keeps working.
        write(&m.path("alice/alive"), b"ok");
    }
}

/// Runs every [`DirOp`] as `uid` on a directory swapped for a symlink to an outside
/// directory that holds copies of the directory's own backing entries (so that a daemon
/// following the symlink would find the names it looks for) and one entry of its own.
fn attack_dirs(env: &Env, m: &Mount, outside: &Path, uid: Option<u32>) {
    for op in DIR_OPS {
        let tag = format!("dir-{op:?}").to_lowercase();
        let d = m.path(format!("alice/{tag}"));
        fs::create_dir(&d).unwrap();
        write(&d.join("decoy"), b"decoy");
        fs::create_dir(d.join("decoydir")).unwrap();
        write(&d.join("only-outside"), b"x");
        let src = m.path(format!("alice/{tag}-src"));
        write(&src, b"src");
        for p in [
            &d,
            &d.join("decoy"),
            &d.join("decoydir"),
            &d.join("only-outside"),
            &src,
        ] {
            chown(p, ALICE);
        }
        let bd = backing_of(env, &d);
        // The outside directory: root's, 0700, with copies of the backing entries.
        let target = outside.join(&tag);
        fs::create_dir(&target).unwrap();
        for name in ["decoy", "decoydir"] {
            let b = backing_of(env, &d.join(name));
            let to = target.join(b.file_name().unwrap());
            if b.is_dir() {
                fs::create_dir(&to).unwrap();
                fs::copy(b.join(".cmkfs.dirid"), to.join(".cmkfs.dirid")).unwrap();
            } else {
                fs::copy(&b, &to).unwrap();
            }
        }
        fs::copy(bd.join(".cmkfs.dirid"), target.join(".cmkfs.dirid")).unwrap();
        let only = backing_of(env, &d.join("only-outside"));
        fs::rename(&only, target.join(only.file_name().unwrap())).unwrap();
        fs::set_permissions(&target, fs::Permissions::from_mode(0o700)).unwrap();
        let before = state(&target);
        let view2 = match op {
            DirOp::Rmdir => d.join("decoydir"),
            _ => d.join("decoy"),
        };
        let p = Prep {
            view: cpath(&d),
            view2: cpath(&view2),
            tmp: cpath(&bd.with_file_name(format!("{tag}.planted"))),
            moved: cpath(&bd.with_file_name(format!("{tag}.moved"))),
            backing: cpath(&bd),
            target: cpath(&target),
        };
        let csrc = cpath(&src);
        let code = run_as(uid, || dir_attack(&p, op, &csrc));
        assert!(
            code < 99,
            "{tag}: the attack's setup failed ({code}), or it listed outside"
        );
        println!("{tag} as {uid:?}: {}", common::sys::ename(code));
        assert_eq!(state(&target), before, "{tag}: changed outside the volume");
        write(&m.path("alice/alive"), b"ok");
    }
}

/// C3 as the review did it: an unprivileged user who owns a directory of an `--allow-other`
/// volume (and so can write its backing directory) swaps entries for symlinks to root's files
/// and directories, within the kernel's attribute and entry cache, and acts through the view.
#[test]
fn an_unprivileged_user_cannot_make_the_daemon_act_outside_the_volume() {
    let (env, m, outside) = setup();
    attack_entries(&env, &m, &outside, Some(ALICE), Swap::Symlink);
    attack_dirs(&env, &m, &outside, Some(ALICE));
    m.unmount();
}

/// C3 as root racing a backing-store writer, who can also plant hard links to files outside
/// the volume and FIFOs: the daemon acts only on the inode the kernel asked about, never on
/// what now holds the name, and never blocks on a FIFO.
#[test]
fn root_never_acts_on_an_entry_swapped_behind_the_kernel() {
    let (env, m, outside) = setup();
    for swap in [Swap::Symlink, Swap::Hardlink, Swap::Fifo] {
        attack_entries(&env, &m, &outside, None, swap);
    }
    attack_dirs(&env, &m, &outside, None);
    m.unmount();
}

fn peak_rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .expect("VmHWM")
}

fn mkfifo(p: &Path) {
    let c = cpath(p);
    // SAFETY: a valid C path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

/// C4 (entries): long-name side files and directory ids replaced by a FIFO, a symlink to
/// `/dev/zero` or a huge sparse file. Listing and looking up must end at once (the entry is
/// hidden or EIO), two such entries side by side must not wedge the mount, and the daemon
/// must not allocate what they point at.
#[test]
fn planted_side_files_and_directory_ids_neither_block_nor_exhaust_the_mount() {
    let env = Env::new();
    env.init(&env.cipher);
    let m = env.mount(&env.cipher, &env.mnt);
    let long = |tag: &str| format!("{tag}-{}", "n".repeat(200));
    let plants = ["fifo", "zero", "huge"];
    for p in plants {
        write(&m.path(long(p)), p.as_bytes());
        fs::create_dir(m.path(format!("dir-{p}"))).unwrap();
        write(&m.path(format!("dir-{p}/f")), b"inside");
    }
    write(&m.path(long("good")), b"good");
    let side: Vec<PathBuf> = plants
        .iter()
        .map(|p| {
            let b = backing_of(&env, &m.path(long(p)));
            let mut s = b.into_os_string();
            s.push(".name");
            PathBuf::from(s)
        })
        .collect();
    let ids: Vec<PathBuf> = plants
        .iter()
        .map(|p| backing_of(&env, &m.path(format!("dir-{p}"))).join(".cmkfs.dirid"))
        .collect();
    m.unmount();
    for (i, what) in plants.iter().enumerate() {
        for f in [&side[i], &ids[i]] {
            assert!(f.is_file(), "{}", f.display());
            fs::remove_file(f).unwrap();
            match *what {
                "fifo" => mkfifo(f),
                "zero" => std::os::unix::fs::symlink("/dev/zero", f).unwrap(),
                _ => fs::File::create(f).unwrap().set_len(4 << 30).unwrap(),
            }
        }
    }
    let m = env.mount(&env.cipher, &env.mnt);
    // The watchdog turns a hang into a failure; each call must come back.
    for _ in 0..2 {
        let names: Vec<String> = fs::read_dir(&env.mnt)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.contains(&long("good")), "{names:?}");
        for p in plants {
            assert!(
                !names.contains(&long(p)),
                "{p}: shown although its side file is not one"
            );
            // A lookup needs no side file (the entry's name is the hash of the sealed name).
            let _ = fs::read(m.path(long(p)));
            let err = fs::read_dir(m.path(format!("dir-{p}")))
                .map(|_| ())
                .expect_err(p);
            assert_eq!(err.raw_os_error(), Some(libc::EIO), "{p}: {err}");
        }
    }
    assert_eq!(read(&m.path(long("good"))), b"good");
    let pid = m.daemon_pid().expect("daemon pid");
    let peak = peak_rss_kib(pid);
    assert!(
        peak < 200 * 1024,
        "the daemon read a planted file: peak RSS {peak} KiB"
    );
    m.unmount();
    // fsck walks the same files by path (it hung on the FIFOs and read the 4 GiB file whole):
    // it ends within the command time limit and reports them.
    let out = env.cmkfs(&["fsck".as_ref(), env.cipher.as_os_str()]);
    assert!(!out.ok(), "fsck found nothing wrong:\n{out}");
    assert!(
        out.stdout.contains("dirid") || out.stdout.contains("directory id"),
        "{out}"
    );
}
