//! A writer of the backing store plants something that is not a header file where the volume
//! header was (second review, findings C1, C2 and the header part of C4):
//!
//! - a FIFO blocked the mount's monitor thread in `open()` forever: revocation never came,
//!   even after the real header was put back and the key disabled, and `cmkfs umount` hung;
//! - any other read error (a symlink to a directory or through a file, to `/proc/1/mem`, a
//!   socket) counted as an outage: Degraded, plaintext served for the 1 h grace period;
//! - `info`, `status`, `fsck`, `mount` and `des update` hung on a FIFO and grew to gigabytes
//!   on a symlink to `/dev/zero`.
//!
//! The rule now: on a live mount a header that cannot be read as a bounded regular file
//! (whatever the errno), or no longer parses or verifies, is *denied* (cut off at once); only
//! the vault's transport causes outages. Commands end at once with one line.

use crate::common;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::Duration;

use common::*;

/// How long a polling loop waits for a state it expects (a hang guard, not a speed target).
const GUARD: Duration = Duration::from_secs(60);

fn status(env: &Env, target: &Path) -> serde_json::Value {
    let out = env.cmkfs(&[
        OsStr::new("status"),
        target.as_os_str(),
        OsStr::new("--json"),
    ]);
    serde_json::from_str(&out.stdout).unwrap_or(serde_json::Value::Null)
}

#[track_caller]
fn wait_state(env: &Env, target: &Path, want: &str) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    let ok = wait_until(GUARD, || {
        last = status(env, target);
        last["state"] == want
    });
    assert!(ok, "state never became {want}; last status: {last:#}");
    last
}

/// What a writer of the backing store puts where the header was.
#[derive(Clone, Copy, Debug)]
enum Plant {
    Fifo,
    /// A symlink to a directory (reads fail with EISDIR when followed).
    SymlinkToDir,
    /// A symlink through a regular file (ENOTDIR when followed).
    SymlinkThroughFile,
    /// A symlink to `/proc/1/mem` (EIO/EACCES when followed).
    SymlinkToProcMem,
    /// A symlink to `/dev/zero` (an endless read when followed).
    SymlinkToDevZero,
    Socket,
    /// A sparse file of 8 GiB (a reader without a bound allocates it).
    Huge,
}

const ALL: [Plant; 7] = [
    Plant::Fifo,
    Plant::SymlinkToDir,
    Plant::SymlinkThroughFile,
    Plant::SymlinkToProcMem,
    Plant::SymlinkToDevZero,
    Plant::Socket,
    Plant::Huge,
];

/// Replaces the header by `what`, atomically (built beside it, renamed over it, as `mv`
/// does). Returns the socket's listener, which must live as long as the plant.
fn plant(cipher: &Path, what: Plant) -> Option<UnixListener> {
    let tmp = cipher.join(".planted");
    let _ = fs::remove_file(&tmp);
    let mut listener = None;
    match what {
        Plant::Fifo => {
            let c = std::ffi::CString::new(tmp.to_str().unwrap()).unwrap();
            // SAFETY: a valid C path.
            assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        }
        Plant::SymlinkToDir => std::os::unix::fs::symlink("/", &tmp).unwrap(),
        Plant::SymlinkThroughFile => std::os::unix::fs::symlink("/etc/passwd/x", &tmp).unwrap(),
        Plant::SymlinkToProcMem => std::os::unix::fs::symlink("/proc/1/mem", &tmp).unwrap(),
        Plant::SymlinkToDevZero => std::os::unix::fs::symlink("/dev/zero", &tmp).unwrap(),
        Plant::Socket => listener = Some(UnixListener::bind(&tmp).unwrap()),
        Plant::Huge => {
            let f = fs::File::create(&tmp).unwrap();
            f.set_len(8 << 30).unwrap();
        }
    }
    fs::rename(&tmp, cipher.join(HEADER_NAME)).unwrap();
    listener
}

fn put_back(cipher: &Path, original: &[u8]) {
    let tmp = cipher.join(".restored");
    fs::write(&tmp, original).unwrap();
    fs::rename(&tmp, cipher.join(HEADER_NAME)).unwrap();
}

