//! Writers whose descriptors no process the test spawns inherits.
//!
//! A descriptor open in the test's descriptor table is inherited by every child the test
//! spawns (a `cmkfs backup`) and closed at the child's `exec` (O_CLOEXEC). A close of a FUSE
//! file sends FLUSH, which waits for the file's whole write-back: spawning a backup would
//! itself drain the kernel's cached writes before the backup starts, and a bug of the
//! backup's own drain could not show.

use std::thread::JoinHandle;

/// `std::thread::spawn` of a thread that first takes a descriptor table of its own
/// (`unshare(CLONE_FILES)`, a copy of the test's): what it opens stays out of the test's
/// table, so out of every process the test spawns, and is closed when the thread ends.
/// Panics (in the thread) if `unshare(2)` fails.
pub fn spawn_own_files<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
    std::thread::spawn(move || {
        // SAFETY: unshare(2) of this thread's descriptor table only.
        let r = unsafe { libc::unshare(libc::CLONE_FILES) };
        assert_eq!(
            r,
            0,
            "unshare(CLONE_FILES): {}",
            std::io::Error::last_os_error()
        );
        f()
    })
}
