//! `cmkfs backup` of a volume with a damaged data file (attack12 F2): a restore refuses a
//! whole archive for one member that is not a cmkfs data file of the volume, so the backup
//! refuses first, naming the file and `cmkfs fsck --repair`, and leaves no archive (so does
//! any other entry the restore's screen refuses); once fsck has set the file aside in
//! `cmkfs.quarantine/`, the backup (quarantine included) restores.

use crate::backup::{restore_to, setup};
use crate::common;

use std::fs::{self, OpenOptions};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::*;

fn poke(b: &Path, off: u64, bytes: &[u8]) {
    OpenOptions::new()
        .write(true)
        .open(b)
        .unwrap()
        .write_all_at(bytes, off)
        .unwrap();
}

/// A torn file (10 bytes), a file header of an unknown version and one of a key generation
/// the volume does not have: each refuses the backup in one line naming its backing file
/// and the way out, with no archive or temp file left; after `fsck --repair` (and the key
/// generation put back) the backup succeeds and restores, plain (good files byte-identical,
/// the quarantine with them) and with `--new-dek --discard-quarantine`.
#[test]
fn a_backup_of_a_volume_with_a_damaged_data_file_is_refused_and_restores_after_fsck_repair() {
    let env = Env::new();
    setup(&env);
    let m = env.mount(&env.cipher, &env.mnt);
    let names = ["torn", "ver", "kg", "good", "empty"];
    for (i, n) in names.iter().enumerate() {
        let len = if *n == "empty" { 0 } else { 5000 + i };
        fs::write(m.path(n), vec![i as u8 + 1; len]).unwrap();
    }
    let b: Vec<PathBuf> = names
        .iter()
        .map(|n| backing_of(&env.cipher, &m.path(n)))
        .collect();
    m.unmount();
    let archive = env.root.join("vol.tar");
    let backup = || {
        env.cmkfs(&[
            "backup".as_ref(),
            env.cipher.as_os_str(),
            archive.as_os_str(),
        ])
    };
    let refused = |bad: &Path, why: &str| {
        let out = backup();
        assert!(!out.ok(), "{out}");
        let name = bad.file_name().unwrap().to_string_lossy();
        for want in [&*name, why, "damaged data file", "cmkfs fsck --repair"] {
            assert!(out.stderr.contains(want), "{want:?} missing: {out}");
        }
        assert_eq!(out.stderr.trim_end().lines().count(), 1, "{out}");
        let left: Vec<_> = fs::read_dir(&env.root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("vol.tar"))
            .collect();
        assert!(left.is_empty(), "left by a refused backup: {left:?}");
    };
    let repair = || {
        let out = env.cmkfs(&["fsck", env.cipher.to_str().unwrap(), "--repair"]);
        assert_eq!(out.status.code(), Some(1), "{out}");
    };

    OpenOptions::new()
        .write(true)
        .open(&b[0])
        .unwrap()
        .set_len(10)
        .unwrap();
    refused(&b[0], "shorter than its header area");
    repair();
    poke(&b[1], 4, &9u16.to_le_bytes());
    refused(&b[1], "version 9");
    repair();
    poke(&b[2], 6, &1u16.to_le_bytes());
    refused(&b[2], "key generation 1");
    poke(&b[2], 6, &0u16.to_le_bytes());
    // What the restore's screen refuses beyond data files: an executable file under a name
    // cmkfs never makes.
    let planted = env.cipher.join("run.sh");
    fs::write(&planted, b"#!/bin/sh\n").unwrap();
    fs::set_permissions(&planted, fs::Permissions::from_mode(0o755)).unwrap();
    let out = backup();
    assert!(!out.ok(), "{out}");
    for want in ["run.sh", "not a cmkfs entry", "no archive was written"] {
        assert!(out.stderr.contains(want), "{want:?} missing: {out}");
    }
    assert!(!archive.exists());
    fs::remove_file(&planted).unwrap();

    backup().assert_ok();
    let r1 = env.root.join("r1");
    restore_to(&env, &archive, &r1, &[]).assert_ok();
    for p in &b[2..] {
        let rel = p.strip_prefix(&env.cipher).unwrap();
        assert_eq!(
            fs::read(r1.join(rel)).unwrap(),
            fs::read(p).unwrap(),
            "{rel:?}"
        );
    }
    let q = r1.join("cmkfs.quarantine");
    assert_eq!(
        data_files(&q).len(),
        2,
        "the quarantine travels with the volume"
    );
    let r2 = env.root.join("r2");
    restore_to(&env, &archive, &r2, &["--new-dek", "--discard-quarantine"]).assert_ok();
}
