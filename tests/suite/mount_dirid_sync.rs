//! How `mkdir` makes a new directory's id durable before the directory gets its name
//! (`src/volume/idsync.rs`): on ext4 with a journal in `data=ordered` mode the id file's
//! write-back is waited for (`sync_file_range`, no `fsync`); on tmpfs it is fsynced; on ext4
//! without a journal its fsync is deferred, but done before any rename and at the unmount.
//! Each backing filesystem is a small one of the test's own (a tmpfs, loop-mounted ext4
//! images with and without a journal), so the result does not depend on the test machine's
//! disk, which is checked too, against the decision the volume makes for it. Without root or
//! `strace` the test says so and passes; without loop devices or `mkfs.ext4` it checks tmpfs
//! and the machine's disk only.

use crate::common;

use std::ffi::OsStr;
use std::fs;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cmkfs::volume::idsync::{self, IdDurability};
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
    let m = Mounted::with(
        &[OsStr::new("-o"), OsStr::new("loop"), img.as_os_str()],
        &at,
    )?;
    Some((m, at))
}

/// An strace attached to a daemon, stopped with SIGINT (so it flushes its output) within
/// 10 s, killed on drop if still there.
struct Tracer(Child);

impl Tracer {
    /// Traces the id-durability calls and renames of process `pid` (all its threads) into
    /// `out`, once strace has attached.
    fn attach(pid: u32, out: &Path) -> Tracer {
        Tracer::attach_with(
            pid,
            out,
            &["-e", "trace=fsync,fdatasync,sync_file_range,renameat2"],
        )
    }

