//! Disk Encryption Sets (issue 4 items 6-9) through the `cmkfs` binary and real mounts, with
//! local vault stores in temp dirs and RSA-2048 keys: the create rules, binding volumes,
//! mounting as the DES identity, rotation and key change of mounted volumes, auto-rotation,
//! double encryption, irreversibility, crash safety of the rewrap (by failing it after each
//! step through the library's fault hook), and bad input.
//!
//! Waits are hang guards (generous polling limits), never speed assertions; observed times
//! are printed.

use crate::common;

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cmkfs::des::{self, DesError, Hooks, RewrapStep, UpdateRequest};
use cmkfs::home::Home;
use cmkfs::keyring::KeyringConfig;
use cmkfs::vault::local::LocalVault;
use cmkfs::volume::header::VolumeHeader;
use cmkfs::volume::{Caller, Volume};
use common::*;

/// How long a polling loop waits for a state it expects before failing the test.
const GUARD: Duration = Duration::from_secs(60);
const DOUBLE: &str = "EncryptionAtRestWithPlatformAndCustomerKeys";

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Turns purge protection on (every DES needs it).
fn purge_protection(env: &Env) {
    env.cmkfs(&["vault", "config", "--purge-protection", "on"])
        .assert_ok();
}

/// Creates a 2048-bit key; returns its versioned id.
fn key_create(env: &Env, name: &str) -> String {
    let v = json(&env.cmkfs(&[
        "vault",
        "key",
        "create",
        name,
        "--key-size",
        KEY_SIZE,
        "--json",
    ]));
    v["kid"].as_str().expect("kid").to_string()
}

/// Adds a version; returns its id.
fn key_rotate(env: &Env, name: &str) -> String {
    let v = json(&env.cmkfs(&["vault", "key", "rotate", name, "--json"]));
    v["kid"].as_str().expect("kid").to_string()
}

fn version_of(kid: &str) -> &str {
    kid.rsplit('/').next().unwrap()
}

fn set_enabled(env: &Env, kid: &str, enabled: bool) {
    let name = kid
        .split("/keys/")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .unwrap();
    let flag = if enabled { "--enable" } else { "--disable" };
    env.cmkfs(&[
        "vault",
        "key",
        "update",
        name,
        "--version",
        version_of(kid),
        flag,
    ])
    .assert_ok();
}

/// An identity with `perms` on key `key`; returns nothing (its credential is at the default
/// path, where `des create --identity` finds it).
fn identity(env: &Env, name: &str, key: &str, perms: &str) {
    env.cmkfs(&["vault", "identity", "create", name])
        .assert_ok();
    env.cmkfs(&[
        "vault",
        "policy",
        "set",
        name,
        "--key",
        key,
        "--permissions",
        perms,
    ])
    .assert_ok();
}

fn des_show(env: &Env, name: &str) -> serde_json::Value {
    json(&env.cmkfs(&["des", "show", name, "--json"]))
}

fn header_kid(cipher: &Path) -> String {
    VolumeHeader::read(cipher).expect("read header").key_id
}

fn init_des(env: &Env, cipher: &Path, des: &str) {
    let out = env.cmkfs(&[
        OsStr::new("init"),
        cipher.as_os_str(),
        OsStr::new("--des"),
        OsStr::new(des),
    ]);
    out.assert_ok();
    assert!(
        cipher.join(HEADER_NAME).is_file(),
        "init --des left no header:\n{out}"
    );
}

