//! Bad input: each case must fail with a non-zero exit and one line on stderr, mount nothing,
//! leave no daemon behind, and change nothing on disk (backing dir and mountpoint compared
//! by a recursive listing with content hashes before and after).

use crate::common;

use std::ffi::OsStr;
use std::fs;
use std::path::Path;

use common::*;

/// Runs `cmkfs mount CIPHER MNT` expecting a clean failure that changes nothing.
#[track_caller]
fn expect_mount_fails(env: &Env, cipher: &Path, mnt: &Path, case: &str) {
    let (c0, m0) = (snapshot(cipher), snapshot(mnt));
    let mounts_before = mounts_at(mnt).len();
    // A busy mountpoint already has a legitimate daemon: only new ones count.
    let daemons_before = daemon_pids(mnt);
    let out = env.try_mount(cipher, mnt);
    eprintln!("{case}: {}", out.stderr.trim_end());
    if out.ok() {
        panic!("{case}: mount should have failed:\n{out}");
    }
    out.assert_clear_error();
    assert_eq!(
        mounts_at(mnt).len(),
        mounts_before,
        "{case}: a failed mount left something mounted"
    );
    assert!(
        wait_until(DAEMON_EXIT_TIMEOUT, || daemon_pids(mnt)
            .iter()
            .all(|p| daemons_before.contains(p))),
        "{case}: a failed mount left a daemon running"
    );
    assert_same_snapshot(&format!("{case}: backing dir"), &c0, &snapshot(cipher));
    assert_same_snapshot(&format!("{case}: mountpoint"), &m0, &snapshot(mnt));
}

/// Proves a volume is healthy (so a failure above was caused by the bad input, not by a
/// broken volume): mounts it and reads back `file`.
#[track_caller]
fn assert_mounts_and_reads(env: &Env, cipher: &Path, file: &str, want: &[u8]) {
    let m = env.mount(cipher, &env.mnt);
    assert_eq!(read(&m.path(file)), want);
    m.unmount();
}

/// A volume with one file in it, unmounted.
fn volume_with_file(env: &Env, cipher: &Path) {
    env.init(cipher);
    let m = env.mount(cipher, &env.mnt);
    write(&m.path("hello.txt"), b"hello, volume");
    m.unmount();
}

#[test]
fn mount_of_a_non_volume_fails_cleanly() {
    let env = Env::new();
    expect_mount_fails(&env, &env.cipher, &env.mnt, "empty directory");

    fs::create_dir(env.cipher.join("sub")).unwrap();
    fs::write(env.cipher.join("notes.txt"), "plain old file").unwrap();
    expect_mount_fails(&env, &env.cipher, &env.mnt, "directory with files");

    let missing = env.root.join("no-such-dir");
    expect_mount_fails(&env, &missing, &env.mnt, "missing backing dir");
    assert!(!missing.exists());
}

