//! Format v3 (page-aligned data units) and format v2 side by side, through real mounts:
//! where the units sit in the backing file, what the daemon writes, what the mount, fsck and
//! `--repair` do with lengths and file versions no v3 file has, and that a `--format 2`
//! volume keeps working everywhere (write, re-encrypt, back up, restore).

use crate::common;

use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use cmkfs::crypto::VolumeKeys;
use cmkfs::home::Home;
use cmkfs::vault::local::LocalVault;
use cmkfs::volume::header::VolumeHeader;
use cmkfs::volume::layout::{FileHeader, Layout};
use common::*;

/// Deterministic, non-repeating contents (no two 16-byte blocks alike).
fn pattern(n: usize, salt: u8) -> Vec<u8> {
    (0..n)
        .map(|i| ((i * 131 + (i >> 8) * 7 + salt as usize) % 251) as u8)
        .collect()
}

/// An strace attached to the daemon: stopped (SIGINT, so it flushes its output) within 10 s,
/// killed on drop if still there (the kernel then detaches it from the daemon).
struct Tracer(std::process::Child);

impl Tracer {
    fn stop(&mut self) {
        // SAFETY: signalling the strace child this test started.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGINT) };
        let t0 = std::time::Instant::now();
        while t0.elapsed() < std::time::Duration::from_secs(10) {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The volume's keys, unwrapped with the test vault (not through the data path).
fn keys_of(env: &Env, cipher: &Path) -> VolumeKeys {
    let header = VolumeHeader::read(cipher).unwrap();
    let owner = LocalVault::open(&Home::at(&env.home).vault_dir()).unwrap();
    let dek = header.unwrap_dek(&owner).unwrap();
    VolumeKeys::from_dek(&dek, SECTOR).unwrap()
}

/// Writes 5000 bytes of pattern `i` to each of `names` in the mount and returns their
/// backing files, in order.
fn write_files(env: &Env, m: &Mount, names: &[&str]) -> Vec<PathBuf> {
    for (i, n) in names.iter().enumerate() {
        fs::write(m.path(n), pattern(5000, i as u8)).unwrap();
    }
    names
        .iter()
        .map(|n| backing_of(&env.cipher, &m.path(n)))
        .collect()
}

/// A v3 volume (what `init` makes): unit n is the XTS encryption of plaintext unit n at
/// backing offset 4096·(n+1), the header area past the 32-byte header is zeros, and 4 KiB
/// aligned writes reach the backing file as pwrites at page-aligned offsets (strace of the
/// daemon).
#[test]
fn v3_units_sit_on_backing_pages_and_aligned_writes_stay_page_aligned() {
    let env = Env::new();
    env.init(&env.cipher);
    assert_eq!(env.info(&env.cipher)["format_version"], 3);
    assert_eq!(layout_of(&env.cipher), Layout::V3);
    let data = pattern(3 * 4096 + 5, 1);
    let m = env.mount(&env.cipher, &env.mnt);
    fs::write(m.path("f"), &data).unwrap();
    fs::write(m.path("empty"), b"").unwrap();
    let backing = backing_of(&env.cipher, &m.path("f"));
    m.unmount();
    let raw = fs::read(&backing).unwrap();
    assert_eq!(raw.len(), 4096 + 3 * 4096 + 16 + 5);
    let h = FileHeader::decode(&raw[..32]).unwrap();
    assert_eq!(h.version, 3);
    assert!(
        raw[32..4096].iter().all(|b| *b == 0),
        "header area not zero"
    );
    let keys = keys_of(&env, &env.cipher);
    for n in 0..4usize {
        let at = 4096 * (n + 1);
        let len = if n < 3 { 4096 } else { 16 };
        let mut unit = raw[at..at + len].to_vec();
        keys.xts
            .decrypt_unit(h.tweak().wrapping_add(n as u128), &mut unit)
            .unwrap();
        let want = &data[n * 4096..(n * 4096 + len).min(data.len())];
        assert_eq!(&unit[..want.len()], want, "unit {n} is not at 4096·({n}+1)");
    }

    // What the daemon writes for 4 KiB aligned overwrites: one pwrite per unit at its page.
    let m = env.mount_foreground(&env.cipher, &env.mnt);
    let pid = m.daemon_pid().expect("the daemon's pid");
    let trace = env.root.join("strace.out");
    let mut st = Tracer(
        std::process::Command::new("strace")
            .args(["-f", "-qq", "-e", "trace=pwrite64", "-o"])
            .arg(&trace)
            .args(["-p", &pid.to_string()])
            .spawn()
            .expect("strace"),
    );
    // strace attaches before it writes anything: wait for the file it creates.
    let t0 = std::time::Instant::now();
    while !trace.exists() && t0.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    let f = OpenOptions::new().write(true).open(m.path("f")).unwrap();
    for n in [2u64, 0, 1] {
        f.write_all_at(&pattern(4096, n as u8 + 7), n * 4096)
            .unwrap();
        f.sync_data().unwrap();
    }
    drop(f);
    st.stop();
    m.unmount();
    let log = fs::read_to_string(&trace).unwrap_or_default();
    let offsets: Vec<(u64, u64)> = log
        .lines()
        .filter_map(|l| {
            let args = l.split("pwrite64(").nth(1)?;
            let mut parts = args.rsplitn(3, ", ");
            let off = parts.next()?.split(')').next()?.trim().parse().ok()?;
            let len = parts.next()?.trim().parse().ok()?;
            Some((off, len))
        })
        .filter(|(_, len)| *len == 4096)
        .collect();
    assert!(
        offsets.len() >= 3,
        "no 4 KiB pwrites of the daemon seen: {log}"
    );
    for (off, _) in &offsets {
        assert_eq!(off % 4096, 0, "a 4 KiB unit written at {off}: {log}");
    }
    for n in [0u64, 1, 2] {
        assert!(
            offsets.iter().any(|(o, _)| *o == 4096 * (n + 1)),
            "unit {n} not written at {}: {offsets:?}",
            4096 * (n + 1)
        );
    }
}

/// Lengths inside the header area (1..4095) and a v2 file header in a v3 volume: the mount
/// answers EIO and logs the backing file and why, fsck reports each, `--repair` moves them to
/// the quarantine (as for a corrupt v2 file), and the volume is clean afterwards.
#[test]
fn corrupt_v3_lengths_and_a_foreign_file_version_are_eio_reported_and_repaired() {
    let env = Env::new();
    env.init(&env.cipher);
    let m = env.mount(&env.cipher, &env.mnt);
    let names = ["l1", "l31", "l32", "l100", "l4095", "v2hdr", "good"];
    let backing = write_files(&env, &m, &names);
    m.unmount();
    for (b, len) in backing.iter().zip([1u64, 31, 32, 100, 4095]) {
        OpenOptions::new()
            .write(true)
            .open(b)
            .unwrap()
            .set_len(len)
            .unwrap();
    }
    // A v2 header (version field 2) on a file of a valid v3 length.
    OpenOptions::new()
        .write(true)
        .open(&backing[5])
        .unwrap()
        .write_all_at(&2u16.to_le_bytes(), 4)
        .unwrap();

    let m = env.mount_foreground(&env.cipher, &env.mnt);
    for n in &names[..6] {
        let e = fs::read(m.path(n)).expect_err(n);
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "{n}: {e}");
    }
    assert_eq!(fs::read(m.path("good")).unwrap(), pattern(5000, 6));
    let log = m.daemon_log();
    assert!(log.contains("header area"), "{log}");
    assert!(
        log.contains("says format v2 in a format v3 volume"),
        "{log}"
    );
    m.unmount();

    let fsck = |extra: &[&str]| {
        let mut args = vec!["fsck", env.cipher.to_str().unwrap(), "--json"];
        args.extend(extra);
        let out = env.cmkfs(&args);
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        (out.status.code(), v)
    };
    let (code, r) = fsck(&[]);
    assert_eq!(code, Some(2), "{r:#}");
    let kinds: Vec<(String, String)> = r["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["kind"].as_str().unwrap().to_string(),
                p["backing"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let want = [
        "file_header_truncated",
        "file_header_truncated",
        "file_length_invalid",
        "file_length_invalid",
        "file_length_invalid",
        "file_format_mismatch",
    ];
    for (b, kind) in backing.iter().zip(want) {
        let name = b.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            kinds.iter().any(|(k, p)| k == kind && p.ends_with(&name)),
            "{kind} for {name} missing: {kinds:?}"
        );
    }
    assert_eq!(kinds.len(), 6, "{kinds:?}");
    let (code, r) = fsck(&["--repair"]);
    assert_eq!(code, Some(1), "{r:#}");
    let (code, r) = fsck(&[]);
    assert_eq!(code, Some(0), "{r:#}");
    let m = env.mount(&env.cipher, &env.mnt);
    let mut left: Vec<String> = fs::read_dir(m.path(""))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["good"]);
    m.unmount();
}

/// A backing file of exactly the header area (4096 bytes in v3) whose header is not one of
/// this volume (zeros, a v2 header, a key generation the volume does not have) is EIO at
/// open and read, for writing (`echo hi > f`) too, and logged with its path (attack12 F4);
/// a valid header alone is an empty file that reads and takes writes.
#[test]
fn a_bare_header_area_with_a_bogus_header_is_eio_and_a_valid_one_an_empty_file() {
    let env = Env::new();
    env.init(&env.cipher);
    let m = env.mount(&env.cipher, &env.mnt);
    let names = ["zeros", "v2hdr", "kg1", "bare"];
    let backing = write_files(&env, &m, &names);
    m.unmount();
    let h = Layout::V3.data_offset;
    for (i, b) in backing.iter().enumerate() {
        let f = OpenOptions::new().write(true).open(b).unwrap();
        f.set_len(h).unwrap();
        match i {
            0 => f.write_all_at(&vec![0u8; h as usize], 0).unwrap(),
            1 => f.write_all_at(&2u16.to_le_bytes(), 4).unwrap(),
            2 => f.write_all_at(&1u16.to_le_bytes(), 6).unwrap(),
            _ => {}
        }
    }

    let m = env.mount_foreground(&env.cipher, &env.mnt);
    for n in &names[..3] {
        assert_eq!(fs::metadata(m.path(n)).unwrap().len(), 0, "{n}");
        let e = fs::read(m.path(n)).expect_err(n);
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "{n}: {e}");
        let e = OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(m.path(n))
            .expect_err(n);
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "{n}: {e}");
    }
    assert_eq!(fs::read(m.path("bare")).unwrap(), b"");
    fs::write(m.path("bare"), b"hi").unwrap();
    assert_eq!(fs::read(m.path("bare")).unwrap(), b"hi");
    let log = m.daemon_log();
    for b in &backing[..3] {
        let name = b.file_name().unwrap().to_string_lossy();
        assert!(log.contains(&*name), "{name} not logged: {log}");
    }
    assert!(
        log.contains("says format v2 in a format v3 volume"),
        "{log}"
    );
    assert!(log.contains("key generation 1"), "{log}");
    m.unmount();
}

