//! How `mkdir` makes a new directory's id durable before the directory gets its name
//! (`src/volume/idsync.rs`): on ext4 with a journal in `data=ordered` mode the id file's
//! write-back is waited for (`sync_file_range`, no `fsync`); on ext4 without a journal and
//! on tmpfs the `fsync` stays. Each backing filesystem is a small one of the test's own
//! (a loop-mounted ext4 image, a tmpfs), so the result does not depend on what the test
//! machine's disk is; without root, `strace`, `mkfs.ext4` or loop devices the test says so
//! and passes.

use crate::common;

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A kernel mount made by `mount(8)` for this test, lazily unmounted on drop (also on a
/// failed assertion; a loop device made by `mount -o loop` is freed with it).
struct Mounted(PathBuf);

impl Mounted {
    /// Runs `mount ARGS... AT`; `None` (with the reason printed) when mount refuses.
    fn with(args: &[&OsStr], at: &Path) -> Option<Mounted> {
        let out = Command::new("mount")
            .args(args)
            .arg(at)
            .stdin(Stdio::null())
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!(
                "mount {args:?} {}: {}",
                at.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        Some(Mounted(at.to_path_buf()))
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A 32 MiB ext4 image made with `mkfs.ext4 MKFS_ARGS...`, loop-mounted at `env.root/name`.
fn ext4(env: &Env, name: &str, mkfs_args: &[&str]) -> Option<(Mounted, PathBuf)> {
    let img = env.root.join(format!("{name}.img"));
    fs::File::create(&img)
        .and_then(|f| f.set_len(32 << 20))
        .ok()?;
    let mut mkfs = Command::new("mkfs.ext4");
    mkfs.args(["-q", "-F"]).args(mkfs_args).arg(&img);
    let out = run_with_timeout(mkfs, CMD_TIMEOUT).ok()?;
    if !out.ok() {
        eprintln!("mkfs.ext4 failed: {out}");
        return None;
    }
    let at = env.dir(name);
    let m = Mounted::with(&[OsStr::new("-o"), OsStr::new("loop"), img.as_os_str()], &at)?;
    Some((m, at))
}

/// An strace attached to a daemon, stopped with SIGINT (so it flushes its output) within
/// 10 s, killed on drop if still there.
struct Tracer(Child);

impl Tracer {
    /// Traces the id-durability calls of process `pid` (all its threads) into `out`, once
    /// strace has attached.
    fn attach(pid: u32, out: &Path) -> Tracer {
        let t = Tracer(
            Command::new("strace")
                .args(["-f", "-qq", "-e", "trace=fsync,fdatasync,sync_file_range", "-o"])
                .arg(out)
                .args(["-p", &pid.to_string()])
                .stdin(Stdio::null())
                .spawn()
                .expect("strace"),
        );
        // strace creates its output once attached; give it time to seize every thread.
        wait_until(Duration::from_secs(10), || out.exists());
        std::thread::sleep(Duration::from_millis(300));
        t
    }

    fn stop(&mut self) {
        // SAFETY: signalling the strace child this test started.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGINT) };
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What the daemon called while making three directories on a volume in `backing`:
/// (fsyncs, sync_file_ranges, the trace). Checks that the directories, their 16-byte ids and
/// a file moved into one of them are all there after a remount.
fn mkdir_calls(env: &Env, backing: &Path, label: &str) -> (usize, usize, String) {
    let cipher = backing.join("cipher");
    fs::create_dir(&cipher).unwrap();
    env.init(&cipher).assert_ok();
    let m = env.mount_foreground(&cipher, &env.mnt);
    fs::write(m.path("old"), b"an existing file").unwrap();
    let pid = m.daemon_pid().expect("the daemon's pid");
    let trace = env.root.join(format!("strace-{label}.out"));
    let mut st = Tracer::attach(pid, &trace);
    fs::create_dir(m.path("a")).unwrap();
    fs::create_dir(m.path("a/b")).unwrap();
    fs::create_dir(m.path("c")).unwrap();
    st.stop();
    fs::rename(m.path("old"), m.path("a/b/old")).unwrap();
    m.unmount();
    let log = fs::read_to_string(&trace).unwrap_or_default();
    let count = |call: &str| log.lines().filter(|l| l.contains(call)).count();
    let calls = (count(" fsync("), count(" sync_file_range("), log.clone());
    let m = env.mount(&cipher, &env.mnt);
    assert_eq!(
        fs::read(m.path("a/b/old")).unwrap(),
        b"an existing file",
        "{label}"
    );
    assert!(m.path("c").is_dir(), "{label}");
    m.unmount();
    let ids: Vec<u64> = walk(&cipher)
        .iter()
        .filter(|p| p.file_name() == Some(OsStr::new(".cmkfs.dirid")))
        .map(|p| fs::metadata(p).unwrap().len())
        .collect();
    assert_eq!(ids, vec![16; 4], "{label}: root + 3 directory ids");
    calls
}

fn can_run() -> bool {
    // SAFETY: no arguments, no memory.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: loop-mounting test filesystems needs root");
        return false;
    }
    for tool in ["strace", "mkfs.ext4", "mount"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            eprintln!("skipped: {tool} not installed");
            return false;
        }
    }
    true
}

/// ext4 with a journal (mkfs.ext4 defaults: `data=ordered`, `dioread_nolock`): no fsync of
/// the ids, one waited write-back each. ext4 without a journal and tmpfs: one fsync each.
#[test]
fn mkdir_fsyncs_the_id_only_where_the_journal_does_not_order_it() {
    if !can_run() {
        return;
    }
    let env = Env::new();
    let Some((_journaled, jdir)) = ext4(&env, "journaled", &[]) else {
        eprintln!("skipped: no loop-mounted ext4 here");
        return;
    };
    let (fsyncs, written_back, log) = mkdir_calls(&env, &jdir, "ext4 data=ordered");
    assert_eq!(fsyncs, 0, "ext4 data=ordered: no fsync of the ids:\n{log}");
    assert!(
        written_back >= 3,
        "ext4 data=ordered: each id written back:\n{log}"
    );

    let (_plain, ndir) = ext4(&env, "nojournal", &["-O", "^has_journal"]).expect("ext4 image");
    let (fsyncs, written_back, log) = mkdir_calls(&env, &ndir, "ext4 without a journal");
    assert!(fsyncs >= 3, "ext4 without a journal: ids fsynced:\n{log}");
    assert_eq!(written_back, 0, "ext4 without a journal:\n{log}");

    let tdir = env.dir("tmpfs");
    let _tmpfs = Mounted::with(
        &["-t", "tmpfs", "-o", "size=8m", "cmkfs-test-tmpfs"].map(OsStr::new),
        &tdir,
    )
    .expect("tmpfs");
    let (fsyncs, written_back, log) = mkdir_calls(&env, &tdir, "tmpfs");
    assert!(fsyncs >= 3, "tmpfs: ids fsynced:\n{log}");
    assert_eq!(written_back, 0, "tmpfs:\n{log}");
}
