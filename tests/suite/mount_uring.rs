//! FUSE over io_uring (issue 15, experiment behind `cmkfs mount --io-uring`): a mount whose
//! requests arrive on io_uring queues gives the same bytes, sizes, names and errnos as a
//! plain directory, is cut off by a revocation, and unmounts cleanly.
//!
//! Needs the fuse module's `enable_uring` parameter (Linux 6.14+ with CONFIG_FUSE_IO_URING);
//! the test switches it on for its run and puts back what it found, and skips with a message
//! where it cannot.

use crate::common;

use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::Duration;

use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const PARAM: &str = "/sys/module/fuse/parameters/enable_uring";

/// Holds `enable_uring` at Y for the test and restores the value it found.
struct UringOn {
    was: String,
}

impl UringOn {
    fn try_new() -> Option<UringOn> {
        let was = match fs::read_to_string(PARAM) {
            Ok(v) => v.trim().to_string(),
            Err(e) => {
                println!("SKIP: {PARAM} unreadable ({e}): this kernel has no FUSE over io_uring");
                return None;
            }
        };
        if was != "Y" {
            if let Err(e) = fs::write(PARAM, "Y") {
                println!("SKIP: cannot switch {PARAM} on ({e}); needs root");
                return None;
            }
        }
        Some(UringOn { was })
    }
}

impl Drop for UringOn {
    fn drop(&mut self) {
        if self.was != "Y" {
            let _ = fs::write(PARAM, &self.was);
        }
    }
}