/// `cmkfs init --format 2` makes a v2 volume that mounts, writes (backing lengths 32 + ...),
/// re-encrypts, backs up and restores as a v2 volume; `cmkfs upgrade` says in one line that
/// it does not convert v2 to v3, and has nothing to do on v3; `--format 4` is refused.
#[test]
fn a_format_2_volume_mounts_writes_reencrypts_backs_up_and_restores() {
    let env = Env::new();
    let out = env.cmkfs(&[
        "init",
        env.root.join("bad").to_str().unwrap(),
        "--format",
        "4",
    ]);
    out.assert_clear_error();
    assert!(out.stderr.contains("3, the default, or 2"), "{out}");
    assert!(!env.root.join("bad").exists());

    env.init_with(&env.cipher, &["--format", "2"]);
    assert_eq!(env.info(&env.cipher)["format_version"], 2);
    assert_eq!(data_offset(&env.cipher), 32);
    let sizes = [0usize, 1, 15, 16, 17, 4095, 4096, 4097, 8200];
    let files: Vec<(String, Vec<u8>)> = sizes
        .iter()
        .map(|&n| (format!("s{n}"), pattern(n, n as u8)))
        .collect();
    let m = env.mount(&env.cipher, &env.mnt);
    for (name, data) in &files {
        fs::write(m.path(name), data).unwrap();
    }
    let lens: Vec<u64> = files
        .iter()
        .map(|(n, _)| {
            fs::metadata(backing_of(&env.cipher, &m.path(n)))
                .unwrap()
                .len()
        })
        .collect();
    m.unmount();
    for ((name, data), len) in files.iter().zip(&lens) {
        let want = if data.is_empty() {
            [0u64, 32].contains(len)
        } else {
            *len == 32 + data.len() as u64 + if data.len() % 16 == 0 { 0 } else { 16 }
        };
        assert!(want, "{name}: backing length {len}");
    }

    let out = env.cmkfs(&["upgrade", env.cipher.to_str().unwrap()]);
    out.assert_ok();
    assert!(
        out.stdout.contains("already on-disk format v2") && out.stdout.contains("new volume"),
        "{out}"
    );
    assert_eq!(out.stdout.trim().lines().count(), 1, "{out}");

    // Offline re-encryption under a new DEK keeps the format and the bytes.
    env.cmkfs(&["volume", "reencrypt", env.cipher.to_str().unwrap()])
        .assert_ok();
    assert_eq!(env.info(&env.cipher)["format_version"], 2);
    assert_eq!(VolumeHeader::read(&env.cipher).unwrap().key_generation, 1);
    let m = env.mount(&env.cipher, &env.mnt);
    for (name, data) in &files {
        assert_eq!(
            &fs::read(m.path(name)).unwrap(),
            data,
            "{name} after reencrypt"
        );
    }
    m.unmount();

    // Backup and restore under a set: a v2 volume again, byte-identical backing files.
    crate::backup::create_set_d(&env);
    // Under the volume's own key (the default backup key).
    let archive = env.root.join("v2.tar");
    env.cmkfs(&[
        "backup",
        env.cipher.to_str().unwrap(),
        archive.to_str().unwrap(),
    ])
    .assert_ok();
    let r = env.root.join("restored");
    env.cmkfs(&[
        OsStr::new("restore"),
        archive.as_os_str(),
        r.as_os_str(),
        OsStr::new("--des"),
        OsStr::new("d"),
    ])
    .assert_ok();
    assert_eq!(env.info(&r)["format_version"], 2);
    let m = env.mount(&r, &env.mnt);
    for (name, data) in &files {
        assert_eq!(
            &fs::read(m.path(name)).unwrap(),
            data,
            "{name} after restore"
        );
    }
    m.unmount();

    // v3: nothing to upgrade.
    let v3 = env.root.join("v3");
    env.init(&v3);
    let out = env.cmkfs(&["upgrade", v3.to_str().unwrap()]);
    out.assert_ok();
    assert!(out.stdout.contains("nothing to upgrade"), "{out}");
}