#[test]
fn mount_with_corrupt_or_truncated_header_fails_cleanly() {
    let env = Env::new();
    volume_with_file(&env, &env.cipher);
    let header = env.cipher.join(HEADER_NAME);
    let good = fs::read(&header).unwrap();
    assert!(good.len() > 4, "header suspiciously small: {good:?}");

    // The last meaningful byte (the header may end in a newline, which JSON ignores).
    let last = good.trim_ascii_end().len();
    let mut flipped_json = good.clone();
    flipped_json[0] ^= 0xff;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty header", Vec::new()),
        ("truncated header (half)", good[..good.len() / 2].to_vec()),
        (
            "truncated header (last byte cut)",
            good[..last - 1].to_vec(),
        ),
        ("header with its first byte flipped", flipped_json),
        ("garbage header", vec![0x5a; good.len()]),
        (
            "JSON that is not a header",
            b"{\"hello\": \"world\"}\n".to_vec(),
        ),
    ];
    for (case, bytes) in cases {
        fs::write(&header, &bytes).unwrap();
        expect_mount_fails(&env, &env.cipher, &env.mnt, case);
    }
    fs::remove_file(&header).unwrap();
    expect_mount_fails(&env, &env.cipher, &env.mnt, "header missing");

    // Well-formed JSON with one field tampered with: each must be caught by a structural
    // check, the unwrap, the fingerprint or the header MAC (docs/FORMAT.md), never mount a
    // volume with the wrong layout or key.
    type Edit = fn(&serde_json::Value) -> serde_json::Value;
    let edits: Vec<(&str, &str, Edit)> = vec![
        ("wrapped DEK altered", "wrapped_dek", |v| {
            alter_text(v, true)
        }),
        ("DEK fingerprint altered", "dek_fingerprint", |v| {
            alter_text(v, false)
        }),
        ("header MAC altered", "header_mac", |v| alter_text(v, false)),
        ("volume id altered (MAC)", "volume_id", |v| {
            alter_text(v, false)
        }),
        ("sector size altered", "sector_size", |_| 512.into()),
        ("file header length altered", "file_header_len", |_| {
            0.into()
        }),
        ("unknown format version", "format_version", |_| 99.into()),
        // v3 → v2 would read every file 4064 bytes early: refused (the data offset no longer
        // matches the version, and the MAC covers both).
        ("format version 3 -> 2", "format_version", |_| 2.into()),
        ("data offset 4096 -> 32", "file_header_len", |_| 32.into()),
        ("unknown cipher", "cipher", |_| "AES-128-XTS".into()),
        ("wrap algorithm altered", "wrap_alg", |_| "RSA-OAEP".into()),
        ("key id malformed", "key_id", |_| "not a key id".into()),
    ];
    let parsed: serde_json::Value = serde_json::from_slice(&good).unwrap();
    for (case, field, edit) in edits {
        let mut h = parsed.clone();
        let old = h
            .get(field)
            .unwrap_or_else(|| panic!("header has no {field:?}: {parsed}"));
        h[field] = edit(old);
        fs::write(&header, serde_json::to_vec_pretty(&h).unwrap()).unwrap();
        expect_mount_fails(&env, &env.cipher, &env.mnt, case);
    }
    // Both layout fields turned into a consistent v2 pair: only the MAC can tell.
    let mut h = parsed.clone();
    h["format_version"] = 2.into();
    h["file_header_len"] = 32.into();
    fs::write(&header, serde_json::to_vec_pretty(&h).unwrap()).unwrap();
    expect_mount_fails(&env, &env.cipher, &env.mnt, "v3 header relabelled v2 (MAC)");

    fs::write(&header, &good).unwrap();
    assert_mounts_and_reads(&env, &env.cipher, "hello.txt", b"hello, volume");
}

/// A string field with one character changed (staying in the same alphabet: a base64 or
/// hex digit), so only a check of the value itself can notice.
fn alter_text(v: &serde_json::Value, base64: bool) -> serde_json::Value {
    let s = v.as_str().expect("a string field");
    let mut chars: Vec<char> = s.chars().collect();
    // Change a character in the middle: base64 padding at the end is left alone.
    let i = chars.len() / 2;
    chars[i] = match (chars[i], base64) {
        ('A', true) => 'B',
        (_, true) => 'A',
        ('0', false) => '1',
        (_, false) => '0',
    };
    chars.into_iter().collect::<String>().into()
}

/// Replaces the volume's key id in its header with `new_kid` (textually, so whatever other
/// fields the format has stay byte-identical).
fn point_header_at(cipher: &Path, old_kid: &str, new_kid: &str) {
    let header = cipher.join(HEADER_NAME);
    let text = fs::read_to_string(&header).unwrap();
    assert!(
        text.contains(old_kid),
        "the header does not contain the key id {old_kid:?} verbatim (see docs/FORMAT.md): {text}"
    );
    fs::write(&header, text.replace(old_kid, new_kid)).unwrap();
}

#[test]
fn mount_with_a_key_that_cannot_unwrap_fails_cleanly() {
    let env = Env::new();
    volume_with_file(&env, &env.cipher);
    let header = env.cipher.join(HEADER_NAME);
    let good = fs::read(&header).unwrap();
    let kid = env.info(&env.cipher)["key_id"]
        .as_str()
        .expect("key_id")
        .to_string();

    // A different key of the same vault. `init --key other` is the contract's way to create
    // one; its volume tells us the key's versioned id.
    let scratch = env.dir("cipher-other");
    env.init_with(&scratch, &["--key", "other"]);
    let other_kid = env.info(&scratch)["key_id"]
        .as_str()
        .expect("key_id")
        .to_string();
    assert_ne!(other_kid, kid);
    point_header_at(&env.cipher, &kid, &other_kid);
    expect_mount_fails(&env, &env.cipher, &env.mnt, "header points at another key");
    fs::write(&header, &good).unwrap();

    // A new version of the same key: rotate, then learn the new version from a fresh volume
    // (init wraps with the latest version).
    let out = env.cmkfs(&["vault", "key", "rotate", "default"]);
    out.assert_ok();
    let rotated = env.dir("cipher-rotated");
    env.init(&rotated);
    let new_kid = env.info(&rotated)["key_id"]
        .as_str()
        .expect("key_id")
        .to_string();
    assert_ne!(new_kid, kid, "rotation must create a new key version");
    assert!(
        new_kid.starts_with("local:/keys/default/"),
        "unexpected key id after rotation: {new_kid}"
    );
    point_header_at(&env.cipher, &kid, &new_kid);
    expect_mount_fails(
        &env,
        &env.cipher,
        &env.mnt,
        "header points at the next key version",
    );

    // A version that does not exist.
    let bogus = format!("local:/keys/default/{}", "0".repeat(32));
    fs::write(&header, &good).unwrap();
    point_header_at(&env.cipher, &kid, &bogus);
    expect_mount_fails(
        &env,
        &env.cipher,
        &env.mnt,
        "header points at a missing key version",
    );

    // The old version still unwraps after rotation: the original header mounts.
    fs::write(&header, &good).unwrap();
    assert_mounts_and_reads(&env, &env.cipher, "hello.txt", b"hello, volume");
}