#[track_caller]
fn wait_status(
    env: &Env,
    target: &Path,
    what: &str,
    mut cond: impl FnMut(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    let t0 = Instant::now();
    let ok = wait_until(GUARD, || {
        last = env.status(target);
        cond(&last)
    });
    assert!(ok, "{what} never happened; last status: {last:#}");
    println!("{what}: after {:?}", t0.elapsed());
    last
}

/// The record file and everything else under `$CMKFS_HOME/des`.
fn des_snapshot(env: &Env) -> std::collections::BTreeMap<String, String> {
    let mut s = snapshot(&env.home.join("des"));
    // The lock file is created on first use and holds no state.
    s.retain(|k, _| k != ".lock");
    s
}

/// A root mtime no run of a test can give by accident.
const PAST: (u64, u32) = (1_500_000_000, 5);

fn past() -> std::time::SystemTime {
    std::time::UNIX_EPOCH + Duration::new(PAST.0, PAST.1)
}

fn mtime(p: &Path) -> std::time::SystemTime {
    fs::metadata(p).unwrap().modified().unwrap()
}

/// Sets the root's mtime to [`past`] through the mount (it reaches the backing root).
fn set_root_mtime_past(mnt: &Path) {
    fs::File::open(mnt).unwrap().set_modified(past()).unwrap();
    assert_eq!(mtime(mnt), past());
}

fn canonical(p: &Path) -> PathBuf {
    fs::canonicalize(p).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Item 6: create rules, show, list, delete
// ---------------------------------------------------------------------------------------------

#[test]
fn create_refuses_without_purge_protection_disabled_keys_and_identities_lacking_permissions() {
    let env = Env::new();
    let kid = key_create(&env, "k");
    let before = des_snapshot(&env);

    let out = env.cmkfs(&["des", "create", "d", "--key", "k"]);
    out.assert_clear_error();
    assert!(out.stderr.contains("purge protection"), "{out}");
    assert_same_snapshot(
        "refused create (purge protection)",
        &before,
        &des_snapshot(&env),
    );

    purge_protection(&env);
    set_enabled(&env, &kid, false);
    let out = env.cmkfs(&["des", "create", "d", "--key", "k"]);
    out.assert_clear_error();
    assert!(out.stderr.contains("disabled"), "{out}");
    assert_same_snapshot(
        "refused create (disabled key)",
        &before,
        &des_snapshot(&env),
    );
    set_enabled(&env, &kid, true);

    identity(&env, "reader", "k", "get");
    let out = env.cmkfs(&["des", "create", "d", "--key", "k", "--identity", "reader"]);
    out.assert_clear_error();
    assert!(
        out.stderr
            .contains("lacks the wrapKey, unwrapKey permissions"),
        "{out}"
    );
    assert_same_snapshot("refused create (permissions)", &before, &des_snapshot(&env));

    identity(&env, "disk-id", "k", "get,wrapKey,unwrapKey");
    let d = json(&env.cmkfs(&[
        "des",
        "create",
        "d",
        "--key",
        "k",
        "--identity",
        "disk-id",
        "--auto-rotate",
        "--json",
    ]));
    assert_eq!(d["name"], "d");
    assert_eq!(d["encryptionType"], "EncryptionAtRestWithCustomerKey");
    assert_eq!(
        d["activeKey"]["keyUrl"],
        kid.as_str(),
        "the full versioned key id"
    );
    assert_eq!(d["previousKeys"], serde_json::json!([]));
    assert_eq!(d["rotationToLatestKeyVersionEnabled"], true);
    assert_eq!(d["identity"]["name"], "disk-id");
    assert!(d["autoKeyRotationError"].is_null() && d["lastKeyRotationTimestamp"].is_null());

    let rec = env.home.join("des/d.json");
    assert_eq!(
        fs::metadata(&rec).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        fs::metadata(env.home.join("des"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o700
    );

    // show (human) names every field the issue asks for.
    let out = env.cmkfs(&["des", "show", "d"]);
    out.assert_ok();
    for field in [
        "activeKey",
        "previousKeys",
        "lastKeyRotation",
        "autoKeyRotationError",
        "identity",
        "volumes",
    ] {
        assert!(out.stdout.contains(field), "des show lacks {field}:\n{out}");
    }
    let list = json(&env.cmkfs(&["des", "list", "--json"]));
    assert_eq!(list.as_array().map(|a| a.len()), Some(1));
    env.cmkfs(&["des", "delete", "d"]).assert_ok();
    assert!(!rec.exists());
    assert_eq!(
        json(&env.cmkfs(&["des", "list", "--json"])),
        serde_json::json!([])
    );
}

#[test]
fn bad_input_gives_one_clear_line_and_writes_nothing() {
    let env = Env::new();
    purge_protection(&env);
    let kid = key_create(&env, "k");
    env.cmkfs(&["des", "create", "d", "--key", "k"]).assert_ok();
    let unknown_version = "0123456789abcdef0123456789abcdef";
    let wrong_id = format!("local:/keys/k/{unknown_version}");
    let extra = format!("{kid}/extra");
    let cipher = env.cipher.to_str().unwrap().to_string();
    let full = env.dir("full");
    fs::write(full.join("x"), b"x").unwrap();
    let full = full.to_str().unwrap().to_string();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["des", "create", "e", "--key", "nokey"], "nokey"),
        (
            vec![
                "des",
                "create",
                "e",
                "--key",
                "k",
                "--version",
                unknown_version,
            ],
            unknown_version,
        ),
        (
            vec!["des", "create", "e", "--key", &wrong_id],
            unknown_version,
        ),
        (
            vec!["des", "create", "e", "--key", "k", "--identity", "ghost"],
            "ghost",
        ),
        (
            vec!["des", "create", "e", "--key", "local:/keys/"],
            "malformed",
        ),
        (vec!["des", "create", "e", "--key", &extra], "malformed"),
        (
            vec!["des", "create", "e", "--key", "not a key"],
            "invalid key",
        ),
        (
            vec![
                "des",
                "create",
                "e",
                "--key",
                &kid,
                "--version",
                unknown_version,
            ],
            "contradicts",
        ),
        (
            vec!["des", "create", "e", "--key", "remote:/keys/k/1"],
            "remote:",
        ),
        (
            vec!["des", "create", "bad name", "--key", "k"],
            "Disk Encryption Set name",
        ),
        (
            vec![
                "des",
                "create",
                "e",
                "--key",
                "k",
                "--encryption-type",
                "Platform",
            ],
            "encryption type",
        ),
        (vec!["des", "create", "d", "--key", "k"], "already exists"),
        (
            vec!["des", "create", "e", "--key", "cmkfs-platform"],
            "irreversible",
        ),
        (vec!["des", "show", "ghost"], "ghost"),
        (vec!["des", "delete", "ghost"], "ghost"),
        (vec!["des", "update", "ghost", "--key", "k"], "ghost"),
        (vec!["des", "update", "d", "--key", "nokey"], "nokey"),
        (
            vec!["des", "update", "d", "--version", unknown_version],
            unknown_version,
        ),
        (
            vec!["des", "update", "d", "--key", "bad/../id"],
            "invalid key",
        ),
        (vec!["des", "update", "d", "--identity", "ghost"], "ghost"),
        (
            vec!["des", "update", "d", "--encryption-type", DOUBLE],
            "cannot change",
        ),
        (
            vec!["des", "update", "d", "--forget-volume", "/nowhere"],
            "not a volume",
        ),
        (vec!["init", &cipher, "--des", "ghost"], "ghost"),
        (vec!["init", &full, "--des", "d"], "not empty"),
        (
            vec!["init", &cipher, "--des", "d", "--key", "k"],
            "cannot be used with",
        ),
    ];
    for (args, needle) in cases {
        let home_before = des_snapshot(&env);
        let cipher_before = snapshot(&env.cipher);
        let vault_keys_before = snapshot(&env.home.join("vault/keys"));
        let out = env.cmkfs(&args);
        out.assert_clear_error();
        assert!(
            out.stderr.contains(needle),
            "{args:?}: the error does not name {needle:?}:\n{out}"
        );
        assert_same_snapshot(
            &format!("{args:?}: DES records"),
            &home_before,
            &des_snapshot(&env),
        );
        assert_same_snapshot(
            &format!("{args:?}: cipher dir"),
            &cipher_before,
            &snapshot(&env.cipher),
        );
        // `des create --encryption-type` would create the platform key: not on refusals.
        assert_same_snapshot(
            &format!("{args:?}: vault keys"),
            &vault_keys_before,
            &snapshot(&env.home.join("vault/keys")),
        );
    }
    // The one DES is as it was created.
    assert_eq!(des_show(&env, "d")["activeKey"]["keyUrl"], kid.as_str());
}

#[test]
fn delete_is_refused_while_volumes_exist_and_gone_volumes_can_be_forgotten() {
    let env = Env::new();
    purge_protection(&env);
    key_create(&env, "k");
    env.cmkfs(&["des", "create", "d", "--key", "k"]).assert_ok();
    let (v1, v2) = (env.dir("v1"), env.dir("v2"));
    init_des(&env, &v1, "d");
    init_des(&env, &v2, "d");
    let out = env.cmkfs(&["des", "delete", "d"]);
    out.assert_clear_error();
    assert!(out.stderr.contains("still has 2 volumes"), "{out}");
    // A volume that exists cannot be forgotten (it cannot leave its DES).
    let out = env.cmkfs(&[
        OsStr::new("des"),
        OsStr::new("update"),
        OsStr::new("d"),
        OsStr::new("--forget-volume"),
        v1.as_os_str(),
    ]);
    out.assert_clear_error();
    assert!(out.stderr.contains("cannot leave"), "{out}");
    fs::remove_dir_all(&v2).unwrap();
    let st = des_show(&env, "d");
    assert_eq!(st["volumeStates"][1]["state"], "missing", "{st:#}");
    env.cmkfs(&[
        OsStr::new("des"),
        OsStr::new("update"),
        OsStr::new("d"),
        OsStr::new("--forget-volume"),
        v2.as_os_str(),
    ])
    .assert_ok();
    assert_eq!(
        des_show(&env, "d")["volumes"],
        serde_json::json!([canonical(&v1)])
    );
    fs::remove_dir_all(&v1).unwrap();
    env.cmkfs(&["des", "delete", "d"]).assert_ok();
}

// ---------------------------------------------------------------------------------------------
// Item 7: binding, mounting as the DES identity, rotation, key change, auto-rotation
// ---------------------------------------------------------------------------------------------

#[test]
fn init_binds_the_volume_and_mount_reaches_the_vault_as_the_des_identity() {
    let env = Env::new();
    purge_protection(&env);
    let kid = key_create(&env, "k");
    identity(&env, "disk-id", "k", "get,wrapKey,unwrapKey");
    env.cmkfs(&["des", "create", "d", "--key", "k", "--identity", "disk-id"])
        .assert_ok();
    init_des(&env, &env.cipher, "d");
    let info = env.info(&env.cipher);
    assert_eq!(info["des"], "d");
    assert_eq!(info["key_id"], kid.as_str());
    let st = des_show(&env, "d");
    assert_eq!(st["volumes"], serde_json::json!([canonical(&env.cipher)]));
    assert_eq!(st["volumeStates"][0]["state"], "active");

    // The volume was wrapped by the identity, and the mount unwraps as the identity.
    let m = env.mount(&env.cipher, &env.mnt);
    write(&m.path("f"), b"hello des");
    assert_eq!(read(&m.path("f")), b"hello des");
    let audit = env.cmkfs(&["vault", "audit", "--json"]);
    audit.assert_ok();
    let by_identity = |op: &str| {
        audit
            .stdout
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .any(|e| {
                e["operationName"] == op
                    && e["identity"] == "disk-id"
                    && e["resultType"] == "Success"
            })
    };
    assert!(
        by_identity("KeyWrap"),
        "init did not wrap as the DES identity:\n{audit}"
    );
    assert!(
        by_identity("KeyUnwrap"),
        "mount did not unwrap as the DES identity:\n{audit}"
    );
    m.unmount();

    // Proof that the identity (not the owner) is used: without its policy, mounting fails.
    env.cmkfs(&["vault", "policy", "remove", "disk-id", "--key", "k"])
        .assert_ok();
    let out = env.try_mount(&env.cipher, &env.mnt);
    out.assert_clear_error();
    assert!(out.stderr.contains("permission"), "{out}");
}

#[test]
fn rotation_keeps_a_mounted_volume_readable_and_the_old_version_can_then_be_disabled() {
    let env = Env::new();
    purge_protection(&env);
    let old = key_create(&env, "k");
    env.cmkfs(&["des", "create", "d", "--key", "k"]).assert_ok();
    let v2 = env.dir("v2");
    init_des(&env, &env.cipher, "d");
    init_des(&env, &v2, "d");
    let m = env.mount_with(&env.cipher, &env.mnt, &["--key-check-interval", "1s"]);
    let data = repeated(b"rotation ", 100_000);
    write(&m.path("f"), &data);
    set_root_mtime_past(&m.path(""));
    let backing_before = snapshot(&env.cipher);

    let new = key_rotate(&env, "k");
    let out = env.cmkfs(&["des", "update", "d", "--version", version_of(&new)]);
    out.assert_ok();
    assert!(out.stdout.contains("2 volumes rewrapped"), "{out}");
    // The header is a control file in the backing root, whose times are the mount root's:
    // the rewrap of a mounted volume keeps the root's mtime, in the backing directory and
    // through the mount.
    assert_eq!(mtime(&env.cipher), past(), "the backing root's mtime");
    assert_eq!(mtime(&m.path("")), past(), "the mount root's mtime");
    assert_eq!(
        env.info(&env.cipher)["key_id"],
        new.as_str(),
        "header names the new version"
    );
    assert_eq!(env.info(&v2)["key_id"], new.as_str());
    let st = des_show(&env, "d");
    assert_eq!(st["activeKey"]["keyUrl"], new.as_str());
    assert_eq!(st["previousKeys"], serde_json::json!([]));
    assert!(st["lastKeyRotationTimestamp"].is_string(), "{st:#}");
    // Data untouched: only the header changed.
    let mut after = snapshot(&env.cipher);
    let mut before = backing_before;
    before.remove(HEADER_NAME);
    after.remove(HEADER_NAME);
    assert_same_snapshot("rotation touched data", &before, &after);

    // The mounted volume stays readable and picks the new header up on its next check.
    assert_bytes_eq("read after rotation", &read(&m.path("f")), &data);
    wait_status(&env, &env.mnt, "mount reports the new key", |s| {
        s["key_id"] == new.as_str()
    });

    // Disabling the old version does not hurt: the mount stays Accessible.
    set_enabled(&env, &old, false);
    let checked = env.status(&env.mnt)["last_check"].clone();
    wait_status(
        &env,
        &env.mnt,
        "a key check after disabling the old version",
        |s| s["last_check"] != checked,
    );
    let s = env.status(&env.mnt);
    assert_eq!(s["state"], "Accessible", "{s:#}");
    assert_bytes_eq(
        "read with the old version disabled",
        &read(&m.path("f")),
        &data,
    );
    m.unmount();
    // And a new mount works.
    let m = env.mount(&env.cipher, &env.mnt);
    assert_bytes_eq("read after remount", &read(&m.path("f")), &data);
    m.unmount();
}

#[test]
fn key_change_to_another_key_then_the_old_key_can_be_disabled() {
    let env = Env::new();
    purge_protection(&env);
    let k1 = key_create(&env, "k1");
    let k2 = key_create(&env, "k2");
    identity(&env, "disk-id", "k1", "get,wrapKey,unwrapKey");
    env.cmkfs(&[
        "vault",
        "policy",
        "set",
        "disk-id",
        "--key",
        "k2",
        "--permissions",
        "get,wrapKey,unwrapKey",
    ])
    .assert_ok();
    env.cmkfs(&["des", "create", "d", "--key", "k1", "--identity", "disk-id"])
        .assert_ok();
    init_des(&env, &env.cipher, "d");
    let m = env.mount_with(&env.cipher, &env.mnt, &["--key-check-interval", "1s"]);
    write(&m.path("f"), b"key change");

    let out = env.cmkfs(&["des", "update", "d", "--key", "k2", "--json"]);
    let r = json(&out);
    assert_eq!(r["activeKey"]["keyUrl"], k2.as_str());
    assert_eq!(r["rotation"]["from"], serde_json::json!([k1]));
    assert_eq!(header_kid(&env.cipher), k2);
    wait_status(&env, &env.mnt, "mount reports the new key", |s| {
        s["key_id"] == k2.as_str()
    });

    set_enabled(&env, &k1, false);
    let checked = env.status(&env.mnt)["last_check"].clone();
    wait_status(&env, &env.mnt, "a key check after disabling k1", |s| {
        s["last_check"] != checked
    });
    assert_eq!(env.status(&env.mnt)["state"], "Accessible");
    assert_eq!(read(&m.path("f")), b"key change");
    m.unmount();
    let m = env.mount(&env.cipher, &env.mnt);
    assert_eq!(read(&m.path("f")), b"key change");
    m.unmount();
    // Unmounted, a rewrap replaces the header in the backing root (whose times are the mount
    // root's) and keeps the root's mtime (attack session 6, F4).
    let mtime = std::time::UNIX_EPOCH + std::time::Duration::new(1_500_000_000, 5);
    fs::File::open(&env.cipher)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    set_enabled(&env, &k1, true);
    env.cmkfs(&["des", "update", "d", "--key", "k1"])
        .assert_ok();
    assert_eq!(header_kid(&env.cipher), k1);
    assert_eq!(
        fs::metadata(&env.cipher).unwrap().modified().unwrap(),
        mtime
    );
}

#[test]
fn auto_rotation_moves_a_mounted_volume_to_the_new_version_within_a_check() {
    let env = Env::new();
    purge_protection(&env);
    key_create(&env, "k");
    env.cmkfs(&["des", "create", "d", "--key", "k", "--auto-rotate"])
        .assert_ok();
    let v2 = env.dir("v2");
    init_des(&env, &env.cipher, "d");
    init_des(&env, &v2, "d");
    let m = env.mount_with(&env.cipher, &env.mnt, &["--key-check-interval", "2s"]);
    write(&m.path("f"), b"auto");
    set_root_mtime_past(&m.path(""));

    let new = key_rotate(&env, "k");
    let t0 = Instant::now();
    assert!(
        // Done means both headers rewrapped and the record finished (previousKeys cleared
        // last): in between, a rotation in progress is a legitimate state to observe.
        wait_until(GUARD, || header_kid(&env.cipher) == new
            && header_kid(&v2) == new
            && des_show(&env, "d")["previousKeys"] == serde_json::json!([])),
        "auto-rotation did not rewrap the volumes: {} / {}",
        header_kid(&env.cipher),
        header_kid(&v2)
    );
    println!(
        "auto-rotation rewrapped both volumes {:?} after the new version",
        t0.elapsed()
    );
    let st = des_show(&env, "d");
    assert_eq!(st["activeKey"]["keyUrl"], new.as_str());
    assert_eq!(st["previousKeys"], serde_json::json!([]));
    assert!(
        st["lastKeyRotationTimestamp"].is_string() && st["autoKeyRotationError"].is_null(),
        "{st:#}"
    );
    wait_status(&env, &env.mnt, "mount reports the rotated key", |s| {
        s["key_id"] == new.as_str() && s["state"] == "Accessible"
    });
    assert_eq!(read(&m.path("f")), b"auto");
    // The mount's own rotation keeps its root's mtime too.
    assert_eq!(mtime(&env.cipher), past(), "the backing root's mtime");
    assert_eq!(mtime(&m.path("")), past(), "the mount root's mtime");
    m.unmount();
}

/// A user's change of the root while a rewrap replaces a mounted volume's header stands:
/// the mount holds the user's create back until the header is replaced and the root's mtime
/// put back, then the create moves the mtime (never set back over it).
#[test]
fn a_create_in_the_root_during_a_rewrap_of_the_mounted_volume_moves_the_roots_mtime() {
    let env = Env::new();
    purge_protection(&env);
    key_create(&env, "k");
    env.cmkfs(&["des", "create", "d", "--key", "k"]).assert_ok();
    init_des(&env, &env.cipher, "d");
    let m = env.mount(&env.cipher, &env.mnt);
    set_root_mtime_past(&m.path(""));
    let new = key_rotate(&env, "k");
    let gate = env.root.join("gate");
    let created = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut creator = None;
    let out = run_across_a_gate(
        env.command(&["des", "update", "d", "--version", version_of(&new)]),
        "CMKFS_TEST_DES_REWRAP_PAUSE",
        &gate,
        &gate,
        || {
            let (tx, rx) = std::sync::mpsc::channel();
            let (p, done) = (m.path("created-meanwhile"), created.clone());
            creator = Some(std::thread::spawn(move || {
                tx.send(()).unwrap();
                let r = fs::write(p, b"meanwhile");
                done.store(true, std::sync::atomic::Ordering::SeqCst);
                r
            }));
            rx.recv().unwrap();
            std::thread::sleep(Duration::from_millis(300));
            assert!(
                !created.load(std::sync::atomic::Ordering::SeqCst),
                "a create in the root went through while the rewrap held the root"
            );
        },
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    creator.unwrap().join().unwrap().unwrap();
    assert_eq!(header_kid(&env.cipher), new);
    assert_eq!(read(&m.path("created-meanwhile")), b"meanwhile");
    let root = mtime(&env.cipher);
    assert_ne!(
        root,
        past(),
        "the root's mtime was set back over the create"
    );
    assert_eq!(mtime(&m.path("")), root);
    m.unmount();
}

#[test]
fn a_rotation_policy_rotates_the_key_and_the_auto_rotating_des_follows_through_the_mount() {
    // Policies in seconds (Key Vault's limits are days); inherited by the mount daemon.
    std::env::set_var("CMKFS_VAULT_POLICY_LIMITS", "test");
    let env = Env::new();
    purge_protection(&env);
    let first = key_create(&env, "k");
    env.cmkfs(&["des", "create", "d", "--key", "k", "--auto-rotate"])
        .assert_ok();
    init_des(&env, &env.cipher, "d");
    let m = env.mount_with(&env.cipher, &env.mnt, &["--key-check-interval", "2s"]);
    write(&m.path("f"), b"policy");
    env.cmkfs(&[
        "vault",
        "key",
        "rotation-policy",
        "k",
        "--rotate-after-create",
        "PT3S",
        "--expiry",
        "PT1H",
    ])
    .assert_ok();
    // Nobody rotates by hand and no server runs: the mount's own checks apply the embedded
    // vault's due policy, and the auto-rotating DES then moves the volume to the new version.
    let t0 = Instant::now();
    assert!(
        wait_until(GUARD, || header_kid(&env.cipher) != first
            && des_show(&env, "d")["previousKeys"] == serde_json::json!([])),
        "the policy's rotation did not reach the volume: {}",
        header_kid(&env.cipher)
    );
    println!(
        "policy rotation reached the volume after {:?}",
        t0.elapsed()
    );
    let new = header_kid(&env.cipher);
    let audit = fs::read_to_string(env.home.join("vault/audit.log")).unwrap();
    assert!(
        audit.lines().any(|l| l.contains("\"KeyRotate\"")
            && l.contains("(rotation policy)")
            && l.contains(version_of(&new))),
        "the audit log names the policy as the rotation's caller"
    );
    let shown = json(&env.cmkfs(&[
        "vault",
        "key",
        "show",
        "k",
        "--version",
        version_of(&new),
        "--json",
    ]));
    let life = shown["exp"].as_u64().unwrap() - shown["created"].as_u64().unwrap();
    assert_eq!(
        life, 3600,
        "expiryTime applied to the new version: {shown:#}"
    );
    assert_eq!(read(&m.path("f")), b"policy");
    m.unmount();
    let m = env.mount(&env.cipher, &env.mnt);
    assert_eq!(read(&m.path("f")), b"policy");
    m.unmount();
}

#[test]
fn a_failed_auto_rotation_is_recorded_and_pauses_until_des_update() {
    let env = Env::new();
    purge_protection(&env);
    let old = key_create(&env, "k");
    env.cmkfs(&["des", "create", "d", "--key", "k", "--auto-rotate"])
        .assert_ok();
    init_des(&env, &env.cipher, "d");
    let home = Home::at(&env.home);
    let vault = LocalVault::open(&home.vault_dir()).unwrap();
    // Nothing to do yet.
    assert!(des::auto_rotate_for_volume(&home, &env.cipher, &vault)
        .unwrap()
        .is_none());

    // A new version that may not wrap yet (nbf in the future): the rotation fails.
    let bad = key_rotate(&env, "k");
    env.cmkfs(&[
        "vault",
        "key",
        "update",
        "k",
        "--version",
        version_of(&bad),
        "--nbf",
        "+30d",
    ])
    .assert_ok();
    let e = des::auto_rotate_for_volume(&home, &env.cipher, &vault).unwrap_err();
    assert!(e.to_string().contains("not yet valid"), "{e}");
    let st = des_show(&env, "d");
    assert_eq!(
        st["autoKeyRotationError"]["targetKeyUrl"],
        bad.as_str(),
        "{st:#}"
    );
    assert!(st["autoKeyRotationError"]["message"]
        .as_str()
        .unwrap()
        .contains("not yet valid"));
    assert_eq!(
        st["activeKey"]["keyUrl"],
        old.as_str(),
        "a failed rotation changes nothing"
    );
    assert_eq!(header_kid(&env.cipher), old);
    let out = env.cmkfs(&["des", "show", "d"]);
    assert!(
        out.stdout.contains("KeyRotationFailed") && out.stdout.contains("paused"),
        "{out}"
    );

    // Paused: even a good newer version is not picked up.
    let good = key_rotate(&env, "k");
    assert!(des::auto_rotate_for_volume(&home, &env.cipher, &vault)
        .unwrap()
        .is_none());
    assert_eq!(header_kid(&env.cipher), old);

    // `des update` clears the error; the next check rotates to the newest version.
    env.cmkfs(&["des", "update", "d"]).assert_ok();
    assert!(des_show(&env, "d")["autoKeyRotationError"].is_null());
    let r = des::auto_rotate_for_volume(&home, &env.cipher, &vault)
        .unwrap()
        .expect("a rotation");
    assert_eq!(r.to, good);
    assert_eq!(header_kid(&env.cipher), good);
    assert!(des::auto_rotate_for_volume(&home, &env.cipher, &vault)
        .unwrap()
        .is_none());
}

#[test]
fn an_incomplete_rewrap_stays_in_progress_and_des_update_finishes_it() {
    let env = Env::new();
    purge_protection(&env);
    let old = key_create(&env, "k");
    env.cmkfs(&["des", "create", "d", "--key", "k"]).assert_ok();
    let (v1, v2, v3) = (env.dir("v1"), env.dir("v2"), env.dir("v3"));
    for v in [&v1, &v2, &v3] {
        init_des(&env, v, "d");
    }
    let saved = fs::read(v2.join(HEADER_NAME)).unwrap();
    fs::write(v2.join(HEADER_NAME), b"{ not a header").unwrap();
    let new = key_rotate(&env, "k");
    let out = env.cmkfs(&["des", "update", "d", "--version", version_of(&new)]);
    out.assert_clear_error();
    assert!(
        out.stderr.contains("1 of 3 volumes") && out.stderr.contains("des update d"),
        "{out}"
    );
    let st = des_show(&env, "d");
    assert_eq!(st["activeKey"]["keyUrl"], new.as_str());
    assert_eq!(
        st["previousKeys"],
        serde_json::json!([{ "keyUrl": old }]),
        "{st:#}"
    );
    let states: Vec<&str> = st["volumeStates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["active", "unreadable", "active"]);
    // The old key must stay usable meanwhile: re-enable path not needed, just fix and finish.
    fs::write(v2.join(HEADER_NAME), &saved).unwrap();
    assert_eq!(des_show(&env, "d")["volumeStates"][1]["state"], "previous");
    let out = env.cmkfs(&["des", "update", "d"]);
    out.assert_ok();
    assert!(
        out.stdout.contains("1 volume rewrapped, 2 already on it"),
        "{out}"
    );
    let st = des_show(&env, "d");
    assert_eq!(st["previousKeys"], serde_json::json!([]));
    for v in [&v1, &v2, &v3] {
        assert_eq!(header_kid(v), new);
    }
}

// ---------------------------------------------------------------------------------------------
// Item 8: double encryption
// ---------------------------------------------------------------------------------------------

#[test]
fn double_encryption_round_trips_and_losing_either_key_denies_access() {
    let env = Env::new();
    purge_protection(&env);
    let k = key_create(&env, "k");
    let d = json(&env.cmkfs(&[
        "des",
        "create",
        "dd",
        "--key",
        "k",
        "--encryption-type",
        DOUBLE,
        "--json",
    ]));
    assert_eq!(d["encryptionType"], DOUBLE);
    // The platform key was created on demand in cmkfs's own vault.
    let platform = json(&env.cmkfs(&["vault", "key", "show", "cmkfs-platform", "--json"]));
    let pkid = platform["kid"].as_str().unwrap().to_string();
    init_des(&env, &env.cipher, "dd");
    let info = env.info(&env.cipher);
    assert_eq!(info["platform_key_id"], pkid.as_str());
    assert_eq!(info["key_id"], k.as_str());

    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed("double"));
    let big = random_bytes(&mut rng, 300_000 + 123);
    let m = env.mount_with(&env.cipher, &env.mnt, &["--key-check-interval", "1s"]);
    write(&m.path("big"), &big);
    write(&m.path("small"), b"tiny");
    assert_bytes_eq("double read", &read(&m.path("big")), &big);
    m.unmount();
    let m = env.mount_with(&env.cipher, &env.mnt, &["--key-check-interval", "1s"]);
    assert_bytes_eq("double read after remount", &read(&m.path("big")), &big);
    assert_eq!(read(&m.path("small")), b"tiny");

    // On disk, both layers are there: the customer DEK alone does not give the plaintext.
    let header = VolumeHeader::read(&env.cipher).unwrap();
    let owner = LocalVault::open(&Home::at(&env.home).vault_dir()).unwrap();
    let backing = data_files(&env.cipher)
        .into_iter()
        .find(|p| fs::metadata(p).unwrap().len() == backing_len(&env.cipher, big.len() as u64))
        .expect("the backing file of big");
    let read_with = |keys: &cmkfs::crypto::VolumeKeys| {
        let f = fs::File::open(&backing).unwrap();
        let st = cmkfs::volume::content::FileState::default();
        let engine = cmkfs::engine::SectorEngine::new(1).unwrap();
        let cx = cmkfs::volume::content::Ctx {
            keys,
            engine: &engine,
            sector: SECTOR as u64,
            layout: layout_of(&env.cipher),
        };
        cmkfs::volume::content::read(&f, &st, &cx, 0, big.len()).unwrap()
    };
    let outer = header.unwrap_dek(&owner).unwrap();
    let outer_only = cmkfs::crypto::VolumeKeys::from_dek(&outer, SECTOR).unwrap();
    assert_ne!(
        read_with(&outer_only)[..4096],
        big[..4096],
        "the outer layer alone decrypted the data"
    );
    let both =
        cmkfs::unlock::unwrap_with(&owner, Some(&owner as &dyn cmkfs::vault::Vault), &header)
            .unwrap()
            .keys()
            .unwrap();
    assert_bytes_eq("both layers", &read_with(&both), &big);

    // Losing the platform key cuts the mount off; restoring it heals.
    set_enabled(&env, &pkid, false);
    wait_status(
        &env,
        &env.mnt,
        "Inaccessible without the platform key",
        |s| s["state"] == "Inaccessible",
    );
    assert_eq!(
        fs::read(m.path("small"))
            .map_err(|e| e.raw_os_error())
            .unwrap_err(),
        Some(libc::EACCES),
        "a read without the platform key must fail"
    );
    set_enabled(&env, &pkid, true);
    wait_status(&env, &env.mnt, "Accessible again", |s| {
        s["state"] == "Accessible"
    });
    assert_eq!(read(&m.path("small")), b"tiny");
    // Losing the customer key does too.
    set_enabled(&env, &k, false);
    wait_status(
        &env,
        &env.mnt,
        "Inaccessible without the customer key",
        |s| s["state"] == "Inaccessible",
    );
    m.unmount();
    let out = env.try_mount(&env.cipher, &env.mnt);
    out.assert_clear_error();
    assert!(out.stderr.contains("disabled"), "{out}");
    set_enabled(&env, &k, true);
    set_enabled(&env, &pkid, false);
    let out = env.try_mount(&env.cipher, &env.mnt);
    out.assert_clear_error();
    assert!(
        out.stderr.contains("cmkfs-platform") && out.stderr.contains("disabled"),
        "{out}"
    );
    set_enabled(&env, &pkid, true);

    // A rotation rewraps only the customer layer; the volume still mounts.
    let k_new = key_rotate(&env, "k");
    env.cmkfs(&["des", "update", "dd", "--version", version_of(&k_new)])
        .assert_ok();
    let info = env.info(&env.cipher);
    assert_eq!(info["key_id"], k_new.as_str());
    assert_eq!(info["platform_key_id"], pkid.as_str());
    let m = env.mount(&env.cipher, &env.mnt);
    assert_bytes_eq("double read after rotation", &read(&m.path("big")), &big);
    m.unmount();
}

// ---------------------------------------------------------------------------------------------
// Item 9: irreversibility
// ---------------------------------------------------------------------------------------------

#[test]
fn customer_keys_cannot_be_switched_back_to_the_platform_key() {
    let env = Env::new();
    purge_protection(&env);
    key_create(&env, "k");
    let k2 = key_create(&env, "k2");
    env.cmkfs(&[
        "des",
        "create",
        "dd",
        "--key",
        "k",
        "--encryption-type",
        DOUBLE,
    ])
    .assert_ok();
    init_des(&env, &env.cipher, "dd");
    let before = des_snapshot(&env);
    let header_before = fs::read(env.cipher.join(HEADER_NAME)).unwrap();
    for args in [
        vec!["des", "update", "dd", "--key", "cmkfs-platform"],
        vec!["des", "update", "dd", "--key", "local:/keys/cmkfs-platform"],
        vec![
            "des",
            "update",
            "dd",
            "--encryption-type",
            "EncryptionAtRestWithCustomerKey",
        ],
    ] {
        let out = env.cmkfs(&args);
        out.assert_clear_error();
        assert!(
            out.stderr.contains("irreversible") || out.stderr.contains("cannot change"),
            "{out}"
        );
        assert_same_snapshot(&format!("{args:?}"), &before, &des_snapshot(&env));
        assert_eq!(
            fs::read(env.cipher.join(HEADER_NAME)).unwrap(),
            header_before
        );
    }
    // Plain volumes cannot use the platform key either.
    let other = env.dir("plain");
    let out = env.cmkfs(&[
        OsStr::new("init"),
        other.as_os_str(),
        OsStr::new("--key"),
        OsStr::new("cmkfs-platform"),
    ]);
    out.assert_clear_error();
    assert!(!other.join(HEADER_NAME).exists());
    // A different customer key is fine.
    env.cmkfs(&["des", "update", "dd", "--key", "k2"])
        .assert_ok();
    assert_eq!(header_kid(&env.cipher), k2);
}

// ---------------------------------------------------------------------------------------------
// Crash safety of the rewrap
// ---------------------------------------------------------------------------------------------

/// A volume with one file, written through the library (as a mount would).
fn write_file_in_process(dir: &Path, vault: LocalVault, name: &str, data: &[u8]) {
    let header = VolumeHeader::read(dir).unwrap();
    let home = Home::at(vault.store_dir().parent().unwrap());
    let (kr, header) = cmkfs::unlock::unlock(
        &home,
        Box::new(vault),
        dir,
        &header,
        KeyringConfig::default(),
    )
    .unwrap();
    let vol = Volume::open(dir, header, Arc::new(kr), 1).unwrap();
    let (_, _, of) = vol
        .create_file(
            vol.root_dir(),
            OsStr::new(name),
            0o644,
            Caller {
                uid: 0,
                gid: 0,
                umask: 0,
            },
        )
        .unwrap();
    vol.write(&of, 0, data).unwrap();
}

fn read_file_in_process(dir: &Path, vault: LocalVault, name: &str) -> Vec<u8> {
    let header = VolumeHeader::read(dir).unwrap();
    let home = Home::at(vault.store_dir().parent().unwrap());
    let (kr, header) = cmkfs::unlock::unlock(
        &home,
        Box::new(vault),
        dir,
        &header,
        KeyringConfig::default(),
    )
    .unwrap_or_else(|e| panic!("{}: does not unlock: {e}", dir.display()));
    let vol = Volume::open(dir, header, Arc::new(kr), 1).unwrap();
    let (bname, attr) = vol.lookup(vol.root_dir(), OsStr::new(name)).unwrap();
    let of = vol
        .open_file(vol.root_dir(), &bname, false, Some(attr.ino))
        .unwrap();
    vol.read(&of, 0, 1 << 20).unwrap().to_vec()
}

#[test]
fn a_rewrap_interrupted_after_any_step_leaves_volumes_that_mount_with_the_old_or_new_wrap() {
    // Volume-level steps are interrupted on the first and on the second volume.
    let mut cases: Vec<(RewrapStep, usize)> = Vec::new();
    for step in RewrapStep::ALL {
        cases.push((step, 1));
        if !matches!(step, RewrapStep::IntentRecorded | RewrapStep::Completed) {
            cases.push((step, 2));
        }
    }
    // One state, set up once (two keys made, two volumes bound to the DES, the key rotated)
    // and copied back before each case: each case starts from the same bytes.
    let env = Env::new();
    let home = Home::at(&env.home);
    purge_protection(&env);
    let old = key_create(&env, "k");
    env.cmkfs(&["des", "create", "d", "--key", "k"]).assert_ok();
    let vols = [env.dir("v1"), env.dir("v2")];
    for (i, v) in vols.iter().enumerate() {
        init_des(&env, v, "d");
        let vault = LocalVault::open(&home.vault_dir()).unwrap();
        write_file_in_process(v, vault, "f", format!("data of volume {i}").as_bytes());
    }
    let new = key_rotate(&env, "k");
    let saved = env.dir("saved");
    let state = [&env.home, &vols[0], &vols[1]];
    for (i, p) in state.iter().enumerate() {
        copy_tree(p, &saved.join(i.to_string()));
    }

    for (step, nth) in cases {
        for (i, p) in state.iter().enumerate() {
            copy_tree(&saved.join(i.to_string()), p);
        }
        let mut seen = 0;
        let mut fault = |s: RewrapStep, _at: &Path| -> io::Result<()> {
            if s == step {
                seen += 1;
                if seen == nth {
                    return Err(io::Error::other("injected crash"));
                }
            }
            Ok(())
        };
        let req = UpdateRequest {
            version: Some(version_of(&new).to_string()),
            ..Default::default()
        };
        let r = des::update(
            &home,
            "d",
            &req,
            &mut Hooks {
                progress: None,
                fault: Some(&mut fault),
            },
        );
        assert!(
            matches!(r, Err(DesError::Interrupted(s)) if s == step),
            "{step:?}#{nth}: {r:?}"
        );

        // Consistent: every header names a key the record lists, and unlocks with it.
        let rec = des::show(&home, "d").unwrap();
        for (i, v) in vols.iter().enumerate() {
            let kid = header_kid(v);
            assert!(
                kid == old || kid == new,
                "{step:?}#{nth}: volume {i} names {kid}"
            );
            assert!(
                rec.knows_key(&kid),
                "{step:?}#{nth}: record {rec:?} does not list {kid} of volume {i}"
            );
            let vault = LocalVault::open(&home.vault_dir()).unwrap();
            assert_eq!(
                read_file_in_process(v, vault, "f"),
                format!("data of volume {i}").as_bytes(),
                "{step:?}#{nth}"
            );
        }
        // The interrupted volume mounts for real.
        let v = &vols[nth - 1];
        let m = env.mount(v, &env.mnt);
        assert_eq!(
            read(&m.path("f")),
            format!("data of volume {}", nth - 1).as_bytes()
        );
        m.unmount();

        // `des update` finishes the job; then the old version can go.
        env.cmkfs(&["des", "update", "d"]).assert_ok();
        let rec = des::show(&home, "d").unwrap();
        assert_eq!(rec.active_key.key_url, new, "{step:?}#{nth}");
        assert!(rec.previous_keys.is_empty(), "{step:?}#{nth}: {rec:?}");
        set_enabled(&env, &old, false);
        for (i, v) in vols.iter().enumerate() {
            assert_eq!(header_kid(v), new, "{step:?}#{nth}: volume {i}");
            let vault = LocalVault::open(&home.vault_dir()).unwrap();
            assert_eq!(
                read_file_in_process(v, vault, "f"),
                format!("data of volume {i}").as_bytes()
            );
        }
        println!("{step:?} on volume {nth}: consistent, mounted, finished");
    }
}

// ---------------------------------------------------------------------------------------------
// A key change to a key in another vault (a vault server over HTTPS)
// ---------------------------------------------------------------------------------------------

use crate::vault_support;

/// `cmkfs ARGS` with `CMKFS_HOME=home`, time-limited.
fn cmkfs_in(home: &Path, args: &[&str]) -> Output {
    let mut cmd = std::process::Command::new(bin());
    cmd.args(args)
        .env("CMKFS_HOME", home)
        .env_remove("XDG_DATA_HOME");
    common::passphrase_env(&mut cmd, home);
    run_with_timeout(cmd, CMD_TIMEOUT).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn key_change_to_a_key_in_another_vault_over_https() {
    let env = Env::new();
    purge_protection(&env);
    let local_kid = key_create(&env, "k");
    env.cmkfs(&["des", "create", "d", "--key", "k"]).assert_ok();
    init_des(&env, &env.cipher, "d");
    {
        let m = env.mount(&env.cipher, &env.mnt);
        write(&m.path("f"), b"moving vaults");
        m.unmount();
    }
    // A second vault, served over HTTPS from its own home.
    let remote = env.dir("remote-home");
    cmkfs_in(
        &remote,
        &["vault", "key", "create", "rk", "--key-size", KEY_SIZE],
    )
    .assert_ok();
    let server = vault_support::ServerProc::start(&remote, 0);
    let cred = env.home.join("credentials/remote-id.json");
    fs::create_dir_all(cred.parent().unwrap()).unwrap();
    let cred_s = cred.to_str().unwrap().to_string();
    cmkfs_in(
        &remote,
        &[
            "vault",
            "identity",
            "create",
            "remote-id",
            "--server-url",
            &server.url,
            "--credential-file",
            &cred_s,
        ],
    )
    .assert_ok();
    env.cmkfs(&["vault", "add", "remote", &server.url])
        .assert_ok();
    let key_url = format!("{}/keys/rk", server.url);
    let update = [
        "des",
        "update",
        "d",
        "--key",
        &key_url,
        "--identity",
        "remote-id",
    ];
    let before = des_snapshot(&env);
    // The REST API has no vault settings or policies: purge protection is read from the key's
    // recoveryLevel, permissions are proven by a wrap/unwrap probe.
    let policy = |perms: &str| {
        cmkfs_in(
            &remote,
            &[
                "vault",
                "policy",
                "set",
                "remote-id",
                "--key",
                "rk",
                "--permissions",
                perms,
            ],
        )
        .assert_ok();
    };
    let refused = |needle: &str| {
        let out = env.cmkfs(&update);
        out.assert_clear_error();
        assert!(out.stderr.contains(needle), "expected {needle:?}:\n{out}");
        assert_same_snapshot("refused key change", &before, &des_snapshot(&env));
        assert_eq!(header_kid(&env.cipher), local_kid);
    };
    refused("lacks the get permission");
    policy("get,wrapKey,unwrapKey");
    refused("purge protection");
    cmkfs_in(&remote, &["vault", "config", "--purge-protection", "on"]).assert_ok();
    policy("get");
    refused("cannot wrapKey");
    policy("get,wrapKey");
    refused("cannot unwrapKey");
    policy("get,wrapKey,unwrapKey");

    let r = json(&env.cmkfs(&[&update[..], &["--json"]].concat()));
    let new_kid = r["activeKey"]["keyUrl"].as_str().unwrap().to_string();
    assert!(new_kid.starts_with(&key_url), "{r:#}");
    assert_eq!(r["identity"]["name"], "remote-id");
    assert_eq!(header_kid(&env.cipher), new_kid);
    // The old local key can go; the volume mounts through the remote vault as the DES identity.
    set_enabled(&env, &local_kid, false);
    let m = env.mount(&env.cipher, &env.mnt);
    assert_eq!(read(&m.path("f")), b"moving vaults");
    m.unmount();
    drop(server);
}
