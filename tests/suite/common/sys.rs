//! Raw system calls for the POSIX tests: errno results, readable errno names, and running a
//! closure as another user in a forked child.

use std::ffi::CString;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use std::os::unix::ffi::OsStrExt;

pub fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

pub fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Turns a libc return value into `Ok(value)` or `Err(errno)`.
pub fn sys(r: libc::c_int) -> Result<libc::c_int, i32> {
    if r < 0 {
        Err(errno())
    } else {
        Ok(r)
    }
}

pub fn sys_size(r: isize) -> Result<usize, i32> {
    if r < 0 {
        Err(errno())
    } else {
        Ok(r as usize)
    }
}

/// A readable name for an errno (0 = success), for messages.
pub fn ename(e: i32) -> String {
    if e == 0 {
        return "success".into();
    }
    let names: &[(i32, &str)] = &[
        (libc::EPERM, "EPERM"),
        (libc::ENOENT, "ENOENT"),
        (libc::EIO, "EIO"),
        (libc::EAGAIN, "EAGAIN/EWOULDBLOCK"),
        (libc::EACCES, "EACCES"),
        (libc::EEXIST, "EEXIST"),
        (libc::EINVAL, "EINVAL"),
        (libc::ENOSPC, "ENOSPC"),
        (libc::ERANGE, "ERANGE"),
        (libc::ENOSYS, "ENOSYS"),
        (libc::ENODATA, "ENODATA"),
        (libc::EOPNOTSUPP, "EOPNOTSUPP"),
        (libc::ENXIO, "ENXIO"),
        (libc::EXDEV, "EXDEV"),
        (libc::ENOTEMPTY, "ENOTEMPTY"),
        (libc::E2BIG, "E2BIG"),
        (libc::ENOTCONN, "ENOTCONN"),
        (libc::ENOTDIR, "ENOTDIR"),
        (libc::EISDIR, "EISDIR"),
        (libc::ELOOP, "ELOOP"),
        (libc::ENAMETOOLONG, "ENAMETOOLONG"),
        (libc::EBUSY, "EBUSY"),
        (libc::EFBIG, "EFBIG"),
        (libc::EMLINK, "EMLINK"),
        (libc::EBADF, "EBADF"),
        (libc::ETXTBSY, "ETXTBSY"),
    ];
    match names.iter().find(|(n, _)| *n == e) {
        Some((_, s)) => format!("{s} ({e})"),
        None => format!("errno {e}"),
    }
}

/// Asserts that a call failed with one of `want` (or succeeded, if `want` contains 0).
#[track_caller]
pub fn expect_errno<T: std::fmt::Debug>(what: &str, got: Result<T, i32>, want: &[i32]) {
    let e = match &got {
        Ok(_) => 0,
        Err(e) => *e,
    };
    assert!(
        want.contains(&e),
        "{what}: got {} ({got:?}), expected {}",
        ename(e),
        want.iter()
            .map(|&w| ename(w))
            .collect::<Vec<_>>()
            .join(" or ")
    );
}

/// Unwraps an `Ok` or fails with the errno and what was expected.
#[track_caller]
pub fn ok<T>(what: &str, r: Result<T, i32>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("{what}: got {}, expected success", ename(e)),
    }
}

/// Runs `f` in a forked child as `uid`/`gid` with supplementary `groups`; returns the child's
/// exit status, which `f` makes 0 or an errno. `f` must only make raw system calls on data
/// prepared before the call (no allocation, no locks, no panics after fork).
pub fn as_user(uid: u32, gid: u32, groups: &[libc::gid_t], f: impl FnOnce() -> i32) -> i32 {
    // SAFETY: the child only makes async-signal-safe system calls, then _exit()s.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", ename(errno()));
    if pid == 0 {
        // SAFETY: plain system calls; the child never returns into the test harness.
        unsafe {
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setresgid(gid, gid, gid) != 0
                || libc::setresuid(uid, uid, uid) != 0
            {
                libc::_exit(200);
            }
            let r = f();
            libc::_exit(r);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut status = 0;
        // SAFETY: valid out-pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            assert!(
                libc::WIFEXITED(status),
                "child as uid {uid} died: status {status}"
            );
            let code = libc::WEXITSTATUS(status);
            assert_ne!(code, 200, "child could not switch to uid {uid}");
            return code;
        }
        if Instant::now() >= deadline {
            // SAFETY: kill/waitpid of our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            panic!("child as uid {uid} hung");
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// 0 or the errno of a libc call, inside a child of [`as_user`].
pub fn rc(r: libc::c_int) -> i32 {
    if r < 0 {
        errno()
    } else {
        0
    }
}