#[test]
fn mount_on_a_busy_mountpoint_fails_cleanly() {
    let env = Env::new();
    let other = env.dir("cipher-b");
    volume_with_file(&env, &env.cipher);
    env.init(&other);

    let m = env.mount(&env.cipher, &env.mnt);
    expect_mount_fails(&env, &other, &env.mnt, "mountpoint busy (another volume)");
    expect_mount_fails(&env, &env.cipher, &env.mnt, "mountpoint busy (same volume)");
    // The first mount is unharmed and not shadowed.
    assert_eq!(mounts_at(&env.mnt).len(), 1);
    assert_eq!(read(&m.path("hello.txt")), b"hello, volume");
    m.unmount();
}

#[test]
fn mount_on_a_missing_mountpoint_fails_cleanly() {
    let env = Env::new();
    volume_with_file(&env, &env.cipher);
    let missing = env.root.join("no-such-mountpoint");
    expect_mount_fails(&env, &env.cipher, &missing, "missing mountpoint");
    assert!(!missing.exists(), "a failed mount created the mountpoint");

    let file = env.root.join("a-file");
    fs::write(&file, "not a directory").unwrap();
    expect_mount_fails(&env, &env.cipher, &file, "mountpoint is a regular file");
}

#[test]
fn init_on_a_non_empty_directory_fails_cleanly() {
    let env = Env::new();
    // With a fresh home: the failure must not even create the vault.
    fs::write(env.cipher.join("existing.txt"), "user data").unwrap();
    let (c0, h0) = (snapshot(&env.cipher), snapshot(&env.home));
    let out = env.cmkfs(&[
        OsStr::new("init"),
        env.cipher.as_os_str(),
        OsStr::new("--key-size"),
        OsStr::new(KEY_SIZE),
    ]);
    out.assert_clear_error();
    assert_same_snapshot(
        "init on a non-empty dir: backing dir",
        &c0,
        &snapshot(&env.cipher),
    );
    assert_same_snapshot(
        "init on a non-empty dir: CMKFS_HOME",
        &h0,
        &snapshot(&env.home),
    );

    // init over an existing volume (also non-empty) must not replace its header.
    let vol = env.dir("vol");
    volume_with_file(&env, &vol);
    let v0 = snapshot(&vol);
    let out = env.cmkfs(&[
        OsStr::new("init"),
        vol.as_os_str(),
        OsStr::new("--key-size"),
        OsStr::new(KEY_SIZE),
    ]);
    out.assert_clear_error();
    assert_same_snapshot("init over a volume", &v0, &snapshot(&vol));
    assert_mounts_and_reads(&env, &vol, "hello.txt", b"hello, volume");

    // A regular file where the directory should be.
    let file = env.root.join("a-file");
    fs::write(&file, "x").unwrap();
    let f0 = snapshot(&file);
    env.cmkfs(&[OsStr::new("init"), file.as_os_str()])
        .assert_clear_error();
    assert_same_snapshot("init on a regular file", &f0, &snapshot(&file));
}

#[test]
fn info_of_a_non_volume_fails_cleanly() {
    let env = Env::new();
    let c0 = snapshot(&env.cipher);
    env.cmkfs(&[
        OsStr::new("info"),
        env.cipher.as_os_str(),
        OsStr::new("--json"),
    ])
    .assert_clear_error();
    assert_same_snapshot("info of a non-volume", &c0, &snapshot(&env.cipher));
}

