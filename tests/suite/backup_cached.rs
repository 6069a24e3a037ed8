//! `cmkfs backup` of a mounted volume with the kernel's writeback cache (the default mode,
//! issue 15): the freeze drains the kernel's cached writes first, so the archive is one
//! point in time, every `write(2)` whole or absent. Writers of every shape run during the
//! backups (rewrites of 4 KiB..1 MiB at random offsets, `O_APPEND` records, write then
//! truncate, and an `mmap` writer, crash-consistent only); a long freeze lets cached
//! writers, readers and listings go on; a cut-off during a freeze with dirty pages ends the
//! freeze and the backup fails cleanly.

use crate::common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Longest wait for any step here: far past every step, far below a hang.
const GUARD: Duration = Duration::from_secs(40);

/// The stamp of write number `k` (never 0, which holes read as).
fn stamp(k: usize) -> u8 {
    (k % 250) as u8 + 1
}

/// What the writers did, in their own order.
#[derive(Default)]
struct Logs {
    /// `(offset, len)` of each rewrite of `r` (write `k` filled with `stamp(k + 1)`).
    rewrites: Vec<(u64, usize)>,
    /// Length of each record appended to `app` (record `k` filled with `stamp(k + 1)`).
    appends: Vec<usize>,
    /// The size `t` was truncated to after its write `k` (256 KiB of `stamp(k + 1)`).
    truncs: Vec<u64>,
}

const TRUNC_LEN: usize = 256 << 10;
const MMAP_LEN: usize = 1 << 20;

/// Starts the writers in `mnt`, each with a descriptor table of its own (the backups the
/// test spawns inherit none of their files: [`spawn_own_files`]); they run until `stop`. `aligned`: every offset and size a
/// multiple of 4 KiB (without the cache a `write(2)` that begins inside a page the kernel
/// does not hold is sent as two WRITEs, and only each WRITE is atomic: README).
fn writers(
    mnt: &Path,
    seed: u64,
    stop: &Arc<AtomicBool>,
    aligned: bool,
    done: &Arc<AtomicUsize>,
) -> Vec<std::thread::JoinHandle<Logs>> {
    let align = move |n: u64| if aligned { n & !4095 } else { n };
    let mut out = Vec::new();
    // Rewrites of 4 KiB..1 MiB (log-uniform) at random offsets below 4 MiB.
    {
        let (p, stop, done) = (mnt.join("r"), stop.clone(), done.clone());
        out.push(spawn_own_files(move || {
            let mut rng = StdRng::seed_from_u64(seed);
            let f = fs::File::create(p).unwrap();
            let mut logs = Logs::default();
            while !stop.load(Ordering::SeqCst) {
                let len = align((4096u64 << rng.gen_range(0..=8)) - rng.gen_range(0..4096))
                    .max(4096) as usize;
                let off = align(rng.gen_range(0..(4u64 << 20)));
                f.write_all_at(&vec![stamp(logs.rewrites.len() + 1); len], off)
                    .unwrap();
                logs.rewrites.push((off, len));
                done.store(logs.rewrites.len(), Ordering::SeqCst);
                // Paced: the check replays every rewrite.
                std::thread::sleep(Duration::from_millis(5));
            }
            logs
        }));
    }
    // O_APPEND records of 1..64 KiB.
    {
        let (p, stop) = (mnt.join("app"), stop.clone());
        out.push(spawn_own_files(move || {
            use std::io::Write;
            let mut rng = StdRng::seed_from_u64(seed + 1);
            let mut f = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .unwrap();
            let mut logs = Logs::default();
            while !stop.load(Ordering::SeqCst) {
                let len =
                    align(rng.gen_range(1..=64 << 10)).max(if aligned { 4096 } else { 1 }) as usize;
                f.write_all(&vec![stamp(logs.appends.len() + 1); len])
                    .unwrap();
                logs.appends.push(len);
                std::thread::sleep(Duration::from_millis(1));
            }
            logs
        }));
    }
    // Write 256 KiB, then truncate to a random size below.
    {
        let (p, stop) = (mnt.join("t"), stop.clone());
        out.push(spawn_own_files(move || {
            let mut rng = StdRng::seed_from_u64(seed + 2);
            let f = fs::File::create(p).unwrap();
            let mut logs = Logs::default();
            while !stop.load(Ordering::SeqCst) {
                let k = logs.truncs.len() + 1;
                f.write_all_at(&vec![stamp(k); TRUNC_LEN], 0).unwrap();
                let to = align(rng.gen_range(0..TRUNC_LEN as u64));
                f.set_len(to).unwrap();
                logs.truncs.push(to);
            }
            logs
        }));
    }
    // An mmap writer: random pages of a 1 MiB file, each filled with one stamp.
    {
        let (p, stop) = (mnt.join("m"), stop.clone());
        out.push(spawn_own_files(move || {
            use std::os::fd::AsRawFd;
            let mut rng = StdRng::seed_from_u64(seed + 3);
            let f = fs::OpenOptions::new()
                .create(true)
                .truncate(true)
                .read(true)
                .write(true)
                .open(p)
                .unwrap();
            f.set_len(MMAP_LEN as u64).unwrap();
            // SAFETY: a shared writable map of a file of that length, unmapped below.
            let base = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    MMAP_LEN,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    f.as_raw_fd(),
                    0,
                )
            };
            assert_ne!(base, libc::MAP_FAILED);
            let mut k = 0;
            while !stop.load(Ordering::SeqCst) {
                k += 1;
                let page = rng.gen_range(0..MMAP_LEN / SECTOR);
                // SAFETY: inside the map.
                unsafe {
                    std::ptr::write_bytes(base.cast::<u8>().add(page * SECTOR), stamp(k), SECTOR)
                };
                if k % 64 == 0 {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            // SAFETY: the map made above.
            unsafe { libc::munmap(base, MMAP_LEN) };
            Logs::default()
        }));
    }
    out
}