/// Voluntary context switches of the daemon's io_uring queue threads: each request served
/// on a queue ends one wait in io_uring_enter, so this counts at least the waits.
fn uring_thread_switches(pid: u32) -> (usize, u64) {
    let mut threads = 0;
    let mut switches = 0;
    for t in fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let comm = fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if !comm.starts_with("fuser-uring-") {
            continue;
        }
        threads += 1;
        let st = fs::read_to_string(t.path().join("status")).unwrap_or_default();
        for l in st.lines() {
            if let Some(v) = l.strip_prefix("voluntary_ctxt_switches:") {
                switches += v.trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    (threads, switches)
}

fn errno_of<T>(r: std::io::Result<T>) -> Result<T, i32> {
    r.map_err(|e| e.raw_os_error().unwrap_or(-1))
}

fn pick_size(rng: &mut StdRng) -> usize {
    match rng.gen_range(0..4) {
        0 => rng.gen_range(0..=8200),
        1 => rng.gen_range(0..4) * 4096 + rng.gen_range(1..=15),
        2 => rng.gen_range(1..=15),
        // Past one request's worth of payload (1 MiB max_write): several requests.
        _ => rng.gen_range(8201..=(1 << 20) + 4096 + 15),
    }
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Without the module parameter, `--io-uring` is refused before anything is mounted, with
/// a one-line reason. (Checked here, before the parameter is switched on, not in a test of
/// its own that could run while this one has it on.)
fn refused_without_the_parameter(env: &Env) {
    let out = env.cmkfs(&[
        OsStr::new("mount"),
        env.cipher.as_os_str(),
        env.mnt.as_os_str(),
        OsStr::new("--io-uring"),
    ]);
    assert!(!out.ok(), "--io-uring mounted without enable_uring:\n{out}");
    out.assert_clear_error();
    assert!(out.stderr.contains("enable_uring"), "{out}");
    assert!(!is_mounted(&env.mnt));
}

/// Refused without the module parameter; with it, the same random operations on the
/// io_uring mount and on a plain directory, then a revocation, then a clean unmount.
#[test]
fn io_uring_mount_matches_a_plain_directory_and_is_cut_off_by_revocation() {
    let env = Env::new();
    env.init(&env.cipher);
    if fs::read_to_string(PARAM).is_ok_and(|v| v.trim() == "N") {
        refused_without_the_parameter(&env);
    }
    let Some(_on) = UringOn::try_new() else {
        return;
    };
    let plain = env.dir("plain");
    let m = env.mount_foreground_with(
        &env.cipher,
        &env.mnt,
        &["--io-uring", "--no-push", "--key-check-interval", "1s"],
    );
    let pid = m.daemon_pid().expect("daemon pid");
    // The queues (one per possible CPU) start with the session loop, a moment after the
    // mount is visible.
    let cpus = fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .and_then(|s| s.trim().rsplit(['-', ',']).next()?.parse::<usize>().ok())
        .map_or(1, |n| n + 1);
    wait_until(Duration::from_secs(20), || {
        uring_thread_switches(pid).0 >= cpus
    });
    let (threads, before) = uring_thread_switches(pid);
    assert!(
        threads >= 1,
        "no fuser-uring-* thread in daemon {pid}; its log:\n{}",
        m.daemon_log()
    );

    let seed = seed("io_uring differential");
    let mut rng = StdRng::seed_from_u64(seed);
    let ops = 400;
    let names: Vec<String> = (0..12).map(|i| format!("f{i}")).collect();
    for step in 0..ops {
        let a = &names[rng.gen_range(0..names.len())];
        let b = &names[rng.gen_range(0..names.len())];
        let op = rng.gen_range(0..6);
        let ctx = format!("seed {seed} step {step} op {op} {a} {b}");
        match op {
            0 | 1 => {
                // Write at a random offset (possibly past the end), O_DIRECT on the mount so
                // the bytes reach the daemon now.
                let data: Vec<u8> = (0..pick_size(&mut rng)).map(|_| rng.r#gen()).collect();
                let off = if rng.gen_bool(0.5) {
                    0
                } else {
                    rng.gen_range(0..20_000u64)
                };
                let w = |dir: &Path| {
                    let f = OpenOptions::new()
                        .create(true)
                        .write(true)
                        .truncate(op == 1)
                        .open(dir.join(a))?;
                    f.write_all_at(&data, off)
                };
                assert_eq!(errno_of(w(&m.path(""))), errno_of(w(&plain)), "{ctx}");
            }
            2 => {
                // Read all back through the daemon (O_DIRECT bypasses the page cache).
                let r = |dir: &Path, direct: bool| -> std::io::Result<Vec<u8>> {
                    let mut o = OpenOptions::new();
                    o.read(true);
                    if direct {
                        o.custom_flags(libc::O_DIRECT);
                    }
                    let f = o.open(dir.join(a))?;
                    let mut out = Vec::new();
                    let mut buf = vec![0u8; 1 << 20];
                    loop {
                        let n = f.read_at(&mut buf, out.len() as u64)?;
                        if n == 0 {
                            return Ok(out);
                        }
                        out.extend_from_slice(&buf[..n]);
                    }
                };
                match (errno_of(r(&m.path(""), true)), errno_of(r(&plain, false))) {
                    (Ok(got), Ok(want)) => assert_bytes_eq(&ctx, &got, &want),
                    (got, want) => assert_eq!(got.map(|v| v.len()), want.map(|v| v.len()), "{ctx}"),
                }
            }
            3 => {
                let r = |dir: &Path| fs::rename(dir.join(a), dir.join(b));
                assert_eq!(errno_of(r(&m.path(""))), errno_of(r(&plain)), "{ctx}");
            }
            4 => {
                let r = |dir: &Path| fs::remove_file(dir.join(a));
                assert_eq!(errno_of(r(&m.path(""))), errno_of(r(&plain)), "{ctx}");
            }
            _ => {
                assert_eq!(listing(&m.path("")), listing(&plain), "{ctx}");
                let s = |dir: &Path| fs::metadata(dir.join(a)).map(|md| md.len());
                assert_eq!(errno_of(s(&m.path(""))), errno_of(s(&plain)), "{ctx}");
            }
        }
    }
    assert_eq!(listing(&m.path("")), listing(&plain));
    let (_, after) = uring_thread_switches(pid);
    println!("io_uring queue threads: {threads}, voluntary switches {before} -> {after}");
    assert!(
        after - before >= ops as u64 / 2,
        "the io_uring queues served almost nothing ({before} -> {after} switches over {ops} \
         operations): requests went through /dev/fuse"
    );

    // Plaintext through the rings: a 1 MiB write (requests) read back with O_DIRECT
    // (replies); every 32-byte window of it is unique.
    let mut payload = vec![0u8; 1 << 20];
    rng.fill(&mut payload[..]);
    let needles: Vec<(String, Vec<u8>)> = (0..64)
        .map(|i| {
            let at = i * (payload.len() / 64) + 4000;
            (format!("payload[{at}..]"), payload[at..at + 32].to_vec())
        })
        .collect();
    fs::write(m.path("kept"), &payload).unwrap();
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(m.path("kept"))
        .unwrap();
    let mut back = vec![0u8; payload.len()];
    let mut got = 0;
    while got < back.len() {
        let n = f.read_at(&mut back[got..], got as u64).unwrap();
        assert!(n > 0, "short read of kept at {got}");
        got += n;
    }
    drop(f);
    assert!(back == payload, "kept read back differently");
    drop(back);

    // Revocation cuts the io_uring path off like the /dev/fuse one.
    env.cmkfs(&["vault", "key", "update", "default", "--disable"])
        .assert_ok();
    let guard = Duration::from_secs(60);
    assert!(
        wait_until(guard, || env.status(&env.mnt)["state"] == "Inaccessible"),
        "never cut off"
    );
    let err = fs::read(m.path("kept")).expect_err("read after revocation");
    assert!(
        matches!(err.raw_os_error(), Some(libc::EACCES) | Some(libc::EIO)),
        "read after revocation: {err}"
    );
    let err = fs::write(m.path("new"), b"x").expect_err("write after revocation");
    assert!(
        matches!(err.raw_os_error(), Some(libc::EACCES) | Some(libc::EIO)),
        "write after revocation: {err}"
    );
    // ... and what went through the ring buffers is gone from the daemon.
    std::thread::sleep(Duration::from_millis(500));
    let found = crate::memory::scan(pid, &needles);
    drop(payload);
    assert!(
        found.is_empty(),
        "plaintext that went through the io_uring entries is still in the daemon:\n{}",
        found.join("\n")
    );
    env.cmkfs(&["vault", "key", "update", "default", "--enable"])
        .assert_ok();
    m.unmount();
}