#[test]
fn umount_of_a_busy_or_missing_mount_fails_cleanly() {
    let env = Env::new();
    volume_with_file(&env, &env.cipher);
    // Not mounted at all.
    env.cmkfs(&[OsStr::new("umount"), env.mnt.as_os_str()])
        .assert_clear_error();
    let missing = env.root.join("no-such-mountpoint");
    env.cmkfs(&[OsStr::new("umount"), missing.as_os_str()])
        .assert_clear_error();

    // A file open on the mount keeps it busy: a plain umount refuses, and leaves the mount
    // fully working.
    let m = env.mount(&env.cipher, &env.mnt);
    let open = fs::File::open(m.path("hello.txt")).unwrap();
    env.cmkfs(&[OsStr::new("umount"), env.mnt.as_os_str()])
        .assert_clear_error();
    assert!(
        is_mounted(&env.mnt),
        "a refused umount must leave the mount"
    );
    assert_eq!(read(&m.path("hello.txt")), b"hello, volume");
    drop(open);
    m.unmount();
}

/// Attack session 15, F2: a live mount whose backing `cmkfs.volume.json` was removed (a sync
/// client, a failing backing disk) is still a cmkfs mount: `cmkfs umount` unmounts it (the
/// harness's `unmount` runs it and waits for the daemon's exit) instead of calling it "not a
/// mounted cmkfs volume". A mount of another filesystem is still refused and left mounted.
#[test]
fn umount_takes_a_mount_whose_backing_header_is_gone_and_refuses_other_mounts() {
    let env = Env::new();
    volume_with_file(&env, &env.cipher);
    let m = env.mount(&env.cipher, &env.mnt);
    let header = env.cipher.join("cmkfs.volume.json");
    let aside = env.root.join("header-aside.json");
    fs::rename(&header, &aside).unwrap();
    m.unmount();
    fs::rename(&aside, &header).unwrap();
    let m = env.mount(&env.cipher, &env.mnt);
    assert_eq!(read(&m.path("hello.txt")), b"hello, volume");
    m.unmount();

    // Another filesystem (a tmpfs; detached at the end even if an assertion fails).
    struct Detach<'a>(&'a Path);
    impl Drop for Detach<'_> {
        fn drop(&mut self) {
            while is_mounted(self.0) && detach(self.0) {}
        }
    }
    let other = env.dir("other-fs");
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "cmkfs-test-tmpfs"])
        .arg(&other)
        .status()
        .unwrap();
    assert!(status.success(), "mount -t tmpfs: {status}");
    let _guard = Detach(&other);
    let out = env.cmkfs(&[OsStr::new("umount"), other.as_os_str()]);
    out.assert_clear_error();
    assert!(
        out.stderr.contains("is not a mounted cmkfs volume"),
        "{out}"
    );
    assert!(is_mounted(&other), "cmkfs umount unmounted a tmpfs");
}

/// Second review, L1: `cmkfs mount C C` (or the backing directory inside the mountpoint, or
/// the mountpoint inside it) was accepted and deadlocked on itself (SIGTERM did not end it).
/// Refused with one line, in the daemonizing and the foreground form.
#[test]
fn a_mountpoint_overlapping_the_backing_directory_is_refused() {
    let env = Env::new();
    volume_with_file(&env, &env.cipher);
    let inner = env.cipher.join("inner-mnt");
    fs::create_dir(&inner).unwrap();
    let outer = env.dir("outer");
    let nested = outer.join("cipher");
    fs::create_dir(&nested).unwrap();
    env.init(&nested);
    for (cipher, mnt, case) in [
        (&env.cipher, &env.cipher, "the same directory"),
        (
            &env.cipher,
            &inner,
            "mountpoint inside the backing directory",
        ),
        (&nested, &outer, "backing directory inside the mountpoint"),
    ] {
        expect_mount_fails(&env, cipher, mnt, case);
        assert!(
            env.try_mount(cipher, mnt).stderr.contains("mountpoint"),
            "{case}"
        );
        let out = env.cmkfs(&[
            OsStr::new("mount"),
            cipher.as_os_str(),
            mnt.as_os_str(),
            OsStr::new("--foreground"),
        ]);
        out.assert_clear_error();
        assert!(!is_mounted(mnt), "{case}");
    }
    fs::remove_dir(&inner).unwrap();
    assert_mounts_and_reads(&env, &env.cipher, "hello.txt", b"hello, volume");
}
