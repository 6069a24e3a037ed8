//! The backing store is untrusted input (issue 11): a header cannot make cmkfs load code or
//! talk to a vault this machine did not configure, cannot hold off a revocation, cannot turn
//! a single-encryption volume into a double-encrypted one, and no field of it goes
//! unauthenticated. Also: what cmkfs creates is private whatever the umask, and its output to
//! a closed pipe ends quietly.
//!
//! Each test reproduces one finding of the review against the release before the fix
//! (`CMKFS_TEST_BIN=<old cmkfs> cargo test --test suite security::` fails) and passes now.

use crate::common;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, Stdio};
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
fn wait_state(env: &Env, target: &Path, want: &str, within: Duration) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    let ok = wait_until(within, || {
        last = status(env, target);
        last["state"] == want
    });
    assert!(ok, "state never became {want}; last status: {last:#}");
    last
}

/// Rewrites the header JSON as a writer of the backing store would (atomically, so that a
/// mount never reads half of it).
fn edit_header(cipher: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = cipher.join(HEADER_NAME);
    let mut v: serde_json::Value = serde_json::from_slice(&fs::read(&p).unwrap()).unwrap();
    f(&mut v);
    let tmp = cipher.join(".cmkfs-tmp.test-edit");
    fs::write(&tmp, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    fs::rename(&tmp, &p).unwrap();
}

fn key_version(cipher: &Path) -> String {
    let v: serde_json::Value =
        serde_json::from_slice(&fs::read(cipher.join(HEADER_NAME)).unwrap()).unwrap();
    v["key_id"]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .to_string()
}

/// A harmless shared object whose constructor creates `marker` when it is loaded.
fn marker_module(src_dir: &Path, so: &Path, marker: &Path) {
    let src = src_dir.join("marker.c");
    fs::write(
        &src,
        format!(
            "#include <stdio.h>\n\
             __attribute__((constructor)) static void cmkfs_test_marker(void) {{\n\
               FILE *f = fopen(\"{}\", \"w\");\n\
               if (f) {{ fputs(\"loaded\\n\", f); fclose(f); }}\n\
             }}\n",
            marker.display()
        ),
    )
    .unwrap();
    let out = Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(so)
        .arg(&src)
        .stdin(Stdio::null())
        .output()
        .expect("cc (a C compiler; the Rust toolchain needs one to link)");
    assert!(
        out.status.success(),
        "cc: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Finding 1: a key id of the form `pkcs11:/<cipherdir>/x.so?...` made mount, status, fsck
/// and des update dlopen a module from the backing directory (as root). Now a header only
/// names a vault; an unconfigured one is refused, with a one-line error saying how to trust
/// it, before anything is loaded. The same entry added to a *mounted* volume's header cuts
/// the mount off (denied) at its next check, loading nothing.
#[test]
fn a_crafted_pkcs11_key_id_loads_no_code() {
    let env = Env::new();
    env.cmkfs(&["vault", "config", "--purge-protection", "on"])
        .assert_ok();
    env.cmkfs(&["vault", "key", "create", "dk", "--key-size", KEY_SIZE])
        .assert_ok();
    env.cmkfs(&["des", "create", "set", "--key", "dk"])
        .assert_ok();
    env.init_with(&env.cipher, &["--des", "set"]);
    let marker = env.root.join("LOADED");
    let so = env.cipher.join("x.so");
    marker_module(&env.root, &so, &marker);
    let version = key_version(&env.cipher);
    let crafted = format!(
        "pkcs11:{}?token=x&pin-value=1/keys/dk/{version}",
        so.display()
    );
    let original = fs::read(env.cipher.join(HEADER_NAME)).unwrap();
    edit_header(&env.cipher, |h| h["key_id"] = crafted.clone().into());

    let cipher = env.cipher.as_os_str();
    let mnt = env.mnt.as_os_str();
    for args in [
        vec![OsStr::new("mount"), cipher, mnt],
        vec![OsStr::new("status"), cipher],
        vec![OsStr::new("fsck"), cipher],
        vec![OsStr::new("info"), cipher],
        vec![OsStr::new("des"), OsStr::new("update"), OsStr::new("set")],
    ] {
        let out = env.cmkfs(&args);
        assert!(
            !marker.exists(),
            "`cmkfs {:?}` loaded the module named by the header:\n{out}",
            args
        );
        assert!(!is_mounted(&env.mnt), "mounted a volume it cannot trust");
        if args[0] != "status" {
            out.assert_clear_error();
        }
        let text = format!("{}{}", out.stdout, out.stderr);
        assert!(
            text.contains("cmkfs vault add"),
            "the refusal says how to trust a vault:\n{out}"
        );
    }

    // On a live mount: a platform entry naming the module cuts the mount off, loading nothing.
    fs::write(env.cipher.join(HEADER_NAME), &original).unwrap();
    let m = env.mount_with(&env.cipher, &env.mnt, &["--key-check-interval", "1s"]);
    write(&m.path("f"), b"plaintext");
    edit_header(&env.cipher, |h| {
        h["platform"] = serde_json::json!({
            "key_id": format!("pkcs11:{}?token=x&pin-value=1/keys/cmkfs-platform/{version}", so.display()),
            "wrap_alg": "RSA-OAEP-256",
            "wrapped_dek": "AAAA",
            "dek_fingerprint": "00112233445566778899aabbccddeeff",
        })
    });
    let s = wait_state(&env, &env.mnt, "Inaccessible", GUARD);
    println!("live platform entry: {}", s["reason"]);
    assert!(!marker.exists(), "the running daemon loaded the module");
    assert_eq!(
        fs::read(m.path("f")).map_err(|e| e.raw_os_error()),
        Err(Some(libc::EACCES))
    );
    drop(m);
}

/// Configuring a PKCS#11 vault checks the module: a module inside a backing directory, or in
/// a directory others can write to, is refused (and never loaded).
#[test]
fn vault_add_refuses_untrusted_modules_and_lists_what_is_trusted() {
    let env = Env::new();
    env.init(&env.cipher);
    let marker = env.root.join("LOADED");
    let so = env.cipher.join("x.so");
    marker_module(&env.root, &so, &marker);
    let out = env.cmkfs(&[
        "vault",
        "add",
        "evil",
        &format!("pkcs11:{}?token=x", so.display()),
    ]);
    out.assert_clear_error();
    assert!(out.stderr.contains("cannot be trusted"), "{out}");
    assert!(!marker.exists());
    // A PIN in the URL is refused too: the configuration is not a secret store.
    let out = env.cmkfs(&[
        "vault",
        "add",
        "hsm",
        "pkcs11:/usr/lib/softhsm/libsofthsm2.so?token=t&pin-value=1234",
    ]);
    out.assert_clear_error();
    assert!(out.stderr.contains("pin-source"), "{out}");

    env.cmkfs(&["vault", "add", "remote", "https://vault.example:8443/"])
        .assert_ok();
    let out = env.cmkfs(&["vault", "list-configured", "--json"]);
    let list: serde_json::Value = serde_json::from_str(&out.assert_ok().stdout).unwrap();
    assert_eq!(list[0]["url"], "https://vault.example:8443");
    assert_eq!(list[0]["kind"], "https");
    let text = env.cmkfs(&["vault", "list-configured"]);
    assert!(text.stdout.contains("local:"), "{text}");
    let p = env.home.join("vaults.json");
    assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
    env.cmkfs(&["vault", "add", "remote", "https://other:1"])
        .assert_clear_error();
    env.cmkfs(&["vault", "remove", "remote"]).assert_ok();
    env.cmkfs(&["vault", "remove", "remote"])
        .assert_clear_error();
}

/// Finding 2: on a live mount, changing only the vault part of the header's key id (`local:`
/// → `https://127.0.0.1:1`) turned the next denial into "vault unavailable": after the key
/// was disabled the mount went Degraded and kept serving plaintext for the grace period. Now
/// the edit itself cuts the mount off; putting the verified header back heals it.
#[test]
fn a_header_edit_cannot_hold_off_revocation() {
    let env = Env::new();
    env.init(&env.cipher);
    let m = env.mount_with(&env.cipher, &env.mnt, &["--key-check-interval", "1s"]);
    write(&m.path("f"), b"plaintext");
    let original = fs::read(env.cipher.join(HEADER_NAME)).unwrap();
    let version = key_version(&env.cipher);
    edit_header(&env.cipher, |h| {
        h["key_id"] = format!("https://127.0.0.1:1/keys/default/{version}").into()
    });
    env.cmkfs(&["vault", "key", "update", "default", "--disable"])
        .assert_ok();
    let s = wait_state(&env, &env.mnt, "Inaccessible", GUARD);
    println!("vault part changed, key disabled: {}", s["reason"]);
    assert_eq!(
        fs::read(m.path("f")).map_err(|e| e.raw_os_error()),
        Err(Some(libc::EACCES))
    );
    // The verified header back and the key enabled: the volume heals without a remount.
    fs::write(env.cipher.join(HEADER_NAME), &original).unwrap();
    env.cmkfs(&["vault", "key", "update", "default", "--enable"])
        .assert_ok();
    wait_state(&env, &env.mnt, "Accessible", GUARD);
    assert_eq!(read(&m.path("f")), b"plaintext");

    // The edit alone (key still enabled) is a denial too, not an outage.
    edit_header(&env.cipher, |h| {
        h["key_id"] = format!("https://127.0.0.1:1/keys/default/{version}").into()
    });
    let s = wait_state(&env, &env.mnt, "Inaccessible", GUARD);
    assert!(
        s["reason"].as_str().unwrap().contains("vault"),
        "the reason names the change: {s:#}"
    );
    fs::write(env.cipher.join(HEADER_NAME), &original).unwrap();
    wait_state(&env, &env.mnt, "Accessible", GUARD);
    m.unmount();
}

/// A platform envelope is honoured only for a volume made double-encrypted: one added to a
/// single-encryption volume's header (pointing at a vault that cannot be reached, which
/// turned the next check into "unavailable" and so held off revocation) cuts a live mount
/// off, and a mount of such a header is refused.
#[test]
fn a_platform_entry_added_to_a_single_encryption_header_is_refused() {
    let env = Env::new();
    env.init(&env.cipher);
    let m = env.mount_with(&env.cipher, &env.mnt, &["--key-check-interval", "1s"]);
    write(&m.path("f"), b"plaintext");
    let version = key_version(&env.cipher);
    edit_header(&env.cipher, |h| {
        h["platform"] = serde_json::json!({
            "key_id": format!("https://127.0.0.1:1/keys/cmkfs-platform/{version}"),
            "wrap_alg": "RSA-OAEP-256",
            "wrapped_dek": "AAAA",
            "dek_fingerprint": "00112233445566778899aabbccddeeff",
        })
    });
    let s = wait_state(&env, &env.mnt, "Inaccessible", GUARD);
    println!("platform entry added: {}", s["reason"]);
    assert_eq!(
        fs::read(m.path("f")).map_err(|e| e.raw_os_error()),
        Err(Some(libc::EACCES))
    );
    drop(m);
    // A fresh mount refuses it too, whatever the entry names.
    edit_header(&env.cipher, |h| {
        h["platform"]["key_id"] = format!("local:/keys/cmkfs-platform/{version}").into();
    });
    let out = env.try_mount(&env.cipher, &env.mnt);
    out.assert_clear_error();
    assert!(!is_mounted(&env.mnt));
}

/// Every header field is authenticated: the review's example is `des`, outside the old MAC.
/// Stripping it made a volume of a Disk Encryption Set mount as the vault owner, past the
/// set's identity (whose policy the key owner revokes). Putting back an older header after a
/// rotation (so that disabling the new key version would not cut the volume off) is refused
/// too, on a fresh mount and on a live one.
#[test]
fn header_fields_cannot_be_stripped_or_rolled_back() {
    let env = Env::new();
    env.cmkfs(&["vault", "config", "--purge-protection", "on"])
        .assert_ok();
    env.cmkfs(&["vault", "key", "create", "dk", "--key-size", KEY_SIZE])
        .assert_ok();
    env.cmkfs(&["vault", "identity", "create", "app"])
        .assert_ok();
    env.cmkfs(&[
        "vault",
        "policy",
        "set",
        "app",
        "--key",
        "dk",
        "--permissions",
        "get,wrapKey,unwrapKey",
    ])
    .assert_ok();
    env.cmkfs(&["des", "create", "set", "--key", "dk", "--identity", "app"])
        .assert_ok();
    env.init_with(&env.cipher, &["--des", "set"]);
    let before_rotation = fs::read(env.cipher.join(HEADER_NAME)).unwrap();

    edit_header(&env.cipher, |h| {
        h.as_object_mut().unwrap().remove("des");
    });
    let out = env.try_mount(&env.cipher, &env.mnt);
    out.assert_clear_error();
    assert!(
        !is_mounted(&env.mnt),
        "mounted a header stripped of its des"
    );

    // Rotate, then put the pre-rotation header back.
    fs::write(env.cipher.join(HEADER_NAME), &before_rotation).unwrap();
    env.cmkfs(&["vault", "key", "rotate", "dk"]).assert_ok();
    let latest = {
        let out = env.cmkfs(&["vault", "key", "show", "dk", "--json"]);
        let k: serde_json::Value = serde_json::from_str(&out.assert_ok().stdout).unwrap();
        k["version"].as_str().unwrap().to_string()
    };
    env.cmkfs(&["des", "update", "set", "--version", &latest])
        .assert_ok();
    assert_eq!(key_version(&env.cipher), latest);
    let rotated = fs::read(env.cipher.join(HEADER_NAME)).unwrap();
    fs::write(env.cipher.join(HEADER_NAME), &before_rotation).unwrap();
    let out = env.try_mount(&env.cipher, &env.mnt);
    out.assert_clear_error();
    assert!(out.stderr.contains("does not list"), "{out}");
    assert!(!is_mounted(&env.mnt));

    // Live: the same rollback cuts a mount off.
    fs::write(env.cipher.join(HEADER_NAME), &rotated).unwrap();
    let m = env.mount_with(&env.cipher, &env.mnt, &["--key-check-interval", "1s"]);
    write(&m.path("f"), b"plaintext");
    let tmp = env.cipher.join(".cmkfs-tmp.test-rollback");
    fs::write(&tmp, &before_rotation).unwrap();
    fs::rename(&tmp, env.cipher.join(HEADER_NAME)).unwrap();
    let s = wait_state(&env, &env.mnt, "Inaccessible", GUARD);
    println!("rolled back: {}", s["reason"]);
    drop(m);
}

/// Volumes made before the MAC covered every field keep mounting: the first mount verifies
/// the old MAC and rewrites the header with the new one.
#[test]
fn a_version_1_header_mounts_and_is_upgraded() {
    use cmkfs::vault::local::LocalVault;
    use cmkfs::volume::header::VolumeHeader;
    let env = Env::new();
    env.init(&env.cipher);
    let m = env.mount(&env.cipher, &env.mnt);
    write(&m.path("f"), b"made before");
    m.unmount();
    let owner = LocalVault::open(&env.home.join("vault")).unwrap();
    let h = VolumeHeader::read(&env.cipher).unwrap();
    let dek = h.unwrap_dek(&owner).unwrap();
    h.with_mac_v1_for_tests(&dek).write(&env.cipher).unwrap();
    let text = fs::read_to_string(env.cipher.join(HEADER_NAME)).unwrap();
    assert!(!text.contains("mac_version"), "{text}");

    let m = env.mount(&env.cipher, &env.mnt);
    assert_eq!(read(&m.path("f")), b"made before");
    let up = VolumeHeader::read(&env.cipher).unwrap();
    assert_eq!(up.mac_version, 2, "the first mount upgrades the MAC");
    up.verify(&dek).unwrap();
    m.unmount();
}

/// Finding 7 (modes): with umask 0, the daemon wrote its status and event files 0666 and a
/// pre-existing home stayed 0777. Now every file cmkfs creates in its home is 0600 and every
/// directory 0700, whatever the umask, and a loose home is tightened on first use.
#[test]
fn state_files_are_private_whatever_the_umask() {
    let env = Env::new();
    fs::set_permissions(&env.home, fs::Permissions::from_mode(0o777)).unwrap();
    let umask0 = |args: &[&str]| {
        let mut cmd = env.command(args);
        // SAFETY: umask in the child between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::umask(0);
                Ok(())
            });
        }
        run_with_timeout(cmd, CMD_TIMEOUT).unwrap()
    };
    // A backing directory init creates (not there yet).
    let vol = env.root.join("vol");
    let cipher = vol.to_str().unwrap().to_string();
    let mnt = env.mnt.to_str().unwrap().to_string();
    umask0(&["init", &cipher, "--key-size", KEY_SIZE]).assert_ok();
    umask0(&["vault", "identity", "create", "app"]).assert_ok();
    umask0(&["vault", "config", "--purge-protection", "on"]).assert_ok();
    umask0(&["des", "create", "set", "--key", "default"]).assert_ok();
    umask0(&["mount", &cipher, &mnt, "--key-check-interval", "1s"]).assert_ok();
    let m = Mount::adopt(&env, &vol, &env.mnt);
    write(&m.path("f"), b"x");
    // A state change, so the daemon appends to the event log and rewrites its status.
    umask0(&["vault", "key", "update", "default", "--disable"]).assert_ok();
    wait_state(&env, &env.mnt, "Inaccessible", GUARD);
    umask0(&["vault", "key", "update", "default", "--enable"]).assert_ok();
    wait_state(&env, &env.mnt, "Accessible", GUARD);
    assert!(env.home.join("events.jsonl").exists());
    // The vault server too (it generates its TLS files on first start).
    let mut server = env.command(&["vault", "serve", "--listen", "127.0.0.1:0"]);
    // SAFETY: umask in the child between fork and exec.
    unsafe {
        server.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    let mut server = server
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = server.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if line.starts_with("listening on ") {
                let _ = tx.send(());
            }
        }
    });
    let listening = rx.recv_timeout(GUARD).is_ok();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(server.id() as i32, libc::SIGTERM) };
    let _ = server.wait();
    assert!(listening, "vault serve did not start");
    assert!(env.home.join("vault/tls").exists());
    let mut loose = Vec::new();
    for p in walk(&env.home).into_iter().chain([env.home.clone()]) {
        let meta = fs::symlink_metadata(&p).unwrap();
        let mode = meta.mode() & 0o7777;
        let want_max = if meta.is_dir() { 0o700 } else { 0o600 };
        if mode & !want_max != 0 {
            loose.push(format!("{:o} {}", mode, p.display()));
        }
    }
    assert!(
        loose.is_empty(),
        "files others can read or write:\n{}",
        loose.join("\n")
    );
    // The backing root gets the user's umask (0 here), as before.
    assert_eq!(fs::metadata(&vol).unwrap().mode() & 0o777, 0o777);
    m.unmount();
}

