//! A backup's drain on a mount whose daemon cannot open files by handle (no
//! `CAP_DAC_READ_SEARCH`: a mount run by another user than root, or root with the
//! capability dropped): it opens each file with an open handle by its path through the
//! mount instead, so the archive still holds every `write(2)` that returned before the
//! backup began. `syncfs` alone (the old drain) does not wait for the kernel's write-back
//! on FUSE (docs/ARCHITECTURE.md, "What `sync(2)` and `syncfs(2)` promise on a FUSE
//! mount"): WRITEs the kernel had queued reached the daemon after the freeze and missed the
//! archive.
//!
//! The daemon runs in the foreground as root with `CAP_DAC_READ_SEARCH` dropped from its
//! bounding set before `exec` (so from its permitted and effective sets after it), checked
//! in `/proc/PID/status`. Write-backs are kept in flight when the backup starts by
//! delaying each of the daemon's backing `pwrite`s by 10 ms (`strace` fault injection, as
//! `scripts/syncfs-probe.sh`) and making more WRITEs than the kernel sends at once, not by
//! timing.

use crate::common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

/// `CAP_DAC_READ_SEARCH` (linux/capability.h): what `open_by_handle_at` needs.
const CAP_DAC_READ_SEARCH: u32 = 2;

/// Mounts `cipher` at `mnt` in the foreground, the daemon without `CAP_DAC_READ_SEARCH`.
fn mount_without_dac_read_search(env: &Env, cipher: &Path, mnt: &Path, extra: &[&str]) -> Mount {
    let m = env.mount_foreground_by(cipher, mnt, extra, |cmd| {
        // SAFETY: prctl(2) only, which is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(
                    libc::PR_CAPBSET_DROP,
                    CAP_DAC_READ_SEARCH as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                libc::prctl(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_CLEAR_ALL,
                    0,
                    0,
                    0,
                );
                Ok(())
            });
        }
    });
    let pid = m.daemon_pid().expect("a foreground daemon");
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .expect("CapEff in /proc/PID/status");
    assert_eq!(
        eff & (1 << CAP_DAC_READ_SEARCH),
        0,
        "the daemon still has CAP_DAC_READ_SEARCH (CapEff {eff:x})"
    );
    m
}

/// Write-backs in flight at the backup, each WRITE a few milliseconds longer (below).
const WRITES: usize = 256;

/// `strace` delaying every `pwrite` of the daemon `pid`'s request threads (`fuser-*`) and
/// cipher threads (`cmkfs-sector-*`) by 10 ms; detached (SIGTERM) on drop. Its other threads
/// (the control thread that runs the freeze) are not traced: ptrace slows every system call
/// of a traced thread, and a slow freeze would leave the write-backs time to end.
struct SlowWrites(Child);

