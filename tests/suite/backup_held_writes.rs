//! A heavy cached writer during a backup's freeze (session 7's open question): the kernel
//! writes its pages back, and the mount holds those WRITEs until the thaw. Held WRITEs used
//! to take a FUSE thread each (the default is 2), and they filled the kernel's 16 background
//! slots: a `stat` of another file and a read of uncached pages then waited for the thaw
//! (19 s and 18 s of a 20 s freeze). Now they are kept off the FUSE threads and the mount
//! allows 64 background requests.

use crate::common;

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use common::*;

/// Bytes the writer writes during the freeze: past the FUSE device's dirty limit (about
/// 47 MiB), so the kernel must write pages back while the freeze holds them.
const WRITER_BYTES: usize = 64 << 20;

/// Runs `f` on a thread of its own; its result, or `None` past `limit`.
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).ok()
}

/// Requests the kernel has sent on the mount's FUSE connection and not had answered.
fn waiting(mnt: &Path) -> u64 {
    let Some(m) = mounts_at(mnt).pop() else {
        return 0;
    };
    fs::read_to_string(format!("/sys/fs/fuse/connections/{}/waiting", m.dev))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn block(i: usize) -> Vec<u8> {
    let mut b = vec![0u8; 1 << 20];
    for (j, c) in b.chunks_mut(8).enumerate() {
        c.copy_from_slice(&((i << 20 | j) as u64).to_le_bytes());
    }
    b
}

#[test]
fn held_write_backs_of_a_heavy_writer_leave_stat_and_uncached_reads_answered() {
    let env = Env::new();
    crate::backup::setup(&env);
    let m = env.mount_with(&env.cipher, &env.mnt, &["--freeze-limit", "30s"]);
    let cold = repeated(b"<read while the writer is held>", 4 << 20);
    fs::write(m.path("cold"), &cold).unwrap();
    fs::create_dir(m.path("d")).unwrap();
    fs::write(m.path("d/s"), b"small").unwrap();
    fs::write(m.path("w"), b"").unwrap();
    // Written back and out of the page cache: reading `cold` needs READs (readahead, which
    // the kernel sends as background requests).
    let f = fs::File::open(m.path("cold")).unwrap();
    f.sync_all().unwrap();
    // SAFETY: a valid descriptor.
    unsafe {
        libc::posix_fadvise(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            0,
            0,
            libc::POSIX_FADV_DONTNEED,
        )
    };
    drop(f);

    let archive = env.root.join("a.tar");
    let gate = env.root.join("gate");
    let cmd = env.command(&[
        "backup".as_ref(),
        env.cipher.as_os_str(),
        archive.as_os_str(),
    ]);
    let backup = run_to_gate(
        cmd,
        "CMKFS_TEST_BACKUP_HOLD",
        format!("frozen:{}", gate.display()),
        &gate,
    );

    // The writer: sequential 1 MiB blocks. It may itself be throttled (the kernel's dirty
    // limit) until the thaw: that is expected; it is never waited for here before the thaw.
    let p = m.path("w");
    let writer = std::thread::spawn(move || {
        let mut f = fs::OpenOptions::new().write(true).open(p).unwrap();
        for i in 0..WRITER_BYTES >> 20 {
            f.write_all(&block(i)).unwrap();
        }
        f
    });
    // Held write-backs: more requests waiting than the old limit of 16 background ones.
    let held = wait_until(Duration::from_secs(20), || waiting(&env.mnt) > 16);
    let n = waiting(&env.mnt);

    let p = m.path("d/s");
    let stat = within(Duration::from_secs(5), move || {
        fs::metadata(p).unwrap().len()
    });
    let p = m.path("cold");
    let read = within(Duration::from_secs(5), move || fs::read(p).unwrap());
    let p = env.mnt.clone();
    let listed = within(Duration::from_secs(5), move || {
        fs::read_dir(p).unwrap().count()
    });
    println!("requests waiting on the connection during the freeze: {n}");

    let out = backup.release();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        held,
        "the writer's write-backs never reached the mount ({n} waiting)"
    );
    assert_eq!(stat, Some(5), "a stat of another file waited for the thaw");
    assert!(
        read.as_deref() == Some(&cold[..]),
        "a read of uncached pages waited for the thaw (or read wrong bytes)"
    );
    assert_eq!(listed, Some(3), "a listing waited for the thaw");

    // After the thaw every held WRITE is applied, each block where it belongs (read back
    // after a remount: from the volume, not from the kernel's pages).
    let f = writer.join().unwrap();
    f.sync_all().unwrap();
    drop(f);
    m.unmount();
    let m = env.mount(&env.cipher, &env.mnt);
    let f = fs::File::open(m.path("w")).unwrap();
    assert_eq!(f.metadata().unwrap().len(), WRITER_BYTES as u64);
    let mut buf = vec![0u8; 1 << 20];
    for i in 0..WRITER_BYTES >> 20 {
        f.read_exact_at(&mut buf, (i << 20) as u64).unwrap();
        assert!(
            buf == block(i),
            "block {i} of the writer is wrong after the thaw"
        );
    }
    drop(f);
    m.unmount();
}