/// Finding 7 (pipes): `cmkfs status | head` panicked on the closed pipe. Now every command's
/// output to a closed pipe ends the way Unix tools do: killed by SIGPIPE, nothing on stderr.
#[test]
fn output_to_a_closed_pipe_ends_quietly() {
    let env = Env::new();
    env.init(&env.cipher);
    let m = env.mount(&env.cipher, &env.mnt);
    let cipher = env.cipher.to_str().unwrap();
    let commands: Vec<Vec<&str>> = vec![
        vec!["status"],
        vec!["status", "--json"],
        vec!["info", cipher],
        vec!["vault", "key", "list"],
        vec!["vault", "audit"],
        vec!["vault", "list-configured"],
        vec!["--help"],
    ];
    for args in commands {
        let mut fds = [0; 2];
        // SAFETY: pipe(2) into a local array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: the read end is ours; closing it leaves the write end with no reader.
        unsafe { libc::close(fds[0]) };
        // SAFETY: the write end is ours; `Stdio` takes it over.
        let stdout = unsafe { <Stdio as std::os::fd::FromRawFd>::from_raw_fd(fds[1]) };
        let mut cmd = env.command(&args);
        cmd.stdout(stdout);
        let out = run_with_timeout_stdout(cmd);
        assert!(
            !out.1.contains("panicked") && out.1.trim().is_empty(),
            "`cmkfs {args:?}` to a closed pipe printed on stderr: {:?}",
            out.1
        );
        assert!(
            out.0.signal() == Some(libc::SIGPIPE) || out.0.code() == Some(0),
            "`cmkfs {args:?}` to a closed pipe: {:?}",
            out.0
        );
    }
    m.unmount();
}

/// Runs `cmd` (stdout already set) with a time limit; returns its status and stderr.
fn run_with_timeout_stdout(mut cmd: Command) -> (std::process::ExitStatus, String) {
    let err = tempfile::tempfile().unwrap();
    cmd.stderr(err.try_clone().unwrap()).stdin(Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let mut status = None;
    wait_until(CMD_TIMEOUT, || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    let status = status.unwrap_or_else(|| {
        let _ = child.kill();
        panic!("timed out");
    });
    let mut s = String::new();
    use std::io::{Read, Seek};
    let mut err = err;
    err.rewind().unwrap();
    err.read_to_string(&mut s).unwrap();
    (status, s)
}