/// The `k` in `lo..=hi` for which `got` is `r` after the first `k` rewrites exactly, if
/// any.
fn rewrite_prefix(rewrites: &[(u64, usize)], got: &[u8], lo: usize, hi: usize) -> Option<usize> {
    let end = rewrites
        .iter()
        .map(|(o, l)| *o as usize + l)
        .max()
        .unwrap_or(0);
    let mut cur = vec![0u8; end.max(got.len())];
    let mut size = 0usize;
    for (k, (off, len)) in rewrites[..lo].iter().enumerate() {
        cur[*off as usize..*off as usize + len].fill(stamp(k + 1));
        size = size.max(*off as usize + len);
    }
    // Positions below got.len() where the replay differs from what was restored.
    let mut diff = cur[..got.len()]
        .iter()
        .zip(got)
        .filter(|(a, b)| a != b)
        .count();
    if diff == 0 && size == got.len() {
        return Some(lo);
    }
    for (k, (off, len)) in rewrites.iter().enumerate().take(hi).skip(lo) {
        let s = stamp(k + 1);
        let (off, len) = (*off as usize, *len);
        for p in off..off + len {
            if p < got.len() {
                let before = cur[p] != got[p];
                let after = s != got[p];
                match (before, after) {
                    (true, false) => diff -= 1,
                    (false, true) => diff += 1,
                    _ => {}
                }
            }
            cur[p] = s;
        }
        size = size.max(off + len);
        if diff == 0 && size == got.len() {
            return Some(k + 1);
        }
    }
    None
}

/// The number of whole records `got` holds, if it is exactly a prefix of the appends.
fn append_prefix(appends: &[usize], got: &[u8]) -> Option<usize> {
    let mut pos = 0;
    for (k, len) in appends.iter().enumerate() {
        if pos == got.len() {
            return Some(k);
        }
        let rec = got.get(pos..pos + len)?;
        if rec.iter().any(|b| *b != stamp(k + 1)) {
            return None;
        }
        pos += len;
    }
    (pos == got.len()).then_some(appends.len())
}

/// True when `got` is `t` after some write (256 KiB of its stamp) or some truncate.
fn trunc_state_ok(truncs: &[u64], got: &[u8]) -> bool {
    if got.is_empty() {
        return true;
    }
    let s = got[0];
    got.iter().all(|b| *b == s)
        && (got.len() == TRUNC_LEN
            || truncs
                .iter()
                .enumerate()
                .any(|(k, to)| stamp(k + 1) == s && *to as usize == got.len()))
}

