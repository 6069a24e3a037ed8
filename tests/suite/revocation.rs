//! Revocation through real mounts (issue 5): every revoke reason cuts off every path to
//! plaintext, restoring access heals without a remount, an unreachable vault degrades and
//! then cuts off after the grace period, a long write at cut-off ends cleanly, and the status
//! JSON keeps its schema.
//!
//! Times are printed, not asserted: these machines are shared. The waits below are hang
//! guards (generous limits on polling loops), never speed targets; the bounds themselves are
//! measured by `cmkfs drill` (see README).

use crate::common;

use std::ffi::OsStr;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use common::*;

/// How long a polling loop waits for a state it expects before failing the test.
const GUARD: Duration = Duration::from_secs(60);

fn state(env: &Env, target: &Path) -> String {
    env.status(target)["state"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

#[track_caller]
fn wait_state(env: &Env, target: &Path, want: &str) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    let ok = wait_until(GUARD, || {
        last = env.status(target);
        last["state"] == want
    });
    assert!(ok, "state never became {want}; last status: {last:#}");
    last
}

fn key_update(env: &Env, args: &[&str]) {
    let mut a = vec!["vault", "key", "update", "default"];
    a.extend_from_slice(args);
    env.cmkfs(&a).assert_ok();
}

fn drill(env: &Env, how: &str) -> serde_json::Value {
    let out = env.cmkfs(&[
        OsStr::new("drill"),
        env.mnt.as_os_str(),
        OsStr::new("--revoke"),
        OsStr::new(how),
        OsStr::new("--restore"),
        OsStr::new("--json"),
        OsStr::new("--timeout"),
        OsStr::new("30s"),
    ]);
    let report: serde_json::Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("drill --json is not JSON ({e}):\n{out}"));
    println!(
        "drill --revoke {how}: cut-off {} ms, heal {} ms, verdict {}",
        report["cutoff_ms"], report["heal_ms"], report["verdict"]
    );
    for p in report["paths"].as_array().expect("paths") {
        assert!(
            p["denied_ms"].is_number(),
            "{how}: path {} was never denied: {report:#}",
            p["path"]
        );
        assert_eq!(
            p["leaked_bytes"], 0,
            "{how}: path {} leaked plaintext: {report:#}",
            p["path"]
        );
    }
    let names: Vec<&str> = report["paths"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["path"].as_str())
        .collect();
    assert_eq!(
        names,
        [
            "new_open",
            "cached_read",
            "open_descriptor",
            "mmap",
            "readdir"
        ]
    );
    assert_eq!(report["leaked_bytes"], 0);
    assert_eq!(report["backing_intact"], true, "{report:#}");
    assert_eq!(
        report["verified"], true,
        "heal must give back the same bytes: {report:#}"
    );
    assert!(report["heal_ms"].is_number());
    report
}

#[test]
fn disable_and_delete_cut_off_every_path_and_heal() {
    let env = Env::new();
    env.init(&env.cipher);
    let m = env.mount(&env.cipher, &env.mnt);
    write(&m.path("keep.txt"), b"fsynced before the drills");
    for how in ["disable", "delete"] {
        drill(&env, how);
        // Healed: the volume serves again without a remount, and earlier data is intact.
        assert_eq!(read(&m.path("keep.txt")), b"fsynced before the drills");
        assert_eq!(state(&env, &env.mnt), "Accessible");
    }
    m.unmount();
}

#[test]
fn policy_removal_cuts_off_a_mount_that_uses_an_identity() {
    let env = Env::new();
    env.init(&env.cipher);
    let cred = env.root.join("app.cred.json");
    env.cmkfs(&[
        OsStr::new("vault"),
        OsStr::new("identity"),
        OsStr::new("create"),
        OsStr::new("app"),
        OsStr::new("--credential-file"),
        cred.as_os_str(),
    ])
    .assert_ok();
    env.cmkfs(&[
        "vault",
        "policy",
        "set",
        "app",
        "--key",
        "default",
        "--permissions",
        "get,wrapKey,unwrapKey",
    ])
    .assert_ok();
    let m = env.mount_with(
        &env.cipher,
        &env.mnt,
        &["--credential", cred.to_str().unwrap()],
    );
    drill(&env, "policy");
    m.unmount();
}