    /// `strace -f -qq ARGS -o out -p pid`, returned once strace has attached.
    fn attach_with(pid: u32, out: &Path, args: &[&str]) -> Tracer {
        let t = Tracer(
            Command::new("strace")
                .args(["-f", "-qq"])
                .args(args)
                .arg("-o")
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

/// The id-durability calls and renames of the daemon, in order, as letters: `F` fsync, `W`
/// sync_file_range, `R` renameat2.
fn sequence(trace: &Path) -> (String, String) {
    let log = fs::read_to_string(trace).unwrap_or_default();
    let seq = log
        .lines()
        .filter_map(|l| {
            if l.contains(" fsync(") {
                Some('F')
            } else if l.contains(" sync_file_range(") {
                Some('W')
            } else if l.contains(" renameat2(") {
                Some('R')
            } else {
                None
            }
        })
        .collect();
    (seq, log)
}

/// What the daemon calls on a volume in `backing` while it makes three directories (each a
/// temp directory renamed into place) and then moves an existing file into one of them, and
/// while it makes one more directory and is unmounted. Checks that the directories, their
/// 16-byte ids and the moved file are all there after a remount.
fn mkdir_calls(env: &Env, backing: &Path, label: &str) -> [(String, String); 2] {
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
    fs::rename(m.path("old"), m.path("a/b/old")).unwrap();
    st.stop();
    let first = sequence(&trace);
    let trace = env.root.join(format!("strace-{label}-unmount.out"));
    let mut st = Tracer::attach(pid, &trace);
    fs::create_dir(m.path("d")).unwrap();
    m.unmount();
    st.stop();
    let second = sequence(&trace);
    let m = env.mount(&cipher, &env.mnt);
    assert_eq!(
        fs::read(m.path("a/b/old")).unwrap(),
        b"an existing file",
        "{label}"
    );
    assert!(m.path("c").is_dir() && m.path("d").is_dir(), "{label}");
    m.unmount();
    let ids: Vec<u64> = walk(&cipher)
        .iter()
        .filter(|p| p.file_name() == Some(OsStr::new(".cmkfs.dirid")))
        .map(|p| fs::metadata(p).unwrap().len())
        .collect();
    assert_eq!(ids, vec![16; 5], "{label}: root + 4 directory ids");
    [first, second]
}

fn can_run() -> bool {
    // SAFETY: no arguments, no memory.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: loop-mounting test filesystems needs root");
        return false;
    }
    for tool in ["strace", "mount"] {
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

/// A test's env, its daemons' deferred ids held back for a minute (no background flush:
/// the foreground ones only); `None` (and why, printed) where the test cannot run.
fn env_with_ids_held() -> Option<Env> {
    if !can_run() {
        return None;
    }
    // SAFETY: set before this test process starts any thread that reads the environment
    // (the daemons it spawns inherit it).
    unsafe { std::env::set_var("CMKFS_ID_DEFER_MS", "60000") };
    Some(Env::new())
}

/// The calls `mkdir_calls` must see where ids are made durable the way `d` says: three
/// mkdirs and a move of an existing file, then one mkdir and the unmount.
fn expected(d: IdDurability) -> [&'static str; 2] {
    match d {
        // Each id's write-back waited for before its directory's rename.
        IdDurability::WrittenBack => ["WRWRWRR", "WR"],
        // Each id fsynced before its directory's rename.
        IdDurability::Fsync => ["FRFRFRR", "FR"],
        // No fsync on the way of a mkdir; all three before the existing file moves (held
        // back here for a minute, so the background thread does not take them first), and
        // the last one at the unmount.
        IdDurability::Deferred => ["RRRFFFR", "RF"],
    }
}

/// Runs `mkdir_calls` on `backing` and checks the calls against what `want` says.
fn check(env: &Env, backing: &Path, label: &str, want: IdDurability) {
    let d = fs::File::open(backing).unwrap();
    assert_eq!(idsync::for_dir(d.as_fd()), want, "{label}: the decision");
    let [(seq, log), (seq2, log2)] = mkdir_calls(env, backing, label);
    let [want1, want2] = expected(want);
    assert_eq!(seq, want1, "{label}:\n{log}");
    assert_eq!(seq2, want2, "{label}, unmount:\n{log2}");
}

/// ext4 with a journal (mkfs.ext4 defaults: `data=ordered`, `dioread_nolock`): ids written
/// back, no fsync. tmpfs: fsynced. ext4 without a journal: deferred. And the test machine's
/// own disk, whatever it is, as the volume decides for it. The ext4 images need loop
/// devices; without them only tmpfs and the machine's disk are checked.
#[test]
fn mkdir_fsyncs_the_id_only_where_the_journal_does_not_order_it() {
    let Some(env) = env_with_ids_held() else {
        return;
    };

    let tdir = env.dir("tmpfs");
    let _tmpfs = Mounted::with(
        &["-t", "tmpfs", "-o", "size=8m", "cmkfs-test-tmpfs"].map(OsStr::new),
        &tdir,
    )
    .expect("tmpfs");
    check(&env, &tdir, "tmpfs", IdDurability::Fsync);

    let own = env.dir("own");
    let d = fs::File::open(&own).unwrap();
    let decided = idsync::for_dir(d.as_fd());
    eprintln!("this machine's test directory: ids {decided:?}");
    check(&env, &own, "the test machine's disk", decided);

    let Some((_journaled, jdir)) = ext4(&env, "journaled", &[]) else {
        eprintln!("skipped the ext4 images: no loop-mounted ext4 here");
        return;
    };
    check(&env, &jdir, "ext4-ordered", IdDurability::WrittenBack);
    let (_plain, ndir) = ext4(&env, "nojournal", &["-O", "^has_journal"]).expect("ext4 image");
    check(&env, &ndir, "ext4-nojournal", IdDurability::Deferred);
}

/// Attack 16 F1: where the id's fsync is deferred (ext4 without a journal), the fsync that
/// the first move into a new directory waits for fails (EIO injected by strace into every
/// fsync of the daemon until strace is stopped). Every move, link and fsync that depends on
/// that id fails until the fsync of a new id file (renamed over the old one) succeeds; then
/// they go on, and after a remount the moved files are there under a whole id. The old code failed the first move
/// only and forgot the id. (strace counts `when=` per thread, and the requests go to
/// several FUSE threads: every fsync fails while strace is attached, none once it is gone.)
/// Meanwhile `cmkfs status` of the live mount reports the id not durable (human and JSON),
/// and no longer once it was rewritten.
#[test]
fn a_failed_deferred_id_fsync_fails_every_move_into_it_until_rewritten() {
    let Some(env) = env_with_ids_held() else {
        return;
    };
    let Some((_plain, ndir)) = ext4(&env, "nojournal", &["-O", "^has_journal"]) else {
        eprintln!("skipped: no loop-mounted ext4 here");
        return;
    };
    let d = fs::File::open(&ndir).unwrap();
    assert_eq!(idsync::for_dir(d.as_fd()), IdDurability::Deferred);
    let cipher = ndir.join("cipher");
    fs::create_dir(&cipher).unwrap();
    env.init(&cipher).assert_ok();
    let m = env.mount_foreground(&cipher, &env.mnt);
    for i in 1..=5 {
        fs::write(m.path(format!("old{i}")), format!("file {i}")).unwrap();
    }
    let pid = m.daemon_pid().expect("the daemon's pid");
    let trace = env.root.join("strace-inject.out");
    let mut st = inject_fsync_eio(pid, &trace);
    fs::create_dir(m.path("new")).unwrap();
    let errno = |r: std::io::Result<()>| r.err().and_then(|e| e.raw_os_error());
    assert_eq!(
        errno(fs::rename(m.path("old1"), m.path("new/old1"))),
        Some(libc::EIO),
        "the move whose flush failed"
    );
    assert_eq!(
        errno(fs::rename(m.path("old2"), m.path("new/old2"))),
        Some(libc::EIO),
        "a second move into the directory whose id is not durable"
    );
    assert_eq!(
        errno(fs::hard_link(m.path("old3"), m.path("new/old3"))),
        Some(libc::EIO),
        "a link into it"
    );
    // `cmkfs status` of the live mount says so, in its JSON and to a person (the monitor
    // publishes it within its 1 s refresh).
    let mut ids = None;
    assert!(
        wait_until(Duration::from_secs(10), || {
            ids = ids_not_durable(&env);
            ids.is_some()
        }),
        "status never reported the id that is not durable"
    );
    let ids = ids.unwrap();
    assert_eq!(ids["count"], 1, "{ids}");
    assert_eq!(ids["errno"], libc::EIO, "{ids}");
    assert!(
        ids["last_error"].as_str().unwrap().contains("os error 5"),
        "{ids}"
    );
    let human = env.cmkfs(&["status".as_ref(), env.mnt.as_os_str()]);
    human.assert_ok();
    eprintln!("cmkfs status meanwhile:\n{}", human.stdout);
    assert!(
        human.stdout.contains("directory ids  1 not durable since")
            && human.stdout.contains("renames, links and fsyncs fail with"),
        "{human}"
    );
    st.stop();
    let log = fs::read_to_string(&trace).unwrap_or_default();
    let injected = log.matches("(INJECTED)").count();
    assert_eq!(injected, 3, "one fsync per flush:\n{log}");
    let rewrites = log
        .lines()
        .filter(|l| l.contains(" openat(") && l.contains("dirid.") && l.contains("O_CREAT"))
        .count();
    assert_eq!(rewrites, 2, "a new id file for each retried fsync:\n{log}");
    // No more injected failures: the rewritten id is durable, things go on.
    fs::rename(m.path("old4"), m.path("new/old4")).unwrap();
    fs::hard_link(m.path("old5"), m.path("new/old5")).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || ids_not_durable(&env).is_none()),
        "status still reports an id not durable once it was rewritten"
    );
    let human = env.cmkfs(&["status".as_ref(), env.mnt.as_os_str()]);
    assert!(!human.stdout.contains("directory ids"), "{human}");
    m.unmount();
    let m = env.mount(&cipher, &env.mnt);
    for i in 4..=5 {
        assert_eq!(
            fs::read(m.path(format!("new/old{i}"))).unwrap(),
            format!("file {i}").as_bytes()
        );
    }
    m.unmount();
    let ids: Vec<Vec<u8>> = walk(&cipher)
        .iter()
        .filter(|p| p.file_name() == Some(OsStr::new(".cmkfs.dirid")))
        .map(|p| fs::read(p).unwrap())
        .collect();
    assert_eq!(ids.len(), 2, "root + new");
    assert!(ids.iter().all(|id| id.len() == 16 && id != &[0; 16]));

    // Attack 16 F2: an id still not durable when the mount goes is `cmkfs umount`'s error
    // (one line, non-zero exit), not only a line in the daemon's log.
    let m = env.mount(&cipher, &env.mnt);
    fs::create_dir(m.path("late")).unwrap();
    let pid = m.daemon_pid().expect("the daemon's pid");
    let trace = env.root.join("strace-umount.out");
    let _st = inject_fsync_eio(pid, &trace);
    let out = env.cmkfs(&["umount".as_ref(), env.mnt.as_os_str()]);
    assert!(!out.ok(), "{out}");
    assert_eq!(out.stderr.trim_end().lines().count(), 1, "{out}");
    assert!(
        out.stderr
            .contains("was unmounted, but directory ids not made durable at unmount"),
        "{out}"
    );
    assert!(wait_until(Duration::from_secs(10), || !is_mounted(
        &env.mnt
    )));
    drop(m);
    // Said once: the next unmount of that mountpoint does not repeat it.
    let m = env.mount(&cipher, &env.mnt);
    m.unmount();
}

/// The `ids_not_durable` object of `cmkfs status --json` of the mount at `env.mnt` (`None`
/// when it is `null`).
fn ids_not_durable(env: &Env) -> Option<serde_json::Value> {
    let out = env.cmkfs(&["status".as_ref(), env.mnt.as_os_str(), "--json".as_ref()]);
    out.assert_ok();
    let doc: serde_json::Value = serde_json::from_str(&out.stdout).expect("status JSON");
    assert!(
        doc.get("ids_not_durable").is_some(),
        "the field is always there: {doc}"
    );
    Some(doc["ids_not_durable"].clone()).filter(|v| !v.is_null())
}

/// An strace attached to `pid` (all its threads) that fails every `fsync` with EIO and logs
/// `fsync` and `openat` into `out`, once attached.
fn inject_fsync_eio(pid: u32, out: &Path) -> Tracer {
    Tracer::attach_with(
        pid,
        out,
        &["-e", "trace=fsync,openat", "-e", "inject=fsync:error=EIO"],
    )
}

/// Attack 17 F2: the backing disk is an ext4 image without a journal (ids deferred) on a
/// loop device whose image sits on a small tmpfs. Four directories are made (their ids held
/// back, written but not fsynced), the tmpfs is filled (the disk fails writes), a third
/// party runs `syncfs` of the backing filesystem, and the disk takes writes again. The loop
/// device completes a short write as a success, so the syncfs can leave ids unwritten with
/// nothing reported to anyone, and the ids' later fsyncs returned 0: the old code kept
/// zeros on the disk under directories whose names were encrypted under the lost ids. Now
/// each fsynced id is read back past the page cache: what the disk holds is every id, and
/// every name is there after a remount. (Whether this run's syncfs lost an id is printed:
/// the loss depends on how the writes merge; the check holds either way.)
#[test]
fn ids_a_failing_disk_lost_under_a_third_partys_syncfs_are_written_again() {
    let Some(env) = env_with_ids_held() else {
        return;
    };
    let tdir = env.dir("small");
    let _tmpfs = Mounted::with(
        &["-t", "tmpfs", "-o", "size=6m", "cmkfs-test-tmpfs"].map(OsStr::new),
        &tdir,
    )
    .expect("tmpfs");
    let img = tdir.join("disk.img");
    fs::File::create(&img)
        .and_then(|f| f.set_len(32 << 20))
        .unwrap();
    let mut mkfs = Command::new("mkfs.ext4");
    mkfs.args(["-q", "-F", "-O", "^has_journal"]).arg(&img);
    if !run_with_timeout(mkfs, CMD_TIMEOUT).is_ok_and(|o| o.ok()) {
        eprintln!("skipped: no mkfs.ext4 here");
        return;
    }
    let disk = env.dir("disk");
    let Some(_disk) = Mounted::with(
        &[OsStr::new("-o"), OsStr::new("loop"), img.as_os_str()],
        &disk,
    ) else {
        eprintln!("skipped: no loop-mounted ext4 here");
        return;
    };
    let syncfs = |what: &str| {
        let mut c = Command::new("sync");
        c.arg("-f").arg(&disk);
        let out = run_with_timeout(c, CMD_TIMEOUT).unwrap();
        eprintln!("{what}: sync -f: {out}");
    };
    let cipher = disk.join("cipher");
    fs::create_dir(&cipher).unwrap();
    env.init(&cipher).assert_ok();
    let m = env.mount(&cipher, &env.mnt);
    fs::write(m.path("old"), b"an existing file").unwrap();
    syncfs("before");
    for i in 1..=4 {
        fs::create_dir(m.path(format!("d{i}"))).unwrap();
    }
    // The disk fails writes: the tmpfs under its image is full.
    let filler = tdir.join("filler");
    {
        use std::io::Write;
        let mut f = fs::File::create(&filler).unwrap();
        let mb = vec![0u8; 1 << 20];
        for _ in 0..16 {
            if f.write_all(&mb).is_err() {
                break;
            }
        }
    }
    syncfs("third party, disk full");
    fs::remove_file(&filler).unwrap();
    // The first move into a new directory flushes the ids: it fails if one was lost (or
    // its write-back failed); the next flush writes them again.
    let first = fs::rename(m.path("old"), m.path("d1/old"));
    eprintln!("first move after the disk came back: {first:?}");
    if let Err(e) = first {
        assert!(
            matches!(e.raw_os_error(), Some(libc::EIO | libc::ENOSPC)),
            "{e}"
        );
        fs::rename(m.path("old"), m.path("d1/old")).unwrap();
    }
    for i in 1..=4 {
        fs::write(m.path(format!("d{i}/alpha")), format!("alpha {i}")).unwrap();
    }
    m.unmount();
    // What the disk holds (read with O_DIRECT, not from the page cache) is every id.
    let ids: Vec<PathBuf> = walk(&cipher)
        .into_iter()
        .filter(|p| p.file_name() == Some(OsStr::new(".cmkfs.dirid")))
        .collect();
    assert_eq!(ids.len(), 5, "root + 4");
    for p in &ids {
        let cached = fs::read(p).unwrap();
        assert_ne!(cached, [0u8; 16], "{}", p.display());
        assert_eq!(read_direct(p), cached, "on the disk: {}", p.display());
    }
    let m = env.mount(&cipher, &env.mnt);
    assert_eq!(fs::read(m.path("d1/old")).unwrap(), b"an existing file");
    for i in 1..=4 {
        assert_eq!(
            fs::read_to_string(m.path(format!("d{i}/alpha"))).unwrap(),
            format!("alpha {i}")
        );
    }
    m.unmount();
}

/// The first block of file `p` as the disk holds it (`O_DIRECT`: past the page cache).
fn read_direct(p: &Path) -> Vec<u8> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(p)
        .unwrap();
    let mut buf = vec![0u8; 8192];
    let at = buf.as_ptr().align_offset(4096);
    let n = f.read_at(&mut buf[at..at + 4096], 0).unwrap();
    buf[at..at + n].to_vec()
}