fn read_errno(p: &Path) -> Result<Vec<u8>, Option<i32>> {
    fs::read(p).map_err(|e| e.raw_os_error())
}

/// C1 + C2: every kind of planted header cuts a live mount off at its next key check
/// (Inaccessible, never Degraded), and putting the verified header back heals it. Then the
/// tester's exact sequence: a FIFO as the header, the real header put back, the key disabled
/// — the mount must go Inaccessible (on the old release its monitor was stuck in `open()` of
/// the FIFO forever), and `cmkfs umount` must finish.
#[test]
fn a_planted_header_is_denied_never_an_outage() {
    let env = Env::new();
    env.init(&env.cipher);
    let m = env.mount_with(&env.cipher, &env.mnt, &["--key-check-interval", "1s"]);
    write(&m.path("f"), b"plaintext");
    let original = fs::read(env.cipher.join(HEADER_NAME)).unwrap();
    for what in ALL {
        let _keep = plant(&env.cipher, what);
        let s = wait_state(&env, &env.mnt, "Inaccessible");
        let reason = s["reason"].as_str().unwrap_or_default().to_string();
        println!("{what:?}: {reason}");
        assert!(reason.contains("header"), "{what:?}: {s:#}");
        assert_eq!(
            read_errno(&m.path("f")),
            Err(Some(libc::EACCES)),
            "{what:?}"
        );
        put_back(&env.cipher, &original);
        wait_state(&env, &env.mnt, "Accessible");
        assert_eq!(read(&m.path("f")), b"plaintext", "{what:?}");
    }

    // The tester's sequence (C1).
    plant(&env.cipher, Plant::Fifo);
    std::thread::sleep(Duration::from_secs(3));
    put_back(&env.cipher, &original);
    env.cmkfs(&["vault", "key", "update", "default", "--disable"])
        .assert_ok();
    let s = wait_state(&env, &env.mnt, "Inaccessible");
    println!("FIFO, header back, key disabled: {}", s["reason"]);
    assert_eq!(read_errno(&m.path("f")), Err(Some(libc::EACCES)));
    m.unmount();
}

/// C4 (header): every command that reads a header ends at once, with one line naming what is
/// wrong, whatever was planted — no hang on a FIFO, no endless read of `/dev/zero`, no 8 GiB
/// allocation. `des update` over such a volume finishes too, and the set's rotation completes
/// once the header is back.
#[test]
fn commands_refuse_a_planted_header_with_one_line() {
    let env = Env::new();
    env.cmkfs(&["vault", "config", "--purge-protection", "on"])
        .assert_ok();
    env.cmkfs(&["vault", "key", "create", "k", "--key-size", KEY_SIZE])
        .assert_ok();
    env.cmkfs(&["des", "create", "d", "--key", "k"]).assert_ok();
    env.cmkfs(&[
        OsStr::new("init"),
        env.cipher.as_os_str(),
        OsStr::new("--des"),
        OsStr::new("d"),
    ])
    .assert_ok();
    let original = fs::read(env.cipher.join(HEADER_NAME)).unwrap();
    let c = env.cipher.as_os_str();
    for what in [
        Plant::Fifo,
        Plant::SymlinkToDevZero,
        Plant::Socket,
        Plant::Huge,
    ] {
        let _keep = plant(&env.cipher, what);
        for args in [
            vec![OsStr::new("info"), c],
            vec![OsStr::new("status"), c],
            vec![OsStr::new("mount"), c, env.mnt.as_os_str()],
        ] {
            let out = env.cmkfs(&args);
            out.assert_clear_error();
            assert!(
                out.stderr.contains(HEADER_NAME),
                "{what:?}: the error names the header:\n{out}"
            );
            assert!(!is_mounted(&env.mnt));
        }
        // fsck reports the header as unusable (exit 1 or 4), within its time limit.
        let out = env.cmkfs(&[OsStr::new("fsck"), c]);
        assert!(!out.ok(), "{what:?}: fsck of a planted header:\n{out}");
        assert!(out.status.code().is_some(), "{out}");
        put_back(&env.cipher, &original);
    }
    // des update over a planted header: ends, says which volume, and completes once the
    // header is back.
    env.cmkfs(&["vault", "key", "rotate", "k"]).assert_ok();
    let _keep = plant(&env.cipher, Plant::Fifo);
    let out = env.cmkfs(&["des", "update", "d", "--key", "k"]);
    assert!(!out.ok(), "des update over a FIFO header:\n{out}");
    assert!(
        out.stderr.contains(HEADER_NAME)
            || out.stdout.contains(HEADER_NAME)
            || out.stderr.contains(env.cipher.to_str().unwrap()),
        "{out}"
    );
    put_back(&env.cipher, &original);
    env.cmkfs(&["des", "update", "d", "--key", "k"]).assert_ok();
    let show: serde_json::Value =
        serde_json::from_str(&env.cmkfs(&["des", "show", "d", "--json"]).stdout).unwrap();
    assert_eq!(
        show["previousKeys"].as_array().map(Vec::len).unwrap_or(0),
        0,
        "the rotation completed: {show:#}"
    );
}