#[test]
fn periodic_checks_alone_detect_revocation_and_heal() {
    let env = Env::new();
    env.init(&env.cipher);
    let m = env.mount_with(
        &env.cipher,
        &env.mnt,
        &["--no-push", "--key-check-interval", "1s"],
    );
    write(&m.path("f"), b"periodic");
    let st = env.status(&env.mnt);
    assert_eq!(st["push"], false);
    assert_eq!(st["key_check_interval_s"], 1);
    key_update(&env, &["--disable"]);
    let st = wait_state(&env, &env.mnt, "Inaccessible");
    assert_eq!(st["reason"], "key disabled");
    let err = fs::read(m.path("f")).expect_err("read after cut-off");
    assert_eq!(
        err.raw_os_error(),
        Some(libc::EACCES),
        "revocation is EACCES: {err}"
    );
    key_update(&env, &["--enable"]);
    wait_state(&env, &env.mnt, "Accessible");
    assert_eq!(read(&m.path("f")), b"periodic");
    assert!(env.status(&env.mnt)["requests_denied"].as_u64().unwrap() >= 1);
    m.unmount();
}

#[test]
fn unreachable_vault_degrades_within_grace_then_cuts_off() {
    let env = Env::new();
    env.init(&env.cipher);
    let m = env.mount_with(
        &env.cipher,
        &env.mnt,
        &["--key-check-interval", "1s", "--grace-period", "4s"],
    );
    write(&m.path("f"), b"grace");
    let vault = env.home.join("vault");
    let away = env.home.join("vault.away");
    fs::rename(&vault, &away).unwrap();
    let st = wait_state(&env, &env.mnt, "Degraded");
    assert!(
        st["reason"].as_str().unwrap().contains("unavailable"),
        "{st:#}"
    );
    // Inside the grace period the keys stay live.
    assert_eq!(read(&m.path("f")), b"grace");
    let st = wait_state(&env, &env.mnt, "Inaccessible");
    assert!(
        st["reason"].as_str().unwrap().contains("grace period"),
        "{st:#}"
    );
    assert!(fs::read(m.path("f")).is_err());
    fs::rename(&away, &vault).unwrap();
    wait_state(&env, &env.mnt, "Accessible");
    assert_eq!(read(&m.path("f")), b"grace");
    m.unmount();
}

#[test]
fn zero_grace_fails_closed_at_once() {
    let env = Env::new();
    env.init(&env.cipher);
    let m = env.mount_with(
        &env.cipher,
        &env.mnt,
        &["--key-check-interval", "1s", "--grace-period", "0"],
    );
    fs::rename(env.home.join("vault"), env.home.join("vault.away")).unwrap();
    let st = wait_state(&env, &env.mnt, "Inaccessible");
    assert!(
        st["reason"].as_str().unwrap().contains("unreachable"),
        "{st:#}"
    );
    fs::rename(env.home.join("vault.away"), env.home.join("vault")).unwrap();
    wait_state(&env, &env.mnt, "Accessible");
    m.unmount();
}

/// The pattern byte at `off` of the long-write file: every 4 KiB sector is recognisable, so a
/// torn sector (half old, half new, or garbage) cannot pass.
fn pattern(off: usize) -> u8 {
    ((off / 4096) as u8)
        .wrapping_mul(31)
        .wrapping_add((off % 251) as u8)
}