/// Backs the mounted volume up `rounds` times while the writers run, then checks each
/// archive restored: every file one state of its writer's sequence.
fn backups_under_writers(env: &Env, rounds: usize, aligned: bool) {
    let s = seed("backup under cached writers");
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let m = env.mount(&env.cipher, &env.mnt);
    let threads = writers(&env.mnt, s, &stop, aligned, &done);
    std::thread::sleep(Duration::from_millis(300));
    let mut archives = Vec::new();
    // The rewrites done before each backup began, and by the time it ended.
    let mut windows = Vec::new();
    for i in 0..rounds {
        let before = done.load(Ordering::SeqCst);
        let archive = env.root.join(format!("live-{i}.tar"));
        let b = json(&env.cmkfs(&[
            "backup".as_ref(),
            env.cipher.as_os_str(),
            archive.as_os_str(),
            "--json".as_ref(),
        ]));
        assert_eq!(b["point_in_time"], true, "{b}");
        println!("backup {i}: freeze {} s", b["freeze_seconds"]);
        windows.push((before, done.load(Ordering::SeqCst)));
        archives.push(archive);
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::SeqCst);
    let logs: Vec<Logs> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    m.unmount();
    println!(
        "writers: {} rewrites, {} appends, {} truncates",
        logs[0].rewrites.len(),
        logs[1].appends.len(),
        logs[2].truncs.len()
    );
    assert!(
        logs[0].rewrites.len() > 2 && logs[1].appends.len() > 2 && logs[2].truncs.len() > 2,
        "the writers did not run"
    );
    for (i, archive) in archives.iter().enumerate() {
        let target = env.root.join(format!("r{i}"));
        crate::backup::restore_to(env, archive, &target, &[]).assert_ok();
        let mnt = env.dir(&format!("m{i}"));
        let m = env.mount(&target, &mnt);
        let r = fs::read(mnt.join("r")).unwrap();
        let (lo, hi) = windows[i];
        let k = rewrite_prefix(&logs[0].rewrites, &r, lo, hi);
        assert!(
            k.is_some(),
            "backup {i}: r ({} bytes) is no state of its writer during the backup (rewrites \
             {lo}..={hi}; seed {s})",
            r.len()
        );
        let app = fs::read(mnt.join("app")).unwrap();
        let j = append_prefix(&logs[1].appends, &app);
        assert!(
            j.is_some(),
            "backup {i}: app ({} bytes) is no whole number of records (seed {s})",
            app.len()
        );
        let t = fs::read(mnt.join("t")).unwrap();
        assert!(
            trunc_state_ok(&logs[2].truncs, &t),
            "backup {i}: t ({} bytes, first {:?}) is no state of its writer (seed {s})",
            t.len(),
            t.first()
        );
        // mmap: crash-consistent only, so no order is checked; the size and that every
        // byte is one the writer wrote (or a hole).
        let mm = fs::read(mnt.join("m")).unwrap();
        assert_eq!(mm.len(), MMAP_LEN, "backup {i}: m");
        println!(
            "backup {i}: r after {} rewrites, app after {} records, t {} bytes",
            k.unwrap(),
            j.unwrap(),
            t.len()
        );
        m.unmount();
    }
}

