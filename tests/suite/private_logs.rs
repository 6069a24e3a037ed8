//! Logs never hold plaintext names (second review, M1): the mount log ($CMKFS_HOME/run/
//! mount-*.log, kept after umount) recorded failed requests with the plaintext path
//! (`request failed op="lookup" path=ANOTHER-SECRET-NAME-abc`), e.g. every access during a
//! revocation; the mount of an old volume logged the plaintext path of every file whose v1
//! tail it recovered. Logs name backing (encrypted) names and inode numbers only.

use crate::common;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use common::*;

fn logs(env: &Env) -> String {
    fs::read_dir(env.home.join("run"))
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
                .map(|e| fs::read_to_string(e.path()).unwrap_or_default())
                .collect()
        })
        .unwrap_or_default()
}

#[track_caller]
fn assert_no_plaintext(logs: &str, names: &[&str]) {
    for n in names {
        assert!(
            !logs.contains(n),
            "the mount log names {n:?} in plaintext:\n{logs}"
        );
    }
}

/// Failures of every kind a mount logs — corrupt files, names that do not decrypt, planted
/// entries, a revocation and the accesses during it — leave no plaintext name in the log.
#[test]
fn the_mount_log_names_no_plaintext_after_failures_and_a_revocation() {
    // Without the writeback cache, whose kernel would serve the corrupted file's pages it
    // holds instead of reading the backing store again (as in `mount_corrupt`).
    let env = Env::new().in_mode(&["--no-writeback-cache"]);
    env.init(&env.cipher);
    let m = env.mount_with(&env.cipher, &env.mnt, &["--key-check-interval", "1s"]);
    let names = [
        "ANOTHER-SECRET-NAME-abc",
        "SECRET-DIR-xyz",
        "INNER-SECRET-FILE-qrs",
        "MISSING-SECRET-NAME-uvw",
        "SECRET-LINK-TARGET-def",
    ];
    write(&m.path(names[0]), &[7u8; 5000]);
    fs::create_dir(m.path(names[1])).unwrap();
    write(&m.path(format!("{}/{}", names[1], names[2])), b"inner");
    std::os::unix::fs::symlink(names[4], m.path("link")).unwrap();
    // A corrupt file header (EIO, logged), read through its name and its directory.
    let ino = std::os::unix::fs::MetadataExt::ino(&fs::metadata(m.path(names[0])).unwrap());
    let backing = data_files(&env.cipher)
        .into_iter()
        .find(|p| std::os::unix::fs::MetadataExt::ino(&fs::metadata(p).unwrap()) == ino)
        .expect("backing file");
    fs::OpenOptions::new()
        .write(true)
        .open(&backing)
        .unwrap()
        .write_all_at(&[0xEE; 32], 0)
        .unwrap();
    assert!(fs::read(m.path(names[0])).is_err());
    // The revocation, and every kind of access while it lasts.
    env.cmkfs(&["vault", "key", "update", "default", "--disable"])
        .assert_ok();
    let revoked = wait_until(Duration::from_secs(60), || {
        fs::read(m.path(format!("{}/{}", names[1], names[2]))).is_err()
    });
    assert!(revoked, "the mount was not cut off");
    for n in names {
        let _ = fs::metadata(m.path(n));
        let _ = fs::read(m.path(n));
        let _ = fs::write(m.path(format!("{n}-new")), b"x");
        let _ = fs::create_dir(m.path(format!("{n}-dir")));
        let _ = fs::read_dir(m.path(n));
        let _ = fs::read_link(m.path("link"));
    }
    m.unmount();
    let text = logs(&env);
    assert!(
        text.contains("request failed"),
        "the test must make the mount log failures:\n{text}"
    );
    assert!(text.contains("Inaccessible"), "{text}");
    assert_no_plaintext(&text, &names);
    assert_no_plaintext(&text, &["SECRET"]);
}

/// The mount of a format v1 volume converts it first; the lines it logs about recovered file
/// tails name backing paths, while the terminal is told the plaintext ones.
#[test]
fn an_upgrade_at_mount_logs_backing_paths_only() {
    let env = Env::new();
    let fx = v1_fixture::copy(&env.root);
    let out = env.cmkfs(&[
        OsStr::new("mount"),
        env.cipher.as_os_str(),
        env.mnt.as_os_str(),
    ]);
    out.assert_ok();
    let m = Mount::adopt(&env, &env.cipher, &env.mnt);
    assert!(out.stderr.contains("zero-tails/one-byte"), "{out}");
    m.unmount();
    let text = logs(&env);
    assert!(
        text.contains("format v1 read this file's last bytes as zeros"),
        "{text}"
    );
    let plaintext: Vec<&str> = fx
        .files
        .keys()
        .flat_map(|p| p.split('/'))
        .filter(|c| c.len() >= 8)
        .collect();
    assert!(plaintext.contains(&"one-byte"), "{plaintext:?}");
    assert_no_plaintext(&text, &plaintext);
}