impl SlowWrites {
    /// `workers`: the daemon's `--threads`, all running before they are traced.
    fn start(pid: u32, workers: usize) -> SlowWrites {
        let threads = || -> Vec<(String, String)> {
            fs::read_dir(format!("/proc/{pid}/task"))
                .into_iter()
                .flatten()
                .flatten()
                .map(|t| {
                    let comm = fs::read_to_string(t.path().join("comm")).unwrap_or_default();
                    (t.file_name().to_string_lossy().into_owned(), comm)
                })
                .collect()
        };
        assert!(
            wait_until(Duration::from_secs(20), || {
                threads()
                    .iter()
                    .filter(|(_, c)| c.starts_with("fuser-"))
                    .count()
                    >= workers
            }),
            "the daemon {pid} did not start its {workers} fuser-* threads"
        );
        let tids: Vec<String> = threads()
            .into_iter()
            .filter(|(_, c)| c.starts_with("fuser-") || c.starts_with("cmkfs-sector"))
            .map(|(t, _)| t)
            .collect();
        let calls = "pwrite64,pwritev,pwritev2";
        let mut cmd = Command::new("strace");
        cmd.args(["-q", "-o", "/dev/null"])
            .arg(format!("-etrace={calls}"))
            .arg(format!("-einject={calls}:delay_enter=10000"));
        for t in &tids {
            cmd.args(["-p", t]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("strace (scripts/test.sh installs it)");
        let s = SlowWrites(child);
        // Every one of those threads traced (TracerPid set) before anything is written.
        let traced = || {
            tids.iter().all(|t| {
                fs::read_to_string(format!("/proc/{pid}/task/{t}/status"))
                    .unwrap_or_default()
                    .lines()
                    .any(|l| l.starts_with("TracerPid:") && l.trim_end() != "TracerPid:\t0")
            })
        };
        assert!(
            wait_until(Duration::from_secs(20), traced),
            "strace did not attach to the daemon {pid}"
        );
        s
    }
}

impl Drop for SlowWrites {
    fn drop(&mut self) {
        // SAFETY: kill(2) of our own child.
        unsafe {
            libc::kill(self.0.id() as i32, libc::SIGTERM);
        }
        let _ = self.0.wait();
    }
}

/// A thread with a descriptor table of its own ([`spawn_own_files`]) that opens files of
/// the mount (and writes into them) and keeps them open until dropped.
struct Held {
    done: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Held {
    /// Runs `open` in the thread; returns once it returned, its result kept there.
    fn start<T: 'static>(open: impl FnOnce() -> T + Send + 'static) -> Held {
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let (done, done_rx) = std::sync::mpsc::channel::<()>();
        let thread = spawn_own_files(move || {
            let kept = open();
            ready_tx.send(()).unwrap();
            let _ = done_rx.recv();
            drop(kept);
        });
        ready.recv().expect("the thread holding the files failed");
        Held {
            done: Some(done),
            thread: Some(thread),
        }
    }

    /// Writes each `(offset, bytes)` into `path` (created) with `pwrite(2)`, in order.
    fn writer(path: std::path::PathBuf, writes: Vec<(u64, Vec<u8>)>) -> Held {
        Held::start(move || {
            let f = fs::File::create(path).unwrap();
            for (off, buf) in &writes {
                f.write_all_at(buf, *off).unwrap();
            }
            f
        })
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        drop(self.done.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The stderr line of a backup whose drain missed a file (README quotes it).
const MISSED: &str = "could not reach a file open through it before the freeze";

/// `cmkfs backup CIPHER ARCHIVE --json`, asserted to succeed (exit 0) and to be one point
/// in time or not (`exact`, the drain's word) in its JSON report and in its manifest, and
/// to say why on stderr when it is not.
fn backup(env: &Env, archive: &Path, exact: bool) {
    let out = env.cmkfs(&[
        "backup".as_ref(),
        env.cipher.as_os_str(),
        archive.as_os_str(),
        "--json".as_ref(),
    ]);
    let b = json(out.assert_ok());
    assert_eq!(b["point_in_time"], exact, "{b}");
    assert!(b["freeze_seconds"].as_f64().is_some(), "not frozen: {b}");
    assert_eq!(manifest(archive)["point_in_time"], exact, "{b}");
    let warned: Vec<&str> = out.stderr.lines().filter(|l| l.contains(MISSED)).collect();
    assert_eq!(warned.len(), usize::from(!exact), "{out}");
    if let Some(l) = warned.first() {
        assert!(
            l.starts_with("cmkfs: warning: ") && l.contains("point_in_time: false"),
            "{out}"
        );
    }
}

/// Mixed versions, the daemon's side: asks the mount for a freeze as `cmkfs backup` before
/// the answer's `exact` did (`{"op":"freeze"}`, then `thaw`), and checks what it reads. A
/// client of d62fd71 took only `"frozen":true` as a freeze (one point in time; anything
/// else it refused), session 9's took `frozen` as `exact`: so a drain that missed a file
/// must answer `"frozen":false` (`control::FrozenAnswer`), and an exact one `true`.
fn older_client_freeze(env: &Env, exact: bool) {
    use std::io::{BufRead, BufReader};
    let sock = env.control_socket();
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(CMD_TIMEOUT)).unwrap();
    s.write_all(b"{\"op\":\"freeze\"}\n").unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    assert_eq!(v["frozen"], exact, "what an older client reads: {line}");
    assert_eq!(v["exact"], exact, "{line}");
    s.write_all(b"thaw\n").unwrap();
    line.clear();
    r.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), r#"{"thawed":"released"}"#);
}

/// The manifest member of `archive` (plain JSON in the tar stream).
fn manifest(archive: &Path) -> serde_json::Value {
    let b = fs::read(archive).unwrap();
    let name = b"cmkfs-backup/manifest.json\0";
    let (_, _, data, len) = crate::backup::tar_members(&b)
        .into_iter()
        .find(|&(h, t, _, _)| t == b'0' && b[h..h + name.len()] == name[..])
        .expect("a manifest member in the archive");
    serde_json::from_slice(&b[data..data + len]).expect("the manifest is JSON")
}

/// Restores `archive` and returns the contents of `names` in it.
fn restored(env: &Env, archive: &Path, tag: &str, names: &[&str]) -> Vec<Vec<u8>> {
    let target = env.root.join(format!("restored-{tag}"));
    crate::backup::restore_to(env, archive, &target, &[]).assert_ok();
    let mnt = env.dir(&format!("m-{tag}"));
    let m = env.mount(&target, &mnt);
    let out = names.iter().map(|n| read(&mnt.join(n))).collect();
    m.unmount();
    out
}

/// The hole: a daemon without `CAP_DAC_READ_SEARCH` drained with `syncfs` alone, which on
/// FUSE returns with WRITEs still queued in the kernel; they reached the daemon after the
/// freeze and missed the archive. Now every byte written (and returned) before the backup is
/// in it, with the write-backs slowed so that they are still in flight when it starts.
/// `CMKFS_TEST_BIN` of a build before the fix fails it (the file cut short).
#[test]
fn a_backup_of_a_mount_without_open_by_handle_holds_every_write_that_returned_before_it() {
    let s = seed("backup drain by path");
    let mut rng = StdRng::seed_from_u64(s);
    let env = Env::new().in_mode(&[]);
    env.init(&env.cipher);
    crate::backup::create_set_d(&env);
    let m = mount_without_dac_read_search(&env, &env.cipher, &env.mnt, &["--threads", "2"]);
    let slow = SlowWrites::start(m.daemon_pid().unwrap(), 2);
    // WRITES scattered writes of 1..=4096 bytes, each in the first page of its own 8 KiB
    // slot, so each is a WRITE of its own. The kernel puts 64 of them (`MAX_BACKGROUND`) in
    // the device's queue at once, the rest as those are answered; the drain's own requests
    // (and the SETATTR of the file's times that the backup's `syncfs` waits for) queue
    // behind the first 64 only. So the old drain froze with a quarter to a half of them not
    // yet sent to the daemon, held until the thaw (the archive's file cut at 1 036 288 to
    // 1 568 768 bytes of about 2 092 000; 8 of 8 runs failed). The file stays open across the backup, in a writer with
    // its own descriptor table (`Writer`).
    let mut data = Vec::new();
    let mut writes = Vec::new();
    for k in 0..WRITES {
        let len = 1 + (rng.next_u32() % 4096) as usize;
        let off = k * 8192 + (rng.next_u32() as usize % (4097 - len));
        let mut buf = vec![0u8; len];
        rng.fill_bytes(&mut buf);
        data.resize(data.len().max(off + len), 0);
        data[off..off + len].copy_from_slice(&buf);
        writes.push((off as u64, buf));
    }
    let writer = Held::writer(env.mnt.join("f"), writes);
    let archive = env.root.join("a.tar");
    backup(&env, &archive, true);
    drop(writer);
    drop(slow);
    let log = m.daemon_log();
    m.unmount();
    let got = restored(&env, &archive, "a", &["f"]);
    assert_bytes_eq(&format!("f in the archive (seed {s})"), &got[0], &data);
    assert!(
        log.contains("opening them by path"),
        "the drain did not fall back to paths:\n{log}"
    );
    // One file with an open handle, opened by path and fsynced in each of the two rounds.
    assert!(
        log.contains("cached writes drained files=2 exact=true"),
        "the drain did not reach the file in both rounds:\n{log}"
    );
}

/// Files with an open handle but no name the mount knows: one unlinked while open (no
/// link left, so in no archive: the drain stays exact), and one whose only remaining name
/// is a hard link the mount never looked up (the drain cannot reach it: not exact, the
/// daemon logs a warning; the backup still succeeds, says why on stderr, and its report
/// and manifest say `point_in_time: false`, as README says). Each freeze is also asked for
/// as an older client would ([`older_client_freeze`]).
#[test]
fn a_drain_by_path_skips_unlinked_files_and_says_when_a_file_cannot_be_reached() {
    let env = Env::new().in_mode(&[]);
    env.init(&env.cipher);
    crate::backup::create_set_d(&env);
    // `h` and its hard link `h2`, made by an earlier mount: the next one knows neither.
    let m = env.mount(&env.cipher, &env.mnt);
    write(&env.mnt.join("h"), b"old");
    fs::hard_link(env.mnt.join("h"), env.mnt.join("h2")).unwrap();
    write(&env.mnt.join("keep"), b"kept");
    m.unmount();

    let m = mount_without_dac_read_search(&env, &env.cipher, &env.mnt, &[]);
    // Every file open across a backup is held by a thread with its own descriptor table
    // (`Held`): the backup inherits none, so its `exec` flushes nothing.
    let mnt = env.mnt.clone();
    let uk = Held::start(move || {
        let mut u = fs::File::create(mnt.join("u")).unwrap();
        u.write_all(&[7u8; 100_000]).unwrap();
        fs::remove_file(mnt.join("u")).unwrap();
        let mut k = fs::OpenOptions::new()
            .append(true)
            .open(mnt.join("keep"))
            .unwrap();
        k.write_all(b" and more").unwrap();
        (u, k)
    });
    let a1 = env.root.join("a1.tar");
    backup(&env, &a1, true);
    older_client_freeze(&env, true);
    let log1 = m.daemon_log();
    assert!(
        log1.contains("exact=true") && !log1.contains("cannot open a file"),
        "an unlinked file made the drain inexact:\n{log1}"
    );

    // `h` opened (the mount now knows that name only), then unlinked: `h2` is left.
    let mnt = env.mnt.clone();
    let h = Held::start(move || {
        let mut h = fs::OpenOptions::new()
            .write(true)
            .open(mnt.join("h"))
            .unwrap();
        fs::remove_file(mnt.join("h")).unwrap();
        h.write_all(b"new").unwrap();
        h
    });
    older_client_freeze(&env, false);
    let a2 = env.root.join("a2.tar");
    backup(&env, &a2, false);
    let log2 = m.daemon_log();
    drop((uk, h));
    m.unmount();
    assert!(
        log2.contains("exact=false") && log2.contains("no name the mount knows"),
        "the drain did not say it missed a file:\n{log2}"
    );
    let got = restored(&env, &a1, "1", &["keep"]);
    assert_eq!(got[0], b"kept and more");
}