/// Issue 15: with the writeback cache (the default), a backup taken while four writers run
/// is one point in time: each file one state of its writer's sequence, reached while the
/// backup ran.
#[test]
fn backups_under_cached_rewrites_appends_truncates_and_mmap_are_each_one_point_in_time() {
    let env = Env::new();
    crate::backup::setup(&env);
    // One backup in the suite (its time budget); `CMKFS_TEST_BACKUP_ROUNDS` for more.
    let rounds = std::env::var("CMKFS_TEST_BACKUP_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    backups_under_writers(&env, rounds, false);
}

/// The same without the cache (writes reach the daemon as they are made), once, with
/// writes of whole pages (each one WRITE).
#[test]
fn a_backup_under_uncached_writers_is_one_point_in_time() {
    let env = Env::new().in_mode(&["--no-writeback-cache"]);
    crate::backup::setup(&env);
    backups_under_writers(&env, 1, true);
}

/// Starts `cmkfs backup CIPHER ARCHIVE` held at `stage` (`CMKFS_TEST_BACKUP_HOLD`) until
/// `gate` exists; returns once it got there.
fn held_backup(env: &Env, archive: &Path, stage: &str, gate: &Path) -> Child {
    held_backup_with(env, archive, stage, gate, &[])
}

/// [`held_backup`] with more arguments for `cmkfs backup`.
fn held_backup_with(env: &Env, archive: &Path, stage: &str, gate: &Path, extra: &[&str]) -> Child {
    let mut cmd = env.command(&[
        "backup".as_ref(),
        env.cipher.as_os_str(),
        archive.as_os_str(),
    ]);
    cmd.args(extra);
    cmd.env(
        "CMKFS_TEST_BACKUP_HOLD",
        format!("{stage}:{}", gate.display()),
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let reached = PathBuf::from(format!("{}.reached", gate.display()));
    let end = Instant::now() + GUARD;
    while !reached.exists() {
        if Instant::now() > end || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "the backup never reached {stage}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// Waits for `child` (killed past [`GUARD`]): (success, stderr).
fn finish(mut child: Child) -> (bool, String) {
    let end = Instant::now() + GUARD;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > end {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `f` on a thread of its own; its result, or `None` past `limit`.
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).ok()
}

/// During a freeze, a cached `write(2)` returns (its WRITE waits for the thaw, not the
/// writer), a file is read, a directory listed with attributes, and a file's `stat`
/// answered; what was written during the freeze is not in the archive, and is in the
/// volume after the thaw.
#[test]
fn during_a_freeze_cached_writes_reads_and_listings_go_on_and_stay_out_of_the_backup() {
    let env = Env::new();
    crate::backup::setup(&env);
    let m = env.mount_with(&env.cipher, &env.mnt, &["--freeze-limit", "30s"]);
    let old = repeated(b"<before the freeze>", 300_000);
    fs::write(env.mnt.join("f"), &old).unwrap();
    fs::write(env.mnt.join("other"), b"other").unwrap();
    let archive = env.root.join("frozen.tar");
    let gate = env.root.join("gate");
    let backup = held_backup(&env, &archive, "frozen", &gate);

    let new = repeated(b"<during the freeze>", 300_000);
    let (p, n) = (env.mnt.join("f"), new.clone());
    // The writer keeps its descriptor (a close would flush and wait for the thaw).
    let (keep_tx, keep_rx) = mpsc::channel::<()>();
    let wrote = within(Duration::from_secs(10), move || {
        let f = fs::OpenOptions::new().write(true).open(p).unwrap();
        f.write_all_at(&n, 0).unwrap();
        std::thread::spawn(move || {
            let _ = keep_rx.recv();
            drop(f);
        });
    });
    assert!(wrote.is_some(), "a cached write(2) waited for the freeze");
    let p = env.mnt.join("other");
    let read = within(Duration::from_secs(10), move || fs::read(p).unwrap());
    assert_eq!(read.as_deref(), Some(&b"other"[..]), "a read waited");
    let d = env.mnt.clone();
    let listed = within(Duration::from_secs(10), move || {
        let mut n = 0;
        for e in fs::read_dir(&d).unwrap() {
            // The size, as `ls -l` asks for it.
            let _ = e.unwrap().metadata().unwrap().len();
            n += 1;
        }
        n
    });
    assert!(listed.is_some_and(|n| n >= 2), "ls -l waited");
    let p = env.mnt.join("f");
    let stat = within(Duration::from_secs(10), move || {
        fs::metadata(p).unwrap().len()
    });
    assert_eq!(stat, Some(new.len() as u64), "stat waited");

    fs::write(&gate, b"").unwrap();
    let (ok, stderr) = finish(backup);
    assert!(ok, "{stderr}");
    let _ = keep_tx.send(());
    // After the thaw the cached write reaches the volume.
    let f = env.mnt.join("f");
    assert!(
        wait_until(GUARD, || fs::read(&f).map(|d| d == new).unwrap_or(false)),
        "the write made during the freeze is lost"
    );
    m.unmount();

    let target = env.root.join("r");
    crate::backup::restore_to(&env, &archive, &target, &[]).assert_ok();
    let m = env.mount(&target, &env.mnt);
    assert!(
        fs::read(env.mnt.join("f")).unwrap() == old,
        "a write made during the freeze is in the archive"
    );
    m.unmount();
    // The original volume holds the new data after a remount.
    let m = env.mount(&env.cipher, &env.mnt);
    assert!(fs::read(env.mnt.join("f")).unwrap() == new);
    m.unmount();
}

/// A cut-off during a freeze with dirty pages: the cut-off's invalidation writes the pages
/// back, which the freeze would hold; the cut-off ends the freeze instead, completes in
/// time (the volume Inaccessible), and the backup fails with one line that names the
/// revocation and its remedy (not the freeze limit), no archive left.
/// The writer is a forked child (any `close` of a descriptor of the file, also the `exec`
/// of a command that inherited one, flushes its pages).
#[test]
fn a_cut_off_during_a_freeze_with_dirty_pages_ends_the_freeze_and_fails_the_backup() {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let env = Env::new();
    crate::backup::setup(&env);
    let m = env.mount_with(&env.cipher, &env.mnt, &["--freeze-limit", "60s"]);
    fs::write(env.mnt.join("f"), repeated(b"<old>", 100_000)).unwrap();
    let archive = env.root.join("revoked.tar");
    let gate = env.root.join("gate");
    // Under a backup key of its own, so the backup gets as far as the freeze's end (under
    // the volume's key it would fail at the wrap, the key disabled).
    let backup = held_backup_with(&env, &archive, "frozen", &gate, &["--key", "bkey"]);

    let path = CString::new(env.mnt.join("f").as_os_str().as_bytes()).unwrap();
    let data = repeated(b"<new>", 100_000);
    let mut fds = [0i32; 2];
    // SAFETY: a two-element out-array.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: the child makes only raw system calls on data prepared above, then _exit()s.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: as above.
        unsafe {
            let fd = libc::open(path.as_ptr(), libc::O_RDWR);
            let ok = fd >= 0
                && libc::pwrite(fd, data.as_ptr().cast(), data.len(), 0) == data.len() as isize;
            libc::write(fds[1], [ok as u8].as_ptr().cast(), 1);
            // Keep the dirty pages until killed.
            libc::pause();
            libc::_exit(0);
        }
    }
    // SAFETY: the parent's copy of the write end.
    unsafe { libc::close(fds[1]) };
    let mut b = [0u8; 1];
    let fd = fds[0];
    let got = within(Duration::from_secs(10), move || {
        // SAFETY: our pipe's read end and a one-byte buffer.
        let n = unsafe { libc::read(fd, b.as_mut_ptr().cast(), 1) };
        (n, b[0])
    });
    assert_eq!(got, Some((1, 1)), "the child's write waited or failed");

    let started = Instant::now();
    env.cmkfs(&["vault", "key", "update", "default", "--disable"])
        .assert_ok();
    let cut = wait_until(GUARD, || {
        let out = env.cmkfs(&["status".as_ref(), env.mnt.as_os_str(), "--json".as_ref()]);
        out.stdout.contains("\"Inaccessible\"")
    });
    println!("cut-off during the freeze: {:?}", started.elapsed());
    fs::write(&gate, b"").unwrap();
    let (ok, stderr) = finish(backup);
    // SAFETY: our own child.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, std::ptr::null_mut(), 0);
        libc::close(fds[0]);
    }
    assert!(cut, "the cut-off did not complete during the freeze");
    assert!(!ok, "a backup whose freeze a cut-off ended succeeded");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    // Attack 16 F3: the revocation and its remedy, not the freeze limit's.
    assert!(
        stderr.contains("revoked or disabled") && stderr.contains("restore access to the key"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("--freeze-limit") && !stderr.contains("--force"),
        "{stderr}"
    );
    assert!(!archive.exists(), "an archive was left");
    assert_eq!(
        find_markers(&env.cipher, &[b"<new>"]),
        Vec::<String>::new(),
        "plaintext in the backing store"
    );
    m.unmount();
}

/// A thread held inside `write(2)` of a file on a mount, with the inode lock held: its
/// source buffer is a page registered with `userfaultfd` that nobody serves, so the kernel's
/// copy from it (`fault_in_iov_iter_readable`, under the lock) waits. Dropping it closes
/// the `userfaultfd`: the page reads as zeros and the `write(2)` ends.
struct StuckWriter {
    uffd: i32,
    page: *mut libc::c_void,
    thread: Option<std::thread::JoinHandle<()>>,
}

// The page pointer is only unmapped by the owner, after the thread ended.
unsafe impl Send for StuckWriter {}

/// `struct uffdio_api`, `struct uffdio_register` (linux/userfaultfd.h).
#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}
#[repr(C)]
struct UffdioRegister {
    start: u64,
    len: u64,
    mode: u64,
    ioctls: u64,
}
const UFFD_API: u64 = 0xaa;
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;

impl StuckWriter {
    /// Opens `path` for writing and returns once a thread is held inside its `write(2)`.
    fn start(path: &Path) -> StuckWriter {
        const PAGE: usize = 4096;
        // SAFETY: raw system calls on values made here; every result is checked.
        unsafe {
            let uffd = libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC) as i32;
            assert!(
                uffd >= 0,
                "userfaultfd: {}",
                std::io::Error::last_os_error()
            );
            let mut api = UffdioApi {
                api: UFFD_API,
                features: 0,
                ioctls: 0,
            };
            assert_eq!(libc::ioctl(uffd, UFFDIO_API, &mut api), 0, "UFFDIO_API");
            let page = libc::mmap(
                std::ptr::null_mut(),
                PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert_ne!(page, libc::MAP_FAILED);
            let mut reg = UffdioRegister {
                start: page as u64,
                len: PAGE as u64,
                mode: UFFDIO_REGISTER_MODE_MISSING,
                ioctls: 0,
            };
            assert_eq!(
                libc::ioctl(uffd, UFFDIO_REGISTER, &mut reg),
                0,
                "UFFDIO_REGISTER"
            );
            let path = path.to_path_buf();
            let src = page as usize;
            // Its own descriptor table: the backup spawned next inherits no descriptor of
            // the file (its close at `exec` would flush, and wait on the stuck writer).
            let thread = spawn_own_files(move || {
                use std::os::fd::AsRawFd;
                // Its copy of the userfaultfd closed: the one `drop` closes must be the
                // last, which releases the fault.
                libc::close(uffd);
                let f = fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(path)
                    .unwrap();
                libc::write(f.as_raw_fd(), src as *const libc::c_void, PAGE);
            });
            // The fault arrives once the thread is inside write(2), the inode lock held.
            let mut pfd = libc::pollfd {
                fd: uffd,
                events: libc::POLLIN,
                revents: 0,
            };
            assert_eq!(
                libc::poll(&mut pfd, 1, GUARD.as_millis() as i32),
                1,
                "the writer never reached its source page"
            );
            StuckWriter {
                uffd,
                page,
                thread: Some(thread),
            }
        }
    }
}

impl Drop for StuckWriter {
    fn drop(&mut self) {
        // SAFETY: our own descriptor; the page is unmapped only once the writer ended.
        unsafe { libc::close(self.uffd) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // SAFETY: the mapping made in `start`, no longer used.
        unsafe { libc::munmap(self.page, 4096) };
    }
}

/// Whether process `pid` has a thread named `name`.
fn has_thread(pid: i32, name: &str) -> bool {
    fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .any(|t| fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim_end() == name))
}

/// Attack 10 F2: a backup killed (SIGKILL) while its drain waits on a writer held inside
/// `write(2)` thaws the mount at once: `stat` of a regular file (its GETATTR parked by the
/// quiesce) answers right after, not at the drain's limit (20 s). Once the writer goes on,
/// the drain thread left behind ends without freezing anything: a write and a new backup
/// go through.
#[test]
fn a_backup_killed_while_its_drain_waits_on_a_stuck_writer_thaws_the_mount_at_once() {
    let env = Env::new();
    env.init(&env.cipher);
    let m = env.mount(&env.cipher, &env.mnt);
    let other = env.mnt.join("other");
    fs::write(&other, b"other").unwrap();
    let pid = *daemon_pids(&env.mnt).first().expect("the mount's daemon");
    let stuck = StuckWriter::start(&env.mnt.join("stuck"));

    let archive = env.root.join("killed.tar");
    let mut backup = env
        .command(&[
            "backup".as_ref(),
            env.cipher.as_os_str(),
            archive.as_os_str(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The daemon's drain thread exists from the quiesce on (GETATTRs parked).
    let draining = wait_until(GUARD, || has_thread(pid, "cmkfs-drain"));
    let _ = backup.kill();
    let _ = backup.wait();
    let started = Instant::now();
    let p = other.clone();
    let stat = within(Duration::from_secs(5), move || {
        fs::metadata(p).map(|m| m.len()).ok()
    });
    println!("stat after the backup was killed: {:?}", started.elapsed());
    drop(stuck);
    assert!(draining, "the backup's drain never started");
    assert_eq!(
        stat,
        Some(Some(5)),
        "stat of a regular file stayed parked after the backup died"
    );

    let after = env.mnt.join("after");
    let wrote = within(GUARD, move || {
        let f = fs::File::create(&after).unwrap();
        f.write_all_at(b"after", 0).unwrap();
        f.sync_all().is_ok()
    });
    assert_eq!(wrote, Some(true), "a write after the late drain waited");
    let second = env.root.join("after.tar");
    env.cmkfs(&[
        "backup".as_ref(),
        env.cipher.as_os_str(),
        second.as_os_str(),
    ])
    .assert_ok();
    m.unmount();
}
