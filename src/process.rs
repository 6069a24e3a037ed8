//! Process-wide protections set once at start-up: no core dumps, a private umask for what
//! cmkfs writes, and a quiet end on a closed pipe.
//!
//! * [`forbid_core_dumps`]: `RLIMIT_CORE` 0 (soft and hard) and `PR_SET_DUMPABLE` 0, so a crash
//!   never writes the process's memory (keys, plaintext buffers) to disk, and other processes
//!   of the same user cannot attach to it or read `/proc/PID/mem` (root with
//!   `CAP_SYS_PTRACE` still can: that is out of reach of any process protection).
//! * [`private_umask`]: umask 077 for the whole process, so every state file and directory
//!   cmkfs creates is 0600/0700 whatever umask it was started with. The mount daemon gives its
//!   FUSE threads umask 0 again (backing entries must get exactly the modes the kernel asks
//!   for) and its state-writing threads their own umask ([`private_thread_umask`]).
//! * [`default_sigpipe`]: a command whose output goes to a closed pipe (`cmkfs status |
//!   head`) ends the way Unix tools do, by SIGPIPE, instead of panicking on `EPIPE`.
//! * [`ignore_file_size_signal`]: a file-size limit turns a backing write into `EFBIG` for
//!   the writer instead of killing the daemon.

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};

/// The umask cmkfs was started with (before [`private_umask`]), for what it creates on the
/// user's behalf outside its home (a new cipher directory).
static USER_UMASK: AtomicU32 = AtomicU32::new(0o022);

/// Disables core dumps for this process for good (see the module docs).
pub fn forbid_core_dumps() -> io::Result<()> {
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit and prctl with plain integer arguments.
    unsafe {
        if libc::setrlimit(libc::RLIMIT_CORE, &zero) != 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Whether this process is dumpable (`PR_GET_DUMPABLE`).
pub fn dumpable() -> bool {
    // SAFETY: prctl PR_GET_DUMPABLE takes no pointers.
    unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) != 0 }
}

/// The soft `RLIMIT_CORE` of this process, in bytes.
pub fn core_limit() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into `r`.
    if unsafe { libc::getrlimit(libc::RLIMIT_CORE, &mut r) } != 0 {
        return u64::MAX;
    }
    r.rlim_cur
}

/// Sets the process umask to 077 and remembers the previous one ([`user_umask`]).
pub fn private_umask() {
    // SAFETY: umask has no preconditions.
    let old = unsafe { libc::umask(0o077) };
    USER_UMASK.store(old as u32, Ordering::Relaxed);
}

/// The umask the process was started with.
pub fn user_umask() -> u32 {
    USER_UMASK.load(Ordering::Relaxed)
}

/// Gives the calling thread a umask of its own (077), independent of the process's: the mount
/// daemon's monitor writes state files while FUSE threads run with umask 0.
pub fn private_thread_umask() -> io::Result<()> {
    // SAFETY: unshare(CLONE_FS) copies this thread's cwd/root/umask so that changing the
    // umask below affects this thread (and what it spawns) only.
    unsafe {
        if libc::unshare(libc::CLONE_FS) != 0 {
            return Err(io::Error::last_os_error());
        }
        libc::umask(0o077);
    }
    Ok(())
}

/// Lets SIGPIPE end the process, as for any Unix command writing to a closed pipe (Rust
/// ignores it by default, which turns `println!` into a panic on `EPIPE`). Not for daemons:
/// they must survive a reader that went away.
pub fn default_sigpipe() {
    // SAFETY: restoring the default disposition of one signal.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Ignores SIGPIPE again (Rust's default): for the daemon and the server, which must survive
/// a reader that went away (writes then fail with `EPIPE`).
pub fn ignore_sigpipe() {
    // SAFETY: setting the disposition of one signal.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
}

/// Ignores SIGXFSZ: with a file-size limit (`ulimit -f`) inherited from the shell, a backing
/// write past it would otherwise kill the mount daemon silently and leave the mount dead
/// (ENOTCONN); ignored, the write fails with `EFBIG`, which reaches the writer as its error.
pub fn ignore_file_size_signal() {
    // SAFETY: setting the disposition of one signal.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

/// Raises the soft limit of open descriptors to the hard one (a mount daemon: after an
/// online re-encryption it holds one `O_PATH` descriptor per replaced symlink, which keeps
/// the symlink's inode number; past the limit a symlink shows its new number instead).
pub fn raise_open_files() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_dumps_are_forbidden_for_good() {
        // In a child: the test process itself stays dumpable.
        // SAFETY: the child only makes async-signal-safe calls before _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let ok = forbid_core_dumps().is_ok() && !dumpable() && core_limit() == 0;
            // SAFETY: leave the child without running the parent's destructors.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
    }

    #[test]
    fn thread_umask_is_private() {
        std::thread::spawn(|| {
            private_thread_umask().unwrap();
            // SAFETY: reading and restoring this thread's own umask.
            let mine = unsafe { libc::umask(0o077) };
            assert_eq!(mine, 0o077);
        })
        .join()
        .unwrap();
    }
}