/// Second review, L6: a key name whose case was changed in the header gave a misleading "key
/// purged" error; the error now says the key id names no key here (and which one it
/// resembles).
#[test]
fn a_key_name_with_another_case_is_not_called_purged() {
    let env = Env::new();
    env.init(&env.cipher);
    let p = env.cipher.join(HEADER_NAME);
    let text = fs::read_to_string(&p).unwrap();
    fs::write(&p, text.replace("/keys/default/", "/keys/Default/")).unwrap();
    let out = env.try_mount(&env.cipher, &env.mnt);
    out.assert_clear_error();
    assert!(
        out.stderr.contains("\"Default\"") && !out.stderr.contains("purged"),
        "{out}"
    );
    assert!(!is_mounted(&env.mnt));
}

/// Session 8, finding F1: a header whose MAC does not verify (its format edited 3 -> 2, a
/// file header length of 32) is not acted on: `fsck --repair` reports the header and moves no
/// file (it used to set every intact file aside as `file_format_mismatch`), with the key or
/// without it (`--no-key`: the format findings are reported, not acted on).
#[test]
fn fsck_repair_moves_no_file_on_the_word_of_an_unverified_header() {
    let env = Env::new();
    env.init(&env.cipher).assert_ok();
    let m = env.mount(&env.cipher, &env.mnt);
    for i in 0..3 {
        fs::write(env.mnt.join(format!("f{i}")), vec![i as u8; 5000]).unwrap();
    }
    m.unmount();
    let path = env.cipher.join(HEADER_NAME);
    let original = fs::read(&path).unwrap();
    let mut h: serde_json::Value = serde_json::from_slice(&original).unwrap();
    h["format_version"] = 2.into();
    h["file_header_len"] = 32.into();
    fs::write(&path, serde_json::to_vec_pretty(&h).unwrap()).unwrap();
    let quarantine = env.cipher.join("cmkfs.quarantine");
    for extra in [&[][..], &["--no-key"][..]] {
        let mut args = vec!["fsck", env.cipher.to_str().unwrap(), "--repair", "--json"];
        args.extend_from_slice(extra);
        let out = env.cmkfs(&args);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {out}");
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        assert!(
            !quarantine.exists(),
            "{extra:?}: files were set aside:\n{out}"
        );
        for p in v["problems"].as_array().unwrap() {
            assert_eq!(p["repaired"], false, "{extra:?}: {p}");
        }
        if extra.is_empty() {
            let p = &v["problems"][0];
            assert_eq!(p["kind"], "header_mac_mismatch", "{out}");
            assert!(
                p["detail"].as_str().unwrap().contains("nothing was moved"),
                "{out}"
            );
        }
    }
    fs::write(&path, &original).unwrap();
    let out = env.cmkfs(&["fsck", env.cipher.to_str().unwrap()]);
    assert!(out.ok() && out.stdout.contains("clean"), "{out}");
}