#[test]
fn long_write_at_cut_off_ends_cleanly_without_torn_sectors() {
    let env = Env::new();
    env.init(&env.cipher);
    let m = env.mount(&env.cipher, &env.mnt);
    let path = m.path("big");
    let writer = std::thread::spawn(move || {
        let mut f = fs::File::create(&path).unwrap();
        let chunk = 1 << 20;
        let mut written = 0usize;
        // What a successful fsync acknowledged: with the writeback cache a write(2) only
        // reaches the kernel's pages, and the error of a refused write-back comes at fsync.
        let mut synced = 0usize;
        // Up to 2 GiB in 1 MiB writes: it is still writing when the key is disabled.
        for i in 0..2048usize {
            let buf: Vec<u8> = (i * chunk..(i + 1) * chunk).map(pattern).collect();
            match f.write(&buf) {
                Ok(n) => written += n,
                Err(e) => return (written, synced, Some(e.raw_os_error())),
            }
            if i % 16 == 0 {
                if f.sync_data().is_err() {
                    return (written, synced, Some(None));
                }
                synced = written;
            }
        }
        (written, synced, None)
    });
    // Let it get going, then revoke under it.
    assert!(wait_until(GUARD, || fs::metadata(m.path("big"))
        .map(|m| m.len() > 8 << 20)
        .unwrap_or(false)));
    key_update(&env, &["--disable"]);
    let (written, synced, err) = writer.join().unwrap();
    println!("writer stopped after {written} bytes ({synced} synced) with {err:?}");
    assert!(
        err.is_some(),
        "the write must fail once the key is disabled"
    );
    key_update(&env, &["--enable"]);
    wait_state(&env, &env.mnt, "Accessible");
    let mut f = fs::File::open(m.path("big")).unwrap();
    let mut data = Vec::new();
    f.read_to_end(&mut data).unwrap();
    assert!(
        data.len() >= synced,
        "acknowledged bytes lost: {} < {synced}",
        data.len()
    );
    for (i, sector) in data.chunks(4096).enumerate() {
        let want: Vec<u8> = (i * 4096..i * 4096 + sector.len()).map(pattern).collect();
        assert!(sector == want.as_slice(), "sector {i} is torn");
    }
    drop(f);
    m.unmount();
}

#[test]
fn status_json_schema_is_stable_and_the_hook_sees_events() {
    let env = Env::new();
    env.init(&env.cipher);
    let hook_log = env.root.join("hook.jsonl");
    let hook = format!("cat >> {}", hook_log.display());
    let m = env.mount_with(&env.cipher, &env.mnt, &["--on-state-change", &hook]);
    let st = env.status(&env.mnt);
    let mut keys: Vec<&str> = st.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "cipherdir",
            "des",
            "grace_period_s",
            "ids_not_durable",
            "key_check_interval_s",
            "key_id",
            "key_version",
            "last_check",
            "last_success",
            "memory",
            "mounted",
            "mountpoint",
            "next_check",
            "pid",
            "push",
            "reason",
            "requests_denied",
            "schema",
            "since",
            "state",
            "updated",
            "volume_id",
        ]
    );
    assert_eq!(st["schema"], 1);
    assert_eq!(st["state"], "Accessible");
    assert_eq!(st["ids_not_durable"], serde_json::Value::Null);
    assert_eq!(st["mounted"], true);
    assert_eq!(st["key_id"], env.info(&env.cipher)["key_id"]);
    // By cipher dir too, and as a list.
    assert_eq!(env.status(&env.cipher)["mountpoint"], st["mountpoint"]);
    let all = env.cmkfs(&["status", "--json"]);
    let all: serde_json::Value = serde_json::from_str(&all.stdout).unwrap();
    assert_eq!(all.as_array().map(|a| a.len()), Some(1));

    key_update(&env, &["--disable"]);
    wait_state(&env, &env.mnt, "Inaccessible");
    key_update(&env, &["--enable"]);
    wait_state(&env, &env.mnt, "Accessible");
    assert!(wait_until(GUARD, || fs::read_to_string(&hook_log)
        .map(|s| s.lines().count() >= 3)
        .unwrap_or(false)));
    let events: Vec<serde_json::Value> = fs::read_to_string(&hook_log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let tos: Vec<&str> = events.iter().map(|e| e["to"].as_str().unwrap()).collect();
    assert_eq!(tos, ["Accessible", "Inaccessible", "Accessible"]);
    assert_eq!(events[1]["reason"], "key disabled");
    assert_eq!(events[1]["event"], "StateChange");
    // The same events are in the home's event log.
    let log = fs::read_to_string(env.home.join("events.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 3);
    m.unmount();

    // Not mounted: status answers with a one-shot check of the key.
    let st = env.status(&env.cipher);
    assert_eq!(st["mounted"], false);
    assert_eq!(st["state"], "Accessible");
    key_update(&env, &["--disable"]);
    let st = env.status(&env.cipher);
    assert_eq!(st["state"], "Inaccessible");
}

#[test]
fn a_purged_key_cuts_off_for_good() {
    let env = Env::new();
    env.init(&env.cipher);
    let m = env.mount(&env.cipher, &env.mnt);
    write(&m.path("f"), b"gone with the key");
    env.cmkfs(&["vault", "key", "delete", "default"])
        .assert_ok();
    let st = wait_state(&env, &env.mnt, "Inaccessible");
    assert_eq!(st["reason"], "key deleted", "{st:#}");
    // Without purge protection the owner may purge at once: the key material is destroyed.
    env.cmkfs(&["vault", "key", "purge", "default"]).assert_ok();
    let st = wait_state(&env, &env.mnt, "Inaccessible");
    let purged = wait_until(GUARD, || env.status(&env.mnt)["reason"] == "key purged");
    assert!(purged, "reason should become `key purged`: {st:#}");
    assert!(fs::read(m.path("f")).is_err());
    assert!(fs::read_dir(&env.mnt).is_err());
    m.unmount();
    // Nothing can mount it again, and the ciphertext is still there.
    let out = env.try_mount(&env.cipher, &env.mnt);
    assert!(!out.ok());
    out.assert_clear_error();
    assert_eq!(data_files(&env.cipher).len(), 1);
}

/// Waits up to a minute for `fd` to be readable, then reads into `buf` (0 on timeout).
fn read_within(fd: i32, buf: &mut [u8]) -> usize {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd; a read into a buffer of the length given.
    unsafe {
        if libc::poll(&mut p, 1, 60_000) != 1 {
            return 0;
        }
        libc::read(fd, buf.as_mut_ptr().cast(), buf.len()).max(0) as usize
    }
}

/// A cut-off while a writer holds dirty pages (`--writeback-cache` keeps written pages in
/// the kernel): (a) nothing of the files is readable afterwards, by name or through
/// the writer's own descriptors, and no plaintext reached the backing store; (b) the writer
/// hears of it, at `fsync` or at `close` (a write-back the daemon refuses is reported, never
/// dropped in silence); (c) once the key is back, every data unit holds either the old or the
/// new data, and what a successful `fsync`/`close` acknowledged is there. One file is
/// overwritten in place and synced, one overwritten and closed, one extended.
///
/// The writer is a forked child: every `close` of a descriptor of the file flushes its dirty
/// pages, and a process that runs a command (`cmkfs vault key update`) closes its inherited
/// descriptors at `exec`, so the writer must not be the process that revokes.
#[test]
fn a_cut_off_with_dirty_pages_fails_the_writer_and_leaves_old_or_new_units() {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let marker = format!("<<dirty page plaintext {}>>", unique_hex());
    let env = Env::new().in_mode(&["--writeback-cache"]);
    env.init(&env.cipher);
    let m = env.mount(&env.cipher, &env.mnt);
    let old = repeated(b"<old unit>", 5 * SECTOR + 7);
    let cases = [
        ("fsynced", old.len()),
        ("closed", old.len()),
        ("extended", 9 * SECTOR + 3),
    ];
    let mut paths = Vec::new();
    let mut news = Vec::new();
    for (name, len) in cases {
        let mut f = fs::File::create(m.path(name)).unwrap();
        f.write_all(&old).unwrap();
        f.sync_all().unwrap();
        paths.push(CString::new(m.path(name).as_os_str().as_bytes()).unwrap());
        news.push(repeated(marker.as_bytes(), len));
    }
    let pipe = || {
        let mut fds = [0i32; 2];
        // SAFETY: a two-element out-array.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        fds
    };
    let (ready, go, results) = (pipe(), pipe(), pipe());
    let mut scratch = vec![0u8; SECTOR];
    // SAFETY: the child makes only raw system calls on data prepared above, then _exit()s.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        // SAFETY: as above.
        unsafe {
            let errno = || *libc::__errno_location();
            let mut fds = [-1i32; 3];
            for i in 0..3 {
                fds[i] = libc::open(paths[i].as_ptr(), libc::O_RDWR);
                let n = news[i].len();
                if fds[i] < 0 || libc::pwrite(fds[i], news[i].as_ptr().cast(), n, 0) != n as isize {
                    libc::_exit(10 + i as i32);
                }
            }
            libc::write(ready[1], b"r".as_ptr().cast(), 1);
            let mut b = [0u8; 1];
            libc::read(go[0], b.as_mut_ptr().cast(), 1);
            // Per file: the errno of a read through the writer's descriptor (0: it read),
            // then that of the fsync (or of the close, for the second file).
            let mut res = [0i32; 6];
            for i in 0..3 {
                if libc::pread(fds[i], scratch.as_mut_ptr().cast(), SECTOR, 0) < 0 {
                    res[2 * i] = errno();
                }
                if i != 1 && libc::fsync(fds[i]) != 0 {
                    res[2 * i + 1] = errno();
                }
                if libc::close(fds[i]) != 0 && i == 1 {
                    res[2 * i + 1] = errno();
                }
            }
            libc::write(results[1], res.as_ptr().cast(), std::mem::size_of_val(&res));
            libc::_exit(0);
        }
    }
    // SAFETY: closing the child's ends in the parent.
    unsafe {
        libc::close(ready[1]);
        libc::close(go[0]);
        libc::close(results[1]);
    }
    let mut b = [0u8; 1];
    let wrote = read_within(ready[0], &mut b) == 1;
    if wrote {
        key_update(&env, &["--disable"]);
        wait_state(&env, &env.mnt, "Inaccessible");
        // (a), by name and in the backing store, while the writer still holds its pages.
        for (name, _) in cases {
            assert!(
                fs::read(m.path(name)).is_err(),
                "{name} readable by name after the cut-off"
            );
        }
        assert_eq!(
            find_markers(&env.cipher, &[marker.as_bytes()]),
            Vec::<String>::new(),
            "plaintext in the backing store"
        );
    }
    // SAFETY: a one-byte write to our pipe, then reading the child's report.
    let mut res = [0i32; 6];
    let got = unsafe {
        libc::write(go[1], b"g".as_ptr().cast(), 1);
        let bytes = std::slice::from_raw_parts_mut(res.as_mut_ptr().cast::<u8>(), 24);
        read_within(results[0], bytes)
    };
    let mut status = 0;
    // SAFETY: our own child; it has reported (or is killed first).
    unsafe {
        if got != 24 {
            libc::kill(pid, libc::SIGKILL);
        }
        libc::waitpid(pid, &mut status, 0);
        for fd in [ready[0], go[1], results[0]] {
            libc::close(fd);
        }
    }
    assert!(wrote && got == 24, "the writer failed: status {status:#x}");
    let mut outcome = Vec::new();
    for (i, (name, len)) in cases.iter().enumerate() {
        let (read_errno, end_errno) = (res[2 * i], res[2 * i + 1]);
        let how = if i == 1 { "close" } else { "fsync" };
        println!("{name}: the writer's read errno {read_errno}, its {how} errno {end_errno}");
        // (a), through the writer's own descriptor.
        assert_ne!(
            read_errno, 0,
            "{name}: the writer's own page was served after the cut-off"
        );
        outcome.push((*name, *len, end_errno == 0));
    }
    // (b)
    assert!(
        outcome.iter().all(|(_, _, ok)| !ok),
        "a writer was told its dirty pages were written after the cut-off: {outcome:?}"
    );
    // (c)
    key_update(&env, &["--enable"]);
    wait_state(&env, &env.mnt, "Accessible");
    let check = |mnt: &Path, when: &str| {
        for (i, (name, len, acknowledged)) in outcome.iter().enumerate() {
            let new = &news[i];
            let got = read(&mnt.join(name));
            if *acknowledged {
                assert_bytes_eq(&format!("{name} {when} (acknowledged)"), &got, new);
                continue;
            }
            assert!(
                got.len() == old.len() || got.len() == *len,
                "{name} {when}: size {} is neither the old {} nor the new {len}",
                got.len(),
                old.len()
            );
            for (u, unit) in got.chunks(SECTOR).enumerate() {
                let at = |v: &[u8]| {
                    v.get(u * SECTOR..u * SECTOR + unit.len())
                        .map(<[u8]>::to_vec)
                };
                assert!(
                    at(&old).as_deref() == Some(unit) || at(new).as_deref() == Some(unit),
                    "{name} {when}: unit {u} is neither old nor new data"
                );
            }
        }
    };
    check(&env.mnt, "after the key came back");
    m.unmount();
    let m = env.mount(&env.cipher, &env.mnt);
    check(&env.mnt, "after a remount");
    m.unmount();
    assert_eq!(
        find_markers(&env.cipher, &[marker.as_bytes()]),
        Vec::<String>::new(),
        "plaintext in the backing store after the unmount"
    );
}

/// Sends SIGCONT on drop: a stopped daemon must never outlive a failed assertion.
struct Stopped(i32);

impl Drop for Stopped {
    fn drop(&mut self) {
        // SAFETY: kill with a pid and a signal number.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

/// A backing store that stops answering (a hung network share; here a cmkfs mount whose
/// daemon is stopped) blocked the key check's header read forever: the volume stayed
/// Accessible after its key was disabled, even with no grace period. The read now has a
/// deadline and a header that does not come is denied.
#[test]
fn a_stalled_backing_store_cannot_hold_off_revocation() {
    let env = Env::new();
    env.init(&env.cipher);
    let share = env.mount(&env.cipher, &env.mnt);
    let inner = share.path("inner-cipher");
    fs::create_dir(&inner).unwrap();
    env.init_with(&inner, &["--key", "inner"]).assert_ok();
    let inner_mnt = env.dir("inner-mnt");
    let m = env.mount_with(
        &inner,
        &inner_mnt,
        &[
            "--no-push",
            "--key-check-interval",
            "1s",
            "--grace-period",
            "0s",
        ],
    );
    write(&m.path("f"), b"behind a share");
    let pid = share.daemon_pid().expect("the share's daemon") as i32;
    // SAFETY: kill with a pid and a signal number.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let stopped = Stopped(pid);
    env.cmkfs(&["vault", "key", "update", "inner", "--disable"])
        .assert_ok();
    let st = wait_state(&env, &inner_mnt, "Inaccessible");
    assert!(
        st["reason"]
            .as_str()
            .unwrap_or("")
            .contains("does not answer"),
        "{st:#}"
    );
    drop(stopped);
    let err = fs::read(m.path("f")).expect_err("read after cut-off");
    assert_eq!(err.raw_os_error(), Some(libc::EACCES), "{err}");
    m.unmount();
    share.unmount();
}

/// Disabling a key revokes it whichever version wraps a volume's DEK. Before, `vault key
/// update NAME --disable` disabled the newest version only (Key Vault's per-version call), so
/// a volume wrapped by an older version (after a rotation) stayed Accessible.
#[test]
fn disabling_a_key_cuts_off_volumes_wrapped_by_an_older_version() {
    let env = Env::new();
    env.init(&env.cipher);
    // After the rotation the volume's DEK is still wrapped by the older version.
    env.cmkfs(&["vault", "key", "rotate", "default"])
        .assert_ok();
    let m = env.mount_with(&env.cipher, &env.mnt, &["--key-check-interval", "1s"]);
    write(&m.path("f"), b"older version");
    let versions = |env: &Env| -> Vec<bool> {
        let out = env.cmkfs(&["vault", "key", "versions", "default", "--json"]);
        out.assert_ok();
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|k| k["enabled"].as_bool().unwrap())
            .collect()
    };

    for (off, on) in [
        (&["update", "--disable"][..], &["update", "--enable"][..]),
        (&["disable"][..], &["enable"][..]),
    ] {
        let mut a = vec!["vault", "key", off[0], "default"];
        a.extend_from_slice(&off[1..]);
        let out = env.cmkfs(&a);
        out.assert_ok();
        assert_eq!(
            versions(&env),
            [false, false],
            "{off:?} disables every version"
        );
        assert_eq!(
            out.stdout
                .lines()
                .filter(|l| l.starts_with("disabled "))
                .count(),
            2,
            "{off:?} says which versions it disabled: {out}"
        );
        let st = wait_state(&env, &env.mnt, "Inaccessible");
        assert_eq!(st["reason"], "key disabled");
        let err = fs::read(m.path("f")).expect_err("read after cut-off");
        assert_eq!(err.raw_os_error(), Some(libc::EACCES));

        let mut a = vec!["vault", "key", on[0], "default"];
        a.extend_from_slice(&on[1..]);
        let out = env.cmkfs(&a);
        out.assert_ok();
        assert_eq!(
            out.stdout
                .lines()
                .filter(|l| l.starts_with("enabled "))
                .count(),
            2,
            "{on:?}: {out}"
        );
        assert_eq!(versions(&env), [true, true]);
        wait_state(&env, &env.mnt, "Accessible");
        assert_eq!(read(&m.path("f")), b"older version");
    }

    // --version V: that version only (Key Vault's semantics, kept on request).
    let newest = {
        let out = env.cmkfs(&["vault", "key", "show", "default", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        v["version"].as_str().unwrap().to_string()
    };
    let out = env.cmkfs(&[
        "vault",
        "key",
        "disable",
        "default",
        "--version",
        &newest,
        "--json",
    ]);
    out.assert_ok();
    let changed: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(changed.as_array().unwrap().len(), 1);
    assert_eq!(versions(&env), [true, false]);
    assert_eq!(state(&env, &env.mnt), "Accessible");
    m.unmount();
}

/// Names, attributes, symlink targets and listings are cached by the kernel for the mount's
/// cache timeout (60 s by default): at cut-off the daemon drops them all, so nothing the
/// kernel cached before answers after it, and everything comes back when the key does.
#[test]
fn cached_names_and_attributes_are_dropped_at_cut_off() {
    let env = Env::new();
    env.init(&env.cipher);
    let m = env.mount(&env.cipher, &env.mnt);
    fs::create_dir_all(m.path("d/sub")).unwrap();
    write(&m.path("d/sub/f"), b"cached");
    std::os::unix::fs::symlink("sub/f", m.path("d/l")).unwrap();
    // Into the kernel's caches: dentries, attributes, the link's target.
    let before = fs::metadata(m.path("d/sub/f")).unwrap();
    assert_eq!(before.len(), 6);
    assert_eq!(fs::read_link(m.path("d/l")).unwrap(), Path::new("sub/f"));
    assert_eq!(fs::read_dir(m.path("d")).unwrap().count(), 2);
    // Descriptors opened before the cut-off (a file, a directory, the root).
    let held: Vec<fs::File> = ["d/sub/f", "d", ""]
        .iter()
        .map(|p| fs::File::open(m.path(p)).unwrap())
        .collect();
    let backing_meta = || {
        let mut out = Vec::new();
        let mut stack = vec![env.cipher.clone()];
        while let Some(d) = stack.pop() {
            let md = fs::symlink_metadata(&d).unwrap();
            out.push((
                d.clone(),
                md.mode(),
                md.uid(),
                md.gid(),
                md.mtime(),
                md.mtime_nsec(),
            ));
            if md.is_dir() {
                stack.extend(fs::read_dir(&d).unwrap().map(|e| e.unwrap().path()));
            }
        }
        out.sort();
        out
    };
    let meta_before = backing_meta();
    key_update(&env, &["--disable"]);
    wait_state(&env, &env.mnt, "Inaccessible");
    // Through them: nothing described, nothing changed (attack session 8, F1 and F3).
    for f in &held {
        use std::os::fd::AsRawFd;
        let fd = f.as_raw_fd();
        let e = f.metadata().expect_err("fstat after the cut-off");
        assert_eq!(e.raw_os_error(), Some(libc::EACCES), "fstat: {e}");
        // SAFETY: plain syscalls on a descriptor this test owns; a null times pointer
        // means "now".
        let rc = unsafe {
            [
                libc::fchmod(fd, 0o600),
                libc::fchown(fd, 65534, 65534),
                libc::futimens(fd, std::ptr::null()),
            ]
        };
        assert_eq!(
            rc,
            [-1, -1, -1],
            "a change through a held descriptor succeeded"
        );
    }
    assert_eq!(
        backing_meta(),
        meta_before,
        "the backing store changed after the cut-off"
    );
    drop(held);
    for p in ["d", "d/sub", "d/sub/f", "d/l"] {
        let err = fs::symlink_metadata(m.path(p)).expect_err(p);
        assert_eq!(err.raw_os_error(), Some(libc::EACCES), "stat {p}: {err}");
    }
    assert!(
        fs::metadata(m.path("d/l")).is_err(),
        "stat through the link"
    );
    assert!(fs::read_link(m.path("d/l")).is_err(), "readlink");
    assert!(fs::read_dir(m.path("d")).is_err(), "listing");
    assert!(fs::read(m.path("d/sub/f")).is_err(), "read");
    key_update(&env, &["--enable"]);
    wait_state(&env, &env.mnt, "Accessible");
    assert_eq!(read(&m.path("d/l")), b"cached");
    assert_eq!(fs::read_dir(m.path("d")).unwrap().count(), 2);
    m.unmount();
    // A timeout past an hour is refused with one line (nothing is mounted).
    let out = env.cmkfs(&[
        OsStr::new("mount"),
        env.cipher.as_os_str(),
        env.mnt.as_os_str(),
        OsStr::new("--cache-timeout"),
        OsStr::new("2h"),
    ]);
    assert!(!out.ok() && out.stderr.contains("at most 1h"), "{out}");
    assert!(!is_mounted(&env.mnt));
}
